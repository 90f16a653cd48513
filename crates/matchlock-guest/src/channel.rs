//! Non-blocking file descriptors for tokio: the virtio-serial port to the host, pipes and PTY masters.
//!
//! Character devices and pipes are not what `tokio::fs` is for, so they are wrapped in [`AsyncFd`]
//! with plain `read`/`write` syscalls.

use matchlock_proto::PORT_NAME;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// Puts `fd` in non-blocking mode, as [`AsyncFd`] requires.
pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let fd = fd.as_fd().as_raw_fd();
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn raw_read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` writable bytes and `fd` is open.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn raw_write(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` readable bytes and `fd` is open.
    let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A pipe end or PTY master, shareable between a reading and a writing task.
pub struct Fd(AsyncFd<OwnedFd>);

impl Fd {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        // SAFETY: `OwnedFd` owns a valid descriptor that is closed only when the `AsyncFd` drops.
        Ok(Self(unsafe { AsyncFd::register(fd)? }))
    }

    /// The raw descriptor, for ioctls.
    pub fn raw(&self) -> i32 {
        self.0.get_ref().as_raw_fd()
    }

    /// Reads some bytes; `Ok(0)` at end of file. `EIO` counts as end of file: it is what a PTY master
    /// returns once every slave descriptor is closed.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| raw_read(fd.get_ref(), buf)) {
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `buf`.
    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard.try_io(|fd| raw_write(fd.get_ref(), buf)) {
                Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

/// How long to wait before reading the port again when the host end is not connected.
const PORT_RETRY: Duration = Duration::from_millis(50);

/// The virtio-serial port as a tokio byte stream.
///
/// A virtio-serial read returns 0 (end of file) whenever the host side of the port is not connected,
/// e.g. before the supervisor has opened its socket. That is not the end of the session, so a read
/// of 0 is retried after [`PORT_RETRY`] instead of being reported; the port polls as hung up in that
/// state, so waiting on readiness alone would spin.
pub struct PortIo {
    fd: AsyncFd<OwnedFd>,
    retry: Option<Pin<Box<Sleep>>>,
}

impl PortIo {
    /// Wraps an open port descriptor.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        Ok(Self {
            // SAFETY: as in `Fd::new`.
            fd: unsafe { AsyncFd::register(fd)? },
            retry: None,
        })
    }
}

impl AsyncRead for PortIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(sleep) = this.retry.as_mut() {
                ready!(sleep.as_mut().poll(cx));
                this.retry = None;
            }
            let mut guard = ready!(this.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| raw_read(fd.get_ref(), unfilled)) {
                Ok(Ok(0)) if !unfilled.is_empty() => {
                    this.retry = Some(Box::pin(tokio::time::sleep(PORT_RETRY)));
                }
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for PortIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| raw_write(fd.get_ref(), buf)) {
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Every write goes straight to the device; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Finds the `/dev/vportNpM` whose sysfs name is [`PORT_NAME`].
pub fn find_port() -> io::Result<Option<PathBuf>> {
    find_port_named(PORT_NAME)
}

/// Finds the `/dev/vportNpM` whose sysfs name is `wanted`.
pub fn find_port_named(wanted: &str) -> io::Result<Option<PathBuf>> {
    let dir = match std::fs::read_dir("/sys/class/virtio-ports") {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in dir {
        let entry = entry?;
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim_end_matches(['\n', '\0']) == wanted {
            return Ok(Some(PathBuf::from("/dev").join(entry.file_name())));
        }
    }
    Ok(None)
}

/// Opens the port read-write, non-blocking and close-on-exec (no exec'd process may inherit it).
pub fn open_port(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    Ok(file.into())
}
