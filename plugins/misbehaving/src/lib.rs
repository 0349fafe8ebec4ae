//! A plugin that misbehaves on request, so kiln-plugin-host's tests can check
//! that a plugin which loops, balloons, panics or fails turns into `error`
//! results and that the host keeps serving. It is not built into the runner.
//!
//! Each claimed file `misbehave/<action>` asks for one behaviour. The host
//! runs a batch in one call and, when the call fails, each unfinished file
//! again in a call of its own, so a fatal one costs only itself.

use kiln_plugin_sdk::{Batch, Command, CommandError, Event, Executor, Info, Outcome, TestResult, export_executor};

struct Misbehaving;

export_executor!(Misbehaving);

impl Executor for Misbehaving {
    fn info() -> Info {
        Info {
            name: "misbehaving".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            // The second claim overlaps python-unittest's, which is loaded
            // first and so keeps those files: the host's overlap rule.
            claims: vec!["misbehave/*".to_owned(), "tests/**/*.py".to_owned()],
            programs: vec!["python3".to_owned(), "sh".to_owned()],
        }
    }

    fn run(batch: Batch) -> Result<(), String> {
        for file in batch.files {
            let action = file.rsplit('/').next().unwrap_or_default();
            let (outcome, message) = match action {
                "loop" => spin(),
                "sleep" => {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                    (Outcome::Pass, String::new())
                }
                "balloon" => balloon(),
                "panic" => panic!("deliberate panic in the misbehaving plugin"),
                "refuse" => return Err("deliberately refusing to run".to_owned()),
                "run-sh" => command("sh", ""),
                "escape" => command("python3", "../.."),
                "sandbox" => sandbox(),
                "twice" => {
                    report(&file, Outcome::Pass, "first");
                    (Outcome::Fail, "second".to_owned())
                }
                "flood" => {
                    // 64 MiB on stdout and a 4 MiB failure message: the host
                    // must keep only bounded amounts of either.
                    let line = "x".repeat(1 << 20);
                    for _ in 0..64 {
                        println!("{line}");
                    }
                    (Outcome::Fail, "y".repeat(4 << 20))
                }
                "spawn-stream" => spawn_stream(),
                "spawn-abandon" => {
                    // Started and forgotten: the host must kill it with the
                    // handle (the test looks for the process afterwards).
                    let command = Command::new("sh", ["-c", "sleep 31.4159"]);
                    let process = kiln_plugin_sdk::spawn(&command, b"");
                    (if process.is_ok() { Outcome::Pass } else { Outcome::Error }, String::new())
                }
                "after-done" => {
                    report(&file, Outcome::Pass, "before");
                    kiln_plugin_sdk::file_done(&file);
                    kiln_plugin_sdk::file_done(&file);
                    kiln_plugin_sdk::file_done("not/in/the/batch");
                    (Outcome::Fail, "reported after file-done".to_owned())
                }
                "ok" | "after" => (Outcome::Pass, String::new()),
                other => (Outcome::Error, format!("unknown action `{other}`")),
            };
            report(&file, outcome, &message);
            kiln_plugin_sdk::file_done(&file);
        }
        Ok(())
    }
}

fn report(file: &str, outcome: Outcome, message: &str) {
    kiln_plugin_sdk::report(&TestResult {
        id: file.to_owned(),
        file: file.to_owned(),
        outcome,
        duration_ms: 0,
        message: message.to_owned(),
    });
}

/// Runs a program and reports what the host said about it.
fn command(program: &str, cwd: &str) -> (Outcome, String) {
    let command = Command {
        program: program.to_owned(),
        args: vec!["-c".to_owned(), "pass".to_owned()],
        cwd: cwd.to_owned(),
        timeout_ms: 10_000,
    };
    match kiln_plugin_sdk::run_command(&command) {
        Ok(out) => (Outcome::Pass, format!("exit code {:?}", out.exit_code)),
        Err(CommandError::Denied(why)) => (Outcome::Error, format!("denied: {why}")),
        Err(CommandError::Failed(why)) => (Outcome::Error, format!("failed: {why}")),
    }
}

/// Spawns a program that writes, waits, and writes again, and checks that
/// the first line arrives before the program ends: output streams.
fn spawn_stream() -> (Outcome, String) {
    let command = Command::new("sh", ["-c", "echo first; read line; echo \"got $line\"; echo oops >&2; exit 3"]);
    let process = match kiln_plugin_sdk::spawn(&command, b"second\n") {
        Ok(process) => process,
        Err(CommandError::Denied(why) | CommandError::Failed(why)) => return (Outcome::Error, why),
    };
    // The two pipes are read concurrently: order holds within each only.
    let (mut out, mut err) = (String::new(), String::new());
    let exit = loop {
        match process.next() {
            Event::Stdout(bytes) => out.push_str(&String::from_utf8_lossy(&bytes)),
            Event::Stderr(bytes) => err.push_str(&String::from_utf8_lossy(&bytes)),
            Event::Exited(status) => break status.exit_code,
        }
    };
    // Exited repeats.
    let again = matches!(process.next(), Event::Exited(_));
    (Outcome::Pass, format!("out:{out:?}|err:{err:?}|exit:{exit:?}|again:{again}"))
}

/// Checks that the plugin can see nothing but a read-only checkout: passes
/// if every escape fails, fails naming each one that worked.
fn sandbox() -> (Outcome, String) {
    let mut leaks = Vec::new();
    if std::fs::write("/checkout/written-by-plugin", b"x").is_ok() {
        leaks.push("wrote into the checkout");
    }
    if std::fs::read("/checkout/misbehave/.keep").is_err() {
        leaks.push("(could not read the checkout at all)");
    }
    if std::fs::read("/etc/passwd").is_ok() || std::fs::read("/checkout/../../../etc/passwd").is_ok() {
        leaks.push("read outside the checkout");
    }
    if std::env::vars_os().next().is_some() {
        leaks.push("saw environment variables");
    }
    if std::env::args_os().next().is_some() {
        leaks.push("saw arguments");
    }
    if std::net::TcpStream::connect(("127.0.0.1", 9)).is_ok() || std::net::UdpSocket::bind(("127.0.0.1", 0)).is_ok() {
        leaks.push("opened a socket");
    }
    if leaks.is_empty() { (Outcome::Pass, String::new()) } else { (Outcome::Fail, leaks.join("; ")) }
}

/// Never returns: only the host's epoch deadline stops it.
fn spin() -> (Outcome, String) {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

/// Allocates until the host's memory limit stops it.
fn balloon() -> (Outcome, String) {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        chunks.push(std::hint::black_box(vec![1u8; 1 << 20]));
    }
}
