//! Store tests: tarballs are built in memory with the `tar` crate; the resulting ext4 images are
//! inspected with debugfs. No VM needed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::*;

mod registry;

// ---------------------------------------------------------------------------------------------
// Tarball builders

enum Ent<'a> {
    Dir(&'a str, u32, u32, u32),
    File(&'a str, u32, u32, u32, &'a [u8]),
    Sym(&'a str, &'a str, u32, u32),
    Hard(&'a str, &'a str),
    Char(&'a str, u32, u32, u32),
    Fifo(&'a str),
    /// A regular file with PAX xattrs.
    XattrFile(&'a str, &'a [(&'a str, &'a [u8])]),
}

/// Build an uncompressed layer tar. Names are written raw into the header so hostile paths
/// (`..`, absolute) reach the importer unchanged.
fn layer(entries: &[Ent]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let (name, link, data): (&str, Option<&str>, &[u8]) = match e {
            Ent::Dir(n, mode, uid, gid) => {
                h.set_entry_type(EntryType::Directory);
                h.set_mode(*mode);
                h.set_uid(*uid as u64);
                h.set_gid(*gid as u64);
                (n, None, b"")
            }
            Ent::File(n, mode, uid, gid, data) => {
                h.set_entry_type(EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*uid as u64);
                h.set_gid(*gid as u64);
                (n, None, data)
            }
            Ent::Sym(n, target, uid, gid) => {
                h.set_entry_type(EntryType::Symlink);
                h.set_mode(0o777);
                h.set_uid(*uid as u64);
                h.set_gid(*gid as u64);
                (n, Some(target), b"")
            }
            Ent::Hard(n, target) => {
                h.set_entry_type(EntryType::Link);
                h.set_mode(0o644);
                (n, Some(target), b"")
            }
            Ent::Char(n, mode, major, minor) => {
                h.set_entry_type(EntryType::Char);
                h.set_mode(*mode);
                h.set_device_major(*major).unwrap();
                h.set_device_minor(*minor).unwrap();
                (n, None, b"")
            }
            Ent::Fifo(n) => {
                h.set_entry_type(EntryType::Fifo);
                h.set_mode(0o644);
                (n, None, b"")
            }
            Ent::XattrFile(n, attrs) => {
                let exts: Vec<(String, &[u8])> = attrs
                    .iter()
                    .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                    .collect();
                b.append_pax_extensions(exts.iter().map(|(k, v)| (k.as_str(), *v)))
                    .unwrap();
                h.set_entry_type(EntryType::Regular);
                h.set_mode(0o755);
                (n, None, b"#!/bin/sh\n")
            }
        };
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            old.linkname = [0; 100];
            old.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[derive(Clone, Copy)]
enum Comp {
    None,
    Gzip,
    Zstd,
}

fn compress(data: &[u8], c: Comp) -> Vec<u8> {
    match c {
        Comp::None => data.to_vec(),
        Comp::Gzip => gzip(data),
        Comp::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

fn config_json(layers: &[Vec<u8>], run: serde_json::Value) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2024-05-01T10:00:00Z",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

fn outer(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

fn oci_tar(layers: &[Vec<u8>], comp: Comp, run: serde_json::Value) -> Vec<u8> {
    let config = config_json(layers, run);
    let blobs: Vec<Vec<u8>> = layers.iter().map(|l| compress(l, comp)).collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
        "layers": blobs.iter().map(|b| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(b), "size": b.len()})).collect::<Vec<_>>(),
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest), "size": manifest.len()}],
    }))
    .unwrap();
    let mut files = vec![
        (
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".to_string(), index),
        (
            format!("blobs/sha256/{}", &sha(&manifest)[7..]),
            manifest.clone(),
        ),
        (
            format!("blobs/sha256/{}", &sha(&config)[7..]),
            config.clone(),
        ),
    ];
    for b in blobs {
        files.push((format!("blobs/sha256/{}", &sha(&b)[7..]), b));
    }
    outer(&files)
}

fn docker_tar(layers: &[Vec<u8>], run: serde_json::Value) -> Vec<u8> {
    let config = config_json(layers, run);
    let config_name = format!("{}.json", &sha(&config)[7..]);
    let layer_names: Vec<String> = (0..layers.len())
        .map(|i| format!("l{i}/layer.tar"))
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!([
        {"Config": config_name, "RepoTags": ["test:latest"], "Layers": layer_names}
    ]))
    .unwrap();
    let mut files = vec![
        ("manifest.json".to_string(), manifest),
        (config_name, config),
    ];
    for (name, l) in layer_names.iter().zip(layers) {
        files.push((name.clone(), l.clone()));
    }
    outer(&files)
}

fn sh_run() -> serde_json::Value {
    serde_json::json!({"Env": ["PATH=/bin", "A=1"], "Cmd": ["sh"]})
}

fn store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::open(dir.path().join("images")).unwrap();
    (dir, store)
}

fn unprivileged(mut s: ImageStore) -> ImageStore {
    s.force_unprivileged = true;
    s
}

// ---------------------------------------------------------------------------------------------
// ext4 inspection

#[derive(Debug)]
struct Stat {
    kind: String,
    mode: u32,
    uid: u32,
    gid: u32,
    links: u32,
    raw: String,
}

fn debugfs(img: &Path, cmd: &str) -> (String, String) {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(img)
        .output()
        .expect("debugfs runs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn field<'a>(raw: &'a str, key: &str) -> Option<&'a str> {
    let at = raw.find(key)? + key.len();
    raw[at..].split_whitespace().next()
}

fn stat(img: &Path, path: &str) -> Option<Stat> {
    let (out, _) = debugfs(img, &format!("stat \"{path}\""));
    if !out.contains("Inode:") {
        return None;
    }
    Some(Stat {
        kind: field(&out, "Type:")?.to_string(),
        mode: u32::from_str_radix(field(&out, "Mode:")?, 8).ok()?,
        uid: field(&out, "User:")?.parse().ok()?,
        gid: field(&out, "Group:")?.parse().ok()?,
        links: field(&out, "Links:")?.parse().ok()?,
        raw: out,
    })
}

fn cat(img: &Path, path: &str) -> String {
    debugfs(img, &format!("cat \"{path}\"")).0
}

fn fsck_clean(img: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn tmp_is_empty(store: &ImageStore) -> bool {
    std::fs::read_dir(store.root().join("tmp"))
        .unwrap()
        .next()
        .is_none()
}

// ---------------------------------------------------------------------------------------------
// References, commands, env

#[test]
fn normalize_reference_cases() {
    let ok = |i: &str, o: &str| assert_eq!(normalize_reference(i).unwrap(), o, "{i}");
    ok("busybox", "docker.io/library/busybox:latest");
    ok("busybox:1.36", "docker.io/library/busybox:1.36");
    ok("x/y:1", "docker.io/x/y:1");
    ok("localhost:5000/a", "localhost:5000/a:latest");
    ok("localhost/a:v", "localhost/a:v");
    ok(
        "ghcr.io/owner/repo/sub:tag_1.0-x",
        "ghcr.io/owner/repo/sub:tag_1.0-x",
    );
    ok(
        "index.docker.io/library/alpine",
        "docker.io/library/alpine:latest",
    );
    ok(
        "docker.io/library/busybox:latest",
        "docker.io/library/busybox:latest",
    );
    ok("my_repo/a__b.c-d", "docker.io/my_repo/a__b.c-d:latest");
    let d = format!("sha256:{}", "a".repeat(64));
    ok(&format!("a@{d}"), &format!("docker.io/library/a@{d}"));
    ok(&format!("a:t@{d}"), &format!("docker.io/library/a:t@{d}"));
    for bad in [
        "",
        "  ",
        "Busybox",
        "a/B",
        "a b",
        "a:",
        "a:-x",
        "a@sha256:abc",
        "a@md5:00",
        "a//b",
        "a/",
        "-a",
        "a..b",
        "a$",
    ] {
        let err = normalize_reference(bad).unwrap_err();
        assert!(
            matches!(err, ImageError::InvalidReference { .. }),
            "{bad}: {err}"
        );
        assert!(!err.to_string().contains('\n'));
    }
    assert!(normalize_reference("Busybox")
        .unwrap_err()
        .to_string()
        .contains("lower-case"));
}

fn cfg(ep: Option<&[&str]>, cmd: Option<&[&str]>) -> ImageConfig {
    let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    ImageConfig {
        entrypoint: ep.map(v),
        cmd: cmd.map(v),
        ..Default::default()
    }
}

#[test]
fn compose_command_cases() {
    let s = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let both = cfg(Some(&["/bin/echo", "entry:"]), Some(&["default-cmd"]));
    assert_eq!(
        compose_command(&both, None, &[]).unwrap(),
        s(&["/bin/echo", "entry:", "default-cmd"])
    );
    // args replace CMD, entrypoint kept
    assert_eq!(
        compose_command(&both, None, &s(&["a", "b"])).unwrap(),
        s(&["/bin/echo", "entry:", "a", "b"])
    );
    // --entrypoint "" clears the entrypoint (and CMD)
    assert_eq!(
        compose_command(&both, Some(&[]), &s(&["ls", "-l"])).unwrap(),
        s(&["ls", "-l"])
    );
    assert!(matches!(
        compose_command(&both, Some(&[]), &[]),
        Err(ImageError::NoCommand)
    ));
    // override drops the image CMD
    assert_eq!(
        compose_command(&both, Some(&s(&["/bin/sh"])), &[]).unwrap(),
        s(&["/bin/sh"])
    );
    assert_eq!(
        compose_command(&both, Some(&s(&["/bin/sh"])), &s(&["-c", "x"])).unwrap(),
        s(&["/bin/sh", "-c", "x"])
    );
    // an override is a single word, not split
    assert_eq!(
        compose_command(&both, Some(&s(&["a b"])), &[]).unwrap(),
        s(&["a b"])
    );
    let only_cmd = cfg(None, Some(&["sh"]));
    assert_eq!(compose_command(&only_cmd, None, &[]).unwrap(), s(&["sh"]));
    assert_eq!(
        compose_command(&only_cmd, None, &s(&["id"])).unwrap(),
        s(&["id"])
    );
    let empty = ImageConfig::default();
    let err = compose_command(&empty, None, &[]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no command: the image has no ENTRYPOINT or CMD; give one after --"
    );
    assert_eq!(
        compose_command(&empty, None, &s(&["true"])).unwrap(),
        s(&["true"])
    );
}

#[test]
fn merge_env_cases() {
    let p = |k: &str, v: &str| (k.to_string(), v.to_string());
    let img = vec![
        "A=1".to_string(),
        "B=x=y".to_string(),
        "A=2".to_string(),
        "NOEQ".to_string(),
    ];
    assert_eq!(
        merge_env(&img, &[p("B", "u"), p("C", "3")]),
        vec![
            p("PATH", DEFAULT_PATH),
            p("A", "2"),
            p("B", "u"),
            p("C", "3")
        ]
    );
    let img = vec!["PATH=/x".to_string()];
    assert_eq!(merge_env(&img, &[]), vec![p("PATH", "/x")]);
    assert_eq!(
        merge_env(&[], &[p("PATH", "/y"), p("PATH", "/z")]),
        vec![p("PATH", "/z")]
    );
}

// ---------------------------------------------------------------------------------------------
// Import

#[test]
fn not_found_message_is_actionable() {
    let (_d, s) = store();
    let err = s.resolve("busybox").unwrap_err();
    assert_eq!(
        err.to_string(),
        "image \"busybox:latest\" is not in the local store; pull it with 'matchlock pull busybox' or import it with 'matchlock image import busybox < image.tar'"
    );
    assert!(matches!(
        s.remove("busybox"),
        Err(ImageError::NotFound { .. })
    ));
}

fn whiteout_layers() -> Vec<Vec<u8>> {
    let l1 = layer(&[
        Ent::Dir("a/", 0o755, 0, 0),
        Ent::File("a/x", 0o644, 0, 0, b"x"),
        Ent::File("a/y", 0o644, 0, 0, b"y"),
        Ent::Dir("b/", 0o755, 0, 0),
        Ent::File("b/1", 0o644, 0, 0, b"1"),
        Ent::Dir("b/sub/", 0o755, 0, 0),
        Ent::File("b/sub/2", 0o644, 0, 0, b"2"),
        Ent::File("c", 0o644, 0, 0, b"c"),
        Ent::Dir("d/", 0o755, 0, 0),
        Ent::File("d/keep", 0o644, 0, 0, b"k"),
        Ent::File("e", 0o644, 0, 0, b"old"),
    ]);
    let l2 = layer(&[
        Ent::File("a/.wh.x", 0o644, 0, 0, b""),
        Ent::Dir("b/", 0o750, 0, 0),
        // Written before the opaque marker in the same layer: must survive it.
        Ent::File("b/new", 0o644, 0, 0, b"new"),
        Ent::File("b/.wh..wh..opq", 0o644, 0, 0, b""),
        Ent::File(".wh.c", 0o644, 0, 0, b""),
        Ent::File("d/.wh.missing", 0o644, 0, 0, b""),
        Ent::File("nodir/.wh.x", 0o644, 0, 0, b""),
        Ent::File("e", 0o600, 0, 0, b"new"),
    ]);
    let l3 = layer(&[Ent::File("c", 0o644, 0, 0, b"again")]);
    vec![l1, l2, l3]
}

#[test]
fn multi_layer_whiteouts_and_opaque_dirs() {
    for comp in [Comp::Gzip, Comp::Zstd, Comp::None] {
        let (_d, s) = store();
        let info = s
            .import(
                "test",
                oci_tar(&whiteout_layers(), comp, sh_run()).as_slice(),
            )
            .unwrap();
        let img = &info.rootfs;
        assert!(stat(img, "/a/x").is_none());
        assert_eq!(cat(img, "/a/y"), "y");
        assert_eq!(cat(img, "/b/new"), "new");
        assert!(stat(img, "/b/1").is_none());
        assert!(stat(img, "/b/sub").is_none());
        assert_eq!(stat(img, "/b").unwrap().mode, 0o750);
        assert_eq!(cat(img, "/c"), "again");
        assert_eq!(cat(img, "/d/keep"), "k");
        assert_eq!(cat(img, "/e"), "new");
        assert_eq!(stat(img, "/e").unwrap().mode, 0o600);
        let (ls, _) = debugfs(img, "ls /");
        assert!(
            !ls.contains(".wh.") && !ls.contains("nodir"),
            "whiteouts must not reach the image: {ls}"
        );
        fsck_clean(img);
        assert!(tmp_is_empty(&s));
    }
}

fn special_layer() -> Vec<u8> {
    layer(&[
        Ent::Dir("./", 0o755, 0, 0),
        Ent::Dir("bin/", 0o755, 0, 0),
        Ent::File("bin/tool", 0o4755, 0, 0, b"\x7fELF tool"),
        Ent::File("bin/sg", 0o2755, 0, 50, b"sg"),
        Ent::Hard("bin/tool-link", "bin/tool"),
        Ent::Sym("bin/sh", "/bin/busybox", 0, 0),
        Ent::Sym("home-link", "home/app", 1000, 1000),
        Ent::Dir("home/app/", 0o750, 1000, 1000),
        Ent::File("home/app/secret", 0o600, 1000, 1000, b"s3cret"),
        Ent::Dir("tmp/", 0o1777, 0, 0),
        Ent::Dir("ro/", 0o555, 0, 0),
        Ent::File("ro/none", 0o000, 0, 0, b"unreadable"),
        Ent::Dir("dev/", 0o755, 0, 0),
        Ent::Char("dev/null", 0o666, 1, 3),
        Ent::Fifo("dev/fifo"),
        Ent::File("/abs/file", 0o644, 0, 0, b"abs"),
        Ent::File("odd name \"q\"", 0o644, 7, 7, b"q"),
        Ent::XattrFile("bin/cap", &[("user.matchlock", b"yes")]),
    ])
}

fn check_special(img: &Path) {
    let tool = stat(img, "/bin/tool").unwrap();
    assert_eq!(
        (tool.mode, tool.uid, tool.gid, tool.links),
        (0o4755, 0, 0, 2),
        "{}",
        tool.raw
    );
    let link = stat(img, "/bin/tool-link").unwrap();
    assert_eq!(
        field(&link.raw, "Inode:"),
        field(&tool.raw, "Inode:"),
        "hardlink shares the inode"
    );
    let sg = stat(img, "/bin/sg").unwrap();
    assert_eq!((sg.mode, sg.gid), (0o2755, 50));
    let sh = stat(img, "/bin/sh").unwrap();
    assert_eq!(sh.kind, "symlink");
    assert!(sh.raw.contains("/bin/busybox"), "{}", sh.raw);
    let hl = stat(img, "/home-link").unwrap();
    assert_eq!(
        (hl.kind.as_str(), hl.uid, hl.gid),
        ("symlink", 1000, 1000),
        "{}",
        hl.raw
    );
    let app = stat(img, "/home/app").unwrap();
    assert_eq!((app.mode, app.uid, app.gid), (0o750, 1000, 1000));
    let secret = stat(img, "/home/app/secret").unwrap();
    assert_eq!((secret.mode, secret.uid, secret.gid), (0o600, 1000, 1000));
    assert_eq!(cat(img, "/home/app/secret"), "s3cret");
    assert_eq!(stat(img, "/tmp").unwrap().mode, 0o1777);
    assert_eq!(stat(img, "/ro").unwrap().mode, 0o555);
    let none = stat(img, "/ro/none").unwrap();
    assert_eq!(none.mode, 0o000);
    assert_eq!(cat(img, "/ro/none"), "unreadable");
    let null = stat(img, "/dev/null").unwrap();
    assert_eq!(
        (null.kind.as_str(), null.mode, null.uid),
        ("character", 0o666, 0),
        "{}",
        null.raw
    );
    assert!(
        null.raw.contains("major/minor number: 01:03"),
        "{}",
        null.raw
    );
    assert_eq!(stat(img, "/dev/fifo").unwrap().kind, "FIFO");
    assert_eq!(cat(img, "/abs/file"), "abs");
    let odd = stat(img, "/odd name \"\"q\"\"").unwrap();
    assert_eq!((odd.uid, odd.gid), (7, 7));
    let root = stat(img, "/").unwrap();
    assert_eq!((root.mode, root.uid, root.gid), (0o755, 0, 0));
    let (ea, _) = debugfs(img, "ea_list /bin/cap");
    assert!(
        ea.contains("user.matchlock") && ea.contains("yes"),
        "xattr kept: {ea}"
    );
    fsck_clean(img);
}

#[test]
fn ownership_modes_links_devices_survive_privileged() {
    let (_d, s) = store();
    let info = s
        .import(
            "special",
            oci_tar(&[special_layer()], Comp::Gzip, sh_run()).as_slice(),
        )
        .unwrap();
    check_special(&info.rootfs);
    assert!(tmp_is_empty(&s));
}

#[test]
fn ownership_modes_links_devices_survive_unprivileged() {
    // Same expectations when lchown/mknod are not used and debugfs has to patch the image.
    let (_d, s) = store();
    let s = unprivileged(s);
    let info = s
        .import(
            "special",
            docker_tar(&[special_layer()], sh_run()).as_slice(),
        )
        .unwrap();
    check_special(&info.rootfs);
    assert!(tmp_is_empty(&s));
}

fn assert_rejected(layers: &[Vec<u8>], needle: &str) {
    for unpriv in [false, true] {
        let (_d, s) = store();
        let s = if unpriv { unprivileged(s) } else { s };
        let err = s
            .import("evil", oci_tar(layers, Comp::Gzip, sh_run()).as_slice())
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{msg}");
        assert!(msg.contains(needle), "{msg} should name {needle}");
        assert!(!msg.contains('\n'));
        assert!(
            s.list().unwrap().is_empty(),
            "no tag after a rejected import"
        );
        assert!(tmp_is_empty(&s), "no staging left behind");
        assert!(std::fs::read_dir(s.root().join("rootfs"))
            .unwrap()
            .next()
            .is_none());
    }
}

#[test]
fn blank_numeric_header_fields_read_as_zero() {
    // Writers that never set uid/gid/mtime leave those fields blank; Go's archive/tar (and so
    // Docker) reads them as 0, and so must we.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(3);
    b.append_data(&mut h, "blank", &b"abc"[..]).unwrap();
    let l = b.into_inner().unwrap();
    let (_d, s) = store();
    let info = s
        .import("blank", oci_tar(&[l], Comp::Gzip, sh_run()).as_slice())
        .unwrap();
    let st = stat(&info.rootfs, "/blank").unwrap();
    assert_eq!((st.uid, st.gid, st.mode), (0, 0, 0o644));
    assert_eq!(cat(&info.rootfs, "/blank"), "abc");
}

#[test]
fn rejects_dotdot_entries() {
    assert_rejected(
        &[layer(&[Ent::File("../escape", 0o644, 0, 0, b"x")])],
        "../escape",
    );
    assert_rejected(
        &[layer(&[Ent::File("a/../../escape", 0o644, 0, 0, b"x")])],
        "a/../../escape",
    );
    assert_rejected(
        &[layer(&[
            Ent::File("f", 0o644, 0, 0, b"x"),
            Ent::Hard("h", "../f"),
        ])],
        "\"h\"",
    );
}

#[test]
fn rejects_write_through_symlink() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().to_str().unwrap().to_string();
    let l1 = layer(&[Ent::Sym("evil", &target, 0, 0)]);
    let l2 = layer(&[Ent::File("evil/pwned", 0o644, 0, 0, b"pwned")]);
    assert_rejected(&[l1.clone(), l2], "evil/pwned");
    assert!(
        !outside.path().join("pwned").exists(),
        "nothing written outside"
    );
    // Same attack within one layer, via a relative link, and via a hardlink target or whiteout.
    assert_rejected(
        &[layer(&[
            Ent::Sym("up", "..", 0, 0),
            Ent::File("up/x", 0o644, 0, 0, b"x"),
        ])],
        "up/x",
    );
    assert_rejected(
        &[l1.clone(), layer(&[Ent::Hard("h", "evil/passwd")])],
        "\"h\"",
    );
    assert_rejected(
        &[
            l1.clone(),
            layer(&[Ent::File("evil/.wh.victim", 0o644, 0, 0, b"")]),
        ],
        "evil/.wh.victim",
    );
    assert_rejected(
        &[l1, layer(&[Ent::Dir("evil/sub/", 0o755, 0, 0)])],
        "evil/sub",
    );
}

#[test]
fn docker_save_and_oci_both_import_and_tags_work() {
    let (_d, s) = store();
    let layers = whiteout_layers();
    let run = serde_json::json!({"Env": ["A=1"], "Entrypoint": ["/bin/echo"], "Cmd": ["hi"], "WorkingDir": "/w", "User": "1000:1000"});
    let a = s
        .import("docker-img:1", docker_tar(&layers, run.clone()).as_slice())
        .unwrap();
    let b = s
        .import("oci-img", oci_tar(&layers, Comp::Gzip, run).as_slice())
        .unwrap();
    assert_eq!(a.name, "docker.io/library/docker-img:1");
    assert_eq!(b.name, "docker.io/library/oci-img:latest");
    // Same config => same content-addressed rootfs, shared.
    assert_eq!(a.digest, b.digest);
    assert_eq!(a.rootfs, b.rootfs);
    assert!(a.rootfs.is_absolute());
    assert_eq!(a.size, std::fs::metadata(&a.rootfs).unwrap().len());
    assert_eq!(
        std::fs::metadata(&a.rootfs).unwrap().permissions().mode() & 0o777,
        0o400
    );
    assert_eq!(a.created.as_deref(), Some("2024-05-01T10:00:00Z"));
    assert_eq!(
        a.config,
        ImageConfig {
            env: vec!["A=1".into()],
            entrypoint: Some(vec!["/bin/echo".into()]),
            cmd: Some(vec!["hi".into()]),
            working_dir: Some("/w".into()),
            user: Some("1000:1000".into()),
        }
    );
    let r = s.resolve("docker.io/library/oci-img:latest").unwrap();
    assert_eq!(r.digest, b.digest);
    let names: Vec<String> = s.list().unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(
        names,
        vec![
            "docker.io/library/docker-img:1",
            "docker.io/library/oci-img:latest"
        ]
    );
    // Blobs are content-addressed.
    let blob_dir = s.root().join("blobs/sha256");
    assert!(blob_dir.join(&a.digest[7..]).exists());

    // Removing one tag keeps the shared rootfs; removing the last deletes it and the blobs.
    s.remove("oci-img").unwrap();
    assert!(a.rootfs.exists());
    assert!(matches!(
        s.resolve("oci-img"),
        Err(ImageError::NotFound { .. })
    ));
    // Very long references still map to a valid tag file name.
    let long = format!(
        "registry.example.com:5000/{}/img:tag",
        vec!["component"; 20].join("/")
    );
    let l = s
        .import(&long, docker_tar(&layers, sh_run()).as_slice())
        .unwrap();
    assert_eq!(s.resolve(&long).unwrap().name, l.name);
    s.remove(&long).unwrap();
    // Re-tagging with a different image replaces the tag and collects the old rootfs.
    let other = s
        .import(
            "docker-img:1",
            oci_tar(&[special_layer()], Comp::Zstd, sh_run()).as_slice(),
        )
        .unwrap();
    assert_ne!(other.digest, a.digest);
    assert!(
        !a.rootfs.exists(),
        "old rootfs collected when no tag uses it"
    );
    assert!(!blob_dir.join(&a.digest[7..]).exists());
    assert_eq!(s.resolve("docker-img:1").unwrap().digest, other.digest);
    s.remove("docker-img:1").unwrap();
    assert!(!other.rootfs.exists());
    assert!(s.list().unwrap().is_empty());
    assert!(std::fs::read_dir(&blob_dir).unwrap().next().is_none());
    assert!(tmp_is_empty(&s));
}

use std::os::unix::fs::PermissionsExt;

#[test]
fn digest_mismatches_are_rejected() {
    // An OCI blob whose content does not match its name.
    let (_d, s) = store();
    let layers = vec![layer(&[Ent::File("f", 0o644, 0, 0, b"good")])];
    let good = oci_tar(&layers, Comp::None, sh_run());
    let mut bad = good.clone();
    let at = bad.windows(4).position(|w| w == b"good").unwrap();
    bad[at..at + 4].copy_from_slice(b"evil");
    let err = s.import("t", bad.as_slice()).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("corrupt"));
    // A docker-save layer that does not match the config's diff_id.
    let mut bad = docker_tar(&layers, sh_run());
    let at = bad.windows(4).position(|w| w == b"good").unwrap();
    bad[at..at + 4].copy_from_slice(b"evil");
    let err = s.import("t", bad.as_slice()).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("layer 1"), "{err}");
    assert!(s.list().unwrap().is_empty());
    assert!(tmp_is_empty(&s));
    // A link named like a blob must still hash to its name.
    let config = config_json(&layers, sh_run());
    let mut b = tar::Builder::new(Vec::new());
    let mut h = Header::new_ustar();
    h.set_size(config.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "other", config.as_slice()).unwrap();
    let mut h = Header::new_ustar();
    h.set_entry_type(EntryType::Symlink);
    h.set_size(0);
    b.append_link(
        &mut h,
        format!("blobs/sha256/{}", "0".repeat(64)),
        "../../other",
    )
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "config": {"digest": format!("sha256:{}", "0".repeat(64))}, "layers": []}))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({"manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&manifest)}]}))
    .unwrap();
    for (name, data) in [
        ("oci-layout".to_string(), b"{}".to_vec()),
        ("index.json".to_string(), index),
        (
            format!("blobs/sha256/{}", &sha(&manifest)[7..]),
            manifest.clone(),
        ),
    ] {
        let mut h = Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    let err = s
        .import("t", b.into_inner().unwrap().as_slice())
        .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    // Not an image at all.
    let err = s
        .import("t", outer(&[("x".into(), b"y".to_vec())]).as_slice())
        .unwrap_err();
    assert!(err.to_string().contains("docker save"), "{err}");
    let err = s.import("t", &b"garbage"[..]).unwrap_err();
    assert!(matches!(err, ImageError::InvalidArchive(_)), "{err}");
}

#[test]
fn compressed_outer_tarball_and_platform_index() {
    let (_d, s) = store();
    let layers = vec![layer(&[Ent::File("f", 0o644, 0, 0, b"1")])];
    let info = s
        .import(
            "gz",
            gzip(&oci_tar(&layers, Comp::Gzip, sh_run())).as_slice(),
        )
        .unwrap();
    assert_eq!(cat(&info.rootfs, "/f"), "1");

    // A multi-platform index: the host platform is chosen.
    let other_layers = vec![layer(&[Ent::File("f", 0o644, 0, 0, b"other")])];
    let mk = |layers: &[Vec<u8>]| {
        let config = config_json(layers, sh_run());
        let blob = gzip(&layers[0]);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&config), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(&blob), "size": blob.len()}],
        }))
        .unwrap();
        (config, blob, manifest)
    };
    let host = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let (c1, b1, m1) = mk(&layers);
    let (c2, b2, m2) = mk(&other_layers);
    let index = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&m2), "size": m2.len(),
         "platform": {"os": "linux", "architecture": "s390x"}},
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha(&m1), "size": m1.len(),
         "platform": {"os": "linux", "architecture": host}},
    ]}))
    .unwrap();
    let mut files = vec![
        (
            "oci-layout".to_string(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".to_string(), index),
    ];
    for blob in [c1, b1, m1, c2, b2, m2] {
        files.push((format!("blobs/sha256/{}", &sha(&blob)[7..]), blob));
    }
    let info = s.import("multi", outer(&files).as_slice()).unwrap();
    assert_eq!(cat(&info.rootfs, "/f"), "1");
}

#[test]
fn concurrent_imports_are_safe() {
    let (_d, s) = store();
    let tar = oci_tar(&whiteout_layers(), Comp::Gzip, sh_run());
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let s = s.clone();
                let tar = &tar;
                scope.spawn(move || s.import(&format!("c{}", i % 2), tar.as_slice()).unwrap())
            })
            .collect();
        let infos: Vec<ImageInfo> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(infos.windows(2).all(|w| w[0].rootfs == w[1].rootfs));
    });
    assert_eq!(s.list().unwrap().len(), 2);
    fsck_clean(&s.resolve("c0").unwrap().rootfs);
    assert!(tmp_is_empty(&s));
}

// ---------------------------------------------------------------------------------------------
// The busybox test image script

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/make-busybox-image")
}

#[test]
fn busybox_script_images_import() {
    if !Path::new("/bin/busybox").exists() {
        println!("SKIPPED: /bin/busybox is absent (install busybox-static)");
        return;
    }
    let (d, s) = store();
    for (format, entry) in [
        ("oci", false),
        ("docker", false),
        ("oci", true),
        ("docker", true),
    ] {
        let out = d.path().join(format!("bb-{format}-{entry}.tar"));
        let mut cmd = Command::new(script());
        cmd.arg(&out).args(["--format", format]);
        if entry {
            cmd.arg("--with-entrypoint");
        }
        let status = cmd.status().expect("python3 runs the script");
        assert!(status.success());
        let name = format!("bb-{format}-{entry}");
        let info = s.import(&name, std::fs::File::open(&out).unwrap()).unwrap();
        let img = &info.rootfs;
        let bb = stat(img, "/bin/busybox").unwrap();
        assert_eq!((bb.kind.as_str(), bb.mode, bb.uid), ("regular", 0o755, 0));
        assert_eq!(stat(img, "/bin/sh").unwrap().kind, "symlink");
        assert_eq!(stat(img, "/usr/bin/env").unwrap().kind, "symlink");
        assert_eq!(stat(img, "/tmp").unwrap().mode, 0o1777);
        assert_eq!(stat(img, "/root").unwrap().mode, 0o700);
        let app = stat(img, "/home/app").unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert!(cat(img, "/etc/passwd").contains("app:x:1000:1000:app:/home/app:/bin/sh"));
        assert!(cat(img, "/etc/group").contains("staff:x:50:app"));
        assert!(stat(img, "/etc/hostname").is_some());
        fsck_clean(img);
        let argv = compose_command(&info.config, None, &[]).unwrap();
        if entry {
            assert_eq!(argv, vec!["/bin/echo", "entry:", "default-cmd"]);
            assert_eq!(info.config.working_dir.as_deref(), Some("/home/app"));
            assert_eq!(info.config.user.as_deref(), Some("app"));
        } else {
            assert_eq!(argv, vec!["sh"]);
            assert_eq!(info.config.entrypoint, None);
        }
        assert!(info.config.env.iter().any(|e| e.starts_with("PATH=")));
    }
    // Both formats of the same image share one rootfs.
    assert_eq!(
        s.resolve("bb-oci-false").unwrap().rootfs,
        s.resolve("bb-docker-false").unwrap().rootfs
    );
}

/// Timing of a 20 000-entry import (run with `--ignored --nocapture`; as root and as a normal
/// user to compare the lchown path with the debugfs fix-up path).
#[test]
#[ignore]
fn bench_import_20k_entries() {
    let mut names = Vec::new();
    for d in 0..400 {
        names.push((format!("usr/share/d{d}/"), true));
        for f in 0..49 {
            names.push((format!("usr/share/d{d}/f{f}"), false));
        }
    }
    let ents: Vec<Ent> = names
        .iter()
        .map(|(n, dir)| {
            if *dir {
                Ent::Dir(n, 0o755, 0, 0)
            } else {
                Ent::File(n, 0o644, 0, 0, b"data")
            }
        })
        .collect();
    let tar = oci_tar(&[layer(&ents)], Comp::Gzip, sh_run());
    let (_d, s) = store();
    let t = std::time::Instant::now();
    let info = s.import("bench", tar.as_slice()).unwrap();
    println!(
        "euid {} imported {} entries in {:?} ({} bytes rootfs)",
        crate::util::euid(),
        names.len(),
        t.elapsed(),
        info.size
    );
}

// ---------------------------------------------------------------------------------------------
// Derived images (matchlock build) and export

#[test]
fn derive_adds_layers_and_export_round_trips_through_both_formats() {
    let (dir, s) = store();
    // A gzip parent (blob digests differ from diff ids: found through its manifest).
    let base = s
        .import(
            "base:1",
            oci_tar(&whiteout_layers(), Comp::Gzip, sh_run()).as_slice(),
        )
        .unwrap();
    let parent_layers = s.layers(&base).unwrap();
    assert_eq!(parent_layers.len(), 3);
    assert!(parent_layers
        .iter()
        .all(|l| l.media_type.ends_with("+gzip") && l.digest != l.diff_id));

    let new = layer(&[
        Ent::File("added", 0o640, 7, 8, b"added"),
        Ent::File(".wh.e", 0o644, 0, 0, b""),
    ]);
    let new_path = dir.path().join("new.tar");
    std::fs::write(&new_path, &new).unwrap();
    let mut config = s.config_blob(&base).unwrap();
    config["config"]["Env"] = serde_json::json!(["PATH=/bin", "A=2"]);
    config["config"]["ExposedPorts"] = serde_json::json!({"80/tcp": {}});
    let info = s
        .derive(
            "built:1",
            Some(&base),
            std::slice::from_ref(&new_path),
            config,
        )
        .unwrap();
    assert_eq!(info.config.env, ["PATH=/bin", "A=2"]);
    assert_eq!(cat(&info.rootfs, "/added"), "added");
    let st = stat(&info.rootfs, "/added").unwrap();
    assert_eq!((st.mode, st.uid, st.gid), (0o640, 7, 8));
    assert!(
        stat(&info.rootfs, "/e").is_none(),
        "the whiteout deletes /e"
    );
    assert_eq!(cat(&info.rootfs, "/b/new"), "new");
    fsck_clean(&info.rootfs);
    let layers = s.layers(&info).unwrap();
    assert_eq!(layers.len(), 4);
    assert_eq!(layers[..3], parent_layers[..]);
    assert_eq!(layers[3].diff_id, sha(&new));
    assert_eq!(
        layers[3].digest,
        sha(&new),
        "a new layer is stored uncompressed"
    );
    assert!(s.config_blob(&info).unwrap()["config"]["ExposedPorts"]["80/tcp"].is_object());
    // A config-only child (a build's CMD, a final tag) shares the root file system: the same
    // layers are not unpacked again.
    let mut config = s.config_blob(&info).unwrap();
    config["config"]["Cmd"] = serde_json::json!(["echo", "config only"]);
    let cfg_only = s.derive("built:cmd", Some(&info), &[], config).unwrap();
    assert_ne!(cfg_only.digest, info.digest);
    assert_eq!(cfg_only.rootfs, info.rootfs);
    s.remove("built:cmd").unwrap();
    assert!(info.rootfs.exists(), "still used by built:1");
    // The parent can go: the derived image keeps the blobs it shares.
    s.remove("base:1").unwrap();
    assert_eq!(s.layers(&info).unwrap(), layers);

    for (format, name) in [
        (ExportFormat::Oci, "oci.tar"),
        (ExportFormat::DockerArchive, "docker.tar"),
    ] {
        let path = dir.path().join(name);
        s.export("built:1", format, std::fs::File::create(&path).unwrap())
            .unwrap();
        let again = s
            .import(
                &format!("again-{}", &name[..3]),
                std::fs::File::open(&path).unwrap(),
            )
            .unwrap();
        assert_eq!(again.digest, info.digest, "{name}");
        assert_eq!(
            s.layers(&again)
                .unwrap()
                .iter()
                .map(|l| &l.diff_id)
                .collect::<Vec<_>>(),
            layers.iter().map(|l| &l.diff_id).collect::<Vec<_>>()
        );
        // skopeo reads both (Debian's skopeo; scripts/setup installs it).
        let transport = match format {
            ExportFormat::Oci => "oci-archive",
            ExportFormat::DockerArchive => "docker-archive",
        };
        let out = Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("{transport}:{}", path.display()))
            .output()
            .expect("skopeo (apt-get install skopeo)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let raw: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(raw["layers"].as_array().map(Vec::len), Some(4), "{raw}");
        assert_eq!(raw["config"]["digest"], info.digest.as_str());
    }
    assert!(tmp_is_empty(&s));
}

#[test]
fn derive_from_scratch_and_bad_layers() {
    let (dir, s) = store();
    let l = layer(&[
        Ent::Dir("bin/", 0o755, 0, 0),
        Ent::File("bin/app", 0o755, 0, 0, b"#!"),
    ]);
    let p = dir.path().join("l.tar");
    std::fs::write(&p, &l).unwrap();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/app"]}});
    let info = s.derive("scratchy", None, &[p], config.clone()).unwrap();
    assert_eq!(info.config.cmd, Some(vec!["/bin/app".to_string()]));
    assert_eq!(stat(&info.rootfs, "/bin/app").unwrap().mode, 0o755);
    // A hostile layer is refused as an import's would be, and leaves nothing behind.
    let bad = layer(&[Ent::File("../escape", 0o644, 0, 0, b"x")]);
    let p = dir.path().join("bad.tar");
    std::fs::write(&p, &bad).unwrap();
    let e = s.derive("bad", None, &[p], config).unwrap_err().to_string();
    assert!(e.contains(".."), "{e}");
    assert!(s.resolve("bad").is_err());
    assert!(tmp_is_empty(&s));
}

#[test]
fn paths_resolve_through_the_images_own_links() {
    let (_d, s) = store();
    let l = layer(&[
        Ent::Dir("usr/", 0o755, 0, 0),
        Ent::Dir("usr/bin/", 0o755, 0, 0),
        Ent::Dir("run/", 0o755, 0, 0),
        Ent::Dir("var/", 0o755, 0, 0),
        Ent::Sym("bin", "usr/bin", 0, 0),
        Ent::Sym("var/run", "/run", 0, 0),
        Ent::Sym("up", "../../..", 0, 0),
        Ent::Sym("loop", "loop", 0, 0),
    ]);
    let info = s
        .import("links", oci_tar(&[l], Comp::None, sh_run()).as_slice())
        .unwrap();
    let r = |p: &str, last: bool| s.resolve_in_rootfs(&info, p, last).unwrap();
    assert_eq!(r("/bin/app", false), "/usr/bin/app");
    assert_eq!(r("/bin", true), "/usr/bin");
    assert_eq!(
        r("/bin", false),
        "/bin",
        "the last component only when asked"
    );
    assert_eq!(r("/var/run/x/y", false), "/run/x/y");
    assert_eq!(r("/up/etc/x", false), "/etc/x", "never above the image's /");
    assert_eq!(r("/new/dir/", true), "/new/dir");
    assert!(s.resolve_in_rootfs(&info, "/loop/x", false).is_err());
    // One path, its last link not followed.
    let e = |p: &str| s.rootfs_entry(&info, p).unwrap();
    assert_eq!(e("/usr/bin"), Some(crate::RootfsEntry::Directory));
    assert_eq!(
        e("/bin"),
        Some(crate::RootfsEntry::Symlink("usr/bin".into()))
    );
    assert_eq!(
        e("/var/run"),
        Some(crate::RootfsEntry::Symlink("/run".into()))
    );
    assert_eq!(e("/nope"), None);
    assert!(s.rootfs_has(&info, "/bin").unwrap());
    assert!(s.rootfs_entry(&info, "/a\"b").is_err());
}
