//! What tests print is hostile input: colour codes, markup, CDATA ends,
//! bytes that are not UTF-8 and lone surrogates reach people through
//! `kiln results` (text, JSON, JUnit) as plain, well-formed text.

use std::io::Write;
use std::process::{Command, Stdio};

use kiln_proto::Outcome;

use crate::harness::{Cluster, Repo, outcomes};

const LOUD: &str = r#"import sys, unittest

class Loud(unittest.TestCase):
    def test_fails_in_colour(self):
        sys.stdout.buffer.write(b"\xff\xfe not utf-8 \x1b[2J\n")
        sys.stdout.flush()
        self.fail("\x1b[31mred\x1b[0m <script>alert(1)</script> ]]> \x1b]0;title\x07 \udcff end")

    def test_passes(self):
        print("\x1b[1mbold\x1b[0m")
"#;

/// Parses XML with Python's own parser; returns its error if it is not well-formed.
fn parse_xml(xml: &[u8]) -> Result<(), String> {
    let mut child = Command::new("python3")
        .args(["-c", "import sys, xml.etree.ElementTree as E; E.parse(sys.stdin.buffer)"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(xml).unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
}

#[test]
fn hostile_test_output_is_shown_as_plain_text_in_every_format() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_loud.py", LOUD)]);
    let commit = repo.commit("tests that print escape sequences and markup");
    cluster.runner("runner-1");
    cluster.observer("observer", &repo.path, "200ms");

    let report = cluster.wait_for(&commit);
    assert_eq!(
        outcomes(&report).into_iter().collect::<Vec<_>>(),
        [
            ("tests.test_loud.Loud.test_fails_in_colour".to_owned(), Outcome::Fail),
            ("tests.test_loud.Loud.test_passes".to_owned(), Outcome::Pass),
        ],
        "{report:#?}\n{}",
        cluster.logs()
    );
    let failure = &report.tests.iter().find(|t| t.outcome == Outcome::Fail).unwrap().message;
    // The stored message keeps what the test said (the JSON is the record).
    assert!(failure.contains("\u{1b}[31mred\u{1b}[0m <script>alert(1)</script> ]]>"), "{failure}");

    // Text for people: the words, no escape sequence, no control character.
    let out = cluster.admin(&["results", commit.as_str(), "--verbose"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).expect("`kiln results` prints UTF-8");
    assert!(text.contains("AssertionError: red <script>alert(1)</script> ]]> "), "{text}");
    assert!(!text.chars().any(|c| c.is_control() && c != '\n' && c != '\t'), "{text:?}");

    // JSON: a valid document, equal to the stored report.
    let out = cluster.admin(&["results", commit.as_str(), "--format", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json, serde_json::to_value(&report).unwrap());

    // JUnit: well-formed XML, the same bytes as the dispatcher's results file.
    let out = cluster.admin(&["results", commit.as_str(), "--format", "junit"]);
    assert_eq!(out.status.code(), Some(1));
    parse_xml(&out.stdout).unwrap_or_else(|e| panic!("not XML ({e}):\n{}", String::from_utf8_lossy(&out.stdout)));
    let xml = String::from_utf8(out.stdout).unwrap();
    assert!(xml.contains("]]&gt;") && !xml.contains("<script>"), "{xml}");
    let stored = cluster.wait_stored(&commit, "final", |r| r.status.is_final());
    assert_eq!(stored, report);
    let file = std::fs::read_to_string(cluster.state().join(format!("results/{commit}.xml"))).unwrap();
    assert_eq!(file, xml);
}

#[test]
fn watch_draws_progress_on_a_terminal_only_and_ends_with_the_results() {
    let mut cluster = Cluster::start();
    let suite = crate::harness::slow_suite(6, 2, 400);
    let repo = Repo::new(cluster.dir.path(), &crate::harness::borrow(&suite));
    let commit = repo.commit("a suite that takes a few seconds");
    cluster.runner_with("runner-1", &["--slots", "1"]);
    let observer = cluster.observer_with("observer", &repo.path, "200ms", &[]);
    cluster.wait_log(observer, &format!("commit={commit}"));

    // On a terminal (a pty from script(1)): the live line, redrawn, then the results.
    let identity = cluster.certs().join("admin");
    let watch = format!(
        "{} watch {commit} --identity {} --dispatcher {}",
        env!("CARGO_BIN_EXE_kiln"),
        identity.display(),
        cluster.addr
    );
    let out = Command::new("script").args(["-qefc", &watch, "/dev/null"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("\r\x1b[2Krunning "), "no progress line: {shown:?}");
    assert!(shown.contains(" files · "), "{shown:?}");
    let (_, end) = shown.rsplit_once("\r\x1b[2K").unwrap();
    assert!(end.starts_with(&format!("commit {commit} on main: PASSED")), "{end:?}");
    assert!(end.contains("12 tests: 12 passed"), "{end:?}");

    // Not a terminal: no progress, only what `kiln results` prints.
    let out = cluster.admin(&["watch", &commit.as_str()[..10]]);
    assert_eq!(out.status.code(), Some(0));
    let results = cluster.admin(&["results", commit.as_str()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&results.stdout));
    assert!(!out.stdout.contains(&b'\r') && !out.stdout.contains(&0x1b));
}
