//! `matchlock image ...`

use crate::args::ImageCommand;
use anyhow::{bail, Result};
use matchlock_image::ImageStore;

fn human(bytes: u64) -> String {
    let mb = bytes as f64 / (1024.0 * 1024.0);
    if mb >= 1024.0 {
        format!("{:.1} GB", mb / 1024.0)
    } else {
        format!("{mb:.1} MB")
    }
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
    }
    Ok(0)
}
