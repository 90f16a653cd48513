//! The on-disk state store: `$MATCHLOCK_HOME/vms/<id>/` (mode 0700) per sandbox.
//!
//! ```text
//! vms/<id>/config.json   SandboxConfig, written once
//!          state.json    State, rewritten atomically by the supervisor
//!          lock          flock-ed by the supervisor for its whole life
//!          control.sock  the supervisor's control socket
//!          agent.sock    QEMU <-> supervisor guest channel
//!          console.sock  QEMU's serial console, copied by the supervisor into logs/vm.log
//!          upper.ext4    the writable upper disk (removed when the VM stops)
//!          history.jsonl every state the supervisor wrote, one JSON line each (`inspect`)
//!          logs/vm.log   serial console and the output of `run`'s command
//!          logs/supervisor.log
//! ```
//! All writes go through write+rename, so concurrent CLI processes never read half a file.

use crate::config::{now_secs, SandboxConfig, State, Status};
use crate::SandboxError;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The state store rooted at `$MATCHLOCK_HOME`.
#[derive(Debug, Clone)]
pub struct Store {
    home: PathBuf,
}

/// A sandbox as `list` sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// Its configuration.
    pub config: SandboxConfig,
    /// Its state, with `status` corrected for a dead supervisor.
    pub state: State,
}

impl Store {
    /// `$MATCHLOCK_HOME`, else `~/.matchlock`.
    pub fn open_default() -> Store {
        let home = std::env::var_os("MATCHLOCK_HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| matchlock_vmm::home_dir().join(".matchlock"));
        Store { home }
    }

    /// A store at an explicit root.
    pub fn at(home: impl Into<PathBuf>) -> Store {
        Store { home: home.into() }
    }

    /// The root directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Directory of one sandbox.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.home.join("vms").join(id)
    }

    /// Creates a fresh sandbox directory (0700) with a new id and returns the id.
    pub fn create_dir(&self) -> Result<String, SandboxError> {
        let vms = self.home.join("vms");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vms)
            .map_err(SandboxError::io(format!("creating {}", vms.display())))?;
        for _ in 0..16 {
            let id = format!("vm-{:08x}", rand::random::<u32>());
            let dir = vms.join(&id);
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    // The umask may have narrowed nothing but widened nothing either; be explicit.
                    let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
                    std::fs::DirBuilder::new()
                        .mode(0o700)
                        .create(dir.join("logs"))
                        .map_err(SandboxError::io("creating logs dir"))?;
                    return Ok(id);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(SandboxError::io(format!("creating {}", dir.display()))(e)),
            }
        }
        Err(SandboxError::Start(
            "could not allocate a sandbox id".into(),
        ))
    }

    /// Writes `config.json`.
    pub fn write_config(&self, c: &SandboxConfig) -> Result<(), SandboxError> {
        let data = serde_json::to_vec_pretty(c).map_err(|e| SandboxError::Start(e.to_string()))?;
        let p = self.dir(&c.id).join("config.json");
        matchlock_vmm::write_atomic(&p, &data)
            .map_err(SandboxError::io(format!("writing {}", p.display())))
    }

    /// Reads `config.json`.
    pub fn config(&self, id: &str) -> Result<SandboxConfig, SandboxError> {
        if !valid_id(id) {
            return Err(SandboxError::NotFound(id.to_string()));
        }
        let p = self.dir(id).join("config.json");
        let data = std::fs::read(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SandboxError::NotFound(id.to_string()),
            _ => SandboxError::io(format!("reading {}", p.display()))(e),
        })?;
        serde_json::from_slice(&data)
            .map_err(|e| SandboxError::Start(format!("{} is corrupt: {e}", p.display())))
    }

    /// Writes `state.json` and appends it to `history.jsonl`.
    pub fn write_state(&self, id: &str, s: &State) -> Result<(), SandboxError> {
        let data = serde_json::to_vec_pretty(s).map_err(|e| SandboxError::Start(e.to_string()))?;
        let p = self.dir(id).join("state.json");
        matchlock_vmm::write_atomic(&p, &data)
            .map_err(SandboxError::io(format!("writing {}", p.display())))?;
        // The history is informational: a failed append must not fail the transition.
        if let Ok(mut line) = serde_json::to_vec(s) {
            use std::io::Write;
            line.push(b'\n');
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir(id).join("history.jsonl"))
                .and_then(|mut f| f.write_all(&line));
        }
        Ok(())
    }

    /// Every state the sandbox went through, oldest first (`history.jsonl`; bounded).
    pub fn history(&self, id: &str) -> Vec<State> {
        let p = self.dir(id).join("history.jsonl");
        let data = std::fs::read(p).unwrap_or_default();
        data.split(|b| *b == b'\n')
            .filter_map(|l| serde_json::from_slice(l).ok())
            .take(1000)
            .collect()
    }

    /// Reads `state.json`, correcting a live status whose supervisor is gone to `crashed`.
    pub fn state(&self, id: &str) -> Result<State, SandboxError> {
        let config = self.config(id)?;
        let p = self.dir(id).join("state.json");
        let mut s: State = match std::fs::read(&p) {
            Ok(d) => serde_json::from_slice(&d)
                .map_err(|e| SandboxError::Start(format!("{} is corrupt: {e}", p.display())))?,
            // The supervisor writes state.json right after taking the lock; until then the
            // sandbox is starting, unless it has been "starting" implausibly long.
            Err(_) => State {
                status: if now_secs().saturating_sub(config.created_at) < 60 {
                    Status::Starting
                } else {
                    Status::Failed
                },
                pid: 0,
                qemu_pid: None,
                accel: None,
                boot_ms: None,
                start: None,
                reason: Some("supervisor never started".into()),
                paused: None,
                forwards: Vec::new(),
                updated_at: config.created_at,
            },
        };
        if s.status.is_live() && s.pid != 0 && !self.supervisor_alive(id) {
            // The supervisor may have written its final state and exited between our read and
            // the lock check: read again before calling it a crash.
            let again = std::fs::read(&p)
                .ok()
                .and_then(|d| serde_json::from_slice::<State>(&d).ok());
            if let Some(again) = again.filter(|a| !a.status.is_live()) {
                return Ok(again);
            }
            s.status = Status::Crashed;
            s.reason
                .get_or_insert_with(|| "supervisor process died".into());
        }
        Ok(s)
    }

    /// Whether some process holds the sandbox's lock (i.e. its supervisor is alive).
    pub fn supervisor_alive(&self, id: &str) -> bool {
        lock_held(&self.dir(id).join("lock"))
    }

    /// Every sandbox, oldest first. Directories without a readable config are skipped.
    pub fn list(&self) -> Result<Vec<Entry>, SandboxError> {
        let vms = self.home.join("vms");
        let rd = match std::fs::read_dir(&vms) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SandboxError::io(format!("reading {}", vms.display()))(e)),
        };
        let mut out = Vec::new();
        for ent in rd.flatten() {
            let id = ent.file_name().to_string_lossy().into_owned();
            let (Ok(config), Ok(state)) = (self.config(&id), self.state(&id)) else {
                continue;
            };
            out.push(Entry { config, state });
        }
        out.sort_by(|a, b| {
            (a.config.created_at, &a.config.id).cmp(&(b.config.created_at, &b.config.id))
        });
        Ok(out)
    }

    /// Ids of directories that hold no usable config (left by a create that died early).
    pub fn orphan_dirs(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.home.join("vms")) else {
            return Vec::new();
        };
        rd.flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|id| self.config(id).is_err() && !self.supervisor_alive(id))
            // A directory this young may be a sandbox being created right now.
            .filter(|id| {
                std::fs::metadata(self.dir(id))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 60)
            })
            .collect()
    }

    /// Deletes a sandbox's directory; refuses while its supervisor lives.
    pub fn remove(&self, id: &str) -> Result<(), SandboxError> {
        if !valid_id(id) || !self.dir(id).exists() {
            return Err(SandboxError::NotFound(id.to_string()));
        }
        if self.supervisor_alive(id) {
            return Err(SandboxError::Running(id.to_string()));
        }
        std::fs::remove_dir_all(self.dir(id)).map_err(SandboxError::io(format!(
            "removing {}",
            self.dir(id).display()
        )))
    }

    /// Deletes the files a stopped sandbox no longer needs (upper disk, sockets, the private
    /// directories of its workspace mounts); returns the bytes freed.
    pub fn reclaim(&self, id: &str) -> u64 {
        let mut freed = 0;
        for f in [
            "upper.ext4",
            "agent.sock",
            "console.sock",
            "control.sock",
            "net.sock",
            "vfs.sock",
        ] {
            let p = self.dir(id).join(f);
            if let Ok(m) = std::fs::metadata(&p) {
                if std::fs::remove_file(&p).is_ok() {
                    freed += m.len();
                }
            }
        }
        let scratch = self.dir(id).join("scratch");
        if scratch.exists() && std::fs::remove_dir_all(&scratch).is_ok() {
            freed += 1;
        }
        freed
    }

    /// Resolves a unique id prefix (`vm-1a2b` or `1a2b`) to a full id.
    pub fn resolve_id(&self, prefix: &str) -> Result<String, SandboxError> {
        if valid_id(prefix) && self.dir(prefix).join("config.json").exists() {
            return Ok(prefix.to_string());
        }
        let want = if prefix.starts_with("vm-") {
            prefix.to_string()
        } else {
            format!("vm-{prefix}")
        };
        let matches: Vec<String> = std::fs::read_dir(self.home.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|id| !prefix.is_empty() && id.starts_with(&want))
            .collect();
        match matches.len() {
            1 => Ok(matches[0].clone()),
            0 => Err(SandboxError::NotFound(prefix.to_string())),
            _ => Err(SandboxError::Start(format!(
                "'{prefix}' matches {} sandboxes; give more of the id",
                matches.len()
            ))),
        }
    }
}

/// Whether some process holds an exclusive flock on `path`.
pub fn lock_held(path: &Path) -> bool {
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: plain flock on an fd we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    r != 0
}

/// Ids are `vm-` plus hex; anything else (`..`, slashes) never reaches the filesystem.
pub fn valid_id(id: &str) -> bool {
    id.len() <= 64
        && id.starts_with("vm-")
        && id.len() > 3
        && id[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated_and_prefixes_resolve() {
        assert!(valid_id("vm-0a1b2c3d"));
        assert!(!valid_id("vm-../x"));
        assert!(!valid_id("../etc"));
        let dir = tempfile::tempdir().unwrap();
        let store = Store::at(dir.path());
        let id = store.create_dir().unwrap();
        let cfg = SandboxConfig {
            id: id.clone(),
            created_at: now_secs(),
            ..Default::default()
        };
        store.write_config(&cfg).unwrap();
        assert_eq!(store.resolve_id(&id[3..7]).unwrap(), id);
        assert_eq!(store.resolve_id(&id).unwrap(), id);
        assert!(store.resolve_id("zzz").is_err());
        let mode = std::fs::metadata(store.dir(&id))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700);
        // No state yet: starting; a state claiming running without a live supervisor: crashed.
        assert_eq!(store.state(&id).unwrap().status, Status::Starting);
        let st = State {
            status: Status::Running,
            pid: 1,
            qemu_pid: None,
            accel: None,
            boot_ms: None,
            start: None,
            reason: None,
            paused: None,
            forwards: Vec::new(),
            updated_at: 0,
        };
        store.write_state(&id, &st).unwrap();
        assert_eq!(store.state(&id).unwrap().status, Status::Crashed);
        store.remove(&id).unwrap();
        assert!(matches!(store.config(&id), Err(SandboxError::NotFound(_))));
    }
}
