//! The python-unittest executor plugin: runs Python `unittest` test modules
//! and reports one result per test.
//!
//! Key decision: one `python3` process per test module, each running a small
//! driver (driver.py) that prints one JSON line per test. A module that
//! crashes the interpreter (os._exit, a segfault in C code, a hang until the
//! host's timeout) then costs only its own results, which become an `error`
//! naming the test that was running, while every other module still reports.
//!
//! The plugin decides which files are test modules with the rules of
//! `python3 -m unittest discover -s tests -t .` ([`select`]), reading the
//! checkout through the read-only WASI preopen at `/checkout`, and turns
//! everything the driver prints (or fails to print) into results
//! ([`output`]).

mod output;
mod select;

use std::time::Instant;

use kiln_plugin_sdk::{Command, CommandError, Executor, Info, Outcome, TestResult, checkout_path, export_executor};

/// The per-module time limit the plugin asks for. The host caps it at its own
/// limit, which is normally the one that applies.
const MODULE_TIMEOUT_MS: u64 = 60 * 60 * 1000;

/// The driver program, passed to the interpreter with `-c`.
const DRIVER: &str = include_str!("driver.py");

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
        let (modules, skipped) = select::test_modules(&files, |file| checkout_path(file).is_file());
        // Package `__init__.py` files are expected here; name the others
        // (one line per call), since a misnamed test file is a common mistake.
        let notable: Vec<String> = skipped
            .iter()
            .filter(|s| !s.file.ends_with("/__init__.py"))
            .map(|s| format!("{} ({})", s.file, s.reason))
            .collect();
        if !notable.is_empty() {
            kiln_plugin_sdk::log(&format!("not test modules for unittest discover: {}", notable.join(", ")));
        }
        for module in &modules {
            for report in run_module(module) {
                kiln_plugin_sdk::report(&TestResult {
                    id: report.id,
                    file: module.file.clone(),
                    outcome: outcome(report.outcome),
                    duration_ms: report.duration_ms,
                    message: report.message,
                });
            }
        }
        Ok(())
    }
}

/// Runs one module's tests in its own interpreter and reads their results.
fn run_module(module: &select::TestModule) -> Vec<output::Report> {
    let command = Command {
        program: "python3".to_owned(),
        args: vec!["-c".to_owned(), DRIVER.to_owned(), module.name.clone()],
        cwd: String::new(),
        timeout_ms: MODULE_TIMEOUT_MS,
    };
    let started = Instant::now();
    let result = kiln_plugin_sdk::run_command(&command);
    let elapsed_ms = kiln_plugin_sdk::elapsed_ms(started);
    match result {
        Ok(out) => {
            let exit = output::Exit { code: out.exit_code, timed_out: out.timed_out, elapsed_ms };
            output::interpret(&module.name, &out.stdout, &out.stderr, &exit)
        }
        Err(error) => {
            let message = match error {
                CommandError::Denied(why) => format!("the runner did not let this plugin run python3: {why}"),
                CommandError::Failed(why) => format!("python3 could not be started: {why}"),
            };
            vec![output::Report { id: module.name.clone(), outcome: output::Outcome::Error, duration_ms: 0, message }]
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
