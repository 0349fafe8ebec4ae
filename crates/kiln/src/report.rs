//! How a commit's report reads on a terminal, and the exit code it gives:
//! shared by `kiln results`, `kiln demo` and `kiln plugin run`. Everything a
//! test printed, and every other outside value, goes through
//! [`for_terminal`]: colours are dropped and no control character reaches
//! the terminal.

use std::fmt::Write as _;
use std::process::ExitCode;

use kiln_proto::{CommitReport, CommitStatus, Outcome, TestResult, for_terminal};

/// How a finished commit ended, in words: `passed`, or `cancelled (cancelled by admin)`.
pub fn ended(report: &CommitReport) -> String {
    match &report.error {
        Some(error) => format!("{} ({})", report.status.as_str(), for_terminal(error)),
        None => report.status.as_str().to_owned(),
    }
}

/// The exit code `kiln results` gives for a status.
pub fn exit_code(status: CommitStatus) -> ExitCode {
    match status {
        CommitStatus::Passed => ExitCode::SUCCESS,
        CommitStatus::Failed => ExitCode::from(1),
        CommitStatus::Queued
        | CommitStatus::Running
        | CommitStatus::Error
        | CommitStatus::Cancelled
        | CommitStatus::Skipped => ExitCode::from(2),
    }
}

/// Renders a report for a terminal: each message's head and tail, or with
/// `verbose` each message whole.
pub fn render(r: &CommitReport, verbose: bool) -> String {
    let mut out = String::new();
    let c = &r.counts;
    let branch = for_terminal(&r.branch);
    let _ = writeln!(out, "commit {} on {branch}: {}", r.commit, r.status.as_str().to_uppercase());
    if let Some(runner) = &r.runner {
        let verb = if r.status.is_final() { "ran" } else { "running" };
        let _ = writeln!(out, "  {verb} on {}", for_terminal(runner));
    }
    if let Some(error) = &r.error {
        let _ = writeln!(out, "  error: {}", for_terminal(error));
    }
    for warning in &r.warnings {
        let _ = writeln!(out, "  warning: {}", for_terminal(warning));
    }
    let _ = writeln!(out, "  {}", summary(c));
    for t in &r.tests {
        out.push_str(&render_test(t, verbose, "  "));
    }
    out
}

/// One test's line (outcome, id, duration) and the lines of its message
/// that [`message_lines`] shows, indented by `indent`.
pub fn render_test(t: &TestResult, verbose: bool, indent: &str) -> String {
    let mut out = String::new();
    let outcome = t.outcome.as_str().to_uppercase();
    // With an interpreter matrix, the version the test ran with: the same id once per version.
    let python = t.python.as_deref().map(|v| format!(" [python {}]", for_terminal(v))).unwrap_or_default();
    let _ = writeln!(out, "{indent}{outcome:<5} {}{python} ({} ms)", for_terminal(&t.id), t.duration_ms);
    if !t.earlier.is_empty() {
        let on = |outcome: Outcome, runner: &Option<String>| match runner {
            Some(r) => format!("{} on {}", verb(outcome), for_terminal(r)),
            None => verb(outcome).to_owned(),
        };
        let also: Vec<String> = t.earlier.iter().map(|r| on(r.outcome, &r.runner)).collect();
        let what = if t.flaky { "flaky" } else { "ran again" };
        let _ = writeln!(out, "{indent}      {what}: {}; also {}", on(t.outcome, &t.runner), also.join(", "));
    }
    for line in message_lines(t.outcome, &t.message, verbose) {
        let _ = writeln!(out, "{indent}      {line}");
    }
    out
}

/// The live line `kiln watch` draws: a bar of the files done, then the
/// tests so far, the failures among them and the time since queued.
pub fn progress(r: &CommitReport, elapsed: std::time::Duration) -> String {
    const WIDTH: u64 = 24;
    let f = &r.files;
    let filled = (f.done * WIDTH).checked_div(f.total).unwrap_or(0).min(WIDTH) as usize;
    let bar = format!("{}{}", "█".repeat(filled), "░".repeat(WIDTH as usize - filled));
    let c = &r.counts;
    let failed = c.fail + c.error + c.xpass;
    format!(
        "{} {bar} {}/{} files · {} · {failed} failed · {:.1} s",
        r.status.as_str(),
        f.done,
        f.total,
        plural(c.total, "test", "tests"),
        elapsed.as_secs_f64()
    )
}

/// A test's history for a terminal: one line per commit, newest first,
/// with changes from pass to fail (or back) and flaky runs marked.
pub fn render_history(test: &str, runs: &[kiln_proto::TestRun]) -> String {
    let mut out = String::new();
    if runs.is_empty() {
        let _ = writeln!(out, "no commit has run {}", for_terminal(test));
        return out;
    }
    let _ =
        writeln!(out, "{}: the newest {}, newest first", for_terminal(test), plural(runs.len() as u64, "run", "runs"));
    for r in runs {
        let mut notes = Vec::new();
        if r.transition {
            notes.push(if r.outcome.is_failure() { "started failing" } else { "fixed" }.to_owned());
        }
        if r.flaky {
            notes.push(format!("flaky ({} runs)", r.runs));
        }
        if let Some(v) = &r.python {
            notes.push(format!("python {}", for_terminal(v)));
        }
        if r.flipped
            && let Some(tree) = &r.tree
        {
            notes.push(format!("flipped on the same code (tree {})", &tree.as_str()[..12]));
        }
        let notes = if notes.is_empty() { String::new() } else { format!("  {}", notes.join(", ")) };
        let commit = &r.commit.as_str()[..12];
        let outcome = r.outcome.as_str().to_uppercase();
        let _ = writeln!(out, "  {commit}  {:<5} {:>7} ms  {}{notes}", outcome, r.duration_ms, for_terminal(&r.branch));
    }
    out
}

/// The flaky tests for a terminal, most often flaky first, each with the
/// last line of a failing run.
pub fn render_flaky(tests: &[kiln_proto::FlakyTest], days: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} flaky in the last {}",
        plural(tests.len() as u64, "test", "tests"),
        plural(days.into(), "day", "days")
    );
    for t in tests {
        let mut why = Vec::new();
        if let Some(last) = t.commits.first() {
            why.push(format!("flaky on {} of {} commits, last {}", t.commits.len(), t.seen, &last.as_str()[..12]));
        }
        if let Some(f) = t.flips.first() {
            let more = match t.flips.len() {
                1 => String::new(),
                n => format!(" (and on {} more trees)", n - 1),
            };
            why.push(format!(
                "flipped on the same code: passed on {} and failed on {}, both tree {}{more}",
                &f.passed.as_str()[..12],
                &f.failed.as_str()[..12],
                &f.tree.as_str()[..12]
            ));
        }
        let python = t.python.as_deref().map(|v| format!(" [python {}]", for_terminal(v))).unwrap_or_default();
        let _ = writeln!(out, "  {}{python} ({}): {}", for_terminal(&t.id), for_terminal(&t.file), why.join("; "));
        if let Some(line) = t.sample.trim_end().lines().last() {
            let _ = writeln!(out, "        {}", for_terminal(line));
        }
    }
    out
}

/// A Unix ms time as `2026-12-01 10:41:07 UTC`.
fn utc(ms: u64) -> String {
    kiln_net::validity::Utc(i64::try_from(ms / 1000).unwrap_or(i64::MAX)).to_string()
}

/// `kiln status` for a terminal: what waits and why, the runners with
/// their slots, and the newest commits with their counts.
pub fn render_status(s: &kiln_proto::Status) -> String {
    let mut out = String::new();
    let waiting = plural(s.queue_total, "commit waits", "commits wait");
    let _ = writeln!(out, "queue: {waiting}");
    for q in &s.queue {
        let _ = writeln!(
            out,
            "  {}  {} ({}): {} waiting, {} running, {} done; {}",
            &q.commit.as_str()[..12],
            for_terminal(&q.branch),
            for_terminal(&q.repo),
            plural(q.pending_files, "file", "files"),
            q.running_files,
            q.done_files,
            for_terminal(&q.why)
        );
    }
    more(&mut out, s.queue_total, s.queue.len(), "commits");
    let _ = writeln!(out, "runners: {} connected, {} of {} slots busy", s.runners_total, s.slots_busy, s.slots_total);
    for r in &s.runners {
        let _ = writeln!(
            out,
            "  {}  {} of {} slots busy, {} free",
            for_terminal(&r.name),
            r.busy,
            r.slots,
            r.slots.saturating_sub(r.busy)
        );
    }
    more(&mut out, s.runners_total, s.runners.len(), "runners");
    let _ = writeln!(out, "latest commits: {}", s.commits.len());
    for c in &s.commits {
        let _ = writeln!(
            out,
            "  {}  {:<9} {} ({}): {}",
            &c.commit.as_str()[..12],
            c.status.as_str(),
            for_terminal(&c.branch),
            for_terminal(&c.repo),
            summary(&c.counts)
        );
        if let Some(error) = &c.error {
            let _ = writeln!(out, "      {}", for_terminal(error));
        }
    }
    out
}

/// `kiln runners` for a terminal: each runner with its address, slots,
/// batches, when it connected and was last heard, and its sandbox's gaps.
pub fn render_runners(s: &kiln_proto::Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} connected, {} of {} slots busy",
        plural(s.runners_total, "runner", "runners"),
        s.slots_busy,
        s.slots_total
    );
    for r in &s.runners {
        let _ = writeln!(out, "{}", for_terminal(&r.name));
        let _ = writeln!(out, "  address: {}", for_terminal(&r.address));
        let _ = writeln!(out, "  slots: {} of {} busy", r.busy, r.slots);
        if r.running.is_empty() {
            let _ = writeln!(out, "  running: nothing");
        }
        for b in &r.running {
            let _ = writeln!(
                out,
                "  running: {} ({} on {}, job {})",
                &b.commit.as_str()[..12],
                plural(b.file_count, "file", "files"),
                plural(b.slots.into(), "slot", "slots"),
                b.job
            );
        }
        let _ = writeln!(out, "  connected since: {}", utc(r.connected_since_ms));
        let _ = writeln!(out, "  last heard: {}", utc(r.last_heard_ms));
        if r.sandbox_warnings.is_empty() {
            let _ = writeln!(out, "  sandbox: complete");
        }
        for w in &r.sandbox_warnings {
            let _ = writeln!(out, "  sandbox warning: {}", for_terminal(w));
        }
    }
    more(&mut out, s.runners_total, s.runners.len(), "runners");
    out
}

/// Says how many of `total` were left out of a list that shows `shown`.
fn more(out: &mut String, total: u64, shown: usize, what: &str) {
    let left = total.saturating_sub(shown as u64);
    if left > 0 {
        let _ = writeln!(out, "  … and {left} more {what}, left out to keep the answer within one message");
    }
}

/// How a run of a test ended, as a verb.
fn verb(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Pass => "passed",
        Outcome::Fail => "failed",
        Outcome::Error => "errored",
        Outcome::Skip => "skipped",
        Outcome::Xfail => "failed as expected",
        Outcome::Xpass => "passed unexpectedly",
    }
}

/// How many tests ended each way, in words.
pub fn summary(c: &kiln_proto::Counts) -> String {
    let flaky = if c.flaky > 0 { format!(" ({} flaky)", c.flaky) } else { String::new() };
    format!(
        "{}: {} passed{flaky}, {} failed, {}, {} skipped, {}, {}",
        plural(c.total, "test", "tests"),
        c.pass,
        c.fail,
        plural(c.error, "error", "errors"),
        c.skip,
        plural(c.xfail, "expected failure", "expected failures"),
        plural(c.xpass, "unexpected success", "unexpected successes"),
    )
}

/// `1 error`, `2 errors`.
fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// How many lines of a long message's start [`message_lines`] shows: where
/// `Traceback (most recent call last):` and an import error's first line are.
const HEAD_LINES: usize = 4;
/// How many lines of its end: where a traceback says what went wrong.
const TAIL_LINES: usize = 8;

/// The lines of a test's message to print: a skip's reason (its first line),
/// or for any other outcome but a pass the head and the tail of the message
/// with a marker between; all of it when `verbose`.
pub fn message_lines(outcome: Outcome, message: &str, verbose: bool) -> Vec<String> {
    let lines: Vec<&str> = message.trim_end().lines().collect();
    let shown = |lines: &[&str]| lines.iter().map(|l| for_terminal(l)).collect();
    if verbose {
        return shown(&lines);
    }
    match outcome {
        Outcome::Pass => Vec::new(),
        Outcome::Skip => shown(&lines[..lines.len().min(1)]),
        Outcome::Fail | Outcome::Error | Outcome::Xfail | Outcome::Xpass => {
            // Leaving out a line or two would save nothing.
            if lines.len() <= HEAD_LINES + TAIL_LINES + 2 {
                return shown(&lines);
            }
            let hidden = lines.len() - HEAD_LINES - TAIL_LINES;
            let mut out: Vec<String> = shown(&lines[..HEAD_LINES]);
            out.push(format!("… ({hidden} more lines; --verbose shows them)"));
            out.extend(shown(&lines[lines.len() - TAIL_LINES..]));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_message_keeps_its_head_and_its_tail() {
        let mut traceback = vec![
            "ERROR: tests.test_plugins (unittest.loader._FailedTest.tests.test_plugins)".to_owned(),
            "ImportError: Failed to import test module: tests.test_plugins".to_owned(),
            "Traceback (most recent call last):".to_owned(),
        ];
        traceback.extend((0..20).map(|n| format!("  File \"frame{n}.py\", line {n}, in f{n}")));
        traceback.push("ModuleNotFoundError: No module named 'yaml_that_is_not_installed'".to_owned());
        let message = traceback.join("\n");
        let lines = message_lines(Outcome::Error, &message, false);
        assert_eq!(lines.len(), HEAD_LINES + 1 + TAIL_LINES);
        assert_eq!(lines[..3], traceback[..3]);
        assert_eq!(lines[HEAD_LINES], "… (12 more lines; --verbose shows them)");
        assert_eq!(lines.last(), traceback.last());
        assert_eq!(message_lines(Outcome::Error, &message, true), traceback);
        // Short messages whole, for every outcome that is not a pass or a skip.
        for outcome in [Outcome::Fail, Outcome::Error, Outcome::Xfail, Outcome::Xpass] {
            assert_eq!(message_lines(outcome, "one\ntwo\n", false), ["one", "two"], "{outcome:?}");
        }
        assert_eq!(message_lines(Outcome::Skip, "needs a network\nmore", false), ["needs a network"]);
        assert!(message_lines(Outcome::Pass, "printed", false).is_empty());
    }

    #[test]
    fn what_tests_print_reaches_the_terminal_without_escape_sequences() {
        let test = TestResult::new(
            "tests.test_x.T.test_\x1b]0;title\x07x".into(),
            "tests/test_x.py".into(),
            Outcome::Fail,
            3,
            "\x1b[31mAssertionError\x1b[0m: <script>alert(1)</script>\r\x1b[2Jgone\n\tat line 2".into(),
        );
        assert_eq!(
            render_test(&test, false, "  "),
            "  FAIL  tests.test_x.T.test_x (3 ms)\n        AssertionError: <script>alert(1)</script>\\rgone\n        \tat line 2\n"
        );
        assert!(!render_test(&test, true, "").contains('\x1b'));
    }

    fn status() -> kiln_proto::Status {
        use kiln_proto::status::{QueuedCommit, RunnerStatus, RunningBatch};
        let commit: kiln_proto::CommitId = "0123456789abcdef0123456789abcdef01234567".parse().unwrap();
        kiln_proto::Status {
            at_ms: 0,
            runners: vec![RunnerStatus {
                name: "r\x1b]0;pwned\x07-1".into(),
                address: "127.0.0.1:4433".into(),
                slots: 3,
                busy: 2,
                running: vec![RunningBatch {
                    job: 7,
                    commit,
                    files: vec!["tests/a.py".into()],
                    file_count: 2,
                    slots: 2,
                }],
                connected_since_ms: 1_764_585_667_000,
                last_heard_ms: 1_764_585_668_000,
                sandbox_warnings: vec!["seccomp: \x1b[31mmissing\x1b[0m".into()],
            }],
            runners_total: 2,
            slots_total: 4,
            slots_busy: 2,
            queue: vec![QueuedCommit {
                commit,
                repo: "/srv/git/p".into(),
                branch: "main\r".into(),
                queued_at_ms: 0,
                pending_files: 1,
                running_files: 2,
                done_files: 0,
                reason: "no_free_slot".into(),
                why: "no runner has a free slot (2 of 2 slots busy)".into(),
            }],
            queue_total: 1,
            commits: vec![],
        }
    }

    #[test]
    fn status_and_runners_read_plainly_and_carry_no_escape_sequences() {
        let s = status();
        assert_eq!(
            render_status(&s),
            "queue: 1 commit waits\n  \
             0123456789ab  main\\r (/srv/git/p): 1 file waiting, 2 running, 0 done; no runner has a free slot (2 of 2 slots busy)\n\
             runners: 2 connected, 2 of 4 slots busy\n  \
             r-1  2 of 3 slots busy, 1 free\n  \
             … and 1 more runners, left out to keep the answer within one message\n\
             latest commits: 0\n"
        );
        assert_eq!(
            render_runners(&s),
            "2 runners connected, 2 of 4 slots busy\n\
             r-1\n  \
             address: 127.0.0.1:4433\n  \
             slots: 2 of 3 busy\n  \
             running: 0123456789ab (2 files on 2 slots, job 7)\n  \
             connected since: 2025-12-01 10:41:07 UTC\n  \
             last heard: 2025-12-01 10:41:08 UTC\n  \
             sandbox warning: seccomp: missing\n  \
             … and 1 more runners, left out to keep the answer within one message\n"
        );
    }

    #[test]
    fn counts_are_pluralised() {
        let mut report: CommitReport = serde_json::from_value(serde_json::json!({
            "commit": "a".repeat(40), "repo": "r", "branch": "main", "status": "failed",
            "counts": {"total": 1, "pass": 0, "fail": 0, "error": 1, "skip": 0, "xfail": 1, "xpass": 1},
            "error": null, "runner": null, "warnings": [], "queued_at_ms": 0, "finished_at_ms": null, "tests": []
        }))
        .unwrap();
        let text = render(&report, false);
        assert!(
            text.contains("1 test: 0 passed, 0 failed, 1 error, 0 skipped, 1 expected failure, 1 unexpected success"),
            "{text}"
        );
        report.counts.error = 2;
        report.counts.xfail = 2;
        report.counts.xpass = 2;
        report.counts.total = 2;
        let text = render(&report, false);
        assert!(
            text.contains(
                "2 tests: 0 passed, 0 failed, 2 errors, 0 skipped, 2 expected failures, 2 unexpected successes"
            ),
            "{text}"
        );
    }
}
