//! Framed message I/O over QUIC streams, using the codec in
//! [`kiln_proto::frame`], plus the raw byte runs that carry git packs.
//!
//! Every read is bounded: a frame by [`kiln_proto::MAX_FRAME_LEN`], a pack by
//! the caller's limit, and both are checked before memory is committed; and
//! in time, once begun (see [`crate::NetConfig::frame_timeout`]).

use std::time::Duration;

use kiln_proto::frame::{self, FrameError};
use kiln_proto::wire::PackHeader;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Application close codes: why a connection was closed on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseCode {
    /// An orderly shutdown.
    Shutdown,
    /// The peer sent bytes that are not a valid message, or a message that
    /// is not valid at that point of the exchange.
    Protocol,
    /// The peer's role does not allow what it asked.
    Unauthorized,
    /// Another connection with the same identity replaced this one.
    Replaced,
    /// Another live connection holds this identity; this one may retry later.
    NameInUse,
}

impl CloseCode {
    /// The code's number on the wire.
    pub fn code(self) -> u32 {
        match self {
            CloseCode::Shutdown => 0,
            CloseCode::Protocol => 1,
            CloseCode::Unauthorized => 2,
            CloseCode::Replaced => 3,
            CloseCode::NameInUse => 4,
        }
    }

    /// The code for a number, if it is one of ours.
    pub fn from_code(code: u64) -> Option<CloseCode> {
        [CloseCode::Shutdown, CloseCode::Protocol, CloseCode::Unauthorized, CloseCode::Replaced, CloseCode::NameInUse]
            .into_iter()
            .find(|c| u64::from(c.code()) == code)
    }
}

impl From<CloseCode> for quinn::VarInt {
    fn from(c: CloseCode) -> quinn::VarInt {
        quinn::VarInt::from_u32(c.code())
    }
}

impl std::fmt::Display for CloseCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CloseCode::Shutdown => "shutdown",
            CloseCode::Protocol => "protocol violation",
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::Replaced => "replaced by a newer connection",
            CloseCode::NameInUse => "name in use by another connection",
        })
    }
}

/// Why a framed read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    /// The bytes were not a valid frame.
    #[error("invalid frame")]
    Frame(#[from] FrameError),
    /// The stream ended in the middle of a frame or pack.
    #[error("the stream ended early")]
    Truncated,
    /// The stream or its connection failed while reading.
    #[error("stream read failed")]
    Read(#[source] StreamFailed),
    /// The stream or its connection failed while writing.
    #[error("stream write failed")]
    Write(#[source] StreamFailed),
    /// A frame or pack that had started did not finish in time.
    #[error("the peer sent too slowly: a frame not complete within {limit:?}")]
    TooSlow {
        /// The time it had.
        limit: Duration,
    },
    /// A pack was larger than allowed.
    #[error("pack of {len} bytes exceeds the limit of {limit} bytes")]
    PackTooLarge {
        /// Announced size.
        len: u64,
        /// The limit.
        limit: u64,
    },
}

/// A QUIC stream failed (quinn's error is the source).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StreamFailed(Transport);

#[derive(Debug, thiserror::Error)]
enum Transport {
    #[error(transparent)]
    Read(quinn::ReadError),
    #[error(transparent)]
    Write(quinn::WriteError),
}

impl From<quinn::ReadError> for FramedError {
    fn from(e: quinn::ReadError) -> FramedError {
        FramedError::Read(StreamFailed(Transport::Read(e)))
    }
}

impl From<quinn::WriteError> for FramedError {
    fn from(e: quinn::WriteError) -> FramedError {
        FramedError::Write(StreamFailed(Transport::Write(e)))
    }
}

impl FramedError {
    /// The connection's failure, when that is why the stream failed.
    pub(crate) fn connection_lost(&self) -> Option<&quinn::ConnectionError> {
        match self {
            FramedError::Read(StreamFailed(Transport::Read(quinn::ReadError::ConnectionLost(c))))
            | FramedError::Write(StreamFailed(Transport::Write(quinn::WriteError::ConnectionLost(c)))) => Some(c),
            _ => None,
        }
    }

    /// Whether the peer sent invalid bytes (as opposed to the connection failing).
    pub fn is_protocol_violation(&self) -> bool {
        matches!(
            self,
            FramedError::Frame(_)
                | FramedError::Truncated
                | FramedError::TooSlow { .. }
                | FramedError::PackTooLarge { .. }
        )
    }
}

/// The sending half of a stream.
#[derive(Debug)]
pub struct SendStream(quinn::SendStream);

impl SendStream {
    pub(crate) fn new(s: quinn::SendStream) -> Self {
        SendStream(s)
    }

    /// Sends one message as a frame.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FramedError> {
        let bytes = frame::encode(msg)?;
        self.0.write_all(&bytes).await?;
        Ok(())
    }

    /// Sends raw bytes announced by a [`PackHeader`].
    pub async fn send_pack(&mut self, pack: &[u8]) -> Result<(), FramedError> {
        self.send(&PackHeader { len: pack.len() as u64 }).await?;
        self.0.write_all(pack).await?;
        Ok(())
    }

    /// Sends raw bytes with no framing (only for tests of hostile peers).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<(), FramedError> {
        self.0.write_all(bytes).await?;
        Ok(())
    }

    /// Ends the stream; the peer reads what was sent, then the end.
    pub fn finish(&mut self) {
        // Finishing a stream that is already finished or reset is harmless.
        let _ = self.0.finish();
    }

    /// Waits until the peer has acknowledged everything sent on a finished
    /// stream (or stopped reading it). Returns `false` if the connection was
    /// lost first, so the data may never have arrived.
    pub async fn stopped(&mut self) -> bool {
        self.0.stopped().await.is_ok()
    }
}

/// The receiving half of a stream.
#[derive(Debug)]
pub struct RecvStream(quinn::RecvStream, Duration);

/// How fast a pack must arrive, on top of the frame timeout: a second per
/// this many bytes.
const PACK_BYTES_PER_SECOND: u64 = 256 * 1024;

impl RecvStream {
    pub(crate) fn new(r: quinn::RecvStream, frame_timeout: Duration) -> Self {
        RecvStream(r, frame_timeout)
    }

    /// Reads exactly `buf.len()` bytes; `Ok(false)` if the stream ended before the first byte.
    async fn fill(&mut self, buf: &mut [u8]) -> Result<bool, FramedError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.0.read(&mut buf[filled..]).await? {
                Some(n) => filled += n,
                None if filled == 0 => return Ok(false),
                None => return Err(FramedError::Truncated),
            }
        }
        Ok(true)
    }

    /// Reads the next message; `Ok(None)` if the stream ended cleanly between frames.
    ///
    /// Waiting for a frame to start takes as long as it takes (a control
    /// stream may be quiet for hours); once it has, the rest must arrive
    /// within the frame timeout.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FramedError> {
        let mut prefix = [0u8; 4];
        if !self.fill(&mut prefix[..1]).await? {
            return Ok(None);
        }
        let limit = self.1;
        let rest = async {
            if !self.fill(&mut prefix[1..]).await? {
                return Err(FramedError::Truncated);
            }
            let len = frame::body_len(prefix)?;
            let mut body = vec![0u8; len];
            if !self.fill(&mut body).await? && len > 0 {
                return Err(FramedError::Truncated);
            }
            Ok(body)
        };
        let body = tokio::time::timeout(limit, rest).await.map_err(|_| FramedError::TooSlow { limit })??;
        Ok(Some(frame::decode_body(&body)?))
    }

    /// Reads the next message, treating the end of the stream as an error.
    pub async fn expect<T: DeserializeOwned>(&mut self) -> Result<T, FramedError> {
        self.recv().await?.ok_or(FramedError::Truncated)
    }

    /// Reads a [`PackHeader`] and the pack it announces, refusing packs over `limit` bytes.
    pub async fn recv_pack(&mut self, limit: u64) -> Result<Vec<u8>, FramedError> {
        let header: PackHeader = self.expect().await?;
        if header.len > limit {
            return Err(FramedError::PackTooLarge { len: header.len, limit });
        }
        let limit = self.1 + Duration::from_secs(header.len / PACK_BYTES_PER_SECOND);
        let read = async {
            // Grow as bytes arrive instead of trusting the announced size up front.
            let mut pack = Vec::with_capacity(header.len.min(1 << 20) as usize);
            let mut chunk = vec![0u8; 64 * 1024];
            while (pack.len() as u64) < header.len {
                let want = ((header.len - pack.len() as u64) as usize).min(chunk.len());
                match self.0.read(&mut chunk[..want]).await? {
                    Some(n) => pack.extend_from_slice(&chunk[..n]),
                    None => return Err(FramedError::Truncated),
                }
            }
            Ok(pack)
        };
        tokio::time::timeout(limit, read).await.map_err(|_| FramedError::TooSlow { limit })?
    }
}
