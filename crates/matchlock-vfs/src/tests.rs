use super::*;
use crate::op::{MemPayload, VfsOp as Op, VfsReply as R, VfsTime, ROOT_NODE};
use std::fs;
use std::os::unix::fs::MetadataExt;

fn srv(dir: &std::path::Path, ro: bool) -> MountFs {
    MountFs::open(dir, ro).unwrap()
}

/// Writes `data` through handle `fh`, handed over as the transport would.
fn write(fs: &MountFs, fh: u64, offset: u64, data: &[u8]) -> R {
    fs.handle_with(Op::Write { fh, offset }, Some(&mut MemPayload::with(data)))
}

/// Reads through handle `fh`: the reply, and the bytes the transport received.
fn read(fs: &MountFs, fh: u64, offset: u64, size: u32) -> (R, Vec<u8>) {
    let mut p = MemPayload::default();
    let r = fs.handle_with(Op::Read { fh, offset, size }, Some(&mut p));
    (r, p.read)
}

fn lookup(fs: &MountFs, parent: u64, name: &str) -> R {
    fs.handle(Op::Lookup {
        parent,
        name: name.into(),
    })
}

fn ino(r: R) -> u64 {
    match r {
        R::Entry(a) | R::Attr(a) | R::Created(a, _) => a.ino,
        other => panic!("{other:?}"),
    }
}

#[test]
fn names_that_climb_or_nest_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let fs = srv(d.path(), false);
    for bad in ["..", ".", "", "a/b", "../etc", "x\0y"] {
        assert!(matches!(lookup(&fs, ROOT_NODE, bad), R::Err(_)), "{bad:?}");
        assert!(matches!(
            fs.handle(Op::Create {
                parent: ROOT_NODE,
                name: bad.into(),
                mode: 0o644,
                flags: libc::O_WRONLY
            }),
            R::Err(_)
        ));
    }
    assert_eq!(
        lookup(&fs, ROOT_NODE, &"x".repeat(300)),
        R::Err(libc::ENAMETOOLONG)
    );
}

#[test]
fn host_symlinks_are_never_followed() {
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("secret"), "s").unwrap();
    let d = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), d.path().join("out")).unwrap();
    let fs = srv(d.path(), false);
    // The link itself is visible as a link...
    let id = ino(lookup(&fs, ROOT_NODE, "out"));
    assert_eq!(
        fs.handle(Op::Readlink { node: id }),
        R::Data(outside.path().as_os_str().as_encoded_bytes().to_vec())
    );
    // ...but nothing resolves through it, and it cannot be opened or listed.
    assert!(matches!(lookup(&fs, id, "secret"), R::Err(_)));
    assert!(matches!(
        fs.handle(Op::Open {
            node: id,
            flags: libc::O_RDONLY
        }),
        R::Err(_)
    ));
    assert!(matches!(fs.handle(Op::Opendir { node: id }), R::Err(_)));
    assert!(matches!(
        fs.handle(Op::Create {
            parent: id,
            name: "x".into(),
            mode: 0o644,
            flags: libc::O_WRONLY
        }),
        R::Err(_)
    ));
    // Creating over the link fails instead of writing through it.
    assert!(matches!(
        fs.handle(Op::Create {
            parent: ROOT_NODE,
            name: "out".into(),
            mode: 0o644,
            flags: libc::O_WRONLY
        }),
        R::Err(_)
    ));
    assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 1);
}

#[test]
fn read_only_refuses_every_write() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("f"), "data").unwrap();
    fs::create_dir(d.path().join("sub")).unwrap();
    let fs = srv(d.path(), true);
    let f = ino(lookup(&fs, ROOT_NODE, "f"));
    let n = |s: &str| s.as_bytes().to_vec();
    let ops = vec![
        Op::Create {
            parent: ROOT_NODE,
            name: n("new"),
            mode: 0o644,
            flags: libc::O_WRONLY,
        },
        Op::Mkdir {
            parent: ROOT_NODE,
            name: n("d"),
            mode: 0o755,
        },
        Op::Unlink {
            parent: ROOT_NODE,
            name: n("f"),
        },
        Op::Rmdir {
            parent: ROOT_NODE,
            name: n("sub"),
        },
        Op::Symlink {
            parent: ROOT_NODE,
            name: n("l"),
            target: n("f"),
        },
        Op::Rename {
            parent: ROOT_NODE,
            name: n("f"),
            new_parent: ROOT_NODE,
            new_name: n("g"),
            flags: 0,
        },
        Op::Link {
            node: f,
            new_parent: ROOT_NODE,
            new_name: n("h"),
        },
        Op::Open {
            node: f,
            flags: libc::O_WRONLY,
        },
        Op::Open {
            node: f,
            flags: libc::O_RDONLY | libc::O_TRUNC,
        },
        Op::Setattr {
            node: f,
            fh: None,
            mode: Some(0o600),
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: None,
        },
        Op::Setattr {
            node: f,
            fh: None,
            mode: None,
            uid: None,
            gid: None,
            size: Some(0),
            atime: None,
            mtime: None,
        },
    ];
    for op in ops {
        assert_eq!(fs.handle(op.clone()), R::Err(libc::EROFS), "{op:?}");
    }
    let R::OpenedFile(fh, _) = fs.handle(Op::Open {
        node: f,
        flags: libc::O_RDONLY,
    }) else {
        panic!()
    };
    assert_eq!(write(&fs, fh, 0, b"x"), R::Err(libc::EROFS));
    assert_eq!(read(&fs, fh, 0, 100), (R::Transferred(4), n("data")));
    assert_eq!(fs::read(d.path().join("f")).unwrap(), b"data");
    assert_eq!(fs::read_dir(d.path()).unwrap().count(), 2);
}

#[test]
fn special_files_are_not_opened() {
    let d = tempfile::tempdir().unwrap();
    let fifo = std::ffi::CString::new(d.path().join("p").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: fifo is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    let fs = srv(d.path(), false);
    let p = ino(lookup(&fs, ROOT_NODE, "p"));
    // Would block forever if opened.
    assert_eq!(
        fs.handle(Op::Open {
            node: p,
            flags: libc::O_RDONLY
        }),
        R::Err(libc::EACCES)
    );
    assert_eq!(
        fs.handle(Op::Create {
            parent: ROOT_NODE,
            name: b"p".to_vec(),
            mode: 0o644,
            flags: libc::O_WRONLY
        }),
        R::Err(libc::EACCES)
    );
}

#[test]
fn posix_basics_and_stable_inodes() {
    let d = tempfile::tempdir().unwrap();
    let fs = srv(d.path(), false);
    let R::Created(a, fh) = fs.handle(Op::Create {
        parent: ROOT_NODE,
        name: b"a".to_vec(),
        mode: 0o640,
        flags: libc::O_RDWR,
    }) else {
        panic!()
    };
    assert_eq!(write(&fs, fh, 0, b"hello"), R::Written(5));
    assert_eq!(
        fs.handle(Op::Fsync {
            fh,
            datasync: false
        }),
        R::Ok
    );
    assert_eq!(fs.handle(Op::Release { fh }), R::Ok);
    assert_eq!(fs::read(d.path().join("a")).unwrap(), b"hello");
    assert_eq!(ino(lookup(&fs, ROOT_NODE, "a")), a.ino);
    // A hard link is the same node.
    assert_eq!(
        ino(fs.handle(Op::Link {
            node: a.ino,
            new_parent: ROOT_NODE,
            new_name: b"b".to_vec()
        })),
        a.ino
    );
    // Rename over an existing file is atomic and the node follows.
    fs::write(d.path().join("c"), "old").unwrap();
    assert_eq!(
        fs.handle(Op::Rename {
            parent: ROOT_NODE,
            name: b"a".to_vec(),
            new_parent: ROOT_NODE,
            new_name: b"c".to_vec(),
            flags: 0
        }),
        R::Ok
    );
    assert_eq!(fs::read(d.path().join("c")).unwrap(), b"hello");
    assert!(matches!(
        fs.handle(Op::Getattr {
            node: a.ino,
            fh: None
        }),
        R::Attr(_)
    ));
    // Subtree paths follow a directory rename.
    let R::Entry(sub) = fs.handle(Op::Mkdir {
        parent: ROOT_NODE,
        name: b"d".to_vec(),
        mode: 0o755,
    }) else {
        panic!()
    };
    let R::Created(inner, fh) = fs.handle(Op::Create {
        parent: sub.ino,
        name: b"f".to_vec(),
        mode: 0o644,
        flags: libc::O_WRONLY,
    }) else {
        panic!()
    };
    fs.handle(Op::Release { fh });
    assert_eq!(
        fs.handle(Op::Rename {
            parent: ROOT_NODE,
            name: b"d".to_vec(),
            new_parent: ROOT_NODE,
            new_name: b"e".to_vec(),
            flags: 0
        }),
        R::Ok
    );
    assert!(matches!(
        fs.handle(Op::Getattr {
            node: inner.ino,
            fh: None
        }),
        R::Attr(_)
    ));
    assert_eq!(
        fs.handle(Op::Setattr {
            node: inner.ino,
            fh: None,
            mode: Some(0o600),
            uid: None,
            gid: None,
            size: Some(3),
            atime: None,
            mtime: Some(VfsTime::At(1000, 0))
        }),
        fs.handle(Op::Getattr {
            node: inner.ino,
            fh: None
        })
    );
    let m = fs::metadata(d.path().join("e/f")).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(
        (m.permissions().mode() & 0o777, m.len(), m.mtime()),
        (0o600, 3, 1000)
    );
    // No set-user-id bits reach the host, however the guest asks.
    fs.handle(Op::Setattr {
        node: inner.ino,
        fh: None,
        mode: Some(0o6755),
        uid: None,
        gid: None,
        size: None,
        atime: None,
        mtime: None,
    });
    assert_eq!(
        fs::metadata(d.path().join("e/f"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    let R::Created(_, fh) = fs.handle(Op::Create {
        parent: ROOT_NODE,
        name: b"suid".to_vec(),
        mode: 0o4755,
        flags: libc::O_WRONLY,
    }) else {
        panic!()
    };
    fs.handle(Op::Release { fh });
    assert_eq!(
        fs::metadata(d.path().join("suid"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    // A stale node (its file replaced on the host) does not answer for the new file: ESTALE
    // makes the guest's kernel look the name up again. (The old inode stays alive elsewhere so
    // its number cannot be reused.)
    fs::rename(d.path().join("e/f"), d.path().join("kept")).unwrap();
    fs::write(d.path().join("e/f"), "other").unwrap();
    assert_eq!(
        fs.handle(Op::Getattr {
            node: inner.ino,
            fh: None
        }),
        R::Err(libc::ESTALE)
    );
    // Symlinks store the guest's target verbatim.
    let R::Entry(l) = fs.handle(Op::Symlink {
        parent: ROOT_NODE,
        name: b"l".to_vec(),
        target: b"/etc/passwd".to_vec(),
    }) else {
        panic!()
    };
    assert_eq!(
        fs.handle(Op::Readlink { node: l.ino }),
        R::Data(b"/etc/passwd".to_vec())
    );
    // Readdir pages through everything.
    for i in 0..2000 {
        fs::write(d.path().join(format!("many{i}")), "").unwrap();
    }
    let R::Opened(dh) = fs.handle(Op::Opendir { node: ROOT_NODE }) else {
        panic!()
    };
    let (mut off, mut names) = (0, Vec::new());
    loop {
        let R::Entries(e) = fs.handle(Op::Readdir {
            fh: dh,
            offset: off,
            size: 4096,
        }) else {
            panic!()
        };
        let Some(last) = e.last() else { break };
        off = last.offset;
        names.extend(e.into_iter().map(|e| e.name));
    }
    assert_eq!(names.len(), 2000 + 6 + 2); // b c e kept l suid, . and ..
    assert_eq!(
        fs.handle(Op::Fsync {
            fh: dh,
            datasync: false
        }),
        R::Ok
    );
    assert!(matches!(fs.handle(Op::Statfs), R::Statfs(_)));
}

#[test]
fn single_file_root() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("f"), "one").unwrap();
    let fs = srv(&d.path().join("f"), false);
    assert_eq!(lookup(&fs, ROOT_NODE, "x"), R::Err(libc::ENOTDIR));
    let R::OpenedFile(fh, _) = fs.handle(Op::Open {
        node: ROOT_NODE,
        flags: libc::O_RDWR | libc::O_APPEND,
    }) else {
        panic!()
    };
    write(&fs, fh, 0, b"two");
    assert_eq!(fs::read(d.path().join("f")).unwrap(), b"onetwo");
}

/// Thousands of arbitrary operations (random ids, handles, hostile names, flags) neither panic
/// nor touch anything outside the root.
#[test]
fn random_operations_stay_inside_the_root() {
    let top = tempfile::tempdir().unwrap();
    let outside = top.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("keep"), "keep").unwrap();
    let root = top.path().join("root");
    fs::create_dir(&root).unwrap();
    std::os::unix::fs::symlink("../outside", root.join("up")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("abs")).unwrap();
    let fs = srv(&root, false);
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let names: [&[u8]; 9] = [
        b"a",
        b"b",
        b"..",
        b"up",
        b"abs",
        b"x/y",
        b"",
        b"d",
        b"\xff\xfe",
    ];
    let mut ids = vec![ROOT_NODE, 0, 2, u64::MAX];
    let mut fhs = vec![0, 1, 2, u64::MAX];
    for _ in 0..5000 {
        let r = next();
        let id = ids[(r >> 8) as usize % ids.len()];
        let id2 = ids[(r >> 16) as usize % ids.len()];
        let fh = fhs[(r >> 24) as usize % fhs.len()];
        let name = names[(r >> 32) as usize % names.len()].to_vec();
        let name2 = names[(r >> 40) as usize % names.len()].to_vec();
        let flags = [
            libc::O_RDONLY,
            libc::O_RDWR,
            libc::O_WRONLY | libc::O_TRUNC,
            libc::O_RDWR | libc::O_APPEND,
        ][(r >> 48) as usize % 4];
        let op = match r % 20 {
            0 => Op::Lookup { parent: id, name },
            1 => Op::Forget {
                nodes: vec![(id, r >> 60)],
            },
            2 => Op::Getattr {
                node: id,
                fh: Some(fh),
            },
            3 => Op::Setattr {
                node: id,
                fh: Some(fh),
                mode: Some((r >> 20) as u32),
                uid: None,
                gid: None,
                size: Some(r >> 50),
                atime: Some(VfsTime::Now),
                mtime: None,
            },
            4 => Op::Readlink { node: id },
            5 => Op::Mkdir {
                parent: id,
                name,
                mode: 0o755,
            },
            6 => Op::Unlink { parent: id, name },
            7 => Op::Rmdir { parent: id, name },
            8 => Op::Symlink {
                parent: id,
                name,
                target: name2,
            },
            9 => Op::Rename {
                parent: id,
                name,
                new_parent: id2,
                new_name: name2,
                flags: (r >> 58) as u32 & 3,
            },
            10 => Op::Link {
                node: id,
                new_parent: id2,
                new_name: name2,
            },
            11 => Op::Open { node: id, flags },
            12 => Op::Create {
                parent: id,
                name,
                mode: 0o644,
                flags,
            },
            13 => Op::Read {
                fh,
                offset: r >> 40,
                size: (r >> 12) as u32,
            },
            14 => Op::Write {
                fh,
                offset: r >> 50,
            },
            15 => Op::Release { fh },
            16 => Op::Fsync {
                fh,
                datasync: r & 1 == 0,
            },
            17 => Op::Opendir { node: id },
            18 => Op::ReaddirPlus {
                fh,
                offset: r >> 40,
                size: (r >> 20) as u32 & 0xffff,
            },
            _ => Op::Readdir {
                fh,
                offset: r >> 40,
                size: (r >> 20) as u32 & 0xffff,
            },
        };
        match fs.handle_with(op, Some(&mut MemPayload::with(b"w"))) {
            R::EntriesPlus(es) => ids.extend(es.iter().filter_map(|e| e.attr).map(|a| a.ino)),
            R::Entry(a) | R::Attr(a) => ids.push(a.ino),
            R::Created(a, h) => {
                ids.push(a.ino);
                fhs.push(h);
            }
            R::Opened(h) | R::OpenedFile(h, _) => fhs.push(h),
            _ => {}
        }
    }
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
    assert_eq!(fs::read(outside.join("keep")).unwrap(), b"keep");
}

#[test]
fn block_rules_refuse_matching_operations() {
    use crate::rules::BlockRule;
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("secret.env"), "k=v").unwrap();
    fs::write(d.path().join("notes"), "n").unwrap();
    let rules = vec![
        BlockRule {
            ops: vec!["read".into(), "open".into()],
            path: "/w/*.env".into(),
        },
        BlockRule {
            ops: vec!["remove".into(), "rename".into()],
            path: "/w/notes".into(),
        },
        BlockRule {
            ops: vec!["write".into()],
            path: "".into(),
        },
    ];
    let fs = srv(d.path(), false).with_rules("/w/", rules);
    let env = ino(lookup(&fs, ROOT_NODE, "secret.env"));
    assert_eq!(
        fs.handle(Op::Open {
            node: env,
            flags: libc::O_RDONLY
        }),
        R::Err(libc::EPERM)
    );
    let notes = ino(lookup(&fs, ROOT_NODE, "notes"));
    let R::OpenedFile(fh, _) = fs.handle(Op::Open {
        node: notes,
        flags: libc::O_RDWR,
    }) else {
        panic!()
    };
    assert!(matches!(read(&fs, fh, 0, 10).0, R::Transferred(_)));
    assert_eq!(write(&fs, fh, 0, b"x"), R::Err(libc::EPERM));
    assert_eq!(
        fs.handle(Op::Unlink {
            parent: ROOT_NODE,
            name: b"notes".to_vec()
        }),
        R::Err(libc::EPERM)
    );
    // A rename is checked at both ends.
    assert_eq!(
        fs.handle(Op::Rename {
            parent: ROOT_NODE,
            name: b"secret.env".to_vec(),
            new_parent: ROOT_NODE,
            new_name: b"notes".to_vec(),
            flags: 0
        }),
        R::Err(libc::EPERM)
    );
    assert_eq!(
        fs.handle(Op::Rename {
            parent: ROOT_NODE,
            name: b"secret.env".to_vec(),
            new_parent: ROOT_NODE,
            new_name: b"plain".to_vec(),
            flags: 0
        }),
        R::Ok
    );
    // Under its new name the file is no longer covered, as in Matchlock (rules match paths).
    assert!(matches!(
        fs.handle(Op::Open {
            node: env,
            flags: libc::O_RDONLY
        }),
        R::OpenedFile(..)
    ));
    assert_eq!(fs::read(d.path().join("notes")).unwrap(), b"n");
}

#[test]
fn owner_override_shows_fixed_ids_and_refuses_other_chowns() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("f"), "x").unwrap();
    let host = fs::metadata(d.path().join("f")).unwrap();
    let owner = Owner {
        uid: Some(4242),
        gid: Some(4343),
    };
    let fs = srv(d.path(), false).with_owner(owner);
    let R::Entry(a) = lookup(&fs, ROOT_NODE, "f") else {
        panic!()
    };
    assert_eq!((a.uid, a.gid), (4242, 4343));
    let chown = |uid, gid| Op::Setattr {
        node: a.ino,
        fh: None,
        mode: None,
        uid,
        gid,
        size: None,
        atime: None,
        mtime: None,
    };
    // chown to the shown owner is a no-op that succeeds; to anyone else it is refused.
    assert!(matches!(fs.handle(chown(Some(4242), Some(4343))), R::Attr(a) if a.uid == 4242));
    assert_eq!(fs.handle(chown(Some(0), None)), R::Err(libc::EPERM));
    assert_eq!(fs.handle(chown(None, Some(7))), R::Err(libc::EPERM));
    let after = fs::metadata(d.path().join("f")).unwrap();
    assert_eq!((after.uid(), after.gid()), (host.uid(), host.gid()));
    // Files the guest creates show the same owner.
    let R::Created(c, _) = fs.handle(Op::Create {
        parent: ROOT_NODE,
        name: b"new".to_vec(),
        mode: 0o644,
        flags: libc::O_WRONLY,
    }) else {
        panic!()
    };
    assert_eq!((c.uid, c.gid), (4242, 4343));
    // Only uid overridden: gid is the host's.
    let fs = srv(d.path(), false).with_owner(Owner {
        uid: Some(1),
        gid: None,
    });
    let R::Entry(a) = lookup(&fs, ROOT_NODE, "f") else {
        panic!()
    };
    assert_eq!((a.uid, a.gid), (1, host.gid()));
}

#[test]
fn completed_operations_are_reported_with_guest_paths() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("sub")).unwrap();
    let (tx, mut rx) = tokio::sync::broadcast::channel(64);
    let fs = srv(d.path(), false)
        .with_rules("/workspace", Vec::new())
        .with_events(tx);
    let sub = ino(lookup(&fs, ROOT_NODE, "sub"));
    let R::Created(_, fh) = fs.handle(Op::Create {
        parent: sub,
        name: b"a.txt".to_vec(),
        mode: 0o644,
        flags: libc::O_WRONLY,
    }) else {
        panic!()
    };
    write(&fs, fh, 0, b"hello");
    fs.handle(Op::Release { fh });
    // A failed operation is not reported.
    assert_eq!(lookup(&fs, ROOT_NODE, "missing"), R::Err(libc::ENOENT));
    let mut got = Vec::new();
    while let Ok(e) = rx.try_recv() {
        // Sizes of directories vary by host file system; the write's is the bytes written.
        let size = if e.op == "write" { e.size } else { 0 };
        got.push((e.op.clone(), e.path, size));
    }
    assert_eq!(
        got,
        vec![
            ("stat".to_string(), "/workspace/sub".to_string(), 0),
            ("create".into(), "/workspace/sub/a.txt".into(), 0),
            ("write".into(), "/workspace/sub/a.txt".into(), 5),
            ("close".into(), "/workspace/sub/a.txt".into(), 0),
        ]
    );
}

#[test]
fn write_events_carry_the_files_mode_and_owner() {
    let d = tempfile::tempdir().unwrap();
    let (tx, mut rx) = tokio::sync::broadcast::channel(64);
    let fs = srv(d.path(), false)
        .with_rules("/w", Vec::new())
        .with_owner(Owner {
            uid: Some(1000),
            gid: Some(1001),
        })
        .with_events(tx);
    let R::Created(_, fh) = fs.handle(Op::Create {
        parent: ROOT_NODE,
        name: b"m.txt".to_vec(),
        mode: 0o640,
        flags: libc::O_WRONLY,
    }) else {
        panic!()
    };
    write(&fs, fh, 0, b"abc");
    let write_event = std::iter::from_fn(|| rx.try_recv().ok())
        .find(|e| e.op == "write")
        .unwrap();
    assert_eq!(write_event.size, 3);
    assert_eq!(write_event.mode, libc::S_IFREG | 0o640);
    assert_eq!((write_event.uid, write_event.gid), (1000, 1001));
}

/// A private mount (memory, watched overlay) holds at most its quota: writes, fallocate and
/// new entries past it fail with ENOSPC, removing files gives space back, and `statfs` shows
/// the quota. New entries belong to the guest user that made them.
#[test]
fn private_mounts_keep_to_their_quota_and_give_entries_to_their_creator() {
    let d = tempfile::tempdir().unwrap();
    let limit = 256 * 1024;
    let fs = srv(d.path(), false).private(limit, 0);
    let create = |name: &str| {
        fs.handle_from(
            Op::Create {
                parent: ROOT_NODE,
                name: name.into(),
                mode: 0o644,
                flags: libc::O_WRONLY,
            },
            None,
            Some((1234, 5678)),
        )
    };
    let R::Created(a, fh) = create("big") else {
        panic!()
    };
    // Running as root, the entry is the caller's; otherwise the server keeps it.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert_eq!((a.uid, a.gid), (1234, 5678));
        let meta = fs::metadata(d.path().join("big")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
    }
    let chunk = vec![7u8; 64 * 1024];
    let mut written = 0u64;
    let full = loop {
        match write(&fs, fh, written, &chunk) {
            R::Written(n) => written += u64::from(n),
            R::Err(e) => break e,
            other => panic!("{other:?}"),
        }
        assert!(written <= limit, "wrote {written} past a quota of {limit}");
    };
    assert_eq!(full, libc::ENOSPC);
    assert!(written >= 128 * 1024, "only {written} bytes fit");
    // Rewriting what is already there needs no more space.
    assert!(matches!(write(&fs, fh, 0, &chunk), R::Written(_)));
    assert_eq!(
        fs.handle(Op::Fallocate {
            fh,
            mode: 0,
            offset: written,
            length: limit,
        }),
        R::Err(libc::ENOSPC)
    );
    let R::Statfs(st) = fs.handle(Op::Statfs) else {
        panic!()
    };
    assert_eq!(st.blocks * u64::from(st.frsize), limit);
    assert!(st.bfree * u64::from(st.frsize) < 64 * 1024);
    fs.handle(Op::Release { fh });
    // Entries cost too: empty files cannot exhaust the host's inodes.
    let mut n = 0;
    while let R::Created(_, fh) = create(&format!("e{n}")) {
        fs.handle(Op::Release { fh });
        n += 1;
        assert!(n < 100, "entries are not charged");
    }
    // Removing the big file gives its space back.
    assert_eq!(
        fs.handle(Op::Unlink {
            parent: ROOT_NODE,
            name: b"big".to_vec()
        }),
        R::Ok
    );
    let R::Created(_, fh) = create("again") else {
        panic!("space was not given back")
    };
    assert!(matches!(write(&fs, fh, 0, &chunk), R::Written(_)));
}

#[test]
fn readdirplus_describes_entries_counts_lookups_and_honours_stat_rules() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("a"), "aaa").unwrap();
    fs::create_dir(d.path().join("sub")).unwrap();
    fs::write(d.path().join("hidden.env"), "x").unwrap();
    let rule = crate::rules::BlockRule {
        ops: vec!["stat".into()],
        path: "/w/*.env".into(),
    };
    let fs = srv(d.path(), false).with_rules("/w", vec![rule]);
    let R::Opened(dh) = fs.handle(Op::Opendir { node: ROOT_NODE }) else {
        panic!()
    };
    let R::EntriesPlus(es) = fs.handle(Op::ReaddirPlus {
        fh: dh,
        offset: 0,
        size: 4096,
    }) else {
        panic!()
    };
    let by_name: std::collections::HashMap<Vec<u8>, _> =
        es.iter().map(|e| (e.entry.name.clone(), e.attr)).collect();
    assert_eq!(by_name.len(), 5, "{es:?}");
    assert!(by_name[&b".".to_vec()].is_none() && by_name[&b"..".to_vec()].is_none());
    assert!(
        by_name[&b"hidden.env".to_vec()].is_none(),
        "a stat rule hides it"
    );
    let a = by_name[&b"a".to_vec()].unwrap();
    assert_eq!(a.size, 3);
    assert_eq!(
        by_name[&b"sub".to_vec()].unwrap().mode & libc::S_IFMT,
        libc::S_IFDIR
    );
    // The entry is a real node: usable at once, and gone once its one lookup is forgotten.
    assert!(matches!(fs.handle(Op::Getattr { node: a.ino, fh: None }), R::Attr(x) if x.size == 3));
    fs.handle(Op::Forget {
        nodes: vec![(a.ino, 1)],
    });
    assert_eq!(
        fs.handle(Op::Getattr {
            node: a.ino,
            fh: None
        }),
        R::Err(libc::ESTALE)
    );
    // Past the end: empty.
    let last = es.last().unwrap().entry.offset;
    assert_eq!(
        fs.handle(Op::ReaddirPlus {
            fh: dh,
            offset: last,
            size: 4096,
        }),
        R::EntriesPlus(Vec::new())
    );
}

/// An open of a file the host changed after the guest last heard of it fails with ESTALE (the
/// kernel then looks again and retries); the guest's own writes do not count as changes, and
/// the retry goes through even if the host changed the file again meanwhile.
#[test]
fn opens_of_files_changed_on_the_host_ask_the_guest_to_look_again() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("f"), "one").unwrap();
    let fs = srv(d.path(), false);
    let node = ino(lookup(&fs, ROOT_NODE, "f"));
    let open = |flags| fs.handle(Op::Open { node, flags });
    let R::OpenedFile(fh, _) = open(libc::O_RDWR) else {
        panic!()
    };
    // The guest's own write is not a host change.
    write(&fs, fh, 3, b" two");
    assert!(matches!(open(libc::O_RDONLY), R::OpenedFile(..)));
    // A host change is; the retried open passes, whatever the host did in between.
    fs::write(d.path().join("f"), "changed on the host").unwrap();
    assert_eq!(open(libc::O_RDONLY), R::Err(libc::ESTALE));
    assert_eq!(ino(lookup(&fs, ROOT_NODE, "f")), node);
    fs::write(d.path().join("f"), "changed again").unwrap();
    assert!(matches!(open(libc::O_RDONLY), R::OpenedFile(..)));
    // The next change is refused again, at once.
    fs::write(d.path().join("f"), "and again").unwrap();
    assert_eq!(open(libc::O_RDONLY), R::Err(libc::ESTALE));
    // An open that cannot be retried (no lookup comes) passes within the window; after it, an
    // unseen change is refused again.
    assert!(matches!(open(libc::O_RDONLY), R::OpenedFile(..)));
    std::thread::sleep(super::ops::RETRY_WINDOW);
    assert_eq!(open(libc::O_RDONLY), R::Err(libc::ESTALE));
    // A truncating open does not care, and counts as the guest's own change.
    assert!(matches!(
        open(libc::O_WRONLY | libc::O_TRUNC),
        R::OpenedFile(..)
    ));
    std::thread::sleep(super::ops::RETRY_WINDOW);
    assert!(matches!(open(libc::O_RDONLY), R::OpenedFile(..)));
}

/// A host's setuid-root program in a shared directory: whatever way the guest changes its
/// content (write, truncating open, truncate, fallocate), the set-id bits go first, as they
/// would for an unprivileged writer; a read leaves them alone.
#[test]
fn changing_a_set_id_file_clears_its_bits_first() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let fs = srv(d.path(), false);
    let mode_of = |name: &str| fs::metadata(d.path().join(name)).unwrap().mode() & 0o7777;
    let plant = |name: &str, mode: u32| {
        let p = d.path().join(name);
        fs::write(&p, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        ino(lookup(&fs, ROOT_NODE, name))
    };
    let open = |node, flags| match fs.handle(Op::Open { node, flags }) {
        R::OpenedFile(fh, _) => fh,
        other => panic!("{other:?}"),
    };

    let n = plant("read", 0o6755);
    let fh = open(n, libc::O_RDONLY);
    assert!(matches!(read(&fs, fh, 0, 10).0, R::Transferred(_)));
    assert_eq!(mode_of("read"), 0o6755, "reading keeps the bits");

    let n = plant("write", 0o6755);
    let fh = open(n, libc::O_WRONLY);
    assert_eq!(mode_of("write"), 0o755, "an open for writing clears them");
    // Set again on the host behind the open handle: the write itself clears them.
    fs::set_permissions(d.path().join("write"), fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(write(&fs, fh, 0, b"pwn"), R::Written(3));
    assert_eq!(mode_of("write"), 0o755);
    fs::set_permissions(d.path().join("write"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs.handle(Op::Fallocate {
        fh,
        mode: 0,
        offset: 0,
        length: 4096,
    });
    assert_eq!(mode_of("write"), 0o755, "fallocate");

    let n = plant("trunc", 0o4711);
    fs.handle(Op::Setattr {
        node: n,
        fh: None,
        mode: None,
        uid: None,
        gid: None,
        size: Some(0),
        atime: None,
        mtime: None,
    });
    assert_eq!(mode_of("trunc"), 0o711, "truncate");

    plant("create", 0o4755);
    let r = fs.handle(Op::Create {
        parent: ROOT_NODE,
        name: b"create".to_vec(),
        mode: 0o644,
        flags: libc::O_WRONLY | libc::O_TRUNC,
    });
    assert!(matches!(r, R::Created(..)), "{r:?}");
    assert_eq!(mode_of("create"), 0o755, "create over an existing file");

    // Set-group-id without group execute marks mandatory locking, not a privilege: it stays.
    let n = plant("lock", 0o2644);
    open(n, libc::O_WRONLY);
    assert_eq!(mode_of("lock"), 0o2644);
}

/// The guest can neither set set-id bits on directories nor hand shared host files to
/// arbitrary owners; the file's own ids and the mount root's owner stay allowed.
#[test]
fn guests_cannot_make_setgid_dirs_or_give_host_files_away() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("dir")).unwrap();
    fs::write(d.path().join("f"), "x").unwrap();
    let fs = srv(d.path(), false);
    let setattr = |node, mode, uid, gid| {
        fs.handle(Op::Setattr {
            node,
            fh: None,
            mode,
            uid,
            gid,
            size: None,
            atime: None,
            mtime: None,
        })
    };
    let dir = ino(lookup(&fs, ROOT_NODE, "dir"));
    setattr(dir, Some(0o2775), None, None);
    assert_eq!(
        fs::metadata(d.path().join("dir")).unwrap().mode() & 0o7777,
        0o775
    );
    let f = ino(lookup(&fs, ROOT_NODE, "f"));
    let me = fs::metadata(d.path()).unwrap();
    for (uid, gid) in [
        (Some(4242), None),
        (None, Some(4242)),
        (Some(0), Some(4242)),
    ] {
        if (uid, gid) == (Some(me.uid()), Some(me.gid())) {
            continue;
        }
        assert_eq!(
            setattr(f, None, uid, gid),
            R::Err(libc::EPERM),
            "{uid:?}:{gid:?}"
        );
    }
    assert_eq!(fs::metadata(d.path().join("f")).unwrap().uid(), me.uid());
    assert!(matches!(
        setattr(f, None, Some(me.uid()), Some(me.gid())),
        R::Attr(_)
    ));
    // A private mount (memory, overlay copy) belongs to the sandbox: any owner goes.
    let p = tempfile::tempdir().unwrap();
    fs::write(p.path().join("f"), "x").unwrap();
    let private = MountFs::open(p.path(), false).unwrap().private(1 << 20, 0);
    let f = ino(private.handle(Op::Lookup {
        parent: ROOT_NODE,
        name: b"f".to_vec(),
    }));
    let r = private.handle(Op::Setattr {
        node: f,
        fh: None,
        mode: None,
        uid: Some(4242),
        gid: Some(4242),
        size: None,
        atime: None,
        mtime: None,
    });
    assert!(matches!(r, R::Attr(_)), "{r:?}");
}

/// The supervisor refuses to open a root reached through a symlink, even one planted after the
/// request was checked.
#[test]
fn roots_reached_through_symlinks_are_refused() {
    let d = tempfile::tempdir().unwrap();
    fs::create_dir(d.path().join("real")).unwrap();
    std::os::unix::fs::symlink("real", d.path().join("link")).unwrap();
    std::os::unix::fs::symlink(d.path(), d.path().join("up")).unwrap();
    for p in ["link", "up/real"] {
        let e = MountFs::open(&d.path().join(p), false).err().unwrap();
        assert!(e.to_string().contains("symlink"), "{p}: {e}");
    }
    assert!(MountFs::open(&d.path().join("real"), false).is_ok());
}

/// A guest that never forgets what it looked up runs into the node limit (`ENFILE`), not the
/// host's memory; forgetting frees room again.
#[test]
fn node_limit_bounds_what_the_supervisor_remembers() {
    let d = tempfile::tempdir().unwrap();
    let n = 1 << 14;
    for i in 0..=n {
        fs::write(d.path().join(format!("f{i}")), "").unwrap();
    }
    let fs = srv(d.path(), false).with_node_limit(0);
    let mut ids = Vec::new();
    // The root is a node too.
    for i in 0..n - 1 {
        ids.push(ino(lookup(&fs, ROOT_NODE, &format!("f{i}"))));
    }
    assert_eq!(
        lookup(&fs, ROOT_NODE, &format!("f{n}")),
        R::Err(libc::ENFILE)
    );
    fs.handle(Op::Forget {
        nodes: vec![(ids[0], 1)],
    });
    assert!(matches!(
        lookup(&fs, ROOT_NODE, &format!("f{n}")),
        R::Entry(_)
    ));
    assert_eq!(crate::node_limit(512 << 20), 262_144);
}
