//! Which addresses a sandbox may reach. Every address that is not public unicast is blocked
//! (private, loopback, link-local and cloud metadata, CGNAT, multicast, documentation and
//! reserved ranges; IPv6 too, including IPv4 embedded in mapped, NAT64 and 6to4 forms), and so are
//! the host's own addresses, unless the user opened one with `--allow-private-host`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The address rule of one sandbox.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    /// Addresses opened explicitly (`--allow-private-host`); always reachable.
    pub allow: Vec<IpAddr>,
    /// Also reach private ranges (RFC 1918, CGNAT, ULA): RPC `block_private_ips: false`. Loopback,
    /// link-local, metadata, multicast and reserved ranges stay blocked.
    pub allow_private_ranges: bool,
    /// The host's own interface addresses: blocked like loopback, since they reach host services.
    pub host_addrs: Vec<IpAddr>,
}

/// Why an address is blocked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocked {
    /// The address, IPv4-mapped addresses shown as IPv4.
    pub addr: IpAddr,
    /// What it is.
    pub what: Range,
}

/// The kind of address that is blocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    /// One of the host's own addresses.
    Host,
    /// A non-public range, described.
    NotPublic(&'static str),
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ip = self.addr;
        match self.what {
            Range::Host => write!(
                f,
                "{ip} is an address of the host (blocked; --allow-private-host {ip} opens it)"
            ),
            Range::NotPublic(what) => write!(
                f,
                "{ip} is {what} (blocked; --allow-private-host {ip} opens it)"
            ),
        }
    }
}

impl AddressPolicy {
    /// `Ok` if a connection to `ip` may leave, else why not.
    pub fn check(&self, ip: IpAddr) -> Result<(), Blocked> {
        let ip = canonical(ip);
        if self.allow.iter().any(|a| canonical(*a) == ip) {
            return Ok(());
        }
        let blocked = |what| Err(Blocked { addr: ip, what });
        if self.host_addrs.iter().any(|a| canonical(*a) == ip) {
            return blocked(Range::Host);
        }
        match classify(ip) {
            None => Ok(()),
            Some(Class::Private(_)) if self.allow_private_ranges => Ok(()),
            Some(Class::Private(what)) | Some(Class::Always(what)) => {
                blocked(Range::NotPublic(what))
            }
        }
    }
}

enum Class {
    /// Blocked unless private ranges are allowed.
    Private(&'static str),
    /// Blocked unless the exact address is allowed.
    Always(&'static str),
}

/// IPv4-mapped addresses are the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => ip,
        },
        v4 => v4,
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn classify_v4(ip: Ipv4Addr) -> Option<Class> {
    use Class::*;
    const TABLE: &[([u8; 4], u32, bool, &str)] = &[
        ([0, 0, 0, 0], 8, false, "in \"this network\" (0.0.0.0/8)"),
        ([10, 0, 0, 0], 8, true, "a private address (10.0.0.0/8)"),
        (
            [100, 64, 0, 0],
            10,
            true,
            "a carrier-grade NAT address (100.64.0.0/10)",
        ),
        ([127, 0, 0, 0], 8, false, "a loopback address"),
        (
            [169, 254, 0, 0],
            16,
            false,
            "a link-local / cloud metadata address",
        ),
        (
            [172, 16, 0, 0],
            12,
            true,
            "a private address (172.16.0.0/12)",
        ),
        (
            [192, 0, 0, 0],
            24,
            false,
            "an IETF protocol address (192.0.0.0/24)",
        ),
        ([192, 0, 2, 0], 24, false, "a documentation address"),
        ([192, 88, 99, 0], 24, false, "a 6to4 relay address"),
        (
            [192, 168, 0, 0],
            16,
            true,
            "a private address (192.168.0.0/16)",
        ),
        ([198, 18, 0, 0], 15, false, "a benchmarking address"),
        ([198, 51, 100, 0], 24, false, "a documentation address"),
        ([203, 0, 113, 0], 24, false, "a documentation address"),
        ([224, 0, 0, 0], 4, false, "a multicast address"),
        ([240, 0, 0, 0], 4, false, "a reserved address (240.0.0.0/4)"),
    ];
    for (net, bits, private, what) in TABLE {
        if in_v4(ip, *net, *bits) {
            return Some(if *private {
                Private(what)
            } else {
                Always(what)
            });
        }
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Option<Class> {
    use Class::*;
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some(Always("the unspecified address"));
    }
    if ip.is_loopback() {
        return Some(Always("a loopback address"));
    }
    // IPv4 embedded in NAT64 (64:ff9b::/96) and 6to4 (2002::/16) addresses reach that IPv4 host.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        return classify_v4(v4);
    }
    if s[0] == 0x2002 {
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        if let Some(c) = classify_v4(v4) {
            return Some(c);
        }
    }
    // IPv4-compatible (deprecated ::a.b.c.d).
    if s[0..6] == [0, 0, 0, 0, 0, 0] {
        return Some(Always("an IPv4-compatible address"));
    }
    match s[0] {
        x if x & 0xfe00 == 0xfc00 => Some(Private("a unique local address (fc00::/7)")),
        x if x & 0xffc0 == 0xfe80 => Some(Always("a link-local address")),
        x if x & 0xffc0 == 0xfec0 => Some(Always("a site-local address")),
        x if x & 0xff00 == 0xff00 => Some(Always("a multicast address")),
        0x2001 if s[1] == 0x0db8 => Some(Always("a documentation address")),
        0x0100 if s[1..4] == [0, 0, 0] => Some(Always("a discard address")),
        _ => None,
    }
}

fn classify(ip: IpAddr) -> Option<Class> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

/// The host's own interface addresses (all families), for [`AddressPolicy::host_addrs`].
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocked(p: &AddressPolicy, s: &str) -> bool {
        p.check(s.parse().unwrap()).is_err()
    }

    #[test]
    fn open_mode_blocks_every_non_public_range() {
        let p = AddressPolicy::default();
        for a in [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "100.100.100.200",
            "127.0.0.1",
            "127.1.2.3",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.1",
            "192.0.2.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:c0a8:0101::1",
            "fd00:ec2::254",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "::127.0.0.1",
        ] {
            assert!(blocked(&p, a), "{a} should be blocked");
        }
        for a in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!blocked(&p, a), "{a} should be allowed");
        }
    }

    #[test]
    fn overrides() {
        let p = AddressPolicy {
            allow: vec!["127.0.0.1".parse().unwrap()],
            allow_private_ranges: true,
            host_addrs: vec!["203.0.113.50".parse().unwrap(), "8.8.4.4".parse().unwrap()],
        };
        assert!(!blocked(&p, "127.0.0.1"));
        assert!(!blocked(&p, "::ffff:127.0.0.1"));
        assert!(blocked(&p, "127.0.0.2"));
        assert!(!blocked(&p, "10.0.0.1"));
        assert!(!blocked(&p, "fd12::1"));
        assert!(blocked(&p, "169.254.169.254"));
        assert!(blocked(&p, "8.8.4.4"));
        assert!(p.check("10.0.0.1".parse().unwrap()).is_ok());
        let msg = AddressPolicy::default()
            .check("10.0.0.1".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--allow-private-host 10.0.0.1"), "{msg}");
    }
}
