//! Sandbox lifecycle for Matchlock.
//!
//! Every sandbox has one supervisor process ([`supervisor`]) that owns its QEMU child, its guest
//! channel and a control socket. Everything else (`matchlock run`, `exec`, `kill`, the RPC server) is a
//! client of that socket ([`client`]), so any sandbox can be reached by any command however it was
//! created. State lives on disk under `$MATCHLOCK_HOME/vms/<id>/` ([`store`]), written atomically; a
//! sandbox whose supervisor died shows up as crashed because its lock is free.

// Everything here handles what the guest sends: a panic would be the guest crashing the host side.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod client;
pub mod control;
pub mod forward;
pub mod plan;
pub mod store;
pub mod supervisor;
pub mod volume;

pub use matchlock_api::{config, validate};

pub use client::{start, start_with_secrets, Client, Listener};
pub use config::{
    DiskMount, InterceptConfig, NetworkConfig, SandboxConfig, SecretSpec, State, Status,
    VfsBlockRule, VfsMode, VfsMount,
};
pub use plan::{plan, SandboxPlan};
pub use store::Store;

/// Errors of the sandbox layer; messages are one line and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// No sandbox with that id.
    #[error("VM {0} not found; 'matchlock list' shows the sandboxes that exist")]
    NotFound(String),
    /// The sandbox exists but its supervisor is not running.
    #[error("sandbox {id} is {status}; start a new one with 'matchlock run'")]
    NotRunning {
        /// Sandbox id.
        id: String,
        /// Its current status.
        status: Status,
    },
    /// Refused because the sandbox is still running (or paused).
    #[error("sandbox {0} is still running or paused; stop it first with 'matchlock kill {0}'")]
    Running(String),
    /// The sandbox could not start.
    #[error("{0}")]
    Start(String),
    /// A setting or argument the user gave is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The VMM layer failed.
    #[error(transparent)]
    Vmm(#[from] matchlock_vmm::VmmError),
    /// The guest broke the protocol or the channel closed.
    #[error("guest channel: {0}")]
    Channel(String),
    /// Filesystem or socket trouble.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl SandboxError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
        let context = context.into();
        move |source| SandboxError::Io { context, source }
    }
}

impl From<matchlock_proto::FrameError> for SandboxError {
    fn from(e: matchlock_proto::FrameError) -> Self {
        SandboxError::Channel(e.to_string())
    }
}
