//! The dispatcher's network side: one task per connection, one per stream,
//! one per running assignment, all owned by a [`TaskTracker`] and stopped by
//! one [`CancellationToken`].
//!
//! Bytes from the network never panic this process: a malformed frame, a
//! request the peer's role does not allow, or a message out of place closes
//! that peer's connection with a close code and a reason, and is logged once;
//! every other peer carries on.
//!
//! Every decision is made by [`State`] and written to the [`Db`] under one
//! lock before anyone is told about it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_git::ObjectStore;
use kiln_net::{CloseCode, Connection, FramedError, Listener, PeerIdentity, RecvStream, SendStream};
use kiln_proto::wire::{Assignment, Control, Held, JobEvent, NameInUse, Registration, Reply, Request, Supersede};
use kiln_proto::{CommitId, CommitReport, CommitStatus, Escaped, Role, error_chain};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::db::{Db, DbError};
use crate::results::ResultsDir;
use crate::state::{ConnId, Dispatch, SourceRefusal, State, Stopped};

/// How long a peer may take to send the first frame of a stream it opened.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a runner may take to acknowledge a cancellation.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
/// How many commits the dispatcher offers as "haves" when asking for a pack.
const HAVES: usize = 32;

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

/// What the lock guards: the decisions and their durable record.
struct Core {
    state: State,
    db: Db,
}

impl Core {
    /// Records a commit's row; a database failure is logged loudly, and the
    /// dispatcher keeps serving from memory rather than dropping work.
    fn save(&self, commit: &CommitId) {
        if let Some(entry) = self.state.entry(commit)
            && let Err(e) = self.db.save_commit(entry)
        {
            error!("cannot record {commit} in the state database: {}", Escaped(&error_chain(&e)));
        }
    }
}

/// A registered runner's connection.
struct RunnerConn {
    conn: Connection,
    /// When it registered (Unix ms), to tell a second runner with the same name.
    since_ms: u64,
}

/// The running dispatcher.
pub struct Dispatcher {
    /// Queue, leases, results, and their durable record.
    core: Mutex<Core>,
    /// Registered runner connections by id, to open assignment streams on.
    /// Locked after `core` when both are held.
    runners: Mutex<HashMap<ConnId, RunnerConn>>,
    /// Running assignments by job id: cancelling the token tells the runner to stop.
    running: Mutex<HashMap<u64, (u32, CancellationToken)>>,
    /// The bare git mirror's path; opened per operation on a blocking thread.
    mirror: PathBuf,
    /// Reports to write to the results directory, in order.
    persist: mpsc::UnboundedSender<CommitReport>,
    config: Config,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Dispatcher {
    /// Opens the state directory and serves `listener` until `shutdown` is
    /// cancelled; then closes every connection and waits for its tasks.
    pub async fn run(listener: Listener, config: Config, shutdown: CancellationToken) -> Result<(), StartError> {
        // Results, database and mirror are nobody else's business.
        crate::private::dir(&config.state_dir)?;
        let results = ResultsDir::open(&config.state_dir.join("results"))?;
        let mirror = config.state_dir.join("mirror.git");
        ObjectStore::open_or_init_bare(&mirror)?;
        let db = Db::open(&config.state_dir.join("kiln.db"))?;
        let mut state = State::default();
        state.restore_owners(db.load_owners()?);
        state.pin_owners(config.repo_owners.iter().cloned());
        let entries = db.load()?;
        let (restored, unfinished) = (entries.len(), entries.iter().filter(|e| !e.status.is_final()).count());
        state.restore(entries);
        if restored > 0 {
            info!(commits = restored, unfinished, "resumed from the state database");
        }

        let (persist, mut persist_rx) = mpsc::unbounded_channel::<CommitReport>();
        let tasks = TaskTracker::new();
        let dispatcher = Arc::new(Dispatcher {
            core: Mutex::new(Core { state, db }),
            runners: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
            mirror,
            persist,
            config,
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
        });

        // One writer keeps result files in the order their states happened.
        let writer = tokio::spawn(async move {
            while let Some(report) = persist_rx.recv().await {
                let results = results.clone();
                let path = results.path_of(&report);
                match tokio::task::spawn_blocking(move || results.write(&report)).await {
                    Ok(Ok(())) => debug!(path = %path.display(), "results written"),
                    Ok(Err(e)) => warn!("failed to write results: {}", Escaped(&error_chain(&e))),
                    Err(e) => warn!("results writer failed: {e}"),
                }
            }
        });

        if unfinished > 0 {
            // Runners that kept working through the restart have this long to claim their jobs.
            let d = Arc::clone(&dispatcher);
            let grace = d.config.resume_grace;
            tasks.spawn(async move {
                tokio::select! {
                    () = d.shutdown.cancelled() => {}
                    () = tokio::time::sleep(grace) => {
                        let mut core = d.core();
                        for commit in core.state.expire_orphans() {
                            info!(%commit, "no runner claimed this running work after the restart; requeued");
                            d.persist(&core, &commit);
                        }
                        drop(core);
                        d.schedule();
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
        // Every task is gone, so this is the last sender: the writer drains and stops.
        drop(dispatcher);
        let _ = writer.await;
        Ok(())
    }

    fn core(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock would be a bug in State; keep serving.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a commit durably and queues its results file.
    fn persist(&self, core: &Core, commit: &CommitId) {
        core.save(commit);
        if let Some(report) = core.state.report(commit) {
            // The writer lives as long as any task; a send only fails at shutdown.
            let _ = self.persist.send(report);
        }
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
                self.runner_gone(&peer.name, id);
            }
        }
        .instrument(span)
        .await
    }

    fn runner_gone(self: &Arc<Self>, name: &str, id: ConnId) {
        self.runners.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        let mut core = self.core();
        for commit in core.state.unregister(name, id) {
            info!(%commit, "requeued the work of a disconnected runner");
            self.persist(&core, &commit);
        }
        drop(core);
        self.schedule();
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
        let (allowed, what) = match &request {
            Request::Register(_) => (Role::Runner, "register as a runner"),
            Request::Resume(_) => (Role::Runner, "resume jobs"),
            Request::FetchSource { .. } => (Role::Runner, "fetch source"),
            Request::Submit { .. } => (Role::Observer, "submit commits"),
            Request::BranchTip { .. } => (Role::Observer, "ask for branch tips"),
            Request::GetResults { .. } => (Role::Admin, "read results"),
            Request::Cancel { .. } => (Role::Admin, "cancel commits"),
            Request::Resolve { .. } => (Role::Admin, "look up commits"),
        };
        if peer.role != allowed {
            return refuse(send, format!("{peer} may not {what}: that needs the {allowed} role")).await;
        }
        match request {
            Request::Register(registration) => self.register(conn, peer, send, recv, registration).await,
            Request::Resume(held) => self.resume(conn, peer, send, recv, held).await,
            Request::Submit { repo, branch, commit, supersede } => {
                self.submit(peer, send, recv, Submission { repo, branch, commit, supersede }).await
            }
            Request::BranchTip { repo, branch } => {
                let tip = {
                    let core = self.core();
                    core.state.may_read_repo(&repo, &peer.name).map(|()| core.state.branch_tip(&repo, &branch))
                };
                match tip {
                    Ok(tip) => reply(send, Reply::Tip(tip)).await,
                    Err(refused) => refuse(send, refused.to_string()).await,
                }
            }
            Request::FetchSource { lease, commit, haves } => {
                self.fetch_source(conn, peer, send, lease, commit, haves).await
            }
            Request::GetResults { commit } => {
                let report = {
                    let core = self.core();
                    commit.or_else(|| core.state.newest()).and_then(|c| core.state.report(&c))
                };
                reply(send, Reply::Report(report.map(Box::new))).await
            }
            Request::Cancel { commit } => {
                let stopped = self.stop(&commit, CommitStatus::Cancelled, format!("cancelled by {peer}"));
                if stopped {
                    info!(%commit, "cancelled");
                }
                reply(send, Reply::Cancelled(stopped)).await
            }
            Request::Resolve { prefix } => {
                let found = self.core().state.commits_with_prefix(&prefix, kiln_proto::wire::MAX_RESOLVED);
                reply(send, Reply::Resolved(found)).await
            }
        }
    }

    /// Ends a commit that is not final with `status`, telling its runner to
    /// kill the tests if it is running. Returns whether anything was stopped.
    fn stop(self: &Arc<Self>, commit: &CommitId, status: CommitStatus, reason: String) -> bool {
        let stopped = {
            let mut core = self.core();
            let stopped = core.state.stop(commit, status, reason, now_ms());
            if stopped.is_some() {
                self.persist(&core, commit);
            }
            stopped
        };
        let Some(stopped) = stopped else { return false };
        self.tell_stopped(&[stopped]);
        self.schedule();
        true
    }

    fn tell_stopped(&self, stopped: &[Stopped]) {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for s in stopped {
            if s.conn.is_some()
                && let Some((_, token)) = running.get(&s.job)
            {
                token.cancel();
            }
        }
    }

    async fn register(
        self: &Arc<Self>,
        conn: &Connection,
        peer: &PeerIdentity,
        mut send: SendStream,
        mut recv: RecvStream,
        Registration { slots, held, sandbox_gaps }: Registration,
    ) -> Result<(), StreamError> {
        let slots = slots.clamp(1, 256);
        let id = conn.stable_id();
        let registered = {
            let mut core = self.core();
            let mut runners = self.runners.lock().unwrap_or_else(|e| e.into_inner());
            // Two live connections with one name are two runners sharing a
            // certificate: the registered one keeps the name. A dead one is
            // replaced (its runner reconnecting); a silent one is declared
            // dead within the idle timeout, and the newcomer gets in then,
            // unless it names a lease the old connection holds: only the
            // runner that was given it knows it, so it is that runner back.
            let holder = core
                .state
                .runner_conn(&peer.name)
                .filter(|&c| c != id)
                .filter(|&c| !held.iter().any(|h| core.state.holds(h.job, h.attempt, c)))
                .and_then(|c| runners.get(&c))
                .filter(|h| h.conn.close_reason().is_none());
            match holder {
                Some(h) => Err(NameInUse {
                    name: peer.name.clone(),
                    since_unix_ms: h.since_ms,
                    address: h.conn.remote_address().to_string(),
                }),
                None => {
                    runners.insert(id, RunnerConn { conn: conn.clone(), since_ms: now_ms() });
                    drop(runners);
                    let held = &held[..held.len().min(1024)];
                    let gaps: Vec<String> =
                        sandbox_gaps.iter().take(32).map(|g| g.chars().take(512).collect()).collect();
                    let (replaced, adopted) = core.state.register(&peer.name, id, slots, held, &gaps);
                    for job in &adopted {
                        if let Some(commit) = core.state.commit_of(*job) {
                            info!(job, %commit, "the runner still holds this job; it may resume");
                            self.persist(&core, &commit);
                        }
                    }
                    Ok((replaced, adopted))
                }
            }
        };
        let (replaced, adopted) = match registered {
            Ok(r) => r,
            Err(clash) => return refuse_name(conn, send, clash).await,
        };
        if held.len() > adopted.len() {
            info!(held = held.len(), adopted = adopted.len(), "refusing assignments the runner no longer holds");
        }
        if let Some(old) = replaced {
            let old_conn = self.runners.lock().unwrap_or_else(|e| e.into_inner()).remove(&old);
            if let Some(old_conn) = old_conn {
                old_conn.conn.close(CloseCode::Replaced, "a newer connection registered with this name");
            }
        }
        info!(slots, "runner registered");
        send.send(&Reply::Registered).await?;
        self.schedule();
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
        let claimed = {
            let mut core = self.core();
            let claimed = core.state.claim_repo(&repo, &peer.name);
            if claimed == Ok(true) {
                info!(repo = %Escaped(&repo), "repository bound to this observer");
                if let Err(e) = core.db.bind_owner(&repo, &peer.name, now_ms()) {
                    error!("cannot record a repository's owner: {}", Escaped(&error_chain(&e)));
                }
            }
            claimed
        };
        if let Err(refused) = claimed {
            return refuse(send, refused.to_string()).await;
        }
        if self.core().state.knows(&commit) {
            return reply(send, Reply::Known).await;
        }
        let mirror = self.mirror.clone();
        let present = blocking(move || Ok(ObjectStore::open(&mirror)?.has_commit(&commit))).await?;
        if !present {
            let mirror = self.mirror.clone();
            let haves = blocking(move || ObjectStore::open(&mirror)?.recorded_commits(HAVES)).await?;
            send.send(&Reply::SendPack { haves }).await?;
            let pack = recv.recv_pack(self.config.max_pack_bytes).await?;
            let mirror = self.mirror.clone();
            let bytes = pack.len();
            let limits = self.config.git_limits;
            let unpacked = tokio::task::spawn_blocking(move || {
                ObjectStore::open(&mirror)?.with_limits(limits).unpack(&pack, &commit)
            })
            .await
            .map_err(|e| StreamError::Failed(format!("git task failed: {e}")))?;
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
                Err(e) => return Err(StreamError::Protocol(format!("the pack for {commit} is unusable: {e}"))),
            }
            debug!(%commit, bytes, "pack stored in the mirror");
        }
        // A newer commit stops older ones only if it descends from them: a
        // rewritten or unrelated history never cancels work.
        let candidates = self.core().state.supersede_candidates(&repo, &branch, supersede);
        let descends: HashSet<CommitId> = if candidates.is_empty() {
            HashSet::new()
        } else {
            let mirror = self.mirror.clone();
            let older = candidates.clone();
            blocking(move || {
                let store = ObjectStore::open(&mirror)?;
                Ok(older
                    .into_iter()
                    .filter(|old| match store.is_ancestor(old, &commit) {
                        Ok(yes) => yes,
                        Err(e) => {
                            warn!(%old, "cannot tell whether {commit} descends from it: {}", Escaped(&error_chain(&e)));
                            false
                        }
                    })
                    .collect())
            })
            .await?
        };
        let stopped = {
            let mut core = self.core();
            let result = core.state.submit(&repo, &branch, commit, supersede, |c| descends.contains(c), now_ms());
            if let Some(stopped) = &result {
                info!(%commit, repo = %Escaped(&repo), branch = %Escaped(&branch), "commit queued");
                self.persist(&core, &commit);
                for s in stopped {
                    info!(commit = %s.commit, by = %commit, "superseded");
                    self.persist(&core, &s.commit);
                }
                for old in candidates.iter().filter(|c| !descends.contains(c)) {
                    info!(commit = %old, by = %commit, "not superseded: the new commit does not descend from it");
                }
            }
            result.unwrap_or_default()
        };
        self.tell_stopped(&stopped);
        send.send(&Reply::Queued).await?;
        send.finish();
        self.schedule();
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
        let access = self.core().state.source_access(lease, &commit, conn.stable_id(), &peer.name);
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
        let mirror = self.mirror.clone();
        let limits = self.config.git_limits;
        let pack = blocking(move || ObjectStore::open(&mirror)?.with_limits(limits).pack(&commit, &haves)).await?;
        debug!(%commit, bytes = pack.len(), "sending source");
        send.send(&Reply::Source).await?;
        send.send_pack(&pack).await?;
        send.finish();
        let _ = send.stopped().await;
        Ok(())
    }

    /// Hands queued jobs to free runners.
    fn schedule(self: &Arc<Self>) {
        let dispatches = {
            let mut core = self.core();
            let dispatches = core.state.assign();
            for d in &dispatches {
                self.persist(&core, &d.assignment.commit);
            }
            dispatches
        };
        for d in dispatches {
            let conn = self.runners.lock().unwrap_or_else(|e| e.into_inner()).get(&d.conn).map(|r| r.conn.clone());
            let Some(conn) = conn else {
                let mut core = self.core();
                if let Some(commit) = core.state.abandon(d.assignment.job, d.assignment.attempt, d.conn) {
                    self.persist(&core, &commit);
                }
                continue;
            };
            let token = CancellationToken::new();
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(d.assignment.job, (d.assignment.attempt, token.clone()));
            let me = Arc::clone(self);
            let a = &d.assignment;
            // A root span: `schedule` runs under whichever connection freed a slot or
            // queued work (often an observer's), and the job's lines are not that
            // connection's. The runner is named in the span instead.
            let span = info_span!(parent: None, "job", job = a.job, attempt = a.attempt, runner = %Escaped(&d.runner));
            self.tasks.spawn(async move { me.drive(conn, d, token).await }.instrument(span));
        }
    }

    /// Runs one assignment: sends it, records the events that come back.
    async fn drive(self: Arc<Self>, conn: Connection, d: Dispatch, cancel: CancellationToken) {
        info!(commit = %d.assignment.commit, skip = d.assignment.skip_files.len(), "assigned");
        let outcome = async {
            let (mut send, recv) = conn.open().await.map_err(|e| StreamError::Failed(e.to_string()))?;
            send.send(&d.assignment).await?;
            self.events(send, recv, &d, &cancel).await
        }
        .await;
        self.assignment_ended(&conn, &d, outcome);
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
        let commit = {
            let core = self.core();
            core.state.holds(held.job, held.attempt, id).then(|| core.state.commit_of(held.job)).flatten()
        };
        let Some(commit) = commit else {
            let reason = format!("job {} attempt {} is no longer yours", held.job, held.attempt);
            warn!("rejected a late runner's work: {}", Escaped(&reason));
            return reply(send, Reply::Refused(reason)).await;
        };
        let d = Dispatch {
            runner: peer.name.clone(),
            conn: id,
            assignment: Assignment { job: held.job, attempt: held.attempt, commit, skip_files: Vec::new() },
        };
        let cancel = CancellationToken::new();
        self.running.lock().unwrap_or_else(|e| e.into_inner()).insert(held.job, (held.attempt, cancel.clone()));
        // Under the runner's connection, which is the one carrying the job now.
        let span = info_span!("job", job = held.job, attempt = held.attempt);
        async {
            info!(%commit, "resumed");
            send.send(&Reply::Resumed).await?;
            let outcome = self.events(send, recv, &d, &cancel).await;
            self.assignment_ended(conn, &d, outcome);
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Cleans up after an assignment stream: requeues the job if it did not
    /// end properly, and hands out work.
    fn assignment_ended(self: &Arc<Self>, conn: &Connection, d: &Dispatch, outcome: Result<(), StreamError>) {
        let a = &d.assignment;
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if running.get(&a.job).is_some_and(|(attempt, _)| *attempt == a.attempt) {
                running.remove(&a.job);
            }
        }
        if let Err(e) = outcome {
            if let StreamError::Protocol(reason) = &e {
                warn!("protocol violation, closing connection: {}", Escaped(reason));
                conn.close(CloseCode::Protocol, reason);
            }
            let mut core = self.core();
            if let Some(commit) = core.state.abandon(a.job, a.attempt, d.conn) {
                info!("job requeued: {}", Escaped(&e.to_string()));
                self.persist(&core, &commit);
            }
        }
        self.schedule();
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
        let deadline = tokio::time::sleep(self.config.job_timeout);
        tokio::pin!(deadline);
        let mut cancelled = false;
        loop {
            let event: Option<JobEvent> = tokio::select! {
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
                    self.stop_for_timeout(&a.commit, reason);
                    continue;
                }
                event = recv.recv() => event?,
            };
            let Some(event) = event else {
                return Err(StreamError::Protocol("assignment stream ended before the job finished".into()));
            };
            let mut core = self.core();
            let result = match event {
                JobEvent::Test(result) => {
                    if result.id.len() > 4096 || result.message.len() > 512 * 1024 {
                        return Err(StreamError::Protocol("oversized test result".into()));
                    }
                    let commit = a.commit;
                    let stored = result.clone();
                    core.state.record_test(a.job, a.attempt, d.conn, result).map(|new| {
                        if new && let Err(e) = core.db.insert_test(&commit, &stored) {
                            error!(test = %Escaped(&stored.id), "cannot record a result: {}", Escaped(&error_chain(&e)));
                        }
                    })
                }
                JobEvent::FileDone { file } => {
                    let commit = a.commit;
                    core.state.file_done(a.job, a.attempt, d.conn, file.clone()).map(|new| {
                        if new {
                            debug!(file = %Escaped(&file), "file done");
                            if let Err(e) = core.db.insert_done_file(&commit, &file) {
                                error!(file = %Escaped(&file), "cannot record a finished file: {}", Escaped(&error_chain(&e)));
                            }
                            // Progress shows in the results file file by file.
                            self.persist(&core, &commit);
                        }
                    })
                }
                JobEvent::Warning(warning) => {
                    let commit = a.commit;
                    let count = core.state.entry(&commit).map_or(0, |e| e.warnings.len());
                    if warning.len() > 16 * 1024 || count >= 32 {
                        return Err(StreamError::Protocol("oversized or too many warnings".into()));
                    }
                    core.state.warn(a.job, a.attempt, d.conn, warning).map(|new| {
                        if new {
                            self.persist(&core, &commit);
                        }
                    })
                }
                JobEvent::Finished { error } => {
                    let result = core.state.finish(a.job, a.attempt, d.conn, error, now_ms());
                    if let Ok(commit) = &result {
                        self.persist(&core, commit);
                        if let Some(r) = core.state.report(commit) {
                            info!(%commit, status = %r.status, tests = r.counts.total, "job finished");
                        }
                    }
                    let stopped = cancelled || core.state.entry(&a.commit).is_some_and(|e| e.status.is_final());
                    drop(core);
                    send.finish();
                    return match result {
                        Ok(_) => Ok(()),
                        Err(_) if stopped => Ok(()),
                        Err(stale) => Err(StreamError::Failed(format!("rejected a job end: {stale}"))),
                    };
                }
                JobEvent::Abandoned { reason } => {
                    drop(core);
                    send.finish();
                    return Err(StreamError::Failed(format!("the runner gave the job back: {reason}")));
                }
            };
            // A commit stopped by cancel, timeout or a newer commit may still
            // get events the runner sent before it heard; they are expected.
            let stopped = cancelled || core.state.entry(&a.commit).is_some_and(|e| e.status.is_final());
            match result {
                Ok(()) => {}
                Err(_) if stopped => {}
                Err(stale) => {
                    warn!("rejected an event: {}", Escaped(&stale.to_string()));
                    return Err(StreamError::Protocol(format!("an event for work this runner does not hold: {stale}")));
                }
            }
        }
    }

    fn stop_for_timeout(&self, commit: &CommitId, reason: String) {
        let mut core = self.core();
        if let Some(stopped) = core.state.stop(commit, CommitStatus::Error, reason, now_ms()) {
            self.persist(&core, commit);
            drop(core);
            self.tell_stopped(&[stopped]);
        }
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

/// Runs blocking git work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, kiln_git::GitError> + Send + 'static,
) -> Result<T, StreamError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(StreamError::Failed(error_chain(&e))),
        Err(e) => Err(StreamError::Failed(format!("git task failed: {e}"))),
    }
}
