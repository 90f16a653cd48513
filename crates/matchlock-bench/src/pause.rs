//! `--pause N`: `matchlock pause` and `resume` of an idle sandbox, N rounds per image, against a
//! cold start of the same image to its first exec, measured in the same run.
//!
//! For each image: one detached sandbox; each round times `matchlock pause` (save and QEMU gone),
//! the state file's size, `matchlock resume` and the first `exec true` after it. The baseline,
//! interleaved, is `run -d --no-snapshot` plus its first `exec true`, the way back to a working
//! sandbox without pause. QEMU's PSS before the pause is what the pause gives back to the host.

use anyhow::{bail, Context, Result};
use matchlock_sandbox::Store;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn cli(matchlock: &str, args: &[&str]) -> Result<(Duration, String)> {
    let start = Instant::now();
    let out = Command::new(matchlock)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running matchlock")?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!(
            "matchlock {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn pss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Pss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Runs the section for each image.
pub fn run(matchlock: &str, images: &[String], rounds: usize) -> Result<()> {
    let store = Store::open_default();
    println!("\n== pause / resume, {rounds} rounds per image, medians ==");
    for image in images {
        let (_, out) = cli(
            matchlock,
            &["run", "-d", "--image", image, "--", "sleep", "100000"],
        )?;
        let id = out
            .trim()
            .lines()
            .last()
            .context("no sandbox id")?
            .to_string();
        let result = (|| -> Result<()> {
            cli(matchlock, &["exec", &id, "--", "true"])?;
            std::thread::sleep(Duration::from_secs(3));
            let qemu = store.state(&id)?.qemu_pid.context("no QEMU pid")?;
            let pss = pss_kb(qemu);
            let (mut pause, mut resume, mut first, mut cold) = (vec![], vec![], vec![], vec![]);
            let mut bytes = 0;
            for _ in 0..rounds {
                pause.push(cli(matchlock, &["pause", &id])?.0);
                bytes = store.state(&id)?.paused.map_or(0, |p| p.bytes);
                resume.push(cli(matchlock, &["resume", &id])?.0);
                first.push(cli(matchlock, &["exec", &id, "--", "true"])?.0);
                let start = Instant::now();
                let (_, out) = cli(
                    matchlock,
                    &[
                        "run",
                        "-d",
                        "--no-snapshot",
                        "--image",
                        image,
                        "--",
                        "sleep",
                        "100000",
                    ],
                )?;
                let cid = out
                    .trim()
                    .lines()
                    .last()
                    .context("no sandbox id")?
                    .to_string();
                cli(matchlock, &["exec", &cid, "--", "true"])?;
                cold.push(start.elapsed());
                cli(matchlock, &["kill", &cid])?;
            }
            let (p, r, f, c) = (median(pause), median(resume), median(first), median(cold));
            println!("{image}:");
            println!(
                "  QEMU PSS while running (freed by the pause): {:8.1} MB",
                pss as f64 / 1024.0
            );
            println!(
                "  state file:                                  {:8.1} MB",
                bytes as f64 / 1e6
            );
            println!("  matchlock pause:                             {p:8.1} ms");
            println!("  matchlock resume:                            {r:8.1} ms");
            println!("  first exec after resume:                     {f:8.1} ms");
            println!(
                "  resume + first exec:                         {:8.1} ms",
                r + f
            );
            println!("  baseline, cold run -d + first exec:          {c:8.1} ms");
            println!(
                "  ratio (resume + exec) / cold:                {:8.2}",
                (r + f) / c
            );
            Ok(())
        })();
        let _ = cli(matchlock, &["kill", &id]);
        result?;
    }
    Ok(())
}
