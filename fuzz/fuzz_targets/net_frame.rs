//! Raw Ethernet frames from the guest's NIC into the sandbox's userspace network stack
//! (`matchlock_net::serve`, driven through the crate's in-memory `harness::Guest`): frame
//! classification, ARP, IPv4/TCP/UDP/ICMP parsing in smoltcp and in the stack itself, the policy
//! decisions, the resolver, and TCP flows handed to the interception proxy.
//!
//! One stack is started once (with a tokio runtime kept alive in a `OnceLock`) and stays up
//! across inputs, as it would for a guest that keeps sending. It intercepts, with an allow-list
//! that names only a host the guest was never told about, so no flow ever reaches the host's
//! network: TCP goes to the proxy, UDP other than DNS is refused, DNS is answered locally (no
//! upstreams). Its limits are small and short (16 flows, 2 s idle) so that state left by one
//! input is bounded and soon retired: memory does not grow across iterations.
//!
//! The input is a sequence of frames, each `[u16 BE length][flags][frame]`. Flag bit 0 recomputes
//! the IPv4 header checksum and bit 1 the TCP/UDP/ICMP checksum before the frame is sent, so the
//! fuzzer can reach the code behind smoltcp's checksum checks.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_net::dns::Dns;
use matchlock_net::harness::Guest;
use matchlock_net::proxy::{upstream_tls, Proxy};
use matchlock_net::setup::{GATEWAY_IP, GATEWAY_MAC, GUEST_IP, NET_PREFIX};
use matchlock_net::{Limits, NetConfig, ALIAS_BASE};
use matchlock_policy::ca::MitmCa;
use matchlock_policy::hosts::{AllowList, NameTable};
use matchlock_policy::rules::Rules;
use matchlock_policy::secrets::Secrets;
use matchlock_policy::{AddressPolicy, Policy};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Frames sent per input.
const MAX_FRAMES: usize = 32;
/// Scheduler turns given to the stack after each input (each hop between its tasks takes one).
const TURNS: usize = 48;

struct Env {
    rt: tokio::runtime::Runtime,
    guest: Guest,
}

fn config() -> NetConfig {
    let policy = Arc::new(Policy::intercepting(
        AddressPolicy::default(),
        AllowList::new(["never.invalid"]).expect("allow-list"),
        Arc::new(NameTable::default()),
    ));
    let proxy = Proxy::new(
        policy.clone(),
        Secrets::default(),
        MitmCa::generate("vm-fuzz-net").expect("CA"),
        upstream_tls(None).expect("upstream TLS config"),
        None,
        Rules::default(),
    );
    let hosts = vec![
        ("db.internal".to_string(), "10.0.0.5".parse().expect("ip")),
        ("host.alias".to_string(), ALIAS_BASE.into()),
    ];
    NetConfig {
        guest_ip: GUEST_IP.into(),
        gateway_ip: GATEWAY_IP.into(),
        prefix: NET_PREFIX,
        gateway_mac: GATEWAY_MAC,
        mtu: 1500,
        dns: Arc::new(Dns {
            upstreams: Vec::new(),
            hosts,
            policy: policy.clone(),
            mode: Default::default(),
            synthetic: Default::default(),
        }),
        policy,
        limits: Limits {
            max_tcp: 16,
            max_udp: 16,
            tcp_buffer: 16 * 1024,
            tcp_idle: Duration::from_secs(2),
            udp_idle: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        },
        aliases: vec![(ALIAS_BASE, "127.0.0.1".parse().expect("ip"))],
        intercept: Some(Arc::new(proxy)),
    }
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let guest = rt.block_on(async { Guest::start(config()) });
        Env { rt, guest }
    })
}

fn sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        acc += (*last as u32) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Recomputes the IPv4 header checksum (`ip`) and/or the transport checksum (`l4`) of an
/// Ethernet frame, where the lengths in the headers allow it.
fn fix_checksums(f: &mut [u8], ip: bool, l4: bool) {
    if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = (f[14] & 0x0f) as usize * 4;
    if ihl < 20 || f.len() < 14 + ihl {
        return;
    }
    if ip {
        f[24..26].fill(0);
        let c = fold(sum(&f[14..14 + ihl], 0));
        f[24..26].copy_from_slice(&c.to_be_bytes());
    }
    if !l4 {
        return;
    }
    let total = u16::from_be_bytes([f[16], f[17]]) as usize;
    let end = (14 + total).min(f.len());
    let start = 14 + ihl;
    if end <= start {
        return;
    }
    let proto = f[23];
    let at = match proto {
        1 => 2,  // ICMP
        6 => 16, // TCP
        17 => 6, // UDP
        _ => return,
    };
    if end - start < at + 2 {
        return;
    }
    f[start + at..start + at + 2].fill(0);
    let mut acc = 0;
    if proto != 1 {
        // Pseudo header: addresses, protocol, transport length.
        acc = sum(&f[26..34], acc) + proto as u32 + (end - start) as u32;
    }
    let mut c = fold(sum(&f[start..end], acc));
    if proto == 17 && c == 0 {
        c = 0xffff;
    }
    f[start + at..start + at + 2].copy_from_slice(&c.to_be_bytes());
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    env.rt.block_on(async {
        let mut rest = data;
        for _ in 0..MAX_FRAMES {
            if rest.len() < 3 {
                break;
            }
            let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
            let flags = rest[2];
            rest = &rest[3..];
            let n = n.min(rest.len());
            let mut frame = rest[..n].to_vec();
            rest = &rest[n..];
            fix_checksums(&mut frame, flags & 1 != 0, flags & 2 != 0);
            env.guest.send_frame(frame).await;
        }
        for _ in 0..TURNS {
            tokio::task::yield_now().await;
        }
    });
});
