//! The host side of a `WriteFile` body: after the request, the content as `Data` chunks and `Eof`,
//! then the guest's `Ok` or `Error`. Shared by every host-side writer (the RPC server's
//! `write_file`, the supervisor installing files at boot).

use crate::{read_msg, write_msg, Msg, CHUNK};
use tokio::io::{AsyncRead, AsyncWrite};

/// Sends `data` on a stream whose `WriteFile` request was already sent, and waits for the guest's
/// verdict. The error is one line for the user.
pub async fn send_file_body<S>(s: &mut S, data: &[u8]) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for chunk in data.chunks(CHUNK) {
        write_msg(s, &Msg::Data(chunk.to_vec()))
            .await
            .map_err(|e| e.to_string())?;
    }
    write_msg(s, &Msg::Eof).await.map_err(|e| e.to_string())?;
    match read_msg(s).await.map_err(|e| e.to_string())? {
        Some(Msg::Ok) => Ok(()),
        Some(Msg::Error(e)) => Err(e),
        other => Err(format!("unexpected reply {other:?}")),
    }
}
