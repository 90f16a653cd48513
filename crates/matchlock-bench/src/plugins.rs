//! `--plugins N`: what the plugin pipeline adds to a model call, in process (the proxy serving
//! a guest connection exactly as the network stack hands it one, no VM, so the pipeline's own
//! cost is not buried in TCG noise). Same run, interleaved:
//!
//! - N sequential model calls (POST with a JSON body, a JSON answer with usage) over one
//!   kept-alive guest connection, through interception with no plugins (the baseline) and with
//!   all three on (budget gate, router reading the body and finding no route, usage logger
//!   reading and logging every answer);
//! - the time to the first streamed byte of an event stream whose server sends its first event
//!   at once and the rest 20 ms later: through interception to the upstream (baseline), and
//!   routed by `local_model_router` to a backend.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use matchlock_api::plugins::{BudgetConfig, PluginsConfig, RouterConfig, UsageConfig};
use matchlock_net::proxy::{upstream_tls, Proxy};
use matchlock_policy::ca::MitmCa;
use matchlock_policy::hosts::{AllowList, NameTable};
use matchlock_policy::plugins::Plugins;
use matchlock_policy::rules::Rules;
use matchlock_policy::secrets::Secrets;
use matchlock_policy::{AddressPolicy, Policy, Target};
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A model API on `ip`: JSON answers with usage, or an event stream (first event at once, the
/// rest 20 ms later) when the request asks to stream.
async fn model_api(ip: &str) -> Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind((ip, 0)).await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    // One request: head, then a Content-Length body.
                    let (head_end, len) = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                            let len = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (i + 4, len);
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    while buf.len() < head_end + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
                    if String::from_utf8_lossy(&body).contains("\"stream\":true") {
                        let first = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
                        let rest = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7}}\n\ndata: [DONE]\n\n";
                        let c = |t: &str| format!("{:x}\r\n{t}\r\n", t.len());
                        let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{}", c(first)).as_bytes()).await;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let _ = s
                            .write_all(format!("{}0\r\n\r\n", c(rest)).as_bytes())
                            .await;
                        continue;
                    }
                    let answer = r#"{"model":"cloud-model","choices":[{"message":{"content":"ok"}}],"usage":{"prompt_tokens":50,"completion_tokens":20}}"#;
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

fn proxy(upstream: SocketAddr, plugins: Option<(Plugins, SocketAddr)>) -> Result<Arc<Proxy>> {
    let names = Arc::new(NameTable::default());
    names.record("api.test", &[upstream.ip()]);
    let address = AddressPolicy {
        allow: vec![upstream.ip()],
        ..Default::default()
    };
    let mut policy = Policy::intercepting(
        address,
        AllowList::new(["api.test"]).map_err(anyhow::Error::msg)?,
        names,
    );
    let backends = match &plugins {
        Some((_, b)) => vec![(b.to_string(), *b)],
        None => Vec::new(),
    };
    policy = policy.with_backends(backends);
    let mut p = Proxy::new(
        Arc::new(policy),
        Secrets::default(),
        MitmCa::generate("vm-bench").map_err(|e| anyhow::anyhow!("{e}"))?,
        upstream_tls(None).map_err(anyhow::Error::msg)?,
        None,
        Rules::default(),
    );
    if let Some((pl, _)) = plugins {
        p = p.with_plugins(pl);
    }
    Ok(Arc::new(p))
}

/// A kept-alive guest connection through `p` to `upstream`.
async fn guest(
    p: &Arc<Proxy>,
    upstream: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let (g, theirs) = tokio::io::duplex(1 << 16);
    let SocketAddr::V4(v4) = upstream else {
        anyhow::bail!("IPv4 upstream expected");
    };
    let target = Target {
        visible: SocketAddrV4::new(*v4.ip(), v4.port()),
        real: upstream,
    };
    tokio::spawn(p.clone().serve(theirs, target));
    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(g)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("guest connection: {e:?}");
        }
    });
    Ok(s)
}

fn call(port: u16, model: &str, stream: bool) -> hyper::Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"Say something short about sandboxes."}}]}}"#
    );
    hyper::Request::post("/v1/chat/completions")
        .header("host", format!("api.test:{port}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request")
}

/// Per-call latencies of `n` sequential calls over one connection.
async fn calls(p: &Arc<Proxy>, upstream: SocketAddr, n: usize) -> Result<Vec<Duration>> {
    let mut s = guest(p, upstream).await.context("guest connection")?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        s.ready().await.with_context(|| format!("call {i}"))?;
        let t = Instant::now();
        let resp = s
            .send_request(call(upstream.port(), "cloud-model", false))
            .await
            .with_context(|| format!("call {i}"))?;
        anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
        resp.into_body().collect().await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// Time to the first body byte of one streamed call for `model`.
async fn first_byte(p: &Arc<Proxy>, upstream: SocketAddr, model: &str) -> Result<Duration> {
    let mut s = guest(p, upstream).await.context("guest connection")?;
    s.ready().await.context("first byte: ready")?;
    let t = Instant::now();
    let resp = s
        .send_request(call(upstream.port(), model, true))
        .await
        .with_context(|| format!("streamed call of {model}"))?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    let mut body = resp.into_body();
    while let Some(f) = body.frame().await {
        if f?.data_ref().is_some_and(|d| !d.is_empty()) {
            break;
        }
    }
    let took = t.elapsed();
    while body.frame().await.is_some() {}
    Ok(took)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the comparison: `n` calls per round, `runs` rounds each way, interleaved.
pub fn bench(n: usize, runs: usize) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let upstream = model_api("127.0.0.1").await?;
        let backend = model_api("127.0.0.2").await.context("binding 127.0.0.2 (loopback)")?;
        let dir = tempfile::tempdir()?;
        let router = RouterConfig {
            backend: Some(backend.to_string()),
            routes: vec!["api.test/routed-model=llama3.1:8b".into()],
        };
        let usage = UsageConfig {
            path: dir.path().join("usage.jsonl"),
            price_file: None,
        };
        let budget = BudgetConfig { limit_usd: 1e9 };
        let configs = [
            ("budget gate + router + usage logger", PluginsConfig {
                local_model_router: Some(router.clone()),
                usage_logger: Some(usage.clone()),
                budget_gate: Some(budget.clone()),
            }),
            ("router alone (body read, no route)", PluginsConfig {
                local_model_router: Some(router.clone()),
                ..Default::default()
            }),
            ("usage logger alone", PluginsConfig {
                usage_logger: Some(usage.clone()),
                ..Default::default()
            }),
        ];
        let bare = proxy(upstream, None)?;
        let mut with = Vec::new();
        for (name, c) in &configs {
            let plugins = Plugins::from_config(c).map_err(anyhow::Error::msg)?;
            with.push((*name, proxy(upstream, Some((plugins, backend)))?, Vec::new()));
        }
        // Warm all (connection setup, first allocations).
        calls(&bare, upstream, 20).await?;
        for (_, p, _) in &with {
            calls(p, upstream, 20).await?;
        }
        let (mut a, mut ta, mut tb) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            a.extend(calls(&bare, upstream, n).await?);
            for (_, p, v) in &mut with {
                v.extend(calls(p, upstream, n).await?);
            }
            for _ in 0..10 {
                ta.push(first_byte(&bare, upstream, "cloud-model").await?);
                tb.push(first_byte(&with[0].1, upstream, "routed-model").await?);
            }
        }
        let logged = std::fs::read_to_string(dir.path().join("usage.jsonl"))?.lines().count();
        let ma = median(a);
        let (fa, fb) = (median(ta), median(tb));
        println!("\n## Plugin pipeline: {n} model calls x {runs} rounds over a kept-alive connection, in process (medians)");
        println!("{:<40} {:7.3} ms per call", "interception, no plugins (baseline)", ms(ma));
        for (name, _, v) in with {
            let m = median(v);
            println!("{name:<40} {:7.3} ms per call, added {:+.3} ms, ratio {:.2}x", ms(m), ms(m) - ms(ma), ms(m) / ms(ma));
        }
        println!("({logged} usage lines logged; target: all three add at most 1 ms)");
        println!("time to first streamed byte: upstream {:.2} ms, routed to the backend {:.2} ms, ratio {:.2}x", ms(fa), ms(fb), ms(fb) / ms(fa));
        Ok(())
    })
}
