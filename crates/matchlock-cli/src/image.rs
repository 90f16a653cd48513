//! `matchlock image ...`

use crate::args::ImageCommand;
use anyhow::{bail, Result};
use matchlock_image::{ImageStore, PullOptions, StderrProgress};

fn human(bytes: u64) -> String {
    let mb = bytes as f64 / (1024.0 * 1024.0);
    if mb >= 1024.0 {
        format!("{:.1} GB", mb / 1024.0)
    } else {
        format!("{mb:.1} MB")
    }
}

/// `matchlock pull IMAGE [--force]`: progress on stderr, the result on stdout.
pub fn pull(image: &str, force: bool) -> Result<i32> {
    let store = ImageStore::open_default()?;
    let opts = PullOptions {
        force,
        ..PullOptions::from_env()
    };
    let info = store.pull(image, &opts, &StderrProgress::new())?;
    println!("{} {} ({})", info.name, info.digest, human(info.size));
    Ok(0)
}

/// Runs an image sub-command.
pub fn image(cmd: ImageCommand) -> Result<i32> {
    let store = ImageStore::open_default()?;
    match cmd {
        ImageCommand::Import { name } => {
            if crate::term::stdin_is_tty() {
                bail!("pipe the image tarball into standard input, e.g. 'matchlock image import {name} < image.tar'");
            }
            eprintln!("importing {name} from standard input...");
            let info = store.import(&name, std::io::stdin().lock())?;
            println!("{} {} ({})", info.name, info.digest, human(info.size));
        }
        ImageCommand::Ls => {
            println!("{:<48} {:<20} {:>10}  CREATED", "TAG", "DIGEST", "SIZE");
            for i in store.list()? {
                let short = i
                    .digest
                    .trim_start_matches("sha256:")
                    .chars()
                    .take(12)
                    .collect::<String>();
                println!(
                    "{:<48} {:<20} {:>10}  {}",
                    i.name,
                    format!("sha256:{short}"),
                    human(i.size),
                    i.created.as_deref().unwrap_or("-")
                );
            }
        }
        ImageCommand::Rm { name } => {
            store.remove(&name)?;
            println!("removed {name}");
        }
        ImageCommand::Gc => {
            let r = store.gc()?;
            println!(
                "removed {} blob(s), {} root file system(s), {} temporary file(s); freed {}",
                r.blobs,
                r.rootfs,
                r.tmp,
                human(r.bytes)
            );
            if r.pull_in_progress {
                eprintln!("a pull is running: blobs and partial downloads were kept; run 'matchlock image gc' again later");
            }
        }
    }
    Ok(0)
}
