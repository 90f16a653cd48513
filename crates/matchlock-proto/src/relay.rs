//! Relaying a byte stream (a TCP connection) over a message stream, as [`crate::Msg::Connect`]
//! streams do on both ends: bytes travel as `Data` chunks, the end of one direction as `Eof`.

use crate::{read_msg, write_msg, Msg, CHUNK};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Copies `bytes_rd` into `msg_wr` as `Data`/`Eof` and `msg_rd`'s `Data`/`Eof` into `bytes_wr`,
/// honouring half-close, until both directions have ended. Returns `false` if it stopped because
/// either side failed or broke the protocol (the caller should then reset, not linger).
pub async fn relay<MR, MW, BR, BW>(
    mut msg_rd: MR,
    mut msg_wr: MW,
    mut bytes_rd: BR,
    mut bytes_wr: BW,
) -> bool
where
    MR: AsyncRead + Unpin,
    MW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let inbound = async {
        loop {
            match read_msg(&mut msg_rd).await {
                Ok(Some(Msg::Data(d))) => {
                    if bytes_wr.write_all(&d).await.is_err() {
                        return false;
                    }
                }
                Ok(Some(Msg::Eof)) => {
                    let _ = bytes_wr.shutdown().await;
                    return true;
                }
                _ => return false,
            }
        }
    };
    let outbound = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match bytes_rd.read(&mut buf).await {
                Ok(0) => return write_msg(&mut msg_wr, &Msg::Eof).await.is_ok(),
                Ok(n) => {
                    if write_msg(&mut msg_wr, &Msg::Data(buf[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
    };
    tokio::pin!(inbound, outbound);
    let (mut in_done, mut out_done) = (false, false);
    while !(in_done && out_done) {
        tokio::select! {
            ok = &mut inbound, if !in_done => { if !ok { return false; } in_done = true; }
            ok = &mut outbound, if !out_done => { if !ok { return false; } out_done = true; }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_both_ways_with_half_close() {
        // "guest" side: a byte pipe standing for the TCP service; "host" side: message frames.
        let (host, guest) = tokio::io::duplex(1 << 16);
        let (svc_outer, svc_inner) = tokio::io::duplex(1 << 16);
        let (grd, gwr) = tokio::io::split(guest);
        let (srd, swr) = tokio::io::split(svc_inner);
        let task = tokio::spawn(relay(grd, gwr, srd, swr));
        let (mut hrd, mut hwr) = tokio::io::split(host);
        let (mut ord, mut owr) = tokio::io::split(svc_outer);
        write_msg(&mut hwr, &Msg::Data(b"ping".to_vec()))
            .await
            .unwrap();
        write_msg(&mut hwr, &Msg::Eof).await.unwrap();
        let mut got = Vec::new();
        ord.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");
        // The other direction still works after the first one closed.
        owr.write_all(b"pong").await.unwrap();
        owr.shutdown().await.unwrap();
        assert_eq!(
            read_msg(&mut hrd).await.unwrap(),
            Some(Msg::Data(b"pong".to_vec()))
        );
        assert_eq!(read_msg(&mut hrd).await.unwrap(), Some(Msg::Eof));
        assert!(task.await.unwrap());
    }

    #[tokio::test]
    async fn protocol_violation_stops_the_relay() {
        let (host, guest) = tokio::io::duplex(1 << 16);
        let (_svc_outer, svc_inner) = tokio::io::duplex(1 << 16);
        let (grd, gwr) = tokio::io::split(guest);
        let (srd, swr) = tokio::io::split(svc_inner);
        let task = tokio::spawn(relay(grd, gwr, srd, swr));
        let (_hrd, mut hwr) = tokio::io::split(host);
        write_msg(&mut hwr, &Msg::Ok).await.unwrap();
        assert!(!task.await.unwrap());
    }
}
