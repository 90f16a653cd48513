//! Command-line surface (clap). Only parsing and validation live here; the work is in the other
//! modules and the library crates.

use clap::{ArgAction, Args, Parser, Subcommand};
use matchlock_api::defaults;

/// Run untrusted code in disposable micro-VMs.
#[derive(Parser, Debug)]
#[command(name = "matchlock", version, about, propagate_version = true)]
pub struct Cli {
    /// What to log on standard error: error, warn (default), info, debug, trace, or a
    /// `RUST_LOG`-style filter; sandboxes started by this command log at that level too.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The sub-command named on a command line (`run`, `exec`, ...), found without parsing it, so
/// that a command line clap refuses still gets the exit code of its command.
pub fn subcommand_name(argv: &[std::ffi::OsString]) -> Option<String> {
    let mut it = argv.iter().skip(1).map(|a| a.to_string_lossy());
    while let Some(a) = it.next() {
        if a == "--log-level" {
            it.next();
        } else if !a.starts_with('-') {
            return Some(a.into_owned());
        }
    }
    None
}

const RUN_EXAMPLES: &str = "Examples:
  matchlock run --image alpine:latest -- echo hello
  matchlock run --image alpine:latest -it sh                 # interactive terminal
  echo data | matchlock run -i --image busybox -- wc -c      # standard input
  matchlock run --image alpine:latest --rm=false -- true     # keep it running: matchlock exec ID ...
  matchlock run --image nginx:latest -d -p 8080:80           # detached, with a port forward

  # Non-secret environment variables
  matchlock run --image alpine:latest -e FOO=bar -- sh -c 'echo $FOO'
  matchlock run --image alpine:latest --env-file .env -- printenv

  # Host files: overlay (default, changes stay in the sandbox), host_fs (live) or ro
  matchlock run -v ./src:src -v ./out:/workspace/out:host_fs --image busybox -- ls /workspace

  # Only HTTPS to one host, with a secret the guest never sees (it gets a placeholder)
  export ANTHROPIC_API_KEY=sk-xxx
  matchlock run --image python:3.12-alpine --allow-host api.anthropic.com \\
    --secret ANTHROPIC_API_KEY@api.anthropic.com -- python call_api.py

  # Nothing allowed at first; open hosts later with 'matchlock allow-list add ID HOST'
  matchlock run --image alpine:latest --deny-by-default --rm=false -- true";

const EXEC_EXAMPLES: &str = "Examples:
  matchlock exec vm-1a2b3c4d -- echo hello
  matchlock exec -it vm-1a2b3c4d sh
  matchlock exec -w /workspace -u 1000 vm-1a2b3c4d -- make test
  tar c src | matchlock exec -i vm-1a2b3c4d -- tar x -C /tmp";

/// Sub-commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a sandbox from an image and run a command in it.
    #[command(after_help = RUN_EXAMPLES)]
    Run(Box<RunArgs>),
    /// Run a command in a running sandbox.
    #[command(after_help = EXEC_EXAMPLES)]
    Exec(ExecArgs),
    /// List sandboxes.
    #[command(visible_alias = "ls")]
    List {
        /// Only running sandboxes.
        #[arg(long)]
        running: bool,
        /// Print a JSON array instead of the table.
        #[arg(long)]
        json: bool,
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
    #[command(after_help = "Examples:\n  matchlock kill vm-1a2b3c4d\n  matchlock kill --all")]
    Kill {
        /// Sandbox ids (or unique prefixes).
        ids: Vec<String>,
        /// Stop every running sandbox.
        #[arg(long)]
        all: bool,
    },
    /// Save a running sandbox's memory to disk and release it; `resume` continues it.
    #[command(
        after_help = "Processes, files and connections in the guest are kept; host memory \
        is released.\nNot for sandboxes with workspace mounts (-v).\n\nExample:\n  matchlock pause vm-1a2b3c4d"
    )]
    Pause {
        /// Sandbox id (or a unique prefix).
        id: String,
    },
    /// Continue a paused sandbox.
    Resume {
        /// Sandbox id (or a unique prefix).
        id: String,
    },
    /// Remove stopped sandboxes.
    #[command(visible_alias = "remove")]
    Rm {
        /// Sandbox ids (or unique prefixes).
        ids: Vec<String>,
        /// Remove every sandbox that is not running.
        #[arg(long)]
        stopped: bool,
    },
    /// Remove every stopped, crashed or failed sandbox.
    Prune,
    /// Reclaim what dead sandboxes left behind (upper disks, sockets, stray QEMU processes).
    Gc {
        /// Only this sandbox (id or unique prefix).
        id: Option<String>,
        /// Also reclaim sandboxes whose supervisor is still running (stops them first).
        #[arg(long = "force-running")]
        force_running: bool,
    },
    /// Print a sandbox's console log.
    Log {
        /// Sandbox id (or a unique prefix).
        id: String,
        /// Keep printing as the log grows, until the sandbox stops.
        #[arg(short, long)]
        follow: bool,
    },
    /// Pull an image from its registry into the local store (or refresh its tag).
    #[command(after_help = "Examples:
  matchlock pull alpine:latest
  matchlock pull -t myapp:latest alpine:latest      # also tag it locally
  matchlock pull --force alpine:latest              # download and convert again
  MATCHLOCK_INSECURE_REGISTRIES=reg.lan:5000 matchlock pull reg.lan:5000/app:1")]
    Pull {
        /// Image reference (e.g. `alpine`, `registry.example.com:5000/app:1`, `repo@sha256:...`).
        image: String,
        /// Download every blob again and rebuild the root file system, ignoring the cache.
        #[arg(long)]
        force: bool,
        /// Also store the image under this local name.
        #[arg(short = 't', long, value_name = "NAME")]
        tag: Option<String>,
    },
    /// Build an image from a Dockerfile; each RUN runs in its own sandbox.
    #[command(after_help = BUILD_EXAMPLES)]
    Build(Box<BuildArgs>),
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
    /// Serve an HTTP gateway (HTTP/1.1 and h2) to web servers in a running sandbox, routed by
    /// path prefix, until interrupted.
    #[command(
        after_help = "Routes live in /etc/matchlock/ingress-routes in the sandbox (one \
'PREFIX :PORT [strip]' a line); --route replaces them, and a program in the sandbox may write \
the file itself. The longest matching prefix wins.

Examples:
  matchlock ingress ID --route /=8000
  matchlock ingress ID --listen 127.0.0.1:8080 --route /=3000 --route /api=8000,strip
  matchlock ingress ID --routes"
    )]
    Ingress {
        /// Sandbox id (or a unique prefix).
        id: String,
        /// Host address and port to listen on (port 0 picks a free one).
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:0")]
        listen: String,
        /// Route `PREFIX=PORT[,strip]`: paths under PREFIX go to PORT on the sandbox's loopback
        /// (`strip` removes the prefix first). Replaces the sandbox's routes.
        #[arg(long = "route", value_name = "PREFIX=PORT[,strip]")]
        routes: Vec<String>,
        /// Refuse WebSocket upgrades (403).
        #[arg(long)]
        no_websockets: bool,
        /// Print the sandbox's routes and exit.
        #[arg(long = "routes", conflicts_with_all = ["routes", "listen", "no_websockets"])]
        show_routes: bool,
    },
    /// Open an SSH session into a running sandbox (OpenSSH's `ssh`, through a host-side SSH
    /// server: the image needs no sshd), or serve SSH for other tools with --serve.
    #[command(after_help = "Examples:
  matchlock ssh ID                       # a shell on a terminal
  matchlock ssh ID -- uname -a           # one command; its exit code is ssh's
  matchlock ssh ID -- -L 8080:localhost:80 -N   # ssh options after --, then no command
  matchlock ssh ID --serve               # prints a ready ssh command; scp/sftp/rsync use its options")]
    Ssh {
        /// Sandbox id (or a unique prefix).
        id: String,
        /// The guest user to log in as.
        #[arg(long, short = 'u', default_value = "root")]
        user: String,
        /// Serve until interrupted and print the `ssh` command line instead of running ssh.
        #[arg(long)]
        serve: bool,
        /// Host address and port the SSH server listens on (port 0 picks a free one).
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:0")]
        listen: String,
        /// `ssh` options and the command to run (after `--`).
        #[arg(last = true, value_name = "SSH ARGS")]
        args: Vec<String>,
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
    #[command(after_help = "Examples:
  matchlock volume create data --size 1024
  matchlock run --disk @data:/data --image busybox -- sh -c 'echo kept > /data/f'
  matchlock run --disk @data:/var/lib/postgresql/data:uid=70,gid=70 --image postgres:16-alpine
  matchlock volume cp data data-backup
  matchlock volume ls --json
  matchlock volume rm data-backup")]
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
    /// Print a shell completion script (e.g. `matchlock completion bash > /etc/bash_completion.d/matchlock`).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
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
    Ls {
        /// Print a JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a local image.
    #[command(visible_alias = "remove")]
    Rm {
        /// Image name.
        name: String,
    },
    /// Delete blobs and root file systems no image uses, leftovers of interrupted pulls, and
    /// `matchlock build`'s step cache (named images keep everything they use).
    Gc,
    /// Write an image to a tarball that `docker load` or skopeo reads.
    Export {
        /// Image name.
        name: String,
        /// Where to write it (`-`: standard output).
        #[arg(short = 'o', long = "output", value_name = "FILE")]
        output: std::path::PathBuf,
        /// `docker` (docker save's format) or `oci` (an OCI image layout).
        #[arg(long, value_enum, default_value = "docker")]
        format: ExportFormatArg,
    },
    /// Prepare the image's template snapshot now, so the next `run` starts from it. The flags
    /// that shape the VM (`--cpus`, `--memory`, `--disk-size`, `--no-network`, `--kernel`) pick the
    /// template, as they do for `run`.
    Warm {
        /// Image name.
        name: String,
        /// `run` flags giving the VM's shape, e.g. `--memory 1024 --cpus 2`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "RUN FLAGS"
        )]
        flags: Vec<String>,
    },
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
        #[arg(long, default_value_t = defaults::VOLUME_SIZE_MB)]
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
    #[arg(long, default_value_t = defaults::CPUS)]
    pub cpus: f64,
    /// Memory in MiB.
    #[arg(long, default_value_t = defaults::MEMORY_MB)]
    pub memory: u64,
    /// Size of the writable disk in MiB.
    #[arg(long = "disk-size", default_value_t = defaults::DISK_SIZE_MB)]
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
    /// Guest kernel to boot instead of matchlock's own: a `vmlinux` path or `file://` URL.
    #[arg(long, value_name = "PATH|file://PATH")]
    pub kernel: Option<String>,
    /// How long processes get between SIGTERM and SIGKILL when the sandbox stops (e.g. 5s, 500ms).
    #[arg(
        long = "graceful-shutdown",
        value_name = "DURATION",
        default_value = "0s"
    )]
    pub graceful_shutdown: String,
    /// Pause the sandbox after this long without an exec, file transfer or forwarded connection
    /// from the host (e.g. 10m, 30s); the next one resumes it. Not with -v mounts.
    #[arg(long = "idle-pause", value_name = "DURATION")]
    pub idle_pause: Option<String>,
    /// Give processes all capabilities and no seccomp filter.
    #[arg(long)]
    pub privileged: bool,
    /// Boot the VM cold instead of starting it from the image's template snapshot.
    #[arg(long = "no-snapshot")]
    pub no_snapshot: bool,
    /// Extra /etc/hosts entry NAME:IP.
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// No network interface at all.
    #[arg(long = "no-network")]
    pub no_network: bool,
    /// Interception mode: only HTTP(S) to these hosts leaves (globs: *.example.com, api-*.x.com).
    #[arg(long = "allow-host", value_name = "HOST", value_delimiter = ',')]
    pub allow_host: Vec<String>,
    /// A secret the guest only sees as a placeholder: NAME@hosts takes the value from a
    /// --secret-file or this environment; NAME=VALUE@host1,host2 gives it inline (where any local
    /// user can read it with ps). The real value is sent only to those hosts, over HTTPS.
    #[arg(long = "secret", value_name = "NAME[=VALUE]@HOSTS")]
    pub secret: Vec<String>,
    /// Values for --secret NAME@HOSTS from a file of NAME=VALUE lines (# comments), so they
    /// appear in no process's arguments or environment.
    #[arg(long = "secret-file", value_name = "PATH")]
    pub secret_file: Vec<std::path::PathBuf>,
    /// Also inject this --secret into plain HTTP requests, where it travels in clear text
    /// (refused by default: only HTTPS carries secrets).
    #[arg(long = "secret-over-http", value_name = "NAME")]
    pub secret_over_http: Vec<String>,
    /// Write every interception decision, request and response to this JSON-lines file.
    #[arg(long = "event-log", value_name = "PATH")]
    pub event_log: Option<std::path::PathBuf>,
    /// `run_id` of the events (default: the sandbox id).
    #[arg(long = "run-id", value_name = "ID", default_value = "")]
    pub run_id: String,
    /// `agent_system` of the events (e.g. aider).
    #[arg(long = "agent-system", value_name = "NAME", default_value = "")]
    pub agent_system: String,
    /// Interception mode even without --allow-host (every host is allowed, through the proxy:
    /// hooks, secrets, the private-range block and the event log apply).
    #[arg(long = "network-intercept")]
    pub network_intercept: bool,
    /// Interception with nothing allowed until --allow-host or 'matchlock allow-list add'
    /// names a host (without it, an empty allow-list allows every host).
    #[arg(long = "deny-by-default")]
    pub deny_by_default: bool,
    /// Refuse WebSocket upgrades through the interception proxy (403).
    #[arg(long = "disable-websockets")]
    pub disable_websockets: bool,
    /// Send matching model calls to a local backend instead (local_model_router): the model
    /// name is rewritten in the request, the source host's secret is not sent, and streaming is
    /// kept. Repeatable; @HOST:PORT overrides --local-model-backend for that route.
    #[arg(
        long = "local-model-route",
        value_name = "SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL[@HOST:PORT]"
    )]
    pub local_model_route: Vec<String>,
    /// Where --local-model-route sends calls (default 127.0.0.1:11434, Ollama). Reached by
    /// matchlock on the guest's behalf; the guest itself still cannot reach it.
    #[arg(long = "local-model-backend", value_name = "HOST:PORT")]
    pub local_model_backend: Option<String>,
    /// Append one JSON line per model call (provider, model, tokens, cost, latency) to this file
    /// (usage_logger).
    #[arg(long = "usage-log-path", value_name = "PATH")]
    pub usage_log_path: Option<std::path::PathBuf>,
    /// Prices (USD per million tokens, by model) that replace the shipped table's, for calls
    /// whose provider reports no cost: {"MODEL": {"input": X, "output": Y, "cached_input": Z}}.
    #[arg(long = "price-file", value_name = "PATH")]
    pub price_file: Option<std::path::PathBuf>,
    /// Refuse every request with 429 once the spend in --usage-log-path reaches this many USD
    /// (budget_gate); earlier runs' spend in the same log counts.
    #[arg(long = "budget-limit-usd", value_name = "USD")]
    pub budget_limit_usd: Option<f64>,
    /// Network plugins from a JSON file: {"network": {"plugins": [{"type", "enabled",
    /// "config"}]}}, as RPC create takes them.
    #[arg(long = "plugins-file", value_name = "PATH")]
    pub plugins_file: Option<std::path::PathBuf>,
    /// Let the sandbox reach this private/loopback address (blocked by default).
    #[arg(long = "allow-private-host", value_name = "IP")]
    pub allow_private_host: Vec<String>,
    /// DNS servers the sandbox's queries are forwarded to (IP or IP:PORT; default: the host's).
    #[arg(long = "dns-servers", value_name = "IP[:PORT]", value_delimiter = ',')]
    pub dns_servers: Vec<String>,
    /// How the guest's DNS is answered: trusted (the host's resolvers only, whichever server the
    /// guest asks; the default), synthetic (no DNS leaves the host: made-up addresses the host
    /// maps back to names and resolves itself), open (DNS queries to the server the guest names).
    #[arg(long = "dns-mode", value_name = "MODE")]
    pub dns_mode: Option<matchlock_api::config::DnsMode>,
    /// Follow HTTP redirects on the host, within the allow-list (each hop checked as the guest's
    /// own request would be; never from HTTPS to HTTP): the guest gets the final answer.
    #[arg(long = "follow-redirects")]
    pub follow_redirects: bool,
    /// Let the sandbox's ssh/git reach this SSH server through the host, which checks its key
    /// and logs in with the host's credentials (never in the sandbox): HOST[:PORT], repeatable.
    #[arg(long = "ssh-allow", value_name = "HOST[:PORT]")]
    pub ssh_allow: Vec<String>,
    /// known_hosts file the SSH servers' keys are checked against (default ~/.ssh/known_hosts).
    #[arg(long = "ssh-known-hosts", value_name = "FILE")]
    pub ssh_known_hosts: Option<std::path::PathBuf>,
    /// Log in to SSH servers with this (unencrypted) key file, instead of the ssh-agent.
    #[arg(long = "ssh-key", value_name = "FILE")]
    pub ssh_key: Option<std::path::PathBuf>,
    /// Log in to SSH servers through the ssh-agent at this socket (default $SSH_AUTH_SOCK).
    #[arg(long = "ssh-agent", value_name = "SOCKET")]
    pub ssh_agent: Option<std::path::PathBuf>,
    /// SSH command rule, allow:PATTERN or deny:PATTERN, first match wins, repeatable; with rules,
    /// unmatched commands are refused (e.g. "allow:git-upload-pack 'org/*.git'").
    #[arg(long = "ssh-exec", value_name = "RULE")]
    pub ssh_exec: Vec<String>,
    /// Accept SSH servers that known_hosts does not name (changed or revoked keys never are).
    #[arg(long = "ssh-allow-unknown-host-keys")]
    pub ssh_allow_unknown_host_keys: bool,
    /// MTU of the sandbox's network interface.
    #[arg(long, default_value_t = defaults::MTU as u32)]
    pub mtu: u32,
    /// Attach an ext4 image file (or a named volume, @NAME) at a guest path.
    #[arg(long, value_name = "HOST.ext4|@NAME:GUEST_PATH[:ro]")]
    pub disk: Vec<String>,
    /// Mount a host directory or file: HOST:GUEST[:MODE], GUEST relative to --workspace; MODE is
    /// overlay (default: the guest's writes stay in the sandbox), host_fs (live read-write) or ro.
    #[arg(short = 'v', long = "volume", value_name = "HOST:GUEST[:MODE]")]
    pub volume: Vec<String>,
    /// Where relative -v guest paths go.
    #[arg(long, value_name = "DIR", default_value = defaults::WORKSPACE)]
    pub workspace: String,
    /// Forward a host port to a guest port while the run is attached ([LOCAL:]REMOTE).
    #[arg(short = 'p', long, value_name = "[LOCAL:]REMOTE")]
    pub publish: Vec<String>,
    /// Host addresses the --publish listeners bind.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub address: Vec<String>,
    /// The command and its arguments (replaces the image CMD). Flags before it belong to
    /// matchlock; everything from the command on (or after `--`) is the command's.
    #[arg(trailing_var_arg = true, value_name = "COMMAND")]
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
    /// The command and its arguments. Flags before it belong to matchlock; everything from the
    /// command on (or after `--`) is the command's.
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
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
        let Command::Pull { image, force, tag } =
            p(&["matchlock", "pull", "--force", "-t", "mine:1", "alpine"])
                .unwrap()
                .command
        else {
            panic!()
        };
        assert_eq!((image.as_str(), force), ("alpine", true));
        assert_eq!(tag.as_deref(), Some("mine:1"));
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

    /// Flags before the command are matchlock's: a misspelt one is an error naming it (with the
    /// closest flag), never the command; from the command on, everything is the command's.
    #[test]
    fn flags_before_the_command_are_ours() {
        let p = |args: &[&str]| Cli::try_parse_from(args);
        let e = p(&[
            "matchlock",
            "run",
            "--image",
            "x",
            "--alow-host",
            "a",
            "--",
            "echo",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--alow-host") && e.contains("--allow-host"),
            "{e}"
        );
        let e = p(&["matchlock", "exec", "--tyy", "vm-1", "sh"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tyy") && e.contains("--tty"), "{e}");
        let command = |args: &[&str]| match p(args).unwrap().command {
            Command::Run(r) => r.command,
            Command::Exec(e) => e.command,
            other => panic!("{other:?}"),
        };
        // `--` is optional; the command keeps its own flags, even ones matchlock also has.
        assert_eq!(
            command(&[
                "matchlock",
                "run",
                "--image",
                "x",
                "ls",
                "-la",
                "--image",
                "y"
            ]),
            ["ls", "-la", "--image", "y"]
        );
        assert_eq!(
            command(&["matchlock", "run", "--image", "x", "--", "--weird"]),
            ["--weird"]
        );
        assert_eq!(
            command(&["matchlock", "exec", "-it", "vm-1", "sh", "-c", "echo -n"]),
            ["sh", "-c", "echo -n"]
        );
        assert_eq!(
            command(&["matchlock", "exec", "vm-1", "-i", "--", "cat", "-"]),
            ["cat", "-"]
        );
        assert!(p(&["matchlock", "exec", "vm-1"]).is_err());
    }

    #[test]
    fn subcommand_names_are_found_without_parsing() {
        let name = |args: &[&str]| {
            let v: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
            subcommand_name(&v)
        };
        assert_eq!(
            name(&["matchlock", "run", "--bogus"]).as_deref(),
            Some("run")
        );
        assert_eq!(
            name(&["matchlock", "--log-level", "debug", "exec", "x"]).as_deref(),
            Some("exec")
        );
        assert_eq!(name(&["matchlock", "--help"]), None);
    }
}

const BUILD_EXAMPLES: &str = "Examples:
  matchlock build -t myapp:latest .
  matchlock build -f docker/Dockerfile --build-arg VERSION=1.2 --target runtime -t app:1 .
  matchlock build --no-network -t offline:1 .            # RUN steps get no network
  matchlock build --allow-host pypi.org --allow-host files.pythonhosted.org -t py:1 .";

/// The tarball `image export` and `build --output` write.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormatArg {
    /// `docker save`'s format: `docker load`, `skopeo copy docker-archive:…`.
    Docker,
    /// An OCI image layout: `skopeo copy oci-archive:…`, `podman load`.
    Oci,
}

/// `matchlock build`.
#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The build context: the directory COPY and ADD read from.
    pub context: std::path::PathBuf,
    /// The Dockerfile (default: CONTEXT/Dockerfile; `-` reads it from standard input).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub file: Option<std::path::PathBuf>,
    /// Name the image (repeatable).
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    pub tags: Vec<String>,
    /// Set an ARG (repeatable): `NAME=VALUE`, or `NAME` to take it from the environment.
    #[arg(long = "build-arg", value_name = "NAME[=VALUE]")]
    pub build_args: Vec<String>,
    /// Build this stage (default: the last).
    #[arg(long)]
    pub target: Option<String>,
    /// Run every step again, ignoring stored ones.
    #[arg(long = "no-cache")]
    pub no_cache: bool,
    /// Pull base images even when they are stored.
    #[arg(long)]
    pub pull: bool,
    /// RUN steps get no network at all.
    #[arg(long = "no-network")]
    pub no_network: bool,
    /// Let RUN steps reach only these hosts (repeatable; globs allowed). Default: open
    /// networking with private ranges blocked.
    #[arg(long = "allow-host", value_name = "HOST")]
    pub allow_host: Vec<String>,
    /// Also inject this --secret into plain HTTP requests (clear text; as `run`).
    #[arg(long = "secret-over-http", value_name = "NAME")]
    pub secret_over_http: Vec<String>,
    /// Extra /etc/hosts entry NAME:IP in RUN sandboxes.
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// Let RUN steps reach this private/loopback address (blocked by default).
    #[arg(long = "allow-private-host", value_name = "IP")]
    pub allow_private_host: Vec<String>,
    /// MTU of each RUN sandbox's network interface (as `run --mtu`).
    #[arg(long, default_value_t = defaults::MTU as u32)]
    pub mtu: u32,
    /// A secret for RUN steps, as `run --secret` takes it (repeatable).
    #[arg(long, value_name = "NAME=VALUE@HOST[,HOST...]")]
    pub secret: Vec<String>,
    /// CPUs of each RUN sandbox (alias: --build-cpus).
    #[arg(long, alias = "build-cpus", default_value_t = defaults::CPUS)]
    pub cpus: f64,
    /// Memory of each RUN sandbox in MiB (alias: --build-memory).
    #[arg(long, alias = "build-memory", default_value_t = defaults::MEMORY_MB)]
    pub memory: u64,
    /// Also write the image to this tarball.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
    /// The tarball's format for --output.
    #[arg(long = "output-format", value_enum, default_value = "docker")]
    pub output_format: ExportFormatArg,
    /// Writable disk of each RUN sandbox in MiB (alias: --build-disk).
    #[arg(long = "disk-size", alias = "build-disk", default_value_t = defaults::DISK_SIZE_MB)]
    pub disk_size: u64,
    /// After the build, drop least-recently-used cached steps until the step cache takes at
    /// most this many MiB on disk (this build's steps are kept). Upstream's flag and default.
    #[arg(long = "build-cache-size", value_name = "MIB", default_value_t = 10240)]
    pub build_cache_size: u64,
}
