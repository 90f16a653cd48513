//! `matchlock run` and `matchlock exec`: start sandboxes and attach to processes in them.

use crate::args::{ExecArgs, RunArgs};
use crate::term;
use anyhow::{anyhow, bail, Result};
use matchlock_proto::{read_msg, write_msg, Msg};
use matchlock_sandbox::control::ExecSpec;
use matchlock_sandbox::forward::{Forwarder, PortMap};
use matchlock_sandbox::{Client, Store};
use std::io::Write;
use std::time::Instant;
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

/// Exit code for matchlock's own failures in `run`/`exec` (as Docker does), so they cannot be
/// mistaken for the command's exit code.
pub const EXIT_MATCHLOCK_ERROR: i32 = 125;
/// Exit code when `--timeout` stopped the sandbox (as `timeout(1)` does).
pub const EXIT_TIMEOUT: i32 = 124;

/// `matchlock run`: flags -> request -> image -> plan -> sandbox, then attach to its command.
pub fn run(args: RunArgs) -> Result<i32> {
    let req = crate::request::from_flags(&args)?;
    let images = matchlock_image::ImageStore::open_default()?;
    let policy = match args.pull {
        crate::args::PullArg::Missing => matchlock_image::PullPolicy::Missing,
        crate::args::PullArg::Always => matchlock_image::PullPolicy::Always,
        crate::args::PullArg::Never => matchlock_image::PullPolicy::Never,
    };
    let image = images.ensure(
        &req.image,
        policy,
        &matchlock_image::PullOptions::from_env(),
        &matchlock_image::StderrProgress::new(),
    )?;
    tracing::debug!(image = %image.name, digest = %image.digest, "image resolved");
    let plan = matchlock_sandbox::plan(req, &image, &Store::open_default())?;
    let argv = plan.command.clone().unwrap_or_default();
    // Fail on a missing kernel, QEMU or agent before anything is created.
    let kernel_path = match &plan.config.kernel {
        Some(k) => k.clone(),
        None => matchlock_vmm::kernel::locate()?,
    };
    let qemu = matchlock_vmm::qemu::locate_qemu()?;
    let agent = matchlock_vmm::agent::locate()?;
    // The first start with a kernel and QEMU test-boots KVM; say what the wait is.
    if let Ok(initramfs) = matchlock_vmm::initramfs::cached(&agent) {
        if matchlock_vmm::accel::will_probe(&qemu, &kernel_path, &initramfs) {
            eprintln!(
                "matchlock: checking once whether KVM can run sandboxes here (a test boot)..."
            );
        }
    }
    let tty = args.process.tty;
    let spec = ExecSpec {
        argv,
        env: Vec::new(),
        cwd: None,
        user: None,
        tty: tty.then(term::size),
        stdin: args.process.interactive,
        log: true,
    };
    let (config, secret_values) = (plan.config, plan.secrets);
    block_on(async move {
        let started = Instant::now();
        let store = Store::open_default();
        let store2 = store.clone();
        // Ctrl-C (or SIGTERM, or the terminal closing) during boot must not leave a sandbox
        // behind: remember it and stop the sandbox once it is up.
        use tokio::signal::unix::{signal, SignalKind};
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sighup = signal(SignalKind::hangup())?;
        let mut boot = tokio::task::spawn_blocking(move || {
            matchlock_sandbox::start_with_secrets(&store2, config, &secret_values)
        });
        let (id, interrupted) = tokio::select! {
            r = &mut boot => (r??, false),
            _ = sigint.recv() => (boot.await??, true),
            _ = sigterm.recv() => (boot.await??, true),
            _ = sighup.recv() => (boot.await??, true),
        };
        drop((sigint, sigterm, sighup));
        tracing::info!(
            id,
            ms = started.elapsed().as_millis() as u64,
            "sandbox started"
        );
        let timed_out = || {
            args.timeout
                .is_some_and(|t| started.elapsed().as_secs() >= t)
        };
        let attached = async {
            let client = Client::for_sandbox(&store, &id)?;
            if interrupted {
                let _ = client.stop(Some(0)).await;
                if !args.rm {
                    let _ = store.remove(&id);
                }
                return Ok(Some(130));
            }
            // Matchlock's wording, on stderr (scripts match it).
            for f in store.state(&id).map(|s| s.forwards).unwrap_or_default() {
                eprintln!(
                    "Forwarding {}:{} -> sandbox:{}",
                    f.address, f.local_port, f.remote_port
                );
            }
            if args.detach {
                client.launch(spec, 0).await?;
                println!("{id}");
                return Ok(Some(0));
            }
            if !args.rm {
                eprintln!("Sandbox {id} is running");
                eprintln!("  Connect: matchlock exec -it {id} sh");
                eprintln!("  Stop:    matchlock kill {id}");
            }
            let stream = client.exec(spec).await?;
            // The CLI's deadline counts from before the boot, so it fires before the
            // supervisor's (which stops the sandbox even if this process is gone) and can
            // report the timeout.
            let deadline = args.timeout.map(|t| {
                tokio::time::Instant::from_std(started) + std::time::Duration::from_secs(t)
            });
            let code = attach(stream, tty, args.process.interactive, deadline).await;
            if args.rm {
                let _ = client.stop(None).await;
            }
            code
        };
        match attached.await {
            Ok(Some(EXIT_TIMEOUT)) | Err(_) if !args.detach && timed_out() => {
                // Also when the boot itself outlasted --timeout on a loaded machine and the
                // supervisor was already stopping the sandbox (or stopped it mid-attach): that
                // is the timeout, not a failure of matchlock.
                eprintln!(
                    "matchlock: timed out after {}s; the sandbox was stopped",
                    args.timeout.unwrap_or(0)
                );
                Ok(EXIT_TIMEOUT)
            }
            Ok(Some(c)) => Ok(c),
            Ok(None) => {
                bail!("the sandbox stopped before the command finished; see 'matchlock log {id}'")
            }
            Err(e) => Err(e),
        }
    })
}

/// Runs `fut` on a fresh runtime and returns as soon as it completes. The runtime is then
/// abandoned rather than dropped: dropping waits for blocking tasks, and the reader of our
/// standard input (tokio reads it on a blocking thread) stays blocked until the user types
/// something or closes it, so an `-i`/`-it` session would outlive its command.
pub fn block_on<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Runtime::new()?;
    let out = rt.block_on(fut);
    rt.shutdown_background();
    out
}

/// Guest-supplied text with control characters (terminal escapes) replaced, for error lines.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(2000)
        .collect()
}

/// `matchlock exec`.
pub fn exec(args: ExecArgs) -> Result<i32> {
    let (workdir, user) = crate::request::process(&args.process)?;
    let env = crate::request::env(&args.process)?;
    let store = Store::open_default();
    let id = store.resolve_id(&args.id)?;
    let client = Client::for_sandbox(&store, &id)?;
    let tty = args.process.tty;
    let spec = ExecSpec {
        argv: args.command,
        env,
        cwd: workdir.map(|w| w.as_str().to_string()),
        user: user.map(|u| u.as_str().to_string()),
        tty: tty.then(term::size),
        stdin: args.process.interactive,
        ..Default::default()
    };
    block_on(async move {
        let stream = client.exec(spec).await?;
        match attach(stream, tty, args.process.interactive, None).await? {
            Some(c) => Ok(c),
            None => bail!("sandbox {id} stopped before the command finished"),
        }
    })
}

/// Relays a process's I/O between this terminal and its exec stream. Returns its exit code, or
/// `None` if the stream ended without one (the sandbox went away).
pub async fn attach(
    stream: UnixStream,
    tty: bool,
    stdin: bool,
    deadline: Option<tokio::time::Instant>,
) -> Result<Option<i32>> {
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Msg>(64);
    // One writer owns the socket's write half for the whole exec: dropping it would half-close the
    // stream, which the guest takes as "the client went away" and kills the process.
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write_msg(&mut wr, &m).await.is_err() {
                break;
            }
        }
        wr
    });
    let _raw = (tty && term::stdin_is_tty()).then(term::RawMode::enter);
    if stdin {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; matchlock_proto::CHUNK];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(Msg::StdinEof).await;
                        break;
                    }
                    Ok(n) => {
                        if tx.send(Msg::Stdin(buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    if tty {
        let tx = tx.clone();
        if let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        {
            tokio::spawn(async move {
                while winch.recv().await.is_some() {
                    if tx.send(Msg::Resize(term::size())).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
    // Forward the signals a user sends to matchlock to the process group in the sandbox.
    for (kind, num) in [
        (tokio::signal::unix::SignalKind::interrupt(), libc::SIGINT),
        (tokio::signal::unix::SignalKind::terminate(), libc::SIGTERM),
        (tokio::signal::unix::SignalKind::hangup(), libc::SIGHUP),
    ] {
        if let Ok(mut sig) = tokio::signal::unix::signal(kind) {
            let tx = tx.clone();
            tokio::spawn(async move {
                while sig.recv().await.is_some() {
                    if tx.send(Msg::Signal(num)).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let mut errored = false;
    // Our reader went away (`run ... | head -1`): the process gets SIGPIPE, as it would writing
    // to a closed pipe itself, and is stopped if it ignores that.
    let mut broken_pipe: Option<tokio::time::Instant> = None;
    let relay = |w: &mut dyn Write, d: &[u8], broken: &mut Option<tokio::time::Instant>| {
        if broken.is_some() {
            return None;
        }
        match w.write_all(d).and_then(|_| w.flush()) {
            Ok(()) => None,
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                *broken = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(5));
                Some(Msg::Signal(libc::SIGPIPE))
            }
            Err(_) => None,
        }
    };
    let timed_out = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timed_out);
    let result = loop {
        let msg = tokio::select! {
            m = read_msg(&mut rd) => m,
            _ = &mut timed_out => {
                let _ = tx.send(Msg::Terminate { grace_ms: 0 }).await;
                break Ok(Some(EXIT_TIMEOUT));
            }
            _ = async { match broken_pipe { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                let _ = tx.send(Msg::Terminate { grace_ms: 0 }).await;
                broken_pipe = Some(tokio::time::Instant::now() + std::time::Duration::from_secs(3600));
                continue;
            }
        };
        match msg {
            Ok(Some(Msg::Started { .. })) => {}
            Ok(Some(Msg::Stdout(d))) => {
                if let Some(m) = relay(&mut out, &d, &mut broken_pipe) {
                    let _ = tx.send(m).await;
                }
            }
            Ok(Some(Msg::Stderr(d))) => {
                if let Some(m) = relay(&mut err, &d, &mut broken_pipe) {
                    let _ = tx.send(m).await;
                }
            }
            // The guest reports a process that could not start as an error, usually followed by
            // its exit status (126/127); keep reading for it.
            Ok(Some(Msg::Error(e))) => {
                eprint!("matchlock: {}\r\n", printable(&e));
                errored = true;
            }
            // The guest is untrusted: keep its code in 0..=255 like a real exit status.
            Ok(Some(Msg::Exited(st))) => break Ok(Some(st.code.clamp(0, 255))),
            Ok(Some(_)) => {}
            Ok(None) if errored => break Ok(Some(EXIT_MATCHLOCK_ERROR)),
            Ok(None) => break Ok(None),
            Err(e) => break Err(anyhow!("lost the sandbox connection: {e}")),
        }
    };
    drop(tx);
    writer.abort();
    result
}

/// `matchlock port-forward`: serves the forwards until interrupted or the sandbox stops.
pub fn port_forward(id: &str, ports: &[String], addresses: &[String]) -> Result<i32> {
    let maps = ports
        .iter()
        .map(|p| p.parse::<PortMap>().map_err(|e| anyhow!(e)))
        .collect::<Result<Vec<_>>>()?;
    let addresses = crate::request::addresses(addresses)?;
    let store = Store::open_default();
    let id = store.resolve_id(id)?;
    let client = Client::for_sandbox(&store, &id)?;
    block_on(async move {
        let mut fwd = Forwarder::start(client.clone(), &maps, &addresses).await?;
        // Matchlock's wording, on stderr (scripts wait for it).
        for b in fwd.bindings() {
            eprintln!(
                "Forwarding {}:{} -> sandbox:{}",
                b.address, b.local_port, b.remote_port
            );
        }
        until_stopped(&client, &id, fwd.wait(), "the forward listeners stopped").await
    })
}

/// Serves until SIGINT or SIGTERM (exit 0), until `serving` ends (an error saying `why`), or until
/// the sandbox stops.
pub async fn until_stopped(
    client: &Client,
    id: &str,
    serving: impl std::future::Future<Output = ()>,
    why: &str,
) -> Result<i32> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tokio::pin!(serving);
    loop {
        tokio::select! {
            _ = sigint.recv() => return Ok(0),
            _ = sigterm.recv() => return Ok(0),
            _ = &mut serving => bail!("{why}"),
            _ = tick.tick() => {
                if client.ping().await.is_err() {
                    bail!("sandbox {id} stopped");
                }
            }
        }
    }
}

/// `matchlock allow-list add|delete`.
pub fn allow_list(cmd: crate::args::AllowListCommand) -> Result<i32> {
    use crate::args::AllowListCommand;
    let (id, add, remove) = match cmd {
        AllowListCommand::Add { id, hosts } => (id, hosts, Vec::new()),
        AllowListCommand::Delete { id, hosts } => (id, Vec::new(), hosts),
    };
    let store = Store::open_default();
    let id = store.resolve_id(&id)?;
    let client = Client::for_sandbox(&store, &id)?;
    let adding = !add.is_empty();
    let c = block_on(async { Ok(client.allow_list(add, remove).await?) })?;
    // Matchlock's wording: scripts match these lines.
    match (adding, c.added.is_empty(), c.removed.is_empty()) {
        (true, true, _) => println!("No new hosts were added to {id}"),
        (true, false, _) => println!("Added to {id}: {}", c.added.join(",")),
        (false, _, true) => println!("No hosts were removed from {id}"),
        (false, _, false) => println!("Removed from {id}: {}", c.removed.join(",")),
    }
    let now = match (c.allowed_hosts.is_empty(), c.deny_by_default) {
        (false, _) => c.allowed_hosts.join(","),
        (true, false) => "(empty: all hosts allowed)".to_string(),
        (true, true) => "(empty: no hosts allowed)".to_string(),
    };
    println!("Current allow-list: {now}");
    Ok(0)
}
