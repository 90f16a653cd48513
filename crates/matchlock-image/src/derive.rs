//! Images made from other images (`matchlock build`): a parent's layers in order, new layers
//! on top, and a new config; and images written out as OCI or docker-archive tarballs.
//!
//! A new layer is kept uncompressed, so its blob digest is its diff id. Its root file system is
//! built the way an import's is (every layer applied, the same checks), so a layer made in a
//! sandbox is held to exactly the rules of a layer from a registry.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::archive::{parse_config_bytes, ImagePlan, LayerSource};
use crate::reference::{familiar, normalize_reference};
use crate::store::{ImageStore, TempDir};
use crate::util::unique_name;
use crate::{ImageError, ImageInfo};

/// One layer of a stored image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLayer {
    /// `sha256:…` of the blob as stored (compressed or not).
    pub digest: String,
    /// `sha256:…` of the uncompressed tar (the config's `rootfs.diff_ids` entry).
    pub diff_id: String,
    /// Its OCI media type, from how the blob is compressed.
    pub media_type: &'static str,
    /// The blob's size in bytes.
    pub size: u64,
}

/// Which tarball [`ImageStore::export`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// An OCI image layout (`oci-layout`, `index.json`, `blobs/`): `skopeo copy oci-archive:…`.
    Oci,
    /// `docker save`'s format (`manifest.json`): `docker load`, `skopeo copy docker-archive:…`.
    DockerArchive,
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

fn sha256_hex(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The media type of a layer blob, from its first bytes.
pub(crate) fn layer_media_type(path: &Path) -> Result<&'static str, ImageError> {
    let mut head = [0u8; 4];
    let n = fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
    Ok(match &head[..n] {
        [0x1f, 0x8b, ..] => "application/vnd.oci.image.layer.v1.tar+gzip",
        [0x28, 0xb5, 0x2f, 0xfd] => "application/vnd.oci.image.layer.v1.tar+zstd",
        _ => "application/vnd.oci.image.layer.v1.tar",
    })
}

/// What a path in an image's root file system is ([`ImageStore::rootfs_entry`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsEntry {
    /// A directory.
    Directory,
    /// A symbolic link, with its target as stored.
    Symlink(String),
    /// A file, device, FIFO or socket.
    Other,
}

impl ImageStore {
    /// The raw config blob of a stored image (the whole OCI config, not just its runtime part).
    pub fn config_blob(&self, info: &ImageInfo) -> Result<serde_json::Value, ImageError> {
        let path = self.blob_path(&info.digest)?;
        let bytes = fs::read(&path)
            .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Json {
            context: format!("parsing the config of {}", familiar(&info.name)),
            source: e,
        })
    }

    /// A file of an image's root file system (`None` when it has none), read with e2fsprogs'
    /// `debugfs` without mounting anything: what a build needs of its base (`/etc/passwd` for
    /// `--chown` names).
    pub fn read_rootfs_file(
        &self,
        info: &ImageInfo,
        path: &str,
    ) -> Result<Option<Vec<u8>>, ImageError> {
        let out = debugfs(info, "cat", path, None)?;
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("not found") {
            return Ok(None);
        }
        if !out.status.success() {
            return Err(ImageError::InvalidArchive(format!(
                "reading {path} of {}: {}",
                familiar(&info.name),
                err.trim()
            )));
        }
        Ok(Some(out.stdout))
    }

    /// `path` with the symbolic links among its directories resolved inside the image's root
    /// file system (never above its `/`), as a write into the image would follow them; with
    /// `last`, the final component too. `/bin/app` in an image whose `/bin` links to `usr/bin`
    /// is `/usr/bin/app`.
    pub fn resolve_in_rootfs(
        &self,
        info: &ImageInfo,
        path: &str,
        last: bool,
    ) -> Result<String, ImageError> {
        let mut todo: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        todo.reverse();
        let mut done: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(seg) = todo.pop() {
            if seg == "." {
                continue;
            }
            if seg == ".." {
                done.pop();
                continue;
            }
            let here = format!(
                "/{}",
                done.iter()
                    .chain([&seg])
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("/")
            );
            let is_last = todo.is_empty();
            if is_last && !last {
                done.push(seg);
                break;
            }
            if here.contains(['"', '\n']) {
                done.push(seg);
                continue;
            }
            let out = debugfs(info, "stat", &here, None)?;
            if !String::from_utf8_lossy(&out.stdout).contains("Type: symlink") {
                done.push(seg);
                continue;
            }
            links += 1;
            if links > 40 {
                return Err(ImageError::InvalidArchive(format!(
                    "{path}: too many symbolic links"
                )));
            }
            let target = link_target(info, &here, &String::from_utf8_lossy(&out.stdout))?;
            if target.starts_with('/') {
                done.clear();
            }
            for t in target.split('/').filter(|s| !s.is_empty()).rev() {
                todo.push(t.to_string());
            }
        }
        Ok(format!("/{}", done.join("/")))
    }

    /// Whether an image's root file system has `path` (read with `debugfs`, no mount).
    pub fn rootfs_has(&self, info: &ImageInfo, path: &str) -> Result<bool, ImageError> {
        Ok(self.rootfs_entry(info, path)?.is_some())
    }

    /// What `path` is in an image's root file system, a last link not followed; `None` when
    /// it has no such path. One `debugfs` request (two for a long link's target).
    pub fn rootfs_entry(
        &self,
        info: &ImageInfo,
        path: &str,
    ) -> Result<Option<RootfsEntry>, ImageError> {
        let out = debugfs(info, "stat", path, None)?;
        if !out.status.success() || String::from_utf8_lossy(&out.stderr).contains("not found") {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(Some(if text.contains("Type: directory") {
            RootfsEntry::Directory
        } else if text.contains("Type: symlink") {
            RootfsEntry::Symlink(link_target(info, path, &text)?)
        } else {
            RootfsEntry::Other
        }))
    }

    /// Copies `path` (a file, link or directory tree) out of an image's root file system to the
    /// same path under `into`, with `debugfs` (no mount); false when the image has no such
    /// path. What `COPY --from` reads.
    pub fn extract_path(
        &self,
        info: &ImageInfo,
        path: &str,
        into: &Path,
    ) -> Result<bool, ImageError> {
        let Some(entry) = self.rootfs_entry(info, path)? else {
            return Ok(false);
        };
        let rel = path.trim_start_matches('/').trim_end_matches('/');
        let parent = into.join(Path::new(rel).parent().unwrap_or(Path::new("")));
        fs::create_dir_all(&parent)
            .map_err(|e| ImageError::io(format!("creating {}", parent.display()), e))?;
        let out = match entry {
            RootfsEntry::Directory if rel.is_empty() => debugfs(info, "rdump", "/", Some(into))?,
            RootfsEntry::Directory => debugfs(info, "rdump", path, Some(&parent))?,
            RootfsEntry::Symlink(target) => {
                // `dump` would follow nothing; a link is recreated from its target.
                let at = into.join(rel);
                let _ = fs::remove_file(&at);
                std::os::unix::fs::symlink(&target, &at)
                    .map_err(|e| ImageError::io(format!("creating {}", at.display()), e))?;
                return Ok(true);
            }
            RootfsEntry::Other => debugfs(info, "dump -p", path, Some(&into.join(rel)))?,
        };
        if !out.status.success() {
            return Err(ImageError::InvalidArchive(format!(
                "copying {path} out of {}: {}",
                familiar(&info.name),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(true)
    }

    /// The layers of a stored image, bottom first: each of its config's diff ids with the blob
    /// that holds it (the blob itself when stored uncompressed, else found through the image's
    /// stored manifest).
    pub fn layers(&self, info: &ImageInfo) -> Result<Vec<StoredLayer>, ImageError> {
        let config = fs::read(self.blob_path(&info.digest)?)
            .map_err(|e| ImageError::io(format!("reading the config of {}", info.name), e))?;
        let (_, _, diff_ids) = parse_config_bytes(&config, &info.digest)?;
        let blobs = self.record_blobs(&info.name)?;
        // A manifest among the image's blobs whose config is this one names the blobs in order.
        let manifest_layers: Option<Vec<String>> = blobs.iter().find_map(|d| {
            let bytes = fs::read(self.blob_path(d).ok()?).ok()?;
            let m: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            (m["config"]["digest"].as_str() == Some(info.digest.as_str())).then_some(())?;
            let layers: Vec<String> = m["layers"]
                .as_array()?
                .iter()
                .filter_map(|l| l["digest"].as_str().map(str::to_string))
                .collect();
            (layers.len() == diff_ids.len()).then_some(layers)
        });
        let mut out = Vec::new();
        for (i, diff_id) in diff_ids.iter().enumerate() {
            let digest = if blobs.contains(diff_id) {
                diff_id.clone()
            } else if let Some(d) = manifest_layers.as_ref().map(|m| m[i].clone()) {
                d
            } else {
                return Err(ImageError::InvalidArchive(format!(
                    "layer {} of \"{}\" is not in the store; pull or import the image again",
                    i + 1,
                    familiar(&info.name)
                )));
            };
            let path = self.blob_path(&digest)?;
            let size = fs::metadata(&path)
                .map_err(|e| {
                    ImageError::io(
                        format!("layer {} of {} ({})", i + 1, info.name, path.display()),
                        e,
                    )
                })?
                .len();
            out.push(StoredLayer {
                media_type: layer_media_type(&path)?,
                digest,
                diff_id: diff_id.clone(),
                size,
            });
        }
        Ok(out)
    }

    /// Stores a new image `name`: `parent`'s layers (none: `FROM scratch`), then `new_layers`
    /// (uncompressed tars, copied in), with `config` as its config (its `rootfs` is replaced
    /// with the layers' diff ids). Builds its root file system unless one with the same config
    /// exists, and tags it as an import does (an existing tag is replaced).
    pub fn derive(
        &self,
        name: &str,
        parent: Option<&ImageInfo>,
        new_layers: &[PathBuf],
        mut config: serde_json::Value,
    ) -> Result<ImageInfo, ImageError> {
        let normalized = normalize_reference(name)?;
        // As a pull: `gc` leaves blobs alone while this holds it (the parent's are not tagged
        // by the new image until it commits).
        let _pulls = crate::util::FileLock::shared(&self.root().join("pulls.lock"))?;
        self.sweep_tmp();
        let work = TempDir::create(self.tmp().join(unique_name("derive")))?;
        let mut layers: Vec<LayerSource> = Vec::new();
        let mut blobs: Vec<(String, PathBuf)> = Vec::new();
        let mut descriptors = Vec::new();
        if let Some(p) = parent {
            for l in self.layers(p)? {
                let file = self.blob_path(&l.digest)?;
                layers.push(LayerSource {
                    file: file.clone(),
                    diff_id: l.diff_id.clone(),
                });
                blobs.push((l.digest.clone(), file));
                descriptors.push(serde_json::json!({
                    "mediaType": l.media_type, "digest": l.digest, "size": l.size,
                }));
            }
        }
        for (i, src) in new_layers.iter().enumerate() {
            let dest = work.0.join(format!("layer-{i}"));
            let (digest, size) = copy_hashed(src, &dest)?;
            layers.push(LayerSource {
                file: dest.clone(),
                diff_id: digest.clone(),
            });
            blobs.push((digest.clone(), dest));
            descriptors.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size,
            }));
        }
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
        config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": diff_ids});
        let config_bytes = serde_json::to_vec(&config).map_err(|e| ImageError::Json {
            context: "encoding the image config".into(),
            source: e,
        })?;
        let config_digest = sha256_hex(&config_bytes);
        let (created, runtime, _) = parse_config_bytes(&config_bytes, &config_digest)?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_bytes.len()},
            "layers": descriptors,
        }))
        .map_err(|e| ImageError::Json {
            context: "encoding the image manifest".into(),
            source: e,
        })?;
        for (what, bytes) in [("config", &config_bytes), ("manifest", &manifest)] {
            let path = work.0.join(what);
            fs::write(&path, bytes)
                .map_err(|e| ImageError::io(format!("writing the {what}"), e))?;
            blobs.push((sha256_hex(bytes), path));
        }
        let plan = ImagePlan {
            config_digest: config_digest.clone(),
            created,
            config: runtime,
            layers,
            blobs,
            format: "build",
        };
        self.install(&normalized, &plan, &work.0)
    }

    /// Writes image `name` to `out` as an OCI layout or a docker-archive tarball, with its
    /// layers as stored (compressed or not) and its tag recorded in the archive.
    pub fn export(
        &self,
        name: &str,
        format: ExportFormat,
        out: impl Write,
    ) -> Result<(), ImageError> {
        let info = self.resolve(name)?;
        let layers = self.layers(&info)?;
        let config_path = self.blob_path(&info.digest)?;
        let config_size = fs::metadata(&config_path)
            .map_err(|e| ImageError::io(format!("reading the config of {name}"), e))?
            .len();
        let mut b = tar::Builder::new(out);
        let werr = |e: std::io::Error| ImageError::io("writing the image archive", e);
        let blob_name = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
        let add_bytes = |b: &mut tar::Builder<_>, path: &str, bytes: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(bytes.len() as u64);
            b.append_data(&mut h, path, bytes).map_err(werr)
        };
        match format {
            ExportFormat::Oci => {
                let manifest = serde_json::to_vec(&serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": info.digest, "size": config_size},
                    "layers": layers.iter().map(|l| serde_json::json!({
                        "mediaType": l.media_type, "digest": l.digest, "size": l.size,
                    })).collect::<Vec<_>>(),
                }))
                .map_err(|e| ImageError::Json {
                    context: "encoding the manifest".into(),
                    source: e,
                })?;
                let manifest_digest = sha256_hex(&manifest);
                let tag = info
                    .name
                    .rsplit_once(':')
                    .map(|(_, t)| t)
                    .unwrap_or("latest");
                let index = serde_json::to_vec(&serde_json::json!({
                    "schemaVersion": 2,
                    "manifests": [{
                        "mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": manifest.len(),
                        "annotations": {
                            "org.opencontainers.image.ref.name": tag,
                            "io.containerd.image.name": info.name,
                        },
                    }],
                }))
                .map_err(|e| ImageError::Json {
                    context: "encoding the index".into(),
                    source: e,
                })?;
                add_bytes(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
                add_bytes(&mut b, "index.json", &index)?;
                add_bytes(&mut b, &blob_name(&manifest_digest), &manifest)?;
            }
            ExportFormat::DockerArchive => {}
        }
        // docker-archive's manifest, in the OCI layout too (as BuildKit's OCI exporter does):
        // its paths are the layout's blobs, so `docker load` takes either file.
        let docker_manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": blob_name(&info.digest),
            "RepoTags": [familiar(&info.name)],
            "Layers": layers.iter().map(|l| blob_name(&l.digest)).collect::<Vec<_>>(),
        }]))
        .map_err(|e| ImageError::Json {
            context: "encoding manifest.json".into(),
            source: e,
        })?;
        add_bytes(&mut b, "manifest.json", &docker_manifest)?;
        let mut written = std::collections::HashSet::new();
        for digest in std::iter::once(&info.digest).chain(layers.iter().map(|l| &l.digest)) {
            if !written.insert(digest.clone()) {
                continue; // a layer used twice is stored once
            }
            let path = self.blob_path(digest)?;
            let mut f = fs::File::open(&path)
                .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
            let size = f
                .metadata()
                .map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?
                .len();
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(0o644);
            h.set_size(size);
            b.append_data(&mut h, blob_name(digest), &mut f)
                .map_err(werr)?;
        }
        b.into_inner().map_err(werr)?.flush().map_err(werr)
    }
}

/// Copies `src` to `dest`, returning its sha256 digest and size.
fn copy_hashed(src: &Path, dest: &Path) -> Result<(String, u64), ImageError> {
    let mut from =
        fs::File::open(src).map_err(|e| ImageError::io(format!("opening {}", src.display()), e))?;
    let mut to = fs::File::create(dest)
        .map_err(|e| ImageError::io(format!("creating {}", dest.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = from
            .read(&mut buf)
            .map_err(|e| ImageError::io(format!("reading {}", src.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])
            .map_err(|e| ImageError::io(format!("writing {}", dest.display()), e))?;
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), size))
}

/// A symbolic link's target from `debugfs stat`'s output (`Fast link dest: "…"` for a short
/// one), else its data block (`cat`, for a long one). debugfs 1.47 has no `readlink`.
fn link_target(info: &ImageInfo, path: &str, stat: &str) -> Result<String, ImageError> {
    if let Some(rest) = stat.split("Fast link dest: \"").nth(1) {
        if let Some(end) = rest.rfind('"') {
            return Ok(rest[..end].to_string());
        }
    }
    let out = debugfs(info, "cat", path, None)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim_end_matches('\0')
        .to_string())
}

/// Runs one read-only `debugfs` request (`cat`, `stat`, `dump -p`, `rdump`) on `path` of an
/// image's root file system, without mounting it; `dest` is where a dump goes. A path that
/// debugfs' quoting cannot carry (a `"` or a newline) or that is not absolute is refused.
fn debugfs(
    info: &ImageInfo,
    request: &str,
    path: &str,
    dest: Option<&Path>,
) -> Result<std::process::Output, ImageError> {
    if !path.starts_with('/') || path.contains(['"', '\n']) {
        return Err(ImageError::InvalidArchive(format!(
            "{path:?} is not a plain absolute path"
        )));
    }
    let mut cmd = format!("{request} \"{path}\"");
    if let Some(d) = dest {
        cmd.push_str(&format!(" \"{}\"", d.display()));
    }
    std::process::Command::new("debugfs")
        .arg("-R")
        .arg(cmd)
        .arg(&info.rootfs)
        .output()
        .map_err(|e| ImageError::io("running debugfs (apt-get install e2fsprogs)", e))
}
