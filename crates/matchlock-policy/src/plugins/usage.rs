//! `usage_logger`: what a model call used, read from the provider's answer (a JSON body, or
//! the usage an event stream reports at its end), priced, and appended to a JSON-lines log;
//! and the spend already in such a log, which `budget_gate` starts from.
//!
//! Formats read: OpenAI-compatible chat completions and responses (`usage.prompt_tokens`,
//! `completion_tokens`, `prompt_tokens_details.cached_tokens`; `input_tokens`/`output_tokens`),
//! OpenRouter's reported `usage.cost`, Anthropic messages (`usage.input_tokens`,
//! `output_tokens`, `cache_read_input_tokens`, streamed in `message_start` and
//! `message_delta`), and Ollama's native `prompt_eval_count`/`eval_count`.

use super::prices::Prices;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The most of a JSON answer read to find its usage; a larger body is passed on unread.
pub const MAX_JSON_BODY: usize = 8 << 20;
/// The longest event-stream line kept; longer lines are skipped.
const MAX_LINE: usize = 1 << 20;

/// Whether a request path is a model call whose answer reports usage: chat completions,
/// completions, responses and embeddings of the OpenAI API (OpenRouter's under `/api/v1`),
/// Anthropic's messages, Ollama's native chat and generate.
pub fn is_model_call(path: &str) -> bool {
    let p = path.trim_end_matches('/');
    let p = p
        .strip_prefix("/api")
        .filter(|r| r.starts_with("/v1/"))
        .unwrap_or(p);
    matches!(
        p,
        "/v1/chat/completions"
            | "/chat/completions"
            | "/v1/completions"
            | "/v1/responses"
            | "/v1/embeddings"
            | "/v1/messages"
            | "/api/chat"
            | "/api/generate"
    )
}

/// Tokens one call used, as its provider reported them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// The model that answered (or was asked for).
    pub model: Option<String>,
    /// Input tokens, cached ones included.
    pub input_tokens: u64,
    /// Output tokens.
    pub output_tokens: u64,
    /// Input tokens read from the prompt cache.
    pub cached_tokens: u64,
    /// Cost the provider reported (OpenRouter), in USD.
    pub reported_cost: Option<f64>,
    /// Whether any usage field was seen.
    pub seen: bool,
}

fn num(v: &Value, path: &[&str]) -> Option<u64> {
    let mut v = v;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64))
}

impl Usage {
    /// Merges what one JSON object (a whole answer, or one streamed event) says.
    fn absorb(&mut self, v: &Value) {
        if let Some(m) = v
            .get("model")
            .or_else(|| v.get("message").and_then(|m| m.get("model")))
            .and_then(Value::as_str)
        {
            self.model = Some(m.to_string());
        }
        // Anthropic's stream puts the first usage inside message_start's message.
        let usage = v
            .get("usage")
            .filter(|u| u.is_object())
            .or_else(|| v.get("message").and_then(|m| m.get("usage")))
            .filter(|u| u.is_object());
        if let Some(u) = usage {
            self.seen = true;
            if let Some(n) = num(u, &["prompt_tokens"]) {
                self.input_tokens = n;
            }
            if let Some(n) = num(u, &["completion_tokens"]) {
                self.output_tokens = n;
            }
            if let Some(n) = num(u, &["prompt_tokens_details", "cached_tokens"])
                .or_else(|| num(u, &["input_tokens_details", "cached_tokens"]))
            {
                self.cached_tokens = n;
            }
            // Anthropic counts cache reads apart from input_tokens; OpenAI's responses API
            // counts them inside. Either way the total input is what we keep.
            let cache_read = num(u, &["cache_read_input_tokens"]);
            if let Some(n) = num(u, &["input_tokens"]) {
                self.input_tokens = n + cache_read.unwrap_or(0);
            }
            if let Some(n) = cache_read {
                self.cached_tokens = n;
                if num(u, &["input_tokens"]).is_none() && self.input_tokens < n {
                    self.input_tokens = n;
                }
            }
            if let Some(n) = num(u, &["output_tokens"]) {
                self.output_tokens = n;
            }
            if let Some(c) = u.get("cost").and_then(Value::as_f64) {
                if c.is_finite() && c >= 0.0 {
                    self.reported_cost = Some(c);
                }
            }
        }
        // Ollama's native API.
        if let Some(n) = num(v, &["prompt_eval_count"]) {
            self.seen = true;
            self.input_tokens = n;
        }
        if let Some(n) = num(v, &["eval_count"]) {
            self.seen = true;
            self.output_tokens = n;
        }
    }

    /// The usage in a whole JSON answer.
    pub fn from_json(body: &[u8]) -> Option<Usage> {
        let v: Value = serde_json::from_slice(body).ok()?;
        let mut u = Usage::default();
        u.absorb(&v);
        u.seen.then_some(u)
    }
}

/// Reads the usage out of an answer as it streams past: an event stream line by line (the
/// usage arrives at its end), any other body whole up to [`MAX_JSON_BODY`].
#[derive(Debug)]
pub struct UsageTap {
    stream: bool,
    buf: Vec<u8>,
    skipping: bool,
    overflow: bool,
    usage: Usage,
}

impl UsageTap {
    /// A tap for an answer whose `Content-Type` is `content_type`.
    pub fn new(content_type: &str) -> UsageTap {
        UsageTap {
            stream: content_type
                .to_ascii_lowercase()
                .starts_with("text/event-stream"),
            buf: Vec::new(),
            skipping: false,
            overflow: false,
            usage: Usage::default(),
        }
    }

    /// Feeds the next piece of the body.
    pub fn push(&mut self, chunk: &[u8]) {
        if !self.stream {
            if self.buf.len() + chunk.len() > MAX_JSON_BODY {
                self.overflow = true;
                self.buf = Vec::new();
            }
            if !self.overflow {
                self.buf.extend_from_slice(chunk);
            }
            return;
        }
        for piece in chunk.split_inclusive(|&b| b == b'\n') {
            if self.skipping {
                self.skipping = !piece.ends_with(b"\n");
                continue;
            }
            self.buf.extend_from_slice(piece);
            if self.buf.len() > MAX_LINE {
                self.buf.clear();
                self.skipping = !piece.ends_with(b"\n");
                continue;
            }
            if piece.ends_with(b"\n") {
                let line = std::mem::take(&mut self.buf);
                self.line(&line);
            }
        }
    }

    fn line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if let Ok(v) = serde_json::from_slice::<Value>(data.trim_ascii()) {
            self.usage.absorb(&v);
        }
    }

    /// The usage, once the body has ended.
    pub fn finish(mut self) -> Option<Usage> {
        if self.stream {
            if !self.buf.is_empty() && !self.skipping {
                let line = std::mem::take(&mut self.buf);
                self.line(&line);
            }
            return self.usage.seen.then_some(self.usage);
        }
        if self.overflow {
            return None;
        }
        Usage::from_json(&self.buf)
    }
}

/// Where a call's cost came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostSource {
    /// The provider's own figure (OpenRouter's `usage.cost`).
    Provider,
    /// The price table.
    PriceTable,
    /// Served by a local backend: free.
    LocalBackend,
    /// No price known: counted as 0 and said so.
    Unknown,
}

impl CostSource {
    /// Its name in the log (`cost_source`).
    pub fn as_str(self) -> &'static str {
        match self {
            CostSource::Provider => "provider",
            CostSource::PriceTable => "price_table",
            CostSource::LocalBackend => "local_backend",
            CostSource::Unknown => "unknown",
        }
    }
}

/// One model call, as logged.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The provider (`openai`, `openrouter`, `anthropic`, or the host).
    pub provider: String,
    /// The host the guest called.
    pub host: String,
    /// The model.
    pub model: String,
    /// Tokens.
    pub usage: Usage,
    /// Cost in USD.
    pub cost_usd: f64,
    /// Where the cost came from.
    pub cost_source: CostSource,
    /// Time from sending the request to the end of the answer.
    pub latency_ms: u64,
    /// The backend that served it when a route sent it there.
    pub routed_to: Option<String>,
}

/// The provider a host belongs to.
pub fn provider_of(host: &str) -> String {
    match host {
        "api.openai.com" => "openai",
        "openrouter.ai" => "openrouter",
        "api.anthropic.com" => "anthropic",
        h => h,
    }
    .to_string()
}

impl Call {
    /// Prices a call: the provider's figure, else free when a local backend served it, else
    /// the price table, else unknown (0).
    pub fn priced(
        host: &str,
        requested_model: Option<&str>,
        usage: Usage,
        prices: &Prices,
        routed_to: Option<String>,
        latency_ms: u64,
    ) -> Call {
        let model = usage
            .model
            .clone()
            .or_else(|| requested_model.map(str::to_string))
            .unwrap_or_default();
        let (cost_usd, cost_source) = match (usage.reported_cost, &routed_to) {
            (_, Some(_)) => (0.0, CostSource::LocalBackend),
            (Some(c), None) => (c, CostSource::Provider),
            (None, None) => match prices.lookup(&model) {
                Some(p) => (
                    p.cost(usage.input_tokens, usage.output_tokens, usage.cached_tokens),
                    CostSource::PriceTable,
                ),
                None => (0.0, CostSource::Unknown),
            },
        };
        Call {
            provider: provider_of(host),
            host: host.to_string(),
            model,
            usage,
            cost_usd,
            cost_source,
            latency_ms,
            routed_to,
        }
    }

    /// The JSON line.
    pub fn to_json(&self, ts: &str) -> Value {
        let mut v = json!({
            "ts": ts,
            "provider": self.provider,
            "host": self.host,
            "model": self.model,
            "input_tokens": self.usage.input_tokens,
            "output_tokens": self.usage.output_tokens,
            "cached_tokens": self.usage.cached_tokens,
            "cost_usd": self.cost_usd,
            "cost_source": self.cost_source.as_str(),
            "latency_ms": self.latency_ms,
        });
        if let Some(b) = &self.routed_to {
            v["routed_to"] = json!(b);
        }
        v
    }
}

/// An append-only usage log and the spend it holds.
#[derive(Debug)]
pub struct UsageLog {
    path: PathBuf,
    /// Apart from the spend, so the gate never waits for a line to be written.
    file: Mutex<std::fs::File>,
    /// The same file, for `fsync` without holding up writers.
    sync: std::fs::File,
    spent: Mutex<f64>,
}

impl UsageLog {
    /// Opens (creating) the log at `path` for appending and adds up the spend already in it, so
    /// a new run on the same log starts where the last one stopped. A line that is not a usage
    /// record (a torn last line after a crash) counts nothing.
    pub fn open(path: &Path) -> Result<UsageLog, String> {
        let (spent, torn) = match std::fs::read(path) {
            Ok(bytes) => (spent_in(&bytes), bytes.last().is_some_and(|&b| b != b'\n')),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0.0, false),
            Err(e) => return Err(format!("usage log {}: {e}", path.display())),
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("usage log {}: {e}", path.display()))?;
        if torn {
            // End the torn line, so the next record is a line of its own.
            file.write_all(b"\n")
                .map_err(|e| format!("usage log {}: {e}", path.display()))?;
        }
        Ok(UsageLog {
            path: path.to_path_buf(),
            sync: file
                .try_clone()
                .map_err(|e| format!("usage log {}: {e}", path.display()))?,
            file: Mutex::new(file),
            spent: Mutex::new(spent),
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The spend so far, in USD.
    pub fn spent(&self) -> f64 {
        self.spent.lock().map(|s| *s).unwrap_or(f64::INFINITY)
    }

    /// Appends one call and flushes it to the disk, adding its cost to the spend. Returns the
    /// spend after it.
    pub fn record(&self, call: &Call, ts: &str) -> Result<f64, String> {
        let spent = self.account(call);
        self.append(call, ts)?;
        self.sync()?;
        Ok(spent)
    }

    /// Adds a call's cost to the spend at once (what the budget gate reads), returning the spend
    /// after it; [`UsageLog::append`] writes its line, which may wait for the disk.
    pub fn account(&self, call: &Call) -> f64 {
        match self.spent.lock() {
            Ok(mut s) => {
                *s += call.cost_usd;
                *s
            }
            Err(_) => f64::INFINITY,
        }
    }

    /// Writes a call's line with one `write` (in the kernel's hands at once: it survives the
    /// sandbox crashing); the spend is [`UsageLog::account`]'s.
    pub fn append(&self, call: &Call, ts: &str) -> Result<(), String> {
        let mut line = serde_json::to_vec(&call.to_json(ts)).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let mut f = self
            .file
            .lock()
            .map_err(|_| "usage log poisoned".to_string())?;
        f.write_all(&line)
            .map_err(|e| format!("usage log {}: {e}", self.path.display()))
    }

    /// Flushes what was appended to the disk (it survives the host crashing too); may wait for
    /// the disk, so the proxy runs it off the request path.
    pub fn sync(&self) -> Result<(), String> {
        self.sync
            .sync_data()
            .map_err(|e| format!("usage log {}: {e}", self.path.display()))
    }
}

/// The spend recorded in a usage log's bytes.
pub fn spent_in(bytes: &[u8]) -> f64 {
    bytes
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter_map(|v| v.get("cost_usd").and_then(Value::as_f64))
        .filter(|c| c.is_finite() && *c >= 0.0)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_calls_are_known_by_path() {
        for p in [
            "/v1/chat/completions",
            "/api/v1/chat/completions",
            "/v1/messages",
            "/v1/responses/",
            "/api/chat",
        ] {
            assert!(is_model_call(p), "{p}");
        }
        for p in [
            "/",
            "/v1/models",
            "/api/v1/models",
            "/api/tags",
            "/v1/chat/completions/x",
        ] {
            assert!(!is_model_call(p), "{p}");
        }
    }

    #[test]
    fn json_answers_of_each_provider() {
        let openai = br#"{"id":"x","model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":120,"completion_tokens":30,"total_tokens":150,"prompt_tokens_details":{"cached_tokens":100}}}"#;
        let u = Usage::from_json(openai).unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cached_tokens),
            (120, 30, 100)
        );
        assert_eq!(u.model.as_deref(), Some("gpt-4o-2024-08-06"));
        let openrouter = br#"{"model":"google/gemini-2.0-flash-001","usage":{"prompt_tokens":10,"completion_tokens":5,"cost":0.00042}}"#;
        assert_eq!(
            Usage::from_json(openrouter).unwrap().reported_cost,
            Some(0.00042)
        );
        let anthropic = br#"{"type":"message","model":"claude-sonnet-4-20250514","usage":{"input_tokens":20,"output_tokens":7,"cache_read_input_tokens":80,"cache_creation_input_tokens":0}}"#;
        let u = Usage::from_json(anthropic).unwrap();
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.cached_tokens),
            (100, 7, 80)
        );
        let ollama =
            br#"{"model":"llama3.1:8b","prompt_eval_count":26,"eval_count":290,"done":true}"#;
        let u = Usage::from_json(ollama).unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (26, 290));
        assert!(Usage::from_json(br#"{"model":"x"}"#).is_none());
        assert!(Usage::from_json(b"not json").is_none());
    }

    #[test]
    fn streams_report_usage_at_the_end_in_any_split() {
        let openai = "data: {\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                      data: {\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":3}}\n\n\
                      data: [DONE]\n\n";
        let anthropic = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-3-5-haiku-20241022\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"cache_read_input_tokens\":5}}}\n\n\
                         event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"Hi\"}}\n\n\
                         event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n\
                         event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        for (text, want) in [
            (openai, (11, 3, 0, "gpt-4o-mini")),
            (anthropic, (30, 15, 5, "claude-3-5-haiku-20241022")),
        ] {
            for split in [1, 7, 64, text.len()] {
                let mut tap = UsageTap::new("text/event-stream; charset=utf-8");
                for piece in text.as_bytes().chunks(split) {
                    tap.push(piece);
                }
                let u = tap.finish().unwrap();
                assert_eq!(
                    (
                        u.input_tokens,
                        u.output_tokens,
                        u.cached_tokens,
                        u.model.as_deref().unwrap()
                    ),
                    want,
                    "split {split}"
                );
            }
        }
    }

    #[test]
    fn oversized_bodies_and_lines_are_passed_over() {
        let mut tap = UsageTap::new("application/json");
        tap.push(&vec![b' '; MAX_JSON_BODY + 1]);
        tap.push(br#"{"usage":{"prompt_tokens":1}}"#);
        assert!(tap.finish().is_none());
        let mut tap = UsageTap::new("text/event-stream");
        tap.push(b"data: ");
        tap.push(&vec![b'x'; MAX_LINE + 10]);
        tap.push(b"\ndata: {\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n");
        let u = tap.finish().unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (4, 2));
    }

    #[test]
    fn calls_are_priced_by_provider_then_table() {
        let prices = Prices::shipped();
        let u = Usage::from_json(br#"{"model":"gpt-4o-mini","usage":{"prompt_tokens":1000000,"completion_tokens":1000000}}"#).unwrap();
        let c = Call::priced("api.openai.com", None, u.clone(), &prices, None, 5);
        assert_eq!(c.cost_source, CostSource::PriceTable);
        assert!((c.cost_usd - 0.75).abs() < 1e-9, "{}", c.cost_usd);
        assert_eq!(c.provider, "openai");
        let routed = Call::priced(
            "api.openai.com",
            None,
            u.clone(),
            &prices,
            Some("127.0.0.1:11434".into()),
            5,
        );
        assert_eq!(
            (routed.cost_usd, routed.cost_source),
            (0.0, CostSource::LocalBackend)
        );
        let mut or = u;
        or.reported_cost = Some(0.5);
        let c = Call::priced("openrouter.ai", None, or, &prices, None, 5);
        assert_eq!((c.cost_usd, c.cost_source), (0.5, CostSource::Provider));
        let unknown =
            Usage::from_json(br#"{"model":"mystery","usage":{"prompt_tokens":5}}"#).unwrap();
        let c = Call::priced("x.test", None, unknown, &prices, None, 5);
        assert_eq!((c.cost_usd, c.cost_source), (0.0, CostSource::Unknown));
        let line = c.to_json("t");
        assert_eq!(line["cost_source"], "unknown");
        assert_eq!(line["provider"], "x.test");
    }

    #[test]
    fn the_log_appends_and_its_spend_survives_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let prices = Prices::shipped();
        let u = Usage {
            reported_cost: Some(1.25),
            seen: true,
            ..Usage::default()
        };
        let call = Call::priced("openrouter.ai", Some("m"), u, &prices, None, 1);
        let log = UsageLog::open(&path).unwrap();
        assert_eq!(log.record(&call, "t1").unwrap(), 1.25);
        assert_eq!(log.record(&call, "t2").unwrap(), 2.5);
        drop(log);
        // A crash mid-line leaves a torn last line: it counts nothing, the rest still counts.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"cost_usd\": 9").unwrap();
        let log = UsageLog::open(&path).unwrap();
        assert_eq!(log.spent(), 2.5);
        assert_eq!(log.record(&call, "t3").unwrap(), 3.75);
        drop(log);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert_eq!(UsageLog::open(&path).unwrap().spent(), 3.75);
        assert!(UsageLog::open(Path::new("/nonexistent/dir/usage.jsonl")).is_err());
    }
}
