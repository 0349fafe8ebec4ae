//! Starting and stopping Kiln processes for tests, and reading their results.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::{CommitId, CommitReport, Outcome};

/// The `kiln` binary under test.
pub fn kiln() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.env("RUST_LOG", "info").stdin(Stdio::null());
    cmd
}

/// Runs `kiln ARGS` to completion.
pub fn kiln_output(args: &[&str]) -> Output {
    kiln().args(args).output().expect("run kiln")
}

/// A process that is killed when dropped, with its log kept for failures.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A dispatcher with certificates, ready for observers and runners.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub procs: Vec<Proc>,
}

impl Cluster {
    /// Makes certificates (CA, dispatcher, `admin`) and starts a dispatcher on a free port.
    pub fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let out = kiln().args(["certs", "init", "--dir"]).arg(&certs).output().expect("certs init");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut cluster = Cluster { dir, addr: String::new(), procs: Vec::new() };
        cluster.issue("admin", "admin");
        let log = cluster.dir.path().join("dispatcher.log");
        let mut child = kiln()
            .arg("dispatcher")
            .arg("--identity")
            .arg(certs.join("dispatcher"))
            .args(["--listen", "127.0.0.1:0", "--idle-timeout", "3s", "--state"])
            .arg(cluster.dir.path().join("state"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start dispatcher");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read address");
        let proc = Proc { child, log };
        cluster.addr = line.trim().strip_prefix("listening ").unwrap_or_else(|| panic!("{}", proc.log())).to_owned();
        cluster.procs.push(proc);
        cluster
    }

    /// The certificate directory.
    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// Issues a bundle `certs/NAME` for `role`.
    pub fn issue(&self, role: &str, name: &str) -> PathBuf {
        let out = kiln().args(["certs", "issue", role, name, "--dir"]).arg(self.certs()).output().expect("issue");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        self.certs().join(name)
    }

    /// Starts `kiln SUBCOMMAND --identity certs/NAME --dispatcher ADDR EXTRA…`, logging to NAME.log.
    pub fn spawn(&mut self, subcommand: &str, name: &str, extra: &[&std::ffi::OsStr]) -> &Proc {
        let log = self.dir.path().join(format!("{name}.log"));
        let child = kiln()
            .arg(subcommand)
            .arg("--identity")
            .arg(self.certs().join(name))
            .args(["--dispatcher", &self.addr, "--idle-timeout", "3s"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn kiln");
        self.procs.push(Proc { child, log });
        self.procs.last().expect("just pushed")
    }

    /// Issues a runner certificate and starts a runner with its own work directory.
    pub fn runner(&mut self, name: &str) {
        self.issue("runner", name);
        let work = self.dir.path().join(format!("{name}-work"));
        self.spawn("runner", name, &["--work".as_ref(), work.as_os_str()]);
    }

    /// Issues an observer certificate and starts an observer polling `repo` every `interval`.
    pub fn observer(&mut self, name: &str, repo: &Path, interval: &str) {
        self.issue("observer", name);
        self.spawn("observer", name, &["--repo".as_ref(), repo.as_os_str(), "--interval".as_ref(), interval.as_ref()]);
    }

    /// Waits until the commit's testing has ended and returns its report.
    pub fn wait_for(&self, commit: &CommitId) -> CommitReport {
        let out = kiln()
            .args(["results", commit.as_str(), "--format", "json", "--wait", "90s", "--dispatcher", &self.addr])
            .arg("--identity")
            .arg(self.certs().join("admin"))
            .output()
            .expect("kiln results");
        let report: CommitReport = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("no report for {commit} ({e}): {}\n{}", String::from_utf8_lossy(&out.stderr), self.logs())
        });
        assert!(report.status.is_final(), "{report:?}\n{}", self.logs());
        report
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        self.procs.iter().map(|p| format!("--- {}\n{}", p.log.display(), p.log())).collect::<Vec<_>>().join("\n")
    }
}

/// A git repository in a temporary directory, driven by the `git` CLI.
pub struct Repo {
    pub path: PathBuf,
}

impl Repo {
    /// `git init` in `dir/repo`, with the files given.
    pub fn new(dir: &Path, files: &[(&str, &str)]) -> Repo {
        let repo = Repo { path: dir.join("repo") };
        std::fs::create_dir_all(&repo.path).expect("mkdir repo");
        repo.git(&["init", "--quiet", "--initial-branch=main"]);
        repo.write(files);
        repo
    }

    /// Writes files (creating directories).
    pub fn write(&self, files: &[(&str, &str)]) {
        for (path, contents) in files {
            let path = self.path.join(path);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, contents).expect("write");
        }
    }

    /// Runs git and returns its stdout.
    pub fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(["-c", "user.name=Kiln Test", "-c", "user.email=test@kiln.invalid", "-c", "commit.gpgsign=false"])
            .args(args)
            .current_dir(&self.path)
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Commits everything and returns the new commit's id.
    pub fn commit(&self, message: &str) -> CommitId {
        self.git(&["add", "--all"]);
        self.git(&["commit", "--quiet", "-m", message]);
        self.git(&["rev-parse", "HEAD"]).parse().expect("commit id")
    }
}

/// The report's tests as an id → outcome map.
pub fn outcomes(report: &CommitReport) -> std::collections::BTreeMap<String, Outcome> {
    report.tests.iter().map(|t| (t.id.clone(), t.outcome)).collect()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}
