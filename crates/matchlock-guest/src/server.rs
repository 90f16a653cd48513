//! The session: one yamux server over the host channel, one task per inbound stream.

use crate::files::{self, msg_name};
use crate::{exec, forward, init, log, reaper, vfs};
use matchlock_proto::mux::{Mux, Role, Stream};
use matchlock_proto::{read_msg, write_msg, Msg, Setup};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

/// The read half of a stream.
pub type Reader = ReadHalf<Stream>;
/// The write half of a stream.
pub type Writer = WriteHalf<Stream>;

/// How the agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of the VM: owns mounts, the clock, power.
    Init,
    /// `--listen-unix` on a development host: only exec and file requests do real work.
    Test,
}

/// State shared by all streams.
pub struct Agent {
    /// How the agent runs.
    pub mode: Mode,
    /// The prebuilt seccomp program of unprivileged execs (`None` if it failed to build; such
    /// execs are then refused).
    pub seccomp: Option<Arc<seccompiler::BpfProgram>>,
    /// `cgroup.procs` of the workload cgroup, once Setup created one.
    pub cgroup_procs: OnceLock<OwnedFd>,
    /// Set by the first Setup; a second one is refused.
    setup_started: AtomicBool,
    /// The session, for streams the guest opens towards the host (workspace filesystems).
    mux: OnceLock<Mux>,
    /// Connections accepted on `Listen` streams, waiting for the host's `Accept`.
    pub accepted: forward::Accepted,
}

impl Agent {
    /// A fresh agent state.
    pub fn new(mode: Mode, seccomp: Option<seccompiler::BpfProgram>) -> Self {
        Self {
            mode,
            seccomp: seccomp.map(Arc::new),
            cgroup_procs: OnceLock::new(),
            setup_started: AtomicBool::new(false),
            mux: OnceLock::new(),
            accepted: forward::Accepted::default(),
        }
    }
}

/// Runs the session over `io` until it ends; returns why it ended.
pub async fn serve<T>(agent: Arc<Agent>, io: T) -> String
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mux, mut inbound, driver) = Mux::start(io, Role::Server);
    let _ = agent.mux.set(mux);
    while let Some(stream) = inbound.recv().await {
        let agent = agent.clone();
        // A panic in one handler ends that task (and resets its stream), nothing else.
        tokio::spawn(handle(agent, stream));
    }
    match driver.await {
        Ok(Ok(())) => "the host closed the channel".into(),
        Ok(Err(e)) => format!("channel error: {e}"),
        Err(e) => format!("channel task failed: {e}"),
    }
}

/// Serves one stream: reads the request and dispatches it.
async fn handle(agent: Arc<Agent>, stream: Stream) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let request = match read_msg(&mut rd).await {
        Ok(Some(m)) => m,
        Ok(None) => return,
        Err(e) => {
            let _ = write_msg(&mut wr, &Msg::Error(format!("bad request: {e}"))).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    let result = match request {
        Msg::Exec(req) => {
            exec::run(agent, req, rd, wr).await;
            return;
        }
        Msg::Shutdown { grace_ms } => {
            shutdown(&agent, grace_ms, rd, wr).await;
            return;
        }
        Msg::Setup(setup) => write_msg(&mut wr, &run_setup(&agent, setup).await).await,
        Msg::WriteFile(req) => files::write(req, &mut rd, &mut wr).await,
        Msg::ReadFile { path } => files::read(&path, &mut wr).await,
        Msg::ListFiles { path } => files::list(&path, &mut wr).await,
        Msg::Connect { port } => {
            forward::connect(port, rd, wr).await;
            return;
        }
        Msg::Listen { port } => {
            forward::listen(&agent, port, rd, wr).await;
            return;
        }
        Msg::Accept { id } => {
            forward::accept(&agent, id, rd, wr).await;
            return;
        }
        Msg::ExportUpper {
            exclude,
            stop_processes,
        } => {
            crate::layer::export(exclude, stop_processes, agent.mode == Mode::Init, wr).await;
            return;
        }
        Msg::SetClock { unix_ms } => {
            let reply = match crate::init::set_clock(unix_ms) {
                Ok(()) => Msg::Ok,
                Err(e) => Msg::Error(e),
            };
            write_msg(&mut wr, &reply).await
        }
        other => {
            let text = format!("unexpected request {}", msg_name(&other));
            write_msg(&mut wr, &Msg::Error(text)).await
        }
    };
    if let Err(e) = result {
        log(format_args!("stream: {e}"));
    }
    let _ = wr.shutdown().await;
}

async fn run_setup(agent: &Arc<Agent>, setup: Setup) -> Msg {
    if agent.setup_started.swap(true, Ordering::SeqCst) {
        return Msg::Error("Setup was already done (it runs once per boot)".into());
    }
    if agent.mode == Mode::Test {
        // Mounting and switching root need PID 1 in a VM; the test mode only acknowledges.
        return Msg::Ok;
    }
    let result = tokio::task::spawn_blocking(move || {
        let cgroup = init::setup(&setup)?;
        vfs::mount_all(&setup.vfs)?;
        Ok::<_, String>(cgroup)
    })
    .await;
    match result {
        Ok(Ok(cgroup)) => {
            if let Some(fd) = cgroup {
                let _ = agent.cgroup_procs.set(fd);
            }
            Msg::Ok
        }
        Ok(Err(e)) => {
            log(format_args!("setup failed: {e}"));
            Msg::Error(e)
        }
        Err(e) => Msg::Error(format!("setup failed: {e}")),
    }
}

/// How long to wait for the host to close the Shutdown stream after the final Ok: the close
/// proves the Ok arrived before the guest powers off.
const SHUTDOWN_ACK_WAIT: Duration = Duration::from_secs(1);

async fn shutdown(agent: &Arc<Agent>, grace_ms: u64, mut rd: Reader, mut wr: Writer) {
    if agent.mode == Mode::Init {
        let grace = Duration::from_millis(grace_ms);
        let _ = tokio::task::spawn_blocking(move || init::stop_all_processes(grace)).await;
    } else {
        // Test mode: only the agent's own children, never kill(-1) on a development host.
        for pid in reaper::live_pids() {
            // SAFETY: plain syscall.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    }
    nix::unistd::sync();
    let _ = write_msg(&mut wr, &Msg::Ok).await;
    let _ = wr.shutdown().await;
    let _ = tokio::time::timeout(SHUTDOWN_ACK_WAIT, async {
        while let Ok(Some(_)) = read_msg(&mut rd).await {}
    })
    .await;
    match agent.mode {
        Mode::Init => init::power_off(),
        Mode::Test => std::process::exit(0),
    }
}
