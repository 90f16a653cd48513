//! The per-sandbox supervisor: a detached process (`matchlock __supervise <id>`) that owns one VM.
//!
//! It holds the sandbox's lock for its whole life (so a dead supervisor is visible as `crashed`),
//! starts QEMU with `PR_SET_PDEATHSIG` (so QEMU never outlives it), speaks the guest protocol over
//! the agent channel, copies the serial console into `logs/vm.log`, serves the control socket,
//! enforces the lifetime timeout, and on stop shuts the guest down and reclaims what the sandbox
//! used. It tells the process that spawned it how the boot went through an inherited pipe (fd 3).
//!
//! The rooms: [`lifecycle`] (states and the one failure path), [`vm`] (QEMU, its sockets and
//! disk), [`guest`] (the agent's boot handshake), [`link`] (the agent channel and NIC, which
//! outlive one QEMU), [`pause`] (pause and resume), [`template`] (fast start), [`control`] (the
//! control socket's requests), [`console`] (the sandbox log), [`process`] (what the parent hands
//! over). The network and the
//! workspace are built by their own crates (`matchlock_net::setup`, `matchlock_vfs::workspace`)
//! from their parts of the configuration.

mod confine;
mod console;
mod control;
mod cpu_limit;
mod guest;
pub mod lifecycle;
mod link;
mod pause;
mod process;
mod template;
pub use template::shares_ram as templates_share_memory;
mod vm;

pub use control::compose_exec;
pub use process::{READY_FD, SECRETS_FD};

use crate::config::{PublishedPort, SandboxConfig};
use crate::store::Store;
use crate::SandboxError;
use control::{Ctx, StopRequest};
use lifecycle::Lifecycle;
use matchlock_proto::mux::Mux;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};
use vm::Vm;

/// How long the guest may take from QEMU start to the agent's hello. Generous because TCG on a
/// loaded 2-core machine can be slow; KVM boots in well under a second.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs the supervisor for sandbox `id` in this process. Returns the process exit code.
pub fn run(store: Store, id: &str) -> i32 {
    let ready = process::ready_pipe();
    let secrets = process::read_secrets();
    let Ok(mut life) = Lifecycle::begin(store.clone(), id, ready) else {
        return 1;
    };
    // Still one thread, nothing spawned: every later thread, and QEMU, inherits the confinement.
    if let Err(e) = confine::confine() {
        return life.fail(&format!("cannot drop the supervisor's privileges: {e}"));
    }
    let config = life.config().clone();
    let started = Instant::now();
    process::defer_signals();
    // Resolve the owner now, while our parent (the `run` that spawned us) is certainly still the
    // process it claims to be; later its pid could be recycled.
    let owner = process::open_owner(config.owner_pid);
    tracing::info!(
        id,
        image = %config.image,
        vcpus = config.vcpus(),
        memory_mb = config.memory_mb,
        "starting the sandbox"
    );
    let spawned = match vm::spawn(&store, &config) {
        Ok(s) => s,
        Err(e) => return life.fail(&e.to_string()),
    };
    life.note(|s| {
        s.qemu_pid = Some(spawned.vm.pid());
        s.accel = Some(spawned.accel.accel.to_string());
        s.start = Some(spawned.start.clone());
    });
    // A fractional CPU share is held on the host too: the guest's own cgroup is guest root's
    // to rewrite. Where the host has no usable cgroup, only the guest's holds (and we say so).
    let _cpu_limit = config.cpu_max().and_then(|max| {
        cpu_limit::apply(id, spawned.vm.pid(), max)
            .map_err(|e| tracing::warn!("--cpus {} holds only inside the guest: {e}", config.cpus))
            .ok()
    });
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return life.fail(&format!("cannot start the async runtime: {e}")),
    };
    rt.block_on(supervise(
        life,
        store,
        spawned,
        started,
        owner,
        secrets,
        _cpu_limit.as_ref(),
    ))
}

/// Boots the guest, serves the sandbox until something stops it, and stops it.
async fn supervise(
    mut life: Lifecycle,
    store: Store,
    spawned: vm::Spawned,
    started: Instant,
    owner: process::Owner,
    secrets: Vec<(String, String)>,
    cpu_limit: Option<&cpu_limit::CpuLimit>,
) -> i32 {
    let config = life.config().clone();
    let dir = store.dir(&config.id);
    let vm::Spawned {
        mut vm,
        listeners,
        template,
        qmp,
        ..
    } = spawned;
    let restored = template.is_some();
    let sandbox = match start(&config, &dir, &mut vm, listeners, restored, &secrets, qmp).await {
        Ok(s) => s,
        Err(mut e) => {
            vm.kill();
            if let Some(t) = template {
                // A guest restored from it did not come up: it is not trusted again.
                let _ = std::fs::remove_dir_all(&t);
                e.push_str("\n  (it started from a template snapshot, now removed: the next start boots and prepares a new one; --no-snapshot boots cold)");
            }
            // Give the console copier a moment to flush what the guest printed before dying.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return life.fail(&e);
        }
    };
    let forwards = sandbox
        .forwards
        .as_ref()
        .map(|f| {
            f.bindings()
                .iter()
                .map(|b| PublishedPort {
                    address: b.address,
                    local_port: b.local_port,
                    remote_port: b.remote_port,
                })
                .collect()
        })
        .unwrap_or_default();
    let boot_ms = started.elapsed().as_millis() as u64;
    tracing::info!(boot_ms, "guest ready");
    life.running(boot_ms, forwards);
    let deadline = config
        .timeout_secs
        .map(|t| tokio::time::Instant::from_std(started + Duration::from_secs(t)));
    let mut sandbox = sandbox;
    let stop = serve(
        &config,
        &dir,
        &mut sandbox,
        &mut vm,
        &mut life,
        owner,
        deadline,
        cpu_limit,
    )
    .await;
    life.stopping(&stop.reason);
    let Running {
        mux,
        control,
        forwards,
        mut stop_rx,
        ..
    } = sandbox;
    drop(forwards);
    drop(control);
    let _ = std::fs::remove_file(dir.join("control.sock"));
    if !stop.vm_gone {
        vm.shutdown(&mux, stop.grace_ms).await;
    }
    let _ = std::fs::remove_file(vm::paused_state(&dir));
    let mut waiters = stop.waiters;
    // Late stop requests still deserve an answer.
    while let Ok(mut req) = stop_rx.try_recv() {
        waiters.extend(req.done.take());
    }
    life.stopped();
    for w in waiters {
        let _ = w.send(());
    }
    // Let the stop replies reach their clients before the runtime goes away.
    tokio::time::sleep(Duration::from_millis(20)).await;
    0
}

/// A sandbox that is up.
struct Running {
    ctx: Arc<Ctx>,
    mux: Mux,
    control: UnixListener,
    forwards: Option<crate::forward::Forwarder>,
    stop_rx: mpsc::Receiver<StopRequest>,
    pause_rx: mpsc::Receiver<control::PauseRequest>,
    links: Links,
}

/// What connects the sandbox to its QEMU, kept so that a resumed QEMU connects again.
struct Links {
    agent: link::AgentLink,
    agent_listener: UnixListener,
    /// The NIC's link and the listener its QEMU connects to.
    net: Option<(link::NetLink, UnixListener)>,
    /// QEMU's monitor (none while paused, or if QEMU did not connect it).
    qmp: Option<matchlock_vmm::qmp::Qmp>,
}

/// Why and how the sandbox stops.
struct Stop {
    reason: String,
    grace_ms: u64,
    /// QEMU exited by itself (nothing to shut down).
    vm_gone: bool,
    /// Stop requests waiting to hear that the VM stopped.
    waiters: Vec<oneshot::Sender<()>>,
}

/// Everything between QEMU's start and a guest that accepts commands: the workspace server,
/// the log, the network, the guest's boot and CA, the control socket, the published ports.
/// An error is the start's failure message.
async fn start(
    config: &SandboxConfig,
    dir: &Path,
    vm: &mut Vm,
    listeners: vm::Listeners,
    restored: bool,
    secrets: &[(String, String)],
    qmp: vm::PendingQmp,
) -> Result<Running, String> {
    let rules = config.vfs_block_rules.clone();
    let (vfs, guest_vfs) = matchlock_vfs::workspace(
        &config.vfs,
        &rules,
        config.vfs_emit_events,
        config.memory_mb.saturating_mul(1 << 20),
        dir,
    )?;
    let vfs = Arc::new(vfs);
    let log = console::CappedLog::open(dir).map_err(|e| format!("cannot open logs/vm.log: {e}"))?;
    // Workspace: QEMU's virtio-fs device connects to vfs.sock (QEMU waits for the handshake).
    if let Some(l) = listeners.vfs {
        vfs.serve_virtiofs(l)
            .map_err(|e| format!("starting the workspace device: {e}"))?;
    }
    let tokio_listener =
        |l| UnixListener::from_std(l).map_err(|e| format!("socket setup failed: {e}"));
    let agent = tokio_listener(listeners.agent)?;
    console::copy_console(tokio_listener(listeners.console)?, log.clone());

    // Network: QEMU connects its NIC to net.sock; the stack serves it, through a link that a
    // resumed QEMU connects to again, for the sandbox's lifetime.
    let mut proxy = None;
    let mut policy = None;
    let mut net_link = None;
    if let (Some(l), Some(net)) = (listeners.net, &config.network) {
        let l = tokio_listener(l)?;
        let upstream_ca =
            match std::env::var_os("MATCHLOCK_UPSTREAM_CA").filter(|p| !p.is_empty()) {
                Some(p) => Some(std::fs::read(&p).map_err(|e| {
                    format!("MATCHLOCK_UPSTREAM_CA {}: {e}", Path::new(&p).display())
                })?),
                None => None,
            };
        let stack = matchlock_net::setup::build(matchlock_net::setup::SandboxNet {
            id: &config.id,
            network: net,
            add_hosts: &config.add_hosts,
            secrets,
            upstream_ca: upstream_ca.as_deref(),
        })?;
        proxy = stack.intercept.clone();
        policy = Some(stack.policy.clone());
        let (link_tx, link_rx) = oneshot::channel();
        tokio::spawn(async move {
            if let Ok((conn, _)) = l.accept().await {
                let Ok((link, conn)) = link::NetLink::start(conn) else {
                    return;
                };
                let _ = link_tx.send((link, l));
                if let Err(e) = matchlock_net::serve(conn, stack).await {
                    tracing::warn!("network stack stopped: {e}");
                }
            }
        });
        net_link = Some(link_rx);
    }

    let boot = guest::boot(&agent, guest::setup(config, guest_vfs), restored);
    let booted = tokio::select! {
        r = tokio::time::timeout(BOOT_TIMEOUT, boot) => match r {
            Ok(r) => r,
            Err(_) => Err(format!("the guest did not come up within {} s", BOOT_TIMEOUT.as_secs())),
        },
        status = &mut vm.exit => {
            let qlog = std::fs::read_to_string(dir.join("logs").join("qemu.log")).unwrap_or_default();
            let first = qlog.lines().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
            Err(format!("QEMU exited during boot ({}) {first}", status.unwrap_or_default()))
        }
    };
    let failed = |e: String| {
        format!(
            "sandbox failed to boot: {e}{}{}",
            guest::kernel_hint(config),
            console::tail(dir)
        )
    };
    let (mux, agent_link) = booted.map_err(failed)?;
    tracing::debug!("guest set up");
    // The guest configured its NIC, so QEMU connected it long ago.
    let net = match net_link {
        Some(rx) => Some(
            rx.await
                .map_err(|_| failed("QEMU did not connect the NIC".into()))?,
        ),
        None => None,
    };
    // The workspace is served by now, so QEMU's devices are up and its monitor greets.
    let qmp = tokio::task::spawn_blocking(move || qmp.wait())
        .await
        .ok()
        .flatten();
    let links = Links {
        agent: agent_link,
        agent_listener: agent,
        net,
        qmp,
    };
    // The sandbox CA goes into the guest's trust store before anything runs.
    if let Some(p) = &proxy {
        guest::install_ca(&mux, p.ca_pem())
            .await
            .map_err(|e| failed(format!("installing the sandbox CA: {e}")))?;
        // With SSH egress, the guest's ssh must trust the egress proxy's key for every server.
        if let Some(line) = p.ssh_known_hosts_line() {
            guest::append_file(&mux, guest::GUEST_SSH_KNOWN_HOSTS, &line)
                .await
                .map_err(|e| failed(format!("installing the SSH egress key: {e}")))?;
        }
    }

    let control_path = dir.join("control.sock");
    let control = UnixListener::bind(&control_path)
        .map_err(|e| format!("cannot bind the control socket: {e}"))?;
    let _ = std::fs::set_permissions(&control_path, std::fs::Permissions::from_mode(0o600));
    // Published ports live as long as the sandbox, whoever started it; a port that cannot be
    // bound fails the start.
    let forwards = start_forwards(config, &control_path).await?;
    let (stop_tx, stop_rx) = mpsc::channel::<StopRequest>(16);
    let (pause_tx, pause_rx) = mpsc::channel(4);
    let ctx = Arc::new(Ctx {
        config: config.clone(),
        mux: mux.clone(),
        stop_tx,
        log,
        policy,
        vfs,
        pause_tx,
        paused: std::sync::atomic::AtomicBool::new(false),
        idle_paused: std::sync::atomic::AtomicBool::new(false),
        activity: control::Activity::default(),
    });
    Ok(Running {
        ctx,
        mux,
        control,
        forwards,
        stop_rx,
        pause_rx,
        links,
    })
}

/// Serves control connections until something stops the sandbox: a stop request, QEMU exiting,
/// a signal, the owner exiting, the lifetime limit. Pauses and resumes it when asked.
#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &SandboxConfig,
    dir: &Path,
    sandbox: &mut Running,
    vm: &mut Vm,
    life: &mut Lifecycle,
    owner: process::Owner,
    deadline: Option<tokio::time::Instant>,
    cpu_limit: Option<&cpu_limit::CpuLimit>,
) -> Stop {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).ok();
    let mut sigint = signal(SignalKind::interrupt()).ok();
    let owner_gone = process::owner_exit(owner);
    tokio::pin!(owner_gone);
    let grace = config.graceful_shutdown_ms;
    // While paused there is no QEMU: nothing to shut down, and its exit is not news.
    let stop = |reason: &str, grace_ms: u64, paused: bool| Stop {
        reason: reason.to_string(),
        grace_ms,
        vm_gone: paused,
        waiters: Vec::new(),
    };
    loop {
        let paused = life.status() == crate::config::Status::Paused;
        let stop = |reason: &str, grace_ms: u64| stop(reason, grace_ms, paused);
        tokio::select! {
            conn = sandbox.control.accept() => {
                if let Ok((conn, _)) = conn {
                    let ctx = sandbox.ctx.clone();
                    tokio::spawn(async move { control::handle(ctx, conn).await });
                }
            }
            req = sandbox.stop_rx.recv() => {
                if let Some(mut req) = req {
                    let mut s = stop(&req.reason, req.grace_ms.unwrap_or(grace));
                    s.waiters.extend(req.done.take());
                    return s;
                }
            }
            req = sandbox.pause_rx.recv() => {
                if let Some(req) = req {
                    let done = if req.resume {
                        pause::resume(config, dir, sandbox, vm, life, cpu_limit).await
                    } else {
                        pause::pause(config, dir, sandbox, vm, life, false).await
                    };
                    if let Err(e) = &done {
                        tracing::warn!("{e}");
                    }
                    let _ = req.done.send(done);
                }
            }
            _ = idle_for(config.idle_pause_secs, &sandbox.ctx.activity), if !paused => {
                if let Err(e) = pause::pause(config, dir, sandbox, vm, life, true).await {
                    tracing::warn!("idle pause: {e}");
                    // Not again before another idle period.
                    sandbox.ctx.activity.touch();
                }
            }
            status = &mut vm.exit, if !paused => {
                let mut s = stop(&format!("the VM exited ({})", status.unwrap_or_default()), 0);
                s.vm_gone = true;
                return s;
            }
            _ = async { match sigterm.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
                return stop("stopped by SIGTERM", grace);
            }
            _ = async { match sigint.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
                return stop("stopped by SIGINT", grace);
            }
            _ = process::deferred_signal() => return stop("stopped by a signal during boot", grace),
            _ = &mut owner_gone => return stop("its owner process exited", grace),
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                return stop(&format!("timeout after {}s", config.timeout_secs.unwrap_or(0)), 0);
            }
        }
    }
}

/// Returns once nothing from the host has needed the guest for `secs` (never without `secs`).
async fn idle_for(secs: Option<u64>, activity: &control::Activity) {
    let Some(secs) = secs else {
        return std::future::pending().await;
    };
    loop {
        match activity.idle_since() {
            Some(since) => {
                let due = since + Duration::from_secs(secs);
                if tokio::time::Instant::now() >= due {
                    return;
                }
                tokio::time::sleep_until(due).await;
            }
            // Something is open; look again in a while.
            None => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// Binds the sandbox's published ports ([`SandboxConfig::publish`]); `None` when it has none.
async fn start_forwards(
    config: &SandboxConfig,
    control: &Path,
) -> Result<Option<crate::forward::Forwarder>, String> {
    if config.publish.is_empty() {
        return Ok(None);
    }
    let client = crate::client::Client::at(&config.id, control.to_path_buf());
    let pairs: Vec<_> = config
        .publish
        .iter()
        .map(|p| {
            (
                crate::forward::PortMap {
                    local_port: p.local_port,
                    remote_port: p.remote_port,
                },
                p.address,
            )
        })
        .collect();
    crate::forward::Forwarder::start_pairs(client, &pairs)
        .await
        .map(Some)
        .map_err(|e| format!("port forward: {e}"))
}

/// Where the supervisor binary is: this executable.
pub fn supervisor_exe() -> Result<PathBuf, SandboxError> {
    std::env::current_exe().map_err(SandboxError::io("finding the matchlock executable"))
}
