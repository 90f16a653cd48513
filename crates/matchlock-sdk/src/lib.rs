//! Rust SDK for Matchlock: run untrusted code in disposable micro-VMs from async Rust.
//!
//! A [`Client`] starts `matchlock rpc` (the server the Python, Go and TypeScript SDKs use) and
//! drives one sandbox through it: create it from a [`Sandbox`] description, run commands (buffered,
//! streamed, with stdin, or on a terminal), move files, forward ports, close it. The sandbox is
//! stopped when the client is closed or dropped, or when the program dies.
//!
//! The `matchlock` binary is found through `$MATCHLOCK_BIN`, else on `PATH`; images must be in the
//! local store (`matchlock image import`).
//!
//! # Quick start
//!
//! ```no_run
#![doc = include_str!("../examples/quickstart.rs")]
//! ```
//!
//! # Streaming, stdin and files
//!
//! ```no_run
#![doc = include_str!("../examples/pipes_and_files.rs")]
//! ```

mod client;
mod error;
mod ingress;
mod sandbox;

pub use client::{
    Client, Config, ExecOptions, ExecResult, ExitInfo, FileEvent, FileInfo, PortForwardBinding,
    SshAccess, VolumeInfo,
};
pub use error::{code, Error};
pub use ingress::{Ingress, IngressHookAnswer, IngressHookCall, IngressOptions, IngressRoute};
pub use sandbox::Sandbox;
