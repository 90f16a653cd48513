//! The operations a mount answers ([`crate::MountFs::handle`]): one [`VfsOp`] in, one
//! [`VfsReply`] out. They mirror the kernel's FUSE requests closely ([`crate::fuse`] translates),
//! but carry no wire format of their own: interception rules and events are decided on these.
//!
//! Node ids are the host's: lookups answer with the id (also the `st_ino` the guest sees), `1` is
//! the mount's root. File handles are the host's too. Everything here comes from the guest and is
//! untrusted: names are single path components, sizes are capped by [`MAX_IO`], [`MAX_NAME`] and
//! [`MAX_LINK`].

use std::io;
use std::os::fd::BorrowedFd;

/// The node id of a mount's root.
pub const ROOT_NODE: u64 = 1;
/// Largest read or write in one request.
pub const MAX_IO: u32 = 1024 * 1024;
/// Longest file name (one path component), as Linux's `NAME_MAX`.
pub const MAX_NAME: usize = 255;
/// Longest symlink target, as Linux's `PATH_MAX`.
pub const MAX_LINK: usize = 4096;
/// Most directory entries in one [`VfsReply::Entries`].
pub const MAX_ENTRIES: usize = 1024;

/// A timestamp for `setattr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VfsTime {
    /// The host's current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, u32),
}

/// One filesystem request. `parent`/`node` are node ids, `fh` file handles from `Open`/`Create`/
/// `Opendir`, names raw bytes of one path component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VfsOp {
    /// Find `name` in `parent`. Reply: `Entry`. Each successful lookup counts one reference.
    Lookup { parent: u64, name: Vec<u8> },
    /// Drop `(node, count)` lookup references. No reply.
    Forget { nodes: Vec<(u64, u64)> },
    /// Attributes of `node` (through `fh` when given). Reply: `Attr`.
    Getattr { node: u64, fh: Option<u64> },
    /// Change attributes. Reply: `Attr`.
    Setattr {
        node: u64,
        fh: Option<u64>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<VfsTime>,
        mtime: Option<VfsTime>,
    },
    /// Target of a symlink. Reply: `Data`.
    Readlink { node: u64 },
    /// Create a directory. Reply: `Entry`.
    Mkdir {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
    },
    /// Remove a non-directory. Reply: `Ok`.
    Unlink { parent: u64, name: Vec<u8> },
    /// Remove an empty directory. Reply: `Ok`.
    Rmdir { parent: u64, name: Vec<u8> },
    /// Create a symlink `name` -> `target`. Reply: `Entry`.
    Symlink {
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
    },
    /// `renameat2`; `flags` are `RENAME_NOREPLACE`/`RENAME_EXCHANGE`. Reply: `Ok`.
    Rename {
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        flags: u32,
    },
    /// Hard link `node` as `new_name` in `new_parent`. Reply: `Entry`.
    Link {
        node: u64,
        new_parent: u64,
        new_name: Vec<u8>,
    },
    /// Open a regular file with `open(2)` flags. Reply: `OpenedFile`.
    Open { node: u64, flags: i32 },
    /// Create and open a regular file. Reply: `Created`.
    Create {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        flags: i32,
    },
    /// Read up to `size` bytes at `offset` straight into the transport's reply buffers
    /// ([`Payload::read_from`]). Reply: `Transferred`.
    Read { fh: u64, offset: u64, size: u32 },
    /// Write the transport's pending request data ([`Payload::write_to`]) at `offset`. Reply:
    /// `Written`.
    Write { fh: u64, offset: u64 },
    /// Close a file handle. Reply: `Ok`.
    Release { fh: u64 },
    /// `fsync`/`fdatasync` a file or directory handle. Reply: `Ok`.
    Fsync { fh: u64, datasync: bool },
    /// Open a directory for reading. Reply: `Opened`.
    Opendir { node: u64 },
    /// Entries after `offset` (0: from the start; else an entry's `offset`), as many as fit in
    /// `size` bytes of the kernel's reply ([`dirent_size`]). Reply: `Entries`, empty at the end.
    Readdir { fh: u64, offset: u64, size: u32 },
    /// Filesystem statistics. Reply: `Statfs`.
    Statfs,
    /// Like `Readdir`, with each entry's attributes. Every entry returned with attributes counts
    /// one lookup reference, as a `Lookup` would (`.` and `..` come without). Reply:
    /// `EntriesPlus`, empty at the end. Entries that do not fit in `size` bytes
    /// ([`direntplus_size`]) are neither returned nor counted.
    ReaddirPlus { fh: u64, offset: u64, size: u32 },
    /// Create a regular file, FIFO or socket (never a device). Reply: `Entry`.
    Mknod {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
    },
    /// `fallocate(2)` on an open file. Reply: `Ok`.
    Fallocate {
        fh: u64,
        mode: i32,
        offset: u64,
        length: u64,
    },
    /// `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE` (the kernel answers the other kinds itself).
    /// Reply: `Offset`.
    Lseek { fh: u64, offset: u64, whence: u32 },
    /// `syncfs(2)` of the mount's host file system. Reply: `Ok`.
    Syncfs,
}

/// Attributes of a node, as `stat(2)` gives them; `ino` is the node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfsAttr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// `st_mode`: type and permission bits.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfsDirEntry {
    /// Inode number on the host (informational, as `d_ino`).
    pub ino: u64,
    /// Pass this as the next `Readdir` offset to continue after this entry.
    pub offset: u64,
    /// File type bits of `st_mode` (`S_IFMT` part).
    pub kind: u32,
    pub name: Vec<u8>,
}

/// One directory entry with its attributes, when the host gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfsDirEntryPlus {
    /// The entry.
    pub entry: VfsDirEntry,
    /// Its attributes (`ino` is the node id); `None` for `.`, `..` and entries the host will
    /// not describe.
    pub attr: Option<VfsAttr>,
}

/// `statfs(2)` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfsStatfs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// The answer to one [`VfsOp`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VfsReply {
    /// A node found or created.
    Entry(VfsAttr),
    /// A node's attributes.
    Attr(VfsAttr),
    /// A symlink's target.
    Data(Vec<u8>),
    /// Bytes written.
    Written(u32),
    /// A new directory handle.
    Opened(u64),
    /// A new file handle, and the file's attributes as of the open.
    OpenedFile(u64, VfsAttr),
    /// A created and opened file.
    Created(VfsAttr, u64),
    /// Directory entries.
    Entries(Vec<VfsDirEntry>),
    /// Directory entries with attributes.
    EntriesPlus(Vec<VfsDirEntryPlus>),
    /// Filesystem statistics.
    Statfs(VfsStatfs),
    /// A file offset.
    Offset(u64),
    /// Bytes read into the transport's buffers.
    Transferred(u32),
    /// Success without data.
    Ok,
    /// Failure: a positive `errno`.
    Err(i32),
}

/// Bytes a directory entry named `name_len` bytes takes in a FUSE `READDIR` reply
/// (`struct fuse_dirent`, padded to 8 bytes).
pub const fn dirent_size(name_len: usize) -> usize {
    (24 + name_len + 7) & !7
}

/// Bytes a directory entry takes in a FUSE `READDIRPLUS` reply (`struct fuse_direntplus`).
pub const fn direntplus_size(name_len: usize) -> usize {
    128 + dirent_size(name_len)
}

/// The data of [`VfsOp::Read`] and [`VfsOp::Write`], left in the transport's buffers (for
/// virtio-fs, the guest's memory): the host kernel moves it between those buffers and the file
/// in one copy.
pub trait Payload {
    /// Bytes of request data waiting in the transport's buffers (a write's payload).
    fn pending(&self) -> usize;
    /// Writes all pending bytes to `fd` at `offset`; returns how many were written.
    fn write_to(&mut self, fd: BorrowedFd<'_>, offset: u64) -> io::Result<usize>;
    /// Reads up to `len` bytes of `fd` at `offset` into the reply's data area; returns how
    /// many (fewer at the end of the file).
    fn read_from(&mut self, fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize>;
}

/// A [`Payload`] in plain memory, for tests: `write` is the data a write hands over, `read`
/// receives what a read returns.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct MemPayload {
    pub write: Vec<u8>,
    pub read: Vec<u8>,
}

#[cfg(test)]
impl MemPayload {
    /// A payload carrying `data` for a write.
    pub fn with(data: &[u8]) -> Self {
        MemPayload {
            write: data.to_vec(),
            read: Vec::new(),
        }
    }
}

#[cfg(test)]
impl Payload for MemPayload {
    fn pending(&self) -> usize {
        self.write.len()
    }
    fn write_to(&mut self, fd: BorrowedFd<'_>, offset: u64) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        std::fs::File::from(fd.try_clone_to_owned()?).write_all_at(&self.write, offset)?;
        Ok(self.write.len())
    }
    fn read_from(&mut self, fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::from(fd.try_clone_to_owned()?);
        self.read = vec![0; len];
        let mut got = 0;
        while got < len {
            match f.read_at(&mut self.read[got..], offset + got as u64)? {
                0 => break,
                n => got += n,
            }
        }
        self.read.truncate(got);
        Ok(got)
    }
}
