//! Certificates outside their validity window and floods of failed
//! handshakes, over real QUIC on 127.0.0.1 with freshly made certificates:
//! what each side is told, word for word, and how much the dispatcher logs.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on any unexpected error")]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use kiln_net::certs::{self, Validity};
use kiln_net::validity::{Utc, Window, unix_now};
use kiln_net::{Bundle, EndpointError, HandshakeFailed, Listener, NetConfig, connect};
use kiln_proto::Role;
use kiln_proto::wire::ALPN;
use tokio::sync::mpsc;

const DAY: Duration = Duration::from_secs(86_400);

/// A window that ended yesterday.
fn expired() -> Validity {
    let now = SystemTime::now();
    Validity { not_before: now - 2 * DAY, not_after: now - DAY }
}

/// A window that starts tomorrow.
fn future() -> Validity {
    let now = SystemTime::now();
    Validity { not_before: now + DAY, not_after: now + 2 * DAY }
}

/// A listener on 127.0.0.1 whose every handshake outcome is sent to the returned channel.
fn serve(certs: &Path, cfg: NetConfig) -> (String, mpsc::UnboundedReceiver<Result<(), HandshakeFailed>>) {
    let bundle = Bundle::load(&certs.join("dispatcher")).unwrap();
    let listener = Listener::bind(&bundle, "127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(incoming) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let outcome = Listener::handshake(incoming).await.map(drop);
                let _ = tx.send(outcome);
            });
        }
    });
    (addr, rx)
}

/// Asserts `text` equals `expected` with `{now}` standing for this
/// machine's clock at some second in `before..=after`.
fn assert_with_clock(text: &str, expected: &str, before: i64, after: i64) {
    let matched = (before..=after).any(|now| text == expected.replace("{now}", &Utc(now).to_string()));
    assert!(matched, "got:      {text}\nexpected: {expected} (with {{now}} in {before}..={after})");
}

fn window(dir: &Path) -> (String, String) {
    let bundle = Bundle::load(dir).unwrap();
    let w = Window::of(&bundle.cert).unwrap();
    (Utc(w.not_before).to_string(), Utc(w.not_after).to_string())
}

async fn connect_error(bundle: &Bundle, addr: &str) -> String {
    match connect(bundle, addr, NetConfig::default()).await {
        Ok(_) => panic!("connected to a dispatcher whose certificate is out of date"),
        Err(e @ EndpointError::Rejected { .. }) => kiln_proto::error_chain(&e),
        Err(e) => panic!("not a rejection: {}", kiln_proto::error_chain(&e)),
    }
}

#[tokio::test]
async fn a_client_facing_an_expired_dispatcher_certificate_is_told_whose_and_when() {
    let dir = tempfile::tempdir().unwrap();
    certs::init_with(dir.path(), &["127.0.0.1".into()], expired()).unwrap();
    let runner = Bundle::load(&certs::issue(dir.path(), Role::Runner, "r1").unwrap()).unwrap();
    let (addr, _outcomes) = serve(dir.path(), NetConfig::default());
    let (nb, na) = window(&dir.path().join("dispatcher"));
    let before = unix_now();
    let err = connect_error(&runner, &addr).await;
    assert_with_clock(
        &err,
        &format!(
            "connect to the dispatcher at {addr}: the dispatcher's certificate expired at {na} (valid from {nb} to \
             {na}; this machine's clock says {{now}}); if this machine's clock is right, the dispatcher needs a new \
             certificate: make one with `kiln certs dispatcher` where the CA is"
        ),
        before,
        unix_now(),
    );
}

#[tokio::test]
async fn a_client_facing_a_dispatcher_certificate_from_the_future_is_pointed_at_the_clock() {
    let dir = tempfile::tempdir().unwrap();
    certs::init_with(dir.path(), &["127.0.0.1".into()], future()).unwrap();
    let admin = Bundle::load(&certs::issue(dir.path(), Role::Admin, "me").unwrap()).unwrap();
    let (addr, _outcomes) = serve(dir.path(), NetConfig::default());
    let (nb, na) = window(&dir.path().join("dispatcher"));
    let before = unix_now();
    let err = connect_error(&admin, &addr).await;
    assert_with_clock(
        &err,
        &format!(
            "connect to the dispatcher at {addr}: the dispatcher's certificate is not valid until {nb} (valid from \
             {nb} to {na}; this machine's clock says {{now}}); check this machine's clock; if it is right, the \
             dispatcher's certificate was made on a machine whose clock is ahead: make a new one with `kiln certs \
             dispatcher` where the CA is"
        ),
        before,
        unix_now(),
    );
}

#[tokio::test]
async fn a_client_with_an_expired_certificate_does_not_even_dial() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &["127.0.0.1".into()]).unwrap();
    let path = certs::issue_with(dir.path(), Role::Observer, "watcher", expired()).unwrap();
    let observer = Bundle::load(&path).unwrap();
    let (nb, na) = window(&path);
    let (addr, mut outcomes) = serve(dir.path(), NetConfig::default());
    let before = unix_now();
    let err = connect_error(&observer, &addr).await;
    assert_with_clock(
        &err,
        &format!(
            "connect to the dispatcher at {addr}: this observer's certificate (watcher, {}) expired at {na} (valid \
             from {nb} to {na}; this machine's clock says {{now}}); issue a new one with `kiln certs issue observer \
             watcher`",
            path.join("cert.pem").display()
        ),
        before,
        unix_now(),
    );
    // Nothing reached the dispatcher.
    assert!(tokio::time::timeout(Duration::from_millis(300), outcomes.recv()).await.is_err());
}

/// A quinn client with the bundle's CA as root, presenting `cert` if given,
/// and none of Kiln's own checks: a hostile or broken peer.
fn raw_client(roots_from: &Bundle, cert: Option<&Bundle>) -> quinn::Endpoint {
    raw_client_speaking(roots_from, cert, ALPN)
}

/// [`raw_client`], offering only the protocol version `alpn`.
fn raw_client_speaking(roots_from: &Bundle, cert: Option<&Bundle>, alpn: &[u8]) -> quinn::Endpoint {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(roots_from.ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut crypto = match cert {
        Some(b) => builder.with_client_auth_cert(vec![b.cert.clone()], b.key.clone_key()).unwrap(),
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![alpn.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap()));
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    endpoint
}

/// Connects and opens a stream; returns how the connection ended.
async fn raw_attempt(endpoint: &quinn::Endpoint, addr: &str) -> String {
    let conn = match endpoint.connect(addr.parse().unwrap(), "127.0.0.1").unwrap().await {
        Ok(conn) => conn,
        Err(e) => return format!("{e}"),
    };
    // The refusal of a client certificate arrives after the client's side of the handshake.
    let _ = conn.open_bi().await;
    let e = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.unwrap();
    format!("{e}")
}

#[tokio::test]
async fn the_dispatcher_names_an_expired_client_certificate_and_the_client_hears_certificate_expired() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &["127.0.0.1".into()]).unwrap();
    let path = certs::issue_with(dir.path(), Role::Runner, "old", expired()).unwrap();
    let old = Bundle::load(&path).unwrap();
    let (nb, na) = window(&path);
    let (addr, mut outcomes) = serve(dir.path(), NetConfig::default());
    let before = unix_now();
    let client_saw = raw_attempt(&raw_client(&old, Some(&old)), &addr).await;
    // TLS alert 45 (certificate_expired) travels as QUIC crypto error 0x12d:
    // that is what lets a Kiln client look at its own certificate's dates.
    assert!(client_saw.contains("error 45: invalid peer certificate: certificate expired"), "{client_saw}");
    let failed = outcomes.recv().await.unwrap().unwrap_err();
    assert_with_clock(
        &failed.log_line().unwrap(),
        &format!(
            "the client's certificate (O=Kiln, OU=runner, CN=old) expired at {na} (valid from {nb} to {na}; this \
             machine's clock says {{now}})"
        ),
        before,
        unix_now(),
    );
}

#[tokio::test]
async fn a_flood_of_failed_handshakes_from_one_address_is_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &["127.0.0.1".into()]).unwrap();
    let admin = Bundle::load(&certs::issue(dir.path(), Role::Admin, "a").unwrap()).unwrap();
    let (addr, mut outcomes) = serve(dir.path(), NetConfig::default());
    // 200 attempts without a client certificate, 20 at a time.
    let endpoint = raw_client(&admin, None);
    for _ in 0..10 {
        let attempts = (0..20).map(|_| {
            let (endpoint, addr) = (endpoint.clone(), addr.clone());
            async move { raw_attempt(&endpoint, &addr).await }
        });
        for seen in futures_join_all(attempts).await {
            assert!(seen.contains("error 116: peer sent no certificates"), "{seen}");
        }
    }
    let mut lines = Vec::new();
    for _ in 0..200 {
        let failed =
            tokio::time::timeout(Duration::from_secs(10), outcomes.recv()).await.unwrap().unwrap().unwrap_err();
        lines.extend(failed.log_line());
    }
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].starts_with("the handshake did not complete: "), "{}", lines[0]);
    assert!(lines[0].contains("peer sent no certificates"), "{}", lines[0]);
}

#[tokio::test]
async fn after_the_interval_the_next_line_counts_the_failures_in_between() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &["127.0.0.1".into()]).unwrap();
    let admin = Bundle::load(&certs::issue(dir.path(), Role::Admin, "a").unwrap()).unwrap();
    let interval = Duration::from_secs(2);
    let (addr, mut outcomes) =
        serve(dir.path(), NetConfig { handshake_log_interval: interval, ..NetConfig::default() });
    let endpoint = raw_client(&admin, None);
    let started = tokio::time::Instant::now();
    let mut reports = Vec::new();
    let mut first_seen = None;
    for _ in 0..5 {
        raw_attempt(&endpoint, &addr).await;
        reports.push(outcomes.recv().await.unwrap().unwrap_err().report);
        // The listener counted the first failure before this moment.
        first_seen.get_or_insert_with(tokio::time::Instant::now);
    }
    // All five fell inside the interval that began with the first.
    assert!(started.elapsed() < interval, "five handshakes took {:?}", started.elapsed());
    // Time itself is what is tested here: wait the interval out.
    tokio::time::sleep_until(first_seen.unwrap() + interval).await;
    raw_attempt(&endpoint, &addr).await;
    let last = outcomes.recv().await.unwrap().unwrap_err();
    reports.push(last.report);
    assert_eq!(reports, [Some(0), None, None, None, None, Some(4)]);
    let line = last.log_line().unwrap();
    assert!(line.ends_with(" (4 more failed handshakes from 127.0.0.1 since the last line)"), "{line}");
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F: Future<Output = String> + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<String> {
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_kiln_1_client_is_refused_and_both_sides_hear_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &["127.0.0.1".into()]).unwrap();
    let runner = Bundle::load(&certs::issue(dir.path(), Role::Runner, "old-runner").unwrap()).unwrap();
    let (addr, mut outcomes) = serve(dir.path(), NetConfig::default());
    let client_saw = raw_attempt(&raw_client_speaking(&runner, Some(&runner), b"kiln/1"), &addr).await;
    assert!(
        client_saw.contains("this dispatcher speaks kiln/3 and this client kiln/1: run the same Kiln version"),
        "{client_saw}"
    );
    let failed = outcomes.recv().await.unwrap().unwrap_err();
    assert_eq!(
        failed.log_line().unwrap(),
        "the peer speaks kiln/1 and this dispatcher kiln/3: run the same Kiln version on both sides"
    );
    // One that speaks this version is served.
    raw_attempt(&raw_client(&runner, Some(&runner)), &addr).await;
    assert!(outcomes.recv().await.unwrap().is_ok());
}

#[tokio::test]
async fn a_peer_that_trickles_a_frame_is_cut_off_at_the_frame_timeout() {
    let dir = tempfile::tempdir().unwrap();
    certs::init(dir.path(), &["127.0.0.1".into()]).unwrap();
    let runner = Bundle::load(&certs::issue(dir.path(), Role::Runner, "slow").unwrap()).unwrap();
    let bundle = Bundle::load(&dir.path().join("dispatcher")).unwrap();
    let cfg = NetConfig { frame_timeout: Duration::from_millis(500), ..NetConfig::default() };
    let listener = Listener::bind(&bundle, "127.0.0.1:0".parse().unwrap(), cfg).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        let conn = Listener::handshake(listener.accept().await.unwrap()).await.unwrap();
        let (_send, mut recv) = conn.accept().await.unwrap();
        let started = std::time::Instant::now();
        let outcome = recv.expect::<kiln_proto::wire::Request>().await.map(drop);
        (outcome, started.elapsed())
    });
    let endpoint = raw_client(&runner, Some(&runner));
    let conn = endpoint.connect(addr.parse().unwrap(), "127.0.0.1").unwrap().await.unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    // A frame announcing 100 bytes, then one byte every 100 ms (10 s in all).
    send.write_all(&[0, 0, 0, 100]).await.unwrap();
    let trickle = tokio::spawn(async move {
        for _ in 0..100 {
            if send.write_all(&[1]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (outcome, took) = tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
    let error = outcome.unwrap_err();
    assert!(matches!(error, kiln_net::FramedError::TooSlow { .. }), "{error:?}");
    assert!(error.is_protocol_violation());
    assert!(took < Duration::from_secs(3), "cut off after {took:?}");
    trickle.abort();
}
