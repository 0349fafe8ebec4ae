//! End-to-end tests of the plugin host: the real built-in python-unittest
//! plugin running real `python3` on a temporary checkout, and a deliberately
//! misbehaving plugin (plugins/misbehaving) for the host's limits.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_plugin_host::{HostError, PluginHost, Policy};
use kiln_proto::{Outcome, TestResult};
use tokio::sync::mpsc;

/// The fixture repository: every kind of outcome unittest knows, plus the
/// ways a module can go wrong.
const FIXTURE: &[(&str, &str)] = &[
    ("tests/__init__.py", ""),
    ("tests/helper.py", "VALUE = 1\n"),
    ("tests/data.txt", "not python\n"),
    (
        "tests/test_basic.py",
        r#"
import unittest

class Basic(unittest.TestCase):
    def test_pass(self):
        self.assertEqual(1 + 1, 2)

    def test_fail(self):
        self.assertEqual(1 + 1, 3, "arithmetic is broken")

    def test_error(self):
        raise RuntimeError("kaboom")

    @unittest.skip("not on Tuesdays")
    def test_skip(self):
        pass

    @unittest.expectedFailure
    def test_xfail(self):
        self.assertTrue(False)

    @unittest.expectedFailure
    def test_xpass(self):
        pass

    def test_subtests(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertNotEqual(i, 1, "one is not allowed")

    def test_subtests_pass(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertLess(i, 3)
"#,
    ),
    (
        "tests/test_fixture.py",
        r#"
import unittest

class Broken(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        raise ValueError("no database")

    def test_never_runs(self):
        pass

class Fine(unittest.TestCase):
    def test_ok(self):
        pass
"#,
    ),
    ("tests/test_broken.py", "import does_not_exist\n"),
    (
        "tests/test_noisy.py",
        r#"
import os
import unittest

print("noise at import")
os.write(1, b"raw bytes on fd 1 at import\n")

class Noisy(unittest.TestCase):
    def test_prints(self):
        print("noise in a test")
        os.write(1, b"{not json\n")

    def test_prints_then_fails(self):
        print("captured output")
        self.fail("noisy failure")
"#,
    ),
    (
        "tests/test_crash.py",
        r#"
import os
import unittest

class Crash(unittest.TestCase):
    def test_a_fine(self):
        pass

    def test_b_exits(self):
        os._exit(3)

    def test_c_never_runs(self):
        pass
"#,
    ),
    (
        "tests/test_load_tests.py",
        r#"
import unittest

class A(unittest.TestCase):
    def test_one(self):
        pass

    def test_two(self):
        pass

def load_tests(loader, tests, pattern):
    return unittest.TestSuite([A("test_two")])
"#,
    ),
    (
        "tests/test_bad_load_tests.py",
        "def load_tests(loader, tests, pattern):\n    raise RuntimeError('bad load_tests')\n",
    ),
    ("tests/pkg/__init__.py", ""),
    (
        "tests/pkg/test_deep.py",
        "import unittest\n\nclass Deep(unittest.TestCase):\n    def test_ok(self):\n        pass\n",
    ),
    // No __init__.py in tests/nopkg: unittest discover never imports this.
    (
        "tests/nopkg/test_hidden.py",
        "import unittest\n\nclass Hidden(unittest.TestCase):\n    def test_x(self):\n        pass\n",
    ),
];

fn policy(programs: &[&str]) -> Policy {
    Policy {
        programs: Policy::resolve_programs(programs).expect("test programs are installed"),
        command_timeout: Duration::from_secs(30),
        max_output: 1 << 20,
        call_timeout: Duration::from_secs(60),
        max_memory: 64 << 20,
    }
}

/// Writes `files` into a fresh directory and lists them the way a runner
/// would: every file, repository-relative.
fn checkout(files: &[(&str, &str)]) -> (tempfile::TempDir, Vec<String>) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for (path, content) in files {
        let path = dir.path().join(path);
        std::fs::create_dir_all(path.parent().expect("fixture paths have a parent"))
            .expect("create a fixture directory");
        std::fs::write(path, content).expect("write a fixture file");
    }
    let names = files.iter().map(|(path, _)| path.to_string()).collect();
    (dir, names)
}

/// Runs `files` and returns the results by id, failing on a repeated id.
async fn run(host: &PluginHost, dir: &Path, files: &[String]) -> BTreeMap<String, TestResult> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::time::timeout(Duration::from_secs(60), host.run(dir, files, &tx))
        .await
        .expect("the run finishes")
        .expect("the run succeeds");
    drop(tx);
    let mut results = BTreeMap::new();
    while let Some(result) = rx.recv().await {
        let id = result.id.clone();
        assert!(results.insert(id.clone(), result).is_none(), "{id} reported twice");
    }
    results
}

fn outcomes(results: &BTreeMap<String, TestResult>) -> BTreeMap<&str, Outcome> {
    results.iter().map(|(id, r)| (id.as_str(), r.outcome)).collect()
}

fn message<'a>(results: &'a BTreeMap<String, TestResult>, id: &str) -> &'a str {
    &results.get(id).unwrap_or_else(|| panic!("no result for {id}: {results:#?}")).message
}

#[tokio::test]
async fn python_unittest_reports_every_outcome() {
    let host = PluginHost::new(policy(&["python3"])).unwrap();
    let summary = host.plugins();
    assert_eq!(summary.len(), 1);
    assert_eq!(summary[0].name, "python-unittest");
    assert_eq!(summary[0].claims, ["tests/**/*.py"]);
    assert_eq!(summary[0].granted, ["python3"]);

    let (dir, files) = checkout(FIXTURE);
    let results = run(&host, dir.path(), &files).await;

    use Outcome::*;
    let expected = BTreeMap::from([
        ("setUpClass (tests.test_fixture.Broken)", Error),
        ("tests.pkg.test_deep.Deep.test_ok", Pass),
        ("tests.test_basic.Basic.test_error", Error),
        ("tests.test_basic.Basic.test_fail", Fail),
        ("tests.test_basic.Basic.test_pass", Pass),
        ("tests.test_basic.Basic.test_skip", Skip),
        ("tests.test_basic.Basic.test_subtests (i=1)", Fail),
        ("tests.test_basic.Basic.test_subtests_pass", Pass),
        ("tests.test_basic.Basic.test_xfail", Xfail),
        ("tests.test_basic.Basic.test_xpass", Xpass),
        ("tests.test_bad_load_tests", Error),
        ("tests.test_broken", Error),
        ("tests.test_crash.Crash.test_a_fine", Pass),
        ("tests.test_crash.Crash.test_b_exits", Error),
        ("tests.test_fixture.Fine.test_ok", Pass),
        // load_tests picks test_two only.
        ("tests.test_load_tests.A.test_two", Pass),
        ("tests.test_noisy.Noisy.test_prints", Pass),
        ("tests.test_noisy.Noisy.test_prints_then_fails", Fail),
    ]);
    assert_eq!(outcomes(&results), expected, "{results:#?}");

    assert_eq!(message(&results, "tests.test_basic.Basic.test_skip"), "not on Tuesdays");
    assert!(message(&results, "tests.test_basic.Basic.test_fail").contains("arithmetic is broken"));
    assert!(message(&results, "tests.test_basic.Basic.test_error").contains("RuntimeError: kaboom"));
    assert!(message(&results, "tests.test_basic.Basic.test_subtests (i=1)").contains("one is not allowed"));
    assert!(message(&results, "setUpClass (tests.test_fixture.Broken)").contains("no database"));
    let import_error = message(&results, "tests.test_broken");
    assert!(import_error.contains("No module named 'does_not_exist'"), "{import_error}");
    // buffer=True: what a failing test printed is part of its message.
    let noisy = message(&results, "tests.test_noisy.Noisy.test_prints_then_fails");
    assert!(noisy.contains("noisy failure") && noisy.contains("captured output"), "{noisy}");
    assert!(message(&results, "tests.test_bad_load_tests").contains("RuntimeError: bad load_tests"));
    let crash = message(&results, "tests.test_crash.Crash.test_b_exits");
    assert!(crash.contains("exited with code 3"), "{crash}");

    assert_eq!(results["tests.pkg.test_deep.Deep.test_ok"].file, "tests/pkg/test_deep.py");
    assert_eq!(results["setUpClass (tests.test_fixture.Broken)"].file, "tests/test_fixture.py");
}

#[tokio::test]
async fn a_program_the_runner_does_not_allow_is_denied() {
    let host = PluginHost::new(policy(&[])).unwrap();
    assert!(host.plugins()[0].granted.is_empty());
    let (dir, files) = checkout(&[
        ("tests/__init__.py", ""),
        ("tests/test_a.py", "import unittest\n"),
        ("tests/test_b.py", "import unittest\n"),
    ]);
    let results = run(&host, dir.path(), &files).await;
    assert_eq!(
        outcomes(&results),
        BTreeMap::from([("tests.test_a", Outcome::Error), ("tests.test_b", Outcome::Error)])
    );
    let denied = message(&results, "tests.test_a");
    assert!(denied.contains("program `python3` is not granted"), "{denied}");
}

#[tokio::test]
async fn a_command_timeout_kills_the_process_group() {
    let host = PluginHost::new(Policy { command_timeout: Duration::from_secs(1), ..policy(&["python3"]) }).unwrap();
    let (dir, files) = checkout(&[
        ("tests/__init__.py", ""),
        (
            "tests/test_hang.py",
            r#"
import os
import subprocess
import time
import unittest

class Hang(unittest.TestCase):
    def test_hangs(self):
        child = subprocess.Popen(["sleep", "300"])
        with open(os.path.join(os.environ["HOME"], "child.pid"), "w") as f:
            f.write(str(child.pid))
        time.sleep(300)
"#,
        ),
    ]);
    let results = run(&host, dir.path(), &files).await;
    assert_eq!(outcomes(&results), BTreeMap::from([("tests.test_hang.Hang.test_hangs", Outcome::Error)]));
    let timed_out = message(&results, "tests.test_hang.Hang.test_hangs");
    assert!(timed_out.contains("ran out of time"), "{timed_out}");

    // The grandchild was in the command's process group: it must be dead
    // (gone, or a zombie nobody has reaped yet). SIGKILL was sent before
    // `run` returned, so this only waits for the kernel to deliver it.
    let pid: u32 = std::fs::read_to_string(dir.path().join("child.pid")).unwrap().trim().parse().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while is_alive(pid) {
        assert!(std::time::Instant::now() < deadline, "process {pid} survived the timeout");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` is a live (not zombie) process.
fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}

fn misbehaving_wasm() -> PathBuf {
    Path::new(env!("KILN_PLUGINS_WASM_DIR")).join("misbehaving.wasm")
}

#[tokio::test]
async fn a_misbehaving_plugin_becomes_errors_and_the_host_keeps_serving() {
    let policy = Policy { call_timeout: Duration::from_millis(500), max_memory: 32 << 20, ..policy(&["python3"]) };
    let mut host = PluginHost::new(policy).unwrap();
    host.load_file(&misbehaving_wasm()).unwrap();
    let summary = &host.plugins()[1];
    assert_eq!(summary.name, "misbehaving");
    assert_eq!(summary.programs, ["python3", "sh"]);
    assert_eq!(summary.granted, ["python3"]);

    let (dir, _) = checkout(&[("misbehave/.keep", "")]);
    let files = |names: &[&str]| names.iter().map(|n| format!("misbehave/{n}")).collect::<Vec<_>>();
    let check = |results: &BTreeMap<String, TestResult>, id: &str, outcome: Outcome, needle: &str| {
        let result = results.get(id).unwrap_or_else(|| panic!("no result for {id}: {results:#?}"));
        assert_eq!(result.outcome, outcome, "{result:#?}");
        assert!(result.message.contains(needle), "{id}: {:?} does not contain {needle:?}", result.message);
    };

    // A loop: results before it stand, the files after it get the error.
    let results = run(&host, dir.path(), &files(&["ok", "loop", "after"])).await;
    check(&results, "misbehave/ok", Outcome::Pass, "");
    check(&results, "misbehave/loop", Outcome::Error, "plugin misbehaving exceeded its time limit of 500ms");
    check(&results, "misbehave/after", Outcome::Error, "exceeded its time limit");

    // Blocked inside WASI, where no epoch check runs.
    let results = run(&host, dir.path(), &files(&["sleep"])).await;
    check(&results, "misbehave/sleep", Outcome::Error, "exceeded its time limit of 500ms");

    let results = run(&host, dir.path(), &files(&["balloon"])).await;
    check(&results, "misbehave/balloon", Outcome::Error, "exceeded its memory limit of 32 MiB");

    let results = run(&host, dir.path(), &files(&["panic"])).await;
    check(&results, "misbehave/panic", Outcome::Error, "plugin misbehaving crashed");
    check(&results, "misbehave/panic", Outcome::Error, "deliberate panic in the misbehaving plugin");

    let results = run(&host, dir.path(), &files(&["refuse"])).await;
    check(&results, "misbehave/refuse", Outcome::Error, "could not run these tests: deliberately refusing");

    // Requested but not allowed by the policy; a working directory outside
    // the checkout; a repeated id keeps its first result; no way out of the
    // WASI sandbox.
    let results = run(&host, dir.path(), &files(&["run-sh", "escape", "twice", "sandbox"])).await;
    check(&results, "misbehave/run-sh", Outcome::Error, "denied: program `sh` is not granted");
    check(&results, "misbehave/escape", Outcome::Error, "denied: working directory `../..`");
    check(&results, "misbehave/twice", Outcome::Pass, "first");
    check(&results, "misbehave/sandbox", Outcome::Pass, "");
    assert!(!dir.path().join("written-by-plugin").exists());

    // After all that, the same host still runs both plugins.
    let (python_dir, python_files) = checkout(&[
        ("tests/__init__.py", ""),
        ("tests/test_ok.py", "import unittest\n\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n"),
    ]);
    let results = run(&host, python_dir.path(), &python_files).await;
    assert_eq!(outcomes(&results), BTreeMap::from([("tests.test_ok.T.test_ok", Outcome::Pass)]));
    let results = run(&host, dir.path(), &files(&["ok"])).await;
    check(&results, "misbehave/ok", Outcome::Pass, "");
}

#[tokio::test]
async fn loading_refuses_what_is_not_a_plugin() {
    let mut host = PluginHost::new(policy(&[])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"not wasm").unwrap();
    assert!(matches!(host.load_file(&garbage), Err(HostError::Compile { .. })));
    assert!(matches!(host.load_file(&dir.path().join("missing.wasm")), Err(HostError::ReadPlugin { .. })));
    // A second copy of a loaded plugin has the same name.
    host.load_file(&misbehaving_wasm()).unwrap();
    assert!(matches!(host.load_file(&misbehaving_wasm()), Err(HostError::DuplicateName { .. })));
}

#[tokio::test]
async fn a_closed_report_channel_stops_the_run() {
    let host = PluginHost::new(policy(&["python3"])).unwrap();
    let (dir, files) = checkout(FIXTURE);
    let (tx, rx) = mpsc::unbounded_channel();
    drop(rx);
    assert!(matches!(host.run(dir.path(), &files, &tx).await, Err(HostError::ReportClosed)));
}
