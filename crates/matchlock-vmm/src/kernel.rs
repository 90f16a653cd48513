//! Where the guest kernel lives.
//!
//! `guest/kernel/build.sh` builds `vmlinux` into `<cache>/kernel/<hash>/` where `<hash>` is the first
//! 16 hex digits of sha256(config fragment + "script=2\n"). The fragment is compiled into this crate,
//! so the binary knows which kernel it expects without running the script.

use crate::{cache_dir, VmmError};
use std::path::PathBuf;

/// Our kernel config fragment (merged onto `tinyconfig`).
pub const CONFIG_FRAGMENT: &str = include_str!("../../../guest/kernel/config");
/// The build script, so `matchlock kernel build` works from an installed binary too.
pub const BUILD_SCRIPT: &str = include_str!("../../../guest/kernel/build.sh");

/// The cache key of the kernel this binary expects.
pub fn config_hash() -> String {
    let mut data = CONFIG_FRAGMENT.as_bytes().to_vec();
    data.extend_from_slice(b"script=2\n");
    crate::sha256_hex(&data)[..16].to_string()
}

/// Where our kernel is (or will be) cached.
pub fn default_path() -> PathBuf {
    cache_dir()
        .join("kernel")
        .join(config_hash())
        .join("vmlinux")
}

/// The kernel to boot: `MATCHLOCK_KERNEL` if set, else our cached build.
pub fn locate() -> Result<PathBuf, VmmError> {
    if let Some(k) = std::env::var_os("MATCHLOCK_KERNEL").filter(|k| !k.is_empty()) {
        let k = PathBuf::from(k);
        return if k.is_file() {
            Ok(k)
        } else {
            Err(VmmError::KernelOverrideMissing(k))
        };
    }
    let p = default_path();
    if p.is_file() {
        Ok(p)
    } else {
        Err(VmmError::KernelMissing(p))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hash_matches_build_script() {
        // build.sh: { cat "$fragment"; echo "script=2"; } | sha256sum | cut -c1-16
        assert!(super::BUILD_SCRIPT.contains(r#"echo "script=2""#));
        assert_eq!(super::config_hash().len(), 16);
    }
}
