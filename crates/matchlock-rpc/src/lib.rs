//! `matchlock rpc`: the JSON-RPC 2.0 server that the Matchlock SDKs (Python, Go, TypeScript, and our
//! own Rust SDK) start as a child process and drive over its standard input and output.
//!
//! The wire protocol is Matchlock's, documented method by method in the reference (§3): newline-
//! delimited JSON objects, base64 for binary data, stream notifications that carry their request id
//! in `params.id`. Where Matchlock's server is fragile this one is not: an over-long line gets an
//! error instead of ending the server, `resources.timeout_seconds` is enforced, `cancel` kills the
//! guest process, and the sandbox is stopped when the SDK closes stdin, dies or the server gets a
//! signal. Sandboxes it creates are ordinary sandboxes, visible to `matchlock list`, `exec`, `kill`.

mod server;
pub mod wire;

pub use server::{serve, End};

/// Runs the server on this process's stdin and stdout and returns its exit code.
///
/// Standard output is reserved for protocol lines: the real stdout is moved to a private
/// descriptor and fd 1 is pointed at stderr, so a stray print anywhere in the process can never
/// corrupt the stream the SDK parses.
pub fn serve_stdio() -> i32 {
    // SAFETY: duplicates a standard descriptor; nothing else runs yet.
    let out_fd = unsafe { libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3) };
    // SAFETY: as above; only reached once the real stdout is saved.
    if out_fd < 0 || unsafe { libc::dup2(2, 1) } < 0 {
        eprintln!("matchlock rpc: cannot set up standard output");
        return 1;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("matchlock rpc: cannot start the async runtime: {e}");
            return 1;
        }
    };
    let code = rt.block_on(async move {
        // SAFETY: out_fd is a fresh descriptor owned by nobody else.
        let out = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(out_fd) };
        let out = tokio::fs::File::from_std(out);
        let input = tokio::io::BufReader::with_capacity(1 << 20, tokio::io::stdin());
        let end = serve(input, out, matchlock_sandbox::Store::open_default()).await;
        match end {
            End::Signal => 130,
            _ => 0,
        }
    });
    // A read of stdin may still be parked on a blocking thread; do not wait for it.
    rt.shutdown_background();
    code
}
