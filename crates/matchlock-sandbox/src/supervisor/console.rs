//! The sandbox log (`logs/vm.log`): the guest's serial console and the output of `run`'s and
//! detached commands, capped so the guest cannot fill the host's disk.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;
use tokio::sync::Mutex;

/// Largest `logs/vm.log`: everything in it comes from the guest.
const LOG_LIMIT: u64 = 64 * 1024 * 1024;

/// `logs/vm.log`, cut off at [`LOG_LIMIT`] with one marker line.
pub struct CappedLog {
    file: std::fs::File,
    written: u64,
}

/// The log, shared by the console copier and the commands whose output it records.
pub type Log = Arc<Mutex<CappedLog>>;

impl CappedLog {
    /// Opens (appending to) the sandbox's log.
    pub fn open(dir: &Path) -> std::io::Result<Log> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("logs").join("vm.log"))?;
        Ok(Arc::new(Mutex::new(CappedLog { file, written: 0 })))
    }

    /// Appends what fits under the cap.
    pub fn append(&mut self, data: &[u8]) {
        if self.written >= LOG_LIMIT {
            return;
        }
        let room = (LOG_LIMIT - self.written) as usize;
        let part = &data[..data.len().min(room)];
        let _ = self.file.write_all(part);
        self.written += part.len() as u64;
        if self.written >= LOG_LIMIT {
            let _ = self.file.write_all(
                b"\n[matchlock] log limit of 64 MiB reached; further output is dropped\n",
            );
        }
    }
}

/// Copies everything QEMU's serial console prints into the log, for the sandbox's lifetime: a
/// resumed sandbox's new QEMU connects again.
pub fn copy_console(listener: UnixListener, log: Log) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                log.lock().await.append(&buf[..n]);
            }
        }
    });
}

/// The last lines the guest printed, for a boot failure's message.
pub fn tail(dir: &Path) -> String {
    let data = std::fs::read(dir.join("logs").join("vm.log")).unwrap_or_default();
    let text = String::from_utf8_lossy(&data);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n  guest console:\n  {tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_stops_at_its_cap_with_a_marker() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("logs")).unwrap();
        let log = CappedLog::open(d.path()).unwrap();
        let mut l = log.try_lock().unwrap();
        l.written = LOG_LIMIT - 4;
        l.append(b"abcdefgh");
        l.append(b"more");
        drop(l);
        let text = std::fs::read_to_string(d.path().join("logs/vm.log")).unwrap();
        assert!(text.starts_with("abcd\n[matchlock] log limit"), "{text:?}");
        assert!(!text.contains("more"));
        assert_eq!(tail(d.path()), "\n  guest console:\n  abcd\n  [matchlock] log limit of 64 MiB reached; further output is dropped");
    }
}
