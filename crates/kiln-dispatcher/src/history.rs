//! Each test's history across commits, and which tests are flaky: read from
//! the commits the dispatcher keeps (no I/O), for the dashboard's test and
//! flaky pages and their JSON.
//!
//! **Flaky**, precisely: a test is flaky on a commit when, among its runs on
//! that commit (`kiln dispatcher --retry-failed`), at least one failed
//! (`fail`, `error` or `xpass`) and at least one did not; that is
//! [`kiln_proto::TestResult::flaky`]. A test is listed as flaky when it was
//! flaky on at least one commit queued within the last
//! [`FLAKY_WINDOW_MS`] (Harness's rule: passed and failed on the same commit
//! within 14 days). A test that fails on one commit and passes on the next
//! is not flaky by this rule: the code changed in between, and the history
//! marks it as a transition instead.
//!
//! With an interpreter matrix a test has one result per Python version on
//! a commit: both functions key a test by (version, id), so a history
//! lists each version's run and a transition compares runs of one version,
//! and a test flaky under 3.12 only is listed once, for 3.12.

use kiln_proto::model::MAX_SAMPLE_BYTES;
use kiln_proto::{FlakyTest, TestRun};

use crate::state::CommitEntry;

/// How far back a flaky run keeps its test on the flaky list: 14 days.
pub const FLAKY_WINDOW_MS: u64 = 14 * 24 * 60 * 60 * 1000;

/// The runs of `test_id` on the newest `limit` commits that ran it, newest
/// first, in `repo` if given. `commits` must come newest first.
pub fn history<'a>(
    commits: impl IntoIterator<Item = &'a CommitEntry>,
    repo: Option<&str>,
    test_id: &str,
    limit: usize,
) -> Vec<TestRun> {
    let mut runs: Vec<TestRun> = Vec::new();
    // One more than asked for, so the oldest shown knows whether it is a transition.
    for e in commits.into_iter().filter(|e| repo.is_none_or(|r| e.repo == r)) {
        // Without a matrix the id is the key; with one, each version's result.
        let found: Vec<&kiln_proto::TestResult> = match e.tests.get(test_id) {
            Some(t) => vec![t],
            None => e.tests.values().filter(|t| t.id == test_id).collect(),
        };
        for t in found {
            runs.push(TestRun {
                commit: e.commit,
                branch: e.branch.clone(),
                status: e.status,
                queued_at_ms: e.queued_at_ms,
                outcome: t.outcome,
                duration_ms: t.duration_ms,
                flaky: t.flaky,
                runs: t.runs(),
                transition: false,
                python: t.python.clone(),
            });
        }
        if runs.len() > limit {
            break;
        }
    }
    for i in 0..runs.len() {
        // The next older run of the same version.
        let older = runs[i + 1..].iter().find(|r| r.python == runs[i].python).map(|r| r.outcome.is_failure());
        runs[i].transition = older.is_some_and(|failed| failed != runs[i].outcome.is_failure());
    }
    runs.truncate(limit);
    runs
}

/// The tests flaky on some commit queued at or after `now_ms - window_ms`,
/// most often flaky first. `commits` must come newest first.
pub fn flaky_tests<'a>(
    commits: impl IntoIterator<Item = &'a CommitEntry>,
    now_ms: u64,
    window_ms: u64,
) -> Vec<FlakyTest> {
    let since = now_ms.saturating_sub(window_ms);
    let mut found: Vec<FlakyTest> = Vec::new();
    type Key = (String, Option<String>, String);
    let mut seen: std::collections::HashMap<Key, usize> = std::collections::HashMap::new();
    let mut index: std::collections::HashMap<Key, usize> = std::collections::HashMap::new();
    for e in commits.into_iter().filter(|e| e.queued_at_ms >= since) {
        for t in e.tests.values() {
            let key = (e.repo.clone(), t.python.clone(), t.id.clone());
            *seen.entry(key.clone()).or_default() += 1;
            if !t.flaky {
                continue;
            }
            match index.get(&key) {
                Some(&i) => found[i].commits.push(e.commit),
                None => {
                    let sample = t.earlier.iter().find(|r| r.outcome.is_failure()).map(|r| r.message.clone());
                    index.insert(key, found.len());
                    found.push(FlakyTest {
                        id: t.id.clone(),
                        file: t.file.clone(),
                        repo: e.repo.clone(),
                        commits: vec![e.commit],
                        seen: 0,
                        last_flaky_ms: e.queued_at_ms,
                        sample: tail(&sample.unwrap_or_else(|| t.message.clone()), MAX_SAMPLE_BYTES),
                        python: t.python.clone(),
                    });
                }
            }
        }
    }
    for f in &mut found {
        f.seen = seen.get(&(f.repo.clone(), f.python.clone(), f.id.clone())).copied().unwrap_or(0);
    }
    found.sort_by(|a, b| b.commits.len().cmp(&a.commits.len()).then_with(|| b.last_flaky_ms.cmp(&a.last_flaky_ms)));
    found
}

/// The last `max` bytes of `text` or fewer, cut at a character boundary.
fn tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::State;
    use kiln_proto::TestResult;
    use kiln_proto::wire::Supersede;
    use kiln_proto::{CommitId, CommitStatus, Outcome};

    /// A result of test `t`; `flaky` makes it a failed run and then a pass, as `--retry-failed` records it.
    fn result(outcome: Outcome, flaky: bool) -> TestResult {
        let run =
            |outcome, message: &str| TestResult::new("t".into(), "tests/test_a.py".into(), outcome, 10, message.into());
        let mut t = run(if flaky { Outcome::Fail } else { outcome }, "AssertionError: first run");
        if flaky {
            t.merge_run(run(Outcome::Pass, ""));
        }
        t
    }

    /// Commits 1..=n of one repository, newest first, each running `t` as given, queued `every_ms` apart.
    fn commits(runs: &[(Outcome, bool)], every_ms: u64) -> Vec<CommitEntry> {
        let mut s = State::default();
        let first: CommitId = format!("{:040x}", 1).parse().unwrap();
        s.submit("repo", "main", first, Supersede::Nothing, |_| true, &["tests/test_a.py".into()], None, 0).unwrap();
        let template = s.entry(&first).unwrap().clone();
        let mut out: Vec<CommitEntry> = runs
            .iter()
            .enumerate()
            .map(|(n, &(outcome, flaky))| {
                let mut e = template.clone();
                e.commit = format!("{:040x}", n + 1).parse().unwrap();
                e.seq = n as u64 + 1;
                e.queued_at_ms = (n as u64 + 1) * every_ms;
                e.status = if outcome.is_failure() { CommitStatus::Failed } else { CommitStatus::Passed };
                e.tests.insert("t".into(), result(outcome, flaky));
                e
            })
            .collect();
        out.reverse();
        out
    }

    #[test]
    fn history_is_newest_first_with_transitions_marked() {
        use Outcome::{Fail, Pass};
        let all = commits(&[(Pass, false), (Fail, false), (Fail, false), (Pass, false), (Pass, true)], 1000);
        let h = history(&all, Some("repo"), "t", 10);
        let shown: Vec<(Outcome, bool, bool)> = h.iter().map(|r| (r.outcome, r.transition, r.flaky)).collect();
        // Newest first: 5 (flaky pass), 4 pass, 3 fail, 2 fail, 1 pass.
        assert_eq!(
            shown,
            [(Pass, false, true), (Pass, true, false), (Fail, false, false), (Fail, true, false), (Pass, false, false)]
        );
        assert_eq!(h[0].runs, 2);
        // A limit keeps the newest, and the oldest shown still knows what came before it.
        let h = history(&all, None, "t", 2);
        assert_eq!(h.iter().map(|r| (r.outcome, r.transition)).collect::<Vec<_>>(), [(Pass, false), (Pass, true)]);
        assert!(history(&all, Some("other"), "t", 10).is_empty());
        assert!(history(&all, None, "u", 10).is_empty());
    }

    #[test]
    fn flaky_tests_are_those_flaky_on_a_recent_commit() {
        use Outcome::{Fail, Pass};
        let day = 24 * 60 * 60 * 1000;
        // Queued 25, 20, 15, 10 and 5 days ago (the newest last); flaky 25 and 10 days
        // ago; a plain failure in between is not flakiness.
        let all = commits(&[(Pass, true), (Fail, false), (Pass, false), (Pass, true), (Pass, false)], 5 * day);
        let now = 30 * day;
        let flaky = flaky_tests(&all, now, FLAKY_WINDOW_MS);
        let [f] = &flaky[..] else { panic!("{flaky:#?}") };
        // In the window: the commits of 10 and 5 days ago.
        assert_eq!((f.id.as_str(), f.commits.len(), f.seen), ("t", 1, 2));
        assert_eq!(f.commits[0], all[1].commit);
        assert_eq!(f.sample, "AssertionError: first run");
        // Both flaky commits count in a wider window; none in a window with no flaky run.
        assert_eq!(flaky_tests(&all, now, 30 * day)[0].commits.len(), 2);
        assert!(flaky_tests(&all, now, 6 * day).is_empty());
        assert!(flaky_tests(&commits(&[(Pass, false), (Fail, false)], day), 2 * day, FLAKY_WINDOW_MS).is_empty());
        assert_eq!(tail("ab✓cd", 3), "cd", "cut at a character boundary");
        assert_eq!(tail("abc", 10), "abc");
    }
}
