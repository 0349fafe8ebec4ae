//! The dashboard's own copy of what the dispatcher stored, rebuilt from the
//! stream of deltas, and the ring of recent events the SSE endpoint serves.
//!
//! Pages and the JSON API read this under a short read lock; only the
//! follower task (one per server) writes it. Nothing here waits on the
//! dispatcher's owner task, and nothing grows without bound but the
//! commits themselves (which the dispatcher keeps too): the event ring is
//! capped in events and in bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use kiln_dispatcher::state::CommitEntry;
use kiln_dispatcher::state::split_unit;
use kiln_dispatcher::store::Change;
use kiln_dispatcher::stream::{Doc, Snapshot, Update, apply};
use kiln_dispatcher::view::Histogram;
use kiln_proto::{CommitId, CommitStatus, Counts, Outcome, TestResult};
use serde::Serialize;

/// At most this many events are kept for clients that resume.
pub const RING_EVENTS: usize = 4096;
/// At most this many bytes of encoded events are kept.
pub const RING_BYTES: usize = 4 << 20;
/// The part of a test's message an event carries; the page has the rest.
const EVENT_MESSAGE_BYTES: usize = 2048;

/// Test durations: 1 ms to 10 min.
const TEST_BOUNDS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 600.0];
/// Commit durations and queue waits: 100 ms to 1 h.
const COMMIT_BOUNDS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// One encoded event of the SSE stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The stream's `seq` of the update it describes.
    pub seq: u64,
    /// Its JSON, one line.
    pub data: Arc<str>,
}

/// Why a client cannot resume where it asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gone;

/// Recent events, oldest first, contiguous in `seq` after `base`.
#[derive(Debug, Default)]
pub struct Ring {
    events: VecDeque<Event>,
    bytes: usize,
    /// Every event after this seq is in the ring (or still to come); events
    /// up to it may have been dropped.
    base: u64,
    /// The last seq pushed.
    last: u64,
}

impl Ring {
    fn push(&mut self, event: Event) {
        self.last = event.seq;
        self.bytes += event.data.len();
        self.events.push_back(event);
        while self.events.len() > RING_EVENTS || self.bytes > RING_BYTES {
            let Some(old) = self.events.pop_front() else { break };
            self.bytes -= old.data.len();
            self.base = old.seq;
        }
    }

    /// Forgets everything up to `seq`: what a resynchronisation does, since
    /// the updates it skipped were never seen.
    fn reset(&mut self, seq: u64) {
        self.events.clear();
        self.bytes = 0;
        self.base = seq;
        self.last = seq;
    }

    /// The events after `after`, at most `max` of them; [`Gone`] if some
    /// of those are no longer here (or `after` is from the future: another
    /// dispatcher's numbering).
    pub fn after(&self, after: u64, max: usize) -> Result<Vec<Event>, Gone> {
        if after < self.base || after > self.last {
            return Err(Gone);
        }
        let skip = self.events.iter().position(|e| e.seq > after).unwrap_or(self.events.len());
        Ok(self.events.iter().skip(skip).take(max).cloned().collect())
    }

    /// The last seq pushed.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The events held.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

/// How far a commit's files are.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    /// Files it was split into.
    pub files: usize,
    /// Files done.
    pub done: BTreeSet<String>,
}

/// Histograms observed from the deltas since this server started.
#[derive(Debug)]
pub struct Observed {
    /// Each test's `duration_ms`.
    pub test_duration: Histogram,
    /// Queued to final, per commit.
    pub commit_duration: Histogram,
    /// Queued to its first batch, per commit.
    pub queue_wait: Histogram,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            test_duration: Histogram::new(TEST_BOUNDS),
            commit_duration: Histogram::new(COMMIT_BOUNDS),
            queue_wait: Histogram::new(COMMIT_BOUNDS),
        }
    }
}

/// The dashboard's state.
#[derive(Default)]
pub struct Board {
    docs: HashMap<CommitId, Doc>,
    progress: HashMap<CommitId, Progress>,
    /// Submission order (`row.seq`) → commit.
    order: BTreeMap<u64, CommitId>,
    /// The recent events.
    pub ring: Ring,
    /// Histograms.
    pub observed: Observed,
    /// Resynchronisations after falling behind the dispatcher's stream.
    pub resyncs: u64,
    /// The last flaky list computed, reused while nothing changed
    /// ([`crate::history::FLAKY_MAX_AGE`]).
    pub(crate) flaky: std::sync::Mutex<Option<crate::history::Cached>>,
}

/// A commit's summary as the API and the events describe it.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The commit.
    pub commit: CommitId,
    /// Its repository.
    pub repo: String,
    /// Its branch.
    pub branch: String,
    /// Submission order.
    pub seq: u64,
    /// Where testing stands.
    pub status: CommitStatus,
    /// Counts so far.
    pub counts: Counts,
    /// Files it was split into, and how many are done.
    pub files: usize,
    /// Files done.
    pub files_done: usize,
    /// Why it could not run or was stopped.
    pub error: Option<String>,
    /// Its runners, as `a, b`.
    pub runner: Option<String>,
    /// Unix ms when it was queued.
    pub queued_at_ms: u64,
    /// Unix ms when it ended.
    pub finished_at_ms: Option<u64>,
}

/// One change as an event describes it.
#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum EventChange<'a> {
    Commit(Summary),
    Test {
        commit: CommitId,
        id: &'a str,
        file: &'a str,
        outcome: Outcome,
        duration_ms: u64,
        message: &'a str,
        truncated: bool,
        runner: Option<&'a str>,
        python: Option<&'a str>,
    },
    FileDone {
        commit: CommitId,
        file: &'a str,
        python: Option<&'a str>,
    },
    Retry {
        commit: CommitId,
        file: &'a str,
        python: Option<&'a str>,
        retries: u32,
    },
    Files {
        commit: CommitId,
        files: usize,
    },
    Batch {
        commit: CommitId,
        job: u64,
        runner: &'a str,
        files: usize,
    },
    BatchEnded {
        job: u64,
    },
}

/// The start of `s`, at most `max` bytes, cut at a character boundary.
fn head(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Board {
    /// A board holding `snapshot`.
    pub fn of(snapshot: &Snapshot) -> Board {
        let mut board = Board::default();
        board.load(&snapshot.entries, snapshot.seq);
        board
    }

    fn load(&mut self, entries: &[CommitEntry], seq: u64) {
        self.docs.clear();
        self.progress.clear();
        self.order.clear();
        for e in entries {
            self.docs.insert(e.commit, Doc::of(e));
            self.progress.insert(e.commit, Progress { files: e.files.len(), done: e.done_files.clone() });
            self.order.insert(e.seq, e.commit);
        }
        self.ring.reset(seq);
    }

    /// Starts again from a snapshot (after falling behind): clients that
    /// had events before it are told to reload.
    pub fn resync(&mut self, snapshot: &Snapshot) {
        self.resyncs += 1;
        self.load(&snapshot.entries, snapshot.seq);
    }

    /// Applies one update at `now_ms` and records its event.
    pub fn apply(&mut self, update: &Update, now_ms: u64) {
        for change in &update.changes {
            self.observe(change, now_ms);
            match change {
                Change::Commit(row) => {
                    self.order.insert(row.seq, row.commit);
                    self.progress.entry(row.commit).or_default();
                }
                Change::Files { commit, files } => {
                    self.progress.entry(*commit).or_default().files = files.len();
                }
                Change::FileDone { commit, file } => {
                    self.progress.entry(*commit).or_default().done.insert(file.clone());
                }
                _ => {}
            }
            apply(&mut self.docs, change);
        }
        let data = self.encode(update);
        self.ring.push(Event { seq: update.seq, data: data.into() });
    }

    /// Feeds the histograms, before the change is applied (so a commit's
    /// old status is still known).
    fn observe(&mut self, change: &Change, now_ms: u64) {
        match change {
            Change::Test { commit, result } => {
                let new = self.docs.get(commit).is_some_and(|d| !d.tests.contains_key(&result.key()));
                if new {
                    self.observed.test_duration.observe(Duration::from_millis(result.duration_ms));
                }
            }
            Change::Commit(row) => {
                let was_final = self.docs.get(&row.commit).is_some_and(|d| d.row.status.is_final());
                if row.status.is_final()
                    && !was_final
                    && let Some(end) = row.finished_at_ms
                {
                    let ms = end.saturating_sub(row.queued_at_ms);
                    self.observed.commit_duration.observe(Duration::from_millis(ms));
                }
            }
            // A commit's first batch: how long it waited for a runner.
            Change::Batch(b) if b.attempt == 1 => {
                if let Some(doc) = self.docs.get(&b.commit) {
                    let ms = now_ms.saturating_sub(doc.row.queued_at_ms);
                    self.observed.queue_wait.observe(Duration::from_millis(ms));
                }
            }
            _ => {}
        }
    }

    fn encode(&self, update: &Update) -> String {
        let changes: Vec<EventChange<'_>> = update
            .changes
            .iter()
            .filter_map(|c| {
                Some(match c {
                    Change::Commit(row) => EventChange::Commit(self.summary(&row.commit)?),
                    Change::Test { commit, result } => event_test(*commit, result),
                    // The state's units, as a file and its Python version (the matrix).
                    Change::FileDone { commit, file } => {
                        let (python, file) = split_unit(file);
                        EventChange::FileDone { commit: *commit, file, python }
                    }
                    Change::Retry { commit, file, retries } => {
                        let (python, file) = split_unit(file);
                        EventChange::Retry { commit: *commit, file, python, retries: *retries }
                    }
                    Change::Files { commit, files } => EventChange::Files { commit: *commit, files: files.len() },
                    Change::Batch(b) => {
                        EventChange::Batch { commit: b.commit, job: b.job, runner: &b.runner, files: b.files.len() }
                    }
                    Change::BatchEnded { job } => EventChange::BatchEnded { job: *job },
                    Change::Owner { .. } => return None,
                })
            })
            .collect();
        // JSON has no raw line breaks: a message cannot end the SSE event
        // early or forge another one.
        serde_json::json!({ "seq": update.seq, "changes": changes }).to_string()
    }

    /// A commit's document.
    pub fn doc(&self, commit: &CommitId) -> Option<&Doc> {
        self.docs.get(commit)
    }

    /// A commit's progress.
    pub fn progress(&self, commit: &CommitId) -> Option<&Progress> {
        self.progress.get(commit)
    }

    /// The commit a prefix names, if exactly one.
    pub fn resolve(&self, prefix: &str) -> Option<CommitId> {
        if let Ok(full) = prefix.parse::<CommitId>() {
            return self.docs.contains_key(&full).then_some(full);
        }
        if prefix.len() < 4 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let prefix = prefix.to_ascii_lowercase();
        let mut found = self.docs.keys().filter(|c| c.as_str().starts_with(&prefix));
        let first = found.next().copied();
        if found.next().is_some() { None } else { first }
    }

    /// A commit's summary.
    pub fn summary(&self, commit: &CommitId) -> Option<Summary> {
        let doc = self.docs.get(commit)?;
        let progress = self.progress.get(commit);
        let r = &doc.row;
        Some(Summary {
            commit: r.commit,
            repo: r.repo.clone(),
            branch: r.branch.clone(),
            seq: r.seq,
            status: r.status,
            counts: Counts::of(doc.tests.values()),
            files: progress.map_or(0, |p| p.files),
            files_done: progress.map_or(0, |p| p.done.len()),
            error: r.error.clone(),
            runner: r.runner.clone(),
            queued_at_ms: r.queued_at_ms,
            finished_at_ms: r.finished_at_ms,
        })
    }

    /// Commits newest first, submitted before `before` (a `seq`), that
    /// `keep` accepts; at most `limit`.
    pub fn newest(&self, before: Option<u64>, limit: usize, keep: impl Fn(&Doc) -> bool) -> Vec<&Doc> {
        let range = match before {
            Some(b) => self.order.range(..b),
            None => self.order.range(..),
        };
        range.rev().filter_map(|(_, c)| self.docs.get(c)).filter(|d| keep(d)).take(limit).collect()
    }

    /// Every commit, newest first: what [`kiln_dispatcher::history`] reads.
    pub fn newest_first(&self) -> impl Iterator<Item = &Doc> {
        self.order.values().rev().filter_map(|c| self.docs.get(c))
    }

    /// How many commits are stored with each status.
    pub fn by_status(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for doc in self.docs.values() {
            *out.entry(doc.row.status.as_str()).or_insert(0) += 1;
        }
        out
    }

    /// How many stored results ended each way.
    pub fn by_outcome(&self) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        for doc in self.docs.values() {
            for t in doc.tests.values() {
                *out.entry(t.outcome.as_str()).or_insert(0) += 1;
            }
        }
        out
    }
}

fn event_test(commit: CommitId, result: &TestResult) -> EventChange<'_> {
    let message = head(&result.message, EVENT_MESSAGE_BYTES);
    EventChange::Test {
        commit,
        id: &result.id,
        file: &result.file,
        outcome: result.outcome,
        duration_ms: result.duration_ms,
        message,
        truncated: message.len() < result.message.len(),
        runner: result.runner.as_deref(),
        python: result.python.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, bytes: usize) -> Event {
        Event { seq, data: "x".repeat(bytes).into() }
    }

    #[test]
    fn the_ring_keeps_a_bounded_contiguous_tail() {
        let mut ring = Ring::default();
        ring.reset(10);
        for seq in 11..=10 + RING_EVENTS as u64 + 5 {
            ring.push(event(seq, 10));
        }
        assert_eq!(ring.len(), RING_EVENTS);
        // The five oldest are gone: resuming from before them is refused.
        assert_eq!(ring.after(10, 10), Err(Gone));
        assert_eq!(ring.after(14, 10), Err(Gone));
        let got = ring.after(15, 3).unwrap();
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![16, 17, 18]);
        // Up to date: nothing, but not gone.
        assert!(ring.after(ring.last(), 10).unwrap().is_empty());
        // From the future (a restarted dispatcher numbers from 1 again).
        assert_eq!(ring.after(ring.last() + 1, 10), Err(Gone));
    }

    #[test]
    fn the_ring_is_capped_in_bytes() {
        let mut ring = Ring::default();
        for seq in 1..=100 {
            ring.push(event(seq, RING_BYTES / 10));
        }
        assert!(ring.bytes() <= RING_BYTES, "{}", ring.bytes());
        assert_eq!(ring.len(), 10);
        assert_eq!(ring.after(89, 100).map(|v| v.len()), Err(Gone));
        assert_eq!(ring.after(90, 100).map(|v| v.len()), Ok(10));
    }
}
