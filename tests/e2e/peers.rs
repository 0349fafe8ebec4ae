//! Peers that share a certificate, and outside text that tries to forge log
//! lines, with real processes.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use kiln_proto::CommitStatus;

use crate::harness::{Cluster, Repo, Signal, eventually};

/// How often the dispatcher refused a connection the name of a registered runner.
fn refusals(cluster: &Cluster) -> usize {
    cluster.procs[0].log().lines().filter(|l| l.contains("refused a second connection registering")).count()
}

fn registrations(cluster: &Cluster) -> usize {
    cluster.procs[0].log().lines().filter(|l| l.contains("runner registered")).count()
}

#[test]
fn two_runners_with_one_certificate_settle_and_one_keeps_the_name() {
    let mut cluster = Cluster::start();
    let first = cluster.runner("twin");
    cluster.wait_log(0, "runner registered");
    let work = cluster.dir.path().join("twin-second-work");
    cluster.spawn("runner", "twin", &["--work".as_ref(), work.as_os_str()]);
    let second = cluster.procs.len() - 1;
    // The newcomer is told who holds the name, and backs off.
    cluster.wait_log(second, "the name is registered by another connection from 127.0.0.1:");
    // Settled: the back-off has grown past a second.
    assert!(eventually(Duration::from_secs(30), || refusals(&cluster) >= 5), "{}", cluster.logs());
    let (before, started) = (refusals(&cluster), Instant::now());
    std::thread::sleep(Duration::from_secs(6));
    let during = refusals(&cluster) - before;
    eprintln!("{during} refused registrations in {:?} after settling", started.elapsed());
    assert!(during <= 4, "{during} registration attempts in 6 s\n{}", cluster.logs());
    // Exactly one holds the name, and was never replaced.
    assert_eq!(registrations(&cluster), 1, "{}", cluster.logs());
    assert!(!cluster.procs[first].log().contains("replaced"), "{}", cluster.logs());
    // Each refusal is one log line for the refused runner, not a loop.
    let said = cluster.procs[second].log().lines().filter(|l| l.contains("registered by another connection")).count();
    assert!(said <= refusals(&cluster), "{}", cluster.logs());
    // The work directory is private.
    let mode = std::fs::metadata(&work).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);

    // When the holder dies, the other gets the name once its connection is gone.
    cluster.procs[first].signal(Signal::SIGKILL);
    assert!(eventually(Duration::from_secs(30), || registrations(&cluster) == 2), "{}", cluster.logs());
    cluster.wait_log(second, "registered dispatcher=");
}

const FORGED: &str = "2026-01-01T00:00:00.000000Z  INFO forged";

#[test]
fn file_names_and_repository_paths_cannot_forge_log_lines() {
    let mut cluster = Cluster::start_logging(&["127.0.0.1"], "127.0.0.1:0", &[], "info,kiln_dispatcher=debug");
    let parent = cluster.dir.path().join(format!("x\n{FORGED}"));
    std::fs::create_dir(&parent).unwrap();
    let forged_file = format!("tests/test_x\n{FORGED}.py");
    let repo = Repo::new(
        &parent,
        &[
            ("tests/__init__.py", ""),
            ("tests/test_ok.py", "import unittest\nclass T(unittest.TestCase):\n    def test_x(self): pass\n"),
            (&forged_file, "import unittest\nclass U(unittest.TestCase):\n    def test_y(self): pass\n"),
        ],
    );
    let commit = repo.commit("forged names");
    cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "200ms");
    let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    assert_ne!(report.status, CommitStatus::Queued);
    // The outside values did reach the logs, escaped.
    let dispatcher = cluster.procs[0].log();
    assert!(dispatcher.contains(&format!("x\\n{FORGED}/repo")), "{dispatcher}");
    assert!(dispatcher.contains(&format!("tests/test_x\\n{FORGED}.py")), "{dispatcher}");
    assert!(cluster.procs.iter().any(|p| p.log().contains("watching") && p.log().contains(&format!("x\\n{FORGED}"))));
    for proc in &cluster.procs {
        for line in proc.log().lines() {
            assert!(!line.starts_with(FORGED), "{}: a forged line: {line:?}", proc.log.display());
            assert!(!line.starts_with("/repo") && !line.starts_with(".py"), "{}: {line:?}", proc.log.display());
        }
    }
}

#[test]
fn another_observer_of_the_same_repository_path_is_refused_and_cancels_nothing() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &crate::harness::borrow(&crate::harness::slow_suite(4, 2, 300)));
    let old = repo.commit("old");
    cluster.runner("runner-1");
    // The owner polls hourly: only the intruder could submit what comes next.
    cluster.observer_with("watcher", &repo.path, "1h", &[]);
    cluster.wait_stored(&old, "running", |r| r.status == CommitStatus::Running);
    repo.write(&[("README", "newer\n")]);
    let newer = repo.commit("newer, descending from old");
    let socket = cluster.dir.path().join("intruder.sock");
    let intruder =
        cluster.observer_with("intruder", &repo.path, "200ms", &["--notify-socket", socket.to_str().unwrap()]);
    let status = {
        let p = &mut cluster.procs[intruder];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let log = cluster.procs[intruder].log();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{}", cluster.logs());
    let repo_name = repo.path.display().to_string();
    assert!(log.contains(&format!("repository {repo_name} belongs to observer watcher, not intruder")), "{log}");
    // The running commit was not cancelled, and the intruder's commit was never queued.
    let report = cluster.wait_stored(&old, "final", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Passed, "{}", cluster.logs());
    assert!(cluster.stored(&newer).is_none(), "{}", cluster.logs());
}

#[test]
fn a_rewritten_history_does_not_cancel_the_running_commit() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &crate::harness::borrow(&crate::harness::slow_suite(4, 2, 300)));
    let old = repo.commit("old");
    cluster.runner("runner-1");
    let observer = cluster.observer_with("observer", &repo.path, "1h", &[]);
    cluster.wait_stored(&old, "running", |r| r.status == CommitStatus::Running);
    // Amend the running commit: the branch moves to a commit that does not descend from it.
    repo.write(&[("README", "rewritten\n")]);
    repo.git(&["add", "--all"]);
    repo.git(&["commit", "--quiet", "--amend", "-m", "rewritten"]);
    let rewritten: kiln_proto::CommitId = repo.git(&["rev-parse", "HEAD"]).parse().unwrap();
    let out = crate::harness::kiln().args(["notify", "--repo"]).arg(&repo.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cluster.wait_log(observer, rewritten.as_str());
    cluster.wait_log(0, "not superseded: the new commit does not descend from it");
    let report = cluster.wait_stored(&old, "final", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Passed, "{}", cluster.logs());
    let report = cluster.wait_stored(&rewritten, "final", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Passed, "{}", cluster.logs());
}
