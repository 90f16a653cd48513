//! The kernel's FUSE protocol, as the guest's virtio-fs driver puts it on the virtqueue: each
//! request is a `fuse_in_header` and its arguments, each reply a `fuse_out_header` and its body
//! (`include/uapi/linux/fuse.h`; all fields little-endian on x86_64, our only guest).
//!
//! Hand-written rather than taken from a crate: the messages are fixed-layout structs plus
//! NUL-terminated names, so a bounded cursor reads them without `unsafe`, and [`FuseFs`] only
//! translates them into the [`VfsOp`]s that [`MountFs`] already answers (with its rules, events,
//! ownership view and `RESOLVE_BENEATH` resolution). The one crate that parses FUSE for
//! virtio-fs (`fuse-backend-rs`) brings its own filesystem trait and an older `vm-memory` than
//! the vhost-user crates we use.
//!
//! One device serves all of a sandbox's mounts (microvm has eight virtio-mmio slots, and the
//! disks, console, network and entropy take most of them): its root is a synthetic read-only
//! directory whose entries, named by mount index (`0`, `1`, ...), are the mounts' roots, which the
//! guest agent bind-mounts into place. A FUSE node id carries its mount: `(index + 1) << 48 |
//! the mount's own node id`, which is also the `st_ino` the guest sees, so inode numbers are
//! stable and never collide between mounts (and stay below 2^53, which JavaScript's `stat` can
//! represent exactly, for up to [`MAX_MOUNTS`] mounts).
//!
//! Everything here comes from the guest: a request shorter than its header says, a name without
//! its NUL, a count larger than the bytes that carry it, all get an error reply (or, when not even
//! the header is readable, none), never a panic.

use crate::op::{dirent_size, Payload, VfsAttr, VfsOp, VfsReply, VfsTime, MAX_IO, ROOT_NODE};
use crate::ops::NODE_ID_LIMIT;
use crate::MountFs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Request opcodes (`enum fuse_opcode`).
mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const SYNCFS: u32 = 50;
}

/// `FUSE_INIT` flags (`fuse_init_in.flags`, `fuse_init_out.flags`).
mod init {
    pub const ASYNC_READ: u32 = 1 << 0;
    pub const ATOMIC_O_TRUNC: u32 = 1 << 3;
    pub const BIG_WRITES: u32 = 1 << 5;
    pub const AUTO_INVAL_DATA: u32 = 1 << 12;
    pub const DO_READDIRPLUS: u32 = 1 << 13;
    pub const READDIRPLUS_AUTO: u32 = 1 << 14;
    pub const PARALLEL_DIROPS: u32 = 1 << 18;
    pub const MAX_PAGES: u32 = 1 << 22;
    pub const CACHE_SYMLINKS: u32 = 1 << 23;
}

/// The protocol version we answer `FUSE_INIT` with: 7.31 has every message we parse in the
/// layout we parse it (newer kernels adapt to it).
const KERNEL_VERSION: u32 = 7;
const KERNEL_MINOR: u32 = 31;

/// `fuse_in_header` bytes.
pub const IN_HEADER: usize = 40;
/// `fuse_out_header` bytes.
pub const OUT_HEADER: usize = 16;
/// Largest request we accept: a [`MAX_IO`] write and its headers.
pub const MAX_REQUEST: usize = MAX_IO as usize + 4096;

const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const GETATTR_FH: u32 = 1 << 0;
const FSYNC_FDATASYNC: u32 = 1 << 0;
/// `fuse_open_out.open_flags`: bypass the guest's page cache for this open file.
const FOPEN_DIRECT_IO: u32 = 1 << 0;
/// `fuse_open_out.open_flags`: keep the page cache across opens. Host changes still reach it:
/// attributes that show a changed size or mtime drop the cached pages (`FUSE_AUTO_INVAL_DATA`),
/// and an open of a file changed on the host makes the kernel fetch them first.
const FOPEN_KEEP_CACHE: u32 = 1 << 1;

/// How the guest's kernel should treat a file opened with `flags`. A write-only open goes
/// around the page cache: the kernel hands the writer's own pages to the device instead of
/// copying them into cache pages first (each `write` is one request either way, since the
/// cache is write-through), and such a descriptor can be neither read nor mapped, so nothing
/// is lost. Readers and read-write opens (databases, `mmap`) keep the cache and its
/// read-ahead. Other descriptors' cached pages stay coherent: the write changes the file's
/// size and mtime, which the kernel checks before it reads from cache
/// (`FUSE_AUTO_INVAL_DATA`).
fn open_flags(flags: i32) -> u32 {
    if flags & libc::O_ACCMODE == libc::O_WRONLY {
        FOPEN_DIRECT_IO
    } else {
        FOPEN_KEEP_CACHE
    }
}

/// How long the kernel may trust names and attributes before asking again: a `stat` of something
/// changed on the host side of a live mount shows the change within this long (virtiofs's
/// `cache=auto` makes the same trade), an `open` at once ([`MountFs`] answers it with `ESTALE`
/// when the guest's view is out of date, and the kernel looks again). Trusting nothing would
/// cost a round trip for every permission check along every path, and would drop a file's
/// cached pages at every close (the kernel evicts inodes whose names expired).
const TTL_SECS: u64 = 1;

/// Most mounts one device serves (node ids stay below 2^53).
pub const MAX_MOUNTS: usize = 31;
/// The directory handle of the synthetic root.
const ROOT_DIR_FH: u64 = u64::MAX;

/// A sandbox's mounts served over FUSE: the translation between the kernel's requests and
/// [`MountFs::handle`].
pub struct FuseFs {
    mounts: Vec<Arc<MountFs>>,
    /// `FUSE_INIT` was answered; nothing else is served before it.
    ready: AtomicBool,
}

/// What a FUSE node id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    /// The synthetic root directory.
    Root,
    /// Node `1` (its node id) of mount `0` (its index).
    In(usize, u64),
}

/// A bounded little-endian reader over a request's argument bytes; running short is `EINVAL`.
struct Args<'a> {
    b: &'a [u8],
}

impl<'a> Args<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], i32> {
        if self.b.len() < n {
            return Err(libc::EINVAL);
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<u32, i32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().map_err(|_| libc::EINVAL)?,
        ))
    }
    fn u64(&mut self) -> Result<u64, i32> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().map_err(|_| libc::EINVAL)?,
        ))
    }
    /// A NUL-terminated string, without its NUL.
    fn name(&mut self) -> Result<Vec<u8>, i32> {
        let end = self.b.iter().position(|&c| c == 0).ok_or(libc::EINVAL)?;
        let s = self.b[..end].to_vec();
        self.b = &self.b[end + 1..];
        Ok(s)
    }
}

/// The parts of `fuse_in_header` we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    /// Request bytes, header included.
    pub len: u32,
    /// What is asked.
    pub opcode: u32,
    /// The id the reply carries back.
    pub unique: u64,
    /// The node the request is about.
    pub nodeid: u64,
    /// The guest user making it.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
}

impl InHeader {
    /// Reads the header at the start of `req`; `None` if it is too short.
    pub fn parse(req: &[u8]) -> Option<InHeader> {
        let mut a = Args { b: req };
        let len = a.u32().ok()?;
        let opcode = a.u32().ok()?;
        let unique = a.u64().ok()?;
        let nodeid = a.u64().ok()?;
        let uid = a.u32().ok()?;
        let gid = a.u32().ok()?;
        a.take(8).ok()?; // pid, total_extlen, padding
        Some(InHeader {
            len,
            opcode,
            unique,
            nodeid,
            uid,
            gid,
        })
    }
}

/// Appends little-endian fields to a reply.
struct Out<'a>(&'a mut Vec<u8>);

impl Out<'_> {
    fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    /// `struct fuse_attr` (88 bytes).
    fn attr(&mut self, a: &VfsAttr) -> &mut Self {
        self.u64(a.ino).u64(a.size).u64(a.blocks);
        self.u64(a.atime.0 as u64)
            .u64(a.mtime.0 as u64)
            .u64(a.ctime.0 as u64);
        self.u32(a.atime.1).u32(a.mtime.1).u32(a.ctime.1);
        self.u32(a.mode).u32(a.nlink).u32(a.uid).u32(a.gid);
        self.u32(a.rdev).u32(a.blksize).u32(0)
    }
    /// `struct fuse_attr_out` (104 bytes).
    fn attr_out(&mut self, a: &VfsAttr) -> &mut Self {
        self.u64(TTL_SECS).u32(0).u32(0).attr(a)
    }
    /// `struct fuse_entry_out` (128 bytes); node 0 says "no entry" (a bare READDIRPLUS entry).
    fn entry(&mut self, node: u64, a: &VfsAttr) -> &mut Self {
        let ttl = if node == 0 { 0 } else { TTL_SECS };
        self.u64(node).u64(0).u64(ttl).u64(TTL_SECS).u32(0).u32(0);
        self.attr(a)
    }
    /// `struct fuse_dirent` and its name, padded to 8 bytes.
    fn dirent(&mut self, ino: u64, off: u64, kind: u32, name: &[u8]) -> &mut Self {
        self.u64(ino)
            .u64(off)
            .u32(name.len() as u32)
            .u32(kind >> 12);
        self.0.extend_from_slice(name);
        self.zeros(dirent_size(name.len()) - 24 - name.len())
    }
}

impl FuseFs {
    /// Serves `mounts`; their index is their name under the device's root.
    pub fn new(mounts: Vec<Arc<MountFs>>) -> Self {
        FuseFs {
            mounts,
            ready: AtomicBool::new(false),
        }
    }

    /// Answers one request, appending the reply's header and arguments to `out`. `req` is the
    /// request as the guest wrote it, header and arguments; a write's data stays in `payload`,
    /// and a read's data goes there (after the reply's header). Returns the reply's whole length
    /// (`out`'s new bytes and the payload's), or `None` when the request takes no reply
    /// (forgets, interrupts, or a request too short to carry a header).
    pub fn handle(
        &self,
        req: &[u8],
        payload: &mut dyn Payload,
        out: &mut Vec<u8>,
    ) -> Option<usize> {
        let h = InHeader::parse(req)?;
        if matches!(
            h.opcode,
            opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT
        ) {
            // Virtio-fs never sends interrupts; forgets take no reply even when malformed.
            if h.opcode != opcode::INTERRUPT {
                let _ = self.forget(&h, &req[IN_HEADER..]);
            }
            return None;
        }
        let start = out.len();
        out.extend_from_slice(&[0u8; OUT_HEADER]);
        // The header's length must match what arrived: a shorter claim would let a later
        // request's bytes be read as this one's arguments.
        let result = if h.len as usize != req.len() + payload.pending() {
            Err(libc::EINVAL)
        } else {
            self.dispatch(&h, &req[IN_HEADER..], payload, out)
        };
        let data = match result {
            Ok(n) => n,
            Err(errno) => {
                out.truncate(start + OUT_HEADER);
                out[start + 4..start + 8].copy_from_slice(&(-errno).to_le_bytes());
                0
            }
        };
        let len = out.len() - start + data;
        out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        out[start + 8..start + 16].copy_from_slice(&h.unique.to_le_bytes());
        Some(len)
    }

    fn forget(&self, h: &InHeader, body: &[u8]) -> Result<(), i32> {
        let mut a = Args { b: body };
        let mut nodes = Vec::new();
        if h.opcode == opcode::FORGET {
            nodes.push((h.nodeid, a.u64()?));
        } else {
            let count = a.u32()? as usize;
            a.u32()?;
            // Each entry is 16 bytes: the count cannot ask for more than arrived.
            for _ in 0..count.min(a.b.len() / 16) {
                nodes.push((a.u64()?, a.u64()?));
            }
        }
        let mut per_mount: Vec<Vec<(u64, u64)>> = vec![Vec::new(); self.mounts.len()];
        for (n, count) in nodes {
            if let Ok(Node::In(m, local)) = self.node(n) {
                per_mount[m].push((local, count));
            }
        }
        for (fs, nodes) in self.mounts.iter().zip(per_mount) {
            if !nodes.is_empty() {
                fs.handle(VfsOp::Forget { nodes });
            }
        }
        Ok(())
    }

    /// What a FUSE node id names.
    fn node(&self, nodeid: u64) -> Result<Node, i32> {
        if nodeid == ROOT_NODE {
            return Ok(Node::Root);
        }
        let m = (nodeid / NODE_ID_LIMIT) as usize;
        let local = nodeid % NODE_ID_LIMIT;
        if m == 0 || m > self.mounts.len() || local == 0 {
            return Err(libc::ENOENT);
        }
        Ok(Node::In(m - 1, local))
    }

    /// A mount's node as a FUSE node id.
    fn fuse_id(m: usize, local: u64) -> u64 {
        (m as u64 + 1) * NODE_ID_LIMIT + local
    }

    /// Runs `op` on mount `m`; an error reply becomes `Err`. Attributes come back with FUSE
    /// node ids.
    fn call(&self, m: usize, op: VfsOp) -> Result<VfsReply, i32> {
        self.call_with(m, op, None, None)
    }

    fn call_with(
        &self,
        m: usize,
        op: VfsOp,
        payload: Option<&mut dyn Payload>,
        caller: Option<(u32, u32)>,
    ) -> Result<VfsReply, i32> {
        let mut r = match self.mounts[m].handle_from(op, payload, caller) {
            VfsReply::Err(e) => return Err(e),
            r => r,
        };
        let fix = |a: &mut VfsAttr| a.ino = Self::fuse_id(m, a.ino);
        match &mut r {
            VfsReply::Entry(a)
            | VfsReply::Attr(a)
            | VfsReply::Created(a, _)
            | VfsReply::OpenedFile(_, a) => fix(a),
            VfsReply::EntriesPlus(es) => {
                es.iter_mut().filter_map(|e| e.attr.as_mut()).for_each(fix)
            }
            _ => {}
        }
        Ok(r)
    }

    /// The synthetic root directory.
    fn root_attr(&self) -> VfsAttr {
        VfsAttr {
            ino: ROOT_NODE,
            mode: libc::S_IFDIR | 0o555,
            nlink: 2,
            blksize: 4096,
            ..Default::default()
        }
    }

    fn dispatch(
        &self,
        h: &InHeader,
        body: &[u8],
        payload: &mut dyn Payload,
        out: &mut Vec<u8>,
    ) -> Result<usize, i32> {
        if h.opcode == opcode::INIT {
            return self.init(body, out).map(|_| 0);
        }
        if !self.ready.load(Ordering::Acquire) {
            return Err(libc::EIO);
        }
        if h.opcode == opcode::DESTROY {
            return Ok(0);
        }
        match self.node(h.nodeid)? {
            Node::Root => self.root_op(h, body, out),
            Node::In(m, local) => self.mount_op(h, m, local, body, payload, out),
        }
    }

    /// Requests about the synthetic root: look up a mount by index, list the mounts, stat.
    fn root_op(&self, h: &InHeader, body: &[u8], out: &mut Vec<u8>) -> Result<usize, i32> {
        let mut a = Args { b: body };
        match h.opcode {
            opcode::LOOKUP => {
                let name = a.name()?;
                // Only the canonical spelling, so each mount has one name.
                let m = std::str::from_utf8(&name)
                    .ok()
                    .filter(|n| *n == "0" || !n.starts_with('0'))
                    .and_then(|n| n.parse::<usize>().ok())
                    .filter(|&m| m < self.mounts.len())
                    .ok_or(libc::ENOENT)?;
                let r = self.call(
                    m,
                    VfsOp::Getattr {
                        node: ROOT_NODE,
                        fh: None,
                    },
                )?;
                let VfsReply::Attr(attr) = r else {
                    return Err(libc::EIO);
                };
                Out(out).entry(attr.ino, &attr);
                Ok(0)
            }
            opcode::GETATTR => {
                Out(out).attr_out(&self.root_attr());
                Ok(0)
            }
            opcode::OPENDIR => {
                Out(out).u64(ROOT_DIR_FH).u32(0).u32(0);
                Ok(0)
            }
            opcode::RELEASEDIR | opcode::FSYNCDIR => Ok(0),
            opcode::READDIR | opcode::READDIRPLUS => {
                a.u64()?;
                let offset = a.u64()?;
                let size = a.u32()? as usize;
                let plus = h.opcode == opcode::READDIRPLUS;
                let names = [".".to_string(), "..".to_string()]
                    .into_iter()
                    .chain((0..self.mounts.len()).map(|m| m.to_string()));
                let start = out.len();
                for (i, name) in names.enumerate().skip(offset as usize) {
                    let mut entry = Vec::new();
                    let mut e = Out(&mut entry);
                    if plus {
                        // Bare entries: the kernel looks each one up when it needs it.
                        e.entry(0, &VfsAttr::default());
                    }
                    e.dirent(i as u64 + 1, i as u64 + 1, libc::S_IFDIR, name.as_bytes());
                    if out.len() - start + entry.len() > size {
                        break;
                    }
                    out.extend_from_slice(&entry);
                }
                Ok(0)
            }
            opcode::STATFS => {
                Out(out).zeros(80);
                Ok(0)
            }
            opcode::READLINK | opcode::OPEN => Err(libc::EACCES),
            opcode::SETATTR
            | opcode::SYMLINK
            | opcode::MKNOD
            | opcode::MKDIR
            | opcode::UNLINK
            | opcode::RMDIR
            | opcode::RENAME
            | opcode::RENAME2
            | opcode::LINK
            | opcode::CREATE => Err(libc::EROFS),
            _ => Err(libc::ENOSYS),
        }
    }

    fn entry_reply(&self, r: VfsReply, out: &mut Vec<u8>) -> Result<usize, i32> {
        match r {
            VfsReply::Entry(a) => {
                Out(out).entry(a.ino, &a);
                Ok(0)
            }
            _ => Err(libc::EIO),
        }
    }

    /// A second node of the same request (a rename's target directory, a link's source), which
    /// must be in the same mount: nothing moves or links between mounts.
    fn same_mount(&self, m: usize, nodeid: u64) -> Result<u64, i32> {
        match self.node(nodeid)? {
            Node::In(m2, local) if m2 == m => Ok(local),
            Node::In(..) => Err(libc::EXDEV),
            Node::Root => Err(libc::EROFS),
        }
    }

    /// Requests about a node inside mount `m`.
    fn mount_op(
        &self,
        h: &InHeader,
        m: usize,
        node: u64,
        body: &[u8],
        payload: &mut dyn Payload,
        out: &mut Vec<u8>,
    ) -> Result<usize, i32> {
        let mut a = Args { b: body };
        let caller = Some((h.uid, h.gid));
        let call = |op| self.call_with(m, op, None, caller);
        match h.opcode {
            opcode::LOOKUP => {
                let name = a.name()?;
                let r = call(VfsOp::Lookup { parent: node, name })?;
                self.entry_reply(r, out)
            }
            opcode::GETATTR => {
                let flags = a.u32()?;
                a.u32()?;
                let fh = a.u64()?;
                let fh = (flags & GETATTR_FH != 0).then_some(fh);
                let VfsReply::Attr(attr) = call(VfsOp::Getattr { node, fh })? else {
                    return Err(libc::EIO);
                };
                Out(out).attr_out(&attr);
                Ok(0)
            }
            opcode::SETATTR => {
                let valid = a.u32()?;
                a.u32()?;
                let fh = a.u64()?;
                let size = a.u64()?;
                a.u64()?; // lock_owner
                let atime = a.u64()?;
                let mtime = a.u64()?;
                a.u64()?; // ctime
                let atimensec = a.u32()?;
                let mtimensec = a.u32()?;
                a.u32()?; // ctimensec
                let mode = a.u32()?;
                a.u32()?;
                let uid = a.u32()?;
                let gid = a.u32()?;
                let set = |bit: u32| valid & bit != 0;
                let time = |bit, now, s: u64, ns| {
                    if set(now) {
                        Some(VfsTime::Now)
                    } else if set(bit) {
                        Some(VfsTime::At(s as i64, ns))
                    } else {
                        None
                    }
                };
                let r = call(VfsOp::Setattr {
                    node,
                    fh: set(FATTR_FH).then_some(fh),
                    mode: set(FATTR_MODE).then_some(mode),
                    uid: set(FATTR_UID).then_some(uid),
                    gid: set(FATTR_GID).then_some(gid),
                    size: set(FATTR_SIZE).then_some(size),
                    atime: time(FATTR_ATIME, FATTR_ATIME_NOW, atime, atimensec),
                    mtime: time(FATTR_MTIME, FATTR_MTIME_NOW, mtime, mtimensec),
                })?;
                let VfsReply::Attr(attr) = r else {
                    return Err(libc::EIO);
                };
                Out(out).attr_out(&attr);
                Ok(0)
            }
            opcode::READLINK => match call(VfsOp::Readlink { node })? {
                VfsReply::Data(d) => {
                    out.extend_from_slice(&d);
                    Ok(0)
                }
                _ => Err(libc::EIO),
            },
            opcode::SYMLINK => {
                let name = a.name()?;
                let target = a.name()?;
                let r = call(VfsOp::Symlink {
                    parent: node,
                    name,
                    target,
                })?;
                self.entry_reply(r, out)
            }
            opcode::MKNOD => {
                let mode = a.u32()?;
                a.take(12)?; // rdev, umask, padding
                let name = a.name()?;
                let r = call(VfsOp::Mknod {
                    parent: node,
                    name,
                    mode,
                })?;
                self.entry_reply(r, out)
            }
            opcode::MKDIR => {
                let mode = a.u32()?;
                a.u32()?; // umask (the kernel applied it)
                let name = a.name()?;
                let r = call(VfsOp::Mkdir {
                    parent: node,
                    name,
                    mode,
                })?;
                self.entry_reply(r, out)
            }
            opcode::UNLINK | opcode::RMDIR => {
                let name = a.name()?;
                let op = if h.opcode == opcode::UNLINK {
                    VfsOp::Unlink { parent: node, name }
                } else {
                    VfsOp::Rmdir { parent: node, name }
                };
                call(op).map(|_| 0)
            }
            opcode::RENAME | opcode::RENAME2 => {
                let new_parent = self.same_mount(m, a.u64()?)?;
                let flags = if h.opcode == opcode::RENAME2 {
                    let f = a.u32()?;
                    a.u32()?;
                    f
                } else {
                    0
                };
                let name = a.name()?;
                let new_name = a.name()?;
                call(VfsOp::Rename {
                    parent: node,
                    name,
                    new_parent,
                    new_name,
                    flags,
                })
                .map(|_| 0)
            }
            opcode::LINK => {
                let source = self.same_mount(m, a.u64()?)?;
                let new_name = a.name()?;
                let r = call(VfsOp::Link {
                    node: source,
                    new_parent: node,
                    new_name,
                })?;
                self.entry_reply(r, out)
            }
            opcode::OPEN => {
                let flags = a.u32()? as i32;
                match call(VfsOp::Open { node, flags })? {
                    VfsReply::OpenedFile(fh, _) => {
                        Out(out).u64(fh).u32(open_flags(flags)).u32(0);
                        Ok(0)
                    }
                    _ => Err(libc::EIO),
                }
            }
            opcode::CREATE => {
                let flags = a.u32()? as i32;
                let mode = a.u32()?;
                a.take(8)?; // umask, open_flags
                let name = a.name()?;
                let r = call(VfsOp::Create {
                    parent: node,
                    name,
                    mode,
                    flags,
                })?;
                let VfsReply::Created(attr, fh) = r else {
                    return Err(libc::EIO);
                };
                Out(out)
                    .entry(attr.ino, &attr)
                    .u64(fh)
                    .u32(open_flags(flags))
                    .u32(0);
                Ok(0)
            }
            opcode::READ => {
                let fh = a.u64()?;
                let offset = a.u64()?;
                let size = a.u32()?;
                match self.call_with(m, VfsOp::Read { fh, offset, size }, Some(payload), caller)? {
                    VfsReply::Transferred(n) => Ok(n as usize),
                    _ => Err(libc::EIO),
                }
            }
            opcode::WRITE => {
                let fh = a.u64()?;
                let offset = a.u64()?;
                let size = a.u32()?;
                a.take(20)?; // write_flags, lock_owner, flags, padding
                if size > MAX_IO {
                    return Err(libc::EINVAL);
                }
                // The data is in the transport's buffers, exactly `size` bytes of it.
                if payload.pending() != size as usize || !a.b.is_empty() {
                    return Err(libc::EINVAL);
                }
                match self.call_with(m, VfsOp::Write { fh, offset }, Some(payload), caller)? {
                    VfsReply::Written(n) => {
                        Out(out).u32(n).u32(0);
                        Ok(0)
                    }
                    _ => Err(libc::EIO),
                }
            }
            opcode::STATFS => match call(VfsOp::Statfs)? {
                VfsReply::Statfs(s) => {
                    Out(out)
                        .u64(s.blocks)
                        .u64(s.bfree)
                        .u64(s.bavail)
                        .u64(s.files)
                        .u64(s.ffree)
                        .u32(s.bsize)
                        .u32(s.namelen)
                        .u32(s.frsize)
                        .zeros(4 + 24);
                    Ok(0)
                }
                _ => Err(libc::EIO),
            },
            opcode::RELEASE | opcode::RELEASEDIR => {
                let fh = a.u64()?;
                call(VfsOp::Release { fh }).map(|_| 0)
            }
            opcode::FSYNC | opcode::FSYNCDIR => {
                let fh = a.u64()?;
                let flags = a.u32()?;
                call(VfsOp::Fsync {
                    fh,
                    datasync: flags & FSYNC_FDATASYNC != 0,
                })
                .map(|_| 0)
            }
            opcode::OPENDIR => match call(VfsOp::Opendir { node })? {
                VfsReply::Opened(fh) => {
                    Out(out).u64(fh).u32(0).u32(0);
                    Ok(0)
                }
                _ => Err(libc::EIO),
            },
            opcode::READDIR => {
                let fh = a.u64()?;
                let offset = a.u64()?;
                let size = a.u32()?.min(MAX_IO);
                let r = call(VfsOp::Readdir { fh, offset, size })?;
                let VfsReply::Entries(entries) = r else {
                    return Err(libc::EIO);
                };
                for e in entries {
                    Out(out).dirent(e.ino, e.offset, e.kind, &e.name);
                }
                Ok(0)
            }
            opcode::READDIRPLUS => {
                let fh = a.u64()?;
                let offset = a.u64()?;
                let size = a.u32()?.min(MAX_IO);
                let r = call(VfsOp::ReaddirPlus { fh, offset, size })?;
                let VfsReply::EntriesPlus(entries) = r else {
                    return Err(libc::EIO);
                };
                for e in entries {
                    let (id, attr) = match e.attr {
                        Some(a) => (a.ino, a),
                        None => (0, VfsAttr::default()),
                    };
                    let d = &e.entry;
                    Out(out)
                        .entry(id, &attr)
                        .dirent(d.ino, d.offset, d.kind, &d.name);
                }
                Ok(0)
            }
            opcode::FALLOCATE => {
                let fh = a.u64()?;
                let offset = a.u64()?;
                let length = a.u64()?;
                let mode = a.u32()? as i32;
                call(VfsOp::Fallocate {
                    fh,
                    mode,
                    offset,
                    length,
                })
                .map(|_| 0)
            }
            opcode::LSEEK => {
                let fh = a.u64()?;
                let offset = a.u64()?;
                let whence = a.u32()?;
                match call(VfsOp::Lseek { fh, offset, whence })? {
                    VfsReply::Offset(o) => {
                        Out(out).u64(o);
                        Ok(0)
                    }
                    _ => Err(libc::EIO),
                }
            }
            opcode::SYNCFS => call(VfsOp::Syncfs).map(|_| 0),
            // Everything else (xattrs, flush, locks, ioctl, poll, copy_file_range, tmpfile, DAX
            // mappings): the kernel remembers ENOSYS and stops asking, or falls back to doing
            // it itself.
            _ => Err(libc::ENOSYS),
        }
    }

    /// `FUSE_INIT`: what this server does, intersected with what the kernel offers.
    fn init(&self, body: &[u8], out: &mut Vec<u8>) -> Result<(), i32> {
        let mut a = Args { b: body };
        let major = a.u32()?;
        let minor = a.u32()?;
        let max_readahead = a.u32()?;
        let offered = a.u32()?;
        if major != KERNEL_VERSION || minor < 27 {
            // Not a kernel with virtio-fs (7.27 is Linux 5.4's); the mount fails.
            return Err(libc::EPROTO);
        }
        let wanted = init::ASYNC_READ
            | init::ATOMIC_O_TRUNC
            | init::BIG_WRITES
            | init::AUTO_INVAL_DATA
            | init::DO_READDIRPLUS
            | init::READDIRPLUS_AUTO
            | init::PARALLEL_DIROPS
            | init::MAX_PAGES
            | init::CACHE_SYMLINKS;
        Out(out)
            .u32(KERNEL_VERSION)
            .u32(KERNEL_MINOR.min(minor))
            .u32(max_readahead)
            .u32(offered & wanted)
            .u16(MAX_BACKGROUND)
            .u16(MAX_BACKGROUND * 3 / 4)
            .u32(MAX_IO)
            .u32(1) // time_gran: nanoseconds
            .u16((MAX_IO / 4096) as u16) // max_pages
            .u16(0) // map_alignment
            .u32(0) // flags2
            .zeros(28);
        self.ready.store(true, Ordering::Release);
        Ok(())
    }
}

/// Background requests (read-ahead, async I/O) the kernel may have in flight at once.
const MAX_BACKGROUND: u16 = 64;

#[cfg(test)]
#[path = "fuse_tests.rs"]
mod tests;
