//! The test files of a commit, read from its tree without checking it out:
//! the dispatcher splits a commit into batches from this list, so it must
//! name exactly the files a runner's checkout will hold as regular files
//! under `tests/` (what `kiln_plugin_host::test_files` lists there).

use git2::{Oid, Repository};
use kiln_proto::CommitId;

use crate::checkout::{MODE_GITLINK, MODE_TREE, child_path};
use crate::{GitError, GitErrorKind, ObjectStore};

/// A symbolic link; the blob holds the link's target.
const MODE_LINK: i32 = 0o120_000;

/// The regular files under a commit's `tests/`, and the links not followed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeTests {
    /// Regular (or executable) files under `tests/`, as sorted `/` paths.
    pub files: Vec<String>,
    /// Symlinks that lead outside the checkout, as sorted `(path, target)`:
    /// `tests` itself if it is a link, and links under it whose target
    /// climbs out (read lexically, as the runner does). None is followed.
    pub outside_links: Vec<(String, String)>,
}

impl TreeTests {
    /// One warning naming every link in [`outside_links`](Self::outside_links),
    /// worded as the runner's own listing words it.
    pub fn warning(&self) -> Option<String> {
        if self.outside_links.is_empty() {
            return None;
        }
        let links: Vec<String> = self
            .outside_links
            .iter()
            .map(|(path, target)| format!("{} -> {}", kiln_proto::escaped(path), kiln_proto::escaped(target)))
            .collect();
        Some(format!("symlinks that could lead outside the checkout were not followed: {}", links.join(", ")))
    }
}

impl ObjectStore {
    /// Lists the test files of `commit` (see [`TreeTests`]).
    pub fn test_files(&self, commit: &CommitId) -> Result<TreeTests, GitError> {
        let c = self.find_commit(commit)?;
        let read = |e: git2::Error| self.error(GitErrorKind::MissingCommit { commit: *commit }, e);
        let root = c.tree().map_err(read)?;
        let mut found = TreeTests::default();
        let Some(entry) = root.get_name("tests") else { return Ok(found) };
        match entry.filemode() {
            MODE_TREE => {}
            MODE_LINK => {
                let target = link_target(&self.repo, entry.id()).map_err(read)?;
                found.outside_links.push(("tests".to_owned(), target));
                return Ok(found);
            }
            _ => return Ok(found),
        }
        let mut stack: Vec<(Oid, String)> = vec![(entry.id(), "tests".to_owned())];
        while let Some((id, dir)) = stack.pop() {
            let tree = self.repo.find_tree(id).map_err(read)?;
            for entry in tree.iter() {
                let path = child_path(&dir, entry.name_bytes());
                match entry.filemode() {
                    MODE_TREE => stack.push((entry.id(), path)),
                    MODE_GITLINK => {}
                    MODE_LINK => {
                        let target = link_target(&self.repo, entry.id()).map_err(read)?;
                        if leaves(&path, &target) {
                            found.outside_links.push((path, target));
                        }
                    }
                    _ => found.files.push(path),
                }
            }
        }
        found.files.sort();
        found.outside_links.sort();
        Ok(found)
    }
}

fn link_target(repo: &Repository, id: Oid) -> Result<String, git2::Error> {
    Ok(String::from_utf8_lossy(repo.find_blob(id)?.content()).into_owned())
}

/// Whether a link at `link` with `target` names a path outside the checkout,
/// read lexically like the runner's listing: an absolute target does, and
/// so does a relative one whose `..`s climb above the root.
fn leaves(link: &str, target: &str) -> bool {
    if target.starts_with('/') {
        return true;
    }
    let mut depth = link.split('/').count() - 1;
    for part in target.split('/') {
        match part {
            ".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return true,
            },
            "" | "." => {}
            _ => depth += 1,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::leaves;

    #[test]
    fn links_are_judged_lexically() {
        assert!(leaves("tests/a", "/etc"));
        assert!(leaves("tests/sub/up", "../../.."));
        assert!(!leaves("tests/inside.py", "../setup.py"));
        assert!(!leaves("tests/x", "y/../z"));
        assert!(leaves("tests/x", "../../z"));
    }
}
