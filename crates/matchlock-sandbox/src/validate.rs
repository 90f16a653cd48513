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
    }
}
