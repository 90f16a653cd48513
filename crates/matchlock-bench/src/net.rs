//! `--net MB`: guest download throughput and TCP connection-setup latency from a loopback server,
//! through matchlock's userspace stack against QEMU's built-in user networking (slirp, `-netdev
//! user`), same kernel, same agent, same image, measured in the same run.
//!
//! The slirp VM is booted here directly (QEMU + the agent protocol), since matchlock itself never
//! uses slirp: its NIC always goes through the policy-enforcing stack.

use anyhow::{bail, Context, Result};
use matchlock_proto::GuestNet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The guest side: one download of `bytes`, then `conns` sequential connects, as JSON-ish lines.
fn guest_script(host: &str, port: u16, bytes: u64, conns: u32) -> String {
    format!(
        r#"
import socket, time
s = socket.create_connection(("{host}", {port}))
s.sendall(b"D")
left = {bytes}
while left > 0:
    d = s.recv(1 << 20)
    if not d: break
    left -= len(d)
s.close()
lat = []
for i in range({conns}):
    t = time.perf_counter()
    c = socket.create_connection(("{host}", {port}))
    c.sendall(b"P"); c.recv(1)
    lat.append(time.perf_counter() - t)
    c.close()
lat.sort()
print("left", left, "p50_ms", lat[len(lat) // 2] * 1000)
"#
    )
}

/// Writes `bytes` bytes of `chunk`, repeated, in writes of up to a whole chunk.
fn send(w: &mut impl Write, chunk: &[u8], bytes: u64) -> std::io::Result<()> {
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// A loopback server: "D" gets `bytes` bytes (download time measured here, from the request to
/// the client's close), "P" gets one byte (a connect probe).
fn server(bytes: u64) -> Result<(u16, Arc<AtomicU64>)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    let download_us = Arc::new(AtomicU64::new(0));
    let d2 = download_us.clone();
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let d2 = d2.clone();
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let mut kind = [0u8; 1];
                if c.read_exact(&mut kind).is_err() {
                    return;
                }
                if kind[0] == b'P' {
                    let _ = c.write_all(b"p");
                    return;
                }
                let start = Instant::now();
                if send(&mut c, &chunk, bytes).is_err() {
                    return;
                }
                // Done when the guest has read everything and closed.
                let mut sink = [0u8; 16];
                let _ = c.read(&mut sink);
                d2.store(start.elapsed().as_micros() as u64, Ordering::SeqCst);
            });
        }
    });
    Ok((port, download_us))
}

fn parse_guest(out: &str) -> Result<f64> {
    let words: Vec<&str> = out.split_whitespace().collect();
    if words.first() != Some(&"left") || words.get(1) != Some(&"0") {
        bail!("guest download incomplete: {out:?}");
    }
    Ok(words
        .get(3)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN))
}

/// Through matchlock: `run` with the loopback server mapped by `--add-host`.
fn via_matchlock(matchlock: &str, image: &str, bytes: u64, conns: u32) -> Result<(f64, f64)> {
    let (port, download_us) = server(bytes)?;
    let script = guest_script("up", port, bytes, conns);
    let out = Command::new(matchlock)
        .args([
            "run",
            "--image",
            image,
            "--add-host",
            "up:127.0.0.1",
            "--allow-private-host",
            "127.0.0.1",
            "--",
            "python3",
            "-c",
            &script,
        ])
        .stdin(Stdio::null())
        .output()
        .context("running matchlock")?;
    if !out.status.success() {
        bail!(
            "matchlock run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let p50 = parse_guest(&String::from_utf8_lossy(&out.stdout))?;
    let us = download_us.load(Ordering::SeqCst) as f64;
    Ok((bytes as f64 / (us / 1e6) / 1e6, p50))
}

/// Through slirp: a VM booted here with `-netdev user` (the host's loopback is 10.0.2.2).
fn via_slirp(rootfs: &Path, bytes: u64, conns: u32) -> Result<(f64, f64)> {
    let (port, download_us) = server(bytes)?;
    let net = [
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-device,netdev=n0",
    ];
    let vm = crate::rawvm::RawVm::boot(
        rootfs,
        &net.map(String::from),
        Some(GuestNet {
            address: [10, 0, 2, 15],
            prefix: 24,
            gateway: [10, 0, 2, 2],
            mtu: 1500,
        }),
    )?;
    let out = vm.exec(
        vec![
            "python3".into(),
            "-c".into(),
            guest_script("10.0.2.2", port, bytes, conns),
        ],
        false,
    )?;
    let p50 = parse_guest(&out)?;
    let us = download_us.load(Ordering::SeqCst) as f64;
    Ok((bytes as f64 / (us / 1e6) / 1e6, p50))
}

/// Runs `runs` interleaved rounds of both and prints medians and ratios.
pub fn bench(matchlock: &str, image: &str, mb: u64, runs: usize) -> Result<()> {
    let store = matchlock_image::ImageStore::open_default()?;
    let info = store.resolve(image).with_context(|| {
        format!("--net needs an image with python3 ({image}); build one with scripts/make-python-image and import it")
    })?;
    let bytes = mb << 20;
    let conns = 200;
    let (mut ours, mut slirp) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ours.push(via_matchlock(matchlock, image, bytes, conns)?);
        slirp.push(via_slirp(&info.rootfs, bytes, conns)?);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (mut ot, mut oc): (Vec<f64>, Vec<f64>) = ours.into_iter().unzip();
    let (mut st, mut sc): (Vec<f64>, Vec<f64>) = slirp.into_iter().unzip();
    let (ot, oc, st, sc) = (
        median(&mut ot),
        median(&mut oc),
        median(&mut st),
        median(&mut sc),
    );
    println!("\n## guest network: {mb} MB download and {conns} connects from a loopback server ({runs} runs each, medians)");
    println!("QEMU user networking (slirp, baseline): {st:8.1} MB/s  connect p50 {sc:6.2} ms");
    println!("matchlock stack:                        {ot:8.1} MB/s  connect p50 {oc:6.2} ms");
    println!(
        "throughput ratio {:.2}x, connect latency ratio {:.2}x",
        ot / st,
        oc / sc
    );
    Ok(())
}

/// An HTTPS server on loopback (certificate for `up` from a fresh test CA): `/big` sends `bytes`
/// bytes, anything else two. Returns its port and the CA in PEM.
fn tls_server(bytes: u64) -> Result<(u16, String)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // OpenSSL chains by issuer name: the CA needs one.
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "matchlock-bench upstream CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["up".to_string()])?.signed_by(&key, &issuer)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )?,
    );
    let l = TcpListener::bind("127.0.0.1:0")?;
    let port = l.local_addr()?.port();
    std::thread::spawn(move || {
        let chunk = vec![0x5au8; 1 << 20];
        for c in l.incoming().flatten() {
            let cfg = cfg.clone();
            let chunk = chunk.clone();
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(cfg) else {
                    return;
                };
                let mut s = rustls::StreamOwned::new(conn, c);
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                    if s.read(&mut b).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let big = head.starts_with(b"GET /big");
                let len = if big { bytes } else { 2 };
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                if big {
                    if send(&mut s, &chunk, bytes).is_err() {
                        return;
                    }
                } else {
                    let _ = s.write_all(b"ok");
                }
                let _ = s.flush();
                s.conn.send_close_notify();
                let _ = s.flush();
            });
        }
    });
    Ok((port, ca_cert.pem()))
}

/// Guest side of the HTTPS comparison: one download and `reqs` sequential requests (each a new
/// connection and TLS handshake), timed in the guest.
fn tls_script(port: u16, bytes: u64, reqs: u32, ca_pem: Option<&str>) -> String {
    let ctx = match ca_pem {
        Some(pem) => format!(
            "open('/tmp/up-ca.pem','w').write({pem:?})\nctx = ssl.create_default_context(cafile='/tmp/up-ca.pem')"
        ),
        None => "ctx = ssl.create_default_context()".to_string(),
    };
    format!(
        r#"
import ssl, time, urllib.request
{ctx}
t = time.perf_counter()
n = len(urllib.request.urlopen("https://up:{port}/big", context=ctx, timeout=120).read())
dl = time.perf_counter() - t
lat = []
for i in range({reqs}):
    t = time.perf_counter()
    urllib.request.urlopen("https://up:{port}/small", context=ctx, timeout=30).read()
    lat.append(time.perf_counter() - t)
lat.sort()
print("got", n, "mbps", {bytes} / dl / 1e6, "p50_ms", lat[len(lat) // 2] * 1000)
"#
    )
}

fn tls_run(matchlock: &str, image: &str, mb: u64, reqs: u32, mitm: bool) -> Result<(f64, f64)> {
    let bytes = mb << 20;
    let (port, ca) = tls_server(bytes)?;
    let dir = tempfile::tempdir()?;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca)?;
    let script = tls_script(port, bytes, reqs, (!mitm).then_some(ca.as_str()));
    let mut args = vec![
        "run",
        "--image",
        image,
        "--add-host",
        "up:127.0.0.1",
        "--allow-private-host",
        "127.0.0.1",
    ];
    if mitm {
        args.extend(["--allow-host", "up"]);
    }
    args.extend(["--", "python3", "-c", &script]);
    let out = Command::new(matchlock)
        .args(&args)
        .env("MATCHLOCK_UPSTREAM_CA", &ca_file)
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "matchlock run failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let w: Vec<&str> = text.split_whitespace().collect();
    if w.first() != Some(&"got") || w.get(1).and_then(|n| n.parse::<u64>().ok()) != Some(bytes) {
        bail!("incomplete HTTPS download: {text}");
    }
    let mbps = w.get(3).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    let p50 = w.get(5).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    Ok((mbps, p50))
}

/// `--net-tls MB`: HTTPS download throughput and request latency through the MITM proxy against
/// the same transfer in open mode (TLS end to end), interleaved.
pub fn bench_tls(matchlock: &str, image: &str, mb: u64, runs: usize) -> Result<()> {
    let reqs = 50;
    let (mut open, mut mitm) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        open.push(tls_run(matchlock, image, mb, reqs, false)?);
        mitm.push(tls_run(matchlock, image, mb, reqs, true)?);
    }
    let median = |v: Vec<f64>| {
        let mut v = v;
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (ot, ol): (Vec<f64>, Vec<f64>) = open.into_iter().unzip();
    let (mt, ml): (Vec<f64>, Vec<f64>) = mitm.into_iter().unzip();
    let (ot, ol, mt, ml) = (median(ot), median(ol), median(mt), median(ml));
    println!("\n## HTTPS: {mb} MB download and {reqs} requests (new connection each) from a loopback server ({runs} runs each, medians)");
    println!("open mode, TLS end to end (baseline): {ot:8.1} MB/s  request p50 {ol:7.2} ms");
    println!("interception (MITM + policy):         {mt:8.1} MB/s  request p50 {ml:7.2} ms");
    println!(
        "throughput ratio {:.2}x (target >= 0.5), latency ratio {:.2}x",
        mt / ot,
        ml / ol
    );
    Ok(())
}
