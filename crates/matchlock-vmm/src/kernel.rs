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

/// Resolves a kernel the user named (`--kernel`, SDK `kernel.ref`): a path or a `file://` URL
/// to an uncompressed x86-64 `vmlinux` with a PVH entry point, checked here so a wrong file
/// fails before anything boots. Registry references are refused with what they would need.
pub fn resolve_ref(reference: &str) -> Result<PathBuf, VmmError> {
    let r = reference.trim();
    let bad = |why: String| VmmError::BadKernel(format!("kernel {r}: {why}"));
    if r.is_empty() {
        return Err(bad("empty reference".into()));
    }
    let path = match r.strip_prefix("file://") {
        Some(p) => PathBuf::from(p),
        None if looks_like_oci(r) => {
            return Err(bad(
                "OCI kernel references are not supported: matchlock boots a local vmlinux \
                 (uncompressed x86-64 ELF with a PVH entry point, virtio-mmio command-line \
                 devices, and the virtio console, serial, block, net and fs drivers built in). \
                 Pull or build the file yourself ('matchlock kernel build' builds ours) and pass \
                 its path or a file:// URL"
                    .into(),
            ))
        }
        None => PathBuf::from(r),
    };
    let path = std::fs::canonicalize(&path).map_err(|e| bad(format!("{e}")))?;
    if !path.is_file() {
        return Err(bad("not a regular file".into()));
    }
    check_vmlinux(&path).map_err(bad)?;
    Ok(path)
}

/// `registry/repo:tag`, `repo@sha256:...`: a reference to an image, not a file. A path that
/// exists is never taken for one.
fn looks_like_oci(r: &str) -> bool {
    !r.starts_with('/')
        && !r.starts_with('.')
        && !std::path::Path::new(r).exists()
        && (r.contains('@') || r.contains(':') || r.matches('/').count() >= 2)
}

/// Checks that `path` is a kernel matchlock can boot: an ELF64 x86-64 executable (not a
/// `bzImage`) with a PVH entry point (a Xen `PHYS32_ENTRY` note), which QEMU needs to boot an
/// ELF kernel directly.
pub fn check_vmlinux(path: &std::path::Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut eh = [0u8; 64];
    if f.read_exact(&mut eh).is_err() || &eh[..4] != b"\x7fELF" {
        return Err(
            "not an ELF vmlinux (a bzImage or compressed kernel cannot be booted; \
                    use the uncompressed vmlinux of the build)"
                .into(),
        );
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    if eh[4] != 2 || eh[5] != 1 || u16_at(&eh, 18) != 62 {
        return Err("not a 64-bit x86 (little-endian) kernel".into());
    }
    let (phoff, phentsize, phnum) = (u64_at(&eh, 32), u16_at(&eh, 54) as u64, u16_at(&eh, 56));
    if phentsize < 56 || phnum == 0 || phnum > 64 {
        return Err("its ELF program headers are malformed".into());
    }
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    for i in 0..u64::from(phnum) {
        let mut ph = [0u8; 56];
        f.seek(SeekFrom::Start(phoff + i * phentsize))
            .and_then(|_| f.read_exact(&mut ph))
            .map_err(|_| "its ELF program headers are truncated".to_string())?;
        const PT_NOTE: u32 = 4;
        if u32_at(&ph, 0) != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(&ph, 8), u64_at(&ph, 32));
        if size > 1 << 20 || off.saturating_add(size) > len {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        f.seek(SeekFrom::Start(off))
            .and_then(|_| f.read_exact(&mut notes))
            .map_err(|e| e.to_string())?;
        let mut p = 0usize;
        while p + 12 <= notes.len() {
            let (namesz, descsz, kind) = (
                u32_at(&notes, p) as usize,
                u32_at(&notes, p + 4) as usize,
                u32_at(&notes, p + 8),
            );
            let name_end = p + 12 + namesz;
            // XEN_ELFNOTE_PHYS32_ENTRY
            if kind == 18 && notes.get(p + 12..name_end) == Some(b"Xen\0") {
                return Ok(());
            }
            p = name_end.div_ceil(4) * 4;
            p = (p + descsz).div_ceil(4) * 4;
        }
    }
    Err("it has no PVH entry point (build it with CONFIG_PVH=y); QEMU boots an ELF kernel only through PVH".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_references_are_checked_before_boot() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("bzImage");
        std::fs::write(&junk, b"MZ not an elf").unwrap();
        let e = super::resolve_ref(junk.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an ELF vmlinux"), "{e}");
        let e = super::resolve_ref(&format!("file://{}", dir.path().join("nope").display()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("No such file"), "{e}");
        let e = super::resolve_ref("ghcr.io/jingkaihe/matchlock/kernel:6.1.137")
            .unwrap_err()
            .to_string();
        assert!(e.contains("OCI kernel references are not supported"), "{e}");
        // An x86-64 ELF without a PVH note (this very test binary).
        let exe = std::env::current_exe().unwrap();
        let e = super::check_vmlinux(&exe).unwrap_err();
        assert!(e.contains("no PVH entry point"), "{e}");
        // Our own kernel passes, when it has been built.
        if let Ok(k) = super::locate() {
            super::check_vmlinux(&k).unwrap();
        }
    }

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
