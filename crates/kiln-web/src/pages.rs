//! The HTML pages, server-rendered with maud (every interpolated value is
//! HTML-escaped by the template engine, attributes included), readable
//! without JavaScript. Each page's live part is a `<div data-live=URL>`
//! whose contents `URL` serves alone: `assets/live.js` fetches it again
//! when an event concerns it, so the markup is written once, here.

use std::fmt::Write;

use kiln_dispatcher::stream::Doc;
use kiln_dispatcher::view::Live;
use kiln_proto::{CommitStatus, Counts, FlakyTest, Outcome, TestResult, TestRun};
use maud::{DOCTYPE, Markup, html};

use crate::board::{Board, Progress};
use crate::text::display;

/// How many commits each branch shows on the front page.
pub const PER_BRANCH: usize = 10;
/// How many branches the front page shows.
const BRANCHES: usize = 50;

/// A whole page around `body`, whose live part is refreshed from `live`.
pub fn page(title: &str, nav: &str, live: &str, seq: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Kiln" }
                link rel="stylesheet" href="/assets/style.css";
                script src="/assets/live.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "Kiln" }
                    nav {
                        @for (href, name) in [("/", "Commits"), ("/flaky", "Flaky"), ("/runners", "Runners"), ("/queue", "Queue")] {
                            @if name == nav { a.current href=(href) { (name) } } @else { a href=(href) { (name) } }
                        }
                        a href="/metrics" { "Metrics" }
                    }
                    span #live-status { "" }
                }
                main #live data-live=(live) data-seq=(seq) { (body) }
            }
        }
    }
}

/// `1.2 s`, `3 min 4 s`.
pub fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// A Unix ms time as `2026-12-01 10:41:07 UTC`.
pub fn when(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn counts(c: &Counts) -> Markup {
    html! {
        span.counts {
            (c.total) @if c.total == 1 { " test" } @else { " tests" }
            @if c.pass > 0 { ", " span.o-pass { (c.pass) " passed" } }
            @if c.fail > 0 { ", " span.o-fail { (c.fail) " failed" } }
            @if c.error > 0 { ", " span.o-error { (c.error) " errors" } }
            @if c.skip > 0 { ", " (c.skip) " skipped" }
            @if c.xfail > 0 { ", " (c.xfail) " expected failures" }
            @if c.xpass > 0 { ", " span.o-xpass { (c.xpass) " unexpected successes" } }
        }
    }
}

fn status(s: CommitStatus) -> Markup {
    html! { span class={ "status s-" (s.as_str()) } data-status=(s.as_str()) { (s.as_str()) } }
}

/// How long a commit took, or has been going.
fn took(doc: &Doc, now_ms: u64) -> String {
    let end = doc.row.finished_at_ms.unwrap_or(now_ms);
    duration(end.saturating_sub(doc.row.queued_at_ms))
}

/// The front page's live part: recent commits per branch.
pub fn commits(board: &Board, now_ms: u64) -> Markup {
    // Branches in the order of their newest commit.
    let mut branches: Vec<(&str, &str)> = Vec::new();
    for doc in board.newest(None, usize::MAX, |_| true) {
        let key = (doc.row.repo.as_str(), doc.row.branch.as_str());
        if !branches.contains(&key) {
            branches.push(key);
            if branches.len() == BRANCHES {
                break;
            }
        }
    }
    html! {
        @if branches.is_empty() { p.empty { "No commits yet. An observer submits each new commit of the branches it watches." } }
        @for (repo, branch) in &branches {
            section.branch {
                h2 { span.branch-name { (branch) } " " span.repo { (repo) } }
                table.commits {
                    thead { tr { th { "commit" } th { "status" } th { "tests" } th { "took" } th { "queued" } th { "runners" } } }
                    tbody {
                        @for doc in board.newest(None, PER_BRANCH, |d| d.row.repo == *repo && d.row.branch == *branch) {
                            @let c = doc.row.commit;
                            tr #{ "c-" (c) } data-commit=(c) {
                                td { a.commit href={ "/commits/" (c) } { code { (c.short()) } } }
                                td { (status(doc.row.status)) }
                                td { (counts(&Counts::of(doc.tests.values()))) }
                                td { (took(doc, now_ms)) }
                                td { time datetime=(doc.row.queued_at_ms) { (when(doc.row.queued_at_ms)) } }
                                td { (doc.row.runner.as_deref().unwrap_or("—")) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The filters a commit page takes (`?outcome=fail&q=text`).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct Filter {
    /// Only this outcome (`fail`, `error`, …, or `problems`: fail, error, xpass).
    #[serde(default)]
    pub outcome: Option<String>,
    /// Only tests whose id, file or message contains this.
    #[serde(default)]
    pub q: Option<String>,
}

impl Filter {
    fn keeps(&self, t: &TestResult) -> bool {
        let outcome = match self.outcome.as_deref() {
            None | Some("") => true,
            Some("problems") => t.outcome.is_failure(),
            Some(o) => o.parse::<Outcome>().is_ok_and(|o| o == t.outcome),
        };
        let text = match self.q.as_deref() {
            None | Some("") => true,
            Some(q) => t.id.contains(q) || t.file.contains(q) || t.message.contains(q),
        };
        outcome && text
    }

    /// The query string to keep these filters on a fragment's URL.
    pub fn query(&self) -> String {
        let mut out = String::new();
        for (k, v) in [("outcome", &self.outcome), ("q", &self.q)] {
            if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
                let _ = write!(out, "&{k}={}", percent(v));
            }
        }
        out
    }
}

/// Percent-encodes everything but unreserved characters.
pub fn percent(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The path of a test's history page: the id percent-encoded whole (its
/// `/`, `?`, `#`, spaces and quotes too), so that any id is one route.
pub fn test_href(id: &str, repo: Option<&str>) -> String {
    match repo {
        Some(repo) => format!("/tests/{}?repo={}", percent(id), percent(repo)),
        None => format!("/tests/{}", percent(id)),
    }
}

/// The path of a test's history in the JSON API.
pub fn api_history_href(id: &str, repo: Option<&str>) -> String {
    match repo {
        Some(repo) => format!("/api/v1/tests/{}/history?repo={}", percent(id), percent(repo)),
        None => format!("/api/v1/tests/{}/history", percent(id)),
    }
}

/// The link to a test's result on a commit's page.
fn result_href(commit: &kiln_proto::CommitId, id: &str) -> String {
    format!("/commits/{commit}#{}", anchor(id))
}

/// A stable anchor for a test id: ids hold any characters, anchors should not.
pub fn anchor(id: &str) -> String {
    // FNV-1a, 64 bits: stable across builds and machines.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("t-{h:016x}")
}

/// Ranks an outcome for sorting: problems first.
fn rank(o: Outcome) -> u8 {
    match o {
        Outcome::Error => 0,
        Outcome::Fail => 1,
        Outcome::Xpass => 2,
        Outcome::Skip => 3,
        Outcome::Xfail => 4,
        Outcome::Pass => 5,
    }
}

/// A commit page's live part.
pub fn commit(doc: &Doc, progress: Option<&Progress>, filter: &Filter, now_ms: u64) -> Markup {
    let r = &doc.row;
    let all = Counts::of(doc.tests.values());
    // Files with problems first, then by name; in a file, problems first.
    let mut files: Vec<(&str, Vec<&TestResult>)> = Vec::new();
    let mut tests: Vec<&TestResult> = doc.tests.values().filter(|t| filter.keeps(t)).collect();
    tests.sort_by(|a, b| a.file.cmp(&b.file).then(rank(a.outcome).cmp(&rank(b.outcome))).then(a.id.cmp(&b.id)));
    for t in tests {
        match files.last_mut() {
            Some((f, list)) if *f == t.file => list.push(t),
            _ => files.push((&t.file, vec![t])),
        }
    }
    files.sort_by_key(|(f, list)| (list.iter().map(|t| rank(t.outcome)).min().unwrap_or(5), *f));
    let shown: usize = files.iter().map(|(_, l)| l.len()).sum();
    let (total_files, done_files) = progress.map_or((0, 0), |p| (p.files, p.done.len()));
    html! {
        section.summary {
            h1 { "Commit " code.commit-id { (r.commit) } " " (status(r.status)) }
            dl {
                dt { "repository" } dd { (r.repo) }
                dt { "branch" } dd { (r.branch) }
                dt { "queued" } dd { (when(r.queued_at_ms)) }
                dt { "took" } dd { (took(doc, now_ms)) @if !r.status.is_final() { " so far" } }
                dt { "runners" } dd { (r.runner.as_deref().unwrap_or("—")) }
                dt { "tests" } dd #counts { (counts(&all)) }
            }
            @if !r.status.is_final() && total_files > 0 {
                p.progress {
                    progress value=(done_files) max=(total_files) {}
                    " " (done_files) " of " (total_files) " test files done"
                }
            }
            @if let Some(error) = &r.error { pre.error { (display(error)) } }
            @for w in &r.warnings { p.warning { "warning: " (display(w)) } }
            p { a href={ "/api/v1/commits/" (r.commit) } { "JSON" } }
        }
        form.filter method="get" action={ "/commits/" (r.commit) } {
            label { "outcome "
                select name="outcome" {
                    option value="" { "any" }
                    @for (v, name) in [("problems", "fail, error, xpass"), ("fail", "fail"), ("error", "error"), ("xpass", "xpass"), ("skip", "skip"), ("xfail", "xfail"), ("pass", "pass")] {
                        @if filter.outcome.as_deref() == Some(v) { option value=(v) selected { (name) } } @else { option value=(v) { (name) } }
                    }
                }
            }
            " "
            label { "text " input type="search" name="q" value=(filter.q.as_deref().unwrap_or("")); }
            " " button type="submit" { "Filter" }
            @if shown != doc.tests.len() { " " span.shown { (shown) " of " (doc.tests.len()) " tests shown" } }
        }
        @for (file, list) in &files {
            section.file {
                h2 { code { (display(file)) } }
                ul.tests {
                    @for t in list {
                        // The id without a matrix, version and id with one: the same test under two versions is two entries.
                        @let a = anchor(&t.key());
                        li id=(a) class={ "test o-" (t.outcome.as_str()) } data-outcome=(t.outcome.as_str()) {
                            a.permalink href={ "#" (a) } title="permalink" { "#" }
                            " " span.outcome { (t.outcome.as_str()) } " "
                            a.test-link href=(test_href(&t.id, None)) title="this test's history" { code.test-id { (display(&t.id)) } }
                            @if let Some(v) = &t.python { " " span.python { "python " (v) } }
                            @if t.flaky { " " span.flaky title="failed, then passed when run again" { "flaky" } }
                            " " span.duration { (duration(t.duration_ms)) }
                            @if let Some(runner) = &t.runner { " " span.runner { "on " (runner) } }
                            @if !t.message.is_empty() {
                                @if t.outcome.is_failure() {
                                    pre.message { (display(&t.message)) }
                                } @else {
                                    details { summary { "output" } pre.message { (display(&t.message)) } }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a run's outcome change means, in words.
fn transition(r: &TestRun) -> &'static str {
    if r.outcome.is_failure() { "started failing" } else { "fixed" }
}

/// A test's history page's live part: its runs on the newest commits that
/// ran it, newest first, with changes between passing and failing marked.
pub fn test_history(id: &str, repo: Option<&str>, runs: &[TestRun], flaky: Option<&FlakyTest>, days: u32) -> Markup {
    let failing = runs.iter().filter(|r| r.outcome.is_failure()).count();
    html! {
        section.summary {
            h1 {
                "Test " code.test-id { (display(id)) }
                @if let Some(f) = flaky {
                    " " span.flaky.badge title=(flaky_summary(f)) { "flaky" }
                }
            }
            @if let Some(repo) = repo { p { "in " span.repo { (repo) } } }
            @if runs.is_empty() {
                p.empty { "No commit has run this test." }
            } @else {
                p { "The newest " (runs.len()) " runs, newest first: " (failing) " failed. "
                    a href=(api_history_href(id, repo)) { "JSON" } }
            }
            @if let Some(f) = flaky {
                p.flaky-note { "Flaky in the last " (days) " days: " (flaky_summary(f)) "." }
                (flips(f))
            }
        }
        @if !runs.is_empty() {
            table.history {
                thead { tr { th { "commit" } th { "branch" } th { "outcome" } th { "took" } th { "queued" } th { "" } } }
                tbody {
                    @for r in runs {
                        @let class = if r.transition { format!("run o-{} transition", r.outcome.as_str()) } else { format!("run o-{}", r.outcome.as_str()) };
                        tr class=(class) data-commit=(r.commit) data-outcome=(r.outcome.as_str()) {
                            td { a href=(result_href(&r.commit, id)) { code { (r.commit.short()) } } }
                            td { (r.branch) }
                            td.outcome { (r.outcome.as_str()) }
                            td { (duration(r.duration_ms)) }
                            td { time datetime=(r.queued_at_ms) { (when(r.queued_at_ms)) } }
                            td.notes {
                                @if r.transition { span.transition { (transition(r)) } }
                                @if r.flaky { " " span.flaky title="failed, then passed when run again" { "flaky (" (r.runs) " runs)" } }
                                @if r.flipped { " " span.flipped title="another commit listed here has the same tree and ended the other way" { "flipped on the same code" } }
                                @if !r.status.is_final() { " " (status(r.status)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Why a test is flaky, in words, by each rule that found it.
fn flaky_summary(f: &FlakyTest) -> String {
    let mut parts = Vec::new();
    if !f.commits.is_empty() {
        parts.push(format!(
            "failed and passed on the same commit: {} of the {} commits that ran it",
            f.commits.len(),
            f.seen
        ));
    }
    if !f.flips.is_empty() {
        let trees = if f.flips.len() == 1 { "1 tree".to_owned() } else { format!("{} trees", f.flips.len()) };
        parts.push(format!("passed and failed on the same code (another commit with the same tree): {trees}"));
    }
    parts.join("; ")
}

/// The trees a test flipped on, with the commits that passed and failed.
fn flips(f: &FlakyTest) -> Markup {
    html! {
        @if !f.flips.is_empty() {
            ul.flips {
                @for x in &f.flips {
                    li.flip data-tree=(x.tree) {
                        "tree " code { (x.tree.short()) } ": passed on "
                        a href=(result_href(&x.passed, &f.id)) { code { (x.passed.short()) } }
                        ", failed on "
                        a href=(result_href(&x.failed, &f.id)) { code { (x.failed.short()) } }
                    }
                }
            }
        }
    }
}

/// The flaky page's live part: the tests flaky on a commit of the last
/// `days` days, most often flaky first, each with its commits and the end
/// of a failing run's message.
pub fn flaky(tests: &[FlakyTest], days: u32) -> Markup {
    html! {
        h1 { "Flaky tests" }
        p { (tests.len()) @if tests.len() == 1 { " test" } @else { " tests" } " both failed and passed on the same commit, or on the same code, in the last " (days) @if days == 1 { " day" } @else { " days" } "." }
        @for t in tests {
            section.flaky-test data-test=(t.id) {
                h2 { a.test-link href=(test_href(&t.id, Some(&t.repo))) { code.test-id { (display(&t.id)) } } }
                p { code { (display(&t.file)) } " in " span.repo { (t.repo) } ": " (flaky_summary(t)) ", last " (when(t.last_flaky_ms)) }
                @if !t.commits.is_empty() {
                    ul.commits {
                        @for c in &t.commits { li { a href=(result_href(c, &t.id)) { code { (c.short()) } } } }
                    }
                }
                (flips(t))
                @if !t.sample.is_empty() { pre.message { (display(&t.sample)) } }
            }
        }
    }
}

/// The runners page's live part.
pub fn runners(live: &Live) -> Markup {
    html! {
        p { (live.runners.len()) " runners connected, " (live.busy_slots()) " of " (live.total_slots()) " slots busy." }
        @if !live.runners.is_empty() {
            table.runners {
                thead { tr { th { "runner" } th { "address" } th { "slots" } th { "running" } th { "connected since" } th { "last heard" } th { "sandbox" } } }
                tbody {
                    @for r in &live.runners {
                        tr.runner data-runner=(r.name) {
                            td.runner-name { (r.name) }
                            td { (r.address) }
                            td { (r.busy) " of " (r.slots) " busy" }
                            td {
                                @if r.running.is_empty() { "idle" }
                                @for b in &r.running {
                                    div { a href={ "/commits/" (b.commit) } { code { (b.commit.short()) } } " — " (b.file_count) " files on " (b.slots) " slots" }
                                }
                            }
                            td { (when(r.connected_since_ms)) }
                            td { (when(r.last_heard_ms)) }
                            td {
                                @if r.sandbox_warnings.is_empty() { "complete" }
                                @for w in &r.sandbox_warnings { div.warning { (display(w)) } }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The queue page's live part: what waits, and why; and what left the
/// queue lately without running.
pub fn queue(live: &Live, board: &Board) -> Markup {
    let skipped = board.newest(None, 10, |d| d.row.status == CommitStatus::Skipped);
    html! {
        @if live.queue.is_empty() { p.empty { "Nothing waits." } }
        @else {
            table.queue {
                thead { tr { th { "commit" } th { "branch" } th { "queued" } th { "files" } th { "why it waits" } } }
                tbody {
                    @for q in &live.queue {
                        tr data-commit=(q.commit) {
                            td { a href={ "/commits/" (q.commit) } { code { (q.commit.short()) } } }
                            td { (q.branch) " " span.repo { (q.repo) } }
                            td { (when(q.queued_at_ms)) }
                            td { (q.pending_files) " waiting, " (q.running_files) " running, " (q.done_files) " done" }
                            td.reason { (q.reason.to_string()) }
                        }
                    }
                }
            }
        }
        @if !skipped.is_empty() {
            h2 { "Left the queue without running" }
            ul {
                @for d in skipped {
                    li { a href={ "/commits/" (d.row.commit) } { code { (d.row.commit.short()) } } " on " (d.row.branch) ": " (d.row.error.as_deref().unwrap_or("skipped")) }
                }
            }
        }
    }
}

/// A page for a commit nobody knows.
pub fn not_found(what: &str) -> Markup {
    page("Not found", "", "", "", html! { h1 { "Not found" } p { (what) } })
}

/// A part that could not be shown, and why.
pub fn unavailable(why: &str) -> Markup {
    html! { p.error { "Not available right now: " (why) } }
}
