//! Fault tolerance with real processes and real signals: nothing lost,
//! nothing stuck, nothing counted twice when a process dies, hangs or is
//! superseded.

use std::time::{Duration, Instant};

use kiln_proto::{CommitReport, CommitStatus, Outcome};

use crate::harness::{Cluster, NetNs, Repo, Signal, borrow, eventually, slow_suite};

/// Every test of a slow suite passed, each exactly once.
fn assert_complete(report: &CommitReport, modules: usize, tests: usize) {
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}");
    assert_eq!(report.tests.len(), modules * tests, "{report:?}");
    for m in 0..modules {
        for t in 0..tests {
            let id = format!("tests.test_slow{m}.Slow{m}.test_{t}");
            assert!(report.tests.iter().any(|r| r.id == id && r.outcome == Outcome::Pass), "missing {id}");
        }
    }
}

#[test]
fn a_killed_runner_loses_only_its_unfinished_files() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(6, 2, 300)));
    let commit = repo.commit("slow suite");
    let first = cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "200ms");
    // Let runner-1 finish some files, then kill it mid-job.
    let by = |r: &CommitReport, name: &str| r.tests.iter().filter(|t| t.runner.as_deref() == Some(name)).count();
    cluster.wait_stored(&commit, "partly done by runner-1", |r| by(r, "runner-1") >= 4);
    cluster.procs[first].signal(Signal::SIGKILL);
    let killed = Instant::now();
    cluster.runner("runner-2");
    let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    eprintln!("killed runner to results: {:?}", killed.elapsed());
    assert_complete(&report, 6, 2);
    // The commit is split: both runners ran some of it, and runner-2 only
    // what runner-1 had not finished (each test is recorded once, by one runner).
    assert_eq!(report.runner.as_deref(), Some("runner-1, runner-2"));
    assert!(by(&report, "runner-1") >= 4 && by(&report, "runner-2") > 0, "{report:?}");
    assert_eq!(by(&report, "runner-1") + by(&report, "runner-2"), 12);
    // No reassignment line is a failure, not a pass: the check below needs one.
    let log = cluster.procs[0].log();
    let second = log.lines().find(|l| l.contains("runner=runner-2") && l.contains("assigned"));
    second.unwrap_or_else(|| panic!("nothing was assigned to runner-2:\n{log}"));
}

#[test]
fn a_runner_stopped_past_its_lease_is_replaced_and_its_late_work_rejected() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(4, 2, 300)));
    let commit = repo.commit("slow suite");
    let sleeper = cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "200ms");
    // Past the source fetch, with results stored: the runner holds real work.
    cluster.wait_stored(&commit, "partly done by runner-1", |r| {
        r.tests.iter().any(|t| t.runner.as_deref() == Some("runner-1"))
    });
    cluster.procs[sleeper].signal(Signal::SIGSTOP);
    cluster.runner("runner-2");
    let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    assert_complete(&report, 4, 2);
    assert!(report.runner.as_deref().is_some_and(|r| r.contains("runner-2")), "{report:?}");
    // Wake the sleeper: it reconnects and asks to resume its old attempt,
    // which the dispatcher refuses; the stored results do not change.
    cluster.procs[sleeper].signal(Signal::SIGCONT);
    cluster.wait_log(0, "rejected a late runner's work");
    cluster.wait_log(sleeper, "dropping the job");
    assert_eq!(cluster.stored(&commit), Some(report));
}

#[test]
fn a_killed_dispatcher_resumes_its_queue_and_running_work() {
    let mut cluster = Cluster::start();
    // Slow enough (about 5 s) that the first commit is still running at the kill.
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(4, 2, 600)));
    let first = repo.commit("first");
    // One slot: the second commit waits in the queue.
    cluster.runner_with("runner-1", &["--slots", "1"]);
    let observer = cluster.observer_with("observer", &repo.path, "200ms", &["--mode", "every"]);
    cluster.wait_stored(&first, "running", |r| r.status == CommitStatus::Running && !r.tests.is_empty());
    repo.write(&[("README", "second\n")]);
    let second = repo.commit("second");
    cluster.wait_log(observer, second.as_str());
    cluster.wait_stored(&second, "queued", |r| r.status == CommitStatus::Queued);

    let killed = Instant::now();
    cluster.restart_dispatcher();
    for commit in [first, second] {
        let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
        assert_complete(&report, 4, 2);
        assert_eq!(report.runner.as_deref(), Some("runner-1"));
    }
    eprintln!("dispatcher kill to all results: {:?}", killed.elapsed());
    let log = cluster.procs[0].log();
    assert!(log.contains("resumed from the state database"), "{log}");
    // The runner kept working through the restart and its attempt was accepted:
    // the first commit was never handed out again.
    // Logged under the runner's connection and the job's span.
    let resumed = log.lines().any(|l| {
        l.contains("peer{peer=runner")
            && l.contains("job{job=")
            && l.contains(": resumed commit=")
            && l.contains(first.as_str())
    });
    assert!(resumed, "{}", cluster.logs());
    // Batches are cut as the slot frees, so later ones are normal; but no
    // batch the runner held through the restart was taken back.
    assert!(!log.contains("no runner claimed this running work"), "{}", cluster.logs());
}

#[test]
fn an_observer_in_every_mode_catches_up_after_a_restart() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(1, 1, 0)));
    let base = repo.commit("base");
    cluster.runner("runner-1");
    let observer = cluster.observer_with("observer", &repo.path, "200ms", &["--mode", "every"]);
    cluster.wait_stored(&base, "final", |r| r.status.is_final());
    cluster.procs[observer].signal(Signal::SIGKILL);

    let missed: Vec<_> = (0..3)
        .map(|n| {
            repo.write(&[("README", &format!("{n}\n"))]);
            repo.commit(&format!("while the observer was down {n}"))
        })
        .collect();
    cluster.observer_with("observer", &repo.path, "200ms", &["--mode", "every"]);
    for commit in &missed {
        let report = cluster.wait_stored(commit, "final", |r| r.status.is_final());
        assert_eq!(report.status, CommitStatus::Passed);
    }
    // Each commit was queued exactly once, in order.
    let log = cluster.procs[0].log();
    let queued: Vec<&str> = log.lines().filter(|l| l.contains("commit queued")).collect();
    assert_eq!(queued.len(), 4, "{log}");
    for (line, commit) in queued[1..].iter().zip(&missed) {
        assert!(line.contains(commit.as_str()), "out of order: {queued:?}");
    }
}

#[test]
fn in_latest_mode_a_newer_commit_cancels_the_running_one() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(6, 2, 300)));
    let old = repo.commit("old");
    cluster.runner("runner-1");
    // A long interval: only `kiln notify` makes the observer look.
    let observer = cluster.observer_with("observer", &repo.path, "1h", &[]);
    cluster.wait_stored(&old, "running", |r| r.status == CommitStatus::Running);
    repo.write(&[(
        "tests/test_slow0.py",
        "import unittest\nclass Slow0(unittest.TestCase):\n    def test_0(self): pass\n",
    )]);
    let new = repo.commit("new");
    let out = crate::harness::kiln().args(["notify", "--repo"]).arg(&repo.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report = cluster.wait_stored(&old, "cancelled", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Cancelled);
    assert!(report.error.as_deref().unwrap_or_default().contains("superseded by"), "{report:?}");
    let report = cluster.wait_stored(&new, "final", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Passed);
    // The observer polls hourly: only the poke can have found the new commit.
    assert!(cluster.procs[observer].log().contains(new.as_str()));
}

#[test]
fn with_keep_running_a_queued_commit_is_skipped_when_superseded() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(2, 2, 300)));
    let a = repo.commit("a");
    // One slot: the second commit waits in the queue.
    cluster.runner_with("runner-1", &["--slots", "1"]);
    cluster.observer_with("observer", &repo.path, "1h", &["--keep-running"]);
    cluster.wait_stored(&a, "running", |r| r.status == CommitStatus::Running);
    let notify = |repo: &Repo| {
        let out = crate::harness::kiln().args(["notify", "--repo"]).arg(&repo.path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    repo.write(&[("README", "b\n")]);
    let b = repo.commit("b");
    notify(&repo);
    cluster.wait_stored(&b, "queued", |r| r.status == CommitStatus::Queued);
    repo.write(&[("README", "c\n")]);
    let c = repo.commit("c");
    notify(&repo);
    let report = cluster.wait_stored(&b, "skipped", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Skipped);
    assert!(report.tests.is_empty());
    assert_eq!(cluster.wait_stored(&a, "final", |r| r.status.is_final()).status, CommitStatus::Passed);
    assert_eq!(cluster.wait_stored(&c, "final", |r| r.status.is_final()).status, CommitStatus::Passed);
}

#[test]
fn cancel_stops_a_running_commit_and_the_runner_takes_the_next() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(6, 2, 300)));
    let slow = repo.commit("slow");
    cluster.runner("runner-1");
    let observer = cluster.observer_with("observer", &repo.path, "200ms", &["--mode", "every"]);
    cluster.wait_stored(&slow, "running", |r| r.status == CommitStatus::Running);
    repo.write(&[("README", "next\n")]);
    let next = repo.commit("next");
    cluster.wait_log(observer, next.as_str());
    let out = cluster.admin(&["cancel", slow.as_str()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"));
    let report = cluster.wait_stored(&slow, "cancelled", |r| r.status.is_final());
    assert_eq!(report.status, CommitStatus::Cancelled);
    assert!(report.error.as_deref().unwrap_or_default().contains("cancelled by admin admin"), "{report:?}");
    let report = cluster.wait_stored(&next, "final", |r| r.status.is_final());
    assert_complete(&report, 6, 2);
    // Cancelling a finished commit changes nothing.
    let out = cluster.admin(&["cancel", slow.as_str()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to cancel"));
}

#[test]
fn a_runner_cut_off_from_the_network_is_replaced_and_its_late_work_rejected() {
    let ns = NetNs::create();
    let mut cluster = Cluster::start_on(&["127.0.0.1", ns.host_ip], "0.0.0.0:0", &[]);
    let port = cluster.addr.rsplit_once(':').map(|(_, p)| p.to_owned()).unwrap();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(4, 2, 300)));
    let commit = repo.commit("slow suite");
    let remote = cluster.runner_in(&ns.name, "remote", &format!("{}:{port}", ns.host_ip));
    cluster.observer("observer", &repo.path, "200ms");
    // Past the source fetch, with results stored: the runner holds real work.
    cluster.wait_stored(&commit, "partly done by the remote runner", |r| {
        r.tests.iter().any(|t| t.runner.as_deref() == Some("remote"))
    });

    ns.link(false);
    let cut = Instant::now();
    cluster.runner("local");
    let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    eprintln!("network cut to results: {:?}", cut.elapsed());
    assert_complete(&report, 4, 2);
    assert!(report.runner.as_deref().is_some_and(|r| r.contains("local")), "{report:?}");

    ns.link(true);
    // The healed runner comes back and asks to resume; its lease has moved on.
    cluster.wait_log(0, "rejected a late runner's work");
    cluster.wait_log(remote, "dropping the job");
    assert_eq!(cluster.stored(&commit), Some(report));
}

#[test]
fn a_runner_stopped_with_sigterm_hands_its_work_back_at_once() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(4, 2, 300)));
    let commit = repo.commit("slow suite");
    let leaving = cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "200ms");
    cluster.wait_stored(&commit, "running on runner-1", |r| r.runner.as_deref() == Some("runner-1"));
    cluster.runner("runner-2");
    cluster.procs[leaving].signal(Signal::SIGTERM);
    let status = cluster.procs[leaving].child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", cluster.logs());
    // Given back by the runner itself, not found dead after the idle timeout:
    // the dispatcher reads the runner's Abandoned event, or, when the
    // connection's close (with the runner's reason) is handled first, requeues
    // on that. Either is at once; a runner found dead logs neither.
    let given_back = eventually(Duration::from_secs(10), || {
        let log = cluster.procs[0].log();
        log.contains("the runner gave the job back")
            || (log.contains("closed by peer (shutdown): runner shutting down")
                && log.contains("requeued the work of a disconnected runner"))
    });
    assert!(given_back, "runner-1 did not hand its work back\n{}", cluster.logs());
    let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    assert_complete(&report, 4, 2);
    // Split: runner-2 ran what runner-1 handed back (and runner-1 may have
    // finished some files before it left).
    assert!(report.runner.as_deref().is_some_and(|r| r.contains("runner-2")), "{report:?}");
}

/// A tmpfs mounted on a directory for a test; unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_refuses_new_work_without_crashing_and_work_resumes_when_space_returns() {
    let mut cluster = Cluster::start();
    // The dispatcher's state on a small filesystem of its own.
    cluster.procs[0].signal(Signal::SIGKILL);
    let _ = cluster.procs[0].child.wait();
    let Some(_tmpfs) = Tmpfs::mount(&cluster.state(), "16m") else {
        eprintln!("cannot mount a tmpfs here (not root?): the disk-full test is skipped");
        return;
    };
    let addr = cluster.addr.clone();
    cluster.procs[0] = cluster.spawn_dispatcher(&addr, &[]);
    cluster.runner("runner-1");
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(2, 2, 10)));
    let first = repo.commit("before the disk fills");
    cluster.observer("observer", &repo.path, "200ms");
    assert_eq!(cluster.wait_for(&first).status, CommitStatus::Passed);

    // Fill the filesystem to the last byte.
    let filler = cluster.state().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    repo.write(&[("README", "changed while the disk is full\n")]);
    let second = repo.commit("while the disk is full");
    cluster.wait_log(0, "No space left on device");
    // Still serving, and the commit is not half-stored.
    assert!(cluster.procs[0].child.try_wait().unwrap().is_none(), "the dispatcher died:\n{}", cluster.logs());
    assert!(cluster.stored(&second).is_none_or(|r| !r.status.is_final()));

    std::fs::remove_file(&filler).unwrap();
    let report = cluster.wait_for(&second);
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}\n{}", cluster.logs());
    assert_eq!(report.tests.len(), 4);
}

/// A runner whose keep-alives are too sparse for the dispatcher's idle
/// timeout (15 s: one every 5 s, against 3 s) reconnects once with one a
/// second, then stays connected while idle and runs a commit.
#[test]
fn a_runner_keeps_alive_often_enough_for_a_shorter_dispatcher_idle_timeout() {
    let mut cluster = Cluster::start();
    let runner = cluster.runner_with("runner-1", &["--idle-timeout", "15s"]);
    cluster.wait_log(runner, "reconnecting with a keep-alive every 1s");
    let registered = |c: &Cluster| c.procs[0].log().lines().filter(|l| l.contains("runner registered")).count();
    assert!(eventually(Duration::from_secs(30), || registered(&cluster) == 2), "{}", cluster.logs());
    // Idle for more than twice the dispatcher's idle timeout: with
    // keep-alives every 5 s the connection would have died at 3 s.
    std::thread::sleep(Duration::from_secs(7));
    assert_eq!(registered(&cluster), 2, "the connection was lost while idle:\n{}", cluster.logs());
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(2, 1, 10)));
    let commit = repo.commit("after an idle while");
    cluster.observer("observer", &repo.path, "200ms");
    assert_complete(&cluster.wait_for(&commit), 2, 1);
    assert_eq!(registered(&cluster), 2, "{}", cluster.logs());
}
