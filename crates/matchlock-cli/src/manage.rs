//! Sandbox management commands: list, get, inspect, kill, rm, prune, gc, log.

use anyhow::{bail, Result};
use matchlock_sandbox::config::{now_secs, State, Status};
use matchlock_sandbox::{Client, Store};
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

fn ago(secs: u64) -> String {
    let d = now_secs().saturating_sub(secs);
    match d {
        0..=59 => format!("{d}s ago"),
        60..=3599 => format!("{}m ago", d / 60),
        3600..=86_399 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

/// `matchlock list`.
pub fn list(running: bool) -> Result<i32> {
    let store = Store::open_default();
    let entries = store.list()?;
    println!(
        "{:<12} {:<9} {:<40} {:<9} PID",
        "ID", "STATUS", "IMAGE", "CREATED"
    );
    for e in entries {
        if running && e.state.status != Status::Running {
            continue;
        }
        let pid = if e.state.status.is_live() {
            e.state.pid.to_string()
        } else {
            "-".into()
        };
        println!(
            "{:<12} {:<9} {:<40} {:<9} {}",
            e.config.id,
            e.state.status.to_string(),
            e.config.image,
            ago(e.config.created_at),
            pid
        );
    }
    Ok(0)
}

/// `matchlock get`.
pub fn get(id: &str) -> Result<i32> {
    let store = Store::open_default();
    let id = store.resolve_id(id)?;
    let v =
        serde_json::json!({ "id": id, "config": store.config(&id)?, "state": store.state(&id)? });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// `matchlock inspect`.
pub fn inspect(id: &str) -> Result<i32> {
    let store = Store::open_default();
    let id = store.resolve_id(id)?;
    let dir = store.dir(&id);
    let mut files = serde_json::Map::new();
    for f in [
        "config.json",
        "state.json",
        "upper.ext4",
        "control.sock",
        "logs/vm.log",
        "logs/supervisor.log",
        "logs/qemu.log",
    ] {
        if let Ok(m) = std::fs::metadata(dir.join(f)) {
            files.insert(f.to_string(), serde_json::json!({ "size": m.len() }));
        }
    }
    let config = store.config(&id)?;
    let v = serde_json::json!({
        "id": id,
        "dir": dir,
        "config": config,
        "state": store.state(&id)?,
        "resources": { "vcpus": config.vcpus(), "cpu_max": config.cpu_max(), "memory_mb": config.memory_mb, "disk_size_mb": config.disk_size_mb },
        "files": files,
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// `matchlock kill`.
pub fn kill(ids: &[String], all: bool) -> Result<i32> {
    let store = Store::open_default();
    let targets: Vec<String> = if all {
        store
            .list()?
            .into_iter()
            .filter(|e| e.state.status.is_live())
            .map(|e| e.config.id)
            .collect()
    } else {
        if ids.is_empty() {
            bail!("name the sandboxes to stop, or use --all");
        }
        ids.iter()
            .map(|i| store.resolve_id(i))
            .collect::<Result<_, _>>()?
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut code = 0;
    for id in targets {
        match rt.block_on(stop_one(&store, &id)) {
            Ok(()) => println!("{id}"),
            Err(e) => {
                eprintln!("matchlock: {id}: {e}");
                code = 1;
            }
        }
    }
    Ok(code)
}

/// Stops a sandbox through its supervisor, or by killing the supervisor if it does not answer.
async fn stop_one(store: &Store, id: &str) -> Result<()> {
    let state = store.state(id)?;
    if !state.status.is_live() {
        bail!("not running ({})", state.status);
    }
    if let Ok(client) = Client::for_sandbox(store, id) {
        let limit =
            Duration::from_millis(store.config(id)?.graceful_shutdown_ms) + Duration::from_secs(20);
        if let Ok(Ok(())) = tokio::time::timeout(limit, client.stop(None)).await {
            return Ok(());
        }
    }
    // No answer: kill the supervisor; QEMU dies with it (PR_SET_PDEATHSIG).
    if state.pid > 0 && store.supervisor_alive(id) {
        // SAFETY: plain kill(2) of the pid recorded by the supervisor that still holds the lock.
        unsafe { libc::kill(state.pid as i32, libc::SIGKILL) };
        for _ in 0..50 {
            if !store.supervisor_alive(id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    mark_stopped(store, id, "killed");
    Ok(())
}

/// Records a stop the supervisor could not record itself and reclaims its disk.
fn mark_stopped(store: &Store, id: &str, reason: &str) {
    let Ok(config) = store.config(id) else { return };
    if store.supervisor_alive(id) {
        return;
    }
    if config.remove_on_stop {
        let _ = store.remove(id);
        return;
    }
    if let Ok(mut s) = store.state(id) {
        s.status = Status::Stopped;
        s.reason = Some(reason.into());
        s.updated_at = now_secs();
        let _ = store.write_state(id, &s);
    }
    store.reclaim(id);
}

/// `matchlock rm`.
pub fn rm(ids: &[String]) -> Result<i32> {
    let store = Store::open_default();
    let mut code = 0;
    for i in ids {
        match store
            .resolve_id(i)
            .and_then(|id| store.remove(&id).map(|_| id))
        {
            Ok(id) => println!("{id}"),
            Err(e) => {
                eprintln!("matchlock: {e}");
                code = 1;
            }
        }
    }
    Ok(code)
}

/// `matchlock prune`.
pub fn prune() -> Result<i32> {
    let store = Store::open_default();
    for e in store.list()? {
        if !e.state.status.is_live() && store.remove(&e.config.id).is_ok() {
            println!("{}", e.config.id);
        }
    }
    for id in store.orphan_dirs() {
        if std::fs::remove_dir_all(store.dir(&id)).is_ok() {
            println!("{id}");
        }
    }
    Ok(0)
}

/// `matchlock gc`.
pub fn gc() -> Result<i32> {
    let store = Store::open_default();
    let mut freed = 0;
    for e in store.list()? {
        if !e.state.status.is_live() {
            freed += store.reclaim(&e.config.id);
            if e.state.status == Status::Crashed {
                mark_stopped(&store, &e.config.id, "crashed; cleaned up by gc");
            }
        }
    }
    let killed = kill_stray_qemus(&store);
    println!(
        "reclaimed {} MiB, stopped {killed} stray QEMU processes",
        freed / (1024 * 1024)
    );
    Ok(0)
}

/// QEMU processes of sandboxes whose supervisor is gone (normally impossible thanks to
/// PR_SET_PDEATHSIG, but cheap to check).
fn kill_stray_qemus(store: &Store) -> usize {
    let vms = store.home().join("vms");
    let vms = vms.to_string_lossy().into_owned();
    let mut killed = 0;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for ent in rd.flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(ent.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if !cmd.contains("qemu-system") || !cmd.contains(&vms) {
            continue;
        }
        let Some(id) = cmd
            .split(&format!("{vms}/"))
            .nth(1)
            .and_then(|rest| rest.split('/').next())
        else {
            continue;
        };
        if !store.supervisor_alive(id) {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

/// `matchlock log`.
pub fn log(id: &str, follow: bool) -> Result<i32> {
    let store = Store::open_default();
    let id = store.resolve_id(id)?;
    let path = store.dir(&id).join("logs").join("vm.log");
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) => bail!("no log for sandbox {id} ({e})"),
    };
    let mut out = std::io::stdout();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            out.flush()?;
            continue;
        }
        if !follow {
            break;
        }
        let live = store
            .state(&id)
            .map(|s: State| s.status.is_live())
            .unwrap_or(false);
        if !live {
            // One last read for what was written while we checked.
            let pos = f.stream_position()?;
            f.seek(SeekFrom::Start(pos))?;
            let mut rest = Vec::new();
            f.read_to_end(&mut rest)?;
            out.write_all(&rest)?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(0)
}
