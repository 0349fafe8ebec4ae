//! Warm plugin runs kept between the batches of one commit.
//!
//! A commit split across runners reaches each runner as several batches,
//! and each batch used to pay for a new sandbox and a new interpreter (some
//! 100–250 ms, most of the cost of a batch's start). Instead, a batch runs
//! as a *session*: the plugin host's [`PluginHost::run_with`], given a way
//! to send more files, in a task of its own. When the plugin has finished
//! every file it was given and asks for more, the batch ends (its slots
//! freed, its `Finished` sent) and the session waits, idle, for
//! [`LINGER`]. A next batch of the same commit,
//! Python and configuration, for the same slots, whose files all go to the
//! same plugin, joins it: its files are handed to the running plugin, and
//! their results flow to that batch's own stream (its own lease and
//! fencing token). Otherwise, or once the time is up, the session is told
//! no more will come and ends, and its checkout is removed.
//!
//! Only commits without an installed environment use sessions: an idle
//! session holds no environment lease, and one evicted under it would leave
//! the warm interpreter without its packages.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_plugin_host::{HostError, HostEvent, PluginHost, RunSettings};
use kiln_proto::{CommitId, RepoConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// How long an idle session waits for the next batch of its commit. The
/// dispatcher answers a finished batch within milliseconds; this covers a
/// busy one.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// What a batch must share with a session to join it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    pub commit: CommitId,
    pub python: Option<String>,
    pub config: Option<RepoConfig>,
    pub slots: u32,
}

/// How the batch that a session ran for ended.
pub(crate) enum Ended {
    /// Its files are done and the session waits for more.
    Idle,
    /// The plugin run ended (with the host's error, if any).
    Finished(Result<(), HostError>),
    /// The session ended before the batch's files reached it: run them
    /// some other way.
    Gone,
}

/// A batch handed to a session: its files, where their events go, and
/// where to say it ended.
pub(crate) struct Join {
    pub files: Vec<String>,
    pub events: mpsc::UnboundedSender<HostEvent>,
    pub ended: oneshot::Sender<Ended>,
}

/// A [`Join`] as the session holds it, with the batch's own stop.
struct Joined {
    join: Join,
    stop: CancellationToken,
}

/// An idle session, as a joining batch finds it.
pub(crate) struct Idle {
    id: u64,
    key: Key,
    /// The plugin that has every file of it.
    pub plugin: String,
    /// The test files of its checkout (sorted), for the joining batch's checks.
    pub found: Arc<Vec<String>>,
    join: mpsc::UnboundedSender<Joined>,
}

impl Idle {
    /// Hands `join` to the session; gives it back if the session is gone.
    pub(crate) fn join(self, join: Join) -> Result<Attached, Join> {
        let stop = CancellationToken::new();
        match self.join.send(Joined { join, stop: stop.clone() }) {
            Ok(()) => Ok(Attached(Some(stop))),
            Err(mpsc::error::SendError(joined)) => Err(joined.join),
        }
    }
}

/// A batch's hold on the session it runs in: dropped before the batch
/// ended there (cancelled, handed back), it ends the session and kills its
/// tests. Only the batch the session runs now can: one that ended there
/// already is released.
pub(crate) struct Attached(Option<CancellationToken>);

impl Attached {
    /// The batch ended normally: the session lives on.
    pub(crate) fn release(mut self) {
        self.0 = None;
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            stop.cancel();
        }
    }
}

/// The runner's idle sessions.
#[derive(Default)]
pub(crate) struct Sessions {
    idle: Mutex<Vec<Idle>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// What a session runs: the first batch's files in `checkout`, which the
/// session owns from then on.
pub(crate) struct Start {
    pub key: Key,
    pub checkout: PathBuf,
    pub found: Arc<Vec<String>>,
    pub settings: RunSettings,
    pub first: Join,
}

impl Sessions {
    /// The idle session `key` may join, taken so that no other batch does.
    pub(crate) fn take(&self, key: &Key) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let at = idle.iter().position(|s| s.key == *key)?;
        Some(idle.swap_remove(at))
    }

    /// Removes session `id` if it is still idle; whether it was.
    fn withdraw(&self, id: u64) -> bool {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let before = idle.len();
        idle.retain(|s| s.id != id);
        idle.len() < before
    }

    /// Offers `session` again: the batch that took it could not use it.
    pub(crate) fn put_back(&self, session: Idle) {
        self.offer(session);
    }

    fn offer(&self, session: Idle) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(session);
    }

    /// Starts a session with its first batch; the batch holds it attached.
    pub(crate) fn start(self: &Arc<Self>, host: Arc<PluginHost>, start: Start) -> Attached {
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sessions = Arc::clone(self);
        let (join_tx, join_rx) = mpsc::unbounded_channel();
        // The plugin that gets every file, if one does: only then may the
        // session take more (see `PluginHost::run_with`).
        let claimants: Vec<Option<String>> =
            start.first.files.iter().map(|f| host.claimants(f).into_iter().next()).collect();
        let plugin = claimants.first().cloned().flatten().filter(|p| claimants.iter().all(|c| c.as_ref() == Some(p)));
        let stop = CancellationToken::new();
        tokio::spawn(run(sessions, host, (id, join_tx), start, plugin, join_rx, stop.clone()));
        Attached(Some(stop))
    }
}

/// Removes the session's checkout however the session ends.
struct Checkout(PathBuf);

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.0.display(), "cannot remove a session's checkout: {e}");
        }
    }
}

async fn run(
    sessions: Arc<Sessions>,
    host: Arc<PluginHost>,
    (id, join_tx): (u64, mpsc::UnboundedSender<Joined>),
    start: Start,
    plugin: Option<String>,
    mut join_rx: mpsc::UnboundedReceiver<Joined>,
    stop: CancellationToken,
) {
    let Start { key, checkout, found, settings, first } = start;
    // Declared first, so dropped last: after the plugin run.
    let checkout = Checkout(checkout);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (more_tx, more_rx) = mpsc::unbounded_channel();
    let mut more_tx = Some(more_tx);
    let files = first.files.clone();
    let mut current = Some(Joined { join: first, stop });
    let plugin_run = host.run_with(&checkout.0, &files, key.slots, &settings, &events_tx, Some(more_rx));
    tokio::pin!(plugin_run);
    let linger = tokio::time::sleep(Duration::MAX);
    tokio::pin!(linger);
    let mut idle = false;
    let result = loop {
        tokio::select! {
            // Events first: the batch must get all of them before its end.
            biased;
            Some(event) = events.recv() => match event {
                HostEvent::Idle => {
                    if let Some(batch) = current.take() {
                        let _ = batch.join.ended.send(Ended::Idle);
                    }
                    match (&plugin, &more_tx) {
                        (Some(plugin), Some(_)) => {
                            idle = true;
                            linger.as_mut().reset(tokio::time::Instant::now() + LINGER);
                            sessions.offer(Idle {
                                id,
                                key: key.clone(),
                                plugin: plugin.clone(),
                                found: Arc::clone(&found),
                                join: join_tx.clone(),
                            });
                        }
                        // Nothing can join: end now.
                        _ => more_tx = None,
                    }
                }
                event => {
                    if let Some(batch) = &current {
                        let _ = batch.join.events.send(event);
                    }
                }
            },
            Some(joined) = join_rx.recv() => {
                idle = false;
                info!(files = joined.join.files.len(), "the batch joined the commit's warm plugin run");
                if let Some(more) = &more_tx {
                    let _ = more.send(joined.join.files.clone());
                }
                current = Some(joined);
            }
            () = &mut linger, if idle => {
                idle = false;
                if sessions.withdraw(id) {
                    // Nobody came: the plugin finishes.
                    more_tx = None;
                }
                // Otherwise a batch took it and its files are on the way.
            }
            result = &mut plugin_run => break Some(result),
            // The batch it runs was cancelled or handed back: dropping the
            // run kills its tests.
            () = async { current.as_ref().expect("guarded").stop.cancelled().await }, if current.is_some() => {
                break None;
            }
        }
    };
    sessions.withdraw(id);
    // What the plugin reported last is still queued.
    while let Ok(event) = events.try_recv() {
        if let Some(batch) = &current
            && event != HostEvent::Idle
        {
            let _ = batch.join.events.send(event);
        }
    }
    if let (Some(batch), Some(result)) = (current.take(), result) {
        let _ = batch.join.ended.send(Ended::Finished(result));
    }
    // Batches that took this session as it ended run elsewhere.
    join_rx.close();
    while let Ok(joined) = join_rx.try_recv() {
        let _ = joined.join.ended.send(Ended::Gone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(commit: u8, python: Option<&str>, slots: u32) -> Key {
        let commit = format!("{commit:040x}").parse().unwrap();
        Key { commit, python: python.map(str::to_owned), config: None, slots }
    }

    fn idle(id: u64, key: Key) -> Idle {
        let (join, _) = mpsc::unbounded_channel();
        Idle { id, key, plugin: "p".to_owned(), found: Arc::default(), join }
    }

    /// A batch joins only a session of its own commit, Python and slots,
    /// and only one batch takes it.
    #[test]
    fn only_a_batch_of_the_same_commit_python_and_slots_takes_an_idle_session() {
        let sessions = Sessions::default();
        sessions.offer(idle(1, key(1, None, 1)));
        for other in [key(2, None, 1), key(1, Some("3.12"), 1), key(1, None, 2)] {
            assert!(sessions.take(&other).is_none(), "{other:?}");
        }
        let mut config = key(1, None, 1);
        config.config = Some(RepoConfig::default());
        assert!(sessions.take(&config).is_none(), "another configuration");
        assert_eq!(sessions.take(&key(1, None, 1)).map(|s| s.id), Some(1));
        assert!(sessions.take(&key(1, None, 1)).is_none(), "taken once");
        // Withdrawn when its time is up, unless a batch took it first.
        sessions.offer(idle(2, key(1, None, 1)));
        assert!(sessions.withdraw(2));
        assert!(!sessions.withdraw(2));
    }

    /// A session that ended gives a joining batch back its files.
    #[test]
    fn joining_a_session_that_is_gone_gives_the_batch_back() {
        let (join, gone) = mpsc::unbounded_channel::<Joined>();
        drop(gone);
        let session = Idle { join, ..idle(3, key(1, None, 1)) };
        let (events, _) = mpsc::unbounded_channel();
        let (ended, _) = oneshot::channel();
        let back = session.join(Join { files: vec!["tests/test_a.py".to_owned()], events, ended });
        assert_eq!(back.err().map(|j| j.files), Some(vec!["tests/test_a.py".to_owned()]));
    }
}
