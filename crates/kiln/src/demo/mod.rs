//! `kiln demo`: the whole system on one machine, on embedded defaults.
//!
//! It makes certificates, a sample git repository whose tests show every
//! outcome, starts a dispatcher, an observer and runners as separate
//! processes (this same binary), commits, waits for and prints the results,
//! then commits a fix and shows the commit go green, and stops everything.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use kiln_net::Bundle;
use kiln_proto::{CommitId, CommitReport, Role};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::{ClientArgs, DemoArgs};
use crate::client::{admin_connect, fetch_report_on};
use crate::report::render;

/// The sample project's files, relative path and contents.
pub const SAMPLE: &[(&str, &str)] = &[
    ("README.md", include_str!("sample/README.md")),
    ("calc.py", include_str!("sample/calc.py")),
    ("tests/__init__.py", include_str!("sample/tests/__init__.py")),
    ("tests/test_calc.py", include_str!("sample/tests/test_calc.py")),
    ("tests/test_plugins.py", include_str!("sample/tests/test_plugins.py")),
];

/// How long to wait for one commit's results.
const RESULTS_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let temp;
    let dir = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp =
                tempfile::Builder::new().prefix("kiln-demo-").tempdir().context("cannot make a temporary directory")?;
            temp.path().to_owned()
        }
    };
    let certs = dir.join("certs");
    let repo = dir.join("repo");
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    outln!("kiln demo in {}", dir.display());

    kiln_net::certs::init(&certs, &["localhost".into(), "127.0.0.1".into()]).context("cannot make certificates")?;
    kiln_net::certs::issue(&certs, Role::Observer, "observer")?;
    kiln_net::certs::issue(&certs, Role::Admin, "admin")?;
    for i in 1..=args.runners {
        kiln_net::certs::issue(&certs, Role::Runner, &format!("runner-{i}"))?;
    }
    outln!("  certificates    {}", certs.display());

    write_sample(&repo)?;
    git(&repo, &["init", "--quiet", "--initial-branch=main"])?;
    outln!("  repository      {}", repo.display());

    let exe = std::env::current_exe().context("cannot find the kiln binary")?;
    let mut children = Children::default();
    let (dispatcher, addr, url) = start_dispatcher(&exe, &certs, &dir.join("state"), &logs).await?;
    children.0.push(dispatcher);
    outln!("  dispatcher      {addr} (state in {})", dir.join("state").display());
    outln!("  dashboard       {url}");
    for i in 1..=args.runners {
        let name = format!("runner-{i}");
        let work = dir.join(&name);
        children.0.push(spawn(&exe, &logs.join(format!("{name}.log")), |c| {
            c.arg("runner")
                .arg("--identity")
                .arg(certs.join(&name))
                .arg("--dispatcher")
                .arg(&addr)
                .arg("--work")
                .arg(&work)
        })?);
        outln!("  {name:<15} {}", work.display());
    }
    children.0.push(spawn(&exe, &logs.join("observer.log"), |c| {
        c.args(["observer", "--interval", "1s", "--identity"])
            .arg(certs.join("observer"))
            .arg("--dispatcher")
            .arg(&addr)
            .arg("--repo")
            .arg(&repo)
    })?);
    outln!("  observer        polling {} every 1s", repo.display());
    outln!("  logs            {}", logs.display());

    let admin = Bundle::load(&certs.join("admin"))?;
    let client =
        ClientArgs { identity: certs.join("admin"), dispatcher: addr.clone(), idle_timeout: Duration::from_secs(5) };

    let outcome = async {
        let first = commit(&repo, "Add calc and its tests")?;
        outln!("\ncommitted {first}; waiting for the runners…\n");
        let report = wait_for(&admin, &client, first).await?;
        out!("{}", render(&report, args.verbose));

        // Fix what is broken and watch the commit go green.
        std::fs::write(repo.join("calc.py"), include_str!("fixed/calc.py"))?;
        std::fs::write(repo.join("tests/test_calc.py"), include_str!("fixed/tests/test_calc.py"))?;
        std::fs::remove_file(repo.join("tests/test_plugins.py"))?;
        let second = commit(&repo, "Fix shout, the lookup and the broken import")?;
        outln!("\ncommitted {second}; waiting for the runners…\n");
        let report = wait_for(&admin, &client, second).await?;
        out!("{}", render(&report, args.verbose));
        outln!("\nresults are stored as files in {}", dir.join("state/results").display());
        outln!("the dashboard is at {url}");
        anyhow::Ok(report)
    }
    .await;
    if args.serve && outcome.is_ok() {
        outln!("serving until Ctrl-C (commit to {} to see more)", repo.display());
        let _ = tokio::signal::ctrl_c().await;
    }

    children.stop().await;
    let report = outcome?;
    if args.dir.is_none() {
        outln!("(the demo directory is removed on exit; pass --dir to keep it)");
    }
    Ok(crate::report::exit_code(report.status))
}

fn write_sample(repo: &Path) -> anyhow::Result<()> {
    for (path, contents) in SAMPLE {
        let path = repo.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Runs `git` in `repo` with a fixed identity, so the demo needs no git configuration.
fn git(repo: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=Kiln Demo", "-c", "user.email=demo@kiln.invalid", "-c", "commit.gpgsign=false"])
        .args(args)
        .current_dir(repo)
        .output()
        .context("cannot run git (is it installed?)")?;
    if !out.status.success() {
        bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn commit(repo: &Path, message: &str) -> anyhow::Result<CommitId> {
    git(repo, &["add", "--all"])?;
    git(repo, &["commit", "--quiet", "-m", message])?;
    Ok(git(repo, &["rev-parse", "HEAD"])?.parse()?)
}

async fn wait_for(admin: &Bundle, client: &ClientArgs, commit: CommitId) -> anyhow::Result<CommitReport> {
    let deadline = tokio::time::Instant::now() + RESULTS_TIMEOUT;
    // One connection for the whole wait: a connection per poll would have
    // the dispatcher log a connect and a disconnect five times a second.
    let conn = admin_connect(admin, client).await?;
    let outcome = async {
        loop {
            if let Some(report) = fetch_report_on(&conn, client, Some(commit)).await?
                && report.status.is_final()
            {
                return Ok(report);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no results for {commit} within {RESULTS_TIMEOUT:?}; see the logs");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    conn.close(kiln_net::CloseCode::Shutdown, "done");
    outcome
}

async fn start_dispatcher(
    exe: &Path,
    certs: &Path,
    state: &Path,
    logs: &Path,
) -> anyhow::Result<(Child, String, String)> {
    let log = std::fs::File::create(logs.join("dispatcher.log"))?;
    let mut child = Command::new(exe)
        .arg("dispatcher")
        .arg("--identity")
        .arg(certs.join("dispatcher"))
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--state"])
        .arg(state)
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the dispatcher")?;
    let stdout = child.stdout.take().context("no dispatcher stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the dispatcher did not start within 30 s")??
        .context("the dispatcher exited at start-up; see logs/dispatcher.log")?;
    let addr = line.strip_prefix("listening ").context("unexpected dispatcher output")?.to_owned();
    let line = lines.next_line().await?.context("the dispatcher exited at start-up; see logs/dispatcher.log")?;
    let url = line.strip_prefix("http ").context("unexpected dispatcher output")?.to_owned();
    Ok((child, addr, url))
}

fn spawn(exe: &Path, log: &Path, args: impl FnOnce(&mut Command) -> &mut Command) -> anyhow::Result<Child> {
    let log_file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut cmd = Command::new(exe);
    args(&mut cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file).kill_on_drop(true);
    cmd.spawn().with_context(|| format!("cannot start {}", PathBuf::from(exe).display()))
}

/// The demo's processes, stopped with SIGTERM (then SIGKILL) in reverse order.
#[derive(Default)]
struct Children(Vec<Child>);

impl Children {
    async fn stop(&mut self) {
        while let Some(mut child) = self.0.pop() {
            if let Some(pid) = child.id() {
                terminate(pid);
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

fn terminate(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // The child may have exited already; then there is nothing to stop.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
}
