//! `kill -9` of the dispatcher in the middle of result writes, again and
//! again: after every kill the state database passes SQLite's own
//! `PRAGMA integrity_check` (read by the `sqlite3` program, not by Kiln),
//! no commit is half-written (a final commit has every file done, a done
//! file has every one of its tests, every result file on disk is a whole
//! document), and once the dispatcher is left running every commit ends
//! with each test stored exactly once.
//!
//! The runner is simulated in the test's process (over real mutual TLS
//! and QUIC, with a runner certificate) so that results stream as fast as
//! the dispatcher takes them, and every kill lands while it is writing:
//! each round waits until results flow again after the restart, then kills
//! after a random delay. The observer is the real one, submitting a new
//! commit every few rounds. [`crash_loop`] takes the number of rounds: the
//! test below runs a few (`KILN_CRASH_ROUNDS`, default 12), the benchmark
//! `cargo bench -p kiln --bench crash` a thousand.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_net::{Bundle, NetConfig};
use kiln_proto::wire::{Assignment, JobEvent, Registration, Reply, Request};
use kiln_proto::{CommitId, CommitReport, CommitStatus, Outcome, TestResult};

use crate::harness::{Cluster, Repo, Signal, eventually};

/// Test files per commit, and tests per file.
const FILES: usize = 100;
const TESTS: usize = 10;

/// The dispatcher's flags: restored leases nobody claims go back to the
/// queue at once (the simulated runner never resumes, it starts over).
const FLAGS: &[&str] = &["--resume-grace", "100ms"];

/// What one crash loop did.
#[derive(Debug)]
pub struct CrashFigures {
    /// How many times the dispatcher was killed.
    pub kills: usize,
    /// Commits submitted (all ended, each test once).
    pub commits: usize,
    /// Results the runner sent, and results stored in the end.
    pub sent: u64,
    pub stored: usize,
    /// The whole loop, and the final stretch after the last kill.
    pub took: Duration,
    pub last_kill_to_final: Duration,
}

/// Counts shared with the simulated runner.
#[derive(Default)]
struct Runner {
    sent: AtomicU64,
    stop: AtomicBool,
}

/// The simulated runner: connects (again and again, as the dispatcher
/// dies), registers with one slot, and answers every assignment with
/// `TESTS` passing tests per file, each file's end, and the batch's end.
fn simulated_runner(bundle: Bundle, addr: String, runner: Arc<Runner>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        while !runner.stop.load(Ordering::SeqCst) {
            // Whatever failed (the dispatcher died), start over: a new
            // connection, holding nothing.
            let _ = serve(&bundle, &addr, &runner).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

async fn serve(bundle: &Bundle, addr: &str, runner: &Runner) -> Result<(), String> {
    // A dispatcher killed with SIGKILL closes nothing: notice it quickly.
    let cfg = NetConfig {
        keep_alive: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(400),
        ..NetConfig::default()
    };
    // While the dispatcher is down a handshake waits out its timeout (a
    // second); give up sooner and try again, as it restarts within moments.
    let connecting = tokio::time::timeout(Duration::from_millis(300), kiln_net::connect(bundle, addr, cfg));
    let conn = connecting.await.map_err(|_| "no answer yet".to_owned())?.map_err(|e| e.to_string())?;
    let registration = Registration { slots: 1, held: Vec::new(), sandbox_gaps: Vec::new(), pythons: Vec::new() };
    let (_control, _recv, reply) = conn.request(&Request::Register(registration)).await.map_err(|e| e.to_string())?;
    if !matches!(reply, Reply::Registered { .. }) {
        return Err(format!("{reply:?}"));
    }
    while !runner.stop.load(Ordering::SeqCst) {
        let (mut send, mut recv) = conn.accept().await.map_err(|e| e.to_string())?;
        let a: Assignment = recv.expect().await.map_err(|e| e.to_string())?;
        for file in &a.files {
            let module = file.trim_end_matches(".py").replace('/', ".");
            for t in 0..TESTS {
                let result =
                    TestResult::new(format!("{module}.T.test_{t}"), file.clone(), Outcome::Pass, 1, String::new());
                send.send(&JobEvent::Test(result)).await.map_err(|e| e.to_string())?;
                runner.sent.fetch_add(1, Ordering::SeqCst);
                // About a millisecond a test, as a quick real suite: a
                // commit's results stream for a second or so, and the kills
                // land in the middle of them.
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
            send.send(&JobEvent::FileDone { file: file.clone() }).await.map_err(|e| e.to_string())?;
        }
        send.send(&JobEvent::Finished { error: None }).await.map_err(|e| e.to_string())?;
        send.finish();
        let _ = recv.recv::<kiln_proto::wire::Control>().await;
    }
    Ok(())
}

/// A tiny pseudo-random generator (xorshift), seeded and printed so a
/// failing sequence of kill delays can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Runs `sql` on the state database with the `sqlite3` program.
fn sqlite(db: &std::path::Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().expect("run sqlite3 (install the sqlite3 package)");
    assert!(out.status.success(), "sqlite3 {sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The checks after a kill: the database is whole, no commit half-written,
/// every result document on disk a whole one (of those written since
/// `since`: older ones were checked before and are final).
fn check_after_kill(cluster: &Cluster, round: usize, since: std::time::SystemTime) {
    let db = cluster.state().join("kiln.db");
    assert_eq!(sqlite(&db, "PRAGMA integrity_check"), "ok", "round {round}: the database is damaged");
    assert_eq!(sqlite(&db, "PRAGMA foreign_key_check"), "", "round {round}: dangling rows");
    // Only the newest commits can have changed since the last check (one
    // runner takes them in order, and a round adds at most two); the older
    // ones are final, were checked whole, and never change again. Checking
    // every commit every round would make a thousand rounds quadratic.
    let recent = "(SELECT commit_id FROM commits ORDER BY seq DESC LIMIT 5)";
    // A commit that passed or failed has every one of its files done.
    let unfinished_final = sqlite(
        &db,
        &format!(
            "SELECT c.commit_id, f.file FROM commits c JOIN commit_files f ON f.commit_id = c.commit_id
             WHERE c.commit_id IN {recent} AND c.status IN ('passed', 'failed')
               AND NOT EXISTS (SELECT 1 FROM done_files d WHERE d.commit_id = f.commit_id AND d.file = f.file)"
        ),
    );
    assert_eq!(unfinished_final, "", "round {round}: a final commit with files not done");
    // A file done has all of its tests (its end is sent after them).
    let short = sqlite(
        &db,
        &format!(
            "SELECT d.commit_id, d.file, COUNT(r.test_id) FROM done_files d
             LEFT JOIN results r ON r.commit_id = d.commit_id AND r.file = d.file
             WHERE d.commit_id IN {recent}
             GROUP BY d.commit_id, d.file HAVING COUNT(r.test_id) != {TESTS}"
        ),
    );
    assert_eq!(short, "", "round {round}: a file done without all its tests");
    // Every result document is whole (each is written aside and renamed in).
    let results = cluster.state().join("results");
    for entry in std::fs::read_dir(&results).into_iter().flatten().flatten() {
        let path = entry.path();
        let recent = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t >= since);
        if recent
            && path.extension().is_some_and(|e| e == "json")
            && !entry.file_name().to_string_lossy().starts_with('.')
        {
            let bytes = std::fs::read(&path).unwrap();
            let parsed: Result<CommitReport, _> = serde_json::from_slice(&bytes);
            assert!(parsed.is_ok(), "round {round}: {} is not a whole report: {parsed:?}", path.display());
        }
    }
}

/// A commit of `FILES` files; `n` makes each commit's content its own.
fn write_suite(repo: &Repo, n: usize) {
    for f in 0..FILES {
        let src = format!("# commit {n}\nimport unittest\n\n\nclass T(unittest.TestCase):\n    pass\n");
        repo.write(&[(&format!("tests/test_{f:03}.py"), &src)]);
    }
}

/// Kills the dispatcher `rounds` times in the middle of result writes, a
/// new commit every few rounds, checking the state after each kill; then
/// lets it run and checks that every commit ended with each test once.
pub fn crash_loop(rounds: usize) -> CrashFigures {
    let started = Instant::now();
    let mut cluster = Cluster::start_with(FLAGS);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("crash loop: {rounds} rounds, seed {seed}");
    let mut rng = Rng(seed);
    let repo = Repo::new(cluster.dir.path(), &[("README", "crash loop\n")]);
    write_suite(&repo, 0);
    let mut commits: Vec<CommitId> = vec![repo.commit("commit 0")];
    let bundle = Bundle::load(&cluster.issue("runner", "sim")).unwrap();
    let runner = Arc::new(Runner::default());
    let sim = {
        let (addr, runner) = (cluster.addr.clone(), Arc::clone(&runner));
        std::thread::spawn(move || simulated_runner(bundle, addr, runner))
    };
    cluster.observer_with("observer", &repo.path, "100ms", &["--mode", "every"]);
    let addr = cluster.addr.clone();
    let mut last_kill = Instant::now();
    let mut checked = std::time::UNIX_EPOCH;
    for round in 0..rounds {
        let new_commit = |commits: &mut Vec<CommitId>| {
            write_suite(&repo, commits.len());
            commits.push(repo.commit(&format!("commit {}", commits.len())));
        };
        if round > 0 && round % 8 == 0 {
            new_commit(&mut commits);
        }
        // Results flowing into this dispatcher (a new commit if all are
        // done), then a random moment.
        let before = runner.sent.load(Ordering::SeqCst);
        let flowing = eventually(Duration::from_secs(60), || {
            if runner.sent.load(Ordering::SeqCst) > before + 5 {
                return true;
            }
            let last = commits.last().copied();
            if last.and_then(|c| cluster.stored(&c)).is_some_and(|r| r.status.is_final()) {
                new_commit(&mut commits);
            }
            false
        });
        assert!(flowing, "round {round}: no results reached the dispatcher\n{}", cluster.procs[0].log());
        std::thread::sleep(Duration::from_millis(rng.below(250)));
        cluster.procs[0].signal(Signal::SIGKILL);
        let _ = cluster.procs[0].child.wait();
        last_kill = Instant::now();
        check_after_kill(&cluster, round, checked);
        // A second's slack for file systems with coarse timestamps.
        checked = std::time::SystemTime::now() - Duration::from_secs(1);
        cluster.procs[0] = cluster.spawn_dispatcher(&addr, FLAGS);
        if (round + 1) % 50 == 0 {
            eprintln!(
                "{} kills so far, each followed by clean checks, {:.0} s",
                round + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    // Left running: every commit ends, each test stored once. Commits cut
    // off by a kill went back to the front of the queue, so they end in no
    // particular order: wait for all of them, a few seconds each.
    let limit = Duration::from_secs(60 + 5 * commits.len() as u64);
    let all_final =
        eventually(limit, || commits.iter().all(|c| cluster.stored(c).is_some_and(|r| r.status.is_final())));
    assert!(all_final, "not every commit ended within {limit:?}\n{}", cluster.procs[0].log());
    let mut stored = 0;
    for commit in &commits {
        let report = cluster.wait_stored(commit, "final", |r| r.status.is_final());
        assert_eq!(report.status, CommitStatus::Passed, "{commit}: {report:?}");
        let ids: BTreeSet<&str> = report.tests.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids.len(), report.tests.len(), "{commit}: a test recorded twice");
        assert_eq!(report.tests.len(), FILES * TESTS, "{commit}: tests missing");
        stored += report.tests.len();
    }
    let last_kill_to_final = last_kill.elapsed();
    check_after_kill(&cluster, rounds, std::time::UNIX_EPOCH);
    runner.stop.store(true, Ordering::SeqCst);
    let sent = runner.sent.load(Ordering::SeqCst);
    drop(cluster);
    let _ = sim.join();
    CrashFigures { kills: rounds, commits: commits.len(), sent, stored, took: started.elapsed(), last_kill_to_final }
}

#[test]
fn a_dispatcher_killed_mid_write_again_and_again_keeps_every_commit_whole() {
    let rounds = std::env::var("KILN_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let f = crash_loop(rounds);
    eprintln!(
        "{} kills, {} commits, {} results stored of {} sent, {:?} in all, last kill to final {:?}",
        f.kills, f.commits, f.stored, f.sent, f.took, f.last_kill_to_final
    );
    assert_eq!(f.kills, rounds);
    assert!(f.commits > rounds.saturating_sub(1) / 8, "{f:?}");
    assert_eq!(f.stored, f.commits * FILES * TESTS);
    // The runner sent more than was stored: kills cut batches off in the
    // middle, and what they had not finished ran again.
    assert!(f.sent > f.stored as u64, "{f:?}");
}
