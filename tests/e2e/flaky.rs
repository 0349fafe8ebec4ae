//! `kiln dispatcher --retry-failed`: a test file with a failing test runs
//! again on another runner; a test that failed and then passed is recorded
//! as passed and flaky, one that fails every time fails its commit.

use kiln_proto::{CommitStatus, Outcome};

use crate::harness::{Cluster, Repo};

/// Fails where it may use one CPU only, passes where it may use more:
/// a test whose outcome depends on the machine it runs on, as flaky tests'
/// do, but deterministically.
const FLAKY: &str = r#"import os, unittest

class Cpus(unittest.TestCase):
    def test_on_one_cpu(self):
        self.assertGreater(len(os.sched_getaffinity(0)), 1, "one CPU only")
"#;

const BROKEN: &str = r#"import unittest

class Broken(unittest.TestCase):
    def test_always(self):
        self.fail("broken every time")
"#;

#[test]
fn a_test_that_fails_then_passes_on_another_runner_is_flaky_and_its_commit_passes() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    assert!(cpus >= 2, "this test needs 2 CPUs to tell its runners apart; this machine gives it {cpus}");
    let mut cluster = Cluster::start_with(&["--retry-failed", "1"]);
    // `wide` has the most free slots and gets the first file, tests/__init__.py;
    // then both have one free slot, and the first by name, `narrow`, gets the test.
    let wide = cluster.runner_with("wide", &["--slots", "2"]);
    let narrow = cluster.runner_pinned("narrow", 0, &["--slots", "1"]);
    cluster.wait_log(wide, "registered dispatcher=");
    cluster.wait_log(narrow, "registered dispatcher=");
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_cpus.py", FLAKY)]);
    let first = repo.commit("a flaky test");
    cluster.observer("observer", &repo.path, "200ms");

    let report = cluster.wait_for(&first);
    assert_eq!(report.status, CommitStatus::Passed, "{report:#?}\n{}", cluster.logs());
    let [t] = &report.tests[..] else { panic!("one test expected: {report:#?}") };
    assert_eq!((t.outcome, t.flaky, t.runner.as_deref()), (Outcome::Pass, true, Some("wide")), "{}", cluster.logs());
    let [run] = &t.earlier[..] else { panic!("one earlier run expected: {t:#?}") };
    assert_eq!((run.outcome, run.runner.as_deref()), (Outcome::Fail, Some("narrow")));
    assert!(run.message.contains("one CPU only"), "{}", run.message);
    assert_eq!((report.counts.total, report.counts.pass, report.counts.flaky), (1, 1, 1));
    // People and tools are told.
    let out = cluster.admin(&["results", first.as_str()]);
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("flaky: passed on wide; also failed on narrow"), "{text}");
    assert!(text.contains("1 passed (1 flaky)"), "{text}");
    let out = cluster.admin(&["results", first.as_str(), "--format", "junit"]);
    let xml = String::from_utf8_lossy(&out.stdout);
    assert!(xml.contains("<flakyFailure message=\"AssertionError: 1 not greater than 1 : one CPU only\">"), "{xml}");

    // A test that fails every time fails its commit after its retry, and is not flaky.
    repo.write(&[("tests/test_broken.py", BROKEN)]);
    let second = repo.commit("a broken test");
    let report = cluster.wait_for(&second);
    assert_eq!(report.status, CommitStatus::Failed, "{report:#?}");
    let broken = report.tests.iter().find(|t| t.file == "tests/test_broken.py").unwrap();
    assert_eq!((broken.outcome, broken.flaky, broken.runs()), (Outcome::Fail, false, 2), "{broken:#?}");

    // The test's history: newest first, the first commit's run flaky.
    let cpus = "tests.test_cpus.Cpus.test_on_one_cpu";
    let out = cluster.admin(&["history", cpus, "--format", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let runs: Vec<kiln_proto::TestRun> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs.iter().map(|r| r.commit).collect::<Vec<_>>(), [second, first]);
    assert!(runs[1].flaky && runs[1].runs == 2 && runs[1].outcome == Outcome::Pass, "{runs:#?}");
    let out = cluster.admin(&["history", cpus]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{}  PASS", &first.as_str()[..12])) && text.contains("flaky (2 runs)"), "{text}");
    // The broken test started failing on the second commit; the flaky list names the CPU test.
    let out = cluster.admin(&["history", "tests.test_broken.Broken.test_always"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"), "{}", String::from_utf8_lossy(&out.stdout));
    let out = cluster.admin(&["flaky", "--format", "json"]);
    let flaky: Vec<kiln_proto::FlakyTest> = serde_json::from_slice(&out.stdout).unwrap();
    let listed = flaky.iter().find(|f| f.id == cpus).unwrap_or_else(|| panic!("{flaky:#?}"));
    assert!(listed.commits.contains(&first) && listed.seen == 2, "{listed:#?}");
    assert!(listed.sample.contains("one CPU only"), "{}", listed.sample);
    assert!(flaky.iter().all(|f| f.id != "tests.test_broken.Broken.test_always"), "failing every time is not flaky");
    let out = cluster.admin(&["flaky"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{cpus} (tests/test_cpus.py): flaky on")), "{text}");

    // Both runs are stored: a restarted dispatcher shows the same.
    cluster.restart_dispatcher();
    let again = cluster.wait_for(&first);
    assert_eq!(again.tests, cluster.stored(&first).unwrap().tests);
    assert!(again.tests[0].flaky && again.tests[0].earlier.len() == 1, "{again:#?}");
}

#[test]
fn a_test_that_fails_and_then_passes_on_an_empty_commit_is_flaky_on_the_same_tree() {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    assert!(cpus >= 2, "this test needs 2 CPUs to tell its runners apart; this machine gives it {cpus}");
    let mut cluster = Cluster::start();
    // The first commit runs where the test fails: on one CPU.
    let narrow = cluster.runner_pinned("narrow", 0, &["--slots", "1"]);
    cluster.wait_log(narrow, "registered dispatcher=");
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_cpus.py", FLAKY)]);
    let first = repo.commit("a test that depends on its machine");
    cluster.observer("observer", &repo.path, "200ms");
    assert_eq!(cluster.wait_for(&first).status, CommitStatus::Failed);
    // Then that runner goes (cleanly, so the dispatcher hears at once), and an
    // empty commit (the same tree) runs where it passes.
    cluster.procs[narrow].signal(crate::harness::Signal::SIGTERM);
    cluster.procs[narrow].child.wait().unwrap();
    let wide = cluster.runner_with("wide", &["--slots", "2"]);
    cluster.wait_log(wide, "registered dispatcher=");
    repo.git(&["commit", "--quiet", "--allow-empty", "-m", "run it again"]);
    let second: kiln_proto::CommitId = repo.git(&["rev-parse", "HEAD"]).parse().unwrap();
    assert_eq!(cluster.wait_for(&second).status, CommitStatus::Passed);
    let tree: kiln_proto::TreeId = repo.git(&["rev-parse", "HEAD^{tree}"]).parse().unwrap();

    let cpus = "tests.test_cpus.Cpus.test_on_one_cpu";
    let out = cluster.admin(&["flaky", "--format", "json"]);
    let flaky: Vec<kiln_proto::FlakyTest> = serde_json::from_slice(&out.stdout).unwrap();
    let [f] = &flaky[..] else { panic!("{flaky:#?}") };
    assert_eq!(f.id, cpus);
    assert_eq!(f.rules, [kiln_proto::FlakyRule::SameTree], "never flaky on one commit: {f:#?}");
    assert_eq!(f.flips, [kiln_proto::Flip { tree, passed: second, failed: first }]);
    assert!(f.commits.is_empty() && f.seen == 2, "{f:#?}");
    assert!(f.sample.contains("one CPU only"), "{}", f.sample);
    let text = String::from_utf8_lossy(&cluster.admin(&["flaky"]).stdout).into_owned();
    let line = format!(
        "  {cpus} (tests/test_cpus.py): flipped on the same code: passed on {} and failed on {}, both tree {}\n",
        &second.as_str()[..12],
        &first.as_str()[..12],
        &tree.as_str()[..12]
    );
    assert!(text.contains(&line), "{text}");

    // The history marks both runs.
    let out = cluster.admin(&["history", cpus, "--format", "json"]);
    let runs: Vec<kiln_proto::TestRun> = serde_json::from_slice(&out.stdout).unwrap();
    let shown: Vec<_> = runs.iter().map(|r| (r.commit, r.outcome, r.tree, r.flipped, r.transition)).collect();
    assert_eq!(
        shown,
        [(second, Outcome::Pass, Some(tree), true, true), (first, Outcome::Fail, Some(tree), true, false)]
    );
    let text = String::from_utf8_lossy(&cluster.admin(&["history", cpus]).stdout).into_owned();
    assert!(text.contains(&format!("flipped on the same code (tree {})", &tree.as_str()[..12])), "{text}");
    // The tree is stored: a restarted dispatcher says the same.
    cluster.restart_dispatcher();
    let out = cluster.admin(&["flaky", "--format", "json"]);
    let again: Vec<kiln_proto::FlakyTest> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again, flaky);
}
