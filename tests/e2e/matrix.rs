//! The interpreter matrix with real processes and real interpreters: a
//! commit whose `kiln.toml` asks for `versions = ["3.11", "3.12"]` is tested
//! once per version, each half on the runner that registered that
//! interpreter (`kiln runner --python`), with `python` on every result; the
//! half no connected runner can serve waits with its reason in the queue
//! (`/api/v1/queue`), the commit unfinished, until a runner that has it
//! registers.
//!
//! Two versions come from the machine: `/usr/bin/python3` and, when pyenv
//! is there, a pyenv interpreter of another minor version. With only one,
//! the test says so on its output and checks what one interpreter can: a
//! version nobody has leaves its half queued with the reason.

use std::path::PathBuf;
use std::time::Duration;

use kiln_proto::{CommitReport, CommitStatus, Outcome};
use serde_json::Value;

use crate::harness::{Cluster, Repo, eventually};
use crate::web::{dashboard, get_json};

/// Passes everywhere, and fails under any Python but the one named in
/// `expected.txt`: so each version's outcome is known exactly.
const VERSION_TEST: &str = "\
import pathlib
import sys
import unittest


class V(unittest.TestCase):
    def test_runs(self):
        self.assertGreaterEqual(sys.version_info[:2], (3, 8))

    def test_is_the_expected_minor(self):
        expected = pathlib.Path('expected.txt').read_text().strip()
        self.assertEqual('%d.%d' % sys.version_info[:2], expected)
";

/// An interpreter and its `major.minor`.
fn minor_of(path: &PathBuf) -> Option<String> {
    let out = std::process::Command::new(path)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `/usr/bin/python3`, and a pyenv interpreter of another minor version if there is one.
fn interpreters() -> (PathBuf, String, Option<(PathBuf, String)>) {
    let system = PathBuf::from("/usr/bin/python3");
    let minor = minor_of(&system).expect("/usr/bin/python3 says its version");
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let mut other = None;
    if let Ok(entries) = std::fs::read_dir(home.join(".pyenv/versions")) {
        // Another CPython 3.8+ (what the driver supports): 3.12 if there, else the newest.
        let mut found: Vec<(u32, PathBuf, String)> = entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin/python3"))
            .filter_map(|p| {
                let m = minor_of(&p)?;
                let n: u32 = m.strip_prefix("3.")?.parse().ok()?;
                (n >= 8 && m != minor).then_some((n, p, m))
            })
            .collect();
        found.sort();
        let pick = found.iter().position(|(n, _, _)| *n == 12).unwrap_or(found.len().saturating_sub(1));
        other = (!found.is_empty()).then(|| found.swap_remove(pick)).map(|(_, p, m)| (p, m));
    }
    (system, minor, other)
}

/// The queue's entry for `commit`, once its reason is `no_python`.
fn queued_for_python(url: &str, commit: &str) -> Value {
    let mut entry = Value::Null;
    let seen = eventually(Duration::from_secs(60), || {
        let queue = get_json(&format!("{url}/api/v1/queue"));
        entry = queue["queue"]
            .as_array()
            .and_then(|q| q.iter().find(|e| e["commit"] == commit && e["reason"] == "no_python"))
            .cloned()
            .unwrap_or(Value::Null);
        !entry.is_null()
    });
    assert!(seen, "{commit} never waited for a Python: {}", get_json(&format!("{url}/api/v1/queue")));
    entry
}

/// (id, python, outcome, runner) of each result.
fn rows(report: &CommitReport) -> Vec<(String, Option<String>, Outcome, Option<String>)> {
    report.tests.iter().map(|t| (t.id.clone(), t.python.clone(), t.outcome, t.runner.clone())).collect()
}

#[test]
fn a_commit_is_tested_once_per_python_version_and_a_missing_version_waits_with_its_reason() {
    let (system, minor, other) = interpreters();
    let mut cluster = Cluster::start_with(&["--http", "127.0.0.1:0"]);
    let url = dashboard(&cluster);
    // The second version: a pyenv one, or one nobody has.
    let (second, second_path) = match &other {
        Some((path, m)) => {
            println!("interpreters: {} is {minor}, {} is {m}", system.display(), path.display());
            (m.clone(), Some(path.clone()))
        }
        None => {
            println!(
                "only one interpreter found ({} is {minor}, no pyenv interpreter of another version): the second \
                 version is one no runner has, and the test checks that it waits, not that it is served",
                system.display()
            );
            ("3.99".to_owned(), None)
        }
    };
    let toml = format!("[python]\nversions = [\"{minor}\", \"{second}\"]\n");
    let repo = Repo::new(
        cluster.dir.path(),
        &[
            ("tests/__init__.py", ""),
            ("tests/test_version.py", VERSION_TEST),
            ("expected.txt", &format!("{minor}\n")),
            ("kiln.toml", &toml),
        ],
    );
    let commit = repo.commit("test under two versions");
    let system_arg = system.display().to_string();
    cluster.runner_with("py-first", &["--python", &system_arg]);
    cluster.observer("observer", &repo.path, "200ms");

    // The first version's half runs; the second's waits, saying why.
    let half = cluster.wait_stored(&commit, "the first version's results", |r| r.tests.len() == 2);
    assert!(!half.status.is_final(), "{half:?}");
    assert!(half.tests.iter().all(|t| t.python.as_deref() == Some(minor.as_str())), "{half:?}");
    let entry = queued_for_python(&url, commit.as_str());
    assert_eq!(entry["why"], format!("no runner has Python {second}"), "{entry}");
    // Its two files (`__init__.py` and the test) under the second version.
    assert_eq!(entry["pending_files"], 2, "{entry}");
    let report = cluster.admin(&["results", commit.as_str(), "--format", "json"]);
    let report: CommitReport = serde_json::from_slice(&report.stdout).expect("a report");
    assert_eq!((report.status, report.files.total, report.files.done), (CommitStatus::Queued, 4, 2), "{report:?}");

    let Some(second_path) = second_path else { return };
    // A runner with the second version registers: the commit is served and ends.
    let arg = second_path.display().to_string();
    cluster.runner_with("py-second", &["--python", &arg]);
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Failed, "one entry fails, so the commit does\n{}", cluster.logs());
    let id = |name: &str| format!("tests.test_version.V.{name}");
    let (first, other_minor) = (Some(minor.clone()), Some(second.clone()));
    let (on_first, on_second) = (Some("py-first".to_owned()), Some("py-second".to_owned()));
    assert_eq!(
        rows(&report),
        [
            (id("test_is_the_expected_minor"), first.clone(), Outcome::Pass, on_first.clone()),
            (id("test_runs"), first, Outcome::Pass, on_first),
            (id("test_is_the_expected_minor"), other_minor.clone(), Outcome::Fail, on_second.clone()),
            (id("test_runs"), other_minor, Outcome::Pass, on_second),
        ],
        "{report:?}"
    );
    assert_eq!((report.counts.total, report.counts.pass, report.counts.fail), (4, 3, 1), "{report:?}");
    let text = cluster.admin(&["results", commit.as_str()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("FAIL  {} [python {}] (", id("test_is_the_expected_minor"), second)), "{text}");
    let junit = cluster.admin(&["results", commit.as_str(), "--format", "junit"]);
    let junit = String::from_utf8_lossy(&junit.stdout);
    assert!(
        junit.contains(&format!(
            "<testsuite name=\"tests/test_version.py [python {minor}]\" tests=\"2\" failures=\"0\""
        )),
        "{junit}"
    );

    // Without a matrix nothing changes: no version on the results.
    repo.write(&[("kiln.toml", "[env]\nTZ = \"UTC\"\n")]);
    let plain = repo.commit("no matrix");
    let report = cluster.wait_for(&plain);
    assert_eq!(report.tests.len(), 2, "{report:?}");
    assert!(report.tests.iter().all(|t| t.python.is_none()), "{report:?}");
}

/// Fails on purpose, saying which Python ran it and whether from an
/// environment, after importing a package only the environment has.
const ENV_TEST: &str = "\
import sys
import unittest

import iniconfig


class E(unittest.TestCase):
    def test_says_where_it_ran(self):
        self.assertTrue(hasattr(iniconfig, 'IniConfig'))
        self.fail('ran on %d.%d in an environment: %s' % (sys.version_info[:2] + (sys.prefix != sys.base_prefix,)))
";

#[test]
fn each_version_gets_its_own_environment_built_with_its_interpreter() {
    let (system, minor, other) = interpreters();
    let Some((other_path, other_minor)) = other else {
        println!("only one interpreter found ({} is {minor}): no second environment to build", system.display());
        return;
    };
    println!("interpreters: {} is {minor}, {} is {other_minor}", system.display(), other_path.display());
    let mut cluster = Cluster::start();
    let wheels = cluster.dir.path().join("wheels");
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary", ":all:"])
        .args(["--index-url", "https://pypi.org/simple", "--dest"])
        .arg(&wheels)
        .arg("iniconfig==2.0.0")
        .output()
        .expect("pip download");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let toml =
        format!("[python]\nversions = [\"{minor}\", \"{other_minor}\"]\nrequirements = [\"requirements-test.txt\"]\n");
    let repo = Repo::new(
        cluster.dir.path(),
        &[
            ("tests/__init__.py", ""),
            ("tests/test_env.py", ENV_TEST),
            ("requirements-test.txt", "iniconfig==2.0.0\n"),
            ("kiln.toml", &toml),
        ],
    );
    let commit = repo.commit("an environment per version");
    // One runner with both interpreters.
    let (first, second) = (system.display().to_string(), other_path.display().to_string());
    let runner = cluster.runner_with(
        "both",
        &["--python", &first, "--python", &second, "--find-links", wheels.to_str().expect("utf-8"), "--slots", "1"],
    );
    cluster.observer("observer", &repo.path, "200ms");
    let report = cluster.wait_for(&commit);
    let said: Vec<(Option<String>, String)> = report
        .tests
        .iter()
        .map(|t| (t.python.clone(), t.message.lines().last().unwrap_or_default().to_owned()))
        .collect();
    assert_eq!(
        said,
        [
            (Some(minor.clone()), format!("AssertionError: ran on {minor} in an environment: True")),
            (Some(other_minor.clone()), format!("AssertionError: ran on {other_minor} in an environment: True")),
        ],
        "{report:?}\n{}",
        cluster.logs()
    );
    // Two environments, one per interpreter, each built once.
    let log = cluster.procs[runner].log();
    let built: Vec<&str> = log.lines().filter(|l| l.contains("environment built")).collect();
    assert_eq!(built.len(), 2, "{log}");
}

#[test]
fn a_python_pattern_that_matches_nothing_or_no_python_stops_the_runner_naming_it() {
    let mut cluster = Cluster::start();
    for (flag, says) in [
        ("/nonexistent/*/bin/python3", "error: --python /nonexistent/*/bin/python3: matches no file"),
        ("/bin/tru?", "error: --python /bin/tru?: /bin/true is not a Python interpreter: it printed no version"),
    ] {
        let name = if flag.contains("nonexistent") { "nothing" } else { "not-python" };
        let i = cluster.runner_with(name, &["--python", flag]);
        let status = cluster.procs[i].child.wait().expect("the runner exits");
        let log = cluster.procs[i].log();
        assert_eq!(status.code(), Some(2), "{log}");
        assert!(log.lines().any(|l| l == says), "{log}");
    }
}
