//! The dispatcher's bookkeeping as a plain state machine: commits, the
//! batches they are split into and their leases, the queue, and runners'
//! free slots. No I/O happens here, so every scheduling and fencing
//! decision is tested as data in, data out.
//!
//! Between [`State::begin`] and [`State::commit`] every change is journalled:
//! [`State::changes`] says what must be stored, and [`State::rollback`] puts
//! the state back exactly as it was when storing them failed, so memory never
//! runs ahead of disk. The journal keeps pre-images of only what an event
//! touched (a commit's row, queue and batches, never its results or file
//! list), so recording one test costs the same however many the commit has.
//!
//! **Splitting.** A commit arrives with the test files the dispatcher listed
//! from its mirror. They wait in the commit's `pending` list, longest first
//! by their duration in earlier commits of the repository (the sum of their
//! tests' `duration_ms`; a file never seen gets the median of the known
//! ones, or [`DEFAULT_ESTIMATE_MS`]). Whenever a runner has free slots it is
//! handed a batch cut from the front of the oldest queued commit: its share
//! of the commit's work left (pending and still running), `free / all
//! slots`, divided by how far the estimates can be trusted (at least one
//! file): by 2 when some are guesses, by `1 + 3 × spread` when each file
//! was measured twice (the spread being how much durations moved between
//! the two), by 1.3 when once; not divided once a slot's even share of what
//! is left is at most [`TAIL_MS`] (the tail, taken in one round). This is
//! factoring (Hummel, Schonberg and Flynn, 1992): batches shrink as the
//! queue drains so every runner ends at about the same time, and the better
//! the estimates, the fewer batches (each costs its runner a sandbox and an
//! interpreter). A batch may use `min(free, files)`
//! of the runner's slots, so a runner never has more files running than it
//! registered slots, over all its batches.
//!
//! **The interpreter matrix.** A commit whose configuration asks for
//! several Python versions (`[python] versions`) is split into *units*:
//! each test file once per version ([`unit`]: `3.12:tests/test_a.py`; a
//! commit without a matrix has one unit per file, spelled as the file).
//! Everything below that speaks of files speaks of units. A batch holds
//! units of one version and goes only to a runner that registered an
//! interpreter of that version (`3.12` is served by `3.12.7`); a unit
//! that no registered runner can serve waits, and its commit with it,
//! without holding up the commits behind it. A result keeps its version
//! (`TestResult::python`), and the commit's results are keyed by
//! (version, test id) ([`TestResult::key`]).
//!
//! Invariants (checked by the randomized test below):
//! - a file of a commit that is not final is pending, or in exactly one
//!   batch, or done; never pending and leased, never in two batches;
//! - a commit is queued iff it has pending files and no batch, running iff
//!   it has a batch; it is in the queue once iff it has pending files;
//! - each batch is a lease with a fencing token (its own job id and an
//!   attempt number); an event is accepted only from the connection holding
//!   it, and only about the batch's own files, so a late or replaced runner
//!   can never overwrite newer work; a lease restored after a restart
//!   belongs to no connection until its runner claims it when it registers;
//! - a runner's batches use at most its slots;
//! - a batch's units all have its version, and a batch with a version is
//!   leased only to a runner that has an interpreter of that version;
//! - a result's version is its batch's, and it is stored under its key;
//! - a test id is recorded at most once per commit (first result wins), and
//!   a done file is never handed out again; a commit that passed or failed
//!   has every file done;
//! - a commit's source goes only to a connection holding a lease on it;
//! - a repository belongs to one observer identity (the first to submit it,
//!   unless the operator named its owner); no other identity submits to it,
//!   reads its branch tips or supersedes its commits;
//! - a new commit supersedes an older one only if it descends from it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::store::{BatchRow, Change, CommitRow};

use kiln_proto::wire::{Assignment, Held, Supersede};
use kiln_proto::{CommitId, CommitPrefix, CommitReport, CommitStatus, Counts, FileCounts, TestResult, TreeId, escaped};

/// A connection's stable id: a runner that reconnects gets a new one.
pub type ConnId = usize;

/// What a file never seen before is expected to take when no file of the
/// repository has a known duration.
pub const DEFAULT_ESTIMATE_MS: u64 = 1_000;

/// At most this many files in one batch, so an assignment stays far below
/// the frame size limit whatever the estimates say.
pub const MAX_BATCH_FILES: usize = 500;

/// The least estimated test time a batch is cut for while others share the
/// work: below it, a batch's fixed cost (a checkout, a sandbox, an
/// interpreter: some 50–100 ms) outweighs the balance it buys.
pub const MIN_BATCH_MS: u64 = 500;

/// When a slot's even share of a commit's work left (pending and running)
/// is at most this, a batch is that share whole, not divided: what is left
/// is too little to hedge, as cutting it smaller would only make batches
/// near [`MIN_BATCH_MS`], each paying a batch's start-up. In the model of
/// the rule (`benches/split_model.py`) it was better on average at every
/// divisor above 1 and every noise level tried (at 1 it changes nothing),
/// and with the measured-once divisor no worse in the worst case.
pub const TAIL_MS: u64 = 3 * MIN_BATCH_MS;

/// The batch divisor (in thousandths) when some estimate is a guess: half
/// an even share, so a wrong guess leaves room to rebalance.
pub(crate) const GUESSED_DIVISOR: u64 = 2_000;

/// The batch divisor (in thousandths) when every file was measured once:
/// how much its duration varies is not known yet, so as if by a tenth
/// (`1 + 3 × 0.1`), which `benches/split_model.py` found the safest guess:
/// within 21 % of the ideal on average whether durations vary by nothing,
/// a tenth or a quarter.
const MEASURED_ONCE_DIVISOR: u64 = 1_300;

/// How many earlier commits of a repository are read for file durations.
const HISTORY: usize = 20;

/// The unit of work for `file` under Python `python`: the file itself
/// without a matrix, else `VERSION:FILE`. Unambiguous, because listed
/// files start with `tests/` and versions hold only digits and dots.
pub fn unit(python: Option<&str>, file: &str) -> String {
    match python {
        Some(version) => format!("{version}:{file}"),
        None => file.to_owned(),
    }
}

/// The units a commit with test files `files` is split into under the
/// matrix `versions`: each file once per version, or once when there is no
/// matrix.
pub fn units(files: &[String], versions: &[String]) -> Vec<String> {
    if versions.is_empty() {
        return files.to_vec();
    }
    versions.iter().flat_map(|v| files.iter().map(move |f| unit(Some(v), f))).collect()
}

/// A unit's Python version (if it has one) and its file.
pub fn split_unit(unit: &str) -> (Option<&str>, &str) {
    match unit.split_once(':') {
        Some((version, file)) if !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit() || b == b'.') => {
            (Some(version), file)
        }
        _ => (None, unit),
    }
}

/// A unit as people read it: `tests/test_a.py`, or `tests/test_a.py (Python 3.12)`.
pub fn unit_label(unit: &str) -> String {
    match split_unit(unit) {
        (Some(version), file) => format!("{file} (Python {version})"),
        (None, file) => file.to_owned(),
    }
}

/// Whether an interpreter of exact version `exact` (`3.12.7`) serves a
/// matrix entry `wanted` (`3.12`, or `3.12.7`): `wanted`'s parts are its first.
pub fn python_matches(wanted: &str, exact: &str) -> bool {
    let (mut w, mut e) = (wanted.split('.'), exact.split('.'));
    w.all(|part| e.next() == Some(part))
}

/// Who holds a batch's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The runner's name.
    pub runner: String,
    /// Its connection; `None` for a lease restored after a dispatcher
    /// restart, until its runner reconnects and claims it (or the grace
    /// period ends and its unfinished files are queued again).
    pub conn: Option<ConnId>,
}

/// Some of a commit's files, leased to one runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The batch's own job id: with `attempt`, the fencing token.
    pub job: u64,
    /// The commit's batch counter when this batch was cut.
    pub attempt: u32,
    /// The files to run.
    pub files: Vec<String>,
    /// How many of the runner's slots it may use.
    pub slots: u32,
    /// Who holds it.
    pub lease: Lease,
    /// The Python version of its units (they all have the same), if the
    /// commit has a matrix.
    pub python: Option<String>,
}

/// A commit's files' expected durations, and how far to trust them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimates {
    /// Each file's expected duration (ms).
    pub files: BTreeMap<String, u64>,
    /// What an even share of the work left is divided by to cut a batch,
    /// in thousandths: [`GUESSED_DIVISOR`] when some file was never
    /// measured, [`MEASURED_ONCE_DIVISOR`] when each was measured once, else
    /// `1 + 3 × spread` (capped at the guessed divisor), the spread being
    /// how much the files measured twice moved between the two runs,
    /// relative to the older one.
    pub divisor: u64,
}

/// Everything about one commit; also the persisted form (see `db`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitEntry {
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
    /// The runners that ran (or run) some of its files.
    pub runners: BTreeSet<String>,
    /// What the results should be read with (the runners' sandbox gaps,
    /// files that were not run).
    pub warnings: Vec<String>,
    /// When it was queued (Unix ms).
    pub queued_at_ms: u64,
    /// When it reached a final status (Unix ms).
    pub finished_at_ms: Option<u64>,
    /// Its tree, read from the mirror at submission (`None` if stored
    /// before trees were): commits with the same tree hold the same code.
    pub tree: Option<TreeId>,
    /// The commit's own id among jobs (batches get theirs).
    pub job: u64,
    /// Batches cut so far: the last batch's attempt number.
    pub attempt: u32,
    /// Every test file listed at submission, with its estimated duration (ms).
    pub files: BTreeMap<String, u64>,
    /// Units waiting for a runner, longest first.
    pub pending: VecDeque<String>,
    /// The estimated time of the pending files (ms): kept as they come and
    /// go, so that cutting a batch does not add up the whole queue.
    pub(crate) pending_ms: u64,
    /// The estimated time of the done files, and of all of them (ms): with
    /// `pending_ms`, what the running batches have left.
    pub(crate) done_ms: u64,
    pub(crate) total_ms: u64,
    /// What an even share of the work left is divided by to cut a batch, in
    /// thousandths (see [`Estimates::divisor`]); recomputed, not stored.
    pub(crate) divisor: u64,
    /// Batches running now, by job id.
    pub batches: BTreeMap<u64, Batch>,
    /// Results so far, by test id.
    pub tests: BTreeMap<String, TestResult>,
    /// Files whose every test has been reported (or that were not run, and said so).
    pub done_files: BTreeSet<String>,
    /// Files queued again because a test failed (`--retry-failed`): how many times.
    pub retries: BTreeMap<String, u32>,
    /// Files queued again, and the runner they failed on: another runner
    /// gets them when one has a free slot. Not stored: only a preference.
    pub avoid: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Runner {
    conn: ConnId,
    slots: u32,
    /// Its batches, with the slots each uses.
    jobs: BTreeMap<u64, u32>,
    /// What its sandbox lacks, copied into each commit it runs.
    sandbox_gaps: Vec<String>,
    /// The exact versions of its Python interpreters.
    pythons: Vec<String>,
}

impl Runner {
    fn free(&self) -> u32 {
        self.slots.saturating_sub(self.jobs.values().sum())
    }

    /// Whether it can run `unit`: any runner can run a unit without a
    /// version; one with a version needs an interpreter of that version.
    fn serves(&self, unit: &str) -> bool {
        match split_unit(unit).0 {
            None => true,
            Some(wanted) => self.serves_version(wanted),
        }
    }

    /// Whether it has an interpreter of version `wanted`.
    fn serves_version(&self, wanted: &str) -> bool {
        self.pythons.iter().any(|exact| python_matches(wanted, exact))
    }

    /// Whether it can run one of the units whose versions are `versions`.
    fn serves_any(&self, versions: &Versions<'_>) -> bool {
        match versions {
            Versions::None => false,
            Versions::Any => true,
            Versions::Some(vs) => vs.iter().any(|v| self.serves_version(v)),
        }
    }
}

/// The Python versions a commit's waiting units need.
enum Versions<'a> {
    /// Nothing waits.
    None,
    /// A unit without a version waits: any runner can take it.
    Any,
    /// Only units with these versions wait (the matrix).
    Some(Vec<&'a str>),
}

/// What `e`'s waiting units need: one pass over them, stopping at the
/// first unit without a version (a commit without a matrix has only those).
fn pending_versions(e: &CommitEntry) -> Versions<'_> {
    let mut versions: Vec<&str> = Vec::new();
    for u in &e.pending {
        match split_unit(u).0 {
            None => return Versions::Any,
            Some(v) if !versions.contains(&v) => versions.push(v),
            Some(_) => {}
        }
    }
    if versions.is_empty() { Versions::None } else { Versions::Some(versions) }
}

/// Why an event from a runner was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    /// No such job.
    #[error("job {0} does not exist")]
    UnknownJob(u64),
    /// The job is held by another attempt or connection, or has ended.
    #[error("job {job} attempt {attempt} is not this connection's current lease")]
    NotCurrent {
        /// The job.
        job: u64,
        /// The attempt the event claimed.
        attempt: u32,
    },
    /// The file is not one of the batch's.
    #[error("file {} is not in job {job}'s batch", escaped(.file))]
    NotInBatch {
        /// The job.
        job: u64,
        /// The file the event named.
        file: String,
    },
}

/// A batch handed to a runner connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// The runner's name.
    pub runner: String,
    /// Its connection.
    pub conn: ConnId,
    /// What to tell it.
    pub assignment: Assignment,
}

/// A commit that was stopped: the runners of its running batches must be
/// told to kill them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stopped {
    /// The commit.
    pub commit: CommitId,
    /// Its batches that were running: job and connection (none for a
    /// restored lease nobody claimed).
    pub batches: Vec<(u64, Option<ConnId>)>,
}

/// What one event changed, to store it or to undo it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Journal {
    /// When the event happened (Unix ms), for the rows that record it.
    now_ms: u64,
    /// Each touched commit as it was before, without results or files;
    /// `None` for a commit this event created.
    before: BTreeMap<CommitId, Option<CommitEntry>>,
    /// Results this event recorded, each with the one it replaced.
    tests: Vec<(CommitId, String, Option<TestResult>)>,
    /// Files this event queued again for a retry.
    retried: Vec<(CommitId, String)>,
    /// Files this event finished.
    done_files: Vec<(CommitId, String)>,
    /// Job ids this event gave out (to forget them again on rollback).
    new_jobs: Vec<u64>,
    /// Repositories this event bound to an observer.
    owners: Vec<String>,
    /// The queue before the event, if it changed it.
    queue: Option<VecDeque<CommitId>>,
    /// Each runner the event changed, as it was (`None`: it was not
    /// registered): only those, so an event costs the same however many
    /// runners there are.
    runners: BTreeMap<String, Option<Runner>>,
    /// How to undo the event's changes to commits' pending files, in order:
    /// the pending list is not part of a commit's pre-image, since copying
    /// a 20,000-file queue for every batch cut from it would make cutting
    /// them quadratic.
    pending: Vec<(CommitId, PendingUndo)>,
    /// Each batch the event added, ended or moved, as it was (`None`: it
    /// did not exist). Not part of a commit's pre-image either: a commit
    /// spread over 1,000 runners has 1,000 batches, and copying them for
    /// every batch that ends would cost every event a thousand.
    batches: BTreeMap<(CommitId, u64), Option<Batch>>,
    /// Runners the event added to a commit's `runners` (which only grow):
    /// the set is not in the pre-image, since a commit run by 1,000
    /// runners would copy 1,000 names for every event.
    ran_by: Vec<(CommitId, String)>,
    order_len: usize,
    next_job: u64,
    next_seq: u64,
}

/// One change to a commit's pending files, as the journal undoes it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PendingUndo {
    /// This unit was taken from this position (into a batch).
    Removed(usize, String),
    /// A file was put back at the front (to run again).
    PushedFront,
    /// The whole list was replaced; this is what it was.
    Replaced(VecDeque<String>),
}

/// All of the dispatcher's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    commits: HashMap<CommitId, CommitEntry>,
    /// Job id (a commit's own, or a batch's, running or ended) → commit.
    jobs: HashMap<u64, CommitId>,
    /// Commits in submission order, for "the newest commit".
    order: Vec<CommitId>,
    /// Commits with pending files, oldest first (a commit whose batch came
    /// back goes to the front).
    queue: VecDeque<CommitId>,
    runners: BTreeMap<String, Runner>,
    next_job: u64,
    next_seq: u64,
    /// Repository → the observer identity it belongs to: bound by the first
    /// submission (and persisted), or set by the operator (`pinned`, wins).
    owners: HashMap<String, String>,
    /// Owners the operator set with `--repo-owner`; never rebound.
    pinned: HashMap<String, String>,
    /// The open event's journal, between `begin` and `commit` or `rollback`.
    journal: Option<Journal>,
    /// How many times a file with a failing test runs again (`--retry-failed`).
    retry_failed: u32,
}

impl CommitEntry {
    /// The commit's row, as stored and published.
    pub fn row(&self) -> CommitRow {
        CommitRow {
            commit: self.commit,
            repo: self.repo.clone(),
            branch: self.branch.clone(),
            seq: self.seq,
            status: self.status,
            error: self.error.clone(),
            runner: runner_list(&self.runners),
            warnings: self.warnings.clone(),
            queued_at_ms: self.queued_at_ms,
            finished_at_ms: self.finished_at_ms,
            tree: self.tree,
            job: self.job,
            attempt: self.attempt,
        }
    }

    /// A batch's stored form.
    pub fn batch_row(&self, b: &Batch) -> BatchRow {
        BatchRow {
            job: b.job,
            commit: self.commit,
            attempt: b.attempt,
            runner: b.lease.runner.clone(),
            slots: b.slots,
            files: b.files.clone(),
            python: b.python.clone(),
        }
    }

    /// A copy without results and the file list: what the journal keeps.
    fn light(&self) -> CommitEntry {
        CommitEntry {
            commit: self.commit,
            repo: self.repo.clone(),
            branch: self.branch.clone(),
            seq: self.seq,
            status: self.status,
            error: self.error.clone(),
            // The journal keeps the runners it added (see `Journal::ran_by`).
            runners: BTreeSet::new(),
            warnings: self.warnings.clone(),
            queued_at_ms: self.queued_at_ms,
            finished_at_ms: self.finished_at_ms,
            tree: self.tree,
            job: self.job,
            attempt: self.attempt,
            files: BTreeMap::new(),
            // The journal undoes pending changes itself (see `Journal::pending`).
            pending: VecDeque::new(),
            pending_ms: self.pending_ms,
            done_ms: self.done_ms,
            total_ms: self.total_ms,
            divisor: self.divisor,
            // So are its batches (see `Journal::batches`).
            batches: BTreeMap::new(),
            tests: BTreeMap::new(),
            done_files: BTreeSet::new(),
            retries: self.retries.clone(),
            avoid: self.avoid.clone(),
        }
    }

    /// The estimated time of the files its running batches have not
    /// finished (ms): every file is pending, running or done, so it is what
    /// neither of the others holds; constant time, however many batches.
    fn running_ms(&self) -> u64 {
        self.total_ms.saturating_sub(self.pending_ms + self.done_ms)
    }

    /// The estimate of `file` (ms).
    fn estimate(&self, file: &str) -> u64 {
        self.files.get(file).copied().unwrap_or(0)
    }

    /// Marks `file` done, counting its estimate; whether it was not yet.
    fn mark_done(&mut self, file: String) -> bool {
        let estimate = self.estimate(&file);
        let new = self.done_files.insert(file);
        if new {
            self.done_ms += estimate;
        }
        new
    }

    /// Puts the pending files in order, longest first, and counts the
    /// estimated time of the pending, done and all files again.
    fn sort_pending(&mut self) {
        let files = &self.files;
        self.pending_ms = self.pending.iter().map(|f| files.get(f).copied().unwrap_or(0)).sum();
        self.done_ms = self.done_files.iter().map(|f| files.get(f).copied().unwrap_or(0)).sum();
        self.total_ms = files.values().sum();
        let mut pending: Vec<String> = std::mem::take(&mut self.pending).into();
        pending.sort_by(|a, b| {
            let (ea, eb) = (files.get(a).copied().unwrap_or(0), files.get(b).copied().unwrap_or(0));
            eb.cmp(&ea).then_with(|| a.cmp(b))
        });
        self.pending = pending.into();
    }

    /// Whether a running batch holds `job` at `attempt` on `conn`.
    fn leased(&self, job: u64, attempt: u32, conn: ConnId) -> Option<&Batch> {
        self.batches.get(&job).filter(|b| !self.status.is_final() && b.attempt == attempt && b.lease.conn == Some(conn))
    }
}

/// The runners of a commit as the report names them: `a, b`.
fn runner_list(runners: &BTreeSet<String>) -> Option<String> {
    (!runners.is_empty()).then(|| runners.iter().map(String::as_str).collect::<Vec<_>>().join(", "))
}

/// Why an observer may not touch a repository.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("repository {} belongs to observer {}, not {}", escaped(.repo), escaped(.owner), escaped(.asked_by))]
pub struct NotOwner {
    /// The repository, as the observer named it.
    pub repo: String,
    /// Its owner.
    pub owner: String,
    /// Who asked.
    pub asked_by: String,
}

/// Why a runner may not have a commit's source.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceRefusal {
    /// The lease was this runner's for this commit and has ended (cancelled,
    /// superseded, timed out, finished): a race, not an attack.
    #[error("job {job} attempt {attempt} on {commit} has ended")]
    Ended {
        /// The job.
        job: u64,
        /// The attempt.
        attempt: u32,
        /// The commit asked for.
        commit: CommitId,
    },
    /// The connection holds no such lease on that commit.
    #[error("this connection holds no lease job {job} attempt {attempt} on {commit}")]
    NotLeased {
        /// The job claimed.
        job: u64,
        /// The attempt claimed.
        attempt: u32,
        /// The commit asked for.
        commit: CommitId,
    },
}

/// The start of the warning that names a commit's files not run for `reason`.
fn not_run_prefix(reason: &str) -> String {
    format!("not run ({reason}): ")
}

impl State {
    /// Starts journalling one event that happens at `now_ms`.
    pub fn begin(&mut self, now_ms: u64) {
        self.journal = Some(Journal {
            now_ms,
            order_len: self.order.len(),
            next_job: self.next_job,
            next_seq: self.next_seq,
            ..Journal::default()
        });
    }

    fn now(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.now_ms)
    }

    /// What the open event changed, to be stored in one transaction: rows
    /// first (everything else refers to them), then file lists, batches,
    /// results, files and owners.
    pub fn changes(&self) -> Vec<Change> {
        let Some(j) = &self.journal else { return Vec::new() };
        let mut out = Vec::new();
        let mut lists = Vec::new();
        for (commit, before) in &j.before {
            let Some(now) = self.commits.get(commit) else { continue };
            let row = now.row();
            let changed = before.as_ref().is_none_or(|b| {
                // The pre-image has no runners: they are now's, less those this event added.
                let mut old = b.row();
                if !j.ran_by.iter().any(|(c, _)| c == commit) {
                    old.runner.clone_from(&row.runner);
                }
                old != row
            });
            if changed {
                out.push(Change::Commit(row));
            }
            if before.is_none() && !now.files.is_empty() {
                lists.push(Change::Files { commit: *commit, files: now.files.keys().cloned().collect() });
            }
        }
        out.extend(lists);
        for ((commit, job), before) in &j.batches {
            let Some(entry) = self.commits.get(commit) else { continue };
            match (before, entry.batches.get(job)) {
                (None, Some(now)) => out.push(Change::Batch(entry.batch_row(now))),
                (Some(_), None) => out.push(Change::BatchEnded { job: *job }),
                // Lost a file to a retry (a lease moving to a new connection is not stored).
                (Some(old), Some(now)) if old.files != now.files => out.push(Change::Batch(entry.batch_row(now))),
                _ => {}
            }
        }
        for (commit, id, _) in &j.tests {
            if let Some(result) = self.commits.get(commit).and_then(|e| e.tests.get(id)) {
                out.push(Change::Test { commit: *commit, result: result.clone() });
            }
        }
        for (commit, file) in &j.retried {
            if let Some(&retries) = self.commits.get(commit).and_then(|e| e.retries.get(file)) {
                out.push(Change::Retry { commit: *commit, file: file.clone(), retries });
            }
        }
        for (commit, file) in &j.done_files {
            out.push(Change::FileDone { commit: *commit, file: file.clone() });
        }
        for repo in &j.owners {
            if let Some(observer) = self.owners.get(repo) {
                out.push(Change::Owner { repo: repo.clone(), observer: observer.clone(), at_ms: j.now_ms });
            }
        }
        out
    }

    /// Keeps the open event's changes: they were stored.
    pub fn commit(&mut self) {
        self.journal = None;
    }

    /// Undoes the open event: its changes could not be stored.
    pub fn rollback(&mut self) {
        let Some(j) = self.journal.take() else { return };
        // Latest first, so that a test recorded twice in one event gets its first value back.
        for (commit, id, replaced) in j.tests.into_iter().rev() {
            if let Some(e) = self.commits.get_mut(&commit) {
                match replaced {
                    Some(old) => e.tests.insert(id, old),
                    None => e.tests.remove(&id),
                };
            }
        }
        for (commit, file) in &j.done_files {
            if let Some(e) = self.commits.get_mut(commit)
                && e.done_files.remove(file)
            {
                e.done_ms = e.done_ms.saturating_sub(e.estimate(file));
            }
        }
        for job in &j.new_jobs {
            self.jobs.remove(job);
        }
        for (commit, before) in j.before {
            match before {
                None => {
                    if let Some(e) = self.commits.remove(&commit) {
                        self.jobs.remove(&e.job);
                    }
                }
                Some(mut before) => {
                    if let Some(e) = self.commits.get_mut(&commit) {
                        before.tests = std::mem::take(&mut e.tests);
                        before.done_files = std::mem::take(&mut e.done_files);
                        before.files = std::mem::take(&mut e.files);
                        // Put back below, from the journal's undo logs.
                        before.pending = std::mem::take(&mut e.pending);
                        before.batches = std::mem::take(&mut e.batches);
                        before.runners = std::mem::take(&mut e.runners);
                        let pending_ms = before.pending_ms;
                        // Undone above, file by file.
                        let done_ms = e.done_ms;
                        *e = before;
                        e.pending_ms = pending_ms;
                        e.done_ms = done_ms;
                    }
                }
            }
        }
        for (commit, name) in &j.ran_by {
            if let Some(e) = self.commits.get_mut(commit) {
                e.runners.remove(name);
            }
        }
        for ((commit, job), before) in j.batches {
            let Some(e) = self.commits.get_mut(&commit) else { continue };
            match before {
                Some(batch) => e.batches.insert(job, batch),
                None => e.batches.remove(&job),
            };
        }
        for (commit, undo) in j.pending.into_iter().rev() {
            let Some(e) = self.commits.get_mut(&commit) else { continue };
            match undo {
                PendingUndo::Removed(at, file) => e.pending.insert(at, file),
                PendingUndo::PushedFront => drop(e.pending.pop_front()),
                PendingUndo::Replaced(old) => e.pending = old,
            }
        }
        for repo in &j.owners {
            self.owners.remove(repo);
        }
        if let Some(queue) = j.queue {
            self.queue = queue;
        }
        for (name, before) in j.runners {
            match before {
                Some(runner) => self.runners.insert(name, runner),
                None => self.runners.remove(&name),
            };
        }
        self.order.truncate(j.order_len);
        self.next_job = j.next_job;
        self.next_seq = j.next_seq;
    }

    /// Journals a commit's pre-image before its row, queue or batches change.
    fn touch(&mut self, commit: &CommitId) {
        if let Some(j) = self.journal.as_mut()
            && !j.before.contains_key(commit)
        {
            j.before.insert(*commit, self.commits.get(commit).map(CommitEntry::light));
        }
    }

    fn snap_queue(&mut self) {
        if let Some(j) = self.journal.as_mut()
            && j.queue.is_none()
        {
            j.queue = Some(self.queue.clone());
        }
    }

    /// Journals a runner's pre-image before it changes.
    fn snap_runner(&mut self, name: &str) {
        if let Some(j) = self.journal.as_mut()
            && !j.runners.contains_key(name)
        {
            j.runners.insert(name.to_owned(), self.runners.get(name).cloned());
        }
    }

    /// Journals a batch's pre-image before it is added, ended or changed.
    fn snap_batch(&mut self, commit: &CommitId, job: u64) {
        if let Some(j) = self.journal.as_mut() {
            let commits = &self.commits;
            j.batches.entry((*commit, job)).or_insert_with(|| commits.get(commit)?.batches.get(&job).cloned());
        }
    }

    /// Journals a commit's pending list before it is replaced wholesale.
    fn snap_pending(&mut self, commit: &CommitId) {
        if let Some(j) = self.journal.as_mut()
            && let Some(e) = self.commits.get(commit)
        {
            j.pending.push((*commit, PendingUndo::Replaced(e.pending.clone())));
        }
    }

    /// Whether the commit was submitted before.
    pub fn knows(&self, commit: &CommitId) -> bool {
        self.commits.contains_key(commit)
    }

    /// A commit's entry.
    pub fn entry(&self, commit: &CommitId) -> Option<&CommitEntry> {
        self.commits.get(commit)
    }

    /// The older commits of `repo`'s `branch` that a new commit submitted
    /// with `supersede` would stop, if it descends from them. The server
    /// checks ancestry in the git mirror (no I/O here) and passes the answer
    /// to [`State::submit`].
    pub fn supersede_candidates(&self, repo: &str, branch: &str, supersede: Supersede) -> Vec<CommitId> {
        if supersede == Supersede::Nothing {
            return Vec::new();
        }
        self.commits
            .values()
            .filter(|e| e.repo == repo && e.branch == branch && !e.status.is_final())
            .filter(|e| e.status == CommitStatus::Queued || supersede == Supersede::CancelRunning)
            .map(|e| e.commit)
            .collect()
    }

    /// Each of `files`' expected duration (ms): what its tests took in the
    /// newest earlier commit of `repo` that finished it (of the last
    /// [`HISTORY`] commits of the repository), else the median of the known
    /// ones, else [`DEFAULT_ESTIMATE_MS`]; and how far to trust them.
    pub fn estimates(&self, repo: &str, before_seq: u64, files: &[String]) -> Estimates {
        // The newest measurement of each file, and the one before it.
        let mut known: HashMap<&str, u64> = HashMap::new();
        let mut before: HashMap<&str, u64> = HashMap::new();
        let wanted: BTreeSet<&str> = files.iter().map(String::as_str).collect();
        let earlier = self
            .order
            .iter()
            .rev()
            .filter_map(|c| self.commits.get(c))
            .filter(|e| e.repo == repo && e.seq < before_seq && !e.done_files.is_empty())
            .take(HISTORY);
        for e in earlier {
            let mut sums: HashMap<&str, u64> = HashMap::new();
            for t in e.tests.values() {
                let u = unit(t.python.as_deref(), &t.file);
                if let Some(&w) = wanted.get(u.as_str())
                    && !before.contains_key(w)
                {
                    *sums.entry(w).or_default() += t.duration_ms;
                }
            }
            for f in &e.done_files {
                if let Some(&w) = wanted.get(f.as_str()) {
                    let took = sums.get(w).copied().unwrap_or(0);
                    if !known.contains_key(w) {
                        known.insert(w, took);
                    } else if !before.contains_key(w) {
                        before.insert(w, took);
                    }
                }
            }
            if before.len() == wanted.len() {
                break;
            }
        }
        let mut values: Vec<u64> = known.values().copied().collect();
        values.sort_unstable();
        let median = if values.is_empty() { DEFAULT_ESTIMATE_MS } else { values[values.len() / 2] };
        let divisor = if known.len() < wanted.len() {
            GUESSED_DIVISOR
        } else if before.is_empty() {
            MEASURED_ONCE_DIVISOR
        } else {
            // The spread: how much the files measured twice moved, relative
            // to what they took (1 + 3 × spread, capped at the guessed 2).
            let (moved, took) = before.iter().fold((0u64, 0u64), |(m, t), (f, &old)| {
                (m + known.get(f).copied().unwrap_or(old).abs_diff(old), t + old)
            });
            (1_000 + 3_000 * moved / took.max(1)).min(GUESSED_DIVISOR)
        };
        let files = files.iter().map(|f| (f.clone(), known.get(f.as_str()).copied().unwrap_or(median))).collect();
        Estimates { files, divisor }
    }

    /// Queues a newly seen commit whose test files are `files` (listed from
    /// the dispatcher's mirror) and `listing_warning` (links not followed).
    /// Returns `None` (and changes nothing) if it was submitted before:
    /// submission is idempotent. Otherwise returns the older commits of the
    /// same branch that `supersede` stopped: only those for which
    /// `descends_from` says the new commit descends from them, so a
    /// rewritten or unrelated history never stops work. A commit with no
    /// test file ends at once as `error`.
    #[expect(clippy::too_many_arguments, reason = "one event's fields; the core passes them straight through")]
    pub fn submit(
        &mut self,
        repo: &str,
        branch: &str,
        commit: CommitId,
        supersede: Supersede,
        descends_from: impl Fn(&CommitId) -> bool,
        files: &[String],
        listing_warning: Option<String>,
        now_ms: u64,
    ) -> Option<Vec<Stopped>> {
        if self.knows(&commit) {
            return None;
        }
        let mut stopped = Vec::new();
        {
            let older: Vec<CommitId> = self
                .supersede_candidates(repo, branch, supersede)
                .into_iter()
                .filter(|old| descends_from(old))
                .collect();
            for old in older {
                let status = if self.commits[&old].status == CommitStatus::Queued {
                    CommitStatus::Skipped
                } else {
                    CommitStatus::Cancelled
                };
                let reason = format!("superseded by {} on {branch}", commit.short());
                stopped.extend(self.stop(&old, status, reason, now_ms));
            }
        }
        self.next_job += 1;
        self.next_seq += 1;
        let Estimates { files: estimates, divisor } = self.estimates(repo, self.next_seq, files);
        let (status, error, finished) = if files.is_empty() {
            let why = listing_warning.clone().unwrap_or_else(|| "nothing under tests/".to_owned());
            (CommitStatus::Error, Some(format!("no tests found: {why}")), Some(now_ms))
        } else {
            (CommitStatus::Queued, None, None)
        };
        let mut entry = CommitEntry {
            commit,
            repo: repo.to_owned(),
            branch: branch.to_owned(),
            seq: self.next_seq,
            status,
            error,
            runners: BTreeSet::new(),
            warnings: listing_warning.into_iter().filter(|_| !files.is_empty()).collect(),
            queued_at_ms: now_ms,
            finished_at_ms: finished,
            tree: None,
            job: self.next_job,
            attempt: 0,
            pending: estimates.keys().cloned().collect(),
            pending_ms: 0,
            done_ms: 0,
            total_ms: 0,
            divisor,
            files: estimates,
            batches: BTreeMap::new(),
            tests: BTreeMap::new(),
            done_files: BTreeSet::new(),
            retries: BTreeMap::new(),
            avoid: BTreeMap::new(),
        };
        entry.sort_pending();
        self.insert(entry);
        Some(stopped)
    }

    /// Records the tree of a commit [`State::submit`] has just queued, read
    /// from the mirror (its row then carries it to storage and readers).
    pub fn set_tree(&mut self, commit: &CommitId, tree: Option<TreeId>) {
        self.touch(commit);
        if let Some(entry) = self.commits.get_mut(commit) {
            entry.tree = tree;
        }
    }

    /// Ends a commit [`State::submit`] has just queued as `error`, because
    /// its repository configuration is unusable: `reason` names the problem.
    /// Its test files stay listed, so the report still says what it holds.
    pub fn refuse_config(&mut self, commit: &CommitId, reason: String, now_ms: u64) {
        if self.stop(commit, CommitStatus::Error, reason.clone(), now_ms).is_some() {
            return;
        }
        // No test files: submit ended it at once ("no tests found"); the
        // configuration's problem is the one to fix first.
        self.touch(commit);
        if let Some(entry) = self.commits.get_mut(commit) {
            entry.error = Some(reason);
        }
    }

    /// Takes back entries persisted by an earlier dispatcher process, with
    /// their results, finished files and running batches. A running batch
    /// keeps its lease for its runner to claim when it reconnects (see
    /// [`State::register`] and [`State::expire_orphans`]); the files in no
    /// batch and not done are pending again.
    pub fn restore(&mut self, entries: impl IntoIterator<Item = CommitEntry>) {
        for entry in entries {
            self.restore_one(entry);
        }
        // Restored entries may arrive in any order; keep submission order.
        let commits = &self.commits;
        self.order.sort_by_key(|c| commits.get(c).map(|e| e.seq));
        self.queue.make_contiguous().sort_by_key(|c| commits.get(c).map(|e| e.seq));
        // Estimates come from the history, now that all of it is here.
        let unfinished: Vec<CommitId> =
            self.commits.values().filter(|e| !e.status.is_final()).map(|e| e.commit).collect();
        for commit in unfinished {
            let Some(e) = self.commits.get(&commit) else { continue };
            let files: Vec<String> = e.files.keys().cloned().collect();
            let estimates = self.estimates(&e.repo, e.seq, &files);
            if let Some(e) = self.commits.get_mut(&commit) {
                e.files = estimates.files;
                e.divisor = estimates.divisor;
                e.sort_pending();
            }
        }
    }

    fn restore_one(&mut self, mut entry: CommitEntry) {
        if self.knows(&entry.commit) {
            return;
        }
        for b in entry.batches.values_mut() {
            b.lease.conn = None;
            self.next_job = self.next_job.max(b.job);
            self.jobs.insert(b.job, entry.commit);
        }
        if !entry.status.is_final() {
            let leased: BTreeSet<&String> = entry.batches.values().flat_map(|b| &b.files).collect();
            entry.pending =
                entry.files.keys().filter(|f| !entry.done_files.contains(*f) && !leased.contains(f)).cloned().collect();
            entry.status = if entry.batches.is_empty() { CommitStatus::Queued } else { CommitStatus::Running };
        } else {
            entry.batches.clear();
            entry.pending.clear();
        }
        self.next_job = self.next_job.max(entry.job);
        self.next_seq = self.next_seq.max(entry.seq);
        let commit = entry.commit;
        let settle = !entry.status.is_final() && entry.pending.is_empty() && entry.batches.is_empty();
        self.insert(entry);
        if settle {
            // Everything was done but the end was not stored: end it now.
            self.settle(&commit, self.now());
        }
    }

    fn insert(&mut self, entry: CommitEntry) {
        let (commit, job) = (entry.commit, entry.job);
        self.touch(&commit);
        self.snap_queue();
        if !entry.status.is_final() && !entry.pending.is_empty() {
            self.queue.push_back(commit);
        }
        self.jobs.insert(job, commit);
        self.order.push(commit);
        self.commits.insert(commit, entry);
    }

    /// Adds a runner with `slots` slots, which says it still holds the
    /// batches `held`. Each held batch whose lease is still this runner's
    /// moves to `conn`; the runner's other batches go back to the queue.
    /// Returns the old connection to close, if this is a reconnect, and the
    /// adopted jobs.
    pub fn register(
        &mut self,
        name: &str,
        conn: ConnId,
        slots: u32,
        held: &[Held],
        sandbox_gaps: &[String],
        pythons: &[String],
    ) -> (Option<ConnId>, Vec<u64>) {
        let mut adopted = Vec::new();
        self.snap_runner(name);
        // A batch is adopted only within the slots the runner registers now;
        // one beyond them is queued again like any other it did not claim.
        let same: BTreeMap<u64, u32> =
            self.runners.get(name).filter(|r| r.conn == conn).map(|r| r.jobs.clone()).unwrap_or_default();
        let mut room = slots.max(1).saturating_sub(same.values().sum());
        for h in held {
            let Some(commit) = self.jobs.get(&h.job).copied() else { continue };
            self.touch(&commit);
            self.snap_batch(&commit, h.job);
            let Some(entry) = self.commits.get_mut(&commit) else { continue };
            if entry.status.is_final() {
                continue;
            }
            let Some(batch) = entry.batches.get_mut(&h.job) else { continue };
            if batch.attempt != h.attempt || batch.lease.runner != name || adopted.iter().any(|(j, _)| *j == h.job) {
                continue;
            }
            if same.contains_key(&h.job) {
                adopted.push((h.job, batch.slots));
            } else if batch.slots <= room {
                room -= batch.slots;
                batch.lease.conn = Some(conn);
                adopted.push((h.job, batch.slots));
            }
        }
        let old = self.runners.get(name).map(|r| r.conn).filter(|&c| c != conn);
        if let Some(old) = old {
            // Adopted batches moved to the new connection; the rest are requeued.
            if let Some(r) = self.runners.get_mut(name) {
                r.jobs.retain(|j, _| !adopted.iter().any(|(a, _)| a == j));
            }
            self.unregister(name, old);
        }
        // Registering again on the same connection only changes the slots.
        let runner = self.runners.entry(name.to_owned()).or_insert(Runner {
            conn,
            slots: 1,
            jobs: BTreeMap::new(),
            sandbox_gaps: Vec::new(),
            pythons: Vec::new(),
        });
        runner.jobs.extend(adopted.iter().copied());
        // Fewer slots than its batches use (registering again on the same
        // connection): the batches run out, and nothing new comes meanwhile.
        runner.slots = slots.max(1).max(runner.jobs.values().sum());
        runner.sandbox_gaps = sandbox_gaps.to_vec();
        runner.pythons = pythons.to_vec();
        (old, adopted.into_iter().map(|(j, _)| j).collect())
    }

    /// The commit a job tests.
    pub fn commit_of(&self, job: u64) -> Option<CommitId> {
        self.jobs.get(&job).copied()
    }

    /// Queues again the files of every restored lease no runner has
    /// claimed. Returns the commits.
    pub fn expire_orphans(&mut self) -> Vec<CommitId> {
        let orphans: Vec<u64> = self
            .commits
            .values()
            .flat_map(|e| e.batches.values())
            .filter(|b| b.lease.conn.is_none())
            .map(|b| b.job)
            .collect();
        let mut commits: Vec<CommitId> = orphans.into_iter().filter_map(|job| self.requeue(job)).collect();
        commits.dedup();
        commits
    }

    /// Whether `conn` holds the current lease of `job` at `attempt`.
    pub fn holds(&self, job: u64, attempt: u32, conn: ConnId) -> bool {
        self.jobs.get(&job).and_then(|c| self.commits.get(c)).is_some_and(|e| e.leased(job, attempt, conn).is_some())
    }

    /// Removes the runner connection `conn` and puts the unfinished files
    /// of its batches back at the front of the queue. Returns the commits
    /// they belong to.
    pub fn unregister(&mut self, name: &str, conn: ConnId) -> Vec<CommitId> {
        let Some(runner) = self.runners.get(name).filter(|r| r.conn == conn) else { return Vec::new() };
        let jobs: Vec<u64> = runner.jobs.keys().copied().collect();
        self.snap_runner(name);
        self.runners.remove(name);
        let mut requeued = Vec::new();
        for &job in jobs.iter().rev() {
            if let Some(c) = self.requeue(job)
                && !requeued.contains(&c)
            {
                requeued.push(c);
            }
        }
        requeued
    }

    /// Ends a batch without its files: those not done go back to the
    /// commit's pending files and the commit to the front of the queue.
    fn requeue(&mut self, job: u64) -> Option<CommitId> {
        let commit = *self.jobs.get(&job)?;
        self.touch(&commit);
        self.snap_queue();
        let runner = self.commits.get(&commit)?.batches.get(&job)?.lease.runner.clone();
        self.snap_runner(&runner);
        self.snap_pending(&commit);
        self.snap_batch(&commit, job);
        let entry = self.commits.get_mut(&commit)?;
        let batch = entry.batches.remove(&job)?;
        if let Some(r) = self.runners.get_mut(&batch.lease.runner) {
            r.jobs.remove(&job);
        }
        let undone: Vec<String> = batch.files.into_iter().filter(|f| !entry.done_files.contains(f)).collect();
        if !undone.is_empty() {
            entry.pending.extend(undone);
            entry.sort_pending();
            self.queue.retain(|c| *c != commit);
            self.queue.push_front(commit);
        }
        self.settle(&commit, self.now());
        Some(commit)
    }

    /// Brings a commit's status in line with its batches and files: running
    /// while a batch runs, queued while files wait, and final once every
    /// file is done.
    fn settle(&mut self, commit: &CommitId, now: u64) {
        let Some(e) = self.commits.get_mut(commit) else { return };
        if e.status.is_final() {
            return;
        }
        if !e.batches.is_empty() {
            e.status = CommitStatus::Running;
        } else if !e.pending.is_empty() {
            e.status = CommitStatus::Queued;
        } else {
            let error =
                e.tests.is_empty().then(|| "no tests found: nothing under tests/ was claimed by a plugin".to_owned());
            e.status = CommitReport::final_status(&e.tests, error.as_deref());
            e.error = error;
            e.finished_at_ms = Some(now);
        }
    }

    /// Cuts batches for free runner slots, the runner with the most free
    /// slots first, from the oldest queued commit that a runner with a free
    /// slot can serve: a commit whose waiting units need a Python version
    /// no free runner has does not hold up the commits behind it.
    pub fn assign(&mut self) -> Vec<Dispatch> {
        let mut out = Vec::new();
        if self.queue.is_empty() {
            return out;
        }
        self.snap_queue();
        let mut at = 0;
        while let Some(&commit) = self.queue.get(at) {
            if !self.runners.values().any(|r| r.free() > 0) {
                break;
            }
            let Some(entry) = self.commits.get(&commit) else {
                self.queue.remove(at);
                continue;
            };
            // A file queued again for a retry goes to another runner than
            // the one it failed on, if one has a free slot.
            let avoid = entry.pending.front().and_then(|f| entry.avoid.get(f));
            // The free runner that can serve one of the waiting units, and the
            // first unit it can. Versions are looked up once per commit, not
            // per unit and runner: a commit nobody can serve costs a pass over
            // its units, not one per runner.
            let versions = pending_versions(entry);
            let chosen = self
                .runners
                .iter()
                .filter(|(_, r)| r.free() > 0 && r.serves_any(&versions))
                .max_by(|(an, a), (bn, b)| {
                    (Some(*an) != avoid, a.free()).cmp(&(Some(*bn) != avoid, b.free())).then_with(|| bn.cmp(an))
                })
                .and_then(|(n, r)| Some((n.clone(), r.free(), entry.pending.iter().position(|u| r.serves(u))?)));
            let Some((name, free, first)) = chosen else {
                // No free runner has the Python these units need: the next commit may do.
                at += 1;
                continue;
            };
            let python = split_unit(&entry.pending[first]).0.map(str::to_owned);
            // The slots that could share this work: those of the runners
            // with this version (every runner's, without a matrix).
            let total: u64 =
                self.runners.values().filter(|r| r.serves(&entry.pending[first])).map(|r| u64::from(r.slots)).sum();
            let others_free = self.runners.iter().any(|(n, r)| *n != name && r.free() > 0);
            self.touch(&commit);
            self.snap_runner(&name);
            self.next_job += 1;
            let job = self.next_job;
            if let Some(j) = self.journal.as_mut() {
                j.new_jobs.push(job);
            }
            let Some(runner) = self.runners.get_mut(&name) else { break };
            let Some(entry) = self.commits.get_mut(&commit) else {
                self.queue.remove(at);
                continue;
            };
            // This runner's share of what is left (pending and still
            // running), `free / all slots`, divided by the commit's divisor
            // (see the module doc); at least one file and at least
            // MIN_BATCH_MS (each batch costs its runner a sandbox and an
            // interpreter); all of it for a runner that has every slot there
            // is, since splitting for it would only add those costs.
            let remaining = entry.pending_ms;
            let left = remaining + entry.running_ms();
            let target = if u64::from(runner.slots) >= total {
                remaining
            } else if left / total.max(1) <= TAIL_MS {
                // The tail: hedging it would only cut batches near the
                // minimum, each paying a batch's start-up.
                (left * u64::from(free) / total.max(1)).max(MIN_BATCH_MS)
            } else {
                let share = left * u64::from(free) / total.max(1);
                (share * 1_000 / entry.divisor.max(1_000)).max(MIN_BATCH_MS)
            };
            let mut files = Vec::new();
            let mut worth = 0u64;
            // Only units of the batch's version; the others keep their places.
            let mut i = first;
            while let Some(next) = entry.pending.get(i) {
                if split_unit(next).0 != python.as_deref() {
                    i += 1;
                    continue;
                }
                let cost = entry.files.get(next).copied().unwrap_or(0);
                let avoided = others_free && entry.avoid.get(next) == Some(&name);
                if !files.is_empty() && (worth + cost > target || files.len() >= MAX_BATCH_FILES || avoided) {
                    break;
                }
                worth += cost;
                let Some(file) = entry.pending.remove(i) else { break };
                if let Some(j) = self.journal.as_mut() {
                    j.pending.push((commit, PendingUndo::Removed(i, file.clone())));
                }
                files.push(file);
            }
            // What the longest files left of the share is filled with the
            // shortest of its version, from the back: a long file next in
            // line no longer ends a batch at a fraction of its share.
            let mut k = entry.pending.len();
            while k > i && files.len() < MAX_BATCH_FILES {
                k -= 1;
                let Some(last) = entry.pending.get(k) else { break };
                if split_unit(last).0 != python.as_deref() {
                    continue;
                }
                let cost = entry.files.get(last).copied().unwrap_or(0);
                if worth + cost > target || (others_free && entry.avoid.get(last) == Some(&name)) {
                    break;
                }
                worth += cost;
                let Some(file) = entry.pending.remove(k) else { break };
                if let Some(j) = self.journal.as_mut() {
                    j.pending.push((commit, PendingUndo::Removed(k, file.clone())));
                }
                files.push(file);
            }
            entry.pending_ms = entry.pending_ms.saturating_sub(worth);
            if entry.pending.is_empty() {
                self.queue.remove(at);
            }
            if files.is_empty() {
                continue;
            }
            let slots = free.min(u32::try_from(files.len()).unwrap_or(u32::MAX));
            entry.attempt += 1;
            let lease = Lease { runner: name.clone(), conn: Some(runner.conn) };
            let batch =
                Batch { job, attempt: entry.attempt, files: files.clone(), slots, lease, python: python.clone() };
            if let Some(j) = self.journal.as_mut() {
                j.batches.entry((commit, job)).or_insert(None);
            }
            entry.batches.insert(job, batch);
            entry.status = CommitStatus::Running;
            if entry.runners.insert(name.clone())
                && let Some(j) = self.journal.as_mut()
            {
                j.ran_by.push((commit, name.clone()));
            }
            for gap in &runner.sandbox_gaps {
                let warning = format!("sandbox on {name}: {gap}");
                if !entry.warnings.contains(&warning) {
                    entry.warnings.push(warning);
                }
            }
            runner.jobs.insert(job, slots);
            self.jobs.insert(job, commit);
            // The runner runs files; the version travels beside them.
            let files = files.iter().map(|u| split_unit(u).1.to_owned()).collect();
            out.push(Dispatch {
                runner: name,
                conn: runner.conn,
                assignment: Assignment { job, attempt: entry.attempt, commit, files, slots, config: None, python },
            });
        }
        out
    }

    /// The Python versions that `e`'s waiting units need and no registered
    /// runner has, in the order they wait: why such a commit cannot finish.
    pub fn unserved_pythons(&self, e: &CommitEntry) -> Vec<String> {
        let versions = pending_versions(e);
        let Versions::Some(versions) = versions else { return Vec::new() };
        versions
            .into_iter()
            .filter(|v| !self.runners.values().any(|r| r.serves_version(v)))
            .map(str::to_owned)
            .collect()
    }

    /// Whether some registered runner can serve one of `e`'s waiting units.
    pub fn servable(&self, e: &CommitEntry) -> bool {
        let versions = pending_versions(e);
        self.runners.values().any(|r| r.serves_any(&versions))
    }

    /// The entry of `job` if `conn` holds its current `attempt`, and the
    /// batch's runner.
    fn current(&mut self, job: u64, attempt: u32, conn: ConnId) -> Result<(&mut CommitEntry, String), Stale> {
        let commit = self.jobs.get(&job).ok_or(Stale::UnknownJob(job))?;
        let entry = self.commits.get_mut(commit).ok_or(Stale::UnknownJob(job))?;
        let runner = entry.leased(job, attempt, conn).ok_or(Stale::NotCurrent { job, attempt })?.lease.runner.clone();
        Ok((entry, runner))
    }

    /// The entry of `job` if `conn` holds its current `attempt` and `file`
    /// (as the runner names it) is the batch's, with the batch's runner,
    /// its Python version and the file's unit.
    fn current_file(
        &mut self,
        job: u64,
        attempt: u32,
        conn: ConnId,
        file: &str,
    ) -> Result<(&mut CommitEntry, String, Option<String>, String), Stale> {
        let (entry, runner) = self.current(job, attempt, conn)?;
        let python = entry.batches.get(&job).and_then(|b| b.python.clone());
        let u = unit(python.as_deref(), file);
        if !entry.batches.get(&job).is_some_and(|b| b.files.contains(&u)) {
            return Err(Stale::NotInBatch { job, file: file.to_owned() });
        }
        Ok((entry, runner, python, u))
    }

    /// Records one test result from the lease holder, about one of its
    /// batch's files, naming the runner. Returns whether it was new: a
    /// repeated id keeps its first result, unless it comes from a later run
    /// of its file (`--retry-failed`), which is merged in (see
    /// [`TestResult::merge_run`]).
    pub fn record_test(&mut self, job: u64, attempt: u32, conn: ConnId, result: TestResult) -> Result<bool, Stale> {
        if self.left_for_retry(job, attempt, conn, &result.file) {
            return Ok(false);
        }
        let (entry, runner, python, u) = self.current_file(job, attempt, conn, &result.file)?;
        // What the runner says of these is not its to say.
        let result = TestResult { runner: Some(runner), flaky: false, earlier: Vec::new(), python, ..result };
        let run = 1 + entry.retries.get(&u).copied().unwrap_or(0) as usize;
        let (commit, id) = (entry.commit, result.key());
        let replaced = match entry.tests.get_mut(&id) {
            // This run of its file already reported it (a resumed batch sends its events again).
            Some(old) if old.runs() >= run => return Ok(false),
            Some(old) => {
                let before = old.clone();
                old.merge_run(result);
                Some(before)
            }
            None => {
                entry.tests.insert(id.clone(), result);
                None
            }
        };
        if let Some(j) = self.journal.as_mut() {
            j.tests.push((commit, id, replaced));
        }
        Ok(true)
    }

    /// Records that the lease holder reported every test of `file`. If one
    /// of its tests has failed in every run so far and the file may run
    /// again (`--retry-failed`), it leaves the batch and goes back to the
    /// front of the queue instead, marked to avoid this runner.
    pub fn file_done(&mut self, job: u64, attempt: u32, conn: ConnId, file: String) -> Result<bool, Stale> {
        if self.left_for_retry(job, attempt, conn, &file) {
            return Ok(false);
        }
        let retry_failed = self.retry_failed;
        let (entry, runner, python, file) = self.current_file(job, attempt, conn, &file)?;
        let commit = entry.commit;
        if entry.done_files.contains(&file) {
            return Ok(false);
        }
        let retries = entry.retries.get(&file).copied().unwrap_or(0);
        let plain = split_unit(&file).1;
        let failing = || {
            entry.tests.values().any(|t| {
                t.file == plain && t.python == python && t.outcome.is_failure() && t.runs() == retries as usize + 1
            })
        };
        if retries < retry_failed && failing() {
            self.touch(&commit);
            self.snap_queue();
            self.snap_batch(&commit, job);
            let Some(entry) = self.commits.get_mut(&commit) else { return Ok(false) };
            entry.retries.insert(file.clone(), retries + 1);
            entry.avoid.insert(file.clone(), runner);
            if let Some(b) = entry.batches.get_mut(&job) {
                b.files.retain(|f| *f != file);
            }
            // First in line: the commit's answer waits for it.
            entry.pending.push_front(file.clone());
            entry.pending_ms += entry.files.get(&file).copied().unwrap_or(0);
            if let Some(j) = self.journal.as_mut() {
                j.pending.push((commit, PendingUndo::PushedFront));
            }
            self.queue.retain(|c| *c != commit);
            self.queue.push_front(commit);
            if let Some(j) = self.journal.as_mut() {
                j.retried.push((commit, file));
            }
            return Ok(true);
        }
        entry.mark_done(file.clone());
        if let Some(j) = self.journal.as_mut() {
            j.done_files.push((commit, file));
        }
        Ok(true)
    }

    /// Whether `file` left the batch `conn` holds as `job`/`attempt` to run
    /// again (`--retry-failed`). Its later events there are old news, not a
    /// protocol violation: a batch resumed after a dispatcher restart sends
    /// its events again, those about such a file too.
    fn left_for_retry(&self, job: u64, attempt: u32, conn: ConnId, file: &str) -> bool {
        let Some(e) = self.jobs.get(&job).and_then(|c| self.commits.get(c)) else { return false };
        let Some(b) = e.leased(job, attempt, conn) else { return false };
        let u = unit(b.python.as_deref(), file);
        e.retries.contains_key(&u) && !b.files.contains(&u)
    }

    /// Runs a file with a failing test up to `n` more times before its failure counts.
    pub fn set_retry_failed(&mut self, n: u32) {
        self.retry_failed = n;
    }

    /// Records that the lease holder did not run `file`, and why: the file
    /// is done, and named in one warning per reason.
    pub fn not_run(&mut self, job: u64, attempt: u32, conn: ConnId, file: String, reason: &str) -> Result<bool, Stale> {
        if self.left_for_retry(job, attempt, conn, &file) {
            return Ok(false);
        }
        let (entry, _, _, file) = self.current_file(job, attempt, conn, &file)?;
        if entry.done_files.contains(&file) {
            return Ok(false);
        }
        let commit = entry.commit;
        self.touch(&commit);
        let Some(entry) = self.commits.get_mut(&commit) else { return Ok(false) };
        note_not_run(&mut entry.warnings, &unit_label(&file), reason);
        entry.mark_done(file.clone());
        if let Some(j) = self.journal.as_mut() {
            j.done_files.push((commit, file));
        }
        Ok(true)
    }

    /// Records a warning from the lease holder, once (a resumed batch sends
    /// its events again, and every batch of a commit may say the same).
    /// Returns whether it was new.
    pub fn warn(&mut self, job: u64, attempt: u32, conn: ConnId, warning: String) -> Result<bool, Stale> {
        let (entry, _) = self.current(job, attempt, conn)?;
        if entry.warnings.contains(&warning) {
            return Ok(false);
        }
        let commit = entry.commit;
        self.touch(&commit);
        if let Some(e) = self.commits.get_mut(&commit) {
            e.warnings.push(warning);
        }
        Ok(true)
    }

    /// Ends a batch as its lease holder reports, and frees its slots. Files
    /// of the batch it never reported are done, and named in a warning:
    /// running them again could loop forever. An `error` (the batch could
    /// not run at all: its source, its checkout) ends the whole commit as
    /// `error` and stops its other batches. Returns the commit, whose
    /// status is final once every file is done, and what was stopped.
    pub fn finish(
        &mut self,
        job: u64,
        attempt: u32,
        conn: ConnId,
        error: Option<String>,
        now_ms: u64,
    ) -> Result<(CommitId, Vec<Stopped>), Stale> {
        let (entry, runner) = self.current(job, attempt, conn)?;
        let commit = entry.commit;
        self.touch(&commit);
        self.snap_runner(&runner);
        self.snap_batch(&commit, job);
        let Some(entry) = self.commits.get_mut(&commit) else { return Err(Stale::UnknownJob(job)) };
        let Some(batch) = entry.batches.remove(&job) else { return Err(Stale::NotCurrent { job, attempt }) };
        if let Some(r) = self.runners.get_mut(&batch.lease.runner) {
            r.jobs.remove(&job);
        }
        if let Some(error) = error {
            let stopped = self.stop(&commit, CommitStatus::Error, error, now_ms);
            return Ok((commit, stopped.into_iter().collect()));
        }
        let Some(entry) = self.commits.get_mut(&commit) else { return Err(Stale::UnknownJob(job)) };
        for file in batch.files {
            if !entry.done_files.contains(&file) {
                note_not_run(
                    &mut entry.warnings,
                    &unit_label(&file),
                    "the runner ended its batch without reporting it",
                );
                entry.mark_done(file.clone());
                if let Some(j) = self.journal.as_mut() {
                    j.done_files.push((commit, file));
                }
            }
        }
        self.settle(&commit, now_ms);
        Ok((commit, Vec::new()))
    }

    /// The lease holder gave the batch back, or its assignment stream
    /// broke: its unfinished files go back to the queue. Returns the
    /// commit if they did.
    pub fn abandon(&mut self, job: u64, attempt: u32, conn: ConnId) -> Option<CommitId> {
        self.current(job, attempt, conn).ok()?;
        self.requeue(job)
    }

    /// Stops testing a commit that is not final, all of its batches at
    /// once: it ends with `status` (`cancelled`, `skipped` or `error`) and
    /// `reason`. Returns what was stopped, with the connections to tell.
    pub fn stop(&mut self, commit: &CommitId, status: CommitStatus, reason: String, now_ms: u64) -> Option<Stopped> {
        self.commits.get(commit).filter(|e| !e.status.is_final())?;
        self.touch(commit);
        self.snap_queue();
        let held: Vec<(u64, String)> =
            self.commits.get(commit)?.batches.values().map(|b| (b.job, b.lease.runner.clone())).collect();
        for (job, runner) in &held {
            self.snap_runner(runner);
            self.snap_batch(commit, *job);
        }
        let entry = self.commits.get_mut(commit)?;
        entry.status = status;
        entry.error = Some(reason);
        entry.finished_at_ms = Some(now_ms);
        // Handed to the journal whole: nothing to copy.
        let pending = std::mem::take(&mut entry.pending);
        entry.pending_ms = 0;
        if let Some(j) = self.journal.as_mut() {
            j.pending.push((*commit, PendingUndo::Replaced(pending)));
        }
        let entry = self.commits.get_mut(commit)?;
        let batches = std::mem::take(&mut entry.batches);
        self.queue.retain(|c| c != commit);
        let mut running = Vec::new();
        for (job, b) in batches {
            if let Some(r) = self.runners.get_mut(&b.lease.runner) {
                r.jobs.remove(&job);
            }
            running.push((job, b.lease.conn));
        }
        Some(Stopped { commit: *commit, batches: running })
    }

    /// The report for a commit.
    pub fn report(&self, commit: &CommitId) -> Option<CommitReport> {
        let e = self.commits.get(commit)?;
        Some(CommitReport {
            commit: *commit,
            repo: e.repo.clone(),
            branch: e.branch.clone(),
            status: e.status,
            counts: Counts::of(e.tests.values()),
            error: e.error.clone(),
            runner: runner_list(&e.runners),
            warnings: e.warnings.clone(),
            queued_at_ms: e.queued_at_ms,
            finished_at_ms: e.finished_at_ms,
            files: FileCounts { total: e.files.len() as u64, done: e.done_files.len() as u64 },
            tests: e.tests.values().cloned().collect(),
        })
    }
    /// Every commit, the newest first (for [`crate::history`]).
    pub fn newest_first(&self) -> impl Iterator<Item = &CommitEntry> {
        self.order.iter().rev().filter_map(|c| self.commits.get(c))
    }

    /// Up to `limit` known commits whose id starts with `prefix`, sorted.
    pub fn commits_with_prefix(&self, prefix: &CommitPrefix, limit: usize) -> Vec<CommitId> {
        let mut found: Vec<CommitId> = self.commits.keys().filter(|c| prefix.matches(c)).copied().collect();
        found.sort_unstable();
        found.truncate(limit);
        found
    }

    /// The commit submitted last.
    pub fn newest(&self) -> Option<CommitId> {
        self.order.last().copied()
    }

    /// The commit submitted last for a branch.
    pub fn branch_tip(&self, repo: &str, branch: &str) -> Option<CommitId> {
        self.order
            .iter()
            .rev()
            .find(|c| self.commits.get(c).is_some_and(|e| e.repo == repo && e.branch == branch))
            .copied()
    }

    /// Whether `conn`, the connection of runner `name`, may have the source
    /// of `commit` for the batch `lease`: only if it holds that lease now
    /// and the lease is on `commit`.
    pub fn source_access(&self, lease: Held, commit: &CommitId, conn: ConnId, name: &str) -> Result<(), SourceRefusal> {
        let (job, attempt, commit) = (lease.job, lease.attempt, *commit);
        let entry = self.jobs.get(&job).filter(|c| **c == commit).and_then(|c| self.commits.get(c));
        let Some(entry) = entry else { return Err(SourceRefusal::NotLeased { job, attempt, commit }) };
        if entry.leased(job, attempt, conn).is_some() {
            return Ok(());
        }
        // A batch of this runner's on this commit that has ended (its id is
        // remembered, and the runner ran some of the commit).
        let ended = entry.status.is_final() || !entry.batches.contains_key(&job);
        if ended && job != entry.job && attempt <= entry.attempt && entry.runners.contains(name) {
            return Err(SourceRefusal::Ended { job, attempt, commit });
        }
        Err(SourceRefusal::NotLeased { job, attempt, commit })
    }

    /// The connection runner `name` is registered on, if any.
    pub fn runner_conn(&self, name: &str) -> Option<ConnId> {
        self.runners.get(name).map(|r| r.conn)
    }

    /// Sets the owners the operator named; they win over any binding.
    pub fn pin_owners(&mut self, pinned: impl IntoIterator<Item = (String, String)>) {
        self.pinned = pinned.into_iter().collect();
    }

    /// Takes back owner bindings persisted by an earlier dispatcher process.
    pub fn restore_owners(&mut self, owners: impl IntoIterator<Item = (String, String)>) {
        self.owners.extend(owners);
    }

    /// The observer `repo` belongs to, if any.
    pub fn owner(&self, repo: &str) -> Option<&str> {
        self.pinned.get(repo).or_else(|| self.owners.get(repo)).map(String::as_str)
    }

    /// Whether `observer` may submit to `repo`; a repository nobody owns
    /// yet becomes `observer`'s. Returns `Ok(true)` when this call bound it
    /// (the server persists the binding).
    pub fn claim_repo(&mut self, repo: &str, observer: &str) -> Result<bool, NotOwner> {
        match self.owner(repo) {
            Some(owner) if owner == observer => Ok(false),
            Some(owner) => {
                Err(NotOwner { repo: repo.to_owned(), owner: owner.to_owned(), asked_by: observer.to_owned() })
            }
            None => {
                self.owners.insert(repo.to_owned(), observer.to_owned());
                if let Some(j) = self.journal.as_mut() {
                    j.owners.push(repo.to_owned());
                }
                Ok(true)
            }
        }
    }

    /// Whether `observer` may read `repo`'s branch tips: unless someone else owns it.
    pub fn may_read_repo(&self, repo: &str, observer: &str) -> Result<(), NotOwner> {
        match self.owner(repo) {
            Some(owner) if owner != observer => {
                Err(NotOwner { repo: repo.to_owned(), owner: owner.to_owned(), asked_by: observer.to_owned() })
            }
            _ => Ok(()),
        }
    }

    /// The names of the registered runners and how many batches each holds.
    pub fn runners(&self) -> Vec<(String, usize)> {
        self.runners.iter().map(|(n, r)| (n.clone(), r.jobs.len())).collect()
    }

    /// The registered runners, for the read side ([`crate::view`]).
    pub fn runner_views(&self) -> impl Iterator<Item = RunnerSlots<'_>> {
        self.runners.iter().map(|(name, r)| RunnerSlots {
            name,
            conn: r.conn,
            slots: r.slots,
            jobs: &r.jobs,
            sandbox_gaps: &r.sandbox_gaps,
        })
    }

    /// The commits with files waiting for a runner, in the order they get them.
    pub fn queued(&self) -> impl Iterator<Item = &CommitEntry> {
        self.queue.iter().filter_map(|c| self.commits.get(c))
    }
}

/// A registered runner as the read side sees it.
#[derive(Debug)]
pub struct RunnerSlots<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its connection.
    pub conn: ConnId,
    /// Its registered slots.
    pub slots: u32,
    /// Its batches, with the slots each uses.
    pub jobs: &'a BTreeMap<u64, u32>,
    /// What its sandbox lacks.
    pub sandbox_gaps: &'a [String],
}

/// At most this many files are named in one "not run" warning; the rest
/// are counted. A warning naming 20,000 files says no more than one naming
/// 20, and rewriting it (and storing it with the commit's row) on every
/// file made recording such a commit quadratic.
const MAX_NOT_RUN_NAMED: usize = 20;

/// Names `file` in the warning that lists the files not run for `reason`,
/// or counts it once that names [`MAX_NOT_RUN_NAMED`]. Callers pass each
/// file once (only a file not yet done is noted).
fn note_not_run(warnings: &mut Vec<String>, file: &str, reason: &str) {
    let prefix = not_run_prefix(reason);
    let name = escaped(file);
    let Some(w) = warnings.iter_mut().find(|w| w.starts_with(&prefix)) else {
        warnings.push(format!("{prefix}{name}"));
        return;
    };
    // "PREFIX a, b, … (and N more)": the count is after the last " (and ".
    let more = w
        .rfind(" (and ")
        .filter(|_| w.ends_with(" more)"))
        .and_then(|i| w[i + 6..w.len() - 6].parse::<u64>().ok().map(|n| (i, n)));
    match more {
        Some((i, n)) => {
            w.truncate(i);
            w.push_str(&format!(" (and {} more)", n + 1));
        }
        None if w[prefix.len()..].split(", ").count() >= MAX_NOT_RUN_NAMED => w.push_str(" (and 1 more)"),
        None => {
            w.push_str(", ");
            w.push_str(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::Outcome;

    fn commit(n: u8) -> CommitId {
        format!("{:040x}", n).parse().unwrap()
    }

    #[test]
    fn a_not_run_warning_names_twenty_files_and_counts_the_rest() {
        let mut warnings = vec!["something else".to_owned()];
        for n in 0..25 {
            note_not_run(&mut warnings, &format!("tests/test_{n:02}.py"), "no plugin claims it");
        }
        let named: Vec<String> = (0..20).map(|n| format!("tests/test_{n:02}.py")).collect();
        assert_eq!(
            warnings,
            ["something else".to_owned(), format!("not run (no plugin claims it): {} (and 5 more)", named.join(", "))]
        );
    }

    fn result(id: &str, outcome: Outcome) -> TestResult {
        TestResult::new(id.into(), "tests/test_a.py".into(), outcome, 1, String::new())
    }

    fn one_file() -> Vec<String> {
        vec!["tests/test_a.py".to_owned()]
    }

    /// Submits commit `n` with one test file: one batch, as a whole commit was.
    fn submit(s: &mut State, n: u8) {
        s.submit("repo", "main", commit(n), Supersede::Nothing, |_| true, &one_file(), None, u64::from(n)).unwrap();
    }

    #[test]
    fn a_prefix_finds_the_commits_that_start_with_it() {
        let mut s = State::default();
        for n in 1..=3 {
            submit(&mut s, n);
        }
        let other: CommitId = "bba85f8".repeat(6)[..40].parse().unwrap();
        s.submit("repo", "main", other, Supersede::Nothing, |_| true, &one_file(), None, 9).unwrap();
        let prefix = |p: &str| p.parse::<CommitPrefix>().unwrap();
        assert_eq!(s.commits_with_prefix(&prefix("BBA85F8"), 10), [other]);
        assert_eq!(s.commits_with_prefix(&prefix("0000000"), 10), [commit(1), commit(2), commit(3)]);
        assert_eq!(s.commits_with_prefix(&prefix("0000000"), 2), [commit(1), commit(2)]);
        assert_eq!(s.commits_with_prefix(&prefix(commit(2).as_str()), 10), [commit(2)]);
        assert!(s.commits_with_prefix(&prefix("1234567"), 10).is_empty());
    }

    #[test]
    fn submission_is_idempotent() {
        let mut s = State::default();
        submit(&mut s, 1);
        assert!(s.submit("repo", "main", commit(1), Supersede::Nothing, |_| true, &one_file(), None, 11).is_none());
        s.register("r1", 1, 4, &[], &[], &[]);
        assert_eq!(s.assign().len(), 1);
        assert!(s.assign().is_empty());
    }

    #[test]
    fn jobs_go_to_the_least_busy_runner_and_respect_slots() {
        let mut s = State::default();
        for n in 1..=3 {
            submit(&mut s, n);
        }
        s.register("a", 1, 1, &[], &[], &[]);
        s.register("b", 2, 1, &[], &[], &[]);
        let d = s.assign();
        assert_eq!(d.len(), 2);
        assert_ne!(d[0].runner, d[1].runner);
        assert_eq!(d[0].assignment.commit, commit(1));
        assert_eq!(s.report(&commit(3)).unwrap().status, CommitStatus::Queued);
        s.finish(d[0].assignment.job, 1, d[0].conn, None, 50).unwrap();
        let d2 = s.assign();
        assert_eq!(d2.len(), 1);
        assert_eq!(d2[0].runner, d[0].runner);
        assert_eq!(d2[0].assignment.commit, commit(3));
    }

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| format!("tests/test_{n}.py")).collect()
    }

    fn result_in(id: &str, file: &str, duration_ms: u64) -> TestResult {
        TestResult { file: file.into(), duration_ms, ..result(id, Outcome::Pass) }
    }

    #[test]
    fn a_matrix_commit_runs_each_file_per_version_on_runners_that_have_it() {
        let mut s = State::default();
        let fs = files(&["a", "b"]);
        let versions = ["3.11".to_owned(), "3.12".to_owned()];
        s.submit("repo", "main", commit(1), Supersede::Nothing, |_| true, &units(&fs, &versions), None, 0).unwrap();
        assert_eq!(s.entry(&commit(1)).unwrap().files.len(), 4, "two files under two versions");
        s.register("py311", 1, 4, &[], &[], &["3.11.7".to_owned()]);
        let d = s.assign();
        assert_eq!(d.len(), 1);
        let a = &d[0].assignment;
        // The runner gets plain files and the version beside them.
        assert_eq!((a.python.as_deref(), &a.files[..]), (Some("3.11"), &fs[..]));
        for f in &fs {
            let r = TestResult { python: None, ..result_in("t", &fs[0], 3) };
            if f == &fs[0] {
                s.record_test(a.job, a.attempt, 1, r).unwrap();
            }
            s.file_done(a.job, a.attempt, 1, f.clone()).unwrap();
        }
        s.finish(a.job, a.attempt, 1, None, 1).unwrap();
        // Half done: the 3.12 half waits, with the reason, and the commit is not final.
        let e = s.entry(&commit(1)).unwrap();
        assert_eq!(e.status, CommitStatus::Queued);
        assert_eq!((s.servable(e), s.unserved_pythons(e)), (false, vec!["3.12".to_owned()]));
        assert_eq!(e.tests["3.11:t"].python.as_deref(), Some("3.11"));
        // It does not hold up a commit behind it that the runner can serve.
        submit(&mut s, 2);
        let d = s.assign();
        assert_eq!((d.len(), d[0].assignment.commit, d[0].assignment.python.as_deref()), (1, commit(2), None));
        // A runner with 3.12.1 serves "3.12"; the same test id is a second result.
        s.register("py312", 2, 1, &[], &[], &["3.12.1".to_owned()]);
        let d = s.assign();
        assert_eq!(d.len(), 1);
        let a = &d[0].assignment;
        assert_eq!((d[0].runner.as_str(), a.python.as_deref(), &a.files[..]), ("py312", Some("3.12"), &fs[..]));
        // A result for a file under another version than the batch's is not the batch's.
        assert!(s.record_test(99, 1, 2, result_in("t", &fs[0], 1)).is_err());
        let fail = TestResult { outcome: Outcome::Fail, ..result_in("t", &fs[0], 4) };
        assert_eq!(s.record_test(a.job, a.attempt, 2, fail), Ok(true));
        for f in &fs {
            s.file_done(a.job, a.attempt, 2, f.clone()).unwrap();
        }
        s.finish(a.job, a.attempt, 2, None, 2).unwrap();
        let report = s.report(&commit(1)).unwrap();
        assert_eq!(report.status, CommitStatus::Failed, "every entry must pass");
        let got: Vec<(&str, Option<&str>, Outcome, Option<&str>)> =
            report.tests.iter().map(|t| (t.id.as_str(), t.python.as_deref(), t.outcome, t.runner.as_deref())).collect();
        assert_eq!(
            got,
            [("t", Some("3.11"), Outcome::Pass, Some("py311")), ("t", Some("3.12"), Outcome::Fail, Some("py312"))]
        );
        assert_eq!((report.counts.total, report.files.total, report.files.done), (2, 4, 4));
    }

    #[test]
    fn versions_match_by_their_leading_parts() {
        assert!(python_matches("3.12", "3.12.7"));
        assert!(python_matches("3.12.7", "3.12.7"));
        assert!(!python_matches("3.12.7", "3.12.8"));
        assert!(!python_matches("3.1", "3.12.7"));
        assert!(!python_matches("3.12", "3.11.9"));
        assert_eq!(split_unit("3.12:tests/test_a.py"), (Some("3.12"), "tests/test_a.py"));
        assert_eq!(split_unit("tests/a:b.py"), (None, "tests/a:b.py"));
        assert_eq!(unit_label("3.12:tests/test_a.py"), "tests/test_a.py (Python 3.12)");
    }

    #[test]
    fn a_failing_file_runs_again_on_another_runner_and_its_old_batch_is_not_heard_about_it() {
        let mut s = State::default();
        s.set_retry_failed(1);
        let fs = files(&["a"]);
        s.submit("repo", "main", commit(1), Supersede::Nothing, |_| true, &fs, None, 0).unwrap();
        s.register("r1", 1, 2, &[], &[], &[]);
        s.register("r2", 2, 1, &[], &[], &[]);
        let first = s.assign().remove(0);
        assert_eq!(first.runner, "r1", "the most free slots");
        let first = first.assignment;
        let fail = TestResult { outcome: Outcome::Fail, ..result_in("a.t", &fs[0], 5) };
        assert_eq!(s.record_test(first.job, first.attempt, 1, fail.clone()), Ok(true));
        assert_eq!(s.file_done(first.job, first.attempt, 1, fs[0].clone()), Ok(true));
        // The failing file left its batch and waits first in line.
        let e = s.entry(&commit(1)).unwrap();
        assert_eq!((e.pending.front(), e.retries.get(&fs[0])), (Some(&fs[0]), Some(&1)));
        assert!(!e.done_files.contains(&fs[0]) && e.batches[&first.job].files.is_empty());
        // Both runners have one free slot; r1 would win by name, but the file failed there.
        let retry = s.assign().remove(0);
        assert_eq!((retry.runner.as_str(), &retry.assignment.files[..]), ("r2", &fs[..]));
        // The old batch saying it all again (a resumed batch) changes nothing and is no violation.
        assert_eq!(s.record_test(first.job, first.attempt, 1, fail.clone()), Ok(false));
        assert_eq!(s.file_done(first.job, first.attempt, 1, fs[0].clone()), Ok(false));
        s.finish(first.job, first.attempt, 1, None, 2).unwrap();
        // The retry passes: the test is flaky, and the commit passes.
        let r = retry.assignment;
        assert_eq!(s.record_test(r.job, r.attempt, 2, result_in("a.t", &fs[0], 6)), Ok(true));
        assert_eq!(s.file_done(r.job, r.attempt, 2, fs[0].clone()), Ok(true));
        s.finish(r.job, r.attempt, 2, None, 3).unwrap();
        let report = s.report(&commit(1)).unwrap();
        assert_eq!(report.status, CommitStatus::Passed);
        let a = &report.tests[0];
        assert_eq!((a.outcome, a.flaky, a.runner.as_deref(), a.runs()), (Outcome::Pass, true, Some("r2"), 2));
        assert_eq!(a.earlier[0].runner.as_deref(), Some("r1"));
        assert_eq!((report.counts.flaky, report.files.done, report.files.total), (1, 1, 1));
    }

    #[test]
    fn only_the_current_lease_holder_is_heard_and_only_unfinished_files_run_again() {
        let mut s = State::default();
        s.submit("repo", "main", commit(1), Supersede::Nothing, |_| true, &files(&["a", "b", "c", "d"]), None, 1)
            .unwrap();
        s.register("a", 1, 1, &[], &[], &[]);
        // The only runner: the whole commit in one batch (splitting would
        // only add batches' costs).
        let first = s.assign().remove(0).assignment;
        assert_eq!((first.files.clone(), first.slots), (files(&["a", "b", "c", "d"]), 1));
        assert_eq!(s.record_test(first.job, 1, 1, result("t1", Outcome::Pass)), Ok(true));
        assert_eq!(s.file_done(first.job, 1, 1, "tests/test_a.py".into()), Ok(true));
        // The runner vanishes: only its unfinished files go back to the queue.
        assert_eq!(s.unregister("a", 1), vec![commit(1)]);
        assert_eq!(s.report(&commit(1)).unwrap().status, CommitStatus::Queued);
        assert_eq!(s.entry(&commit(1)).unwrap().pending, files(&["b", "c", "d"]));
        s.register("b", 2, 1, &[], &[], &[]);
        let second = s.assign().remove(0);
        assert_eq!((second.assignment.attempt, &second.assignment.files[..]), (2, &files(&["b", "c", "d"])[..]));
        let job = second.assignment.job;
        assert_ne!(job, first.job, "each batch has its own job id");
        // The late runner's events are refused, whatever it claims.
        assert!(s.record_test(first.job, 1, 1, result("t2", Outcome::Fail)).is_err());
        assert!(s.record_test(job, 2, 1, result("t2", Outcome::Fail)).is_err());
        assert!(s.file_done(first.job, 1, 1, "tests/test_b.py".into()).is_err());
        assert!(s.finish(first.job, 1, 1, None, 5).is_err());
        // The holder is heard only about its own batch's files.
        let elsewhere = s.record_test(job, 2, 2, result("t9", Outcome::Fail));
        assert!(matches!(elsewhere, Err(Stale::NotInBatch { .. })), "{elsewhere:?}");
        assert!(s.file_done(job, 2, 2, "tests/test_a.py".into()).is_err());
        // Each test once, first result wins, and the result names its runner.
        assert_eq!(s.record_test(job, 2, 2, result_in("t2", "tests/test_b.py", 5)), Ok(true));
        assert_eq!(s.record_test(job, 2, 2, result_in("t2", "tests/test_b.py", 6)), Ok(false));
        assert_eq!(s.entry(&commit(1)).unwrap().tests["t2"].runner.as_deref(), Some("b"));
        assert_eq!(s.entry(&commit(1)).unwrap().tests["t1"].runner.as_deref(), Some("a"));
        assert_eq!(s.file_done(job, 2, 2, "tests/test_b.py".into()), Ok(true));
        // Not final while files wait.
        assert_eq!(s.report(&commit(1)).unwrap().status, CommitStatus::Running);
        s.not_run(job, 2, 2, "tests/test_c.py".into(), "no plugin claims it").unwrap();
        s.record_test(job, 2, 2, result_in("t3", "tests/test_d.py", 1)).unwrap();
        s.file_done(job, 2, 2, "tests/test_d.py".into()).unwrap();
        s.finish(job, 2, 2, None, 10).unwrap();
        let report = s.report(&commit(1)).unwrap();
        assert_eq!(report.status, CommitStatus::Passed);
        assert_eq!(report.counts.total, 3);
        assert_eq!(report.finished_at_ms, Some(10));
        assert_eq!(report.runner.as_deref(), Some("a, b"));
        assert_eq!(report.warnings, ["not run (no plugin claims it): tests/test_c.py"]);
        // Nothing more is accepted once done.
        assert!(s.record_test(job, 2, 2, result_in("t4", "tests/test_d.py", 1)).is_err());
        assert!(s.runners().iter().all(|(_, busy)| *busy == 0));
    }

    #[test]
    fn files_go_longest_first_by_earlier_durations_in_shrinking_batches() {
        let mut s = State::default();
        let names = files(&["a", "b", "c", "d", "e", "f", "g", "h"]);
        s.submit("repo", "main", commit(1), Supersede::Nothing, |_| true, &names, None, 1).unwrap();
        // Nothing known: every file gets the default, in name order.
        assert!(s.entry(&commit(1)).unwrap().files.values().all(|&e| e == DEFAULT_ESTIMATE_MS));
        s.register("r", 1, 8, &[], &[], &[]);
        let d = s.assign();
        let conn = d[0].conn;
        // The first commit's durations: a takes 2400, b 1200, the rest 300 (two tests each).
        for d in &d {
            let a = &d.assignment;
            for f in &a.files {
                let ms = match f.as_str() {
                    "tests/test_a.py" => 1_200,
                    "tests/test_b.py" => 600,
                    _ => 150,
                };
                for t in 0..2 {
                    s.record_test(a.job, a.attempt, conn, result_in(&format!("{f}:{t}"), f, ms)).unwrap();
                }
                s.file_done(a.job, a.attempt, conn, f.clone()).unwrap();
            }
            s.finish(a.job, a.attempt, conn, None, 2).unwrap();
        }
        assert_eq!(s.report(&commit(1)).unwrap().status, CommitStatus::Passed);
        // The next commit has a new file, never seen: it gets the median.
        let mut next = names.clone();
        next.push("tests/test_new.py".into());
        s.submit("repo", "main", commit(2), Supersede::Nothing, |_| true, &next, None, 3).unwrap();
        let e = s.entry(&commit(2)).unwrap();
        assert_eq!(e.files["tests/test_a.py"], 2_400);
        assert_eq!(e.files["tests/test_b.py"], 1_200);
        assert_eq!(e.files["tests/test_new.py"], 300);
        assert_eq!(e.pending.iter().take(2).cloned().collect::<Vec<_>>(), files(&["a", "b"]));
        // Another repository knows nothing of these durations.
        s.submit("other", "main", commit(3), Supersede::Nothing, |_| true, &names, None, 4).unwrap();
        assert_eq!(s.entry(&commit(3)).unwrap().files["tests/test_a.py"], DEFAULT_ESTIMATE_MS);
        // Two runners of one slot each: batches of half of what is left over
        // 2 (the new file's estimate is a guess), at least one file, so they
        // shrink as the queue drains; the tail in one round.
        s.unregister("r", 1);
        s.register("x", 2, 1, &[], &[], &[]);
        s.register("y", 3, 1, &[], &[], &[]);
        let mut sizes = Vec::new();
        loop {
            let given = s.assign();
            if given.is_empty() {
                break;
            }
            for d in given {
                let a = d.assignment;
                if a.commit != commit(2) {
                    s.stop(&a.commit, CommitStatus::Cancelled, "not this one".into(), 5);
                    continue;
                }
                assert_eq!(a.slots, 1);
                sizes.push(a.files.clone());
                for f in &a.files {
                    s.file_done(a.job, a.attempt, d.conn, f.clone()).unwrap();
                }
                s.finish(a.job, a.attempt, d.conn, None, 6).unwrap();
            }
        }
        // 5700 ms in all: a alone (2400 > 5700 / 2 / 2 = 1425), then b alone
        // (a still runs, so the share is the same); then 2100 ms are left,
        // 1050 a slot: the tail (at most TAIL_MS), cut at an even share
        // (three files each), not halved, and the one file over.
        assert_eq!(sizes[0], files(&["a"]));
        assert_eq!(sizes[1], files(&["b"]));
        assert_eq!(sizes[2..].iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
        let total: usize = sizes.iter().map(Vec::len).sum();
        assert_eq!(total, 9);
        let estimate = |f: &String| match f.as_str() {
            "tests/test_a.py" => 2_400,
            "tests/test_b.py" => 1_200,
            _ => 300,
        };
        let worth: Vec<u64> = sizes.iter().map(|b| b.iter().map(estimate).sum()).collect();
        assert!(worth.windows(2).all(|w| w[0] >= w[1]), "batches grow: {sizes:?} worth {worth:?}");
        assert_eq!(s.report(&commit(2)).unwrap().status, CommitStatus::Error, "no tests recorded");
    }

    /// Submits `commit` of `names` and runs it on one runner `r` of 8 slots,
    /// each file's one test taking `ms(file)`, then disconnects it.
    fn run_all(s: &mut State, commit: CommitId, names: &[String], conn: ConnId, ms: impl Fn(&str) -> u64) {
        s.submit("repo", "main", commit, Supersede::Nothing, |_| true, names, None, 1).unwrap();
        s.register("r", conn, 8, &[], &[], &[]);
        for d in s.assign() {
            let a = d.assignment;
            assert_eq!(a.commit, commit);
            for f in &a.files {
                s.record_test(a.job, a.attempt, d.conn, result_in(&format!("{f}:t"), f, ms(f))).unwrap();
                s.file_done(a.job, a.attempt, d.conn, f.clone()).unwrap();
            }
            s.finish(a.job, a.attempt, d.conn, None, 2).unwrap();
        }
        assert_eq!(s.report(&commit).unwrap().status, CommitStatus::Passed);
        s.unregister("r", conn);
    }

    #[test]
    fn the_better_the_estimates_the_larger_the_batches() {
        // 4 files of 2000 ms and 16 of 200 ms: 11.2 s, 2.8 s each for four runners.
        let names: Vec<String> = (0..20).map(|i| format!("tests/test_{i:02}.py")).collect();
        let took = |f: &str| if f < "tests/test_04.py" { 2_000 } else { 200 };
        let mut s = State::default();
        // A new commit's divisor, and its first batches for four runners of
        // one slot (ms).
        let first_batches = |s: &mut State, n: u8, conn: ConnId| -> (u64, Vec<u64>) {
            s.submit("repo", "main", commit(n), Supersede::Nothing, |_| true, &names, None, 1).unwrap();
            for r in 0..4 {
                s.register(&format!("w{r}"), conn + r, 1, &[], &[], &[]);
            }
            let given = s.assign();
            let e = s.entry(&commit(n)).unwrap();
            let worth = given.iter().map(|d| d.assignment.files.iter().map(|f| e.files[f]).sum()).collect();
            let divisor = e.divisor;
            s.stop(&commit(n), CommitStatus::Cancelled, "measured".into(), 2);
            for r in 0..4 {
                s.unregister(&format!("w{r}"), conn + r);
            }
            (divisor, worth)
        };
        // Nothing known: 20 guesses of 1 s; half an even share (20 s / 4 / 2).
        assert_eq!(first_batches(&mut s, 1, 10), (GUESSED_DIVISOR, vec![2_000; 4]));
        // Measured once: an even share of what is left over 1.3, the running
        // batches included (2.8 s / 1.3 = 2.15 s: one long file each).
        run_all(&mut s, commit(2), &names, 20, took);
        assert_eq!(first_batches(&mut s, 3, 30), (MEASURED_ONCE_DIVISOR, vec![2_000; 4]));
        // Measured twice, the same each time: an even share, one batch each.
        run_all(&mut s, commit(4), &names, 40, took);
        assert_eq!(first_batches(&mut s, 5, 50), (1_000, vec![2_800; 4]));
        // Durations that moved by a tenth: 1 + 3 × 0.1.
        run_all(&mut s, commit(6), &names, 60, |f| took(f) * 11 / 10);
        assert_eq!(first_batches(&mut s, 7, 70).0, 1_300);
        // By half: 1 + 3 × 0.5 = 2.5, capped at the guessed divisor.
        run_all(&mut s, commit(8), &names, 80, |f| took(f) * 11 * 3 / 20);
        assert_eq!(first_batches(&mut s, 9, 90).0, GUESSED_DIVISOR);
    }

    #[test]
    fn a_runners_batches_never_use_more_than_its_slots() {
        let mut s = State::default();
        let names: Vec<String> = (0..20).map(|i| format!("tests/test_{i:02}.py")).collect();
        s.submit("repo", "main", commit(1), Supersede::Nothing, |_| true, &names, None, 1).unwrap();
        s.submit("repo", "main", commit(2), Supersede::Nothing, |_| true, &names, None, 1).unwrap();
        s.register("two", 1, 2, &[], &[], &[]);
        s.register("three", 2, 3, &[], &[], &[]);
        let d = s.assign();
        let used = |s: &State, name: &str| s.runners[name].jobs.values().sum::<u32>();
        assert_eq!((used(&s, "two"), used(&s, "three")), (2, 3));
        assert!(d.iter().all(|d| d.assignment.slots as usize <= d.assignment.files.len()));
        assert!(s.assign().is_empty(), "no free slot, no batch");
        // A batch ends: exactly its slots are handed out again.
        let a = &d[0].assignment;
        for f in &a.files {
            s.file_done(a.job, a.attempt, d[0].conn, f.clone()).unwrap();
        }
        s.finish(a.job, a.attempt, d[0].conn, None, 2).unwrap();
        let again = s.assign();
        let freed: u32 = again.iter().map(|d| d.assignment.slots).sum();
        assert_eq!(freed, a.slots);
        assert_eq!((used(&s, "two"), used(&s, "three")), (2, 3));
    }

    #[test]
    fn a_batch_that_cannot_run_ends_its_commit_and_stops_the_others() {
        let mut s = State::default();
        s.submit("repo", "main", commit(1), Supersede::Nothing, |_| true, &files(&["a", "b", "c", "d"]), None, 1)
            .unwrap();
        s.register("x", 1, 1, &[], &[], &[]);
        s.register("y", 2, 1, &[], &[], &[]);
        let d = s.assign();
        assert_eq!(d.len(), 2);
        let (bad, other) = (&d[0], &d[1]);
        let (c, stopped) = s
            .finish(bad.assignment.job, bad.assignment.attempt, bad.conn, Some("checkout: too large".into()), 3)
            .unwrap();
        assert_eq!(c, commit(1));
        assert_eq!(
            stopped,
            vec![Stopped { commit: commit(1), batches: vec![(other.assignment.job, Some(other.conn))] }]
        );
        let r = s.report(&commit(1)).unwrap();
        assert_eq!((r.status, r.error.as_deref()), (CommitStatus::Error, Some("checkout: too large")));
        assert!(s.runners().iter().all(|(_, busy)| *busy == 0));
    }

    #[test]
    fn a_commit_without_test_files_ends_at_once_naming_the_links() {
        let mut s = State::default();
        let why = Some("symlinks that could lead outside the checkout were not followed: tests -> /usr".to_owned());
        s.submit("repo", "main", commit(1), Supersede::Nothing, |_| true, &[], why, 1).unwrap();
        let r = s.report(&commit(1)).unwrap();
        assert_eq!(r.status, CommitStatus::Error);
        assert_eq!(
            r.error.as_deref(),
            Some("no tests found: symlinks that could lead outside the checkout were not followed: tests -> /usr")
        );
        s.register("x", 1, 1, &[], &[], &[]);
        assert!(s.assign().is_empty());
    }

    #[test]
    fn a_reconnecting_runner_replaces_its_old_connection() {
        let mut s = State::default();
        submit(&mut s, 1);
        s.register("a", 1, 1, &[], &[], &[]);
        let d = s.assign().remove(0);
        assert_eq!(s.register("a", 7, 1, &[], &[], &[]), (Some(1), vec![]));
        let again = s.assign().remove(0);
        assert_eq!((again.conn, again.assignment.attempt), (7, 2));
        assert_eq!(s.abandon(d.assignment.job, 1, 1), None);
        assert_eq!(s.abandon(again.assignment.job, 2, 7), Some(commit(1)));
        assert_eq!(s.assign().remove(0).assignment.attempt, 3);
    }

    #[test]
    fn a_run_with_no_tests_is_an_error_and_a_failure_fails() {
        let mut s = State::default();
        submit(&mut s, 1);
        submit(&mut s, 2);
        s.register("a", 1, 2, &[], &[], &[]);
        let d = s.assign();
        s.finish(d[0].assignment.job, 1, 1, None, 3).unwrap();
        let r = s.report(&commit(1)).unwrap();
        assert_eq!(r.status, CommitStatus::Error);
        assert!(r.error.unwrap().contains("no tests found"));
        s.record_test(d[1].assignment.job, 1, 1, result("t", Outcome::Error)).unwrap();
        s.finish(d[1].assignment.job, 1, 1, None, 3).unwrap();
        assert_eq!(s.report(&commit(2)).unwrap().status, CommitStatus::Failed);
        assert_eq!(s.newest(), Some(commit(2)));
    }

    #[test]
    fn a_newer_commit_supersedes_older_ones_of_its_branch() {
        let mut s = State::default();
        submit(&mut s, 1);
        s.register("a", 1, 1, &[], &[], &[]);
        let running = s.assign().remove(0).assignment;
        s.submit("repo", "main", commit(2), Supersede::Nothing, |_| true, &one_file(), None, 2).unwrap();
        s.submit("repo", "other", commit(3), Supersede::Nothing, |_| true, &one_file(), None, 3).unwrap();
        // Latest mode: 1 (running) is cancelled, 2 (queued) skipped, 3 (another branch) untouched.
        let stopped =
            s.submit("repo", "main", commit(4), Supersede::CancelRunning, |_| true, &one_file(), None, 4).unwrap();
        assert_eq!(stopped.len(), 2);
        assert!(stopped.contains(&Stopped { commit: commit(1), batches: vec![(running.job, Some(1))] }));
        assert_eq!(s.report(&commit(1)).unwrap().status, CommitStatus::Cancelled);
        assert_eq!(s.report(&commit(2)).unwrap().status, CommitStatus::Skipped);
        assert!(s.report(&commit(2)).unwrap().error.unwrap().contains("superseded by"));
        assert_eq!(s.report(&commit(3)).unwrap().status, CommitStatus::Queued);
        // The cancelled lease is dead; the runner's slot is free for the rest.
        assert!(s.record_test(running.job, 1, 1, result("t", Outcome::Pass)).is_err());
        let next: Vec<CommitId> = s.assign().into_iter().map(|d| d.assignment.commit).collect();
        assert_eq!(next, vec![commit(3)]);
        // SkipQueued leaves running work alone.
        let running = s.entry(&commit(3)).unwrap().job;
        s.submit("repo", "other", commit(5), Supersede::SkipQueued, |_| true, &one_file(), None, 5).unwrap();
        assert_eq!(s.report(&commit(3)).unwrap().status, CommitStatus::Running);
        assert_eq!(s.entry(&commit(3)).unwrap().job, running);
        assert_eq!(s.branch_tip("repo", "main"), Some(commit(4)));
        assert_eq!(s.branch_tip("repo", "nope"), None);
    }

    #[test]
    fn only_descendants_supersede() {
        let mut s = State::default();
        submit(&mut s, 1);
        s.register("a", 1, 1, &[], &[], &[]);
        s.assign();
        submit(&mut s, 2);
        // Commit 3 rewrote history: it descends from neither 1 nor 2.
        let stopped =
            s.submit("repo", "main", commit(3), Supersede::CancelRunning, |_| false, &one_file(), None, 3).unwrap();
        assert!(stopped.is_empty());
        assert_eq!(s.report(&commit(1)).unwrap().status, CommitStatus::Running);
        assert_eq!(s.report(&commit(2)).unwrap().status, CommitStatus::Queued);
        // Queued ones are candidates even for SkipQueued; the running one only for CancelRunning.
        let mut skippable = s.supersede_candidates("repo", "main", Supersede::SkipQueued);
        skippable.sort();
        assert_eq!(skippable, vec![commit(2), commit(3)]);
        assert_eq!(s.supersede_candidates("repo", "main", Supersede::CancelRunning).len(), 3);
        // Commit 4 descends from 1 only: 1 is cancelled, 2 and 3 stay.
        let stopped = s
            .submit("repo", "main", commit(4), Supersede::CancelRunning, |c| *c == commit(1), &one_file(), None, 4)
            .unwrap();
        assert_eq!(stopped.iter().map(|s| s.commit).collect::<Vec<_>>(), vec![commit(1)]);
        assert_eq!(s.report(&commit(1)).unwrap().status, CommitStatus::Cancelled);
        assert_eq!(s.report(&commit(2)).unwrap().status, CommitStatus::Queued);
        assert!(s.supersede_candidates("repo", "main", Supersede::Nothing).is_empty());
    }

    #[test]
    fn a_repository_belongs_to_its_first_submitter_unless_pinned() {
        let mut s = State::default();
        assert_eq!(s.claim_repo("/srv/a", "watcher"), Ok(true));
        assert_eq!(s.claim_repo("/srv/a", "watcher"), Ok(false));
        let refused = s.claim_repo("/srv/a", "intruder").unwrap_err();
        assert_eq!(refused.to_string(), "repository /srv/a belongs to observer watcher, not intruder");
        assert!(s.may_read_repo("/srv/a", "intruder").is_err());
        assert!(s.may_read_repo("/srv/a", "watcher").is_ok());
        // Nobody owns it yet: reading binds nothing.
        assert!(s.may_read_repo("/srv/b", "intruder").is_ok());
        assert_eq!(s.owner("/srv/b"), None);
        // The operator's word wins over the first submitter.
        s.pin_owners([("/srv/a".to_owned(), "intruder".to_owned())]);
        assert_eq!(s.claim_repo("/srv/a", "intruder"), Ok(false));
        assert!(s.claim_repo("/srv/a", "watcher").is_err());
        // Restored bindings hold like new ones; names are escaped in the reason.
        s.restore_owners([("/srv/c\nx".to_owned(), "w\n2".to_owned())]);
        let refused = s.claim_repo("/srv/c\nx", "other").unwrap_err();
        assert_eq!(refused.to_string(), "repository /srv/c\\nx belongs to observer w\\n2, not other");
    }

    #[test]
    fn only_the_lease_holder_gets_the_source() {
        let mut s = State::default();
        submit(&mut s, 1);
        submit(&mut s, 2);
        s.register("a", 1, 1, &[], &[], &[]);
        s.register("b", 2, 1, &[], &[], &[]);
        let d = s.assign();
        let (to_a, to_b) = if d[0].conn == 1 { (&d[0], &d[1]) } else { (&d[1], &d[0]) };
        let lease = |d: &Dispatch| Held { job: d.assignment.job, attempt: d.assignment.attempt };
        let (ca, cb) = (to_a.assignment.commit, to_b.assignment.commit);
        assert_eq!(s.source_access(lease(to_a), &ca, 1, "a"), Ok(()));
        // b's lease, b's commit, from a: refused; a's lease with b's commit: refused.
        assert!(matches!(s.source_access(lease(to_b), &cb, 1, "a"), Err(SourceRefusal::NotLeased { .. })));
        assert!(matches!(s.source_access(lease(to_a), &cb, 1, "a"), Err(SourceRefusal::NotLeased { .. })));
        // A connection that never registered, or a made-up lease.
        assert!(matches!(s.source_access(lease(to_a), &ca, 9, "a"), Err(SourceRefusal::NotLeased { .. })));
        let made_up = Held { job: 77, attempt: 1 };
        assert!(matches!(s.source_access(made_up, &ca, 1, "a"), Err(SourceRefusal::NotLeased { .. })));
        // A stale attempt of a live job.
        let stale = Held { attempt: 0, ..lease(to_a) };
        assert!(matches!(s.source_access(stale, &ca, 1, "a"), Err(SourceRefusal::NotLeased { .. })));
        // a's lease ends (cancelled): refused, but as a race, not an attack.
        s.stop(&ca, CommitStatus::Cancelled, "x".into(), 5).unwrap();
        assert!(matches!(s.source_access(lease(to_a), &ca, 1, "a"), Err(SourceRefusal::Ended { .. })));
        assert!(matches!(s.source_access(lease(to_a), &ca, 2, "b"), Err(SourceRefusal::NotLeased { .. })));
    }

    #[test]
    fn cancelling_frees_the_slot_and_ends_the_commit() {
        let mut s = State::default();
        submit(&mut s, 1);
        submit(&mut s, 2);
        s.register("a", 1, 1, &[], &[], &[]);
        let d = s.assign().remove(0);
        let stopped = s.stop(&commit(1), CommitStatus::Cancelled, "cancelled by admin".into(), 7).unwrap();
        assert_eq!(stopped.batches, vec![(d.assignment.job, Some(1))]);
        assert!(s.stop(&commit(1), CommitStatus::Cancelled, "again".into(), 8).is_none());
        assert!(s.finish(d.assignment.job, 1, 1, None, 9).is_err());
        assert_eq!(s.assign().remove(0).assignment.commit, commit(2));
        let queued = s.stop(&commit(2), CommitStatus::Cancelled, "x".into(), 9);
        assert!(queued.is_some());
    }

    #[test]
    fn restored_running_work_waits_for_its_runner_or_is_requeued() {
        let mut s = State::default();
        submit(&mut s, 1);
        submit(&mut s, 2);
        submit(&mut s, 3);
        s.register("a", 1, 2, &[], &[], &[]);
        let d = s.assign();
        let (one, two) = (d[0].assignment.clone(), d[1].assignment.clone());
        s.record_test(one.job, 1, 1, result("t", Outcome::Pass)).unwrap();
        s.file_done(one.job, 1, 1, "tests/test_a.py".into()).unwrap();
        let entries: Vec<CommitEntry> =
            [commit(3), commit(2), commit(1)].iter().map(|c| s.entry(c).unwrap().clone()).collect();

        // A new dispatcher process.
        let mut fresh = State::default();
        fresh.restore(entries);
        assert_eq!(fresh.newest(), Some(commit(3)));
        // Nobody may report on a restored lease until its runner claims it.
        assert!(fresh.record_test(one.job, 1, 1, result("u", Outcome::Pass)).is_err());
        // Runner "a" comes back still working on job one, but not on job two.
        let held = [Held { job: one.job, attempt: 1 }, Held { job: 99, attempt: 1 }];
        assert_eq!(fresh.register("a", 5, 2, &held, &[], &[]), (None, vec![one.job]));
        assert!(fresh.holds(one.job, 1, 5));
        assert_eq!(fresh.record_test(one.job, 1, 5, result("u", Outcome::Pass)), Ok(true));
        // Job two's lease is unclaimed; after the grace period it is queued again.
        assert_eq!(fresh.expire_orphans(), vec![commit(2)]);
        let d = fresh.assign();
        assert_eq!(d.len(), 1, "commit 3 waits: both slots would be full");
        assert_eq!((d[0].assignment.commit, d[0].assignment.attempt), (commit(2), 2));
        assert_eq!(fresh.report(&commit(1)).unwrap().counts.total, 2);
        // New jobs never reuse a restored id.
        fresh.submit("repo", "main", commit(4), Supersede::Nothing, |_| true, &one_file(), None, 4).unwrap();
        assert!(fresh.entry(&commit(4)).unwrap().job > two.job.max(one.job));
    }

    #[test]
    fn a_late_runner_cannot_claim_a_reassigned_job() {
        let mut s = State::default();
        submit(&mut s, 1);
        s.register("a", 1, 1, &[], &[], &[]);
        let first = s.assign().remove(0).assignment;
        s.unregister("a", 1);
        s.register("b", 2, 1, &[], &[], &[]);
        let second = s.assign().remove(0).assignment;
        assert_eq!(second.attempt, 2);
        // "a" comes back claiming attempt 1: refused, and b keeps the lease.
        let (_, adopted) = s.register("a", 3, 1, &[Held { job: first.job, attempt: 1 }], &[], &[]);
        assert!(adopted.is_empty());
        assert!(s.holds(second.job, 2, 2));
        assert!(!s.holds(first.job, 1, 3));
    }

    /// Checks the invariants listed in the module docs.
    fn check_invariants(s: &State, finals: &mut HashMap<CommitId, CommitStatus>) {
        for (commit, e) in &s.commits {
            let queued = s.queue.iter().filter(|&&c| c == *commit).count();
            let pending: BTreeSet<&String> = e.pending.iter().collect();
            assert_eq!(pending.len(), e.pending.len(), "{commit:?}: a file pending twice");
            let pending_ms: u64 = e.pending.iter().map(|f| e.files.get(f).copied().unwrap_or(0)).sum();
            assert_eq!(e.pending_ms, pending_ms, "{commit:?}: the pending files' estimate drifted");
            let done_ms: u64 = e.done_files.iter().map(|f| e.estimate(f)).sum();
            assert_eq!(e.done_ms, done_ms, "{commit:?}: the done files' estimate drifted");
            if !e.status.is_final() {
                let left = e.batches.values().flat_map(|b| &b.files).filter(|f| !e.done_files.contains(*f));
                let running_ms: u64 = left.map(|f| e.estimate(f)).sum();
                assert_eq!(e.running_ms(), running_ms, "{commit:?}: the running files' estimate drifted");
            }
            let mut leased = BTreeSet::new();
            // With a matrix every unit has a version, without one none has.
            let versioned = e.files.keys().filter(|u| split_unit(u).0.is_some()).count();
            assert!(versioned == 0 || versioned == e.files.len(), "{commit:?}: units with and without a version");
            for (job, b) in &e.batches {
                assert_eq!(b.job, *job);
                assert_eq!(s.jobs.get(job), Some(commit), "a batch's job names its commit");
                for f in &b.files {
                    assert_eq!(split_unit(f).0, b.python.as_deref(), "{f} in a batch for Python {:?}", b.python);
                }
                // A file that leaves its batch for a retry leaves its slot with the batch.
                assert!(b.slots >= 1 && b.slots as usize <= (b.files.len() + e.retries.len()).max(1));
                for f in &b.files {
                    assert!(e.files.contains_key(f), "{f} leased but never listed");
                    assert!(leased.insert(f), "{f} leased twice");
                    assert!(!pending.contains(f), "{f} both queued and leased");
                }
                if let Some(conn) = b.lease.conn {
                    let runner = s.runners.get(&b.lease.runner).expect("its runner is registered");
                    assert_eq!(runner.conn, conn);
                    assert_eq!(runner.jobs.get(job), Some(&b.slots));
                }
            }
            for f in &pending {
                assert!(e.files.contains_key(*f), "{f} pending but never listed");
                assert!(!e.done_files.contains(*f), "{f} both done and pending");
            }
            match e.status {
                CommitStatus::Queued => {
                    assert_eq!(queued, 1, "{commit:?} queued {queued} times");
                    assert!(e.batches.is_empty() && !e.pending.is_empty());
                }
                CommitStatus::Running => {
                    assert!(!e.batches.is_empty(), "running without a batch");
                    assert_eq!(queued, usize::from(!e.pending.is_empty()));
                }
                status => {
                    assert_eq!(queued, 0);
                    assert!(e.batches.is_empty() && e.pending.is_empty());
                    // Ended by its results: every file is done.
                    if matches!(status, CommitStatus::Passed | CommitStatus::Failed) {
                        assert!(e.files.keys().all(|f| e.done_files.contains(f)), "{commit:?} final with files undone");
                    }
                    // A final status never changes.
                    assert_eq!(*finals.entry(*commit).or_insert(status), status);
                }
            }
            for (file, retries) in &e.retries {
                assert!(*retries >= 1 && *retries <= s.retry_failed, "{file} queued again {retries} times");
            }
            for (id, t) in &e.tests {
                assert_eq!(*id, t.key(), "a result stored under another key");
                assert!(e.files.contains_key(&unit(t.python.as_deref(), &t.file)), "{id}: a result for no unit");
                let retries = e.retries.get(&unit(t.python.as_deref(), &t.file)).copied().unwrap_or(0) as usize;
                assert!(t.runs() <= 1 + retries, "{id} has more runs than its file");
                assert!(!t.flaky || t.runs() >= 2, "{id} flaky after one run");
                assert!(t.runner.as_ref().is_some_and(|r| e.runners.contains(r)), "a result without its runner");
            }
        }
        for (name, r) in &s.runners {
            assert!(r.jobs.values().sum::<u32>() <= r.slots, "{name} has more files running than slots");
            for job in r.jobs.keys() {
                let e = &s.commits[&s.jobs[job]];
                let lease = e.batches.get(job).map(|b| (&b.lease.runner, b.lease.conn));
                assert_eq!(lease, Some((name, Some(r.conn))));
            }
        }
    }

    /// What a store holds after applying every stored event's changes.
    #[derive(Default)]
    struct Stored {
        rows: HashMap<CommitId, CommitRow>,
        tests: HashMap<CommitId, BTreeMap<String, TestResult>>,
        done: HashMap<CommitId, BTreeSet<String>>,
        files: HashMap<CommitId, BTreeSet<String>>,
        batches: BTreeMap<u64, BatchRow>,
        retries: HashMap<CommitId, BTreeMap<String, u32>>,
    }

    impl Stored {
        fn apply(&mut self, changes: &[Change]) {
            for change in changes {
                match change {
                    Change::Commit(row) => {
                        self.rows.insert(row.commit, row.clone());
                    }
                    Change::Test { commit, result } => {
                        assert!(self.rows.contains_key(commit), "a result before its commit's row");
                        let old = self.tests.entry(*commit).or_default().insert(result.key(), result.clone());
                        // Replaced only by a later run of its file.
                        assert!(old.is_none_or(|o| o.runs() < result.runs()), "a result stored twice");
                    }
                    Change::FileDone { commit, file } => {
                        self.done.entry(*commit).or_default().insert(file.clone());
                    }
                    Change::Files { commit, files } => {
                        assert!(self.rows.contains_key(commit), "files before their commit's row");
                        assert!(self.files.insert(*commit, files.iter().cloned().collect()).is_none());
                    }
                    Change::Batch(b) => {
                        assert!(self.rows.contains_key(&b.commit), "a batch before its commit's row");
                        // Stored again only when a file left it for a retry.
                        let old = self.batches.insert(b.job, b.clone());
                        assert!(
                            old.is_none_or(
                                |o| o.files.len() > b.files.len() && b.files.iter().all(|f| o.files.contains(f))
                            ),
                            "a batch stored twice"
                        );
                    }
                    Change::Retry { commit, file, retries } => {
                        let old = self.retries.entry(*commit).or_default().insert(file.clone(), *retries);
                        assert_eq!(old.unwrap_or(0) + 1, *retries, "retries count up by one");
                    }
                    Change::BatchEnded { job } => {
                        assert!(self.batches.remove(job).is_some(), "an unknown batch ended");
                    }
                    Change::Owner { .. } => {}
                }
            }
        }

        /// Disk and memory agree on everything durable.
        fn check(&self, s: &State) {
            assert_eq!(self.rows.len(), s.commits.len());
            let mut batches = BTreeMap::new();
            for (commit, e) in &s.commits {
                assert_eq!(self.rows.get(commit), Some(&e.row()), "the stored row of {commit:?} is stale");
                assert_eq!(self.tests.get(commit).cloned().unwrap_or_default(), e.tests);
                assert_eq!(self.done.get(commit).cloned().unwrap_or_default(), e.done_files);
                let files: BTreeSet<String> = e.files.keys().cloned().collect();
                assert_eq!(self.files.get(commit).cloned().unwrap_or_default(), files);
                assert_eq!(self.retries.get(commit).cloned().unwrap_or_default(), e.retries);
                batches.extend(e.batches.values().map(|b| (b.job, e.batch_row(b))));
            }
            assert_eq!(self.batches, batches);
        }

        /// What a restarted dispatcher loads.
        fn load(&self) -> Vec<CommitEntry> {
            let mut out: Vec<CommitEntry> = self
                .rows
                .values()
                .map(|r| CommitEntry {
                    commit: r.commit,
                    repo: r.repo.clone(),
                    branch: r.branch.clone(),
                    seq: r.seq,
                    status: r.status,
                    error: r.error.clone(),
                    runners: r.runner.iter().flat_map(|x| x.split(", ")).map(str::to_owned).collect(),
                    warnings: r.warnings.clone(),
                    queued_at_ms: r.queued_at_ms,
                    finished_at_ms: r.finished_at_ms,
                    tree: r.tree,
                    job: r.job,
                    attempt: r.attempt,
                    files: self.files.get(&r.commit).into_iter().flatten().map(|f| (f.clone(), 0)).collect(),
                    pending: VecDeque::new(),
                    pending_ms: 0,
                    done_ms: 0,
                    total_ms: 0,
                    divisor: GUESSED_DIVISOR,
                    batches: self
                        .batches
                        .values()
                        .filter(|b| b.commit == r.commit)
                        .map(|b| {
                            let lease = Lease { runner: b.runner.clone(), conn: None };
                            (
                                b.job,
                                Batch {
                                    job: b.job,
                                    attempt: b.attempt,
                                    files: b.files.clone(),
                                    slots: b.slots,
                                    lease,
                                    python: b.python.clone(),
                                },
                            )
                        })
                        .collect(),
                    tests: self.tests.get(&r.commit).cloned().unwrap_or_default(),
                    done_files: self.done.get(&r.commit).cloned().unwrap_or_default(),
                    retries: self.retries.get(&r.commit).cloned().unwrap_or_default(),
                    avoid: BTreeMap::new(),
                })
                .collect();
            out.sort_by_key(|e| e.seq);
            out
        }
    }

    #[test]
    fn random_event_sequences_keep_the_invariants() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let all = files(&["a", "b", "c", "d", "e", "f"]);
        let (mut retried, mut flaky) = (0, 0);
        // The interpreter matrix: commits asking for none, for two versions,
        // or for one no runner may have; runners with none, some or all.
        let matrices: [&[&str]; 6] = [&[], &[], &[], &[], &["3.11", "3.12"], &["3.13"]];
        let interpreters: [&[&str]; 6] =
            [&["3.11.7", "3.12.1"], &["3.11.7", "3.12.1"], &["3.11.7", "3.12.1"], &[], &["3.11.7"], &["3.12.1"]];
        let (mut versioned, mut unserved) = (0, 0);
        for _ in 0..300 {
            let mut s = State::default();
            let retry_failed = next(3) as u32;
            s.set_retry_failed(retry_failed);
            let mut finals = HashMap::new();
            let mut known: Vec<Dispatch> = Vec::new();
            let mut stored = Stored::default();
            for step in 0..200u64 {
                let n = (next(6) + 1) as u8;
                let runner = format!("r{}", next(3));
                let conn = next(5) as usize;
                // Mostly a recent assignment (likely still current), sometimes
                // an old one, sometimes a made-up one.
                let back = if next(4) == 0 { next(known.len() as u64 + 1) } else { next(4) } as usize;
                let seen =
                    known.len().checked_sub(back + 1).and_then(|i| known.get(i)).filter(|_| next(5) > 0).cloned();
                let (job, attempt, conn) = match &seen {
                    Some(d) => (d.assignment.job, d.assignment.attempt, d.conn),
                    None => (next(12), next(4) as u32, conn),
                };
                // Mostly a file of the batch, sometimes any file.
                let file = match &seen {
                    Some(d) if next(5) > 0 && !d.assignment.files.is_empty() => {
                        d.assignment.files[next(d.assignment.files.len() as u64) as usize].clone()
                    }
                    _ => all[next(all.len() as u64) as usize].clone(),
                };
                let id = format!("{file}:t{}", next(3));
                let holder = s.holds(job, attempt, conn);
                // Some events fail to be stored: they must leave no trace.
                let before = (next(5) == 0).then(|| s.clone());
                s.begin(step);
                let accepted = match next(13) {
                    0 => {
                        let supersede =
                            [Supersede::Nothing, Supersede::SkipQueued, Supersede::CancelRunning][next(3) as usize];
                        let listed: Vec<String> = all.iter().filter(|_| next(3) > 0).cloned().collect();
                        let branch = ["a", "b"][next(2) as usize];
                        let versions: Vec<String> =
                            matrices[next(6) as usize].iter().map(|v| (*v).to_owned()).collect();
                        let listed = units(&listed, &versions);
                        let _ = s.submit("repo", branch, commit(n), supersede, |_| true, &listed, None, step);
                        false
                    }
                    1 => {
                        let held = [Held { job, attempt }];
                        let held: &[Held] = if next(2) == 0 { &held } else { &[] };
                        let pythons: Vec<String> =
                            interpreters[next(6) as usize].iter().map(|v| (*v).to_owned()).collect();
                        s.register(&runner, conn, next(4) as u32 + 1, held, &[], &pythons);
                        false
                    }
                    2 => {
                        s.unregister(&runner, conn);
                        false
                    }
                    3..=5 => {
                        let given = s.assign();
                        for d in &given {
                            // A batch with a version goes only to a runner with that interpreter.
                            let r = &s.runners[&d.runner];
                            if let Some(wanted) = &d.assignment.python {
                                assert!(r.pythons.iter().any(|p| python_matches(wanted, p)), "{wanted} to {r:?}");
                                versioned += 1;
                            }
                        }
                        // Nothing left that a free runner could take: a commit
                        // nobody can serve does not hold up the ones behind it.
                        for e in s.queued() {
                            for (name, r) in &s.runners {
                                let takes = r.free() > 0 && e.pending.iter().any(|u| r.serves(u));
                                assert!(!takes, "{name} has a free slot for {:?}'s waiting units", e.commit);
                            }
                            unserved += usize::from(!s.unserved_pythons(e).is_empty());
                        }
                        known.extend(given);
                        false
                    }
                    6 | 7 => {
                        let outcome = [Outcome::Pass, Outcome::Fail, Outcome::Error][next(3) as usize];
                        // What the runner says of the version is not its to say either.
                        let python = (next(4) == 0).then(|| "9.9".to_owned());
                        let result = TestResult { outcome, python, ..result_in(&id, &file, next(100)) };
                        s.record_test(job, attempt, conn, result).is_ok()
                    }
                    8 | 9 => s.file_done(job, attempt, conn, file.clone()).is_ok(),
                    10 => s.finish(job, attempt, conn, (next(6) == 0).then(|| "boom".into()), step).is_ok(),
                    11 => s.abandon(job, attempt, conn).is_some(),
                    _ => {
                        let _ = s.stop(&commit(n), CommitStatus::Cancelled, "stop".into(), step);
                        false
                    }
                };
                // A lease only from its current holder.
                assert!(!accepted || holder, "an event accepted from a connection not holding the lease");
                match before {
                    Some(before) => {
                        s.rollback();
                        assert_eq!(s, before, "a failed event left a trace");
                    }
                    None => {
                        stored.apply(&s.changes());
                        s.commit();
                    }
                }
                check_invariants(&s, &mut finals);
                stored.check(&s);
                // Now and then the dispatcher restarts from what is stored.
                if next(40) == 0 {
                    let mut fresh = State::default();
                    fresh.set_retry_failed(retry_failed);
                    fresh.restore(stored.load());
                    check_invariants(&fresh, &mut finals);
                    for e in fresh.commits.values() {
                        let was = &s.commits[&e.commit];
                        assert_eq!(
                            (&e.tests, &e.done_files, e.status.is_final()),
                            (&was.tests, &was.done_files, was.status.is_final())
                        );
                    }
                    // Restored leases belong to no connection until claimed.
                    assert!(fresh.commits.values().flat_map(|e| e.batches.values()).all(|b| b.lease.conn.is_none()));
                    s = fresh;
                    known.clear();
                }
            }
            retried += stored.retries.values().map(BTreeMap::len).sum::<usize>();
            flaky += stored.tests.values().flat_map(|t| t.values()).filter(|t| t.flaky).count();
        }
        // The sequences reach what they are meant to check.
        assert!(retried > 0 && flaky > 0, "{retried} files retried, {flaky} flaky tests");
        assert!(versioned > 0 && unserved > 0, "{versioned} batches with a version, {unserved} unserved");
    }
}
