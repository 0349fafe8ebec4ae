//! `tests` symlinks with real processes: a symlink under `tests/` that leads
//! out of the checkout, or `tests` itself being a symlink, is never followed
//! and is reported once, by a runner in the commit's warnings and by
//! `kiln plugin run` on the terminal.

use kiln_proto::{CommitStatus, Outcome};

use crate::harness::{Cluster, Repo, kiln, outcomes};

const OK_TEST: &str = "import unittest\n\n\nclass T(unittest.TestCase):\n    def test_ok(self):\n        pass\n";

/// The report's warnings about symlinks (a runner may add sandbox warnings of its own).
fn link_warnings(report: &kiln_proto::CommitReport) -> Vec<&str> {
    report.warnings.iter().map(String::as_str).filter(|w| w.contains("symlink")).collect()
}

#[test]
fn tests_symlinks_leading_out_are_reported_once_and_never_followed() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_ok.py", OK_TEST)]);
    std::os::unix::fs::symlink("/etc", repo.path.join("tests/escape")).unwrap();
    let inside = repo.commit("a test, and a link to /etc among them");
    cluster.runner("runner");
    cluster.observer("observer", &repo.path, "200ms");

    let report = cluster.wait_for(&inside);
    assert_eq!(
        outcomes(&report).into_iter().collect::<Vec<_>>(),
        vec![("tests.test_ok.T.test_ok".to_owned(), Outcome::Pass)],
        "{}",
        cluster.logs()
    );
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}");
    assert_eq!(
        link_warnings(&report),
        vec!["symlinks that could lead outside the checkout were not followed: tests/escape -> /etc"],
        "{report:?}"
    );

    // `tests` itself a link to /usr: nothing is listed from /usr, and the
    // commit ends as an error naming the link.
    repo.git(&["rm", "-r", "--quiet", "tests"]);
    std::os::unix::fs::symlink("/usr", repo.path.join("tests")).unwrap();
    let linked = repo.commit("tests is a link to /usr");
    let report = cluster.wait_for(&linked);
    assert!(report.tests.is_empty(), "{report:?}");
    assert_eq!(report.status, CommitStatus::Error, "{report:?}");
    assert_eq!(
        report.error.as_deref(),
        Some("no tests found: symlinks that could lead outside the checkout were not followed: tests -> /usr"),
        "{report:?}"
    );

    // `kiln plugin run` on the same working tree says the same, and fails.
    let out = kiln().args(["plugin", "run", "--dir"]).arg(&repo.path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr
            .contains("no tests found: symlinks that could lead outside the checkout were not followed: tests -> /usr"),
        "{stderr}"
    );
    // With real tests beside a link to /etc, it runs them and warns once.
    std::fs::remove_file(repo.path.join("tests")).unwrap();
    repo.write(&[("tests/__init__.py", ""), ("tests/test_ok.py", OK_TEST)]);
    std::os::unix::fs::symlink("/etc", repo.path.join("tests/escape")).unwrap();
    let out = kiln().args(["plugin", "run", "--dir"]).arg(&repo.path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("symlinks that could lead outside the checkout were not followed: tests/escape -> /etc").count(),
        1,
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("PASS  tests.test_ok.T.test_ok"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // As JSON: the status beside the counts and tests.
    let out = kiln().args(["plugin", "run", "--format", "json", "--dir"]).arg(&repo.path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let document: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(document["status"], "passed", "{document}");
    assert_eq!(document["counts"]["total"], 1, "{document}");
}
