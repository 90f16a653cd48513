//! A guest TCP connection's bytes into the interception proxy (`matchlock_net::proxy::Proxy::serve`),
//! exactly as the network stack hands a flow over: classification, the TLS handshake (with a
//! leaf from the sandbox CA), HTTP/1.x and HTTP/2 (hyper), the policy gate, hook rules and secret
//! substitution. The input is written by the "guest" end of an in-memory duplex, whose write
//! half is then shut down; the proxy's answer is read until it closes (at most 200 ms).
//!
//! Each input goes to two proxies:
//!
//! - `plain`: the allow-list names only `never.invalid`, which the guest was never told about,
//!   so every request is refused by the gate and nothing is ever connected to;
//! - `secret`: requests to `api.test` and `other.test` pass the gate (the guest "resolved" them to
//!   the visible address), hook rules block, rewrite and mutate, and two secrets are substituted
//!   or refused (the one for `api.test` is HTTPS-only). A request that passes everything is sent
//!   to `127.0.0.1` on a port the harness holds bound but never listens on, so the connect is
//!   refused at once, in-process: no byte leaves the host.
//!
//! The real value of a secret must never reach the guest: unless the input itself contains it,
//! the proxy's answer must not.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_api::wire::RuleSpec;
use matchlock_net::proxy::{upstream_tls, Proxy};
use matchlock_policy::ca::MitmCa;
use matchlock_policy::hosts::{AllowList, NameTable};
use matchlock_policy::rules::Rules;
use matchlock_policy::secrets::{Secret, Secrets};
use matchlock_policy::{AddressPolicy, Policy, Target};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The address the guest connected to (as the sandbox's DNS told it).
const VISIBLE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SECRET_VALUE: &[u8] = b"Zq7-real-secret-V4lue";
const SECRET_VALUE_2: &[u8] = b"second-real-value-Xk2";
/// How long the proxy gets to answer one input.
const DEADLINE: Duration = Duration::from_millis(200);

struct Env {
    rt: tokio::runtime::Runtime,
    plain: Arc<Proxy>,
    secret: Arc<Proxy>,
    /// Bound to 127.0.0.1 and never listening: connects to it are refused.
    closed: tokio::net::TcpSocket,
}

fn rule(name: &str, action: &str, path: &str) -> RuleSpec {
    RuleSpec {
        name: name.into(),
        action: action.into(),
        path: path.into(),
        ..Default::default()
    }
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let closed = tokio::net::TcpSocket::new_v4().expect("socket");
        closed
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let tls = upstream_tls(None).expect("upstream TLS config");

        let plain = Proxy::new(
            Arc::new(Policy::intercepting(
                AddressPolicy::default(),
                AllowList::new(["never.invalid"]).expect("allow-list"),
                Arc::new(NameTable::default()),
            )),
            Secrets::default(),
            MitmCa::generate("vm-fuzz-plain").expect("CA"),
            tls.clone(),
            None,
            Rules::default(),
        );

        let names = Arc::new(NameTable::default());
        for n in ["api.test", "other.test"] {
            names.record(n, &[VISIBLE.into()]);
        }
        let policy = Policy::intercepting(
            AddressPolicy {
                allow: vec!["127.0.0.1".parse().expect("address")],
                ..Default::default()
            },
            AllowList::new(["api.test", "other.test"]).expect("allow-list"),
            names,
        )
        .with_websockets(false);
        let secrets = Secrets::new(vec![
            Secret::new(
                "API_KEY",
                std::str::from_utf8(SECRET_VALUE).expect("utf-8"),
                AllowList::new(["api.test"]).expect("hosts"),
                Some("MATCHLOCK_PLACEHOLDER_API_KEY"),
            ),
            Secret::new(
                "OTHER_KEY",
                std::str::from_utf8(SECRET_VALUE_2).expect("utf-8"),
                AllowList::new(["other.test"]).expect("hosts"),
                Some("MATCHLOCK_PLACEHOLDER_OTHER"),
            )
            .allow_http(true),
        ]);
        let mut mutate = rule("mutate", "mutate", "/rw/*");
        mutate.rewrite_path = "/rewritten".into();
        mutate.set_headers.insert("x-fuzz".into(), "1".into());
        mutate.delete_headers.push("x-drop".into());
        mutate.set_query.insert("k".into(), "v".into());
        mutate.delete_query.push("drop".into());
        let rules = Rules::new(
            vec![
                rule("block", "block", "/blocked/*"),
                mutate,
                rule("after", "block", "/after"),
            ],
            None,
        )
        .expect("rules");
        let secret = Proxy::new(
            Arc::new(policy),
            secrets,
            MitmCa::generate("vm-fuzz-secret").expect("CA"),
            tls,
            None,
            rules,
        );
        Env {
            rt,
            plain: Arc::new(plain),
            secret: Arc::new(secret),
            closed,
        }
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// One guest connection: the input, then end of stream; returns what the proxy answered.
async fn connection(proxy: Arc<Proxy>, target: Target, data: &[u8]) -> Vec<u8> {
    let (mut guest, theirs) = tokio::io::duplex(1 << 16);
    let mut reply = Vec::new();
    let client = async {
        let _ = guest.write_all(data).await;
        let _ = guest.shutdown().await;
        let _ = guest.read_to_end(&mut reply).await;
    };
    let _ = tokio::time::timeout(DEADLINE, async {
        tokio::join!(proxy.serve(theirs, target), client)
    })
    .await;
    reply
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    let closed_port = env.closed.local_addr().expect("bound").port();
    env.rt.block_on(async {
        let target = Target {
            visible: SocketAddrV4::new(VISIBLE, 80),
            real: SocketAddr::from((VISIBLE, 80)),
        };
        connection(env.plain.clone(), target, data).await;

        let target = Target {
            visible: SocketAddrV4::new(VISIBLE, 80),
            real: SocketAddr::from(([127, 0, 0, 1], closed_port)),
        };
        let reply = connection(env.secret.clone(), target, data).await;
        for value in [SECRET_VALUE, SECRET_VALUE_2] {
            if !contains(data, value) {
                assert!(
                    !contains(&reply, value),
                    "a secret's real value reached the guest:\n{}",
                    String::from_utf8_lossy(&reply)
                );
            }
        }
    });
});
