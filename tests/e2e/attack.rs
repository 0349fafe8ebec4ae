//! A commit whose tests attack the runner that runs them, the way the
//! security issue's probe did: read the runner's key (by the path in its
//! command line, by the paths this harness knows, by searching `/`),
//! `/etc/shadow`, another job's checkout running at the same time, the
//! runner's object cache, and list the machine's processes.
//!
//! Each test passes only if its attack fails, and otherwise puts what it
//! read into its failure message, so a hole shows up in the results as
//! exactly the leak the issue describes. The sandbox's own tests show each
//! defence alone; this one shows the runner wires them in.

use kiln_proto::Outcome;

use crate::harness::{Cluster, Repo, outcomes};

/// The attack, as a unittest module. `{targets}` is a JSON object of the
/// paths this harness knows (keys, database, work directories).
const ATTACK: &str = r#"
import json
import os
import time
import unittest

TARGETS = json.loads(r'''{targets}''')
NAMES = {"key.pem", "cert.pem", "kiln.db", "cache.git", "secret.txt"}


def read(path):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def search(top, budget_s=30):
    """Paths under `top` with a name in NAMES (not through /proc or /sys)."""
    found = []
    deadline = time.monotonic() + budget_s
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys")]
        found += [os.path.join(root, n) for n in dirs + files if n in NAMES]
        if time.monotonic() > deadline:
            break
    return found


class Attack(unittest.TestCase):
    def test_key_by_the_path_in_the_runners_command_line(self):
        stolen = []
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                args = read(f"/proc/{pid}/cmdline").split("\0")
            except OSError:
                continue
            if "--identity" in args[:-1]:
                identity = args[args.index("--identity") + 1]
                try:
                    stolen.append(read(os.path.join(identity, "key.pem")))
                except OSError:
                    pass
        self.assertEqual(stolen, [])

    def test_keys_and_database_by_absolute_path(self):
        stolen = {}
        for path in TARGETS["files"]:
            try:
                stolen[path] = read(path)
            except OSError:
                pass
        self.assertEqual(stolen, {})

    def test_secrets_by_searching_the_filesystem(self):
        stolen = {}
        for path in search("/"):
            # The system's public CA bundle is called cert.pem too.
            if path.startswith("/usr/") and path.endswith("/cert.pem"):
                continue
            try:
                stolen[path] = read(path) if os.path.isfile(path) else sorted(os.listdir(path))
            except OSError:
                pass
        self.assertEqual(stolen, {})

    def test_etc_shadow(self):
        try:
            stolen = read("/etc/shadow")
        except OSError:
            return
        self.fail(stolen)

    def test_another_jobs_checkout(self):
        stolen = {}
        for work in TARGETS["work"]:
            for path in search(work):
                if path.endswith("secret.txt"):
                    try:
                        stolen[path] = read(path)
                    except OSError:
                        pass
        self.assertEqual(stolen, {})

    def test_the_object_cache(self):
        stolen = {}
        for work in TARGETS["work"]:
            try:
                stolen[work] = sorted(os.listdir(os.path.join(work, "cache.git", "objects")))
            except OSError:
                pass
        self.assertEqual(stolen, {})

    def test_the_machines_processes(self):
        seen = {}
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                seen[pid] = read(f"/proc/{pid}/cmdline").replace("\0", " ")
            except OSError:
                seen[pid] = "?"
        # Only this command's own processes may be listed: the unittest
        # driver (its PID namespace's init) and this file's fork of it.
        self.assertEqual(sorted(seen), sorted({"1", str(os.getpid())}), seen)
"#;

/// An orphan branch's suite: a secret beside a test slow enough that its
/// job is still running when the attack runs.
const OTHER: &[(&str, &str)] = &[
    ("secret.txt", "another branch's secret 7f3a9c"),
    ("tests/__init__.py", ""),
    (
        "tests/test_slow.py",
        "import time\nimport unittest\n\nclass Slow(unittest.TestCase):\n    def test_slow(self):\n        time.sleep(8)\n",
    ),
];

#[test]
fn tests_that_attack_the_runner_find_nothing_and_the_key_never_reaches_the_results() {
    let mut cluster = Cluster::start();
    cluster.issue("runner", "runner-1");
    cluster.issue("runner", "runner-2");
    let certs = cluster.certs();
    let work: Vec<String> = ["runner-1", "runner-2"]
        .iter()
        .map(|name| cluster.dir.path().join(format!("{name}-work")).display().to_string())
        .collect();
    let files: Vec<String> = ["runner-1/key.pem", "runner-2/key.pem", "ca/key.pem", "dispatcher/key.pem"]
        .iter()
        .map(|path| certs.join(path).display().to_string())
        .chain(std::iter::once(cluster.state().join("kiln.db").display().to_string()))
        .collect();
    let targets = serde_json::json!({ "files": files, "work": work }).to_string();

    let attack = ATTACK.replace("{targets}", &targets);
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_attack.py", &attack)]);
    let main = repo.commit("tests that attack the runner");
    repo.git(&["checkout", "--quiet", "--orphan", "other"]);
    repo.git(&["rm", "--quiet", "-r", "-f", "."]);
    repo.write(OTHER);
    let other = repo.commit("another branch, with a secret");
    repo.git(&["checkout", "--quiet", "main"]);

    cluster.runner("runner-1");
    cluster.runner("runner-2");
    cluster.observer_with("observer", &repo.path, "300ms", &["--branch", "main", "--branch", "other"]);

    let report = cluster.wait_for(&main);
    let expected: Vec<(String, Outcome)> = [
        "test_another_jobs_checkout",
        "test_etc_shadow",
        "test_key_by_the_path_in_the_runners_command_line",
        "test_keys_and_database_by_absolute_path",
        "test_secrets_by_searching_the_filesystem",
        "test_the_machines_processes",
        "test_the_object_cache",
    ]
    .iter()
    .map(|name| (format!("tests.test_attack.Attack.{name}"), Outcome::Pass))
    .collect();
    let messages: Vec<String> = report.tests.iter().map(|t| format!("{}: {}", t.id, t.message)).collect();
    assert_eq!(outcomes(&report).into_iter().collect::<Vec<_>>(), expected, "{messages:#?}\n{}", cluster.logs());
    let other = cluster.wait_for(&other);
    assert_eq!(
        outcomes(&other).into_iter().collect::<Vec<_>>(),
        [("tests.test_slow.Slow.test_slow".to_owned(), Outcome::Pass)]
    );

    // No line of either runner's key is in the stored results, or in what
    // `kiln results` prints.
    // The file is written after the state is stored: read its final version.
    cluster.wait_stored(&main, "final", |r| r.status.is_final());
    let stored = std::fs::read_to_string(cluster.state().join(format!("results/{main}.json"))).unwrap();
    let out = cluster.admin(&["results", main.as_str(), "--format", "json"]);
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(printed.contains("test_attack"), "{printed}");
    for runner in ["runner-1", "runner-2"] {
        let key = std::fs::read_to_string(certs.join(runner).join("key.pem")).unwrap();
        for line in key.lines().filter(|line| !line.starts_with("-----") && line.len() > 8) {
            assert!(!stored.contains(line), "a line of {runner}'s key is in the results file");
            assert!(!printed.contains(line), "a line of {runner}'s key is in `kiln results`");
        }
    }
}
