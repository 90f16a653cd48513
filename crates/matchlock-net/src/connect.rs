//! The only place the network stack and its proxy open host sockets. Each function takes the
//! policy's [`Allowed`], so a connection without a decision does not compile; clippy's
//! `disallowed_methods` (see `clippy.toml`) keeps every other path in this crate from calling
//! the socket constructors directly.

#![allow(clippy::disallowed_methods)] // this module is the sanctioned caller

use matchlock_policy::Allowed;
use std::io;
use std::time::Duration;
use tokio::net::{TcpStream, UdpSocket};

/// A TCP connection to the allowed address, within `timeout`, with Nagle off (the guest's own
/// stack already batches).
pub async fn tcp(allowed: &Allowed, timeout: Duration) -> io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect(allowed.addr()))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// A UDP socket connected to the allowed address: a blocking-free sender and an async receiver
/// sharing it.
pub fn udp(allowed: &Allowed) -> io::Result<(std::net::UdpSocket, UdpSocket)> {
    let addr = allowed.addr();
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let send = std::net::UdpSocket::bind(bind)?;
    send.connect(addr)?;
    send.set_nonblocking(true)?;
    let recv = UdpSocket::from_std(send.try_clone()?)?;
    Ok((send, recv))
}
