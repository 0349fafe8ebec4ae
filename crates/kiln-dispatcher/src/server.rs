//! The dispatcher's network side: one task per connection, one per stream,
//! one per running assignment, all owned by a [`TaskTracker`] and stopped by
//! one [`CancellationToken`].
//!
//! Bytes from the network never panic this process: a malformed frame, a
//! request the peer's role does not allow, or a message out of place closes
//! that peer's connection with a close code and a reason, and is logged once;
//! every other peer carries on.
//!
//! Every decision is made by one owner task ([`Owner`]) that holds the
//! [`Core`] (the state machine and its store) and the runners' connections;
//! connection tasks send it [`Msg`]s and wait for the answer. Each event's
//! changes are stored before any of its effects happen (see [`crate::core`]).
//! Results are read from [`Reports`], which follows the stream of changes,
//! so readers never wait on the owner.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_git::ObjectStore;
use kiln_net::{CloseCode, Connection, FramedError, Listener, PeerIdentity, RecvStream, SendStream};
use kiln_proto::wire::{Assignment, Control, Held, JobEvent, NameInUse, Registration, Reply, Request, Supersede};
use kiln_proto::{CommitId, CommitStatus, Escaped, Role, error_chain};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::control::{Action, Actions, authorize};
use crate::core::{Answer, Core, Effects, Event};
use crate::db::{Db, DbError};
use crate::history;
use crate::results::ResultsDir;
use crate::state::{ConnId, Dispatch, SourceRefusal, State};
use crate::store::{Store, StoreError};
use crate::stream::{Feed, Reports, Snapshot, Update};
use crate::view::{ConnInfo, LiveRequest, ReadApi};

/// How long a peer may take to send the first frame of a stream it opened.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a runner may take to acknowledge a cancellation.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
/// How many commits the dispatcher offers as "haves" when asking for a pack.
const HAVES: usize = 32;
/// At most this many events are stored in one transaction (group commit).
const MAX_GROUP: usize = 256;
/// How many of one assignment stream's events may wait for the owner at
/// once: the stream reads on while earlier events are being stored, so a
/// single runner's results share transactions (and syncs) too.
const MAX_IN_FLIGHT: usize = 64;

/// The dispatcher's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the database, mirror and results live.
    pub state_dir: PathBuf,
    /// The largest git pack accepted from an observer.
    pub max_pack_bytes: u64,
    /// Caps on the uncompressed objects of a pack, applied before it is indexed.
    pub git_limits: kiln_git::Limits,
    /// How long one commit's tests may run before they are stopped.
    pub job_timeout: Duration,
    /// After a restart, how long runners have to reconnect and claim the
    /// work they were doing before it is handed to others.
    pub resume_grace: Duration,
    /// Repository → observer name, set by the operator (`--repo-owner`):
    /// these win over the binding the first submission makes.
    pub repo_owners: Vec<(String, String)>,
    /// How many more times a test file with a failing test runs, on another
    /// runner when one is free, before its failure counts (`--retry-failed`).
    pub retry_failed: u32,
}

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The results directory is unusable.
    #[error("open the results directory")]
    Results(#[from] crate::results::ResultsError),
    /// The git mirror is unusable.
    #[error("open the git mirror")]
    Mirror(#[from] kiln_git::GitError),
    /// The state database is unusable.
    #[error("open the state database")]
    Db(#[from] DbError),
    /// The state database cannot be read.
    #[error("read the state database")]
    Load(#[from] StoreError),
    /// The state directory cannot be made private.
    #[error("make the state directory private")]
    Private(#[from] crate::private::PrivateError),
}

/// Why a stream's exchange ended badly.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    /// The peer broke the protocol: close its connection.
    #[error("{0}")]
    Protocol(String),
    /// The peer asked for something its role does not allow: close its connection.
    #[error("{0}")]
    Unauthorized(String),
    /// The stream or connection failed, or a local problem: log it.
    #[error("{0}")]
    Failed(String),
}

impl From<FramedError> for StreamError {
    fn from(e: FramedError) -> Self {
        let text = error_chain(&e);
        if e.is_protocol_violation() { StreamError::Protocol(text) } else { StreamError::Failed(text) }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A registered runner's connection.
struct RunnerConn {
    conn: Connection,
    /// When it registered (Unix ms), to tell a second runner with the same name.
    since_ms: u64,
    /// When it last sent an event (Unix ms), for the dashboard.
    last_heard_ms: u64,
}

/// Why the owner could not do what a message asked.
type Refusal = String;

/// What connection tasks ask of the owner task.
enum Msg {
    /// Take an event; answer with what it decided, or why it could not be stored.
    Event(Event, Option<oneshot::Sender<Result<Answer, Refusal>>>),
    /// Read the state (the closure sends its own answer).
    Read(Box<dyn FnOnce(&State) + Send>),
    /// A runner registers on `conn`: checked against the live connections first.
    Register {
        conn: Connection,
        name: String,
        registration: Registration,
        reply: oneshot::Sender<Result<Answer, Result<NameInUse, Refusal>>>,
    },
    /// A resumed job is running on this stream: cancel it through `token`.
    Track { job: u64, attempt: u32, token: CancellationToken },
    /// An assignment stream ended.
    Ended { job: u64, attempt: u32 },
    /// A subscriber fell behind and needs everything stored.
    Snapshot(oneshot::Sender<Result<Snapshot, String>>),
    /// A reader asks for the runners and the queue now.
    Live(LiveRequest),
    /// Every connection task is gone: stop.
    Stop,
}

/// The running dispatcher: what connection tasks share.
pub struct Dispatcher {
    /// The owner task's mailbox.
    core: mpsc::Sender<Msg>,
    /// Every commit's report, kept by following the stream of changes.
    reports: Arc<RwLock<Reports>>,
    /// The last update the owner published, and the last one `reports` holds:
    /// a request waits until the second reaches the first, so an admin who
    /// was answered "cancelled" reads "cancelled".
    published: watch::Receiver<u64>,
    seen: watch::Receiver<u64>,
    /// The bare git mirror's path; opened per operation on a blocking thread.
    mirror: PathBuf,
    config: Config,
    /// The listener's idle timeout, told to runners at registration.
    idle_timeout: Duration,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// The owner task's state: the only place decisions are made.
struct Owner {
    core: Core<Db>,
    /// Registered runner connections by id, to open assignment streams on.
    runners: HashMap<ConnId, RunnerConn>,
    /// Running assignments by job id: cancelling the token tells the runner to stop.
    running: HashMap<u64, (u32, CancellationToken)>,
    /// Where stored changes are published.
    updates: broadcast::Sender<Arc<Update>>,
    published: watch::Sender<u64>,
    /// For the tasks the owner starts (assignments) and messages to itself.
    dispatcher: Option<Arc<Dispatcher>>,
    mailbox: mpsc::Sender<Msg>,
}

/// Runs blocking store work without stalling the other async tasks.
fn off_async<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        // A single-threaded runtime (tests) has no other thread to hand its tasks to.
        _ => f(),
    }
}

impl Owner {
    /// Takes one event and acts on its effects, once they are stored.
    fn event(&mut self, event: Event) -> Result<Answer, Refusal> {
        let mut answers = self.events(vec![event]);
        answers.pop().unwrap_or_else(|| Err("the dispatcher lost an event".to_owned()))
    }

    /// Takes events in order, stores their changes in one transaction, and
    /// acts on their effects once stored: one answer per event. If storing
    /// fails, every event of the group is refused and nothing changed.
    fn events(&mut self, events: Vec<Event>) -> Vec<Result<Answer, Refusal>> {
        let what: Vec<String> = events.iter().map(Event::describe).collect();
        for event in &events {
            if let Some(r) = job_conn(event).and_then(|c| self.runners.get_mut(&c)) {
                r.last_heard_ms = now_ms();
            }
        }
        let retry: Vec<Event> =
            events.iter().filter(|e| matches!(e, Event::RunnerGone { .. } | Event::ExpireOrphans)).cloned().collect();
        let now = now_ms();
        match off_async(|| self.core.handle_all(events, now)) {
            Ok(effects) => effects.into_iter().map(|e| Ok(self.act(e))).collect(),
            Err(e) => {
                let cause = error_chain(&e);
                for what in &what {
                    error!("cannot store {what}: {}; nothing was changed and nobody was told", Escaped(&cause));
                }
                // A lost runner is a fact, not a request: keep trying until it is on disk.
                for event in retry {
                    let mailbox = self.mailbox.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let _ = mailbox.send(Msg::Event(event, None)).await;
                    });
                }
                what.iter().map(|what| Err(format!("the dispatcher cannot store {what}: {cause}"))).collect()
            }
        }
    }

    /// Publishes the stored changes, stops what was stopped, sends assignments.
    fn act(&mut self, effects: Effects) -> Answer {
        let Effects { answer, dispatches, stopped, update } = effects;
        if let Some(update) = update {
            let seq = update.seq;
            // No subscriber is no error: nobody is listening yet.
            let _ = self.updates.send(update);
            self.published.send_replace(seq);
        }
        for (job, conn) in stopped.iter().flat_map(|s| &s.batches) {
            if conn.is_some()
                && let Some((_, token)) = self.running.get(job)
            {
                token.cancel();
            }
        }
        for d in dispatches {
            let Some(conn) = self.runners.get(&d.conn).map(|r| r.conn.clone()) else {
                // Its connection is gone: so is the runner, and its work goes back.
                let _ = self.event(Event::RunnerGone { name: d.runner.clone(), conn: d.conn });
                continue;
            };
            let Some(dispatcher) = self.dispatcher.clone() else { continue };
            let token = CancellationToken::new();
            self.running.insert(d.assignment.job, (d.assignment.attempt, token.clone()));
            let a = &d.assignment;
            // A root span: the event that freed a slot or queued work came from
            // another connection (often an observer's), and the job's lines are
            // not that connection's. The runner is named in the span instead.
            let span = info_span!(parent: None, "job", job = a.job, attempt = a.attempt, runner = %Escaped(&d.runner));
            let tasks = dispatcher.tasks.clone();
            tasks.spawn(async move { dispatcher.drive(conn, d, token).await }.instrument(span));
        }
        answer
    }

    fn register(
        &mut self,
        conn: Connection,
        name: String,
        Registration { slots, held, sandbox_gaps, pythons }: Registration,
    ) -> Result<Answer, Result<NameInUse, Refusal>> {
        let id = conn.stable_id();
        let state = self.core.state();
        // Two live connections with one name are two runners sharing a
        // certificate: the registered one keeps the name. A dead one is
        // replaced (its runner reconnecting); a silent one is declared
        // dead within the idle timeout, and the newcomer gets in then,
        // unless it names a lease the old connection holds: only the
        // runner that was given it knows it, so it is that runner back.
        let holder = state
            .runner_conn(&name)
            .filter(|&c| c != id)
            .filter(|&c| !held.iter().any(|h| state.holds(h.job, h.attempt, c)))
            .and_then(|c| self.runners.get(&c))
            .filter(|h| h.conn.close_reason().is_none());
        if let Some(h) = holder {
            return Err(Ok(NameInUse {
                name,
                since_unix_ms: h.since_ms,
                address: h.conn.remote_address().to_string(),
            }));
        }
        let now = now_ms();
        let previous = self.runners.insert(id, RunnerConn { conn, since_ms: now, last_heard_ms: now });
        let held = held[..held.len().min(1024)].to_vec();
        let gaps: Vec<String> = sandbox_gaps.iter().take(32).map(|g| g.chars().take(512).collect()).collect();
        // Versions as a runner reports them (`3.12.7`): anything else is not one, and is left out.
        let pythons: Vec<String> = pythons
            .into_iter()
            .filter(|v| v.len() <= 16 && !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
            .take(32)
            .collect();
        let event = Event::Register { name, conn: id, slots: slots.clamp(1, 256), held, gaps, pythons };
        match self.event(event) {
            Ok(answer) => {
                if let Answer::Registered { replaced: Some(old), .. } = &answer
                    && let Some(old) = self.runners.remove(old)
                {
                    old.conn.close(CloseCode::Replaced, "a newer connection registered with this name");
                }
                Ok(answer)
            }
            Err(refusal) => {
                match previous {
                    Some(p) => self.runners.insert(id, p),
                    None => self.runners.remove(&id),
                };
                Err(Err(refusal))
            }
        }
    }

    async fn run(mut self, mut mailbox: mpsc::Receiver<Msg>) {
        // A message taken from the mailbox while gathering events, kept for
        // its turn so that everything happens in the order it arrived.
        let mut next: Option<Msg> = None;
        loop {
            let msg = match next.take() {
                Some(msg) => msg,
                None => match mailbox.recv().await {
                    Some(msg) => msg,
                    None => break,
                },
            };
            match msg {
                Msg::Event(event, reply) => {
                    // Group commit: the events that queued up meanwhile share
                    // one transaction (one sync to disk).
                    let mut group = vec![(event, reply)];
                    while group.len() < MAX_GROUP {
                        match mailbox.try_recv() {
                            Ok(Msg::Event(event, reply)) => group.push((event, reply)),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let (events, replies): (Vec<Event>, Vec<_>) = group.into_iter().unzip();
                    for (answer, reply) in self.events(events).into_iter().zip(replies) {
                        if let Some(reply) = reply {
                            let _ = reply.send(answer);
                        }
                    }
                }
                Msg::Read(read) => read(self.core.state()),
                Msg::Register { conn, name, registration, reply } => {
                    let _ = reply.send(self.register(conn, name, registration));
                }
                Msg::Track { job, attempt, token } => {
                    self.running.insert(job, (attempt, token));
                }
                Msg::Ended { job, attempt } => {
                    if self.running.get(&job).is_some_and(|(a, _)| *a == attempt) {
                        self.running.remove(&job);
                    }
                }
                Msg::Snapshot(reply) => {
                    let snapshot = off_async(|| self.core.snapshot()).map_err(|e| error_chain(&e));
                    let _ = reply.send(snapshot);
                }
                Msg::Live(reply) => {
                    let conns = self
                        .runners
                        .iter()
                        .map(|(&id, r)| {
                            let address = r.conn.remote_address().to_string();
                            (id, ConnInfo { address, since_ms: r.since_ms, last_heard_ms: r.last_heard_ms })
                        })
                        .collect();
                    let _ = reply.send(crate::view::live(self.core.state(), &conns, now_ms()));
                }
                Msg::Stop => break,
            }
        }
    }
}

impl Dispatcher {
    /// Opens the state directory and serves `listener` until `shutdown` is
    /// cancelled; then closes every connection and waits for its tasks.
    pub async fn run(listener: Listener, config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
        Dispatcher::run_with_reader(listener, config, shutdown, |_, _| {}).await
    }

    /// Like [`Dispatcher::run`], handing `reader` the read API and the
    /// actions it may take for its callers (for the dashboard) once the state
    /// is loaded and before any connection is served.
    pub async fn run_with_reader(
        listener: Listener,
        config: Config,
        shutdown: CancellationToken,
        reader: impl FnOnce(ReadApi, Actions),
    ) -> Result<(), StartError> {
        // Results, database and mirror are nobody else's business.
        crate::private::dir(&config.state_dir)?;
        let results = ResultsDir::open(&config.state_dir.join("results"))?;
        let mirror = config.state_dir.join("mirror.git");
        ObjectStore::open_or_init_bare(&mirror)?;
        let mut db = Db::open(&config.state_dir.join("kiln.db"))?;
        let mut state = State::default();
        state.set_retry_failed(config.retry_failed);
        state.restore_owners(Store::load_owners(&mut db)?);
        state.pin_owners(config.repo_owners.iter().cloned());
        let mut entries = Store::load(&mut db)?;
        relist(&mirror, &mut db, &mut entries);
        let (restored, unfinished) = (entries.len(), entries.iter().filter(|e| !e.status.is_final()).count());
        let reports = Arc::new(RwLock::new(Reports::of(&entries)));
        let running: Vec<_> = entries.iter().filter(|e| !e.status.is_final()).cloned().collect();
        state.restore(entries);
        if restored > 0 {
            info!(commits = restored, unfinished, "resumed from the state database");
        }

        let (updates, _) = broadcast::channel(crate::stream::CAPACITY);
        let (published_tx, published) = watch::channel(0);
        let (seen_tx, seen) = watch::channel(0);
        let (mailbox_tx, mailbox) = mpsc::channel(1024);
        let (snapshots, mut snapshot_rx) = mpsc::channel(16);
        let tasks = TaskTracker::new();
        let dispatcher = Arc::new(Dispatcher {
            core: mailbox_tx.clone(),
            reports: Arc::clone(&reports),
            published,
            seen,
            mirror,
            config,
            idle_timeout: listener.idle_timeout(),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
        });

        // Subscribers start before the first update, from what was loaded.
        let files = Feed::new("results files", updates.subscribe(), snapshots.clone(), 0);
        let writer = tokio::spawn(crate::results::follow(results, files, running));
        let snapshots_for_readers = snapshots.clone();
        let mut feed = Feed::new("results reader", updates.subscribe(), snapshots, 0);
        let follower = tokio::spawn(async move {
            use crate::stream::Next;
            loop {
                let seq = match feed.next().await {
                    Next::Update(update) => {
                        reports.write().unwrap_or_else(|e| e.into_inner()).apply(&update);
                        update.seq
                    }
                    Next::Resync(snapshot) => {
                        *reports.write().unwrap_or_else(|e| e.into_inner()) = Reports::of(&snapshot.entries);
                        snapshot.seq
                    }
                    Next::Closed => break,
                };
                seen_tx.send_replace(seq);
            }
        });
        // Snapshot requests go through the mailbox, in order with the events.
        let to_owner = mailbox_tx.clone();
        let relay = tokio::spawn(async move {
            while let Some(reply) = snapshot_rx.recv().await {
                if to_owner.send(Msg::Snapshot(reply)).await.is_err() {
                    break;
                }
            }
        });
        // Live requests, like snapshots, wait their turn in the mailbox; the
        // reader's side of this channel is small and never waited on.
        let (live_tx, mut live_rx) = mpsc::channel(8);
        let to_owner = mailbox_tx.clone();
        let live_relay = tokio::spawn(async move {
            while let Some(reply) = live_rx.recv().await {
                if to_owner.send(Msg::Live(reply)).await.is_err() {
                    break;
                }
            }
        });
        let core = Core::new(state, db);
        reader(ReadApi::new(&updates, snapshots_for_readers, live_tx, core.metrics()), Actions::new(&dispatcher));
        let owner = Owner {
            core,
            runners: HashMap::new(),
            running: HashMap::new(),
            updates,
            published: published_tx,
            dispatcher: Some(Arc::clone(&dispatcher)),
            mailbox: mailbox_tx.clone(),
        };
        let owner = tokio::spawn(owner.run(mailbox));

        if unfinished > 0 {
            // Runners that kept working through the restart have this long to claim their jobs.
            let d = Arc::clone(&dispatcher);
            let grace = d.config.resume_grace;
            tasks.spawn(async move {
                tokio::select! {
                    () = d.shutdown.cancelled() => {}
                    () = tokio::time::sleep(grace) => {
                        if let Ok(Answer::Requeued(commits)) = d.ask(Event::ExpireOrphans).await {
                            for commit in commits {
                                info!(%commit, "no runner claimed this running work after the restart; requeued");
                            }
                        }
                    }
                }
            });
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                incoming = listener.accept() => {
                    let Some(incoming) = incoming else { break };
                    let d = Arc::clone(&dispatcher);
                    tasks.spawn(async move { d.serve_connection(incoming).await });
                }
            }
        }
        info!("shutting down");
        listener.shutdown().await;
        tasks.close();
        tasks.wait().await;
        // Every connection task is gone: the owner stops, which ends the
        // stream, and the writer writes what is left and stops.
        let _ = mailbox_tx.send(Msg::Stop).await;
        drop(dispatcher);
        let _ = owner.await;
        relay.abort();
        live_relay.abort();
        let _ = follower.await;
        let _ = writer.await;
        Ok(())
    }

    /// Cancels `commit` for `peer` (an admin): whether anything was stopped.
    /// `kiln cancel` and the dashboard ([`Actions`]) both come here.
    pub(crate) async fn cancel(&self, commit: CommitId, peer: &PeerIdentity) -> Result<bool, Refusal> {
        let event = Event::Stop { commit, status: CommitStatus::Cancelled, reason: format!("cancelled by {peer}") };
        let stopped = self.ask(event).await? == Answer::Stopped(true);
        if stopped {
            info!(%commit, by = %Escaped(&peer.to_string()), "cancelled");
        }
        Ok(stopped)
    }

    /// The last update the owner published.
    pub(crate) fn published_seq(&self) -> u64 {
        *self.published.borrow()
    }

    /// Sends an event to the owner and waits for its answer.
    async fn ask(&self, event: Event) -> Result<Answer, Refusal> {
        let (tx, rx) = oneshot::channel();
        self.core.send(Msg::Event(event, Some(tx))).await.map_err(|_| "the dispatcher is stopping".to_owned())?;
        rx.await.map_err(|_| "the dispatcher is stopping".to_owned())?
    }

    /// Waits (briefly) until the reports hold everything published so far,
    /// so that a reader sees what has been stored, including its own last change.
    async fn caught_up(&self) {
        let target = *self.published.borrow();
        let mut seen = self.seen.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), seen.wait_for(|s| *s >= target)).await;
    }

    /// Reads the state in the owner task.
    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&State) -> T + Send + 'static) -> Result<T, StreamError> {
        let (tx, rx) = oneshot::channel();
        let read = Box::new(move |s: &State| {
            let _ = tx.send(f(s));
        });
        let stopping = || StreamError::Failed("the dispatcher is stopping".into());
        self.core.send(Msg::Read(read)).await.map_err(|_| stopping())?;
        rx.await.map_err(|_| stopping())
    }

    /// Tells the owner without waiting (it is gone only at shutdown).
    fn tell(&self, msg: Msg) {
        let core = self.core.clone();
        self.tasks.spawn(async move {
            let _ = core.send(msg).await;
        });
    }

    async fn serve_connection(self: Arc<Self>, incoming: kiln_net::Incoming) {
        let remote = incoming.remote_address();
        let conn = match Listener::handshake(incoming).await {
            Ok(conn) => conn,
            Err(failed) => {
                // kiln-net rate-limits these: at most one line per address per
                // minute, counting the others, so a flood cannot drown the log.
                if let Some(line) = failed.log_line() {
                    warn!(%remote, "handshake failed: {line}");
                }
                return;
            }
        };
        let Some(peer) = conn.identity().cloned() else { return };
        let span = info_span!("peer", peer = %Escaped(&peer.to_string()), %remote);
        async move {
            info!("connected");
            let id = conn.stable_id();
            loop {
                tokio::select! {
                    () = self.shutdown.cancelled() => break,
                    stream = conn.accept() => match stream {
                        Ok((send, recv)) => {
                            let d = Arc::clone(&self);
                            let (conn, peer) = (conn.clone(), peer.clone());
                            self.tasks.spawn(
                                async move { d.serve_stream(conn, peer, send, recv).await }.in_current_span(),
                            );
                        }
                        Err(_) => break,
                    }
                }
            }
            let reason = conn.close_reason().unwrap_or_else(|| "shutdown".to_owned());
            info!("disconnected: {}", Escaped(&reason));
            if peer.role == Role::Runner {
                self.runner_gone(&peer.name, id).await;
            }
        }
        .instrument(span)
        .await
    }

    async fn runner_gone(&self, name: &str, id: ConnId) {
        // A failure is logged (and retried) by the owner.
        if let Ok(Answer::Requeued(commits)) = self.ask(Event::RunnerGone { name: name.to_owned(), conn: id }).await {
            for commit in commits {
                info!(%commit, "requeued the work of a disconnected runner");
            }
        }
    }

    async fn serve_stream(self: Arc<Self>, conn: Connection, peer: PeerIdentity, send: SendStream, recv: RecvStream) {
        match self.handle_request(&conn, &peer, send, recv).await {
            Ok(()) => {}
            Err(StreamError::Protocol(reason)) => {
                warn!("protocol violation, closing connection: {}", Escaped(&reason));
                conn.close(CloseCode::Protocol, &reason);
            }
            Err(StreamError::Unauthorized(reason)) => {
                warn!("unauthorized request, closing connection: {}", Escaped(&reason));
                conn.close(CloseCode::Unauthorized, &reason);
            }
            Err(StreamError::Failed(reason)) => debug!("stream ended: {}", Escaped(&reason)),
        }
    }

    async fn handle_request(
        self: &Arc<Self>,
        conn: &Connection,
        peer: &PeerIdentity,
        send: SendStream,
        mut recv: RecvStream,
    ) -> Result<(), StreamError> {
        let request: Request = tokio::time::timeout(REQUEST_TIMEOUT, recv.expect())
            .await
            .map_err(|_| StreamError::Protocol("no request within 30 s of opening a stream".into()))??;
        if let Err(refusal) = authorize(peer, Action::of(&request)) {
            return refuse(send, refusal).await;
        }
        match request {
            Request::Register(registration) => self.register(conn, peer, send, recv, registration).await,
            Request::Resume(held) => self.resume(conn, peer, send, recv, held).await,
            Request::Submit { repo, branch, commit, supersede } => {
                self.submit(peer, send, recv, Submission { repo, branch, commit, supersede }).await
            }
            Request::BranchTip { repo, branch } => {
                let name = peer.name.clone();
                let tip =
                    self.read(move |s| s.may_read_repo(&repo, &name).map(|()| s.branch_tip(&repo, &branch))).await?;
                match tip {
                    Ok(tip) => reply(send, Reply::Tip(tip)).await,
                    Err(refused) => refuse(send, refused.to_string()).await,
                }
            }
            Request::FetchSource { lease, commit, haves } => {
                self.fetch_source(conn, peer, send, lease, commit, haves).await
            }
            Request::GetResults { commit } => {
                self.caught_up().await;
                let report = self.reports.read().unwrap_or_else(|e| e.into_inner()).report(commit);
                reply(send, Reply::Report(report.map(Box::new))).await
            }
            Request::Cancel { commit } => match self.cancel(commit, peer).await {
                Ok(stopped) => reply(send, Reply::Cancelled(stopped)).await,
                Err(refusal) => reply(send, Reply::Refused(refusal)).await,
            },
            Request::Resolve { prefix } => {
                let found = self.read(move |s| s.commits_with_prefix(&prefix, kiln_proto::wire::MAX_RESOLVED)).await?;
                reply(send, Reply::Resolved(found)).await
            }
            // History and flakiness read the reports, which follow the stream of
            // changes, as the dashboard reads its board: going over every commit
            // never holds up the owner task.
            Request::History { test, repo, limit } => {
                let limit = (limit as usize).min(kiln_proto::wire::MAX_HISTORY);
                self.caught_up().await;
                let runs = {
                    let reports = self.reports.read().unwrap_or_else(|e| e.into_inner());
                    history::history(reports.newest_first(), repo.as_deref(), &test, limit)
                };
                reply(send, Reply::History(runs)).await
            }
            Request::Flaky { days } => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                let window = u64::from(days).saturating_mul(24 * 60 * 60 * 1000);
                self.caught_up().await;
                let mut flaky = {
                    let reports = self.reports.read().unwrap_or_else(|e| e.into_inner());
                    history::flaky_tests(reports.newest_first(), now, window)
                };
                flaky.truncate(kiln_proto::wire::MAX_FLAKY);
                reply(send, Reply::Flaky(flaky)).await
            }
            Request::Status { commits } => {
                // The live view the dashboard reads, asked of the owner in turn
                // with events; the commits from the reports, which never wait on it.
                let (tx, rx) = oneshot::channel();
                let stopping = || StreamError::Failed("the dispatcher is stopping".into());
                self.core.send(Msg::Live(tx)).await.map_err(|_| stopping())?;
                let live = rx.await.map_err(|_| stopping())?;
                let n = (commits as usize).min(kiln_proto::status::MAX_STATUS_COMMITS);
                let newest = self.reports.read().unwrap_or_else(|e| e.into_inner()).newest(n);
                let mut status = live.status(newest);
                // Room for the reply's own framing.
                status.fit(kiln_proto::MAX_FRAME_LEN - 1024);
                reply(send, Reply::Status(Box::new(status))).await
            }
        }
    }

    async fn register(
        self: &Arc<Self>,
        conn: &Connection,
        peer: &PeerIdentity,
        mut send: SendStream,
        mut recv: RecvStream,
        registration: Registration,
    ) -> Result<(), StreamError> {
        let (slots, held) = (registration.slots.clamp(1, 256), registration.held.len());
        let (tx, rx) = oneshot::channel();
        let msg = Msg::Register { conn: conn.clone(), name: peer.name.clone(), registration, reply: tx };
        let stopping = || StreamError::Failed("the dispatcher is stopping".into());
        self.core.send(msg).await.map_err(|_| stopping())?;
        let adopted = match rx.await.map_err(|_| stopping())? {
            Ok(Answer::Registered { adopted, .. }) => adopted,
            Ok(other) => return Err(StreamError::Failed(format!("unexpected answer {other:?}"))),
            Err(Ok(clash)) => return refuse_name(conn, send, clash).await,
            Err(Err(refusal)) => {
                reply(send, Reply::Refused(refusal.clone())).await?;
                return Err(StreamError::Failed(refusal));
            }
        };
        for job in &adopted {
            info!(job, "the runner still holds this job; it may resume");
        }
        if held > adopted.len() {
            info!(held, adopted = adopted.len(), "refusing assignments the runner no longer holds");
        }
        info!(slots, "runner registered");
        let idle_timeout_ms = u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        send.send(&Reply::Registered { idle_timeout_ms }).await?;
        // The control stream carries nothing else yet: anything more is a violation.
        match recv.recv::<Request>().await {
            Ok(None) => Ok(()),
            Ok(Some(other)) => {
                Err(StreamError::Protocol(format!("unexpected message on the control stream: {other:?}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn submit(
        self: &Arc<Self>,
        peer: &PeerIdentity,
        mut send: SendStream,
        mut recv: RecvStream,
        Submission { repo, branch, commit, supersede }: Submission,
    ) -> Result<(), StreamError> {
        if repo.len() > 4096 || branch.len() > 1024 {
            return Err(StreamError::Protocol("repository or branch name too long".into()));
        }
        // The repository is the first submitter's (or the operator's choice):
        // nobody else may add to it, or supersede its commits.
        match self.ask(Event::Claim { repo: repo.clone(), observer: peer.name.clone() }).await {
            Ok(Answer::Claimed(Ok(true))) => info!(repo = %Escaped(&repo), "repository bound to this observer"),
            Ok(Answer::Claimed(Err(refused))) => return refuse(send, refused.to_string()).await,
            Ok(_) => {}
            Err(refusal) => {
                reply(send, Reply::Refused(refusal.clone())).await?;
                return Err(StreamError::Failed(refusal));
            }
        }
        if self.read(move |s| s.knows(&commit)).await? {
            return reply(send, Reply::Known).await;
        }
        let missing = in_mirror(&self.mirror, move |store| {
            Ok(if store.has_commit(&commit) { None } else { Some(store.recorded_commits(HAVES)?) })
        })
        .await?;
        if let Some(haves) = missing {
            send.send(&Reply::SendPack { haves }).await?;
            let pack = recv.recv_pack(self.config.max_pack_bytes).await?;
            let bytes = pack.len();
            let limits = self.config.git_limits;
            let unpacked = kiln_git::with_store(&self.mirror, kiln_git::Open::Existing, move |store| {
                store.with_limits(limits).unpack(&pack, &commit)
            })
            .await;
            match unpacked {
                Ok(()) => {}
                // Over a cap: a refusal the observer can report (naming the
                // object and the cap, not the mirror's path), and the commit is
                // not queued. Any other unusable pack is a protocol violation.
                Err(ref e) if let kiln_git::GitErrorKind::TooLarge { detail, .. } = e.kind() => {
                    let reason = format!("the dispatcher refused commit {commit}: {detail}");
                    warn!(%commit, "pack refused: {detail}");
                    reply(send, Reply::Refused(reason.clone())).await?;
                    return Err(StreamError::Failed(reason));
                }
                // This machine's fault (a full disk, say): refuse for now,
                // and the observer submits again later.
                Err(ref e) if e.is_storage_failure() => {
                    let reason = format!(
                        "the dispatcher cannot store commit {commit} now: {}; it will take it once it can",
                        error_chain(e)
                    );
                    error!(%commit, "cannot store a pack in the mirror: {}", Escaped(&error_chain(e)));
                    reply(send, Reply::Unavailable(reason.clone())).await?;
                    return Err(StreamError::Failed(reason));
                }
                Err(e) => return Err(StreamError::Protocol(format!("the pack for {commit} is unusable: {e}"))),
            }
            debug!(%commit, bytes, "pack stored in the mirror");
        }
        // A newer commit stops older ones only if it descends from them: a
        // rewritten or unrelated history never cancels work.
        let (r, b) = (repo.clone(), branch.clone());
        let candidates = self.read(move |s| s.supersede_candidates(&r, &b, supersede)).await?;
        // One store for the whole operation: the commit's test files (what
        // it is split into) and which older commits it descends from.
        let older = candidates.clone();
        type Listing =
            (kiln_git::TreeTests, HashSet<CommitId>, Option<String>, Option<kiln_proto::TreeId>, Vec<String>);
        let (listed, descends, config_error, tree, versions): Listing = in_mirror(&self.mirror, move |store| {
            let listed = store.test_files(&commit)?;
            // What tells a re-run, a revert or an empty commit: the same code.
            let tree = store.tree_of(&commit)?;
            // Validated once, here: a problem is the commit's error, and no runner sees it.
            let config = store.repo_config(&commit)?;
            let config_error = config.as_ref().err().map(ToString::to_string);
            // The matrix: the commit is split into each file under each version.
            let versions = config.ok().flatten().map(|c| c.versions).unwrap_or_default();
            let descends = older
                .into_iter()
                .filter(|old| match store.is_ancestor(old, &commit) {
                    Ok(yes) => yes,
                    Err(e) => {
                        warn!(%old, "cannot tell whether {commit} descends from it: {}", Escaped(&error_chain(&e)));
                        false
                    }
                })
                .collect();
            Ok((listed, descends, config_error, tree, versions))
        })
        .await?;
        if let Some(problem) = &config_error {
            info!(%commit, "unusable repository configuration: {}", Escaped(problem));
        }
        debug!(%commit, files = listed.files.len(), "listed the test files");
        let event = Event::Submit {
            repo: repo.clone(),
            branch: branch.clone(),
            commit,
            supersede,
            descends: descends.clone(),
            listing_warning: listed.warning(),
            files: listed.files,
            config_error,
            tree,
            versions,
        };
        match self.ask(event).await {
            Ok(Answer::Submitted(Some(stopped))) => {
                info!(%commit, repo = %Escaped(&repo), branch = %Escaped(&branch), "commit queued");
                for s in stopped {
                    info!(commit = %s.commit, by = %commit, "superseded");
                }
                for old in candidates.iter().filter(|c| !descends.contains(c)) {
                    info!(commit = %old, by = %commit, "not superseded: the new commit does not descend from it");
                }
            }
            Ok(_) => {}
            // Not stored, so not queued: the observer offers it again.
            Err(refusal) => {
                reply(send, Reply::Unavailable(refusal.clone())).await?;
                return Err(StreamError::Failed(refusal));
            }
        }
        send.send(&Reply::Queued).await?;
        send.finish();
        Ok(())
    }

    /// Sends a commit's source to the runner holding a lease on it, and to
    /// nobody else.
    async fn fetch_source(
        self: &Arc<Self>,
        conn: &Connection,
        peer: &PeerIdentity,
        mut send: SendStream,
        lease: Held,
        commit: CommitId,
        haves: Vec<CommitId>,
    ) -> Result<(), StreamError> {
        let (id, name) = (conn.stable_id(), peer.name.clone());
        let access = self.read(move |s| s.source_access(lease, &commit, id, &name)).await?;
        match access {
            Ok(()) => {}
            // The lease ended while the runner was about to fetch: a race, not an attack.
            Err(ended @ SourceRefusal::Ended { .. }) => {
                let reason = ended.to_string();
                info!(job = lease.job, attempt = lease.attempt, %commit, "refused the source of a job that has ended");
                reply(send, Reply::Refused(reason.clone())).await?;
                return Err(StreamError::Failed(reason));
            }
            Err(refused) => {
                return refuse(send, format!("{peer} may not fetch the source of {commit}: {refused}")).await;
            }
        }
        let haves: Vec<CommitId> = haves.into_iter().take(256).collect();
        let limits = self.config.git_limits;
        let pack = in_mirror(&self.mirror, move |store| store.with_limits(limits).pack(&commit, &haves)).await?;
        debug!(%commit, bytes = pack.len(), "sending source");
        send.send(&Reply::Source).await?;
        send.send_pack(&pack).await?;
        send.finish();
        let _ = send.stopped().await;
        Ok(())
    }

    /// Runs one assignment: sends it, records the events that come back.
    async fn drive(self: Arc<Self>, conn: Connection, d: Dispatch, cancel: CancellationToken) {
        let a = &d.assignment;
        info!(commit = %a.commit, files = a.files.len(), slots = a.slots, python = a.python.as_deref(), "assigned");
        let outcome = async {
            // Read again from the mirror rather than kept per commit: a blob
            // read, and nothing more to store or to restore after a restart.
            let commit = a.commit;
            let config = in_mirror(&self.mirror, move |store| store.repo_config(&commit)).await?;
            let assignment = Assignment { config: config.ok().flatten(), ..d.assignment.clone() };
            let (mut send, recv) = conn.open().await.map_err(|e| StreamError::Failed(e.to_string()))?;
            send.send(&assignment).await?;
            self.events(send, recv, &d, &cancel).await
        }
        .await;
        self.assignment_ended(&conn, &d, outcome).await;
    }

    /// A runner that kept working through a lost connection carries on
    /// reporting, if its lease is still current.
    async fn resume(
        self: &Arc<Self>,
        conn: &Connection,
        peer: &PeerIdentity,
        mut send: SendStream,
        recv: RecvStream,
        held: Held,
    ) -> Result<(), StreamError> {
        let id = conn.stable_id();
        let commit =
            self.read(move |s| s.holds(held.job, held.attempt, id).then(|| s.commit_of(held.job)).flatten()).await?;
        let Some(commit) = commit else {
            let reason = format!("job {} attempt {} is no longer yours", held.job, held.attempt);
            warn!("rejected a late runner's work: {}", Escaped(&reason));
            return reply(send, Reply::Refused(reason)).await;
        };
        let d = Dispatch {
            runner: peer.name.clone(),
            conn: id,
            // Only the fencing token matters on a resumed stream.
            assignment: Assignment {
                job: held.job,
                attempt: held.attempt,
                commit,
                files: Vec::new(),
                slots: 0,
                config: None,
                python: None,
            },
        };
        let cancel = CancellationToken::new();
        self.tell(Msg::Track { job: held.job, attempt: held.attempt, token: cancel.clone() });
        // Under the runner's connection, which is the one carrying the job now.
        let span = info_span!("job", job = held.job, attempt = held.attempt);
        async {
            info!(%commit, "resumed");
            send.send(&Reply::Resumed).await?;
            let outcome = self.events(send, recv, &d, &cancel).await;
            self.assignment_ended(conn, &d, outcome).await;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Cleans up after an assignment stream: requeues the job if it did not
    /// end properly (which hands out work).
    async fn assignment_ended(&self, conn: &Connection, d: &Dispatch, outcome: Result<(), StreamError>) {
        let a = &d.assignment;
        self.tell(Msg::Ended { job: a.job, attempt: a.attempt });
        if let Err(e) = outcome {
            if let StreamError::Protocol(reason) = &e {
                warn!("protocol violation, closing connection: {}", Escaped(reason));
                conn.close(CloseCode::Protocol, reason);
            }
            let event = Event::Abandon { job: a.job, attempt: a.attempt, conn: d.conn };
            if let Ok(Answer::Abandoned(Some(_))) = self.ask(event).await {
                info!("job requeued: {}", Escaped(&e.to_string()));
            }
        }
    }

    /// Records the events of one assignment stream until the job ends.
    async fn events(
        &self,
        mut send: SendStream,
        mut recv: RecvStream,
        d: &Dispatch,
        cancel: &CancellationToken,
    ) -> Result<(), StreamError> {
        let a = &d.assignment;
        let (job, attempt, conn) = (a.job, a.attempt, d.conn);
        let deadline = tokio::time::sleep(self.config.job_timeout);
        tokio::pin!(deadline);
        let mut cancelled = false;
        // Events sent to the owner whose answers have not been read, in order.
        let mut in_flight: VecDeque<oneshot::Receiver<Result<Answer, Refusal>>> = VecDeque::new();
        // After the job's end, no more events are read; its answer ends the loop.
        let mut ending = false;
        let stopping = || StreamError::Failed("the dispatcher is stopping".into());
        loop {
            let (waiting, room) = (!in_flight.is_empty(), in_flight.len() < MAX_IN_FLIGHT && !ending);
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return Err(StreamError::Failed("shutting down".into())),
                () = cancel.cancelled(), if !cancelled => {
                    cancelled = true;
                    let _ = send.send(&Control::Cancel { reason: "the commit was stopped".into() }).await;
                    // The runner acknowledges with Finished; don't wait forever for it.
                    deadline.as_mut().reset(tokio::time::Instant::now() + CANCEL_GRACE);
                    continue;
                }
                () = &mut deadline => {
                    if cancelled {
                        return Ok(());
                    }
                    let reason = format!("the tests ran longer than the job timeout of {:?}", self.config.job_timeout);
                    warn!(commit = %a.commit, "{}", Escaped(&reason));
                    let _ = self.ask(Event::Stop { commit: a.commit, status: CommitStatus::Error, reason }).await;
                    continue;
                }
                answer = async { in_flight.front_mut().expect("waiting").await }, if waiting => {
                    in_flight.pop_front();
                    Err(answer.map_err(|_| stopping())?)
                }
                event = recv.recv(), if room => Ok(event?),
            };
            let event = match next {
                Ok(event) => event,
                // Not stored: the runner cannot be told it was, so the job ends here
                // and goes back to the queue once storing works again.
                Err(answer) => match answer.map_err(StreamError::Failed)? {
                    Answer::Finished { result, ended } => {
                        send.finish();
                        return match result {
                            Ok((commit, status, tests)) => {
                                info!(%commit, %status, tests, "job finished");
                                Ok(())
                            }
                            Err(_) if cancelled || ended => Ok(()),
                            Err(stale) => Err(StreamError::Failed(format!("rejected a job end: {stale}"))),
                        };
                    }
                    Answer::TooManyWarnings => {
                        return Err(StreamError::Protocol("oversized or too many warnings".into()));
                    }
                    // A commit stopped by cancel, timeout or a newer commit may still
                    // get events the runner sent before it heard; they are expected.
                    Answer::Recorded { result: Err(stale), ended } if !(cancelled || ended) => {
                        warn!("rejected an event: {}", Escaped(&stale.to_string()));
                        return Err(StreamError::Protocol(format!(
                            "an event for work this runner does not hold: {stale}"
                        )));
                    }
                    _ => continue,
                },
            };
            let Some(event) = event else {
                return Err(StreamError::Protocol("assignment stream ended before the job finished".into()));
            };
            let event = match event {
                JobEvent::Test(result) => {
                    if result.id.len() > kiln_proto::MAX_TEST_ID_BYTES
                        || result.file.len() > kiln_proto::MAX_TEST_ID_BYTES
                        || result.message.len() > kiln_proto::MAX_TEST_MESSAGE_BYTES
                    {
                        return Err(StreamError::Protocol("oversized test result".into()));
                    }
                    Event::Test { job, attempt, conn, result }
                }
                JobEvent::FileDone { file } => {
                    debug!(file = %Escaped(&file), "file done");
                    Event::FileDone { job, attempt, conn, file }
                }
                JobEvent::Warning(warning) => {
                    if warning.len() > 16 * 1024 {
                        return Err(StreamError::Protocol("oversized or too many warnings".into()));
                    }
                    Event::Warning { job, attempt, conn, warning }
                }
                JobEvent::NotRun { file, reason } => {
                    if file.len() > 4096 || reason.len() > 1024 {
                        return Err(StreamError::Protocol("oversized not-run report".into()));
                    }
                    debug!(file = %Escaped(&file), reason = %Escaped(&reason), "file not run");
                    Event::NotRun { job, attempt, conn, file, reason }
                }
                JobEvent::Finished { error } => {
                    ending = true;
                    Event::Finished { job, attempt, conn, error }
                }
                JobEvent::Abandoned { reason } => {
                    send.finish();
                    return Err(StreamError::Failed(format!("the runner gave the job back: {reason}")));
                }
            };
            // Sent without waiting for its answer: the next event is read
            // meanwhile, and answers are read in order as they come.
            let (tx, rx) = oneshot::channel();
            self.core.send(Msg::Event(event, Some(tx))).await.map_err(|_| stopping())?;
            in_flight.push_back(rx);
        }
    }
}

/// The runner connection a job event came from, if it is one.
fn job_conn(event: &Event) -> Option<ConnId> {
    match event {
        Event::Test { conn, .. }
        | Event::FileDone { conn, .. }
        | Event::NotRun { conn, .. }
        | Event::Warning { conn, .. }
        | Event::Finished { conn, .. }
        | Event::Abandon { conn, .. } => Some(*conn),
        _ => None,
    }
}

/// What an observer submits, as one value.
struct Submission {
    repo: String,
    branch: String,
    commit: CommitId,
    supersede: Supersede,
}

/// Refuses a request the peer may not make: says why, then the connection
/// is closed as unauthorized.
async fn refuse(mut send: SendStream, reason: String) -> Result<(), StreamError> {
    // Say why before closing, and let the reply arrive first (a peer that
    // reads nothing costs at most the timeout); the close carries the reason too.
    let _ = send.send(&Reply::Refused(reason.clone())).await;
    send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    Err(StreamError::Unauthorized(reason))
}

/// Tells a second runner with a registered runner's name who holds it, then
/// closes its connection.
async fn refuse_name(conn: &Connection, mut send: SendStream, clash: NameInUse) -> Result<(), StreamError> {
    let age = Duration::from_millis(now_ms().saturating_sub(clash.since_unix_ms));
    warn!(
        holder = %Escaped(&clash.address),
        held_for = ?Duration::from_secs(age.as_secs()),
        "refused a second connection registering as this runner: the name is in use by another connection"
    );
    let reason = format!("the runner name {} is in use by a connection from {}", clash.name, clash.address);
    let _ = send.send(&Reply::NameInUse(clash)).await;
    send.finish();
    // Let the reply arrive before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    // Its own code: the runner retries later rather than giving up.
    conn.close(CloseCode::NameInUse, &reason);
    Ok(())
}

/// Sends one reply and ends the stream.
async fn reply(mut send: SendStream, reply: Reply) -> Result<(), StreamError> {
    send.send(&reply).await?;
    send.finish();
    Ok(())
}

/// Lists, from the mirror, the test files of unfinished commits an older
/// Kiln stored without them (it ran a commit as one job), so they can be
/// split like new ones. A commit that cannot be listed keeps none, and ends
/// as `error` ("no tests found") rather than stopping the dispatcher.
fn relist(mirror: &std::path::Path, db: &mut Db, entries: &mut [crate::state::CommitEntry]) {
    let bare = entries.iter().any(|e| !e.status.is_final() && e.files.is_empty() && e.batches.is_empty());
    if !bare {
        return;
    }
    let store = match ObjectStore::open(mirror) {
        Ok(store) => store,
        Err(e) => return warn!("cannot list test files of unfinished commits: {}", Escaped(&error_chain(&e))),
    };
    for e in entries.iter_mut().filter(|e| !e.status.is_final() && e.files.is_empty() && e.batches.is_empty()) {
        match store.test_files(&e.commit) {
            Ok(listed) => {
                let change = crate::store::Change::Files { commit: e.commit, files: listed.files.clone() };
                if let Err(err) = Store::apply(db, &[change]) {
                    warn!(commit = %e.commit, "cannot store its test files: {}", Escaped(&error_chain(&err)));
                    continue;
                }
                e.files = listed.files.into_iter().map(|f| (f, 0)).collect();
            }
            Err(err) => warn!(commit = %e.commit, "cannot list its test files: {}", Escaped(&error_chain(&err))),
        }
    }
}

/// Runs git work on the mirror, opened once for it, off the async threads.
async fn in_mirror<T: Send + 'static>(
    mirror: &std::path::Path,
    work: impl FnOnce(ObjectStore) -> Result<T, kiln_git::GitError> + Send + 'static,
) -> Result<T, StreamError> {
    kiln_git::with_store(mirror, kiln_git::Open::Existing, work).await.map_err(|e| StreamError::Failed(error_chain(&e)))
}
