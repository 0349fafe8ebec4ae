//! The python-unittest executor plugin: runs Python `unittest` test modules
//! and reports one result per test, as each test ends.
//!
//! Key decision: one sandboxed `python3` per batch runs the driver
//! (driver.py), which imports unittest once and then forks one child per
//! test file, up to the batch's slots at once. A file never sees another
//! file's module state (the parent never imports test code, and each child
//! is a fresh copy of it), and a child that crashes (os._exit, a segfault in
//! C code, a hang past the per-file timeout) costs only the test it was in:
//! the driver reports it as an `error` naming the cause and runs the file's
//! remaining tests in a fresh fork. The plugin reads the driver's output
//! while it runs ([`output`]) and reports each result the moment its line
//! arrives, and each file's completion with it. The last driver of a call
//! keeps its stdin open (`--more`): when it is idle the plugin asks the
//! runner for more files of the commit ([`kiln_plugin_sdk::next_files`])
//! and hands them to the same warm interpreter, which ends when none come.
//!
//! The plugin decides which files to run with the rules of
//! `python3 -m unittest discover -s tests -t .` ([`select`]), reading the
//! checkout through the read-only WASI preopen at `/checkout`.
//! plugins/python-unittest/FIDELITY.md compares its results with plain
//! unittest's on real projects.

mod output;
mod select;

use std::collections::BTreeMap;
use std::time::Instant;

use kiln_plugin_sdk::{Batch, Command, Event, Executor, Info, Outcome, TestResult, checkout_path, export_executor};

use crate::output::{Line, Reader};

/// The driver, and the few lines that check the interpreter's version before
/// running it (bootstrap.py explains the format).
const BOOTSTRAP: &str = include_str!("bootstrap.py");
const DRIVER: &str = include_str!("driver.py");

/// The most bytes of file names one driver's command line carries (Linux
/// refuses an argument list beyond a quarter of the stack limit); a larger
/// batch runs as several drivers, one after another.
const MAX_ARGV_BYTES: usize = 64 * 1024;

/// How much of the driver's stderr goes into an error message.
const STDERR_TAIL: usize = 4000;

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

    fn run(batch: Batch) -> Result<(), String> {
        let mut modules = test_modules(&batch.files);
        if modules.is_empty() {
            // A batch with nothing to run still takes the runner's next one.
            modules = more_modules();
            if modules.is_empty() {
                return Ok(());
            }
        }
        let chunks = argv_chunks(&modules);
        for (i, chunk) in chunks.iter().enumerate() {
            // The last driver stays for the runner's next batches.
            run_modules(chunk, &batch, i + 1 == chunks.len());
        }
        Ok(())
    }
}

/// The test modules among `files`; the others are marked done here.
fn test_modules(files: &[String]) -> Vec<select::TestModule> {
    let (modules, skipped) = select::test_modules(files, |file| match std::fs::metadata(checkout_path(file)) {
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
    for file in &skipped {
        kiln_plugin_sdk::file_done(&file.file);
    }
    modules
}

/// The test modules of the runner's next batches, once the driver is idle:
/// none when no more will come.
fn more_modules() -> Vec<select::TestModule> {
    loop {
        let files = kiln_plugin_sdk::next_files();
        if files.is_empty() {
            return Vec::new();
        }
        let modules = test_modules(&files);
        if !modules.is_empty() {
            return modules;
        }
    }
}

/// `modules` in runs of at most [`MAX_ARGV_BYTES`] of paths (at least one
/// module each).
fn argv_chunks(modules: &[select::TestModule]) -> Vec<&[select::TestModule]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, module) in modules.iter().enumerate() {
        let len = module.file.len() + 1;
        if i > start && bytes + len > MAX_ARGV_BYTES {
            chunks.push(&modules[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < modules.len() {
        chunks.push(&modules[start..]);
    }
    chunks
}

/// The driver program as fed to the interpreter on stdin: the driver as a
/// string literal, then the guard that runs it (bootstrap.py explains why).
fn program() -> String {
    format!("_KILN_DRIVER = r'''{DRIVER}'''\n{BOOTSTRAP}")
}

/// What the interpreter is told to run: read the program on stdin in one go
/// (exactly its length: with `--more`, what follows on stdin is files) and
/// run it. Not `python3 -`, which reads its program one byte at a time (a
/// read call per byte: 42,000 for the driver, each through the sandbox's
/// system call filter; 20–40 ms of every batch). Valid Python 2.7 too, so
/// that the version guard still speaks to an old interpreter.
fn loader() -> String {
    format!("import sys; exec(sys.stdin.read({}))", program().len())
}

/// The interpreter's command line: `python3 -c LOADER --slots N --timeout S
/// [--more] FILE…`, the driver read from stdin, so that a process listing
/// shows what runs rather than the driver's source.
fn driver_command(modules: &[select::TestModule], batch: &Batch, more: bool) -> Command {
    let mut args = vec![
        "-c".to_owned(),
        loader(),
        "--slots".to_owned(),
        batch.slots.max(1).to_string(),
        "--timeout".to_owned(),
        format!("{:.3}", batch.file_timeout_ms as f64 / 1000.0),
    ];
    if more {
        args.push("--more".to_owned());
    }
    args.push("--".to_owned());
    args.extend(modules.iter().map(|m| m.file.clone()));
    Command::new("python3", args)
}

/// Runs the driver on `modules` and reports what it says as it says it; then
/// gives every module it did not finish an `error` saying why. With `more`,
/// the driver, once idle, gets the runner's next batches of the commit
/// ([`kiln_plugin_sdk::next_files`]) on its stdin, and ends when none come.
fn run_modules(modules: &[select::TestModule], batch: &Batch, more: bool) {
    let started = Instant::now();
    // Module file -> its dotted name, for the modules not yet done.
    let mut pending: BTreeMap<String, String> = modules.iter().map(|m| (m.file.clone(), m.name.clone())).collect();
    let command = driver_command(modules, batch, more);
    let spawned = if more {
        kiln_plugin_sdk::spawn_open(&command, program().as_bytes())
    } else {
        kiln_plugin_sdk::spawn(&command, program().as_bytes())
    };
    let process = match spawned {
        Ok(process) => process,
        Err(error) => {
            // The SDK's one wording, with the flag that grants the program.
            fail(&mut pending, &error.explain("python3"), 0);
            return;
        }
    };
    let mut reader = Reader::default();
    let mut stderr = Tail::default();
    let mut too_old = None;
    let mut done = false;
    let status = loop {
        let lines = match process.next() {
            Event::Stdout(bytes) => reader.push(&bytes),
            Event::Stderr(bytes) => {
                stderr.push(&bytes);
                continue;
            }
            Event::Exited(status) => break status,
        };
        for line in lines {
            match line {
                Line::Result(report) => {
                    kiln_plugin_sdk::report(&TestResult {
                        id: report.id,
                        file: report.file,
                        outcome: outcome(report.outcome),
                        duration_ms: report.duration_ms,
                        message: report.message,
                    });
                }
                Line::FileDone { file_done } => {
                    pending.remove(file_done.as_str());
                    kiln_plugin_sdk::file_done(&file_done);
                }
                Line::TooOld { too_old: version } => too_old = Some(version),
                Line::Hello { .. } => {}
                Line::Done { .. } => done = true,
                Line::Idle { .. } => {
                    let next = if pending.is_empty() { more_modules() } else { Vec::new() };
                    if next.is_empty() {
                        process.close_input();
                        continue;
                    }
                    let files: Vec<&str> = next.iter().map(|m| m.file.as_str()).collect();
                    let line = serde_json::to_string(&files).unwrap_or_default() + "\n";
                    pending.extend(next.into_iter().map(|m| (m.file, m.name)));
                    if !process.write(line.as_bytes()) {
                        // The driver is gone; the pending files say so below.
                        process.close_input();
                    }
                }
            }
        }
    };
    let _ = reader.finish();
    if pending.is_empty() && done && reader.bad_lines == 0 {
        return;
    }
    let elapsed_ms = kiln_plugin_sdk::elapsed_ms(started);
    let mut message = if let Some(version) = &too_old {
        too_old_message(version)
    } else if status.timed_out {
        format!("python3 (the unittest driver) was killed after {} s: the batch ran out of time", elapsed_ms / 1000)
    } else if status.exit_code.is_none() {
        "python3 (the unittest driver) was killed by a signal (the out-of-memory killer, or a test that killed it)"
            .to_owned()
    } else if status.exit_code != Some(0) {
        format!("python3 (the unittest driver) exited with code {}", status.exit_code.unwrap_or_default())
    } else if !done {
        "python3 (the unittest driver) exited before it finished".to_owned()
    } else {
        "the unittest driver's output was not all JSON".to_owned()
    };
    if !pending.is_empty() && too_old.is_none() {
        message.push_str("; this file's remaining tests did not run");
    }
    message.push('.');
    if let Some(line) = &reader.first_bad_line {
        message.push_str(&format!("\n\n{} line(s) of its output were not JSON; the first: {line}", reader.bad_lines));
    }
    if too_old.is_none() {
        let stderr = stderr.text();
        if stderr.is_empty() {
            message.push_str("\n\nIt wrote nothing to stderr.");
        } else {
            message.push_str(&format!("\n\nThe end of its stderr:\n{stderr}"));
        }
    }
    if pending.is_empty() {
        // Every file completed, but something in the output was wrong: say
        // so once, on the log, rather than invent a test.
        kiln_plugin_sdk::log(&message);
    }
    fail(&mut pending, &message, elapsed_ms);
}

/// What an interpreter too old for the driver gets, without the final
/// period (as every cause in [`run_modules`], which adds it). The runner
/// takes `--allow-program` as a bare name only, resolved on its PATH at
/// start-up, so that is where a newer interpreter has to go.
fn too_old_message(version: &str) -> String {
    format!(
        "python3 is Python {version}; Kiln's unittest driver needs Python 3.8 or newer. Put a newer python3 first \
         on the runner's PATH (the runner resolves --allow-program python3 there when it starts) and restart it"
    )
}

/// Reports an `error` named after each pending module (the host keeps a
/// test's first result, so a module that already reported an error for its
/// name keeps that one) and completes it.
fn fail(pending: &mut BTreeMap<String, String>, message: &str, duration_ms: u64) {
    for (file, name) in std::mem::take(pending) {
        kiln_plugin_sdk::report(&TestResult {
            id: name,
            file: file.clone(),
            outcome: Outcome::Error,
            duration_ms,
            message: message.to_owned(),
        });
        kiln_plugin_sdk::file_done(&file);
    }
}

/// The last [`STDERR_TAIL`] bytes of a stream.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > 2 * STDERR_TAIL {
            self.0.drain(..self.0.len() - STDERR_TAIL);
        }
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.0);
        kiln_plugin_sdk::tail(text.trim_end(), STDERR_TAIL)
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
    fn the_command_line_names_the_files_and_not_the_driver() {
        let modules = [select::TestModule { file: "tests/test_x.py".to_owned(), name: "tests.test_x".to_owned() }];
        let batch = Batch { files: vec![], slots: 3, file_timeout_ms: 12_500 };
        let command = driver_command(&modules, &batch, false);
        assert_eq!(command.program, "python3");
        let loader = loader();
        assert_eq!(command.args, ["-c", &loader, "--slots", "3", "--timeout", "12.500", "--", "tests/test_x.py"]);
        assert!(DRIVER.len() > 1000 && !command.args.iter().any(|a| a.contains("_KILN_DRIVER") || a.len() > 40));
        assert_eq!(loader, format!("import sys; exec(sys.stdin.read({}))", program().len()));
        let more = driver_command(&modules, &batch, true);
        assert_eq!(more.args[6..], ["--more", "--", "tests/test_x.py"]);
    }

    #[test]
    fn huge_batches_are_split_to_fit_a_command_line() {
        let modules: Vec<select::TestModule> = (0..10_000)
            .map(|i| select::TestModule { file: format!("tests/test_{i:05}.py"), name: format!("tests.test_{i:05}") })
            .collect();
        let chunks = argv_chunks(&modules);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 10_000);
        assert!(
            chunks.len() > 1
                && chunks.iter().all(|c| c.iter().map(|m| m.file.len() + 1).sum::<usize>() <= MAX_ARGV_BYTES)
        );
        assert_eq!(argv_chunks(&modules[..3]).len(), 1);
        assert!(argv_chunks(&[]).is_empty());
    }

    /// One sentence, one period (run_modules adds it), and advice the
    /// runner accepts: `--allow-program` takes a bare name, never a path.
    #[test]
    fn an_interpreter_too_old_is_told_where_a_newer_one_goes() {
        let message = too_old_message("3.7.16");
        assert!(message.starts_with("python3 is Python 3.7.16; ") && message.contains("3.8 or newer"), "{message}");
        assert!(message.contains("first on the runner's PATH") && !message.contains("with a path"), "{message}");
        assert!(!message.ends_with('.'), "{message}");
    }

    /// The driver travels inside a raw triple-quoted literal: it must not
    /// contain the quotes that would end it, nor end with a backslash.
    #[test]
    fn the_driver_fits_in_its_literal() {
        assert!(DRIVER.is_ascii());
        assert!(!DRIVER.contains("'''") && !DRIVER.ends_with('\\'));
    }
}
