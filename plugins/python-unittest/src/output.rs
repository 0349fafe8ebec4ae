//! Turns what one driver process printed, and how it ended, into results.
//!
//! The driver (driver.py) prints one JSON line per event on its stdout. This
//! module never fails: a line that is not JSON, a process killed by a signal
//! or the host's timeout, or one that died before the driver finished all
//! become an `error` result carrying the reason and the tail of stderr, so a
//! broken module shows up in the report instead of vanishing. It also says
//! which test was running when the process died and which had started, so
//! the plugin can run the remaining ones in a fresh interpreter.

use kiln_plugin_sdk::{head, tail};
use serde::Deserialize;

/// How a test ended, as the driver spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Passed.
    Pass,
    /// An assertion failed.
    Fail,
    /// Raised, or could not run.
    Error,
    /// Skipped.
    Skip,
    /// Failed as expected.
    Xfail,
    /// Passed although expected to fail.
    Xpass,
}

/// One test's result, before the plugin adds the file and reports it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Report {
    /// unittest's id for the test (or the module name for a module error).
    pub id: String,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it took.
    pub duration_ms: u64,
    /// Traceback, skip reason, or empty.
    pub message: String,
}

/// One line of the driver's protocol.
#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Result(Report),
    Start {
        start: String,
    },
    Stop {
        #[expect(dead_code, reason = "the field only tells this variant apart")]
        stop: String,
    },
    Done {
        #[expect(dead_code, reason = "the field only tells this variant apart")]
        done: bool,
    },
}

/// How the driver process ended, as the host reported it.
#[derive(Clone, Debug, Default)]
pub struct Exit {
    /// The exit code, or `None` if a signal ended it.
    pub code: Option<i32>,
    /// Whether the host killed it for running out of time.
    pub timed_out: bool,
    /// Wall-clock time the plugin measured around the command.
    pub elapsed_ms: u64,
}

/// How much of stderr goes into an error message: enough for a traceback.
const STDERR_TAIL: usize = 4000;
/// How much of a malformed stdout line goes into an error message.
const BAD_LINE_PREFIX: usize = 300;

/// What one driver process said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interpretation {
    /// Its results, with an `error` at the end if it did not finish normally.
    pub reports: Vec<Report>,
    /// Every test it started, in order.
    pub started: Vec<String>,
    /// The test that was running when it ended without finishing, if any:
    /// the tests after it have not run.
    pub crashed_in: Option<String>,
}

/// Reads a driver's `stdout`, and from `exit` and `stderr` adds one `error`
/// result if the process did not finish normally. The error is given to the
/// test that was running when the process ended, if any, else to `module`.
pub fn interpret(module: &str, stdout: &[u8], stderr: &[u8], exit: &Exit) -> Interpretation {
    let mut reports = Vec::new();
    let mut started = Vec::new();
    let mut running: Option<String> = None;
    let mut done = false;
    let mut bad_line: Option<String> = None;
    let mut bad_lines = 0usize;
    for line in stdout.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(Line::Result(report)) => reports.push(report),
            Ok(Line::Start { start }) => {
                started.push(start.clone());
                running = Some(start);
            }
            Ok(Line::Stop { .. }) => running = None,
            Ok(Line::Done { .. }) => done = true,
            Err(_) => {
                bad_lines += 1;
                if bad_line.is_none() {
                    bad_line = Some(head(&String::from_utf8_lossy(line), BAD_LINE_PREFIX));
                }
            }
        }
    }

    let problem = if exit.timed_out {
        Some(format!("python3 was killed after {} because it ran out of time", seconds(exit.elapsed_ms)))
    } else if exit.code.is_none() {
        Some("python3 was killed by a signal (a crash in C code, or the out-of-memory killer)".to_owned())
    } else if exit.code != Some(0) {
        Some(format!("python3 exited with code {}", exit.code.unwrap_or_default()))
    } else if !done {
        Some("python3 exited before the test driver finished (a test may have called os._exit)".to_owned())
    } else {
        bad_line.as_ref().map(|_| "the test driver's output was not JSON".to_owned())
    };
    let Some(problem) = problem else {
        return Interpretation { reports, started, crashed_in: None };
    };

    let mut message = problem;
    match &running {
        Some(test) => message.push_str(&format!(" while running {test}")),
        None if !reports.is_empty() && !done => {
            message.push_str(&format!(" after {} results; any remaining tests did not run", reports.len()));
        }
        None => {}
    }
    message.push('.');
    if let Some(line) = bad_line {
        message.push_str(&format!("\n\n{bad_lines} line(s) of its output were not JSON; the first: {line}"));
    }
    let stderr = String::from_utf8_lossy(stderr);
    let stderr = stderr.trim_end();
    if stderr.is_empty() {
        message.push_str("\n\nIt wrote nothing to stderr.");
    } else {
        message.push_str(&format!("\n\nThe end of its stderr:\n{}", tail(stderr, STDERR_TAIL)));
    }
    reports.push(Report {
        id: running.clone().unwrap_or_else(|| module.to_owned()),
        outcome: Outcome::Error,
        duration_ms: exit.elapsed_ms,
        message,
    });
    Interpretation { reports, started, crashed_in: running }
}

fn seconds(ms: u64) -> String {
    format!("{}.{:01} s", ms / 1000, (ms % 1000) / 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Exit = Exit { code: Some(0), timed_out: false, elapsed_ms: 1234 };

    #[test]
    fn reads_results() {
        let out = br#"{"start": "m.T.a"}
{"id": "m.T.a", "outcome": "pass", "duration_ms": 3, "message": ""}
{"stop": "m.T.a"}
{"id": "m.T.b (i=1)", "outcome": "fail", "duration_ms": 1, "message": "boom"}
{"done": true}
"#;
        let run = interpret("m", out, b"noise", &OK);
        assert_eq!((run.started, run.crashed_in), (vec!["m.T.a".to_owned()], None));
        let reports = run.reports;
        assert_eq!(reports.len(), 2);
        assert_eq!((reports[0].id.as_str(), reports[0].outcome), ("m.T.a", Outcome::Pass));
        assert_eq!((reports[1].id.as_str(), reports[1].outcome), ("m.T.b (i=1)", Outcome::Fail));
    }

    #[test]
    fn a_crash_blames_the_running_test() {
        let out = b"{\"start\": \"m.T.a\"}\n";
        let exit = Exit { code: Some(3), ..OK };
        let run = interpret("m", out, b"Traceback: boom\n", &exit);
        assert_eq!(run.crashed_in.as_deref(), Some("m.T.a"));
        let reports = run.reports;
        assert_eq!(reports.len(), 1);
        assert_eq!((reports[0].id.as_str(), reports[0].outcome), ("m.T.a", Outcome::Error));
        assert!(reports[0].message.contains("exited with code 3 while running m.T.a."), "{}", reports[0].message);
        assert!(reports[0].message.contains("Traceback: boom"));
    }

    #[test]
    fn exit_zero_without_done_is_an_error() {
        let reports = interpret("m", b"", b"", &OK).reports;
        assert_eq!((reports[0].id.as_str(), reports[0].outcome), ("m", Outcome::Error));
        assert!(reports[0].message.contains("os._exit"));
    }

    #[test]
    fn garbage_and_timeouts_become_errors() {
        let out = b"hello world\n{\"done\": true}\n";
        let reports = interpret("m", out, b"", &OK).reports;
        assert_eq!(reports.len(), 1);
        assert!(reports[0].message.contains("hello world"), "{}", reports[0].message);

        let exit = Exit { code: None, timed_out: true, elapsed_ms: 5000 };
        let reports = interpret("m", b"{\"start\": \"m.T.slow\"}\n", "é".repeat(5000).as_bytes(), &exit).reports;
        assert_eq!(reports[0].id, "m.T.slow");
        assert!(reports[0].message.contains("after 5.0 s because it ran out of time"), "{}", reports[0].message);
    }
}
