//! `create`'s JSON into a [`SandboxRequest`], checked in Matchlock's order (JSON, image, id,
//! resources, network, VFS) with the field names the SDKs' users know.

use crate::config::{op_kind, VfsBlockRule, VfsMode, VfsMount, OP_KINDS};
use crate::hosts::HostPattern;
use crate::request::*;
use crate::validate;
use crate::wire::*;

/// Checks and converts a field's error.
fn field<T>(r: std::result::Result<T, String>) -> Result<T> {
    r.map_err(RequestError)
}

impl CreateParams {
    /// The request these parameters make, or why they are refused.
    pub fn into_request(self) -> Result<SandboxRequest> {
        let mut req = SandboxRequest::new(&self.image)?;
        if self.id.is_some() {
            return Err(RequestError("id is internal-only and cannot be set".into()));
        }
        req.kernel = self
            .kernel
            .map(|k| k.reference)
            .filter(|r| !r.trim().is_empty());
        req.privileged = self.privileged;
        req.no_snapshot = self.no_snapshot;
        if self.idle_pause_seconds == Some(0) {
            return Err(RequestError("idle_pause_seconds must be at least 1".into()));
        }
        req.idle_pause_secs = self.idle_pause_seconds;
        req.start = if self.launch_entrypoint {
            Start::Entrypoint
        } else {
            Start::Nothing
        };
        if let Some(r) = &self.resources {
            if r.cpus != 0.0 {
                req.resources.cpus = Some(Cpus::new(r.cpus, "resources.cpus")?);
            }
            if r.memory_mb != 0 {
                req.resources.memory = Some(MemoryMb::new(r.memory_mb, "resources.memory_mb")?);
            }
            if r.disk_size_mb != 0 {
                req.resources.disk =
                    Some(DiskSizeMb::new(r.disk_size_mb, "resources.disk_size_mb")?);
            }
            if !r.timeout_seconds.is_finite() || r.timeout_seconds < 0.0 {
                return Err(RequestError(
                    "resources.timeout_seconds must be positive".into(),
                ));
            }
            if r.timeout_seconds > 0.0 {
                req.timeout = Some(TimeoutSecs::new(
                    r.timeout_seconds.ceil() as u64,
                    "resources.timeout_seconds",
                )?);
            }
        }
        if let Some(n) = self.network {
            network(&mut req, n)?;
        }
        if let Some(v) = self.vfs {
            req.workspace = workspace(v)?;
        }
        for (k, v) in &self.env {
            env_name(k, "env")?;
            check_value(k, v, "env")?;
            req.process.env.push((k.clone(), v.clone()));
        }
        if let Some(ic) = self.image_config {
            if !ic.user.is_empty() {
                req.process.user = Some(User::new(&ic.user, "image_config.user")?);
            }
            if !ic.working_dir.is_empty() {
                req.process.workdir =
                    Some(GuestPath::new(&ic.working_dir, "image_config.working_dir")?);
            }
            if !ic.entrypoint.is_empty() {
                req.process.entrypoint = Some(ic.entrypoint);
            }
            req.process.cmd = ic.cmd;
            // The image config's environment comes first; `env` wins over it.
            let mut env = Vec::new();
            for (k, v) in &ic.env {
                env_name(k, "image_config.env")?;
                check_value(k, v, "image_config.env")?;
                env.push((k.clone(), v.clone()));
            }
            env.append(&mut req.process.env);
            req.process.env = env;
        }
        for d in &self.extra_disks {
            req.disks.push(
                DiskRequest::new(&d.host_path, &d.guest_mount, d.readonly, "extra_disks")
                    .map_err(|e| RequestError(format!("extra_disks: {e}")))?,
            );
        }
        Ok(req)
    }
}

fn check_value(k: &str, v: &str, what: &str) -> Result<()> {
    if v.contains('\0') {
        return Err(RequestError(format!(
            "{what}: invalid environment variable {k:?}"
        )));
    }
    Ok(())
}

fn network(req: &mut SandboxRequest, n: Network) -> Result<()> {
    if n.no_network
        && (!n.allowed_hosts.is_empty()
            || !n.secrets.is_empty()
            || n.intercept
            || n.deny_by_default
            || n.disable_websockets
            || n.interception.is_some()
            || !n.plugins.is_empty()
            || n.ssh_egress.is_some()
            || n.follow_redirects)
    {
        return Err(RequestError(
            "no_network cannot be combined with allowed_hosts, secrets, intercept, deny_by_default, disable_websockets, interception, plugins, ssh_egress or follow_redirects".into(),
        ));
    }
    if !n.hostname.is_empty() {
        req.hostname = Some(Hostname::new(&n.hostname, "network.hostname")?);
    }
    for h in &n.add_hosts {
        let ip = field(validate::add_host(&h.host, &h.ip, "network.add_hosts"))?;
        req.add_hosts.push((ip, h.host.clone()));
    }
    if n.no_network {
        if n.dns_mode.is_some() {
            return field(Err(
                "network.dns_mode cannot be combined with network.no_network".to_string(),
            ));
        }
        req.network = None;
        return Ok(());
    }
    let mut net = NetworkRequest::default();
    for d in &n.dns_servers {
        field(validate::dns_server(d).map_err(|e| format!("network.dns_servers: {e}")))?;
        net.dns_servers.push(d.clone());
    }
    if let Some(mode) = &n.dns_mode {
        net.dns_mode = field(mode.parse().map_err(|e| format!("network.dns_mode: {e}")))?;
    }
    if n.mtu != 0 {
        let mtu = u32::try_from(n.mtu).unwrap_or(0);
        field(validate::mtu(mtu, "network.mtu"))?;
        net.mtu = Some(mtu as u16);
    }
    for a in &n.allowed_private_hosts {
        net.allow_private_hosts
            .push(ip(a, "network.allowed_private_hosts")?);
    }
    net.allow_private_ranges = n.block_private_ips == Some(false);
    if net.allow_private_ranges {
        // With the block off, the SDKs' only way to reach a service on the host's loopback is
        // an `add_hosts` name for it: open those addresses too.
        for h in &n.add_hosts {
            net.allow_private_hosts
                .push(ip(&h.ip, "network.add_hosts")?);
        }
    }
    let i = &mut net.intercept;
    i.force = n.intercept;
    i.deny_by_default = n.deny_by_default;
    i.disable_websockets = n.disable_websockets;
    for h in n
        .allowed_hosts
        .iter()
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
    {
        i.allowed_hosts.push(
            HostPattern::parse(h)
                .map_err(|e| RequestError(format!("network.allowed_hosts: {e}")))?,
        );
    }
    for (name, s) in n.secrets {
        let what = format!("network.secrets.{name}");
        let value = SecretValue::new(s.value, &what)?;
        let placeholder = Some(s.placeholder).filter(|p| !p.is_empty());
        let mut secret = SecretRequest::new(&name, value, &s.hosts, placeholder, &what)?;
        secret.allow_http = s.allow_http;
        i.secrets.push(secret);
    }
    i.plugins = field(crate::plugins::PluginsConfig::from_specs(
        &n.plugins,
        "network.plugins",
    ))?;
    i.follow_redirects = n.follow_redirects;
    if let Some(mut e) = n.ssh_egress {
        // The defaults `ssh` itself would use, from the server's (the SDK's) environment.
        if e.known_hosts.as_os_str().is_empty() {
            if let Some(home) = std::env::var_os("HOME") {
                e.known_hosts = std::path::PathBuf::from(home).join(".ssh/known_hosts");
            }
        }
        if e.agent_socket.is_none() && e.key_file.is_none() {
            e.agent_socket = std::env::var_os("SSH_AUTH_SOCK")
                .filter(|s| !s.is_empty())
                .map(std::path::PathBuf::from);
        }
        i.ssh_egress = Some(e);
    }
    field(i.plugins.check())?;
    for p in [
        i.plugins.usage_logger.as_ref().map(|u| &u.path),
        i.plugins
            .usage_logger
            .as_ref()
            .and_then(|u| u.price_file.as_ref()),
    ]
    .into_iter()
    .flatten()
    {
        if !p.is_absolute() {
            return Err(RequestError(format!(
                "network.plugins: {} must be an absolute path (the server's working directory is not the caller's)",
                p.display()
            )));
        }
    }
    if let Some(ic) = n.interception {
        i.rules = ic.rules;
        i.callback_socket = Some(ic.callback_socket)
            .filter(|c| !c.is_empty())
            .map(Into::into);
        // Checked here so a bad rule fails `create`, not the boot.
        check_rules(&i.rules, i.callback_socket.is_some())?;
        // Interception rules (even none) ask for interception, as in Matchlock.
        i.force = true;
    }
    req.network = Some(net);
    Ok(())
}

/// The shape checks of hook rules: phases, actions, callbacks with a socket, host patterns.
pub fn check_rules(rules: &[RuleSpec], have_socket: bool) -> Result<()> {
    for r in rules {
        let bad = |m: String| RequestError(format!("network.interception: rule {:?}: {m}", r.name));
        match r.phase.trim().to_ascii_lowercase().as_str() {
            "" | "before" | "after" => {}
            other => return Err(bad(format!("unknown phase {other:?}"))),
        }
        match r.action.trim().to_ascii_lowercase().as_str() {
            "" | "allow" | "block" | "mutate" => {}
            other => return Err(bad(format!("unknown action {other:?}"))),
        }
        if !r.callback_id.is_empty() && !have_socket {
            return Err(bad("has a callback but no callback_socket".into()));
        }
        for h in &r.hosts {
            HostPattern::parse(h).map_err(bad)?;
        }
    }
    Ok(())
}

/// `vfs`: the mounts (parents first), block rules and events.
fn workspace(v: Vfs) -> Result<WorkspaceRequest> {
    let interception = v.interception.unwrap_or_default();
    let has_interception = interception.emit_events || !interception.rules.is_empty();
    // Unlike Matchlock, a workspace without mounts is accepted (the SDK README's own builder
    // example sends one); with nothing to serve it is only checked.
    if !v.workspace.is_empty() {
        field(validate::guest_path(&v.workspace, "vfs.workspace"))?;
    }
    if !v.mounts.is_empty() && v.workspace.is_empty() {
        return Err(RequestError("vfs.mounts require vfs.workspace".into()));
    }
    if has_interception && v.mounts.is_empty() {
        return Err(RequestError("vfs.interception requires mounts".into()));
    }
    let mut mounts = Vec::new();
    for (path, spec) in &v.mounts {
        let under = path == &v.workspace
            || path
                .strip_prefix(v.workspace.as_str())
                .is_some_and(|r| r.starts_with('/'));
        if !under {
            return Err(RequestError(format!(
                "vfs mount {path} must be the workspace {} or under it",
                v.workspace
            )));
        }
        mounts.push(mount(path, spec, &v.workspace)?);
    }
    Ok(WorkspaceRequest {
        mounts: field(validate::vfs_mounts(mounts).map_err(|e| format!("vfs.mounts: {e}")))?,
        block_rules: vfs_rules(&interception.rules)?,
        emit_events: interception.emit_events,
    })
}

/// `block` rules become [`VfsBlockRule`]s; `allow` rules have no effect (as in Matchlock). A
/// `block` rule acts before the operation, so an after-phase one is refused rather than moved.
fn vfs_rules(rules: &[VfsRuleSpec]) -> Result<Vec<VfsBlockRule>> {
    let mut out = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let bad = |m: String| RequestError(format!("vfs.interception.rules[{i}]: {m}"));
        let after = match r.phase.as_str() {
            "" | "before" => false,
            "after" => true,
            other => return Err(bad(format!("unknown phase '{other}'; use before or after"))),
        };
        match r.action.as_str() {
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
        for name in &r.ops {
            let kind = op_kind(name).ok_or_else(|| {
                bad(format!(
                    "unknown op '{name}'; use one of {}",
                    OP_KINDS.join(", ")
                ))
            })?;
            ops.push(kind.to_string());
        }
        if r.path.len() > 4096 || r.path.contains('\0') {
            return Err(bad("path is not a valid glob".into()));
        }
        out.push(VfsBlockRule {
            ops,
            path: r.path.clone(),
        });
    }
    Ok(out)
}

/// One `vfs.mounts` entry: `{"type": "host_fs"|"overlay"|"memory", "host_path", "readonly"}`.
fn mount(path: &str, spec: &VfsMountSpec, workspace: &str) -> Result<VfsMount> {
    let what = format!("vfs.mounts[{path}]");
    let bad = |m: String| RequestError(format!("{what}: {m}"));
    let id = |k: &str, v: Option<i64>| -> Result<Option<u32>> {
        v.map(|n| {
            u32::try_from(n).map_err(|_| bad(format!("{k} must be a number from 0 to 4294967295")))
        })
        .transpose()
    };
    let (owner_uid, owner_gid) = (
        id("owner_uid", spec.owner_uid)?,
        id("owner_gid", spec.owner_gid)?,
    );
    let mode = match (spec.kind.as_str(), spec.readonly) {
        ("host_fs", false) => VfsMode::HostFs,
        ("host_fs", true) => VfsMode::ReadOnly,
        ("overlay", _) => VfsMode::Overlay,
        ("memory", _) => {
            field(validate::guest_path(path, &what))?;
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
    if spec.host_path.is_empty() {
        return Err(bad("host_path is required".into()));
    }
    let mut m = validate::vfs_mount_parts(&spec.host_path, path, mode, workspace).map_err(bad)?;
    m.owner_uid = owner_uid;
    m.owner_gid = owner_gid;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn req(v: Value) -> Result<SandboxRequest> {
        serde_json::from_value::<CreateParams>(v)
            .map_err(|e| RequestError(e.to_string()))?
            .into_request()
    }

    #[test]
    fn idle_pause_reaches_the_request() {
        assert_eq!(req(json!({"image": "a"})).unwrap().idle_pause_secs, None);
        assert_eq!(
            req(json!({"image": "a", "idle_pause_seconds": 60}))
                .unwrap()
                .idle_pause_secs,
            Some(60)
        );
        assert!(req(json!({"image": "a", "idle_pause_seconds": 0})).is_err());
    }

    #[test]
    fn ssh_egress_reaches_the_request_with_defaults() {
        let r = req(json!({"image": "a", "network": {"ssh_egress": {
            "allow": ["github.com"], "key_file": "/k", "exec_rules": ["allow:git-upload-pack *"]
        }}}))
        .unwrap();
        let n = r.network.unwrap();
        assert!(n.intercepts());
        let e = n.intercept.ssh_egress.unwrap();
        assert_eq!(e.allow, vec!["github.com"]);
        assert_eq!(e.key_file.as_deref(), Some(std::path::Path::new("/k")));
        assert!(
            e.known_hosts.ends_with(".ssh/known_hosts"),
            "{:?}",
            e.known_hosts
        );
        let err = req(json!({"image": "a", "network": {"no_network": true, "ssh_egress": {}}}))
            .unwrap_err();
        assert!(err.0.contains("ssh_egress"), "{}", err.0);
    }

    #[test]
    fn follow_redirects_reaches_the_request_and_turns_interception_on() {
        let n = req(json!({"image": "a", "network": {"follow_redirects": true}}))
            .unwrap()
            .network
            .unwrap();
        assert!(n.intercept.follow_redirects && n.intercepts());
        assert!(req(
            json!({"image": "a", "network": {"no_network": true, "follow_redirects": true}})
        )
        .is_err());
    }

    #[test]
    fn dns_mode_reaches_the_request() {
        let mode = |v: Value| req(v).unwrap().network.unwrap().dns_mode;
        use crate::config::DnsMode;
        assert_eq!(mode(json!({"image": "a"})), DnsMode::Trusted);
        assert_eq!(
            mode(json!({"image": "a", "network": {"dns_mode": "synthetic"}})),
            DnsMode::Synthetic
        );
        assert_eq!(
            mode(json!({"image": "a", "network": {"dns_mode": "open"}})),
            DnsMode::Open
        );
        let err = req(json!({"image": "a", "network": {"dns_mode": "magic"}})).unwrap_err();
        assert!(err.0.contains("network.dns_mode"), "{}", err.0);
        let err = req(json!({"image": "a", "network": {"no_network": true, "dns_mode": "open"}}))
            .unwrap_err();
        assert!(err.0.contains("no_network"), "{}", err.0);
    }

    #[test]
    fn no_snapshot_reaches_the_request() {
        assert!(!req(json!({"image": "a"})).unwrap().no_snapshot);
        assert!(
            req(json!({"image": "a", "no_snapshot": true}))
                .unwrap()
                .no_snapshot
        );
    }

    #[test]
    fn network_plugins_are_checked_at_create() {
        let err = |v: Value| req(v).unwrap_err().0;
        let with = |plugins: Value| json!({"image": "a", "network": {"plugins": plugins}});
        assert!(err(with(json!([{"type": "nope"}]))).contains("unknown plugin type"));
        assert!(err(with(
            json!([{"type": "budget_gate", "config": {"limit_usd": 1}}])
        ))
        .contains("usage_logger"));
        assert!(err(with(
            json!([{"type": "usage_logger", "config": {"path": "u.jsonl"}}])
        ))
        .contains("absolute"));
        assert!(err(json!({"image": "a", "network": {"no_network": true,
            "plugins": [{"type": "usage_logger", "config": {"path": "/u"}}]}}))
        .contains("no_network"));
        // Plugins ask for interception (they run in its proxy).
        let r = req(with(
            json!([{"type": "usage_logger", "config": {"path": "/u.jsonl"}}]),
        ))
        .unwrap();
        assert!(r.network.unwrap().intercepts());
    }

    #[test]
    fn validation_order_and_messages() {
        let err = |v: Value| req(v).unwrap_err().0;
        assert_eq!(err(json!({})), "image is required (e.g., alpine:latest)");
        assert_eq!(
            err(json!({"image": "a", "id": "vm-1"})),
            "id is internal-only and cannot be set"
        );
        assert!(err(json!({"image": "a", "resources": {"cpus": 100}})).contains("resources.cpus"));
        assert!(err(
            json!({"image": "a", "network": {"no_network": true, "allowed_hosts": ["x"]}})
        )
        .contains("no_network"));
        assert!(req(json!({"image": "a", "vfs": {"workspace": "/w"}})).is_ok());
        assert!(err(json!({"image": "a", "vfs": {"workspace": "w"}})).contains("absolute"));
        assert!(err(json!({"image": "a", "vfs": {"workspace": "/w", "mounts": {"/etc": {"type": "memory"}}}}))
            .contains("under it"));
        let d = tempfile::tempdir().unwrap();
        let host = d.path().to_str().unwrap();
        let r = req(json!({"image": "a", "vfs": {"workspace": "/w", "mounts": {
            "/w/src": {"type": "host_fs", "host_path": host},
            "/w": {"type": "memory"},
            "/w/ro": {"type": "host_fs", "host_path": host, "readonly": true},
            "/w/snap": {"type": "overlay", "host_path": host}}}}))
        .unwrap();
        let modes: Vec<_> = r
            .workspace
            .mounts
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
            assert!(e.contains(needle), "{e}");
        }
        let owned = req(json!({"image": "a", "vfs": {"workspace": "/w", "mounts": {
            "/w/x": {"type": "host_fs", "host_path": host, "owner_uid": 1000, "owner_gid": 100}}}}))
        .unwrap();
        let m = &owned.workspace.mounts[0];
        assert_eq!((m.owner_uid, m.owner_gid), (Some(1000), Some(100)));
        // Unknown fields are fine.
        assert!(
            req(json!({"image": "a", "future_field": 1, "network": {"policy_script": ""}})).is_ok()
        );
    }

    #[test]
    fn vfs_rules_block_allow_and_events() {
        let with_rules = |rules: Value, events: bool| {
            req(json!({"image": "a", "vfs": {"workspace": "/w",
                "mounts": {"/w": {"type": "memory"}},
                "interception": {"emit_events": events, "rules": rules}}}))
        };
        let r = with_rules(
            json!([
                {"name": "no-env", "action": "block", "ops": ["read", "read_dir"], "path": "/w/*.env"},
                {"action": "allow", "ops": ["write"]},
                {"phase": "before", "action": "block"}
            ]),
            false,
        )
        .unwrap();
        assert_eq!(
            r.workspace.block_rules,
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
        let r = with_rules(json!([{"action": "allow", "phase": "after"}]), true).unwrap();
        assert!(r.workspace.emit_events && r.workspace.block_rules.is_empty());
        for (rules, needle) in [
            (
                json!([{"action": "block", "phase": "after"}]),
                "use phase before",
            ),
            (
                json!([{"action": "block", "ops": ["explode"]}]),
                "unknown op",
            ),
            (json!([{"action": "mutate_write"}]), "unknown action"),
        ] {
            let e = with_rules(rules, false).unwrap_err().0;
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn network_secrets_and_interception() {
        let r = req(json!({"image": "a", "network": {"secrets": {
            "API_KEY": {"value": "sk-real-123", "hosts": ["api.example.com"]},
            "OTHER": {"value": "v2", "hosts": ["x"], "placeholder": "PH"}
        }}}))
        .unwrap();
        let n = r.network.as_ref().unwrap();
        assert!(n.intercepts());
        assert_eq!(n.intercept.secrets[1].placeholder.as_deref(), Some("PH"));
        assert!(!format!("{r:?}").contains("sk-real-123"));
        let e =
            req(json!({"image": "a", "network": {"secrets": {"K": {"value": "v", "hosts": []}}}}))
                .unwrap_err();
        assert!(e.0.contains("at least one host"), "{e}");
        // Hook rules without an allow-list ask for interception (which then allows every host).
        let r = req(
            json!({"image": "a", "network": {"interception": {"rules": [{"hosts": ["a.test"]}]}}}),
        )
        .unwrap();
        let n = r.network.unwrap();
        assert!(n.intercepts() && n.intercept.allowed_hosts.is_empty());
        let e = req(
            json!({"image": "a", "network": {"interception": {"rules": [{"callback_id": "x"}]}}}),
        )
        .unwrap_err();
        assert!(e.0.contains("callback_socket"), "{e}");
        // block_private_ips off opens the add_hosts addresses.
        let r = req(json!({"image": "a", "network": {"block_private_ips": false,
            "add_hosts": [{"host": "api.test", "ip": "127.0.0.1"}]}}))
        .unwrap();
        let n = r.network.unwrap();
        assert!(n.allow_private_ranges);
        assert_eq!(
            n.allow_private_hosts,
            ["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
        );
        assert!(req(json!({"image": "a", "network": {"no_network": true}}))
            .unwrap()
            .network
            .is_none());
    }

    #[test]
    fn image_config_and_resources() {
        let r = req(json!({"image": "a", "launch_entrypoint": true,
            "resources": {"cpus": 0.5, "memory_mb": 256, "timeout_seconds": 29.2},
            "env": {"A": "user"},
            "image_config": {"cmd": ["run", "fast"], "user": "1000:1000", "env": {"A": "ic", "B": "ic"}}}))
        .unwrap();
        assert_eq!(r.start, Start::Entrypoint);
        assert_eq!(r.resources.cpus.unwrap().get(), 0.5);
        assert_eq!(r.timeout.unwrap().get(), 30);
        assert_eq!(r.process.cmd, ["run", "fast"]);
        assert_eq!(r.process.user.as_ref().unwrap().as_str(), "1000:1000");
        assert_eq!(
            r.process.env,
            [
                ("A".to_string(), "ic".to_string()),
                ("B".to_string(), "ic".to_string()),
                ("A".to_string(), "user".to_string())
            ]
        );
        assert_eq!(req(json!({"image": "a"})).unwrap().start, Start::Nothing);
    }
}
