//! `matchlock diagnose`: checks this machine and says how to fix each failure.

use anyhow::Result;
use serde::Serialize;

/// How a check came out: `warn` works, but not as well as it could (Matchlock's three states).
#[derive(Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Status {
    Pass,
    Warn,
    Fail,
}

/// One check, in Matchlock's `diagnose --json` shape.
#[derive(Serialize)]
struct Check {
    name: &'static str,
    status: Status,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn check(name: &'static str, r: Result<String, (String, String)>) -> Check {
    match r {
        Ok(message) => Check {
            name,
            status: Status::Pass,
            message,
            fix: None,
        },
        Err((message, fix)) => Check {
            name,
            status: Status::Fail,
            message,
            fix: Some(fix),
        },
    }
}

/// Whether `qemu OPTION help` (`-machine`, `-device`) lists `name`.
fn qemu_lists(qemu: &std::path::Path, option: &str, name: &str) -> bool {
    std::process::Command::new(qemu)
        .args([option, "help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(name))
        .unwrap_or(false)
}

/// Runs every check; exit code 1 if any failed.
pub fn diagnose(json: bool) -> Result<i32> {
    let mut checks = Vec::new();
    let qemu = matchlock_vmm::qemu::locate_qemu();
    checks.push(check(
        "qemu",
        match &qemu {
            Ok(q) => {
                let v = std::process::Command::new(q).arg("--version").output();
                match v {
                    Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string()),
                    _ => Err((
                        format!("{} does not run", q.display()),
                        "reinstall qemu-system-x86".into(),
                    )),
                }
            }
            Err(e) => Err((
                e.to_string(),
                "sudo apt-get install --no-install-recommends qemu-system-x86".into(),
            )),
        },
    ));
    if let Ok(q) = &qemu {
        checks.push(check(
            "qemu microvm",
            if qemu_lists(q, "-machine", "microvm") {
                Ok("machine type available".into())
            } else {
                Err((
                    "QEMU lacks the microvm machine".into(),
                    "install QEMU 7.2 or newer (qemu-system-x86)".into(),
                ))
            },
        ));
    }
    if let Ok(q) = &qemu {
        // Workspace mounts (`-v`) are a vhost-user virtio-fs device.
        checks.push(check(
            "qemu virtio-fs",
            if qemu_lists(q, "-device", "vhost-user-fs-device") {
                Ok("vhost-user-fs-device available (workspace mounts)".into())
            } else {
                Err((
                    "QEMU lacks vhost-user-fs-device, so -v mounts cannot work".into(),
                    "install Debian's qemu-system-x86 (7.2 or newer), which has it".into(),
                ))
            },
        ));
    }
    let kernel = matchlock_vmm::kernel::locate();
    checks.push(check(
        "guest kernel",
        match &kernel {
            Ok(k) => Ok(k.display().to_string()),
            Err(e) => Err((e.to_string(), "matchlock kernel build".into())),
        },
    ));
    let agent = matchlock_vmm::agent::locate();
    checks.push(check(
        "guest agent",
        match &agent {
            Ok(a) => Ok(format!("{} (static)", a.display())),
            Err(e) => Err((e.to_string(), "scripts/build-guest".into())),
        },
    ));
    checks.push(check(
        "e2fsprogs",
        match std::process::Command::new("mkfs.ext4").arg("-V").output() {
            Ok(_) => Ok("mkfs.ext4 found".into()),
            Err(_) => Err((
                "mkfs.ext4 not found".into(),
                "sudo apt-get install e2fsprogs".into(),
            )),
        },
    ));
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    checks.push(Check {
        name: "/dev/kvm",
        status: if kvm.is_ok() {
            Status::Pass
        } else {
            Status::Warn
        },
        message: match &kvm {
            Ok(_) => "readable and writable".into(),
            Err(e) => format!("not usable ({e}); sandboxes run under TCG (slower)"),
        },
        fix: kvm
            .is_err()
            .then(|| "for speed: sudo usermod -aG kvm $USER, then log in again".into()),
    });
    if let (Ok(q), Ok(k), Ok(a)) = (&qemu, &kernel, &agent) {
        let r = matchlock_vmm::initramfs::cached(a).and_then(|i| {
            if matchlock_vmm::accel::will_probe(q, k, &i) && !json {
                eprintln!("checking whether KVM can run sandboxes here (a test boot, once)...");
            }
            matchlock_vmm::accel::choose(q, k, &i)
        });
        checks.push(match r {
            Ok(c) if c.accel == matchlock_vmm::accel::Accel::Kvm => Check {
                name: "accelerator",
                status: Status::Pass,
                message: format!("kvm: {}", c.reason),
                fix: None,
            },
            // Sandboxes work under TCG, only slower: a warning with the reason.
            Ok(c) => Check {
                name: "accelerator",
                status: Status::Warn,
                message: format!("tcg (software emulation, several times slower): {}", c.reason),
                fix: Some(
                    "run on a host with hardware virtualisation (VT-x/AMD-V) exposed to this machine; MATCHLOCK_ACCEL=tcg skips the check".into(),
                ),
            },
            Err(e) => check(
                "accelerator",
                Err((
                    e.to_string(),
                    "unset MATCHLOCK_ACCEL or set it to auto".into(),
                )),
            ),
        });
    }
    let store = matchlock_sandbox::Store::open_default();
    let home = store.home().to_path_buf();
    checks.push(check(
        "state directory",
        match std::fs::create_dir_all(home.join("vms")) {
            Ok(()) if home.join("vms/vm-00000000/control.sock").as_os_str().len() <= 107 => {
                Ok(home.display().to_string())
            }
            Ok(()) => Err((
                format!("{} is too long for Unix socket paths", home.display()),
                "set MATCHLOCK_HOME to a shorter directory".into(),
            )),
            Err(e) => Err((
                format!("{}: {e}", home.display()),
                "set MATCHLOCK_HOME to a writable directory".into(),
            )),
        },
    ));
    let cache = matchlock_vmm::cache_dir();
    checks.push(check(
        "cache directory",
        match std::fs::create_dir_all(&cache) {
            Ok(()) => Ok(cache.display().to_string()),
            Err(e) => Err((
                format!("{}: {e}", cache.display()),
                "set MATCHLOCK_CACHE_DIR to a writable directory".into(),
            )),
        },
    ));
    let images = matchlock_image::ImageStore::open_default().and_then(|s| s.list());
    checks.push(check(
        "images",
        match images {
            Ok(l) if !l.is_empty() => Ok(format!("{} local image(s)", l.len())),
            Ok(_) => Err(("no local images".into(), "scripts/make-busybox-image busybox.tar && matchlock image import busybox < busybox.tar".into())),
            Err(e) => Err((e.to_string(), "check the cache directory".into())),
        },
    ));
    // Sandboxes started from one template map its memory file and share the pages they only
    // read, unless the store is on tmpfs (docs/architecture.md, "Memory"). KSM can share more
    // (the pages they wrote alike) but is the operator's host-wide choice.
    let ksm = std::fs::read_to_string("/sys/kernel/mm/ksm/run").is_ok_and(|s| s.trim() == "1");
    let ksm_note = if ksm { "; KSM on" } else { "" };
    checks.push(if matchlock_sandbox::supervisor::templates_share_memory(&home) {
        Check {
            name: "memory sharing",
            status: Status::Pass,
            message: format!("sandboxes of one template share its memory{ksm_note}"),
            fix: None,
        }
    } else {
        Check {
            name: "memory sharing",
            status: Status::Warn,
            message: format!("{} is on tmpfs, ramfs or FUSE (or could not be checked): each sandbox keeps its own copy of its template's memory (about 45 MB more per idle busybox sandbox, docs/benchmarks.md){ksm_note}", home.display()),
            fix: Some("set MATCHLOCK_HOME to a directory on disk".into()),
        }
    });
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"ok": ok, "checks": checks}))?
        );
    } else {
        for c in &checks {
            let icon = match c.status {
                Status::Pass => "✓",
                Status::Warn => "⚠",
                Status::Fail => "✗",
            };
            println!("{icon} {}: {}", c.name, c.message);
            if let Some(f) = &c.fix {
                println!("  fix: {f}");
            }
        }
    }
    if !ok {
        anyhow::bail!("diagnose failed: one or more checks failed");
    }
    Ok(0)
}
