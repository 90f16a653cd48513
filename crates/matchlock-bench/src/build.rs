//! `--build N`: `matchlock build` against `buildah bud` on the same Dockerfile and context, in
//! the same run. buildah is Debian's, run natively (chroot isolation, vfs storage, its own
//! store in a temporary directory, `--layers` so it caches steps): no VM, the baseline users
//! compare against. Three measurements, `N` times each, medians: a cold build (no cache), a
//! no-op rebuild, and a rebuild after one copied file changed. The base image is `--image`,
//! given to buildah as a docker-archive that `matchlock image export` wrote.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

const DOCKERFILE: &str = "ARG BASE=busybox
FROM ${BASE}
WORKDIR /app
COPY app/ ./
RUN for i in $(seq 1 200); do echo $i > /app/gen$i; done && cat /app/f1 > /app/first
COPY config.txt /etc/app.conf
CMD [\"ls\", \"/app\"]
";

fn timed(cmd: &mut Command) -> Result<f64> {
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    let took = t.elapsed().as_secs_f64();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the section.
pub fn bench(matchlock: &str, image: &str, runs: usize) -> Result<()> {
    if Command::new("buildah").arg("--version").output().is_err() {
        bail!("--build compares against buildah: apt-get install buildah");
    }
    let dir = tempfile::tempdir()?;
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(ctx.join("app"))?;
    for i in 0..50 {
        std::fs::write(
            ctx.join(format!("app/f{i}")),
            format!("file {i}\n").repeat(20),
        )?;
    }
    std::fs::write(ctx.join("config.txt"), "setting=1\n")?;
    std::fs::write(ctx.join("Dockerfile"), DOCKERFILE)?;
    let base = dir.path().join("base.tar");
    timed(
        Command::new(matchlock)
            .args(["image", "export", image, "-o"])
            .arg(&base),
    )?;
    let buildah_base = format!("BASE=docker-archive:{}", base.display());
    let ours_base = format!("BASE={image}");
    let root = dir.path().join("buildah");
    let ours = |extra: &[&str]| -> Result<f64> {
        let mut c = Command::new(matchlock);
        c.args(["build", "-t", "bench/build:1", "--build-arg", &ours_base]);
        c.args(extra).arg(&ctx);
        timed(&mut c)
    };
    let theirs = |extra: &[&str]| -> Result<f64> {
        let mut c = Command::new("buildah");
        c.arg("--root")
            .arg(root.join("root"))
            .arg("--runroot")
            .arg(root.join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "bud",
                "--isolation",
                "chroot",
                "--layers",
            ])
            .args(["-t", "bench/build:1", "--build-arg", &buildah_base]);
        c.args(extra).arg(&ctx);
        timed(&mut c)
    };
    let (mut cold, mut noop, mut changed) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        cold.push((ours(&["--no-cache"])?, theirs(&["--no-cache"])?));
        noop.push((ours(&[])?, theirs(&[])?));
        change(&ctx.join("app/f7"), run)?;
        changed.push((ours(&[])?, theirs(&[])?));
    }
    let _ = Command::new(matchlock)
        .args(["image", "rm", "bench/build:1"])
        .output();
    println!("\n== Build ({runs} runs each; COPY 50 files, RUN writing 200, COPY 1) ==");
    println!(
        "{:<28} {:>10} {:>10} {:>9}",
        "", "matchlock", "buildah", "ratio"
    );
    for (name, v) in [
        ("cold build (no cache)", cold),
        ("no-op rebuild", noop),
        ("one copied file changed", changed),
    ] {
        let m = median(v.iter().map(|p| p.0).collect());
        let b = median(v.iter().map(|p| p.1).collect());
        println!("{name:<28} {m:>9.2}s {b:>9.2}s {:>9.2}", m / b);
    }
    Ok(())
}

fn change(path: &Path, run: usize) -> Result<()> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    std::fs::write(path, format!("changed in run {run} at {stamp}\n"))?;
    Ok(())
}
