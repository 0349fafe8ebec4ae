//! A cgroup per command: it holds every process the command starts, however
//! it detaches (`setsid`, double fork), so the runner can kill them all and
//! see when they are gone; and its controllers cap the number of processes
//! (`pids.max`) and the memory (`memory.max`) of the whole tree.
//!
//! Command cgroups are children of the runner's own cgroup in each hierarchy
//! used. The unified (v2) hierarchy is preferred: `cgroup.kill` kills a
//! cgroup atomically. A controller that v2 does not offer the runner (not
//! enabled, or bound to a v1 hierarchy, as on hybrid systems) is taken from
//! its v1 hierarchy when the runner may create cgroups there.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for a killed cgroup to empty before giving up on it.
const EMPTY_DEADLINE: Duration = Duration::from_secs(5);

/// Which cgroup interface a hierarchy speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    V1,
    V2,
}

/// One hierarchy command cgroups are created in.
#[derive(Clone, Debug)]
pub(crate) struct Hierarchy {
    pub version: Version,
    /// The runner's own cgroup in it: command cgroups are created below.
    pub base: PathBuf,
    /// Whether command cgroups have `cgroup.kill` (v2, Linux 5.14+).
    pub kill_file: bool,
    /// Whether `pids.max` is set here.
    pub pids: bool,
    /// Whether the memory limit is set here.
    pub memory: bool,
}

/// What [`discover`] found: the hierarchies to use, and why others cannot
/// be used.
#[derive(Debug, Default)]
pub(crate) struct Discovery {
    pub hierarchies: Vec<Hierarchy>,
    /// Why there is no cgroup at all, or no pids or memory controller.
    pub problems: Vec<String>,
}

impl Discovery {
    pub(crate) fn pids(&self) -> Option<&Hierarchy> {
        self.hierarchies.iter().find(|h| h.pids)
    }

    pub(crate) fn memory(&self) -> Option<&Hierarchy> {
        self.hierarchies.iter().find(|h| h.memory)
    }

    /// How processes are tracked and killed, for the report.
    pub(crate) fn describe(&self) -> String {
        let parts: Vec<String> = self
            .hierarchies
            .iter()
            .map(|h| {
                let mut uses = Vec::new();
                if h.version == Version::V2 {
                    uses.push(if h.kill_file { "cgroup.kill" } else { "tracking" });
                }
                if h.pids {
                    uses.push("pids");
                }
                if h.memory {
                    uses.push("memory");
                }
                format!("{} ({}) under {}", version_name(h.version), uses.join(", "), h.base.display())
            })
            .collect();
        parts.join("; ")
    }
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::V1 => "cgroup v1",
        Version::V2 => "cgroup v2",
    }
}

/// Finds the hierarchies where this process may create command cgroups,
/// trying each by creating and removing a probe cgroup named `probe_name`.
pub(crate) fn discover(probe_name: &str) -> Discovery {
    let mut discovery = Discovery::default();
    let (mounts, own) = match (fs::read_to_string("/proc/self/mountinfo"), fs::read_to_string("/proc/self/cgroup")) {
        (Ok(mounts), Ok(own)) => (mounts, own),
        (Err(e), _) | (_, Err(e)) => {
            discovery.problems.push(format!("cannot read /proc/self/mountinfo or /proc/self/cgroup: {e}"));
            return discovery;
        }
    };
    let mounts = parse_mounts(&mounts);
    let own = parse_own(&own);

    match locate(&mounts, &own, Version::V2, "") {
        Some(base) => match try_create(&base, probe_name) {
            Ok(kill_file) => {
                let (pids, memory) = enable_v2_controllers(&base, &mut discovery.problems);
                discovery.hierarchies.push(Hierarchy { version: Version::V2, base, kill_file, pids, memory });
            }
            Err(e) => discovery.problems.push(format!("cannot create cgroups under {}: {e}", base.display())),
        },
        None => discovery.problems.push("no cgroup v2 hierarchy is mounted".to_owned()),
    }
    for controller in ["pids", "memory"] {
        let covered = match controller {
            "pids" => discovery.pids().is_some(),
            _ => discovery.memory().is_some(),
        };
        if covered {
            continue;
        }
        let Some(base) = locate(&mounts, &own, Version::V1, controller) else {
            discovery.problems.push(format!("no cgroup offers the {controller} controller"));
            continue;
        };
        match try_create(&base, probe_name) {
            Ok(_) => discovery.hierarchies.push(Hierarchy {
                version: Version::V1,
                base,
                kill_file: false,
                pids: controller == "pids",
                memory: controller == "memory",
            }),
            Err(e) => discovery.problems.push(format!("cannot create cgroups under {}: {e}", base.display())),
        }
    }
    discovery
}

/// A mounted cgroup hierarchy: (version, controllers (v1), mount root,
/// mount point).
type Mount = (Version, Vec<String>, String, PathBuf);

/// The cgroup mounts in `/proc/self/mountinfo`.
fn parse_mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - fstype source super-options
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split(' ').collect();
            let (root, point) = (fields.get(3)?, fields.get(4)?);
            let mut after = after.split(' ');
            let version = match after.next()? {
                "cgroup2" => Version::V2,
                "cgroup" => Version::V1,
                _ => return None,
            };
            let options = after.nth(1).unwrap_or("");
            let controllers = options.split(',').map(str::to_owned).collect();
            Some((version, controllers, unescape(root), PathBuf::from(unescape(point))))
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroups, from `/proc/self/cgroup`: (controllers, path);
/// v2's entry has no controllers.
fn parse_own(cgroup: &str) -> Vec<(Vec<String>, String)> {
    cgroup
        .lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            let controllers = controllers.split(',').filter(|c| !c.is_empty()).map(str::to_owned).collect();
            Some((controllers, path.to_owned()))
        })
        .collect()
}

/// The directory of this process's own cgroup in the hierarchy of `version`
/// (for v1: the one with `controller`), if it exists.
fn locate(mounts: &[Mount], own: &[(Vec<String>, String)], version: Version, controller: &str) -> Option<PathBuf> {
    own_dir(mounts, own, version, controller).filter(|base| base.is_dir())
}

/// Where this process's own cgroup would be, from the mounts and
/// `/proc/self/cgroup`.
fn own_dir(mounts: &[Mount], own: &[(Vec<String>, String)], version: Version, controller: &str) -> Option<PathBuf> {
    let path = match version {
        Version::V2 => &own.iter().find(|(controllers, _)| controllers.is_empty())?.1,
        Version::V1 => &own.iter().find(|(controllers, _)| controllers.iter().any(|c| c == controller))?.1,
    };
    mounts
        .iter()
        .filter(|(v, controllers, _, _)| {
            *v == version && (version == Version::V2 || controllers.iter().any(|c| c == controller))
        })
        .find_map(|(_, _, root, point)| {
            // A mount may show a subtree (a bind mount, a cgroup namespace):
            // our path must lie inside it.
            let relative = Path::new(path).strip_prefix(root).ok()?;
            // (Joining an empty path would add a trailing slash.)
            Some(if relative.as_os_str().is_empty() { point.clone() } else { point.join(relative) })
        })
}

/// Creates and removes a child cgroup of `base`; says whether it had
/// `cgroup.kill`.
fn try_create(base: &Path, name: &str) -> io::Result<bool> {
    let probe = base.join(name);
    fs::create_dir(&probe)?;
    let kill_file = probe.join("cgroup.kill").exists();
    fs::remove_dir(&probe)?;
    Ok(kill_file)
}

/// Makes the pids and memory controllers available to children of `base`
/// (v2), enabling them if `base` offers them; says which are available.
fn enable_v2_controllers(base: &Path, problems: &mut Vec<String>) -> (bool, bool) {
    let read = |file: &str| fs::read_to_string(base.join(file)).unwrap_or_default();
    let offered = read("cgroup.controllers");
    let mut available = [false, false];
    for (slot, controller) in available.iter_mut().zip(["pids", "memory"]) {
        if read("cgroup.subtree_control").split_whitespace().any(|c| c == controller) {
            *slot = true;
        } else if offered.split_whitespace().any(|c| c == controller) {
            // Fails (EBUSY) when `base` holds processes and is not the root:
            // v2 keeps processes in leaves only.
            match fs::write(base.join("cgroup.subtree_control"), format!("+{controller}")) {
                Ok(()) => *slot = true,
                Err(e) => problems.push(format!(
                    "cannot enable the {controller} controller for children of {}: {e} (start the runner in a \
                     cgroup of its own that delegates it)",
                    base.display()
                )),
            }
        }
    }
    (available[0], available[1])
}

/// The limits a command cgroup sets.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub max_processes: u64,
    pub max_memory: u64,
}

/// What a command ran into, read from its cgroup's event counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Events {
    /// A fork failed at `pids.max`.
    pub process_limit: bool,
    /// The kernel killed a process at the memory limit.
    pub memory_limit: bool,
}

/// One command's cgroups, one per hierarchy used.
#[derive(Debug)]
pub(crate) struct CommandCgroup {
    dirs: Vec<(Hierarchy, PathBuf)>,
}

impl CommandCgroup {
    /// Creates cgroup `name` in each hierarchy, sets its limits, and opens
    /// the `cgroup.procs` files the command's child writes itself into.
    pub(crate) fn create(
        hierarchies: &[Hierarchy],
        name: &str,
        limits: Limits,
    ) -> io::Result<(CommandCgroup, Vec<OwnedFd>)> {
        let mut cgroup = CommandCgroup { dirs: Vec::new() };
        let mut procs = Vec::new();
        for hierarchy in hierarchies {
            let dir = hierarchy.base.join(name);
            fs::create_dir(&dir).map_err(|e| context(e, &dir))?;
            // From here on, dropping `cgroup` removes it again.
            cgroup.dirs.push((hierarchy.clone(), dir.clone()));
            let write =
                |file: &str, value: String| fs::write(dir.join(file), value).map_err(|e| context(e, &dir.join(file)));
            if hierarchy.pids {
                write("pids.max", limits.max_processes.to_string())?;
            }
            if hierarchy.memory {
                match hierarchy.version {
                    Version::V2 => {
                        write("memory.max", limits.max_memory.to_string())?;
                        // Without this the limit would only push memory to
                        // swap.
                        if dir.join("memory.swap.max").exists() {
                            write("memory.swap.max", "0".to_owned())?;
                        }
                    }
                    Version::V1 => {
                        write("memory.limit_in_bytes", limits.max_memory.to_string())?;
                        if dir.join("memory.memsw.limit_in_bytes").exists() {
                            write("memory.memsw.limit_in_bytes", limits.max_memory.to_string())?;
                        }
                    }
                }
            }
            let file = fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map_err(|e| context(e, &dir.join("cgroup.procs")))?;
            procs.push(OwnedFd::from(file));
        }
        Ok((cgroup, procs))
    }

    /// Kills every process in the cgroups, at once where the kernel can
    /// (`cgroup.kill`), otherwise by signalling each listed process, which a
    /// fork racing with it can escape: [`CommandCgroup::wait_empty`] repeats
    /// it.
    pub(crate) fn kill(&self) {
        for (hierarchy, dir) in &self.dirs {
            if hierarchy.kill_file && fs::write(dir.join("cgroup.kill"), "1").is_ok() {
                continue;
            }
            for pid in members(dir) {
                super::sys::kill(pid, libc::SIGKILL);
            }
        }
    }

    /// Whether no process is left in any of the cgroups.
    fn is_empty(&self) -> bool {
        self.dirs.iter().all(|(hierarchy, dir)| match hierarchy.version {
            Version::V2 => fs::read_to_string(dir.join("cgroup.events"))
                .map(|events| events.lines().any(|line| line == "populated 0"))
                .unwrap_or(true),
            Version::V1 => members(dir).is_empty(),
        })
    }

    /// Kills what is left and waits (polling, up to a deadline) until the
    /// cgroups are empty; says whether they are.
    pub(crate) async fn kill_and_wait(&self) -> bool {
        let deadline = Instant::now() + EMPTY_DEADLINE;
        loop {
            self.kill();
            if self.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Like [`CommandCgroup::kill_and_wait`], blocking the thread, for a
    /// command dropped mid-way; gives up sooner.
    pub(crate) fn kill_and_wait_blocking(&self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            self.kill();
            if self.is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// What the command ran into.
    pub(crate) fn events(&self) -> Events {
        let mut events = Events::default();
        for (hierarchy, dir) in &self.dirs {
            let counter = |file: &str, key: &str| {
                fs::read_to_string(dir.join(file)).ok().is_some_and(|text| {
                    text.lines().any(|line| {
                        line.split_once(' ').is_some_and(|(k, v)| k == key && v.trim().parse::<u64>().unwrap_or(0) > 0)
                    })
                })
            };
            if hierarchy.pids {
                events.process_limit |= counter("pids.events", "max");
            }
            if hierarchy.memory {
                events.memory_limit |= match hierarchy.version {
                    Version::V2 => counter("memory.events", "oom_kill"),
                    Version::V1 => counter("memory.oom_control", "oom_kill"),
                };
            }
        }
        events
    }
}

impl Drop for CommandCgroup {
    /// Removes the cgroups; fails (and leaves an empty directory behind,
    /// logged) only if a process is still in one.
    fn drop(&mut self) {
        for (_, dir) in &self.dirs {
            if let Err(e) = fs::remove_dir(dir) {
                tracing::warn!(cgroup = %dir.display(), "could not remove a command's cgroup: {e}");
            }
        }
    }
}

/// Removes the cgroups named by `is_stale` (those of runners that are gone,
/// killed before they could clean up) from every hierarchy, killing what
/// still runs in them. Returns how many were removed.
pub(crate) fn sweep(hierarchies: &[Hierarchy], is_stale: impl Fn(&str) -> bool) -> usize {
    let mut removed = 0;
    for hierarchy in hierarchies {
        let Ok(entries) = fs::read_dir(&hierarchy.base) else { continue };
        for entry in entries.flatten() {
            if !entry.file_name().to_str().is_some_and(&is_stale) {
                continue;
            }
            let cgroup = CommandCgroup { dirs: vec![(hierarchy.clone(), entry.path())] };
            cgroup.kill_and_wait_blocking();
            // Dropping it removes the directory.
            drop(cgroup);
            removed += usize::from(!entry.path().exists());
        }
    }
    removed
}

/// The processes listed in a cgroup directory.
fn members(dir: &Path) -> Vec<i32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

fn context(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
42 31 0:39 /sub /mnt/with\\040space rw - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_mountinfo_and_own_cgroups() {
        let mounts = parse_mounts(MOUNTINFO);
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[0],
            (Version::V1, vec!["rw".to_owned(), "memory".to_owned()], "/".to_owned(), "/sys/fs/cgroup/memory".into())
        );
        assert_eq!(mounts[3].3, PathBuf::from("/mnt/with space"));

        let own = parse_own("4:memory:/process_api/abc\n8:pids:/\n0::/sub/runner.slice\n");
        assert_eq!(own[0], (vec!["memory".to_owned()], "/process_api/abc".to_owned()));
        assert_eq!(own_dir(&mounts, &own, Version::V1, "memory"), Some("/sys/fs/cgroup/memory/process_api/abc".into()));
        assert_eq!(own_dir(&mounts, &own, Version::V1, "pids"), Some("/sys/fs/cgroup/pids".into()));
        assert_eq!(own_dir(&mounts, &own, Version::V1, "cpu"), None);
        // The first v2 mount whose root contains our path.
        assert_eq!(own_dir(&mounts, &own, Version::V2, ""), Some("/sys/fs/cgroup/unified/sub/runner.slice".into()));
        let only_sub = &mounts[3..];
        assert_eq!(own_dir(only_sub, &own, Version::V2, ""), Some("/mnt/with space/runner.slice".into()));
        let elsewhere = parse_own("0::/subway\n");
        assert_eq!(own_dir(only_sub, &elsewhere, Version::V2, ""), None);
    }
}
