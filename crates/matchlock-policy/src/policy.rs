//! A sandbox's network policy as one value that the network stack, the resolver and the proxy
//! all ask, and whose answers are [`Allowed`] or [`Denial`]. It opens no connection.

use crate::address::AddressPolicy;
use crate::decision::{Allowed, Denial, Route, Target};
use crate::hosts::{normalize, AllowList, NameTable};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};

/// The network policy of one sandbox.
#[derive(Debug)]
pub struct Policy {
    address: AddressPolicy,
    /// The host allow-list; `Some` when the sandbox intercepts.
    hosts: Option<RwLock<AllowList>>,
    names: Arc<NameTable>,
    websockets: bool,
    /// Bumped on every allow-list change, so that long-lived flows (WebSocket tunnels, relayed
    /// connections) re-check themselves instead of keeping a permission that was taken away.
    changes: tokio::sync::watch::Sender<u64>,
    /// The local model backends the proxy may send routed calls to, as configured
    /// (`HOST:PORT`) with the address each resolved to at start (the guest itself cannot reach
    /// them unless also opened for it).
    backends: Vec<(String, SocketAddr)>,
    /// The SSH egress servers' hosts: their names resolve for the guest even off the HTTP
    /// allow-list (what may be done with them is the SSH egress proxy's call).
    ssh_hosts: Option<AllowList>,
}

/// A request as far as the gate looks at it.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    /// The normalized host it names.
    pub host: &'a str,
    /// The TLS server name of its connection (`None` for plain HTTP).
    pub sni: Option<&'a str>,
    /// Whether it asks to become a WebSocket.
    pub websocket: bool,
}

/// The allow-list after an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsUpdate {
    /// Patterns that were new.
    pub added: Vec<String>,
    /// Patterns that were present and are gone.
    pub removed: Vec<String>,
    /// The list now.
    pub allowed: Vec<String>,
    /// Whether an empty list denies everything.
    pub deny_by_default: bool,
}

impl Policy {
    /// A sandbox that does not intercept: every flow is checked by its address only.
    pub fn direct(address: AddressPolicy) -> Policy {
        Policy {
            address,
            hosts: None,
            names: Arc::default(),
            websockets: true,
            changes: tokio::sync::watch::Sender::new(0),
            backends: Vec::new(),
            ssh_hosts: None,
        }
    }

    /// A sandbox that intercepts: HTTP(S) requests are checked by host against `allow` and
    /// against what the sandbox's DNS told the guest (`names`); other TCP traffic passes only
    /// while `allow` is open, other protocols not at all.
    pub fn intercepting(address: AddressPolicy, allow: AllowList, names: Arc<NameTable>) -> Policy {
        Policy {
            address,
            hosts: Some(RwLock::new(allow)),
            names,
            websockets: true,
            changes: tokio::sync::watch::Sender::new(0),
            backends: Vec::new(),
            ssh_hosts: None,
        }
    }

    /// The hosts of the SSH egress servers (their names resolve; see [`Policy::may_resolve`]).
    pub fn with_ssh_hosts(mut self, hosts: AllowList) -> Policy {
        self.ssh_hosts = Some(hosts);
        self
    }

    /// Whether the sandbox's DNS may resolve `host` for the guest: an allowed host, or an SSH
    /// egress server's (allowed for SSH only).
    pub fn may_resolve(&self, host: &str) -> bool {
        self.allows_host(host) || self.ssh_hosts.as_ref().is_some_and(|l| l.allows(host))
    }

    /// Whether WebSocket upgrades are allowed (the default).
    pub fn with_websockets(mut self, allowed: bool) -> Policy {
        self.websockets = allowed;
        self
    }

    /// Lets the proxy send routed model calls to these backends (`local_model_router`): each
    /// as configured (`HOST:PORT`) and the address it resolved to.
    pub fn with_backends(mut self, backends: Vec<(String, SocketAddr)>) -> Policy {
        self.backends = backends;
        self
    }

    /// A routed model call to the backend `name` (`HOST:PORT` as configured): allowed only for
    /// the backends the sandbox was configured with, at the address resolved at start, whatever
    /// the address rules say (they are the user's own choice, made outside the guest).
    pub fn backend(&self, name: &str) -> Result<Allowed, Denial> {
        match self.backends.iter().find(|(b, _)| b == name) {
            Some((_, addr)) => Ok(Allowed::new(*addr, Some(name.to_string()), Route::Backend)),
            None => Err(Denial::NotAllowed {
                host: name.to_string(),
            }),
        }
    }

    /// Whether the sandbox intercepts.
    pub fn intercepts(&self) -> bool {
        self.hosts.is_some()
    }

    /// The names the guest was told (interception).
    pub fn names(&self) -> &Arc<NameTable> {
        &self.names
    }

    fn read<T>(&self, f: impl FnOnce(&AllowList) -> T, without: T) -> T {
        match &self.hosts {
            Some(l) => f(&l.read().unwrap_or_else(PoisonError::into_inner)),
            None => without,
        }
    }

    /// Whether `host` is allowed (always, without interception).
    pub fn allows_host(&self, host: &str) -> bool {
        self.read(|l| l.allows(host), true)
    }

    /// Whether every host is allowed: then traffic that is not HTTP is relayed as is.
    pub fn is_open(&self) -> bool {
        self.read(AllowList::is_open, true)
    }

    /// Whether the address may be reached; the resolver drops answers that fail this.
    pub fn address_allowed(&self, ip: IpAddr) -> bool {
        self.address.check(ip).is_ok()
    }

    /// Adds then removes allow-list patterns. Fails without interception (there is no list) or
    /// on a pattern that is not a host pattern, changing nothing.
    pub fn update_hosts(&self, add: &[String], remove: &[String]) -> Result<HostsUpdate, String> {
        let Some(l) = &self.hosts else {
            return Err(
                "allow-list updates unavailable: sandbox was started without network \
                        interception"
                    .into(),
            );
        };
        let mut l = l.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = l.clone();
        let added = next.add(add)?;
        let removed = next.remove(remove);
        *l = next;
        let update = HostsUpdate {
            added,
            removed,
            allowed: l.patterns(),
            deny_by_default: l.denies_when_empty(),
        };
        drop(l);
        self.changes.send_modify(|n| *n += 1);
        Ok(update)
    }

    /// Resolves once `still` no longer holds after an allow-list change (checked at each change,
    /// not before the first): a long-lived flow races its relay against this and ends when the
    /// permission it was opened under is gone. Pends forever when nothing revokes it.
    pub async fn revoked(&self, still: impl Fn(&Policy) -> bool) {
        let mut rx = self.changes.subscribe();
        while rx.changed().await.is_ok() {
            if !still(self) {
                return;
            }
        }
        std::future::pending::<()>().await
    }

    fn check_address(&self, subject: impl FnOnce() -> String, ip: IpAddr) -> Result<(), Denial> {
        self.address.check(ip).map_err(|blocked| Denial::Address {
            subject: subject(),
            blocked,
        })
    }

    /// A TCP connection relayed as is. Under interception every TCP flow goes to the proxy
    /// instead, so this refuses.
    pub fn tcp(&self, target: Target) -> Result<Allowed, Denial> {
        self.direct_flow(target)
    }

    /// A UDP flow relayed as is; refused under interception.
    pub fn udp(&self, target: Target) -> Result<Allowed, Denial> {
        self.direct_flow(target)
    }

    fn direct_flow(&self, target: Target) -> Result<Allowed, Denial> {
        if self.intercepts() {
            return Err(Denial::Intercepted {
                dest: target.visible,
            });
        }
        self.check_address(|| target.real.to_string(), target.real.ip())?;
        Ok(Allowed::new(target.real, None, Route::Direct))
    }

    /// A DNS query to the server the guest named, in the DNS mode that allows that (`open`):
    /// relayed as is to an address that may be reached, intercepting or not (the mode says the
    /// operator accepts what queries can carry).
    pub fn dns_query(&self, target: Target) -> Result<Allowed, Denial> {
        self.check_address(|| target.real.to_string(), target.real.ip())?;
        Ok(Allowed::new(target.real, None, Route::Direct))
    }

    /// Traffic that is not HTTP (`what` says what it is), under interception: relayed as is only
    /// while the allow-list is open, and only to an address that may be reached.
    pub fn passthrough(&self, target: Target, what: &'static str) -> Result<Allowed, Denial> {
        if !self.is_open() {
            return Err(Denial::NotHttp {
                dest: target.visible,
            });
        }
        self.check_address(|| target.real.to_string(), target.real.ip())?;
        Ok(Allowed::new(target.real, None, Route::Passthrough(what)))
    }

    /// An SSH connection to `host` through the SSH egress proxy (which has checked `host` is one
    /// of its servers): the guest must have been told `host` is at the address it connected to,
    /// and the real address must be one that may be reached.
    pub fn ssh(&self, host: &str, target: Target) -> Result<Allowed, Denial> {
        let visible = IpAddr::V4(*target.visible.ip());
        if !self.names.agrees(host, visible) {
            return Err(Denial::Unresolved {
                host: host.to_string(),
                addr: visible,
            });
        }
        self.check_address(|| host.to_string(), target.real.ip())?;
        Ok(Allowed::new(
            target.real,
            Some(host.to_string()),
            Route::Passthrough("SSH, through the SSH egress proxy"),
        ))
    }

    /// A redirect the proxy follows on the host to `host`, which the host resolved itself to
    /// `real`: the host must be allowed and the address one that may be reached.
    pub fn redirect(&self, host: &str, real: SocketAddr) -> Result<Allowed, Denial> {
        if !self.allows_host(host) {
            return Err(Denial::NotAllowed {
                host: host.to_string(),
            });
        }
        self.check_address(|| host.to_string(), real.ip())?;
        Ok(Allowed::new(real, Some(host.to_string()), Route::Request))
    }

    /// The gate every HTTP(S) request passes before anything is sent: its Host agrees with the
    /// TLS server name, is allowed, and agrees with the address the guest connected to (as the
    /// sandbox's DNS told it); that address may be reached; a WebSocket upgrade is allowed.
    pub fn request(&self, req: RequestHead<'_>, target: Target) -> Result<Allowed, Denial> {
        let host = req.host;
        if let Some(sni) = req.sni {
            if normalize(sni) != host {
                return Err(Denial::SniMismatch {
                    host: host.to_string(),
                    sni: sni.to_string(),
                });
            }
        }
        if !self.allows_host(host) {
            return Err(Denial::NotAllowed {
                host: host.to_string(),
            });
        }
        let visible = IpAddr::V4(*target.visible.ip());
        if self.intercepts() && !self.names.agrees(host, visible) {
            return Err(Denial::Unresolved {
                host: host.to_string(),
                addr: visible,
            });
        }
        self.check_address(|| host.to_string(), target.real.ip())?;
        if req.websocket && !self.websockets {
            return Err(Denial::WebSocketsDisabled {
                host: host.to_string(),
            });
        }
        Ok(Allowed::new(
            SocketAddr::new(target.real.ip(), target.real.port()),
            Some(host.to_string()),
            Route::Request,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddrV4;

    fn target(ip: [u8; 4], port: u16) -> Target {
        Target {
            visible: SocketAddrV4::new(ip.into(), port),
            real: SocketAddr::from((ip, port)),
        }
    }

    fn head(host: &str) -> RequestHead<'_> {
        RequestHead {
            host,
            sni: Some(host),
            websocket: false,
        }
    }

    fn intercepting(allow: &[&str]) -> Policy {
        let names = Arc::new(NameTable::default());
        names.record("api.test", &["8.8.8.8".parse().unwrap()]);
        Policy::intercepting(
            AddressPolicy::default(),
            AllowList::new(allow).unwrap(),
            names,
        )
    }

    #[test]
    fn direct_flows_are_checked_by_address_only() {
        let p = Policy::direct(AddressPolicy::default());
        let ok = p.tcp(target([8, 8, 8, 8], 22)).unwrap();
        assert_eq!(ok.route(), Route::Direct);
        assert_eq!(ok.addr(), SocketAddr::from(([8, 8, 8, 8], 22)));
        assert!(matches!(
            p.udp(target([127, 0, 0, 1], 53)),
            Err(Denial::Address { .. })
        ));
        assert!(p.allows_host("anything") && p.is_open());
        assert!(p.update_hosts(&["a.test".into()], &[]).is_err());
    }

    #[test]
    fn interception_refuses_direct_flows_and_gates_requests() {
        let p = intercepting(&["api.test"]);
        assert!(matches!(
            p.udp(target([8, 8, 8, 8], 53)),
            Err(Denial::Intercepted { .. })
        ));
        assert!(matches!(
            p.tcp(target([8, 8, 8, 8], 22)),
            Err(Denial::Intercepted { .. })
        ));
        let t = target([8, 8, 8, 8], 443);
        let ok = p.request(head("api.test"), t).unwrap();
        assert_eq!((ok.host(), ok.route()), (Some("api.test"), Route::Request));
        assert_eq!(
            p.request(head("other.test"), t),
            Err(Denial::NotAllowed {
                host: "other.test".into()
            })
        );
        let mismatch = RequestHead {
            sni: Some("other.test"),
            ..head("api.test")
        };
        assert!(matches!(
            p.request(mismatch, t),
            Err(Denial::SniMismatch { .. })
        ));
        // Allowed by name, sent to an address the guest chose itself.
        assert!(matches!(
            p.request(head("api.test"), target([9, 9, 9, 9], 443)),
            Err(Denial::Unresolved { .. })
        ));
        // Non-HTTP passes only while the list is open.
        assert!(matches!(
            p.passthrough(t, "not HTTP"),
            Err(Denial::NotHttp { .. })
        ));
        let open = intercepting(&[]);
        assert_eq!(
            open.passthrough(t, "not HTTP").unwrap().route(),
            Route::Passthrough("not HTTP")
        );
        assert!(matches!(
            open.passthrough(target([10, 0, 0, 1], 22), "not HTTP"),
            Err(Denial::Address { .. })
        ));
    }

    #[test]
    fn a_resolved_name_still_needs_a_reachable_address() {
        let names = Arc::new(NameTable::default());
        names.record("meta.test", &["169.254.169.254".parse().unwrap()]);
        let p = Policy::intercepting(AddressPolicy::default(), AllowList::default(), names);
        let e = p
            .request(head("meta.test"), target([169, 254, 169, 254], 80))
            .unwrap_err();
        assert!(e.to_string().contains("--allow-private-host"), "{e}");
        assert_eq!(e.subject(), "meta.test");
    }

    #[test]
    fn websockets_can_be_refused() {
        let p = intercepting(&["api.test"]).with_websockets(false);
        let ws = RequestHead {
            websocket: true,
            ..head("api.test")
        };
        assert!(matches!(
            p.request(ws, target([8, 8, 8, 8], 443)),
            Err(Denial::WebSocketsDisabled { .. })
        ));
    }

    #[test]
    fn updates_change_the_list_whole_or_not_at_all() {
        let p = intercepting(&["api.test"]);
        let u = p
            .update_hosts(&["b.test".into()], &["api.test".into()])
            .unwrap();
        assert_eq!(u.added, ["b.test"]);
        assert_eq!(u.removed, ["api.test"]);
        assert_eq!(u.allowed, ["b.test"]);
        assert!(p
            .update_hosts(&["bad host!".into()], &["b.test".into()])
            .is_err());
        assert!(p.allows_host("b.test"));
    }
}
