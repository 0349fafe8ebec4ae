//! Each test's history across commits, and which tests are flaky: read from
//! the commits the dispatcher keeps (no I/O), for `kiln history`, `kiln
//! flaky` and the dashboard's test and flaky pages and their JSON.
//!
//! **Flaky**, precisely. A run *failed* when it ended `fail`, `error` or
//! `xpass`, and *passed* when it ended `pass` or `xfail` (a `skip` is
//! neither). A test is listed as flaky when, within the last
//! [`FLAKY_WINDOW_MS`] (commits queued at or after now − the window), either
//! rule holds; [`kiln_proto::FlakyTest::rules`] says which:
//!
//! - **same commit** ([`FlakyRule::SameCommit`]): on one commit, among its
//!   runs there (`kiln dispatcher --retry-failed`), at least one failed and
//!   at least one did not; that is [`kiln_proto::TestResult::flaky`]
//!   (Harness's rule: passed and failed on the same commit within 14 days).
//! - **same tree** ([`FlakyRule::SameTree`]): it passed on one commit and
//!   failed on another commit of the same repository with the same tree id
//!   (the same files: a commit re-submitted on another branch, a revert to
//!   code that was tested, an empty commit). A commit's result here is its
//!   final one (after retries); commits stored before trees were recorded
//!   have no tree and count for this rule with nothing.
//!
//! A test that fails on one commit and passes on the next with a different
//! tree is not flaky: the code changed in between, and the history marks it
//! as a transition instead. In a history, a run is marked `flipped` when
//! another run listed with it, on another commit with the same tree, ended
//! the other way.
//!
//! With an interpreter matrix a test has one result per Python version on
//! a commit: both functions key a test by (version, id), so a history
//! lists each version's run and a transition compares runs of one version,
//! and a test flaky under 3.12 only is listed once, for 3.12.

use std::collections::{BTreeMap, HashMap};

use kiln_proto::model::MAX_SAMPLE_BYTES;
use kiln_proto::{CommitId, CommitStatus, FlakyRule, FlakyTest, Flip, Outcome, TestResult, TestRun, TreeId};

use crate::state::CommitEntry;
use crate::stream::Doc;

/// How far back a flaky run keeps its test on the flaky list: 14 days.
pub const FLAKY_WINDOW_MS: u64 = 14 * 24 * 60 * 60 * 1000;

/// One commit and its results, as this module reads them: from the
/// dispatcher's state ([`CommitEntry`]) or from a reader's copy rebuilt from
/// the stream of changes ([`Doc`], what the dashboard keeps), so that both
/// answer with one definition.
#[derive(Clone, Copy, Debug)]
pub struct Tested<'a> {
    /// The commit.
    pub commit: CommitId,
    /// Its repository.
    pub repo: &'a str,
    /// Its branch.
    pub branch: &'a str,
    /// Where its testing stands.
    pub status: CommitStatus,
    /// When it was queued (Unix ms).
    pub queued_at_ms: u64,
    /// Its tree, if known.
    pub tree: Option<TreeId>,
    /// Its results by test id.
    pub tests: &'a BTreeMap<String, TestResult>,
}

impl<'a> From<&'a CommitEntry> for Tested<'a> {
    fn from(e: &'a CommitEntry) -> Tested<'a> {
        Tested {
            commit: e.commit,
            repo: &e.repo,
            branch: &e.branch,
            status: e.status,
            queued_at_ms: e.queued_at_ms,
            tree: e.tree,
            tests: &e.tests,
        }
    }
}

impl<'a> From<&'a Doc> for Tested<'a> {
    fn from(d: &'a Doc) -> Tested<'a> {
        let r = &d.row;
        Tested {
            commit: r.commit,
            repo: &r.repo,
            branch: &r.branch,
            status: r.status,
            queued_at_ms: r.queued_at_ms,
            tree: r.tree,
            tests: &d.tests,
        }
    }
}

/// The runs of `test_id` on the newest `limit` commits that ran it, newest
/// first, in `repo` if given. `commits` must come newest first.
pub fn history<'a, C: Into<Tested<'a>>>(
    commits: impl IntoIterator<Item = C>,
    repo: Option<&str>,
    test_id: &str,
    limit: usize,
) -> Vec<TestRun> {
    let mut runs: Vec<TestRun> = Vec::new();
    // One more than asked for, so the oldest shown knows whether it is a transition.
    for e in commits.into_iter().map(Into::into).filter(|e: &Tested<'_>| repo.is_none_or(|r| e.repo == r)) {
        for t in results_of(e.tests, test_id) {
            runs.push(TestRun {
                commit: e.commit,
                branch: e.branch.to_owned(),
                status: e.status,
                queued_at_ms: e.queued_at_ms,
                outcome: t.outcome,
                duration_ms: t.duration_ms,
                flaky: t.flaky,
                runs: t.runs(),
                transition: false,
                tree: e.tree,
                flipped: false,
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
    for i in 0..runs.len() {
        let (tree, passed) = (runs[i].tree, class(runs[i].outcome));
        let other = passed.map(|p| !p);
        runs[i].flipped = tree.is_some()
            && other.is_some()
            && runs.iter().any(|o| {
                o.tree == tree && o.python == runs[i].python && o.commit != runs[i].commit && class(o.outcome) == other
            });
    }
    runs
}

/// `Some(true)` for a run that passed, `Some(false)` for one that failed,
/// `None` for a skip (see the module's definition).
fn class(outcome: Outcome) -> Option<bool> {
    match outcome {
        Outcome::Pass | Outcome::Xfail => Some(true),
        Outcome::Fail | Outcome::Error | Outcome::Xpass => Some(false),
        Outcome::Skip => None,
    }
}

/// The most flips one [`FlakyTest`] lists (the newest), so that a reply of
/// [`kiln_proto::wire::MAX_FLAKY`] tests fits a frame.
pub const MAX_FLIPS: usize = 20;

/// The tests flaky on some commit queued at or after `now_ms - window_ms`,
/// most often flaky first. `commits` must come newest first.
pub fn flaky_tests<'a, C: Into<Tested<'a>>>(
    commits: impl IntoIterator<Item = C>,
    now_ms: u64,
    window_ms: u64,
) -> Vec<FlakyTest> {
    find_flaky(commits, now_ms, window_ms, None)
}

/// Whether one test (in `repo`, if given) is flaky by [`flaky_tests`]'s
/// rule: what the test's page shows as its badge, without looking at
/// every other test.
pub fn flaky_test<'a, C: Into<Tested<'a>>>(
    commits: impl IntoIterator<Item = C>,
    repo: Option<&str>,
    test_id: &str,
    now_ms: u64,
    window_ms: u64,
) -> Option<FlakyTest> {
    let found = find_flaky(commits, now_ms, window_ms, Some(test_id));
    found.into_iter().find(|f| repo.is_none_or(|r| f.repo == r))
}

/// What one test's runs in the window add up to, while they are read;
/// borrowed from the commits, so that only the flaky tests are copied.
struct Seen<'a> {
    id: &'a str,
    /// The Python version it ran with, with an interpreter matrix.
    python: Option<&'a str>,
    file: &'a str,
    repo: &'a str,
    /// Commits that ran it.
    seen: usize,
    /// Commits it was flaky on, newest first, with when they were queued.
    flaky_on: Vec<(CommitId, u64)>,
    /// A failing run's message from the newest flaky commit.
    sample: Option<&'a str>,
    /// The trees it flipped on, with when the later of the two commits was
    /// queued and the failed commit's message.
    flips: Vec<(Flip, u64, &'a str)>,
}

/// One test's runs on the commits of one tree: the newest commit it passed
/// on and the newest it failed on (with when, and the failure's message).
type TreeRuns<'a> = (Option<(CommitId, u64)>, Option<(CommitId, u64, &'a str)>);

/// [`flaky_tests`], of only the test `only` if given.
///
/// Linear in the results in the window: one pass for the same-commit rule,
/// and one over the commits whose tree another commit shares (grouped
/// first, so commits with a tree of their own cost nothing more).
fn find_flaky<'a, C: Into<Tested<'a>>>(
    commits: impl IntoIterator<Item = C>,
    now_ms: u64,
    window_ms: u64,
    only: Option<&str>,
) -> Vec<FlakyTest> {
    let since = now_ms.saturating_sub(window_ms);
    let window: Vec<Tested<'a>> =
        commits.into_iter().map(Into::into).filter(|e: &Tested<'_>| e.queued_at_ms >= since).collect();
    let tests_of = |e: &Tested<'a>| -> Box<dyn Iterator<Item = &'a TestResult> + 'a> {
        let tests: &'a BTreeMap<String, TestResult> = e.tests;
        match only {
            Some(id) => Box::new(results_of(tests, id).into_iter()),
            None => Box::new(tests.values()),
        }
    };
    let mut all: Vec<Seen<'a>> = Vec::new();
    let mut index: HashMap<(&'a str, Option<&'a str>, &'a str), usize> = HashMap::new();
    // Same commit, and how many commits ran each test.
    for e in &window {
        for t in tests_of(e) {
            let i = *index.entry((e.repo, t.python.as_deref(), &t.id)).or_insert_with(|| {
                all.push(Seen {
                    id: &t.id,
                    python: t.python.as_deref(),
                    file: &t.file,
                    repo: e.repo,
                    seen: 0,
                    flaky_on: Vec::new(),
                    sample: None,
                    flips: Vec::new(),
                });
                all.len() - 1
            });
            let s = &mut all[i];
            s.seen += 1;
            if t.flaky {
                if s.flaky_on.is_empty() {
                    let failed = t.earlier.iter().find(|r| r.outcome.is_failure()).map(|r| r.message.as_str());
                    s.sample = Some(failed.unwrap_or(&t.message));
                }
                s.flaky_on.push((e.commit, e.queued_at_ms));
            }
        }
    }
    // Same tree: the commits of each tree that more than one commit has, newest first.
    let mut trees: HashMap<(&'a str, TreeId), Vec<usize>> = HashMap::new();
    for (i, e) in window.iter().enumerate() {
        if let Some(tree) = e.tree {
            trees.entry((e.repo, tree)).or_default().push(i);
        }
    }
    for ((repo, tree), shared) in trees.into_iter().filter(|(_, c)| c.len() > 1) {
        let mut runs: HashMap<(Option<&'a str>, &'a str), TreeRuns<'a>> = HashMap::new();
        for &i in &shared {
            let e = &window[i];
            for t in tests_of(e) {
                let Some(passed) = class(t.outcome) else { continue };
                let (pass, fail) = runs.entry((t.python.as_deref(), &t.id)).or_default();
                // Newest first: the first of each kind is the newest.
                if passed && pass.is_none() {
                    *pass = Some((e.commit, e.queued_at_ms));
                } else if !passed && fail.is_none() {
                    *fail = Some((e.commit, e.queued_at_ms, &t.message));
                }
            }
        }
        for ((python, id), run) in runs {
            let (Some((passed, pass_at)), Some((failed, fail_at, message))) = run else { continue };
            if let Some(&i) = index.get(&(repo, python, id)) {
                all[i].flips.push((Flip { tree, passed, failed }, pass_at.max(fail_at), message));
            }
        }
    }
    let mut found: Vec<FlakyTest> = all.into_iter().filter_map(flaky_of).collect();
    let weight = |f: &FlakyTest| f.commits.len() + f.flips.len();
    found.sort_by(|a, b| {
        weight(b).cmp(&weight(a)).then_with(|| b.last_flaky_ms.cmp(&a.last_flaky_ms)).then_with(|| a.id.cmp(&b.id))
    });
    found
}

/// The flaky test `s` describes, if either rule found it.
fn flaky_of(mut s: Seen<'_>) -> Option<FlakyTest> {
    // Newest first (trees came in no particular order); ties by tree, so the answer is stable.
    s.flips.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.tree.cmp(&b.0.tree)));
    s.flips.truncate(MAX_FLIPS);
    let mut rules = Vec::new();
    if !s.flaky_on.is_empty() {
        rules.push(FlakyRule::SameCommit);
    }
    if !s.flips.is_empty() {
        rules.push(FlakyRule::SameTree);
    }
    if rules.is_empty() {
        return None;
    }
    let last_flaky_ms = s.flaky_on.iter().map(|c| c.1).chain(s.flips.iter().map(|f| f.1)).max().unwrap_or(0);
    let sample = s.sample.or_else(|| s.flips.first().map(|f| f.2)).unwrap_or_default();
    Some(FlakyTest {
        id: s.id.to_owned(),
        file: s.file.to_owned(),
        repo: s.repo.to_owned(),
        rules,
        commits: s.flaky_on.into_iter().map(|c| c.0).collect(),
        flips: s.flips.into_iter().map(|f| f.0).collect(),
        seen: s.seen,
        last_flaky_ms,
        sample: tail(sample, MAX_SAMPLE_BYTES),
        python: s.python.map(str::to_owned),
    })
}

/// The results of test `id` in `tests`: the one keyed by the id, or with an
/// interpreter matrix (results keyed by version and id) one per version.
fn results_of<'a>(tests: &'a BTreeMap<String, TestResult>, id: &str) -> Vec<&'a TestResult> {
    match tests.get(id) {
        Some(t) => vec![t],
        None => tests.values().filter(|t| t.id == id).collect(),
    }
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
    fn a_test_that_passed_and_failed_on_one_tree_is_flaky_by_the_same_tree_rule() {
        use Outcome::{Fail, Pass, Skip};
        let day = 24 * 60 * 60 * 1000;
        let tree = |n: u64| -> TreeId { format!("{:040x}", 0xa000 + n).parse().unwrap() };
        // Commits 1..=5 queued 1..=5 days in, each on a tree: 1 passes on A; 2 fails on B
        // (the code changed: a transition); 3 fails on A again (a revert: a flip); 4 passes
        // on C; 5 skips on C (a skip neither passed nor failed).
        let mut all = commits(&[(Pass, false), (Fail, false), (Fail, false), (Pass, false), (Skip, false)], day);
        for (e, t) in all.iter_mut().rev().zip([1, 2, 1, 3, 3]) {
            e.tree = Some(tree(t));
        }
        let ids: Vec<CommitId> = all.iter().rev().map(|e| e.commit).collect();
        let c = |n: usize| ids[n - 1];
        let flaky = flaky_tests(&all, 6 * day, FLAKY_WINDOW_MS);
        let [f] = &flaky[..] else { panic!("{flaky:#?}") };
        assert_eq!(f.rules, [FlakyRule::SameTree]);
        assert!(f.commits.is_empty(), "never flaky on one commit");
        assert_eq!(f.flips, [Flip { tree: tree(1), passed: c(1), failed: c(3) }]);
        assert_eq!((f.seen, f.last_flaky_ms), (5, 3 * day));
        assert_eq!(f.sample, "AssertionError: first run", "the failed commit's message");
        assert_eq!(flaky_test(&all, Some("repo"), "t", 6 * day, FLAKY_WINDOW_MS).as_ref(), Some(f));
        // Commit 1 out of the window: nothing flipped in it.
        assert!(flaky_tests(&all, 6 * day, 4 * day + 1).is_empty());
        // The history marks both runs on tree A, and only those.
        let h = history(&all, None, "t", 10);
        let shown: Vec<(CommitId, bool)> = h.iter().map(|r| (r.commit, r.flipped)).collect();
        assert_eq!(shown, [(c(5), false), (c(4), false), (c(3), true), (c(2), false), (c(1), true)]);
        assert_eq!(h[2].tree, Some(tree(1)));
        // Flaky by both rules: commit 4 also failed, then passed, on a retry.
        all[1].tests.insert("t".into(), result(Pass, true));
        let flaky = flaky_tests(&all, 6 * day, FLAKY_WINDOW_MS);
        assert_eq!(flaky[0].rules, [FlakyRule::SameCommit, FlakyRule::SameTree]);
        assert_eq!((flaky[0].commits.clone(), flaky[0].flips.len(), flaky[0].last_flaky_ms), (vec![c(4)], 1, 4 * day));
        // Without trees (commits stored before trees were), only the same-commit rule speaks.
        for e in &mut all {
            e.tree = None;
        }
        let flaky = flaky_tests(&all, 6 * day, FLAKY_WINDOW_MS);
        assert_eq!((flaky[0].rules.clone(), flaky[0].flips.len()), (vec![FlakyRule::SameCommit], 0));
        assert!(history(&all, None, "t", 10).iter().all(|r| !r.flipped));
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
        // One test alone, as its page asks: the same answer.
        assert_eq!(flaky_test(&all, Some("repo"), "t", now, FLAKY_WINDOW_MS).as_ref(), Some(f));
        assert_eq!(flaky_test(&all, Some("other"), "t", now, FLAKY_WINDOW_MS), None);
        assert_eq!(flaky_test(&all, None, "u", now, FLAKY_WINDOW_MS), None);
        assert_eq!(tail("ab✓cd", 3), "cd", "cut at a character boundary");
        assert_eq!(tail("abc", 10), "abc");
    }
}
