//! Shared by the image targets: a private image store per input inside a fenced temp
//! directory, and the tarballs (`docker save` and OCI layouts) the harness wraps inputs in.
//! The JSON documents are spelled out byte for byte, so that `make_corpus.py` can compute the
//! digests its seeds refer to.

#![allow(dead_code)] // each target uses a part

use matchlock_image::{ImageError, ImageInfo, ImageStore};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::Path;
use std::sync::OnceLock;

/// What every import is tagged as.
pub const NAME: &str = "fuzz:latest";

/// Largest file an input may make the store write (`RLIMIT_FSIZE`; `SIGXFSZ` is ignored, so a
/// write past it fails with `EFBIG` instead of killing the fuzzer). The ext4 images of inputs
/// this small stay far below it.
const FILE_LIMIT: u64 = 256 << 20;

const CANARY: &[u8] = b"outside the image store\n";

pub struct Fence {
    /// Holds `canary` and `fence/`; each input's store is `fence/store`.
    base: tempfile::TempDir,
}

pub fn fence() -> &'static Fence {
    static F: OnceLock<Fence> = OnceLock::new();
    F.get_or_init(|| {
        // SAFETY: plain libc calls with valid arguments, before any other thread of ours runs.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: FILE_LIMIT,
                rlim_max: FILE_LIMIT,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0, "setrlimit");
        }
        let base = tempfile::Builder::new()
            .prefix("matchlock-fuzz-image-")
            .tempdir()
            .expect("temp dir");
        fs::write(base.path().join("canary"), CANARY).expect("canary");
        fs::create_dir(base.path().join("fence")).expect("fence");
        Fence { base }
    })
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("listing")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

impl Fence {
    /// Imports `tarball` into a fresh store tagged [`NAME`], removes the store, and checks
    /// that nothing was written next to it.
    pub fn import(&self, tarball: &[u8]) -> Result<ImageInfo, ImageError> {
        let fence = self.base.path().join("fence");
        let root = fence.join("store");
        let store = ImageStore::open(&root).expect("store");
        let result = store.import(NAME, tarball);
        if let Ok(info) = &result {
            assert!(
                info.rootfs.starts_with(store.root()),
                "rootfs outside the store"
            );
        }
        fs::remove_dir_all(&root).expect("removing the store");
        assert!(
            listing(&fence).is_empty(),
            "an import wrote next to its store: {:?}",
            listing(&fence)
        );
        assert_eq!(listing(self.base.path()), ["canary", "fence"]);
        assert_eq!(
            fs::read(self.base.path().join("canary")).expect("canary"),
            CANARY
        );
        result
    }
}

pub fn sha256_hex(b: &[u8]) -> String {
    let d = Sha256::digest(b);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn digest(b: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(b))
}

/// A tarball of regular files, in order.
pub fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, path, *data).expect("tar entry");
    }
    b.into_inner().expect("tarball")
}

/// A one-layer image config whose `diff_ids` name `diff_id`.
pub fn config(diff_id: &str) -> Vec<u8> {
    format!(
        r#"{{"architecture":"amd64","os":"linux","created":"2024-01-01T00:00:00Z","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/","User":"0"}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
    )
    .into_bytes()
}

/// A `docker save` archive: `manifest.json`, `config.json` (also as a blob) and `layer.tar`.
pub fn docker_archive(manifest: &[u8], config: &[u8], layer: &[u8]) -> Vec<u8> {
    let config_blob = format!("blobs/sha256/{}", sha256_hex(config));
    let layer_blob = format!("blobs/sha256/{}", sha256_hex(layer));
    tarball(&[
        ("manifest.json", manifest),
        ("config.json", config),
        (&config_blob, config),
        ("layer.tar", layer),
        (&layer_blob, layer),
    ])
}

/// The `manifest.json` of a one-image, one-layer `docker save` archive.
pub fn docker_manifest() -> Vec<u8> {
    br#"[{"Config":"config.json","RepoTags":["fuzz:latest"],"Layers":["layer.tar"]}]"#.to_vec()
}

/// An OCI image manifest for `config` and `layer`.
pub fn oci_manifest(config: &[u8], layer: &[u8]) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        digest(config),
        config.len(),
        digest(layer),
        layer.len()
    )
    .into_bytes()
}

/// An OCI image index of one manifest (`manifest`), for linux/amd64.
pub fn oci_index(manifest: &[u8]) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{}","size":{},"platform":{{"architecture":"amd64","os":"linux"}},"annotations":{{"org.opencontainers.image.ref.name":"latest"}}}}]}}"#,
        digest(manifest),
        manifest.len()
    )
    .into_bytes()
}

/// An OCI image layout: `oci-layout`, `index.json` and `blobs` named by their digests.
pub fn oci_layout(index: &[u8], blobs: &[&[u8]]) -> Vec<u8> {
    let names: Vec<String> = blobs
        .iter()
        .map(|b| format!("blobs/sha256/{}", sha256_hex(b)))
        .collect();
    let mut files: Vec<(&str, &[u8])> = vec![
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#),
        ("index.json", index),
    ];
    for (name, blob) in names.iter().zip(blobs) {
        files.push((name, blob));
    }
    tarball(&files)
}
