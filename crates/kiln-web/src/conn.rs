//! Serving accepted connections with hyper directly, so that every request's
//! head has a deadline.
//!
//! `axum::serve` gives hyper no timer, which turns hyper's header-read
//! timeout off: a client that opens a connection and sends its request a
//! byte at a time (slowloris) holds the connection, a task and a file
//! descriptor for as long as it likes, over HTTP and, after its handshake,
//! over HTTPS. Here each connection has [`HEAD_TIMEOUT`] (or what
//! [`crate::Bound::limits`] says) to send each request's line and
//! headers, and an idle keep-alive connection is closed when the next head
//! does not arrive in time either. Bodies and responses are not limited: an
//! SSE stream may rightly last all day. At most [`MAX_CONNECTIONS`] are
//! served at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tracing::debug;

use crate::https::Caller;

/// How long a client has to send a request's line and headers.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many connections are served at once; further ones wait in
/// the kernel's backlog until one closes. Without a cap, clients could
/// take every file descriptor the dispatcher has, and with them its
/// database, its mirror and its runners' connections.
pub const MAX_CONNECTIONS: usize = 1024;

/// What a client may hold of the dashboard.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a client has to send each request's head.
    pub head_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { head_timeout: HEAD_TIMEOUT, max_connections: MAX_CONNECTIONS }
    }
}

/// How long open connections get to finish at shutdown (SSE streams end on
/// the shutdown token themselves).
const DRAIN: Duration = Duration::from_secs(5);

/// Serves `router` on the connections `listener` accepts, each request
/// carrying the [`Caller`] that `caller` makes of its connection, within
/// `limits`, until `stop`; then waits up to [`DRAIN`] for open connections.
pub async fn serve<L>(
    mut listener: L,
    router: Router,
    caller: impl Fn(&L::Io, &L::Addr) -> Caller,
    limits: Limits,
    stop: impl Future<Output = ()>,
) where
    L: axum::serve::Listener,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.head_timeout);
    let open = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut stop = std::pin::pin!(stop);
    loop {
        // A free place first, then a connection: at the cap, clients wait
        // in the backlog (over HTTPS, after at most MAX_HANDSHAKES more
        // handshakes, whose permits are held until taken here).
        let slot = tokio::select! {
            () = &mut stop => break,
            slot = Arc::clone(&slots).acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        // The listener deals with accept errors itself (it logs and waits).
        let (io, addr) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let caller = caller(&io, &addr);
        let service = router.clone().map_request(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(caller.clone()));
            request
        });
        let connection = open.watch(http.serve_connection(TokioIo::new(io), TowerToHyperService::new(service)));
        tokio::spawn(async move {
            // A client that went away or sent no head in time: its own business.
            if let Err(e) = connection.await {
                debug!("dashboard connection ended: {e}");
            }
            drop(slot);
        });
    }
    if tokio::time::timeout(DRAIN, open.shutdown()).await.is_err() {
        debug!("dashboard connections still open after {DRAIN:?}; dropped");
    }
}
