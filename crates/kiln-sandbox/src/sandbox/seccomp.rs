//! The seccomp filter every command runs under: a classic BPF program, built
//! here as plain data (no `unsafe`); `sys` installs it, last before `exec`.
//!
//! The filter is a deny list, not an allow list: test suites run arbitrary
//! toolchains, and an allow list that missed one ordinary call would turn
//! into mysterious test failures. What it denies are the calls a test never
//! needs and an attacker inside the sandbox wants: reading or steering other
//! processes (`ptrace`, `process_vm_*`), changing what the filesystem looks
//! like (the mount API, `pivot_root`, `chroot`), leaving or making
//! namespaces (`unshare`, `setns`, `clone` with namespace flags), the
//! kernel's keyrings, BPF and perf (large attack surfaces), kernel modules,
//! `kexec`, `userfaultfd`, file handles (`open_by_handle_at` walks around
//! mount-namespace roots), `reboot`, swap, `acct` and raw port I/O. They fail
//! with `EPERM`, which programs already handle, except `clone3`, which fails
//! with `ENOSYS`: its flags live in memory a filter cannot read, and on
//! `ENOSYS` the C library falls back to `clone`, whose flags it can.
//!
//! A system call made through another architecture's ABI (x32 on x86_64, or
//! a foreign `AUDIT_ARCH`) would dodge the numbers below: such a call kills
//! the process.

use libc::sock_filter;

/// `AUDIT_ARCH_*` from linux/audit.h (libc does not have them).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// System calls of the x32 ABI have this bit set in their number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Classic BPF opcodes (linux/filter.h, linux/bpf_common.h).
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

// Offsets into `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of the first argument (little-endian targets only).
const ARG0_LOW: u32 = 16;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;

/// The namespace flags `clone` may not carry.
const NAMESPACE_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;

/// The system calls denied with `EPERM`, by name for the report.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) fn denied() -> Vec<(&'static str, libc::c_long)> {
    let mut calls = vec![
        ("ptrace", libc::SYS_ptrace),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("mount", libc::SYS_mount),
        ("umount2", libc::SYS_umount2),
        ("pivot_root", libc::SYS_pivot_root),
        ("chroot", libc::SYS_chroot),
        ("move_mount", libc::SYS_move_mount),
        ("open_tree", libc::SYS_open_tree),
        ("fsopen", libc::SYS_fsopen),
        ("fsmount", libc::SYS_fsmount),
        ("fsconfig", libc::SYS_fsconfig),
        ("fspick", libc::SYS_fspick),
        ("mount_setattr", libc::SYS_mount_setattr),
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        ("keyctl", libc::SYS_keyctl),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        ("bpf", libc::SYS_bpf),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("reboot", libc::SYS_reboot),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        ("acct", libc::SYS_acct),
        ("quotactl", libc::SYS_quotactl),
    ];
    #[cfg(target_arch = "x86_64")]
    calls.extend([("iopl", libc::SYS_iopl), ("ioperm", libc::SYS_ioperm)]);
    calls
}

/// The filter's program, or `None` on an architecture it does not know.
pub(crate) fn program() -> Option<Vec<sock_filter>> {
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    {
        Some(build(&denied()))
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        None
    }
}

fn op(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn build(denied: &[(&str, libc::c_long)]) -> Vec<sock_filter> {
    let number = |nr: libc::c_long| u32::try_from(nr).unwrap_or(u32::MAX);
    let mut program = vec![
        op(LD_W_ABS, ARCH),
        // Our architecture: skip the kill.
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        op(RET_K, RET_KILL_PROCESS),
        op(LD_W_ABS, NR),
    ];
    #[cfg(target_arch = "x86_64")]
    program.extend([jump(JGE_K, X32_SYSCALL_BIT, 0, 1), op(RET_K, RET_KILL_PROCESS)]);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = JGE_K;
    for &(_, nr) in denied {
        program.extend([jump(JEQ_K, number(nr), 0, 1), op(RET_K, RET_ERRNO | libc::EPERM as u32)]);
    }
    program.extend([jump(JEQ_K, number(libc::SYS_clone3), 0, 1), op(RET_K, RET_ERRNO | libc::ENOSYS as u32)]);
    // clone: look at its flags; anything else is allowed.
    program.extend([
        jump(JEQ_K, number(libc::SYS_clone), 1, 0),
        op(RET_K, RET_ALLOW),
        op(LD_W_ABS, ARG0_LOW),
        jump(JSET_K, NAMESPACE_FLAGS, 0, 1),
        op(RET_K, RET_ERRNO | libc::EPERM as u32),
        op(RET_K, RET_ALLOW),
    ]);
    program
}

#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests {
    use super::*;

    /// Runs the program on one system call, as the kernel's interpreter
    /// would (only the instructions `build` emits).
    fn verdict(program: &[sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let mut pc = 0;
        let mut acc = 0;
        loop {
            let insn = &program[pc];
            pc += 1;
            match insn.code {
                LD_W_ABS => {
                    acc = match insn.k {
                        NR => nr,
                        ARCH => arch,
                        ARG0_LOW => arg0,
                        other => panic!("load of offset {other}"),
                    }
                }
                RET_K => return insn.k,
                code => {
                    let taken = match code {
                        JEQ_K => acc == insn.k,
                        JGE_K => acc >= insn.k,
                        JSET_K => acc & insn.k != 0,
                        other => panic!("opcode {other:#x}"),
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
            }
        }
    }

    #[test]
    fn the_filter_denies_its_list_and_allows_the_rest() {
        let program = program().expect("a known architecture");
        assert!(program.len() < 4096, "BPF_MAXINSNS");
        let nr = |n: libc::c_long| u32::try_from(n).unwrap();
        let eperm = RET_ERRNO | libc::EPERM as u32;
        for (name, call) in denied() {
            assert_eq!(verdict(&program, AUDIT_ARCH, nr(call), 0), eperm, "{name}");
        }
        for call in [libc::SYS_read, libc::SYS_write, libc::SYS_execve, libc::SYS_openat, libc::SYS_wait4] {
            assert_eq!(verdict(&program, AUDIT_ARCH, nr(call), 0), RET_ALLOW, "{call}");
        }
        let clone = nr(libc::SYS_clone);
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u32;
        assert_eq!(verdict(&program, AUDIT_ARCH, clone, thread), RET_ALLOW);
        assert_eq!(verdict(&program, AUDIT_ARCH, clone, libc::CLONE_NEWUSER as u32), eperm);
        assert_eq!(verdict(&program, AUDIT_ARCH, nr(libc::SYS_clone3), 0), RET_ERRNO | libc::ENOSYS as u32);
        assert_eq!(verdict(&program, 0x4000_0003, nr(libc::SYS_read), 0), RET_KILL_PROCESS, "i386");
        #[cfg(target_arch = "x86_64")]
        assert_eq!(verdict(&program, AUDIT_ARCH, X32_SYSCALL_BIT | 1, 0), RET_KILL_PROCESS, "x32");
    }
}
