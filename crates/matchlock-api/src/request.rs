//! What a front end asks for, parsed and checked once: a [`SandboxRequest`]. The CLI builds one
//! from its flags, the JSON-RPC server from `create`'s JSON ([`crate::wire::CreateParams`]); the
//! planner (`matchlock_sandbox::plan`) then applies the defaults and the image's config and
//! produces the sandbox's [`crate::config::SandboxConfig`]. Values are checked when their
//! newtype is made, with the name the user knows the setting by (`--cpus`, `resources.cpus`), so
//! every front end accepts exactly the same values and says the same thing about the rest.

use crate::config::{PublishedPort, VfsBlockRule, VfsMount};
use crate::hosts::HostPattern;
use crate::validate;
use crate::wire::RuleSpec;
use std::path::PathBuf;

/// Why a request was refused: one line that says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError(pub String);

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RequestError {}

impl From<String> for RequestError {
    fn from(s: String) -> Self {
        RequestError(s)
    }
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, RequestError>;

macro_rules! checked {
    ($(#[$doc:meta])* $name:ident($ty:ty), $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
        pub struct $name($ty);

        impl $name {
            /// Checks `v`; `what` names the setting in the error.
            pub fn new(v: $ty, what: &str) -> Result<Self> {
                $check(v, what)?;
                Ok($name(v))
            }

            /// The value.
            pub fn get(self) -> $ty {
                self.0
            }
        }
    };
}

checked!(
    /// CPUs, 0.01 to 64; fractions become a CPU quota.
    Cpus(f64),
    validate::cpus
);
checked!(
    /// Guest memory in MiB, 64 to 1 TiB.
    MemoryMb(u64),
    validate::memory_mb
);
checked!(
    /// Writable disk in MiB, 32 MiB to 16 TiB.
    DiskSizeMb(u64),
    validate::disk_size_mb
);
checked!(
    /// Lifetime limit in seconds, 1 s to a year.
    TimeoutSecs(u64),
    validate::timeout_secs
);

/// A checked string: a host name, user or absolute guest path.
macro_rules! checked_str {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            /// Checks `v`; `what` names the setting in the error.
            pub fn new(v: &str, what: &str) -> Result<Self> {
                $check(v, what)?;
                Ok($name(v.to_string()))
            }

            /// The value.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

checked_str!(
    /// A guest host name (letters, digits, `-`, `.`; at most 63 bytes).
    Hostname,
    validate::hostname
);
checked_str!(
    /// A user to run as: uid, uid:gid, name or name:group.
    User,
    validate::user
);
checked_str!(
    /// An absolute guest path without `.`/`..` components.
    GuestPath,
    validate::guest_path
);

/// A secret's real value. It is never printed (`Debug` redacts it), serialized or written to
/// disk: it travels from the front end to the supervisor through a pipe.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    /// A value; empty ones are refused.
    pub fn new(value: String, what: &str) -> Result<Self> {
        if value.is_empty() {
            return Err(format!("{what}: the value is empty").into());
        }
        Ok(SecretValue(value))
    }

    /// The value, for the supervisor's pipe only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// An environment variable name: not empty, no `=`, NUL or whitespace.
pub fn env_name(name: &str, what: &str) -> Result<()> {
    if name.is_empty()
        || name.contains('=')
        || name.contains('\0')
        || name.contains(char::is_whitespace)
    {
        return Err(format!("{what}: invalid environment variable name {name:?}").into());
    }
    Ok(())
}

/// A secret as asked for: the guest sees a placeholder in `$name`, the host sends the value only
/// to `hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRequest {
    /// The environment variable the guest sees.
    pub name: String,
    /// The real value.
    pub value: SecretValue,
    /// Where the value may go (at least one).
    pub hosts: Vec<HostPattern>,
    /// A placeholder of the caller's choice; a fresh random one when `None`.
    pub placeholder: Option<String>,
    /// The value may also go in plain HTTP requests (in clear text); off unless asked for.
    pub allow_http: bool,
}

impl SecretRequest {
    /// Checks a secret; `what` names it in errors (`--secret API_KEY`, `network.secrets.API_KEY`).
    pub fn new(
        name: &str,
        value: SecretValue,
        hosts: &[String],
        placeholder: Option<String>,
        what: &str,
    ) -> Result<Self> {
        env_name(name, what)?;
        let hosts = hosts
            .iter()
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
            .map(|h| HostPattern::parse(h).map_err(|e| RequestError(format!("{what}: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        if hosts.is_empty() {
            return Err(format!("{what}: give at least one host the secret may be sent to").into());
        }
        Ok(SecretRequest {
            name: name.to_string(),
            value,
            hosts,
            placeholder: placeholder.filter(|p| !p.is_empty()),
            allow_http: false,
        })
    }
}

/// CPU, memory, disk; `None` takes the default ([`crate::defaults`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Resources {
    /// CPUs.
    pub cpus: Option<Cpus>,
    /// Memory.
    pub memory: Option<MemoryMb>,
    /// Writable disk.
    pub disk: Option<DiskSizeMb>,
}

/// The process settings the image's config is overridden with (Docker's rules).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessRequest {
    /// Environment over the image's, in order.
    pub env: Vec<(String, String)>,
    /// User; the image's when `None`.
    pub user: Option<User>,
    /// Working directory; the image's when `None`.
    pub workdir: Option<GuestPath>,
    /// Replaces the image's ENTRYPOINT (empty: none) and drops its CMD.
    pub entrypoint: Option<Vec<String>>,
    /// Replaces the image's CMD when not empty.
    pub cmd: Vec<String>,
}

/// Interception as asked for. Whether the sandbox intercepts at all is the planner's call
/// ([`NetworkRequest::intercepts`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InterceptRequest {
    /// Interception even with nothing else asking for it (`--network-intercept`).
    pub force: bool,
    /// Allow-list patterns; empty allows every host unless `deny_by_default`.
    pub allowed_hosts: Vec<HostPattern>,
    /// An empty allow-list allows nothing.
    pub deny_by_default: bool,
    /// Refuse WebSocket upgrades.
    pub disable_websockets: bool,
    /// Secrets.
    pub secrets: Vec<SecretRequest>,
    /// Hook rules, in order.
    pub rules: Vec<RuleSpec>,
    /// Where the SDK serves callback rules.
    pub callback_socket: Option<PathBuf>,
    /// The JSON-lines event log (absolute path).
    pub event_log: Option<PathBuf>,
    /// `run_id` of the events.
    pub run_id: String,
    /// `agent_system` of the events.
    pub agent_system: String,
    /// Network plugins.
    pub plugins: crate::plugins::PluginsConfig,
    /// SSH egress through the host.
    pub ssh_egress: Option<crate::config::SshEgressConfig>,
    /// Follow HTTP redirects on the host within the allow-list.
    pub follow_redirects: bool,
}

/// A network interface, and how its traffic is treated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetworkRequest {
    /// Interface MTU; the default when `None`.
    pub mtu: Option<u16>,
    /// Upstream DNS servers (`IP` or `IP:PORT`).
    pub dns_servers: Vec<String>,
    /// How the guest's DNS is answered.
    pub dns_mode: crate::config::DnsMode,
    /// Addresses opened despite the private-range block.
    pub allow_private_hosts: Vec<std::net::IpAddr>,
    /// Reach every private range (`block_private_ips: false`).
    pub allow_private_ranges: bool,
    /// Interception settings.
    pub intercept: InterceptRequest,
}

impl NetworkRequest {
    /// Whether the sandbox intercepts: asked for outright, or needed by an allow-list, secrets,
    /// hook rules, deny-by-default or the WebSocket switch. Decided here only.
    pub fn intercepts(&self) -> bool {
        let i = &self.intercept;
        i.force
            || i.deny_by_default
            || i.disable_websockets
            || !i.allowed_hosts.is_empty()
            || !i.secrets.is_empty()
            || !i.rules.is_empty()
            || i.callback_socket.is_some()
            || !i.plugins.is_empty()
            || i.ssh_egress.is_some()
            || i.follow_redirects
    }
}

/// The workspace filesystem: mounts, block rules and events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkspaceRequest {
    /// Mounts, parents first (see [`validate::vfs_mounts`]).
    pub mounts: Vec<VfsMount>,
    /// Operations refused with `EPERM`.
    pub block_rules: Vec<VfsBlockRule>,
    /// Report completed operations as events.
    pub emit_events: bool,
}

/// What the sandbox runs once up.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Start {
    /// The image's ENTRYPOINT/CMD (with the request's overrides), attached or detached by the
    /// front end (`run`). It is an error when that is empty.
    #[default]
    Command,
    /// The image's ENTRYPOINT/CMD in the background, when it has one (RPC `launch_entrypoint`).
    Entrypoint,
    /// Nothing (RPC `create` without `launch_entrypoint`).
    Nothing,
}

/// A sandbox request, parsed and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxRequest {
    /// Image reference, as given.
    pub image: String,
    /// A guest kernel (path or `file://` URL), checked by the planner.
    pub kernel: Option<String>,
    /// CPU, memory, disk.
    pub resources: Resources,
    /// All capabilities and no seccomp filter for processes.
    pub privileged: bool,
    /// Boot cold rather than start from a template snapshot.
    pub no_snapshot: bool,
    /// Process overrides.
    pub process: ProcessRequest,
    /// Guest hostname; the sandbox id when `None`.
    pub hostname: Option<Hostname>,
    /// Extra `/etc/hosts` entries `(address, name)`, addresses canonical.
    pub add_hosts: Vec<(String, String)>,
    /// The network; `None` gives the guest no interface.
    pub network: Option<NetworkRequest>,
    /// Workspace mounts.
    pub workspace: WorkspaceRequest,
    /// Extra ext4 disks, as given (the planner finds and checks the files).
    pub disks: Vec<DiskRequest>,
    /// Port forwards the supervisor serves.
    pub publish: Vec<PublishedPort>,
    /// Lifetime limit.
    pub timeout: Option<TimeoutSecs>,
    /// Grace between SIGTERM and SIGKILL at stop, in milliseconds.
    pub graceful_shutdown_ms: u64,
    /// Pause the sandbox after this many seconds without a request from the host (and resume it
    /// on the next one).
    pub idle_pause_secs: Option<u64>,
    /// Remove the sandbox when it stops.
    pub remove_on_stop: bool,
    /// Process whose exit stops the sandbox.
    pub owner_pid: Option<u32>,
    /// What runs once up.
    pub start: Start,
}

impl SandboxRequest {
    /// A request for `image` with every setting at its default.
    pub fn new(image: &str) -> Result<Self> {
        let image = image.trim();
        if image.is_empty() {
            return Err("image is required (e.g., alpine:latest)".to_string().into());
        }
        Ok(SandboxRequest {
            image: image.to_string(),
            kernel: None,
            resources: Resources::default(),
            privileged: false,
            no_snapshot: false,
            process: ProcessRequest::default(),
            hostname: None,
            add_hosts: Vec::new(),
            network: Some(NetworkRequest::default()),
            workspace: WorkspaceRequest::default(),
            disks: Vec::new(),
            publish: Vec::new(),
            timeout: None,
            graceful_shutdown_ms: 0,
            idle_pause_secs: None,
            remove_on_stop: false,
            owner_pid: None,
            start: Start::Command,
        })
    }
}

/// An extra ext4 disk as asked for: a file path or `@VOLUME`, where it is mounted, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRequest {
    /// The ext4 file, or `@NAME` of a named volume.
    pub host: String,
    /// Absolute mount point in the guest.
    pub guest: GuestPath,
    /// Attach and mount read-only.
    pub read_only: bool,
    /// Owner given to the disk's root directory once mounted.
    pub uid: Option<u32>,
    /// Group given to the disk's root directory once mounted.
    pub gid: Option<u32>,
}

impl DiskRequest {
    /// A disk from its parts; `what` names it in errors.
    pub fn new(host: &str, guest: &str, read_only: bool, what: &str) -> Result<Self> {
        if host.is_empty() {
            return Err(format!("{what}: give the ext4 file or @VOLUME").into());
        }
        let guest = GuestPath::new(guest, what)?;
        if guest.as_str() == "/" {
            return Err(format!("{what}: cannot mount a disk over /").into());
        }
        Ok(DiskRequest {
            host: host.to_string(),
            guest,
            read_only,
            uid: None,
            gid: None,
        })
    }

    /// Parses `HOST.ext4:/guest/path[:OPTIONS]` or `@NAME:/guest/path[:OPTIONS]` (`--disk`).
    /// OPTIONS are comma-separated: `ro` (or `rw`), `uid=N`, `gid=N` (the owner the disk's root
    /// directory gets in the guest, e.g. `uid=70,gid=70` for postgres).
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |why: &str| {
            RequestError(format!(
                "invalid disk mount '{spec}': {why}; use HOST.ext4:/guest/path[:ro][,uid=N,gid=N] or @VOLUME:/guest/path[:OPTIONS]"
            ))
        };
        let mut rest = spec;
        let (mut read_only, mut uid, mut gid) = (false, None, None);
        // The last part holds options when every comma-separated word is one.
        if let Some((head, last)) = spec.rsplit_once(':') {
            let words: Vec<&str> = last.split(',').map(str::trim).collect();
            let is_option = |w: &str| {
                matches!(w, "ro" | "rw" | "readonly")
                    || w.starts_with("uid=")
                    || w.starts_with("gid=")
            };
            if !last.starts_with('/') && words.iter().all(|w| is_option(w)) {
                for w in words {
                    let id = |v: &str, what: &str| {
                        v.parse::<u32>()
                            .map_err(|_| bad(&format!("{what} must be a number")))
                    };
                    match w.split_once('=') {
                        Some(("uid", v)) => uid = Some(id(v, "uid")?),
                        Some(("gid", v)) => gid = Some(id(v, "gid")?),
                        _ => read_only = w != "rw",
                    }
                }
                rest = head;
            }
        }
        if read_only && (uid.is_some() || gid.is_some()) {
            return Err(bad(
                "uid= and gid= change the disk's root, which a read-only disk cannot",
            ));
        }
        let (host, guest) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("missing the guest path"))?;
        let mut d =
            DiskRequest::new(host, guest, read_only, "guest path").map_err(|e| bad(&e.0))?;
        (d.uid, d.gid) = (uid, gid);
        Ok(d)
    }
}

/// Parses `IP` into its canonical form for `what`.
pub fn ip(s: &str, what: &str) -> Result<std::net::IpAddr> {
    s.trim()
        .parse()
        .map_err(|_| RequestError(format!("{what} '{s}' is not an IP address")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newtypes_check_once_with_the_users_name() {
        assert_eq!(Cpus::new(0.5, "--cpus").unwrap().get(), 0.5);
        let e = Cpus::new(0.0, "resources.cpus").unwrap_err();
        assert!(e.0.starts_with("resources.cpus 0 is out of range"), "{e}");
        assert!(MemoryMb::new(32, "--memory").is_err());
        assert!(Hostname::new("-bad", "--hostname").is_err());
        assert!(GuestPath::new("/a/../b", "-w").is_err());
        assert!(SandboxRequest::new("  ").is_err());
        let v = SecretValue::new("sk-123".into(), "K").unwrap();
        assert_eq!(format!("{v:?}"), "<redacted>");
        assert!(SecretValue::new(String::new(), "K").is_err());
        let s = SecretRequest::new("K", v.clone(), &[" ".into()], None, "--secret K");
        assert!(s.unwrap_err().0.contains("at least one host"));
        assert!(SecretRequest::new("A B", v, &["x.com".into()], None, "s").is_err());
    }

    #[test]
    fn disk_specs() {
        let d = DiskRequest::parse("/d/a:b.ext4:/mnt/data:ro").unwrap();
        assert_eq!(
            (d.host.as_str(), d.guest.as_str(), d.read_only),
            ("/d/a:b.ext4", "/mnt/data", true)
        );
        let d = DiskRequest::parse("@pg:/var/lib/pg:uid=70,gid=71").unwrap();
        assert_eq!(
            (d.host.as_str(), d.uid, d.gid, d.read_only),
            ("@pg", Some(70), Some(71), false)
        );
        let d = DiskRequest::parse("x.ext4:/d:rw,uid=5").unwrap();
        assert_eq!((d.uid, d.gid, d.read_only), (Some(5), None, false));
        for bad in [
            "x.ext4",
            "x.ext4:data",
            "x.ext4:/",
            "x:/d:ro,uid=5",
            "x:/d:uid=x",
            "x:/d:uid=-1",
        ] {
            let e = DiskRequest::parse(bad).unwrap_err();
            assert!(e.0.starts_with("invalid disk mount"), "{bad}: {e}");
        }
    }

    #[test]
    fn interception_is_decided_in_one_place() {
        let mut n = NetworkRequest::default();
        assert!(!n.intercepts());
        n.intercept.disable_websockets = true;
        assert!(n.intercepts());
        let mut n = NetworkRequest::default();
        n.intercept.rules.push(RuleSpec::default());
        assert!(n.intercepts());
    }
}
