//! Finding the static guest agent binary that becomes `/init` in the guest.

use crate::VmmError;
use std::path::{Path, PathBuf};

/// File name of the agent binary.
pub const AGENT_NAME: &str = "matchlock-guest";

/// `MATCHLOCK_GUEST_AGENT`, else `matchlock-guest` next to the running executable, else the cargo
/// layout `target/x86_64-unknown-linux-gnu/{release,debug}/` beside `target/{release,debug}/`.
pub fn locate() -> Result<PathBuf, VmmError> {
    if let Some(p) = std::env::var_os("MATCHLOCK_GUEST_AGENT").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return check(&p).map(|_| p);
    }
    let exe = std::env::current_exe()
        .map_err(|e| VmmError::Agent(format!("cannot find the matchlock executable: {e}")))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let mut candidates = vec![dir.join(AGENT_NAME)];
    // Cargo puts `--target` builds in target/<triple>/<profile>; the host binary may be in
    // target/<profile> or target/<profile>/deps (tests).
    for base in [dir.parent(), dir.parent().and_then(Path::parent)]
        .into_iter()
        .flatten()
    {
        for profile in ["release", "debug"] {
            candidates.push(
                base.join("x86_64-unknown-linux-gnu")
                    .join(profile)
                    .join(AGENT_NAME),
            );
        }
    }
    // `cargo build --workspace` also leaves a dynamic agent next to the binary: skip unusable
    // candidates and report the first problem only if no usable one exists.
    let mut first_problem = None;
    for c in &candidates {
        if c.is_file() {
            match check(c) {
                Ok(()) => return Ok(c.clone()),
                Err(e) => {
                    first_problem.get_or_insert(e);
                }
            }
        }
    }
    if let Some(e) = first_problem {
        return Err(e);
    }
    Err(VmmError::Agent(format!(
        "guest agent '{AGENT_NAME}' not found next to {}; build it with 'scripts/build-guest' or set MATCHLOCK_GUEST_AGENT",
        exe.display()
    )))
}

/// Checks that `path` is a statically linked x86-64 ELF executable (it runs as PID 1 with no libc).
pub fn check(path: &Path) -> Result<(), VmmError> {
    let data = std::fs::read(path)
        .map_err(|e| VmmError::Agent(format!("cannot read guest agent {}: {e}", path.display())))?;
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 {
        return Err(VmmError::Agent(format!(
            "{} is not a 64-bit ELF executable",
            path.display()
        )));
    }
    if has_interp(&data) {
        return Err(VmmError::Agent(format!(
            "guest agent {} is dynamically linked; build it with 'scripts/build-guest' (static, crt-static)",
            path.display()
        )));
    }
    Ok(())
}

/// Whether an ELF64 little-endian image has a PT_INTERP program header (i.e. needs a dynamic loader).
fn has_interp(d: &[u8]) -> bool {
    let u16at = |o: usize| {
        d.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64at = |o: usize| {
        d.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b: [u8; 8]| u64::from_le_bytes(b) as usize)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64at(0x20), u16at(0x36), u16at(0x38))
    else {
        return true;
    };
    (0..phnum).any(|i| {
        let off = phoff.saturating_add(i.saturating_mul(phentsize));
        d.get(off..off + 4)
            .map(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == 3)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn dynamic_binaries_are_refused() {
        // /bin/sh on any Debian host is dynamically linked.
        let err = super::check(std::path::Path::new("/bin/sh")).unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        let err = super::check(std::path::Path::new("/etc/hostname")).unwrap_err();
        assert!(err.to_string().contains("not a 64-bit ELF"), "{err}");
    }
}
