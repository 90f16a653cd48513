//! Guest flows end to end without a VM: the in-memory guest of `matchlock_net::harness` talks to
//! the stack that `setup::build` makes from a sandbox's network configuration (the same call the
//! supervisor makes), and upstreams are real sockets on loopback. Policy, secrets, DNS and the
//! proxy's refusals are checked here in milliseconds; `tests/intercept.rs` repeats the essentials
//! through a real VM.

use matchlock_api::config::{InterceptConfig, NetworkConfig, SecretSpec};
use matchlock_net::harness::{Guest, UdpOutcome};
use matchlock_net::setup::{build, SandboxNet};
use matchlock_net::ALIAS_BASE;
use std::net::SocketAddrV4;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const SECRET: &str = "sk-real-value-0123456789";
const PLACEHOLDER: &str = "PH_API_KEY_abcdef";

fn network(intercept: Option<InterceptConfig>, open_loopback: bool) -> NetworkConfig {
    NetworkConfig {
        mtu: matchlock_api::defaults::MTU,
        // Never reach a real resolver from a test.
        dns_servers: vec!["127.0.0.1:9".into()],
        dns_mode: Default::default(),
        allow_private_hosts: if open_loopback {
            vec!["127.0.0.1".into()]
        } else {
            Vec::new()
        },
        allow_private_ranges: false,
        intercept,
    }
}

/// `svc.test`, `api.test` and `other.test` all point at host loopback, as `--add-host` does.
fn add_hosts() -> Vec<(String, String)> {
    ["svc.test", "api.test", "other.test"]
        .iter()
        .map(|n| ("127.0.0.1".to_string(), n.to_string()))
        .collect()
}

fn guest(net: &NetworkConfig) -> Guest {
    let secrets = [("API_KEY".to_string(), SECRET.to_string())];
    let cfg = build(SandboxNet {
        id: "vm-harness",
        network: net,
        add_hosts: &add_hosts(),
        secrets: &secrets,
        upstream_ca: None,
    })
    .expect("the network builds");
    Guest::start(cfg)
}

/// A TCP echo server on loopback.
async fn echo_tcp() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

/// A UDP echo server on loopback.
async fn echo_udp() -> u16 {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = s.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], from).await;
        }
    });
    port
}

/// An HTTP/1.1 upstream on loopback that reports each request's Authorization header on the
/// channel and echoes it in the body.
async fn http_upstream() -> (u16, mpsc::UnboundedReceiver<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if s.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let auth = head
                    .lines()
                    .find_map(|l| l.strip_prefix("authorization: "))
                    .or_else(|| head.lines().find_map(|l| l.strip_prefix("Authorization: ")))
                    .unwrap_or("")
                    .to_string();
                let _ = tx.send(auth.clone());
                let body = format!("auth={auth}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (port, rx)
}

/// The guest sends one HTTP/1.1 request with `headers` and reads the whole answer.
async fn guest_get(g: &Guest, dst: SocketAddrV4, host: &str, headers: &str) -> String {
    let mut s = g
        .connect(dst)
        .await
        .expect("the proxy accepts the connection");
    let req = format!("GET /v1 HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("the answer ends")
        .unwrap();
    out
}

#[tokio::test]
async fn without_interception_flows_are_checked_by_address() {
    let tcp = echo_tcp().await;
    let udp = echo_udp().await;
    // Host loopback, reached through the alias `--add-host` gives it, is blocked by default.
    let closed = guest(&network(None, false));
    let alias = |port| SocketAddrV4::new(ALIAS_BASE, port);
    let e = closed.connect(alias(tcp)).await.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    assert_eq!(
        closed
            .udp(alias(udp), b"ping", Duration::from_secs(5))
            .await,
        UdpOutcome::Refused
    );
    // A private address directly: refused too.
    let private = SocketAddrV4::new([10, 255, 255, 1].into(), 80);
    assert!(closed.connect(private).await.is_err());

    // `--allow-private-host 127.0.0.1` opens exactly that address.
    let open = guest(&network(None, true));
    let mut s = open.connect(alias(tcp)).await.unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(&mut s);
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let recv = r.read_to_end(&mut back);
    let (_, got) = tokio::join!(send, recv);
    got.unwrap();
    assert_eq!(back, payload, "bytes cross the stack unchanged, both ways");
    assert_eq!(
        open.udp(alias(udp), b"ping", Duration::from_secs(5)).await,
        UdpOutcome::Reply(b"ping".to_vec())
    );
    assert!(
        open.connect(private).await.is_err(),
        "only the opened address"
    );
    // The local names resolve to the alias.
    assert_eq!(open.resolve("svc.test").await.unwrap(), [ALIAS_BASE]);
}

fn intercepting(allowed: &[&str], log: &std::path::Path) -> InterceptConfig {
    InterceptConfig {
        allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
        secrets: vec![SecretSpec {
            name: "API_KEY".into(),
            hosts: vec!["api.test".into()],
            placeholder: PLACEHOLDER.into(),
            // The in-memory guest speaks plain HTTP (refusal without this: tests/proxy.rs).
            allow_http: true,
        }],
        event_log: Some(log.to_path_buf()),
        run_id: "run-h".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn interception_gates_requests_and_swaps_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let (port, mut seen) = http_upstream().await;
    let echo = echo_tcp().await;
    let udp = echo_udp().await;
    let g = guest(&network(Some(intercepting(&["api.test"], &log)), true));
    let dst = SocketAddrV4::new(ALIAS_BASE, port);

    // The allowed host gets the real secret; the guest sees only the placeholder.
    let auth = format!("Authorization: Bearer {PLACEHOLDER}\r\n");
    let out = guest_get(&g, dst, &format!("api.test:{port}"), &auth).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(seen.recv().await.unwrap(), format!("Bearer {SECRET}"));
    assert!(out.contains(&format!("auth=Bearer {PLACEHOLDER}")), "{out}");
    assert!(!out.contains(SECRET), "the echoed value is scrubbed: {out}");

    // Another host on the same address: refused by the policy, with its reason.
    let out = guest_get(&g, dst, &format!("other.test:{port}"), "").await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("blocked: other.test is not on this sandbox's allow-list"),
        "{out}"
    );
    // Non-HTTP traffic is closed while the list names hosts; UDP is refused.
    let mut s = g
        .connect(SocketAddrV4::new(ALIAS_BASE, echo))
        .await
        .unwrap();
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).await.unwrap(), 0, "closed, not relayed");
    assert_eq!(
        g.udp(
            SocketAddrV4::new(ALIAS_BASE, udp),
            b"x",
            Duration::from_secs(5)
        )
        .await,
        UdpOutcome::Refused
    );
    // DNS: local names answer; a name off the list never leaves and gets the sinkhole.
    assert_eq!(g.resolve("api.test").await.unwrap(), [ALIAS_BASE]);
    assert_eq!(
        g.resolve("exfil-data.attacker.test").await.unwrap(),
        [matchlock_net::dns::SINKHOLE]
    );

    // The event log records each decision, once, and never the value.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(SECRET));
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |f: &dyn Fn(&serde_json::Value) -> bool| events.iter().filter(|e| f(e)).count();
    assert_eq!(
        count(&|e| e["event_type"] == "gate_decision"
            && e["data"]["host"] == "api.test"
            && e["data"]["allowed"] == true),
        1,
        "{text}"
    );
    assert_eq!(
        count(&|e| e["event_type"] == "gate_decision"
            && e["data"]["host"] == "other.test"
            && e["data"]["allowed"] == false),
        1,
        "{text}"
    );
    assert_eq!(
        count(&|e| e["event_type"] == "request_transform" && e["data"]["secret"] == "API_KEY"),
        1,
        "{text}"
    );
}

#[tokio::test]
async fn an_open_list_still_keeps_secrets_to_their_hosts_and_passes_other_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let (port, mut seen) = http_upstream().await;
    let echo = echo_tcp().await;
    let g = guest(&network(Some(intercepting(&[], &log)), true));
    let dst = SocketAddrV4::new(ALIAS_BASE, port);
    // Any host may be reached, but the placeholder may not travel to one the secret is not for.
    let auth = format!("Authorization: Bearer {PLACEHOLDER}\r\n");
    let out = guest_get(&g, dst, &format!("other.test:{port}"), &auth).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("secret API_KEY may not be sent to other.test"),
        "{out}"
    );
    let out = guest_get(&g, dst, &format!("other.test:{port}"), "").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(seen.recv().await.unwrap(), "", "nothing was injected");
    // Traffic that is not HTTP passes as is (Matchlock's passthrough).
    let mut s = g
        .connect(SocketAddrV4::new(ALIAS_BASE, echo))
        .await
        .unwrap();
    s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    let mut buf = [0u8; 21];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"SSH-2.0-OpenSSH_9.2\r\n");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("\"secret\":\"API_KEY\""), "{text}");
    assert!(text.contains("\"passthrough\":true"), "{text}");
}

/// A DNS server on loopback answering every A query with 127.0.0.1 and counting the queries.
async fn loopback_resolver() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = s.local_addr().unwrap().port();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let q = &buf[..n];
            let mut i = 12;
            while i < n && q[i] != 0 {
                i += 1 + q[i] as usize;
            }
            let qend = (i + 5).min(n);
            let mut r = q[0..2].to_vec();
            r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
            r.extend_from_slice(&q[12..qend]);
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
            let _ = s.send_to(&r, from).await;
        }
    });
    (port, asked)
}

/// Synthetic DNS while intercepting: the guest gets a made-up address and no query leaves; its
/// request to that address passes the proxy's checks (the Host agrees with what DNS said) and
/// goes to where the host itself resolves the name.
#[tokio::test]
async fn synthetic_dns_requests_reach_the_name_the_host_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let (port, mut seen) = http_upstream().await;
    let (resolver, asked) = loopback_resolver().await;
    let mut net = network(Some(intercepting(&["api.up", "b.up"], &log)), true);
    net.dns_servers = vec![format!("127.0.0.1:{resolver}")];
    net.dns_mode = matchlock_api::config::DnsMode::Synthetic;
    let g = guest(&net);
    let ips = g.resolve("api.up").await.unwrap();
    assert_eq!(ips.len(), 1);
    assert_eq!(ips[0].octets()[..2], [198, 19]);
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0);
    // A request for `host` to api.up's made-up address.
    let dst = SocketAddrV4::new(ips[0], port);
    let get = |host: &str| {
        let host = format!("{host}:{port}");
        let g = &g;
        async move { guest_get(g, dst, &host, "").await }
    };
    let out = get("api.up").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(seen.recv().await.unwrap(), "");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Another allowed name on that address: not what DNS told the guest, refused.
    let b = g.resolve("b.up").await.unwrap();
    assert_ne!(b, ips);
    let out = get("b.up").await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    // A second connection to the same name is served from the host's lookup of a moment ago.
    let out = get("api.up").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
    // UDP to a synthetic address is refused.
    assert_eq!(
        g.udp(
            SocketAddrV4::new(*dst.ip(), 9),
            b"x",
            Duration::from_secs(5)
        )
        .await,
        UdpOutcome::Refused
    );
    // A name off the list gets the sinkhole, not an address of its own.
    let off = g.resolve("off.up").await.unwrap();
    assert_eq!(off, vec![matchlock_net::dns::SINKHOLE]);
}

/// A DNS query for `a.test`, as a guest's resolver sends it.
fn dns_query() -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    q.extend_from_slice(b"\x01a\x04test\x00\x00\x01\x00\x01");
    q
}

/// Open DNS mode relays a query to the server the guest names (here a loopback resolver the
/// test opens, on port 53 as the mode requires), also while intercepting, and refuses anything
/// else sent to port 53. Needs port 53 on 127.0.0.1 (root, and the port free).
#[tokio::test]
async fn open_dns_relays_queries_and_only_queries() {
    let Ok(server) = tokio::net::UdpSocket::bind("127.0.0.1:53").await else {
        eprintln!(
            "NOTE: 127.0.0.1:53 is taken or needs root; open DNS mode's relay went unchecked"
        );
        return;
    };
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = server.recv_from(&mut buf).await {
            let mut r = buf[..n].to_vec();
            r[2] |= 0x80; // QR: a response
            r.extend_from_slice(b"relayed");
            let _ = server.send_to(&r, from).await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let mut net = network(Some(intercepting(&["api.test"], &log)), true);
    net.dns_mode = matchlock_api::config::DnsMode::Open;
    let g = guest(&net);
    let resolver = SocketAddrV4::new(ALIAS_BASE, 53);
    match g.udp(resolver, &dns_query(), Duration::from_secs(5)).await {
        UdpOutcome::Reply(r) => assert!(r.ends_with(b"relayed"), "{r:?}"),
        other => panic!("the query was not relayed: {other:?}"),
    }
    assert_eq!(
        g.udp(resolver, b"not a DNS message", Duration::from_secs(5))
            .await,
        UdpOutcome::Refused
    );
    // The same query in the default mode is answered by matchlock, never relayed.
    net.dns_mode = Default::default();
    let g = guest(&net);
    if let UdpOutcome::Reply(r) = g.udp(resolver, &dns_query(), Duration::from_secs(8)).await {
        assert!(!r.ends_with(b"relayed"), "trusted mode relayed a query");
    }
}

#[tokio::test]
async fn a_request_sent_to_an_address_dns_never_gave_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let (port, _seen) = http_upstream().await;
    let g = guest(&network(Some(intercepting(&["api.test"], &log)), true));
    // api.test resolves to the alias; the guest sends a request for it to 127.0.0.1 directly.
    let dst = SocketAddrV4::new([127, 0, 0, 1].into(), port);
    let out = guest_get(&g, dst, &format!("api.test:{port}"), "").await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(
        out.contains("127.0.0.1 is not an address matchlock resolved api.test to"),
        "{out}"
    );
}

/// A TCP SYN frame from `src` to `dst`, with valid checksums.
fn syn_frame(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::*;
    let tcp = TcpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: None,
        window_len: 64_000,
        window_scale: None,
        max_seg_size: Some(1400),
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.buffer_len(),
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(matchlock_net::setup::GUEST_MAC),
        dst_addr: EthernetAddress(matchlock_net::setup::GATEWAY_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + tcp.buffer_len()];
    let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut f);
    let mut p = Ipv4Packet::new_unchecked(f.payload_mut());
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut p, &caps);
    let mut t = TcpPacket::new_unchecked(p.payload_mut());
    tcp.emit(
        &mut t,
        &IpAddress::Ipv4(*src.ip()),
        &IpAddress::Ipv4(*dst.ip()),
        &caps,
    );
    buf
}

#[tokio::test]
async fn frames_in_another_address_name_are_dropped() {
    let (tcp, accepted) = counting_tcp().await;
    let g = guest(&network(None, true));
    let dst = SocketAddrV4::new(ALIAS_BASE, tcp);
    // A well-formed SYN from an address that is not the guest's: the stack must not act on it.
    g.send_frame(syn_frame("192.168.127.99:5555".parse().unwrap(), dst))
        .await;
    // The same frame from the guest's address is acted on: the check is the source, not the
    // frame.
    g.send_frame(syn_frame("192.168.127.2:5556".parse().unwrap(), dst))
        .await;
    let mut s = g.connect(dst).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 1];
    s.read_exact(&mut buf).await.unwrap();
    // Connections are made before the guest's handshake completes; give a stray one time to
    // show up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the guest's two connections and no third"
    );
}

/// A TCP echo server on loopback that counts the connections it accepted.
async fn counting_tcp() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = n.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (port, n)
}

/// A refusal reaches the guest whole even while the guest is still sending the request's body.
/// The proxy answers before reading the body and hangs up; like a server's lingering close, the
/// stack then takes and drops the rest of the body and delivers everything the proxy wrote. A
/// client that sends its whole body before reading (Python's `http.client`, curl) would otherwise
/// get a reset instead of the 403 or 429, and could not tell a refusal from a broken network.
#[tokio::test]
async fn a_refusal_arrives_whole_while_the_guest_is_still_sending() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let (port, _seen) = http_upstream().await;
    let g = guest(&network(Some(intercepting(&["api.test"], &log)), true));
    let dst = SocketAddrV4::new(ALIAS_BASE, port);
    for round in 0..5 {
        let mut s = g.connect(dst).await.unwrap();
        let total = 2 << 20;
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: other.test:{port}\r\nContent-Length: {total}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'x'; 16 << 10];
        for _ in 0..total / chunk.len() {
            s.write_all(&chunk)
                .await
                .unwrap_or_else(|e| panic!("round {round}: the body was cut off: {e}"));
        }
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out))
            .await
            .expect("the answer ends")
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let out = String::from_utf8_lossy(&out);
        assert!(
            out.starts_with("HTTP/1.1 403") && out.contains("not on this sandbox's allow-list"),
            "round {round}: {out:?}"
        );
    }
}
