//! FUSE requests as the guest kernel writes them, answered by a [`FuseFs`] over a temporary
//! directory: the layouts, the negotiation, and what malformed requests get.

use super::*;
use std::fs;

const INIT: u32 = 26;

/// A request: header (with the right length unless `len` overrides it) and body.
fn req_with_len(opcode: u32, nodeid: u64, body: &[u8], len: Option<u32>) -> Vec<u8> {
    let mut r = Vec::new();
    let len = len.unwrap_or((IN_HEADER + body.len()) as u32);
    r.extend_from_slice(&len.to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&77u64.to_le_bytes()); // unique
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]); // uid gid pid extlen padding
    r.extend_from_slice(body);
    r
}

fn req(opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
    req_with_len(opcode, nodeid, body, None)
}

/// Little-endian body builder.
#[derive(Default)]
struct B(Vec<u8>);
impl B {
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn name(mut self, n: &str) -> Self {
        self.0.extend_from_slice(n.as_bytes());
        self.0.push(0);
        self
    }
    fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

use crate::op::MemPayload as Mem;

fn handle(f: &FuseFs, r: &[u8], out: &mut Vec<u8>) -> bool {
    f.handle(r, &mut Mem::default(), out).is_some()
}

/// Sends one request (its data, if any, in `payload`); returns `(error, body)` after checking
/// the reply header, with read data after the body as the guest would see it.
fn call_with(f: &FuseFs, r: &[u8], mut payload: Mem) -> (i32, Vec<u8>) {
    let mut out = Vec::new();
    let len = f.handle(r, &mut payload, &mut out).expect("no reply");
    out.extend_from_slice(&payload.read);
    assert_eq!(len, out.len());
    assert_eq!(u32_at(&out, 0) as usize, len);
    let err = i32::from_le_bytes(out[4..8].try_into().unwrap());
    assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), 77);
    (err, out[16..].to_vec())
}

fn call(f: &FuseFs, r: &[u8]) -> (i32, Vec<u8>) {
    call_with(f, r, Mem::default())
}

fn ok(f: &FuseFs, r: &[u8]) -> Vec<u8> {
    let (e, b) = call(f, r);
    assert_eq!(e, 0, "request failed with errno {}", -e);
    b
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Fields of a `fuse_entry_out`: (nodeid, entry_valid, attr_valid, size, mode).
fn entry(b: &[u8]) -> (u64, u64, u64, u64, u32) {
    (
        u64_at(b, 0),
        u64_at(b, 16),
        u64_at(b, 24),
        u64_at(b, 40 + 8),
        u32_at(b, 40 + 60),
    )
}

fn init_body(flags: u32) -> Vec<u8> {
    B::default()
        .u32(7)
        .u32(37)
        .u32(128 * 1024)
        .u32(flags)
        .raw(&[0u8; 48])
        .0
}

/// FUSE node id of mount 0's root, and of mount 1's.
const R0: u64 = NODE_ID_LIMIT + 1;
const R1: u64 = 2 * NODE_ID_LIMIT + 1;

fn serve(paths: &[&std::path::Path]) -> FuseFs {
    let mounts = paths
        .iter()
        .map(|p| Arc::new(MountFs::open(p, false).unwrap()))
        .collect();
    let f = FuseFs::new(mounts);
    ok(&f, &req(INIT, 0, &init_body(u32::MAX)));
    f
}

fn mounted(path: &std::path::Path) -> FuseFs {
    serve(&[path])
}

#[test]
fn init_offers_only_what_the_kernel_has_and_comes_first() {
    let d = tempfile::tempdir().unwrap();
    let f = FuseFs::new(vec![Arc::new(MountFs::open(d.path(), false).unwrap())]);
    // Nothing before INIT.
    let (e, _) = call(&f, &req(opcode::LOOKUP, 1, &B::default().name("x").0));
    assert_eq!(e, -libc::EIO);
    // Not a kernel we know.
    let old = B::default().u32(7).u32(20).u32(0).u32(0).0;
    assert_eq!(call(&f, &req(INIT, 0, &old)).0, -libc::EPROTO);
    let offered = init::ASYNC_READ | init::MAX_PAGES | (1 << 16); // writeback cache: never taken
    let b = ok(&f, &req(INIT, 0, &init_body(offered)));
    assert_eq!(b.len(), 64);
    assert_eq!((u32_at(&b, 0), u32_at(&b, 4)), (7, 31));
    assert_eq!(u32_at(&b, 8), 128 * 1024, "read-ahead is the kernel's");
    assert_eq!(u32_at(&b, 12), init::ASYNC_READ | init::MAX_PAGES);
    assert_eq!(u32_at(&b, 16 + 4), MAX_IO, "max_write");
    assert_eq!(u16::from_le_bytes([b[28], b[29]]), 256, "max_pages");
    // A short INIT is refused, not read past its end.
    assert_eq!(call(&f, &req(INIT, 0, &[7, 0, 0])).0, -libc::EINVAL);
}

#[test]
fn files_round_trip_with_fresh_names_and_cached_directories() {
    let d = tempfile::tempdir().unwrap();
    let f = mounted(d.path());
    // CREATE: entry then open_out.
    let b = ok(
        &f,
        &req(
            opcode::CREATE,
            R0,
            &B::default()
                .u32(libc::O_RDWR as u32)
                .u32(libc::S_IFREG | 0o640)
                .u32(0o022)
                .u32(0)
                .name("f")
                .0,
        ),
    );
    assert_eq!(b.len(), 128 + 16);
    let (node, entry_ttl, attr_ttl, size, mode) = entry(&b);
    assert_eq!((entry_ttl, attr_ttl, size), (TTL_SECS, TTL_SECS, 0));
    assert_eq!(mode, libc::S_IFREG | 0o640);
    let fh = u64_at(&b, 128);
    assert_eq!(u32_at(&b, 136), FOPEN_KEEP_CACHE);
    // A write's data stays in the transport's buffers; the header's length counts it.
    let write = B::default()
        .u64(fh)
        .u64(0)
        .u32(5)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .0;
    let w = req_with_len(opcode::WRITE, node, &write, Some(IN_HEADER as u32 + 40 + 5));
    let (e, b) = call_with(&f, &w, Mem::with(b"hello"));
    assert_eq!((e, u32_at(&b, 0)), (0, 5));
    assert_eq!(fs::read(d.path().join("f")).unwrap(), b"hello");
    let read = B::default()
        .u64(fh)
        .u64(1)
        .u32(100)
        .u32(0)
        .u64(0)
        .u32(0)
        .u32(0)
        .0;
    assert_eq!(ok(&f, &req(opcode::READ, node, &read)), b"ello");
    // LSEEK for data, FALLOCATE, SETATTR (size) through the handle.
    let b = ok(
        &f,
        &req(
            opcode::LSEEK,
            node,
            &B::default()
                .u64(fh)
                .u64(0)
                .u32(libc::SEEK_DATA as u32)
                .u32(0)
                .0,
        ),
    );
    assert_eq!(u64_at(&b, 0), 0);
    ok(
        &f,
        &req(
            opcode::FALLOCATE,
            node,
            &B::default().u64(fh).u64(0).u64(4096).u32(0).u32(0).0,
        ),
    );
    let mut setattr = B::default()
        .u32(FATTR_SIZE | FATTR_FH)
        .u32(0)
        .u64(fh)
        .u64(2)
        .0;
    setattr.resize(88, 0);
    let b = ok(&f, &req(opcode::SETATTR, node, &setattr));
    assert_eq!((u64_at(&b, 0), u64_at(&b, 16 + 8)), (TTL_SECS, 2));
    assert_eq!(fs::read(d.path().join("f")).unwrap(), b"he");
    // Write-only opens bypass the guest's page cache, others keep it.
    let b = ok(
        &f,
        &req(
            opcode::OPEN,
            node,
            &B::default().u32(libc::O_WRONLY as u32).u32(0).0,
        ),
    );
    assert_eq!(u32_at(&b, 8), FOPEN_DIRECT_IO);
    ok(
        &f,
        &req(
            opcode::RELEASE,
            node,
            &B::default().u64(u64_at(&b, 0)).raw(&[0; 16]).0,
        ),
    );
    ok(
        &f,
        &req(opcode::RELEASE, node, &B::default().u64(fh).raw(&[0; 16]).0),
    );
    // Names and attributes are trusted for a second.
    let b = ok(
        &f,
        &req(
            opcode::MKDIR,
            R0,
            &B::default().u32(0o755).u32(0).name("sub").0,
        ),
    );
    assert_eq!(entry(&b).1, TTL_SECS);
    let b = ok(&f, &req(opcode::LOOKUP, R0, &B::default().name("f").0));
    assert_eq!(entry(&b).0, node, "the same node: stable ids");
    assert_eq!(entry(&b).1, TTL_SECS);
    // Symlink and readlink.
    let b = ok(
        &f,
        &req(opcode::SYMLINK, R0, &B::default().name("l").name("f").0),
    );
    assert_eq!(ok(&f, &req(opcode::READLINK, entry(&b).0, &[])), b"f");
    // FIFOs are fine (the host never opens them), devices are not.
    let fifo = B::default().u32(libc::S_IFIFO | 0o600).u32(0).u32(0).u32(0);
    ok(&f, &req(opcode::MKNOD, R0, &fifo.name("p").0));
    let dev = B::default()
        .u32(libc::S_IFCHR | 0o600)
        .u32(0x0103)
        .u32(0)
        .u32(0);
    assert_eq!(
        call(&f, &req(opcode::MKNOD, R0, &dev.name("null").0)).0,
        -libc::EPERM
    );
    // RENAME2 with RENAME_NOREPLACE onto an existing name.
    let rename = B::default()
        .u64(R0)
        .u32(libc::RENAME_NOREPLACE)
        .u32(0)
        .name("f")
        .name("l")
        .0;
    assert_eq!(
        call(&f, &req(opcode::RENAME2, R0, &rename)).0,
        -libc::EEXIST
    );
    let b = ok(&f, &req(opcode::STATFS, R0, &[]));
    assert_eq!(b.len(), 80);
    // Unknown and unimplemented requests: ENOSYS, which the kernel remembers.
    assert_eq!(call(&f, &req(22, R0, &[])).0, -libc::ENOSYS); // GETXATTR
    assert_eq!(call(&f, &req(25, node, &[0; 24])).0, -libc::ENOSYS); // FLUSH
    assert_eq!(call(&f, &req(9999, R0, &[])).0, -libc::ENOSYS);
}

#[test]
fn directory_pages_fit_the_kernels_buffer_and_count_only_what_they_send() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..300 {
        fs::write(d.path().join(format!("entry-{i:04}")), "x").unwrap();
    }
    let f = mounted(d.path());
    for (op, per) in [(opcode::READDIR, 0), (opcode::READDIRPLUS, 128)] {
        let b = ok(&f, &req(opcode::OPENDIR, R0, &[0; 8]));
        let fh = u64_at(&b, 0);
        let (mut off, mut names) = (0u64, Vec::new());
        loop {
            let read = B::default()
                .u64(fh)
                .u64(off)
                .u32(4096)
                .u32(0)
                .raw(&[0; 16])
                .0;
            let b = ok(&f, &req(op, R0, &read));
            assert!(b.len() <= 4096, "{} bytes", b.len());
            if b.is_empty() {
                break;
            }
            let mut at = 0;
            while at < b.len() {
                let e = &b[at + per..];
                let namelen = u32_at(e, 16) as usize;
                names.push(String::from_utf8(e[24..24 + namelen].to_vec()).unwrap());
                off = u64_at(e, 8);
                at += per + dirent_size(namelen);
            }
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 302, "every entry once, with . and ..");
        ok(
            &f,
            &req(
                opcode::RELEASEDIR,
                R0,
                &B::default().u64(fh).raw(&[0; 16]).0,
            ),
        );
    }
    // READDIRPLUS counted one lookup per entry it sent, the lookup here one more: forgetting
    // two drops each node, one would not have.
    let mut nodes = Vec::new();
    let mut forgets = B::default().u32(300).u32(0);
    for i in 0..300 {
        let name = format!("entry-{i:04}");
        let b = ok(&f, &req(opcode::LOOKUP, R0, &B::default().name(&name).0));
        nodes.push(entry(&b).0);
        forgets = forgets.u64(entry(&b).0).u64(if i == 0 { 1 } else { 2 });
    }
    let mut out = Vec::new();
    assert!(!handle(
        &f,
        &req(opcode::BATCH_FORGET, 0, &forgets.0),
        &mut out
    ));
    assert!(out.is_empty());
    ok(&f, &req(opcode::GETATTR, nodes[0], &[0; 16]));
    for n in &nodes[1..] {
        assert_eq!(
            call(&f, &req(opcode::GETATTR, *n, &[0; 16])).0,
            -libc::ESTALE
        );
    }
}

#[test]
fn mounts_sit_under_a_read_only_root_by_index_and_never_mix() {
    let d = tempfile::tempdir().unwrap();
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    fs::create_dir(&one).unwrap();
    fs::write(one.join("a"), "in one").unwrap();
    let file = d.path().join("single.txt");
    fs::write(&file, "data").unwrap();
    fs::create_dir(&two).unwrap();
    let f = serve(&[&one, &file, &two]);
    let b = ok(&f, &req(opcode::GETATTR, 1, &[0; 16]));
    assert_eq!(u32_at(&b, 16 + 60), libc::S_IFDIR | 0o555);
    // Mounts by canonical index only.
    for bad in ["3", "01", "x", "-1", ""] {
        let (e, _) = call(&f, &req(opcode::LOOKUP, 1, &B::default().name(bad).0));
        assert_eq!(e, -libc::ENOENT, "{bad:?}");
    }
    let b = ok(&f, &req(opcode::LOOKUP, 1, &B::default().name("0").0));
    assert_eq!(entry(&b).0, R0);
    assert_eq!(entry(&b).4 & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(u64_at(&b, 40), R0, "st_ino is the node id");
    // A single file is the mount's root itself.
    let b = ok(&f, &req(opcode::LOOKUP, 1, &B::default().name("1").0));
    let (node, entry_ttl, _, size, mode) = entry(&b);
    assert_eq!((node, entry_ttl, size), (R1, TTL_SECS, 4));
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);
    let b = ok(
        &f,
        &req(
            opcode::OPEN,
            node,
            &B::default().u32(libc::O_RDONLY as u32).u32(0).0,
        ),
    );
    let read = B::default()
        .u64(u64_at(&b, 0))
        .u64(0)
        .u32(10)
        .u32(0)
        .raw(&[0; 16])
        .0;
    assert_eq!(ok(&f, &req(opcode::READ, node, &read)), b"data");
    // Node ids of different mounts differ, even for the same host inode numbers.
    let b = ok(&f, &req(opcode::LOOKUP, R0, &B::default().name("a").0));
    let a = entry(&b).0;
    assert_eq!(a / NODE_ID_LIMIT, 1);
    let r2 = 3 * NODE_ID_LIMIT + 1;
    // Nothing moves or links between mounts.
    let rename = B::default().u64(r2).name("a").name("a").0;
    assert_eq!(call(&f, &req(opcode::RENAME, R0, &rename)).0, -libc::EXDEV);
    let link = B::default().u64(a).name("a").0;
    assert_eq!(call(&f, &req(opcode::LINK, r2, &link)).0, -libc::EXDEV);
    assert!(one.join("a").exists() && !two.join("a").exists());
    // The root takes no changes and lists the mounts.
    let mkdir = B::default().u32(0o755).u32(0).name("x").0;
    assert_eq!(call(&f, &req(opcode::MKDIR, 1, &mkdir)).0, -libc::EROFS);
    assert_eq!(call(&f, &req(opcode::OPEN, 1, &[0; 8])).0, -libc::EACCES);
    let b = ok(&f, &req(opcode::OPENDIR, 1, &[0; 8]));
    let read = B::default()
        .u64(u64_at(&b, 0))
        .u64(0)
        .u32(4096)
        .u32(0)
        .raw(&[0; 16])
        .0;
    let b = ok(&f, &req(opcode::READDIR, 1, &read));
    let mut names = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let n = u32_at(&b, at + 16) as usize;
        names.push(String::from_utf8(b[at + 24..at + 24 + n].to_vec()).unwrap());
        at += dirent_size(n);
    }
    assert_eq!(names, [".", "..", "0", "1", "2"]);
    // Ids outside every mount.
    for bad in [0, 2, 4 * NODE_ID_LIMIT + 1, NODE_ID_LIMIT, u64::MAX] {
        assert_eq!(
            call(&f, &req(opcode::GETATTR, bad, &[0; 16])).0,
            -libc::ENOENT
        );
    }
}

#[test]
fn malformed_requests_get_errors_not_panics() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("f"), "x").unwrap();
    let f = mounted(d.path());
    let mut out = Vec::new();
    // Shorter than a header: nothing to answer to.
    assert!(!handle(&f, &[1, 2, 3], &mut out));
    // A length that disagrees with what arrived.
    let r = req_with_len(opcode::LOOKUP, R0, b"f\0", Some(41));
    assert_eq!(call(&f, &r).0, -libc::EINVAL);
    let r = req_with_len(opcode::LOOKUP, R0, b"f\0", Some(u32::MAX));
    assert_eq!(call(&f, &r).0, -libc::EINVAL);
    // A name without its NUL, truncated fixed arguments, a write shorter than it says.
    assert_eq!(call(&f, &req(opcode::LOOKUP, R0, b"f")).0, -libc::EINVAL);
    assert_eq!(
        call(&f, &req(opcode::SETATTR, R0, &[0; 20])).0,
        -libc::EINVAL
    );
    let write = B::default()
        .u64(1)
        .u64(0)
        .u32(100)
        .raw(&[0; 20])
        .raw(b"short")
        .0;
    assert_eq!(call(&f, &req(opcode::WRITE, R0, &write)).0, -libc::EINVAL);
    // A batch forget that claims more entries than it carries.
    let forgets = B::default().u32(u32::MAX).u32(0).u64(1).u64(1).0;
    assert!(!handle(
        &f,
        &req(opcode::BATCH_FORGET, 0, &forgets),
        &mut out
    ));
    // A handle that was never opened, a node that was never looked up.
    let read = B::default().u64(999).u64(0).u32(10).raw(&[0; 20]).0;
    assert_eq!(call(&f, &req(opcode::READ, R0, &read)).0, -libc::EBADF);
    assert_eq!(
        call(&f, &req(opcode::GETATTR, R0 + 12345, &[0; 16])).0,
        -libc::ESTALE
    );
    // Random requests: every opcode, random bodies, random lengths.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let r = next();
        let op = (r % 52) as u32;
        if op == INIT {
            continue;
        }
        let body: Vec<u8> = (0..(r >> 8) % 200).map(|_| next() as u8).collect();
        let len = (r >> 20 & 1 == 0).then_some((next() % 300) as u32);
        let mut out = Vec::new();
        let node = [1, R0, R0 + 1, next()][(r >> 30) as usize % 4];
        if let Some(n) = f.handle(
            &req_with_len(op, node, &body, len),
            &mut Mem::default(),
            &mut out,
        ) {
            assert!(u32_at(&out, 0) as usize == n && n >= out.len());
        }
    }
    assert_eq!(fs::read(d.path().join("f")).unwrap(), b"x");
}
