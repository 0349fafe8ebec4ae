//! What each subcommand does: turn flags into settings, start the library
//! pieces, and decide the exit code.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_net::{Bundle, NetConfig, RequestError};
use kiln_proto::wire::{Reply, Request};
use kiln_proto::{CommitId, CommitPrefix, CommitReport, CommitStatus, Escaped, Outcome, Role};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cli::{CancelArgs, CertsCommand, ClientArgs, Command, Format, ModeArg, ResultsArgs, RoleArg, RunnerArgs};

/// Runs one subcommand.
pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Certs(c) => certs(c),
        Command::Dispatcher(a) => {
            let bundle = load_bundle(&a.identity)?;
            // Clients would refuse an out-of-date certificate one by one; say it once, here.
            bundle.check_dates(kiln_net::validity::unix_now()).context("the dispatcher cannot start")?;
            let net = NetConfig { idle_timeout: a.idle_timeout, ..NetConfig::default() };
            let listener = kiln_net::Listener::bind(&bundle, a.listen, net)
                .with_context(|| format!("cannot listen on {}", a.listen))?;
            let addr = listener.local_addr().context("cannot read the bound address")?;
            // The address goes on stdout, once, for scripts and tests that listen on
            // port 0 (`kiln demo` and the e2e harness read it); the log says the rest.
            outln!("listening {addr}");
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
            };
            kiln_dispatcher::Dispatcher::run(listener, config, shutdown_on_signal())
                .await
                .with_context(|| format!("the dispatcher cannot use its state directory {}", a.state.display()))?;
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

fn load_bundle(dir: &std::path::Path) -> anyhow::Result<Bundle> {
    Bundle::load(dir).with_context(|| {
        format!(
            "cannot load the certificate bundle in {} (make one with `kiln certs init` or `kiln certs issue`)",
            dir.display()
        )
    })
}

fn net(client: &ClientArgs) -> NetConfig {
    NetConfig { idle_timeout: client.idle_timeout, ..NetConfig::default() }
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
    let policy = kiln_plugin_host::Policy::runner(programs, a.command_timeout, hidden);
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
    };
    kiln_runner::run(bundle, config, Arc::new(host), shutdown_on_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Sends one admin request and returns the dispatcher's reply; `what` names
/// the request for an error ("get results from …").
async fn admin_request(
    bundle: &Bundle,
    client: &ClientArgs,
    request: &Request,
    what: impl FnOnce() -> String,
) -> anyhow::Result<Reply> {
    let conn = admin_connect(bundle, client).await?;
    let reply = admin_call(&conn, request, what).await;
    conn.close(kiln_net::CloseCode::Shutdown, "done");
    reply
}

/// Sends one request on an admin connection the caller keeps open.
async fn admin_call(
    conn: &kiln_net::Connection,
    request: &Request,
    what: impl FnOnce() -> String,
) -> anyhow::Result<Reply> {
    match conn.request(request).await {
        Ok((_, _, reply)) => Ok(reply),
        Err(RequestError::Refused(reason)) => bail!("the dispatcher refused: {reason}"),
        // A refused certificate reads the same whether it showed at the handshake or here.
        Err(RequestError::Rejected(reason)) => bail!("{reason}"),
        Err(e) => Err(anyhow::Error::from(e).context(format!("cannot {}", what()))),
    }
}

/// Fetches a commit's report as an admin.
async fn fetch_report(
    bundle: &Bundle,
    client: &ClientArgs,
    commit: Option<CommitId>,
) -> anyhow::Result<Option<CommitReport>> {
    let conn = admin_connect(bundle, client).await?;
    let report = fetch_report_on(&conn, client, commit).await;
    conn.close(kiln_net::CloseCode::Shutdown, "done");
    report
}

/// Fetches a commit's report on an admin connection the caller keeps open,
/// so that a caller who asks again and again (the demo, waiting) does not
/// make the dispatcher log a connection for every question.
pub async fn fetch_report_on(
    conn: &kiln_net::Connection,
    client: &ClientArgs,
    commit: Option<CommitId>,
) -> anyhow::Result<Option<CommitReport>> {
    let what = || format!("get results from {}", client.dispatcher);
    match admin_call(conn, &Request::GetResults { commit }, what).await? {
        Reply::Report(report) => Ok(report.map(|r| *r)),
        other => bail!("unexpected reply from the dispatcher: {other:?}"),
    }
}

/// Opens an admin connection to the dispatcher named by `client`.
pub async fn admin_connect(bundle: &Bundle, client: &ClientArgs) -> anyhow::Result<kiln_net::Connection> {
    Ok(kiln_net::connect(bundle, &client.dispatcher, net(client)).await?)
}

/// The commit a person named: all 40 digits as typed, or else the one commit
/// the dispatcher knows whose id starts with the digits typed (at least 7, as git).
async fn resolve_commit(bundle: &Bundle, client: &ClientArgs, typed: &str) -> anyhow::Result<CommitId> {
    let prefix: CommitPrefix = typed.parse()?;
    if let Some(full) = prefix.full() {
        return Ok(full);
    }
    let what = || format!("look up commit {prefix} at {}", client.dispatcher);
    match admin_request(bundle, client, &Request::Resolve { prefix: prefix.clone() }, what).await? {
        Reply::Resolved(found) => pick_commit(&prefix, &found),
        other => bail!("unexpected reply from the dispatcher: {other:?}"),
    }
}

/// The one commit of `found` (the dispatcher's matches for `prefix`), or why there is none.
fn pick_commit(prefix: &CommitPrefix, found: &[CommitId]) -> anyhow::Result<CommitId> {
    match found {
        [] => bail!("the dispatcher knows no commit starting with {prefix}"),
        [one] => Ok(*one),
        many => {
            let list: Vec<&str> = many.iter().map(CommitId::as_str).collect();
            let more = if many.len() >= kiln_proto::wire::MAX_RESOLVED { ", …" } else { "" };
            bail!("{prefix} is ambiguous: it starts {}{more}; type more digits", list.join(", "))
        }
    }
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
    }
    Ok(exit_code(report.status))
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

/// How a finished commit ended, in words: `passed`, or `cancelled (cancelled by admin)`.
fn ended(report: &CommitReport) -> String {
    match &report.error {
        Some(error) => format!("{} ({error})", report.status.as_str()),
        None => report.status.as_str().to_owned(),
    }
}

/// The exit code `kiln results` gives for a status.
pub fn exit_code(status: CommitStatus) -> ExitCode {
    match status {
        CommitStatus::Passed => ExitCode::SUCCESS,
        CommitStatus::Failed => ExitCode::from(1),
        CommitStatus::Queued
        | CommitStatus::Running
        | CommitStatus::Error
        | CommitStatus::Cancelled
        | CommitStatus::Skipped => ExitCode::from(2),
    }
}

/// Renders a report for a terminal: each message's head and tail, or with
/// `verbose` each message whole.
pub fn render(r: &CommitReport, verbose: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let c = &r.counts;
    let _ = writeln!(out, "commit {} on {}: {}", r.commit, r.branch, r.status.as_str().to_uppercase());
    if let Some(runner) = &r.runner {
        let verb = if r.status.is_final() { "ran" } else { "running" };
        let _ = writeln!(out, "  {verb} on {runner}");
    }
    if let Some(error) = &r.error {
        let _ = writeln!(out, "  error: {error}");
    }
    for warning in &r.warnings {
        let _ = writeln!(out, "  warning: {warning}");
    }
    let _ = writeln!(out, "  {}", summary(c));
    for t in &r.tests {
        let _ = writeln!(out, "  {:<5} {} ({} ms)", t.outcome.as_str().to_uppercase(), t.id, t.duration_ms);
        for line in message_lines(t.outcome, &t.message, verbose) {
            let _ = writeln!(out, "        {line}");
        }
    }
    out
}

/// How many tests ended each way, in words.
pub(crate) fn summary(c: &kiln_proto::Counts) -> String {
    format!(
        "{}: {} passed, {} failed, {}, {} skipped, {}, {}",
        plural(c.total, "test", "tests"),
        c.pass,
        c.fail,
        plural(c.error, "error", "errors"),
        c.skip,
        plural(c.xfail, "expected failure", "expected failures"),
        plural(c.xpass, "unexpected success", "unexpected successes"),
    )
}

/// `1 error`, `2 errors`.
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// How many lines of a long message's start [`message_lines`] shows: where
/// `Traceback (most recent call last):` and an import error's first line are.
const HEAD_LINES: usize = 4;
/// How many lines of its end: where a traceback says what went wrong.
const TAIL_LINES: usize = 8;

/// The lines of a test's message to print: a skip's reason (its first line),
/// or for any other outcome but a pass the head and the tail of the message
/// with a marker between; all of it when `verbose`.
pub(crate) fn message_lines(outcome: Outcome, message: &str, verbose: bool) -> Vec<String> {
    let lines: Vec<&str> = message.trim_end().lines().collect();
    let shown = |lines: &[&str]| lines.iter().map(|l| (*l).to_owned()).collect();
    if verbose {
        return shown(&lines);
    }
    match outcome {
        Outcome::Pass => Vec::new(),
        Outcome::Skip => shown(&lines[..lines.len().min(1)]),
        Outcome::Fail | Outcome::Error | Outcome::Xfail | Outcome::Xpass => {
            // Leaving out a line or two would save nothing.
            if lines.len() <= HEAD_LINES + TAIL_LINES + 2 {
                return shown(&lines);
            }
            let hidden = lines.len() - HEAD_LINES - TAIL_LINES;
            let mut out: Vec<String> = shown(&lines[..HEAD_LINES]);
            out.push(format!("… ({hidden} more lines; --verbose shows them)"));
            out.extend(shown(&lines[lines.len() - TAIL_LINES..]));
            out
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_message_keeps_its_head_and_its_tail() {
        let mut traceback = vec![
            "ERROR: tests.test_plugins (unittest.loader._FailedTest.tests.test_plugins)".to_owned(),
            "ImportError: Failed to import test module: tests.test_plugins".to_owned(),
            "Traceback (most recent call last):".to_owned(),
        ];
        traceback.extend((0..20).map(|n| format!("  File \"frame{n}.py\", line {n}, in f{n}")));
        traceback.push("ModuleNotFoundError: No module named 'yaml_that_is_not_installed'".to_owned());
        let message = traceback.join("\n");
        let lines = message_lines(Outcome::Error, &message, false);
        assert_eq!(lines.len(), HEAD_LINES + 1 + TAIL_LINES);
        assert_eq!(lines[..3], traceback[..3]);
        assert_eq!(lines[HEAD_LINES], "… (12 more lines; --verbose shows them)");
        assert_eq!(lines.last(), traceback.last());
        assert_eq!(message_lines(Outcome::Error, &message, true), traceback);
        // Short messages whole, for every outcome that is not a pass or a skip.
        for outcome in [Outcome::Fail, Outcome::Error, Outcome::Xfail, Outcome::Xpass] {
            assert_eq!(message_lines(outcome, "one\ntwo\n", false), ["one", "two"], "{outcome:?}");
        }
        assert_eq!(message_lines(Outcome::Skip, "needs a network\nmore", false), ["needs a network"]);
        assert!(message_lines(Outcome::Pass, "printed", false).is_empty());
    }

    #[test]
    fn roles_get_their_article() {
        assert_eq!([Role::Runner, Role::Observer, Role::Admin].map(article), ["a", "an", "an"]);
    }

    #[test]
    fn counts_are_pluralised() {
        let mut report: CommitReport = serde_json::from_value(serde_json::json!({
            "commit": "a".repeat(40), "repo": "r", "branch": "main", "status": "failed",
            "counts": {"total": 1, "pass": 0, "fail": 0, "error": 1, "skip": 0, "xfail": 1, "xpass": 1},
            "error": null, "runner": null, "warnings": [], "queued_at_ms": 0, "finished_at_ms": null, "tests": []
        }))
        .unwrap();
        let text = render(&report, false);
        assert!(
            text.contains("1 test: 0 passed, 0 failed, 1 error, 0 skipped, 1 expected failure, 1 unexpected success"),
            "{text}"
        );
        report.counts.error = 2;
        report.counts.xfail = 2;
        report.counts.xpass = 2;
        report.counts.total = 2;
        let text = render(&report, false);
        assert!(
            text.contains(
                "2 tests: 0 passed, 0 failed, 2 errors, 0 skipped, 2 expected failures, 2 unexpected successes"
            ),
            "{text}"
        );
    }

    fn id(c: char) -> CommitId {
        c.to_string().repeat(40).parse().unwrap()
    }

    #[test]
    fn a_prefix_picks_its_one_commit_or_says_why_not() {
        let prefix: CommitPrefix = "aaaaaaa".parse().unwrap();
        assert_eq!(pick_commit(&prefix, &[id('a')]).unwrap(), id('a'));
        let none = pick_commit(&prefix, &[]).unwrap_err().to_string();
        assert_eq!(none, "the dispatcher knows no commit starting with aaaaaaa");
        let two = pick_commit(&prefix, &[id('a'), id('b')]).unwrap_err().to_string();
        assert!(two.contains("aaaaaaa is ambiguous") && two.contains(id('a').as_str()), "{two}");
        assert!(two.contains(id('b').as_str()) && !two.contains('…'), "{two}");
        let many = vec![id('c'); kiln_proto::wire::MAX_RESOLVED];
        assert!(pick_commit(&prefix, &many).unwrap_err().to_string().contains(", …;"));
    }
}
