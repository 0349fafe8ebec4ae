//! The dashboard server over HTTP, fed through the dispatcher's real read
//! API types by the test itself: SSE resumption, the reload rule, hostile
//! text in events, and memory with slow clients. (The whole system, with a
//! real dispatcher, runners and a browser, is tests/e2e/web.rs.)

#![allow(clippy::unwrap_used, reason = "a test fails loudly on any unexpected error")]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kiln_dispatcher::store::{Change, CommitRow};
use kiln_dispatcher::stream::{Snapshot, Update};
use kiln_dispatcher::view::{Live, ReadApi};
use kiln_proto::{CommitId, CommitStatus, Outcome, TestResult};
use kiln_web::conn::Limits;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// A dashboard on a free port, fed updates by the test.
struct Server {
    addr: String,
    updates: broadcast::Sender<Arc<Update>>,
    seq: Arc<AtomicU64>,
    shutdown: CancellationToken,
    rt: tokio::runtime::Runtime,
}

fn commit(n: u8) -> CommitId {
    format!("{n:040x}").parse().unwrap()
}

fn row(n: u8, status: CommitStatus) -> CommitRow {
    CommitRow {
        commit: commit(n),
        repo: "repo".into(),
        branch: "main".into(),
        seq: u64::from(n),
        status,
        error: None,
        runner: None,
        warnings: vec![],
        queued_at_ms: 1,
        finished_at_ms: None,
        tree: None,
        job: u64::from(n),
        attempt: 0,
    }
}

fn result(id: &str, message: &str) -> TestResult {
    TestResult {
        id: id.into(),
        file: "tests/test_a.py".into(),
        outcome: Outcome::Fail,
        duration_ms: 3,
        message: message.into(),
        runner: Some("r1".into()),
        flaky: false,
        earlier: vec![],
        python: None,
    }
}

impl Server {
    fn start() -> Server {
        Server::start_with(Limits::default())
    }

    /// A server with these limits on what clients hold.
    fn start_with(limits: Limits) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let (updates, _) = broadcast::channel(kiln_dispatcher::stream::CAPACITY);
        let seq = Arc::new(AtomicU64::new(0));
        let shutdown = CancellationToken::new();
        let (snap_tx, mut snap_rx) = mpsc::channel::<tokio::sync::oneshot::Sender<Result<Snapshot, String>>>(4);
        let (live_tx, mut live_rx) = mpsc::channel::<tokio::sync::oneshot::Sender<Live>>(4);
        let api = ReadApi::new(&updates, snap_tx, live_tx, Arc::default());
        let s = Arc::clone(&seq);
        rt.spawn(async move {
            while let Some(reply) = snap_rx.recv().await {
                let _ = reply.send(Ok(Snapshot { seq: s.load(Ordering::SeqCst), entries: vec![] }));
            }
        });
        rt.spawn(async move {
            while let Some(reply) = live_rx.recv().await {
                let _ = reply.send(Live::default());
            }
        });
        let listener = rt.block_on(kiln_web::bind("127.0.0.1:0".parse().unwrap(), None)).unwrap().limits(limits);
        let addr = listener.local_addr().unwrap().to_string();
        rt.spawn(kiln_web::serve(listener, api, None, shutdown.clone()));
        let server = Server { addr, updates, seq, shutdown, rt };
        // Serving once the page answers.
        assert!(eventually(|| server.get("/").0 == 200));
        server.publish(vec![Change::Commit(row(1, CommitStatus::Running))]);
        server
    }

    /// Publishes one update; returns its seq.
    fn publish(&self, changes: Vec<Change>) -> u64 {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.updates.send(Arc::new(Update { seq, changes })).unwrap();
        seq
    }

    fn test_result(&self, id: &str, message: &str) -> u64 {
        self.publish(vec![Change::Test { commit: commit(1), result: result(id, message) }])
    }

    /// Waits until the dashboard has applied `seq`.
    fn wait_applied(&self, seq: u64) {
        assert!(eventually(|| self.page_seq() >= seq));
    }

    /// The last seq the dashboard applied.
    fn applied(&self) -> u64 {
        metric(&self.get("/metrics").1, "kiln_events_last_seq").unwrap_or(0.0) as u64
    }

    /// The seq the front page says it shows.
    fn page_seq(&self) -> u64 {
        let id = self.page_id();
        id.rsplit_once('-').unwrap().1.parse().unwrap()
    }

    /// The event id the front page carries (`BOOT-SEQ`).
    fn page_id(&self) -> String {
        let (_, body) = self.get("/");
        let start = body.find("data-seq=\"").unwrap() + 10;
        body[start..start + body[start..].find('"').unwrap()].to_owned()
    }

    /// `GET path`: status and body.
    fn get(&self, path: &str) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(&self.addr) else { return (0, String::new()) };
        write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        (status, body.to_owned())
    }

    /// Opens the event stream, resuming after `last` if given.
    fn events(&self, last: Option<&str>, rcvbuf: Option<usize>) -> Sse {
        let s = TcpStream::connect(&self.addr).unwrap();
        if let Some(bytes) = rcvbuf {
            set_rcvbuf(&s, bytes);
        }
        let mut w = s.try_clone().unwrap();
        let header = last.map(|id| format!("Last-Event-ID: {id}\r\n")).unwrap_or_default();
        write!(w, "GET /api/v1/events HTTP/1.1\r\nHost: test\r\n{header}\r\n").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Sse { r: BufReader::new(s), head_read: false, chunk_left: 0, buf: Vec::new() }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn set_rcvbuf(s: &TcpStream, bytes: usize) {
    use std::os::fd::AsRawFd;
    let v = i32::try_from(bytes).unwrap();
    // SAFETY: a valid socket and a pointer to an int of the size passed.
    #[expect(unsafe_code, reason = "setsockopt has no safe wrapper in std")]
    unsafe {
        libc_setsockopt(s.as_raw_fd(), v);
    }
}

#[expect(unsafe_code, reason = "setsockopt has no safe wrapper in std")]
unsafe fn libc_setsockopt(fd: i32, v: i32) {
    unsafe extern "C" {
        fn setsockopt(fd: i32, level: i32, name: i32, value: *const i32, len: u32) -> i32;
    }
    // SOL_SOCKET = 1, SO_RCVBUF = 8 on Linux.
    // SAFETY: fd is an open socket; value points to an i32 of the length passed.
    unsafe {
        setsockopt(fd, 1, 8, &v, 4);
    }
}

/// One event as a client parses it.
#[derive(Debug, Default, PartialEq)]
struct Ev {
    event: String,
    id: Option<String>,
    data: String,
}

/// A minimal SSE client over HTTP/1.1 chunked encoding.
struct Sse {
    r: BufReader<TcpStream>,
    head_read: bool,
    chunk_left: usize,
    buf: Vec<u8>,
}

impl Sse {
    /// The next body line, or `None` at the end of the stream.
    fn line(&mut self) -> Option<String> {
        if !self.head_read {
            loop {
                let mut l = String::new();
                if self.r.read_line(&mut l).ok()? == 0 {
                    return None;
                }
                if l == "\r\n" {
                    break;
                }
            }
            self.head_read = true;
        }
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
            }
            if self.chunk_left == 0 {
                let mut size = String::new();
                if self.r.read_line(&mut size).ok()? == 0 {
                    return None;
                }
                if size.trim().is_empty() {
                    continue;
                }
                self.chunk_left = usize::from_str_radix(size.trim(), 16).ok()?;
                if self.chunk_left == 0 {
                    return None;
                }
            }
            let mut chunk = vec![0; self.chunk_left];
            self.r.read_exact(&mut chunk).ok()?;
            self.chunk_left = 0;
            self.buf.extend_from_slice(&chunk);
        }
    }

    /// The next event (comments skipped), or `None` at the end.
    fn next(&mut self) -> Option<Ev> {
        let mut ev = Ev::default();
        let mut any = false;
        loop {
            let line = self.line()?;
            if line.is_empty() {
                if any {
                    return Some(ev);
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            any = true;
            let (field, value) =
                line.split_once(':').map_or((line.as_str(), ""), |(f, v)| (f, v.strip_prefix(' ').unwrap_or(v)));
            match field {
                "event" => ev.event = value.to_owned(),
                "id" => ev.id = Some(value.to_owned()),
                "data" => {
                    if !ev.data.is_empty() {
                        ev.data.push('\n');
                    }
                    ev.data.push_str(value);
                }
                _ => {}
            }
        }
    }
}

fn seq_of(ev: &Ev) -> u64 {
    ev.id.as_deref().unwrap().rsplit_once('-').unwrap().1.parse().unwrap()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn events_resume_from_last_event_id_without_loss_or_repeats() {
    let server = Server::start();
    server.wait_applied(1);
    let start = server.page_id();
    let mut seen = Vec::new();
    let mut sse = server.events(Some(&start), None);
    for i in 0..10 {
        server.test_result(&format!("t{i}"), "boom");
    }
    let mut last = None;
    for _ in 0..5 {
        let ev = sse.next().unwrap();
        assert_eq!(ev.event, "change");
        serde_json::from_str::<serde_json::Value>(&ev.data).unwrap();
        seen.push(seq_of(&ev));
        last = ev.id;
    }
    drop(sse);
    // Published while nobody listened: delivered on resuming.
    for i in 10..20 {
        server.test_result(&format!("t{i}"), "boom");
    }
    let mut sse = server.events(last.as_deref(), None);
    while seen.last() != Some(&21) {
        let ev = sse.next().unwrap();
        assert_eq!(ev.event, "change", "{ev:?}");
        seen.push(seq_of(&ev));
    }
    assert_eq!(seen, (2..=21).collect::<Vec<u64>>(), "every event once, in order");
}

#[test]
fn a_message_cannot_forge_an_event() {
    let server = Server::start();
    server.wait_applied(1);
    let start = server.page_id();
    let mut sse = server.events(Some(&start), None);
    let hostile = "line\n\nevent: reload\ndata: {}\nid: 1-999\n\n\r\rdata: x";
    server.test_result("t", hostile);
    server.test_result("u", "after");
    let ev = sse.next().unwrap();
    assert_eq!(ev.event, "change");
    assert_eq!(seq_of(&ev), 2);
    let data: serde_json::Value = serde_json::from_str(&ev.data).unwrap();
    assert_eq!(data["changes"][0]["message"], hostile);
    let ev = sse.next().unwrap();
    assert_eq!((ev.event.as_str(), seq_of(&ev)), ("change", 3), "the next event is the next result: {ev:?}");
}

#[test]
fn a_client_from_before_the_ring_or_another_run_is_told_to_reload() {
    let server = Server::start();
    server.wait_applied(1);
    let boot = server.page_id().split_once('-').unwrap().0.to_owned();
    for i in 0..kiln_web::board::RING_EVENTS + 10 {
        server.test_result(&format!("t{i}"), "");
    }
    let last = server.seq.load(Ordering::SeqCst);
    assert!(eventually(|| server.page_seq() == last));
    for id in [format!("{boot}-1"), format!("{}-{last}", 12345), "garbage".to_owned(), format!("{boot}-{}", last + 5)] {
        let mut sse = server.events(Some(&id), None);
        let ev = sse.next().unwrap();
        assert_eq!(ev.event, "reload", "resuming from {id}");
        assert_eq!(sse.next(), None, "closed after reload");
    }
    // Inside the ring: resumes.
    let mut sse = server.events(Some(&format!("{boot}-{}", last - 3)), None);
    assert_eq!(seq_of(&sse.next().unwrap()), last - 2);
}

#[test]
fn slow_clients_do_not_grow_memory() {
    let server = Server::start();
    server.wait_applied(1);
    let start = server.page_id();
    // 31 clients that never read, with small receive buffers…
    let stuck: Vec<Sse> = (0..31).map(|_| server.events(Some(&start), Some(4096))).collect();
    // …and one that reads, slowly: it falls behind and must be told to reload.
    let mut slow = server.events(Some(&start), None);
    let reader = std::thread::spawn(move || {
        let mut events = 0;
        loop {
            match slow.next() {
                Some(ev) if ev.event == "change" => events += 1,
                other => return (events, other, slow.next()),
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    assert!(eventually(|| metric(&server.get("/metrics").1, "kiln_sse_clients") == Some(32.0)));
    // The same test id again and again: the board keeps its first result
    // only, so what memory does beyond that is what the events cost.
    let message = "x".repeat(8 * 1024);
    let before = rss();
    let clock = std::time::Instant::now();
    let n = 50_000u64;
    let mut half = 0;
    for i in 0..n {
        server.test_result("tests.test_a.T.test_same", &message);
        if i % 1024 == 0 {
            // Let the dashboard's follower keep up, as a real core's pace would.
            let seq = server.seq.load(Ordering::SeqCst);
            assert!(eventually(|| server.applied() + 2048 >= seq));
        }
        if i == n / 2 {
            half = rss();
        }
    }
    let last = server.seq.load(Ordering::SeqCst);
    assert!(eventually(|| server.applied() == last));
    let after = rss();
    let ring = metric(&server.get("/metrics").1, "kiln_events_ring_bytes").unwrap();
    let encoded = n * (2048 + 250);
    eprintln!(
        "{n} events (about {} MiB encoded) to 32 slow clients in {:.1?}: RSS {} MiB before, {} MiB halfway, {} MiB \
         after; ring {} KiB",
        encoded >> 20,
        clock.elapsed(),
        before >> 20,
        half >> 20,
        after >> 20,
        ring as u64 >> 10
    );
    assert!(ring <= kiln_web::board::RING_BYTES as f64, "{ring}");
    // What the clients hold is bounded, not proportional to what went by:
    // the second half of the events costs (almost) nothing more…
    assert!(after.saturating_sub(half) < 8 << 20, "RSS grew {} MiB in the second half", (after - half) >> 20);
    // …and the whole is at most the ring plus about 1 MiB per client.
    let bound = (kiln_web::board::RING_BYTES as u64) + (32 << 20) + (8 << 20);
    assert!(after.saturating_sub(before) < bound, "RSS grew {} MiB", (after - before) >> 20);
    let clock = std::time::Instant::now();
    let (events, end, then) = reader.join().unwrap();
    eprintln!("waited {:.1?} for the slow reader", clock.elapsed());
    eprintln!("the slow reader got {events} events, then {end:?}");
    assert_eq!(end.map(|e| e.event), Some("reload".to_owned()), "after {events} events");
    assert_eq!(then, None, "closed after reload");
    assert!(events < n, "it could not have kept up");
    drop(stuck);
}

#[test]
fn the_commit_document_and_pages_escape_what_tests_print() {
    let server = Server::start();
    server.wait_applied(1);
    let hostile = "<script>window.pwned=1</script></textarea>\"'><img src=x onerror=alert(1)> ]]> \u{1b}[31mred\u{1b}[0m \u{fffd}";
    let seq = server.test_result("tests.test_a.T.test_<b>", hostile);
    assert!(eventually(|| server.page_seq() >= seq));
    let (status, body) = server.get(&format!("/commits/{}", commit(1)));
    assert_eq!(status, 200);
    assert!(!body.contains("<script>window"), "{body}");
    assert!(!body.contains("<img"), "{body}");
    assert!(!body.contains("<b>"));
    assert!(!body.contains('\u{1b}'));
    assert!(body.contains("&lt;script&gt;window.pwned=1&lt;/script&gt;&lt;/textarea&gt;&quot;'&gt;&lt;img"), "{body}");
    assert!(body.contains("red"));
    let (status, json) = server.get(&format!("/api/v1/commits/{}", commit(1)));
    assert_eq!(status, 200);
    let doc: kiln_proto::CommitReport = serde_json::from_str(&json).unwrap();
    assert_eq!(doc.tests[0].message, hostile);
    let by_id: BTreeMap<String, String> = doc.tests.iter().map(|t| (t.id.clone(), t.message.clone())).collect();
    assert_eq!(by_id.len(), 1);
}

#[test]
fn every_response_carries_the_policy() {
    let server = Server::start();
    for path in ["/", "/runners", "/queue", "/api/v1/commits", "/metrics", "/nope", "/assets/live.js"] {
        let mut s = TcpStream::connect(&server.addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let head = raw.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(head.contains(&format!("content-security-policy: {}", kiln_web::CSP)), "{path}: {head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{path}");
    }
    let _ = &server.rt;
}

/// Unix ms now.
fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A test id with every character a route or a page could trip on.
const HOSTILE_ID: &str = "a/b c\"<script>window.pwned=1</script>?#%::x";
/// [`HOSTILE_ID`] as links carry it: percent-encoded whole.
const HOSTILE_PATH: &str = "a%2Fb%20c%22%3Cscript%3Ewindow.pwned%3D1%3C%2Fscript%3E%3F%23%25%3A%3Ax";

/// Commit 1 fails the hostile test; commit 2, queued now, passes it on a
/// second run after a failure (flaky).
fn two_runs(server: &Server) {
    let run = |outcome, message: &str| {
        TestResult::new(HOSTILE_ID.into(), "tests/test_a.py".into(), outcome, 7, message.into())
    };
    let now = now_ms();
    let mut first = row(1, CommitStatus::Failed);
    first.queued_at_ms = now - 1000;
    let mut second = row(2, CommitStatus::Passed);
    second.queued_at_ms = now;
    let mut flaky = run(Outcome::Fail, "AssertionError: <img src=x onerror=window.pwned=2>");
    flaky.merge_run(run(Outcome::Pass, ""));
    assert!(flaky.flaky);
    server.publish(vec![Change::Test { commit: commit(1), result: run(Outcome::Fail, "boom") }, Change::Commit(first)]);
    let seq = server.publish(vec![Change::Commit(second), Change::Test { commit: commit(2), result: flaky }]);
    server.wait_applied(seq);
}

#[test]
fn a_hostile_test_id_is_linked_routed_and_escaped_on_its_history_page() {
    let server = Server::start();
    two_runs(&server);
    // The commit page links the id percent-encoded whole.
    let (_, body) = server.get(&format!("/commits/{}", commit(1)));
    assert!(body.contains(&format!("href=\"/tests/{HOSTILE_PATH}\"")), "{body}");

    // Encoded, and with its slash typed as is: the same page.
    let literal = HOSTILE_PATH.replacen("%2F", "/", 1);
    for path in [format!("/tests/{HOSTILE_PATH}"), format!("/tests/{literal}")] {
        let (status, body) = server.get(&path);
        assert_eq!(status, 200, "{path}: {body}");
        assert!(body.contains("a/b c&quot;&lt;script&gt;window.pwned=1&lt;/script&gt;?#%::x"), "{body}");
        assert!(!body.contains("<script>window"), "{body}");
        // Newest first: the flaky pass (a fix, since the run before failed), then the failure.
        let outcomes: Vec<&str> =
            body.match_indices("data-outcome=\"").map(|(i, m)| &body[i + m.len()..i + m.len() + 4]).collect();
        assert_eq!(outcomes, ["pass", "fail"], "{body}");
        assert!(body.contains("<span class=\"transition\">fixed</span>"), "{body}");
        assert!(body.contains("flaky (2 runs)"), "{body}");
        assert!(body.contains("class=\"flaky badge\""), "the flaky badge: {body}");
        assert!(body.contains(&format!("href=\"/commits/{}#t-", commit(2))), "{body}");
    }
    let (status, json) = server.get(&format!("/api/v1/tests/{HOSTILE_PATH}/history"));
    assert_eq!(status, 200, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["test"], HOSTILE_ID);
    let runs: Vec<(String, &str, bool, bool)> = v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let c = r["commit"].as_str().unwrap().to_owned();
            (c, r["outcome"].as_str().unwrap(), r["flaky"].as_bool().unwrap(), r["transition"].as_bool().unwrap())
        })
        .collect();
    assert_eq!(runs, [(commit(2).to_string(), "pass", true, true), (commit(1).to_string(), "fail", false, false)]);
    assert_eq!(v["flaky"]["commits"], serde_json::json!([commit(2).to_string()]));
    assert_eq!(v["flaky"]["seen"], 2);
    // Bad requests say what is wrong.
    let (status, json) = server.get(&format!("/api/v1/tests/{HOSTILE_PATH}/history?limit=0"));
    assert_eq!((status, json.as_str()), (400, r#"{"error":"limit must be a whole number from 1 to 100, not \"0\""}"#));
    assert_eq!(server.get(&format!("/api/v1/tests/{HOSTILE_PATH}")).0, 404);
    let (status, json) = server.get("/api/v1/tests/nobody-ran-this/history");
    assert_eq!(status, 200);
    assert_eq!(json, r#"{"test":"nobody-ran-this","repo":null,"runs":[],"flaky":null}"#);
}

#[test]
fn the_flaky_page_lists_a_test_that_failed_and_passed_on_one_commit() {
    let server = Server::start();
    two_runs(&server);
    let (status, body) = server.get("/flaky");
    assert_eq!(status, 200);
    assert!(
        body.contains("1 test both failed and passed on the same commit, or on the same code, in the last 14 days."),
        "{body}"
    );
    assert!(body.contains(&format!("href=\"/tests/{HOSTILE_PATH}?repo=repo\"")), "{body}");
    assert!(body.contains("failed and passed on the same commit: 1 of the 2 commits that ran it"), "{body}");
    assert!(body.contains("AssertionError: &lt;img src=x onerror=window.pwned=2&gt;"), "{body}");
    assert!(!body.contains("<img") && !body.contains("<script>window"), "{body}");
    assert!(body.contains("<a class=\"current\" href=\"/flaky\">Flaky</a>"), "the nav link: {body}");
    let (status, json) = server.get("/api/v1/flaky?days=1");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["days"], 1);
    assert_eq!(v["tests"][0]["id"], HOSTILE_ID);
    assert_eq!(v["tests"][0]["sample"], "AssertionError: <img src=x onerror=window.pwned=2>");
    for bad in ["0", "abc", "3651"] {
        let (status, json) = server.get(&format!("/api/v1/flaky?days={bad}"));
        assert_eq!(status, 400, "{bad}");
        assert!(json.contains("days must be a whole number from 1 to 3650"), "{json}");
    }
    assert_eq!(server.get("/flaky?days=abc").0, 400);
    // A change of the board is seen at once: the list is reused only while nothing changed.
    assert!(server.get("/flaky").1.contains("1 test both failed and passed"));
    let mut again = TestResult::new("t.other".into(), "tests/test_b.py".into(), Outcome::Fail, 1, "x".into());
    again.merge_run(TestResult::new("t.other".into(), "tests/test_b.py".into(), Outcome::Pass, 1, String::new()));
    let seq = server.publish(vec![Change::Test { commit: commit(2), result: again }]);
    server.wait_applied(seq);
    let (_, body) = server.get("/flaky");
    assert!(body.contains("2 tests both failed and passed"), "{body}");
}

#[test]
fn a_test_that_flipped_on_one_tree_is_shown_flaky_with_both_commits() {
    let server = Server::start();
    let tree: CommitId = "4b825dc642cb6eb9a060e54bf8d69288fbee4904".parse().unwrap();
    let run = |outcome| TestResult::new("t.flip".into(), "tests/test_a.py".into(), outcome, 7, "boom <b>".into());
    let now = now_ms();
    let mut failed = row(1, CommitStatus::Failed);
    let mut passed = row(2, CommitStatus::Passed);
    for (r, at) in [(&mut failed, now - 1000), (&mut passed, now)] {
        r.queued_at_ms = at;
        r.tree = Some(tree);
    }
    server.publish(vec![Change::Test { commit: commit(1), result: run(Outcome::Fail) }, Change::Commit(failed)]);
    let seq =
        server.publish(vec![Change::Commit(passed), Change::Test { commit: commit(2), result: run(Outcome::Pass) }]);
    server.wait_applied(seq);
    let (_, body) = server.get("/flaky");
    assert!(body.contains("passed and failed on the same code (another commit with the same tree): 1 tree"), "{body}");
    let flip = format!(
        "<li class=\"flip\" data-tree=\"{tree}\">tree <code>{}</code>: passed on <a href=\"/commits/{}#",
        tree.short(),
        commit(2)
    );
    assert!(body.contains(&flip), "{body}");
    assert!(body.contains("boom &lt;b&gt;"), "the failed commit's message: {body}");
    let (_, body) = server.get("/tests/t.flip");
    assert_eq!(body.matches("flipped on the same code</span>").count(), 2, "{body}");
    let (_, json) = server.get("/api/v1/flaky");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["tests"][0]["rules"], serde_json::json!(["same_tree"]));
    let flips = serde_json::json!([{"tree": tree.to_string(), "passed": commit(2).to_string(), "failed": commit(1).to_string()}]);
    assert_eq!(v["tests"][0]["flips"], flips);
}

#[test]
fn a_client_that_sends_its_request_head_a_byte_at_a_time_is_cut_off() {
    let server = Server::start_with(Limits { head_timeout: Duration::from_secs(1), ..Limits::default() });
    let mut slow = TcpStream::connect(&server.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    write!(slow, "GET / HTTP/1.1\r\nHost: test\r\nX-Slow: ").unwrap();
    let started = std::time::Instant::now();
    // One byte every 100 ms for up to 5 s: a head that never ends.
    let mut answer = Vec::new();
    let closed_after = loop {
        if started.elapsed() > Duration::from_secs(5) {
            break None;
        }
        let mut buf = [0; 512];
        match slow.read(&mut buf) {
            Ok(0) => break Some(started.elapsed()),
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break Some(started.elapsed()),
        }
        if slow.write_all(b"a").is_err() {
            break Some(started.elapsed());
        }
    };
    let closed_after = closed_after.expect("the dashboard still waits for a head it has been sent for 5 s");
    assert!(closed_after >= Duration::from_millis(900), "closed before the head timeout: {closed_after:?}");
    assert!(!String::from_utf8_lossy(&answer).contains(" 200 "), "a page for half a request: {answer:?}");
    // Everyone else is still served.
    assert_eq!(server.get("/").0, 200);
}

#[test]
fn connections_beyond_the_cap_wait_until_one_closes() {
    let server = Server::start_with(Limits { head_timeout: Duration::from_secs(1), max_connections: 3 });
    // Served at once while there is room (Server::start's own request is done).
    let started = std::time::Instant::now();
    assert_eq!(server.get("/").0, 200);
    let at_once = started.elapsed();
    // Three clients that connect and send nothing take every place.
    let idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(&server.addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = std::time::Instant::now();
    assert_eq!(server.get("/").0, 200);
    let waited = started.elapsed();
    // Served once the head timeout closed an idle one, not before.
    assert!(waited >= Duration::from_millis(700), "served at once, beyond the cap: {waited:?} ({at_once:?} with room)");
    drop(idle);
}
