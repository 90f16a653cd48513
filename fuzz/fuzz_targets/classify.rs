//! The first bytes of a guest TCP flow, as the interception proxy classifies them
//! (`matchlock_policy::classify::classify`: TLS ClientHello with SNI/ALPN, HTTP/1.x with its Host
//! header, the HTTP/2 preface, or other). Every length in a ClientHello is the guest's, so this is
//! a hand-written parser of hostile bytes.
//!
//! The proxy calls it on a growing buffer until it decides, so the harness also classifies every
//! prefix at the input's first newlines and record boundaries, and checks that a buffer at least
//! [`MAX_PEEK`] bytes long is never "need more" (the proxy gives up there).

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_policy::classify::{classify, Flow, MAX_PEEK};

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    // Prefixes the proxy could see after short reads: up to each of the first few line ends,
    // and the 5-byte TLS record header.
    let cuts = data
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i + 1)
        .take(8)
        .chain([1, 5, data.len() / 2]);
    for cut in cuts {
        if cut < data.len() {
            let _ = classify(&data[..cut]);
        }
    }
    if data.len() >= MAX_PEEK {
        assert_ne!(
            whole,
            Flow::NeedMore,
            "a flow of {} bytes is still undecided",
            data.len()
        );
    }
});
