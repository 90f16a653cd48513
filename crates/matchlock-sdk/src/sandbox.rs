//! The sandbox builder: what `create` and `launch` ask for.

use matchlock_api::wire::{
    AddHost, CreateParams, ExtraDisk, ImageConfigParams, KernelRef, Network, Resources, Secret,
    Vfs, VfsMountSpec,
};
use serde_json::Value;

/// A description of a sandbox to create, built fluently (the Python SDK's `Sandbox`).
///
/// ```
/// use matchlock_sdk::Sandbox;
///
/// let sandbox = Sandbox::new("python:3.12-alpine")
///     .with_cpus(2.0)
///     .with_memory(1024)
///     .with_env("MODE", "test")
///     .add_secret("API_KEY", "sk-real", ["api.openai.com"])
///     .with_port_forward(18080, 8080);
/// assert_eq!(sandbox.image(), "python:3.12-alpine");
/// ```
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// `create`'s parameters, the server's own wire type.
    params: CreateParams,
    /// Whether the caller set `block_private_ips` (else it is sent as `true`, as the Python
    /// SDK does whenever it sends a network object).
    block_private_ips_set: bool,
    pub(crate) port_forwards: Vec<(u16, u16)>,
    pub(crate) port_forward_addresses: Vec<String>,
}

impl Sandbox {
    /// A sandbox of `image` (e.g. `alpine:latest`) with default resources: 1 CPU, 512 MiB of
    /// memory, a 5 GiB writable disk, no lifetime limit.
    pub fn new(image: impl Into<String>) -> Sandbox {
        Sandbox {
            params: CreateParams {
                image: image.into(),
                ..Default::default()
            },
            block_private_ips_set: false,
            port_forwards: Vec::new(),
            port_forward_addresses: Vec::new(),
        }
    }

    /// The image reference.
    pub fn image(&self) -> &str {
        &self.params.image
    }

    fn resources(&mut self) -> &mut Resources {
        self.params.resources.get_or_insert_with(Default::default)
    }

    fn network(&mut self) -> &mut Network {
        self.params.network.get_or_insert_with(Default::default)
    }

    fn image_config(&mut self) -> &mut ImageConfigParams {
        self.params
            .image_config
            .get_or_insert_with(Default::default)
    }

    fn vfs(&mut self) -> &mut Vfs {
        self.params.vfs.get_or_insert_with(Default::default)
    }

    /// Give processes all capabilities and no seccomp filter.
    pub fn with_privileged(mut self) -> Self {
        self.params.privileged = true;
        self
    }

    /// Pause the sandbox after `after` (whole seconds, at least one) without a request from this
    /// client or any other; the next request resumes it. Not with workspace mounts.
    pub fn with_idle_pause(mut self, after: std::time::Duration) -> Self {
        self.params.idle_pause_seconds = Some(after.as_secs().max(1));
        self
    }

    /// Boot the VM cold instead of starting it from the image's template snapshot.
    pub fn with_no_snapshot(mut self) -> Self {
        self.params.no_snapshot = true;
        self
    }

    /// CPU share; fractions are enforced as a quota (e.g. `0.5`).
    pub fn with_cpus(mut self, cpus: f64) -> Self {
        self.resources().cpus = cpus;
        self
    }

    /// Memory in MiB.
    pub fn with_memory(mut self, mb: u64) -> Self {
        self.resources().memory_mb = mb;
        self
    }

    /// Size of the writable disk in MiB.
    pub fn with_disk_size(mut self, mb: u64) -> Self {
        self.resources().disk_size_mb = mb;
        self
    }

    /// Stop the sandbox after this many seconds.
    pub fn with_timeout(mut self, seconds: u64) -> Self {
        self.resources().timeout_seconds = seconds as f64;
        self
    }

    /// Set an environment variable for every command.
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.params.env.insert(name.into(), value.into());
        self
    }

    /// Run commands as this user (`uid`, `uid:gid`, `name` or `name:group`).
    pub fn with_user(mut self, user: impl Into<String>) -> Self {
        self.image_config().user = user.into();
        self
    }

    /// Default working directory of commands.
    pub fn with_working_dir(mut self, dir: impl Into<String>) -> Self {
        self.image_config().working_dir = dir.into();
        self
    }

    /// Replace the image's ENTRYPOINT (what [`crate::Client::launch`] starts).
    pub fn with_entrypoint<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.image_config().entrypoint = argv.into_iter().map(Into::into).collect();
        self
    }

    /// Replace the image's CMD.
    pub fn with_cmd<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.image_config().cmd = argv.into_iter().map(Into::into).collect();
        self
    }

    /// The guest path of the workspace.
    pub fn with_workspace(mut self, path: impl Into<String>) -> Self {
        self.vfs().workspace = path.into();
        self
    }

    /// Mounts a host directory (or file) at `guest_path`, live and read-write: the guest's
    /// changes land on the host. `guest_path` must be the workspace or under it.
    pub fn mount_host_dir(
        self,
        guest_path: impl Into<String>,
        host_path: impl Into<String>,
    ) -> Self {
        self.mount(guest_path, "host_fs", host_path.into(), false, None)
    }

    /// Like [`Sandbox::mount_host_dir`], with every file shown as owned by `uid`:`gid` in the
    /// guest (so a non-root guest user can work on files the host user owns). The host's
    /// ownership is unchanged; a guest `chown` to other ids is refused.
    pub fn mount_host_dir_owned(
        self,
        guest_path: impl Into<String>,
        host_path: impl Into<String>,
        uid: u32,
        gid: u32,
    ) -> Self {
        self.mount(
            guest_path,
            "host_fs",
            host_path.into(),
            false,
            Some((uid, gid)),
        )
    }

    /// Mounts a host directory (or file) read-only.
    pub fn mount_host_dir_readonly(
        self,
        guest_path: impl Into<String>,
        host_path: impl Into<String>,
    ) -> Self {
        self.mount(guest_path, "host_fs", host_path.into(), true, None)
    }

    /// Mounts a copy-on-write view of a host directory (or file): the guest may write, but its
    /// changes stay in the sandbox.
    pub fn mount_overlay(
        self,
        guest_path: impl Into<String>,
        host_path: impl Into<String>,
    ) -> Self {
        self.mount(guest_path, "overlay", host_path.into(), false, None)
    }

    /// Mounts an empty directory of the sandbox's own (capped at its memory size).
    pub fn mount_memory(self, guest_path: impl Into<String>) -> Self {
        self.mount(guest_path, "memory", String::new(), false, None)
    }

    /// Adds one `vfs.mounts` entry.
    fn mount(
        mut self,
        guest_path: impl Into<String>,
        kind: &str,
        host_path: String,
        readonly: bool,
        owner: Option<(u32, u32)>,
    ) -> Self {
        let spec = VfsMountSpec {
            kind: kind.into(),
            host_path,
            readonly,
            owner_uid: owner.map(|o| i64::from(o.0)),
            owner_gid: owner.map(|o| i64::from(o.1)),
        };
        self.vfs().mounts.insert(guest_path.into(), spec);
        self
    }

    /// Reports every completed workspace operation to [`crate::Client::file_events`].
    pub fn with_vfs_events(mut self) -> Self {
        self.vfs()
            .interception
            .get_or_insert_with(Default::default)
            .emit_events = true;
        self
    }

    /// Hosts the guest may reach.
    pub fn allow_host<I, S>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.network()
            .allowed_hosts
            .extend(hosts.into_iter().map(Into::into));
        self
    }

    /// An extra `/etc/hosts` entry.
    pub fn add_host(mut self, host: impl Into<String>, ip: impl Into<String>) -> Self {
        self.network().add_hosts.push(AddHost {
            host: host.into(),
            ip: ip.into(),
        });
        self
    }

    /// Block (the default) or allow private address ranges.
    pub fn with_block_private_ips(mut self, block: bool) -> Self {
        self.network().block_private_ips = Some(block);
        self.block_private_ips_set = true;
        self
    }

    /// No network interface at all.
    pub fn with_no_network(mut self) -> Self {
        self.network().no_network = true;
        self
    }

    /// The guest's hostname (default: the sandbox id).
    pub fn with_hostname(mut self, hostname: impl Into<String>) -> Self {
        self.network().hostname = hostname.into();
        self
    }

    /// DNS servers matchlock forwards the guest's queries to.
    pub fn with_dns_servers<I, S>(mut self, servers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.network().dns_servers = servers.into_iter().map(Into::into).collect();
        self
    }

    /// How the guest's DNS is answered (`trusted` by default; see
    /// [`matchlock_api::config::DnsMode`]).
    pub fn with_dns_mode(mut self, mode: matchlock_api::config::DnsMode) -> Self {
        self.network().dns_mode = Some(mode.as_str().to_string());
        self
    }

    /// Follow HTTP redirects on the host within the allow-list: the guest gets the final
    /// answer; each hop is checked as the guest's own request would be.
    pub fn with_follow_redirects(mut self) -> Self {
        self.network().follow_redirects = true;
        self
    }

    /// SSH egress with host-held credentials: the guest's `ssh`/`git` reach `config.allow`'s
    /// servers through the host, which checks their keys against `known_hosts` (default
    /// `~/.ssh/known_hosts`), decides each command by `exec_rules` and logs in with the host's
    /// ssh-agent (default `$SSH_AUTH_SOCK`) or `key_file`, which never enter the sandbox.
    pub fn with_ssh_egress(mut self, config: matchlock_api::config::SshEgressConfig) -> Self {
        self.network().ssh_egress = Some(config);
        self
    }

    /// Interception without an allow-list: every host is allowed, through the proxy (hooks,
    /// secrets, the private-range block and events apply).
    pub fn with_network_interception(mut self) -> Self {
        self.network().intercept = true;
        self
    }

    /// Interception that allows nothing until hosts are added ([`Sandbox::allow_host`] or
    /// `allow_list_add` at runtime); without it an empty allow-list allows every host.
    pub fn deny_by_default(mut self) -> Self {
        self.network().deny_by_default = true;
        self
    }

    /// Refuse WebSocket upgrades through the interception proxy.
    pub fn disable_websockets(mut self) -> Self {
        self.network().disable_websockets = true;
        self
    }

    /// Adds a network plugin entry (`network.plugins[]`), as RPC `create` takes it:
    /// `kind` is `local_model_router`, `usage_logger` or `budget_gate`, `config` its settings
    /// (checked by the server before anything boots).
    pub fn with_plugin(mut self, kind: impl Into<String>, config: Value) -> Self {
        self.network()
            .plugins
            .push(matchlock_api::plugins::PluginSpec {
                kind: kind.into(),
                enabled: None,
                config,
            });
        self
    }

    /// Routes model calls to a local backend (`local_model_router`): `routes` are
    /// `SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL[@HOST:PORT]`, `backend` the default `HOST:PORT`
    /// (Ollama's `127.0.0.1:11434` when `None`).
    pub fn with_local_model_routes<I, S>(self, routes: I, backend: Option<&str>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let routes: Vec<String> = routes.into_iter().map(Into::into).collect();
        let mut config = serde_json::json!({ "routes": routes });
        if let Some(b) = backend {
            config["backend"] = Value::String(b.to_string());
        }
        self.with_plugin("local_model_router", config)
    }

    /// Appends one JSON line per model call to `path` (`usage_logger`; an absolute path on the
    /// machine that runs the sandbox).
    pub fn with_usage_log(self, path: impl Into<String>) -> Self {
        self.with_plugin("usage_logger", serde_json::json!({ "path": path.into() }))
    }

    /// Refuses every request with 429 once the usage log's spend reaches `limit_usd`
    /// (`budget_gate`; needs [`Sandbox::with_usage_log`]).
    pub fn with_budget_limit_usd(self, limit_usd: f64) -> Self {
        self.with_plugin("budget_gate", serde_json::json!({ "limit_usd": limit_usd }))
    }

    /// Boot another guest kernel: a local `vmlinux` path or `file://` URL (checked before boot).
    pub fn with_kernel(mut self, kernel: impl Into<String>) -> Self {
        self.params.kernel = Some(KernelRef {
            reference: kernel.into(),
        });
        self
    }

    /// The guest interface's MTU.
    pub fn with_network_mtu(mut self, mtu: u32) -> Self {
        self.network().mtu = i64::from(mtu);
        self
    }

    /// A secret: the guest sees a placeholder in `$name`; the real value stays on the host and is
    /// only ever sent to `hosts`, over HTTPS (see [`Sandbox::allow_secret_over_http`]).
    pub fn add_secret<I, S>(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
        hosts: I,
    ) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let secret = Secret {
            value: value.into(),
            hosts: hosts.into_iter().map(Into::into).collect(),
            placeholder: String::new(),
            allow_http: false,
        };
        self.network().secrets.insert(name.into(), secret);
        self
    }

    /// Lets the secret `name` (added with [`Sandbox::add_secret`]) also be injected into plain
    /// HTTP requests, where it travels in clear text. Without it such requests are refused.
    pub fn allow_secret_over_http(mut self, name: &str) -> Self {
        if let Some(s) = self.network().secrets.get_mut(name) {
            s.allow_http = true;
        }
        self
    }

    /// Attach an ext4 image file, or a named volume as `@NAME`, at `guest_path`.
    pub fn with_disk(
        mut self,
        host: impl Into<String>,
        guest_path: impl Into<String>,
        read_only: bool,
    ) -> Self {
        self.params.extra_disks.push(ExtraDisk {
            host_path: host.into(),
            guest_mount: guest_path.into(),
            readonly: read_only,
        });
        self
    }

    /// Forward host port `local` (0 picks one) to guest port `remote` once the sandbox is up.
    pub fn with_port_forward(mut self, local: u16, remote: u16) -> Self {
        self.port_forwards.push((local, remote));
        self
    }

    /// Host addresses the port forwards listen on (default `127.0.0.1`).
    pub fn with_port_forward_addresses<I, S>(mut self, addresses: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.port_forward_addresses = addresses.into_iter().map(Into::into).collect();
        self
    }

    /// The `create` parameters, as the Python SDK would send them: a network object only when
    /// something in it was set (with `block_private_ips: true` unless chosen), and nothing but
    /// the hostname and DNS servers next to `no_network`.
    pub(crate) fn to_params(&self, launch: bool) -> Value {
        let mut p = self.params.clone();
        p.launch_entrypoint = launch;
        if let Some(n) = p.network.as_mut() {
            if n.no_network {
                *n = Network {
                    no_network: true,
                    hostname: std::mem::take(&mut n.hostname),
                    dns_servers: std::mem::take(&mut n.dns_servers),
                    ..Default::default()
                };
            } else if !self.block_private_ips_set {
                n.block_private_ips = Some(true);
            }
        }
        serde_json::to_value(&p).unwrap_or(Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ssh_egress_is_sent() {
        let p = Sandbox::new("img")
            .with_ssh_egress(matchlock_api::config::SshEgressConfig {
                allow: vec!["git.test:2222".into()],
                key_file: Some("/keys/id".into()),
                ..Default::default()
            })
            .to_params(false);
        assert_eq!(p["network"]["ssh_egress"]["allow"][0], "git.test:2222");
        assert_eq!(p["network"]["ssh_egress"]["key_file"], "/keys/id");
    }

    #[test]
    fn the_dns_mode_is_sent_by_name() {
        let p = Sandbox::new("a")
            .with_dns_mode(matchlock_api::config::DnsMode::Synthetic)
            .to_params(false);
        assert_eq!(p["network"]["dns_mode"], "synthetic");
        let back: matchlock_api::wire::CreateParams = serde_json::from_value(p).unwrap();
        assert_eq!(
            back.into_request().unwrap().network.unwrap().dns_mode,
            matchlock_api::config::DnsMode::Synthetic
        );
    }

    #[test]
    fn wire_form_matches_the_python_sdk() {
        let p = Sandbox::new("alpine:latest").to_params(false);
        assert_eq!(p, json!({"image": "alpine:latest"}));
        let p = Sandbox::new("a")
            .with_cpus(0.5)
            .with_timeout(30)
            .allow_host(["api.x.com"])
            .add_secret("K", "v", ["api.x.com"])
            .with_entrypoint(["python"])
            .with_user("1000")
            .to_params(true);
        assert_eq!(
            p["resources"],
            json!({"cpus": 0.5, "timeout_seconds": 30.0})
        );
        assert_eq!(p["network"]["block_private_ips"], true);
        assert_eq!(
            p["network"]["secrets"]["K"],
            json!({"value": "v", "hosts": ["api.x.com"]})
        );
        assert_eq!(
            p["image_config"],
            json!({"user": "1000", "entrypoint": ["python"]})
        );
        assert_eq!(p["launch_entrypoint"], true);
        let p = Sandbox::new("a")
            .with_no_network()
            .with_hostname("h")
            .to_params(false);
        assert_eq!(p["network"], json!({"no_network": true, "hostname": "h"}));
        let p = Sandbox::new("a")
            .with_workspace("/workspace")
            .mount_memory("/workspace")
            .mount_host_dir("/workspace/src", "/h/src")
            .mount_host_dir_owned("/workspace/own", "/h/own", 1000, 100)
            .mount_host_dir_readonly("/workspace/ro", "/h/ro")
            .mount_overlay("/workspace/snap", "/h/snap")
            .to_params(false);
        assert_eq!(
            p["vfs"],
            json!({"workspace": "/workspace", "mounts": {
                "/workspace": {"type": "memory"},
                "/workspace/src": {"type": "host_fs", "host_path": "/h/src"},
                "/workspace/own": {"type": "host_fs", "host_path": "/h/own",
                                   "owner_uid": 1000, "owner_gid": 100},
                "/workspace/ro": {"type": "host_fs", "host_path": "/h/ro", "readonly": true},
                "/workspace/snap": {"type": "overlay", "host_path": "/h/snap"}}})
        );
        let p = Sandbox::new("a").with_workspace("/w").to_params(false);
        assert_eq!(p["vfs"], json!({"workspace": "/w"}));
        let p = Sandbox::new("a")
            .with_workspace("/w")
            .mount_memory("/w")
            .with_vfs_events()
            .to_params(false);
        assert_eq!(p["vfs"]["interception"], json!({"emit_events": true}));
        let p = Sandbox::new("a")
            .deny_by_default()
            .disable_websockets()
            .with_kernel("file:///k/vmlinux")
            .to_params(false);
        assert_eq!(p["kernel"], json!({"ref": "file:///k/vmlinux"}));
        assert_eq!(p["network"]["deny_by_default"], true);
        assert_eq!(p["network"]["disable_websockets"], true);
        assert!(p["network"].get("intercept").is_none());
        let p = Sandbox::new("a")
            .with_network_interception()
            .to_params(false);
        assert_eq!(p["network"]["intercept"], true);
        let p = Sandbox::new("a")
            .with_local_model_routes(["openrouter.ai/m=llama3.1:8b"], Some("127.0.0.1:11434"))
            .with_usage_log("/tmp/usage.jsonl")
            .with_budget_limit_usd(5.0)
            .to_params(false);
        assert_eq!(
            p["network"]["plugins"],
            json!([
                {"type": "local_model_router", "config": {"routes": ["openrouter.ai/m=llama3.1:8b"], "backend": "127.0.0.1:11434"}},
                {"type": "usage_logger", "config": {"path": "/tmp/usage.jsonl"}},
                {"type": "budget_gate", "config": {"limit_usd": 5.0}},
            ])
        );
        // The server reads them back into the same plugins.
        let req = serde_json::from_value::<CreateParams>(p)
            .unwrap()
            .into_request()
            .unwrap();
        let plugins = &req.network.unwrap().intercept.plugins;
        assert_eq!(plugins.budget_gate.as_ref().unwrap().limit_usd, 5.0);
    }
}
