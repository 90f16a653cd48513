//! The control socket's server: each connection carries one request ([`crate::control`]),
//! answered here or spliced onto a guest stream.

use super::console::Log;
use crate::config::SandboxConfig;
use crate::control::{self, ExecSpec, Reply, Request};
use matchlock_proto::mux::Mux;
use matchlock_proto::{read_msg, write_msg, ExecRequest, Msg};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// A request to stop the sandbox.
pub struct StopRequest {
    /// Why (recorded in its state).
    pub reason: String,
    /// Grace for processes; the sandbox's default when `None`.
    pub grace_ms: Option<u64>,
    /// Told once the VM has stopped.
    pub done: Option<oneshot::Sender<()>>,
}

/// What every control connection needs of the running sandbox.
pub struct Ctx {
    /// Its configuration.
    pub config: SandboxConfig,
    /// The guest channel.
    pub mux: Mux,
    /// Where stop requests go.
    pub stop_tx: mpsc::Sender<StopRequest>,
    /// The sandbox log.
    pub log: Log,
    /// The network policy, when the sandbox has a network (`allow-list` updates it).
    pub policy: Option<Arc<matchlock_policy::Policy>>,
    /// The workspace filesystem server (for event subscriptions).
    pub vfs: Arc<matchlock_vfs::VfsServer>,
    /// Where pause and resume requests go (the supervisor's main loop does them).
    pub pause_tx: mpsc::Sender<PauseRequest>,
    /// Set while the sandbox is paused (or pausing): new guest requests are refused, or resume
    /// it first when it was paused for being idle.
    pub paused: std::sync::atomic::AtomicBool,
    /// Set while it is paused (or pausing) for being idle (`--idle-pause`).
    pub idle_paused: std::sync::atomic::AtomicBool,
    /// Host requests that need the guest, for `--idle-pause`.
    pub activity: Activity,
}

/// The host's requests that need the guest: how many are open, and when one last began or
/// ended. A sandbox is idle while none is open.
pub struct Activity {
    open: std::sync::atomic::AtomicUsize,
    last: std::sync::Mutex<tokio::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            open: Default::default(),
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }
}

impl Activity {
    /// Counts a request as open until the guard drops.
    pub fn begin(&self) -> ActivityGuard<'_> {
        self.open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.touch();
        ActivityGuard(self)
    }

    /// Restarts the idle clock.
    pub fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now();
    }

    /// Since when nothing is open; `None` while something is.
    pub fn idle_since(&self) -> Option<tokio::time::Instant> {
        (self.open.load(std::sync::atomic::Ordering::SeqCst) == 0)
            .then(|| *self.last.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// An open request ([`Activity::begin`]).
pub struct ActivityGuard<'a>(&'a Activity);

impl Drop for ActivityGuard<'_> {
    fn drop(&mut self) {
        self.0
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.touch();
    }
}

/// A `pause` (`resume: false`) or `resume` asked for on the control socket.
pub struct PauseRequest {
    /// Resume rather than pause.
    pub resume: bool,
    /// The outcome, for the client.
    pub done: oneshot::Sender<Result<(), String>>,
}

impl Ctx {
    /// Asks the main loop to pause or resume and waits for the outcome.
    async fn ask_pause(&self, resume: bool) -> Result<(), String> {
        let stopping = || "the sandbox is stopping".to_string();
        let (done, outcome) = oneshot::channel();
        self.pause_tx
            .send(PauseRequest { resume, done })
            .await
            .map_err(|_| stopping())?;
        outcome.await.map_err(|_| stopping())?
    }
}

/// Serves one control connection.
pub async fn handle(ctx: Arc<Ctx>, mut conn: UnixStream) {
    let req: Request = match control::read_json(&mut conn).await {
        Ok(r) => r,
        Err(e) => {
            let _ = control::write_json(
                &mut conn,
                &Reply::Error(format!("bad control request: {e}")),
            )
            .await;
            return;
        }
    };
    tracing::debug!(request = req.name(), "control request");
    let needs_guest = matches!(
        req,
        Request::Exec(_)
            | Request::File(_)
            | Request::Connect { .. }
            | Request::Listen { .. }
            | Request::Accept { .. }
            | Request::Launch { .. }
    );
    // Open while the request runs (an exec's whole stream); a launch counts only as it starts.
    let _busy = needs_guest.then(|| ctx.activity.begin());
    if needs_guest
        && ctx.paused.load(std::sync::atomic::Ordering::SeqCst)
        && ctx.idle_paused.load(std::sync::atomic::Ordering::SeqCst)
    {
        // Paused for being idle: this request wakes it.
        if let Err(e) = ctx.ask_pause(true).await {
            tracing::warn!("resuming for a request: {e}");
        }
    }
    if needs_guest && ctx.paused.load(std::sync::atomic::Ordering::SeqCst) {
        let msg = format!(
            "sandbox {} is paused; `matchlock resume {}` continues it",
            ctx.config.id, ctx.config.id
        );
        if matches!(req, Request::Launch { .. }) {
            let _ = control::write_json(&mut conn, &Reply::Error(msg)).await;
        } else {
            let _ = write_msg(&mut conn, &Msg::Error(msg)).await;
        }
        return;
    }
    match req {
        Request::Pause | Request::Resume => {
            let reply = match ctx.ask_pause(matches!(req, Request::Resume)).await {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e),
            };
            let _ = control::write_json(&mut conn, &reply).await;
        }
        Request::Exec(spec) => {
            let log = spec.log;
            let req = compose_exec(&ctx.config, spec);
            if log {
                splice_logged(&ctx, conn, Msg::Exec(req)).await;
            } else {
                splice(&ctx, conn, Msg::Exec(req)).await;
            }
        }
        Request::File(msg) => {
            if matches!(
                msg,
                Msg::WriteFile(_)
                    | Msg::ReadFile { .. }
                    | Msg::ListFiles { .. }
                    | Msg::ExportUpper { .. }
            ) {
                splice(&ctx, conn, msg).await;
            } else {
                let _ = write_msg(&mut conn, &Msg::Error("not a file operation".into())).await;
            }
        }
        Request::Stop { grace_ms } => {
            let (tx, rx) = oneshot::channel();
            let sent = ctx
                .stop_tx
                .send(StopRequest {
                    reason: "stopped by request".into(),
                    grace_ms,
                    done: Some(tx),
                })
                .await;
            if sent.is_ok() {
                let _ = rx.await;
            }
            let _ = control::write_json(&mut conn, &Reply::Ok).await;
        }
        Request::Connect { port } => splice(&ctx, conn, Msg::Connect { port }).await,
        Request::Listen { port } => splice(&ctx, conn, Msg::Listen { port }).await,
        Request::Accept { id } => splice(&ctx, conn, Msg::Accept { id }).await,
        Request::Launch { spec, settle_ms } => {
            let reply = match launch(ctx.clone(), spec, settle_ms).await {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e),
            };
            let _ = control::write_json(&mut conn, &reply).await;
        }
        Request::Ping => {
            let _ = control::write_json(&mut conn, &Reply::Ok).await;
        }
        Request::Events => {
            if !ctx.config.vfs_emit_events {
                let e = "this sandbox was created without workspace events (emit_events)";
                let _ = control::write_json(&mut conn, &Reply::Error(e.into())).await;
                return;
            }
            // Subscribed before the Ok, so the client misses nothing after it.
            let mut events = ctx.vfs.subscribe();
            if control::write_json(&mut conn, &Reply::Ok).await.is_err() {
                return;
            }
            loop {
                match events.recv().await {
                    Ok(e) => {
                        if control::write_json(&mut conn, &e).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!("event subscriber fell behind; {n} events dropped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
        Request::AllowList { add, remove } => {
            let updated = match &ctx.policy {
                Some(p) => p.update_hosts(&add, &remove),
                None => Err(
                    "allow-list updates unavailable: sandbox was started without network \
                             interception (it has no network)"
                        .into(),
                ),
            };
            let reply = match updated {
                Ok(u) => Reply::AllowList {
                    added: u.added,
                    removed: u.removed,
                    allowed_hosts: u.allowed,
                    deny_by_default: u.deny_by_default,
                },
                Err(e) => Reply::Error(e),
            };
            let _ = control::write_json(&mut conn, &reply).await;
        }
    }
}

/// Runs a detached command (`run -d`): its output and exit code go to `logs/vm.log`.
async fn launch(ctx: Arc<Ctx>, spec: ExecSpec, settle_ms: u64) -> Result<(), String> {
    let mut s = ctx.mux.open().await.map_err(|e| e.to_string())?;
    write_msg(&mut s, &Msg::Exec(compose_exec(&ctx.config, spec)))
        .await
        .map_err(|e| e.to_string())?;
    // A guest that never answers must not hang `run -d`.
    let first = tokio::time::timeout(Duration::from_secs(30), read_msg(&mut s))
        .await
        .map_err(|_| "the guest did not start the command within 30 s".to_string())?;
    match first {
        Ok(Some(Msg::Started { .. })) => {}
        Ok(Some(Msg::Error(e))) => return Err(e),
        other => return Err(format!("unexpected reply {other:?}")),
    }
    let (exit_tx, exit_rx) = oneshot::channel::<i32>();
    let id = ctx.config.id.clone();
    tokio::spawn(async move {
        let mut exit_tx = Some(exit_tx);
        loop {
            match read_msg(&mut s).await {
                Ok(Some(Msg::Stdout(d))) | Ok(Some(Msg::Stderr(d))) => {
                    ctx.log.lock().await.append(&d);
                }
                Ok(Some(Msg::Exited(st))) => {
                    let line = format!("[matchlock] command exited with code {}\n", st.code);
                    ctx.log.lock().await.append(line.as_bytes());
                    if let Some(tx) = exit_tx.take() {
                        let _ = tx.send(st.code);
                    }
                    break;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    });
    if settle_ms > 0 {
        if let Ok(Ok(code)) = tokio::time::timeout(Duration::from_millis(settle_ms), exit_rx).await
        {
            if code != 0 {
                return Err(format!(
                    "the command exited with code {code} right after starting; see 'matchlock log {id}'"
                ));
            }
        }
    }
    Ok(())
}

/// Opens a guest stream, sends `first`, then copies bytes both ways until either side is done.
async fn splice(ctx: &Ctx, mut conn: UnixStream, first: Msg) {
    let mut stream = match ctx.mux.open().await {
        Ok(s) => s,
        Err(e) => {
            let _ = write_msg(
                &mut conn,
                &Msg::Error(format!("sandbox is shutting down: {e}")),
            )
            .await;
            return;
        }
    };
    if let Err(e) = write_msg(&mut stream, &first).await {
        let _ = write_msg(&mut conn, &Msg::Error(format!("guest channel: {e}"))).await;
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut stream).await;
}

/// Like [`splice`] for an exec whose output also goes to `logs/vm.log` (`run`'s command): the
/// guest's messages are read one by one, their output appended to the log, and passed on.
async fn splice_logged(ctx: &Ctx, conn: UnixStream, first: Msg) {
    let mut stream = match ctx.mux.open().await {
        Ok(s) => s,
        Err(e) => {
            let mut conn = conn;
            let _ = write_msg(
                &mut conn,
                &Msg::Error(format!("sandbox is shutting down: {e}")),
            )
            .await;
            return;
        }
    };
    if write_msg(&mut stream, &first).await.is_err() {
        return;
    }
    let (mut guest_rd, mut guest_wr) = tokio::io::split(stream);
    let (mut client_rd, mut client_wr) = conn.into_split();
    let to_guest = async {
        let _ = tokio::io::copy(&mut client_rd, &mut guest_wr).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut guest_wr).await;
    };
    let to_client = async {
        while let Ok(Some(m)) = read_msg(&mut guest_rd).await {
            match &m {
                Msg::Stdout(d) | Msg::Stderr(d) => ctx.log.lock().await.append(d),
                Msg::Exited(st) => {
                    let line = format!("[matchlock] command exited with code {}\n", st.code);
                    ctx.log.lock().await.append(line.as_bytes());
                }
                _ => {}
            }
            if write_msg(&mut client_wr, &m).await.is_err() {
                break;
            }
        }
    };
    // Either side ending ends the exec (the guest kills a process whose stream closes).
    tokio::select! {
        _ = to_guest => {}
        _ = to_client => {}
    }
}

/// Fills an exec with the sandbox's defaults: base env (overridden by the request's), working
/// directory, user and privilege.
pub fn compose_exec(config: &SandboxConfig, spec: ExecSpec) -> ExecRequest {
    let mut env = config.env.clone();
    for (k, v) in spec.env {
        match env.iter_mut().find(|(ek, _)| *ek == k) {
            Some(slot) => slot.1 = v,
            None => env.push((k, v)),
        }
    }
    ExecRequest {
        argv: spec.argv,
        env,
        cwd: spec
            .cwd
            .or_else(|| config.workdir.clone())
            .or_else(|| Some(matchlock_api::defaults::WORKDIR.into())),
        user: spec.user.or_else(|| config.user.clone()),
        tty: spec.tty,
        stdin: spec.stdin,
        privileged: config.privileged,
    }
}
