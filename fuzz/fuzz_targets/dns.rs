//! A DNS query datagram from the guest to the sandbox's resolver (`matchlock_net::dns::Dns::answer`).
//!
//! The guest's UDP payload is parsed, checked, answered locally (`--add-host` names, sinkhole
//! answers for names off the allow-list) or rebuilt for an upstream. There are no upstreams
//! here, so nothing leaves the process: allowed names get `SERVFAIL`. Each input is answered
//! three times, by an intercepting resolver (allow-list `allowed.test` and `*.allowed.test`), a
//! direct one, and a direct one in synthetic mode (made-up addresses, no upstream), all with
//! local names. An answer must be a response carrying the query's id.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_api::config::DnsMode;
use matchlock_net::dns::Dns;
use matchlock_policy::hosts::{AllowList, NameTable};
use matchlock_policy::{AddressPolicy, Policy};
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn hosts() -> Vec<(String, IpAddr)> {
    [
        ("db.internal", "10.0.0.5"),
        ("db.internal", "fd00::5"),
        ("api.allowed.test", "203.0.113.7"),
        ("localhost.alias", "198.18.0.1"),
    ]
    .into_iter()
    .map(|(n, ip)| (n.to_string(), ip.parse().expect("address")))
    .collect()
}

/// A resolver with the local names and no upstreams.
fn resolver(policy: Policy, mode: DnsMode) -> Dns {
    Dns {
        upstreams: Vec::new(),
        hosts: hosts(),
        policy: Arc::new(policy),
        mode,
        synthetic: Default::default(),
    }
}

/// Built per input (cheaply), so that names one input taught the resolver's table do not
/// change what the next one gets.
fn resolvers() -> [Dns; 3] {
    let allow = AllowList::new(["allowed.test", "*.allowed.test"]).expect("allow-list");
    let intercepting = Policy::intercepting(
        AddressPolicy::default(),
        allow,
        Arc::new(NameTable::default()),
    );
    let direct = || Policy::direct(AddressPolicy::default());
    [
        resolver(intercepting, DnsMode::Trusted),
        resolver(direct(), DnsMode::Trusted),
        resolver(direct(), DnsMode::Synthetic),
    ]
}

fuzz_target!(|data: &[u8]| {
    for dns in resolvers() {
        let Some(reply) = runtime().block_on(dns.answer(data)) else {
            continue;
        };
        assert!(reply.len() >= 12, "a reply shorter than a DNS header");
        assert_eq!(
            reply[..2],
            data[..2],
            "the reply does not carry the query's id"
        );
        assert!(reply[2] & 0x80 != 0, "the reply is not a response");
    }
});
