//! DNS for the guest: its resolver points at the gateway, and matchlock answers. Names given with
//! `--add-host` are answered locally; everything else is forwarded to the upstream servers, and an
//! answer that points into a blocked range is refused (so a name cannot smuggle a private address
//! past the egress policy, e.g. by DNS rebinding).
//!
//! The sandbox's [`DnsMode`] says who answers: `trusted` forwards to the host's resolvers only,
//! also for queries the guest addressed to another server (the stack hands those here);
//! `synthetic` sends nothing upstream and answers each name with an address of its own
//! ([`SyntheticNames`]), which the stack maps back to the name and resolves on the host
//! ([`Dns::lookup`]) when the guest connects; `open` leaves queries to other servers to the
//! stack, which relays them.

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use matchlock_api::config::DnsMode;
use matchlock_policy::{Policy, Target};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;

/// How long one upstream server gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// The resolver of one sandbox.
pub struct Dns {
    /// Upstream servers, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// Local names (lower case, no trailing dot) and their addresses.
    pub hosts: Vec<(String, IpAddr)>,
    /// The sandbox's policy: answers pointing at blocked addresses are refused. When it
    /// intercepts, names off the allow-list get a sinkhole answer and are never sent upstream
    /// (no exfiltration through queries), and every answer is recorded so connections can be
    /// checked against the name they claim.
    pub policy: Arc<Policy>,
    /// Who answers (see the module's doc).
    pub mode: DnsMode,
    /// The names given synthetic addresses, and back (synthetic mode), and the host's own
    /// lookups of them.
    pub synthetic: SyntheticNames,
}

/// How long the host keeps its own lookup of a synthetic name: a guest opening connection
/// after connection to one name costs the host's resolvers one query per this long.
const LOOKUP_TTL: Duration = Duration::from_secs(10);

/// Host lookups of synthetic names in flight at once; more wait their turn.
const LOOKUPS_IN_FLIGHT: usize = 8;

/// Synthetic mode's addresses: one per name, from 198.19.0.1 to 198.19.254.254 (inside the
/// benchmarking range 198.18.0.0/15 like the loopback aliases and the sinkhole, never routed),
/// handed out in order and kept for the sandbox's life, so a name always gets the same one and
/// an address names one name. At most 64,770 names; past that, queries are refused.
pub struct SyntheticNames {
    inner: Mutex<SyntheticInner>,
    /// The host's lookups: name, addresses, when.
    looked_up: Mutex<Lookups>,
    lookups: tokio::sync::Semaphore,
}

impl Default for SyntheticNames {
    fn default() -> Self {
        SyntheticNames {
            inner: Mutex::default(),
            looked_up: Mutex::default(),
            lookups: tokio::sync::Semaphore::new(LOOKUPS_IN_FLIGHT),
        }
    }
}

/// The host's lookups of synthetic names: addresses, and when they were looked up.
type Lookups = HashMap<Arc<str>, (Vec<IpAddr>, tokio::time::Instant)>;

/// Each name once (an `Arc<str>` in both maps): at most 64,770 names of at most 253 bytes.
#[derive(Default)]
struct SyntheticInner {
    by_name: HashMap<Arc<str>, Ipv4Addr>,
    by_addr: HashMap<Ipv4Addr, Arc<str>>,
}

impl SyntheticNames {
    const HOSTS_PER_BLOCK: usize = 254;
    const CAPACITY: usize = 255 * Self::HOSTS_PER_BLOCK;

    /// Whether `ip` is in the synthetic range.
    pub fn contains(ip: Ipv4Addr) -> bool {
        let [a, b, c, d] = ip.octets();
        a == 198 && b == 19 && c != 255 && d != 0 && d != 255
    }

    /// The address of `name` (lower case, no trailing dot), given one now if it has none;
    /// `None` when the range is used up.
    pub fn address_for(&self, name: &str) -> Option<Ipv4Addr> {
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ip) = t.by_name.get(name) {
            return Some(*ip);
        }
        let n = t.by_name.len();
        if n >= Self::CAPACITY {
            return None;
        }
        let ip = Ipv4Addr::new(
            198,
            19,
            (n / Self::HOSTS_PER_BLOCK) as u8,
            (n % Self::HOSTS_PER_BLOCK + 1) as u8,
        );
        let name: Arc<str> = Arc::from(name);
        t.by_name.insert(name.clone(), ip);
        t.by_addr.insert(ip, name);
        Some(ip)
    }

    /// The name `ip` was given to, if any.
    pub fn name_of(&self, ip: Ipv4Addr) -> Option<Arc<str>> {
        let t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        t.by_addr.get(&ip).cloned()
    }
}

/// The address names off the allow-list resolve to in interception mode (TEST-NET-2 style reserved
/// space inside 198.18.0.0/15, never routed).
pub const SINKHOLE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 19, 255, 254);

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn reply_to(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::new();
    m.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    m.add_queries(query.queries().to_vec());
    m
}

/// Largest UDP answer asked of an upstream on the guest's behalf (the DNS flag day value).
const MAX_UDP_PAYLOAD: u16 = 1232;

/// Record types a guest may ask about. Anything else (zone transfers, `ANY`, obsolete or
/// experimental types) is answered `NotImp` here; real resolvers in a sandbox do not need them.
const QUERY_TYPES: &[RecordType] = &[
    RecordType::A,
    RecordType::AAAA,
    RecordType::CNAME,
    RecordType::MX,
    RecordType::TXT,
    RecordType::SRV,
    RecordType::NS,
    RecordType::PTR,
    RecordType::SOA,
    RecordType::CAA,
    RecordType::HTTPS,
    RecordType::SVCB,
    RecordType::DS,
    RecordType::DNSKEY,
];

/// The query matchlock sends upstream for a guest's `query`, built from scratch so that nothing
/// the guest chose beyond one question reaches a resolver: exactly one question (the name in
/// lower case, so letter case cannot carry bits), the standard opcode, no records in any
/// section, no EDNS options (only the payload size), a fresh random id. Anything else is
/// refused with the code returned: a raw guest packet could otherwise carry data to a
/// resolver in a second question, in records, in EDNS options or as an UPDATE.
fn rebuild(query: &Message) -> Result<Message, ResponseCode> {
    if query.op_code() != OpCode::Query {
        return Err(ResponseCode::NotImp);
    }
    let [q] = query.queries() else {
        return Err(ResponseCode::FormErr);
    };
    if !query.answers().is_empty()
        || !query.name_servers().is_empty()
        || !query.additionals().is_empty()
        || !query.sig0().is_empty()
        || query
            .extensions()
            .as_ref()
            .is_some_and(|e| e.version() != 0 || !e.options().as_ref().is_empty())
    {
        return Err(ResponseCode::FormErr);
    }
    if q.query_class() != hickory_proto::rr::DNSClass::IN || !QUERY_TYPES.contains(&q.query_type())
    {
        return Err(ResponseCode::NotImp);
    }
    let mut m = fresh_query(&normalize(&q.name().to_ascii()), q.query_type())
        .map_err(|_| ResponseCode::FormErr)?;
    // Without EDNS the guest takes at most 512 bytes, which the upstream then keeps to itself.
    if let Some(e) = query.extensions() {
        let mut edns = Edns::new();
        edns.set_max_payload(e.max_payload().clamp(512, MAX_UDP_PAYLOAD));
        m.set_edns(edns);
    }
    Ok(m)
}

/// A query matchlock sends upstream: one question for `name` (fully qualified here), recursion
/// desired, a fresh random id, nothing else.
fn fresh_query(name: &str, t: RecordType) -> Result<Message, String> {
    let name = Name::from_ascii(name)
        .and_then(|n| n.append_domain(&Name::root()))
        .map_err(|e| format!("{name}: {e}"))?;
    let mut m = Message::new();
    m.set_id(rand::random())
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(name, t));
    Ok(m)
}

impl Dns {
    /// Answers one query datagram; `None` when it is not a DNS query worth answering.
    pub async fn answer(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let query = Message::from_vec(packet).ok()?;
        if query.message_type() != MessageType::Query {
            return None;
        }
        if let Some(local) = self.local(&query) {
            self.record(&local);
            return local.to_vec().ok();
        }
        let upstream = match rebuild(&query) {
            Ok(m) => m,
            Err(code) => return reply_to(&query, code).to_vec().ok(),
        };
        if self.policy.intercepts() {
            let name = normalize(&upstream.queries()[0].name().to_ascii());
            if !self.policy.may_resolve(&name) {
                return self.sinkhole(&query).to_vec().ok();
            }
        }
        if self.mode == DnsMode::Synthetic {
            return self.synthetic_answer(&query, &upstream).to_vec().ok();
        }
        if self.upstreams.is_empty() {
            return reply_to(&query, ResponseCode::ServFail).to_vec().ok();
        }
        let packet = upstream.to_vec().ok()?;
        for server in &self.upstreams {
            if let Some(resp) = self.forward(*server, &packet, &upstream, &query).await {
                return Some(resp);
            }
        }
        reply_to(&query, ResponseCode::ServFail).to_vec().ok()
    }

    /// Whether `ip` is an address this resolver made up for a name (synthetic mode), which the
    /// host maps back to the name ([`Dns::real_target`]).
    pub fn is_synthetic(&self, ip: Ipv4Addr) -> bool {
        self.mode == DnsMode::Synthetic && SyntheticNames::contains(ip)
    }

    /// `target`, whose address this resolver made up, with the real address of the name it
    /// stands for (the first IPv4 address the host's resolvers give). A name the allow-list no
    /// longer allows is not looked up.
    pub async fn real_target(&self, target: Target) -> Result<Target, String> {
        let ip = *target.visible.ip();
        let name = self
            .synthetic
            .name_of(ip)
            .ok_or_else(|| format!("{ip} was given to no name"))?;
        if self.policy.intercepts() && !self.policy.may_resolve(&name) {
            return Err(format!("{name} is not on this sandbox's allow-list"));
        }
        let addrs = self.lookup(&name).await?;
        Ok(Target {
            visible: target.visible,
            real: SocketAddr::new(addrs[0], target.visible.port()),
        })
    }

    /// Synthetic mode's answer to the checked question of `rebuilt`: an A record with the name's
    /// own address; no records for any other type (so clients fall back to IPv4).
    fn synthetic_answer(&self, query: &Message, rebuilt: &Message) -> Message {
        let q = &rebuilt.queries()[0];
        let mut m = reply_to(query, ResponseCode::NoError);
        if q.query_type() != RecordType::A {
            return m;
        }
        let name = normalize(&q.name().to_ascii());
        let Some(ip) = self.synthetic.address_for(&name) else {
            return reply_to(query, ResponseCode::Refused);
        };
        let owner = query.queries()[0].name().clone();
        m.add_answer(Record::from_rdata(owner, 60, RData::A(A(ip))));
        self.record(&m);
        m
    }

    /// The host's own resolution of `name` (synthetic mode, when the guest connects to the
    /// name's address): its IPv4 addresses from the upstream servers, in their order. Kept for
    /// [`LOOKUP_TTL`]; at most [`LOOKUPS_IN_FLIGHT`] go upstream at once.
    pub async fn lookup(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let cached = || {
            let c = self
                .synthetic
                .looked_up
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            c.get(name)
                .filter(|(_, at)| at.elapsed() < LOOKUP_TTL)
                .map(|(addrs, _)| addrs.clone())
        };
        if let Some(addrs) = cached() {
            return Ok(addrs);
        }
        let _turn = self
            .synthetic
            .lookups
            .acquire()
            .await
            .map_err(|e| e.to_string())?;
        // Another connection may have looked it up while this one waited.
        if let Some(addrs) = cached() {
            return Ok(addrs);
        }
        let addrs = self.lookup_upstream(name).await?;
        let mut c = self
            .synthetic
            .looked_up
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        c.retain(|_, (_, at)| at.elapsed() < LOOKUP_TTL);
        c.insert(
            Arc::from(name),
            (addrs.clone(), tokio::time::Instant::now()),
        );
        Ok(addrs)
    }

    async fn lookup_upstream(&self, name: &str) -> Result<Vec<IpAddr>, String> {
        let q = fresh_query(name, RecordType::A)?;
        let packet = q.to_vec().map_err(|e| e.to_string())?;
        if self.upstreams.is_empty() {
            return Err("no DNS servers to resolve it with".into());
        }
        for server in &self.upstreams {
            if let Some(resp) = self.exchange(*server, &packet, &q).await {
                let addrs: Vec<IpAddr> = resp
                    .answers()
                    .iter()
                    .filter_map(|r| match r.data() {
                        Some(RData::A(a)) => Some(IpAddr::V4(a.0)),
                        _ => None,
                    })
                    .collect();
                return match addrs.is_empty() {
                    true => Err(format!("{name} has no IPv4 address")),
                    false => Ok(addrs),
                };
            }
        }
        Err(format!("no DNS server answered for {name}"))
    }

    /// Remembers what the guest was told (interception mode).
    fn record(&self, answer: &Message) {
        if !self.policy.intercepts() {
            return;
        }
        for r in answer.answers() {
            let ip = match r.data() {
                Some(RData::A(a)) => IpAddr::V4(a.0),
                Some(RData::AAAA(a)) => IpAddr::V6(a.0),
                _ => continue,
            };
            self.policy.names().record(&r.name().to_ascii(), &[ip]);
        }
    }

    /// The answer for a name interception does not allow: one A record pointing nowhere.
    fn sinkhole(&self, query: &Message) -> Message {
        let mut m = reply_to(query, ResponseCode::NoError);
        if let Some(q) = query.queries().first() {
            if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
                m.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A(SINKHOLE)),
                ));
            }
        }
        m
    }

    /// An answer from `--add-host` names.
    fn local(&self, query: &Message) -> Option<Message> {
        let q = query.queries().first()?;
        let name = normalize(&q.name().to_ascii());
        let addrs: Vec<IpAddr> = self
            .hosts
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, ip)| *ip)
            .collect();
        if addrs.is_empty() {
            return None;
        }
        let mut m = reply_to(query, ResponseCode::NoError);
        m.set_authoritative(true);
        let owner: Name = q.name().clone();
        for ip in addrs {
            let data = match (ip, q.query_type()) {
                (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(A(v4)),
                (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(v6)),
                _ => continue,
            };
            m.add_answer(Record::from_rdata(owner.clone(), 60, data));
        }
        Some(m)
    }

    /// Sends `packet` (the rebuilt `sent`) to `server` and turns its answer into the reply to
    /// the guest's `query`: the guest's id and question, the upstream's records.
    async fn forward(
        &self,
        server: SocketAddr,
        packet: &[u8],
        sent: &Message,
        query: &Message,
    ) -> Option<Vec<u8>> {
        let mut resp = self.exchange(server, packet, sent).await?;
        let blocked = resp.answers().iter().any(|r| match r.data() {
            Some(RData::A(a)) => !self.policy.address_allowed(IpAddr::V4(a.0)),
            Some(RData::AAAA(a)) => !self.policy.address_allowed(IpAddr::V6(a.0)),
            _ => false,
        });
        if blocked {
            return reply_to(query, ResponseCode::Refused).to_vec().ok();
        }
        self.record(&resp);
        resp.set_id(query.id())
            .set_recursion_desired(query.recursion_desired());
        *resp.queries_mut() = query.queries().to_vec();
        resp.to_vec().ok()
    }

    /// Sends `packet` (the query `sent`) to `server` and returns its answer to exactly that
    /// query; `None` when none came in time.
    async fn exchange(&self, server: SocketAddr, packet: &[u8], sent: &Message) -> Option<Message> {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().ok()?
        } else {
            "[::]:0".parse().ok()?
        };
        let sock = UdpSocket::bind(bind).await.ok()?;
        // The servers are the host's resolvers or `--dns-servers`, never an address the guest
        // chose, so no policy decision is needed (the guest chooses only the query).
        #[allow(clippy::disallowed_methods)]
        sock.connect(server).await.ok()?;
        sock.send(packet).await.ok()?;
        let mut buf = vec![0u8; 4096];
        let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
        loop {
            let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
                .await
                .ok()?
                .ok()?;
            let Ok(resp) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            // Anything but the answer to what was sent (a stray or spoofed datagram) is ignored.
            if resp.id() != sent.id()
                || resp.message_type() != MessageType::Response
                || resp.queries() != sent.queries()
            {
                continue;
            }
            return Some(resp);
        }
    }
}

/// Whether `packet` is a DNS query (what `open` mode relays: nothing else goes to port 53).
pub fn is_query(packet: &[u8]) -> bool {
    Message::from_vec(packet).is_ok_and(|m| m.message_type() == MessageType::Query)
}

/// The host's resolvers from `/etc/resolv.conf` (port 53).
pub fn host_resolvers() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn query(name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(77).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    /// A one-shot upstream on loopback answering every query with `ip`.
    async fn upstream(ip: IpAddr) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut m = reply_to(&q, ResponseCode::NoError);
                let data = match ip {
                    IpAddr::V4(v4) => RData::A(A(v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
                };
                m.add_answer(Record::from_rdata(q.queries()[0].name().clone(), 30, data));
                sock.send_to(&m.to_vec().unwrap(), from).await.unwrap();
            }
        });
        addr
    }

    #[test]
    fn synthetic_addresses_are_one_per_name_and_map_back() {
        let names = SyntheticNames::default();
        let a = names.address_for("a.test").unwrap();
        let b = names.address_for("b.test").unwrap();
        assert_eq!(a, Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(b, Ipv4Addr::new(198, 19, 0, 2));
        assert_eq!(names.address_for("a.test"), Some(a));
        assert_eq!(names.name_of(b).as_deref(), Some("b.test"));
        assert_eq!(names.name_of(Ipv4Addr::new(198, 19, 0, 3)), None);
        assert!(SyntheticNames::contains(a));
        // Neither the sinkhole nor a loopback alias is one of them.
        assert!(!SyntheticNames::contains(SINKHOLE));
        assert!(!SyntheticNames::contains(Ipv4Addr::new(198, 18, 0, 1)));
        // The range ends, and then nothing more is handed out.
        for i in 2..SyntheticNames::CAPACITY {
            let ip = names.address_for(&format!("n{i}.test")).unwrap();
            assert!(SyntheticNames::contains(ip), "{ip}");
        }
        assert_eq!(
            names.address_for("n-last.test"),
            None,
            "past the range's end"
        );
        assert_eq!(
            names.name_of(Ipv4Addr::new(198, 19, 254, 254)).as_deref(),
            Some(format!("n{}.test", SyntheticNames::CAPACITY - 1).as_str())
        );
    }

    #[tokio::test]
    async fn synthetic_mode_sends_nothing_upstream() {
        let policy = Arc::new(Policy::direct(Default::default()));
        // An upstream that would answer; it must not be asked while the guest resolves.
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dns = Dns {
            upstreams: vec![sock.local_addr().unwrap()],
            hosts: vec![("db.internal".into(), "10.0.0.5".parse().unwrap())],
            policy,
            mode: DnsMode::Synthetic,
            synthetic: Default::default(),
        };
        let a = |name: &str, t| {
            let q = query(name, t);
            let dns = &dns;
            async move { Message::from_vec(&dns.answer(&q).await.unwrap()).unwrap() }
        };
        let r = a("Www.Example.com.", RecordType::A).await;
        assert_eq!(r.id(), 77);
        assert_eq!(r.queries()[0].name().to_ascii(), "Www.Example.com.");
        let Some(RData::A(ip)) = r.answers()[0].data() else {
            panic!("{r:?}")
        };
        assert!(SyntheticNames::contains(ip.0));
        assert_eq!(
            dns.synthetic.name_of(ip.0).as_deref(),
            Some("www.example.com")
        );
        assert!(a("www.example.com.", RecordType::AAAA)
            .await
            .answers()
            .is_empty());
        // --add-host names keep their addresses.
        let r = a("db.internal.", RecordType::A).await;
        assert!(
            matches!(r.answers()[0].data(), Some(RData::A(x)) if x.0 == Ipv4Addr::new(10, 0, 0, 5))
        );
        let mut buf = [0u8; 512];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf))
                .await
                .is_err(),
            "a query went upstream"
        );
    }

    #[tokio::test]
    async fn the_host_looks_names_up_itself() {
        let policy = Arc::new(Policy::direct(Default::default()));
        let up = upstream("93.184.216.34".parse().unwrap()).await;
        let mut dns = Dns {
            upstreams: vec![up],
            hosts: Vec::new(),
            policy,
            mode: DnsMode::Synthetic,
            synthetic: Default::default(),
        };
        assert_eq!(
            dns.lookup("www.example.com").await.unwrap(),
            vec!["93.184.216.34".parse::<IpAddr>().unwrap()]
        );
        assert!(dns.lookup("bad name..").await.is_err());
        dns.upstreams.clear();
        // Kept for a while: the next connection to the name costs the resolvers nothing.
        assert_eq!(dns.lookup("www.example.com").await.unwrap().len(), 1);
        assert!(dns
            .lookup("other.example.com")
            .await
            .unwrap_err()
            .contains("no DNS servers"));
    }

    #[tokio::test]
    async fn local_names_forwarding_and_refusal() {
        let policy = Arc::new(Policy::direct(Default::default()));
        let public = upstream("93.184.216.34".parse().unwrap()).await;
        let dns = Dns {
            upstreams: vec![public],
            hosts: vec![("db.internal".into(), "10.0.0.5".parse().unwrap())],
            policy: policy.clone(),
            mode: DnsMode::Trusted,
            synthetic: Default::default(),
        };
        let r = Message::from_vec(
            &dns.answer(&query("DB.internal.", RecordType::A))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(r.id(), 77);
        assert_eq!(r.answers().len(), 1);
        let r = Message::from_vec(
            &dns.answer(&query("example.com.", RecordType::A))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert_eq!(
            r.answers()[0].data(),
            Some(&RData::A(A("93.184.216.34".parse().unwrap())))
        );
        // An upstream that resolves a name into a private range is refused.
        let rebind = upstream("192.168.1.1".parse().unwrap()).await;
        let dns = Dns {
            upstreams: vec![rebind],
            hosts: vec![],
            policy,
            mode: DnsMode::Trusted,
            synthetic: Default::default(),
        };
        let r = Message::from_vec(
            &dns.answer(&query("evil.example.", RecordType::A))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(r.response_code(), ResponseCode::Refused);
        assert!(r.answers().is_empty());
        // Garbage is dropped, not answered.
        assert!(dns.answer(b"\x01\x02").await.is_none());
    }

    /// An upstream on loopback that answers every query and keeps every datagram it got.
    async fn recording_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                keep.lock().unwrap().push(buf[..n].to_vec());
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut m = reply_to(&q, ResponseCode::NoError);
                if let Some(first) = q.queries().first() {
                    let a = RData::A(A("93.184.216.34".parse().unwrap()));
                    m.add_answer(Record::from_rdata(first.name().clone(), 30, a));
                }
                sock.send_to(&m.to_vec().unwrap(), from).await.unwrap();
            }
        });
        (addr, seen)
    }

    /// Every way a raw query could carry data past the one checked question is refused before
    /// anything is sent, and what is sent is matchlock's own query: one lower-case question, a
    /// fresh id, no records, no EDNS options.
    #[tokio::test]
    async fn only_rebuilt_queries_reach_the_resolver() {
        use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
        let allow = matchlock_policy::hosts::AllowList::new(["allowed.example"]).unwrap();
        let policy = Arc::new(Policy::intercepting(
            Default::default(),
            allow,
            Default::default(),
        ));
        let (server, seen) = recording_upstream().await;
        let dns = Dns {
            upstreams: vec![server],
            hosts: vec![],
            policy,
            mode: DnsMode::Trusted,
            synthetic: Default::default(),
        };
        let base = || {
            let mut m = Message::new();
            m.set_id(0x5ec2).set_recursion_desired(true);
            m.add_query(Query::query(
                Name::from_ascii("allowed.example.").unwrap(),
                RecordType::A,
            ));
            m
        };
        let secret = Name::from_ascii("c2VjcmV0.evil.example.").unwrap();
        let record = || Record::from_rdata(secret.clone(), 1, RData::A(A([1, 2, 3, 4].into())));
        let mut attacks: Vec<(&str, Message, ResponseCode)> = Vec::new();
        let mut m = base();
        m.add_query(Query::query(secret.clone(), RecordType::A));
        attacks.push(("second question", m, ResponseCode::FormErr));
        let mut m = base();
        m.add_answer(record());
        attacks.push(("answer record", m, ResponseCode::FormErr));
        let mut m = base();
        m.add_name_server(record());
        attacks.push(("authority record", m, ResponseCode::FormErr));
        let mut m = base();
        m.add_additional(record());
        attacks.push(("additional record", m, ResponseCode::FormErr));
        let mut m = base();
        let mut edns = Edns::new();
        edns.options_mut().insert(EdnsOption::Unknown(
            u16::from(EdnsCode::Padding),
            b"exfiltrated".to_vec(),
        ));
        m.set_edns(edns);
        attacks.push(("EDNS option", m, ResponseCode::FormErr));
        for op in [OpCode::Update, OpCode::Notify, OpCode::Status] {
            let mut m = base();
            m.set_op_code(op);
            attacks.push(("opcode", m, ResponseCode::NotImp));
        }
        let mut m = base();
        m.queries_mut()[0].set_query_type(RecordType::AXFR);
        attacks.push(("zone transfer", m, ResponseCode::NotImp));
        let mut m = base();
        m.queries_mut()[0].set_query_class(hickory_proto::rr::DNSClass::CH);
        attacks.push(("class", m, ResponseCode::NotImp));
        for (what, m, code) in attacks {
            let r = Message::from_vec(&dns.answer(&m.to_vec().unwrap()).await.unwrap()).unwrap();
            assert_eq!(r.response_code(), code, "{what}");
            assert_eq!(r.id(), 0x5ec2, "{what}");
        }
        assert!(seen.lock().unwrap().is_empty(), "a refused query was sent");

        // A clean query in mixed case with EDNS: answered, but upstream sees only our rebuild.
        let mut m = Message::new();
        m.set_id(0x5ec2).set_recursion_desired(true);
        let mixed = Name::from_ascii("AlLoWeD.ExAmPlE.").unwrap();
        m.add_query(Query::query(mixed.clone(), RecordType::A));
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        m.set_edns(edns);
        let r = Message::from_vec(&dns.answer(&m.to_vec().unwrap()).await.unwrap()).unwrap();
        assert_eq!(r.response_code(), ResponseCode::NoError);
        assert_eq!((r.id(), r.queries()[0].name()), (0x5ec2, &mixed));
        assert_eq!(r.answers().len(), 1);
        let sent = seen.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        let up = Message::from_vec(&sent[0]).unwrap();
        assert_eq!(up.queries().len(), 1);
        assert_eq!(up.queries()[0].name().to_ascii(), "allowed.example.");
        assert_ne!(up.id(), 0x5ec2, "the guest's id is not passed on");
        assert!(up.answers().is_empty() && up.additionals().is_empty());
        let e = up.extensions().as_ref().unwrap();
        assert!(e.options().as_ref().is_empty());
        assert_eq!(e.max_payload(), MAX_UDP_PAYLOAD);
    }

    #[tokio::test]
    async fn ssh_egress_servers_resolve_off_the_http_allow_list() {
        let allow = matchlock_policy::hosts::AllowList::new(["api.example"]).unwrap();
        let ssh = matchlock_policy::hosts::AllowList::new(["git.example"])
            .unwrap()
            .deny_by_default();
        let policy = Arc::new(
            Policy::intercepting(Default::default(), allow, Default::default()).with_ssh_hosts(ssh),
        );
        let up = upstream("93.184.216.34".parse().unwrap()).await;
        let dns = Dns {
            upstreams: vec![up],
            hosts: vec![],
            policy: policy.clone(),
            mode: DnsMode::Trusted,
            synthetic: Default::default(),
        };
        let ask = |name: &str| {
            let mut m = Message::new();
            m.set_id(7).set_recursion_desired(true);
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
            m.to_vec().unwrap()
        };
        let a = |r: Message| match r.answers().first().and_then(|r| r.data()) {
            Some(RData::A(a)) => Some(a.0),
            _ => None,
        };
        let git = Message::from_vec(&dns.answer(&ask("git.example.")).await.unwrap()).unwrap();
        assert_eq!(a(git), Some("93.184.216.34".parse().unwrap()));
        // HTTP to it stays refused; other names stay sinkholed.
        assert!(!policy.allows_host("git.example"));
        let other = Message::from_vec(&dns.answer(&ask("other.example.")).await.unwrap()).unwrap();
        assert_ne!(a(other), Some("93.184.216.34".parse().unwrap()));
    }
}
