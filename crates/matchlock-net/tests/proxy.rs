//! The interception proxy in-process, against a real TLS upstream on loopback that speaks both
//! HTTP/2 and HTTP/1.1: a guest-side client (trusting only the sandbox CA) goes through
//! `Proxy::serve` exactly as the network stack hands it a guest connection.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use matchlock_net::proxy::{upstream_tls, Proxy};
use matchlock_policy::ca::MitmCa;
use matchlock_policy::hosts::{AllowList, NameTable};
use matchlock_policy::rules::Rules;
use matchlock_policy::secrets::{Secret, Secrets};
use matchlock_policy::{AddressPolicy, Policy, Target};
use sha2::Digest;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A policy for upstreams on loopback (which the real address rules block unless opened, as
/// `--allow-private-host 127.0.0.1` does).
fn policy(allow: AllowList, names: Arc<NameTable>, websockets: bool) -> Arc<Policy> {
    let address = AddressPolicy {
        allow: vec!["127.0.0.1".parse().unwrap()],
        ..Default::default()
    };
    Arc::new(Policy::intercepting(address, allow, names).with_websockets(websockets))
}

/// TCP connections the upstream accepted.
static ACCEPTED: AtomicUsize = AtomicUsize::new(0);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS acceptor for `name` with a certificate from a fresh CA, offering `alpn`; and the CA PEM.
fn upstream_tls_for(name: &str, alpn: &[&[u8]]) -> (tokio_rustls::TlsAcceptor, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "proxy test upstream CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![name.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        ca_cert.pem(),
    )
}

/// An upstream for `up.test` (certificate from a fresh CA): answers with the protocol version it
/// saw and the sha256 of the Authorization header it got. Returns its port and the CA PEM.
async fn upstream() -> (u16, String) {
    let (acceptor, ca_pem) = upstream_tls_for("up.test", &[b"h2", b"http/1.1"]);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            ACCEPTED.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let auth = req
                        .headers()
                        .get("authorization")
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .unwrap_or_default();
                    let body = format!(
                        "{:?} auth_sha={} echo={auth}",
                        req.version(),
                        hex::encode(sha2::Sha256::digest(auth.as_bytes()))
                    );
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(body))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, ca_pem)
}

async fn proxy(ca_pem: &str, placeholder: &str) -> Arc<Proxy> {
    let names = Arc::new(NameTable::default());
    names.record("up.test", &["127.0.0.1".parse().unwrap()]);
    let secret = Secret::new(
        "K",
        "real-value-1",
        AllowList::new(["up.test"]).unwrap(),
        Some(placeholder),
    );
    Arc::new(Proxy::new(
        policy(AllowList::new(["up.test"]).unwrap(), names, true),
        Secrets::new(vec![secret]),
        MitmCa::generate("vm-test").unwrap(),
        upstream_tls(Some(ca_pem.as_bytes())).unwrap(),
        None,
        Rules::default(),
    ))
}

/// A "guest" TLS connection for `up.test` through the proxy (trusting only the sandbox CA),
/// offering `alpn`.
async fn guest_tls(
    p: &Arc<Proxy>,
    port: u16,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::io::DuplexStream> {
    let (guest, theirs) = tokio::io::duplex(1 << 16);
    let target = Target {
        visible: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        real: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    tokio::spawn(p.clone().serve(theirs, target));
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(p.ca_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("up.test").unwrap(),
            guest,
        )
        .await
        .expect("the guest trusts the sandbox CA")
}

/// One request from the "guest" over TLS with `alpn`.
async fn guest_request(p: &Arc<Proxy>, port: u16, alpn: &[u8]) -> (u16, String) {
    let tls = guest_tls(p, port, alpn).await;
    let auth = "Bearer PH_K_0123";
    let uri = format!("https://up.test:{port}/x");
    let resp = if alpn == b"h2" {
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get(uri)
            .header("authorization", auth)
            .body(Empty::<Bytes>::new())
            .unwrap();
        s.send_request(req).await.unwrap()
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/x")
            .header("host", format!("up.test:{port}"))
            .header("authorization", auth)
            .body(Empty::<Bytes>::new())
            .unwrap();
        s.send_request(req).await.unwrap()
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn h2_and_http1_guests_reach_an_h2_upstream_with_secrets_swapped() {
    let (port, ca) = upstream().await;
    let p = proxy(&ca, "PH_K_0123").await;
    let want_sha = hex::encode(sha2::Sha256::digest(b"Bearer real-value-1"));
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let before = ACCEPTED.load(Ordering::SeqCst);
        let (status, body) = guest_request(&p, port, alpn).await;
        // Keep-alive: both requests of the guest connection shared one upstream connection.
        assert_eq!(ACCEPTED.load(Ordering::SeqCst) - before, 1);
        assert_eq!(status, 200, "{body}");
        // The upstream spoke HTTP/2 (ALPN) whatever the guest spoke, got the real value, and its
        // echo came back as the placeholder.
        assert!(body.starts_with("HTTP/2.0"), "{body}");
        assert!(body.contains(&format!("auth_sha={want_sha}")), "{body}");
        assert!(body.ends_with("echo=Bearer PH_K_0123"), "{body}");
        assert!(!body.contains("real-value-1"), "{body}");
    }
}

// ---------------------------------------------------------------------------------------------
// Plain-HTTP guests against scripted loopback upstreams: allow-list modes, passthrough, bodies
// that end with the connection, event streams, WebSockets.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A proxy with no secrets over plain HTTP, where `up.test` and `other.test` resolve to
/// 127.0.0.1 (as matchlock's DNS would have told the guest).
fn plain_proxy(allow: AllowList, rules: Rules, websockets: bool) -> Arc<Proxy> {
    let names = Arc::new(NameTable::default());
    for n in ["up.test", "other.test"] {
        names.record(n, &["127.0.0.1".parse().unwrap()]);
    }
    Arc::new(Proxy::new(
        policy(allow, names, websockets),
        Secrets::default(),
        MitmCa::generate("vm-test").unwrap(),
        upstream_tls(None).unwrap(),
        None,
        rules,
    ))
}

/// A "guest" connection through the proxy to 127.0.0.1:`port`.
fn guest_conn(p: &Arc<Proxy>, port: u16) -> tokio::io::DuplexStream {
    let (guest, theirs) = tokio::io::duplex(1 << 16);
    let target = Target {
        visible: SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
        real: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    tokio::spawn(p.clone().serve(theirs, target));
    guest
}

/// A loopback server that runs `script` on each connection.
async fn scripted<F, Fut>(script: F) -> u16
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(script(s));
        }
    });
    port
}

/// Reads an HTTP head (up to the blank line) from `s`.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// One request over HTTP/1.1 with hyper from the guest side; returns status and body, or the
/// body error.
async fn h1_get(
    guest: tokio::io::DuplexStream,
    host: &str,
    path: &str,
) -> (u16, Result<Vec<u8>, String>) {
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(guest))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", host)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .map_err(|e| e.to_string());
    (status, body)
}

#[tokio::test]
async fn empty_allow_list_allows_every_host_and_passes_other_protocols_through() {
    let http = scripted(|mut s| async move {
        let head = read_head(&mut s).await;
        let host = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("host:"))
            .unwrap_or("")
            .to_string();
        let body = format!("hello {host}");
        let _ = s
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
    })
    .await;
    let echo = scripted(|mut s| async move {
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
    .await;
    // Open (empty list): any host over HTTP, and a protocol that is not HTTP relayed as is.
    let open = plain_proxy(AllowList::default(), Rules::default(), true);
    let (status, body) = h1_get(guest_conn(&open, http), &format!("other.test:{http}"), "/").await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body.unwrap()).contains("other.test"));
    let mut g = guest_conn(&open, echo);
    g.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    let mut got = vec![0u8; 21];
    g.read_exact(&mut got).await.unwrap();
    assert_eq!(got, b"SSH-2.0-OpenSSH_9.2\r\n");
    // `*` is open too.
    let star = plain_proxy(AllowList::new(["*"]).unwrap(), Rules::default(), true);
    let mut g = guest_conn(&star, echo);
    g.write_all(b"\x00\x01binary").await.unwrap();
    let mut got = vec![0u8; 8];
    g.read_exact(&mut got).await.unwrap();
    assert_eq!(got, b"\x00\x01binary");

    // A list that names hosts: other hosts get a 403, other protocols are closed.
    let listed = plain_proxy(AllowList::new(["up.test"]).unwrap(), Rules::default(), true);
    let (status, _) = h1_get(
        guest_conn(&listed, http),
        &format!("other.test:{http}"),
        "/",
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = h1_get(guest_conn(&listed, http), &format!("up.test:{http}"), "/").await;
    assert_eq!(status, 200);
    let mut g = guest_conn(&listed, echo);
    g.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await.unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(g.read(&mut buf).await.unwrap(), 0, "closed, not relayed");

    // Deny by default: nothing until a host is added; deleting it closes the list again.
    let closed = plain_proxy(
        AllowList::default().deny_by_default(),
        Rules::default(),
        true,
    );
    let (status, _) = h1_get(guest_conn(&closed, http), &format!("up.test:{http}"), "/").await;
    assert_eq!(status, 403);
    let mut g = guest_conn(&closed, echo);
    g.write_all(b"SSH-2.0-x\r\n").await.unwrap();
    assert_eq!(g.read(&mut buf).await.unwrap(), 0);
    let opened = closed
        .policy()
        .update_hosts(&["up.test".into()], &[])
        .unwrap();
    assert_eq!(opened.added, ["up.test"]);
    let (status, _) = h1_get(guest_conn(&closed, http), &format!("up.test:{http}"), "/").await;
    assert_eq!(status, 200);
    closed
        .policy()
        .update_hosts(&[], &["up.test".into()])
        .unwrap();
    let (status, _) = h1_get(guest_conn(&closed, http), &format!("up.test:{http}"), "/").await;
    assert_eq!(status, 403);
}

#[tokio::test]
async fn bodies_that_end_with_the_connection_arrive_whole() {
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let body = payload.clone();
        let port = scripted(move |mut s| {
            let body = body.clone();
            async move {
                read_head(&mut s).await;
                // No Content-Length, not chunked: the body ends when the connection closes.
                let head = format!("{version} 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                for chunk in body.chunks(7000) {
                    let _ = s.write_all(chunk).await;
                }
                let _ = s.shutdown().await;
            }
        })
        .await;
        let p = plain_proxy(AllowList::default(), Rules::default(), true);
        let (status, got) = h1_get(guest_conn(&p, port), &format!("up.test:{port}"), "/big").await;
        assert_eq!(status, 200, "{version}");
        let got = got.unwrap_or_else(|e| panic!("{version}: body error {e}"));
        assert_eq!(got.len(), payload.len(), "{version}");
        assert!(got == payload, "{version}");
    }
}

#[tokio::test]
async fn sse_replacements_touch_only_data_payloads_and_stream() {
    let (second_tx, second_rx) = tokio::sync::oneshot::channel::<()>();
    let second_rx = Arc::new(tokio::sync::Mutex::new(Some(second_rx)));
    let port = scripted(move |mut s| {
        let second_rx = second_rx.clone();
        async move {
            read_head(&mut s).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n")
                .await;
            let first = ": comment with foo\r\nevent: foo\r\nid: foo-1\r\ndata: one foo two\r\ndata:foo\r\n\r\n";
            let _ = s.write_all(first.as_bytes()).await;
            // The second event only once the guest has seen the first: nothing is buffered whole.
            if let Some(rx) = second_rx.lock().await.take() {
                let _ = rx.await;
            }
            let _ = s.write_all(b"retry: 10\ndata: {\"text\":\"foo\"}\n\n").await;
        }
    })
    .await;
    let rules = Rules::new(
        serde_json::from_value(serde_json::json!([
            {"phase": "after", "body_replacements": [{"find": "foo", "replace": "BAR"}]}
        ]))
        .unwrap(),
        None,
    )
    .unwrap();
    let p = plain_proxy(AllowList::default(), rules, true);
    let guest = guest_conn(&p, port);
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(guest))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/events")
        .header("host", format!("up.test:{port}"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let want_first =
        ": comment with foo\r\nevent: foo\r\nid: foo-1\r\ndata: one BAR two\r\ndata:BAR\r\n\r\n";
    while got.len() < want_first.len() {
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
            .await
            .expect("the first event streams before the upstream sends the second")
            .unwrap()
            .unwrap();
        if let Ok(d) = frame.into_data() {
            got.extend_from_slice(&d);
        }
    }
    assert_eq!(String::from_utf8_lossy(&got), want_first);
    second_tx.send(()).unwrap();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "retry: 10\ndata: {\"text\":\"BAR\"}\n\n"
    );
}

#[tokio::test]
async fn websocket_upgrades_become_a_tunnel_and_can_be_refused() {
    let port = scripted(|mut s| async move {
        let head = read_head(&mut s).await.to_ascii_lowercase();
        if !head.contains("upgrade: websocket") || !head.contains("connection: upgrade") {
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            return;
        }
        let _ = s
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
            .await;
        // Opaque from here: echo, upper-cased.
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            let up = buf[..n].to_ascii_uppercase();
            if s.write_all(&up).await.is_err() {
                break;
            }
        }
    })
    .await;
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: up.test:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let p = plain_proxy(AllowList::default(), Rules::default(), true);
    let mut g = guest_conn(&p, port);
    g.write_all(upgrade.as_bytes()).await.unwrap();
    let head = read_head(&mut g).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in [&b"\x81\x05hello"[..], b"second frame"] {
        g.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        g.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg.to_ascii_uppercase());
    }
    // Refused when WebSockets are disabled.
    let off = plain_proxy(AllowList::default(), Rules::default(), false);
    let mut g = guest_conn(&off, port);
    g.write_all(upgrade.as_bytes()).await.unwrap();
    let head = read_head(&mut g).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

/// NET-10: taking a host off the allow-list ends what is already open to it. The next request
/// on a kept-alive connection is refused, an open WebSocket closes, and a relayed connection
/// that is not HTTP closes when the list stops being open. Adding the host back works.
#[tokio::test]
async fn revoking_a_host_ends_its_open_connections() {
    let ws = scripted(|mut s| async move {
        let head = read_head(&mut s).await.to_ascii_lowercase();
        let reply: &[u8] = if head.contains("upgrade: websocket") {
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        };
        let _ = s.write_all(reply).await;
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // A kept-alive request gets another answer; tunnel bytes are echoed.
                    let out: &[u8] = if buf[..n].starts_with(b"GET ") {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    } else {
                        &buf[..n]
                    };
                    if s.write_all(out).await.is_err() {
                        break;
                    }
                }
            }
        }
    })
    .await;
    let within = std::time::Duration::from_secs(1);
    let p = plain_proxy(AllowList::new(["up.test"]).unwrap(), Rules::default(), true);

    // Keep-alive: one connection, a request before and after the revocation.
    let get = format!("GET / HTTP/1.1\r\nHost: up.test:{ws}\r\n\r\n");
    let mut keep = guest_conn(&p, ws);
    keep.write_all(get.as_bytes()).await.unwrap();
    let head = read_head(&mut keep).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut ok = [0u8; 2];
    keep.read_exact(&mut ok).await.unwrap();

    // An open WebSocket.
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: up.test:{ws}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let mut tunnel = guest_conn(&p, ws);
    tunnel.write_all(upgrade.as_bytes()).await.unwrap();
    let head = read_head(&mut tunnel).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tunnel.write_all(b"\x81\x02hi").await.unwrap();
    let mut echo = [0u8; 4];
    tunnel.read_exact(&mut echo).await.unwrap();

    // A change that leaves the host allowed keeps the tunnel.
    p.policy().update_hosts(&["more.test".into()], &[]).unwrap();
    tunnel.write_all(b"\x81\x02hi").await.unwrap();
    tunnel.read_exact(&mut echo).await.unwrap();

    p.policy().update_hosts(&[], &["up.test".into()]).unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(within, tunnel.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the WebSocket stayed open after its host was revoked"
    );
    keep.write_all(get.as_bytes()).await.unwrap();
    let head = read_head(&mut keep).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    p.policy().update_hosts(&["up.test".into()], &[]).unwrap();
    let mut again = guest_conn(&p, ws);
    again.write_all(upgrade.as_bytes()).await.unwrap();
    let head = read_head(&mut again).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    // Relayed (not HTTP) while the list is open; naming a host closes the list and the relay.
    let open = plain_proxy(AllowList::default(), Rules::default(), true);
    let mut relay = guest_conn(&open, ws);
    relay.write_all(b"SSH-2.0-x\r\n\r\n").await.unwrap();
    let mut line = [0u8; 11];
    // The scripted server answers a first read with its 200 head; then it echoes.
    let head = read_head(&mut relay).await;
    assert!(head.contains("200"), "{head}");
    relay.read_exact(&mut ok).await.unwrap();
    relay.write_all(b"SSH-2.0-y\r\n").await.unwrap();
    relay.read_exact(&mut line).await.unwrap();
    open.policy()
        .update_hosts(&["up.test".into()], &[])
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(within, relay.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the relay stayed open after the allow-list closed"
    );
}

/// A TLS upstream for `up.test` whose connections run `script` on the decrypted stream, which
/// may end the TCP connection without TLS `close_notify`. Returns its port and CA.
async fn scripted_tls<F, Fut>(script: F) -> (u16, String)
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    scripted_tls_for("up.test", script).await
}

/// [`scripted_tls`] with a certificate for `name`.
async fn scripted_tls_for<F, Fut>(name: &str, script: F) -> (u16, String)
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (acceptor, ca_pem) = upstream_tls_for(name, &[b"http/1.1"]);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let script = Arc::new(script);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (acceptor, script) = (acceptor.clone(), script.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    script(tls).await;
                }
            });
        }
    });
    (port, ca_pem)
}

#[tokio::test]
async fn tls_bodies_that_end_without_close_notify_arrive_whole() {
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    let body = payload.clone();
    let (port, ca) = scripted_tls(move |mut tls| {
        let body = body.clone();
        async move {
            read_head(&mut tls).await;
            let _ = tls
                .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
                .await;
            let _ = tls.write_all(&body).await;
            let _ = tls.flush().await;
            // Close the TCP connection under TLS: no close_notify.
            let (tcp, _) = tls.into_inner();
            drop(tcp);
        }
    })
    .await;
    let p = proxy(&ca, "PH_unused").await;
    let (status, got) = {
        let tls = guest_tls(&p, port, b"h2").await;
        // An h2 guest (curl's default): a cut body would be a stream reset.
        let (mut s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get(format!("https://up.test:{port}/big"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec());
        (status, body)
    };
    assert_eq!(status, 200);
    let got = got.expect("the body ends cleanly");
    assert!(got == payload, "{} of {} bytes", got.len(), payload.len());
}

/// busybox's `wget` speaks TLS 1.2 without `signature_algorithms`, which rustls refuses; the
/// proxy serves such clients through OpenSSL. The real busybox binary (its built-in TLS: no
/// `openssl` on its PATH) fetches through the proxy from a TLS upstream.
#[tokio::test]
async fn busybox_wget_https_through_interception() {
    let (upstream, ca) = scripted_tls_for("localhost", |mut tls| async move {
        read_head(&mut tls).await;
        let body = "hello busybox";
        let _ = tls
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let _ = tls.shutdown().await;
    })
    .await;
    let names = Arc::new(NameTable::default());
    names.record("localhost", &["127.0.0.1".parse().unwrap()]);
    let p = Arc::new(Proxy::new(
        policy(AllowList::new(["localhost"]).unwrap(), names, true),
        Secrets::default(),
        MitmCa::generate("vm-test").unwrap(),
        upstream_tls(Some(ca.as_bytes())).unwrap(),
        None,
        Rules::default(),
    ));
    // The "guest" connects over TCP; each connection goes to the proxy as the stack hands it.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let target = Target {
        visible: SocketAddrV4::new(Ipv4Addr::LOCALHOST, upstream),
        real: SocketAddr::from(([127, 0, 0, 1], upstream)),
    };
    let proxy = p.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            tokio::spawn(proxy.clone().serve(tcp, target));
        }
    });
    let out = tokio::process::Command::new("/bin/busybox")
        .args(["wget", "-q", "-O-", &format!("https://localhost:{port}/x")])
        .env("PATH", "/nonexistent")
        .output()
        .await
        .expect("busybox (scripts/setup installs busybox-static)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello busybox",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ---------------------------------------------------------------------------------------------
// Secrets: every place a response can carry text back is scrubbed, and a request cannot carry
// a secret in clear text or to another host.

/// The raw bytes a "guest" gets back for one HTTP/1.1 request written by hand over TLS to
/// `up.test` (the connection is closed after it, so everything is read).
async fn raw_tls_exchange(p: &Arc<Proxy>, port: u16, request: &str) -> String {
    exchange(guest_tls(p, port, b"http/1.1").await, request.as_bytes()).await
}

/// Writes `request` to a guest-side stream and returns everything read back until it ends
/// (or 20 s pass).
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    request: &[u8],
) -> String {
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// An upstream that does its worst with the credential it was sent: it echoes it in the
/// reason phrase, in HTTP/1 trailers, inside a gzip body it was asked not to send, as the
/// base64 `Basic` credential the proxy built, and compressed in a coding the proxy cannot
/// decode. None of it may reach the guest; the last is refused.
#[tokio::test]
async fn responses_cannot_carry_the_secret_back() {
    let (port, ca) = scripted_tls(|mut tls| async move {
        let head = read_head(&mut tls).await;
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        let auth = head
            .lines()
            .find_map(|l| l.strip_prefix("authorization: "))
            .unwrap_or("")
            .trim()
            .to_string();
        let resp: Vec<u8> = match path.as_str() {
            "/reason" => {
                format!("HTTP/1.1 200 {auth}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    .into_bytes()
            }
            "/trailers" => format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Echo\r\n\
                 Connection: close\r\n\r\n2\r\nok\r\n0\r\nX-Echo: {auth}\r\n\r\n"
            )
            .into_bytes(),
            "/gzip" => {
                let body = gzip(format!("echo={auth}").as_bytes());
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend(body);
                r
            }
            "/basic" => format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{auth}",
                auth.len()
            )
            .into_bytes(),
            _ => b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 4\r\n\
                   Connection: close\r\n\r\n\x0b\x02\x80x"
                .to_vec(),
        };
        let _ = tls.write_all(&resp).await;
        let _ = tls.shutdown().await;
    })
    .await;
    let p = proxy(&ca, "PH_K_0123").await;
    let req = |path: &str, auth: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: up.test:{port}\r\nAuthorization: {auth}\r\n\
             TE: trailers\r\nConnection: close\r\n\r\n"
        )
    };
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let real_basic = b64.encode("user:real-value-1");
    let guest_basic = b64.encode("user:PH_K_0123");
    let cases = [
        (
            "/reason",
            "Bearer PH_K_0123",
            "HTTP/1.1 200 Bearer PH_K_0123",
        ),
        ("/gzip", "Bearer PH_K_0123", "echo=Bearer PH_K_0123"),
        (
            "/basic",
            &format!("Basic {guest_basic}"),
            &format!("Basic {guest_basic}"),
        ),
    ];
    for (path, auth, want) in cases {
        let raw = raw_tls_exchange(&p, port, &req(path, auth)).await;
        assert!(!raw.contains("real-value-1"), "{path}: {raw}");
        assert!(!raw.contains(&real_basic), "{path}: {raw}");
        assert!(
            raw.to_ascii_lowercase()
                .contains(&want.to_ascii_lowercase()),
            "{path}: want {want:?} in {raw}"
        );
    }
    // Trailers reach an HTTP/2 guest (hyper sends none to an HTTP/1.1 one): scrubbed too.
    let tls = guest_tls(&p, port, b"h2").await;
    let (mut s, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let r = Request::get(format!("https://up.test:{port}/trailers"))
        .header("authorization", "Bearer PH_K_0123")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let body = s
        .send_request(r)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let trailers = body.trailers().cloned().expect("the trailers arrive");
    assert_eq!(trailers["x-echo"], "Bearer PH_K_0123");
    assert_eq!(body.to_bytes(), "ok");

    let raw = raw_tls_exchange(&p, port, &req("/br", "Bearer PH_K_0123")).await;
    assert!(raw.starts_with("HTTP/1.1 502"), "{raw}");
    assert!(raw.contains("Content-Encoding br"), "{raw}");
}

/// A proxy over plain HTTP with one secret `K` (placeholder `PH_K_0123`) for `up.test`;
/// `other.test` is allowed too.
fn secret_proxy(allow_http: bool) -> Arc<Proxy> {
    Arc::new(secret_proxy_unshared(allow_http))
}

/// [`secret_proxy`], before it is shared (to add to it).
fn secret_proxy_unshared(allow_http: bool) -> Proxy {
    let names = Arc::new(NameTable::default());
    for n in ["up.test", "other.test"] {
        names.record(n, &["127.0.0.1".parse().unwrap()]);
    }
    let secret = Secret::new(
        "K",
        "real-value-1",
        AllowList::new(["up.test"]).unwrap(),
        Some("PH_K_0123"),
    )
    .allow_http(allow_http);
    Proxy::new(
        policy(
            AllowList::new(["up.test", "other.test"]).unwrap(),
            names,
            true,
        ),
        Secrets::new(vec![secret]),
        MitmCa::generate("vm-test").unwrap(),
        upstream_tls(None).unwrap(),
        None,
        Rules::default(),
    )
}

/// A loopback upstream that keeps every byte it was sent and answers 200.
async fn recording() -> (u16, Arc<std::sync::Mutex<Vec<u8>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = seen.clone();
    let port = scripted(move |mut s| {
        let keep = keep.clone();
        async move {
            let mut buf = [0u8; 8192];
            loop {
                match tokio::time::timeout(std::time::Duration::from_millis(500), s.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) if n > 0 => keep.lock().unwrap().extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        }
    })
    .await;
    (port, seen)
}

/// Raw bytes back for one hand-written plain HTTP request.
async fn raw_exchange(p: &Arc<Proxy>, port: u16, request: &[u8]) -> String {
    exchange(guest_conn(p, port), request).await
}

#[tokio::test]
async fn requests_cannot_carry_the_secret_in_clear_text_or_elsewhere() {
    let (port, seen) = recording().await;
    let p = secret_proxy(false);
    let got = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();

    // Plain HTTP to the secret's own host: refused before anything is sent.
    let r = raw_exchange(
        &p,
        port,
        format!("GET / HTTP/1.1\r\nHost: up.test:{port}\r\nAuthorization: Bearer PH_K_0123\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    assert!(r.contains("over plain HTTP"), "{r}");
    assert!(got().is_empty(), "{}", got());

    // To another host: in the path, in a small body, in a chunked body split mid-placeholder.
    let other = |rest: &str| format!("Host: other.test:{port}\r\nConnection: close\r\n{rest}");
    let attacks = [
        format!("GET /v1/PH_K_0123 HTTP/1.1\r\n{}\r\n", other("")),
        format!(
            "POST /x HTTP/1.1\r\n{}\r\n{{\"k\":\"PH_K_0123\"}}",
            other("Content-Length: 17\r\n")
        ),
        format!(
            "POST /x HTTP/1.1\r\n{}\r\n6\r\nsafe-P\r\n8\r\nH_K_0123\r\n0\r\n\r\n",
            other("Transfer-Encoding: chunked\r\n")
        ),
        format!(
            "POST /x HTTP/1.1\r\n{}\r\n{{\"k\":\"real-value-1\"}}",
            other("Content-Length: 20\r\n")
        ),
    ];
    for a in attacks {
        let r = raw_exchange(&p, port, a.as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 403"), "{a}\n=> {r}");
        assert!(r.contains("secret K may not be sent to other.test"), "{r}");
        let sent = got();
        assert!(
            !sent.contains("PH_K_0123") && !sent.contains("real-value-1"),
            "{a}\n=> upstream got {sent}"
        );
    }
    // A body without either passes whole.
    seen.lock().unwrap().clear();
    let r = raw_exchange(
        &p,
        port,
        format!(
            "POST /x HTTP/1.1\r\n{}\r\nhello PH_K_01",
            other("Content-Length: 13\r\n")
        )
        .as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(got().ends_with("hello PH_K_01"), "{}", got());

    // A secret that allows clear text is injected over plain HTTP.
    seen.lock().unwrap().clear();
    let p = secret_proxy(true);
    let r = raw_exchange(
        &p,
        port,
        format!("GET / HTTP/1.1\r\nHost: up.test:{port}\r\nAuthorization: Bearer PH_K_0123\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(got().contains("Bearer real-value-1"), "{}", got());
}

/// An upstream that was sent a secret in the upgrade request echoes it in WebSocket messages
/// (a text frame and a close reason): the guest gets the placeholder, and no compression
/// extension was offered upstream that could hide the value.
#[tokio::test]
async fn websocket_messages_are_scrubbed_too() {
    let port = scripted(|mut s| async move {
        let head = read_head(&mut s).await;
        let lower = head.to_ascii_lowercase();
        let auth = head
            .lines()
            .find_map(|l| l.strip_prefix("authorization: "))
            .unwrap_or("")
            .trim()
            .to_string();
        let ext = if lower.contains("sec-websocket-extensions") {
            "EXTENSIONS-OFFERED"
        } else {
            "none"
        };
        let _ = s
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
            .await;
        let text = format!("got {auth} ext={ext}");
        let mut frame = vec![0x81, text.len() as u8];
        frame.extend_from_slice(text.as_bytes());
        let mut reason = vec![0x03, 0xe8];
        reason.extend_from_slice(auth.as_bytes());
        frame.extend_from_slice(&[0x88, reason.len() as u8]);
        frame.extend_from_slice(&reason);
        let _ = s.write_all(&frame).await;
        let _ = s.shutdown().await;
    })
    .await;
    let p = secret_proxy(true);
    let mut g = guest_conn(&p, port);
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: up.test:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Authorization: Bearer PH_K_0123\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    g.write_all(upgrade.as_bytes()).await.unwrap();
    let head = read_head(&mut g).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut rest = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(10), g.read_to_end(&mut rest)).await;
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains("real-value-1"), "{text}");
    assert!(text.contains("got Bearer PH_K_0123 ext=none"), "{text}");
    assert!(
        rest.windows(18).any(|w| w == b"\x03\xe8Bearer PH_K_0123"),
        "{text}"
    );
}

/// What the fake cloud and the fake local backend received.
type Seen = Arc<std::sync::Mutex<Vec<String>>>;

/// Reads one HTTP/1.1 request (head and Content-Length body) from `s`.
async fn read_request<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let head = read_head(s).await;
    if head.is_empty() {
        return None;
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some(format!("{head}{}", String::from_utf8_lossy(&body)))
}

/// issue 14: a model call the router matches goes to the local backend with its model renamed,
/// without the source host's credentials, and streams back as it is produced; other calls go to
/// the cloud with the secret. Every call lands in the usage log (tokens, cost and where the cost
/// came from), and once the spend reaches the budget every request gets 429.
#[tokio::test]
async fn model_calls_are_routed_logged_and_budgeted() {
    use matchlock_api::plugins::{BudgetConfig, PluginsConfig, RouterConfig, UsageConfig};
    let cloud_seen: Seen = Arc::default();
    let seen = cloud_seen.clone();
    let (cloud, ca_pem) = scripted_tls_for("up.test", move |mut s| {
        let seen = seen.clone();
        async move {
            while let Some(req) = read_request(&mut s).await {
                seen.lock().unwrap().push(req.clone());
                let (ctype, body) = if req.starts_with("POST /v1/messages") {
                    ("text/event-stream", "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-3-5-haiku-20241022\",\"usage\":{\"input_tokens\":1000,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":2000}}\n\n".to_string())
                } else {
                    ("application/json", r#"{"model":"cloud-model","choices":[{"message":{"content":"from the cloud"}}],"usage":{"prompt_tokens":10,"completion_tokens":20,"cost":0.6}}"#.to_string())
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(resp.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
    })
    .await;
    // The local backend, on an address the guest's policy does not open (127.0.0.2). It sends
    // its first event, then waits until the guest has read it before finishing: a proxy that
    // buffered the stream would never deliver it.
    let backend_seen: Seen = Arc::default();
    let (go_on, wait) = tokio::sync::mpsc::channel::<()>(1);
    let wait = Arc::new(tokio::sync::Mutex::new(wait));
    let l = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let backend = l.local_addr().unwrap();
    let seen = backend_seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (seen, wait) = (seen.clone(), wait.clone());
            tokio::spawn(async move {
                let Some(req) = read_request(&mut s).await else {
                    return;
                };
                seen.lock().unwrap().push(req);
                let first = "data: {\"model\":\"llama3.1:8b\",\"choices\":[{\"delta\":{\"content\":\"local \"}}]}\n\n";
                let rest = "data: {\"model\":\"llama3.1:8b\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
                let chunk = |t: &str| format!("{:x}\r\n{t}\r\n", t.len());
                let _ = s
                    .write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n{}", chunk(first)).as_bytes())
                    .await;
                let _ = wait.lock().await.recv().await;
                let _ = s
                    .write_all(format!("{}0\r\n\r\n", chunk(rest)).as_bytes())
                    .await;
            });
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("usage.jsonl");
    let config = PluginsConfig {
        local_model_router: Some(RouterConfig {
            backend: Some(backend.to_string()),
            routes: vec!["up.test/google/gemini-2.0-flash-001=llama3.1:8b".into()],
        }),
        usage_logger: Some(UsageConfig {
            path: log_path.clone(),
            price_file: None,
        }),
        budget_gate: Some(BudgetConfig { limit_usd: 1.0 }),
    };
    let plugins = matchlock_policy::plugins::Plugins::from_config(&config).unwrap();
    let names = Arc::new(NameTable::default());
    names.record("up.test", &["127.0.0.1".parse().unwrap()]);
    let placeholder = "PH_K_0123";
    let secret = Secret::new(
        "K",
        "real-value-1",
        AllowList::new(["up.test"]).unwrap(),
        Some(placeholder),
    );
    let address = AddressPolicy {
        allow: vec!["127.0.0.1".parse().unwrap()],
        ..Default::default()
    };
    let policy = Policy::intercepting(address, AllowList::new(["up.test"]).unwrap(), names)
        .with_backends(vec![(backend.to_string(), backend)]);
    let p = Arc::new(
        Proxy::new(
            Arc::new(policy),
            Secrets::new(vec![secret]),
            MitmCa::generate("vm-test").unwrap(),
            upstream_tls(Some(ca_pem.as_bytes())).unwrap(),
            None,
            Rules::default(),
        )
        .with_plugins(plugins),
    );
    let post = |path: &str, model: &str, stream: bool| {
        let body = format!(
            r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        Request::post(path.to_string())
            .header("host", format!("up.test:{cloud}"))
            .header("authorization", format!("Bearer {placeholder}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let send = |req: Request<Full<Bytes>>| {
        let p = p.clone();
        async move {
            let tls = guest_tls(&p, cloud, b"http/1.1").await;
            let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            s.send_request(req).await.unwrap()
        }
    };
    let within = std::time::Duration::from_secs(10);

    // 1. Routed, streamed: the first event arrives before the backend sends the rest.
    let resp = send(post(
        "/api/v1/chat/completions",
        "google/gemini-2.0-flash-001",
        true,
    ))
    .await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(within, body.frame())
        .await
        .expect("the stream was held back")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(first.data_ref().unwrap()).contains("local "));
    go_on.send(()).await.unwrap();
    let rest = tokio::time::timeout(within, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    let got = backend_seen.lock().unwrap().join("\n");
    assert!(
        got.starts_with("POST /v1/chat/completions HTTP/1.1"),
        "{got}"
    );
    assert!(
        got.contains(r#""model":"llama3.1:8b""#) && got.contains(r#""stream":true"#),
        "{got}"
    );
    let lower = got.to_ascii_lowercase();
    assert!(
        !lower.contains("authorization")
            && !got.contains(placeholder)
            && !got.contains("real-value-1"),
        "{got}"
    );
    assert!(
        cloud_seen.lock().unwrap().is_empty(),
        "the routed call also reached the cloud"
    );

    // 2. Not routed (another model): to the cloud, with the secret; its reported cost counts.
    let resp = send(post("/api/v1/chat/completions", "cloud-model", false)).await;
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
    assert!(cloud_seen.lock().unwrap()[0].contains("Bearer real-value-1"));

    // 3. Anthropic messages, streamed, priced from the table: 1000 in and 2000 out of
    // claude-3-5-haiku at $0.80 and $4 per million.
    let resp = send(post("/v1/messages", "claude-3-5-haiku-20241022", true)).await;
    let _ = resp.into_body().collect().await.unwrap();

    // The log is written when each answer ends; read it until the three lines are there.
    let mut lines: Vec<serde_json::Value> = Vec::new();
    for _ in 0..50 {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        lines = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[0]["model"], "llama3.1:8b");
    assert_eq!(
        (
            lines[0]["input_tokens"].as_u64(),
            lines[0]["output_tokens"].as_u64()
        ),
        (Some(7), Some(9))
    );
    assert_eq!(
        (
            lines[0]["cost_usd"].as_f64(),
            lines[0]["cost_source"].as_str()
        ),
        (Some(0.0), Some("local_backend"))
    );
    assert_eq!(lines[0]["routed_to"], backend.to_string());
    assert_eq!(
        (
            lines[1]["cost_usd"].as_f64(),
            lines[1]["cost_source"].as_str()
        ),
        (Some(0.6), Some("provider"))
    );
    assert_eq!(lines[2]["cost_source"], "price_table");
    let cost = lines[2]["cost_usd"].as_f64().unwrap();
    assert!(
        (cost - (1000.0 * 0.8 + 2000.0 * 4.0) / 1e6).abs() < 1e-9,
        "{cost}"
    );
    assert!(lines.iter().all(|l| l["latency_ms"].is_u64()));

    // 4. Under the limit still ($0.6088 of $1): a second cloud call goes; then the gate closes.
    let resp = send(post("/api/v1/chat/completions", "cloud-model", false)).await;
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await.unwrap();
    let calls = cloud_seen.lock().unwrap().len();
    let mut status = 200;
    for _ in 0..50 {
        let resp = send(post("/api/v1/chat/completions", "cloud-model", false)).await;
        status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if status == 429 {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"]["code"], "budget_exceeded");
            break;
        }
        // The previous call's line may not be written yet: that call went through.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 429);
    assert!(
        cloud_seen.lock().unwrap().len() <= calls + 1,
        "requests reached the cloud past the budget"
    );
}

/// An answer with a Content-Length is written whole without its end ever being polled (and
/// with no secrets its length is kept): its usage is still logged.
#[tokio::test]
async fn usage_is_logged_for_answers_with_a_length() {
    use matchlock_api::plugins::{PluginsConfig, UsageConfig};
    let port = scripted(|mut s| async move {
        let _ = read_request(&mut s).await;
        let body = r#"{"model":"gpt-4o-mini","usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let _ = s
            .write_all(format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
            .await;
        let _ = read_head(&mut s).await;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("usage.jsonl");
    let config = PluginsConfig {
        usage_logger: Some(UsageConfig {
            path: log.clone(),
            price_file: None,
        }),
        ..Default::default()
    };
    let plugins = matchlock_policy::plugins::Plugins::from_config(&config).unwrap();
    let p = plain_proxy(AllowList::new(["up.test"]).unwrap(), Rules::default(), true);
    let p = Arc::new(Arc::try_unwrap(p).unwrap().with_plugins(plugins));
    let mut g = guest_conn(&p, port);
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    g.write_all(format!("POST /v1/chat/completions HTTP/1.1\r\nHost: up.test:{port}\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut g).await;
    assert!(
        head.starts_with("HTTP/1.1 200") && head.to_ascii_lowercase().contains("content-length"),
        "{head}"
    );
    let mut text = String::new();
    for _ in 0..50 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if !text.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(
        (
            line["input_tokens"].as_u64(),
            line["output_tokens"].as_u64()
        ),
        (Some(3), Some(4))
    );
    assert_eq!(line["cost_source"], "price_table");
}

#[tokio::test]
async fn redirects_are_followed_on_the_host_within_the_rules() {
    let (b, seen_b) = recording().await;
    // Upstream A redirects by path.
    let a = scripted(move |mut s| async move {
        let head = read_head(&mut s).await;
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        let loc = match path.as_str() {
            "/to-other" => format!("http://other.test:{b}/final?x=1"),
            "/to-blocked" => format!("http://blocked.test:{b}/x"),
            "/to-javascript" => "javascript:alert(1)".to_string(),
            _ => "/loop".to_string(),
        };
        let _ = s
            .write_all(
                format!("HTTP/1.1 302 Found\r\nLocation: {loc}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
    })
    .await;
    let every_name_on_loopback: matchlock_net::proxy::redirect::Resolver =
        Arc::new(|_host| Box::pin(async { Ok("127.0.0.1".parse().unwrap()) }));
    let p = Arc::new(secret_proxy_unshared(true).with_redirects(every_name_on_loopback));
    let get = |path: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: up.test:{a}\r\n{extra}Connection: close\r\n\r\n")
    };
    // Followed: the guest gets the last hop's answer; B saw a request for itself.
    let r = raw_exchange(&p, a, get("/to-other", "").as_bytes()).await;
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(r.starts_with("HTTP/1.1 200") && body.contains("ok"), "{r}");
    let seen = String::from_utf8_lossy(&seen_b.lock().unwrap()).into_owned();
    assert!(seen.starts_with("GET /final?x=1 HTTP/1.1"), "{seen}");
    assert!(
        seen.to_ascii_lowercase()
            .contains(&format!("host: other.test:{b}")),
        "{seen}"
    );
    seen_b.lock().unwrap().clear();

    // A host off the allow-list, another scheme, and a loop: the guest gets the redirect itself.
    for path in ["/to-blocked", "/to-javascript", "/loop"] {
        let r = raw_exchange(&p, a, get(path, "").as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 302"), "{path}: {r}");
    }
    assert!(seen_b.lock().unwrap().is_empty());

    // A secret for up.test does not follow the redirect to other.test: not followed, and B
    // never sees the value (nor the placeholder).
    let r = raw_exchange(
        &p,
        a,
        get("/to-other", "Authorization: Bearer PH_K_0123\r\n").as_bytes(),
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 302"), "{r}");
    assert!(seen_b.lock().unwrap().is_empty());

    // A POST is not followed, nor is anything without --follow-redirects.
    let post = format!("POST /to-other HTTP/1.1\r\nHost: up.test:{a}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    let r = raw_exchange(&p, a, post.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 302"), "{r}");
    let plain = secret_proxy(true);
    let r = raw_exchange(&plain, a, get("/to-other", "").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 302"), "{r}");
    assert!(seen_b.lock().unwrap().is_empty());
}
