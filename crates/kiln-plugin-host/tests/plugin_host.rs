//! End-to-end tests of the plugin host: the real built-in python-unittest
//! and tap plugins running real `python3` and `sh` on a temporary checkout,
//! a deliberately misbehaving plugin (plugins/misbehaving) for the host's
//! limits, and loading: the compile cache, overlapping claims, contract
//! versions and what is not a plugin.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_plugin_host::{Compilation, HostError, HostEvent, PluginHost, Policy};
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

    def test_c_runs_in_a_fresh_interpreter(self):
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
        hidden: Vec::new(),
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

/// Runs `files` and returns the results by id, failing on a repeated id, on
/// a result after its file's `FileDone`, and on a file done twice.
async fn run(host: &PluginHost, dir: &Path, files: &[String]) -> BTreeMap<String, TestResult> {
    run_with_events(host, dir, files).await.0
}

/// Like [`run`], and also returns the files in the order they were done.
async fn run_with_events(
    host: &PluginHost,
    dir: &Path,
    files: &[String],
) -> (BTreeMap<String, TestResult>, Vec<String>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::time::timeout(Duration::from_secs(60), host.run(dir, files, 2, &tx))
        .await
        .expect("the run finishes")
        .expect("the run succeeds");
    drop(tx);
    let mut results = BTreeMap::new();
    let mut done = Vec::new();
    while let Some(event) = rx.recv().await {
        match event {
            HostEvent::Test(result) => {
                assert!(!done.contains(&result.file), "{result:?} came after its file was done");
                let id = result.id.clone();
                assert!(results.insert(id.clone(), result).is_none(), "{id} reported twice");
            }
            HostEvent::FileDone(file) => {
                assert!(!done.contains(&file), "{file} done twice");
                done.push(file);
            }
            HostEvent::Idle => panic!("a run that is offered no more files never waits for them"),
        }
    }
    (results, done)
}

/// `run_with` (given `more`) hands the files of later batches to the plugin that is
/// still running: python-unittest runs them in the interpreter that ran the
/// first batch (each test prints its driver's PID namespace, pid and start
/// time), each round ends with
/// `Idle` once its files are done, and closing `more` ends the run.
#[tokio::test]
async fn more_files_run_in_the_warm_interpreter_of_the_first_batch() {
    // Each sandboxed command has a PID namespace of its own.
    let test = "import os, unittest\n\nclass T(unittest.TestCase):\n    def test(self):\n        \
                with open('/proc/%d/stat' % os.getppid()) as f:\n            \
                started = f.read().rsplit(')', 1)[1].split()[19]\n        \
                print(os.readlink('/proc/self/ns/pid'), os.getppid(), started)\n        self.fail()\n";
    let (dir, files) = checkout(&[
        ("tests/__init__.py", ""),
        ("tests/test_a.py", test),
        ("tests/test_b.py", test),
        ("tests/test_c.py", test),
    ]);
    let host = PluginHost::new(policy(&["python3"])).unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (more_tx, more) = mpsc::unbounded_channel();
    let settings = kiln_plugin_host::RunSettings::default();
    let first = files[..2].to_vec();
    let run = host.run_with(dir.path(), &first, 1, &settings, &tx, Some(more));
    let events = &mut rx;
    let rounds = async move {
        let mut rounds: Vec<Vec<HostEvent>> = vec![Vec::new()];
        let mut later = vec![vec![files[2].clone()], vec![files[3].clone()]].into_iter();
        while let Some(event) = events.recv().await {
            if event != HostEvent::Idle {
                rounds.last_mut().unwrap().push(event);
                continue;
            }
            match later.next() {
                Some(files) => more_tx.send(files).unwrap(),
                // Dropping `more_tx` says none will come.
                None => return rounds,
            }
            rounds.push(Vec::new());
        }
        panic!("the run ended without waiting for more: {rounds:?}");
    };
    let (ran, mut rounds) = tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(run, rounds) })
        .await
        .expect("the run ends once no more files come");
    ran.unwrap();
    drop(tx);
    while let Some(event) = rx.recv().await {
        rounds.last_mut().unwrap().push(event);
    }
    let done = |file: &str| HostEvent::FileDone(file.to_owned());
    let mut pids = BTreeSet::new();
    let mut shape = Vec::new();
    for round in &rounds {
        let mut events = Vec::new();
        for event in round {
            match event {
                HostEvent::Test(result) => {
                    assert_eq!(result.outcome, Outcome::Fail, "{result:?}");
                    pids.insert(
                        result.message.rsplit("Output (stdout and stderr):\n").next().unwrap().trim().to_owned(),
                    );
                    events.push(format!("{} {}", result.file, result.id));
                }
                other => events.push(format!("{other:?}")),
            }
        }
        shape.push(events);
    }
    assert_eq!(
        shape,
        [
            vec![
                format!("{:?}", done("tests/__init__.py")),
                "tests/test_a.py tests.test_a.T.test".to_owned(),
                format!("{:?}", done("tests/test_a.py"))
            ],
            vec!["tests/test_b.py tests.test_b.T.test".to_owned(), format!("{:?}", done("tests/test_b.py"))],
            vec!["tests/test_c.py tests.test_c.T.test".to_owned(), format!("{:?}", done("tests/test_c.py"))],
        ]
    );
    assert_eq!(pids.len(), 1, "one interpreter ran every file: {pids:?}");
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
    let names: Vec<&str> = summary.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["python-unittest", "tap"]);
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
        // The crash hides nothing: the rest of the file runs again without it.
        ("tests.test_crash.Crash.test_c_runs_in_a_fresh_interpreter", Pass),
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
    // What a failing test printed is part of its message.
    let noisy = message(&results, "tests.test_noisy.Noisy.test_prints_then_fails");
    assert!(noisy.contains("noisy failure") && noisy.contains("captured output"), "{noisy}");
    assert!(message(&results, "tests.test_bad_load_tests").contains("RuntimeError: bad load_tests"));
    let crash = message(&results, "tests.test_crash.Crash.test_b_exits");
    assert!(crash.contains("exited with code 3"), "{crash}");

    assert_eq!(results["tests.pkg.test_deep.Deep.test_ok"].file, "tests/pkg/test_deep.py");
    assert_eq!(results["setUpClass (tests.test_fixture.Broken)"].file, "tests/test_fixture.py");
}

/// What discover does beyond single modules, each case a mismatch the
/// comparison with plain unittest (plugins/python-unittest/fidelity) found
/// in the plugin before it was fixed.
const DISCOVER_FIXTURE: &[(&str, &str)] = &[
    // Tests defined in the top package itself: discover loads them from
    // tests/__init__.py.
    (
        "tests/__init__.py",
        "import unittest\n\nclass InInit(unittest.TestCase):\n    def test_in_init(self):\n        pass\n",
    ),
    // A package whose load_tests takes over: discover runs what it returns
    // (here one of its two modules' tests, and its own) and does not walk
    // into the package by itself.
    (
        "tests/chosen/__init__.py",
        r#"
import os
import unittest

class Own(unittest.TestCase):
    def test_own(self):
        pass

def load_tests(loader, standard_tests, pattern):
    here = os.path.dirname(__file__)
    found = loader.discover(start_dir=here, pattern="test_picked*.py")
    standard_tests.addTests(found)
    return standard_tests
"#,
    ),
    (
        "tests/chosen/test_picked.py",
        "import unittest\n\nclass P(unittest.TestCase):\n    def test_p(self):\n        pass\n",
    ),
    (
        "tests/chosen/test_left_out.py",
        "import unittest\n\nclass L(unittest.TestCase):\n    def test_l(self):\n        pass\n",
    ),
    ("tests/chosen/deeper/__init__.py", ""),
    (
        "tests/chosen/deeper/test_deep.py",
        "import unittest\n\nclass D(unittest.TestCase):\n    def test_d(self):\n        pass\n",
    ),
    // A package that cannot be imported is one error; discover does not
    // look inside it (the module below would import fine on its own).
    ("tests/broken/__init__.py", "import does_not_exist\n"),
    (
        "tests/broken/test_inside.py",
        "import unittest\n\nclass I(unittest.TestCase):\n    def test_i(self):\n        pass\n",
    ),
    // A package skipped on import: one skip, nothing inside it runs.
    ("tests/skipped/__init__.py", "import unittest\nraise unittest.SkipTest('no GPU here')\n"),
    (
        "tests/skipped/test_gpu.py",
        "import unittest\n\nclass G(unittest.TestCase):\n    def test_g(self):\n        pass\n",
    ),
    // A module skipped on import.
    ("tests/test_skipped_module.py", "import unittest\nraise unittest.SkipTest('not on this platform')\n"),
    // Fixtures: a module fixture that fails, a class fixture that skips, a
    // class teardown that raises.
    (
        "tests/test_fixtures.py",
        r#"
import unittest

def setUpModule():
    print("setting up the module")
    raise RuntimeError("no module for you")

class NeverRuns(unittest.TestCase):
    def test_x(self):
        pass
"#,
    ),
    (
        "tests/test_class_fixtures.py",
        r#"
import unittest

class Skipped(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        raise unittest.SkipTest("class needs a database")

    def test_x(self):
        pass

class TornDown(unittest.TestCase):
    @classmethod
    def tearDownClass(cls):
        raise ValueError("teardown broke")

    def test_y(self):
        pass
"#,
    ),
    // Subtests that fail, error and skip; the test itself then has no
    // outcome of its own, as in unittest.
    (
        "tests/test_subtests.py",
        r#"
import unittest

class Sub(unittest.TestCase):
    def test_mixed(self):
        for i in range(4):
            with self.subTest(i=i):
                if i == 1:
                    self.fail("one fails")
                if i == 2:
                    raise KeyError("two errors")
                if i == 3:
                    self.skipTest("three skips")

    def test_skips_only(self):
        with self.subTest("only"):
            self.skipTest("skipped inside")
"#,
    ),
    // Tests see the real sys.stdout (a file with a descriptor), as under
    // plain unittest; unittest's buffer=True would hand them a StringIO.
    (
        "tests/test_streams.py",
        r#"
import subprocess
import sys
import unittest

class Streams(unittest.TestCase):
    def test_child_inherits_stdout(self):
        subprocess.run([sys.executable, "-c", "print('from a child')"], stdout=sys.stdout, check=True)

    def test_fileno(self):
        self.assertGreaterEqual(sys.stdout.fileno(), 0)
        self.assertGreaterEqual(sys.stderr.fileno(), 0)
"#,
    ),
    // A base class imported into a second module runs there too, under the
    // same id: the first result counts.
    (
        "tests/test_base.py",
        "import unittest\n\nclass Base(unittest.TestCase):\n    def test_shared(self):\n        pass\n",
    ),
    (
        "tests/test_derived.py",
        "import unittest\nfrom tests.test_base import Base\n\nclass Derived(Base):\n    def test_more(self):\n        pass\n",
    ),
    // Not an identifier: discover imports it as `tests.my`, which fails.
    ("tests/my.dir/__init__.py", ""),
    ("tests/my.dir/test_dotted.py", "import unittest\n"),
    // Not a package: discover never looks inside.
    (
        "tests/data/test_not_reached.py",
        "import unittest\n\nclass N(unittest.TestCase):\n    def test_n(self):\n        pass\n",
    ),
];

/// The fidelity script's own run of plain unittest discovery on `dir`:
/// id -> (outcome, skip reason).
fn plain_unittest(dir: &Path) -> BTreeMap<String, (String, String)> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/python-unittest/fidelity/compare.py");
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg("--unittest-only")
        .arg(dir)
        .arg("--tsv")
        .output()
        .expect("run compare.py");
    assert!(output.status.success(), "compare.py failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).expect("compare.py prints UTF-8");
    stdout
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let [outcome, id, reason] = fields[..] else { panic!("compare.py printed {line:?}") };
            (id.to_owned(), (outcome.to_owned(), reason.to_owned()))
        })
        .collect()
}

/// compare.py's escaping in --tsv lines.
fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n")
}

/// Kiln's results in the fidelity script's terms.
fn as_compared(results: &BTreeMap<String, TestResult>) -> BTreeMap<String, (String, String)> {
    results
        .iter()
        .map(|(id, r)| {
            let reason = if r.outcome == Outcome::Skip { escape(&r.message) } else { String::new() };
            (escape(id), (r.outcome.as_str().to_owned(), reason))
        })
        .collect()
}

#[tokio::test]
async fn python_unittest_reports_what_plain_unittest_discover_reports() {
    let host = PluginHost::new(policy(&["python3"])).unwrap();
    let (dir, files) = checkout(DISCOVER_FIXTURE);
    let results = run(&host, dir.path(), &files).await;

    use Outcome::*;
    let expected = BTreeMap::from([
        ("setUpClass (tests.test_class_fixtures.Skipped)", Skip),
        ("setUpModule (tests.test_fixtures)", Error),
        ("tearDownClass (tests.test_class_fixtures.TornDown)", Error),
        ("tests.InInit.test_in_init", Pass),
        ("tests.broken", Error),
        ("tests.chosen.Own.test_own", Pass),
        ("tests.chosen.test_picked.P.test_p", Pass),
        ("tests.my", Error),
        ("tests.skipped", Skip),
        ("tests.test_base.Base.test_shared", Pass),
        ("tests.test_class_fixtures.TornDown.test_y", Pass),
        ("tests.test_derived.Derived.test_more", Pass),
        ("tests.test_derived.Derived.test_shared", Pass),
        ("tests.test_skipped_module", Skip),
        ("tests.test_streams.Streams.test_child_inherits_stdout", Pass),
        ("tests.test_streams.Streams.test_fileno", Pass),
        ("tests.test_subtests.Sub.test_mixed (i=1)", Fail),
        ("tests.test_subtests.Sub.test_mixed (i=2)", Error),
        ("tests.test_subtests.Sub.test_mixed (i=3)", Skip),
        ("tests.test_subtests.Sub.test_skips_only [only]", Skip),
    ]);
    assert_eq!(outcomes(&results), expected, "{results:#?}");
    assert_eq!(as_compared(&results), plain_unittest(dir.path()), "Kiln and plain unittest differ");

    assert_eq!(message(&results, "tests.skipped"), "no GPU here");
    assert_eq!(message(&results, "setUpClass (tests.test_class_fixtures.Skipped)"), "class needs a database");
    // A fixture's output is captured with its error, as a test's is.
    let fixture = message(&results, "setUpModule (tests.test_fixtures)");
    assert!(fixture.contains("no module for you") && fixture.contains("setting up the module"), "{fixture}");
    assert!(message(&results, "tests.broken").contains("No module named 'does_not_exist'"));
    // Results from a package's own run belong to its __init__.py.
    assert_eq!(results["tests.chosen.test_picked.P.test_p"].file, "tests/chosen/__init__.py");
    assert_eq!(results["tests.InInit.test_in_init"].file, "tests/__init__.py");
}

#[tokio::test]
async fn output_is_captured_per_test_at_the_descriptor_level() {
    let host = PluginHost::new(policy(&["python3"])).unwrap();
    let (dir, files) = checkout(&[
        ("tests/__init__.py", ""),
        (
            "tests/test_output.py",
            r#"
import os
import subprocess
import sys
import unittest

class Output(unittest.TestCase):
    def test_a_quiet_pass(self):
        print("the passing test's output")

    def test_b_child_and_fd(self):
        print("python-level print")
        os.write(2, b"raw write to fd 2\n")
        subprocess.run([sys.executable, "-c", "import os; os.write(1, b'a child on fd 1\\n')"], check=True)
        self.fail("see the output")

    def test_c_own_output_only(self):
        self.fail("nothing printed here")
"#,
        ),
    ]);
    let results = run(&host, dir.path(), &files).await;
    let failed = message(&results, "tests.test_output.Output.test_b_child_and_fd");
    for needle in ["see the output", "python-level print", "raw write to fd 2", "a child on fd 1"] {
        assert!(failed.contains(needle), "{needle:?} is missing from {failed}");
    }
    assert!(!failed.contains("the passing test's output"), "{failed}");
    let own = message(&results, "tests.test_output.Output.test_c_own_output_only");
    assert!(!own.contains("python-level print") && !own.contains("Output ("), "{own}");
    assert_eq!(message(&results, "tests.test_output.Output.test_a_quiet_pass"), "");
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
    // The grandchild carries a marker in its command line, so that this
    // process can find it in the machine's /proc: the test sees only its
    // own PID namespace's /proc, and its writes do not reach the checkout.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let marker = format!("kiln-timeout-{}-{nanos}", std::process::id());
    let test = format!(
        r#"
import subprocess
import sys
import time
import unittest

class Hang(unittest.TestCase):
    def test_hangs(self):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "{marker}"])
        time.sleep(300)
"#
    );
    let (dir, files) = checkout(&[("tests/__init__.py", ""), ("tests/test_hang.py", &test)]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (stop, marker) = (stop.clone(), marker.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(pid) = process_with(&marker) {
                    return Some(pid);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        })
    };
    let results = run(&host, dir.path(), &files).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(outcomes(&results), BTreeMap::from([("tests.test_hang.Hang.test_hangs", Outcome::Error)]));
    let timed_out = message(&results, "tests.test_hang.Hang.test_hangs");
    assert!(timed_out.contains("ran out of time"), "{timed_out}");

    // The grandchild was in the command's process group: it must be dead
    // (gone, or a zombie nobody has reaped yet). SIGKILL was sent before
    // `run` returned, so this only waits for the kernel to deliver it.
    let pid = watcher.join().unwrap().expect("the grandchild was seen running");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while is_alive(pid) {
        assert!(std::time::Instant::now() < deadline, "process {pid} survived the timeout");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Test files that attack the warm driver they share a batch with. Each one
/// gets a bounded, clear result, and the ordinary files beside them exactly
/// their own results, with two files running at once.
const HOSTILE: &[(&str, &str)] = &[
    ("tests/__init__.py", ""),
    (
        "tests/test_good_a.py",
        "import unittest\n\nclass A(unittest.TestCase):\n    def test_pass(self):\n        pass\n\n    \
         def test_fail(self):\n        self.fail('a fails')\n",
    ),
    (
        "tests/test_good_b.py",
        "import unittest\n\nclass B(unittest.TestCase):\n    def test_one(self):\n        pass\n\n    \
         @unittest.skip('b skips')\n    def test_two(self):\n        pass\n",
    ),
    (
        "tests/test_stdin.py",
        "import sys\nimport unittest\n\nclass Stdin(unittest.TestCase):\n    def test_read(self):\n        \
         self.assertEqual(sys.stdin.read(), '')\n",
    ),
    (
        "tests/test_flood.py",
        "import unittest\n\nclass Flood(unittest.TestCase):\n    def test_100_mb(self):\n        \
         line = 'x' * (1 << 20)\n        for _ in range(100):\n            print(line)\n        self.fail('flooded')\n",
    ),
    (
        "tests/test_fds.py",
        "import os\nimport unittest\n\nclass Fds(unittest.TestCase):\n    def test_write(self):\n        \
         os.write(1, b'{\"file\": \"forged\"}\\n')\n        os.write(2, b'to stderr\\n')\n\n    \
         def test_close(self):\n        os.close(1)\n        os.close(2)\n\n    def test_after(self):\n        pass\n",
    ),
    (
        "tests/test_chdir.py",
        "import os\nimport unittest\n\nclass Chdir(unittest.TestCase):\n    def test_a_leave(self):\n        \
         os.chdir('/')\n\n    def test_b_after(self):\n        pass\n",
    ),
    (
        "tests/test_fork.py",
        // The forked copy fails the test and carries on with the rest of the
        // file, reporting first; only the real test process may report.
        "import os\nimport time\nimport unittest\n\nclass Fork(unittest.TestCase):\n    def test_a_fork(self):\n        \
         if os.fork() == 0:\n            raise RuntimeError('in the forked copy')\n        time.sleep(0.5)\n\n    \
         def test_b_after(self):\n        pass\n",
    ),
    (
        "tests/test_signals.py",
        "import signal\nimport unittest\n\nclass Signals(unittest.TestCase):\n    def test_ignore(self):\n        \
         for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):\n            \
         signal.signal(s, signal.SIG_IGN)\n",
    ),
    ("tests/test_sysexit.py", "import sys\nsys.exit(3)\n"),
    (
        "tests/test_modules.py",
        "import sys\nimport unittest\n\nclass Modules(unittest.TestCase):\n    def test_delete(self):\n        \
         for name in ['json', 'unittest', 'unittest.case', 'os']:\n            sys.modules.pop(name, None)\n\n    \
         def test_after(self):\n        pass\n",
    ),
    (
        "tests/test_crashes.py",
        "import ctypes\nimport os\nimport signal\nimport unittest\n\nclass Crashes(unittest.TestCase):\n    \
         def test_a_exit(self):\n        os._exit(0)\n\n    def test_b_segfault(self):\n        \
         ctypes.string_at(0)\n\n    def test_c_sigkill(self):\n        os.kill(os.getpid(), signal.SIGKILL)\n\n    \
         def test_d_fine(self):\n        pass\n",
    ),
];

/// A bounded fork bomb: forks until the command's process limit refuses,
/// then ends, taking its children with it (they are in its process group).
const FORK_BOMB: (&str, &str) = (
    "tests/test_forkbomb.py",
    "import os\nimport time\nimport unittest\n\nclass Bomb(unittest.TestCase):\n    def test_bomb(self):\n        \
     children = 0\n        try:\n            while children < 5000:\n                if os.fork() == 0:\n                    \
     time.sleep(60)\n                    os._exit(0)\n                children += 1\n        except OSError:\n            \
     pass\n        self.assertLess(children, 5000)\n",
);

#[tokio::test]
async fn hostile_test_files_get_bounded_results_and_the_others_their_exact_ones() {
    let host = PluginHost::new(policy(&["python3"])).unwrap();
    let mut files = HOSTILE.to_vec();
    // Only where a process limit stops it.
    let limited = kiln_sandbox::probe()
        .get(kiln_sandbox::Mechanism::ProcessLimit)
        .is_some_and(|m| m.coverage == kiln_sandbox::Coverage::Full);
    if limited {
        files.push(FORK_BOMB);
    } else {
        eprintln!("no process limit on this machine: the fork bomb is left out");
    }
    let (dir, names) = checkout(&files);
    let (results, done) = run_with_events(&host, dir.path(), &names).await;

    use Outcome::*;
    let mut expected = BTreeMap::from([
        ("tests.test_good_a.A.test_pass", Pass),
        ("tests.test_good_a.A.test_fail", Fail),
        ("tests.test_good_b.B.test_one", Pass),
        ("tests.test_good_b.B.test_two", Skip),
        ("tests.test_stdin.Stdin.test_read", Pass),
        ("tests.test_fds.Fds.test_write", Pass),
        ("tests.test_fds.Fds.test_close", Pass),
        ("tests.test_fds.Fds.test_after", Pass),
        ("tests.test_chdir.Chdir.test_a_leave", Pass),
        ("tests.test_chdir.Chdir.test_b_after", Pass),
        ("tests.test_fork.Fork.test_a_fork", Pass),
        ("tests.test_fork.Fork.test_b_after", Pass),
        ("tests.test_signals.Signals.test_ignore", Pass),
        ("tests.test_sysexit", Error),
        ("tests.test_modules.Modules.test_delete", Pass),
        ("tests.test_modules.Modules.test_after", Pass),
        ("tests.test_crashes.Crashes.test_a_exit", Error),
        ("tests.test_crashes.Crashes.test_b_segfault", Error),
        ("tests.test_crashes.Crashes.test_c_sigkill", Error),
        ("tests.test_crashes.Crashes.test_d_fine", Pass),
    ]);
    if limited {
        expected.insert("tests.test_forkbomb.Bomb.test_bomb", Pass);
    }
    let mut got = outcomes(&results);
    // Printing 100 MB fails or errors (the output file's size limit), with a
    // bounded message either way.
    let flood = got.remove("tests.test_flood.Flood.test_100_mb");
    assert!(matches!(flood, Some(Fail | Error)), "{flood:?}");
    assert!(message(&results, "tests.test_flood.Flood.test_100_mb").len() <= 64 * 1024);
    assert_eq!(got, expected, "{results:#?}");

    // Every file is done once (`run_with_events` checks that), each crash
    // names its cause, and what a test forged on fd 1 is not a result.
    assert_eq!(done.len(), names.len(), "{done:?}");
    assert!(message(&results, "tests.test_crashes.Crashes.test_a_exit").contains("os._exit"));
    assert!(message(&results, "tests.test_crashes.Crashes.test_b_segfault").contains("SIGSEGV"));
    assert!(message(&results, "tests.test_crashes.Crashes.test_c_sigkill").contains("SIGKILL"));
    assert!(
        message(&results, "tests.test_sysexit").contains("SystemExit"),
        "{}",
        message(&results, "tests.test_sysexit")
    );
    assert!(results.values().all(|r| r.file != "forged"));
}

#[tokio::test]
async fn an_interpreter_too_old_for_the_driver_is_one_clear_error_per_file() {
    let home = std::env::var("HOME").unwrap_or_default();
    let old: Vec<PathBuf> = ["2.7.18", "3.6.15", "3.7.16"]
        .iter()
        .map(|v| Path::new(&home).join(format!(".pyenv/versions/{v}/bin/python")))
        .filter(|p| p.is_file())
        .collect();
    if old.is_empty() {
        eprintln!("no Python older than 3.8 under ~/.pyenv: nothing to check");
        return;
    }
    let (dir, files) = checkout(&[("tests/__init__.py", ""), ("tests/test_a.py", "x = 1\n"), ("tests/test_b.py", "")]);
    for python in old {
        eprintln!("checking {}", python.display());
        let programs = BTreeMap::from([("python3".to_owned(), python.clone())]);
        let host = PluginHost::new(Policy { programs, ..policy(&[]) }).unwrap();
        let results = run(&host, dir.path(), &files).await;
        let expected = BTreeMap::from([("tests.test_a", Outcome::Error), ("tests.test_b", Outcome::Error)]);
        assert_eq!(outcomes(&results), expected, "{}: {results:#?}", python.display());
        let text = message(&results, "tests.test_a");
        assert!(text.contains("needs Python 3.8 or newer") && text.contains("python3 is Python "), "{text}");
    }
}

/// A live process whose command line contains `marker`.
fn process_with(marker: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        (String::from_utf8_lossy(&cmdline).contains(marker) && is_alive(pid)).then_some(pid)
    })
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
    let summary = &host.plugins()[2];
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

    // A loop costs only its own file: each file runs in a fresh instance,
    // and every file is reported done, the failed one after its error.
    let (results, done) = run_with_events(&host, dir.path(), &files(&["ok", "loop", "after"])).await;
    check(&results, "misbehave/ok", Outcome::Pass, "");
    check(&results, "misbehave/loop", Outcome::Error, "plugin misbehaving exceeded its time limit of 500ms");
    check(&results, "misbehave/after", Outcome::Pass, "");
    assert_eq!(done, files(&["ok", "loop", "after"]));

    // Blocked inside WASI, where no epoch check runs.
    let results = run(&host, dir.path(), &files(&["sleep"])).await;
    check(&results, "misbehave/sleep", Outcome::Error, "exceeded its time limit of 500ms");

    let results = run(&host, dir.path(), &files(&["balloon"])).await;
    check(&results, "misbehave/balloon", Outcome::Error, "exceeded its memory limit of 32 MiB");

    let results = run(&host, dir.path(), &files(&["panic"])).await;
    check(&results, "misbehave/panic", Outcome::Error, "plugin misbehaving crashed");
    check(&results, "misbehave/panic", Outcome::Error, "deliberate panic in the misbehaving plugin");

    // A flood of output stays bounded: whether the plugin gets to report its
    // 4 MiB message or runs out of time printing 64 MiB, what is kept is small.
    let results = run(&host, dir.path(), &files(&["flood"])).await;
    let flood = &results["misbehave/flood"];
    assert!(matches!(flood.outcome, Outcome::Fail | Outcome::Error), "{:?}", flood.outcome);
    assert!(flood.message.len() <= 65 * 1024, "kept {} bytes", flood.message.len());

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
async fn spawned_programs_stream_and_die_with_their_handle() {
    let mut host = PluginHost::new(policy(&["sh"])).unwrap();
    host.load_file(&misbehaving_wasm()).unwrap();
    let (dir, _) = checkout(&[("misbehave/.keep", "")]);
    let files: Vec<String> =
        ["spawn-stream", "spawn-abandon", "after-done"].iter().map(|n| format!("misbehave/{n}")).collect();
    let started = std::time::Instant::now();
    let (results, done) = run_with_events(&host, dir.path(), &files).await;

    // The plugin saw stdout, its input echoed back, stderr, and the exit
    // code, then `exited` again.
    let stream = &results["misbehave/spawn-stream"];
    assert_eq!(stream.outcome, Outcome::Pass);
    assert_eq!(stream.message, r#"out:"first\ngot second\n"|err:"oops\n"|exit:Some(3)|again:true"#);

    // The abandoned `sleep 31.4159` was killed with its handle: the run did
    // not wait for it, and nothing of it is left.
    assert_eq!(results["misbehave/spawn-abandon"].outcome, Outcome::Pass);
    assert!(started.elapsed() < Duration::from_secs(20), "the run waited for the abandoned program");
    let left = std::process::Command::new("pgrep").args(["-f", "sleep 31.4159"]).output().unwrap();
    assert!(left.stdout.is_empty(), "left running: {}", String::from_utf8_lossy(&left.stdout));

    // A result after its file's `file-done` is dropped, a second `file-done`
    // and one for a file outside the batch are ignored: the file keeps its
    // first result and is done once (`run_with_events` checks both).
    let after = &results["misbehave/after-done"];
    assert_eq!((after.outcome, after.message.as_str()), (Outcome::Pass, "before"));
    assert_eq!(done, files);
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
    assert!(matches!(host.run(dir.path(), &files, 2, &tx).await, Err(HostError::ReportClosed)));
}

/// TAP scripts covering every outcome, and the ways a script can break its
/// plan, run through the built-in tap plugin with a real `sh`.
const TAP_FIXTURE: &[(&str, &str)] = &[
    (
        "tests/basic.t",
        r#"echo "TAP version 14"
echo "1..6"
echo "ok 1 - adds"
echo "not ok 2 - subtracts"
echo "  ---"
echo "  got: 1"
echo "  expected: 2"
echo "  ..."
echo "ok 3 - downloads # SKIP no network here"
echo "not ok 4 - rounds # TODO not yet"
echo "ok 5 - divides # TODO should not pass yet"
echo "ok 6"
"#,
    ),
    ("tests/short.t", "#!/bin/sh\necho 1..3\necho 'ok 1 - only one'\n"),
    ("tests/crash.t", "#!/bin/sh\necho 'ok 1 - before the crash'\necho 'it broke' >&2\nexit 3\n"),
    ("tests/bail.t", "echo 1..2\necho 'ok 1'\necho 'Bail out! no database'\n"),
    ("tests/skipall.t", "echo '1..0 # SKIP needs a GPU'\n"),
    ("tests/lib.sh", "say_ok() { echo \"ok $1 - $2\"; }\n"),
    ("tests/test_sourcing.sh", "#!/bin/sh\n. tests/lib.sh\necho 1..1\nsay_ok 1 'from a helper'\n"),
    ("tests/test_bash.sh", "#!/usr/bin/env bash\necho 1..1\necho ok 1\n"),
    ("tests/ruby.t", "#!/usr/bin/env ruby\nputs '1..1'\n"),
];

#[tokio::test]
async fn tap_reports_every_outcome() {
    let host = PluginHost::new(policy(&["sh"])).unwrap();
    let tap = host.plugins().into_iter().find(|p| p.name == "tap").expect("tap is built in");
    assert_eq!(tap.claims, ["tests/**/*.t", "tests/**/test*.sh"]);
    assert_eq!(tap.programs, ["sh", "bash", "perl", "python3"]);
    assert_eq!(tap.granted, ["sh"]);

    let (dir, files) = checkout(TAP_FIXTURE);
    let (results, done) = run_with_events(&host, dir.path(), &files).await;
    use Outcome::*;
    let expected = BTreeMap::from([
        ("tests/bail.t", Error),
        ("tests/bail.t::1", Pass),
        ("tests/basic.t::1 adds", Pass),
        ("tests/basic.t::2 subtracts", Fail),
        ("tests/basic.t::3 downloads", Skip),
        ("tests/basic.t::4 rounds", Xfail),
        ("tests/basic.t::5 divides", Xpass),
        ("tests/basic.t::6", Pass),
        ("tests/crash.t", Error),
        ("tests/crash.t::1 before the crash", Pass),
        ("tests/ruby.t", Error),
        ("tests/short.t", Error),
        ("tests/short.t::1 only one", Pass),
        ("tests/skipall.t", Skip),
        ("tests/test_bash.sh", Error),
        ("tests/test_sourcing.sh::1 from a helper", Pass),
    ]);
    assert_eq!(outcomes(&results), expected, "{results:#?}");
    // Every claimed file is done; the helper is not claimed.
    let mut done = done;
    done.sort();
    let mut claimed: Vec<String> = files.iter().filter(|f| *f != "tests/lib.sh").cloned().collect();
    claimed.sort();
    assert_eq!(done, claimed);

    assert_eq!(message(&results, "tests/basic.t::2 subtracts"), "got: 1\nexpected: 2");
    assert_eq!(message(&results, "tests/basic.t::3 downloads"), "no network here");
    assert_eq!(message(&results, "tests/basic.t::4 rounds"), "not yet");
    assert_eq!(message(&results, "tests/skipall.t"), "needs a GPU");
    assert!(message(&results, "tests/short.t").contains("planned 3 test(s) but 1 of them ran (missing: 2, 3)"));
    let crash = message(&results, "tests/crash.t");
    assert!(crash.contains("no plan") && crash.contains("exited with code 3") && crash.contains("it broke"), "{crash}");
    assert!(message(&results, "tests/bail.t").contains("bailed out: no database"));
    let denied = message(&results, "tests/test_bash.sh");
    assert!(denied.contains("--allow-program bash"), "{denied}");
    assert!(message(&results, "tests/ruby.t").contains("asks for `ruby`"));
    assert_eq!(results["tests/basic.t::1 adds"].file, "tests/basic.t");
}

#[tokio::test]
async fn the_first_loaded_plugin_gets_a_file_more_than_one_claims_and_the_overlap_is_logged() {
    let mut host = PluginHost::new(policy(&["python3"])).unwrap();
    host.load_file(&misbehaving_wasm()).unwrap();
    assert_eq!(host.claimants("tests/test_ok.py"), ["python-unittest", "misbehaving"]);
    assert_eq!(host.claimants("misbehave/ok"), ["misbehaving"]);
    assert!(host.claimants("README.md").is_empty());

    let (dir, files) = checkout(&[
        ("tests/__init__.py", ""),
        ("tests/test_ok.py", "import unittest\n\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n"),
    ]);
    let log = LogCapture::default();
    let results = {
        let _guard = tracing::subscriber::set_default(log.subscriber());
        run(&host, dir.path(), &files).await
    };
    // misbehaving would have reported `tests/test_ok.py` as an unknown action.
    assert_eq!(outcomes(&results), BTreeMap::from([("tests.test_ok.T.test_ok", Outcome::Pass)]));
    let log = log.text();
    let line =
        log.lines().find(|l| l.contains("also_claimed_by")).unwrap_or_else(|| panic!("no overlap warning: {log}"));
    for needle in ["tests/__init__.py", "python-unittest", "misbehaving", "files=2"] {
        assert!(line.contains(needle), "{needle} missing from {line}");
    }
}

/// Collects what `tracing` logs, for tests that check a log line.
#[derive(Clone, Default)]
struct LogCapture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl LogCapture {
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + use<> {
        let sink = self.clone();
        tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).finish()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("the log lock")).into_owned()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("the log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn compilations(host: &PluginHost) -> Vec<Compilation> {
    host.plugins().iter().map(|p| p.compilation).collect()
}

fn cache_entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the cache directory")
        .map(|e| e.expect("a cache entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    entries.sort();
    entries
}

#[tokio::test]
async fn compiled_plugins_are_cached_on_disk_and_a_damaged_entry_is_recompiled() {
    use Compilation::{Cached, Compiled};
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("plugin-cache");

    let host = PluginHost::with_cache(policy(&["sh"]), &cache).unwrap();
    assert_eq!(compilations(&host), [Compiled, Compiled]);
    let entries = cache_entries(&cache);
    assert_eq!(entries.len(), 2, "one entry per built-in plugin");
    drop(host);

    // A restart compiles nothing, and the cached plugins work.
    let host = PluginHost::with_cache(policy(&["sh"]), &cache).unwrap();
    assert_eq!(compilations(&host), [Cached, Cached]);
    let (checkout_dir, files) = checkout(&[("tests/a.t", "echo 1..1; echo ok 1 - cached\n")]);
    let results = run(&host, checkout_dir.path(), &files).await;
    assert_eq!(outcomes(&results), BTreeMap::from([("tests/a.t::1 cached", Outcome::Pass)]));
    drop(host);

    // A flipped byte in the compiled code: not trusted, recompiled, replaced.
    let mut bytes = std::fs::read(&entries[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&entries[0], &bytes).unwrap();
    let host = PluginHost::with_cache(policy(&["sh"]), &cache).unwrap();
    let mut seen = compilations(&host);
    seen.sort_by_key(|c| *c == Cached);
    assert_eq!(seen, [Compiled, Cached]);
    let results = run(&host, checkout_dir.path(), &files).await;
    assert_eq!(outcomes(&results), BTreeMap::from([("tests/a.t::1 cached", Outcome::Pass)]));
    drop(host);
    assert_eq!(compilations(&PluginHost::with_cache(policy(&["sh"]), &cache).unwrap()), [Cached, Cached]);

    // A truncated entry (a crash mid-write would leave none, but a full disk
    // might) and an entry with another entry's content are recompiled too.
    let second = std::fs::read(&entries[1]).unwrap();
    std::fs::write(&entries[0], &second).unwrap();
    std::fs::write(&entries[1], &second[..second.len() / 3]).unwrap();
    assert_eq!(compilations(&PluginHost::with_cache(policy(&["sh"]), &cache).unwrap()), [Compiled, Compiled]);
    assert_eq!(compilations(&PluginHost::with_cache(policy(&["sh"]), &cache).unwrap()), [Cached, Cached]);
    assert_eq!(cache_entries(&cache), entries, "entries are replaced in place, no temporary files left");
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);
}

/// `wasm` with every `kiln:executor` interface name moved to `version`
/// (same length as the current one, so the binary stays valid).
fn with_contract_version(wasm: &[u8], version: &str) -> Vec<u8> {
    assert_eq!(version.len(), kiln_plugin_host::CONTRACT_VERSION.len());
    let mut bytes = wasm.to_vec();
    let mut patched = 0;
    for interface in ["executor", "host", "types"] {
        let from = format!("kiln:executor/{interface}@{}", kiln_plugin_host::CONTRACT_VERSION);
        let to = format!("kiln:executor/{interface}@{version}");
        let mut at = 0;
        while let Some(offset) = bytes[at..].windows(from.len()).position(|w| w == from.as_bytes()) {
            let start = at + offset;
            bytes[start..start + to.len()].copy_from_slice(to.as_bytes());
            at = start + to.len();
            patched += 1;
        }
    }
    assert!(patched > 0, "no contract names found");
    bytes
}

#[tokio::test]
async fn a_plugin_for_another_contract_version_is_refused_naming_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let original = std::fs::read(misbehaving_wasm()).unwrap();
    let newer = dir.path().join("newer.wasm");
    std::fs::write(&newer, with_contract_version(&original, "0.9.0")).unwrap();
    let mut host = PluginHost::new(policy(&[])).unwrap();
    let error = host.load_file(&newer).unwrap_err();
    let message = error.to_string();
    assert!(
        matches!(&error, HostError::IncompatibleContract { found, supported, .. } if found == "0.9.0" && supported == "0.2.1")
    );
    assert!(message.contains("kiln:executor@0.9.0") && message.contains("kiln:executor@0.2.1"), "{message}");
    assert!(matches!(PluginHost::check_file(&newer), Err(HostError::IncompatibleContract { .. })));

    // A newer patch release of the same 0.2 contract is still refused (0.x:
    // nothing newer than the host's own), and so are plugins built for 0.1
    // (0.2 changed `run` and `run-command`): the message names both versions
    // and says to rebuild. The same version loads, and so does an older
    // patch release (0.2.0 plugins run on this 0.2.1 host).
    let patch = dir.path().join("patch.wasm");
    std::fs::write(&patch, with_contract_version(&original, "0.2.9")).unwrap();
    assert!(matches!(host.load_file(&patch), Err(HostError::IncompatibleContract { .. })));
    for old in ["0.1.0", "0.1.1"] {
        let older = dir.path().join(format!("{old}.wasm"));
        std::fs::write(&older, with_contract_version(&original, old)).unwrap();
        let message = host.load_file(&older).unwrap_err().to_string();
        assert!(
            message.contains(&format!("kiln:executor@{old}")) && message.contains("kiln:executor@0.2.1"),
            "{message}"
        );
    }
    for compatible in ["0.2.1", "0.2.0"] {
        let same = dir.path().join(format!("{compatible}.wasm"));
        std::fs::write(&same, with_contract_version(&original, compatible)).unwrap();
        PluginHost::new(policy(&[])).unwrap().load_file(&same).unwrap();
    }
}

#[test]
fn check_describes_a_plugin_or_says_why_it_is_not_one() {
    let tap = PluginHost::check_file(&Path::new(env!("KILN_PLUGINS_WASM_DIR")).join("tap.wasm")).unwrap();
    assert_eq!((tap.name.as_str(), tap.contract.as_str()), ("tap", "0.2.1"));
    assert_eq!(tap.claims, ["tests/**/*.t", "tests/**/test*.sh"]);
    assert_eq!(tap.programs, ["sh", "bash", "perl", "python3"]);
    assert!(tap.granted.is_empty());
    assert!(tap.imports.iter().any(|i| i == "kiln:executor/host@0.2.1"), "{:?}", tap.imports);

    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let core_module = file("core.wasm", b"\0asm\x01\0\0\0");
    let error = PluginHost::check_file(&core_module).unwrap_err();
    assert!(matches!(error, HostError::Compile { .. }));
    assert!(error.to_string().contains("core WebAssembly module, not a component"), "{error}");

    let garbage = file("garbage.wasm", b"#!/bin/sh\n");
    let error = PluginHost::check_file(&garbage).unwrap_err();
    assert!(error.to_string().contains("not a WebAssembly component"), "{error}");

    let empty_component = file("empty.wasm", b"\0asm\x0d\0\x01\0");
    let error = PluginHost::check_file(&empty_component).unwrap_err();
    assert!(matches!(error, HostError::NotAPlugin { .. }));
    assert!(error.to_string().contains("does not export kiln:executor/executor"), "{error}");
}
