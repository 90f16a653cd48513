//! The sandbox's lifecycle as the supervisor drives it: which states follow which (one table,
//! [`allowed`]), each recorded in `state.json` as it happens, the parent told once how the start
//! went, and one way out of a start that failed ([`Lifecycle::fail`]).
//!
//! ```text
//!  starting ──> running ──> stopping ──> stopped
//!     │  └─────────│ ^─────────^
//!     │          paused   (pause / resume; a paused sandbox can also be stopped)
//!     └──> failed            (crashed: derived by readers when the lock is free)
//! ```

use crate::config::{now_secs, PublishedPort, SandboxConfig, State, Status};
use crate::store::Store;
use crate::SandboxError;
use std::io::Write;

/// Whether the supervisor may go from `from` to `to`.
pub fn allowed(from: Status, to: Status) -> bool {
    use Status::*;
    matches!(
        (from, to),
        (Starting, Running)
            | (Starting, Failed)
            // A stop asked for while booting (a signal) waits for the boot, then stops.
            | (Starting, Stopping)
            | (Running, Stopping)
            | (Running, Paused)
            | (Paused, Running)
            | (Paused, Stopping)
            | (Stopping, Stopped)
    )
}

/// One sandbox's lifecycle: its state, its lock, and the pipe to the process that started it.
pub struct Lifecycle {
    store: Store,
    config: SandboxConfig,
    state: State,
    /// Held for the supervisor's whole life: a free lock means the supervisor is gone.
    _lock: std::fs::File,
    /// The parent's pipe: one line, `ok` or `error: ...`, then closed.
    ready: Option<std::fs::File>,
}

impl Lifecycle {
    /// Takes the sandbox's lock and records it as starting. On failure the parent has already
    /// been told why.
    pub fn begin(
        store: Store,
        id: &str,
        mut ready: Option<std::fs::File>,
    ) -> Result<Lifecycle, SandboxError> {
        let started = store
            .config(id)
            .and_then(|config| take_lock(&store.dir(id)).map(|lock| (config, lock)));
        let (config, lock) = match started {
            Ok(x) => x,
            Err(e) => {
                report(&mut ready, &format!("error: {e}"));
                return Err(e);
            }
        };
        let state = State {
            status: Status::Starting,
            pid: std::process::id(),
            qemu_pid: None,
            accel: None,
            boot_ms: None,
            start: None,
            reason: None,
            paused: None,
            forwards: Vec::new(),
            updated_at: now_secs(),
        };
        let _ = store.write_state(id, &state);
        Ok(Lifecycle {
            store,
            config,
            state,
            _lock: lock,
            ready,
        })
    }

    /// The sandbox's configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// Where it stands.
    pub fn status(&self) -> Status {
        self.state.status
    }

    /// Records details learnt while starting (QEMU's pid, the accelerator) without a transition.
    pub fn note(&mut self, f: impl FnOnce(&mut State)) {
        f(&mut self.state);
        self.write();
    }

    fn write(&mut self) {
        self.state.updated_at = now_secs();
        let _ = self.store.write_state(&self.config.id, &self.state);
    }

    fn go(&mut self, to: Status) {
        debug_assert!(
            allowed(self.state.status, to),
            "{} -> {to}",
            self.state.status
        );
        tracing::debug!(from = %self.state.status, %to, "lifecycle");
        self.state.status = to;
        self.write();
    }

    /// The guest is up and commands are accepted: recorded, and the parent told `ok`.
    pub fn running(&mut self, boot_ms: u64, forwards: Vec<PublishedPort>) {
        self.state.boot_ms = Some(boot_ms);
        self.state.forwards = forwards;
        self.go(Status::Running);
        report(&mut self.ready, "ok");
    }

    /// The saved state, while paused.
    pub fn paused_info(&self) -> Option<&crate::config::PausedInfo> {
        self.state.paused.as_ref()
    }

    /// The guest is saved and QEMU gone.
    pub fn paused(&mut self, info: crate::config::PausedInfo) {
        self.state.paused = Some(info);
        self.state.qemu_pid = None;
        self.go(Status::Paused);
    }

    /// A new QEMU (`qemu_pid`) continues the guest.
    pub fn resumed(&mut self, qemu_pid: u32) {
        self.state.paused = None;
        self.state.qemu_pid = Some(qemu_pid);
        self.go(Status::Running);
    }

    /// The sandbox is being stopped, for `reason`.
    pub fn stopping(&mut self, reason: &str) {
        tracing::info!(%reason, "stopping");
        self.state.reason = Some(reason.to_string());
        self.go(Status::Stopping);
    }

    /// The sandbox has stopped: recorded, what it no longer needs reclaimed, and its directory
    /// removed when it was to be removed on stop.
    pub fn stopped(mut self) {
        self.go(Status::Stopped);
        self.store.reclaim(&self.config.id);
        tracing::info!("stopped");
        if self.config.remove_on_stop {
            let _ = std::fs::remove_dir_all(self.store.dir(&self.config.id));
        }
    }

    /// The one way out of a start that failed: recorded, the parent told why, and what the
    /// start created removed (`MATCHLOCK_KEEP_FAILED=1` keeps the directory, logs and disks,
    /// for debugging). Returns the supervisor's exit code.
    pub fn fail(mut self, reason: &str) -> i32 {
        tracing::error!("{reason}");
        self.state.reason = Some(reason.to_string());
        self.go(Status::Failed);
        report(
            &mut self.ready,
            &format!("error: {}", reason.replace('\n', "\\n")),
        );
        if std::env::var_os("MATCHLOCK_KEEP_FAILED").is_none() {
            let _ = std::fs::remove_dir_all(self.store.dir(&self.config.id));
        }
        1
    }
}

/// Tells the parent how the boot went (one line on the ready pipe), at most once.
fn report(ready: &mut Option<std::fs::File>, line: &str) {
    if let Some(mut f) = ready.take() {
        let _ = writeln!(f, "{line}");
    }
}

fn take_lock(dir: &std::path::Path) -> Result<std::fs::File, SandboxError> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(SandboxError::io("opening the sandbox lock"))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(SandboxError::Start(
            "another supervisor already owns this sandbox".into(),
        ));
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sandbox(store: &Store, remove_on_stop: bool) -> String {
        let id = store.create_dir().unwrap();
        store
            .write_config(&SandboxConfig {
                id: id.clone(),
                remove_on_stop,
                created_at: now_secs(),
                ..Default::default()
            })
            .unwrap();
        id
    }

    /// A pipe standing in for the parent's ready pipe: (our write end, their read end).
    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe fills two fds we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: fresh fds owned by nobody else.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[1]),
                std::fs::File::from_raw_fd(fds[0]),
            )
        }
    }

    fn read_all(mut f: std::fs::File) -> String {
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn transitions_follow_the_table() {
        use Status::*;
        let all = [
            Starting, Running, Paused, Stopping, Stopped, Failed, Crashed,
        ];
        let ok: Vec<(Status, Status)> = all
            .iter()
            .flat_map(|a| all.iter().map(move |b| (*a, *b)))
            .filter(|(a, b)| allowed(*a, *b))
            .collect();
        assert_eq!(
            ok,
            [
                (Starting, Running),
                (Starting, Stopping),
                (Starting, Failed),
                (Running, Paused),
                (Running, Stopping),
                (Paused, Running),
                (Paused, Stopping),
                (Stopping, Stopped)
            ]
        );
        // Nothing leaves a final state; crashed is only ever derived by readers.
        for s in all {
            assert!(!allowed(Stopped, s) && !allowed(Failed, s) && !allowed(s, Crashed));
        }
    }

    #[test]
    fn a_start_runs_stops_and_is_recorded_at_each_step() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::at(home.path());
        let id = sandbox(&store, false);
        let (w, r) = pipe();
        let mut life = Lifecycle::begin(store.clone(), &id, Some(w)).unwrap();
        assert_eq!(store.state(&id).unwrap().status, Status::Starting);
        // The lock is held: a second supervisor cannot take the sandbox.
        assert!(Lifecycle::begin(store.clone(), &id, None).is_err());
        life.note(|s| s.qemu_pid = Some(42));
        life.running(123, Vec::new());
        assert_eq!(read_all(r), "ok\n");
        let st = store.state(&id).unwrap();
        assert_eq!(
            (st.status, st.boot_ms, st.qemu_pid),
            (Status::Running, Some(123), Some(42))
        );
        life.stopping("stopped by request");
        assert_eq!(store.state(&id).unwrap().status, Status::Stopping);
        std::fs::write(store.dir(&id).join("upper.ext4"), b"disk").unwrap();
        life.stopped();
        let st = store.state(&id).unwrap();
        assert_eq!(st.status, Status::Stopped);
        assert_eq!(st.reason.as_deref(), Some("stopped by request"));
        assert!(!store.dir(&id).join("upper.ext4").exists(), "reclaimed");
        let history: Vec<Status> = store.history(&id).iter().map(|s| s.status).collect();
        assert_eq!(
            history,
            [
                Status::Starting,
                Status::Starting,
                Status::Running,
                Status::Stopping,
                Status::Stopped
            ]
        );
        // --rm: gone when stopped.
        let id = sandbox(&store, true);
        let mut life = Lifecycle::begin(store.clone(), &id, None).unwrap();
        life.running(1, Vec::new());
        life.stopping("done");
        life.stopped();
        assert!(!store.dir(&id).exists());
    }

    #[test]
    fn a_failed_start_tells_the_parent_and_leaves_nothing() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::at(home.path());
        let id = sandbox(&store, false);
        let (w, r) = pipe();
        let life = Lifecycle::begin(store.clone(), &id, Some(w)).unwrap();
        assert_eq!(life.fail("QEMU exited\nguest console: x"), 1);
        assert_eq!(read_all(r), "error: QEMU exited\\nguest console: x\n");
        assert!(!store.dir(&id).exists());
        // An unknown sandbox is refused at once, and the parent hears why.
        let (w, r) = pipe();
        assert!(Lifecycle::begin(store.clone(), "vm-00000000", Some(w)).is_err());
        assert!(read_all(r).starts_with("error: VM vm-00000000 not found"));
    }
}
