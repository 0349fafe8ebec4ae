//! The Kiln observer: polls a git repository's branches and tells the
//! dispatcher about each branch's newest commit, sending along a git pack of
//! the objects the dispatcher's mirror lacks.
//!
//! In `latest` mode (the default, as in the original design) it submits the
//! newest commit seen in each polling period, and the dispatcher skips or
//! cancels older commits of the branch. In `every` mode it submits every new
//! commit in order; after a restart it asks the dispatcher for the last
//! commit it has of each branch and submits what came after. Submissions are
//! idempotent at the dispatcher, so nothing is queued twice.
//!
//! `kiln notify` (e.g. from a git hook) pokes the observer through a Unix
//! socket so it looks at once instead of at the next poll.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_git::ObjectStore;
use kiln_net::{Backoff, Bundle, Connection, NetConfig, RequestError};
use kiln_proto::wire::{Reply, Request, Supersede};
use kiln_proto::{CommitId, Escaped, error_chain};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The observer's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The dispatcher's `HOST:PORT`.
    pub dispatcher: String,
    /// The repository to watch (a local path).
    pub repo: PathBuf,
    /// The branches to watch; none means the branch the repository's `HEAD`
    /// names (what `git init` made: `master` or `main`).
    pub branches: Vec<String>,
    /// How often to look.
    pub interval: Duration,
    /// Transport settings.
    pub net: NetConfig,
    /// Which commits to submit.
    pub mode: Mode,
    /// Where to listen for `kiln notify` (see [`default_notify_socket`]).
    pub notify_socket: Option<PathBuf>,
    /// Caps on the uncompressed objects a submission may carry, checked
    /// before a pack is built (the dispatcher checks its own again).
    pub git_limits: kiln_git::Limits,
}

/// Which commits an observer submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The newest commit of each branch. Older commits still queued are
    /// skipped; running ones are cancelled if `cancel_running`.
    Latest {
        /// Whether a newer commit cancels running work of older ones.
        cancel_running: bool,
    },
    /// Every new commit, oldest first.
    Every,
}

/// How the observer's start-up line names the mode, as the flags do.
impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Latest { cancel_running: true } => "latest",
            Mode::Latest { cancel_running: false } => "latest --keep-running",
            Mode::Every => "every",
        })
    }
}

impl Mode {
    fn supersede(self) -> Supersede {
        match self {
            Mode::Latest { cancel_running: true } => Supersede::CancelRunning,
            Mode::Latest { cancel_running: false } => Supersede::SkipQueued,
            Mode::Every => Supersede::Nothing,
        }
    }
}

/// How many commits one `every`-mode catch-up submits at most.
const MAX_CATCH_UP: usize = 1000;

/// The default `kiln notify` socket of a repository: `kiln-observer.sock`
/// in its git directory (`.git/` of a work tree, or the bare repository).
pub fn default_notify_socket(repo: &std::path::Path) -> PathBuf {
    let dot_git = repo.join(".git");
    if dot_git.is_dir() { dot_git.join("kiln-observer.sock") } else { repo.join("kiln-observer.sock") }
}

/// Why the observer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    /// The repository cannot be opened.
    #[error("open the repository to watch")]
    Repo(#[source] kiln_git::GitError),
    /// No branch was named and `HEAD` names none.
    #[error("choose the branch to watch (no --branch was given)")]
    HeadBranch(#[source] kiln_git::GitError),
    /// The bundle is not an observer's.
    #[error("the certificate in {0} is not an observer certificate (issue one with `kiln certs issue observer NAME`)")]
    NotObserver(PathBuf),
    /// The dispatcher refused this observer.
    #[error("the dispatcher refused this observer: {0}")]
    Refused(String),
    /// The dispatcher refused this observer's certificate.
    #[error("{0}")]
    Rejected(String),
    /// The notify socket could not be opened.
    #[error("listen for `kiln notify` on {path}")]
    Notify {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why one submission failed.
#[derive(Debug, thiserror::Error)]
enum SubmitError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("read the repository")]
    Git(#[from] kiln_git::GitError),
    #[error("unexpected reply from the dispatcher: {0:?}")]
    Unexpected(Reply),
    /// The commit is over the git caps, found here or by the dispatcher: it is
    /// not queued, and resending it would not help.
    #[error("{0}")]
    TooLarge(String),
    /// The dispatcher could not store it now: offer it again at the next poll.
    #[error("{0}")]
    Unavailable(String),
}

/// Watches the repository until `shutdown` is cancelled.
pub async fn run(bundle: Bundle, config: Config, shutdown: CancellationToken) -> Result<(), ObserverError> {
    if bundle.identity().is_none_or(|id| id.role != kiln_proto::Role::Observer) {
        return Err(ObserverError::NotObserver(bundle.dir.clone()));
    }
    // Fail at once, with a clear message, if the repository is not there.
    let repo = config.repo.clone();
    in_repo(&repo, |_| Ok(())).await.map_err(ObserverError::Repo)?;
    let branches = if config.branches.is_empty() {
        let repo = config.repo.clone();
        vec![in_repo(&repo, move |store| store.head_branch()).await.map_err(ObserverError::HeadBranch)?]
    } else {
        config.branches.clone()
    };
    info!(
        repo = %Escaped(&repo_name(&config)),
        branches = %Escaped(&branches.join(",")),
        interval = ?config.interval,
        mode = %config.mode,
        "watching"
    );
    let poke = Arc::new(Notify::new());
    let _socket = match &config.notify_socket {
        Some(path) => Some(listen_for_pokes(path, Arc::clone(&poke), shutdown.clone())?),
        None => None,
    };

    let mut submitted: HashMap<String, CommitId> = HashMap::new();
    let mut conn: Option<Connection> = None;
    let mut backoff = Backoff::default();
    // Branches found missing and said so: said once, not at every poll.
    let mut missing: HashSet<String> = HashSet::new();
    loop {
        let mut failed = false;
        for branch in &branches {
            let repo = config.repo.clone();
            let name = branch.clone();
            let head = match in_repo(&repo, move |store| store.branch_head(&name)).await {
                Ok(head) => {
                    if missing.remove(branch) {
                        info!(branch = %Escaped(branch), "the branch exists now");
                    }
                    head
                }
                Err(e) if matches!(e.kind(), kiln_git::GitErrorKind::NoSuchBranch { .. }) => {
                    if missing.insert(branch.clone()) {
                        let repo = config.repo.clone();
                        let existing = in_repo(&repo, move |store| store.branch_names()).await;
                        warn!(
                            branch = %Escaped(branch),
                            "{}; waiting for it to appear",
                            Escaped(&no_such_branch(branch, &repo_name(&config), existing.as_deref().ok()))
                        );
                    }
                    continue;
                }
                Err(e) => {
                    warn!(branch = %Escaped(branch), "cannot read the branch: {}", Escaped(&error_chain(&e)));
                    continue;
                }
            };
            if submitted.get(branch) == Some(&head) {
                continue;
            }
            let known = submitted.get(branch).copied();
            let c = match &conn {
                Some(c) if c.close_reason().is_none() => c.clone(),
                _ => match kiln_net::connect(&bundle, &config.dispatcher, config.net).await {
                    Ok(c) => {
                        conn = Some(c.clone());
                        c
                    }
                    Err(e @ kiln_net::EndpointError::Rejected { .. }) => {
                        return Err(ObserverError::Rejected(error_chain(&e)));
                    }
                    Err(e) => {
                        warn!("cannot reach the dispatcher: {}", Escaped(&error_chain(&e)));
                        failed = true;
                        break;
                    }
                },
            };
            match submit_branch(&c, &config, branch, known, head).await {
                Ok(()) => {
                    submitted.insert(branch.clone(), head);
                }
                Err(SubmitError::Request(RequestError::Refused(reason))) => return Err(ObserverError::Refused(reason)),
                Err(SubmitError::TooLarge(reason)) => {
                    // Not queued, and never will be as it is: say so once and
                    // move on to the branch's next head.
                    tracing::error!(%branch, commit = %head, "not submitted: {reason}");
                    submitted.insert(branch.clone(), head);
                }
                Err(SubmitError::Request(RequestError::Rejected(reason))) => {
                    return Err(ObserverError::Rejected(reason));
                }
                Err(SubmitError::Unavailable(reason)) => {
                    warn!(%branch, commit = %head, "not submitted yet, offering it again at the next poll: {}", Escaped(&reason));
                }
                Err(e) => {
                    warn!(
                        branch = %Escaped(branch),
                        commit = %head,
                        "submission failed: {}",
                        Escaped(&error_chain(&e))
                    );
                    conn = None;
                    failed = true;
                    break;
                }
            }
        }
        let wait = if failed {
            backoff.next_delay()
        } else {
            backoff.reset();
            config.interval
        };
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
            () = poke.notified() => debug!("poked by kiln notify"),
        }
    }
    if let Some(c) = conn {
        c.close(kiln_net::CloseCode::Shutdown, "observer shutting down");
    }
    Ok(())
}

/// Submits what is new on `branch`: its head, or in `every` mode each commit
/// since the last one submitted (`known`, or else the dispatcher's tip).
async fn submit_branch(
    conn: &Connection,
    config: &Config,
    branch: &str,
    known: Option<CommitId>,
    head: CommitId,
) -> Result<(), SubmitError> {
    let commits = match config.mode {
        Mode::Latest { .. } => vec![head],
        Mode::Every => {
            let from = match known {
                Some(known) => Some(known),
                None => {
                    let request = Request::BranchTip { repo: repo_name(config), branch: branch.to_owned() };
                    match conn.request(&request).await?.2 {
                        Reply::Tip(tip) => tip,
                        other => return Err(SubmitError::Unexpected(other)),
                    }
                }
            };
            let repo = config.repo.clone();
            in_repo(&repo, move |store| store.commits_between(from.as_ref(), &head, MAX_CATCH_UP)).await?
        }
    };
    for commit in commits {
        if submit(conn, config, branch, commit).await? {
            info!(branch = %Escaped(branch), %commit, "submitted");
        } else {
            info!(branch = %Escaped(branch), %commit, "already known to the dispatcher");
        }
    }
    Ok(())
}

/// Says that `branch` is not in `repo`, and which branches are.
fn no_such_branch(branch: &str, repo: &str, existing: Option<&[String]>) -> String {
    let mut text = format!("there is no branch `{branch}` in {repo}");
    match existing {
        Some([]) => text.push_str(" (it has no branches yet: make its first commit)"),
        Some(names) => {
            let names: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            text.push_str(&format!(" (its branches: {}; choose one with --branch)", names.join(", ")));
        }
        None => {}
    }
    text
}

fn repo_name(config: &Config) -> String {
    config.repo.display().to_string()
}

/// Listens on `path` for `kiln notify`; each connection wakes the observer.
fn listen_for_pokes(
    path: &std::path::Path,
    poke: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<SocketGuard, ObserverError> {
    let err = |source| ObserverError::Notify { path: path.to_owned(), source };
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        let busy = std::io::Error::new(std::io::ErrorKind::AddrInUse, "another observer is listening there");
        return Err(err(busy));
    }
    // A socket file left by an observer that died; nobody answers on it.
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).map_err(err)?;
    info!(socket = %Escaped(&path.display().to_string()), "listening for kiln notify");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(_) => poke.notify_one(),
                    Err(e) => warn!("notify socket failed: {e}"),
                },
            }
        }
    });
    Ok(SocketGuard(path.to_owned()))
}

/// Removes the notify socket file when the observer stops.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Pokes the observer listening on `socket` (what `kiln notify` does).
pub fn notify(socket: &std::path::Path) -> std::io::Result<()> {
    std::os::unix::net::UnixStream::connect(socket).map(drop)
}

/// Submits one commit; returns whether the dispatcher queued it (`false`: known already).
async fn submit(conn: &Connection, config: &Config, branch: &str, head: CommitId) -> Result<bool, SubmitError> {
    let request = Request::Submit {
        repo: repo_name(config),
        branch: branch.to_owned(),
        commit: head,
        supersede: config.mode.supersede(),
    };
    let (mut send, mut recv, reply) = conn.request(&request).await?;
    match reply {
        Reply::Known => Ok(false),
        Reply::Queued => Ok(true),
        Reply::Unavailable(reason) => Err(SubmitError::Unavailable(reason)),
        Reply::SendPack { haves } => {
            let repo = config.repo.clone();
            let limits = config.git_limits;
            let pack = match in_repo(&repo, move |store| store.with_limits(limits).pack(&head, &haves)).await {
                Ok(pack) => pack,
                Err(ref e) if let kiln_git::GitErrorKind::TooLarge { detail, .. } = e.kind() => {
                    return Err(SubmitError::TooLarge(format!("commit {head} is over this observer's caps: {detail}")));
                }
                Err(e) => return Err(e.into()),
            };
            send.send_pack(&pack).await.map_err(|e| conn.request_error(e))?;
            send.finish();
            match recv.expect::<Reply>().await.map_err(|e| conn.request_error(e))? {
                Reply::Queued => Ok(true),
                // The only refusal after a pack: over the dispatcher's caps.
                Reply::Refused(reason) => Err(SubmitError::TooLarge(reason)),
                Reply::Unavailable(reason) => Err(SubmitError::Unavailable(reason)),
                other => Err(SubmitError::Unexpected(other)),
            }
        }
        other => Err(SubmitError::Unexpected(other)),
    }
}

/// Runs git work on the watched repository, opened once for it, off the
/// async threads.
async fn in_repo<T: Send + 'static>(
    repo: &std::path::Path,
    work: impl FnOnce(ObjectStore) -> Result<T, kiln_git::GitError> + Send + 'static,
) -> Result<T, kiln_git::GitError> {
    kiln_git::with_store(repo, kiln_git::Open::Existing, work).await
}
