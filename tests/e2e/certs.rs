//! Certificates outside their validity window, and handshake floods, with
//! the real processes: the exact sentence each command prints, its exit code,
//! and how many lines a flood costs the dispatcher's log.

use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use kiln_net::certs::Validity;
use kiln_net::validity::{Utc, Window, unix_now};
use kiln_proto::Role;

use crate::harness::{Cluster, eventually, kiln};

const DAY: Duration = Duration::from_secs(86_400);

fn expired() -> Validity {
    let now = SystemTime::now();
    Validity { not_before: now - 30 * DAY, not_after: now - DAY }
}

fn future() -> Validity {
    let now = SystemTime::now();
    Validity { not_before: now + DAY, not_after: now + 30 * DAY }
}

/// The certificate file's window, as messages show it.
fn window(cert_dir: &Path) -> (String, String) {
    let bundle = kiln_net::Bundle::load(cert_dir).unwrap();
    let w = Window::of(&bundle.cert).unwrap();
    (Utc(w.not_before).to_string(), Utc(w.not_after).to_string())
}

/// The `error: …` line of a command's stderr.
fn error_line(stderr: &str) -> &str {
    stderr.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line in:\n{stderr}"))
}

/// Asserts `line` is `expected` with `{now}` one of the seconds in `before..=after`.
fn assert_with_clock(line: &str, expected: &str, before: i64, after: i64) {
    let matched = (before..=after).any(|now| line == expected.replace("{now}", &Utc(now).to_string()));
    assert!(matched, "got:      {line}\nexpected: {expected} (with {{now}} in {before}..={after})");
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn a_runner_with_an_expired_certificate_exits_2_saying_whose_when_and_what_to_do() {
    let mut cluster = Cluster::start();
    let bundle = kiln_net::certs::issue_with(&cluster.certs(), Role::Runner, "old-runner", expired()).unwrap();
    let (nb, na) = window(&bundle);
    let before = unix_now();
    let i = cluster.runner("old-runner");
    let status = wait_exit(&mut cluster.procs[i].child, Duration::from_secs(60));
    let after = unix_now();
    let log = cluster.procs[i].log();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{log}");
    assert_with_clock(
        error_line(&log),
        &format!(
            "error: connect to the dispatcher at {}: this runner's certificate (old-runner, {}) expired at {na} \
             (valid from {nb} to {na}; this machine's clock says {{now}}); issue a new one with `kiln certs issue \
             runner old-runner`",
            cluster.addr,
            bundle.join("cert.pem").display()
        ),
        before,
        after,
    );
    assert!(!cluster.procs[0].log().contains("runner registered"), "{}", cluster.logs());
}

#[test]
fn an_admin_with_a_certificate_from_the_future_exits_2_pointing_at_the_clock() {
    let cluster = Cluster::start();
    let bundle = kiln_net::certs::issue_with(&cluster.certs(), Role::Admin, "early", future()).unwrap();
    let (nb, na) = window(&bundle);
    let before = unix_now();
    let out = kiln().args(["results", "--dispatcher", &cluster.addr, "--identity"]).arg(&bundle).output().unwrap();
    let after = unix_now();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_with_clock(
        error_line(&stderr),
        &format!(
            "error: connect to the dispatcher at {}: this admin's certificate (early, {}) is not valid until {nb} \
             (valid from {nb} to {na}; this machine's clock says {{now}}); check this machine's clock; if it is \
             right, the certificate was made on a machine whose clock is ahead: issue a new one with `kiln certs \
             issue admin early` there once its clock is right",
            cluster.addr,
            bundle.join("cert.pem").display()
        ),
        before,
        after,
    );
}

#[test]
fn a_dispatcher_with_an_expired_certificate_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    kiln_net::certs::init_with(&certs, &["127.0.0.1".into()], expired()).unwrap();
    let identity = certs.join("dispatcher");
    let (nb, na) = window(&identity);
    let before = unix_now();
    let mut child = kiln()
        .args(["dispatcher", "--listen", "127.0.0.1:0", "--identity"])
        .arg(&identity)
        .arg("--state")
        .arg(dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let after = unix_now();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.and_then(|s| s.code()), Some(2), "the dispatcher started: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "it must not say it is listening");
    assert_with_clock(
        error_line(&stderr),
        &format!(
            "error: the dispatcher cannot start: the dispatcher's certificate {cert} expired at {na} (valid from {nb} \
             to {na}; this machine's clock says {{now}}); if this machine's clock is right, move {dir} away and make \
             a new one with `kiln certs dispatcher` where the CA is",
            cert = identity.join("cert.pem").display(),
            dir = identity.display()
        ),
        before,
        after,
    );
}

#[test]
fn a_new_dispatcher_certificate_from_the_same_ca_is_trusted_by_existing_clients() {
    let mut cluster = Cluster::start();
    // Replace the dispatcher's bundle with a fresh one from the same CA and restart on it.
    std::fs::rename(cluster.certs().join("dispatcher"), cluster.dir.path().join("old-dispatcher")).unwrap();
    let out = kiln().args(["certs", "dispatcher", "--valid-days", "1", "--dir"]).arg(cluster.certs()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cluster.restart_dispatcher();
    let out = cluster.admin(&["results"]);
    // The admin bundle made before the renewal still connects: "no commits yet" is the dispatcher's answer.
    assert!(String::from_utf8_lossy(&out.stderr).contains("the dispatcher has no commits yet"), "{out:?}");
}

#[test]
fn a_handshake_flood_from_one_address_costs_the_dispatcher_one_log_line() {
    let cluster = Cluster::start();
    // A bundle from another CA: every handshake fails.
    let other = tempfile::tempdir().unwrap();
    kiln_net::certs::init(other.path(), &[]).unwrap();
    let intruder = kiln_net::Bundle::load(&kiln_net::certs::issue(other.path(), Role::Runner, "x").unwrap()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let addr = cluster.addr.clone();
    let refused = runtime.block_on(async move {
        let intruder = std::sync::Arc::new(intruder);
        let mut refused = 0;
        for _ in 0..10 {
            let mut batch = tokio::task::JoinSet::new();
            for _ in 0..20 {
                let (intruder, addr) = (intruder.clone(), addr.clone());
                batch.spawn(async move { kiln_net::connect(&intruder, &addr, kiln_net::NetConfig::default()).await });
            }
            while let Some(result) = batch.join_next().await {
                if matches!(result.unwrap(), Err(kiln_net::EndpointError::Rejected { .. })) {
                    refused += 1;
                }
            }
        }
        refused
    });
    assert_eq!(refused, 200);
    let lines = || cluster.procs[0].log().lines().filter(|l| l.contains("handshake failed")).count();
    assert!(eventually(Duration::from_secs(10), || lines() >= 1), "{}", cluster.logs());
    // A request that is answered: the dispatcher has handled what came before.
    let out = cluster.admin(&["results"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no commits yet"), "{out:?}");
    assert!(lines() <= 2, "{} lines:\n{}", lines(), cluster.procs[0].log());
}
