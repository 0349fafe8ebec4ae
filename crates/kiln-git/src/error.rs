//! The one error type of this crate, [`GitError`], and what went wrong, [`GitErrorKind`].
//!
//! Every operation of [`ObjectStore`](crate::ObjectStore) works on one repository, so
//! the error is a struct that always names that repository, with a `kind` saying which
//! step failed and on what (commit, branch, path). The underlying git2 or I/O error is
//! kept as the `source`, boxed, so that git2's types never appear in this crate's API.

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};

use kiln_proto::CommitId;

/// The cause of a [`GitError`]: a git2 error, an I/O error or a malformed id.
type Source = Box<dyn StdError + Send + Sync + 'static>;

/// A failed operation on an [`ObjectStore`](crate::ObjectStore).
///
/// Its message reads after "failed to …" and names the repository; the cause, if
/// any, is available through [`std::error::Error::source`].
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
// Boxed so that `Result<_, GitError>` stays one pointer wide on the happy path.
pub struct GitError(Box<Inner>);

/// The contents of a [`GitError`].
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(.repo, .kind))]
struct Inner {
    /// The repository the operation ran on, as given when it was opened.
    repo: PathBuf,
    /// Which step failed, and on what.
    kind: GitErrorKind,
    /// The lower-level error, if the failure came from git2 or the file system.
    #[source]
    source: Option<Source>,
}

/// Which step of an [`ObjectStore`](crate::ObjectStore) operation failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GitErrorKind {
    /// The repository could not be opened (missing, not a repository, unreadable).
    Open,
    /// A bare repository could not be created.
    Init,
    /// `refs/heads/<branch>` does not exist.
    NoSuchBranch {
        /// The branch asked for, without `refs/heads/`.
        branch: String,
    },
    /// `HEAD` could not be read, or does not name a branch (it is detached).
    HeadBranch,
    /// The branches under `refs/heads/` could not be listed.
    ListBranches,
    /// `refs/heads/<branch>` exists but could not be resolved to a commit.
    ReadBranch {
        /// The branch asked for, without `refs/heads/`.
        branch: String,
    },
    /// The commit is not in the repository (or the object is not a commit).
    MissingCommit {
        /// The commit asked for.
        commit: CommitId,
    },
    /// The commits recorded under `refs/kiln/commits/` could not be listed.
    ListRecorded,
    /// The ref recording a commit could not be written.
    Remember {
        /// The commit being recorded.
        commit: CommitId,
    },
    /// Listing the commits leading to a commit failed.
    Walk {
        /// The newest commit of the walk.
        to: CommitId,
    },
    /// Building a pack failed.
    Pack {
        /// The commit the pack was for.
        want: CommitId,
    },
    /// The pack bytes could not be indexed: not a pack, truncated, or corrupt.
    BadPack {
        /// The commit the pack was expected to bring.
        expect: CommitId,
    },
    /// After indexing the pack, an object of the expected commit is still missing.
    Incomplete {
        /// The commit the pack was expected to bring.
        expect: CommitId,
        /// The missing object's id (the commit itself, a tree or a blob).
        object: String,
        /// Where in the commit's tree the object sits (empty for the commit and its root tree).
        path: String,
    },
    /// The checkout destination exists and is not an empty directory.
    DestinationNotEmpty {
        /// The destination given.
        dest: PathBuf,
    },
    /// The commit's tree holds an entry whose name is not safe to write
    /// (empty, `.`, `..`, `.git`, or containing `/` or NUL).
    UnsafePath {
        /// The commit being checked out.
        commit: CommitId,
        /// The offending path, lossily decoded, relative to the tree's root.
        path: String,
    },
    /// An object, a commit's tree or a pack is larger than a cap of
    /// [`Limits`](crate::Limits); nothing was checked out, indexed or sent.
    TooLarge {
        /// What was being done.
        action: Action,
        /// The commit it was done for.
        commit: CommitId,
        /// Which cap, the size found and where.
        detail: crate::TooLarge,
    },
    /// Reading an object or writing a file during checkout failed.
    Checkout {
        /// The commit being checked out.
        commit: CommitId,
        /// The file or directory being written, or the destination.
        path: PathBuf,
    },
}

/// The operation a [`GitErrorKind::TooLarge`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// [`ObjectStore::unpack`](crate::ObjectStore::unpack).
    Unpack,
    /// [`ObjectStore::checkout`](crate::ObjectStore::checkout).
    Checkout,
    /// [`ObjectStore::pack`](crate::ObjectStore::pack).
    Pack,
}

impl GitError {
    /// Builds an error with a cause.
    pub(crate) fn new(repo: &Path, kind: GitErrorKind, source: impl Into<Source>) -> GitError {
        GitError(Box::new(Inner { repo: repo.to_owned(), kind, source: Some(source.into()) }))
    }

    /// Builds an error that has no lower-level cause.
    pub(crate) fn bare(repo: &Path, kind: GitErrorKind) -> GitError {
        GitError(Box::new(Inner { repo: repo.to_owned(), kind, source: None }))
    }

    /// The repository the failed operation ran on.
    pub fn repo(&self) -> &Path {
        &self.0.repo
    }

    /// Which step failed, and on what.
    pub fn kind(&self) -> &GitErrorKind {
        &self.0.kind
    }

    /// Whether the store itself could not be written or read (a full disk,
    /// a permission, an I/O error), as opposed to bad input such as a
    /// malformed pack: then the fault is this machine's, not the peer's.
    pub fn is_storage_failure(&self) -> bool {
        let Some(source) = &self.0.source else { return false };
        if let Some(io) = source.downcast_ref::<std::io::Error>() {
            return io.raw_os_error().is_some();
        }
        source.downcast_ref::<git2::Error>().is_some_and(|e| {
            matches!(e.class(), git2::ErrorClass::Os | git2::ErrorClass::Filesystem)
                || e.message().contains("No space left on device")
                || e.message().contains("Permission denied")
        })
    }
}

/// The message of a [`GitError`]: what failed, on what, in which repository.
fn describe<'a>(repo: &'a Path, kind: &'a GitErrorKind) -> Message<'a> {
    Message { repo, kind }
}

/// The message of a [`GitError`], formatted on demand.
struct Message<'a> {
    repo: &'a Path,
    kind: &'a GitErrorKind,
}

impl fmt::Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let repo = self.repo.display();
        match self.kind {
            GitErrorKind::Open => write!(f, "open git repository {repo}"),
            GitErrorKind::Init => write!(f, "create bare git repository {repo}"),
            GitErrorKind::NoSuchBranch { branch } => {
                write!(f, "find branch `{branch}` in {repo}: there is no refs/heads/{branch}")
            }
            GitErrorKind::HeadBranch => {
                write!(f, "find the branch HEAD names in {repo} (a detached HEAD names none: pass --branch)")
            }
            GitErrorKind::ListBranches => write!(f, "list the branches of {repo}"),
            GitErrorKind::ReadBranch { branch } => {
                write!(f, "resolve branch `{branch}` to a commit in {repo}")
            }
            GitErrorKind::MissingCommit { commit } => {
                write!(f, "find commit {commit} in {repo}")
            }
            GitErrorKind::ListRecorded => {
                write!(f, "list the commits recorded under refs/kiln/commits in {repo}")
            }
            GitErrorKind::Remember { commit } => {
                write!(f, "record commit {commit} under refs/kiln/commits in {repo}")
            }
            GitErrorKind::Walk { to } => write!(f, "list the commits leading to {to} in {repo}"),
            GitErrorKind::Pack { want } => write!(f, "build a pack for commit {want} from {repo}"),
            GitErrorKind::BadPack { expect } => {
                write!(f, "index a pack for commit {expect} into {repo}")
            }
            GitErrorKind::Incomplete { expect, object, path } => {
                write!(f, "unpack commit {expect} into {repo}: the pack lacks object {object}")?;
                if !path.is_empty() {
                    write!(f, " (at `{path}`)")?;
                }
                Ok(())
            }
            GitErrorKind::DestinationNotEmpty { dest } => write!(
                f,
                "check out into {}: it exists and is not an empty directory (repository {repo})",
                dest.display()
            ),
            GitErrorKind::UnsafePath { commit, path } => write!(
                f,
                "check out commit {commit} from {repo}: its tree has an entry `{path}` that is unsafe to write"
            ),
            GitErrorKind::TooLarge { action, commit, detail } => match action {
                Action::Unpack => write!(f, "unpack commit {commit} into {repo}: {detail}"),
                Action::Checkout => write!(f, "check out commit {commit} from {repo}: {detail}"),
                Action::Pack => write!(f, "build a pack for commit {commit} from {repo}: {detail}"),
            },
            GitErrorKind::Checkout { commit, path } => {
                write!(f, "check out commit {commit} from {repo}: could not write {}", path.display())
            }
        }
    }
}
