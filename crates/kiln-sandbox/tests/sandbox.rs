//! The process sandbox of `run-command`, with real processes: `/bin/sh` and
//! `python3` run through the same code the host uses
//! (`kiln_sandbox::testing`).
//!
//! Each test shows that a mechanism stops what it is meant to stop, and
//! where it is harmless, also that the same command does the harm in a
//! sandbox without that mechanism, so a test cannot pass because its probe
//! is broken. Where this machine lacks a mechanism, the test instead checks
//! that the command was told so (the `[kiln sandbox]` line on stderr) — but
//! as root, on a Linux like CI's, the sandbox must be complete: set
//! `KILN_SANDBOX_DEGRADED_OK=1` to run the tests as root somewhere that is
//! not (a container without privileges, say).

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_sandbox::testing::{Options, Output, Sandbox};
use kiln_sandbox::{Coverage, Mechanism, SandboxLimits};

/// Output kept per stream.
const MAX_OUTPUT: usize = 1 << 20;

/// The real interpreter behind the `python3` on `PATH` (often a pyenv shim,
/// which needs an environment the sandbox clears), as the runner's policy
/// resolves it.
fn python3() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let out = std::process::Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is installed");
        PathBuf::from(String::from_utf8(out.stdout).expect("a UTF-8 path").trim())
    })
    .clone()
}

/// A string no other process on the machine has in its command line.
fn marker(test: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("kiln-sandbox-test-{test}-{}-{nanos}", std::process::id())
}

/// Live (not zombie) processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc is mounted").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(marker) {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let live = stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']));
        if live {
            found.push(pid);
        }
    }
    found
}

/// Kills the processes a control run left behind on purpose (with Python,
/// which the tests need anyway, rather than `unsafe` or another package).
fn kill_all(pids: &[u32]) {
    if pids.is_empty() {
        return;
    }
    let script = "import os, signal, sys\n\
                  for pid in sys.argv[1:]:\n    \
                      try:\n        \
                          os.kill(int(pid), signal.SIGKILL)\n    \
                      except ProcessLookupError:\n        \
                          pass\n";
    let status = std::process::Command::new(python3())
        .args(["-c", script])
        .args(pids.iter().map(u32::to_string))
        .status()
        .expect("python3 runs");
    assert!(status.success(), "could not kill {pids:?}");
}

/// Where the file a command wrote at `name` in its checkout or its TMPDIR
/// is on the host, while the command runs: in the checkout itself, or in
/// one of this process's temporary directories (nextest runs each test in
/// a process of its own): the command's TMPDIR, or in a root of its own,
/// the upper layer of the command's overlay.
fn written_by_command(checkout: &Path, name: &str) -> Option<PathBuf> {
    let direct = checkout.join(name);
    if direct.exists() {
        return Some(direct);
    }
    own_temporary_directories()
        .into_iter()
        .flat_map(|dir| [dir.join("upper").join(name), dir.join("tmp").join(name)])
        .find(|path| path.exists())
}

/// The sandbox's temporary directories of commands this process started.
fn own_temporary_directories() -> Vec<PathBuf> {
    let prefix = format!("kiln-tmp-{}-", std::process::id());
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return Vec::new() };
    entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&prefix)).map(|e| e.path()).collect()
}

fn remove_own_temporary_directories() {
    for dir in own_temporary_directories() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|line| line.strip_prefix("Uid:").is_some_and(|ids| ids.split_whitespace().nth(1) == Some("0")))
}

/// Whether `mechanism` is fully available to `sandbox`. If it is not, root
/// (unless told otherwise) fails the test; anyone else gets `false` and
/// should check the command's note instead.
fn available(sandbox: &Sandbox, mechanism: Mechanism) -> bool {
    let report = sandbox.report().get(mechanism).expect("every mechanism is reported");
    if report.coverage == Coverage::Full {
        return true;
    }
    assert!(
        !is_root() || std::env::var_os("KILN_SANDBOX_DEGRADED_OK").is_some(),
        "running as root, the sandbox should be complete (set KILN_SANDBOX_DEGRADED_OK=1 if this machine \
         cannot have it):\n{}",
        sandbox.report()
    );
    false
}

/// Asserts that `output`'s stderr says the command ran without `mechanism`.
fn assert_noted(output: &Output, mechanism: Mechanism) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let note = stderr.lines().find(|line| line.starts_with("[kiln sandbox] ran without full"));
    assert!(note.is_some_and(|note| note.contains(&mechanism.to_string())), "no note about {mechanism}: {stderr}");
}

async fn run(sandbox: &Sandbox, dir: &Path, program: &Path, args: &[&str], timeout: Duration) -> Output {
    tokio::time::timeout(Duration::from_secs(60), sandbox.run(dir, program, args, timeout, MAX_OUTPUT))
        .await
        .expect("the command ends")
        .expect("the command runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Only the PID namespace cleans up after commands.
fn pid_namespace_alone() -> Options {
    Options { cgroups: false, ..Options::default() }
}

/// Only the cgroup cleans up after commands.
fn cgroup_alone() -> Options {
    Options { pid_namespace: false, ..Options::default() }
}

/// Runs a program that ignores SIGTERM and sleeps forever, with a child
/// that left its process group (`setsid`), under a short timeout: it must
/// be reported as timed out and leave nothing behind.
async fn sleeper_is_stopped(options: Options) {
    let sandbox = Sandbox::new(options);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let marker = marker("sleep");
    let script = "import signal, subprocess, sys, time\n\
                  signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
                  subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(10**6)', sys.argv[1]],\n\
                                   start_new_session=True)\n\
                  print('sleeping', flush=True)\n\
                  time.sleep(10**6)\n";
    let started = Instant::now();
    let out = run(&sandbox, dir.path(), &python3(), &["-c", script, &marker], Duration::from_millis(700)).await;
    let elapsed = started.elapsed();
    let left = processes_with(&marker);
    kill_all(&left);
    assert!(out.timed_out, "{out:?}");
    assert_eq!(out.exit_code, None, "killed by a signal");
    assert_eq!(text(&out.stdout), "sleeping\n");
    assert!(elapsed >= Duration::from_millis(700) && elapsed < Duration::from_secs(5), "{elapsed:?}");
    if available(&sandbox, Mechanism::ProcessCleanup) {
        assert_eq!(left, Vec::<u32>::new(), "the sleepers are gone when run returns");
    } else {
        assert_noted(&out, Mechanism::ProcessCleanup);
    }
}

#[tokio::test]
async fn sleeping_forever_is_stopped_at_the_timeout() {
    sleeper_is_stopped(Options::default()).await;
}

#[tokio::test]
async fn sleeping_forever_is_stopped_by_the_pid_namespace_alone() {
    sleeper_is_stopped(pid_namespace_alone()).await;
}

#[tokio::test]
async fn sleeping_forever_is_stopped_by_a_cgroup_alone() {
    sleeper_is_stopped(cgroup_alone()).await;
}

#[test]
fn a_command_does_not_outlive_its_runner() {
    // Only the supervisor's parent-death signal can stop the command here:
    // no cgroup, and the runner dies without running a destructor.
    let sandbox = Sandbox::new(Options { cgroups: false, ..Options::default() });
    let dir = tempfile::tempdir().expect("a temporary directory");
    let marker = marker("orphan");
    // In TMPDIR: the checkout may be read-only (a root without an overlay).
    let script = "import os, time\n\
                  with open(os.path.join(os.environ['TMPDIR'], 'started'), 'w') as f:\n    \
                      f.write(os.environ['TMPDIR'])\n\
                  time.sleep(10**6)\n";
    let python = python3();
    let args = ["-c", script, &marker];
    // The "runner" is a thread: a process's parent, for this purpose, is the
    // thread that started it.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            let mut command = Box::pin(sandbox.run(dir.path(), &python, &args, Duration::from_secs(600), MAX_OUTPUT));
            runtime.block_on(async {
                let deadline = Instant::now() + Duration::from_secs(30);
                while written_by_command(dir.path(), "started").is_none() {
                    assert!(Instant::now() < deadline, "the command did not start");
                    tokio::select! {
                        out = &mut command => panic!("the command ended: {out:?}"),
                        () = tokio::time::sleep(Duration::from_millis(10)) => {}
                    }
                }
            });
            // Dies: nothing of the command is dropped or cleaned up.
            std::mem::forget(command);
        });
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = processes_with(&marker);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        left = processes_with(&marker);
    }
    kill_all(&left);
    // What the dead runner could not clean up (a later runner would).
    remove_own_temporary_directories();
    // With or without a PID namespace: without one, the program itself gets
    // the parent-death signal.
    assert_eq!(left, Vec::<u32>::new(), "the command outlived its runner");
}

/// Starts a daemon the classic way (fork, setsid, fork, stdio to /dev/null)
/// and exits as soon as it runs.
const DAEMON: &str = "import os, sys, time\n\
                      r, w = os.pipe()\n\
                      if os.fork() == 0:\n    \
                          os.setsid()\n    \
                          if os.fork() == 0:\n        \
                              null = os.open('/dev/null', os.O_RDWR)\n        \
                              for fd in (0, 1, 2):\n            \
                                  os.dup2(null, fd)\n        \
                              os.write(w, b'up')\n        \
                              while True:\n            \
                                  time.sleep(1000)\n    \
                          os._exit(0)\n\
                      assert os.read(r, 2) == b'up'\n\
                      print('daemon started')\n";

/// Runs [`DAEMON`]; returns the output and the daemons left running
/// (killed already).
async fn run_daemon(options: Options) -> (Sandbox, Output, Vec<u32>) {
    let sandbox = Sandbox::new(options);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let marker = marker("daemon");
    let out = run(&sandbox, dir.path(), &python3(), &["-c", DAEMON, &marker], Duration::from_secs(30)).await;
    let left = processes_with(&marker);
    kill_all(&left);
    assert_eq!((out.exit_code, out.timed_out), (Some(0), false), "{out:?}");
    assert_eq!(text(&out.stdout), "daemon started\n");
    (sandbox, out, left)
}

async fn daemon_is_gone(options: Options) {
    let (sandbox, out, left) = run_daemon(options).await;
    if available(&sandbox, Mechanism::ProcessCleanup) {
        assert_eq!(left, Vec::<u32>::new(), "the daemon is gone when run returns");
    } else {
        assert_noted(&out, Mechanism::ProcessCleanup);
    }
}

#[tokio::test]
async fn a_daemon_that_calls_setsid_leaves_no_process_behind() {
    daemon_is_gone(Options::default()).await;
    // Control: with neither a PID namespace nor a cgroup, the daemon
    // survives its command (and this test sees it).
    let (_, out, left) = run_daemon(Options { pid_namespace: false, cgroups: false, ..Options::default() }).await;
    assert_eq!(left.len(), 1, "the control's daemon survived");
    assert_noted(&out, Mechanism::ProcessCleanup);
}

#[tokio::test]
async fn a_daemon_is_killed_by_the_pid_namespace_alone() {
    daemon_is_gone(pid_namespace_alone()).await;
}

#[tokio::test]
async fn a_daemon_is_killed_by_a_cgroup_alone() {
    daemon_is_gone(cgroup_alone()).await;
}

#[tokio::test]
async fn a_fork_bomb_is_contained_and_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let marker = marker("bomb");
    let limits = SandboxLimits { max_processes: 32, ..SandboxLimits::default() };
    let sandbox = Sandbox::new(Options { limits, ..Options::default() });
    // Forks as fast as it can, every child staying alive, until a fork
    // fails (or 300 succeeded: a bomb without a limit is not stopped here).
    let script = "import os, sys, time\n\
                  children, failure = 0, None\n\
                  for _ in range(300):\n    \
                      try:\n        \
                          pid = os.fork()\n    \
                      except OSError as e:\n        \
                          failure = e.errno\n        \
                          break\n    \
                      if pid == 0:\n        \
                          time.sleep(1000)\n        \
                          os._exit(0)\n    \
                      children += 1\n\
                  print(children, failure)\n";
    let out = run(&sandbox, dir.path(), &python3(), &["-c", script, &marker], Duration::from_secs(30)).await;
    assert_eq!((out.exit_code, out.timed_out), (Some(0), false), "{out:?}");
    let stdout = text(&out.stdout);
    let (children, failure) = stdout.trim().split_once(' ').expect("two numbers");
    let children: u64 = children.parse().expect("a count");
    assert_eq!(processes_with(&marker), Vec::<u32>::new(), "the bomb's processes are gone when run returns");
    if available(&sandbox, Mechanism::ProcessLimit) {
        assert!(children < 32, "{children} processes under a limit of 32");
        assert_eq!(failure, "11", "fork failed with EAGAIN");
        let stderr = text(&out.stderr);
        if sandbox.report().get(Mechanism::ProcessLimit).is_some_and(|m| m.detail.starts_with("pids.max")) {
            assert!(stderr.contains("[kiln sandbox] the command reached its limit of 32 processes"), "{stderr}");
        }
    } else {
        assert_noted(&out, Mechanism::ProcessLimit);
    }
}

/// The peak resident memory of this test process, in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("a VmHWM line");
    kib * 1024
}

#[tokio::test]
async fn a_flood_of_output_is_cut_and_costs_bounded_memory() {
    const TOTAL: usize = 100_000_000;
    let sandbox = Sandbox::new(Options::default());
    let dir = tempfile::tempdir().unwrap();
    let before = peak_rss();
    const LINE: &str = "0123456789abcdefghijklmnopqrstuvwxyz\n";
    let script = format!("yes {} | head -c {TOTAL}; echo done >&2", LINE.trim_end());
    let out = run(&sandbox, dir.path(), Path::new("/bin/sh"), &["-c", &script], Duration::from_secs(50)).await;
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 32 << 20, "reading 100 MB raised the peak memory by {grown} bytes");
    assert_eq!((out.exit_code, out.timed_out), (Some(0), false), "{}", text(&out.stderr));
    let marker = format!("\n[... {} bytes cut ...]\n", TOTAL - MAX_OUTPUT);
    assert_eq!(out.stdout.len(), MAX_OUTPUT + marker.len());
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with(&LINE.repeat(3)), "the head is kept");
    assert!(stdout.contains(&marker), "the cut is marked");
    let end = format!("{LINE}{}", &LINE[..TOTAL % LINE.len()]);
    assert!(stdout.ends_with(&end), "the tail is kept");
    assert!(text(&out.stderr).starts_with("done\n"));
}

/// Tries a TCP connection to the port in argv[1], and a server of its own on
/// loopback; prints what happened.
const NETWORK: &str = "import socket, sys\n\
                       try:\n    \
                           socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5).close()\n    \
                           print('outside: connected')\n\
                       except OSError as e:\n    \
                           print('outside: failed', e.errno)\n\
                       try:\n    \
                           server = socket.socket()\n    \
                           server.bind(('127.0.0.1', 0))\n    \
                           server.listen()\n    \
                           socket.create_connection(server.getsockname(), timeout=5).close()\n    \
                           print('loopback: connected')\n\
                       except OSError as e:\n    \
                           print('loopback: failed', e.errno)\n";

#[tokio::test]
async fn the_network_outside_is_unreachable() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let accepted = || match listener.accept() {
        Ok(_) => true,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(e) => panic!("accept: {e}"),
    };

    let sandbox = Sandbox::new(Options::default());
    let out = run(&sandbox, dir.path(), &python3(), &["-c", NETWORK, &port], Duration::from_secs(30)).await;
    let stdout = text(&out.stdout);
    if available(&sandbox, Mechanism::NetworkIsolation) {
        assert!(stdout.starts_with("outside: failed"), "{stdout}");
        assert!(!accepted(), "the listener outside got a connection");
        // A test can still serve itself on its own loopback.
        assert!(stdout.contains("loopback: connected"), "{stdout}");
    } else {
        assert_noted(&out, Mechanism::NetworkIsolation);
    }

    // Without a network namespace, Landlock (ABI 4+) still denies TCP, its
    // own loopback included: the partial fallback.
    let landlock_only = Sandbox::new(Options { network_namespace: false, ..Options::default() });
    let coverage = landlock_only.report().get(Mechanism::NetworkIsolation).map(|m| m.coverage);
    if coverage == Some(Coverage::Partial) {
        let out = run(&landlock_only, dir.path(), &python3(), &["-c", NETWORK, &port], Duration::from_secs(30)).await;
        let stdout = text(&out.stdout);
        assert!(stdout.starts_with("outside: failed 13"), "EACCES from Landlock: {stdout}");
        assert!(stdout.contains("loopback: failed 13"), "{stdout}");
        assert!(!accepted(), "the listener outside got a connection");
        assert_noted(&out, Mechanism::NetworkIsolation);
    }

    // Control: with neither, the connection gets through.
    let open = Sandbox::new(Options { network_namespace: false, landlock: false, ..Options::default() });
    let out = run(&open, dir.path(), &python3(), &["-c", NETWORK, &port], Duration::from_secs(30)).await;
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("outside: connected"), "{stdout}");
    assert!(accepted(), "the control's connection arrived");
    assert_noted(&out, Mechanism::NetworkIsolation);
}

/// Writes a file at each path in argv[1:] (relative ones in the working
/// directory, the checkout) and prints what happened to each.
const WRITE: &str = "import os, sys\n\
                     for path in sys.argv[1:]:\n    \
                         path = path.replace('$TMPDIR', os.environ['TMPDIR'])\n    \
                         try:\n        \
                             with open(path, 'w') as f:\n            \
                                 f.write('x')\n        \
                             print(path, 'written')\n    \
                         except OSError as e:\n        \
                             print(path, 'failed', e.errno)\n";

#[tokio::test]
async fn writes_outside_the_job_directory_fail() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped.txt");
    let target = target.to_str().expect("a UTF-8 temporary path");
    let paths = ["inside.txt", "$TMPDIR/scratch.txt", "/dev/null", target];
    let args: Vec<&str> = ["-c", WRITE].into_iter().chain(paths).collect();

    // Landlock alone: in a root of its own, the path outside would not even
    // exist (see the attack tests), and the sandbox user could not write the
    // checkout of a runner that is root.
    let landlock_alone = Options { mount_namespace: false, unprivileged_user: false, ..Options::default() };
    let sandbox = Sandbox::new(landlock_alone);
    let out = run(&sandbox, dir.path(), &python3(), &args, Duration::from_secs(30)).await;
    let stdout = text(&out.stdout);
    assert!(stdout.contains("inside.txt written"), "{stdout}");
    assert!(dir.path().join("inside.txt").exists());
    assert!(stdout.contains("/scratch.txt written"), "{stdout}");
    assert!(stdout.contains("/dev/null written"), "{stdout}");
    if available(&sandbox, Mechanism::WriteConfinement) {
        assert!(stdout.contains(&format!("{target} failed 13")), "EACCES: {stdout}");
        assert!(!Path::new(target).exists());
    } else {
        assert_noted(&out, Mechanism::WriteConfinement);
    }

    // Control: without Landlock, the same write lands outside.
    let open = Sandbox::new(Options { landlock: false, ..landlock_alone });
    let out = run(&open, dir.path(), &python3(), &args, Duration::from_secs(30)).await;
    assert!(text(&out.stdout).contains(&format!("{target} written")), "{}", text(&out.stdout));
    assert!(Path::new(target).exists());
    assert_noted(&out, Mechanism::WriteConfinement);
}

#[tokio::test]
async fn the_private_tmpdir_is_removed_afterwards() {
    let sandbox = Sandbox::new(Options::default());
    let dir = tempfile::tempdir().unwrap();
    let script = "import os; open(os.path.join(os.environ['TMPDIR'], 'f'), 'w').close(); print(os.environ['TMPDIR'])";
    let out = run(&sandbox, dir.path(), &python3(), &["-c", script], Duration::from_secs(30)).await;
    assert_eq!(out.exit_code, Some(0), "{}", text(&out.stderr));
    let tmp = text(&out.stdout);
    let own_root = sandbox.report().get(Mechanism::MountIsolation).is_some_and(|m| m.coverage != Coverage::Missing);
    if own_root {
        // Its own /tmp, in a root of its own.
        assert_eq!(tmp.trim(), "/tmp");
    } else {
        assert!(tmp.contains("kiln-tmp-"), "{tmp}");
        assert!(!Path::new(tmp.trim()).exists(), "{tmp} was removed");
    }
    assert_eq!(own_temporary_directories(), Vec::<PathBuf>::new(), "every temporary directory was removed");
}

#[tokio::test]
async fn big_files_and_big_allocations_fail() {
    let limits = SandboxLimits { max_file_size: 1 << 20, max_memory: 128 << 20, ..SandboxLimits::default() };
    let sandbox = Sandbox::new(Options { limits, ..Options::default() });
    let dir = tempfile::tempdir().unwrap();

    // Python ignores SIGXFSZ, so the write fails with EFBIG.
    let script = "import errno, os\n\
                  try:\n    \
                      with open(os.path.join(os.environ['TMPDIR'], 'big'), 'wb') as f:\n        \
                          f.write(b'x' * (2 << 20))\n    \
                      print('written')\n\
                  except OSError as e:\n    \
                      print('failed', errno.errorcode[e.errno], os.path.getsize(os.path.join(os.environ['TMPDIR'], 'big')))\n";
    let out = run(&sandbox, dir.path(), &python3(), &["-c", script], Duration::from_secs(30)).await;
    assert_eq!(text(&out.stdout), "failed EFBIG 1048576\n", "{}", text(&out.stderr));

    // 512 MiB, touched, against a limit of 128 MiB: the kernel kills it
    // (cgroup) or the allocation fails (RLIMIT_AS).
    let script = "b = b'x' * (512 << 20)\nprint('allocated', len(b))\n";
    let out = run(&sandbox, dir.path(), &python3(), &["-c", script], Duration::from_secs(30)).await;
    assert!(!text(&out.stdout).contains("allocated"), "{out:?}");
    let stderr = text(&out.stderr);
    if available(&sandbox, Mechanism::MemoryLimit) {
        assert_eq!(out.exit_code, None, "killed: {stderr}");
        assert!(stderr.contains("[kiln sandbox] the command reached its memory limit of 128 MiB"), "{stderr}");
    } else {
        assert!(stderr.contains("MemoryError"), "{stderr}");
        assert_noted(&out, Mechanism::MemoryLimit);
    }
}

#[tokio::test]
async fn the_probe_reports_every_mechanism() {
    let report = kiln_sandbox::probe();
    let mechanisms: Vec<Mechanism> = report.mechanisms().iter().map(|m| m.mechanism).collect();
    assert_eq!(
        mechanisms,
        [
            Mechanism::ProcessCleanup,
            Mechanism::ProcessLimit,
            Mechanism::MemoryLimit,
            Mechanism::FileSizeLimit,
            Mechanism::NetworkIsolation,
            Mechanism::WriteConfinement,
            Mechanism::PrivilegeDrop,
            Mechanism::MountIsolation,
            Mechanism::UnprivilegedUser,
            Mechanism::SyscallFilter,
        ]
    );
    for mechanism in report.mechanisms() {
        assert!(!mechanism.detail.is_empty(), "{mechanism:?}");
    }
    assert_eq!(report.to_string().lines().count(), 10, "{report}");
    if is_root() && std::env::var_os("KILN_SANDBOX_DEGRADED_OK").is_none() {
        assert!(report.is_complete(), "running as root, the sandbox should be complete:\n{report}");
    }

    // A sandbox without some mechanisms says so.
    let sandbox = Sandbox::new(Options { landlock: false, network_namespace: false, ..Options::default() });
    let degraded: Vec<Mechanism> = sandbox.report().degraded().map(|m| m.mechanism).collect();
    assert!(degraded.contains(&Mechanism::WriteConfinement), "{}", sandbox.report());
    assert!(degraded.contains(&Mechanism::NetworkIsolation), "{}", sandbox.report());
    assert!(sandbox.report().get(Mechanism::WriteConfinement).is_some_and(|m| m.detail.contains("disabled")));
}

/// Tries to read each path given, and prints `read PATH` or `failed PATH
/// ERRNO` for each.
const READ: &str = "import sys\n\
                    for path in sys.argv[1:]:\n    \
                        try:\n        \
                            with open(path, 'rb') as f:\n            \
                                f.read()\n        \
                            print('read', path)\n    \
                        except OSError as e:\n        \
                            print('failed', path, e.errno)\n";

/// The sandbox with only these of the filesystem defences.
fn filesystem(mount_namespace: bool, unprivileged_user: bool) -> Options {
    Options { mount_namespace, unprivileged_user, ..Options::default() }
}

#[tokio::test]
async fn files_outside_the_checkout_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    // Readable to the sandbox user without a root of its own, so that the
    // run with the unprivileged user alone shows what that does alone.
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.txt");
    std::fs::write(&secret, "the runner's secret").unwrap();
    let secret = secret.to_str().expect("a UTF-8 temporary path");
    let args = ["-c", READ, secret, "/etc/shadow"];

    let sandbox = Sandbox::new(Options::default());
    let out = run(&sandbox, dir.path(), &python3(), &args, Duration::from_secs(30)).await;
    let stdout = text(&out.stdout);
    if available(&sandbox, Mechanism::MountIsolation) {
        // Neither exists in the command's root.
        assert_eq!(stdout, format!("failed {secret} 2\nfailed /etc/shadow 2\n"), "{}", text(&out.stderr));
    } else {
        assert_noted(&out, Mechanism::MountIsolation);
    }
    // The root alone does it, even for a command running as root (the
    // unprivileged user needs a root of its own: see the sandbox's docs).
    if available(&sandbox, Mechanism::MountIsolation) {
        let mount_alone = Sandbox::new(filesystem(true, false));
        let out = run(&mount_alone, dir.path(), &python3(), &args, Duration::from_secs(30)).await;
        assert_eq!(text(&out.stdout), format!("failed {secret} 2\nfailed /etc/shadow 2\n"), "{}", text(&out.stderr));
    }
    // Control: without both, a command running as root reads them.
    if is_root() {
        let open = Sandbox::new(filesystem(false, false));
        let out = run(&open, dir.path(), &python3(), &args, Duration::from_secs(30)).await;
        assert_eq!(text(&out.stdout), format!("read {secret}\nread /etc/shadow\n"), "{}", text(&out.stderr));
    }
}

#[tokio::test]
async fn proc_lists_only_the_commands_own_processes() {
    let dir = tempfile::tempdir().unwrap();
    let script = "import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n";
    let sandbox = Sandbox::new(Options::default());
    let out = run(&sandbox, dir.path(), &python3(), &["-c", script], Duration::from_secs(30)).await;
    if available(&sandbox, Mechanism::MountIsolation) {
        // The program is its PID namespace's init, and alone.
        assert_eq!(text(&out.stdout), "[1]\n", "{}", text(&out.stderr));
    } else {
        assert_noted(&out, Mechanism::MountIsolation);
    }
    // Control: the machine's /proc lists the runner too.
    let host_proc = Sandbox::new(filesystem(false, false));
    let out = run(&host_proc, dir.path(), &python3(), &["-c", script], Duration::from_secs(30)).await;
    let listed = text(&out.stdout);
    let runner = std::process::id().to_string();
    assert!(listed.trim_matches(['[', ']', '\n']).split(", ").any(|pid| pid == runner), "{listed}");
}

#[tokio::test]
async fn a_hidden_directory_beneath_a_bound_one_is_empty() {
    // A program installed in a prefix of its own, which the sandbox binds,
    // with a secret directory beside it (say, a runner's identity).
    let install = tempfile::tempdir().unwrap();
    let prefix = install.path().join("prefix");
    std::fs::create_dir_all(prefix.join("bin")).unwrap();
    std::fs::create_dir(prefix.join("secret")).unwrap();
    std::os::unix::fs::symlink("/bin/sh", prefix.join("bin/sh")).unwrap();
    std::fs::write(prefix.join("secret/key.pem"), "PRIVATE KEY").unwrap();
    let secret = prefix.join("secret");
    let script = format!("ls -A {0}; cat {0}/key.pem", secret.display());
    let program = prefix.join("bin/sh");
    let dir = tempfile::tempdir().unwrap();

    let sandbox = Sandbox::new(Options::default());
    let out = sandbox
        .run_hiding(
            dir.path(),
            &program,
            &["-c", &script],
            Duration::from_secs(30),
            MAX_OUTPUT,
            std::slice::from_ref(&secret),
        )
        .await
        .expect("the command ran");
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("PRIVATE KEY"), "{stdout}");
    if available(&sandbox, Mechanism::MountIsolation) {
        assert_eq!(stdout, "", "an empty directory: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("key.pem"), "{}", text(&out.stderr));

        // Control: not hidden, the prefix's bind shows it.
        let out = run(&sandbox, dir.path(), &program, &["-c", &script], Duration::from_secs(30)).await;
        assert_eq!(text(&out.stdout), "key.pem\nPRIVATE KEY", "{}", text(&out.stderr));
    } else {
        assert_noted(&out, Mechanism::MountIsolation);
    }
}

#[tokio::test]
async fn the_command_runs_as_the_unprivileged_user() {
    let dir = tempfile::tempdir().unwrap();
    let script = "id -u; id -g; id -G; grep CapEff /proc/self/status";
    let sandbox = Sandbox::new(Options::default());
    let out = run(&sandbox, dir.path(), Path::new("/bin/sh"), &["-c", script], Duration::from_secs(30)).await;
    let stdout = text(&out.stdout);
    if is_root() && available(&sandbox, Mechanism::UnprivilegedUser) {
        let id = kiln_sandbox::SANDBOX_ID;
        assert_eq!(stdout, format!("{id}\n{id}\n{id}\nCapEff:\t0000000000000000\n"), "{}", text(&out.stderr));
        // Control: without it, root (without capabilities).
        let root = Sandbox::new(Options { unprivileged_user: false, ..Options::default() });
        let out = run(&root, dir.path(), Path::new("/bin/sh"), &["-c", script], Duration::from_secs(30)).await;
        assert!(text(&out.stdout).starts_with("0\n0\n"), "{}", text(&out.stdout));
    } else if !is_root() {
        assert!(!stdout.starts_with("0\n"), "{stdout}");
    } else {
        assert_noted(&out, Mechanism::UnprivilegedUser);
    }
}

/// Makes the system calls named by the arguments (`name=number`) with
/// arguments that succeed for an unprivileged process where the call is
/// allowed, and prints `NAME ok` or `NAME ERRNO`.
const SYSCALLS: &str = "import ctypes, os, sys\n\
                        libc = ctypes.CDLL(None, use_errno=True)\n\
                        args = {\n    \
                            'ptrace': (0, 0, 0, 0),\n    \
                            'unshare': (0x10000000,),\n    \
                            'keyctl': (0, -3, 0),\n    \
                            'mount': (b'none', b'/tmp', b'tmpfs', 0, None),\n    \
                            'bpf': (0, None, 0),\n\
                        }\n\
                        for arg in sys.argv[1:]:\n    \
                            name, nr = arg.split('=')\n    \
                            result = libc.syscall(int(nr), *args[name])\n    \
                            print(name, 'ok' if result >= 0 else ctypes.get_errno())\n";

#[tokio::test]
async fn dangerous_system_calls_fail_with_eperm() {
    let dir = tempfile::tempdir().unwrap();
    let calls = [
        ("ptrace", libc::SYS_ptrace),
        ("unshare", libc::SYS_unshare),
        ("keyctl", libc::SYS_keyctl),
        ("mount", libc::SYS_mount),
        ("bpf", libc::SYS_bpf),
    ];
    let calls: Vec<String> = calls.iter().map(|(name, nr)| format!("{name}={nr}")).collect();
    let args: Vec<&str> = ["-c", SYSCALLS].into_iter().chain(calls.iter().map(String::as_str)).collect();
    let sandbox = Sandbox::new(Options::default());
    let out = run(&sandbox, dir.path(), &python3(), &args, Duration::from_secs(30)).await;
    if available(&sandbox, Mechanism::SyscallFilter) {
        let eperm = libc::EPERM;
        assert_eq!(
            text(&out.stdout),
            format!("ptrace {eperm}\nunshare {eperm}\nkeyctl {eperm}\nmount {eperm}\nbpf {eperm}\n"),
            "{}",
            text(&out.stderr)
        );
    } else {
        assert_noted(&out, Mechanism::SyscallFilter);
    }
    // Control: without the filter, an unprivileged process may trace
    // itself, make a user namespace and use its keyrings (mount and bpf
    // still fail for want of capabilities).
    let open = Sandbox::new(Options { syscall_filter: false, ..Options::default() });
    let out = run(&open, dir.path(), &python3(), &args, Duration::from_secs(30)).await;
    let stdout = text(&out.stdout);
    for call in ["ptrace ok", "unshare ok", "keyctl ok"] {
        assert!(stdout.lines().any(|line| line == call), "{call}: {stdout}{}", text(&out.stderr));
    }
}

#[tokio::test]
async fn the_sandbox_id_can_be_chosen_before_the_sandbox_is_set_up() {
    assert!(matches!(kiln_sandbox::use_sandbox_id(0), Err(kiln_sandbox::SandboxIdError::Root { id: 0 })));
    kiln_sandbox::use_sandbox_id(64_123).expect("nothing is set up yet in this process");
    let dir = tempfile::tempdir().unwrap();
    let sandbox = Sandbox::new(Options::default());
    let out = run(&sandbox, dir.path(), Path::new("/bin/sh"), &["-c", "id -u; id -g"], Duration::from_secs(30)).await;
    if is_root() && available(&sandbox, Mechanism::UnprivilegedUser) {
        assert_eq!(text(&out.stdout), "64123\n64123\n", "{}", text(&out.stderr));
    }
    let _ = kiln_sandbox::probe();
    kiln_sandbox::use_sandbox_id(64_123).expect("the same id again is harmless");
    let late = kiln_sandbox::use_sandbox_id(64_124);
    assert!(matches!(late, Err(kiln_sandbox::SandboxIdError::TooLate { id: 64_124, current: 64_123 })), "{late:?}");
}
