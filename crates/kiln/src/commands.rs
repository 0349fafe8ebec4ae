//! What each subcommand does: turn flags into settings, start the library
//! pieces, and decide the exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_net::NetConfig;
use kiln_proto::wire::{Reply, Request};
use kiln_proto::{Escaped, Role};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cli::{
    CancelArgs, CertsCommand, Command, DataFormat, FlakyArgs, Format, HistoryArgs, ModeArg, ResultsArgs, RoleArg,
    RunnerArgs, RunnersArgs, StatusArgs, WatchArgs,
};
use crate::client::{admin_connect, admin_request, fetch_report, fetch_report_on, load_bundle, net, resolve_commit};
use crate::report::{ended, exit_code, render};

/// Runs one subcommand.
pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Certs(c) => certs(c),
        Command::Dispatcher(a) => {
            let bundle = load_bundle(&a.identity)?;
            // Clients would refuse an out-of-date certificate one by one; say it once, here.
            bundle.check_dates(kiln_net::validity::unix_now()).context("the dispatcher cannot start")?;
            let net = NetConfig::with_idle_timeout(a.idle_timeout);
            let listener = kiln_net::Listener::bind(&bundle, a.listen, net)
                .with_context(|| format!("cannot listen on {}", a.listen))?;
            let addr = listener.local_addr().context("cannot read the bound address")?;
            // Bound before anything starts, so a refused address stops here.
            let http = match a.http {
                Some(http) => {
                    // HTTPS uses the bundle QUIC uses: the same certificate, CA and rules.
                    let tls = if a.https {
                        Some(kiln_net::HttpsAcceptor::new(&bundle).context("the dashboard cannot serve HTTPS")?)
                    } else {
                        None
                    };
                    Some(kiln_web::bind(http, tls).await?)
                }
                None => None,
            };
            // The address goes on stdout, once, for scripts and tests that listen on
            // port 0 (`kiln demo` and the e2e harness read it); the log says the rest.
            outln!("listening {addr}");
            if let Some(http) = &http {
                outln!("http {}", http.url().context("cannot read the dashboard's address")?);
            }
            info!(state = %Escaped(&a.state.display().to_string()), "dispatcher started");
            for (repo, observer) in &a.repo_owners {
                info!(repo = %Escaped(repo), observer = %Escaped(observer), "repository owner set by --repo-owner");
            }
            let config = kiln_dispatcher::Config {
                state_dir: a.state.clone(),
                max_pack_bytes: a.max_pack_mib.saturating_mul(1 << 20),
                git_limits: a.git_limits.limits(),
                job_timeout: a.job_timeout,
                resume_grace: a.resume_grace,
                repo_owners: a.repo_owners.clone(),
                retry_failed: a.retry_failed,
            };
            let shutdown = shutdown_on_signal();
            let mut web = None;
            let serving =
                kiln_dispatcher::Dispatcher::run_with_reader(listener, config, shutdown.clone(), |api, actions| {
                    if let Some(http) = http {
                        web = Some(tokio::spawn(kiln_web::serve(http, api, Some(actions), shutdown.clone())));
                    }
                })
                .await;
            if let Some(web) = web {
                // The dispatcher returns once shutdown began; the dashboard stops on the same token.
                shutdown.cancel();
                match web.await {
                    Ok(Err(e)) => tracing::warn!("the dashboard stopped: {e}"),
                    Err(e) => tracing::warn!("the dashboard stopped: {e}"),
                    Ok(Ok(())) => {}
                }
            }
            serving.with_context(|| format!("the dispatcher cannot use its state directory {}", a.state.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Observer(a) => {
            let bundle = load_bundle(&a.client.identity)?;
            let config = kiln_observer::Config {
                dispatcher: a.client.dispatcher.clone(),
                repo: a.repo.clone(),
                branches: a.branches,
                interval: a.interval,
                net: net(&a.client),
                mode: match a.mode {
                    ModeArg::Latest => kiln_observer::Mode::Latest { cancel_running: !a.keep_running },
                    ModeArg::Every => kiln_observer::Mode::Every,
                },
                git_limits: a.git_limits.limits(),
                notify_socket: Some(a.notify_socket.unwrap_or_else(|| kiln_observer::default_notify_socket(&a.repo))),
            };
            kiln_observer::run(bundle, config, shutdown_on_signal()).await.map_err(anyhow::Error::from)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Runner(a) => runner(a).await,
        Command::Results(a) => results(a).await,
        Command::Watch(a) => watch(a).await,
        Command::History(a) => history(a).await,
        Command::Flaky(a) => flaky(a).await,
        Command::Status(a) => status(a).await,
        Command::Runners(a) => runners(a).await,
        Command::Cancel(a) => cancel(a).await,
        Command::Notify(a) => {
            if a.socket.is_none() && kiln_git::ObjectStore::open(&a.repo).is_err() {
                bail!(
                    "{} is not a git repository: pass the repository `kiln observer --repo` watches as --repo, or \
                     its socket as --socket",
                    a.repo.display()
                );
            }
            let socket = a.socket.unwrap_or_else(|| kiln_observer::default_notify_socket(&a.repo));
            kiln_observer::notify(&socket).with_context(|| {
                format!(
                    "no observer is listening on {} (is `kiln observer` running for this repository?)",
                    socket.display()
                )
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(a) => crate::demo::run(a).await,
        Command::Plugin(c) => crate::plugin::run(c).await,
    }
}

fn certs(command: CertsCommand) -> anyhow::Result<ExitCode> {
    use kiln_net::certs::Validity;
    match command {
        CertsCommand::Init { dir, sans, valid_days } => {
            kiln_net::certs::init_with(&dir, &sans, Validity::days(valid_days))
                .context("cannot create the certificate authority")?;
            outln!("created the certificate authority in {}", dir.join("ca").display());
            outln!("created the dispatcher's bundle in {} (for {})", dir.join("dispatcher").display(), sans.join(", "));
        }
        CertsCommand::Issue { role, name, dir, valid_days } => {
            let role = match role {
                RoleArg::Runner => Role::Runner,
                RoleArg::Observer => Role::Observer,
                RoleArg::Admin => Role::Admin,
            };
            let bundle = kiln_net::certs::issue_with(&dir, role, &name, Validity::days(valid_days))
                .with_context(|| format!("cannot issue {} {role} certificate for `{name}`", article(role)))?;
            outln!(
                "issued {} {role} bundle in {} (copy this directory to the {role}'s machine)",
                article(role),
                bundle.display()
            );
        }
        CertsCommand::Dispatcher { dir, sans, valid_days } => {
            let bundle = kiln_net::certs::issue_dispatcher(&dir, &sans, Validity::days(valid_days))
                .context("cannot issue a dispatcher certificate")?;
            outln!("issued the dispatcher's bundle in {} (for {})", bundle.display(), sans.join(", "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `a runner`, `an observer`, `an admin`.
fn article(role: Role) -> &'static str {
    if role.to_string().starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" }
}

async fn runner(a: RunnerArgs) -> anyhow::Result<ExitCode> {
    // Before anything can start a command or probe the sandbox.
    kiln_sandbox::use_sandbox_id(a.sandbox_id).context("invalid --sandbox-id")?;
    let bundle = load_bundle(&a.client.identity)?;
    let names: Vec<&str> = a.allow_programs.iter().map(String::as_str).collect();
    let programs = kiln_plugin_host::Policy::resolve_programs(&names).context("cannot resolve the allowed programs")?;
    for (name, path) in &programs {
        info!(program = %Escaped(name), path = %Escaped(&path.display().to_string()), "allowed program");
    }
    // Tests must never see the runner's key, its cache or other jobs.
    let hidden = vec![a.work.clone(), a.client.identity.clone()];
    let python = programs.get("python3").cloned();
    // The runner's python3 with its exact version (for batches without a
    // matrix), and the interpreters it offers the matrix.
    let default_python = match &python {
        Some(path) => Some(
            kiln_runner::python::probe(path)
                .await
                .map_err(|why| anyhow::anyhow!("python3 ({}) cannot say its version: {why}", path.display()))?,
        ),
        None => None,
    };
    let pythons = if a.pythons.is_empty() {
        default_python.iter().cloned().collect()
    } else {
        kiln_runner::python::find(&a.pythons).await?
    };
    for i in &pythons {
        info!(version = %i.version, path = %Escaped(&i.path.display().to_string()), "python interpreter");
    }
    if pythons.is_empty() {
        info!("no python interpreter: commits whose kiln.toml lists [python] versions are not run here");
    }
    let uv = find_uv(a.uv.as_deref(), python.as_deref())?;
    match &uv {
        Some(uv) => info!(path = %Escaped(&uv.display().to_string()), "uv installs repository environments"),
        None => info!("no uv found: commits whose kiln.toml installs packages end as `error` here"),
    }
    if let Some(links) = &a.find_links
        && !links.is_dir()
    {
        anyhow::bail!("--find-links {}: not a directory", links.display());
    }
    let envs = kiln_runner::EnvSettings {
        index_url: a.index_url.clone(),
        find_links: a.find_links.as_deref().map(std::fs::canonicalize).transpose().context("--find-links")?,
        cache_size: a.env_cache_size as usize,
        uv,
        timeout: a.command_timeout,
    };
    let policy = kiln_plugin_host::Policy::runner(programs, a.command_timeout, hidden.clone());
    // Compiled plugins are kept between runs: a restart compiles nothing.
    let mut host = kiln_plugin_host::PluginHost::with_cache(policy, &a.work.join("plugin-cache"))
        .context("cannot start the plugin host")?;
    if let Some(dir) = &a.plugins {
        let entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot read the plugins directory {}", dir.display()))?;
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .collect();
        paths.sort();
        for path in paths {
            host.load_file(&path).with_context(|| format!("cannot load the plugin {}", path.display()))?;
        }
    }
    // The plugin host logs `plugin loaded` for each plugin, with its contract and compile time.
    // Say at start-up what the process sandbox can and cannot do here.
    let sandbox = kiln_sandbox::probe();
    for m in sandbox.mechanisms() {
        if m.coverage == kiln_sandbox::Coverage::Full {
            info!(mechanism = %m.mechanism, "sandbox: {}", m.detail);
        } else {
            tracing::warn!(mechanism = %m.mechanism, coverage = ?m.coverage, "sandbox weaker than designed: {}", m.detail);
        }
    }
    let config = kiln_runner::Config {
        sandbox_gaps: sandbox.degraded().map(ToString::to_string).collect(),
        dispatcher: a.client.dispatcher.clone(),
        work_dir: a.work.clone(),
        slots: a.slots.unwrap_or_else(kiln_runner::usable_cpus),
        max_pack_bytes: 1 << 30,
        git_limits: a.git_limits.limits(),
        net: net(&a.client),
        max_file_timeout: a.max_file_timeout,
        envs,
        hidden,
        pythons,
        default_python,
    };
    kiln_runner::run(bundle, config, Arc::new(host), shutdown_on_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn results(a: ResultsArgs) -> anyhow::Result<ExitCode> {
    let bundle = load_bundle(&a.client.identity)?;
    let commit = match &a.commit {
        Some(typed) => Some(resolve_commit(&bundle, &a.client, typed).await?),
        None => None,
    };
    let deadline = a.wait.map(|w| tokio::time::Instant::now() + w);
    // One connection for all the polls of `--wait`, not one (logged by the dispatcher) per poll.
    let conn = admin_connect(&bundle, &a.client).await?;
    let report = async {
        loop {
            let report = fetch_report_on(&conn, &a.client, commit).await?;
            let done = report.as_ref().is_some_and(|r| r.status.is_final());
            match deadline {
                Some(deadline) if !done && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                _ => break anyhow::Ok(report),
            }
        }
    }
    .await;
    conn.close(kiln_net::CloseCode::Shutdown, "done");
    let report = report?;
    let Some(report) = report else {
        match commit {
            Some(c) => bail!("the dispatcher knows no commit {c}"),
            None => bail!("the dispatcher has no commits yet"),
        }
    };
    match a.format {
        Format::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
        Format::Text => out!("{}", render(&report, a.verbose)),
        Format::Junit => out!("{}", kiln_proto::junit(&format!("kiln {}", report.commit), &report.tests)),
    }
    Ok(exit_code(report.status))
}

/// `kiln watch`: polls the commit's report, drawing a progress line while
/// stdout is a terminal (nothing otherwise), then prints the results.
async fn watch(a: WatchArgs) -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    let bundle = load_bundle(&a.client.identity)?;
    let commit = match &a.commit {
        Some(typed) => resolve_commit(&bundle, &a.client, typed).await?,
        None => match fetch_report(&bundle, &a.client, None).await? {
            Some(report) => report.commit,
            None => bail!("the dispatcher has no commits yet"),
        },
    };
    let live = std::io::stdout().is_terminal();
    let conn = admin_connect(&bundle, &a.client).await?;
    let report = async {
        loop {
            let Some(report) = fetch_report_on(&conn, &a.client, Some(commit)).await? else {
                bail!("the dispatcher knows no commit {commit}");
            };
            if report.status.is_final() {
                break anyhow::Ok(report);
            }
            if live {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let elapsed = Duration::from_millis((now.as_millis() as u64).saturating_sub(report.queued_at_ms));
                // `\r` and erase-line redraw the one line; nothing of it is outside input but the numbers.
                out!("\r\x1b[2K{}", crate::report::progress(&report, elapsed));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    .await;
    conn.close(kiln_net::CloseCode::Shutdown, "done");
    if live {
        out!("\r\x1b[2K");
    }
    let report = report?;
    out!("{}", render(&report, a.verbose));
    Ok(exit_code(report.status))
}

async fn history(a: HistoryArgs) -> anyhow::Result<ExitCode> {
    let bundle = load_bundle(&a.client.identity)?;
    let request = Request::History { test: a.test.clone(), repo: a.repo.clone(), limit: a.limit };
    let what = || format!("get the history of a test from {}", a.client.dispatcher);
    let Reply::History(runs) = admin_request(&bundle, &a.client, &request, what).await? else {
        bail!("unexpected reply from the dispatcher");
    };
    match a.format {
        DataFormat::Json => outln!("{}", serde_json::to_string_pretty(&runs)?),
        DataFormat::Text => out!("{}", crate::report::render_history(&a.test, &runs)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn flaky(a: FlakyArgs) -> anyhow::Result<ExitCode> {
    let bundle = load_bundle(&a.client.identity)?;
    let what = || format!("list flaky tests at {}", a.client.dispatcher);
    let Reply::Flaky(tests) = admin_request(&bundle, &a.client, &Request::Flaky { days: a.days }, what).await? else {
        bail!("unexpected reply from the dispatcher");
    };
    match a.format {
        DataFormat::Json => outln!("{}", serde_json::to_string_pretty(&tests)?),
        DataFormat::Text => out!("{}", crate::report::render_flaky(&tests, a.days)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the dispatcher for its status, with the newest `commits` commits.
async fn fetch_status(client: &crate::cli::ClientArgs, commits: u32) -> anyhow::Result<kiln_proto::Status> {
    let bundle = load_bundle(&client.identity)?;
    let what = || format!("get the status of the dispatcher at {}", client.dispatcher);
    match admin_request(&bundle, client, &Request::Status { commits }, what).await? {
        Reply::Status(status) => Ok(*status),
        other => bail!("unexpected reply from the dispatcher: {other:?}"),
    }
}

async fn status(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let status = fetch_status(&a.client, a.commits).await?;
    match a.format {
        DataFormat::Json => outln!("{}", serde_json::to_string_pretty(&status)?),
        DataFormat::Text => out!("{}", crate::report::render_status(&status)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn runners(a: RunnersArgs) -> anyhow::Result<ExitCode> {
    // The runners are the status's; no commits are needed.
    let status = fetch_status(&a.client, 0).await?;
    match a.format {
        DataFormat::Json => {
            let runners = serde_json::json!({
                "at_ms": status.at_ms,
                "runners_total": status.runners_total,
                "slots_total": status.slots_total,
                "slots_busy": status.slots_busy,
                "runners": status.runners,
            });
            outln!("{}", serde_json::to_string_pretty(&runners)?);
        }
        DataFormat::Text => out!("{}", crate::report::render_runners(&status)),
    }
    Ok(ExitCode::SUCCESS)
}

async fn cancel(a: CancelArgs) -> anyhow::Result<ExitCode> {
    let bundle = load_bundle(&a.client.identity)?;
    let commit = resolve_commit(&bundle, &a.client, &a.commit).await?;
    match admin_request(&bundle, &a.client, &Request::Cancel { commit }, || format!("cancel {commit}")).await? {
        Reply::Cancelled(true) => outln!("cancelled {commit}"),
        Reply::Cancelled(false) => match fetch_report(&bundle, &a.client, Some(commit)).await? {
            Some(report) if report.status.is_final() => {
                outln!("{commit} had already ended: {}; nothing to cancel", ended(&report));
            }
            _ => outln!("{commit} was not queued or running; nothing to cancel"),
        },
        other => bail!("unexpected reply from the dispatcher: {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
            tracing::warn!("cannot install signal handlers; stop with SIGKILL");
            return;
        };
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received, shutting down"),
            _ = int.recv() => info!("SIGINT received, shutting down"),
        }
        t.cancel();
    });
    token
}

/// The `uv` that builds environments: `--uv`, else the one installed beside
/// the runner's `python3` (`pip install uv` puts it there, and a pyenv shim
/// on PATH would need the runner's environment), else `uv` on PATH.
fn find_uv(given: Option<&std::path::Path>, python: Option<&std::path::Path>) -> anyhow::Result<Option<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if let Some(path) = given {
        let path = std::fs::canonicalize(path).with_context(|| format!("--uv {}", path.display()))?;
        anyhow::ensure!(executable(&path), "--uv {}: not an executable file", path.display());
        return Ok(Some(path));
    }
    if let Some(beside) = python.and_then(|p| p.parent()).map(|bin| bin.join("uv"))
        && executable(&beside)
    {
        return Ok(Some(std::fs::canonicalize(&beside).unwrap_or(beside)));
    }
    let search = std::env::var_os("PATH").unwrap_or_default();
    Ok(std::env::split_paths(&search)
        .map(|dir| dir.join("uv"))
        .filter(|p| p.is_absolute() && executable(p) && !p.to_string_lossy().contains("/shims/"))
        .find_map(|p| std::fs::canonicalize(p).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_get_their_article() {
        assert_eq!([Role::Runner, Role::Observer, Role::Admin].map(article), ["a", "an", "an"]);
    }
}
