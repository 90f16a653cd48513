//! The Matchlock image store.
//!
//! Images arrive from OCI/Docker registries ([`ImageStore::pull`], [`ImageStore::ensure`]) or as
//! `docker save` / OCI image-layout tarballs ([`ImageStore::import`]); both land in the same
//! content-addressed blob store. Each image's layers are squashed, honouring OCI whiteouts, into
//! one read-only ext4 file system that every sandbox of that image shares; the guest stacks a
//! per-sandbox writable upper disk on top with overlayfs.
//!
//! ```text
//!  registry ──(pull.rs: auth.rs, registry.rs)──┐
//!                                              ├─> blobs/sha256 ─> unpack.rs ─> ext4.rs ─> rootfs/*.ext4
//!  tarball ───(archive.rs)─────────────────────┘                                           tags/*.json
//! ```
//!
//! What this crate does not do: push images, build images, or talk to registries over anything
//! but the OCI distribution API (no Docker credential helpers: `credHelpers`/`credsStore` in
//! `~/.docker/config.json` are ignored, only `auths.<registry>.auth` is read).
//!
//! Store layout under the root (`$MATCHLOCK_CACHE_DIR/images`, default `~/.cache/matchlock/images`):
//!
//! ```text
//! blobs/sha256/<hex>              manifests, configs and layers, named by the sha256 of their bytes
//! rootfs/<config-digest-hex>.ext4 one read-only ext4 per image (content-addressed by its config)
//! tags/<escaped ref>.json         one ImageInfo per tag, written atomically (write + rename)
//! tmp/                            spool and staging space of imports and pulls in progress, and
//!                                 partial blob downloads (tmp/blob-<hex>.partial) a later pull resumes
//! lock                            flock taken around every tag, rootfs and blob update
//! pulls.lock                      shared flock held by every pull; `gc` collects blobs only when
//!                                 it can take it exclusively (a pull's blobs are untagged until it ends)
//! ```
//!
//! Crash safety: every file that other code may read is written under `tmp/` and renamed into place
//! only when complete, so an interrupted import leaves at worst an orphaned directory in `tmp/`,
//! which later imports sweep once its owning process is gone. Blobs are only ever renamed into
//! `blobs/sha256` after their digest was checked, and cached blobs are checked again before use.

mod archive;
mod auth;
mod command;
mod derive;
mod ext4;
mod progress;
mod pull;
mod reference;
mod registry;
mod store;
mod unpack;
mod util;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use command::{compose_command, merge_env, DEFAULT_PATH};
pub use derive::{ExportFormat, RootfsEntry, StoredLayer};
pub use progress::{NoProgress, PullEvent, PullProgress, StderrProgress};
pub use pull::{PullOptions, PullPolicy};
pub use reference::normalize_reference;
pub use registry::RegistryConfig;
pub use store::{GcReport, ImageStore, StoredImage};

/// What the store knows about one tagged image.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    /// The normalised reference, e.g. `docker.io/library/busybox:latest`.
    pub name: String,
    /// `sha256:<hex>` of the image config blob; identifies the image content.
    pub digest: String,
    /// The read-only ext4 root file system of the image (shared by all its sandboxes).
    pub rootfs: PathBuf,
    /// Size of the rootfs file in bytes.
    pub size: u64,
    /// The image's `created` timestamp (RFC 3339), when the config has one.
    pub created: Option<String>,
    /// The runtime defaults of the image.
    pub config: ImageConfig,
}

/// The runtime defaults an image carries in its config blob (`config.{Env,Entrypoint,...}`).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ImageConfig {
    /// Environment as `KEY=VAL` strings, in image order.
    pub env: Vec<String>,
    /// `ENTRYPOINT`, when the image sets one.
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`, when the image sets one.
    pub cmd: Option<Vec<String>>,
    /// `WORKDIR`, when set and non-empty.
    pub working_dir: Option<String>,
    /// `USER` (`name`, `uid`, `name:group` or `uid:gid`), when set and non-empty.
    pub user: Option<String>,
}

/// Everything that can go wrong in the image store. Every message is one line and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The tag is not in the store.
    #[error("image \"{shown}\" is not in the local store; pull it with 'matchlock pull {input}' or import it with 'matchlock image import {input} < image.tar'")]
    NotFound {
        /// The familiar form of the normalised reference (`busybox:latest`).
        shown: String,
        /// What the user typed.
        input: String,
    },
    /// The image reference is malformed.
    #[error("invalid image reference \"{input}\": {reason}")]
    InvalidReference {
        /// What the user typed.
        input: String,
        /// Why it was rejected.
        reason: String,
    },
    /// The tarball is not a usable docker-save / OCI archive.
    #[error("invalid image archive: {0}")]
    InvalidArchive(String),
    /// A blob or layer does not hash to the digest that names it.
    #[error("{what} is corrupt: expected {expected}, content hashes to {actual}; {remedy}")]
    DigestMismatch {
        /// Which blob or layer.
        what: String,
        /// The digest the archive or registry claims.
        expected: String,
        /// The digest of the bytes actually read.
        actual: String,
        /// What to do about it.
        remedy: String,
    },
    /// The registry has no such repository or tag (or manifest digest).
    #[error("\"{reference}\" was not found in registry {registry} (unknown repository, tag or digest); check the name and tag")]
    NotInRegistry {
        /// The normalised reference.
        reference: String,
        /// The registry host.
        registry: String,
    },
    /// The registry refused access: no or wrong credentials.
    #[error("registry {registry} refused access to {repository}: {hint}")]
    Unauthorized {
        /// The registry host.
        registry: String,
        /// The repository path.
        repository: String,
        /// Which credentials were tried (never their values) and what to do.
        hint: String,
    },
    /// The registry could not be reached (down, wrong address, network error).
    #[error("cannot reach registry {registry}: {reason}; check the address, the network and that the registry is running")]
    RegistryUnreachable {
        /// The registry host.
        registry: String,
        /// The underlying cause, one line.
        reason: String,
    },
    /// A transfer from the registry broke off midway.
    #[error("the download of {what} from registry {registry} broke off ({reason}); run the pull again{resume}")]
    Interrupted {
        /// The registry host.
        registry: String,
        /// What was being downloaded, and how far it got.
        what: String,
        /// The underlying cause, one line.
        reason: String,
        /// Empty, or a note that the next pull resumes where this one stopped.
        resume: String,
    },
    /// The registry's TLS certificate could not be verified.
    #[error("cannot verify the TLS certificate of registry {registry}: {reason}; if it uses a private CA, set MATCHLOCK_REGISTRY_CA=/path/to/ca.pem")]
    Tls {
        /// The registry host.
        registry: String,
        /// The verification failure, one line.
        reason: String,
    },
    /// The registry does not speak HTTPS and may not be used over plain HTTP.
    #[error("registry {registry} does not speak HTTPS; plain HTTP is only used for loopback registries and those listed in MATCHLOCK_INSECURE_REGISTRIES=host:port,...")]
    NotHttps {
        /// The registry host.
        registry: String,
    },
    /// Any other registry failure (bad manifest, unsupported media type, server error).
    #[error("registry {registry}: {message}")]
    Registry {
        /// The registry host.
        registry: String,
        /// What went wrong, one line.
        message: String,
    },
    /// Settings for the registry client (CA file, credentials file) are unusable.
    #[error("{0}")]
    RegistryConfig(String),
    /// The disk holding the store is full.
    #[error("{context}: no space left on device; free disk space (for example with 'matchlock image gc') and retry")]
    DiskFull {
        /// What was being written.
        context: String,
    },
    /// A layer entry would escape the root file system or is otherwise unsafe to apply.
    #[error("layer {layer} entry \"{entry}\" rejected: {reason}")]
    UnsafeEntry {
        /// 1-based layer number.
        layer: usize,
        /// The entry's path as written in the tar.
        entry: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A required host tool is missing.
    #[error("`{tool}` not found in PATH; install {package} (e.g. 'apt-get install {package}')")]
    MissingTool {
        /// The program name.
        tool: String,
        /// The distribution package providing it.
        package: String,
    },
    /// A host tool ran but failed.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        /// The program name.
        tool: String,
        /// Its exit status.
        status: String,
        /// Its stderr, folded into one line.
        stderr: String,
    },
    /// `compose_command` ended with an empty argv.
    #[error("no command: the image has no ENTRYPOINT or CMD; give one after --")]
    NoCommand,
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON document (manifest, config, tag) could not be parsed.
    #[error("{context}: {source}")]
    Json {
        /// Which document.
        context: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The store location could not be determined.
    #[error("cannot locate the image store: {0}")]
    NoStoreDir(String),
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        // ENOSPC (and EDQUOT, its per-user twin) get their own actionable message.
        if matches!(
            source.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EDQUOT)
        ) {
            return ImageError::DiskFull {
                context: context.into(),
            };
        }
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn archive(msg: impl Into<String>) -> Self {
        ImageError::InvalidArchive(msg.into())
    }
}
