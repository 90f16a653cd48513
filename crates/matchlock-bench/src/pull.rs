//! `matchlock-bench --pull`: pull + convert time of a multi-layer image from a local registry.
//!
//! A `docker-registry` on 127.0.0.1 (free port, temp storage) gets a four-layer gzip OCI image
//! built from host directories (by default `/usr/lib/python3.11`, `/usr/share/perl`,
//! `/usr/share/zoneinfo`, whichever exist, plus a small top layer with a whiteout and an opaque
//! directory), pushed with `skopeo`. Then, interleaved, each `--runs` times from an empty cache:
//!
//! * **matchlock**: `ImageStore::pull` (concurrent downloads, digest checks, unpacking while
//!   downloading, `mke2fs -d`, ownership fix-ups);
//! * **baseline**: `skopeo copy docker://... oci:DIR` then `tar -xzf` of each layer in order into
//!   one tree (no whiteout handling, so slightly less work than ours) and `mke2fs -d` of that
//!   tree into an ext4 of the same size rule.
//!
//! Prints both medians and matchlock's time as a ratio of the baseline.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// Kills the registry however the benchmark ends.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data)?;
    Ok(e.finish()?)
}

/// An uncompressed layer holding `dir` at the same path (symlinks kept as links).
fn dir_layer(dir: &Path) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    let rel = dir.strip_prefix("/").unwrap_or(dir);
    b.append_dir_all(rel, dir)
        .with_context(|| format!("archiving {}", dir.display()))?;
    Ok(b.into_inner()?)
}

/// The top layer: deletes one file of the first layer and makes a directory opaque.
fn top_layer(first: &Path) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let rel = first.strip_prefix("/").unwrap_or(first);
    let mut add = |path: String, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data)?;
        Ok(())
    };
    add(format!("{}/.wh.README.txt", rel.display()), b"")?;
    add("opaque/.wh..wh..opq".into(), b"")?;
    add("opaque/new".into(), b"new")?;
    add("etc/bench-marker".into(), b"matchlock-bench\n")?;
    Ok(b.into_inner()?)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_registry(dir: &Path) -> Result<(Daemon, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    std::fs::create_dir_all(dir.join("storage"))?;
    std::fs::write(
        dir.join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("storage").display()
        ),
    )?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.join("config.yml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting docker-registry (apt-get install docker-registry)")?;
    let daemon = Daemon(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("docker-registry did not start on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((daemon, addr))
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Build the OCI layout and push it; returns the reference and the total compressed size.
fn push(work: &Path, addr: &str, dirs: &[PathBuf]) -> Result<(String, u64, usize)> {
    let mut layers = Vec::new();
    for d in dirs {
        layers.push(dir_layer(d)?);
    }
    layers.push(top_layer(&dirs[0])?);
    let layout = work.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let put = |data: &[u8]| std::fs::write(blobs.join(&sha(data)[7..]), data);
    let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
    let mut descs = Vec::new();
    let mut total = 0;
    for l in &layers {
        let gz = gzip(l)?;
        total += gz.len() as u64;
        put(&gz)?;
        descs.push(
            serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                      "digest": sha(&gz), "size": gz.len()}),
        );
    }
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))?;
    put(&config)?;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": sha(&config), "size": config.len()},
        "layers": descs,
    }))?;
    put(&manifest)?;
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": sha(&manifest), "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))?,
    )?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let reference = format!("{addr}/bench/layers:1");
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://{reference}")))?;
    Ok((reference, total, layers.len()))
}

fn du(dir: &Path) -> Result<u64> {
    let out = Command::new("du").arg("-sb").arg(dir).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0))
}

/// skopeo to an OCI directory, tar -x of every layer, mke2fs -d.
fn baseline(reference: &str, dir: &Path) -> Result<()> {
    let layout = dir.join("oci");
    run(Command::new("skopeo")
        .args(["--insecure-policy", "copy", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:1", layout.display())))?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let mdigest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json")?;
    let blob = |d: &str| layout.join("blobs/sha256").join(&d[7..]);
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(mdigest))?)?;
    let rootfs = dir.join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    for l in manifest["layers"].as_array().context("layers")? {
        let d = l["digest"].as_str().context("digest")?;
        run(Command::new("tar")
            .args(["-xzf"])
            .arg(blob(d))
            .arg("-C")
            .arg(&rootfs)
            .args(["--same-owner", "--numeric-owner"]))?;
    }
    let size = (du(&rootfs)? * 115 / 100 + (16 << 20)).div_ceil(1 << 20);
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&rootfs)
        .arg(dir.join("rootfs.ext4"))
        .arg(format!("{size}M")))?;
    Ok(())
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The `--pull` benchmark.
pub fn bench(runs: usize, layer_dirs: &[PathBuf]) -> Result<()> {
    for tool in ["docker-registry", "skopeo", "mke2fs", "tar"] {
        if Command::new("sh")
            .args([
                "-c",
                &format!("command -v {tool} || test -x /usr/sbin/{tool}"),
            ])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{tool} is needed: apt-get install docker-registry skopeo e2fsprogs tar");
        }
    }
    let dirs: Vec<PathBuf> = if layer_dirs.is_empty() {
        [
            "/usr/lib/python3.11",
            "/usr/share/perl",
            "/usr/share/zoneinfo",
        ]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .collect()
    } else {
        layer_dirs.to_vec()
    };
    if dirs.is_empty() {
        bail!("no layer directories exist; give some with --layer-dir DIR");
    }
    let work = tempfile::tempdir()?;
    let (_registry, addr) = start_registry(&work.path().join("registry"))?;
    let (reference, bytes, nlayers) = push(work.path(), &addr, &dirs)?;
    println!(
        "image: {reference}, {nlayers} gzip layers, {:.1} MB compressed, from {}",
        bytes as f64 / 1e6,
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut ours = Vec::new();
    let mut base = Vec::new();
    for i in 0..runs {
        // Interleaved so machine noise hits both alike; each from an empty cache.
        let d = work.path().join(format!("ours-{i}"));
        let store = matchlock_image::ImageStore::open(&d)?;
        let start = Instant::now();
        store.pull(
            &reference,
            &matchlock_image::PullOptions::default(),
            &matchlock_image::NoProgress,
        )?;
        ours.push(start.elapsed());
        std::fs::remove_dir_all(&d)?;

        let d = work.path().join(format!("base-{i}"));
        std::fs::create_dir_all(&d)?;
        let start = Instant::now();
        baseline(&reference, &d)?;
        base.push(start.elapsed());
        std::fs::remove_dir_all(&d)?;
    }
    let (o, b) = (median(&mut ours), median(&mut base));
    println!("\n## pull + convert ({runs} runs each, medians)");
    println!(
        "skopeo copy + tar -x + mke2fs -d (baseline): {:8.1} ms",
        b.as_secs_f64() * 1000.0
    );
    println!(
        "matchlock pull (ImageStore::pull):           {:8.1} ms",
        o.as_secs_f64() * 1000.0
    );
    println!(
        "ratio matchlock / baseline:                  {:8.2}",
        o.as_secs_f64() / b.as_secs_f64()
    );
    Ok(())
}
