//! Runs a build: each stage from its base image, each `RUN` in a fresh sandbox of the image so
//! far, whose changes ([`matchlock_sandbox::Client::export_upper`]) become the next layer and
//! the next image ([`matchlock_image::ImageStore::derive`]).
//!
//! Every step's image is stored under a name made from its cache key (the parent image, the
//! step as applied, and the args in scope), so an unchanged rebuild finds each step and runs
//! nothing; `--no-cache` ignores them. Those names live under [`CACHE_REPO`], which `image ls`
//! hides.

use crate::dockerfile::parse;
use crate::plan::CopyFrom;
use crate::plan::{plan, Base};
use crate::stage::{CopySource, ImageConfig, RunStep, StageState, Step};
use matchlock_api::config::VfsMount;
use matchlock_api::request::{NetworkRequest, Resources, SandboxRequest, Start};
use matchlock_image::{ImageInfo, ImageStore, PullOptions, PullPolicy, PullProgress, RootfsEntry};
use matchlock_proto::{read_msg, write_msg, Msg};
use matchlock_sandbox::control::ExecSpec;
use matchlock_sandbox::{Client, Store};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

/// Where step images are stored: a name no registry answers to (`.invalid` is reserved).
pub const CACHE_REPO: &str = "build.matchlock.invalid/cache";

/// The name a step's image is stored under, from its cache key.
fn cache_name(key: &str) -> String {
    format!("{CACHE_REPO}:{key}")
}

/// Whether a stored image (by its normalised name) is a build step's, the cache `image ls`
/// hides and `image gc` and `--build-cache-size` drop.
pub fn is_cache_step(name: &str) -> bool {
    name.strip_prefix(CACHE_REPO)
        .is_some_and(|rest| rest.starts_with(':'))
}

/// Files the agent writes into every sandbox, which a step's layer leaves out (as Docker's do,
/// where they are bind mounts).
const NOT_IN_LAYERS: [&str; 3] = ["etc/hosts", "etc/hostname", "etc/resolv.conf"];

/// What to build and how.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The build context directory.
    pub context: PathBuf,
    /// Names to tag the result with (none: only its cache name).
    pub tags: Vec<String>,
    /// `--build-arg`s.
    pub build_args: BTreeMap<String, String>,
    /// `--target`: the stage to build; the last when `None`.
    pub target: Option<String>,
    /// Ignore stored steps and run every one.
    pub no_cache: bool,
    /// When to pull base images.
    pub pull: PullPolicy,
    /// The network of `RUN` sandboxes (`None`: none), with its secrets.
    pub network: Option<NetworkRequest>,
    /// Extra `/etc/hosts` entries `(address, name)` of `RUN` sandboxes.
    pub add_hosts: Vec<(String, String)>,
    /// CPU, memory and disk of `RUN` sandboxes.
    pub resources: Resources,
    /// After the build, least-recently-used step images go until the step cache's root file
    /// systems take at most this many bytes (this build's steps are kept); `None`: no limit.
    pub cache_limit: Option<u64>,
}

/// What a build reports as it goes; the CLI prints it.
pub trait Progress: Sync {
    /// Step `n` of `total` of a stage starts: `text` is the instruction as written.
    fn step(&self, stage: &str, n: usize, total: usize, text: &str);
    /// The step was found in the cache.
    fn cached(&self);
    /// The step's command wrote this (stdout and stderr alike).
    fn output(&self, bytes: &[u8]);
    /// The step finished in `secs`.
    fn done(&self, secs: f64);
    /// Base image pulls report here.
    fn pulls(&self) -> &dyn PullProgress;
    /// Old step images were removed to keep the cache within its limit.
    fn pruned(&self, _images: usize, _bytes: u64) {}
}

/// Why a build failed; the message says where and what to do.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The Dockerfile is wrong (the line is in the message).
    #[error("Dockerfile: {0}")]
    Dockerfile(String),
    /// A `RUN` exited non-zero.
    #[error("line {line}: `{text}` failed with exit code {code}")]
    RunFailed {
        /// The instruction's line.
        line: usize,
        /// The instruction.
        text: String,
        /// Its exit code.
        code: i32,
    },
    /// An image could not be found, pulled or stored.
    #[error(transparent)]
    Image(#[from] matchlock_image::ImageError),
    /// A sandbox could not run a step.
    #[error(transparent)]
    Sandbox(#[from] matchlock_sandbox::SandboxError),
    /// Something else, said in full.
    #[error("{0}")]
    Other(String),
}

fn df_err(line: usize, e: impl std::fmt::Display) -> BuildError {
    BuildError::Dockerfile(format!("line {line}: {e}"))
}

/// A stage's state between steps: its image so far (`None`: still empty, `FROM scratch`) and
/// config.
struct Current {
    image: Option<ImageInfo>,
    /// The config blob the next derived image starts from.
    blob: serde_json::Value,
}

/// Builds `opts` and returns the final image (tagged with each of `opts.tags`).
pub fn build(
    images: &ImageStore,
    sandboxes: &Store,
    opts: &BuildOptions,
    progress: &dyn Progress,
) -> Result<ImageInfo, BuildError> {
    // Whole seconds, as the store dates tags: every step this build stores or uses is dated
    // at or after it, so pruning keeps them.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let df = parse(&opts.dockerfile).map_err(|e| BuildError::Dockerfile(e.to_string()))?;
    let p = plan(&df, &opts.build_args, opts.target.as_deref())
        .map_err(|e| BuildError::Dockerfile(e.to_string()))?;
    // `.dockerignore` at the context's root, as Docker reads it.
    let ignore_text = crate::copy::context_file(&opts.context, ".dockerignore")
        .ok()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let mut built: BTreeMap<usize, Current> = BTreeMap::new();
    let mut final_image = None;
    for &index in &p.order {
        let stage = &p.stages[index];
        let label = stage
            .name
            .clone()
            .unwrap_or_else(|| format!("stage {}", index + 1));
        let total = stage.instructions.len() + 1;
        let from_text = df
            .instructions
            .iter()
            .find(|i| i.line == stage.line)
            .map(|i| i.text.clone())
            .unwrap_or_default();
        progress.step(&label, 1, total, &from_text);
        let t = Instant::now();
        let mut cur = match &stage.base {
            Base::Scratch => Current {
                image: None,
                blob: serde_json::json!({"architecture": "amd64", "os": "linux", "config": {}}),
            },
            Base::Stage(i) => {
                let c = built
                    .get(i)
                    .ok_or_else(|| BuildError::Other(format!("stage {i} was not built")))?;
                Current {
                    image: c.image.clone(),
                    blob: c.blob.clone(),
                }
            }
            Base::Image(r) => {
                let info =
                    images.ensure(r, opts.pull, &PullOptions::from_env(), progress.pulls())?;
                let mut blob = images.config_blob(&info)?;
                pad_history(&mut blob);
                Current {
                    blob,
                    image: Some(info),
                }
            }
        };
        progress.done(t.elapsed().as_secs_f64());
        let mut state = StageState::new(&p, index, config_of(&cur.blob), &opts.build_args);
        // The base's ONBUILD triggers run first, in order, as part of FROM (BuildKit runs them
        // there too); the stage's image does not inherit them.
        let triggers = onbuild_triggers(std::mem::take(&mut state.config.onbuild), stage.line)?;
        set_config(&mut cur.blob, &state.config);
        let steps = triggers.iter().map(|i| (1, i)).chain(
            stage
                .instructions
                .iter()
                .enumerate()
                .map(|(n, i)| (n + 2, i)),
        );
        for (n, inst) in steps {
            progress.step(&label, n, total, &inst.text);
            let t = Instant::now();
            let step = state.apply(inst).map_err(|e| df_err(inst.line, e))?;
            set_config(&mut cur.blob, &state.config);
            match step {
                Step::Config => history(&mut cur.blob, &inst.text, true),
                Step::Workdir(dir) => {
                    // Docker makes the directory (root's, 0755) when the image lacks it.
                    let dir = match &cur.image {
                        Some(image) => images.resolve_in_rootfs(image, &dir, true)?,
                        None => dir,
                    };
                    let exists = match &cur.image {
                        Some(image) => images.rootfs_has(image, &dir)?,
                        None => dir == "/",
                    };
                    if exists {
                        history(&mut cur.blob, &inst.text, true);
                    } else {
                        let key = cache_key(&cur, &inst.text, &dir);
                        advance(
                            images,
                            opts.no_cache,
                            progress,
                            &mut cur,
                            &key,
                            &inst.text,
                            |_| {
                                let layer = temp_file(images)?;
                                crate::copy::dir_layer(
                                    &dir,
                                    std::io::BufWriter::new(layer.as_file()),
                                )
                                .map_err(|e| df_err(inst.line, e))?;
                                Ok(layer)
                            },
                        )?;
                    }
                }
                Step::Run(mut run) => {
                    let mounts = prepare_mounts(
                        images,
                        opts,
                        &ignore_text,
                        &built,
                        &p,
                        cur.image.as_ref(),
                        &mut run,
                        progress,
                    )
                    .map_err(|e| df_err(inst.line, e))?;
                    let key = cache_key(&cur, &inst.text, &format!("{run:?} {}", mounts.key));
                    advance(
                        images,
                        opts.no_cache,
                        progress,
                        &mut cur,
                        &key,
                        &inst.text,
                        |cur| {
                            let parent = cur.image.as_ref().ok_or_else(|| {
                                df_err(
                                    inst.line,
                                    "RUN needs a base image with a shell (FROM scratch has none)",
                                )
                            })?;
                            let layer = temp_file(images)?;
                            let code = run_step(
                                images,
                                parent,
                                sandboxes,
                                opts,
                                &run,
                                mounts.vfs.clone(),
                                layer.path(),
                                progress,
                            )?;
                            if code != 0 {
                                return Err(BuildError::RunFailed {
                                    line: inst.line,
                                    text: inst.text.clone(),
                                    code,
                                });
                            }
                            Ok(layer)
                        },
                    )?;
                }
                Step::Copy(mut copy) => {
                    // `ADD URL`: fetched on the host first, under the build's network policy.
                    let downloads = fetch_urls(images, opts, &mut copy, progress)
                        .map_err(|e| df_err(inst.line, e))?;
                    // `--from`: the sources come out of that stage's or image's file system.
                    let from_dir = match copy.from.take() {
                        None => None,
                        Some(from) => {
                            let (image, from_name) =
                                from_image(images, opts, &built, &p, &from, progress)?;
                            let dir = temp_dir(images).map_err(BuildError::Other)?;
                            if let Some(image) = image {
                                for s in &copy.sources {
                                    if let CopySource::Path(p) = s {
                                        extract(images, &image, &from_name, p, dir.path())
                                            .map_err(|e| df_err(inst.line, e))?;
                                    }
                                }
                            }
                            Some(dir)
                        }
                    };
                    let context = from_dir
                        .as_ref()
                        .map_or(opts.context.as_path(), |d| d.path());
                    let owner = match &copy.chown {
                        Some(spec) => Some(
                            owner(images, cur.image.as_ref(), spec)
                                .map_err(|e| df_err(inst.line, e))?,
                        ),
                        None => None,
                    };
                    let rules = if from_dir.is_some() {
                        // .dockerignore is about the context, not another stage.
                        copy.exclude.join("\n")
                    } else if copy.exclude.is_empty() {
                        ignore_text.clone()
                    } else {
                        format!("{ignore_text}\n{}", copy.exclude.join("\n"))
                    };
                    // A destination the image has as a directory (maybe through a link) takes
                    // a file into it, as if written with a final `/`.
                    if let Some(image) = &cur.image {
                        if !copy.dest.ends_with('/') {
                            let d = images.resolve_in_rootfs(image, &copy.dest, true)?;
                            if images.rootfs_entry(image, &d)? == Some(RootfsEntry::Directory) {
                                copy.dest.push('/');
                            }
                        }
                    }
                    let mut paths = ImagePaths {
                        images,
                        image: cur.image.as_ref(),
                        seen: HashMap::new(),
                    };
                    let layer = temp_file(images)?;
                    let made = crate::copy::copy_layer(
                        &copy,
                        context,
                        &crate::copy::Ignore::parse(&rules),
                        owner,
                        &mut |path, dir| paths.place(path, dir),
                        std::io::BufWriter::new(layer.as_file()),
                    )
                    .map_err(|e| df_err(inst.line, e))?;
                    // Downloads sit in a temporary directory: their paths are in no key.
                    for s in &mut copy.sources {
                        if let CopySource::Fetched { file, .. } = s {
                            *file = PathBuf::new();
                        }
                    }
                    drop(downloads);
                    let key = cache_key(&cur, &inst.text, &format!("{copy:?} {}", made.key));
                    advance(
                        images,
                        opts.no_cache,
                        progress,
                        &mut cur,
                        &key,
                        &inst.text,
                        |_| Ok(layer),
                    )?;
                }
            }
            progress.done(t.elapsed().as_secs_f64());
        }
        final_image = Some(index);
        built.insert(index, cur);
    }
    let index = final_image.ok_or_else(|| BuildError::Other("nothing to build".into()))?;
    let built_image = finish(images, opts, built, index)?;
    if let Some(limit) = opts.cache_limit {
        let (n, bytes) = prune_cache(images, limit, started)?;
        if n > 0 {
            progress.pruned(n, bytes);
        }
    }
    Ok(built_image)
}

/// The target stage's image, tagged with each of `opts.tags`.
fn finish(
    images: &ImageStore,
    opts: &BuildOptions,
    mut built: BTreeMap<usize, Current>,
    index: usize,
) -> Result<ImageInfo, BuildError> {
    let cur = built
        .remove(&index)
        .ok_or_else(|| BuildError::Other("the target stage was not built".into()))?;
    // The final image carries the config as the last instruction left it, layers or not.
    let key = cache_key(&cur, "final", "");
    let parent = cur.image.as_ref();
    let mut out = images.derive(&cache_name(&key), parent, &[], cur.blob.clone())?;
    for tag in &opts.tags {
        out = images.derive(tag, parent, &[], cur.blob.clone())?;
    }
    Ok(out)
}

/// A base image's `ONBUILD` triggers as instructions of the stage built on it (at the `FROM`
/// on `line`), each shown as `ONBUILD …`.
fn onbuild_triggers(
    triggers: Vec<String>,
    line: usize,
) -> Result<Vec<crate::dockerfile::Instruction>, BuildError> {
    use crate::dockerfile::Kind;
    let mut out = Vec::new();
    for t in &triggers {
        let bad = |e: &dyn std::fmt::Display| {
            df_err(line, format!("the base image's trigger `ONBUILD {t}`: {e}"))
        };
        let df = parse(t).map_err(|e| bad(&e))?;
        for mut i in df.instructions {
            if matches!(
                i.kind,
                Kind::From { .. } | Kind::Onbuild(_) | Kind::Maintainer(_)
            ) {
                return Err(bad(&"ONBUILD cannot run FROM, ONBUILD or MAINTAINER"));
            }
            i.line = line;
            i.text = format!("ONBUILD {}", i.text);
            out.push(i);
        }
    }
    Ok(out)
}

/// Removes step images, least recently used first, until the root file systems only they use
/// take at most `limit` bytes on disk; those used at or after `keep_since` (seconds since the
/// epoch) stay. Their layers go with them when nothing else uses them. Returns how many went
/// and the bytes freed.
pub fn prune_cache(
    images: &ImageStore,
    limit: u64,
    keep_since: u64,
) -> Result<(usize, u64), BuildError> {
    use std::os::unix::fs::MetadataExt;
    let (cache, named): (Vec<_>, Vec<_>) = images
        .entries()?
        .into_iter()
        .partition(|e| is_cache_step(&e.info.name));
    let named: std::collections::HashSet<_> = named.into_iter().map(|e| e.info.rootfs).collect();
    let on_disk = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.blocks() * 512);
    let mut seen = std::collections::HashSet::new();
    let mut total: u64 = cache
        .iter()
        .filter(|e| !named.contains(&e.info.rootfs) && seen.insert(e.info.rootfs.clone()))
        .map(|e| on_disk(&e.info.rootfs))
        .sum();
    let (mut removed, mut freed) = (0, 0);
    // `entries` is newest first.
    for e in cache.iter().rev() {
        if total <= limit {
            break;
        }
        if e.stored_at >= keep_since {
            continue;
        }
        let size = on_disk(&e.info.rootfs);
        images.remove(&e.info.name)?;
        removed += 1;
        if !e.info.rootfs.exists() && !named.contains(&e.info.rootfs) {
            total = total.saturating_sub(size);
            freed += size;
        }
    }
    Ok((removed, freed))
}

/// A step's cache key: its parent image (by config digest) and the step as applied.
fn cache_key(cur: &Current, text: &str, applied: &str) -> String {
    let mut h = Sha256::new();
    let parent = cur
        .image
        .as_ref()
        .map(|i| i.digest.as_str())
        .unwrap_or("scratch");
    for part in [parent, &cur.blob.to_string(), text, applied] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())[..40].to_string()
}

/// Fetches the `ADD` step's URL sources on the host (under the build's network policy, checked
/// against `--checksum`) into a temporary directory, and makes each a [`CopySource::Fetched`].
/// The directory lives as long as what this returns.
fn fetch_urls(
    images: &ImageStore,
    opts: &BuildOptions,
    copy: &mut crate::stage::CopyStep,
    progress: &dyn Progress,
) -> Result<Option<tempfile::TempDir>, String> {
    if !copy.sources.iter().any(|s| matches!(s, CopySource::Url(_))) {
        return Ok(None);
    }
    let egress = crate::fetch::Egress::new(opts.network.as_ref(), &opts.add_hosts)?
        .ok_or("ADD from a URL needs the network; this build has --no-network")?;
    let dir = temp_dir(images)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the fetch's runtime: {e}"))?;
    let into_dir = copy.dest.ends_with('/') || copy.sources.len() > 1;
    // A download is bounded as a step's disk is: it has to fit in the image anyway.
    let max_bytes = opts
        .resources
        .disk
        .map_or(matchlock_api::defaults::DISK_SIZE_MB, |d| d.get())
        .saturating_mul(1 << 20);
    for (i, s) in copy.sources.iter_mut().enumerate() {
        let CopySource::Url(url) = s else { continue };
        let name = match crate::fetch::file_name(url) {
            Some(n) => n,
            None if !into_dir => "download".into(),
            None => {
                return Err(format!(
                    "ADD {url}: the URL names no file; give the destination a file name"
                ))
            }
        };
        progress.output(format!("fetching {url}\n").as_bytes());
        let file = dir.path().join(i.to_string());
        let got = rt.block_on(async {
            let mut f = tokio::fs::File::create(&file)
                .await
                .map_err(|e| format!("{}: {e}", file.display()))?;
            crate::fetch::fetch(url, &egress, max_bytes, &mut f).await
        })?;
        if let Some(want) = &copy.checksum {
            if &got.digest != want {
                return Err(format!(
                    "ADD {url}: the content is {}, not the --checksum {want}",
                    got.digest
                ));
            }
        }
        *s = CopySource::Fetched {
            file,
            name,
            mtime: got.mtime.unwrap_or(0),
        };
    }
    Ok(Some(dir))
}

/// Where `type=cache` mounts keep their files: beside the image store, one directory per id.
pub fn cache_mounts_dir(images: &ImageStore) -> PathBuf {
    images
        .root()
        .parent()
        .unwrap_or(images.root())
        .join("build-cache")
}

/// A step's `--mount`s made ready on the host: the workspace mounts its sandbox gets, their
/// part of the step's cache key, and the temporary directories that live as long as the step.
struct PreparedMounts {
    vfs: Vec<VfsMount>,
    key: String,
    _temps: Vec<tempfile::TempDir>,
}

/// Prepares `run`'s mounts: a cache's directory, a bind's files (from the context through
/// `.dockerignore`, as BuildKit sends the context, or out of a stage or image), a tmpfs. Each
/// target is resolved through the image's own links first (the guest refuses to mount across
/// one).
#[allow(clippy::too_many_arguments)]
fn prepare_mounts(
    images: &ImageStore,
    opts: &BuildOptions,
    ignore_text: &str,
    built: &BTreeMap<usize, Current>,
    plan: &crate::plan::Plan,
    parent: Option<&ImageInfo>,
    run: &mut RunStep,
    progress: &dyn Progress,
) -> Result<PreparedMounts, String> {
    use crate::stage::MountKind;
    use matchlock_api::config::VfsMode;
    let mut out = PreparedMounts {
        vfs: Vec::new(),
        key: String::new(),
        _temps: Vec::new(),
    };
    for m in &mut run.mounts {
        if let Some(image) = parent {
            m.target = images
                .resolve_in_rootfs(image, &m.target, true)
                .map_err(|e| e.to_string())?;
        }
        let (host_path, mode, owner) = match &m.kind {
            MountKind::Tmpfs => (PathBuf::new(), VfsMode::Memory, None),
            MountKind::Cache { id, mode, uid, gid } => {
                let dir = cache_mounts_dir(images).join(&hex::encode(Sha256::digest(id))[..32]);
                std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(*mode))
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
                // The content is in no key: a cache only makes a step faster.
                out.key.push_str(&format!(" cache:{id}"));
                (dir, VfsMode::HostFs, Some((*uid, *gid)))
            }
            MountKind::Bind { source, from, rw } => {
                let dir = temp_dir(images)?;
                let mode = if *rw {
                    VfsMode::Overlay
                } else {
                    VfsMode::ReadOnly
                };
                let at = match from {
                    None => {
                        // The context's files as COPY reads them, written out for the mount.
                        let step = crate::stage::CopyStep {
                            add: false,
                            from: None,
                            sources: vec![CopySource::Path(source.clone())],
                            dest: "/".into(),
                            chown: None,
                            chmod: None,
                            exclude: Vec::new(),
                            checksum: None,
                            parents: false,
                        };
                        let tar = tempfile::tempfile_in(images.root())
                            .map_err(|e| format!("a temporary file in the image store: {e}"))?;
                        let made = crate::copy::copy_layer(
                            &step,
                            &opts.context,
                            &crate::copy::Ignore::parse(ignore_text),
                            None,
                            &mut |p, _| Ok(p.to_string()),
                            std::io::BufWriter::new(&tar),
                        )?;
                        out.key.push_str(&format!(" bind:{}", made.key));
                        use std::io::Seek;
                        let mut tar = tar;
                        tar.rewind().map_err(|e| e.to_string())?;
                        let mut a = tar::Archive::new(tar);
                        a.set_preserve_permissions(true);
                        a.unpack(dir.path())
                            .map_err(|e| format!("--mount source {source}: {e}"))?;
                        let src = crate::copy::context_file(&opts.context, source)?;
                        if src.is_dir() {
                            dir.path().to_path_buf()
                        } else {
                            let name = std::path::Path::new(source)
                                .file_name()
                                .map(|n| n.to_os_string())
                                .unwrap_or_default();
                            dir.path().join(name)
                        }
                    }
                    Some(from) => {
                        let (image, name) = from_image(images, opts, built, plan, from, progress)
                            .map_err(|e| e.to_string())?;
                        let image =
                            image.ok_or_else(|| format!("{name} has no files (FROM scratch)"))?;
                        let abs = crate::stage::absolute("/", source);
                        extract(images, &image, &name, &abs, dir.path())?;
                        out.key.push_str(&format!(" bind:{}:{abs}", image.digest));
                        dir.path().join(abs.trim_start_matches('/'))
                    }
                };
                out._temps.push(dir);
                (at, mode, None)
            }
        };
        out.vfs.push(VfsMount {
            host_path,
            guest_path: m.target.clone(),
            mode,
            owner_uid: owner.map(|o| o.0),
            owner_gid: owner.map(|o| o.1),
        });
    }
    Ok(out)
}

/// Runs one `RUN` in a sandbox of `parent` with the workspace `mounts` (its `--mount`s),
/// writes its layer to `layer`; its exit code.
#[allow(clippy::too_many_arguments)]
fn run_step(
    images: &ImageStore,
    parent: &ImageInfo,
    sandboxes: &Store,
    opts: &BuildOptions,
    run: &RunStep,
    mounts: Vec<VfsMount>,
    layer: &std::path::Path,
    progress: &dyn Progress,
) -> Result<i32, BuildError> {
    let mut req =
        SandboxRequest::new(&parent.name).map_err(|e| BuildError::Other(e.to_string()))?;
    req.workspace.mounts =
        matchlock_api::validate::vfs_mounts(mounts).map_err(BuildError::Other)?;
    req.network = if run.no_network {
        None
    } else {
        opts.network.clone()
    };
    req.resources = opts.resources;
    req.add_hosts = opts.add_hosts.clone();
    req.no_snapshot = true;
    req.start = Start::Nothing;
    req.remove_on_stop = true;
    req.owner_pid = Some(std::process::id());
    let intercepts = req.network.as_ref().is_some_and(|n| n.intercepts());
    let plan = matchlock_sandbox::plan(req, parent, sandboxes)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| BuildError::Other(format!("starting the build's runtime: {e}")))?;
    let id = matchlock_sandbox::start_with_secrets(sandboxes, plan.config, &plan.secrets)?;
    rt.block_on(async {
        let client = Client::for_sandbox(sandboxes, &id)?;
        let result = async {
            let user = if run.user.is_empty() { "0" } else { &run.user };
            if run.cwd != "/" {
                // WORKDIR makes its directory, root-owned, as Docker does.
                let code = exec(
                    &client,
                    ExecSpec {
                        argv: vec!["mkdir".into(), "-p".into(), run.cwd.clone()],
                        env: Vec::new(),
                        cwd: Some("/".into()),
                        user: Some("0".into()),
                        tty: None,
                        stdin: false,
                        log: false,
                    },
                    None,
                    progress,
                )
                .await?;
                if code != 0 {
                    return Err(BuildError::Other(format!(
                        "cannot create the working directory {} (mkdir exited {code})",
                        run.cwd
                    )));
                }
            }
            let spec = ExecSpec {
                argv: run.argv.clone(),
                env: run.env.clone(),
                cwd: Some(run.cwd.clone()),
                user: Some(user.to_string()),
                tty: None,
                stdin: run.stdin.is_some(),
                log: false,
            };
            let code = exec(&client, spec, run.stdin.as_deref(), progress).await?;
            if code == 0 {
                let mut exclude: Vec<String> =
                    NOT_IN_LAYERS.iter().map(|s| s.to_string()).collect();
                if intercepts {
                    exclude.extend(untrust_sandbox_ca(&client, parent, images).await?);
                }
                let mut file = tokio::fs::File::create(layer)
                    .await
                    .map_err(|e| BuildError::Other(format!("writing the layer: {e}")))?;
                client.export_upper(exclude, true, &mut file).await?;
            }
            Ok(code)
        }
        .await;
        let _ = client.stop(Some(0)).await;
        result
    })
}

/// Runs one process to its end, its output to `progress`; the exit code.
async fn exec(
    client: &Client,
    spec: ExecSpec,
    stdin: Option<&str>,
    progress: &dyn Progress,
) -> Result<i32, BuildError> {
    let stream = client.exec(spec).await?;
    let (mut rd, mut wr) = stream.into_split();
    if let Some(input) = stdin {
        for chunk in input.as_bytes().chunks(matchlock_proto::CHUNK) {
            write_msg(&mut wr, &Msg::Stdin(chunk.to_vec()))
                .await
                .map_err(|e| BuildError::Other(e.to_string()))?;
        }
        write_msg(&mut wr, &Msg::StdinEof)
            .await
            .map_err(|e| BuildError::Other(e.to_string()))?;
    }
    loop {
        match read_msg(&mut rd)
            .await
            .map_err(|e| BuildError::Other(e.to_string()))?
        {
            Some(Msg::Stdout(d)) | Some(Msg::Stderr(d)) => progress.output(&d),
            Some(Msg::Error(e)) => progress.output(format!("{e}\n").as_bytes()),
            Some(Msg::Exited(st)) => return Ok(st.code),
            Some(_) => {}
            None => {
                return Err(BuildError::Other(
                    "the sandbox went away during the step".into(),
                ))
            }
        }
    }
}

/// The Dockerfile-relevant part of an OCI config blob.
fn config_of(blob: &serde_json::Value) -> ImageConfig {
    let c = &blob["config"];
    let strings = |v: &serde_json::Value| -> Option<Vec<String>> {
        v.as_array().map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
    };
    let keys = |v: &serde_json::Value| -> std::collections::BTreeSet<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let mut cfg = ImageConfig {
        env: strings(&c["Env"])
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect(),
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
        working_dir: c["WorkingDir"].as_str().unwrap_or_default().to_string(),
        user: c["User"].as_str().unwrap_or_default().to_string(),
        labels: c["Labels"]
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default(),
        exposed_ports: keys(&c["ExposedPorts"]),
        volumes: keys(&c["Volumes"]),
        stop_signal: c["StopSignal"].as_str().map(str::to_string),
        onbuild: strings(&c["OnBuild"]).unwrap_or_default(),
        ..ImageConfig::default()
    };
    if let Some(shell) = strings(&c["Shell"]).filter(|s| !s.is_empty()) {
        cfg.shell = shell;
    }
    cfg
}

/// Writes `cfg` into the OCI config blob's `config`, keeping what the Dockerfile does not set.
fn set_config(blob: &mut serde_json::Value, cfg: &ImageConfig) {
    use serde_json::{json, Map, Value};
    if !blob["config"].is_object() {
        blob["config"] = json!({});
    }
    let c = &mut blob["config"];
    let env: Vec<String> = cfg.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    c["Env"] = json!(env);
    c["Entrypoint"] = cfg.entrypoint.as_ref().map_or(Value::Null, |v| json!(v));
    c["Cmd"] = cfg.cmd.as_ref().map_or(Value::Null, |v| json!(v));
    c["WorkingDir"] = json!(cfg.working_dir);
    c["User"] = json!(cfg.user);
    c["Labels"] = json!(cfg.labels);
    let set = |s: &std::collections::BTreeSet<String>| {
        Value::Object(
            s.iter()
                .map(|k| (k.clone(), json!({})))
                .collect::<Map<_, _>>(),
        )
    };
    c["ExposedPorts"] = set(&cfg.exposed_ports);
    c["Volumes"] = set(&cfg.volumes);
    c["StopSignal"] = cfg.stop_signal.as_ref().map_or(Value::Null, |s| json!(s));
    c["OnBuild"] = json!(cfg.onbuild);
    if cfg.shell != ImageConfig::default().shell {
        c["Shell"] = json!(cfg.shell);
    }
    if let Some(h) = &cfg.healthcheck {
        c["Healthcheck"] = json!({
            "Test": h.test, "Interval": h.interval_ns, "Timeout": h.timeout_ns,
            "StartPeriod": h.start_period_ns, "StartInterval": h.start_interval_ns,
            "Retries": h.retries,
        });
    }
}

/// Gives a base image's config one non-empty `history` entry per layer, as BuildKit does: a
/// base without history (a hand-made archive) would otherwise give the built image fewer
/// entries than layers, which buildah and containerd refuse ("history lists N non-empty
/// layers, but we have M layers").
fn pad_history(blob: &mut serde_json::Value) {
    let layers = blob["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len);
    let history = blob["history"].as_array().cloned().unwrap_or_default();
    let non_empty = history
        .iter()
        .filter(|h| h["empty_layer"] != serde_json::json!(true))
        .count();
    if non_empty >= layers {
        return;
    }
    let mut padded: Vec<serde_json::Value> = (non_empty..layers)
        .map(|_| serde_json::json!({"created_by": "", "comment": "layer without history in the base image"}))
        .collect();
    padded.extend(history);
    blob["history"] = serde_json::Value::Array(padded);
}

/// Appends a `history` entry, as `docker history` shows. A step that made a layer is dated now
/// and dates the image; a config-only step (`empty_layer`) takes the image's date as it is, so
/// that the same Dockerfile gives the same config, and the cache keys after it hold.
fn history(blob: &mut serde_json::Value, text: &str, empty_layer: bool) {
    if !blob["history"].is_array() {
        blob["history"] = serde_json::json!([]);
    }
    let mut entry = serde_json::json!({"created_by": text, "comment": "matchlock build"});
    if empty_layer {
        entry["empty_layer"] = serde_json::json!(true);
        if blob["created"].is_string() {
            entry["created"] = blob["created"].clone();
        }
    } else {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        entry["created"] = serde_json::json!(now);
        blob["created"] = serde_json::json!(now);
    }
    if let Some(h) = blob["history"].as_array_mut() {
        h.push(entry);
    }
}

/// Where `COPY` entries land in an image ([`crate::copy::Place`]): the image's links among
/// the directories on the way followed inside its root, as a copy into the mounted image
/// would follow them (`rootfs/bin/x` onto a merged-/usr image lands in `usr/bin`). The layer
/// unpacker refuses to write through a link, so this is where they are followed. Each
/// directory is looked up once, and none below one the image lacks.
struct ImagePaths<'a> {
    images: &'a ImageStore,
    /// `None`: `FROM scratch` so far, where nothing is a link.
    image: Option<&'a ImageInfo>,
    /// A directory as written to where it lands (`None`: the image lacks it).
    seen: HashMap<String, Option<String>>,
}

impl ImagePaths<'_> {
    fn place(&mut self, path: &str, is_dir: bool) -> Result<String, String> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let Some(image) = self.image else {
            return Ok(segs.join("/"));
        };
        let follow = if is_dir {
            segs.len()
        } else {
            segs.len().saturating_sub(1)
        };
        let join = |a: &str, b: &str| {
            if a.is_empty() {
                b.to_string()
            } else {
                format!("{a}/{b}")
            }
        };
        let (mut written, mut at, mut missing) = (String::new(), String::new(), false);
        for seg in &segs[..follow] {
            written = join(&written, seg);
            at = join(&at, seg);
            if missing {
                continue;
            }
            let landed = match self.seen.get(&written) {
                Some(known) => known.clone(),
                // debugfs cannot quote these; the unpacker refuses a link there anyway.
                None if at.contains(['"', '\n']) => None,
                None => {
                    let abs = format!("/{at}");
                    let landed = match self
                        .images
                        .rootfs_entry(image, &abs)
                        .map_err(|e| e.to_string())?
                    {
                        None => None,
                        Some(RootfsEntry::Symlink(_)) => Some(
                            self.images
                                .resolve_in_rootfs(image, &abs, true)
                                .map_err(|e| e.to_string())?
                                .trim_start_matches('/')
                                .to_string(),
                        ),
                        Some(_) => Some(at.clone()),
                    };
                    self.seen.insert(written.clone(), landed.clone());
                    landed
                }
            };
            match landed {
                Some(p) => at = p,
                None => missing = true,
            }
        }
        for seg in &segs[follow..] {
            at = join(&at, seg);
        }
        Ok(at)
    }
}

/// `--chown`'s `user[:group]` as ids: numbers as they are, names from the image's
/// `/etc/passwd` and `/etc/group`.
fn owner(
    images: &ImageStore,
    image: Option<&ImageInfo>,
    spec: &str,
) -> Result<crate::copy::Owner, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let read = |path: &str| -> Result<String, String> {
        let image = image.ok_or_else(|| {
            format!(
                "--chown={spec}: names need an /etc/passwd; FROM scratch has none (use numbers)"
            )
        })?;
        images
            .read_rootfs_file(image, path)
            .map_err(|e| e.to_string())
            .map(|b| String::from_utf8_lossy(&b.unwrap_or_default()).into_owned())
    };
    let field = |db: &str, name: &str, col: usize| -> Option<u64> {
        db.lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&name))
            .and_then(|f| f.get(col).and_then(|v| v.parse().ok()))
    };
    let (uid, primary) = match user.parse::<u64>() {
        Ok(n) => (n, None),
        Err(_) => {
            let passwd = read("/etc/passwd")?;
            let uid = field(&passwd, user, 2).ok_or_else(|| {
                format!("--chown={spec}: no user {user} in the image's /etc/passwd")
            })?;
            (uid, field(&passwd, user, 3))
        }
    };
    let gid = match group {
        None => primary.unwrap_or(uid),
        Some(g) => match g.parse::<u64>() {
            Ok(n) => n,
            Err(_) => field(&read("/etc/group")?, g, 2)
                .ok_or_else(|| format!("--chown={spec}: no group {g} in the image's /etc/group"))?,
        },
    };
    Ok(crate::copy::Owner { uid, gid })
}

/// What a `--from` names (`COPY --from`, `RUN --mount=…,from=`): the stage's image (`None` for
/// a stage still empty, `FROM scratch`) or the image, ensured as a base is; and its name for
/// messages.
fn from_image(
    images: &ImageStore,
    opts: &BuildOptions,
    built: &BTreeMap<usize, Current>,
    plan: &crate::plan::Plan,
    from: &CopyFrom,
    progress: &dyn Progress,
) -> Result<(Option<ImageInfo>, String), BuildError> {
    Ok(match from {
        CopyFrom::Stage(i) => (
            built.get(i).and_then(|c| c.image.clone()),
            plan.stages[*i]
                .name
                .clone()
                .map_or(format!("stage {}", i + 1), |n| format!("stage {n}")),
        ),
        CopyFrom::Image(r) => (
            Some(images.ensure(r, opts.pull, &PullOptions::from_env(), progress.pulls())?),
            r.clone(),
        ),
    })
}

/// Copies what the source `pattern` (absolute in `image`, maybe with wildcards) can name out of
/// `image` (`from` in messages) into `into`: the path itself, or the directory above its first
/// wildcard. Links on the way, the path's own included, are followed inside the image as
/// BuildKit follows a source's links; what they lead to is put at the path as written.
fn extract(
    images: &ImageStore,
    image: &ImageInfo,
    from: &str,
    pattern: &str,
    into: &std::path::Path,
) -> Result<(), String> {
    let abs = crate::stage::absolute("/", pattern);
    let fixed: Vec<&str> = abs
        .split('/')
        .filter(|s| !s.is_empty())
        .take_while(|s| !s.contains(['*', '?', '[']))
        .collect();
    let path = format!("/{}", fixed.join("/"));
    let real = images
        .resolve_in_rootfs(image, &path, true)
        .map_err(|e| e.to_string())?;
    let not_found = || format!("{pattern}: not found in {from}");
    if real == path {
        return match images.extract_path(image, &path, into) {
            Ok(true) => Ok(()),
            Ok(false) => Err(not_found()),
            Err(e) => Err(e.to_string()),
        };
    }
    // Out to a scratch directory first, then moved to where the pattern names it.
    let scratch = tempfile::tempdir_in(into).map_err(|e| format!("{}: {e}", into.display()))?;
    if !images
        .extract_path(image, &real, scratch.path())
        .map_err(|e| e.to_string())?
    {
        return Err(format!("{} (a link to {real})", not_found()));
    }
    let at = into.join(path.trim_start_matches('/'));
    if let Some(parent) = at.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let got = scratch.path().join(real.trim_start_matches('/'));
    let _ = std::fs::remove_file(&at);
    std::fs::rename(&got, &at).map_err(|e| format!("{}: {e}", at.display()))
}

/// Takes the sandbox's own CA, which interception added to the guest's trust store, back out
/// before the layer is made: a built image must not trust it. Returns the paths to leave out
/// of the layer (the CA file, and the bundle when the step did not otherwise change it).
async fn untrust_sandbox_ca(
    client: &Client,
    parent: &ImageInfo,
    images: &ImageStore,
) -> Result<Vec<String>, BuildError> {
    use matchlock_api::config::{GUEST_CA_BUNDLE, GUEST_CA_FILE};
    const CAP: u64 = 64 << 20;
    let rel = |p: &str| p.trim_start_matches('/').to_string();
    let mut exclude = vec![rel(GUEST_CA_FILE)];
    let Some(pem) = client.read_file(GUEST_CA_FILE, CAP).await? else {
        return Ok(exclude);
    };
    let pem = String::from_utf8_lossy(&pem).into_owned();
    let Some(bundle) = client.read_file(GUEST_CA_BUNDLE, CAP).await? else {
        return Ok(exclude);
    };
    let bundle = String::from_utf8_lossy(&bundle).into_owned();
    let Some(at) = bundle.rfind(&pem) else {
        return Ok(exclude);
    };
    let mut stripped = format!("{}{}", &bundle[..at], &bundle[at + pem.len()..]);
    let original = images
        .read_rootfs_file(parent, GUEST_CA_BUNDLE)?
        .map(|b| String::from_utf8_lossy(&b).into_owned());
    // The append put the CA on a line of its own; a bundle without a final newline got one.
    if original.as_ref().is_some_and(|o| !o.ends_with('\n')) && stripped.ends_with('\n') {
        stripped.pop();
    }
    if original.as_deref() == Some(stripped.as_str()) || (original.is_none() && stripped.is_empty())
    {
        exclude.push(rel(GUEST_CA_BUNDLE));
    } else {
        client
            .write_file(GUEST_CA_BUNDLE, stripped.as_bytes(), 0o644)
            .await?;
    }
    Ok(exclude)
}

/// Moves the stage on by one layer step: the image stored under `key` unless `no_cache`, else
/// a new one from the layer `make` writes.
fn advance(
    images: &ImageStore,
    no_cache: bool,
    progress: &dyn Progress,
    cur: &mut Current,
    key: &str,
    text: &str,
    make: impl FnOnce(&Current) -> Result<tempfile::NamedTempFile, BuildError>,
) -> Result<(), BuildError> {
    let name = cache_name(key);
    let stored = if no_cache {
        None
    } else {
        images.resolve(&name).ok()
    };
    let info = match stored {
        Some(info) => {
            progress.cached();
            // Used now: least-recently-used pruning keeps it longest.
            let _ = images.touch(&name);
            info
        }
        None => {
            let layer = make(cur)?;
            history(&mut cur.blob, text, false);
            images.derive(
                &name,
                cur.image.as_ref(),
                &[layer.path().to_path_buf()],
                cur.blob.clone(),
            )?
        }
    };
    cur.blob = images.config_blob(&info)?;
    cur.image = Some(info);
    Ok(())
}

/// A temporary directory in the image store (the same file system as its blobs).
fn temp_dir(images: &ImageStore) -> Result<tempfile::TempDir, String> {
    tempfile::tempdir_in(images.root())
        .map_err(|e| format!("a temporary directory in the image store: {e}"))
}

/// A temporary file in the image store (the same file system as its blobs).
fn temp_file(images: &ImageStore) -> Result<tempfile::NamedTempFile, BuildError> {
    tempfile::NamedTempFile::new_in(images.root())
        .map_err(|e| BuildError::Other(format!("a temporary file in the image store: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_images_are_told_apart_by_name() {
        assert!(is_cache_step(&cache_name("0123abcd")));
        assert!(!is_cache_step("build.matchlock.invalid/cachex:1"));
        assert!(!is_cache_step("docker.io/library/busybox:latest"));
    }

    #[test]
    fn a_base_without_history_gets_one_entry_per_layer() {
        let mut blob = serde_json::json!({"rootfs": {"diff_ids": ["sha256:a", "sha256:b"]}});
        pad_history(&mut blob);
        assert_eq!(blob["history"].as_array().map(Vec::len), Some(2));
        // One entry for two layers, plus an empty one: one more goes in front.
        let mut blob = serde_json::json!({
            "rootfs": {"diff_ids": ["sha256:a", "sha256:b"]},
            "history": [{"created_by": "CMD x", "empty_layer": true}, {"created_by": "ADD"}],
        });
        pad_history(&mut blob);
        let h = blob["history"].as_array().unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(h[2]["created_by"], "ADD");
        // Complete history is left as it is.
        let before = blob.clone();
        pad_history(&mut blob);
        assert_eq!(blob, before);
    }
}
