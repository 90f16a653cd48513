//! The control protocol spoken on `vms/<id>/control.sock`.
//!
//! A client connection carries one request: a length-prefixed JSON [`Request`] (4-byte big-endian
//! length). For [`Request::Exec`] and [`Request::File`] the supervisor then opens a guest stream and
//! splices the connection onto it, so from there on the client speaks the guest protocol
//! (`matchlock_proto::Msg` frames) directly, and failures arrive as `Msg::Error`. Other requests get
//! one JSON [`Reply`].

use matchlock_proto::{Msg, WinSize};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest control request accepted.
pub const MAX_REQUEST: usize = 1024 * 1024;

/// A process to run, before the supervisor fills in the sandbox's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecSpec {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment, overriding the sandbox's.
    pub env: Vec<(String, String)>,
    /// Working directory; the sandbox default when `None`.
    pub cwd: Option<String>,
    /// User; the sandbox default when `None`.
    pub user: Option<String>,
    /// Allocate a terminal of this size.
    pub tty: Option<WinSize>,
    /// The client sends stdin.
    pub stdin: bool,
    /// Also append the process's output to the sandbox log (`run`'s command, as Matchlock does).
    #[serde(default)]
    pub log: bool,
}

/// One request on a control connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Run a process; the connection becomes its exec stream.
    Exec(ExecSpec),
    /// A file operation (`WriteFile`, `ReadFile` or `ListFiles`); the connection becomes its stream.
    File(Msg),
    /// Stop the sandbox. The reply comes once the VM has stopped.
    Stop {
        /// Grace period for processes; the sandbox default when `None`.
        grace_ms: Option<u64>,
    },
    /// Start a process in the background; its output goes to `logs/vm.log`. Replies once started
    /// and `settle_ms` have passed without it failing (an error if it exited non-zero by then).
    Launch {
        /// The process.
        spec: ExecSpec,
        /// How long to watch for an early failure before replying.
        settle_ms: u64,
    },
    /// Connect to a TCP port on the guest's loopback; the connection becomes a
    /// [`Msg::Connect`] stream.
    Connect {
        /// The guest port.
        port: u16,
    },
    /// Listen on a TCP port on the guest's loopback; the connection becomes a [`Msg::Listen`]
    /// stream, and closing it stops the listener.
    Listen {
        /// The guest port (0: any free port).
        port: u16,
    },
    /// Take a connection announced on a [`Request::Listen`] stream; the connection becomes a
    /// [`Msg::Accept`] stream.
    Accept {
        /// From [`Msg::Accepted`].
        id: u64,
    },
    /// Liveness check.
    Ping,
    /// Save the guest to the sandbox directory and end QEMU, releasing its memory; replies
    /// once done ([`Reply::Ok`] or why not).
    Pause,
    /// Continue a paused sandbox in a new QEMU; replies once the guest runs again.
    Resume,
    /// Subscribe to workspace events: the supervisor replies [`Reply::Ok`] (or an error when the
    /// sandbox was created without `vfs_emit_events`), then writes one length-prefixed JSON
    /// [`matchlock_vfs::FileEvent`] per completed operation until either side closes. A
    /// subscriber that falls behind loses the oldest events rather than stall the guest.
    Events,
    /// Change the interception allow-list. Replies [`Reply::AllowList`].
    AllowList {
        /// Patterns to add.
        add: Vec<String>,
        /// Patterns to remove.
        remove: Vec<String>,
    },
}

impl Request {
    /// The request's kind, for logs (never its contents: an exec's environment may be private).
    pub fn name(&self) -> &'static str {
        match self {
            Request::Exec(_) => "exec",
            Request::File(_) => "file",
            Request::Stop { .. } => "stop",
            Request::Launch { .. } => "launch",
            Request::Connect { .. } => "connect",
            Request::Listen { .. } => "listen",
            Request::Accept { .. } => "accept",
            Request::Ping => "ping",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Events => "events",
            Request::AllowList { .. } => "allow-list",
        }
    }
}

/// Reply to [`Request::Stop`], [`Request::Launch`] and [`Request::Ping`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Reply {
    /// Done.
    Ok,
    /// Failed, with a message for the user.
    Error(String),
    /// The allow-list after an [`Request::AllowList`] change.
    AllowList {
        /// Patterns that were added.
        added: Vec<String>,
        /// Patterns that were removed.
        removed: Vec<String>,
        /// The list now.
        allowed_hosts: Vec<String>,
        /// Whether an empty list denies every host (else it allows every host).
        #[serde(default)]
        deny_by_default: bool,
    },
}

/// Writes a length-prefixed JSON value.
pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    v: &T,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(v).map_err(std::io::Error::other)?;
    let mut buf = (body.len() as u32).to_be_bytes().to_vec();
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads a length-prefixed JSON value, bounded by [`MAX_REQUEST`].
pub async fn read_json<R: AsyncRead + Unpin, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_REQUEST {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control message of {len} bytes exceeds {MAX_REQUEST}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
