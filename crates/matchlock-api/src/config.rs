//! What a sandbox is (its configuration, fixed at creation) and where it stands (its state).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A sandbox's configuration, written once to `config.json` when it is created.
/// Never holds secret values (none exist yet at this layer; future secret fields hold placeholders).
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SandboxConfig {
    /// Sandbox id (`vm-` and 8 hex digits).
    pub id: String,
    /// Normalised image reference.
    pub image: String,
    /// Digest of the image config.
    pub image_digest: String,
    /// The image's read-only root filesystem (ext4).
    pub rootfs: PathBuf,
    /// A guest kernel the user chose (`--kernel`, SDK `kernel.ref`), checked when given;
    /// matchlock's own when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Guest hostname.
    pub hostname: String,
    /// CPU share; fractional values are enforced with cgroup `cpu.max` in the guest.
    pub cpus: f64,
    /// Guest memory in MiB.
    pub memory_mb: u64,
    /// Size of the writable upper disk in MiB.
    pub disk_size_mb: u64,
    /// Base environment of every exec: image env merged with the user's.
    pub env: Vec<(String, String)>,
    /// Default working directory of every exec.
    pub workdir: Option<String>,
    /// Default user of every exec.
    pub user: Option<String>,
    /// Run processes with all capabilities and no seccomp filter.
    pub privileged: bool,
    /// Always boot cold: never start from a template snapshot (`--no-snapshot`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_snapshot: bool,
    /// Grace period between SIGTERM and SIGKILL when the sandbox stops, in milliseconds.
    pub graceful_shutdown_ms: u64,
    /// Seconds without a request from the host after which the supervisor pauses the sandbox;
    /// the next request resumes it (`--idle-pause`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_pause_secs: Option<u64>,
    /// Lifetime limit in seconds; the supervisor stops the sandbox when it is reached.
    pub timeout_secs: Option<u64>,
    /// Remove the sandbox's directory when it stops.
    pub remove_on_stop: bool,
    /// Extra `/etc/hosts` entries `(address, name)`.
    pub add_hosts: Vec<(String, String)>,
    /// Process whose death stops the sandbox (the `run` that attached to it), so a killed CLI
    /// never leaves an orphaned `--rm` sandbox behind.
    #[serde(default)]
    pub owner_pid: Option<u32>,
    /// The network; `None` gives the guest no network interface at all.
    #[serde(default)]
    pub network: Option<NetworkConfig>,
    /// Extra ext4 disks attached to the VM and mounted in the guest.
    #[serde(default)]
    pub disks: Vec<DiskMount>,
    /// Host directories and files served into the guest by the workspace filesystem.
    #[serde(default)]
    pub vfs: Vec<VfsMount>,
    /// Host ports forwarded to guest ports for the sandbox's whole life (`run -p`); the
    /// supervisor binds them, so they outlive the `run` that asked.
    #[serde(default)]
    pub publish: Vec<PublishedPort>,
    /// Workspace operations refused with `EPERM` (RPC `vfs.interception` block rules).
    #[serde(default)]
    pub vfs_block_rules: Vec<VfsBlockRule>,
    /// Report completed workspace operations to the supervisor's event subscribers
    /// (RPC `vfs.interception.emit_events`).
    #[serde(default)]
    pub vfs_emit_events: bool,
    /// The command `run` started, for `inspect`.
    pub command: Vec<String>,
    /// Creation time, seconds since the epoch.
    pub created_at: u64,
}

/// The sandbox network (open mode): the guest's only peer is matchlock's userspace stack, which
/// relays its TCP and UDP flows to public addresses and blocks the rest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Interface MTU.
    pub mtu: u16,
    /// Upstream DNS servers (`IP` or `IP:PORT`); empty means the host's resolvers.
    pub dns_servers: Vec<String>,
    /// How the guest's DNS is answered (`--dns-mode`).
    #[serde(default)]
    pub dns_mode: DnsMode,
    /// Addresses opened despite the private-range block (`--allow-private-host`).
    pub allow_private_hosts: Vec<String>,
    /// Reach private ranges (RFC 1918, CGNAT, ULA) too.
    pub allow_private_ranges: bool,
    /// Interception mode: only HTTP(S) to allowed hosts leaves, through the MITM proxy.
    #[serde(default)]
    pub intercept: Option<InterceptConfig>,
}

/// How the guest's DNS queries are answered (`--dns-mode`, RPC `network.dns_mode`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DnsMode {
    /// Only the host's resolvers (or `--dns-servers`) answer, through matchlock's checks (one
    /// question, rebuilt, answers into blocked ranges refused): a query to any server the
    /// guest names, not only to the gateway, is answered this way and never reaches that
    /// server. The default.
    #[default]
    Trusted,
    /// No DNS leaves the host: each name gets an address made up for it (198.19.x.y, one per
    /// name, stable for the sandbox's life); when the guest connects to one, the host resolves
    /// the name itself (through the same resolvers and checks) and connects there.
    Synthetic,
    /// DNS queries on UDP port 53 go to whichever server the guest names, after the address rule
    /// alone (also while intercepting, when other UDP is refused); anything else to port 53 is
    /// refused; queries to the gateway are answered as in `Trusted`. Lets query names carry
    /// data to any reachable resolver.
    Open,
}

impl DnsMode {
    /// Its name, as the flag and the RPC field spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            DnsMode::Trusted => "trusted",
            DnsMode::Synthetic => "synthetic",
            DnsMode::Open => "open",
        }
    }
}

impl std::str::FromStr for DnsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "trusted" => Ok(DnsMode::Trusted),
            "synthetic" => Ok(DnsMode::Synthetic),
            "open" => Ok(DnsMode::Open),
            other => Err(format!(
                "unknown DNS mode {other:?}: use trusted, synthetic or open"
            )),
        }
    }
}

/// Interception settings (`--allow-host`, `--network-intercept`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct InterceptConfig {
    /// Allow-list patterns (`api.example.com`, `*.example.com`, ...); empty allows every host
    /// unless [`InterceptConfig::deny_by_default`].
    pub allowed_hosts: Vec<String>,
    /// An empty allow-list allows nothing (`--deny-by-default`, RPC `network.deny_by_default`):
    /// hosts are opened one by one with `allow-list add`.
    #[serde(default)]
    pub deny_by_default: bool,
    /// Refuse WebSocket upgrades (`--disable-websockets`, RPC `network.disable_websockets`).
    #[serde(default)]
    pub disable_websockets: bool,
    /// Secrets, without their values (those never reach this file).
    #[serde(default)]
    pub secrets: Vec<SecretSpec>,
    /// JSON-lines event log of every decision, request and response (`--event-log`).
    #[serde(default)]
    pub event_log: Option<PathBuf>,
    /// `run_id` of the events; the sandbox id when empty.
    #[serde(default)]
    pub run_id: String,
    /// `agent_system` of the events.
    #[serde(default)]
    pub agent_system: String,
    /// Hook rules (RPC `network.interception.rules`).
    #[serde(default)]
    pub rules: Vec<crate::wire::RuleSpec>,
    /// Where the SDK serves callback rules.
    #[serde(default)]
    pub callback_socket: Option<PathBuf>,
    /// Network plugins.
    #[serde(
        default,
        skip_serializing_if = "crate::plugins::PluginsConfig::is_empty"
    )]
    pub plugins: crate::plugins::PluginsConfig,
    /// Follow HTTP redirects on the host within the allow-list (`--follow-redirects`, RPC
    /// `network.follow_redirects`).
    #[serde(default)]
    pub follow_redirects: bool,
    /// SSH egress through the host (`--ssh-allow`, RPC `network.ssh_egress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_egress: Option<SshEgressConfig>,
}

/// SSH egress with host-held credentials: which servers the guest's `ssh`/`git` may reach
/// through the host, how their keys are checked, how the host logs in, which commands pass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default)]
pub struct SshEgressConfig {
    /// Servers, `HOST[:PORT]` (port 22 by default; globs like `*.example.com`).
    pub allow: Vec<String>,
    /// The host's `known_hosts` file the servers' keys are checked against.
    pub known_hosts: PathBuf,
    /// Accept a server no `known_hosts` line names (changed or revoked keys never are).
    pub allow_unknown_host_keys: bool,
    /// The host's ssh-agent socket, to log in with.
    pub agent_socket: Option<PathBuf>,
    /// An unencrypted private key file, to log in with (instead of the agent).
    pub key_file: Option<PathBuf>,
    /// `allow:PATTERN` / `deny:PATTERN` command rules; empty allows every plain command.
    pub exec_rules: Vec<String>,
    /// Sessions per guest connection (0: 8).
    pub max_sessions: u32,
    /// Guest SSH connections at once (0: 16).
    pub max_connections: u32,
}

impl SshEgressConfig {
    /// Sessions per connection, with the default applied.
    pub fn sessions(&self) -> usize {
        if self.max_sessions == 0 {
            8
        } else {
            self.max_sessions as usize
        }
    }

    /// Connections at once, with the default applied.
    pub fn connections(&self) -> usize {
        if self.max_connections == 0 {
            16
        } else {
            self.max_connections as usize
        }
    }
}

/// A secret as configuration records it: its name, hosts and placeholder, never its value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SecretSpec {
    /// Environment variable name in the guest.
    pub name: String,
    /// Hosts the real value may be sent to.
    pub hosts: Vec<String>,
    /// What the guest sees.
    pub placeholder: String,
    /// The value may also be sent in plain HTTP (cleartext) requests.
    #[serde(default)]
    pub allow_http: bool,
}

/// Where the sandbox CA certificate is put in the guest, and the bundle it is appended to.
pub const GUEST_CA_FILE: &str = "/etc/ssl/certs/matchlock-ca.pem";
/// The guest's CA bundle (Debian/Alpine path); created when the image has none.
pub const GUEST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Environment that points common TLS clients at the bundle holding the sandbox CA.
pub fn ca_env() -> Vec<(String, String)> {
    [
        ("SSL_CERT_FILE", GUEST_CA_BUNDLE),
        ("REQUESTS_CA_BUNDLE", GUEST_CA_BUNDLE),
        ("CURL_CA_BUNDLE", GUEST_CA_BUNDLE),
        ("NODE_EXTRA_CA_CERTS", GUEST_CA_FILE),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            mtu: crate::defaults::MTU,
            dns_servers: Vec::new(),
            dns_mode: DnsMode::default(),
            allow_private_hosts: Vec::new(),
            allow_private_ranges: false,
            intercept: None,
        }
    }
}

/// An ext4 image on the host mounted at a path in the guest (`--disk`, named volumes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskMount {
    /// The ext4 file on the host.
    pub host_path: PathBuf,
    /// Absolute mount point in the guest.
    pub guest_path: String,
    /// Attach and mount read-only.
    pub read_only: bool,
    /// Owner of the disk's root directory in the guest (`uid=N`), set when it is mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group of the disk's root directory in the guest (`gid=N`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// How a workspace mount treats the guest's writes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VfsMode {
    /// Live and read-write: the guest's changes land on the host.
    HostFs,
    /// Read-only: every write fails.
    ReadOnly,
    /// Copy-on-write: the guest may write, but its changes stay in the sandbox.
    Overlay,
    /// No host path: an empty in-memory directory in the guest (RPC `memory` mounts).
    Memory,
}

impl VfsMode {
    /// Parses the `-v` mode word (`host_fs`, `ro`/`readonly`, `overlay`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "host_fs" | "rw" => Some(VfsMode::HostFs),
            "ro" | "readonly" => Some(VfsMode::ReadOnly),
            "overlay" => Some(VfsMode::Overlay),
            _ => None,
        }
    }
}

/// A host directory (or regular file) mounted in the guest by the workspace filesystem (`-v`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VfsMount {
    /// Absolute host path (empty for [`VfsMode::Memory`]).
    pub host_path: PathBuf,
    /// Absolute mount point in the guest.
    pub guest_path: String,
    /// What happens to the guest's writes.
    pub mode: VfsMode,
    /// The uid every file shows in the guest (`owner_uid`); the host owner's when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<u32>,
    /// The gid every file shows in the guest (`owner_gid`); the host owner's when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_gid: Option<u32>,
}

/// One port forward: a host address and port to a guest port. A local port of 0 picks a free
/// one; [`State::forwards`] says which.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublishedPort {
    /// Host address the listener binds.
    pub address: std::net::IpAddr,
    /// Host port.
    pub local_port: u16,
    /// Guest port (on the guest's loopback).
    pub remote_port: u16,
}

/// The operation kinds workspace rules name (Matchlock's names; aliases are resolved by
/// [`op_kind`]).
pub const OP_KINDS: &[&str] = &[
    "stat", "readdir", "open", "create", "mkdir", "chmod", "remove", "rename", "symlink",
    "readlink", "read", "write", "close", "sync", "truncate",
];

/// Canonical kind for a rule's op name, accepting Matchlock's aliases; `None` if unknown.
pub fn op_kind(name: &str) -> Option<&'static str> {
    let name = match name {
        "read_dir" => "readdir",
        "remove_all" | "removeall" => "remove",
        other => other,
    };
    OP_KINDS.iter().copied().find(|k| *k == name)
}

/// A workspace operation to refuse: by kind (empty = all) and guest path glob (empty = all).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VfsBlockRule {
    /// Operation kinds (`read`, `write`, `create`, ...; see `matchlock_vfs::rules::OP_KINDS`).
    pub ops: Vec<String>,
    /// Glob over the full guest path; `*` does not cross `/`.
    pub path: String,
}

impl SandboxConfig {
    /// Number of vCPUs: `ceil(cpus)`, at least 1.
    pub fn vcpus(&self) -> u32 {
        (self.cpus.ceil() as u32).max(1)
    }

    /// cgroup `cpu.max` when `cpus` is fractional.
    pub fn cpu_max(&self) -> Option<(u64, u64)> {
        const PERIOD: u64 = 100_000;
        if self.cpus.fract() == 0.0 {
            return None;
        }
        Some((
            ((self.cpus * PERIOD as f64).round() as u64).max(1000),
            PERIOD,
        ))
    }
}

/// Lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The supervisor is booting the VM.
    Starting,
    /// The VM runs and accepts commands.
    Running,
    /// The guest's memory and devices are saved in the sandbox directory and QEMU is gone;
    /// `resume` continues it.
    Paused,
    /// The supervisor is shutting the VM down.
    Stopping,
    /// Stopped cleanly.
    Stopped,
    /// The supervisor died without cleaning up (derived: state says running but the lock is free).
    Crashed,
    /// Boot failed.
    Failed,
}

impl Status {
    /// Whether the sandbox accepts commands (or soon will).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Status::Starting | Status::Running | Status::Paused | Status::Stopping
        )
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Crashed => "crashed",
            Status::Failed => "failed",
        })
    }
}

/// Where a sandbox stands, rewritten atomically by its supervisor at each transition (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Current status.
    pub status: Status,
    /// Supervisor pid.
    pub pid: u32,
    /// QEMU pid, once started.
    pub qemu_pid: Option<u32>,
    /// Accelerator in use.
    pub accel: Option<String>,
    /// Milliseconds from supervisor start to a guest ready for commands.
    pub boot_ms: Option<u64>,
    /// How the VM started: `template` (restored from the image's template snapshot), `cold`
    /// (booted), or `cold` with why no template was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    /// Why it stopped (`stopped by request`, `timeout after 5s`, `guest powered off`, an error).
    pub reason: Option<String>,
    /// While paused: when (seconds since the epoch) and the size of the saved state in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<PausedInfo>,
    /// The port forwards the supervisor is serving, with the ports actually bound.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<PublishedPort>,
    /// Last transition, seconds since the epoch.
    pub updated_at: u64,
}

/// A paused sandbox's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedInfo {
    /// When it was paused, seconds since the epoch.
    pub at: u64,
    /// Paused for being idle (`--idle-pause`): the next request resumes it.
    #[serde(default)]
    pub idle: bool,
    /// Bytes of the state file on disk.
    pub bytes: u64,
    /// Hex sha256 of the state file, checked on resume.
    pub sha256: String,
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_cpus_become_quota() {
        let mut c = SandboxConfig {
            cpus: 0.5,
            ..Default::default()
        };
        assert_eq!(c.vcpus(), 1);
        assert_eq!(c.cpu_max(), Some((50_000, 100_000)));
        c.cpus = 2.0;
        assert_eq!(c.vcpus(), 2);
        assert_eq!(c.cpu_max(), None);
        c.cpus = 1.5;
        assert_eq!(c.vcpus(), 2);
        assert_eq!(c.cpu_max(), Some((150_000, 100_000)));
    }
}
