//! A repository's `kiln.toml` (or `[tool.kiln]` in `pyproject.toml`) with
//! real processes: a typo ends the commit as `error` naming it, before any
//! runner sees the commit; `[python] paths`, `[env]` and `[limits]
//! file-timeout` reach the tests, and the runner's `--max-file-timeout`
//! bounds the last.

use kiln_proto::{CommitStatus, Outcome};

use crate::harness::{Cluster, Repo, outcomes};

/// Imports a module from `lib/` (only on sys.path through `[python] paths`)
/// and checks two variables from `[env]`.
const CONFIGURED_TEST: &str = "\
import os
import unittest

import helper_mod


class T(unittest.TestCase):
    def test_paths(self):
        self.assertEqual(helper_mod.VALUE, 42)

    def test_env(self):
        self.assertEqual((os.environ.get('TZ'), os.environ.get('APP_MODE')), ('UTC', 'e2e'))
";

/// Outlives any file-timeout below, and passes under the default one.
const SLOW_TEST: &str = "\
import time
import unittest


class Slow(unittest.TestCase):
    def test_sleeps(self):
        time.sleep(30)
";

fn kiln_toml(file_timeout: &str) -> String {
    format!(
        "[python]\npaths = [\"lib\"]\n\n[env]\nTZ = \"UTC\"\nAPP_MODE = \"e2e\"\n\n[limits]\nfile-timeout = \"{file_timeout}\"\n"
    )
}

#[test]
fn a_typo_in_kiln_toml_is_the_commits_error_and_pyproject_can_configure_instead() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(
        cluster.dir.path(),
        &[
            ("lib/helper_mod.py", "VALUE = 42\n"),
            ("tests/__init__.py", ""),
            ("tests/test_configured.py", CONFIGURED_TEST),
            ("kiln.toml", "[python]\nversions = [\"3.11\"]\npath = [\"lib\"]\n"),
        ],
    );
    let typo = repo.commit("kiln.toml with a typo");
    let runner = cluster.runner("runner");
    cluster.observer("observer", &repo.path, "200ms");
    let report = cluster.wait_for(&typo);
    assert_eq!(report.status, CommitStatus::Error, "{report:?}");
    assert_eq!(
        report.error.as_deref(),
        Some("kiln.toml: line 3: unknown field `path`, expected one of `versions`, `requirements`, `install`, `paths`"),
        "{report:?}"
    );
    assert!(report.tests.is_empty(), "{report:?}");
    assert!(!cluster.procs[runner].log().contains("job started"), "a runner got the commit:\n{}", cluster.logs());

    // A requirement file the commit lacks is named too.
    repo.write(&[("kiln.toml", "[python]\nrequirements = [\"requirements-test.txt\"]\n")]);
    let missing = repo.commit("kiln.toml naming a file that is not there");
    let report = cluster.wait_for(&missing);
    assert_eq!(report.status, CommitStatus::Error, "{report:?}");
    assert_eq!(
        report.error.as_deref(),
        Some("kiln.toml: [python] requirements: `requirements-test.txt` is not in the commit"),
        "{report:?}"
    );

    // The same settings from pyproject.toml's [tool.kiln], once kiln.toml is gone.
    repo.git(&["rm", "--quiet", "kiln.toml"]);
    repo.write(&[(
        "pyproject.toml",
        "[project]\nname = \"demo\"\nversion = \"1\"\n\n[tool.kiln.python]\npaths = [\"lib\"]\n\n[tool.kiln.env]\nTZ = \
         \"UTC\"\nAPP_MODE = \"e2e\"\n",
    )]);
    let fixed = repo.commit("configure through pyproject.toml");
    let report = cluster.wait_for(&fixed);
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}\n{}", cluster.logs());
    assert_eq!(
        outcomes(&report).into_iter().collect::<Vec<_>>(),
        vec![
            ("tests.test_configured.T.test_env".to_owned(), Outcome::Pass),
            ("tests.test_configured.T.test_paths".to_owned(), Outcome::Pass),
        ],
        "{report:?}"
    );
}

#[test]
fn paths_env_and_file_timeout_reach_the_tests_within_the_runners_maximum() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(
        cluster.dir.path(),
        &[
            ("lib/helper_mod.py", "VALUE = 42\n"),
            ("tests/__init__.py", ""),
            ("tests/test_configured.py", CONFIGURED_TEST),
            ("tests/test_slow.py", SLOW_TEST),
            ("kiln.toml", &kiln_toml("2s")),
        ],
    );
    let short = repo.commit("a 2 s file-timeout");
    cluster.runner_with("runner", &["--max-file-timeout", "3s"]);
    cluster.observer("observer", &repo.path, "200ms");
    let report = cluster.wait_for(&short);
    let by_id = |id: &str| report.tests.iter().find(|t| t.id == id).cloned();
    assert_eq!(by_id("tests.test_configured.T.test_paths").map(|t| t.outcome), Some(Outcome::Pass), "{report:?}");
    assert_eq!(by_id("tests.test_configured.T.test_env").map(|t| t.outcome), Some(Outcome::Pass), "{report:?}");
    let slow = by_id("tests.test_slow.Slow.test_sleeps").unwrap_or_else(|| panic!("{report:?}"));
    assert_eq!(slow.outcome, Outcome::Error, "{slow:?}");
    assert!(slow.message.contains("killed after 2.0 s because it ran out of time"), "{slow:?}");
    assert!(!report.warnings.iter().any(|w| w.contains("file-timeout")), "{report:?}");

    // Asking for more than the runner allows gets the runner's maximum, and says so.
    repo.write(&[("kiln.toml", &kiln_toml("1h"))]);
    let long = repo.commit("a 1 h file-timeout");
    let report = cluster.wait_for(&long);
    let slow = report.tests.iter().find(|t| t.id == "tests.test_slow.Slow.test_sleeps").unwrap();
    assert_eq!(slow.outcome, Outcome::Error, "{slow:?}");
    assert!(slow.message.contains("killed after 3.0 s because it ran out of time"), "{slow:?}");
    assert!(
        report.warnings.iter().any(|w| w
            == "kiln.toml asks for a file-timeout of 1h; this runner allows at most 3s (--max-file-timeout), so files \
                ran with that"),
        "{report:?}"
    );
}
