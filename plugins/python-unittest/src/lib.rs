//! The python-unittest executor plugin: runs Python `unittest` test modules
//! and reports one result per test.
//!
//! Key decision: one `python3` process per file (a test module, or a
//! package's `__init__.py` for what discover loads from the package itself),
//! each running a small driver (driver.py) that loads the file with
//! discover's own code and prints one JSON line per test. A test that
//! crashes the interpreter (os._exit, a segfault in C code, a hang until the
//! host's timeout) becomes an `error` naming it, and the file's remaining
//! tests run in a fresh interpreter that leaves out the ones already run,
//! so one crash hides no other test.
//!
//! The plugin decides which files to run with the rules of
//! `python3 -m unittest discover -s tests -t .` ([`select`]), reading the
//! checkout through the read-only WASI preopen at `/checkout`, and turns
//! everything the driver prints (or fails to print) into results
//! ([`output`]). plugins/python-unittest/FIDELITY.md compares its results
//! with plain unittest's on real projects.

mod output;
mod select;

use std::time::Instant;

use kiln_plugin_sdk::{Command, Executor, Info, Outcome, TestResult, checkout_path, export_executor};

/// The per-module time limit the plugin asks for. The host caps it at its own
/// limit, which is normally the one that applies.
const MODULE_TIMEOUT_MS: u64 = 60 * 60 * 1000;

/// The driver program, fed to the interpreter on stdin (`python3 -`).
const DRIVER: &str = include_str!("driver.py");

/// How many times a file's remaining tests are restarted after crashes
/// before the plugin gives up on the rest of it.
const MAX_RESTARTS: usize = 100;

struct PythonUnittest;

export_executor!(PythonUnittest);

impl Executor for PythonUnittest {
    fn info() -> Info {
        Info {
            name: "python-unittest".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            claims: vec!["tests/**/*.py".to_owned()],
            programs: vec!["python3".to_owned()],
        }
    }

    fn run(files: Vec<String>) -> Result<(), String> {
        let (modules, skipped) = select::test_modules(&files, |file| match std::fs::metadata(checkout_path(file)) {
            Ok(meta) if meta.is_file() => select::Entry::File(meta.len()),
            _ => select::Entry::Other,
        });
        // Empty package `__init__.py` files are expected here; name the
        // others (one line per call), since a misnamed test file is a common
        // mistake.
        let notable: Vec<String> = skipped
            .iter()
            .filter(|s| !s.file.ends_with("/__init__.py"))
            .map(|s| format!("{} ({})", s.file, s.reason))
            .collect();
        if !notable.is_empty() {
            kiln_plugin_sdk::log(&format!("not test modules for unittest discover: {}", notable.join(", ")));
        }
        for module in &modules {
            run_file(module);
        }
        Ok(())
    }
}

/// Runs one file's tests and reports them; after a crash, runs the tests
/// that had not started yet in a fresh interpreter.
fn run_file(module: &select::TestModule) {
    let mut skip: Vec<String> = Vec::new();
    for restart in 0..=MAX_RESTARTS {
        let mut run = run_module(module, &skip);
        let again = match &run.crashed_in {
            Some(test) if !skip.contains(test) && restart < MAX_RESTARTS => true,
            Some(test) => {
                // Either the limit, or a test that was to be left out ran
                // again (a load_tests that renames its tests, say): going on
                // might never end.
                let why = if skip.contains(test) {
                    format!("{test} ran again although it was left out")
                } else {
                    format!("the file was restarted {MAX_RESTARTS} times already")
                };
                if let Some(last) = run.reports.last_mut() {
                    last.message.push_str(&format!("\n\nThe file's remaining tests were not run: {why}."));
                }
                false
            }
            None => false,
        };
        for report in run.reports {
            kiln_plugin_sdk::report(&TestResult {
                id: report.id,
                file: module.file.clone(),
                outcome: outcome(report.outcome),
                duration_ms: report.duration_ms,
                message: report.message,
            });
        }
        if !again {
            return;
        }
        // Every test that started is done with (the last one crashed).
        skip.extend(run.started.into_iter().filter(|id| !skip.contains(id)).collect::<Vec<_>>());
    }
}

/// The interpreter's command line for one file: `python3 - FILE SKIP…`, the
/// driver read from stdin, so that a process listing shows what runs rather
/// than the driver's source.
fn module_command(file: &str, skip: &[String]) -> Command {
    let mut args = vec!["-".to_owned(), file.to_owned()];
    args.extend(skip.iter().cloned());
    Command { program: "python3".to_owned(), args, cwd: String::new(), timeout_ms: MODULE_TIMEOUT_MS }
}

/// Runs one file's tests, except those in `skip`, in its own interpreter
/// and reads their results.
fn run_module(module: &select::TestModule, skip: &[String]) -> output::Interpretation {
    let command = module_command(&module.file, skip);
    let started = Instant::now();
    let result = kiln_plugin_sdk::run_command_with_input(&command, DRIVER.as_bytes());
    let elapsed_ms = kiln_plugin_sdk::elapsed_ms(started);
    match result {
        Ok(out) => {
            let exit = output::Exit { code: out.exit_code, timed_out: out.timed_out, elapsed_ms };
            output::interpret(&module.name, &out.stdout, &out.stderr, &exit)
        }
        Err(error) => {
            // The SDK's one wording, with the flag that grants the program.
            let message = error.explain("python3");
            let report =
                output::Report { id: module.name.clone(), outcome: output::Outcome::Error, duration_ms: 0, message };
            output::Interpretation { reports: vec![report], ..Default::default() }
        }
    }
}

fn outcome(outcome: output::Outcome) -> Outcome {
    match outcome {
        output::Outcome::Pass => Outcome::Pass,
        output::Outcome::Fail => Outcome::Fail,
        output::Outcome::Error => Outcome::Error,
        output::Outcome::Skip => Outcome::Skip,
        output::Outcome::Xfail => Outcome::Xfail,
        output::Outcome::Xpass => Outcome::Xpass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ps` shows a short line a person can read, not the driver's source.
    #[test]
    fn the_command_line_names_the_file_and_not_the_driver() {
        let command = module_command("tests/test_x.py", &["tests.test_x.T.test_crash".to_owned()]);
        assert_eq!(command.program, "python3");
        assert_eq!(command.args, ["-", "tests/test_x.py", "tests.test_x.T.test_crash"]);
        assert!(DRIVER.len() > 1000 && !command.args.iter().any(|a| a.contains("import")));
    }
}
