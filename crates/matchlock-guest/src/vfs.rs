//! Workspace mounts: a FUSE filesystem per mount whose every request is forwarded to the host's
//! VFS server (`matchlock-vfs`) over the VFS port ([`matchlock_proto::vfs`]).
//!
//! `fuser` parses the kernel's FUSE protocol; it runs from a `/dev/fuse` fd we mounted ourselves
//! (PID 1 is root and needs no `fusermount`). Its callbacks write each request straight to the
//! port and return; one reader thread takes the host's answers off the port and replies to the
//! kernel. So many requests are in flight at once while each mount's session thread keeps reading
//! its device, and a request costs two thread wakeups in the guest, no more.
//!
//! `overlay` mounts put a kernel overlayfs, with its upper layer on a private tmpfs, over a
//! read-only FUSE view of the host: the guest writes freely and nothing reaches the host.

use crate::log;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    Request, SessionACL, TimeOrNow, WriteFlags,
};
use matchlock_proto::frame::{body_len, decode, encode, FrameError};
use matchlock_proto::vfs::{
    data_answer, write_header, VfsAnswer, VfsAttr, VfsCall, VfsDirEntryPlus, VfsOp, VfsReply,
    VfsTime, MAX_IO, MAX_VFS_FRAME,
};
use matchlock_proto::GuestVfsMount;
use nix::mount::{mount, MsFlags};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs;
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may trust names and attributes before asking the host again, so a change
/// made on the host side of a live mount (`host_fs`, `ro`) shows in the guest within this long
/// (virtiofs's default, `cache=auto`, makes the same trade). Trusting nothing would cost a host
/// round trip for every permission check and `stat`, which more than doubles the cost of
/// creating, stating and removing files. Changes the guest makes are seen by it at once.
const TTL: Duration = Duration::from_secs(1);
/// Private directory of the overlay layers and hidden FUSE views.
const VFS_DIR: &str = "/run/matchlock-vfs";

/// Opens one `/dev/fuse` per mount. Called before the switch to the image root, whose `/dev`
/// (for a confined sandbox) has no FUSE device.
pub fn open_devices(n: usize) -> Result<Vec<OwnedFd>, String> {
    (0..n)
        .map(|_| {
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
                .map(OwnedFd::from)
                .map_err(|e| format!("opening /dev/fuse: {e}"))
        })
        .collect()
}

/// Mounts every workspace filesystem, in order (a later mount may sit inside an earlier one).
/// `port` is `None` only when every mount is a `memory` one.
pub fn mount_all(
    mounts: &[GuestVfsMount],
    fds: Vec<OwnedFd>,
    port: Option<Arc<Port>>,
) -> Result<(), String> {
    let mut fds = fds.into_iter();
    for m in mounts {
        let r = if m.memory {
            mount_memory(m)
        } else {
            let fd = fds.next().ok_or("more mounts than FUSE devices")?;
            let port = port.clone().ok_or("no VFS port")?;
            mount_one(m, fd, port)
        };
        r.map_err(|e| format!("mount {}: {e}", m.path))?;
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

/// A `memory` mount: an empty tmpfs, nothing on the host.
fn mount_memory(m: &GuestVfsMount) -> Result<(), String> {
    let target = mount_point(&m.path, false)?;
    mount(
        Some("tmpfs"),
        &target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|e| format!("mounting tmpfs: {e}"))
}

fn mount_one(m: &GuestVfsMount, fd: OwnedFd, port: Arc<Port>) -> Result<(), String> {
    let target = mount_point(&m.path, m.file)?;
    let private = PathBuf::from(format!("{VFS_DIR}/{}", m.id));
    let fuse_at = if m.overlay {
        fs::create_dir_all(&private).map_err(|e| format!("creating {}: {e}", private.display()))?;
        let lower = private.join("lower");
        if m.file {
            fs::File::create(&lower).map_err(|e| format!("creating {}: {e}", lower.display()))?;
        } else {
            fs::create_dir_all(&lower).map_err(|e| format!("creating {}: {e}", lower.display()))?;
        }
        lower
    } else {
        target.clone()
    };
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if m.read_only || m.overlay {
        flags |= MsFlags::MS_RDONLY;
    }
    let rootmode = if m.file { "100000" } else { "40000" };
    let opts = format!(
        "fd={},rootmode={rootmode},user_id=0,group_id=0,allow_other,default_permissions",
        fd.as_raw_fd()
    );
    mount(
        Some("matchlock"),
        &fuse_at,
        Some("fuse.matchlock"),
        flags,
        Some(opts.as_str()),
    )
    .map_err(|e| format!("mounting FUSE: {e}"))?;
    let seen = Arc::new(Seen::default());
    let dirs = Arc::new(Dirs {
        tails: Mutex::default(),
        port: port.clone(),
        mount: m.id,
    });
    let remote = Remote {
        port,
        mount: m.id,
        seen: seen.clone(),
        dirs,
    };
    let config = fuser::Config::default();
    let session = fuser::Session::from_fd(remote, fd, SessionACL::All, config)
        .map_err(|e| format!("FUSE handshake: {e}"))?;
    let _ = seen.notifier.set(session.notifier());
    let path = m.path.clone();
    std::thread::Builder::new()
        .name(format!("vfs-{}", m.id))
        .spawn(move || {
            if let Err(e) = session.run() {
                log(format_args!("vfs {path}: session ended: {e}"));
            }
        })
        .map_err(|e| format!("starting the FUSE thread: {e}"))?;
    // Only now: finding the mount's device asks the session, which must be running.
    raise_readahead(&fuse_at);
    if m.overlay {
        overlay(&private, &fuse_at, &target, m.file)?;
    }
    Ok(())
}

/// Read-ahead window for workspace mounts, KiB. The kernel offers FUSE 128 KiB, so a sequential
/// read waits on one 128 KiB round trip after another; a wider window keeps several 1 MiB reads
/// in flight (TCG: 120 -> 190 MB/s, docs/benchmarks.md). Readahead still starts small and only
/// grows for sequential reads.
const READ_AHEAD_KB: u32 = 4096;

/// Widens the read-ahead of the FUSE mount at `at` (after the handshake, which would clamp it
/// back). A failure only costs speed.
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
        return mount(
            Some(&copy),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| format!("binding the copy: {e}"));
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

/// A reply waiting for its answer.
type Done = Box<dyn FnOnce(VfsReply) + Send>;

/// How long to wait before reading the port again while the host end is not connected (a
/// virtio-serial read then returns end-of-file at once).
const PORT_RETRY: Duration = Duration::from_millis(50);

/// The guest end of the VFS port, shared by every mount.
pub struct Port {
    out: Mutex<fs::File>,
    pending: Mutex<HashMap<u64, Done>>,
    next: AtomicU64,
}

impl Port {
    /// Finds and opens the port and starts its reader thread. Called before the switch to the
    /// image root, whose `/dev` may lack the port's node.
    pub fn open() -> Result<Arc<Self>, String> {
        let path = crate::channel::find_port_named(matchlock_proto::vfs::PORT_NAME)
            .map_err(|e| format!("looking for the VFS port: {e}"))?
            .ok_or("the VFS port is missing (the host did not attach it)")?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let reader = file
            .try_clone()
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let port = Arc::new(Self {
            out: Mutex::new(file),
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        });
        let p = port.clone();
        std::thread::Builder::new()
            .name("vfs-port".into())
            .spawn(move || p.read_answers(reader))
            .map_err(|e| format!("starting the VFS reader: {e}"))?;
        Ok(port)
    }

    /// Sends `op`; `done` (none for `Forget`) gets the answer, or `EIO` if the port failed.
    fn call(&self, mount: u32, op: VfsOp, done: Option<Done>) {
        let id = self.next_id();
        self.send_frame(id, encode(&VfsCall { id, mount, op }), &[], done);
    }

    fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers `done` under `id` and writes the already encoded call, then `data` (the tail of
    /// a write call, sent from the kernel's buffer as it is).
    fn send_frame(
        &self,
        id: u64,
        frame: Result<Vec<u8>, FrameError>,
        data: &[u8],
        done: Option<Done>,
    ) {
        let Ok(frame) = frame else {
            if let Some(done) = done {
                done(VfsReply::Err(libc::EIO));
            }
            return;
        };
        if let Some(done) = done {
            self.pending().insert(id, done);
        }
        let sent = {
            let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
            out.write_all(&frame).and_then(|_| out.write_all(data))
        };
        if let Err(e) = sent {
            log(format_args!("vfs: writing the port: {e}"));
            if let Some(done) = self.pending().remove(&id) {
                done(VfsReply::Err(libc::EIO));
            }
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Done>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reader thread: hands each answer to the reply waiting for it.
    fn read_answers(&self, file: fs::File) {
        // Small, so a large body is read straight into its own buffer instead of through this
        // one; the many small answers still come in few reads.
        let mut rd = BufReader::with_capacity(16 * 1024, file);
        loop {
            match read_answer(&mut rd) {
                Ok(Some(a)) => {
                    let done = self.pending().remove(&a.id);
                    if let Some(done) = done {
                        done(a.reply);
                    }
                }
                Ok(None) => std::thread::sleep(PORT_RETRY),
                Err(e) => {
                    log(format_args!("vfs: reading the port: {e}"));
                    std::thread::sleep(PORT_RETRY);
                }
            }
        }
    }
}

/// Reads one answer. Read data goes straight from the port into the buffer the kernel's reply is
/// made from, rather than into a frame and then, decoded, into a copy of it.
fn read_answer(rd: &mut BufReader<fs::File>) -> Result<Option<VfsAnswer>, FrameError> {
    use std::io::Read;
    let mut prefix = [0u8; 4];
    match rd.read_exact(&mut prefix) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = body_len(prefix, MAX_VFS_FRAME)?;
    let mut body = vec![0u8; len.min(32)];
    rd.read_exact(&mut body)?;
    if let Some((id, start, n)) = data_answer(&body).filter(|(_, s, n)| s + n == len) {
        let mut data = Vec::with_capacity(n);
        data.extend_from_slice(&body[start..]);
        let rest = (n - data.len()) as u64;
        rd.take(rest).read_to_end(&mut data)?;
        if data.len() != n {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        let reply = VfsReply::Data(data);
        return Ok(Some(VfsAnswer { id, reply }));
    }
    let head = body.len();
    body.resize(len, 0);
    rd.read_exact(&mut body[head..])?;
    decode(&body).map(Some)
}

/// The `fuser` filesystem of one mount: every callback becomes one host request.
struct Remote {
    port: Arc<Port>,
    mount: u32,
    seen: Arc<Seen>,
    dirs: Arc<Dirs>,
}

/// Directory entries the host sent that did not fit in the kernel's buffer, per directory
/// handle. The kernel asks for a page of entries at a time while the host answers with up to
/// [`matchlock_proto::vfs::MAX_ENTRIES`]; keeping the rest serves the kernel's next request,
/// which continues where the last one stopped, without another round trip.
struct Dirs {
    tails: Mutex<HashMap<u64, DirTail>>,
    port: Arc<Port>,
    mount: u32,
}

struct DirTail {
    /// The offset the kernel's next request carries if it continues.
    after: u64,
    entries: VecDeque<VfsDirEntryPlus>,
}

impl Dirs {
    fn tails(&self) -> std::sync::MutexGuard<'_, HashMap<u64, DirTail>> {
        self.tails.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `fh`'s kept entries if the kernel continues at `offset`; kept entries it skipped are
    /// dropped.
    fn take(&self, fh: u64, offset: u64) -> Option<VecDeque<VfsDirEntryPlus>> {
        let tail = self.tails().remove(&fh)?;
        if tail.after == offset {
            return Some(tail.entries);
        }
        self.unused(tail.entries.iter());
        None
    }

    fn keep(&self, fh: u64, after: u64, entries: VecDeque<VfsDirEntryPlus>) {
        if entries.is_empty() {
            return;
        }
        let old = self.tails().insert(fh, DirTail { after, entries });
        if let Some(old) = old {
            self.unused(old.entries.iter());
        }
    }

    fn discard(&self, fh: u64) {
        let old = self.tails().remove(&fh);
        if let Some(old) = old {
            self.unused(old.entries.iter());
        }
    }

    /// Entries the host described (each counted as a lookup there) that never reached the
    /// kernel as such: the host forgets them, or its node table would only grow.
    fn unused<'a>(&self, entries: impl Iterator<Item = &'a VfsDirEntryPlus>) {
        let nodes: Vec<(u64, u64)> = entries.filter_map(|e| e.attr.map(|a| (a.ino, 1))).collect();
        if !nodes.is_empty() {
            self.port.call(self.mount, VfsOp::Forget { nodes }, None);
        }
    }
}

/// Hands `entries` to a plain `readdir` and keeps what does not fit.
fn fill_dir(
    dirs: &Dirs,
    fh: u64,
    offset: u64,
    mut entries: VecDeque<VfsDirEntryPlus>,
    mut reply: ReplyDirectory,
) {
    let mut after = offset;
    let mut given = Vec::new();
    while let Some(e) = entries.front() {
        let name = OsStr::from_bytes(&e.entry.name);
        if reply.add(
            INodeNo(e.entry.ino),
            e.entry.offset,
            kind(e.entry.kind),
            name,
        ) {
            break;
        }
        after = e.entry.offset;
        given.extend(entries.pop_front());
    }
    dirs.unused(given.iter());
    dirs.keep(fh, after, entries);
    reply.ok();
}

/// Hands `entries` to a `readdirplus` and keeps what does not fit.
fn fill_dir_plus(
    dirs: &Dirs,
    seen: &Seen,
    fh: u64,
    offset: u64,
    mut entries: VecDeque<VfsDirEntryPlus>,
    mut reply: ReplyDirectoryPlus,
) {
    let mut after = offset;
    while let Some(e) = entries.front() {
        let name = OsStr::from_bytes(&e.entry.name);
        let full = match &e.attr {
            Some(a) => reply.add(
                INodeNo(a.ino),
                e.entry.offset,
                name,
                &TTL,
                &file_attr(a),
                Generation(0),
            ),
            None => {
                // Node id 0 tells the kernel to list the name without making a node of it;
                // `.` and `..` keep their numbers (the kernel never makes nodes of those).
                let dots = e.entry.name == b"." || e.entry.name == b"..";
                let bare = VfsAttr {
                    ino: if dots { e.entry.ino } else { 0 },
                    mode: e.entry.kind,
                    ..Default::default()
                };
                reply.add(
                    INodeNo(bare.ino),
                    e.entry.offset,
                    name,
                    &Duration::ZERO,
                    &file_attr(&bare),
                    Generation(0),
                )
            }
        };
        if full {
            break;
        }
        after = e.entry.offset;
        if let Some(a) = &e.attr {
            seen.told(a);
        }
        entries.pop_front();
    }
    dirs.keep(fh, after, entries);
    reply.ok();
}

/// What the kernel was last told about each node's size and times, so that an open can tell
/// whether the host changed the file while the kernel trusted its cached attributes ([`TTL`]),
/// and make the kernel drop them: a file edited on the host then reads whole at once, not cut at
/// its old size.
#[derive(Default)]
struct Seen {
    attrs: Mutex<HashMap<u64, Stamp>>,
    notifier: std::sync::OnceLock<fuser::Notifier>,
}

type Stamp = (u64, (i64, u32), (i64, u32));

impl Seen {
    fn told(&self, a: &VfsAttr) {
        self.map().insert(a.ino, (a.size, a.mtime, a.ctime));
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Stamp>> {
        self.attrs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `a` (fresh from an open) and drops the kernel's cached attributes if they differ.
    fn refresh(&self, a: &VfsAttr) {
        let now = (a.size, a.mtime, a.ctime);
        let old = self.map().insert(a.ino, now);
        if old.is_some_and(|old| old != now) {
            if let Some(n) = self.notifier.get() {
                // A negative offset invalidates the attributes only: no page locks are taken,
                // so this cannot deadlock against the open waiting for our reply.
                let _ = n.inval_inode(INodeNo(a.ino), -1, 0);
            }
        }
    }
}

fn time(t: (i64, u32)) -> SystemTime {
    if t.0 >= 0 {
        UNIX_EPOCH + Duration::new(t.0 as u64, t.1)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.0.unsigned_abs())
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

fn file_attr(a: &VfsAttr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.ctime),
        kind: kind(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn vtime(t: Option<TimeOrNow>) -> Option<VfsTime> {
    t.map(|t| match t {
        TimeOrNow::Now => VfsTime::Now,
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => VfsTime::At(d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => VfsTime::At(-(e.duration().as_secs() as i64), 0),
        },
    })
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn unexpected() -> Errno {
    Errno::from_i32(libc::EIO)
}

fn bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

impl Remote {
    /// Forwards `op`; the port's reader thread hands the answer to `done`.
    fn send<F>(&self, op: VfsOp, done: F)
    where
        F: FnOnce(VfsReply) + Send + 'static,
    {
        self.port.call(self.mount, op, Some(Box::new(done)));
    }

    fn entry(&self, op: VfsOp, reply: ReplyEntry) {
        let seen = self.seen.clone();
        self.send(op, move |r| match r {
            VfsReply::Entry(a) => {
                seen.told(&a);
                reply.entry(&TTL, &file_attr(&a), Generation(0))
            }
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }

    fn attr(&self, op: VfsOp, reply: ReplyAttr) {
        let seen = self.seen.clone();
        self.send(op, move |r| match r {
            VfsReply::Attr(a) => {
                seen.told(&a);
                reply.attr(&TTL, &file_attr(&a))
            }
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }

    fn empty(&self, op: VfsOp, reply: ReplyEmpty) {
        self.send(op, move |r| match r {
            VfsReply::Ok => reply.ok(),
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }

    fn opened(&self, op: VfsOp, reply: ReplyOpen) {
        let seen = self.seen.clone();
        self.send(op, move |r| match r {
            VfsReply::Opened(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            VfsReply::OpenedFile(fh, a) => {
                seen.refresh(&a);
                reply.opened(FileHandle(fh), FopenFlags::empty())
            }
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }
}

impl Filesystem for Remote {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        // Listings carry attributes when the kernel sees they will be wanted (`ls -l`, `find`,
        // `git status`), saving a lookup round trip per entry.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let op = VfsOp::Lookup {
            parent: parent.0,
            name: bytes(name),
        };
        self.entry(op, reply);
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        // Possibly early (the kernel may still hold the node): then the next open merely
        // finds nothing to compare with.
        self.seen.map().remove(&ino.0);
        let nodes = vec![(ino.0, nlookup)];
        self.port.call(self.mount, VfsOp::Forget { nodes }, None);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let op = VfsOp::Getattr {
            node: ino.0,
            fh: fh.map(|f| f.0),
        };
        self.attr(op, reply);
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let op = VfsOp::Setattr {
            node: ino.0,
            fh: fh.map(|f| f.0),
            mode,
            uid,
            gid,
            size,
            atime: vtime(atime),
            mtime: vtime(mtime),
        };
        self.attr(op, reply);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.send(VfsOp::Readlink { node: ino.0 }, move |r| match r {
            VfsReply::Data(d) => reply.data(&d),
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let op = VfsOp::Mkdir {
            parent: parent.0,
            name: bytes(name),
            mode: mode & !umask,
        };
        self.entry(op, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = VfsOp::Unlink {
            parent: parent.0,
            name: bytes(name),
        };
        self.empty(op, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let op = VfsOp::Rmdir {
            parent: parent.0,
            name: bytes(name),
        };
        self.empty(op, reply);
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let op = VfsOp::Symlink {
            parent: parent.0,
            name: bytes(link_name),
            target: target.as_os_str().as_bytes().to_vec(),
        };
        self.entry(op, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let op = VfsOp::Rename {
            parent: parent.0,
            name: bytes(name),
            new_parent: newparent.0,
            new_name: bytes(newname),
            flags: flags.bits(),
        };
        self.empty(op, reply);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let op = VfsOp::Link {
            node: ino.0,
            new_parent: newparent.0,
            new_name: bytes(newname),
        };
        self.entry(op, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let op = VfsOp::Open {
            node: ino.0,
            flags: flags.0,
        };
        self.opened(op, reply);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let op = VfsOp::Read {
            fh: fh.0,
            offset,
            size: size.min(MAX_IO),
        };
        self.send(op, move |r| match r {
            VfsReply::Data(d) => reply.data(&d),
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let id = self.port.next_id();
        let header = write_header(id, self.mount, fh.0, offset, data.len());
        let done: Done = Box::new(move |r| match r {
            VfsReply::Written(n) => reply.written(n),
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
        self.port.send_frame(id, header, data, Some(done));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes go straight to the host file; there is nothing buffered here to flush.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(VfsOp::Release { fh: fh.0 }, reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(VfsOp::Fsync { fh: fh.0, datasync }, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.opened(VfsOp::Opendir { node: ino.0 }, reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        if let Some(entries) = self.dirs.take(fh.0, offset) {
            return fill_dir(&self.dirs, fh.0, offset, entries, reply);
        }
        let op = VfsOp::Readdir { fh: fh.0, offset };
        let dirs = self.dirs.clone();
        self.send(op, move |r| match r {
            VfsReply::Entries(entries) => {
                let plus = entries
                    .into_iter()
                    .map(|entry| VfsDirEntryPlus { entry, attr: None })
                    .collect();
                fill_dir(&dirs, fh.0, offset, plus, reply)
            }
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        if let Some(entries) = self.dirs.take(fh.0, offset) {
            return fill_dir_plus(&self.dirs, &self.seen, fh.0, offset, entries, reply);
        }
        let op = VfsOp::ReaddirPlus { fh: fh.0, offset };
        let (dirs, seen) = (self.dirs.clone(), self.seen.clone());
        self.send(op, move |r| match r {
            VfsReply::EntriesPlus(entries) => {
                fill_dir_plus(&dirs, &seen, fh.0, offset, entries.into(), reply)
            }
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.discard(fh.0);
        self.empty(VfsOp::Release { fh: fh.0 }, reply);
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(VfsOp::Fsync { fh: fh.0, datasync }, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.send(VfsOp::Statfs, move |r| match r {
            VfsReply::Statfs(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let op = VfsOp::Create {
            parent: parent.0,
            name: bytes(name),
            mode: mode & !umask,
            flags,
        };
        let seen = self.seen.clone();
        self.send(op, move |r| match r {
            VfsReply::Created(a, fh) => {
                seen.told(&a);
                let attr = file_attr(&a);
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                )
            }
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }
}
