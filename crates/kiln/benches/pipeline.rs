//! Measures Kiln end to end with the real processes (see BENCHMARKS.md):
//!
//! - latency: from `git commit` returning to the commit's final results
//!   being stored by the dispatcher, with the observer polling every 100 ms;
//! - suite time: the dispatcher's queued→finished time for a commit against
//!   `python3 -m unittest discover -s tests -t .` run directly on the same tree.
//!
//! Run with `cargo bench -p kiln --bench pipeline`.

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on any unexpected error")]

#[path = "../../../tests/e2e/harness.rs"]
#[allow(dead_code, reason = "the benchmark uses only part of the test harness")]
mod harness;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{Cluster, Repo};
use kiln_proto::{CommitId, CommitReport};

const ROUNDS: usize = 5;

fn main() {
    let sample: Vec<(String, String)> = [
        ("calc.py", include_str!("../src/demo/sample/calc.py")),
        ("tests/__init__.py", ""),
        ("tests/test_calc.py", include_str!("../src/demo/sample/tests/test_calc.py")),
        ("tests/test_plugins.py", include_str!("../src/demo/sample/tests/test_plugins.py")),
    ]
    .into_iter()
    .map(|(p, c)| (p.to_owned(), c.to_owned()))
    .collect();
    println!("suite                         tests  commit→stored (median, min–max)  kiln queued→done  unittest direct");
    measure("demo (2 modules, 8 tests)", &sample);
    measure("synthetic (40 modules, 1000 tests)", &synthetic(40, 25));
}

/// `modules` test modules of `tests` trivial tests each.
fn synthetic(modules: usize, tests: usize) -> Vec<(String, String)> {
    let mut files = vec![("tests/__init__.py".to_owned(), String::new())];
    for m in 0..modules {
        let mut src = format!("import unittest\n\n\nclass Module{m}Test(unittest.TestCase):\n");
        for t in 0..tests {
            src.push_str(&format!(
                "    def test_{t}(self):\n        self.assertEqual(sum(range({t})), {})\n",
                t * t.saturating_sub(1) / 2
            ));
        }
        files.push((format!("tests/test_mod{m}.py"), src));
    }
    files
}

fn measure(name: &str, files: &[(String, String)]) {
    let mut cluster = Cluster::start();
    let borrowed: Vec<(&str, &str)> = files.iter().map(|(p, c)| (p.as_str(), c.as_str())).collect();
    let repo = Repo::new(cluster.dir.path(), &borrowed);
    let warmup = repo.commit("warm-up");
    cluster.runner("runner-1");
    cluster.runner("runner-2");
    cluster.observer("observer", &repo.path, "100ms");
    let warm = cluster.wait_for(&warmup);

    let mut latencies = Vec::new();
    let mut kiln_times = Vec::new();
    for round in 0..ROUNDS {
        repo.write(&[("bench_round.txt", &format!("{round}\n"))]);
        repo.git(&["add", "--all"]);
        repo.git(&["commit", "--quiet", "-m", &format!("round {round}")]);
        let start = Instant::now();
        let commit: CommitId = repo.git(&["rev-parse", "HEAD"]).parse().unwrap();
        let report = wait_stored(&cluster.dir.path().join("state/results"), &commit);
        latencies.push(start.elapsed());
        kiln_times.push(Duration::from_millis(report.finished_at_ms.unwrap_or(0).saturating_sub(report.queued_at_ms)));
    }
    let direct: Vec<Duration> = (0..ROUNDS).map(|_| unittest_direct(&repo.path)).collect();
    println!(
        "{name:<34} {:>5}  {:>8} ({:>6}–{:>6})          {:>8}          {:>8}",
        warm.counts.total,
        ms(median(&latencies)),
        ms(*latencies.iter().min().unwrap()),
        ms(*latencies.iter().max().unwrap()),
        ms(median(&kiln_times)),
        ms(median(&direct)),
    );
}

/// Polls the dispatcher's results file until the commit's status is final.
fn wait_stored(results: &Path, commit: &CommitId) -> CommitReport {
    let path = results.join(format!("{commit}.json"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(bytes) = std::fs::read(&path)
            && let Ok(report) = serde_json::from_slice::<CommitReport>(&bytes)
            && report.status.is_final()
        {
            return report;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no results for {commit}");
}

fn unittest_direct(repo: &Path) -> Duration {
    let start = Instant::now();
    let out = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "tests", "-t", ".", "-q"])
        .current_dir(repo)
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    assert!(out.status.code().is_some());
    elapsed
}

fn median(values: &[Duration]) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}
