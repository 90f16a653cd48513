//! The bodies and streams the proxy wraps: a guest stream whose first bytes were already read,
//! response bodies with secrets scrubbed or event-stream lines rewritten, and the small HTTP
//! helpers around them.

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use matchlock_policy::secrets::Scrubber;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the proxy answers the guest with.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Longest SSE line that body rules rewrite; a longer one passes through unchanged in pieces
/// (an event stream is never buffered whole).
const MAX_SSE_LINE: usize = 1 << 20;

/// A stream whose first bytes were already read (to classify it).
pub struct Prefixed<S> {
    pub prefix: Vec<u8>,
    pub pos: usize,
    pub inner: S,
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

/// A plain-text answer from matchlock itself.
pub fn text(status: StatusCode, msg: String) -> Response<ProxyBody> {
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

pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        h.remove(*name);
    }
}

/// A response body with real secret values turned back into placeholders.
pub struct ScrubBody {
    pub inner: Incoming,
    pub scrubber: Scrubber,
    pub done: bool,
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

/// Whether a request asks to become a WebSocket (HTTP/1.1 `Connection: upgrade` with
/// `Upgrade: websocket`). Other upgrades (`h2c`) are not forwarded.
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
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
pub struct SseReplace {
    inner: ProxyBody,
    replacements: Vec<(String, String)>,
    /// The current, incomplete line.
    line: Vec<u8>,
    done: bool,
}

impl SseReplace {
    pub fn new(inner: ProxyBody, replacements: Vec<(String, String)>) -> SseReplace {
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
        out.extend_from_slice(&matchlock_policy::rules::replace_all(
            payload,
            &self.replacements,
        ));
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
