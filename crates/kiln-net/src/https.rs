//! TLS over TCP for the dashboard's HTTPS, by the QUIC listener's rules.
//!
//! The dashboard's HTTPS side is a second door into the dispatcher, so it is
//! built from the same parts as the first ([`crate::Listener`]): the
//! dispatcher's own bundle, webpki's verifier with the Kiln CA as the only
//! root and a client certificate mandatory (made by one function for both),
//! TLS 1.3 only, ring as the provider, and the peer's role and name read from
//! its certificate ([`crate::certs::identity_of`]). A refusal is worded by the
//! same code ([`HandshakeError`]) and rate-limited by the same
//! [`FailureLog`]: at most one line per source address per interval, whatever
//! a scanner sends. Each handshake has a time limit, so a peer that opens a
//! connection and says nothing holds it for seconds, not forever.
//!
//! What runs over the stream (HTTP) is not this crate's business: it hands
//! back an [`HttpsStream`] (bytes in and out, and who is on the other end),
//! and the dashboard serves it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::server::danger::ClientCertVerifier;
use rustls::sign::SingleCertAndKey;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::certs::{Bundle, PeerIdentity};
use crate::endpoint::{EndpointError, HandshakeError, HandshakeFailed, client_refusal, identity_from, provider};
use crate::failure_log::{FAILURE_LOG_INTERVAL, FailureLog, MAX_TRACKED_ADDRESSES};
use crate::verify::{ClientVerifier, Slot};

/// How long a client may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The one application protocol the dashboard speaks.
const HTTP1: &[u8] = b"http/1.1";

/// Completes TLS handshakes with the dispatcher's certificate, accepting
/// only clients with a Kiln certificate. Cheap to clone.
#[derive(Clone)]
pub struct HttpsAcceptor {
    shared: Arc<Shared>,
}

struct Shared {
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// webpki's client verifier, wrapped per handshake to record refusals.
    verifier: Arc<dyn ClientCertVerifier>,
    cert: Arc<SingleCertAndKey>,
    timeout: Duration,
    failures: Mutex<FailureLog>,
}

impl std::fmt::Debug for HttpsAcceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsAcceptor").field("timeout", &self.shared.timeout).finish_non_exhaustive()
    }
}

impl HttpsAcceptor {
    /// An acceptor with the dispatcher's bundle; handshakes time out after
    /// [`HANDSHAKE_TIMEOUT`].
    pub fn new(bundle: &Bundle) -> Result<HttpsAcceptor, EndpointError> {
        HttpsAcceptor::with_timeout(bundle, HANDSHAKE_TIMEOUT)
    }

    /// Like [`HttpsAcceptor::new`], with handshakes timing out after `timeout`.
    pub fn with_timeout(bundle: &Bundle, timeout: Duration) -> Result<HttpsAcceptor, EndpointError> {
        let provider = provider();
        let (verifier, cert) = crate::endpoint::server_side(bundle, &provider)?;
        let failures = Mutex::new(FailureLog::new(FAILURE_LOG_INTERVAL, MAX_TRACKED_ADDRESSES));
        let shared = Shared { provider, verifier, cert, timeout, failures };
        // Build one configuration now, so a bundle rustls cannot use is
        // refused at start-up rather than at the first connection.
        shared.config(Slot::default()).map_err(|source| EndpointError::Tls { dir: bundle.dir.clone(), source })?;
        Ok(HttpsAcceptor { shared: Arc::new(shared) })
    }

    /// Completes the TLS handshake of a TCP connection from `remote` and
    /// reads the client's identity from its certificate.
    ///
    /// A failure says why, and carries the rate limiter's verdict on logging
    /// it ([`HandshakeFailed::log_line`]).
    pub async fn handshake(&self, tcp: TcpStream, remote: SocketAddr) -> Result<HttpsStream, HandshakeFailed> {
        self.complete(tcp).await.map_err(|error| {
            let report =
                self.shared.failures.lock().unwrap_or_else(|e| e.into_inner()).record(remote.ip(), Instant::now());
            HandshakeFailed { remote, error, report }
        })
    }

    async fn complete(&self, tcp: TcpStream) -> Result<HttpsStream, HandshakeError> {
        let slot = Slot::default();
        let config = self.shared.config(slot.clone()).map_err(|e| HandshakeError::Setup(Box::new(e)))?;
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
        let inner = match tokio::time::timeout(self.shared.timeout, accept).await {
            Err(_) => return Err(HandshakeError::TimedOut(self.shared.timeout)),
            Ok(Err(e)) => {
                return Err(match slot.take() {
                    Some(refused) => client_refusal(refused),
                    None if is_no_certificate(&e) => HandshakeError::NoCertificate,
                    None => HandshakeError::Tls(e),
                });
            }
            Ok(Ok(stream)) => stream,
        };
        let identity = identity_from(inner.get_ref().1.peer_certificates())?;
        Ok(HttpsStream { inner, identity })
    }
}

impl Shared {
    /// A TLS configuration whose client verifier reports into `slot`.
    fn config(&self, slot: Slot) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let verifier = Arc::new(ClientVerifier { inner: Arc::clone(&self.verifier), slot });
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::clone(&self.cert) as _);
        config.alpn_protocols = vec![HTTP1.to_vec()];
        // As on the QUIC side: each handshake has its own configuration, so
        // a session cache or a ticket could never be used again; keep none.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

/// Whether a failed handshake failed because the client sent no certificate.
fn is_no_certificate(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::NoCertificatesPresented))
}

/// An HTTPS connection whose handshake completed: bytes in and out, and
/// the client's identity as its certificate says.
pub struct HttpsStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    identity: PeerIdentity,
}

impl std::fmt::Debug for HttpsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpsStream").field("identity", &self.identity).finish_non_exhaustive()
    }
}

impl HttpsStream {
    /// Who the client is: the role and name in its certificate.
    pub fn identity(&self) -> &PeerIdentity {
        &self.identity
    }
}

impl AsyncRead for HttpsStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for HttpsStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use kiln_proto::Role;
    use rustls::RootCertStore;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::certs;

    /// A CA with a dispatcher for 127.0.0.1, and client bundles by role.
    fn pki() -> (tempfile::TempDir, Bundle) {
        let dir = tempfile::tempdir().unwrap();
        certs::init(dir.path(), &["127.0.0.1".into()]).unwrap();
        let dispatcher = Bundle::load(&dir.path().join("dispatcher")).unwrap();
        (dir, dispatcher)
    }

    /// A TLS client trusting `ca` and presenting `client` (or no certificate).
    fn connector(ca: &Bundle, client: Option<&Bundle>) -> tokio_rustls::TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(ca.ca.clone()).unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match client {
            Some(b) => builder.with_client_auth_cert(vec![b.cert.clone()], b.key.clone_key()).unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![HTTP1.to_vec()];
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Connects with `connector`, sends a line and reads the server's reply;
    /// the server side's handshake result is returned too.
    async fn exchange(
        acceptor: &HttpsAcceptor,
        connector: tokio_rustls::TlsConnector,
    ) -> (Result<PeerIdentity, HandshakeFailed>, Result<String, std::io::Error>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = acceptor.clone();
        let server = tokio::spawn(async move {
            let (tcp, remote) = listener.accept().await.unwrap();
            let mut stream = acceptor.handshake(tcp, remote).await?;
            let mut line = [0u8; 5];
            stream.read_exact(&mut line).await.unwrap();
            stream.write_all(b"pong\n").await.unwrap();
            stream.shutdown().await.unwrap();
            Ok(stream.identity().clone())
        });
        let client = async {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("127.0.0.1").unwrap();
            let mut tls = connector.connect(name, tcp).await?;
            tls.write_all(b"ping\n").await?;
            let mut reply = String::new();
            tls.read_to_string(&mut reply).await?;
            Ok(reply)
        }
        .await;
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn a_kiln_client_gets_in_with_its_role_and_name() {
        let (dir, dispatcher) = pki();
        let acceptor = HttpsAcceptor::new(&dispatcher).unwrap();
        for (role, name) in [(Role::Runner, "r1"), (Role::Observer, "o1"), (Role::Admin, "boss")] {
            let bundle = Bundle::load(&certs::issue(dir.path(), role, name).unwrap()).unwrap();
            let (server, client) = exchange(&acceptor, connector(&dispatcher, Some(&bundle))).await;
            assert_eq!(server.unwrap(), PeerIdentity { role, name: name.into() });
            assert_eq!(client.unwrap(), "pong\n");
        }
    }

    #[tokio::test]
    async fn no_certificate_or_another_ca_is_refused_and_logged_once_per_address() {
        let (dir, dispatcher) = pki();
        let acceptor = HttpsAcceptor::new(&dispatcher).unwrap();
        // No certificate at all.
        let (server, client) = exchange(&acceptor, connector(&dispatcher, None)).await;
        let failed = server.unwrap_err();
        assert!(matches!(failed.error, HandshakeError::NoCertificate), "{:?}", failed.error);
        assert_eq!(failed.report, Some(0), "the first failure from an address is logged");
        assert!(client.is_err(), "the client was answered: {client:?}");
        // A certificate from another Kiln CA.
        let other = tempfile::tempdir().unwrap();
        certs::init(other.path(), &[]).unwrap();
        let stranger = Bundle::load(&certs::issue(other.path(), Role::Admin, "admin").unwrap()).unwrap();
        let (server, client) = exchange(&acceptor, connector(&dispatcher, Some(&stranger))).await;
        let failed = server.unwrap_err();
        let HandshakeError::ClientRefused { subject, .. } = &failed.error else { panic!("{:?}", failed.error) };
        assert!(subject.contains("CN=admin"), "{subject}");
        assert_eq!(failed.report, None, "a second failure from the same address within a minute is only counted");
        assert!(client.is_err(), "the client was answered: {client:?}");
        // The dispatcher's own certificate is no client's.
        let (server, _) = exchange(&acceptor, connector(&dispatcher, Some(&dispatcher))).await;
        assert!(matches!(server.unwrap_err().error, HandshakeError::ClientRefused { .. }));
        // A client bundle cannot serve.
        let runner = Bundle::load(&certs::issue(dir.path(), Role::Runner, "r1").unwrap()).unwrap();
        assert!(matches!(HttpsAcceptor::new(&runner), Err(EndpointError::WrongBundle { .. })));
    }

    #[tokio::test]
    async fn a_silent_client_is_cut_off_at_the_handshake_timeout() {
        let (_dir, dispatcher) = pki();
        let acceptor = HttpsAcceptor::with_timeout(&dispatcher, Duration::from_millis(200)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Connects and says nothing, keeping the socket open.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let (tcp, remote) = listener.accept().await.unwrap();
        let failed = acceptor.handshake(tcp, remote).await.unwrap_err();
        assert!(matches!(failed.error, HandshakeError::TimedOut(t) if t == Duration::from_millis(200)));
        // Plain HTTP on the TLS port is refused too, quickly.
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let (tcp, remote) = listener.accept().await.unwrap();
        let failed = acceptor.handshake(tcp, remote).await.unwrap_err();
        assert!(matches!(failed.error, HandshakeError::Tls(_)), "{:?}", failed.error);
    }
}
