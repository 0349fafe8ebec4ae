//! The TAP plugin end to end: observer → dispatcher → runner → the built-in
//! tap plugin running shell scripts (next to a Python module run by
//! python-unittest) → exact per-test outcomes stored by the dispatcher; and
//! a restarted runner loading both plugins from its compile cache.

use std::time::Duration;

use kiln_proto::{CommitReport, CommitStatus, Outcome};

use crate::harness::{Cluster, Repo, eventually, outcomes};

const REPO: &[(&str, &str)] = &[
    (
        "tests/math.t",
        r#"#!/bin/sh
# A TAP producer in plain sh.
. tests/lib.sh
echo "TAP version 13"
echo "1..5"
check 1 "adds" "$(expr 2 + 2)" 4
check 2 "multiplies" "$(expr 2 \* 3)" 7
echo "ok 3 - divides by zero # SKIP undefined"
echo "not ok 4 - rounds half to even # TODO not implemented"
echo "ok 5 - subtracts # TODO was broken"
"#,
    ),
    (
        "tests/lib.sh",
        r#"# Helpers sourced by the tests; not a test itself.
check() {
    if [ "$3" = "$4" ]; then
        echo "ok $1 - $2"
    else
        echo "not ok $1 - $2"
        echo "  ---"
        echo "  got: $3"
        echo "  expected: $4"
        echo "  ..."
    fi
}
"#,
    ),
    ("tests/test_strings.sh", "#!/bin/sh\necho 1..2\necho 'ok 1 upper'\necho 'ok 2 lower'\n"),
    // Promises three tests, runs one, then dies.
    ("tests/broken.t", "echo 1..3\necho ok 1 - starts\necho 'cannot reach the database' >&2\nexit 2\n"),
    ("tests/gpu.t", "echo '1..0 # SKIP no GPU on this runner'\n"),
    ("tests/__init__.py", ""),
    ("tests/test_py.py", "import unittest\n\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n"),
];

fn expected(multiplies: Outcome) -> Vec<(String, Outcome)> {
    [
        ("tests.test_py.T.test_ok", Outcome::Pass),
        ("tests/broken.t", Outcome::Error),
        ("tests/broken.t::1 starts", Outcome::Pass),
        ("tests/gpu.t", Outcome::Skip),
        ("tests/math.t::1 adds", Outcome::Pass),
        ("tests/math.t::2 multiplies", multiplies),
        ("tests/math.t::3 divides by zero", Outcome::Skip),
        ("tests/math.t::4 rounds half to even", Outcome::Xfail),
        ("tests/math.t::5 subtracts", Outcome::Xpass),
        ("tests/test_strings.sh::1 upper", Outcome::Pass),
        ("tests/test_strings.sh::2 lower", Outcome::Pass),
    ]
    .into_iter()
    .map(|(id, o)| (id.to_owned(), o))
    .collect()
}

fn message<'a>(report: &'a CommitReport, id: &str) -> &'a str {
    &report.tests.iter().find(|t| t.id == id).unwrap_or_else(|| panic!("no test {id}")).message
}

/// Starts a runner that allows `sh` as well as `python3`; returns its log.
fn start_runner(cluster: &mut Cluster, name: &str) -> std::path::PathBuf {
    let work = cluster.dir.path().join(format!("{name}-work"));
    let flags = ["--work", &work.to_string_lossy(), "--allow-program", "python3", "--allow-program", "sh"]
        .map(std::ffi::OsString::from);
    let flags: Vec<&std::ffi::OsStr> = flags.iter().map(|f| f.as_os_str()).collect();
    cluster.spawn("runner", name, &flags).log.clone()
}

#[test]
fn tap_scripts_flow_to_stored_per_test_results_and_a_restarted_runner_compiles_nothing() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), REPO);
    let first = repo.commit("tap tests");
    cluster.issue("runner", "tap-runner");
    start_runner(&mut cluster, "tap-runner");
    cluster.observer("observer", &repo.path, "300ms");

    let report = cluster.wait_for(&first);
    assert_eq!(outcomes(&report).into_iter().collect::<Vec<_>>(), expected(Outcome::Fail), "{}", cluster.logs());
    assert_eq!(report.status, CommitStatus::Failed);
    assert_eq!(message(&report, "tests/math.t::2 multiplies"), "got: 6\nexpected: 7");
    assert_eq!(message(&report, "tests/math.t::3 divides by zero"), "undefined");
    assert_eq!(message(&report, "tests/gpu.t"), "no GPU on this runner");
    let broken = message(&report, "tests/broken.t");
    assert!(broken.contains("planned 3 test(s) but 1 of them ran (missing: 2, 3)"), "{broken}");
    assert!(broken.contains("exited with code 2") && broken.contains("cannot reach the database"), "{broken}");
    for t in &report.tests {
        let file = t.id.split("::").next().unwrap_or_default();
        if t.id.starts_with("tests/") {
            assert_eq!(t.file, file, "{t:?}");
        }
    }
    // The file is written after the state is stored: wait for its final version.
    let on_disk = cluster.wait_stored(&first, "final", |r| r.status.is_final());
    assert_eq!(on_disk, report);

    // The runner compiled both built-ins once and kept them in its work
    // directory; a restarted runner loads them from there.
    let cache = cluster.dir.path().join("tap-runner-work/plugin-cache");
    let entries = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
    assert_eq!(entries, 2, "{}", cluster.logs());
    let runner = cluster.procs.iter().position(|p| p.log.to_string_lossy().contains("tap-runner")).unwrap();
    drop(cluster.procs.remove(runner));
    let log = start_runner(&mut cluster, "tap-runner");
    let loaded = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<String> = text.lines().filter(|l| l.contains("compilation")).map(str::to_owned).collect();
        (lines.len() == 2).then_some(lines)
    };
    assert!(eventually(Duration::from_secs(30), || loaded().is_some()), "{}", cluster.logs());
    for line in loaded().unwrap() {
        assert!(line.contains("compilation=cached"), "{line}");
    }

    // The fix goes through the restarted runner.
    repo.write(&[("tests/math.t", &REPO[0].1.replace("7\n", "6\n"))]);
    let second = repo.commit("fix the expectation");
    let report = cluster.wait_for(&second);
    assert_eq!(outcomes(&report).into_iter().collect::<Vec<_>>(), expected(Outcome::Pass), "{}", cluster.logs());
}

#[test]
fn programs_a_runner_does_not_allow_are_one_info_line_and_a_warning_only_when_needed() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(
        cluster.dir.path(),
        &[
            ("tests/needs_sh.t", "#!/bin/sh\necho 1..1\necho ok 1\n"),
            ("tests/__init__.py", ""),
            (
                "tests/test_py.py",
                "import unittest\n\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n",
            ),
        ],
    );
    let commit = repo.commit("a script and a module");
    // A default runner: only python3 is allowed.
    let runner = cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "200ms");
    cluster.wait_for(&commit);
    let log = cluster.procs[runner].log();
    let start_up: Vec<&str> = log.lines().filter(|l| l.contains("which this runner does not allow")).collect();
    assert_eq!(start_up.len(), 1, "{log}");
    assert!(start_up[0].contains("INFO") && start_up[0].contains("sh, bash, perl"), "{log}");
    let needed: Vec<&str> = log.lines().filter(|l| l.contains("needs program")).collect();
    assert_eq!(needed.len(), 1, "{log}");
    assert!(needed[0].contains("WARN") && needed[0].contains("tests/needs_sh.t needs program `sh`"), "{log}");
    assert!(
        !log.lines().any(|l| l.contains("WARN") && l.contains("plugin=tap") && !l.contains("needs program")),
        "{log}"
    );
}
