//! The Matchlock guest agent.
//!
//! As PID 1 of a sandbox VM (`/init` of the initramfs) it mounts the API filesystems, opens the
//! virtio-serial port named [`matchlock_proto::PORT_NAME`], writes [`matchlock_proto::HELLO`] and
//! serves the host's requests (see `matchlock_proto::Msg`) until it is told to shut down.
//!
//! `matchlock-guest --listen-unix PATH` runs the same request handling on a Unix socket on a
//! development host (one connection), without anything that needs PID 1; the integration tests use it.

// The agent handles what the host and guest processes send; a panic would take the guest down.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod channel;
mod exec;
mod files;
mod forward;
mod init;
mod layer;
mod net;
mod reaper;
mod seccomp;
mod server;
mod sftp;
mod tty;
mod users;
mod vfs;

use server::{Agent, Mode};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Writes one line to stderr, which is the console (the host's `vm.log`) in a VM. Never panics:
/// `eprintln!` would, if stderr were gone.
pub(crate) fn log(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr(), "matchlock-guest: {args}");
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn seccomp_program() -> Option<seccompiler::BpfProgram> {
    match seccomp::build() {
        Ok(p) => Some(p),
        Err(e) => {
            log(format_args!(
                "building the seccomp filter failed ({e}); unprivileged execs will be refused"
            ));
            None
        }
    }
}

/// How long PID 1 waits for the agent port to show up in sysfs.
const PORT_WAIT: Duration = Duration::from_secs(10);

/// PID 1: never returns; every way out powers the VM off.
fn init_main() -> ! {
    let outcome = std::panic::catch_unwind(|| -> Result<String, String> {
        init::early()?;
        let rt = runtime().map_err(|e| format!("starting the runtime: {e}"))?;
        rt.block_on(async {
            reaper::start().map_err(|e| format!("SIGCHLD handler: {e}"))?;
            // Before HELLO, so that HELLO means the agent can serve right away.
            init::wait_for_entropy();
            let start = Instant::now();
            let path = loop {
                match channel::find_port() {
                    Ok(Some(p)) => break p,
                    Ok(None) if start.elapsed() < PORT_WAIT => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Ok(None) => {
                        return Err(format!(
                            "no virtio-serial port named {}",
                            matchlock_proto::PORT_NAME
                        ))
                    }
                    Err(e) => return Err(format!("looking for the agent port: {e}")),
                }
            };
            let fd = channel::open_port(&path)
                .map_err(|e| format!("opening {}: {e}", path.display()))?;
            let mut io = channel::PortIo::new(fd).map_err(|e| format!("agent port: {e}"))?;
            tokio::io::AsyncWriteExt::write_all(&mut io, matchlock_proto::HELLO)
                .await
                .map_err(|e| format!("writing HELLO: {e}"))?;
            let agent = Arc::new(Agent::new(Mode::Init, seccomp_program()));
            Ok(server::serve(agent, io).await)
        })
    });
    match outcome {
        Ok(Ok(why)) => init::fatal(&format!("session ended: {why}")),
        Ok(Err(e)) => init::fatal(&e),
        Err(_) => init::fatal("panic (see above)"),
    }
}

/// Test mode: one connection on a Unix socket, then exit.
fn test_main(path: &std::ffi::OsStr) -> i32 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            log(format_args!("starting the runtime: {e}"));
            return 1;
        }
    };
    rt.block_on(async {
        if let Err(e) = reaper::start() {
            log(format_args!("SIGCHLD handler: {e}"));
            return 1;
        }
        let listener = match tokio::net::UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) => {
                log(format_args!("binding {}: {e}", path.to_string_lossy()));
                return 1;
            }
        };
        let mut conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                log(format_args!("accept: {e}"));
                return 1;
            }
        };
        drop(listener);
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut conn, matchlock_proto::HELLO).await
        {
            log(format_args!("writing HELLO: {e}"));
            return 1;
        }
        let agent = Arc::new(Agent::new(Mode::Test, seccomp_program()));
        let why = server::serve(agent, conn).await;
        // Whatever is still running belongs to a session that is gone.
        for pid in reaper::live_pids() {
            // SAFETY: plain syscall on our own children's process groups.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        log(format_args!("{why}"));
        0
    })
}

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 2 && args[1] == matchlock_proto::SFTP_SERVER_ARGV[1] {
        std::process::exit(sftp::main());
    }
    if args.len() == 3 && args[1] == "--listen-unix" {
        std::process::exit(test_main(&args[2]));
    }
    if std::process::id() == 1 {
        init_main();
    }
    let _ = writeln!(
        std::io::stderr(),
        "usage: matchlock-guest            (as PID 1 of a Matchlock VM)\n       matchlock-guest --listen-unix PATH   (test mode)\n       matchlock-guest --sftp-server        (SFTP on stdin/stdout, run by the agent)"
    );
    std::process::exit(2);
}
