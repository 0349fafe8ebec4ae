//! QUIC endpoints with mutual TLS 1.3: the dispatcher's [`Listener`] and the
//! clients' [`connect`].
//!
//! Both sides trust only the Kiln CA in their bundle, offer the ALPN name of
//! the protocol version, and use ring as the one crypto provider (quinn and
//! rustls would otherwise disagree on a process-wide default and panic).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::Escaped;
use kiln_proto::wire::{ALPN, Reply, Request, offered_alpns};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::CertificateDer;

use crate::certs::{Bundle, PeerIdentity, SubjectError, identity_of};
use crate::failure_log::{FAILURE_LOG_INTERVAL, FailureLog, MAX_TRACKED_ADDRESSES};
use crate::framed::{CloseCode, FramedError, RecvStream, SendStream};
use crate::validity::{OutOfDate, Utc, Whose, Window, unix_now};
use crate::verify::{ClientVerifier, Refused, ServerVerifier, Slot};

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
    /// How often a client sends a keep-alive on an idle connection: a third
    /// of the idle timeout (see [`NetConfig::with_idle_timeout`]), so two
    /// can be lost without losing the connection. The dispatcher sends none
    /// of its own: it acknowledges each client's, and the acknowledgement
    /// keeps the client's idle timer fresh as the keep-alive keeps the
    /// dispatcher's, so a thousand idle runners cost it half the packets.
    /// Each costs the dispatcher a few tens of microseconds of CPU: with a
    /// thousand runners, one a second each was 4 % of a core.
    pub keep_alive: Duration,
    /// How long without hearing from the peer before the connection is
    /// declared dead: this bounds how long a vanished runner holds its work.
    pub idle_timeout: Duration,
    /// The dispatcher logs failed handshakes from one address at most once
    /// per this interval, with a count of the others (see [`crate::failure_log`]).
    pub handshake_log_interval: Duration,
    /// Once a frame's first byte has arrived, how long the rest of it may
    /// take (and a pack gets this plus a second per 256 KiB): a peer that
    /// trickles bytes (slowloris) is cut off instead of holding a stream.
    pub frame_timeout: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::with_idle_timeout(DEFAULT_IDLE_TIMEOUT)
    }
}

/// How long a silent peer has by default: a vanished runner's work waits
/// this long before it goes to others.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);

impl NetConfig {
    /// The defaults, with `idle_timeout` and keep-alives every third of it.
    pub fn with_idle_timeout(idle_timeout: Duration) -> NetConfig {
        NetConfig {
            keep_alive: idle_timeout / 3,
            idle_timeout,
            handshake_log_interval: FAILURE_LOG_INTERVAL,
            frame_timeout: Duration::from_secs(30),
        }
    }
}

/// Why an endpoint could not be set up or a connection made.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The dispatcher speaks an older version of the protocol.
    #[error("the dispatcher at {addr} speaks {theirs} and this client {ours}: run the same Kiln version on both sides")]
    Version {
        /// The dispatcher's address.
        addr: String,
        /// This client's version (ALPN name).
        ours: String,
        /// The dispatcher's.
        theirs: String,
    },
    /// The bundle's certificate or key was rejected by rustls.
    #[error("the certificate bundle in {dir} is unusable")]
    Tls {
        /// The bundle's directory.
        dir: std::path::PathBuf,
        /// The cause.
        #[source]
        source: rustls::Error,
    },
    /// rustls and quinn disagree on the TLS configuration (a bug, not the user's).
    #[error("the TLS configuration for the bundle in {dir} does not suit QUIC")]
    Quic {
        /// The bundle's directory.
        dir: std::path::PathBuf,
        /// The cause.
        #[source]
        source: BoxError,
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
        source: BoxError,
    },
    /// A certificate is unusable or was refused: retrying cannot help.
    #[error("connect to the dispatcher at {addr}")]
    Rejected {
        /// The address.
        addr: String,
        /// Whose certificate and why (boxed: it is large and rare).
        #[source]
        source: Box<Refusal>,
    },
    /// The dispatcher did not answer the handshake in time.
    #[error("connect to the dispatcher at {addr}: no answer within {after:?}; is the dispatcher running there?")]
    Timeout {
        /// The address.
        addr: String,
        /// How long was waited.
        after: Duration,
    },
    /// The handshake failed for a reason other than a certificate.
    #[error("connect to the dispatcher at {addr}: {reason}")]
    Handshake {
        /// The address.
        addr: String,
        /// What went wrong, in words.
        reason: String,
    },
}

/// Why the dispatcher and a client did not accept each other's
/// certificates, as the client can tell.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A certificate is outside its validity window by this machine's clock:
    /// the client's own (checked before connecting, and again when the
    /// dispatcher refuses it), or the dispatcher's.
    #[error(transparent)]
    OutOfDate(#[from] OutOfDate),
    /// The dispatcher refused this client's certificate as expired or not
    /// yet valid, though by this machine's clock it is valid.
    #[error(
        "the dispatcher refused {whose} as expired or not yet valid, but it is valid from {} to {} and this \
         machine's clock says {}: the dispatcher's clock or this machine's is wrong",
        Utc(window.not_before),
        Utc(window.not_after),
        Utc(*now)
    )]
    ClockSkew {
        /// The client's own certificate.
        whose: Whose,
        /// Its window.
        window: Window,
        /// This machine's clock.
        now: i64,
    },
    /// The dispatcher refused this client's certificate for another reason.
    #[error("the TLS handshake was refused (alert {alert}): {hint}")]
    ByDispatcher {
        /// The TLS alert the dispatcher sent, e.g. `UnknownCA`.
        alert: String,
        /// What to check.
        hint: &'static str,
    },
    /// The TLS handshake failed in a way neither verifier explained.
    #[error("{reason}")]
    Tls {
        /// What went wrong, in words.
        reason: String,
    },
    /// This client refused the dispatcher's certificate.
    #[error("the TLS handshake was refused: {hint}")]
    OfDispatcher {
        /// What is wrong with it and what to do.
        hint: String,
        /// webpki's verdict.
        #[source]
        source: rustls::Error,
    },
}

/// Why the dispatcher could not complete a client's handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client's certificate is outside its validity window by the dispatcher's clock.
    #[error(transparent)]
    ClientOutOfDate(OutOfDate),
    /// The client's certificate was refused for another reason.
    #[error("the client's certificate ({}) was refused", Escaped(subject))]
    ClientRefused {
        /// Its subject (from the peer).
        subject: String,
        /// webpki's verdict.
        #[source]
        source: rustls::Error,
    },
    /// The handshake completed without a client certificate (rustls should not allow it).
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The client's certificate verified but does not say which Kiln client it is.
    #[error("the peer's certificate names no Kiln role")]
    NotKiln(#[source] SubjectError),
    /// The handshake did not complete (no certificate, another protocol, a timeout…).
    #[error("the handshake did not complete")]
    Connection(#[source] ConnectionLost),
    /// A TLS-over-TCP handshake (the dashboard's HTTPS) did not complete:
    /// the peer spoke something else, or hung up.
    #[error("the TLS handshake did not complete")]
    Tls(#[source] std::io::Error),
    /// A TLS-over-TCP handshake took longer than allowed.
    #[error("the TLS handshake did not complete within {0:?}")]
    TimedOut(Duration),
    /// The peer speaks an older version of the protocol.
    #[error(
        "the peer speaks {peer} and this dispatcher {}: run the same Kiln version on both sides",
        String::from_utf8_lossy(ALPN)
    )]
    Version {
        /// The version it speaks (its ALPN name).
        peer: String,
    },
    /// The per-connection TLS configuration could not be made (a bug, not the peer's).
    #[error("cannot configure TLS for the connection")]
    Setup(#[source] BoxError),
}

/// A failed handshake, and whether it deserves a log line.
#[derive(Debug)]
pub struct HandshakeFailed {
    /// The peer's address.
    pub remote: SocketAddr,
    /// What went wrong.
    pub error: HandshakeError,
    /// `Some(n)`: log it, `n` earlier failures from this address having gone
    /// unlogged; `None`: it was counted, stay quiet.
    pub report: Option<u64>,
}

impl HandshakeFailed {
    /// The text of this failure's log line (escaped, so a peer's values
    /// cannot forge lines), or `None` if the rate limit says stay quiet.
    pub fn log_line(&self) -> Option<String> {
        let n = self.report?;
        let text = Escaped(&kiln_proto::error_chain(&self.error)).to_string();
        Some(match n {
            0 => text,
            n => format!("{text} ({n} more failed handshakes from {} since the last line)", self.remote.ip()),
        })
    }
}

impl std::fmt::Display for HandshakeFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", Escaped(&kiln_proto::error_chain(&self.error)))
    }
}

/// What every server of the dispatcher's (QUIC, and the dashboard's HTTPS)
/// is built from: webpki's verifier of client certificates, with the Kiln CA
/// as the only root and a certificate mandatory, and the dispatcher's
/// certificate and key, parsed once. One definition, so both check clients
/// by the same rules.
pub(crate) fn server_side(
    bundle: &Bundle,
    provider: &Arc<rustls::crypto::CryptoProvider>,
) -> Result<(Arc<dyn ClientCertVerifier>, Arc<SingleCertAndKey>), EndpointError> {
    if !bundle.is_dispatcher() {
        return Err(EndpointError::WrongBundle {
            dir: bundle.dir.clone(),
            unit: bundle.unit.clone(),
            name: bundle.name.clone(),
            need: "the dispatcher needs the bundle `kiln certs init` made (certs/dispatcher)",
        });
    }
    let tls_err = |source| EndpointError::Tls { dir: bundle.dir.clone(), source };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(bundle)?, Arc::clone(provider))
        .build()
        .map_err(|e| tls_err(rustls::Error::General(e.to_string())))?;
    let key = CertifiedKey::from_der(vec![bundle.cert.clone()], bundle.key.clone_key(), provider).map_err(tls_err)?;
    Ok((verifier, Arc::new(SingleCertAndKey::from(key))))
}

/// A client's identity from the certificates it presented (the first is its own).
pub(crate) fn identity_from(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerIdentity, HandshakeError> {
    let first = certs.and_then(|c| c.first()).ok_or(HandshakeError::NoCertificate)?;
    identity_of(first).map_err(HandshakeError::NotKiln)
}

pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(bundle: &Bundle) -> Result<Arc<RootCertStore>, EndpointError> {
    let mut roots = RootCertStore::empty();
    roots.add(bundle.ca.clone()).map_err(|source| EndpointError::Tls { dir: bundle.dir.clone(), source })?;
    Ok(Arc::new(roots))
}

/// quinn's settings; `keep_alive` is whether this end sends keep-alives.
fn transport(cfg: NetConfig, keep_alive: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(keep_alive.then_some(cfg.keep_alive));
    // Out-of-range values fall back to quinn's default rather than failing.
    t.max_idle_timeout(quinn::IdleTimeout::try_from(cfg.idle_timeout).ok());
    Arc::new(t)
}

/// What every handshake of one listener shares.
struct ServerTls {
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// webpki's client verifier, wrapped per connection to record refusals.
    verifier: Arc<dyn ClientCertVerifier>,
    /// The dispatcher's certificate and key, parsed once.
    cert: Arc<SingleCertAndKey>,
    /// quinn's settings; each connection gets a copy with its own TLS config.
    base: quinn::ServerConfig,
    /// See [`NetConfig::frame_timeout`].
    frame_timeout: Duration,
    /// Which failed handshakes get a log line.
    failures: Mutex<FailureLog>,
}

impl ServerTls {
    /// A TLS configuration whose client verifier reports into `slot`.
    fn config(&self, slot: Slot) -> Result<Arc<QuicServerConfig>, BoxError> {
        server_crypto(&self.provider, &self.verifier, &self.cert, slot)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn server_crypto(
    provider: &Arc<rustls::crypto::CryptoProvider>,
    verifier: &Arc<dyn ClientCertVerifier>,
    cert: &Arc<SingleCertAndKey>,
    slot: Slot,
) -> Result<Arc<QuicServerConfig>, BoxError> {
    let verifier = Arc::new(ClientVerifier { inner: Arc::clone(verifier), slot });
    let mut crypto = rustls::ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::clone(cert) as _);
    // The server's order wins: an older version is chosen only by a peer
    // that offers nothing else, to be told so (see `version_mismatch`).
    crypto.alpn_protocols = offered_alpns();
    // Each connection has its own configuration, so a session cache would
    // only cost memory per handshake (a flood's included), and a resumption
    // ticket could never be redeemed. Kiln clients never resume anyway.
    crypto.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    crypto.send_tls13_tickets = 0;
    Ok(Arc::new(QuicServerConfig::try_from(crypto)?))
}

/// The dispatcher's listening endpoint.
pub struct Listener {
    endpoint: quinn::Endpoint,
    tls: Arc<ServerTls>,
    idle_timeout: Duration,
}

/// An incoming connection attempt, before its handshake.
pub struct Incoming {
    inner: quinn::Incoming,
    tls: Arc<ServerTls>,
}

impl Incoming {
    /// The address the attempt came from.
    pub fn remote_address(&self) -> SocketAddr {
        self.inner.remote_address()
    }
}

impl Listener {
    /// Binds `addr` with the dispatcher's bundle, requiring every client to
    /// present a certificate signed by the bundle's CA.
    ///
    /// It does not check the bundle's dates: the binary does that at start-up
    /// ([`Bundle::check_dates`]), and tests need a dispatcher whose
    /// certificate has expired.
    pub fn bind(bundle: &Bundle, addr: SocketAddr, cfg: NetConfig) -> Result<Listener, EndpointError> {
        let tls_err = |source| EndpointError::Tls { dir: bundle.dir.clone(), source };
        let provider = provider();
        let (verifier, cert) = server_side(bundle, &provider)?;
        // A first configuration checks everything once, here, and is the
        // endpoint's default; each connection gets a copy with its own verifier.
        let first = server_crypto(&provider, &verifier, &cert, Slot::default())
            .map_err(|e| tls_err(rustls::Error::General(e.to_string())))?;
        let mut base = quinn::ServerConfig::with_crypto(first);
        base.transport_config(transport(cfg, false));
        let endpoint =
            quinn::Endpoint::server(base.clone(), addr).map_err(|source| EndpointError::Bind { addr, source })?;
        let failures = Mutex::new(FailureLog::new(cfg.handshake_log_interval, MAX_TRACKED_ADDRESSES));
        let tls = ServerTls { provider, verifier, cert, base, failures, frame_timeout: cfg.frame_timeout };
        Ok(Listener { endpoint, tls: Arc::new(tls), idle_timeout: cfg.idle_timeout })
    }

    /// How long a silent peer has: runners are told it at registration,
    /// so that their keep-alives come often enough.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Waits for the next incoming connection attempt; `None` once closed.
    pub async fn accept(&self) -> Option<Incoming> {
        let inner = self.endpoint.accept().await?;
        Some(Incoming { inner, tls: Arc::clone(&self.tls) })
    }

    /// Completes the handshake of an incoming connection and reads the
    /// client's identity from its certificate.
    ///
    /// A failure says whose certificate failed and why, and carries the rate
    /// limiter's verdict on logging it ([`HandshakeFailed::log_line`]).
    pub async fn handshake(incoming: Incoming) -> Result<Connection, HandshakeFailed> {
        let Incoming { inner, tls } = incoming;
        let remote = inner.remote_address();
        let result = Self::complete(inner, &tls).await;
        result.map_err(|error| {
            let report =
                tls.failures.lock().unwrap_or_else(|e| e.into_inner()).record(remote.ip(), std::time::Instant::now());
            HandshakeFailed { remote, error, report }
        })
    }

    async fn complete(incoming: quinn::Incoming, tls: &ServerTls) -> Result<Connection, HandshakeError> {
        let slot = Slot::default();
        let mut config = tls.base.clone();
        config.crypto = tls.config(slot.clone()).map_err(HandshakeError::Setup)?;
        let refused = |e| match slot.take() {
            Some(refused) => client_refusal(refused),
            None => HandshakeError::Connection(ConnectionLost(e)),
        };
        let conn = incoming.accept_with(Arc::new(config)).map_err(refused)?.await.map_err(refused)?;
        if let Some(peer) = version_mismatch(&conn) {
            let reason = format!(
                "this dispatcher speaks {} and this client {peer}: run the same Kiln version on both sides",
                String::from_utf8_lossy(ALPN)
            );
            conn.close(CloseCode::Protocol.into(), reason.as_bytes());
            return Err(HandshakeError::Version { peer });
        }
        match peer_identity(&conn) {
            Ok(identity) => {
                Ok(Connection { conn, identity: Some(identity), client: None, frame_timeout: tls.frame_timeout })
            }
            Err(e) => {
                conn.close(CloseCode::Unauthorized.into(), kiln_proto::error_chain(&e).as_bytes());
                Err(e)
            }
        }
    }

    /// Closes every connection and stops listening.
    pub async fn shutdown(&self) {
        self.endpoint.close(CloseCode::Shutdown.into(), b"dispatcher shutting down");
        self.endpoint.wait_idle().await;
    }
}

/// Whether webpki refused a certificate for its dates.
fn is_lapse(e: &rustls::Error) -> bool {
    use rustls::CertificateError as C;
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. }
        )
    )
}

/// The dispatcher's words for a client certificate its verifier refused.
pub(crate) fn client_refusal(refused: Refused) -> HandshakeError {
    let subject = refused.subject.unwrap_or_else(|| "unparseable".to_owned());
    if is_lapse(&refused.error)
        && let Some(window) = refused.window
        && let Err(e) = OutOfDate::check(Whose::Client { subject: subject.clone() }, window, refused.now)
    {
        return HandshakeError::ClientOutOfDate(e);
    }
    HandshakeError::ClientRefused { subject, source: refused.error }
}

/// The protocol version the handshake settled on, if it is not this one's.
fn version_mismatch(conn: &quinn::Connection) -> Option<String> {
    let data = conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?;
    match data.protocol {
        Some(protocol) if protocol == ALPN => None,
        Some(protocol) => Some(String::from_utf8_lossy(&protocol).into_owned()),
        None => Some("no protocol version".to_owned()),
    }
}

fn peer_identity(conn: &quinn::Connection) -> Result<PeerIdentity, HandshakeError> {
    let certs = conn.peer_identity().and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
    identity_from(certs.as_deref().map(Vec::as_slice))
}

/// What a client knows about its own side, to word a refusal.
#[derive(Debug)]
struct ClientSide {
    /// The dispatcher's address as given.
    addr: String,
    /// This client's certificate, for messages.
    own: Whose,
    /// Its validity window, if it parses.
    window: Option<Window>,
}

impl ClientSide {
    /// The refusal that a TLS alert from the dispatcher means.
    fn refused_by_dispatcher(&self, alert: u8) -> Refusal {
        use rustls::AlertDescription as A;
        let alert = A::from(alert);
        if alert == A::CertificateExpired
            && let Some(window) = self.window
        {
            let now = unix_now();
            return match OutOfDate::check(self.own.clone(), window, now) {
                Err(e) => Refusal::OutOfDate(e),
                Ok(()) => Refusal::ClockSkew { whose: self.own.clone(), window, now },
            };
        }
        let hint = match alert {
            A::UnknownCA => {
                "the dispatcher does not trust this certificate's CA; was it issued from the `kiln certs init` that \
                 made the dispatcher's certificate?"
            }
            A::CertificateRevoked => "the dispatcher has revoked this certificate; issue a new one",
            A::UnsupportedCertificate => {
                "this is not a client certificate; issue one with `kiln certs issue ROLE NAME`"
            }
            _ => "check that this certificate was issued by the dispatcher's CA and is a client certificate",
        };
        Refusal::ByDispatcher { alert: format!("{alert:?}"), hint }
    }

    /// The error for a connection that failed, in the handshake or at the first read.
    fn error(&self, e: &quinn::ConnectionError, slot: &Slot, host: &str) -> EndpointError {
        let addr = self.addr.clone();
        if let Some(refused) = slot.take() {
            return EndpointError::Rejected { addr, source: Box::new(dispatcher_refusal(refused, host)) };
        }
        if let quinn::ConnectionError::ConnectionClosed(close) = e
            && let Some(alert) = tls_alert(close.error_code)
        {
            return EndpointError::Rejected { addr, source: Box::new(self.refused_by_dispatcher(alert)) };
        }
        if is_rejection(e) {
            // A TLS failure the verifier did not see (it refused nothing, or
            // the failure came before it): still no use retrying.
            return EndpointError::Rejected {
                addr,
                source: Box::new(Refusal::Tls { reason: describe_connection_error(e) }),
            };
        }
        EndpointError::Handshake { addr, reason: describe_connection_error(e) }
    }
}

/// The client's words for a dispatcher certificate its verifier refused.
fn dispatcher_refusal(refused: Refused, host: &str) -> Refusal {
    use rustls::CertificateError as C;
    if is_lapse(&refused.error)
        && let Some(window) = refused.window
        && let Err(e) = OutOfDate::check(Whose::Dispatcher, window, refused.now)
    {
        return Refusal::OutOfDate(e);
    }
    let hint = match &refused.error {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => format!(
            "the dispatcher's certificate is not valid for `{}`; connect by a name or address it was made for \
             (`--san` of `kiln certs init`)",
            Escaped(host)
        ),
        rustls::Error::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "the peer's certificate is not a dispatcher's (it must come from `kiln certs init`)".to_owned()
        }
        _ => "the dispatcher's certificate is not signed by the CA in this bundle's ca.pem; were both made by the \
              same `kiln certs init`?"
            .to_owned(),
    };
    Refusal::OfDispatcher { hint, source: refused.error }
}

/// The TLS alert a QUIC CRYPTO_ERROR code (0x100..=0x1ff) carries.
fn tls_alert(code: quinn::TransportErrorCode) -> Option<u8> {
    u64::from(code).checked_sub(0x100).and_then(|a| u8::try_from(a).ok())
}

/// An established connection to a peer.
#[derive(Clone, Debug)]
pub struct Connection {
    conn: quinn::Connection,
    /// The client's identity (on the dispatcher's side; `None` on a client's side).
    identity: Option<PeerIdentity>,
    /// On a client's side: what it needs to word a late refusal.
    client: Option<Arc<ClientSide>>,
    /// See [`NetConfig::frame_timeout`].
    frame_timeout: Duration,
}

impl RequestError {
    /// A request's connection failed: the dispatcher may have refused the
    /// certificate only now (see the crate's notes), so say so if it did.
    fn from_connection(e: &quinn::ConnectionError, client: Option<&ClientSide>) -> RequestError {
        if let (Some(client), quinn::ConnectionError::ConnectionClosed(close)) = (client, e)
            && let Some(alert) = tls_alert(close.error_code)
        {
            let e = EndpointError::Rejected {
                addr: client.addr.clone(),
                source: Box::new(client.refused_by_dispatcher(alert)),
            };
            return RequestError::Rejected(kiln_proto::error_chain(&e));
        }
        // A connection closed as unauthorized refused the request that was
        // under way, whether or not the refusal's reply was read first: the
        // close carries the same reason.
        if let quinn::ConnectionError::ApplicationClosed(app) = e
            && CloseCode::from_code(app.error_code.into_inner()) == Some(CloseCode::Unauthorized)
        {
            return RequestError::Refused(String::from_utf8_lossy(&app.reason).into_owned());
        }
        let text = describe_connection_error(e);
        if is_rejection(e) { RequestError::Rejected(text) } else { RequestError::Connection(text) }
    }
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
    pub async fn open(&self) -> Result<(SendStream, RecvStream), ConnectionLost> {
        let (s, r) = self.conn.open_bi().await.map_err(ConnectionLost)?;
        Ok((SendStream::new(s), RecvStream::new(r, self.frame_timeout)))
    }

    /// Opens a stream, sends `request` and reads the dispatcher's first reply.
    ///
    /// A client the dispatcher refused at the handshake often learns it only
    /// here, so connection failures are worded for that case.
    pub async fn request(&self, request: &Request) -> Result<(SendStream, RecvStream, Reply), RequestError> {
        let (mut send, mut recv) =
            self.open().await.map_err(|e| RequestError::from_connection(&e.0, self.client.as_deref()))?;
        send.send(request).await.map_err(|e| self.request_error(e))?;
        let reply: Reply = recv.expect().await.map_err(|e| self.request_error(e))?;
        if let Reply::Refused(reason) = reply {
            return Err(RequestError::Refused(reason));
        }
        Ok((send, recv, reply))
    }

    /// Words a stream failure by the connection's fate, when it has one.
    pub fn request_error(&self, e: FramedError) -> RequestError {
        let client = self.client.as_deref();
        match self.conn.close_reason() {
            Some(reason) => RequestError::from_connection(&reason, client),
            None => match e.connection_lost() {
                Some(c) => RequestError::from_connection(c, client),
                None => RequestError::Framed(e),
            },
        }
    }

    /// Waits for the peer to open a bidirectional stream.
    pub async fn accept(&self) -> Result<(SendStream, RecvStream), ConnectionLost> {
        let (s, r) = self.conn.accept_bi().await.map_err(ConnectionLost)?;
        Ok((SendStream::new(s), RecvStream::new(r, self.frame_timeout)))
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

/// The connection failed or was closed; the message says why in words a
/// user can act on (quinn's error is the source).
#[derive(Debug, thiserror::Error)]
#[error("{}", describe_connection_error(.0))]
pub struct ConnectionLost(#[source] pub(crate) quinn::ConnectionError);

impl ConnectionLost {
    /// Whether it failed because the TLS handshake was refused.
    pub fn is_rejection(&self) -> bool {
        is_rejection(&self.0)
    }
}

/// Turns a connection error into a sentence a user can act on.
fn describe_connection_error(e: &quinn::ConnectionError) -> String {
    use quinn::ConnectionError as E;
    match e {
        E::ConnectionClosed(close) if is_crypto(close) => {
            format!(
                "the TLS handshake was refused ({}): check that this certificate was issued by the dispatcher's CA, \
                 is within its validity dates, and is a client certificate",
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
fn is_rejection(e: &quinn::ConnectionError) -> bool {
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
/// A bundle whose certificate is outside its validity window is refused
/// before dialling, with a message saying so. The handshake's outcome is only
/// certain once the dispatcher has answered something, so a refusal of this
/// client's certificate often surfaces on the first request instead;
/// [`Connection::request`] words it the same way.
pub async fn connect(bundle: &Bundle, addr: &str, cfg: NetConfig) -> Result<Connection, EndpointError> {
    if bundle.is_dispatcher() {
        return Err(EndpointError::WrongBundle {
            dir: bundle.dir.clone(),
            unit: bundle.unit.clone(),
            name: bundle.name.clone(),
            need: "clients need a bundle made by `kiln certs issue`",
        });
    }
    let client = Arc::new(ClientSide {
        addr: addr.to_owned(),
        own: Whose::Own { role: bundle.unit.clone(), name: bundle.name.clone(), path: bundle.dir.join("cert.pem") },
        window: Window::of(&bundle.cert),
    });
    if let Some(window) = client.window {
        OutOfDate::check(client.own.clone(), window, unix_now())
            .map_err(|e| EndpointError::Rejected { addr: addr.to_owned(), source: Box::new(Refusal::OutOfDate(e)) })?;
    }
    let (host, _) = addr.rsplit_once(':').ok_or_else(|| EndpointError::BadAddress(addr.to_owned()))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let remote = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| EndpointError::Resolve { addr: addr.to_owned(), source })?
        .next()
        .ok_or_else(|| EndpointError::BadAddress(addr.to_owned()))?;

    let tls = |source| EndpointError::Tls { dir: bundle.dir.clone(), source };
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(roots(bundle)?, Arc::clone(&provider))
        .build()
        .map_err(|e| tls(rustls::Error::General(e.to_string())))?;
    let slot = Slot::default();
    let verifier = Arc::new(ServerVerifier { inner: webpki, slot: slot.clone() });
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![bundle.cert.clone()], bundle.key.clone_key())
        .map_err(tls)?;
    crypto.alpn_protocols = offered_alpns();
    let quic = QuicClientConfig::try_from(crypto)
        .map_err(|source| EndpointError::Quic { dir: bundle.dir.clone(), source: Box::new(source) })?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(quic));
    client_config.transport_config(transport(cfg, true));

    let local: SocketAddr = if remote.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| EndpointError::BadAddress(addr.to_owned()))?;
    let mut endpoint = quinn::Endpoint::client(local).map_err(|source| EndpointError::Bind { addr: local, source })?;
    endpoint.set_default_client_config(client_config);
    let connecting = endpoint
        .connect(remote, host)
        .map_err(|source| EndpointError::Connect { addr: addr.to_owned(), source: Box::new(source) })?;
    // A handshake on a live network takes milliseconds; bound it by the idle timeout.
    let after = cfg.idle_timeout.max(Duration::from_secs(1));
    let conn = tokio::time::timeout(after, connecting)
        .await
        .map_err(|_| EndpointError::Timeout { addr: addr.to_owned(), after })?
        .map_err(|e| client.error(&e, &slot, host))?;
    if let Some(theirs) = version_mismatch(&conn) {
        let ours = String::from_utf8_lossy(ALPN).into_owned();
        let reason = format!("this client speaks {ours} and the dispatcher {theirs}");
        conn.close(CloseCode::Protocol.into(), reason.as_bytes());
        return Err(EndpointError::Version { addr: addr.to_owned(), ours, theirs });
    }
    Ok(Connection { conn, identity: None, client: Some(client), frame_timeout: cfg.frame_timeout })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(window: Window) -> ClientSide {
        ClientSide {
            addr: "ci:7700".into(),
            own: Whose::Own { role: "runner".into(), name: "b1".into(), path: "certs/b1/cert.pem".into() },
            window: Some(window),
        }
    }

    #[test]
    fn certificate_expired_from_the_dispatcher_is_checked_against_this_clock() {
        let now = unix_now();
        // Expired here too: say so, with the fix.
        let refusal = client(Window { not_before: now - 200, not_after: now - 100 }).refused_by_dispatcher(45);
        assert!(matches!(refusal, Refusal::OutOfDate(_)), "{refusal:?}");
        assert!(refusal.to_string().starts_with("this runner's certificate (b1, certs/b1/cert.pem) expired at "));
        // Valid here: one of the clocks is wrong, and no new certificate would help.
        let w = Window { not_before: now - 100, not_after: now + 100 };
        let refusal = client(w).refused_by_dispatcher(45);
        let Refusal::ClockSkew { now: seen, .. } = refusal else { panic!("{refusal:?}") };
        assert_eq!(
            refusal.to_string(),
            format!(
                "the dispatcher refused this runner's certificate (b1, certs/b1/cert.pem) as expired or not yet valid, \
                 but it is valid from {} to {} and this machine's clock says {}: the dispatcher's clock or this \
                 machine's is wrong",
                Utc(w.not_before),
                Utc(w.not_after),
                Utc(seen)
            )
        );
    }

    #[test]
    fn other_alerts_get_their_own_hint() {
        let now = unix_now();
        let refusal = client(Window { not_before: now - 100, not_after: now + 100 }).refused_by_dispatcher(48);
        assert_eq!(
            refusal.to_string(),
            "the TLS handshake was refused (alert UnknownCA): the dispatcher does not trust this certificate's CA; \
             was it issued from the `kiln certs init` that made the dispatcher's certificate?"
        );
    }
}
