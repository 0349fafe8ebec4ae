//! One commit split across runners, with real processes: the union of the
//! batches' results is exactly a one-runner run, a runner killed with
//! `kill -9` loses only its unfinished files, and a runner never runs more
//! test files at once than its slots.

use std::collections::{BTreeMap, BTreeSet};

use kiln_proto::{CommitId, CommitReport, CommitStatus, Outcome};

use crate::harness::{Cluster, Repo, Signal, borrow, outcomes, slow_suite};

/// Thirty test files with passes, failures, errors, skips and expected
/// failures, each test sleeping `sleep_ms` so batches overlap in time.
fn mixed_suite(sleep_ms: u64) -> Vec<(String, String)> {
    let mut files = vec![("tests/__init__.py".to_owned(), String::new())];
    for m in 0..30 {
        let body = match m % 5 {
            0 => "self.assertEqual(1, 2)",
            1 => "raise RuntimeError('boom')",
            2 => "self.skipTest('not today')",
            _ => "pass",
        };
        let src = format!(
            "import time\nimport unittest\n\n\nclass Mixed{m}(unittest.TestCase):\n    def test_a(self):\n        \
             time.sleep({s})\n        {body}\n\n    def test_b(self):\n        time.sleep({s})\n\n    \
             @unittest.expectedFailure\n    def test_c(self):\n        self.fail('expected')\n",
            s = sleep_ms as f64 / 1000.0
        );
        files.push((format!("tests/test_mixed{m:02}.py"), src));
    }
    files
}

/// Starts `names` runners with `flags`, waits until each has registered,
/// then an observer of `repo`.
fn runners_then_observer(cluster: &mut Cluster, repo: &Repo, names: &[&str], flags: &[&str]) -> Vec<usize> {
    let procs: Vec<usize> = names.iter().map(|n| cluster.runner_with(n, flags)).collect();
    for &p in &procs {
        cluster.wait_log(p, "registered");
    }
    cluster.observer("observer", &repo.path, "200ms");
    procs
}

/// Which runner ran each test file.
fn runners_by_file(report: &CommitReport) -> BTreeMap<String, BTreeSet<String>> {
    let mut by = BTreeMap::<String, BTreeSet<String>>::new();
    for t in &report.tests {
        by.entry(t.file.clone()).or_default().insert(t.runner.clone().unwrap_or_default());
    }
    by
}

/// Each id once: the report lists tests by id, so a repeat would show as a duplicate.
fn assert_each_once(report: &CommitReport) {
    let ids: BTreeSet<&str> = report.tests.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids.len(), report.tests.len(), "a test recorded twice: {report:?}");
}

/// Runs `commit` of the repository at `repo` in a fresh cluster of runners `names`.
fn run_once(repo: &Repo, commit: &CommitId, names: &[&str], flags: &[&str]) -> CommitReport {
    let mut cluster = Cluster::start();
    runners_then_observer(&mut cluster, repo, names, flags);
    cluster.wait_stored(commit, "final", |r| r.status.is_final())
}

#[test]
fn three_runners_give_exactly_the_results_of_one() {
    // One repository and commit, tested by two clusters.
    let dir = tempfile::tempdir().unwrap();
    let repo = Repo::new(dir.path(), &borrow(&mixed_suite(150)));
    let commit = repo.commit("thirty files");
    let alone = run_once(&repo, &commit, &["solo"], &["--slots", "1"]);
    let split = run_once(&repo, &commit, &["runner-1", "runner-2", "runner-3"], &["--slots", "1"]);
    assert_eq!(alone.status, CommitStatus::Failed, "{alone:?}");
    assert_eq!(split.status, alone.status);
    assert_eq!(alone.tests.len(), 90);
    assert_eq!(outcomes(&split), outcomes(&alone), "the union of the batches differs from one runner's run");
    assert_eq!(split.counts, alone.counts);
    assert_each_once(&split);
    // Every file ran on exactly one runner, and every runner ran some.
    let by_file = runners_by_file(&split);
    assert!(by_file.values().all(|r| r.len() == 1), "{by_file:?}");
    let ran: BTreeSet<&String> = by_file.values().flatten().collect();
    assert_eq!(ran.len(), 3, "not every runner ran files: {by_file:?}");
    assert_eq!(split.runner.as_deref(), Some("runner-1, runner-2, runner-3"));
    assert!(alone.tests.iter().all(|t| t.runner.as_deref() == Some("solo")));
    let xfail = split.tests.iter().filter(|t| t.outcome == Outcome::Xfail).count();
    assert_eq!(xfail, 30);
}

/// Three one-slot runners on 12 files of two 300 ms tests, started and
/// waited for until runner-1 has stored results and is still in the middle
/// of the commit.
fn three_runners_midway() -> (Cluster, CommitId, Vec<usize>) {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(12, 2, 300)));
    let commit = repo.commit("slow suite");
    let procs = runners_then_observer(&mut cluster, &repo, &["runner-1", "runner-2", "runner-3"], &["--slots", "1"]);
    // runner-1 has stored results and is still in the middle of the commit.
    cluster.wait_stored(&commit, "partly done by runner-1", |r| {
        r.tests.iter().any(|t| t.runner.as_deref() == Some("runner-1")) && r.tests.len() < 20
    });
    (cluster, commit, procs)
}

#[test]
fn a_killed_runner_of_three_loses_only_its_unfinished_files() {
    let (cluster, commit, procs) = three_runners_midway();
    cluster.procs[procs[0]].signal(Signal::SIGKILL);
    let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}");
    assert_eq!(report.tests.len(), 24, "{report:?}");
    assert_each_once(&report);
    // Files runner-1 finished stayed its own; the rest ran elsewhere once.
    let by_file = runners_by_file(&report);
    assert!(by_file.values().all(|r| !r.is_empty() && r.len() <= 2), "{by_file:?}");
    let log = cluster.procs[0].log();
    assert!(log.contains("requeued the work of a disconnected runner"), "{log}");
    // No file runner-1 had finished was handed out again: each finished
    // file shows one runner for all its tests.
    for (file, runners) in &by_file {
        if runners.contains("runner-1") && runners.len() == 1 {
            let n = report.tests.iter().filter(|t| &t.file == file).count();
            assert_eq!(n, 2, "{file}");
        }
    }
}

#[test]
fn a_runner_with_two_slots_never_runs_more_than_two_files_at_once() {
    let mut cluster = Cluster::start();
    // Eight files of one 600 ms test: 4.8 s of tests.
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(8, 1, 600)));
    let commit = repo.commit("eight files");
    runners_then_observer(&mut cluster, &repo, &["pair"], &["--slots", "2"]);
    let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}");
    // With at most two files at once, the tests' own durations add up to at
    // most twice the time the commit took; three at once would beat that.
    let busy: u64 = report.tests.iter().map(|t| t.duration_ms).sum();
    let took = report.finished_at_ms.unwrap() - report.queued_at_ms;
    assert!(busy >= 4_800, "{busy}");
    assert!(busy <= 2 * took, "{busy} ms of tests in {took} ms: more than two files at once");
    // Every batch asked for at most the runner's two slots.
    let log = cluster.procs[0].log();
    let assigned: Vec<&str> = log.lines().filter(|l| l.contains("assigned")).collect();
    assert!(!assigned.is_empty(), "{log}");
    assert!(assigned.iter().all(|l| l.contains("slots=1") || l.contains("slots=2")), "{assigned:?}");
}

#[test]
fn a_runner_stopped_past_its_lease_and_continued_adds_nothing_twice() {
    let (cluster, commit, procs) = three_runners_midway();
    // Frozen past the idle timeout (3 s): the dispatcher gives its batch to
    // the others. Woken, it finds its lease moved on.
    cluster.procs[procs[0]].signal(Signal::SIGSTOP);
    cluster.wait_log(0, "requeued the work of a disconnected runner");
    cluster.procs[procs[0]].signal(Signal::SIGCONT);
    let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}");
    assert_eq!(report.tests.len(), 24, "{report:?}");
    assert_each_once(&report);
}

#[test]
fn a_dispatcher_killed_during_a_split_commit_resumes_it_with_each_test_once() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(12, 2, 300)));
    let commit = repo.commit("slow suite");
    runners_then_observer(&mut cluster, &repo, &["runner-1", "runner-2"], &["--slots", "1"]);
    cluster.wait_stored(&commit, "partly done", |r| !r.tests.is_empty() && r.tests.len() < 16);
    cluster.procs[0].signal(Signal::SIGKILL);
    let _ = cluster.procs[0].child.wait();
    let addr = cluster.addr.clone();
    cluster.procs[0] = cluster.spawn_dispatcher(&addr, &[]);
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}\n{}", cluster.logs());
    assert_eq!(report.tests.len(), 24, "{report:?}");
    assert_each_once(&report);
}

/// A runner's later batches of a commit run in the interpreter its first
/// batch started (see crates/kiln-runner/src/session.rs): every test prints
/// its driver's PID namespace, pid (the parent of the forked child running
/// it) and start time (namespace ids and pids are reused over time) and
/// fails, so the results say which interpreter ran each file. Two one-slot runners
/// split 16 files of a first commit (no timings: batches shrink), so each
/// gets several batches; fewer interpreters than batches ran them.
#[test]
fn a_runners_later_batches_of_a_commit_join_its_warm_interpreter() {
    let mut cluster = Cluster::start();
    let mut files = vec![("tests/__init__.py".to_owned(), String::new())];
    for n in 0..16 {
        let src = format!(
            "import os\nimport time\nimport unittest\n\n\nclass W{n}(unittest.TestCase):\n    def test(self):\n        \
             time.sleep(0.1)\n        with open('/proc/%d/stat' % os.getppid()) as f:\n            \
             started = f.read().rsplit(')', 1)[1].split()[19]\n        \
             print('driver', os.readlink('/proc/self/ns/pid'), os.getppid(), started)\n        self.fail()\n"
        );
        files.push((format!("tests/test_w{n:02}.py"), src));
    }
    let repo = Repo::new(cluster.dir.path(), &borrow(&files));
    let commit = repo.commit("sixteen files");
    let procs = runners_then_observer(&mut cluster, &repo, &["runner-1", "runner-2"], &["--slots", "1"]);
    let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Failed, "{report:?}");
    assert_eq!(report.tests.len(), 16, "{report:?}");
    assert!(report.tests.iter().all(|t| t.outcome == Outcome::Fail), "{report:?}");
    assert_each_once(&report);
    let mut batches = 0;
    let mut interpreters = BTreeSet::new();
    for (name, &p) in ["runner-1", "runner-2"].iter().zip(&procs) {
        let log = cluster.procs[p].log();
        batches += log.matches("job started").count();
        for t in report.tests.iter().filter(|t| t.runner.as_deref() == Some(name)) {
            let driver = t.message.split("driver ").nth(1).and_then(|rest| rest.lines().next());
            interpreters.insert(format!("{name} {}", driver.unwrap_or_else(|| panic!("no driver in {t:?}"))));
        }
    }
    assert!(batches > 2, "each runner should get several batches: {batches}\n{}", cluster.logs());
    assert!(
        interpreters.len() < batches,
        "{} interpreters for {batches} batches: none joined a warm one\n{}",
        interpreters.len(),
        cluster.logs()
    );
    assert!(cluster.logs().contains("the batch joined the commit's warm plugin run"), "{}", cluster.logs());
}

/// The processes whose command line is exactly `sleep 27.1828`.
fn sleepers() -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else { return 0 };
    procs
        .filter_map(|p| std::fs::read(p.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| cmdline == b"sleep\x0027.1828\x00")
        .count()
}

/// Cancelling a commit stops a batch that joined a warm interpreter as it
/// stops any other: its tests are killed. The first eight files end at
/// once; the last eight start `sleep 27.1828`, so they run in later
/// batches, which join the runners' warm interpreters.
#[test]
fn cancelling_a_batch_that_joined_a_warm_interpreter_kills_its_tests() {
    let mut cluster = Cluster::start();
    let mut files = vec![("tests/__init__.py".to_owned(), String::new())];
    for n in 0..16 {
        let body = if n < 8 { "pass" } else { "subprocess.run(['sleep', '27.1828'])" };
        let src = format!(
            "import subprocess\nimport unittest\n\n\nclass C{n}(unittest.TestCase):\n    def test(self):\n        {body}\n"
        );
        files.push((format!("tests/test_c{n:02}.py"), src));
    }
    let repo = Repo::new(cluster.dir.path(), &borrow(&files));
    let commit = repo.commit("sleepers last");
    runners_then_observer(&mut cluster, &repo, &["runner-1", "runner-2"], &["--slots", "1"]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !(sleepers() > 0 && cluster.logs().contains("the batch joined the commit's warm plugin run")) {
        assert!(std::time::Instant::now() < deadline, "no joined batch started a sleeper\n{}", cluster.logs());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = cluster.admin(&["cancel", commit.as_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = cluster.wait_stored(&commit, "cancelled", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Cancelled, "{report:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sleepers() > 0 {
        assert!(std::time::Instant::now() < deadline, "a cancelled batch's test still runs\n{}", cluster.logs());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
