//! The ingress gateway from the SDK: options, hooks, and the Unix socket the gateway calls them on.
//!
//! Hooks are plain closures run on this side. The gateway connects to the socket once per call,
//! sends one [`IngressHookCall`] line and waits for one [`IngressHookAnswer`] line; a hook that
//! panics or misses its deadline refuses the request (503), it is never skipped.

use crate::Error;
pub use matchlock_api::ingress::{IngressHookAnswer, IngressHookCall, IngressRoute};
use matchlock_api::ingress::{
    IngressParams, DEFAULT_HEADER_TIMEOUT_MS, DEFAULT_MAX_BUFFERED_RESPONSE,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

type Hook = Arc<dyn Fn(&IngressHookCall) -> IngressHookAnswer + Send + Sync>;

/// How [`crate::Client::enable_ingress`] sets up the gateway.
#[derive(Clone)]
pub struct IngressOptions {
    listen: String,
    routes: Option<Vec<IngressRoute>>,
    allow_websockets: bool,
    buffer_response_body: bool,
    max_buffered_response_bytes: u64,
    header_timeout: Duration,
    hook_timeout: Option<Duration>,
    allow: Option<Hook>,
    request: Option<Hook>,
    response: Option<Hook>,
}

impl Default for IngressOptions {
    fn default() -> Self {
        IngressOptions {
            listen: IngressParams::default().listen,
            routes: None,
            allow_websockets: true,
            buffer_response_body: false,
            max_buffered_response_bytes: DEFAULT_MAX_BUFFERED_RESPONSE,
            header_timeout: Duration::from_millis(DEFAULT_HEADER_TIMEOUT_MS),
            hook_timeout: None,
            allow: None,
            request: None,
            response: None,
        }
    }
}

impl IngressOptions {
    /// Loopback, a free port, the sandbox's own routes, WebSockets on, streaming responses.
    pub fn new() -> IngressOptions {
        IngressOptions::default()
    }

    /// Listen on `addr` (`IP:PORT`; port 0 picks a free one). Anything but loopback exposes the
    /// sandbox's servers to the network.
    pub fn listen(mut self, addr: impl Into<String>) -> Self {
        self.listen = addr.into();
        self
    }

    /// Adds a route (the first call replaces the sandbox's routes file).
    pub fn route(mut self, prefix: impl Into<String>, port: u16, strip_prefix: bool) -> Self {
        self.routes.get_or_insert_with(Vec::new).push(IngressRoute {
            prefix: prefix.into(),
            port,
            strip_prefix,
        });
        self
    }

    /// Refuse WebSocket upgrades (403).
    pub fn refuse_websockets(mut self) -> Self {
        self.allow_websockets = false;
        self
    }

    /// Buffer every response (up to `max_bytes`, else 502) so the response hook sees its body.
    pub fn buffer_responses(mut self, max_bytes: u64) -> Self {
        self.buffer_response_body = true;
        self.max_buffered_response_bytes = max_bytes;
        self
    }

    /// Time a guest server has to send its response headers (else 504).
    pub fn header_timeout(mut self, t: Duration) -> Self {
        self.header_timeout = t;
        self
    }

    /// Deadline of one hook call (default 30 s); past it the request is refused.
    pub fn hook_timeout(mut self, t: Duration) -> Self {
        self.hook_timeout = Some(t);
        self
    }

    /// Decide each request: answer [`IngressHookAnswer::deny`] to refuse, anything else allows.
    pub fn on_allow(
        mut self,
        f: impl Fn(&IngressHookCall) -> IngressHookAnswer + Send + Sync + 'static,
    ) -> Self {
        self.allow = Some(Arc::new(f));
        self
    }

    /// Rewrite each request: its `backend_target` and headers; ask for its response buffered.
    pub fn on_request(
        mut self,
        f: impl Fn(&IngressHookCall) -> IngressHookAnswer + Send + Sync + 'static,
    ) -> Self {
        self.request = Some(Arc::new(f));
        self
    }

    /// Rewrite each response: status, headers, and the body (whole in the call when buffered).
    pub fn on_response(
        mut self,
        f: impl Fn(&IngressHookCall) -> IngressHookAnswer + Send + Sync + 'static,
    ) -> Self {
        self.response = Some(Arc::new(f));
        self
    }

    pub(crate) fn has_hooks(&self) -> bool {
        self.allow.is_some() || self.request.is_some() || self.response.is_some()
    }

    /// The RPC parameters, with the hooks served on `socket`.
    pub(crate) fn params(&self, socket: Option<&std::path::Path>) -> IngressParams {
        let mut hooks = Vec::new();
        for (name, h) in [
            ("allow", &self.allow),
            ("request", &self.request),
            ("response", &self.response),
        ] {
            if h.is_some() {
                hooks.push(name.to_string());
            }
        }
        IngressParams {
            listen: self.listen.clone(),
            routes: self.routes.clone(),
            allow_websockets: self.allow_websockets,
            buffer_response_body: self.buffer_response_body,
            max_buffered_response_bytes: self.max_buffered_response_bytes,
            header_timeout_ms: self.header_timeout.as_millis().max(1) as u64,
            callback_socket: socket.map(|s| s.display().to_string()).unwrap_or_default(),
            hooks,
            hook_timeout_ms: self.hook_timeout.map_or(0, |t| t.as_millis().max(1) as u64),
        }
    }
}

/// A running gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingress {
    /// Its base URL, e.g. `http://127.0.0.1:41234`.
    pub url: String,
    /// The address it listens on.
    pub address: String,
    /// The port it listens on.
    pub port: u16,
}

/// The hooks' socket and the task answering on it; dropping it stops both.
pub(crate) struct HookServer {
    dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HookServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl HookServer {
    /// Listens in a new private directory and answers calls with `opts`' hooks.
    pub(crate) fn start(opts: &IngressOptions) -> Result<HookServer, Error> {
        use std::os::unix::fs::DirBuilderExt;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "matchlock-ingress-hook-{}-{nanos:08x}",
            std::process::id()
        ));
        // Private: only this user may call the hooks (and so learn or change requests).
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(Error::io(format!("creating {}", dir.display())))?;
        let listener = tokio::net::UnixListener::bind(dir.join("hook.sock"));
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(Error::io("binding the ingress hook socket".to_string())(e));
            }
        };
        let hooks = Arc::new(opts.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let hooks = hooks.clone();
                tokio::spawn(async move {
                    let (rd, mut wr) = s.into_split();
                    let mut line = String::new();
                    let mut rd =
                        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(rd, 64 << 20));
                    if rd.read_line(&mut line).await.is_err() {
                        return;
                    }
                    let answer = answer(&hooks, &line).await;
                    let mut out = answer.to_string();
                    out.push('\n');
                    let _ = wr.write_all(out.as_bytes()).await;
                });
            }
        });
        Ok(HookServer { dir, task })
    }

    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join("hook.sock")
    }
}

/// Runs the hook a call asks for (on a blocking thread: user code may block); an error line when
/// there is none or it panicked, so the gateway refuses the request.
async fn answer(hooks: &Arc<IngressOptions>, line: &str) -> serde_json::Value {
    let call: IngressHookCall = match serde_json::from_str(line.trim()) {
        Ok(c) => c,
        Err(e) => return serde_json::json!({"error": format!("bad hook call: {e}")}),
    };
    let hook = match call.phase.as_str() {
        "allow" => hooks.allow.clone(),
        "request" => hooks.request.clone(),
        "response" => hooks.response.clone(),
        _ => None,
    };
    let Some(hook) = hook else {
        return serde_json::json!({"error": format!("no {} hook", call.phase)});
    };
    match tokio::task::spawn_blocking(move || hook(&call)).await {
        Ok(a) => {
            serde_json::to_value(a).unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
        }
        Err(_) => serde_json::json!({"error": "the hook panicked"}),
    }
}
