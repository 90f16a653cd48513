//! The stream multiplexer: a yamux session driven by a background task.
//!
//! `yamux::Connection` makes progress only while it is polled, and opening outbound streams needs the
//! same `&mut` connection as accepting inbound ones; [`Mux::start`] moves it into one task that does
//! both and hands out a cloneable [`Mux`] to open streams plus a receiver of inbound streams.

use futures::future::poll_fn;
use std::collections::VecDeque;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// One multiplexed stream, usable with tokio's I/O traits.
pub type Stream = Compat<yamux::Stream>;

/// Which end of the session this is (yamux numbers client and server streams differently).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The host side.
    Client,
    /// The guest side.
    Server,
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// Handle to a running session; cheap to clone.
#[derive(Clone, Debug)]
pub struct Mux {
    open_tx: mpsc::Sender<OpenReply>,
}

/// Why a stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// The session ended (the peer went away or the channel broke).
    #[error("the guest channel is closed")]
    Closed,
    /// yamux refused (e.g. too many streams).
    #[error("guest channel: {0}")]
    Yamux(#[from] yamux::ConnectionError),
}

impl Mux {
    /// Starts a session over `io` on the current tokio runtime. Returns the handle, the inbound
    /// streams, and the driver's join handle, which finishes when the session ends.
    pub fn start<T>(
        io: T,
        role: Role,
    ) -> (
        Mux,
        mpsc::UnboundedReceiver<Stream>,
        tokio::task::JoinHandle<Result<(), yamux::ConnectionError>>,
    )
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mode = match role {
            Role::Client => yamux::Mode::Client,
            Role::Server => yamux::Mode::Server,
        };
        let mut config = yamux::Config::default();
        config.set_max_num_streams(4096);
        let mut conn = yamux::Connection::new(io.compat(), config, mode);
        let (open_tx, mut open_rx) = mpsc::channel::<OpenReply>(64);
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut waiting: VecDeque<OpenReply> = VecDeque::new();
            poll_fn(|cx| {
                while let Poll::Ready(Some(reply)) = open_rx.poll_recv(cx) {
                    waiting.push_back(reply);
                }
                while !waiting.is_empty() {
                    match conn.poll_new_outbound(cx) {
                        Poll::Ready(res) => {
                            let failed = res.is_err();
                            if let Some(reply) = waiting.pop_front() {
                                let _ = reply.send(res);
                            }
                            if failed {
                                break;
                            }
                        }
                        Poll::Pending => break,
                    }
                }
                loop {
                    match conn.poll_next_inbound(cx) {
                        Poll::Ready(Some(Ok(stream))) => {
                            // A closed receiver only means nobody serves inbound streams; dropping
                            // the stream resets it for the peer.
                            let _ = in_tx.send(stream.compat());
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(None) => return Poll::Ready(Ok(())),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            })
            .await
        });
        (Mux { open_tx }, in_rx, driver)
    }

    /// Opens a new stream to the peer.
    pub async fn open(&self) -> Result<Stream, MuxError> {
        let (tx, rx) = oneshot::channel();
        self.open_tx.send(tx).await.map_err(|_| MuxError::Closed)?;
        match rx.await {
            Ok(Ok(s)) => Ok(s.compat()),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(MuxError::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_msg, write_msg, Msg};

    /// Both ends read and write one stream from two tasks each, as the guest agent's exec relay
    /// does. yamux 0.13 kept one waker for a stream's writes and its window updates, so the
    /// reading task's update replaced the blocked writer's waker and the writer slept forever
    /// (an `exec -i ... cat` that never ended). Two megabytes each way through a small pipe makes
    /// every window fill many times.
    #[tokio::test]
    async fn a_stream_split_across_tasks_keeps_flowing_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        const LEN: usize = 2 << 20;
        async fn both_ways(s: Stream) -> usize {
            let (mut rd, mut wr) = tokio::io::split(s);
            let writer = tokio::spawn(async move {
                let chunk = vec![7u8; 8192];
                for _ in 0..LEN / chunk.len() {
                    wr.write_all(&chunk).await.unwrap();
                }
                wr.shutdown().await.unwrap();
            });
            let reader = tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut total = 0;
                loop {
                    match rd.read(&mut buf).await.unwrap() {
                        0 => return total,
                        n => total += n,
                    }
                }
            });
            writer.await.unwrap();
            reader.await.unwrap()
        }
        let (a, b) = tokio::io::duplex(4096);
        let (client, _client_in, _d1) = Mux::start(a, Role::Client);
        let (_server, mut server_in, _d2) = Mux::start(b, Role::Server);
        let server = tokio::spawn(async move { both_ways(server_in.recv().await.unwrap()).await });
        let client = tokio::spawn(async move { both_ways(client.open().await.unwrap()).await });
        let done = tokio::time::timeout(std::time::Duration::from_secs(60), async {
            (client.await.unwrap(), server.await.unwrap())
        })
        .await
        .expect("a split stream stalled");
        assert_eq!(done, (LEN, LEN));
    }

    #[tokio::test]
    async fn many_concurrent_streams_both_ways() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (client, _client_in, _d1) = Mux::start(a, Role::Client);
        let (_server, mut server_in, _d2) = Mux::start(b, Role::Server);
        tokio::spawn(async move {
            while let Some(mut s) = server_in.recv().await {
                tokio::spawn(async move {
                    while let Some(m) = read_msg(&mut s).await.unwrap() {
                        write_msg(&mut s, &m).await.unwrap();
                    }
                });
            }
        });
        let mut tasks = Vec::new();
        for i in 0..50u8 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = client.open().await.unwrap();
                let payload = vec![i; 100_000];
                write_msg(&mut s, &Msg::Data(payload.clone()))
                    .await
                    .unwrap();
                assert_eq!(read_msg(&mut s).await.unwrap(), Some(Msg::Data(payload)));
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
}
