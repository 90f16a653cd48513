//! The policy's answers. Opening a host connection takes an [`Allowed`], which only
//! [`Policy`](crate::Policy) issues, after every check passed; a refusal is a [`Denial`], which
//! maps to one HTTP status, one event and one log line wherever it is met.

use crate::address::Blocked;
use crate::events::Event;
use crate::secrets::Leak;
use serde_json::json;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};

/// Where a guest flow was headed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The address the guest connected to.
    pub visible: SocketAddrV4,
    /// Where that really is (differs for host-loopback aliases).
    pub real: SocketAddr,
}

/// What an allowed connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A TCP connection or UDP flow relayed as is: the sandbox does not intercept.
    Direct,
    /// Traffic that is not HTTP, relayed as is because the allow-list is open; says what it is.
    Passthrough(&'static str),
    /// HTTP(S) requests for [`Allowed::host`], re-issued by the proxy.
    Request,
    /// Model calls the `local_model_router` sends to a configured backend instead.
    Backend,
}

/// Permission to open one host connection. It has no public constructor: the only way to get
/// one is a decision of [`Policy`](crate::Policy), so code that connects upstream and takes an
/// `Allowed` cannot skip the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    addr: SocketAddr,
    host: Option<String>,
    route: Route,
}

impl Allowed {
    pub(crate) fn new(addr: SocketAddr, host: Option<String>, route: Route) -> Allowed {
        Allowed { addr, host, route }
    }

    /// The real address to connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The host name that was checked (HTTP requests).
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// What the connection carries.
    pub fn route(&self) -> Route {
        self.route
    }

    /// The `gate_decision` event that records it.
    pub fn event(&self) -> Event {
        let addr = self.addr.to_string();
        match (self.route, &self.host) {
            (Route::Request, Some(host)) => Event {
                kind: "gate_decision",
                summary: format!("gate allowed {host} by host_filter"),
                plugin: Some("host_filter"),
                data: json!({"host": host, "allowed": true}),
            },
            (Route::Passthrough(what), _) => Event {
                kind: "gate_decision",
                summary: format!("gate allowed {addr}: passthrough ({what})"),
                plugin: Some("host_filter"),
                data: json!({"host": addr, "allowed": true, "passthrough": true}),
            },
            _ => Event {
                kind: "gate_decision",
                summary: format!("gate allowed {addr}"),
                plugin: Some("host_filter"),
                data: json!({"host": addr, "allowed": true}),
            },
        }
    }
}

/// Why something was refused. Its `Display` is the reason the guest and the log read; it never
/// holds a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// An HTTP request without a Host.
    #[error("the request names no host")]
    NoHost,
    /// A request two parsers could read differently (two `Host` headers, or both
    /// `Content-Length` and `Transfer-Encoding`): refused rather than guessed at, so what the
    /// policy approved is what the upstream reads (RFC 9112 §3.2 and §6.1).
    #[error("ambiguous request: {0}")]
    Ambiguous(&'static str),
    /// A request target that cannot be re-issued.
    #[error("unparsable request target")]
    BadTarget {
        /// The request's host.
        host: String,
    },
    /// The Host of a TLS request is not the name the client's handshake asked for.
    #[error("Host {host} does not match the TLS server name {sni}")]
    SniMismatch {
        /// The Host.
        host: String,
        /// The TLS server name.
        sni: String,
    },
    /// The host is not on the allow-list.
    #[error("{host} is not on this sandbox's allow-list")]
    NotAllowed {
        /// The host.
        host: String,
    },
    /// The guest sent a request for `host` to an address the sandbox's DNS never gave it for
    /// that name.
    #[error("{addr} is not an address matchlock resolved {host} to")]
    Unresolved {
        /// The host.
        host: String,
        /// The address the guest connected to.
        addr: IpAddr,
    },
    /// The destination address is blocked.
    #[error("{blocked}")]
    Address {
        /// The host or address the refusal is about.
        subject: String,
        /// Which address and why.
        blocked: Blocked,
    },
    /// Traffic that is not HTTP, while the allow-list names hosts.
    #[error("only HTTP(S) passes interception with an allow-list")]
    NotHttp {
        /// Where it was headed.
        dest: SocketAddrV4,
    },
    /// A flow other than TCP while the sandbox intercepts.
    #[error("interception allows only HTTP(S)")]
    Intercepted {
        /// Where it was headed.
        dest: SocketAddrV4,
    },
    /// A WebSocket upgrade while WebSockets are disabled.
    #[error("WebSockets are disabled for this sandbox")]
    WebSocketsDisabled {
        /// The host.
        host: String,
    },
    /// A secret's placeholder headed for a host the secret is not for, or into plain HTTP.
    #[error("{0}")]
    Secret(Leak),
    /// A response compressed in a way the proxy cannot undo, so it cannot be scrubbed of
    /// secret values.
    #[error("{host} answered with Content-Encoding {coding}, which matchlock cannot decode to keep secrets out of it (it decodes gzip and deflate)")]
    Undecodable {
        /// The host.
        host: String,
        /// The coding named.
        coding: String,
    },
    /// A hook rule refused the request or its response.
    #[error("{reason}")]
    Rule {
        /// The host.
        host: String,
        /// The rule's reason.
        reason: String,
    },
    /// The guest's TLS handshake with the proxy failed.
    #[error("TLS handshake failed: {error}")]
    Handshake {
        /// The server name.
        name: String,
        /// What failed.
        error: String,
    },
    /// The sandbox has as many connections open as it may.
    #[error("too many connections")]
    TooManyConnections,
}

impl Denial {
    /// The HTTP status a refused request gets.
    pub fn status(&self) -> u16 {
        match self {
            Denial::NoHost | Denial::Ambiguous(_) | Denial::BadTarget { .. } => 400,
            Denial::Undecodable { .. } => 502,
            _ => 403,
        }
    }

    /// The host or address the refusal is about.
    pub fn subject(&self) -> String {
        match self {
            Denial::NoHost | Denial::Ambiguous(_) | Denial::TooManyConnections => String::new(),
            Denial::BadTarget { host }
            | Denial::SniMismatch { host, .. }
            | Denial::NotAllowed { host }
            | Denial::Unresolved { host, .. }
            | Denial::WebSocketsDisabled { host }
            | Denial::Undecodable { host, .. }
            | Denial::Rule { host, .. } => host.clone(),
            Denial::Address { subject, .. } => subject.clone(),
            Denial::NotHttp { dest } | Denial::Intercepted { dest } => dest.to_string(),
            Denial::Secret(leak) => leak.host.clone(),
            Denial::Handshake { name, .. } => name.clone(),
        }
    }

    /// The `gate_decision` event that records it.
    pub fn event(&self) -> Event {
        let subject = self.subject();
        let reason = self.to_string();
        let (plugin, mut data) = match self {
            Denial::Secret(leak) => (
                Some("secret_injector"),
                json!({"host": subject, "allowed": false, "reason": reason, "secret": leak.name}),
            ),
            Denial::Undecodable { .. } => (
                Some("secret_injector"),
                json!({"host": subject, "allowed": false, "reason": reason}),
            ),
            _ => (
                Some("host_filter"),
                json!({"host": subject, "allowed": false, "reason": reason}),
            ),
        };
        let summary = match self {
            Denial::Handshake { name, error } => {
                format!("TLS handshake with the guest failed for {name}: {error}")
            }
            _ => format!("gate blocked {subject}: {reason}"),
        };
        if let Denial::Rule { .. } = self {
            data["rule"] = json!(true);
        }
        Event {
            kind: "gate_decision",
            summary,
            plugin,
            data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Range;
    use crate::secrets::LeakKind;

    #[test]
    fn every_denial_has_one_status_one_event_and_a_reason() {
        let dest = SocketAddrV4::new([10, 0, 0, 1].into(), 22);
        let all = [
            Denial::NoHost,
            Denial::Ambiguous("two Host headers"),
            Denial::BadTarget { host: "h".into() },
            Denial::SniMismatch {
                host: "a".into(),
                sni: "b".into(),
            },
            Denial::NotAllowed { host: "h".into() },
            Denial::Unresolved {
                host: "h".into(),
                addr: [1, 2, 3, 4].into(),
            },
            Denial::Address {
                subject: "h".into(),
                blocked: Blocked {
                    addr: [127, 0, 0, 1].into(),
                    what: Range::NotPublic("a loopback address"),
                },
            },
            Denial::NotHttp { dest },
            Denial::Intercepted { dest },
            Denial::WebSocketsDisabled { host: "h".into() },
            Denial::Secret(Leak {
                name: "K".into(),
                host: "evil.test".into(),
                why: LeakKind::OtherHost,
            }),
            Denial::Secret(Leak {
                name: "K".into(),
                host: "api.test".into(),
                why: LeakKind::Cleartext,
            }),
            Denial::Rule {
                host: "h".into(),
                reason: "no".into(),
            },
            Denial::Handshake {
                name: "h".into(),
                error: "bad".into(),
            },
            Denial::Undecodable {
                host: "h".into(),
                coding: "br".into(),
            },
            Denial::TooManyConnections,
        ];
        for d in all {
            let e = d.event();
            assert_eq!(e.kind, "gate_decision");
            assert_eq!(e.data["allowed"], false, "{d:?}");
            assert_eq!(e.data["reason"], d.to_string());
            assert!(e.summary.contains(&d.to_string()) || e.summary.contains("failed"));
            assert!(matches!(d.status(), 400 | 403 | 502));
            assert!(!d.to_string().is_empty());
        }
    }

    #[test]
    fn secret_denials_name_the_secret_and_the_host_only() {
        let d = Denial::Secret(Leak {
            name: "API_KEY".into(),
            host: "evil.test".into(),
            why: LeakKind::OtherHost,
        });
        assert_eq!(d.to_string(), "secret API_KEY may not be sent to evil.test");
        let d = Denial::Secret(Leak {
            name: "API_KEY".into(),
            host: "api.test".into(),
            why: LeakKind::Cleartext,
        });
        assert_eq!(
            d.to_string(),
            "secret API_KEY may not be sent to api.test over plain HTTP; use HTTPS, \
             or allow clear text with --secret-over-http API_KEY"
        );
        assert_eq!(d.event().plugin, Some("secret_injector"));
        assert_eq!(d.event().data["secret"], "API_KEY");
    }
}
