//! End-to-end tests of the sandbox network: real VMs whose traffic goes through matchlock's
//! userspace stack. Every upstream is on the host's loopback, reached through `--add-host` names
//! (the guest sees alias addresses) and opened with `--allow-private-host`; nothing is sent to any
//! other address. Blocked destinations are refused inside the stack before any host socket exists.

#[path = "common/mod.rs"]
mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A TCP echo server on 127.0.0.1 that counts connections open at once (peak).
struct Echo {
    port: u16,
    peak: Arc<AtomicUsize>,
}

fn echo_server() -> Echo {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let open = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (o, p) = (open.clone(), peak.clone());
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let (o, p) = (o.clone(), p.clone());
            std::thread::spawn(move || {
                let now = o.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                let mut buf = [0u8; 65536];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Echo { port, peak }
}

fn udp_echo_server() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut reply = b"udp:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&reply, from);
        }
    });
    port
}

/// A DNS server on 127.0.0.1 answering `*.public.test` with 1.2.3.4, `*.private.test` with
/// 10.0.0.7 and `*.loop.test` with 127.0.0.1 (A records); it records the names it was asked.
fn dns_server() -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = s.local_addr().unwrap().port();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let q = &buf[..n];
            if n < 12 {
                continue;
            }
            // Question name: length-prefixed labels from byte 12.
            let (mut i, mut labels) = (12usize, Vec::new());
            while i < n && q[i] != 0 {
                let len = q[i] as usize;
                labels.push(String::from_utf8_lossy(&q[i + 1..(i + 1 + len).min(n)]).into_owned());
                i += 1 + len;
            }
            let qend = i + 5; // zero label + type + class
            let name = labels.join(".");
            seen2.lock().unwrap().push(name.clone());
            let ip = if name.ends_with("private.test") {
                [10, 0, 0, 7]
            } else if name.ends_with("loop.test") {
                [127, 0, 0, 1]
            } else {
                [1, 2, 3, 4]
            };
            let mut r = Vec::new();
            r.extend_from_slice(&q[0..2]); // id
            r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
            r.extend_from_slice(&q[12..qend.min(n)]);
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend_from_slice(&ip);
            let _ = s.send_to(&r, from);
        }
    });
    (port, seen)
}

/// Python for the guest: `tcp(host, port)` sends `ping`, returns what came back, `refused` or
/// `error:<kind>`.
const PY_TCP: &str = r#"
import socket
def tcp(host, port):
    try:
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(b"ping"); s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            d = s.recv(100)
            if not d: break
            data += d
        return data.decode()
    except OSError as e:
        return "refused" if isinstance(e, ConnectionRefusedError) else "error:" + type(e).__name__
"#;

#[test]
fn tcp_udp_dns_and_the_egress_policy() {
    let py = python_image();
    let echo = echo_server();
    let udp = udp_echo_server();
    let (dns, seen) = dns_server();
    let script = format!(
        r#"{PY_TCP}
print("tcp", tcp("up", {tcp_port}))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(10)
u.sendto(b"hi", ("up", {udp_port})); print("udp", u.recvfrom(100)[0].decode())
print("dns-public", socket.gethostbyname("www.public.test"))
try:
    print("dns-private", socket.gethostbyname("db.private.test"))
except OSError:
    print("dns-private refused")
print("dns-addhost", socket.gethostbyname("up"))
for ip in ["10.1.2.3", "172.16.5.5", "192.168.1.1", "100.64.0.1", "169.254.169.254", "127.0.0.1", "224.0.0.1", "240.0.0.1", "0.0.0.0"]:
    print("blocked", ip, tcp(ip, 80))
"#,
        tcp_port = echo.port,
        udp_port = udp
    );
    let dns_arg = format!("127.0.0.1:{dns}");
    let out = ok(run(&[
        "run",
        "--image",
        py,
        "--add-host",
        "up:127.0.0.1",
        "--allow-private-host",
        "127.0.0.1",
        "--dns-servers",
        &dns_arg,
        "--",
        "python3",
        "-c",
        &script,
    ]));
    assert!(out.contains("tcp ping\n"), "{out}");
    assert!(out.contains("udp udp:hi\n"), "{out}");
    assert!(out.contains("dns-public 1.2.3.4\n"), "{out}");
    assert!(out.contains("dns-private refused\n"), "{out}");
    assert!(out.contains("dns-addhost 198.18.0.1\n"), "{out}");
    for ip in [
        "10.1.2.3",
        "172.16.5.5",
        "192.168.1.1",
        "100.64.0.1",
        "169.254.169.254",
        "127.0.0.1",
        "240.0.0.1",
        "0.0.0.0",
    ] {
        assert!(
            out.contains(&format!("blocked {ip} refused\n"))
                || out.contains(&format!("blocked {ip} error:")),
            "{ip}: {out}"
        );
    }
    let names = seen.lock().unwrap().clone();
    assert!(names.iter().any(|n| n == "www.public.test"), "{names:?}");
    // add-host names never reach the upstream.
    assert!(!names.iter().any(|n| n == "up"), "{names:?}");

    // The same loopback service without --allow-private-host is refused.
    let out = ok(run(&[
        "run", "--image", py, "--add-host", "up:127.0.0.1", "--", "python3", "-c",
        &format!("import socket\ntry:\n socket.create_connection(('up', {}), timeout=10); print('connected')\nexcept ConnectionRefusedError: print('refused')", echo.port),
    ]));
    assert_eq!(out, "refused\n");
}

/// The DNS modes: `trusted` answers a query sent to any server itself; `synthetic` sends no
/// query upstream, gives each name an address of its own and resolves the name on the host when
/// the guest connects; `open` relays a query to the server the guest named, which the address
/// policy still checks.
#[test]
fn dns_modes() {
    let py = python_image();
    let echo = echo_server();
    let (dns, seen) = dns_server();
    let dns_arg = format!("127.0.0.1:{dns}");
    let script = format!(
        r#"{PY_TCP}
import struct, random
def ask(server, name):
    q = struct.pack('>HHHHHH', random.randrange(65536), 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\0' + struct.pack('>HH', 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(4)
    s.sendto(q, (server, 53))
    try:
        r = s.recv(2048)
        return 'answer ' + '.'.join(str(b) for b in r[-4:]) if r[7] else 'rcode %d' % (r[3] & 15)
    except OSError as e:
        return 'no answer'
a = socket.gethostbyname("svc.loop.test")
b = socket.gethostbyname("never.public.test")
print("names", a, b, a == socket.gethostbyname("svc.loop.test"))
print("tcp", tcp("svc.loop.test", {port}))
print("blocked", tcp("db.private.test", {port}))
print("elsewhere", ask("203.0.113.53", "www.public.test"))
"#,
        port = echo.port
    );
    let sandbox = |mode: &str| {
        ok(run(&[
            "run",
            "--image",
            py,
            "--dns-mode",
            mode,
            "--allow-private-host",
            "127.0.0.1",
            "--dns-servers",
            &dns_arg,
            "--",
            "python3",
            "-c",
            &script,
        ]))
    };

    // synthetic: made-up addresses, one per name; the connection reaches the real service.
    let out = sandbox("synthetic");
    let names = out.lines().find(|l| l.starts_with("names ")).unwrap_or("");
    let words: Vec<&str> = names.split(' ').collect();
    assert_eq!(words.len(), 4, "{out}");
    assert!(
        words[1].starts_with("198.19.") && words[2].starts_with("198.19."),
        "{out}"
    );
    assert_ne!(words[1], words[2], "{out}");
    assert_eq!(words[3], "True", "{out}");
    assert!(out.contains("tcp ping\n"), "{out}");
    // A name the host resolves into a blocked range is refused when the guest connects.
    assert!(out.contains("blocked refused\n"), "{out}");
    let asked = seen.lock().unwrap().clone();
    // The host looked up only the name connected to, and only when it was.
    assert!(asked.iter().any(|n| n == "svc.loop.test"), "{asked:?}");
    assert!(!asked.iter().any(|n| n == "never.public.test"), "{asked:?}");
    // The query to another server was answered by the sandbox, with a made-up address.
    assert!(out.contains("elsewhere answer 198.19."), "{out}");
    assert!(!asked.iter().any(|n| n == "www.public.test"), "{asked:?}");

    // trusted (the default): the query to another server is answered from the host's resolvers.
    let out = sandbox("trusted");
    assert!(out.contains("names 127.0.0.1 1.2.3.4 True"), "{out}");
    // (127.0.0.1 is the guest's own loopback: only a synthetic address reaches the host's.)
    assert!(out.contains("tcp refused"), "{out}");
    assert!(out.contains("elsewhere answer 1.2.3.4"), "{out}");
    assert!(seen.lock().unwrap().iter().any(|n| n == "www.public.test"));

    // open: the query goes to the server named, and the policy refuses a documentation address.
    seen.lock().unwrap().clear();
    let out = sandbox("open");
    assert!(out.contains("names 127.0.0.1 1.2.3.4 True"), "{out}");
    assert!(out.contains("elsewhere no answer"), "{out}");
    assert!(!seen.lock().unwrap().iter().any(|n| n == "www.public.test"));

    let o = run(&["run", "--image", py, "--dns-mode", "magic", "--", "true"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("unknown DNS mode"), "{}", stderr(&o));
    let o = run(&[
        "run",
        "--image",
        py,
        "--no-network",
        "--dns-mode",
        "open",
        "--",
        "true",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--dns-mode"), "{}", stderr(&o));
}

#[test]
fn no_network_and_conflicting_flags() {
    let out = ok(run(&[
        "run",
        "--image",
        BUSYBOX,
        "--no-network",
        "--",
        "sh",
        "-c",
        "ls /sys/class/net",
    ]));
    let ifaces: Vec<&str> = out.split_whitespace().collect();
    assert!(ifaces.contains(&"lo") && !ifaces.contains(&"eth0"), "{out}");
    let o = run(&[
        "run",
        "--image",
        BUSYBOX,
        "--no-network",
        "--allow-private-host",
        "127.0.0.1",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("--no-network"), "{}", stderr(&o));
    let o = run(&["run", "--image", BUSYBOX, "--mtu", "100", "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    let out = ok(run(&[
        "run",
        "--image",
        BUSYBOX,
        "--mtu",
        "1280",
        "--",
        "cat",
        "/sys/class/net/eth0/mtu",
    ]));
    assert_eq!(out, "1280\n");
}

#[test]
fn a_100_mb_download_arrives_intact() {
    use sha2::Digest;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let chunk: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    let total = 100 << 20;
    let mut h = sha2::Sha256::new();
    for _ in 0..total / chunk.len() {
        h.update(&chunk);
    }
    let want = hex::encode(h.finalize());
    let c2 = chunk.clone();
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = l.accept() {
            for _ in 0..total / c2.len() {
                if c.write_all(&c2).is_err() {
                    return;
                }
            }
        }
    });
    let cmd = format!("nc up {port} </dev/null | sha256sum");
    let out = ok(run(&[
        "run",
        "--image",
        BUSYBOX,
        "--add-host",
        "up:127.0.0.1",
        "--allow-private-host",
        "127.0.0.1",
        "--",
        "sh",
        "-c",
        &cmd,
    ]));
    assert_eq!(out.split_whitespace().next(), Some(want.as_str()));
}

#[test]
fn thousands_of_connections_stay_within_the_caps_and_the_stack_recovers() {
    let py = python_image();
    let echo = echo_server();
    let script = format!(
        r#"
import socket
socks, refused, errors = [], 0, 0
for i in range(1500):
    s = socket.socket(); s.settimeout(20)
    try:
        s.connect(("up", {port})); socks.append(s)
    except ConnectionRefusedError:
        refused += 1; s.close()
    except OSError:
        errors += 1; s.close()
print("open", len(socks), "refused", refused, "errors", errors)
for s in socks: s.close()
import time; time.sleep(2)
s = socket.create_connection(("up", {port}), timeout=20); s.sendall(b"again"); s.shutdown(socket.SHUT_WR)
print("after", s.recv(10).decode())
"#,
        port = echo.port
    );
    let out = ok(run(&[
        "run",
        "--image",
        py,
        "--memory",
        "512",
        "--add-host",
        "up:127.0.0.1",
        "--allow-private-host",
        "127.0.0.1",
        "--",
        "python3",
        "-c",
        &script,
    ]));
    assert!(out.contains("after again\n"), "{out}");
    let open: usize = out
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(open > 100, "{out}");
    // The host never saw more connections than the per-sandbox cap.
    assert!(
        echo.peak.load(Ordering::SeqCst) <= 512,
        "peak {}",
        echo.peak.load(Ordering::SeqCst)
    );
    assert!(out.contains("refused"), "{out}");
    std::thread::sleep(Duration::from_millis(10));
}
