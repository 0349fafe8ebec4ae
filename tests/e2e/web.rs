//! The dashboard against a live cluster, in a real headless Chromium driven
//! through chromedriver (WebDriver, with fantoccini): pages update without
//! a reload, hostile test output runs no script, the JSON API gives the
//! document `kiln results` gives, and the event stream resumes exactly.
//!
//! Why WebDriver rather than the DevTools protocol: it is the W3C standard
//! a test reads plainly ("go to", "find", "execute", "screenshot"), Debian
//! ships the matching chromedriver with chromium, and fantoccini needs no
//! WebSocket client. Scripts the test runs through WebDriver are not bound
//! by the page's Content-Security-Policy, so they can observe the page
//! without weakening it. Screenshots go to `target/tmp/web-screenshots/`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::harness::{Cluster, Repo, eventually};

/// A test file that takes a while and fails with a message we look for,
/// and one that passes.
const SLOW_FAIL: &str = "import time\nimport unittest\n\n\nclass Slow(unittest.TestCase):\n    def test_waits_then_fails(self):\n        time.sleep(3)\n        self.assertEqual(2, 3, 'KILN-FAILURE-MARK the answer was wrong')\n";
const PASS: &str = "import unittest\n\n\nclass Fine(unittest.TestCase):\n    def test_fine(self):\n        pass\n";
/// A test whose output is hostile: markup, CDATA ends, colours, bad UTF-8.
const HOSTILE: &str = r#"import sys
import unittest


class Hostile(unittest.TestCase):
    def test_shout(self):
        sys.stdout.buffer.write(b"bytes \xff\xfe\xc3 not utf-8 \x1b[32mgreen\x1b[0m <script>window.kilnPwned=3</script>\n")
        sys.stdout.flush()
        self.fail('<script>window.kilnPwned=1</script></textarea><img src=x onerror="window.kilnPwned=2"> ]]> \x1b[31mRED\x1b[0m KILN-HOSTILE')
"#;

/// A chromedriver and a browser session, with a fresh profile.
struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver (apt-get install chromium chromium-driver; .ci/test does)");
        assert!(eventually(Duration::from_secs(20), || TcpStream::connect(("127.0.0.1", port)).is_ok()));
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-quic".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--window-size=1280,1000".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), json!({ "binary": "/usr/bin/chromium", "args": args }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a chromium session");
        Browser { driver, client: Some(client), _profile: profile }
    }

    fn c(&self) -> &Client {
        self.client.as_ref().unwrap()
    }

    /// Saves a screenshot of the current page as `name.png`.
    async fn screenshot(&self, name: &str) {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.c().screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.c().execute(script, args).await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(c) = self.client.take() {
            let _ = c.close().await;
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The dashboard's base URL, from the dispatcher's stdout.
pub(crate) fn dashboard(cluster: &Cluster) -> String {
    let path = cluster.dir.path().join("dispatcher-0.stdout");
    let mut url = None;
    assert!(eventually(Duration::from_secs(10), || {
        url = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("http ").map(str::to_owned)));
        url.is_some()
    }));
    url.unwrap().trim_end_matches('/').to_owned()
}

/// `GET url`: status and body, over a plain socket.
fn http_get(url: &str) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut s = TcpStream::connect(host).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[end + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
}

pub(crate) fn get_json(url: &str) -> Value {
    let (status, body) = http_get(url);
    assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{url} is not JSON ({e})"))
}

/// Waits (up to 90 s) until a browser-side expression holds.
async fn wait_js(b: &Browser, what: &str, script: &str, args: Vec<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = b.js(script, args.clone()).await;
        if v != Value::Null && v != Value::Bool(false) {
            return v;
        }
        assert!(Instant::now() < deadline, "never saw {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records, in the page, every status the commit's row shows, as it changes.
const WATCH_STATUS: &str = r#"
const commit = arguments[0];
window.kilnNoReload = true;
window.kilnSeen = [];
function look() {
  const el = document.querySelector('tr[data-commit="' + commit + '"] [data-status]');
  const s = el ? el.getAttribute('data-status') : null;
  if (s && window.kilnSeen[window.kilnSeen.length - 1] !== s) window.kilnSeen.push(s);
}
look();
new MutationObserver(look).observe(document.getElementById('live'), { childList: true, subtree: true, characterData: true });
return window.kilnSeen;
"#;

/// Reads SSE `change` events from `url` until one has id `last`; returns their ids.
fn read_events(url: &str, last: &str) -> Vec<String> {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    write!(w, "GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut ids = Vec::new();
    let mut event = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "the stream ended before {last}: {ids:?}");
        let l = line.trim_end();
        if let Some(e) = l.strip_prefix("event: ") {
            event = e.to_owned();
        } else if let Some(data) = l.strip_prefix("data: ") {
            assert_eq!(event, "change", "{data}");
            let v: Value = serde_json::from_str(data).unwrap();
            assert!(v["seq"].is_u64());
        } else if let Some(id) = l.strip_prefix("id: ") {
            ids.push(id.to_owned());
            if id == last {
                return ids;
            }
        }
    }
}

#[test]
fn the_dashboard_follows_a_commit_live_in_a_browser() {
    let mut cluster = Cluster::start_with(&["--http", "127.0.0.1:0"]);
    let base = dashboard(&cluster);
    let repo = Repo::new(
        cluster.dir.path(),
        &[("tests/__init__.py", ""), ("tests/test_slow.py", SLOW_FAIL), ("tests/test_fine.py", PASS)],
    );
    // No runner yet: the commit stays queued until the browser watches it.
    cluster.observer("observer", &repo.path, "200ms");
    let commit = repo.commit("a failing test");
    assert!(eventually(Duration::from_secs(60), || {
        let v = get_json(&format!("{base}/api/v1/commits"));
        v["commits"][0]["commit"] == commit.as_str() && v["commits"][0]["status"] == "queued"
    }));
    let queue = get_json(&format!("{base}/api/v1/queue"));
    assert_eq!(queue["queue"][0]["reason"], "no_runner", "{queue}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = Browser::start().await;
        b.c().goto(&format!("{base}/")).await.unwrap();
        let seen = b.js(WATCH_STATUS, vec![json!(commit.as_str())]).await;
        assert_eq!(seen, json!(["queued"]));
        b.screenshot("commits-queued").await;
        // Wait until the page follows the event stream, then bring the runners.
        wait_js(&b, "the live status", "return document.getElementById('live-status').textContent === 'live';", vec![])
            .await;
        b.c().goto(&format!("{base}/queue")).await.unwrap();
        let reason = b.c().find(Locator::Css("td.reason")).await.unwrap().text().await.unwrap();
        assert_eq!(reason, "no runner is connected");
        b.screenshot("queue").await;
        b.c().goto(&format!("{base}/")).await.unwrap();
        b.js(WATCH_STATUS, vec![json!(commit.as_str())]).await;
        wait_js(&b, "the live status", "return document.getElementById('live-status').textContent === 'live';", vec![])
            .await;
        cluster.runner("r1");
        cluster.runner("r2");
        let seen = wait_js(
            &b,
            "the commit fail",
            "return window.kilnSeen[window.kilnSeen.length - 1] === 'failed' && window.kilnSeen;",
            vec![],
        )
        .await;
        assert_eq!(seen, json!(["queued", "running", "failed"]), "every state, in the page as it was loaded");
        assert_eq!(b.js("return window.kilnNoReload === true;", vec![]).await, json!(true), "no reload");
        b.screenshot("commits").await;

        // The commit page: the failure's message, in full, first.
        b.c().goto(&format!("{base}/commits/{commit}")).await.unwrap();
        let first = b.c().find(Locator::Css("li.test")).await.unwrap();
        assert_eq!(first.attr("data-outcome").await.unwrap().as_deref(), Some("fail"));
        let message = first.find(Locator::Css("pre.message")).await.unwrap().text().await.unwrap();
        assert!(message.contains("KILN-FAILURE-MARK the answer was wrong"), "{message}");
        assert!(message.contains("AssertionError: 2 != 3"), "{message}");
        // Filtered to passes, it is gone.
        b.c().goto(&format!("{base}/commits/{commit}?outcome=pass")).await.unwrap();
        let ids: Vec<String> = {
            let mut out = Vec::new();
            for e in b.c().find_all(Locator::Css("code.test-id")).await.unwrap() {
                out.push(e.text().await.unwrap());
            }
            out
        };
        assert_eq!(ids, vec!["tests.test_fine.Fine.test_fine".to_owned()]);
        b.c().goto(&format!("{base}/commits/{commit}")).await.unwrap();
        b.screenshot("commit").await;

        // Both runners, by certificate name.
        b.c().goto(&format!("{base}/runners")).await.unwrap();
        let mut names = Vec::new();
        for e in b.c().find_all(Locator::Css("td.runner-name")).await.unwrap() {
            names.push(e.text().await.unwrap());
        }
        assert_eq!(names, vec!["r1".to_owned(), "r2".to_owned()]);
        b.screenshot("runners").await;
        b.stop().await;
    });

    // The API's document is `kiln results --format json`'s, byte for byte.
    let out = cluster.admin(&["results", commit.as_str(), "--format", "json"]);
    let (status, api) = http_get(&format!("{base}/api/v1/commits/{commit}"));
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8_lossy(&api), String::from_utf8_lossy(&out.stdout));
    let page = get_json(&format!("{base}/api/v1/commits?status=failed&branch=main"));
    assert_eq!(page["commits"].as_array().unwrap().len(), 1);
    assert_eq!(get_json(&format!("{base}/api/v1/commits?status=passed"))["commits"], json!([]));
    let runners = get_json(&format!("{base}/api/v1/runners"));
    assert_eq!(runners["runners"].as_array().unwrap().len(), 2, "{runners}");

    // The event stream, from its start, then resumed from its middle: the
    // same events, none lost, none repeated.
    let metrics = String::from_utf8(http_get(&format!("{base}/metrics")).1).unwrap();
    let last: u64 = metrics.lines().find_map(|l| l.strip_prefix("kiln_events_last_seq ")).unwrap().parse().unwrap();
    assert!(metrics.contains("kiln_commits{status=\"failed\"} 1"), "{metrics}");
    assert!(metrics.contains("kiln_test_results{outcome=\"fail\"} 1"), "{metrics}");
    assert!(metrics.contains("kiln_runners_connected 2"), "{metrics}");
    let (status, body) = http_get(&format!("{base}/"));
    assert_eq!(status, 200);
    let body = String::from_utf8(body).unwrap();
    let id = &body[body.find("data-seq=\"").unwrap() + 10..];
    let boot = id[..id.find('-').unwrap()].to_owned();
    let all = read_events(&format!("{base}/api/v1/events?after={boot}-0"), &format!("{boot}-{last}"));
    let expected: Vec<String> = (1..=last).map(|s| format!("{boot}-{s}")).collect();
    assert_eq!(all, expected);
    let middle = &all[all.len() / 2];
    let rest = read_events(&format!("{base}/api/v1/events?after={middle}"), &format!("{boot}-{last}"));
    assert_eq!(rest, all[all.len() / 2 + 1..].to_vec());
}

#[test]
fn hostile_output_runs_no_script_and_stays_text() {
    let mut cluster = Cluster::start_with(&["--http", "127.0.0.1:0"]);
    let base = dashboard(&cluster);
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_hostile.py", HOSTILE)]);
    cluster.runner("r1");
    cluster.observer("observer", &repo.path, "200ms");
    let commit = repo.commit("hostile output");
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, kiln_proto::CommitStatus::Failed);

    // The JSON is valid (get_json parses it) and carries the text as it was.
    let doc = get_json(&format!("{base}/api/v1/commits/{commit}"));
    let message = doc["tests"][0]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("<script>window.kilnPwned=1</script>"), "{message}");
    assert!(message.contains("]]>"));

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let b = Browser::start().await;
        b.c().goto(&format!("{base}/commits/{commit}")).await.unwrap();
        wait_js(&b, "the page loaded", "return document.readyState === 'complete';", vec![]).await;
        // No injected script ran, inline or as an event handler.
        assert_eq!(b.js("return typeof window.kilnPwned;", vec![]).await, json!("undefined"));
        // The markup is text: no element came from it.
        let injected = "return document.querySelectorAll('main script, main img, main textarea').length;";
        assert_eq!(b.js(injected, vec![]).await, json!(0));
        let text = b.c().find(Locator::Css("pre.message")).await.unwrap().text().await.unwrap();
        assert!(text.contains("<script>window.kilnPwned=1</script></textarea><img src=x"), "{text}");
        assert!(text.contains("]]>"), "{text}");
        // Colour codes are gone (the escape character and its sequence), the
        // words they coloured stay; the source line quoting them is text.
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("AssertionError: <script>window.kilnPwned=1</script>"), "{text}");
        assert!(text.contains("]]> RED KILN-HOSTILE"), "{text}");
        assert!(text.contains("not utf-8 green <script>window.kilnPwned=3</script>"), "{text}");
        b.screenshot("hostile").await;
        // The front page, where the same commit is listed, ran nothing either.
        b.c().goto(&format!("{base}/")).await.unwrap();
        assert_eq!(b.js("return typeof window.kilnPwned;", vec![]).await, json!("undefined"));
        b.stop().await;
    });
    // The API's document is `kiln results --format json`'s.
    let out = cluster.admin(&["results", commit.as_str(), "--format", "json"]);
    assert_eq!(http_get(&format!("{base}/api/v1/commits/{commit}")).1, out.stdout);
}

#[test]
fn a_non_loopback_dashboard_is_refused_in_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = crate::harness::kiln().args(["certs", "init", "--dir"]).arg(&certs).output().unwrap();
    assert!(out.status.success());
    let mut child = crate::harness::kiln()
        .arg("dispatcher")
        .arg("--identity")
        .arg(certs.join("dispatcher"))
        .args(["--listen", "127.0.0.1:0", "--http", "0.0.0.0:0", "--state"])
        .arg(dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A dispatcher that accepted the address would serve until stopped.
    let exited = eventually(Duration::from_secs(20), || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(exited, "the dispatcher started with a non-loopback dashboard");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "error: refusing to serve the dashboard on 0.0.0.0:0: a non-loopback address needs HTTPS with a client \
             certificate, so add --https (clients then present a certificate from `kiln certs issue`) or use a \
             loopback address such as 127.0.0.1:7780\n"
        ),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "nothing started");
}

/// A test that fails until the next commit fixes it.
const FLIP_FAILS: &str =
    "import unittest\n\n\nclass Flip(unittest.TestCase):\n    def test_flip(self):\n        self.assertEqual(1, 2)\n";
const FLIP_PASSES: &str =
    "import unittest\n\n\nclass Flip(unittest.TestCase):\n    def test_flip(self):\n        self.assertEqual(2, 2)\n";
/// A test whose id holds markup, quotes, spaces, `/` and `::`: unittest
/// takes any attribute name that starts with `test`.
const HOSTILE_ID_TEST: &str = r#"import unittest


class Ids(unittest.TestCase):
    pass


setattr(Ids, 'test_<script>window.kilnPwned=4</script> "q"/x::y', lambda self: None)
"#;
const HOSTILE_ID: &str = "tests.test_ids.Ids.test_<script>window.kilnPwned=4</script> \"q\"/x::y";

#[test]
fn a_test_history_shows_each_commit_and_a_hostile_id_reaches_its_page() {
    let mut cluster = Cluster::start_with(&["--http", "127.0.0.1:0"]);
    let base = dashboard(&cluster);
    let repo = Repo::new(
        cluster.dir.path(),
        &[("tests/__init__.py", ""), ("tests/test_flip.py", FLIP_FAILS), ("tests/test_ids.py", HOSTILE_ID_TEST)],
    );
    cluster.runner("r1");
    cluster.observer("observer", &repo.path, "200ms");
    let first = repo.commit("a failing test");
    assert_eq!(cluster.wait_for(&first).status, kiln_proto::CommitStatus::Failed);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let second = rt.block_on(async {
        let b = Browser::start().await;
        // The history of the test, open while the fix is tested: the new run
        // appears without a reload.
        b.c().goto(&format!("{base}/tests/tests.test_flip.Flip.test_flip")).await.unwrap();
        let rows = "return Array.from(document.querySelectorAll('table.history tr[data-outcome]')).map(e => e.getAttribute('data-outcome'));";
        assert_eq!(b.js(rows, vec![]).await, json!(["fail"]));
        wait_js(&b, "the live status", "return document.getElementById('live-status').textContent === 'live';", vec![])
            .await;
        b.js("window.kilnNoReload = true;", vec![]).await;
        repo.write(&[("tests/test_flip.py", FLIP_PASSES)]);
        let second = repo.commit("fixed");
        let report = cluster.wait_for(&second);
        assert_eq!(report.status, kiln_proto::CommitStatus::Passed, "{report:#?}");
        assert!(report.tests.iter().any(|t| t.id == HOSTILE_ID), "{report:#?}");
        let script = format!("const r = {}; return r.length === 2 && r;", rows.trim_start_matches("return ").trim_end_matches(';'));
        assert_eq!(wait_js(&b, "the fix on the open page", &script, vec![]).await, json!(["pass", "fail"]));
        assert_eq!(b.js("return window.kilnNoReload === true;", vec![]).await, json!(true), "no reload");
        // Newest first, the fix marked (read in one script: the live part may be replaced meanwhile).
        b.c().goto(&format!("{base}/tests/tests.test_flip.Flip.test_flip")).await.unwrap();
        let rows = b
            .js(
                "return Array.from(document.querySelectorAll('table.history tr[data-outcome]')).map(e => \
                 [e.getAttribute('data-commit'), e.getAttribute('data-outcome'), e.querySelector('td.notes').textContent.trim()]);",
                vec![],
            )
            .await;
        assert_eq!(rows, json!([[second.to_string(), "pass", "fixed"], [first.to_string(), "fail", ""]]));
        b.screenshot("test-history").await;
        // Each run links to its result on its commit's page.
        let link = b.c().find(Locator::Css("table.history tr[data-outcome=\"fail\"] a")).await.unwrap();
        link.click().await.unwrap();
        let at = b.js("return location.pathname + location.hash;", vec![]).await;
        let at = at.as_str().unwrap().to_owned();
        assert!(at.starts_with(&format!("/commits/{first}#t-")), "{at}");
        let anchor = at.split('#').nth(1).unwrap().to_owned();
        let outcome = b.js("return document.getElementById(arguments[0]).getAttribute('data-outcome');", vec![json!(anchor)]).await;
        assert_eq!(outcome, json!("fail"));

        // The hostile id: linked from the commit page, routed to its own page, shown as text.
        b.c().goto(&format!("{base}/commits/{second}")).await.unwrap();
        let mut target = None;
        for a in b.c().find_all(Locator::Css("a.test-link")).await.unwrap() {
            if a.text().await.unwrap() == HOSTILE_ID {
                target = Some(a);
            }
        }
        target.expect("a link for the hostile id").click().await.unwrap();
        wait_js(&b, "the test page", "return document.readyState === 'complete' && location.pathname.startsWith('/tests/');", vec![]).await;
        let shown = b.c().find(Locator::Css("h1 code.test-id")).await.unwrap().text().await.unwrap();
        assert_eq!(shown, HOSTILE_ID);
        let outcomes = b.js("return Array.from(document.querySelectorAll('tr[data-outcome]')).map(e => e.getAttribute('data-outcome'));", vec![]).await;
        assert_eq!(outcomes, json!(["pass", "pass"]), "both commits ran it");
        assert_eq!(b.js("return typeof window.kilnPwned;", vec![]).await, json!("undefined"));
        assert_eq!(b.js("return document.querySelectorAll('main script').length;", vec![]).await, json!(0));
        b.screenshot("test-history-hostile").await;
        b.c().goto(&format!("{base}/flaky")).await.unwrap();
        let text = b.c().find(Locator::Css("main p")).await.unwrap().text().await.unwrap();
        assert_eq!(text, "0 tests both failed and passed on the same commit, or on the same code, in the last 14 days.");
        b.screenshot("flaky").await;
        b.stop().await;
        second
    });
    // The JSON says the same as the page and as `kiln history`.
    let v = get_json(&format!("{base}/api/v1/tests/tests.test_flip.Flip.test_flip/history"));
    let out = cluster.admin(&["history", "tests.test_flip.Flip.test_flip", "--format", "json"]);
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["runs"], cli);
    assert_eq!(v["runs"][0]["commit"], second.as_str());
}
