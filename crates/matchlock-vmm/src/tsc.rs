//! The guest's clock under TCG.
//!
//! Under TCG (without `-icount`) the guest's TSC is the host's TSC, but the guest kernel cannot
//! calibrate it: `microvm` has no HPET or PM timer to measure it against, so the kernel falls back
//! to the `refined-jiffies` clocksource. Without a real clocksource it can neither use high
//! resolution timers nor stop the tick when idle, so every idle sandbox takes 250 timer interrupts
//! a second, each emulated (2.8 % of a host core per idle guest, measured; docs/benchmarks.md).
//! Telling the kernel the frequency (`tsc_early_khz=`) and that the TSC is stable
//! (`tsc=reliable`, the host's `constant_tsc`/`nonstop_tsc` say so) gives it the `tsc`
//! clocksource and a tickless idle. KVM guests have `kvm-clock` and need none of this.
//!
//! The frequency is measured once per host boot against `CLOCK_MONOTONIC_RAW` and cached, so
//! every VM of a boot gets the same command line (template keys stay stable).
//!
//! On unless `MATCHLOCK_TCG_TSC=0`. (It was opt-in while exec streams stalled in TSC guests; the
//! cause was a lost wake-up in yamux 0.13 that any timing could hit, fixed by yamux 0.14.)

use crate::{cache_dir, write_atomic};
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Serialize, Deserialize)]
struct Cached {
    boot_id: String,
    khz: u64,
}

/// Whether TCG guests get the TSC clock: unless `MATCHLOCK_TCG_TSC=0`.
pub fn wanted() -> bool {
    std::env::var_os("MATCHLOCK_TCG_TSC").is_none_or(|v| v != "0")
}

/// Kernel command line words for a TCG guest's clock; empty when the host's TSC cannot serve
/// (not x86-64, or a TSC that changes rate or stops in sleep states).
pub fn tcg_clock_args() -> Vec<String> {
    match host_tsc_khz() {
        Some(khz) => vec![format!("tsc_early_khz={khz}"), "tsc=reliable".into()],
        None => Vec::new(),
    }
}

/// The host TSC's frequency in kHz, when it ticks at a constant rate.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let flags = cpuinfo.lines().find(|l| l.starts_with("flags"))?;
    let has = |f: &str| flags.split_whitespace().any(|w| w == f);
    if !(has("constant_tsc") && has("nonstop_tsc")) {
        return None;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()?
        .trim()
        .to_string();
    let path = cache_dir().join("tsc.json");
    if let Some(c) = std::fs::read(&path)
        .ok()
        .and_then(|d| serde_json::from_slice::<Cached>(&d).ok())
        .filter(|c| c.boot_id == boot_id)
    {
        return Some(c.khz);
    }
    let khz = measure()?;
    if let Ok(data) = serde_json::to_vec(&Cached { boot_id, khz }) {
        let _ = std::fs::create_dir_all(cache_dir());
        let _ = write_atomic(&path, &data);
    }
    Some(khz)
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u64> {
    fn now_ns() -> u128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
        ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
    }
    // The shortest of a few clock-TSC-clock readings bounds the pairing error.
    fn pair() -> (u128, u64) {
        let mut best = (u128::MAX, 0u128, 0u64);
        for _ in 0..5 {
            let a = now_ns();
            // SAFETY: rdtsc has no preconditions on x86-64.
            let t = unsafe { core::arch::x86_64::_rdtsc() };
            let b = now_ns();
            if b - a < best.0 {
                best = (b - a, a + (b - a) / 2, t);
            }
        }
        (best.1, best.2)
    }
    let (n0, t0) = pair();
    std::thread::sleep(Duration::from_millis(200));
    let (n1, t1) = pair();
    let ns = n1.checked_sub(n0)?;
    let ticks = t1.checked_sub(t0)? as u128;
    if ns == 0 {
        return None;
    }
    let khz = (ticks * 1_000_000 / ns) as u64;
    // A plausible TSC (100 MHz to 10 GHz), or none at all.
    (100_000..10_000_000).contains(&khz).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u64> {
    None
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_measured_frequency_agrees_with_itself() {
        let a = super::measure().expect("a TSC");
        let b = super::measure().expect("a TSC");
        let diff = a.abs_diff(b) as f64 / a as f64;
        assert!(diff < 1e-3, "{a} kHz then {b} kHz");
    }
}
