//! Workspace mounts, as the guest sees them. The host serves every mount (a `memory` one from a
//! private directory of the sandbox) through one virtio-fs device tagged [`TAG`] (the guest kernel's own FUSE client talks to it; no agent code
//! is in the data path). The device's root is a directory whose entries, named by
//! [`GuestVfsMount::id`] in decimal, are the mounts' roots: the agent mounts the device privately
//! and bind-mounts each entry where [`GuestVfsMount::path`] says.

use serde::{Deserialize, Serialize};

/// The tag of the workspace's virtio-fs device (what `mount -t virtiofs TAG DIR` names).
pub const TAG: &str = "matchlock";

/// How the guest mounts one workspace filesystem (part of [`crate::Setup`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestVfsMount {
    /// Its entry's name (in decimal) under the device's root.
    pub id: u32,
    /// Absolute path in the guest.
    pub path: String,
    /// The host side is a single regular file rather than a directory.
    pub file: bool,
    /// The host refuses writes; the guest mounts it read-only too.
    pub read_only: bool,
    /// Put a copy-on-write layer (in guest memory) over the read-only host view, so the guest can
    /// write but nothing reaches the host.
    pub overlay: bool,
}
