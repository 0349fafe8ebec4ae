//! A runner whose wall clock jumps ±5 minutes in the middle of a commit:
//! nothing expires by accident, because leases, liveness (QUIC's idle
//! timer) and every timeout run on the monotonic clock; the wall clock only
//! stamps results and log lines.
//!
//! The jump is real for the runner process: it runs under libfaketime
//! (Debian's `faketime` package) with an offset read from a file the test
//! rewrites mid-commit, so `CLOCK_REALTIME` jumps while `CLOCK_MONOTONIC`
//! runs on (`FAKETIME_DONT_FAKE_MONOTONIC=1`), as after an NTP step or an
//! operator's `date -s`. The control test applies the same jump to the
//! monotonic clock too, which no real machine does, and shows the checks
//! see an expiry when there is one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_proto::CommitStatus;

use crate::harness::{Cluster, Proc, Repo, borrow, eventually, kiln, slow_suite};

/// Where Debian's libfaketime lives (multi-threaded flavour: the runner is).
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// Starts runner `name` under libfaketime, its clock offset read from
/// `offset_file` (re-read at most every second).
fn faked_runner(cluster: &mut Cluster, name: &str, offset_file: &Path, fake_monotonic: bool) -> usize {
    assert!(Path::new(LIBFAKETIME).exists(), "{LIBFAKETIME} is missing: install the faketime package");
    cluster.issue("runner", name);
    let log = cluster.dir.path().join(format!("{name}.log"));
    let mut cmd = kiln();
    cmd.env("LD_PRELOAD", LIBFAKETIME)
        .env("FAKETIME_TIMESTAMP_FILE", offset_file)
        .env("FAKETIME_CACHE_DURATION", "1")
        .args(["runner", "--slots", "1", "--identity"])
        .arg(cluster.certs().join(name))
        .args(["--dispatcher", &cluster.addr, "--idle-timeout", "3s", "--work"])
        .arg(cluster.dir.path().join(format!("{name}-work")))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    if !fake_monotonic {
        cmd.env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    }
    let child = cmd.spawn().unwrap();
    cluster.procs.push(Proc { child, log });
    cluster.procs.len() - 1
}

/// The wall-clock time `minutes` from now as the logs print it (UTC,
/// `YYYY-MM-DDTHH:MM:SS`), from `date`, which runs outside libfaketime.
fn utc_in(minutes: i64) -> String {
    let out = Command::new("date").args(["-u", "-d", &format!("{minutes} min"), "+%Y-%m-%dT%H:%M:%S"]).output();
    String::from_utf8_lossy(&out.unwrap().stdout).trim().to_owned()
}

/// The runner's log lines stamped later than `after` or earlier than `before`.
fn stamped(log: &str, pred: impl Fn(&str) -> bool) -> usize {
    log.lines().filter(|l| l.get(..19).is_some_and(&pred)).count()
}

/// A commit tested by a runner whose clock jumps by `jump` (libfaketime's
/// offset syntax, e.g. `+5m`) once the runner has stored some results.
/// Returns the cluster (to read logs), the runner's index and the final status.
fn commit_with_a_jump(jumps: &[&str]) -> (Cluster, usize, Vec<CommitStatus>) {
    let mut cluster = Cluster::start();
    let offset: PathBuf = cluster.dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    // Six files of two 500 ms tests, one slot: about 6 s per commit.
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(6, 2, 500)));
    let runner = faked_runner(&mut cluster, "drifter", &offset, false);
    cluster.wait_log(runner, "registered");
    let observer = cluster.observer_with("observer", &repo.path, "200ms", &["--mode", "every"]);
    let mut statuses = Vec::new();
    for (n, jump) in jumps.iter().enumerate() {
        if n > 0 {
            repo.write(&[("README", &format!("{n}\n"))]);
        }
        let commit = repo.commit(&format!("commit {n}"));
        cluster.wait_log(observer, commit.as_str());
        cluster.wait_stored(&commit, "partly done", |r| !r.tests.is_empty() && r.tests.len() < 8);
        std::fs::write(&offset, format!("{jump}\n")).unwrap();
        let report = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
        statuses.push(report.status);
        if report.status == CommitStatus::Passed {
            assert_eq!(report.tests.len(), 12, "{report:?}");
        }
    }
    (cluster, runner, statuses)
}

#[test]
fn a_runner_clock_jumping_five_minutes_either_way_expires_nothing() {
    // +5 minutes during the first commit, then -5 minutes (a jump of ten
    // back) during the second.
    let (cluster, runner, statuses) = commit_with_a_jump(&["+5m", "-5m"]);
    assert_eq!(statuses, [CommitStatus::Passed, CommitStatus::Passed], "{}", cluster.logs());
    let runner_log = cluster.procs[runner].log();
    // The jumps happened, as the runner's own log stamps show: lines five
    // minutes ahead, then lines five minutes behind.
    let (ahead, behind) = (utc_in(4), utc_in(-4));
    assert!(stamped(&runner_log, |t| t > ahead.as_str()) > 0, "no line 5 min ahead:\n{runner_log}");
    assert!(stamped(&runner_log, |t| t < behind.as_str()) > 0, "no line 5 min behind:\n{runner_log}");
    // Nothing expired: one registration, no lost connection, no work requeued
    // or handed out twice.
    assert_eq!(runner_log.matches("registered").count(), 1, "{runner_log}");
    assert!(!runner_log.contains("lost the dispatcher"), "{runner_log}");
    let dispatcher_log = cluster.procs[0].log();
    for expired in ["requeued", "disconnected", "rejected"] {
        assert!(!dispatcher_log.contains(expired), "{expired}: {}", cluster.logs());
    }
}

#[test]
fn the_same_jump_on_the_monotonic_clock_is_seen_as_an_expiry() {
    // The control: were the lease or liveness timers on a clock that jumps,
    // the runner's connection would time out and its work would go back to
    // the queue; the checks above would see it. Whether one jump cuts the
    // connection is a race (a packet that arrives before the timer fires
    // resets the idle timer, about half the time here), so the clock jumps
    // again, further each time, until it does: eight tries.
    let mut cluster = Cluster::start();
    let offset: PathBuf = cluster.dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(6, 2, 500)));
    let runner = faked_runner(&mut cluster, "drifter", &offset, true);
    cluster.wait_log(runner, "registered");
    let commit = repo.commit("a commit the jumps land in");
    cluster.observer("observer", &repo.path, "200ms");
    cluster.wait_stored(&commit, "partly done", |r| !r.tests.is_empty() && r.tests.len() < 8);
    let lost = (1..=8).any(|n| {
        std::fs::write(&offset, format!("+{}m\n", 5 * n)).unwrap();
        eventually(std::time::Duration::from_secs(3), || cluster.procs[runner].log().contains("lost the dispatcher"))
    });
    assert!(lost, "eight jumps did not cut the connection:\n{}", cluster.logs());
}
