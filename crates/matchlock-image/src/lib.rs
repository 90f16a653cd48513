//! The Matchlock image store.
//!
//! Images arrive as `docker save` or OCI image-layout tarballs (registry pulls will land in the same
//! content-addressed blob store later). Each image's layers are squashed, honouring OCI whiteouts,
//! into one read-only ext4 file system that every sandbox of that image shares; the guest stacks a
//! per-sandbox writable upper disk on top with overlayfs.
//!
//! Store layout under the root (`$MATCHLOCK_CACHE_DIR/images`, default `~/.cache/matchlock/images`):
//!
//! ```text
//! blobs/sha256/<hex>              manifests, configs and layers, named by the sha256 of their bytes
//! rootfs/<config-digest-hex>.ext4 one read-only ext4 per image (content-addressed by its config)
//! tags/<escaped ref>.json         one ImageInfo per tag, written atomically (write + rename)
//! tmp/                            spool and staging space of imports in progress
//! lock                            flock taken around every tag, rootfs and blob update
//! ```
//!
//! Crash safety: every file that other code may read is written under `tmp/` and renamed into place
//! only when complete, so an interrupted import leaves at worst an orphaned directory in `tmp/`,
//! which later imports sweep once its owning process is gone.

mod archive;
mod command;
mod ext4;
mod reference;
mod store;
mod unpack;
mod util;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use command::{compose_command, merge_env, DEFAULT_PATH};
pub use reference::normalize_reference;
pub use store::ImageStore;

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
    #[error("image \"{shown}\" is not in the local store; import it with 'matchlock image import {input} < image.tar'")]
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
    #[error(
        "{what} is corrupt: expected {expected}, content hashes to {actual}; re-export the image"
    )]
    DigestMismatch {
        /// Which blob or layer.
        what: String,
        /// The digest the archive claims.
        expected: String,
        /// The digest of the bytes actually read.
        actual: String,
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
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn archive(msg: impl Into<String>) -> Self {
        ImageError::InvalidArchive(msg.into())
    }
}
