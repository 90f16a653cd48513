//! The interception proxy: serves one guest TCP connection that the network stack handed over.
//! It decides what the flow speaks from its first bytes (whatever the port); TLS is terminated with
//! a leaf certificate from the sandbox CA (ALPN h2 and http/1.1), plain HTTP/1 is read as is, and
//! anything else is closed. Each request is then checked (allow-list on the Host, which must agree
//! with the SNI and with the address the guest connected to), gets its secrets substituted, and is
//! sent upstream over a fresh connection to the checked address (HTTPS verified against the system
//! roots plus `MATCHLOCK_UPSTREAM_CA`). Responses come back with real secret values turned back into
//! placeholders. Blocked requests get a 403 that says why.

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
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Largest response body that `after` body rules buffer.
const MAX_EDITED_BODY: usize = 16 << 20;

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
    events: Option<Arc<EventLog>>,
    rules: Rules,
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
        Proxy {
            rules,
            allow: RwLock::new(allow),
            secrets,
            ca,
            names,
            egress,
            client_tls: Arc::new(client_tls),
            events,
        }
    }

    fn event(
        &self,
        kind: &str,
        summary: String,
        plugin: Option<&str>,
        tls: bool,
        data: serde_json::Value,
    ) {
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
        self.allow.read().unwrap().allows(host)
    }

    /// The guest-visible names-to-addresses table.
    pub fn names(&self) -> &Arc<NameTable> {
        &self.names
    }

    /// Adds hosts to the allow-list; returns those that were new.
    pub fn allow_add(&self, hosts: &[String]) -> Result<Vec<String>, String> {
        self.allow.write().unwrap().add(hosts)
    }

    /// Removes hosts from the allow-list; returns those that were present.
    pub fn allow_remove(&self, hosts: &[String]) -> Vec<String> {
        self.allow.write().unwrap().remove(hosts)
    }

    /// The allow-list now.
    pub fn allowed(&self) -> Vec<String> {
        self.allow.read().unwrap().patterns()
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
            Flow::Http1 { .. } => self.serve_http(io, target, None).await,
            Flow::Tls { sni } => {
                let name = sni
                    .clone()
                    .unwrap_or_else(|| target.visible.ip().to_string());
                let Ok(leaf) = self.ca.leaf(&name) else {
                    return;
                };
                let Ok(cfg) = server_tls(&leaf) else { return };
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
                if let Ok(tls) = acceptor.accept(io).await {
                    self.serve_http(tls, target, Some(name)).await;
                }
            }
            // Non-HTTP protocols (and h2c) are refused: closing is all the guest gets.
            _ => {}
        }
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
            .serve_connection(TokioIo::new(io), service)
            .await;
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
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
        if let Some(sni) = &sni {
            if normalize(sni) != host {
                return self.refuse(
                    &host,
                    tls,
                    StatusCode::FORBIDDEN,
                    format!("Host {host} does not match the TLS server name {sni}"),
                );
            }
        }
        if !self.allows(&host) {
            return self.refuse(
                &host,
                tls,
                StatusCode::FORBIDDEN,
                format!("{host} is not on this sandbox's allow-list"),
            );
        }
        if !self.names.agrees(&host, IpAddr::V4(*target.visible.ip())) {
            let reason = format!(
                "{} is not an address matchlock resolved {host} to",
                target.visible.ip()
            );
            return self.refuse(&host, tls, StatusCode::FORBIDDEN, reason);
        }
        if let Err(why) = (self.egress)(target.real.ip()) {
            return self.refuse(&host, tls, StatusCode::FORBIDDEN, why);
        }
        self.event(
            "gate_decision",
            format!("gate allowed {host} by host_filter"),
            Some("host_filter"),
            tls,
            json!({"host": host, "allowed": true}),
        );
        let method = req.method().to_string();
        let started = std::time::Instant::now();
        self.event(
            "http_request",
            format!("{method} {host}{}", req.uri().path()),
            None,
            tls,
            json!({"method": method, "host": host, "path": req.uri().path()}),
        );
        let (mut parts, body) = req.into_parts();
        // Hook rules see (and may change) the request before secrets are substituted.
        let mut view = RequestView {
            host: host.clone(),
            method: method.clone(),
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
                return self.refuse(&host, tls, StatusCode::FORBIDDEN, reason);
            }
        }
        // Secrets: header values and the query, then rebuilt.
        let mut headers: Vec<(String, Vec<u8>)> = view
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
            .collect();
        let path = view.path.clone();
        let mut query = view.query.as_bytes().to_vec();
        match self.secrets.apply_request(&host, &mut headers, &mut query) {
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
            Err(leak) => return self.refuse(&host, tls, StatusCode::FORBIDDEN, leak.to_string()),
        }
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_bytes(&v),
            ) {
                map.append(k, v);
            }
        }
        strip_hop_by_hop(&mut map);
        if let Ok(h) = HeaderValue::from_str(&authority) {
            map.insert(http::header::HOST, h);
        }
        let pq = if query.is_empty() {
            path
        } else {
            format!("{path}?{}", String::from_utf8_lossy(&query))
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
        match self
            .forward(upstream, target, &host, sni.is_some(), slot)
            .await
        {
            Ok(resp) => {
                self.event(
                    "http_response",
                    format!("{} from {host}", resp.status().as_u16()),
                    None,
                    tls,
                    json!({"host": host, "status": resp.status().as_u16(), "duration_ms": started.elapsed().as_millis() as u64}),
                );
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                for v in parts.headers.values_mut() {
                    let scrubbed = self.secrets.scrub(v.as_bytes());
                    if scrubbed != v.as_bytes() {
                        if let Ok(nv) = HeaderValue::from_bytes(&scrubbed) {
                            *v = nv;
                        }
                    }
                }
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
                    .after(&view, parts.status.as_u16(), &resp_headers)
                    .await;
                if let Some(reason) = edit.block {
                    return self.refuse(&host, tls, StatusCode::FORBIDDEN, reason);
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
                // Body edits need the whole body (bounded); a streaming (SSE) answer that never
                // ends is cut at the bound.
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
            Err(e) => {
                self.event(
                    "http_response",
                    format!("502 for {host}: {e}"),
                    None,
                    tls,
                    json!({"host": host, "status": 502, "error": e, "duration_ms": started.elapsed().as_millis() as u64}),
                );
                text(StatusCode::BAD_GATEWAY, format!("upstream {host}: {e}"))
            }
        }
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
        let conn = tokio_rustls::TlsConnector::from(self.client_tls.clone())
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
        h1(conn).await
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
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Upstream::H1(sender))
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
