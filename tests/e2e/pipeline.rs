//! The main job end to end: observer → dispatcher → two runners → the
//! python-unittest plugin → per-test results stored by the dispatcher.

use kiln_proto::{CommitReport, CommitStatus, Outcome};

use crate::harness::{Cluster, Repo, kiln, outcomes};

const SAMPLE: &[(&str, &str)] = &[
    ("calc.py", include_str!("../../crates/kiln/src/demo/sample/calc.py")),
    ("tests/__init__.py", include_str!("../../crates/kiln/src/demo/sample/tests/__init__.py")),
    ("tests/test_calc.py", include_str!("../../crates/kiln/src/demo/sample/tests/test_calc.py")),
    ("tests/test_plugins.py", include_str!("../../crates/kiln/src/demo/sample/tests/test_plugins.py")),
    // Not a test module (no __init__.py on the way): unittest discovery skips it, and so must Kiln.
    (
        "tests/helpers/test_not_a_package.py",
        "import unittest\nclass T(unittest.TestCase):\n    def test_x(self): pass\n",
    ),
];

fn expected(shout: Outcome) -> Vec<(String, Outcome)> {
    [
        ("tests.test_calc.CalcTest.test_add", Outcome::Pass),
        ("tests.test_calc.CalcTest.test_add_strings", Outcome::Xpass),
        ("tests.test_calc.CalcTest.test_download", Outcome::Skip),
        ("tests.test_calc.CalcTest.test_float_is_exact", Outcome::Xfail),
        ("tests.test_calc.CalcTest.test_lookup", Outcome::Error),
        ("tests.test_calc.CalcTest.test_shout", shout),
        ("tests.test_calc.TextTest.test_strip", Outcome::Pass),
        ("tests.test_plugins", Outcome::Error),
    ]
    .into_iter()
    .map(|(id, o)| (id.to_owned(), o))
    .collect()
}

fn message<'a>(report: &'a CommitReport, id: &str) -> &'a str {
    &report.tests.iter().find(|t| t.id == id).unwrap_or_else(|| panic!("no test {id}")).message
}

#[test]
fn a_commit_flows_to_stored_per_test_results_and_a_fix_is_picked_up_by_polling() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), SAMPLE);
    let first = repo.commit("calc and its tests");
    cluster.runner("runner-1");
    cluster.runner("runner-2");
    cluster.observer("observer", &repo.path, "300ms");

    let report = cluster.wait_for(&first);
    assert_eq!(outcomes(&report).into_iter().collect::<Vec<_>>(), expected(Outcome::Fail), "{}", cluster.logs());
    assert_eq!(report.status, CommitStatus::Failed);
    assert_eq!((report.counts.total, report.counts.pass, report.counts.error), (8, 2, 2));
    assert_eq!(report.branch, "main");
    assert!(report.runner.as_deref().is_some_and(|r| r.starts_with("runner-")), "{report:?}");
    assert!(message(&report, "tests.test_calc.CalcTest.test_download").contains("needs a network"));
    assert!(message(&report, "tests.test_calc.CalcTest.test_shout").contains("AssertionError: 'KILNS' != 'KILN'"));
    assert!(message(&report, "tests.test_calc.CalcTest.test_lookup").contains("KeyError: 'b'"));
    assert!(message(&report, "tests.test_plugins").contains("yaml_that_is_not_installed"));
    for t in &report.tests {
        assert_eq!(
            t.file,
            if t.id.starts_with("tests.test_plugins") { "tests/test_plugins.py" } else { "tests/test_calc.py" }
        );
    }

    // The dispatcher keeps the same document as a file.
    // The file is written after the state is stored: wait for its final version.
    let on_disk = cluster.wait_stored(&first, "final", |r| r.status.is_final());
    assert_eq!(on_disk, report);
    let stored = cluster.state().join(format!("results/{first}.json"));
    let junit = std::fs::read_to_string(stored.with_extension("xml")).expect("JUnit file");
    assert!(junit.contains(r#"tests="8" failures="2" errors="2" skipped="2""#), "{junit}");

    // `kiln results` in text form exits 1 for a failed commit.
    let text = kiln()
        .args(["results", first.as_str(), "--dispatcher", &cluster.addr])
        .arg("--identity")
        .arg(cluster.certs().join("admin"))
        .output()
        .expect("kiln results");
    assert_eq!(text.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("FAILED") && stdout.contains("FAIL  tests.test_calc.CalcTest.test_shout"), "{stdout}");

    // A second commit fixes the failure; the observer's polling picks it up.
    repo.write(&[("calc.py", include_str!("../../crates/kiln/src/demo/fixed/calc.py"))]);
    let second = repo.commit("fix shout");
    let report = cluster.wait_for(&second);
    assert_eq!(outcomes(&report).into_iter().collect::<Vec<_>>(), expected(Outcome::Pass), "{}", cluster.logs());
    assert!(cluster.dir.path().join(format!("state/results/{second}.json")).exists());
}

const ONE_TEST: &[(&str, &str)] = &[
    ("tests/__init__.py", ""),
    (
        "tests/test_one.py",
        "import unittest\n\n\nclass One(unittest.TestCase):\n    def test_one(self):\n        pass\n",
    ),
];

#[test]
fn without_branch_the_observer_watches_the_branch_head_names() {
    let mut cluster = Cluster::start();
    // What a plain `git init` makes on many machines.
    let repo = Repo::on_branch(cluster.dir.path(), "master", ONE_TEST);
    let commit = repo.commit("one test");
    cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "200ms");
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Passed, "{}", cluster.logs());
    assert_eq!(report.branch, "master");
}

#[test]
fn a_missing_branch_is_said_once_naming_the_branches_there_are() {
    let mut cluster = Cluster::start();
    let repo = Repo::on_branch(cluster.dir.path(), "master", ONE_TEST);
    let first = repo.commit("one test");
    let observer = cluster.observer_with("observer", &repo.path, "100ms", &["--branch", "main", "--branch", "master"]);
    cluster.wait_log(observer, &format!("commit={first}"));
    // A later poll: the missing branch is looked at again, and not said again.
    repo.write(&[("tests/test_two.py", "")]);
    let second = repo.commit("two");
    cluster.wait_log(observer, &format!("commit={second}"));
    let log = cluster.procs[observer].log();
    assert_eq!(log.matches("there is no branch `main`").count(), 1, "{log}");
    assert!(log.contains("its branches: `master`"), "{log}");
    // Once the branch appears, it is watched.
    repo.git(&["branch", "main"]);
    cluster.wait_log(observer, "the branch exists now");
}

#[test]
fn each_fact_is_logged_once_and_job_lines_belong_to_the_job() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), ONE_TEST);
    let commit = repo.commit("one test");
    let runner = cluster.runner("runner-1");
    cluster.wait_log(0, "runner registered");
    // The runner is waiting when the observer queues the commit, so the
    // observer's request is what hands the job out.
    let observer = cluster.observer_with("observer", &repo.path, "200ms", &["--branch", "main"]);
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Passed, "{}", cluster.logs());

    let log = cluster.procs[runner].log();
    let lines = |text: &str| log.lines().filter(|l| l.contains(text)).count();
    let plugins = lines("plugin loaded");
    assert!(plugins >= 1, "{log}");
    // One line per plugin: each names a different plugin.
    let names: std::collections::BTreeSet<_> = log
        .lines()
        .filter(|l| l.contains("plugin loaded"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("plugin=")))
        .collect();
    assert_eq!(names.len(), plugins, "{log}");
    assert_eq!(lines("allowed program"), 1, "one line for python3\n{log}");

    let log = cluster.procs[observer].log();
    let watching = log.lines().find(|l| l.contains("watching")).unwrap_or_else(|| panic!("{log}"));
    assert!(watching.contains("branches=main") && watching.contains("mode=latest"), "{watching}");

    let log = cluster.procs[0].log();
    let finished = log.lines().find(|l| l.contains("job finished")).unwrap_or_else(|| panic!("{log}"));
    assert!(finished.contains("job{") && !finished.contains("observer"), "{finished}");
    // `kiln results --wait` asks again and again on one connection.
    let admin = log.lines().filter(|l| l.contains("peer{peer=admin") && l.ends_with(": connected")).count();
    assert_eq!(admin, 1, "{log}");
    // Logs go to stderr; stdout held only the address, which the harness read.
    let stdout = std::fs::read_to_string(cluster.dir.path().join("dispatcher-0.stdout")).expect("stdout");
    assert_eq!(stdout, "");
}

#[test]
fn a_test_process_command_line_is_short_and_names_its_file() {
    let mut cluster = Cluster::start();
    // The test reads its own command line, as `ps` would show it.
    let test = "import unittest\n\n\nclass Cmdline(unittest.TestCase):\n    def test_cmdline(self):\n        \
                with open('/proc/self/cmdline', 'rb') as f:\n            args = f.read().split(b'\\0')[:-1]\n        \
                self.assertEqual(args[1], b'-c')\n        \
                self.assertRegex(args[2], rb'^import sys; exec\\(sys\\.stdin\\.read\\([0-9]+\\)\\)$')\n        \
                self.assertEqual(args[-1], b'tests/test_cmdline.py')\n        \
                self.assertIn(b'--slots', args)\n        self.assertLess(sum(map(len, args)), 200, args)\n";
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_cmdline.py", test)]);
    let commit = repo.commit("read the command line");
    cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "200ms");
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}\n{}", cluster.logs());
}

#[test]
fn each_result_reaches_the_dispatcher_while_its_file_still_runs() {
    let mut cluster = Cluster::start();
    // test_a ends at once; test_b, in the same file, sleeps. With one
    // process per file reporting at its exit, test_a would arrive with test_b.
    let test = "import time\nimport unittest\n\n\nclass Stream(unittest.TestCase):\n    def test_a_quick(self):\n        \
                pass\n\n    def test_b_slow(self):\n        time.sleep(6)\n";
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_stream.py", test)]);
    let commit = repo.commit("a quick test and a slow one");
    cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "200ms");
    let running = cluster.wait_stored(&commit, "running with test_a stored", |r| {
        r.tests.iter().any(|t| t.id == "tests.test_stream.Stream.test_a_quick")
    });
    assert_eq!(running.status, CommitStatus::Running, "{running:?}");
    assert_eq!(running.tests.len(), 1, "{running:?}");
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}");
    assert_eq!(report.tests.len(), 2);
}

#[test]
fn a_runner_confined_to_one_cpu_takes_one_slot_by_default() {
    let mut cluster = Cluster::start();
    // The machine may have more cores; the runner may use only CPU 0.
    let runner = cluster.runner_pinned("pinned", 0, &[]);
    cluster.wait_log(runner, "registered dispatcher=");
    let line = cluster.procs[runner].log().lines().find(|l| l.contains("registered dispatcher=")).unwrap().to_owned();
    assert!(line.ends_with("slots=1 held=0"), "{line}");
}
