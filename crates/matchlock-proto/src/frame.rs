//! Length-prefixed message framing: `u32` big-endian length, then a `postcard`-encoded [`Msg`].
//!
//! Hand-rolled because it is six lines: a 4-byte length and a bounded read. Every read is bounded by
//! [`MAX_FRAME`], so a misbehaving peer cannot make the other side allocate without limit.

use crate::Msg;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest encoded message accepted. Data chunks are at most [`crate::CHUNK`] bytes; the rest is headroom
/// for requests that carry argv and environment.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The underlying stream failed.
    #[error("channel I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The peer announced a frame larger than the limit ([`MAX_FRAME`] or the stream's own).
    #[error("peer sent a {0}-byte frame, over the limit")]
    TooLarge(usize),
    /// The bytes were not a valid message (version mismatch or corruption).
    #[error("malformed message: {0}")]
    Decode(#[from] postcard::Error),
}

/// Encodes one frame: the length, then `value` in postcard.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FrameError> {
    // Reserve the length first so the body is encoded in place, not copied after.
    let mut buf = postcard::to_extend(value, vec![0u8; 4])?;
    let len = buf.len() - 4;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    buf[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// Writes one message and flushes it.
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, msg: &Msg) -> Result<(), FrameError> {
    let buf = encode(msg)?;
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one message; `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Msg>, FrameError> {
    read_msg_max(r, MAX_FRAME).await
}

/// Like [`read_msg`] with a tighter size limit (at most [`MAX_FRAME`]), for streams whose
/// messages are known to be small: the buffer is allocated before the body arrives.
pub async fn read_msg_max<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<Msg>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(postcard::from_bytes(&body)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExecRequest, Msg};

    #[tokio::test]
    async fn roundtrip_and_eof() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let req = Msg::Exec(ExecRequest {
            argv: vec!["echo".into(), "hi".into()],
            env: vec![("A".into(), "b".into())],
            ..Default::default()
        });
        write_msg(&mut a, &req).await.unwrap();
        write_msg(&mut a, &Msg::Stdout(vec![0, 1, 2]))
            .await
            .unwrap();
        drop(a);
        assert_eq!(read_msg(&mut b).await.unwrap(), Some(req));
        assert_eq!(
            read_msg(&mut b).await.unwrap(),
            Some(Msg::Stdout(vec![0, 1, 2]))
        );
        assert_eq!(read_msg(&mut b).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_frame_rejected_without_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_msg(&mut b).await,
            Err(FrameError::TooLarge(_))
        ));
    }

    #[tokio::test]
    async fn a_stream_limit_is_checked_before_allocating() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&5000u32.to_be_bytes()).await.unwrap();
        assert!(matches!(
            read_msg_max(&mut b, 4096).await,
            Err(FrameError::TooLarge(5000))
        ));
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
        assert!(matches!(read_msg(&mut b).await, Err(FrameError::Decode(_))));
    }
}
