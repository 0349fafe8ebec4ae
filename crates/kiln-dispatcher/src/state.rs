//! The dispatcher's bookkeeping as a plain state machine: commits, their jobs
//! and leases, the queue, and runners' free slots. No I/O happens here, so
//! every scheduling and fencing decision is tested as data in, data out.
//!
//! Between [`State::begin`] and [`State::commit`] every change is journalled:
//! [`State::changes`] says what must be stored, and [`State::rollback`] puts
//! the state back exactly as it was when storing them failed, so memory never
//! runs ahead of disk. The journal keeps pre-images of only what an event
//! touched (a commit's row, never its results), so recording one test costs
//! the same however many the commit has.
//!
//! Each commit has one job. Invariants:
//! - a commit that is not final is queued, or leased to exactly one runner,
//!   never both; a lease belongs to that runner's connection, except one
//!   restored after a restart, which waits for its runner to claim it;
//! - an event is accepted only from the connection holding the job's current
//!   attempt (the fencing token), so a late or replaced runner can never
//!   overwrite newer work; a lease restored after a restart belongs to no
//!   connection until its runner claims it when it registers again;
//! - a test id is recorded at most once per commit, and a finished file is
//!   never handed out again;
//! - a commit's source goes only to the connection holding its current lease;
//! - a repository belongs to one observer identity (the first to submit it,
//!   unless the operator named its owner); no other identity submits to it,
//!   reads its branch tips or supersedes its commits;
//! - a new commit supersedes an older one only if it descends from it.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use crate::store::{Change, CommitRow};

use kiln_proto::wire::{Assignment, Held, Supersede};
use kiln_proto::{CommitId, CommitPrefix, CommitReport, CommitStatus, Counts, TestResult, escaped};

/// A connection's stable id: a runner that reconnects gets a new one.
pub type ConnId = usize;

/// Who holds a job's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The runner's name.
    pub runner: String,
    /// Its connection; `None` for a lease restored after a dispatcher
    /// restart, until its runner reconnects and claims it (or the grace
    /// period ends and the job is queued again).
    pub conn: Option<ConnId>,
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
    /// The runner that ran (or runs) it.
    pub runner: Option<String>,
    /// What the results should be read with (the runner's sandbox gaps).
    pub warnings: Vec<String>,
    /// When it was queued (Unix ms).
    pub queued_at_ms: u64,
    /// When it reached a final status (Unix ms).
    pub finished_at_ms: Option<u64>,
    /// The job's id.
    pub job: u64,
    /// The current attempt: 0 until first assigned.
    pub attempt: u32,
    /// The current lease, while running.
    pub lease: Option<Lease>,
    /// Results so far, by test id.
    pub tests: BTreeMap<String, TestResult>,
    /// Files whose every test has been reported.
    pub done_files: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Runner {
    conn: ConnId,
    slots: u32,
    jobs: BTreeSet<u64>,
    /// What its sandbox lacks, copied into each commit it runs.
    sandbox_gaps: Vec<String>,
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
}

/// A job handed to a runner connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    /// The runner's name.
    pub runner: String,
    /// Its connection.
    pub conn: ConnId,
    /// What to tell it.
    pub assignment: Assignment,
}

/// A running job that was stopped: its runner must be told to kill it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stopped {
    /// The commit.
    pub commit: CommitId,
    /// The job.
    pub job: u64,
    /// Its connection, if it was running.
    pub conn: Option<ConnId>,
}

/// What one event changed, to store it or to undo it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Journal {
    /// When the event happened (Unix ms), for the rows that record it.
    now_ms: u64,
    /// Each touched commit as it was before, without results or files;
    /// `None` for a commit this event created.
    before: BTreeMap<CommitId, Option<CommitEntry>>,
    /// Results this event recorded.
    tests: Vec<(CommitId, String)>,
    /// Files this event finished.
    done_files: Vec<(CommitId, String)>,
    /// Repositories this event bound to an observer.
    owners: Vec<String>,
    /// The queue and the runners before the event, if it changed them.
    queue: Option<VecDeque<u64>>,
    runners: Option<BTreeMap<String, Runner>>,
    order_len: usize,
    next_job: u64,
    next_seq: u64,
}

/// All of the dispatcher's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    commits: HashMap<CommitId, CommitEntry>,
    /// Job id → commit.
    jobs: HashMap<u64, CommitId>,
    /// Commits in submission order, for "the newest commit".
    order: Vec<CommitId>,
    queue: VecDeque<u64>,
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
            runner: self.runner.clone(),
            warnings: self.warnings.clone(),
            queued_at_ms: self.queued_at_ms,
            finished_at_ms: self.finished_at_ms,
            job: self.job,
            attempt: self.attempt,
        }
    }

    /// A copy without results and files: what the journal keeps.
    fn light(&self) -> CommitEntry {
        CommitEntry {
            commit: self.commit,
            repo: self.repo.clone(),
            branch: self.branch.clone(),
            seq: self.seq,
            status: self.status,
            error: self.error.clone(),
            runner: self.runner.clone(),
            warnings: self.warnings.clone(),
            queued_at_ms: self.queued_at_ms,
            finished_at_ms: self.finished_at_ms,
            job: self.job,
            attempt: self.attempt,
            lease: self.lease.clone(),
            tests: BTreeMap::new(),
            done_files: BTreeSet::new(),
        }
    }
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

    /// What the open event changed, to be stored in one transaction: rows
    /// first (results refer to them), then results, files and owners.
    pub fn changes(&self) -> Vec<Change> {
        let Some(j) = &self.journal else { return Vec::new() };
        let mut out = Vec::new();
        for (commit, before) in &j.before {
            let Some(now) = self.commits.get(commit) else { continue };
            let row = now.row();
            // A lease moving to a new connection changes nothing durable.
            if before.as_ref().is_none_or(|b| b.row() != row) {
                out.push(Change::Commit(row));
            }
        }
        for (commit, id) in &j.tests {
            if let Some(result) = self.commits.get(commit).and_then(|e| e.tests.get(id)) {
                out.push(Change::Test { commit: *commit, result: result.clone() });
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
        for (commit, id) in &j.tests {
            if let Some(e) = self.commits.get_mut(commit) {
                e.tests.remove(id);
            }
        }
        for (commit, file) in &j.done_files {
            if let Some(e) = self.commits.get_mut(commit) {
                e.done_files.remove(file);
            }
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
                        *e = before;
                    }
                }
            }
        }
        for repo in &j.owners {
            self.owners.remove(repo);
        }
        if let Some(queue) = j.queue {
            self.queue = queue;
        }
        if let Some(runners) = j.runners {
            self.runners = runners;
        }
        self.order.truncate(j.order_len);
        self.next_job = j.next_job;
        self.next_seq = j.next_seq;
    }

    /// Journals a commit's pre-image before its row or lease changes.
    fn touch(&mut self, commit: &CommitId) {
        if let Some(j) = self.journal.as_mut()
            && !j.before.contains_key(commit)
        {
            j.before.insert(*commit, self.commits.get(commit).map(CommitEntry::light));
        }
    }

    fn touch_job(&mut self, job: u64) {
        if let Some(commit) = self.jobs.get(&job).copied() {
            self.touch(&commit);
        }
    }

    fn snap_queue(&mut self) {
        if let Some(j) = self.journal.as_mut()
            && j.queue.is_none()
        {
            j.queue = Some(self.queue.clone());
        }
    }

    fn snap_runners(&mut self) {
        if let Some(j) = self.journal.as_mut()
            && j.runners.is_none()
        {
            j.runners = Some(self.runners.clone());
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

    /// Queues a newly seen commit. Returns `None` (and changes nothing) if it
    /// was submitted before: submission is idempotent. Otherwise returns the
    /// older commits of the same branch that `supersede` stopped: only those
    /// for which `descends_from` says the new commit descends from them, so
    /// a rewritten or unrelated history never stops work.
    pub fn submit(
        &mut self,
        repo: &str,
        branch: &str,
        commit: CommitId,
        supersede: Supersede,
        descends_from: impl Fn(&CommitId) -> bool,
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
        let entry = CommitEntry {
            commit,
            repo: repo.to_owned(),
            branch: branch.to_owned(),
            seq: self.next_seq,
            status: CommitStatus::Queued,
            error: None,
            runner: None,
            warnings: Vec::new(),
            queued_at_ms: now_ms,
            finished_at_ms: None,
            job: self.next_job,
            attempt: 0,
            lease: None,
            tests: BTreeMap::new(),
            done_files: BTreeSet::new(),
        };
        self.insert(entry);
        Some(stopped)
    }

    /// Takes back an entry persisted by an earlier dispatcher process, with
    /// its results and finished files. Work that was running keeps its lease
    /// for its runner to claim when it reconnects (see
    /// [`State::register`] and [`State::expire_orphans`]).
    pub fn restore(&mut self, entries: impl IntoIterator<Item = CommitEntry>) {
        for entry in entries {
            self.restore_one(entry);
        }
        // Restored entries may arrive in any order; keep submission order.
        let commits = &self.commits;
        self.order.sort_by_key(|c| commits.get(c).map(|e| e.seq));
        self.queue.make_contiguous().sort_by_key(|j| self.jobs.get(j).and_then(|c| commits.get(c)).map(|e| e.seq));
    }

    fn restore_one(&mut self, mut entry: CommitEntry) {
        if self.knows(&entry.commit) {
            return;
        }
        entry.lease = match (entry.status, &entry.runner) {
            (CommitStatus::Running, Some(runner)) => Some(Lease { runner: runner.clone(), conn: None }),
            _ => None,
        };
        if entry.status == CommitStatus::Running && entry.lease.is_none() {
            entry.status = CommitStatus::Queued;
        }
        self.next_job = self.next_job.max(entry.job);
        self.next_seq = self.next_seq.max(entry.seq);
        self.insert(entry);
    }

    fn insert(&mut self, entry: CommitEntry) {
        let (commit, job) = (entry.commit, entry.job);
        self.touch(&commit);
        self.snap_queue();
        if entry.status == CommitStatus::Queued {
            self.queue.push_back(job);
        }
        self.jobs.insert(job, commit);
        self.order.push(commit);
        self.commits.insert(commit, entry);
    }

    /// Adds a runner with `slots` free slots, which says it still holds the
    /// assignments `held`. Each held assignment whose lease is still this
    /// runner's (current attempt, not reassigned) moves to `conn`; the
    /// runner's other leases go back to the queue. Returns the old
    /// connection to close, if this is a reconnect, and the adopted jobs.
    pub fn register(
        &mut self,
        name: &str,
        conn: ConnId,
        slots: u32,
        held: &[Held],
        sandbox_gaps: &[String],
    ) -> (Option<ConnId>, Vec<u64>) {
        let mut adopted = Vec::new();
        self.snap_runners();
        for h in held {
            self.touch_job(h.job);
            let Some(entry) = self.jobs.get(&h.job).and_then(|c| self.commits.get_mut(c)) else { continue };
            let Some(lease) = entry.lease.as_mut() else { continue };
            if entry.status == CommitStatus::Running && entry.attempt == h.attempt && lease.runner == name {
                lease.conn = Some(conn);
                adopted.push(h.job);
            }
        }
        let old = self.runners.get(name).map(|r| r.conn).filter(|&c| c != conn);
        if let Some(old) = old {
            // Adopted jobs moved to the new connection; the rest are requeued.
            if let Some(r) = self.runners.get_mut(name) {
                r.jobs.retain(|j| !adopted.contains(j));
            }
            self.unregister(name, old);
        }
        // Registering again on the same connection only changes the slots.
        let runner = self.runners.entry(name.to_owned()).or_insert(Runner {
            conn,
            slots: 1,
            jobs: BTreeSet::new(),
            sandbox_gaps: Vec::new(),
        });
        runner.slots = slots.max(1);
        runner.sandbox_gaps = sandbox_gaps.to_vec();
        runner.jobs.extend(adopted.iter().copied());
        (old, adopted)
    }

    /// The commit a job tests.
    pub fn commit_of(&self, job: u64) -> Option<CommitId> {
        self.jobs.get(&job).copied()
    }

    /// Queues again every restored lease no runner has claimed. Returns the commits.
    pub fn expire_orphans(&mut self) -> Vec<CommitId> {
        let orphans: Vec<u64> = self
            .commits
            .values()
            .filter(|e| e.lease.as_ref().is_some_and(|l| l.conn.is_none()))
            .map(|e| e.job)
            .collect();
        orphans.into_iter().filter_map(|job| self.requeue(job)).collect()
    }

    /// Whether `conn` holds the current lease of `job` at `attempt`.
    pub fn holds(&self, job: u64, attempt: u32, conn: ConnId) -> bool {
        self.jobs.get(&job).and_then(|c| self.commits.get(c)).is_some_and(|e| {
            e.status == CommitStatus::Running
                && e.attempt == attempt
                && e.lease.as_ref().is_some_and(|l| l.conn == Some(conn))
        })
    }

    /// Removes the runner connection `conn` and puts its unfinished jobs back
    /// at the front of the queue. Returns the commits of the requeued jobs.
    pub fn unregister(&mut self, name: &str, conn: ConnId) -> Vec<CommitId> {
        let Some(runner) = self.runners.get(name).filter(|r| r.conn == conn) else { return Vec::new() };
        let jobs: Vec<u64> = runner.jobs.iter().copied().collect();
        self.snap_runners();
        self.runners.remove(name);
        let mut requeued = Vec::new();
        for &job in jobs.iter().rev() {
            requeued.extend(self.requeue(job));
        }
        requeued
    }

    /// Puts a leased job back at the front of the queue.
    fn requeue(&mut self, job: u64) -> Option<CommitId> {
        let commit = *self.jobs.get(&job)?;
        self.touch(&commit);
        self.snap_queue();
        self.snap_runners();
        let entry = self.commits.get_mut(&commit)?;
        let lease = entry.lease.take()?;
        if let Some(r) = self.runners.get_mut(&lease.runner) {
            r.jobs.remove(&job);
        }
        entry.status = CommitStatus::Queued;
        entry.runner = None;
        self.queue.push_front(job);
        Some(commit)
    }

    /// Pairs queued jobs with free runner slots, least busy runner first.
    pub fn assign(&mut self) -> Vec<Dispatch> {
        let mut out = Vec::new();
        if !self.queue.is_empty() {
            self.snap_queue();
            self.snap_runners();
        }
        while !self.queue.is_empty() {
            let Some((name, runner)) = self
                .runners
                .iter_mut()
                .filter(|(_, r)| (r.jobs.len() as u32) < r.slots)
                .min_by_key(|(_, r)| r.jobs.len())
            else {
                break;
            };
            let Some(job) = self.queue.pop_front() else { break };
            if let Some(j) = self.journal.as_mut()
                && let Some(commit) = self.jobs.get(&job)
                && !j.before.contains_key(commit)
            {
                j.before.insert(*commit, self.commits.get(commit).map(CommitEntry::light));
            }
            let Some(entry) = self.jobs.get(&job).and_then(|c| self.commits.get_mut(c)) else { continue };
            if entry.status != CommitStatus::Queued {
                continue;
            }
            entry.attempt += 1;
            entry.lease = Some(Lease { runner: name.clone(), conn: Some(runner.conn) });
            entry.status = CommitStatus::Running;
            entry.runner = Some(name.clone());
            entry.warnings = runner.sandbox_gaps.iter().map(|g| format!("sandbox on {name}: {g}")).collect();
            runner.jobs.insert(job);
            out.push(Dispatch {
                runner: name.clone(),
                conn: runner.conn,
                assignment: Assignment {
                    job,
                    attempt: entry.attempt,
                    commit: entry.commit,
                    skip_files: entry.done_files.iter().cloned().collect(),
                },
            });
        }
        out
    }

    /// The entry of `job` if `conn` holds its current `attempt`.
    fn current(&mut self, job: u64, attempt: u32, conn: ConnId) -> Result<&mut CommitEntry, Stale> {
        let commit = self.jobs.get(&job).ok_or(Stale::UnknownJob(job))?;
        let entry = self.commits.get_mut(commit).ok_or(Stale::UnknownJob(job))?;
        let current = entry.status == CommitStatus::Running
            && entry.attempt == attempt
            && entry.lease.as_ref().is_some_and(|l| l.conn == Some(conn));
        if current { Ok(entry) } else { Err(Stale::NotCurrent { job, attempt }) }
    }

    /// Records one test result from the lease holder. Returns whether it was
    /// new (a repeated id keeps its first result).
    pub fn record_test(&mut self, job: u64, attempt: u32, conn: ConnId, result: TestResult) -> Result<bool, Stale> {
        let entry = self.current(job, attempt, conn)?;
        if entry.tests.contains_key(&result.id) {
            return Ok(false);
        }
        let (commit, id) = (entry.commit, result.id.clone());
        entry.tests.insert(result.id.clone(), result);
        if let Some(j) = self.journal.as_mut() {
            j.tests.push((commit, id));
        }
        Ok(true)
    }

    /// Records that the lease holder reported every test of `file`.
    pub fn file_done(&mut self, job: u64, attempt: u32, conn: ConnId, file: String) -> Result<bool, Stale> {
        let entry = self.current(job, attempt, conn)?;
        let commit = entry.commit;
        if !entry.done_files.insert(file.clone()) {
            return Ok(false);
        }
        if let Some(j) = self.journal.as_mut() {
            j.done_files.push((commit, file));
        }
        Ok(true)
    }

    /// Records a warning from the lease holder, once (a resumed job sends its
    /// events again). Returns whether it was new.
    pub fn warn(&mut self, job: u64, attempt: u32, conn: ConnId, warning: String) -> Result<bool, Stale> {
        if self.current(job, attempt, conn)?.warnings.contains(&warning) {
            return Ok(false);
        }
        self.touch_job(job);
        let entry = self.current(job, attempt, conn)?;
        entry.warnings.push(warning);
        Ok(true)
    }

    /// Ends a job as its lease holder reports, and frees the runner's slot.
    /// Returns the commit, whose status is now final.
    pub fn finish(
        &mut self,
        job: u64,
        attempt: u32,
        conn: ConnId,
        error: Option<String>,
        now_ms: u64,
    ) -> Result<CommitId, Stale> {
        self.current(job, attempt, conn)?;
        self.touch_job(job);
        self.snap_runners();
        let entry = self.current(job, attempt, conn)?;
        let error = error.or_else(|| {
            entry.tests.is_empty().then(|| "no tests found: nothing under tests/ was claimed by a plugin".to_owned())
        });
        entry.status = CommitReport::final_status(&entry.tests, error.as_deref());
        entry.error = error;
        entry.finished_at_ms = Some(now_ms);
        let commit = entry.commit;
        if let Some(lease) = entry.lease.take()
            && let Some(runner) = self.runners.get_mut(&lease.runner)
        {
            runner.jobs.remove(&job);
        }
        Ok(commit)
    }

    /// The lease holder gave the job back, or its assignment stream broke:
    /// put the job back in the queue. Returns the commit if it was requeued.
    pub fn abandon(&mut self, job: u64, attempt: u32, conn: ConnId) -> Option<CommitId> {
        self.current(job, attempt, conn).ok()?;
        self.requeue(job)
    }

    /// Stops testing a commit that is not final: it ends with `status`
    /// (`cancelled`, `skipped` or `error`) and `reason`. Returns what was
    /// stopped, with the connection to tell if it was running.
    pub fn stop(&mut self, commit: &CommitId, status: CommitStatus, reason: String, now_ms: u64) -> Option<Stopped> {
        self.commits.get(commit).filter(|e| !e.status.is_final())?;
        self.touch(commit);
        self.snap_queue();
        self.snap_runners();
        let entry = self.commits.get_mut(commit)?;
        let job = entry.job;
        entry.status = status;
        entry.error = Some(reason);
        entry.finished_at_ms = Some(now_ms);
        let lease = entry.lease.take();
        self.queue.retain(|&j| j != job);
        let conn = lease.and_then(|l| {
            if let Some(r) = self.runners.get_mut(&l.runner) {
                r.jobs.remove(&job);
            }
            l.conn
        });
        Some(Stopped { commit: *commit, job, conn })
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
            runner: e.runner.clone(),
            warnings: e.warnings.clone(),
            queued_at_ms: e.queued_at_ms,
            finished_at_ms: e.finished_at_ms,
            tests: e.tests.values().cloned().collect(),
        })
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
    /// of `commit` for the assignment `lease`: only if it holds that lease
    /// now and the lease is on `commit`.
    pub fn source_access(&self, lease: Held, commit: &CommitId, conn: ConnId, name: &str) -> Result<(), SourceRefusal> {
        let (job, attempt, commit) = (lease.job, lease.attempt, *commit);
        let entry = self.jobs.get(&job).filter(|c| **c == commit).and_then(|c| self.commits.get(c));
        let Some(entry) = entry else { return Err(SourceRefusal::NotLeased { job, attempt, commit }) };
        if self.holds(job, attempt, conn) {
            return Ok(());
        }
        // `runner` outlives a stopped lease (it is cleared only on requeue).
        if entry.status.is_final() && entry.attempt == attempt && entry.runner.as_deref() == Some(name) {
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

    /// The names of the registered runners and how many jobs each holds.
    pub fn runners(&self) -> Vec<(String, usize)> {
        self.runners.iter().map(|(n, r)| (n.clone(), r.jobs.len())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::Outcome;

    fn commit(n: u8) -> CommitId {
        format!("{:040x}", n).parse().unwrap()
    }

    fn result(id: &str, outcome: Outcome) -> TestResult {
        TestResult { id: id.into(), file: "tests/test_a.py".into(), outcome, duration_ms: 1, message: String::new() }
    }

    fn submit(s: &mut State, n: u8) {
        s.submit("repo", "main", commit(n), Supersede::Nothing, |_| true, u64::from(n)).unwrap();
    }

    #[test]
    fn a_prefix_finds_the_commits_that_start_with_it() {
        let mut s = State::default();
        for n in 1..=3 {
            submit(&mut s, n);
        }
        let other: CommitId = "bba85f8".repeat(6)[..40].parse().unwrap();
        s.submit("repo", "main", other, Supersede::Nothing, |_| true, 9).unwrap();
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
        assert!(s.submit("repo", "main", commit(1), Supersede::Nothing, |_| true, 11).is_none());
        s.register("r1", 1, 4, &[], &[]);
        assert_eq!(s.assign().len(), 1);
        assert!(s.assign().is_empty());
    }

    #[test]
    fn jobs_go_to_the_least_busy_runner_and_respect_slots() {
        let mut s = State::default();
        for n in 1..=3 {
            submit(&mut s, n);
        }
        s.register("a", 1, 1, &[], &[]);
        s.register("b", 2, 1, &[], &[]);
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

    #[test]
    fn only_the_current_lease_holder_is_heard() {
        let mut s = State::default();
        submit(&mut s, 1);
        s.register("a", 1, 1, &[], &[]);
        let first = s.assign().remove(0).assignment;
        assert_eq!(s.record_test(first.job, 1, 1, result("t1", Outcome::Pass)), Ok(true));
        assert_eq!(s.file_done(first.job, 1, 1, "tests/test_a.py".into()), Ok(true));
        // The runner vanishes; its job is requeued and goes to another runner,
        // without the file it finished.
        assert_eq!(s.unregister("a", 1), vec![commit(1)]);
        assert_eq!(s.report(&commit(1)).unwrap().status, CommitStatus::Queued);
        s.register("b", 2, 1, &[], &[]);
        let second = s.assign().remove(0);
        assert_eq!(second.assignment.attempt, 2);
        assert_eq!(second.assignment.skip_files, vec!["tests/test_a.py".to_owned()]);
        // The late runner's events are refused, whatever it claims.
        assert!(s.record_test(first.job, 1, 1, result("t2", Outcome::Fail)).is_err());
        assert!(s.record_test(first.job, 2, 1, result("t2", Outcome::Fail)).is_err());
        assert!(s.file_done(first.job, 1, 1, "tests/test_b.py".into()).is_err());
        assert!(s.finish(first.job, 1, 1, None, 5).is_err());
        // The current holder's are accepted, each test once.
        assert_eq!(s.record_test(first.job, 2, 2, result("t1", Outcome::Fail)), Ok(false));
        assert_eq!(s.record_test(first.job, 2, 2, result("t2", Outcome::Pass)), Ok(true));
        assert_eq!(s.finish(first.job, 2, 2, None, 9), Ok(commit(1)));
        let report = s.report(&commit(1)).unwrap();
        assert_eq!(report.status, CommitStatus::Passed);
        assert_eq!(report.counts.total, 2);
        assert_eq!(report.finished_at_ms, Some(9));
        // Nothing more is accepted once done.
        assert!(s.record_test(first.job, 2, 2, result("t3", Outcome::Pass)).is_err());
        assert!(s.runners().iter().all(|(_, busy)| *busy == 0));
    }

    #[test]
    fn a_reconnecting_runner_replaces_its_old_connection() {
        let mut s = State::default();
        submit(&mut s, 1);
        s.register("a", 1, 1, &[], &[]);
        let d = s.assign().remove(0);
        assert_eq!(s.register("a", 7, 1, &[], &[]), (Some(1), vec![]));
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
        s.register("a", 1, 2, &[], &[]);
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
        s.register("a", 1, 1, &[], &[]);
        let running = s.assign().remove(0).assignment;
        s.submit("repo", "main", commit(2), Supersede::Nothing, |_| true, 2).unwrap();
        s.submit("repo", "other", commit(3), Supersede::Nothing, |_| true, 3).unwrap();
        // Latest mode: 1 (running) is cancelled, 2 (queued) skipped, 3 (another branch) untouched.
        let stopped = s.submit("repo", "main", commit(4), Supersede::CancelRunning, |_| true, 4).unwrap();
        assert_eq!(stopped.len(), 2);
        assert!(stopped.contains(&Stopped { commit: commit(1), job: running.job, conn: Some(1) }));
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
        s.submit("repo", "other", commit(5), Supersede::SkipQueued, |_| true, 5).unwrap();
        assert_eq!(s.report(&commit(3)).unwrap().status, CommitStatus::Running);
        assert_eq!(s.entry(&commit(3)).unwrap().job, running);
        assert_eq!(s.branch_tip("repo", "main"), Some(commit(4)));
        assert_eq!(s.branch_tip("repo", "nope"), None);
    }

    #[test]
    fn only_descendants_supersede() {
        let mut s = State::default();
        submit(&mut s, 1);
        s.register("a", 1, 1, &[], &[]);
        s.assign();
        submit(&mut s, 2);
        // Commit 3 rewrote history: it descends from neither 1 nor 2.
        let stopped = s.submit("repo", "main", commit(3), Supersede::CancelRunning, |_| false, 3).unwrap();
        assert!(stopped.is_empty());
        assert_eq!(s.report(&commit(1)).unwrap().status, CommitStatus::Running);
        assert_eq!(s.report(&commit(2)).unwrap().status, CommitStatus::Queued);
        // Queued ones are candidates even for SkipQueued; the running one only for CancelRunning.
        let mut skippable = s.supersede_candidates("repo", "main", Supersede::SkipQueued);
        skippable.sort();
        assert_eq!(skippable, vec![commit(2), commit(3)]);
        assert_eq!(s.supersede_candidates("repo", "main", Supersede::CancelRunning).len(), 3);
        // Commit 4 descends from 1 only: 1 is cancelled, 2 and 3 stay.
        let stopped = s.submit("repo", "main", commit(4), Supersede::CancelRunning, |c| *c == commit(1), 4).unwrap();
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
        s.register("a", 1, 1, &[], &[]);
        s.register("b", 2, 1, &[], &[]);
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
        s.register("a", 1, 1, &[], &[]);
        let d = s.assign().remove(0);
        let stopped = s.stop(&commit(1), CommitStatus::Cancelled, "cancelled by admin".into(), 7).unwrap();
        assert_eq!(stopped.conn, Some(1));
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
        s.register("a", 1, 2, &[], &[]);
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
        assert_eq!(fresh.register("a", 5, 2, &held, &[]), (None, vec![one.job]));
        assert!(fresh.holds(one.job, 1, 5));
        assert_eq!(fresh.record_test(one.job, 1, 5, result("u", Outcome::Pass)), Ok(true));
        // Job two's lease is unclaimed; after the grace period it is queued again.
        assert_eq!(fresh.expire_orphans(), vec![commit(2)]);
        let d = fresh.assign();
        assert_eq!(d.len(), 1, "commit 3 waits: both slots would be full");
        assert_eq!((d[0].assignment.commit, d[0].assignment.attempt), (commit(2), 2));
        assert_eq!(fresh.report(&commit(1)).unwrap().counts.total, 2);
        // New jobs never reuse a restored id.
        fresh.submit("repo", "main", commit(4), Supersede::Nothing, |_| true, 4).unwrap();
        assert!(fresh.entry(&commit(4)).unwrap().job > two.job.max(one.job));
    }

    #[test]
    fn a_late_runner_cannot_claim_a_reassigned_job() {
        let mut s = State::default();
        submit(&mut s, 1);
        s.register("a", 1, 1, &[], &[]);
        let first = s.assign().remove(0).assignment;
        s.unregister("a", 1);
        s.register("b", 2, 1, &[], &[]);
        let second = s.assign().remove(0).assignment;
        assert_eq!(second.attempt, 2);
        // "a" comes back claiming attempt 1: refused, and b keeps the lease.
        let (_, adopted) = s.register("a", 3, 1, &[Held { job: first.job, attempt: 1 }], &[]);
        assert!(adopted.is_empty());
        assert!(s.holds(second.job, 2, 2));
        assert!(!s.holds(first.job, 1, 3));
    }

    /// Checks the invariants listed in the module docs.
    fn check_invariants(s: &State, finals: &mut HashMap<CommitId, CommitStatus>) {
        for (commit, e) in &s.commits {
            let queued = s.queue.iter().filter(|&&j| j == e.job).count();
            match e.status {
                CommitStatus::Queued => {
                    assert_eq!(queued, 1, "{commit:?} queued {queued} times");
                    assert!(e.lease.is_none());
                }
                CommitStatus::Running => {
                    assert_eq!(queued, 0);
                    let lease = e.lease.as_ref().expect("a running job has a lease");
                    if let Some(conn) = lease.conn {
                        let runner = s.runners.get(&lease.runner).expect("its runner is registered");
                        assert_eq!(runner.conn, conn);
                        assert!(runner.jobs.contains(&e.job));
                    }
                }
                status => {
                    assert_eq!(queued, 0);
                    assert!(e.lease.is_none());
                    // A final status never changes.
                    assert_eq!(*finals.entry(*commit).or_insert(status), status);
                }
            }
            assert!(e.tests.iter().all(|(id, t)| *id == t.id));
        }
        for (name, r) in &s.runners {
            for job in &r.jobs {
                let e = &s.commits[&s.jobs[job]];
                assert_eq!(e.lease.as_ref().map(|l| (&l.runner, l.conn)), Some((name, Some(r.conn))));
            }
        }
    }

    /// What a store holds after applying every stored event's changes.
    #[derive(Default)]
    struct Stored {
        rows: HashMap<CommitId, CommitRow>,
        tests: HashMap<CommitId, BTreeMap<String, TestResult>>,
        done: HashMap<CommitId, BTreeSet<String>>,
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
                        let old = self.tests.entry(*commit).or_default().insert(result.id.clone(), result.clone());
                        assert!(old.is_none(), "a result stored twice");
                    }
                    Change::FileDone { commit, file } => {
                        self.done.entry(*commit).or_default().insert(file.clone());
                    }
                    Change::Owner { .. } => {}
                }
            }
        }

        /// Disk and memory agree on everything durable.
        fn check(&self, s: &State) {
            assert_eq!(self.rows.len(), s.commits.len());
            for (commit, e) in &s.commits {
                assert_eq!(self.rows.get(commit), Some(&e.row()), "the stored row of {commit:?} is stale");
                assert_eq!(self.tests.get(commit).cloned().unwrap_or_default(), e.tests);
                assert_eq!(self.done.get(commit).cloned().unwrap_or_default(), e.done_files);
            }
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
        for _ in 0..300 {
            let mut s = State::default();
            let mut finals = HashMap::new();
            let mut known: Vec<Dispatch> = Vec::new();
            let mut stored = Stored::default();
            for step in 0..200u64 {
                let n = (next(6) + 1) as u8;
                let runner = format!("r{}", next(3));
                let conn = next(5) as usize;
                // Sometimes an assignment we saw, sometimes a made-up one.
                let (job, attempt, conn) = match known.get(next(known.len() as u64 + 1) as usize) {
                    Some(d) if next(4) > 0 => (d.assignment.job, d.assignment.attempt, d.conn),
                    _ => (next(8), next(4) as u32, conn),
                };
                let id = format!("t{}", next(4));
                // Some events fail to be stored: they must leave no trace.
                let before = (next(5) == 0).then(|| s.clone());
                s.begin(step);
                match next(10) {
                    0 => {
                        let supersede =
                            [Supersede::Nothing, Supersede::SkipQueued, Supersede::CancelRunning][next(3) as usize];
                        let _ = s.submit("repo", ["a", "b"][next(2) as usize], commit(n), supersede, |_| true, step);
                    }
                    1 => {
                        let held = [Held { job, attempt }];
                        s.register(&runner, conn, next(3) as u32 + 1, if next(2) == 0 { &held } else { &[] }, &[]);
                    }
                    2 => {
                        s.unregister(&runner, conn);
                    }
                    3 | 4 => {
                        let given = s.assign();
                        // Only free slots are filled.
                        for d in &given {
                            let r = &s.runners[&d.runner];
                            assert!(r.jobs.len() as u32 <= r.slots);
                        }
                        known.extend(given);
                    }
                    5 => {
                        let _ = s.record_test(job, attempt, conn, result(&id, Outcome::Pass));
                    }
                    6 => {
                        let _ = s.file_done(job, attempt, conn, "tests/test_a.py".into());
                    }
                    7 => {
                        let _ = s.finish(job, attempt, conn, None, step);
                    }
                    8 => {
                        let _ = s.abandon(job, attempt, conn);
                    }
                    _ => {
                        let _ = s.stop(&commit(n), CommitStatus::Cancelled, "stop".into(), step);
                    }
                }
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
            }
        }
    }
}
