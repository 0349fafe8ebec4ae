//! A commit of 20,000 test files end to end (see BENCHMARKS.md): the
//! end-to-end test's `many_files` (tests/e2e/large.rs) with a real runner
//! and real Python, one test per file; time to final results and bytes the
//! dispatcher wrote.
//!
//! Run with `cargo bench -p kiln --bench large` (release);
//! `KILN_LARGE_FILES` sets the number of files (20000).

#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly on any unexpected error")]

#[path = "../../../tests/e2e/harness.rs"]
#[allow(dead_code, reason = "the benchmark uses only part of the test harness")]
mod harness;

#[path = "../../../tests/e2e/large.rs"]
mod large;

fn main() {
    let files = std::env::var("KILN_LARGE_FILES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let f = large::many_files(files);
    println!(
        "{} test files (one test each), one runner: commit → final results {:.1} s ({:.0} files/s; dispatcher \
         queued → final {:.1} s); the dispatcher wrote {:.1} MB ({:.1} KB a file), final results files {:.1} MB",
        f.files,
        f.took.as_secs_f64(),
        f.files as f64 / f.took.as_secs_f64(),
        f.queued_to_final.as_secs_f64(),
        f.written as f64 / 1e6,
        f.written as f64 / 1e3 / f.files as f64,
        f.results_bytes as f64 / 1e6
    );
}
