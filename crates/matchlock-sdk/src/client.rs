//! The client: one `matchlock rpc` child process and the JSON-RPC conversation with it.

use crate::error::Error;
use crate::ingress::{Ingress, IngressOptions, IngressRoute};
use crate::sandbox::Sandbox;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, oneshot};

/// How to start the server.
#[derive(Debug, Clone)]
pub struct Config {
    /// The `matchlock` binary; default `$MATCHLOCK_BIN`, else `matchlock` on `PATH`.
    pub binary: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            binary: std::env::var_os("MATCHLOCK_BIN")
                .filter(|b| !b.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("matchlock")),
        }
    }
}

/// Per-command options.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    /// Working directory (default: the image's).
    pub working_dir: Option<String>,
    /// User (default: the image's).
    pub user: Option<String>,
    /// Give up after this long; the command is then killed in the sandbox.
    pub timeout: Option<Duration>,
}

/// A finished command with its whole output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    /// Exit code (`128 + n` when killed by signal `n`).
    pub exit_code: i32,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

impl ExecResult {
    /// Stdout as text (invalid UTF-8 replaced).
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as text (invalid UTF-8 replaced).
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// A finished streamed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code.
    pub exit_code: i32,
    /// Wall time in milliseconds.
    pub duration_ms: u64,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileInfo {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Go `os.FileMode` bits (permissions in the low 9 bits; directory = `1 << 31`).
    pub mode: u32,
    /// Whether it is a directory.
    pub is_dir: bool,
}

/// A port forward that is listening.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PortForwardBinding {
    /// Host address.
    pub address: String,
    /// Host port.
    pub local_port: u16,
    /// Guest port.
    pub remote_port: u16,
}

/// A named volume.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct VolumeInfo {
    /// Name (attach with `Sandbox::with_disk("@NAME", ...)`).
    pub name: String,
    /// Size as printed by matchlock (`"64.0 MB"`).
    pub size: String,
    /// The ext4 file.
    pub path: PathBuf,
}

type Note = (String, Value);

struct Pending {
    reply: oneshot::Sender<Result<Value, Error>>,
    notes: Option<mpsc::UnboundedSender<Note>>,
}

struct Conn {
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    closed: AtomicBool,
    /// Where `event` notifications for workspace operations go ([`Client::file_events`]).
    file_events: Mutex<Option<mpsc::UnboundedSender<FileEvent>>>,
}

/// A guest operation on a workspace mount that completed, from a sandbox created with
/// [`crate::Sandbox::with_vfs_events`] ([`Client::file_events`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileEvent {
    /// The kind of operation (`write`, `create`, `remove`, `stat`, ...).
    pub op: String,
    /// Full guest path.
    pub path: String,
    /// Bytes read or written; otherwise the file's size when known.
    #[serde(default)]
    pub size: u64,
    /// `st_mode`, when known.
    #[serde(default)]
    pub mode: u32,
    /// Owner uid, when known.
    #[serde(default)]
    pub uid: u32,
    /// Owner gid, when known.
    #[serde(default)]
    pub gid: u32,
}

impl Conn {
    async fn write(&self, v: &Value) -> Result<(), Error> {
        let mut line = serde_json::to_vec(v).map_err(|e| Error::Protocol(e.to_string()))?;
        line.push(b'\n');
        let mut stdin = self.stdin.lock().await;
        let w = stdin.as_mut().ok_or(Error::Closed)?;
        w.write_all(&line).await.map_err(|_| Error::Closed)?;
        w.flush().await.map_err(|_| Error::Closed)
    }

    fn fail_all(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for (_, p) in self.pending.lock().unwrap().drain() {
            let _ = p.reply.send(Err(Error::Closed));
        }
    }

    /// Routes one line from the server.
    fn dispatch(&self, line: &str) {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            return;
        };
        if let Some(id) = msg.get("id").and_then(Value::as_u64) {
            let Some(p) = self.pending.lock().unwrap().remove(&id) else {
                return;
            };
            let result = match msg.get("error") {
                Some(e) if !e.is_null() => Err(Error::Rpc {
                    code: e.get("code").and_then(Value::as_i64).unwrap_or(0),
                    message: e
                        .get("message")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                }),
                _ => Ok(msg.get("result").cloned().unwrap_or(Value::Null)),
            };
            let _ = p.reply.send(result);
            return;
        }
        let (Some(method), Some(params)) =
            (msg.get("method").and_then(Value::as_str), msg.get("params"))
        else {
            return;
        };
        if method == "event" {
            let file = params
                .get("file")
                .and_then(|f| serde_json::from_value::<FileEvent>(f.clone()).ok());
            if let (Some(e), Some(tx)) = (file, self.file_events.lock().unwrap().as_ref()) {
                let _ = tx.send(e);
            }
            return;
        }
        let Some(id) = params.get("id").and_then(Value::as_u64) else {
            return;
        };
        if let Some(tx) = self
            .pending
            .lock()
            .unwrap()
            .get(&id)
            .and_then(|p| p.notes.clone())
        {
            let _ = tx.send((method.to_string(), params.clone()));
        }
    }
}

/// How to reach a sandbox's SSH server with OpenSSH ([`Client::enable_ssh`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SshAccess {
    /// A ready `ssh` command line (shell-quoted).
    pub command: String,
    /// `ssh`'s arguments, destination last (options alone for `scp`/`sftp`: all but the last).
    pub args: Vec<String>,
    /// The server's address.
    pub host: String,
    /// The server's port.
    pub port: u16,
    /// The guest user.
    pub user: String,
    /// The only private key that may log in.
    pub identity_file: PathBuf,
    /// The `known_hosts` file pinning the server's key.
    pub known_hosts: PathBuf,
    /// The name the host key is pinned under.
    pub host_key_alias: String,
}

#[derive(serde::Deserialize)]
struct IngressAddress {
    url: String,
    address: String,
    port: u16,
}

/// A call in flight.
struct Call {
    id: u64,
    reply: oneshot::Receiver<Result<Value, Error>>,
    notes: Option<mpsc::UnboundedReceiver<Note>>,
}

/// A connection to one `matchlock rpc` server, which manages (at most) one sandbox at a time.
///
/// Dropping the client kills the server, and the server's death stops its sandbox, so nothing
/// outlives a forgotten client. [`Client::close`] does the same gracefully.
pub struct Client {
    conn: Arc<Conn>,
    child: tokio::sync::Mutex<Option<Child>>,
    binary: PathBuf,
    vm_id: Mutex<Option<String>>,
    /// The socket the ingress gateway calls the hooks on, while it runs.
    ingress_hooks: Mutex<Option<crate::ingress::HookServer>>,
}

impl Client {
    /// Starts `matchlock rpc` (found through `$MATCHLOCK_BIN`, else `PATH`).
    pub async fn start() -> Result<Client, Error> {
        Client::start_with(Config::default()).await
    }

    /// Workspace operations the guest completes from now on, for a sandbox created with
    /// [`crate::Sandbox::with_vfs_events`] (after-the-fact hooks: react to a write, index a new
    /// file). A later call replaces the earlier receiver. Events arrive in order; the server drops
    /// the oldest if this side falls far behind.
    pub fn file_events(&self) -> mpsc::UnboundedReceiver<FileEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.conn.file_events.lock().unwrap() = Some(tx);
        rx
    }

    /// Starts `matchlock rpc` as `config` says.
    pub async fn start_with(config: Config) -> Result<Client, Error> {
        let mut child = tokio::process::Command::new(&config.binary)
            .arg("rpc")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(Error::io(format!(
                "starting {} rpc",
                config.binary.display()
            )))?;
        let stdin = child.stdin.take().ok_or(Error::Closed)?;
        let stdout = child.stdout.take().ok_or(Error::Closed)?;
        let conn = Arc::new(Conn {
            stdin: tokio::sync::Mutex::new(Some(stdin)),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            file_events: Mutex::new(None),
        });
        let reader = conn.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                reader.dispatch(&line);
            }
            reader.fail_all();
        });
        Ok(Client {
            conn,
            child: tokio::sync::Mutex::new(Some(child)),
            binary: config.binary,
            vm_id: Mutex::new(None),
            ingress_hooks: Mutex::new(None),
        })
    }

    /// The current sandbox's id, once created.
    pub fn vm_id(&self) -> Option<String> {
        self.vm_id.lock().unwrap().clone()
    }

    async fn call(&self, method: &str, params: Value, streaming: bool) -> Result<Call, Error> {
        if self.conn.closed.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let id = self.conn.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        let (ntx, nrx) = if streaming {
            let (a, b) = mpsc::unbounded_channel();
            (Some(a), Some(b))
        } else {
            (None, None)
        };
        self.conn.pending.lock().unwrap().insert(
            id,
            Pending {
                reply: tx,
                notes: ntx,
            },
        );
        let msg = json!({"jsonrpc": "2.0", "method": method, "id": id, "params": params});
        if let Err(e) = self.conn.write(&msg).await {
            self.conn.pending.lock().unwrap().remove(&id);
            return Err(e);
        }
        Ok(Call {
            id,
            reply: rx,
            notes: nrx,
        })
    }

    async fn notify(&self, method: &str, params: Value) -> Result<(), Error> {
        self.conn
            .write(&json!({"jsonrpc": "2.0", "method": method, "params": params}))
            .await
    }

    /// Waits for a call's result; past `timeout`, cancels it in the server (which kills the
    /// command) and returns [`Error::Timeout`].
    async fn finish(
        &self,
        method: &str,
        call: Call,
        timeout: Option<Duration>,
    ) -> Result<Value, Error> {
        let id = call.id;
        let reply = call.reply;
        match timeout {
            None => reply.await.unwrap_or(Err(Error::Closed)),
            Some(t) => match tokio::time::timeout(t, reply).await {
                Ok(r) => r.unwrap_or(Err(Error::Closed)),
                Err(_) => {
                    self.cancel(id).await;
                    Err(Error::Timeout(method.to_string()))
                }
            },
        }
    }

    async fn cancel(&self, id: u64) {
        self.conn.pending.lock().unwrap().remove(&id);
        let cancel_id = self.conn.next_id.fetch_add(1, Ordering::SeqCst);
        let _ = self
            .conn
            .write(&json!({"jsonrpc": "2.0", "method": "cancel", "id": cancel_id, "params": {"id": id}}))
            .await;
    }

    async fn request(
        &self,
        method: &str,
        params: Value,
        timeout: Option<Duration>,
    ) -> Result<Value, Error> {
        let call = self.call(method, params, false).await?;
        self.finish(method, call, timeout).await
    }

    /// Creates the sandbox (replacing any previous one of this client) and applies its port
    /// forwards. Returns its id. Creating pulls nothing yet: the image must be in the local store.
    pub async fn create(&self, sandbox: &Sandbox) -> Result<String, Error> {
        self.create_inner(sandbox, false).await
    }

    /// Like [`Client::create`], then starts the image's ENTRYPOINT/CMD in the background (its
    /// output goes to the sandbox log). Fails if it exits non-zero right away.
    pub async fn launch(&self, sandbox: &Sandbox) -> Result<String, Error> {
        self.create_inner(sandbox, true).await
    }

    async fn create_inner(&self, sandbox: &Sandbox, launch: bool) -> Result<String, Error> {
        if sandbox.image().trim().is_empty() {
            return Err(Error::Invalid(
                "image is required (e.g., alpine:latest)".into(),
            ));
        }
        let result = self
            .request("create", sandbox.to_params(launch), None)
            .await?;
        let id = result
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::Protocol("create returned no id".into()))?
            .to_string();
        *self.vm_id.lock().unwrap() = Some(id.clone());
        if !sandbox.port_forwards.is_empty() {
            self.port_forward_with_addresses(
                &sandbox.port_forward_addresses,
                &sandbox.port_forwards,
            )
            .await?;
        }
        Ok(id)
    }

    fn exec_params(command: &str, opts: &ExecOptions) -> Value {
        let mut p = json!({ "command": command });
        if let Some(w) = &opts.working_dir {
            p["working_dir"] = json!(w);
        }
        if let Some(u) = &opts.user {
            p["user"] = json!(u);
        }
        p
    }

    /// Runs `command` with `sh -c` and returns its whole output.
    pub async fn exec(&self, command: &str) -> Result<ExecResult, Error> {
        self.exec_with(command, &ExecOptions::default()).await
    }

    /// [`Client::exec`] with options.
    pub async fn exec_with(&self, command: &str, opts: &ExecOptions) -> Result<ExecResult, Error> {
        let r = self
            .request("exec", Self::exec_params(command, opts), opts.timeout)
            .await?;
        Ok(ExecResult {
            exit_code: int(&r, "exit_code")? as i32,
            stdout: b64_field(&r, "stdout")?,
            stderr: b64_field(&r, "stderr")?,
            duration_ms: int(&r, "duration_ms")? as u64,
        })
    }

    /// Runs `command`, writing its output to `stdout` and `stderr` as it arrives.
    pub async fn exec_stream<O, E>(
        &self,
        command: &str,
        opts: &ExecOptions,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExitInfo, Error>
    where
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let call = self
            .call("exec_stream", Self::exec_params(command, opts), true)
            .await?;
        self.pump::<tokio::io::Empty, _, _>(
            "exec_stream",
            call,
            opts.timeout,
            None,
            stdout,
            stderr,
            None,
        )
        .await
    }

    /// Runs `command` with `stdin` fed from a reader (no terminal), streaming its output.
    pub async fn exec_pipe<I, O, E>(
        &self,
        command: &str,
        opts: &ExecOptions,
        stdin: I,
        stdout: &mut O,
        stderr: &mut E,
    ) -> Result<ExitInfo, Error>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let call = self
            .call("exec_pipe", Self::exec_params(command, opts), true)
            .await?;
        self.pump(
            "exec_pipe",
            call,
            opts.timeout,
            Some(stdin),
            stdout,
            stderr,
            None,
        )
        .await
    }

    /// Runs `command` on a terminal of `rows` x `cols`; `resize` delivers new sizes while it runs.
    /// The terminal merges stderr into `stdout`.
    #[allow(clippy::too_many_arguments)]
    pub async fn exec_interactive<I, O>(
        &self,
        command: &str,
        opts: &ExecOptions,
        stdin: I,
        stdout: &mut O,
        rows: u16,
        cols: u16,
        resize: Option<mpsc::Receiver<(u16, u16)>>,
    ) -> Result<ExitInfo, Error>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
    {
        let mut p = Self::exec_params(command, opts);
        p["rows"] = json!(rows);
        p["cols"] = json!(cols);
        let call = self.call("exec_tty", p, true).await?;
        let mut sink = tokio::io::sink();
        self.pump(
            "exec_tty",
            call,
            opts.timeout,
            Some(stdin),
            stdout,
            &mut sink,
            resize,
        )
        .await
    }

    /// Drives a streaming call: forwards stdin after `ready`, writes output notifications and
    /// returns the final result.
    #[allow(clippy::too_many_arguments)]
    async fn pump<I, O, E>(
        &self,
        method: &str,
        call: Call,
        timeout: Option<Duration>,
        stdin: Option<I>,
        stdout: &mut O,
        stderr: &mut E,
        mut resize: Option<mpsc::Receiver<(u16, u16)>>,
    ) -> Result<ExitInfo, Error>
    where
        I: AsyncRead + Unpin + Send + 'static,
        O: AsyncWrite + Unpin,
        E: AsyncWrite + Unpin,
    {
        let Call {
            id,
            mut reply,
            notes,
        } = call;
        let mut notes = notes.ok_or_else(|| Error::Protocol("no notification channel".into()))?;
        let mut stdin = stdin;
        let mut feeder: Option<tokio::task::JoinHandle<()>> = None;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let out_method = format!("{method}.stdout");
        let err_method = format!("{method}.stderr");
        let ready_method = format!("{method}.ready");
        let result = loop {
            tokio::select! {
                r = &mut reply => break r.unwrap_or(Err(Error::Closed)),
                Some((m, params)) = notes.recv() => {
                    if m == ready_method {
                        if let Some(input) = stdin.take() {
                            feeder = Some(self.feed(method, id, input));
                        }
                    } else if m == out_method || m == err_method {
                        let data = B64.decode(params.get("data").and_then(Value::as_str).unwrap_or("").as_bytes())
                            .map_err(|e| Error::Protocol(format!("bad base64 from server: {e}")))?;
                        let w: &mut (dyn AsyncWrite + Unpin) = if m == out_method { stdout } else { stderr };
                        w.write_all(&data).await.map_err(Error::io("writing command output"))?;
                        let _ = w.flush().await;
                    }
                }
                Some((rows, cols)) = async { match resize.as_mut() { Some(r) => r.recv().await, None => std::future::pending().await } } => {
                    let _ = self.notify("exec_tty.resize", json!({"id": id, "rows": rows, "cols": cols})).await;
                }
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                    self.cancel(id).await;
                    break Err(Error::Timeout(method.to_string()));
                }
            }
        };
        if let Some(f) = feeder {
            f.abort();
        }
        // Output notifications precede the result on the wire; deliver any still queued.
        while let Ok((m, params)) = notes.try_recv() {
            if m == out_method || m == err_method {
                if let Ok(data) = B64.decode(
                    params
                        .get("data")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .as_bytes(),
                ) {
                    let w: &mut (dyn AsyncWrite + Unpin) =
                        if m == out_method { stdout } else { stderr };
                    let _ = w.write_all(&data).await;
                }
            }
        }
        let _ = stdout.flush().await;
        let r = result?;
        Ok(ExitInfo {
            exit_code: int(&r, "exit_code")? as i32,
            duration_ms: int(&r, "duration_ms")? as u64,
        })
    }

    /// Copies `input` into `<method>.stdin` notifications, then `<method>.stdin_eof`.
    fn feed<I>(&self, method: &str, id: u64, mut input: I) -> tokio::task::JoinHandle<()>
    where
        I: AsyncRead + Unpin + Send + 'static,
    {
        let conn = self.conn.clone();
        let data_method = format!("{method}.stdin");
        let eof_method = format!("{method}.stdin_eof");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = input.read(&mut buf).await.unwrap_or(0);
                let msg = if n == 0 {
                    json!({"jsonrpc": "2.0", "method": eof_method, "params": {"id": id}})
                } else {
                    json!({"jsonrpc": "2.0", "method": data_method, "params": {"id": id, "data": B64.encode(&buf[..n])}})
                };
                if conn.write(&msg).await.is_err() || n == 0 {
                    return;
                }
            }
        })
    }

    /// Writes `content` to `path` in the sandbox (parents are created), with permission `mode`.
    pub async fn write_file(
        &self,
        path: &str,
        content: impl AsRef<[u8]>,
        mode: u32,
    ) -> Result<(), Error> {
        let p = json!({"path": path, "content": B64.encode(content.as_ref()), "mode": mode});
        self.request("write_file", p, None).await.map(|_| ())
    }

    /// Reads the file at `path`.
    pub async fn read_file(&self, path: &str) -> Result<Vec<u8>, Error> {
        let r = self
            .request("read_file", json!({ "path": path }), None)
            .await?;
        b64_field(&r, "content")
    }

    /// Lists the directory at `path`.
    pub async fn list_files(&self, path: &str) -> Result<Vec<FileInfo>, Error> {
        let r = self
            .request("list_files", json!({ "path": path }), None)
            .await?;
        serde_json::from_value(r.get("files").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::Protocol(format!("list_files: {e}")))
    }

    /// The sandbox's console and background-command log.
    pub async fn log(&self) -> Result<String, Error> {
        let r = self.request("log", json!({}), None).await?;
        Ok(String::from_utf8_lossy(&b64_field(&r, "content")?).into_owned())
    }

    /// Saves the sandbox's memory and devices to disk and ends its VM, releasing the host memory;
    /// processes, files and open connections in the guest are kept. Execs fail until
    /// [`Client::resume`]. Sandboxes with workspace mounts cannot be paused.
    pub async fn pause(&self) -> Result<(), Error> {
        self.request("pause", json!({}), None).await.map(|_| ())
    }

    /// Continues a paused sandbox where it stopped (its clock set to now).
    pub async fn resume(&self) -> Result<(), Error> {
        self.request("resume", json!({}), None).await.map(|_| ())
    }

    /// Forwards host ports to guest ports on `127.0.0.1`, replacing earlier forwards.
    pub async fn port_forward(
        &self,
        forwards: &[(u16, u16)],
    ) -> Result<Vec<PortForwardBinding>, Error> {
        self.port_forward_with_addresses(&[], forwards).await
    }

    /// Forwards host ports to guest ports on the given host addresses.
    pub async fn port_forward_with_addresses(
        &self,
        addresses: &[String],
        forwards: &[(u16, u16)],
    ) -> Result<Vec<PortForwardBinding>, Error> {
        let f: Vec<Value> = forwards
            .iter()
            .map(|(l, r)| json!({"local_port": l, "remote_port": r}))
            .collect();
        let mut p = json!({ "forwards": f });
        if !addresses.is_empty() {
            p["addresses"] = json!(addresses);
        }
        let r = self.request("port_forward", p, None).await?;
        serde_json::from_value(r.get("bindings").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::Protocol(format!("port_forward: {e}")))
    }

    /// Starts the ingress gateway: a host-local HTTP server (HTTP/1.1 and h2) routing by path
    /// prefix to servers on the sandbox's loopback, with `opts`' routes and hooks. Replaces a
    /// running gateway.
    pub async fn enable_ingress(&self, opts: &IngressOptions) -> Result<Ingress, Error> {
        let hooks = if opts.has_hooks() {
            Some(crate::ingress::HookServer::start(opts)?)
        } else {
            None
        };
        let params = opts.params(hooks.as_ref().map(|h| h.socket()).as_deref());
        let params = serde_json::to_value(params)
            .map_err(|e| Error::Protocol(format!("enable_ingress: {e}")))?;
        let r = self.request("enable_ingress", params, None).await?;
        *self.ingress_hooks.lock().unwrap() = hooks;
        serde_json::from_value::<IngressAddress>(r)
            .map(|a| Ingress {
                url: a.url,
                address: a.address,
                port: a.port,
            })
            .map_err(|e| Error::Protocol(format!("enable_ingress: {e}")))
    }

    /// Replaces the ingress routes (the sandbox's routes file, and a running gateway's table).
    pub async fn set_ingress_routes(&self, routes: &[IngressRoute]) -> Result<(), Error> {
        self.request("set_ingress_routes", json!({ "routes": routes }), None)
            .await
            .map(|_| ())
    }

    /// The ingress routes as the sandbox's routes file has them now.
    pub async fn ingress_routes(&self) -> Result<Vec<IngressRoute>, Error> {
        let r = self.request("get_ingress_routes", json!({}), None).await?;
        serde_json::from_value(r.get("routes").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::Protocol(format!("get_ingress_routes: {e}")))
    }

    /// Stops the ingress gateway.
    pub async fn disable_ingress(&self) -> Result<(), Error> {
        self.request("disable_ingress", json!({}), None).await?;
        self.ingress_hooks.lock().unwrap().take();
        Ok(())
    }

    /// Starts the sandbox's SSH server on `127.0.0.1` (a free port) for the guest user `user`:
    /// OpenSSH's `ssh`, `scp`, `sftp` (when the image has `sftp-server`) and `ssh -L` then work
    /// with [`SshAccess::command`] or [`SshAccess::args`], and the image needs no sshd. Replaces
    /// a running server.
    pub async fn enable_ssh(&self, user: &str) -> Result<SshAccess, Error> {
        let r = self
            .request("enable_ssh", json!({ "user": user }), None)
            .await?;
        serde_json::from_value(r).map_err(|e| Error::Protocol(format!("enable_ssh: {e}")))
    }

    /// Stops the SSH server (open sessions end).
    pub async fn disable_ssh(&self) -> Result<(), Error> {
        self.request("disable_ssh", json!({}), None)
            .await
            .map(|_| ())
    }

    /// Stops the sandbox (processes get part of `timeout` to exit on SIGTERM) and ends the server.
    pub async fn close(&self, timeout: Duration) -> Result<(), Error> {
        let secs = timeout.as_secs_f64().max(0.001);
        let result = if self.conn.closed.load(Ordering::SeqCst) {
            Ok(Value::Null)
        } else {
            self.request(
                "close",
                json!({ "timeout_seconds": secs }),
                Some(timeout + Duration::from_secs(5)),
            )
            .await
        };
        // End of input tells the server to exit.
        self.conn.stdin.lock().await.take();
        if let Some(mut child) = self.child.lock().await.take() {
            if tokio::time::timeout(timeout + Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
        result.map(|_| ())
    }

    /// Deletes the stopped sandbox's state (`matchlock rm`). Call after [`Client::close`].
    pub async fn remove(&self) -> Result<(), Error> {
        let Some(id) = self.vm_id() else {
            return Ok(());
        };
        self.cli(&["rm", &id]).await.map(|_| ())
    }

    async fn cli(&self, args: &[&str]) -> Result<String, Error> {
        let out = tokio::process::Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(Error::io(format!("running {}", self.binary.display())))?;
        if !out.status.success() {
            return Err(Error::Rpc {
                code: crate::error::code::VM_FAILED,
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a named ext4 volume of `size_mb` MiB.
    pub async fn volume_create(&self, name: &str, size_mb: u64) -> Result<VolumeInfo, Error> {
        let out = self
            .cli(&[
                "volume",
                "create",
                name,
                "--size",
                &size_mb.to_string(),
                "--json",
            ])
            .await?;
        serde_json::from_str(out.trim()).map_err(|e| Error::Protocol(format!("volume create: {e}")))
    }

    /// Lists named volumes.
    pub async fn volume_list(&self) -> Result<Vec<VolumeInfo>, Error> {
        let out = self.cli(&["volume", "ls", "--json"]).await?;
        serde_json::from_str(out.trim()).map_err(|e| Error::Protocol(format!("volume ls: {e}")))
    }

    /// Removes a named volume.
    pub async fn volume_remove(&self, name: &str) -> Result<(), Error> {
        self.cli(&["volume", "rm", name]).await.map(|_| ())
    }
}

fn int(v: &Value, key: &str) -> Result<i64, Error> {
    v.get(key)
        .and_then(Value::as_i64)
        .ok_or_else(|| Error::Protocol(format!("missing {key} in the server's reply")))
}

fn b64_field(v: &Value, key: &str) -> Result<Vec<u8>, Error> {
    let s = v
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Protocol(format!("missing {key} in the server's reply")))?;
    B64.decode(s.as_bytes())
        .map_err(|e| Error::Protocol(format!("bad base64 in {key}: {e}")))
}
