//! The JSON shapes of the Matchlock SDKs' wire protocol that more than one crate needs: the
//! network hook rules of `create` (`network.interception.rules`), as the SDKs send them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A callback's deadline when its rule gives none (`timeout_ms` 0).
pub const DEFAULT_CALLBACK_TIMEOUT_MS: u64 = 30_000;

/// One rule as the SDKs send it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RuleSpec {
    /// Optional name, used in refusals.
    pub name: String,
    /// `before` (default) or `after`.
    pub phase: String,
    /// Host globs; empty matches every host.
    pub hosts: Vec<String>,
    /// Methods; empty matches every method.
    pub methods: Vec<String>,
    /// URL path glob (`*` stays within one segment); empty matches every path.
    pub path: String,
    /// `allow` (default), `block` or `mutate`.
    pub action: String,
    /// Request headers to set.
    pub set_headers: BTreeMap<String, String>,
    /// Request headers to delete.
    pub delete_headers: Vec<String>,
    /// Query keys to set.
    pub set_query: BTreeMap<String, String>,
    /// Query keys to delete.
    pub delete_query: Vec<String>,
    /// New request path.
    pub rewrite_path: String,
    /// Response headers to set.
    pub set_response_headers: BTreeMap<String, String>,
    /// Response headers to delete.
    pub delete_response_headers: Vec<String>,
    /// Literal response body replacements.
    pub body_replacements: Vec<BodyReplacement>,
    /// The SDK callback to call, if any.
    pub callback_id: String,
    /// Deadline of the callback in milliseconds (0: [`DEFAULT_CALLBACK_TIMEOUT_MS`]).
    pub timeout_ms: u64,
}

/// A literal body replacement.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct BodyReplacement {
    /// Text to find.
    pub find: String,
    /// Replacement.
    pub replace: String,
}

/// `create`'s parameters: Matchlock's `api.Config` (its reference §3.6), as the Python, Go and
/// TypeScript SDKs and the Rust SDK send it. Unknown fields are accepted (the SDKs add fields over
/// time); absent ones take their defaults. [`CreateParams::into_request`] checks it.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct CreateParams {
    /// Image reference (required).
    pub image: String,
    /// Must be absent: ids are assigned by the server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<serde_json::Value>,
    /// Skip the in-guest confinement.
    #[serde(skip_serializing_if = "is_false")]
    pub privileged: bool,
    /// Boot cold: never start from a template snapshot (matchlock's own extension).
    #[serde(skip_serializing_if = "is_false")]
    pub no_snapshot: bool,
    /// Pause after this many seconds without a request; the next one resumes it (matchlock's
    /// own extension).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_pause_seconds: Option<u64>,
    /// Start the image's ENTRYPOINT/CMD in the background after boot.
    #[serde(skip_serializing_if = "is_false")]
    pub launch_entrypoint: bool,
    /// Another guest kernel (`{"ref": path or file:// URL}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelRef>,
    /// CPU, memory, disk and lifetime.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Network settings; absent: the default network (no interception).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<Network>,
    /// Workspace filesystem.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vfs: Option<Vfs>,
    /// Environment of every exec.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Extra ext4 disks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra_disks: Vec<ExtraDisk>,
    /// Overrides of the image's runtime config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_config: Option<ImageConfigParams>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// `kernel`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct KernelRef {
    /// A `vmlinux` path or `file://` URL.
    #[serde(rename = "ref")]
    pub reference: String,
}

/// `resources`; zero means the default, as in Matchlock.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// CPUs.
    #[serde(skip_serializing_if = "is_zero")]
    pub cpus: f64,
    /// Memory in MiB.
    #[serde(skip_serializing_if = "is_zero")]
    pub memory_mb: u64,
    /// Writable disk in MiB.
    #[serde(skip_serializing_if = "is_zero")]
    pub disk_size_mb: u64,
    /// Lifetime limit in seconds (enforced, unlike Matchlock).
    #[serde(skip_serializing_if = "is_zero")]
    pub timeout_seconds: f64,
}

/// `network`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Network {
    /// Hosts the guest may reach (interception mode); empty allows every host unless
    /// `deny_by_default`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
    /// Extra `/etc/hosts` entries.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub add_hosts: Vec<AddHost>,
    /// Block private address ranges (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_private_ips: Option<bool>,
    /// No network interface at all.
    #[serde(skip_serializing_if = "is_false")]
    pub no_network: bool,
    /// Force interception.
    #[serde(skip_serializing_if = "is_false")]
    pub intercept: bool,
    /// Interception with nothing allowed until hosts are added.
    #[serde(skip_serializing_if = "is_false")]
    pub deny_by_default: bool,
    /// Refuse WebSocket upgrades through the proxy.
    #[serde(skip_serializing_if = "is_false")]
    pub disable_websockets: bool,
    /// Hook rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interception: Option<NetInterception>,
    /// Secrets by environment variable name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, Secret>,
    /// Upstream DNS servers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<String>,
    /// `trusted` (the default), `synthetic` or `open` (see [`crate::config::DnsMode`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_mode: Option<String>,
    /// Guest hostname.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hostname: String,
    /// Interface MTU.
    #[serde(skip_serializing_if = "is_zero")]
    pub mtu: i64,
    /// Addresses opened despite the private-range block (the CLI's `--allow-private-host`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_private_hosts: Vec<String>,
    /// Network plugins (`local_model_router`, `usage_logger`, `budget_gate`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<crate::plugins::PluginSpec>,
    /// SSH egress through the host (Matchlock-rs only): `allow`, `known_hosts` (default
    /// `~/.ssh/known_hosts`), `agent_socket` (default `$SSH_AUTH_SOCK`) or `key_file`,
    /// `exec_rules`, `allow_unknown_host_keys`, `max_sessions`, `max_connections`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_egress: Option<crate::config::SshEgressConfig>,
    /// Follow HTTP redirects on the host within the allow-list (Matchlock-rs only).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub follow_redirects: bool,
}

/// `network.interception`: hook rules, and where the SDK serves the callback ones.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct NetInterception {
    /// The rules, in order.
    pub rules: Vec<RuleSpec>,
    /// The SDK's callback socket (SDK-internal).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub callback_socket: String,
}

/// One `add_hosts` entry.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct AddHost {
    /// Name.
    pub host: String,
    /// Address.
    pub ip: String,
}

/// One secret. Its value is never logged, stored or echoed in an error.
#[derive(Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Secret {
    /// The real value (kept on the host).
    pub value: String,
    /// Hosts it may be sent to.
    pub hosts: Vec<String>,
    /// The placeholder the guest sees; random when empty.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub placeholder: String,
    /// The value may also be injected into plain HTTP requests, where it travels in clear text
    /// (refused otherwise). A matchlock extension.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_http: bool,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// `vfs`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Vfs {
    /// Workspace mount point.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub workspace: String,
    /// Mounts by guest path.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub mounts: BTreeMap<String, VfsMountSpec>,
    /// Interception rules and events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interception: Option<VfsInterception>,
}

/// One `vfs.mounts` entry.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VfsMountSpec {
    /// `host_fs`, `overlay` or `memory`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The host directory or file (not for `memory`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub host_path: String,
    /// A read-only `host_fs` mount.
    #[serde(skip_serializing_if = "is_false")]
    pub readonly: bool,
    /// The uid every file shows in the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_uid: Option<i64>,
    /// The gid every file shows in the guest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_gid: Option<i64>,
}

/// `vfs.interception`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VfsInterception {
    /// Send `event` notifications for completed operations (the SDKs' after-hooks).
    #[serde(skip_serializing_if = "is_false")]
    pub emit_events: bool,
    /// Rules; only `block` ones act on the host.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<VfsRuleSpec>,
}

/// One `vfs.interception.rules` entry.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct VfsRuleSpec {
    /// Name, for messages.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// `before` (default) or `after`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub phase: String,
    /// Operation kinds; empty: all.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ops: Vec<String>,
    /// Guest path glob; empty: all.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// `allow` (default) or `block`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub action: String,
    /// Accepted and ignored (SDK-side hooks).
    #[serde(skip_serializing_if = "is_zero")]
    pub timeout_ms: u64,
}

/// One `extra_disks` entry.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ExtraDisk {
    /// The ext4 file, or `@NAME` of a volume.
    pub host_path: String,
    /// Mount point in the guest.
    pub guest_mount: String,
    /// Attach read-only.
    #[serde(skip_serializing_if = "is_false")]
    pub readonly: bool,
}

/// `image_config`: overrides of the image's config; non-empty fields win.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageConfigParams {
    /// `USER`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// `WORKDIR`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// `ENTRYPOINT`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// `CMD`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// Environment entries added over the image's.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
}
