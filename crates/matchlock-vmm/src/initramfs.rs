//! The initramfs: the guest agent as `/init`, plus the few nodes the kernel needs before it runs.
//!
//! Written by hand in the cpio "newc" format the kernel unpacks: a 110-byte ASCII header per entry,
//! name and data padded to 4 bytes, a `TRAILER!!!` entry at the end. The format is a dozen lines and
//! writing it ourselves lets us create `/dev/console` (a device node) without root. It is left
//! uncompressed: the kernel would spend longer inflating it (under TCG especially) than QEMU spends
//! copying it.

use crate::{cache_dir, sha256_hex, write_atomic, VmmError};
use std::path::{Path, PathBuf};

struct Entry<'a> {
    name: &'a str,
    mode: u32,
    data: &'a [u8],
    rdev: (u32, u32),
}

/// Builds the initramfs image bytes around `agent` (the static agent binary).
pub fn build(agent: &[u8]) -> Vec<u8> {
    let entries = [
        Entry {
            name: "dev",
            mode: 0o040755,
            data: &[],
            rdev: (0, 0),
        },
        // The kernel opens /dev/console for PID 1's stdio before devtmpfs is mounted.
        Entry {
            name: "dev/console",
            mode: 0o020600,
            data: &[],
            rdev: (5, 1),
        },
        Entry {
            name: "proc",
            mode: 0o040755,
            data: &[],
            rdev: (0, 0),
        },
        Entry {
            name: "sys",
            mode: 0o040755,
            data: &[],
            rdev: (0, 0),
        },
        Entry {
            name: "run",
            mode: 0o040755,
            data: &[],
            rdev: (0, 0),
        },
        Entry {
            name: "newroot",
            mode: 0o040755,
            data: &[],
            rdev: (0, 0),
        },
        Entry {
            name: "init",
            mode: 0o100755,
            data: agent,
            rdev: (0, 0),
        },
    ];
    let mut out = Vec::with_capacity(agent.len() + 4096);
    for (i, e) in entries.iter().enumerate() {
        push_entry(&mut out, i as u32 + 1, e);
    }
    push_entry(
        &mut out,
        0,
        &Entry {
            name: "TRAILER!!!",
            mode: 0,
            data: &[],
            rdev: (0, 0),
        },
    );
    out
}

fn push_entry(out: &mut Vec<u8>, ino: u32, e: &Entry) {
    let nlink = if e.mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        ino,
        e.mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        e.data.len() as u32,
        0,
        0,
        e.rdev.0,
        e.rdev.1,
        e.name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(e.name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(e.data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Returns the path of the initramfs for `agent`, building and caching it (by the agent's hash) on
/// first use.
pub fn cached(agent: &Path) -> Result<PathBuf, VmmError> {
    let bin = std::fs::read(agent).map_err(VmmError::io(format!(
        "reading guest agent {}",
        agent.display()
    )))?;
    let path = cache_dir()
        .join("initramfs")
        .join(format!("{}.cpio", &sha256_hex(&bin)[..16]));
    if !path.is_file() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(VmmError::io(format!("creating {}", dir.display())))?;
        }
        write_atomic(&path, &build(&bin))
            .map_err(VmmError::io(format!("writing {}", path.display())))?;
        if let Some(dir) = path.parent() {
            prune(dir, &path, STALE_AFTER);
        }
    }
    Ok(path)
}

/// How old another agent's initramfs must be before it is removed. Each agent build leaves one
/// (3 MB); two builds in use on one host (a release and a development one) must not keep
/// removing each other's, so only old ones go, and only when a new one is written.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// Removes the `*.cpio` files in `dir` other than `keep` last written more than `age` ago. A
/// sandbox still using one only loses its template (keyed on the file); QEMU read it at start.
fn prune(dir: &Path, keep: &Path, age: std::time::Duration) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|a| a > age);
        if p != keep && p.extension().is_some_and(|x| x == "cpio") && old {
            let _ = std::fs::remove_file(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn old_initramfs_files_of_other_agents_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in ["current.cpio", "old.cpio", "recent.cpio", "old.other"] {
            std::fs::write(d.join(f), f).unwrap();
        }
        let long_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(90 * 86400);
        for f in ["current.cpio", "old.cpio", "old.other"] {
            let file = std::fs::File::options()
                .write(true)
                .open(d.join(f))
                .unwrap();
            file.set_modified(long_ago).unwrap();
        }
        super::prune(d, &d.join("current.cpio"), super::STALE_AFTER);
        let mut left: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["current.cpio", "old.other", "recent.cpio"]);
    }

    #[test]
    fn cpio_lists_with_gnu_cpio() {
        let img = super::build(b"#!/bin/true\n");
        assert!(img.len().is_multiple_of(4));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("i.cpio");
        std::fs::write(&f, &img).unwrap();
        // GNU cpio (installed by .ci/run) is the independent reader.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -t < {}", f.display()))
            .output()
            .unwrap();
        assert!(out.status.success());
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.lines().any(|l| l == "init"), "{list}");
        assert!(list.lines().any(|l| l == "dev/console"), "{list}");
    }
}
