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
    let host_path = std::fs::canonicalize(host).map_err(|e| format!("host path {host}: {e}"))?;
    let meta = std::fs::metadata(&host_path).map_err(|e| format!("host path {host}: {e}"))?;
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
}
