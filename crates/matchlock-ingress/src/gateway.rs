//! The gateway itself: the listener, the route table and the request path.

use crate::http::{
    apply_patch, full, hook_headers, is_websocket, strip_hop_by_hop, text, Body, BoxError,
};
use crate::Guest;
use base64::{engine::general_purpose::STANDARD as B64, Engine};
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use matchlock_api::ingress::{
    best_route, format_routes_file, parse_routes_file, validate_routes, IngressHookAnswer,
    IngressHookCall, IngressParams, IngressRoute, MAX_ROUTES_FILE, ROUTES_FILE,
};
use matchlock_sandbox::forward::accept_limited;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, Semaphore};

/// Client connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;

/// How long a route table read from the guest is used before it is read again.
const RELOAD_AFTER: Duration = Duration::from_secs(1);

/// How the gateway behaves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Pass WebSocket upgrades through.
    pub allow_websockets: bool,
    /// Buffer every response for the `response` hook.
    pub buffer_response_body: bool,
    /// Cap on a buffered response body.
    pub max_buffered_response_bytes: u64,
    /// Time the guest server has to send its response headers.
    pub header_timeout: Duration,
    /// The SDK's hooks, if any.
    pub hooks: Option<HookSocket>,
}

impl Options {
    /// The options an `enable_ingress` call asks for (checked).
    pub fn from_params(p: &IngressParams) -> Result<Options, String> {
        p.validate()?;
        let listen = p
            .listen
            .parse()
            .map_err(|_| format!("bad listen address '{}'", p.listen))?;
        let has = |phase: &str| p.hooks.iter().any(|h| h == phase);
        Ok(Options {
            listen,
            allow_websockets: p.allow_websockets,
            buffer_response_body: p.buffer_response_body,
            max_buffered_response_bytes: p.max_buffered_response_bytes,
            header_timeout: Duration::from_millis(p.header_timeout_ms),
            hooks: (!p.hooks.is_empty()).then(|| HookSocket {
                path: PathBuf::from(&p.callback_socket),
                allow: has("allow"),
                request: has("request"),
                response: has("response"),
                timeout_ms: p.hook_timeout_ms,
            }),
        })
    }
}

impl Default for Options {
    /// What `IngressParams::default()` asks for: loopback, a free port, WebSockets on,
    /// streaming, no hooks.
    fn default() -> Self {
        Options {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            allow_websockets: true,
            buffer_response_body: false,
            max_buffered_response_bytes: matchlock_api::ingress::DEFAULT_MAX_BUFFERED_RESPONSE,
            header_timeout: Duration::from_millis(
                matchlock_api::ingress::DEFAULT_HEADER_TIMEOUT_MS,
            ),
            hooks: None,
        }
    }
}

/// The SDK's callback socket and the hook phases it answers.
#[derive(Debug, Clone)]
pub struct HookSocket {
    /// The Unix socket.
    pub path: PathBuf,
    /// Ask before each request.
    pub allow: bool,
    /// Let it rewrite each request.
    pub request: bool,
    /// Let it rewrite each response.
    pub response: bool,
    /// Deadline of one call (ms; 0: the callbacks' default).
    pub timeout_ms: u64,
}

impl HookSocket {
    async fn call(&self, phase: &str, call: &IngressHookCall) -> Result<IngressHookAnswer, String> {
        let mut call = call.clone();
        call.phase = phase.to_string();
        let v = serde_json::to_value(&call).map_err(|e| e.to_string())?;
        let answer = matchlock_policy::callback::call(&self.path, &v, self.timeout_ms)
            .await
            .map_err(|e| format!("{phase} hook: {e}"))?;
        serde_json::from_value(answer)
            .map_err(|e| format!("{phase} hook: its answer does not fit ({e})"))
    }
}

struct Table {
    loaded: Option<Instant>,
    routes: Arc<Vec<IngressRoute>>,
    /// What the file said last, so a bad line is reported once, not per reload.
    text: Vec<u8>,
    problems: Vec<String>,
}

struct Shared<G> {
    guest: Arc<G>,
    opts: Options,
    table: Mutex<Table>,
}

/// A running gateway; dropping it closes the listener and the connections in flight.
pub struct Gateway<G: Guest> {
    addr: SocketAddr,
    shared: Arc<Shared<G>>,
    task: tokio::task::JoinHandle<()>,
}

impl<G: Guest> Drop for Gateway<G> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<G: Guest> Gateway<G> {
    /// Binds `opts.listen` and serves in the background.
    pub async fn start(guest: Arc<G>, opts: Options) -> Result<Gateway<G>, String> {
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
        let shared = Arc::new(Shared {
            guest,
            opts,
            table: Mutex::new(Table {
                loaded: None,
                routes: Arc::new(Vec::new()),
                text: Vec::new(),
                problems: Vec::new(),
            }),
        });
        let task = tokio::spawn(accept(listener, shared.clone()));
        Ok(Gateway { addr, shared, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the routes: writes the guest's routes file and uses the table at once.
    pub async fn set_routes(&self, routes: Vec<IngressRoute>) -> Result<(), String> {
        let mut t = self.shared.table.lock().await;
        let text = write_routes(&*self.shared.guest, &routes).await?;
        *t = Table {
            loaded: Some(Instant::now()),
            routes: Arc::new(routes),
            text,
            problems: Vec::new(),
        };
        Ok(())
    }

    /// The routes as the guest's file has them now, and the lines that were skipped (why).
    pub async fn routes(&self) -> Result<(Vec<IngressRoute>, Vec<String>), String> {
        let mut t = self.shared.table.lock().await;
        self.shared.reload(&mut t).await?;
        Ok((t.routes.to_vec(), t.problems.clone()))
    }

    /// Serves until the listener fails (normally forever).
    pub async fn wait(&mut self) {
        let _ = (&mut self.task).await;
    }
}

impl<G: Guest> Shared<G> {
    /// The table to route by, reread from the guest when it is older than [`RELOAD_AFTER`]. A
    /// failed read keeps the table it had (a busy guest must not drop every route).
    async fn current(&self) -> Arc<Vec<IngressRoute>> {
        let mut t = self.table.lock().await;
        if t.loaded.is_none_or(|at| at.elapsed() >= RELOAD_AFTER) {
            if let Err(e) = self.reload(&mut t).await {
                tracing::warn!("ingress: keeping the routes it had: {e}");
            }
            t.loaded = Some(Instant::now());
        }
        t.routes.clone()
    }

    async fn reload(&self, t: &mut Table) -> Result<(), String> {
        let text = read_text(&*self.guest).await?;
        t.loaded = Some(Instant::now());
        if text == t.text {
            return Ok(());
        }
        let (routes, problems) = parse_routes_file(&String::from_utf8_lossy(&text));
        for p in &problems {
            tracing::warn!("ingress: {ROUTES_FILE} {p}");
        }
        *t = Table {
            loaded: t.loaded,
            routes: Arc::new(routes),
            text,
            problems,
        };
        Ok(())
    }
}

/// Checks `routes` and writes them to the guest's routes file (what a gateway, running or
/// started later, routes by); the file's text.
pub async fn write_routes<G: Guest>(guest: &G, routes: &[IngressRoute]) -> Result<Vec<u8>, String> {
    validate_routes(routes)?;
    let text = format_routes_file(routes).into_bytes();
    guest
        .write_file(ROUTES_FILE, &text)
        .await
        .map_err(|e| format!("cannot write {ROUTES_FILE} in the sandbox: {e}"))?;
    Ok(text)
}

/// The routes in the guest's routes file, and the lines that were skipped (why).
pub async fn read_routes<G: Guest>(guest: &G) -> Result<(Vec<IngressRoute>, Vec<String>), String> {
    Ok(parse_routes_file(&String::from_utf8_lossy(
        &read_text(guest).await?,
    )))
}

/// The routes file's text; empty when it does not exist.
async fn read_text<G: Guest>(guest: &G) -> Result<Vec<u8>, String> {
    Ok(guest
        .read_file(ROUTES_FILE, MAX_ROUTES_FILE as u64)
        .await
        .map_err(|e| format!("cannot read {ROUTES_FILE}: {e}"))?
        .unwrap_or_default())
}

async fn accept<G: Guest>(listener: TcpListener, shared: Arc<Shared<G>>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    accept_limited(listener, limit, |tcp, peer| {
        serve(tcp, peer, shared.clone())
    })
    .await
}

async fn serve<G: Guest>(tcp: TcpStream, peer: SocketAddr, shared: Arc<Shared<G>>) {
    let _ = tcp.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, peer, req).await) }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(tcp), service)
        .await;
}

/// One request, start to end. Every failure is an answer that says why.
async fn handle<G: Guest>(
    sh: &Shared<G>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let routes = sh.current().await;
    let Some(route) = best_route(&routes, &path).cloned() else {
        let known: Vec<String> = routes
            .iter()
            .map(|r| format!("{} -> :{}", r.prefix, r.port))
            .collect();
        return text(
            StatusCode::NOT_FOUND,
            format_args!(
                "no ingress route matches {path} (routes: {}); set them with 'matchlock ingress ID --route PREFIX=PORT' or in {ROUTES_FILE}",
                if known.is_empty() { "none".to_string() } else { known.join(", ") }
            ),
        );
    };
    let websocket = is_websocket(req.headers());
    if websocket && !sh.opts.allow_websockets {
        return text(
            StatusCode::FORBIDDEN,
            "WebSockets are turned off on this ingress",
        );
    }

    let mut target = format!("{}{query}", route.backend_path(&path));
    let mut headers = req.headers().clone();
    let host = headers.get(HOST).cloned().or_else(|| {
        req.uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let mut buffer = sh.opts.buffer_response_body;
    let mut cap = sh.opts.max_buffered_response_bytes;
    let mut call = IngressHookCall {
        callback_id: "ingress".into(),
        client_ip: peer.ip().to_string(),
        method: req.method().to_string(),
        path: format!("{path}{query}"),
        route: Some(route.clone()),
        backend_target: target.clone(),
        request_headers: hook_headers(&headers),
        ..Default::default()
    };
    if let Some(hooks) = &sh.opts.hooks {
        if hooks.allow {
            match hooks.call("allow", &call).await {
                Err(why) => return hook_failed(&why),
                Ok(a) if a.allow == Some(false) => return refusal(&a),
                Ok(_) => {}
            }
        }
        if hooks.request {
            let a = match hooks.call("request", &call).await {
                Ok(a) => a,
                Err(why) => return hook_failed(&why),
            };
            if let Some(t) = a.backend_target {
                if !t.starts_with('/') {
                    return hook_failed(&format!(
                        "request hook: backend_target '{}' must start with '/'",
                        t.escape_default()
                    ));
                }
                target = t;
            }
            if let Err(why) = apply_patch(&mut headers, &a.headers) {
                return hook_failed(&format!("request hook: {why}"));
            }
            buffer = a.buffer_response_body.unwrap_or(buffer);
            cap = a
                .max_buffered_response_bytes
                .unwrap_or(cap)
                .clamp(1, 1 << 30);
        }
    }

    // What goes to the guest: HTTP/1.1 with one hop's headers replaced by ours.
    strip_hop_by_hop(&mut headers);
    if let Some(h) = host.clone() {
        headers.insert(HOST, h);
    }
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Some(h) = host {
        headers.insert("x-forwarded-host", h);
    }
    if route.strip_prefix {
        if let Ok(v) = HeaderValue::from_str(route.prefix.trim_end_matches('/')) {
            headers.insert("x-forwarded-prefix", v);
        }
    }
    if websocket {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    }
    call.backend_target = target.clone();
    call.request_headers = hook_headers(&headers);

    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    // The client's body as it comes (an upgrade request's is empty). Sent as hyper's own body
    // type: a boxed one trips rustc's higher-ranked `Send` check on hyper's error bound.
    let body = req.into_body();
    let mut upstream = match Request::builder()
        .method(call.method.as_str())
        .uri(target.as_str())
        .version(Version::HTTP_11)
        .body(body)
    {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format_args!("cannot ask the sandbox for {target}: {e}"),
            )
        }
    };
    *upstream.headers_mut() = headers;

    let port = route.port;
    let stream = match sh.guest.connect(port).await {
        Ok(s) => s,
        Err(why) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format_args!("ingress route {} -> port {port}: {why}", route.prefix),
            )
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(x) => x,
        Err(e) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format_args!("port {port} in the sandbox: {e}"),
            )
        }
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp =
        match tokio::time::timeout(sh.opts.header_timeout, sender.send_request(upstream)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format_args!(
                        "port {port} in the sandbox closed the connection without an answer: {e}"
                    ),
                )
            }
            Err(_) => {
                return text(
                    StatusCode::GATEWAY_TIMEOUT,
                    format_args!(
                        "port {port} in the sandbox sent no response headers within {} ms",
                        sh.opts.header_timeout.as_millis()
                    ),
                )
            }
        };

    if let (Some(client), StatusCode::SWITCHING_PROTOCOLS) = (client_upgrade, resp.status()) {
        let guest = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            if let (Ok(c), Ok(g)) = (client.await, guest.await) {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(g)).await;
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, full(Vec::new()));
    }

    let (mut parts, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let Some(hooks) = sh.opts.hooks.as_ref().filter(|h| h.response) else {
        return Response::from_parts(parts, boxed(incoming));
    };
    call.status = parts.status.as_u16();
    call.response_headers = hook_headers(&parts.headers);
    // Buffered from hyper's own body type: a boxed one trips rustc's higher-ranked `Send` check
    // on `Limited`'s error bound.
    let mut body = if buffer {
        let whole = match Limited::new(incoming, cap as usize).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let why = if e.is::<http_body_util::LengthLimitError>() {
                    format!(
                        "the response is larger than the {cap}-byte buffer for the response hook"
                    )
                } else {
                    format!("the response broke off: {e}")
                };
                return text(
                    StatusCode::BAD_GATEWAY,
                    format_args!("port {port} in the sandbox: {why}"),
                );
            }
        };
        call.body_base64 = Some(B64.encode(&whole));
        full(whole)
    } else {
        boxed(incoming)
    };
    let a = match hooks.call("response", &call).await {
        Ok(a) => a,
        Err(why) => return hook_failed(&why),
    };
    if let Some(s) = a.status {
        match StatusCode::from_u16(s) {
            Ok(s) => parts.status = s,
            Err(_) => return hook_failed(&format!("response hook: status {s} is not valid")),
        }
    }
    if let Err(why) = apply_patch(&mut parts.headers, &a.headers) {
        return hook_failed(&format!("response hook: {why}"));
    }
    if let Some(b) = &a.body_base64 {
        match B64.decode(b) {
            Ok(b) => {
                parts.headers.remove(CONTENT_LENGTH);
                parts.headers.remove(TRANSFER_ENCODING);
                body = full(b);
            }
            Err(_) => return hook_failed("response hook: body_base64 is not base64"),
        }
    }
    Response::from_parts(parts, body)
}

fn boxed(b: Incoming) -> Body {
    b.map_err(|e| -> BoxError { e.into() }).boxed()
}

/// A hook that could not be asked, or answered nonsense: the request is refused.
fn hook_failed(why: &str) -> Response<Body> {
    tracing::warn!("ingress: refused a request: {why}");
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        format_args!("ingress refused the request: {why}"),
    )
}

/// The `allow` hook said no: its status (403 by default), headers and body.
fn refusal(a: &IngressHookAnswer) -> Response<Body> {
    let status = a
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    let mut r = match a.body_base64.as_deref().map(|b| B64.decode(b)) {
        Some(Ok(b)) => {
            let mut r = Response::new(full(b));
            *r.status_mut() = status;
            r
        }
        Some(Err(_)) => return hook_failed("allow hook: body_base64 is not base64"),
        None => text(status, "refused by the ingress allow hook"),
    };
    if let Err(why) = apply_patch(r.headers_mut(), &a.headers) {
        return hook_failed(&format!("allow hook: {why}"));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_options_are_what_the_default_params_ask_for() {
        let from_params = Options::from_params(&IngressParams::default()).unwrap();
        assert_eq!(
            format!("{:?}", Options::default()),
            format!("{from_params:?}")
        );
    }
}
