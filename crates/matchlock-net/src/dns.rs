//! DNS for the guest: its resolver points at the gateway, and matchlock answers. Names given with
//! `--add-host` are answered locally; everything else is forwarded to the upstream servers, and an
//! answer that points into a blocked range is refused (so a name cannot smuggle a private address
//! past the egress policy, e.g. by DNS rebinding).

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use matchlock_policy::Policy;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
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
        if self.policy.intercepts() {
            let name = query
                .queries()
                .first()
                .map(|q| normalize(&q.name().to_ascii()));
            if !name.as_deref().is_some_and(|n| self.policy.allows_host(n)) {
                return self.sinkhole(&query).to_vec().ok();
            }
        }
        if self.upstreams.is_empty() {
            return reply_to(&query, ResponseCode::ServFail).to_vec().ok();
        }
        for server in &self.upstreams {
            if let Some(resp) = self.forward(*server, packet, query.id()).await {
                return Some(resp);
            }
        }
        reply_to(&query, ResponseCode::ServFail).to_vec().ok()
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

    async fn forward(&self, server: SocketAddr, packet: &[u8], id: u16) -> Option<Vec<u8>> {
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
            if resp.id() != id {
                continue;
            }
            let blocked = resp.answers().iter().any(|r| match r.data() {
                Some(RData::A(a)) => !self.policy.address_allowed(IpAddr::V4(a.0)),
                Some(RData::AAAA(a)) => !self.policy.address_allowed(IpAddr::V6(a.0)),
                _ => false,
            });
            if blocked {
                let query = Message::from_vec(packet).ok()?;
                return reply_to(&query, ResponseCode::Refused).to_vec().ok();
            }
            self.record(&resp);
            return Some(buf[..n].to_vec());
        }
    }
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

    #[tokio::test]
    async fn local_names_forwarding_and_refusal() {
        let policy = Arc::new(Policy::direct(Default::default()));
        let public = upstream("93.184.216.34".parse().unwrap()).await;
        let dns = Dns {
            upstreams: vec![public],
            hosts: vec![("db.internal".into(), "10.0.0.5".parse().unwrap())],
            policy: policy.clone(),
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
}
