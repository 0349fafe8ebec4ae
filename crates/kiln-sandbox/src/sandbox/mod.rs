//! The process sandbox `run-command` starts programs in, and the start-up
//! [`probe`] that says which of its mechanisms this machine supports.
//!
//! A command runs with a cleared environment, in its own session, in the
//! job's checkout (see `command`), and with every mechanism below that the
//! kernel and the runner's privileges allow. Each one degrades on its own,
//! and never silently: [`probe`] reports what is missing and why (for the
//! runner's start-up log), and a command that ran without something gets a
//! line saying so at the end of its stderr.
//!
//! | mechanism | how | without it |
//! |---|---|---|
//! | process-tree cleanup | a PID namespace whose init is the program: when it ends or is killed, the kernel kills the rest; and a cgroup per command, killed with `cgroup.kill` | only the process group is killed: a daemon that calls `setsid` survives |
//! | process limit | `pids.max` of the command's cgroup (v2, or the v1 pids hierarchy); `RLIMIT_NPROC` when the command has a user namespace of its own | none (root ignores `RLIMIT_NPROC`, and outside a user namespace it counts all of a user's processes) |
//! | memory limit | the memory limit of the command's cgroup | `RLIMIT_AS`, per process and of virtual memory |
//! | file size limit | `RLIMIT_FSIZE` | always available |
//! | network isolation | a network namespace with only a loopback interface (up, so tests can serve themselves on 127.0.0.1) | Landlock denying TCP bind and connect (ABI 4+), or nothing |
//! | write confinement | Landlock: writes only beneath the checkout, the command's private `TMPDIR`, its `/dev/shm` (POSIX semaphores and shared memory, which Python's multiprocessing needs) and `/dev/null`, `/dev/zero`, `/dev/full` | the command writes wherever its user may |
//! | privilege drop | `no_new_privs`; every capability dropped, bounding set included, so a runner running as root does not give tests root's powers (`setns` out of the namespaces, `mount`, moving cgroups) | always available |
//! | mount isolation | a mount namespace per command whose root is a fresh tmpfs holding only the toolchain, the granted programs' prefixes, a minimal `/etc` and `/dev`, the checkout at `/checkout` under an overlay of the command's own, a private `/tmp` and `/dev/shm`, and a `/proc` of its own PID namespace (see `root` for the list and why); directories the caller hides are masked where they fall beneath a bound one | the command sees the host's filesystem: the runner's key, work directory, object cache, other jobs' checkouts, and `/proc` lists every process |
//! | unprivileged user | a runner running as root switches each command to uid and gid [`SANDBOX_ID`] or the one chosen with [`use_sandbox_id`] (`kiln runner --sandbox-id`) (named `kiln-test` in the command's `/etc/passwd`, unknown to the host's), with no supplementary groups; it owns its `TMPDIR` and the checkout overlay's directories. Only with mount isolation: in the host's filesystem, another user could neither reach a toolchain under root's home nor write beside its tests | the command runs as the runner's user: root, or, for a runner that is not root, the runner's own user (partial: only mount isolation then keeps the runner's files from tests) |
//! | syscall filter | seccomp (see `seccomp`): `EPERM` for `ptrace`, `process_vm_*`, the mount API, `chroot`, `unshare`, `setns`, `clone` with namespace flags, keyrings, `bpf`, `perf_event_open`, modules, `kexec`, `userfaultfd`, `open_by_handle_at`, `reboot`, swap, `acct`, `quotactl`, `iopl`/`ioperm`; `ENOSYS` for `clone3`; a call through another ABI kills the process. Installed last, after `no_new_privs` | every system call the user's privileges allow |
//!
//! Commands also die with the runner, even one killed with SIGKILL: a
//! command's supervisor asks for a parent-death signal, which the kernel
//! sends when the thread that started it ends (for a tokio worker thread:
//! when the runtime shuts down or the process dies), and then takes its PID
//! namespace down; without a namespace, the program itself is killed. (A
//! change of user clears that signal: it is asked for again afterwards.)
//! Such a runner leaves its commands' cgroups and temporary directories
//! behind: the next runner's probe removes those whose runner is gone.
//!
//! As root, namespaces come directly; without root, inside a user namespace
//! mapping the runner's user to itself, where the kernel allows unprivileged
//! ones. cgroups need a hierarchy where the runner may create children: as
//! root, or in a delegated subtree. Reads are confined by the mount
//! namespace, not by Landlock: what a command may read is what its root
//! holds.
//!
//! Writes to the checkout land in the overlay's upper layer, in the
//! command's temporary directory, and are gone when the command ends: no
//! command sees another's writes, and the checkout the plugin reads stays
//! as the commit has it. The sandbox user owns the upper layer's copies of
//! the checkout's directories, so it may create, rename and remove files
//! anywhere in the checkout (suites that write beside their files work), but
//! rewriting a file that came with the commit fails with `EACCES` (its
//! owner is the runner). Where the temporary directory cannot hold an
//! overlay's upper layer, the checkout is bound read-only, and mount
//! isolation is reported as partial.
//!
//! Between `fork` and `exec` only async-signal-safe system calls are allowed:
//! that code, and all of this crate's `unsafe`, is in `sys`.

mod cgroup;
mod root;
mod seccomp;
mod sys;

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use self::cgroup::CommandCgroup;
use self::sys::landlock as ll;

/// The limits every command runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Processes and threads a command may have at once, its own included.
    pub max_processes: u64,
    /// Bytes of memory for the whole command (with a cgroup), or of virtual
    /// memory per process (the `RLIMIT_AS` fallback).
    pub max_memory: u64,
    /// The largest file a command may write, in bytes.
    pub max_file_size: u64,
}

impl Default for SandboxLimits {
    /// Generous for test suites, fatal for fork bombs and runaway writers.
    fn default() -> SandboxLimits {
        SandboxLimits { max_processes: 1024, max_memory: 4 << 30, max_file_size: 1 << 30 }
    }
}

/// One protection of the sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mechanism {
    /// Killing everything a command started, daemons included.
    ProcessCleanup,
    /// A cap on a command's processes (fork bombs).
    ProcessLimit,
    /// A cap on a command's memory.
    MemoryLimit,
    /// A cap on the size of files a command writes.
    FileSizeLimit,
    /// No network but a private loopback.
    NetworkIsolation,
    /// Writes only inside the job's directory.
    WriteConfinement,
    /// No privileges: no capabilities, none to gain.
    PrivilegeDrop,
    /// A root filesystem of its own: nothing of the host but the toolchain,
    /// and only its own processes in `/proc`.
    MountIsolation,
    /// An unprivileged user, not the runner's.
    UnprivilegedUser,
    /// A seccomp filter denying the system calls attacks use.
    SyscallFilter,
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mechanism::ProcessCleanup => "process-tree cleanup",
            Mechanism::ProcessLimit => "process limit",
            Mechanism::MemoryLimit => "memory limit",
            Mechanism::FileSizeLimit => "file size limit",
            Mechanism::NetworkIsolation => "network isolation",
            Mechanism::WriteConfinement => "write confinement",
            Mechanism::PrivilegeDrop => "privilege drop",
            Mechanism::MountIsolation => "mount isolation",
            Mechanism::UnprivilegedUser => "unprivileged user",
            Mechanism::SyscallFilter => "syscall filter",
        })
    }
}

/// How much of a mechanism this machine provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// As designed.
    Full,
    /// A weaker fallback (the detail says what is missing).
    Partial,
    /// Not at all.
    Missing,
}

/// What the probe found for one mechanism.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MechanismReport {
    /// Which mechanism.
    pub mechanism: Mechanism,
    /// How much of it commands get.
    pub coverage: Coverage,
    /// How it is enforced, or why it is not, for the log.
    pub detail: String,
}

impl fmt::Display for MechanismReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let coverage = match self.coverage {
            Coverage::Full => "yes",
            Coverage::Partial => "partly",
            Coverage::Missing => "NO",
        };
        write!(f, "{}: {coverage}: {}", self.mechanism, self.detail)
    }
}

/// Which sandbox mechanisms commands get on this machine, and why any is
/// missing. Log it at start-up: see [`probe`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SandboxReport {
    mechanisms: Vec<MechanismReport>,
}

impl SandboxReport {
    /// Every mechanism, in a fixed order.
    pub fn mechanisms(&self) -> &[MechanismReport] {
        &self.mechanisms
    }

    /// What the probe found for `mechanism`.
    pub fn get(&self, mechanism: Mechanism) -> Option<&MechanismReport> {
        self.mechanisms.iter().find(|m| m.mechanism == mechanism)
    }

    /// The mechanisms commands get only partly or not at all.
    pub fn degraded(&self) -> impl Iterator<Item = &MechanismReport> {
        self.mechanisms.iter().filter(|m| m.coverage != Coverage::Full)
    }

    /// Whether every mechanism is fully available.
    pub fn is_complete(&self) -> bool {
        self.degraded().next().is_none()
    }

    /// The line added to every command's stderr while something is
    /// degraded: short, because plugins quote the end of stderr in results.
    fn command_note(&self) -> Option<String> {
        let degraded: Vec<String> = self
            .degraded()
            .map(|m| match m.coverage {
                Coverage::Partial => format!("{} (partly)", m.mechanism),
                _ => m.mechanism.to_string(),
            })
            .collect();
        (!degraded.is_empty())
            .then(|| format!("ran without full {}; the runner's start-up log says why", degraded.join(", ")))
    }
}

impl fmt::Display for SandboxReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, mechanism) in self.mechanisms.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{mechanism}")?;
        }
        Ok(())
    }
}

/// Probes the machine once (later calls return the same report) and says
/// which sandbox mechanisms commands will get. The runner calls this at
/// start-up to log it; commands use the same probe.
pub fn probe() -> &'static SandboxReport {
    &Sandbox::global().report
}

/// Prefix of the lines the sandbox adds to a command's stderr.
pub(crate) const NOTE_PREFIX: &str = "[kiln sandbox]";

/// Counter making cgroup and temporary directory names unique within the
/// process; the process id makes them unique on the machine.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn unique_name(kind: &str) -> String {
    format!("kiln-{kind}-{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// Whether `name` is one of [`unique_name`]'s for `kind`, made by a process
/// that no longer runs. (A process id may have been reused since: then the
/// directory is left alone, which is the safe mistake.)
fn is_stale(name: &str, kind: &str) -> bool {
    let Some(rest) = name.strip_prefix("kiln-").and_then(|rest| rest.strip_prefix(kind)) else { return false };
    let mut parts = rest.strip_prefix('-').unwrap_or("").split('-');
    match (parts.next().map(str::parse::<u32>), parts.next().map(str::parse::<u64>), parts.next()) {
        (Some(Ok(pid)), Some(Ok(_)), None) => !Path::new("/proc").join(pid.to_string()).exists(),
        _ => false,
    }
}

/// Removes what runners that were killed (SIGKILL gives no chance to clean
/// up) left behind: their commands' cgroups, with anything still running in
/// them, and temporary directories.
fn sweep(hierarchies: &[cgroup::Hierarchy]) {
    let cgroups = cgroup::sweep(hierarchies, |name| is_stale(name, "cmd") || is_stale(name, "probe"));
    let mut dirs = 0;
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            if entry.file_name().to_str().is_some_and(|name| is_stale(name, "tmp"))
                && fs::remove_dir_all(entry.path()).is_ok()
            {
                dirs += 1;
            }
        }
    }
    if cgroups + dirs > 0 {
        tracing::info!(cgroups, dirs, "removed what commands of runners no longer running left behind");
    }
}

/// How a [`Sandbox`] is built: its limits, and which mechanisms it may use
/// (all, except in tests that show what happens without one).
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// What a command may use.
    pub limits: SandboxLimits,
    /// A PID namespace per command.
    pub pid_namespace: bool,
    /// A network namespace per command (loopback only).
    pub network_namespace: bool,
    /// Cgroups: process and memory limits, and killing a whole tree.
    pub cgroups: bool,
    /// Landlock write confinement.
    pub landlock: bool,
    /// A mount namespace with a root of its own.
    pub mount_namespace: bool,
    /// An unprivileged user when the runner is root.
    pub unprivileged_user: bool,
    /// The seccomp filter.
    pub syscall_filter: bool,
}

impl Default for Options {
    /// Everything the machine offers, with the default limits.
    fn default() -> Options {
        Options {
            limits: SandboxLimits::default(),
            pid_namespace: true,
            network_namespace: true,
            cgroups: true,
            landlock: true,
            mount_namespace: true,
            unprivileged_user: true,
            syscall_filter: true,
        }
    }
}

/// The user and group commands run as when the runner is root: not root,
/// and not an id the host's `/etc/passwd` and `/etc/group` name (the probe
/// says so if they do), so that no file on the machine belongs to it.
pub const SANDBOX_ID: u32 = 64_999;

/// The id chosen with [`use_sandbox_id`], if any.
static CHOSEN_ID: OnceLock<u32> = OnceLock::new();
/// The sandbox `run-command` uses, once probed.
static GLOBAL: OnceLock<Sandbox> = OnceLock::new();

/// Why [`use_sandbox_id`] refused an id.
#[derive(Debug, thiserror::Error)]
pub enum SandboxIdError {
    /// Root is what commands must not be.
    #[error("use uid and gid {id} for commands: 0 is root; choose an id no account on this machine uses")]
    Root {
        /// The refused id.
        id: u32,
    },
    /// Commands have started (or the machine was probed) with another id.
    #[error("use uid and gid {id} for commands: the sandbox is already set up (with {current})")]
    TooLate {
        /// The refused id.
        id: u32,
        /// The id in use.
        current: u32,
    },
}

/// Chooses the uid and gid commands run as when the runner is root,
/// instead of [`SANDBOX_ID`]; call it before [`probe`] or any command.
pub fn use_sandbox_id(id: u32) -> Result<(), SandboxIdError> {
    if id == 0 {
        return Err(SandboxIdError::Root { id });
    }
    if GLOBAL.get().is_some() || CHOSEN_ID.set(id).is_err() {
        let current = sandbox_id();
        return if current == id { Ok(()) } else { Err(SandboxIdError::TooLate { id, current }) };
    }
    Ok(())
}

fn sandbox_id() -> u32 {
    CHOSEN_ID.get().copied().unwrap_or(SANDBOX_ID)
}

/// The user and group commands run as, when they switch to one (a runner
/// running as root): what must own a directory a command is to write
/// through a writable [`crate::Bind`].
pub fn command_user() -> Option<(u32, u32)> {
    Sandbox::global().user
}

/// What the probe decided to apply to every command.
pub(crate) struct Sandbox {
    limits: SandboxLimits,
    report: SandboxReport,
    note: Option<String>,
    namespaces: sys::Namespaces,
    cgroups: Vec<cgroup::Hierarchy>,
    landlock: Option<LandlockPlan>,
    drop_capabilities: bool,
    rlimits: sys::Rlimits,
    /// Whether each command gets a root of its own ([`root`]).
    mount: bool,
    /// Whether the checkout in it is under an overlay (else read-only).
    overlay: bool,
    /// The user and group commands switch to.
    user: Option<(u32, u32)>,
    /// The seccomp program.
    filter: Option<Vec<libc::sock_filter>>,
}

/// The access rights a command's Landlock ruleset handles (denies unless a
/// rule allows them).
#[derive(Clone, Copy, Debug)]
struct LandlockPlan {
    fs: u64,
    net: u64,
    scoped: u64,
}

impl Sandbox {
    /// The sandbox `run-command` uses: everything available, default limits.
    pub(crate) fn global() -> &'static Sandbox {
        GLOBAL.get_or_init(|| Sandbox::new(Options::default()))
    }

    /// Probes the machine for the `allowed` mechanisms.
    pub(crate) fn new(options: Options) -> Sandbox {
        let (limits, allowed) = (options.limits, options);
        let (namespaces, pid_problem, net_problem) =
            choose_namespaces(allowed.pid_namespace, allowed.network_namespace);
        let cgroups = if allowed.cgroups {
            cgroup::discover(&unique_name("probe"))
        } else {
            cgroup::Discovery { hierarchies: Vec::new(), problems: vec!["cgroups disabled".to_owned()] }
        };
        sweep(&cgroups.hierarchies);
        let landlock_abi = if allowed.landlock { landlock_abi() } else { Err("Landlock disabled".to_owned()) };
        let landlock = landlock_abi.as_ref().ok().map(|&abi| LandlockPlan {
            fs: handled_fs(abi),
            // Without a network namespace, Landlock can still keep TCP off.
            net: if !namespaces.net && abi >= 4 { ll::NET_BIND_TCP | ll::NET_CONNECT_TCP } else { 0 },
            // No signals to, and no abstract sockets of, processes outside.
            scoped: if abi >= 6 { ll::SCOPE_SIGNAL | ll::SCOPE_ABSTRACT_UNIX_SOCKET } else { 0 },
        });
        let drop_capabilities = namespaces.user.is_some() || holds_capabilities();
        let confinement = probe_confinement(&namespaces, allowed);
        let rlimits = sys::Rlimits {
            file_size: Some(limits.max_file_size),
            // Counted per user namespace: per command only inside its own.
            processes: namespaces.user.is_some().then_some(limits.max_processes),
            address_space: cgroups.memory().is_none().then_some(limits.max_memory),
        };

        let problems = |list: &[String]| if list.is_empty() { "none found".to_owned() } else { list.join("; ") };
        let mut mechanisms = Vec::new();
        let mut report = |mechanism, coverage, detail: String| {
            mechanisms.push(MechanismReport { mechanism, coverage, detail });
        };
        let tracked = (!cgroups.hierarchies.is_empty()).then(|| cgroups.describe());
        let pid_why = pid_problem.as_deref().unwrap_or("");
        match (namespaces.pid, &tracked) {
            (true, Some(tracked)) => {
                report(Mechanism::ProcessCleanup, Coverage::Full, format!("a PID namespace per command; {tracked}"))
            }
            (true, None) => report(
                Mechanism::ProcessCleanup,
                Coverage::Full,
                format!("a PID namespace per command (no cgroup: {})", problems(&cgroups.problems)),
            ),
            (false, Some(tracked)) => {
                report(Mechanism::ProcessCleanup, Coverage::Full, format!("{tracked} (no PID namespace: {pid_why})"))
            }
            (false, None) => report(
                Mechanism::ProcessCleanup,
                Coverage::Missing,
                format!(
                    "only the command's process group is killed, so a process that calls setsid can outlive its \
                     command (no PID namespace: {pid_why}; no cgroup: {})",
                    problems(&cgroups.problems)
                ),
            ),
        }
        match (cgroups.pids(), rlimits.processes) {
            (Some(h), _) => report(
                Mechanism::ProcessLimit,
                Coverage::Full,
                format!("pids.max = {} ({})", limits.max_processes, version(h)),
            ),
            (None, Some(n)) => report(
                Mechanism::ProcessLimit,
                Coverage::Full,
                format!("RLIMIT_NPROC = {n}, counted in the command's own user namespace"),
            ),
            (None, None) => report(
                Mechanism::ProcessLimit,
                Coverage::Missing,
                format!(
                    "no pids cgroup ({}), and RLIMIT_NPROC is no per-command limit outside a user namespace of its \
                     own (root ignores it)",
                    problems(&cgroups.problems)
                ),
            ),
        }
        match cgroups.memory() {
            Some(h) => report(
                Mechanism::MemoryLimit,
                Coverage::Full,
                format!("{} for the whole command ({})", human_bytes(limits.max_memory), version(h)),
            ),
            None => report(
                Mechanism::MemoryLimit,
                Coverage::Partial,
                format!(
                    "RLIMIT_AS = {} of virtual memory per process, not for the whole command (no memory cgroup: {})",
                    human_bytes(limits.max_memory),
                    problems(&cgroups.problems)
                ),
            ),
        }
        report(
            Mechanism::FileSizeLimit,
            Coverage::Full,
            format!("RLIMIT_FSIZE = {}", human_bytes(limits.max_file_size)),
        );
        let how = if namespaces.user.is_some() { " (in a user namespace)" } else { "" };
        let net_why = net_problem.as_deref().unwrap_or("");
        match landlock {
            _ if namespaces.net => report(
                Mechanism::NetworkIsolation,
                Coverage::Full,
                format!("a network namespace per command{how}, with only a loopback interface"),
            ),
            Some(plan) if plan.net != 0 => report(
                Mechanism::NetworkIsolation,
                Coverage::Partial,
                format!(
                    "Landlock denies TCP bind and connect, but UDP and other protocols are open (no network namespace: {net_why})"
                ),
            ),
            _ => report(
                Mechanism::NetworkIsolation,
                Coverage::Missing,
                format!("commands share the runner's network (no network namespace: {net_why})"),
            ),
        }
        match &landlock_abi {
            Ok(abi) => report(
                Mechanism::WriteConfinement,
                Coverage::Full,
                format!(
                    "Landlock ABI {abi}: writes only beneath the job directory, the command's TMPDIR, /dev/shm, \
                     /dev/null, /dev/zero and /dev/full"
                ),
            ),
            Err(why) => report(
                Mechanism::WriteConfinement,
                Coverage::Missing,
                format!("commands may write wherever the runner's user may ({why})"),
            ),
        }
        report(
            Mechanism::PrivilegeDrop,
            Coverage::Full,
            if drop_capabilities {
                "no_new_privs, and every capability dropped".to_owned()
            } else {
                "no_new_privs (the runner holds no capabilities)".to_owned()
            },
        );
        match &confinement.mount {
            Ok(Err(why)) => report(
                Mechanism::MountIsolation,
                Coverage::Partial,
                format!(
                    "a root of its own per command{}, but the checkout in it is read-only, so tests that write \
                     beside their files fail ({why})",
                    if namespaces.pid { "" } else { ", without /proc" }
                ),
            ),
            Ok(Ok(())) if namespaces.pid => report(
                Mechanism::MountIsolation,
                Coverage::Full,
                format!(
                    "a mount namespace per command whose read-only root holds only /usr, /bin, /sbin, /lib*, the \
                     granted programs' prefixes, a minimal /etc (no shadow), /dev/null, zero, full, random and \
                     urandom, the checkout at {} (under an overlay of its own: writes never reach it), a private \
                     /tmp and /dev/shm, and /proc of its own PID namespace",
                    root::CHECKOUT
                ),
            ),
            Ok(Ok(())) => report(
                Mechanism::MountIsolation,
                Coverage::Partial,
                format!("a root of its own per command, but no /proc in it (no PID namespace: {pid_why})"),
            ),
            Err(why) => report(
                Mechanism::MountIsolation,
                Coverage::Missing,
                format!("commands see the runner's whole filesystem: its key, its work directory, other jobs ({why})"),
            ),
        }
        match (&confinement.user, namespaces.user.is_some()) {
            (Ok(Some((uid, gid))), _) => {
                let named = named_on_host(*uid, *gid);
                let detail = format!("uid {uid}, gid {gid}, no supplementary groups");
                match named {
                    None => report(Mechanism::UnprivilegedUser, Coverage::Full, detail),
                    Some(name) => report(
                        Mechanism::UnprivilegedUser,
                        Coverage::Partial,
                        format!("{detail}, but the host names that id ({name}): files it owns are the tests' too"),
                    ),
                }
            }
            (Ok(None), true) => report(
                Mechanism::UnprivilegedUser,
                Coverage::Partial,
                "the runner's own user (not root), mapped in a user namespace: only mount isolation keeps the \
                 runner's files from commands"
                    .to_owned(),
            ),
            (Ok(None), false) if !holds_capabilities() => report(
                Mechanism::UnprivilegedUser,
                Coverage::Partial,
                "the runner's own user (not root): only mount isolation keeps the runner's files from commands"
                    .to_owned(),
            ),
            (Ok(None), false) => report(
                Mechanism::UnprivilegedUser,
                Coverage::Missing,
                "commands run as the runner's user, root (disabled)".to_owned(),
            ),
            (Err(why), _) => report(
                Mechanism::UnprivilegedUser,
                Coverage::Missing,
                format!("commands run as the runner's user, root ({why})"),
            ),
        }
        match &confinement.filter {
            Ok(_) => report(
                Mechanism::SyscallFilter,
                Coverage::Full,
                format!(
                    "seccomp: EPERM for {}, clone with namespace flags; ENOSYS for clone3; other ABIs killed",
                    seccomp::denied().iter().map(|(name, _)| *name).collect::<Vec<_>>().join(", ")
                ),
            ),
            Err(why) => report(
                Mechanism::SyscallFilter,
                Coverage::Missing,
                format!("every system call is open to commands, ptrace and mount included ({why})"),
            ),
        }
        let report = SandboxReport { mechanisms };
        let note = report.command_note();
        Sandbox {
            limits,
            report,
            note,
            namespaces,
            cgroups: cgroups.hierarchies,
            landlock,
            drop_capabilities,
            rlimits,
            mount: confinement.mount.is_ok(),
            overlay: matches!(confinement.mount, Ok(Ok(()))),
            user: confinement.user.ok().flatten(),
            filter: confinement.filter.ok(),
        }
    }

    pub(crate) fn report(&self) -> &SandboxReport {
        &self.report
    }

    /// Sets up the confinement of one command running `program` in `cwd`
    /// (beneath `checkout`; both absolute, canonical): its temporary
    /// directory, cgroups, Landlock ruleset and root, and the plan its child
    /// process follows. `hidden` directories stay invisible even where they
    /// lie beneath a directory the command's root binds.
    pub(crate) fn prepare(
        &self,
        checkout: &Path,
        cwd: &Path,
        program: &Path,
        hidden: &[PathBuf],
        binds: &[crate::Bind],
    ) -> io::Result<Confinement> {
        let tmp = TempDir::create(self.user)?;
        let (cgroup, cgroup_procs) = if self.cgroups.is_empty() {
            (None, Vec::new())
        } else {
            let limits =
                cgroup::Limits { max_processes: self.limits.max_processes, max_memory: self.limits.max_memory };
            let (cgroup, procs) = CommandCgroup::create(&self.cgroups, &unique_name("cmd"), limits)?;
            (Some(cgroup), procs)
        };
        let landlock = match self.landlock {
            Some(plan) => {
                let (tmp_dir, shm) = (tmp.tmp(), tmp.shm());
                let mut writable: Vec<&Path> = vec![checkout, &tmp_dir, &shm];
                writable.extend(binds.iter().filter(|b| b.writable).map(|b| b.path.as_path()));
                Some(ruleset(plan, &writable)?)
            }
            None => None,
        };
        let root = if self.mount {
            let (upper, work) = (tmp.path().join("upper"), tmp.path().join("work"));
            if self.overlay {
                copy_directories(checkout, &upper, self.user)?;
                fs::create_dir(&work)?;
            }
            let layout = root::Layout {
                root: &tmp.path().join("root"),
                checkout,
                cwd,
                tmp: &tmp.tmp(),
                shm: &tmp.shm(),
                overlay: self.overlay.then_some((&upper, &work)),
                user_namespace: self.namespaces.user.is_some(),
                program,
                proc: self.namespaces.pid,
                user: self.user.unwrap_or_else(sys::effective_ids),
                hidden,
                binds,
            };
            Some(root::plan(&layout)?)
        } else {
            None
        };
        let (home, tmp_inside) = if root.is_some() {
            (PathBuf::from(root::CHECKOUT), PathBuf::from(root::TMP))
        } else {
            (checkout.to_owned(), tmp.tmp())
        };
        let plan = sys::ChildPlan {
            cgroup_procs,
            namespaces: self.namespaces.clone(),
            rlimits: self.rlimits.clone(),
            drop_capabilities: self.drop_capabilities,
            landlock,
            landlock_writes: self.landlock.map_or(0, |plan| plan.fs),
            root,
            user: self.user,
            filter: self.filter.clone(),
            runner: std::process::id(),
        };
        Ok(Confinement {
            plan: Some(plan),
            home,
            tmp_inside,
            tmp: Some(tmp),
            cgroup,
            pid_namespace: self.namespaces.pid,
            pid: None,
            limits: self.limits,
            note: self.note.clone(),
            finished: false,
        })
    }
}

/// The mechanisms' names for the report.
fn version(hierarchy: &cgroup::Hierarchy) -> &'static str {
    match hierarchy.version {
        cgroup::Version::V1 => "cgroup v1",
        cgroup::Version::V2 => "cgroup v2",
    }
}

/// Finds how to get the wanted namespaces: directly (root), or inside a
/// user namespace; one alone if both together fail. Returns the namespaces
/// and, for PID and network, why not if missing.
fn choose_namespaces(pid: bool, net: bool) -> (sys::Namespaces, Option<String>, Option<String>) {
    let attempt = |pid, net| -> Result<sys::Namespaces, String> {
        let direct = sys::Namespaces { pid, net, user: None };
        let direct_error = match sys::try_namespaces(&direct) {
            Ok(()) => return Ok(direct),
            Err(e) => e,
        };
        let nested = sys::Namespaces { pid, net, user: Some(sys::IdMaps::identity()) };
        match sys::try_namespaces(&nested) {
            Ok(()) => Ok(nested),
            Err(e) => Err(format!("unshare: {direct_error}; in a new user namespace: {e}")),
        }
    };
    let disabled = |wanted: bool| (!wanted).then(|| "disabled".to_owned());
    if !pid && !net {
        return (sys::Namespaces::default(), disabled(pid), disabled(net));
    }
    match attempt(pid, net) {
        Ok(namespaces) => (namespaces, disabled(pid), disabled(net)),
        Err(both) if pid && net => match (attempt(true, false), attempt(false, true)) {
            (Ok(namespaces), _) => (namespaces, None, Some(both)),
            (Err(_), Ok(namespaces)) => (namespaces, Some(both), None),
            (Err(pid_error), Err(net_error)) => (sys::Namespaces::default(), Some(pid_error), Some(net_error)),
        },
        Err(why) => {
            let why_if = |wanted: bool| if wanted { Some(why.clone()) } else { disabled(wanted) };
            (sys::Namespaces::default(), why_if(pid), why_if(net))
        }
    }
}

/// The kernel's Landlock ABI, or why there is none.
fn landlock_abi() -> Result<u32, String> {
    match sys::landlock_abi() {
        Ok(abi) if abi >= 1 => Ok(abi),
        Ok(abi) => Err(format!("the kernel reports Landlock ABI {abi}")),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            Err("the kernel has no Landlock (Linux 5.13 or newer, built with it)".to_owned())
        }
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            Err("Landlock is not enabled (add landlock to the kernel's lsm= boot parameter)".to_owned())
        }
        Err(e) => Err(format!("Landlock: {e}")),
    }
}

/// The filesystem rights a ruleset handles at `abi`: every kind of write.
/// Reading and executing stay unrestricted.
fn handled_fs(abi: u32) -> u64 {
    let mut rights = ll::FS_WRITE_FILE
        | ll::FS_REMOVE_DIR
        | ll::FS_REMOVE_FILE
        | ll::FS_MAKE_CHAR
        | ll::FS_MAKE_DIR
        | ll::FS_MAKE_REG
        | ll::FS_MAKE_SOCK
        | ll::FS_MAKE_FIFO
        | ll::FS_MAKE_BLOCK
        | ll::FS_MAKE_SYM;
    if abi >= 2 {
        rights |= ll::FS_REFER;
    }
    if abi >= 3 {
        rights |= ll::FS_TRUNCATE;
    }
    rights
}

/// A ruleset allowing every handled write beneath `writable` (and
/// `/dev/shm`), and writing (not creating) the harmless devices.
fn ruleset(plan: LandlockPlan, writable: &[&Path]) -> io::Result<std::os::fd::OwnedFd> {
    let ruleset = sys::landlock_ruleset(plan.fs, plan.net, plan.scoped)?;
    let allow = |path: &Path, access: u64| -> io::Result<()> {
        // O_PATH: a handle on the file itself, without opening a device.
        let handle = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        sys::landlock_allow(&ruleset, handle.as_fd(), access)
    };
    for path in writable {
        allow(path, plan.fs)?;
    }
    if Path::new("/dev/shm").is_dir() {
        allow(Path::new("/dev/shm"), plan.fs)?;
    }
    // Shells open /dev/null with O_TRUNC: truncating is writing here.
    let device = plan.fs & (ll::FS_WRITE_FILE | ll::FS_TRUNCATE);
    for path in ["/dev/null", "/dev/zero", "/dev/full"] {
        if Path::new(path).exists() {
            allow(Path::new(path), device)?;
        }
    }
    Ok(ruleset)
}

/// Whether this process holds capabilities (root, usually) that commands
/// must not inherit.
fn holds_capabilities() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        // Unknown: try to drop them; dropping what one lacks is harmless.
        return true;
    };
    status
        .lines()
        .filter_map(|line| line.strip_prefix("CapEff:"))
        .any(|set| u64::from_str_radix(set.trim(), 16) != Ok(0))
}

fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    if bytes.is_multiple_of(GIB) {
        format!("{} GiB", bytes / GIB)
    } else if bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// One command's confinement, from before it starts until everything it
/// started is gone. Dropped early (the job was cancelled), it kills what
/// is left and cleans up, blocking briefly.
pub(crate) struct Confinement {
    /// For the child process; taken by [`Confinement::install`].
    plan: Option<sys::ChildPlan>,
    /// The checkout and the private temporary directory as the command
    /// sees them (in its own root, or on the host).
    home: PathBuf,
    tmp_inside: PathBuf,
    tmp: Option<TempDir>,
    cgroup: Option<CommandCgroup>,
    /// Whether the child is a PID namespace's supervisor (see `sys`).
    pid_namespace: bool,
    /// The child's process id, once started.
    pid: Option<i32>,
    limits: SandboxLimits,
    note: Option<String>,
    /// Set by [`Confinement::finish`]; until then, dropping kills.
    finished: bool,
}

impl Confinement {
    /// The command's private temporary directory (its `TMPDIR`), as the
    /// command sees it.
    pub(crate) fn tmp_dir(&self) -> &Path {
        &self.tmp_inside
    }

    /// The checkout (its `HOME`), as the command sees it.
    pub(crate) fn home(&self) -> &Path {
        &self.home
    }

    /// Makes `command`'s child process confine itself.
    pub(crate) fn install(&mut self, command: &mut tokio::process::Command) {
        if let Some(plan) = self.plan.take() {
            sys::install(command, plan);
        }
    }

    /// Records the started child's process id.
    pub(crate) fn started(&mut self, pid: Option<u32>) {
        self.pid = pid.and_then(|pid| i32::try_from(pid).ok());
    }

    /// Kills everything the command started, now (its time is up).
    pub(crate) fn stop(&self) {
        if let Some(pid) = self.pid {
            if self.pid_namespace {
                // The supervisor kills the namespace's init, which takes the
                // namespace with it, and exits once all of it is gone.
                sys::kill(pid, libc::SIGTERM);
            } else {
                sys::kill(-pid, libc::SIGKILL);
            }
        }
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill();
        }
    }

    /// After the child has exited: kills whatever it left behind, waits until
    /// that is gone, removes the cgroups and temporary directory, and returns
    /// the notes for the command's stderr.
    pub(crate) async fn finish(mut self) -> Vec<String> {
        let mut notes = Vec::new();
        if !self.pid_namespace
            && let Some(pid) = self.pid
        {
            // Without a PID namespace, the rest of the process group may
            // still hold the output pipes. (With one, nothing is left: the
            // supervisor exits after the namespace is gone.) The group id
            // could in theory be reused once the group is empty, but only
            // by a process that made itself a group leader in the
            // microseconds since; the cgroup, if any, closes that gap.
            sys::kill(-pid, libc::SIGKILL);
        }
        if let Some(cgroup) = &self.cgroup {
            if !cgroup.kill_and_wait().await {
                notes.push("some of the command's processes could not be killed".to_owned());
            }
            let events = cgroup.events();
            if events.process_limit {
                notes.push(format!(
                    "the command reached its limit of {} processes: some forks failed",
                    self.limits.max_processes
                ));
            }
            if events.memory_limit {
                notes.push(format!(
                    "the command reached its memory limit of {}: the kernel killed a process",
                    human_bytes(self.limits.max_memory)
                ));
            }
        }
        // Removes the (now empty) cgroups.
        self.cgroup = None;
        if let Some(tmp) = self.tmp.take() {
            // A test may leave many files: remove them off the async threads.
            let _ = tokio::task::spawn_blocking(move || drop(tmp)).await;
        }
        // Only now: if this future is dropped before, `drop` kills and waits.
        self.finished = true;
        notes.extend(self.note.take());
        notes
    }
}

impl Drop for Confinement {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.stop();
        if let Some(cgroup) = self.cgroup.take()
            && !cgroup.kill_and_wait_blocking()
        {
            tracing::warn!("a cancelled command's processes could not all be killed");
        }
    }
}

/// A command's private directory, removed when dropped: its `TMPDIR`
/// (`tmp`), its `/dev/shm` (`shm`), and with a root of its own, that root's
/// mount point (`root`) and the checkout overlay's `upper` and `work`.
struct TempDir(PathBuf);

impl TempDir {
    /// Creates it, with `tmp` and `shm` belonging to `user` if any.
    fn create(user: Option<(u32, u32)>) -> io::Result<TempDir> {
        let path = std::env::temp_dir().join(unique_name("tmp"));
        let at = |path: &Path, e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        fs::DirBuilder::new().mode(0o700).create(&path).map_err(|e| at(&path, e))?;
        let dir = TempDir(path);
        for sub in ["tmp", "shm", "root"] {
            let sub = dir.0.join(sub);
            fs::DirBuilder::new().mode(0o700).create(&sub).map_err(|e| at(&sub, e))?;
        }
        if let Some((uid, gid)) = user {
            // The top too: without a root of its own, the command reaches
            // its TMPDIR through it.
            for path in [dir.0.clone(), dir.tmp(), dir.shm()] {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(|e| at(&path, e))?;
            }
        }
        Ok(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn tmp(&self) -> PathBuf {
        self.0.join("tmp")
    }

    fn shm(&self) -> PathBuf {
        self.0.join("shm")
    }
}

/// Recreates the directories of `checkout` beneath `upper` (an overlay's
/// upper layer), with their modes, owned by `user`: an overlay shows a
/// directory with the owner of its upper copy, so the sandbox user may
/// create and remove files in every directory of the checkout, while the
/// files themselves stay the checkout's.
fn copy_directories(checkout: &Path, upper: &Path, user: Option<(u32, u32)>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut pending = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let source = checkout.join(&relative);
        let target = upper.join(&relative);
        let mode = fs::symlink_metadata(&source)?.permissions().mode() & 0o7777;
        fs::DirBuilder::new().mode(0o700).create(&target)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(mode | 0o700))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&target, Some(uid), Some(gid))?;
        }
        for entry in fs::read_dir(&source)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(relative.join(entry.file_name()));
            }
        }
    }
    Ok(())
}

/// Which of the host's users or groups is called `uid` or `gid`, if any.
fn named_on_host(uid: u32, gid: u32) -> Option<String> {
    let find = |file: &str, id: u32| -> Option<String> {
        let text = fs::read_to_string(file).ok()?;
        text.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            (fields.nth(1)? == id.to_string()).then(|| format!("{name} in {file}"))
        })
    };
    find("/etc/passwd", uid).or_else(|| find("/etc/group", gid))
}

/// What the probe found for the mechanisms that need a trial run.
struct Trials {
    /// A root of its own; inside, whether the checkout can have an overlay
    /// (without one, it is bound read-only).
    mount: Result<Result<(), String>, String>,
    /// The user to switch to (`None`: not root, or disabled).
    user: Result<Option<(u32, u32)>, String>,
    filter: Result<Vec<libc::sock_filter>, String>,
}

/// Tries, in forked children, a root of its own, a change of user and the
/// seccomp filter, each alone, in `namespaces` as commands get them.
fn probe_confinement(namespaces: &sys::Namespaces, allowed: Options) -> Trials {
    let plan = |root, user, filter| sys::ChildPlan {
        cgroup_procs: Vec::new(),
        namespaces: namespaces.clone(),
        rlimits: sys::Rlimits::default(),
        drop_capabilities: false,
        landlock: None,
        landlock_writes: 0,
        root,
        user,
        filter,
        runner: std::process::id(),
    };
    let try_root = |overlay| {
        trial_root(namespaces, overlay).and_then(|(dir, root)| {
            let tried = sys::try_plan(&plan(Some(root), None, None)).map_err(|e| format!("a root of its own: {e}"));
            drop(dir);
            tried
        })
    };
    let mount = if allowed.mount_namespace {
        match try_root(true) {
            Ok(()) => Ok(Ok(())),
            // An overlay needs a filesystem that can hold its upper layer
            // (not an overlay itself, as a container's /tmp may be).
            Err(overlay) => try_root(false).map(|()| Err(format!("an overlay on the checkout: {overlay}"))),
        }
    } else {
        Err("disabled".to_owned())
    };
    let user = if !allowed.unprivileged_user {
        Err("disabled".to_owned())
    } else if namespaces.user.is_some() || !holds_capabilities() {
        Ok(None)
    } else if mount.is_err() {
        // In the host's filesystem, another user could neither write the
        // checkout (no overlay) nor reach a toolchain installed under
        // root's home: tests would fail rather than be confined.
        Err("it needs mount isolation".to_owned())
    } else {
        let ids = (sandbox_id(), sandbox_id());
        sys::try_plan(&plan(None, Some(ids), None)).map(|()| Some(ids)).map_err(|e| format!("setresuid: {e}"))
    };
    let filter = match (allowed.syscall_filter, seccomp::program()) {
        (false, _) => Err("disabled".to_owned()),
        (true, None) => Err("no filter for this architecture".to_owned()),
        (true, Some(program)) => sys::try_plan(&plan(None, None, Some(program.clone())))
            .map(|()| program)
            .map_err(|e| format!("seccomp: {e}")),
    };
    Trials { mount, user, filter }
}

/// A root like a command's, for the probe, in a temporary directory to
/// remove after the trial.
fn trial_root(namespaces: &sys::Namespaces, overlay: bool) -> Result<(TempDir, sys::RootPlan), String> {
    let dir = TempDir::create(None).map_err(|e| e.to_string())?;
    let checkout = dir.path().join("checkout");
    let (upper, work) = (dir.path().join("upper"), dir.path().join("work"));
    for path in [&checkout, &upper, &work] {
        fs::create_dir(path).map_err(|e| e.to_string())?;
    }
    let layout = root::Layout {
        root: &dir.path().join("root"),
        checkout: &checkout,
        cwd: &checkout,
        tmp: &dir.tmp(),
        shm: &dir.shm(),
        overlay: overlay.then_some((&upper, &work)),
        user_namespace: namespaces.user.is_some(),
        program: Path::new("/bin/sh"),
        proc: namespaces.pid,
        user: sys::effective_ids(),
        hidden: &[],
        binds: &[],
    };
    let plan = root::plan(&layout).map_err(|e| e.to_string())?;
    Ok((dir, plan))
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.0.display(), "could not remove a command's temporary directory: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(coverages: &[(Mechanism, Coverage)]) -> SandboxReport {
        let mechanisms = coverages
            .iter()
            .map(|&(mechanism, coverage)| MechanismReport { mechanism, coverage, detail: "why".to_owned() })
            .collect();
        SandboxReport { mechanisms }
    }

    #[test]
    fn the_command_note_names_what_is_degraded() {
        let complete =
            report(&[(Mechanism::ProcessCleanup, Coverage::Full), (Mechanism::FileSizeLimit, Coverage::Full)]);
        assert!(complete.is_complete());
        assert_eq!(complete.command_note(), None);
        let degraded = report(&[
            (Mechanism::ProcessCleanup, Coverage::Full),
            (Mechanism::MemoryLimit, Coverage::Partial),
            (Mechanism::NetworkIsolation, Coverage::Missing),
        ]);
        assert!(!degraded.is_complete());
        assert_eq!(
            degraded.command_note().as_deref(),
            Some("ran without full memory limit (partly), network isolation; the runner's start-up log says why")
        );
        assert_eq!(
            degraded.to_string(),
            "process-tree cleanup: yes: why\nmemory limit: partly: why\nnetwork isolation: NO: why"
        );
    }

    #[test]
    fn landlock_handles_every_write_the_abi_knows() {
        assert_eq!(handled_fs(1) & (ll::FS_REFER | ll::FS_TRUNCATE), 0);
        assert_eq!(handled_fs(2) & ll::FS_TRUNCATE, 0);
        assert_eq!(handled_fs(3), handled_fs(1) | ll::FS_REFER | ll::FS_TRUNCATE);
        assert_eq!(handled_fs(7), handled_fs(3));
    }

    #[test]
    fn only_names_of_gone_processes_are_stale() {
        let mine = unique_name("cmd");
        assert!(!is_stale(&mine, "cmd"), "this process runs");
        // Process ids are below 2^22 on Linux.
        assert!(is_stale("kiln-cmd-99999999-3", "cmd"));
        assert!(!is_stale("kiln-cmd-99999999-3", "tmp"));
        for name in ["kiln-cmd-99999999", "kiln-cmd-99999999-3-1", "kiln-cmd-x-3", "other-cmd-99999999-3", "kiln-cmd"] {
            assert!(!is_stale(name, "cmd"), "{name}");
        }
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(4 << 30), "4 GiB");
        assert_eq!(human_bytes(128 << 20), "128 MiB");
        assert_eq!(human_bytes(1000), "1000 bytes");
    }
}
