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
