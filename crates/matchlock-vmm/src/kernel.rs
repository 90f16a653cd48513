//! Where the guest kernel lives.
//!
//! `guest/kernel/build.sh` builds `vmlinux` into `<cache>/kernel/<hash>/` where `<hash>` is the first
//! 16 hex digits of sha256(config fragment + "script=3\n" + each patch, in name order). The
//! fragment and patches are compiled into this crate, so the binary knows which kernel it expects
//! without running the script.

use crate::{cache_dir, VmmError};
use std::path::PathBuf;

/// Our kernel config fragment (merged onto `tinyconfig`).
pub const CONFIG_FRAGMENT: &str = include_str!("../../../guest/kernel/config");
/// The build script, so `matchlock kernel build` works from an installed binary too.
pub const BUILD_SCRIPT: &str = include_str!("../../../guest/kernel/build.sh");
/// Our kernel patches (`guest/kernel/patches/`), as `(file name, contents)` in name order.
pub const PATCHES: &[(&str, &str)] = &[(
    "0001-fuse-stream-large-uncached-reads.patch",
    include_str!("../../../guest/kernel/patches/0001-fuse-stream-large-uncached-reads.patch"),
)];

/// The cache key of the kernel this binary expects.
pub fn config_hash() -> String {
    let mut data = CONFIG_FRAGMENT.as_bytes().to_vec();
    data.extend_from_slice(b"script=3\n");
    for (_, patch) in PATCHES {
        data.extend_from_slice(patch.as_bytes());
    }
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
        // build.sh: { cat "$fragment"; echo "script=3"; cat patches... } | sha256sum | cut -c1-16
        assert!(super::BUILD_SCRIPT.contains(r#"echo "script=3""#));
        assert_eq!(super::config_hash().len(), 16);
        // Every patch in the directory is embedded, in the order the script applies them.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../guest/kernel/patches");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".patch"))
            .collect();
        on_disk.sort();
        let embedded: Vec<&str> = super::PATCHES.iter().map(|(n, _)| *n).collect();
        assert_eq!(on_disk, embedded);
        // And the script computes the same key from the files.
        let kernel_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../guest/kernel");
        let script = format!(
            "cd {kernel_dir} && {{ cat config; echo script=3; cat patches/*.patch; }} | sha256sum | cut -c1-16"
        );
        let out = std::process::Command::new("bash")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            super::config_hash()
        );
    }
}
