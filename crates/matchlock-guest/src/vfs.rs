//! Workspace mounts: the host's supervisor serves every mount through one virtio-fs device
//! ([`matchlock_proto::vfs`]); the guest kernel's FUSE client speaks to it directly, so no agent
//! code is in the data path. At setup the agent mounts the device privately, bind-mounts each
//! mount's entry where the host asked, and detaches the device's own mount point.
//!
//! `overlay` mounts put a kernel overlayfs, with its upper layer on a private tmpfs, over a
//! read-only view of the host: the guest writes freely and nothing reaches the host.

use crate::log;
use matchlock_proto::vfs::TAG;
use matchlock_proto::GuestVfsMount;
use nix::mount::{mount, MsFlags};
use std::fs;
use std::path::{Path, PathBuf};

/// Private directory of the overlay layers and of the device's own mount point.
const VFS_DIR: &str = "/run/matchlock-vfs";

/// Mounts every workspace filesystem, in order (a later mount may sit inside an earlier one).
pub fn mount_all(mounts: &[GuestVfsMount]) -> Result<(), String> {
    let device = Path::new(VFS_DIR).join("dev");
    let served = !mounts.is_empty();
    if served {
        fs::create_dir_all(&device).map_err(|e| format!("creating {}: {e}", device.display()))?;
        mount(
            Some(TAG),
            &device,
            Some("virtiofs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| format!("mounting the workspace device: {e}"))?;
        raise_readahead(&device);
    }
    for m in mounts {
        mount_one(m, &device.join(m.id.to_string()))
            .map_err(|e| format!("mount {}: {e}", m.path))?;
    }
    if served {
        // Every mount holds its own reference now (overlayfs clones its lower layer); the
        // device's mount point would only let the workload walk past a mount's view.
        if let Err(e) = nix::mount::umount2(&device, nix::mount::MntFlags::MNT_DETACH) {
            log(format_args!("vfs: cannot detach {}: {e}", device.display()));
        }
    }
    Ok(())
}

/// Creates the mount point (a directory, or an empty file for a file mount) and its parents,
/// refusing to cross symlinks so an image cannot redirect the mount elsewhere.
fn mount_point(path: &str, file: bool) -> Result<PathBuf, String> {
    let rel = path
        .strip_prefix('/')
        .filter(|r| !r.is_empty())
        .ok_or("the mount point must be absolute and not /")?;
    let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
    let mut at = PathBuf::from("/");
    for (i, part) in parts.iter().enumerate() {
        if *part == "." || *part == ".." {
            return Err(format!("the mount point contains {part}"));
        }
        at.push(part);
        let last = i + 1 == parts.len();
        match fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("{} is a symlink", at.display()))
            }
            Ok(m) if m.is_dir() && !(last && file) => {}
            Ok(m) if m.is_file() && last && file => {}
            Ok(_) => return Err(format!("{} exists and has the wrong type", at.display())),
            Err(_) if last && file => {
                fs::File::create(&at).map_err(|e| format!("creating {}: {e}", at.display()))?;
            }
            Err(_) => fs::create_dir(&at).map_err(|e| format!("creating {}: {e}", at.display()))?,
        }
    }
    Ok(at)
}

/// One served mount: `source` is its entry under the device's mount point.
fn mount_one(m: &GuestVfsMount, source: &Path) -> Result<(), String> {
    let target = mount_point(&m.path, m.file)?;
    if m.overlay {
        let private = PathBuf::from(format!("{VFS_DIR}/{}", m.id));
        fs::create_dir_all(&private).map_err(|e| format!("creating {}: {e}", private.display()))?;
        return overlay(&private, source, &target, m.file);
    }
    bind(source, &target, m.read_only)
}

/// Bind-mounts `from` onto `to`, `nosuid,nodev` and read-only when asked (a bind takes its
/// flags only on a remount).
fn bind(from: &Path, to: &Path, read_only: bool) -> Result<(), String> {
    mount(Some(from), to, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(|e| format!("binding {}: {e}", from.display()))?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, to, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("setting the flags of {}: {e}", to.display()))
}

/// Read-ahead window for workspace mounts, KiB. The kernel gives FUSE 128 KiB, so a sequential
/// read waits on one 128 KiB round trip after another; a wider window keeps several 1 MiB reads
/// in flight. Readahead still starts small and only grows for sequential reads.
const READ_AHEAD_KB: u32 = 4096;

/// Widens the read-ahead of the virtio-fs mount at `at` (after the FUSE handshake, which would
/// clamp it back). A failure only costs speed.
fn raise_readahead(at: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = fs::metadata(at) else {
        return;
    };
    let dev = meta.dev();
    let knob = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(dev),
        libc::minor(dev)
    );
    if let Err(e) = fs::write(&knob, READ_AHEAD_KB.to_string()) {
        log(format_args!("vfs: cannot widen read-ahead ({knob}): {e}"));
    }
}

/// The copy-on-write layer of an `overlay` mount, on a tmpfs only the agent knows about.
fn overlay(private: &Path, lower: &Path, target: &Path, file: bool) -> Result<(), String> {
    let rw = private.join("rw");
    fs::create_dir_all(&rw).map_err(|e| format!("creating {}: {e}", rw.display()))?;
    mount(
        Some("tmpfs"),
        &rw,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0700"),
    )
    .map_err(|e| format!("mounting the overlay's tmpfs: {e}"))?;
    if file {
        // overlayfs stacks directories only: a single file is copied once, then bind-mounted.
        let copy = rw.join("file");
        fs::copy(lower, &copy).map_err(|e| format!("copying the file: {e}"))?;
        if let Ok(meta) = fs::metadata(lower) {
            let _ = fs::set_permissions(&copy, meta.permissions());
        }
        return bind(&copy, target, false);
    }
    let (upper, work) = (rw.join("upper"), rw.join("work"));
    for d in [&upper, &work] {
        fs::create_dir(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| format!("mounting overlayfs: {e}"))
}
