//! The SDK's error type.

/// JSON-RPC error codes the server uses (the same as Matchlock's).
pub use matchlock_api::codes as code;

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with an error.
    #[error("[{code}] {message}")]
    Rpc {
        /// One of [`code`].
        code: i64,
        /// The server's message.
        message: String,
    },
    /// The call did not finish within its timeout; it was cancelled in the sandbox.
    #[error("{0} timed out; the command was cancelled")]
    Timeout(String),
    /// The `matchlock rpc` process is gone.
    #[error("the matchlock process closed unexpectedly")]
    Closed,
    /// The arguments were rejected before anything was sent.
    #[error("{0}")]
    Invalid(String),
    /// Starting `matchlock` or talking to it failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The server sent something this SDK does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// A sandbox-level failure (`VM_FAILED`).
    pub fn is_vm_error(&self) -> bool {
        matches!(self, Error::Rpc { code, .. } if *code == code::VM_FAILED)
    }

    /// A command could not be run (`EXEC_FAILED`).
    pub fn is_exec_error(&self) -> bool {
        matches!(self, Error::Rpc { code, .. } if *code == code::EXEC_FAILED)
    }

    /// A file operation failed (`FILE_FAILED`).
    pub fn is_file_error(&self) -> bool {
        matches!(self, Error::Rpc { code, .. } if *code == code::FILE_FAILED)
    }

    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
