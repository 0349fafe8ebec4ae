//! QUIC endpoints with mutual TLS 1.3: the dispatcher's [`Listener`] and the
//! clients' [`connect`].
//!
//! Both sides trust only the Kiln CA in their bundle, offer the ALPN name of
//! the protocol version, and use ring as the one crypto provider (quinn and
//! rustls would otherwise disagree on a process-wide default and panic).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::wire::{ALPN, Reply, Request};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::CertificateDer;

use crate::certs::{Bundle, PeerIdentity, identity_of};
use crate::framed::{CloseCode, FramedError, RecvStream, SendStream};

/// Why a request to the dispatcher failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The connection failed or was closed (including a refused handshake).
    #[error("{0}")]
    Connection(String),
    /// The stream carried something that is not a valid reply.
    #[error("bad reply from the dispatcher")]
    Framed(#[source] FramedError),
    /// The dispatcher refused the request.
    #[error("the dispatcher refused: {0}")]
    Refused(String),
    /// The dispatcher refused this peer's certificate at the handshake.
    #[error("{0}")]
    Rejected(String),
}

impl RequestError {
    fn from_connection(e: &quinn::ConnectionError) -> RequestError {
        let text = describe_connection_error(e);
        if is_rejection(e) { RequestError::Rejected(text) } else { RequestError::Connection(text) }
    }
}

impl From<EndpointError> for RequestError {
    fn from(e: EndpointError) -> RequestError {
        match e {
            EndpointError::Rejected { .. } => RequestError::Rejected(kiln_proto::error_chain(&e)),
            other => RequestError::Connection(kiln_proto::error_chain(&other)),
        }
    }
}

/// Transport settings shared by both ends.
#[derive(Clone, Copy, Debug)]
pub struct NetConfig {
    /// How often an idle connection sends a keep-alive.
    pub keep_alive: Duration,
    /// How long without hearing from the peer before the connection is
    /// declared dead: this bounds how long a vanished runner holds its work.
    pub idle_timeout: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig { keep_alive: Duration::from_secs(1), idle_timeout: Duration::from_secs(5) }
    }
}

/// Why an endpoint could not be set up or a connection made.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The bundle's certificate or key was rejected by rustls.
    #[error("the certificate bundle in {dir} is unusable")]
    Tls {
        /// The bundle's directory.
        dir: std::path::PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// A client bundle was used where the dispatcher's is needed, or the other way round.
    #[error("the certificate bundle in {dir} is for {unit} `{name}`; {need}")]
    WrongBundle {
        /// The bundle's directory.
        dir: std::path::PathBuf,
        /// Its role.
        unit: String,
        /// Its name.
        name: String,
        /// What was needed instead.
        need: &'static str,
    },
    /// The UDP socket could not be bound.
    #[error("bind a UDP socket on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The dispatcher's address did not resolve.
    #[error("resolve the dispatcher address `{addr}`")]
    Resolve {
        /// The address as given.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The address is not `HOST:PORT`.
    #[error("`{0}` is not a HOST:PORT address")]
    BadAddress(String),
    /// The QUIC connection could not be opened.
    #[error("connect to the dispatcher at {addr}")]
    Connect {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: quinn::ConnectError,
    },
    /// The dispatcher refused this peer's certificate.
    #[error("connect to the dispatcher at {addr}: {reason}")]
    Rejected {
        /// The address.
        addr: String,
        /// What went wrong, in words.
        reason: String,
    },
    /// The handshake failed, or the dispatcher did not answer.
    #[error("connect to the dispatcher at {addr}: {reason}")]
    Handshake {
        /// The address.
        addr: String,
        /// What went wrong, in words.
        reason: String,
    },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(bundle: &Bundle) -> Result<Arc<RootCertStore>, EndpointError> {
    let mut roots = RootCertStore::empty();
    roots.add(bundle.ca.clone()).map_err(|source| EndpointError::Tls { dir: bundle.dir.clone(), source })?;
    Ok(Arc::new(roots))
}

fn transport(cfg: NetConfig) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(cfg.keep_alive));
    // Out-of-range values fall back to quinn's default rather than failing.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(cfg.idle_timeout).ok());
    Arc::new(t)
}

/// The dispatcher's listening endpoint.
pub struct Listener {
    endpoint: quinn::Endpoint,
}

impl Listener {
    /// Binds `addr` with the dispatcher's bundle, requiring every client to
    /// present a certificate signed by the bundle's CA.
    pub fn bind(bundle: &Bundle, addr: SocketAddr, cfg: NetConfig) -> Result<Listener, EndpointError> {
        if !bundle.is_dispatcher() {
            return Err(EndpointError::WrongBundle {
                dir: bundle.dir.clone(),
                unit: bundle.unit.clone(),
                name: bundle.name.clone(),
                need: "the dispatcher needs the bundle `kiln certs init` made (certs/dispatcher)",
            });
        }
        let tls = |source| EndpointError::Tls { dir: bundle.dir.clone(), source };
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(bundle)?, provider())
            .build()
            .map_err(|e| tls(rustls::Error::General(e.to_string())))?;
        let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![bundle.cert.clone()], bundle.key.clone_key())
            .map_err(tls)?;
        crypto.alpn_protocols = vec![ALPN.to_vec()];
        let quic = QuicServerConfig::try_from(crypto).map_err(|e| tls(rustls::Error::General(e.to_string())))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic));
        server.transport_config(transport(cfg));
        let endpoint = quinn::Endpoint::server(server, addr).map_err(|source| EndpointError::Bind { addr, source })?;
        Ok(Listener { endpoint })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Waits for the next incoming connection attempt; `None` once closed.
    pub async fn accept(&self) -> Option<quinn::Incoming> {
        self.endpoint.accept().await
    }

    /// Completes the handshake of an incoming connection and reads the
    /// client's identity from its certificate.
    pub async fn handshake(incoming: quinn::Incoming) -> Result<Connection, String> {
        let conn = incoming.await.map_err(|e| describe_connection_error(&e))?;
        let identity = peer_identity(&conn);
        match identity {
            Ok(identity) => Ok(Connection { conn, identity: Some(identity) }),
            Err(reason) => {
                conn.close(CloseCode::Unauthorized.into(), reason.as_bytes());
                Err(reason)
            }
        }
    }

    /// Closes every connection and stops listening.
    pub async fn shutdown(&self) {
        self.endpoint.close(CloseCode::Shutdown.into(), b"dispatcher shutting down");
        self.endpoint.wait_idle().await;
    }
}

fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or("the peer presented no certificate")?;
    let first = certs.first().ok_or("the peer presented no certificate")?;
    identity_of(first).map_err(|e| format!("the peer's certificate names no Kiln role: {e}"))
}

/// An established connection to a peer.
#[derive(Clone, Debug)]
pub struct Connection {
    conn: quinn::Connection,
    /// The client's identity (on the dispatcher's side; `None` on a client's side).
    identity: Option<PeerIdentity>,
}

impl Connection {
    /// The client's identity, as its certificate says (dispatcher side only).
    pub fn identity(&self) -> Option<&PeerIdentity> {
        self.identity.as_ref()
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// Opens a bidirectional stream.
    pub async fn open(&self) -> Result<(SendStream, RecvStream), quinn::ConnectionError> {
        let (s, r) = self.conn.open_bi().await?;
        Ok((SendStream::new(s), RecvStream::new(r)))
    }

    /// Opens a stream, sends `request` and reads the dispatcher's first reply.
    ///
    /// A client the dispatcher refused at the handshake often learns it only
    /// here, so connection failures are worded for that case.
    pub async fn request(&self, request: &Request) -> Result<(SendStream, RecvStream, Reply), RequestError> {
        let (mut send, mut recv) = self.open().await.map_err(|e| RequestError::from_connection(&e))?;
        send.send(request).await.map_err(|e| self.request_error(e))?;
        let reply: Reply = recv.expect().await.map_err(|e| self.request_error(e))?;
        if let Reply::Refused(reason) = reply {
            return Err(RequestError::Refused(reason));
        }
        Ok((send, recv, reply))
    }

    /// Words a stream failure by the connection's fate, when it has one.
    pub fn request_error(&self, e: FramedError) -> RequestError {
        match self.conn.close_reason() {
            Some(reason) => RequestError::from_connection(&reason),
            None => match e {
                FramedError::Read(quinn::ReadError::ConnectionLost(c))
                | FramedError::Write(quinn::WriteError::ConnectionLost(c)) => RequestError::from_connection(&c),
                other => RequestError::Framed(other),
            },
        }
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept(&self) -> Result<(SendStream, RecvStream), quinn::ConnectionError> {
        let (s, r) = self.conn.accept_bi().await?;
        Ok((SendStream::new(s), RecvStream::new(r)))
    }

    /// Closes the connection with a code and a reason the peer will see.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.conn.close(code.into(), reason.as_bytes());
    }

    /// Waits until the connection is closed, and says why in words.
    pub async fn closed(&self) -> String {
        describe_connection_error(&self.conn.closed().await)
    }

    /// Why the connection closed, if it has.
    pub fn close_reason(&self) -> Option<String> {
        self.conn.close_reason().map(|e| describe_connection_error(&e))
    }

    /// A stable id for this connection, for telling reconnects apart.
    pub fn stable_id(&self) -> usize {
        self.conn.stable_id()
    }
}

/// Turns a connection error into a sentence a user can act on.
pub fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    match e {
        E::ConnectionClosed(close) if is_crypto(close) => {
            format!(
                "the TLS handshake was refused ({}): check that this certificate was issued by the dispatcher's CA, \
                 has not expired, and is a client certificate",
                close.error_code
            )
        }
        E::ConnectionClosed(close) => format!("the connection was closed: {close}"),
        E::TransportError(t) if is_crypto_code(t.code) => format!(
            "the TLS handshake was refused ({t}): the dispatcher's certificate is not signed by the CA in this \
             bundle's ca.pem; were both made by the same `kiln certs init`?"
        ),
        E::TransportError(t) => format!("transport error: {t}"),
        E::ApplicationClosed(app) => {
            let code = CloseCode::from_code(app.error_code.into_inner());
            let reason = String::from_utf8_lossy(&app.reason);
            match code {
                Some(code) => format!("closed by peer ({code}): {reason}"),
                None => format!("closed by peer (code {}): {reason}", app.error_code),
            }
        }
        E::TimedOut => "the peer stopped answering (idle timeout)".to_owned(),
        E::LocallyClosed => "the connection was closed locally".to_owned(),
        E::Reset => "the peer reset the connection".to_owned(),
        E::VersionMismatch => "the peer speaks another QUIC version".to_owned(),
        E::CidsExhausted => "connection ids exhausted".to_owned(),
    }
}

/// Whether the connection failed because the TLS handshake was refused.
pub fn is_rejection(e: &quinn::ConnectionError) -> bool {
    match e {
        quinn::ConnectionError::ConnectionClosed(close) => is_crypto(close),
        quinn::ConnectionError::TransportError(t) => is_crypto_code(t.code),
        _ => false,
    }
}

fn is_crypto(close: &quinn::ConnectionClose) -> bool {
    is_crypto_code(close.error_code)
}

fn is_crypto_code(code: quinn::TransportErrorCode) -> bool {
    // TLS alerts travel as QUIC CRYPTO_ERROR codes 0x100..=0x1ff.
    (0x100..=0x1ff).contains(&u64::from(code))
}

/// Connects to the dispatcher at `addr` (`HOST:PORT`) with a client bundle.
///
/// The handshake's outcome is only certain once the dispatcher has answered
/// something, so callers should treat the first reply's failure as a possible
/// certificate rejection; [`describe_connection_error`] words it so.
pub async fn connect(bundle: &Bundle, addr: &str, cfg: NetConfig) -> Result<Connection, EndpointError> {
    if bundle.is_dispatcher() {
        return Err(EndpointError::WrongBundle {
            dir: bundle.dir.clone(),
            unit: bundle.unit.clone(),
            name: bundle.name.clone(),
            need: "clients need a bundle made by `kiln certs issue`",
        });
    }
    let (host, _) = addr.rsplit_once(':').ok_or_else(|| EndpointError::BadAddress(addr.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let remote = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| EndpointError::Resolve { addr: addr.to_owned(), source })?
        .next()
        .ok_or_else(|| EndpointError::BadAddress(addr.to_owned()))?;

    let tls = |source| EndpointError::Tls { dir: bundle.dir.clone(), source };
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_root_certificates(roots(bundle)?)
        .with_client_auth_cert(vec![bundle.cert.clone()], bundle.key.clone_key())
        .map_err(tls)?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(crypto).map_err(|e| tls(rustls::Error::General(e.to_string())))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    client.transport_config(transport(cfg));

    let local: SocketAddr = if remote.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| EndpointError::BadAddress(addr.to_owned()))?;
    let mut endpoint = quinn::Endpoint::client(local).map_err(|source| EndpointError::Bind { addr: local, source })?;
    endpoint.set_default_client_config(client);
    let connecting =
        endpoint.connect(remote, host).map_err(|source| EndpointError::Connect { addr: addr.to_owned(), source })?;
    // A handshake on a live network takes milliseconds; bound it by the idle timeout.
    let conn = tokio::time::timeout(cfg.idle_timeout.max(Duration::from_secs(1)), connecting)
        .await
        .map_err(|_| EndpointError::Handshake {
            addr: addr.to_owned(),
            reason: format!("no answer within {:?}; is the dispatcher running there?", cfg.idle_timeout),
        })?
        .map_err(|e| {
            let reason = describe_connection_error(&e);
            if is_rejection(&e) {
                EndpointError::Rejected { addr: addr.to_owned(), reason }
            } else {
                EndpointError::Handshake { addr: addr.to_owned(), reason }
            }
        })?;
    Ok(Connection { conn, identity: None })
}
