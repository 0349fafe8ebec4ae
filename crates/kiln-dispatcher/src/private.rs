//! File modes for what the dispatcher writes: its state directory and results
//! directory are `0700` and the files in them (database, results) `0600`,
//! because nobody but the dispatcher's user needs them. Directories made by
//! an older Kiln with looser modes are tightened at start, said once in the
//! log.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_proto::Escaped;
use tracing::info;

/// The mode of every directory the dispatcher makes.
pub const DIR_MODE: u32 = 0o700;
/// The mode of every file the dispatcher writes.
pub const FILE_MODE: u32 = 0o600;

/// Why a path could not be made private.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}")]
pub struct PrivateError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl PrivateError {
    /// An I/O failure doing `action` on `path`.
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> PrivateError {
        PrivateError { action, path: path.to_owned(), source }
    }
}

fn err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> PrivateError {
    let path = path.to_owned();
    move |source| PrivateError { action, path, source }
}

/// Creates `path` (and its parents) if missing, and sets its mode to
/// [`DIR_MODE`], logging when an existing directory was looser.
pub fn dir(path: &Path) -> Result<(), PrivateError> {
    if !path.exists() {
        // Made private from the start, so only an older, looser one is logged.
        fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(path).map_err(err("create directory", path))?;
    }
    tighten(path, DIR_MODE)
}

/// Sets an existing path's permission bits to `mode` if they differ, and
/// says so in the log. A missing path is left alone.
pub fn tighten(path: &Path, mode: u32) -> Result<(), PrivateError> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err("read the mode of", path)(e)),
    };
    let old = meta.permissions().mode() & 0o7777;
    if old != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err("set the mode of", path))?;
        info!(path = %Escaped(&path.display().to_string()), old = format!("{old:04o}"), new = format!("{mode:04o}"), "tightened permissions");
    }
    Ok(())
}

/// Creates (or truncates) a file only its owner can read and write.
pub fn create_file(path: &Path) -> std::io::Result<fs::File> {
    fs::OpenOptions::new().write(true).create(true).truncate(true).mode(FILE_MODE).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn directories_are_made_and_tightened_and_files_are_private() {
        let top = tempfile::tempdir().unwrap();
        let fresh = top.path().join("a/b");
        dir(&fresh).unwrap();
        assert_eq!(mode(&fresh), DIR_MODE);
        let loose = top.path().join("loose");
        fs::create_dir(&loose).unwrap();
        fs::set_permissions(&loose, fs::Permissions::from_mode(0o755)).unwrap();
        dir(&loose).unwrap();
        assert_eq!(mode(&loose), DIR_MODE);
        let file = loose.join("f");
        create_file(&file).unwrap();
        assert_eq!(mode(&file), FILE_MODE);
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        // An existing file keeps its mode on open; tightening fixes it.
        create_file(&file).unwrap();
        tighten(&file, FILE_MODE).unwrap();
        assert_eq!(mode(&file), FILE_MODE);
        tighten(&top.path().join("missing"), FILE_MODE).unwrap();
    }
}
