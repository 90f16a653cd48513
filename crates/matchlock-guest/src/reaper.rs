//! The one place that calls `waitpid`.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them, and a reaper that calls
//! `waitpid(-1)` would steal the exit status of processes an exec is waiting for. So there is exactly
//! one reaper, and it and the exec code share a lock: exec holds it across `fork` and registering the
//! new pid, and the reaper holds it while reaping. The reaper therefore never reaps an exec'd process
//! before its exec has registered it; unregistered pids (orphans) are reaped and forgotten.
//! `tokio::process` is deliberately not used: its own `waitpid` calls would race this reaper.

use matchlock_proto::ExitStatus;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// Registered children: pid -> where to deliver its exit status.
static CHILDREN: Mutex<Option<HashMap<i32, oneshot::Sender<ExitStatus>>>> = Mutex::new(None);

/// Exclusive access to the child table; holding it blocks reaping.
pub struct Registry(MutexGuard<'static, Option<HashMap<i32, oneshot::Sender<ExitStatus>>>>);

impl Registry {
    /// Records `pid` and returns the receiver of its exit status.
    pub fn register(&mut self, pid: i32) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        self.0.get_or_insert_with(HashMap::new).insert(pid, tx);
        rx
    }
}

/// Locks the child table. Poisoning is ignored: the table stays consistent across a panic because
/// every mutation is a single insert or remove.
pub fn lock() -> Registry {
    Registry(CHILDREN.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Converts a wait status to the protocol's shell-style status.
fn to_exit(status: WaitStatus) -> Option<(i32, ExitStatus)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), ExitStatus { code, signal: None })),
        WaitStatus::Signaled(pid, sig, _) => {
            let n = sig as i32;
            Some((
                pid.as_raw(),
                ExitStatus {
                    code: 128 + n,
                    signal: Some(n),
                },
            ))
        }
        _ => None,
    }
}

/// Reaps every child that has exited, delivering statuses of registered ones.
fn reap_all() {
    let mut table = lock();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
            Ok(status) => {
                if let Some((pid, exit)) = to_exit(status) {
                    if let Some(tx) = table.0.as_mut().and_then(|t| t.remove(&pid)) {
                        // The exec may have given up on the process (stream closed); fine.
                        let _ = tx.send(exit);
                    }
                }
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                crate::log(format_args!("waitpid: {e}"));
                break;
            }
        }
    }
}

/// Starts the reaper task. Must run before the first child is spawned so no SIGCHLD is missed.
pub fn start() -> std::io::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    tokio::spawn(async move {
        // Children that exited before the handler existed (none in practice, but cheap).
        reap_all();
        while sigchld.recv().await.is_some() {
            // SIGCHLDs coalesce, so each wake-up reaps everything that is ready.
            reap_all();
        }
    });
    Ok(())
}

/// Pids of registered processes that have not been reaped yet.
pub fn live_pids() -> Vec<i32> {
    lock()
        .0
        .as_ref()
        .map(|t| t.keys().copied().collect())
        .unwrap_or_default()
}
