//! The host side of Matchlock's workspace filesystem.
//!
//! A sandbox's workspace mounts are served by one virtio-fs device ([`virtiofs`]): the guest
//! kernel's FUSE client sends its requests over a virtqueue, [`fuse`] reads them, and each mount's
//! [`MountFs`] answers them from a host directory (or a single host file). The guest is
//! untrusted, so:
//!
//! - every path is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//!   RESOLVE_NO_MAGICLINKS)` against the mount's root, and every name the guest sends must be one
//!   path component; the host never follows a symlink inside a mount (the guest's kernel resolves
//!   symlinks itself, in the guest), so neither `..` nor a symlink can lead outside the root;
//! - read-only mounts refuse every write-class operation here, whatever the guest's kernel does;
//! - FIFOs, devices and sockets on the host are never opened;
//! - the node table, the handle table, request sizes and the number of mounts are all capped,
//!   and descriptor chains are checked against guest memory;
//! - interception rules ([`rules`]) refuse chosen operations on chosen guest paths.
//!
//! A mount's node ids are the host inode numbers where they are free (so `ls -i` is stable across
//! lookups and hard links share one), `1` for the root, synthetic ids otherwise; [`fuse`] puts the
//! mount's index above them. Each node remembers the names it was seen under; an operation uses
//! the first that still leads to the same `(dev, ino)`, so a stale name (the file was replaced on
//! the host) yields `ESTALE`, on which the guest's kernel looks the name up again, rather than
//! another file.

// Everything here handles what the guest sends: a panic would be the guest crashing the host side.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod fuse;
pub mod op;
mod ops;
pub mod rules;
pub mod scratch;
mod sys;
pub mod virtiofs;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::broadcast;

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
    /// For a directory that belongs to the sandbox alone ([`scratch`]): its byte budget and
    /// what its contents already take, `(limit, used)`; new entries are owned by the guest
    /// user that creates them.
    pub private: Option<(u64, u64)>,
    /// Most files and directories the guest may hold looked up at once (each costs the
    /// supervisor ~300 bytes), see [`node_limit`].
    pub max_nodes: usize,
}

/// How many nodes a mount may hold for a guest with `memory` bytes of RAM: one per 2 KiB.
/// A guest cannot keep more looked up than its own dentry and inode caches hold (about 1 KiB
/// each, in its memory), so this only stops a guest that lies about forgetting them, at about
/// 15 % of its memory in supervisor memory.
pub fn node_limit(memory: u64) -> usize {
    usize::try_from(memory / 2048).unwrap_or(usize::MAX)
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

/// A sandbox's workspace: the server of its mounts and how the guest mounts them. Every mount is
/// served by the host, so rules and events apply to every kind: `memory` mounts from an empty
/// private directory under `state_dir` (`scratch/<n>`), `overlay` mounts that rules or events
/// watch from a private copy there (unwatched ones are overlayfs in the guest, which copies
/// nothing). Private directories hold at most `budget` bytes (plus the copy).
pub fn workspace(
    mounts: &[matchlock_api::config::VfsMount],
    rules: &[rules::BlockRule],
    emit_events: bool,
    budget: u64,
    state_dir: &std::path::Path,
) -> Result<(VfsServer, Vec<matchlock_proto::GuestVfsMount>), String> {
    use matchlock_api::config::VfsMode;
    let watched = !rules.is_empty() || emit_events;
    let mut specs = Vec::new();
    let mut guest = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let private_dir = state_dir.join("scratch").join(i.to_string());
        let failed = |e: std::io::Error| format!("workspace mount {}: {e}", m.guest_path);
        let (host_path, read_only, private) = match m.mode {
            VfsMode::Memory => {
                scratch::create(&private_dir).map_err(failed)?;
                (private_dir, false, Some((budget, 0)))
            }
            VfsMode::Overlay if watched => {
                let used = scratch::copy_tree(&m.host_path, &private_dir, budget.max(1 << 30))
                    .map_err(failed)?;
                (
                    private_dir,
                    false,
                    Some((used.saturating_add(budget), used)),
                )
            }
            VfsMode::HostFs => (m.host_path.clone(), false, None),
            VfsMode::ReadOnly | VfsMode::Overlay => (m.host_path.clone(), true, None),
        };
        guest.push(matchlock_proto::GuestVfsMount {
            id: specs.len() as u32,
            path: m.guest_path.clone(),
            file: host_path.is_file(),
            read_only: m.mode == VfsMode::ReadOnly,
            // A private copy takes the guest's writes itself.
            overlay: m.mode == VfsMode::Overlay && private.is_none(),
        });
        specs.push(MountSpec {
            host_path,
            read_only,
            guest_path: m.guest_path.clone(),
            rules: rules.to_vec(),
            owner: Owner {
                uid: m.owner_uid,
                gid: m.owner_gid,
            },
            emit_events,
            private,
            max_nodes: node_limit(budget),
        });
    }
    let server = VfsServer::new(&specs).map_err(|e| format!("workspace mount {e}"))?;
    Ok((server, guest))
}

/// The host filesystem server of one sandbox: its mounts, in the order given to [`VfsServer::new`].
pub struct VfsServer {
    fuse: Arc<fuse::FuseFs>,
    events: broadcast::Sender<FileEvent>,
}

impl VfsServer {
    /// Opens every mount's root. Fails if a host path is missing or is neither a directory nor a
    /// regular file, or if there are more than [`fuse::MAX_MOUNTS`].
    pub fn new(specs: &[MountSpec]) -> Result<Self, VfsError> {
        if specs.len() > fuse::MAX_MOUNTS {
            return Err(VfsError {
                path: specs[fuse::MAX_MOUNTS].host_path.display().to_string(),
                source: std::io::Error::other(format!(
                    "a sandbox serves at most {} host mounts; combine some under one directory",
                    fuse::MAX_MOUNTS
                )),
            });
        }
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
                .with_owner(spec.owner)
                .with_node_limit(spec.max_nodes);
            if spec.emit_events {
                fs = fs.with_events(events.clone());
            }
            if let Some((limit, used)) = spec.private {
                fs = fs.private(limit, used);
            }
            mounts.push(Arc::new(fs));
        }
        Ok(Self {
            fuse: Arc::new(fuse::FuseFs::new(mounts)),
            events,
        })
    }

    /// Completed operations on mounts with [`MountSpec::emit_events`], from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<FileEvent> {
        self.events.subscribe()
    }

    /// Serves every mount as one vhost-user virtio-fs device: waits on `listener` for QEMU
    /// (its `vhost-user-fs-device` connects there at start) and answers the guest until the VM
    /// stops. Runs on threads of its own; the returned handle ends with the device.
    pub fn serve_virtiofs(
        &self,
        listener: UnixListener,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let fuse = self.fuse.clone();
        std::thread::Builder::new()
            .name("vfs".into())
            .spawn(move || {
                if let Err(e) = virtiofs::serve("vfs", listener, fuse) {
                    tracing::warn!("workspace: the virtio-fs device stopped: {e}");
                }
            })
    }
}

#[cfg(test)]
mod tests;
