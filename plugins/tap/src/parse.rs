//! Reads the TAP (Test Anything Protocol, versions 13 and 14) that one test
//! script printed, and how the script ended, into per-test results.
//!
//! This module never fails and has no I/O, so it is tested natively as data
//! in, data out. What it understands:
//!
//! - test lines `ok` / `not ok`, an optional number (otherwise the count so
//!   far), an optional description (after an optional `-`) with `\#` and
//!   `\\` escapes, and a `# SKIP reason` or `# TODO reason` directive (case
//!   does not matter; `SKIPPED` counts as `SKIP`);
//! - the plan `1..N`, at the start or the end, and `1..0 # SKIP reason` for a
//!   script that skips everything;
//! - a YAML diagnostics block (`---` … `...`, indented) after a test line,
//!   and `#` comment lines after a test line, which become that test's
//!   message when it did not pass (a `duration_ms` key in the YAML becomes
//!   its duration);
//! - `Bail out!`, after which nothing is read.
//!
//! Indented lines outside a YAML block (TAP 14 subtests, indented output)
//! are ignored: a subtest counts through its parent's test line. Any other
//! line is ignored too, as TAP requires.
//!
//! A script that did not keep its word becomes one `error` result whose id
//! is the file itself, next to the results it did report: no plan, tests
//! missing from the plan or outside it, a repeated test number, a second
//! plan, `Bail out!`, death by signal or timeout, or a non-zero exit status
//! with no failed test to explain it (a script whose tests fail may exit
//! non-zero, as Perl's Test::More does).

use std::collections::BTreeSet;
use std::fmt::Write;

pub use kiln_plugin_sdk::Outcome;
use kiln_plugin_sdk::tail;

/// One result, before the plugin adds the file and reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `<file>::<number>`, then a space and the description if there is one;
    /// or just `<file>` for a result about the script as a whole.
    pub id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// From a `duration_ms` key in the test's YAML block, else 0; for a
    /// result about the whole script, the script's run time.
    pub duration_ms: u64,
    /// Diagnostics for a failure, the skip or TODO reason, or what was wrong
    /// with the script.
    pub message: String,
}

/// How the script's process ended, as the host reported it.
#[derive(Clone, Debug, Default)]
pub struct Exit {
    /// The exit code, or `None` if a signal ended it.
    pub code: Option<i32>,
    /// Whether the host killed it for running out of time.
    pub timed_out: bool,
    /// Wall-clock time the plugin measured around the command.
    pub elapsed_ms: u64,
}

/// How much of stderr goes into an error message.
const STDERR_TAIL: usize = 4000;
/// How many missing test numbers an error message lists.
const MISSING_LISTED: usize = 10;

/// A test line's directive.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Directive {
    None,
    Skip(String),
    Todo(String),
}

/// A test line, as read.
#[derive(Debug)]
struct TestLine {
    ok: bool,
    number: Option<u64>,
    description: String,
    directive: Directive,
}

/// A test line and what followed it.
struct Point {
    number: u64,
    line: TestLine,
    diagnostics: Vec<String>,
    duration_ms: Option<u64>,
}

/// A plan line.
struct Plan {
    count: u64,
    skip_reason: Option<String>,
}

/// An open YAML block: its indentation and lines so far.
struct Yaml {
    indent: usize,
    lines: Vec<String>,
}

/// Reads what the script at `file` printed and how it ended into results.
pub fn interpret(file: &str, stdout: &[u8], stderr: &[u8], exit: &Exit) -> Vec<Report> {
    let text = String::from_utf8_lossy(stdout);
    let mut points: Vec<Point> = Vec::new();
    let mut plan: Option<Plan> = None;
    let mut extra_plans = 0usize;
    let mut bailed: Option<String> = None;
    let mut yaml: Option<Yaml> = None;
    // A YAML block belongs to the test line right before it.
    let mut after_test_line = false;

    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(block) = &mut yaml {
            if line.trim() == "..." {
                if let (Some(block), Some(point)) = (yaml.take(), points.last_mut()) {
                    point.duration_ms = yaml_duration(&block.lines);
                    point.diagnostics.extend(block.lines);
                }
            } else {
                let cut = line.len() - line.trim_start_matches(' ').len();
                block.lines.push(line[cut.min(block.indent)..].to_owned());
            }
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if after_test_line && line.trim() == "---" {
                let indent = line.len() - line.trim_start_matches(' ').len();
                yaml = Some(Yaml { indent, lines: Vec::new() });
            }
            after_test_line = false;
            continue;
        }
        after_test_line = false;
        if let Some(reason) = strip_prefix_ignore_case(line, "bail out!") {
            bailed = Some(reason.trim().to_owned());
            break;
        }
        if let Some(parsed) = parse_plan(line) {
            if plan.is_some() {
                extra_plans += 1;
            } else {
                plan = Some(parsed);
            }
        } else if let Some(test) = parse_test_line(line) {
            let number = test.number.unwrap_or(points.len() as u64 + 1);
            points.push(Point { number, line: test, diagnostics: Vec::new(), duration_ms: None });
            after_test_line = true;
        } else if let Some(comment) = line.strip_prefix('#')
            && let Some(point) = points.last_mut()
        {
            point.diagnostics.push(comment.strip_prefix(' ').unwrap_or(comment).to_owned());
        }
        // Anything else (`TAP version N`, `pragma`, other output) is ignored.
    }
    if let (Some(block), Some(point)) = (yaml, points.last_mut()) {
        // An unterminated block still says something.
        point.duration_ms = yaml_duration(&block.lines);
        point.diagnostics.extend(block.lines);
    }

    let mut reports: Vec<Report> = points.iter().map(|p| report(file, p)).collect();
    let failed = reports.iter().any(|r| r.outcome == Outcome::Fail);

    let mut problems = Vec::new();
    if let Some(reason) = &bailed {
        problems.push(if reason.is_empty() { "it bailed out".to_owned() } else { format!("it bailed out: {reason}") });
    }
    let mut seen = BTreeSet::new();
    let mut repeated = BTreeSet::new();
    for point in &points {
        if !seen.insert(point.number) {
            repeated.insert(point.number);
        }
    }
    match &plan {
        None if bailed.is_none() => problems.push(if points.is_empty() {
            "it printed no plan (a `1..N` line) and no test lines".to_owned()
        } else {
            format!("it printed {} test line(s) but no plan (a `1..N` line)", points.len())
        }),
        None => {}
        Some(plan) => {
            let missing: Vec<u64> = (1..=plan.count).filter(|n| !seen.contains(n)).take(MISSING_LISTED + 1).collect();
            if !missing.is_empty() {
                let mut listed: Vec<String> = missing.iter().take(MISSING_LISTED).map(u64::to_string).collect();
                if missing.len() > MISSING_LISTED {
                    listed.push("…".to_owned());
                }
                let ran = seen.iter().filter(|n| (1..=plan.count).contains(*n)).count();
                problems.push(format!(
                    "it planned {} test(s) but {ran} of them ran (missing: {})",
                    plan.count,
                    listed.join(", ")
                ));
            }
            let outside: Vec<String> =
                seen.iter().filter(|n| !(1..=plan.count).contains(*n)).map(u64::to_string).collect();
            if !outside.is_empty() {
                problems.push(format!("test(s) {} are outside its plan 1..{}", outside.join(", "), plan.count));
            }
        }
    }
    if !repeated.is_empty() {
        let numbers: Vec<String> = repeated.iter().map(u64::to_string).collect();
        problems.push(format!("test number(s) {} were reported more than once", numbers.join(", ")));
    }
    if extra_plans > 0 {
        problems.push("it printed more than one plan".to_owned());
    }
    if exit.timed_out {
        problems.push(format!("it was killed after {} because it ran out of time", seconds(exit.elapsed_ms)));
    } else {
        match exit.code {
            None => problems.push("it was killed by a signal".to_owned()),
            Some(0) => {}
            Some(code) if !failed => problems.push(format!("it exited with code {code} although no test failed")),
            Some(_) => {}
        }
    }

    if problems.is_empty() {
        if let Some(Plan { count: 0, skip_reason }) = &plan
            && points.is_empty()
        {
            let message = skip_reason.clone().unwrap_or_else(|| "it planned no tests (1..0)".to_owned());
            reports.push(Report { id: file.to_owned(), outcome: Outcome::Skip, duration_ms: exit.elapsed_ms, message });
        }
        return reports;
    }
    let mut message = String::new();
    let mut problems = problems.into_iter();
    if let Some(first) = problems.next() {
        let mut chars = first.chars();
        message.extend(chars.next().map(|c| c.to_ascii_uppercase()));
        message.push_str(chars.as_str());
    }
    for problem in problems {
        message.push_str("; ");
        message.push_str(&problem);
    }
    message.push('.');
    let stderr = String::from_utf8_lossy(stderr);
    let stderr = stderr.trim_end();
    if stderr.is_empty() {
        message.push_str("\n\nIt wrote nothing to stderr.");
    } else {
        let _ = write!(message, "\n\nThe end of its stderr:\n{}", tail(stderr, STDERR_TAIL));
    }
    reports.push(Report { id: file.to_owned(), outcome: Outcome::Error, duration_ms: exit.elapsed_ms, message });
    reports
}

/// The result of one test line.
fn report(file: &str, point: &Point) -> Report {
    let line = &point.line;
    let mut id = format!("{file}::{}", point.number);
    if !line.description.is_empty() {
        id.push(' ');
        id.push_str(&line.description);
    }
    let diagnostics = point.diagnostics.join("\n").trim_end().to_owned();
    let with_diagnostics = |head: String| match (head.is_empty(), diagnostics.is_empty()) {
        (_, true) => head,
        (true, false) => diagnostics.clone(),
        (false, false) => format!("{head}\n{diagnostics}"),
    };
    let (outcome, message) = match (&line.directive, line.ok) {
        (Directive::Skip(reason), _) => (Outcome::Skip, reason.clone()),
        (Directive::Todo(reason), true) => (
            Outcome::Xpass,
            with_diagnostics(if reason.is_empty() {
                "passed, but it is marked TODO".to_owned()
            } else {
                format!("passed, but it is marked TODO: {reason}")
            }),
        ),
        (Directive::Todo(reason), false) => (Outcome::Xfail, with_diagnostics(reason.clone())),
        (Directive::None, true) => (Outcome::Pass, String::new()),
        (Directive::None, false) => (Outcome::Fail, diagnostics.clone()),
    };
    Report { id, outcome, duration_ms: point.duration_ms.unwrap_or(0), message }
}

/// `1..N`, optionally followed by `# SKIP reason` (or any other comment).
fn parse_plan(line: &str) -> Option<Plan> {
    let rest = line.strip_prefix("1..")?;
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    let count = rest[..digits].parse().ok()?;
    let tail = rest[digits..].trim();
    let skip_reason = match tail.strip_prefix('#') {
        Some(comment) => directive(comment.trim_start()).and_then(|d| match d {
            Directive::Skip(reason) => Some(reason),
            _ => None,
        }),
        None if tail.is_empty() => None,
        // `1..5 tests` is not a plan.
        None => return None,
    };
    Some(Plan { count, skip_reason })
}

/// `ok` or `not ok`, then an optional number, description and directive.
fn parse_test_line(line: &str) -> Option<TestLine> {
    let (ok, rest) = match line.strip_prefix("not ok") {
        Some(rest) => (false, rest),
        None => (true, line.strip_prefix("ok")?),
    };
    // `okay` is not a test line.
    if !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
        return None;
    }
    let rest = rest.trim_start();
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let number = if digits > 0 { rest[..digits].parse().ok() } else { None };
    let rest = rest[digits..].trim_start();
    let rest = match rest.strip_prefix('-') {
        Some(after) if after.is_empty() || after.starts_with([' ', '\t']) => after.trim_start(),
        _ => rest,
    };
    let (description, directive) = split_directive(rest);
    Some(TestLine { ok, number, description, directive })
}

/// Splits a test line's tail at its first unescaped `#` into the
/// (unescaped) description and the directive. A `#` comment that is not a
/// directive stays part of the description.
fn split_directive(text: &str) -> (String, Directive) {
    let mut description = String::new();
    let mut chars = text.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '\\' => match chars.clone().next() {
                Some((_, escaped @ ('#' | '\\'))) => {
                    description.push(escaped);
                    chars.next();
                }
                _ => description.push('\\'),
            },
            '#' => {
                if let Some(found) = directive(text[at + 1..].trim_start()) {
                    return (description.trim_end().to_owned(), found);
                }
                description.push('#');
            }
            other => description.push(other),
        }
    }
    (description.trim_end().to_owned(), Directive::None)
}

/// `SKIP reason` or `TODO reason` (any case; `SKIP` may be longer, as in
/// `SKIPPED`; a `:` after the word is dropped), or `None`.
fn directive(text: &str) -> Option<Directive> {
    let word_len = text.len() - text.trim_start_matches(|c: char| c.is_ascii_alphabetic()).len();
    let word = text[..word_len].to_ascii_lowercase();
    let reason = text[word_len..].trim_start_matches(':').trim().to_owned();
    if word.starts_with("skip") {
        Some(Directive::Skip(reason))
    } else if word == "todo" {
        Some(Directive::Todo(reason))
    } else {
        None
    }
}

/// `duration_ms: N` at the top level of a YAML block.
fn yaml_duration(lines: &[String]) -> Option<u64> {
    lines.iter().find_map(|line| line.strip_prefix("duration_ms:").and_then(|v| v.trim().parse::<f64>().ok())).map(
        |ms| {
            // Saturating float-to-int: negative and NaN become 0.
            ms.round() as u64
        },
    )
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

fn seconds(ms: u64) -> String {
    format!("{}.{:01} s", ms / 1000, (ms % 1000) / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Exit = Exit { code: Some(0), timed_out: false, elapsed_ms: 1500 };

    fn run(stdout: &str, exit: &Exit) -> Vec<Report> {
        interpret("tests/a.t", stdout.as_bytes(), b"the stderr", exit)
    }

    fn outcomes(reports: &[Report]) -> Vec<(&str, Outcome)> {
        reports.iter().map(|r| (r.id.as_str(), r.outcome)).collect()
    }

    #[test]
    fn every_outcome() {
        let tap = "TAP version 14\n\
                   1..7\n\
                   ok 1 - adds\n\
                   not ok 2 - subtracts\n\
                   ok 3 # SKIP no network\n\
                   not ok 4 - divides # TODO rounding\n\
                   ok 5 - multiplies # todo: fixed by accident\n\
                   ok - unnumbered \\# not a directive\n\
                   not ok 7 # skipped: not on this platform\n";
        let reports = run(tap, &OK);
        assert_eq!(
            outcomes(&reports),
            [
                ("tests/a.t::1 adds", Outcome::Pass),
                ("tests/a.t::2 subtracts", Outcome::Fail),
                ("tests/a.t::3", Outcome::Skip),
                ("tests/a.t::4 divides", Outcome::Xfail),
                ("tests/a.t::5 multiplies", Outcome::Xpass),
                ("tests/a.t::6 unnumbered # not a directive", Outcome::Pass),
                ("tests/a.t::7", Outcome::Skip),
            ]
        );
        assert_eq!(reports[2].message, "no network");
        assert_eq!(reports[3].message, "rounding");
        assert_eq!(reports[4].message, "passed, but it is marked TODO: fixed by accident");
        assert_eq!(reports[6].message, "not on this platform");
    }

    #[test]
    fn yaml_and_comments_explain_a_failure() {
        let tap = "1..2\n\
                   not ok 1 - compares\n  ---\n  message: values differ\n  got: 3\n  expected: 4\n  duration_ms: 12.4\n  ...\n\
                   # a comment about test 1\n\
                   ok 2 - fine\n  ---\n  duration_ms: 7\n  ...\n";
        let reports = run(tap, &OK);
        assert_eq!(
            outcomes(&reports),
            [("tests/a.t::1 compares", Outcome::Fail), ("tests/a.t::2 fine", Outcome::Pass)]
        );
        assert_eq!(
            reports[0].message,
            "message: values differ\ngot: 3\nexpected: 4\nduration_ms: 12.4\na comment about test 1"
        );
        assert_eq!((reports[0].duration_ms, reports[1].duration_ms), (12, 7));
        assert_eq!(reports[1].message, "");
    }

    #[test]
    fn plan_at_the_end_subtests_and_noise() {
        let tap = "some output\n\
                   # Subtest: inner\n    ok 1 - inner one\n    not ok 2 - inner two\n    1..2\n\
                   not ok 1 - inner\n\
                   okay, this is not a test line\n\
                   1..1\n";
        let reports = run(tap, &Exit { code: Some(1), ..OK });
        // A failing test explains the non-zero exit: no error result.
        assert_eq!(outcomes(&reports), [("tests/a.t::1 inner", Outcome::Fail)]);
    }

    #[test]
    fn missing_tests_are_an_error() {
        let reports = run("1..4\nok 1\nok 2\n", &OK);
        let error = reports.last().unwrap();
        assert_eq!((error.id.as_str(), error.outcome), ("tests/a.t", Outcome::Error));
        assert!(
            error.message.starts_with("It planned 4 test(s) but 2 of them ran (missing: 3, 4)."),
            "{}",
            error.message
        );
        assert!(error.message.contains("The end of its stderr:\nthe stderr"), "{}", error.message);
        assert_eq!(error.duration_ms, 1500);
    }

    #[test]
    fn no_plan_is_an_error_whatever_the_exit() {
        for exit in [OK, Exit { code: Some(2), ..OK }] {
            let reports = run("ok 1\n", &exit);
            assert_eq!(outcomes(&reports), [("tests/a.t::1", Outcome::Pass), ("tests/a.t", Outcome::Error)]);
            assert!(reports[1].message.contains("no plan"), "{}", reports[1].message);
        }
        let reports = run("", &Exit { code: Some(127), ..OK });
        assert_eq!(outcomes(&reports), [("tests/a.t", Outcome::Error)]);
        let message = &reports[0].message;
        assert!(message.contains("no plan") && message.contains("exited with code 127"), "{message}");
    }

    #[test]
    fn bail_out_stops_reading() {
        let reports = run("1..3\nok 1\nBail out! database is down\nok 2\nok 3\n", &OK);
        assert_eq!(outcomes(&reports), [("tests/a.t::1", Outcome::Pass), ("tests/a.t", Outcome::Error)]);
        assert!(
            reports[1].message.starts_with("It bailed out: database is down; it planned 3"),
            "{}",
            reports[1].message
        );
    }

    #[test]
    fn skip_all() {
        let reports = run("1..0 # SKIP needs a GPU\n", &OK);
        assert_eq!(outcomes(&reports), [("tests/a.t", Outcome::Skip)]);
        assert_eq!(reports[0].message, "needs a GPU");
    }

    #[test]
    fn broken_scripts() {
        let reports = run("1..2\nok 1\nok 1\nok 3\n1..3\n", &OK);
        let message = &reports.last().unwrap().message;
        assert!(message.contains("missing: 2"), "{message}");
        assert!(message.contains("test(s) 3 are outside its plan 1..2"), "{message}");
        assert!(message.contains("test number(s) 1 were reported more than once"), "{message}");
        assert!(message.contains("more than one plan"), "{message}");

        let reports = run("1..1\nok 1\n", &Exit { code: Some(3), ..OK });
        assert_eq!(outcomes(&reports), [("tests/a.t::1", Outcome::Pass), ("tests/a.t", Outcome::Error)]);
        assert!(reports[1].message.contains("exited with code 3 although no test failed"));

        let reports = run("1..2\nok 1\n", &Exit { code: None, timed_out: true, elapsed_ms: 61_000 });
        assert!(
            reports[1].message.contains("killed after 61.0 s because it ran out of time"),
            "{}",
            reports[1].message
        );
        let reports = run("1..1\nok 1\n", &Exit { code: None, ..OK });
        assert!(reports[1].message.contains("killed by a signal"));
    }

    #[test]
    fn line_endings_and_odd_plans() {
        let reports = run("1..1\r\nok 1 - windows\r\n", &OK);
        assert_eq!(outcomes(&reports), [("tests/a.t::1 windows", Outcome::Pass)]);
        // Not plans: a word after the count, or no count.
        let reports = run("1..2 tests\n1..\nok 1\nok 2\n", &OK);
        assert!(reports.last().unwrap().message.contains("no plan"));
    }
}
