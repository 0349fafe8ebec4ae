//! Tests of [`kiln_git::ObjectStore`] on real repositories in temporary directories.
//!
//! Source repositories are built with git2 itself (no `git` binary needed); stores
//! then exchange packs the way the observer, dispatcher and runner do.

#![expect(clippy::unwrap_used, reason = "a test should stop at the first unexpected error, with its message")]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use git2::{Oid, Repository, Signature, Time};
use kiln_git::{GitErrorKind, ObjectStore};
use kiln_proto::CommitId;
use tempfile::TempDir;

/// A tree to build, entry by entry.
enum Node<'a> {
    File(&'a [u8]),
    Exec(&'a [u8]),
    Link(&'a str),
    Dir(Vec<(&'a str, Node<'a>)>),
    Gitlink(Oid),
}

/// Writes the tree described by `entries` into `repo`'s object database.
fn write_tree(repo: &Repository, entries: &[(&str, Node<'_>)]) -> Oid {
    let mut builder = repo.treebuilder(None).unwrap();
    for (name, node) in entries {
        let (id, mode) = match node {
            Node::File(bytes) => (repo.blob(bytes).unwrap(), 0o100_644),
            Node::Exec(bytes) => (repo.blob(bytes).unwrap(), 0o100_755),
            Node::Link(target) => (repo.blob(target.as_bytes()).unwrap(), 0o120_000),
            Node::Dir(children) => (write_tree(repo, children), 0o040_000),
            Node::Gitlink(id) => (*id, 0o160_000),
        };
        builder.insert(name, id, mode).unwrap();
    }
    builder.write().unwrap()
}

/// Commits `tree` with `parents` at `time` (seconds), moving `refs/heads/<branch>` if given.
fn commit(repo: &Repository, branch: Option<&str>, tree: Oid, parents: &[Oid], time: i64) -> CommitId {
    let sig = Signature::new("Kiln Test", "test@kiln.invalid", &Time::new(time, 0)).unwrap();
    let tree = repo.find_tree(tree).unwrap();
    let parents: Vec<_> = parents.iter().map(|p| repo.find_commit(*p).unwrap()).collect();
    let parents: Vec<_> = parents.iter().collect();
    let refname = branch.map(|b| format!("refs/heads/{b}"));
    let id = repo.commit(refname.as_deref(), &sig, &sig, &format!("commit at {time}"), &tree, &parents).unwrap();
    id.to_string().parse().unwrap()
}

fn oid(id: &CommitId) -> Oid {
    Oid::from_str(id.as_str()).unwrap()
}

/// A non-bare "watched" repository at `dir/work`.
fn work_repo(dir: &TempDir) -> (Repository, ObjectStore) {
    let path = dir.path().join("work");
    let repo = Repository::init(&path).unwrap();
    let store = ObjectStore::open(&path).unwrap();
    (repo, store)
}

/// The object count from a pack's header.
fn pack_objects(pack: &[u8]) -> u32 {
    assert_eq!(&pack[..4], b"PACK", "not a pack");
    u32::from_be_bytes(pack[8..12].try_into().unwrap())
}

/// `len` bytes that do not compress, so that pack sizes reflect what is sent.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).unwrap().permissions().mode() & 0o111 != 0
}

/// An id that no test repository contains.
fn unknown_id() -> CommitId {
    "0123456789abcdef0123456789abcdef01234567".parse().unwrap()
}

#[test]
fn object_store_is_send() {
    fn assert_send<T: Send>() {}
    assert_send::<ObjectStore>();
}

#[test]
fn round_trip_then_checkout_gives_exact_files() {
    let dir = TempDir::new().unwrap();
    let (repo, sender) = work_repo(&dir);
    let readme: &[u8] = b"line one\r\nline two\n\xff\xfe not utf-8\n";
    let script: &[u8] = b"#!/bin/sh\necho hello\n";
    let tree = write_tree(
        &repo,
        &[
            // Filters would turn LF into CRLF here; the checkout must not apply them.
            (".gitattributes", Node::File(b"*.txt eol=crlf\n")),
            ("README", Node::File(readme)),
            ("notes.txt", Node::File(b"a\nb\n")),
            ("empty", Node::File(b"")),
            ("link", Node::Link("README")),
            ("vendor", Node::Gitlink(Oid::from_str(unknown_id().as_str()).unwrap())),
            (
                "bin",
                Node::Dir(vec![
                    ("run.sh", Node::Exec(script)),
                    ("deep", Node::Dir(vec![("data.bin", Node::File(&[0, 1, 2, 255]))])),
                ]),
            ),
        ],
    );
    let id = commit(&repo, Some("main"), tree, &[], 1_000);
    assert_eq!(sender.branch_head("main").unwrap(), id);

    let pack = sender.pack(&id, &[]).unwrap();
    // Directories that do not exist yet are created for the cache.
    let cache = dir.path().join("runner/cache/objects.git");
    let receiver = ObjectStore::open_or_init_bare(&cache).unwrap();
    assert!(!receiver.has_commit(&id));
    receiver.unpack(&pack, &id).unwrap();
    assert!(receiver.has_commit(&id));
    assert_eq!(receiver.recorded_commits(10).unwrap(), vec![id]);

    let dest = dir.path().join("jobs/1");
    receiver.checkout(&id, &dest).unwrap();
    assert_eq!(fs::read(dest.join("README")).unwrap(), readme);
    assert_eq!(fs::read(dest.join("notes.txt")).unwrap(), b"a\nb\n");
    assert_eq!(fs::read(dest.join("empty")).unwrap(), b"");
    assert_eq!(fs::read(dest.join("bin/run.sh")).unwrap(), script);
    assert_eq!(fs::read(dest.join("bin/deep/data.bin")).unwrap(), [0, 1, 2, 255]);
    assert!(is_executable(&dest.join("bin/run.sh")));
    assert!(!is_executable(&dest.join("README")));
    assert!(!is_executable(&dest.join("bin/deep/data.bin")));
    assert_eq!(fs::read_link(dest.join("link")).unwrap(), Path::new("README"));
    assert!(!dest.join("vendor").exists(), "submodules are skipped");

    let mut names: Vec<_> =
        fs::read_dir(&dest).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, [".gitattributes", "README", "bin", "empty", "link", "notes.txt"]);

    // The store reopens with its objects and records.
    drop(receiver);
    let reopened = ObjectStore::open_or_init_bare(&cache).unwrap();
    assert!(reopened.has_commit(&id));
    assert_eq!(reopened.recorded_commits(10).unwrap(), vec![id]);
    let reopened = ObjectStore::open(&cache).unwrap();
    assert!(reopened.has_commit(&id));
}

#[test]
fn pack_with_haves_sends_only_missing_objects() {
    let dir = TempDir::new().unwrap();
    let (repo, sender) = work_repo(&dir);
    let big = noise(256 * 1024, 0x9e37_79b9_7f4a_7c15);
    let first_tree = write_tree(&repo, &[("big.bin", Node::File(&big)), ("small.txt", Node::File(b"version 1\n"))]);
    let first = commit(&repo, Some("main"), first_tree, &[], 1_000);
    let second_tree = write_tree(&repo, &[("big.bin", Node::File(&big)), ("small.txt", Node::File(b"version 2\n"))]);
    let second = commit(&repo, Some("main"), second_tree, &[oid(&first)], 2_000);
    assert_eq!(sender.branch_head("main").unwrap(), second);

    let receiver = ObjectStore::open_or_init_bare(&dir.path().join("cache")).unwrap();
    receiver.unpack(&sender.pack(&first, &[]).unwrap(), &first).unwrap();

    let full = sender.pack(&second, &[]).unwrap();
    let delta = sender.pack(&second, &[first]).unwrap();
    // Full: two commits, two root trees, big.bin and two versions of small.txt.
    assert_eq!(pack_objects(&full), 7);
    // Delta: the second commit, its root tree and the new small.txt; not big.bin.
    assert_eq!(pack_objects(&delta), 3);
    assert!(delta.len() * 20 < full.len(), "delta pack is {} bytes, full pack {}", delta.len(), full.len());

    // A store without the first commit cannot complete the second from the delta pack,
    // which shows the pack really omits what the receiver already has.
    let fresh = ObjectStore::open_or_init_bare(&dir.path().join("fresh")).unwrap();
    let err = fresh.unpack(&delta, &second).unwrap_err();
    match err.kind() {
        GitErrorKind::Incomplete { expect, path, .. } => {
            assert_eq!(*expect, second);
            assert_eq!(path, "big.bin");
        }
        other => panic!("unexpected error kind {other:?}: {err}"),
    }
    assert!(fresh.recorded_commits(10).unwrap().is_empty());

    receiver.unpack(&delta, &second).unwrap();
    let dest = dir.path().join("job");
    receiver.checkout(&second, &dest).unwrap();
    assert_eq!(fs::read(dest.join("big.bin")).unwrap(), big);
    assert_eq!(fs::read(dest.join("small.txt")).unwrap(), b"version 2\n");
    assert_eq!(receiver.recorded_commits(10).unwrap(), vec![second, first]);
}

#[test]
fn empty_pack_unpacks_when_want_is_reachable_from_haves() {
    let dir = TempDir::new().unwrap();
    let (repo, sender) = work_repo(&dir);
    let tree = write_tree(&repo, &[("a", Node::File(b"a\n"))]);
    let first = commit(&repo, Some("main"), tree, &[], 1_000);
    let tree = write_tree(&repo, &[("a", Node::File(b"b\n"))]);
    let second = commit(&repo, Some("main"), tree, &[oid(&first)], 2_000);

    let receiver = ObjectStore::open_or_init_bare(&dir.path().join("cache")).unwrap();
    receiver.unpack(&sender.pack(&second, &[]).unwrap(), &second).unwrap();

    // The receiver already has both: a pack with no objects must still go through,
    // and unpacking records the commit it was for.
    for (want, have) in [(second, second), (first, second)] {
        let pack = sender.pack(&want, &[have]).unwrap();
        assert_eq!(pack_objects(&pack), 0);
        receiver.unpack(&pack, &want).unwrap();
    }
    assert_eq!(receiver.recorded_commits(10).unwrap(), vec![second, first]);
}

#[test]
fn haves_unknown_to_the_sender_are_ignored() {
    let dir = TempDir::new().unwrap();
    let (repo, sender) = work_repo(&dir);
    let tree = write_tree(&repo, &[("a", Node::File(b"a\n"))]);
    let id = commit(&repo, Some("main"), tree, &[], 1_000);
    let blob: CommitId = repo.blob(b"a\n").unwrap().to_string().parse().unwrap();

    // An id nobody has, and an object that exists but is not a commit.
    let pack = sender.pack(&id, &[unknown_id(), blob]).unwrap();
    assert_eq!(pack_objects(&pack), pack_objects(&sender.pack(&id, &[]).unwrap()));
    let receiver = ObjectStore::open_or_init_bare(&dir.path().join("cache")).unwrap();
    receiver.unpack(&pack, &id).unwrap();
    receiver.checkout(&id, &dir.path().join("job")).unwrap();
    assert_eq!(fs::read(dir.path().join("job/a")).unwrap(), b"a\n");
}

#[test]
fn garbage_and_truncated_packs_are_errors_and_the_store_still_works() {
    let dir = TempDir::new().unwrap();
    let (repo, sender) = work_repo(&dir);
    let content = noise(8 * 1024, 7);
    let tree = write_tree(&repo, &[("data", Node::File(&content))]);
    let id = commit(&repo, Some("main"), tree, &[], 1_000);
    let pack = sender.pack(&id, &[]).unwrap();

    let cache = dir.path().join("cache");
    let receiver = ObjectStore::open_or_init_bare(&cache).unwrap();
    let mut corrupt = pack.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    let mut bad_header = pack.clone();
    bad_header[11] = bad_header[11].wrapping_add(5); // claims more objects than it holds
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("garbage", b"this is not a pack, just some bytes from the network".to_vec()),
        ("header only", pack[..12].to_vec()),
        ("truncated", pack[..pack.len() / 2].to_vec()),
        ("missing checksum", pack[..pack.len() - 20].to_vec()),
        ("corrupt", corrupt),
        ("wrong object count", bad_header),
        // A header claiming 2^32 - 1 objects, and nothing after it.
        ("huge object count", b"PACK\0\0\0\x02\xff\xff\xff\xff".to_vec()),
    ];
    for (what, bytes) in &cases {
        let err = receiver.unpack(bytes, &id).unwrap_err();
        assert!(
            matches!(err.kind(), GitErrorKind::BadPack { expect } if *expect == id),
            "{what}: unexpected error {err}"
        );
        // The indexer's own reason is kept, not git2's generic "Write error".
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(source.as_deref().is_some_and(|s| !s.is_empty() && s != "Write error"), "{what}: source {source:?}");
        assert!(err.to_string().contains(&cache.display().to_string()), "{what}: {err}");
        assert!(!receiver.has_commit(&id), "{what}: commit appeared");
    }
    assert!(receiver.recorded_commits(10).unwrap().is_empty());

    // No temporary files are left behind, and a good pack still goes in.
    for entry in fs::read_dir(cache.join("objects/pack")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(
            name.starts_with("pack-") && (name.ends_with(".pack") || name.ends_with(".idx")),
            "left behind: {name}"
        );
    }
    receiver.unpack(&pack, &id).unwrap();
    receiver.checkout(&id, &dir.path().join("job")).unwrap();
    assert_eq!(fs::read(dir.path().join("job/data")).unwrap(), content);
}

#[test]
fn unpack_of_a_pack_without_the_expected_commit_errors() {
    let dir = TempDir::new().unwrap();
    let (repo, sender) = work_repo(&dir);
    let tree = write_tree(&repo, &[("a", Node::File(b"a\n"))]);
    let first = commit(&repo, Some("main"), tree, &[], 1_000);
    let tree = write_tree(&repo, &[("b", Node::File(b"b\n"))]);
    let other = commit(&repo, Some("other"), tree, &[], 2_000);

    let receiver = ObjectStore::open_or_init_bare(&dir.path().join("cache")).unwrap();
    let pack = sender.pack(&first, &[]).unwrap();
    for expect in [other, unknown_id()] {
        let err = receiver.unpack(&pack, &expect).unwrap_err();
        assert!(
            matches!(err.kind(), GitErrorKind::Incomplete { expect: e, .. } if *e == expect),
            "unexpected error {err}"
        );
        assert!(err.to_string().contains(expect.as_str()), "{err}");
    }
    // The pack's own commit came in whole, but only commits asked for are recorded.
    assert!(receiver.has_commit(&first));
    assert!(receiver.recorded_commits(10).unwrap().is_empty());
}

#[test]
fn unpack_of_a_pack_lacking_a_blob_errors_naming_its_path() {
    let dir = TempDir::new().unwrap();
    let (repo, _sender) = work_repo(&dir);
    let tree = write_tree(&repo, &[("src", Node::Dir(vec![("main.rs", Node::File(b"fn main() {}\n"))]))]);
    let id = commit(&repo, Some("main"), tree, &[], 1_000);

    // A pack with the commit and its trees but no blobs, as a broken peer might send.
    let src = repo.find_tree(tree).unwrap().get_name("src").unwrap().id();
    let mut builder = repo.packbuilder().unwrap();
    builder.insert_object(oid(&id), None).unwrap();
    builder.insert_object(tree, None).unwrap();
    builder.insert_object(src, None).unwrap();
    let mut buf = git2::Buf::new();
    builder.write_buf(&mut buf).unwrap();

    let receiver = ObjectStore::open_or_init_bare(&dir.path().join("cache")).unwrap();
    let err = receiver.unpack(&buf, &id).unwrap_err();
    match err.kind() {
        GitErrorKind::Incomplete { path, .. } => assert_eq!(path, "src/main.rs"),
        other => panic!("unexpected error kind {other:?}: {err}"),
    }
    assert!(err.to_string().contains("src/main.rs"), "{err}");
    assert!(receiver.recorded_commits(10).unwrap().is_empty());
}

#[test]
fn branch_head_of_a_missing_branch_names_it() {
    let dir = TempDir::new().unwrap();
    let (repo, store) = work_repo(&dir);
    // Before any commit, not even the default branch exists.
    let err = store.branch_head("main").unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::NoSuchBranch { branch } if branch == "main"));

    let tree = write_tree(&repo, &[("a", Node::File(b"a\n"))]);
    commit(&repo, Some("main"), tree, &[], 1_000);
    let err = store.branch_head("release/2.0").unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::NoSuchBranch { branch } if branch == "release/2.0"), "{err}");
    let message = err.to_string();
    assert!(message.contains("`release/2.0`"), "{message}");
    assert!(message.contains(&dir.path().join("work").display().to_string()), "{message}");
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn recorded_commits_are_newest_first_and_limited() {
    let dir = TempDir::new().unwrap();
    let (repo, store) = work_repo(&dir);
    let mut ids = Vec::new();
    for (n, time) in [1_000, 3_000, 2_000, 4_000].into_iter().enumerate() {
        let tree = write_tree(&repo, &[("n", Node::File(format!("{n}\n").as_bytes()))]);
        ids.push(commit(&repo, None, tree, &[], time));
    }
    assert!(store.recorded_commits(10).unwrap().is_empty());
    for id in &ids[..3] {
        store.remember(id).unwrap();
    }
    // Remembering twice is harmless.
    store.remember(&ids[0]).unwrap();

    assert_eq!(store.recorded_commits(10).unwrap(), vec![ids[1], ids[2], ids[0]]);
    assert_eq!(store.recorded_commits(2).unwrap(), vec![ids[1], ids[2]]);
    assert!(store.recorded_commits(0).unwrap().is_empty());
    store.remember(&ids[3]).unwrap();
    assert_eq!(store.recorded_commits(1).unwrap(), vec![ids[3]]);

    let err = store.remember(&unknown_id()).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::MissingCommit { commit } if *commit == unknown_id()));
    assert_eq!(store.recorded_commits(10).unwrap().len(), 4);
}

#[test]
fn pack_and_checkout_of_a_missing_commit_error() {
    let dir = TempDir::new().unwrap();
    let (_repo, store) = work_repo(&dir);
    let err = store.pack(&unknown_id(), &[]).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::MissingCommit { .. }), "{err}");
    assert!(err.to_string().contains(unknown_id().as_str()));
    let dest = dir.path().join("job");
    let err = store.checkout(&unknown_id(), &dest).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::MissingCommit { .. }), "{err}");
    assert!(!dest.exists());
}

#[test]
fn opening_checks_what_is_there() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("missing");
    let err = ObjectStore::open(&missing).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::Open));
    assert!(err.to_string().contains(&missing.display().to_string()));

    // A directory with unrelated content is not turned into a repository.
    let unrelated = dir.path().join("unrelated");
    fs::create_dir(&unrelated).unwrap();
    fs::write(unrelated.join("file"), b"keep me").unwrap();
    let err = ObjectStore::open_or_init_bare(&unrelated).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::Open), "{err}");
    assert_eq!(fs::read_dir(&unrelated).unwrap().count(), 1);

    // An empty directory gets a bare repository.
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    ObjectStore::open_or_init_bare(&empty).unwrap();
    assert!(Repository::open_bare(&empty).unwrap().is_bare());
}

#[test]
fn checkout_destination_must_be_missing_or_empty() {
    let dir = TempDir::new().unwrap();
    let (repo, store) = work_repo(&dir);
    let tree = write_tree(&repo, &[("a", Node::File(b"a\n"))]);
    let id = commit(&repo, Some("main"), tree, &[], 1_000);

    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    store.checkout(&id, &empty).unwrap();
    assert_eq!(fs::read(empty.join("a")).unwrap(), b"a\n");

    // Now it is not empty any more.
    let err = store.checkout(&id, &empty).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::DestinationNotEmpty { .. }), "{err}");

    let file = dir.path().join("file");
    fs::write(&file, b"x").unwrap();
    let err = store.checkout(&id, &file).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::DestinationNotEmpty { .. }), "{err}");

    // A symlink to an empty directory is not followed.
    let target = dir.path().join("target");
    fs::create_dir(&target).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = store.checkout(&id, &link).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::DestinationNotEmpty { .. }), "{err}");
    assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
}

/// Raw tree entries, written without git2's name checks, as a hostile peer could.
fn raw_tree(repo: &Repository, entries: &[(&str, &[u8], Oid)]) -> Oid {
    let mut data = Vec::new();
    for (mode, name, id) in entries {
        data.extend_from_slice(mode.as_bytes());
        data.push(b' ');
        data.extend_from_slice(name);
        data.push(0);
        data.extend_from_slice(id.as_bytes());
    }
    repo.odb().unwrap().write(git2::ObjectType::Tree, &data).unwrap()
}

#[test]
fn checkout_of_a_hostile_tree_writes_nothing_outside_the_destination() {
    let dir = TempDir::new().unwrap();
    let (repo, store) = work_repo(&dir);
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let payload = repo.blob(b"pwned\n").unwrap();
    let payload_tree = raw_tree(&repo, &[("100644", b"pwned", payload)]);
    let outside_link = repo.blob(outside.as_os_str().as_encoded_bytes()).unwrap();
    let relative_link = repo.blob(b"../outside").unwrap();

    let nested_dot_dot = raw_tree(&repo, &[("40000", b"..", payload_tree)]);
    let unsafe_names: Vec<(&str, Oid, &str)> = vec![
        ("dot-dot dir", raw_tree(&repo, &[("40000", b"..", payload_tree)]), ".."),
        ("dot-dot file", raw_tree(&repo, &[("100644", b"..", payload)]), ".."),
        ("dot dir", raw_tree(&repo, &[("40000", b".", payload_tree)]), "."),
        ("slash in name", raw_tree(&repo, &[("100644", b"../outside/pwned", payload)]), "../outside/pwned"),
        (
            "absolute name",
            raw_tree(&repo, &[("100644", outside.join("pwned").as_os_str().as_encoded_bytes(), payload)]),
            "",
        ),
        ("dot git", raw_tree(&repo, &[("40000", b".GIT", payload_tree)]), ".GIT"),
        ("nested dot-dot", raw_tree(&repo, &[("40000", b"sub", nested_dot_dot)]), "sub/.."),
    ];
    for (n, (what, tree, path)) in unsafe_names.into_iter().enumerate() {
        let id = commit(&repo, None, tree, &[], 1_000);
        let dest = dir.path().join(format!("unsafe/{n}"));
        let err = store.checkout(&id, &dest).unwrap_err();
        match err.kind() {
            GitErrorKind::UnsafePath { commit, path: p } => {
                assert_eq!(*commit, id, "{what}");
                if !path.is_empty() {
                    assert_eq!(p, path, "{what}");
                }
            }
            other => panic!("{what}: unexpected error kind {other:?}: {err}"),
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{what}: wrote outside");
        assert!(!dir.path().join("pwned").exists(), "{what}: wrote outside");
        assert!(!dir.path().join("unsafe/pwned").exists(), "{what}: wrote next to dest");
    }

    // Duplicate names: whichever comes second finds the first in its way, and the
    // walk never writes through the symlink.
    let duplicates: Vec<(&str, Oid)> = vec![
        (
            "symlink then dir of the same name",
            raw_tree(&repo, &[("120000", b"esc", outside_link), ("40000", b"esc", payload_tree)]),
        ),
        (
            "relative symlink then file of the same name",
            raw_tree(&repo, &[("120000", b"esc", relative_link), ("100644", b"esc", payload)]),
        ),
        (
            "dir then symlink of the same name",
            raw_tree(&repo, &[("40000", b"esc", payload_tree), ("120000", b"esc", outside_link)]),
        ),
    ];
    for (n, (what, tree)) in duplicates.into_iter().enumerate() {
        let id = commit(&repo, None, tree, &[], 1_000);
        let dest = dir.path().join(format!("jobs/{n}"));
        let err = store.checkout(&id, &dest).unwrap_err();
        assert!(
            matches!(err.kind(), GitErrorKind::Checkout { path, .. } if *path == dest.join("esc")),
            "{what}: unexpected error {err}"
        );
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "{what}: wrote outside");
        assert!(!dir.path().join("jobs/pwned").exists(), "{what}: wrote next to dest");
        assert!(!dir.path().join("pwned").exists(), "{what}: wrote outside");
    }

    // A symlink pointing outside is fine on its own: it is written, not followed.
    let tree = raw_tree(&repo, &[("120000", b"esc", outside_link)]);
    let id = commit(&repo, None, tree, &[], 1_000);
    let dest = dir.path().join("jobs/link-only");
    store.checkout(&id, &dest).unwrap();
    assert_eq!(fs::read_link(dest.join("esc")).unwrap(), outside);
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn commits_between_lists_a_gap_oldest_first() {
    let dir = TempDir::new().unwrap();
    let (repo, store) = work_repo(&dir);
    let mut ids: Vec<CommitId> = Vec::new();
    for n in 0..5 {
        let tree = write_tree(&repo, &[("n", Node::File(format!("{n}\n").as_bytes()))]);
        let parents: Vec<Oid> = ids.last().map(oid).into_iter().collect();
        ids.push(commit(&repo, Some("main"), tree, &parents, 1_000 + n));
    }
    assert_eq!(store.commits_between(Some(&ids[1]), &ids[4], 100).unwrap(), ids[2..].to_vec());
    assert_eq!(store.commits_between(Some(&ids[4]), &ids[4], 100).unwrap(), Vec::<CommitId>::new());
    // Only the newest `limit`, still oldest first.
    assert_eq!(store.commits_between(Some(&ids[0]), &ids[4], 2).unwrap(), ids[3..].to_vec());
    // No starting point, or one this repository never had (a force push): just the tip.
    assert_eq!(store.commits_between(None, &ids[4], 100).unwrap(), vec![ids[4]]);
    assert_eq!(store.commits_between(Some(&unknown_id()), &ids[4], 100).unwrap(), vec![ids[4]]);
}

#[test]
fn concurrent_first_opens_of_a_bare_store_all_succeed() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("cache.git");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || ObjectStore::open_or_init_bare(&path).map(drop))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    // Nothing but the repository is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("cache.git")]);
}

#[test]
fn ancestry_follows_history_not_branch_names() {
    let dir = TempDir::new().unwrap();
    let (repo, store) = work_repo(&dir);
    let tree = |n: i64| write_tree(&repo, &[("n", Node::File(format!("{n}\n").as_bytes()))]);
    let base = commit(&repo, Some("main"), tree(0), &[], 1_000);
    let child = commit(&repo, Some("main"), tree(1), &[oid(&base)], 1_001);
    let grandchild = commit(&repo, Some("main"), tree(2), &[oid(&child)], 1_002);
    // A rewritten history: same branch, same parent as `child`, not descending from it.
    let rewritten = commit(&repo, None, tree(3), &[oid(&base)], 1_003);
    let unrelated = commit(&repo, None, tree(4), &[], 1_004);
    assert!(store.is_ancestor(&base, &grandchild).unwrap());
    assert!(store.is_ancestor(&child, &grandchild).unwrap());
    assert!(store.is_ancestor(&child, &child).unwrap());
    assert!(!store.is_ancestor(&grandchild, &child).unwrap());
    assert!(!store.is_ancestor(&child, &rewritten).unwrap());
    assert!(!store.is_ancestor(&child, &unrelated).unwrap());
    let err = store.is_ancestor(&unknown_id(), &child).unwrap_err();
    assert_eq!(err.kind(), &GitErrorKind::MissingCommit { commit: unknown_id() });
}

// ---- Bounded expansion: packs and trees that try to exhaust memory ----

/// A git object id, as hex, of `kind` with `len` bytes of `content`, hashed as it streams.
fn object_id<'a>(kind: &str, len: u64, content: impl IntoIterator<Item = &'a [u8]>) -> String {
    use sha1::Digest;
    let mut hash = sha1::Sha1::new();
    hash.update(format!("{kind} {len}\0").as_bytes());
    for chunk in content {
        hash.update(chunk);
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The zlib stream of `len` zero bytes, compressed as it streams (1 GiB → about 1 MiB).
fn deflate_zeros(len: u64) -> Vec<u8> {
    let zeros = vec![0u8; 1 << 20];
    let mut z = flate2::Compress::new(flate2::Compression::best(), true);
    let mut out = Vec::with_capacity(2 << 20);
    let mut left = len;
    loop {
        let chunk = &zeros[..left.min(zeros.len() as u64) as usize];
        let flush =
            if left <= chunk.len() as u64 { flate2::FlushCompress::Finish } else { flate2::FlushCompress::None };
        if out.capacity() - out.len() < 64 << 10 {
            out.reserve(1 << 20);
        }
        let before = z.total_in();
        let status = z.compress_vec(chunk, &mut out, flush).unwrap();
        left -= z.total_in() - before;
        if status == flate2::Status::StreamEnd {
            return out;
        }
    }
}

/// The zlib stream of `bytes`.
fn deflate(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// A pack object's header: type and (declared) size.
fn object_header(kind: u8, mut size: u64) -> Vec<u8> {
    let mut first = (kind << 4) | (size & 0x0f) as u8;
    size >>= 4;
    let mut out = Vec::new();
    while size > 0 {
        out.push(first | 0x80);
        first = (size & 0x7f) as u8;
        size >>= 7;
    }
    out.push(first);
    out
}

/// A delta's base-128 size number.
fn delta_varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// Bytes of a pack holding `objects` (already-encoded header + data), with its checksum.
fn pack_of(objects: &[Vec<u8>]) -> Vec<u8> {
    use sha1::Digest;
    let mut pack = b"PACK\0\0\0\x02".to_vec();
    pack.extend_from_slice(&(objects.len() as u32).to_be_bytes());
    for object in objects {
        pack.extend_from_slice(object);
    }
    let sum = sha1::Sha1::digest(&pack);
    pack.extend_from_slice(&sum);
    pack
}

/// A commit object over `tree` (hex id): (id, encoded pack object).
fn commit_object(tree: &str) -> (CommitId, Vec<u8>) {
    let body =
        format!("tree {tree}\nauthor A <a@kiln.invalid> 0 +0000\ncommitter A <a@kiln.invalid> 0 +0000\n\nbomb\n");
    let id = object_id("commit", body.len() as u64, [body.as_bytes()]);
    let mut object = object_header(1, body.len() as u64);
    object.extend(deflate(body.as_bytes()));
    (id.parse().unwrap(), object)
}

/// A tree object with one entry `name` → the blob `blob` (hex id): (id, encoded pack object).
fn tree_object(name: &str, blob: &str) -> (String, Vec<u8>) {
    let mut body = format!("100644 {name}\0").into_bytes();
    body.extend(Oid::from_str(blob).unwrap().as_bytes());
    let id = object_id("tree", body.len() as u64, [&body[..]]);
    let mut object = object_header(2, body.len() as u64);
    object.extend(deflate(&body));
    (id, object)
}

/// A complete commit whose tree holds `big.bin`: `len` zero bytes, about 1 KiB per MiB on the wire.
fn zero_bomb(len: u64) -> (CommitId, Vec<u8>) {
    let zeros = vec![0u8; 1 << 20];
    let chunk = zeros.len() as u64;
    let chunks = (0..len.div_ceil(chunk)).map(|n| &zeros[..(len - n * chunk).min(chunk) as usize]);
    let blob = object_id("blob", len, chunks);
    let mut blob_object = object_header(3, len);
    blob_object.extend(deflate_zeros(len));
    let (tree, tree_obj) = tree_object("big.bin", &blob);
    let (commit, commit_obj) = commit_object(&tree);
    (commit, pack_of(&[commit_obj, tree_obj, blob_object]))
}

/// A pack of a 64 KiB blob of zeros and a 16 KiB delta against it whose result is `len` bytes.
fn delta_bomb(len: u64) -> Vec<u8> {
    let base_len = 1u64 << 16;
    let base = object_id("blob", base_len, [&vec![0u8; base_len as usize][..]]);
    let mut base_object = object_header(3, base_len);
    base_object.extend(deflate_zeros(base_len));
    let mut delta = delta_varint(base_len);
    delta.extend(delta_varint(len));
    // 0x80 alone: copy 0x10000 bytes from offset 0 of the base.
    delta.extend(std::iter::repeat_n(0x80u8, (len / base_len) as usize));
    let mut delta_object = object_header(7, delta.len() as u64);
    delta_object.extend(Oid::from_str(&base).unwrap().as_bytes());
    delta_object.extend(deflate(&delta));
    pack_of(&[base_object, delta_object])
}

/// The peak resident set of this process so far, in bytes (VmHWM).
fn peak_rss() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Environment variables that turn [`child_unpacks_and_checks_out`] into the child of a memory test.
const CHILD_PACK: &str = "KILN_TEST_CHILD_PACK";
const CHILD_COMMIT: &str = "KILN_TEST_CHILD_COMMIT";

/// Unpacks the pack in a fresh child process (this test binary, running only
/// [`child_unpacks_and_checks_out`]), checks the commit out if that worked, and
/// returns (what happened, the child's peak RSS in bytes).
fn unpack_in_child(pack: &[u8], commit: &CommitId) -> (String, u64) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("bomb.pack");
    fs::write(&path, pack).unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["child_unpacks_and_checks_out", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_PACK, &path)
        .env(CHILD_COMMIT, commit.as_str())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        stdout
            .lines()
            // libtest prints the test's name on the line the output starts on.
            .find_map(|l| l.split_once(name).map(|(_, v)| v))
            .unwrap_or_else(|| panic!("child printed no {name}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
            .to_owned()
    };
    let (outcome, peak) = (field("outcome: "), field("peak: ").parse().unwrap());
    eprintln!("child: {outcome}; peak RSS {} MiB", peak >> 20);
    (outcome, peak)
}

/// The child half of the memory tests; does nothing unless started by [`unpack_in_child`].
#[test]
fn child_unpacks_and_checks_out() {
    let (Ok(pack), Ok(commit)) = (std::env::var(CHILD_PACK), std::env::var(CHILD_COMMIT)) else { return };
    let pack = fs::read(pack).unwrap();
    let commit: CommitId = commit.parse().unwrap();
    let dir = TempDir::new().unwrap();
    let store = ObjectStore::open_or_init_bare(&dir.path().join("cache")).unwrap();
    let outcome = match store.unpack(&pack, &commit) {
        Err(e) => format!("unpack failed: {e}"),
        Ok(()) => match store.checkout(&commit, &dir.path().join("job")) {
            Err(e) => format!("checkout failed: {e}"),
            Ok(()) => "checked out".to_owned(),
        },
    };
    drop(pack);
    println!("outcome: {}", outcome.replace('\n', " "));
    println!("peak: {}", peak_rss());
}

/// What a child process may use at most while refusing a bomb.
const SMALL_RSS: u64 = 100 << 20;

#[test]
fn a_gigabyte_zero_blob_is_refused_in_small_memory() {
    let (commit, pack) = zero_bomb(1 << 30);
    assert!(pack.len() < 2 << 20, "the bomb is {} bytes on the wire", pack.len());
    let (outcome, peak) = unpack_in_child(&pack, &commit);
    assert!(outcome.starts_with("unpack failed"), "{outcome}");
    assert!(
        outcome.contains("is 1 GiB, over the cap of 100 MiB on one object (raise it with --max-blob-size)"),
        "{outcome}"
    );
    assert!(outcome.contains("a blob"), "{outcome}");
    assert!(peak < SMALL_RSS, "peak RSS {} MiB while refusing a {}-byte pack", peak >> 20, pack.len());
}

#[test]
fn a_delta_with_a_gigabyte_result_is_refused_in_small_memory() {
    let pack = delta_bomb(1 << 30);
    assert!(pack.len() < 100 << 10, "the bomb is {} bytes on the wire", pack.len());
    let (outcome, peak) = unpack_in_child(&pack, &unknown_id());
    assert!(
        outcome.contains("(a delta, at byte") && outcome.contains("expands to 1 GiB, over the cap of 100 MiB"),
        "{outcome}"
    );
    assert!(peak < SMALL_RSS, "peak RSS {} MiB while refusing a {}-byte pack", peak >> 20, pack.len());
}

#[test]
fn an_object_that_inflates_past_its_declared_size_is_refused() {
    // A blob declared as 4 bytes whose stream holds 1 MiB of zeros.
    let mut object = object_header(3, 4);
    object.extend(deflate_zeros(1 << 20));
    let pack = pack_of(&[object]);
    let dir = TempDir::new().unwrap();
    let store = ObjectStore::open_or_init_bare(&dir.path().join("cache")).unwrap();
    let err = store.unpack(&pack, &unknown_id()).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::BadPack { .. }), "{err}");
    let source = std::error::Error::source(&err).unwrap().to_string();
    assert!(source.contains("more than its declared 4 bytes"), "{source}");
}

#[test]
fn pack_expansion_cap_counts_every_object() {
    let dir = TempDir::new().unwrap();
    let (repo, sender) = work_repo(&dir);
    let a = noise(3000, 1);
    let b = noise(3000, 2);
    let tree = write_tree(&repo, &[("a", Node::File(&a)), ("b", Node::File(&b))]);
    let id = commit(&repo, Some("main"), tree, &[], 1_000);
    let pack = sender.pack(&id, &[]).unwrap();
    let limits = |max_pack_expansion| kiln_git::Limits { max_pack_expansion, ..kiln_git::Limits::default() };
    let small = ObjectStore::open_or_init_bare(&dir.path().join("small")).unwrap().with_limits(limits(5000));
    let err = small.unpack(&pack, &id).unwrap_err();
    let GitErrorKind::TooLarge { action: kiln_git::Action::Unpack, detail, .. } = err.kind() else { panic!("{err}") };
    assert_eq!(detail.cap, kiln_git::Cap::PackExpansion);
    assert!(
        err.to_string().contains(
            "over the cap of 5000 bytes on one pack's uncompressed objects (raise it with --max-pack-expansion)"
        ),
        "{err}"
    );
    assert!(!small.has_commit(&id));
    // The sender refuses to build it too, naming where the total went over.
    let err =
        ObjectStore::open(&dir.path().join("work")).unwrap().with_limits(limits(5000)).pack(&id, &[]).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::TooLarge { action: kiln_git::Action::Pack, .. }), "{err}");
    assert!(err.to_string().contains("--max-pack-expansion"), "{err}");
    // Within the cap, the same pack goes in.
    let roomy = ObjectStore::open_or_init_bare(&dir.path().join("roomy")).unwrap().with_limits(limits(7000));
    roomy.unpack(&pack, &id).unwrap();
}

#[test]
fn tree_cap_counts_repeated_subtrees_and_stops_checkout_before_writing() {
    let dir = TempDir::new().unwrap();
    let (repo, sender) = work_repo(&dir);
    // One 1 KiB file, in a directory that the root names 200 times: 1 KiB on
    // the wire, 200 KiB checked out.
    let file = noise(1024, 3);
    let sub = write_tree(&repo, &[("f", Node::File(&file))]);
    let mut builder = repo.treebuilder(None).unwrap();
    for n in 0..200 {
        builder.insert(format!("d{n:03}"), sub, 0o040_000).unwrap();
    }
    let root = builder.write().unwrap();
    let id = commit(&repo, Some("main"), root, &[], 1_000);
    let pack = sender.pack(&id, &[]).unwrap();

    let cache = dir.path().join("cache");
    ObjectStore::open_or_init_bare(&cache).unwrap().unpack(&pack, &id).unwrap();
    let limits = kiln_git::Limits { max_tree: 100 << 10, ..kiln_git::Limits::default() };
    let small = ObjectStore::open(&cache).unwrap().with_limits(limits);
    let dest = dir.path().join("job");
    let err = small.checkout(&id, &dest).unwrap_err();
    let GitErrorKind::TooLarge { action: kiln_git::Action::Checkout, detail, .. } = err.kind() else { panic!("{err}") };
    assert_eq!(detail.cap, kiln_git::Cap::Tree);
    assert_eq!(detail.at, kiln_git::Place::Path("d100".into()), "{err}");
    assert!(
        err.to_string().contains(
            "the files add up to 101 KiB by `d100`, over the cap of 100 KiB on one commit's checked-out files (raise it with --max-tree-size)"
        ),
        "{err}"
    );
    assert!(!dest.exists(), "checkout wrote files before refusing");
    // An unpack into a store with the same cap refuses the commit too, and the sender will not pack it.
    let other = ObjectStore::open_or_init_bare(&dir.path().join("other")).unwrap().with_limits(limits);
    let err = other.unpack(&pack, &id).unwrap_err();
    assert!(matches!(err.kind(), GitErrorKind::TooLarge { action: kiln_git::Action::Unpack, .. }), "{err}");
    let err = ObjectStore::open(&dir.path().join("work")).unwrap().with_limits(limits).pack(&id, &[]).unwrap_err();
    assert!(err.to_string().contains("--max-tree-size"), "{err}");
    // With the default caps it checks out whole.
    ObjectStore::open(&cache).unwrap().checkout(&id, &dest).unwrap();
    assert_eq!(fs::read(dest.join("d199/f")).unwrap(), file);
}

#[test]
fn the_sender_refuses_a_blob_over_the_cap_naming_its_path() {
    let dir = TempDir::new().unwrap();
    let (repo, sender) = work_repo(&dir);
    let big = noise(5000, 4);
    let tree = write_tree(&repo, &[("src", Node::Dir(vec![("big.bin", Node::File(&big))]))]);
    let id = commit(&repo, Some("main"), tree, &[], 1_000);
    drop(sender);
    let limits = kiln_git::Limits { max_blob: 4096, ..kiln_git::Limits::default() };
    let sender = ObjectStore::open(&dir.path().join("work")).unwrap().with_limits(limits);
    let err = sender.pack(&id, &[]).unwrap_err();
    let blob = repo.find_tree(tree).unwrap().get_path(Path::new("src/big.bin")).unwrap().id();
    assert_eq!(
        err.to_string(),
        format!(
            "build a pack for commit {id} from {}: `src/big.bin` is 5000 bytes (object {blob}), over the cap of 4 KiB on one object (raise it with --max-blob-size)",
            dir.path().join("work").display()
        )
    );
}

#[test]
fn head_branch_is_what_head_names_even_before_a_commit_and_branches_are_listed() {
    let dir = TempDir::new().unwrap();
    let (repo, store) = work_repo(&dir);
    repo.set_head("refs/heads/master").unwrap();
    assert_eq!(store.head_branch().unwrap(), "master");
    assert!(store.branch_names().unwrap().is_empty());

    let tree = write_tree(&repo, &[("a", Node::File(b"a\n"))]);
    let first = commit(&repo, Some("master"), tree, &[], 1_000);
    commit(&repo, Some("feature/x"), tree, &[oid(&first)], 1_001);
    assert_eq!(store.branch_names().unwrap(), ["feature/x", "master"]);

    repo.set_head_detached(oid(&first)).unwrap();
    let err = store.head_branch().unwrap_err();
    assert_eq!(err.kind(), &GitErrorKind::HeadBranch);
    assert!(err.to_string().contains("--branch"), "{err}");
}

#[test]
fn test_files_lists_regular_files_under_tests_like_a_checkout_would() {
    let dir = TempDir::new().unwrap();
    let (repo, store) = work_repo(&dir);
    let tree = write_tree(
        &repo,
        &[
            ("setup.py", Node::File(b"")),
            (
                "tests",
                Node::Dir(vec![
                    ("test_b.py", Node::File(b"b")),
                    ("run.sh", Node::Exec(b"#!/bin/sh")),
                    ("sub", Node::Dir(vec![("test_a.py", Node::File(b"a")), ("up", Node::Link("../../.."))])),
                    ("escape", Node::Link("/etc")),
                    ("inside.py", Node::Link("../setup.py")),
                ]),
            ),
        ],
    );
    let c = commit(&repo, Some("main"), tree, &[], 1);
    let found = store.test_files(&c).unwrap();
    assert_eq!(found.files, ["tests/run.sh", "tests/sub/test_a.py", "tests/test_b.py"]);
    assert_eq!(
        found.outside_links,
        [("tests/escape".to_owned(), "/etc".to_owned()), ("tests/sub/up".to_owned(), "../../..".to_owned())]
    );
    // The same files a checkout holds as regular files under tests/.
    let out = dir.path().join("out");
    store.checkout(&c, &out).unwrap();
    let mut on_disk = Vec::new();
    let mut stack = vec![out.join("tests")];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(d).unwrap() {
            let e = e.unwrap();
            let kind = e.file_type().unwrap();
            if kind.is_dir() {
                stack.push(e.path());
            } else if kind.is_file() {
                on_disk.push(e.path().strip_prefix(&out).unwrap().to_str().unwrap().to_owned());
            }
        }
    }
    on_disk.sort();
    assert_eq!(on_disk, found.files);

    // `tests` as a link is reported and not followed; no `tests` lists nothing.
    let linked =
        write_tree(&repo, &[("real", Node::Dir(vec![("t.py", Node::File(b""))])), ("tests", Node::Link("real"))]);
    let c = commit(&repo, None, linked, &[], 2);
    let found = store.test_files(&c).unwrap();
    assert!(found.files.is_empty());
    assert_eq!(found.outside_links, [("tests".to_owned(), "real".to_owned())]);
    let bare = write_tree(&repo, &[("README", Node::File(b""))]);
    let c = commit(&repo, None, bare, &[], 3);
    assert_eq!(store.test_files(&c).unwrap(), kiln_git::TreeTests::default());
    assert!(store.test_files(&unknown_id()).is_err());
}
