//! Directories that belong to one sandbox alone, served like a host directory so that
//! interception rules and events apply to them as to any other mount: the backing of `memory`
//! mounts (empty at start), and of `overlay` mounts that rules or events watch (a copy of the
//! host tree taken at start, which the guest then changes freely; the user's files are never
//! written). They live in the sandbox's state directory and go with it.
//!
//! An `overlay` mount without rules or events is done in the guest instead (overlayfs over a
//! read-only view), which copies nothing; a watched one needs every change to pass the host,
//! and the guest kernel cannot stack overlayfs on a FUSE upper layer.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// What one entry costs against the quota besides its blocks (see [`crate::MountFs::private`]).
pub const ENTRY_COST: u64 = 4096;

/// Most entries a copy takes: a watched overlay of a huge tree should be a `host_fs` or `ro`
/// mount instead.
pub const MAX_COPY_ENTRIES: u64 = 200_000;

/// Creates an empty private directory (0700 for its parents, 0755 itself, as a tmpfs root).
pub fn create(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    std::fs::DirBuilder::new().mode(0o755).create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

/// Copies the host tree (or file) `src` to the new path `dst`, and returns what the copy takes
/// against a quota (blocks plus [`ENTRY_COST`] per entry). Symlinks are copied as links and
/// never followed; FIFOs, sockets and devices are skipped; set-id bits are dropped; owners are
/// kept where the server may set them. Fails with a message naming the limit when the tree
/// holds more than `max_bytes` or [`MAX_COPY_ENTRIES`].
pub fn copy_tree(src: &Path, dst: &Path, max_bytes: u64) -> io::Result<u64> {
    if let Some(parent) = dst.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    let mut budget = Budget {
        bytes: 0,
        entries: 0,
        max_bytes,
        src,
    };
    // Not even the root is followed (see `matchlock_api::validate::host_source`).
    let meta = std::fs::symlink_metadata(src)?;
    if meta.file_type().is_symlink() {
        return Err(io::Error::other(format!(
            "{} is a symlink, which mount sources may not be (name the real path)",
            src.display()
        )));
    }
    copy_entry(src, dst, &meta, &mut budget)?;
    Ok(budget.bytes)
}

struct Budget<'a> {
    bytes: u64,
    entries: u64,
    max_bytes: u64,
    src: &'a Path,
}

impl Budget<'_> {
    fn charge(&mut self, blocks_bytes: u64) -> io::Result<()> {
        self.entries += 1;
        self.bytes = self
            .bytes
            .saturating_add(ENTRY_COST)
            .saturating_add(blocks_bytes);
        if self.entries > MAX_COPY_ENTRIES || self.bytes > self.max_bytes {
            return Err(io::Error::other(format!(
                "{} is too large to watch as an overlay mount (more than {} entries or {} MiB); \
                 mount it host_fs or ro instead",
                self.src.display(),
                MAX_COPY_ENTRIES,
                self.max_bytes >> 20
            )));
        }
        Ok(())
    }
}

fn copy_entry(src: &Path, dst: &Path, meta: &std::fs::Metadata, b: &mut Budget) -> io::Result<()> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        b.charge(0)?;
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
    } else if ft.is_dir() {
        b.charge(meta.blocks() * 512)?;
        std::fs::DirBuilder::new().mode(0o700).create(dst)?;
        let mut entries: Vec<_> = std::fs::read_dir(src)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let m = e.metadata()?; // of the entry itself: DirEntry::metadata does not follow
            copy_entry(&e.path(), &dst.join(e.file_name()), &m, b)?;
        }
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o1777))?;
    } else if ft.is_file() {
        b.charge(meta.blocks() * 512)?;
        std::fs::copy(src, dst)?;
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o1777))?;
    } else {
        return Ok(()); // FIFOs, sockets, devices: never opened, never copied
    }
    // Owners as on the host; a server that may not change them leaves its own.
    let _ = std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_without_following_links_or_keeping_set_id_bits() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/f"), b"data").unwrap();
        std::fs::write(src.join("suid"), b"x").unwrap();
        std::fs::set_permissions(src.join("suid"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", src.join("link")).unwrap();
        let dst = d.path().join("scratch/0");
        let used = copy_tree(&src, &dst, 1 << 30).unwrap();
        assert!(used >= 5 * ENTRY_COST, "{used}");
        assert_eq!(std::fs::read(dst.join("sub/f")).unwrap(), b"data");
        let m = std::fs::symlink_metadata(dst.join("link")).unwrap();
        assert!(m.file_type().is_symlink());
        assert_eq!(
            std::fs::read_link(dst.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            std::fs::metadata(dst.join("suid")).unwrap().mode() & 0o7777,
            0o755
        );
        // Too large: refused with the way out.
        let e = copy_tree(&src, &d.path().join("scratch/1"), ENTRY_COST).unwrap_err();
        assert!(e.to_string().contains("host_fs or ro"), "{e}");
        // A single file.
        copy_tree(&src.join("sub/f"), &d.path().join("scratch/2"), 1 << 20).unwrap();
        assert_eq!(std::fs::read(d.path().join("scratch/2")).unwrap(), b"data");
    }
}
