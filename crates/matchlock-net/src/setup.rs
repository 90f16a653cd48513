//! A sandbox's network, built from its configuration: the link addresses, the egress policy,
//! the resolver, the guest-visible stand-ins for host-loopback names, and (in interception mode)
//! the proxy with its CA, allow-list, secrets, hook rules and event log.

use crate::dns::Dns;
use crate::proxy::{upstream_tls, Proxy};
use crate::stack::{Limits, NetConfig, ALIAS_BASE};
use matchlock_api::config::{InterceptConfig, NetworkConfig};
use matchlock_policy::{address, ca, events, hosts, rules, secrets, AddressPolicy, Policy};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

/// The guest's address on its link.
pub const GUEST_IP: [u8; 4] = [192, 168, 127, 2];
/// The gateway: this stack, and the guest's DNS server.
pub const GATEWAY_IP: [u8; 4] = [192, 168, 127, 1];
/// Prefix length of the link.
pub const NET_PREFIX: u8 = 24;
/// The guest's MAC (locally administered, "ML" in the second and third bytes).
pub const GUEST_MAC: [u8; 6] = [0x02, 0x4d, 0x4c, 0x00, 0x00, 0x02];
/// The gateway's MAC.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x4d, 0x4c, 0x00, 0x00, 0x01];

/// What the network of one sandbox is built from.
pub struct SandboxNet<'a> {
    /// The sandbox id (names its CA; the event log's default `run_id`).
    pub id: &'a str,
    /// Its network configuration.
    pub network: &'a NetworkConfig,
    /// Its extra `/etc/hosts` entries `(address, name)`.
    pub add_hosts: &'a [(String, String)],
    /// Secret values by name (from the supervisor's pipe).
    pub secrets: &'a [(String, String)],
    /// Extra PEM roots for upstream TLS (`MATCHLOCK_UPSTREAM_CA`).
    pub upstream_ca: Option<&'a [u8]>,
}

/// `add_hosts` entries pointing at host loopback, each with its guest-visible alias (the guest's
/// own loopback would shadow them).
pub fn loopback_aliases(add_hosts: &[(String, String)]) -> Vec<(Ipv4Addr, IpAddr)> {
    let mut out: Vec<(Ipv4Addr, IpAddr)> = Vec::new();
    for (ip, _) in add_hosts {
        let Ok(real) = ip.parse::<IpAddr>() else {
            continue;
        };
        if !real.is_loopback() || out.iter().any(|(_, r)| *r == real) {
            continue;
        }
        let n = u32::from(ALIAS_BASE) + out.len() as u32;
        out.push((n.into(), real));
    }
    out
}

/// The `/etc/hosts` entries the guest gets: loopback targets replaced by their aliases (only
/// with a network: without one there is nothing to reach).
pub fn guest_hosts(add_hosts: &[(String, String)], networked: bool) -> Vec<(String, String)> {
    let aliases = if networked {
        loopback_aliases(add_hosts)
    } else {
        Vec::new()
    };
    add_hosts
        .iter()
        .map(|(ip, name)| {
            let shown = ip
                .parse::<IpAddr>()
                .ok()
                .and_then(|real| aliases.iter().find(|(_, r)| *r == real))
                .map(|(alias, _)| alias.to_string())
                .unwrap_or_else(|| ip.clone());
            (shown, name.clone())
        })
        .collect()
}

/// Builds the network of a sandbox.
pub fn build(s: SandboxNet<'_>) -> Result<NetConfig, String> {
    let net = s.network;
    let mut allow = Vec::new();
    for a in &net.allow_private_hosts {
        allow.push(
            a.parse()
                .map_err(|_| format!("--allow-private-host '{a}' is not an IP address"))?,
        );
    }
    let address = AddressPolicy {
        allow,
        allow_private_ranges: net.allow_private_ranges,
        host_addrs: address::host_addresses(),
    };
    let mut upstreams = Vec::new();
    for d in &net.dns_servers {
        upstreams.push(
            matchlock_api::validate::dns_server(d).map_err(|e| format!("--dns-servers: {e}"))?,
        );
    }
    if upstreams.is_empty() {
        upstreams = crate::dns::host_resolvers();
    }
    let hosts: Vec<(String, IpAddr)> = guest_hosts(s.add_hosts, true)
        .into_iter()
        .filter_map(|(ip, name)| Some((name.to_ascii_lowercase(), ip.parse().ok()?)))
        .collect();
    let plugins = match &net.intercept {
        Some(ic) => Some(matchlock_policy::plugins::Plugins::from_config(
            &ic.plugins,
        )?),
        None => None,
    };
    let policy = match (&net.intercept, &plugins) {
        (Some(ic), Some(plugins)) => {
            let backends = resolve_backends(plugins)?;
            let mut policy = intercepting(address, ic, &hosts)?.with_backends(backends);
            if let Some(e) = &ic.ssh_egress {
                // Their names resolve for the guest even when HTTP to them is not allowed.
                let names: Vec<String> = e
                    .allow
                    .iter()
                    .map(|d| {
                        d.rsplit_once(':')
                            .map_or(d.as_str(), |(h, _)| h)
                            .to_string()
                    })
                    .collect();
                let list = hosts::AllowList::new(&names)
                    .map_err(|e| format!("--ssh-allow: {e}"))?
                    .deny_by_default();
                policy = policy.with_ssh_hosts(list);
            }
            Arc::new(policy)
        }
        _ => Arc::new(Policy::direct(address)),
    };
    // The names the user gave addresses (`--add-host`), as the host itself reaches them.
    let host_names: Vec<(String, IpAddr)> = s
        .add_hosts
        .iter()
        .filter_map(|(ip, name)| Some((name.to_ascii_lowercase(), ip.parse().ok()?)))
        .collect();
    let dns = Arc::new(Dns {
        upstreams,
        hosts,
        policy: policy.clone(),
        mode: net.dns_mode,
        synthetic: Default::default(),
    });
    let intercept = match (&net.intercept, plugins) {
        (Some(ic), Some(plugins)) => {
            let mut proxy = interception(&s, ic, policy.clone())?.with_plugins(plugins);
            if let Some(e) = &ic.ssh_egress {
                let cfg = matchlock_ssh_egress::EgressConfig::from_config(e)
                    .map_err(|e| format!("SSH egress: {e}"))?;
                proxy = proxy.with_ssh_egress(cfg);
            }
            if ic.follow_redirects {
                proxy = proxy.with_redirects(redirect_resolver(dns.clone(), host_names));
            }
            Some(Arc::new(proxy))
        }
        _ => None,
    };
    Ok(NetConfig {
        guest_ip: GUEST_IP.into(),
        gateway_ip: GATEWAY_IP.into(),
        prefix: NET_PREFIX,
        gateway_mac: GATEWAY_MAC,
        mtu: net.mtu,
        dns,
        policy,
        limits: Limits::default(),
        aliases: loopback_aliases(s.add_hosts),
        intercept,
    })
}

/// How the proxy resolves the host a redirect leads to: a name `--add-host` gave an address,
/// else the sandbox's resolvers (with their checks and cache), first IPv4 address.
fn redirect_resolver(
    dns: Arc<Dns>,
    names: Vec<(String, IpAddr)>,
) -> crate::proxy::redirect::Resolver {
    let names = Arc::new(names);
    Arc::new(move |host: String| {
        let (dns, names) = (dns.clone(), names.clone());
        Box::pin(async move {
            if let Some((_, ip)) = names.iter().find(|(n, _)| *n == host) {
                return Ok(*ip);
            }
            dns.lookup(&host)
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| format!("{host} has no address"))
        })
    })
}

/// The policy of an intercepting sandbox: its allow-list (opened for each secret's hosts when
/// it names hosts) and the names the guest's `/etc/hosts` already tells it.
fn intercepting(
    address: AddressPolicy,
    ic: &InterceptConfig,
    hosts: &[(String, IpAddr)],
) -> Result<Policy, String> {
    let mut allow =
        hosts::AllowList::new(&ic.allowed_hosts).map_err(|e| format!("--allow-host: {e}"))?;
    if ic.deny_by_default {
        allow = allow.deny_by_default();
    }
    // A list that names hosts also opens each secret's hosts; an empty list already allows
    // every host, and adding them would close it to all others.
    if !ic.allowed_hosts.is_empty() || ic.deny_by_default {
        for spec in &ic.secrets {
            allow
                .add(&spec.hosts)
                .map_err(|e| format!("--secret {}: {e}", spec.name))?;
        }
    }
    let names = Arc::new(hosts::NameTable::default());
    for (name, ip) in hosts {
        names.record(name, &[*ip]);
    }
    Ok(Policy::intercepting(address, allow, names).with_websockets(!ic.disable_websockets))
}

/// The addresses of the model backends the router may send to, resolved once at start (a
/// name the host cannot resolve fails the start, not the first call).
fn resolve_backends(
    plugins: &matchlock_policy::plugins::Plugins,
) -> Result<Vec<(String, std::net::SocketAddr)>, String> {
    use std::net::ToSocketAddrs;
    let mut out = Vec::new();
    for b in plugins.router.iter().flat_map(|r| r.backends()) {
        let addrs = (b.host.as_str(), b.port)
            .to_socket_addrs()
            .map_err(|e| format!("local model backend {b}: {e}"))?;
        let first = addrs
            .into_iter()
            .next()
            .ok_or_else(|| format!("local model backend {b}: no address"))?;
        out.push((b.to_string(), first));
    }
    Ok(out)
}

/// The interception proxy of a sandbox: its CA, secrets, upstream trust, event log and rules.
fn interception(
    s: &SandboxNet<'_>,
    ic: &InterceptConfig,
    policy: Arc<Policy>,
) -> Result<Proxy, String> {
    let mut list = Vec::new();
    for spec in &ic.secrets {
        let Some((_, value)) = s.secrets.iter().find(|(n, _)| *n == spec.name) else {
            return Err(format!("no value was passed for secret {}", spec.name));
        };
        let to = hosts::AllowList::new(&spec.hosts)
            .map_err(|e| format!("--secret {}: {e}", spec.name))?;
        list.push(
            secrets::Secret::new(&spec.name, value, to, Some(&spec.placeholder))
                .allow_http(spec.allow_http),
        );
    }
    let ca = ca::MitmCa::generate(s.id).map_err(|e| e.to_string())?;
    let tls = upstream_tls(s.upstream_ca)?;
    let events = match &ic.event_log {
        Some(path) => {
            let run_id = if ic.run_id.is_empty() {
                s.id
            } else {
                ic.run_id.as_str()
            };
            Some(Arc::new(
                events::EventLog::open(path, run_id, &ic.agent_system)
                    .map_err(|e| format!("--event-log {}: {e}", path.display()))?,
            ))
        }
        None => None,
    };
    Ok(Proxy::new(
        policy,
        secrets::Secrets::new(list),
        ca,
        tls,
        events,
        rules::Rules::new(ic.rules.clone(), ic.callback_socket.clone())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_names_get_aliases_the_guest_can_reach() {
        let add = vec![
            ("127.0.0.1".to_string(), "api.test".to_string()),
            ("10.0.0.5".to_string(), "db.test".to_string()),
            ("127.0.0.1".to_string(), "other.test".to_string()),
        ];
        let aliases = loopback_aliases(&add);
        assert_eq!(aliases, [(ALIAS_BASE, "127.0.0.1".parse().unwrap())]);
        assert_eq!(
            guest_hosts(&add, true),
            [
                (ALIAS_BASE.to_string(), "api.test".to_string()),
                ("10.0.0.5".to_string(), "db.test".to_string()),
                (ALIAS_BASE.to_string(), "other.test".to_string()),
            ]
        );
        assert_eq!(guest_hosts(&add, false)[0].0, "127.0.0.1");
    }

    #[test]
    fn builds_interception_with_secrets_and_refuses_a_missing_value() {
        let network = NetworkConfig {
            intercept: Some(matchlock_api::config::InterceptConfig {
                secrets: vec![matchlock_api::config::SecretSpec {
                    name: "K".into(),
                    hosts: vec!["api.test".into()],
                    placeholder: "PH".into(),
                    allow_http: false,
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = |secrets| SandboxNet {
            id: "vm-00000001",
            network: &network,
            add_hosts: &[],
            secrets,
            upstream_ca: None,
        };
        let given = [("K".to_string(), "v".to_string())];
        let net = build(spec(&given)).unwrap();
        assert!(net.intercept.is_some() && net.policy.intercepts());
        // An empty allow-list with a secret allows every host (the secret does not close it).
        assert!(net.policy.allows_host("anything.test") && net.policy.is_open());
        let e = build(spec(&[])).err().unwrap();
        assert!(e.contains("no value was passed for secret K"), "{e}");
    }
}
