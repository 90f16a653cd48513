//! Pseudo-terminals for TTY execs.

use matchlock_proto::WinSize;
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A new PTY: the master stays in the agent, the slave becomes the child's stdio.
pub struct Pty {
    /// Master side.
    pub master: OwnedFd,
    /// Slave side.
    pub slave: OwnedFd,
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a PTY pair of the given size.
///
/// Done with `posix_openpt` rather than `openpty` so both ends are close-on-exec from the start:
/// other execs fork concurrently and must not inherit this terminal.
pub fn open(size: WinSize) -> io::Result<Pty> {
    // SAFETY: plain syscalls on descriptors this function owns; `name` is a local buffer.
    unsafe {
        let m = check(libc::posix_openpt(
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        let master = OwnedFd::from_raw_fd(m);
        check(libc::grantpt(m))?;
        check(libc::unlockpt(m))?;
        let mut name = [0 as libc::c_char; 128];
        let rc = libc::ptsname_r(m, name.as_mut_ptr(), name.len());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        let s = check(libc::open(
            CStr::from_ptr(name.as_ptr()).as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ))?;
        let slave = OwnedFd::from_raw_fd(s);
        resize(master.as_raw_fd(), size)?;
        Ok(Pty { master, slave })
    }
}

/// Sets the terminal size (the kernel sends SIGWINCH to the foreground process group).
pub fn resize(master: RawFd, size: WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which is valid.
    check(unsafe { libc::ioctl(master, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// The terminal's end-of-file character (VEOF, normally Ctrl-D).
pub fn eof_char(master: RawFd) -> u8 {
    // SAFETY: tcgetattr fills the zeroed struct; on failure the default is used.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(master, &mut t) == 0 && t.c_cc[libc::VEOF] != 0 {
            t.c_cc[libc::VEOF]
        } else {
            0x04
        }
    }
}

/// The terminal's foreground process group, if any.
pub fn foreground_pgrp(master: RawFd) -> Option<i32> {
    // SAFETY: plain ioctl wrapper on a valid descriptor.
    let pgrp = unsafe { libc::tcgetpgrp(master) };
    (pgrp > 0).then_some(pgrp)
}
