//! `GET /metrics`: the Prometheus text format (version 0.0.4), written by
//! hand: a few gauges, counters and histograms need no client library.
//!
//! Gauges of stored state (commits by status, results by outcome) count
//! everything the dispatcher holds; histograms count what this process saw
//! since it started, as Prometheus counters do.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use kiln_dispatcher::view::Histogram;
use kiln_proto::{CommitStatus, Outcome};

use crate::App;

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    let (buckets, count, sum) = h.read();
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (bound, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// Renders every metric.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut out = String::new();
    match app.live().await {
        Ok(live) => {
            gauge(&mut out, "kiln_queue_depth", "Commits with test files waiting for a runner.", live.queue.len());
            let files: usize = live.queue.iter().map(|q| q.pending_files).sum();
            gauge(&mut out, "kiln_queued_files", "Test files waiting for a runner.", files);
            gauge(&mut out, "kiln_runners_connected", "Registered runner connections.", live.runners.len());
            let _ = writeln!(out, "# HELP kiln_slots Runner slots, busy or free.\n# TYPE kiln_slots gauge");
            let _ = writeln!(out, "kiln_slots{{state=\"busy\"}} {}", live.busy_slots());
            let _ =
                writeln!(out, "kiln_slots{{state=\"free\"}} {}", live.total_slots().saturating_sub(live.busy_slots()));
            gauge(&mut out, "kiln_live_up", "Whether the dispatcher answered this scrape's live request.", 1);
        }
        // The stored side is still worth a scrape.
        Err(_) => gauge(&mut out, "kiln_live_up", "Whether the dispatcher answered this scrape's live request.", 0),
    }
    {
        let board = app.board.read().unwrap_or_else(|e| e.into_inner());
        let by_status = board.by_status();
        let _ = writeln!(out, "# HELP kiln_commits Stored commits by status.\n# TYPE kiln_commits gauge");
        for s in [
            CommitStatus::Queued,
            CommitStatus::Running,
            CommitStatus::Passed,
            CommitStatus::Failed,
            CommitStatus::Error,
            CommitStatus::Cancelled,
            CommitStatus::Skipped,
        ] {
            let _ =
                writeln!(out, "kiln_commits{{status=\"{}\"}} {}", s.as_str(), by_status.get(s.as_str()).unwrap_or(&0));
        }
        let by_outcome = board.by_outcome();
        let _ =
            writeln!(out, "# HELP kiln_test_results Stored test results by outcome.\n# TYPE kiln_test_results gauge");
        for o in Outcome::ALL {
            let _ = writeln!(
                out,
                "kiln_test_results{{outcome=\"{}\"}} {}",
                o.as_str(),
                by_outcome.get(o.as_str()).unwrap_or(&0)
            );
        }
        let o = &board.observed;
        histogram(
            &mut out,
            "kiln_test_duration_seconds",
            "Each test's duration as its runner measured it.",
            &o.test_duration,
        );
        histogram(
            &mut out,
            "kiln_commit_duration_seconds",
            "From queued to a final status, per commit.",
            &o.commit_duration,
        );
        histogram(
            &mut out,
            "kiln_queue_wait_seconds",
            "From queued to its first batch handed to a runner, per commit.",
            &o.queue_wait,
        );
        gauge(
            &mut out,
            "kiln_events_ring_bytes",
            "Bytes of recent events kept for SSE clients to resume.",
            board.ring.bytes(),
        );
        gauge(
            &mut out,
            "kiln_events_last_seq",
            "The last update of the dispatcher's stream the dashboard applied.",
            board.ring.last(),
        );
        gauge(&mut out, "kiln_events_ring_events", "Recent events kept for SSE clients to resume.", board.ring.len());
    }
    let core = app.api.metrics();
    histogram(
        &mut out,
        "kiln_store_write_seconds",
        "How long each event's storage transaction took.",
        &core.store_write,
    );
    let _ = writeln!(
        out,
        "# HELP kiln_store_write_failures_total Storage transactions that failed.\n# TYPE kiln_store_write_failures_total counter\nkiln_store_write_failures_total {}",
        core.store_failures.load(Ordering::Relaxed)
    );
    gauge(&mut out, "kiln_sse_clients", "Clients following /api/v1/events.", app.sse_clients.load(Ordering::Relaxed));
    let _ = writeln!(
        out,
        "# HELP kiln_sse_reloads_total SSE clients told to reload.\n# TYPE kiln_sse_reloads_total counter\nkiln_sse_reloads_total {}",
        app.sse_reloads.load(Ordering::Relaxed)
    );
    let mut res = out.into_response();
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    res
}
