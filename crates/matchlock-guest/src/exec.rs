//! `Exec`: starting a process and relaying its I/O on the stream.
//!
//! The process is started with `std::process::Command` and a `pre_exec` hook (which forks); its exit
//! status comes from the [reaper](crate::reaper), never from `wait` here. Everything the child does
//! between `fork` and `exec` is a raw syscall on data prepared in the parent, because the agent is
//! multi-threaded and the child must not allocate or take locks.
//!
//! Start failures are reported as [`Msg::Error`] followed by [`Msg::Exited`] with the shell's codes:
//! 127 when the program does not exist, 126 for every other reason the process could not start.

use crate::channel::Fd;
use crate::server::{Agent, Reader, Writer};
use crate::{reaper, tty, users};
use matchlock_proto::{read_msg, write_msg, ExecRequest, ExitStatus, Msg, CHUNK};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// `PATH` used for the program lookup when the request's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// After the process exits, output it wrote is always relayed in full, however slowly the host
/// reads it. Beyond that, a background child that keeps the pipes open (`sh -c 'daemon &'`) would
/// hold the exec open forever, so its later output is relayed only while it keeps coming: until
/// the pipe stays empty for `DRAIN_IDLE`, and for `DRAIN_CAP` after the exit at most.
const DRAIN_IDLE: Duration = Duration::from_millis(250);
/// See [`DRAIN_IDLE`].
const DRAIN_CAP: Duration = Duration::from_secs(2);

/// Docker's default capability set: everything else is dropped from the bounding set.
const KEPT_CAPS: &[libc::c_int] = &[
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    // CAP_SYS_CHROOT (18) is kept by Docker but not here: our root is entered with MS_MOVE +
    // chroot (pivot_root cannot leave an initramfs), so chroot would let root climb back out
    // into the initramfs and the raw upper filesystem.
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// Why a process did not start: the message for the user and the shell-style exit code.
#[derive(Debug)]
struct StartFailure {
    message: String,
    code: i32,
}

impl StartFailure {
    fn cannot_run(message: String) -> Self {
        Self { message, code: 126 }
    }
}

/// Everything decided in the parent before forking.
struct Plan {
    program: PathBuf,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    pty: Option<tty::Pty>,
    stdin: bool,
    child: ChildSetup,
}

/// What the child does between `fork` and `exec`; only raw syscalls on prepared data.
struct ChildSetup {
    tty: bool,
    cgroup_procs: Option<RawFd>,
    drop_caps: bool,
    /// `None` keeps the agent's credentials (test mode without root).
    creds: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    seccomp: Option<Arc<seccompiler::BpfProgram>>,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

impl ChildSetup {
    /// Runs in the forked child. Order matters: the bounding set can only be changed while the
    /// process is still root with CAP_SETPCAP, so capabilities go before `setuid`; the seccomp filter
    /// comes last because it also sets `no_new_privs`.
    fn run(&self) -> io::Result<()> {
        // SAFETY: async-signal-safe syscalls only, on memory owned by `self`.
        unsafe {
            // Start from default signal dispositions and an empty mask: ignored signals survive
            // exec, and whatever the agent inherited or set up (e.g. SIGINT ignored when started
            // in the background, SIGPIPE ignored by the Rust runtime) must not leak into the job.
            for sig in 1..libc::SIGRTMAX() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Its own session and process group, so signals and kills reach the whole job.
            if libc::setsid() < 0 {
                return Err(last_err());
            }
            if self.tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(last_err());
            }
            if let Some(fd) = self.cgroup_procs {
                // "0" moves the writing process.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(last_err());
                }
            }
            if self.drop_caps {
                for cap in 0..64 {
                    if KEPT_CAPS.contains(&cap) {
                        continue;
                    }
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                        match *libc::__errno_location() {
                            // Past the last capability this kernel knows.
                            libc::EINVAL => break,
                            // No CAP_SETPCAP because the agent is not root (an unprivileged
                            // test run): the bounding set cannot grow anyway, and no_new_privs
                            // below stops setuid binaries. As root this must not fail open.
                            libc::EPERM if libc::geteuid() != 0 => break,
                            _ => return Err(last_err()),
                        }
                    }
                }
            }
            if let Some((uid, gid, groups)) = &self.creds {
                if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(*gid) < 0
                    || libc::setuid(*uid) < 0
                {
                    return Err(last_err());
                }
            }
        }
        if let Some(program) = &self.seccomp {
            if seccompiler::apply_filter(program).is_err() {
                // The error value holds the errno; re-read it rather than convert (no allocation).
                return Err(last_err());
            }
        }
        Ok(())
    }
}

/// Finds the program like `execvp` would, but with the request's `PATH` (or [`DEFAULT_PATH`]).
fn resolve_program(
    argv0: &str,
    path_var: Option<&str>,
    cwd: &Path,
) -> Result<PathBuf, StartFailure> {
    if argv0.contains('/') {
        return Ok(cwd.join(argv0));
    }
    if !argv0.is_empty() {
        for dir in path_var.unwrap_or(DEFAULT_PATH).split(':') {
            // An empty PATH element means the current directory, as in POSIX.
            let dir = if dir.is_empty() { "." } else { dir };
            let candidate = cwd.join(dir).join(argv0);
            if let Ok(meta) = std::fs::metadata(&candidate) {
                if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                    return Ok(candidate);
                }
            }
        }
    }
    Err(StartFailure {
        message: format!("exec: {argv0:?}: executable file not found in $PATH"),
        code: 127,
    })
}

/// Validates the request and resolves everything the child needs.
fn prepare(req: &ExecRequest, agent: &Agent) -> Result<Plan, StartFailure> {
    let Some(argv0) = req.argv.first() else {
        return Err(StartFailure::cannot_run("exec: empty argv".into()));
    };
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(StartFailure::cannot_run(
            "exec: an argument contains a NUL byte".into(),
        ));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
            return Err(StartFailure::cannot_run(format!(
                "exec: invalid environment variable name {k:?}"
            )));
        }
    }

    let cwd = PathBuf::from(req.cwd.as_deref().unwrap_or("/"));
    if !cwd.is_absolute() {
        return Err(StartFailure::cannot_run(format!(
            "working directory {:?} must be absolute",
            cwd.display().to_string()
        )));
    }
    match std::fs::metadata(&cwd) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(StartFailure::cannot_run(format!(
                "working directory {}: not a directory",
                cwd.display()
            )))
        }
        Err(e) => {
            return Err(StartFailure::cannot_run(format!(
                "working directory {}: {e}",
                cwd.display()
            )))
        }
    }

    let creds =
        users::lookup(req.user.as_deref()).map_err(|e| StartFailure::cannot_run(e.to_string()))?;

    let path_var = req
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let program = resolve_program(argv0, path_var, &cwd)?;

    let mut env = req.env.clone();
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), creds.home.clone()));
    }

    let pty = match req.tty {
        Some(size) => {
            let pty = tty::open(size)
                .map_err(|e| StartFailure::cannot_run(format!("allocating a terminal: {e}")))?;
            // The user owns its terminal, so programs that reopen it by name (ttyname) can.
            let _ = nix::unistd::fchown(pty.slave.as_raw_fd(), Some(creds.uid.into()), None);
            Some(pty)
        }
        None => None,
    };

    let seccomp = if req.privileged {
        None
    } else {
        // Fail closed: an unprivileged exec never runs without its filter.
        Some(agent.seccomp.clone().ok_or_else(|| {
            StartFailure::cannot_run("exec: the seccomp filter is unavailable".into())
        })?)
    };
    let as_root = nix::unistd::geteuid().is_root();
    Ok(Plan {
        program,
        argv: req.argv.clone(),
        env,
        cwd,
        stdin: req.stdin,
        child: ChildSetup {
            tty: pty.is_some(),
            cgroup_procs: agent.cgroup_procs.get().map(|fd| fd.as_raw_fd()),
            drop_caps: !req.privileged,
            creds: as_root.then(|| (creds.uid, creds.gid, creds.groups.clone())),
            seccomp,
        },
        pty,
    })
}

/// A started process and the agent's ends of its stdio.
struct Spawned {
    pid: i32,
    exit: oneshot::Receiver<ExitStatus>,
    stdin: Option<Fd>,
    stdout: Option<Fd>,
    stderr: Option<Fd>,
    pty: Option<Arc<Fd>>,
}

fn start_failure(argv0: &str, e: &io::Error) -> StartFailure {
    let code = if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    };
    StartFailure {
        message: format!("exec: {argv0:?}: {e}"),
        code,
    }
}

fn wrap(fd: impl Into<OwnedFd>) -> Result<Fd, StartFailure> {
    Fd::new(fd.into()).map_err(|e| StartFailure::cannot_run(format!("exec: stdio: {e}")))
}

/// Forks and execs. Blocking: runs on the blocking pool.
fn spawn(plan: Plan) -> Result<Spawned, StartFailure> {
    let Plan {
        program,
        argv,
        env,
        cwd,
        pty,
        stdin,
        child,
    } = plan;
    let argv0 = argv.first().cloned().unwrap_or_default();
    let mut cmd = Command::new(&program);
    cmd.arg0(&argv0)
        .args(argv.iter().skip(1))
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd);
    let master = match pty {
        Some(tty::Pty { master, slave }) => {
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| StartFailure::cannot_run(format!("exec: terminal: {e}")))
            };
            cmd.stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            Some(master)
        }
        None => {
            cmd.stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            None
        }
    };
    // SAFETY: `ChildSetup::run` only makes async-signal-safe syscalls on data owned by the closure.
    unsafe {
        cmd.pre_exec(move || child.run());
    }

    let (mut proc, exit) = {
        let mut registry = reaper::lock();
        let proc = cmd.spawn().map_err(|e| start_failure(&argv0, &e))?;
        let exit = registry.register(proc.id() as i32);
        (proc, exit)
    };
    // The Command holds the parent's copies of the terminal slave; the master only sees end of
    // file once they are closed.
    drop(cmd);
    Ok(Spawned {
        pid: proc.id() as i32,
        exit,
        stdin: proc.stdin.take().map(wrap).transpose()?,
        stdout: proc.stdout.take().map(wrap).transpose()?,
        stderr: proc.stderr.take().map(wrap).transpose()?,
        pty: master.map(wrap).transpose()?.map(Arc::new),
    })
}

/// Sends `sig` to process group `pgid`. Errors (the group is already gone) are irrelevant.
fn kill_group(pgid: i32, sig: i32) {
    // SAFETY: plain syscall.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Bytes waiting in a pipe or terminal (`FIONREAD`); 0 if it cannot tell.
fn pending_bytes(fd: &Fd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd.raw(), libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        n.max(0) as usize
    }
}

/// Relays everything `fd` produces as messages made by `make`, until end of file or, once
/// `exited` is set, as [`DRAIN_IDLE`] describes.
fn pump(
    fd: Arc<Fd>,
    tx: mpsc::Sender<Msg>,
    make: fn(Vec<u8>) -> Msg,
    mut exited: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        // Set when the exit is first seen: what was in the pipe then, and when to stop anyway.
        let mut drain: Option<(usize, Instant)> = None;
        loop {
            if drain.is_none() && *exited.borrow() {
                drain = Some((pending_bytes(&fd), Instant::now() + DRAIN_CAP));
            }
            let read = match &mut drain {
                None => tokio::select! {
                    r = fd.read(&mut buf) => r,
                    changed = exited.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        continue;
                    }
                },
                // Written before the exit: the pipe holds it, so the read does not wait.
                Some((owed, _)) if *owed > 0 => fd.read(&mut buf).await,
                Some((_, cap)) => {
                    // A read of a pipe that always has data never waits, so the cap is
                    // checked here, not only by the timeout.
                    if Instant::now() >= *cap {
                        break;
                    }
                    let until = (Instant::now() + DRAIN_IDLE).min(*cap);
                    match tokio::time::timeout_at(until, fd.read(&mut buf)).await {
                        Ok(r) => r,
                        Err(_) => break,
                    }
                }
            };
            match read {
                Ok(0) => break,
                Ok(n) => {
                    if let Some((owed, _)) = &mut drain {
                        *owed = owed.saturating_sub(n);
                    }
                    if tx.send(make(buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
    })
}

enum StdinCmd {
    Data(Vec<u8>),
    Eof,
}

/// Feeds the process's stdin (a pipe, or the terminal). Runs in its own task so a process that does
/// not read its input cannot stall signals and resizes behind a blocked write.
fn stdin_writer(fd: Arc<Fd>, is_tty: bool, mut rx: mpsc::Receiver<StdinCmd>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(cmd) = rx.recv().await {
            let result = match cmd {
                StdinCmd::Data(d) => fd.write_all(&d).await,
                StdinCmd::Eof if is_tty => fd.write_all(&[tty::eof_char(fd.raw())]).await,
                // Returning drops the pipe's write end: the process reads end of file.
                StdinCmd::Eof => return,
            };
            if result.is_err() {
                // The reader is gone (EPIPE); later input has nowhere to go.
                return;
            }
        }
    })
}

/// Serves an `Exec` stream.
pub async fn run(agent: Arc<Agent>, req: ExecRequest, rd: Reader, mut wr: Writer) {
    let is_tty = req.tty.is_some();
    let started = tokio::task::spawn_blocking(move || prepare(&req, &agent).and_then(spawn))
        .await
        .unwrap_or_else(|e| Err(StartFailure::cannot_run(format!("exec: {e}"))));
    let spawned = match started {
        Ok(s) => s,
        Err(f) => {
            let _ = write_msg(&mut wr, &Msg::Error(f.message)).await;
            let exited = Msg::Exited(ExitStatus {
                code: f.code,
                signal: None,
            });
            let _ = write_msg(&mut wr, &exited).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    relay(spawned, is_tty, rd, wr).await;
}

/// Relays I/O and control messages until the process exits (or the host goes away).
async fn relay(sp: Spawned, is_tty: bool, rd: Reader, wr: Writer) {
    let Spawned {
        pid,
        mut exit,
        stdin,
        stdout,
        stderr,
        pty,
    } = sp;

    // One writer task owns the stream's write half, so messages keep their order.
    let (out_tx, mut out_rx) = mpsc::channel::<Msg>(16);
    let writer = tokio::spawn(async move {
        let mut wr = wr;
        while let Some(m) = out_rx.recv().await {
            if write_msg(&mut wr, &m).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let _ = out_tx.send(Msg::Started { pid: pid as u32 }).await;

    let mut pumps = Vec::new();
    let (exited_tx, exited_rx) = watch::channel(false);
    let stdin_fd = match &pty {
        Some(master) => {
            pumps.push(pump(master.clone(), out_tx.clone(), Msg::Stdout, exited_rx));
            Some(master.clone())
        }
        None => {
            if let Some(fd) = stdout {
                let rx = exited_rx.clone();
                pumps.push(pump(Arc::new(fd), out_tx.clone(), Msg::Stdout, rx));
            }
            if let Some(fd) = stderr {
                pumps.push(pump(Arc::new(fd), out_tx.clone(), Msg::Stderr, exited_rx));
            }
            stdin.map(Arc::new)
        }
    };
    let (mut stdin_tx, stdin_task) = match stdin_fd {
        Some(fd) => {
            let (tx, rx) = mpsc::channel(32);
            (Some(tx), Some(stdin_writer(fd, is_tty, rx)))
        }
        None => (None, None),
    };

    // Messages from the host, parsed in their own task: `read_msg` is not cancel-safe.
    let (in_tx, mut in_rx) = mpsc::channel::<Msg>(16);
    let reader = tokio::spawn(async move {
        let mut rd = rd;
        while let Ok(Some(m)) = read_msg(&mut rd).await {
            if in_tx.send(m).await.is_err() {
                break;
            }
        }
    });

    let mut kill_at: Option<Instant> = None;
    let status = 'main: loop {
        tokio::select! {
            st = &mut exit => break 'main st.ok(),
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(Instant::now)), if kill_at.is_some() => {
                kill_group(pid, libc::SIGKILL);
                kill_at = None;
            }
            m = in_rx.recv() => match m {
                None => {
                    // The host closed or reset the stream: nobody will read the output.
                    kill_group(pid, libc::SIGKILL);
                    reader.abort();
                    if let Some(t) = stdin_task { t.abort(); }
                    for p in &pumps { p.abort(); }
                    drop(out_tx);
                    writer.abort();
                    return;
                }
                Some(Msg::Stdin(data)) => {
                    if let Some(tx) = &stdin_tx {
                        tokio::select! {
                            r = tx.send(StdinCmd::Data(data)) => if r.is_err() { stdin_tx = None },
                            st = &mut exit => break 'main st.ok(),
                        }
                    }
                }
                Some(Msg::StdinEof) => {
                    if let Some(tx) = &stdin_tx {
                        tokio::select! {
                            _ = tx.send(StdinCmd::Eof) => {},
                            st = &mut exit => break 'main st.ok(),
                        }
                    }
                    if !is_tty {
                        stdin_tx = None;
                    }
                }
                Some(Msg::Resize(size)) => {
                    if let Some(master) = &pty {
                        let _ = tty::resize(master.raw(), size);
                    }
                }
                Some(Msg::Signal(sig)) => {
                    // With a terminal the signal goes where Ctrl-C would: the foreground job.
                    let target = pty.as_ref().and_then(|m| tty::foreground_pgrp(m.raw())).unwrap_or(pid);
                    kill_group(target, sig);
                }
                Some(Msg::Terminate { grace_ms }) => {
                    kill_group(pid, libc::SIGTERM);
                    let at = Instant::now() + Duration::from_millis(grace_ms);
                    kill_at = Some(kill_at.map_or(at, |k| k.min(at)));
                }
                Some(_) => {} // Not meaningful on an exec stream; ignored.
            }
        }
    };

    reader.abort();
    drop(stdin_tx);
    if let Some(t) = stdin_task {
        // It may be blocked on a pipe a background child holds open.
        t.abort();
    }
    // Output written just before the exit is still in the pipes; the pumps relay it and stop
    // (see DRAIN_IDLE). Awaiting them keeps all of it ahead of `Exited`.
    let _ = exited_tx.send(true);
    for p in pumps {
        let _ = p.await;
    }
    let exited = match status {
        Some(s) => Msg::Exited(s),
        None => {
            // The reaper dropped the sender without a status; should not happen.
            let _ = out_tx
                .send(Msg::Error("lost track of the process".into()))
                .await;
            Msg::Exited(ExitStatus {
                code: 255,
                signal: None,
            })
        }
    };
    let _ = out_tx.send(exited).await;
    drop(out_tx);
    let _ = writer.await;
}
