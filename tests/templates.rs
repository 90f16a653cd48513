//! Fast start from templates (DESIGN D14), through the real binary: the first start of an image
//! and shape prepares its template, later ones restore from it; each clone is its own sandbox
//! (entropy, hostname, clock, environment, disk); a damaged template never runs and is
//! replaced; `--no-snapshot`, `MATCHLOCK_TEMPLATES=0` and workspace mounts boot cold. Templates
//! are on by default, so the other test binaries' sandboxes start from them too.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Output;

/// `matchlock args...`.
fn run(args: &[&str]) -> Output {
    ml(args).output().expect("spawn matchlock")
}

/// `state.json`'s `start` of a sandbox.
fn start_of(id: &str) -> String {
    let state = std::fs::read(home().join("vms").join(id).join("state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&state).unwrap();
    v["start"].as_str().unwrap_or("").to_string()
}

/// Starts a detached sandbox and returns its id.
fn detached(args: &[&str]) -> String {
    let mut all = vec!["run", "-d"];
    all.extend_from_slice(args);
    let out = ok(run(&all));
    out.trim().lines().last().unwrap().to_string()
}

fn exec(id: &str, cmd: &str) -> String {
    ok(run(&["exec", id, "--", "sh", "-c", cmd]))
}

/// The templates made for a guest of `memory_mb` (each test uses its own size: they share a home).
fn templates(memory_mb: u64) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(home().join("templates")) else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| e.path())
        .filter(|p| {
            let meta = std::fs::read(p.join("meta.json")).unwrap_or_default();
            let meta: serde_json::Value = serde_json::from_slice(&meta).unwrap_or_default();
            meta["memory_mb"] == memory_mb
        })
        .collect()
}

#[test]
fn clones_start_from_the_template_and_are_each_their_own() {
    // The first start prepares the template and starts from it.
    let a = detached(&[
        "--image",
        BUSYBOX,
        "--hostname",
        "clone-a",
        "-e",
        "WHO=a",
        "--memory",
        "384",
    ]);
    assert_eq!(start_of(&a), "template");
    let made = templates(384);
    assert_eq!(made.len(), 1, "{made:?}");
    let dir = &made[0];
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir), 0o700);
    assert_eq!(mode(&dir.join("state.zst")), 0o600);

    let b = detached(&[
        "--image",
        BUSYBOX,
        "--hostname",
        "clone-b",
        "-e",
        "WHO=b",
        "--memory",
        "384",
    ]);
    assert_eq!(start_of(&b), "template");
    assert_eq!(templates(384).len(), 1, "the same template serves both");

    // Both map the template's memory file (the pages they only read are one copy on the host),
    // and what they write to their memory stays theirs: the file does not change.
    let ram = dir.join("ram");
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    if meta["ram_file"] == true {
        assert_eq!(mode(&ram), 0o600);
        assert_eq!(std::fs::metadata(&ram).unwrap().len(), 384 << 20);
        let digest = || {
            use std::hash::Hasher;
            let mut h = std::collections::hash_map::DefaultHasher::new();
            h.write(&std::fs::read(&ram).unwrap());
            h.finish()
        };
        let before = digest();
        for id in [&a, &b] {
            let pid = qemu_pids(id);
            assert_eq!(pid.len(), 1);
            let maps = std::fs::read_to_string(format!("/proc/{}/maps", pid[0])).unwrap();
            assert!(
                maps.contains(&ram.display().to_string()),
                "{id}'s QEMU does not map {}",
                ram.display()
            );
        }
        exec(
            &a,
            "head -c 50000000 /dev/zero | tr '\\0' a > /dev/shm/fill",
        );
        exec(&b, "head -c 20000000 /dev/urandom > /dev/shm/fill");
        assert_eq!(digest(), before, "a clone wrote into the template's memory");
    } else {
        // (A store on tmpfs keeps the memory in the state file instead.)
        eprintln!(
            "NOTE: {} is on tmpfs: the memory file's sharing went unchecked",
            home().display()
        );
        assert!(!ram.exists());
    }

    // Each clone's randomness is its own, from the first read on.
    let ra = exec(&a, "head -c 32 /dev/urandom | od -An -tx1");
    let rb = exec(&b, "head -c 32 /dev/urandom | od -An -tx1");
    assert_ne!(ra, rb, "two clones drew the same random bytes");
    // Their identity, environment and clock are their own too.
    assert_eq!(exec(&a, "hostname; echo $WHO").trim(), "clone-a\na");
    assert_eq!(exec(&b, "hostname; echo $WHO").trim(), "clone-b\nb");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let guest: i64 = exec(&a, "date +%s").trim().parse().unwrap();
    assert!((guest - now).abs() < 30, "guest clock {guest}, host {now}");
    // Their disks are their own: a file one writes, the other does not see.
    exec(&a, "echo mine > /root/only-a && sync");
    assert_eq!(
        exec(&b, "cat /root/only-a 2>/dev/null || echo absent").trim(),
        "absent"
    );
    assert_eq!(exec(&a, "cat /root/only-a").trim(), "mine");
    ok(run(&["kill", &a]));
    ok(run(&["kill", &b]));

    // Another shape is another template; --no-snapshot boots cold.
    let c = detached(&["--image", BUSYBOX, "--memory", "320"]);
    assert_eq!(start_of(&c), "template");
    assert_eq!(templates(320).len(), 1);
    let d = detached(&["--image", BUSYBOX, "--memory", "320", "--no-snapshot"]);
    assert_eq!(start_of(&d), "cold (--no-snapshot)");
    assert_eq!(exec(&d, "echo up").trim(), "up");
    ok(run(&["kill", &c]));
    ok(run(&["kill", &d]));
}

#[test]
fn a_damaged_template_never_runs_and_is_replaced() {
    let args = ["--image", BUSYBOX, "--memory", "352"];
    let first = detached(&args);
    assert_eq!(start_of(&first), "template");
    ok(run(&["kill", &first]));
    let dir = templates(352).pop().expect("a template");
    // One flipped byte in the middle of the snapshot.
    let state = dir.join("state.zst");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&state, &bytes).unwrap();

    let second = detached(&args);
    let how = start_of(&second);
    assert!(
        how.starts_with("cold (the template failed:") && how.contains("corrupt"),
        "{how}"
    );
    assert_eq!(exec(&second, "echo up").trim(), "up");
    ok(run(&["kill", &second]));
    // The next start prepares a fresh template and uses it.
    let third = detached(&args);
    assert_eq!(start_of(&third), "template");
    ok(run(&["kill", &third]));
}

#[test]
fn workspace_mounts_boot_cold() {
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("f"), "from the host").unwrap();
    let vol = format!("{}:/workspace", ws.path().display());
    let id = detached(&["--image", BUSYBOX, "-v", &vol, "--memory", "336"]);
    assert_eq!(start_of(&id), "cold (workspace mounts need a booted VM)");
    assert_eq!(exec(&id, "cat /workspace/f").trim(), "from the host");
    ok(run(&["kill", &id]));
}

#[test]
fn templates_are_off_when_asked() {
    let out = ml(&["run", "-d", "--image", BUSYBOX, "--memory", "344"])
        .env("MATCHLOCK_TEMPLATES", "0")
        .output()
        .expect("spawn matchlock");
    let id = ok(out).trim().lines().last().unwrap().to_string();
    assert_eq!(
        start_of(&id),
        "cold (templates are off (MATCHLOCK_TEMPLATES=0))"
    );
    ok(run(&["kill", &id]));
}

#[test]
fn image_warm_prepares_the_template_for_a_shape() {
    let out = ok(run(&["image", "warm", BUSYBOX, "--memory", "368"]));
    assert!(out.contains("ready"), "{out}");
    assert_eq!(templates(368).len(), 1);
    let id = detached(&["--image", BUSYBOX, "--memory", "368"]);
    assert_eq!(start_of(&id), "template");
    ok(run(&["kill", &id]));
    // A shape that cannot have one says why.
    let ws = tempfile::tempdir().unwrap();
    let vol = format!("{}:/workspace", ws.path().display());
    let out = run(&["image", "warm", BUSYBOX, "--memory", "368", "-v", &vol]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("workspace mounts need a booted VM"),
        "{}",
        stderr(&out)
    );
}
