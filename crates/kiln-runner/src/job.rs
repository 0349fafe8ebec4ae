//! One assignment, from source fetch to the last reported result.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_git::ObjectStore;
use kiln_net::{Connection, RecvStream, SendStream};
use kiln_plugin_host::{HostEvent, PluginHost};
use kiln_proto::CommitId;
use kiln_proto::error_chain;
use kiln_proto::wire::{Assignment, Control, JobEvent, Reply, Request};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
    /// The plugins.
    pub host: Arc<PluginHost>,
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
    #[error("run the plugins")]
    Plugins(#[source] kiln_plugin_host::HostError),
}

/// How the job task ended.
enum End {
    /// The tests ran (or could not run: the inner error).
    Ran(Result<Result<usize, JobError>, kiln_net::FramedError>),
    /// The dispatcher said stop.
    Cancelled(String),
    /// The runner is shutting down.
    Shutdown,
    /// The connection to the dispatcher broke.
    Lost(String),
}

/// Serves one assignment stream opened by the dispatcher.
pub(crate) async fn serve_assignment(
    ctx: Arc<JobContext>,
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    shutdown: CancellationToken,
) {
    let assignment: Assignment = match recv.expect().await {
        Ok(a) => a,
        Err(e) => {
            warn!("bad assignment from the dispatcher: {}", error_chain(&e));
            return;
        }
    };
    let Assignment { job, attempt, commit, skip_files } = assignment;
    info!(job, attempt, %commit, skip = skip_files.len(), "job started");
    let checkout = ctx.jobs_dir.join(format!("{job}-{attempt}"));
    // Dropping the job's future kills its tests: the plugin host kills each
    // command's process group when its future is dropped.
    let end = tokio::select! {
        () = shutdown.cancelled() => End::Shutdown,
        control = recv.recv::<Control>() => match control {
            Ok(Some(Control::Cancel { reason })) => End::Cancelled(reason),
            // The dispatcher ended its half early: it will say nothing more.
            Ok(None) => End::Ran(run_job(&ctx, &conn, commit, &skip_files, &checkout, &mut send).await),
            Err(e) => End::Lost(error_chain(&e)),
        },
        r = run_job(&ctx, &conn, commit, &skip_files, &checkout, &mut send) => End::Ran(r),
    };
    remove_checkout(&checkout).await;
    let last = match end {
        End::Ran(Ok(Ok(count))) => {
            info!(job, tests = count, "job finished");
            JobEvent::Finished { error: None }
        }
        End::Ran(Ok(Err(e))) => {
            warn!(job, "job failed: {}", error_chain(&e));
            JobEvent::Finished { error: Some(error_chain(&e)) }
        }
        End::Ran(Err(e)) => {
            // The stream to the dispatcher broke: nobody to tell.
            warn!(job, "lost the assignment stream: {}", error_chain(&e));
            return;
        }
        End::Lost(reason) => {
            warn!(job, "lost the dispatcher, dropping the job: {reason}");
            return;
        }
        End::Cancelled(reason) => {
            info!(job, "job cancelled: {reason}");
            JobEvent::Finished { error: Some(format!("cancelled: {reason}")) }
        }
        End::Shutdown => {
            info!(job, "handing the job back: shutting down");
            JobEvent::Abandoned { reason: "the runner is shutting down".to_owned() }
        }
    };
    if send.send(&last).await.is_ok() {
        send.finish();
        // Wait until the dispatcher has everything before letting go.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), send.stopped()).await;
    }
}

async fn remove_checkout(dir: &Path) {
    if let Err(e) = tokio::fs::remove_dir_all(dir).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        warn!(dir = %dir.display(), "cannot remove the job's checkout: {e}");
    }
}

/// Runs the job. The outer error means the assignment stream broke; the inner
/// one that the tests could not run (to be reported).
async fn run_job(
    ctx: &JobContext,
    conn: &Connection,
    commit: CommitId,
    skip_files: &[String],
    checkout: &Path,
    send: &mut SendStream,
) -> Result<Result<usize, JobError>, kiln_net::FramedError> {
    if let Err(e) = fetch(ctx, conn, commit, checkout).await {
        return Ok(Err(e));
    }
    let files = match list_test_files(checkout) {
        // Files an earlier attempt finished are stored already.
        Ok(files) => files.into_iter().filter(|f| !skip_files.contains(f)).collect::<Vec<_>>(),
        Err(e) => return Ok(Err(JobError::List(e))),
    };
    debug!(files = files.len(), "running tests");
    let (tx, mut rx) = mpsc::unbounded_channel::<HostEvent>();
    let host = Arc::clone(&ctx.host);
    let run = async move {
        let r = host.run(checkout, &files, &tx).await;
        drop(tx);
        r
    };
    let forward = async {
        let mut count = 0;
        while let Some(event) = rx.recv().await {
            match event {
                HostEvent::Test(result) => {
                    send.send(&JobEvent::Test(result)).await?;
                    count += 1;
                }
                HostEvent::FileDone(file) => send.send(&JobEvent::FileDone { file }).await?,
            }
        }
        Ok::<usize, kiln_net::FramedError>(count)
    };
    let (ran, forwarded) = tokio::join!(run, forward);
    let count = forwarded?;
    Ok(ran.map(|()| count).map_err(JobError::Plugins))
}

/// Gets `commit` into the local cache (fetching only what is missing) and checks it out.
async fn fetch(ctx: &JobContext, conn: &Connection, commit: CommitId, checkout: &Path) -> Result<(), JobError> {
    let git = |source| JobError::Git { commit, source };
    let cache = ctx.cache.clone();
    let (present, haves) = blocking(move || {
        let store = ObjectStore::open_or_init_bare(&cache)?;
        Ok((store.has_commit(&commit), store.recorded_commits(HAVES)?))
    })
    .await
    .map_err(git)?;
    if !present {
        let fetch_err = |reason: String| JobError::Fetch { commit, reason };
        let (_send, mut recv, reply) =
            conn.request(&Request::FetchSource { commit, haves }).await.map_err(|e| fetch_err(error_chain(&e)))?;
        if reply != Reply::Source {
            return Err(fetch_err(format!("unexpected reply {reply:?}")));
        }
        let pack = recv.recv_pack(ctx.max_pack_bytes).await.map_err(|e| fetch_err(error_chain(&e)))?;
        debug!(bytes = pack.len(), "source received");
        let cache = ctx.cache.clone();
        blocking(move || ObjectStore::open(&cache)?.unpack(&pack, &commit)).await.map_err(git)?;
    }
    let cache = ctx.cache.clone();
    let dest = checkout.to_owned();
    blocking(move || {
        if dest.exists() {
            // A leftover from a crashed earlier run of this very attempt.
            let _ = std::fs::remove_dir_all(&dest);
        }
        ObjectStore::open(&cache)?.checkout(&commit, &dest)
    })
    .await
    .map_err(git)
}

/// Lists the regular files under `tests/`, as sorted repository-relative `/` paths.
fn list_test_files(checkout: &Path) -> std::io::Result<Vec<String>> {
    let mut files = Vec::new();
    let mut stack = vec![checkout.join("tests")];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            // Symlinks are not followed: a checkout must not lead the runner outside it.
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(rel) = path.strip_prefix(checkout)
                && let Some(rel) = rel.to_str()
            {
                files.push(rel.replace(std::path::MAIN_SEPARATOR, "/"));
            }
        }
    }
    files.sort();
    Ok(files)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, kiln_git::GitError> + Send + 'static,
) -> Result<T, kiln_git::GitError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_files_under_tests_only_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("tests/sub")).unwrap();
        std::fs::write(root.join("tests/test_b.py"), "").unwrap();
        std::fs::write(root.join("tests/sub/test_a.py"), "").unwrap();
        std::fs::write(root.join("setup.py"), "").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("tests/escape")).unwrap();
        assert_eq!(list_test_files(root).unwrap(), vec!["tests/sub/test_a.py", "tests/test_b.py"]);
        assert!(list_test_files(&root.join("missing")).unwrap().is_empty());
    }
}
