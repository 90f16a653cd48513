//! The host<->guest protocol of Matchlock.
//!
//! The guest agent and the sandbox supervisor share one byte stream: a virtio-serial port inside the
//! guest, a Unix socket on the host. Before anything else the guest writes [`HELLO`] (raw bytes) so the
//! host knows the agent is up and the port is open; then both sides run a [yamux](mux) session over the
//! stream. Every operation (an exec, a file transfer, a shutdown) is its own yamux stream, so they run
//! concurrently with per-stream flow control. On each stream both sides exchange [`Msg`] values, framed
//! by [`frame`] as a 4-byte big-endian length followed by the message encoded with `postcard`.
//!
//! The first message on a stream is a request (`Setup`, `Exec`, `WriteFile`, `ReadFile`, `ListFiles`,
//! `Shutdown`, `Connect`); what follows depends on it and is documented on each variant of [`Msg`].
//! Workspace filesystems ([`vfs`]) are virtio-fs devices of their own, outside this channel.

// Everything here handles what the guest sends: a panic would be the guest crashing the host side.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod frame;
pub mod msg;
pub mod mux;
pub mod relay;
pub mod transfer;
pub mod vfs;

pub use frame::{read_msg, read_msg_max, write_msg, FrameError, MAX_FRAME};
pub use msg::*;
pub use vfs::GuestVfsMount;

/// Protocol version. Bumped whenever a message changes shape; the guest announces it in [`HELLO`].
pub const VERSION: u32 = 9;

/// What the guest agent writes, raw, on the channel before the multiplexer starts.
pub const HELLO: &[u8; 8] = b"MLKAGT09";

/// Name of the virtio-serial port the agent listens on (`/sys/class/virtio-ports/*/name`).
pub const PORT_NAME: &str = "matchlock.agent";

/// The exec that serves SFTP on its stdin and stdout: the agent's own binary in its
/// `--sftp-server` mode, run as any exec is (as the requesting user, with its restrictions).
/// `/proc/self/exe` in the exec'd child is still the agent, whatever the image holds.
pub const SFTP_SERVER_ARGV: [&str; 2] = ["/proc/self/exe", "--sftp-server"];

/// Largest chunk of file or process data put in one message.
pub const CHUNK: usize = 32 * 1024;
