//! A guest TCP connection's bytes into the interception proxy (`matchlock_net::proxy::Proxy::serve`),
//! exactly as the network stack hands a flow over: classification, the TLS handshake (with a
//! leaf from the sandbox CA), HTTP/1.x and HTTP/2 (hyper), the policy gate, hook rules and secret
//! substitution. The input is written by the "guest" end of an in-memory duplex; once the proxy
//! has nothing left to do (its requests answered, or waiting for more) the write half is shut
//! down, and the answer is read until the proxy closes the connection (at most 200 ms). The
//! runtime's clock is paused and advances only when every task waits, so "nothing left to do"
//! and the deadline cost no wall-clock time, and the proxy's own timeouts cannot fire early
//! under a slow, instrumented build.
//!
//! Each input goes to two proxies:
//!
//! - `plain`: the allow-list names only `never.invalid`, which the guest was never told about,
//!   so every request is refused by the gate and nothing is ever connected to;
//! - `secret`: requests to `api.test` and `other.test` pass the gate (the guest "resolved" them to
//!   the visible address), hook rules block, rewrite and mutate, and two secrets are substituted
//!   or refused (the one for `api.test` is HTTPS-only). A request that passes everything is sent
//!   to the "real" address `255.255.255.255`, which the address policy opens: a TCP connect to
//!   the broadcast address fails in the `connect` call itself (`ENETUNREACH`), so no packet is
//!   ever sent.
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
/// How long the proxy gets to answer one input (virtual time).
const DEADLINE: Duration = Duration::from_millis(200);
/// How long the connection stays open after the input was written (virtual time: this ends as
/// soon as the proxy waits for more input).
const QUIET: Duration = Duration::from_millis(50);
/// Where requests that pass every check are sent; see the crate docs.
const UNREACHABLE: Ipv4Addr = Ipv4Addr::BROADCAST;

struct Env {
    rt: tokio::runtime::Runtime,
    plain: Arc<Proxy>,
    secret: Arc<Proxy>,
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
            .start_paused(true)
            .build()
            .expect("tokio runtime");
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
                allow: vec![UNREACHABLE.into()],
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
        }
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// One guest connection: the input, then end of stream; returns what the proxy answered.
async fn connection(proxy: Arc<Proxy>, target: Target, data: &[u8]) -> Vec<u8> {
    let (guest, theirs) = tokio::io::duplex(1 << 16);
    let (mut rd, mut wr) = tokio::io::split(guest);
    let mut reply = Vec::new();
    let client = async {
        let write = async {
            let _ = wr.write_all(data).await;
            tokio::time::sleep(QUIET).await;
            let _ = wr.shutdown().await;
        };
        let _ = tokio::join!(write, rd.read_to_end(&mut reply));
    };
    let _ = tokio::time::timeout(DEADLINE, async {
        tokio::join!(proxy.serve(theirs, target), client)
    })
    .await;
    reply
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    env.rt.block_on(async {
        let target = Target {
            visible: SocketAddrV4::new(VISIBLE, 80),
            real: SocketAddr::from((VISIBLE, 80)),
        };
        connection(env.plain.clone(), target, data).await;

        let target = Target {
            visible: SocketAddrV4::new(VISIBLE, 80),
            real: SocketAddr::from((UNREACHABLE, 80)),
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
