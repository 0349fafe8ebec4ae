//! The runner's Python interpreters, for the interpreter matrix: found once
//! at start-up from `kiln runner --python GLOB` (default: the `python3` on
//! `PATH`), each asked its exact version, reported to the dispatcher at
//! registration, and chosen per batch by the version the batch is for.
//!
//! Each match is run once (`-c` printing `platform.python_version()` and
//! `sys.executable`, with a timeout) in the runner's own environment, as a
//! pyenv shim needs; what is kept is the real interpreter it names, so
//! sandboxed commands never go through a shim. A glob that matches nothing,
//! or a match that does not answer as a Python, stops the runner with an
//! error naming it: a runner that silently had fewer interpreters than its
//! operator listed would leave commits queued with no hint why.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one interpreter may take to say its version.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One interpreter the runner has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interpreter {
    /// Its exact version, `3.12.7`.
    pub version: String,
    /// The real interpreter (no shim), absolute.
    pub path: PathBuf,
}

/// Why the interpreters could not be found.
#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    /// The pattern is not one this runner reads.
    #[error("--python {glob}: {why}")]
    BadGlob {
        /// The pattern as given.
        glob: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Nothing matches the pattern.
    #[error("--python {0}: matches no file")]
    NoMatch(String),
    /// A match did not answer as a Python interpreter.
    #[error("--python {glob}: {} is not a Python interpreter: {why}", path.display())]
    NotPython {
        /// The pattern.
        glob: String,
        /// The file it matched.
        path: PathBuf,
        /// What happened when it was asked its version.
        why: String,
    },
}

/// The interpreters `globs` match, in the order given (within a glob, in
/// path order), one per real interpreter.
pub async fn find(globs: &[String]) -> Result<Vec<Interpreter>, PythonError> {
    let mut found: Vec<Interpreter> = Vec::new();
    for glob in globs {
        let matches = expand(glob)?;
        if matches.is_empty() {
            return Err(PythonError::NoMatch(glob.clone()));
        }
        for path in matches {
            let interpreter = probe(&path).await.map_err(|why| PythonError::NotPython {
                glob: glob.clone(),
                path: path.clone(),
                why,
            })?;
            if !found.iter().any(|i| i.path == interpreter.path) {
                found.push(interpreter);
            }
        }
    }
    Ok(found)
}

/// Asks the interpreter at `path` its exact version and its real path.
pub async fn probe(path: &Path) -> Result<Interpreter, String> {
    let script = "import platform, sys; print(platform.python_version()); print(sys.executable or '')";
    let output = tokio::process::Command::new(path)
        .args(["-c", script])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = match tokio::time::timeout(PROBE_TIMEOUT, output).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("it could not be run ({e})")),
        Err(_) => return Err(format!("it did not answer within {PROBE_TIMEOUT:?}")),
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        return Err(format!("`-c 'import platform'` failed ({}): {}", output.status, kiln_proto::escaped(last)));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let mut lines = stdout.lines();
    let version = lines.next().unwrap_or_default().trim().to_owned();
    let exact = version.split('.').count() == 3 && version.split('.').all(|p| p.parse::<u32>().is_ok());
    if version.is_empty() {
        return Err("it printed no version".to_owned());
    }
    if !exact {
        return Err(format!("it said its version is `{}`", kiln_proto::escaped(&version)));
    }
    let real = lines.next().map(str::trim).filter(|p| !p.is_empty()).map(PathBuf::from);
    let real = match real {
        Some(p) if p.is_absolute() => std::fs::canonicalize(&p).unwrap_or(p),
        _ => std::fs::canonicalize(path).map_err(|e| format!("its path cannot be resolved ({e})"))?,
    };
    Ok(Interpreter { version, path: real })
}

/// The files an absolute pattern matches: `*` and `?` within one path
/// component (as a shell does; no `**`, no brackets), sorted.
pub fn expand(glob: &str) -> Result<Vec<PathBuf>, PythonError> {
    let bad = |why| PythonError::BadGlob { glob: glob.to_owned(), why };
    if !glob.starts_with('/') {
        return Err(bad("must be an absolute path, such as /opt/python/*/bin/python3"));
    }
    if glob.contains(['[', ']', '{', '}']) || glob.contains("**") {
        return Err(bad("only `*` and `?` are supported as wildcards"));
    }
    let mut paths = vec![PathBuf::from("/")];
    for part in glob.split('/').filter(|p| !p.is_empty()) {
        if part == ".." {
            return Err(bad("may not contain `..`"));
        }
        let mut next = Vec::new();
        for dir in &paths {
            if !part.contains(['*', '?']) {
                let path = dir.join(part);
                if std::fs::symlink_metadata(&path).is_ok() {
                    next.push(path);
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(dir) else { continue };
            let mut names: Vec<String> =
                entries.filter_map(Result::ok).filter_map(|e| e.file_name().into_string().ok()).collect();
            names.sort();
            // A hidden entry matches only a pattern that says so, as in a shell.
            let hidden_ok = part.starts_with('.');
            next.extend(
                names
                    .into_iter()
                    .filter(|n| (hidden_ok || !n.starts_with('.')) && wildcard(part.as_bytes(), n.as_bytes()))
                    .map(|n| dir.join(n)),
            );
        }
        paths = next;
    }
    paths.retain(|p| p.is_file());
    Ok(paths)
}

/// Whether `name` matches `pattern` (`*`: any run of bytes, `?`: one byte).
fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => wildcard(&pattern[1..], name) || (!name.is_empty() && wildcard(pattern, &name[1..])),
        (Some(b'?'), Some(_)) => wildcard(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => wildcard(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// The interpreter of `interpreters` that serves the matrix entry
/// `wanted` (`3.12` is served by `3.12.7`): the first that does.
pub fn choose<'a>(interpreters: &'a [Interpreter], wanted: &str) -> Option<&'a Interpreter> {
    interpreters.iter().find(|i| {
        let mut exact = i.version.split('.');
        wanted.split('.').all(|part| exact.next() == Some(part))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_within_a_component() {
        assert!(wildcard(b"3.*", b"3.12.1"));
        assert!(wildcard(b"python3.1?", b"python3.12"));
        assert!(!wildcard(b"python3.1?", b"python3.1"));
        assert!(wildcard(b"*", b""));
        assert!(!wildcard(b"3.*", b"2.7.18"));
    }

    #[test]
    fn globs_expand_to_sorted_files_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["3.12.1", "3.11.7", ".hidden"] {
            std::fs::create_dir_all(dir.path().join(v).join("bin")).unwrap();
            std::fs::write(dir.path().join(v).join("bin/python3"), "").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("3.10.0/bin/python3")).unwrap(); // a directory, not a file
        let glob = format!("{}/*/bin/python3", dir.path().display());
        let found = expand(&glob).unwrap();
        assert_eq!(found, [dir.path().join("3.11.7/bin/python3"), dir.path().join("3.12.1/bin/python3")]);
        assert!(expand(&format!("{}/nothing*/python3", dir.path().display())).unwrap().is_empty());
        for bad in ["python3", "bin/*/python3", "/opt/[a-z]/python3", "/opt/**/python3", "/opt/../python3"] {
            let err = expand(bad).unwrap_err().to_string();
            assert!(err.starts_with(&format!("--python {bad}: ")), "{err}");
        }
    }

    #[tokio::test]
    async fn a_file_that_is_not_python_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("python3");
        std::fs::write(&fake, "#!/bin/sh\necho not python\n").unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let glob = fake.display().to_string();
        let err = find(std::slice::from_ref(&glob)).await.unwrap_err().to_string();
        assert_eq!(
            err,
            format!("--python {glob}: {glob} is not a Python interpreter: it said its version is `not python`")
        );
        let err = find(&[format!("{}/none*", dir.path().display())]).await.unwrap_err().to_string();
        assert!(err.ends_with(": matches no file"), "{err}");
    }

    #[tokio::test]
    async fn the_machines_python_says_its_exact_version() {
        // /usr/bin/python3 is on every machine these tests run on (.ci/test installs it).
        let found = find(&["/usr/bin/python3".to_owned()]).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].version.split('.').count(), 3, "{found:?}");
        assert!(found[0].path.is_absolute());
        let wanted: String = found[0].version.rsplit_once('.').unwrap().0.to_owned();
        assert_eq!(choose(&found, &wanted), Some(&found[0]));
        assert_eq!(choose(&found, "2.1"), None);
    }
}
