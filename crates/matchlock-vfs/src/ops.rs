//! One mount: its node and handle tables and the operations on them.

use crate::op::{
    dirent_size, direntplus_size, Payload, VfsAttr, VfsDirEntry, VfsDirEntryPlus, VfsOp, VfsReply,
    VfsStatfs, VfsTime, MAX_ENTRIES, MAX_IO, MAX_LINK, ROOT_NODE,
};
use crate::rules::{self, BlockRule};
use crate::sys;
use std::collections::HashMap;
use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most nodes the guest may hold references to (the kernel forgets them under memory pressure).
const MAX_NODES: usize = 1 << 20;
/// Most open file and directory handles per mount.
const MAX_HANDLES: usize = 4096;
/// Names remembered per node: enough for `ln a b; rm b` and `link(tmp, final); unlink(tmp)`
/// to keep resolving.
const MAX_PATHS: usize = 8;
/// Synthetic node ids start here, above the inode numbers of common file systems; every id stays
/// below [`NODE_ID_LIMIT`] (host inode numbers above this base get synthetic ids too).
const SYNTHETIC_BASE: u64 = 1 << 47;
/// Node ids are below this, so the FUSE layer can put the mount's index above them
/// ([`crate::fuse`]).
pub const NODE_ID_LIMIT: u64 = 1 << 48;

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

type Key = (u64, u64);

fn key(st: &libc::stat) -> Key {
    (st.st_dev, st.st_ino)
}

struct Node {
    /// Names the inode was seen under (hard links have several), most recent first, at most
    /// [`MAX_PATHS`]; relative to the mount root, empty for the root.
    paths: Vec<PathBuf>,
    key: Key,
    refs: u64,
    /// The file's size and mtime as the guest last heard them (its kernel trusts attributes
    /// for a second).
    seen: Option<(u64, (i64, u32))>,
    /// When an open of it was last refused as stale, until the guest looks it up again.
    refused: Option<Instant>,
    /// The guest looked it up after a refusal: its next open is its retry, and passes.
    retrying: bool,
}

/// An `open` of a file whose size or mtime changed on the host since the guest last heard of
/// them fails with `ESTALE`: the guest's kernel then looks the path up again (getting fresh
/// attributes, and dropping cached pages of a changed file) and retries once, so a file changed
/// on the host reads whole and current at its next open. The retry passes even if the host
/// changed the file again meanwhile (a log it keeps writing); an open that cannot be retried
/// (through `/proc/self/fd`) passes if it comes within this long of the refusal.
pub(crate) const RETRY_WINDOW: Duration = Duration::from_secs(1);

enum Handle {
    File(OwnedFd),
    /// Seeking and reading must not interleave between two requests on one handle.
    Dir(Mutex<OwnedFd>, DirOf),
}

/// Which directory a handle reads, for `ReaddirPlus` (its entries' lookups and rules).
struct DirOf {
    node: u64,
    path: PathBuf,
}

#[derive(Default)]
struct Tables {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<Key, u64>,
    next_synthetic: u64,
    handles: HashMap<u64, Arc<Handle>>,
    /// The name each handle was opened under, for interception rules.
    handle_paths: HashMap<u64, PathBuf>,
    next_fh: u64,
}

/// A served host directory (or file) and the guest's view of it.
pub struct MountFs {
    /// `O_PATH` fd of the host root: everything is resolved beneath it.
    root: OwnedFd,
    root_is_dir: bool,
    read_only: bool,
    /// Where the guest mounts this, for interception rules' paths.
    guest_path: String,
    rules: Vec<BlockRule>,
    /// Ownership the guest sees on every file, when the mount overrides it.
    owner: Owner,
    /// Where completed operations are reported (`emit_events`), if anywhere.
    events: Option<tokio::sync::broadcast::Sender<crate::FileEvent>>,
    /// The byte budget of a mount whose files belong to the sandbox alone.
    quota: Option<Quota>,
    /// New entries are given to the guest user that made them (a mount whose files belong to
    /// the sandbox alone, as a tmpfs would).
    caller_owns: bool,
    /// Owner of the host root: besides a file's own ids, the only ones a guest may `chown` a
    /// file on a shared host directory to.
    root_ids: (u32, u32),
    /// Most nodes held at once ([`MountFs::with_node_limit`]).
    max_nodes: usize,
    tables: Mutex<Tables>,
}

/// What a new directory entry costs against a [`Quota`] (its inode and name), so a guest cannot
/// exhaust the host's inodes with empty files either.
use crate::scratch::ENTRY_COST;

/// A mount's byte budget: allocated blocks plus [`ENTRY_COST`] per entry. Writes that would pass
/// it fail with `ENOSPC`; a concurrent writer may overshoot by at most one request.
struct Quota {
    limit: u64,
    used: std::sync::atomic::AtomicU64,
}

impl Quota {
    fn reserve(&self, bytes: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.used
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(bytes).filter(|n| *n <= self.limit)
            })
            .map(drop)
            .map_err(|_| err(libc::ENOSPC))
    }

    /// Adds `delta` (which may be negative) whatever the limit: for what already happened.
    fn settle(&self, delta: i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let _ = self.used.fetch_update(Relaxed, Relaxed, |u| {
            Some(if delta >= 0 {
                u.saturating_add(delta as u64)
            } else {
                u.saturating_sub(delta.unsigned_abs())
            })
        });
    }
}

/// The bytes a file's allocated blocks take.
fn allocated(st: &libc::stat) -> i64 {
    st.st_blocks.max(0).saturating_mul(512)
}

/// A mount's ownership override: files appear owned by these ids in the guest, whoever owns
/// them on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owner {
    /// The uid every file shows.
    pub uid: Option<u32>,
    /// The gid every file shows.
    pub gid: Option<u32>,
}

impl Owner {
    fn apply(&self, a: &mut VfsAttr) {
        a.uid = self.uid.unwrap_or(a.uid);
        a.gid = self.gid.unwrap_or(a.gid);
    }
}

fn c_path(p: &Path) -> io::Result<CString> {
    let bytes = if p.as_os_str().is_empty() {
        b".".as_slice()
    } else {
        p.as_os_str().as_bytes()
    };
    CString::new(bytes).map_err(|_| err(libc::EINVAL))
}

/// `base/rest` without the trailing `/` that `Path::join("")` adds.
fn join(base: &Path, rest: &Path) -> PathBuf {
    if rest.as_os_str().is_empty() {
        base.to_path_buf()
    } else {
        base.join(rest)
    }
}

fn ts(t: i64, n: i64) -> (i64, u32) {
    (t, n.clamp(0, 999_999_999) as u32)
}

fn attr(ino: u64, st: &libc::stat) -> VfsAttr {
    VfsAttr {
        ino,
        size: st.st_size.max(0) as u64,
        blocks: st.st_blocks.max(0) as u64,
        atime: ts(st.st_atime, st.st_atime_nsec),
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
        mode: st.st_mode,
        nlink: st.st_nlink.min(u32::MAX as u64) as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize.clamp(0, u32::MAX as i64) as u32,
    }
}

/// Permission bits the guest may set: never set-user-id or set-group-id. A supervisor running
/// as root would otherwise let the guest plant a setuid-root program on the host, or a setgid
/// directory that hands its group to every file a host user later creates in it.
fn allowed_mode(mode: u32) -> u32 {
    mode & 0o1777
}

/// Clears the set-id bits of a regular file before the guest changes its content, as the kernel
/// does for a writer without `CAP_FSETID`. The supervisor writes as root, which the kernel
/// would let keep them: a guest could otherwise rewrite a host's setuid-root program and keep
/// the bit. Set-group-id without group execute (a locking mark, not a privilege) stays.
fn drop_set_id(fd: BorrowedFd<'_>, st: &libc::stat) -> io::Result<()> {
    let setgid_exec = libc::S_ISGID | libc::S_IXGRP;
    if !is_type(st, libc::S_IFREG) {
        return Ok(());
    }
    let mut mode = st.st_mode & 0o7777 & !libc::S_ISUID;
    if mode & setgid_exec == setgid_exec {
        mode &= !libc::S_ISGID;
    }
    if mode != st.st_mode & 0o7777 {
        sys::chmod_fd(fd, mode)?;
    }
    Ok(())
}

fn is_type(st: &libc::stat, t: u32) -> bool {
    st.st_mode & libc::S_IFMT == t
}

impl MountFs {
    /// Opens the host root (a directory or a regular file).
    pub fn open(host: &Path, read_only: bool) -> io::Result<Self> {
        // No symlink anywhere on the way, not even in the root: a guest may have planted one
        // there in an earlier run (see `matchlock_api::validate::host_source`).
        let through_symlink = || {
            io::Error::other(format!(
                "{} is or goes through a symlink, which mount sources may not (name the real path)",
                host.display()
            ))
        };
        let root = sys::open_path_no_symlinks(host).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => through_symlink(),
            _ => e,
        })?;
        let st = sys::fstat(root.as_fd())?;
        if is_type(&st, libc::S_IFLNK) {
            return Err(through_symlink());
        }
        let root_is_dir = is_type(&st, libc::S_IFDIR);
        if !root_is_dir && !is_type(&st, libc::S_IFREG) {
            return Err(io::Error::other(
                "only directories and regular files can be mounted",
            ));
        }
        let mut t = Tables {
            next_synthetic: SYNTHETIC_BASE,
            next_fh: 1,
            ..Default::default()
        };
        t.nodes.insert(
            ROOT_NODE,
            Node {
                paths: vec![PathBuf::new()],
                key: key(&st),
                refs: 1,
                seen: None,
                refused: None,
                retrying: false,
            },
        );
        t.by_key.insert(key(&st), ROOT_NODE);
        Ok(Self {
            root,
            root_is_dir,
            read_only,
            guest_path: String::new(),
            rules: Vec::new(),
            owner: Owner::default(),
            events: None,
            quota: None,
            caller_owns: false,
            root_ids: (st.st_uid, st.st_gid),
            max_nodes: MAX_NODES,
            tables: Mutex::new(t),
        })
    }

    /// Makes this a mount whose files belong to the sandbox alone (a `memory` mount's scratch
    /// directory, an `overlay` copy): at most `limit` bytes (blocks plus [`ENTRY_COST`] per
    /// entry), `used` of them already taken, and new entries owned by the guest user that
    /// creates them (when the server may change owners).
    pub fn private(mut self, limit: u64, used: u64) -> Self {
        self.quota = Some(Quota {
            limit,
            used: std::sync::atomic::AtomicU64::new(used),
        });
        self.caller_owns = true;
        self
    }

    /// Applies interception rules: `guest_path` is where the guest mounts this root, and a
    /// blocked operation fails with `EPERM`.
    pub fn with_rules(mut self, guest_path: &str, rules: Vec<BlockRule>) -> Self {
        self.guest_path = guest_path.trim_end_matches('/').to_string();
        self.rules = rules;
        self
    }

    /// Holds at most `n` nodes (files and directories the guest has looked up and not
    /// forgotten); past it lookups fail with `ENFILE`. Kept between 16 Ki and [`MAX_NODES`].
    pub fn with_node_limit(mut self, n: usize) -> Self {
        self.max_nodes = n.clamp(1 << 14, MAX_NODES);
        self
    }

    /// Shows every file as owned by `owner`'s ids; `chown` to those ids succeeds without
    /// touching the host, `chown` to others is refused (`EPERM`), since the view cannot hold them.
    pub fn with_owner(mut self, owner: Owner) -> Self {
        self.owner = owner;
        self
    }

    /// Reports every operation that succeeds to `events`.
    pub fn with_events(mut self, events: tokio::sync::broadcast::Sender<crate::FileEvent>) -> Self {
        self.events = Some(events);
        self
    }

    fn tables(&self) -> MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves consistent-enough tables; keep serving.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers one request; never panics on guest input.
    pub fn handle(&self, op: VfsOp) -> VfsReply {
        self.handle_with(op, None)
    }

    /// Like [`MountFs::handle`], with `payload` carrying the data of [`VfsOp::Read`] and
    /// [`VfsOp::Write`] (which fail with `EIO` without one).
    pub fn handle_with(&self, op: VfsOp, payload: Option<&mut dyn Payload>) -> VfsReply {
        self.handle_from(op, payload, None)
    }

    /// Like [`MountFs::handle_with`] for a request of guest user `caller` (`(uid, gid)`), who
    /// owns what it creates on a [`MountFs::private`] mount.
    pub fn handle_from(
        &self,
        op: VfsOp,
        payload: Option<&mut dyn Payload>,
        caller: Option<(u32, u32)>,
    ) -> VfsReply {
        // What the operation is and which guest paths it names, for rules and events, worked
        // out once and before it runs: a release or rename changes what names lead where.
        let (kinds, paths) = if self.rules.is_empty() && self.events.is_none() {
            (Vec::new(), Vec::new())
        } else {
            let kinds = rules::kinds(&op);
            let paths = if kinds.is_empty() {
                Vec::new()
            } else {
                self.guest_paths(&op)
            };
            (kinds, paths)
        };
        if self.blocks(&kinds, &paths) {
            if let VfsOp::Release { fh } = op {
                // The kernel ignores release errors; the handle must not leak.
                self.drop_handle(fh);
            }
            return VfsReply::Err(libc::EPERM);
        }
        let op = match self.owned(op) {
            Ok(op) => op,
            Err(e) => return VfsReply::Err(e),
        };
        // The handle an event about this operation can take the file's attributes from.
        let fh = match (&self.events, &op) {
            (
                Some(_),
                VfsOp::Read { fh, .. }
                | VfsOp::Write { fh, .. }
                | VfsOp::Fsync { fh, .. }
                | VfsOp::Fallocate { fh, .. },
            ) => Some(*fh),
            _ => None,
        };
        let mut reply = match self.dispatch(op, payload, caller) {
            Ok(r) => r,
            Err(e) => VfsReply::Err(e.raw_os_error().unwrap_or(libc::EIO)),
        };
        match &mut reply {
            // What the guest's kernel receives attributes from (an open's reply carries none).
            VfsReply::Entry(a) | VfsReply::Attr(a) | VfsReply::Created(a, _) => {
                self.owner.apply(a);
                self.told(&[*a]);
            }
            VfsReply::OpenedFile(_, a) => self.owner.apply(a),
            VfsReply::EntriesPlus(entries) => {
                for a in entries.iter_mut().filter_map(|e| e.attr.as_mut()) {
                    self.owner.apply(a);
                }
                let told: Vec<VfsAttr> = entries.iter().filter_map(|e| e.attr).collect();
                self.told(&told);
            }
            _ => {}
        }
        if let (Some(tx), Some(kind)) = (&self.events, kinds.first()) {
            if !matches!(reply, VfsReply::Err(_)) {
                let path = paths.into_iter().next();
                let mut event = self.event(kind, path, &reply);
                if let Some(st) = fh.and_then(|fh| self.with_file(fh, sys::fstat).ok()) {
                    // Reads and writes report the file's mode and owner too, as documented.
                    let mut a = attr(0, &st);
                    self.owner.apply(&mut a);
                    (event.mode, event.uid, event.gid) = (a.mode, a.uid, a.gid);
                    if event.size == 0 {
                        event.size = a.size;
                    }
                }
                let _ = tx.send(event);
            }
        }
        reply
    }

    /// Remembers what the guest was just told about these nodes.
    fn told(&self, attrs: &[VfsAttr]) {
        let mut t = self.tables();
        for a in attrs {
            if let Some(n) = t.nodes.get_mut(&a.ino) {
                n.seen = Some((a.size, a.mtime));
                if n.refused.take().is_some() {
                    n.retrying = true;
                }
            }
        }
    }

    /// Whether an open of `node` (whose file now has `st`) should make the guest look again
    /// ([`RETRY_WINDOW`]); a refusal is remembered.
    fn refuse_stale(&self, node: u64, st: &libc::stat) -> bool {
        let mut t = self.tables();
        let Some(n) = t.nodes.get_mut(&node) else {
            return false;
        };
        if std::mem::take(&mut n.retrying) {
            return false;
        }
        let now = attr(node, st);
        let changed = n.seen.is_some_and(|s| s != (now.size, now.mtime));
        if !changed || n.refused.is_some_and(|at| at.elapsed() < RETRY_WINDOW) {
            return false;
        }
        n.refused = Some(Instant::now());
        true
    }

    /// Records the guest's own change to the file behind `fd`: its kernel updated its idea of
    /// the file itself, so the next open must not take it for a host change.
    fn changed_by_guest(&self, fd: BorrowedFd<'_>) {
        let Ok(st) = sys::fstat(fd) else {
            return;
        };
        let node = self.tables().by_key.get(&key(&st)).copied();
        if let Some(node) = node {
            self.told(&[attr(node, &st)]);
        }
    }

    /// Whether the guest may give the file `st` describes these owners. On a mount whose files
    /// belong to the sandbox alone, any. On a shared host directory only the file's own ids and
    /// those of the mount's root: a guest (root in its VM, and served by a root supervisor) must
    /// not hand host files to arbitrary host users or groups. A mount that needs other owners
    /// says so with `owner_uid`/`owner_gid`, which map instead.
    fn may_chown(&self, st: &libc::stat, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
        if self.caller_owns {
            return Ok(());
        }
        let uid_ok = uid.is_none_or(|u| u == st.st_uid || u == self.root_ids.0);
        let gid_ok = gid.is_none_or(|g| g == st.st_gid || g == self.root_ids.1);
        if uid_ok && gid_ok {
            Ok(())
        } else {
            Err(err(libc::EPERM))
        }
    }

    /// Applies the ownership override to a `chown`.
    fn owned(&self, mut op: VfsOp) -> Result<VfsOp, i32> {
        if let VfsOp::Setattr { uid, gid, .. } = &mut op {
            for (asked, fixed) in [(uid, self.owner.uid), (gid, self.owner.gid)] {
                match (*asked, fixed) {
                    (Some(a), Some(f)) if a == f => *asked = None,
                    (Some(_), Some(_)) => return Err(libc::EPERM),
                    _ => {}
                }
            }
        }
        Ok(op)
    }

    /// The event for a completed operation of kind `op` on `rel`.
    fn event(&self, op: &str, path: Option<String>, reply: &VfsReply) -> crate::FileEvent {
        let path = path.unwrap_or_else(|| self.guest_path.clone());
        let (size, mode, uid, gid) = match reply {
            VfsReply::Entry(a)
            | VfsReply::Attr(a)
            | VfsReply::Created(a, _)
            | VfsReply::OpenedFile(_, a) => (a.size, a.mode, a.uid, a.gid),
            VfsReply::Written(n) | VfsReply::Transferred(n) => (u64::from(*n), 0, 0, 0),
            VfsReply::Data(d) => (d.len() as u64, 0, 0, 0),
            _ => (0, 0, 0, 0),
        };
        crate::FileEvent {
            op: op.to_string(),
            path,
            size,
            mode,
            uid,
            gid,
            timestamp_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    fn drop_handle(&self, fh: u64) {
        let mut t = self.tables();
        t.handles.remove(&fh);
        t.handle_paths.remove(&fh);
    }

    /// The guest paths an operation touches, relative to the mount.
    fn op_paths(&self, op: &VfsOp) -> Vec<PathBuf> {
        let t = self.tables();
        let names = |id: &u64| t.nodes.get(id).map(|n| n.paths.clone()).unwrap_or_default();
        let under = |id: &u64, name: &[u8]| -> Vec<PathBuf> {
            names(id)
                .into_iter()
                .map(|p| join(&p, Path::new(OsStr::from_bytes(name))))
                .collect()
        };
        let of_fh = |fh: &u64| t.handle_paths.get(fh).cloned().into_iter().collect();
        match op {
            VfsOp::Lookup { parent, name }
            | VfsOp::Mkdir { parent, name, .. }
            | VfsOp::Unlink { parent, name }
            | VfsOp::Rmdir { parent, name }
            | VfsOp::Symlink { parent, name, .. }
            | VfsOp::Mknod { parent, name, .. }
            | VfsOp::Create { parent, name, .. } => under(parent, name),
            VfsOp::Rename {
                parent,
                name,
                new_parent,
                new_name,
                ..
            } => {
                let mut v = under(parent, name);
                v.extend(under(new_parent, new_name));
                v
            }
            VfsOp::Link {
                node,
                new_parent,
                new_name,
            } => {
                let mut v = names(node);
                v.extend(under(new_parent, new_name));
                v
            }
            VfsOp::Getattr { node, .. }
            | VfsOp::Setattr { node, .. }
            | VfsOp::Readlink { node }
            | VfsOp::Open { node, .. }
            | VfsOp::Opendir { node } => names(node),
            VfsOp::Read { fh, .. }
            | VfsOp::Write { fh, .. }
            | VfsOp::Release { fh }
            | VfsOp::Fsync { fh, .. }
            | VfsOp::Readdir { fh, .. }
            | VfsOp::ReaddirPlus { fh, .. }
            | VfsOp::Fallocate { fh, .. }
            | VfsOp::Lseek { fh, .. } => of_fh(fh),
            VfsOp::Statfs | VfsOp::Syncfs => vec![PathBuf::new()],
            VfsOp::Forget { .. } => Vec::new(),
        }
    }

    /// The full guest paths an operation touches.
    fn guest_paths(&self, op: &VfsOp) -> Vec<String> {
        self.op_paths(op)
            .iter()
            .map(|rel| {
                if rel.as_os_str().is_empty() {
                    self.guest_path.clone()
                } else {
                    format!("{}/{}", self.guest_path, rel.to_string_lossy())
                }
            })
            .collect()
    }

    /// Whether a rule refuses an operation of `kinds` on any of `paths`.
    fn blocks(&self, kinds: &[&str], paths: &[String]) -> bool {
        paths.iter().any(|p| {
            self.rules
                .iter()
                .any(|r| kinds.iter().any(|k| rules::blocks(r, k, p)))
        })
    }

    fn blocked(&self, op: &VfsOp) -> bool {
        if self.rules.is_empty() {
            return false;
        }
        self.blocks(&rules::kinds(op), &self.guest_paths(op))
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(err(libc::EROFS))
        } else {
            Ok(())
        }
    }

    /// The names and identity of a node.
    fn node(&self, id: u64) -> io::Result<(Vec<PathBuf>, Key)> {
        let t = self.tables();
        let n = t.nodes.get(&id).ok_or_else(|| err(libc::ESTALE))?;
        Ok((n.paths.clone(), n.key))
    }

    /// The first remembered name of a node that still leads to its inode, with an fd opened
    /// with `flags` (`O_PATH`, maybe `O_DIRECTORY`) and its stat. Names that no longer do are
    /// forgotten.
    fn locate(&self, id: u64, flags: libc::c_int) -> io::Result<(PathBuf, OwnedFd, libc::stat)> {
        let (paths, k) = self.node(id)?;
        let mut stale = Vec::new();
        let mut found = None;
        for p in paths {
            let hit = self
                .open_path(&p, flags)
                .and_then(|fd| sys::fstat(fd.as_fd()).map(|st| (fd, st)));
            match hit {
                Ok((fd, st)) if key(&st) == k => {
                    found = Some((p, fd, st));
                    break;
                }
                _ => stale.push(p),
            }
        }
        if !stale.is_empty() {
            let mut t = self.tables();
            if let Some(n) = t.nodes.get_mut(&id) {
                // Keep at least one name so a later rename of a parent can still fix it up.
                n.paths.retain(|p| !stale.contains(p));
                if n.paths.is_empty() {
                    n.paths.push(stale.swap_remove(0));
                }
            }
        }
        // ESTALE, not ENOENT: the guest's kernel then looks the name up again and retries,
        // finding whatever the host put there.
        found.ok_or_else(|| err(libc::ESTALE))
    }

    /// `O_PATH` fd of a relative path (the root for an empty one).
    fn open_path(&self, rel: &Path, flags: libc::c_int) -> io::Result<OwnedFd> {
        if rel.as_os_str().is_empty() {
            return sys::dup(self.root.as_fd());
        }
        sys::open_beneath(self.root.as_fd(), &c_path(rel)?, flags)
    }

    /// `O_PATH` fd and stat of a node, checked to still be the same inode.
    fn node_fd(&self, id: u64) -> io::Result<(OwnedFd, libc::stat)> {
        let (_, fd, st) = self.locate(id, libc::O_PATH)?;
        Ok((fd, st))
    }

    /// The directory fd and relative path of a parent node.
    fn dir(&self, parent: u64) -> io::Result<(OwnedFd, PathBuf)> {
        if !self.root_is_dir {
            return Err(err(libc::ENOTDIR));
        }
        let (path, fd, _) = self.locate(parent, libc::O_PATH | libc::O_DIRECTORY)?;
        Ok((fd, path))
    }

    /// Records a lookup reference to the inode at `path` and returns its node id.
    fn remember(&self, path: PathBuf, st: &libc::stat) -> io::Result<u64> {
        let mut t = self.tables();
        let k = key(st);
        if let Some(&id) = t.by_key.get(&k) {
            if let Some(n) = t.nodes.get_mut(&id) {
                n.refs = n.refs.saturating_add(1);
                if id != ROOT_NODE {
                    n.paths.retain(|p| p != &path);
                    n.paths.insert(0, path);
                    n.paths.truncate(MAX_PATHS);
                }
                return Ok(id);
            }
        }
        if t.nodes.len() >= self.max_nodes {
            return Err(err(libc::ENFILE));
        }
        let mut id = st.st_ino;
        if id <= ROOT_NODE || id >= SYNTHETIC_BASE || t.nodes.contains_key(&id) {
            loop {
                id = t.next_synthetic;
                t.next_synthetic += 1;
                if !t.nodes.contains_key(&id) {
                    break;
                }
            }
        }
        t.nodes.insert(
            id,
            Node {
                paths: vec![path],
                key: k,
                refs: 1,
                seen: None,
                refused: None,
                retrying: false,
            },
        );
        t.by_key.insert(k, id);
        Ok(id)
    }

    fn forget(&self, nodes: &[(u64, u64)]) {
        let mut t = self.tables();
        for &(id, n) in nodes {
            if id == ROOT_NODE {
                continue;
            }
            let gone = match t.nodes.get_mut(&id) {
                Some(node) => {
                    node.refs = node.refs.saturating_sub(n);
                    (node.refs == 0).then_some(node.key)
                }
                None => None,
            };
            if let Some(k) = gone {
                t.nodes.remove(&id);
                if t.by_key.get(&k) == Some(&id) {
                    t.by_key.remove(&k);
                }
            }
        }
    }

    /// Looks up `name` in the directory `dir` and answers with its entry.
    fn entry(&self, dir: BorrowedFd<'_>, dir_path: &Path, name: &CStr) -> io::Result<VfsReply> {
        let st = sys::stat_at(dir, name)?;
        let id = self.remember(dir_path.join(OsStr::from_bytes(name.to_bytes())), &st)?;
        Ok(VfsReply::Entry(attr(id, &st)))
    }

    /// Up to [`MAX_ENTRIES`] entries of directory handle `fh` after `offset`, as many as fit in
    /// `budget` bytes at `cost(name length)` each, each passed to `each` with the open directory
    /// (locked: seeking and reading must not interleave) and which directory it is. Entries that
    /// do not fit are not passed to `each` at all (a READDIRPLUS entry counts a lookup there).
    fn dir_page<T>(
        &self,
        fh: u64,
        offset: u64,
        budget: u32,
        cost: fn(usize) -> usize,
        mut each: impl FnMut(BorrowedFd<'_>, &DirOf, VfsDirEntry) -> T,
    ) -> io::Result<Vec<T>> {
        let h = self.get_handle(fh)?;
        let Handle::Dir(d, of) = &*h else {
            return Err(err(libc::ENOTDIR));
        };
        let offset = i64::try_from(offset).map_err(|_| err(libc::EINVAL))?;
        let d = d.lock().unwrap_or_else(|p| p.into_inner());
        let raw = sys::read_dir_at(d.as_fd(), offset, MAX_ENTRIES)?;
        let mut left = budget as usize;
        Ok(raw
            .into_iter()
            .take_while(|(_, _, _, name)| {
                let c = cost(name.len());
                let fits = c <= left;
                left = left.saturating_sub(c);
                fits
            })
            .map(|(ino, off, dtype, name)| {
                let entry = VfsDirEntry {
                    ino,
                    offset: off as u64,
                    kind: u32::from(dtype) << 12,
                    name,
                };
                each(d.as_fd(), of, entry)
            })
            .collect())
    }

    fn add_handle(&self, h: Handle, path: PathBuf) -> io::Result<u64> {
        let mut t = self.tables();
        if t.handles.len() >= MAX_HANDLES {
            return Err(err(libc::EMFILE));
        }
        let fh = t.next_fh;
        t.next_fh += 1;
        t.handles.insert(fh, Arc::new(h));
        if !self.rules.is_empty() || self.events.is_some() {
            t.handle_paths.insert(fh, path);
        }
        Ok(fh)
    }

    fn get_handle(&self, fh: u64) -> io::Result<Arc<Handle>> {
        self.tables()
            .handles
            .get(&fh)
            .cloned()
            .ok_or_else(|| err(libc::EBADF))
    }

    fn file(&self, fh: u64) -> io::Result<Arc<Handle>> {
        let h = self.get_handle(fh)?;
        match &*h {
            Handle::File(_) => Ok(h),
            Handle::Dir(..) => Err(err(libc::EISDIR)),
        }
    }

    /// Runs `f` on the open file behind handle `fh` (`EISDIR` for a directory handle).
    fn with_file<R>(
        &self,
        fh: u64,
        f: impl FnOnce(BorrowedFd<'_>) -> io::Result<R>,
    ) -> io::Result<R> {
        match &*self.get_handle(fh)? {
            Handle::File(file) => f(file.as_fd()),
            Handle::Dir(..) => Err(err(libc::EISDIR)),
        }
    }

    /// Charges a new entry named `name` in `dir` made by `make`, and gives it to `caller` on a
    /// private mount. The charge is returned when `make` fails.
    fn new_entry(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        caller: Option<(u32, u32)>,
        make: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        if let Some(q) = &self.quota {
            q.reserve(ENTRY_COST)?;
        }
        if let Err(e) = make() {
            if let Some(q) = &self.quota {
                q.settle(-(ENTRY_COST as i64));
            }
            return Err(e);
        }
        self.give_to(dir, name, caller);
        Ok(())
    }

    /// On a private mount, makes `caller` the owner of a new entry. A server that may not
    /// change owners (not root) leaves it as it is.
    fn give_to(&self, dir: BorrowedFd<'_>, name: &CStr, caller: Option<(u32, u32)>) {
        if let (true, Some((uid, gid))) = (self.caller_owns, caller) {
            let _ = sys::chown_at(dir, name, uid, gid);
        }
    }

    /// What removing `name` from `dir` gives back to the quota: its entry, and its blocks
    /// when this was its last name.
    fn released_by_removal(&self, dir: BorrowedFd<'_>, name: &CStr) -> i64 {
        if self.quota.is_none() {
            return 0;
        }
        match sys::stat_at(dir, name) {
            Ok(st) if st.st_nlink <= 1 || is_type(&st, libc::S_IFDIR) => {
                ENTRY_COST as i64 + allocated(&st)
            }
            Ok(_) => ENTRY_COST as i64,
            Err(_) => 0,
        }
    }

    /// Runs `change` on an open file, charging the growth of its allocated blocks: `reserve`
    /// bytes up front (refused with `ENOSPC` past the quota), settled to what it really took.
    fn charged<R>(
        &self,
        f: BorrowedFd<'_>,
        reserve: impl FnOnce(&libc::stat) -> u64,
        change: impl FnOnce() -> io::Result<R>,
    ) -> io::Result<R> {
        let Some(q) = &self.quota else {
            return change();
        };
        let before = sys::fstat(f)?;
        let reserved = reserve(&before);
        q.reserve(reserved)?;
        let r = change();
        let after = sys::fstat(f)
            .map(|st| allocated(&st))
            .unwrap_or(allocated(&before));
        q.settle(after - allocated(&before) - reserved as i64);
        r
    }

    fn dispatch(
        &self,
        op: VfsOp,
        payload: Option<&mut dyn Payload>,
        caller: Option<(u32, u32)>,
    ) -> io::Result<VfsReply> {
        match op {
            VfsOp::Lookup { parent, name } => {
                let name = sys::name(&name)?;
                let (dir, path) = self.dir(parent)?;
                self.entry(dir.as_fd(), &path, &name)
            }
            VfsOp::Forget { nodes } => {
                self.forget(&nodes);
                Ok(VfsReply::Ok)
            }
            VfsOp::Getattr { node, fh } => {
                if let Some(fh) = fh {
                    if let Ok(h) = self.get_handle(fh) {
                        let st = match &*h {
                            Handle::File(f) => sys::fstat(f.as_fd())?,
                            Handle::Dir(d, _) => {
                                sys::fstat(d.lock().unwrap_or_else(|p| p.into_inner()).as_fd())?
                            }
                        };
                        return Ok(VfsReply::Attr(attr(node, &st)));
                    }
                }
                let (_, st) = self.node_fd(node)?;
                Ok(VfsReply::Attr(attr(node, &st)))
            }
            VfsOp::Setattr {
                node,
                fh,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            } => {
                self.writable()?;
                let (fd, st) = self.node_fd(node)?;
                let symlink = is_type(&st, libc::S_IFLNK);
                if let Some(mode) = mode {
                    if symlink {
                        return Err(err(libc::EOPNOTSUPP));
                    }
                    sys::chmod_fd(fd.as_fd(), allowed_mode(mode))?;
                }
                if uid.is_some() || gid.is_some() {
                    self.may_chown(&st, uid, gid)?;
                    sys::chown_fd(fd.as_fd(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
                }
                if let Some(size) = size {
                    drop_set_id(fd.as_fd(), &sys::fstat(fd.as_fd())?)?;
                    // Growing a file makes a hole; only blocks count against a quota.
                    let truncate =
                        |f: BorrowedFd<'_>| self.charged(f, |_| 0, || sys::truncate(f, size));
                    match fh.and_then(|fh| self.file(fh).ok()) {
                        Some(h) => {
                            let Handle::File(f) = &*h else {
                                return Err(err(libc::EISDIR));
                            };
                            truncate(f.as_fd())?;
                        }
                        None => {
                            if !is_type(&st, libc::S_IFREG) {
                                return Err(err(libc::EINVAL));
                            }
                            let f = sys::reopen(fd.as_fd(), libc::O_WRONLY)?;
                            truncate(f.as_fd())?;
                        }
                    }
                }
                if atime.is_some() || mtime.is_some() {
                    if symlink {
                        return Err(err(libc::EOPNOTSUPP));
                    }
                    let conv = |t: Option<VfsTime>| match t {
                        None => libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_OMIT,
                        },
                        Some(VfsTime::Now) => libc::timespec {
                            tv_sec: 0,
                            tv_nsec: libc::UTIME_NOW,
                        },
                        Some(VfsTime::At(s, n)) => libc::timespec {
                            tv_sec: s,
                            tv_nsec: i64::from(n.min(999_999_999)),
                        },
                    };
                    sys::utimes_fd(fd.as_fd(), &[conv(atime), conv(mtime)])?;
                }
                Ok(VfsReply::Attr(attr(node, &sys::fstat(fd.as_fd())?)))
            }
            VfsOp::Readlink { node } => {
                let (fd, st) = self.node_fd(node)?;
                if !is_type(&st, libc::S_IFLNK) {
                    return Err(err(libc::EINVAL));
                }
                Ok(VfsReply::Data(sys::readlink(fd.as_fd())?))
            }
            VfsOp::Mkdir { parent, name, mode } => {
                self.writable()?;
                let name = sys::name(&name)?;
                let (dir, path) = self.dir(parent)?;
                self.new_entry(dir.as_fd(), &name, caller, || {
                    sys::mkdir_at(dir.as_fd(), &name, allowed_mode(mode))
                })?;
                self.entry(dir.as_fd(), &path, &name)
            }
            VfsOp::Unlink { parent, name } => self.remove(parent, &name, false),
            VfsOp::Rmdir { parent, name } => self.remove(parent, &name, true),
            VfsOp::Symlink {
                parent,
                name,
                target,
            } => {
                self.writable()?;
                let name = sys::name(&name)?;
                if target.is_empty() || target.len() > MAX_LINK {
                    return Err(err(libc::ENAMETOOLONG));
                }
                let target = CString::new(target).map_err(|_| err(libc::EINVAL))?;
                let (dir, path) = self.dir(parent)?;
                self.new_entry(dir.as_fd(), &name, caller, || {
                    sys::symlink_at(&target, dir.as_fd(), &name)
                })?;
                self.entry(dir.as_fd(), &path, &name)
            }
            VfsOp::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => {
                self.writable()?;
                let allowed = libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE;
                if flags & !allowed != 0 {
                    return Err(err(libc::EINVAL));
                }
                let name = sys::name(&name)?;
                let new_name = sys::name(&new_name)?;
                let (from, from_path) = self.dir(parent)?;
                let (to, to_path) = self.dir(new_parent)?;
                // A replaced target gives its space back.
                let freed = if flags & libc::RENAME_EXCHANGE == 0 {
                    self.released_by_removal(to.as_fd(), &new_name)
                } else {
                    0
                };
                sys::rename_at(from.as_fd(), &name, to.as_fd(), &new_name, flags)?;
                if let Some(q) = &self.quota {
                    q.settle(-freed);
                }
                let old = from_path.join(OsStr::from_bytes(name.to_bytes()));
                let new = to_path.join(OsStr::from_bytes(new_name.to_bytes()));
                self.renamed(&old, &new, flags & libc::RENAME_EXCHANGE != 0);
                Ok(VfsReply::Ok)
            }
            VfsOp::Link {
                node,
                new_parent,
                new_name,
            } => {
                self.writable()?;
                let new_name = sys::name(&new_name)?;
                let (path, _, st) = self.locate(node, libc::O_PATH)?;
                let (Some(src_parent), Some(src_name)) = (path.parent(), path.file_name()) else {
                    return Err(err(libc::EPERM));
                };
                let src_dir = self.open_path(src_parent, libc::O_PATH | libc::O_DIRECTORY)?;
                let src_name = CString::new(src_name.as_bytes()).map_err(|_| err(libc::EINVAL))?;
                if key(&sys::stat_at(src_dir.as_fd(), &src_name)?) != key(&st) {
                    return Err(err(libc::ENOENT));
                }
                let (to, to_path) = self.dir(new_parent)?;
                // A new name for the same inode: charged, but its owner stays.
                self.new_entry(to.as_fd(), &new_name, None, || {
                    sys::link_at(src_dir.as_fd(), &src_name, to.as_fd(), &new_name)
                })?;
                self.entry(to.as_fd(), &to_path, &new_name)
            }
            VfsOp::Open { node, flags } => {
                let acc = flags & libc::O_ACCMODE;
                if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                    self.writable()?;
                }
                let (path, fd, st) = self.locate(node, libc::O_PATH)?;
                if is_type(&st, libc::S_IFDIR) {
                    return Err(err(libc::EISDIR));
                }
                if !is_type(&st, libc::S_IFREG) {
                    // FIFOs, devices and sockets on the host are never opened for the guest.
                    return Err(err(libc::EACCES));
                }
                // A truncating open discards what the guest might have cached anyway.
                if flags & libc::O_TRUNC == 0 && self.refuse_stale(node, &st) {
                    return Err(err(libc::ESTALE));
                }
                let keep = libc::O_ACCMODE
                    | libc::O_APPEND
                    | libc::O_TRUNC
                    | libc::O_SYNC
                    | libc::O_DSYNC
                    | libc::O_NONBLOCK;
                if acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
                    drop_set_id(fd.as_fd(), &st)?;
                }
                let f = sys::reopen(fd.as_fd(), flags & keep)?;
                if flags & libc::O_TRUNC != 0 {
                    self.changed_by_guest(f.as_fd());
                    self.truncated(&st, f.as_fd());
                }
                let now = attr(node, &sys::fstat(f.as_fd())?);
                Ok(VfsReply::OpenedFile(
                    self.add_handle(Handle::File(f), path)?,
                    now,
                ))
            }
            VfsOp::Create {
                parent,
                name,
                mode,
                flags,
            } => {
                self.writable()?;
                let name = sys::name(&name)?;
                let (dir, path) = self.dir(parent)?;
                let keep = libc::O_ACCMODE
                    | libc::O_APPEND
                    | libc::O_TRUNC
                    | libc::O_SYNC
                    | libc::O_DSYNC
                    | libc::O_EXCL;
                // O_EXCL first: an existing name might be a FIFO or device, which must not be
                // opened; it gets checked like any open instead.
                let mut created = None;
                let made = self.new_entry(dir.as_fd(), &name, caller, || {
                    created = Some(sys::open_at(
                        dir.as_fd(),
                        &name,
                        (flags & keep) | libc::O_CREAT | libc::O_EXCL,
                        allowed_mode(mode),
                    )?);
                    Ok(())
                });
                let opened = match (made, created) {
                    (Ok(()), Some(f)) => Ok(f),
                    (Err(e), _) => Err(e),
                    (Ok(()), None) => Err(err(libc::EIO)),
                };
                let f = match opened {
                    Ok(f) => f,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 =>
                    {
                        let st = sys::stat_at(dir.as_fd(), &name)?;
                        if is_type(&st, libc::S_IFDIR) {
                            return Err(err(libc::EISDIR));
                        }
                        if !is_type(&st, libc::S_IFREG) {
                            return Err(err(libc::EACCES));
                        }
                        let p = sys::open_at(dir.as_fd(), &name, libc::O_PATH, 0)?;
                        if key(&sys::fstat(p.as_fd())?) != key(&st) {
                            return Err(err(libc::EAGAIN));
                        }
                        drop_set_id(p.as_fd(), &st)?;
                        let f = sys::reopen(p.as_fd(), flags & keep & !libc::O_EXCL)?;
                        if flags & libc::O_TRUNC != 0 {
                            self.truncated(&st, f.as_fd());
                        }
                        f
                    }
                    Err(e) => return Err(e),
                };
                let st = sys::fstat(f.as_fd())?;
                let path = path.join(OsStr::from_bytes(name.to_bytes()));
                let id = self.remember(path.clone(), &st)?;
                let fh = match self.add_handle(Handle::File(f), path) {
                    Ok(fh) => fh,
                    Err(e) => {
                        self.forget(&[(id, 1)]);
                        return Err(e);
                    }
                };
                Ok(VfsReply::Created(attr(id, &st), fh))
            }
            VfsOp::Read { fh, offset, size } => {
                let payload = payload.ok_or_else(|| err(libc::EIO))?;
                let n = self.with_file(fh, |f| {
                    payload.read_from(f, offset, size.min(MAX_IO) as usize)
                })?;
                Ok(VfsReply::Transferred(n as u32))
            }
            VfsOp::Write { fh, offset } => {
                self.writable()?;
                let payload = payload.ok_or_else(|| err(libc::EIO))?;
                if payload.pending() > MAX_IO as usize {
                    return Err(err(libc::EINVAL));
                }
                let n = self.with_file(fh, |f| {
                    // The bit may have been set on the host since the open.
                    drop_set_id(f, &sys::fstat(f)?)?;
                    let len = payload.pending() as u64;
                    let growth = |st: &libc::stat| {
                        offset
                            .saturating_add(len)
                            .saturating_sub(st.st_size.max(0) as u64)
                    };
                    let n = self.charged(f, growth, || payload.write_to(f, offset))?;
                    self.changed_by_guest(f);
                    Ok(n)
                })?;
                Ok(VfsReply::Written(n as u32))
            }
            VfsOp::Release { fh } => {
                self.drop_handle(fh);
                Ok(VfsReply::Ok)
            }
            VfsOp::Fsync { fh, datasync } => {
                let h = self.get_handle(fh)?;
                match &*h {
                    Handle::File(f) => sys::fsync(f.as_fd(), datasync)?,
                    Handle::Dir(d, _) => sys::fsync(
                        d.lock().unwrap_or_else(|p| p.into_inner()).as_fd(),
                        datasync,
                    )?,
                }
                Ok(VfsReply::Ok)
            }
            VfsOp::Opendir { node } => {
                let (path, fd, st) = self.locate(node, libc::O_PATH)?;
                if !is_type(&st, libc::S_IFDIR) {
                    return Err(err(libc::ENOTDIR));
                }
                let d = sys::reopen(fd.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)?;
                let of = DirOf {
                    node,
                    path: path.clone(),
                };
                Ok(VfsReply::Opened(
                    self.add_handle(Handle::Dir(Mutex::new(d), of), path)?,
                ))
            }
            VfsOp::ReaddirPlus { fh, offset, size } => {
                let entries =
                    self.dir_page(fh, offset, size, direntplus_size, |dir, of, entry| {
                        let dots = entry.name == b"." || entry.name == b"..";
                        let lookup = VfsOp::Lookup {
                            parent: of.node,
                            name: entry.name.clone(),
                        };
                        // An entry a stat rule hides, or one gone since it was listed, comes bare.
                        let attr = match CString::new(entry.name.as_slice()) {
                            Ok(c) if !dots && !self.blocked(&lookup) => {
                                match self.entry(dir, &of.path, &c) {
                                    Ok(VfsReply::Entry(a)) => Some(a),
                                    _ => None,
                                }
                            }
                            _ => None,
                        };
                        VfsDirEntryPlus { entry, attr }
                    })?;
                Ok(VfsReply::EntriesPlus(entries))
            }
            VfsOp::Readdir { fh, offset, size } => Ok(VfsReply::Entries(self.dir_page(
                fh,
                offset,
                size,
                dirent_size,
                |_, _, entry| entry,
            )?)),
            VfsOp::Mknod { parent, name, mode } => {
                self.writable()?;
                let name = sys::name(&name)?;
                // FIFOs and sockets are only names on the host (the guest's kernel runs them; the
                // host never opens one); a device node would be a real device on the host.
                let kind = mode & libc::S_IFMT;
                if ![libc::S_IFREG, libc::S_IFIFO, libc::S_IFSOCK].contains(&kind) {
                    return Err(err(libc::EPERM));
                }
                let (dir, path) = self.dir(parent)?;
                self.new_entry(dir.as_fd(), &name, caller, || {
                    sys::mknod_at(dir.as_fd(), &name, kind | allowed_mode(mode))
                })?;
                self.entry(dir.as_fd(), &path, &name)
            }
            VfsOp::Fallocate {
                fh,
                mode,
                offset,
                length,
            } => {
                self.writable()?;
                self.with_file(fh, |f| {
                    drop_set_id(f, &sys::fstat(f)?)?;
                    self.charged(f, |_| length, || sys::fallocate(f, mode, offset, length))?;
                    self.changed_by_guest(f);
                    Ok(VfsReply::Ok)
                })
            }
            VfsOp::Lseek { fh, offset, whence } => {
                let whence = match whence as i32 {
                    w @ (libc::SEEK_DATA | libc::SEEK_HOLE) => w,
                    _ => return Err(err(libc::EINVAL)),
                };
                self.with_file(fh, |f| Ok(VfsReply::Offset(sys::lseek(f, offset, whence)?)))
            }
            VfsOp::Syncfs => {
                // syncfs refuses O_PATH descriptors.
                sys::syncfs(sys::reopen(self.root.as_fd(), libc::O_RDONLY)?.as_fd())?;
                Ok(VfsReply::Ok)
            }
            VfsOp::Statfs => {
                let s = sys::statfs(self.root.as_fd())?;
                let mut out = VfsStatfs {
                    blocks: s.f_blocks,
                    bfree: s.f_bfree,
                    bavail: s.f_bavail,
                    files: s.f_files,
                    ffree: s.f_ffree,
                    bsize: s.f_bsize as u32,
                    namelen: s.f_namelen as u32,
                    frsize: s.f_frsize as u32,
                };
                // `df` in the guest shows the quota, not the host's disk.
                if let Some(q) = &self.quota {
                    let bsize = u64::from(out.frsize.max(1));
                    let used = q.used.load(std::sync::atomic::Ordering::Relaxed);
                    out.blocks = q.limit / bsize;
                    out.bfree = q.limit.saturating_sub(used) / bsize;
                    out.bavail = out.bfree;
                    out.files = q.limit / ENTRY_COST;
                    out.ffree = q.limit.saturating_sub(used) / ENTRY_COST;
                }
                Ok(VfsReply::Statfs(out))
            }
        }
    }

    /// Removes `name` (a directory when `dir_entry`) from `parent`, returning its space.
    fn remove(&self, parent: u64, name: &[u8], dir_entry: bool) -> io::Result<VfsReply> {
        self.writable()?;
        let (dir, _) = self.dir(parent)?;
        let name = sys::name(name)?;
        let freed = self.released_by_removal(dir.as_fd(), &name);
        sys::unlink_at(dir.as_fd(), &name, dir_entry)?;
        if let Some(q) = &self.quota {
            q.settle(-freed);
        }
        Ok(VfsReply::Ok)
    }

    /// Settles the quota after a truncating open of a file that had `before`.
    fn truncated(&self, before: &libc::stat, f: BorrowedFd<'_>) {
        if let (Some(q), Ok(after)) = (&self.quota, sys::fstat(f)) {
            q.settle(allocated(&after) - allocated(before));
        }
    }

    /// Keeps remembered paths in step with a rename (of a whole subtree for a directory).
    fn renamed(&self, old: &Path, new: &Path, exchange: bool) {
        let mut t = self.tables();
        for n in t.nodes.values_mut() {
            for p in n.paths.iter_mut() {
                if p.as_os_str().is_empty() {
                    continue;
                }
                if let Ok(rest) = p.strip_prefix(old) {
                    *p = join(new, rest);
                } else if exchange {
                    if let Ok(rest) = p.strip_prefix(new) {
                        *p = join(old, rest);
                    }
                }
            }
        }
    }
}
