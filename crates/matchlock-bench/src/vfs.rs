//! `--vfs MB`: workspace file system throughput. Sequential write and read of `MB` MiB (1 MiB
//! calls; the read also with 8 KiB calls, as line-by-line readers do) and small-file
//! create/stat/unlink rates, measured in the guest: on a matchlock `host_fs` workspace, on the
//! guest's own ext4 disk (same VM, same run), and on QEMU's virtio-9p sharing a host directory of
//! the same file system (a VM booted directly, as matchlock never uses 9p); with
//! `--vfs-virtiofs`, also on virtio-fs served by QEMU's `virtiofsd`.

use anyhow::{bail, Context, Result};
use std::process::{Command, Stdio};

/// The guest side: prints `write_mbps read_mbps read8k_mbps create_ops stat_ops unlink_ops`
/// for `dir`.
fn script(mb: u64, files: u32) -> String {
    format!(
        r#"
import os, sys, time
def drop():
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f: f.write("3")
    except OSError: pass
for d in sys.argv[1:]:
    os.makedirs(d, exist_ok=True)
    p = os.path.join(d, "big")
    chunk = os.urandom(1 << 20)
    t = time.perf_counter()
    with open(p, "wb") as f:
        for i in range({mb}): f.write(chunk)
        f.flush(); os.fsync(f.fileno())
    w = {mb} / (time.perf_counter() - t)
    drop()
    t = time.perf_counter()
    with open(p, "rb") as f:
        while f.read(1 << 20): pass
    r = {mb} / (time.perf_counter() - t)
    drop()
    t = time.perf_counter()
    with open(p, "rb", buffering=0) as f:
        while f.read(8192): pass
    r8 = {mb} / (time.perf_counter() - t)
    os.unlink(p)
    names = [os.path.join(d, "f%d" % i) for i in range({files})]
    t = time.perf_counter()
    for n in names:
        with open(n, "wb") as f: f.write(b"x" * 1024)
    c = {files} / (time.perf_counter() - t)
    drop()
    t = time.perf_counter()
    for n in names: os.stat(n)
    s = {files} / (time.perf_counter() - t)
    t = time.perf_counter()
    for n in names: os.unlink(n)
    u = {files} / (time.perf_counter() - t)
    print(d, w, r, r8, c, s, u, flush=True)
"#
    )
}

/// Results per place, in [`ROWS`] order.
type Row = [f64; 6];

/// What each result measures.
const ROWS: [&str; 6] = [
    "seq write MB/s",
    "seq read MB/s",
    "seq read, 8 KiB calls MB/s",
    "create ops/s",
    "stat ops/s",
    "unlink ops/s",
];

fn parse(out: &str, dir: &str) -> Result<Row> {
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("{dir} ")))
        .with_context(|| format!("no result for {dir} in: {out}"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    v.try_into()
        .map_err(|_| anyhow::anyhow!("bad result line: {line}"))
}

/// Runs `runs` rounds of all three and prints medians with ratios.
/// With `virtiofs`, also on virtio-fs served by QEMU's C `virtiofsd` (the same transport as the
/// workspace, served by QEMU's reference daemon instead of matchlock's).
pub fn bench(matchlock: &str, image: &str, mb: u64, runs: usize, virtiofs: bool) -> Result<()> {
    let store = matchlock_image::ImageStore::open_default()?;
    let info = store
        .resolve(image)
        .with_context(|| format!("--vfs needs an image with python3 ({image}); see --net"))?;
    let files = 300;
    let code = script(mb, files);
    let (mut vfs, mut ext4, mut ninep) = (Vec::new(), Vec::new(), Vec::new());
    let mut vfsd = Vec::new();
    for _ in 0..runs {
        let host = tempfile::Builder::new()
            .prefix("mlbvfs")
            .tempdir_in("/tmp")?;
        let spec = format!("{}:bench:host_fs", host.path().display());
        let out = Command::new(matchlock)
            .args([
                "run",
                "--privileged",
                "--image",
                image,
                "--workspace",
                "/workspace",
                "-v",
                &spec,
                "--",
                "python3",
                "-c",
                &code,
                "/workspace/bench/t",
                "/root/t",
            ])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "matchlock run failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        vfs.push(parse(&text, "/workspace/bench/t")?);
        ext4.push(parse(&text, "/root/t")?);

        let host9 = tempfile::Builder::new()
            .prefix("mlb9p")
            .tempdir_in("/tmp")?;
        let extra = [
            "-fsdev".to_string(),
            format!(
                "local,id=fs0,path={},security_model=none",
                host9.path().display()
            ),
            "-device".to_string(),
            "virtio-9p-device,fsdev=fs0,mount_tag=bench".to_string(),
        ];
        let nine = [
            "-t",
            "9p",
            "-o",
            "trans=virtio,version=9p2000.L,msize=262144",
        ];
        ninep.push(mounted_run(&info.rootfs, &extra, &nine, "/mnt/9p", &code)?);
        if virtiofs {
            vfsd.push(virtiofs_run(&info.rootfs, &code)?);
        }
    }
    let median = |v: &Vec<Row>, i: usize| {
        let mut x: Vec<f64> = v.iter().map(|r| r[i]).collect();
        x.sort_by(|a, b| a.total_cmp(b));
        x[x.len() / 2]
    };
    println!("\n## workspace file system ({mb} MiB sequential, {files} small files; {runs} runs, medians)");
    let extra = if virtiofs { "   virtio-fs" } else { "" };
    println!(
        "{:<28} {:>12} {:>12} {:>12} {:>12}{extra}",
        "", "matchlock", "virtio-9p", "guest ext4", "vs 9p"
    );
    for (i, name) in ROWS.iter().enumerate() {
        let (a, b, c) = (median(&vfs, i), median(&ninep, i), median(&ext4, i));
        let d = if virtiofs {
            format!(" {:>11.1}", median(&vfsd, i))
        } else {
            String::new()
        };
        println!(
            "{name:<28} {a:>12.1} {b:>12.1} {c:>12.1} {:>11.2}x{d}",
            a / b
        );
    }
    Ok(())
}

/// The script on virtio-fs served by QEMU's C `virtiofsd` (`cache=auto`) from a fresh host
/// directory, in a VM booted directly with shared memory, as vhost-user requires.
fn virtiofs_run(rootfs: &std::path::Path, code: &str) -> Result<Row> {
    let host = tempfile::Builder::new()
        .prefix("mlbvfsd")
        .tempdir_in("/tmp")?;
    let data = host.path().join("data");
    std::fs::create_dir(&data)?;
    let sock = host.path().join("vfsd.sock");
    let daemon_log = host.path().join("virtiofsd.log");
    let mut daemon = Command::new("/usr/lib/qemu/virtiofsd")
        .arg(format!("--socket-path={}", sock.display()))
        .args([
            "-o",
            &format!("source={}", data.display()),
            "-o",
            "cache=auto",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&daemon_log)?)
        .spawn()
        .context("starting /usr/lib/qemu/virtiofsd (Debian's qemu-system-x86 ships it)")?;
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let extra = [
        // vhost-user needs modern virtio-mmio (microvm defaults to legacy) and shared guest RAM.
        "-global".to_string(),
        "virtio-mmio.force-legacy=false".to_string(),
        "-object".to_string(),
        "memory-backend-memfd,id=mem,size=512M,share=on".to_string(),
        "-machine".to_string(),
        "memory-backend=mem".to_string(),
        "-chardev".to_string(),
        format!("socket,id=vfsd,path={}", sock.display()),
        "-device".to_string(),
        "vhost-user-fs-device,chardev=vfsd,tag=bench".to_string(),
    ];
    let result = mounted_run(rootfs, &extra, &["-t", "virtiofs"], "/mnt/vfsd", code);
    let _ = daemon.kill();
    let _ = daemon.wait();
    result.with_context(|| {
        let log = std::fs::read_to_string(&daemon_log).unwrap_or_default();
        format!("virtio-fs baseline failed; virtiofsd said:\n{log}")
    })
}

/// Boots a VM directly with `extra` QEMU arguments, mounts the device tagged `bench` at `at` with
/// `mount_args`, and runs the benchmark script there.
fn mounted_run(
    rootfs: &std::path::Path,
    extra: &[String],
    mount_args: &[&str],
    at: &str,
    code: &str,
) -> Result<Row> {
    let vm = crate::rawvm::RawVm::boot(rootfs, extra, None)?;
    vm.exec(vec!["mkdir".into(), "-p".into(), at.into()], true)?;
    let mut mount: Vec<String> = vec!["mount".into()];
    mount.extend(mount_args.iter().map(|a| a.to_string()));
    mount.extend(["bench".into(), at.into()]);
    vm.exec(mount, true)?;
    let dir = format!("{at}/t");
    let out = vm.exec(
        vec!["python3".into(), "-c".into(), code.to_string(), dir.clone()],
        true,
    )?;
    parse(&out, &dir)
}
