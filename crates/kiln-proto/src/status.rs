//! What `kiln status` and `kiln runners` are told: the dispatcher's live
//! view (connected runners, what waits and why) and its newest commits, as
//! one reply ([`crate::wire::Reply::Status`]). The dispatcher fills it from
//! the same live view its dashboard shows; this is only its wire form, kept
//! within a frame by [`Status::fit`].

use serde::{Deserialize, Serialize};

use crate::model::{CommitId, CommitStatus, Counts, FileCounts};

/// The most file names a [`RunningBatch`] lists; `file_count` has them all.
pub const MAX_LISTED_FILES: usize = 8;
/// The most commits a [`Status`] lists (`kiln status --commits`).
pub const MAX_STATUS_COMMITS: usize = 50;

/// A connected runner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerStatus {
    /// The name in its certificate.
    pub name: String,
    /// Where its connection comes from.
    pub address: String,
    /// The test files it runs at once.
    pub slots: u32,
    /// The slots its batches use now.
    pub busy: u32,
    /// What it runs now: one entry per batch.
    pub running: Vec<RunningBatch>,
    /// When its connection registered (Unix ms).
    pub connected_since_ms: u64,
    /// When the dispatcher last heard from it: its registration or its last
    /// job event (Unix ms).
    pub last_heard_ms: u64,
    /// The sandbox mechanisms its machine lacks.
    pub sandbox_warnings: Vec<String>,
}

/// A batch a runner holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningBatch {
    /// Its job id.
    pub job: u64,
    /// Its commit.
    pub commit: CommitId,
    /// Its first files (at most [`MAX_LISTED_FILES`]).
    pub files: Vec<String>,
    /// How many files it has.
    pub file_count: u64,
    /// The slots it uses.
    pub slots: u32,
}

/// A commit that waits for runners, in queue order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedCommit {
    /// The commit.
    pub commit: CommitId,
    /// Its repository.
    pub repo: String,
    /// Its branch.
    pub branch: String,
    /// When it was queued (Unix ms).
    pub queued_at_ms: u64,
    /// Files waiting for a runner.
    pub pending_files: u64,
    /// Files running now.
    pub running_files: u64,
    /// Files done.
    pub done_files: u64,
    /// Why it waits, as a stable code: `no_runner`, `no_free_slot`,
    /// `behind`, `awaiting_runner` or `assigning`.
    pub reason: String,
    /// Why it waits, in words.
    pub why: String,
}

/// One of the newest commits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitSummary {
    /// The commit.
    pub commit: CommitId,
    /// Its repository.
    pub repo: String,
    /// Its branch.
    pub branch: String,
    /// Where testing stands.
    pub status: CommitStatus,
    /// Its results so far.
    pub counts: Counts,
    /// Its test files, and how many are done.
    pub files: FileCounts,
    /// Why it could not run or was stopped.
    pub error: Option<String>,
    /// Its runners, as `a, b`.
    pub runner: Option<String>,
    /// When it was queued (Unix ms).
    pub queued_at_ms: u64,
    /// When it ended (Unix ms).
    pub finished_at_ms: Option<u64>,
}

/// The dispatcher now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// When this was taken (Unix ms).
    pub at_ms: u64,
    /// Connected runners, by name (all of them, unless `runners_total` says more).
    pub runners: Vec<RunnerStatus>,
    /// How many runners are connected.
    pub runners_total: u64,
    /// Slots registered over all connected runners.
    pub slots_total: u64,
    /// Slots in use over all connected runners.
    pub slots_busy: u64,
    /// What waits, oldest first (all of it, unless `queue_total` says more).
    pub queue: Vec<QueuedCommit>,
    /// How many commits wait.
    pub queue_total: u64,
    /// The newest commits, newest first.
    pub commits: Vec<CommitSummary>,
}

impl Status {
    /// Drops listed queue entries and runners from the end (the totals stay)
    /// until the status encodes to at most `max` bytes, so that it fits a
    /// frame however many runners are connected.
    pub fn fit(&mut self, max: usize) {
        loop {
            let len = postcard::to_allocvec(self).map_or(usize::MAX, |v| v.len());
            if len <= max {
                return;
            }
            // The queue is the longest list on a busy dispatcher; runners next.
            if self.queue.len() > self.runners.len() {
                self.queue.truncate(self.queue.len() / 2);
            } else if !self.runners.is_empty() {
                self.runners.truncate(self.runners.len() / 2);
            } else if !self.commits.is_empty() {
                self.commits.truncate(self.commits.len() / 2);
            } else {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_is_cut_to_fit_and_keeps_its_totals() {
        let runner = |n: usize| RunnerStatus {
            name: format!("runner-{n}"),
            address: "10.0.0.1:4433".into(),
            slots: 4,
            busy: 0,
            running: vec![],
            connected_since_ms: 1,
            last_heard_ms: 2,
            sandbox_warnings: vec!["w".repeat(500); 8],
        };
        let mut status = Status {
            at_ms: 3,
            runners: (0..1000).map(runner).collect(),
            runners_total: 1000,
            slots_total: 4000,
            slots_busy: 0,
            queue: vec![],
            queue_total: 0,
            commits: vec![],
        };
        let max = crate::MAX_FRAME_LEN - 1024;
        status.fit(max);
        assert!(postcard::to_allocvec(&status).unwrap().len() <= max);
        assert!(!status.runners.is_empty() && status.runners.len() < 1000, "{}", status.runners.len());
        assert_eq!((status.runners_total, status.runners[0].name.as_str()), (1000, "runner-0"));
        // What fits already is left alone.
        let before = status.clone();
        status.fit(max);
        assert_eq!(status, before);
    }
}
