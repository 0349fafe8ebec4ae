//! Which files of a checkout are candidates for the plugins: the regular
//! files under `tests/`. The runner and `kiln plugin run` both ask here, so a
//! local trial sees exactly what a runner would.

use std::path::Path;

/// Lists the regular files under `tests/`, as sorted repository-relative `/` paths.
pub fn test_files(checkout: &Path) -> std::io::Result<Vec<String>> {
    let mut files = Vec::new();
    let mut stack = vec![checkout.join("tests")];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            // Symlinks are not followed: a checkout must not lead the runner outside it.
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file()
                && let Ok(rel) = path.strip_prefix(checkout)
                && let Some(rel) = rel.to_str()
            {
                files.push(rel.replace(std::path::MAIN_SEPARATOR, "/"));
            }
        }
    }
    files.sort();
    Ok(files)
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
        assert_eq!(test_files(root).unwrap(), vec!["tests/sub/test_a.py", "tests/test_b.py"]);
        assert!(test_files(&root.join("missing")).unwrap().is_empty());
    }
}
