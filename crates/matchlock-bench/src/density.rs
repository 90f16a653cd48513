//! `--density N`: N idle sandboxes on this host at once. Starts them one after another (from the
//! image's template unless `--no-snapshot` is passed through `--density-flags`), lets them settle,
//! then reports host memory per sandbox (PSS of each QEMU and supervisor, and the drop in the
//! host's `MemAvailable`), checks that every one still answers an exec, and times `true` round
//! trips over the control socket with all N running. The baseline is one sandbox alone, measured
//! first in the same run.

use crate::{ms, percentile};
use anyhow::{bail, Context, Result};
use matchlock_sandbox::{Client, Store};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A `Key:   N kB` field of a `/proc` file, in KiB (0 when absent).
fn field_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// PSS of a process in KiB.
fn pss_kib(pid: u32) -> u64 {
    field_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

fn mem_available_kib() -> u64 {
    field_kib("/proc/meminfo", "MemAvailable:")
}

/// Exec round trips of `true`, `rounds` times over every sandbox in turn.
fn exec_rounds(ids: &[String], rounds: usize) -> Result<Vec<Duration>> {
    let rt = tokio::runtime::Runtime::new()?;
    let store = Store::open_default();
    let clients = ids
        .iter()
        .map(|id| Client::for_sandbox(&store, id))
        .collect::<Result<Vec<_>, _>>()?;
    let mut times = Vec::new();
    rt.block_on(async {
        for _ in 0..rounds {
            for c in &clients {
                times.push(crate::exec_true(c).await?);
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    times.sort();
    Ok(times)
}

fn start(matchlock: &str, image: &str, flags: &[String]) -> Result<String> {
    // Templates unless the flags say --no-snapshot.
    let out = Command::new(matchlock)
        .args(["run", "-d", "--image", image])
        .args(flags)
        .stdin(Stdio::null())
        .output()
        .context("running matchlock")?;
    if !out.status.success() {
        bail!(
            "matchlock run -d failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string())
}

/// Runs the benchmark; every sandbox it started is killed and removed whatever happens.
pub fn bench(matchlock: &str, image: &str, n: usize, flags: &[String]) -> Result<()> {
    let mut ids = Vec::new();
    let result = run(matchlock, image, n, flags, &mut ids);
    for id in &ids {
        let _ = Command::new(matchlock).args(["kill", id]).output();
        let _ = Command::new(matchlock).args(["rm", id]).output();
    }
    result
}

fn run(
    matchlock: &str,
    image: &str,
    n: usize,
    flags: &[String],
    ids: &mut Vec<String>,
) -> Result<()> {
    let store = Store::open_default();
    // Baseline: one sandbox alone (also prepares the template).
    let alone = start(matchlock, image, flags)?;
    ids.push(alone.clone());
    std::thread::sleep(Duration::from_secs(5));
    let base = exec_rounds(std::slice::from_ref(&alone), 50)?;
    let _ = Command::new(matchlock).args(["kill", &alone]).output();
    let _ = Command::new(matchlock).args(["rm", &alone]).output();
    ids.clear();
    std::thread::sleep(Duration::from_secs(2));

    let before = mem_available_kib();
    let mut starts = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        ids.push(start(matchlock, image, flags).with_context(|| format!("sandbox {}", i + 1))?);
        starts.push(t.elapsed());
    }
    starts.sort();
    std::thread::sleep(Duration::from_secs(30));
    let (mut qemu, mut sup) = (0u64, 0u64);
    let mut how = std::collections::BTreeMap::<String, usize>::new();
    for id in ids.iter() {
        let st = store.state(id)?;
        qemu += st.qemu_pid.map(pss_kib).unwrap_or(0);
        sup += pss_kib(st.pid);
        let start = st.start.unwrap_or_default();
        let kind = start.split(' ').next().unwrap_or("").to_string();
        *how.entry(kind).or_default() += 1;
    }
    let used = before.saturating_sub(mem_available_kib());
    let all = exec_rounds(ids, 3)?;
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!("\n## {n} idle sandboxes of {image} {flags:?} (started as {how:?})");
    println!(
        "start, run -d:               p50 {:7.1} ms  p90 {:7.1} ms",
        ms(percentile(&starts, 0.5)),
        ms(percentile(&starts, 0.9))
    );
    println!(
        "PSS per sandbox:             QEMU {:6.1} MiB + supervisor {:4.1} MiB = {:6.1} MiB",
        mib(qemu / n as u64),
        mib(sup / n as u64),
        mib((qemu + sup) / n as u64)
    );
    println!(
        "host MemAvailable drop:      {:6.1} MiB per sandbox",
        mib(used / n as u64)
    );
    println!(
        "exec true, one alone:        p50 {:7.1} ms  p90 {:7.1} ms",
        ms(percentile(&base, 0.5)),
        ms(percentile(&base, 0.9))
    );
    println!(
        "exec true, {n:>3} running:     p50 {:7.1} ms  p90 {:7.1} ms  ({} execs, every sandbox answered)",
        ms(percentile(&all, 0.5)),
        ms(percentile(&all, 0.9)),
        all.len()
    );
    Ok(())
}
