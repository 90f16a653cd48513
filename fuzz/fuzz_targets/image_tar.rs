//! Tarballs into the image store (`matchlock_image::ImageStore::import`): the outer archive's
//! reader (gzip/zstd detection, entry paths and links, blob digests), and above all the layer
//! unpacker, which applies hostile tar entries (paths, `..`, links, hard links, whiteouts,
//! devices, PAX records, xattrs, modes and owners) to a staging tree, then builds the ext4 image.
//!
//! Each input is imported twice, into a fresh store inside a fenced temp directory that is
//! removed afterwards; anything written next to the store fails the run:
//!
//! 1. as the single layer of a `docker save` archive the harness builds around it. The layer is
//!    applied in full either way; its `diff_id` is the input's real sha256 for one input in 16
//!    (chosen by that digest, so reruns agree), letting those go on to `Staging::finalize` and
//!    the ext4 build (`mke2fs` and `debugfs`, tens of milliseconds), and a wrong one otherwise, so
//!    the import stops at the digest check right after unpacking;
//! 2. as the outer archive itself (a `docker save` tarball or an OCI image layout).
//!
//! Files the store writes are capped at 256 MiB (`RLIMIT_FSIZE`), so a sparse-file or
//! decompression bomb cannot fill the disk.

#![no_main]

#[path = "common/image.rs"]
mod image;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let fence = image::fence();
    let hex = image::sha256_hex(data);
    let diff_id = if hex.as_bytes()[0] == b'0' {
        format!("sha256:{hex}")
    } else {
        image::digest(b"not this layer")
    };
    let archive = image::docker_archive(&image::docker_manifest(), &image::config(&diff_id), data);
    let _ = fence.import(&archive);
    let _ = fence.import(data);
});
