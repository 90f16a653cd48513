//! The host side of Matchlock's workspace filesystem.
//!
//! The guest agent mounts FUSE at each workspace mount point and forwards every kernel request over
//! a channel stream ([`matchlock_proto::vfs`]); [`VfsServer`] answers them from a host directory (or
//! a single host file). The guest is untrusted, so:
//!
//! - every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS)` against the mount's root, and every name the guest sends must be one
//!   path component; the host never follows a symlink inside a mount (the guest's kernel resolves
//!   symlinks itself, in the guest), so neither `..` nor a symlink can lead outside the root;
//! - read-only mounts refuse every write-class operation here, whatever the guest's kernel does;
//! - FIFOs, devices and sockets on the host are never opened;
//! - the node table, the handle table, request sizes and concurrency are all capped;
//! - interception rules ([`rules`]) refuse chosen operations on chosen guest paths.
//!
//! Node ids are the host inode numbers where they are free (so `ls -i` is stable across
//! lookups and hard links share one), `1` for the root, synthetic ids otherwise. Each node
//! remembers the names it was seen under; an operation uses the first that still leads to the
//! same `(dev, ino)`, so a stale name (the file was replaced on the host) yields `ENOENT` rather
//! than another file.

mod ops;
pub mod rules;
mod sys;

use matchlock_proto::vfs::MAX_VFS_FRAME;
use matchlock_proto::vfs::{VfsOp, VfsReply};
use matchlock_proto::{read_msg_max, write_msg, Msg};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

pub use ops::MountFs;

/// One host directory or file served to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// The host path (a directory or a regular file).
    pub host_path: PathBuf,
    /// Refuse every write-class operation.
    pub read_only: bool,
    /// Where the guest mounts it (the paths interception rules match against).
    pub guest_path: String,
    /// Operations refused with `EPERM` (`vfs.interception` block rules).
    pub rules: Vec<rules::BlockRule>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct VfsError {
    /// The host path that failed.
    pub path: String,
    /// What went wrong.
    pub source: std::io::Error,
}

/// Most filesystem operations executing at once (each may hold a [`matchlock_proto::vfs::MAX_IO`]
/// buffer), across all mounts of a sandbox.
const MAX_CONCURRENT_OPS: usize = 16;

/// The host filesystem server of one sandbox: its mounts, indexed by
/// [`matchlock_proto::GuestVfsMount::id`].
pub struct VfsServer {
    mounts: Vec<Arc<MountFs>>,
    ops: Arc<Semaphore>,
}

impl VfsServer {
    /// Opens every mount's root. Fails if a host path is missing or is neither a directory nor a
    /// regular file.
    pub fn new(specs: &[MountSpec]) -> Result<Self, VfsError> {
        sys::raise_nofile_limit();
        let mut mounts = Vec::with_capacity(specs.len());
        for spec in specs {
            let fs = MountFs::open(&spec.host_path, spec.read_only).map_err(|source| VfsError {
                path: spec.host_path.display().to_string(),
                source,
            })?;
            mounts.push(Arc::new(
                fs.with_rules(&spec.guest_path, spec.rules.clone()),
            ));
        }
        Ok(Self {
            mounts,
            ops: Arc::new(Semaphore::new(MAX_CONCURRENT_OPS)),
        })
    }

    /// Whether there is nothing to serve.
    pub fn is_empty(&self) -> bool {
        self.mounts.is_empty()
    }

    /// How many guest streams the server may need at once: every mount's full pool.
    pub fn max_streams(&self) -> usize {
        self.mounts.len() * matchlock_proto::vfs::STREAMS_PER_MOUNT
    }

    /// Serves one guest stream whose first message was [`Msg::VfsOpen`] for `mount`: answers
    /// `Ok` (or `Error` for an unknown mount), then one [`Msg::VfsReply`] per
    /// [`Msg::VfsRequest`] until the guest closes the stream or breaks the protocol.
    pub async fn serve<R, W>(&self, mount: u32, mut rd: R, mut wr: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let Some(fs) = self.mounts.get(mount as usize).cloned() else {
            let _ = write_msg(&mut wr, &Msg::Error(format!("no VFS mount {mount}"))).await;
            return;
        };
        if write_msg(&mut wr, &Msg::Ok).await.is_err() {
            return;
        }
        loop {
            let op = match read_msg_max(&mut rd, MAX_VFS_FRAME).await {
                Ok(Some(Msg::VfsRequest(op))) => op,
                Ok(None) => break,
                Ok(Some(_)) | Err(_) => {
                    tracing::debug!("VFS stream: protocol violation from the guest; closing it");
                    break;
                }
            };
            let reply = self.run(&fs, op).await;
            if write_msg(&mut wr, &Msg::VfsReply(reply)).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    }

    async fn run(&self, fs: &Arc<MountFs>, op: VfsOp) -> VfsReply {
        let Ok(_permit) = self.ops.clone().acquire_owned().await else {
            return VfsReply::Err(libc::EIO);
        };
        let fs = fs.clone();
        tokio::task::spawn_blocking(move || fs.handle(op))
            .await
            .unwrap_or(VfsReply::Err(libc::EIO))
    }
}

#[cfg(test)]
mod tests;
