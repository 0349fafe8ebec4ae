//! The stream of changes: after each event's changes are stored, the core
//! publishes them (without repository owners) as one [`Update`] on a
//! `tokio::sync::broadcast` channel. Deltas, never whole reports: a test
//! result costs its own size to publish, however large its commit.
//!
//! Subscribers (the result files, the answers to `kiln results`, and the
//! dashboard to come) rebuild what they show from these deltas with
//! [`Doc`]. One that falls behind is told (broadcast's `Lagged`) and
//! resynchronises from storage with a [`Snapshot`] taken by the core, whose
//! `seq` says which updates it already holds.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use kiln_proto::{CommitId, CommitReport, Counts, FileCounts, TestResult};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::warn;

use crate::state::CommitEntry;
use crate::store::{Change, CommitRow};

/// How many updates a subscriber may fall behind before it must resynchronise.
pub const CAPACITY: usize = 16 * 1024;

/// One event's stored changes.
#[derive(Debug)]
pub struct Update {
    /// Position in the stream: 1, 2, 3… in the order the changes were stored.
    pub seq: u64,
    /// What changed.
    pub changes: Vec<Change>,
}

/// Everything stored, as of the update numbered `seq`.
#[derive(Debug)]
pub struct Snapshot {
    /// The last update this snapshot includes.
    pub seq: u64,
    /// Every commit, with its results.
    pub entries: Vec<CommitEntry>,
}

/// How a subscriber asks the core for a snapshot.
pub type SnapshotRequests = mpsc::Sender<oneshot::Sender<Result<Snapshot, String>>>;

/// A commit as a subscriber rebuilds it from deltas.
#[derive(Clone, Debug)]
pub struct Doc {
    /// Its row.
    pub row: CommitRow,
    /// Its results by id.
    pub tests: BTreeMap<String, TestResult>,
    /// How many test files it has.
    pub files: usize,
    /// Those that are done (a set: a replayed change must not count twice).
    pub done: BTreeSet<String>,
}

impl Doc {
    /// The document of a stored commit.
    pub fn of(entry: &CommitEntry) -> Doc {
        Doc { row: entry.row(), tests: entry.tests.clone(), files: entry.files.len(), done: entry.done_files.clone() }
    }

    /// The commit in a line: what `kiln status` lists.
    pub fn summary(&self) -> kiln_proto::status::CommitSummary {
        let r = &self.row;
        kiln_proto::status::CommitSummary {
            commit: r.commit,
            repo: r.repo.clone(),
            branch: r.branch.clone(),
            status: r.status,
            counts: Counts::of(self.tests.values()),
            files: FileCounts { total: self.files as u64, done: self.done.len() as u64 },
            error: r.error.clone(),
            runner: r.runner.clone(),
            queued_at_ms: r.queued_at_ms,
            finished_at_ms: r.finished_at_ms,
        }
    }

    /// The commit's report.
    pub fn report(&self) -> CommitReport {
        let r = &self.row;
        CommitReport {
            commit: r.commit,
            repo: r.repo.clone(),
            branch: r.branch.clone(),
            status: r.status,
            counts: Counts::of(self.tests.values()),
            error: r.error.clone(),
            runner: r.runner.clone(),
            warnings: r.warnings.clone(),
            queued_at_ms: r.queued_at_ms,
            finished_at_ms: r.finished_at_ms,
            files: FileCounts { total: self.files as u64, done: self.done.len() as u64 },
            tests: self.tests.values().cloned().collect(),
        }
    }
}

/// Applies one change to `docs`; returns the commit it was about, if known.
pub fn apply(docs: &mut HashMap<CommitId, Doc>, change: &Change) -> Option<CommitId> {
    match change {
        Change::Commit(row) => {
            match docs.get_mut(&row.commit) {
                Some(doc) => doc.row = row.clone(),
                None => {
                    docs.insert(
                        row.commit,
                        Doc { row: row.clone(), tests: BTreeMap::new(), files: 0, done: BTreeSet::new() },
                    );
                }
            }
            Some(row.commit)
        }
        Change::Test { commit, result } => {
            let doc = docs.get_mut(commit)?;
            // A test's latest result (a later run of its file may change it), as in the database.
            doc.tests.insert(result.key(), result.clone());
            Some(*commit)
        }
        Change::FileDone { commit, file } => {
            docs.get_mut(commit)?.done.insert(file.clone());
            Some(*commit)
        }
        Change::Files { commit, files } => {
            docs.get_mut(commit)?.files = files.len();
            Some(*commit)
        }
        Change::Retry { commit, .. } => docs.contains_key(commit).then_some(*commit),
        Change::Batch(b) => docs.contains_key(&b.commit).then_some(b.commit),
        // Which commit an ended batch was on is in its row's last update.
        Change::BatchEnded { .. } | Change::Owner { .. } => None,
    }
}

/// What a subscriber gets next.
#[derive(Debug)]
pub enum Next {
    /// The next update.
    Update(Arc<Update>),
    /// It fell behind: start again from this.
    Resync(Snapshot),
    /// The dispatcher is stopping.
    Closed,
}

/// A subscription that resynchronises by itself when it lags.
pub struct Feed {
    /// Who is listening, for the log line when it lags.
    name: &'static str,
    rx: broadcast::Receiver<Arc<Update>>,
    snapshots: SnapshotRequests,
    /// Updates up to here are already in hand (from a snapshot).
    seen: u64,
}

impl Feed {
    /// Follows `rx`, having already seen the updates up to `seen`.
    pub fn new(
        name: &'static str,
        rx: broadcast::Receiver<Arc<Update>>,
        snapshots: SnapshotRequests,
        seen: u64,
    ) -> Feed {
        Feed { name, rx, snapshots, seen }
    }

    /// Waits for the next update, or a snapshot after falling behind.
    pub async fn next(&mut self) -> Next {
        loop {
            match self.rx.recv().await {
                Ok(update) if update.seq <= self.seen => continue,
                Ok(update) => {
                    self.seen = update.seq;
                    return Next::Update(update);
                }
                Err(broadcast::error::RecvError::Closed) => return Next::Closed,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(subscriber = self.name, missed, "fell behind the stream of changes; reloading from storage");
                    let (tx, rx) = oneshot::channel();
                    if self.snapshots.send(tx).await.is_err() {
                        return Next::Closed;
                    }
                    match rx.await {
                        Ok(Ok(snapshot)) => {
                            self.seen = snapshot.seq;
                            return Next::Resync(snapshot);
                        }
                        Ok(Err(e)) => warn!(subscriber = self.name, "cannot reload from storage: {e}"),
                        Err(_) => return Next::Closed,
                    }
                }
            }
        }
    }
}

/// Every commit's report as the stream says it is: what `kiln results`
/// (and `--wait`, which asks again until the commit is final) reads.
#[derive(Debug, Default)]
pub struct Reports {
    docs: HashMap<CommitId, Doc>,
    /// The commit submitted last: (seq, commit).
    newest: Option<(u64, CommitId)>,
}

impl Reports {
    /// The reports of stored commits.
    pub fn of(entries: &[CommitEntry]) -> Reports {
        let mut reports = Reports::default();
        for e in entries {
            reports.docs.insert(e.commit, Doc::of(e));
            reports.note(e.seq, e.commit);
        }
        reports
    }

    fn note(&mut self, seq: u64, commit: CommitId) {
        if self.newest.is_none_or(|(s, _)| seq > s) {
            self.newest = Some((seq, commit));
        }
    }

    /// Applies one update.
    pub fn apply(&mut self, update: &Update) {
        for change in &update.changes {
            if let Change::Commit(row) = change {
                self.note(row.seq, row.commit);
            }
            apply(&mut self.docs, change);
        }
    }

    /// Every commit, newest first (what [`crate::history`] reads).
    pub fn newest_first(&self) -> Vec<&Doc> {
        let mut docs: Vec<&Doc> = self.docs.values().collect();
        docs.sort_unstable_by_key(|d| std::cmp::Reverse(d.row.seq));
        docs
    }

    /// The newest `n` commits' summaries, newest first.
    pub fn newest(&self, n: usize) -> Vec<kiln_proto::status::CommitSummary> {
        self.newest_first().into_iter().take(n).map(Doc::summary).collect()
    }

    /// A commit's report, or the newest commit's.
    pub fn report(&self, commit: Option<CommitId>) -> Option<CommitReport> {
        let commit = commit.or(self.newest.map(|(_, c)| c))?;
        self.docs.get(&commit).map(Doc::report)
    }
}
