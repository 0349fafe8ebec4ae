//! The read side of the dispatcher, for the dashboard and anything else that
//! only looks: a [`ReadApi`] handle that never makes the owner task wait.
//!
//! Two kinds of reading, because the dispatcher holds two kinds of facts:
//!
//! - **Durable facts** (commits, their results) travel on the stream of
//!   deltas ([`crate::stream`]). A reader subscribes once, gets a
//!   [`Snapshot`] taken in order with the events, and rebuilds what it shows
//!   from the updates after it: it never asks the owner again unless it
//!   lags.
//! - **Live facts** (which runners are connected, from where, since when,
//!   what they run now; why each queued commit waits) are not stored and
//!   change with every event, so they are asked for: [`ReadApi::live`]
//!   posts a request on a small bounded channel without waiting for room
//!   (a full channel is an answer: "busy") and waits a bounded time for the
//!   owner's reply, which it computes between two events. The owner never
//!   blocks on a reader; a reader that stops listening costs it one dropped
//!   reply.
//!
//! The types here are the read API's own (not the state machine's), so the
//! state can change shape without breaking pages, and later readers
//! (per-test history, `kiln status`) add requests beside [`Live`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_proto::CommitId;
use kiln_proto::status::{MAX_LISTED_FILES, RunnerStatus, RunningBatch};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::state::State;
use crate::stream::{Feed, Snapshot, SnapshotRequests, Update};

/// How long a reader waits for the owner's answer to a live request.
const LIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a queued commit (or the rest of a running one) waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// No runner is connected.
    NoRunner,
    /// Every connected runner's slots are in use.
    NoFreeSlot {
        /// Slots in use.
        busy: u32,
        /// Slots registered.
        total: u32,
    },
    /// Older commits are ahead of it in the queue.
    Behind {
        /// How many.
        commits: usize,
    },
    /// Some of its files were running when the dispatcher restarted, and
    /// their runner has not claimed them back yet (`--resume-grace`).
    AwaitingRunner {
        /// The runner that held them.
        runner: String,
    },
    /// A runner has a free slot: it is being handed out now.
    Assigning,
    /// Its waiting files are for Python versions (the matrix) that no
    /// connected runner has: it cannot finish until one registers.
    NoPython {
        /// The versions nobody has, as the configuration spells them.
        versions: Vec<String>,
    },
}

impl std::fmt::Display for WaitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitReason::NoRunner => write!(f, "no runner is connected"),
            WaitReason::NoFreeSlot { busy, total } => {
                write!(f, "no runner has a free slot ({busy} of {total} slots busy)")
            }
            WaitReason::Behind { commits: 1 } => write!(f, "behind 1 older commit"),
            WaitReason::Behind { commits } => write!(f, "behind {commits} older commits"),
            WaitReason::AwaitingRunner { runner } => write!(
                f,
                "waiting for runner {} to claim its work back after the dispatcher restarted",
                kiln_proto::escaped(runner)
            ),
            WaitReason::Assigning => write!(f, "being handed to a runner with a free slot"),
            WaitReason::NoPython { versions } => {
                let versions: Vec<String> = versions.iter().map(|v| kiln_proto::escaped(v).to_string()).collect();
                write!(f, "no runner has Python {}", versions.join(" or "))
            }
        }
    }
}

impl WaitReason {
    /// The reason as a stable code, for programs (the JSON API, `kiln status --format json`).
    pub fn code(&self) -> &'static str {
        match self {
            WaitReason::NoRunner => "no_runner",
            WaitReason::NoFreeSlot { .. } => "no_free_slot",
            WaitReason::Behind { .. } => "behind",
            WaitReason::AwaitingRunner { .. } => "awaiting_runner",
            WaitReason::Assigning => "assigning",
            WaitReason::NoPython { .. } => "no_python",
        }
    }
}

/// A commit that waits for runners, in queue order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueItem {
    /// The commit.
    pub commit: CommitId,
    /// Its repository.
    pub repo: String,
    /// Its branch.
    pub branch: String,
    /// When it was queued (Unix ms).
    pub queued_at_ms: u64,
    /// Files waiting for a runner.
    pub pending_files: usize,
    /// Files running now.
    pub running_files: usize,
    /// Files done.
    pub done_files: usize,
    /// Why it waits.
    pub reason: WaitReason,
}

/// What is live now: connected runners (by name) and the queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Live {
    /// When this was taken (Unix ms).
    pub at_ms: u64,
    /// Connected runners, by name, in the wire form `kiln runners` is told
    /// (a batch lists its first files and counts them all).
    pub runners: Vec<RunnerStatus>,
    /// What waits, oldest first.
    pub queue: Vec<QueueItem>,
}

impl Live {
    /// Slots registered over all runners.
    pub fn total_slots(&self) -> u32 {
        self.runners.iter().map(|r| r.slots).sum()
    }

    /// Slots in use over all runners.
    pub fn busy_slots(&self) -> u32 {
        self.runners.iter().map(|r| r.busy).sum()
    }

    /// This view as `kiln status` and `kiln runners` are told it, with the
    /// newest `commits`: the wire form of the same facts the dashboard shows.
    pub fn status(&self, commits: Vec<kiln_proto::status::CommitSummary>) -> kiln_proto::Status {
        use kiln_proto::status::QueuedCommit;
        let queue = self
            .queue
            .iter()
            .map(|q| QueuedCommit {
                commit: q.commit,
                repo: q.repo.clone(),
                branch: q.branch.clone(),
                queued_at_ms: q.queued_at_ms,
                pending_files: q.pending_files as u64,
                running_files: q.running_files as u64,
                done_files: q.done_files as u64,
                reason: q.reason.code().to_owned(),
                why: q.reason.to_string(),
            })
            .collect();
        kiln_proto::Status {
            at_ms: self.at_ms,
            runners: self.runners.clone(),
            runners_total: self.runners.len() as u64,
            slots_total: u64::from(self.total_slots()),
            slots_busy: u64::from(self.busy_slots()),
            queue,
            queue_total: self.queue.len() as u64,
            commits,
        }
    }
}

/// What the owner task knows of a runner connection that the state does not.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// Its remote address.
    pub address: String,
    /// When it registered (Unix ms).
    pub since_ms: u64,
    /// When it last sent something (Unix ms).
    pub last_heard_ms: u64,
}

/// Builds the live view from the state and what the owner knows of each
/// connection (by connection id).
pub fn live(state: &State, conns: &BTreeMap<usize, ConnInfo>, now_ms: u64) -> Live {
    let mut runners = Vec::new();
    for r in state.runner_views() {
        let info = conns.get(&r.conn);
        let running = r
            .jobs
            .iter()
            .filter_map(|(&job, &slots)| {
                let commit = state.commit_of(job)?;
                // Under a matrix each as `tests/test_a.py (Python 3.12)`.
                let all = state.entry(&commit)?.batches.get(&job).map(|b| &b.files[..]).unwrap_or_default();
                let files = all.iter().take(MAX_LISTED_FILES).map(|u| crate::state::unit_label(u)).collect();
                Some(RunningBatch { job, commit, files, file_count: all.len() as u64, slots })
            })
            .collect();
        runners.push(RunnerStatus {
            name: r.name.to_owned(),
            address: info.map(|i| i.address.clone()).unwrap_or_default(),
            slots: r.slots,
            busy: r.jobs.values().sum(),
            running,
            connected_since_ms: info.map_or(0, |i| i.since_ms),
            last_heard_ms: info.map_or(0, |i| i.last_heard_ms),
            sandbox_warnings: r.sandbox_gaps.to_vec(),
        });
    }
    let total: u32 = runners.iter().map(|r| r.slots).sum();
    let busy: u32 = runners.iter().map(|r| r.busy).sum();
    let mut queue = Vec::new();
    for (position, e) in state.queued().enumerate() {
        let orphan = e.batches.values().find(|b| b.lease.conn.is_none()).map(|b| b.lease.runner.clone());
        let reason = if let Some(runner) = orphan {
            WaitReason::AwaitingRunner { runner }
        } else if runners.is_empty() {
            WaitReason::NoRunner
        } else if !state.servable(e) {
            WaitReason::NoPython { versions: state.unserved_pythons(e) }
        } else if busy >= total {
            WaitReason::NoFreeSlot { busy, total }
        } else if position > 0 {
            WaitReason::Behind { commits: position }
        } else {
            WaitReason::Assigning
        };
        queue.push(QueueItem {
            commit: e.commit,
            repo: e.repo.clone(),
            branch: e.branch.clone(),
            queued_at_ms: e.queued_at_ms,
            pending_files: e.pending.len(),
            running_files: e.batches.values().map(|b| b.files.len()).sum(),
            done_files: e.done_files.len(),
            reason,
        });
    }
    Live { at_ms: now_ms, runners, queue }
}

/// A live request: the owner answers on the enclosed channel.
pub type LiveRequest = oneshot::Sender<Live>;

/// Why a live request got no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    /// Too many requests are waiting already: ask again later.
    #[error("the dispatcher is busy; try again")]
    Busy,
    /// The owner did not answer within the timeout.
    #[error("the dispatcher did not answer within {0:?}")]
    Timeout(Duration),
    /// The dispatcher is stopping.
    #[error("the dispatcher is stopping")]
    Stopping,
}

/// A fixed-bucket histogram updated without locks: the owner task records,
/// readers render. Bucket bounds are in seconds, as Prometheus expects.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One counter per bound, then one for +Inf (not cumulative).
    counts: Vec<AtomicU64>,
    /// The sum of observations, in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (seconds, increasing).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(), sum_us: AtomicU64::new(0) }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| secs <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Cumulative counts per bound (the last is +Inf, the total), and the sum in seconds.
    pub fn read(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.bounds.len());
        for (i, &b) in self.bounds.iter().enumerate() {
            total += self.counts[i].load(Ordering::Relaxed);
            out.push((b, total));
        }
        total += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        (out, total, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Bounds for storage writes: 100 µs to 10 s.
pub const WRITE_BOUNDS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0];

/// What the core measures about itself.
#[derive(Debug)]
pub struct CoreMetrics {
    /// How long each event's storage transaction took.
    pub store_write: Histogram,
    /// Transactions that failed.
    pub store_failures: AtomicU64,
}

impl Default for CoreMetrics {
    fn default() -> Self {
        CoreMetrics { store_write: Histogram::new(WRITE_BOUNDS), store_failures: AtomicU64::new(0) }
    }
}

/// The handle readers get: the stream of changes, snapshots and live views,
/// and the core's own measurements. Cheap to clone.
#[derive(Clone)]
pub struct ReadApi {
    /// Weak, so that a reader outliving the dispatcher does not keep the
    /// stream open (its end is what stops the result files' writer).
    updates: broadcast::WeakSender<Arc<Update>>,
    snapshots: SnapshotRequests,
    live: mpsc::Sender<LiveRequest>,
    metrics: Arc<CoreMetrics>,
}

impl ReadApi {
    /// A read API over these channels: what the dispatcher hands out, and
    /// what a test of a reader builds to feed it updates of its own.
    pub fn new(
        updates: &broadcast::Sender<Arc<Update>>,
        snapshots: SnapshotRequests,
        live: mpsc::Sender<LiveRequest>,
        metrics: Arc<CoreMetrics>,
    ) -> ReadApi {
        ReadApi { updates: updates.downgrade(), snapshots, live, metrics }
    }

    /// Everything stored now, and a feed of every update after it (none
    /// missed, none repeated: the snapshot is taken in order with events
    /// after the subscription began).
    pub async fn subscribe(&self, name: &'static str) -> Result<(Snapshot, Feed), String> {
        let rx = self.updates.upgrade().ok_or("the dispatcher is stopping")?.subscribe();
        let (tx, answer) = oneshot::channel();
        self.snapshots.send(tx).await.map_err(|_| "the dispatcher is stopping".to_owned())?;
        let snapshot = answer.await.map_err(|_| "the dispatcher is stopping".to_owned())??;
        let feed = Feed::new(name, rx, self.snapshots.clone(), snapshot.seq);
        Ok((snapshot, feed))
    }

    /// The runners and the queue now, asked of the owner without making it wait.
    pub async fn live(&self) -> Result<Live, LiveError> {
        let (tx, rx) = oneshot::channel();
        self.live.try_send(tx).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LiveError::Busy,
            mpsc::error::TrySendError::Closed(_) => LiveError::Stopping,
        })?;
        match tokio::time::timeout(LIVE_TIMEOUT, rx).await {
            Ok(Ok(live)) => Ok(live),
            Ok(Err(_)) => Err(LiveError::Stopping),
            Err(_) => Err(LiveError::Timeout(LIVE_TIMEOUT)),
        }
    }

    /// The core's measurements.
    pub fn metrics(&self) -> &CoreMetrics {
        &self.metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_cumulatively() {
        let h = Histogram::new(&[0.001, 0.01]);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_secs(1));
        let (buckets, total, sum) = h.read();
        assert_eq!(buckets, vec![(0.001, 1), (0.01, 3)]);
        assert_eq!(total, 4);
        assert!((sum - 1.0105).abs() < 1e-9, "{sum}");
    }

    fn commit(n: u8) -> CommitId {
        format!("{n:040x}").parse().unwrap()
    }

    fn submit(s: &mut State, n: u8) {
        let files = vec!["tests/test_a.py".to_owned()];
        let supersede = kiln_proto::wire::Supersede::Nothing;
        s.submit("repo", "main", commit(n), supersede, |_| true, &files, None, u64::from(n)).unwrap();
    }

    #[test]
    fn the_queue_says_why_each_commit_waits() {
        let mut s = State::default();
        submit(&mut s, 1);
        submit(&mut s, 2);
        let reasons = |s: &State| -> Vec<(CommitId, WaitReason)> {
            live(s, &BTreeMap::new(), 0).queue.into_iter().map(|q| (q.commit, q.reason)).collect()
        };
        assert_eq!(reasons(&s), vec![(commit(1), WaitReason::NoRunner), (commit(2), WaitReason::NoRunner)]);
        // One runner with one slot takes the first commit; the second waits for a slot.
        s.register("r1", 7, 1, &[], &["no seccomp".to_owned()], &[]);
        let dispatched = s.assign();
        assert_eq!(dispatched.len(), 1);
        assert_eq!(reasons(&s), vec![(commit(2), WaitReason::NoFreeSlot { busy: 1, total: 1 })]);
        let conns = BTreeMap::from([(7, ConnInfo { address: "127.0.0.1:9".into(), since_ms: 5, last_heard_ms: 6 })]);
        let view = live(&s, &conns, 10);
        assert_eq!(view.runners.len(), 1);
        let r = &view.runners[0];
        assert_eq!((r.name.as_str(), r.address.as_str(), r.slots, r.busy), ("r1", "127.0.0.1:9", 1, 1));
        // `kiln status` is told the same facts.
        let status = view.status(vec![]);
        assert_eq!((status.runners_total, status.slots_total, status.slots_busy, status.queue_total), (1, 1, 1, 1));
        assert_eq!(status.runners[0].running[0].file_count, 1);
        assert_eq!(status.queue[0].reason, "no_free_slot");
        assert_eq!(status.queue[0].why, "no runner has a free slot (1 of 1 slots busy)");
        assert_eq!((r.connected_since_ms, r.last_heard_ms), (5, 6));
        assert_eq!(r.sandbox_warnings, vec!["no seccomp".to_owned()]);
        assert_eq!(r.running.len(), 1);
        assert_eq!((r.running[0].commit, r.running[0].files.clone()), (commit(1), vec!["tests/test_a.py".to_owned()]));
        // A second runner frees a slot: what is still queued is being handed out.
        s.register("r2", 8, 2, &[], &[], &[]);
        assert_eq!(reasons(&s), vec![(commit(2), WaitReason::Assigning)]);
        assert_eq!(
            WaitReason::NoFreeSlot { busy: 4, total: 4 }.to_string(),
            "no runner has a free slot (4 of 4 slots busy)"
        );
        assert_eq!(WaitReason::Behind { commits: 2 }.to_string(), "behind 2 older commits");
    }

    #[test]
    fn a_matrix_version_no_runner_has_is_the_reason_its_commit_waits() {
        let mut s = State::default();
        let files = crate::state::units(&["tests/test_a.py".to_owned()], &["3.11".to_owned(), "3.12".to_owned()]);
        let supersede = kiln_proto::wire::Supersede::Nothing;
        s.submit("repo", "main", commit(1), supersede, |_| true, &files, None, 1).unwrap();
        s.register("r1", 7, 2, &[], &[], &["3.11.7".to_owned()]);
        let d = s.assign();
        assert_eq!(d.len(), 1, "only the 3.11 half");
        let view = live(&s, &BTreeMap::new(), 0);
        assert_eq!(view.queue[0].reason, WaitReason::NoPython { versions: vec!["3.12".to_owned()] });
        assert_eq!(view.queue[0].reason.to_string(), "no runner has Python 3.12");
        assert_eq!(view.runners[0].running[0].files, ["tests/test_a.py (Python 3.11)"]);
        // Once a runner has it, the wait is an ordinary one.
        s.register("r2", 8, 1, &[], &[], &["3.12.1".to_owned()]);
        assert_eq!(live(&s, &BTreeMap::new(), 0).queue[0].reason, WaitReason::Assigning);
        let reason = WaitReason::NoPython { versions: vec!["3.12".to_owned(), "3.13".to_owned()] };
        assert_eq!(reason.to_string(), "no runner has Python 3.12 or 3.13");
    }

    #[tokio::test]
    async fn a_full_live_channel_is_busy_not_a_wait() {
        let (updates, _) = broadcast::channel(4);
        let (snapshots, _s) = mpsc::channel(1);
        let (live, _held) = mpsc::channel(1);
        let api = ReadApi::new(&updates, snapshots, live, Arc::default());
        // Nobody answers the first request: it times out, and fills the channel.
        let first = tokio::spawn({
            let api = api.clone();
            async move { api.live().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(api.live().await, Err(LiveError::Busy));
        drop(first);
    }
}
