//! Command-line surface (clap). Only parsing and validation live here; the work is in the other
//! modules and the library crates.

use clap::{ArgAction, Args, Parser, Subcommand};

/// Run untrusted code in disposable micro-VMs.
#[derive(Parser, Debug)]
#[command(name = "matchlock", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Sub-commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a sandbox from an image and run a command in it.
    Run(Box<RunArgs>),
    /// Run a command in a running sandbox.
    Exec(ExecArgs),
    /// List sandboxes.
    #[command(visible_alias = "ls")]
    List {
        /// Only running sandboxes.
        #[arg(long)]
        running: bool,
    },
    /// Print a sandbox's configuration and state as JSON.
    Get {
        /// Sandbox id (or a unique prefix).
        id: String,
    },
    /// Print everything known about a sandbox as JSON (configuration, state, files).
    #[command(visible_alias = "stat")]
    Inspect {
        /// Sandbox id (or a unique prefix).
        id: String,
    },
    /// Stop running sandboxes.
    Kill {
        /// Sandbox ids (or unique prefixes).
        ids: Vec<String>,
        /// Stop every running sandbox.
        #[arg(long)]
        all: bool,
    },
    /// Remove stopped sandboxes.
    #[command(visible_alias = "remove")]
    Rm {
        /// Sandbox ids (or unique prefixes).
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove every stopped, crashed or failed sandbox.
    Prune,
    /// Reclaim what dead sandboxes left behind (upper disks, sockets, stray QEMU processes).
    Gc,
    /// Print a sandbox's console log.
    Log {
        /// Sandbox id (or a unique prefix).
        id: String,
        /// Keep printing as the log grows, until the sandbox stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// Pull an image from its registry into the local store (or refresh its tag).
    Pull {
        /// Image reference (e.g. `alpine`, `registry.example.com:5000/app:1`, `repo@sha256:...`).
        image: String,
        /// Download every blob again and rebuild the root file system, ignoring the cache.
        #[arg(long)]
        force: bool,
    },
    /// Forward host ports to ports of a running sandbox until interrupted.
    #[command(name = "port-forward")]
    PortForward {
        /// Sandbox id (or a unique prefix).
        id: String,
        /// Mappings `[LOCAL:]REMOTE`.
        #[arg(required = true, value_name = "[LOCAL:]REMOTE")]
        ports: Vec<String>,
        /// Host addresses to listen on.
        #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
        address: Vec<String>,
    },
    /// Change a running sandbox's interception allow-list.
    #[command(name = "allow-list")]
    AllowList {
        /// What to do.
        #[command(subcommand)]
        command: AllowListCommand,
    },
    /// Serve the JSON-RPC protocol of the Matchlock SDKs on standard input and output.
    Rpc,
    /// Manage named ext4 volumes (attach with --disk @NAME:/path).
    Volume {
        /// What to do.
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Manage local images.
    Image {
        /// What to do.
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Build or locate the guest kernel.
    Kernel {
        /// What to do.
        #[command(subcommand)]
        command: KernelCommand,
    },
    /// Check that this machine can run sandboxes and say how to fix what is missing.
    Diagnose {
        /// Print the checks as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the version.
    Version,
    /// Internal: the per-sandbox supervisor process.
    #[command(name = "__supervise", hide = true)]
    Supervise {
        /// Sandbox id.
        id: String,
    },
}

/// `matchlock image ...`
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Import a `docker save` or OCI-layout tarball from standard input.
    Import {
        /// Name to tag it with (e.g. `busybox` or `myapp:1.0`).
        name: String,
    },
    /// List local images.
    #[command(visible_alias = "list")]
    Ls,
    /// Remove a local image.
    #[command(visible_alias = "remove")]
    Rm {
        /// Image name.
        name: String,
    },
    /// Delete blobs and root file systems no image uses, and leftovers of interrupted pulls.
    Gc,
}

/// `run --pull=...`: when to contact the registry.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullArg {
    /// Pull only when the image is not in the local store (the default).
    Missing,
    /// Ask the registry for the tag's current image and pull what changed (`--pull`).
    Always,
    /// Never contact a registry.
    Never,
}

/// `matchlock allow-list ...`
#[derive(Subcommand, Debug)]
pub enum AllowListCommand {
    /// Allow more hosts.
    Add {
        /// Sandbox id (or a unique prefix).
        id: String,
        /// Host patterns, comma-separated or repeated.
        #[arg(required = true, value_delimiter = ',')]
        hosts: Vec<String>,
    },
    /// Stop allowing hosts.
    #[command(visible_alias = "rm")]
    Delete {
        /// Sandbox id (or a unique prefix).
        id: String,
        /// Host patterns, comma-separated or repeated.
        #[arg(required = true, value_delimiter = ',')]
        hosts: Vec<String>,
    },
}

/// `matchlock volume ...`
#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create an empty ext4 volume.
    Create {
        /// Volume name (letters, digits, '.', '_', '-').
        name: String,
        /// Size in MiB.
        #[arg(long, default_value_t = 10240)]
        size: u64,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List volumes.
    #[command(visible_alias = "list")]
    Ls {
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a volume.
    #[command(visible_alias = "remove")]
    Rm {
        /// Volume name.
        name: String,
    },
    /// Copy a volume (sparse, keeping everything in it).
    #[command(visible_alias = "copy")]
    Cp {
        /// Source volume name.
        src: String,
        /// New volume name.
        dest: String,
    },
}

/// `matchlock kernel ...`
#[derive(Subcommand, Debug)]
pub enum KernelCommand {
    /// Build the guest kernel from Debian's linux-source-6.1 (once per machine, cached).
    Build,
    /// Print the path of the guest kernel in use.
    Path,
}

/// Options shared by `run` and `exec` for the process itself.
#[derive(Args, Debug, Clone)]
pub struct ProcessArgs {
    /// Allocate a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Keep standard input open and forward it.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as: uid, uid:gid, name or name:group.
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,
    /// Set an environment variable (KEY=VALUE, or KEY to copy it from here).
    #[arg(short = 'e', long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Read environment variables from a file (KEY=VALUE lines, # comments).
    #[arg(long = "env-file", value_name = "FILE")]
    pub env_file: Vec<std::path::PathBuf>,
}

/// `matchlock run`
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Image to boot; pulled from its registry when it is not in the local store.
    #[arg(long)]
    pub image: String,
    /// When to pull the image: missing (default), always (bare `--pull`: refresh the tag), never.
    #[arg(long, value_enum, value_name = "WHEN", default_value = "missing",
          num_args = 0..=1, require_equals = true, default_missing_value = "always")]
    pub pull: PullArg,
    /// Process options.
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Override the image's ENTRYPOINT ("" clears it).
    #[arg(long, value_name = "CMD")]
    pub entrypoint: Option<String>,
    /// Hostname of the sandbox (default: its id).
    #[arg(long)]
    pub hostname: Option<String>,
    /// CPUs; fractions are enforced with a CPU quota (e.g. 0.5).
    #[arg(long, default_value_t = 1.0)]
    pub cpus: f64,
    /// Memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u64,
    /// Size of the writable disk in MiB.
    #[arg(long = "disk-size", default_value_t = 5120)]
    pub disk_size: u64,
    /// Stop the sandbox after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
    /// Remove the sandbox when the command ends (--rm=false keeps it running and prints its id).
    #[arg(long, default_value_t = true, action = ArgAction::Set, num_args = 0..=1,
          require_equals = true, default_missing_value = "true")]
    pub rm: bool,
    /// Start the sandbox and the command in the background and print the sandbox id.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// How long processes get between SIGTERM and SIGKILL when the sandbox stops (e.g. 5s, 500ms).
    #[arg(
        long = "graceful-shutdown",
        value_name = "DURATION",
        default_value = "0s"
    )]
    pub graceful_shutdown: String,
    /// Give processes all capabilities and no seccomp filter.
    #[arg(long)]
    pub privileged: bool,
    /// Extra /etc/hosts entry NAME:IP.
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// No network interface at all.
    #[arg(long = "no-network")]
    pub no_network: bool,
    /// Interception mode: only HTTP(S) to these hosts leaves (globs: *.example.com, api-*.x.com).
    #[arg(long = "allow-host", value_name = "HOST", value_delimiter = ',')]
    pub allow_host: Vec<String>,
    /// A secret the guest only sees as a placeholder: NAME=VALUE@host1,host2, or NAME@hosts to take
    /// the value from this environment. The real value is sent only to those hosts.
    #[arg(long = "secret", value_name = "NAME[=VALUE]@HOSTS")]
    pub secret: Vec<String>,
    /// Write every interception decision, request and response to this JSON-lines file.
    #[arg(long = "event-log", value_name = "PATH")]
    pub event_log: Option<std::path::PathBuf>,
    /// `run_id` of the events (default: the sandbox id).
    #[arg(long = "run-id", value_name = "ID", default_value = "")]
    pub run_id: String,
    /// `agent_system` of the events (e.g. aider).
    #[arg(long = "agent-system", value_name = "NAME", default_value = "")]
    pub agent_system: String,
    /// Interception mode even without --allow-host (then nothing is allowed).
    #[arg(long = "network-intercept")]
    pub network_intercept: bool,
    /// Let the sandbox reach this private/loopback address (blocked by default).
    #[arg(long = "allow-private-host", value_name = "IP")]
    pub allow_private_host: Vec<String>,
    /// DNS servers the sandbox's queries are forwarded to (IP or IP:PORT; default: the host's).
    #[arg(long = "dns-servers", value_name = "IP[:PORT]", value_delimiter = ',')]
    pub dns_servers: Vec<String>,
    /// MTU of the sandbox's network interface.
    #[arg(long, default_value_t = 1500)]
    pub mtu: u32,
    /// Attach an ext4 image file (or a named volume, @NAME) at a guest path.
    #[arg(long, value_name = "HOST.ext4|@NAME:GUEST_PATH[:ro]")]
    pub disk: Vec<String>,
    /// Mount a host directory or file: HOST:GUEST[:MODE], GUEST relative to --workspace; MODE is
    /// overlay (default: the guest's writes stay in the sandbox), host_fs (live read-write) or ro.
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:MODE]")]
    pub volume: Vec<String>,
    /// Where relative -v guest paths go.
    #[arg(long, value_name = "DIR", default_value = "/workspace")]
    pub workspace: String,
    /// Forward a host port to a guest port while the run is attached ([LOCAL:]REMOTE).
    #[arg(short = 'p', long, value_name = "[LOCAL:]REMOTE")]
    pub publish: Vec<String>,
    /// Host addresses the --publish listeners bind.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub address: Vec<String>,
    /// The command and its arguments (replaces the image CMD).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// `matchlock exec`
#[derive(Args, Debug)]
pub struct ExecArgs {
    /// Sandbox id (or a unique prefix).
    pub id: String,
    /// Process options.
    #[command(flatten)]
    pub process: ProcessArgs,
    /// The command and its arguments.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        required = true,
        value_name = "COMMAND"
    )]
    pub command: Vec<String>,
}

/// Parses `5s`, `500ms`, `2m`, `1h` or a plain number of seconds into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        (s, 1000.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration '{s}'; use e.g. 5s, 500ms or 2m"))?;
    if !(0.0..=86_400_000.0 * 7.0).contains(&(v * mult)) {
        return Err(format!("duration '{s}' is out of range"));
    }
    Ok((v * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("5s"), Ok(5000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("2"), Ok(2000));
        assert_eq!(parse_duration_ms("1m"), Ok(60_000));
        assert!(parse_duration_ms("soon").is_err());
        assert!(parse_duration_ms("-1s").is_err());
    }

    #[test]
    fn pull_flag_forms() {
        let p = |args: &[&str]| Cli::try_parse_from(args);
        let run_pull = |args: &[&str]| match p(args).unwrap().command {
            Command::Run(r) => r.pull,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            run_pull(&["matchlock", "run", "--image", "x", "true"]),
            PullArg::Missing
        );
        // Bare --pull refreshes the tag; it must not swallow the command after it.
        assert_eq!(
            run_pull(&["matchlock", "run", "--pull", "--image", "x", "true"]),
            PullArg::Always
        );
        assert_eq!(
            run_pull(&["matchlock", "run", "--image", "x", "--pull", "true"]),
            PullArg::Always
        );
        assert_eq!(
            run_pull(&["matchlock", "run", "--pull=never", "--image", "x"]),
            PullArg::Never
        );
        assert!(p(&["matchlock", "run", "--pull=sometimes", "--image", "x"]).is_err());
        let Command::Pull { image, force } = p(&["matchlock", "pull", "--force", "alpine"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert_eq!((image.as_str(), force), ("alpine", true));
        assert!(matches!(
            p(&["matchlock", "image", "gc"]).unwrap().command,
            Command::Image {
                command: ImageCommand::Gc
            }
        ));
    }

    #[test]
    fn rm_flag_forms() {
        let p = |args: &[&str]| Cli::try_parse_from(args);
        let Command::Run(r) = p(&["matchlock", "run", "--image", "x", "--", "true"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(r.rm);
        assert_eq!(r.command, vec!["true"]);
        let Command::Run(r) = p(&[
            "matchlock",
            "run",
            "--rm=false",
            "--image",
            "x",
            "echo",
            "-n",
            "hi",
        ])
        .unwrap()
        .command
        else {
            panic!()
        };
        assert!(!r.rm);
        assert_eq!(r.command, vec!["echo", "-n", "hi"]);
        let Command::Run(r) = p(&["matchlock", "run", "-it", "--image", "x"])
            .unwrap()
            .command
        else {
            panic!()
        };
        assert!(r.process.tty && r.process.interactive);
    }
}
