//! A commit's repository configuration (`kiln.toml`, or `[tool.kiln]` in
//! `pyproject.toml`), read from its tree without checking it out: the
//! dispatcher validates it once per commit, before any runner sees the
//! commit, and sends the result with each of its batches.

use std::path::Path;

use kiln_proto::CommitId;
use kiln_proto::repo_config::{self, ConfigError, Kind, RepoConfig};

use crate::checkout::{MODE_GITLINK, MODE_TREE};
use crate::{GitError, GitErrorKind, ObjectStore};

/// The largest configuration file read; a larger one is refused by name.
const MAX_CONFIG_BYTES: usize = 1 << 20;
/// A symbolic link.
const MODE_LINK: i32 = 0o120_000;

impl ObjectStore {
    /// The configuration of `commit`: `Ok(Ok(None))` when it has none,
    /// `Ok(Err(problem))` when it has one that is unusable (the commit's
    /// error), `Err` when the store could not be read.
    pub fn repo_config(&self, commit: &CommitId) -> Result<Result<Option<RepoConfig>, ConfigError>, GitError> {
        let c = self.find_commit(commit)?;
        let read = |e: git2::Error| self.error(GitErrorKind::MissingCommit { commit: *commit }, e);
        let root = c.tree().map_err(read)?;
        let file = |name: &str| -> Result<Result<Option<Vec<u8>>, ConfigError>, GitError> {
            let refuse =
                |problem: &str| Ok(Err(ConfigError { source_file: name.to_owned(), problem: problem.to_owned() }));
            let Some(entry) = root.get_name(name) else { return Ok(Ok(None)) };
            match entry.filemode() {
                MODE_TREE | MODE_LINK | MODE_GITLINK => return refuse("not a regular file; Kiln reads it only as one"),
                _ => {}
            }
            let (size, _) = self.repo.odb().and_then(|odb| odb.read_header(entry.id())).map_err(read)?;
            if size > MAX_CONFIG_BYTES {
                return refuse(&format!("{size} bytes; Kiln reads at most {MAX_CONFIG_BYTES}"));
            }
            let blob = self.repo.find_blob(entry.id()).map_err(read)?;
            Ok(Ok(Some(blob.content().to_vec())))
        };
        let kiln_toml = match file(repo_config::KILN_TOML)? {
            Ok(bytes) => bytes,
            Err(problem) => return Ok(Err(problem)),
        };
        // Only read when it could matter: kiln.toml wins.
        let pyproject = match kiln_toml {
            Some(_) => None,
            // An odd pyproject.toml (a link, say) is the build backend's business.
            None => file(repo_config::PYPROJECT_TOML)?.unwrap_or_default(),
        };
        let kind = |path: &str| -> Option<Kind> {
            let entry = root.get_path(Path::new(path)).ok()?;
            Some(match entry.filemode() {
                MODE_TREE => Kind::Dir,
                MODE_LINK | MODE_GITLINK => Kind::Other,
                _ => Kind::File,
            })
        };
        Ok(repo_config::parse(kiln_toml.as_deref(), pyproject.as_deref(), &kind))
    }
}
