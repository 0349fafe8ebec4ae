//! The Kiln runner: dials out to the dispatcher, registers, and runs each
//! assignment it is given.
//!
//! For each job it fetches the commit's source from the dispatcher over the
//! same connection (a pack of only the objects its local cache lacks), checks
//! it out into a fresh directory, lists the files under `tests/`, runs them
//! through the executor plugins, and streams each test's result back as soon
//! as the plugin reports it. A runner needs only the dispatcher's address and
//! its certificate bundle: no shared filesystem, no access to the git host.

mod env;
mod job;
pub mod python;
mod session;

pub use env::EnvSettings;
pub use python::Interpreter;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_net::{Backoff, Bundle, Connection, NetConfig, RequestError};
use kiln_plugin_host::PluginHost;
use kiln_proto::wire::{NameInUse, Registration, Reply, Request};
use kiln_proto::{Escaped, error_chain};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

/// The runner's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The dispatcher's `HOST:PORT`.
    pub dispatcher: String,
    /// Where the object cache and job checkouts live.
    pub work_dir: PathBuf,
    /// How many test files to run at once, across all jobs.
    pub slots: u32,
    /// The largest source pack accepted.
    pub max_pack_bytes: u64,
    /// Caps on the uncompressed source: per file, per checkout, per pack.
    pub git_limits: kiln_git::Limits,
    /// Transport settings.
    pub net: NetConfig,
    /// What the process sandbox lacks on this machine, reported to the
    /// dispatcher so every result it runs says so.
    pub sandbox_gaps: Vec<String>,
    /// The longest per-file time limit a repository's `[limits]
    /// file-timeout` may ask for (`--max-file-timeout`).
    pub max_file_timeout: Duration,
    /// How repositories' environments are built and kept.
    pub envs: EnvSettings,
    /// Directories no command may see (the work directory, the identity).
    pub hidden: Vec<PathBuf>,
    /// The Python interpreters this runner has (`--python`), reported at
    /// registration: a batch for Python 3.12 runs with the first 3.12 here.
    pub pythons: Vec<Interpreter>,
    /// The runner's own `python3` (the allowed program), with its exact
    /// version: what a batch without a version runs with.
    pub default_python: Option<Interpreter>,
}

/// What a repository's configuration changes about running its tests, for
/// a runner and for `kiln plugin run` alike: `[python] paths` on
/// `sys.path` (as `PYTHONPATH`, relative entries that the interpreter
/// makes absolute against the checkout, where plugins start it), `[env]`,
/// and `[limits] file-timeout` bounded by `max_file_timeout`, with the
/// warning to give when it is cut. The configuration is checked first
/// ([`RepoConfig::check`]): nothing runs from one that fails.
pub fn run_settings(
    config: &kiln_proto::RepoConfig,
    max_file_timeout: Duration,
) -> Result<(kiln_plugin_host::RunSettings, Option<String>), String> {
    config.check()?;
    let mut env: Vec<(String, String)> = config.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    if !config.paths.is_empty() {
        env.push(("PYTHONPATH".to_owned(), config.paths.join(":")));
    }
    let mut warning = None;
    let file_timeout = config.file_timeout().map(|asked| {
        if asked > max_file_timeout {
            warning = Some(format!(
                "{} asks for a file-timeout of {}; this runner allows at most {} (--max-file-timeout), so files \
                 ran with that",
                config.source,
                humantime::format_duration(asked),
                humantime::format_duration(max_file_timeout)
            ));
        }
        asked.min(max_file_timeout)
    });
    Ok((kiln_plugin_host::RunSettings { file_timeout, env, programs: Default::default() }, warning))
}

/// How many CPUs this process may use: its CPU affinity and its cgroup's CPU
/// quota, as the standard library reads them (at least 1). The default for
/// `slots`.
pub fn usable_cpus() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

/// Why the runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The bundle is not a runner's.
    #[error("the certificate in {0} is not a runner certificate (issue one with `kiln certs issue runner NAME`)")]
    NotRunner(PathBuf),
    /// The work directory is unusable.
    #[error("prepare the work directory {path}")]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The dispatcher refused this runner.
    #[error("the dispatcher refused this runner: {0}")]
    Refused(String),
    /// The dispatcher refused this runner's certificate.
    #[error("{0}")]
    Rejected(String),
}

/// Serves the dispatcher until `shutdown` is cancelled, reconnecting with
/// back-off whenever the connection is lost.
pub async fn run(
    bundle: Bundle,
    config: Config,
    host: Arc<PluginHost>,
    shutdown: CancellationToken,
) -> Result<(), RunnerError> {
    if bundle.identity().is_none_or(|id| id.role != kiln_proto::Role::Runner) {
        return Err(RunnerError::NotRunner(bundle.dir.clone()));
    }
    for dir in [config.work_dir.clone(), config.work_dir.join("jobs"), config.work_dir.join("envs")] {
        // Made private from the start, so only an older, looser one is logged.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&dir)
            .map_err(|source| RunnerError::WorkDir { path: dir.clone(), source })?;
    }
    // Checkouts and the object cache are nobody else's business.
    make_private(&config.work_dir).map_err(|source| RunnerError::WorkDir { path: config.work_dir.clone(), source })?;
    // Absolute: commands see an environment at the path it was built at.
    let envs_dir = config.work_dir.join("envs");
    let envs_dir =
        std::fs::canonicalize(&envs_dir).map_err(|source| RunnerError::WorkDir { path: envs_dir, source })?;
    let ctx = Arc::new(job::JobContext {
        cache: config.work_dir.join("cache.git"),
        jobs_dir: config.work_dir.join("jobs"),
        max_pack_bytes: config.max_pack_bytes,
        git_limits: config.git_limits,
        host,
        max_file_timeout: config.max_file_timeout,
        envs: env::Envs::new(envs_dir, config.envs.clone(), config.hidden.clone()),
        pythons: config.pythons.clone(),
        default_python: config.default_python.clone(),
        slots: job::Slots::new(config.slots),
        jobs: std::sync::Mutex::new(std::collections::HashMap::new()),
        fetching: tokio::sync::Mutex::new(()),
        sessions: Arc::default(),
    });
    let tasks = TaskTracker::new();
    let mut backoff = Backoff::default();
    let mut net = config.net;
    while !shutdown.is_cancelled() {
        let conn = tokio::select! {
            () = shutdown.cancelled() => break,
            conn = connect_and_register(&bundle, &config, net, &ctx) => conn,
        };
        match conn {
            Ok((conn, _control)) => {
                backoff.reset();
                serve(&conn, &ctx, &tasks, &shutdown).await;
                if shutdown.is_cancelled() {
                    // Let running jobs hand their work back before the connection goes.
                    tasks.close();
                    let _ = tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await;
                }
                conn.close(kiln_net::CloseCode::Shutdown, "runner shutting down");
            }
            Err(RegisterError::SparseKeepAlive(theirs)) => {
                // Keep-alives are set when connecting: connect again, at once.
                net.keep_alive = theirs / 3;
                info!(
                    "the dispatcher's idle timeout is {theirs:?}, shorter than this runner's keep-alives allow: \
                     reconnecting with a keep-alive every {:?}",
                    net.keep_alive
                );
            }
            Err(RegisterError::Request(RequestError::Refused(reason))) => return Err(RunnerError::Refused(reason)),
            // Retrying with a certificate the dispatcher refuses cannot help.
            Err(RegisterError::Request(RequestError::Rejected(reason))) => return Err(RunnerError::Rejected(reason)),
            Err(RegisterError::NameInUse(clash)) => {
                // Another runner with this certificate is connected. Back off
                // (growing, with jitter) rather than fight it for the name; it
                // becomes ours once that connection is gone.
                let delay = backoff.next_delay();
                let held_for = Duration::from_secs(now_ms().saturating_sub(clash.since_unix_ms) / 1000);
                warn!(
                    name = %Escaped(&clash.name),
                    holder = %Escaped(&clash.address),
                    "the dispatcher refused this runner: the name is registered by another connection from {} \
                     (for {held_for:?}); is another runner using this certificate? retrying in {delay:.1?}",
                    Escaped(&clash.address),
                );
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(RegisterError::Request(e)) => {
                let delay = backoff.next_delay();
                warn!(
                    "cannot register with the dispatcher at {}: {}; retrying in {delay:.1?}",
                    Escaped(&config.dispatcher),
                    Escaped(&error_chain(&e))
                );
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// Why registering failed.
#[derive(Debug)]
enum RegisterError {
    /// The connection or the request failed.
    Request(RequestError),
    /// Another connection holds this runner's name.
    NameInUse(NameInUse),
    /// The dispatcher's idle timeout (this) is shorter than three of this
    /// connection's keep-alive intervals.
    SparseKeepAlive(Duration),
}

impl From<RequestError> for RegisterError {
    fn from(e: RequestError) -> Self {
        RegisterError::Request(e)
    }
}

impl From<kiln_net::EndpointError> for RegisterError {
    fn from(e: kiln_net::EndpointError) -> Self {
        RegisterError::Request(e.into())
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Sets the work directory's mode to `0700`, saying so if it was looser.
fn make_private(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let old = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    if old != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        info!(dir = %Escaped(&dir.display().to_string()), old = format!("{old:04o}"), "work directory made private (0700)");
    }
    Ok(())
}

/// Connects and registers; returns the connection and the control stream's
/// send half, which must live as long as the connection.
async fn connect_and_register(
    bundle: &Bundle,
    config: &Config,
    net: NetConfig,
    ctx: &job::JobContext,
) -> Result<(Connection, kiln_net::SendStream), RegisterError> {
    let conn = kiln_net::connect(bundle, &config.dispatcher, net).await?;
    let held = ctx.held();
    let (send, _recv, reply) = conn
        .request(&Request::Register(Registration {
            slots: config.slots,
            held: held.clone(),
            sandbox_gaps: config.sandbox_gaps.clone(),
            pythons: config.pythons.iter().map(|i| i.version.clone()).collect(),
        }))
        .await?;
    match reply {
        Reply::Registered { idle_timeout_ms } => {
            let theirs = Duration::from_millis(idle_timeout_ms);
            if net.keep_alive * 3 > theirs && !theirs.is_zero() {
                conn.close(kiln_net::CloseCode::Shutdown, "reconnecting with more frequent keep-alives");
                return Err(RegisterError::SparseKeepAlive(theirs));
            }
        }
        Reply::NameInUse(clash) => {
            conn.close(kiln_net::CloseCode::Shutdown, "the runner name is in use");
            return Err(RegisterError::NameInUse(clash));
        }
        other => {
            let unexpected = format!("unexpected reply to registration: {other:?}");
            return Err(RegisterError::Request(RequestError::Connection(unexpected)));
        }
    }
    info!(dispatcher = %Escaped(&config.dispatcher), slots = config.slots, held = held.len(), "registered");
    // Jobs that kept running while the dispatcher was out of reach: carry on
    // reporting them if their leases are still ours, else drop them.
    for h in held {
        match conn.request(&Request::Resume(h)).await {
            Ok((send, recv, Reply::Resumed)) => ctx.relink(h.job, job::Relink::Stream(send, recv)),
            Ok((_, _, other)) => ctx.relink(h.job, job::Relink::Drop(format!("unexpected reply {other:?}"))),
            Err(RequestError::Refused(reason)) => ctx.relink(h.job, job::Relink::Drop(reason)),
            Err(e) => warn!(job = h.job, "cannot resume the job yet: {}", Escaped(&error_chain(&e))),
        }
    }
    Ok((conn, send))
}

/// Takes assignments from one connection until it closes or shutdown.
async fn serve(conn: &Connection, ctx: &Arc<job::JobContext>, tasks: &TaskTracker, shutdown: &CancellationToken) {
    loop {
        let stream = tokio::select! {
            () = shutdown.cancelled() => return,
            stream = conn.accept() => stream,
        };
        match stream {
            Ok((send, recv)) => {
                let (ctx, conn, shutdown) = (Arc::clone(ctx), conn.clone(), shutdown.clone());
                tasks.spawn(async move {
                    job::serve_assignment(ctx, conn, send, recv, shutdown).instrument(info_span!("assignment")).await
                });
            }
            Err(e) => {
                warn!("lost the dispatcher: {}", Escaped(&e.to_string()));
                return;
            }
        }
    }
}
