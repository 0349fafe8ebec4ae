//! A commit with thousands of test files, end to end with a real runner
//! and real Python: it finishes, every test stored once, and what the
//! dispatcher writes grows with the tests, not with files × tests (the
//! dispatcher once rewrote the whole results JSON and XML per file: ~4.5
//! files/s and 34 MB written for 219 files).
//!
//! [`many_files`] takes the number of files: the test below runs 2,000,
//! `cargo bench -p kiln --bench large` 20,000.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use kiln_proto::CommitStatus;

use crate::harness::{Cluster, Repo, eventually};

/// What testing one commit of many files cost.
#[derive(Debug)]
pub struct LargeFigures {
    /// Test files (one test each).
    pub files: usize,
    /// From the commit to its final results on disk.
    pub took: Duration,
    /// The dispatcher's own time, queued to final.
    pub queued_to_final: Duration,
    /// Bytes the dispatcher process wrote meanwhile (`wchar` of `/proc/PID/io`).
    pub written: u64,
    /// The final results files (JSON and XML).
    pub results_bytes: u64,
}

/// Bytes a process has written so far (`/proc/PID/io`).
fn wchar(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).and_then(|v| v.trim().parse().ok()).unwrap()
}

/// Tests one commit of `files` one-test files with one runner of the
/// default slots, and checks every test was stored once.
pub fn many_files(files: usize) -> LargeFigures {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", "")]);
    std::fs::create_dir_all(repo.path.join("tests")).unwrap();
    for n in 0..files {
        let src = format!("import unittest\n\n\nclass T{n}(unittest.TestCase):\n    def test(self):\n        pass\n");
        std::fs::write(repo.path.join(format!("tests/test_{n:05}.py")), src).unwrap();
    }
    let commit = repo.commit("many files");
    let runner = cluster.runner("runner-1");
    cluster.wait_log(runner, "registered");
    let pid = cluster.procs[0].child.id();
    let before = wchar(pid);
    let started = Instant::now();
    cluster.observer("observer", &repo.path, "100ms");
    // Longer than the harness's usual wait: 20,000 files take minutes.
    let limit = Duration::from_secs(90 + files as u64 / 20);
    let finished = eventually(limit, || cluster.stored(&commit).is_some_and(|r| r.status.is_final()));
    assert!(finished, "{commit} did not end within {limit:?}: {:?}", cluster.stored(&commit).map(|r| r.counts));
    let report = cluster.stored(&commit).unwrap();
    let took = started.elapsed();
    let written = wchar(pid) - before;
    assert_eq!(report.status, CommitStatus::Passed, "{:?} {:?}", report.error, report.warnings);
    assert_eq!(report.tests.len(), files);
    let ids: BTreeSet<&str> = report.tests.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids.len(), files, "a test recorded twice");
    let results = cluster.state().join("results");
    let size = |ext: &str| std::fs::metadata(results.join(format!("{commit}.{ext}"))).map_or(0, |m| m.len());
    LargeFigures {
        files,
        took,
        queued_to_final: Duration::from_millis(report.finished_at_ms.unwrap() - report.queued_at_ms),
        written,
        results_bytes: size("json") + size("xml"),
    }
}

#[test]
fn a_commit_of_two_thousand_test_files_finishes_with_each_test_once() {
    let f = many_files(2_000);
    eprintln!(
        "{} files in {:?} ({:.0} files/s; dispatcher {:?}); the dispatcher wrote {:.1} MB, final results files {:.1} MB",
        f.files,
        f.took,
        f.files as f64 / f.took.as_secs_f64(),
        f.queued_to_final,
        f.written as f64 / 1e6,
        f.results_bytes as f64 / 1e6
    );
    // Recording costs O(tests): the database's synced pages (some 25 KB a
    // one-test file) and a bounded number of rewrites of the files, not a
    // rewrite per file (files × tests: some 800 MB here).
    assert!(f.written < f.files as u64 * 64 * 1024, "{f:?}");
}
