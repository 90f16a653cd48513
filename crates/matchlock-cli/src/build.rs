//! `matchlock build`: flags -> build options; the build itself is `matchlock_build::builder`.

use crate::args::BuildArgs;
use anyhow::{anyhow, bail, Context, Result};
use matchlock_api::hosts::HostPattern;
use matchlock_api::request::{Cpus, DiskSizeMb, MemoryMb, NetworkRequest, Resources};
use matchlock_build::builder::{build as run_build, BuildOptions, Progress};
use matchlock_image::{ImageStore, PullPolicy, PullProgress, StderrProgress};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};

/// Prints each step as Docker's plain progress does: `[stage 2/5] RUN …`, the command's output,
/// then `CACHED` or the time it took, on stderr; stdout gets upstream's result lines
/// (`Successfully built and tagged TAG`, `Layers:`, `Size:`) and the digest.
struct Lines {
    pulls: StderrProgress,
    tty: bool,
}

impl Progress for Lines {
    fn step(&self, stage: &str, n: usize, total: usize, text: &str) {
        let mut e = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(e, "\x1b[1m[{stage} {n}/{total}] {text}\x1b[0m");
        } else {
            let _ = writeln!(e, "[{stage} {n}/{total}] {text}");
        }
    }
    fn cached(&self) {
        let _ = writeln!(std::io::stderr(), "  CACHED");
    }
    fn output(&self, bytes: &[u8]) {
        let _ = std::io::stderr().write_all(bytes);
    }
    fn done(&self, secs: f64) {
        if secs >= 0.05 {
            let _ = writeln!(std::io::stderr(), "  done in {secs:.1}s");
        }
    }
    fn pulls(&self) -> &dyn PullProgress {
        &self.pulls
    }
    fn pruned(&self, images: usize, bytes: u64) {
        let _ = writeln!(
            std::io::stderr(),
            "removed {images} least recently used cached steps ({:.1} MiB) to stay within \
             --build-cache-size",
            bytes as f64 / (1024.0 * 1024.0)
        );
    }
}

/// `matchlock build`.
pub fn build(args: BuildArgs) -> Result<i32> {
    let context = std::fs::canonicalize(&args.context)
        .with_context(|| format!("the build context {}", args.context.display()))?;
    if !context.is_dir() {
        bail!("the build context {} is not a directory", context.display());
    }
    // The default Dockerfile is the context's, its links resolved inside the context (a cloned
    // repository's cannot name a host file); `-f` is the user's own choice of file.
    let file = match &args.file {
        Some(f) => f.clone(),
        None => matchlock_build::copy::context_file(&context, "Dockerfile")
            .map_err(|e| anyhow::anyhow!("the context's Dockerfile: {e}"))?,
    };
    // `-f -`: the Dockerfile from standard input, as `docker build -f -` reads it.
    let read = |file: &std::path::Path| -> std::io::Result<String> {
        if file == std::path::Path::new("-") {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
            Ok(text)
        } else {
            std::fs::read_to_string(file)
        }
    };
    let dockerfile = read(&file).with_context(|| {
        if args.file.is_none() && file != context.join("Dockerfile") {
            format!(
                "the context's Dockerfile is a link, followed inside the context only, to {} \
                 (name another with -f FILE)",
                file.display()
            )
        } else {
            format!("reading {} (name another with -f FILE)", file.display())
        }
    })?;
    let mut build_args = BTreeMap::new();
    for a in &args.build_args {
        match a.split_once('=') {
            Some((k, v)) => build_args.insert(k.to_string(), v.to_string()),
            // Docker's `--build-arg NAME`: the value from this environment, if set.
            None => match std::env::var(a) {
                Ok(v) => build_args.insert(a.clone(), v),
                Err(_) => continue,
            },
        };
    }
    let network = if args.no_network {
        if !args.allow_host.is_empty()
            || !args.secret.is_empty()
            || !args.allow_private_host.is_empty()
        {
            bail!("--no-network cannot be combined with --allow-host, --secret or --allow-private-host");
        }
        None
    } else {
        let mut n = NetworkRequest::default();
        matchlock_api::validate::mtu(args.mtu, "--mtu").map_err(|e| anyhow!(e))?;
        n.mtu = Some(args.mtu as u16);
        for h in &args.allow_host {
            n.intercept
                .allowed_hosts
                .push(HostPattern::parse(h).map_err(|e| anyhow!("--allow-host: {e}"))?);
        }
        n.intercept.secrets = crate::request::secrets(&args.secret, &[])?;
        for name in &args.secret_over_http {
            n.intercept
                .secrets
                .iter_mut()
                .find(|s| s.name == *name)
                .ok_or_else(|| anyhow!("--secret-over-http {name}: there is no --secret {name}"))?
                .allow_http = true;
        }
        for a in &args.allow_private_host {
            n.allow_private_hosts.push(
                a.parse()
                    .map_err(|_| anyhow!("--allow-private-host {a}: not an IP address"))?,
            );
        }
        Some(n)
    };
    let mut add_hosts = Vec::new();
    for h in &args.add_host {
        let (name, addr) = h
            .split_once(':')
            .ok_or_else(|| anyhow!("--add-host {h}: give NAME:IP"))?;
        let addr = matchlock_api::validate::add_host(name, addr, &format!("--add-host {h}"))
            .map_err(|e| anyhow!(e))?;
        add_hosts.push((addr, name.to_string()));
    }
    // Upstream's `--build-cpus 0` / `--build-memory 0` mean "all available": every core, and
    // the default memory (a step sandbox does not need the host's whole memory).
    let cpus = if args.cpus == 0.0 {
        std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
    } else {
        args.cpus
    };
    let memory = if args.memory == 0 {
        matchlock_api::defaults::MEMORY_MB
    } else {
        args.memory
    };
    let resources = Resources {
        cpus: Some(Cpus::new(cpus, "--cpus")?),
        memory: Some(MemoryMb::new(memory, "--memory")?),
        disk: Some(DiskSizeMb::new(args.disk_size, "--disk-size")?),
    };
    let opts = BuildOptions {
        dockerfile,
        context,
        tags: args.tags.clone(),
        build_args,
        target: args.target.clone(),
        no_cache: args.no_cache,
        pull: if args.pull {
            PullPolicy::Always
        } else {
            PullPolicy::Missing
        },
        network,
        add_hosts,
        resources,
        cache_limit: Some(args.build_cache_size.saturating_mul(1 << 20)),
    };
    let images = ImageStore::open_default()?;
    let progress = Lines {
        pulls: StderrProgress::new(),
        tty: std::io::stderr().is_terminal(),
    };
    let started = std::time::Instant::now();
    let image = run_build(
        &images,
        &matchlock_sandbox::Store::open_default(),
        &opts,
        &progress,
    )?;
    eprintln!("built in {:.1}s", started.elapsed().as_secs_f64());
    if let Some(out) = &args.output {
        crate::image::export(&images, &image.name, out, args.output_format)?;
    }
    // Upstream's lines (scripts look for "Successfully built and tagged"), then the digest.
    if args.tags.is_empty() {
        println!(
            "Successfully built {} (untagged; name it with -t)",
            image.digest
        );
    }
    for tag in &args.tags {
        println!("Successfully built and tagged {tag}");
    }
    let layers = images.layers(&image).map(|l| l.len()).unwrap_or(0);
    println!("Layers: {layers}");
    println!("Size: {:.1} MB", image.size as f64 / (1024.0 * 1024.0));
    println!("Digest: {}", image.digest);
    Ok(0)
}
