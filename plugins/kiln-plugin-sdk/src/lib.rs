//! The Kiln plugin SDK: write an executor plugin for a test framework in a
//! few dozen lines of ordinary Rust.
//!
//! Key decision: the guest bindings for the `kiln:executor` contract
//! (`plugins/wit/executor.wit`) are generated once, here, and a plugin never
//! names them. It implements [`Executor`] and exports itself with
//! [`export_executor!`]; it talks to the runner through [`report`],
//! [`file_done`], [`log`], [`run_command`] and [`spawn`] (a program whose
//! output it reads while it runs), and may take more files as it goes
//! ([`next_files`], with [`spawn_open`]); and it reads the job's checkout,
//! read-only, under [`CHECKOUT`] with `std::fs`.
//!
//! ```no_run
//! use kiln_plugin_sdk::{Batch, Executor, Info, Outcome, TestResult, export_executor, report};
//!
//! struct Always;
//!
//! impl Executor for Always {
//!     fn info() -> Info {
//!         Info {
//!             name: "always".to_owned(),
//!             version: env!("CARGO_PKG_VERSION").to_owned(),
//!             claims: vec!["tests/always/*".to_owned()],
//!             programs: vec![],
//!         }
//!     }
//!
//!     fn run(batch: Batch) -> Result<(), String> {
//!         for file in batch.files {
//!             report(&TestResult::new(file.clone(), file, Outcome::Pass));
//!         }
//!         Ok(())
//!     }
//! }
//!
//! export_executor!(Always);
//! ```
//!
//! Build the plugin crate (`crate-type = ["cdylib"]`) with
//! `cargo build --release --target wasm32-wasip2`, check the `.wasm` with
//! `kiln plugin check`, and load it with `kiln runner --plugins DIR`. The
//! pure parts of a plugin (parsing its framework's output) build and test
//! natively with `cargo test`; the host functions exist only inside a runner,
//! and calling them in a native test panics.
//!
//! The contract version this SDK targets is [`CONTRACT_VERSION`]; a runner
//! refuses plugins built for a version it cannot run, naming both.

use std::path::{Path, PathBuf};
use std::time::Instant;

/// The bindings `wit-bindgen` generates for the `plugin` world. Plugins use
/// the re-exports at the crate root; this module is public only because
/// [`export_executor!`] expands to code that refers to it.
///
/// The generated canonical-ABI glue is `unsafe` by nature. rustc does not
/// lint a proc macro's output (nor, in a plugin crate, the expansion of
/// this crate's macros), so no `unsafe_code` exception is needed here or in
/// plugins.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "plugin",
        // The export macro is used by the plugin crates, not this one.
        pub_export_macro: true,
        default_bindings_module: "kiln_plugin_sdk::bindings",
    });
}

pub use bindings::exports::kiln::executor::executor::Batch;
pub use bindings::kiln::executor::host::{
    Command, CommandError, CommandOutput, ExitStatus, Process, ProcessEvent as Event,
};
pub use bindings::kiln::executor::types::{Outcome, PluginInfo as Info, TestResult};

/// The `kiln:executor` contract version this SDK builds plugins for.
pub const CONTRACT_VERSION: &str = "0.2.1";

/// Where the runner mounts the job's checkout, read-only. Inside a plugin the
/// working directory is `/`, so use absolute paths ([`checkout_path`]).
pub const CHECKOUT: &str = "/checkout";

/// An executor plugin: what it is, and how it runs the files it claims.
///
/// Both functions are associated functions (no `self`): each call runs in a
/// fresh WebAssembly instance, so there is no state to keep between them.
pub trait Executor {
    /// Describes the plugin: its name (unique among a runner's plugins), its
    /// version, the glob patterns of the files it claims (e.g.
    /// `tests/**/*.t`; `*` stays within a path segment, `**` spans any
    /// number), and the programs it wants to start with [`run_command`], by
    /// bare name. Called once, when the runner loads the plugin.
    fn info() -> Info;

    /// Runs the tests in the batch's `files` (repository-relative paths, each
    /// matched by a claim), [`report`]s each test as it finishes and calls
    /// [`file_done`] as each file completes. It may run up to `slots` files at
    /// once; `file_timeout_ms` is the runner's limit for one file.
    ///
    /// Return `Err` only when the files could not be run at all: the runner
    /// then gives each file without a reported test an `error` result with
    /// this message. A failing or broken test is a result, not an `Err`.
    fn run(batch: Batch) -> Result<(), String>;
}

/// Exports a type implementing [`Executor`] as the plugin's implementation
/// of the `kiln:executor` contract. Use it once, at the crate root.
#[macro_export]
macro_rules! export_executor {
    ($executor:ty) => {
        const _: () = {
            struct KilnExecutorExport;

            impl $crate::bindings::exports::kiln::executor::executor::Guest for KilnExecutorExport {
                fn info() -> $crate::Info {
                    <$executor as $crate::Executor>::info()
                }

                fn run(batch: $crate::Batch) -> ::std::result::Result<(), ::std::string::String> {
                    <$executor as $crate::Executor>::run(batch)
                }
            }

    $crate::bindings::export!(KilnExecutorExport with_types_in $crate::bindings);
        };
    };
}

/// Reports one finished test to the runner, which streams it to the
/// dispatcher at once. A test id reported twice in one run keeps its first
/// result.
pub fn report(result: &TestResult) {
    bindings::kiln::executor::host::report(result);
}

/// Says that every result of `file` (one of the batch's files) has been
/// reported, so the runner can tell the dispatcher the file is complete.
/// Results reported for it afterwards are dropped. A file never marked done
/// is completed when `run` returns.
pub fn file_done(file: &str) {
    bindings::kiln::executor::host::file_done(file);
}

/// Writes a line to the runner's log, attributed to this plugin.
pub fn log(message: &str) {
    bindings::kiln::executor::host::log(message);
}

/// Runs a program in the job's checkout and waits for it. The program must
/// be one the plugin lists in [`Info::programs`] *and* the runner's operator
/// allows (`--allow-program`); otherwise this returns
/// [`CommandError::Denied`]. It runs with a cleared environment, in its own
/// process group, under the runner's time limit, with its output capped.
pub fn run_command(command: &Command) -> Result<CommandOutput, CommandError> {
    bindings::kiln::executor::host::run_command(command, &[])
}

/// Like [`run_command`], with `input` on the program's stdin (closed after
/// it): how to hand an interpreter a script (`python3 - ARGS`) without
/// putting it in the arguments, which process listings show.
pub fn run_command_with_input(command: &Command, input: &[u8]) -> Result<CommandOutput, CommandError> {
    bindings::kiln::executor::host::run_command(command, input)
}

/// Starts a program as [`run_command_with_input`] would, and returns at once:
/// read what it writes with [`Process::next`] while it runs (to report each
/// test as it ends), until [`Event::Exited`]. Dropping the [`Process`] kills
/// the program and everything it started.
pub fn spawn(command: &Command, input: &[u8]) -> Result<Process, CommandError> {
    bindings::kiln::executor::host::spawn(command, input)
}

/// [`spawn`], with the program's stdin left open after `input`: write more
/// with [`Process::write`] and close it with [`Process::close_input`] (or by
/// dropping the process). For a program that takes more files as it runs
/// ([`next_files`]).
pub fn spawn_open(command: &Command, input: &[u8]) -> Result<Process, CommandError> {
    bindings::kiln::executor::host::spawn_open(command, input)
}

/// More files for this run, once every file given so far is done: waits
/// until the runner has another batch of the same commit for this plugin
/// and returns its files (run and report them like the batch's own), or
/// returns an empty list when none will come. Calling it is optional: it
/// lets one warm program serve several batches instead of starting again.
pub fn next_files() -> Vec<String> {
    bindings::kiln::executor::host::next_files()
}

/// The path inside the plugin of a repository-relative `file`.
pub fn checkout_path(file: &str) -> PathBuf {
    Path::new(CHECKOUT).join(file)
}

/// At most `max` bytes from the start of `text`, cut on a character
/// boundary and marked with `...`: for quoting program output in messages.
pub fn head(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// At most `max` bytes from the end of `text`, cut on a character boundary
/// and marked with `...`: the end of stderr is where a failure is explained.
pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// Milliseconds since `started`, saturating, for [`TestResult::duration_ms`].
pub fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Command {
    /// A command running `program` with `args` from the checkout's root,
    /// under the runner's own time limit.
    pub fn new<I, S>(program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Command {
            program: program.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
            cwd: String::new(),
            timeout_ms: 0,
        }
    }

    /// Runs the command in `dir` (relative to the checkout's root) instead.
    pub fn cwd(mut self, dir: &str) -> Command {
        self.cwd = dir.to_owned();
        self
    }

    /// Asks for a shorter time limit than the runner's (which always caps it).
    pub fn timeout_ms(mut self, ms: u64) -> Command {
        self.timeout_ms = ms;
        self
    }
}

impl CommandOutput {
    /// Standard output as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

impl CommandError {
    /// A sentence saying why `program` did not run, and what to do about a
    /// denial (the usual cause: the runner does not allow the program).
    pub fn explain(&self, program: &str) -> String {
        match self {
            CommandError::Denied(why) => format!(
                "the runner did not let this plugin run `{program}` ({why}); allow it with \
                 `--allow-program {program}` (on `kiln runner`, or on `kiln plugin run` for a local trial)"
            ),
            CommandError::Failed(why) => format!("`{program}` could not be started: {why}"),
        }
    }
}

impl TestResult {
    /// A result with no duration and no message; set those fields as needed.
    pub fn new(id: impl Into<String>, file: impl Into<String>, outcome: Outcome) -> TestResult {
        TestResult { id: id.into(), file: file.into(), outcome, duration_ms: 0, message: String::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_version_matches_the_wit() {
        let wit = include_str!("../../wit/executor.wit");
        assert!(wit.contains(&format!("package kiln:executor@{CONTRACT_VERSION};")));
    }

    #[test]
    fn command_builder() {
        let command = Command::new("sh", ["tests/a.sh"]).cwd("tests").timeout_ms(5);
        assert_eq!(command.program, "sh");
        assert_eq!(command.args, ["tests/a.sh"]);
        assert_eq!((command.cwd.as_str(), command.timeout_ms), ("tests", 5));
        assert_eq!(checkout_path("tests/a.sh"), Path::new("/checkout/tests/a.sh"));
    }

    #[test]
    fn denial_names_the_fix() {
        let message = CommandError::Denied("not granted".to_owned()).explain("sh");
        assert!(message.contains("--allow-program sh"), "{message}");
    }
}
