//! The on-disk store: content-addressed blobs, one rootfs per image config, tags.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::archive::{self, ImagePlan, LayerSource};
use crate::reference::{familiar, normalize_reference};
use crate::unpack::Staging;
use crate::util::{
    atomic_write, digest_hex, euid, pid_alive, unique_name, with_decompressed, FileLock,
};
use crate::{ext4, ImageError, ImageInfo};

/// What a tag file holds: the public [`ImageInfo`] plus the blobs the image references, so
/// `remove` can garbage-collect blobs no tag uses any more.
#[derive(serde::Serialize, serde::Deserialize)]
struct TagRecord {
    #[serde(flatten)]
    info: ImageInfo,
    /// Digests of the manifest (OCI), config and layer blobs of this image.
    #[serde(default)]
    blobs: Vec<String>,
    /// `oci`, `docker-save` or `registry`.
    #[serde(default)]
    source: Option<String>,
}

/// A content-addressed image store rooted at one directory. Cheap to construct; safe to use from
/// several processes at once.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    /// Tests set this to exercise the unprivileged (debugfs fix-up) path while running as root.
    pub(crate) force_unprivileged: bool,
}

/// Removes an import's or pull's private temp directory however it ends.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    /// Create the directory, private to this user.
    pub(crate) fn create(path: PathBuf) -> Result<TempDir, ImageError> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| ImageError::io(format!("creating {}", path.display()), e))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Makes the store its owner's alone: an image's files (its configuration, whatever secrets a
/// careless build baked in) are no business of other local users. The root becomes `0700` and
/// root file systems `0400`, including those a version before this one left readable.
fn keep_private(root: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, mode: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode))
            .map_err(|e| ImageError::io(format!("making {} private", p.display()), e))
    };
    if fs::metadata(root).map_or(true, |m| m.permissions().mode() & 0o077 != 0) {
        set(root, 0o700)?;
    }
    for e in fs::read_dir(root.join("rootfs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o077 != 0)
        {
            set(&e.path(), 0o400)?;
        }
    }
    Ok(())
}

fn mkdirs(path: &Path) -> Result<(), ImageError> {
    fs::create_dir_all(path).map_err(|e| ImageError::io(format!("creating {}", path.display()), e))
}

/// Tag file name: the normalised reference with every byte outside `[A-Za-z0-9._-]` percent-encoded,
/// so `/`, `:` and `@` cannot form paths. Names that would exceed the file-name limit keep a
/// readable prefix plus the sha256 of the whole reference (the record inside holds the name).
fn escape_tag(name: &str) -> String {
    const MAX: usize = 200;
    let mut out = percent_encode(name);
    if out.len() > MAX {
        use sha2::Digest;
        let hash = hex::encode(sha2::Sha256::digest(name.as_bytes()));
        let mut cut = MAX - hash.len() - 1;
        // Do not split a %XX escape.
        while out.as_bytes()[cut - 1] == b'%' || out.as_bytes()[cut - 2] == b'%' {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('~');
        out.push_str(&hash);
    }
    out
}

fn percent_encode(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 16);
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ImageStore {
    /// Open the default store: `$MATCHLOCK_CACHE_DIR/images`, else `~/.cache/matchlock/images`.
    pub fn open_default() -> Result<ImageStore, ImageError> {
        if let Some(dir) = std::env::var_os("MATCHLOCK_CACHE_DIR").filter(|d| !d.is_empty()) {
            return ImageStore::open(PathBuf::from(dir).join("images"));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .ok_or_else(|| {
                ImageError::NoStoreDir("HOME is not set; set MATCHLOCK_CACHE_DIR".into())
            })?;
        ImageStore::open(PathBuf::from(home).join(".cache/matchlock/images"))
    }

    /// Open (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<ImageStore, ImageError> {
        let root = root.into();
        for sub in ["blobs/sha256", "rootfs", "tags", "tmp"] {
            mkdirs(&root.join(sub))?;
        }
        // Absolute, so ImageInfo.rootfs works from any working directory.
        let root = fs::canonicalize(&root)
            .map_err(|e| ImageError::io(format!("resolving {}", root.display()), e))?;
        keep_private(&root)?;
        Ok(ImageStore {
            root,
            force_unprivileged: false,
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn tag_path(&self, normalized: &str) -> PathBuf {
        self.root
            .join("tags")
            .join(format!("{}.json", escape_tag(normalized)))
    }

    pub(crate) fn rootfs_path(&self, config_digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self
            .root
            .join("rootfs")
            .join(format!("{}.ext4", digest_hex(config_digest)?)))
    }

    /// Where the root file system of exactly these layers lives. It depends on the layers
    /// alone, so images that differ only in their config (a build's `CMD`, its final tags, an
    /// import of the same layers) share one file instead of each unpacking every layer again.
    /// (Pulls keep theirs by config digest.)
    pub(crate) fn layers_rootfs_path(&self, layers: &[crate::archive::LayerSource]) -> PathBuf {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for l in layers {
            h.update(l.diff_id.as_bytes());
            h.update(b"\n");
        }
        self.root
            .join("rootfs")
            .join(format!("layers-{}.ext4", hex::encode(h.finalize())))
    }

    pub(crate) fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    pub(crate) fn lock(&self) -> Result<FileLock, ImageError> {
        FileLock::exclusive(&self.root.join("lock"))
    }

    /// Import a `docker save` or OCI image-layout tarball (auto-detected, optionally gzip/zstd
    /// compressed) from `reader` and tag it `name`. Builds the rootfs unless an image with the
    /// same config is already stored. An existing tag is replaced atomically; its old rootfs is
    /// deleted when no other tag uses it.
    pub fn import(&self, name: &str, reader: impl Read) -> Result<ImageInfo, ImageError> {
        let normalized = normalize_reference(name)?;
        self.sweep_tmp();
        let work = TempDir::create(self.tmp().join(unique_name("import")))?;

        let spool = archive::spool(reader, &work.0.join("spool"))?;
        let plan = archive::plan(&spool, &normalized)?;
        self.install(&normalized, &plan, &work.0)
    }

    /// Builds `plan`'s root file system in `work` unless one of the same layers is stored, puts
    /// it in place and commits the tag (imports and derived images alike).
    pub(crate) fn install(
        &self,
        normalized: &str,
        plan: &ImagePlan,
        work: &Path,
    ) -> Result<ImageInfo, ImageError> {
        let rootfs = self.layers_rootfs_path(&plan.layers);
        let mut built: Option<PathBuf> = None;
        loop {
            if built.is_none() && !rootfs.exists() {
                let layers = plan.layers.iter().cloned().map(Ok);
                built = Some(self.build_rootfs(layers, work)?);
            }
            let _lock = self.lock()?;
            if !rootfs.exists() {
                match &built {
                    Some(img) => fs::rename(img, &rootfs).map_err(|e| {
                        ImageError::io(format!("installing {}", rootfs.display()), e)
                    })?,
                    // A concurrent remove deleted the rootfs we meant to share: build it ourselves.
                    None => continue,
                }
            }
            return self.commit(normalized, plan, &rootfs);
        }
    }

    /// Under the store lock: move blobs into place, write the tag, collect garbage of the old tag.
    pub(crate) fn commit(
        &self,
        normalized: &str,
        plan: &ImagePlan,
        rootfs: &Path,
    ) -> Result<ImageInfo, ImageError> {
        for (digest, file) in &plan.blobs {
            let dest = self.blob_path(digest)?;
            if !dest.exists() {
                // Spool files are on the store's file system, so this is an atomic rename. A blob
                // used twice by one image is moved once; the second source is then gone.
                if let Err(e) = fs::rename(file, &dest) {
                    if e.kind() != io::ErrorKind::NotFound {
                        return Err(ImageError::io(format!("storing blob {digest}"), e));
                    }
                }
            }
        }
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(rootfs, fs::Permissions::from_mode(0o400))
                .map_err(|e| ImageError::io(format!("making {} private", rootfs.display()), e))?;
        }
        let size = fs::metadata(rootfs)
            .map_err(|e| ImageError::io(format!("inspecting {}", rootfs.display()), e))?
            .len();
        let info = ImageInfo {
            name: normalized.to_string(),
            digest: plan.config_digest.clone(),
            rootfs: rootfs.to_path_buf(),
            size,
            created: plan.created.clone(),
            config: plan.config.clone(),
        };
        let mut blobs: Vec<String> = plan.blobs.iter().map(|(d, _)| d.clone()).collect();
        blobs.sort();
        blobs.dedup();
        let record = TagRecord {
            info: info.clone(),
            blobs,
            source: Some(plan.format.to_string()),
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| ImageError::Json {
            context: "encoding the tag record".into(),
            source: e,
        })?;
        let tag = self.tag_path(normalized);
        let old = self.read_record(&tag).ok();
        atomic_write(&self.tmp(), &tag, &json)?;
        if let Some(old) = old {
            self.collect_garbage(&old)?;
        }
        Ok(info)
    }

    /// Apply the layers, in order, into a staging tree and build the ext4; returns the finished
    /// image file inside `work`. `layers` may block until the next layer is available (pulls
    /// feed it from concurrent downloads) and ends early with an error when one fails. The
    /// staging tree is deleted before returning, on success or failure.
    pub(crate) fn build_rootfs(
        &self,
        layers: impl Iterator<Item = Result<LayerSource, ImageError>>,
        work: &Path,
    ) -> Result<PathBuf, ImageError> {
        let privileged = euid() == 0 && !self.force_unprivileged;
        let staging_dir = work.join("rootfs");
        let scratch = work.join("scratch");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&scratch)
            .map_err(|e| ImageError::io(format!("creating {}", scratch.display()), e))?;
        let _cleanup = TempDir(staging_dir.clone());
        let mut staging = Staging::new(staging_dir, privileged)?;
        for (i, layer) in layers.enumerate() {
            let layer = layer?;
            let n = i + 1;
            let file = fs::File::open(&layer.file)
                .map_err(|e| ImageError::io(format!("opening layer {n}"), e))?;
            let (applied, hashed) =
                with_decompressed(file, |reader| staging.apply_layer(n, reader));
            // A decompression error is the real cause of a tar error that follows from it.
            let (diff_id, _) =
                hashed.map_err(|e| ImageError::io(format!("decompressing layer {n}"), e))?;
            applied?;
            if diff_id != layer.diff_id {
                return Err(ImageError::DigestMismatch {
                    what: format!("layer {n}"),
                    expected: layer.diff_id.clone(),
                    actual: diff_id,
                    remedy: "the image is corrupt where it came from; re-export or re-push it"
                        .into(),
                });
            }
        }
        staging.finalize()?;
        let out = work.join("rootfs.ext4");
        ext4::build(&staging, &out, &scratch)?;
        // Shared by every sandbox of the image: nobody may write it, and only its owner read it.
        fs::set_permissions(&out, fs::Permissions::from_mode(0o400))
            .map_err(|e| ImageError::io(format!("making {} read-only", out.display()), e))?;
        Ok(out)
    }

    fn read_record(&self, path: &Path) -> Result<TagRecord, ImageError> {
        let bytes =
            fs::read(path).map_err(|e| ImageError::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::Json {
            context: format!(
                "parsing tag file {} (delete it and re-import the image)",
                path.display()
            ),
            source: e,
        })
    }

    fn records(&self) -> Result<Vec<TagRecord>, ImageError> {
        let dir = self.root.join("tags");
        let mut out = Vec::new();
        let listing = fs::read_dir(&dir)
            .map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
        for entry in listing {
            let entry =
                entry.map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(self.read_record(&path)?);
            }
        }
        Ok(out)
    }

    /// Delete the rootfs and blobs of `old` that no remaining tag references. Caller holds the lock.
    fn collect_garbage(&self, old: &TagRecord) -> Result<(), ImageError> {
        let remaining = self.records()?;
        if !remaining.iter().any(|r| r.info.rootfs == old.info.rootfs) {
            // Running sandboxes keep their open descriptor; unlinking is safe for them.
            let _ = fs::remove_file(&old.info.rootfs);
        }
        let used: HashSet<&String> = remaining.iter().flat_map(|r| r.blobs.iter()).collect();
        for digest in &old.blobs {
            if !used.contains(digest) {
                if let Ok(path) = self.blob_path(digest) {
                    let _ = fs::remove_file(path);
                }
            }
        }
        Ok(())
    }

    /// The blobs the tag `normalized` references (its layers, config and manifest).
    pub(crate) fn record_blobs(&self, normalized: &str) -> Result<Vec<String>, ImageError> {
        Ok(self.read_record(&self.tag_path(normalized))?.blobs)
    }

    /// Look up a tag (normalised first).
    pub fn resolve(&self, name: &str) -> Result<ImageInfo, ImageError> {
        let normalized = normalize_reference(name)?;
        let tag = self.tag_path(&normalized);
        if !tag.exists() {
            return Err(not_found(&normalized, name));
        }
        let record = self.read_record(&tag)?;
        if !record.info.rootfs.exists() {
            return Err(ImageError::InvalidArchive(format!(
                "the root file system of \"{}\" is missing from the store; re-import the image",
                familiar(&normalized)
            )));
        }
        Ok(record.info)
    }

    /// Stores the image `from` names under `to` as well (sharing its root file system and
    /// blobs), replacing what `to` named before. Returns the new entry.
    pub fn tag(&self, from: &str, to: &str) -> Result<ImageInfo, ImageError> {
        let from = normalize_reference(from)?;
        let to = normalize_reference(to)?;
        let _lock = self.lock()?;
        let src = self.tag_path(&from);
        if !src.exists() {
            return Err(not_found(&from, &from));
        }
        let mut record = self.read_record(&src)?;
        if to == from {
            return Ok(record.info);
        }
        record.info.name = to.clone();
        record.source = Some("tag".into());
        let json = serde_json::to_vec_pretty(&record).map_err(|e| ImageError::Json {
            context: "encoding the tag record".into(),
            source: e,
        })?;
        let dest = self.tag_path(&to);
        let old = self.read_record(&dest).ok();
        atomic_write(&self.tmp(), &dest, &json)?;
        if let Some(old) = old {
            self.collect_garbage(&old)?;
        }
        Ok(record.info)
    }

    /// Marks a tag as used now (its `stored_at`), for least-recently-used pruning.
    pub fn touch(&self, name: &str) -> Result<(), ImageError> {
        let normalized = normalize_reference(name)?;
        let tag = self.tag_path(&normalized);
        fs::File::options()
            .write(true)
            .open(&tag)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()))
            .map_err(|e| ImageError::io(format!("touching {}", tag.display()), e))
    }

    /// Every tagged image with where it came from and when it was stored, newest first.
    pub fn entries(&self) -> Result<Vec<StoredImage>, ImageError> {
        let dir = self.root.join("tags");
        let listing = fs::read_dir(&dir)
            .map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
        let mut out = Vec::new();
        for entry in listing.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record = self.read_record(&path)?;
            let stored_at = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            out.push(StoredImage {
                info: record.info,
                source: record.source.unwrap_or_else(|| "local".into()),
                stored_at,
            });
        }
        out.sort_by(|a, b| (b.stored_at, &a.info.name).cmp(&(a.stored_at, &b.info.name)));
        Ok(out)
    }

    /// All tagged images, sorted by name.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let mut out: Vec<ImageInfo> = self.records()?.into_iter().map(|r| r.info).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Remove a tag; its rootfs and blobs go too when no other tag uses them.
    pub fn remove(&self, name: &str) -> Result<(), ImageError> {
        let normalized = normalize_reference(name)?;
        let _lock = self.lock()?;
        let tag = self.tag_path(&normalized);
        if !tag.exists() {
            return Err(not_found(&normalized, name));
        }
        let record = self.read_record(&tag)?;
        fs::remove_file(&tag)
            .map_err(|e| ImageError::io(format!("removing {}", tag.display()), e))?;
        self.collect_garbage(&record)
    }

    /// Delete temp entries left by processes that died mid-import or mid-pull (their pid is in
    /// the name); returns how many were removed. Partial downloads (`blob-*.partial`) carry no
    /// pid: they are kept for the next pull to resume, and only `gc` removes them.
    pub(crate) fn sweep_tmp(&self) -> usize {
        let mut removed = 0;
        let Ok(listing) = fs::read_dir(self.tmp()) else {
            return removed;
        };
        for entry in listing.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some(pid) = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let ours = ["import-", "pull-", "write-", "derive-"]
                .iter()
                .any(|p| name.starts_with(p));
            if !ours || pid_alive(pid) {
                continue;
            }
            let path = entry.path();
            let res = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            removed += usize::from(res.is_ok());
        }
        removed
    }

    /// Remove what no tag references: root file systems, blobs, partial downloads, and temp
    /// entries of dead processes. Blobs and partial downloads are only collected when no pull is
    /// running (a pull's blobs are untagged until it finishes); the report says when they were
    /// skipped. Running sandboxes are unaffected: they hold their rootfs open.
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        let _lock = self.lock()?;
        let mut report = GcReport::default();
        let records = self.records()?;
        let used_rootfs: HashSet<&PathBuf> = records.iter().map(|r| &r.info.rootfs).collect();
        let used_blobs: HashSet<&str> = records
            .iter()
            .flat_map(|r| r.blobs.iter().map(String::as_str))
            .collect();
        let remove = |path: &Path, report: &mut GcReport| {
            let size = fs::symlink_metadata(path).map(|m| m.len()).unwrap_or(0);
            if fs::remove_file(path).is_ok() {
                report.bytes += size;
                true
            } else {
                false
            }
        };
        for entry in list_dir(&self.root.join("rootfs"))? {
            if !used_rootfs.contains(&entry) && remove(&entry, &mut report) {
                report.rootfs += 1;
            }
        }
        // A process that forks (any thread spawning a child) briefly shares every open lock file
        // until the child execs, so one failed attempt does not yet mean a pull is running.
        let mut no_pulls = None;
        for _ in 0..10 {
            no_pulls = FileLock::try_exclusive(&self.root.join("pulls.lock"))?;
            if no_pulls.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        match no_pulls {
            Some(_no_pulls) => {
                for entry in list_dir(&self.root.join("blobs/sha256"))? {
                    let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
                    let digest = format!("sha256:{}", name.unwrap_or_default());
                    if !used_blobs.contains(digest.as_str()) && remove(&entry, &mut report) {
                        report.blobs += 1;
                    }
                }
                for entry in list_dir(&self.tmp())? {
                    let partial = entry
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().ends_with(".partial"));
                    if partial && remove(&entry, &mut report) {
                        report.tmp += 1;
                    }
                }
            }
            None => report.pull_in_progress = true,
        }
        report.tmp += self.sweep_tmp();
        Ok(report)
    }
}

/// A tagged image as [`ImageStore::entries`] lists it.
#[derive(Debug, Clone)]
pub struct StoredImage {
    /// The image.
    pub info: ImageInfo,
    /// Where it came from: `registry`, `docker-save` or `oci` (imports), `tag` (`pull -t`).
    pub source: String,
    /// When the tag was written, seconds since the epoch.
    pub stored_at: u64,
}

/// What [`ImageStore::gc`] removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    /// Unreferenced blobs deleted.
    pub blobs: usize,
    /// Unreferenced root file systems deleted.
    pub rootfs: usize,
    /// Partial downloads and temp entries of dead processes deleted.
    pub tmp: usize,
    /// Bytes freed by the deleted files (temp directories not counted).
    pub bytes: u64,
    /// True when a pull was running, so blobs and partial downloads were left alone.
    pub pull_in_progress: bool,
}

/// The entries of a directory, as full paths.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let listing =
        fs::read_dir(dir).map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
    let mut out = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|e| ImageError::io(format!("listing {}", dir.display()), e))?;
        out.push(entry.path());
    }
    Ok(out)
}

/// The "not in the local store" error for `input`, which normalised to `normalized`.
fn not_found(normalized: &str, input: &str) -> ImageError {
    ImageError::NotFound {
        shown: familiar(normalized).to_string(),
        input: input.trim().to_string(),
    }
}
