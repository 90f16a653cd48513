//! Sandbox management commands: list, get, inspect, kill, rm, prune, gc, log. Their output
//! follows Matchlock's wording and JSON shapes (scripts written for it parse them); what we add is
//! extra fields, never renamed ones.

use crate::table;
use anyhow::{bail, Result};
use matchlock_sandbox::config::{now_secs, State, Status};
use matchlock_sandbox::store::Entry;
use matchlock_sandbox::{Client, SandboxConfig, Store};
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom, Write};
use std::time::Duration;

/// The PID column: the supervisor's while it lives (signalling it stops the sandbox).
fn pid(state: &State) -> u32 {
    if state.status.is_live() {
        state.pid
    } else {
        0
    }
}

/// A sandbox's configuration as Matchlock's `get` shows its `config`: our fields, with `env` as
/// an object (Matchlock's shape) and `image`/`id` at the top.
fn config_json(c: &SandboxConfig) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
    if let Some(obj) = v.as_object_mut() {
        let env: serde_json::Map<String, Value> = c
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        obj.insert("env".into(), Value::Object(env));
    }
    v
}

/// One sandbox as `list --json` prints it: Matchlock's `{id, pid, status, image, created_at}`.
fn summary_json(e: &Entry) -> Value {
    json!({
        "id": e.config.id,
        "pid": pid(&e.state),
        "status": e.state.status.to_string(),
        "image": e.config.image,
        "created_at": table::rfc3339(e.config.created_at),
    })
}

/// One sandbox as `get` prints it: the summary with Matchlock's `config`, plus our `state`.
fn vm_json(e: &Entry) -> Value {
    let mut v = summary_json(e);
    v["config"] = config_json(&e.config);
    v["state"] = serde_json::to_value(&e.state).unwrap_or(Value::Null);
    v
}

fn entry(store: &Store, id: &str) -> Result<Entry> {
    Ok(Entry {
        config: store.config(id)?,
        state: store.state(id)?,
    })
}

/// `matchlock list`: newest first, like Matchlock.
pub fn list(running: bool, as_json: bool) -> Result<i32> {
    let store = Store::open_default();
    let mut entries = store.list()?;
    entries.reverse();
    entries.retain(|e| !running || e.state.status == Status::Running);
    if as_json {
        let rows: Vec<Value> = entries
            .iter()
            .map(|e| {
                let mut v = summary_json(e);
                v["reason"] = json!(e.state.reason);
                v["boot_ms"] = json!(e.state.boot_ms);
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            let p = pid(&e.state);
            vec![
                e.config.id.clone(),
                e.state.status.to_string(),
                e.config.image.clone(),
                table::utc(e.config.created_at, false),
                if p == 0 { "-".into() } else { p.to_string() },
            ]
        })
        .collect();
    table::print(&["ID", "STATUS", "IMAGE", "CREATED", "PID"], &rows);
    Ok(0)
}

/// `matchlock get`.
pub fn get(id: &str) -> Result<i32> {
    let store = Store::open_default();
    let id = store.resolve_id(id)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&vm_json(&entry(&store, &id)?))?
    );
    Ok(0)
}

/// A state as one of Matchlock's lifecycle records (`inspect`).
fn lifecycle_json(version: usize, id: &str, s: &State, dir: &std::path::Path) -> Value {
    json!({
        "version": version,
        "vm_id": id,
        "backend": "qemu",
        "phase": s.status.to_string(),
        "updated_at": table::rfc3339(s.updated_at),
        "last_error": s.reason.clone().unwrap_or_default(),
        "resources": {
            "state_dir": dir,
            "rootfs_path": dir.join("upper.ext4"),
        },
        "pid": s.pid,
        "qemu_pid": s.qemu_pid,
        "accel": s.accel,
        "boot_ms": s.boot_ms,
    })
}

/// `matchlock inspect`: Matchlock's `{vm, lifecycle, history}`, plus the sandbox's files and
/// resources.
pub fn inspect(id: &str) -> Result<i32> {
    let store = Store::open_default();
    let id = store.resolve_id(id)?;
    let dir = store.dir(&id);
    let e = entry(&store, &id)?;
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
            files.insert(f.to_string(), json!({ "size": m.len() }));
        }
    }
    let mut history: Vec<Value> = store
        .history(&id)
        .iter()
        .enumerate()
        .map(|(i, s)| lifecycle_json(i + 1, &id, s, &dir))
        .collect();
    // The current state (a crash is only ever derived, never written).
    let current = lifecycle_json(history.len() + 1, &id, &e.state, &dir);
    if history.last().map(|h| &h["phase"]) != Some(&current["phase"]) {
        history.push(current.clone());
    }
    let c = &e.config;
    let v = json!({
        "vm": vm_json(&e),
        "lifecycle": history.last().cloned().unwrap_or(current),
        "history": history,
        "dir": dir,
        "resources": { "vcpus": c.vcpus(), "cpu_max": c.cpu_max(), "memory_mb": c.memory_mb, "disk_size_mb": c.disk_size_mb },
        "files": files,
    });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// `matchlock kill`: `Killed ID` per sandbox. With `--all`, failures are reported and the exit
/// code stays 0 (as in Matchlock).
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
            bail!("VM ID required (or use --all)");
        }
        ids.iter()
            .map(|i| store.resolve_id(i))
            .collect::<Result<_, _>>()?
    };
    let mut code = 0;
    for id in targets {
        match crate::run::block_on(stop_one(&store, &id)) {
            Ok(()) => println!("Killed {id}"),
            Err(e) => {
                eprintln!("Failed to kill {id}: {e}");
                if !all {
                    code = 1;
                }
            }
        }
    }
    Ok(code)
}

/// `pause ID` (`resume` false) or `resume ID`.
pub fn pause(id: &str, resume: bool) -> Result<i32> {
    let store = Store::open_default();
    let id = store.resolve_id(id)?;
    let state = store.state(&id)?;
    if !state.status.is_live() {
        bail!("VM {id} is not running (status: {})", state.status);
    }
    let client = Client::for_sandbox(&store, &id)?;
    let started = std::time::Instant::now();
    crate::run::block_on(async {
        let done = if resume {
            client.resume().await
        } else {
            client.pause().await
        };
        done.map_err(|e| anyhow::anyhow!("{e}"))
    })?;
    let ms = started.elapsed().as_millis();
    if resume {
        println!("Resumed {id} ({ms} ms)");
    } else {
        let bytes = store.state(&id)?.paused.map(|p| p.bytes).unwrap_or(0);
        println!(
            "Paused {id} ({ms} ms, {:.1} MB on disk)",
            bytes as f64 / 1e6
        );
    }
    Ok(0)
}

/// Stops a sandbox through its supervisor, or by killing the supervisor if it does not answer.
async fn stop_one(store: &Store, id: &str) -> Result<()> {
    let state = store.state(id)?;
    if !state.status.is_live() {
        bail!("VM {id} is not running (status: {})", state.status);
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

/// `matchlock rm`: `Removed ID` per sandbox. `--stopped` removes every sandbox that is not
/// running and, like `kill --all`, reports failures without failing.
pub fn rm(ids: &[String], stopped: bool) -> Result<i32> {
    let store = Store::open_default();
    if stopped {
        for e in store.list()? {
            if e.state.status.is_live() {
                continue;
            }
            match store.remove(&e.config.id) {
                Ok(()) => println!("Removed {}", e.config.id),
                Err(err) => eprintln!("Failed to remove {}: {err}", e.config.id),
            }
        }
        return Ok(0);
    }
    if ids.is_empty() {
        bail!("VM ID required (or use --stopped)");
    }
    let mut code = 0;
    for i in ids {
        match store
            .resolve_id(i)
            .and_then(|id| store.remove(&id).map(|_| id))
        {
            Ok(id) => println!("Removed {id}"),
            Err(e) => {
                eprintln!("matchlock: {e}");
                code = 1;
            }
        }
    }
    Ok(code)
}

/// `matchlock prune`: `Pruned ID` per sandbox, then `Pruned N VMs`.
pub fn prune() -> Result<i32> {
    let store = Store::open_default();
    let mut n = 0;
    for e in store.list()? {
        if !e.state.status.is_live() && store.remove(&e.config.id).is_ok() {
            println!("Pruned {}", e.config.id);
            n += 1;
        }
    }
    for id in store.orphan_dirs() {
        if std::fs::remove_dir_all(store.dir(&id)).is_ok() {
            println!("Pruned {id}");
            n += 1;
        }
    }
    println!("Pruned {n} VMs");
    Ok(0)
}

/// What `gc` did for one sandbox. A running one is skipped (an error when it was named).
fn gc_one(store: &Store, e: &Entry, force_running: bool, named: bool) -> Result<String, String> {
    let id = &e.config.id;
    if e.state.status.is_live() {
        if !force_running {
            println!("{id}: skipped (VM is running)");
            return if named {
                Err(format!(
                    "VM is running {id}; 'matchlock gc --force-running {id}' stops and cleans it"
                ))
            } else {
                Ok(id.clone())
            };
        }
        crate::run::block_on(stop_one(store, id)).map_err(|err| err.to_string())?;
    }
    let mut cleaned = Vec::new();
    if store.reclaim(id) > 0 {
        cleaned.push("rootfs_remove");
    }
    if e.state.status == Status::Crashed {
        mark_stopped(store, id, "crashed; cleaned up by gc");
        cleaned.push("state_stopped");
    }
    if cleaned.is_empty() {
        println!("{id}: no resources to clean");
    } else {
        println!("{id}: cleaned {}", cleaned.join(", "));
    }
    Ok(id.clone())
}

/// `matchlock gc [ID]`: reclaims what stopped and crashed sandboxes left (upper disks, sockets),
/// and QEMU processes whose supervisor is gone. Running sandboxes are skipped (an error when
/// named, as in Matchlock) unless `--force-running` stops them first.
pub fn gc(id: Option<&str>, force_running: bool) -> Result<i32> {
    let store = Store::open_default();
    let entries = match id {
        Some(id) => vec![entry(&store, &store.resolve_id(id)?)?],
        None => store.list()?,
    };
    let mut failures = Vec::new();
    let mut n = 0;
    for e in &entries {
        match gc_one(&store, e, force_running, id.is_some()) {
            Ok(_) => n += 1,
            Err(why) => failures.push(why),
        }
    }
    let killed = kill_stray_qemus(&store);
    if killed > 0 {
        println!("stopped {killed} stray QEMU processes");
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }
    if id.is_none() {
        println!("Reconciled {n} VMs");
    }
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
            if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                // The reader went away (`log -f ID | head`).
                return Ok(0);
            }
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
            let _ = out.write_all(&rest);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(0)
}
