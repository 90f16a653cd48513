//! `matchlock-bench`: measures sandbox start and exec latency against baselines taken in the same run.
//!
//! ```text
//! matchlock-bench [--matchlock PATH] [--image NAME] [--boots N] [--execs N]
//! matchlock-bench --pull [--runs N] [--layer-dir DIR]...
//! matchlock-bench --net MB [--runs N] [--net-image NAME]
//! matchlock-bench --net-tls MB [--runs N] [--net-image NAME]
//! matchlock-bench --vfs MB [--runs N] [--net-image NAME] [--vfs-virtiofs]
//! matchlock-bench --plugins N [--runs N]
//! matchlock-bench --density N [--image NAME] [--density-flags "RUN FLAGS"]
//! matchlock-bench --pause N [--image NAME] [--net-image NAME]
//! matchlock-bench --ingress N [--net MB] [--runs N] [--net-image NAME]
//! matchlock-bench --ssh N [--net MB] [--runs N] [--net-image NAME]
//! matchlock-bench --build N [--image NAME]
//! ```
//! 1. Boot: bare QEMU booting our kernel + initramfs to `/init` (the accelerator probe path: the agent
//!    prints a marker and reboots) against `matchlock run --image IMAGE -- true` (boot, rootfs, agent
//!    setup, exec, shutdown, cleanup). Prints medians and matchlock's overhead as a ratio of the bare
//!    boot.
//! 2. Exec: round-trip latency of `true` in one running sandbox over the control socket (what the
//!    CLI and RPC server use), and of the whole `matchlock exec` CLI process, with p50/p90/p99.
//! 3. RPC (`--rpc-starts N --rpc-execs M`): the time from spawning `matchlock rpc` (what an SDK's
//!    `Client.start()` does) to the first `exec` result with a cached image, interleaved with the
//!    bare QEMU boot as baseline; then `exec` of `true` over JSON-RPC against `matchlock exec` of
//!    the same sandbox.
//! 4. `--pull` (instead of 1 to 3): pull + convert of a multi-layer image from a local registry
//!    against skopeo + tar + mke2fs; see `pull.rs`.
//! 5. `--net MB` (instead of 1 to 3): guest download throughput and connect latency from a
//!    loopback server through matchlock's stack against QEMU's user networking; see `net.rs`.
//! 6. `--net-tls MB`: HTTPS download and request latency through the interception proxy (MITM,
//!    policy, secrets) against the same transfer in open mode with TLS end to end.
//! 7. `--vfs MB`: workspace (`host_fs`) throughput and small-file rates against the guest's own
//!    ext4 and QEMU's virtio-9p on the same host file system; `--vfs-virtiofs` adds virtio-fs
//!    served by QEMU's own `virtiofsd` (the same transport, its reference daemon); see `vfs.rs`.
//! 8. `--plugins N`: what the network plugin pipeline (budget gate, model router, usage logger)
//!    adds to a model call, and the time to a streamed first byte through the router, against
//!    interception without plugins, in process; see `plugins.rs`.
//! 9. `--density N`: N idle sandboxes at once: memory per sandbox, and exec latency with all N
//!    running against one alone; see `density.rs`. The boot section (1) also times start to the
//!    first exec's output from the image's template and cold (`--no-snapshot`).
//! 10. `--pause N`: `matchlock pause` and `resume` of an idle sandbox of `--image` and of
//!     `--net-image`, against a cold start to the first exec; see `pause.rs`.
//! 11. `--ingress N`: N requests and `--runs` downloads of `--net MB` (default 32) through the
//!     ingress gateway against `port-forward` to the same server in a `--net-image` sandbox; see
//!     `ingress.rs`.
//! 12. `--ssh N`: N `ssh … true` sessions against `matchlock exec … true`, and `--runs` copies of
//!     `--net MB` (default 100) in with `scp` against `write_file`; see `ssh.rs`.
//! 13. `--build N`: `matchlock build` against `buildah bud` on one Dockerfile, N times each: a
//!     cold build, a no-op rebuild, one copied file changed; see `build.rs`.
//!
//! `--boots 0` or `--execs 0` skips a section; the RPC section runs only when asked for.

mod build;
mod density;
mod ingress;
mod net;
mod pause;
mod plugins;
mod pull;
mod rawvm;
mod ssh;
mod vfs;

use anyhow::{bail, Context, Result};
use matchlock_proto::{read_msg, Msg};
use matchlock_sandbox::control::ExecSpec;
use matchlock_sandbox::{Client, Store};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Args {
    matchlock: String,
    image: String,
    boots: usize,
    execs: usize,
    pull: bool,
    runs: usize,
    layer_dirs: Vec<std::path::PathBuf>,
    rpc_starts: usize,
    rpc_execs: usize,
    net_mb: u64,
    net_tls_mb: u64,
    plugin_calls: usize,
    vfs_mb: u64,
    vfs_virtiofs: bool,
    net_image: String,
    density: usize,
    density_flags: Vec<String>,
    pause: usize,
    ingress: usize,
    ssh: usize,
    build: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        matchlock: std::env::current_exe()?
            .with_file_name("matchlock")
            .to_string_lossy()
            .into_owned(),
        image: "busybox".into(),
        boots: 10,
        execs: 200,
        pull: false,
        runs: 3,
        layer_dirs: Vec::new(),
        rpc_starts: 0,
        rpc_execs: 200,
        net_mb: 0,
        net_tls_mb: 0,
        plugin_calls: 0,
        vfs_mb: 0,
        vfs_virtiofs: false,
        net_image: "mltest/python:1".into(),
        density: 0,
        density_flags: Vec::new(),
        pause: 0,
        ingress: 0,
        ssh: 0,
        build: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().context(format!("{flag} needs a value"));
        match flag.as_str() {
            "--matchlock" => a.matchlock = val()?,
            "--image" => a.image = val()?,
            "--boots" => a.boots = val()?.parse()?,
            "--execs" => a.execs = val()?.parse()?,
            "--pull" => a.pull = true,
            "--runs" => a.runs = val()?.parse::<usize>()?.max(1),
            "--layer-dir" => a.layer_dirs.push(val()?.into()),
            "--rpc-starts" => a.rpc_starts = val()?.parse()?,
            "--rpc-execs" => a.rpc_execs = val()?.parse()?,
            "--net" => a.net_mb = val()?.parse()?,
            "--net-tls" => a.net_tls_mb = val()?.parse()?,
            "--plugins" => a.plugin_calls = val()?.parse()?,
            "--vfs" => a.vfs_mb = val()?.parse()?,
            "--vfs-virtiofs" => a.vfs_virtiofs = true,
            "--net-image" => a.net_image = val()?,
            "--density" => a.density = val()?.parse()?,
            "--pause" => a.pause = val()?.parse()?,
            "--ingress" => a.ingress = val()?.parse()?,
            "--ssh" => a.ssh = val()?.parse()?,
            "--build" => a.build = val()?.parse::<usize>()?.max(1),
            "--density-flags" => {
                a.density_flags = val()?.split_whitespace().map(str::to_string).collect()
            }
            other => bail!(
                "unknown flag {other}; see the doc comment in crates/matchlock-bench/src/main.rs"
            ),
        }
    }
    Ok(a)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Prints n, p50, p90 and p99 of each sorted series.
fn print_latencies(rows: &[(&str, &Vec<Duration>)]) {
    for (name, v) in rows {
        println!(
            "{name:<30} n={:<4} p50 {:6.1} ms  p90 {:6.1} ms  p99 {:6.1} ms",
            v.len(),
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.9)),
            ms(percentile(v, 0.99))
        );
    }
}

/// The baseline of the start-up measurements: a bare QEMU boot of our kernel and initramfs to
/// `/init` (the accelerator probe path).
struct BareBoot<'a> {
    qemu: &'a std::path::Path,
    kernel: &'a std::path::Path,
    initramfs: &'a std::path::Path,
    accel: matchlock_vmm::accel::Accel,
}

impl BareBoot<'_> {
    /// One bare QEMU boot to the agent's probe marker.
    fn once(&self) -> Result<Duration> {
        let start = Instant::now();
        matchlock_vmm::accel::probe(
            self.qemu,
            self.kernel,
            self.initramfs,
            self.accel,
            Duration::from_secs(60),
        )
        .map_err(anyhow::Error::msg)?;
        Ok(start.elapsed())
    }

    /// Runs `runs` rounds of the bare boot interleaved with `measured` (so machine noise hits both
    /// alike) and prints the medians and the overhead.
    fn against(
        &self,
        runs: usize,
        title: &str,
        label: &str,
        mut measured: impl FnMut() -> Result<Duration>,
    ) -> Result<()> {
        let (mut bare, mut full) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            bare.push(self.once()?);
            full.push(measured()?);
        }
        bare.sort();
        full.sort();
        let (b, f) = (percentile(&bare, 0.5), percentile(&full, 0.5));
        println!("\n## {title} ({runs} runs each, medians)");
        println!("bare QEMU to /init (baseline):      {:8.1} ms", ms(b));
        println!("{label:<36}{:8.1} ms", ms(f));
        println!(
            "overhead over bare boot:            {:8.1} ms ({:.0}% of the bare boot)",
            ms(f) - ms(b),
            (ms(f) - ms(b)) / ms(b) * 100.0
        );
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if args.pull {
        return pull::bench(args.runs, &args.layer_dirs);
    }
    if args.build > 0 {
        return build::bench(&args.matchlock, &args.image, args.build);
    }
    if args.ssh > 0 {
        let mb = if args.net_mb > 0 { args.net_mb } else { 100 };
        return ssh::bench(&args.matchlock, &args.net_image, args.ssh, mb, args.runs);
    }
    if args.ingress > 0 {
        let mb = if args.net_mb > 0 { args.net_mb } else { 32 };
        return ingress::bench(
            &args.matchlock,
            &args.net_image,
            args.ingress,
            mb,
            args.runs,
        );
    }
    if args.net_mb > 0 {
        return net::bench(&args.matchlock, &args.net_image, args.net_mb, args.runs);
    }
    if args.vfs_mb > 0 {
        return vfs::bench(
            &args.matchlock,
            &args.net_image,
            args.vfs_mb,
            args.runs,
            args.vfs_virtiofs,
        );
    }
    if args.pause > 0 {
        return pause::run(
            &args.matchlock,
            &[args.image.clone(), args.net_image.clone()],
            args.pause,
        );
    }
    if args.density > 0 {
        return density::bench(
            &args.matchlock,
            &args.image,
            args.density,
            &args.density_flags,
        );
    }
    if args.plugin_calls > 0 {
        return plugins::bench(args.plugin_calls, args.runs);
    }
    if args.net_tls_mb > 0 {
        return net::bench_tls(&args.matchlock, &args.net_image, args.net_tls_mb, args.runs);
    }
    let qemu = matchlock_vmm::qemu::locate_qemu()?;
    let kernel = matchlock_vmm::kernel::locate()?;
    let agent = matchlock_vmm::agent::locate()?;
    let initramfs = matchlock_vmm::initramfs::cached(&agent)?;
    let accel = matchlock_vmm::accel::choose(&qemu, &kernel, &initramfs)?;
    println!("accelerator: {} ({})", accel.accel, accel.reason);
    println!(
        "cpus: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    if args.boots > 0 {
        boot_overhead(&args, &qemu, &kernel, &initramfs, accel.accel)?;
    }
    if args.execs > 0 {
        exec_section(&args)?;
    }
    if args.rpc_starts > 0 {
        rpc_section(&args, &qemu, &kernel, &initramfs, accel.accel)?;
    }
    Ok(())
}

fn boot_overhead(
    args: &Args,
    qemu: &std::path::Path,
    kernel: &std::path::Path,
    initramfs: &std::path::Path,
    accel: matchlock_vmm::accel::Accel,
) -> Result<()> {
    let bare = BareBoot {
        qemu,
        kernel,
        initramfs,
        accel,
    };
    bare.against(
        args.boots,
        "boot",
        "matchlock run --no-snapshot -- true:",
        || {
            let start = Instant::now();
            let st = Command::new(&args.matchlock)
                .args(["run", "--no-snapshot", "--image", &args.image, "--", "true"])
                .stdin(Stdio::null())
                .status()
                .context("running matchlock")?;
            if !st.success() {
                bail!("matchlock run failed");
            }
            Ok(start.elapsed())
        },
    )?;
    first_exec(args, &bare)
}

/// Start to the first exec's output, `run --rm -- echo ready`, from the image's template and
/// booted cold (`--no-snapshot`), interleaved with the bare QEMU boot.
fn first_exec(args: &Args, bare: &BareBoot) -> Result<()> {
    let time = |cold: bool| -> Result<Duration> {
        use std::io::BufRead;
        let mut cmd = Command::new(&args.matchlock);
        cmd.args(["run", "--rm", "--image", &args.image]);
        if cold {
            cmd.arg("--no-snapshot");
        }
        let start = Instant::now();
        let mut child = cmd
            .args(["--", "echo", "ready"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("running matchlock")?;
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        out.read_line(&mut line)?;
        let first = start.elapsed();
        let st = child.wait()?;
        if !st.success() || line.trim() != "ready" {
            bail!("matchlock run failed ({st}): {line:?}");
        }
        Ok(first)
    };
    // The first start of this image and shape prepares its template.
    time(false)?;
    let (mut base, mut warm, mut cold) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.boots {
        base.push(bare.once()?);
        warm.push(time(false)?);
        cold.push(time(true)?);
    }
    for v in [&mut base, &mut warm, &mut cold] {
        v.sort();
    }
    let (b, w, c) = (
        ms(percentile(&base, 0.5)),
        ms(percentile(&warm, 0.5)),
        ms(percentile(&cold, 0.5)),
    );
    println!(
        "\n## start to the first exec's output ({} runs each, medians)",
        args.boots
    );
    println!("bare QEMU to /init (baseline):      {b:8.1} ms");
    println!("run, cold boot (--no-snapshot):     {c:8.1} ms");
    println!("run, from the template:             {w:8.1} ms");
    println!(
        "template / cold:                    {:8.2} (template / bare boot {:.2})",
        w / c,
        w / b
    );
    Ok(())
}

fn exec_section(args: &Args) -> Result<()> {
    // Exec latency in one running sandbox.
    let out = Command::new(&args.matchlock)
        .args(["run", "-d", "--image", &args.image, "--", "sleep", "100000"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "matchlock run -d failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let result = exec_latency(args, &id);
    let _ = Command::new(&args.matchlock).args(["kill", &id]).output();
    let _ = Command::new(&args.matchlock).args(["rm", &id]).output();
    result
}

/// One `true` over the sandbox's control socket, start to exit status.
pub(crate) async fn exec_true(client: &Client) -> Result<Duration> {
    let start = Instant::now();
    let mut s = client
        .exec(ExecSpec {
            argv: vec!["true".into()],
            ..Default::default()
        })
        .await?;
    loop {
        match read_msg(&mut s).await? {
            Some(Msg::Exited(st)) if st.code == 0 => return Ok(start.elapsed()),
            Some(Msg::Exited(st)) => bail!("true exited {}", st.code),
            Some(Msg::Error(e)) => bail!("exec failed: {e}"),
            Some(_) => {}
            None => bail!("stream ended early"),
        }
    }
}

fn exec_latency(args: &Args, id: &str) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let client = Client::for_sandbox(&Store::open_default(), id)?;
    let mut api = Vec::new();
    rt.block_on(async {
        for _ in 0..args.execs {
            api.push(exec_true(&client).await?);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let mut cli = Vec::new();
    for _ in 0..args.execs.min(50) {
        let start = Instant::now();
        let st = Command::new(&args.matchlock)
            .args(["exec", id, "--", "true"])
            .stdin(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("matchlock exec failed");
        }
        cli.push(start.elapsed());
    }
    api.sort();
    cli.sort();
    println!("\n## exec round trip of `true` in a running sandbox");
    print_latencies(&[
        ("control socket (API)", &api),
        ("matchlock exec (CLI process)", &cli),
    ]);
    println!("Matchlock (Go) baseline: a fixed 100 ms sleep per exec, i.e. p50 >= 100 ms");
    Ok(())
}

/// One `matchlock rpc` session driven with blocking line I/O, as an SDK would.
struct Rpc {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: std::io::BufReader<std::process::ChildStdout>,
    next: u64,
}

impl Rpc {
    fn start(matchlock: &str) -> Result<Rpc> {
        let mut child = Command::new(matchlock)
            .arg("rpc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting matchlock rpc")?;
        let input = child.stdin.take().context("stdin")?;
        let output = std::io::BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Rpc {
            child,
            input,
            output,
            next: 1,
        })
    }

    /// Sends a request and returns its result (notifications in between are skipped).
    fn call(&mut self, method: &str, params: serde_json::Value) -> Result<serde_json::Value> {
        use std::io::{BufRead, Write};
        let id = self.next;
        self.next += 1;
        let req =
            serde_json::json!({"jsonrpc": "2.0", "method": method, "id": id, "params": params});
        writeln!(self.input, "{req}")?;
        self.input.flush()?;
        loop {
            let mut line = String::new();
            if self.output.read_line(&mut line)? == 0 {
                bail!("matchlock rpc exited");
            }
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if v.get("id") == Some(&serde_json::json!(id)) {
                if let Some(e) = v.get("error") {
                    bail!("{method} failed: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    fn close(mut self) -> Result<()> {
        self.call("close", serde_json::json!({"timeout_seconds": 2}))?;
        drop(self.input);
        self.child.wait()?;
        Ok(())
    }
}

fn rpc_section(
    args: &Args,
    qemu: &std::path::Path,
    kernel: &std::path::Path,
    initramfs: &std::path::Path,
    accel: matchlock_vmm::accel::Accel,
) -> Result<()> {
    let bare = BareBoot {
        qemu,
        kernel,
        initramfs,
        accel,
    };
    bare.against(
        args.rpc_starts,
        "SDK start to first exec result",
        "rpc spawn + create + exec true:",
        || {
            let start = Instant::now();
            let mut rpc = Rpc::start(&args.matchlock)?;
            rpc.call("create", serde_json::json!({"image": args.image}))?;
            let r = rpc.call("exec", serde_json::json!({"command": "true"}))?;
            let took = start.elapsed();
            if r["exit_code"] != 0 {
                bail!("true failed over rpc: {r}");
            }
            rpc.close()?;
            Ok(took)
        },
    )?;

    let mut rpc = Rpc::start(&args.matchlock)?;
    let id = rpc.call("create", serde_json::json!({"image": args.image}))?["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // Interleaved: one RPC exec, then one CLI exec of the same sandbox.
    let mut over_rpc = Vec::new();
    let mut over_cli = Vec::new();
    for _ in 0..args.rpc_execs {
        let start = Instant::now();
        let r = rpc.call("exec", serde_json::json!({"command": "true"}))?;
        over_rpc.push(start.elapsed());
        if r["exit_code"] != 0 {
            bail!("true failed over rpc: {r}");
        }
        let start = Instant::now();
        let st = Command::new(&args.matchlock)
            .args(["exec", &id, "--", "sh", "-c", "true"])
            .stdin(Stdio::null())
            .status()?;
        over_cli.push(start.elapsed());
        if !st.success() {
            bail!("matchlock exec failed");
        }
    }
    rpc.close()?;
    let _ = Command::new(&args.matchlock).args(["rm", &id]).output();
    over_rpc.sort();
    over_cli.sort();
    println!("\n## exec of `true` (as `sh -c true`, which RPC exec runs) in one sandbox");
    print_latencies(&[
        ("JSON-RPC exec", &over_rpc),
        ("matchlock exec (CLI process)", &over_cli),
    ]);
    let (r, c) = (
        ms(percentile(&over_rpc, 0.5)),
        ms(percentile(&over_cli, 0.5)),
    );
    println!("RPC p50 is {:.2}x the CLI's ({:+.1} ms)", r / c, r - c);
    Ok(())
}
