//! Kiln's network layer: the certificates that identify peers ([`certs`]),
//! QUIC endpoints with mutual TLS ([`endpoint`]) and framed message I/O on
//! QUIC streams ([`framed`]).
//!
//! Only this crate names quinn and rustls. Every peer is identified by a
//! certificate signed by the Kiln certificate authority; only that CA is
//! trusted (never the system roots), and the peer's role and name are read
//! from its certificate, not from anything it says.

pub mod backoff;
pub mod certs;
pub mod endpoint;
pub mod failure_log;
pub mod framed;
pub mod validity;
mod verify;

pub use backoff::Backoff;
pub use certs::{Bundle, CertError, PeerIdentity};
pub use endpoint::{
    Connection, EndpointError, HandshakeError, HandshakeFailed, Incoming, Listener, NetConfig, Refusal, RequestError,
    connect, describe_connection_error,
};
pub use framed::{CloseCode, FramedError, RecvStream, SendStream};
pub use validity::{OutOfDate, Whose, Window};
