//! Checks of user-supplied sandbox settings, shared by the CLI flags and the RPC `create` fields so
//! both accept exactly the same values. Each takes the name the user knows the setting by (`--cpus`,
//! `resources.cpus`) and returns a one-line message that says what is accepted.

/// Longest lifetime limit (a year): deadlines are computed as instants, which must not overflow.
pub const MAX_TIMEOUT_SECS: u64 = 365 * 24 * 3600;

/// Most extra disks per sandbox (each is a virtio-mmio device; microvm has a fixed number of slots).
pub const MAX_DISKS: usize = 8;

/// CPU share: 0.01 to 64.
pub fn cpus(v: f64, what: &str) -> Result<(), String> {
    if !v.is_finite() || !(0.01..=64.0).contains(&v) {
        return Err(format!(
            "{what} {v} is out of range; give a number between 0.01 and 64"
        ));
    }
    Ok(())
}

/// Guest memory: 64 MiB to 1 TiB.
pub fn memory_mb(v: u64, what: &str) -> Result<(), String> {
    if !(64..=1024 * 1024).contains(&v) {
        return Err(format!("{what} {v} MiB is out of range; give at least 64"));
    }
    Ok(())
}

/// Writable disk: 32 MiB to 16 TiB.
pub fn disk_size_mb(v: u64, what: &str) -> Result<(), String> {
    if !(32..=16 * 1024 * 1024).contains(&v) {
        return Err(format!("{what} {v} MiB is out of range; give at least 32"));
    }
    Ok(())
}

/// Lifetime limit: 1 s to [`MAX_TIMEOUT_SECS`].
pub fn timeout_secs(v: u64, what: &str) -> Result<(), String> {
    if !(1..=MAX_TIMEOUT_SECS).contains(&v) {
        return Err(format!(
            "{what} {v} is out of range; give 1 to {MAX_TIMEOUT_SECS} seconds"
        ));
    }
    Ok(())
}

/// Whether `h` is usable as a host name (letters, digits, `-`, `.`; at most 63 bytes).
pub fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 63
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !h.starts_with('-')
}

/// A host name.
pub fn hostname(h: &str, what: &str) -> Result<(), String> {
    if !is_hostname(h) {
        return Err(format!(
            "{what} '{h}' is not a valid hostname (letters, digits, '-', '.', at most 63)"
        ));
    }
    Ok(())
}

/// A user: uid, uid:gid, name or name:group.
pub fn user(u: &str, what: &str) -> Result<(), String> {
    let ok = !u.is_empty()
        && u.len() <= 64
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
    if !ok {
        return Err(format!(
            "{what} '{u}' is not a uid, uid:gid, name or name:group"
        ));
    }
    Ok(())
}

/// An absolute guest path without `.`/`..` components or NUL bytes (a working directory or a
/// mount point).
pub fn guest_path(p: &str, what: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("{what} '{p}' must be an absolute path"));
    }
    if p.contains('\0') || p.split('/').any(|c| c == ".." || c == ".") || p.len() > 4096 {
        return Err(format!(
            "{what} '{p}' must not contain '.' or '..' components"
        ));
    }
    Ok(())
}

/// An `/etc/hosts` entry `NAME` -> `IP`; returns the address in canonical form.
pub fn add_host(name: &str, ip: &str, what: &str) -> Result<String, String> {
    let addr: std::net::IpAddr = ip
        .parse()
        .map_err(|_| format!("{what}: '{ip}' is not an IP address"))?;
    if !is_hostname(name) {
        return Err(format!("{what}: '{name}' is not a valid host name"));
    }
    Ok(addr.to_string())
}

/// An upstream DNS server: `IP`, `IP:PORT` or `[IPv6]:PORT` (port 53 by default).
pub fn dns_server(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(std::net::SocketAddr::new(ip, 53));
    }
    s.parse::<std::net::SocketAddr>()
        .map_err(|_| format!("'{s}' is not an IP address or IP:PORT"))
}

/// An interface MTU: 576 (the IPv4 minimum) to 9000.
pub fn mtu(v: u32, what: &str) -> Result<(), String> {
    if !(576..=9000).contains(&v) {
        return Err(format!("{what} {v} is out of range; give 576 to 9000"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_names() {
        assert!(cpus(0.5, "c").is_ok());
        assert!(cpus(0.0, "c").is_err());
        assert!(cpus(f64::NAN, "c").is_err());
        assert!(memory_mb(63, "m").is_err());
        assert!(disk_size_mb(32, "d").is_ok());
        assert!(timeout_secs(0, "t").is_err());
        assert!(hostname("box-1.local", "h").is_ok());
        assert!(hostname("-x", "h").is_err());
        assert!(hostname("a b", "h").is_err());
        assert!(user("1000:1000", "u").is_ok());
        assert!(user("a;b", "u").is_err());
        assert!(guest_path("/mnt/data", "p").is_ok());
        assert!(guest_path("mnt", "p").is_err());
        assert!(guest_path("/mnt/../etc", "p").is_err());
        assert_eq!(add_host("db", "::1", "a").unwrap(), "::1");
        assert!(add_host("db", "nope", "a").is_err());
        assert_eq!(dns_server("1.1.1.1").unwrap().port(), 53);
        assert_eq!(dns_server("127.0.0.1:5353").unwrap().port(), 5353);
        assert_eq!(dns_server("[::1]:53").unwrap().port(), 53);
        assert!(dns_server("dns.google").is_err());
        assert!(mtu(1500, "m").is_ok());
        assert!(mtu(100, "m").is_err());
    }
}

/// Parses a workspace mount `HOST:GUEST[:MODE]` (`-v`): `HOST` must exist and be a directory or
/// a regular file (it is made absolute), a relative `GUEST` lands under `workspace`, `MODE` is
/// `overlay` (the default), `host_fs` or `ro`.
pub fn vfs_mount(spec: &str, workspace: &str) -> Result<crate::config::VfsMount, String> {
    let mut parts = spec.splitn(3, ':');
    let (host, guest) = match (parts.next(), parts.next()) {
        (Some(h), Some(g)) if !h.is_empty() && !g.is_empty() => (h, g),
        _ => return Err(format!("-v '{spec}' must be HOST:GUEST[:MODE]")),
    };
    let mode = match parts.next() {
        None => crate::config::VfsMode::Overlay,
        Some(m) => crate::config::VfsMode::parse(m).ok_or_else(|| {
            format!("-v '{spec}': unknown mode '{m}'; use overlay, host_fs or ro")
        })?,
    };
    vfs_mount_parts(host, guest, mode, workspace).map_err(|e| format!("-v '{spec}': {e}"))
}

/// Checks one workspace mount given by its parts (shared by `-v` and RPC `vfs.mounts`).
pub fn vfs_mount_parts(
    host: &str,
    guest: &str,
    mode: crate::config::VfsMode,
    workspace: &str,
) -> Result<crate::config::VfsMount, String> {
    guest_path(workspace, "the workspace")?;
    let host_path = host_source(host)?;
    let meta =
        std::fs::symlink_metadata(&host_path).map_err(|e| format!("host path {host}: {e}"))?;
    if !meta.is_dir() && !meta.is_file() {
        return Err(format!(
            "host path {host} is neither a directory nor a regular file"
        ));
    }
    let guest = if guest.starts_with('/') {
        guest.trim_end_matches('/').to_string()
    } else {
        format!(
            "{}/{}",
            workspace.trim_end_matches('/'),
            guest.trim_end_matches('/')
        )
    };
    guest_path(&guest, "guest path")?;
    if guest == "/" || guest.is_empty() {
        return Err("the guest path must not be /".into());
    }
    Ok(crate::config::VfsMount {
        host_path,
        guest_path: guest,
        mode,
        owner_uid: None,
        owner_gid: None,
    })
}

/// Makes a mount or disk source absolute and checks that no component of it, as the user wrote
/// it, is a symlink.
///
/// Why refuse rather than follow: a sandbox that had a directory mounted `host_fs` can replace
/// any name inside it with a symlink to anywhere on the host. If a later run followed it, that
/// run would mount, as root, whatever the earlier guest chose (`ws/data` → `/`). Nothing can
/// tell a symlink the user made from one a guest planted, so none is followed; the error names
/// the real path, which the user can pass instead once they have looked at it. A relative path
/// is taken from the current directory, which the kernel already reports without symlinks; the
/// supervisor opens the result again refusing symlinks, so a swap after this check fails too.
pub fn host_source(host: &str) -> Result<std::path::PathBuf, String> {
    use std::path::{Component, PathBuf};
    let typed = std::path::Path::new(host);
    let mut path = if typed.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir().map_err(|e| format!("host path {host}: current directory: {e}"))?
    };
    for c in typed.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
            Component::ParentDir => {
                path.pop();
                continue;
            }
            Component::Normal(n) => path.push(n),
        }
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| format!("host path {host}: {e}"))?;
        if meta.file_type().is_symlink() {
            let real = std::fs::canonicalize(&path)
                .map(|r| format!("; it leads to {}", r.display()))
                .unwrap_or_default();
            return Err(format!(
                "host path {host}: {} is a symlink{real}. Matchlock does not follow symlinks in \
                 mount sources, since a sandbox could have planted one; name the real path instead",
                path.display()
            ));
        }
    }
    Ok(path)
}

/// Orders workspace mounts parents first (the guest mounts them in order) and refuses two at the
/// same guest path.
pub fn vfs_mounts(
    mut mounts: Vec<crate::config::VfsMount>,
) -> Result<Vec<crate::config::VfsMount>, String> {
    mounts.sort_by_key(|m| m.guest_path.split('/').filter(|c| !c.is_empty()).count());
    for (i, m) in mounts.iter().enumerate() {
        if mounts[..i].iter().any(|o| o.guest_path == m.guest_path) {
            return Err(format!("two mounts at {}", m.guest_path));
        }
    }
    Ok(mounts)
}

#[cfg(test)]
mod vfs_tests {
    use super::*;
    use crate::config::VfsMode;

    #[test]
    fn volume_specs() {
        let d = tempfile::tempdir().unwrap();
        let host = d.path().to_str().unwrap();
        let m = vfs_mount(&format!("{host}:code"), "/workspace").unwrap();
        assert_eq!(
            (m.guest_path.as_str(), m.mode),
            ("/workspace/code", VfsMode::Overlay)
        );
        let m = vfs_mount(&format!("{host}:/data/:host_fs"), "/workspace").unwrap();
        assert_eq!((m.guest_path.as_str(), m.mode), ("/data", VfsMode::HostFs));
        assert_eq!(
            vfs_mount(&format!("{host}:x:ro"), "/w").unwrap().mode,
            VfsMode::ReadOnly
        );
        for bad in [
            format!("{host}:x:rw2"),
            format!("{host}:../etc"),
            format!("{host}:/"),
            host.to_string(),
            "/does/not/exist:x".to_string(),
        ] {
            assert!(vfs_mount(&bad, "/workspace").is_err(), "{bad}");
        }
        let a = vfs_mount(&format!("{host}:a/b"), "/w").unwrap();
        let b = vfs_mount(&format!("{host}:a"), "/w").unwrap();
        let sorted = vfs_mounts(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!(sorted[0].guest_path, "/w/a");
        assert!(vfs_mounts(vec![b.clone(), b]).is_err());
    }

    /// A guest that had `ws/` mounted can leave symlinks in it; a later run must not follow
    /// them, whether the link is the source itself or a directory above it.
    #[test]
    fn symlinked_sources_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let ws = d.path().join("ws");
        std::fs::create_dir_all(ws.join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", ws.join("data")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", ws.join("cfg.json")).unwrap();
        std::os::unix::fs::symlink("real", ws.join("dir")).unwrap();
        std::fs::write(ws.join("real/file"), "x").unwrap();
        for src in ["data", "cfg.json", "dir/file", "dir/../real", "data/passwd"] {
            let spec = format!("{}/{src}:/x:host_fs", ws.display());
            let e = vfs_mount(&spec, "/w").unwrap_err();
            assert!(
                e.contains("is a symlink") && e.contains("name the real path"),
                "{e}"
            );
        }
        let e = vfs_mount(&format!("{}/data:/x", ws.display()), "/w").unwrap_err();
        assert!(e.contains("it leads to /etc"), "{e}");
        // The real paths, and `..` that only walks back over directories, are fine.
        let m = vfs_mount(&format!("{}/real/../real/file:/x:ro", ws.display()), "/w").unwrap();
        assert_eq!(m.host_path, ws.join("real/file"));
        assert!(vfs_mount(&format!("{}/real:/x", ws.display()), "/w").is_ok());
    }
}
