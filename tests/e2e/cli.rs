//! Bad input on the command line gets one clear sentence and exit code 2,
//! never a panic.

use crate::harness::{Cluster, Repo, kiln, kiln_output};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_mistyped_flag_is_named() {
    let out = kiln_output(&["dispatcher", "--lisen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--lisen"), "{}", stderr(&out));
}

#[test]
fn a_missing_certificate_bundle_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let out = kiln().arg("runner").arg("--identity").arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("cannot load the certificate bundle") && err.contains("nope/ca.pem"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_missing_repository_is_named() {
    let mut cluster = Cluster::start();
    cluster.issue("observer", "observer");
    let out = kiln()
        .args(["observer", "--dispatcher", &cluster.addr, "--repo", "/definitely/not/a/repo", "--identity"])
        .arg(cluster.certs().join("observer"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("/definitely/not/a/repo"), "{err}");
    cluster.procs.clear();
}

#[test]
fn an_unreachable_dispatcher_is_reported_not_awaited_forever() {
    let cluster = Cluster::start();
    // A port nothing listens on.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap().to_string();
    drop(socket);
    let out = kiln()
        .args(["results", "--idle-timeout", "1s", "--dispatcher", &addr, "--identity"])
        .arg(cluster.certs().join("admin"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains(&addr), "{err}");
}

#[test]
fn a_client_bundle_cannot_serve_as_the_dispatcher() {
    let cluster = Cluster::start();
    let out = kiln()
        .args(["dispatcher", "--listen", "127.0.0.1:0", "--identity"])
        .arg(cluster.certs().join("admin"))
        .arg("--state")
        .arg(cluster.dir.path().join("state2"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("is for admin `admin`"), "{}", stderr(&out));
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    // A pipe nobody reads: every write fails with EPIPE, as under `kiln … | head -0`.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = kiln()
        .args(["certs", "init", "--dir"])
        .arg(dir.path().join("certs"))
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn a_commit_is_named_by_a_unique_prefix_as_in_git() {
    let mut cluster = Cluster::start();
    let repo = Repo::new(cluster.dir.path(), &[("tests/test_a.py", "")]);
    let commit = repo.commit("one");
    // No runner: the commit stays queued.
    let observer = cluster.observer_with("observer", &repo.path, "200ms", &[]);
    cluster.wait_log(observer, &format!("commit={commit}"));
    let short = &commit.as_str()[..7];

    let out = cluster.admin(&["results", short]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(&format!("commit {commit} on main: QUEUED")), "{stdout}");

    let out = cluster.admin(&["cancel", &commit.as_str()[..12].to_uppercase()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("cancelled {commit}"));

    // Cancelling it again says how it ended.
    let out = cluster.admin(&["cancel", short]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with(&format!("{commit} had already ended: cancelled (cancelled by")), "{stdout}");

    // Not a commit this dispatcher knows (a prefix of the commit with its last digit changed).
    let other = if short.ends_with('0') { format!("{}1", &short[..6]) } else { format!("{}0", &short[..6]) };
    let out = cluster.admin(&["results", &other]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("the dispatcher knows no commit starting with {other}")),
        "{}",
        stderr(&out)
    );

    let out = cluster.admin(&["results", &short[..6]]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("at least 7 hexadecimal digits"), "{}", stderr(&out));
}

#[test]
fn notify_outside_a_git_repository_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = kiln().args(["notify", "--repo"]).arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains(&format!("{} is not a git repository", dir.path().display())), "{err}");
}

#[test]
fn a_wait_takes_plain_seconds_and_a_bad_one_shows_an_example() {
    let out = kiln_output(&["results", "--wait", "5 parsecs", "--identity", "certs/me"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("`5 parsecs` is not a duration") && err.contains("for example 5s"), "{err}");
    // Plain seconds parse: the command gets as far as the (missing) certificates.
    let out = kiln_output(&["results", "--wait", "5", "--identity", "/nonexistent/me"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot load the certificate bundle"), "{}", stderr(&out));
}
