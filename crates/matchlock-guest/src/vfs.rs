//! Workspace mounts: a FUSE filesystem per mount whose every request is forwarded to the host's
//! VFS server (`matchlock-vfs`) over channel streams.
//!
//! `fuser` parses the kernel's FUSE protocol; it runs from a `/dev/fuse` fd we mounted ourselves
//! (PID 1 is root and needs no `fusermount`). Its callbacks hand each request to the tokio runtime,
//! which forwards it on one of a small pool of streams and replies when the host answers, so
//! several requests are in flight at once while the session thread keeps reading the device.
//!
//! `overlay` mounts put a kernel overlayfs, with its upper layer on a private tmpfs, over a
//! read-only FUSE view of the host: the guest writes freely and nothing reaches the host.

use crate::log;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    SessionACL, TimeOrNow, WriteFlags,
};
use matchlock_proto::mux::{Mux, Stream};
use matchlock_proto::vfs::{VfsAttr, VfsOp, VfsReply, VfsTime, MAX_IO, MAX_VFS_FRAME};
use matchlock_proto::{read_msg_max, write_msg, GuestVfsMount, Msg};
use nix::mount::{mount, MsFlags};
use std::ffi::OsStr;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;

/// How long the kernel may trust names (and, for overlay lowers, attributes) before asking the
/// host again. Live mounts (`host_fs`, `ro`) do not cache attributes at all, so a file changed on
/// the host is seen with its new size at once; a name replaced on the host may take this long.
const TTL: Duration = Duration::from_secs(1);
/// Requests in flight per mount (one stream each); the host serves this many per mount.
const STREAMS: usize = matchlock_proto::vfs::STREAMS_PER_MOUNT;
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
pub fn mount_all(
    mounts: &[GuestVfsMount],
    fds: Vec<OwnedFd>,
    mux: Mux,
    rt: Handle,
) -> Result<(), String> {
    let mut fds = fds.into_iter();
    for m in mounts {
        let r = if m.memory {
            mount_memory(m)
        } else {
            let fd = fds.next().ok_or("more mounts than FUSE devices")?;
            mount_one(m, fd, mux.clone(), rt.clone())
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

fn mount_one(m: &GuestVfsMount, fd: OwnedFd, mux: Mux, rt: Handle) -> Result<(), String> {
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
    let remote = Remote {
        pool: Arc::new(Pool {
            mux,
            mount: m.id,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(STREAMS),
        }),
        rt,
        attr_ttl: if m.overlay { TTL } else { Duration::ZERO },
    };
    let config = fuser::Config::default();
    let session = fuser::Session::from_fd(remote, fd, SessionACL::All, config)
        .map_err(|e| format!("FUSE handshake: {e}"))?;
    let path = m.path.clone();
    std::thread::Builder::new()
        .name(format!("vfs-{}", m.id))
        .spawn(move || {
            if let Err(e) = session.run() {
                log(format_args!("vfs {path}: session ended: {e}"));
            }
        })
        .map_err(|e| format!("starting the FUSE thread: {e}"))?;
    if m.overlay {
        overlay(&private, &fuse_at, &target, m.file)?;
    }
    Ok(())
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

/// The streams of one mount: reused while idle, at most [`STREAMS`] at once.
struct Pool {
    mux: Mux,
    mount: u32,
    idle: Mutex<Vec<Stream>>,
    slots: Semaphore,
}

impl Pool {
    async fn open(&self) -> Option<Stream> {
        let mut s = self.mux.open().await.ok()?;
        write_msg(&mut s, &Msg::VfsOpen { mount: self.mount })
            .await
            .ok()?;
        match read_msg_max(&mut s, MAX_VFS_FRAME).await {
            Ok(Some(Msg::Ok)) => Some(s),
            _ => None,
        }
    }

    /// Sends one request and waits for its answer; any channel failure is `EIO`.
    async fn call(&self, op: VfsOp) -> VfsReply {
        let Ok(_slot) = self.slots.acquire().await else {
            return VfsReply::Err(libc::EIO);
        };
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut s = match idle {
            Some(s) => s,
            None => match self.open().await {
                Some(s) => s,
                None => return VfsReply::Err(libc::EIO),
            },
        };
        if write_msg(&mut s, &Msg::VfsRequest(op)).await.is_err() {
            return VfsReply::Err(libc::EIO);
        }
        match read_msg_max(&mut s, MAX_VFS_FRAME).await {
            Ok(Some(Msg::VfsReply(r))) => {
                self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(s);
                r
            }
            _ => VfsReply::Err(libc::EIO),
        }
    }
}

/// The `fuser` filesystem: every callback becomes one host request.
struct Remote {
    pool: Arc<Pool>,
    rt: Handle,
    attr_ttl: Duration,
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
    /// Forwards `op` and hands the answer to `done` on the runtime.
    fn send<F>(&self, op: VfsOp, done: F)
    where
        F: FnOnce(VfsReply) + Send + 'static,
    {
        let pool = self.pool.clone();
        self.rt.spawn(async move { done(pool.call(op).await) });
    }

    fn entry(&self, op: VfsOp, reply: ReplyEntry) {
        let ttl = self.attr_ttl;
        self.send(op, move |r| match r {
            VfsReply::Entry(a) => reply.entry_with_ttls(&ttl, &TTL, &file_attr(&a), Generation(0)),
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }

    fn attr(&self, op: VfsOp, reply: ReplyAttr) {
        let ttl = self.attr_ttl;
        self.send(op, move |r| match r {
            VfsReply::Attr(a) => reply.attr(&ttl, &file_attr(&a)),
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
        self.send(op, move |r| match r {
            VfsReply::Opened(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }
}

impl Filesystem for Remote {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
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
        self.send(
            VfsOp::Forget {
                nodes: vec![(ino.0, nlookup)],
            },
            |_| {},
        );
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
        let op = VfsOp::Write {
            fh: fh.0,
            offset,
            data: data.to_vec(),
        };
        self.send(op, move |r| match r {
            VfsReply::Written(n) => reply.written(n),
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
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
        mut reply: ReplyDirectory,
    ) {
        let op = VfsOp::Readdir { fh: fh.0, offset };
        self.send(op, move |r| match r {
            VfsReply::Entries(entries) => {
                for e in entries {
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(INodeNo(e.ino), e.offset, kind(e.kind), name) {
                        break;
                    }
                }
                reply.ok();
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
        let ttl = self.attr_ttl;
        self.send(op, move |r| match r {
            VfsReply::Created(a, fh) => reply.created(
                &ttl,
                &file_attr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            VfsReply::Err(e) => reply.error(errno(e)),
            _ => reply.error(unexpected()),
        });
    }
}
