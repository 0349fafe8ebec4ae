//! Mutual TLS with real processes: certificates from another CA are refused
//! at the handshake, and a process with the wrong role is refused its request.

use std::time::Duration;

use crate::harness::{Cluster, kiln};

#[test]
fn a_runner_with_a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let mut cluster = Cluster::start();
    let other = tempfile::tempdir().unwrap();
    let out = kiln().args(["certs", "init", "--dir"]).arg(other.path()).output().unwrap();
    assert!(out.status.success());
    let out = kiln().args(["certs", "issue", "runner", "intruder", "--dir"]).arg(other.path()).output().unwrap();
    assert!(out.status.success());
    // Put the foreign bundle where the cluster keeps bundles, so `spawn` finds it.
    let dest = cluster.certs().join("intruder");
    std::fs::create_dir(&dest).unwrap();
    for f in ["ca.pem", "cert.pem", "key.pem"] {
        std::fs::copy(other.path().join("intruder").join(f), dest.join(f)).unwrap();
    }
    cluster.spawn("runner", "intruder", &[]);
    let status = {
        let p = cluster.procs.last_mut().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let runner_log = cluster.procs.last().unwrap().log();
    assert_eq!(status.and_then(|s| s.code()), Some(2), "{runner_log}");
    assert!(runner_log.contains("TLS handshake was refused"), "{runner_log}");
    let dispatcher_log = cluster.procs[0].log();
    assert!(dispatcher_log.contains("handshake failed"), "{dispatcher_log}");
    assert!(!dispatcher_log.contains("runner registered"), "{dispatcher_log}");
}

#[test]
fn an_observer_certificate_cannot_take_jobs() {
    let mut cluster = Cluster::start();
    let bundle = cluster.issue("observer", "sneaky");
    let out = kiln()
        .args(["runner", "--dispatcher", &cluster.addr, "--identity"])
        .arg(&bundle)
        .arg("--work")
        .arg(cluster.dir.path().join("w"))
        .output()
        .unwrap();
    // The runner refuses to use a non-runner bundle before even connecting.
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a runner certificate"));
    // Absence is only evidence once the log is known to be live and to show
    // registrations: a real runner registers next, and it is the only one.
    cluster.runner("honest");
    cluster.wait_log(0, "runner registered");
    let log = cluster.procs[0].log();
    let registered: Vec<&str> = log.lines().filter(|l| l.contains("runner registered")).collect();
    assert_eq!(registered.len(), 1, "{log}");
    assert!(registered[0].contains("peer=runner honest"), "{log}");
    assert!(!log.contains("sneaky"), "the observer's certificate reached the dispatcher:\n{log}");
}
