//! A test's history (`/tests/{id}`) and the flaky tests (`/flaky`), as
//! pages and as JSON. Both are read from the dashboard's own [`Board`],
//! which holds every commit's results, through
//! [`kiln_dispatcher::history`]: the same definition `kiln history` and
//! `kiln flaky` answer with, and never a request to the dispatcher's owner
//! task.
//!
//! Test ids hold anything (`/`, `::`, spaces, quotes, markup): links carry
//! them percent-encoded whole ([`pages::test_href`]), and the routes take
//! the rest of the path as the id (a wildcard), so an id with a literal `/`
//! typed by hand reaches its page too.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_dispatcher::history::{self as h, FLAKY_WINDOW_MS};
use kiln_proto::{FlakyTest, TestRun};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::board::Board;
use crate::{App, api, html, now_ms, pages};

/// How long a flaky list is reused while the board has not changed: going
/// over every result in the window is the dashboard's most expensive read
/// (BENCHMARKS.md), so readers of an unchanged board share one answer; it
/// is computed again after this anyway, because commits leave the window
/// as time passes.
pub const FLAKY_MAX_AGE: Duration = Duration::from_secs(60);

/// A flaky list, with what it was computed from.
pub struct Cached {
    days: u32,
    /// The board's last event then.
    seq: u64,
    at: Instant,
    flaky: Arc<Flaky>,
}

/// How many runs a test's page shows: the last 20–30 runs people ask for.
pub const PAGE_RUNS: usize = 30;
/// The most runs one answer of the JSON API holds.
pub const MAX_RUNS: usize = 100;
/// The flaky window when none is given: 14 days.
pub const DEFAULT_DAYS: u32 = (FLAKY_WINDOW_MS / DAY_MS) as u32;
/// The widest flaky window, as `kiln flaky --days` allows.
pub const MAX_DAYS: u32 = 3650;
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// `?repo=&limit=` on a test's page and its JSON.
#[derive(Debug, Default, Deserialize)]
pub struct TestQuery {
    /// Only commits of this repository.
    #[serde(default)]
    repo: Option<String>,
    /// How many runs (the API only).
    #[serde(default)]
    limit: Option<String>,
}

impl TestQuery {
    fn repo(&self) -> Option<&str> {
        self.repo.as_deref().filter(|r| !r.is_empty())
    }
}

/// `?days=N` on the flaky page and its JSON.
#[derive(Debug, Default, Deserialize)]
pub struct FlakyQuery {
    #[serde(default)]
    days: Option<String>,
}

/// The window `days` asks for, or why it is no window.
fn days(given: Option<&str>) -> Result<u32, String> {
    match given.filter(|d| !d.is_empty()) {
        None => Ok(DEFAULT_DAYS),
        Some(d) => match d.parse::<u32>() {
            Ok(n) if (1..=MAX_DAYS).contains(&n) => Ok(n),
            _ => Err(format!("days must be a whole number from 1 to {MAX_DAYS}, not {}", json!(d))),
        },
    }
}

/// A test's history as the page and the JSON show it.
#[derive(Debug, Serialize)]
pub struct TestHistory {
    /// The test's id.
    pub test: String,
    /// The repository asked for, if any.
    pub repo: Option<String>,
    /// Its runs, newest first.
    pub runs: Vec<TestRun>,
    /// Whether it is flaky in the default window, and where.
    pub flaky: Option<FlakyTest>,
}

fn test_history(board: &Board, id: &str, repo: Option<&str>, limit: usize) -> TestHistory {
    let runs = h::history(board.newest_first(), repo, id, limit);
    let window = u64::from(DEFAULT_DAYS) * DAY_MS;
    let flaky = h::flaky_test(board.newest_first(), repo, id, now_ms(), window);
    TestHistory { test: id.to_owned(), repo: repo.map(str::to_owned), runs, flaky }
}

fn test_markup(app: &App, id: &str, q: &TestQuery) -> maud::Markup {
    let t = test_history(&app.board(), id, q.repo(), PAGE_RUNS);
    pages::test_history(&t.test, q.repo(), &t.runs, t.flaky.as_ref(), DEFAULT_DAYS)
}

/// The fragment URL a test page refreshes from.
fn test_fragment(id: &str, repo: Option<&str>) -> String {
    format!("/fragments{}", pages::test_href(id, repo))
}

/// `GET /tests/{id}`.
pub async fn test_page(State(app): State<Arc<App>>, Path(id): Path<String>, Query(q): Query<TestQuery>) -> Response {
    let seq = app.event_id(app.board().ring.last());
    let body = test_markup(&app, &id, &q);
    let title = format!("Test {}", crate::text::display(&id));
    html(pages::page(&title, "", &test_fragment(&id, q.repo()), &seq, body))
}

/// `GET /fragments/tests/{id}`.
pub async fn test_fragment_page(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<TestQuery>,
) -> Response {
    html(test_markup(&app, &id, &q))
}

/// `GET /api/v1/tests/{id}/history`: the route takes the rest of the path,
/// so the id is what comes before the last `/history`.
pub async fn test_api(State(app): State<Arc<App>>, Path(rest): Path<String>, Query(q): Query<TestQuery>) -> Response {
    let Some(id) = rest.strip_suffix("/history").filter(|id| !id.is_empty()) else {
        return api::error(StatusCode::NOT_FOUND, "no such endpoint: a test's history is /api/v1/tests/ID/history");
    };
    let limit = match q.limit.as_deref().filter(|l| !l.is_empty()) {
        None => PAGE_RUNS,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=MAX_RUNS).contains(&n) => n,
            _ => {
                let msg = format!("limit must be a whole number from 1 to {MAX_RUNS}, not {}", json!(l));
                return api::error(StatusCode::BAD_REQUEST, &msg);
            }
        },
    };
    let t = test_history(&app.board(), id, q.repo(), limit);
    api::json_ok(&t)
}

/// The flaky tests as the page and the JSON show them.
#[derive(Debug, Serialize)]
pub struct Flaky {
    /// The window, in days.
    pub days: u32,
    /// Its start (Unix ms): commits queued at or after it count.
    pub since_ms: u64,
    /// The tests, most often flaky first.
    pub tests: Vec<FlakyTest>,
}

/// The flaky list of the last `days` days: computed again only when the
/// board changed or the last one is older than [`FLAKY_MAX_AGE`].
fn flaky(board: &Board, days: u32) -> Arc<Flaky> {
    let seq = board.ring.last();
    let mut cache = board.flaky.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = cache.as_ref()
        && c.days == days
        && c.seq == seq
        && c.at.elapsed() < FLAKY_MAX_AGE
    {
        return Arc::clone(&c.flaky);
    }
    let now = now_ms();
    let window = u64::from(days) * DAY_MS;
    let tests = h::flaky_tests(board.newest_first(), now, window);
    let flaky = Arc::new(Flaky { days, since_ms: now.saturating_sub(window), tests });
    *cache = Some(Cached { days, seq, at: Instant::now(), flaky: Arc::clone(&flaky) });
    flaky
}

fn flaky_markup(app: &App, q: &FlakyQuery) -> Result<maud::Markup, String> {
    let days = days(q.days.as_deref())?;
    Ok(pages::flaky(&flaky(&app.board(), days).tests, days))
}

/// `GET /flaky`.
pub async fn flaky_page(State(app): State<Arc<App>>, Query(q): Query<FlakyQuery>) -> Response {
    let seq = app.event_id(app.board().ring.last());
    let (status, body) = match flaky_markup(&app, &q) {
        Ok(body) => (StatusCode::OK, body),
        Err(why) => (StatusCode::BAD_REQUEST, pages::unavailable(&why)),
    };
    let live = match q.days.as_deref().filter(|d| !d.is_empty()) {
        Some(d) => format!("/fragments/flaky?days={}", pages::percent(d)),
        None => "/fragments/flaky".to_owned(),
    };
    (status, html(pages::page("Flaky tests", "Flaky", &live, &seq, body))).into_response()
}

/// `GET /fragments/flaky`.
pub async fn flaky_fragment(State(app): State<Arc<App>>, Query(q): Query<FlakyQuery>) -> Response {
    match flaky_markup(&app, &q) {
        Ok(body) => html(body),
        Err(why) => (StatusCode::BAD_REQUEST, html(pages::unavailable(&why))).into_response(),
    }
}

/// `GET /api/v1/flaky?days=N`.
pub async fn flaky_api(State(app): State<Arc<App>>, Query(q): Query<FlakyQuery>) -> Response {
    match days(q.days.as_deref()) {
        Ok(days) => api::json_ok(&*flaky(&app.board(), days)),
        Err(why) => api::error(StatusCode::BAD_REQUEST, &why),
    }
}

#[cfg(test)]
mod tests {
    use super::days;

    #[test]
    fn days_are_bounded_and_say_why_not() {
        assert_eq!(days(None), Ok(14));
        assert_eq!(days(Some("")), Ok(14));
        assert_eq!(days(Some("30")), Ok(30));
        assert_eq!(days(Some("0")), Err("days must be a whole number from 1 to 3650, not \"0\"".to_owned()));
        assert!(days(Some("3651")).is_err());
        assert!(days(Some("<b>")).unwrap_err().contains("\"<b>\""));
    }
}
