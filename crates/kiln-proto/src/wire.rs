//! The messages Kiln peers exchange over QUIC streams.
//!
//! Every stream starts with one frame from the side that opened it: a
//! [`Request`] when a client (runner, observer, admin) opens it, an
//! [`Assignment`] when the dispatcher opens it to hand a runner work. What
//! follows on the stream depends on that first frame and is documented on
//! each variant. Each frame carries exactly one of these types; which one is
//! fixed by the position in the exchange, so a peer never has to guess.

use serde::{Deserialize, Serialize};

use crate::model::{CommitId, CommitReport, FlakyTest, TestResult, TestRun};

/// The ALPN protocol name: the version of this wire protocol. A peer speaking
/// another version fails the TLS handshake instead of misreading frames.
/// Version 2: `FetchSource` carries the lease, and `Reply::NameInUse`.
/// Version 3: the interpreter matrix (`Registration::pythons`,
/// `Assignment::python`, `TestResult::python`), which a version 2 peer
/// would misread as a malformed frame.
pub const ALPN: &[u8] = b"kiln/3";

/// Earlier versions of this protocol. Both sides offer them at the handshake
/// after [`ALPN`], never to speak them: a peer that picks one is closed with
/// a message naming both versions, instead of failing as a bare TLS alert.
pub const OLDER_ALPNS: &[&[u8]] = &[b"kiln/2", b"kiln/1"];

/// [`ALPN`] followed by [`OLDER_ALPNS`]: what a Kiln peer offers.
pub fn offered_alpns() -> Vec<Vec<u8>> {
    std::iter::once(ALPN).chain(OLDER_ALPNS.iter().copied()).map(<[u8]>::to_vec).collect()
}

/// The first frame on a stream a client opens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Runner: register for work. The stream then stays open as the runner's
    /// control stream; the dispatcher answers [`Reply::Registered`] and the
    /// runner's assignments arrive on streams the dispatcher opens.
    Register(Registration),
    /// Runner: carry on reporting an assignment begun on an earlier
    /// connection. The dispatcher answers [`Reply::Resumed`] if the lease is
    /// still this runner's (then the stream continues like an assignment
    /// stream after its [`Assignment`] frame) or [`Reply::Refused`], and the
    /// runner drops the job.
    Resume(Held),
    /// Observer: a branch of a repository points at a new commit. The
    /// dispatcher answers [`Reply::Known`] if it has the commit already, or
    /// [`Reply::SendPack`]; then the observer sends a [`PackHeader`] frame and
    /// that many bytes of git pack, and the dispatcher answers
    /// [`Reply::Queued`].
    Submit {
        /// The repository, as the observer names it (a path or URL).
        repo: String,
        /// The branch.
        branch: String,
        /// The commit at the branch's head.
        commit: CommitId,
        /// What happens to older commits of the same branch.
        supersede: Supersede,
    },
    /// Observer: the newest commit the dispatcher has of a branch, so an
    /// observer in `every` mode can submit what appeared while it was down.
    /// The dispatcher answers [`Reply::Tip`].
    BranchTip {
        /// The repository, as the observer names it.
        repo: String,
        /// The branch.
        branch: String,
    },
    /// Runner: send me the source of `commit`, which I am to test under
    /// `lease`. The dispatcher answers [`Reply::Source`], a [`PackHeader`]
    /// frame and that many bytes of git pack holding the objects reachable
    /// from `commit` and not from `haves`, but only if this connection holds
    /// `lease` and it is a lease on `commit`; otherwise [`Reply::Refused`],
    /// and the connection is closed as unauthorized (unless the lease was
    /// this runner's and has just ended, say by a cancellation).
    FetchSource {
        /// The assignment (job and attempt, the fencing token) the source is for.
        lease: Held,
        /// The commit wanted.
        commit: CommitId,
        /// Commits the runner has already, so the pack can leave them out.
        haves: Vec<CommitId>,
    },
    /// Admin: the report for `commit`, or for the newest commit when `None`.
    /// The dispatcher answers [`Reply::Report`].
    GetResults {
        /// Which commit.
        commit: Option<CommitId>,
    },
    /// Admin: stop testing `commit`. Queued work is dropped, running tests
    /// are killed, and the commit ends as `cancelled`. The dispatcher answers
    /// [`Reply::Cancelled`].
    Cancel {
        /// Which commit.
        commit: CommitId,
    },
    /// Admin: the commits the dispatcher knows whose id starts with
    /// `prefix` (at most [`MAX_RESOLVED`] of them), so a person can type
    /// `bba85f8`. The dispatcher answers [`Reply::Resolved`].
    Resolve {
        /// The digits typed.
        prefix: crate::CommitPrefix,
    },
    // New variants go last: postcard numbers them in order.
    /// Admin: the runs of one test on the newest commits that ran it
    /// (at most [`MAX_HISTORY`]). The dispatcher answers [`Reply::History`].
    History {
        /// The test's id.
        test: String,
        /// Only this repository's commits, as its observer names it.
        repo: Option<String>,
        /// How many runs at most.
        limit: u32,
    },
    /// Admin: the tests flaky on some commit queued in the last `days` days
    /// (at most [`MAX_FLAKY`]). The dispatcher answers [`Reply::Flaky`].
    Flaky {
        /// How far back to look.
        days: u32,
    },
    /// Admin: the connected runners, what waits and why, and the newest
    /// `commits` commits (at most [`crate::status::MAX_STATUS_COMMITS`]), for
    /// `kiln status` and `kiln runners`. The dispatcher answers [`Reply::Status`].
    Status {
        /// How many of the newest commits.
        commits: u32,
    },
}

/// The most commits a [`Reply::Resolved`] lists: enough to show a prefix is ambiguous.
pub const MAX_RESOLVED: usize = 10;
/// The most runs a [`Reply::History`] lists.
pub const MAX_HISTORY: usize = 100;
/// The most tests a [`Reply::Flaky`] lists (each with a sample message of at
/// most [`crate::model::MAX_SAMPLE_BYTES`]), so that the reply fits a frame.
pub const MAX_FLAKY: usize = 100;

/// What a runner says when it registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// How many test files the runner runs at once, over all its batches.
    pub slots: u32,
    /// Assignments the runner is still working on from an earlier
    /// connection (say, before a dispatcher restart). The dispatcher
    /// keeps the ones whose lease is still this runner's; the runner then
    /// sends [`Request::Resume`] for each.
    pub held: Vec<Held>,
    /// What the runner's process sandbox lacks on its machine, in words
    /// (empty when complete). Stored with every commit the runner tests,
    /// so results never hide a weaker sandbox.
    pub sandbox_gaps: Vec<String>,
    /// The Python interpreters the runner has, by exact version
    /// (`3.12.7`), found at start-up (`kiln runner --python`). A commit
    /// whose configuration asks for Python 3.12 is tested here only if one
    /// of these is a 3.12.
    pub pythons: Vec<String>,
}

/// An assignment a runner holds: the job and the attempt (fencing token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// The job.
    pub job: u64,
    /// The attempt the runner was given.
    pub attempt: u32,
}

/// What a new commit means for older commits of the same branch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Supersede {
    /// Nothing: every commit is tested (`kiln observer --mode every`).
    Nothing,
    /// Older commits still queued are skipped; running ones finish.
    SkipQueued,
    /// Older commits still queued are skipped and running ones cancelled
    /// (`--mode latest`, the default).
    CancelRunning,
}

/// The dispatcher's answer to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The runner is registered under the name in its certificate.
    Registered {
        /// How long the dispatcher lets a connection be silent (ms). A
        /// runner whose keep-alives are sparser than a third of it
        /// reconnects with keep-alives that often.
        idle_timeout_ms: u64,
    },
    /// The commit was submitted before; nothing more to do.
    Known,
    /// The dispatcher lacks the commit: send a pack leaving out `haves`.
    SendPack {
        /// Commits the dispatcher's mirror has.
        haves: Vec<CommitId>,
    },
    /// The commit is stored and queued for testing.
    Queued,
    /// A [`PackHeader`] and the pack it announces follow.
    Source,
    /// The newest commit the dispatcher has of the branch asked about.
    Tip(Option<CommitId>),
    /// Whether the commit was still being tested and is now cancelled.
    Cancelled(bool),
    /// The lease is still the runner's: send the job's events on this stream.
    Resumed,
    /// A commit's report, or `None` if the dispatcher knows no such commit.
    Report(Option<Box<CommitReport>>),
    /// The request was refused; the stream ends after this.
    Refused(String),
    /// Registration refused: another live connection is registered under
    /// this runner's name (two runners share one certificate). The
    /// dispatcher closes this connection; the runner backs off and tries
    /// again, and gets the name once the other connection is gone.
    NameInUse(NameInUse),
    // New variants go last: postcard numbers them in order.
    /// The commits matching a [`Request::Resolve`] prefix, sorted: none,
    /// one, or (ambiguous) up to [`MAX_RESOLVED`].
    Resolved(Vec<CommitId>),
    /// The dispatcher cannot take this now (it could not store it: a full
    /// disk, say); nothing was changed. Ask again later.
    Unavailable(String),
    /// A test's runs, newest first (see [`Request::History`]).
    History(Vec<TestRun>),
    /// Flaky tests, most often flaky first (see [`Request::Flaky`]).
    Flaky(Vec<FlakyTest>),
    /// The dispatcher now (see [`Request::Status`]).
    Status(Box<crate::Status>),
}

/// Who holds a runner name that a second connection asked for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameInUse {
    /// The runner name (the certificate's common name).
    pub name: String,
    /// When the holding connection registered (Unix ms).
    pub since_unix_ms: u64,
    /// The holding connection's remote address.
    pub address: String,
}

/// Announces `len` bytes of git pack that follow on the stream, outside any
/// frame, so a large pack is never one giant frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackHeader {
    /// The pack's size in bytes.
    pub len: u64,
}

/// The first frame on a stream the dispatcher opens to a runner: run the tests
/// of a commit. The runner then sends [`JobEvent`]s on the same stream, ending
/// with [`JobEvent::Finished`] or [`JobEvent::Abandoned`]; the dispatcher may
/// send one [`Control`] frame after the assignment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The job's id, unique within the dispatcher.
    pub job: u64,
    /// The lease's attempt number (a fencing token): the dispatcher accepts
    /// events only for the current attempt of a job.
    pub attempt: u32,
    /// The commit to test.
    pub commit: CommitId,
    /// The batch: the test files to run, repository-relative. The runner
    /// checks out the whole commit (a framework may need its package
    /// layout) and runs only these, reporting [`JobEvent::FileDone`] or
    /// [`JobEvent::NotRun`] for each.
    pub files: Vec<String>,
    /// How many of the runner's slots this batch may use: how many of its
    /// files may run at once. The dispatcher never hands a runner more
    /// slots, over all its batches, than it registered.
    pub slots: u32,
    /// The repository's configuration for this commit (`kiln.toml` or
    /// `[tool.kiln]`, validated by the dispatcher), or `None` when the
    /// commit has none (and on a resumed stream, where only the lease matters).
    pub config: Option<crate::RepoConfig>,
    /// The Python version the batch is for, when the commit's configuration
    /// asks for several (`[python] versions`): the runner runs the files
    /// (and builds their environment) with its interpreter of that version.
    /// `None`: the runner's default `python3`.
    pub python: Option<String>,
}

/// What a runner reports about an assignment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobEvent {
    /// One test finished.
    Test(TestResult),
    /// Every test of this file has been reported.
    FileDone {
        /// The repository-relative path.
        file: String,
    },
    /// The job is over. `error` says why it could not run, if it could not.
    Finished {
        /// Why the job could not run at all.
        error: Option<String>,
    },
    /// Something the commit's report should say once, such as symlinks under
    /// `tests/` that were not followed. Kept in the report's `warnings`.
    Warning(String),
    /// The runner gives the job back unfinished (it is shutting down); the
    /// dispatcher hands what is left to another runner at once.
    Abandoned {
        /// Why.
        reason: String,
    }, // New variants go last: postcard numbers them in order.
    /// A file of the batch that was not run: no plugin claims it, or it is
    /// not a regular file in the checkout. Reported, never dropped: the
    /// dispatcher counts it as done and names it in the report's warnings.
    NotRun {
        /// The repository-relative path.
        file: String,
        /// Why, as a fragment: "no plugin claims it".
        reason: String,
    },
}

/// The dispatcher's word to a runner about a running assignment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Stop: kill the tests and answer [`JobEvent::Finished`].
    Cancel {
        /// Why, for the runner's log.
        reason: String,
    },
}
