//! Matchlock's shared vocabulary, for every front end (the CLI, the JSON-RPC server, the Rust
//! SDK) and the sandbox layer: what a sandbox is configured as ([`config`]), the defaults
//! ([`defaults`]) and checks ([`validate`]) of user input, host patterns ([`hosts`]), and the
//! JSON-RPC error codes and wire shapes the SDKs speak ([`codes`], [`wire`], [`ingress`]). It
//! depends on nothing but serde (and base64, for hook bodies), so an SDK can use it without
//! pulling in the sandbox machinery.

pub mod config;
pub mod create;
pub mod hosts;
pub mod ingress;
pub mod plugins;
pub mod request;
pub mod validate;
pub mod wire;

/// Defaults of a sandbox, defined once for every front end.
pub mod defaults {
    /// CPUs (fractions become a CPU quota).
    pub const CPUS: f64 = 1.0;
    /// Guest memory in MiB.
    pub const MEMORY_MB: u64 = 512;
    /// Writable disk in MiB.
    pub const DISK_SIZE_MB: u64 = 5120;
    /// Interface MTU.
    pub const MTU: u16 = 1500;
    /// Where relative workspace mounts (`-v`) land.
    pub const WORKSPACE: &str = "/workspace";
    /// Size of a new named volume in MiB (Matchlock's SDKs' default too).
    pub const VOLUME_SIZE_MB: u64 = 10240;
    /// Working directory of a command when neither the request nor the image names one.
    pub const WORKDIR: &str = "/";
}

/// JSON-RPC error codes, as the Matchlock SDKs know them.
pub mod codes {
    /// The line is not JSON.
    pub const PARSE: i64 = -32700;
    /// Not a valid request (e.g. a streaming method without an id).
    pub const INVALID_REQUEST: i64 = -32600;
    /// Unknown method.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Bad parameters.
    pub const INVALID_PARAMS: i64 = -32602;
    /// The sandbox could not be created, or a sandbox-level operation failed.
    pub const VM_FAILED: i64 = -32000;
    /// A command could not be run.
    pub const EXEC_FAILED: i64 = -32001;
    /// A file operation failed.
    pub const FILE_FAILED: i64 = -32002;
    /// The request was cancelled.
    pub const CANCELLED: i64 = -32003;
}
