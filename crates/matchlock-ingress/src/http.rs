//! Small HTTP helpers of the gateway: its body type, plain-text answers, hop-by-hop headers and
//! the header shapes hooks see and send.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use matchlock_api::ingress::HookHeaders;
use std::collections::BTreeMap;

/// Errors a body can carry.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Every body the gateway sends.
pub type Body = BoxBody<Bytes, BoxError>;

/// A whole body.
pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A plain-text answer of the gateway's own (a line ending in a newline).
pub fn text(status: StatusCode, msg: impl std::fmt::Display) -> Response<Body> {
    let mut r = Response::new(full(format!("{msg}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Headers that describe one hop, never passed on (RFC 9110 §7.6.1), plus those the
/// `Connection` header names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

/// Whether a request asks to become a WebSocket.
pub fn is_websocket(h: &HeaderMap) -> bool {
    let has = |name, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has(CONNECTION, "upgrade") && has(http::header::UPGRADE, "websocket")
}

/// Headers as hooks see them: lowercase names, every value (values that are not text are left
/// out rather than mangled).
pub fn hook_headers(h: &HeaderMap) -> HookHeaders {
    let mut out: HookHeaders = BTreeMap::new();
    for (k, v) in h {
        if let Ok(v) = v.to_str() {
            out.entry(k.as_str().to_string())
                .or_default()
                .push(v.to_string());
        }
    }
    out
}

/// Applies a hook's header patch: a list sets (replacing), `null` deletes.
pub fn apply_patch(
    h: &mut HeaderMap,
    patch: &BTreeMap<String, Option<Vec<String>>>,
) -> Result<(), String> {
    for (k, v) in patch {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("'{}' is not a header name", k.escape_default()))?;
        h.remove(&name);
        for value in v.iter().flatten() {
            let value = HeaderValue::from_str(value)
                .map_err(|_| format!("the value of header '{k}' is not valid in HTTP"))?;
            h.append(name.clone(), value);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn websocket_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(!is_websocket(&h));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_websocket(&h));
    }

    #[test]
    fn patches_set_and_delete() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("1"));
        let mut p = BTreeMap::new();
        p.insert("x-a".to_string(), None);
        p.insert("x-b".to_string(), Some(vec!["2".into(), "3".into()]));
        apply_patch(&mut h, &p).unwrap();
        assert!(!h.contains_key("x-a"));
        assert_eq!(hook_headers(&h)["x-b"], vec!["2", "3"]);
        p.insert("bad name".to_string(), None);
        assert!(apply_patch(&mut h, &p).is_err());
        let mut p = BTreeMap::new();
        p.insert("x-c".to_string(), Some(vec!["a\nb".into()]));
        assert!(apply_patch(&mut h, &p).is_err());
    }
}
