//! What the runner's operator allows plugins to do, and the start-up step
//! that turns allowed program names into absolute paths.
//!
//! Programs are resolved once, at start-up, so that a command a plugin runs
//! can be started with a cleared environment (no `PATH` lookup of the
//! runner's own) and so that the log can show exactly which binary plugins
//! will run.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::HostError;

/// What the runner's operator allows plugins to do, and their limits.
#[derive(Clone, Debug)]
pub struct Policy {
    /// The programs plugins may start, by bare name, with the absolute path
    /// each one resolves to (see [`Policy::resolve_programs`]). A plugin gets
    /// the ones it also asks for.
    pub programs: BTreeMap<String, PathBuf>,
    /// Wall-clock limit for one command; the whole process group is killed
    /// when it runs out. A plugin may ask for less, never more.
    pub command_timeout: Duration,
    /// Bytes kept of each of a command's stdout and stderr; beyond that the
    /// head and tail are kept, with a marker saying how much was cut.
    pub max_output: usize,
    /// Time one plugin call may spend running WebAssembly (enforced by epoch
    /// interruption). Time spent waiting in `run-command` does not count: the
    /// command timeout bounds that.
    pub call_timeout: Duration,
    /// Linear-memory limit for one plugin instance, in bytes.
    pub max_memory: usize,
    /// Directories no command may see, even where one lies beneath a
    /// directory the sandbox binds into a command's root (a work directory
    /// under `/usr/local`, an identity beside a pyenv installation): the
    /// runner's work directory and its identity.
    pub hidden: Vec<PathBuf>,
}

impl Policy {
    /// A runner's policy: `programs` (see [`Policy::resolve_programs`]),
    /// the per-command (per-file) time limit, the directories to hide, and
    /// the runner's fixed limits. `kiln runner` and `kiln plugin run` both
    /// use it, so a plugin behaves the same under either.
    pub fn runner(programs: BTreeMap<String, PathBuf>, command_timeout: Duration, hidden: Vec<PathBuf>) -> Policy {
        Policy {
            programs,
            command_timeout,
            // Generous for test output, small enough that a flood cannot
            // exhaust the runner.
            max_output: 4 << 20,
            // Time spent in WebAssembly itself, per file of a batch; waiting
            // on commands does not count.
            call_timeout: Duration::from_secs(60),
            max_memory: 256 << 20,
            hidden,
        }
    }

    /// Resolves bare program names to absolute paths: each is looked up on
    /// `PATH` and canonicalized.
    ///
    /// Python interpreters (names starting with `python`) are asked for
    /// `sys.executable` instead: the `python3` on `PATH` is often a pyenv or
    /// asdf shim script that needs the runner's environment to find the real
    /// interpreter, and commands run with a cleared one. That path is not
    /// canonicalized, because a virtualenv's interpreter is a symlink whose
    /// location selects the virtualenv.
    pub fn resolve_programs(names: &[&str]) -> Result<BTreeMap<String, PathBuf>, HostError> {
        let search_path = std::env::var_os("PATH").unwrap_or_default();
        let mut programs = BTreeMap::new();
        for &name in names {
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                return Err(HostError::ProgramName { name: name.to_owned() });
            }
            let found = std::env::split_paths(&search_path)
                .filter(|dir| dir.is_absolute())
                .map(|dir| dir.join(name))
                .find(|candidate| is_executable(candidate))
                .ok_or_else(|| HostError::ProgramNotFound { name: name.to_owned() })?;
            let resolved = if name.starts_with("python") {
                python_executable(name, &found)?
            } else {
                std::fs::canonicalize(&found).map_err(|e| HostError::ProgramUnresolvable {
                    name: name.to_owned(),
                    path: found.clone(),
                    detail: e.to_string(),
                })?
            };
            programs.insert(name.to_owned(), resolved);
        }
        Ok(programs)
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Asks the interpreter found at `found` (in the runner's own environment,
/// which a shim needs) where the real interpreter is.
fn python_executable(name: &str, found: &Path) -> Result<PathBuf, HostError> {
    let unresolvable =
        |detail: String| HostError::ProgramUnresolvable { name: name.to_owned(), path: found.to_owned(), detail };
    let output = Command::new(found)
        .args(["-c", "import sys; sys.stdout.write(sys.executable or '')"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| unresolvable(format!("could not run it: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(unresolvable(format!(
            "asking it for sys.executable failed ({}): {}",
            output.status,
            stderr.trim()
        )));
    }
    let path = PathBuf::from(OsStr::from_bytes(&output.stdout));
    if !path.is_absolute() || !is_executable(&path) {
        return Err(unresolvable(format!("its sys.executable `{}` is not an executable file", path.display())));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_bare_names_only() {
        let programs = Policy::resolve_programs(&["sh"]).unwrap();
        assert!(programs["sh"].is_absolute());
        assert!(matches!(Policy::resolve_programs(&["/bin/sh"]), Err(HostError::ProgramName { .. })));
        assert!(matches!(Policy::resolve_programs(&["kiln-no-such-program"]), Err(HostError::ProgramNotFound { .. })));
    }
}
