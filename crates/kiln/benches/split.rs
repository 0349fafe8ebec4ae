//! Measures how well one commit splits across runners (see BENCHMARKS.md):
//! 1, 2 and 4 runners with `--slots 1` on a sleep-bound suite of 40 files
//! with uneven durations (36 files of 200 ms, 4 of 2 s: ten times longer),
//! each cluster testing two commits of the same suite. The first commit has
//! no timings (every file gets the default estimate); the second is split
//! by the first's durations. The makespan is the dispatcher's own: from
//! queueing the commit to storing its final status.
//!
//! Run with `cargo bench -p kiln --bench split` (release), or with
//! `cargo test -p kiln --bench split` for a debug build. To look into one
//! cluster: `KILN_SPLIT_RUNNERS=4` runs only that size, `KILN_SPLIT_LOG=PATH`
//! writes each cluster's logs to `PATH.N`, and `KILN_SPLIT_RUST_LOG` sets
//! the runners' `RUST_LOG` (e.g. `info,kiln_plugin_host=debug` shows when
//! each batch's interpreter starts and ends). `KILN_SPLIT_SLOTS=4` gives
//! each runner 4 slots instead of 1 (the bound is then over all slots):
//! with one runner, that measures how one batch's files share its slots.
//! `KILN_SPLIT_ROUNDS=N` measures every size N times, a round of each in
//! turn, and ends with each speedup's median: on a shared machine two runs
//! of the same build differ by as much as 0.1 s of a 4.3 s makespan.

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on any unexpected error")]

#[path = "../../../tests/e2e/harness.rs"]
#[allow(dead_code, reason = "the benchmark uses only part of the test harness")]
mod harness;

use harness::{Cluster, Repo, borrow};
use kiln_proto::CommitStatus;

/// Short files and their count, long files and their count (ms).
const SHORT: (u64, usize) = (200, 36);
const LONG: (u64, usize) = (2_000, 4);

fn suite() -> Vec<(String, String)> {
    let mut files = vec![("tests/__init__.py".to_owned(), String::new())];
    let all = std::iter::repeat_n(LONG.0, LONG.1).chain(std::iter::repeat_n(SHORT.0, SHORT.1));
    // Long files named in the middle, so name order is not longest first.
    for (i, ms) in all.enumerate() {
        let n = (i * 17) % (SHORT.1 + LONG.1);
        let src = format!(
            "import time\nimport unittest\n\n\nclass T{n}(unittest.TestCase):\n    def test_sleep(self):\n        \
             time.sleep({})\n",
            ms as f64 / 1000.0
        );
        files.push((format!("tests/test_f{n:02}.py"), src));
    }
    files
}

/// Makespans (seconds) of the first and second commit with `runners` runners.
fn run(runners: usize, slots: usize) -> (f64, f64) {
    let mut cluster = Cluster::start();
    if let Ok(level) = std::env::var("KILN_SPLIT_RUST_LOG") {
        cluster.rust_log = level;
    }
    let repo = Repo::new(cluster.dir.path(), &borrow(&suite()));
    let procs: Vec<usize> =
        (0..runners).map(|i| cluster.runner_with(&format!("runner-{i}"), &["--slots", &slots.to_string()])).collect();
    for p in procs {
        cluster.wait_log(p, "registered");
    }
    let first = repo.commit("first");
    cluster.observer_with("observer", &repo.path, "200ms", &["--mode", "every"]);
    let makespan = |report: &kiln_proto::CommitReport| {
        assert_eq!(report.status, CommitStatus::Passed, "{report:?}");
        (report.finished_at_ms.unwrap() - report.queued_at_ms) as f64 / 1000.0
    };
    let a = makespan(&cluster.wait_stored(&first, "final", |r| r.status.is_final()));
    repo.write(&[("README", "second\n")]);
    let second = repo.commit("second");
    let b = makespan(&cluster.wait_stored(&second, "final", |r| r.status.is_final()));
    if let Ok(path) = std::env::var("KILN_SPLIT_LOG") {
        std::fs::write(format!("{path}.{runners}"), cluster.logs()).unwrap();
    }
    (a, b)
}

fn main() {
    let total = (SHORT.0 * SHORT.1 as u64 + LONG.0 * LONG.1 as u64) as f64 / 1000.0;
    let longest = LONG.0 as f64 / 1000.0;
    println!("suite: 40 files, {total:.1} s of tests, longest file {longest:.1} s");
    let only = number("KILN_SPLIT_RUNNERS");
    let slots = number("KILN_SPLIT_SLOTS").unwrap_or(1);
    let rounds = number("KILN_SPLIT_ROUNDS").unwrap_or(1);
    let mut speedups = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        if let Some([two, four]) = round(only, slots, total, longest) {
            speedups.0.push(two);
            speedups.1.push(four);
        }
    }
    if rounds > 1 && !speedups.1.is_empty() {
        println!(
            "median of {} rounds, second commit: 2 runners {:.2}×, 4 runners {:.2}×",
            speedups.1.len(),
            median(&mut speedups.0),
            median(&mut speedups.1)
        );
    }
}

/// The number in environment variable `name`, if it is set to one.
fn number(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 }
}

/// One cluster of each size in turn; the speedups of 2 and 4 runners when
/// all three sizes ran.
fn round(only: Option<usize>, slots: usize, total: f64, longest: f64) -> Option<[f64; 2]> {
    let mut second = Vec::new();
    for runners in [1, 2, 4].into_iter().filter(|n| only.is_none_or(|o| o == *n)) {
        let (a, b) = run(runners, slots);
        let n = runners * slots;
        let ideal = (total / n as f64).max(longest);
        let bound = 1.1 * ideal + 0.3;
        println!(
            "{runners} runner(s) × {slots} slot(s): first commit (no timings) {a:.2} s, second commit {b:.2} s; \
             bound 1.1 × max(total/{n}, longest) + 0.3 s = {bound:.2} s; second/bound = {:.2}, first/bound = {:.2}",
            b / bound,
            a / bound
        );
        second.push(b);
    }
    let [one, two, four] = second[..] else { return None };
    println!("speedup, second commit: 2 runners {:.2}×, 4 runners {:.2}×", one / two, one / four);
    Some([one / two, one / four])
}
