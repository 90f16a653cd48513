//! The interception proxy: serves one guest TCP connection that the network stack handed over.
//! It decides what the flow speaks from its first bytes (whatever the port); TLS is terminated with
//! a leaf certificate from the sandbox CA (ALPN h2 and http/1.1), plain HTTP is read as is. Each
//! request is then checked (allow-list on the Host, which must agree with the SNI and with the
//! address the guest connected to), gets its secrets substituted, and is sent upstream over a
//! connection to the checked address (HTTPS verified against the system roots plus
//! `MATCHLOCK_UPSTREAM_CA`). Responses come back with real secret values turned back into
//! placeholders. Blocked requests get a 403 that says why.
//!
//! Traffic that is not HTTP (and TLS that offers no HTTP protocol, off port 443) is relayed
//! unchanged when the allow-list is open (empty, or `*`: Matchlock's passthrough) and closed
//! otherwise. WebSocket upgrades are forwarded (after the same checks, secrets and hook rules as
//! any request) and, once upstream answers `101`, become an opaque tunnel both ways.

use crate::ca::MitmCa;
use crate::classify::{classify, Flow, MAX_PEEK};
use crate::events::EventLog;
use crate::hosts::{normalize, AllowList, NameTable};
use crate::rules::{RequestView, Rules, Verdict};
use crate::secrets::{Scrubber, Secrets};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::PoisonError;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Largest response body that `after` body rules buffer.
const MAX_EDITED_BODY: usize = 16 << 20;

/// Longest SSE line that body rules rewrite; a longer one passes through unchanged in pieces
/// (an event stream is never buffered whole).
const MAX_SSE_LINE: usize = 1 << 20;

/// The egress check applied to the real upstream address.
pub type Egress = Arc<dyn Fn(IpAddr) -> Result<(), String> + Send + Sync>;

/// Where a guest connection was headed.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The address the guest connected to.
    pub visible: SocketAddrV4,
    /// Where that really is (differs for host-loopback aliases).
    pub real: SocketAddr,
}

/// One sandbox's interception proxy.
pub struct Proxy {
    allow: RwLock<AllowList>,
    secrets: Secrets,
    ca: MitmCa,
    names: Arc<NameTable>,
    egress: Egress,
    client_tls: Arc<rustls::ClientConfig>,
    /// The same trust, offering only HTTP/1.1 (for WebSocket upgrades).
    client_tls_h1: Arc<rustls::ClientConfig>,
    events: Option<Arc<EventLog>>,
    rules: Rules,
    websockets: bool,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

/// Upstream trust: the system roots plus an optional PEM bundle (`MATCHLOCK_UPSTREAM_CA`).
pub fn upstream_tls(extra_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(pem) = extra_pem {
        use rustls::pki_types::pem::PemObject;
        let mut n = 0;
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(pem) {
            let c = c.map_err(|e| format!("MATCHLOCK_UPSTREAM_CA: {e}"))?;
            roots
                .add(c)
                .map_err(|e| format!("MATCHLOCK_UPSTREAM_CA: {e}"))?;
            n += 1;
        }
        if n == 0 {
            return Err("MATCHLOCK_UPSTREAM_CA holds no PEM certificate".into());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A stream whose first bytes were already read (to classify it).
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn text(status: StatusCode, msg: String) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("matchlock: {msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Connection-level headers that must not be forwarded across a proxy (RFC 9110 §7.6.1), and
/// that HTTP/2 forbids.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        h.remove(*name);
    }
}

/// A response body with real secret values turned back into placeholders.
struct ScrubBody {
    inner: Incoming,
    scrubber: Scrubber,
    done: bool,
}

impl Body for ScrubBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let out = self.scrubber.push(&data);
                        if out.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(None) => {
                    self.done = true;
                    let rest = self.scrubber.finish();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
                other => return other,
            }
        }
    }
}

impl Proxy {
    /// A proxy for one sandbox.
    #[allow(clippy::too_many_arguments)] // each is a distinct part of the sandbox's policy
    pub fn new(
        allow: AllowList,
        secrets: Secrets,
        ca: MitmCa,
        names: Arc<NameTable>,
        egress: Egress,
        client_tls: rustls::ClientConfig,
        events: Option<Arc<EventLog>>,
        rules: Rules,
    ) -> Proxy {
        let mut h1 = client_tls.clone();
        h1.alpn_protocols = vec![b"http/1.1".to_vec()];
        Proxy {
            rules,
            allow: RwLock::new(allow),
            secrets,
            ca,
            names,
            egress,
            client_tls: Arc::new(client_tls),
            client_tls_h1: Arc::new(h1),
            events,
            websockets: true,
        }
    }

    /// Whether WebSocket upgrades are forwarded (the default) or refused with 403.
    pub fn with_websockets(mut self, allowed: bool) -> Proxy {
        self.websockets = allowed;
        self
    }

    fn event(
        &self,
        kind: &str,
        summary: String,
        plugin: Option<&str>,
        tls: bool,
        data: serde_json::Value,
    ) {
        // Summaries name hosts and secrets, never a secret's value.
        tracing::debug!(target: "matchlock::proxy", kind, "{summary}");
        if let Some(log) = &self.events {
            log.emit(
                kind,
                summary,
                plugin,
                &[if tls { "tls" } else { "http" }],
                data,
            );
        }
    }

    /// Records and builds a refusal.
    fn refuse(
        &self,
        host: &str,
        tls: bool,
        status: StatusCode,
        reason: String,
    ) -> Response<ProxyBody> {
        self.event(
            "gate_decision",
            format!("gate blocked {host}: {reason}"),
            Some("host_filter"),
            tls,
            json!({"host": host, "allowed": false, "reason": reason}),
        );
        text(status, format!("blocked: {reason}"))
    }

    /// The CA certificate the guest must trust.
    pub fn ca_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Whether `host` is on the allow-list.
    pub fn allows(&self, host: &str) -> bool {
        self.allow
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .allows(host)
    }

    /// The guest-visible names-to-addresses table.
    pub fn names(&self) -> &Arc<NameTable> {
        &self.names
    }

    /// Whether the allow-list allows every host (then non-HTTP traffic is relayed as is).
    pub fn is_open(&self) -> bool {
        self.allow
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_open()
    }

    /// Whether an empty allow-list denies everything (`--deny-by-default`).
    pub fn denies_when_empty(&self) -> bool {
        self.allow
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .denies_when_empty()
    }

    /// Adds hosts to the allow-list; returns those that were new.
    pub fn allow_add(&self, hosts: &[String]) -> Result<Vec<String>, String> {
        self.allow
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .add(hosts)
    }

    /// Removes hosts from the allow-list; returns those that were present.
    pub fn allow_remove(&self, hosts: &[String]) -> Vec<String> {
        self.allow
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(hosts)
    }

    /// The allow-list now.
    pub fn allowed(&self) -> Vec<String> {
        self.allow
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .patterns()
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
        let io = Prefixed {
            prefix: buf,
            pos: 0,
            inner: guest,
        };
        match flow {
            Flow::Http1 { .. } | Flow::Http2Preface => self.serve_http(io, target, None).await,
            // A TLS client that offers no HTTP protocol, off the HTTPS port, speaks something
            // else over TLS (IMAPS, a database): terminating it would only break it.
            Flow::Tls { alpn, .. }
                if self.is_open()
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
                    return match legacy_tls(&leaf, io).await {
                        Ok(tls) => self.serve_http(tls, target, Some(name)).await,
                        Err(e) => self.handshake_failed(&name, &e),
                    };
                }
                let Ok(cfg) = server_tls(&leaf) else { return };
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
                match acceptor.accept(io).await {
                    Ok(tls) => self.serve_http(tls, target, Some(name)).await,
                    Err(e) => self.handshake_failed(&name, &e.to_string()),
                }
            }
            _ if self.is_open() => self.passthrough(io, target, "not HTTP").await,
            _ => {
                let addr = target.visible.to_string();
                self.event(
                    "gate_decision",
                    format!("gate blocked {addr}: not HTTP and the allow-list names hosts"),
                    Some("host_filter"),
                    false,
                    json!({"host": addr, "allowed": false,
                           "reason": "only HTTP(S) passes interception with an allow-list"}),
                );
            }
        }
    }

    fn handshake_failed(&self, name: &str, e: &str) {
        tracing::debug!(%name, "guest TLS handshake failed: {e}");
        self.event(
            "gate_decision",
            format!("TLS handshake with the guest failed for {name}: {e}"),
            Some("host_filter"),
            true,
            json!({"host": name, "allowed": false, "reason": format!("TLS handshake failed: {e}")}),
        );
    }

    /// Relays a connection that is not HTTP as is (open allow-list only), after the egress
    /// check on the real destination.
    async fn passthrough<S>(&self, mut io: Prefixed<S>, target: Target, what: &str)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let addr = target.real.to_string();
        if let Err(why) = (self.egress)(target.real.ip()) {
            self.event(
                "gate_decision",
                format!("gate blocked {addr}: {why}"),
                Some("host_filter"),
                false,
                json!({"host": addr, "allowed": false, "reason": why}),
            );
            return;
        }
        let up =
            tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(target.real)).await;
        let Ok(Ok(mut up)) = up else {
            tracing::debug!(%addr, "passthrough connect failed");
            return;
        };
        let _ = up.set_nodelay(true);
        self.event(
            "gate_decision",
            format!("gate allowed {addr}: passthrough ({what})"),
            Some("host_filter"),
            false,
            json!({"host": addr, "allowed": true, "passthrough": true}),
        );
        let _ = tokio::io::copy_bidirectional(&mut io, &mut up).await;
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
            return text(
                StatusCode::BAD_REQUEST,
                "blocked: the request names no host".into(),
            );
        };
        let host = normalize(&authority);
        let tls = sni.is_some();
        if let Err((status, reason)) = self.gate(&host, sni.as_deref(), target) {
            return self.refuse(&host, tls, status, reason);
        }
        let websocket = is_websocket_upgrade(&req);
        if websocket && !self.websockets {
            return self.refuse(
                &host,
                tls,
                StatusCode::FORBIDDEN,
                "WebSockets are disabled for this sandbox".into(),
            );
        }
        // The guest's side of an upgrade, taken before the request is consumed.
        let guest_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
        let method = req.method().to_string();
        let started = std::time::Instant::now();
        self.event(
            "http_request",
            format!("{method} {host}{}", req.uri().path()),
            None,
            tls,
            json!({"method": method, "host": host, "path": req.uri().path(), "websocket": websocket}),
        );
        let (mut parts, body) = req.into_parts();
        let (view, headers, query) = match self.transform_request(&parts, &host, tls).await {
            Ok(t) => t,
            Err(resp) => return resp,
        };
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_bytes(&v),
            ) {
                map.append(k, v);
            }
        }
        let upgrade_token = map.get(http::header::UPGRADE).cloned();
        strip_hop_by_hop(&mut map);
        if let (true, Some(token)) = (websocket, upgrade_token) {
            // The one hop-by-hop exchange that must reach upstream: the upgrade itself.
            map.insert(
                http::header::CONNECTION,
                HeaderValue::from_static("upgrade"),
            );
            map.insert(http::header::UPGRADE, token);
        }
        if let Ok(h) = HeaderValue::from_str(&authority) {
            map.insert(http::header::HOST, h);
        }
        let pq = if query.is_empty() {
            view.path.clone()
        } else {
            format!("{}?{}", view.path, String::from_utf8_lossy(&query))
        };
        let Ok(uri) = pq.parse::<Uri>() else {
            return text(
                StatusCode::BAD_REQUEST,
                "blocked: unparsable request target".into(),
            );
        };
        parts.uri = uri;
        parts.headers = map;
        parts.version = http::Version::HTTP_11;
        let upstream = Request::from_parts(parts, body.boxed());
        let sent = match guest_upgrade {
            Some(_) => self.forward_upgrade(upstream, target, &host, tls).await,
            None => self.forward(upstream, target, &host, tls, slot).await,
        };
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                self.event(
                    "http_response",
                    format!("502 for {host}: {e}"),
                    None,
                    tls,
                    json!({"host": host, "status": 502, "error": e, "duration_ms": started.elapsed().as_millis() as u64}),
                );
                return text(StatusCode::BAD_GATEWAY, format!("upstream {host}: {e}"));
            }
        };
        self.event(
            "http_response",
            format!("{} from {host}", resp.status().as_u16()),
            None,
            tls,
            json!({"host": host, "status": resp.status().as_u16(), "duration_ms": started.elapsed().as_millis() as u64}),
        );
        if let (Some(guest), StatusCode::SWITCHING_PROTOCOLS) = (guest_upgrade, resp.status()) {
            return self.tunnel(guest, &mut resp, &host, tls);
        }
        self.transform_response(resp, &view, &host, tls).await
    }

    /// The checks every request passes before anything is sent: the Host agrees with the SNI,
    /// is allowed, and agrees with the address the guest connected to (as matchlock's DNS told
    /// it), and that address passes the egress policy. Records the decision.
    fn gate(
        &self,
        host: &str,
        sni: Option<&str>,
        target: Target,
    ) -> Result<(), (StatusCode, String)> {
        let tls = sni.is_some();
        if let Some(sni) = sni {
            if normalize(sni) != host {
                return Err((
                    StatusCode::FORBIDDEN,
                    format!("Host {host} does not match the TLS server name {sni}"),
                ));
            }
        }
        if !self.allows(host) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("{host} is not on this sandbox's allow-list"),
            ));
        }
        if !self.names.agrees(host, IpAddr::V4(*target.visible.ip())) {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "{} is not an address matchlock resolved {host} to",
                    target.visible.ip()
                ),
            ));
        }
        (self.egress)(target.real.ip()).map_err(|why| (StatusCode::FORBIDDEN, why))?;
        self.event(
            "gate_decision",
            format!("gate allowed {host} by host_filter"),
            Some("host_filter"),
            tls,
            json!({"host": host, "allowed": true}),
        );
        Ok(())
    }

    /// Runs the `before` hook rules, then substitutes secrets (headers, Basic credentials and
    /// the query). Returns the request as the rules left it, its headers and its query; or the
    /// refusal to send the guest.
    #[allow(clippy::type_complexity)]
    async fn transform_request(
        &self,
        parts: &http::request::Parts,
        host: &str,
        tls: bool,
    ) -> Result<(RequestView, Vec<(String, Vec<u8>)>, Vec<u8>), Response<ProxyBody>> {
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
                return Err(self.refuse(host, tls, StatusCode::FORBIDDEN, reason));
            }
        }
        let mut headers: Vec<(String, Vec<u8>)> = view
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
            .collect();
        let mut query = view.query.as_bytes().to_vec();
        match self.secrets.apply_request(host, &mut headers, &mut query) {
            Ok(injected) => {
                if !injected.is_empty() {
                    // An upstream that echoes the value inside a compressed body would slip past
                    // the scrubber, which does not decode bodies (Content-Encoding is passed
                    // through untouched): ask for an uncompressed answer instead.
                    headers.retain(|(k, _)| !k.eq_ignore_ascii_case("accept-encoding"));
                }
                for name in injected {
                    self.event(
                        "request_transform",
                        format!("injected secret {name} for {host}"),
                        Some("secret_injector"),
                        tls,
                        json!({"action": "injected", "secret": name, "host": host}),
                    );
                }
            }
            Err(leak) => {
                return Err(self.refuse(host, tls, StatusCode::FORBIDDEN, leak.to_string()))
            }
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
        self.scrub_headers(&mut parts.headers);
        if !self.secrets.is_empty() {
            // The length may change with the substitution.
            parts.headers.remove(http::header::CONTENT_LENGTH);
        }
        let body = ScrubBody {
            inner: body,
            scrubber: self.secrets.scrubber(),
            done: false,
        };
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
            return self.refuse(host, tls, StatusCode::FORBIDDEN, reason);
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
        data = crate::rules::replace_all(&data, &edit.replacements);
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

    /// Real secret values in header values become placeholders again.
    fn scrub_headers(&self, headers: &mut HeaderMap) {
        for v in headers.values_mut() {
            let scrubbed = self.secrets.scrub(v.as_bytes());
            if scrubbed != v.as_bytes() {
                if let Ok(nv) = HeaderValue::from_bytes(&scrubbed) {
                    *v = nv;
                }
            }
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
        self.scrub_headers(&mut headers);
        *out.headers_mut() = headers;
        self.event(
            "http_response",
            format!("websocket to {host} open"),
            None,
            tls,
            json!({"host": host, "status": 101, "websocket": true}),
        );
        tokio::spawn(async move {
            let (Ok(g), Ok(u)) = tokio::join!(guest, upstream) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(g), &mut TokioIo::new(u)).await;
        });
        out
    }

    /// Sends an upgrade request on a fresh HTTP/1.1 connection of its own (an upgraded
    /// connection cannot be shared, and HTTP/2 upgrades differently).
    async fn forward_upgrade(
        &self,
        req: Request<ProxyBody>,
        target: Target,
        host: &str,
        tls: bool,
    ) -> Result<Response<Incoming>, String> {
        let mut up = self.connect_with(target, host, tls, true).await?;
        up.try_send(req).await.map_err(|(_, e)| e)
    }

    /// Sends a request upstream, on the guest connection's upstream connection when it is still
    /// usable, else on a new one (a request the old one could not take is resent, never lost).
    async fn forward(
        &self,
        req: Request<ProxyBody>,
        target: Target,
        host: &str,
        tls: bool,
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
        let mut up = self.connect(target, host, tls).await?;
        let resp = up.try_send(req).await.map_err(|(_, e)| e)?;
        *slot.lock().await = Some(up);
        Ok(resp)
    }

    async fn connect(&self, target: Target, host: &str, tls: bool) -> Result<Upstream, String> {
        self.connect_with(target, host, tls, false).await
    }

    /// A new upstream connection; `upgrade` asks for HTTP/1.1 with upgrades enabled.
    async fn connect_with(
        &self,
        target: Target,
        host: &str,
        tls: bool,
        upgrade: bool,
    ) -> Result<Upstream, String> {
        let tcp = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(target.real))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        if !tls {
            return h1(tcp).await;
        }
        let name =
            rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        let config = if upgrade {
            self.client_tls_h1.clone()
        } else {
            self.client_tls.clone()
        };
        let conn = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        if conn.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, c) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = c.await;
            });
            let authority = if target.visible.port() == 443 {
                host.to_string()
            } else {
                format!("{host}:{}", target.visible.port())
            };
            return Ok(Upstream::H2(sender, authority));
        }
        h1(NoCloseNotify(conn)).await
    }
}

/// An upstream TLS stream on which a connection closed without TLS `close_notify` is an end of
/// stream rather than an error. Many servers close that way after a response whose body ends
/// with the connection (no length, not chunked); as an error it would cut off the end of
/// every such body. Bodies with a length or chunked framing still detect truncation.
struct NoCloseNotify<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for NoCloseNotify<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NoCloseNotify<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The guest connection's upstream connection.
type UpstreamSlot = Arc<tokio::sync::Mutex<Option<Upstream>>>;

/// An upstream connection: HTTP/1.1, or HTTP/2 (with the authority its requests carry).
enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<ProxyBody>),
    H2(hyper::client::conn::http2::SendRequest<ProxyBody>, String),
}

impl Upstream {
    /// Sends `req`; on failure, gives the request back when it was never sent.
    async fn try_send(
        &mut self,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, (Option<Request<ProxyBody>>, String)> {
        match self {
            Upstream::H1(s) => s.try_send_request(req).await.map_err(|mut e| {
                let back = e.take_message();
                (back, e.into_error().to_string())
            }),
            Upstream::H2(s, authority) => {
                // HTTP/2 takes :scheme and :authority from an absolute URI, and no Host.
                let pq = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".into());
                match format!("https://{authority}{pq}").parse::<Uri>() {
                    Ok(u) => *req.uri_mut() = u,
                    Err(e) => return Err((None, e.to_string())),
                }
                *req.version_mut() = http::Version::HTTP_2;
                req.headers_mut().remove(http::header::HOST);
                s.try_send_request(req).await.map_err(|mut e| {
                    let back = e.take_message();
                    (back, e.into_error().to_string())
                })
            }
        }
    }
}

async fn h1<S>(io: S) -> Result<Upstream, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    // With upgrades, so a `101` hands the connection to the WebSocket tunnel; other responses
    // are unaffected.
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(Upstream::H1(sender))
}

/// Whether a request asks to become a WebSocket (HTTP/1.1 `Connection: upgrade` with
/// `Upgrade: websocket`). Other upgrades (`h2c`) are not forwarded.
fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has_token = |name: http::header::HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    req.version() == http::Version::HTTP_11
        && has_token(http::header::CONNECTION, "upgrade")
        && has_token(http::header::UPGRADE, "websocket")
}

/// An event stream with body replacements applied to the payload of each `data:` line only:
/// field names, `event:`/`id:`/`retry:` lines, comments, blank lines and line endings pass
/// byte for byte, and each line goes out as soon as it is complete (never the whole stream).
struct SseReplace {
    inner: ProxyBody,
    replacements: Vec<(String, String)>,
    /// The current, incomplete line.
    line: Vec<u8>,
    done: bool,
}

impl SseReplace {
    fn new(inner: ProxyBody, replacements: Vec<(String, String)>) -> SseReplace {
        SseReplace {
            inner,
            replacements,
            line: Vec::new(),
            done: false,
        }
    }

    /// One complete line (with its terminator, if any), rewritten.
    fn rewrite(&self, line: &[u8]) -> Vec<u8> {
        let body_end = line
            .iter()
            .rposition(|b| *b != b'\n' && *b != b'\r')
            .map_or(0, |i| i + 1);
        let (content, ending) = line.split_at(body_end);
        let Some(rest) = content.strip_prefix(b"data:") else {
            return line.to_vec();
        };
        // One optional space after the colon belongs to the field syntax, not the payload.
        let (space, payload) = match rest.strip_prefix(b" ") {
            Some(p) => (&b" "[..], p),
            None => (&b""[..], rest),
        };
        let mut out = b"data:".to_vec();
        out.extend_from_slice(space);
        out.extend_from_slice(&crate::rules::replace_all(payload, &self.replacements));
        out.extend_from_slice(ending);
        out
    }

    /// Splits off every complete line of the buffer, rewritten. A line that grows past
    /// [`MAX_SSE_LINE`] is passed on unchanged so far, to bound memory.
    fn drain_lines(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(i) = self.line.iter().position(|b| *b == b'\n') {
            let rest = self.line.split_off(i + 1);
            let line = std::mem::replace(&mut self.line, rest);
            out.extend_from_slice(&self.rewrite(&line));
        }
        if self.line.len() > MAX_SSE_LINE {
            out.append(&mut self.line);
        }
        out
    }
}

impl Body for SseReplace {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.line.extend_from_slice(&data);
                        let out = self.drain_lines();
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(None) => {
                    self.done = true;
                    let last = std::mem::take(&mut self.line);
                    if last.is_empty() {
                        return Poll::Ready(None);
                    }
                    let out = self.rewrite(&last);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                }
                other => return other,
            }
        }
    }
}

/// Serves the TLS handshake of a guest client that sends no `signature_algorithms` (TLS 1.2
/// clients that predate it or leave it out, such as busybox's built-in `wget` TLS): rustls
/// refuses those (RFC 5246 would have the server fall back to SHA-1 signatures), so they are
/// answered by OpenSSL, TLS 1.2 only, with the same leaf from the sandbox CA. Weaker suites
/// are acceptable here: this link runs between the guest and matchlock inside one host.
async fn legacy_tls<S>(leaf: &crate::ca::Leaf, io: S) -> Result<tokio_openssl::SslStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslVersion};
    let e = |e: openssl::error::ErrorStack| e.to_string();
    let mut b = SslAcceptor::mozilla_intermediate(SslMethod::tls_server()).map_err(e)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(e)?;
    b.set_max_proto_version(Some(SslVersion::TLS1_2))
        .map_err(e)?;
    // SHA-1 signatures (what a client without signature_algorithms accepts) need level 0.
    b.set_cipher_list(
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:\
         ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:\
         ECDHE-ECDSA-AES256-SHA:@SECLEVEL=0",
    )
    .map_err(e)?;
    let cert = openssl::x509::X509::from_der(&leaf.cert_der).map_err(e)?;
    let ca = openssl::x509::X509::from_der(&leaf.ca_der).map_err(e)?;
    let key = openssl::pkey::PKey::private_key_from_der(&leaf.key_der).map_err(e)?;
    b.set_certificate(&cert).map_err(e)?;
    b.set_private_key(&key).map_err(e)?;
    b.add_extra_chain_cert(ca).map_err(e)?;
    let acceptor = b.build();
    let ssl = Ssl::new(acceptor.context()).map_err(e)?;
    let mut stream = tokio_openssl::SslStream::new(ssl, io).map_err(e)?;
    Pin::new(&mut stream)
        .accept()
        .await
        .map_err(|err| err.to_string())?;
    Ok(stream)
}

fn server_tls(leaf: &crate::ca::Leaf) -> Result<rustls::ServerConfig, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = vec![
        CertificateDer::from(leaf.cert_der.clone()),
        CertificateDer::from(leaf.ca_der.clone()),
    ];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}
