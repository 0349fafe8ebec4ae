//! Starting and stopping Kiln processes for tests, and reading their results.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_proto::{CommitId, CommitReport, Outcome};
pub use nix::sys::signal::Signal;
use nix::unistd::Pid;

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
    /// Sends a signal to the process.
    pub fn signal(&self, signal: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        nix::sys::signal::kill(pid, signal).expect("signal");
    }

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
    /// `RUST_LOG` for the processes this cluster starts.
    pub rust_log: String,
}

impl Cluster {
    /// Makes certificates (CA, dispatcher, `admin`) and starts a dispatcher on a free port.
    pub fn start() -> Cluster {
        Cluster::start_with(&[])
    }

    /// Like [`Cluster::start`], with extra dispatcher flags.
    pub fn start_with(flags: &[&str]) -> Cluster {
        Cluster::start_on(&["localhost", "127.0.0.1"], "127.0.0.1:0", flags)
    }

    /// Like [`Cluster::start`], with the dispatcher's certificate valid for
    /// `sans` and listening on `listen`; `addr` stays a loopback address.
    pub fn start_on(sans: &[&str], listen: &str, flags: &[&str]) -> Cluster {
        Cluster::start_logging(sans, listen, flags, "info")
    }

    /// Like [`Cluster::start_on`], with every process logging at `rust_log`.
    pub fn start_logging(sans: &[&str], listen: &str, flags: &[&str], rust_log: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        let mut init = kiln();
        init.args(["certs", "init", "--dir"]).arg(&certs);
        for san in sans {
            init.args(["--san", san]);
        }
        let out = init.output().expect("certs init");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut cluster = Cluster { dir, addr: String::new(), procs: Vec::new(), rust_log: rust_log.to_owned() };
        cluster.issue("admin", "admin");
        let proc = cluster.spawn_dispatcher(listen, flags);
        cluster.procs.insert(0, proc);
        let port = cluster.addr.rsplit_once(':').map(|(_, p)| p.to_owned()).expect("port");
        cluster.addr = format!("127.0.0.1:{port}");
        cluster
    }

    /// Starts a dispatcher listening on `listen` with the cluster's state
    /// directory, and records its address. Its idle timeout is 3 s (lost
    /// runners are noticed quickly) unless `flags` set one.
    pub fn spawn_dispatcher(&mut self, listen: &str, flags: &[&str]) -> Proc {
        let n = self.procs.len();
        let log = self.dir.path().join(format!("dispatcher-{n}.log"));
        let idle: &[&str] = if flags.contains(&"--idle-timeout") { &[] } else { &["--idle-timeout", "3s"] };
        let mut child = kiln()
            .env("RUST_LOG", &self.rust_log)
            .arg("dispatcher")
            .arg("--identity")
            .arg(self.certs().join("dispatcher"))
            .args(["--listen", listen])
            .args(idle)
            .arg("--state")
            .arg(self.state())
            .args(flags)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("start dispatcher");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        stdout.read_line(&mut line).expect("read address");
        // Whatever else it prints on stdout (nothing, it should be) is kept for tests to check.
        let mut rest =
            std::fs::File::create(self.dir.path().join(format!("dispatcher-{n}.stdout"))).expect("stdout file");
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut rest));
        let proc = Proc { child, log };
        self.addr = line.trim().strip_prefix("listening ").unwrap_or_else(|| panic!("{}", proc.log())).to_owned();
        proc
    }

    /// Kills the dispatcher with SIGKILL and starts a new one on the same
    /// address and state directory.
    pub fn restart_dispatcher(&mut self) {
        self.procs[0].signal(Signal::SIGKILL);
        let _ = self.procs[0].child.wait();
        let addr = self.addr.clone();
        let proc = self.spawn_dispatcher(&addr, &[]);
        let old = std::mem::replace(&mut self.procs[0], proc);
        // Keep the old log for failure messages.
        self.procs.push(old);
    }

    /// The dispatcher's state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The stored results document of a commit, if any.
    pub fn stored(&self, commit: &CommitId) -> Option<CommitReport> {
        let bytes = std::fs::read(self.state().join(format!("results/{commit}.json"))).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Waits until the stored document of `commit` satisfies `cond`.
    pub fn wait_stored(&self, commit: &CommitId, what: &str, cond: impl Fn(&CommitReport) -> bool) -> CommitReport {
        let mut last = None;
        let ok = eventually(Duration::from_secs(90), || {
            last = self.stored(commit);
            last.as_ref().is_some_and(&cond)
        });
        assert!(ok, "{commit} never became {what}: {last:?}\n{}", self.logs());
        last.expect("checked above")
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

    /// Starts `kiln SUBCOMMAND --identity certs/NAME --dispatcher ADDR EXTRA…`,
    /// logging to NAME.log; with an idle timeout of 3 s unless EXTRA sets one.
    pub fn spawn(&mut self, subcommand: &str, name: &str, extra: &[&std::ffi::OsStr]) -> &Proc {
        let n = self.procs.len();
        let log = self.dir.path().join(format!("{name}-{n}.log"));
        let idle: &[&str] = if extra.contains(&"--idle-timeout".as_ref()) { &[] } else { &["--idle-timeout", "3s"] };
        let child = kiln()
            .env("RUST_LOG", &self.rust_log)
            .arg(subcommand)
            .arg("--identity")
            .arg(self.certs().join(name))
            .args(["--dispatcher", &self.addr])
            .args(idle)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn kiln");
        self.procs.push(Proc { child, log });
        self.procs.last().expect("just pushed")
    }

    /// Starts a runner inside network namespace `netns`, dialling `dispatcher`.
    pub fn runner_in(&mut self, netns: &str, name: &str, dispatcher: &str) -> usize {
        self.runner_via(&["ip", "netns", "exec", netns], name, dispatcher, &[])
    }

    /// Issues a runner certificate and starts a runner with its own work
    /// directory; returns its index in `procs`.
    pub fn runner(&mut self, name: &str) -> usize {
        self.runner_with(name, &[])
    }

    /// Like [`Cluster::runner`], with extra flags (e.g. `--slots 1`).
    pub fn runner_with(&mut self, name: &str, flags: &[&str]) -> usize {
        if !self.certs().join(name).exists() {
            self.issue("runner", name);
        }
        let work = self.dir.path().join(format!("{name}-work"));
        let mut args: Vec<&std::ffi::OsStr> = vec!["--work".as_ref(), work.as_os_str()];
        args.extend(flags.iter().map(std::ffi::OsStr::new));
        self.spawn("runner", name, &args);
        self.procs.len() - 1
    }

    /// Like [`Cluster::runner_with`], confined to one CPU by `taskset -c CPU`.
    pub fn runner_pinned(&mut self, name: &str, cpu: u32, flags: &[&str]) -> usize {
        let addr = self.addr.clone();
        self.runner_via(&["taskset", "-c", &cpu.to_string()], name, &addr, flags)
    }

    /// Issues a runner certificate and starts `WRAPPER… kiln runner` dialling
    /// `dispatcher`, with its own work directory; returns its index in `procs`.
    fn runner_via(&mut self, wrapper: &[&str], name: &str, dispatcher: &str, flags: &[&str]) -> usize {
        self.issue("runner", name);
        let log = self.dir.path().join(format!("{name}.log"));
        let child = Command::new(wrapper[0])
            .args(&wrapper[1..])
            .args([env!("CARGO_BIN_EXE_kiln"), "runner", "--identity"])
            .arg(self.certs().join(name))
            .args(["--dispatcher", dispatcher, "--idle-timeout", "3s", "--work"])
            .arg(self.dir.path().join(format!("{name}-work")))
            .args(flags)
            .env("RUST_LOG", &self.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", wrapper[0]));
        self.procs.push(Proc { child, log });
        self.procs.len() - 1
    }

    /// Issues an observer certificate and starts an observer polling `repo` every `interval`.
    pub fn observer(&mut self, name: &str, repo: &Path, interval: &str) {
        self.observer_with(name, repo, interval, &[]);
    }

    /// Like [`Cluster::observer`], with extra flags; the certificate is issued once.
    pub fn observer_with(&mut self, name: &str, repo: &Path, interval: &str, flags: &[&str]) -> usize {
        if !self.certs().join(name).exists() {
            self.issue("observer", name);
        }
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["--repo".as_ref(), repo.as_os_str(), "--interval".as_ref(), interval.as_ref()];
        args.extend(flags.iter().map(|f| std::ffi::OsStr::new(*f)));
        self.spawn("observer", name, &args);
        self.procs.len() - 1
    }

    /// Waits until a process's log contains `text`.
    pub fn wait_log(&self, proc: usize, text: &str) {
        let ok = eventually(Duration::from_secs(60), || self.procs[proc].log().contains(text));
        assert!(ok, "process {proc} never logged {text:?}\n{}", self.logs());
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

    /// Runs `kiln ARGS --identity certs/admin --dispatcher ADDR` to completion.
    pub fn admin(&self, args: &[&str]) -> Output {
        kiln()
            .args(args)
            .args(["--dispatcher", &self.addr])
            .arg("--identity")
            .arg(self.certs().join("admin"))
            .output()
            .expect("kiln")
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        self.procs.iter().map(|p| format!("--- {}\n{}", p.log.display(), p.log())).collect::<Vec<_>>().join("\n")
    }
}

/// A network namespace joined to this one by a veth pair: a second "host"
/// for tests of what crosses a network. Removed when dropped.
pub struct NetNs {
    /// The namespace's name.
    pub name: String,
    /// The veth end in this (the dispatcher's) namespace.
    pub host_if: String,
    /// The address of this end, which the namespace reaches the dispatcher by.
    pub host_ip: &'static str,
}

impl NetNs {
    /// Creates the namespace and its link; panics with the reason if the
    /// machine cannot (the test needs root and iproute2).
    pub fn create() -> NetNs {
        let id = std::process::id();
        let ns = NetNs { name: format!("kiln-test-{id}"), host_if: format!("kh{id}"), host_ip: "169.254.77.1" };
        let peer = format!("kn{id}");
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &peer]);
        ip(&["link", "set", &peer, "netns", &ns.name]);
        ip(&["addr", "add", "169.254.77.1/30", "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        ip(&["netns", "exec", &ns.name, "ip", "addr", "add", "169.254.77.2/30", "dev", &peer]);
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", &peer, "up"]);
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Cuts (`false`) or heals (`true`) the link.
    pub fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth end, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (install iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?} failed (this test needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A git repository in a temporary directory, driven by the `git` CLI.
pub struct Repo {
    pub path: PathBuf,
}

impl Repo {
    /// `git init` in `dir/repo`, with the files given.
    pub fn new(dir: &Path, files: &[(&str, &str)]) -> Repo {
        Repo::on_branch(dir, "main", files)
    }

    /// Like [`Repo::new`], with `branch` as the branch `git init` makes.
    pub fn on_branch(dir: &Path, branch: &str, files: &[(&str, &str)]) -> Repo {
        let repo = Repo { path: dir.join("repo") };
        std::fs::create_dir_all(&repo.path).expect("mkdir repo");
        repo.git(&["init", "--quiet", &format!("--initial-branch={branch}")]);
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

/// A suite of `modules` test modules with `tests` tests each that sleep
/// `sleep_ms` and pass: slow enough to interrupt.
pub fn slow_suite(modules: usize, tests: usize, sleep_ms: u64) -> Vec<(String, String)> {
    let mut files = vec![("tests/__init__.py".to_owned(), String::new())];
    for m in 0..modules {
        let mut src = format!("import time\nimport unittest\n\n\nclass Slow{m}(unittest.TestCase):\n");
        for t in 0..tests {
            src.push_str(&format!("    def test_{t}(self):\n        time.sleep({})\n", sleep_ms as f64 / 1000.0));
        }
        files.push((format!("tests/test_slow{m}.py"), src));
    }
    files
}

/// Borrows a list of owned files as the `(path, contents)` pairs [`Repo`] takes.
pub fn borrow(files: &[(String, String)]) -> Vec<(&str, &str)> {
    files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect()
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
