//! Pulling images from OCI/Docker registries (distribution API v2) into the store.
//!
//! The manifest (and, for multi-arch images, the index) and the config are fetched and checked
//! against their digests first. Then the layers are downloaded concurrently while a builder
//! thread applies them in order as soon as each one is available, through the same unpacking
//! and ext4 code as tarball imports (`unpack.rs`, `ext4.rs`), so downloading and unpacking
//! overlap.
//!
//! Cache and crash safety:
//! * a blob enters `blobs/sha256` only by rename after its sha256 matched its digest; a cached
//!   blob is hashed again before it is used, and a corrupt one is deleted and downloaded again;
//! * downloads are written to `tmp/blob-<hex>.partial` (flock'ed while written, so two pulls of
//!   the same blob do not interleave); an interrupted pull leaves that file, and the next pull
//!   continues it with an HTTP range request, hashing the kept bytes first. If the finished file
//!   does not match, it is discarded and downloaded once more from the start;
//! * the tag is written last, under the store lock, after the root file system is in place, so
//!   no half-pulled image is ever visible;
//! * every pull holds `pulls.lock` shared; `gc` only deletes blobs and partial downloads when
//!   it can hold that lock exclusively.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use oci_client::client::BlobResponse;
use oci_client::Reference;
use sha2::{Digest, Sha256};

use crate::archive::{
    host_arch, parse_config_bytes, Descriptor, ImagePlan, Index, LayerSource, Manifest,
    INDEX_TYPES, JSON_CAP, MANIFEST_TYPES,
};
use crate::progress::{PullEvent, PullProgress};
use crate::reference::normalize_reference;
use crate::registry::{self, Connection, RegistryConfig};
use crate::store::{ImageStore, TempDir};
use crate::util::{atomic_write, digest_hex, one_line, sha256_file, unique_name, FileLock};
use crate::{ImageError, ImageInfo};

/// Cap on a manifest or index: real ones are a few KiB; Docker's own limit is 4 MiB.
const MANIFEST_CAP: usize = 4 << 20;
/// Layers downloaded at once: enough to fill a link, few enough not to anger rate limiters.
const DEFAULT_CONCURRENT_DOWNLOADS: usize = 4;

const MANIFEST_ACCEPT: [&str; 4] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// When [`ImageStore::ensure`] contacts the registry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Use the local image; pull only when the tag is not in the store (`run` without `--pull`).
    #[default]
    Missing,
    /// Always ask the registry what the tag points at now, and pull what changed (`run --pull`).
    Always,
    /// Never contact a registry.
    Never,
}

/// Options of one pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Ignore the cache: download every blob again and rebuild the root file system.
    pub force: bool,
    /// Credentials, trust and plain-HTTP rules.
    pub registry: RegistryConfig,
    /// Layers downloaded at once (0 means the default, 4).
    pub max_concurrent_downloads: usize,
}

impl PullOptions {
    /// Default options with registry settings from the environment
    /// ([`RegistryConfig::from_env`]).
    pub fn from_env() -> PullOptions {
        PullOptions {
            registry: RegistryConfig::from_env(),
            ..Default::default()
        }
    }
}

/// What the registry says the image is, fetched and verified.
struct Remote {
    /// `Reference` used for blob requests (same repository as the pull).
    reference: Reference,
    /// Digests of the small JSON blobs (index, manifest, config), already stored.
    meta_blobs: Vec<String>,
    config_digest: String,
    created: Option<String>,
    config: crate::ImageConfig,
    layers: Vec<Descriptor>,
    diff_ids: Vec<String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl ImageStore {
    /// Pull `reference` (`alpine`, `registry:5000/app:1`, `repo@sha256:...`) from its registry
    /// into the store and tag it; returns the stored image.
    ///
    /// Blocking: it runs its own tokio runtime for the network part and runs `mke2fs`, so call it
    /// from a plain thread or `tokio::task::spawn_blocking`, not from inside an async task.
    /// Reuses verified cached blobs and an existing root file system of the same image unless
    /// `opts.force` is set.
    pub fn pull(
        &self,
        reference: &str,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<ImageInfo, ImageError> {
        let normalized = normalize_reference(reference)?;
        let parsed: Reference = normalized.parse().map_err(|e: oci_client::ParseError| {
            ImageError::InvalidReference {
                input: reference.to_string(),
                reason: e.to_string(),
            }
        })?;
        // Held for the whole pull: our blobs are untagged until commit, and gc must not take them.
        let _pulling = FileLock::shared(&self.root().join("pulls.lock"))?;
        self.sweep_tmp();
        let work = TempDir::create(self.tmp().join(unique_name("pull")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ImageError::io("starting the network runtime", e))?;

        progress.event(PullEvent::Contacting {
            registry: parsed.registry(),
            reference: &normalized,
        });
        let (conn, remote) = rt.block_on(async {
            let conn = registry::connect(&parsed, &opts.registry).await?;
            let remote = self.resolve_remote(&conn, &parsed, progress).await?;
            Ok::<_, ImageError>((conn, remote))
        })?;

        let rootfs = self.rootfs_path(&remote.config_digest)?;
        let mut built: Option<PathBuf> = None;
        loop {
            if built.is_none() && (opts.force || !rootfs.exists()) {
                built = Some(self.fetch_and_build(&rt, &conn, &remote, &work.0, opts, progress)?);
            } else if built.is_none() {
                progress.event(PullEvent::UpToDate);
            }
            let _lock = self.lock()?;
            if let Some(img) = built.as_ref().filter(|_| opts.force || !rootfs.exists()) {
                // Replacing an existing file (force) is atomic; running sandboxes keep theirs open.
                fs::rename(img, &rootfs)
                    .map_err(|e| ImageError::io(format!("installing {}", rootfs.display()), e))?;
            } else if !rootfs.exists() {
                // A concurrent remove deleted the rootfs we meant to share: build it ourselves.
                continue;
            }
            let mut blobs: Vec<(String, PathBuf)> = Vec::new();
            for d in remote
                .meta_blobs
                .iter()
                .chain(remote.layers.iter().map(|l| &l.digest))
            {
                blobs.push((d.clone(), self.blob_path(d)?));
            }
            let plan = ImagePlan {
                config_digest: remote.config_digest.clone(),
                created: remote.created.clone(),
                config: remote.config.clone(),
                layers: Vec::new(),
                blobs,
                format: "registry",
            };
            return self.commit(&normalized, &plan, &rootfs);
        }
    }

    /// Resolve `reference` to an image according to `policy`: the local tag, or a pull.
    ///
    /// Blocking like [`ImageStore::pull`] (call it from `spawn_blocking` in async code).
    pub fn ensure(
        &self,
        reference: &str,
        policy: PullPolicy,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<ImageInfo, ImageError> {
        match policy {
            PullPolicy::Always => self.pull(reference, opts, progress),
            PullPolicy::Never => self.resolve(reference),
            PullPolicy::Missing => match self.resolve(reference) {
                Ok(info) => Ok(info),
                // Not tagged, or tagged but its rootfs was deleted: fetch it.
                Err(ImageError::NotFound { .. }) | Err(ImageError::InvalidArchive(_)) => {
                    self.pull(reference, opts, progress)
                }
                Err(e) => Err(e),
            },
        }
    }

    /// Store a small verified blob (manifest, index, config).
    fn store_meta_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), ImageError> {
        let dest = self.blob_path(digest)?;
        atomic_write(&self.tmp(), &dest, bytes)
    }

    /// Fetch a manifest or index by `reference` and check it against the digest it is named by
    /// (or, for a tag, the registry's `Docker-Content-Digest`).
    async fn fetch_manifest(
        &self,
        conn: &Connection,
        reference: &Reference,
    ) -> Result<(Vec<u8>, String), ImageError> {
        let (bytes, header_digest) = conn
            .client
            .pull_manifest_raw(reference, &conn.auth, &MANIFEST_ACCEPT)
            .await
            .map_err(|e| registry::map_error(e, &conn.ctx))?;
        if bytes.len() > MANIFEST_CAP {
            return Err(ImageError::Registry {
                registry: conn.ctx.registry.clone(),
                message: format!("the manifest is larger than {MANIFEST_CAP} bytes"),
            });
        }
        let actual = sha256_hex(&bytes);
        let expected = reference
            .digest()
            .map(str::to_string)
            .unwrap_or(header_digest);
        if expected.starts_with("sha256:") && expected != actual {
            return Err(ImageError::DigestMismatch {
                what: format!("manifest of {}", conn.ctx.reference),
                expected,
                actual,
                remedy: "the registry served corrupt data; retry the pull".into(),
            });
        }
        Ok((bytes.to_vec(), actual))
    }

    /// Fetch and verify the manifest (choosing this host's platform from an index) and the
    /// config; store those blobs.
    async fn resolve_remote(
        &self,
        conn: &Connection,
        reference: &Reference,
        progress: &dyn PullProgress,
    ) -> Result<Remote, ImageError> {
        let registry = conn.ctx.registry.clone();
        let bad = |message: String| ImageError::Registry {
            registry: registry.clone(),
            message,
        };
        let mut meta_blobs = Vec::new();
        let (mut bytes, mut digest) = self.fetch_manifest(conn, reference).await?;
        let mut by_digest = reference.clone();
        for depth in 0.. {
            let doc: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("the manifest {digest} is not JSON: {e}")))?;
            if doc.get("schemaVersion").and_then(|v| v.as_i64()) == Some(1) {
                return Err(bad(format!(
                    "{} is a Docker schema 1 image, which is not supported; push it again with a current Docker",
                    conn.ctx.reference
                )));
            }
            let media = doc
                .get("mediaType")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            let is_index = INDEX_TYPES.contains(&media)
                || (media.is_empty() && doc.get("manifests").is_some());
            if !is_index {
                if !(MANIFEST_TYPES.contains(&media) || media.is_empty()) {
                    return Err(bad(format!("unsupported manifest type {media}")));
                }
                break;
            }
            if depth >= 2 {
                return Err(bad("image indexes are nested too deeply".into()));
            }
            self.store_meta_blob(&digest, &bytes)?;
            meta_blobs.push(digest.clone());
            let index: Index = serde_json::from_value(doc)
                .map_err(|e| bad(format!("the image index {digest} is malformed: {e}")))?;
            let arch = host_arch();
            let chosen = index
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                })
                // An index of one manifest that names no platform (some tools write those).
                .or(match index.manifests.as_slice() {
                    [only] if only.platform.is_none() => Some(only),
                    _ => None,
                });
            let Some(chosen) = chosen else {
                let have: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|m| m.platform.as_ref())
                    .filter(|p| p.os != "unknown")
                    .map(|p| format!("{}/{}", p.os, p.architecture))
                    .collect();
                return Err(bad(format!(
                    "{} has no linux/{arch} image (it has {}); pick an image built for linux/{arch}",
                    conn.ctx.reference,
                    if have.is_empty() { "none".to_string() } else { have.join(", ") }
                )));
            };
            digest_hex(&chosen.digest)?;
            by_digest = Reference::with_digest(
                reference.registry().to_string(),
                reference.repository().to_string(),
                chosen.digest.clone(),
            );
            (bytes, digest) = self.fetch_manifest(conn, &by_digest).await?;
        }
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("the manifest {digest} is malformed: {e}")))?;
        self.store_meta_blob(&digest, &bytes)?;
        meta_blobs.push(digest.clone());

        // The config: small, fetched into memory with a cap, verified, stored.
        let config_digest = manifest.config.digest.clone();
        digest_hex(&config_digest)?;
        if let Some(media) = &manifest.config.media_type {
            if !(media.contains("container.image")
                || media.contains("image.config")
                || media.contains("container.config"))
            {
                return Err(bad(format!(
                    "{} is not a container image (its config is {media})",
                    conn.ctx.reference
                )));
            }
        }
        if manifest.config.size.unwrap_or(0) > JSON_CAP {
            return Err(bad(format!(
                "the image config is larger than {JSON_CAP} bytes"
            )));
        }
        let mut capped = CappedVec {
            buf: Vec::new(),
            cap: JSON_CAP as usize,
        };
        conn.client
            .pull_blob(&by_digest, config_digest.as_str(), &mut capped)
            .await
            .map_err(|e| registry::map_error(e, &conn.ctx))?;
        let config_bytes = capped.buf;
        let actual = sha256_hex(&config_bytes);
        if actual != config_digest {
            return Err(ImageError::DigestMismatch {
                what: format!("image config of {}", conn.ctx.reference),
                expected: config_digest,
                actual,
                remedy: "the registry served corrupt data; retry the pull".into(),
            });
        }
        let (created, config, diff_ids) = parse_config_bytes(&config_bytes, &config_digest)?;
        if diff_ids.len() != manifest.layers.len() {
            return Err(bad(format!(
                "the manifest lists {} layers but the config has {} diff_ids",
                manifest.layers.len(),
                diff_ids.len()
            )));
        }
        for layer in &manifest.layers {
            digest_hex(&layer.digest)?;
        }
        self.store_meta_blob(&config_digest, &config_bytes)?;
        meta_blobs.push(config_digest.clone());
        progress.event(PullEvent::Resolved {
            reference: &conn.ctx.reference,
            manifest: &digest,
            layers: manifest.layers.len(),
            bytes: manifest.layers.iter().filter_map(|l| l.size).sum(),
        });
        Ok(Remote {
            reference: by_digest,
            meta_blobs,
            config_digest,
            created,
            config,
            layers: manifest.layers,
            diff_ids,
        })
    }

    /// Download the layers (concurrently) while a builder thread applies them in order; returns
    /// the finished ext4 image inside `work`.
    fn fetch_and_build(
        &self,
        rt: &tokio::runtime::Runtime,
        conn: &Connection,
        remote: &Remote,
        work: &Path,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<PathBuf, ImageError> {
        let concurrency = match opts.max_concurrent_downloads {
            0 => DEFAULT_CONCURRENT_DOWNLOADS,
            n => n,
        };
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Result<LayerSource, ImageError>>(remote.layers.len());
        std::thread::scope(|scope| {
            let builder = scope.spawn(|| self.build_rootfs(rx.into_iter(), work));
            rt.block_on(async {
                let downloads = remote
                    .layers
                    .iter()
                    .map(|desc| self.fetch_layer(conn, remote, desc, work, opts, progress));
                // `buffered` runs up to `concurrency` downloads at once but yields them in layer
                // order, which is the order the builder needs them in.
                let mut results = futures::stream::iter(downloads).buffered(concurrency);
                let mut i = 0;
                while let Some(result) = results.next().await {
                    let failed = result.is_err();
                    let item = result.map(|file| LayerSource {
                        file,
                        diff_id: remote.diff_ids[i].clone(),
                    });
                    i += 1;
                    // A send error means the builder gave up (its error is reported below).
                    if tx.send(item).is_err() || failed {
                        break;
                    }
                }
                if i == remote.layers.len() {
                    progress.event(PullEvent::Building);
                }
                drop(tx);
            });
            let built = builder.join().unwrap_or_else(|_| {
                Err(ImageError::archive("the root file system builder panicked"))
            })?;
            Ok(built)
        })
    }

    /// Make one layer blob available in `blobs/sha256`: the cached copy if it still verifies,
    /// else a (resumed) download.
    async fn fetch_layer(
        &self,
        conn: &Connection,
        remote: &Remote,
        desc: &Descriptor,
        work: &Path,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<PathBuf, ImageError> {
        let dest = self.blob_path(&desc.digest)?;
        if !opts.force && dest.exists() {
            let path = dest.clone();
            let hashed = tokio::task::spawn_blocking(move || sha256_file(&path))
                .await
                .map_err(|e| ImageError::io("verifying a cached blob", io::Error::other(e)))?;
            match hashed {
                Ok((d, _)) if d == desc.digest => {
                    progress.event(PullEvent::LayerDone {
                        digest: &desc.digest,
                        cached: true,
                    });
                    return Ok(dest);
                }
                Ok(_) => {
                    progress.event(PullEvent::CorruptCacheEntry {
                        digest: &desc.digest,
                    });
                    let _ = fs::remove_file(&dest);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(ImageError::io(
                        format!("reading cached blob {}", dest.display()),
                        e,
                    ))
                }
            }
        }
        let mut retried = false;
        loop {
            match self
                .download(conn, remote, desc, &dest, work, opts, progress)
                .await
            {
                // A resumed download whose result does not verify: the kept bytes were bad
                // (or the blob changed); start once more from scratch.
                Err(Resumed(true, ImageError::DigestMismatch { .. })) if !retried => {
                    retried = true;
                }
                Err(Resumed(_, e)) => return Err(e),
                Ok(()) => {
                    progress.event(PullEvent::LayerDone {
                        digest: &desc.digest,
                        cached: false,
                    });
                    return Ok(dest);
                }
            }
        }
    }

    /// Download `desc` into `dest` through a partial file in `tmp/`, verifying it.
    #[allow(clippy::too_many_arguments)]
    async fn download(
        &self,
        conn: &Connection,
        remote: &Remote,
        desc: &Descriptor,
        dest: &Path,
        work: &Path,
        opts: &PullOptions,
        progress: &dyn PullProgress,
    ) -> Result<(), Resumed> {
        let hex = digest_hex(&desc.digest).map_err(|e| Resumed(false, e))?;
        let shared = self.tmp().join(format!("blob-{hex}.partial"));
        let io_err = |what: &str, e: io::Error| Resumed(false, ImageError::io(what.to_string(), e));
        // The shared partial file, unless another process is downloading the same blob right
        // now: then a private file (no resume, but no interleaved writes either).
        let (mut file, path) = match open_locked(&shared) {
            Ok(Some(f)) => (f, shared),
            Ok(None) => {
                let private = work.join(format!("blob-{hex}"));
                let f = File::options()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&private)
                    .map_err(|e| io_err("creating a download file", e))?;
                (f, private)
            }
            Err(e) => return Err(io_err("opening the partial download", e)),
        };
        let declared = desc.size;
        let mut have = file
            .metadata()
            .map_err(|e| io_err("inspecting the partial download", e))?
            .len();
        if opts.force || declared.is_some_and(|s| have > s) {
            have = 0;
        }
        // Hash what an interrupted pull left behind, so the final digest covers the whole blob.
        let mut hasher = Sha256::new();
        if have > 0 {
            file.rewind()
                .map_err(|e| io_err("reading the partial download", e))?;
            let mut kept = (&mut file).take(have);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = kept
                    .read(&mut buf)
                    .map_err(|e| io_err("reading the partial download", e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
        }
        let resumed = have > 0;
        let failed = |e: ImageError| Resumed(resumed, e);
        // A partial file that is already complete (a pull died between the last write and the
        // rename) needs no request: a range starting at the end would be refused with 416.
        let complete = have > 0 && declared == Some(have);
        let mut stream: futures::stream::BoxStream<'static, io::Result<bytes::Bytes>> = if complete
        {
            futures::stream::empty().boxed()
        } else {
            let response = conn
                .client
                .pull_blob_stream_partial(&remote.reference, desc.digest.as_str(), have, None)
                .await
                .map_err(|e| failed(registry::map_error(e, &conn.ctx)))?;
            match response {
                BlobResponse::Partial(s) => s.stream,
                // The registry ignored the range: start over.
                BlobResponse::Full(s) => {
                    have = 0;
                    hasher = Sha256::new();
                    s.stream
                }
            }
        };
        file.set_len(have)
            .and_then(|_| file.seek(io::SeekFrom::Start(have)).map(|_| ()))
            .map_err(|e| failed(ImageError::io("preparing the download file", e)))?;
        progress.event(PullEvent::LayerStart {
            digest: &desc.digest,
            size: declared.unwrap_or(0),
            resumed_at: have,
        });
        let mut done = have;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // oci-client's own digest check on full responses ends the stream this way.
                    if e.get_ref()
                        .is_some_and(|i| i.to_string().contains("Invalid digest"))
                    {
                        let _ = fs::remove_file(&path);
                        return Err(failed(ImageError::DigestMismatch {
                            what: format!("layer {} from {}", desc.digest, conn.ctx.registry),
                            expected: desc.digest.clone(),
                            actual: "(another digest)".into(),
                            remedy: "the registry served corrupt data; retry the pull".into(),
                        }));
                    }
                    let _ = file.sync_data();
                    return Err(failed(ImageError::Interrupted {
                        registry: conn.ctx.registry.clone(),
                        what: format!("layer {} after {done} bytes", desc.digest),
                        reason: one_line(e.to_string().as_bytes()),
                        resume: " to resume it".into(),
                    }));
                }
            };
            done += chunk.len() as u64;
            if declared.is_some_and(|s| done > s) {
                let _ = fs::remove_file(&path);
                return Err(failed(ImageError::Registry {
                    registry: conn.ctx.registry.clone(),
                    message: format!(
                        "layer {} is larger than the {} bytes its manifest declares",
                        desc.digest,
                        declared.unwrap_or(0)
                    ),
                }));
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .map_err(|e| failed(ImageError::io(format!("writing layer {}", desc.digest), e)))?;
            progress.event(PullEvent::LayerProgress {
                digest: &desc.digest,
                done,
            });
        }
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if actual != desc.digest {
            let _ = fs::remove_file(&path);
            return Err(failed(ImageError::DigestMismatch {
                what: format!("layer {} from {}", desc.digest, conn.ctx.registry),
                expected: desc.digest.clone(),
                actual,
                remedy: "the registry served corrupt data; retry the pull".into(),
            }));
        }
        file.sync_all()
            .map_err(|e| failed(ImageError::io(format!("writing layer {}", desc.digest), e)))?;
        fs::rename(&path, dest)
            .map_err(|e| failed(ImageError::io(format!("storing layer {}", desc.digest), e)))?;
        Ok(())
    }
}

/// An in-memory sink that refuses to grow past `cap`, so a registry cannot make us buffer an
/// endless "config".
struct CappedVec {
    buf: Vec<u8>,
    cap: usize,
}

impl tokio::io::AsyncWrite for CappedVec {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        if self.buf.len() + data.len() > self.cap {
            return std::task::Poll::Ready(Err(io::Error::other(format!(
                "the blob is larger than {} bytes",
                self.cap
            ))));
        }
        self.buf.extend_from_slice(data);
        std::task::Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// A download failure, and whether the download had continued an earlier partial file.
struct Resumed(bool, ImageError);

/// Open (creating) `path` for read/write and take a non-blocking exclusive flock on it; `None`
/// when another process holds it.
fn open_locked(path: &Path) -> io::Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    'reopen: for _ in 0..8 {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        loop {
            // SAFETY: flock on a valid, owned descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                break;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EWOULDBLOCK) => return Ok(None),
                Some(libc::EINTR) => continue,
                _ => return Err(err),
            }
        }
        // Between our open and our lock, the previous holder may have finished and renamed the
        // file into blobs/: then we hold a lock on that blob, not on a partial download.
        let ours = file.metadata()?;
        match fs::metadata(path) {
            Ok(now) if now.ino() == ours.ino() && now.dev() == ours.dev() => return Ok(Some(file)),
            Ok(_) => continue 'reopen,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue 'reopen,
            Err(e) => return Err(e),
        }
    }
    // Persistent churn on this name: let the caller use a private file.
    Ok(None)
}
