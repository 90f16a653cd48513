//! Named volumes: ext4 image files under `$MATCHLOCK_CACHE_DIR/volumes` (default
//! `~/.cache/matchlock/volumes/<name>.ext4`) that sandboxes attach with `--disk @NAME:/path`, plus
//! the parsing and conflict checks of every extra disk (`--disk`, RPC `extra_disks`).

use crate::config::DiskMount;
use crate::store::Store;
use crate::{validate, SandboxError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One volume.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeInfo {
    /// Its name.
    pub name: String,
    /// Its size as Matchlock prints it (`"%.1f MB"`), which the SDKs expect.
    pub size: String,
    /// The ext4 file.
    pub path: PathBuf,
}

/// The volume directory.
pub fn dir() -> PathBuf {
    matchlock_vmm::cache_dir().join("volumes")
}

/// Volume names: letters, digits, `.`, `_`, `-`, not starting with `.`, at most 64 bytes, so a
/// name is always exactly one plain file name.
pub fn check_name(name: &str) -> Result<(), SandboxError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SandboxError::Invalid(format!(
            "invalid volume name '{name}'; use letters, digits, '.', '_' and '-'"
        )))
    }
}

/// The file of volume `name` (which need not exist).
pub fn path(name: &str) -> Result<PathBuf, SandboxError> {
    check_name(name)?;
    Ok(dir().join(format!("{name}.ext4")))
}

fn info(name: &str, path: PathBuf) -> Result<VolumeInfo, SandboxError> {
    let len = std::fs::metadata(&path)
        .map_err(SandboxError::io(format!("reading {}", path.display())))?
        .len();
    Ok(VolumeInfo {
        name: name.to_string(),
        size: format!("{:.1} MB", len as f64 / (1024.0 * 1024.0)),
        path,
    })
}

/// Temporary name next to `dest`, removed again unless [`publish`] renames it into place.
struct Staged(PathBuf);

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn staged(dest: &Path) -> Staged {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Staged(dest.with_file_name(format!(".{name}.tmp-{}", std::process::id())))
}

/// Renames a finished volume into place, refusing to replace an existing one.
fn publish(tmp: &Staged, dest: &Path, name: &str) -> Result<(), SandboxError> {
    // A hard link fails if `dest` exists, which rename would silently replace.
    match std::fs::hard_link(&tmp.0, dest) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(SandboxError::Invalid(
            format!("named volume already exists: {name}"),
        )),
        Err(e) => Err(SandboxError::io(format!("creating {}", dest.display()))(e)),
    }
}

/// Creates an empty ext4 volume of `size_mb` MiB (sparse).
pub fn create(name: &str, size_mb: u64) -> Result<VolumeInfo, SandboxError> {
    let dest = path(name)?;
    if !(1..=16 * 1024 * 1024).contains(&size_mb) {
        return Err(SandboxError::Invalid(format!(
            "volume size {size_mb} MB is out of range; give 1 to 16777216"
        )));
    }
    if dest.exists() {
        return Err(SandboxError::Invalid(format!(
            "named volume already exists: {name}"
        )));
    }
    std::fs::create_dir_all(dir()).map_err(SandboxError::io("creating the volume directory"))?;
    let tmp = staged(&dest);
    let f = std::fs::File::create(&tmp.0)
        .map_err(SandboxError::io(format!("creating {}", tmp.0.display())))?;
    f.set_len(size_mb * 1024 * 1024)
        .map_err(|e| SandboxError::Invalid(format!("cannot create a {size_mb} MB volume: {e}")))?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,nodiscard",
            "-L",
        ])
        .arg(&name[..name.len().min(16)])
        .arg(&tmp.0)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            SandboxError::Invalid(format!("cannot run mkfs.ext4 ({e}); install e2fsprogs"))
        })?;
    if !out.status.success() {
        return Err(SandboxError::Invalid(format!(
            "mkfs.ext4 failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    publish(&tmp, &dest, name)?;
    info(name, dest)
}

/// All volumes, by name.
pub fn list() -> Result<Vec<VolumeInfo>, SandboxError> {
    let d = dir();
    let rd = match std::fs::read_dir(&d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SandboxError::io(format!("reading {}", d.display()))(e)),
    };
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let file = ent.file_name().to_string_lossy().into_owned();
        let Some(name) = file.strip_suffix(".ext4") else {
            continue;
        };
        if check_name(name).is_ok() {
            out.push(info(name, ent.path())?);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Removes a volume that no live sandbox uses.
pub fn remove(store: &Store, name: &str) -> Result<(), SandboxError> {
    let p = path(name)?;
    if !p.exists() {
        return Err(SandboxError::Invalid(format!(
            "named volume not found: {name} ('matchlock volume ls' lists them)"
        )));
    }
    if let Some((id, _)) = users(store, &p).into_iter().next() {
        return Err(SandboxError::Invalid(format!(
            "volume '{name}' is attached to running sandbox {id}; stop it first"
        )));
    }
    std::fs::remove_file(&p).map_err(SandboxError::io(format!("removing {}", p.display())))
}

/// Copies volume `src` to a new volume `dest`, keeping holes (the copy stays sparse) and
/// everything inside the file system (it is a byte copy of the image).
pub fn copy(store: &Store, src: &str, dest: &str) -> Result<VolumeInfo, SandboxError> {
    let from = path(src)?;
    let to = path(dest)?;
    if src == dest {
        return Err(SandboxError::Invalid(
            "copy named volume: source and destination must be different".into(),
        ));
    }
    if !from.exists() {
        return Err(SandboxError::Invalid(format!(
            "named volume not found: {src}"
        )));
    }
    if to.exists() {
        return Err(SandboxError::Invalid(format!(
            "named volume already exists: {dest}"
        )));
    }
    if users(store, &from).iter().any(|(_, ro)| !ro) {
        return Err(SandboxError::Invalid(format!(
            "volume '{src}' is attached read-write to a running sandbox; stop it first for a consistent copy"
        )));
    }
    let tmp = staged(&to);
    sparse_copy(&from, &tmp.0).map_err(SandboxError::io(format!(
        "copying {} to {}",
        from.display(),
        to.display()
    )))?;
    publish(&tmp, &to, dest)?;
    info(dest, to)
}

fn sparse_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut src = std::fs::File::open(from)?;
    let len = src.metadata()?.len();
    let mut dst = std::fs::File::create(to)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|b| *b == 0) {
            dst.seek(SeekFrom::Current(n as i64))?;
        } else {
            dst.write_all(&buf[..n])?;
        }
    }
    dst.set_len(len)?;
    dst.sync_all()
}

/// Live sandboxes that attach `path`, with whether they attach it read-only.
pub fn users(store: &Store, path: &Path) -> Vec<(String, bool)> {
    let canon = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = Vec::new();
    for e in store.list().unwrap_or_default() {
        if !e.state.status.is_live() {
            continue;
        }
        for d in &e.config.disks {
            if d.host_path == canon {
                out.push((e.config.id.clone(), d.read_only));
            }
        }
    }
    out
}

/// Finds a requested disk's file (a path, or the named volume of `@NAME`) and checks it.
pub fn resolve(d: &matchlock_api::request::DiskRequest) -> Result<DiskMount, SandboxError> {
    let mut m = disk(&d.host, d.guest.as_str(), d.read_only).map_err(|e| match e {
        SandboxError::Invalid(m) => SandboxError::Invalid(format!(
            "invalid disk mount '{}:{}': {m}",
            d.host,
            d.guest.as_str()
        )),
        other => other,
    })?;
    (m.uid, m.gid) = (d.uid, d.gid);
    Ok(m)
}

/// Parses `--disk` (see [`matchlock_api::request::DiskRequest::parse`]) and resolves it.
pub fn parse_disk(spec: &str) -> Result<DiskMount, SandboxError> {
    let d =
        matchlock_api::request::DiskRequest::parse(spec).map_err(|e| SandboxError::Invalid(e.0))?;
    resolve(&d)
}

/// Resolves one extra disk: `host` is a file path or `@NAME` of a volume.
pub fn disk(host: &str, guest: &str, read_only: bool) -> Result<DiskMount, SandboxError> {
    validate::guest_path(guest, "guest path").map_err(SandboxError::Invalid)?;
    if guest == "/" {
        return Err(SandboxError::Invalid("cannot mount a disk over /".into()));
    }
    let file = match host.strip_prefix('@') {
        Some(name) => {
            let p = path(name)?;
            if !p.is_file() {
                return Err(SandboxError::Invalid(format!(
                    "named volume not found: {name} (create it with 'matchlock volume create {name}')"
                )));
            }
            p
        }
        // A disk image in a directory a sandbox had mounted may have become a symlink to a
        // host device or another user's image; sources are never followed through symlinks.
        None => validate::host_source(host).map_err(SandboxError::Invalid)?,
    };
    let meta = std::fs::metadata(&file)
        .map_err(|e| SandboxError::Invalid(format!("{}: {e}", file.display())))?;
    if !meta.is_file() {
        return Err(SandboxError::Invalid(format!(
            "{} is not a regular file (an ext4 image)",
            file.display()
        )));
    }
    let host_path = std::fs::canonicalize(&file)
        .map_err(|e| SandboxError::Invalid(format!("{}: {e}", file.display())))?;
    Ok(DiskMount {
        host_path,
        guest_path: guest.to_string(),
        read_only,
        uid: None,
        gid: None,
    })
}

/// Refuses disks that would be written by two VMs at once (which corrupts ext4): the same file
/// twice in one sandbox, or attached read-write here or in a running sandbox while in use.
pub fn check_conflicts(store: &Store, disks: &[DiskMount]) -> Result<(), SandboxError> {
    if disks.len() > validate::MAX_DISKS {
        return Err(SandboxError::Invalid(format!(
            "at most {} extra disks are supported",
            validate::MAX_DISKS
        )));
    }
    for (i, d) in disks.iter().enumerate() {
        if disks[..i].iter().any(|o| o.host_path == d.host_path) {
            return Err(SandboxError::Invalid(format!(
                "{} is attached twice",
                d.host_path.display()
            )));
        }
        if disks[..i].iter().any(|o| o.guest_path == d.guest_path) {
            return Err(SandboxError::Invalid(format!(
                "two disks are mounted at {}",
                d.guest_path
            )));
        }
        for (id, ro) in users(store, &d.host_path) {
            if !ro || !d.read_only {
                return Err(SandboxError::Invalid(format!(
                    "{} is in use by sandbox {id}; a disk can be shared only read-only",
                    d.host_path.display()
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("data-1.v2").is_ok());
        for bad in ["", ".x", "a/b", "a b", "..", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_specs() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a:b.ext4");
        std::fs::write(&img, b"x").unwrap();
        let spec = format!("{}:/mnt/data:ro", img.display());
        let d = parse_disk(&spec).unwrap();
        assert_eq!(d.guest_path, "/mnt/data");
        assert!(d.read_only);
        assert_eq!(d.host_path, std::fs::canonicalize(&img).unwrap());
        let d = parse_disk(&format!("{}:/data", img.display())).unwrap();
        assert!(!d.read_only);
        assert!(parse_disk(&format!("{}", img.display())).is_err());
        assert!(parse_disk(&format!("{}:data", img.display())).is_err());
        assert!(parse_disk(&format!("{}:/", img.display())).is_err());
        assert!(parse_disk("/nonexistent.ext4:/data").is_err());
        assert!(parse_disk(&format!("{}:/data", dir.path().display())).is_err());
        let d = parse_disk(&format!("{}:/var/lib/pg:uid=70,gid=71", img.display())).unwrap();
        assert_eq!(
            (d.guest_path.as_str(), d.uid, d.gid, d.read_only),
            ("/var/lib/pg", Some(70), Some(71), false)
        );
        let d = parse_disk(&format!("{}:/d:rw,uid=5", img.display())).unwrap();
        assert_eq!((d.uid, d.gid, d.read_only), (Some(5), None, false));
        for bad in [":/d:ro,uid=5", ":/d:uid=x", ":/d:uid=-1"] {
            let e = parse_disk(&format!("{}{bad}", img.display()))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("invalid disk mount"), "{bad}: {e}");
        }
    }

    #[test]
    fn sparse_copy_keeps_content_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let mut f = std::fs::File::create(&a).unwrap();
        f.set_len(5 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        f.write_all(b"hello").unwrap();
        drop(f);
        sparse_copy(&a, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        use std::os::unix::fs::MetadataExt;
        // 5 MiB dense would be 10240 blocks of 512 bytes; only the 1 MiB chunk holding data is written.
        assert!(std::fs::metadata(&b).unwrap().blocks() <= 2048 + 16);
    }
}
