//! Bounded expansion with real processes: a commit holding a 1 GiB file of
//! zeros (about 1 MiB as a git pack) is refused, by the observer before it
//! builds a pack and by the dispatcher when a pack is sent to it anyway, with
//! the cap and its flag named, and neither process grows past 100 MiB.

use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_proto::CommitId;
use kiln_proto::wire::{Reply, Request, Supersede};

use crate::harness::{Cluster, Repo, eventually};

/// The most a process may hold while refusing a bomb.
const SMALL_RSS: u64 = 100 << 20;

/// A process's peak resident set (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// A repository whose `main` holds `big.bin`, 1 GiB of zeros (a sparse file,
/// so the disk holds only git's compressed copy), and a small test.
fn bomb_repo(dir: &std::path::Path) -> (Repo, CommitId) {
    let repo = Repo::new(dir, &[("tests/test_ok.py", "def test_ok():\n    pass\n")]);
    let big = std::fs::File::create(repo.path.join("big.bin")).unwrap();
    big.set_len(1 << 30).unwrap();
    drop(big);
    let commit = repo.commit("a gigabyte of zeros");
    (repo, commit)
}

/// The pack git itself would send for `commit` (git reuses the stored
/// compressed blob, so this stays about 1 MiB).
fn git_pack(repo: &Repo, commit: &CommitId) -> Vec<u8> {
    let objects = repo.git(&["rev-list", "--objects", commit.as_str()]);
    let mut child = Command::new("git")
        .args(["pack-objects", "--stdout", "-q"])
        .current_dir(&repo.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, objects.as_bytes()).unwrap());
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn a_gigabyte_of_zeros_is_refused_by_observer_and_dispatcher_in_small_memory() {
    let mut cluster = Cluster::start();
    let (repo, commit) = bomb_repo(cluster.dir.path());

    // The observer measures the commit before packing it, and skips it.
    let observer = cluster.observer_with("watcher", &repo.path, "200ms", &[]);
    cluster.wait_log(observer, "not submitted");
    let log = cluster.procs[observer].log();
    assert!(
        log.contains(&format!("commit {commit} is over this observer's caps: `big.bin` is 1 GiB"))
            && log.contains("over the cap of 100 MiB on one object (raise it with --max-blob-size)"),
        "{log}"
    );
    let observer_rss = peak_rss(cluster.procs[observer].child.id());
    assert!(cluster.stored(&commit).is_none(), "the refused commit was queued");

    // Sent straight to the dispatcher with an observer's certificate, the
    // same commit's pack is refused there, before it is indexed.
    let pack = git_pack(&repo, &commit);
    assert!(pack.len() < 4 << 20, "git's pack is {} bytes", pack.len());
    let bundle = kiln_net::Bundle::load(&cluster.issue("observer", "raw")).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let reply = runtime.block_on(async {
        let conn = kiln_net::connect(&bundle, &cluster.addr, kiln_net::NetConfig::default()).await.unwrap();
        let request =
            Request::Submit { repo: "raw".into(), branch: "main".into(), commit, supersede: Supersede::Nothing };
        let (mut send, mut recv, reply) = conn.request(&request).await.unwrap();
        assert!(matches!(reply, Reply::SendPack { .. }), "{reply:?}");
        send.send_pack(&pack).await.unwrap();
        send.finish();
        tokio::time::timeout(Duration::from_secs(60), recv.expect::<Reply>()).await.unwrap().unwrap()
    });
    let Reply::Refused(reason) = reply else { panic!("the dispatcher took the bomb: {reply:?}") };
    assert!(
        reason.starts_with(&format!("the dispatcher refused commit {commit}: the pack's object"))
            && reason.contains("(a blob, at byte")
            && reason.contains("is 1 GiB, over the cap of 100 MiB on one object (raise it with --max-blob-size)"),
        "{reason}"
    );
    assert!(cluster.stored(&commit).is_none(), "the refused commit was queued");
    assert!(eventually(Duration::from_secs(10), || cluster.procs[0].log().contains("pack refused")));

    let dispatcher_rss = peak_rss(cluster.procs[0].child.id());
    eprintln!("peak RSS: observer {} MiB, dispatcher {} MiB", observer_rss >> 20, dispatcher_rss >> 20);
    assert!(observer_rss < SMALL_RSS, "observer peak RSS {} MiB", observer_rss >> 20);
    assert!(dispatcher_rss < SMALL_RSS, "dispatcher peak RSS {} MiB", dispatcher_rss >> 20);
}

#[test]
fn a_dispatcher_refusal_reaches_the_observer_naming_the_cap_and_nothing_is_queued() {
    // The dispatcher's cap is below the observer's: the observer sends the
    // pack, the dispatcher refuses it, and the observer reports that.
    let mut cluster = Cluster::start_with(&["--max-blob-size", "1MiB"]);
    let repo = Repo::new(cluster.dir.path(), &[("tests/test_ok.py", "def test_ok():\n    pass\n")]);
    std::fs::File::create(repo.path.join("data.bin")).unwrap().set_len(2 << 20).unwrap();
    let commit = repo.commit("two megabytes of zeros");
    let observer = cluster.observer_with("watcher", &repo.path, "200ms", &[]);
    cluster.wait_log(observer, "not submitted");
    let log = cluster.procs[observer].log();
    assert!(
        log.contains(&format!("not submitted: the dispatcher refused commit {commit}: the pack's object"))
            && log.contains("is 2 MiB, over the cap of 1 MiB on one object (raise it with --max-blob-size)"),
        "{log}"
    );
    assert!(cluster.stored(&commit).is_none(), "the refused commit was queued");
    // The observer carries on: it is still running and connected.
    assert!(cluster.procs[observer].child.try_wait().unwrap().is_none(), "{log}");
}
