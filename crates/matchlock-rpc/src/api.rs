//! The `create` parameters (Matchlock's `api.Config`, reference §3.6) and their translation into a
//! [`SandboxConfig`]. Unknown fields are tolerated, as the SDKs add fields over time.

use crate::wire::RpcError;
use matchlock_image::{ImageConfig, ImageInfo};
use matchlock_sandbox::{
    validate, volume, DiskMount, SandboxConfig, VfsBlockRule, VfsMode, VfsMount,
};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// `create` params.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct CreateParams {
    /// Image reference (required).
    pub image: String,
    /// Must be absent: ids are assigned by the server.
    pub id: Option<Value>,
    /// Skip the in-guest confinement.
    pub privileged: bool,
    /// Start the image's ENTRYPOINT/CMD in the background after boot.
    pub launch_entrypoint: bool,
    /// A custom kernel (`{"ref": ...}`).
    pub kernel: Option<KernelRef>,
    /// CPU, memory, disk and lifetime.
    pub resources: Option<Resources>,
    /// Network settings.
    pub network: Option<Network>,
    /// Workspace file system settings.
    pub vfs: Option<Vfs>,
    /// Environment of every exec.
    pub env: BTreeMap<String, String>,
    /// Extra ext4 disks.
    pub extra_disks: Vec<ExtraDisk>,
    /// Overrides of the image's runtime config.
    pub image_config: Option<ImageConfigParams>,
}

/// `kernel`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct KernelRef {
    /// OCI reference or `file://` URL.
    #[serde(rename = "ref")]
    pub reference: String,
}

/// `resources`; zero means "default", as in Matchlock.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Resources {
    /// CPU share.
    pub cpus: f64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Writable disk in MiB.
    pub disk_size_mb: u64,
    /// Lifetime limit in seconds (enforced, unlike Matchlock).
    pub timeout_seconds: f64,
}

/// `network`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Network {
    /// Hosts the guest may reach (interception mode).
    pub allowed_hosts: Vec<String>,
    /// Extra `/etc/hosts` entries.
    pub add_hosts: Vec<AddHost>,
    /// Block private address ranges.
    pub block_private_ips: Option<bool>,
    /// No network interface at all.
    pub no_network: bool,
    /// Force interception mode.
    pub intercept: bool,
    /// Interception with an allow-list that allows nothing while empty (hosts are opened with
    /// `allow_list_add`). Without it, an empty allow-list allows every host, as in Matchlock.
    pub deny_by_default: bool,
    /// Refuse WebSocket upgrades through the interception proxy.
    pub disable_websockets: bool,
    /// Hook rules.
    pub interception: Option<NetInterception>,
    /// Secrets by environment variable name.
    pub secrets: BTreeMap<String, Secret>,
    /// Upstream DNS servers.
    pub dns_servers: Vec<String>,
    /// Guest hostname.
    pub hostname: String,
    /// Interface MTU.
    pub mtu: i64,
    /// Addresses opened despite the private-range block (Matchlock fork's field; the CLI's
    /// `--allow-private-host`).
    pub allowed_private_hosts: Vec<String>,
}

/// `network.interception`: hook rules, and where the SDK serves the callback ones.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct NetInterception {
    /// The rules, in order.
    pub rules: Vec<matchlock_intercept::rules::RuleSpec>,
    /// The SDK's callback socket (SDK-internal).
    pub callback_socket: String,
}

impl NetInterception {
    fn socket(&self) -> Option<std::path::PathBuf> {
        Some(self.callback_socket.as_str())
            .filter(|c| !c.is_empty())
            .map(std::path::PathBuf::from)
    }
}

/// One `add_hosts` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct AddHost {
    /// Name.
    pub host: String,
    /// Address.
    pub ip: String,
}

/// One secret. Its value is never logged, stored or echoed in an error.
#[derive(Default, Deserialize)]
#[serde(default)]
pub struct Secret {
    /// The real value (kept on the host).
    pub value: String,
    /// Hosts it may be sent to.
    pub hosts: Vec<String>,
    /// The placeholder the guest sees; random when empty.
    pub placeholder: String,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// `vfs`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Vfs {
    /// Workspace mount point.
    pub workspace: String,
    /// Mounts by guest path.
    pub mounts: BTreeMap<String, Value>,
    /// Interception rules.
    pub interception: Option<Value>,
}

/// One `extra_disks` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ExtraDisk {
    /// The ext4 file, or `@NAME` of a volume.
    pub host_path: String,
    /// Mount point in the guest.
    pub guest_mount: String,
    /// Attach read-only.
    pub readonly: bool,
}

/// `image_config`: overrides of the image's config; non-empty fields win.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct ImageConfigParams {
    /// `USER`.
    pub user: String,
    /// `WORKDIR`.
    pub working_dir: String,
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// `CMD`.
    pub cmd: Vec<String>,
    /// Environment entries added over the image's.
    pub env: BTreeMap<String, String>,
}

/// What `create` settled on, before the image is known.
#[derive(Debug)]
pub struct Plan {
    /// The request, validated.
    pub params: CreateParams,
    /// The guest kernel `kernel.ref` names, checked; matchlock's own when `None`.
    pub kernel: Option<std::path::PathBuf>,
    /// Extra disks, resolved.
    pub disks: Vec<DiskMount>,
    /// Workspace mounts, resolved and ordered parents first.
    pub vfs: Vec<VfsMount>,
    /// Workspace operations to refuse.
    pub vfs_block_rules: Vec<VfsBlockRule>,
    /// Send `event` notifications for completed workspace operations.
    pub vfs_emit_events: bool,
}

/// Parses and validates `create` params, in Matchlock's order: JSON, image, id, resources, network,
/// VFS. Everything that can be checked without the image is checked here.
pub fn plan(params: Value) -> Result<Plan, RpcError> {
    let p: CreateParams = serde_json::from_value(if params.is_null() {
        Value::Object(Default::default())
    } else {
        params
    })
    .map_err(|e| RpcError::params(format!("invalid create params: {e}")))?;
    if p.image.trim().is_empty() {
        return Err(RpcError::params("image is required (e.g., alpine:latest)"));
    }
    if p.id.is_some() {
        return Err(RpcError::params("id is internal-only and cannot be set"));
    }
    let kernel = match &p.kernel {
        Some(k) if !k.reference.trim().is_empty() => Some(
            matchlock_vmm::kernel::resolve_ref(&k.reference)
                .map_err(|e| RpcError::params(format!("kernel.ref: {e}")))?,
        ),
        _ => None,
    };
    let check = |r: Result<(), String>| r.map_err(RpcError::params);
    if let Some(r) = &p.resources {
        if r.cpus != 0.0 {
            check(validate::cpus(r.cpus, "resources.cpus"))?;
        }
        if r.memory_mb != 0 {
            check(validate::memory_mb(r.memory_mb, "resources.memory_mb"))?;
        }
        if r.disk_size_mb != 0 {
            check(validate::disk_size_mb(
                r.disk_size_mb,
                "resources.disk_size_mb",
            ))?;
        }
        if !r.timeout_seconds.is_finite() || r.timeout_seconds < 0.0 {
            return Err(RpcError::params(
                "resources.timeout_seconds must be positive",
            ));
        }
        if r.timeout_seconds > 0.0 {
            check(validate::timeout_secs(
                r.timeout_seconds.ceil() as u64,
                "resources.timeout_seconds",
            ))?;
        }
    }
    if let Some(n) = &p.network {
        check_network(n)?;
    }
    let (vfs, vfs_block_rules, vfs_emit_events) = match &p.vfs {
        Some(v) => check_vfs(v)?,
        None => Default::default(),
    };
    for (k, v) in &p.env {
        check_env(k, v, "env")?;
    }
    if let Some(ic) = &p.image_config {
        if !ic.user.is_empty() {
            check(validate::user(&ic.user, "image_config.user"))?;
        }
        if !ic.working_dir.is_empty() {
            check(validate::guest_path(
                &ic.working_dir,
                "image_config.working_dir",
            ))?;
        }
        for (k, v) in &ic.env {
            check_env(k, v, "image_config.env")?;
        }
    }
    let disks = p
        .extra_disks
        .iter()
        .map(|d| {
            volume::disk(&d.host_path, &d.guest_mount, d.readonly)
                .map_err(|e| RpcError::params(format!("extra_disks: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Plan {
        params: p,
        kernel,
        disks,
        vfs,
        vfs_block_rules,
        vfs_emit_events,
    })
}

fn check_env(k: &str, v: &str, what: &str) -> Result<(), RpcError> {
    if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
        return Err(RpcError::params(format!(
            "{what}: invalid environment variable {k:?}"
        )));
    }
    Ok(())
}

fn check_network(n: &Network) -> Result<(), RpcError> {
    if n.no_network
        && (!n.allowed_hosts.is_empty()
            || !n.secrets.is_empty()
            || n.intercept
            || n.deny_by_default
            || n.disable_websockets
            || n.interception.is_some())
    {
        return Err(RpcError::params(
            "no_network cannot be combined with allowed_hosts, secrets, intercept, deny_by_default, disable_websockets or interception",
        ));
    }
    if !n.hostname.is_empty() {
        validate::hostname(&n.hostname, "network.hostname").map_err(RpcError::params)?;
    }
    if let Some(i) = &n.interception {
        matchlock_intercept::rules::Rules::new(i.rules.clone(), i.socket())
            .map_err(|e| RpcError::params(format!("network.interception: {e}")))?;
    }
    for a in &n.allowed_private_hosts {
        a.parse::<std::net::IpAddr>().map_err(|_| {
            RpcError::params(format!(
                "network.allowed_private_hosts: '{a}' is not an IP address"
            ))
        })?;
    }
    for h in &n.add_hosts {
        validate::add_host(&h.host, &h.ip, "network.add_hosts").map_err(RpcError::params)?;
    }
    for d in &n.dns_servers {
        validate::dns_server(d)
            .map_err(|e| RpcError::params(format!("network.dns_servers: {e}")))?;
    }
    if n.mtu != 0 {
        validate::mtu(u32::try_from(n.mtu).unwrap_or(0), "network.mtu")
            .map_err(RpcError::params)?;
    }
    for (name, s) in &n.secrets {
        check_env(name, "", "network.secrets")?;
        if s.hosts.is_empty() {
            return Err(RpcError::params(format!(
                "network.secrets.{name}: give at least one host the secret may be sent to"
            )));
        }
        if s.value.is_empty() {
            return Err(RpcError::params(format!(
                "network.secrets.{name}: the value is empty"
            )));
        }
    }
    Ok(())
}

/// Checks `vfs` and resolves its mounts (parents first), interception block rules and whether
/// to emit events.
fn check_vfs(v: &Vfs) -> Result<(Vec<VfsMount>, Vec<VfsBlockRule>, bool), RpcError> {
    let has_interception = v.interception.as_ref().is_some_and(|i| !i.is_null());
    // Unlike Matchlock, a workspace without mounts is accepted (the SDK README's own builder
    // example sends one); with nothing to serve it is only checked.
    if !v.workspace.is_empty() {
        validate::guest_path(&v.workspace, "vfs.workspace").map_err(RpcError::params)?;
    }
    if !v.mounts.is_empty() && v.workspace.is_empty() {
        return Err(RpcError::params("vfs.mounts require vfs.workspace"));
    }
    if has_interception && v.mounts.is_empty() {
        return Err(RpcError::params("vfs.interception requires mounts"));
    }
    let (rules, events) = match &v.interception {
        Some(i) if has_interception => interception_rules(i)?,
        _ => Default::default(),
    };
    let mut mounts = Vec::new();
    for (path, spec) in &v.mounts {
        let under = path == &v.workspace
            || path
                .strip_prefix(v.workspace.as_str())
                .is_some_and(|r| r.starts_with('/'));
        if !under {
            return Err(RpcError::params(format!(
                "vfs mount {path} must be the workspace {} or under it",
                v.workspace
            )));
        }
        mounts.push(vfs_mount(path, spec, &v.workspace)?);
    }
    let mounts =
        validate::vfs_mounts(mounts).map_err(|e| RpcError::params(format!("vfs.mounts: {e}")))?;
    Ok((mounts, rules, events))
}

/// `vfs.interception`: `block` rules become [`VfsBlockRule`]s; `allow` rules have no effect (as in
/// Matchlock), and `emit_events` asks for `event` notifications, which is how the SDKs run their
/// after-phase hooks (client-side, on those events). A `block` rule acts before the operation,
/// so an after-phase one is refused rather than silently moved.
fn interception_rules(v: &Value) -> Result<(Vec<VfsBlockRule>, bool), RpcError> {
    let bad = |m: String| RpcError::params(format!("vfs.interception: {m}"));
    let obj = v
        .as_object()
        .ok_or_else(|| bad("must be an object".into()))?;
    let events = obj.get("emit_events").and_then(Value::as_bool) == Some(true);
    let rules = match obj.get("rules") {
        None | Some(Value::Null) => return Ok((Vec::new(), events)),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("rules must be a list".into())),
    };
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let bad = |m: String| RpcError::params(format!("vfs.interception.rules[{i}]: {m}"));
        let r = r
            .as_object()
            .ok_or_else(|| bad("must be an object".into()))?;
        let field = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("");
        let after = match field("phase") {
            "" | "before" => false,
            "after" => true,
            other => return Err(bad(format!("unknown phase '{other}'; use before or after"))),
        };
        match field("action") {
            "" | "allow" => continue,
            "block" if after => {
                return Err(bad(
                    "a block rule refuses the operation before it runs; use phase before (after-phase hooks run in the SDK, on emit_events)"
                        .into(),
                ))
            }
            "block" => {}
            other => return Err(bad(format!("unknown action '{other}'; use block or allow"))),
        }
        let mut ops = Vec::new();
        for op in r.get("ops").and_then(Value::as_array).into_iter().flatten() {
            let name = op.as_str().unwrap_or("");
            let kind = matchlock_vfs::rules::op_kind(name).ok_or_else(|| {
                bad(format!(
                    "unknown op '{name}'; use one of {}",
                    matchlock_vfs::rules::OP_KINDS.join(", ")
                ))
            })?;
            ops.push(kind.to_string());
        }
        let path = field("path");
        if path.len() > 4096 || path.contains('\0') {
            return Err(bad("path is not a valid glob".into()));
        }
        out.push(VfsBlockRule {
            ops,
            path: path.to_string(),
        });
    }
    Ok((out, events))
}

/// One `vfs.mounts` entry: `{"type": "host_fs"|"overlay"|"memory", "host_path", "readonly"}`.
fn vfs_mount(path: &str, spec: &Value, workspace: &str) -> Result<VfsMount, RpcError> {
    let what = format!("vfs.mounts[{path}]");
    let bad = |m: String| RpcError::params(format!("{what}: {m}"));
    let obj = spec
        .as_object()
        .ok_or_else(|| bad("must be an object".into()))?;
    let kind = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let host = obj.get("host_path").and_then(Value::as_str).unwrap_or("");
    let readonly = obj
        .get("readonly")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let id = |k: &str| -> Result<Option<u32>, RpcError> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| bad(format!("{k} must be a number from 0 to 4294967295"))),
        }
    };
    let (owner_uid, owner_gid) = (id("owner_uid")?, id("owner_gid")?);
    let mode = match (kind, readonly) {
        ("host_fs", false) => VfsMode::HostFs,
        ("host_fs", true) => VfsMode::ReadOnly,
        ("overlay", _) => VfsMode::Overlay,
        ("memory", _) => {
            validate::guest_path(path, &what).map_err(RpcError::params)?;
            if owner_uid.is_some() || owner_gid.is_some() {
                return Err(bad(
                    "owner_uid/owner_gid apply to host directories, not memory mounts".into(),
                ));
            }
            return Ok(VfsMount {
                host_path: Default::default(),
                guest_path: path.to_string(),
                mode: VfsMode::Memory,
                owner_uid: None,
                owner_gid: None,
            });
        }
        (other, _) => {
            return Err(bad(format!(
                "unknown type '{other}'; use host_fs, overlay or memory"
            )))
        }
    };
    if host.is_empty() {
        return Err(bad("host_path is required".into()));
    }
    let mut m = validate::vfs_mount_parts(host, path, mode, workspace).map_err(bad)?;
    m.owner_uid = owner_uid;
    m.owner_gid = owner_gid;
    Ok(m)
}

/// The network from the `network` params: open mode, or interception when an allow-list, secrets,
/// hook rules or `intercept` are given.
fn network_config(
    net: Option<&Network>,
    secrets: Vec<matchlock_sandbox::SecretSpec>,
) -> Option<matchlock_sandbox::NetworkConfig> {
    let Some(n) = net else {
        return Some(matchlock_sandbox::NetworkConfig::default());
    };
    if n.no_network {
        return None;
    }
    let interception = n.interception.as_ref();
    let intercept = (n.intercept
        || n.deny_by_default
        || n.disable_websockets
        || !n.allowed_hosts.is_empty()
        || !secrets.is_empty()
        || interception.is_some())
    .then(|| matchlock_sandbox::InterceptConfig {
        allowed_hosts: n.allowed_hosts.clone(),
        deny_by_default: n.deny_by_default,
        disable_websockets: n.disable_websockets,
        secrets,
        rules: interception.map(|i| i.rules.clone()).unwrap_or_default(),
        callback_socket: interception.and_then(NetInterception::socket),
        ..Default::default()
    });
    Some(matchlock_sandbox::NetworkConfig {
        mtu: if n.mtu > 0 { n.mtu as u16 } else { 1500 },
        dns_servers: n.dns_servers.clone(),
        allow_private_hosts: private_hosts(n),
        allow_private_ranges: n.block_private_ips == Some(false),
        intercept,
    })
}

/// Addresses opened despite the private-range block: the fork's `allowed_private_hosts`, and, when
/// the caller turned private-IP blocking off, the addresses it mapped names to with `add_hosts`
/// (the SDKs have no other way to reach a service on the host's loopback).
fn private_hosts(n: &Network) -> Vec<String> {
    let mut out = n.allowed_private_hosts.clone();
    if n.block_private_ips == Some(false) {
        out.extend(n.add_hosts.iter().map(|h| h.ip.clone()));
    }
    out
}

/// The secret values of `plan`, for [`matchlock_sandbox::start_with_secrets`].
pub fn secret_values(plan: &Plan) -> Vec<(String, String)> {
    plan.params
        .network
        .as_ref()
        .map(|n| {
            n.secrets
                .iter()
                .map(|(k, s)| (k.clone(), s.value.clone()))
                .collect()
        })
        .unwrap_or_default()
}

/// The sandbox configuration for `plan` on `image`, plus the command `launch_entrypoint` runs
/// (`None` when not asked for or the image has none).
pub fn sandbox_config(
    plan: &Plan,
    image: &ImageInfo,
) -> Result<(SandboxConfig, Option<Vec<String>>), RpcError> {
    let p = &plan.params;
    let mut cfg: ImageConfig = image.config.clone();
    let mut user_env: Vec<(String, String)> = Vec::new();
    if let Some(ic) = &p.image_config {
        if !ic.user.is_empty() {
            cfg.user = Some(ic.user.clone());
        }
        if !ic.working_dir.is_empty() {
            cfg.working_dir = Some(ic.working_dir.clone());
        }
        if !ic.entrypoint.is_empty() {
            cfg.entrypoint = Some(ic.entrypoint.clone());
            // As with `docker run --entrypoint`, a new entrypoint drops the image's CMD.
            if ic.cmd.is_empty() {
                cfg.cmd = None;
            }
        }
        if !ic.cmd.is_empty() {
            cfg.cmd = Some(ic.cmd.clone());
        }
        user_env.extend(ic.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    user_env.extend(p.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let net = p.network.as_ref();
    let mut specs = Vec::new();
    if let Some(n) = net {
        for (name, s) in &n.secrets {
            let ph = if s.placeholder.is_empty() {
                matchlock_intercept::secrets::placeholder()
            } else {
                s.placeholder.clone()
            };
            user_env.push((name.clone(), ph.clone()));
            specs.push(matchlock_sandbox::SecretSpec {
                name: name.clone(),
                hosts: s.hosts.clone(),
                placeholder: ph,
            });
        }
    }
    let network = network_config(net, specs);
    if network.as_ref().is_some_and(|n| n.intercept.is_some()) {
        // The caller's own settings still win.
        let mut env = matchlock_sandbox::config::ca_env();
        env.append(&mut user_env);
        user_env = env;
    }
    let res = p.resources.as_ref();
    let launch = if p.launch_entrypoint {
        matchlock_image::compose_command(&cfg, None, &[]).ok()
    } else {
        None
    };
    let config = SandboxConfig {
        image: image.name.clone(),
        image_digest: image.digest.clone(),
        rootfs: image.rootfs.clone(),
        kernel: plan.kernel.clone(),
        hostname: net.map(|n| n.hostname.clone()).unwrap_or_default(),
        cpus: res.map(|r| r.cpus).filter(|c| *c > 0.0).unwrap_or(1.0),
        memory_mb: res.map(|r| r.memory_mb).filter(|m| *m > 0).unwrap_or(512),
        disk_size_mb: res
            .map(|r| r.disk_size_mb)
            .filter(|d| *d > 0)
            .unwrap_or(5120),
        env: matchlock_image::merge_env(&cfg.env, &user_env),
        workdir: cfg.working_dir.clone().filter(|w| !w.is_empty()),
        user: cfg.user.clone().filter(|u| !u.is_empty()),
        privileged: p.privileged,
        graceful_shutdown_ms: 0,
        timeout_secs: res
            .map(|r| r.timeout_seconds)
            .filter(|t| *t > 0.0)
            .map(|t| t.ceil() as u64),
        remove_on_stop: false,
        add_hosts: net
            .map(|n| {
                n.add_hosts
                    .iter()
                    .filter_map(|h| {
                        validate::add_host(&h.host, &h.ip, "")
                            .ok()
                            .map(|ip| (ip, h.host.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default(),
        disks: plan.disks.clone(),
        vfs: plan.vfs.clone(),
        vfs_block_rules: plan.vfs_block_rules.clone(),
        vfs_emit_events: plan.vfs_emit_events,
        network,
        owner_pid: Some(std::process::id()),
        command: launch.clone().unwrap_or_default(),
        ..Default::default()
    };
    Ok((config, launch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image() -> ImageInfo {
        ImageInfo {
            name: "docker.io/library/alpine:latest".into(),
            digest: "sha256:00".into(),
            rootfs: "/x.ext4".into(),
            size: 1,
            created: None,
            config: ImageConfig {
                env: vec!["PATH=/bin".into(), "A=image".into()],
                entrypoint: Some(vec!["/entry".into()]),
                cmd: Some(vec!["serve".into()]),
                working_dir: Some("/app".into()),
                user: None,
            },
        }
    }

    #[test]
    fn validation_order_and_messages() {
        let err = |v: Value| plan(v).unwrap_err();
        assert_eq!(
            err(json!({})).message,
            "image is required (e.g., alpine:latest)"
        );
        assert_eq!(
            err(json!({"image": "a", "id": "vm-1"})).message,
            "id is internal-only and cannot be set"
        );
        assert_eq!(
            err(json!({"image": 5})).code,
            crate::wire::code::INVALID_PARAMS
        );
        assert!(err(json!({"image": "a", "resources": {"cpus": 100}}))
            .message
            .contains("resources.cpus"));
        assert!(err(
            json!({"image": "a", "network": {"no_network": true, "allowed_hosts": ["x"]}})
        )
        .message
        .contains("no_network"));
        assert!(plan(json!({"image": "a", "vfs": {"workspace": "/w"}})).is_ok());
        assert!(err(json!({"image": "a", "vfs": {"workspace": "w"}}))
            .message
            .contains("absolute"));
        assert!(err(json!({"image": "a", "vfs": {"workspace": "/w", "mounts": {"/etc": {"type": "memory"}}}}))
            .message
            .contains("under it"));
        let d = tempfile::tempdir().unwrap();
        let host = d.path().to_str().unwrap();
        let p = plan(json!({"image": "a", "vfs": {"workspace": "/w", "mounts": {
            "/w/src": {"type": "host_fs", "host_path": host},
            "/w": {"type": "memory"},
            "/w/ro": {"type": "host_fs", "host_path": host, "readonly": true},
            "/w/snap": {"type": "overlay", "host_path": host}}}}))
        .unwrap();
        let modes: Vec<_> = p
            .vfs
            .iter()
            .map(|m| (m.guest_path.as_str(), m.mode))
            .collect();
        assert_eq!(
            modes,
            [
                ("/w", VfsMode::Memory),
                ("/w/ro", VfsMode::ReadOnly),
                ("/w/snap", VfsMode::Overlay),
                ("/w/src", VfsMode::HostFs)
            ]
        );
        for (spec, needle) in [
            (json!({"type": "host_fs"}), "host_path is required"),
            (json!({"type": "nfs", "host_path": host}), "unknown type"),
            (
                json!({"type": "host_fs", "host_path": "/nonexistent/x"}),
                "host path",
            ),
            (
                json!({"type": "host_fs", "host_path": host, "owner_uid": -1}),
                "owner_uid must be a number",
            ),
            (
                json!({"type": "memory", "owner_gid": 5}),
                "not memory mounts",
            ),
        ] {
            let e =
                err(json!({"image": "a", "vfs": {"workspace": "/w", "mounts": {"/w/x": spec}}}));
            assert!(e.message.contains(needle), "{}", e.message);
        }
        let owned = plan(json!({"image": "a", "vfs": {"workspace": "/w", "mounts": {
            "/w/x": {"type": "host_fs", "host_path": host, "owner_uid": 1000, "owner_gid": 100}}}}))
        .unwrap();
        assert_eq!(
            (owned.vfs[0].owner_uid, owned.vfs[0].owner_gid),
            (Some(1000), Some(100))
        );
        let with_rules = |rules: Value, events: bool| {
            plan(json!({"image": "a", "vfs": {"workspace": "/w",
                "mounts": {"/w": {"type": "memory"}},
                "interception": {"emit_events": events, "rules": rules}}}))
        };
        let p = with_rules(
            json!([
                {"name": "no-env", "action": "block", "ops": ["read", "read_dir"], "path": "/w/*.env"},
                {"action": "allow", "ops": ["write"]},
                {"phase": "before", "action": "block"}
            ]),
            false,
        )
        .unwrap();
        assert_eq!(
            p.vfs_block_rules,
            [
                VfsBlockRule {
                    ops: vec!["read".into(), "readdir".into()],
                    path: "/w/*.env".into()
                },
                VfsBlockRule {
                    ops: vec![],
                    path: "".into()
                }
            ]
        );
        // Events, and after-phase allow rules (which the SDK's hooks never send, and which do
        // nothing), are accepted.
        let p = with_rules(json!([{"action": "allow", "phase": "after"}]), true).unwrap();
        assert!(p.vfs_emit_events && p.vfs_block_rules.is_empty());
        for (rules, events, needle) in [
            (
                json!([{"action": "block", "phase": "after"}]),
                false,
                "use phase before",
            ),
            (
                json!([{"action": "block", "ops": ["explode"]}]),
                false,
                "unknown op",
            ),
            (json!([{"action": "mutate_write"}]), false, "unknown action"),
        ] {
            let e = with_rules(rules, events).unwrap_err();
            assert!(e.message.contains(needle), "{}", e.message);
        }
        // Unknown fields are fine.
        assert!(
            plan(json!({"image": "a", "future_field": 1, "network": {"policy_script": ""}}))
                .is_ok()
        );
    }

    #[test]
    fn secret_values_never_reach_the_config() {
        let p = plan(json!({"image": "a", "network": {"secrets": {
            "API_KEY": {"value": "sk-real-123", "hosts": ["api.example.com"]},
            "OTHER": {"value": "v2", "hosts": ["x"], "placeholder": "PH"}
        }}}))
        .unwrap();
        let (cfg, _) = sandbox_config(&p, &image()).unwrap();
        let text = serde_json::to_string(&cfg).unwrap();
        assert!(!text.contains("sk-real-123"));
        let key = cfg.env.iter().find(|(k, _)| k == "API_KEY").unwrap();
        assert!(key.1.starts_with("SANDBOX_SECRET_"));
        assert!(cfg.env.contains(&("OTHER".into(), "PH".into())));
        assert!(!format!("{p:?}").contains("sk-real-123"));
    }

    #[test]
    fn merges_image_config_and_resources() {
        let p = plan(json!({"image": "a", "launch_entrypoint": true,
            "resources": {"cpus": 0.5, "memory_mb": 256, "timeout_seconds": 30},
            "env": {"A": "user"},
            "image_config": {"cmd": ["run", "fast"], "user": "1000:1000"}}))
        .unwrap();
        let (cfg, launch) = sandbox_config(&p, &image()).unwrap();
        assert_eq!(launch.unwrap(), vec!["/entry", "run", "fast"]);
        assert_eq!(cfg.cpus, 0.5);
        assert_eq!(cfg.memory_mb, 256);
        assert_eq!(cfg.disk_size_mb, 5120);
        assert_eq!(cfg.timeout_secs, Some(30));
        assert_eq!(cfg.user.as_deref(), Some("1000:1000"));
        assert_eq!(cfg.workdir.as_deref(), Some("/app"));
        assert!(cfg.env.contains(&("A".into(), "user".into())));
        let p = plan(json!({"image": "a"})).unwrap();
        let (cfg, launch) = sandbox_config(&p, &image()).unwrap();
        assert!(launch.is_none());
        assert_eq!(cfg.timeout_secs, None);
        assert_eq!(cfg.owner_pid, Some(std::process::id()));
    }
}
