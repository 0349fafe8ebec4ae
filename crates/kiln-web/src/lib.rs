//! The Kiln dashboard: HTML pages, a JSON API under `/api/v1/`, a
//! Server-Sent Events stream of changes and Prometheus metrics, served over
//! HTTP by the dispatcher process. The only crate that names axum, maud and
//! hyper's server.
//!
//! **Key decision: the scheduling core never waits on a page.** The
//! dashboard keeps its own [`board::Board`], rebuilt from the dispatcher's
//! stream of deltas by one follower task; pages, the API and SSE clients
//! read that. What is not in the stream (connected runners, why the queue
//! waits) is asked for through [`kiln_dispatcher::view::ReadApi::live`], a
//! bounded, non-blocking request, at most every [`LIVE_TTL`] whatever the
//! number of readers (answers are shared).
//!
//! Layout: [`board`] (the rebuilt state and the event ring), [`pages`]
//! (maud templates), [`api`] (JSON), [`history`] (a test's history and the
//! flaky tests, page and JSON), [`events`] (SSE), [`metrics`]
//! (Prometheus text), [`text`] (what test output loses before display),
//! [`https`] (TLS connections and who is calling), [`conn`] (serving them,
//! with a deadline for each request's head), [`actions`] (cancel, and the
//! cross-site rules).
//!
//! **Safe to look at.** Every value is escaped by maud; test output also
//! loses its terminal escape sequences ([`text::display`]). Every response
//! carries a Content-Security-Policy that allows scripts, styles and
//! connections only from this origin and no inline script, so markup that
//! slipped through would still not run. The one script is a static file.
//! A non-loopback address is served only over HTTPS with a Kiln client
//! certificate ([`bind`]); any certificate may read, and an action needs
//! the role the dispatcher says (admin to cancel), over HTTPS only.

pub mod actions;
pub mod api;
pub mod board;
pub mod conn;
pub mod events;
pub mod history;
pub mod https;
pub mod metrics;
pub mod pages;
pub mod text;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use kiln_dispatcher::control::Actions;
use kiln_dispatcher::stream::Next;
use kiln_dispatcher::view::{Live, LiveError, ReadApi};
use kiln_net::HttpsAcceptor;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::board::Board;
use crate::https::Caller;
use crate::pages::Filter;

/// How long an answer about runners and the queue is reused.
pub const LIVE_TTL: Duration = Duration::from_millis(500);

/// The policy every response carries: nothing from elsewhere, no inline
/// script or style, no framing, no plugins, forms only to this origin.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Why the dashboard cannot listen.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Not a loopback address, and no HTTPS.
    #[error(
        "refusing to serve the dashboard on {0}: a non-loopback address needs HTTPS with a client certificate, \
         so add --https (clients then present a certificate from `kiln certs issue`) or use a loopback address \
         such as 127.0.0.1:7780"
    )]
    NotLoopback(SocketAddr),
    /// The socket could not be bound.
    #[error("cannot listen on {addr}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A bound dashboard listener, before it serves.
pub struct Bound {
    listener: TcpListener,
    /// HTTPS with a Kiln client certificate required; plain HTTP (loopback
    /// only, callers without identity) when `None`.
    https: Option<HttpsAcceptor>,
    limits: conn::Limits,
}

impl Bound {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The dashboard's URL, e.g. `https://127.0.0.1:7780/`.
    pub fn url(&self) -> std::io::Result<String> {
        let scheme = if self.https.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{}/", self.local_addr()?))
    }

    /// How long a client has to send each request's head, and how many
    /// connections are served at once ([`conn::Limits::default`] unless told).
    pub fn limits(self, limits: conn::Limits) -> Bound {
        Bound { limits, ..self }
    }
}

/// Binds the dashboard's listener: over HTTPS when `https` is given (any
/// address), plain HTTP on loopback addresses only.
pub async fn bind(addr: SocketAddr, https: Option<HttpsAcceptor>) -> Result<Bound, BindError> {
    if !addr.ip().is_loopback() && https.is_none() {
        return Err(BindError::NotLoopback(addr));
    }
    let listener = TcpListener::bind(addr).await.map_err(|source| BindError::Io { addr, source })?;
    Ok(Bound { listener, https, limits: conn::Limits::default() })
}

/// What every request handler shares.
pub struct App {
    /// The rebuilt state.
    pub board: RwLock<Board>,
    /// The dispatcher's read side.
    pub api: ReadApi,
    /// What callers may ask the dispatcher to do (cancel); `None` in tests
    /// that feed the dashboard without a dispatcher.
    pub actions: Option<Actions>,
    /// This server's start (Unix ms): event ids carry it, so a client
    /// resuming against a restarted dispatcher (which numbers from 1 again)
    /// is told to reload instead of silently missing events.
    pub boot: u64,
    /// The last seq in the ring, for SSE clients to wait on.
    pub seq: watch::Receiver<u64>,
    /// Bumped when the runners or the queue changed.
    pub live_version: watch::Sender<u64>,
    live_cache: tokio::sync::Mutex<Option<(Instant, Arc<Live>)>>,
    /// SSE clients connected now.
    pub sse_clients: AtomicUsize,
    /// SSE clients told to reload.
    pub sse_reloads: AtomicU64,
    /// Stops SSE streams (and the server) at shutdown.
    pub shutdown: CancellationToken,
}

impl App {
    /// The runners and the queue, at most [`LIVE_TTL`] old.
    pub async fn live(&self) -> Result<Arc<Live>, LiveError> {
        // Held across the request: concurrent readers share one answer.
        let mut cache = self.live_cache.lock().await;
        if let Some((at, live)) = cache.as_ref()
            && at.elapsed() < LIVE_TTL
        {
            return Ok(Arc::clone(live));
        }
        let live = Arc::new(self.api.live().await?);
        *cache = Some((Instant::now(), Arc::clone(&live)));
        Ok(live)
    }

    /// The id of the event with this seq.
    pub fn event_id(&self, seq: u64) -> String {
        format!("{}-{seq}", self.boot)
    }

    fn board(&self) -> std::sync::RwLockReadGuard<'_, Board> {
        self.board.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// Unix time in ms.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Serves the dashboard on `listener` from `api`, acting through `actions`,
/// until `shutdown`.
pub async fn serve(
    listener: Bound,
    api: ReadApi,
    actions: Option<Actions>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (snapshot, mut feed) = match api.subscribe("dashboard").await {
        Ok(subscribed) => subscribed,
        // The dispatcher stopped before the dashboard started: nothing to show.
        Err(e) => {
            warn!("the dashboard cannot start: {e}");
            return Ok(());
        }
    };
    let (seq_tx, seq) = watch::channel(snapshot.seq);
    let app = Arc::new(App {
        board: RwLock::new(Board::of(&snapshot)),
        api,
        actions,
        boot: now_ms(),
        seq,
        live_version: watch::Sender::new(0),
        live_cache: tokio::sync::Mutex::new(None),
        sse_clients: AtomicUsize::new(0),
        sse_reloads: AtomicU64::new(0),
        shutdown: shutdown.clone(),
    });
    drop(snapshot);

    // The follower: the only writer of the board.
    let writer = Arc::clone(&app);
    let stop = shutdown.clone();
    let follower = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => break,
                next = feed.next() => next,
            };
            let seq = {
                let mut board = writer.board.write().unwrap_or_else(|e| e.into_inner());
                match next {
                    Next::Update(update) => board.apply(&update, now_ms()),
                    Next::Resync(snapshot) => board.resync(&snapshot),
                    Next::Closed => break,
                }
                board.ring.last()
            };
            seq_tx.send_replace(seq);
        }
    });
    // The live poller: while anyone follows events, say when runners or the
    // queue changed (they are not in the stream of deltas).
    let poller_app = Arc::clone(&app);
    let stop = shutdown.clone();
    let poller = tokio::spawn(async move {
        let mut last = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            if poller_app.sse_clients.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                continue;
            }
            if let Ok(live) = poller_app.live().await {
                let shape = events::live_shape(&live);
                if last.as_ref().is_some_and(|l| *l != shape) {
                    poller_app.live_version.send_modify(|v| *v += 1);
                }
                last = Some(shape);
            }
        }
    });

    let addr = listener.local_addr()?;
    let router = router(Arc::clone(&app));
    let stop = shutdown.clone().cancelled_owned();
    let handshakes = TaskTracker::new();
    let Bound { listener, https, limits } = listener;
    let served = match https {
        None => {
            info!(%addr, "dashboard serving over HTTP");
            let caller = |_: &_, remote: &SocketAddr| Caller { remote: *remote, identity: None };
            conn::serve(listener, router, caller, limits, stop).await;
            Ok(())
        }
        Some(acceptor) => {
            info!(%addr, "dashboard serving over HTTPS, a Kiln client certificate required");
            match https::HttpsListener::start(listener, acceptor, &handshakes, shutdown.clone()) {
                Ok(listener) => {
                    conn::serve(listener, router, https::HttpsListener::caller, limits, stop).await;
                    Ok(())
                }
                // Not returned at once: the follower and the poller stop first.
                Err(e) => Err(e),
            }
        }
    };
    follower.abort();
    poller.abort();
    handshakes.close();
    handshakes.wait().await;
    served
}

/// Every route.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/fragments/commits", get(index_fragment))
        .route("/commits/{commit}", get(commit_page))
        .route("/fragments/commits/{commit}", get(commit_fragment))
        .route("/tests/{*id}", get(history::test_page))
        .route("/fragments/tests/{*id}", get(history::test_fragment_page))
        .route("/flaky", get(history::flaky_page))
        .route("/fragments/flaky", get(history::flaky_fragment))
        .route("/runners", get(runners_page))
        .route("/fragments/runners", get(runners_fragment))
        .route("/queue", get(queue_page))
        .route("/fragments/queue", get(queue_fragment))
        .route("/assets/live.js", get(script))
        .route("/assets/style.css", get(style))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/commits", get(api::commits))
        .route("/api/v1/commits/{commit}", get(api::commit))
        .route("/api/v1/commits/{commit}/cancel", post(actions::cancel))
        .route("/api/v1/tests/{*rest}", get(history::test_api))
        .route("/api/v1/flaky", get(history::flaky_api))
        .route("/api/v1/runners", get(api::runners))
        .route("/api/v1/queue", get(api::queue))
        .route("/api/v1/events", get(events::events))
        .fallback(not_found)
        .layer(axum::middleware::map_response(secure))
        .with_state(app)
}

/// Adds the security headers to every response.
async fn secure(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

type AppState = State<Arc<App>>;

fn html(markup: maud::Markup) -> Response {
    let mut res = Html(markup.into_string()).into_response();
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

async fn index(State(app): AppState) -> Response {
    let board = app.board();
    let body = pages::commits(&board, now_ms());
    html(pages::page("Commits", "Commits", "/fragments/commits", &app.event_id(board.ring.last()), body))
}

async fn index_fragment(State(app): AppState) -> Response {
    html(pages::commits(&app.board(), now_ms()))
}

async fn commit_page(State(app): AppState, Path(commit): Path<String>, Query(filter): Query<Filter>) -> Response {
    let board = app.board();
    let Some(c) = board.resolve(&commit) else {
        return (StatusCode::NOT_FOUND, html(pages::not_found(&format!("No commit {commit} is known."))))
            .into_response();
    };
    let Some(doc) = board.doc(&c) else { return missing() };
    let body = pages::commit(doc, board.progress(&c), &filter, now_ms());
    let live = format!("/fragments/commits/{c}?{}", filter.query().trim_start_matches('&'));
    html(pages::page(&format!("Commit {}", c.short()), "", &live, &app.event_id(board.ring.last()), body))
}

async fn commit_fragment(State(app): AppState, Path(commit): Path<String>, Query(filter): Query<Filter>) -> Response {
    let board = app.board();
    let Some(doc) = board.resolve(&commit).and_then(|c| board.doc(&c)) else {
        return (StatusCode::NOT_FOUND, html(pages::unavailable("no such commit"))).into_response();
    };
    html(pages::commit(doc, board.progress(&doc.row.commit), &filter, now_ms()))
}

async fn runners_page(State(app): AppState) -> Response {
    let seq = app.event_id(app.board().ring.last());
    let body = match app.live().await {
        Ok(live) => pages::runners(&live),
        Err(e) => pages::unavailable(&e.to_string()),
    };
    html(pages::page("Runners", "Runners", "/fragments/runners", &seq, body))
}

async fn runners_fragment(State(app): AppState) -> Response {
    match app.live().await {
        Ok(live) => html(pages::runners(&live)),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, html(pages::unavailable(&e.to_string()))).into_response(),
    }
}

async fn queue_page(State(app): AppState) -> Response {
    let seq = app.event_id(app.board().ring.last());
    let body = match app.live().await {
        Ok(live) => pages::queue(&live, &app.board()),
        Err(e) => pages::unavailable(&e.to_string()),
    };
    html(pages::page("Queue", "Queue", "/fragments/queue", &seq, body))
}

async fn queue_fragment(State(app): AppState) -> Response {
    match app.live().await {
        Ok(live) => html(pages::queue(&live, &app.board())),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, html(pages::unavailable(&e.to_string()))).into_response(),
    }
}

async fn not_found() -> Response {
    missing()
}

fn missing() -> Response {
    (StatusCode::NOT_FOUND, html(pages::not_found("There is no such page."))).into_response()
}

/// The one script: follows the events and refreshes the live part.
const SCRIPT: &str = include_str!("../assets/live.js");
const STYLE: &str = include_str!("../assets/style.css");

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCRIPT).into_response()
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}
