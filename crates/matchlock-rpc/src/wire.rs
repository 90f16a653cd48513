//! JSON-RPC 2.0 framing as the Matchlock SDKs speak it: one JSON object per line in both
//! directions (newline-delimited JSON; see the reference's §3.2). Hand-written because it is a few
//! dozen lines and must handle over-long lines gracefully, which generic JSON-RPC crates do not.

use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// Longest request line accepted (a `write_file` of about 48 MiB after base64). Longer lines are
/// skipped and answered with an error instead of ending the server.
pub const MAX_LINE: usize = 64 << 20;

/// How much of an over-long line is kept to find its request id.
const PREFIX: usize = 4096;

/// JSON-RPC error codes, as the SDKs know them.
pub use matchlock_api::codes as code;

/// An error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// One of [`code`].
    pub code: i64,
    /// One line for the user.
    pub message: String,
}

impl RpcError {
    /// An error with `code`.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
        }
    }

    /// [`code::INVALID_PARAMS`].
    pub fn params(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_PARAMS, message)
    }
}

/// One request or notification from the client.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The request id; `None` for notifications.
    pub id: Option<Value>,
    /// The method name.
    pub method: String,
    /// The parameters (`null` when absent).
    pub params: Value,
}

/// What one line of input held.
#[derive(Debug)]
pub enum Line {
    /// A request.
    Request(Incoming),
    /// A line longer than [`MAX_LINE`]; its id when it could be found in the first bytes.
    TooLong {
        /// The request id, if found.
        id: Option<Value>,
        /// The line's length in bytes.
        len: usize,
    },
    /// Not JSON, or not a request object.
    Invalid,
}

/// Reads the next non-empty line; `Ok(None)` at end of input.
pub async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<Line>> {
    loop {
        let mut buf = Vec::new();
        let mut len = 0usize;
        let mut saw_any = false;
        loop {
            let avail = r.fill_buf().await?;
            if avail.is_empty() {
                if !saw_any {
                    return Ok(None);
                }
                break;
            }
            saw_any = true;
            let (chunk, used, done) = match avail.iter().position(|b| *b == b'\n') {
                Some(i) => (&avail[..i], i + 1, true),
                None => (avail, avail.len(), false),
            };
            len += chunk.len();
            let keep = if len > MAX_LINE { PREFIX } else { MAX_LINE };
            if buf.len() < keep {
                let room = keep - buf.len();
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            r.consume(used);
            if done {
                break;
            }
        }
        if len > MAX_LINE {
            buf.truncate(PREFIX);
            return Ok(Some(Line::TooLong {
                id: find_id(&buf),
                len,
            }));
        }
        if buf.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        return Ok(Some(parse(&buf)));
    }
}

fn parse(line: &[u8]) -> Line {
    let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(line) else {
        return Line::Invalid;
    };
    let Some(Value::String(method)) = obj.remove("method") else {
        return Line::Invalid;
    };
    let id = obj.remove("id").filter(|v| !v.is_null());
    Line::Request(Incoming {
        id,
        method,
        params: obj.remove("params").unwrap_or(Value::Null),
    })
}

/// Finds the top-level `"id"` member in the start of a (truncated) JSON object. The Python SDK
/// writes `id` before `params`, so an over-long request can still get an error reply it waits for.
fn find_id(prefix: &[u8]) -> Option<Value> {
    let text = String::from_utf8_lossy(prefix);
    let b = text.as_bytes();
    let (mut depth, mut i) = (0i32, 0usize);
    while i < b.len() {
        match b[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth -= 1,
            b'"' => {
                let start = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                let key = text.get(start..i.min(b.len()))?;
                if depth == 1 && key == "id" {
                    let rest = text.get(i + 1..)?.trim_start().strip_prefix(':')?;
                    let rest = rest.trim_start();
                    let end = rest
                        .find(|c: char| c == ',' || c == '}' || c.is_whitespace())
                        .unwrap_or(rest.len());
                    return serde_json::from_str(&rest[..end]).ok();
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// A success response.
pub fn response(id: &Value, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "result": result, "id": id})
}

/// An error response (`id` is `null` when the request's id is unknown).
pub fn error(id: Option<&Value>, e: &RpcError) -> Value {
    let mut v = json!({"jsonrpc": "2.0", "error": {"code": e.code, "message": e.message}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    v
}

/// A notification (never carries a top-level id; stream notifications carry theirs in `params`).
pub fn notification(method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "method": method, "params": params})
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8]) -> Vec<Line> {
        let mut r = tokio::io::BufReader::with_capacity(7, input);
        let mut out = Vec::new();
        while let Some(l) = read_line(&mut r).await.unwrap() {
            out.push(l);
        }
        out
    }

    #[tokio::test]
    async fn reads_requests_and_skips_blank_lines() {
        let got = lines(b"\n{\"jsonrpc\":\"2.0\",\"method\":\"exec\",\"id\":2,\"params\":{\"command\":\"x\"}}\n\n  \nnot json\n{\"method\":\"exec_pipe.stdin\",\"params\":{\"id\":3}}").await;
        assert_eq!(got.len(), 3);
        match &got[0] {
            Line::Request(r) => {
                assert_eq!(r.method, "exec");
                assert_eq!(r.id, Some(json!(2)));
                assert_eq!(r.params["command"], "x");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(got[1], Line::Invalid));
        match &got[2] {
            Line::Request(r) => assert_eq!(r.id, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn finds_the_id_of_a_truncated_request() {
        let p = br#"{"jsonrpc": "2.0", "method": "write_file", "id": 42, "params": {"path": "/x", "content": "AAAA"#;
        assert_eq!(find_id(p), Some(json!(42)));
        let p = br#"{"method": "w", "params": {"id": 7, "content": "AA"#;
        assert_eq!(find_id(p), None);
        let p = br#"{"id": "abc", "params": {"#;
        assert_eq!(find_id(p), Some(json!("abc")));
    }

    #[test]
    fn shapes() {
        let e = error(
            Some(&json!(1)),
            &RpcError::new(code::VM_FAILED, "VM not created"),
        );
        assert_eq!(e["error"]["code"], -32000);
        assert_eq!(e["id"], 1);
        assert!(error(None, &RpcError::params("x")).get("id").is_none());
        assert!(notification("event", json!({})).get("id").is_none());
    }
}
