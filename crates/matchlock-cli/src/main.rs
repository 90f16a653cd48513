//! The `matchlock` binary: parses the command line and calls into the library crates.

mod args;
mod diagnose;
mod image;
mod manage;
mod run;
mod term;
mod volume;

use args::{Cli, Command, KernelCommand};
use clap::Parser;

fn main() {
    let cli = Cli::parse();
    let is_run = matches!(cli.command, Command::Run(_) | Command::Exec(_));
    let code = match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("matchlock: {e:#}");
            if is_run {
                run::EXIT_MATCHLOCK_ERROR
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

fn dispatch(cmd: Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Run(a) => run::run(*a),
        Command::Exec(a) => run::exec(a),
        Command::List { running } => manage::list(running),
        Command::Get { id } => manage::get(&id),
        Command::Inspect { id } => manage::inspect(&id),
        Command::Kill { ids, all } => manage::kill(&ids, all),
        Command::Rm { ids } => manage::rm(&ids),
        Command::Prune => manage::prune(),
        Command::Gc => manage::gc(),
        Command::Log { id, follow } => manage::log(&id, follow),
        Command::Pull { image, force } => image::pull(&image, force),
        Command::PortForward { id, ports, address } => run::port_forward(&id, &ports, &address),
        Command::Rpc => Ok(matchlock_rpc::serve_stdio()),
        Command::AllowList { command } => run::allow_list(command),
        Command::Volume { command } => volume::volume(command),
        Command::Image { command } => image::image(command),
        Command::Kernel { command } => kernel(command),
        Command::Diagnose { json } => diagnose::diagnose(json),
        Command::Version => {
            println!(
                "matchlock {} (guest protocol {}, kernel config {})",
                env!("CARGO_PKG_VERSION"),
                matchlock_proto::VERSION,
                matchlock_vmm::kernel::config_hash()
            );
            Ok(0)
        }
        Command::Supervise { id } => Ok(matchlock_sandbox::supervisor::run(
            matchlock_sandbox::Store::open_default(),
            &id,
        )),
    }
}

/// `matchlock kernel build|path`: the build script and config are compiled in, so an installed
/// binary can build its kernel without the source tree.
fn kernel(cmd: KernelCommand) -> anyhow::Result<i32> {
    match cmd {
        KernelCommand::Path => {
            println!("{}", matchlock_vmm::kernel::locate()?.display());
            Ok(0)
        }
        KernelCommand::Build => {
            // A fresh private directory: a predictable name in /tmp could be pre-created by
            // another user to swap the script.
            let dir = tempfile::Builder::new()
                .prefix("matchlock-kernel-")
                .tempdir()?;
            std::fs::write(
                dir.path().join("config"),
                matchlock_vmm::kernel::CONFIG_FRAGMENT,
            )?;
            std::fs::write(
                dir.path().join("build.sh"),
                matchlock_vmm::kernel::BUILD_SCRIPT,
            )?;
            std::fs::create_dir(dir.path().join("patches"))?;
            for (name, patch) in matchlock_vmm::kernel::PATCHES {
                std::fs::write(dir.path().join("patches").join(name), patch)?;
            }
            let status = std::process::Command::new("bash")
                .arg(dir.path().join("build.sh"))
                .env_remove("MATCHLOCK_KERNEL")
                .status();
            match status {
                Ok(s) if s.success() => Ok(0),
                Ok(_) => anyhow::bail!("the kernel build failed; see the messages above"),
                Err(e) => anyhow::bail!("cannot run bash: {e}"),
            }
        }
    }
}
