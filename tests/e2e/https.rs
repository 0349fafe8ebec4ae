//! The dashboard over HTTPS with Kiln client certificates, and cancelling
//! over HTTP: a real dispatcher, certificates from `kiln certs`, and curl
//! (OpenSSL, another TLS stack than the dispatcher's) as the client.
//!
//! Reading needs any Kiln certificate; a client with none, or with one from
//! another CA, is refused at the handshake (and logged once). Cancelling
//! needs HTTPS, an admin certificate and a request no cross-site page could
//! send.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_proto::CommitStatus;
use serde_json::Value;

use crate::harness::{Cluster, Repo, eventually};

/// A test that runs until it is stopped (the commit stays `running`).
const FOREVER: &str = "import time\nimport unittest\n\n\nclass Forever(unittest.TestCase):\n    def test_waits(self):\n        time.sleep(600)\n";

/// What curl got: the HTTP status (`None` if no response came) and the body,
/// or curl's complaint.
struct Got {
    status: Option<u16>,
    body: String,
    stderr: String,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `curl URL` trusting `ca`, presenting the bundle `client` (if any), with `extra` arguments.
fn curl(ca: &Path, client: Option<&Path>, extra: &[&str], url: &str) -> Got {
    let mut cmd = Command::new("curl");
    cmd.args(["--silent", "--show-error", "--max-time", "30", "--write-out", "\n%{http_code}", "--cacert"]).arg(ca);
    if let Some(dir) = client {
        cmd.arg("--cert").arg(dir.join("cert.pem")).arg("--key").arg(dir.join("key.pem"));
    }
    let out = cmd.args(extra).arg(url).output().expect("run curl (apt-get install curl; .ci/test does)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", stdout.as_str()));
    let status = code.trim().parse().ok().filter(|&c| c != 0);
    Got { status, body: body.to_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// A POST of a cancel, with `headers`.
fn cancel(ca: &Path, client: Option<&Path>, headers: &[&str], url: &str) -> Got {
    let mut extra = vec!["--request", "POST"];
    for h in headers {
        extra.extend(["--header", h]);
    }
    curl(ca, client, &extra, url)
}

/// The dashboard's URL (`https://127.0.0.1:PORT`), whatever address it
/// bound (it prints the address it was given, `0.0.0.0` included).
fn dashboard(cluster: &Cluster) -> String {
    let url = crate::web::dashboard(cluster);
    let (scheme, rest) = url.split_once("://").unwrap();
    let port = rest.rsplit_once(':').unwrap().1;
    format!("{scheme}://127.0.0.1:{port}")
}

fn ca(cluster: &Cluster) -> PathBuf {
    cluster.certs().join("ca/ca.pem")
}

#[test]
fn an_https_dashboard_on_any_address_reads_with_any_kiln_certificate_and_refuses_the_rest() {
    // 0.0.0.0 is not loopback: with --https it is served (and reached here
    // through 127.0.0.1, which the dispatcher's certificate names).
    let cluster = Cluster::start_with(&["--http", "0.0.0.0:0", "--https"]);
    let stdout = std::fs::read_to_string(cluster.dir.path().join("dispatcher-0.stdout")).unwrap_or_default();
    let base = dashboard(&cluster);
    assert!(base.starts_with("https://"), "{base} ({stdout})");
    let ca = ca(&cluster);
    let runner = cluster.issue("runner", "r1");
    let observer = cluster.issue("observer", "o1");

    // Any Kiln certificate reads, pages and API alike.
    for who in [&runner, &observer, &cluster.certs().join("admin")] {
        let got = curl(&ca, Some(who), &[], &format!("{base}/api/v1/commits"));
        assert_eq!(got.status, Some(200), "{}: {}", who.display(), got.stderr);
        assert_eq!(got.json()["commits"], serde_json::json!([]));
    }
    let page = curl(&ca, Some(&runner), &[], &format!("{base}/"));
    assert_eq!(page.status, Some(200), "{}", page.stderr);
    assert!(page.body.contains("<title>Commits"), "{}", page.body);

    // No certificate: the handshake is refused with TLS 1.3's alert.
    let got = curl(&ca, None, &[], &format!("{base}/api/v1/commits"));
    assert_eq!(got.status, None, "answered without a certificate: {}", got.body);
    assert!(got.stderr.contains("alert certificate required"), "{}", got.stderr);

    // A certificate from another Kiln CA: refused too.
    let other = tempfile::tempdir().unwrap();
    let out = crate::harness::kiln().args(["certs", "init", "--dir"]).arg(other.path()).output().unwrap();
    assert!(out.status.success());
    let out = crate::harness::kiln().args(["certs", "issue", "admin", "admin", "--dir"]).arg(other.path()).output();
    assert!(out.unwrap().status.success());
    let got = curl(&ca, Some(&other.path().join("admin")), &[], &format!("{base}/api/v1/commits"));
    assert_eq!(got.status, None, "answered a stranger's certificate: {}", got.body);
    // Every Kiln CA has the same name, so webpki finds "the" issuer and its
    // signature does not verify: TLS says `decrypt_error` for that.
    assert!(got.stderr.contains("alert decrypt error"), "{}", got.stderr);

    // Plain HTTP on the HTTPS port gets no page either.
    let got = curl(&ca, None, &[], &format!("{}/", base.replacen("https://", "http://", 1)));
    assert_eq!(got.status, None, "plain HTTP was answered: {}", got.body);

    // Three failures from one address, one line; and the dispatcher serves on.
    let log = &cluster.procs[0];
    assert!(eventually(Duration::from_secs(10), || log.log().contains("dashboard TLS handshake failed")));
    let got = curl(&ca, Some(&runner), &[], &format!("{base}/api/v1/queue"));
    assert_eq!(got.status, Some(200), "{}", got.stderr);
    let lines: Vec<String> =
        log.log().lines().filter(|l| l.contains("dashboard TLS handshake failed")).map(str::to_owned).collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("the peer presented no certificate"), "{}", lines[0]);
}

#[test]
fn cancel_over_https_needs_an_admin_certificate_and_a_same_site_request() {
    let mut cluster = Cluster::start_with(&["--http", "127.0.0.1:0", "--https"]);
    let base = dashboard(&cluster);
    let ca = ca(&cluster);
    let admin = cluster.certs().join("admin");
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_forever.py", FOREVER)]);
    let commit = repo.commit("runs until stopped");
    cluster.runner("r1");
    let runner = cluster.certs().join("r1");
    cluster.observer("observer", &repo.path, "200ms");
    let doc = format!("{base}/api/v1/commits/{commit}");
    let status = |who: &Path| curl(&ca, Some(who), &[], &doc).json()["status"].as_str().map(str::to_owned);
    assert!(
        eventually(Duration::from_secs(90), || status(&runner).as_deref() == Some("running")),
        "{}",
        cluster.logs()
    );
    let url = format!("{base}/api/v1/commits/{}/cancel", &commit.as_str()[..12]);

    // A runner's certificate reads, but may not cancel.
    let got = cancel(&ca, Some(&runner), &["X-Kiln-Request: 1"], &url);
    assert_eq!(got.status, Some(403), "{}", got.body);
    assert_eq!(got.json()["error"], "runner r1 may not cancel commits: that needs the admin role");
    // An admin's certificate, sent by another site's page: refused.
    let evil = ["Origin: https://evil.example", "X-Kiln-Request: 1"];
    let got = cancel(&ca, Some(&admin), &evil, &url);
    assert_eq!(got.status, Some(403), "{}", got.body);
    let error = got.json()["error"].as_str().unwrap().to_owned();
    assert!(error.starts_with("refusing a cross-site request: its Origin \"https://evil.example\""), "{error}");
    // What a plain form could send: refused.
    let got = cancel(&ca, Some(&admin), &["Content-Type: application/x-www-form-urlencoded"], &url);
    assert_eq!(got.status, Some(403), "{}", got.body);
    assert!(got.json()["error"].as_str().unwrap().contains("`X-Kiln-Request`"), "{}", got.body);
    // Nothing was cancelled by any of them.
    assert_eq!(status(&admin).as_deref(), Some("running"));
    // An unknown commit.
    let got = cancel(&ca, Some(&admin), &["X-Kiln-Request: 1"], &format!("{base}/api/v1/commits/deadbeef/cancel"));
    assert_eq!(got.status, Some(404), "{}", got.body);

    // The admin, from this dashboard's own origin: cancelled, and shown so.
    let own = format!("Origin: {base}");
    let got = cancel(&ca, Some(&admin), &[own.as_str(), "Content-Type: application/json"], &url);
    assert_eq!(got.status, Some(200), "{}: {}", got.body, got.stderr);
    let answer = got.json();
    assert_eq!(answer["commit"], commit.as_str());
    assert_eq!(answer["cancelled"], true);
    assert_eq!(answer["status"], "cancelled");
    assert_eq!(status(&runner).as_deref(), Some("cancelled"));
    let report = cluster.wait_for(&commit);
    assert_eq!(report.status, CommitStatus::Cancelled);
    assert!(report.error.as_deref().unwrap_or_default().contains("cancelled by admin admin"), "{report:?}");
    // Again: nothing left to cancel.
    let got = cancel(&ca, Some(&admin), &["X-Kiln-Request: 1"], &url);
    assert_eq!(got.status, Some(200), "{}", got.body);
    assert_eq!(got.json()["cancelled"], false);
}

#[test]
fn cancel_over_plain_http_is_refused_with_what_it_needs() {
    let cluster = Cluster::start_with(&["--http", "127.0.0.1:0"]);
    let base = dashboard(&cluster);
    assert!(base.starts_with("http://"), "{base}");
    let ca = ca(&cluster);
    let repo = Repo::new(cluster.dir.path(), &[("tests/__init__.py", ""), ("tests/test_forever.py", FOREVER)]);
    let commit = repo.commit("queued, no runner");
    let mut cluster = cluster;
    cluster.observer("observer", &repo.path, "200ms");
    let doc = format!("{base}/api/v1/commits/{commit}");
    let status = || curl(&ca, None, &[], &doc).json()["status"].as_str().map(str::to_owned);
    assert!(eventually(Duration::from_secs(60), || status().as_deref() == Some("queued")), "{}", cluster.logs());

    let got = cancel(&ca, None, &["X-Kiln-Request: 1"], &format!("{base}/api/v1/commits/{commit}/cancel"));
    assert_eq!(got.status, Some(403), "{}", got.body);
    assert_eq!(
        got.json()["error"],
        "cancelling a commit needs HTTPS with an admin certificate: start the dispatcher with --https and present \
         a certificate made by `kiln certs issue admin NAME`"
    );
    assert_eq!(status().as_deref(), Some("queued"));
}
