use super::*;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

fn ctx() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    fs::create_dir_all(p.join("src/sub")).unwrap();
    fs::create_dir_all(p.join("node_modules/x")).unwrap();
    fs::write(p.join("src/a.py"), "a").unwrap();
    fs::write(p.join("src/b.py"), "b").unwrap();
    fs::write(p.join("src/notes.txt"), "n").unwrap();
    fs::write(p.join("src/sub/c.py"), "c").unwrap();
    fs::write(p.join("src/secret.env"), "s").unwrap();
    fs::write(p.join("node_modules/x/index.js"), "x").unwrap();
    fs::write(p.join("run.sh"), "#!/bin/sh").unwrap();
    fs::set_permissions(p.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("run.sh", p.join("link")).unwrap();
    d
}

/// (path, type, mode, uid, gid, content or link)
fn entries(tar_bytes: &[u8]) -> BTreeMap<String, (char, u32, u64, u64, String)> {
    let mut out = BTreeMap::new();
    for e in tar::Archive::new(tar_bytes).entries().unwrap() {
        let mut e = e.unwrap();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let h = e.header().clone();
        let kind = match h.entry_type() {
            tar::EntryType::Directory => 'd',
            tar::EntryType::Symlink => 'l',
            _ => 'f',
        };
        let body = if kind == 'l' {
            e.link_name()
                .unwrap()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        } else {
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes).unwrap();
            String::from_utf8_lossy(&bytes).into_owned()
        };
        out.insert(
            path,
            (
                kind,
                h.mode().unwrap(),
                h.uid().unwrap(),
                h.gid().unwrap(),
                body,
            ),
        );
    }
    out
}

fn step(sources: &[&str], dest: &str) -> CopyStep {
    CopyStep {
        checksum: None,
        parents: false,
        add: false,
        from: None,
        sources: sources
            .iter()
            .map(|s| CopySource::Path(s.to_string()))
            .collect(),
        dest: dest.into(),
        chown: None,
        chmod: None,
        exclude: Vec::new(),
    }
}

fn copy(
    s: &CopyStep,
    c: &tempfile::TempDir,
    ignore: &str,
    owner: Option<Owner>,
) -> Result<(Vec<u8>, CopyLayer), String> {
    let mut out = Vec::new();
    let l = copy_layer(
        s,
        c.path(),
        &Ignore::parse(ignore),
        owner,
        &mut |p, _| Ok(p.to_string()),
        &mut out,
    )?;
    Ok((out, l))
}

#[test]
fn directories_copy_their_contents_and_ignore_rules_hold() {
    let c = ctx();
    let (t, l) = copy(
        &step(&["src", "run.sh", "link"], "/app/"),
        &c,
        "**/*.env\n*.txt\n!src/notes.txt\n",
        None,
    )
    .unwrap();
    let e = entries(&t);
    assert_eq!(e["app/a.py"], ('f', 0o644, 0, 0, "a".into()));
    assert_eq!(e["app/sub"].0, 'd');
    assert_eq!(e["app/sub/c.py"].4, "c");
    assert_eq!(e["app/notes.txt"].4, "n", "the exception brings it back");
    assert!(!e.contains_key("app/secret.env"));
    assert_eq!(e["app/run.sh"].1, 0o755);
    // A source that is a link is followed, as BuildKit does, and keeps its own name.
    assert_eq!(e["app/link"], ('f', 0o755, 0, 0, "#!/bin/sh".into()));
    assert_eq!(l.entries, e.len());
    // Ignored directories are left out whole.
    let (t, _) = copy(&step(&["."], "/"), &c, "node_modules\n", None).unwrap();
    let e = entries(&t);
    assert!(e.keys().all(|k| !k.starts_with("node_modules")), "{e:?}");
    assert!(e.contains_key("run.sh"));
}

#[test]
fn files_wildcards_owners_modes_and_heredocs() {
    let c = ctx();
    let mut s = step(&["src/*.py"], "/dst/");
    s.chmod = Some(0o600);
    let (t, _) = copy(&s, &c, "", Some(Owner { uid: 1000, gid: 50 })).unwrap();
    let e = entries(&t);
    assert_eq!(e.keys().collect::<Vec<_>>(), ["dst/a.py", "dst/b.py"]);
    assert_eq!(e["dst/a.py"], ('f', 0o600, 1000, 50, "a".into()));
    // One file to a path that is not a directory: that is its name.
    let (t, _) = copy(&step(&["run.sh"], "/usr/local/bin/start"), &c, "", None).unwrap();
    assert!(entries(&t).contains_key("usr/local/bin/start"));
    let mut s = step(&[], "/etc/motd");
    s.sources.push(CopySource::Inline {
        name: "EOF".into(),
        content: "hi\n".into(),
    });
    let (t, _) = copy(&s, &c, "", None).unwrap();
    assert_eq!(entries(&t)["etc/motd"].4, "hi\n");
}

#[test]
fn mistakes_are_errors() {
    let c = ctx();
    let e = |s: CopyStep, ig: &str| copy(&s, &c, ig, None).unwrap_err();
    assert!(e(step(&["missing"], "/x"), "").contains("not found"));
    assert!(e(step(&["src/a.py"], "/x"), "src\n").contains(".dockerignore"));
    assert!(e(step(&["../etc/passwd"], "/x"), "").contains("outside the build context"));
    assert!(e(step(&["*.nothing"], "/x"), "").contains("no file"));
    assert!(
        e(step(&["src/a.py", "src/b.py"], "/x"), "").contains("must be a directory ending in /")
    );
}

#[test]
fn the_key_ignores_times_but_not_content_or_modes() {
    let c = ctx();
    let key = |c: &tempfile::TempDir| copy(&step(&["src"], "/app/"), c, "", None).unwrap().1.key;
    let k1 = key(&c);
    let f = c.path().join("src/a.py");
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    assert_eq!(key(&c), k1);
    fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
    let k2 = key(&c);
    assert_ne!(k2, k1);
    fs::write(&f, "changed").unwrap();
    assert_ne!(key(&c), k2);
}

#[test]
fn add_unpacks_local_archives() {
    let c = ctx();
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o640);
    h.set_uid(7);
    h.set_gid(8);
    h.set_size(3);
    b.append_data(&mut h, "pkg/file", &b"abc"[..]).unwrap();
    let tar_bytes = b.into_inner().unwrap();
    let gz = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut e, &tar_bytes).unwrap();
        e.finish().unwrap()
    };
    let bz2 = {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        io::Write::write_all(&mut e, &tar_bytes).unwrap();
        e.finish().unwrap()
    };
    let xz = {
        let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
        io::Write::write_all(&mut e, &tar_bytes).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(&tar_bytes[..], 1).unwrap();
    for (name, bytes) in [
        ("pkg.tar", &tar_bytes),
        ("pkg.tar.gz", &gz),
        ("pkg.tbz2", &bz2),
        ("pkg.txz", &xz),
        ("pkg.tar.zst", &zst),
    ] {
        fs::write(c.path().join(name), bytes).unwrap();
        let mut s = step(&[name], "/opt/");
        s.add = true;
        let (t, _) = copy(&s, &c, "", None).unwrap();
        assert_eq!(
            entries(&t)["opt/pkg/file"],
            ('f', 0o640, 7, 8, "abc".into()),
            "{name}"
        );
        // COPY keeps it a file.
        let (t, _) = copy(&step(&[name], "/opt/"), &c, "", None).unwrap();
        assert!(entries(&t).contains_key(&format!("opt/{name}")), "{name}");
    }
    // Compressed, but no tar inside: ADD copies it as it is, as Docker does.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    io::Write::write_all(&mut e, b"just some text\n").unwrap();
    fs::write(c.path().join("notes.gz"), e.finish().unwrap()).unwrap();
    let mut s = step(&["notes.gz"], "/opt/");
    s.add = true;
    let (t, _) = copy(&s, &c, "", None).unwrap();
    assert!(entries(&t).contains_key("opt/notes.gz"));
    // A corrupt archive past a valid first header is an error, not a silent half copy.
    let mut cut = gz.clone();
    cut.truncate(gz.len() - 12);
    cut.extend_from_slice(&[0xff; 12]);
    fs::write(c.path().join("cut.tar.gz"), &cut).unwrap();
    let mut s = step(&["cut.tar.gz"], "/opt/");
    s.add = true;
    assert!(copy(&s, &c, "", None).is_err());
    // A plain tar whose last file ends early: an error, not a short (padded) entry.
    let mut short = tar_bytes[..512].to_vec();
    short.extend_from_slice(b"ab");
    fs::write(c.path().join("short.tar"), &short).unwrap();
    let mut s = step(&["short.tar"], "/opt/");
    s.add = true;
    let e = copy(&s, &c, "", None).unwrap_err();
    assert!(
        e.contains("short") || e.contains("EOF") || e.contains("unexpected"),
        "{e}"
    );
}

#[test]
fn parents_keep_each_sources_path() {
    let c = ctx();
    let mut s = step(&["src/*.py", "run.sh", "src/sub"], "/dst/");
    s.parents = true;
    let (t, _) = copy(&s, &c, "", None).unwrap();
    let e = entries(&t);
    for k in [
        "dst/src/a.py",
        "dst/src/b.py",
        "dst/run.sh",
        "dst/src/sub/c.py",
    ] {
        assert!(e.contains_key(k), "{k}: {e:?}");
    }
    assert!(!e.contains_key("dst/a.py"), "{e:?}");
}

#[test]
fn glob_is_go_filepath_match() {
    assert!(glob("*.py", "a.py"));
    assert!(!glob("*.py", "a.pyc"));
    assert!(glob("a?c", "abc"));
    assert!(glob("[a-c]x", "bx"));
    assert!(!glob("[^a-c]x", "bx"));
    assert!(glob("\\*", "*"));
    assert!(!glob("[", "["));
}

#[test]
fn links_in_the_context_never_lead_out_of_it() {
    let c = ctx();
    let p = c.path();
    // A cloned repository's links: to the host's /etc, and up and out.
    std::os::unix::fs::symlink("/etc", p.join("etc")).unwrap();
    std::os::unix::fs::symlink("../../../../../../etc", p.join("src/up")).unwrap();
    fs::create_dir_all(p.join("real/etc")).unwrap();
    fs::write(p.join("real/etc/passwd"), "context's own\n").unwrap();
    std::os::unix::fs::symlink("real", p.join("inside")).unwrap();
    // Through a link to /etc: the context's etc, which is that same link again (an error),
    // never the host's.
    for src in ["etc/passwd", "src/up/passwd", "etc/*"] {
        let e = copy(&step(&[src], "/x/"), &c, "", None).unwrap_err();
        assert!(e.contains("too many symbolic links"), "{src}: {e}");
    }
    fs::remove_file(p.join("etc")).unwrap();
    fs::create_dir_all(p.join("etc")).unwrap();
    let e = copy(&step(&["src/up/passwd"], "/x"), &c, "", None).unwrap_err();
    assert!(e.contains("not found"), "{e}");
    std::os::unix::fs::symlink("/etc", p.join("etc2")).unwrap();
    // A link inside the context is followed inside it.
    let (t, _) = copy(&step(&["inside/etc/passwd"], "/x"), &c, "", None).unwrap();
    assert_eq!(entries(&t)["x"].4, "context's own\n");
    // Copied whole, the links stay links: nothing of the host is read.
    let (t, _) = copy(&step(&["."], "/all/"), &c, "", None).unwrap();
    let e = entries(&t);
    assert_eq!(e["all/etc2"], ('l', 0o777, 0, 0, "/etc".into()));
    assert!(!e.keys().any(|k| k.starts_with("all/etc2/")), "{e:?}");
    // Named, a link is followed inside the context: to a directory there, its contents; to the
    // host's /etc, the context's etc (here without a passwd), never the host's.
    let (t, _) = copy(&step(&["inside"], "/in/"), &c, "", None).unwrap();
    assert_eq!(entries(&t)["in/etc/passwd"].4, "context's own\n");
    let e = copy(&step(&["etc2/passwd"], "/x"), &c, "", None).unwrap_err();
    assert!(e.contains("not found"), "{e}");
    std::os::unix::fs::symlink("/etc/passwd", p.join("pw")).unwrap();
    let e = copy(&step(&["pw"], "/x"), &c, "", None).unwrap_err();
    assert!(
        e.contains("it is a link, followed inside the context only"),
        "{e}"
    );
}
