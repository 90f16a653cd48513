//! The workspace filesystem protocol: the guest's FUSE server forwards each kernel request to the
//! host as one [`VfsOp`] and gets one [`VfsReply`] back.
//!
//! Requests travel on a virtio-serial port of their own ([`PORT_NAME`]), not on the agent's
//! multiplexed channel: a filesystem request is small and latency-bound, and the multiplexer's
//! per-stream flow control, frame splitting and task hand-offs cost more than the request itself.
//! Each direction is a sequence of [`crate::frame`] frames: the guest sends [`VfsCall`]s, the host
//! answers each with one [`VfsAnswer`] carrying the same `id`, in any order (requests run
//! concurrently on the host). [`VfsOp::Forget`] gets no answer.
//!
//! Node ids are the host's: the host answers lookups with the id (also the `st_ino` the guest
//! sees), `1` is the mount's root. File handles are the host's too. Everything here comes from the
//! guest and is untrusted on the host: names are single path components, sizes are capped by
//! [`MAX_IO`], [`MAX_NAME`] and [`MAX_LINK`].

use serde::{Deserialize, Serialize};

/// The node id of a mount's root.
pub const ROOT_NODE: u64 = 1;
/// Largest read or write in one request.
pub const MAX_IO: u32 = 1024 * 1024;
/// Longest file name (one path component), as Linux's `NAME_MAX`.
pub const MAX_NAME: usize = 255;
/// Longest symlink target, as Linux's `PATH_MAX`.
pub const MAX_LINK: usize = 4096;
/// Largest VFS frame either side accepts: one [`MAX_IO`] payload plus headroom.
pub const MAX_VFS_FRAME: usize = MAX_IO as usize + 64 * 1024;
/// Name of the workspace filesystem's virtio-serial port (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "matchlock.vfs";
/// Most directory entries in one [`VfsReply::Entries`].
pub const MAX_ENTRIES: usize = 1024;

/// One request, guest to host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfsCall {
    /// Chosen by the guest; the answer carries it back.
    pub id: u64,
    /// Which mount (a [`GuestVfsMount::id`]).
    pub mount: u32,
    /// What to do.
    pub op: VfsOp,
}

/// One answer, host to guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfsAnswer {
    /// The [`VfsCall::id`] answered.
    pub id: u64,
    /// The outcome.
    pub reply: VfsReply,
}

/// The frame of a [`VfsOp::Write`] call up to its data: this header followed by the `len` data
/// bytes is exactly `frame::encode(&VfsCall { id, mount, op: VfsOp::Write { fh, offset, data } })`,
/// so the caller can send the data straight from its own buffer (in an emulated guest, copying a
/// megabyte takes milliseconds).
pub fn write_header(
    id: u64,
    mount: u32,
    fh: u64,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, crate::FrameError> {
    /// `VfsOp::Write` with borrowed data; serde's derive cannot borrow into an owned enum.
    struct WriteRef<'a> {
        fh: u64,
        offset: u64,
        data: &'a [u8],
    }
    impl Serialize for WriteRef<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeStructVariant;
            let mut v = s.serialize_struct_variant("VfsOp", WRITE_VARIANT, "Write", 3)?;
            v.serialize_field("fh", &self.fh)?;
            v.serialize_field("offset", &self.offset)?;
            v.serialize_field("data", serde_bytes::Bytes::new(self.data))?;
            v.end()
        }
    }
    #[derive(Serialize)]
    struct CallRef<'a> {
        id: u64,
        mount: u32,
        op: WriteRef<'a>,
    }
    let call = CallRef {
        id,
        mount,
        op: WriteRef {
            fh,
            offset,
            data: &[],
        },
    };
    // The data comes last, as a varint length and the bytes: encode it empty, then put the
    // real length (LEB128, as postcard writes it) in place of the empty one.
    let mut f = crate::frame::encode(&call)?;
    f.pop();
    let mut n = len;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            f.push(byte);
            break;
        }
        f.push(byte | 0x80);
    }
    let body = f.len() - 4 + len;
    if body > crate::MAX_FRAME {
        return Err(crate::FrameError::TooLarge(body));
    }
    f[..4].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(f)
}

/// The position of `Write` in [`VfsOp`] (postcard encodes variants by position); a test checks
/// [`write_header`] against the derived encoding.
const WRITE_VARIANT: u32 = 14;

/// The position of `Data` in [`VfsReply`]; a test checks [`data_answer`] against the derived
/// encoding.
const DATA_VARIANT: u64 = 2;

/// Recognises the start of a [`VfsAnswer`] frame body carrying [`VfsReply::Data`]: given at
/// least its first 32 bytes (or all of a shorter body), returns the answer's id, where the data
/// starts and how long it is, so the reader can receive the data into its own buffer instead of
/// decoding a copy. `None` for any other answer (decode those normally).
pub fn data_answer(head: &[u8]) -> Option<(u64, usize, usize)> {
    let (id, rest) = postcard::take_from_bytes::<u64>(head).ok()?;
    let (variant, rest) = postcard::take_from_bytes::<u64>(rest).ok()?;
    if variant != DATA_VARIANT {
        return None;
    }
    let (len, rest) = postcard::take_from_bytes::<u64>(rest).ok()?;
    Some((id, head.len() - rest.len(), usize::try_from(len).ok()?))
}

/// A timestamp for `setattr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VfsTime {
    /// The host's current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, u32),
}

/// One filesystem request. `parent`/`node` are node ids, `fh` file handles from `Open`/`Create`/
/// `Opendir`, names raw bytes of one path component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VfsOp {
    /// Find `name` in `parent`. Reply: `Entry`. Each successful lookup counts one reference.
    Lookup {
        parent: u64,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
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
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
    },
    /// Remove a non-directory. Reply: `Ok`.
    Unlink {
        parent: u64,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    /// Remove an empty directory. Reply: `Ok`.
    Rmdir {
        parent: u64,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
    },
    /// Create a symlink `name` -> `target`. Reply: `Entry`.
    Symlink {
        parent: u64,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// `renameat2`; `flags` are `RENAME_NOREPLACE`/`RENAME_EXCHANGE`. Reply: `Ok`.
    Rename {
        parent: u64,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        new_parent: u64,
        #[serde(with = "serde_bytes")]
        new_name: Vec<u8>,
        flags: u32,
    },
    /// Hard link `node` as `new_name` in `new_parent`. Reply: `Entry`.
    Link {
        node: u64,
        new_parent: u64,
        #[serde(with = "serde_bytes")]
        new_name: Vec<u8>,
    },
    /// Open a regular file with `open(2)` flags. Reply: `OpenedFile`.
    Open { node: u64, flags: i32 },
    /// Create and open a regular file. Reply: `Created`.
    Create {
        parent: u64,
        #[serde(with = "serde_bytes")]
        name: Vec<u8>,
        mode: u32,
        flags: i32,
    },
    /// Read up to `size` bytes at `offset`. Reply: `Data`.
    Read { fh: u64, offset: u64, size: u32 },
    /// Write at `offset`. Reply: `Written`.
    Write {
        fh: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Close a file handle. Reply: `Ok`.
    Release { fh: u64 },
    /// `fsync`/`fdatasync` a file or directory handle. Reply: `Ok`.
    Fsync { fh: u64, datasync: bool },
    /// Open a directory for reading. Reply: `Opened`.
    Opendir { node: u64 },
    /// Entries after `offset` (0: from the start; else an entry's `offset`). Reply: `Entries`,
    /// empty at the end.
    Readdir { fh: u64, offset: u64 },
    /// Filesystem statistics. Reply: `Statfs`.
    Statfs,
    /// Like `Readdir`, with each entry's attributes. Every entry returned with attributes counts
    /// one lookup reference, as a `Lookup` would (`.` and `..` come without). Reply:
    /// `EntriesPlus`, empty at the end.
    ReaddirPlus { fh: u64, offset: u64 },
}

/// Attributes of a node, as `stat(2)` gives them; `ino` is the node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfsDirEntry {
    /// Inode number on the host (informational, as `d_ino`).
    pub ino: u64,
    /// Pass this as the next `Readdir` offset to continue after this entry.
    pub offset: u64,
    /// File type bits of `st_mode` (`S_IFMT` part).
    pub kind: u32,
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
}

/// One directory entry with its attributes, when the host gives them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfsDirEntryPlus {
    /// The entry.
    pub entry: VfsDirEntry,
    /// Its attributes (`ino` is the node id); `None` for `.`, `..` and entries the host will
    /// not describe.
    pub attr: Option<VfsAttr>,
}

/// `statfs(2)` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VfsReply {
    /// A node found or created.
    Entry(VfsAttr),
    /// A node's attributes.
    Attr(VfsAttr),
    /// Bytes read (or a symlink target).
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
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
    /// Success without data.
    Ok,
    /// Failure: a positive `errno`.
    Err(i32),
}

/// How the guest mounts one workspace filesystem (part of [`crate::Setup`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestVfsMount {
    /// The id the guest names in [`crate::Msg::VfsOpen`].
    pub id: u32,
    /// Absolute path in the guest.
    pub path: String,
    /// The host side is a single regular file rather than a directory.
    pub file: bool,
    /// The host refuses writes; the guest mounts it read-only too.
    pub read_only: bool,
    /// Put a copy-on-write layer (in guest memory) over the read-only host view, so the guest can
    /// write but nothing reaches the host.
    pub overlay: bool,
    /// No host side at all: an empty in-memory filesystem (tmpfs) the guest may fill.
    pub memory: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_header_and_data_encode_like_the_owned_call() {
        for len in [0usize, 1, 127, 128, 16_383, 16_384, 70_000, 1 << 20] {
            let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let owned = VfsCall {
                id: 300,
                mount: 2,
                op: VfsOp::Write {
                    fh: 1 << 40,
                    offset: 5,
                    data: data.clone(),
                },
            };
            let mut direct = write_header(300, 2, 1 << 40, 5, len).unwrap();
            direct.extend_from_slice(&data);
            assert_eq!(direct, crate::frame::encode(&owned).unwrap(), "len {len}");
        }
    }

    #[test]
    fn data_answers_are_recognised_from_their_start() {
        for len in [0usize, 5, 200, 1 << 20] {
            let data = vec![7u8; len];
            let a = VfsAnswer {
                id: 1 << 33,
                reply: VfsReply::Data(data),
            };
            let f = crate::frame::encode(&a).unwrap();
            let body = &f[4..];
            let head = &body[..body.len().min(32)];
            let (id, start, n) = data_answer(head).unwrap();
            assert_eq!((id, n, start + n), (1 << 33, len, body.len()));
        }
        let other = VfsAnswer {
            id: 3,
            reply: VfsReply::Written(9),
        };
        let f = crate::frame::encode(&other).unwrap();
        assert_eq!(data_answer(&f[4..]), None);
    }
}
