//! The bodies and streams the proxy wraps: a guest stream whose first bytes were already read,
//! response bodies with secrets scrubbed or event-stream lines rewritten, and the small HTTP
//! helpers around them.

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming};
use matchlock_policy::plugins::usage::{Usage, UsageTap};
use matchlock_policy::secrets::{BodyGuard, Leak, Scrubber, Secrets};
use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Any error a body the proxy passes on may end with (hyper's own, or the proxy's reason for
/// cutting it short: a secret in a request body, a response it cannot decode to scrub).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the proxy sends either way: the guest's requests and its answers to the guest.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A guest request body checked by a [`BodyGuard`] as it streams: the first chunk that would
/// complete a secret headed where it may not go ends the body with an error instead (so the
/// request is aborted, never sent complete), and the leak is left in `leak` for the refusal.
pub struct GuardBody {
    pub inner: ProxyBody,
    pub guard: BodyGuard,
    pub leak: Arc<Mutex<Option<Leak>>>,
    pub done: bool,
}

impl Body for GuardBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => match self.guard.push(&data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out))))),
                        Err(leak) => {
                            self.done = true;
                            let msg = leak.to_string();
                            *self.leak.lock().unwrap_or_else(|p| p.into_inner()) = Some(leak);
                            return Poll::Ready(Some(Err(msg.into())));
                        }
                    },
                    // Trailers end the body: what was held back goes first, they are dropped
                    // (a guest's trailers are not forwarded when a secret is being watched).
                    Err(_) => {
                        self.done = true;
                        let rest = self.guard.finish();
                        return Poll::Ready(
                            (!rest.is_empty()).then(|| Ok(Frame::data(rest.into()))),
                        );
                    }
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    self.done = true;
                    let rest = self.guard.finish();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest.into()))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// What a [`TapBody`] does with the usage it read, once the body has ended.
pub type UsageDone = Box<dyn FnOnce(Option<Usage>) + Send + Sync>;

/// A response body passed on unchanged while a [`UsageTap`] reads it; when it ends, `done` gets
/// the usage it held (a body cut short reports nothing).
pub struct TapBody {
    pub inner: ProxyBody,
    pub tap: Option<UsageTap>,
    pub done: Option<UsageDone>,
}

impl Body for TapBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(tap)) = (frame.data_ref(), self.tap.as_mut()) {
                    tap.push(data);
                }
                // The last frame of a body with a known end: the usage is read before the frame
                // goes on, so a client that has the whole answer and sends its next call at once
                // finds it already counted (the budget gate would let that call through if the
                // usage were read only when the body is polled again or dropped).
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None) => self.finish(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl TapBody {
    /// Hands the usage read to `done`, once.
    fn finish(&mut self) {
        if let (Some(tap), Some(done)) = (self.tap.take(), self.done.take()) {
            done(tap.finish());
        }
    }
}

impl Drop for TapBody {
    /// A body with a known length is dropped once it is written, without its end being polled:
    /// the usage is read then. (A body cut short holds no complete answer to read.)
    fn drop(&mut self) {
        self.finish();
    }
}

/// The content codings the proxy can undo to scrub a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
}

impl Coding {
    /// The coding a `Content-Encoding` value names; `Err` with the value for any coding (or
    /// chain of codings) the proxy cannot decode.
    pub fn parse(value: &[u8]) -> Result<Option<Coding>, String> {
        let v = String::from_utf8_lossy(value).trim().to_ascii_lowercase();
        match v.as_str() {
            "" | "identity" => Ok(None),
            "gzip" | "x-gzip" => Ok(Some(Coding::Gzip)),
            "deflate" => Ok(Some(Coding::Deflate)),
            _ => Err(v),
        }
    }
}

/// A streaming decoder for a [`Coding`]: compressed chunks in, plain bytes out as they come
/// (never the whole body at once, so a small bomb cannot fill the host's memory).
enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
}

impl Decoder {
    fn new(c: Coding) -> Decoder {
        match c {
            Coding::Gzip => Decoder::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
            Coding::Deflate => Decoder::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
        }
    }

    fn push(&mut self, chunk: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Decoder::Gzip(d) => {
                d.write_all(chunk)?;
                Ok(std::mem::take(d.get_mut()))
            }
            Decoder::Deflate(d) => {
                d.write_all(chunk)?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            Decoder::Gzip(d) => {
                d.try_finish()?;
                Ok(std::mem::take(d.get_mut()))
            }
            Decoder::Deflate(d) => {
                d.try_finish()?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }
}

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
    inner: Incoming,
    scrubber: Scrubber,
    /// Scrubs trailers (HTTP/2, chunked HTTP/1.1) as header values.
    secrets: Arc<Secrets>,
    /// Undoes the body's content coding first (the response then goes out plain).
    decoder: Option<Decoder>,
    /// Trailers held while the scrubber's held-back bytes go out first.
    trailers: Option<HeaderMap>,
    done: bool,
}

impl ScrubBody {
    /// Scrubs `inner`, decoding `coding` on the way.
    pub fn new(inner: Incoming, secrets: Arc<Secrets>, coding: Option<Coding>) -> ScrubBody {
        ScrubBody {
            inner,
            scrubber: secrets.scrubber(),
            secrets,
            decoder: coding.map(Decoder::new),
            trailers: None,
            done: false,
        }
    }
}

/// A body that cannot be decoded is cut off with an error (the guest sees an aborted
/// response, never a complete-looking one).
fn undecodable(e: std::io::Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
    Poll::Ready(Some(Err(format!(
        "the upstream's compressed body is corrupt: {e}"
    )
    .into())))
}

impl Body for ScrubBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(t) = self.trailers.take() {
            self.done = true;
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let plain = match &mut self.decoder {
                            Some(d) => match d.push(&data) {
                                Ok(p) => p,
                                Err(e) => {
                                    self.done = true;
                                    return undecodable(e);
                                }
                            },
                            None => data.to_vec(),
                        };
                        let out = self.scrubber.push(&plain);
                        if out.is_empty() {
                            continue;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(mut trailers) => {
                            // Trailers end the body: the scrubber's held-back bytes (which can
                            // complete nothing now) go out first, the scrubbed trailers next.
                            scrub_header_values(&self.secrets, &mut trailers);
                            let rest = self.scrubber.finish();
                            if rest.is_empty() {
                                self.done = true;
                                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                            }
                            self.trailers = Some(trailers);
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                        }
                        Err(_) => continue,
                    },
                },
                Poll::Ready(None) => {
                    self.done = true;
                    let mut rest = match &mut self.decoder {
                        Some(d) => match d.finish() {
                            Ok(p) => self.scrubber.push(&p),
                            Err(e) => return undecodable(e),
                        },
                        None => Vec::new(),
                    };
                    rest.extend(self.scrubber.finish());
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Real secret values in header values (response headers, trailers) become placeholders again.
pub fn scrub_header_values(secrets: &Secrets, headers: &mut HeaderMap) {
    for v in headers.values_mut() {
        let scrubbed = secrets.scrub(v.as_bytes());
        if scrubbed != v.as_bytes() {
            *v = HeaderValue::from_bytes(&scrubbed)
                .unwrap_or_else(|_| HeaderValue::from_static("<scrubbed>"));
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
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn the_usage_is_read_before_the_last_frame_goes_on() {
        let answer = r#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":5}}"#;
        let seen = Arc::new(AtomicBool::new(false));
        let done_seen = seen.clone();
        let mut tapped = TapBody {
            inner: http_body_util::Full::new(Bytes::from(answer))
                .map_err(|never| match never {})
                .boxed(),
            tap: Some(UsageTap::new("application/json")),
            done: Some(Box::new(move |usage| {
                assert_eq!(usage.map(|u| u.output_tokens), Some(5));
                done_seen.store(true, Ordering::SeqCst);
            })),
        };
        let frame = tapped.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), answer.as_bytes());
        assert!(
            seen.load(Ordering::SeqCst),
            "counted before the client could have the whole answer"
        );
    }
}
