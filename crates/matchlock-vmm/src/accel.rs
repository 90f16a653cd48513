//! Choosing the accelerator.
//!
//! Opening `/dev/kvm` proves nothing: some hosts expose a software KVM that cannot run a Linux guest.
//! So KVM is used only after a real probe boot (our kernel + initramfs with `matchlock.probe=1`)
//! reaches `/init` within a timeout; the verdict is cached per kernel, initramfs and QEMU binary.
//! `MATCHLOCK_ACCEL=kvm|tcg|auto` overrides.

use crate::{cache_dir, write_atomic, VmmError};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's software emulation.
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The outcome of [`choose`]: the accelerator and why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Choice {
    /// The accelerator to use.
    pub accel: Accel,
    /// A sentence explaining the choice (shown by `matchlock diagnose`).
    pub reason: String,
}

#[derive(Serialize, Deserialize)]
struct Cached {
    key: String,
    choice: Choice,
}

/// How long a probe boot may take before KVM is declared unusable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Marker the agent prints on the console in probe mode.
pub const PROBE_MARKER: &str = "MATCHLOCK-PROBE-OK";

/// Picks the accelerator, probing KVM once per (kernel, initramfs, QEMU) and caching the verdict.
pub fn choose(qemu: &Path, kernel: &Path, initramfs: &Path) -> Result<Choice, VmmError> {
    let mode = std::env::var("MATCHLOCK_ACCEL").unwrap_or_default();
    match mode.as_str() {
        "tcg" => {
            return Ok(Choice {
                accel: Accel::Tcg,
                reason: "MATCHLOCK_ACCEL=tcg".into(),
            });
        }
        "kvm" | "auto" | "" => {}
        other => return Err(VmmError::BadAccel(other.into())),
    }
    let forced = mode == "kvm";
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        let why = format!("/dev/kvm cannot be opened ({e})");
        if forced {
            return Err(VmmError::KvmUnusable(why));
        }
        return Ok(Choice {
            accel: Accel::Tcg,
            reason: format!("{why}; using TCG"),
        });
    }
    let key = cache_key(qemu, kernel, initramfs);
    let cache = cache_dir().join("accel.json");
    if let Some(c) = cached(&key) {
        return finish(c, forced);
    }
    tracing::info!("probing KVM with a test boot (once per kernel, initramfs and QEMU)");
    let choice = match probe(qemu, kernel, initramfs, Accel::Kvm, PROBE_TIMEOUT) {
        Ok(t) => Choice {
            accel: Accel::Kvm,
            reason: format!("KVM probe boot reached /init in {} ms", t.as_millis()),
        },
        Err(why) => Choice {
            accel: Accel::Tcg,
            reason: format!("/dev/kvm opens but a probe boot failed ({why}); using TCG"),
        },
    };
    if let Ok(data) = serde_json::to_vec(&Cached {
        key,
        choice: choice.clone(),
    }) {
        // A failed cache write only costs another probe next time.
        let _ = std::fs::create_dir_all(cache_dir());
        let _ = write_atomic(&cache, &data);
    }
    finish(choice, forced)
}

fn cached(key: &str) -> Option<Choice> {
    let data = std::fs::read(cache_dir().join("accel.json")).ok()?;
    let c = serde_json::from_slice::<Cached>(&data).ok()?;
    (c.key == key).then_some(c.choice)
}

/// Whether [`choose`] would boot a probe VM now (nothing cached for these files, `/dev/kvm`
/// usable, no `MATCHLOCK_ACCEL=tcg`), so a caller can say what the wait is for.
pub fn will_probe(qemu: &Path, kernel: &Path, initramfs: &Path) -> bool {
    std::env::var("MATCHLOCK_ACCEL").as_deref() != Ok("tcg")
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        && cached(&cache_key(qemu, kernel, initramfs)).is_none()
}

/// What QEMU prints when KVM cannot run the guest (a software KVM that cannot emulate an
/// instruction, a CPU feature it refuses): the probe fails at once instead of at its timeout.
const KVM_FAILURES: &[&str] = &[
    "KVM internal error",
    "emulation failure",
    "KVM: entry failed",
    "failed to set MSR",
    "kvm_buf_set_msrs",
];

fn finish(choice: Choice, forced: bool) -> Result<Choice, VmmError> {
    if forced && choice.accel != Accel::Kvm {
        return Err(VmmError::KvmUnusable(choice.reason));
    }
    Ok(choice)
}

fn cache_key(qemu: &Path, kernel: &Path, initramfs: &Path) -> String {
    let stamp = |p: &Path| {
        let m = std::fs::metadata(p).ok();
        let mtime = m
            .as_ref()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!(
            "{}:{}:{}",
            p.display(),
            m.map(|m| m.len()).unwrap_or(0),
            mtime
        )
    };
    format!("{}|{}|{}", stamp(qemu), stamp(kernel), stamp(initramfs))
}

/// Boots the kernel with the agent in probe mode and waits for its marker on the console.
/// Returns the time to reach `/init`, or why it failed.
pub fn probe(
    qemu: &Path,
    kernel: &Path,
    initramfs: &Path,
    accel: Accel,
    timeout: Duration,
) -> Result<Duration, String> {
    let mut c = crate::qemu::machine_command(
        qemu,
        accel,
        1,
        128,
        kernel,
        initramfs,
        &["matchlock.probe=1".to_string()],
    );
    c.args(["-serial", "stdio"]);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::qemu::die_with_parent(&mut c);
    let start = Instant::now();
    let mut child = c
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    let tx_err = tx.clone();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&seen);
                    if text.contains(PROBE_MARKER) {
                        let _ = tx.send(Ok(()));
                        return;
                    }
                    if let Some(f) = KVM_FAILURES.iter().find(|f| text.contains(*f)) {
                        let _ = tx.send(Err(f.to_string()));
                        return;
                    }
                    // Only the tail can still complete the marker.
                    if seen.len() > 4096 {
                        seen.drain(..seen.len() - 64);
                    }
                }
            }
        }
        let _ = tx.send(Err(String::new()));
    });
    // Drain stderr as it comes: a full pipe would stall QEMU and pass for a failed probe. A
    // KVM failure printed there ends the probe at once.
    let stderr = child.stderr.take();
    let stderr_reader = std::thread::spawn(move || {
        let mut err = String::new();
        if let Some(mut e) = stderr {
            let mut buf = [0u8; 4096];
            while let Ok(n) = e.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if err.len() < 64 * 1024 {
                    err.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
                if let Some(f) = KVM_FAILURES.iter().find(|f| err.contains(*f)) {
                    let _ = tx_err.send(Err(f.to_string()));
                }
            }
        }
        err
    });
    let verdict = rx.recv_timeout(timeout);
    let elapsed = start.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let err = stderr_reader.join().unwrap_or_default();
    match verdict {
        Ok(Ok(())) => return Ok(elapsed),
        Ok(Err(failure)) if !failure.is_empty() => {
            return Err(format!(
                "QEMU reported \"{failure}\" after {} ms",
                elapsed.as_millis()
            ))
        }
        _ => {}
    }
    if elapsed >= timeout {
        Err(format!("no answer within {} s", timeout.as_secs()))
    } else {
        let line = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("guest died early");
        Err(line.chars().take(200).collect())
    }
}
