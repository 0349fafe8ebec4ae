//! What a command's root filesystem holds, decided in the runner's process
//! (safe code: paths, `lstat`, `statvfs`) and written down as the
//! [`sys::RootPlan`] the child carries out between `fork` and `exec`.
//!
//! The root is a fresh tmpfs, read-only once built, holding only:
//!
//! | path | what | why |
//! |---|---|---|
//! | `/usr`, `/bin`, `/sbin`, `/lib*` | the host's, read-only (symbolic links where the host has them, as on a merged-`/usr` system) | the system toolchain and its libraries |
//! | each granted program's prefix | read-only, at its own path | an interpreter installed elsewhere (pyenv under `/root`, a virtualenv) |
//! | `/etc` | `ld.so.cache`, `localtime`, `nsswitch.conf`, `hosts` (read-only), and a `passwd` and `group` naming only root, the sandbox user and nobody | what the C library and Python read; not `shadow`, not the runner's configuration |
//! | `/checkout` | the job's checkout under an overlay of the command's own: new files, removals and renames land in the command's temporary directory, never in the checkout; its directories there belong to the sandbox user | suites that write beside their files keep working, and no command sees another's writes; only rewriting a file that came with the checkout fails (`EACCES`). Where the temporary directory's filesystem cannot hold an overlay's upper layer (an overlay itself, as in some containers), the checkout is bound read-only instead, and the probe says so |
//! | `/tmp` | the command's private temporary directory (`TMPDIR`) | scratch space nobody else sees |
//! | `/dev` | `null`, `zero`, `full`, `random`, `urandom` (the host's nodes), `fd` and `std*` links, and a private `shm` | no disks, no terminals, no kernel interfaces |
//! | `/proc` | a new `proc` of the command's PID namespace | lists only the command's processes |
//!
//! A directory the caller declares secret (the runner's work directory,
//! its identity) that lies beneath one of the bound directories gets an
//! empty, read-only tmpfs over it.

use std::collections::BTreeSet;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::sys::{MountStep, RootPlan};

/// Where the checkout is inside: the same path on every runner, so that
/// results (tracebacks) do not depend on a runner's work directory.
pub(crate) const CHECKOUT: &str = "/checkout";
/// The command's `TMPDIR` inside.
pub(crate) const TMP: &str = "/tmp";

/// The host directories of the system toolchain.
const SYSTEM: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
/// The files of `/etc` programs need, if the host has them.
const ETC: &[&str] = &["ld.so.cache", "localtime", "nsswitch.conf", "hosts"];
/// The device nodes a command gets.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// The host paths one command's root is made of.
pub(crate) struct Layout<'a> {
    /// Mount point of the new root (an empty directory of the command's).
    pub root: &'a Path,
    /// The checkout (canonical).
    pub checkout: &'a Path,
    /// The working directory (canonical, beneath the checkout).
    pub cwd: &'a Path,
    /// The command's private temporary directory and `/dev/shm`.
    pub tmp: &'a Path,
    pub shm: &'a Path,
    /// The overlay's upper directory (a copy of the checkout's directories,
    /// owned by the sandbox user) and work directory; without them the
    /// checkout is bound read-only.
    pub overlay: Option<(&'a Path, &'a Path)>,
    /// Whether the overlay is mounted in a user namespace of its own.
    pub user_namespace: bool,
    /// The program the command runs (absolute).
    pub program: &'a Path,
    /// Whether to mount `/proc` (only with a PID namespace of its own).
    pub proc: bool,
    /// The sandbox user and group, for `/etc/passwd` and `/etc/group`.
    pub user: (u32, u32),
    /// Directories that must not be visible even beneath a bound one.
    pub hidden: &'a [PathBuf],
    /// The caller's extra directories, each at its own path.
    pub binds: &'a [crate::Bind],
}

/// Builds the plan of `layout`'s root.
pub(crate) fn plan(layout: &Layout<'_>) -> io::Result<RootPlan> {
    let mut root =
        Builder { root: layout.root.to_owned(), steps: Vec::new(), made: BTreeSet::new(), binds: Vec::new() };
    // The command's own /tmp first: a program installed beneath /tmp (a
    // virtualenv, say) is then bound on top of it, not hidden by it.
    root.bind(layout.tmp, Path::new(TMP), false)?;
    for dir in SYSTEM {
        let path = Path::new(dir);
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_symlink() => root.symlink(&fs::read_link(path)?, path)?,
            Ok(meta) if meta.is_dir() => root.bind(path, path, true)?,
            _ => {}
        }
    }
    for prefix in prefixes(layout.program) {
        let source = fs::canonicalize(&prefix)?;
        if !root.binds.iter().any(|(bound, _)| source.starts_with(bound)) {
            root.bind(&source, &source, true)?;
        }
        // Also where the program's path (not resolved) expects it.
        if prefix != source && !root.made.contains(&prefix) {
            root.bind(&source, &prefix, true)?;
        }
    }
    // After the toolchain, so that a directory beneath a prefix (a
    // repository's environment under a work directory beside pyenv's) is
    // bound on top of it, writable if asked.
    for bind in layout.binds {
        let source = fs::canonicalize(&bind.path)?;
        root.bind(&source, &bind.path, !bind.writable)?;
    }
    root.dirs(Path::new("/etc"))?;
    for name in ETC {
        let path = Path::new("/etc").join(name);
        if path.is_file() {
            root.bind(&path, &path, true)?;
        }
    }
    let (uid, gid) = layout.user;
    root.write(
        Path::new("/etc/passwd"),
        format!(
            "root:x:0:0:root:/root:/usr/sbin/nologin\nkiln-test:x:{uid}:{gid}:Kiln test:{CHECKOUT}:/usr/sbin/nologin\n\
             nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        ),
    )?;
    root.write(Path::new("/etc/group"), format!("root:x:0:\nkiln-test:x:{gid}:\nnogroup:x:65534:\n"))?;
    root.dirs(Path::new("/dev"))?;
    for name in DEVICES {
        let path = Path::new("/dev").join(name);
        if path.exists() {
            root.bind(&path, &path, false)?;
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        root.symlink(Path::new(target), &Path::new("/dev").join(link))?;
    }
    root.bind(layout.shm, Path::new("/dev/shm"), false)?;
    let overlay = layout.overlay.and_then(|(upper, work)| {
        let mut options =
            format!("lowerdir={},upperdir={},workdir={}", option(layout.checkout)?, option(upper)?, option(work)?);
        if layout.user_namespace {
            options.push_str(",userxattr");
        }
        Some(options)
    });
    match overlay {
        Some(options) => {
            root.dirs(Path::new(CHECKOUT))?;
            root.binds.push((layout.checkout.to_owned(), PathBuf::from(CHECKOUT)));
            let target = root.host(Path::new(CHECKOUT))?;
            root.steps.push(MountStep::Overlay { target, options: c_path(Path::new(&options))? });
        }
        None => root.bind(layout.checkout, Path::new(CHECKOUT), true)?,
    }
    if layout.proc {
        root.dirs(Path::new("/proc"))?;
        root.steps.push(MountStep::Proc(root.host(Path::new("/proc"))?));
    }
    for hidden in layout.hidden {
        let Ok(hidden) = fs::canonicalize(hidden) else { continue };
        if !hidden.is_dir() {
            continue;
        }
        let inside: Vec<PathBuf> = root
            .binds
            .iter()
            .filter_map(|(source, target)| hidden.strip_prefix(source).ok().map(|rest| target.join(rest)))
            .collect();
        for path in inside {
            root.steps.push(MountStep::Mask(root.host(&path)?));
        }
    }
    let cwd = Path::new(CHECKOUT).join(layout.cwd.strip_prefix(layout.checkout).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not in the checkout", layout.cwd.display()))
    })?);
    let mut writable: Vec<CString> =
        [CHECKOUT, TMP, "/dev/shm"].iter().map(|p| c_path(Path::new(p))).collect::<io::Result<_>>()?;
    for bind in layout.binds.iter().filter(|b| b.writable) {
        writable.push(c_path(&bind.path)?);
    }
    Ok(RootPlan { root: c_path(layout.root)?, steps: root.steps, cwd: c_path(&cwd)?, writable })
}

/// `path` as an overlay mount option, if it can be one (the option syntax
/// has no escape for these characters).
fn option(path: &Path) -> Option<&str> {
    path.to_str().filter(|p| !p.contains([',', ':', '\\', '=']))
}

/// The installation prefixes of `program`: the directory above its `bin/`
/// (or the directory it is in), for the path as given and as resolved
/// (a virtualenv's interpreter is a link to the base installation's).
fn prefixes(program: &Path) -> Vec<PathBuf> {
    let mut prefixes = Vec::new();
    let resolved = fs::canonicalize(program).ok();
    for path in std::iter::once(program.to_owned()).chain(resolved) {
        let Some(dir) = path.parent() else { continue };
        let prefix = if dir.file_name() == Some(OsStr::new("bin")) { dir.parent().unwrap_or(dir) } else { dir };
        if prefix != Path::new("/") && !prefixes.iter().any(|p: &PathBuf| p == prefix) {
            prefixes.push(prefix.to_owned());
        }
    }
    prefixes
}

struct Builder {
    root: PathBuf,
    steps: Vec<MountStep>,
    /// Paths inside that exist already (made by an earlier step).
    made: BTreeSet<PathBuf>,
    /// Directories bound so far: host source, path inside.
    binds: Vec<(PathBuf, PathBuf)>,
}

impl Builder {
    /// The host path of `inside` beneath the new root, for the child.
    fn host(&self, inside: &Path) -> io::Result<CString> {
        c_path(&self.root.join(inside.strip_prefix("/").unwrap_or(inside)))
    }

    /// Makes `inside` and its missing ancestors, as directories.
    fn dirs(&mut self, inside: &Path) -> io::Result<()> {
        let mut path = PathBuf::from("/");
        for component in inside.components() {
            if let Component::Normal(name) = component {
                path.push(name);
                if self.made.insert(path.clone()) {
                    self.steps.push(MountStep::Dir(self.host(&path)?));
                }
            }
        }
        Ok(())
    }

    fn symlink(&mut self, target: &Path, inside: &Path) -> io::Result<()> {
        if let Some(parent) = inside.parent() {
            self.dirs(parent)?;
        }
        self.made.insert(inside.to_owned());
        self.steps.push(MountStep::Symlink { target: c_path(target)?, path: self.host(inside)? });
        Ok(())
    }

    fn write(&mut self, inside: &Path, data: String) -> io::Result<()> {
        self.made.insert(inside.to_owned());
        self.steps.push(MountStep::Write { path: self.host(inside)?, data: data.into_bytes() });
        Ok(())
    }

    /// Binds `source` (a directory or a file) at `inside`.
    fn bind(&mut self, source: &Path, inside: &Path, read_only: bool) -> io::Result<()> {
        let is_dir = fs::metadata(source)?.is_dir();
        if is_dir {
            self.dirs(inside)?;
            self.binds.push((source.to_owned(), inside.to_owned()));
        } else {
            if let Some(parent) = inside.parent() {
                self.dirs(parent)?;
            }
            self.made.insert(inside.to_owned());
            self.steps.push(MountStep::File(self.host(inside)?));
        }
        let read_only = if read_only { Some(locked_flags(source)?) } else { None };
        self.steps.push(MountStep::Bind { source: c_path(source)?, target: self.host(inside)?, read_only });
        Ok(())
    }
}

/// The flags of the mount `path` is on that a read-only remount must keep:
/// inside a user namespace the kernel refuses to clear them.
fn locked_flags(path: &Path) -> io::Result<libc::c_ulong> {
    let stat = statvfs(path)?;
    let mut flags = 0;
    for (st, ms) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if stat & st != 0 {
            flags |= ms;
        }
    }
    Ok(flags)
}

fn statvfs(path: &Path) -> io::Result<libc::c_ulong> {
    super::sys::statvfs_flags(&c_path(path)?)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{} contains a NUL byte", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_the_directory_above_bin() {
        assert_eq!(prefixes(Path::new("/nonexistent/py/bin/python3")), [PathBuf::from("/nonexistent/py")]);
        assert_eq!(prefixes(Path::new("/nonexistent/tool")), [PathBuf::from("/nonexistent")]);
        assert!(prefixes(Path::new("/bin/nonexistent")).is_empty(), "/ is never a prefix");
    }
}
