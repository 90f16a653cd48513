//! The ingress gateway's vocabulary: routes (as the CLI, the RPC server, the SDK and the routes file
//! in the guest spell them), the `enable_ingress` parameters, and the hook calls the gateway makes
//! over the SDK's callback socket.
//!
//! The routes file is the single source of truth: `set_ingress_routes` and `matchlock ingress
//! --route` write it, and the gateway rereads it (at most once a second, only while requests come),
//! so a program in the guest can publish its own routes by writing it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where the routes live in the guest.
pub const ROUTES_FILE: &str = "/etc/matchlock/ingress-routes";

/// Largest routes file the gateway reads; a bigger one is ignored (with a warning) rather than
/// making the host buffer what the guest wrote.
pub const MAX_ROUTES_FILE: usize = 64 << 10;

/// Most routes in a table.
pub const MAX_ROUTES: usize = 256;

/// Default cap on a response body buffered for a `response` hook.
pub const DEFAULT_MAX_BUFFERED_RESPONSE: u64 = 2 << 20;

/// Default time the guest server has to send its response headers.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 60_000;

/// One route: requests whose path is `prefix` or lies beneath it go to `port` on the guest's
/// loopback; the longest matching prefix wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressRoute {
    /// Path prefix, starting with `/`; it matches whole segments (`/api` matches `/api` and
    /// `/api/x`, not `/apix`).
    pub prefix: String,
    /// Guest port.
    pub port: u16,
    /// Remove the prefix before the request reaches the guest (`/api/x` becomes `/x`).
    #[serde(default)]
    pub strip_prefix: bool,
}

impl IngressRoute {
    /// Checks the route; the reason is one line that names it.
    pub fn validate(&self) -> Result<(), String> {
        if !self.prefix.starts_with('/') {
            return Err(format!(
                "route prefix '{}' must start with '/'",
                self.prefix
            ));
        }
        if self.prefix.len() > 1024
            || self
                .prefix
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'?' || b == b'#')
        {
            return Err(format!(
                "route prefix '{}' must be a URL path of at most 1024 characters, without spaces, '?' or '#'",
                self.prefix.escape_default()
            ));
        }
        if self.port == 0 {
            return Err(format!(
                "route '{}' needs a port from 1 to 65535",
                self.prefix
            ));
        }
        Ok(())
    }

    /// Whether `path` is this route's prefix or lies beneath it.
    pub fn matches(&self, path: &str) -> bool {
        let p = self.prefix.trim_end_matches('/');
        match path.strip_prefix(p) {
            Some(rest) => rest.is_empty() || rest.starts_with('/') || p.is_empty(),
            None => false,
        }
    }

    /// The path the guest sees for `path` (which [`IngressRoute::matches`]).
    pub fn backend_path(&self, path: &str) -> String {
        if !self.strip_prefix {
            return path.to_string();
        }
        let rest = path
            .strip_prefix(self.prefix.trim_end_matches('/'))
            .unwrap_or(path);
        if rest.starts_with('/') {
            rest.to_string()
        } else {
            format!("/{rest}")
        }
    }
}

impl std::str::FromStr for IngressRoute {
    type Err = String;

    /// The CLI form: `PREFIX=PORT[,strip]`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (prefix, rest) = s.split_once('=').ok_or_else(|| {
            format!("route '{s}' must look like PREFIX=PORT[,strip], e.g. /api=8000,strip")
        })?;
        let (port, opts) = match rest.split_once(',') {
            Some((p, o)) => (p, Some(o)),
            None => (rest, None),
        };
        let strip_prefix = match opts {
            None => false,
            Some("strip") => true,
            Some(o) => {
                return Err(format!(
                    "route '{s}': unknown option '{o}' (the only one is 'strip')"
                ))
            }
        };
        let port = port
            .trim()
            .parse::<u16>()
            .map_err(|_| format!("route '{s}': port '{port}' is not a number from 1 to 65535"))?;
        let route = IngressRoute {
            prefix: prefix.trim().to_string(),
            port,
            strip_prefix,
        };
        route.validate()?;
        Ok(route)
    }
}

/// Checks a whole table: each route, their number, and no prefix twice.
pub fn validate_routes(routes: &[IngressRoute]) -> Result<(), String> {
    if routes.len() > MAX_ROUTES {
        return Err(format!("{} routes; at most {MAX_ROUTES}", routes.len()));
    }
    for (i, r) in routes.iter().enumerate() {
        r.validate()?;
        if routes[..i].iter().any(|o| o.prefix == r.prefix) {
            return Err(format!("route prefix '{}' is given twice", r.prefix));
        }
    }
    Ok(())
}

/// The route for `path`: the longest matching prefix.
pub fn best_route<'a>(routes: &'a [IngressRoute], path: &str) -> Option<&'a IngressRoute> {
    routes
        .iter()
        .filter(|r| r.matches(path))
        .max_by_key(|r| r.prefix.trim_end_matches('/').len())
}

/// Parses the routes file: one route a line, `PREFIX :PORT [strip]`, `#` starts a comment.
/// Gondolin's `strip_prefix=true|false` is accepted too. A bad line is skipped and described in
/// the second list (the guest wrote the file; one typo must not take every route down).
pub fn parse_routes_file(text: &str) -> (Vec<IngressRoute>, Vec<String>) {
    let mut routes: Vec<IngressRoute> = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(r) if routes.iter().any(|o| o.prefix == r.prefix) => problems.push(format!(
                "line {}: prefix '{}' given twice; the first wins",
                n + 1,
                r.prefix
            )),
            Ok(_) if routes.len() >= MAX_ROUTES => {
                problems.push(format!("line {}: more than {MAX_ROUTES} routes", n + 1));
                break;
            }
            Ok(r) => routes.push(r),
            Err(e) => problems.push(format!("line {}: {e}", n + 1)),
        }
    }
    (routes, problems)
}

fn parse_line(line: &str) -> Result<IngressRoute, String> {
    let mut words = line.split_whitespace();
    let prefix = words.next().unwrap_or_default();
    let port = words
        .next()
        .ok_or_else(|| format!("'{line}' needs a port: PREFIX :PORT [strip]"))?;
    let port = port
        .strip_prefix(':')
        .unwrap_or(port)
        .parse::<u16>()
        .map_err(|_| format!("port '{port}' is not a number from 1 to 65535"))?;
    let mut strip_prefix = false;
    for w in words {
        strip_prefix = match w {
            "strip" | "strip_prefix=true" => true,
            "strip_prefix=false" => false,
            other => {
                return Err(format!(
                    "unknown option '{other}' (the only one is 'strip')"
                ))
            }
        };
    }
    let route = IngressRoute {
        prefix: prefix.to_string(),
        port,
        strip_prefix,
    };
    route.validate()?;
    Ok(route)
}

/// Writes a table in the routes file's format.
pub fn format_routes_file(routes: &[IngressRoute]) -> String {
    let mut out = String::from(
        "# Matchlock ingress routes: PREFIX :PORT [strip]; the longest matching prefix wins.\n",
    );
    for r in routes {
        out.push_str(&format!(
            "{} :{}{}\n",
            r.prefix,
            r.port,
            if r.strip_prefix { " strip" } else { "" }
        ));
    }
    out
}

/// Parameters of the RPC method `enable_ingress` (and the CLI's `matchlock ingress`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IngressParams {
    /// Host address to listen on; loopback unless the caller asks otherwise.
    pub listen: String,
    /// Routes to write to the routes file first; absent keeps the guest's own file.
    pub routes: Option<Vec<IngressRoute>>,
    /// Pass WebSocket upgrades through (default true).
    pub allow_websockets: bool,
    /// Buffer every response body for the `response` hook.
    pub buffer_response_body: bool,
    /// Cap on a buffered response body (bytes).
    pub max_buffered_response_bytes: u64,
    /// Time the guest server has to send its response headers (ms).
    pub header_timeout_ms: u64,
    /// The SDK's callback socket, when any hook is set.
    pub callback_socket: String,
    /// Hook phases the SDK answers: `allow`, `request`, `response`.
    pub hooks: Vec<String>,
    /// Deadline of one hook call (ms; 0: the callbacks' default).
    pub hook_timeout_ms: u64,
}

impl Default for IngressParams {
    fn default() -> Self {
        IngressParams {
            listen: "127.0.0.1:0".into(),
            routes: None,
            allow_websockets: true,
            buffer_response_body: false,
            max_buffered_response_bytes: DEFAULT_MAX_BUFFERED_RESPONSE,
            header_timeout_ms: DEFAULT_HEADER_TIMEOUT_MS,
            callback_socket: String::new(),
            hooks: Vec::new(),
            hook_timeout_ms: 0,
        }
    }
}

/// The phases a hook can run in.
pub const HOOK_PHASES: [&str; 3] = ["allow", "request", "response"];

impl IngressParams {
    /// Checks everything but whether the address can be bound.
    pub fn validate(&self) -> Result<(), String> {
        self.listen.parse::<std::net::SocketAddr>().map_err(|_| {
            format!(
                "listen address '{}' must be IP:PORT, e.g. 127.0.0.1:0",
                self.listen
            )
        })?;
        if let Some(r) = &self.routes {
            validate_routes(r)?;
        }
        for h in &self.hooks {
            if !HOOK_PHASES.contains(&h.as_str()) {
                return Err(format!(
                    "unknown ingress hook '{h}'; the hooks are allow, request and response"
                ));
            }
        }
        if !self.hooks.is_empty() && self.callback_socket.is_empty() {
            return Err("ingress hooks need a callback_socket".into());
        }
        if self.max_buffered_response_bytes == 0 || self.max_buffered_response_bytes > 1 << 30 {
            return Err("max_buffered_response_bytes must be from 1 byte to 1 GiB".into());
        }
        if self.header_timeout_ms == 0 {
            return Err("header_timeout_ms must be above 0".into());
        }
        Ok(())
    }
}

/// Headers as the hooks see them: canonical names, every value.
pub type HookHeaders = BTreeMap<String, Vec<String>>;

/// What the gateway sends a hook (one JSON line on the callback socket).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IngressHookCall {
    /// Always `ingress`, so one socket can serve network hooks too.
    pub callback_id: String,
    /// `allow`, `request` or `response`.
    pub phase: String,
    /// The client's address.
    pub client_ip: String,
    /// Method.
    pub method: String,
    /// The path and query the client asked for.
    pub path: String,
    /// The route that matched.
    pub route: Option<IngressRoute>,
    /// The path and query the guest will be (or was) asked for.
    pub backend_target: String,
    /// The request's headers (as they go to the guest, in the `response` phase).
    pub request_headers: HookHeaders,
    /// The guest's status (`response` phase).
    pub status: u16,
    /// The guest's headers (`response` phase).
    pub response_headers: HookHeaders,
    /// The guest's whole body, base64, when it was buffered (`response` phase).
    pub body_base64: Option<String>,
}

/// A hook's answer; `{}` changes nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IngressHookAnswer {
    /// `allow` phase: `false` refuses the request.
    pub allow: Option<bool>,
    /// The refusal's status (default 403), or the response's new status.
    pub status: Option<u16>,
    /// Headers to set (a list) or delete (`null`): on the refusal, the request to the guest, or
    /// the response, by phase.
    pub headers: BTreeMap<String, Option<Vec<String>>>,
    /// New body, base64: of the refusal or the response.
    pub body_base64: Option<String>,
    /// `request` phase: the path and query to ask the guest for instead.
    pub backend_target: Option<String>,
    /// `request` phase: buffer this request's response for the `response` hook.
    pub buffer_response_body: Option<bool>,
    /// `request` phase: this request's cap on the buffered body.
    pub max_buffered_response_bytes: Option<u64>,
}

impl IngressHookCall {
    /// The buffered response body (`response` phase), decoded.
    pub fn body(&self) -> Option<Vec<u8>> {
        use base64::Engine;
        let b = self.body_base64.as_deref()?;
        base64::engine::general_purpose::STANDARD.decode(b).ok()
    }

    /// The first value of a request header (names are lowercase).
    pub fn request_header(&self, name: &str) -> Option<&str> {
        self.request_headers
            .get(&name.to_ascii_lowercase())
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

impl IngressHookAnswer {
    /// Changes nothing (allows, in the `allow` phase).
    pub fn pass() -> Self {
        Self::default()
    }

    /// Refuses the request with `status` and `body`.
    pub fn deny(status: u16, body: impl AsRef<[u8]>) -> Self {
        IngressHookAnswer {
            allow: Some(false),
            status: Some(status),
            ..Self::default()
        }
        .with_body(body)
    }

    /// Sets a header (replacing its values).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers
            .insert(name.to_ascii_lowercase(), Some(vec![value.to_string()]));
        self
    }

    /// Deletes a header.
    pub fn without_header(mut self, name: &str) -> Self {
        self.headers.insert(name.to_ascii_lowercase(), None);
        self
    }

    /// Replaces the body (of a refusal or a response).
    pub fn with_body(mut self, body: impl AsRef<[u8]>) -> Self {
        use base64::Engine;
        self.body_base64 = Some(base64::engine::general_purpose::STANDARD.encode(body));
        self
    }

    /// Replaces the status of the response.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    /// Asks the guest for this path and query instead.
    pub fn with_target(mut self, target: impl Into<String>) -> Self {
        self.backend_target = Some(target.into());
        self
    }

    /// Buffers this request's response (up to `max_bytes`) for the response hook.
    pub fn buffer_response(mut self, max_bytes: u64) -> Self {
        self.buffer_response_body = Some(true);
        self.max_buffered_response_bytes = Some(max_bytes);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(prefix: &str, port: u16, strip: bool) -> IngressRoute {
        IngressRoute {
            prefix: prefix.into(),
            port,
            strip_prefix: strip,
        }
    }

    #[test]
    fn cli_form() {
        assert_eq!("/=8000".parse::<IngressRoute>(), Ok(r("/", 8000, false)));
        assert_eq!(
            "/api=9000,strip".parse::<IngressRoute>(),
            Ok(r("/api", 9000, true))
        );
        for bad in [
            "/api",
            "api=80",
            "/a=0",
            "/a=x",
            "/a=80,nope",
            "/a b=80",
            "/a?x=80",
        ] {
            assert!(bad.parse::<IngressRoute>().is_err(), "{bad}");
        }
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let t = vec![
            r("/", 1, false),
            r("/api", 2, true),
            r("/api/v2/", 3, false),
        ];
        let port = |p: &str| best_route(&t, p).map(|r| r.port);
        assert_eq!(port("/"), Some(1));
        assert_eq!(port("/apix"), Some(1));
        assert_eq!(port("/api"), Some(2));
        assert_eq!(port("/api/users"), Some(2));
        assert_eq!(port("/api/v2"), Some(3));
        assert_eq!(port("/api/v2/x"), Some(3));
        assert_eq!(best_route(&t[1..], "/other"), None);
        assert_eq!(t[1].backend_path("/api"), "/");
        assert_eq!(t[1].backend_path("/api/users"), "/users");
        assert_eq!(t[2].backend_path("/api/v2/x"), "/api/v2/x");
    }

    #[test]
    fn routes_file_round_trips_and_skips_bad_lines() {
        let t = vec![r("/", 8000, false), r("/api", 9000, true)];
        let (back, problems) = parse_routes_file(&format_routes_file(&t));
        assert_eq!(back, t);
        assert!(problems.is_empty());
        let (routes, problems) = parse_routes_file(
            "# c\n/ :80\n/x nope\n/y :81 strip_prefix=true # note\n/ :82\n/z :0\n",
        );
        assert_eq!(routes, vec![r("/", 80, false), r("/y", 81, true)]);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("line 3:"));
    }

    #[test]
    fn params_are_checked() {
        let mut p = IngressParams::default();
        assert!(p.validate().is_ok());
        p.hooks = vec!["allow".into()];
        assert!(p.validate().unwrap_err().contains("callback_socket"));
        p.callback_socket = "/tmp/s".into();
        assert!(p.validate().is_ok());
        p.hooks.push("later".into());
        assert!(p.validate().is_err());
        let p = IngressParams {
            listen: "localhost".into(),
            ..Default::default()
        };
        assert!(p.validate().is_err());
        let p = IngressParams {
            routes: Some(vec![r("/", 1, false), r("/", 2, false)]),
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("twice"));
        let p: IngressParams =
            serde_json::from_str(r#"{"routes":[{"prefix":"/","port":80}]}"#).unwrap();
        assert!(p.allow_websockets);
        assert_eq!(p.routes.unwrap()[0], r("/", 80, false));
    }
}
