//! Starting sandboxes and talking to their supervisors.

use crate::config::{now_secs, SandboxConfig, Status};
use crate::control::{self, ExecSpec, Reply, Request};
use crate::store::Store;
use crate::SandboxError;
use matchlock_proto::Msg;
use std::io::BufRead;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Stdio;
use tokio::net::UnixStream;

/// What an allow-list change did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowListChange {
    /// Patterns that were new.
    pub added: Vec<String>,
    /// Patterns that were present and are gone.
    pub removed: Vec<String>,
    /// The list now.
    pub allowed_hosts: Vec<String>,
    /// Whether an empty list denies every host (else it allows every host).
    pub deny_by_default: bool,
}

/// Creates a sandbox from `config` (its `id` and `created_at` are filled in here), starts its
/// supervisor and waits until the guest is ready for commands. Returns the sandbox id.
///
/// On failure nothing is left behind: the supervisor removes the sandbox directory, and so does this
/// function if the supervisor could not even start.
pub fn start(store: &Store, config: SandboxConfig) -> Result<String, SandboxError> {
    start_with_secrets(store, config, &[])
}

/// [`start`] with secret values `(name, value)` for interception. They reach the supervisor
/// through a pipe and live only in its memory: never in `config.json`, a log or an argument list.
pub fn start_with_secrets(
    store: &Store,
    mut config: SandboxConfig,
    secrets: &[(String, String)],
) -> Result<String, SandboxError> {
    let id = store.create_dir()?;
    config.id = id.clone();
    config.created_at = now_secs();
    if config.hostname.is_empty() {
        config.hostname = id.clone();
    }
    let cleanup = |e: SandboxError| {
        if !store.supervisor_alive(&id) {
            let _ = std::fs::remove_dir_all(store.dir(&id));
        }
        e
    };
    store.write_config(&config).map_err(cleanup)?;
    let (rfd, wfd) = pipe().map_err(|e| cleanup(SandboxError::io("creating a pipe")(e)))?;
    let (secrets_r, secrets_w) =
        pipe().map_err(|e| cleanup(SandboxError::io("creating a pipe")(e)))?;
    let log_path = store.dir(&id).join("logs").join("supervisor.log");
    let log = std::fs::File::create(&log_path)
        .map_err(|e| cleanup(SandboxError::io(format!("creating {}", log_path.display()))(e)))?;
    let log2 = log
        .try_clone()
        .map_err(|e| cleanup(SandboxError::io("log")(e)))?;
    let exe = crate::supervisor::supervisor_exe().map_err(cleanup)?;
    let mut cmd = std::process::Command::new(exe);
    supervisor_env(&mut cmd, secrets);
    cmd.arg("__supervise")
        .arg(&id)
        .env("MATCHLOCK_HOME", store.home())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let w = wfd.as_raw_fd();
    let sr = secrets_r.as_raw_fd();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Its own session: the supervisor outlives the CLI and ignores its terminal's signals.
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The secrets pipe first: dup2 onto READY_FD must not clobber it if it sits at 3.
            let sr = if sr == crate::supervisor::READY_FD {
                let moved = libc::fcntl(sr, libc::F_DUPFD_CLOEXEC, 10);
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                moved
            } else {
                sr
            };
            for (from, to) in [
                (w, crate::supervisor::READY_FD),
                (sr, crate::supervisor::SECRETS_FD),
            ] {
                if from == to {
                    let flags = libc::fcntl(from, libc::F_GETFD);
                    libc::fcntl(from, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
                } else if libc::dup2(from, to) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Nothing else the caller holds (an SDK's pipes, say) may live on in the supervisor.
            libc::syscall(
                libc::SYS_close_range,
                5u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| cleanup(SandboxError::io("starting the sandbox supervisor")(e)))?;
    drop(wfd);
    drop(secrets_r);
    {
        use std::io::Write;
        let body = serde_json::to_vec(secrets).unwrap_or_default();
        let mut w = std::fs::File::from(secrets_w);
        // The supervisor reads this first thing; a failure shows up as a start error there.
        let _ = w.write_all(&body);
    }
    // Reap the supervisor whenever it ends so long-lived callers (the RPC server) keep no zombies.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    // One line: "ok" or "error: ...". Read only that line, so nothing that inherited the pipe by
    // accident can keep us waiting for an end of file.
    let mut answer = String::new();
    let _ = std::io::BufReader::new(std::fs::File::from(rfd)).read_line(&mut answer);
    let line = answer.trim();
    if line == "ok" {
        return Ok(id);
    }
    if let Some(msg) = line.strip_prefix("error: ") {
        return Err(cleanup(SandboxError::Start(msg.replace("\\n", "\n"))));
    }
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let last = log.lines().last().unwrap_or("no output").to_string();
    Err(cleanup(SandboxError::Start(format!(
        "the sandbox supervisor died while booting: {last}"
    ))))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A connection point to one running sandbox's supervisor.
#[derive(Debug, Clone)]
pub struct Client {
    id: String,
    socket: PathBuf,
}

impl Client {
    /// A client for sandbox `id`; fails unless it is running or paused (a paused sandbox's
    /// supervisor answers, and refuses what needs the guest with how to resume it).
    pub fn for_sandbox(store: &Store, id: &str) -> Result<Client, SandboxError> {
        let state = store.state(id)?;
        if !matches!(state.status, Status::Running | Status::Paused) {
            return Err(SandboxError::NotRunning {
                id: id.to_string(),
                status: state.status,
            });
        }
        Ok(Client {
            id: id.to_string(),
            socket: store.dir(id).join("control.sock"),
        })
    }

    /// A client of the control socket at `socket`, whatever the sandbox's state (the
    /// supervisor's own forwards, set up before it reports running).
    pub(crate) fn at(id: &str, socket: PathBuf) -> Client {
        Client {
            id: id.to_string(),
            socket,
        }
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    async fn send(&self, req: &Request) -> Result<UnixStream, SandboxError> {
        let mut s = UnixStream::connect(&self.socket).await.map_err(|e| {
            SandboxError::Channel(format!(
                "cannot reach sandbox {} ({e}); is it still running?",
                self.id
            ))
        })?;
        control::write_json(&mut s, req)
            .await
            .map_err(SandboxError::io("sending a control request"))?;
        Ok(s)
    }

    async fn simple(&self, req: &Request) -> Result<(), SandboxError> {
        let mut s = self.send(req).await?;
        match control::read_json::<_, Reply>(&mut s).await {
            Ok(Reply::Ok) => Ok(()),
            Ok(Reply::Error(e)) => Err(SandboxError::Channel(e)),
            Ok(Reply::AllowList { .. }) => Ok(()),
            Err(e) => Err(SandboxError::Channel(format!(
                "no reply from sandbox {}: {e}",
                self.id
            ))),
        }
    }

    /// Starts a process; the returned connection is its exec stream (`Msg` frames both ways).
    pub async fn exec(&self, spec: ExecSpec) -> Result<UnixStream, SandboxError> {
        self.send(&Request::Exec(spec)).await
    }

    /// Starts a detached process whose output goes to the sandbox log. With `settle_ms` > 0 the
    /// call also fails if the process exits non-zero within that time (a broken entrypoint).
    pub async fn launch(&self, spec: ExecSpec, settle_ms: u64) -> Result<(), SandboxError> {
        self.simple(&Request::Launch { spec, settle_ms }).await
    }

    /// Opens a TCP connection to `port` on the guest's loopback. The returned connection speaks
    /// the [`Msg::Connect`] stream protocol: the guest's `Ok`/`Error`, then `Data`/`Eof` both ways.
    pub async fn connect(&self, port: u16) -> Result<UnixStream, SandboxError> {
        self.send(&Request::Connect { port }).await
    }

    /// Connects to `port` on the guest's loopback and returns a plain byte stream (a relay task
    /// turns the channel's framed `Data`/`Eof` messages into bytes, with half-close). The error is
    /// the guest's reason when nothing listens there.
    pub async fn connect_bytes(&self, port: u16) -> Result<tokio::io::DuplexStream, SandboxError> {
        let s = self.connect(port).await?;
        bytes_after_ok(s, "Connect").await
    }

    /// Listens on `port` (0: any free port) on the guest's loopback, as `ssh -R` asks; the
    /// listener lives until the returned [`Listener`] is dropped.
    pub async fn listen(&self, port: u16) -> Result<Listener, SandboxError> {
        use matchlock_proto::read_msg;
        let mut s = self.send(&Request::Listen { port }).await?;
        match read_msg(&mut s).await? {
            Some(Msg::Listening { port }) => Ok(Listener {
                client: self.clone(),
                port,
                stream: s,
            }),
            Some(Msg::Error(e)) => Err(SandboxError::Channel(e)),
            other => Err(SandboxError::Channel(format!(
                "unexpected reply to Listen: {other:?}"
            ))),
        }
    }

    /// Takes the connection the guest announced as `id` on a [`Listener`] and returns it as a
    /// plain byte stream.
    async fn take(&self, id: u64) -> Result<tokio::io::DuplexStream, SandboxError> {
        let s = self.send(&Request::Accept { id }).await?;
        bytes_after_ok(s, "Accept").await
    }

    /// Writes the sandbox's changes to its image, as one OCI layer tar (see
    /// [`Msg::ExportUpper`]), to `out`; returns its size. `exclude` names paths (relative, such
    /// as `etc/hosts`) left out. The tar is the guest's: check it as any image layer.
    pub async fn export_upper<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        exclude: Vec<String>,
        stop_processes: bool,
        out: &mut W,
    ) -> Result<u64, SandboxError> {
        use matchlock_proto::read_msg;
        use tokio::io::AsyncWriteExt;
        let mut s = self
            .file(Msg::ExportUpper {
                exclude,
                stop_processes,
            })
            .await?;
        let mut size = 0u64;
        loop {
            match read_msg(&mut s).await? {
                Some(Msg::Data(d)) => {
                    out.write_all(&d)
                        .await
                        .map_err(SandboxError::io("writing the layer"))?;
                    size += d.len() as u64;
                }
                Some(Msg::Eof) => break,
                Some(Msg::Error(e)) => return Err(SandboxError::Channel(e)),
                other => {
                    return Err(SandboxError::Channel(format!(
                        "unexpected reply to ExportUpper: {other:?}"
                    )))
                }
            }
        }
        out.flush()
            .await
            .map_err(SandboxError::io("writing the layer"))?;
        Ok(size)
    }

    /// Starts a file operation; the returned connection is its stream.
    pub async fn file(&self, op: Msg) -> Result<UnixStream, SandboxError> {
        self.send(&Request::File(op)).await
    }

    /// Reads a whole guest file of at most `cap` bytes; `Ok(None)` when it does not exist. A
    /// bigger file is an error, found before its content crosses the channel.
    pub async fn read_file(&self, path: &str, cap: u64) -> Result<Option<Vec<u8>>, SandboxError> {
        use matchlock_proto::read_msg;
        let mut s = self.file(Msg::ReadFile { path: path.into() }).await?;
        let mut content = Vec::new();
        loop {
            match read_msg(&mut s).await? {
                Some(Msg::FileInfo { size, .. }) if size > cap => {
                    return Err(SandboxError::Invalid(format!(
                        "{path} is {size} bytes; at most {cap} are read"
                    )))
                }
                Some(Msg::FileInfo { .. }) => {}
                Some(Msg::Data(d)) if content.len() as u64 + d.len() as u64 > cap => {
                    return Err(SandboxError::Invalid(format!(
                        "{path} grew beyond {cap} bytes while being read"
                    )))
                }
                Some(Msg::Data(d)) => content.extend_from_slice(&d),
                Some(Msg::Eof) => return Ok(Some(content)),
                // The guest describes a missing file with the OS's own error (ENOENT).
                Some(Msg::Error(e)) if e.ends_with("(os error 2)") => return Ok(None),
                Some(Msg::Error(e)) => return Err(SandboxError::Channel(e)),
                other => {
                    return Err(SandboxError::Channel(format!(
                        "unexpected reply to ReadFile: {other:?}"
                    )))
                }
            }
        }
    }

    /// Writes a whole guest file as root (parents are created), replacing what was there.
    pub async fn write_file(&self, path: &str, data: &[u8], mode: u32) -> Result<(), SandboxError> {
        let mut s = self
            .file(Msg::WriteFile(matchlock_proto::WriteFile {
                path: path.into(),
                mode,
                uid: None,
                gid: None,
            }))
            .await?;
        matchlock_proto::transfer::send_file_body(&mut s, data)
            .await
            .map_err(|e| SandboxError::Channel(format!("{path}: {e}")))
    }

    /// Stops the sandbox and waits until its VM and supervisor are gone.
    pub async fn stop(&self, grace_ms: Option<u64>) -> Result<(), SandboxError> {
        self.simple(&Request::Stop { grace_ms }).await?;
        // The supervisor replies just before it exits; wait for its lock so a following `rm`
        // does not see it alive.
        let lock = self.socket.with_file_name("lock");
        for _ in 0..100 {
            if !crate::store::lock_held(&lock) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Adds and removes interception allow-list patterns.
    pub async fn allow_list(
        &self,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<AllowListChange, SandboxError> {
        let mut s = self.send(&Request::AllowList { add, remove }).await?;
        match control::read_json::<_, Reply>(&mut s).await {
            Ok(Reply::AllowList {
                added,
                removed,
                allowed_hosts,
                deny_by_default,
            }) => Ok(AllowListChange {
                added,
                removed,
                allowed_hosts,
                deny_by_default,
            }),
            Ok(Reply::Error(e)) => Err(SandboxError::Invalid(e)),
            Ok(Reply::Ok) => Err(SandboxError::Channel("unexpected reply".into())),
            Err(e) => Err(SandboxError::Channel(format!(
                "no reply from sandbox {}: {e}",
                self.id
            ))),
        }
    }

    /// Saves the guest into the sandbox directory and ends its QEMU, releasing the memory; the
    /// sandbox is `paused` until [`resume`](Self::resume).
    pub async fn pause(&self) -> Result<(), SandboxError> {
        self.simple(&Request::Pause).await
    }

    /// Continues a paused sandbox where it stopped.
    pub async fn resume(&self) -> Result<(), SandboxError> {
        self.simple(&Request::Resume).await
    }

    /// Checks that the supervisor answers.
    pub async fn ping(&self) -> Result<(), SandboxError> {
        self.simple(&Request::Ping).await
    }

    /// Subscribes to workspace events (the sandbox must have been created with
    /// `vfs_emit_events`); everything completed after this returns is reported.
    pub async fn events(&self) -> Result<Events, SandboxError> {
        let mut s = self.send(&Request::Events).await?;
        match control::read_json::<_, Reply>(&mut s).await {
            Ok(Reply::Ok) => Ok(Events { conn: s }),
            Ok(Reply::Error(e)) => Err(SandboxError::Invalid(e)),
            Ok(Reply::AllowList { .. }) => Err(SandboxError::Channel("unexpected reply".into())),
            Err(e) => Err(SandboxError::Channel(format!(
                "no reply from sandbox {}: {e}",
                self.id
            ))),
        }
    }
}

/// A subscription to a sandbox's workspace events ([`Client::events`]).
pub struct Events {
    conn: UnixStream,
}

impl Events {
    /// The next event; `None` once the sandbox has stopped.
    pub async fn next(&mut self) -> Option<matchlock_vfs::FileEvent> {
        control::read_json(&mut self.conn).await.ok()
    }
}

/// Variables the supervisor (and QEMU, which inherits from it) may see besides `MATCHLOCK_*`:
/// where programs and certificates are, logging, locale.
const SUPERVISOR_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "XDG_CACHE_HOME",
    "XDG_RUNTIME_DIR",
    "DOCKER_CONFIG",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
];

/// Shortest secret value looked for inside other variables' values; a shorter one (a test's
/// `v`) would match half the environment, and is only looked for as a whole value.
const MIN_EMBEDDED_SECRET: usize = 8;

/// Gives the supervisor a clean environment: only the variables it needs, and none that is
/// named like a secret or holds a secret's value. A `--secret NAME@host` takes its value from
/// the caller's environment; inherited, it would sit in the supervisor's and QEMU's
/// `/proc/PID/environ` for the sandbox's whole life.
fn supervisor_env(cmd: &mut std::process::Command, secrets: &[(String, String)]) {
    use std::os::unix::ffi::OsStrExt;
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        let Some(name) = k.to_str() else { continue };
        let wanted = name.starts_with("MATCHLOCK_") || SUPERVISOR_ENV.contains(&name);
        let secret = secrets.iter().any(|(n, value)| {
            let value = value.as_bytes();
            n == name
                || v.as_bytes() == value
                || (value.len() >= MIN_EMBEDDED_SECRET
                    && v.as_bytes().windows(value.len()).any(|w| w == value))
        });
        if wanted && !secret {
            cmd.env(k, v);
        }
    }
}

#[cfg(test)]
mod env_tests {
    use super::*;

    fn passed(secrets: &[(&str, &str)]) -> Vec<String> {
        let secrets: Vec<(String, String)> = secrets
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let mut cmd = std::process::Command::new("true");
        supervisor_env(&mut cmd, &secrets);
        cmd.get_envs()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect()
    }

    /// Only the listed variables pass, never one named like a secret or holding its value,
    /// and a short value does not knock out every variable that happens to contain it.
    #[test]
    fn the_supervisor_gets_no_secret_and_nothing_it_does_not_need() {
        let path = std::env::var("PATH").unwrap();
        let all = passed(&[]);
        assert!(all.iter().any(|k| k == "PATH"), "{all:?}");
        assert!(all
            .iter()
            .all(|k| k.starts_with("MATCHLOCK_") || SUPERVISOR_ENV.contains(&k.as_str())));
        assert!(!passed(&[("K", &path)]).contains(&"PATH".to_string()));
        assert!(!passed(&[("PATH", "x")]).contains(&"PATH".to_string()));
        assert!(passed(&[("K", "v")]).contains(&"PATH".to_string()));
        let tail = &path[path.len().saturating_sub(10)..];
        if tail.len() >= MIN_EMBEDDED_SECRET {
            assert!(!passed(&[("K", tail)]).contains(&"PATH".to_string()));
        }
    }
}

/// A listener on the guest's loopback (see [`Client::listen`]). Dropping it stops listening.
#[derive(Debug)]
pub struct Listener {
    client: Client,
    port: u16,
    stream: UnixStream,
}

impl Listener {
    /// The guest port listened on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for the next connection to the guest port and returns it as a byte stream. An
    /// error ends the listener (the sandbox stopped, or the guest closed it).
    pub async fn accept(&mut self) -> Result<tokio::io::DuplexStream, SandboxError> {
        use matchlock_proto::read_msg;
        loop {
            let id = match read_msg(&mut self.stream).await? {
                Some(Msg::Accepted { id }) => id,
                Some(Msg::Error(e)) => return Err(SandboxError::Channel(e)),
                Some(other) => {
                    return Err(SandboxError::Channel(format!(
                        "unexpected message on a Listen stream: {other:?}"
                    )))
                }
                None => return Err(SandboxError::Channel("the guest stopped listening".into())),
            };
            match self.client.take(id).await {
                Ok(s) => return Ok(s),
                // The peer in the guest gave up before it was taken: wait for the next one.
                Err(SandboxError::Channel(e)) => {
                    tracing::debug!(port = self.port, "accepted connection lost: {e}")
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Reads a `Connect`-style stream's first reply and, on `Ok`, turns its framed `Data`/`Eof`
/// messages into a plain byte stream with half-close (a relay task). The error is the guest's.
async fn bytes_after_ok(
    mut s: UnixStream,
    request: &str,
) -> Result<tokio::io::DuplexStream, SandboxError> {
    use matchlock_proto::read_msg;
    match read_msg(&mut s).await? {
        Some(Msg::Ok) => {}
        Some(Msg::Error(e)) => return Err(SandboxError::Channel(e)),
        other => {
            return Err(SandboxError::Channel(format!(
                "unexpected reply to {request}: {other:?}"
            )))
        }
    }
    let (ours, theirs) = tokio::io::duplex(256 << 10);
    tokio::spawn(async move {
        let (srd, swr) = s.into_split();
        let (trd, twr) = tokio::io::split(theirs);
        matchlock_proto::relay::relay(srd, swr, trd, twr).await;
    });
    Ok(ours)
}
