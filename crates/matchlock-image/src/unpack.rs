//! Applying layer tarballs, in order, to a staging directory.
//!
//! Security: layer entries are hostile input. Every entry path is made relative and rejected if it
//! has a `..` component; every parent directory is checked with `lstat` and the entry is rejected
//! if a parent is a symlink, so no write can land outside the staging tree through a link planted
//! by an earlier entry or layer. Files are created with `O_CREAT|O_EXCL` (never through an existing
//! link) after the old path is removed. The staging tree is private to this process (mode 0700
//! import directory), so checking then acting is not racy.
//!
//! Metadata (owner, mode, mtime, xattrs) is recorded per path from the tar headers rather than
//! trusted to the staging file system, because an unprivileged process cannot chown, mknod, or
//! keep setgid bits of groups it is not in. [`Staging::finalize`] applies what it can; the ext4
//! builder then patches every difference with `debugfs` (see `ext4.rs`).

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::ImageError;

/// The type of a recorded entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Char(u32, u32),
    Block(u32, u32),
}

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub(crate) fn type_bits(self) -> u32 {
        match self {
            Kind::Dir => 0o040000,
            Kind::File => 0o100000,
            Kind::Symlink => 0o120000,
            Kind::Fifo => 0o010000,
            Kind::Char(..) => 0o020000,
            Kind::Block(..) => 0o060000,
        }
    }
}

/// What the layers say an entry should look like.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub kind: Kind,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// False for device nodes we could not mknod; the ext4 builder creates them.
    pub materialized: bool,
    /// Extended attributes from PAX `SCHILY.xattr.*` records.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Extended attributes the staging file system refused; the ext4 builder sets them.
    pub pending_xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// A root-owned 0755 directory: the image root and directories a whiteout implies.
    fn plain_dir() -> Meta {
        Meta {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            materialized: true,
            xattrs: Vec::new(),
            pending_xattrs: Vec::new(),
        }
    }
}

/// The squashed root file system being built.
pub(crate) struct Staging {
    pub root: PathBuf,
    /// Whether to try lchown/mknod (running as root).
    privileged: bool,
    /// Recorded metadata by relative path; `""` is the root directory.
    pub records: BTreeMap<PathBuf, Meta>,
    /// Paths created by the layer being applied; whiteouts only hide lower layers.
    layer_paths: HashSet<PathBuf>,
    /// Allocated bytes of regular file content (rounded to 4 KiB blocks), for sizing the ext4.
    pub content_bytes: u64,
}

/// Where a layer entry came from, for error messages.
struct Ctx {
    layer: usize,
    shown: String,
}

impl Ctx {
    fn reject(&self, reason: impl Into<String>) -> ImageError {
        ImageError::UnsafeEntry {
            layer: self.layer,
            entry: self.shown.clone(),
            reason: reason.into(),
        }
    }

    fn io(&self, what: &str, e: io::Error) -> ImageError {
        ImageError::io(
            format!("layer {} entry \"{}\": {what}", self.layer, self.shown),
            e,
        )
    }
}

/// Make an entry path relative; reject `..` and NUL.
fn clean_path(raw: &[u8]) -> Result<PathBuf, String> {
    if raw.contains(&0) {
        return Err("the path contains a NUL byte".into());
    }
    let mut out = PathBuf::new();
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("the path contains a '..' component".into()),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn os_err(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn to_u32(v: u64, what: &str) -> io::Result<u32> {
    u32::try_from(v).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} {v} is out of range"),
        )
    })
}

/// Header fields plus PAX overrides (uid/gid/mtime can exceed ustar fields) and xattrs.
fn entry_meta<R: Read>(entry: &mut tar::Entry<'_, R>, kind: Kind) -> io::Result<Meta> {
    let hdr = entry.header();
    // A hardlink's own owner/mode fields are ignored (the inode is shared), and some writers
    // leave them blank, so do not fail on them there.
    let lenient = hdr.entry_type() == tar::EntryType::Link;
    let num = |v: io::Result<u64>, raw: &[u8]| {
        // A field of only NULs/spaces reads as 0, as in Go's archive/tar (what Docker and most
        // registries' images were written with); the tar crate rejects it.
        let blank = raw.iter().all(|&b| b == 0 || b == b' ');
        if lenient || blank {
            Ok(v.unwrap_or(0))
        } else {
            v
        }
    };
    let old = hdr.as_old();
    let mut meta = Meta {
        kind,
        mode: (if lenient {
            hdr.mode().unwrap_or(0o644)
        } else {
            hdr.mode()?
        }) & 0o7777,
        uid: to_u32(num(hdr.uid(), &old.uid)?, "uid")?,
        gid: to_u32(num(hdr.gid(), &old.gid)?, "gid")?,
        mtime: i64::try_from(num(hdr.mtime(), &old.mtime)?).unwrap_or(0),
        mtime_nsec: 0,
        materialized: true,
        xattrs: Vec::new(),
        pending_xattrs: Vec::new(),
    };
    if let Some(pax) = entry.pax_extensions()? {
        for ext in pax {
            let ext = ext?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            let text = std::str::from_utf8(value).unwrap_or("");
            match key {
                b"uid" => meta.uid = to_u32(text.parse().unwrap_or(u64::MAX), "uid")?,
                b"gid" => meta.gid = to_u32(text.parse().unwrap_or(u64::MAX), "gid")?,
                b"mtime" => {
                    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
                    if let Ok(s) = secs.parse::<i64>() {
                        meta.mtime = s;
                        let digits: String = frac.chars().take(9).collect();
                        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                            let scale = 10u32.pow(9 - digits.len() as u32);
                            meta.mtime_nsec = digits.parse::<u32>().unwrap_or(0) * scale;
                        }
                    }
                }
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        meta.xattrs.push((name.to_vec(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(meta)
}

impl Staging {
    /// Create the (empty) staging root at `root`.
    pub(crate) fn new(root: PathBuf, privileged: bool) -> Result<Staging, ImageError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&root)
            .map_err(|e| {
                ImageError::io(format!("creating staging directory {}", root.display()), e)
            })?;
        let mut records = BTreeMap::new();
        // The root directory always gets a record so the image root is 0755 root:root even when
        // no layer has a `./` entry (the staging directory itself is 0700).
        records.insert(PathBuf::new(), Meta::plain_dir());
        Ok(Staging {
            root,
            privileged,
            records,
            layer_paths: HashSet::new(),
            content_bytes: 0,
        })
    }

    /// Apply one layer (an uncompressed tar stream). `layer` is 1-based, for messages.
    pub(crate) fn apply_layer<R: Read>(
        &mut self,
        layer: usize,
        reader: R,
    ) -> Result<(), ImageError> {
        self.layer_paths.clear();
        let mut archive = tar::Archive::new(reader);
        let entries = archive
            .entries()
            .map_err(|e| ImageError::archive(format!("layer {layer} is not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| {
                ImageError::archive(format!("layer {layer} is not a valid tar: {e}"))
            })?;
            self.apply_entry(layer, &mut entry)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        layer: usize,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), ImageError> {
        let raw = entry.path_bytes().into_owned();
        let ctx = Ctx {
            layer,
            // Hostile names may carry control characters: shown escaped, never raw to a terminal.
            shown: String::from_utf8_lossy(&raw).escape_debug().to_string(),
        };
        let rel = clean_path(&raw).map_err(|r| ctx.reject(r))?;
        let etype = entry.header().entry_type();

        if let Some(name) = rel.file_name() {
            if let Some(hidden) = name.as_bytes().strip_prefix(b".wh.") {
                return self.whiteout(&ctx, &rel, hidden);
            }
        }

        let kind = match etype {
            tar::EntryType::Directory => Kind::Dir,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                Kind::File
            }
            tar::EntryType::Symlink => Kind::Symlink,
            tar::EntryType::Link => Kind::File,
            tar::EntryType::Fifo => Kind::Fifo,
            tar::EntryType::Char | tar::EntryType::Block => {
                let hdr = entry.header();
                let major = hdr.device_major().ok().flatten().unwrap_or(0);
                let minor = hdr.device_minor().ok().flatten().unwrap_or(0);
                if etype == tar::EntryType::Char {
                    Kind::Char(major, minor)
                } else {
                    Kind::Block(major, minor)
                }
            }
            // Global PAX headers and exotic types carry no file.
            _ => return Ok(()),
        };
        let mut meta = entry_meta(entry, kind).map_err(|e| ctx.io("reading the header", e))?;

        if rel.as_os_str().is_empty() {
            // `./`: metadata of the root directory itself.
            if kind != Kind::Dir {
                return Err(ctx.reject("the root of the image must be a directory"));
            }
            self.records.insert(rel, meta);
            return Ok(());
        }

        self.prepare_parents(&ctx, &rel, true, &meta)?;
        let full = self.root.join(&rel);

        if etype == tar::EntryType::Link {
            return self.hardlink(&ctx, entry, rel, meta);
        }

        let keep_dir = self.replace_existing(&ctx, &rel, kind == Kind::Dir)?;
        let c = cpath(&full).map_err(|_| ctx.reject("the path contains a NUL byte"))?;
        match kind {
            Kind::Dir => {
                if !keep_dir {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&full)
                        .map_err(|e| ctx.io("creating the directory", e))?;
                }
            }
            Kind::File => {
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&full)
                    .map_err(|e| ctx.io("creating the file", e))?;
                let n = io::copy(entry, &mut f).map_err(|e| ctx.io("writing the file", e))?;
                self.content_bytes += n.div_ceil(4096) * 4096;
            }
            Kind::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| ctx.reject("the symlink has no target"))?;
                // The target is stored, never followed here, so it may point anywhere.
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &full)
                    .map_err(|e| ctx.io("creating the symlink", e))?;
                if target.len() > 60 {
                    self.content_bytes += 4096;
                }
            }
            Kind::Fifo => {
                // SAFETY: c is a valid NUL-terminated path.
                os_err(unsafe { libc::mkfifo(c.as_ptr(), 0o600) })
                    .map_err(|e| ctx.io("creating the fifo", e))?;
            }
            Kind::Char(major, minor) | Kind::Block(major, minor) => {
                let dev = libc::makedev(major, minor);
                let ok = self.privileged
                    // SAFETY: c is a valid NUL-terminated path.
                    && unsafe { libc::mknod(c.as_ptr(), kind.type_bits() | 0o600, dev) } == 0;
                // Without CAP_MKNOD the node is created in the ext4 image by debugfs instead.
                meta.materialized = ok;
            }
        }
        if kind == Kind::Dir {
            self.content_bytes += 4096;
        }
        self.layer_paths.insert(rel.clone());
        self.records.insert(rel, meta);
        Ok(())
    }

    fn hardlink<R: Read>(
        &mut self,
        ctx: &Ctx,
        entry: &tar::Entry<'_, R>,
        rel: PathBuf,
        header_meta: Meta,
    ) -> Result<(), ImageError> {
        let raw_target = entry
            .link_name_bytes()
            .map(|t| t.into_owned())
            .ok_or_else(|| ctx.reject("the hardlink has no target"))?;
        let target = clean_path(&raw_target).map_err(|r| {
            ctx.reject(format!(
                "hardlink target \"{}\": {r}",
                String::from_utf8_lossy(&raw_target)
            ))
        })?;
        if target.as_os_str().is_empty() || target == rel {
            return Err(ctx.reject("the hardlink points at itself or the root"));
        }
        if !self.prepare_parents(ctx, &target, false, &header_meta)? {
            return Err(ctx.reject(format!(
                "hardlink target \"{}\" does not exist",
                target.display()
            )));
        }
        let target_full = self.root.join(&target);
        let target_meta = self.records.get(&target).cloned();
        match fs::symlink_metadata(&target_full) {
            Ok(m) if m.is_dir() => {
                return Err(ctx.reject(format!("hardlink target \"{}\" is a directory", target.display())))
            }
            Ok(_) => {
                self.replace_existing(ctx, &rel, false)?;
                fs::hard_link(&target_full, self.root.join(&rel)).map_err(|e| ctx.io("creating the hardlink", e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => match &target_meta {
                // A device node we could not create: record a second one with the same numbers.
                Some(m) if !m.materialized => {
                    self.replace_existing(ctx, &rel, false)?;
                }
                _ => {
                    return Err(ctx.reject(format!(
                        "hardlink target \"{}\" does not exist (it must come earlier in the layer or in a lower layer)",
                        target.display()
                    )))
                }
            },
            Err(e) => return Err(ctx.io("inspecting the hardlink target", e)),
        }
        self.layer_paths.insert(rel.clone());
        self.records.insert(rel, target_meta.unwrap_or(header_meta));
        Ok(())
    }

    /// Check (and with `create`, make) the parent directories of `rel`, never following a symlink.
    /// Returns false if a parent is missing and `create` is false.
    fn prepare_parents(
        &mut self,
        ctx: &Ctx,
        rel: &Path,
        create: bool,
        meta: &Meta,
    ) -> Result<bool, ImageError> {
        let Some(parent) = rel.parent() else {
            return Ok(true);
        };
        let mut cur = PathBuf::new();
        for comp in parent.components() {
            let Component::Normal(c) = comp else { continue };
            cur.push(c);
            if self.records.get(&cur).is_some_and(|m| !m.materialized) {
                return Err(
                    ctx.reject(format!("its parent \"{}\" is a device node", cur.display()))
                );
            }
            let full = self.root.join(&cur);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(ctx.reject(format!(
                        "its parent \"{}\" is a symlink; writing through it could escape the root file system",
                        cur.display()
                    )))
                }
                Ok(_) => return Err(ctx.reject(format!("its parent \"{}\" is not a directory", cur.display()))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if !create {
                        return Ok(false);
                    }
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&full)
                        .map_err(|e| ctx.io("creating a parent directory", e))?;
                    // Implied parents get Docker's defaults: 0755 root:root.
                    self.records.insert(
                        cur.clone(),
                        Meta {
                            kind: Kind::Dir,
                            mode: 0o755,
                            uid: 0,
                            gid: 0,
                            xattrs: Vec::new(),
                            pending_xattrs: Vec::new(),
                            materialized: true,
                            ..meta.clone()
                        },
                    );
                    self.layer_paths.insert(cur.clone());
                    self.content_bytes += 4096;
                }
                Err(e) => return Err(ctx.io("inspecting a parent directory", e)),
            }
        }
        Ok(true)
    }

    /// Remove whatever is at `rel` unless both it and the new entry are directories (then the
    /// directories merge and true is returned).
    fn replace_existing(
        &mut self,
        ctx: &Ctx,
        rel: &Path,
        new_is_dir: bool,
    ) -> Result<bool, ImageError> {
        let full = self.root.join(rel);
        match fs::symlink_metadata(&full) {
            Ok(m) if m.is_dir() && new_is_dir => Ok(true),
            Ok(m) => {
                let res = if m.is_dir() {
                    fs::remove_dir_all(&full)
                } else {
                    fs::remove_file(&full)
                };
                res.map_err(|e| ctx.io("replacing the existing entry", e))?;
                self.forget(rel);
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget(rel);
                Ok(false)
            }
            Err(e) => Err(ctx.io("inspecting the existing entry", e)),
        }
    }

    /// Drop the records of `rel` and everything below it. Descendants sort right after `rel`
    /// because `Path` orders component-wise.
    fn forget(&mut self, rel: &Path) {
        let doomed: Vec<PathBuf> = self
            .records
            .range(rel.to_path_buf()..)
            .take_while(|(k, _)| k.starts_with(rel))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.records.remove(&k);
        }
    }

    fn remove_path(&mut self, ctx: &Ctx, rel: &Path) -> Result<(), ImageError> {
        let full = self.root.join(rel);
        match fs::symlink_metadata(&full) {
            Ok(m) => {
                let res = if m.is_dir() {
                    fs::remove_dir_all(&full)
                } else {
                    fs::remove_file(&full)
                };
                res.map_err(|e| ctx.io("applying the whiteout", e))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(ctx.io("applying the whiteout", e)),
        }
        self.forget(rel);
        Ok(())
    }

    /// `.wh.<name>` deletes `<name>` from lower layers; `.wh..wh..opq` hides all lower contents of
    /// its directory. Entries of the current layer are kept either way, whatever the tar order.
    fn whiteout(&mut self, ctx: &Ctx, rel: &Path, hidden: &[u8]) -> Result<(), ImageError> {
        let placeholder = Meta::plain_dir();
        if !self.prepare_parents(ctx, rel, false, &placeholder)? {
            return Ok(()); // nothing below a missing directory to delete
        }
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if hidden == b".wh..opq" {
            return self.clear_lower(ctx, &parent);
        }
        if hidden.starts_with(b".wh.") {
            return Ok(()); // other AUFS metadata (.wh..wh.plnk etc.): not part of the file system
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(ctx.reject("malformed whiteout name"));
        }
        let target = parent.join(OsStr::from_bytes(hidden));
        if self.layer_paths.contains(&target) {
            return Ok(());
        }
        self.remove_path(ctx, &target)
    }

    fn clear_lower(&mut self, ctx: &Ctx, dir: &Path) -> Result<(), ImageError> {
        let full = self.root.join(dir);
        let listing = match fs::read_dir(&full) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ctx.io("applying the opaque whiteout", e)),
        };
        let mut children = Vec::new();
        for child in listing {
            let child = child.map_err(|e| ctx.io("applying the opaque whiteout", e))?;
            children.push(dir.join(child.file_name()));
        }
        // Device nodes that exist only as records.
        let pending: Vec<PathBuf> = self
            .records
            .range(dir.to_path_buf()..)
            .take_while(|(k, _)| k.starts_with(dir))
            .filter(|(k, m)| !m.materialized && k.parent() == Some(dir))
            .map(|(k, _)| k.clone())
            .collect();
        children.extend(pending);
        for child in children {
            if self.layer_paths.contains(&child) {
                // Created by this layer: keep it, but a merged directory loses its lower contents.
                if fs::symlink_metadata(self.root.join(&child)).is_ok_and(|m| m.is_dir()) {
                    self.clear_lower(ctx, &child)?;
                }
            } else {
                self.remove_path(ctx, &child)?;
            }
        }
        Ok(())
    }

    /// Apply recorded ownership (when privileged), modes, xattrs and mtimes to the staging tree.
    /// Done once after all layers so directory mtimes are not disturbed by later writes, and after
    /// chown because chown clears setuid bits and file capabilities.
    pub(crate) fn finalize(&mut self) -> Result<(), ImageError> {
        for (rel, meta) in self.records.iter_mut() {
            if !meta.materialized {
                continue;
            }
            let full = self.root.join(rel);
            let c = cpath(&full)
                .map_err(|e| ImageError::io(format!("finalising {}", full.display()), e))?;
            if self.privileged {
                // Failure (e.g. root in a user namespace) is fine: the ext4 builder fixes owners.
                // SAFETY: c is a valid NUL-terminated path.
                let _ = unsafe { libc::lchown(c.as_ptr(), meta.uid, meta.gid) };
            }
            if meta.kind != Kind::Symlink {
                // Unprivileged, mke2fs must still be able to read everything we own.
                let staged = if self.privileged {
                    meta.mode
                } else if meta.kind == Kind::Dir {
                    meta.mode | 0o700
                } else {
                    meta.mode | 0o400
                };
                // SAFETY: c is a valid NUL-terminated path (symlinks were skipped above, so
                // chmod cannot follow one).
                let _ = unsafe { libc::chmod(c.as_ptr(), staged) };
            }
            meta.pending_xattrs.clear();
            for (name, value) in &meta.xattrs {
                let Ok(cname) = CString::new(name.clone()) else {
                    continue;
                };
                // SAFETY: valid C strings and a buffer of the given length.
                let rc = unsafe {
                    libc::lsetxattr(
                        c.as_ptr(),
                        cname.as_ptr(),
                        value.as_ptr().cast(),
                        value.len(),
                        0,
                    )
                };
                if rc != 0 {
                    meta.pending_xattrs.push((name.clone(), value.clone()));
                }
            }
            let ts = libc::timespec {
                tv_sec: meta.mtime as libc::time_t,
                tv_nsec: meta.mtime_nsec as _,
            };
            let times = [ts, ts];
            // SAFETY: valid path and a two-element timespec array.
            let _ = unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    times.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
        }
        Ok(())
    }

    /// Number of inodes the image needs (records plus lost+found and slack).
    pub(crate) fn inode_count(&self) -> u64 {
        let n = self.records.len() as u64;
        n + n / 10 + 64
    }

    /// The staged metadata of an entry as mke2fs will copy it.
    pub(crate) fn staged(&self, rel: &Path) -> io::Result<fs::Metadata> {
        fs::symlink_metadata(self.root.join(rel))
    }
}
