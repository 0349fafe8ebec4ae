//! The system calls behind the process sandbox: the crate's only `unsafe`
//! code. Every other module calls the safe functions here.
//!
//! Two kinds of code live here. Thin wrappers the runner calls in its own
//! process (`kill`, Landlock rulesets, a forked probe). And [`install`], which
//! registers the code a command's child process runs between `fork` and
//! `exec`: in that window the child is a copy of a multi-threaded process
//! whose other threads are gone, possibly while holding the allocator's or
//! stdio's locks, so it may only make async-signal-safe calls. Everything it
//! needs (paths, map contents, file descriptors) is prepared by the parent in
//! a [`ChildPlan`]; the child code below makes raw `libc` calls on that data
//! and never allocates, formats or panics on purpose.
//!
//! Linux only: namespaces, Landlock, `close_range` and `prctl` are Linux
//! interfaces.

use std::ffi::{CStr, CString, c_int, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Landlock's constants (linux/landlock.h); libc has the system call numbers
/// but not these.
pub(crate) mod landlock {
    pub(crate) const CREATE_RULESET_VERSION: u32 = 1 << 0;
    pub(crate) const RULE_PATH_BENEATH: u32 = 1;

    pub(crate) const FS_WRITE_FILE: u64 = 1 << 1;
    pub(crate) const FS_REMOVE_DIR: u64 = 1 << 4;
    pub(crate) const FS_REMOVE_FILE: u64 = 1 << 5;
    pub(crate) const FS_MAKE_CHAR: u64 = 1 << 6;
    pub(crate) const FS_MAKE_DIR: u64 = 1 << 7;
    pub(crate) const FS_MAKE_REG: u64 = 1 << 8;
    pub(crate) const FS_MAKE_SOCK: u64 = 1 << 9;
    pub(crate) const FS_MAKE_FIFO: u64 = 1 << 10;
    pub(crate) const FS_MAKE_BLOCK: u64 = 1 << 11;
    pub(crate) const FS_MAKE_SYM: u64 = 1 << 12;
    /// ABI 2.
    pub(crate) const FS_REFER: u64 = 1 << 13;
    /// ABI 3.
    pub(crate) const FS_TRUNCATE: u64 = 1 << 14;

    /// ABI 4.
    pub(crate) const NET_BIND_TCP: u64 = 1 << 0;
    pub(crate) const NET_CONNECT_TCP: u64 = 1 << 1;

    /// ABI 6.
    pub(crate) const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    pub(crate) const SCOPE_SIGNAL: u64 = 1 << 1;

    /// `struct landlock_ruleset_attr` as of ABI 6. Older kernels accept the
    /// larger struct as long as the fields they do not know are zero.
    #[repr(C)]
    pub(super) struct RulesetAttr {
        pub handled_access_fs: u64,
        pub handled_access_net: u64,
        pub scoped: u64,
    }

    /// `struct landlock_path_beneath_attr`, which the kernel declares packed.
    #[repr(C, packed)]
    pub(super) struct PathBeneathAttr {
        pub allowed_access: u64,
        pub parent_fd: i32,
    }
}

/// The namespaces a command's child enters before it starts the program.
#[derive(Clone, Debug, Default)]
pub(crate) struct Namespaces {
    /// A new PID namespace: the child forks the program as the namespace's
    /// init, and stays behind as its supervisor (see [`supervise`]).
    pub pid: bool,
    /// A new network namespace, whose loopback interface is brought up.
    pub net: bool,
    /// Enter a user namespace first, mapping the runner's own user and group
    /// to themselves, which gives an unprivileged runner the right to create
    /// the others.
    pub user: Option<IdMaps>,
}

impl Namespaces {
    fn flags(&self) -> c_int {
        let mut flags = 0;
        if self.pid {
            flags |= libc::CLONE_NEWPID;
        }
        if self.net {
            flags |= libc::CLONE_NEWNET;
        }
        if self.user.is_some() {
            flags |= libc::CLONE_NEWUSER;
        }
        flags
    }
}

/// The contents of `/proc/self/uid_map` and `gid_map` for a user namespace,
/// formatted by the parent.
#[derive(Clone, Debug)]
pub(crate) struct IdMaps {
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
}

impl IdMaps {
    /// Maps the runner's effective user and group to themselves.
    pub(crate) fn identity() -> IdMaps {
        let (uid, gid) = effective_ids();
        IdMaps { uid_map: format!("{uid} {uid} 1").into_bytes(), gid_map: format!("{gid} {gid} 1").into_bytes() }
    }
}

/// Resource limits for the program (`setrlimit`, soft and hard alike, so the
/// program cannot raise them again).
#[derive(Clone, Debug, Default)]
pub(crate) struct Rlimits {
    /// `RLIMIT_FSIZE`: the largest file the program may write.
    pub file_size: Option<u64>,
    /// `RLIMIT_NPROC`: per user, which makes it per command only in a fresh
    /// user namespace; root ignores it.
    pub processes: Option<u64>,
    /// `RLIMIT_AS`: virtual memory per process, the fallback without a
    /// memory cgroup.
    pub address_space: Option<u64>,
}

/// One step of building a command's root filesystem, in the child's new
/// mount namespace. Targets are absolute paths beneath [`RootPlan::root`].
#[derive(Debug)]
pub(crate) enum MountStep {
    /// `mkdir` (mode 0755); the parent lists each missing ancestor first.
    Dir(CString),
    /// An empty file, for a file to be bound over.
    File(CString),
    /// A symbolic link at `path` to `target`.
    Symlink { target: CString, path: CString },
    /// A small file with these contents, mode 0644 (`/etc/passwd`).
    Write { path: CString, data: Vec<u8> },
    /// A bind mount of `source` (recursive). When `read_only` is set, it is
    /// remounted read-only with these flags as well: the flags the source's
    /// mount already has, which the kernel locks inside a user namespace.
    Bind { source: CString, target: CString, read_only: Option<libc::c_ulong> },
    /// An overlay at `target`; `options` name its lower, upper and work
    /// directories (writes land in the upper one, never in the lower).
    Overlay { target: CString, options: CString },
    /// An empty, read-only, mode 000 tmpfs: what hides a secret directory
    /// beneath a bound one.
    Mask(CString),
    /// A `proc` for the command's own PID namespace.
    Proc(CString),
}

/// The root filesystem a command sees: a fresh tmpfs mounted on `root` (a
/// directory of its own, on the host), filled by `steps`, then made the
/// root with `pivot_root`, the host's root detached, and remounted
/// read-only.
#[derive(Debug)]
pub(crate) struct RootPlan {
    pub root: CString,
    pub steps: Vec<MountStep>,
    /// The working directory, as the command sees it.
    pub cwd: CString,
    /// Directories (as the command sees them) the Landlock ruleset allows
    /// every write beneath: an overlay's merged directories exist only in
    /// the command's mount namespace, so only the child can name them.
    pub writable: Vec<CString>,
}

/// Everything a command's child process does between `fork` and `exec`,
/// prepared by the parent so that the child only makes system calls.
#[derive(Debug)]
pub(crate) struct ChildPlan {
    /// `cgroup.procs` files (opened for writing, close-on-exec) of the
    /// command's cgroups: the child moves itself into each before it forks.
    pub cgroup_procs: Vec<OwnedFd>,
    pub namespaces: Namespaces,
    pub rlimits: Rlimits,
    /// Drop every capability (bounding, ambient, effective, permitted,
    /// inheritable), so that a runner running as root does not hand root's
    /// powers (`setns`, `mount`, moving cgroups) to the tests.
    pub drop_capabilities: bool,
    /// A Landlock ruleset to restrict the program with.
    pub landlock: Option<OwnedFd>,
    /// The write rights `landlock` handles, for [`RootPlan::writable`].
    pub landlock_writes: u64,
    /// A mount namespace with only this in it.
    pub root: Option<RootPlan>,
    /// The unprivileged user and group to run as, with no supplementary
    /// groups (only a runner running as root has one to switch to).
    pub user: Option<(u32, u32)>,
    /// A seccomp filter, installed last.
    pub filter: Option<Vec<libc::sock_filter>>,
    /// The runner's process id: if the runner dies (even by SIGKILL), the
    /// child is signalled, so that no command outlives it unsupervised.
    pub runner: u32,
}

#[expect(unsafe_code, reason = "geteuid and getegid have no wrapper in std")]
pub(crate) fn effective_ids() -> (u32, u32) {
    // SAFETY: geteuid(2) and getegid(2) take no arguments and cannot fail.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Sends `signal` to `pid` (a process group when negative). Refuses the
/// values that address more than one process group or the caller's own.
#[expect(unsafe_code, reason = "kill(2) has no wrapper in std for process groups or other signals")]
pub(crate) fn kill(pid: i32, signal: c_int) {
    if (-1..=1).contains(&pid) {
        return;
    }
    // SAFETY: kill(2) takes plain integers and has no memory-safety
    // preconditions; an error (ESRCH: already gone) needs no handling.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// The Landlock ABI version the kernel supports.
#[expect(unsafe_code, reason = "Landlock has no wrapper in std or libc")]
pub(crate) fn landlock_abi() -> io::Result<u32> {
    // SAFETY: with a null attribute, size 0 and the VERSION flag the kernel
    // reads no memory and returns the ABI version.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<c_void>(),
            0usize,
            landlock::CREATE_RULESET_VERSION,
        )
    };
    if abi < 0 { Err(io::Error::last_os_error()) } else { Ok(u32::try_from(abi).unwrap_or(0)) }
}

/// A new Landlock ruleset handling these access rights.
#[expect(unsafe_code, reason = "Landlock has no wrapper in std or libc")]
pub(crate) fn landlock_ruleset(handled_fs: u64, handled_net: u64, scoped: u64) -> io::Result<OwnedFd> {
    let attr = landlock::RulesetAttr { handled_access_fs: handled_fs, handled_access_net: handled_net, scoped };
    // SAFETY: `attr` is a live, initialised struct of the size passed; the
    // kernel only reads it.
    let fd = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, &raw const attr, size_of::<landlock::RulesetAttr>(), 0u32)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor (close-on-exec) and
    // nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Allows `access` beneath the file or directory open as `parent` (an
/// `O_PATH` descriptor) in `ruleset`.
#[expect(unsafe_code, reason = "Landlock has no wrapper in std or libc")]
pub(crate) fn landlock_allow(ruleset: &OwnedFd, parent: BorrowedFd<'_>, access: u64) -> io::Result<()> {
    let attr = landlock::PathBeneathAttr { allowed_access: access, parent_fd: parent.as_raw_fd() };
    // SAFETY: both descriptors are open for the duration of the call; `attr`
    // is a live struct of the layout the kernel expects, only read.
    let result = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            landlock::RULE_PATH_BENEATH,
            &raw const attr,
            0u32,
        )
    };
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Tries, in a forked child that then exits, to enter `namespaces` the way
/// a command's child would (bringing loopback up, and forking an init into a
/// new PID namespace). Says why not if it cannot.
#[expect(unsafe_code, reason = "fork(2) and waitpid(2) have no wrapper in std")]
pub(crate) fn try_namespaces(namespaces: &Namespaces) -> io::Result<()> {
    // SAFETY: the child of fork(2) in this multi-threaded process only makes
    // async-signal-safe system calls (in `enter_namespaces` and below) and
    // leaves with _exit(2), never returning into Rust code that might take a
    // lock or allocate.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = match enter_namespaces(namespaces) {
            Ok(()) if namespaces.pid => match fork_and_reap() {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
            },
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
        };
        // SAFETY: _exit(2) is async-signal-safe and ends the child without
        // running the parent's atexit handlers or destructors.
        unsafe { libc::_exit(code.clamp(0, 255)) }
    }
    wait_for_probe(pid)
}

/// Waits for the probe child `pid`: its exit code is an errno.
#[expect(unsafe_code, reason = "waitpid(2) has no wrapper in std")]
fn wait_for_probe(pid: libc::pid_t) -> io::Result<()> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a live c_int the kernel writes; `pid` is our
        // own child, which nothing else waits for.
        let reaped = unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if reaped == pid {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
        (true, 0) => Ok(()),
        (true, code) => Err(io::Error::from_raw_os_error(code)),
        _ => Err(io::Error::other("the probe process was killed")),
    }
}

/// Tries, in a forked child that then exits, everything a command's child
/// would do with `plan` (namespaces, root, user, filter), and with a filter,
/// that it denies `keyctl`. Says why not if it cannot.
#[expect(unsafe_code, reason = "fork(2) has no wrapper in std")]
pub(crate) fn try_plan(plan: &ChildPlan) -> io::Result<()> {
    // SAFETY: as in `try_namespaces`: the child makes only async-signal-safe
    // system calls (`child_setup` is the code commands run) and leaves with
    // _exit(2).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = match child_setup(plan) {
            Ok(()) if plan.filter.is_some() => {
                // SAFETY: keyctl(2) with integer arguments; denied, it does
                // nothing.
                let result = unsafe { libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0) };
                let errno = io::Error::last_os_error().raw_os_error();
                if result < 0 && errno == Some(libc::EPERM) { 0 } else { libc::ENOTSUP }
            }
            Ok(()) => 0,
            Err(e) => e.raw_os_error().unwrap_or(libc::EINVAL),
        };
        // SAFETY: _exit(2) is async-signal-safe and ends the child at once.
        unsafe { libc::_exit(code.clamp(0, 255)) }
    }
    wait_for_probe(pid)
}

/// In a probe child: forks a process (the new PID namespace's init) that
/// exits at once, and reaps it.
#[expect(unsafe_code, reason = "fork(2) and waitpid(2) have no wrapper in std")]
fn fork_and_reap() -> io::Result<()> {
    // SAFETY: called in a single-threaded forked child; the grandchild only
    // calls _exit(2).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: async-signal-safe, ends the grandchild at once.
        unsafe { libc::_exit(0) }
    }
    let mut status = 0;
    // SAFETY: `status` is a live c_int; `pid` is this process's child.
    if unsafe { libc::waitpid(pid, &raw mut status, 0) } != pid {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Registers `plan` to run in `command`'s child between `fork` and `exec`.
///
/// With a PID namespace, the child `fork`s once more: the grandchild becomes
/// the namespace's init and goes on to `exec` the program, while the child
/// stays behind as its supervisor, the process the caller waits for (see
/// [`supervise`]). Send it `SIGTERM` to have the whole namespace killed; its
/// exit status is the program's.
#[expect(unsafe_code, reason = "pre_exec is how code runs between fork and exec")]
pub(crate) fn install(command: &mut tokio::process::Command, plan: ChildPlan) {
    // SAFETY: `child_setup` only makes async-signal-safe system calls on data
    // prepared before the fork (see the module docs); it neither allocates
    // nor takes locks. The descriptors `plan` owns are close-on-exec, so the
    // program does not inherit them.
    unsafe {
        command.pre_exec(move || child_setup(&plan));
    }
}

/// The child's part: runs in the forked child, single-threaded, before
/// `exec`. std has already set up stdio and the working directory.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn child_setup(plan: &ChildPlan) -> io::Result<()> {
    // A session of its own: the command leads a new process group, away from
    // the runner's terminal (if any) and its signals.
    // SAFETY: setsid(2) takes no arguments.
    check(unsafe { libc::setsid() })?;
    for procs in &plan.cgroup_procs {
        // Writing 0 moves the writing process; its children inherit the
        // cgroup, so everything the program starts is in it.
        // SAFETY: a live descriptor and a one-byte static buffer.
        if unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    enter_namespaces(&plan.namespaces)?;
    // When the runner's thread that started this process ends (the runner
    // died), a supervisor gets SIGTERM and takes its namespace down; a
    // program without one is killed. (Set after the namespaces: credential
    // changes can clear it.)
    let on_runner_death = if plan.namespaces.pid { libc::SIGTERM } else { libc::SIGKILL };
    die_with_parent(on_runner_death, Parent::Runner(plan.runner))?;
    // The init's end of the pipe that says whether its supervisor lives.
    let supervisor = if plan.namespaces.pid { Some(become_supervisor()?) } else { None };
    // In the init, so that its /proc is the new PID namespace's.
    if let Some(root) = &plan.root {
        enter_root(root)?;
        if let Some(ruleset) = &plan.landlock {
            for path in &root.writable {
                allow_in_child(ruleset, path, plan.landlock_writes)?;
            }
        }
    }
    let limit = |resource, value: u64| -> io::Result<()> {
        let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: `limit` is a live struct the kernel only reads.
        check(unsafe { libc::setrlimit(resource, &raw const limit) })
    };
    // No core dumps: they would land in the checkout, or in a system-wide
    // crash collector, and can be as large as the program's memory.
    limit(libc::RLIMIT_CORE, 0)?;
    if let Some(bytes) = plan.rlimits.file_size {
        limit(libc::RLIMIT_FSIZE, bytes)?;
    }
    if let Some(count) = plan.rlimits.processes {
        limit(libc::RLIMIT_NPROC, count)?;
    }
    if let Some(bytes) = plan.rlimits.address_space {
        limit(libc::RLIMIT_AS, bytes)?;
    }
    if plan.drop_capabilities {
        // The bounding set first: dropping it needs CAP_SETPCAP, which the
        // change of user below takes away.
        drop_bounding_set()?;
    }
    if let Some((uid, gid)) = plan.user {
        become_user(uid, gid)?;
    }
    if plan.drop_capabilities {
        clear_capabilities()?;
    }
    // Changing credentials cleared the parent-death signal: set it again,
    // and make sure the parent did not die in between.
    match supervisor {
        Some(alive) => {
            if plan.user.is_some() {
                die_with_parent(libc::SIGKILL, Parent::Supervisor(alive))?;
            }
            // SAFETY: the init's own descriptor, closed once.
            unsafe { libc::close(alive) };
        }
        None if plan.user.is_some() => die_with_parent(on_runner_death, Parent::Runner(plan.runner))?,
        None => {}
    }
    // Nothing the program executes can gain privileges (setuid binaries,
    // file capabilities); Landlock and seccomp require it of an
    // unprivileged caller.
    // SAFETY: prctl(2) with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, ONE, NIL, NIL, NIL) })?;
    if let Some(ruleset) = &plan.landlock {
        // SAFETY: a live ruleset descriptor and no flags.
        let result = unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset.as_raw_fd(), 0u32) };
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // Last: from here on, the calls above would be denied too.
    if let Some(filter) = &plan.filter {
        install_filter(filter)?;
    }
    Ok(())
}

/// Who a child must not outlive.
enum Parent {
    /// The runner, by process id.
    Runner(u32),
    /// A PID namespace's supervisor, by the read end of a pipe only it
    /// holds the write end of.
    Supervisor(RawFd),
}

/// Asks for `signal` when the parent dies, then checks that it has not
/// died already (in which case the signal will never come).
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn die_with_parent(signal: c_int, parent: Parent) -> io::Result<()> {
    // SAFETY: prctl(2), getppid(2) and read(2) on integer arguments and a
    // live one-byte buffer; _exit(2) ends the process.
    unsafe {
        check(libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, NIL, NIL, NIL))?;
        match parent {
            // The runner may have died before that: then this process has
            // been re-parented already.
            Parent::Runner(pid) => {
                if u32::try_from(libc::getppid()).ok() != Some(pid) {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
            }
            // End of file (not EAGAIN): the write end is closed, the
            // supervisor is gone.
            Parent::Supervisor(alive) => {
                let mut byte = 0u8;
                if libc::read(alive, (&raw mut byte).cast(), 1) == 0 {
                    libc::_exit(127);
                }
            }
        }
    }
    Ok(())
}

/// Allows `access` beneath `path` in `ruleset`, from the child.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn allow_in_child(ruleset: &OwnedFd, path: &CStr, access: u64) -> io::Result<()> {
    // SAFETY: open(2) of a NUL-terminated string; O_PATH opens no device.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    check(fd)?;
    let attr = landlock::PathBeneathAttr { allowed_access: access, parent_fd: fd };
    // SAFETY: live descriptors and a live struct of the kernel's layout.
    let result = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            landlock::RULE_PATH_BENEATH,
            &raw const attr,
            0u32,
        )
    };
    let result = if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: opened above, closed once.
    unsafe { libc::close(fd) };
    result
}

/// The `ST_*` flags of the filesystem `path` is on (`statvfs`).
#[expect(unsafe_code, reason = "statvfs(3) has no wrapper in std")]
pub(crate) fn statvfs_flags(path: &CStr) -> io::Result<libc::c_ulong> {
    // SAFETY: statvfs is plain old data, valid when zeroed.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a live struct the call writes.
    check(unsafe { libc::statvfs(path.as_ptr(), &raw mut stat) })?;
    Ok(stat.f_flag)
}

/// Switches to `uid` and `gid` for good, with no supplementary groups.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn become_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups(2) with an empty list, and setres[ug]id(2) with
    // integers. The group first: after the user changes, it cannot.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(gid, gid, gid))?;
        check(libc::setresuid(uid, uid, uid))?;
    }
    Ok(())
}

/// Installs the seccomp `filter` (`no_new_privs` must be set).
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn install_filter(filter: &[libc::sock_filter]) -> io::Result<()> {
    let len = libc::c_ushort::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let program = libc::sock_fprog { len, filter: filter.as_ptr().cast_mut() };
    // SAFETY: `program` points at `filter`, live for the call; the kernel
    // copies the instructions and never writes through the pointer.
    check(unsafe {
        libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER as libc::c_ulong, &raw const program, NIL, NIL)
    })
}

/// Gives this process a mount namespace whose root is `plan`'s: see
/// [`RootPlan`]. Afterwards nothing of the host's filesystem is reachable
/// but what the steps bound.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn enter_root(plan: &RootPlan) -> io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: unshare(2) and mount(2) with NUL-terminated strings that
    // outlive the calls, or null where the kernel accepts null.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Nothing mounted from here on may propagate back to the host.
        check(libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
        check(libc::mount(
            c"tmpfs".as_ptr(),
            plan.root.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            c"mode=0755,size=1m".as_ptr().cast(),
        ))?;
    }
    for step in &plan.steps {
        mount_step(step)?;
    }
    // SAFETY: as above; chdir(2), pivot_root(2) and umount2(2) on live
    // strings. pivot_root(".", ".") stacks the old root on top of the new
    // one, and detaching "." then leaves only the new one.
    unsafe {
        check(libc::chdir(plan.root.as_ptr()))?;
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as c_int)?;
        check(libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        check(libc::chdir(c"/".as_ptr()))?;
        check(libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            std::ptr::null(),
        ))?;
        // std changed to the host's path of the working directory, which
        // is gone now (and must be: it would be a way out).
        check(libc::chdir(plan.cwd.as_ptr()))?;
    }
    Ok(())
}

/// One step of [`enter_root`].
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn mount_step(step: &MountStep) -> io::Result<()> {
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: system calls on NUL-terminated strings and buffers owned by
    // `step`, live for each call.
    unsafe {
        match step {
            MountStep::Dir(path) => {
                if libc::mkdir(path.as_ptr(), 0o755) < 0 {
                    let error = io::Error::last_os_error();
                    if error.raw_os_error() != Some(libc::EEXIST) {
                        return Err(error);
                    }
                }
            }
            MountStep::File(path) | MountStep::Write { path, .. } => {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_CLOEXEC, 0o644);
                check(fd)?;
                let result = match step {
                    MountStep::Write { data, .. } if libc::write(fd, data.as_ptr().cast(), data.len()) < 0 => {
                        Err(io::Error::last_os_error())
                    }
                    _ => Ok(()),
                };
                libc::close(fd);
                result?;
            }
            MountStep::Symlink { target, path } => check(libc::symlink(target.as_ptr(), path.as_ptr()))?,
            MountStep::Bind { source, target, read_only } => {
                check(libc::mount(
                    source.as_ptr(),
                    target.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))?;
                if let Some(flags) = read_only {
                    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | flags;
                    check(libc::mount(null, target.as_ptr(), null, flags, std::ptr::null()))?;
                }
            }
            MountStep::Overlay { target, options } => check(libc::mount(
                c"overlay".as_ptr(),
                target.as_ptr(),
                c"overlay".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            ))?,
            MountStep::Mask(target) => check(libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=000,size=4k,nr_inodes=1".as_ptr().cast(),
            ))?,
            MountStep::Proc(target) => check(libc::mount(
                c"proc".as_ptr(),
                target.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?,
        }
    }
    Ok(())
}

/// Enters the namespaces; shared by commands and the start-up probe.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn enter_namespaces(namespaces: &Namespaces) -> io::Result<()> {
    let flags = namespaces.flags();
    if flags == 0 {
        return Ok(());
    }
    // SAFETY: unshare(2) with integer flags; this process is single-threaded
    // (a forked child), as CLONE_NEWUSER requires.
    check(unsafe { libc::unshare(flags) })?;
    if let Some(maps) = &namespaces.user {
        // An unprivileged process may map only its own ids, and only after
        // giving up setgroups(2) for good.
        write_file(c"/proc/self/setgroups", b"deny")?;
        write_file(c"/proc/self/uid_map", &maps.uid_map)?;
        write_file(c"/proc/self/gid_map", &maps.gid_map)?;
    }
    if namespaces.net {
        loopback_up()?;
    }
    Ok(())
}

/// Writes `data` to the existing file at `path` in one `write`.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn write_file(path: &CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    check(fd)?;
    // SAFETY: `data` is a live buffer of the length passed; `fd` is open.
    let written = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    let result = if written < 0 { Err(io::Error::last_os_error()) } else { Ok(()) };
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    result
}

/// Brings up the loopback interface of a new network namespace (it starts
/// down), so that tests can still talk to servers they start themselves.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with integer arguments.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(socket)?;
    // SAFETY: `ifreq` is plain old data, valid when zeroed.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    request.ifr_name[0] = b'l' as libc::c_char;
    request.ifr_name[1] = b'o' as libc::c_char;
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a live `ifreq`; the
    // flags member of its union is the one these requests use.
    let result = unsafe {
        if libc::ioctl(socket, libc::SIOCGIFFLAGS as _, &raw mut request) < 0 {
            -1
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(socket, libc::SIOCSIFFLAGS as _, &raw const request)
        }
    };
    let result = check(result);
    // SAFETY: `socket` was opened above and is closed once.
    unsafe { libc::close(socket) };
    result
}

/// In a child that has just unshared a PID namespace: forks the namespace's
/// init, which returns (and goes on to `exec` the program), while this
/// process becomes its supervisor and never returns. The init gets the
/// read end of a pipe whose end of file says the supervisor is gone (it
/// needs to check again after a change of user).
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn become_supervisor() -> io::Result<RawFd> {
    // Block the signals the supervisor waits for before forking, so that
    // none can arrive before it waits.
    // SAFETY: sigset_t is plain old data, initialised by sigemptyset.
    let mut waited: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `waited` is a live sigset_t; the calls only write it or read it.
    unsafe {
        libc::sigemptyset(&raw mut waited);
        libc::sigaddset(&raw mut waited, libc::SIGCHLD);
        libc::sigaddset(&raw mut waited, libc::SIGTERM);
        check(libc::sigprocmask(libc::SIG_BLOCK, &raw const waited, std::ptr::null_mut()))?;
    }
    // A pipe whose write end only the supervisor keeps: its end of file
    // tells the init that the supervisor is already gone.
    let mut alive = [0 as c_int; 2];
    // SAFETY: `alive` has room for the two descriptors.
    check(unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) })?;
    // SAFETY: this process is single-threaded (a forked child); both sides
    // go on making system calls only.
    let init = unsafe { libc::fork() };
    check(init)?;
    if init != 0 {
        supervise(init, alive[1], &waited);
    }
    // SAFETY: the rest are system calls on live, initialised data.
    unsafe {
        libc::close(alive[1]);
    }
    // If the supervisor dies (the runner killed it, say), so does the init,
    // and with it the whole namespace.
    die_with_parent(libc::SIGKILL, Parent::Supervisor(alive[0]))?;
    // SAFETY: system calls on live, initialised data.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut none);
        check(libc::sigprocmask(libc::SIG_SETMASK, &raw const none, std::ptr::null_mut()))?;
        // Its own session, like a command without a PID namespace.
        check(libc::setsid())?;
    }
    Ok(alive[0])
}

/// The supervisor: waits for the init (the program) to end, kills it on
/// `SIGTERM`, and then exits the way the program did. When an init exits,
/// the kernel kills every process left in its namespace and reaps them
/// before the init's own exit completes, so once this process has been
/// reaped, nothing of the command remains.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn supervise(init: libc::pid_t, keep: RawFd, waited: &libc::sigset_t) -> ! {
    // SAFETY: every call below is a system call on live data owned by this
    // function, ending in _exit(2); nothing returns into Rust code.
    unsafe {
        // Release everything inherited except `keep`: stdio (so the output
        // pipes end when the program's processes are gone) and std's
        // close-on-exec pipe that reports `exec` errors (so that `spawn`
        // returns once the init has called `exec`, not when this exits).
        close_from(0, keep);
        close_from(keep + 1, RawFd::MAX);
        libc::prctl(libc::PR_SET_NAME, c"kiln-sandbox".as_ptr(), NIL, NIL, NIL);
        loop {
            let signal = libc::sigwaitinfo(waited, std::ptr::null_mut());
            if signal == libc::SIGTERM {
                libc::kill(init, libc::SIGKILL);
            }
            let mut status = 0;
            let reaped = libc::waitpid(init, &raw mut status, libc::WNOHANG);
            if reaped == init {
                exit_like(status);
            }
            if reaped < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                libc::_exit(127);
            }
        }
    }
}

/// Closes descriptors `first` up to (not including) `end`.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn close_from(first: RawFd, end: RawFd) {
    if first >= end {
        return;
    }
    let last = u32::try_from(end - 1).unwrap_or(u32::MAX);
    let first = u32::try_from(first).unwrap_or(0);
    // SAFETY: close_range(2) with integer arguments; the descriptors closed
    // are this process's own and unused from here on.
    if unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) } == 0 {
        return;
    }
    // Kernels before 5.9 lack close_range: close one by one, up to the
    // descriptor limit.
    // SAFETY: rlimit is plain old data, written by getrlimit.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `limit` is live; the kernel writes it.
    let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } == 0 {
        u32::try_from(limit.rlim_cur).unwrap_or(65_536).min(65_536)
    } else {
        65_536
    };
    for fd in first..=last.min(max) {
        // SAFETY: closing a descriptor number; EBADF for unused ones.
        unsafe { libc::close(fd as RawFd) };
    }
}

/// Exits with `status` (from `waitpid`): the same code, or killed by the
/// same signal.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn exit_like(status: c_int) -> ! {
    // SAFETY: system calls on live local data, ending in _exit(2).
    unsafe {
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let signal = libc::WTERMSIG(status);
            // No core dump of this copy of the runner.
            libc::prctl(libc::PR_SET_DUMPABLE, NIL, NIL, NIL, NIL);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &raw const action, std::ptr::null_mut());
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut());
            libc::kill(libc::getpid(), signal);
            libc::_exit(128 + signal);
        }
        libc::_exit(127)
    }
}

/// Drops the bounding set (so that `exec` cannot give capabilities back,
/// even to root) and the ambient set.
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn drop_bounding_set() -> io::Result<()> {
    // SAFETY: prctl(2) with integer arguments.
    unsafe {
        // Capabilities the kernel does not know give EINVAL: stop there.
        for capability in 0..64 as libc::c_ulong {
            if libc::prctl(libc::PR_CAPBSET_DROP, capability, NIL, NIL, NIL) < 0 {
                let error = io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(error);
            }
        }
        // Older kernels lack ambient capabilities (EINVAL): nothing to clear.
        libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, NIL, NIL, NIL);
    }
    Ok(())
}

/// Clears the effective, permitted and inheritable sets, for good (after
/// [`drop_bounding_set`], nothing can bring them back).
#[expect(unsafe_code, reason = "system calls between fork and exec")]
fn clear_capabilities() -> io::Result<()> {
    /// `struct __user_cap_header_struct`.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: c_int,
    }
    /// `struct __user_cap_data_struct`.
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    // SAFETY: capset(2) with live structs of the layout the kernel expects
    // (version 3 takes two data structs).
    unsafe {
        let header = Header { version: VERSION_3, pid: 0 };
        let data =
            [Data { effective: 0, permitted: 0, inheritable: 0 }, Data { effective: 0, permitted: 0, inheritable: 0 }];
        check(libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()) as c_int)
    }
}

/// prctl(2) reads its optional arguments as `unsigned long`: pass them at
/// that width rather than as `int`s whose upper bits a variadic call leaves
/// unspecified.
const NIL: libc::c_ulong = 0;
const ONE: libc::c_ulong = 1;

fn check(result: c_int) -> io::Result<()> {
    if result < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
