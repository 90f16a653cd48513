//! Least privilege for the supervisor: it talks to an untrusted guest all day (virtio-fs
//! requests, network frames, protocol messages), so a bug in that code must not find a full
//! root process behind it.
//!
//! Before anything else runs (one thread, no guest yet) it keeps only the capabilities serving
//! the sandbox needs, drops the rest from the bounding set too (so neither it nor QEMU, which it
//! starts, can get them back through `exec`), sets `no_new_privs`, and installs a seccomp
//! deny-list of the kernel surfaces it never uses. QEMU additionally runs its own `-sandbox`.

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::collections::BTreeMap;

/// The capabilities kept, and why:
/// - `CHOWN`, `FOWNER`, `DAC_OVERRIDE`: the workspace server acts on the user's files for a
///   root guest (times, modes, owners of private mounts), whoever owns them.
/// - `KILL`: stopping QEMU, also after it changed its credentials.
/// - `NET_BIND_SERVICE`: publishing a sandbox port on a host port below 1024.
///
/// Gone, among others: `DAC_READ_SEARCH` (with `open_by_handle_at`, the classic container
/// escape), `FSETID` (so the kernel itself clears set-id bits when the guest writes),
/// `SYS_ADMIN`, `SYS_PTRACE`, `SYS_MODULE`, `NET_ADMIN`, `NET_RAW`, `MKNOD`, `SETUID`, `SETGID`.
pub const KEPT: &[u32] = &[
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    CAP_KILL,
    CAP_NET_BIND_SERVICE,
];

// linux/capability.h numbers (the libc crate does not define them).
const CAP_CHOWN: u32 = 0;
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;
const CAP_KILL: u32 = 5;
const CAP_NET_BIND_SERVICE: u32 = 10;

/// Syscalls the supervisor never makes that reach the kernel's riskiest surfaces; they fail
/// with `EPERM`. (The guest agent's own filter, for the guest's processes, is in
/// `matchlock-guest`.)
const DENIED: &[i64] = &[
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
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
    libc::SYS_chroot,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_syslog,
    libc::SYS_uselib,
    libc::SYS_vhangup,
    libc::SYS_lookup_dcookie,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// The supervisor's seccomp program: [`DENIED`] fails with `EPERM`, everything else (and any
/// other architecture's calls, which the program refuses) as seccompiler builds it.
pub fn filter() -> Result<BpfProgram, String> {
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    f.try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())
}

/// Confines this process as described in the module docs. Must run while it has one thread
/// (capabilities are per thread). As a non-root user there are no capabilities to drop; the
/// seccomp filter still goes on.
pub fn confine() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        drop_capabilities()?;
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
    }
    let program = filter()?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| format!("seccomp: {e}"))
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn drop_capabilities() -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    for cap in 0..=last_cap() {
        // SAFETY: prctl with integer arguments only. EINVAL for a capability this kernel does
        // not know is fine.
        if !KEPT.contains(&cap) && unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0
        {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(format!("dropping capability {cap}: {e}"));
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(os("clearing ambient capabilities"));
    }
    let mask = KEPT.iter().fold(0u64, |m, &c| m | 1 << c);
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let half = |shift: u32| CapData {
        effective: (mask >> shift) as u32,
        permitted: (mask >> shift) as u32,
        inheritable: 0,
    };
    let data = [half(0), half(32)];
    // SAFETY: header and data are the kernel's v3 layout (two data elements), valid for the call.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(os("capset"));
    }
    Ok(())
}

/// `_LINUX_CAPABILITY_VERSION_3` (64-bit sets in two halves).
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct` (libc has no capset wrapper).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child: confine, then check what is left. Returns the child's exit code.
    fn in_child(f: fn() -> i32) -> i32 {
        // SAFETY: the child makes syscalls and file reads, then `_exit`s; it never returns into
        // the test harness. (Allocation after fork is safe here: the test process's other
        // threads hold no allocator lock we depend on in practice, and the child is short.)
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                let code = match confine() {
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

    #[test]
    fn confined_processes_keep_only_what_they_need() {
        // The denied calls fail with EPERM; ordinary ones work.
        let code = in_child(|| {
            // SAFETY: raw syscalls with integer arguments.
            let unshare = unsafe { libc::syscall(libc::SYS_unshare, 0) };
            let e = std::io::Error::last_os_error().raw_os_error();
            if unshare != -1 || e != Some(libc::EPERM) {
                return 1;
            }
            // SAFETY: as above.
            if unsafe { libc::syscall(libc::SYS_getppid) } <= 0 {
                return 2;
            }
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            if field("Seccomp:") != "2" || field("NoNewPrivs:") != "1" {
                return 3;
            }
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                let want = format!("{:016x}", KEPT.iter().fold(0u64, |m, &c| m | 1 << c));
                if field("CapEff:") != want || field("CapBnd:") != want {
                    return 4;
                }
            }
            0
        });
        assert_eq!(code, 0);
    }
}
