//! The host side of Matchlock's workspace filesystem.
//!
//! The guest agent mounts FUSE at each workspace mount point and forwards every kernel request over
//! the VFS port ([`matchlock_proto::vfs`]); [`VfsServer`] answers them from a host directory (or a
//! single host file). The guest is untrusted, so:
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

use matchlock_proto::frame::{self, read_frame};
use matchlock_proto::vfs::{VfsAnswer, VfsCall, VfsOp, VfsReply, MAX_VFS_FRAME};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, Semaphore};

pub use ops::{MountFs, Owner};

/// A guest operation on a workspace mount that completed, for `emit_events` (the RPC server turns
/// these into `event` notifications).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileEvent {
    /// The operation's kind, as interception rules name it ([`rules::OP_KINDS`]).
    pub op: String,
    /// Full guest path.
    pub path: String,
    /// Bytes read or written; otherwise the file's size, when the operation returned it.
    pub size: u64,
    /// `st_mode`, when the operation returned attributes.
    pub mode: u32,
    /// Owner uid, when the operation returned attributes.
    pub uid: u32,
    /// Owner gid, when the operation returned attributes.
    pub gid: u32,
    /// When it completed, milliseconds since the epoch.
    pub timestamp_ms: u64,
}

/// Events buffered per subscriber; one that falls further behind loses the oldest (a slow client
/// must not stall the guest's filesystem).
const EVENT_BUFFER: usize = 4096;

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
    /// Ownership the guest sees (`owner_uid`/`owner_gid`).
    pub owner: Owner,
    /// Report completed operations to subscribers ([`VfsServer::subscribe`]).
    pub emit_events: bool,
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
    events: broadcast::Sender<FileEvent>,
}

impl VfsServer {
    /// Opens every mount's root. Fails if a host path is missing or is neither a directory nor a
    /// regular file.
    pub fn new(specs: &[MountSpec]) -> Result<Self, VfsError> {
        sys::raise_nofile_limit();
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let mut mounts = Vec::with_capacity(specs.len());
        for spec in specs {
            let mut fs = MountFs::open(&spec.host_path, spec.read_only)
                .map_err(|source| VfsError {
                    path: spec.host_path.display().to_string(),
                    source,
                })?
                .with_rules(&spec.guest_path, spec.rules.clone())
                .with_owner(spec.owner);
            if spec.emit_events {
                fs = fs.with_events(events.clone());
            }
            mounts.push(Arc::new(fs));
        }
        Ok(Self {
            mounts,
            ops: Arc::new(Semaphore::new(MAX_CONCURRENT_OPS)),
            events,
        })
    }

    /// Completed operations on mounts with [`MountSpec::emit_events`], from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<FileEvent> {
        self.events.subscribe()
    }

    /// Serves the guest's VFS port until the guest closes it or breaks the protocol: reads
    /// [`VfsCall`]s, runs up to [`MAX_CONCURRENT_OPS`] of them at once, and writes each
    /// [`VfsAnswer`] as soon as it is ready. While every slot is busy the port is not read, so a
    /// guest that floods it only stalls itself. A frame that does not decode ends the session:
    /// its length was bounded before it was read, but an answer without an id could not be routed.
    pub async fn serve_port<R, W>(self: Arc<Self>, mut rd: R, wr: W)
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<VfsAnswer>(MAX_CONCURRENT_OPS);
        let writer = tokio::spawn(write_answers(rx, wr));
        loop {
            let call: VfsCall = match read_frame(&mut rd, MAX_VFS_FRAME).await {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!("VFS port: {e}; closing it");
                    break;
                }
            };
            let Ok(permit) = self.ops.clone().acquire_owned().await else {
                break;
            };
            let fs = self.mounts.get(call.mount as usize).cloned();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let forget = matches!(call.op, VfsOp::Forget { .. });
                let reply = match fs {
                    Some(fs) => {
                        let op = call.op;
                        tokio::task::spawn_blocking(move || fs.handle(op))
                            .await
                            .unwrap_or(VfsReply::Err(libc::EIO))
                    }
                    None => VfsReply::Err(libc::ENODEV),
                };
                if !forget {
                    let _ = tx.send(VfsAnswer { id: call.id, reply }).await;
                }
            });
        }
        drop(tx);
        let _ = writer.await;
    }
}

/// Most bytes of answers written with one call: answers that are ready together go out together,
/// which saves the guest a wakeup per answer.
const ANSWER_BATCH: usize = 2 * 1024 * 1024;

async fn write_answers<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<VfsAnswer>, mut wr: W) {
    let mut buf = Vec::new();
    while let Some(first) = rx.recv().await {
        buf.clear();
        let mut next = Some(first);
        while let Some(answer) = next.take() {
            let id = answer.id;
            // Replies are bounded by MAX_IO, so this cannot fail; if it did, EIO beats a hang.
            let frame = frame::encode(&answer).or_else(|_| {
                frame::encode(&VfsAnswer {
                    id,
                    reply: VfsReply::Err(libc::EIO),
                })
            });
            if let Ok(f) = frame {
                buf.extend_from_slice(&f);
            }
            if buf.len() < ANSWER_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if wr.write_all(&buf).await.is_err() || wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests;
