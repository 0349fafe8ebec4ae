//! Measures the dispatcher at scale (see BENCHMARKS.md): the real `kiln
//! dispatcher` process holding 1,000 runner connections, and how many
//! durable batch assignments per second it hands out.
//!
//! The runners are simulated in this process, but everything they do is
//! real: each has its own certificate issued by the project's certificate
//! code, its own QUIC endpoint and mutual-TLS handshake to 127.0.0.1
//! through kiln-net's client API, registers with one slot and answers its
//! assignments over the wire protocol. They run no tests: what is measured
//! is the dispatcher.
//!
//! 1. Connect and register `RUNNERS` runners; then, with nothing to do,
//!    read the dispatcher's RSS (`VmRSS`, `VmHWM`) and CPU time
//!    (`utime + stime`) from `/proc/PID` of the dispatcher process over
//!    `IDLE` seconds.
//! 2. Assignments: an observer submits a commit of `FILES` tiny test files
//!    (every file gets the default estimate, so batches shrink from ~10 files
//!    to one as the queue drains). Each runner answers `Finished` as soon as
//!    an assignment arrives (its files end as "not run"): every assignment
//!    is the transaction that stored the previous batch's end and the new
//!    lease, committed before the assignment is sent. Assignments per
//!    second from the first assignment a runner sees to the last `Finished`.
//! 3. The same with results: a commit of as many files in another
//!    repository, each runner reporting one test and the file's end per file
//!    before `Finished`.
//!
//! Run with `cargo bench -p kiln --bench scale` (release). Environment:
//! `KILN_SCALE_RUNNERS` (1000), `KILN_SCALE_FILES` (20000), `KILN_SCALE_IDLE_S` (10),
//! `KILN_SCALE_KEEPALIVE_MS` (5000, a runner's default: how often each
//! runner's connection sends a keep-alive; the dispatcher sends none).

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on any unexpected error")]

#[path = "../../../tests/e2e/harness.rs"]
#[allow(dead_code, reason = "the benchmark uses only part of the test harness")]
mod harness;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{Cluster, Repo};
use kiln_net::{Bundle, NetConfig};
use kiln_proto::wire::{Assignment, JobEvent, Registration, Reply, Request};
use kiln_proto::{CommitId, CommitReport, Outcome, Role, TestResult};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// What the simulated runners saw of one commit's assignments.
#[derive(Default)]
struct Seen {
    first: Option<Instant>,
    last: Option<Instant>,
    assignments: usize,
    files: usize,
}

/// Shared by the simulated runners.
#[derive(Default)]
struct Shared {
    registered: AtomicUsize,
    /// Whether to report a result per file (phase 3) or finish at once (phase 2).
    with_results: AtomicBool,
    seen: Mutex<HashMap<CommitId, Seen>>,
    failures: Mutex<Vec<String>>,
}

/// One simulated runner: connect, register with one slot, answer every
/// assignment until the connection ends.
/// `permit` is released once registered, so only a few handshakes run at once.
async fn runner(bundle: Bundle, addr: String, shared: Arc<Shared>, permit: tokio::sync::OwnedSemaphorePermit) {
    if let Err(e) = serve(bundle, &addr, &shared, permit).await {
        shared.failures.lock().unwrap().push(e);
    }
}

async fn serve(
    bundle: Bundle,
    addr: &str,
    shared: &Shared,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), String> {
    let keep_alive = Duration::from_millis(env("KILN_SCALE_KEEPALIVE_MS", 5000) as u64);
    // A real runner's settings: `NetConfig::default()`, keep-alives every
    // third of its idle timeout.
    let cfg = NetConfig { keep_alive, idle_timeout: keep_alive * 3, ..NetConfig::default() };
    let conn = kiln_net::connect(&bundle, addr, cfg).await.map_err(|e| e.to_string())?;
    let registration = Registration { slots: 1, held: Vec::new(), sandbox_gaps: Vec::new(), pythons: Vec::new() };
    let (_control, _control_recv, reply) =
        conn.request(&Request::Register(registration)).await.map_err(|e| e.to_string())?;
    if !matches!(reply, Reply::Registered { .. }) {
        return Err(format!("not registered: {reply:?}"));
    }
    shared.registered.fetch_add(1, Ordering::SeqCst);
    drop(permit);
    loop {
        let Ok((mut send, mut recv)) = conn.accept().await else { return Ok(()) };
        let a: Assignment = recv.expect().await.map_err(|e| e.to_string())?;
        let arrived = Instant::now();
        if shared.with_results.load(Ordering::SeqCst) {
            for file in &a.files {
                let module = file.trim_end_matches(".py").replace('/', ".");
                let result = TestResult::new(format!("{module}.T.test"), file.clone(), Outcome::Pass, 1, String::new());
                send.send(&JobEvent::Test(result)).await.map_err(|e| e.to_string())?;
                send.send(&JobEvent::FileDone { file: file.clone() }).await.map_err(|e| e.to_string())?;
            }
        }
        send.send(&JobEvent::Finished { error: None }).await.map_err(|e| e.to_string())?;
        send.finish();
        // The dispatcher ends its side once the end is stored.
        let _ = recv.recv::<kiln_proto::wire::Control>().await;
        let done = Instant::now();
        let mut seen = shared.seen.lock().unwrap();
        let s = seen.entry(a.commit).or_default();
        s.first = Some(s.first.map_or(arrived, |f| f.min(arrived)));
        s.last = Some(s.last.map_or(done, |l| l.max(done)));
        s.assignments += 1;
        s.files += a.files.len();
    }
}

/// Resident memory (`VmRSS`, `VmHWM`, kB) of a process.
fn memory_kb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// `/proc` counts CPU time in USER_HZ, which Linux fixes at 100 for user space
/// whatever the kernel's own tick rate.
const USER_HZ: u64 = 100;

/// A repository of `files` one-test files.
fn many_files(dir: &Path, files: usize) -> Repo {
    let repo = Repo::new(dir, &[("README", "many files\n")]);
    let src = "import unittest\n\n\nclass T(unittest.TestCase):\n    def test(self):\n        pass\n";
    for n in 0..files {
        let path = repo.path.join(format!("tests/test_{n:05}.py"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, src).unwrap();
    }
    repo
}

/// Waits for `commit` to end and prints what the runners saw of its assignments.
fn phase(
    cluster: &Cluster,
    shared: &Shared,
    runners: usize,
    files: usize,
    commit: &CommitId,
    what: &str,
) -> CommitReport {
    let pid = cluster.procs[0].child.id();
    let report = cluster.wait_stored(commit, "final", |r| r.status.is_final());
    // The runners' last answers may still be in flight when the file says final.
    std::thread::sleep(Duration::from_millis(500));
    let seen = shared.seen.lock().unwrap();
    let s = &seen[commit];
    let span = (s.last.unwrap() - s.first.unwrap()).as_secs_f64();
    let (c, h) = memory_kb(pid);
    println!(
        "{what}: {} assignments of {} files to {runners} runners in {span:.2} s: {:.0} assignments/s, {:.0} files/s \
         (dispatcher queued → final {:.2} s; status {}; RSS {:.1} MB, peak {:.1} MB)",
        s.assignments,
        s.files,
        s.assignments as f64 / span,
        s.files as f64 / span,
        (report.finished_at_ms.unwrap() - report.queued_at_ms) as f64 / 1000.0,
        report.status,
        c as f64 / 1024.0,
        h as f64 / 1024.0,
    );
    assert_eq!(s.files, files, "every file assigned exactly once");
    report
}

fn main() {
    let runners = env("KILN_SCALE_RUNNERS", 1000);
    let files = env("KILN_SCALE_FILES", 20_000);
    let idle_s = env("KILN_SCALE_IDLE_S", 10) as u64;
    // The default idle timeout, which a real runner's keep-alives follow.
    let mut cluster = Cluster::start_with(&["--idle-timeout", "15s"]);
    let pid = cluster.procs[0].child.id();
    println!("dispatcher pid {pid}");
    let certs = cluster.certs();
    let started = Instant::now();
    let bundles: Vec<Bundle> = (0..runners)
        .map(|n| {
            let dir = kiln_net::certs::issue(&certs, Role::Runner, &format!("sim-{n:04}")).unwrap();
            Bundle::load(&dir).unwrap()
        })
        .collect();
    println!("{runners} runner certificates issued in {:.1} s", started.elapsed().as_secs_f64());
    let (rss0, _) = memory_kb(pid);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let shared = Arc::new(Shared::default());
    let addr = cluster.addr.clone();
    let started = Instant::now();
    rt.block_on(async {
        // A few dozen handshakes at a time, as runners starting together would.
        let gate = Arc::new(tokio::sync::Semaphore::new(32));
        for bundle in bundles {
            let (shared, addr, gate) = (Arc::clone(&shared), addr.clone(), Arc::clone(&gate));
            let permit = gate.acquire_owned().await.unwrap();
            tokio::spawn(runner(bundle, addr, shared, permit));
        }
        while shared.registered.load(Ordering::SeqCst) < runners {
            let failures = shared.failures.lock().unwrap().clone();
            assert!(failures.is_empty(), "{failures:?}\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let connect_s = started.elapsed().as_secs_f64();
    println!("{runners} runners connected (mutual TLS over QUIC) and registered in {connect_s:.1} s");
    let registered_lines = cluster.procs[0].log().lines().filter(|l| l.contains("runner registered")).count();
    assert_eq!(registered_lines, runners, "the dispatcher logged {registered_lines} registrations");

    // Idle: nothing queued, every connection kept alive.
    std::thread::sleep(Duration::from_secs(2));
    let tck = USER_HZ;
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(idle_s));
    let (t1, c1) = (Instant::now(), cpu_ticks(pid));
    let (rss, hwm) = memory_kb(pid);
    let cpu = (c1 - c0) as f64 / tck as f64 / (t1 - t0).as_secs_f64() * 100.0;
    println!(
        "idle with {runners} runners: dispatcher RSS {:.1} MB (peak {:.1} MB; {:.1} MB before any runner), CPU {cpu:.2} % \
         of one core over {:.1} s ({} ticks at {tck} Hz)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss0 as f64 / 1024.0,
        (t1 - t0).as_secs_f64(),
        c1 - c0
    );
    assert_eq!(shared.registered.load(Ordering::SeqCst), runners, "a runner was lost while idle");

    // Assignments.
    let repo = many_files(cluster.dir.path(), files);
    let first = repo.commit("many files");
    cluster.observer_with("observer", &repo.path, "200ms", &["--mode", "every"]);
    let c0 = cpu_ticks(pid);
    let t0 = Instant::now();
    phase(&cluster, &shared, runners, files, &first, "finished at once");
    let cpu = (cpu_ticks(pid) - c0) as f64 / tck as f64;
    println!("  dispatcher CPU {cpu:.1} s over {:.1} s", t0.elapsed().as_secs_f64());

    // Another repository, so that no earlier commit's timings (the first
    // commit's files all ended "not run", in no time) shape its batches.
    shared.with_results.store(true, Ordering::SeqCst);
    let other = cluster.dir.path().join("other");
    let repo = many_files(&other, files);
    let second = repo.commit("many files, with results");
    cluster.observer_with("observer-2", &repo.path, "200ms", &["--mode", "every"]);
    let report = phase(&cluster, &shared, runners, files, &second, "one result per file");
    assert_eq!(report.tests.len(), files, "{}", report.status);
    let db = cluster.state().join("kiln.db");
    println!(
        "state database: {:.1} MB (with WAL {:.1} MB)",
        std::fs::metadata(&db).unwrap().len() as f64 / 1e6,
        std::fs::metadata(db.with_extension("db-wal")).map_or(0, |m| m.len()) as f64 / 1e6
    );
    drop(rt);
}
