//! Repository environments with real processes and real PyPI: requirement
//! files and the project itself installed by the runner, once per set of
//! inputs, offline in the sandbox, from wheels downloaded through the one
//! index the runner allows (`--index-url`) or from a wheel directory
//! (`--find-links`); a failed install is the commit's error; a build step
//! that tries to leave the sandbox is stopped by it.
//!
//! These tests need to reach pypi.org (the machines that run Kiln's tests do).

use std::io::Read;
use std::time::Duration;

use kiln_proto::{CommitStatus, Outcome};

use crate::harness::{Cluster, Repo, outcomes};

const INDEX: &str = "https://pypi.org/simple";

/// Imports `iniconfig` (not in the runner's own Python) and checks that it
/// is the version the requirement file pins.
const USES_INICONFIG: &str = "\
import pathlib
import unittest

import iniconfig
from importlib import metadata


class T(unittest.TestCase):
    def test_pinned_version(self):
        pinned = pathlib.Path('requirements-test.txt').read_text().strip().split('==')[1]
        self.assertEqual(metadata.version('iniconfig'), pinned)
        self.assertTrue(hasattr(iniconfig, 'IniConfig'))
";

fn iniconfig_repo(cluster: &Cluster, version: &str) -> Repo {
    Repo::new(
        cluster.dir.path(),
        &[
            ("tests/__init__.py", ""),
            ("tests/test_dep.py", USES_INICONFIG),
            ("requirements-test.txt", &format!("iniconfig=={version}\n")),
            ("kiln.toml", "[python]\nrequirements = [\"requirements-test.txt\"]\n"),
        ],
    )
}

fn assert_passed(cluster: &Cluster, commit: &kiln_proto::CommitId) {
    let report = cluster.wait_for(commit);
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}\n{}", cluster.logs());
    assert_eq!(
        outcomes(&report).into_iter().collect::<Vec<_>>(),
        vec![("tests.test_dep.T.test_pinned_version".to_owned(), Outcome::Pass)],
        "{report:?}"
    );
}

#[test]
fn requirements_from_the_allowed_index_are_installed_once_and_reused_until_they_change() {
    let mut cluster = Cluster::start();
    let repo = iniconfig_repo(&cluster, "2.0.0");
    let first = repo.commit("needs iniconfig 2.0.0");
    let runner = cluster.runner_with("runner", &["--index-url", INDEX]);
    cluster.observer("observer", &repo.path, "200ms");
    assert_passed(&cluster, &first);
    let log = cluster.procs[runner].log();
    assert_eq!(log.matches("environment built").count(), 1, "{log}");
    assert_eq!(log.matches("environment reused").count(), 0, "{log}");

    // A commit that changes no input reuses the environment.
    repo.write(&[(
        "tests/test_other.py",
        "import unittest\n\n\nclass U(unittest.TestCase):\n    def test_x(self):\n        pass\n",
    )]);
    let second = repo.commit("another test, same requirements");
    let report = cluster.wait_for(&second);
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}\n{}", cluster.logs());
    let log = cluster.procs[runner].log();
    assert_eq!(log.matches("environment built").count(), 1, "{log}");
    let reused = log.lines().find(|l| l.contains("environment reused")).unwrap_or_else(|| panic!("{log}"));
    println!("reuse: {reused}");

    // Changing the requirement file builds a new one, with the new version.
    repo.write(&[("requirements-test.txt", "iniconfig==2.1.0\n")]);
    let third = repo.commit("iniconfig 2.1.0");
    let report = cluster.wait_for(&third);
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}\n{}", cluster.logs());
    let log = cluster.procs[runner].log();
    assert_eq!(log.matches("environment built").count(), 2, "{log}");
}

#[test]
fn with_no_index_a_wheel_directory_installs_offline() {
    let mut cluster = Cluster::start();
    let wheels = cluster.dir.path().join("wheels");
    let out = std::process::Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary", ":all:"])
        .args(["--index-url", INDEX, "--dest"])
        .arg(&wheels)
        .arg("iniconfig==2.0.0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let repo = iniconfig_repo(&cluster, "2.0.0");
    let commit = repo.commit("needs iniconfig");
    cluster.runner_with("runner", &["--find-links", wheels.to_str().unwrap()]);
    cluster.observer("observer", &repo.path, "200ms");
    assert_passed(&cluster, &commit);

    // No index and no wheel directory: the commit says what the runner lacks.
    let mut bare = Cluster::start();
    let repo = iniconfig_repo(&bare, "2.0.0");
    let commit = repo.commit("needs iniconfig");
    bare.runner("runner");
    bare.observer("observer", &repo.path, "200ms");
    let report = bare.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Error, "{report:?}");
    assert_eq!(
        report.error.as_deref(),
        Some(
            "set up the Python environment: kiln.toml asks for packages to be installed, but this runner allows no \
             package index (--index-url) and has no wheel directory (--find-links)"
        ),
        "{report:?}"
    );
}

#[test]
fn installing_the_project_makes_its_entry_points_visible_to_the_tests() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(
        cluster.dir.path(),
        &[
            (
                "pyproject.toml",
                "[build-system]\nrequires = [\"setuptools>=61\"]\nbuild-backend = \"setuptools.build_meta\"\n\n\
                 [project]\nname = \"kiln-demo-project\"\nversion = \"1.0\"\ndependencies = [\"iniconfig\"]\n\n\
                 [project.entry-points.\"kiln_demo.plugins\"]\nhello = \"kiln_demo:hello\"\n\n\
                 [tool.setuptools]\npackages = [\"kiln_demo\"]\n",
            ),
            ("kiln_demo/__init__.py", "def hello():\n    return 'hello from an entry point'\n"),
            ("kiln.toml", "[python]\ninstall = [\".\"]\n"),
            ("tests/__init__.py", ""),
            (
                "tests/test_entry_points.py",
                "import unittest\nfrom importlib import metadata\n\n\nclass T(unittest.TestCase):\n    def \
                 test_entry_point(self):\n        (ep,) = metadata.entry_points(group='kiln_demo.plugins')\n        \
                 self.assertEqual(ep.load()(), 'hello from an entry point')\n        \
                 self.assertEqual(metadata.version('kiln-demo-project'), '1.0')\n        import iniconfig  # its \
                 dependency\n",
            ),
        ],
    );
    let commit = repo.commit("a project with an entry point");
    cluster.runner_with("runner", &["--index-url", INDEX]);
    cluster.observer("observer", &repo.path, "200ms");
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Passed, "{report:?}\n{}", cluster.logs());
    assert_eq!(
        outcomes(&report).into_iter().collect::<Vec<_>>(),
        vec![("tests.test_entry_points.T.test_entry_point".to_owned(), Outcome::Pass)],
        "{report:?}"
    );
}

#[test]
fn a_failed_install_is_the_commits_error_with_the_installers_message_and_is_not_cached() {
    let mut cluster = Cluster::start();
    let repo = iniconfig_repo(&cluster, "2.0.0");
    repo.write(&[("requirements-test.txt", "kiln-no-such-package-e2e==1.0\n")]);
    let missing = repo.commit("a requirement that does not exist");
    let runner = cluster.runner_with("runner", &["--index-url", INDEX]);
    cluster.observer("observer", &repo.path, "200ms");
    let report = cluster.wait_for(&missing);
    assert_eq!(report.status, CommitStatus::Error, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("set up the Python environment: download the packages from https://pypi.org/simple: ")
            && error.contains("No matching distribution found for kiln-no-such-package-e2e==1.0"),
        "{error}"
    );
    let work = cluster.dir.path().join("runner-work/envs");
    let left: Vec<_> = std::fs::read_dir(&work).unwrap().filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "a failed environment was kept: {left:?}");
    assert!(!cluster.procs[runner].log().contains("environment built"));

    // An option in a requirement file would redirect the download: refused, naming the line.
    repo.write(&[("requirements-test.txt", "--index-url http://127.0.0.1:9/simple\niniconfig==2.0.0\n")]);
    let redirected = repo.commit("a requirement file that picks its own index");
    let report = cluster.wait_for(&redirected);
    assert_eq!(report.status, CommitStatus::Error, "{report:?}");
    assert_eq!(
        report.error.as_deref(),
        Some(
            "set up the Python environment: requirement file `requirements-test.txt` line 1: `--index-url \
             http://127.0.0.1:9/simple` is an option; Kiln installs only requirement specifiers from requirement \
             files (the runner chooses the index)"
        ),
        "{report:?}"
    );
}

/// A build step (setup.py, run by setuptools while `.` is installed) that
/// tries to write a file of the host and to connect to a port the test
/// listens on, and then fails, reporting what happened.
const ESCAPING_SETUP: &str = "\
import socket
import setuptools

results = []
try:
    with open(TARGET, 'w') as f:
        f.write('escaped')
    results.append('write=done')
except OSError as e:
    results.append('write=' + type(e).__name__)
try:
    socket.create_connection(('127.0.0.1', PORT), timeout=5).close()
    results.append('connect=done')
except OSError as e:
    results.append('connect=' + type(e).__name__)
raise SystemExit('kiln-escape-report: ' + ' '.join(results))
";

#[test]
fn a_build_step_cannot_write_outside_or_reach_the_hosts_loopback() {
    let mut cluster = Cluster::start();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let target = cluster.dir.path().join("escaped.txt");
    let setup = ESCAPING_SETUP
        .replace("TARGET", &format!("{:?}", target.display().to_string()))
        .replace("PORT", &port.to_string());
    let repo = Repo::new(
        cluster.dir.path(),
        &[
            (
                "pyproject.toml",
                "[build-system]\nrequires = [\"setuptools>=61\"]\nbuild-backend = \"setuptools.build_meta\"\n",
            ),
            ("setup.py", &setup),
            ("kiln.toml", "[python]\ninstall = [\".\"]\n"),
            ("tests/__init__.py", ""),
            (
                "tests/test_x.py",
                "import unittest\n\n\nclass T(unittest.TestCase):\n    def test_x(self):\n        pass\n",
            ),
        ],
    );
    let commit = repo.commit("a hostile build step");
    cluster.runner_with("runner", &["--index-url", INDEX]);
    cluster.observer("observer", &repo.path, "200ms");
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Error, "{report:?}");
    let error = report.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("set up the Python environment: install the packages (in the sandbox, offline): "),
        "{error}"
    );
    println!("hostile build step: {error}");
    // The build step ran, and neither attempt reached the host.
    assert!(error.contains("kiln-escape-report: "), "{error}");
    assert!(!error.contains("connect=done"), "{error}");
    assert!(!target.exists(), "the build step wrote {}", target.display());
    let mut accepted = Vec::new();
    while let Ok((mut stream, _)) = listener.accept() {
        let mut buf = Vec::new();
        let _ = stream.set_read_timeout(Some(Duration::from_millis(100)));
        let _ = stream.read_to_end(&mut buf);
        accepted.push(buf);
    }
    assert!(accepted.is_empty(), "the build step connected to the host's 127.0.0.1:{port}");
}
