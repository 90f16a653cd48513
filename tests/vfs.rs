//! Workspace mounts end to end: `matchlock run -v` boots a VM whose virtio-fs mounts are served by
//! the supervisor from host directories. Busybox tools stand in for real workloads.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Everything observable about a host tree: per relative path, type+mode, size, mtime, and the
/// content or link target.
fn snapshot(root: &Path) -> BTreeMap<String, (u32, u64, i64, i64, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u32, u64, i64, i64, Vec<u8>)>) {
        let meta = fs::symlink_metadata(dir).unwrap();
        let rel = dir.strip_prefix(root).unwrap().display().to_string();
        let body = if meta.file_type().is_symlink() {
            fs::read_link(dir)
                .unwrap()
                .as_os_str()
                .as_encoded_bytes()
                .to_vec()
        } else if meta.is_file() {
            fs::read(dir).unwrap()
        } else {
            Vec::new()
        };
        out.insert(
            rel,
            (
                meta.mode(),
                meta.len(),
                meta.mtime(),
                meta.mtime_nsec(),
                body,
            ),
        );
        if meta.is_dir() {
            for e in fs::read_dir(dir).unwrap() {
                walk(root, &e.unwrap().path(), out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn seed(dir: &Path) {
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("a"), "alpha\n").unwrap();
    fs::write(dir.join("sub/b"), "beta\n").unwrap();
    fs::write(dir.join("x"), "ex\n").unwrap();
    fs::write(dir.join("gone"), "soon\n").unwrap();
    std::os::unix::fs::symlink("a", dir.join("link")).unwrap();
}

/// The POSIX workflow through a live `host_fs` mount, escape attempts, and host changes seen by
/// the guest, in one sandbox.
#[test]
fn host_fs_posix_workflow_escapes_and_live_changes() {
    let host = tempfile::tempdir().unwrap();
    let src = host.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("later.txt"), "before\n").unwrap();
    // Something outside the mount that a symlink in the mount points to.
    let outside = host.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("secret"), "top secret\n").unwrap();
    std::os::unix::fs::symlink(&outside, src.join("out")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", src.join("rel")).unwrap();
    let outside_before = snapshot(&outside);
    let escape_name = format!("matchlock-vfs-escape-{}", std::process::id());
    assert!(!Path::new("/etc").join(&escape_name).exists());

    let spec = format!("{}:src:host_fs", src.display());
    let sb = Sandbox::detached(&["-v", &spec], &["sleep", "600"]);
    let script = format!(
        r#"set -e
cd /workspace/src
echo one > f; echo two >> f
printf 'line\n' > log; printf 'more\n' >> log
echo new > tmp; echo old > target; mv tmp target
ln -s target link; test "$(readlink link)" = target; test "$(cat link)" = new
ln f hard; test "$(stat -c %i f)" = "$(stat -c %i hard)"; test "$(stat -c %h f)" = 2
test "$(stat -c %i f)" = "$(stat -c %i f)"
chmod 640 f; test "$(stat -c %a f)" = 640
touch -d '2001-02-03 04:05:06' log
printf 'abcdef' > t; truncate -s 3 t; test "$(cat t)" = abc; truncate -s 10 t; test "$(stat -c %s t)" = 10
mkdir -p d/e; echo deep > d/e/file; mv d moved; test "$(cat moved/e/file)" = deep
mkdir gone; rmdir gone; test ! -e gone
rm moved/e/file; rmdir moved/e
sync f; sync .
dd if=/dev/urandom of=big bs=64k count=64 2>/dev/null; sha256sum big | cut -d' ' -f1 > big.sum
i=0; while [ $i -lt 300 ]; do : > many$i; i=$((i+1)); done
test "$(ls | grep -c '^many')" = 300
rm many*; test "$(ls | grep -c '^many' || true)" = 0
stat -f . >/dev/null
# Escapes: nothing below resolves on the host.
if cat out/secret 2>/dev/null; then echo ESCAPED-READ; fi
if cat rel 2>/dev/null; then echo ESCAPED-REL; fi
if echo pwn 2>/dev/null > out/evil; then echo ESCAPED-WRITE; fi
test "$(cd /workspace/src/../.. && pwd)" = /
ln -s /etc etc_link; echo pwn > etc_link/{escape_name}; test -f /etc/{escape_name}
echo POSIX-OK
"#
    );
    let out = sb.exec(&["sh", "-c", &script]);
    let text = stdout(&out);
    assert!(
        out.status.success() && text.contains("POSIX-OK"),
        "script failed: {text}\n{}",
        stderr(&out)
    );
    assert!(!text.contains("ESCAPED"), "{text}");

    // The guest's changes are on the host, with the right shapes.
    assert_eq!(fs::read_to_string(src.join("f")).unwrap(), "one\ntwo\n");
    assert_eq!(fs::read_to_string(src.join("log")).unwrap(), "line\nmore\n");
    assert_eq!(fs::read_to_string(src.join("target")).unwrap(), "new\n");
    assert!(!src.join("tmp").exists());
    assert_eq!(
        fs::read_link(src.join("link")).unwrap(),
        Path::new("target")
    );
    let (f, hard) = (
        fs::metadata(src.join("f")).unwrap(),
        fs::metadata(src.join("hard")).unwrap(),
    );
    assert_eq!((f.ino(), f.nlink()), (hard.ino(), 2));
    assert_eq!(f.permissions().mode() & 0o777, 0o640);
    let log = fs::metadata(src.join("log")).unwrap();
    assert_eq!(log.mtime(), 981173106, "touch -d set the host mtime (UTC)");
    assert_eq!(fs::read(src.join("t")).unwrap(), b"abc\0\0\0\0\0\0\0");
    assert!(src.join("moved").is_dir() && !src.join("moved/e").exists());
    let big = fs::read(src.join("big")).unwrap();
    assert_eq!(big.len(), 64 * 65536);
    let sum = fs::read_to_string(src.join("big.sum")).unwrap();
    let host_sum = stdout(
        &std::process::Command::new("sha256sum")
            .arg(src.join("big"))
            .output()
            .unwrap(),
    );
    assert!(host_sum.starts_with(sum.trim()), "{sum} vs {host_sum}");
    // The escape attempts touched nothing outside the mount.
    assert_eq!(snapshot(&outside), outside_before);
    assert!(!Path::new("/etc").join(&escape_name).exists());
    assert_eq!(
        fs::read_link(src.join("etc_link")).unwrap(),
        Path::new("/etc")
    );

    // Host changes show up in the guest: a new file, and a file the guest never looked at.
    fs::write(src.join("fromhost"), "hello from the host\n").unwrap();
    fs::write(src.join("later.txt"), "after, and longer\n").unwrap();
    let out = sb.exec(&["cat", "/workspace/src/fromhost", "/workspace/src/later.txt"]);
    assert_eq!(
        ok(out),
        "hello from the host\nafter, and longer\n",
        "host changes are visible"
    );
}

/// `ro` refuses every write class; `overlay` lets the guest write but leaves the host
/// byte-identical; single files mount in every mode.
#[test]
fn read_only_and_overlay_never_touch_the_host() {
    let host = tempfile::tempdir().unwrap();
    let (ro, ov) = (host.path().join("ro"), host.path().join("ov"));
    seed(&ro);
    seed(&ov);
    let (cfg, ovf, rwf) = (
        host.path().join("cfg.txt"),
        host.path().join("ovf.txt"),
        host.path().join("rwf.txt"),
    );
    fs::write(&cfg, "config\n").unwrap();
    fs::write(&ovf, "overlay file\n").unwrap();
    fs::write(&rwf, "live file\n").unwrap();
    let before = (snapshot(&ro), snapshot(&ov), snapshot(&cfg), snapshot(&ovf));

    let specs = [
        format!("{}:ro:ro", ro.display()),
        format!("{}:ov", ov.display()),
        format!("{}:cfg.txt:ro", cfg.display()),
        format!("{}:/etc/ovf.txt:overlay", ovf.display()),
        format!("{}:rwf.txt:host_fs", rwf.display()),
    ];
    let mut args = vec!["run", "--image", BUSYBOX];
    for s in &specs {
        args.extend(["-v", s.as_str()]);
    }
    let script = r#"
cd /workspace/ro
for cmd in 'echo x > a' 'echo x >> a' 'echo x > new' 'rm a' 'mv a c' 'mv sub/b b' 'mkdir d' \
    'rmdir sub' 'ln -s a l2' 'ln a h2' 'chmod 777 a' 'truncate -s 0 a' 'touch a' 'chown 1:1 a' \
    'mkfifo p' 'rm link' 'echo x >> /workspace/cfg.txt' 'truncate -s 0 /workspace/cfg.txt'; do
  if sh -c "$cmd" 2>/dev/null; then echo "RO-ALLOWED: $cmd"; fi
done
test "$(cat a sub/b link)" = "$(printf 'alpha\nbeta\nalpha')" && echo RO-READ-OK
test "$(cat /workspace/cfg.txt)" = config && echo CFG-OK
cd /workspace/ov
set -e
echo changed > a; echo more >> sub/b; echo n > new; rm gone; mv x y; mkdir d; ln -s a l2
ln a hardlink; chmod 600 a; truncate -s 1 sub/b; touch -d '2001-01-01 00:00:00' y; rm link
test "$(cat a)" = changed; test "$(cat sub/b)" = b; test ! -e gone; test "$(stat -c %a a)" = 600
echo appended >> /workspace/rwf.txt
echo over > /etc/ovf.txt; test "$(cat /etc/ovf.txt)" = over
echo OVERLAY-OK
"#;
    args.extend(["--", "sh", "-c", script]);
    let out = run(&args);
    let text = stdout(&out);
    assert!(out.status.success(), "run failed: {text}\n{}", stderr(&out));
    assert!(!text.contains("RO-ALLOWED"), "{text}");
    for mark in ["RO-READ-OK", "CFG-OK", "OVERLAY-OK"] {
        assert!(
            text.contains(mark),
            "{mark} missing: {text}\n{}",
            stderr(&out)
        );
    }
    let after = (snapshot(&ro), snapshot(&ov), snapshot(&cfg), snapshot(&ovf));
    assert!(before == after, "the host changed: {before:?} -> {after:?}");
    assert_eq!(fs::read_to_string(&rwf).unwrap(), "live file\nappended\n");
}

/// Bad `-v` specs fail before anything boots, with a message naming the problem.
#[test]
fn bad_volume_specs_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let host = d.path().display().to_string();
    for (spec, needle) in [
        (format!("{host}:x:bogus"), "unknown mode"),
        ("/nonexistent/matchlock:x".to_string(), "host path"),
        (format!("{host}:../x"), ".."),
        (host.clone(), "HOST:GUEST"),
    ] {
        let out = run(&["run", "--image", BUSYBOX, "-v", &spec, "--", "true"]);
        assert!(!out.status.success(), "{spec} was accepted");
        assert!(stderr(&out).contains(needle), "{spec}: {}", stderr(&out));
    }
}

/// A real git workflow in a live `host_fs` workspace; the host's own git then reads the result.
#[test]
fn git_workflow_in_the_workspace() {
    let py = python_image();
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    fs::create_dir(&repo).unwrap();
    let spec = format!("{}:repo:host_fs", repo.display());
    let script = "set -e; cd /workspace/repo; git init -q -b main; \
        git config user.email t@example.com; git config user.name tester; \
        printf 'one\\n' > f; mkdir -p d; printf 'x\\n' > d/g; git add -A; git commit -qm first; \
        git checkout -qb feature; printf 'two\\n' >> f; git mv d/g d/h; git commit -qam second; \
        git checkout -q main; cat f; git merge -q feature; git log --format=%s | tr '\\n' ' '; \
        git status --porcelain | wc -l";
    let out = ok(run(&[
        "run",
        "--image",
        py,
        "--workspace",
        "/workspace",
        "-v",
        &spec,
        "--",
        "sh",
        "-c",
        script,
    ]));
    assert_eq!(out, "one\nsecond first 0\n");
    // The host's git sees a sound repository with both commits and the merged tree.
    let git = |args: &[&str]| {
        let o = std::process::Command::new("git")
            .arg("-C")
            .arg(&repo)
            .args(args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    git(&["fsck", "--strict"]);
    assert_eq!(git(&["log", "--format=%s"]), "second\nfirst\n");
    assert_eq!(fs::read_to_string(repo.join("f")).unwrap(), "one\ntwo\n");
    assert!(repo.join("d/h").exists() && !repo.join("d/g").exists());
}

/// Files past 4 GiB stay sparse on the host and read back at their offsets, both ways; a
/// directory of 100 000 entries lists completely and its entries resolve. (The entries are made
/// on the host, and listed with a shell glob rather than `ls`, which stats every entry: making
/// 100 000 guest inodes costs about a minute of emulated kernel time under TCG, while the
/// listing itself is what crosses the protocol's paging.)
#[test]
fn sparse_files_past_4gib_and_100k_entry_directories() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("w");
    let many = root.join("many");
    fs::create_dir_all(&many).unwrap();
    for i in 0..100_000 {
        fs::File::create(many.join(format!("e{i:06}"))).unwrap();
    }
    const FIVE_GIB: u64 = 5 << 30;
    let host_big = fs::File::create(root.join("hostbig")).unwrap();
    host_big.set_len(FIVE_GIB).unwrap();
    std::os::unix::fs::FileExt::write_at(&host_big, b"HOST", FIVE_GIB - 4).unwrap();
    drop(host_big);

    let spec = format!("{}:w:host_fs", root.display());
    let script = format!(
        "set -e; cd /workspace/w
truncate -s {FIVE_GIB} big
printf tail | dd of=big bs=1 seek=$(({FIVE_GIB} - 4)) conv=notrunc 2>/dev/null
stat -c %s big
tail -c 4 big; echo
tail -c 4 hostbig; echo
count() {{ set -- many/*; echo $#; eval echo \\${{$#}}; }}
count
stat -c %s many/e099999 many/e050000
echo made > many/e100000; count"
    );
    let out = ok(run(&[
        "run", "--image", BUSYBOX, "-v", &spec, "--", "sh", "-c", &script,
    ]));
    assert_eq!(
        out,
        format!("{FIVE_GIB}\ntail\nHOST\n100000\nmany/e099999\n0\n0\n100001\nmany/e100000\n")
    );
    let big = fs::metadata(root.join("big")).unwrap();
    assert_eq!(big.len(), FIVE_GIB);
    assert!(
        big.blocks() * 512 < 1 << 20,
        "the 5 GiB file is not sparse on the host: {} blocks",
        big.blocks()
    );
    let mut tail = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(
        &fs::File::open(root.join("big")).unwrap(),
        &mut tail,
        FIVE_GIB - 4,
    )
    .unwrap();
    assert_eq!(&tail, b"tail");
}

/// SQLite in the workspace, with a rollback journal and in WAL mode (whose shared-memory index is a
/// shared writable mapping of a workspace file): transactions commit, fsync reaches the host, and
/// the host's own SQLite then reads a consistent database.
#[test]
fn sqlite_journal_and_wal_in_the_workspace() {
    let py = python_image();
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("{}:db:host_fs", dir.path().display());
    let script = r#"
import sqlite3
for name, mode in (("journal.db", "DELETE"), ("wal.db", "WAL")):
    c = sqlite3.connect("/workspace/db/" + name)
    assert c.execute("PRAGMA journal_mode=" + mode).fetchone()[0].upper() == mode
    c.execute("PRAGMA synchronous=FULL")
    c.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
    with c:
        c.executemany("INSERT INTO t (v) VALUES (?)", [("row %d" % i,) for i in range(500)])
    with c:
        c.execute("UPDATE t SET v = 'changed' WHERE k % 2 = 0")
    try:
        with c:
            c.execute("DELETE FROM t")
            raise RuntimeError("roll back")
    except RuntimeError:
        pass
    assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    if mode == "WAL":
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(name, c.execute("SELECT count(*), sum(v = 'changed') FROM t").fetchone())
    c.close()
"#;
    let out = ok(run(&[
        "run", "--image", py, "-v", &spec, "--", "python3", "-c", script,
    ]));
    assert_eq!(out, "journal.db (500, 250)\nwal.db (500, 250)\n");
    for name in ["journal.db", "wal.db"] {
        let check = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import sqlite3; c = sqlite3.connect('file:{}?mode=ro', uri=True); \
                 print(c.execute('PRAGMA integrity_check').fetchone()[0], \
                 c.execute(\"SELECT count(*), sum(v = 'changed') FROM t\").fetchone())",
                dir.path().join(name).display()
            ))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&check.stdout),
            "ok (500, 250)\n",
            "{name}: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// Reads of 256 KiB or more on ranges the guest has not cached go straight to the host (our guest
/// kernel's stream-read patch); small reads, mapped files and cached ranges use the page cache.
/// Every way returns the host's bytes, before and after the host rewrites the file.
#[test]
fn large_small_and_mapped_reads_agree_with_the_host() {
    let py = python_image();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&file, &data).unwrap();
    let spec = format!("{}:d:host_fs", dir.path().display());
    let sb = Sandbox::detached_from(py, &["-v", &spec], &["sleep", "600"]);
    let script = r#"
import hashlib, mmap, sys
p = "/workspace/d/f"
def chunks(bs, skip=0):
    h = hashlib.sha256()
    with open(p, "rb", buffering=0) as f:
        f.seek(skip)
        while True:
            b = f.read(bs)
            if not b:
                return h.hexdigest()
            h.update(b)
def cached():
    for l in open("/proc/meminfo"):
        if l.startswith("Cached:"):
            return int(l.split()[1]) // 1024
c0 = cached()
out = [chunks(1 << 20)]
c1 = cached()
out.append(chunks(4096))
c2 = cached()
out += [chunks(1 << 20), chunks(3 << 20, 12345)]
with open(p, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    out.append(hashlib.sha256(m[:]).hexdigest())
    out.append(chunks(1 << 20))  # mapped: through the page cache
    m.close()
print(" ".join(out), c1 - c0, c2 - c1)
"#;
    let sha = |b: &[u8]| {
        let mut c = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        c.stdin.take().unwrap().write_all(b).unwrap();
        stdout(&c.wait_with_output().unwrap())
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let (all, tail) = (sha(&data), sha(&data[12345..]));
    let want = [&all, &all, &all, &tail, &all, &all];
    let got = ok(sb.exec(&["python3", "-c", script]));
    let got: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(
        got[..6],
        want,
        "1M, 4K, 1M again, 3M from an offset, mmap, 1M while mapped"
    );
    // MiB the page cache grew by: the 1 MiB reads of the fresh file bypassed it, the 4 KiB
    // reads filled it.
    let (big, small): (i64, i64) = (got[6].parse().unwrap(), got[7].parse().unwrap());
    assert!(
        big < 2 && small >= 7,
        "cache growth: 1M reads {big} MiB, 4K reads {small} MiB"
    );

    // The host rewrites the middle and grows the file: the next opens see it, whichever way
    // they read and whatever the guest had cached.
    let mut data = data;
    data[3 << 20..(3 << 20) + 4096].fill(0xab);
    data.extend_from_slice(&[7u8; 300_000]);
    fs::write(&file, &data).unwrap();
    let (all, tail) = (sha(&data), sha(&data[12345..]));
    let got = ok(sb.exec(&["python3", "-c", script]));
    let got: Vec<&str> = got.split_whitespace().collect();
    assert_eq!(
        got[..6],
        [&all, &all, &all, &tail, &all, &all],
        "after the host's change"
    );
}

/// QEMU's virtio-fs device waits for the workspace server before QEMU greets its monitor: the
/// supervisor must serve the one before it waits for the other. When it did not, every start
/// with a `-v` mount stalled for the monitor's whole 30 s limit and then ran without pause.
#[test]
fn a_workspace_mount_does_not_hold_up_qemus_monitor() {
    let host = tempfile::tempdir().unwrap();
    fs::write(host.path().join("f"), "in the workspace\n").unwrap();
    let spec = format!("{}:w:ro", host.path().display());
    let o = run(&[
        "run",
        "--rm=false",
        "--image",
        BUSYBOX,
        "-v",
        &spec,
        "--",
        "cat",
        "/workspace/w/f",
    ]);
    assert_eq!(stdout(&o), "in the workspace\n", "{}", stderr(&o));
    let err = stderr(&o);
    let id = running_id(&err);
    let log = fs::read_to_string(home().join("vms").join(&id).join("logs/supervisor.log"))
        .unwrap_or_default();
    let _ = run(&["kill", &id]);
    let _ = run(&["rm", &id]);
    assert!(log.contains("guest ready"), "{log}");
    assert!(
        !log.contains("QEMU's monitor"),
        "the monitor did not connect: {log}"
    );
}
