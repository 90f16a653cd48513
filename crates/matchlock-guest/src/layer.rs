//! `ExportUpper`: the sandbox's changes to its image as one OCI layer, a tar of the overlay's
//! upper directory (what `matchlock build` makes of each `RUN`).
//!
//! The upper directory is held open from before the switch to the new root ([`UPPER`]); it is
//! read through `/proc/self/fd/N`, which reaches it whatever the root is now. Overlayfs marks
//! become OCI's: a whiteout (a character device 0/0) is an empty `.wh.NAME`, an opaque directory
//! (`trusted.overlay.opaque=y`) gets a `.wh..wh..opq` entry, and `trusted.*` attributes stay out.
//! Owners, modes, times, hard links, devices and the other extended attributes (as PAX
//! `SCHILY.xattr.*` records) are kept exactly. Entries come in name order, so the same changes
//! give the same bytes and the same digest. The host treats the tar as the guest's (untrusted)
//! input: it goes through the same checks as any image layer.

use crate::server::Writer;
use matchlock_proto::{write_msg, Msg, CHUNK};
use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// The overlay's upper directory, opened before `switch_root` hides it.
pub static UPPER: OnceLock<OwnedFd> = OnceLock::new();

/// Serves one `ExportUpper` stream: `Data`* then `Eof`, or `Error`.
pub async fn export(exclude: Vec<String>, stop_processes: bool, is_vm: bool, mut wr: Writer) {
    let result = async {
        let fd = UPPER
            .get()
            .ok_or("this agent has no overlay upper layer (not a sandbox VM)")?;
        if stop_processes && is_vm {
            // What the last step left running must not change files while they are read.
            tokio::task::spawn_blocking(|| {
                crate::init::stop_all_processes(std::time::Duration::from_millis(500))
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        let root = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
        let walker = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut b = tar::Builder::new(Chunks {
                tx,
                buf: Vec::with_capacity(CHUNK),
            });
            b.follow_symlinks(false);
            let mut w = Walk {
                b: &mut b,
                exclude: &exclude,
                links: HashMap::new(),
            };
            w.dir(&root, Path::new(""))?;
            b.finish().map_err(|e| format!("writing the layer: {e}"))?;
            b.get_mut()
                .flush()
                .map_err(|e| format!("writing the layer: {e}"))
        });
        while let Some(chunk) = rx.recv().await {
            write_msg(&mut wr, &Msg::Data(chunk))
                .await
                .map_err(|e| e.to_string())?;
        }
        walker.await.map_err(|e| e.to_string())?
    }
    .await;
    let last = match result {
        Ok(()) => Msg::Eof,
        Err(e) => Msg::Error(format!("exporting the sandbox's changes: {e}")),
    };
    let _ = write_msg(&mut wr, &last).await;
    let _ = wr.shutdown().await;
}

/// A `Write` that hands [`CHUNK`]-sized pieces to the async side.
struct Chunks {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for Chunks {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the host went away"))
    }
}

struct Walk<'a> {
    b: &'a mut tar::Builder<Chunks>,
    exclude: &'a [String],
    /// First path of each (device, inode) with more than one link.
    links: HashMap<(u64, u64), PathBuf>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> String {
    format!("/{}: {e}", path.display())
}

impl Walk<'_> {
    /// Adds the entries of the directory `full` (at `rel` in the layer), sorted by name.
    fn dir(&mut self, full: &Path, rel: &Path) -> Result<(), String> {
        let mut names: Vec<_> = std::fs::read_dir(full)
            .map_err(|e| err(rel, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for name in names {
            let rel_child = rel.join(&name);
            if self.exclude.iter().any(|x| Path::new(x) == rel_child) {
                continue;
            }
            self.entry(&full.join(&name), &rel_child, &name)?;
        }
        Ok(())
    }

    fn entry(&mut self, full: &Path, rel: &Path, name: &OsStr) -> Result<(), String> {
        let meta = std::fs::symlink_metadata(full).map_err(|e| err(rel, e))?;
        let ft = meta.file_type();
        if ft.is_char_device() && meta.rdev() == 0 {
            // An overlayfs whiteout: the lower's entry is deleted.
            let mut wh = std::ffi::OsString::from(".wh.");
            wh.push(name);
            let path = rel.with_file_name(wh);
            let mut h = header(&meta, tar::EntryType::Regular);
            h.set_mode(0o600);
            h.set_size(0);
            return self
                .b
                .append_data(&mut h, &path, io::empty())
                .map_err(|e| err(rel, e));
        }
        if ft.is_socket() {
            return Ok(()); // a tar cannot hold one; neither does a Docker layer
        }
        let xattrs = xattrs(full);
        let opaque = xattrs
            .iter()
            .any(|(k, v)| k == "trusted.overlay.opaque" && v.as_slice() == b"y");
        let kept: Vec<(String, Vec<u8>)> = xattrs
            .into_iter()
            .filter(|(k, _)| !k.starts_with("trusted.") && !k.starts_with("system."))
            .map(|(k, v)| (format!("SCHILY.xattr.{k}"), v))
            .collect();
        if !kept.is_empty() {
            self.b
                .append_pax_extensions(kept.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .map_err(|e| err(rel, e))?;
        }
        let io_err = |e: io::Error| err(rel, e);
        if ft.is_dir() {
            let mut h = header(&meta, tar::EntryType::Directory);
            h.set_size(0);
            self.b
                .append_data(&mut h, rel, io::empty())
                .map_err(io_err)?;
            if opaque {
                let mut o = header(&meta, tar::EntryType::Regular);
                o.set_mode(0o600);
                o.set_size(0);
                self.b
                    .append_data(&mut o, rel.join(".wh..wh..opq"), io::empty())
                    .map_err(io_err)?;
            }
            return self.dir(full, rel);
        }
        if ft.is_symlink() {
            let target = std::fs::read_link(full).map_err(io_err)?;
            let mut h = header(&meta, tar::EntryType::Symlink);
            h.set_size(0);
            return self.b.append_link(&mut h, rel, target).map_err(io_err);
        }
        if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = self.links.get(&key) {
                    let mut h = header(&meta, tar::EntryType::Link);
                    h.set_size(0);
                    let first = first.clone();
                    return self.b.append_link(&mut h, rel, first).map_err(io_err);
                }
                self.links.insert(key, rel.to_path_buf());
            }
            let file = std::fs::File::open(full).map_err(io_err)?;
            let mut h = header(&meta, tar::EntryType::Regular);
            h.set_size(meta.len());
            // A file that changes size while read would corrupt the stream; take what its
            // header says, no more, no less.
            let len = meta.len();
            let reader = io::Read::take(
                io::Read::chain(io::Read::take(file, len), io::repeat(0)),
                len,
            );
            return self.b.append_data(&mut h, rel, reader).map_err(io_err);
        }
        // FIFOs and device nodes.
        let kind = if ft.is_fifo() {
            tar::EntryType::Fifo
        } else if ft.is_char_device() {
            tar::EntryType::Char
        } else {
            tar::EntryType::Block
        };
        let mut h = header(&meta, kind);
        h.set_size(0);
        let rdev = meta.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        h.set_device_major(major).map_err(io_err)?;
        h.set_device_minor(minor).map_err(io_err)?;
        self.b.append_data(&mut h, rel, io::empty()).map_err(io_err)
    }
}

fn header(meta: &std::fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(meta.mode() & 0o7777);
    h.set_uid(meta.uid().into());
    h.set_gid(meta.gid().into());
    h.set_mtime(meta.mtime().max(0) as u64);
    h
}

fn cpath(p: &Path) -> Option<CString> {
    CString::new(p.as_os_str().as_bytes()).ok()
}

/// The extended attributes of `p` (not following a link), names and values.
fn xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    let Some(c) = cpath(p) else { return Vec::new() };
    let mut names = vec![0u8; 4096];
    // SAFETY: the buffer is valid for its length; the path is NUL-terminated.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n <= 0 {
        return Vec::new();
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let (Ok(text), Ok(cname)) = (std::str::from_utf8(name), CString::new(name)) else {
            continue;
        };
        let mut value = vec![0u8; 65536];
        // SAFETY: as above.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len >= 0 {
            value.truncate(len as usize);
            out.push((text.to_string(), value));
        }
    }
    out
}
