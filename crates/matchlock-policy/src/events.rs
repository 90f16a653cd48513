//! The event log (`--event-log path.jsonl`): one JSON object per line for every gate decision,
//! request, response and secret injection, in the shape Matchlock's fork documents:
//! `{"ts","run_id","agent_system","event_type","summary","plugin"?,"tags"?,"data"?}`. Secret values
//! never appear: events name secrets, never their values.

use serde_json::{json, Value};
use std::io::Write;
use std::sync::Mutex;
use std::sync::PoisonError;

/// One event, as the policy describes it; the log adds the time, the run and the tags.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `event_type`: `gate_decision`, `http_request`, `http_response`, `request_transform`.
    pub kind: &'static str,
    /// One line for people; names hosts and secrets, never a secret's value.
    pub summary: String,
    /// The stage that decided (`host_filter`, `secret_injector`), if any.
    pub plugin: Option<&'static str>,
    /// The machine-readable details.
    pub data: Value,
}

/// An open event log.
pub struct EventLog {
    file: Mutex<std::fs::File>,
    run_id: String,
    agent_system: String,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

/// RFC 3339 UTC with microseconds, from the system clock (days-to-civil conversion, so no date
/// crate is needed for one format).
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

impl EventLog {
    /// Opens (appending, created 0600) the log at `path`.
    pub fn open(
        path: &std::path::Path,
        run_id: &str,
        agent_system: &str,
    ) -> std::io::Result<EventLog> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(EventLog {
            file: Mutex::new(file),
            run_id: run_id.to_string(),
            agent_system: agent_system.to_string(),
        })
    }

    /// Appends `event` with `tags`.
    pub fn record(&self, event: &Event, tags: &[&str]) {
        self.emit(
            event.kind,
            event.summary.clone(),
            event.plugin,
            tags,
            event.data.clone(),
        );
    }

    /// Appends one event.
    pub fn emit(
        &self,
        event_type: &str,
        summary: String,
        plugin: Option<&str>,
        tags: &[&str],
        data: Value,
    ) {
        let mut ev = json!({
            "ts": now_rfc3339(),
            "run_id": self.run_id,
            "agent_system": self.agent_system,
            "event_type": event_type,
            "summary": summary,
            "data": data,
        });
        if let Some(p) = plugin {
            ev["plugin"] = json!(p);
        }
        if !tags.is_empty() {
            ev["tags"] = json!(tags);
        }
        let mut line = ev.to_string();
        line.push('\n');
        // One write per line: O_APPEND keeps concurrent writers' lines whole.
        let _ = self
            .file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_documented_shape() {
        let dir = tempfile_dir();
        let path = dir.join("events.jsonl");
        let log = EventLog::open(&path, "run-1", "agent").unwrap();
        log.emit(
            "gate_decision",
            "gate allowed x".into(),
            Some("host_filter"),
            &["tls"],
            json!({"host": "x", "allowed": true}),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["run_id"], "run-1");
        assert_eq!(v["agent_system"], "agent");
        assert_eq!(v["event_type"], "gate_decision");
        assert_eq!(v["plugin"], "host_filter");
        assert_eq!(v["tags"][0], "tls");
        let ts = v["ts"].as_str().unwrap();
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.starts_with("20") && ts.ends_with('Z'));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mlev-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
