//! Which files of a checkout are candidates for the plugins: the regular
//! files under `tests/`. The runner and `kiln plugin run` both ask here, so a
//! local trial sees exactly what a runner would.

use std::path::{Component, Path, PathBuf};

/// The candidates under `tests/`, and the symlinks that were not followed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestFiles {
    /// The regular files under `tests/`, as sorted repository-relative `/` paths.
    pub files: Vec<String>,
    /// Symlinks that lead outside the checkout: `tests` itself if it is a
    /// symlink (wherever it points), and links under it whose target leaves
    /// the checkout; as sorted `(path, target)` pairs. None is followed.
    pub outside_links: Vec<(String, String)>,
}

impl TestFiles {
    /// One warning naming every link in [`outside_links`](Self::outside_links), if there are any.
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

/// Lists the regular files under `tests/` (see [`TestFiles`]).
///
/// No symlink is followed, not even `tests` itself: a checkout must not lead
/// the runner outside it. Links within the checkout are skipped silently (the
/// file they name is listed where it really is, if under `tests/`); links that
/// lead out are reported in [`TestFiles::outside_links`].
pub fn test_files(checkout: &Path) -> std::io::Result<TestFiles> {
    let mut found = TestFiles::default();
    let root = checkout.join("tests");
    match std::fs::symlink_metadata(&root) {
        Ok(meta) if meta.file_type().is_symlink() => {
            let target = std::fs::read_link(&root)?;
            found.outside_links.push(("tests".to_owned(), target.to_string_lossy().into_owned()));
            return Ok(found);
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    }
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            let Some(rel) = path.strip_prefix(checkout).ok().and_then(Path::to_str) else { continue };
            let rel = rel.replace(std::path::MAIN_SEPARATOR, "/");
            if kind.is_symlink() {
                let target = std::fs::read_link(&path)?;
                if leaves(Path::new(&rel), &target) {
                    found.outside_links.push((rel, target.to_string_lossy().into_owned()));
                }
            } else if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                found.files.push(rel);
            }
        }
    }
    found.files.sort();
    found.outside_links.sort();
    Ok(found)
}

/// Whether a link at `link` (relative to the checkout) with `target` names a
/// path outside the checkout, read lexically: an absolute target does, and so
/// does a relative one whose `..`s climb above the checkout's root.
fn leaves(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return true;
    }
    let mut at: PathBuf = link.parent().map(Path::to_owned).unwrap_or_default();
    for part in target.components() {
        match part {
            Component::ParentDir => {
                if !at.pop() {
                    return true;
                }
            }
            Component::Normal(name) => at.push(name),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_files_under_tests_only_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("tests/sub")).unwrap();
        std::fs::write(root.join("tests/test_b.py"), "").unwrap();
        std::fs::write(root.join("tests/sub/test_a.py"), "").unwrap();
        std::fs::write(root.join("setup.py"), "").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("tests/escape")).unwrap();
        std::os::unix::fs::symlink("../../..", root.join("tests/sub/up")).unwrap();
        std::os::unix::fs::symlink("../setup.py", root.join("tests/inside.py")).unwrap();
        let found = test_files(root).unwrap();
        assert_eq!(found.files, vec!["tests/sub/test_a.py", "tests/test_b.py"]);
        assert_eq!(
            found.outside_links,
            vec![("tests/escape".to_owned(), "/etc".to_owned()), ("tests/sub/up".to_owned(), "../../..".to_owned())]
        );
        assert_eq!(
            found.warning().unwrap(),
            "symlinks that could lead outside the checkout were not followed: tests/escape -> /etc, tests/sub/up -> ../../.."
        );
        assert_eq!(test_files(&root.join("missing")).unwrap(), TestFiles::default());
    }

    #[test]
    fn a_tests_symlink_is_reported_and_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/usr", dir.path().join("tests")).unwrap();
        let found = test_files(dir.path()).unwrap();
        assert!(found.files.is_empty(), "{found:?}");
        assert_eq!(found.outside_links, vec![("tests".to_owned(), "/usr".to_owned())]);
        // Even a link to a directory inside the checkout is not followed.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/test_x.py"), "").unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("tests")).unwrap();
        assert_eq!(test_files(dir.path()).unwrap().files, Vec::<String>::new());
    }

    #[test]
    fn links_are_judged_lexically() {
        for (link, target, out) in [
            ("tests/a", "/x", true),
            ("tests/a", "..", false),
            ("tests/a", "../..", true),
            ("tests/s/a", "../../b", false),
            ("tests/s/a", "./../../../b", true),
            ("tests/a", "b/../../..", true),
        ] {
            assert_eq!(leaves(Path::new(link), Path::new(target)), out, "{link} -> {target}");
        }
    }
}
