//! The seccomp filter of unprivileged execs.
//!
//! A deny-list in the spirit of Docker's default profile, reduced to the syscalls that reach the
//! kernel's most dangerous surfaces or undo the sandbox (module loading, kexec, ptrace, mounts,
//! namespaces, the clock, bpf, keyrings). Denied calls fail with `EPERM` so programs that probe for
//! them degrade gracefully. The program is compiled once in the agent, before any fork, because the
//! child between `fork` and `exec` must not allocate; it only hands the prebuilt program to the kernel.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Syscalls that fail with `EPERM` (x86_64 numbers).
const DENIED: &[i64] = &[
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_acct,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_unshare,
    libc::SYS_setns,
    // io_uring: a large kernel surface with a long record of privilege escalations (Docker blocks
    // it too); programs fall back to ordinary syscalls.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // Reaching into other processes, like ptrace.
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    libc::SYS_process_madvise,
    // The new mount API: the same power as mount(2).
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_quotactl,
    libc::SYS_quotactl_fd,
    libc::SYS_uselib,
    libc::SYS_lookup_dcookie,
    libc::SYS_vhangup,
    libc::SYS_syslog,
];

/// `clone` flags that create namespaces: blocking `unshare` alone would leave `clone` as a bypass.
const CLONE_NS_FLAGS: &[i32] = &[
    libc::CLONE_NEWNS,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWCGROUP,
];

/// First syscall number of the x32 ABI. x32 shares `AUDIT_ARCH_X86_64`, so the architecture check
/// does not catch it and every x32 number must be refused explicitly.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

// Classic BPF opcodes (linux/bpf_common.h); seccompiler keeps its helpers private.
/// BPF_LD (0x00) | BPF_W (0x00) | BPF_ABS (0x20).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_RET_K: u16 = 0x06;
/// Offset of `nr` in `struct seccomp_data`.
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
/// Length of seccompiler's architecture-check prologue (load arch, compare, kill).
const ARCH_PROLOGUE_LEN: usize = 3;

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> seccompiler::sock_filter {
    seccompiler::sock_filter { code, jt, jf, k }
}

/// Builds the filter: other architectures (i386) kill the process, x32 syscalls and the deny-list
/// fail with `EPERM`, `clone3` fails with `ENOSYS` (its flags live in memory a filter cannot read, so
/// libc falls back to `clone`, whose flags are checked), everything else is allowed.
pub fn build() -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let clone_rules = CLONE_NS_FLAGS
        .iter()
        .map(|&flag| {
            let flag = flag as u64;
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);

    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )?;
    let mut program: BpfProgram = filter.try_into()?;

    // Spliced in right after the architecture check; jumps are relative, so seccompiler's own
    // instructions are unaffected.
    let prologue = [
        insn(BPF_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        insn(BPF_JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        insn(BPF_JMP_JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        insn(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ];
    program.splice(ARCH_PROLOGUE_LEN..ARCH_PROLOGUE_LEN, prologue);
    Ok(program)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with the filter applied; returns the child's exit code.
    fn in_filtered_child(program: &BpfProgram, f: fn() -> i32) -> i32 {
        // SAFETY: the child only makes raw syscalls and `_exit`s; it never returns into the test
        // harness or allocates.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let code = match seccompiler::apply_filter(program) {
                    Ok(()) => f(),
                    Err(_) => 99,
                };
                libc::_exit(code);
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
            libc::WEXITSTATUS(status)
        }
    }

    fn errno_of(ret: libc::c_long) -> i32 {
        if ret == -1 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    /// A raw syscall's errno (0 on success), made in the filtered child.
    fn errno_of_syscall(nr: libc::c_long, a: [libc::c_long; 5]) -> i32 {
        // SAFETY: the tests make only calls that take no pointers, or null ones the kernel
        // refuses with an errno; nothing is written into this process's memory.
        errno_of(unsafe { libc::syscall(nr, a[0], a[1], a[2], a[3], a[4]) })
    }

    #[test]
    fn filter_denies_and_allows() {
        let program = build().unwrap();
        // unshare(0) would succeed unfiltered; the filter makes it EPERM.
        let code = in_filtered_child(&program, || errno_of_syscall(libc::SYS_unshare, [0; 5]));
        assert_eq!(code, libc::EPERM);
        // x32 getpid.
        let code = in_filtered_child(&program, || {
            errno_of_syscall(X32_SYSCALL_BIT as libc::c_long | libc::SYS_getpid, [0; 5])
        });
        assert_eq!(code, libc::EPERM);
        let code = in_filtered_child(&program, || errno_of_syscall(libc::SYS_clone3, [0; 5]));
        assert_eq!(code, libc::ENOSYS);
        // clone with a namespace flag is refused before the kernel looks at the other arguments.
        let code = in_filtered_child(&program, || {
            let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_long;
            errno_of_syscall(libc::SYS_clone, [flags, 0, 0, 0, 0])
        });
        assert_eq!(code, libc::EPERM);
        // Ordinary calls still work.
        let code = in_filtered_child(&program, || errno_of_syscall(libc::SYS_getppid, [0; 5]));
        assert_eq!(code, 0);
    }
}
