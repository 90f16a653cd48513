//! A minimal client of QEMU's machine protocol (QMP), for the few commands snapshots need:
//! `stop`, `cont`, `migrate`, `query-migrate`, `query-status`, `quit`.
//!
//! Hand-rolled rather than a crate: QMP is one JSON object per line each way (a greeting, then
//! `{"execute": ..}` answered by `{"return": ..}` or `{"error": ..}`, with asynchronous
//! `{"event": ..}` lines in between, which we skip), and the QMP crates bring a code generator
//! for the whole schema. QEMU connects to a socket the supervisor listens on, like every other
//! channel (`-chardev socket,...` + `-mon mode=control`), so no socket of QEMU's is ever exposed.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

/// Longest line QMP may send us; answers to our commands are a few hundred bytes.
const MAX_LINE: usize = 1 << 20;

/// A QMP connection, after the capabilities handshake.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Waits up to `timeout` for QEMU to connect its monitor to `listener`, then negotiates.
    pub fn accept(listener: &UnixListener, timeout: Duration) -> Result<Qmp, String> {
        let stream = accept_within(listener, timeout)
            .map_err(|e| format!("QEMU did not connect its monitor: {e}"))?;
        Qmp::handshake(stream, timeout)
    }

    /// Reads the greeting and enters command mode.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Qmp, String> {
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.line()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// How long one answer may take.
    pub fn set_timeout(&self, timeout: Duration) -> Result<(), String> {
        self.writer
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .map_err(|e| format!("reading QMP: {e}"))?;
        if n == 0 {
            return Err("QEMU closed its monitor".into());
        }
        serde_json::from_slice(&buf).map_err(|e| format!("bad QMP line: {e}"))
    }

    /// Runs one command and returns its `return` value; QEMU's `error` becomes the error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, String> {
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut out = serde_json::to_vec(&req).map_err(|e| e.to_string())?;
        out.push(b'\n');
        self.writer
            .write_all(&out)
            .map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(format!("QMP {command}: {desc}"));
            }
            return Err(format!("QMP {command}: unexpected answer {v}"));
        }
    }

    /// The VM's run state (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub fn status(&mut self) -> Result<String, String> {
        let r = self.execute("query-status", None)?;
        Ok(r.get("status")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string())
    }

    /// The outgoing or incoming migration's status and error, as `query-migrate` reports them.
    pub fn migration(&mut self) -> Result<(String, Option<String>), String> {
        let r = self.execute("query-migrate", None)?;
        let status = r
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        let error = r
            .get("error-desc")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok((status, error))
    }
}

/// Accepts one connection on a (possibly non-blocking) listener within `timeout`.
pub fn accept_within(listener: &UnixListener, timeout: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    listener.set_nonblocking(true)?;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "timed out",
                    ));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    }
}
