//! Host<->guest protocol bytes as the guest agent writes them (`matchlock-proto`).
//!
//! The input is read twice on the host side of the agent channel:
//!
//! 1. as a stream of length-prefixed `postcard` frames ([`read_msg`], then again with the tight
//!    per-stream limit of [`read_msg_max`]); every message that decodes must encode again and
//!    decode to the same value (a lossy or non-canonical decoder would let the two ends disagree);
//! 2. as the raw bytes of a yamux session under [`Mux`] in the host's role, whose inbound streams
//!    (the ones the guest opens) are then read as message frames, as the supervisor reads them.
//!
//! Everything runs on one current-thread tokio runtime built once.
//!
//! The frame that overflowed yamux 0.13.10's window arithmetic (a stream-opening window update
//! granting nearly `u32::MAX`; fixed in 0.14) is in the corpus as `yamux-window-credit-overflow`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_proto::mux::{Mux, Role};
use matchlock_proto::{frame, read_msg, read_msg_max, Msg};
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The smallest per-stream limit the host uses for small control streams.
const SMALL_LIMIT: usize = 4096;
/// Frames read per input and per stream (the input is at most a few KiB anyway).
const MAX_MSGS: usize = 256;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// What the decoder returns must survive an encode/decode round trip unchanged.
async fn round_trip(m: &Msg) {
    let bytes = frame::encode(m).expect("a decoded message encodes");
    let mut r = &bytes[..];
    let again = read_msg(&mut r).await.expect("its encoding decodes");
    assert_eq!(
        again.as_ref(),
        Some(m),
        "postcard round trip changed the message"
    );
    assert!(r.is_empty(), "the encoding has trailing bytes");
}

async fn frames(data: &[u8], limit: Option<usize>) {
    let mut r = data;
    for _ in 0..MAX_MSGS {
        let got = match limit {
            Some(max) => read_msg_max(&mut r, max).await,
            None => read_msg(&mut r).await,
        };
        match got {
            Ok(Some(m)) => round_trip(&m).await,
            Ok(None) | Err(_) => break,
        }
    }
}

/// The input as a yamux session from the guest; reads what the guest's streams carry.
async fn session(data: &[u8]) {
    let (host, guest) = tokio::io::duplex(1 << 16);
    let (_mux, mut inbound, driver) = Mux::start(host, Role::Client);
    let (mut guest_rd, mut guest_wr) = tokio::io::split(guest);
    // Whatever the host's side writes (window updates, acks, go-aways) is discarded.
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 16 * 1024];
        while matches!(guest_rd.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let _ = guest_wr.write_all(data).await;
    let _ = guest_wr.shutdown().await;
    while let Some(mut s) = inbound.recv().await {
        for _ in 0..MAX_MSGS {
            match read_msg_max(&mut s, SMALL_LIMIT).await {
                Ok(Some(m)) => round_trip(&m).await,
                Ok(None) | Err(_) => break,
            }
        }
    }
    let _ = driver.await;
    drain.abort();
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        frames(data, None).await;
        frames(data, Some(SMALL_LIMIT)).await;
        // The session ends with the input; the bound only guards against a hang in the harness.
        let done = tokio::time::timeout(Duration::from_secs(5), session(data)).await;
        assert!(
            done.is_ok(),
            "the yamux session did not end after the guest's bytes ended"
        );
    });
});
