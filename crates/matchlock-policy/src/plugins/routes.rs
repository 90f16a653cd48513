//! `local_model_router`'s routes: which model calls to which host go to a local backend instead,
//! under which model name, and how the request body is rewritten.
//!
//! A route is written `SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL[@HOST:PORT]`, as the usage guide
//! has it. Model names hold `/` (`google/gemini-2.0-flash-001`) and `:` (`llama3.1:8b`), so the
//! host ends at the first `/`, the target starts after the last `=`, and a backend is whatever
//! follows the last `@` when that parses as `HOST:PORT`.

use crate::hosts::normalize;
use serde_json::Value;

/// Where routed calls go when a route names no backend of its own: host and port (Ollama's
/// default).
pub const DEFAULT_BACKEND: (&str, u16) = ("127.0.0.1", 11434);

/// A backend: a host (name or address) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Backend {
    /// Parses `HOST:PORT` (`[V6]:PORT` for IPv6).
    pub fn parse(s: &str) -> Result<Backend, String> {
        let bad = || format!("backend {s:?}: expected HOST:PORT, e.g. 127.0.0.1:11434");
        let (host, port) = s.trim().rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        let valid = !host.is_empty()
            && port != 0
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
        if !valid {
            return Err(bad());
        }
        Ok(Backend {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// One route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The host the guest calls (normalized).
    pub source_host: String,
    /// The model it asks for there.
    pub source_model: String,
    /// The model the backend is asked for instead.
    pub target_model: String,
    /// This route's own backend, overriding the default one.
    pub backend: Option<Backend>,
}

impl Route {
    /// Parses `SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL[@HOST:PORT]`.
    pub fn parse(s: &str) -> Result<Route, String> {
        let form = "expected SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL[@HOST:PORT], e.g. \
                    openrouter.ai/google/gemini-2.0-flash-001=llama3.1:8b";
        let s = s.trim();
        let (source, target) = s
            .rsplit_once('=')
            .ok_or_else(|| format!("route {s:?}: no '='; {form}"))?;
        let (host, model) = source
            .split_once('/')
            .ok_or_else(|| format!("route {s:?}: no '/' after the source host; {form}"))?;
        let (target, backend) = match target.rsplit_once('@') {
            Some((t, b)) => (
                t,
                Some(Backend::parse(b).map_err(|e| format!("route {s:?}: {e}"))?),
            ),
            None => (target, None),
        };
        let host = normalize(host);
        let ok_name =
            |n: &str| !n.is_empty() && !n.chars().any(|c| c.is_whitespace() || c.is_control());
        if host.is_empty() || host.contains('*') || !ok_name(&host) {
            return Err(format!(
                "route {s:?}: the source host must be one host name; {form}"
            ));
        }
        if !ok_name(model) || !ok_name(target) {
            return Err(format!("route {s:?}: empty or blank model name; {form}"));
        }
        Ok(Route {
            source_host: host,
            source_model: model.to_string(),
            target_model: target.to_string(),
            backend,
        })
    }
}

/// The model APIs a route can carry: the call keeps its API, the backend must speak it
/// (Ollama serves both at these paths).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelApi {
    /// OpenAI-compatible chat completions (OpenAI, OpenRouter, Ollama's `/v1`, vLLM, ...).
    ChatCompletions,
    /// Anthropic's messages API.
    Messages,
}

impl ModelApi {
    /// The API a request path belongs to, if it is one a route can carry. OpenRouter serves the
    /// OpenAI API under `/api/v1`.
    pub fn of_path(path: &str) -> Option<ModelApi> {
        let p = path.trim_end_matches('/');
        match p {
            "/v1/chat/completions" | "/api/v1/chat/completions" | "/chat/completions" => {
                Some(ModelApi::ChatCompletions)
            }
            "/v1/messages" => Some(ModelApi::Messages),
            _ => None,
        }
    }

    /// The path the backend serves it at.
    pub fn backend_path(self) -> &'static str {
        match self {
            ModelApi::ChatCompletions => "/v1/chat/completions",
            ModelApi::Messages => "/v1/messages",
        }
    }
}

/// A request the router sends elsewhere.
#[derive(Debug, Clone, PartialEq)]
pub struct Directive {
    /// Where it goes.
    pub backend: Backend,
    /// The path there.
    pub path: &'static str,
    /// The body with the model renamed (every other field as sent).
    pub body: Vec<u8>,
    /// The model the guest asked for.
    pub source_model: String,
    /// The model the backend is asked for.
    pub target_model: String,
}

/// The routes of a sandbox and their default backend.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
    default_backend: Option<Backend>,
}

impl Router {
    /// A router; every route needs a backend, its own or `default_backend`.
    pub fn new(routes: Vec<Route>, default_backend: Option<Backend>) -> Result<Router, String> {
        let mut seen = std::collections::HashSet::new();
        for r in &routes {
            if !seen.insert((r.source_host.clone(), r.source_model.clone())) {
                return Err(format!(
                    "two routes for {}/{}: keep one",
                    r.source_host, r.source_model
                ));
            }
        }
        Ok(Router {
            routes,
            default_backend,
        })
    }

    /// Whether there are routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The routes.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The backends routes may send to (the policy opens exactly these for the proxy, never
    /// for the guest).
    pub fn backends(&self) -> Vec<Backend> {
        let mut v: Vec<Backend> = Vec::new();
        for b in self.routes.iter().map(|r| self.backend_of(r)) {
            if !v.contains(&b) {
                v.push(b);
            }
        }
        v
    }

    fn backend_of(&self, r: &Route) -> Backend {
        r.backend
            .clone()
            .or_else(|| self.default_backend.clone())
            .unwrap_or_else(|| Backend {
                host: DEFAULT_BACKEND.0.into(),
                port: DEFAULT_BACKEND.1,
            })
    }

    /// Whether a request to `host` at `path` might be routed (so its body is worth reading).
    pub fn may_route(&self, method: &str, host: &str, path: &str) -> bool {
        method.eq_ignore_ascii_case("POST")
            && ModelApi::of_path(path).is_some()
            && self.routes.iter().any(|r| r.source_host == host)
    }

    /// Reads a model call to `host` at `path` with JSON `body` once: the model it names, and the
    /// directive when a route matches it.
    pub fn route(&self, host: &str, path: &str, body: &[u8]) -> Routing {
        let json: Option<Value> = serde_json::from_slice(body).ok();
        let model = json
            .as_ref()
            .and_then(|j| j.get("model")?.as_str().map(str::to_string));
        let directive = (|| {
            let api = ModelApi::of_path(path)?;
            let source_model = model.clone()?;
            let r = self
                .routes
                .iter()
                .find(|r| r.source_host == host && r.source_model == source_model)?;
            let mut json = json?;
            json["model"] = Value::String(r.target_model.clone());
            Some(Directive {
                backend: self.backend_of(r),
                path: api.backend_path(),
                body: serde_json::to_vec(&json).ok()?,
                source_model,
                target_model: r.target_model.clone(),
            })
        })();
        Routing { model, directive }
    }
}

/// What the router made of a model call's body.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// The model the body names (for the usage log), if it is JSON with one.
    pub model: Option<String>,
    /// Where to send it instead; `None` leaves the request untouched.
    pub directive: Option<Directive>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_with_slashes_colons_and_backends() {
        let r = Route::parse("openrouter.ai/google/gemini-2.0-flash-001=llama3.1:8b").unwrap();
        assert_eq!(r.source_host, "openrouter.ai");
        assert_eq!(r.source_model, "google/gemini-2.0-flash-001");
        assert_eq!(r.target_model, "llama3.1:8b");
        assert_eq!(r.backend, None);
        let r = Route::parse("API.OpenAI.com/gpt-4o=qwen2.5:7b@10.0.0.5:11434").unwrap();
        assert_eq!(r.source_host, "api.openai.com");
        assert_eq!(r.backend.unwrap().to_string(), "10.0.0.5:11434");
        let r = Route::parse("api.anthropic.com/claude-sonnet-4=llama3.1@[::1]:8080").unwrap();
        assert_eq!(r.backend.unwrap().to_string(), "[::1]:8080");
        for bad in [
            "",
            "openrouter.ai",
            "openrouter.ai/model",
            "model=target",
            "/m=t",
            "h/=t",
            "h/m=",
            "*.ai/m=t",
            "h/m=t@nohost",
            "h/m=t@h:0",
            "h/m=t@h:99999",
            "h/m=t@:80",
            "h o/m=t",
        ] {
            assert!(Route::parse(bad).is_err(), "{bad:?} parsed");
        }
        let e = Route::parse("openrouter.ai").unwrap_err();
        assert!(e.contains("SOURCE_HOST/SOURCE_MODEL"), "{e}");
    }

    #[test]
    fn duplicate_routes_are_refused() {
        let r = Route::parse("h.test/m=a").unwrap();
        let mut r2 = r.clone();
        r2.target_model = "b".into();
        assert!(Router::new(vec![r, r2], None).is_err());
    }

    #[test]
    fn matching_calls_are_rewritten_and_others_untouched() {
        let router = Router::new(
            vec![
                Route::parse("openrouter.ai/google/gemini-2.0-flash-001=llama3.1:8b").unwrap(),
                Route::parse("api.anthropic.com/claude-sonnet-4=qwen3@127.0.0.1:9000").unwrap(),
            ],
            Some(Backend::parse("127.0.0.1:11434").unwrap()),
        )
        .unwrap();
        let body = br#"{"model":"google/gemini-2.0-flash-001","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        assert!(router.may_route("POST", "openrouter.ai", "/api/v1/chat/completions"));
        assert!(!router.may_route("GET", "openrouter.ai", "/api/v1/chat/completions"));
        assert!(!router.may_route("POST", "openrouter.ai", "/api/v1/models"));
        let d = router
            .route("openrouter.ai", "/api/v1/chat/completions", body)
            .directive
            .unwrap();
        assert_eq!(d.backend.to_string(), "127.0.0.1:11434");
        assert_eq!(d.path, "/v1/chat/completions");
        let v: Value = serde_json::from_slice(&d.body).unwrap();
        assert_eq!(v["model"], "llama3.1:8b");
        assert_eq!(v["stream"], true);
        assert_eq!(v["messages"][0]["content"], "hi");
        let a = router
            .route(
                "api.anthropic.com",
                "/v1/messages",
                br#"{"model":"claude-sonnet-4","max_tokens":5}"#,
            )
            .directive
            .unwrap();
        assert_eq!(a.backend.to_string(), "127.0.0.1:9000");
        assert_eq!(a.path, "/v1/messages");
        // Another model, another host, another path, or a body that is not JSON: untouched.
        let other = router.route(
            "openrouter.ai",
            "/api/v1/chat/completions",
            br#"{"model":"x"}"#,
        );
        assert!(other.directive.is_none());
        assert_eq!(other.model.as_deref(), Some("x"));
        assert!(router
            .route("other.ai", "/api/v1/chat/completions", body)
            .directive
            .is_none());
        assert!(router
            .route("openrouter.ai", "/api/v1/embeddings", body)
            .directive
            .is_none());
        assert!(router
            .route("openrouter.ai", "/api/v1/chat/completions", b"not json")
            .directive
            .is_none());
        assert_eq!(router.backends().len(), 2);
        // One backend per address, however many routes use it and in whatever order.
        let shared = Router::new(
            ["a.test/m1=t", "b.test/m=t@127.0.0.1:9", "a.test/m2=t"]
                .iter()
                .map(|r| Route::parse(r).unwrap())
                .collect(),
            None,
        )
        .unwrap();
        assert_eq!(
            shared.backends(),
            [
                Backend::parse("127.0.0.1:11434").unwrap(),
                Backend::parse("127.0.0.1:9").unwrap()
            ]
        );
    }
}
