//! `run`'s flags into a [`SandboxRequest`]: each value checked by its `matchlock-api` type, with
//! the flag's name in the error. What to do with the request (pull, plan, start, attach) is
//! `run.rs`'s business.

use crate::args::{ProcessArgs, RunArgs};
use anyhow::{anyhow, bail, Context, Result};
use matchlock_api::config::PublishedPort;
use matchlock_api::hosts::HostPattern;
use matchlock_api::request::*;
use matchlock_api::validate;
use matchlock_sandbox::forward::PortMap;

/// Parses `-e` and `--env-file` into ordered pairs. `KEY` alone copies the variable from this
/// process's environment; a `KEY` that is not set is an error (as in Matchlock).
pub fn env(p: &ProcessArgs) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut add = |item: &str, origin: &str| -> Result<()> {
        let (k, v) = match item.split_once('=') {
            Some((k, v)) => (k, v.to_string()),
            None => (
                item,
                std::env::var(item).map_err(|_| {
                    anyhow!("invalid environment variable: {item} (from {origin}) is not set here")
                })?,
            ),
        };
        env_name(k, &format!("invalid environment variable in {origin}"))?;
        if v.contains('\0') {
            bail!("invalid environment variable: {k} in {origin} contains a NUL byte");
        }
        out.push((k.to_string(), v));
        Ok(())
    };
    for f in &p.env_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read env file {}", f.display()))?;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            add(line, &f.display().to_string())?;
        }
    }
    for e in &p.env {
        add(e, "-e")?;
    }
    Ok(out)
}

/// The process flags `run` and `exec` share: working directory and user.
pub fn process(p: &ProcessArgs) -> Result<(Option<GuestPath>, Option<User>)> {
    let workdir = p
        .workdir
        .as_deref()
        .map(|w| GuestPath::new(w, "--workdir"))
        .transpose()?;
    let user = p
        .user
        .as_deref()
        .map(|u| User::new(u, "--user"))
        .transpose()?;
    Ok((workdir, user))
}

/// `--address` values.
pub fn addresses(addresses: &[String]) -> Result<Vec<std::net::IpAddr>> {
    addresses.iter().map(|a| Ok(ip(a, "--address")?)).collect()
}

/// The request `run`'s flags make.
pub fn from_flags(args: &RunArgs) -> Result<SandboxRequest> {
    if args.detach && (args.process.tty || args.process.interactive) {
        bail!("--detach cannot be combined with -t/--tty or -i/--interactive");
    }
    let mut req = SandboxRequest::new(&args.image)?;
    let (workdir, user) = process(&args.process)?;
    req.process.workdir = workdir;
    req.process.user = user;
    req.process.env = env(&args.process)?;
    // Docker's --entrypoint takes one word; "" clears the image's.
    req.process.entrypoint = args.entrypoint.as_ref().map(|e| {
        if e.is_empty() {
            Vec::new()
        } else {
            vec![e.clone()]
        }
    });
    req.process.cmd = args.command.clone();
    req.kernel = args.kernel.clone();
    req.resources.cpus = Some(Cpus::new(args.cpus, "--cpus")?);
    req.resources.memory = Some(MemoryMb::new(args.memory, "--memory")?);
    req.resources.disk = Some(DiskSizeMb::new(args.disk_size, "--disk-size")?);
    req.timeout = args
        .timeout
        .map(|t| TimeoutSecs::new(t, "--timeout"))
        .transpose()?;
    req.hostname = args
        .hostname
        .as_deref()
        .map(|h| Hostname::new(h, "--hostname"))
        .transpose()?;
    req.graceful_shutdown_ms = crate::args::parse_duration_ms(&args.graceful_shutdown)
        .map_err(|e| anyhow!("--graceful-shutdown: {e}"))?;
    req.idle_pause_secs = args
        .idle_pause
        .as_deref()
        .map(|d| {
            let ms = crate::args::parse_duration_ms(d).map_err(|e| anyhow!("--idle-pause: {e}"))?;
            if ms < 1000 {
                return Err(anyhow!("--idle-pause {d} is too short; give at least 1s"));
            }
            Ok(ms / 1000)
        })
        .transpose()?;
    req.privileged = args.privileged;
    req.no_snapshot = args.no_snapshot;
    for h in &args.add_host {
        let (name, addr) = h.split_once(':').ok_or_else(|| {
            anyhow!("invalid add-host mapping: '{h}' must be NAME:IP (e.g. api.internal:10.0.0.10)")
        })?;
        let addr = validate::add_host(name, addr, &format!("invalid add-host mapping '{h}'"))
            .map_err(|e| anyhow!(e))?;
        req.add_hosts.push((addr, name.to_string()));
    }
    req.disks = args
        .disk
        .iter()
        .map(|d| DiskRequest::parse(d))
        .collect::<Result<Vec<_>, _>>()?;
    req.workspace.mounts = args
        .volume
        .iter()
        .map(|v| validate::vfs_mount(v, &args.workspace))
        .collect::<Result<Vec<_>, _>>()
        .and_then(validate::vfs_mounts)
        .map_err(|e| anyhow!(e))?;
    let addresses = addresses(&args.address)?;
    for p in &args.publish {
        let m = p
            .parse::<PortMap>()
            .map_err(|e| anyhow!("--publish: {e}"))?;
        for a in &addresses {
            req.publish.push(PublishedPort {
                address: *a,
                local_port: m.local_port,
                remote_port: m.remote_port,
            });
        }
    }
    req.network = network(args)?;
    // An attached --rm sandbox lives only as long as this process.
    req.remove_on_stop = args.rm && !args.detach;
    req.owner_pid = req.remove_on_stop.then(std::process::id);
    Ok(req)
}

/// The SSH egress flags; `None` without `--ssh-allow`.
fn ssh_egress(args: &RunArgs) -> Result<Option<matchlock_api::config::SshEgressConfig>> {
    if args.ssh_allow.is_empty() {
        if args.ssh_known_hosts.is_some()
            || args.ssh_key.is_some()
            || args.ssh_agent.is_some()
            || !args.ssh_exec.is_empty()
            || args.ssh_allow_unknown_host_keys
        {
            bail!("the --ssh-* flags configure SSH egress; name a server with --ssh-allow HOST[:PORT]");
        }
        return Ok(None);
    }
    let absolute =
        |p: &std::path::Path| -> Result<std::path::PathBuf> { Ok(std::path::absolute(p)?) };
    let known_hosts = match &args.ssh_known_hosts {
        Some(p) => absolute(p)?,
        None => std::env::var_os("HOME")
            .map(|h| std::path::PathBuf::from(h).join(".ssh/known_hosts"))
            .ok_or_else(|| {
                anyhow!("--ssh-allow: no $HOME for ~/.ssh/known_hosts; use --ssh-known-hosts FILE")
            })?,
    };
    let key_file = args.ssh_key.as_deref().map(absolute).transpose()?;
    let agent_socket = match (&args.ssh_agent, &key_file) {
        (Some(s), _) => Some(absolute(s)?),
        // The user's agent, unless a key file was named.
        (None, None) => std::env::var_os("SSH_AUTH_SOCK")
            .filter(|s| !s.is_empty())
            .map(std::path::PathBuf::from),
        (None, Some(_)) => None,
    };
    let c = matchlock_api::config::SshEgressConfig {
        allow: args.ssh_allow.clone(),
        known_hosts,
        allow_unknown_host_keys: args.ssh_allow_unknown_host_keys,
        agent_socket,
        key_file,
        exec_rules: args.ssh_exec.clone(),
        max_sessions: 0,
        max_connections: 0,
    };
    matchlock_ssh_egress::check_config(&c).map_err(|e| anyhow!("--ssh-allow: {e}"))?;
    Ok(Some(c))
}

/// The network flags: `None` for `--no-network`.
fn network(args: &RunArgs) -> Result<Option<NetworkRequest>> {
    if args.no_network {
        if !args.allow_private_host.is_empty()
            || !args.dns_servers.is_empty()
            || args.dns_mode.is_some()
            || !args.allow_host.is_empty()
            || !args.secret.is_empty()
            || args.network_intercept
            || args.deny_by_default
            || args.disable_websockets
            || !plugins(args)?.is_empty()
            || !args.ssh_allow.is_empty()
            || args.follow_redirects
        {
            bail!("--no-network cannot be combined with --allow-host, --secret, --network-intercept, --deny-by-default, --disable-websockets, --allow-private-host, --dns-servers, --dns-mode, --ssh-allow, --follow-redirects or the network plugins (--local-model-route, --usage-log-path, --budget-limit-usd, --plugins-file)");
        }
        if args.event_log.is_some() {
            bail!("--event-log records interception, which --no-network leaves nothing to do");
        }
        return Ok(None);
    }
    let mut n = NetworkRequest::default();
    validate::mtu(args.mtu, "--mtu").map_err(|e| anyhow!(e))?;
    n.mtu = Some(args.mtu as u16);
    for d in &args.dns_servers {
        validate::dns_server(d).map_err(|e| anyhow!("--dns-servers: {e}"))?;
        n.dns_servers.push(d.clone());
    }
    n.dns_mode = args.dns_mode.unwrap_or_default();
    for a in &args.allow_private_host {
        n.allow_private_hosts.push(ip(a, "--allow-private-host")?);
    }
    let i = &mut n.intercept;
    i.force = args.network_intercept;
    i.deny_by_default = args.deny_by_default;
    i.disable_websockets = args.disable_websockets;
    for h in &args.allow_host {
        i.allowed_hosts
            .push(HostPattern::parse(h).map_err(|e| anyhow!("--allow-host: {e}"))?);
    }
    i.secrets = secrets(&args.secret, &secret_files(&args.secret_file)?)?;
    for name in &args.secret_over_http {
        let s = i
            .secrets
            .iter_mut()
            .find(|s| s.name == *name)
            .ok_or_else(|| anyhow!("--secret-over-http {name}: there is no --secret {name}"))?;
        s.allow_http = true;
    }
    i.plugins = plugins(args)?;
    i.ssh_egress = ssh_egress(args)?;
    i.follow_redirects = args.follow_redirects;
    i.run_id = args.run_id.clone();
    i.agent_system = args.agent_system.clone();
    if let Some(p) = &args.event_log {
        if !n.intercepts() {
            bail!("--event-log records interception; add --allow-host, --secret, --network-intercept or --deny-by-default");
        }
        // Absolute, since the supervisor runs elsewhere; created here (0600, as the supervisor
        // would) so a bad path fails before anything boots.
        std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new().create(true).append(true),
            0o600,
        )
        .open(p)
        .map_err(|e| anyhow!("--event-log {}: {e}", p.display()))?;
        n.intercept.event_log = Some(std::fs::canonicalize(p)?);
    }
    Ok(Some(n))
}

/// The network plugins of the flags and of `--plugins-file`, paths made absolute (the
/// supervisor runs elsewhere).
fn plugins(args: &RunArgs) -> Result<matchlock_api::plugins::PluginsConfig> {
    use matchlock_api::plugins::{BudgetConfig, PluginsConfig, RouterConfig, UsageConfig};
    let abs = |p: &std::path::Path| -> Result<std::path::PathBuf> {
        Ok(if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()?.join(p)
        })
    };
    let mut p = PluginsConfig::default();
    if !args.local_model_route.is_empty() {
        p.local_model_router = Some(RouterConfig {
            backend: args.local_model_backend.clone(),
            routes: args.local_model_route.clone(),
        });
    } else if args.local_model_backend.is_some() {
        bail!("--local-model-backend needs at least one --local-model-route SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL");
    }
    if let Some(path) = &args.usage_log_path {
        p.usage_logger = Some(UsageConfig {
            path: abs(path)?,
            price_file: args.price_file.as_deref().map(abs).transpose()?,
        });
    } else if args.price_file.is_some() {
        bail!("--price-file prices the calls --usage-log-path records; add --usage-log-path");
    }
    if let Some(limit_usd) = args.budget_limit_usd {
        p.budget_gate = Some(BudgetConfig { limit_usd });
    }
    if let Some(f) = &args.plugins_file {
        let what = f.display().to_string();
        let text = std::fs::read_to_string(f).map_err(|e| anyhow!("--plugins-file {what}: {e}"))?;
        let mut from_file = matchlock_api::plugins::parse_plugins_file(&text, &what)
            .map_err(|e| anyhow!("--plugins-file {e}"))?;
        // Relative paths in the file are relative to the file.
        let base = f.parent().map(abs).transpose()?.unwrap_or_default();
        if let Some(u) = &mut from_file.usage_logger {
            u.path = base.join(&u.path);
            u.price_file = u.price_file.as_ref().map(|q| base.join(q));
        }
        p.merge(from_file, &what).map_err(|e| anyhow!(e))?;
    }
    p.check().map_err(|e| anyhow!(e))?;
    Ok(p)
}

/// Reads `--secret-file`s: `NAME=VALUE` lines, blank lines and `#` comments. Errors name the
/// file and line, never a value.
pub(crate) fn secret_files(paths: &[std::path::PathBuf]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p)
            .map_err(|e| anyhow!("--secret-file {}: {e}", p.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_start();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, value) = line.split_once('=').ok_or_else(|| {
                anyhow!(
                    "--secret-file {} line {}: expected NAME=VALUE",
                    p.display(),
                    i + 1
                )
            })?;
            let name = name.trim().strip_prefix("export ").unwrap_or(name.trim());
            out.push((name.trim().to_string(), value.to_string()));
        }
    }
    Ok(out)
}

/// Parses `--secret NAME=VALUE@h1,h2` and `NAME@h1,h2` (value from a `--secret-file`, else from
/// this process's environment).
pub(crate) fn secrets(items: &[String], files: &[(String, String)]) -> Result<Vec<SecretRequest>> {
    let mut out = Vec::new();
    for item in items {
        // Never echo the item: it may hold the value.
        let (left, hosts) = item
            .rsplit_once('@')
            .ok_or_else(|| anyhow!("--secret needs NAME[=VALUE]@HOST[,HOST...]"))?;
        let (name, value) = match left.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let from_file = files.iter().rev().find(|(n, _)| n == left);
                let value = match from_file {
                    Some((_, v)) => v.clone(),
                    None => std::env::var(left).map_err(|_| {
                        anyhow!(
                            "--secret {left}@...: {left} is in no --secret-file and not set in \
                             this environment"
                        )
                    })?,
                };
                (left.to_string(), value)
            }
        };
        let what = format!("--secret {name}");
        let hosts: Vec<String> = hosts.split(',').map(str::to_string).collect();
        let value = SecretValue::new(value, &what)?;
        out.push(SecretRequest::new(&name, value, &hosts, None, &what)?);
    }
    Ok(out)
}
