//! Following HTTP redirects on the host (`--follow-redirects`, RPC `network.follow_redirects`).
//!
//! A `GET` or `HEAD` answered with 301, 302, 303, 307 or 308 and a `Location` is sent again,
//! by the proxy, to where it points, as long as every hop would have been allowed had the guest
//! asked for it: the new host is on the allow-list, the host resolves it itself (the guest never
//! looked it up) to an address the address rule lets through, and the request is rebuilt from
//! the guest's own (with placeholders), so hook rules run again and a secret goes only to its
//! own hosts. HTTPS is never followed down to plain HTTP. At the first hop that cannot be
//! followed, the guest gets that hop's redirect as is; after [`MAX_HOPS`], the last one.

use super::{header_map, request_target, strip_hop_by_hop, upstream, Proxy, ProxyBody};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use matchlock_policy::events::Event;
use matchlock_policy::hosts::normalize;
use matchlock_policy::rules::RequestView;
use serde_json::json;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

/// Most redirects followed for one request (browsers allow about 20; curl's default is 50).
pub const MAX_HOPS: usize = 10;

/// Resolves a host name on the host side for a redirect.
pub type Resolver = Arc<
    dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<IpAddr, String>> + Send>> + Send + Sync,
>;

/// Where a `Location` points from a request to `authority` + `path` (`tls`: over HTTPS):
/// (HTTPS?, authority, path and query). `None` for what is not an http(s) URL.
pub fn resolve(
    tls: bool,
    authority: &str,
    path: &str,
    location: &str,
) -> Option<(bool, String, String)> {
    let location = location.split('#').next().unwrap_or("").trim();
    if location.is_empty() || location.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return None;
    }
    let absolute = |tls: bool, rest: &str| -> Option<(bool, String, String)> {
        let (auth, p) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if auth.is_empty() || auth.contains('@') {
            return None;
        }
        let p = if p.starts_with('?') {
            format!("/{p}")
        } else {
            p.to_string()
        };
        Some((tls, auth.to_ascii_lowercase(), p))
    };
    let lower = location.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return absolute(true, &location[8..]);
    }
    if lower.starts_with("http://") {
        return absolute(false, &location[7..]);
    }
    if lower.contains(':') && !lower.starts_with('/') && !lower.starts_with('?') {
        // Another scheme (`ftp:`, `javascript:`), or nonsense.
        let scheme_like = lower.split(':').next().unwrap_or("");
        if scheme_like
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        {
            return None;
        }
    }
    if let Some(rest) = location.strip_prefix("//") {
        return absolute(tls, rest);
    }
    let path_only = path.split('?').next().unwrap_or("/");
    let target = if location.starts_with('/') {
        location.to_string()
    } else if location.starts_with('?') {
        format!("{path_only}{location}")
    } else {
        let dir = &path_only[..path_only.rfind('/').map_or(0, |i| i + 1)];
        format!("{}{location}", if dir.is_empty() { "/" } else { dir })
    };
    Some((tls, authority.to_string(), target))
}

fn is_redirect(s: StatusCode) -> bool {
    matches!(s.as_u16(), 301 | 302 | 303 | 307 | 308)
}

/// The port of `authority`, or the scheme's.
fn port_of(authority: &str, tls: bool) -> Option<u16> {
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => p.parse().ok(),
        _ => Some(if tls { 443 } else { 80 }),
    }
}

/// The guest's own request line and headers, kept to be sent again elsewhere.
pub struct GuestRequest {
    /// Method.
    pub method: Method,
    /// Headers as the guest sent them (placeholders, not values).
    pub headers: http::HeaderMap,
}

impl GuestRequest {
    /// Whether a request may be followed at all: `GET` or `HEAD`, not an upgrade.
    pub fn followable(method: &Method, websocket: bool) -> bool {
        !websocket && (method == Method::GET || method == Method::HEAD)
    }
}

/// A hop's state: where the last request went.
pub struct Hop {
    /// Over HTTPS.
    pub tls: bool,
    /// `Host` as sent.
    pub authority: String,
    /// Normalised host.
    pub host: String,
    /// Path and query as sent.
    pub path: String,
    /// The view hook rules saw.
    pub view: RequestView,
}

impl Proxy {
    /// Follows `resp` while it is a redirect that may be followed; the final response and the
    /// hop it came from.
    pub(super) async fn follow(
        &self,
        guest: &GuestRequest,
        mut resp: Response<Incoming>,
        mut hop: Hop,
    ) -> (Response<Incoming>, Hop) {
        let Some(resolver) = self.redirects.clone() else {
            return (resp, hop);
        };
        for _ in 0..MAX_HOPS {
            if !is_redirect(resp.status()) {
                break;
            }
            let Some(location) = resp
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
            else {
                break;
            };
            let Some((tls, authority, path)) =
                resolve(hop.tls, &hop.authority, &hop.path, location)
            else {
                break;
            };
            // Never from HTTPS down to plain HTTP.
            if hop.tls && !tls {
                break;
            }
            let host = normalize(&authority);
            let Some(port) = port_of(&authority, tls) else {
                break;
            };
            if !self.policy.allows_host(&host) {
                break;
            }
            let ip = match resolver(host.clone()).await {
                Ok(ip) => ip,
                Err(e) => {
                    tracing::info!("redirect to {host}: {e}");
                    break;
                }
            };
            let allowed = match self
                .policy
                .redirect(&host, std::net::SocketAddr::new(ip, port))
            {
                Ok(a) => a,
                Err(denial) => {
                    self.emit(&denial.event(), tls);
                    break;
                }
            };
            // The guest's request again, for the new target: a 303 becomes a GET.
            let method = if resp.status() == StatusCode::SEE_OTHER {
                Method::GET
            } else {
                guest.method.clone()
            };
            let Ok(mut req) = Request::builder()
                .method(method)
                .uri(path.as_str())
                .body(())
            else {
                break;
            };
            *req.headers_mut() = guest.headers.clone();
            let (parts, ()) = req.into_parts();
            let (view, headers, query) = match self.transform_request(&parts, &host, tls).await {
                Ok(t) => t,
                Err(denial) => {
                    self.emit(&denial.event(), tls);
                    break;
                }
            };
            let mut map = header_map(headers);
            strip_hop_by_hop(&mut map);
            map.remove(http::header::CONTENT_LENGTH);
            if let Ok(h) = HeaderValue::from_str(&authority) {
                map.insert(http::header::HOST, h);
            }
            let Some(uri) = request_target(&view.path, &query) else {
                break;
            };
            let empty: ProxyBody = Empty::new().map_err(|never| match never {}).boxed();
            let mut next = Request::new(empty);
            *next.method_mut() = parts.method.clone();
            *next.uri_mut() = uri;
            *next.headers_mut() = map;
            let config = tls.then(|| self.client_tls.clone());
            let sent = match upstream::connect(&allowed, config, port).await {
                Ok(mut up) => up.try_send(next).await.map_err(|(_, e)| e),
                Err(e) => Err(e),
            };
            let Ok(r) = sent else {
                break;
            };
            self.emit(
                &Event {
                    kind: "http_redirect",
                    summary: format!(
                        "followed {} from {}{} to {host}{path}",
                        resp.status().as_u16(),
                        hop.host,
                        hop.path
                    ),
                    plugin: None,
                    data: json!({"status": resp.status().as_u16(), "from": hop.host, "to": host, "path": path}),
                },
                tls,
            );
            resp = r;
            hop = Hop {
                tls,
                authority,
                host,
                path,
                view,
            };
        }
        (resp, hop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve_like_a_browser_would() {
        let r = |loc: &str| resolve(true, "a.test", "/dir/page?x=1", loc);
        assert_eq!(
            r("https://B.test/p?q"),
            Some((true, "b.test".into(), "/p?q".into()))
        );
        assert_eq!(
            r("http://b.test"),
            Some((false, "b.test".into(), "/".into()))
        );
        assert_eq!(
            r("//c.test:8443/x"),
            Some((true, "c.test:8443".into(), "/x".into()))
        );
        assert_eq!(r("/abs#frag"), Some((true, "a.test".into(), "/abs".into())));
        assert_eq!(r("rel"), Some((true, "a.test".into(), "/dir/rel".into())));
        assert_eq!(
            r("?y=2"),
            Some((true, "a.test".into(), "/dir/page?y=2".into()))
        );
        assert_eq!(
            r("https://b.test?q"),
            Some((true, "b.test".into(), "/?q".into()))
        );
        for bad in [
            "",
            "javascript:alert(1)",
            "ftp://x/y",
            "https://",
            "https://u@b.test/",
            "a b",
        ] {
            assert_eq!(r(bad), None, "{bad:?}");
        }
        assert_eq!(port_of("b.test", true), Some(443));
        assert_eq!(port_of("b.test:8080", false), Some(8080));
        assert_eq!(port_of("b.test:x", false), None);
    }
}
