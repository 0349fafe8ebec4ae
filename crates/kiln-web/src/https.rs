//! Serving the dashboard over HTTPS, and who is asking.
//!
//! kiln-net completes each TLS handshake (the dispatcher's certificate, a
//! Kiln client certificate required, the QUIC side's rules); this module runs
//! the handshakes off the accept loop, at most [`MAX_HANDSHAKES`] at once, so
//! a client that stalls its handshake delays nobody else, and hands
//! [`crate::conn`] only connections whose handshake completed. A failed
//! handshake is logged by kiln-net's limiter's verdict: at most one line per
//! address per minute.
//!
//! Every request carries a [`Caller`] (axum's connection info, set by
//! [`crate::conn`]): its address and, over HTTPS, the role and name in its
//! certificate. Plain HTTP has no identity, so nothing that needs one can be
//! done over it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_net::{HttpsAcceptor, HttpsStream, PeerIdentity};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

/// At most this many TLS handshakes run at once (counting those done but
/// not yet taken by the server); further connections wait in the kernel's
/// backlog until one ends (each ends within kiln-net's handshake timeout) or
/// is taken.
pub const MAX_HANDSHAKES: usize = 64;

/// Who sent a request.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The client's address.
    pub remote: SocketAddr,
    /// Over HTTPS, the identity in the client's certificate; over plain HTTP, none.
    pub identity: Option<PeerIdentity>,
}

impl Caller {
    /// The scheme the request came by: `https` exactly when the caller has a certificate.
    pub fn scheme(&self) -> &'static str {
        if self.identity.is_some() { "https" } else { "http" }
    }
}

/// TLS connections whose handshake completed, for axum to serve.
pub struct HttpsListener {
    ready: mpsc::Receiver<(HttpsStream, SocketAddr)>,
    local: SocketAddr,
}

impl HttpsListener {
    /// Accepts TCP connections on `tcp` and completes their handshakes on
    /// tasks owned by `tasks`, until `shutdown`.
    pub fn start(
        tcp: TcpListener,
        acceptor: HttpsAcceptor,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> std::io::Result<HttpsListener> {
        let local = tcp.local_addr()?;
        let (done, ready) = mpsc::channel(MAX_HANDSHAKES);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let handshakes = tasks.clone();
        tasks.spawn(async move {
            loop {
                let permit = tokio::select! {
                    () = shutdown.cancelled() => break,
                    permit = Arc::clone(&permits).acquire_owned() => permit,
                };
                let Ok(permit) = permit else { break };
                let accepted = tokio::select! {
                    () = shutdown.cancelled() => break,
                    accepted = tcp.accept() => accepted,
                };
                let (stream, remote) = match accepted {
                    Ok(accepted) => accepted,
                    // The kernel's trouble (out of file descriptors, say), not a
                    // peer's: say so and breathe, as axum's own loop does.
                    Err(e) => {
                        warn!("the dashboard cannot accept a connection: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let (acceptor, done, stop) = (acceptor.clone(), done.clone(), shutdown.clone());
                handshakes.spawn(async move {
                    let result = tokio::select! {
                        () = stop.cancelled() => return,
                        result = acceptor.handshake(stream, remote) => result,
                    };
                    match result {
                        // Taken when the server has room for a connection;
                        // the permit is held until then, so that a server at
                        // its cap stops new handshakes instead of piling up
                        // finished ones. A closed channel means shutdown.
                        Ok(stream) => {
                            let _ = done.send((stream, remote)).await;
                            drop(permit);
                        }
                        Err(failed) => {
                            // The line is escaped already (it holds the peer's words).
                            if let Some(line) = failed.log_line() {
                                warn!(%remote, "dashboard TLS handshake failed: {line}");
                            }
                        }
                    }
                });
            }
        });
        Ok(HttpsListener { ready, local })
    }

    /// Who is on one of these connections: the identity in its certificate.
    pub fn caller(stream: &HttpsStream, remote: &SocketAddr) -> Caller {
        Caller { remote: *remote, identity: Some(stream.identity().clone()) }
    }
}

impl axum::serve::Listener for HttpsListener {
    type Io = HttpsStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (HttpsStream, SocketAddr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // Shutting down: axum's graceful shutdown stops asking.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
