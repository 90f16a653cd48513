//! The `matchlock` binary: parses the command line and calls into the library crates.

mod args;
mod build;
mod diagnose;
mod image;
mod ingress;
mod manage;
mod request;
mod run;
mod ssh;
mod table;
mod term;
mod volume;

use args::{Cli, Command, KernelCommand};
use clap::Parser;

fn main() {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `run` and `exec` exit 125 on any failure of matchlock itself, parse errors included, so a
    // script can tell them from the command's own exit code (Docker's convention).
    let run_like = args::subcommand_name(&argv).is_some_and(|c| c == "run" || c == "exec");
    let cli = match Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            let _ = e.print();
            let code = match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 0,
                _ if run_like => run::EXIT_MATCHLOCK_ERROR,
                _ => 1,
            };
            std::process::exit(code);
        }
    };
    init_logging(cli.log_level.as_deref(), &cli.command);
    // Commands that only print end quietly when their reader goes away (`matchlock inspect ID |
    // head`), as any Unix tool does, instead of panicking in `println!`. `run`, `exec`, the
    // supervisor and the RPC server keep SIGPIPE ignored: they handle a closed pipe themselves.
    if matches!(
        cli.command,
        Command::List { .. }
            | Command::Get { .. }
            | Command::Inspect { .. }
            | Command::Log { .. }
            | Command::Image { .. }
            | Command::Volume { .. }
            | Command::Diagnose { .. }
            | Command::Completion { .. }
            | Command::Version
    ) {
        // SAFETY: setting a signal disposition before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let code = match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            tracing::debug!("failed: {e:?}");
            eprintln!("matchlock: {e:#}");
            if run_like {
                run::EXIT_MATCHLOCK_ERROR
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

/// Sends `tracing` events to standard error: the level comes from `--log-level`, else
/// `RUST_LOG`, else warnings only (the supervisor, whose standard error is its sandbox's
/// `logs/supervisor.log`, records `info` by default). The level reaches supervisors that this
/// process starts through `MATCHLOCK_LOG`, so `--log-level debug run ...` also makes the
/// sandbox's own log verbose.
fn init_logging(flag: Option<&str>, cmd: &Command) {
    use tracing_subscriber::EnvFilter;
    let supervisor = matches!(cmd, Command::Supervise { .. });
    let spec = flag
        .map(str::to_string)
        .or_else(|| {
            std::env::var("MATCHLOCK_LOG")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .or_else(|| std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty()));
    if let Some(s) = &spec {
        // Supervisors started from here inherit it.
        std::env::set_var("MATCHLOCK_LOG", s);
    }
    let default = if supervisor { "info" } else { "warn" };
    let filter = spec
        .as_deref()
        .and_then(|s| EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(supervisor || spec.is_some())
        .with_ansi(!supervisor && term::stderr_is_tty())
        .try_init();
}

fn dispatch(cmd: Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Run(a) => run::run(*a),
        Command::Exec(a) => run::exec(a),
        Command::List { running, json } => manage::list(running, json),
        Command::Get { id } => manage::get(&id),
        Command::Inspect { id } => manage::inspect(&id),
        Command::Kill { ids, all } => manage::kill(&ids, all),
        Command::Pause { id } => manage::pause(&id, false),
        Command::Resume { id } => manage::pause(&id, true),
        Command::Rm { ids, stopped } => manage::rm(&ids, stopped),
        Command::Prune => manage::prune(),
        Command::Gc { id, force_running } => manage::gc(id.as_deref(), force_running),
        Command::Log { id, follow } => manage::log(&id, follow),
        Command::Pull { image, force, tag } => image::pull(&image, force, tag.as_deref()),
        Command::Build(a) => build::build(*a),
        Command::PortForward { id, ports, address } => run::port_forward(&id, &ports, &address),
        Command::Ingress {
            id,
            listen,
            routes,
            no_websockets,
            show_routes,
        } => ingress::ingress(&id, &listen, &routes, no_websockets, show_routes),
        Command::Ssh {
            id,
            user,
            serve,
            listen,
            args,
        } => ssh::ssh(&id, &user, serve, &listen, &args),
        Command::Rpc => Ok(matchlock_rpc::serve_stdio()),
        Command::AllowList { command } => run::allow_list(command),
        Command::Volume { command } => volume::volume(command),
        Command::Image { command } => image::image(command),
        Command::Kernel { command } => kernel(command),
        Command::Diagnose { json } => diagnose::diagnose(json),
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "matchlock", &mut std::io::stdout());
            Ok(0)
        }
        Command::Version => {
            println!(
                "matchlock {} (commit: {}, built: {}, guest protocol {}, kernel config {})",
                env!("CARGO_PKG_VERSION"),
                env!("MATCHLOCK_GIT_COMMIT"),
                env!("MATCHLOCK_BUILD_DATE"),
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
