//! The dispatcher's network side: one task per connection, one per stream,
//! one per running assignment, all owned by a [`TaskTracker`] and stopped by
//! one [`CancellationToken`].
//!
//! Bytes from the network never panic this process: a malformed frame, a
//! request the peer's role does not allow, or a message out of place closes
//! that peer's connection with a close code and a reason, and is logged once;
//! every other peer carries on.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_git::ObjectStore;
use kiln_net::{CloseCode, Connection, FramedError, Listener, PeerIdentity, RecvStream, SendStream};
use kiln_proto::wire::{JobEvent, Reply, Request};
use kiln_proto::{CommitId, CommitReport, Role, error_chain};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::results::ResultsDir;
use crate::state::{ConnId, Dispatch, State};

/// How long a peer may take to send the first frame of a stream it opened.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How many commits the dispatcher offers as "haves" when asking for a pack.
const HAVES: usize = 32;

/// The dispatcher's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the mirror and results live.
    pub state_dir: PathBuf,
    /// The largest git pack accepted from an observer.
    pub max_pack_bytes: u64,
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

/// The running dispatcher.
pub struct Dispatcher {
    /// Queue, leases and results.
    state: Mutex<State>,
    /// Open runner connections by id, to open assignment streams on.
    runners: Mutex<HashMap<ConnId, Connection>>,
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
        let (results, reports, problems) = ResultsDir::open(&config.state_dir.join("results"))?;
        for p in problems {
            warn!("{p}");
        }
        let mirror = config.state_dir.join("mirror.git");
        ObjectStore::open_or_init_bare(&mirror)?;
        let mut state = State::default();
        let restored = reports.len();
        for r in reports {
            state.restore(r);
        }
        state.sort_by_queue_time();
        if restored > 0 {
            info!(commits = restored, "restored results from an earlier run");
        }

        let (persist, mut persist_rx) = mpsc::unbounded_channel::<CommitReport>();
        let tasks = TaskTracker::new();
        let dispatcher = Arc::new(Dispatcher {
            state: Mutex::new(state),
            runners: Mutex::new(HashMap::new()),
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
                    Ok(Err(e)) => warn!("failed to write results: {}", error_chain(&e)),
                    Err(e) => warn!("results writer failed: {e}"),
                }
            }
        });

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

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug in State; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, state: &State, commit: &CommitId) {
        if let Some(report) = state.report(commit) {
            // The writer lives as long as any task; a send only fails at shutdown.
            let _ = self.persist.send(report);
        }
    }

    async fn serve_connection(self: Arc<Self>, incoming: kiln_net::Incoming) {
        let remote = incoming.remote_address();
        let conn = match Listener::handshake(incoming).await {
            Ok(conn) => conn,
            Err(reason) => {
                warn!(%remote, "handshake failed: {reason}");
                return;
            }
        };
        let Some(peer) = conn.identity().cloned() else { return };
        let span = info_span!("peer", peer = %peer, %remote);
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
            info!("disconnected: {reason}");
            if peer.role == Role::Runner {
                self.runner_gone(&peer.name, id);
            }
        }
        .instrument(span)
        .await
    }

    fn runner_gone(self: &Arc<Self>, name: &str, id: ConnId) {
        self.runners.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
        let mut state = self.state();
        for commit in state.unregister(name, id) {
            info!(%commit, "requeued the work of a disconnected runner");
            self.persist(&state, &commit);
        }
        drop(state);
        self.schedule();
    }

    async fn serve_stream(self: Arc<Self>, conn: Connection, peer: PeerIdentity, send: SendStream, recv: RecvStream) {
        match self.handle_request(&conn, &peer, send, recv).await {
            Ok(()) => {}
            Err(StreamError::Protocol(reason)) => {
                warn!("protocol violation, closing connection: {reason}");
                conn.close(CloseCode::Protocol, &reason);
            }
            Err(StreamError::Unauthorized(reason)) => {
                warn!("unauthorized request, closing connection: {reason}");
                conn.close(CloseCode::Unauthorized, &reason);
            }
            Err(StreamError::Failed(reason)) => debug!("stream ended: {reason}"),
        }
    }

    async fn handle_request(
        self: &Arc<Self>,
        conn: &Connection,
        peer: &PeerIdentity,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<(), StreamError> {
        let request: Request = tokio::time::timeout(REQUEST_TIMEOUT, recv.expect())
            .await
            .map_err(|_| StreamError::Protocol("no request within 30 s of opening a stream".into()))??;
        let allowed = match &request {
            Request::Register { .. } | Request::FetchSource { .. } => Role::Runner,
            Request::Submit { .. } => Role::Observer,
            Request::GetResults { .. } => Role::Admin,
        };
        if peer.role != allowed {
            let what = match &request {
                Request::Register { .. } => "register as a runner",
                Request::FetchSource { .. } => "fetch source",
                Request::Submit { .. } => "submit commits",
                Request::GetResults { .. } => "read results",
            };
            let reason = format!("{peer} may not {what}: that needs the {allowed} role");
            // Say why before closing; the peer may or may not read it.
            let _ = send.send(&Reply::Refused(reason.clone())).await;
            send.finish();
            return Err(StreamError::Unauthorized(reason));
        }
        match request {
            Request::Register { slots } => self.register(conn, peer, send, recv, slots).await,
            Request::Submit { repo, branch, commit } => self.submit(send, recv, repo, branch, commit).await,
            Request::FetchSource { commit, haves } => self.fetch_source(send, commit, haves).await,
            Request::GetResults { commit } => {
                let report = {
                    let state = self.state();
                    commit.or_else(|| state.newest()).and_then(|c| state.report(&c))
                };
                send.send(&Reply::Report(report.map(Box::new))).await?;
                send.finish();
                Ok(())
            }
        }
    }

    async fn register(
        self: &Arc<Self>,
        conn: &Connection,
        peer: &PeerIdentity,
        mut send: SendStream,
        mut recv: RecvStream,
        slots: u32,
    ) -> Result<(), StreamError> {
        let slots = slots.clamp(1, 256);
        let id = conn.stable_id();
        self.runners.lock().unwrap_or_else(|e| e.into_inner()).insert(id, conn.clone());
        let replaced = self.state().register(&peer.name, id, slots);
        if let Some(old) = replaced {
            let old_conn = self.runners.lock().unwrap_or_else(|e| e.into_inner()).remove(&old);
            if let Some(old_conn) = old_conn {
                old_conn.close(CloseCode::Replaced, "a newer connection registered with this name");
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
        mut send: SendStream,
        mut recv: RecvStream,
        repo: String,
        branch: String,
        commit: CommitId,
    ) -> Result<(), StreamError> {
        if repo.len() > 4096 || branch.len() > 1024 {
            return Err(StreamError::Protocol("repository or branch name too long".into()));
        }
        if self.state().knows(&commit) {
            send.send(&Reply::Known).await?;
            send.finish();
            return Ok(());
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
            blocking(move || ObjectStore::open(&mirror)?.unpack(&pack, &commit))
                .await
                .map_err(|e| StreamError::Protocol(format!("the pack for {commit} is unusable: {e}")))?;
            debug!(%commit, bytes, "pack stored in the mirror");
        }
        {
            let mut state = self.state();
            if state.submit(&repo, &branch, commit, now_ms()) {
                info!(%commit, %repo, %branch, "commit queued");
                self.persist(&state, &commit);
            }
        }
        send.send(&Reply::Queued).await?;
        send.finish();
        self.schedule();
        Ok(())
    }

    async fn fetch_source(
        self: &Arc<Self>,
        mut send: SendStream,
        commit: CommitId,
        haves: Vec<CommitId>,
    ) -> Result<(), StreamError> {
        if !self.state().knows(&commit) {
            let reason = format!("commit {commit} was never submitted");
            send.send(&Reply::Refused(reason.clone())).await?;
            send.finish();
            return Err(StreamError::Failed(reason));
        }
        let haves: Vec<CommitId> = haves.into_iter().take(256).collect();
        let mirror = self.mirror.clone();
        let pack = blocking(move || ObjectStore::open(&mirror)?.pack(&commit, &haves)).await?;
        debug!(%commit, bytes = pack.len(), "sending source");
        send.send(&Reply::Source).await?;
        send.send_pack(&pack).await?;
        send.finish();
        send.stopped().await;
        Ok(())
    }

    /// Hands queued jobs to free runners.
    fn schedule(self: &Arc<Self>) {
        let dispatches = {
            let mut state = self.state();
            let dispatches = state.assign();
            for d in &dispatches {
                self.persist(&state, &d.assignment.commit);
            }
            dispatches
        };
        for d in dispatches {
            let conn = self.runners.lock().unwrap_or_else(|e| e.into_inner()).get(&d.conn).cloned();
            let Some(conn) = conn else {
                self.state().abandon(d.assignment.job, d.assignment.attempt, d.conn);
                continue;
            };
            let me = Arc::clone(self);
            let span = info_span!("job", job = d.assignment.job, attempt = d.assignment.attempt, runner = %d.runner);
            self.tasks.spawn(async move { me.drive(conn, d).await }.instrument(span));
        }
    }

    /// Runs one assignment: sends it, records the events that come back.
    async fn drive(self: Arc<Self>, conn: Connection, d: Dispatch) {
        let a = &d.assignment;
        info!(commit = %a.commit, "assigned");
        let outcome = async {
            let (mut send, mut recv) = conn.open().await.map_err(|e| StreamError::Failed(e.to_string()))?;
            send.send(a).await?;
            loop {
                let event: Option<JobEvent> = tokio::select! {
                    () = self.shutdown.cancelled() => return Err(StreamError::Failed("shutting down".into())),
                    event = recv.recv() => event?,
                };
                match event {
                    None => {
                        return Err(StreamError::Protocol("assignment stream ended before the job finished".into()));
                    }
                    Some(JobEvent::Test(result)) => {
                        if result.id.len() > 4096 || result.message.len() > 512 * 1024 {
                            return Err(StreamError::Protocol("oversized test result".into()));
                        }
                        let mut state = self.state();
                        match state.record_test(a.job, a.attempt, d.conn, result) {
                            Ok(true) => {}
                            Ok(false) => debug!("duplicate test result ignored"),
                            Err(stale) => {
                                warn!("rejected a result: {stale}");
                                return Err(StreamError::Failed(stale.to_string()));
                            }
                        }
                    }
                    Some(JobEvent::Finished { error }) => {
                        let mut state = self.state();
                        match state.finish(a.job, a.attempt, d.conn, error, now_ms()) {
                            Ok(commit) => {
                                self.persist(&state, &commit);
                                if let Some(r) = state.report(&commit) {
                                    info!(%commit, status = %r.status, tests = r.counts.total, "job finished");
                                }
                            }
                            Err(stale) => warn!("rejected a job end: {stale}"),
                        }
                        drop(state);
                        send.finish();
                        return Ok(());
                    }
                }
            }
        }
        .await;
        if let Err(e) = outcome {
            if let StreamError::Protocol(reason) = &e {
                warn!("protocol violation, closing connection: {reason}");
                conn.close(CloseCode::Protocol, reason);
            }
            let mut state = self.state();
            if state.abandon(a.job, a.attempt, d.conn) {
                info!("job requeued: {e}");
                self.persist(&state, &a.commit);
            }
        }
        self.schedule();
    }
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
