//! The dispatcher's core: one event in, what must happen out. An event (a
//! submission, a registration, a runner's result, a lost connection, a
//! timer, a cancel) goes to [`State`], which changes with a journal; the
//! changes are stored through the [`Store`] in one transaction, and only
//! if that succeeds are the effects ([`Effects`]: assignments to send,
//! leases to cancel, an [`Update`] for subscribers) handed back to be acted
//! on. If storing fails the state is rolled back and the caller gets the
//! error: nobody is told of a change that is not on disk.
//!
//! No sockets here: the server's owner task feeds events in and acts on the
//! effects, which keeps this contract testable with a store that fails on
//! demand.

use std::collections::HashSet;
use std::sync::Arc;

use kiln_proto::wire::{Held, Supersede};
use kiln_proto::{CommitId, CommitStatus, TestResult};

use crate::state::{ConnId, Dispatch, NotOwner, Stale, State, Stopped};
use crate::store::{Change, Store, StoreError};
use crate::stream::{Snapshot, Update};
use crate::view::CoreMetrics;

/// Something that happened, as the state machine sees it. Jobs are named by
/// `job`, `attempt` (the fencing token) and `conn`, the runner connection
/// the event came from, as in [`State`]'s methods.
#[derive(Clone, Debug)]
#[expect(missing_docs, reason = "each variant's doc says what its fields are; they mirror State's arguments")]
pub enum Event {
    /// An observer submits to a repository: bind it if nobody owns it.
    Claim { repo: String, observer: String },
    /// A commit is submitted; `descends` are the candidates it descends
    /// from, `files` its test files as listed from the mirror, and
    /// `listing_warning` the links under `tests/` that were not followed,
    /// and `config_error` what is wrong with its `kiln.toml`, if anything
    /// (then it ends at once as `error` with that message), and `versions`
    /// the Python versions its configuration asks for (the matrix: each
    /// file is queued once per version; empty: once, for any runner).
    Submit {
        repo: String,
        branch: String,
        commit: CommitId,
        supersede: Supersede,
        descends: HashSet<CommitId>,
        files: Vec<String>,
        listing_warning: Option<String>,
        config_error: Option<String>,
        /// The commit's tree, as the mirror has it (`None` if it could not be read).
        tree: Option<kiln_proto::TreeId>,
        versions: Vec<String>,
    },
    /// A runner registers on a connection, holding these leases.
    Register { name: String, conn: ConnId, slots: u32, held: Vec<Held>, gaps: Vec<String>, pythons: Vec<String> },
    /// A runner's connection is gone.
    RunnerGone { name: String, conn: ConnId },
    /// A test ended.
    Test { job: u64, attempt: u32, conn: ConnId, result: TestResult },
    /// Every test of a file was reported.
    FileDone { job: u64, attempt: u32, conn: ConnId, file: String },
    /// A file of the batch was not run, and why.
    NotRun { job: u64, attempt: u32, conn: ConnId, file: String, reason: String },
    /// The runner says the results should be read with this.
    Warning { job: u64, attempt: u32, conn: ConnId, warning: String },
    /// The runner ended the job.
    Finished { job: u64, attempt: u32, conn: ConnId, error: Option<String> },
    /// The runner gave the job back, or its stream broke.
    Abandon { job: u64, attempt: u32, conn: ConnId },
    /// A commit is stopped: cancelled by an admin, or timed out.
    Stop { commit: CommitId, status: CommitStatus, reason: String },
    /// The grace period after a restart is over.
    ExpireOrphans,
}

impl Event {
    /// What the event would record, for the error when it cannot be stored.
    pub fn describe(&self) -> String {
        match self {
            Event::Claim { repo, .. } => format!("the owner of repository {}", kiln_proto::escaped(repo)),
            Event::Submit { commit, .. } => format!("the submission of {commit}"),
            Event::Register { name, .. } => format!("the registration of runner {}", kiln_proto::escaped(name)),
            Event::RunnerGone { name, .. } => format!("the departure of runner {}", kiln_proto::escaped(name)),
            Event::Test { job, result, .. } => format!("job {job}'s result of {}", kiln_proto::escaped(&result.id)),
            Event::FileDone { job, file, .. } => format!("job {job}'s end of {}", kiln_proto::escaped(file)),
            Event::NotRun { job, file, .. } => {
                format!("job {job}'s report that {} was not run", kiln_proto::escaped(file))
            }
            Event::Warning { job, .. } => format!("a warning of job {job}"),
            Event::Finished { job, .. } => format!("the end of job {job}"),
            Event::Abandon { job, .. } => format!("requeueing job {job}"),
            Event::Stop { commit, status, .. } => format!("{commit} as {status}"),
            Event::ExpireOrphans => "requeueing unclaimed work".to_owned(),
        }
    }
}

/// The state machine's answer to the one who sent the event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(missing_docs, reason = "each variant's doc says what its fields are")]
pub enum Answer {
    /// To [`Event::Claim`]: whether this call bound the repository.
    Claimed(Result<bool, NotOwner>),
    /// To [`Event::Submit`]: `None` if the commit was known; else what it superseded.
    Submitted(Option<Vec<Stopped>>),
    /// To [`Event::Register`]: the old connection to close, and the adopted jobs.
    Registered { replaced: Option<ConnId>, adopted: Vec<u64> },
    /// To events that requeue work: the commits requeued.
    Requeued(Vec<CommitId>),
    /// To a job's test, file or warning: whether it was new, or why it was
    /// refused, and whether the commit has ended (late events are expected then).
    Recorded { result: Result<bool, Stale>, ended: bool },
    /// A job's warnings are over the limit.
    TooManyWarnings,
    /// To [`Event::Finished`]: the commit, its status (still running while
    /// other batches run) and test count, or why it was refused.
    Finished { result: Result<(CommitId, CommitStatus, usize), Stale>, ended: bool },
    /// To [`Event::Abandon`]: the commit requeued, if it was.
    Abandoned(Option<CommitId>),
    /// To [`Event::Stop`]: whether anything was stopped.
    Stopped(bool),
}

/// What must happen now that an event's changes are stored.
#[derive(Debug)]
pub struct Effects {
    /// For the sender of the event.
    pub answer: Answer,
    /// Assignments to send.
    pub dispatches: Vec<Dispatch>,
    /// Commits stopped: the runners of their running batches must be told.
    pub stopped: Vec<Stopped>,
    /// What to tell subscribers, if anything durable changed.
    pub update: Option<Arc<Update>>,
}

/// At most this many warnings per commit.
const MAX_WARNINGS: usize = 32;

/// The state machine and its store.
pub struct Core<S> {
    state: State,
    store: S,
    /// The last update published.
    seq: u64,
    /// How long storing takes, for `/metrics`.
    metrics: Arc<CoreMetrics>,
}

impl<S: Store> Core<S> {
    /// A core over `state`, which `store` already holds.
    pub fn new(state: State, store: S) -> Core<S> {
        Core { state, store, seq: 0, metrics: Arc::default() }
    }

    /// Where the core records its measurements (shared with readers).
    pub fn metrics(&self) -> Arc<CoreMetrics> {
        Arc::clone(&self.metrics)
    }

    /// The state, to read.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Everything stored, and the last update it includes.
    pub fn snapshot(&mut self) -> Result<Snapshot, StoreError> {
        Ok(Snapshot { seq: self.seq, entries: self.store.load()? })
    }

    /// Takes one event at `now_ms`: decides, stores, and says what to do.
    /// On a store error nothing changed, in memory or on disk.
    pub fn handle(&mut self, event: Event, now_ms: u64) -> Result<Effects, StoreError> {
        let mut effects = self.handle_all(vec![event], now_ms)?;
        Ok(effects.pop().expect("one effects per event"))
    }

    /// Takes several events at `now_ms`, in order, and stores all their
    /// changes in one transaction (group commit): what each must cause, in
    /// the same order, or an error and nothing changed for any of them.
    ///
    /// One transaction per group is what makes a durable store cheap: the
    /// events that queued up while the previous group was being written
    /// (synced to disk) share the next sync. The update for subscribers
    /// (all the group's changes) comes with the first event's effects.
    pub fn handle_all(&mut self, events: Vec<Event>, now_ms: u64) -> Result<Vec<Effects>, StoreError> {
        self.state.begin(now_ms);
        let mut decided = Vec::with_capacity(events.len());
        for event in events {
            let (answer, stopped, schedule) = step(&mut self.state, event, now_ms);
            // Work freed or added in this event is handed out in the same transaction.
            let dispatches = if schedule { self.state.assign() } else { Vec::new() };
            decided.push((answer, dispatches, stopped));
        }
        let changes = self.state.changes();
        if !changes.is_empty() {
            let started = std::time::Instant::now();
            let stored = self.store.apply(&changes);
            self.metrics.store_write.observe(started.elapsed());
            if let Err(e) = stored {
                self.metrics.store_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.state.rollback();
                return Err(e);
            }
        }
        self.state.commit();
        let deltas: Vec<Change> = changes.into_iter().filter(|c| !matches!(c, Change::Owner { .. })).collect();
        let mut update = (!deltas.is_empty()).then(|| {
            self.seq += 1;
            Arc::new(Update { seq: self.seq, changes: deltas })
        });
        Ok(decided
            .into_iter()
            .map(|(answer, dispatches, stopped)| Effects { answer, dispatches, stopped, update: update.take() })
            .collect())
    }
}

/// Applies one event to the state: the answer, what it stopped, and whether
/// free slots may now be filled.
fn step(s: &mut State, event: Event, now_ms: u64) -> (Answer, Vec<Stopped>, bool) {
    let ended = |s: &State, job: u64| s.commit_of(job).and_then(|c| s.entry(&c)).is_none_or(|e| e.status.is_final());
    match event {
        Event::Claim { repo, observer } => (Answer::Claimed(s.claim_repo(&repo, &observer)), Vec::new(), false),
        Event::Submit {
            repo,
            branch,
            commit,
            supersede,
            descends,
            files,
            listing_warning,
            config_error,
            tree,
            versions,
        } => {
            // The matrix: each file once per version, as its own unit of work.
            let units = crate::state::units(&files, &versions);
            let stopped =
                s.submit(&repo, &branch, commit, supersede, |c| descends.contains(c), &units, listing_warning, now_ms);
            if stopped.is_some() {
                s.set_tree(&commit, tree);
            }
            if stopped.is_some()
                && let Some(reason) = config_error
            {
                s.refuse_config(&commit, reason, now_ms);
            }
            let all = stopped.clone().unwrap_or_default();
            (Answer::Submitted(stopped), all, true)
        }
        Event::Register { name, conn, slots, held, gaps, pythons } => {
            let (replaced, adopted) = s.register(&name, conn, slots, &held, &gaps, &pythons);
            (Answer::Registered { replaced, adopted }, Vec::new(), true)
        }
        Event::RunnerGone { name, conn } => (Answer::Requeued(s.unregister(&name, conn)), Vec::new(), true),
        Event::Test { job, attempt, conn, result } => {
            let result = s.record_test(job, attempt, conn, result);
            (Answer::Recorded { ended: ended(s, job), result }, Vec::new(), false)
        }
        Event::FileDone { job, attempt, conn, file } => {
            let result = s.file_done(job, attempt, conn, file);
            (Answer::Recorded { ended: ended(s, job), result }, Vec::new(), false)
        }
        Event::NotRun { job, attempt, conn, file, reason } => {
            let result = s.not_run(job, attempt, conn, file, &reason);
            (Answer::Recorded { ended: ended(s, job), result }, Vec::new(), false)
        }
        Event::Warning { job, attempt, conn, warning } => {
            let count = s.commit_of(job).and_then(|c| s.entry(&c)).map_or(0, |e| e.warnings.len());
            if count >= MAX_WARNINGS {
                return (Answer::TooManyWarnings, Vec::new(), false);
            }
            let result = s.warn(job, attempt, conn, warning);
            (Answer::Recorded { ended: ended(s, job), result }, Vec::new(), false)
        }
        Event::Finished { job, attempt, conn, error } => {
            let mut stopped = Vec::new();
            let result = s.finish(job, attempt, conn, error, now_ms).map(|(commit, others)| {
                stopped = others;
                let e = s.entry(&commit);
                (commit, e.map_or(CommitStatus::Error, |e| e.status), e.map_or(0, |e| e.tests.len()))
            });
            (Answer::Finished { ended: ended(s, job), result }, stopped, true)
        }
        Event::Abandon { job, attempt, conn } => (Answer::Abandoned(s.abandon(job, attempt, conn)), Vec::new(), true),
        Event::Stop { commit, status, reason } => {
            let stopped = s.stop(&commit, status, reason, now_ms);
            (Answer::Stopped(stopped.is_some()), stopped.into_iter().collect(), true)
        }
        Event::ExpireOrphans => (Answer::Requeued(s.expire_orphans()), Vec::new(), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::Db;
    use crate::state::CommitEntry;
    use kiln_proto::Outcome;

    /// A store that keeps what it is given, and fails while told to.
    #[derive(Default)]
    struct TestStore {
        failing: bool,
        applied: Vec<Change>,
    }

    impl Store for TestStore {
        fn apply(&mut self, changes: &[Change]) -> Result<(), StoreError> {
            if self.failing {
                return Err(StoreError { action: "store".into(), source: "the disk is full".into() });
            }
            self.applied.extend_from_slice(changes);
            Ok(())
        }
        fn load(&mut self) -> Result<Vec<CommitEntry>, StoreError> {
            Ok(Vec::new())
        }
        fn load_owners(&mut self) -> Result<Vec<(String, String)>, StoreError> {
            Ok(Vec::new())
        }
    }

    fn commit(n: u8) -> CommitId {
        format!("{n:040x}").parse().unwrap()
    }

    fn submit(n: u8) -> Event {
        Event::Submit {
            repo: "repo".into(),
            branch: "main".into(),
            commit: commit(n),
            supersede: Supersede::CancelRunning,
            descends: [commit(1)].into(),
            files: vec!["tests/test_a.py".into()],
            listing_warning: None,
            config_error: None,
            tree: Some(commit(100 + n)),
            versions: vec![],
        }
    }

    fn test(job: u64, id: &str) -> Event {
        let result = TestResult::new(id.into(), "tests/test_a.py".into(), Outcome::Pass, 1, String::new());
        Event::Test { job, attempt: 1, conn: 7, result }
    }

    #[test]
    fn nothing_happens_that_was_not_stored() {
        let mut core = Core::new(State::default(), TestStore::default());
        let register =
            Event::Register { name: "r".into(), conn: 7, slots: 1, held: vec![], gaps: vec![], pythons: vec![] };
        core.handle(register, 1).unwrap();

        // A submission that cannot be stored is not queued, not assigned, not published.
        core.store.failing = true;
        let before = core.state.clone();
        assert!(core.handle(submit(1), 2).is_err());
        assert_eq!(core.state, before);
        assert!(!core.state.knows(&commit(1)));
        assert!(core.store.applied.iter().all(|c| !matches!(c, Change::Commit(r) if r.commit == commit(1))));

        // Once storing works, the same submission goes through and is assigned at once.
        core.store.failing = false;
        let effects = core.handle(submit(1), 3).unwrap();
        assert_eq!(effects.answer, Answer::Submitted(Some(vec![])));
        assert_eq!(effects.dispatches.len(), 1);
        let job = effects.dispatches[0].assignment.job;
        let update = effects.update.unwrap();
        assert_eq!(update.seq, 1);
        // The row, the file list and the batch leased: one transaction.
        assert!(matches!(
            &update.changes[..],
            [Change::Commit(r), Change::Files { .. }, Change::Batch(_)]
                if r.status == CommitStatus::Running && r.tree == Some(commit(101))
        ));

        // A result that cannot be stored is not recorded: sent again, it is new.
        core.store.failing = true;
        assert!(core.handle(test(job, "t1"), 4).is_err());
        core.store.failing = false;
        let effects = core.handle(test(job, "t1"), 5).unwrap();
        assert_eq!(effects.answer, Answer::Recorded { result: Ok(true), ended: false });
        assert_eq!(effects.update.unwrap().seq, 2, "a failed event publishes nothing");

        // A superseding commit that cannot be stored stops nothing.
        core.store.failing = true;
        let before = core.state.clone();
        assert!(core.handle(submit(2), 6).is_err());
        assert_eq!(core.state, before);
        assert_eq!(core.state.entry(&commit(1)).unwrap().status, CommitStatus::Running);
        core.store.failing = false;
        let effects = core.handle(submit(2), 7).unwrap();
        assert_eq!(effects.stopped.len(), 1, "the running commit is told to stop");
        // The new commit and the one it superseded are stored together.
        let rows: Vec<CommitId> = effects
            .update
            .unwrap()
            .changes
            .iter()
            .filter_map(|c| if let Change::Commit(r) = c { Some(r.commit) } else { None })
            .collect();
        assert_eq!(rows, vec![commit(1), commit(2)]);
    }

    #[test]
    fn a_read_only_sqlite_database_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let mut core = Core::new(State::default(), Db::open(&path).unwrap());
        core.handle(submit(1), 1).unwrap();
        core.store.set_read_only(true);
        // Commit 2 supersedes the queued commit 1: both rows and 2's files, or none.
        let before = core.state.clone();
        let err = core.handle(submit(2), 2).unwrap_err();
        assert_eq!(core.state, before);
        let chain = kiln_proto::error_chain(&err);
        assert!(chain.contains("store 3 changes") && chain.contains("readonly"), "{chain}");
        core.store.set_read_only(false);
        let effects = core.handle(submit(2), 3).unwrap();
        assert_eq!(effects.update.unwrap().seq, 2);
        drop(core);
        let stored: Vec<(CommitId, CommitStatus)> =
            Db::open(&path).unwrap().load().unwrap().iter().map(|e| (e.commit, e.status)).collect();
        assert_eq!(stored, vec![(commit(1), CommitStatus::Skipped), (commit(2), CommitStatus::Queued)]);
    }
}
