//! Secret scrubbing inside a WebSocket tunnel, upstream to guest.
//!
//! After the `101` the connection carries RFC 6455 frames. An upstream that was sent a secret in
//! the upgrade request could echo it in a message, so every payload coming back passes the same
//! [`Scrubber`] as HTTP bodies. A scrubbed payload may change length and is streamed, so data
//! frames are re-emitted as fragments of the same message (RFC 6455 §5.4 lets intermediaries
//! re-fragment); control frames (at most 125 bytes) are re-emitted whole. Extensions (which would
//! compress payloads) are not offered upstream while secrets are set (see `mod.rs`); a frame with
//! reserved bits, or a masked frame, which a server must not send, ends the tunnel.
//!
//! Hand-written rather than a WebSocket library: those terminate the protocol (they would make
//! us an endpoint that re-encodes messages and answers pings), while this must pass frames on
//! unchanged but for their payload bytes.

use matchlock_policy::secrets::Scrubber;

/// Why the upstream's stream cannot be passed on.
#[derive(Debug, PartialEq, Eq)]
pub struct BadFrame(pub &'static str);

/// Where the parser is in the upstream's stream.
enum State {
    /// Waiting for a complete frame header.
    Header,
    /// Inside a data frame's payload: bytes left, its FIN bit.
    Data { left: u64, fin: bool },
    /// Collecting a control frame's payload (whole, at most 125 bytes).
    Control { opcode: u8, fin: bool, left: usize },
}

/// Rewrites upstream→guest WebSocket bytes with secret values scrubbed from every payload.
pub struct FrameScrubber {
    scrubber: Scrubber,
    state: State,
    /// Bytes received but not yet parsed (a partial header).
    pending: Vec<u8>,
    /// A control frame's payload being collected.
    control: Vec<u8>,
    /// Inside a message (a text or binary frame without FIN came, its last has not).
    in_message: bool,
    /// The current message's opcode until its first fragment went out (then 0: continuation).
    next_opcode: Option<u8>,
}

impl FrameScrubber {
    /// A rewriter using `scrubber`.
    pub fn new(scrubber: Scrubber) -> FrameScrubber {
        FrameScrubber {
            scrubber,
            state: State::Header,
            pending: Vec::new(),
            control: Vec::new(),
            in_message: false,
            next_opcode: None,
        }
    }

    /// Feeds bytes from upstream; returns the bytes to send to the guest.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<u8>, BadFrame> {
        let mut out = Vec::new();
        // A header split across reads: join its start (at most 13 bytes) with the new bytes.
        let joined;
        let mut data = data;
        if !self.pending.is_empty() {
            joined = [std::mem::take(&mut self.pending).as_slice(), data].concat();
            data = &joined;
        }
        while !data.is_empty() {
            match self.state {
                State::Header => match parse_header(data)? {
                    None => {
                        self.pending = data.to_vec();
                        break;
                    }
                    Some((used, frame)) => {
                        data = &data[used..];
                        self.start(frame, &mut out)?;
                    }
                },
                State::Data { left, fin } => {
                    let n = data.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let scrubbed = self.scrubber.push(&data[..n]);
                    data = &data[n..];
                    let left = left - n as u64;
                    if left == 0 {
                        self.state = State::Header;
                        self.end_data(scrubbed, fin, &mut out);
                    } else {
                        self.state = State::Data { left, fin };
                        if !scrubbed.is_empty() {
                            self.fragment(&scrubbed, false, &mut out);
                        }
                    }
                }
                State::Control { opcode, fin, left } => {
                    let n = data.len().min(left);
                    self.control.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    if n == left {
                        self.state = State::Header;
                        self.end_control(opcode, fin, &mut out);
                    } else {
                        self.state = State::Control {
                            opcode,
                            fin,
                            left: left - n,
                        };
                    }
                }
            }
        }
        Ok(out)
    }

    fn start(&mut self, f: FrameHeader, out: &mut Vec<u8>) -> Result<(), BadFrame> {
        if f.opcode >= 8 {
            if f.len > 125 || !f.fin {
                return Err(BadFrame(
                    "a control frame longer than 125 bytes or fragmented",
                ));
            }
            self.control.clear();
            self.state = State::Control {
                opcode: f.opcode,
                fin: f.fin,
                left: f.len as usize,
            };
            if f.len == 0 {
                self.state = State::Header;
                self.end_control(f.opcode, f.fin, out);
            }
            return Ok(());
        }
        // Text or binary starts a message; a continuation continues one.
        match (f.opcode, self.in_message) {
            (1 | 2, false) => {
                self.in_message = true;
                self.next_opcode = Some(f.opcode);
            }
            (0, true) => {}
            (0, false) => return Err(BadFrame("a continuation frame outside a message")),
            (1 | 2, true) => return Err(BadFrame("a new message inside a fragmented one")),
            _ => return Err(BadFrame("a reserved opcode")),
        }
        self.state = State::Data {
            left: f.len,
            fin: f.fin,
        };
        if f.len == 0 {
            self.state = State::Header;
            self.end_data(Vec::new(), f.fin, out);
        }
        Ok(())
    }

    /// The end of a data frame: its last scrubbed bytes, and at the message's end whatever the
    /// scrubber held back, as the fragment that carries the original FIN.
    fn end_data(&mut self, mut scrubbed: Vec<u8>, fin: bool, out: &mut Vec<u8>) {
        if fin {
            scrubbed.extend(self.scrubber.finish());
            self.fragment(&scrubbed, true, out);
            self.next_opcode = None;
            self.in_message = false;
        } else if !scrubbed.is_empty() {
            self.fragment(&scrubbed, false, out);
        }
    }

    /// Emits `payload` as the next fragment of the current message.
    fn fragment(&mut self, payload: &[u8], fin: bool, out: &mut Vec<u8>) {
        let opcode = self.next_opcode.take().unwrap_or(0);
        write_frame(out, fin, opcode, payload);
    }

    fn end_control(&mut self, opcode: u8, fin: bool, out: &mut Vec<u8>) {
        // Values are scrubbed on their own here: a control frame never splits one.
        let mut s = self.scrubber.fresh();
        let mut payload = s.push(&self.control);
        payload.extend(s.finish());
        // A placeholder longer than the value could push it past the limit; cut the reason.
        payload.truncate(125);
        write_frame(out, fin, opcode, &payload);
        self.control.clear();
    }
}

struct FrameHeader {
    fin: bool,
    opcode: u8,
    len: u64,
}

/// A frame header at the start of `b`: its length in bytes and its fields; `None` when more
/// bytes are needed.
fn parse_header(b: &[u8]) -> Result<Option<(usize, FrameHeader)>, BadFrame> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x70 != 0 {
        return Err(BadFrame(
            "reserved bits set (an extension was not negotiated)",
        ));
    }
    if b[1] & 0x80 != 0 {
        return Err(BadFrame("a masked frame from the server"));
    }
    let (len, used) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u64::from(u16::from_be_bytes([b[2], b[3]])), 4),
        127 if b.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&b[2..10]);
            (u64::from_be_bytes(n), 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    Ok(Some((
        used,
        FrameHeader {
            fin: b[0] & 0x80 != 0,
            opcode: b[0] & 0x0f,
            len,
        },
    )))
}

/// Appends an unmasked frame (server to client).
fn write_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use matchlock_policy::hosts::AllowList;
    use matchlock_policy::secrets::{Secret, Secrets};

    fn scrubber() -> Scrubber {
        let s = Secret::new(
            "K",
            "real-value-1",
            AllowList::new(["up.test"]).unwrap(),
            Some("PLACEHOLDER-K"),
        );
        Secrets::new(vec![s]).scrubber()
    }

    /// Reads frames back: (fin, opcode, payload) each.
    fn frames(mut b: &[u8]) -> Vec<(bool, u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let (used, h) = parse_header(b).unwrap().unwrap();
            let end = used + h.len as usize;
            out.push((h.fin, h.opcode, b[used..end].to_vec()));
            b = &b[end..];
        }
        out
    }

    /// The messages the guest reassembles: (opcode, payload).
    fn messages(b: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut open: Option<(u8, Vec<u8>)> = None;
        for (fin, op, p) in frames(b) {
            if op >= 8 {
                out.push((op, p));
                continue;
            }
            match (&mut open, op) {
                (None, 1 | 2) => open = Some((op, p)),
                (Some((_, buf)), 0) => buf.extend(p),
                other => panic!("bad fragment sequence: {:?}", other.1),
            }
            if fin {
                out.push(open.take().unwrap());
            }
        }
        assert!(open.is_none(), "a message was left open");
        out
    }

    #[test]
    fn values_are_scrubbed_from_every_message_however_the_stream_is_cut() {
        let mut up = Vec::new();
        write_frame(&mut up, true, 1, b"hello real-value-1 there");
        // One message in three fragments, the value split across them.
        write_frame(&mut up, false, 2, b"bin real-va");
        write_frame(&mut up, false, 0, b"lue");
        // A ping in the middle of the fragmented message.
        write_frame(&mut up, true, 9, b"ping real-value-1");
        write_frame(&mut up, true, 0, b"-1 end");
        write_frame(&mut up, true, 8, b"\x03\xe8bye real-value-1");
        let want = vec![
            (1, b"hello PLACEHOLDER-K there".to_vec()),
            (9, b"ping PLACEHOLDER-K".to_vec()),
            (2, b"bin PLACEHOLDER-K end".to_vec()),
            (8, b"\x03\xe8bye PLACEHOLDER-K".to_vec()),
        ];
        for step in [1, 2, 3, 7, up.len()] {
            let mut f = FrameScrubber::new(scrubber());
            let mut got = Vec::new();
            for chunk in up.chunks(step) {
                got.extend(f.push(chunk).unwrap());
            }
            assert_eq!(messages(&got), want, "chunks of {step}");
            assert!(!String::from_utf8_lossy(&got).contains("real-value-1"));
        }
    }

    #[test]
    fn long_frames_and_protocol_errors() {
        let big = [b"x".repeat(70_000), b"real-value-1".to_vec()].concat();
        let mut up = Vec::new();
        write_frame(&mut up, true, 2, &big);
        let mut f = FrameScrubber::new(scrubber());
        let got = f.push(&up).unwrap();
        let m = messages(&got);
        assert_eq!(m.len(), 1);
        assert!(m[0].1.ends_with(b"PLACEHOLDER-K") && m[0].1.len() == 70_000 + 13);
        // Many frames in one read: handled in a loop, not one call per frame.
        let pings: Vec<u8> = [0x89u8, 0].repeat(50_000);
        let got = FrameScrubber::new(scrubber()).push(&pings).unwrap();
        assert_eq!(got, pings);
        for (bytes, why) in [
            (&[0xc1u8, 0][..], "reserved"),
            (&[0x81, 0x80, 1, 2, 3, 4][..], "masked"),
            (&[0x80, 1, b'x'][..], "continuation"),
            (&[0x89, 126, 0, 200][..], "control"),
            (&[0x83, 0][..], "reserved opcode"),
        ] {
            let e = FrameScrubber::new(scrubber()).push(bytes).unwrap_err();
            assert!(e.0.contains(why.split(' ').next().unwrap()), "{why}: {e:?}");
        }
    }
}
