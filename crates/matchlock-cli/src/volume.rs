//! `matchlock volume ...`: named ext4 volumes. The JSON shapes are the ones the Matchlock SDKs parse.

use crate::args::VolumeCommand;
use anyhow::Result;
use matchlock_sandbox::{volume, Store};

/// Dispatches a volume sub-command.
pub fn volume(cmd: VolumeCommand) -> Result<i32> {
    let store = Store::open_default();
    match cmd {
        VolumeCommand::Create { name, size, json } => {
            // JSON goes to the SDKs, which parse stdout and stderr together: nothing else
            // may be printed.
            let v = volume::create(&name, size)?;
            if json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                println!("Created volume {} ({size} MB)", v.name);
            }
        }
        VolumeCommand::Ls { json } => {
            let vols = volume::list()?;
            if json {
                println!("{}", serde_json::to_string(&vols)?);
            } else {
                let rows: Vec<Vec<String>> =
                    vols.into_iter().map(|v| vec![v.name, v.size]).collect();
                crate::table::print(&["NAME", "SIZE"], &rows);
            }
        }
        VolumeCommand::Rm { name } => {
            volume::remove(&store, &name)?;
            println!("Removed volume {name}");
        }
        VolumeCommand::Cp { src, dest } => {
            let v = volume::copy(&store, &src, &dest)?;
            println!("Copied volume {src} to {}", v.name);
        }
    }
    Ok(0)
}
