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
        let listener = rt.block_on(kiln_web::bind("127.0.0.1:0".parse().unwrap())).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        rt.spawn(kiln_web::serve(listener, api, shutdown.clone()));
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
