//! Domain types: commits, test outcomes, per-commit reports and peer roles.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A git commit id: 40 lowercase hexadecimal digits (SHA-1 object names).
///
/// Validated on construction, so a `CommitId` from the network can be used in
/// file names and git calls without further checks.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommitId([u8; 40]);

/// A git tree's id: 40 hexadecimal digits like a commit's, so the same
/// validated type. Two commits with the same tree hold the same files.
pub type TreeId = CommitId;

/// Why a string is not a commit id.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a commit id (expected 40 hexadecimal digits)")]
pub struct BadCommitId(String);

impl CommitId {
    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        // The constructor admits only ASCII hex digits.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// The first 10 digits, for humans.
    pub fn short(&self) -> &str {
        &self.as_str()[..10]
    }
}

impl FromStr for CommitId {
    type Err = BadCommitId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        if bytes.len() != 40 || !bytes.iter().all(u8::is_ascii_hexdigit) {
            return Err(BadCommitId(s.chars().take(64).collect()));
        }
        let mut id = [0u8; 40];
        for (d, s) in id.iter_mut().zip(bytes) {
            *d = s.to_ascii_lowercase();
        }
        Ok(CommitId(id))
    }
}

impl TryFrom<String> for CommitId {
    type Error = BadCommitId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CommitId> for String {
    fn from(id: CommitId) -> String {
        id.as_str().to_owned()
    }
}

impl fmt::Display for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CommitId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitId({})", self.as_str())
    }
}

/// The start of a commit id, as people type it (`bba85f8`): 7 to 40
/// hexadecimal digits, lowercased. The dispatcher resolves it to the one
/// commit it knows that starts so, as git does.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CommitPrefix(String);

/// Why a string is not a commit id or a prefix of one.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a commit id (expected at least {min} hexadecimal digits, up to all 40)", min = CommitPrefix::MIN_LEN)]
pub struct BadCommitPrefix(String);

impl CommitPrefix {
    /// The fewest digits accepted, as git's default abbreviation.
    pub const MIN_LEN: usize = 7;

    /// The digits, lowercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `commit` starts with this prefix.
    pub fn matches(&self, commit: &CommitId) -> bool {
        commit.as_str().starts_with(&self.0)
    }

    /// The whole id, if all 40 digits were given.
    pub fn full(&self) -> Option<CommitId> {
        self.0.parse().ok()
    }
}

impl FromStr for CommitPrefix {
    type Err = BadCommitPrefix;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if !(Self::MIN_LEN..=40).contains(&s.len()) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadCommitPrefix(s.chars().take(64).collect()));
        }
        Ok(CommitPrefix(s.to_ascii_lowercase()))
    }
}

impl TryFrom<String> for CommitPrefix {
    type Error = BadCommitPrefix;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<CommitPrefix> for String {
    fn from(prefix: CommitPrefix) -> String {
        prefix.0
    }
}

impl fmt::Display for CommitPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CommitPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CommitPrefix({})", self.0)
    }
}

/// How one test ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Ran and passed.
    Pass,
    /// An assertion failed.
    Fail,
    /// Could not run, or raised an unexpected exception.
    Error,
    /// Skipped; the message holds the reason.
    Skip,
    /// Failed as expected.
    Xfail,
    /// Marked as an expected failure, but passed.
    Xpass,
}

impl Outcome {
    /// All outcomes, in report order.
    pub const ALL: [Outcome; 6] =
        [Outcome::Pass, Outcome::Fail, Outcome::Error, Outcome::Skip, Outcome::Xfail, Outcome::Xpass];

    /// Whether this outcome makes the commit fail. An unexpected success
    /// fails, as it does in unittest since Python 3.4.
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Fail | Outcome::Error | Outcome::Xpass)
    }

    /// The lowercase name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "pass",
            Outcome::Fail => "fail",
            Outcome::Error => "error",
            Outcome::Skip => "skip",
            Outcome::Xfail => "xfail",
            Outcome::Xpass => "xpass",
        }
    }
}

impl FromStr for Outcome {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s).ok_or_else(|| format!("`{s}` is not an outcome"))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest test id (and file path) a result may carry, in bytes: ids are
/// keys, not documents. The plugin host cuts longer ones; the dispatcher
/// refuses them.
pub const MAX_TEST_ID_BYTES: usize = 1024;

/// The longest message a result may carry, in bytes: enough for a
/// traceback and the end of the test's output, and many results fit in one
/// frame. The plugin host keeps the head and tail of longer ones; the
/// dispatcher refuses them.
pub const MAX_TEST_MESSAGE_BYTES: usize = 64 * 1024;

/// The result of one test.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    /// The framework's own id for the test, e.g. `tests.test_math.MathTest.test_add`.
    pub id: String,
    /// The repository-relative file the test came from.
    pub file: String,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took.
    pub duration_ms: u64,
    /// Failure text, skip reason, or empty.
    pub message: String,
    /// The runner that ran it, set by the dispatcher when it records the
    /// result (what a runner says here is ignored). Absent in results
    /// written before a commit could be split across runners.
    #[serde(default)]
    pub runner: Option<String>,
    /// Whether the test both failed and passed on this commit: its file was
    /// run again (`kiln dispatcher --retry-failed`) and the runs disagree.
    /// Set by the dispatcher, like `runner`.
    #[serde(default)]
    pub flaky: bool,
    /// The test's other runs on this commit, in the order they ran, when its
    /// file was run again: the result above is its first pass, or else its
    /// last run. Set by the dispatcher.
    #[serde(default)]
    pub earlier: Vec<EarlierRun>,
    /// The Python version the test ran with, when its commit's configuration
    /// asks for several (`[python] versions`, the matrix): the same test id
    /// is then a separate result per version. Set by the dispatcher from the
    /// batch (every batch is for one version); `None` without a matrix.
    #[serde(default)]
    pub python: Option<String>,
}

/// The key of test `id` run with Python `python` (see [`TestResult::key`]).
pub fn result_key(python: Option<&str>, id: &str) -> String {
    match python {
        Some(version) => format!("{version}:{id}"),
        None => id.to_owned(),
    }
}

/// A run of a test other than the one its result shows (see
/// [`TestResult::earlier`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EarlierRun {
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took.
    pub duration_ms: u64,
    /// Failure text, skip reason, or empty.
    pub message: String,
    /// The runner that ran it.
    pub runner: Option<String>,
}

impl TestResult {
    /// A result as a runner reports it: nothing the dispatcher adds.
    pub fn new(id: String, file: String, outcome: Outcome, duration_ms: u64, message: String) -> TestResult {
        TestResult {
            id,
            file,
            outcome,
            duration_ms,
            message,
            runner: None,
            flaky: false,
            earlier: Vec::new(),
            python: None,
        }
    }

    /// The key a commit's results are kept by: the test id, or with a
    /// matrix the version and the id (`3.12:tests.test_a.T.test_x`), so
    /// that the same test is one result per version. Within one commit
    /// either every result has a version or none has.
    pub fn key(&self) -> String {
        result_key(self.python.as_deref(), &self.id)
    }

    /// Takes in another run of the same test on the same commit (its file
    /// was run again): a failing result gives way to the new run, a passing
    /// one stays and the new run joins `earlier`. The test is flaky once
    /// its runs include both a failure and a run that did not fail.
    pub fn merge_run(&mut self, run: TestResult) {
        let (kept, other) = if self.outcome.is_failure() { (run, self.clone()) } else { (self.clone(), run) };
        let mut earlier = std::mem::take(&mut self.earlier);
        earlier.push(EarlierRun {
            outcome: other.outcome,
            duration_ms: other.duration_ms,
            message: other.message,
            runner: other.runner,
        });
        let failed = kept.outcome.is_failure() || earlier.iter().any(|r| r.outcome.is_failure());
        let passed = !kept.outcome.is_failure() || earlier.iter().any(|r| !r.outcome.is_failure());
        *self = TestResult { flaky: failed && passed, earlier, ..kept };
    }

    /// How many times the test ran on its commit.
    pub fn runs(&self) -> usize {
        1 + self.earlier.len()
    }
}

/// Where a commit is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitStatus {
    /// Waiting for a runner.
    Queued,
    /// A runner is working on it.
    Running,
    /// Every test passed (or was skipped, or failed as expected).
    Passed,
    /// At least one test failed, errored or unexpectedly passed.
    Failed,
    /// The tests could not be run at all (see the report's `error`).
    Error,
    /// Testing was stopped by `kiln cancel`, a job timeout, or a newer commit
    /// on the same branch; results reported until then are kept.
    Cancelled,
    /// Never tested: a newer commit on the same branch superseded it while queued.
    Skipped,
}

impl CommitStatus {
    /// Whether the commit's testing has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, CommitStatus::Queued | CommitStatus::Running)
    }

    /// The lowercase name used in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            CommitStatus::Queued => "queued",
            CommitStatus::Running => "running",
            CommitStatus::Passed => "passed",
            CommitStatus::Failed => "failed",
            CommitStatus::Error => "error",
            CommitStatus::Cancelled => "cancelled",
            CommitStatus::Skipped => "skipped",
        }
    }
}

impl FromStr for CommitStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use CommitStatus::*;
        [Queued, Running, Passed, Failed, Error, Cancelled, Skipped]
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a commit status"))
    }
}

impl fmt::Display for CommitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How many tests ended each way.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Tests in total.
    pub total: u64,
    /// Passed.
    pub pass: u64,
    /// Failed.
    pub fail: u64,
    /// Errored.
    pub error: u64,
    /// Skipped.
    pub skip: u64,
    /// Failed as expected.
    pub xfail: u64,
    /// Passed unexpectedly.
    pub xpass: u64,
    /// Of all of them, those that both failed and passed (see [`TestResult::flaky`]).
    #[serde(default)]
    pub flaky: u64,
}

impl Counts {
    /// Counts the outcomes of `tests`.
    pub fn of<'a>(tests: impl IntoIterator<Item = &'a TestResult>) -> Counts {
        let mut c = Counts::default();
        for t in tests {
            c.total += 1;
            *match t.outcome {
                Outcome::Pass => &mut c.pass,
                Outcome::Fail => &mut c.fail,
                Outcome::Error => &mut c.error,
                Outcome::Skip => &mut c.skip,
                Outcome::Xfail => &mut c.xfail,
                Outcome::Xpass => &mut c.xpass,
            } += 1;
            c.flaky += u64::from(t.flaky);
        }
        c
    }
}

/// Everything known about one commit's test run: the document the dispatcher
/// stores as `results/<commit>.json` and `kiln results` prints.
///
/// No field may be skipped when serializing: postcard, the wire encoding, is
/// not self-describing, so absent values are written as `null`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitReport {
    /// The commit tested.
    pub commit: CommitId,
    /// The repository it came from, as the observer named it.
    pub repo: String,
    /// The branch it was seen on.
    pub branch: String,
    /// Where testing stands.
    pub status: CommitStatus,
    /// Outcome counts over `tests`.
    pub counts: Counts,
    /// Why the tests could not run, when `status` is `error`.
    pub error: Option<String>,
    /// The runner that ran (or is running) the tests.
    pub runner: Option<String>,
    /// What the results should be read with, e.g. sandbox mechanisms the
    /// runner's machine lacked.
    pub warnings: Vec<String>,
    /// Unix time (ms) when the dispatcher queued the commit.
    pub queued_at_ms: u64,
    /// Unix time (ms) when the last test result or status change was stored.
    pub finished_at_ms: Option<u64>,
    /// Its test files: how many, and how many have been run.
    #[serde(default)]
    pub files: FileCounts,
    /// Per-test results, sorted by id.
    pub tests: Vec<TestResult>,
}

/// One commit's run of a test, in its history (the dispatcher's `history` module).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestRun {
    /// The commit.
    pub commit: CommitId,
    /// Its branch.
    pub branch: String,
    /// Where the commit's testing stands.
    pub status: CommitStatus,
    /// When the commit was queued (Unix ms).
    pub queued_at_ms: u64,
    /// How the test ended on it.
    pub outcome: Outcome,
    /// How long it took.
    pub duration_ms: u64,
    /// Whether it both failed and passed on this commit.
    pub flaky: bool,
    /// How many times it ran on this commit.
    pub runs: usize,
    /// Whether it went from passing to failing, or back, since the run
    /// before (the next older commit that ran it, under the same Python).
    pub transition: bool,
    /// The commit's tree (`None` for commits stored before trees were).
    pub tree: Option<TreeId>,
    /// Whether another run in the same history, on another commit with the
    /// same tree, ended the other way (one passed, the other failed): it
    /// flipped on the same code.
    pub flipped: bool,
    /// The Python version of this run, with an interpreter matrix.
    #[serde(default)]
    pub python: Option<String>,
}

/// Which rule found a test flaky (the dispatcher's `history` module defines them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlakyRule {
    /// It failed and passed on one commit (`--retry-failed`).
    SameCommit,
    /// It passed on one commit and failed on another with the same tree.
    SameTree,
}

impl FlakyRule {
    /// The name JSON uses.
    pub fn as_str(self) -> &'static str {
        match self {
            FlakyRule::SameCommit => "same_commit",
            FlakyRule::SameTree => "same_tree",
        }
    }
}

/// Two commits with the same tree on which a test ended differently.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flip {
    /// The tree both commits hold.
    pub tree: TreeId,
    /// The newest of them on which the test passed.
    pub passed: CommitId,
    /// The newest of them on which it failed.
    pub failed: CommitId,
}

/// A test that was flaky on some recent commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlakyTest {
    /// The test's id.
    pub id: String,
    /// Its file.
    pub file: String,
    /// Its repository.
    pub repo: String,
    /// The rules that found it flaky, each once, in [`FlakyRule`]'s order.
    pub rules: Vec<FlakyRule>,
    /// The commits it was flaky on ([`FlakyRule::SameCommit`]), newest first.
    pub commits: Vec<CommitId>,
    /// The trees it flipped on ([`FlakyRule::SameTree`]), newest first.
    pub flips: Vec<Flip>,
    /// How many recent commits ran it.
    pub seen: usize,
    /// When the newest commit of `commits` or `flips` was queued (Unix ms).
    pub last_flaky_ms: u64,
    /// The end of a failing run's message (at most [`MAX_SAMPLE_BYTES`]),
    /// from the newest flaky commit, else the newest flip's failed commit:
    /// what to look at first.
    pub sample: String,
    /// The Python version it was flaky under, with an interpreter matrix.
    #[serde(default)]
    pub python: Option<String>,
}

/// The longest [`FlakyTest::sample`]: the end of a traceback says what went wrong.
pub const MAX_SAMPLE_BYTES: usize = 2048;

/// How far through its test files a commit is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCounts {
    /// The files under `tests/` listed when the commit was queued.
    pub total: u64,
    /// Those whose every test has been reported, or that were not run and said so.
    pub done: u64,
}

impl CommitReport {
    /// The status a finished run earns from its results (or its error).
    pub fn final_status(tests: &BTreeMap<String, TestResult>, error: Option<&str>) -> CommitStatus {
        if error.is_some() {
            CommitStatus::Error
        } else if tests.values().any(|t| t.outcome.is_failure()) {
            CommitStatus::Failed
        } else {
            CommitStatus::Passed
        }
    }
}

/// What a peer is allowed to do, as written in its certificate by `kiln certs issue`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes jobs and reports test results.
    Runner,
    /// Submits commits.
    Observer,
    /// Reads results and cancels commits.
    Admin,
}

impl Role {
    /// The lowercase name written in certificates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Runner => "runner",
            Role::Observer => "observer",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a role.
#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not a role (expected runner, observer or admin)")]
pub struct BadRole(String);

impl FromStr for Role {
    type Err = BadRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "runner" => Ok(Role::Runner),
            "observer" => Ok(Role::Observer),
            "admin" => Ok(Role::Admin),
            other => Err(BadRole(other.chars().take(64).collect())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_prefixes_take_7_to_40_hex_digits() {
        let prefix: CommitPrefix = "BBA85F8".parse().unwrap();
        assert_eq!(prefix.as_str(), "bba85f8");
        assert!(prefix.matches(&"bba85f8".repeat(6)[..40].parse().unwrap()));
        assert!(!prefix.matches(&"a".repeat(40).parse().unwrap()));
        assert_eq!(prefix.full(), None);
        let whole: CommitPrefix = "a".repeat(40).parse().unwrap();
        assert_eq!(whole.full(), Some("a".repeat(40).parse().unwrap()));
        for bad in ["bba85f", "bba85fz", "", &"a".repeat(41)] {
            let err = bad.parse::<CommitPrefix>().unwrap_err().to_string();
            assert!(err.contains("at least 7 hexadecimal digits"), "{bad}: {err}");
        }
        assert!(serde_json::from_str::<CommitPrefix>("\"../etc\"").is_err());
    }

    #[test]
    fn commit_ids_are_validated_and_lowercased() {
        let id: CommitId = "ABCDEF0123456789abcdef0123456789ABCDEF01".parse().unwrap();
        assert_eq!(id.as_str(), "abcdef0123456789abcdef0123456789abcdef01");
        assert_eq!(id.short(), "abcdef0123");
        assert!("abc".parse::<CommitId>().is_err());
        assert!("g".repeat(40).parse::<CommitId>().is_err());
        assert!(serde_json::from_str::<CommitId>("\"../../etc/passwd\"").is_err());
    }

    #[test]
    fn a_test_that_fails_then_passes_is_flaky_and_keeps_its_pass() {
        let run = |outcome, message: &str, runner: &str| TestResult {
            runner: Some(runner.into()),
            ..TestResult::new("t".into(), "tests/test_a.py".into(), outcome, 5, message.into())
        };
        let mut t = run(Outcome::Fail, "AssertionError", "r1");
        t.merge_run(run(Outcome::Pass, "", "r2"));
        assert_eq!((t.outcome, t.flaky, t.runner.as_deref(), t.runs()), (Outcome::Pass, true, Some("r2"), 2));
        assert_eq!(t.earlier[0].message, "AssertionError");
        // A third run that fails again leaves the pass shown and the test flaky.
        t.merge_run(run(Outcome::Error, "boom", "r1"));
        assert_eq!((t.outcome, t.flaky, t.runs()), (Outcome::Pass, true, 3));
        assert_eq!(t.earlier.iter().map(|r| r.outcome).collect::<Vec<_>>(), [Outcome::Fail, Outcome::Error]);

        // Failing every time is a failure, not flakiness: the last run is shown.
        let mut t = run(Outcome::Fail, "first", "r1");
        t.merge_run(run(Outcome::Fail, "second", "r2"));
        assert_eq!((t.outcome, t.flaky, t.message.as_str()), (Outcome::Fail, false, "second"));
        // A pass whose file ran again for another test's sake, then failed: flaky, still a pass.
        let mut t = run(Outcome::Pass, "", "r1");
        t.merge_run(run(Outcome::Fail, "x", "r1"));
        assert_eq!((t.outcome, t.flaky), (Outcome::Pass, true));
        let mut t = run(Outcome::Pass, "", "r1");
        t.merge_run(run(Outcome::Pass, "", "r1"));
        assert_eq!((t.outcome, t.flaky, t.runs()), (Outcome::Pass, false, 2));
        assert_eq!(Counts::of([&t]).flaky, 0);
    }

    #[test]
    fn final_status_follows_outcomes() {
        let mut tests = BTreeMap::new();
        let mk = |id: &str, outcome| TestResult::new(id.into(), "tests/test_a.py".into(), outcome, 1, String::new());
        tests.insert("a".into(), mk("a", Outcome::Pass));
        tests.insert("b".into(), mk("b", Outcome::Xfail));
        assert_eq!(CommitReport::final_status(&tests, None), CommitStatus::Passed);
        tests.insert("c".into(), mk("c", Outcome::Xpass));
        assert_eq!(CommitReport::final_status(&tests, None), CommitStatus::Failed);
        assert_eq!(CommitReport::final_status(&tests, Some("boom")), CommitStatus::Error);
        let c = Counts::of(tests.values());
        assert_eq!((c.total, c.pass, c.xfail, c.xpass), (3, 1, 1, 1));
    }
}
