//! Hook rules (`network.interception.rules` of the SDKs): static request/response rewrites and
//! blocks, and SDK-side callbacks reached over a Unix socket (one JSON line each way per call,
//! Matchlock's side channel). Rules run in order; `before` rules see the request after the
//! allow-list and before secrets are substituted, `after` rules see the response.
//!
//! Callbacks fail closed (unlike Matchlock, which ignores a failing callback): one that cannot be
//! reached, answers with an error or garbage, or misses its deadline (`timeout_ms`, 30 s when 0)
//! refuses the request (or the response) with a reason, so a rule whose job is to block can
//! never be skipped because its callback was slow or broken.

use crate::hosts::AllowList;
pub use matchlock_api::wire::{BodyReplacement, RuleSpec, DEFAULT_CALLBACK_TIMEOUT_MS};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The request a rule looks at and may change.
#[derive(Debug, Clone, Default)]
pub struct RequestView {
    /// Normalised host.
    pub host: String,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Raw query.
    pub query: String,
    /// Headers in order.
    pub headers: Vec<(String, String)>,
}

/// What a `before` pass decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Continue (possibly changed).
    Continue,
    /// Refuse with this reason.
    Block(String),
}

/// Changes `after` rules make to a response.
#[derive(Debug, Default)]
pub struct ResponseEdit {
    /// Refuse with this reason.
    pub block: Option<String>,
    /// Headers to set.
    pub set_headers: Vec<(String, String)>,
    /// Headers to delete.
    pub delete_headers: Vec<String>,
    /// Replace the whole header map with this, when a callback said so.
    pub replace_headers: Option<Vec<(String, String)>>,
    /// Replace the whole body.
    pub set_body: Option<Vec<u8>>,
    /// Literal replacements on the body.
    pub replacements: Vec<(String, String)>,
}

impl ResponseEdit {
    /// Whether the body must be read whole before it can be passed on.
    pub fn needs_body(&self) -> bool {
        self.set_body.is_some() || !self.replacements.is_empty()
    }
}

struct Rule {
    spec: RuleSpec,
    hosts: AllowList,
    after: bool,
}

/// The rules of a sandbox.
#[derive(Default)]
pub struct Rules {
    rules: Vec<Rule>,
    socket: Option<PathBuf>,
}

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rules")
            .field("count", &self.rules.len())
            .finish()
    }
}

/// `*` matches within one path segment, `?` one character; everything else literally (Go's
/// `path.Match` without character classes).
fn path_match(pattern: &str, path: &str) -> bool {
    fn rec(p: &[u8], s: &[u8]) -> bool {
        match (p.first(), s.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                rec(&p[1..], s) || (!s.is_empty() && s[0] != b'/' && rec(p, &s[1..]))
            }
            (Some(b'?'), Some(c)) if *c != b'/' => rec(&p[1..], &s[1..]),
            (Some(a), Some(b)) if a == b => rec(&p[1..], &s[1..]),
            _ => false,
        }
    }
    rec(pattern.as_bytes(), path.as_bytes())
}

fn set_header(headers: &mut Vec<(String, String)>, k: &str, v: &str) {
    headers.retain(|(n, _)| !n.eq_ignore_ascii_case(k));
    headers.push((k.to_string(), v.to_string()));
}

fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

fn join_query(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            if v.is_empty() {
                k.clone()
            } else {
                format!("{k}={v}")
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn headers_json(h: &[(String, String)]) -> Value {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in h {
        m.entry(canonical(k)).or_default().push(v.clone());
    }
    json!(m)
}

/// `content-type` -> `Content-Type`, as Go's canonical header keys (what SDK callbacks expect).
fn canonical(k: &str) -> String {
    k.split('-')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

fn headers_from_json(v: &Value) -> Option<Vec<(String, String)>> {
    let obj = v.as_object()?;
    let mut out = Vec::new();
    for (k, vals) in obj {
        match vals {
            Value::Array(a) => {
                for x in a {
                    out.push((k.clone(), x.as_str().unwrap_or_default().to_string()));
                }
            }
            Value::String(s) => out.push((k.clone(), s.clone())),
            _ => {}
        }
    }
    Some(out)
}

impl Rules {
    /// Rules from the SDK's specs and the callback socket (when any rule has a callback).
    pub fn new(specs: Vec<RuleSpec>, socket: Option<PathBuf>) -> Result<Rules, String> {
        matchlock_api::create::check_rules(&specs, socket.is_some()).map_err(|e| e.0)?;
        let mut rules = Vec::new();
        for spec in specs {
            let after = spec.phase.trim().eq_ignore_ascii_case("after");
            let hosts = if spec.hosts.is_empty() {
                AllowList::new(["*"])?
            } else {
                AllowList::new(&spec.hosts)?
            };
            rules.push(Rule { spec, hosts, after });
        }
        Ok(Rules { rules, socket })
    }

    /// Whether there are any.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules of a phase that match the request as it is now.
    fn matching(&self, req: &RequestView, after: bool) -> Vec<&Rule> {
        self.rules
            .iter()
            .filter(|r| {
                r.after == after
                    && r.hosts.allows(&req.host)
                    && (r.spec.methods.is_empty()
                        || r.spec
                            .methods
                            .iter()
                            .any(|m| m.eq_ignore_ascii_case(&req.method)))
                    && (r.spec.path.is_empty() || path_match(&r.spec.path, &req.path))
            })
            .collect()
    }

    /// Runs the `before` rules on a request.
    pub async fn before(&self, req: &mut RequestView) -> Verdict {
        let matched = self.matching(req, false);
        for r in matched {
            let s = &r.spec;
            if s.action.eq_ignore_ascii_case("block") {
                return Verdict::Block(format!("blocked by rule {:?}", s.name));
            }
            for (k, v) in &s.set_headers {
                set_header(&mut req.headers, k, v);
            }
            req.headers
                .retain(|(n, _)| !s.delete_headers.iter().any(|d| d.eq_ignore_ascii_case(n)));
            if !s.set_query.is_empty() || !s.delete_query.is_empty() {
                let mut q = query_pairs(&req.query);
                q.retain(|(k, _)| !s.delete_query.contains(k) && !s.set_query.contains_key(k));
                q.extend(s.set_query.iter().map(|(k, v)| (k.clone(), v.clone())));
                req.query = join_query(&q);
            }
            if !s.rewrite_path.is_empty() {
                req.path = s.rewrite_path.clone();
            }
            if !s.callback_id.is_empty() {
                let query: BTreeMap<String, String> =
                    query_pairs(&req.query).into_iter().rev().collect();
                let call = json!({
                    "callback_id": s.callback_id, "phase": "before", "host": req.host,
                    "method": req.method, "path": req.path, "query": query,
                    "request_headers": headers_json(&req.headers),
                });
                let resp = match self.call(&call, s.timeout_ms).await {
                    Ok(resp) => resp,
                    Err(why) => {
                        return Verdict::Block(format!(
                            "callback of rule {:?} failed: {why}",
                            s.name
                        ))
                    }
                };
                if resp["action"]
                    .as_str()
                    .is_some_and(|a| a.eq_ignore_ascii_case("block"))
                {
                    return Verdict::Block(format!("blocked by callback of rule {:?}", s.name));
                }
                let r = &resp["request"];
                if let Some(h) = headers_from_json(&r["headers"]) {
                    req.headers = h;
                }
                if let Some(q) = r["query"].as_object() {
                    let pairs: Vec<(String, String)> = q
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect();
                    req.query = join_query(&pairs);
                }
                if let Some(p) = r["path"].as_str().filter(|p| !p.is_empty()) {
                    req.path = p.to_string();
                }
            }
        }
        Verdict::Continue
    }

    /// Runs the `after` rules for a response to `req`.
    pub async fn after(
        &self,
        req: &RequestView,
        status: u16,
        headers: &[(String, String)],
    ) -> ResponseEdit {
        let mut edit = ResponseEdit::default();
        let is_sse = headers.iter().any(|(k, v)| {
            k.eq_ignore_ascii_case("content-type") && v.starts_with("text/event-stream")
        });
        let matched = self.matching(req, true);
        for r in matched {
            let s = &r.spec;
            if s.action.eq_ignore_ascii_case("block") {
                edit.block = Some(format!("response blocked by rule {:?}", s.name));
                return edit;
            }
            edit.set_headers.extend(
                s.set_response_headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
            edit.delete_headers
                .extend(s.delete_response_headers.iter().cloned());
            edit.replacements.extend(
                s.body_replacements
                    .iter()
                    .map(|b| (b.find.clone(), b.replace.clone())),
            );
            if !s.callback_id.is_empty() {
                let call = json!({
                    "callback_id": s.callback_id, "phase": "after", "host": req.host,
                    "method": req.method, "path": req.path,
                    "request_headers": headers_json(&req.headers),
                    "status_code": status, "response_headers": headers_json(headers), "is_sse": is_sse,
                });
                let resp = match self.call(&call, s.timeout_ms).await {
                    Ok(resp) => resp,
                    Err(why) => {
                        edit.block = Some(format!(
                            "response refused: callback of rule {:?} failed: {why}",
                            s.name
                        ));
                        return edit;
                    }
                };
                if resp["action"]
                    .as_str()
                    .is_some_and(|a| a.eq_ignore_ascii_case("block"))
                {
                    edit.block = Some(format!("response blocked by callback of rule {:?}", s.name));
                    return edit;
                }
                let r = &resp["response"];
                if let Some(h) = headers_from_json(&r["headers"]) {
                    edit.replace_headers = Some(h);
                }
                if let Some(b) = r["set_body_base64"].as_str() {
                    use base64::Engine;
                    if let Ok(body) = base64::engine::general_purpose::STANDARD.decode(b) {
                        edit.set_body = Some(body);
                    }
                }
                if let Some(list) = r["body_replacements"].as_array() {
                    for x in list {
                        if let (Some(f), Some(t)) = (x["find"].as_str(), x["replace"].as_str()) {
                            edit.replacements.push((f.to_string(), t.to_string()));
                        }
                    }
                }
            }
        }
        edit
    }

    /// One callback over the rules' socket.
    async fn call(&self, req: &Value, timeout_ms: u64) -> Result<Value, String> {
        let socket = self.socket.as_ref().ok_or("no callback socket")?;
        crate::callback::call(socket, req, timeout_ms).await
    }
}

/// Applies literal replacements to a whole body.
pub fn replace_all(body: &[u8], replacements: &[(String, String)]) -> Vec<u8> {
    let mut out = body.to_vec();
    for (find, with) in replacements {
        if find.is_empty() {
            continue;
        }
        let f = find.as_bytes();
        let mut next = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(f) {
                next.extend_from_slice(with.as_bytes());
                i += f.len();
            } else {
                next.push(out[i]);
                i += 1;
            }
        }
        out = next;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn rules(v: Value) -> Rules {
        Rules::new(serde_json::from_value(v).unwrap(), None).unwrap()
    }

    fn req() -> RequestView {
        RequestView {
            host: "api.example.com".into(),
            method: "POST".into(),
            path: "/v1/chat".into(),
            query: "a=1&b=2".into(),
            headers: vec![
                ("Cookie".into(), "x".into()),
                ("Accept".into(), "*/*".into()),
            ],
        }
    }

    #[test]
    fn paths() {
        assert!(path_match("/v1/*", "/v1/chat"));
        assert!(!path_match("/v1/*", "/v1/chat/x"));
        assert!(path_match("/v?/chat", "/v1/chat"));
        assert!(path_match("", ""));
    }

    #[tokio::test]
    async fn before_rules_mutate_and_block() {
        let r = rules(json!([
            {"name": "m", "hosts": ["*.example.com"], "methods": ["post"], "path": "/v1/*",
             "action": "mutate", "set_headers": {"X-A": "1"}, "delete_headers": ["cookie"],
             "set_query": {"c": "3"}, "delete_query": ["a"], "rewrite_path": "/v2/chat"},
            {"name": "other host", "hosts": ["nope.com"], "action": "block"}
        ]));
        let mut q = req();
        assert_eq!(r.before(&mut q).await, Verdict::Continue);
        assert_eq!(q.path, "/v2/chat");
        assert_eq!(q.query, "b=2&c=3");
        assert!(q.headers.contains(&("X-A".into(), "1".into())));
        assert!(!q.headers.iter().any(|(k, _)| k == "Cookie"));
        let r = rules(json!([{"name": "deny", "path": "/v1/*", "action": "block"}]));
        assert_eq!(
            r.before(&mut req()).await,
            Verdict::Block("blocked by rule \"deny\"".into())
        );
        assert!(Rules::new(
            serde_json::from_value(json!([{"phase": "during"}])).unwrap(),
            None
        )
        .is_err());
        assert!(Rules::new(
            serde_json::from_value(json!([{"callback_id": "x"}])).unwrap(),
            None
        )
        .is_err());
    }

    #[tokio::test]
    async fn after_rules_and_callbacks() {
        let dir = std::env::temp_dir().join(format!("mlrules-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("hook.sock");
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            while let Ok((s, _)) = l.accept().await {
                let (rd, mut wr) = s.into_split();
                let mut line = String::new();
                tokio::io::BufReader::new(rd)
                    .read_line(&mut line)
                    .await
                    .unwrap();
                let v: Value = serde_json::from_str(&line).unwrap();
                let answer = if v["phase"] == "before" {
                    json!({"action": "mutate", "request": {"path": "/from-callback"}})
                } else {
                    assert_eq!(v["status_code"], 200);
                    json!({"action": "mutate", "response": {"body_replacements": [{"find": "a", "replace": "b"}]}})
                };
                wr.write_all(format!("{answer}\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let r = Rules::new(
            serde_json::from_value(json!([
                {"callback_id": "network_hook_1"},
                {"phase": "after", "set_response_headers": {"X-I": "1"}, "body_replacements": [{"find": "foo", "replace": "bar"}]},
                {"phase": "after", "callback_id": "network_hook_3"}
            ]))
            .unwrap(),
            Some(sock.clone()),
        )
        .unwrap();
        let mut q = req();
        r.before(&mut q).await;
        assert_eq!(q.path, "/from-callback");
        let e = r.after(&q, 200, &[]).await;
        assert_eq!(e.set_headers, vec![("X-I".to_string(), "1".to_string())]);
        assert!(e.needs_body());
        // In order, each over the result of the previous one (as Matchlock).
        assert_eq!(replace_all(b"foo a", &e.replacements), b"bbr b");
        // A dead callback fails closed, with the reason, in both phases.
        let dead = Rules::new(
            serde_json::from_value(json!([
                {"name": "gone", "callback_id": "x", "timeout_ms": 200},
                {"name": "gone-after", "phase": "after", "callback_id": "y"}
            ]))
            .unwrap(),
            Some(dir.join("missing.sock")),
        )
        .unwrap();
        let mut q = req();
        match dead.before(&mut q).await {
            Verdict::Block(why) => assert!(
                why.contains("\"gone\"") && why.contains("cannot reach"),
                "{why}"
            ),
            v => panic!("{v:?}"),
        }
        let e = dead.after(&q, 200, &[]).await;
        assert!(e.block.is_some_and(|b| b.contains("gone-after")));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn slow_or_broken_callbacks_refuse_and_never_skip_a_block() {
        let dir = std::env::temp_dir().join(format!("mlrules-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("hook.sock");
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (rd, mut wr) = s.into_split();
                    let mut line = String::new();
                    let _ = tokio::io::BufReader::new(rd).read_line(&mut line).await;
                    let v: Value = serde_json::from_str(&line).unwrap();
                    match v["callback_id"].as_str().unwrap() {
                        "slow" => tokio::time::sleep(Duration::from_secs(5)).await,
                        "error" => {
                            let _ = wr.write_all(b"{\"error\":\"boom\"}\n").await;
                        }
                        _ => {
                            let _ = wr.write_all(b"not json\n").await;
                        }
                    }
                });
            }
        });
        for (id, needle) in [
            ("slow", "within 300 ms"),
            ("error", "boom"),
            ("garbage", "not JSON"),
        ] {
            let r = Rules::new(
                serde_json::from_value(json!([
                    {"name": "cb", "callback_id": id, "timeout_ms": 300},
                    {"name": "deny", "action": "block"}
                ]))
                .unwrap(),
                Some(sock.clone()),
            )
            .unwrap();
            let started = std::time::Instant::now();
            match r.before(&mut req()).await {
                Verdict::Block(why) => assert!(why.contains(needle), "{id}: {why}"),
                v => panic!("{id}: {v:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(3), "{id}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
