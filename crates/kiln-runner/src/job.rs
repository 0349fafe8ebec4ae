//! One assignment, from source fetch to the last reported result.
//!
//! A job outlives the connection it arrived on: once its tests run, losing
//! the dispatcher only pauses the reporting. Events wait in memory while the
//! runner reconnects; the runner then asks to resume the job (see
//! `lib.rs`), and either gets a new stream to flush the events into, or is
//! told the lease has moved on, and the job is dropped (its tests killed).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use kiln_git::{ObjectStore, Open, with_store};
use kiln_net::{Connection, RecvStream, SendStream};
use kiln_plugin_host::{HostEvent, PluginHost, RunSettings};
use kiln_proto::wire::{Assignment, Control, Held, JobEvent, Reply, Request};
use kiln_proto::{CommitId, Escaped, RepoConfig, error_chain};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::session;

/// How many commits a runner offers as "haves" when fetching source.
const HAVES: usize = 32;

/// What every job of this runner shares.
pub(crate) struct JobContext {
    /// The bare git object cache, shared by all jobs.
    pub cache: PathBuf,
    /// Where per-job checkouts are made.
    pub jobs_dir: PathBuf,
    /// The largest source pack accepted.
    pub max_pack_bytes: u64,
    /// Caps on the uncompressed source, applied at unpack and checkout.
    pub git_limits: kiln_git::Limits,
    /// The plugins.
    pub host: Arc<PluginHost>,
    /// The longest per-file time limit a repository's `file-timeout` may set.
    pub max_file_timeout: std::time::Duration,
    /// The repositories' cached environments.
    pub envs: crate::env::Envs,
    /// The interpreters for batches with a version (`--python`).
    pub pythons: Vec<crate::Interpreter>,
    /// The runner's `python3`, for batches without one.
    pub default_python: Option<crate::Interpreter>,
    /// The runner's slots: how many test files may run at once, across jobs.
    pub slots: Slots,
    /// Jobs running now, by job id, with the way to hand each a new stream.
    pub jobs: Mutex<HashMap<u64, Running>>,
    /// Held while a batch brings its commit into the cache: batches of one
    /// commit often arrive together, and two writers of the same commit's
    /// objects and ref would collide on git's lock files. The second finds
    /// the commit present and fetches nothing.
    pub fetching: tokio::sync::Mutex<()>,
    /// Warm plugin runs waiting for their commit's next batch.
    pub sessions: Arc<session::Sessions>,
}

/// The runner's slots, shared by its batches: a batch takes exactly the
/// slots its assignment grants (waiting for them) before its tests start
/// and gives them back when they end, so the runner never runs more test
/// files at once than it has slots, however many batches it holds. The
/// dispatcher grants a batch only slots it believes free; this semaphore is
/// what holds the line when it is briefly wrong (a cancelled batch's tests
/// still dying while the next batch arrives).
pub(crate) struct Slots {
    semaphore: Arc<tokio::sync::Semaphore>,
    total: u32,
}

impl Slots {
    pub(crate) fn new(slots: u32) -> Slots {
        let total = slots.max(1);
        Slots { semaphore: Arc::new(tokio::sync::Semaphore::new(total as usize)), total }
    }

    /// Takes `granted` slots (at least one, at most all), waiting for them.
    async fn take(&self, granted: u32) -> tokio::sync::OwnedSemaphorePermit {
        let n = granted.clamp(1, self.total);
        Arc::clone(&self.semaphore).acquire_many_owned(n).await.expect("the semaphore is never closed")
    }
}

/// A running job, as the reconnect logic sees it.
pub(crate) struct Running {
    attempt: u32,
    link: mpsc::UnboundedSender<Relink>,
}

/// What the reconnect logic tells a job that lost its stream.
pub(crate) enum Relink {
    /// The dispatcher took the job back on this new stream.
    Stream(SendStream, RecvStream),
    /// The dispatcher refused: the lease moved on. Stop.
    Drop(String),
}

impl JobContext {
    /// The assignments this runner is working on.
    pub(crate) fn held(&self) -> Vec<Held> {
        self.jobs().iter().map(|(&job, r)| Held { job, attempt: r.attempt }).collect()
    }

    /// Hands a job its fate after a reconnect.
    pub(crate) fn relink(&self, job: u64, relink: Relink) {
        if let Some(r) = self.jobs().get(&job) {
            // The job may have ended meanwhile; then there is no one to tell.
            let _ = r.link.send(relink);
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Running>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What an assignment asks to run.
struct Batch {
    /// The test files, repository-relative.
    files: Vec<String>,
    /// How many of the runner's slots they may use.
    slots: u32,
    /// The repository's configuration, if the commit has one.
    config: Option<RepoConfig>,
    /// The Python version the batch is for (the matrix), if any.
    python: Option<String>,
}

/// Why a job could not run its tests.
#[derive(Debug, thiserror::Error)]
enum JobError {
    #[error("fetch the source of {commit} from the dispatcher: {reason}")]
    Fetch { commit: CommitId, reason: String },
    #[error("check out {commit}")]
    Git {
        commit: CommitId,
        #[source]
        source: kiln_git::GitError,
    },
    #[error("list the files under tests/")]
    List(#[source] std::io::Error),
    #[error("no tests found: {0}")]
    OnlyLinks(String),
    #[error("run the plugins")]
    Plugins(#[source] kiln_plugin_host::HostError),
    #[error("use the repository's configuration from {source_file}: {problem}")]
    Config { source_file: String, problem: String },
    #[error("set up the Python environment")]
    Env(#[source] crate::env::EnvError),
    #[error("this runner has no Python {0} (it registered {1})")]
    NoPython(String, String),
}

/// Serves one assignment stream opened by the dispatcher.
pub(crate) async fn serve_assignment(
    ctx: Arc<JobContext>,
    conn: Connection,
    send: SendStream,
    mut recv: RecvStream,
    shutdown: CancellationToken,
) {
    let assignment: Assignment = match recv.expect().await {
        Ok(a) => a,
        Err(e) => {
            warn!("bad assignment from the dispatcher: {}", Escaped(&error_chain(&e)));
            return;
        }
    };
    let Assignment { job, attempt, commit, files, slots, config, python } = assignment;
    info!(job, attempt, %commit, files = files.len(), slots, python = python.as_deref(), "job started");
    let checkout = ctx.jobs_dir.join(format!("{job}-{attempt}"));
    let (link_tx, link_rx) = mpsc::unbounded_channel();
    ctx.jobs().insert(job, Running { attempt, link: link_tx });
    let lease = Held { job, attempt };
    let batch = Batch { files, slots, config, python };
    report(&ctx, &conn, lease, commit, &batch, &checkout, (send, recv), link_rx, &shutdown).await;
    ctx.jobs().remove(&job);
    remove_checkout(&checkout).await;
}

async fn remove_checkout(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(dir = %Escaped(&dir.display().to_string()), "cannot remove the job's checkout: {e}");
    }
}

/// Runs the job and gets its events to the dispatcher, across reconnects.
#[expect(clippy::too_many_arguments, reason = "one call site; a struct would only rename these")]
async fn report(
    ctx: &JobContext,
    conn: &Connection,
    lease: Held,
    commit: CommitId,
    batch: &Batch,
    checkout: &Path,
    first: (SendStream, RecvStream),
    mut relinks: mpsc::UnboundedReceiver<Relink>,
    shutdown: &CancellationToken,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel::<JobEvent>();
    // Dropping this future kills the job's tests: the plugin host kills each
    // command's process group when its future is dropped.
    let mut run: Option<Pin<Box<_>>> = Some(Box::pin(run_job(ctx, conn, lease, commit, batch, checkout, events_tx)));
    let mut link = Some(first);
    // Events not yet sent on the current stream, and every event sent so far:
    // after a reconnect the whole history is sent again, because events the
    // transport delivered may have died with a dispatcher before it stored
    // them. The dispatcher keeps the first result per test, so repeats are harmless.
    let mut pending: VecDeque<JobEvent> = VecDeque::new();
    let mut history: Vec<JobEvent> = Vec::new();
    let mut last: Option<JobEvent> = None;
    loop {
        // Deliver what is waiting, while there is a stream to deliver it on.
        if let Some((send, _)) = link.as_mut() {
            while let Some(event) = pending.pop_front() {
                if let Err(e) = send.send(&event).await {
                    warn!("lost the assignment stream: {}; the job carries on", Escaped(&error_chain(&e)));
                    pending.push_front(event);
                    link = None;
                    break;
                }
                history.push(event);
            }
        }
        if run.is_none() && pending.is_empty() {
            if let Some(event) = last.take() {
                pending.push_back(event);
                continue;
            }
            if let Some((send, _)) = link.as_mut() {
                send.finish();
                // Done only once the dispatcher has acknowledged every event.
                if send.stopped().await {
                    return;
                }
                warn!("lost the dispatcher before it acknowledged the job's end; waiting to resume");
                link = None;
            }
        }
        tokio::select! {
            Some(event) = events.recv() => pending.push_back(event),
            ended = async { run.as_mut().expect("guarded").await }, if run.is_some() => {
                run = None;
                // The run sends every event before it ends; keep them in order.
                while let Ok(event) = events.try_recv() {
                    pending.push_back(event);
                }
                last = Some(match ended {
                    Ok(Ok(count)) => {
                        info!(tests = count, "job finished");
                        JobEvent::Finished { error: None }
                    }
                    Ok(Err(e)) => {
                        warn!("job failed: {}", Escaped(&error_chain(&e)));
                        JobEvent::Finished { error: Some(error_chain(&e)) }
                    }
                    Err(reason) => {
                        // The source could not be fetched because the dispatcher went away:
                        // it requeues the job; nothing to report.
                        warn!("dropping the job: {}", Escaped(&reason));
                        return;
                    }
                });
            }
            control = async { link.as_mut().expect("guarded").1.recv::<Control>().await }, if link.is_some() => {
                match control {
                    Ok(Some(Control::Cancel { reason })) => {
                        info!("job cancelled: {}", Escaped(&reason));
                        run = None;
                        pending.clear();
                        last = Some(JobEvent::Finished { error: Some(format!("cancelled: {reason}")) });
                    }
                    // The dispatcher ended its half: it will say nothing more.
                    Ok(None) => {}
                    Err(e) => {
                        warn!(
                            "lost the dispatcher: {}; the job carries on while the runner reconnects",
                            Escaped(&error_chain(&e))
                        );
                        link = None;
                    }
                }
            }
            relink = relinks.recv() => match relink {
                Some(Relink::Stream(send, recv)) => {
                    info!(sent = history.len(), pending = pending.len(), "resuming the job's reports");
                    let unsent = std::mem::take(&mut pending);
                    pending = history.drain(..).chain(unsent).collect();
                    link = Some((send, recv));
                }
                Some(Relink::Drop(reason)) => {
                    warn!("dropping the job: {}", Escaped(&reason));
                    return;
                }
                // The runner itself is going away.
                None => return,
            },
            () = shutdown.cancelled() => {
                info!("handing the job back: shutting down");
                // Kill the tests before saying so.
                drop(run.take());
                pending.clear();
                let Some((send, _)) = link.as_mut() else { return };
                if send.send(&JobEvent::Abandoned { reason: "the runner is shutting down".to_owned() }).await.is_ok() {
                    send.finish();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), send.stopped()).await;
                }
                return;
            }
        }
    }
}

/// Fetches, checks out and runs the tests, sending each event to `events`.
/// The outer error means the job should be dropped silently (the dispatcher
/// went away before the tests started); the inner one is reported.
async fn run_job(
    ctx: &JobContext,
    conn: &Connection,
    lease: Held,
    commit: CommitId,
    batch: &Batch,
    checkout: &Path,
    events: mpsc::UnboundedSender<JobEvent>,
) -> Result<Result<usize, JobError>, String> {
    let key = session::Key { commit, python: batch.python.clone(), config: batch.config.clone(), slots: batch.slots };
    // Without an installed environment (see `session`), a batch joins a
    // warm run of its commit if this runner has one idle.
    let warm = batch.config.as_ref().is_none_or(|c| !c.installs());
    if warm
        && let Some(idle) = ctx.sessions.take(&key)
        && let Some(ran) = join_session(ctx, idle, batch, &events).await
    {
        return Ok(ran);
    }
    if let Err(e) = fetch(ctx, conn, lease, commit, checkout).await {
        if let Some(reason) = conn.close_reason() {
            return Err(format!("lost the dispatcher while fetching the source: {reason}"));
        }
        return Ok(Err(e));
    }
    let found = match kiln_plugin_host::test_files(checkout) {
        Ok(found) => found,
        Err(e) => return Ok(Err(JobError::List(e))),
    };
    if let Some(warning) = found.warning() {
        if found.files.is_empty() {
            return Ok(Err(JobError::OnlyLinks(warning)));
        }
        // The receiver lives as long as this future.
        let _ = events.send(JobEvent::Warning(warning));
    }
    // The batch's files, of the whole checkout. One that is not a regular
    // file here, or that no plugin claims, is reported, never dropped.
    let mut files = Vec::new();
    for file in &batch.files {
        let claimant = ctx.host.claimants(file).into_iter().next();
        match not_run(&found.files, file, claimant.as_deref()) {
            // The receiver lives as long as this future.
            Some(reason) => drop(events.send(JobEvent::NotRun { file: file.clone(), reason: reason.to_owned() })),
            None => files.push(file.clone()),
        }
    }
    if files.is_empty() {
        return Ok(Ok(0));
    }
    let mut settings = match &batch.config {
        None => RunSettings::default(),
        Some(config) => match settings(config, ctx.max_file_timeout, &events) {
            Ok(settings) => settings,
            Err(e) => return Ok(Err(e)),
        },
    };
    // The batch's interpreter, for the tests and for their environment alike.
    let interpreter = match &batch.python {
        None => ctx.default_python.as_ref(),
        Some(wanted) => match crate::python::choose(&ctx.pythons, wanted) {
            Some(interpreter) => {
                settings.programs.insert("python3".to_owned(), interpreter.path.clone());
                Some(interpreter)
            }
            None => {
                let have: Vec<&str> = ctx.pythons.iter().map(|i| i.version.as_str()).collect();
                return Ok(Err(JobError::NoPython(wanted.clone(), have.join(", "))));
            }
        },
    };
    // Held until the tests end: the environment is not evicted under them.
    let _env = match &batch.config {
        Some(config) if config.installs() => match ctx.envs.get(config, checkout, interpreter).await {
            Ok(lease) => {
                settings.programs.insert("python3".to_owned(), lease.python.clone());
                Some(lease)
            }
            Err(e) => return Ok(Err(JobError::Env(e))),
        },
        _ => None,
    };
    let slots = ctx.slots.take(batch.slots).await;
    debug!(files = files.len(), slots = slots.num_permits(), "running tests");
    if warm {
        // The session owns the checkout from now on, under a name of its own.
        let dir = ctx.jobs_dir.join(format!("session-{}-{}", lease.job, lease.attempt));
        if tokio::fs::rename(checkout, &dir).await.is_ok() {
            let (tx, rx) = mpsc::unbounded_channel::<HostEvent>();
            let (ended_tx, ended) = oneshot::channel();
            let first = session::Join { files, events: tx, ended: ended_tx };
            let start = session::Start { key, checkout: dir, found: Arc::new(found.files), settings, first };
            let attached = ctx.sessions.start(Arc::clone(&ctx.host), start);
            return Ok(in_session(rx, ended, attached, slots, &events)
                .await
                .unwrap_or_else(|| Err(JobError::Plugins(kiln_plugin_host::HostError::ReportClosed))));
        }
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<HostEvent>();
    let host = Arc::clone(&ctx.host);
    let run = async move {
        let count = u32::try_from(slots.num_permits()).unwrap_or(u32::MAX);
        let r = host.run_with(checkout, &files, count, &settings, &tx, None).await;
        drop(tx);
        drop(slots);
        r
    };
    let (ran, count) = tokio::join!(run, forward(&mut rx, &events));
    Ok(ran.map(|()| count).map_err(JobError::Plugins))
}

/// Why a batch's `file` is not run, if it is not: it is not among the
/// regular files under `tests/` the checkout has (`found`, sorted), or no
/// plugin claims it (`claimant`: the first that does).
fn not_run(found: &[String], file: &str, claimant: Option<&str>) -> Option<&'static str> {
    if found.binary_search_by(|f| f.as_str().cmp(file)).is_err() {
        Some("not a regular file under tests/ in the runner's checkout")
    } else if claimant.is_none() {
        Some("no plugin claims it")
    } else {
        None
    }
}

/// Sends the plugins' events on as the job's until their sender is gone;
/// how many test results there were.
async fn forward(rx: &mut mpsc::UnboundedReceiver<HostEvent>, events: &mpsc::UnboundedSender<JobEvent>) -> usize {
    let mut count = 0;
    while let Some(event) = rx.recv().await {
        let event = match event {
            HostEvent::Test(result) => {
                count += 1;
                JobEvent::Test(result)
            }
            HostEvent::FileDone(file) => JobEvent::FileDone { file },
            HostEvent::Idle => continue,
        };
        // The receiver lives as long as the job.
        let _ = events.send(event);
    }
    count
}

/// Runs `batch` in the idle session `idle`, if it can: its files must all
/// go to the session's plugin. `None`: it could not, and it runs as a batch
/// of its own (nothing about it was reported, or only what that repeats).
async fn join_session(
    ctx: &JobContext,
    idle: session::Idle,
    batch: &Batch,
    events: &mpsc::UnboundedSender<JobEvent>,
) -> Option<Result<usize, JobError>> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for file in &batch.files {
        let claimant = ctx.host.claimants(file).into_iter().next();
        if let Some(reason) = not_run(&idle.found, file, claimant.as_deref()) {
            skipped.push((file, reason));
        } else if claimant.as_deref() == Some(idle.plugin.as_str()) {
            files.push(file.clone());
        } else {
            // Another plugin's file: this session cannot run it.
            ctx.sessions.put_back(idle);
            return None;
        }
    }
    for (file, reason) in skipped {
        // The receiver lives as long as the job.
        let _ = events.send(JobEvent::NotRun { file: file.clone(), reason: reason.to_owned() });
    }
    if files.is_empty() {
        ctx.sessions.put_back(idle);
        return Some(Ok(0));
    }
    let slots = ctx.slots.take(batch.slots).await;
    debug!(files = files.len(), slots = slots.num_permits(), "running tests in the commit's warm plugin run");
    let (tx, rx) = mpsc::unbounded_channel::<HostEvent>();
    let (ended_tx, ended) = oneshot::channel();
    let attached = idle.join(session::Join { files, events: tx, ended: ended_tx }).ok()?;
    in_session(rx, ended, attached, slots, events).await
}

/// Forwards a batch's events from its session until the batch ends there;
/// `None` if the session ended before it got the batch.
async fn in_session(
    mut rx: mpsc::UnboundedReceiver<HostEvent>,
    ended: oneshot::Receiver<session::Ended>,
    attached: session::Attached,
    slots: tokio::sync::OwnedSemaphorePermit,
    events: &mpsc::UnboundedSender<JobEvent>,
) -> Option<Result<usize, JobError>> {
    // The session drops the sender when the batch ends there.
    let (ended, count) = tokio::join!(ended, forward(&mut rx, events));
    drop(slots);
    let result = match ended {
        Ok(session::Ended::Idle | session::Ended::Finished(Ok(()))) => Ok(count),
        Ok(session::Ended::Finished(Err(e))) => Err(JobError::Plugins(e)),
        Ok(session::Ended::Gone) | Err(_) => return None,
    };
    attached.release();
    Some(result)
}

/// Gets `commit` into the local cache (fetching only what is missing) and checks it out.
async fn fetch(
    ctx: &JobContext,
    conn: &Connection,
    lease: Held,
    commit: CommitId,
    checkout: &Path,
) -> Result<(), JobError> {
    let git = |source| JobError::Git { commit, source };
    let limits = ctx.git_limits;
    let dest = checkout.to_owned();
    let checkout_into = move |store: ObjectStore| {
        if dest.exists() {
            // A leftover from a crashed earlier run of this very attempt.
            let _ = std::fs::remove_dir_all(&dest);
        }
        store.with_limits(limits).checkout(&commit, &dest)
    };
    // One store open per piece of work: look (and, when the commit is
    // cached, check it out), then, after the network, unpack and check out.
    let cached = ctx.fetching.lock().await;
    let check_out = checkout_into.clone();
    let missing = with_store(&ctx.cache, Open::OrInitBare, move |store| {
        if store.has_commit(&commit) {
            check_out(store)?;
            return Ok(None);
        }
        Ok(Some(store.recorded_commits(HAVES)?))
    })
    .await
    .map_err(git)?;
    let Some(haves) = missing else { return Ok(()) };
    let fetch_err = |reason: String| JobError::Fetch { commit, reason };
    let (_send, mut recv, reply) =
        conn.request(&Request::FetchSource { lease, commit, haves }).await.map_err(|e| fetch_err(error_chain(&e)))?;
    if reply != Reply::Source {
        return Err(fetch_err(format!("unexpected reply {reply:?}")));
    }
    let pack = recv.recv_pack(ctx.max_pack_bytes).await.map_err(|e| fetch_err(error_chain(&e)))?;
    debug!(bytes = pack.len(), "source received");
    with_store(&ctx.cache, Open::Existing, move |store| {
        let store = store.with_limits(limits);
        store.unpack(&pack, &commit)?;
        checkout_into(store)
    })
    .await
    .map_err(git)?;
    drop(cached);
    Ok(())
}

/// The run settings of a repository's configuration ([`crate::run_settings`]),
/// checked again because it came over the network; a warning goes to the
/// commit's report.
fn settings(
    config: &RepoConfig,
    max_file_timeout: std::time::Duration,
    events: &mpsc::UnboundedSender<JobEvent>,
) -> Result<RunSettings, JobError> {
    let (settings, warning) = crate::run_settings(config, max_file_timeout)
        .map_err(|problem| JobError::Config { source_file: config.source.clone(), problem })?;
    if let Some(warning) = warning {
        // The receiver lives as long as the job.
        let _ = events.send(JobEvent::Warning(warning));
    }
    Ok(settings)
}
