//! `kiln status` and `kiln runners` against a live cluster: what waits and
//! why before any runner is connected, then the runners by name with their
//! slots, and the newest commits with their counts, in text and JSON.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cluster, Repo, eventually};

const PASS: &str = "import unittest\n\n\nclass Fine(unittest.TestCase):\n    def test_fine(self):\n        pass\n";

fn json(cluster: &Cluster, args: &[&str]) -> Value {
    let out = cluster.admin(args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn text(cluster: &Cluster, args: &[&str]) -> String {
    let out = cluster.admin(args);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn status_and_runners_show_the_queue_the_runners_and_the_newest_commits() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_fine.py", PASS)]);
    cluster.observer("observer", &repo.path, "200ms");
    let commit = repo.commit("one passing test");
    let c = &commit.as_str()[..12];
    // No runner: the commit waits, and says why.
    let mut status = Value::Null;
    assert!(eventually(Duration::from_secs(60), || {
        status = json(&cluster, &["status", "--format", "json"]);
        status["queue_total"] == 1
    }));
    assert_eq!(status["queue"][0]["commit"], commit.as_str());
    assert_eq!(status["queue"][0]["reason"], "no_runner");
    assert_eq!(status["runners_total"], 0);
    let name = status["queue"][0]["repo"].as_str().unwrap().to_owned();
    assert_eq!(
        text(&cluster, &["status"]),
        format!(
            "queue: 1 commit waits\n  {c}  main ({name}): 2 files waiting, 0 running, 0 done; no runner is connected\n\
             runners: 0 connected, 0 of 0 slots busy\n\
             latest commits: 1\n  {c}  queued    main ({name}): 0 tests: 0 passed, 0 failed, 0 errors, 0 skipped, \
             0 expected failures, 0 unexpected successes\n"
        )
    );

    // Two runners, by certificate name, with their slots.
    let r1 = cluster.runner_with("r1", &["--slots", "2"]);
    let r2 = cluster.runner_with("r2", &["--slots", "1"]);
    cluster.wait_log(r1, "registered dispatcher=");
    cluster.wait_log(r2, "registered dispatcher=");
    assert_eq!(cluster.wait_for(&commit).status, kiln_proto::CommitStatus::Passed);
    let mut runners = Value::Null;
    assert!(eventually(Duration::from_secs(30), || {
        runners = json(&cluster, &["runners", "--format", "json"]);
        runners["slots_busy"] == 0 && runners["runners_total"] == 2
    }));
    let listed: Vec<(&str, u64, u64)> = runners["runners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["slots"].as_u64().unwrap(), r["busy"].as_u64().unwrap()))
        .collect();
    assert_eq!(listed, [("r1", 2, 0), ("r2", 1, 0)]);
    assert_eq!(runners["slots_total"], 3);
    let out = text(&cluster, &["runners"]);
    assert!(out.starts_with("2 runners connected, 0 of 3 slots busy\nr1\n  address: 127.0.0.1:"), "{out}");
    assert!(out.contains("\n  slots: 0 of 2 busy\n  running: nothing\n  connected since: "), "{out}");
    assert!(out.contains("\nr2\n  address: 127.0.0.1:"), "{out}");
    assert!(out.contains("\n  slots: 0 of 1 busy\n  running: nothing\n"), "{out}");
    assert_eq!(
        text(&cluster, &["status"]),
        format!(
            "queue: 0 commits wait\n\
             runners: 2 connected, 0 of 3 slots busy\n  r1  0 of 2 slots busy, 2 free\n  r2  0 of 1 slots busy, 1 free\n\
             latest commits: 1\n  {c}  passed    main ({name}): 1 test: 1 passed, 0 failed, 0 errors, 0 skipped, \
             0 expected failures, 0 unexpected successes\n"
        )
    );
    // Only admins may ask.
    let observer = cluster.issue("observer", "peeker");
    let out = crate::harness::kiln()
        .args(["status", "--dispatcher", &cluster.addr, "--identity"])
        .arg(&observer)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("may not read the dispatcher's status: that needs the admin role"), "{stderr}");
}
