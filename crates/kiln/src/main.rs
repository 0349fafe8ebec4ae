//! `kiln`: the one binary. It parses arguments, reads certificates, wires the
//! library crates together and maps failures to exit codes; the work itself
//! lives in the `kiln-*` crates.
//!
//! Exit codes: 0 success (for `kiln results`: the commit passed), 1 the
//! commit's tests failed, 2 any other problem (bad flags, missing files,
//! unreachable dispatcher, a commit that errored or is not finished).

/// `println!` for command output: a closed stdout (as in `kiln results | head`)
/// ends the process quietly instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for command output; see [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_stdout(format_args!($($arg)*))
    };
}

mod cli;
mod client;
mod commands;
mod demo;
mod logline;
mod plugin;
mod report;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.quiet);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            // The chain may hold a peer's words (a refusal reason): one line, escaped.
            eprintln!("error: {}", kiln_proto::Escaped(&format!("{e:#}")));
            ExitCode::from(2)
        }
    }
}

/// Writes command output; exits at once, successfully, if the reader has gone
/// away, and with exit code 2 if stdout fails otherwise.
fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(2);
    }
}

fn init_logging(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for people: log files and pipes get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // One event, one line, whatever a message says (see `logline`).
        .with_writer(move || logline::OneLine { ansi })
        .with_target(false)
        .with_ansi(ansi)
        .init();
}
