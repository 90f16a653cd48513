//! The request loop and the method handlers.
//!
//! Concurrency follows Matchlock's server (reference §3.3): `cancel` and the stdin/resize
//! notifications are handled inline, in arrival order; every other request runs as its own task
//! with a cancellation token registered under its id. `create` and `close` first cancel what is in
//! flight (it targets the sandbox they replace) and are serialised with each other.

use crate::wire::{self, code, Incoming, Line, RpcError};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use matchlock_ingress::{Gateway, IngressParams, IngressRoute};
use matchlock_proto::{read_msg, write_msg, Msg, WinSize};
use matchlock_sandbox::control::ExecSpec;
use matchlock_sandbox::forward::{Forwarder, PortMap};
use matchlock_sandbox::{Client, Store};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::io::{AsyncBufRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest output `exec` buffers per stream; beyond it the command is stopped and the call fails
/// (use `exec_stream` for big outputs). Keeps one chatty command from exhausting the host.
const MAX_EXEC_OUTPUT: usize = 64 << 20;
/// Largest file `read_file` returns (its reply is one JSON line).
const MAX_READ_FILE: u64 = 48 << 20;
/// How long `launch_entrypoint` watches the entrypoint for an early failure (as Matchlock).
const LAUNCH_SETTLE_MS: u64 = 500;
/// Queued stdin chunks per exec before the read loop waits (as Matchlock).
const STDIN_QUEUE: usize = 64;

/// Input for a running `exec_pipe`/`exec_tty`.
enum Input {
    Data(Vec<u8>),
    Eof,
    Resize(WinSize),
}

/// A request in flight.
struct Inflight {
    cancel: CancellationToken,
    input: Option<mpsc::Sender<Input>>,
}

/// The sandbox this server manages.
struct Vm {
    client: Client,
    forwards: Option<Forwarder>,
    ingress: Option<Arc<Gateway<Client>>>,
    ssh: Option<matchlock_ssh::SshServer>,
}

/// Serialises lines onto stdout; one writer task owns it.
#[derive(Clone)]
struct Out(mpsc::Sender<Value>);

impl Out {
    async fn send(&self, v: Value) {
        let _ = self.0.send(v).await;
    }

    async fn notify(&self, method: &str, params: Value) {
        self.send(wire::notification(method, params)).await;
    }
}

struct Shared {
    out: Out,
    store: Store,
    vm: Mutex<Option<Vm>>,
    /// Id of the last sandbox, for `log` after `close`.
    last_id: Mutex<Option<String>>,
    inflight: Mutex<HashMap<String, Inflight>>,
    /// Serialises `create`, `close` and the final cleanup.
    lifecycle: tokio::sync::Mutex<()>,
    closed: std::sync::atomic::AtomicBool,
}

fn key(id: &Value) -> String {
    id.to_string()
}

impl Shared {
    fn client(&self) -> Result<Client, RpcError> {
        self.vm
            .lock()
            .unwrap()
            .as_ref()
            .map(|v| v.client.clone())
            .ok_or_else(|| RpcError::new(code::VM_FAILED, "VM not created"))
    }

    fn cancel_all(&self) {
        for f in self.inflight.lock().unwrap().values() {
            f.cancel.cancel();
        }
    }

    /// Stops the current sandbox, if any.
    async fn stop_vm(&self, grace_ms: u64) -> Result<(), RpcError> {
        let vm = self.vm.lock().unwrap().take();
        if let Some(mut vm) = vm {
            vm.forwards.take();
            vm.ingress.take();
            vm.ssh.take();
            vm.client
                .stop(Some(grace_ms))
                .await
                .map_err(|e| RpcError::new(code::VM_FAILED, format!("close: {e}")))?;
        }
        Ok(())
    }
}

/// Why the server stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Standard input ended (the SDK closed it or died).
    Eof,
    /// `close` was called.
    Closed,
    /// SIGTERM, SIGINT or SIGHUP.
    Signal,
    /// Standard output failed (the SDK is gone).
    OutputFailed,
}

/// Serves requests from `input`, writing responses and notifications to `output`, until input
/// ends, `close` completes, a signal arrives or output fails. The sandbox, if one is still up, is
/// stopped before returning.
pub async fn serve<R, W>(input: R, mut output: W, store: Store) -> End
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Value>(1024);
    let out_failed = CancellationToken::new();
    let failed = out_failed.clone();
    let writer = tokio::spawn(async move {
        while let Some(v) = rx.recv().await {
            let mut line = serde_json::to_vec(&v).unwrap_or_default();
            line.push(b'\n');
            if output.write_all(&line).await.is_err() || output.flush().await.is_err() {
                failed.cancel();
                // Keep draining so senders never block on a dead client.
                while rx.recv().await.is_some() {}
                return;
            }
        }
    });
    let shared = Arc::new(Shared {
        out: Out(tx),
        store,
        vm: Mutex::new(None),
        last_id: Mutex::new(None),
        inflight: Mutex::new(HashMap::new()),
        lifecycle: tokio::sync::Mutex::new(()),
        closed: std::sync::atomic::AtomicBool::new(false),
    });
    let mut input = input;
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigs: Vec<_> = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
    ]
    .into_iter()
    .filter_map(|k| signal(k).ok())
    .collect();
    let signalled = async {
        let waits = sigs.iter_mut().map(|s| Box::pin(s.recv()));
        if waits.len() == 0 {
            std::future::pending::<()>().await;
        }
        futures_select_any(waits).await;
    };
    tokio::pin!(signalled);
    let end = loop {
        if shared.closed.load(std::sync::atomic::Ordering::SeqCst) {
            break End::Closed;
        }
        let line = tokio::select! {
            l = wire::read_line(&mut input) => l,
            _ = &mut signalled => break End::Signal,
            _ = out_failed.cancelled() => break End::OutputFailed,
        };
        match line {
            Ok(None) | Err(_) => break End::Eof,
            Ok(Some(Line::Invalid)) => {
                shared
                    .out
                    .send(wire::error(
                        None,
                        &RpcError::new(code::PARSE, "Parse error"),
                    ))
                    .await
            }
            Ok(Some(Line::TooLong { id, len })) => {
                let e = RpcError::params(format!(
                    "request of {len} bytes exceeds the {} MiB line limit; send large files in several write_file calls or attach a volume",
                    wire::MAX_LINE >> 20
                ));
                shared.out.send(wire::error(id.as_ref(), &e)).await
            }
            Ok(Some(Line::Request(req))) => dispatch(&shared, req).await,
        }
    };
    // Cleanup: whatever ended the loop, no sandbox outlives the server.
    shared.cancel_all();
    {
        let _guard = shared.lifecycle.lock().await;
        let _ = shared.stop_vm(0).await;
    }
    drop(shared);
    let _ = writer.await;
    end
}

/// Resolves when any of `futs` does (a tiny `select_all` so the crate needs no `futures`).
async fn futures_select_any<F: std::future::Future + Unpin>(futs: impl Iterator<Item = F>) {
    let mut futs: Vec<F> = futs.collect();
    std::future::poll_fn(|cx| {
        for f in futs.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

#[derive(Deserialize)]
struct IdParam {
    id: Value,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DataParam {
    id: Value,
    data: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ResizeParam {
    id: Value,
    rows: u16,
    cols: u16,
}

async fn dispatch(shared: &Arc<Shared>, req: Incoming) {
    let Incoming { id, method, params } = req;
    match method.as_str() {
        // Notifications that feed a running exec: inline, in order, never answered.
        "exec_pipe.stdin" | "exec_tty.stdin" => {
            if let Ok(p) = serde_json::from_value::<DataParam>(params) {
                if let Ok(data) = B64.decode(p.data.as_bytes()) {
                    feed(shared, &p.id, Input::Data(data)).await;
                }
            }
        }
        "exec_pipe.stdin_eof" | "exec_tty.stdin_eof" => {
            if let Ok(p) = serde_json::from_value::<IdParam>(params) {
                feed(shared, &p.id, Input::Eof).await;
            }
        }
        "exec_tty.resize" => {
            if let Ok(p) = serde_json::from_value::<ResizeParam>(params) {
                let size = WinSize {
                    rows: p.rows.max(1),
                    cols: p.cols.max(1),
                };
                feed(shared, &p.id, Input::Resize(size)).await;
            }
        }
        "cancel" => {
            let Some(id) = id else { return };
            let result = match serde_json::from_value::<IdParam>(params) {
                Ok(p) => {
                    let found = shared
                        .inflight
                        .lock()
                        .unwrap()
                        .get(&key(&p.id))
                        .map(|f| f.cancel.clone());
                    if let Some(c) = &found {
                        c.cancel();
                    }
                    Ok(json!({"cancelled": found.is_some()}))
                }
                Err(e) => Err(RpcError::params(format!("invalid cancel params: {e}"))),
            };
            reply(&shared.out, &id, result).await;
        }
        _ => {
            let streaming = matches!(method.as_str(), "exec_pipe" | "exec_tty" | "log_stream");
            let Some(id) = id else {
                if streaming {
                    let e =
                        RpcError::new(code::INVALID_REQUEST, format!("{method} requires an id"));
                    shared.out.send(wire::error(None, &e)).await;
                }
                // Other notifications for request methods are ignored: nobody awaits a reply.
                return;
            };
            if !KNOWN.contains(&method.as_str()) {
                let e = RpcError::new(code::METHOD_NOT_FOUND, "Method not found");
                shared.out.send(wire::error(Some(&id), &e)).await;
                return;
            }
            let cancel = CancellationToken::new();
            let (input_tx, input_rx) = if matches!(method.as_str(), "exec_pipe" | "exec_tty") {
                let (tx, rx) = mpsc::channel(STDIN_QUEUE);
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            shared.inflight.lock().unwrap().insert(
                key(&id),
                Inflight {
                    cancel: cancel.clone(),
                    input: input_tx,
                },
            );
            let shared2 = shared.clone();
            let task = async move {
                let lifecycle = matches!(method.as_str(), "create" | "close");
                let work = handle(&shared2, &method, &id, params, input_rx);
                let result = if lifecycle {
                    // Never abandoned half-way: a create cut short would leave a booting
                    // sandbox nobody tracks.
                    work.await
                } else {
                    tokio::select! {
                        r = work => r,
                        _ = cancel.cancelled() => Err(RpcError::new(code::CANCELLED, "request cancelled")),
                    }
                };
                shared2.inflight.lock().unwrap().remove(&key(&id));
                reply(&shared2.out, &id, result).await;
            };
            tokio::spawn(task);
        }
    }
}

const KNOWN: &[&str] = &[
    "create",
    "exec",
    "exec_stream",
    "exec_pipe",
    "exec_tty",
    "write_file",
    "read_file",
    "list_files",
    "log",
    "log_stream",
    "port_forward",
    "allow_list_add",
    "allow_list_delete",
    "pause",
    "resume",
    "enable_ingress",
    "set_ingress_routes",
    "get_ingress_routes",
    "disable_ingress",
    "enable_ssh",
    "disable_ssh",
    "close",
];

async fn feed(shared: &Shared, id: &Value, input: Input) {
    let tx = shared
        .inflight
        .lock()
        .unwrap()
        .get(&key(id))
        .and_then(|f| f.input.clone());
    if let Some(tx) = tx {
        // Back-pressure: waits while the command does not read its stdin, as Matchlock does.
        let _ = tx.send(input).await;
    }
}

async fn reply(out: &Out, id: &Value, result: Result<Value, RpcError>) {
    out.send(match result {
        Ok(v) => wire::response(id, v),
        Err(e) => wire::error(Some(id), &e),
    })
    .await
}

fn parse<T: for<'de> Deserialize<'de>>(method: &str, params: Value) -> Result<T, RpcError> {
    let params = if params.is_null() {
        Value::Object(Default::default())
    } else {
        params
    };
    serde_json::from_value(params)
        .map_err(|e| RpcError::params(format!("invalid {method} params: {e}")))
}

async fn handle(
    shared: &Arc<Shared>,
    method: &str,
    id: &Value,
    params: Value,
    input: Option<mpsc::Receiver<Input>>,
) -> Result<Value, RpcError> {
    match method {
        "create" => create(shared, id, params).await,
        "close" => close(shared, id, params).await,
        "exec" | "exec_stream" | "exec_pipe" | "exec_tty" => {
            exec(shared, method, id, parse(method, params)?, input).await
        }
        "write_file" => write_file(shared, parse(method, params)?).await,
        "read_file" => read_file(shared, parse(method, params)?).await,
        "list_files" => list_files(shared, parse(method, params)?).await,
        "log" => log(shared).await,
        "log_stream" => log_stream(shared, id).await,
        "port_forward" => port_forward(shared, parse(method, params)?).await,
        "allow_list_add" | "allow_list_delete" => {
            allow_list(shared, method, parse(method, params)?).await
        }
        "pause" | "resume" => pause(shared, method == "resume").await,
        "enable_ingress" => enable_ingress(shared, parse(method, params)?).await,
        "set_ingress_routes" => set_ingress_routes(shared, parse(method, params)?).await,
        "get_ingress_routes" => get_ingress_routes(shared).await,
        "disable_ingress" => {
            if let Some(vm) = shared.vm.lock().unwrap().as_mut() {
                vm.ingress.take();
            }
            Ok(json!({}))
        }
        "enable_ssh" => enable_ssh(shared, parse(method, params)?).await,
        "disable_ssh" => {
            if let Some(vm) = shared.vm.lock().unwrap().as_mut() {
                vm.ssh.take();
            }
            Ok(json!({}))
        }
        _ => Err(RpcError::new(code::METHOD_NOT_FOUND, "Method not found")),
    }
}

async fn create(shared: &Arc<Shared>, id: &Value, params: Value) -> Result<Value, RpcError> {
    let params: matchlock_api::wire::CreateParams = serde_json::from_value(if params.is_null() {
        Value::Object(Default::default())
    } else {
        params
    })
    .map_err(|e| RpcError::params(format!("invalid create params: {e}")))?;
    let mut req = params.into_request().map_err(|e| RpcError::params(e.0))?;
    // The sandbox is this server's: it stops when the server does.
    req.owner_pid = Some(std::process::id());
    let emit_events = req.workspace.emit_events;
    let _guard = shared.lifecycle.lock().await;
    // A second create replaces the sandbox (Matchlock leaks the first): what ran against the
    // old one ends with it.
    if shared.vm.lock().unwrap().is_some() {
        cancel_others(shared, id);
        shared.stop_vm(0).await?;
    }
    let store = shared.store.clone();
    // Image resolution and the boot are blocking (file I/O, the supervisor's ready pipe).
    let started =
        tokio::task::spawn_blocking(move || -> Result<(String, Option<Vec<String>>), RpcError> {
            let images = matchlock_image::ImageStore::open_default()
                .map_err(|e| RpcError::new(code::VM_FAILED, e.to_string()))?;
            // Pulled when missing, as `run` does; progress goes to stderr, never to the protocol.
            let image = images
                .ensure(
                    &req.image,
                    matchlock_image::PullPolicy::Missing,
                    &matchlock_image::PullOptions::from_env(),
                    &matchlock_image::StderrProgress::new(),
                )
                .map_err(|e| RpcError::new(code::VM_FAILED, e.to_string()))?;
            let plan = matchlock_sandbox::plan(req, &image, &store).map_err(|e| match e {
                // What the caller asked for is wrong: their parameters, not the VM.
                matchlock_sandbox::SandboxError::Invalid(_)
                | matchlock_sandbox::SandboxError::Vmm(matchlock_vmm::VmmError::BadKernel(_)) => {
                    RpcError::params(e.to_string())
                }
                e => RpcError::new(code::VM_FAILED, e.to_string()),
            })?;
            let id = matchlock_sandbox::start_with_secrets(&store, plan.config, &plan.secrets)
                .map_err(|e| RpcError::new(code::VM_FAILED, e.to_string()))?;
            Ok((id, plan.command))
        })
        .await
        .map_err(|e| RpcError::new(code::VM_FAILED, format!("create failed: {e}")))?;
    let (vm_id, launch) = started?;
    let client = Client::for_sandbox(&shared.store, &vm_id)
        .map_err(|e| RpcError::new(code::VM_FAILED, e.to_string()))?;
    *shared.last_id.lock().unwrap() = Some(vm_id.clone());
    *shared.vm.lock().unwrap() = Some(Vm {
        client: client.clone(),
        forwards: None,
        ingress: None,
        ssh: None,
    });
    if emit_events {
        // Subscribed before create answers, so no operation the client causes goes unreported.
        let mut events = match client.events().await {
            Ok(e) => e,
            Err(e) => {
                let _ = shared.stop_vm(0).await;
                return Err(RpcError::new(code::VM_FAILED, e.to_string()));
            }
        };
        let out = shared.out.clone();
        tokio::spawn(async move {
            // Ends when the sandbox stops (replaced or closed).
            while let Some(e) = events.next().await {
                out.notify("event", file_event(&e)).await;
            }
        });
    }
    if let Some(argv) = launch {
        let spec = ExecSpec {
            argv,
            ..Default::default()
        };
        if let Err(e) = client.launch(spec, LAUNCH_SETTLE_MS).await {
            let _ = shared.stop_vm(0).await;
            return Err(RpcError::new(
                code::VM_FAILED,
                format!("start image entrypoint: {e}"),
            ));
        }
    }
    Ok(json!({ "id": vm_id }))
}

/// An `event` notification's params for a workspace operation, as Matchlock sends them
/// (`timestamp` in milliseconds for file events; `mode`/`uid`/`gid` omitted when zero).
fn file_event(e: &matchlock_vfs::FileEvent) -> Value {
    let mut file = json!({"op": e.op, "path": e.path, "size": e.size});
    for (k, v) in [("mode", e.mode), ("uid", e.uid), ("gid", e.gid)] {
        if v != 0 {
            file[k] = json!(v);
        }
    }
    json!({"type": "file", "timestamp": e.timestamp_ms, "file": file})
}

/// Cancels every request in flight except `me`.
fn cancel_others(shared: &Shared, me: &Value) {
    let me = key(me);
    for (k, f) in shared.inflight.lock().unwrap().iter() {
        if *k != me {
            f.cancel.cancel();
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CloseParams {
    timeout_seconds: f64,
}

async fn close(shared: &Arc<Shared>, id: &Value, params: Value) -> Result<Value, RpcError> {
    let p: CloseParams = parse("close", params)?;
    shared
        .closed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    cancel_others(shared, id);
    let _guard = shared.lifecycle.lock().await;
    // Processes get half the caller's budget to exit on SIGTERM; the rest is for the power-off.
    let grace_ms = if p.timeout_seconds.is_finite() && p.timeout_seconds > 0.0 {
        ((p.timeout_seconds * 1000.0) as u64 / 2).min(60_000)
    } else {
        0
    };
    shared.stop_vm(grace_ms).await?;
    Ok(json!({}))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ExecParams {
    command: String,
    working_dir: String,
    user: String,
    rows: u16,
    cols: u16,
}

/// `exec` (buffered), `exec_stream` (output as notifications), `exec_pipe` (plus stdin) and
/// `exec_tty` (a terminal).
async fn exec(
    shared: &Arc<Shared>,
    method: &str,
    id: &Value,
    p: ExecParams,
    input: Option<mpsc::Receiver<Input>>,
) -> Result<Value, RpcError> {
    let client = shared.client()?;
    if p.command.is_empty() {
        return Err(RpcError::params("command is required"));
    }
    if !p.working_dir.is_empty() {
        matchlock_sandbox::validate::guest_path(&p.working_dir, "working_dir")
            .map_err(RpcError::params)?;
    }
    if !p.user.is_empty() {
        matchlock_sandbox::validate::user(&p.user, "user").map_err(RpcError::params)?;
    }
    let tty = (method == "exec_tty").then_some(WinSize {
        rows: if p.rows == 0 { 24 } else { p.rows },
        cols: if p.cols == 0 { 80 } else { p.cols },
    });
    let spec = ExecSpec {
        argv: vec!["sh".into(), "-c".into(), p.command],
        env: Vec::new(),
        cwd: Some(p.working_dir).filter(|w| !w.is_empty()),
        user: Some(p.user).filter(|u| !u.is_empty()),
        tty,
        stdin: input.is_some(),
        ..Default::default()
    };
    let out = &shared.out;
    // The SDK waits for `ready` before it sends any stdin.
    if input.is_some() {
        out.notify(&format!("{method}.ready"), json!({ "id": id }))
            .await;
    }
    let started = Instant::now();
    let stream = client
        .exec(spec)
        .await
        .map_err(|e| RpcError::new(code::EXEC_FAILED, e.to_string()))?;
    let (mut rd, mut wr) = stream.into_split();
    let mut input = input;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut guest_error: Option<String> = None;
    let buffered = method == "exec";
    let exit = loop {
        let msg = tokio::select! {
            m = read_msg(&mut rd) => m,
            i = async { match input.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                let msg = match i {
                    Some(Input::Data(d)) => Msg::Stdin(d),
                    Some(Input::Eof) => Msg::StdinEof,
                    Some(Input::Resize(sz)) => Msg::Resize(sz),
                    // The request is done with input; keep the write half open (closing it would
                    // make the guest kill the command).
                    None => { input = None; continue; }
                };
                if write_msg(&mut wr, &msg).await.is_err() {
                    input = None;
                }
                continue;
            }
        };
        match msg {
            Ok(Some(Msg::Stdout(d))) => {
                if buffered {
                    append(&mut stdout, &d)?;
                } else {
                    out.notify(
                        &format!("{method}.stdout"),
                        json!({"id": id, "data": B64.encode(&d)}),
                    )
                    .await;
                }
            }
            Ok(Some(Msg::Stderr(d))) => {
                if buffered {
                    append(&mut stderr, &d)?;
                } else {
                    out.notify(
                        &format!("{method}.stderr"),
                        json!({"id": id, "data": B64.encode(&d)}),
                    )
                    .await;
                }
            }
            // The process could not start (no such working directory or user, not
            // executable): an error with the guest's reason, not a bare 126.
            Ok(Some(Msg::Exited(_))) if guest_error.is_some() => {
                return Err(RpcError::new(
                    code::EXEC_FAILED,
                    guest_error.unwrap_or_default(),
                ))
            }
            Ok(Some(Msg::Exited(st))) => break st.code.clamp(0, 255),
            Ok(Some(Msg::Error(e))) => guest_error = Some(e),
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(RpcError::new(
                    code::EXEC_FAILED,
                    guest_error.unwrap_or_else(|| {
                        "the sandbox stopped before the command finished".into()
                    }),
                ))
            }
            Err(e) => {
                return Err(RpcError::new(
                    code::EXEC_FAILED,
                    format!("lost the sandbox connection: {e}"),
                ))
            }
        }
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    if buffered {
        Ok(json!({
            "exit_code": exit,
            "stdout": B64.encode(&stdout),
            "stderr": B64.encode(&stderr),
            "duration_ms": duration_ms,
        }))
    } else {
        Ok(json!({"exit_code": exit, "duration_ms": duration_ms}))
    }
}

fn append(buf: &mut Vec<u8>, d: &[u8]) -> Result<(), RpcError> {
    if buf.len() + d.len() > MAX_EXEC_OUTPUT {
        return Err(RpcError::new(
            code::EXEC_FAILED,
            format!(
                "the command wrote more than {} MiB to one stream and was stopped; use exec_stream for large outputs",
                MAX_EXEC_OUTPUT >> 20
            ),
        ));
    }
    buf.extend_from_slice(d);
    Ok(())
}

fn file_err(e: impl std::fmt::Display) -> RpcError {
    RpcError::new(code::FILE_FAILED, e.to_string())
}

fn check_path(path: &str) -> Result<(), RpcError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(RpcError::new(
            code::FILE_FAILED,
            format!("path {path:?} must be absolute"),
        ));
    }
    Ok(())
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct WriteFileParams {
    path: String,
    content: String,
    mode: u32,
}

async fn write_file(shared: &Arc<Shared>, p: WriteFileParams) -> Result<Value, RpcError> {
    let client = shared.client()?;
    check_path(&p.path)?;
    let content = B64
        .decode(p.content.as_bytes())
        .map_err(|_| RpcError::params("invalid base64 content"))?;
    let mode = if p.mode == 0 { 0o644 } else { p.mode & 0o7777 };
    let mut s = client
        .file(Msg::WriteFile(matchlock_proto::WriteFile {
            path: p.path,
            mode,
            uid: None,
            gid: None,
        }))
        .await
        .map_err(file_err)?;
    matchlock_proto::transfer::send_file_body(&mut s, &content)
        .await
        .map_err(file_err)?;
    Ok(json!({}))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PathParams {
    path: String,
}

async fn read_file(shared: &Arc<Shared>, p: PathParams) -> Result<Value, RpcError> {
    let client = shared.client()?;
    check_path(&p.path)?;
    let mut s = client
        .file(Msg::ReadFile {
            path: p.path.clone(),
        })
        .await
        .map_err(file_err)?;
    let mut content = Vec::new();
    loop {
        match read_msg(&mut s).await.map_err(file_err)? {
            Some(Msg::FileInfo { size, .. }) => {
                if size > MAX_READ_FILE {
                    return Err(file_err(format!(
                        "{} is {size} bytes; read_file returns at most {} MiB (use exec_stream with cat, or a volume)",
                        p.path,
                        MAX_READ_FILE >> 20
                    )));
                }
                content.reserve(size as usize);
            }
            Some(Msg::Data(d)) => {
                if content.len() as u64 + d.len() as u64 > MAX_READ_FILE {
                    return Err(file_err(format!(
                        "{} grew beyond {} MiB while being read",
                        p.path,
                        MAX_READ_FILE >> 20
                    )));
                }
                content.extend_from_slice(&d);
            }
            Some(Msg::Eof) => break,
            Some(Msg::Error(e)) => return Err(file_err(e)),
            other => return Err(file_err(format!("unexpected reply {other:?}"))),
        }
    }
    Ok(json!({ "content": B64.encode(&content) }))
}

/// Go's `os.FileMode` bits for a POSIX `st_mode`, which the SDKs expect in `list_files`.
fn go_file_mode(st_mode: u32) -> u32 {
    let mut m = st_mode & 0o777;
    match st_mode & libc::S_IFMT {
        libc::S_IFDIR => m |= 1 << 31,
        libc::S_IFLNK => m |= 1 << 27,
        libc::S_IFIFO => m |= 1 << 25,
        libc::S_IFSOCK => m |= 1 << 24,
        libc::S_IFBLK => m |= 1 << 26,
        libc::S_IFCHR => m |= (1 << 26) | (1 << 21),
        _ => {}
    }
    if st_mode & libc::S_ISUID != 0 {
        m |= 1 << 23;
    }
    if st_mode & libc::S_ISGID != 0 {
        m |= 1 << 22;
    }
    if st_mode & libc::S_ISVTX != 0 {
        m |= 1 << 20;
    }
    m
}

async fn list_files(shared: &Arc<Shared>, p: PathParams) -> Result<Value, RpcError> {
    let client = shared.client()?;
    check_path(&p.path)?;
    let mut s = client
        .file(Msg::ListFiles { path: p.path })
        .await
        .map_err(file_err)?;
    match read_msg(&mut s).await.map_err(file_err)? {
        Some(Msg::Entries(entries)) => {
            let files: Vec<Value> = entries
                .into_iter()
                .map(|e| {
                    json!({
                        "name": e.name,
                        "size": e.size,
                        "mode": go_file_mode(e.mode),
                        "mod_time": "0001-01-01T00:00:00Z",
                        "is_dir": e.is_dir,
                    })
                })
                .collect();
            Ok(json!({ "files": files }))
        }
        Some(Msg::Error(e)) => Err(file_err(e)),
        other => Err(file_err(format!("unexpected reply {other:?}"))),
    }
}

fn log_path(shared: &Shared) -> Result<std::path::PathBuf, RpcError> {
    let id = shared
        .last_id
        .lock()
        .unwrap()
        .clone()
        .ok_or_else(|| RpcError::new(code::VM_FAILED, "VM not created"))?;
    Ok(shared.store.dir(&id).join("logs").join("vm.log"))
}

async fn log(shared: &Arc<Shared>) -> Result<Value, RpcError> {
    let path = log_path(shared)?;
    let data = match tokio::fs::read(&path).await {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(file_err(format!("reading the log: {e}"))),
    };
    Ok(json!({ "content": B64.encode(&data) }))
}

/// Follows the sandbox log until cancelled (the SDK's `log_stream` ends only by cancellation or
/// its timeout, as in Matchlock).
async fn log_stream(shared: &Arc<Shared>, id: &Value) -> Result<Value, RpcError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let path = log_path(shared)?;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Ok(mut f) = tokio::fs::File::open(&path).await {
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            // Truncated or replaced: start over.
            if len < pos {
                pos = 0;
            }
            if f.seek(std::io::SeekFrom::Start(pos)).await.is_ok() {
                loop {
                    match f.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            pos += n as u64;
                            shared
                                .out
                                .notify(
                                    "log_stream.data",
                                    json!({"id": id, "data": B64.encode(&buf[..n])}),
                                )
                                .await;
                        }
                    }
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ForwardSpec {
    local_port: i64,
    remote_port: i64,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PortForwardParams {
    forwards: Vec<ForwardSpec>,
    addresses: Vec<String>,
}

/// Replaces the sandbox's port forwards.
/// `pause` and `resume` (matchlock's own methods; the upstream protocol has neither): no
/// parameters, `{}` once done.
async fn pause(shared: &Arc<Shared>, resume: bool) -> Result<Value, RpcError> {
    let client = shared.client()?;
    let done = if resume {
        client.resume().await
    } else {
        client.pause().await
    };
    done.map_err(|e| RpcError::new(code::VM_FAILED, e.to_string()))?;
    Ok(json!({}))
}

async fn port_forward(shared: &Arc<Shared>, p: PortForwardParams) -> Result<Value, RpcError> {
    let client = shared.client()?;
    if p.forwards.is_empty() {
        return Err(RpcError::params("forwards is required"));
    }
    let mut maps = Vec::new();
    for f in &p.forwards {
        let port = |v: i64, what: &str, min: i64| {
            u16::try_from(v)
                .ok()
                .filter(|p| i64::from(*p) >= min)
                .ok_or_else(|| RpcError::params(format!("{what} {v} must be {min} to 65535")))
        };
        maps.push(PortMap {
            local_port: port(f.local_port, "local_port", 0)?,
            remote_port: port(f.remote_port, "remote_port", 1)?,
        });
    }
    let addresses = if p.addresses.is_empty() {
        vec!["127.0.0.1".to_string()]
    } else {
        p.addresses
    };
    let addrs = addresses
        .iter()
        .map(|a| {
            a.parse()
                .map_err(|_| RpcError::params(format!("address '{a}' is not an IP address")))
        })
        .collect::<Result<Vec<std::net::IpAddr>, _>>()?;
    // Free the old listeners first: the new set may reuse their ports.
    if let Some(vm) = shared.vm.lock().unwrap().as_mut() {
        vm.forwards.take();
    }
    let fwd = Forwarder::start(client, &maps, &addrs)
        .await
        .map_err(|e| RpcError::new(code::VM_FAILED, e.to_string()))?;
    let bindings: Vec<Value> = fwd
        .bindings()
        .iter()
        .map(|b| json!({"address": b.address.to_string(), "local_port": b.local_port, "remote_port": b.remote_port}))
        .collect();
    match shared.vm.lock().unwrap().as_mut() {
        Some(vm) => vm.forwards = Some(fwd),
        None => return Err(RpcError::new(code::VM_FAILED, "VM not created")),
    }
    Ok(json!({ "bindings": bindings }))
}

/// Starts the ingress gateway (replacing a running one, whose port is freed first).
async fn enable_ingress(shared: &Arc<Shared>, p: IngressParams) -> Result<Value, RpcError> {
    let client = shared.client()?;
    let opts = matchlock_ingress::Options::from_params(&p).map_err(RpcError::params)?;
    if let Some(vm) = shared.vm.lock().unwrap().as_mut() {
        vm.ingress.take();
    }
    let gw = Gateway::start(Arc::new(client), opts)
        .await
        .map_err(|e| RpcError::new(code::VM_FAILED, e))?;
    if let Some(routes) = p.routes {
        gw.set_routes(routes)
            .await
            .map_err(|e| RpcError::new(code::VM_FAILED, e))?;
    }
    let addr = gw.local_addr();
    let url = gw.url();
    match shared.vm.lock().unwrap().as_mut() {
        Some(vm) => vm.ingress = Some(Arc::new(gw)),
        None => return Err(RpcError::new(code::VM_FAILED, "VM not created")),
    }
    Ok(json!({"url": url, "address": addr.ip().to_string(), "port": addr.port()}))
}

#[derive(Deserialize)]
#[serde(default)]
struct SshParams {
    listen: String,
    user: String,
}

impl Default for SshParams {
    fn default() -> Self {
        SshParams {
            listen: "127.0.0.1:0".into(),
            user: "root".into(),
        }
    }
}

/// Starts the sandbox's SSH server (replacing a running one) and says how to reach it.
async fn enable_ssh(shared: &Arc<Shared>, p: SshParams) -> Result<Value, RpcError> {
    let client = shared.client()?;
    let listen: std::net::SocketAddr = p.listen.parse().map_err(|_| {
        RpcError::params(format!(
            "listen '{}' must be IP:PORT, e.g. 127.0.0.1:0",
            p.listen
        ))
    })?;
    if p.user.is_empty() || p.user.contains(['@', ' ', '/']) {
        return Err(RpcError::params(format!(
            "user '{}' is not a user name",
            p.user
        )));
    }
    if let Some(vm) = shared.vm.lock().unwrap().as_mut() {
        vm.ssh.take();
    }
    let key_dir = shared.store.dir(client.id()).join("ssh");
    let server = matchlock_ssh::SshServer::start(client, &key_dir, listen, &p.user)
        .await
        .map_err(|e| RpcError::new(code::VM_FAILED, e))?;
    let a = server.access().clone();
    match shared.vm.lock().unwrap().as_mut() {
        Some(vm) => vm.ssh = Some(server),
        None => return Err(RpcError::new(code::VM_FAILED, "VM not created")),
    }
    Ok(json!({
        "command": a.command(),
        "args": a.ssh_args(),
        "host": a.addr.ip().to_string(),
        "port": a.addr.port(),
        "user": a.user,
        "identity_file": a.identity_file,
        "known_hosts": a.known_hosts,
        "host_key_alias": a.host_alias,
    }))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RoutesParams {
    routes: Vec<IngressRoute>,
}

/// Replaces the routes file in the guest (and the running gateway's table at once).
async fn set_ingress_routes(shared: &Arc<Shared>, p: RoutesParams) -> Result<Value, RpcError> {
    let client = shared.client()?;
    matchlock_api::ingress::validate_routes(&p.routes).map_err(RpcError::params)?;
    let gw = shared
        .vm
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|v| v.ingress.clone());
    match gw {
        Some(gw) => gw.set_routes(p.routes).await.map(|_| ()),
        None => matchlock_ingress::write_routes(&client, &p.routes)
            .await
            .map(|_| ()),
    }
    .map_err(|e| RpcError::new(code::VM_FAILED, e))?;
    Ok(json!({}))
}

/// The routes file as the guest has it, and the lines the gateway skips.
async fn get_ingress_routes(shared: &Arc<Shared>) -> Result<Value, RpcError> {
    let client = shared.client()?;
    let (routes, problems) = matchlock_ingress::read_routes(&client)
        .await
        .map_err(|e| RpcError::new(code::VM_FAILED, e))?;
    Ok(json!({"routes": routes, "problems": problems}))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct HostsParams {
    hosts: Vec<String>,
}

async fn allow_list(shared: &Arc<Shared>, method: &str, p: HostsParams) -> Result<Value, RpcError> {
    let client = shared.client()?;
    let hosts: Vec<String> = p
        .hosts
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    if hosts.is_empty() {
        return Err(RpcError::params("hosts is required"));
    }
    let (add, remove) = if method == "allow_list_add" {
        (hosts, Vec::new())
    } else {
        (Vec::new(), hosts)
    };
    let change = client
        .allow_list(add, remove)
        .await
        .map_err(|e| RpcError::new(code::VM_FAILED, e.to_string()))?;
    let mut reply = if method == "allow_list_add" {
        json!({"added": change.added, "allowed_hosts": change.allowed_hosts})
    } else {
        json!({"removed": change.removed, "allowed_hosts": change.allowed_hosts})
    };
    reply["deny_by_default"] = json!(change.deny_by_default);
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_file_modes() {
        assert_eq!(go_file_mode(libc::S_IFDIR | 0o755), 2147484141);
        assert_eq!(go_file_mode(libc::S_IFREG | 0o644), 0o644);
        assert_eq!(go_file_mode(libc::S_IFLNK | 0o777), (1 << 27) | 0o777);
        assert_eq!(
            go_file_mode(libc::S_IFREG | libc::S_ISUID | 0o755),
            (1 << 23) | 0o755
        );
    }
}
