//! The local terminal: raw mode for `-t` and its size.

use matchlock_proto::WinSize;
use nix::sys::termios::{self, SetArg, Termios};
use std::os::fd::BorrowedFd;

/// Puts standard input in raw mode until dropped (only if it is a terminal).
pub struct RawMode {
    saved: Option<Termios>,
}

impl RawMode {
    /// Enters raw mode if stdin is a terminal; otherwise does nothing.
    pub fn enter() -> RawMode {
        // SAFETY: fd 0 stays open for the life of the process.
        let fd = unsafe { BorrowedFd::borrow_raw(0) };
        let Ok(saved) = termios::tcgetattr(fd) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        if termios::tcsetattr(fd, SetArg::TCSANOW, &raw).is_err() {
            return RawMode { saved: None };
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: as above.
            let fd = unsafe { BorrowedFd::borrow_raw(0) };
            let _ = termios::tcsetattr(fd, SetArg::TCSANOW, saved);
        }
    }
}

/// Size of the terminal on stdout (or stdin), or 24x80 when neither is a terminal.
pub fn size() -> WinSize {
    for fd in [1, 0, 2] {
        // SAFETY: a plain C struct, for which all-zero is a valid value.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ fills a winsize struct we own.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return WinSize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            };
        }
    }
    WinSize { rows: 24, cols: 80 }
}

/// Whether stdin is a terminal.
pub fn stdin_is_tty() -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(0) == 1 }
}

/// Whether standard error is a terminal.
pub fn stderr_is_tty() -> bool {
    // SAFETY: isatty only inspects the fd.
    unsafe { libc::isatty(2) == 1 }
}
