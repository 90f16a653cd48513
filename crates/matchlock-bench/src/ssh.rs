//! `--ssh N`: SSH access against matchlock's own paths, in the same run.
//!
//! One sandbox of `--net-image` (SFTP served by the guest agent) and its SSH server started in
//! this process. Session start: N times OpenSSH's `ssh … true` (a new process, TCP, key exchange,
//! authentication, an exec), interleaved with `matchlock exec ID true` (a new process and an exec
//! over the control socket). Transfer: `--net MB` (default 100) into the sandbox with `scp`,
//! against the sandbox client's `write_file` (the path of RPC `write_file`), `--runs` times each.

use anyhow::{bail, Context, Result};
use matchlock_sandbox::{Client, Store};
use matchlock_ssh::SshServer;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn timed(cmd: &mut Command) -> Result<Duration> {
    let t = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .context("running a command")?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(took)
}

/// Runs the section.
pub fn bench(matchlock: &str, image: &str, n: usize, mb: u64, runs: usize) -> Result<()> {
    let out = Command::new(matchlock)
        .args(["run", "-d", "--image", image, "--", "sleep", "1000000"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!("run: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let result = measure(matchlock, &id, n, mb, runs);
    let _ = Command::new(matchlock).args(["kill", &id]).output();
    let _ = Command::new(matchlock).args(["rm", &id]).output();
    result
}

fn measure(matchlock: &str, id: &str, n: usize, mb: u64, runs: usize) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let store = Store::open_default();
    let client = Client::for_sandbox(&store, id)?;
    let server = rt
        .block_on(SshServer::start(
            client.clone(),
            &store.dir(id).join("ssh"),
            "127.0.0.1:0".parse()?,
            "root",
        ))
        .map_err(anyhow::Error::msg)?;
    let access = server.access().clone();
    let ssh = || {
        let mut c = Command::new("ssh");
        c.args(access.ssh_args()).arg("true");
        c
    };
    for _ in 0..3 {
        timed(&mut ssh())?;
    }
    let (mut s, mut e) = (Vec::new(), Vec::new());
    for _ in 0..n {
        s.push(timed(&mut ssh())?);
        e.push(timed(Command::new(matchlock).args(["exec", id, "true"]))?);
    }
    s.sort();
    e.sort();
    println!("\n== SSH access ({n} sessions; {runs} x {mb} MiB in) ==");
    crate::print_latencies(&[("ssh true (new session)", &s), ("matchlock exec true", &e)]);
    let p50 = |v: &[Duration]| crate::ms(crate::percentile(v, 0.5));
    println!("ssh / matchlock exec p50: {:.2}", p50(&s) / p50(&e));

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("payload");
    let data: Vec<u8> = (0..(mb << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data)?;
    let (mut scp, mut wf) = (Vec::new(), Vec::new());
    let opts = access.options();
    for _ in 0..runs {
        let t = timed(Command::new("scp").args(&opts).arg(&file).arg(format!(
            "{}@{}:/tmp/scp-payload",
            access.user,
            access.addr.ip()
        )))?;
        scp.push(mb as f64 / t.as_secs_f64());
        let t = Instant::now();
        rt.block_on(client.write_file("/tmp/wf-payload", &data, 0o644))?;
        wf.push(mb as f64 / t.elapsed().as_secs_f64());
    }
    let check = Command::new(matchlock)
        .args([
            "exec",
            id,
            "sh",
            "-c",
            "cmp /tmp/scp-payload /tmp/wf-payload && echo same",
        ])
        .output()?;
    if String::from_utf8_lossy(&check.stdout).trim() != "same" {
        bail!(
            "the two copies differ: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (med(&mut scp), med(&mut wf));
    println!("scp {mb} MiB in:        {a:8.1} MiB/s (median)");
    println!("write_file {mb} MiB in: {b:8.1} MiB/s (median)");
    println!("scp / write_file throughput: {:.2}", a / b);
    drop(server);
    Ok(())
}
