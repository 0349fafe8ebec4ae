//! Kiln's network layer: the certificates that identify peers ([`certs`])
//! and when they are valid ([`validity`]), QUIC endpoints with mutual TLS
//! ([`endpoint`]), framed message I/O on QUIC streams ([`framed`]), TLS over
//! TCP for the dashboard's HTTPS by the same rules ([`https`]), and the limit
//! on how often failed handshakes are logged ([`failure_log`]).
//!
//! A refused certificate is reported as *whose* it is and *why*: each
//! handshake gets its own verifier wrapping webpki's (module `verify`), which
//! keeps the refused certificate's subject and validity window for the
//! endpoint to word the error; webpki still decides, and the peer still gets
//! the precise TLS alert (`certificate_expired`), which a Kiln client reads
//! against its own certificate's dates.
//!
//! Only this crate names quinn and rustls (and tokio-rustls), in its API too: it returns its
//! own error types ([`ConnectionLost`], [`StreamFailed`], ...), worded for a
//! user, with quinn's errors as their `source`. Every peer is identified by a
//! certificate signed by the Kiln certificate authority; only that CA is
//! trusted (never the system roots), and the peer's role and name are read
//! from its certificate, not from anything it says.

pub mod backoff;
pub mod certs;
pub mod endpoint;
pub mod failure_log;
pub mod framed;
pub mod https;
pub mod validity;
mod verify;

pub use backoff::Backoff;
pub use certs::{Bundle, CertError, PeerIdentity};
pub use endpoint::{
    Connection, ConnectionLost, DEFAULT_IDLE_TIMEOUT, EndpointError, HandshakeError, HandshakeFailed, Incoming,
    Listener, NetConfig, Refusal, RequestError, connect,
};
pub use framed::{CloseCode, FramedError, RecvStream, SendStream, StreamFailed};
pub use https::{HttpsAcceptor, HttpsStream};
pub use validity::{OutOfDate, Whose, Window};
