//! Matchlock's ingress gateway: a host-local HTTP server (HTTP/1.1, and h2 with prior knowledge)
//! that routes each request by path prefix to a server on the sandbox's loopback, so a web app in
//! the sandbox can be reached without exposing its ports.
//!
//! - **Routes** live in the guest file [`ROUTES_FILE`]: the CLI, the RPC server and the SDK write
//!   it, and a program in the guest may too. The gateway rereads it at most once a second, and
//!   only while requests come. The longest matching prefix wins; none answers 404.
//! - **Each request** opens a fresh stream to the guest port through the sandbox's channel (the
//!   same path as `matchlock port-forward`) and is streamed both ways. A closed port answers 502
//!   with the guest's reason; a server that sends no headers in time, 504.
//! - **Hooks**, when an SDK asks for them, run on the host through the SDK's callback socket:
//!   `allow` (refuse with a status, headers and body of the hook's choosing), `request` (rewrite
//!   the target and headers, ask for the response to be buffered) and `response` (rewrite the
//!   status, headers and, when buffered under a size cap, the body). A hook that fails refuses
//!   the request (503): a hook whose job is to refuse cannot be skipped by being slow.
//! - **WebSockets** are passed through after the guest's `101`, unless turned off.
//!
//! The gateway only needs a way to reach the guest ([`Guest`]); [`matchlock_sandbox::Client`] is
//! one, and the tests use plain loopback sockets.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod gateway;
mod http;

pub use gateway::{read_routes, write_routes, Gateway, HookSocket, Options};
pub use matchlock_api::ingress::{IngressParams, IngressRoute, MAX_ROUTES_FILE, ROUTES_FILE};

use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite};

/// How the gateway reaches a sandbox.
pub trait Guest: Send + Sync + 'static {
    /// A byte stream to a guest port.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Connects to `port` on the guest's loopback; the reason, if it cannot.
    fn connect(&self, port: u16) -> impl Future<Output = Result<Self::Stream, String>> + Send;

    /// Reads a whole guest file of at most `cap` bytes; `None` when it does not exist.
    fn read_file(
        &self,
        path: &str,
        cap: u64,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, String>> + Send;

    /// Replaces a guest file.
    fn write_file(
        &self,
        path: &str,
        data: &[u8],
    ) -> impl Future<Output = Result<(), String>> + Send;
}

impl Guest for matchlock_sandbox::Client {
    type Stream = tokio::io::DuplexStream;

    async fn connect(&self, port: u16) -> Result<Self::Stream, String> {
        // The guest's own reason (e.g. "cannot connect to 127.0.0.1:8001 in the sandbox: ...").
        self.connect_bytes(port).await.map_err(|e| match e {
            matchlock_sandbox::SandboxError::Channel(e) => e,
            e => e.to_string(),
        })
    }

    async fn read_file(&self, path: &str, cap: u64) -> Result<Option<Vec<u8>>, String> {
        matchlock_sandbox::Client::read_file(self, path, cap)
            .await
            .map_err(|e| e.to_string())
    }

    async fn write_file(&self, path: &str, data: &[u8]) -> Result<(), String> {
        matchlock_sandbox::Client::write_file(self, path, data, 0o644)
            .await
            .map_err(|e| e.to_string())
    }
}
