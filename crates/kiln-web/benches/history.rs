//! What a test's history and the flaky list cost on a large board, side by
//! side with a page of `/api/v1/commits`: each is computed under the board's
//! read lock, which the follower task waits on to apply the next update.
//!
//! `cargo bench -p kiln-web --bench history -- COMMITS TESTS` (default
//! 2,000 commits of 500 tests, a million results); figures in BENCHMARKS.md.

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on any unexpected error")]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_dispatcher::history;
use kiln_dispatcher::store::{Change, CommitRow};
use kiln_dispatcher::stream::Update;
use kiln_proto::{CommitId, CommitStatus, Outcome, TestResult};
use kiln_web::board::Board;

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (commits, tests) = (args.first().copied().unwrap_or(2000), args.get(1).copied().unwrap_or(500));
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut board = Board::default();
    let built = Instant::now();
    for n in 0..commits {
        let commit: CommitId = format!("{n:040x}").parse().unwrap();
        // Each pair of commits shares a tree, as re-runs and reverts do: the worst case for
        // the same-tree rule, which then compares every result.
        let tree: CommitId = format!("{:040x}", 0xf000_0000 + n / 2 * 2).parse().unwrap();
        let row = CommitRow {
            commit,
            repo: "/srv/git/project".into(),
            branch: "main".into(),
            seq: n as u64 + 1,
            status: CommitStatus::Passed,
            error: None,
            runner: Some("r1".into()),
            warnings: vec![],
            // Spread over 20 days, the newest now: 14 days' worth is in the flaky window.
            queued_at_ms: now - (commits - n) as u64 * 20 * 86_400_000 / commits as u64,
            finished_at_ms: None,
            tree: Some(tree),
            job: n as u64 + 1,
            attempt: 1,
        };
        let mut changes = vec![Change::Commit(row)];
        for t in 0..tests {
            let id = format!("tests.test_m{}.T.test_{t}", t % 40);
            // Test 0 fails on every seventh commit: it flips on some trees.
            let outcome = if t == 0 && n % 7 == 0 { Outcome::Fail } else { Outcome::Pass };
            let mut r = TestResult::new(id, format!("tests/test_m{}.py", t % 40), outcome, 3, String::new());
            // Test 1 is flaky on every 50th commit.
            if t == 1 && n % 50 == 0 {
                r = TestResult::new(r.id.clone(), r.file.clone(), Outcome::Fail, 3, "AssertionError".into());
                r.merge_run(TestResult::new(r.id.clone(), r.file.clone(), Outcome::Pass, 3, String::new()));
            }
            changes.push(Change::Test { commit, result: r });
        }
        board.apply(&Update { seq: n as u64 + 1, changes }, now);
    }
    eprintln!("built a board of {commits} commits × {tests} tests in {:.1?}", built.elapsed());

    let rounds = 7;
    let id = "tests.test_m0.T.test_0";
    let mut rows: Vec<(&str, Vec<Duration>, String)> = Vec::new();
    let mut time = |what: &'static str, f: &mut dyn FnMut() -> String| {
        let mut took = Vec::new();
        let mut said = String::new();
        for _ in 0..rounds {
            let t = Instant::now();
            said = f();
            took.push(t.elapsed());
        }
        took.sort();
        rows.push((what, took, said));
    };
    time("/api/v1/commits (50 newest)", &mut || {
        let page: Vec<_> =
            board.newest(None, 50, |_| true).iter().filter_map(|d| board.summary(&d.row.commit)).collect();
        format!("{} commits", page.len())
    });
    time("/tests/ID: history (30 runs)", &mut || {
        format!("{} runs", history::history(board.newest_first(), None, id, 30).len())
    });
    time("/tests/ID: its flaky badge (14 days)", &mut || {
        let f = history::flaky_test(board.newest_first(), None, id, now, history::FLAKY_WINDOW_MS);
        format!("{} flips", f.map_or(0, |f| f.flips.len()))
    });
    time("/flaky (14 days, every test)", &mut || {
        let all = history::flaky_tests(board.newest_first(), now, history::FLAKY_WINDOW_MS);
        format!("{} flaky tests", all.len())
    });
    println!("| what (under the board's read lock) | median | min–max | found |");
    println!("|---|---|---|---|");
    for (what, took, said) in rows {
        println!("| {what} | {:.1?} | {:.1?}–{:.1?} | {said} |", took[rounds / 2], took[0], took[rounds - 1]);
    }
}
