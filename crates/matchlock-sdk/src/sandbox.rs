//! The sandbox builder: what `create` and `launch` ask for.

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

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
    image: String,
    privileged: bool,
    cpus: f64,
    memory_mb: u64,
    disk_size_mb: u64,
    timeout_seconds: u64,
    env: BTreeMap<String, String>,
    user: Option<String>,
    working_dir: Option<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    workspace: Option<String>,
    /// `(guest path, JSON mount config)`.
    mounts: Vec<(String, Value)>,
    /// Ask for workspace events (`vfs.interception.emit_events`).
    vfs_events: bool,
    allowed_hosts: Vec<String>,
    add_hosts: Vec<(String, String)>,
    block_private_ips: Option<bool>,
    no_network: bool,
    hostname: Option<String>,
    dns_servers: Vec<String>,
    mtu: u32,
    /// `network.intercept`, `deny_by_default`, `disable_websockets`.
    intercept: bool,
    deny_by_default: bool,
    disable_websockets: bool,
    kernel: Option<String>,
    secrets: Vec<(String, String, Vec<String>)>,
    disks: Vec<(String, String, bool)>,
    pub(crate) port_forwards: Vec<(u16, u16)>,
    pub(crate) port_forward_addresses: Vec<String>,
}

impl Sandbox {
    /// A sandbox of `image` (e.g. `alpine:latest`) with default resources: 1 CPU, 512 MiB of
    /// memory, a 5 GiB writable disk, no lifetime limit.
    pub fn new(image: impl Into<String>) -> Sandbox {
        Sandbox {
            image: image.into(),
            privileged: false,
            cpus: 0.0,
            memory_mb: 0,
            disk_size_mb: 0,
            timeout_seconds: 0,
            env: BTreeMap::new(),
            user: None,
            working_dir: None,
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            workspace: None,
            mounts: Vec::new(),
            vfs_events: false,
            allowed_hosts: Vec::new(),
            add_hosts: Vec::new(),
            block_private_ips: None,
            no_network: false,
            hostname: None,
            dns_servers: Vec::new(),
            mtu: 0,
            intercept: false,
            deny_by_default: false,
            disable_websockets: false,
            kernel: None,
            secrets: Vec::new(),
            disks: Vec::new(),
            port_forwards: Vec::new(),
            port_forward_addresses: Vec::new(),
        }
    }

    /// The image reference.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// Give processes all capabilities and no seccomp filter.
    pub fn with_privileged(mut self) -> Self {
        self.privileged = true;
        self
    }

    /// CPU share; fractions are enforced as a quota (e.g. `0.5`).
    pub fn with_cpus(mut self, cpus: f64) -> Self {
        self.cpus = cpus;
        self
    }

    /// Memory in MiB.
    pub fn with_memory(mut self, mb: u64) -> Self {
        self.memory_mb = mb;
        self
    }

    /// Size of the writable disk in MiB.
    pub fn with_disk_size(mut self, mb: u64) -> Self {
        self.disk_size_mb = mb;
        self
    }

    /// Stop the sandbox after this many seconds.
    pub fn with_timeout(mut self, seconds: u64) -> Self {
        self.timeout_seconds = seconds;
        self
    }

    /// Set an environment variable for every command.
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Run commands as this user (`uid`, `uid:gid`, `name` or `name:group`).
    pub fn with_user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// Default working directory of commands.
    pub fn with_working_dir(mut self, dir: impl Into<String>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// Replace the image's ENTRYPOINT (what [`crate::Client::launch`] starts).
    pub fn with_entrypoint<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.entrypoint = argv.into_iter().map(Into::into).collect();
        self
    }

    /// Replace the image's CMD.
    pub fn with_cmd<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cmd = argv.into_iter().map(Into::into).collect();
        self
    }

    /// The guest path of the workspace.
    pub fn with_workspace(mut self, path: impl Into<String>) -> Self {
        self.workspace = Some(path.into());
        self
    }

    /// Mounts a host directory (or file) at `guest_path`, live and read-write: the guest's
    /// changes land on the host. `guest_path` must be the workspace or under it.
    pub fn mount_host_dir(
        self,
        guest_path: impl Into<String>,
        host_path: impl Into<String>,
    ) -> Self {
        let host: String = host_path.into();
        self.mount(guest_path, json!({"type": "host_fs", "host_path": host}))
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
        let host: String = host_path.into();
        let spec =
            json!({"type": "host_fs", "host_path": host, "owner_uid": uid, "owner_gid": gid});
        self.mount(guest_path, spec)
    }

    /// Mounts a host directory (or file) read-only.
    pub fn mount_host_dir_readonly(
        self,
        guest_path: impl Into<String>,
        host_path: impl Into<String>,
    ) -> Self {
        let host: String = host_path.into();
        let spec = json!({"type": "host_fs", "host_path": host, "readonly": true});
        self.mount(guest_path, spec)
    }

    /// Mounts a copy-on-write view of a host directory (or file): the guest may write, but its
    /// changes stay in the sandbox.
    pub fn mount_overlay(
        self,
        guest_path: impl Into<String>,
        host_path: impl Into<String>,
    ) -> Self {
        let host: String = host_path.into();
        self.mount(guest_path, json!({"type": "overlay", "host_path": host}))
    }

    /// Mounts an empty in-memory directory.
    pub fn mount_memory(self, guest_path: impl Into<String>) -> Self {
        self.mount(guest_path, json!({"type": "memory"}))
    }

    /// Adds one `vfs.mounts` entry.
    fn mount(mut self, guest_path: impl Into<String>, spec: Value) -> Self {
        self.mounts.push((guest_path.into(), spec));
        self
    }

    /// Reports every completed workspace operation to [`crate::Client::file_events`].
    pub fn with_vfs_events(mut self) -> Self {
        self.vfs_events = true;
        self
    }

    /// Hosts the guest may reach.
    pub fn allow_host<I, S>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.allowed_hosts.extend(hosts.into_iter().map(Into::into));
        self
    }

    /// An extra `/etc/hosts` entry.
    pub fn add_host(mut self, host: impl Into<String>, ip: impl Into<String>) -> Self {
        self.add_hosts.push((host.into(), ip.into()));
        self
    }

    /// Block (the default) or allow private address ranges.
    pub fn with_block_private_ips(mut self, block: bool) -> Self {
        self.block_private_ips = Some(block);
        self
    }

    /// No network interface at all.
    pub fn with_no_network(mut self) -> Self {
        self.no_network = true;
        self
    }

    /// The guest's hostname (default: the sandbox id).
    pub fn with_hostname(mut self, hostname: impl Into<String>) -> Self {
        self.hostname = Some(hostname.into());
        self
    }

    /// DNS servers matchlock forwards the guest's queries to.
    pub fn with_dns_servers<I, S>(mut self, servers: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.dns_servers = servers.into_iter().map(Into::into).collect();
        self
    }

    /// Interception without an allow-list: every host is allowed, through the proxy (hooks,
    /// secrets, the private-range block and events apply).
    pub fn with_network_interception(mut self) -> Self {
        self.intercept = true;
        self
    }

    /// Interception that allows nothing until hosts are added ([`Sandbox::allow_host`] or
    /// `allow_list_add` at runtime); without it an empty allow-list allows every host.
    pub fn deny_by_default(mut self) -> Self {
        self.deny_by_default = true;
        self
    }

    /// Refuse WebSocket upgrades through the interception proxy.
    pub fn disable_websockets(mut self) -> Self {
        self.disable_websockets = true;
        self
    }

    /// Boot another guest kernel: a local `vmlinux` path or `file://` URL (checked before boot).
    pub fn with_kernel(mut self, kernel: impl Into<String>) -> Self {
        self.kernel = Some(kernel.into());
        self
    }

    /// The guest interface's MTU.
    pub fn with_network_mtu(mut self, mtu: u32) -> Self {
        self.mtu = mtu;
        self
    }

    /// A secret: the guest sees a placeholder in `$name`; the real value stays on the host and is
    /// only ever sent to `hosts`.
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
        self.secrets.push((
            name.into(),
            value.into(),
            hosts.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Attach an ext4 image file, or a named volume as `@NAME`, at `guest_path`.
    pub fn with_disk(
        mut self,
        host: impl Into<String>,
        guest_path: impl Into<String>,
        read_only: bool,
    ) -> Self {
        self.disks.push((host.into(), guest_path.into(), read_only));
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

    /// The `create` parameters (the wire form of Matchlock's `api.Config`).
    pub(crate) fn to_params(&self, launch: bool) -> Value {
        let mut p = Map::new();
        p.insert("image".into(), json!(self.image));
        if self.privileged {
            p.insert("privileged".into(), json!(true));
        }
        if let Some(k) = &self.kernel {
            p.insert("kernel".into(), json!({ "ref": k }));
        }
        let mut res = Map::new();
        if self.cpus > 0.0 {
            res.insert("cpus".into(), json!(self.cpus));
        }
        if self.memory_mb > 0 {
            res.insert("memory_mb".into(), json!(self.memory_mb));
        }
        if self.disk_size_mb > 0 {
            res.insert("disk_size_mb".into(), json!(self.disk_size_mb));
        }
        if self.timeout_seconds > 0 {
            res.insert("timeout_seconds".into(), json!(self.timeout_seconds));
        }
        if !res.is_empty() {
            p.insert("resources".into(), Value::Object(res));
        }
        if self.no_network {
            let mut n = Map::new();
            n.insert("no_network".into(), json!(true));
            if let Some(h) = &self.hostname {
                n.insert("hostname".into(), json!(h));
            }
            p.insert("network".into(), Value::Object(n));
        } else if !self.allowed_hosts.is_empty()
            || !self.add_hosts.is_empty()
            || !self.secrets.is_empty()
            || !self.dns_servers.is_empty()
            || self.hostname.is_some()
            || self.mtu > 0
            || self.block_private_ips.is_some()
            || self.intercept
            || self.deny_by_default
            || self.disable_websockets
        {
            let mut n = Map::new();
            n.insert("allowed_hosts".into(), json!(self.allowed_hosts));
            n.insert(
                "block_private_ips".into(),
                json!(self.block_private_ips.unwrap_or(true)),
            );
            if !self.add_hosts.is_empty() {
                let hosts: Vec<Value> = self
                    .add_hosts
                    .iter()
                    .map(|(h, ip)| json!({"host": h, "ip": ip}))
                    .collect();
                n.insert("add_hosts".into(), Value::Array(hosts));
            }
            if !self.secrets.is_empty() {
                let mut s = Map::new();
                for (name, value, hosts) in &self.secrets {
                    s.insert(name.clone(), json!({"value": value, "hosts": hosts}));
                }
                n.insert("secrets".into(), Value::Object(s));
            }
            if !self.dns_servers.is_empty() {
                n.insert("dns_servers".into(), json!(self.dns_servers));
            }
            if let Some(h) = &self.hostname {
                n.insert("hostname".into(), json!(h));
            }
            if self.mtu > 0 {
                n.insert("mtu".into(), json!(self.mtu));
            }
            for (key, on) in [
                ("intercept", self.intercept),
                ("deny_by_default", self.deny_by_default),
                ("disable_websockets", self.disable_websockets),
            ] {
                if on {
                    n.insert(key.into(), json!(true));
                }
            }
            p.insert("network".into(), Value::Object(n));
        }
        if self.workspace.is_some() || !self.mounts.is_empty() {
            let mut v = Map::new();
            if let Some(w) = &self.workspace {
                v.insert("workspace".into(), json!(w));
            }
            if !self.mounts.is_empty() {
                let mounts: Map<String, Value> = self.mounts.iter().cloned().collect();
                v.insert("mounts".into(), Value::Object(mounts));
            }
            if self.vfs_events {
                v.insert("interception".into(), json!({"emit_events": true}));
            }
            p.insert("vfs".into(), Value::Object(v));
        }
        if !self.env.is_empty() {
            p.insert("env".into(), json!(self.env));
        }
        if !self.disks.is_empty() {
            let d: Vec<Value> = self
                .disks
                .iter()
                .map(|(h, g, ro)| json!({"host_path": h, "guest_mount": g, "readonly": ro}))
                .collect();
            p.insert("extra_disks".into(), Value::Array(d));
        }
        let mut ic = Map::new();
        if let Some(u) = &self.user {
            ic.insert("user".into(), json!(u));
        }
        if let Some(w) = &self.working_dir {
            ic.insert("working_dir".into(), json!(w));
        }
        if !self.entrypoint.is_empty() {
            ic.insert("entrypoint".into(), json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            ic.insert("cmd".into(), json!(self.cmd));
        }
        if !ic.is_empty() {
            p.insert("image_config".into(), Value::Object(ic));
        }
        if launch {
            p.insert("launch_entrypoint".into(), json!(true));
        }
        Value::Object(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(p["resources"], json!({"cpus": 0.5, "timeout_seconds": 30}));
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
    }
}
