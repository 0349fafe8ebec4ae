//! Kiln's shared vocabulary, with no I/O: the domain types every process
//! agrees on ([`model`]), the messages peers exchange ([`wire`]) and the
//! length-prefixed frame codec that carries them ([`frame`]).
//!
//! Keeping these free of sockets and files means the protocol can be tested
//! as plain data in, data out, and every process links the same definitions.

pub mod escape;
pub mod frame;
pub mod junit;
pub mod model;
pub mod repo_config;
pub mod size;
pub mod status;
pub mod wire;

pub use escape::{Escaped, escaped, for_terminal};
pub use frame::{FrameError, MAX_FRAME_LEN};
pub use junit::junit;
pub use model::{
    CommitId, CommitPrefix, CommitReport, CommitStatus, Counts, EarlierRun, FileCounts, FlakyRule, FlakyTest, Flip,
    MAX_TEST_ID_BYTES, MAX_TEST_MESSAGE_BYTES, Outcome, Role, TestResult, TestRun, TreeId,
};
pub use repo_config::RepoConfig;
pub use size::ByteSize;
pub use status::Status;

/// Formats an error with its chain of causes, as `a: b: c`, for log lines
/// and messages that must name the root cause.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
