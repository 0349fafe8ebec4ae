//! The frame codec: a 4-byte big-endian length, then that many bytes of a
//! postcard-encoded message.
//!
//! Frames are capped at [`MAX_FRAME_LEN`]; the length is checked before any
//! buffer is allocated, so a hostile length prefix costs nothing. Decoding
//! never panics: truncated, oversized and garbage input all come back as a
//! [`FrameError`].

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The largest frame body accepted or sent: 1 MiB. Messages are small; bulk
/// data (git packs) travels outside frames.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than [`MAX_FRAME_LEN`] bytes.
    #[error("frame of {len} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge {
        /// The announced or attempted length.
        len: usize,
    },
    /// The input ended inside a frame.
    #[error("frame truncated: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the frame needs.
        expected: usize,
        /// Bytes available.
        got: usize,
    },
    /// The body is not a valid message of the expected type.
    #[error("malformed frame body")]
    Malformed(#[source] postcard::Error),
    /// Bytes were left over after the message.
    #[error("{0} unexpected trailing bytes in frame body")]
    Trailing(usize),
}

/// Encodes `msg` as one frame: length prefix and body.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; 4]).map_err(FrameError::Malformed)?;
    let len = out.len() - 4;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    // `len` fits in u32: it is at most MAX_FRAME_LEN.
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads a length prefix and checks it against the limit.
pub fn body_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

/// Decodes a frame body (without its prefix) as a `T`.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(msg)
}

/// Decodes one whole frame (prefix and body) from the start of `buf`, and
/// returns the message and the number of bytes used.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<(T, usize), FrameError> {
    let Some(prefix) = buf.first_chunk::<4>() else {
        return Err(FrameError::Truncated { expected: 4, got: buf.len() });
    };
    let len = body_len(*prefix)?;
    let body = &buf[4..];
    if body.len() < len {
        return Err(FrameError::Truncated { expected: len, got: body.len() });
    }
    Ok((decode_body(&body[..len])?, 4 + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CommitId, Outcome, TestResult};
    use crate::wire::{Held, JobEvent, Registration, Request};

    fn commit() -> CommitId {
        "0123456789abcdef0123456789abcdef01234567".parse().unwrap()
    }

    #[test]
    fn round_trips() {
        let req = Request::FetchSource { lease: Held { job: 3, attempt: 2 }, commit: commit(), haves: vec![commit()] };
        let bytes = encode(&req).unwrap();
        let (back, used) = decode::<Request>(&bytes).unwrap();
        assert_eq!(back, req);
        assert_eq!(used, bytes.len());

        let ev = JobEvent::Test(TestResult {
            id: "tests.test_a.A.test_x".into(),
            file: "tests/test_a.py".into(),
            outcome: Outcome::Xfail,
            duration_ms: 7,
            message: "ünïcode ✓".into(),
            runner: Some("runner-1".into()),
            flaky: false,
            earlier: Vec::new(),
            python: Some("3.12".into()),
        });
        assert_eq!(decode::<JobEvent>(&encode(&ev).unwrap()).unwrap().0, ev);
    }

    #[test]
    fn reports_round_trip() {
        use crate::model::{CommitReport, CommitStatus, Counts};
        use crate::wire::Reply;
        let report = CommitReport {
            commit: commit(),
            repo: "/srv/repo".into(),
            branch: "main".into(),
            status: CommitStatus::Failed,
            counts: Counts { total: 1, fail: 1, ..Counts::default() },
            error: None,
            runner: Some("runner-1".into()),
            warnings: vec!["network isolation: NO".into()],
            queued_at_ms: 5,
            finished_at_ms: None,
            files: crate::model::FileCounts { total: 2, done: 1 },
            tests: vec![TestResult::new("t".into(), "tests/test_t.py".into(), Outcome::Fail, 3, "boom".into())],
        };
        let reply = Reply::Report(Some(Box::new(report)));
        assert_eq!(decode::<Reply>(&encode(&reply).unwrap()).unwrap().0, reply);
    }

    #[test]
    fn oversized_prefix_is_rejected_before_reading_the_body() {
        let err = decode::<Request>(&[0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len } if len == u32::MAX as usize), "{err}");
        let err = body_len(((MAX_FRAME_LEN + 1) as u32).to_be_bytes()).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        assert_eq!(body_len((MAX_FRAME_LEN as u32).to_be_bytes()).unwrap(), MAX_FRAME_LEN);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let bytes = encode(&Request::GetResults { commit: Some(commit()) }).unwrap();
        for cut in 0..bytes.len() {
            assert!(decode::<Request>(&bytes[..cut]).is_err(), "cut at {cut} decoded");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        // A cheap deterministic generator: every input must decode or fail
        // cleanly, never panic or allocate wildly.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 64) as usize;
            let mut buf = (len as u32).to_be_bytes().to_vec();
            let mut s = state;
            for _ in 0..len {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                buf.push((s >> 56) as u8);
            }
            let _ = decode::<Request>(&buf);
            let _ = decode::<JobEvent>(&buf);
        }
        // An unknown enum tag, and a valid message followed by junk.
        assert!(matches!(decode_body::<Request>(&[200]), Err(FrameError::Malformed(_))));
        let mut body =
            encode(&Request::Register(Registration { slots: 1, held: vec![], sandbox_gaps: vec![], pythons: vec![] }))
                .unwrap()[4..]
                .to_vec();
        body.push(0);
        assert!(matches!(decode_body::<Request>(&body), Err(FrameError::Trailing(1))));
    }
}
