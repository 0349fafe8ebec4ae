//! `kill -9` of the dispatcher in the middle of result writes, a thousand
//! times (see BENCHMARKS.md): the end-to-end test's crash loop
//! (tests/e2e/crash.rs), which checks the state database with
//! `sqlite3`'s `PRAGMA integrity_check` and that no commit is half-written
//! after every kill, and that every commit ends with each test once.
//!
//! Run with `cargo bench -p kiln --bench crash` (release);
//! `KILN_CRASH_ROUNDS` sets the number of kills (1000).

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on any unexpected error")]

#[path = "../../../tests/e2e/harness.rs"]
#[allow(dead_code, reason = "the benchmark uses only part of the test harness")]
mod harness;

#[path = "../../../tests/e2e/crash.rs"]
mod crash;

fn main() {
    let rounds = std::env::var("KILN_CRASH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let f = crash::crash_loop(rounds);
    println!(
        "{} kills of the dispatcher mid-write, {} commits: database whole and no commit half-written after every \
         kill; every commit passed with each of its tests once ({} results stored, {} sent: {} ran again after a \
         kill cut their batch); {:.1} s in all ({:.0} ms a round), last kill to every commit final {:.2} s",
        f.kills,
        f.commits,
        f.stored,
        f.sent,
        f.sent - f.stored as u64,
        f.took.as_secs_f64(),
        f.took.as_secs_f64() * 1000.0 / f.kills as f64,
        f.last_kill_to_final.as_secs_f64()
    );
}
