//! `Connect`: one TCP connection to the guest's loopback, relayed over a channel stream (port
//! forwarding from the host).

use crate::server::{Reader, Writer};
use matchlock_proto::{write_msg, Msg};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

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
