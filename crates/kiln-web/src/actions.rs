//! Actions over HTTP (today one: cancel a commit), and the rules that keep
//! a browser from being made to take them.
//!
//! **Who.** An action needs a caller with a certificate, so HTTPS; the role
//! it needs is the dispatcher's to decide ([`kiln_dispatcher::control`], the
//! table QUIC requests are checked against too), and the action runs by the
//! path `kiln cancel` takes.
//!
//! **Cross-site requests.** A browser that holds an admin's certificate
//! presents it to any page's request, the attacker's included, so a
//! certificate alone does not show that the admin meant it. A POST is
//! refused unless (1) its `Origin` header, when there is one, is this
//! dashboard's own (`SCHEME://HOST` of the request), and (2) it says
//! `Content-Type: application/json` or carries an `X-Kiln-Request` header.
//! A cross-site page can send neither without a CORS preflight, which this
//! server never grants; a plain HTML form can send neither at all.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use kiln_dispatcher::control::{Action, CancelError, authorize};
use serde_json::json;

use crate::App;
use crate::api::{error, json_body};
use crate::https::Caller;

/// The header a script or a command-line client sends to show it is not a form.
pub const REQUEST_HEADER: &str = "x-kiln-request";

/// How long a cancel's answer waits for the dashboard to show the change.
const SHOW_WITHIN: Duration = Duration::from_secs(5);

/// What an action over plain HTTP is told.
pub const NEEDS_HTTPS: &str = "cancelling a commit needs HTTPS with an admin certificate: start the dispatcher \
                               with --https and present a certificate made by `kiln certs issue admin NAME`";

/// Refuses what a cross-site page could have sent; see the module's notes.
pub fn same_site(caller: &Caller, headers: &HeaderMap) -> Result<(), String> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let ours = host.map(|h| format!("{}://{h}", caller.scheme()));
        let theirs = origin.to_str().ok();
        if !matches!((theirs, &ours), (Some(o), Some(ours)) if o.eq_ignore_ascii_case(ours)) {
            let shown: String = String::from_utf8_lossy(origin.as_bytes()).chars().take(200).collect();
            return Err(format!(
                "refusing a cross-site request: its Origin {} is not this dashboard's ({})",
                json!(shown),
                ours.as_deref().unwrap_or("unknown: the request names no Host")
            ));
        }
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
    if json || headers.contains_key(REQUEST_HEADER) {
        Ok(())
    } else {
        Err("refusing an action without `Content-Type: application/json` or an `X-Kiln-Request` header: a \
             cross-site form could have sent it"
            .to_owned())
    }
}

/// `POST /api/v1/commits/{commit}/cancel`: `{"commit", "cancelled", "status"}`.
pub async fn cancel(
    State(app): State<Arc<App>>,
    ConnectInfo(caller): ConnectInfo<Caller>,
    Path(commit): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(why) = same_site(&caller, &headers) {
        return error(StatusCode::FORBIDDEN, &why);
    }
    let Some(identity) = &caller.identity else {
        return error(StatusCode::FORBIDDEN, NEEDS_HTTPS);
    };
    // The role first, so that a caller who may not cancel learns nothing more.
    if let Err(why) = authorize(identity, Action::Cancel) {
        return error(StatusCode::FORBIDDEN, &why);
    }
    let Some(commit_id) = app.board().resolve(&commit) else {
        let shown: String = commit.chars().take(80).collect();
        return error(
            StatusCode::NOT_FOUND,
            &format!("no commit {} is known (or the prefix is ambiguous)", json!(shown)),
        );
    };
    let Some(actions) = &app.actions else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "this dashboard cannot act on the dispatcher");
    };
    match actions.cancel(commit_id, identity).await {
        Err(CancelError::NotAllowed(why)) => error(StatusCode::FORBIDDEN, &why),
        Err(CancelError::Failed(why)) => error(StatusCode::SERVICE_UNAVAILABLE, &why),
        Ok(done) => {
            // Answer once this dashboard shows the change, so that the next
            // read (a page, the API) says `cancelled`.
            let mut seq = app.seq.clone();
            let _ = tokio::time::timeout(SHOW_WITHIN, seq.wait_for(|s| *s >= done.seq)).await;
            let status = app.board().doc(&commit_id).map(|d| d.row.status);
            let body = json!({ "commit": commit_id.as_str(), "cancelled": done.stopped, "status": status });
            json_body(StatusCode::OK, body.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use kiln_net::PeerIdentity;
    use kiln_proto::Role;

    use super::*;

    fn caller(https: bool) -> Caller {
        let identity = https.then(|| PeerIdentity { role: Role::Admin, name: "boss".into() });
        Caller { remote: "127.0.0.1:5000".parse().unwrap(), identity }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_same_origin_requests_that_no_form_could_send_pass() {
        let https = caller(true);
        let host = ("host", "ci.example:7780");
        // A command-line client: no Origin, a custom header or JSON.
        assert_eq!(same_site(&https, &headers(&[host, ("x-kiln-request", "1")])), Ok(()));
        assert_eq!(same_site(&https, &headers(&[host, ("content-type", "application/json; charset=utf-8")])), Ok(()));
        // This dashboard's own script.
        let own = [host, ("origin", "https://ci.example:7780"), ("x-kiln-request", "1")];
        assert_eq!(same_site(&https, &headers(&own)), Ok(()));
        // Another site, even with the header; `null`; the right host by the wrong scheme.
        for origin in ["https://evil.example", "null", "http://ci.example:7780", "https://ci.example:7781"] {
            let h = headers(&[host, ("origin", origin), ("x-kiln-request", "1")]);
            let err = same_site(&https, &h).unwrap_err();
            assert!(err.starts_with("refusing a cross-site request: its Origin "), "{err}");
        }
        // What a form can send: none of the form types, nor no type at all.
        for ty in ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain"] {
            let err = same_site(&https, &headers(&[host, ("content-type", ty)])).unwrap_err();
            assert!(err.starts_with("refusing an action without `Content-Type: application/json`"), "{err}");
        }
        assert!(same_site(&https, &headers(&[host])).is_err());
        // Over plain HTTP the origin is http://.
        let own_http = [host, ("origin", "http://ci.example:7780"), ("x-kiln-request", "1")];
        assert_eq!(same_site(&caller(false), &headers(&own_http)), Ok(()));
    }
}
