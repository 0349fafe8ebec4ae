//! Measures how fast Kiln answers against running the tests by hand, side by
//! side in one run (see BENCHMARKS.md, "Speed"):
//!
//! - end to end, with the real processes (dispatcher, one runner with its
//!   default slots, an observer that only looks when `kiln notify` pokes it,
//!   as a git hook would): from `git commit` returning to the dispatcher's
//!   results file holding the commit's final status, against the wall time
//!   of `python3 -m unittest discover -s tests -t .` and of `pytest -n auto`
//!   (pytest-xdist, installed from PyPI into a temporary venv) on a copy of
//!   the same tree, each round run one after the other so that they share
//!   the machine's load;
//! - in process: a plugin call that runs no command (a fresh store, the
//!   instantiation of the precompiled plugin, the call), a sandboxed
//!   `python3 -c pass` against an unsandboxed one, and the warm driver's cost
//!   per test file.
//!
//! Run with `cargo bench -p kiln --bench speed` (as root, for the full sandbox).

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on any unexpected error")]

#[path = "../../../tests/e2e/harness.rs"]
#[allow(dead_code, reason = "the benchmark uses only part of the test harness")]
mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use harness::{Cluster, Repo, borrow, kiln};
use kiln_plugin_host::{HostEvent, PluginHost, Policy};
use kiln_proto::{CommitId, CommitReport, CommitStatus};

/// Rounds per suite (after a warm-up round), and for the 2-test suite, which is quick.
const ROUNDS: usize = 5;
const SMALL_ROUNDS: usize = 21;

/// Iterations of the CPU-bound suite's loop: about 0.27 s of pure Python
/// per test file on the development machine when it is idle (Python
/// 3.11), so that the suite takes more than 10 s directly.
const CPU_LOOP: u64 = 6_500_000;

fn main() {
    let python = python_executable();
    println!("python: {} ({})", python.display(), output(Command::new(&python).arg("-V")));
    let xdist = Venv::with_pytest_xdist(&python);
    println!("pytest: {}", output(Command::new(xdist.python()).args(["-m", "pytest", "--version"])));
    println!("load average at start: {}\n", load_average());

    let suites = [
        Suite {
            name: "CPU-bound (40 files × 1 test, ~0.27 s each)",
            files: cpu_bound(40),
            rounds: ROUNDS,
            pytest: true,
        },
        Suite { name: "trivial (40 modules × 25 tests)", files: synthetic(40, 25), rounds: ROUNDS, pytest: true },
        Suite { name: "small (1 module, 2 tests)", files: synthetic(1, 2), rounds: SMALL_ROUNDS, pytest: false },
    ];
    let rows: Vec<Row> = suites.iter().map(|s| end_to_end(s, &python, &xdist)).collect();

    println!("\n## Commit → final results (kiln notify), against running the tests directly\n");
    println!(
        "| suite | tests | Kiln commit → final | kiln queued → done | unittest direct | pytest -n auto | Kiln vs unittest |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in &rows {
        let kiln = median(&row.kiln);
        let direct = median(&row.unittest);
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.2}× ({:+} ms) |",
            row.name,
            row.tests,
            spread(&row.kiln),
            ms(median(&row.queued_to_done)),
            spread(&row.unittest),
            if row.pytest.is_empty() { "—".to_owned() } else { spread(&row.pytest) },
            kiln.as_secs_f64() / direct.as_secs_f64(),
            kiln.as_millis() as i128 - direct.as_millis() as i128,
        );
    }
    let [cpu, trivial, small] = &rows[..] else { unreachable!("three suites") };
    println!("\nTargets:");
    let ratio = median(&cpu.kiln).as_secs_f64() / median(&cpu.unittest).as_secs_f64();
    target(&format!("CPU-bound: Kiln / unittest = {ratio:.2} ≤ 0.6"), ratio <= 0.6);
    let over = median(&trivial.kiln).as_millis() as i128 - median(&trivial.unittest).as_millis() as i128;
    target(&format!("trivial: Kiln − unittest = {over} ms ≤ 300 ms"), over <= 300);
    for row in [cpu, trivial] {
        let (k, p) = (median(&row.kiln), median(&row.pytest));
        target(&format!("{}: Kiln {} ≤ pytest -n auto {}", row.name, ms(k), ms(p)), k <= p);
    }
    let p50 = median(&small.kiln);
    target(
        &format!("small: Kiln commit → final p50 {:.1} ms ≤ 100 ms", p50.as_secs_f64() * 1000.0),
        p50 <= Duration::from_millis(100),
    );

    in_process(&python);
    println!("\nload average at the end: {}", load_average());
}

/// `/proc/loadavg`'s first three fields: how busy the shared machine was.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// A suite: its files, and how to run it.
struct Suite {
    name: &'static str,
    files: Vec<(String, String)>,
    rounds: usize,
    pytest: bool,
}

/// One suite's timings, one entry per round.
struct Row {
    name: &'static str,
    tests: u64,
    kiln: Vec<Duration>,
    queued_to_done: Vec<Duration>,
    unittest: Vec<Duration>,
    pytest: Vec<Duration>,
}

fn target(what: &str, met: bool) {
    println!("  {} {what}", if met { "met:    " } else { "NOT met:" });
}

/// Kiln, unittest and (optionally) pytest on `suite`, one after the other in each round.
fn end_to_end(suite: &Suite, python: &Path, xdist: &Venv) -> Row {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &borrow(&suite.files));
    let warmup = repo.commit("warm-up");
    // Default slots: the CPUs the runner may use.
    cluster.runner("runner-1");
    // Hourly polls: only `kiln notify` makes the observer look, as a git
    // hook would, so the figure is Kiln's own time and not a poll interval.
    cluster.observer_with("observer", &repo.path, "1h", &[]);
    let warm = cluster.wait_for(&warmup);
    assert_eq!(warm.status, CommitStatus::Passed, "{warm:?}");
    // The direct runs get their own copy of the tree, so that the
    // `__pycache__` they write (as a user's would) never reaches a commit.
    let direct = tempfile::tempdir().unwrap();
    Repo { path: direct.path().to_owned() }.write(&borrow(&suite.files));
    let _ = unittest_direct(python, direct.path());
    if suite.pytest {
        let _ = pytest_direct(xdist, direct.path());
    }
    let results = cluster.state().join("results");
    let mut row = Row {
        name: suite.name,
        tests: warm.counts.total,
        kiln: Vec::new(),
        queued_to_done: Vec::new(),
        unittest: Vec::new(),
        pytest: Vec::new(),
    };
    for round in 0..suite.rounds {
        repo.write(&[("bench_round.txt", &format!("{round}\n"))]);
        let commit = repo.commit(&format!("round {round}"));
        let start = Instant::now();
        let out = kiln().args(["notify", "--repo"]).arg(&repo.path).output().unwrap();
        assert!(out.status.success(), "kiln notify: {}", String::from_utf8_lossy(&out.stderr));
        let report = wait_final(&results, &commit, &cluster);
        row.kiln.push(start.elapsed());
        assert_eq!(report.status, CommitStatus::Passed, "{report:?}");
        assert_eq!(report.counts.total, row.tests);
        let done = report.finished_at_ms.unwrap_or(report.queued_at_ms);
        row.queued_to_done.push(Duration::from_millis(done.saturating_sub(report.queued_at_ms)));
        row.unittest.push(unittest_direct(python, direct.path()));
        if suite.pytest {
            row.pytest.push(pytest_direct(xdist, direct.path()));
        }
    }
    println!(
        "{}: Kiln {}, unittest {}{}",
        suite.name,
        spread(&row.kiln),
        spread(&row.unittest),
        if suite.pytest { format!(", pytest -n auto {}", spread(&row.pytest)) } else { String::new() }
    );
    row
}

/// Waits until the dispatcher's results file for `commit` shows a final
/// status, reading it only when it changed (a 1,000-test file is re-read
/// only when rewritten, so polling costs the measured processes little).
fn wait_final(results: &Path, commit: &CommitId, cluster: &Cluster) -> CommitReport {
    let path = results.join(format!("{commit}.json"));
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut seen: Option<(u64, SystemTime)> = None;
    while Instant::now() < deadline {
        if let Ok(meta) = std::fs::metadata(&path) {
            let stamp = (meta.len(), meta.modified().unwrap());
            if seen != Some(stamp) {
                seen = Some(stamp);
                if let Ok(bytes) = std::fs::read(&path)
                    && let Ok(report) = serde_json::from_slice::<CommitReport>(&bytes)
                    && report.status.is_final()
                {
                    return report;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("no final results for {commit}\n{}", cluster.logs());
}

fn unittest_direct(python: &Path, dir: &Path) -> Duration {
    timed(Command::new(python).args(["-m", "unittest", "discover", "-s", "tests", "-t", ".", "-q"]).current_dir(dir))
}

fn pytest_direct(venv: &Venv, dir: &Path) -> Duration {
    timed(Command::new(venv.python()).args(["-m", "pytest", "-n", "auto", "-q", "tests"]).current_dir(dir))
}

/// The wall time of a command that must succeed.
fn timed(cmd: &mut Command) -> Duration {
    let start = Instant::now();
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    elapsed
}

/// A throwaway virtual environment with pytest and pytest-xdist from PyPI.
struct Venv {
    dir: tempfile::TempDir,
}

impl Venv {
    fn with_pytest_xdist(python: &Path) -> Venv {
        let dir = tempfile::tempdir().unwrap();
        let _ = timed(Command::new(python).args(["-m", "venv"]).arg(dir.path()));
        let venv = Venv { dir };
        let _ = timed(Command::new(venv.python()).args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "pytest",
            "pytest-xdist",
        ]));
        venv
    }

    fn python(&self) -> PathBuf {
        self.dir.path().join("bin/python")
    }
}

/// The interpreter the runner resolves `python3` to (`sys.executable` of
/// the `python3` on PATH, past any pyenv shim); the direct runs use it too.
fn python_executable() -> PathBuf {
    let programs = Policy::resolve_programs(&["python3"]).unwrap();
    programs["python3"].clone()
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).trim().to_owned()
}

/// `files` test files of one test each that spends about 0.27 s in a pure-Python loop.
fn cpu_bound(files: usize) -> Vec<(String, String)> {
    let mut suite = vec![("tests/__init__.py".to_owned(), String::new())];
    for f in 0..files {
        let src = format!(
            "import unittest\n\n\nclass Cpu{f}Test(unittest.TestCase):\n    def test_loop(self):\n        x = 0\n        \
             for i in range({CPU_LOOP}):\n            x += i * i\n        self.assertGreater(x, 0)\n"
        );
        suite.push((format!("tests/test_cpu{f}.py"), src));
    }
    suite
}

/// `modules` test modules of `tests` trivial tests each.
fn synthetic(modules: usize, tests: usize) -> Vec<(String, String)> {
    let mut files = vec![("tests/__init__.py".to_owned(), String::new())];
    for m in 0..modules {
        let mut src = format!("import unittest\n\n\nclass Module{m}Test(unittest.TestCase):\n");
        for t in 0..tests {
            src.push_str(&format!(
                "    def test_{t}(self):\n        self.assertEqual(sum(range({t})), {})\n",
                t * t.saturating_sub(1) / 2
            ));
        }
        files.push((format!("tests/test_mod{m}.py"), src));
    }
    files
}

/// What the runner's plugin host and sandbox cost, measured in this process.
fn in_process(python: &Path) {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let programs: BTreeMap<String, PathBuf> = [("python3".to_owned(), python.to_owned())].into();
    let policy = Policy {
        programs: programs.clone(),
        command_timeout: Duration::from_secs(60),
        max_output: 1 << 20,
        call_timeout: Duration::from_secs(60),
        max_memory: 256 << 20,
        hidden: Vec::new(),
    };
    let host = PluginHost::new(policy).unwrap();

    // A plugin call that runs no command: python-unittest gets one file it
    // claims but that is no test module, so it only looks at it and says it
    // is done. Against a run with no files (which instantiates nothing),
    // that is a fresh store with its WASI context, the instantiation of the
    // precompiled component (`InstancePre::instantiate_async`) and the call.
    let idle = tempfile::tempdir().unwrap();
    Repo { path: idle.path().to_owned() }.write(&[("tests/helper.py", "")]);
    // The calls follow one another inside one task, as a runner's jobs do,
    // so that no figure includes waking this thread from outside the runtime.
    let one = ["tests/helper.py".to_owned()];
    let calls = |files: &[String], count: usize| -> Vec<Duration> {
        runtime.block_on(async {
            let mut times = Vec::with_capacity(count);
            for _ in 0..count {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let start = Instant::now();
                host.run(idle.path(), files, 1, &tx).await.unwrap();
                times.push(start.elapsed());
                drop(tx);
                let mut done = 0;
                while let Some(event) = rx.recv().await {
                    done += usize::from(matches!(event, HostEvent::FileDone(_)));
                }
                assert_eq!(done, files.len());
            }
            times
        })
    };
    let _ = calls(&one, 20);
    let empty = calls(&[], 500);
    let calls = calls(&one, 500);

    // A sandboxed `python3 -c pass` (every mechanism the machine allows:
    // namespaces, cgroup, Landlock, seccomp, another user) against the same
    // interpreter started directly with a cleared environment.
    let checkout = tempfile::tempdir().unwrap();
    let checkout_path = checkout.path().canonicalize().unwrap();
    let limits = kiln_sandbox::Limits {
        granted: &programs,
        timeout: Duration::from_secs(60),
        max_output: 1 << 20,
        hidden: &[],
        env: &[],
        binds: &[],
    };
    let sandboxed = || {
        runtime.block_on(async {
            let request = kiln_sandbox::Request {
                program: "python3".to_owned(),
                args: vec!["-c".to_owned(), "pass".to_owned()],
                cwd: String::new(),
                timeout: Duration::ZERO,
                input: None,
            };
            let start = Instant::now();
            let out = kiln_sandbox::run(&checkout_path, request, &limits).await.unwrap();
            let elapsed = start.elapsed();
            assert_eq!(out.exit_code, Some(0), "{}", String::from_utf8_lossy(&out.stderr));
            elapsed
        })
    };
    // The same, split at the moment its output arrives: the sandbox's
    // start (until the interpreter has run) and its end (from there until
    // the host is told the program and everything it started is gone).
    let split = |sandbox: bool| {
        runtime.block_on(async {
            let args = ["-c", "import sys; sys.stdout.write('x'); sys.stdout.flush()"];
            let start = Instant::now();
            let (printed, exited) = if sandbox {
                let request = kiln_sandbox::Request {
                    program: "python3".to_owned(),
                    args: args.iter().map(|a| (*a).to_owned()).collect(),
                    cwd: String::new(),
                    timeout: Duration::ZERO,
                    input: None,
                };
                let mut process = kiln_sandbox::spawn(&checkout_path, request, &limits).await.unwrap();
                let mut printed = None;
                loop {
                    match process.next().await {
                        kiln_sandbox::Event::Stdout(_) => printed = printed.or(Some(start.elapsed())),
                        kiln_sandbox::Event::Stderr(_) => {}
                        kiln_sandbox::Event::Exited(_) => break (printed.unwrap(), start.elapsed()),
                    }
                }
            } else {
                use tokio::io::AsyncReadExt;
                let mut child = tokio::process::Command::new(python)
                    .args(args)
                    .env_clear()
                    .current_dir(&checkout_path)
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stdout = child.stdout.take().unwrap();
                let mut byte = [0u8; 1];
                stdout.read_exact(&mut byte).await.unwrap();
                let printed = start.elapsed();
                child.wait().await.unwrap();
                (printed, start.elapsed())
            };
            (printed, exited - printed)
        })
    };
    let (mut starts, mut ends, mut plain_starts, mut plain_ends) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..21 {
        let (start, end) = split(true);
        starts.push(start);
        ends.push(end);
        let (start, end) = split(false);
        plain_starts.push(start);
        plain_ends.push(end);
    }
    let plain = || {
        timed(
            Command::new(python)
                .args(["-c", "pass"])
                .env_clear()
                .env("PATH", "/usr/bin:/bin")
                .current_dir(&checkout_path),
        )
    };
    let _ = (sandboxed(), plain());
    let mut with_sandbox = Vec::new();
    let mut without = Vec::new();
    for _ in 0..21 {
        with_sandbox.push(sandboxed());
        without.push(plain());
    }

    // The warm driver's cost per file: N files of one trivial test against
    // one such file, one slot (files one after another), through the host.
    const N: usize = 40;
    let tree = tempfile::tempdir().unwrap();
    Repo { path: tree.path().to_owned() }.write(&borrow(&synthetic(N, 1)));
    let many: Vec<String> = (0..N).map(|m| format!("tests/test_mod{m}.py")).collect();
    let batch = |files: &[String]| {
        runtime.block_on(async {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let start = Instant::now();
            host.run(tree.path(), files, 1, &tx).await.unwrap();
            let elapsed = start.elapsed();
            drop(tx);
            let mut passed = 0;
            while let Some(event) = rx.recv().await {
                passed += usize::from(matches!(event, HostEvent::Test(t) if t.outcome == kiln_proto::Outcome::Pass));
            }
            assert_eq!(passed, files.len());
            elapsed
        })
    };
    let _ = (batch(&many), batch(&many[..1]));
    let mut n_files = Vec::new();
    let mut one_file = Vec::new();
    for _ in 0..9 {
        n_files.push(batch(&many));
        one_file.push(batch(&many[..1]));
    }
    let per_file = median(&n_files).saturating_sub(median(&one_file)) / u32::try_from(N - 1).unwrap();

    println!("\n## The runner's own costs (in process)\n");
    println!("| what | median (min–max) |");
    println!("|---|---|");
    println!("| plugin call running no command (500 calls) | {} |", spread_us(&calls));
    println!("| the same host call with no files (nothing instantiated) | {} |", spread_us(&empty));
    println!(
        "| ⇒ fresh store + instantiate + call, by difference | {} µs |",
        median(&calls).saturating_sub(median(&empty)).as_micros()
    );
    println!("| `python3 -c pass`, sandboxed (21 runs) | {} |", spread(&with_sandbox));
    println!("| `python3 -c pass`, unsandboxed | {} |", spread(&without));
    println!(
        "| ⇒ the sandbox's cost per batch | {} ms |",
        median(&with_sandbox).saturating_sub(median(&without)).as_millis()
    );
    println!("| sandboxed: spawn → its first output | {} |", spread_fine(&starts));
    println!("| sandboxed: its first output → exit reported | {} |", spread_fine(&ends));
    println!("| unsandboxed: spawn → its first output | {} |", spread_fine(&plain_starts));
    println!("| unsandboxed: its first output → exit reported | {} |", spread_fine(&plain_ends));
    println!("| {N} files × 1 trivial test, one slot (9 runs) | {} |", spread(&n_files));
    println!("| 1 file × 1 trivial test | {} |", spread(&one_file));
    println!(
        "| ⇒ per file (fork, import, run, report), (T{N} − T1) / {} | {:.1} ms |",
        N - 1,
        per_file.as_secs_f64() * 1000.0
    );
    let p50 = median(&calls);
    target(
        &format!("a plugin call (fresh store + instantiate + call) p50 {} µs ≤ 100 µs", p50.as_micros()),
        p50 <= Duration::from_micros(100),
    );
}

fn median(values: &[Duration]) -> Duration {
    let mut v = values.to_vec();
    v.sort();
    v[v.len() / 2]
}

/// `median (min–max)` in milliseconds.
fn spread(values: &[Duration]) -> String {
    let (min, max) = (values.iter().min().unwrap(), values.iter().max().unwrap());
    format!("{} ({}–{} ms)", ms(median(values)), min.as_millis(), max.as_millis())
}

/// `median (min–max)` in milliseconds with one decimal.
fn spread_fine(values: &[Duration]) -> String {
    let (min, max) = (values.iter().min().unwrap(), values.iter().max().unwrap());
    let f = |d: &Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    format!("{} ms ({}–{} ms)", f(&median(values)), f(min), f(max))
}

/// `median (min–max)` in microseconds.
fn spread_us(values: &[Duration]) -> String {
    let (min, max) = (values.iter().min().unwrap(), values.iter().max().unwrap());
    format!("{} µs ({}–{} µs)", median(values).as_micros(), min.as_micros(), max.as_micros())
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}
