//! Messages exchanged on a channel stream. See the crate docs for the stream model.

use serde::{Deserialize, Serialize};

/// One message on a stream. Variants are grouped by who sends them; new variants go at the end so
/// older peers keep decoding the ones they know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    // ---- Requests: the first message of a stream, host -> guest ----
    /// Mount the root filesystem, set the hostname, clock and limits. Sent once, on the first stream.
    /// Reply: [`Msg::Ok`] or [`Msg::Error`].
    Setup(Setup),
    /// Start a process. Reply: [`Msg::Started`] (or [`Msg::Error`] when it could not start, followed
    /// by [`Msg::Exited`] with code 127 if the program was not found, 126 otherwise), then any number of [`Msg::Stdout`]/[`Msg::Stderr`], then [`Msg::Exited`]. Meanwhile the
    /// host may send [`Msg::Stdin`], [`Msg::StdinEof`], [`Msg::Resize`], [`Msg::Signal`] and
    /// [`Msg::Terminate`]. If the host closes the stream first, the guest kills the process group.
    Exec(ExecRequest),
    /// Create or replace a file (parents are created). The host then sends [`Msg::Data`] chunks and
    /// [`Msg::Eof`]; the guest replies [`Msg::Ok`] or [`Msg::Error`].
    WriteFile(WriteFile),
    /// Read a file. Reply: [`Msg::FileInfo`], [`Msg::Data`] chunks, [`Msg::Eof`]; or [`Msg::Error`].
    ReadFile {
        /// Absolute path in the guest.
        path: String,
    },
    /// List a directory. Reply: [`Msg::Entries`] or [`Msg::Error`].
    ListFiles {
        /// Absolute path in the guest.
        path: String,
    },
    /// Stop every process (SIGTERM, then SIGKILL after `grace_ms`), sync the disks and power off.
    /// Reply: [`Msg::Ok`]; the host then closes the stream, and the guest powers off (after at most
    /// 1 s if the close never comes).
    Shutdown {
        /// How long processes get between SIGTERM and SIGKILL.
        grace_ms: u64,
    },

    // ---- Exec stream, host -> guest ----
    /// Bytes for the process's stdin (or the TTY). The guest queues about 1 MiB for a process that
    /// does not read; beyond that it stops reading the stream (flow control).
    Stdin(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Close the process's stdin. With a TTY, sends the terminal's EOF character instead.
    StdinEof,
    /// New terminal size (TTY execs only).
    Resize(WinSize),
    /// Deliver a signal to the process group (to the foreground process group with a TTY).
    Signal(i32),
    /// SIGTERM to the process group, SIGKILL after `grace_ms` if it is still alive.
    Terminate {
        /// Grace period between SIGTERM and SIGKILL.
        grace_ms: u64,
    },

    // ---- Exec stream, guest -> host ----
    /// The process runs.
    Started {
        /// Its pid in the guest.
        pid: u32,
    },
    /// Process output.
    Stdout(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Process error output (not used with a TTY, where both go to `Stdout`).
    Stderr(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The process ended; the last message of an exec stream.
    Exited(ExitStatus),

    // ---- Generic ----
    /// A chunk of file content, at most [`crate::CHUNK`] bytes.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// End of a sequence of [`Msg::Data`].
    Eof,
    /// Success.
    Ok,
    /// Failure, with a message for the user.
    Error(String),
    /// Metadata sent before a file's content.
    FileInfo {
        /// Size in bytes.
        size: u64,
        /// `st_mode` (type and permission bits).
        mode: u32,
    },
    /// A directory listing.
    Entries(Vec<DirEntry>),

    // ---- Port forwarding, host -> guest request ----
    /// Connect to `127.0.0.1:port` inside the guest. Reply: [`Msg::Ok`] once connected, or
    /// [`Msg::Error`]. Afterwards both sides send [`Msg::Data`] chunks and one [`Msg::Eof`] when
    /// their direction ends (TCP half-close); the stream ends when both directions have ended.
    Connect {
        /// TCP port on the guest's loopback.
        port: u16,
    },

    // ---- Remote forwarding (`ssh -R`), host -> guest requests ----
    /// Listen on `127.0.0.1:port` in the guest (0 picks a free port). Reply: [`Msg::Listening`]
    /// or [`Msg::Error`]. Then, while the host keeps this stream open, the guest sends one
    /// [`Msg::Accepted`] per connection it accepts; the host's end of the stream closing stops
    /// the listener.
    Listen {
        /// TCP port on the guest's loopback.
        port: u16,
    },
    /// Reply to [`Msg::Listen`]: listening on this port.
    Listening {
        /// The port, chosen by the guest when 0 was asked for.
        port: u16,
    },
    /// On a [`Msg::Listen`] stream: a connection was accepted and waits, for a few seconds, to
    /// be taken with [`Msg::Accept`].
    Accepted {
        /// Names the connection in [`Msg::Accept`].
        id: u64,
    },
    /// Take the accepted connection `id`. Reply: [`Msg::Ok`], then the stream relays it as a
    /// [`Msg::Connect`] stream does; or [`Msg::Error`] when it is gone.
    Accept {
        /// From [`Msg::Accepted`].
        id: u64,
    },

    // ---- Build, host -> guest request ----
    /// The sandbox's changes to its image, as one OCI layer: a tar of the overlay's upper
    /// directory with whiteouts as `.wh.` entries. Reply: [`Msg::Data`]* then [`Msg::Eof`], or
    /// [`Msg::Error`].
    ExportUpper {
        /// Paths (relative, e.g. `etc/hosts`) left out, with what is beneath them.
        exclude: Vec<String>,
        /// Stop every process first (SIGTERM, then SIGKILL), so nothing changes while it is read.
        stop_processes: bool,
    },

    // ---- Clock, host -> guest request ----
    /// Set the guest's wall clock (a resumed guest's clock stood still while it was paused).
    /// Reply: [`Msg::Ok`] or [`Msg::Error`].
    SetClock {
        /// Host wall clock, milliseconds since the epoch.
        unix_ms: u64,
    },
}

/// Everything the guest needs before it can run processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Setup {
    /// Hostname of the sandbox.
    pub hostname: String,
    /// Extra `/etc/hosts` entries: `(address, name)`.
    pub hosts: Vec<(String, String)>,
    /// Virtio-blk serial of the read-only image disk (ext4), found via `/sys/block/vd*/serial`.
    pub root_serial: String,
    /// Virtio-blk serial of the writable upper disk (ext4); `None` puts the upper on a tmpfs.
    pub upper_serial: Option<String>,
    /// Host wall clock, milliseconds since the epoch (the guest has no RTC); 0 leaves the clock unset.
    pub time_unix_ms: u64,
    /// cgroup v2 `cpu.max` for the workload as `(quota_us, period_us)`; `None` leaves CPU unlimited.
    pub cpu_max: Option<(u64, u64)>,
    /// Confine the workload's view of the kernel (the sandbox is not `--privileged`): a minimal
    /// `/dev` without the disks or the console, read-only `/sys`, `/proc/sys` and
    /// `/proc/sysrq-trigger`.
    pub confined: bool,
    /// Extra disks (ext4) to mount once the root is in place, in order.
    pub disks: Vec<GuestDisk>,
    /// How to configure `eth0`; `None` when the sandbox has no network.
    pub net: Option<GuestNet>,
    /// Workspace filesystems served by the host, mounted (in order) after the switch to the root.
    pub vfs: Vec<crate::vfs::GuestVfsMount>,
    /// Random bytes from the host, mixed into the kernel's pool and followed by a reseed before
    /// anything else runs: a guest restored from a snapshot would otherwise draw the same random
    /// numbers as every other clone of it.
    pub entropy: Vec<u8>,
}

/// The guest side of the sandbox network: a static IPv4 setup of `eth0`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestNet {
    /// The guest's address.
    pub address: [u8; 4],
    /// Prefix length.
    pub prefix: u8,
    /// Default gateway, also the DNS server.
    pub gateway: [u8; 4],
    /// Interface MTU.
    pub mtu: u16,
}

/// An extra disk to mount in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct GuestDisk {
    /// Virtio-blk serial of the disk.
    pub serial: String,
    /// Absolute mount point in the guest (created if missing).
    pub path: String,
    /// Mount read-only.
    pub read_only: bool,
    /// Owner given to the disk's root directory once mounted.
    pub uid: Option<u32>,
    /// Group given to the disk's root directory once mounted.
    pub gid: Option<u32>,
}

/// How to start a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// Program and arguments, executed directly (no shell). `argv[0]` without a `/` is looked up in the
    /// `PATH` of `env`.
    pub argv: Vec<String>,
    /// The complete environment of the process. `HOME` is added from `/etc/passwd` if absent.
    pub env: Vec<(String, String)>,
    /// Working directory; `/` when `None`.
    pub cwd: Option<String>,
    /// `uid`, `uid:gid`, `name` or `name:group`, resolved in the guest's `/etc/passwd` and
    /// `/etc/group`; `None` runs as root.
    pub user: Option<String>,
    /// Allocate a pseudo-terminal of this size; stdout and stderr are then both the terminal.
    pub tty: Option<WinSize>,
    /// Whether the host will send stdin; otherwise stdin is `/dev/null`.
    pub stdin: bool,
    /// Keep all capabilities and skip the seccomp filter.
    pub privileged: bool,
}

/// A terminal size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WinSize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code; `128 + signal` when killed by a signal (shell convention).
    pub code: i32,
    /// The signal that killed it, if any.
    pub signal: Option<i32>,
}

/// A file to write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WriteFile {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits, e.g. `0o644`.
    pub mode: u32,
    /// Owner to set, if any.
    pub uid: Option<u32>,
    /// Group to set, if any.
    pub gid: Option<u32>,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (no directory part).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Whether it is a directory.
    pub is_dir: bool,
}
