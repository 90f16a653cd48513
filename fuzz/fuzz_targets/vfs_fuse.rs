//! FUSE requests as the guest kernel writes them into the virtio-fs queue, answered by
//! `matchlock_vfs::fuse::FuseFs` over real host directories.
//!
//! The guest chooses every byte of a request; the host must neither panic nor touch anything
//! outside a mount's root. The input is a sequence of requests, each
//! `[u16 LE request length][u16 LE payload length][request][payload]`, where the request is a raw
//! `fuse_in_header` plus arguments and the payload is a write's data (which virtio-fs leaves in
//! guest memory). Before them the harness negotiates `FUSE_INIT` as a kernel would.
//!
//! Two mounts are served, as a sandbox's workspace would be: mount 0 a shared host directory,
//! mount 1 a private (`memory`-style) one with a byte budget, interception rules, an owner
//! override and events. Both are reset to the same small tree before each input, so every input
//! runs against the same state (the temp directory itself is created once).
//!
//! Node ids are host inode numbers and file handles are counters, which no input can know in
//! advance, so a u64 whose high half is `NODE` or `FHND` (in the header's node id or in any
//! 8-byte-aligned argument) is replaced with a node id or file handle an earlier reply of the
//! same input returned (`low half % count`). Fallocate ranges on the shared mount are clamped to
//! 64 MiB so that the fuzzer cannot fill the host's disk (the private mount's budget does that
//! for mount 1). After each input the directory around the mounts is checked: anything created,
//! removed or changed next to them is a guest escaping its mount, and fails the run.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_vfs::fuse::{FuseFs, IN_HEADER, OUT_HEADER};
use matchlock_vfs::op::{Payload, MAX_IO};
use matchlock_vfs::rules::BlockRule;
use matchlock_vfs::{MountFs, Owner};
use std::fs;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// `matchlock_vfs`'s per-mount node id base (`ops::NODE_ID_LIMIT`): mount `m`'s node `n` is
/// `(m + 1) << 48 | n`, its root node is `1`.
const NODE_ID_LIMIT: u64 = 1 << 48;
const NODE_REF: u32 = u32::from_be_bytes(*b"NODE");
const FH_REF: u32 = u32::from_be_bytes(*b"FHND");
/// Ids remembered per input.
const MAX_REFS: usize = 64;
/// Largest fallocate range on the shared mount.
const FALLOCATE_CAP: u64 = 64 << 20;

/// The opcodes the harness looks at (`enum fuse_opcode`; `matchlock_vfs::fuse` keeps its own
/// table private).
mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const CREATE: u32 = 35;
    pub const FALLOCATE: u32 = 43;
}

struct Fixture {
    /// Holds `m0`, `m1` and `canary`, and nothing else.
    base: tempfile::TempDir,
    canary: (u64, u32, u32, u64),
}

const CANARY: &[u8] = b"outside every mount\n";

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let base = tempfile::Builder::new()
            .prefix("matchlock-fuzz-vfs-")
            .tempdir()
            .expect("temp dir");
        let canary = base.path().join("canary");
        fs::write(&canary, CANARY).expect("canary");
        let m = fs::metadata(&canary).expect("canary");
        let canary = (m.ino(), m.mode(), m.uid(), m.size());
        Fixture { base, canary }
    })
}

/// Recreates a mount's tree: `f` (a file), `d/g` (a file in a directory), `l` -> `f`,
/// `x` (an executable), `p` (a FIFO, which the host must never open).
fn reset(dir: &Path) {
    if dir.exists() && fs::remove_dir_all(dir).is_err() {
        // A guest may leave directories it cannot be removed from without root (mode 000).
        make_removable(dir);
        fs::remove_dir_all(dir).expect("cleaning a mount");
    }
    fs::create_dir(dir).expect("mount dir");
    fs::write(dir.join("f"), b"hello, world\n").expect("f");
    fs::create_dir(dir.join("d")).expect("d");
    fs::write(dir.join("d/g"), b"g").expect("d/g");
    std::os::unix::fs::symlink("f", dir.join("l")).expect("l");
    fs::write(dir.join("x"), b"#!/bin/sh\n").expect("x");
    fs::set_permissions(
        dir.join("x"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("x");
    let p =
        std::ffi::CString::new(dir.join("p").into_os_string().into_encoded_bytes()).expect("path");
    // SAFETY: `p` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(p.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// Gives every directory under `dir` (never following symlinks) mode 0700.
fn make_removable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            make_removable(&entry.path());
        }
    }
}

/// Nothing may appear, disappear or change next to the mounts.
fn check_outside(f: &Fixture) {
    let mut names: Vec<String> = fs::read_dir(f.base.path())
        .expect("base dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["canary", "m0", "m1"],
        "an entry appeared next to the mounts"
    );
    let path = f.base.path().join("canary");
    let m = fs::symlink_metadata(&path).expect("canary");
    assert_eq!(
        (m.ino(), m.mode(), m.uid(), m.size()),
        f.canary,
        "the file next to the mounts changed"
    );
    assert_eq!(fs::read(&path).expect("canary"), CANARY);
}

/// A write's data and a read's destination, in plain memory (virtio-fs uses guest memory).
#[derive(Default)]
struct Mem {
    write: Vec<u8>,
    read: Vec<u8>,
}

impl Payload for Mem {
    fn pending(&self) -> usize {
        self.write.len()
    }
    fn write_to(&mut self, fd: BorrowedFd<'_>, offset: u64) -> io::Result<usize> {
        let f = fs::File::from(fd.try_clone_to_owned()?);
        f.write_all_at(&self.write, offset)?;
        Ok(self.write.len())
    }
    fn read_from(&mut self, fd: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<usize> {
        let f = fs::File::from(fd.try_clone_to_owned()?);
        // A guest's buffers hold at most MAX_IO bytes; never allocate more than that here.
        let mut buf = vec![0; len.min(MAX_IO as usize)];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset.saturating_add(got as u64))? {
                0 => break,
                n => got += n,
            }
        }
        buf.truncate(got);
        self.read = buf;
        Ok(got)
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Ids that earlier replies of this input handed out.
struct Refs {
    nodes: Vec<u64>,
    fhs: Vec<u64>,
}

impl Refs {
    fn keep(list: &mut Vec<u64>, v: u64) {
        if v != 0 && !list.contains(&v) && list.len() < MAX_REFS {
            list.push(v);
        }
    }

    fn resolve(&self, v: u64) -> u64 {
        let (tag, idx) = ((v >> 32) as u32, v as u32 as usize);
        let list = match tag {
            NODE_REF => &self.nodes,
            FH_REF => &self.fhs,
            _ => return v,
        };
        if list.is_empty() {
            v
        } else {
            list[idx % list.len()]
        }
    }

    /// Rewrites references in the node id and every aligned argument.
    fn patch(&self, req: &mut [u8]) {
        let mut at = 16;
        while at + 8 <= req.len() {
            if at == 16 || at >= IN_HEADER {
                let v = self.resolve(u64_at(req, at).unwrap_or(0));
                req[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            at += 8;
        }
    }

    /// Remembers the node ids and handles a successful reply carries.
    fn learn(&mut self, op: u32, body: &[u8]) {
        let first = || u64_at(body, 0).unwrap_or(0);
        match op {
            opcode::LOOKUP | opcode::MKDIR | opcode::MKNOD | opcode::SYMLINK | opcode::LINK => {
                Self::keep(&mut self.nodes, first())
            }
            opcode::CREATE => {
                Self::keep(&mut self.nodes, first());
                Self::keep(&mut self.fhs, u64_at(body, 128).unwrap_or(0));
            }
            opcode::OPEN | opcode::OPENDIR => Self::keep(&mut self.fhs, first()),
            _ => {}
        }
    }
}

/// Keeps fallocate on the shared mount (node ids of mount 0) within [`FALLOCATE_CAP`].
fn clamp_fallocate(req: &mut [u8]) {
    let opcode = u32_at(req, 4).unwrap_or(0);
    let node = u64_at(req, 16).unwrap_or(0);
    if opcode != opcode::FALLOCATE || node / NODE_ID_LIMIT != 1 || req.len() < IN_HEADER + 24 {
        return;
    }
    for at in [IN_HEADER + 8, IN_HEADER + 16] {
        let v = u64_at(req, at).unwrap_or(0) % FALLOCATE_CAP;
        req[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

fn init(f: &FuseFs) {
    let mut req = Vec::new();
    for v in [IN_HEADER as u32 + 64, opcode::INIT, 1, 0, 0, 0, 0, 0, 0, 0] {
        req.extend_from_slice(&v.to_le_bytes());
    }
    // major, minor, max_readahead, flags (everything offered), then the rest of fuse_init_in.
    for v in [7u32, 38, 128 * 1024, u32::MAX] {
        req.extend_from_slice(&v.to_le_bytes());
    }
    req.resize(IN_HEADER + 64, 0);
    let mut out = Vec::new();
    f.handle(&req, &mut Mem::default(), &mut out)
        .expect("INIT is answered");
    assert_eq!(u32_at(&out, 4), Some(0), "INIT failed");
}

fn serve(base: &Path) -> FuseFs {
    let (m0, m1): (PathBuf, PathBuf) = (base.join("m0"), base.join("m1"));
    let shared = MountFs::open(&m0, false).expect("mount 0");
    let rules = vec![
        BlockRule {
            ops: vec!["write".into(), "remove".into()],
            path: "/workspace/d/*".into(),
        },
        BlockRule {
            ops: vec![],
            path: "/workspace/secret*".into(),
        },
    ];
    let (events, _) = tokio::sync::broadcast::channel(16);
    let private = MountFs::open(&m1, false)
        .expect("mount 1")
        .with_rules("/workspace", rules)
        .with_owner(Owner {
            uid: Some(1000),
            gid: Some(1000),
        })
        .with_events(events)
        .private(1 << 20, 0);
    FuseFs::new(vec![Arc::new(shared), Arc::new(private)])
}

fuzz_target!(|data: &[u8]| {
    let fx = fixture();
    let base = fx.base.path();
    reset(&base.join("m0"));
    reset(&base.join("m1"));
    let fuse = serve(base);
    init(&fuse);
    let mut refs = Refs {
        nodes: vec![1, NODE_ID_LIMIT + 1, 2 * NODE_ID_LIMIT + 1],
        fhs: Vec::new(),
    };
    let mut rest = data;
    while rest.len() >= 4 {
        let n = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let p = u16::from_le_bytes([rest[2], rest[3]]) as usize;
        rest = &rest[4..];
        let n = n.min(rest.len());
        let mut req = rest[..n].to_vec();
        rest = &rest[n..];
        let p = p.min(rest.len());
        let mut payload = Mem {
            write: rest[..p].to_vec(),
            read: Vec::new(),
        };
        rest = &rest[p..];
        refs.patch(&mut req);
        clamp_fallocate(&mut req);
        let mut out = Vec::new();
        let Some(len) = fuse.handle(&req, &mut payload, &mut out) else {
            continue;
        };
        // The reply's header must describe the reply: its length (the read data, which stays
        // in the transport's buffers, included) and the request's unique id.
        assert_eq!(len, out.len() + payload.read.len(), "reply length");
        assert!(out.len() >= OUT_HEADER, "reply without a header");
        assert_eq!(u32_at(&out, 0), Some(len as u32), "header length");
        assert_eq!(out[8..16], req[8..16], "unique id");
        let errno = i32::from_le_bytes(out[4..8].try_into().expect("4 bytes"));
        assert!(errno <= 0 && errno > -4096, "errno {errno}");
        if errno == 0 {
            refs.learn(u32_at(&req, 4).unwrap_or(0), &out[OUT_HEADER..]);
        }
    }
    drop(fuse);
    check_outside(fx);
});
