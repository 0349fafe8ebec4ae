//! Walking a commit's tree: checking that all of it is present after an unpack,
//! and writing it into a directory.
//!
//! The checkout is written by hand rather than with libgit2's checkout, because
//! the one guarantee that matters here — nothing is written outside the
//! destination, whatever a tree from the network contains — is easiest to see in
//! one short loop. It rests on two rules:
//!
//! 1. Every entry name is a single safe path component (see [`is_safe_name`]), so
//!    joining it to a directory names a child of that directory.
//! 2. Every directory, file and symlink is *created* by this walk, and creation
//!    fails if anything already exists at that path (`mkdir`, `O_CREAT | O_EXCL`,
//!    `symlink` all refuse). So the walk only ever descends into directories it
//!    made itself, and never writes through a symlink, even when a crafted tree has
//!    two entries with the same name (or names that collide on a case-insensitive
//!    file system).
//!
//! Before writing anything, the checkout measures the tree against the
//! [`Limits`] from object headers (see `measure.rs`), so a tree over the caps is
//! refused with nothing written and nothing inflated.
//!
//! Both walks use an explicit stack, so a deeply nested tree cannot overflow the
//! thread's stack.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::Path;

use git2::Repository;
use kiln_proto::CommitId;

use crate::error::{Action, GitError, GitErrorKind};
use crate::limits::Limits;
use crate::measure::{self, MeasureError};

/// Tree entry modes, as normalised by libgit2's `git_tree_entry_filemode`.
pub(crate) const MODE_TREE: i32 = 0o040_000;
/// A regular file with the executable bit.
const MODE_EXECUTABLE: i32 = 0o100_755;
/// A symbolic link; the blob holds the link's target.
const MODE_LINK: i32 = 0o120_000;
/// A submodule: the entry names a commit of another repository.
pub(crate) const MODE_GITLINK: i32 = 0o160_000;

/// Checks that `expect` is present as a commit, that every tree and blob its
/// tree reaches is present too (submodule commits excepted), and that the tree
/// is within `limits`.
pub(crate) fn check_complete(
    repo: &Repository,
    repo_path: &Path,
    expect: &CommitId,
    limits: &Limits,
) -> Result<(), GitError> {
    let incomplete = |object: String, path: String| GitErrorKind::Incomplete { expect: *expect, object, path };
    let commit = crate::find_commit(repo, repo_path, expect)
        .map_err(|e| GitError::new(repo_path, incomplete(expect.to_string(), String::new()), e))?;
    let odb = repo.odb().map_err(|e| GitError::new(repo_path, GitErrorKind::BadPack { expect: *expect }, e))?;
    measure::tree_size(repo, &odb, commit.tree_id(), limits)
        .map_err(|e| measure_error(repo_path, Action::Unpack, expect, e))?;
    Ok(())
}

/// Turns a failed measurement into the error of `action` on `commit`.
pub(crate) fn measure_error(repo_path: &Path, action: Action, commit: &CommitId, e: MeasureError) -> GitError {
    match e {
        MeasureError::TooLarge(detail) => {
            GitError::bare(repo_path, GitErrorKind::TooLarge { action, commit: *commit, detail })
        }
        MeasureError::Unreadable { object, path, source } => {
            let kind = match action {
                Action::Unpack => GitErrorKind::Incomplete { expect: *commit, object: object.to_string(), path },
                Action::Checkout => GitErrorKind::Checkout { commit: *commit, path: path.into() },
                Action::Pack => GitErrorKind::Pack { want: *commit },
            };
            GitError::new(repo_path, kind, source)
        }
    }
}

/// Writes `commit`'s tree into `dest`; see [`crate::ObjectStore::checkout`].
pub(crate) fn checkout(
    repo: &Repository,
    repo_path: &Path,
    commit: &CommitId,
    dest: &Path,
    limits: &Limits,
) -> Result<(), GitError> {
    let write_error = |path: &Path, e: io::Error| {
        GitError::new(repo_path, GitErrorKind::Checkout { commit: *commit, path: path.to_owned() }, e)
    };
    let object_error = |path: &Path, e: git2::Error| {
        GitError::new(repo_path, GitErrorKind::Checkout { commit: *commit, path: path.to_owned() }, e)
    };

    let root = crate::find_commit(repo, repo_path, commit)?.tree_id();
    // Measure before writing anything: every blob's size from its header, and
    // the total the checkout will write. The objects cannot change afterwards
    // (their ids are their content), so the walk below writes what was measured.
    let odb = repo.odb().map_err(|e| object_error(dest, e))?;
    measure::tree_size(repo, &odb, root, limits).map_err(|e| measure_error(repo_path, Action::Checkout, commit, e))?;
    prepare_destination(dest).map_err(|e| match e {
        Prepare::NotEmpty => GitError::bare(repo_path, GitErrorKind::DestinationNotEmpty { dest: dest.to_owned() }),
        Prepare::Io(e) => write_error(dest, e),
    })?;

    // Each item: a tree to write, the directory (already created) to write it
    // into, and its path relative to `dest` for error messages.
    let mut stack = vec![(root, dest.to_owned(), String::new())];
    while let Some((id, dir, rel)) = stack.pop() {
        let tree = repo.find_tree(id).map_err(|e| object_error(&dir, e))?;
        for entry in tree.iter() {
            let name = entry.name_bytes();
            let rel_child = child_path(&rel, name);
            if !is_safe_name(name) {
                return Err(GitError::bare(repo_path, GitErrorKind::UnsafePath { commit: *commit, path: rel_child }));
            }
            let target = dir.join(OsStr::from_bytes(name));
            match entry.filemode() {
                MODE_TREE => {
                    fs::create_dir(&target).map_err(|e| write_error(&target, e))?;
                    stack.push((entry.id(), target, rel_child));
                }
                MODE_GITLINK => {}
                mode => {
                    let blob = repo.find_blob(entry.id()).map_err(|e| object_error(&target, e))?;
                    let written = match mode {
                        MODE_LINK => symlink(OsStr::from_bytes(blob.content()), &target),
                        MODE_EXECUTABLE => write_new_file(&target, blob.content(), 0o777),
                        _ => write_new_file(&target, blob.content(), 0o666),
                    };
                    written.map_err(|e| write_error(&target, e))?;
                }
            }
        }
    }
    Ok(())
}

/// The path of entry `name` in the tree at `parent`, for messages only (lossy, and
/// not safe to use on the file system: `name` may not have been checked yet).
pub(crate) fn child_path(parent: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if parent.is_empty() { name.into_owned() } else { format!("{parent}/{name}") }
}

/// Why the destination could not be prepared.
enum Prepare {
    /// It exists and is not an empty directory.
    NotEmpty,
    /// The file system refused.
    Io(io::Error),
}

/// Makes sure `dest` is an empty directory, creating it and its parents if missing.
fn prepare_destination(dest: &Path) -> Result<(), Prepare> {
    // `symlink_metadata`, so that a symlink at `dest` counts as "exists, not a
    // directory" rather than sending the checkout wherever it points.
    match fs::symlink_metadata(dest) {
        Ok(meta) if meta.is_dir() => {
            let mut entries = fs::read_dir(dest).map_err(Prepare::Io)?;
            match entries.next() {
                None => Ok(()),
                Some(_) => Err(Prepare::NotEmpty),
            }
        }
        Ok(_) => Err(Prepare::NotEmpty),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).map_err(Prepare::Io)?;
            }
            fs::create_dir(dest).map_err(Prepare::Io)
        }
        Err(e) => Err(Prepare::Io(e)),
    }
}

/// Creates the file `path`, which must not exist (not even as a dangling
/// symlink), with `contents`. `mode` is filtered by the umask as usual.
fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    file.write_all(contents)
}

/// Whether a tree entry name is a single path component that is safe to create:
/// not empty, `.` or `..`, without `/` or NUL, and not `.git` in any case (git
/// refuses to check that out too, as it would plant repository metadata).
fn is_safe_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name != b"."
        && name != b".."
        && !name.contains(&b'/')
        && !name.contains(&0)
        && !name.eq_ignore_ascii_case(b".git")
}

#[cfg(test)]
mod tests {
    use super::is_safe_name;

    #[test]
    fn unsafe_names_are_refused() {
        for name in [&b""[..], b".", b"..", b"a/b", b"/etc", b"a\0b", b".git", b".GIT", b".Git"] {
            assert!(!is_safe_name(name), "{:?} passed", String::from_utf8_lossy(name));
        }
        for name in [&b"a"[..], b"...", b".gitignore", b"git", b"..a", b"\xff\xfe"] {
            assert!(is_safe_name(name), "{:?} refused", String::from_utf8_lossy(name));
        }
    }
}
