//! `matchlock image ...`

use crate::args::ImageCommand;
use crate::table;
use anyhow::{bail, Result};
use matchlock_image::{ImageStore, PullOptions, StderrProgress};

/// `matchlock pull IMAGE [--force] [-t NAME]`: progress on stderr, Matchlock's result lines on
/// stdout (`Pulling`, `Tagged`, `Digest`, `Size`).
pub fn pull(image: &str, force: bool, tag: Option<&str>) -> Result<i32> {
    let store = ImageStore::open_default()?;
    let opts = PullOptions {
        force,
        ..PullOptions::from_env()
    };
    println!("Pulling {image}...");
    let info = store.pull(image, &opts, &StderrProgress::new())?;
    if let Some(t) = tag {
        let tagged = store.tag(&info.name, t)?;
        println!("Tagged: {}", tagged.name);
    }
    println!("Digest: {}", info.digest);
    println!("Size: {}", table::mb(info.size));
    Ok(0)
}

/// How `image ls` names a source (Matchlock's words).
fn source(s: &str) -> &str {
    match s {
        "oci" | "docker-save" => "import",
        other => other,
    }
}

/// Runs an image sub-command.
pub fn image(cmd: ImageCommand) -> Result<i32> {
    if let ImageCommand::Warm { name, flags } = &cmd {
        return warm(name, flags);
    }
    let store = ImageStore::open_default()?;
    match cmd {
        ImageCommand::Import { name } => {
            if crate::term::stdin_is_tty() {
                bail!("pipe the image tarball into standard input, e.g. 'matchlock image import {name} < image.tar'");
            }
            eprintln!("Importing {name} from stdin...");
            let info = store.import(&name, std::io::stdin().lock())?;
            println!("Imported: {}", info.name);
            println!("Digest: {}", info.digest);
            println!("Size: {}", table::mb(info.size));
        }
        ImageCommand::Ls { json } => {
            // A build's step images are its cache, not images anyone named.
            let mut entries = store.entries()?;
            entries.retain(|e| !matchlock_build::builder::is_cache_step(&e.info.name));
            if json {
                let rows: Vec<serde_json::Value> = entries
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "tag": e.info.name,
                            "source": source(&e.source),
                            "size": e.info.size,
                            "digest": e.info.digest,
                            "created_at": table::rfc3339(e.stored_at),
                            "image_created": e.info.created,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        e.info.name.clone(),
                        source(&e.source).to_string(),
                        table::mb(e.info.size),
                        table::utc(e.stored_at, true),
                    ]
                })
                .collect();
            table::print(&["TAG", "SOURCE", "SIZE", "CREATED"], &rows);
        }
        ImageCommand::Rm { name } => {
            store.remove(&name)?;
            println!("Removed {name}");
        }
        ImageCommand::Warm { .. } => unreachable!("handled above"),
        ImageCommand::Export {
            name,
            output,
            format,
        } => export(&store, &name, &output, format)?,
        ImageCommand::Gc => {
            // The build cache's step images go first, so what only they used is collected.
            let mut steps = 0;
            for e in store.entries()? {
                if matchlock_build::builder::is_cache_step(&e.info.name)
                    && store.remove(&e.info.name).is_ok()
                {
                    steps += 1;
                }
            }
            if steps > 0 {
                println!("Removed {steps} build cache step images");
            }
            let r = store.gc()?;
            println!(
                "Removed {} unreferenced blobs ({} root file systems, {} temporary files; {} freed)",
                r.blobs,
                r.rootfs,
                r.tmp,
                table::mb(r.bytes)
            );
            if r.pull_in_progress {
                eprintln!("a pull is running: blobs and partial downloads were kept; run 'matchlock image gc' again later");
            }
        }
    }
    Ok(0)
}

/// `image warm`: starts a sandbox of the image and shape (which prepares the template when there
/// is none), reports how it started, and stops it.
fn warm(name: &str, flags: &[String]) -> Result<i32> {
    let exe = std::env::current_exe()?;
    let started = std::time::Instant::now();
    let out = std::process::Command::new(&exe)
        .env("MATCHLOCK_TEMPLATES", "1")
        .args(["run", "-d", "--image", name])
        .args(flags)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("could not start a sandbox of {name} to prepare its template");
    }
    let id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    let store = matchlock_sandbox::Store::open_default();
    let start = store.state(&id).ok().and_then(|s| s.start);
    for step in ["kill", "rm"] {
        let _ = std::process::Command::new(&exe)
            .args([step, &id])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status();
    }
    match start.as_deref() {
        Some("template") => {
            println!(
                "Template of {name} ready ({:.1} s); sandboxes of this shape start from it",
                started.elapsed().as_secs_f64()
            );
            Ok(0)
        }
        Some(other) => bail!("{name} has no template for this shape: it started {other}"),
        None => bail!("sandbox {id} left no state"),
    }
}

/// Writes `name` to `output` (`-`: stdout), through a temporary file so a failure leaves no
/// partial tarball under the name.
pub fn export(
    store: &matchlock_image::ImageStore,
    name: &str,
    output: &std::path::Path,
    format: crate::args::ExportFormatArg,
) -> anyhow::Result<()> {
    let format = match format {
        crate::args::ExportFormatArg::Docker => matchlock_image::ExportFormat::DockerArchive,
        crate::args::ExportFormatArg::Oci => matchlock_image::ExportFormat::Oci,
    };
    if output == std::path::Path::new("-") {
        let out = std::io::BufWriter::new(std::io::stdout().lock());
        store.export(name, format, out)?;
        return Ok(());
    }
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| anyhow::anyhow!("writing in {}: {e}", dir.display()))?;
    store.export(name, format, std::io::BufWriter::new(tmp.as_file()))?;
    tmp.persist(output)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", output.display()))?;
    eprintln!("Wrote {} to {}", name, output.display());
    Ok(())
}
