//! `Connect`: one TCP connection to the guest's loopback, relayed over a channel stream (port
//! forwarding from the host). `Listen` and `Accept`: the other way round (`ssh -R`), a listener
//! on the guest's loopback whose connections the host takes one stream each.

use crate::server::{Agent, Reader, Writer};
use matchlock_proto::{read_msg, write_msg, Msg};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Serves one `Connect` stream: connects, answers `Ok`/`Error`, then relays both directions with
/// half-close until both have ended.
pub async fn connect(port: u16, rd: Reader, mut wr: Writer) {
    let tcp = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(t) => t,
        Err(e) => {
            let msg = format!("cannot connect to 127.0.0.1:{port} in the sandbox: {e}");
            let _ = write_msg(&mut wr, &Msg::Error(msg)).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if write_msg(&mut wr, &Msg::Ok).await.is_err() {
        return;
    }
    let (trd, twr) = tcp.into_split();
    // Whatever the outcome, dropping both halves closes the connection and the stream.
    matchlock_proto::relay::relay(rd, wr, trd, twr).await;
}

/// Accepted connections not yet taken, by id. Bounded: a host that never takes them cannot
/// grow the agent's memory or file table.
#[derive(Default)]
pub struct Accepted {
    conns: Mutex<HashMap<u64, TcpStream>>,
    next: AtomicU64,
}

/// Connections waiting to be taken, over all listeners.
const MAX_WAITING: usize = 64;
/// How long an accepted connection waits for the host's `Accept` before it is closed.
const TAKE_WITHIN: Duration = Duration::from_secs(10);

/// Serves one `Listen` stream: binds `127.0.0.1:port`, answers `Listening`, then announces each
/// accepted connection until the host closes the stream, which closes the listener.
pub async fn listen(agent: &Arc<Agent>, port: u16, mut rd: Reader, mut wr: Writer) {
    let listener = match TcpListener::bind(("127.0.0.1", port)).await {
        Ok(l) => l,
        Err(e) => {
            let msg = format!("cannot listen on 127.0.0.1:{port} in the sandbox: {e}");
            let _ = write_msg(&mut wr, &Msg::Error(msg)).await;
            let _ = wr.shutdown().await;
            return;
        }
    };
    let bound = listener.local_addr().map(|a| a.port()).unwrap_or(port);
    if write_msg(&mut wr, &Msg::Listening { port: bound })
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            // The host sends nothing more; its end closing (or anything else) stops the listener.
            _ = read_msg(&mut rd) => break,
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let _ = tcp.set_nodelay(true);
                let Some(id) = agent.accepted.park(tcp) else {
                    // Too many waiting: this one is closed, as a full backlog would refuse it.
                    continue;
                };
                let a = agent.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(TAKE_WITHIN).await;
                    a.accepted.take(id);
                });
                if write_msg(&mut wr, &Msg::Accepted { id }).await.is_err() {
                    agent.accepted.take(id);
                    break;
                }
            }
        }
    }
    let _ = wr.shutdown().await;
}

/// Serves one `Accept` stream: hands over the waiting connection, relayed as `Connect` relays.
pub async fn accept(agent: &Arc<Agent>, id: u64, rd: Reader, mut wr: Writer) {
    let Some(tcp) = agent.accepted.take(id) else {
        let msg = format!("no accepted connection {id} is waiting (taken, closed or too late)");
        let _ = write_msg(&mut wr, &Msg::Error(msg)).await;
        let _ = wr.shutdown().await;
        return;
    };
    if write_msg(&mut wr, &Msg::Ok).await.is_err() {
        return;
    }
    let (trd, twr) = tcp.into_split();
    matchlock_proto::relay::relay(rd, wr, trd, twr).await;
}

impl Accepted {
    fn park(&self, tcp: TcpStream) -> Option<u64> {
        let mut conns = self.conns.lock().ok()?;
        if conns.len() >= MAX_WAITING {
            return None;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        conns.insert(id, tcp);
        Some(id)
    }

    fn take(&self, id: u64) -> Option<TcpStream> {
        self.conns.lock().ok()?.remove(&id)
    }
}
