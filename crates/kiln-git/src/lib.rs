//! Git access for Kiln: the only crate that names git2.
//!
//! Kiln moves source code as git packs. The observer reads the watched repository
//! and sends the dispatcher a pack of the objects the dispatcher lacks; the
//! dispatcher keeps them in a bare mirror repository; a runner asks the dispatcher
//! for a commit, saying which commits it already has, receives a pack of just the
//! missing objects, indexes it into its own bare object cache and checks the
//! commit out into a fresh per-job directory. All three sides use the same small
//! API, [`ObjectStore`].
//!
//! Design decisions:
//!
//! - **Recorded commits are refs.** Every commit a store has received in full is
//!   named by `refs/kiln/commits/<id>`. The refs keep the objects alive through
//!   `git gc` and are the list a runner offers as "haves".
//! - **Packs are checked, not trusted.** Pack bytes come from the network. Indexing
//!   recomputes every object id from its content, so objects cannot be forged; after
//!   indexing, [`ObjectStore::unpack`] walks the expected commit's whole tree and
//!   refuses the commit if anything is missing. Garbage is an error, never a panic.
//! - **Checkout is our own tree walk**, not libgit2's checkout: a runner's cache is
//!   bare, we want the exact blob bytes (no `.gitattributes` filters, no index),
//!   and we want one obvious place that guarantees nothing is written outside the
//!   destination (see [`ObjectStore::checkout`]).
//! - **Expansion is bounded.** Every store applies [`Limits`] (caps on one
//!   object's uncompressed size, on one commit's checked-out files and on one
//!   pack's uncompressed objects): `unpack` scans the pack stream before libgit2
//!   sees it, and `unpack`, `checkout` and `pack` measure the commit's tree with
//!   header reads before inflating anything (see `limits.rs`). A 1 GiB blob of
//!   zeros, 1 MiB on the wire, is refused without being inflated.
//! - git2's error type never crosses the API: everything fails with [`GitError`],
//!   which keeps the git2 error as its `source`.
//!
//! Every call blocks; async callers run them inside `spawn_blocking`, which is why
//! [`ObjectStore`] is `Send`. It is not `Sync`: open one per thread.
//!
//! Unix only: checkouts create symlinks and set executable bits.

mod checkout;
mod config;
mod error;
mod limits;
mod list;
mod measure;
mod scan;
mod work;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use git2::{Oid, Repository, RepositoryInitOptions};
use kiln_proto::CommitId;

pub use error::{Action, GitError, GitErrorKind};
pub use limits::{Cap, Limits, Place, TooLarge};
pub use list::TreeTests;
pub use work::{Open, with_store};

/// The namespace of the refs that record commits a store holds in full.
const RECORDED_PREFIX: &str = "refs/kiln/commits/";

/// A git repository used as an object store: the watched repository itself
/// (observer), the dispatcher's bare mirror, or a runner's bare object cache.
pub struct ObjectStore {
    /// The open repository. `git2::Repository` is `Send` but not `Sync`, and so is this.
    repo: Repository,
    /// The path the store was opened with, for error messages.
    path: PathBuf,
    /// The caps on what `unpack`, `checkout` and `pack` handle.
    limits: Limits,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl ObjectStore {
    /// Opens an existing repository (bare or with a work tree) at `path`.
    ///
    /// `path` must be the repository itself (the work tree or the bare directory);
    /// parent directories are not searched.
    pub fn open(path: &Path) -> Result<ObjectStore, GitError> {
        let repo = Repository::open(path).map_err(|e| GitError::new(path, GitErrorKind::Open, e))?;
        Ok(ObjectStore { repo, path: path.to_owned(), limits: Limits::default() })
    }

    /// Opens the bare repository at `path`, creating it (and parent dirs) if missing.
    ///
    /// A missing path or an empty directory gets a new bare repository; anything
    /// else must already be a bare repository, so that a mistyped path never turns
    /// an unrelated directory into a repository.
    pub fn open_or_init_bare(path: &Path) -> Result<ObjectStore, GitError> {
        let create = match fs::read_dir(path) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            // Not a directory, or unreadable: let opening report it.
            Err(_) => false,
        };
        let repo = if create {
            // Build the repository beside its final place and rename it in, so a
            // process killed half-way leaves no half-made repository that the
            // next start would refuse.
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let staging = path.with_file_name(format!(".{name}.init-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&staging);
            Repository::init_opts(
                &staging,
                RepositoryInitOptions::new()
                    .bare(true)
                    .mkpath(true)
                    // The system's template directory only holds sample hooks and
                    // descriptions, which a cache has no use for.
                    .external_template(false),
            )
            .map_err(|e| GitError::new(path, GitErrorKind::Init, e))?;
            // An empty directory at `path` is replaced; rename cannot replace a non-empty one.
            if path.is_dir() {
                let _ = fs::remove_dir(path);
            }
            if let Err(e) = fs::rename(&staging, path) {
                let _ = fs::remove_dir_all(&staging);
                // Another thread or process may have created it first; that one will do.
                if Repository::open_bare(path).is_err() {
                    return Err(GitError::new(path, GitErrorKind::Init, e));
                }
            }
            Repository::open_bare(path).map_err(|e| GitError::new(path, GitErrorKind::Open, e))?
        } else {
            Repository::open_bare(path).map_err(|e| GitError::new(path, GitErrorKind::Open, e))?
        };
        Ok(ObjectStore { repo, path: path.to_owned(), limits: Limits::default() })
    }

    /// This store with `limits` instead of [`Limits::default`].
    pub fn with_limits(mut self, limits: Limits) -> ObjectStore {
        self.limits = limits;
        self
    }

    /// The path this store was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The commit `refs/heads/<branch>` points at (error naming the branch and repo if missing).
    ///
    /// A missing branch fails with [`GitErrorKind::NoSuchBranch`], so a caller can tell
    /// "not created yet" apart from a broken repository.
    pub fn branch_head(&self, branch: &str) -> Result<CommitId, GitError> {
        let read_error = || GitErrorKind::ReadBranch { branch: branch.to_owned() };
        let name = format!("refs/heads/{branch}");
        let reference = match self.repo.find_reference(&name) {
            Ok(reference) => reference,
            Err(e) if e.code() == git2::ErrorCode::NotFound => {
                return Err(self.error(GitErrorKind::NoSuchBranch { branch: branch.to_owned() }, e));
            }
            Err(e) => return Err(self.error(read_error(), e)),
        };
        let commit = reference.peel_to_commit().map_err(|e| self.error(read_error(), e))?;
        to_commit_id(commit.id()).map_err(|e| self.error(read_error(), e))
    }

    /// The branch `HEAD` names, without `refs/heads/`: what `git init` or a
    /// clone checked out (`master` or `main`, say), even before its first commit.
    ///
    /// A detached `HEAD` names no branch and fails with [`GitErrorKind::HeadBranch`].
    pub fn head_branch(&self) -> Result<String, GitError> {
        let head = self.repo.find_reference("HEAD").map_err(|e| self.error(GitErrorKind::HeadBranch, e))?;
        match head.symbolic_target().ok().flatten().and_then(|t| t.strip_prefix("refs/heads/")) {
            Some(branch) => Ok(branch.to_owned()),
            None => Err(GitError::bare(&self.path, GitErrorKind::HeadBranch)),
        }
    }

    /// The names of the branches under `refs/heads/`, sorted (names that are
    /// not UTF-8 are left out).
    pub fn branch_names(&self) -> Result<Vec<String>, GitError> {
        let list_error = |e: git2::Error| self.error(GitErrorKind::ListBranches, e);
        let mut names = Vec::new();
        for reference in self.repo.references_glob("refs/heads/*").map_err(list_error)? {
            let reference = reference.map_err(list_error)?;
            if let Some(name) = reference.name().ok().and_then(|n| n.strip_prefix("refs/heads/")) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Whether the commit object is present.
    pub fn has_commit(&self, id: &CommitId) -> bool {
        self.find_commit(id).is_ok()
    }

    /// Up to `limit` commits this store has recorded (see `unpack`/`remember`), newest first by commit time.
    ///
    /// Commits with equal times are ordered by id, so the answer is deterministic.
    /// A ref under `refs/kiln/commits/` that does not point at a present commit is
    /// skipped (and logged): it can only come from tampering, and one bad ref must
    /// not stop a runner from offering the rest.
    pub fn recorded_commits(&self, limit: usize) -> Result<Vec<CommitId>, GitError> {
        let list_error = |e: git2::Error| self.error(GitErrorKind::ListRecorded, e);
        let mut found: Vec<(i64, Oid)> = Vec::new();
        let glob = format!("{RECORDED_PREFIX}*");
        for reference in self.repo.references_glob(&glob).map_err(list_error)? {
            let reference = reference.map_err(list_error)?;
            let Some(oid) = reference.target() else {
                tracing::warn!(
                    repo = %self.path.display(),
                    reference = reference.name().unwrap_or("?"),
                    "skipping symbolic ref among recorded commits"
                );
                continue;
            };
            match self.repo.find_commit(oid) {
                Ok(commit) => found.push((commit.time().seconds(), oid)),
                Err(e) => tracing::warn!(
                    repo = %self.path.display(),
                    object = %oid,
                    error = %e,
                    "skipping recorded commit that is not present"
                ),
            }
        }
        found.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        found
            .into_iter()
            .take(limit)
            .map(|(_, oid)| to_commit_id(oid).map_err(|e| self.error(GitErrorKind::ListRecorded, e)))
            .collect()
    }

    /// Records `id` (which must be present) under `refs/kiln/commits/<id>` so it survives gc and is listed by [`recorded_commits`](Self::recorded_commits).
    pub fn remember(&self, id: &CommitId) -> Result<(), GitError> {
        let oid = self.find_commit(id)?.id();
        let name = format!("{RECORDED_PREFIX}{id}");
        match self.repo.reference(&name, oid, true, "kiln: remember commit") {
            Ok(_) => Ok(()),
            // Another process may be recording the same commit at the same moment
            // and hold the ref's lock; if the ref now says what we wanted, we are done.
            Err(_) if self.repo.refname_to_id(&name).ok() == Some(oid) => Ok(()),
            Err(e) => Err(self.error(GitErrorKind::Remember { commit: *id }, e)),
        }
    }

    /// The commits reachable from `to` and not from `from`, oldest first (parents
    /// before children), at most the newest `limit` of them. With `from` absent
    /// or unknown here (say, after a force push), just `to`.
    ///
    /// This is what an observer that tests every commit submits after a gap.
    pub fn commits_between(
        &self,
        from: Option<&CommitId>,
        to: &CommitId,
        limit: usize,
    ) -> Result<Vec<CommitId>, GitError> {
        let to_oid = self.find_commit(to)?.id();
        let walk_error = |e: git2::Error| self.error(GitErrorKind::Walk { to: *to }, e);
        let Some(from_oid) = from.and_then(|f| self.find_commit(f).ok()).map(|c| c.id()) else {
            return Ok(vec![*to]);
        };
        let mut walk = self.repo.revwalk().map_err(walk_error)?;
        walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::TIME).map_err(walk_error)?;
        walk.push(to_oid).map_err(walk_error)?;
        walk.hide(from_oid).map_err(walk_error)?;
        let mut newest_first = Vec::new();
        for oid in walk.take(limit) {
            let oid = oid.map_err(walk_error)?;
            newest_first.push(to_commit_id(oid).map_err(|e| self.error(GitErrorKind::Walk { to: *to }, e))?);
        }
        newest_first.reverse();
        Ok(newest_first)
    }

    /// A pack (bytes in git's pack format) holding every object reachable from `want` and not reachable from
    /// any of `haves`. Haves this store does not have are ignored (they come from the network).
    ///
    /// The pack is self-contained (no deltas against objects outside it). If `want`
    /// is reachable from a have, the pack holds no objects, and still unpacks.
    pub fn pack(&self, want: &CommitId, haves: &[CommitId]) -> Result<Vec<u8>, GitError> {
        let want_commit = self.find_commit(want)?;
        let want_oid = want_commit.id();
        let pack_error = |e: git2::Error| self.error(GitErrorKind::Pack { want: *want }, e);
        // Hiding an object the walk cannot load fails the whole walk, so only
        // commits that are really here are hidden.
        let hidden: Vec<Oid> = haves.iter().filter_map(|have| self.find_commit(have).ok()).map(|c| c.id()).collect();
        let walk = || -> Result<git2::Revwalk<'_>, git2::Error> {
            let mut walk = self.repo.revwalk()?;
            walk.push(want_oid)?;
            for &oid in &hidden {
                walk.hide(oid)?;
            }
            Ok(walk)
        };

        // Measure before building: the pack builder holds each object whole, so
        // an object over the caps must be refused before it is read.
        let measure_error = |e| checkout::measure_error(&self.path, Action::Pack, want, e);
        let odb = self.repo.odb().map_err(pack_error)?;
        measure::tree_size(&self.repo, &odb, want_commit.tree_id(), &self.limits).map_err(measure_error)?;
        let commits: Vec<Oid> = walk().map_err(pack_error)?.collect::<Result<_, _>>().map_err(pack_error)?;
        measure::pack_size(&self.repo, &odb, &commits, &hidden, &self.limits).map_err(measure_error)?;

        // The walk yields the commits to send; `insert_walk` adds their trees and
        // blobs, skipping everything reachable from the trees of the hidden commits.
        let mut builder = self.repo.packbuilder().map_err(pack_error)?;
        builder.insert_walk(&mut walk().map_err(pack_error)?).map_err(pack_error)?;
        let mut buf = git2::Buf::new();
        builder.write_buf(&mut buf).map_err(pack_error)?;
        tracing::debug!(
            repo = %self.path.display(),
            %want,
            haves = haves.len(),
            objects = builder.object_count(),
            bytes = buf.len(),
            "built pack"
        );
        Ok(buf.to_vec())
    }

    /// Indexes `pack` into this store, checks that `expect` is now present as a commit with its whole tree
    /// present, and remembers it. A pack that is garbage or lacks objects is an error, never a panic, and leaves
    /// the store usable.
    ///
    /// Objects of a pack that indexed cleanly stay in the store even when the
    /// check fails: they are valid objects (their ids are recomputed from their
    /// content), just not enough of them. Only a complete commit is remembered.
    ///
    /// Before indexing, the pack is scanned against this store's [`Limits`]
    /// (every object's uncompressed size, and their total), in fixed memory; a
    /// pack over them fails with [`GitErrorKind::TooLarge`] and is never indexed.
    pub fn unpack(&self, pack: &[u8], expect: &CommitId) -> Result<(), GitError> {
        let bad_pack = || GitErrorKind::BadPack { expect: *expect };
        scan::scan(pack, &self.limits).map_err(|e| match e {
            scan::ScanError::TooLarge(detail) => {
                self.error_bare(GitErrorKind::TooLarge { action: Action::Unpack, commit: *expect, detail })
            }
            scan::ScanError::Malformed(reason) => self.error(bad_pack(), reason),
        })?;
        let odb = self.repo.odb().map_err(|e| self.error(bad_pack(), e))?;
        {
            // Dropping the writer without `commit` (on any error below) deletes its
            // temporary pack file, which is what leaves the store as it was.
            let mut writer = odb.packwriter().map_err(|e| self.error(bad_pack(), e))?;
            if writer.write_all(pack).is_err() {
                // git2's `io::Write` for the pack writer reports every failure as
                // a bare "Write error"; the indexer's own message ("bad object
                // header", ...) is still in libgit2's thread-local last error.
                return Err(self.error(bad_pack(), git2::Error::last_error(-1)));
            }
            writer.commit().map_err(|e| self.error(bad_pack(), e))?;
        }
        // Make the new pack visible to lookups through this repository at once.
        odb.refresh().map_err(|e| self.error(bad_pack(), e))?;

        checkout::check_complete(&self.repo, &self.path, expect, &self.limits)?;
        tracing::debug!(
            repo = %self.path.display(),
            %expect,
            bytes = pack.len(),
            "unpacked commit"
        );
        self.remember(expect)
    }

    /// Writes the files of `commit`'s tree into `dest` (created; must not exist or be empty).
    /// Regular files keep the executable bit; symlinks are written as symlinks; submodules (gitlinks) are skipped.
    /// It must not write anything outside `dest` whatever the tree contains.
    ///
    /// Files get the exact blob bytes (no `.gitattributes` filters or line-ending
    /// conversion). An entry whose name is unsafe (empty, `.`, `..`, `.git` in any
    /// case, or containing `/` or NUL) fails the checkout, as it does in git. On
    /// error `dest` may hold a partial checkout; the caller owns and removes it.
    ///
    /// The tree is measured against this store's [`Limits`] first, from object
    /// headers; a tree over them fails with [`GitErrorKind::TooLarge`] before
    /// anything is written.
    pub fn checkout(&self, commit: &CommitId, dest: &Path) -> Result<(), GitError> {
        checkout::checkout(&self.repo, &self.path, commit, dest, &self.limits)
    }

    /// The commit `id`, or [`GitErrorKind::MissingCommit`].
    /// Whether `descendant` descends from `ancestor` (is `ancestor` itself, or
    /// has it among its parents' history). Both must be in this store.
    ///
    /// The dispatcher asks this before a newer commit supersedes an older one,
    /// so a rewritten or unrelated history never cancels work.
    pub fn is_ancestor(&self, ancestor: &CommitId, descendant: &CommitId) -> Result<bool, GitError> {
        let old = self.find_commit(ancestor)?.id();
        let new = self.find_commit(descendant)?.id();
        if old == new {
            return Ok(true);
        }
        self.repo.graph_descendant_of(new, old).map_err(|e| self.error(GitErrorKind::Walk { to: *descendant }, e))
    }

    /// The id of `commit`'s tree: two commits holding the same files have
    /// the same one (a re-run of a commit's content, a revert, an empty
    /// commit), which is how the dispatcher tells "the same code". `None`
    /// when the repository's object ids are not SHA-1.
    pub fn tree_of(&self, commit: &CommitId) -> Result<Option<kiln_proto::TreeId>, GitError> {
        Ok(to_commit_id(self.find_commit(commit)?.tree_id()).ok())
    }

    fn find_commit(&self, id: &CommitId) -> Result<git2::Commit<'_>, GitError> {
        find_commit(&self.repo, &self.path, id)
    }

    /// An error about this store, with no lower-level cause.
    fn error_bare(&self, kind: GitErrorKind) -> GitError {
        GitError::bare(&self.path, kind)
    }

    /// An error about this store.
    fn error(&self, kind: GitErrorKind, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> GitError {
        GitError::new(&self.path, kind, source)
    }
}

/// The commit `id` in `repo`, or [`GitErrorKind::MissingCommit`] (also when the
/// object exists but is not a commit).
fn find_commit<'r>(repo: &'r Repository, path: &Path, id: &CommitId) -> Result<git2::Commit<'r>, GitError> {
    let missing = || GitErrorKind::MissingCommit { commit: *id };
    let oid = Oid::from_str(id.as_str()).map_err(|e| GitError::new(path, missing(), e))?;
    repo.find_commit(oid).map_err(|e| GitError::new(path, missing(), e))
}

/// Converts a git2 object id to Kiln's commit id. Fails only for non-SHA-1 ids.
fn to_commit_id(oid: Oid) -> Result<CommitId, kiln_proto::model::BadCommitId> {
    oid.to_string().parse()
}
