//! What the supervisor gets from the process that started it: the pipes it inherits (the ready
//! pipe, the secrets), its owner (whose exit stops the sandbox), and signals that arrive before
//! the async runtime handles them.

use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;

/// The fd on which the supervisor reports boot success or failure to its parent.
pub const READY_FD: i32 = 3;
/// Where the supervisor reads the secret values (JSON `[[name, value], ...]`, then EOF).
pub const SECRETS_FD: i32 = 4;

/// The ready pipe (fd 3), close-on-exec so QEMU does not inherit it and keep the parent
/// waiting for an end of file.
pub fn ready_pipe() -> Option<std::fs::File> {
    // SAFETY: fd 3 was set up by our parent (see `crate::client::start`); if it is not open, the
    // writes to it fail harmlessly.
    Some(unsafe {
        libc::fcntl(READY_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        std::fs::File::from_raw_fd(READY_FD)
    })
}

/// Reads the secrets pipe (fd 4) to its end (bounded), leaving nothing open. The values live
/// only in the supervisor's memory.
pub fn read_secrets() -> Vec<(String, String)> {
    use std::io::Read;
    // SAFETY: fd 4 was set up by `crate::client::start_with_secrets`; if it is not open, the read
    // fails and there are no secrets.
    let f = unsafe {
        libc::fcntl(SECRETS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        std::fs::File::from_raw_fd(SECRETS_FD)
    };
    let mut body = Vec::new();
    let _ = f.take(1 << 20).read_to_end(&mut body);
    serde_json::from_slice(&body).unwrap_or_default()
}

/// A SIGTERM or SIGINT that arrived before the async runtime's handlers were installed.
pub static EARLY_STOP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn early_stop(sig: libc::c_int) {
    EARLY_STOP.store(sig, Ordering::SeqCst);
}

/// Until tokio's handlers take over after boot, remembers SIGTERM/SIGINT instead of dying
/// without cleanup; the sandbox is stopped as soon as it is up.
pub fn defer_signals() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, early_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, early_stop as *const () as libc::sighandler_t);
    }
}

/// Resolves when a signal arrived before the runtime's handlers were installed.
pub async fn deferred_signal() {
    if EARLY_STOP.load(Ordering::SeqCst) == 0 {
        std::future::pending::<()>().await
    }
}

/// The process whose exit stops the sandbox.
pub enum Owner {
    /// Not tied to any process.
    None,
    /// The owner was already gone when we looked.
    Gone,
    /// A pidfd of the owner.
    Pid(std::os::fd::OwnedFd),
}

/// Opens a pidfd of the owner, which must be our parent: `run` spawns the supervisor itself.
pub fn open_owner(pid: Option<u32>) -> Owner {
    let Some(pid) = pid else { return Owner::None };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } as u32 != pid {
        return Owner::Gone;
    }
    // SAFETY: pidfd_open takes plain integers and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd < 0 {
        // ESRCH: already gone. Other errors (a kernel without pidfds): do not tie the lifetime.
        return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            Owner::Gone
        } else {
            Owner::None
        };
    }
    // SAFETY: fd is a fresh pidfd we own.
    Owner::Pid(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Resolves when the owner exits (never without one). A pidfd cannot be fooled by pid reuse.
pub async fn owner_exit(owner: Owner) {
    let fd = match owner {
        Owner::None => return std::future::pending().await,
        Owner::Gone => return,
        Owner::Pid(fd) => fd,
    };
    // SAFETY: the OwnedFd is a valid descriptor, closed only when the AsyncFd drops.
    match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
        // A pidfd becomes readable when the process exits.
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => std::future::pending().await,
    }
}
