//! The storage contract: what the dispatcher's core asks of durable state,
//! and nothing about how it is kept. The core computes each event's
//! [`Changes`] without I/O and hands them to a [`Store`], which applies all
//! of them in one transaction or none; only then does anyone hear of them.
//!
//! The SQLite implementation is [`crate::db::Db`]; a PostgreSQL one needs
//! only this trait, no change to the state machine. The same changes,
//! stored, are what subscribers receive (see [`crate::stream`]).

use kiln_proto::{CommitId, CommitStatus, TestResult};

use crate::state::CommitEntry;

/// A commit's row: everything about it but its results and finished files.
/// Small, so that publishing a status change never copies a whole report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitRow {
    /// The commit.
    pub commit: CommitId,
    /// Its repository, as the observer names it.
    pub repo: String,
    /// Its branch.
    pub branch: String,
    /// Submission order, unique and increasing.
    pub seq: u64,
    /// Where testing stands.
    pub status: CommitStatus,
    /// Why testing could not run or was stopped.
    pub error: Option<String>,
    /// The runners that ran (or run) its batches, as `a, b`.
    pub runner: Option<String>,
    /// What the results should be read with.
    pub warnings: Vec<String>,
    /// When it was queued (Unix ms).
    pub queued_at_ms: u64,
    /// When it reached a final status (Unix ms).
    pub finished_at_ms: Option<u64>,
    /// Its tree, read from the mirror at submission (`None` if stored before trees were).
    pub tree: Option<kiln_proto::TreeId>,
    /// The commit's own job id.
    pub job: u64,
    /// How many batches it was given out in.
    pub attempt: u32,
}

/// A running batch, as stored: so that a restarted dispatcher knows which
/// files are leased to whom, and the runner can claim its batch back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRow {
    /// The batch's job id.
    pub job: u64,
    /// Its commit.
    pub commit: CommitId,
    /// Its attempt number (with `job`, the fencing token).
    pub attempt: u32,
    /// The runner holding it.
    pub runner: String,
    /// The runner's slots it may use.
    pub slots: u32,
    /// Its files (units: see [`crate::state::unit`]).
    pub files: Vec<String>,
    /// The Python version of its units, with a matrix.
    pub python: Option<String>,
}

/// One durable change. The variants are facts, written so that applying
/// one twice changes nothing (a row or a result is replaced, a file is kept
/// at its first value), which is what lets a lagging subscriber replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A commit was queued, started, requeued, warned about or ended: its row now.
    Commit(CommitRow),
    /// A test's result: recorded once per commit, and replaced when a later
    /// run of its file changes it (`--retry-failed`).
    Test {
        /// The commit.
        commit: CommitId,
        /// The result.
        result: TestResult,
    },
    /// A file was queued again because some of its tests failed
    /// (`--retry-failed`): how many times so far.
    Retry {
        /// The commit.
        commit: CommitId,
        /// The file.
        file: String,
        /// How many times it has been queued again.
        retries: u32,
    },
    /// Every test of a file has been reported.
    FileDone {
        /// The commit.
        commit: CommitId,
        /// The file.
        file: String,
    },
    /// The test files a new commit is split into, listed at submission.
    Files {
        /// The commit.
        commit: CommitId,
        /// Its files under `tests/`.
        files: Vec<String>,
    },
    /// A batch was leased to a runner.
    Batch(BatchRow),
    /// A batch ended (finished, given back, lost or stopped).
    BatchEnded {
        /// The batch's job id.
        job: u64,
    },
    /// A repository now belongs to an observer (its first submitter).
    Owner {
        /// The repository.
        repo: String,
        /// The observer's name.
        observer: String,
        /// When it was bound (Unix ms).
        at_ms: u64,
    },
}

/// The changes of one event, in the order they must be applied.
pub type Changes = Vec<Change>;

/// Why a store could not apply or load.
#[derive(Debug, thiserror::Error)]
#[error("{action} in the state database")]
pub struct StoreError {
    /// What was being done, as a fragment: "store 3 changes".
    pub action: String,
    /// The cause.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Durable state, as the dispatcher's core uses it.
pub trait Store: Send {
    /// Applies `changes` in one transaction: all of them, or none and an error.
    fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError>;
    /// Every commit, with its results and finished files, in submission order.
    fn load(&mut self) -> Result<Vec<CommitEntry>, StoreError>;
    /// Every repository's owner.
    fn load_owners(&mut self) -> Result<Vec<(String, String)>, StoreError>;
}
