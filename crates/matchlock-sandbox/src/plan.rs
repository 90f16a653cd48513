//! The planner: a checked [`SandboxRequest`] and its image make the sandbox's configuration.
//! Every front end goes through here, so the defaults (`matchlock_api::defaults`), Docker's rules
//! for the image's ENTRYPOINT/CMD/ENV/USER/WORKDIR, when interception is on, the secrets'
//! placeholders and the sandbox CA's environment are applied in one place.

use crate::config::{ca_env, InterceptConfig, NetworkConfig, SandboxConfig, SecretSpec};
use crate::{volume, SandboxError, Store};
use matchlock_api::defaults;
use matchlock_api::request::{NetworkRequest, SandboxRequest, Start};
use matchlock_image::ImageInfo;

/// A sandbox ready to start: its configuration, the secret values its supervisor gets through a
/// pipe (never written anywhere), and what to run once it is up.
pub struct SandboxPlan {
    /// The configuration (`config.json`).
    pub config: SandboxConfig,
    /// `(name, value)` of each secret.
    pub secrets: Vec<(String, String)>,
    /// The command to run once up: `run`'s, or the image's entrypoint for RPC
    /// `launch_entrypoint` (`None` when the image has none, or nothing was asked).
    pub command: Option<Vec<String>>,
}

/// Secret names only: a plan's `Debug` never shows a value.
impl std::fmt::Debug for SandboxPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.secrets.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("SandboxPlan")
            .field("config", &self.config)
            .field("secrets", &names)
            .field("command", &self.command)
            .finish()
    }
}

/// Plans `req` on `image`. Fails on what only now can be checked: the kernel file, the disks
/// (missing, or in use by a running sandbox), an image with nothing to run.
pub fn plan(
    req: SandboxRequest,
    image: &ImageInfo,
    store: &Store,
) -> Result<SandboxPlan, SandboxError> {
    let kernel = req
        .kernel
        .as_deref()
        .map(matchlock_vmm::kernel::resolve_ref)
        .transpose()?;
    let disks = req
        .disks
        .iter()
        .map(volume::resolve)
        .collect::<Result<Vec<_>, _>>()?;
    volume::check_conflicts(store, &disks)?;

    if req.idle_pause_secs.is_some() && !req.workspace.mounts.is_empty() {
        return Err(SandboxError::Invalid(
            "--idle-pause cannot be used with workspace mounts (-v): a sandbox with mounts \
             cannot be paused (QEMU 7.2 cannot save a virtio-fs device)"
                .into(),
        ));
    }
    let p = &req.process;
    let compose = || {
        matchlock_image::compose_command(&image.config, p.entrypoint.as_deref(), &p.cmd)
            .map_err(|e| SandboxError::Invalid(e.to_string()))
    };
    let command = match req.start {
        Start::Command => Some(compose()?),
        // An image without an entrypoint starts nothing, as in Matchlock.
        Start::Entrypoint => compose().ok(),
        Start::Nothing => None,
    };

    let mut secrets = Vec::new();
    let mut specs = Vec::new();
    let mut user_env = Vec::new();
    if let Some(n) = &req.network {
        matchlock_policy::plugins::check(&n.intercept.plugins).map_err(SandboxError::Invalid)?;
        if let Some(e) = &n.intercept.ssh_egress {
            matchlock_ssh_egress::check_config(e).map_err(SandboxError::Invalid)?;
        }
    }
    let network = req.network.as_ref().map(|n| network(n, &mut specs));
    if network.as_ref().is_some_and(|n| n.intercept.is_some()) {
        // TLS clients in the guest trust the sandbox CA through the bundle it is appended to;
        // the user's own settings still win.
        user_env = ca_env();
    }
    user_env.extend(p.env.iter().cloned());
    if let Some(n) = &req.network {
        for (s, spec) in n.intercept.secrets.iter().zip(&specs) {
            user_env.push((spec.name.clone(), spec.placeholder.clone()));
            secrets.push((s.name.clone(), s.value.expose().to_string()));
        }
    }
    let mut network = network;
    if let Some(ic) = network.as_mut().and_then(|n| n.intercept.as_mut()) {
        ic.secrets = specs;
    }

    let config = SandboxConfig {
        image: image.name.clone(),
        image_digest: image.digest.clone(),
        rootfs: image.rootfs.clone(),
        kernel,
        hostname: req
            .hostname
            .as_ref()
            .map(|h| h.as_str().to_string())
            .unwrap_or_default(),
        cpus: req.resources.cpus.map_or(defaults::CPUS, |c| c.get()),
        memory_mb: req
            .resources
            .memory
            .map_or(defaults::MEMORY_MB, |m| m.get()),
        disk_size_mb: req
            .resources
            .disk
            .map_or(defaults::DISK_SIZE_MB, |d| d.get()),
        env: matchlock_image::merge_env(&image.config.env, &user_env),
        workdir: p
            .workdir
            .as_ref()
            .map(|w| w.as_str().to_string())
            .or_else(|| image.config.working_dir.clone().filter(|w| !w.is_empty())),
        user: p
            .user
            .as_ref()
            .map(|u| u.as_str().to_string())
            .or_else(|| image.config.user.clone().filter(|u| !u.is_empty())),
        privileged: req.privileged,
        no_snapshot: req.no_snapshot,
        graceful_shutdown_ms: req.graceful_shutdown_ms,
        idle_pause_secs: req.idle_pause_secs,
        timeout_secs: req.timeout.map(|t| t.get()),
        remove_on_stop: req.remove_on_stop,
        owner_pid: req.owner_pid,
        add_hosts: req.add_hosts.clone(),
        disks,
        vfs: req.workspace.mounts.clone(),
        vfs_block_rules: req.workspace.block_rules.clone(),
        vfs_emit_events: req.workspace.emit_events,
        publish: req.publish.clone(),
        network,
        command: command.clone().unwrap_or_default(),
        ..Default::default()
    };
    Ok(SandboxPlan {
        config,
        secrets,
        command,
    })
}

/// The network configuration for `n`; `specs` receives each secret's spec (name, hosts, a
/// placeholder: the caller's or a fresh random one).
fn network(n: &NetworkRequest, specs: &mut Vec<SecretSpec>) -> NetworkConfig {
    let i = &n.intercept;
    for s in &i.secrets {
        specs.push(SecretSpec {
            name: s.name.clone(),
            hosts: s.hosts.iter().map(|h| h.as_str().to_string()).collect(),
            placeholder: s
                .placeholder
                .clone()
                .unwrap_or_else(matchlock_policy::secrets::placeholder),
            allow_http: s.allow_http,
        });
    }
    NetworkConfig {
        mtu: n.mtu.unwrap_or(defaults::MTU),
        dns_servers: n.dns_servers.clone(),
        dns_mode: n.dns_mode,
        allow_private_hosts: n
            .allow_private_hosts
            .iter()
            .map(|a| a.to_string())
            .collect(),
        allow_private_ranges: n.allow_private_ranges,
        intercept: n.intercepts().then(|| InterceptConfig {
            allowed_hosts: i
                .allowed_hosts
                .iter()
                .map(|h| h.as_str().to_string())
                .collect(),
            deny_by_default: i.deny_by_default,
            disable_websockets: i.disable_websockets,
            secrets: Vec::new(),
            event_log: i.event_log.clone(),
            run_id: i.run_id.clone(),
            agent_system: i.agent_system.clone(),
            rules: i.rules.clone(),
            callback_socket: i.callback_socket.clone(),
            plugins: i.plugins.clone(),
            ssh_egress: i.ssh_egress.clone(),
            follow_redirects: i.follow_redirects,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchlock_api::wire::CreateParams;
    use matchlock_image::ImageConfig;
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

    fn planned(v: serde_json::Value) -> SandboxPlan {
        let req = serde_json::from_value::<CreateParams>(v)
            .unwrap()
            .into_request()
            .unwrap();
        // No disks: the store is never read.
        plan(req, &image(), &Store::at("/nonexistent/matchlock-home")).unwrap()
    }

    #[test]
    fn defaults_image_config_and_resources_apply_once() {
        let p = planned(json!({"image": "a", "launch_entrypoint": true,
            "resources": {"cpus": 0.5, "memory_mb": 256, "timeout_seconds": 30},
            "env": {"A": "user"},
            "image_config": {"cmd": ["run", "fast"], "user": "1000:1000"}}));
        assert_eq!(p.command.unwrap(), ["/entry", "run", "fast"]);
        let c = &p.config;
        assert_eq!(
            (c.cpus, c.memory_mb, c.disk_size_mb),
            (0.5, 256, defaults::DISK_SIZE_MB)
        );
        assert_eq!(c.timeout_secs, Some(30));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.workdir.as_deref(), Some("/app"));
        assert!(c.env.contains(&("A".into(), "user".into())));
        assert_eq!(c.network.as_ref().unwrap().mtu, defaults::MTU);
        let p = planned(json!({"image": "a"}));
        assert!(p.command.is_none());
        assert_eq!(p.config.timeout_secs, None);
        assert_eq!(p.config.memory_mb, defaults::MEMORY_MB);
        assert!(p.config.network.as_ref().unwrap().intercept.is_none());
        // A new entrypoint drops the image's CMD, as `docker run --entrypoint` does.
        let p = planned(json!({"image": "a", "launch_entrypoint": true,
            "image_config": {"entrypoint": ["/bin/sh"]}}));
        assert_eq!(p.command.unwrap(), ["/bin/sh"]);
    }

    #[test]
    fn secret_values_never_reach_the_config_but_the_supervisor_gets_them() {
        let p = planned(json!({"image": "a", "network": {"secrets": {
            "API_KEY": {"value": "sk-real-123", "hosts": ["api.example.com"]},
            "OTHER": {"value": "v2", "hosts": ["x"], "placeholder": "PH"}
        }}}));
        let text = serde_json::to_string(&p.config).unwrap();
        assert!(!text.contains("sk-real-123"));
        assert!(!format!("{p:?}").contains("sk-real-123"));
        let key = p.config.env.iter().find(|(k, _)| k == "API_KEY").unwrap();
        assert!(key.1.starts_with("SANDBOX_SECRET_"));
        assert!(p.config.env.contains(&("OTHER".into(), "PH".into())));
        assert!(p
            .secrets
            .contains(&("API_KEY".into(), "sk-real-123".into())));
        let ic = p
            .config
            .network
            .as_ref()
            .unwrap()
            .intercept
            .as_ref()
            .unwrap();
        assert_eq!(ic.secrets[0].placeholder, key.1);
        // The sandbox CA's environment comes with interception; the caller's settings win.
        assert!(p.config.env.iter().any(|(k, _)| k == "SSL_CERT_FILE"));
    }
}
