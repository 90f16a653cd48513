//! The gateway in process: a "guest" whose ports are host loopback ports and whose routes file
//! is a temporary file, real HTTP servers behind it, and real HTTP/1.1, h2 and WebSocket clients
//! in front. The end-to-end test with a real sandbox is in the CLI's `tests/ingress.rs`.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use matchlock_ingress::{Gateway, Guest, HookSocket, IngressRoute, Options};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener};

/// Ports are host loopback ports; the routes file is `dir/routes`.
struct Loopback {
    dir: tempfile::TempDir,
}

impl Loopback {
    fn new() -> Arc<Loopback> {
        Arc::new(Loopback {
            dir: tempfile::tempdir().unwrap(),
        })
    }
    fn file(&self) -> PathBuf {
        self.dir.path().join("routes")
    }
}

impl Guest for Loopback {
    type Stream = TcpStream;

    async fn connect(&self, port: u16) -> Result<TcpStream, String> {
        TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))
    }

    async fn read_file(&self, _path: &str, cap: u64) -> Result<Option<Vec<u8>>, String> {
        match std::fs::read(self.file()) {
            Ok(b) if b.len() as u64 > cap => Err("too big".into()),
            Ok(b) => Ok(Some(b)),
            Err(_) => Ok(None),
        }
    }

    async fn write_file(&self, _path: &str, data: &[u8]) -> Result<(), String> {
        std::fs::write(self.file(), data).map_err(|e| e.to_string())
    }
}

/// An HTTP server answering `name path` and the request headers it saw, one per line.
async fn echo_server(name: &'static str) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    let mut out = format!("{name} {}\n", req.uri());
                    for (k, v) in req.headers() {
                        out.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
                    }
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    out.push_str(&format!("body: {}\n", String::from_utf8_lossy(&body)));
                    let mut r = hyper::Response::new(Full::new(Bytes::from(out)));
                    r.headers_mut().insert("x-backend", name.parse().unwrap());
                    Ok::<_, Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    port
}

fn route(prefix: &str, port: u16, strip: bool) -> IngressRoute {
    IngressRoute {
        prefix: prefix.into(),
        port,
        strip_prefix: strip,
    }
}

async fn gateway(guest: Arc<Loopback>, opts: Options) -> Gateway<Loopback> {
    Gateway::start(guest, opts).await.unwrap()
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: String,
}

async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Answer {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = s.send_request(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    send(
        addr,
        Request::get(path)
            .header("host", "app.test")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
}

#[tokio::test]
async fn routes_by_longest_prefix_over_http1_and_h2() {
    let (a, b) = (echo_server("a").await, echo_server("b").await);
    let guest = Loopback::new();
    let gw = gateway(guest.clone(), Options::default()).await;
    gw.set_routes(vec![route("/", a, false), route("/api", b, true)])
        .await
        .unwrap();
    assert!(std::fs::read_to_string(guest.file())
        .unwrap()
        .contains("/api :"));

    let r = get(gw.local_addr(), "/index.html?x=1").await;
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("a /index.html?x=1\n"), "{}", r.body);
    assert!(r.body.contains("host: app.test\n"), "{}", r.body);
    assert!(
        r.body.contains("x-forwarded-for: 127.0.0.1\n"),
        "{}",
        r.body
    );
    assert!(r.body.contains("x-forwarded-proto: http\n"), "{}", r.body);

    let r = get(gw.local_addr(), "/api/users?id=7").await;
    assert!(r.body.starts_with("b /users?id=7\n"), "{}", r.body);
    assert!(r.body.contains("x-forwarded-prefix: /api\n"), "{}", r.body);
    assert_eq!(r.headers["x-backend"], "b");
    assert!(get(gw.local_addr(), "/apix")
        .await
        .body
        .starts_with("a /apix"));

    // A POST body is passed on.
    let r = send(
        gw.local_addr(),
        Request::post("/api/echo")
            .body(Full::new(Bytes::from("hello")))
            .unwrap(),
    )
    .await;
    assert!(r.body.contains("body: hello\n"), "{}", r.body);

    // h2 with prior knowledge, as `curl --http2-prior-knowledge` speaks it.
    let tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    let (mut s, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let uri = "http://app.test/api/h2";
    let r = s
        .send_request(Request::get(uri).body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.starts_with("b /h2\n"), "{body}");
    assert!(body.contains("host: app.test\n"), "{body}");

    // Only one route left: other paths are 404 with the routes named.
    gw.set_routes(vec![route("/api", b, false)]).await.unwrap();
    let r = get(gw.local_addr(), "/other").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("/api -> :"), "{}", r.body);
}

#[tokio::test]
async fn the_guest_can_write_its_own_routes() {
    let a = echo_server("a").await;
    let guest = Loopback::new();
    let gw = gateway(guest.clone(), Options::default()).await;
    assert_eq!(get(gw.local_addr(), "/").await.status, 404);
    // The guest writes the file; the gateway rereads it within a second.
    std::fs::write(
        guest.file(),
        format!("# mine\n/app :{a} strip\n/broken :nope\n"),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(gw.local_addr(), "/app/x").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.starts_with("a /x\n"), "{}", r.body);
    let (routes, problems) = gw.routes().await.unwrap();
    assert_eq!(routes, vec![route("/app", a, true)]);
    assert_eq!(problems.len(), 1);
    assert!(problems[0].starts_with("line 3:"), "{problems:?}");
}

#[tokio::test]
async fn closed_ports_and_silent_servers_answer_with_the_reason() {
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // A server that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            held.push(silent.accept().await.unwrap());
        }
    });
    // A server that closes at once.
    let rude = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rude_port = rude.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            drop(rude.accept().await.unwrap());
        }
    });
    let guest = Loopback::new();
    let gw = gateway(
        guest,
        Options {
            header_timeout: Duration::from_millis(300),
            ..Options::default()
        },
    )
    .await;
    gw.set_routes(vec![
        route("/closed", closed, false),
        route("/silent", silent_port, false),
        route("/rude", rude_port, false),
    ])
    .await
    .unwrap();
    let r = get(gw.local_addr(), "/closed").await;
    assert_eq!(r.status, 502);
    assert!(
        r.body.contains(&format!("port {closed}")) && r.body.contains("refused"),
        "{}",
        r.body
    );
    let r = get(gw.local_addr(), "/silent").await;
    assert_eq!(r.status, 504);
    assert!(r.body.contains("within 300 ms"), "{}", r.body);
    let r = get(gw.local_addr(), "/rude").await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("without an answer"), "{}", r.body);
}

#[tokio::test]
async fn responses_stream_without_being_buffered() {
    // The server sends a first chunk and holds the rest until the client has seen it: a gateway
    // that buffered would never deliver the first chunk.
    let (seen_tx, seen_rx) = tokio::sync::oneshot::channel::<()>();
    let seen_rx = Arc::new(tokio::sync::Mutex::new(Some(seen_rx)));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
            let seen_rx = seen_rx.clone();
            async move {
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
                tokio::spawn(async move {
                    tx.send(Ok(Frame::data(Bytes::from("first\n"))))
                        .await
                        .unwrap();
                    let rx = seen_rx.lock().await.take().unwrap();
                    rx.await.unwrap();
                    tx.send(Ok(Frame::data(Bytes::from("second\n"))))
                        .await
                        .unwrap();
                });
                let body = StreamBody::new(tokio_stream(rx));
                Ok::<_, Infallible>(hyper::Response::new(body))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(tcp), svc)
            .await;
    });
    let guest = Loopback::new();
    let gw = gateway(guest, Options::default()).await;
    gw.set_routes(vec![route("/", port, false)]).await.unwrap();
    let mut tcp = TcpStream::connect(gw.local_addr()).await.unwrap();
    tcp.write_all(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut r = tokio::io::BufReader::new(tcp);
    let mut got = String::new();
    while !got.contains("first") {
        let mut line = String::new();
        let n = tokio::time::timeout(Duration::from_secs(10), r.read_line(&mut line))
            .await
            .expect("the first chunk never came: the gateway buffers")
            .unwrap();
        assert!(n > 0);
        got.push_str(&line);
    }
    seen_tx.send(()).unwrap();
    let mut rest = String::new();
    while !rest.contains("second") {
        let mut line = String::new();
        assert!(r.read_line(&mut line).await.unwrap() > 0);
        rest.push_str(&line);
    }
}

/// A `Stream` over an mpsc receiver .
fn tokio_stream<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// A WebSocket-ish server: answers the upgrade with 101 and echoes bytes, upper-cased.
async fn upgrade_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut r = tokio::io::BufReader::new(tcp);
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).await.unwrap();
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    head.push_str(&line.to_ascii_lowercase());
                }
                assert!(head.contains("upgrade: websocket"), "{head}");
                let mut tcp = r.into_inner();
                tcp.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
                )
                .await
                .unwrap();
                let mut buf = [0u8; 1024];
                loop {
                    let n = tcp.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    let up = buf[..n].to_ascii_uppercase();
                    if tcp.write_all(&up).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

async fn upgrade(addr: SocketAddr) -> (String, TcpStream) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(tcp.read(&mut b).await.unwrap(), 1);
        head.push(b[0]);
    }
    (String::from_utf8(head).unwrap(), tcp)
}

#[tokio::test]
async fn websockets_pass_through_unless_turned_off() {
    let port = upgrade_server().await;
    let guest = Loopback::new();
    let gw = gateway(guest.clone(), Options::default()).await;
    gw.set_routes(vec![route("/", port, false)]).await.unwrap();
    let (head, mut tcp) = upgrade(gw.local_addr()).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tcp.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"PING");

    let off = gateway(
        guest,
        Options {
            allow_websockets: false,
            ..Options::default()
        },
    )
    .await;
    let (head, _) = upgrade(off.local_addr()).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

/// The SDK's side of the hooks: answers each call with `answer(call)`, and counts calls.
fn hook_server(
    dir: &std::path::Path,
    answer: fn(&serde_json::Value) -> serde_json::Value,
) -> PathBuf {
    let path = dir.join("hooks.sock");
    let l = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (rd, mut wr) = s.into_split();
                let mut line = String::new();
                tokio::io::BufReader::new(rd)
                    .read_line(&mut line)
                    .await
                    .unwrap();
                let call: serde_json::Value = serde_json::from_str(&line).unwrap();
                let mut out = answer(&call).to_string();
                out.push('\n');
                wr.write_all(out.as_bytes()).await.unwrap();
            });
        }
    });
    path
}

fn hooks(path: PathBuf) -> Option<HookSocket> {
    Some(HookSocket {
        path,
        allow: true,
        request: true,
        response: true,
        timeout_ms: 2000,
    })
}

#[tokio::test]
async fn hooks_refuse_and_rewrite_requests_and_responses() {
    use base64::{engine::general_purpose::STANDARD as B64, Engine};
    let a = echo_server("a").await;
    let dir = tempfile::tempdir().unwrap();
    let socket = hook_server(dir.path(), |c| {
        let path = c["path"].as_str().unwrap();
        match c["phase"].as_str().unwrap() {
            "allow" if path.starts_with("/admin") => serde_json::json!({
                "allow": false, "status": 451,
                "headers": {"x-why": ["admin"]},
                "body_base64": B64.encode(format!("no admin for {}\n", c["client_ip"].as_str().unwrap())),
            }),
            "allow" => serde_json::json!({}),
            "request" => serde_json::json!({
                "backend_target": c["backend_target"].as_str().unwrap().replace("/old/", "/new/"),
                "headers": {"x-added": ["1"], "x-remove": null},
                "buffer_response_body": path.ends_with(".json"),
                "max_buffered_response_bytes": if path.contains("tiny") { 10 } else { 1 << 20 },
            }),
            "response" => {
                let mut a = serde_json::json!({"headers": {"x-ingress": ["1"], "x-backend": null}});
                if let Some(b) = c["body_base64"].as_str() {
                    let body = String::from_utf8(B64.decode(b).unwrap()).unwrap();
                    a["body_base64"] = B64.encode(body.to_uppercase()).into();
                    a["status"] = 201.into();
                }
                a
            }
            p => panic!("phase {p}"),
        }
    });
    let guest = Loopback::new();
    let gw = gateway(
        guest,
        Options {
            hooks: hooks(socket),
            ..Options::default()
        },
    )
    .await;
    gw.set_routes(vec![route("/", a, false)]).await.unwrap();

    let r = get(gw.local_addr(), "/admin/panel").await;
    assert_eq!(r.status, 451);
    assert_eq!(r.headers["x-why"], "admin");
    assert_eq!(r.body, "no admin for 127.0.0.1\n");

    let r = send(
        gw.local_addr(),
        Request::get("/old/page")
            .header("x-remove", "secret")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.body.starts_with("a /new/page\n"), "{}", r.body);
    assert!(r.body.contains("x-added: 1\n"), "{}", r.body);
    assert!(!r.body.contains("x-remove"), "{}", r.body);
    assert_eq!(r.headers["x-ingress"], "1");
    assert!(!r.headers.contains_key("x-backend"));

    // Buffered: the hook saw the body and replaced it.
    let r = get(gw.local_addr(), "/data.json").await;
    assert_eq!(r.status, 201);
    assert!(r.body.starts_with("A /DATA.JSON\n"), "{}", r.body);
    // Over the buffer cap: 502 with the reason, never a cut body.
    let r = get(gw.local_addr(), "/tiny.json").await;
    assert_eq!(r.status, 502);
    assert!(r.body.contains("10-byte buffer"), "{}", r.body);
}

#[tokio::test]
async fn a_failing_hook_refuses() {
    let a = echo_server("a").await;
    let dir = tempfile::tempdir().unwrap();
    let guest = Loopback::new();
    // Nobody listens on the socket.
    let gw = gateway(
        guest.clone(),
        Options {
            hooks: hooks(dir.path().join("gone.sock")),
            ..Options::default()
        },
    )
    .await;
    gw.set_routes(vec![route("/", a, false)]).await.unwrap();
    let r = get(gw.local_addr(), "/").await;
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("allow hook: cannot reach the SDK"),
        "{}",
        r.body
    );
    // A hook answering nonsense.
    let socket = hook_server(
        dir.path(),
        |_| serde_json::json!({"backend_target": "no-slash"}),
    );
    let gw = gateway(
        guest,
        Options {
            hooks: hooks(socket),
            ..Options::default()
        },
    )
    .await;
    let r = get(gw.local_addr(), "/").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("must start with '/'"), "{}", r.body);
}
