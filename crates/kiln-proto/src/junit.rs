//! Test results as JUnit XML, the format CI tools and IDEs read: the
//! dispatcher's `results/<commit>.xml`, `kiln results --format junit` and
//! `kiln plugin run --format junit`. Test output is outside input: every
//! value is escaped, and characters XML 1.0 cannot carry are replaced.

use crate::{Counts, Outcome, TestResult};

/// Results as JUnit XML, under one `<testsuites>` named `suite`: one `<testsuite>` per test file, or
/// with an interpreter matrix per file and Python version (named `FILE [python 3.12]`, with a
/// `python` property), so that the same test under two versions is two test cases. Failures
/// and unexpected successes are `<failure>`, errors `<error>`, skips and
/// expected failures `<skipped>` (as pytest's JUnit output does).
pub fn junit(suite: &str, tests: &[TestResult]) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;

    let mut files: BTreeMap<(&str, Option<&str>), Vec<&TestResult>> = BTreeMap::new();
    for t in tests {
        files.entry((t.file.as_str(), t.python.as_deref())).or_default().push(t);
    }
    let c = Counts::of(tests);
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<testsuites name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\">",
        xml(suite),
        c.total,
        c.fail + c.xpass,
        c.error,
        c.skip + c.xfail
    );
    for ((file, python), tests) in files {
        let suite_name = match python {
            Some(version) => format!("{file} [python {version}]"),
            None => file.to_owned(),
        };
        let count = |f: fn(Outcome) -> bool| tests.iter().filter(|t| f(t.outcome)).count();
        let seconds: u64 = tests.iter().map(|t| t.duration_ms).sum();
        let _ = writeln!(
            out,
            "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\" skipped=\"{}\" time=\"{}.{:03}\">",
            xml(&suite_name),
            tests.len(),
            count(|o| matches!(o, Outcome::Fail | Outcome::Xpass)),
            count(|o| o == Outcome::Error),
            count(|o| matches!(o, Outcome::Skip | Outcome::Xfail)),
            seconds / 1000,
            seconds % 1000
        );
        if let Some(version) = python {
            let _ =
                writeln!(out, "    <properties><property name=\"python\" value=\"{}\"/></properties>", xml(version));
        }
        for t in tests {
            // unittest ids are `module.Class.method`; others (TAP) use `file::n description`.
            let (class, name) = match t.id.split_once("::") {
                Some(_) => (t.file.as_str(), t.id.as_str()),
                None => t.id.rsplit_once('.').unwrap_or((t.file.as_str(), t.id.as_str())),
            };
            let head = format!(
                "    <testcase classname=\"{}\" name=\"{}\" file=\"{}\" time=\"{}.{:03}\"",
                xml(class),
                xml(name),
                xml(&t.file),
                t.duration_ms / 1000,
                t.duration_ms % 1000
            );
            // The last line of a traceback names the exception.
            let summary = t.message.lines().last().unwrap_or_default();
            let body = match t.outcome {
                Outcome::Pass => None,
                Outcome::Fail => Some(("failure", summary.to_owned(), t.message.as_str())),
                Outcome::Xpass => Some(("failure", "unexpected success".to_owned(), t.message.as_str())),
                Outcome::Error => Some(("error", summary.to_owned(), t.message.as_str())),
                Outcome::Skip => Some(("skipped", t.message.clone(), "")),
                Outcome::Xfail => Some(("skipped", "expected failure".to_owned(), t.message.as_str())),
            };
            // Earlier failing runs (`--retry-failed`), as Maven Surefire writes
            // reruns: `flaky…` when the test passed in the end, `rerun…` when not.
            let mut reruns = String::new();
            for run in t.earlier.iter().filter(|r| r.outcome.is_failure()) {
                let kind = if t.outcome.is_failure() { "rerun" } else { "flaky" };
                let tag = if run.outcome == Outcome::Error { "Error" } else { "Failure" };
                let summary = run.message.lines().last().unwrap_or_default();
                let _ = write!(
                    reruns,
                    "\n      <{kind}{tag} message=\"{}\">{}</{kind}{tag}>",
                    xml(summary),
                    xml(&run.message)
                );
            }
            match body {
                None if reruns.is_empty() => {
                    let _ = writeln!(out, "{head}/>");
                }
                None => {
                    let _ = writeln!(out, "{head}>{reruns}\n    </testcase>");
                }
                Some((tag, message, text)) => {
                    let _ = writeln!(
                        out,
                        "{head}>\n      <{tag} message=\"{}\">{}</{tag}>{reruns}\n    </testcase>",
                        xml(&message),
                        xml(text)
                    );
                }
            }
        }
        let _ = writeln!(out, "  </testsuite>");
    }
    out.push_str("</testsuites>\n");
    out
}

/// Escapes text for XML content and attributes, dropping characters XML 1.0
/// cannot carry at all (test output may hold any byte).
fn xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(ch),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_maps_every_outcome_and_escapes_what_tests_print() {
        let t = |id: &str, file: &str, outcome, message: &str| {
            TestResult::new(id.into(), file.into(), outcome, 1234, message.into())
        };
        let tests = vec![
            t("tests.test_a.A.test_pass", "tests/test_a.py", Outcome::Pass, ""),
            t(
                "tests.test_a.A.test_fail",
                "tests/test_a.py",
                Outcome::Fail,
                "Traceback\nAssertionError: 1 < 2 & \"x\"\u{1b}",
            ),
            t("tests.test_a.A.test_err", "tests/test_a.py", Outcome::Error, "KeyError: 'b'"),
            t("tests.test_a.A.test_skip", "tests/test_a.py", Outcome::Skip, "needs a network"),
            t("tests.test_a.A.test_xfail", "tests/test_a.py", Outcome::Xfail, ""),
            t("tests.test_a.A.test_xpass", "tests/test_a.py", Outcome::Xpass, ""),
            t("tests/x.t::1 adds", "tests/x.t", Outcome::Pass, ""),
            t("tests.test_b.B.test_cdata", "tests/test_b.py", Outcome::Fail, "]]><script>alert(1)</script>\u{0}"),
        ];
        let xml = junit("kiln 0123456789abcdef0123456789abcdef01234567", &tests);
        assert!(xml.contains(r#"<testsuites name="kiln 0123456789abcdef0123456789abcdef01234567" tests="8" failures="3" errors="1" skipped="2">"#), "{xml}");
        assert!(
            xml.contains(
                r#"<testsuite name="tests/test_a.py" tests="6" failures="2" errors="1" skipped="2" time="7.404">"#
            ),
            "{xml}"
        );
        assert!(
            xml.contains(
                r#"<testcase classname="tests.test_a.A" name="test_pass" file="tests/test_a.py" time="1.234"/>"#
            ),
            "{xml}"
        );
        assert!(xml.contains(r#"<failure message="AssertionError: 1 &lt; 2 &amp; &quot;x&quot;"#), "{xml}");
        assert!(xml.contains("\u{FFFD}") && !xml.contains('\u{1b}'), "control characters are replaced");
        assert!(xml.contains(r#"<error message="KeyError: &apos;b&apos;">"#), "{xml}");
        assert!(xml.contains(r#"<skipped message="needs a network">"#), "{xml}");
        assert!(xml.contains(r#"<skipped message="expected failure">"#), "{xml}");
        assert!(xml.contains(r#"<failure message="unexpected success">"#), "{xml}");
        assert!(xml.contains(r#"<testcase classname="tests/x.t" name="tests/x.t::1 adds" file="tests/x.t""#), "{xml}");
        assert!(xml.contains("]]&gt;&lt;script&gt;alert(1)&lt;/script&gt;\u{FFFD}</failure>"), "{xml}");
        assert!(!xml.contains("]]>") && !xml.contains("<script"), "{xml}");
        assert_eq!(xml.matches("<testcase ").count(), 8);
        assert_eq!(xml.matches("</testsuite>").count(), 3);
    }
}

#[cfg(test)]
mod matrix_tests {
    use super::*;

    #[test]
    fn each_python_version_is_its_own_suite() {
        let run = |python: &str, outcome| TestResult {
            python: Some(python.into()),
            ..TestResult::new("tests.test_a.T.test_x".into(), "tests/test_a.py".into(), outcome, 5, String::new())
        };
        let xml = junit("kiln c", &[run("3.11", Outcome::Pass), run("3.12", Outcome::Fail)]);
        assert!(xml.contains("<testsuites name=\"kiln c\" tests=\"2\" failures=\"1\""), "{xml}");
        assert!(xml.contains("<testsuite name=\"tests/test_a.py [python 3.11]\" tests=\"1\" failures=\"0\""), "{xml}");
        assert!(xml.contains("<testsuite name=\"tests/test_a.py [python 3.12]\" tests=\"1\" failures=\"1\""), "{xml}");
        assert_eq!(xml.matches("<property name=\"python\" value=\"3.1").count(), 2, "{xml}");
        // Without a matrix nothing changes: one suite named by the file, no properties.
        let plain = TestResult::new("t".into(), "tests/test_a.py".into(), Outcome::Pass, 1, String::new());
        let xml = junit("kiln c", &[plain]);
        assert!(xml.contains("<testsuite name=\"tests/test_a.py\" ") && !xml.contains("<properties>"), "{xml}");
    }
}
