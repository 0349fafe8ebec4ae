//! The TAP executor plugin: runs test scripts under `tests/` that print TAP
//! (the Test Anything Protocol, versions 13 and 14) and reports one result
//! per test line.
//!
//! Key decision: each script runs as its own process, through the
//! interpreter its `#!` line names ([`shebang`]), and everything it prints
//! or fails to print becomes results ([`parse`]). A script that crashes,
//! hangs until the runner's timeout or breaks its plan costs only its own
//! file, and says so in an `error` result.
//!
//! Which files: `tests/**/*.t` (the extension Perl's `prove` runs) and
//! `tests/**/test*.sh` (shell scripts named like test files; helpers such
//! as `tests/lib.sh` are left alone). Which programs: the interpreters
//! listed in [`PROGRAMS`], of which the runner grants those its operator
//! allows (`kiln runner --allow-program sh`).
//!
//! Test ids: `<file>::<number> <description>` (`tests/math.t::2 adds
//! negatives`), or `<file>::<number>` for a test line without a
//! description; a result about the script as a whole has the file as its
//! id. Keep descriptions free of run-dependent text (times, paths) so that
//! ids stay the same from one run to the next.

mod parse;
mod shebang;

use std::io::Read;
use std::time::Instant;

use kiln_plugin_sdk::{Batch, Command, Executor, Info, Outcome, TestResult, checkout_path, export_executor};

/// Interpreters a script's `#!` line may name. The runner grants the ones
/// its operator also allows; a script asking for another one gets an
/// `error` result saying so.
pub const PROGRAMS: &[&str] = &["sh", "bash", "perl", "python3"];

/// The per-script time limit the plugin asks for. The runner caps it at its
/// own limit (`--command-timeout`), which is normally the one that applies.
const SCRIPT_TIMEOUT_MS: u64 = 60 * 60 * 1000;

/// How much of a script is read to find its `#!` line (Linux reads 256
/// bytes at most).
const HEAD_BYTES: u64 = 256;

struct Tap;

export_executor!(Tap);

impl Executor for Tap {
    fn info() -> Info {
        Info {
            name: "tap".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            claims: vec!["tests/**/*.t".to_owned(), "tests/**/test*.sh".to_owned()],
            programs: PROGRAMS.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    /// Runs the scripts one after another (the batch's slots are not used:
    /// TAP scripts are usually few and short).
    fn run(batch: Batch) -> Result<(), String> {
        for file in batch.files {
            for report in run_script(&file) {
                kiln_plugin_sdk::report(&TestResult {
                    id: report.id,
                    file: file.clone(),
                    outcome: report.outcome,
                    duration_ms: report.duration_ms,
                    message: report.message,
                });
            }
            kiln_plugin_sdk::file_done(&file);
        }
        Ok(())
    }
}

/// Runs one script and reads its TAP.
fn run_script(file: &str) -> Vec<parse::Report> {
    let error =
        |message: String| vec![parse::Report { id: file.to_owned(), outcome: Outcome::Error, duration_ms: 0, message }];
    let interpreter = match read_head(file)
        .map_err(|e| format!("Could not read it: {e}."))
        .and_then(|head| shebang::interpreter(&head).map_err(|why| format!("It cannot be run: {why}.")))
    {
        Ok(interpreter) => interpreter,
        Err(message) => return error(message),
    };
    if !PROGRAMS.contains(&interpreter.program.as_str()) {
        return error(format!(
            "Its #! line asks for `{}`, which the TAP plugin does not run (it runs {}).",
            interpreter.program,
            PROGRAMS.join(", ")
        ));
    }
    let mut args = interpreter.args;
    args.push(file.to_owned());
    let command = Command::new(&interpreter.program, args).timeout_ms(SCRIPT_TIMEOUT_MS);
    let started = Instant::now();
    let result = kiln_plugin_sdk::run_command(&command);
    let elapsed_ms = kiln_plugin_sdk::elapsed_ms(started);
    match result {
        Ok(out) => {
            let exit = parse::Exit { code: out.exit_code, timed_out: out.timed_out, elapsed_ms };
            parse::interpret(file, &out.stdout, &out.stderr, &exit)
        }
        Err(why) => error(format!("{}.", why.explain(&interpreter.program))),
    }
}

/// The first bytes of a script in the checkout.
fn read_head(file: &str) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    std::fs::File::open(checkout_path(file))?.take(HEAD_BYTES).read_to_end(&mut head)?;
    Ok(head)
}
