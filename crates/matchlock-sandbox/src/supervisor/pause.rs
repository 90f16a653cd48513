//! Pause and resume: the guest's memory and devices saved into the sandbox directory and QEMU
//! ended (its memory back to the host), then a new QEMU started from that file.
//!
//! The agent channel and the NIC run through [links](super::link), so the multiplexer (every
//! open exec, file transfer and forwarded connection) and the network stack (every flow) keep
//! their state across the two QEMUs. Before the save the agent link stops taking host bytes and
//! waits until QEMU has read all it was sent, so no byte of the channel is in flight outside
//! the guest when it stops. The snapshot format, its checksum and the restore are the templates'
//! (`matchlock_vmm::snapshot`).
//!
//! Both run in the supervisor's main future (on the main thread), because the new QEMU must be
//! started by the thread that lives as long as the supervisor (`PR_SET_PDEATHSIG`).

use super::lifecycle::Lifecycle;
use super::vm::{self, Vm};
use super::Running;
use crate::config::{now_secs, PausedInfo, SandboxConfig, Status};
use matchlock_proto::{read_msg, write_msg, Msg};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `query-migrate` statuses of a migration still under way.
const MIGRATING: &[&str] = &["setup", "active", "cancelling", "device", "pre-switchover"];

/// How long a new QEMU may take to connect its agent channel and NIC after the restore.
const RECONNECT: Duration = Duration::from_secs(10);

/// Pauses the sandbox (`idle`: for `--idle-pause`, so that the next request resumes it); see
/// the module docs. On error it runs on as before.
pub(super) async fn pause(
    config: &SandboxConfig,
    dir: &Path,
    run: &mut Running,
    vm: &mut Vm,
    life: &mut Lifecycle,
    idle: bool,
) -> Result<(), String> {
    if life.status() == Status::Paused {
        if !idle && run.ctx.idle_paused.swap(false, Ordering::SeqCst) {
            // Paused for being idle, now asked for by the user: requests no longer wake it.
            return Ok(());
        }
        return Err(format!("sandbox {} is already paused", config.id));
    }
    if !config.vfs.is_empty() {
        return Err(
            "a sandbox with workspace mounts cannot be paused: QEMU 7.2 cannot save a \
                    virtio-fs device (stop it instead)"
                .into(),
        );
    }
    let Some(qmp) = run.links.qmp.as_mut() else {
        return Err("this sandbox's QEMU has no monitor connection, so it cannot be paused".into());
    };
    let started = Instant::now();
    run.ctx.idle_paused.store(idle, Ordering::SeqCst);
    run.ctx.paused.store(true, Ordering::SeqCst);
    if let Err(e) = run.links.agent.quiesce().await {
        run.links.agent.reopen().await;
        run.ctx.paused.store(false, Ordering::SeqCst);
        return Err(format!("cannot pause: {e}"));
    }
    let saved = match vm::pause(qmp, dir) {
        Ok(s) => s,
        Err(e) => {
            // The guest is stopped but QEMU still holds it: end the migration (QEMU would
            // otherwise stop the VM again when it fails), then let the guest run on.
            let _ = qmp.execute("migrate_cancel", None);
            for _ in 0..500 {
                match qmp.migration() {
                    Ok((s, _)) if MIGRATING.contains(&s.as_str()) => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => break,
                }
            }
            let _ = qmp.execute("cont", None);
            run.links.agent.reopen().await;
            run.ctx.paused.store(false, Ordering::SeqCst);
            return Err(format!("pausing failed: {e}"));
        }
    };
    run.links.qmp = None;
    if tokio::time::timeout(Duration::from_secs(10), &mut vm.exit)
        .await
        .is_err()
    {
        vm.kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut vm.exit).await;
    }
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        bytes = saved.file_bytes,
        idle,
        "paused"
    );
    life.paused(PausedInfo {
        at: now_secs(),
        idle,
        bytes: saved.file_bytes,
        sha256: saved.sha256,
    });
    Ok(())
}

/// Resumes a paused sandbox; see the module docs. On error it stays paused (the file is kept,
/// so another `resume` can try again).
pub(super) async fn resume(
    config: &SandboxConfig,
    dir: &Path,
    run: &mut Running,
    vm: &mut Vm,
    life: &mut Lifecycle,
    cpu_limit: Option<&super::cpu_limit::CpuLimit>,
) -> Result<(), String> {
    let Some(info) = life.paused_info() else {
        return Err(format!("sandbox {} is not paused", config.id));
    };
    let started = Instant::now();
    let (new_vm, qmp) = vm::resume(dir, config, &info.sha256)
        .map_err(|e| format!("resuming failed, the sandbox stays paused: {e}"))?;
    // QEMU connected its agent channel and NIC as it started; the guest already runs.
    // Both connections are taken before either link switches over, so a failure here leaves the
    // links as the pause left them (and the file ready for another try). What the short-lived
    // guest sent is dropped with its QEMU; the next resume starts again from the file.
    let pid = new_vm.pid();
    let reconnect = async {
        let agent = accept_from(&run.links.agent_listener, pid)
            .await
            .map_err(|e| format!("agent channel: {e}"))?;
        let net = match &run.links.net {
            Some((_, l)) => Some(accept_from(l, pid).await.map_err(|e| format!("NIC: {e}"))?),
            None => None,
        };
        Ok::<_, String>((agent, net))
    };
    let (agent, net) = match tokio::time::timeout(RECONNECT, reconnect).await {
        Ok(Ok(conns)) => conns,
        Ok(Err(e)) => {
            new_vm.kill();
            return Err(format!("resuming failed, the sandbox stays paused: {e}"));
        }
        Err(_) => {
            new_vm.kill();
            return Err(
                "resuming failed, the sandbox stays paused: the new QEMU did not \
                        connect its channels"
                    .into(),
            );
        }
    };
    if let (Some((link, _)), Some(conn)) = (&run.links.net, net) {
        link.attach(conn).await;
    }
    run.links.agent.attach(agent).await?;
    *vm = new_vm;
    run.links.qmp = Some(qmp);
    if let Some(limit) = cpu_limit {
        if let Err(e) = limit.add(vm.pid()) {
            tracing::warn!(
                "--cpus {} holds only inside the guest after resume: {e}",
                config.cpus
            );
        }
    }
    let _ = std::fs::remove_file(vm::paused_state(dir));
    life.resumed(vm.pid());
    run.ctx.idle_paused.store(false, Ordering::SeqCst);
    run.ctx.activity.touch();
    run.ctx.paused.store(false, Ordering::SeqCst);
    // Its clock stood still while it was paused.
    if let Err(e) = set_clock(&run.mux).await {
        tracing::warn!("setting the resumed guest's clock: {e}");
    }
    tracing::info!(ms = started.elapsed().as_millis() as u64, "resumed");
    Ok(())
}

/// The next connection on `listener` made by process `pid`. Others are dropped: a QEMU of an
/// earlier resume that failed may have connected before it died.
async fn accept_from(
    listener: &tokio::net::UnixListener,
    pid: u32,
) -> std::io::Result<tokio::net::UnixStream> {
    loop {
        let (conn, _) = listener.accept().await?;
        if conn.peer_cred()?.pid() == Some(pid as i32) {
            return Ok(conn);
        }
        tracing::debug!("dropping a connection from an earlier QEMU");
    }
}

async fn set_clock(mux: &matchlock_proto::mux::Mux) -> Result<(), String> {
    let unix_ms = super::guest::now_unix_ms();
    let mut s = mux.open().await.map_err(|e| e.to_string())?;
    write_msg(&mut s, &Msg::SetClock { unix_ms })
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), read_msg(&mut s)).await {
        Ok(Ok(Some(Msg::Ok))) => Ok(()),
        Ok(Ok(Some(Msg::Error(e)))) => Err(e),
        other => Err(format!("unexpected reply {other:?}")),
    }
}
