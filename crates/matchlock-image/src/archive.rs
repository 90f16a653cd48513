//! Reading an image tarball (`docker save` or OCI image layout) into a verified import plan.
//!
//! The outer tarball is streamed once (stdin is not seekable, and index files may come after the
//! blobs they name): every regular file is spooled to the import's private temp directory while
//! being hashed. Files named `blobs/sha256/<hex>` are verified against their name right away.
//! Afterwards the format is detected and the manifests are followed to one image.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::reference::normalize_reference;
use crate::util::{decompress, digest_hex, read_capped, HashingReader};
use crate::{ImageConfig, ImageError};

/// Cap on JSON documents (manifests, configs, index): real ones are a few KiB.
pub(crate) const JSON_CAP: u64 = 16 << 20;
/// Cap on entries in the outer tarball, to bound memory for the path map.
const MAX_OUTER_ENTRIES: usize = 1_000_000;
/// Cap on layers per image (Docker's own limit is 127).
const MAX_LAYERS: usize = 500;
/// Cap on nested indexes.
const MAX_INDEX_DEPTH: usize = 4;

/// One spooled file of the outer tarball.
#[derive(Debug, Clone)]
pub(crate) struct SpooledFile {
    pub path: PathBuf,
    pub digest: String,
    pub size: u64,
}

/// The outer tarball, spooled to disk.
pub(crate) struct Spool {
    files: HashMap<String, SpooledFile>,
    links: HashMap<String, String>,
}

/// A layer to apply, in order.
#[derive(Debug, Clone)]
pub(crate) struct LayerSource {
    pub file: PathBuf,
    /// Expected sha256 of the uncompressed tar (`rootfs.diff_ids[i]` of the config).
    pub diff_id: String,
}

/// Everything needed to build and record one image.
#[derive(Debug)]
pub(crate) struct ImagePlan {
    pub config_digest: String,
    pub created: Option<String>,
    pub config: ImageConfig,
    pub layers: Vec<LayerSource>,
    /// Blobs to move into the content-addressed store when the import commits.
    pub blobs: Vec<(String, PathBuf)>,
    /// Which format the archive had, for the tag record.
    pub format: &'static str,
}

/// Lexically normalise a path inside the archive: strip `/` and `.`, resolve `..` without
/// leaving the archive root.
fn archive_path(raw: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in raw.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

/// Stream the outer tarball (optionally gzip/zstd compressed) into `dir`.
pub(crate) fn spool(reader: impl Read, dir: &Path) -> Result<Spool, ImageError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| ImageError::io(format!("creating {}", dir.display()), e))?;
    let input = decompress(reader).map_err(|e| ImageError::io("reading the image tarball", e))?;
    let mut archive = tar::Archive::new(input);
    let mut spool = Spool {
        files: HashMap::new(),
        links: HashMap::new(),
    };
    let entries = archive
        .entries()
        .map_err(|e| ImageError::archive(format!("not a tar archive: {e}")))?;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_OUTER_ENTRIES {
            return Err(ImageError::archive(format!(
                "more than {MAX_OUTER_ENTRIES} entries"
            )));
        }
        let mut entry =
            entry.map_err(|e| ImageError::archive(format!("reading the tarball: {e}")))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(path) = archive_path(&raw) else {
            return Err(ImageError::archive(format!(
                "entry {raw:?} points outside the archive"
            )));
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let out_path = dir.join(format!("f{n}"));
                let mut out = File::create(&out_path).map_err(|e| {
                    ImageError::io(format!("spooling {raw} to {}", out_path.display()), e)
                })?;
                let mut hashing = HashingReader::new(&mut entry);
                io::copy(&mut hashing, &mut out)
                    .and_then(|_| out.flush())
                    .map_err(|e| ImageError::io(format!("spooling archive entry {raw}"), e))?;
                let (digest, size) = hashing
                    .finish()
                    .map_err(|e| ImageError::io(format!("reading archive entry {raw}"), e))?;
                // OCI blobs are named by their digest: check now, before anything trusts them.
                if let Some(hex) = path.strip_prefix("blobs/sha256/") {
                    let expected = format!("sha256:{hex}");
                    if expected != digest {
                        return Err(ImageError::DigestMismatch {
                            what: format!("blob {expected}"),
                            expected,
                            actual: digest,
                            remedy: "re-export the image".into(),
                        });
                    }
                }
                spool.files.insert(
                    path,
                    SpooledFile {
                        path: out_path,
                        digest,
                        size,
                    },
                );
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                // Symlinks are relative to the link's directory; hard links to the archive root.
                let joined = if entry.header().entry_type() == tar::EntryType::Symlink
                    && !target.starts_with('/')
                {
                    let parent = path.rsplit_once('/').map_or("", |(p, _)| p);
                    format!("{parent}/{target}")
                } else {
                    target.clone()
                };
                let Some(resolved) = archive_path(&joined) else {
                    return Err(ImageError::archive(format!(
                        "link \"{raw}\" -> \"{target}\" points outside the archive"
                    )));
                };
                spool.links.insert(path, resolved);
            }
            _ => {}
        }
    }
    Ok(spool)
}

impl Spool {
    /// Find a spooled file by archive path, following archive-internal links.
    fn get(&self, path: &str) -> Option<&SpooledFile> {
        let mut p = archive_path(path)?;
        for _ in 0..32 {
            if let Some(f) = self.files.get(&p) {
                return Some(f);
            }
            p = self.links.get(&p)?.clone();
        }
        None
    }

    fn blob(&self, digest: &str) -> Result<&SpooledFile, ImageError> {
        let hex = digest_hex(digest)?;
        let file = self.get(&format!("blobs/sha256/{hex}")).ok_or_else(|| {
            ImageError::archive(format!("blob {digest} is missing from the archive"))
        })?;
        // Regular blob files were checked while spooling, but a link named like a blob may point
        // at any file of the archive.
        if file.digest != digest {
            return Err(ImageError::DigestMismatch {
                what: format!("blob {digest}"),
                expected: digest.to_string(),
                actual: file.digest.clone(),
                remedy: "re-export the image".into(),
            });
        }
        Ok(file)
    }

    fn json<T: for<'de> Deserialize<'de>>(
        &self,
        file: &SpooledFile,
        what: &str,
    ) -> Result<T, ImageError> {
        let bytes = read_capped(&file.path, JSON_CAP, what)?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Json {
            context: format!("parsing {what}"),
            source: e,
        })
    }
}

#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub media_type: Option<String>,
    pub digest: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    annotations: Option<HashMap<String, String>>,
}

#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

#[derive(Deserialize)]
pub(crate) struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
pub(crate) struct Manifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct DockerManifestEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StringOrVec {
    One(String),
    Many(Vec<String>),
}

impl StringOrVec {
    fn into_vec(self) -> Vec<String> {
        match self {
            StringOrVec::One(s) => vec![s],
            StringOrVec::Many(v) => v,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<StringOrVec>,
    #[serde(default)]
    cmd: Option<StringOrVec>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
    rootfs: Option<RootFs>,
}

/// The platform an image must have to boot in our VMs: the host's, since the VM uses KVM.
pub(crate) fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub(crate) const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
pub(crate) const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

struct Candidate {
    desc: Descriptor,
    /// Reference annotations of the descriptor or of the index entry that led to it.
    names: Vec<String>,
}

/// Build the plan for the image tagged `name` (already normalised) from a spooled archive.
pub(crate) fn plan(spool: &Spool, name: &str) -> Result<ImagePlan, ImageError> {
    if spool.get("oci-layout").is_some() && spool.get("index.json").is_some() {
        plan_oci(spool, name)
    } else if let Some(manifest) = spool.get("manifest.json") {
        plan_docker(spool, manifest, name)
    } else {
        Err(ImageError::archive(
            "neither an OCI image layout (oci-layout + index.json) nor a docker save archive (manifest.json); \
             create one with 'docker save IMAGE > image.tar'",
        ))
    }
}

fn check_size(desc: &Descriptor, file: &SpooledFile) -> Result<(), ImageError> {
    match desc.size {
        Some(size) if size != file.size => Err(ImageError::archive(format!(
            "blob {} is {} bytes but its descriptor says {size}",
            desc.digest, file.size
        ))),
        _ => Ok(()),
    }
}

fn collect_manifests(
    spool: &Spool,
    descs: &[Descriptor],
    inherited: &[String],
    depth: usize,
    out: &mut Vec<Candidate>,
) -> Result<(), ImageError> {
    if depth > MAX_INDEX_DEPTH {
        return Err(ImageError::archive("image indexes are nested too deeply"));
    }
    for desc in descs {
        let mut names = inherited.to_vec();
        if let Some(ann) = &desc.annotations {
            for key in [
                "io.containerd.image.name",
                "org.opencontainers.image.ref.name",
            ] {
                if let Some(v) = ann.get(key) {
                    names.push(v.clone());
                }
            }
            // BuildKit attestations are manifests too, but hold no root file system.
            if ann.get("vnd.docker.reference.type").map(String::as_str)
                == Some("attestation-manifest")
            {
                continue;
            }
        }
        let media = desc.media_type.clone().unwrap_or_default();
        let is_index = if INDEX_TYPES.contains(&media.as_str()) {
            true
        } else if MANIFEST_TYPES.contains(&media.as_str()) {
            false
        } else if media.is_empty() {
            // No media type: look inside.
            let file = spool.blob(&desc.digest)?;
            let v: serde_json::Value = spool.json(file, &format!("manifest {}", desc.digest))?;
            v.get("manifests").is_some()
        } else {
            continue;
        };
        if is_index {
            let file = spool.blob(&desc.digest)?;
            check_size(desc, file)?;
            let index: Index = spool.json(file, &format!("image index {}", desc.digest))?;
            collect_manifests(spool, &index.manifests, &names, depth + 1, out)?;
        } else {
            out.push(Candidate {
                desc: desc.clone(),
                names,
            });
        }
    }
    Ok(())
}

/// Whether an annotation (a full reference, or just a tag) names the image being imported.
fn names_match(annotation: &str, wanted: &str) -> bool {
    if let Ok(n) = normalize_reference(annotation) {
        if n == wanted {
            return true;
        }
    }
    wanted
        .rsplit_once(':')
        .is_some_and(|(_, tag)| tag == annotation)
}

fn plan_oci(spool: &Spool, name: &str) -> Result<ImagePlan, ImageError> {
    let index_file = spool
        .get("index.json")
        .ok_or_else(|| ImageError::archive("index.json is missing"))?;
    let index: Index = spool.json(index_file, "index.json")?;
    let mut candidates = Vec::new();
    collect_manifests(spool, &index.manifests, &[], 0, &mut candidates)?;

    let arch = host_arch();
    if candidates.iter().any(|c| c.desc.platform.is_some()) {
        let platforms: Vec<String> = candidates
            .iter()
            .filter_map(|c| c.desc.platform.as_ref())
            .map(|p| format!("{}/{}", p.os, p.architecture))
            .collect();
        candidates.retain(|c| match &c.desc.platform {
            None => true,
            Some(p) => p.os == "linux" && p.architecture == arch,
        });
        if candidates.is_empty() {
            return Err(ImageError::archive(format!(
                "no linux/{arch} image in the archive (it has {}); export the linux/{arch} variant",
                platforms.join(", ")
            )));
        }
    }
    candidates.dedup_by(|a, b| a.desc.digest == b.desc.digest);
    if candidates.len() > 1 {
        let matching: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].names.iter().any(|n| names_match(n, name)))
            .collect();
        if matching.len() == 1 {
            let keep = matching[0];
            candidates = candidates.into_iter().skip(keep).take(1).collect();
        } else {
            let names: Vec<String> = candidates
                .iter()
                .map(|c| {
                    c.names
                        .last()
                        .cloned()
                        .unwrap_or_else(|| c.desc.digest.clone())
                })
                .collect();
            return Err(ImageError::archive(format!(
                "the archive holds {} images ({}) and none is uniquely named {name}; export one image per tarball",
                candidates.len(),
                names.join(", ")
            )));
        }
    }
    let Some(chosen) = candidates.into_iter().next() else {
        return Err(ImageError::archive("index.json lists no image manifest"));
    };

    let manifest_file = spool.blob(&chosen.desc.digest)?;
    check_size(&chosen.desc, manifest_file)?;
    let manifest: Manifest =
        spool.json(manifest_file, &format!("manifest {}", chosen.desc.digest))?;
    let config_file = spool.blob(&manifest.config.digest)?;
    check_size(&manifest.config, config_file)?;
    let mut blobs = vec![
        (chosen.desc.digest.clone(), manifest_file.path.clone()),
        (manifest.config.digest.clone(), config_file.path.clone()),
    ];
    let (created, config, diff_ids) = parse_config(config_file, &manifest.config.digest)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(ImageError::archive(format!(
            "the manifest lists {} layers but the config has {} diff_ids",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    let mut layers = Vec::new();
    for (desc, diff_id) in manifest.layers.iter().zip(diff_ids) {
        let file = spool.blob(&desc.digest)?;
        check_size(desc, file)?;
        blobs.push((desc.digest.clone(), file.path.clone()));
        layers.push(LayerSource {
            file: file.path.clone(),
            diff_id,
        });
    }
    Ok(ImagePlan {
        config_digest: manifest.config.digest.clone(),
        created,
        config,
        layers,
        blobs,
        format: "oci",
    })
}

fn plan_docker(spool: &Spool, manifest: &SpooledFile, name: &str) -> Result<ImagePlan, ImageError> {
    let entries: Vec<DockerManifestEntry> = spool.json(manifest, "manifest.json")?;
    let entry = match entries.len() {
        0 => return Err(ImageError::archive("manifest.json lists no image")),
        1 => &entries[0],
        n => {
            let matching: Vec<&DockerManifestEntry> = entries
                .iter()
                .filter(|e| e.repo_tags.iter().flatten().any(|t| names_match(t, name)))
                .collect();
            match matching.as_slice() {
                [one] => *one,
                _ => {
                    return Err(ImageError::archive(format!(
                        "the archive holds {n} images and none is uniquely tagged {name}; save one image per tarball"
                    )))
                }
            }
        }
    };
    let config_file = spool.get(&entry.config).ok_or_else(|| {
        ImageError::archive(format!(
            "config file {} is missing from the archive",
            entry.config
        ))
    })?;
    // Newer docker save names files blobs/sha256/<hex> (verified while spooling); older ones name
    // the config <hex>.json, which is the image ID: the sha256 of the config.
    let config_digest = config_file.digest.clone();
    let (created, config, diff_ids) = parse_config(config_file, &config_digest)?;
    if diff_ids.len() != entry.layers.len() {
        return Err(ImageError::archive(format!(
            "manifest.json lists {} layers but the config has {} diff_ids",
            entry.layers.len(),
            diff_ids.len()
        )));
    }
    let mut blobs = vec![(config_digest.clone(), config_file.path.clone())];
    let mut layers = Vec::new();
    for (layer, diff_id) in entry.layers.iter().zip(diff_ids) {
        let file = spool.get(layer).ok_or_else(|| {
            ImageError::archive(format!("layer file {layer} is missing from the archive"))
        })?;
        blobs.push((file.digest.clone(), file.path.clone()));
        layers.push(LayerSource {
            file: file.path.clone(),
            diff_id,
        });
    }
    // docker save stores no manifest; one is kept so the layers' order is known later (export,
    // builds on this image) even when they are compressed and their digests are not diff ids.
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_file.size,
        },
        "layers": layers.iter().zip(&blobs[1..]).map(|(l, (digest, _))| Ok(serde_json::json!({
            "mediaType": crate::derive::layer_media_type(&l.file)?,
            "digest": digest,
            "size": std::fs::metadata(&l.file).map(|m| m.len()).unwrap_or(0),
        }))).collect::<Result<Vec<_>, ImageError>>()?,
    }))
    .map_err(|e| ImageError::Json {
        context: "encoding a manifest for the archive".into(),
        source: e,
    })?;
    let manifest_path = config_file.path.with_extension("matchlock-manifest");
    std::fs::write(&manifest_path, &manifest)
        .map_err(|e| ImageError::io("writing the archive's manifest", e))?;
    blobs.push((
        format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&manifest))
        ),
        manifest_path,
    ));
    Ok(ImagePlan {
        config_digest,
        created,
        config,
        layers,
        blobs,
        format: "docker-save",
    })
}

fn parse_config(file: &SpooledFile, digest: &str) -> Result<ParsedConfig, ImageError> {
    let bytes = read_capped(&file.path, JSON_CAP, &format!("image config {digest}"))?;
    parse_config_bytes(&bytes, digest)
}

/// What an image config blob says: `created`, the runtime defaults and the layer diff_ids.
pub(crate) type ParsedConfig = (Option<String>, ImageConfig, Vec<String>);

/// Parse an image config blob (shared by imports and registry pulls).
pub(crate) fn parse_config_bytes(bytes: &[u8], digest: &str) -> Result<ParsedConfig, ImageError> {
    let blob: ConfigBlob = serde_json::from_slice(bytes).map_err(|e| ImageError::Json {
        context: format!("parsing image config {digest}"),
        source: e,
    })?;
    let diff_ids = blob.rootfs.map(|r| r.diff_ids).ok_or_else(|| {
        ImageError::archive(format!("image config {digest} has no rootfs.diff_ids"))
    })?;
    if diff_ids.len() > MAX_LAYERS {
        return Err(ImageError::archive(format!(
            "image has {} layers; at most {MAX_LAYERS} are supported",
            diff_ids.len()
        )));
    }
    for d in &diff_ids {
        digest_hex(d)?;
    }
    let rc = blob.config.unwrap_or_default();
    let non_empty = |v: Option<StringOrVec>| v.map(StringOrVec::into_vec).filter(|v| !v.is_empty());
    let config = ImageConfig {
        env: rc.env.unwrap_or_default(),
        entrypoint: non_empty(rc.entrypoint),
        cmd: non_empty(rc.cmd),
        working_dir: rc.working_dir.filter(|s| !s.is_empty()),
        user: rc.user.filter(|s| !s.is_empty()),
    };
    Ok((blob.created, config, diff_ids))
}
