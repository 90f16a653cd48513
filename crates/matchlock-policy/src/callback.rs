//! SDK callbacks: the host connects to the SDK's Unix socket once per call, writes one JSON line
//! and reads one JSON line back (Matchlock's side channel for network hooks, reused by the ingress
//! gateway's hooks). Every failure is a reason, so callers can fail closed.

use crate::rules::DEFAULT_CALLBACK_TIMEOUT_MS;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// Largest answer read from the SDK: a callback cannot make the host buffer without limit.
pub const MAX_ANSWER: u64 = 16 << 20;

/// One call: connect, write `req` as a line, read one JSON line; why not, on any failure, on an
/// `{"error": ...}` answer, or past `timeout_ms` (0: [`DEFAULT_CALLBACK_TIMEOUT_MS`]).
pub async fn call(socket: &Path, req: &Value, timeout_ms: u64) -> Result<Value, String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let deadline = Duration::from_millis(if timeout_ms == 0 {
        DEFAULT_CALLBACK_TIMEOUT_MS
    } else {
        timeout_ms
    });
    let call = async {
        let mut s = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("cannot reach the SDK ({e})"))?;
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes())
            .await
            .map_err(|e| format!("cannot send to the SDK ({e})"))?;
        let mut reader = tokio::io::BufReader::new(s.take(MAX_ANSWER));
        let mut answer = String::new();
        reader
            .read_line(&mut answer)
            .await
            .map_err(|e| format!("no answer ({e})"))?;
        let v: Value = serde_json::from_str(answer.trim())
            .map_err(|_| "its answer is not JSON".to_string())?;
        if let Some(e) = v.get("error") {
            let e = e.as_str().unwrap_or("an error");
            return Err(format!(
                "the SDK answered: {}",
                e.chars().take(200).collect::<String>()
            ));
        }
        Ok(v)
    };
    tokio::time::timeout(deadline, call)
        .await
        .map_err(|_| format!("no answer within {} ms", deadline.as_millis()))?
}
