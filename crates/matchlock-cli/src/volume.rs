//! `matchlock volume ...`: named ext4 volumes. The JSON shapes are the ones the Matchlock SDKs parse.

use crate::args::VolumeCommand;
use anyhow::Result;
use matchlock_sandbox::{volume, Store};

/// Dispatches a volume sub-command.
pub fn volume(cmd: VolumeCommand) -> Result<i32> {
    let store = Store::open_default();
    match cmd {
        VolumeCommand::Create { name, size, json } => {
            let v = volume::create(&name, size)?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!(
                    "created volume {} ({}) at {}",
                    v.name,
                    v.size,
                    v.path.display()
                );
            }
        }
        VolumeCommand::Ls { json } => {
            let vols = volume::list()?;
            if json {
                println!("{}", serde_json::to_string(&vols)?);
            } else {
                println!("{:<24} {:>12}  PATH", "NAME", "SIZE");
                for v in vols {
                    println!("{:<24} {:>12}  {}", v.name, v.size, v.path.display());
                }
            }
        }
        VolumeCommand::Rm { name } => volume::remove(&store, &name)?,
        VolumeCommand::Cp { src, dest } => {
            let v = volume::copy(&store, &src, &dest)?;
            println!("copied volume {src} to {} at {}", v.name, v.path.display());
        }
    }
    Ok(0)
}
