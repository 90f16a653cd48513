//! What a guest's TCP flow speaks, from its first bytes, whatever the port: TLS (with the SNI of its
//! ClientHello), HTTP/1.x (with the Host header), the HTTP/2 prior-knowledge preface, or something
//! else (which interception refuses). Parsing is hand-written because only these few fields are
//! needed and every length must be bounds-checked against guest input.

/// The verdict on a flow's first bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// Not enough bytes yet to decide.
    NeedMore,
    /// A TLS ClientHello; `sni` is the server name, if the client sent one.
    Tls {
        /// The SNI host name.
        sni: Option<String>,
        /// The protocols offered with ALPN (`h2`, `http/1.1`, ...), in the client's order.
        alpn: Vec<String>,
        /// Whether it sent `signature_algorithms` (TLS 1.2 clients such as busybox's `wget`
        /// do not, and rustls cannot serve them).
        sigalgs: bool,
    },
    /// An HTTP/1.x request; `host` from the Host header (absent in HTTP/1.0 requests).
    Http1 {
        /// The Host header's value.
        host: Option<String>,
    },
    /// The HTTP/2 cleartext preface.
    Http2Preface,
    /// Anything else.
    Other,
}

/// Most bytes looked at before giving up on finding the end of HTTP headers.
pub const MAX_PEEK: usize = 16 * 1024;

const METHODS: &[&str] = &[
    "GET ", "POST ", "PUT ", "DELETE ", "HEAD ", "OPTIONS ", "PATCH ", "CONNECT ", "TRACE ",
];

/// Classifies the first bytes of a flow.
pub fn classify(buf: &[u8]) -> Flow {
    if buf.is_empty() {
        return Flow::NeedMore;
    }
    if buf[0] == 0x16 {
        return tls(buf);
    }
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    if PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())]) {
        return if buf.len() >= PREFACE.len() {
            Flow::Http2Preface
        } else {
            Flow::NeedMore
        };
    }
    let could_be_method = METHODS.iter().any(|m| {
        let n = buf.len().min(m.len());
        m.as_bytes()[..n] == buf[..n]
    });
    if !could_be_method {
        return Flow::Other;
    }
    http1(buf)
}

fn http1(buf: &[u8]) -> Flow {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() >= MAX_PEEK {
            Flow::Other
        } else {
            Flow::NeedMore
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..end]) else {
        return Flow::Other;
    };
    let mut lines = head.split("\r\n");
    let request = lines.next().unwrap_or("");
    let parts: Vec<&str> = request.split(' ').collect();
    if parts.len() != 3 || !parts[2].starts_with("HTTP/1.") {
        return Flow::Other;
    }
    let host = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.trim().to_string());
    Flow::Http1 { host }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads big-endian integers with bounds checks.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.buf.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2).map(|b| (b[0] as usize) << 8 | b[1] as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| (b[0] as usize) << 16 | (b[1] as usize) << 8 | b[2] as usize)
    }
}

fn tls(buf: &[u8]) -> Flow {
    // Record header: type(1)=22, version(2), length(2); the ClientHello must fit one record here.
    if buf.len() < 5 {
        return Flow::NeedMore;
    }
    if buf[1] != 3 {
        return Flow::Other;
    }
    let rec_len = (buf[3] as usize) << 8 | buf[4] as usize;
    if buf.len() < 5 + rec_len {
        return if 5 + rec_len > MAX_PEEK {
            Flow::Other
        } else {
            Flow::NeedMore
        };
    }
    match client_hello(&buf[5..5 + rec_len]) {
        Some(Hello { sni, alpn, sigalgs }) => Flow::Tls { sni, alpn, sigalgs },
        None => Flow::Other,
    }
}

/// What the classifier reads from a ClientHello.
struct Hello {
    sni: Option<String>,
    alpn: Vec<String>,
    sigalgs: bool,
}

/// The SNI (`None` when it has none), ALPN protocols and whether `signature_algorithms` is
/// present, of a ClientHello handshake message; `None` when the message is malformed.
fn client_hello(msg: &[u8]) -> Option<Hello> {
    let mut r = Reader { buf: msg, pos: 0 };
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let body = r.take(len)?;
    let mut r = Reader { buf: body, pos: 0 };
    r.take(2 + 32)?; // version, random
    let sid = r.u8()?;
    r.take(sid)?;
    let suites = r.u16()?;
    r.take(suites)?;
    let comp = r.u8()?;
    r.take(comp)?;
    let mut hello = Hello {
        sni: None,
        alpn: Vec::new(),
        sigalgs: false,
    };
    if r.pos == body.len() {
        return Some(hello); // no extensions
    }
    let ext_len = r.u16()?;
    let exts = r.take(ext_len)?;
    let mut r = Reader { buf: exts, pos: 0 };
    while r.pos < exts.len() {
        let kind = r.u16()?;
        let len = r.u16()?;
        let data = r.take(len)?;
        let mut s = Reader { buf: data, pos: 0 };
        match kind {
            0 if hello.sni.is_none() => {
                let list_len = s.u16()?;
                let list = s.take(list_len)?;
                let mut s = Reader { buf: list, pos: 0 };
                while s.pos < list.len() {
                    let name_type = s.u8()?;
                    let n = s.u16()?;
                    let name = s.take(n)?;
                    if name_type == 0 {
                        let name = std::str::from_utf8(name).ok()?;
                        hello.sni = Some(name.to_ascii_lowercase());
                        break;
                    }
                }
            }
            13 => hello.sigalgs = true,
            16 if hello.alpn.is_empty() => {
                let list_len = s.u16()?;
                let list = s.take(list_len)?;
                let mut s = Reader { buf: list, pos: 0 };
                while s.pos < list.len() {
                    let n = s.u8()?;
                    hello
                        .alpn
                        .push(String::from_utf8_lossy(s.take(n)?).into_owned());
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello with one SNI entry (and ALPN `h2`, `http/1.1`).
    fn hello(sni: &str) -> Vec<u8> {
        let mut ext = Vec::new();
        let protos = b"\x02h2\x08http/1.1";
        ext.extend_from_slice(&16u16.to_be_bytes());
        ext.extend_from_slice(&(protos.len() as u16 + 2).to_be_bytes());
        ext.extend_from_slice(&(protos.len() as u16).to_be_bytes());
        ext.extend_from_slice(protos);
        let name = sni.as_bytes();
        let mut list = vec![0u8];
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name);
        let mut sni_ext = (list.len() as u16).to_be_bytes().to_vec();
        sni_ext.extend_from_slice(&list);
        ext.extend_from_slice(&0u16.to_be_bytes());
        ext.extend_from_slice(&(sni_ext.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni_ext);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn tls_sni() {
        let h = hello("API.Example.com");
        assert_eq!(
            classify(&h),
            Flow::Tls {
                sni: Some("api.example.com".into()),
                alpn: vec!["h2".into(), "http/1.1".into()],
                sigalgs: false,
            }
        );
        assert_eq!(classify(&h[..20]), Flow::NeedMore);
        // Truncated inner lengths are malformed, never a panic.
        let mut bad = h.clone();
        bad[6] = 0xff; // handshake length beyond the record
        assert_eq!(classify(&bad), Flow::Other);
        for cut in 0..h.len() {
            let _ = classify(&h[..cut]);
        }
    }

    #[test]
    fn http() {
        assert_eq!(
            classify(b"GET /x HTTP/1.1\r\nHost: Example.com:8080\r\nAccept: */*\r\n\r\n"),
            Flow::Http1 {
                host: Some("Example.com:8080".into())
            }
        );
        assert_eq!(
            classify(b"GET /x HTTP/1.0\r\n\r\n"),
            Flow::Http1 { host: None }
        );
        assert_eq!(classify(b"POS"), Flow::NeedMore);
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a"), Flow::NeedMore);
        assert_eq!(
            classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Flow::Http2Preface
        );
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.0\r\n"), Flow::Other);
        assert_eq!(classify(b"GET nonsense\r\n\r\n"), Flow::Other);
        let mut long = b"GET / HTTP/1.1\r\n".to_vec();
        long.extend(std::iter::repeat_n(b'a', MAX_PEEK));
        assert_eq!(classify(&long), Flow::Other);
    }
}
