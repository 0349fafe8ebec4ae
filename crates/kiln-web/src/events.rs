//! `GET /api/v1/events`: the stream of changes as Server-Sent Events.
//!
//! - Each update the dispatcher stored is one `change` event whose `id:` is
//!   `BOOT-SEQ` (`SEQ`: the stream's sequence number; `BOOT`: when this
//!   server started, so a client resuming against a restarted dispatcher,
//!   which numbers from 1 again, is told to reload rather than miss events).
//! - A client resumes with the `Last-Event-ID` header (browsers send it when
//!   they reconnect) or `?after=ID`; without either it starts at the present.
//!   It gets every event after that one, once, in order.
//! - A client asking for events no longer kept (the ring holds the last
//!   [`board::RING_EVENTS`](crate::board::RING_EVENTS) events, at most
//!   [`board::RING_BYTES`](crate::board::RING_BYTES)), or that falls that
//!   far behind, gets one `reload` event and is closed: what it shows must
//!   be fetched again.
//! - Data is one line of JSON, so no text in it can end an event or forge
//!   one. A `live` event (no id, `{}`) says runners or the queue changed.
//!   A `: keep-alive` comment goes out every 15 s.
//!
//! **Bounded memory.** A client holds only a cursor into the shared ring and
//! at most [`BATCH`] events taken from it; a client that reads slowly
//! stops being polled (the socket pushes back), so nothing queues for it.
//! At most [`MAX_CLIENTS`] follow at once.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use kiln_dispatcher::view::Live;
use serde::Deserialize;

use crate::App;
use crate::board::{self, Gone};

/// Events taken from the ring at a time, per client.
pub const BATCH: usize = 64;
/// SSE clients at most.
pub const MAX_CLIENTS: usize = 256;

/// `?after=ID`.
#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    after: Option<String>,
}

/// What a client has seen, and what it waits for.
struct Cursor {
    app: Arc<App>,
    /// The last seq it was sent; `None`: it must be told to reload.
    after: Option<u64>,
    pending: VecDeque<board::Event>,
    seq: tokio::sync::watch::Receiver<u64>,
    live: tokio::sync::watch::Receiver<u64>,
    /// The first message (a comment) is out.
    greeted: bool,
    /// Closed after the `reload` event.
    done: bool,
}

impl Drop for Cursor {
    fn drop(&mut self) {
        self.app.sse_clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Parses `BOOT-SEQ`: the seq if BOOT is this server's.
fn parse_id(app: &App, id: &str) -> Option<u64> {
    let (boot, seq) = id.trim().split_once('-')?;
    (boot.parse::<u64>().ok()? == app.boot).then_some(())?;
    seq.parse().ok()
}

/// The SSE endpoint.
pub async fn events(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<EventsQuery>) -> Response {
    let asked = headers.get("last-event-id").and_then(|v| v.to_str().ok()).map(str::to_owned).or(q.after);
    if app.sse_clients.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
        app.sse_clients.fetch_sub(1, Ordering::Relaxed);
        return (StatusCode::SERVICE_UNAVAILABLE, "too many event streams are open; try again later").into_response();
    }
    let after = match asked {
        // An id from another server run (or garbage) cannot be resumed.
        Some(id) => parse_id(&app, &id),
        None => Some(app.board.read().unwrap_or_else(|e| e.into_inner()).ring.last()),
    };
    let mut live = app.live_version.subscribe();
    live.mark_unchanged();
    let cursor =
        Cursor { seq: app.seq.clone(), live, app, after, pending: VecDeque::new(), greeted: false, done: false };
    let body = stream::unfold(cursor, |mut c| async move {
        let event = next(&mut c).await?;
        Some((Ok::<_, Infallible>(event), c))
    });
    let mut res = Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive"))
        .into_response();
    // Proxies that buffer would hold events back (nginx reads this).
    res.headers_mut().insert("x-accel-buffering", axum::http::HeaderValue::from_static("no"));
    res
}

/// The next thing to send to one client; `None` ends its stream.
async fn next(c: &mut Cursor) -> Option<Event> {
    if c.done {
        return None;
    }
    if !c.greeted {
        c.greeted = true;
        return Some(Event::default().comment("ping"));
    }
    loop {
        if let Some(e) = c.pending.pop_front() {
            c.after = Some(e.seq);
            return Some(Event::default().event("change").id(c.app.event_id(e.seq)).data(&*e.data));
        }
        let taken = match c.after {
            Some(after) => c.app.board.read().unwrap_or_else(|e| e.into_inner()).ring.after(after, BATCH),
            None => Err(Gone),
        };
        match taken {
            Ok(events) if !events.is_empty() => {
                c.pending = events.into();
                continue;
            }
            Ok(_) => {}
            Err(Gone) => {
                c.done = true;
                c.app.sse_reloads.fetch_add(1, Ordering::Relaxed);
                return Some(Event::default().event("reload").data("{}"));
            }
        }
        // Up to date: wait for a new event, a live change, or shutdown.
        tokio::select! {
            () = c.app.shutdown.cancelled() => return None,
            changed = c.seq.changed() => if changed.is_err() { return None },
            changed = c.live.changed() => {
                if changed.is_err() {
                    return None;
                }
                return Some(Event::default().event("live").data("{}"));
            }
        }
    }
}

/// What of the live view a page shows, without the times that change on
/// every event: when this changes, pages showing runners or the queue refresh.
pub fn live_shape(live: &Live) -> String {
    let mut out = String::new();
    for r in &live.runners {
        out.push_str(&format!("r {} {} {} {:?} {};", r.name, r.address, r.slots, r.running, r.connected_since_ms));
    }
    for q in &live.queue {
        out.push_str(&format!("q {} {} {} {} {};", q.commit, q.pending_files, q.running_files, q.done_files, q.reason));
    }
    out
}
