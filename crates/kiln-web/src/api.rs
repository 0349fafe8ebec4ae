//! The JSON API under `/api/v1/`. A commit's document is exactly what
//! `kiln results --format json` prints (the same type, serialized the same
//! way); lists are paged by submission order.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_dispatcher::view::Live;
use kiln_proto::CommitStatus;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::App;
use crate::board::Summary;

/// The most commits one page of `/api/v1/commits` holds.
pub const MAX_LIMIT: usize = 500;

/// A JSON response; `pretty` as `kiln results --format json` prints it.
pub(crate) fn json_body(status: StatusCode, body: String) -> Response {
    let mut res = (status, body).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// `{"error": message}` with `status`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    json_body(status, json!({ "error": message }).to_string())
}

/// `value` as JSON, `200 OK`.
pub(crate) fn json_ok(value: &impl Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => json_body(StatusCode::OK, body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `?branch=&repo=&status=&limit=&before=`
#[derive(Debug, Deserialize)]
pub struct CommitsQuery {
    branch: Option<String>,
    repo: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    /// Only commits submitted before this `seq` (the previous page's `next_before`).
    before: Option<u64>,
}

#[derive(Serialize)]
struct CommitsPage {
    commits: Vec<Summary>,
    /// Pass as `before` for the next page; absent on the last.
    next_before: Option<u64>,
}

fn parse_status(s: &str) -> Option<CommitStatus> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

/// `GET /api/v1/commits`: newest first.
pub async fn commits(State(app): State<Arc<App>>, Query(q): Query<CommitsQuery>) -> Response {
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match parse_status(s) {
            Some(status) => Some(status),
            None => {
                let msg = format!(
                    "unknown status {}: one of queued, running, passed, failed, error, cancelled, skipped",
                    json!(s)
                );
                return error(StatusCode::BAD_REQUEST, &msg);
            }
        },
    };
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_LIMIT);
    let board = app.board();
    let keep = |d: &kiln_dispatcher::stream::Doc| {
        q.branch.as_deref().is_none_or(|b| d.row.branch == b)
            && q.repo.as_deref().is_none_or(|r| d.row.repo == r)
            && status.is_none_or(|s| d.row.status == s)
    };
    // One more than asked tells whether there is a next page.
    let mut docs = board.newest(q.before, limit + 1, keep);
    let more = docs.len() > limit;
    docs.truncate(limit);
    let next_before = if more { docs.last().map(|d| d.row.seq) } else { None };
    let commits = docs.iter().filter_map(|d| board.summary(&d.row.commit)).collect();
    json_body(StatusCode::OK, serde_json::to_string(&CommitsPage { commits, next_before }).unwrap_or_default())
}

/// `GET /api/v1/commits/{commit}`: the document `kiln results --format json` prints.
pub async fn commit(State(app): State<Arc<App>>, Path(commit): Path<String>) -> Response {
    let report = {
        let board = app.board();
        let Some(doc) = board.resolve(&commit).and_then(|c| board.doc(&c)) else {
            return error(
                StatusCode::NOT_FOUND,
                &format!("no commit {} is known (or the prefix is ambiguous)", json!(commit)),
            );
        };
        doc.report()
    };
    match serde_json::to_string_pretty(&report) {
        Ok(mut body) => {
            body.push('\n');
            json_body(StatusCode::OK, body)
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn runners_json(live: &Live) -> serde_json::Value {
    json!({ "at_ms": live.at_ms, "runners": live.runners })
}

/// `GET /api/v1/runners`.
pub async fn runners(State(app): State<Arc<App>>) -> Response {
    match app.live().await {
        Ok(live) => json_body(StatusCode::OK, runners_json(&live).to_string()),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    }
}

/// `GET /api/v1/queue`.
pub async fn queue(State(app): State<Arc<App>>) -> Response {
    let live = match app.live().await {
        Ok(live) => live,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()),
    };
    let queue: Vec<serde_json::Value> = live
        .queue
        .iter()
        .map(|q| {
            json!({
                "commit": q.commit,
                "repo": q.repo,
                "branch": q.branch,
                "queued_at_ms": q.queued_at_ms,
                "pending_files": q.pending_files,
                "running_files": q.running_files,
                "done_files": q.done_files,
                "reason": q.reason.code(),
                "why": q.reason.to_string(),
            })
        })
        .collect();
    json_body(StatusCode::OK, json!({ "at_ms": live.at_ms, "queue": queue }).to_string())
}
