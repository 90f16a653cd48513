//! Matchlock's VMM backend: everything needed to turn a sandbox description into a running QEMU
//! `microvm` process.
//!
//! - [`kernel`] finds the guest kernel (built once per machine by `guest/kernel/build.sh`).
//! - [`agent`] finds the static guest agent binary and [`initramfs`] wraps it into an initramfs.
//! - [`accel`] decides between KVM and TCG with a real probe boot.
//! - [`qemu`] builds the hardened QEMU command line.
//! - [`qmp`] speaks to a running QEMU; [`snapshot`] saves a VM to a file and restores it.
//! - [`tsc`] gives TCG guests a real clocksource (and so a tickless idle).
//!
//! The VMM is a separate concern from the sandbox lifecycle (`matchlock-sandbox`), so another backend
//! (Firecracker, an own rust-vmm VMM) can sit behind the same [`qemu::VmSpec`]-like description later.

pub mod accel;
pub mod agent;
pub mod initramfs;
pub mod kernel;
pub mod qemu;
pub mod qmp;
pub mod snapshot;
pub mod tsc;

use std::path::PathBuf;

/// Errors of the VMM layer. Every message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The guest kernel has not been built and no override is set.
    #[error("guest kernel not found at {0}; build it once with 'matchlock kernel build' (needs Debian's linux-source-6.1, ~4 minutes) or set MATCHLOCK_KERNEL=/path/to/vmlinux")]
    KernelMissing(PathBuf),
    /// `MATCHLOCK_KERNEL` points nowhere.
    #[error("MATCHLOCK_KERNEL={0} does not exist; unset it to use the kernel built by 'matchlock kernel build'")]
    KernelOverrideMissing(PathBuf),
    /// A kernel given with `--kernel` / `kernel.ref` cannot be booted.
    #[error("{0}")]
    BadKernel(String),
    /// QEMU is not installed.
    #[error("qemu-system-x86_64 not found (looked at {0}); install it with 'sudo apt-get install qemu-system-x86' or set MATCHLOCK_QEMU")]
    QemuMissing(String),
    /// The guest agent binary cannot be found or is unusable.
    #[error("{0}")]
    Agent(String),
    /// `MATCHLOCK_ACCEL` has a value we do not know.
    #[error("MATCHLOCK_ACCEL={0} is not one of kvm, tcg, auto")]
    BadAccel(String),
    /// KVM was forced but does not work.
    #[error("MATCHLOCK_ACCEL=kvm but {0}; use MATCHLOCK_ACCEL=auto to fall back to TCG")]
    KvmUnusable(String),
    /// Filesystem trouble in the cache.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl VmmError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmmError {
        let context = context.into();
        move |source| VmmError::Io { context, source }
    }
}

/// `$MATCHLOCK_CACHE_DIR`, else `~/.cache/matchlock`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MATCHLOCK_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    home_dir().join(".cache").join("matchlock")
}

/// The user's home directory (`$HOME`, else the passwd entry's, else `/`).
pub fn home_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    // SAFETY: getpwuid returns a pointer to static storage or null; we copy the string at once.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if !pw.is_null() && !(*pw).pw_dir.is_null() {
            let dir = std::ffi::CStr::from_ptr((*pw).pw_dir);
            return PathBuf::from(dir.to_string_lossy().into_owned());
        }
    }
    PathBuf::from("/")
}

/// Writes `data` to `path` atomically (temp file in the same directory, then rename). The directory
/// must exist: recreating it would resurrect a sandbox directory that `rm` just deleted.
pub fn write_atomic(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    let (tmp_path, mut file) = tempfile_in(dir)?;
    let res = file
        .write_all(data)
        .and_then(|_| file.sync_all())
        .and_then(|_| std::fs::rename(&tmp_path, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp_path);
    }
    res
}

fn tempfile_in(dir: &std::path::Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for i in 0..100u32 {
        let p = dir.join(format!(".tmp.{}.{}", std::process::id(), i));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => return Ok((p, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("could not create a temporary file"))
}

/// Hex sha256 of some bytes.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
