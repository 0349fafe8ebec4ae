//! Measures recovery with the real processes (see BENCHMARKS.md):
//!
//! - detection: from `kill -9` of a runner mid-job to the dispatcher
//!   storing its job as queued again (dispatcher `--idle-timeout 3s`);
//! - restart: from starting a dispatcher whose database holds 2,000
//!   finished commits of 50 tests each to its first answered request.
//!
//! Run with `cargo bench -p kiln --bench faults`.

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on any unexpected error")]

#[path = "../../../tests/e2e/harness.rs"]
#[allow(dead_code, reason = "the benchmark uses only part of the test harness")]
mod harness;

use std::time::{Duration, Instant};

use harness::{Cluster, Repo, Signal, borrow, slow_suite};
use kiln_dispatcher::db::Db;
use kiln_dispatcher::state::State;
use kiln_proto::wire::Supersede;
use kiln_proto::{CommitId, CommitStatus, Outcome, TestResult};

const ROUNDS: usize = 5;

fn main() {
    let restart: Vec<Duration> = (0..ROUNDS).map(|_| restart(2_000, 50)).collect();
    println!("dispatcher start → first answer (2,000 commits × 50 tests in the database): {}", summary(&restart));
    let detection: Vec<Duration> = (0..ROUNDS).map(|_| detection()).collect();
    println!("runner killed → job requeued (idle timeout 3 s): {}", summary(&detection));
}

fn detection() -> Duration {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&slow_suite(4, 5, 500)));
    let commit = repo.commit("slow");
    let runner = cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "100ms");
    cluster.wait_stored(&commit, "running", |r| r.status == CommitStatus::Running);
    cluster.procs[runner].signal(Signal::SIGKILL);
    let killed = Instant::now();
    cluster.wait_stored(&commit, "requeued", |r| r.status == CommitStatus::Queued);
    killed.elapsed()
}

fn restart(commits: u32, tests: u32) -> Duration {
    let mut cluster = Cluster::start();
    cluster.procs[0].signal(Signal::SIGKILL);
    let _ = cluster.procs[0].child.wait();
    // Fill the database the way the dispatcher would.
    // The dispatcher may have died before making its state directory.
    std::fs::create_dir_all(cluster.state()).unwrap();
    let mut db = Db::open(&cluster.state().join("kiln.db")).unwrap();
    let mut state = State::default();
    state.register("runner", 1, 1, &[], &[], &[]);
    for n in 0..commits {
        let commit: CommitId = format!("{n:040x}").parse().unwrap();
        // One transaction per commit, as the core would store its events.
        state.begin(u64::from(n));
        let files = ["tests/test_m.py".to_owned()];
        state.submit("repo", "main", commit, Supersede::Nothing, |_| true, &files, None, u64::from(n)).unwrap();
        let job = state.assign().remove(0).assignment;
        for t in 0..tests {
            let result = TestResult::new(
                format!("tests.test_m.T.test_{t}"),
                "tests/test_m.py".into(),
                Outcome::Pass,
                1,
                String::new(),
            );
            state.record_test(job.job, job.attempt, 1, result).unwrap();
        }
        state.file_done(job.job, job.attempt, 1, "tests/test_m.py".into()).unwrap();
        state.finish(job.job, job.attempt, 1, None, 0).unwrap();
        db.apply(&state.changes()).unwrap();
        state.commit();
    }
    drop(db);
    let addr = cluster.addr.clone();
    let start = Instant::now();
    cluster.procs[0] = cluster.spawn_dispatcher(&addr, &[]);
    loop {
        let out = cluster.admin(&["results", "--format", "json"]);
        if out.status.success() {
            break start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
    }
}

fn summary(values: &[Duration]) -> String {
    let mut v = values.to_vec();
    v.sort();
    format!(
        "median {} ms (min {} ms, max {} ms, n = {})",
        v[v.len() / 2].as_millis(),
        v[0].as_millis(),
        v[v.len() - 1].as_millis(),
        v.len()
    )
}
