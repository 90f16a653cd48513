//! `--ingress N`: the ingress gateway against `matchlock port-forward` to the same guest server,
//! measured in the same run and process.
//!
//! One sandbox of `--net-image` runs python's `http.server` on its port 8000, serving a small file
//! and a big one (`--net MB`, default 32). Both front ends are started in this process over the same
//! sandbox client (the ingress gateway with one `/` route; a port forwarder to 8000). For each,
//! interleaved: N requests for the small file, one new TCP connection each (what a browser or curl
//! pays), timed to the last byte; then the big file `--runs` times, as throughput.

use anyhow::{bail, Context, Result};
use matchlock_ingress::{Gateway, IngressRoute, Options};
use matchlock_sandbox::forward::{Forwarder, PortMap};
use matchlock_sandbox::{Client, Store};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One `GET path` on a new connection, read to the end; the body's length.
fn get(port: u16, path: &str) -> Result<usize> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n"
    )?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    let head_end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP head")?;
    if !got.starts_with(b"HTTP/1.1 200") && !got.starts_with(b"HTTP/1.0 200") {
        bail!("{}", String::from_utf8_lossy(&got[..head_end]));
    }
    Ok(got.len() - head_end - 4)
}

fn start_sandbox(matchlock: &str, image: &str, mb: u64) -> Result<String> {
    let script = format!(
        "mkdir -p /srv && cd /srv && echo ok > small && head -c {} /dev/zero > big \
         && exec python3 -m http.server 8000 --bind 127.0.0.1",
        mb << 20
    );
    let out = Command::new(matchlock)
        .args(["run", "-d", "--image", image, "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("run: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Runs the section.
pub fn bench(matchlock: &str, image: &str, n: usize, mb: u64, runs: usize) -> Result<()> {
    let id = start_sandbox(matchlock, image, mb)?;
    let result = measure(&id, n, mb, runs);
    let _ = Command::new(matchlock).args(["kill", &id]).output();
    let _ = Command::new(matchlock).args(["rm", &id]).output();
    result
}

fn measure(id: &str, n: usize, mb: u64, runs: usize) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let store = Store::open_default();
    let client = Client::for_sandbox(&store, id)?;
    let (gw, fwd) = rt.block_on(async {
        let gw = Gateway::start(Arc::new(client.clone()), Options::default())
            .await
            .map_err(anyhow::Error::msg)?;
        gw.set_routes(vec![IngressRoute {
            prefix: "/".into(),
            port: 8000,
            strip_prefix: false,
        }])
        .await
        .map_err(anyhow::Error::msg)?;
        let fwd = Forwarder::start(
            client,
            &[PortMap {
                local_port: 0,
                remote_port: 8000,
            }],
            &["127.0.0.1".parse()?],
        )
        .await?;
        anyhow::Ok((gw, fwd))
    })?;
    let ingress = gw.local_addr().port();
    let forward = fwd.bindings()[0].local_port;
    // The server may still be starting.
    let start = Instant::now();
    while get(forward, "/small").is_err() {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the guest server did not come up");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..10 {
        get(ingress, "/small")?;
        get(forward, "/small")?;
    }
    let (mut lat_i, mut lat_f) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        get(ingress, "/small")?;
        lat_i.push(t.elapsed());
        let t = Instant::now();
        get(forward, "/small")?;
        lat_f.push(t.elapsed());
    }
    lat_i.sort();
    lat_f.sort();
    let (mut tp_i, mut tp_f) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        for (port, out) in [(ingress, &mut tp_i), (forward, &mut tp_f)] {
            let t = Instant::now();
            let len = get(port, "/big")?;
            if len as u64 != mb << 20 {
                bail!("big file came back with {len} bytes");
            }
            out.push(mb as f64 / t.elapsed().as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (ti, tf) = (med(&mut tp_i), med(&mut tp_f));
    println!("\n== ingress gateway vs port-forward to the same guest server ({n} requests, {runs} x {mb} MiB) ==");
    crate::print_latencies(&[
        ("ingress GET, new connection", &lat_i),
        ("port-forward GET, new conn.", &lat_f),
    ]);
    let p50 = |v: &[Duration]| crate::ms(crate::percentile(v, 0.5));
    println!(
        "ingress / port-forward p50 latency: {:.2}",
        p50(&lat_i) / p50(&lat_f)
    );
    println!("ingress {mb} MiB download:      {ti:8.1} MiB/s (median)");
    println!("port-forward {mb} MiB download: {tf:8.1} MiB/s (median)");
    println!("ingress / port-forward throughput: {:.2}", ti / tf);
    drop((gw, fwd));
    Ok(())
}
