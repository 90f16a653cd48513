//! Upstream connections: opened only for an [`Allowed`] decision, HTTP/1.1 or HTTP/2 as the
//! server's ALPN says, kept per guest connection and reused while they last.

use super::body::ProxyBody;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use matchlock_policy::Allowed;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long an upstream connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// A new upstream connection for `allowed` (an HTTP request's decision, which names the host):
/// TLS verified against `tls` when the guest spoke TLS, and the port the guest used for the
/// HTTP/2 authority.
pub async fn connect(
    allowed: &Allowed,
    tls: Option<Arc<rustls::ClientConfig>>,
    port: u16,
) -> Result<Upstream, String> {
    let tcp = crate::connect::tcp(allowed, CONNECT_TIMEOUT)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let Some(config) = tls else {
        return h1(tcp).await;
    };
    let host = allowed.host().unwrap_or_default().to_string();
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
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
        let authority = if port == 443 {
            host
        } else {
            format!("{host}:{port}")
        };
        return Ok(Upstream::H2(sender, authority));
    }
    h1(NoCloseNotify(conn)).await
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
pub type UpstreamSlot = Arc<tokio::sync::Mutex<Option<Upstream>>>;

/// An upstream connection: HTTP/1.1, or HTTP/2 (with the authority its requests carry).
pub enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<ProxyBody>),
    H2(hyper::client::conn::http2::SendRequest<ProxyBody>, String),
}

impl Upstream {
    /// Sends `req`; on failure, gives the request back when it was never sent.
    pub async fn try_send(
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
