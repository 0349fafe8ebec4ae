//! The Kiln observer: polls a git repository's branches and tells the
//! dispatcher about each branch's newest commit, sending along a git pack of
//! the objects the dispatcher's mirror lacks.
//!
//! Like the original design it tests the newest commit seen in each polling
//! period. Submissions are idempotent at the dispatcher, so a restarted
//! observer simply submits the current heads again and nothing is queued
//! twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use kiln_git::ObjectStore;
use kiln_net::{Backoff, Bundle, Connection, NetConfig, RequestError};
use kiln_proto::wire::{Reply, Request};
use kiln_proto::{CommitId, error_chain};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The observer's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The dispatcher's `HOST:PORT`.
    pub dispatcher: String,
    /// The repository to watch (a local path).
    pub repo: PathBuf,
    /// The branches to watch.
    pub branches: Vec<String>,
    /// How often to look.
    pub interval: Duration,
    /// Transport settings.
    pub net: NetConfig,
}

/// Why the observer stopped.
#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    /// The repository cannot be opened.
    #[error("open the repository to watch")]
    Repo(#[source] kiln_git::GitError),
    /// The bundle is not an observer's.
    #[error("the certificate in {0} is not an observer certificate (issue one with `kiln certs issue observer NAME`)")]
    NotObserver(PathBuf),
    /// The dispatcher refused this observer.
    #[error("the dispatcher refused this observer: {0}")]
    Refused(String),
    /// The dispatcher refused this observer's certificate.
    #[error("{0}")]
    Rejected(String),
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
}

/// Watches the repository until `shutdown` is cancelled.
pub async fn run(bundle: Bundle, config: Config, shutdown: CancellationToken) -> Result<(), ObserverError> {
    if bundle.identity().is_none_or(|id| id.role != kiln_proto::Role::Observer) {
        return Err(ObserverError::NotObserver(bundle.dir.clone()));
    }
    // Fail at once, with a clear message, if the repository is not there.
    let repo = config.repo.clone();
    blocking(move || ObjectStore::open(&repo).map(drop)).await.map_err(ObserverError::Repo)?;
    info!(repo = %config.repo.display(), branches = ?config.branches, interval = ?config.interval, "watching");

    let mut submitted: HashMap<String, CommitId> = HashMap::new();
    let mut conn: Option<Connection> = None;
    let mut backoff = Backoff::default();
    loop {
        let mut failed = false;
        for branch in &config.branches {
            let repo = config.repo.clone();
            let name = branch.clone();
            let head = match blocking(move || ObjectStore::open(&repo)?.branch_head(&name)).await {
                Ok(head) => head,
                Err(e) => {
                    warn!(%branch, "cannot read the branch: {}", error_chain(&e));
                    continue;
                }
            };
            if submitted.get(branch) == Some(&head) {
                continue;
            }
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
                        warn!("cannot reach the dispatcher: {}", error_chain(&e));
                        failed = true;
                        break;
                    }
                },
            };
            match submit(&c, &config, branch, head).await {
                Ok(queued) => {
                    if queued {
                        info!(%branch, commit = %head, "submitted");
                    } else {
                        info!(%branch, commit = %head, "already known to the dispatcher");
                    }
                    submitted.insert(branch.clone(), head);
                }
                Err(SubmitError::Request(RequestError::Refused(reason))) => return Err(ObserverError::Refused(reason)),
                Err(SubmitError::Request(RequestError::Rejected(reason))) => {
                    return Err(ObserverError::Rejected(reason));
                }
                Err(e) => {
                    warn!(%branch, commit = %head, "submission failed: {}", error_chain(&e));
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
        }
    }
    if let Some(c) = conn {
        c.close(kiln_net::CloseCode::Shutdown, "observer shutting down");
    }
    Ok(())
}

/// Submits `head`; returns whether the dispatcher queued it (`false`: known already).
async fn submit(conn: &Connection, config: &Config, branch: &str, head: CommitId) -> Result<bool, SubmitError> {
    let request = Request::Submit { repo: config.repo.display().to_string(), branch: branch.to_owned(), commit: head };
    let (mut send, mut recv, reply) = conn.request(&request).await?;
    match reply {
        Reply::Known => Ok(false),
        Reply::Queued => Ok(true),
        Reply::SendPack { haves } => {
            let repo = config.repo.clone();
            let pack = blocking(move || ObjectStore::open(&repo)?.pack(&head, &haves)).await?;
            send.send_pack(&pack).await.map_err(|e| conn.request_error(e))?;
            send.finish();
            match recv.expect::<Reply>().await.map_err(|e| conn.request_error(e))? {
                Reply::Queued => Ok(true),
                Reply::Refused(reason) => Err(RequestError::Refused(reason).into()),
                other => Err(SubmitError::Unexpected(other)),
            }
        }
        other => Err(SubmitError::Unexpected(other)),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, kiln_git::GitError> + Send + 'static,
) -> Result<T, kiln_git::GitError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        // The closure does not panic; if it ever did, surface it loudly.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
