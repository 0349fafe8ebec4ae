//! The dispatcher's bookkeeping as a plain state machine: commits, the job
//! queue, runners' free slots and leases. No I/O happens here, so every
//! scheduling and fencing decision is tested as data in, data out.
//!
//! Invariants:
//! - a job is in the queue, or held by exactly one runner connection, or done;
//! - an event for a job is accepted only from the connection holding the
//!   job's current attempt (the fencing token), so a late or replaced runner
//!   can never overwrite newer work;
//! - a test id is recorded at most once per commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use kiln_proto::wire::Assignment;
use kiln_proto::{CommitId, CommitReport, CommitStatus, Counts, TestResult};

/// A connection's stable id: a runner that reconnects gets a new one.
pub type ConnId = usize;

/// Where a job's lease is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Lease {
    runner: String,
    conn: ConnId,
}

#[derive(Debug)]
struct Job {
    commit: CommitId,
    attempt: u32,
    lease: Option<Lease>,
    done: bool,
}

#[derive(Debug)]
struct CommitEntry {
    repo: String,
    branch: String,
    status: CommitStatus,
    error: Option<String>,
    runner: Option<String>,
    queued_at_ms: u64,
    finished_at_ms: Option<u64>,
    tests: BTreeMap<String, TestResult>,
}

#[derive(Debug)]
struct Runner {
    conn: ConnId,
    slots: u32,
    jobs: BTreeSet<u64>,
}

/// Why an event from a runner was not accepted.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
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

/// All of the dispatcher's state.
#[derive(Debug, Default)]
pub struct State {
    commits: HashMap<CommitId, CommitEntry>,
    /// Commits in submission order, for "the newest commit".
    order: Vec<CommitId>,
    jobs: HashMap<u64, Job>,
    queue: VecDeque<u64>,
    runners: BTreeMap<String, Runner>,
    next_job: u64,
}

impl State {
    /// Whether the commit was submitted before.
    pub fn knows(&self, commit: &CommitId) -> bool {
        self.commits.contains_key(commit)
    }

    /// Queues a newly seen commit for testing. Returns `false` (and changes
    /// nothing) if it was submitted before: submission is idempotent.
    pub fn submit(&mut self, repo: &str, branch: &str, commit: CommitId, now_ms: u64) -> bool {
        if self.knows(&commit) {
            return false;
        }
        self.commits.insert(
            commit,
            CommitEntry {
                repo: repo.to_owned(),
                branch: branch.to_owned(),
                status: CommitStatus::Queued,
                error: None,
                runner: None,
                queued_at_ms: now_ms,
                finished_at_ms: None,
                tests: BTreeMap::new(),
            },
        );
        self.order.push(commit);
        self.new_job(commit);
        true
    }

    /// Takes back a report stored by an earlier dispatcher process. A commit
    /// whose testing had not ended is queued again from scratch.
    pub fn restore(&mut self, report: CommitReport) {
        if self.knows(&report.commit) {
            return;
        }
        let commit = report.commit;
        let unfinished = !report.status.is_final();
        let tests =
            if unfinished { BTreeMap::new() } else { report.tests.into_iter().map(|t| (t.id.clone(), t)).collect() };
        self.commits.insert(
            commit,
            CommitEntry {
                repo: report.repo,
                branch: report.branch,
                status: if unfinished { CommitStatus::Queued } else { report.status },
                error: report.error,
                runner: if unfinished { None } else { report.runner },
                queued_at_ms: report.queued_at_ms,
                finished_at_ms: report.finished_at_ms,
                tests,
            },
        );
        self.order.push(commit);
        if unfinished {
            self.new_job(commit);
        }
    }

    /// Sorts restored commits by the time they were queued, so "newest" stays true after a restart.
    pub fn sort_by_queue_time(&mut self) {
        let commits = &self.commits;
        self.order.sort_by_key(|c| commits.get(c).map(|e| e.queued_at_ms));
        let jobs = &self.jobs;
        self.queue
            .make_contiguous()
            .sort_by_key(|j| jobs.get(j).and_then(|job| commits.get(&job.commit)).map(|e| e.queued_at_ms));
    }

    fn new_job(&mut self, commit: CommitId) {
        self.next_job += 1;
        let id = self.next_job;
        self.jobs.insert(id, Job { commit, attempt: 0, lease: None, done: false });
        self.queue.push_back(id);
    }

    /// Adds a runner with `slots` free slots. If a runner of that name is
    /// registered already (a reconnect), the old connection's jobs go back to
    /// the queue and its id is returned so the caller can close it.
    pub fn register(&mut self, name: &str, conn: ConnId, slots: u32) -> Option<ConnId> {
        let old = self.runners.get(name).map(|r| r.conn).filter(|&c| c != conn);
        if let Some(old) = old {
            self.unregister(name, old);
        }
        self.runners.insert(name.to_owned(), Runner { conn, slots: slots.max(1), jobs: BTreeSet::new() });
        old
    }

    /// Removes the runner connection `conn` and puts its unfinished jobs back
    /// at the front of the queue. Returns the commits of the requeued jobs.
    pub fn unregister(&mut self, name: &str, conn: ConnId) -> Vec<CommitId> {
        let Some(runner) = self.runners.get(name).filter(|r| r.conn == conn) else { return Vec::new() };
        let jobs: Vec<u64> = runner.jobs.iter().copied().collect();
        self.runners.remove(name);
        for &job in jobs.iter().rev() {
            self.requeue(job);
        }
        jobs.iter().filter_map(|j| self.jobs.get(j)).map(|j| j.commit).collect()
    }

    fn requeue(&mut self, job_id: u64) {
        let Some(job) = self.jobs.get_mut(&job_id) else { return };
        if job.done || job.lease.is_none() {
            return;
        }
        job.lease = None;
        if let Some(entry) = self.commits.get_mut(&job.commit) {
            entry.status = CommitStatus::Queued;
            entry.runner = None;
        }
        self.queue.push_front(job_id);
    }

    /// Pairs queued jobs with free runner slots, least busy runner first.
    pub fn assign(&mut self) -> Vec<Dispatch> {
        let mut out = Vec::new();
        while !self.queue.is_empty() {
            let Some((name, runner)) = self
                .runners
                .iter_mut()
                .filter(|(_, r)| (r.jobs.len() as u32) < r.slots)
                .min_by_key(|(_, r)| r.jobs.len())
            else {
                break;
            };
            let Some(job_id) = self.queue.pop_front() else { break };
            let Some(job) = self.jobs.get_mut(&job_id) else { continue };
            job.attempt += 1;
            job.lease = Some(Lease { runner: name.clone(), conn: runner.conn });
            runner.jobs.insert(job_id);
            if let Some(entry) = self.commits.get_mut(&job.commit) {
                entry.status = CommitStatus::Running;
                entry.runner = Some(name.clone());
            }
            out.push(Dispatch {
                runner: name.clone(),
                conn: runner.conn,
                assignment: Assignment { job: job_id, attempt: job.attempt, commit: job.commit },
            });
        }
        out
    }

    fn current(&self, job_id: u64, attempt: u32, conn: ConnId) -> Result<&Job, Stale> {
        let job = self.jobs.get(&job_id).ok_or(Stale::UnknownJob(job_id))?;
        let current = !job.done && job.attempt == attempt && job.lease.as_ref().is_some_and(|l| l.conn == conn);
        if current { Ok(job) } else { Err(Stale::NotCurrent { job: job_id, attempt }) }
    }

    /// Records one test result from the lease holder. Returns whether it was
    /// new (a repeated id keeps its first result).
    pub fn record_test(&mut self, job: u64, attempt: u32, conn: ConnId, result: TestResult) -> Result<bool, Stale> {
        let commit = self.current(job, attempt, conn)?.commit;
        let Some(entry) = self.commits.get_mut(&commit) else { return Err(Stale::UnknownJob(job)) };
        if entry.tests.contains_key(&result.id) {
            return Ok(false);
        }
        entry.tests.insert(result.id.clone(), result);
        Ok(true)
    }

    /// Ends a job as its lease holder reports, and frees the runner's slot.
    /// Returns the commit whose status is now final.
    pub fn finish(
        &mut self,
        job_id: u64,
        attempt: u32,
        conn: ConnId,
        error: Option<String>,
        now_ms: u64,
    ) -> Result<CommitId, Stale> {
        let commit = self.current(job_id, attempt, conn)?.commit;
        let Some(job) = self.jobs.get_mut(&job_id) else { return Err(Stale::UnknownJob(job_id)) };
        job.done = true;
        if let Some(lease) = job.lease.take()
            && let Some(runner) = self.runners.get_mut(&lease.runner)
        {
            runner.jobs.remove(&job_id);
        }
        if let Some(entry) = self.commits.get_mut(&commit) {
            let error = error.or_else(|| {
                entry
                    .tests
                    .is_empty()
                    .then(|| "no tests found: nothing under tests/ was claimed by a plugin".to_owned())
            });
            entry.status = CommitReport::final_status(&entry.tests, error.as_deref());
            entry.error = error;
            entry.finished_at_ms = Some(now_ms);
        }
        Ok(commit)
    }

    /// The assignment stream to the lease holder broke before the job ended:
    /// put the job back in the queue (if that lease is still current).
    pub fn abandon(&mut self, job_id: u64, attempt: u32, conn: ConnId) -> bool {
        if self.current(job_id, attempt, conn).is_err() {
            return false;
        }
        let runner = self.jobs.get(&job_id).and_then(|j| j.lease.as_ref()).map(|l| l.runner.clone());
        if let Some(r) = runner.and_then(|r| self.runners.get_mut(&r)) {
            r.jobs.remove(&job_id);
        }
        self.requeue(job_id);
        true
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
            queued_at_ms: e.queued_at_ms,
            finished_at_ms: e.finished_at_ms,
            tests: e.tests.values().cloned().collect(),
        })
    }

    /// The commit submitted last.
    pub fn newest(&self) -> Option<CommitId> {
        self.order.last().copied()
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

    #[test]
    fn submission_is_idempotent() {
        let mut s = State::default();
        assert!(s.submit("repo", "main", commit(1), 10));
        assert!(!s.submit("repo", "main", commit(1), 11));
        s.register("r1", 1, 4);
        assert_eq!(s.assign().len(), 1);
        assert!(s.assign().is_empty());
    }

    #[test]
    fn jobs_go_to_the_least_busy_runner_and_respect_slots() {
        let mut s = State::default();
        for n in 1..=3 {
            s.submit("repo", "main", commit(n), u64::from(n));
        }
        s.register("a", 1, 1);
        s.register("b", 2, 1);
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
        s.submit("repo", "main", commit(1), 1);
        s.register("a", 1, 1);
        let first = s.assign().remove(0).assignment;
        assert_eq!(s.record_test(first.job, 1, 1, result("t1", Outcome::Pass)), Ok(true));
        // The runner vanishes; its job is requeued and goes to another runner.
        assert_eq!(s.unregister("a", 1), vec![commit(1)]);
        assert_eq!(s.report(&commit(1)).unwrap().status, CommitStatus::Queued);
        s.register("b", 2, 1);
        let second = s.assign().remove(0);
        assert_eq!(second.assignment.attempt, 2);
        // The late runner's events are refused, whatever it claims.
        assert!(s.record_test(first.job, 1, 1, result("t2", Outcome::Fail)).is_err());
        assert!(s.record_test(first.job, 2, 1, result("t2", Outcome::Fail)).is_err());
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
    }

    #[test]
    fn a_reconnecting_runner_replaces_its_old_connection() {
        let mut s = State::default();
        s.submit("repo", "main", commit(1), 1);
        s.register("a", 1, 1);
        let d = s.assign().remove(0);
        assert_eq!(s.register("a", 7, 1), Some(1));
        let again = s.assign().remove(0);
        assert_eq!((again.conn, again.assignment.attempt), (7, 2));
        assert!(!s.abandon(d.assignment.job, 1, 1));
        assert!(s.abandon(again.assignment.job, 2, 7));
        assert_eq!(s.assign().remove(0).assignment.attempt, 3);
    }

    #[test]
    fn a_run_with_no_tests_is_an_error_and_a_failure_fails() {
        let mut s = State::default();
        s.submit("repo", "main", commit(1), 1);
        s.submit("repo", "main", commit(2), 2);
        s.register("a", 1, 2);
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
    fn restored_unfinished_commits_are_queued_again() {
        let mut s = State::default();
        s.submit("repo", "main", commit(1), 1);
        let mut report = s.report(&commit(1)).unwrap();
        report.status = CommitStatus::Running;
        report.tests.push(result("t", Outcome::Pass));
        let mut fresh = State::default();
        fresh.restore(report);
        fresh.register("a", 1, 1);
        let d = fresh.assign();
        assert_eq!(d.len(), 1);
        assert_eq!(fresh.report(&commit(1)).unwrap().counts.total, 0);
    }
}
