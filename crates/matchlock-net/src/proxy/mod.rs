//! The interception proxy: serves one guest TCP connection that the network stack handed over.
//! It decides what the flow speaks from its first bytes (whatever the port); TLS is terminated with
//! a leaf certificate from the sandbox CA (ALPN h2 and http/1.1), plain HTTP is read as is. Each
//! request passes the policy's gate ([`Policy::request`]), gets its secrets substituted and the
//! hook rules applied, and is sent upstream over a connection that only the gate's [`Allowed`]
//! opens (HTTPS verified against the system roots plus `MATCHLOCK_UPSTREAM_CA`). Responses come
//! back with real secret values turned back into placeholders. A refusal is the policy's
//! [`Denial`]: its status, its event, its log line.
//!
//! Traffic that is not HTTP (and TLS that offers no HTTP protocol, off port 443) is relayed
//! unchanged when the allow-list is open (empty, or `*`: Matchlock's passthrough) and closed
//! otherwise. WebSocket upgrades are forwarded (after the same checks, secrets and hook rules as
//! any request) and, once upstream answers `101`, become an opaque tunnel both ways.

mod body;
pub mod redirect;
mod tls;
mod upstream;
mod websocket;

pub use tls::upstream_tls;

use body::{
    is_websocket_upgrade, scrub_header_values, strip_hop_by_hop, text, Coding, GuardBody, Prefixed,
    ProxyBody, ScrubBody, SseReplace, TapBody,
};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use matchlock_policy::ca::MitmCa;
use matchlock_policy::classify::{classify, Flow, MAX_PEEK};
use matchlock_policy::events::{Event, EventLog};
use matchlock_policy::hosts::normalize;
use matchlock_policy::plugins::usage::{is_model_call, Call, UsageTap};
use matchlock_policy::plugins::Plugins;
use matchlock_policy::rules::{RequestView, Rules, Verdict};
use matchlock_policy::secrets::Secrets;
use matchlock_policy::{Allowed, Denial, Policy, RequestHead, Target};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use upstream::UpstreamSlot;

/// A WebSocket tunnel whose upstream-to-guest frames pass `frames` (secret values scrubbed);
/// the guest's frames go up as they are. A frame that cannot be scrubbed ends the guest's side.
async fn scrubbed_tunnel<G, U>(guest: G, upstream: U, mut frames: websocket::FrameScrubber)
where
    G: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let (mut gr, mut gw) = tokio::io::split(guest);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let up = async {
        let _ = tokio::io::copy(&mut gr, &mut uw).await;
        let _ = uw.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match ur.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let Ok(out) = frames.push(&buf[..n]) else {
                tracing::debug!("websocket frame from upstream cannot be scrubbed; closing");
                break;
            };
            if gw.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = gw.shutdown().await;
    };
    // Like copy_bidirectional: each side's end is passed on, the tunnel ends when both have.
    tokio::join!(up, down);
}

/// Why a request is one two parsers could read differently, if it is.
fn ambiguity<B>(req: &Request<B>) -> Option<&'static str> {
    let h = req.headers();
    if h.get_all(http::header::HOST).iter().nth(1).is_some() {
        return Some("two Host headers");
    }
    if h.contains_key(http::header::TRANSFER_ENCODING)
        && h.contains_key(http::header::CONTENT_LENGTH)
    {
        return Some("both Content-Length and Transfer-Encoding");
    }
    None
}

/// Largest response body that `after` body rules buffer.
const MAX_EDITED_BODY: usize = 16 << 20;

/// One sandbox's interception proxy.
pub struct Proxy {
    policy: Arc<Policy>,
    secrets: Arc<Secrets>,
    ca: MitmCa,
    client_tls: Arc<rustls::ClientConfig>,
    /// The same trust, offering only HTTP/1.1 (for WebSocket upgrades).
    client_tls_h1: Arc<rustls::ClientConfig>,
    events: Option<Arc<EventLog>>,
    rules: Rules,
    plugins: Plugins,
    /// SSH egress: the guest's SSH flows to allowed servers go through it.
    ssh: Option<Arc<matchlock_ssh_egress::Egress>>,
    /// Follow redirects on the host, resolving new hosts with this.
    redirects: Option<redirect::Resolver>,
}

/// A hyper error as the proxy's body error (a plain function: a closure's inferred lifetimes
/// trip the compiler in the connection future).
fn boxed_error(e: hyper::Error) -> body::BoxError {
    Box::new(e)
}

/// Headers as the proxy re-issues them (a name or value that is not valid HTTP is dropped).
fn header_map(headers: Vec<(String, Vec<u8>)>) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(&v),
        ) {
            map.append(k, v);
        }
    }
    map
}

/// `path` and `query` as a request target.
fn request_target(path: &str, query: &[u8]) -> Option<Uri> {
    let pq = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", String::from_utf8_lossy(query))
    };
    pq.parse().ok()
}

/// Reads a whole body of at most `max` bytes (trailers dropped); `None` when it is larger or
/// fails.
async fn collect_limited(mut body: ProxyBody, max: usize) -> Option<Bytes> {
    let mut out = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if out.len() + data.len() > max {
                return None;
            }
            out.extend_from_slice(&data);
        }
    }
    Some(out.freeze())
}

/// Largest model-call request body read to decide a route; a larger one is passed on unrouted.
const MAX_ROUTED_BODY: usize = 16 << 20;

/// Request headers that carry the guest's credentials for the source host: a routed call goes
/// to the backend without them (the secret of the source host never goes there).
const CREDENTIAL_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
];

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

impl Proxy {
    /// A proxy for one sandbox, deciding with `policy` (which must intercept).
    pub fn new(
        policy: Arc<Policy>,
        secrets: Secrets,
        ca: MitmCa,
        client_tls: rustls::ClientConfig,
        events: Option<Arc<EventLog>>,
        rules: Rules,
    ) -> Proxy {
        let mut h1 = client_tls.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Proxy {
            policy,
            secrets: Arc::new(secrets),
            ca,
            client_tls: Arc::new(client_tls),
            client_tls_h1: Arc::new(h1),
            events,
            rules,
            plugins: Plugins::default(),
            ssh: None,
            redirects: None,
        }
    }

    /// Runs `plugins` in the pipeline (the router's backends must be given to the policy, see
    /// `Policy::with_backends`).
    pub fn with_plugins(mut self, plugins: Plugins) -> Proxy {
        self.plugins = plugins;
        self
    }

    /// Sends the guest's SSH flows to allowed servers through an SSH egress proxy with `cfg`
    /// and a host key of its own; its decisions go to the event log.
    pub fn with_ssh_egress(mut self, cfg: matchlock_ssh_egress::EgressConfig) -> Proxy {
        use rand::RngCore;
        let log = self.events.clone();
        let sink: matchlock_ssh_egress::Events = Arc::new(move |e| {
            let event = Event {
                kind: e.kind,
                summary: match (&e.command, &e.reason) {
                    (Some(c), Some(r)) => format!("{} {}: {c:?}: {r}", e.kind, e.destination),
                    (Some(c), None) => format!("{} {}: {c:?}", e.kind, e.destination),
                    (None, Some(r)) => format!("{} {}: {r}", e.kind, e.destination),
                    (None, None) => format!("{} {}", e.kind, e.destination),
                },
                plugin: Some("ssh_egress"),
                data: json!({"destination": e.destination, "command": e.command, "reason": e.reason}),
            };
            tracing::info!(target: "matchlock::ssh_egress", "{}", event.summary);
            if let Some(log) = &log {
                log.record(&event, &["ssh"]);
            }
        });
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        let key = russh_key(&seed);
        self.ssh = Some(Arc::new(matchlock_ssh_egress::Egress::new(cfg, key, sink)));
        self
    }

    /// Follows redirects on the host within the allow-list (see [`redirect`]), resolving the
    /// hosts they lead to with `resolver`.
    pub fn with_redirects(mut self, resolver: redirect::Resolver) -> Proxy {
        self.redirects = Some(resolver);
        self
    }

    /// The `known_hosts` line the guest needs to trust the SSH egress proxy for every server.
    pub fn ssh_known_hosts_line(&self) -> Option<String> {
        let key = self.ssh.as_ref()?.host_key()?.to_openssh().ok()?;
        Some(format!("* {key}\n"))
    }

    /// The CA certificate the guest must trust.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// The policy it decides with.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Logs and records an event.
    fn emit(&self, event: &Event, tls: bool) {
        // Summaries name hosts and secrets, never a secret's value.
        tracing::debug!(target: "matchlock::proxy", kind = event.kind, "{}", event.summary);
        if let Some(log) = &self.events {
            log.record(event, &[if tls { "tls" } else { "http" }]);
        }
    }

    /// Records a refusal and builds its answer.
    fn refuse(&self, denial: &Denial, tls: bool) -> Response<ProxyBody> {
        self.emit(&denial.event(), tls);
        let status = StatusCode::from_u16(denial.status()).unwrap_or(StatusCode::FORBIDDEN);
        text(status, format!("blocked: {denial}"))
    }

    /// Serves one guest connection to `target` until it ends.
    pub async fn serve<S>(self: Arc<Self>, mut guest: S, target: Target)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 4096];
        let flow = loop {
            let read = tokio::time::timeout(Duration::from_secs(30), guest.read(&mut chunk)).await;
            match read {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
            match classify(&buf) {
                Flow::NeedMore if buf.len() < MAX_PEEK => continue,
                Flow::NeedMore => return,
                f => break f,
            }
        };
        let ssh = buf.starts_with(b"SSH-");
        let io = Prefixed {
            prefix: buf,
            pos: 0,
            inner: guest,
        };
        if let (true, Some(egress)) = (ssh, self.ssh.clone()) {
            return self.serve_ssh(&egress, io, target).await;
        }
        match flow {
            Flow::Http1 { .. } | Flow::Http2Preface => self.serve_http(io, target, None).await,
            // A TLS client that offers no HTTP protocol, off the HTTPS port, speaks something
            // else over TLS (IMAPS, a database): terminating it would only break it.
            Flow::Tls { alpn, .. }
                if self.policy.is_open()
                    && target.visible.port() != 443
                    && !alpn.is_empty()
                    && !alpn.iter().any(|p| p == "h2" || p.starts_with("http/")) =>
            {
                self.passthrough(io, target, "TLS without HTTP").await
            }
            Flow::Tls { sni, sigalgs, .. } => {
                let name = sni
                    .clone()
                    .unwrap_or_else(|| target.visible.ip().to_string());
                let Ok(leaf) = self.ca.leaf(&name) else {
                    return;
                };
                if !sigalgs {
                    return match tls::legacy_tls(&leaf, io).await {
                        Ok(tls) => self.serve_http(tls, target, Some(name)).await,
                        Err(error) => self.emit(&Denial::Handshake { name, error }.event(), true),
                    };
                }
                let Ok(cfg) = tls::server_tls(&leaf) else {
                    return;
                };
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
                match acceptor.accept(io).await {
                    Ok(tls) => self.serve_http(tls, target, Some(name)).await,
                    Err(e) => {
                        let error = e.to_string();
                        self.emit(&Denial::Handshake { name, error }.event(), true)
                    }
                }
            }
            _ => self.passthrough(io, target, "not HTTP").await,
        }
    }

    /// Relays a connection that is not HTTP as is, when the policy allows it.
    async fn passthrough<S>(&self, mut io: Prefixed<S>, target: Target, what: &'static str)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let allowed = match self.policy.passthrough(target, what) {
            Ok(a) => a,
            Err(denial) => return self.emit(&denial.event(), false),
        };
        let up = crate::connect::tcp(&allowed, Duration::from_secs(20)).await;
        let Ok(mut up) = up else {
            tracing::debug!(addr = %allowed.addr(), "passthrough connect failed");
            return;
        };
        self.emit(&allowed.event(), false);
        let policy = self.policy.clone();
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut io, &mut up) => {}
            // The allow-list closed while the relay ran: it ends now, not when the guest hangs up.
            _ = policy.revoked(|p| p.passthrough(target, what).is_ok()) => {
                if let Err(denial) = policy.passthrough(target, what) {
                    self.emit(&denial.event(), false);
                }
            }
        }
    }

    /// An SSH flow, with SSH egress on: to the egress proxy when the guest was told one of its
    /// servers is at the address it connected to; refused otherwise.
    async fn serve_ssh<S>(&self, egress: &matchlock_ssh_egress::Egress, io: S, target: Target)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let port = target.visible.port();
        let names = self
            .policy
            .names()
            .names_at(std::net::IpAddr::V4(*target.visible.ip()));
        let Some(host) = names.into_iter().find(|n| egress.allows(n, port)) else {
            return self.emit(
                &Denial::NotAllowed {
                    host: format!("{} (SSH; not an --ssh-allow server)", target.visible),
                }
                .event(),
                false,
            );
        };
        let allowed = match self.policy.ssh(&host, target) {
            Ok(a) => a,
            Err(denial) => return self.emit(&denial.event(), false),
        };
        self.emit(&allowed.event(), false);
        let connect =
            Box::pin(async move { crate::connect::tcp(&allowed, Duration::from_secs(20)).await });
        egress.serve(io, &host, port, connect).await
    }

    async fn serve_http<S>(self: Arc<Self>, io: S, target: Target, sni: Option<String>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.clone();
        // One upstream connection per guest connection, reused across its requests (keep-alive).
        let slot: UpstreamSlot = Arc::new(tokio::sync::Mutex::new(None));
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let sni = sni.clone();
            let slot = slot.clone();
            async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, target, sni, &slot).await) }
        });
        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .await;
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        target: Target,
        sni: Option<String>,
        slot: &UpstreamSlot,
    ) -> Response<ProxyBody> {
        let tls = sni.is_some();
        if let Some(why) = ambiguity(&req) {
            return self.refuse(&Denial::Ambiguous(why), tls);
        }
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            });
        let Some(authority) = authority else {
            return self.refuse(&Denial::NoHost, tls);
        };
        let host = normalize(&authority);
        let websocket = is_websocket_upgrade(&req);
        let head = RequestHead {
            host: &host,
            sni: sni.as_deref(),
            websocket,
        };
        let allowed = match self.policy.request(head, target) {
            Ok(a) => a,
            Err(denial) => return self.refuse(&denial, tls),
        };
        self.emit(&allowed.event(), tls);
        if let Some(refused) = self.budget_gate(&host, tls) {
            return refused;
        }
        // The guest's side of an upgrade, taken before the request is consumed.
        let guest_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let method = req.method().to_string();
        let started = std::time::Instant::now();
        self.emit(
            &Event {
                kind: "http_request",
                summary: format!("{method} {host}{}", req.uri().path()),
                plugin: None,
                data: json!({"method": method, "host": host, "path": req.uri().path(), "websocket": websocket}),
            },
            tls,
        );
        let (mut parts, body) = req.into_parts();
        // The guest's own request, kept to be sent again if a redirect is followed.
        let guest_request = (self.redirects.is_some()
            && redirect::GuestRequest::followable(&parts.method, websocket))
        .then(|| redirect::GuestRequest {
            method: parts.method.clone(),
            headers: parts.headers.clone(),
        });
        let mut body: ProxyBody = body.map_err(boxed_error).boxed();
        // Route: a model call the router sends to a local backend leaves the pipeline here, with
        // its own request transform and the same response transform.
        let mut requested_model = None;
        if let Some(router) = self.plugins.router.as_ref().filter(|_| !websocket) {
            if router.may_route(parts.method.as_str(), &host, parts.uri.path()) {
                let Some(bytes) = collect_limited(body, MAX_ROUTED_BODY).await else {
                    return text(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "model call body unreadable or over 16 MiB".into(),
                    );
                };
                let routing = router.route(&host, parts.uri.path(), &bytes);
                requested_model = routing.model;
                match routing.directive {
                    Some(d) => return self.send_routed(parts, d, &host, tls, started).await,
                    None => {
                        self.emit(
                            &Event {
                                kind: "route_decision",
                                summary: format!("no route for {host} model {}", requested_model.as_deref().unwrap_or("?")),
                                plugin: Some("local_model_router"),
                                data: json!({"host": host, "model": requested_model, "routed": false}),
                            },
                            tls,
                        );
                        body = Full::new(bytes).map_err(|never| match never {}).boxed();
                    }
                }
            }
        }
        let model_call = is_model_call(parts.uri.path());
        let (view, headers, query) = match self.transform_request(&parts, &host, tls).await {
            Ok(t) => t,
            Err(denial) => return self.refuse(&denial, tls),
        };
        let mut map = header_map(headers);
        let upgrade_token = map.get(http::header::UPGRADE).cloned();
        strip_hop_by_hop(&mut map);
        if let (true, Some(token)) = (websocket, upgrade_token) {
            // The one hop-by-hop exchange that must reach upstream: the upgrade itself.
            map.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            map.insert(http::header::UPGRADE, token);
            if !self.secrets.is_empty() {
                // A compressed message could carry a value past the tunnel's scrubber.
                map.remove(http::header::SEC_WEBSOCKET_EXTENSIONS);
            }
        }
        if let Ok(h) = HeaderValue::from_str(&authority) {
            map.insert(http::header::HOST, h);
        }
        let Some(uri) = request_target(&view.path, &query) else {
            return self.refuse(&Denial::BadTarget { host }, tls);
        };
        let sent_path = uri.to_string();
        parts.uri = uri;
        parts.headers = map;
        parts.version = http::Version::HTTP_11;
        // A body to a host some secret may not go to is watched as it streams.
        let leak = Arc::new(std::sync::Mutex::new(None));
        let body: ProxyBody = match self.secrets.body_guard(&host) {
            Some(guard) => GuardBody {
                inner: body,
                guard,
                leak: leak.clone(),
                done: false,
            }
            .boxed(),
            None => body,
        };
        let upstream = Request::from_parts(parts, body);
        let port = target.visible.port();
        let sent = match guest_upgrade {
            Some(_) => self.forward_upgrade(upstream, &allowed, tls, port).await,
            None => self.forward(upstream, &allowed, tls, port, slot).await,
        };
        let leaked = leak.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(leak) = leaked {
            // The request was cut off before the secret; whatever upstream answered, the guest
            // gets the refusal.
            return self.refuse(&Denial::Secret(leak), tls);
        }
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                self.emit(
                    &Event {
                        kind: "http_response",
                        summary: format!("502 for {host}: {e}"),
                        plugin: None,
                        data: json!({"host": host, "status": 502, "error": e, "duration_ms": started.elapsed().as_millis() as u64}),
                    },
                    tls,
                );
                return text(StatusCode::BAD_GATEWAY, format!("upstream {host}: {e}"));
            }
        };
        self.emit(
            &Event {
                kind: "http_response",
                summary: format!("{} from {host}", resp.status().as_u16()),
                plugin: None,
                data: json!({"host": host, "status": resp.status().as_u16(), "duration_ms": started.elapsed().as_millis() as u64}),
            },
            tls,
        );
        if let (Some(guest), StatusCode::SWITCHING_PROTOCOLS) = (guest_upgrade, resp.status()) {
            return self.tunnel(guest, &mut resp, &host, tls);
        }
        let (resp, hop) = {
            let hop = redirect::Hop {
                tls,
                authority: authority.clone(),
                host: host.clone(),
                path: sent_path,
                view,
            };
            match &guest_request {
                Some(g) => self.follow(g, resp, hop).await,
                None => (resp, hop),
            }
        };
        let (view, host, tls) = (hop.view, hop.host, hop.tls);
        let out = self.transform_response(resp, &view, &host, tls).await;
        if model_call {
            return self.log_usage(out, &host, requested_model, None, started, tls);
        }
        out
    }

    /// The `budget_gate`: once the usage log's spend reaches the limit, every request gets 429
    /// with an OpenAI-style error. `None` lets the request on.
    fn budget_gate(&self, host: &str, tls: bool) -> Option<Response<ProxyBody>> {
        let gate = self.plugins.budget.as_ref()?;
        let result = gate.check();
        let (allowed, spent) = match &result {
            Ok(spent) => (true, *spent),
            Err(over) => (false, over.spent_usd),
        };
        let limit = gate.limit_usd();
        self.emit(
            &Event {
                kind: "gate_decision",
                summary: if allowed {
                    format!("gate allowed {host} by budget_gate (${spent:.4} of ${limit})")
                } else {
                    format!("gate blocked {host} by budget_gate: ${spent:.4} spent of ${limit}")
                },
                plugin: Some("budget_gate"),
                data: json!({"host": host, "allowed": allowed, "spent_usd": spent, "limit_usd": limit}),
            },
            tls,
        );
        let over = result.err()?;
        let mut resp = Response::new(
            Full::new(Bytes::from(over.body()))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Some(resp)
    }

    /// Sends a routed model call to its backend: the body with the model renamed, the path the
    /// backend serves the API at, no credentials of the source host (and refused if any secret
    /// would still go along), over plain HTTP to the configured address.
    async fn send_routed(
        &self,
        parts: http::request::Parts,
        d: matchlock_policy::plugins::routes::Directive,
        host: &str,
        tls: bool,
        started: std::time::Instant,
    ) -> Response<ProxyBody> {
        let backend = d.backend.to_string();
        self.emit(
            &Event {
                kind: "route_decision",
                summary: format!("routed {host} model {} to {backend} as {}", d.source_model, d.target_model),
                plugin: Some("local_model_router"),
                data: json!({"host": host, "model": d.source_model, "routed": true, "backend": backend, "target_model": d.target_model}),
            },
            tls,
        );
        let allowed = match self.policy.backend(&backend) {
            Ok(a) => a,
            Err(denial) => return self.refuse(&denial, tls),
        };
        let mut headers: Vec<(String, Vec<u8>)> = parts
            .headers
            .iter()
            .filter(|(k, _)| !CREDENTIAL_HEADERS.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        let mut query = parts.uri.query().unwrap_or("").as_bytes().to_vec();
        // Anything of a secret left anywhere else in the call is refused, as for any host the
        // secret does not allow.
        if let Err(leak) = self.secrets.apply_request(
            &d.backend.host,
            true,
            d.path.as_bytes(),
            &mut headers,
            &mut query,
        ) {
            return self.refuse(&Denial::Secret(leak), tls);
        }
        if let Some(mut guard) = self.secrets.body_guard(&d.backend.host) {
            if let Err(leak) = guard.push(&d.body) {
                return self.refuse(&Denial::Secret(leak), tls);
            }
        }
        let mut map = header_map(headers);
        strip_hop_by_hop(&mut map);
        map.remove(http::header::CONTENT_LENGTH);
        // The usage is read from the answer, so it must come back plain.
        map.remove(http::header::ACCEPT_ENCODING);
        if let Ok(h) = HeaderValue::from_str(&backend) {
            map.insert(http::header::HOST, h);
        }
        let Some(uri) = request_target(d.path, &query) else {
            return self.refuse(
                &Denial::BadTarget {
                    host: host.to_string(),
                },
                tls,
            );
        };
        let mut req = Request::new(
            Full::new(Bytes::from(d.body.clone()))
                .map_err(|never| match never {})
                .boxed(),
        );
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = map;
        self.emit(
            &Event {
                kind: "request_transform",
                summary: format!("rewrote model {} to {} for {backend}", d.source_model, d.target_model),
                plugin: Some("local_model_router"),
                data: json!({"action": "model_rewritten", "host": host, "backend": backend, "from": d.source_model, "to": d.target_model, "path": d.path}),
            },
            tls,
        );
        let sent = match upstream::connect(&allowed, None, allowed.addr().port()).await {
            Ok(mut up) => up.try_send(req).await.map_err(|(_, e)| e),
            Err(e) => Err(e),
        };
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                self.emit(
                    &Event {
                        kind: "http_response",
                        summary: format!("502 for {host} (routed to {backend}): {e}"),
                        plugin: Some("local_model_router"),
                        data: json!({"host": host, "backend": backend, "status": 502, "error": e}),
                    },
                    tls,
                );
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("local model backend {backend}: {e}"),
                );
            }
        };
        self.emit(
            &Event {
                kind: "http_response",
                summary: format!("{} from {backend} (routed for {host})", resp.status().as_u16()),
                plugin: Some("local_model_router"),
                data: json!({"host": host, "backend": backend, "status": resp.status().as_u16(), "duration_ms": started.elapsed().as_millis() as u64}),
            },
            tls,
        );
        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        let out = Response::from_parts(rparts, rbody.map_err(boxed_error).boxed());
        self.log_usage(out, host, Some(d.source_model), Some(backend), started, tls)
    }

    /// The `usage_logger`: the answer streams on unchanged while its usage is read; when it
    /// ends, one line goes to the usage log and a `response_transform` event says so.
    fn log_usage(
        &self,
        resp: Response<ProxyBody>,
        host: &str,
        requested_model: Option<String>,
        routed_to: Option<String>,
        started: std::time::Instant,
        tls: bool,
    ) -> Response<ProxyBody> {
        let Some((log, prices)) = self.plugins.usage.clone() else {
            return resp;
        };
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let host = host.to_string();
        let events = self.events.clone();
        let done: body::UsageDone = Box::new(move |usage| {
            let Some(usage) = usage else {
                tracing::debug!(target: "matchlock::proxy", "no usage in the answer of {host}");
                return;
            };
            let latency_ms = started.elapsed().as_millis() as u64;
            let call = Call::priced(
                &host,
                requested_model.as_deref(),
                usage,
                &prices,
                routed_to,
                latency_ms,
            );
            let ts = matchlock_policy::events::now_rfc3339();
            // The spend counts at once (the budget gate reads it) and the line is written at
            // once; only the flush to the disk waits, off the request path.
            let spent = log.account(&call);
            let event = Event {
                kind: "response_transform",
                summary: format!(
                    "logged {} call to {}: {} in, {} out, ${:.6} ({})",
                    call.model,
                    host,
                    call.usage.input_tokens,
                    call.usage.output_tokens,
                    call.cost_usd,
                    call.cost_source.as_str(),
                ),
                plugin: Some("usage_logger"),
                data: {
                    let mut d = call.to_json(&ts);
                    d["action"] = json!("usage_logged");
                    d["spent_usd"] = json!(spent);
                    d
                },
            };
            if let Some(ev) = &events {
                ev.record(&event, &[if tls { "tls" } else { "http" }]);
            }
            if let Err(e) = log.append(&call, &ts) {
                tracing::warn!(target: "matchlock::proxy", "usage log: {e}");
                return;
            }
            let sync = move || {
                if let Err(e) = log.sync() {
                    tracing::warn!(target: "matchlock::proxy", "usage log: {e}");
                }
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn_blocking(sync)),
                Err(_) => sync(),
            }
        });
        let (parts, body) = resp.into_parts();
        let tapped = TapBody {
            inner: body,
            tap: Some(UsageTap::new(&content_type)),
            done: Some(done),
        };
        Response::from_parts(parts, tapped.boxed())
    }

    /// Runs the `before` hook rules, then substitutes secrets (headers, Basic credentials and
    /// the query). Returns the request as the rules left it, its headers and its query; or the
    /// refusal.
    #[allow(clippy::type_complexity)]
    async fn transform_request(
        &self,
        parts: &http::request::Parts,
        host: &str,
        tls: bool,
    ) -> Result<(RequestView, Vec<(String, Vec<u8>)>, Vec<u8>), Denial> {
        let mut view = RequestView {
            host: host.to_string(),
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or("").to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        };
        if !self.rules.is_empty() {
            if let Verdict::Block(reason) = self.rules.before(&mut view).await {
                return Err(Denial::Rule {
                    host: host.to_string(),
                    reason,
                });
            }
        }
        let mut headers: Vec<(String, Vec<u8>)> = view
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
            .collect();
        let mut query = view.query.as_bytes().to_vec();
        let injected = self
            .secrets
            .apply_request(host, !tls, view.path.as_bytes(), &mut headers, &mut query)
            .map_err(Denial::Secret)?;
        if !injected.is_empty() {
            // An upstream that echoes the value inside a compressed body would slip past the
            // scrubber, which does not decode bodies (Content-Encoding is passed through
            // untouched): ask for an uncompressed answer instead.
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case("accept-encoding"));
        }
        for name in injected {
            self.emit(
                &Event {
                    kind: "request_transform",
                    summary: format!("injected secret {name} for {host}"),
                    plugin: Some("secret_injector"),
                    data: json!({"action": "injected", "secret": name, "host": host}),
                },
                tls,
            );
        }
        Ok((view, headers, query))
    }

    /// Scrubs real secret values from an upstream response and applies the `after` hook rules:
    /// block, headers, and body edits (an event stream's `data:` lines one at a time as they
    /// stream; any other body read whole, bounded).
    async fn transform_response(
        &self,
        resp: Response<Incoming>,
        view: &RequestView,
        host: &str,
        tls: bool,
    ) -> Response<ProxyBody> {
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        scrub_header_values(&self.secrets, &mut parts.headers);
        self.scrub_reason(&mut parts.extensions);
        let mut coding = None;
        if !self.secrets.is_empty() {
            // The length may change with the substitution.
            parts.headers.remove(http::header::CONTENT_LENGTH);
            // A compressed body would carry a value past the scrubber: it is decoded and sent
            // on plain, or refused when the proxy cannot decode it. (Requests that carry a
            // secret ask for no compression, but an upstream may compress anyway.)
            let encoding = parts.headers.get(http::header::CONTENT_ENCODING);
            match encoding.map(|v| Coding::parse(v.as_bytes())).transpose() {
                Ok(c) => coding = c.flatten(),
                Err(name) => {
                    let denial = Denial::Undecodable {
                        host: host.to_string(),
                        coding: name,
                    };
                    return self.refuse(&denial, tls);
                }
            }
            if coding.is_some() {
                parts.headers.remove(http::header::CONTENT_ENCODING);
            }
        }
        let body = ScrubBody::new(body, self.secrets.clone(), coding);
        if self.rules.is_empty() {
            return Response::from_parts(parts, body.boxed());
        }
        let resp_headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let edit = self
            .rules
            .after(view, parts.status.as_u16(), &resp_headers)
            .await;
        if let Some(reason) = edit.block {
            let denial = Denial::Rule {
                host: host.to_string(),
                reason,
            };
            return self.refuse(&denial, tls);
        }
        if let Some(h) = &edit.replace_headers {
            parts.headers.clear();
            for (k, v) in h {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    parts.headers.append(k, v);
                }
            }
        }
        for k in &edit.delete_headers {
            parts.headers.remove(k.as_str());
        }
        for (k, v) in &edit.set_headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                parts.headers.insert(k, v);
            }
        }
        let encoded = parts
            .headers
            .get(http::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() != b"identity");
        // Body rules work on plain bodies; a compressed one is passed through untouched
        // (Content-Encoding is never changed).
        if !edit.needs_body() || encoded {
            return Response::from_parts(parts, body.boxed());
        }
        let sse = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("text/event-stream"));
        if sse && edit.set_body.is_none() {
            parts.headers.remove(http::header::CONTENT_LENGTH);
            let body = SseReplace::new(body.boxed(), edit.replacements.clone());
            return Response::from_parts(parts, body.boxed());
        }
        let collected = http_body_util::Limited::new(body, MAX_EDITED_BODY)
            .collect()
            .await;
        let Ok(collected) = collected else {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("upstream {host}: response body too large for the body rules"),
            );
        };
        let original = collected.to_bytes();
        let mut data = edit.set_body.clone().unwrap_or_else(|| original.to_vec());
        data = matchlock_policy::rules::replace_all(&data, &edit.replacements);
        parts.headers.remove(http::header::CONTENT_LENGTH);
        if let Ok(v) = HeaderValue::from_str(&data.len().to_string()) {
            parts.headers.insert(http::header::CONTENT_LENGTH, v);
        }
        Response::from_parts(
            parts,
            Full::new(Bytes::from(data))
                .map_err(|never| match never {})
                .boxed(),
        )
    }

    /// An HTTP/1 reason phrase is text the upstream chose too: scrubbed like a header (hyper
    /// sends it on from this extension when it is not the status's canonical phrase).
    fn scrub_reason(&self, extensions: &mut http::Extensions) {
        let Some(reason) = extensions.get::<hyper::ext::ReasonPhrase>() else {
            return;
        };
        let scrubbed = self.secrets.scrub(reason.as_bytes());
        if scrubbed != reason.as_bytes() {
            match hyper::ext::ReasonPhrase::try_from(scrubbed) {
                Ok(r) => extensions.insert(r),
                Err(_) => extensions.remove::<hyper::ext::ReasonPhrase>(),
            };
        }
    }

    /// Answers the guest's upgrade with upstream's `101` and joins the two upgraded
    /// connections into one opaque tunnel.
    fn tunnel(
        &self,
        guest: hyper::upgrade::OnUpgrade,
        resp: &mut Response<Incoming>,
        host: &str,
        tls: bool,
    ) -> Response<ProxyBody> {
        let upstream = hyper::upgrade::on(&mut *resp);
        let mut out = Response::new(
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed(),
        );
        *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let mut headers = resp.headers().clone();
        headers.remove(http::header::CONTENT_LENGTH);
        headers.remove(http::header::TRANSFER_ENCODING);
        scrub_header_values(&self.secrets, &mut headers);
        *out.headers_mut() = headers;
        self.emit(
            &Event {
                kind: "http_response",
                summary: format!("websocket to {host} open"),
                plugin: None,
                data: json!({"host": host, "status": 101, "websocket": true}),
            },
            tls,
        );
        let scrubber = (!self.secrets.is_empty()).then(|| self.secrets.scrubber());
        let policy = self.policy.clone();
        let events = self.events.clone();
        let host = host.to_string();
        tokio::spawn(async move {
            let (Ok(g), Ok(u)) = tokio::join!(guest, upstream) else {
                return;
            };
            let (mut g, mut u) = (TokioIo::new(g), TokioIo::new(u));
            let relay = async {
                match scrubber {
                    None => {
                        let _ = tokio::io::copy_bidirectional(&mut g, &mut u).await;
                    }
                    Some(s) => scrubbed_tunnel(g, u, websocket::FrameScrubber::new(s)).await,
                }
            };
            tokio::select! {
                _ = relay => {}
                // The host left the allow-list: the open WebSocket goes with it (dropping both
                // ends closes them), as a new request to it would be refused.
                _ = policy.revoked(|p| p.allows_host(&host)) => {
                    let denial = Denial::NotAllowed { host };
                    tracing::debug!(target: "matchlock::proxy", "{denial}: websocket closed");
                    if let Some(log) = events {
                        log.record(&denial.event(), &[if tls { "tls" } else { "http" }]);
                    }
                }
            }
        });
        out
    }

    /// Sends an upgrade request on a fresh HTTP/1.1 connection of its own (an upgraded
    /// connection cannot be shared, and HTTP/2 upgrades differently).
    async fn forward_upgrade(
        &self,
        req: Request<ProxyBody>,
        allowed: &Allowed,
        tls: bool,
        port: u16,
    ) -> Result<Response<Incoming>, String> {
        let config = tls.then(|| self.client_tls_h1.clone());
        let mut up = upstream::connect(allowed, config, port).await?;
        up.try_send(req).await.map_err(|(_, e)| e)
    }

    /// Sends a request upstream, on the guest connection's upstream connection when it is still
    /// usable, else on a new one (a request the old one could not take is resent, never lost).
    async fn forward(
        &self,
        req: Request<ProxyBody>,
        allowed: &Allowed,
        tls: bool,
        port: u16,
        slot: &UpstreamSlot,
    ) -> Result<Response<Incoming>, String> {
        let cached = slot.lock().await.take();
        let req = match cached {
            Some(mut up) => match up.try_send(req).await {
                Ok(resp) => {
                    *slot.lock().await = Some(up);
                    return Ok(resp);
                }
                Err((Some(req), _)) => req,
                Err((None, e)) => return Err(e),
            },
            None => req,
        };
        let config = tls.then(|| self.client_tls.clone());
        let mut up = upstream::connect(allowed, config, port).await?;
        let resp = up.try_send(req).await.map_err(|(_, e)| e)?;
        *slot.lock().await = Some(up);
        Ok(resp)
    }
}

/// An ed25519 key for the SSH egress proxy from 32 random bytes.
fn russh_key(seed: &[u8; 32]) -> matchlock_ssh_egress::PrivateKey {
    matchlock_ssh_egress::PrivateKey::from(matchlock_ssh_egress::Ed25519Keypair::from_seed(seed))
}
