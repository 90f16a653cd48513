//! The VM-facing ends of the agent channel and of the NIC, which outlive one QEMU.
//!
//! A paused sandbox's QEMU exits and a new one connects on resume, while the multiplexer (with
//! every open exec, file and forwarded stream) and the network stack (with every flow) keep their
//! state. So neither talks to QEMU's socket directly: each talks to one end of a socket pair, and a
//! link copies between the other end and whichever QEMU is connected now.
//!
//! - [`AgentLink`] carries the agent channel, a byte stream that must not lose a byte: before a
//!   pause it stops taking host bytes and waits until QEMU has read every byte already sent
//!   ([`AgentLink::quiesce`]); what QEMU read is in the guest's memory or its virtio queue, so
//!   in the snapshot. Guest bytes QEMU already wrote are relayed as usual.
//! - [`NetLink`] carries Ethernet frames (4-byte length, then the frame, as QEMU's `-netdev
//!   stream` writes them); frames meet no QEMU while paused and are dropped, as on a wire that is
//!   down: TCP sends them again.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// Largest frame relayed (the network stack's own bound is lower).
const MAX_FRAME: usize = 256 * 1024;

/// How long a quiesce waits for QEMU to read what it was sent: a guest that stopped reading its
/// channel (wedged) is not paused.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

enum ToGuest {
    /// Stop taking host bytes; answer once QEMU has read all it was sent.
    Quiesce(oneshot::Sender<Result<(), String>>),
    /// Take host bytes again, to the same QEMU (a pause that failed).
    Reopen,
    /// Take host bytes again, to a new QEMU.
    Attach(OwnedWriteHalf),
}

/// The agent channel's link; see the module docs.
pub struct AgentLink {
    to_guest: mpsc::Sender<ToGuest>,
    from_guest: mpsc::Sender<OwnedReadHalf>,
    paused: Arc<AtomicBool>,
}

const CLOSED: &str = "the agent channel is closed";

impl AgentLink {
    /// Starts relaying between `qemu` and the returned stream, which the multiplexer runs on.
    pub fn start(qemu: UnixStream) -> std::io::Result<(AgentLink, UnixStream)> {
        let (host, pump) = UnixStream::pair()?;
        let (pump_rd, pump_wr) = pump.into_split();
        let (q_rd, q_wr) = qemu.into_split();
        let paused = Arc::new(AtomicBool::new(false));
        let (to_guest, to_guest_rx) = mpsc::channel(4);
        let (from_guest, from_guest_rx) = mpsc::channel(4);
        tokio::spawn(host_to_guest(pump_rd, q_wr, to_guest_rx));
        tokio::spawn(guest_to_host(q_rd, pump_wr, from_guest_rx, paused.clone()));
        Ok((
            AgentLink {
                to_guest,
                from_guest,
                paused,
            },
            host,
        ))
    }

    /// Stops passing host bytes to the guest and returns once QEMU has read all it was sent.
    /// From here on, QEMU's connection ending is a pause, not the end of the channel.
    pub async fn quiesce(&self) -> Result<(), String> {
        self.paused.store(true, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        let asked = async {
            self.to_guest
                .send(ToGuest::Quiesce(tx))
                .await
                .map_err(|_| CLOSED.to_string())?;
            rx.await.map_err(|_| CLOSED.to_string())?
        };
        // The relay may itself be stuck writing to a guest that does not read; the bound
        // covers that wait too.
        match tokio::time::timeout(QUIESCE_TIMEOUT, asked).await {
            Ok(r) => r,
            Err(_) => Err(format!(
                "the guest did not read its channel within {} s",
                QUIESCE_TIMEOUT.as_secs()
            )),
        }
    }

    /// Undoes [`quiesce`](Self::quiesce) while the same QEMU still runs (the pause failed).
    pub async fn reopen(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let _ = self.to_guest.send(ToGuest::Reopen).await;
    }

    /// Carries on over the connection of the QEMU that resumed the guest.
    pub async fn attach(&self, qemu: UnixStream) -> Result<(), String> {
        let (rd, wr) = qemu.into_split();
        self.from_guest
            .send(rd)
            .await
            .map_err(|_| CLOSED.to_string())?;
        self.to_guest
            .send(ToGuest::Attach(wr))
            .await
            .map_err(|_| CLOSED.to_string())?;
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// Bytes sent on `sock` that its peer has not read yet (`SIOCOUTQ`).
fn unread(sock: &UnixStream) -> std::io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::TIOCOUTQ, &mut n) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

async fn drained(qemu: &OwnedWriteHalf) -> Result<(), String> {
    let until = tokio::time::Instant::now() + QUIESCE_TIMEOUT;
    loop {
        match unread(qemu.as_ref()) {
            Ok(0) => return Ok(()),
            Ok(n) if tokio::time::Instant::now() >= until => {
                return Err(format!(
                    "the guest did not read its channel ({n} bytes waiting after {} s)",
                    QUIESCE_TIMEOUT.as_secs()
                ))
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            Err(e) => return Err(format!("agent channel: {e}")),
        }
    }
}

async fn host_to_guest(
    mut host: OwnedReadHalf,
    qemu: OwnedWriteHalf,
    mut cmds: mpsc::Receiver<ToGuest>,
) {
    let mut qemu = Some(qemu);
    let mut open = true;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                None => return,
                Some(ToGuest::Quiesce(done)) => {
                    open = false;
                    let r = match &qemu {
                        Some(q) => drained(q).await,
                        None => Ok(()),
                    };
                    let _ = done.send(r);
                }
                Some(ToGuest::Reopen) => open = true,
                Some(ToGuest::Attach(q)) => {
                    qemu = Some(q);
                    open = true;
                }
            },
            n = host.read(&mut buf), if open && qemu.is_some() => {
                // The host's side closed: the session is over.
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(q) = &mut qemu {
                    // QEMU went away without a pause: `guest_to_host` ends the channel.
                    if q.write_all(&buf[..n]).await.is_err() {
                        qemu = None;
                    }
                }
            }
        }
    }
}

async fn guest_to_host(
    qemu: OwnedReadHalf,
    mut host: OwnedWriteHalf,
    mut attach: mpsc::Receiver<OwnedReadHalf>,
    paused: Arc<AtomicBool>,
) {
    let mut qemu = Some(qemu);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match &mut qemu {
            // The old QEMU is read to its end before a new one is taken: what it still holds
            // is the guest's.
            Some(q) => match q.read(&mut buf).await {
                Ok(n) if n > 0 => {
                    if host.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                _ => {
                    qemu = None;
                    // QEMU went away unpaused: the channel ends, and the host sees it end.
                    if !paused.load(Ordering::SeqCst) {
                        return;
                    }
                }
            },
            None => match attach.recv().await {
                Some(q) => qemu = Some(q),
                None => return,
            },
        }
    }
}

/// The NIC's link; see the module docs.
pub struct NetLink {
    to_guest: mpsc::Sender<OwnedWriteHalf>,
    from_guest: mpsc::Sender<OwnedReadHalf>,
}

impl NetLink {
    /// Starts relaying frames between `qemu` and the returned stream, which the stack serves.
    pub fn start(qemu: UnixStream) -> std::io::Result<(NetLink, UnixStream)> {
        let (host, pump) = UnixStream::pair()?;
        let (pump_rd, pump_wr) = pump.into_split();
        let (q_rd, q_wr) = qemu.into_split();
        let (to_guest, to_guest_rx) = mpsc::channel(4);
        let (from_guest, from_guest_rx) = mpsc::channel(4);
        tokio::spawn(stack_to_guest(pump_rd, q_wr, to_guest_rx));
        tokio::spawn(guest_to_stack(q_rd, pump_wr, from_guest_rx));
        Ok((
            NetLink {
                to_guest,
                from_guest,
            },
            host,
        ))
    }

    /// Carries on over the connection of the QEMU that resumed the guest.
    pub async fn attach(&self, qemu: UnixStream) {
        let (rd, wr) = qemu.into_split();
        let _ = self.from_guest.send(rd).await;
        let _ = self.to_guest.send(wr).await;
    }
}

/// One length-prefixed frame; `None` at the end of the stream or on a frame too large.
async fn read_frame(r: &mut OwnedReadHalf) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.ok()?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return None;
    }
    let mut f = vec![0u8; len + 4];
    f[..4].copy_from_slice(&(len as u32).to_be_bytes());
    r.read_exact(&mut f[4..]).await.ok()?;
    Some(f)
}

async fn stack_to_guest(
    mut stack: OwnedReadHalf,
    qemu: OwnedWriteHalf,
    mut attach: mpsc::Receiver<OwnedWriteHalf>,
) {
    // Frames are read whole by a task of their own (reading one is not cancel-safe), so a QEMU
    // that comes or goes never sees half of one, and a new QEMU is taken even while the stack
    // sends nothing.
    let (frames_tx, mut frames) = mpsc::channel::<Vec<u8>>(64);
    tokio::spawn(async move {
        while let Some(frame) = read_frame(&mut stack).await {
            if frames_tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    let mut qemu = Some(qemu);
    loop {
        tokio::select! {
            q = attach.recv() => match q {
                Some(q) => qemu = Some(q),
                None => return,
            },
            frame = frames.recv() => {
                let Some(frame) = frame else { return };
                if let Some(q) = &mut qemu {
                    if q.write_all(&frame).await.is_err() {
                        qemu = None;
                    }
                }
            }
        }
    }
}

async fn guest_to_stack(
    qemu: OwnedReadHalf,
    mut stack: OwnedWriteHalf,
    mut attach: mpsc::Receiver<OwnedReadHalf>,
) {
    let mut qemu = Some(qemu);
    loop {
        match &mut qemu {
            Some(q) => match read_frame(q).await {
                Some(frame) => {
                    if stack.write_all(&frame).await.is_err() {
                        return;
                    }
                }
                // QEMU went away (paused, or gone with the sandbox); a half frame is dropped.
                None => qemu = None,
            },
            None => match attach.recv().await {
                Some(q) => qemu = Some(q),
                None => return,
            },
        }
    }
}
