//! File requests: `WriteFile`, `ReadFile` and `ListFiles`. They run as the agent (root), outside any
//! exec sandbox, on the guest's root filesystem.

use crate::server::{Reader, Writer};
use matchlock_proto::{read_msg, write_msg, DirEntry, FrameError, Msg, WriteFile, CHUNK};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Rejects relative paths: the agent's working directory is not something the host can reason about.
fn absolute(path: &str) -> Result<&Path, String> {
    if path.starts_with('/') && !path.contains('\0') {
        Ok(Path::new(path))
    } else {
        Err(format!("path {path:?} must be absolute"))
    }
}

fn describe(path: &Path, e: &io::Error) -> String {
    format!("{}: {e}", path.display())
}

/// Serves `WriteFile`: receives `Data`* `Eof` straight into the target (created with the
/// requested mode, or truncated), as Matchlock does. Writing the target itself, not a temporary
/// name renamed over it, is what workspace interception rules and events see: a rule that
/// blocks creating or writing the path applies, and events report the path the caller named.
/// A transfer that fails half-way leaves what was written so far.
pub async fn write(req: WriteFile, rd: &mut Reader, wr: &mut Writer) -> Result<(), FrameError> {
    let reply = match receive(&req, rd).await {
        Ok(()) => Msg::Ok,
        Err(Received::Failed(e)) => Msg::Error(e),
        // The host went away mid-transfer; there is nobody to reply to.
        Err(Received::Closed) => return Ok(()),
    };
    write_msg(wr, &reply).await
}

enum Received {
    Failed(String),
    Closed,
}

impl From<String> for Received {
    fn from(e: String) -> Self {
        Received::Failed(e)
    }
}

async fn receive(req: &WriteFile, rd: &mut Reader) -> Result<(), Received> {
    let path = match absolute(&req.path) {
        Ok(p) => p,
        Err(e) => {
            drain(rd).await?;
            return Err(e.into());
        }
    };
    let (Some(parent), Some(_)) = (path.parent(), path.file_name()) else {
        drain(rd).await?;
        return Err(format!("{}: not a file path", req.path).into());
    };
    if let Err(e) = tokio::fs::create_dir_all(parent).await {
        drain(rd).await?;
        return Err(describe(parent, &e).into());
    }
    let file = match open_target(path, req.mode & 0o7777).await {
        Ok(f) => f,
        Err(e) => {
            drain(rd).await?;
            return Err(e.into());
        }
    };
    fill(req, path, file, rd).await
}

/// Opens (creating or truncating) the regular file at `path` for writing. `O_NONBLOCK` so a
/// FIFO there cannot hang the agent; anything but a regular file is refused before a byte is
/// written.
async fn open_target(path: &Path, mode: u32) -> Result<tokio::fs::File, String> {
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .await
        .map_err(|e| describe(path, &e))?;
    let meta = file.metadata().await.map_err(|e| describe(path, &e))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    Ok(file)
}

/// Streams the content into `file`, then sets its mode and owner.
async fn fill(
    req: &WriteFile,
    path: &Path,
    mut file: tokio::fs::File,
    rd: &mut Reader,
) -> Result<(), Received> {
    let mut failed: Option<String> = None;
    loop {
        match read_msg(rd).await {
            Ok(Some(Msg::Data(d))) => {
                if failed.is_none() {
                    if let Err(e) = file.write_all(&d).await {
                        // Keep consuming so the host's remaining Data does not look like a new request.
                        failed = Some(describe(path, &e));
                    }
                }
            }
            Ok(Some(Msg::Eof)) => break,
            Ok(Some(other)) => {
                return Err(format!("expected Data or Eof, got {}", msg_name(&other)).into())
            }
            Ok(None) | Err(_) => return Err(Received::Closed),
        }
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    let finish = async {
        file.flush().await?;
        let std_file = file.into_std().await;
        let (mode, uid, gid) = (req.mode & 0o7777, req.uid, req.gid);
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            // Explicit chmod: the requested mode must not depend on the agent's umask.
            std_file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::fchown(&std_file, uid, gid)?;
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    };
    finish
        .await
        .map_err(|e| Received::Failed(describe(path, &e)))
}

/// Consumes the rest of a rejected upload so the reply is read after the host finished sending.
async fn drain(rd: &mut Reader) -> Result<(), Received> {
    loop {
        match read_msg(rd).await {
            Ok(Some(Msg::Eof)) => return Ok(()),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return Err(Received::Closed),
        }
    }
}

/// Serves `ReadFile`: `FileInfo`, `Data` chunks, `Eof`; or `Error`. Only regular files are read (a
/// FIFO or device could block or never end). The size in `FileInfo` is `st_size`, which is 0 for
/// `/proc` files whose content still follows.
pub async fn read(path: &str, wr: &mut Writer) -> Result<(), FrameError> {
    let path = match absolute(path) {
        Ok(p) => p,
        Err(e) => return write_msg(wr, &Msg::Error(e)).await,
    };
    let mut file = match open_regular(path).await {
        Ok(f) => f,
        Err(e) => return write_msg(wr, &Msg::Error(e)).await,
    };
    let meta = match file.metadata().await {
        Ok(m) => m,
        Err(e) => return write_msg(wr, &Msg::Error(describe(path, &e))).await,
    };
    write_msg(
        wr,
        &Msg::FileInfo {
            size: meta.len(),
            mode: meta.mode(),
        },
    )
    .await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => write_msg(wr, &Msg::Data(buf[..n].to_vec())).await?,
            // FileInfo is already out, so a late failure is an Error instead of Eof.
            Err(e) => return write_msg(wr, &Msg::Error(describe(path, &e))).await,
        }
    }
    write_msg(wr, &Msg::Eof).await
}

async fn open_regular(path: &Path) -> Result<tokio::fs::File, String> {
    // O_NONBLOCK so opening a FIFO does not hang; the type is checked before any read.
    let file = tokio::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .await
        .map_err(|e| describe(path, &e))?;
    let meta = file.metadata().await.map_err(|e| describe(path, &e))?;
    if meta.is_dir() {
        return Err(format!("{}: is a directory", path.display()));
    }
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    Ok(file)
}

/// Serves `ListFiles`: the entries of a directory sorted by name, without following symlinks.
pub async fn list(path: &str, wr: &mut Writer) -> Result<(), FrameError> {
    let reply = match absolute(path) {
        Ok(p) => {
            let p = p.to_path_buf();
            match tokio::task::spawn_blocking(move || list_dir(&p)).await {
                Ok(Ok(entries)) => Msg::Entries(entries),
                Ok(Err(e)) => Msg::Error(e),
                Err(e) => Msg::Error(format!("listing {path}: {e}")),
            }
        }
        Err(e) => Msg::Error(e),
    };
    write_msg(wr, &reply).await
}

fn list_dir(path: &Path) -> Result<Vec<DirEntry>, String> {
    let dir = std::fs::read_dir(path).map_err(|e| describe(path, &e))?;
    let mut entries = Vec::new();
    for entry in dir {
        let entry = entry.map_err(|e| describe(path, &e))?;
        // An entry removed between readdir and lstat is simply skipped.
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        entries.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            size: meta.len(),
            mode: meta.mode(),
            is_dir: meta.is_dir(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// A short name of a message for error texts (never its payload).
pub fn msg_name(m: &Msg) -> &'static str {
    match m {
        Msg::Setup(_) => "Setup",
        Msg::Exec(_) => "Exec",
        Msg::WriteFile(_) => "WriteFile",
        Msg::ReadFile { .. } => "ReadFile",
        Msg::ListFiles { .. } => "ListFiles",
        Msg::Shutdown { .. } => "Shutdown",
        Msg::Stdin(_) => "Stdin",
        Msg::StdinEof => "StdinEof",
        Msg::Resize(_) => "Resize",
        Msg::Signal(_) => "Signal",
        Msg::Terminate { .. } => "Terminate",
        Msg::Started { .. } => "Started",
        Msg::Stdout(_) => "Stdout",
        Msg::Stderr(_) => "Stderr",
        Msg::Exited(_) => "Exited",
        Msg::Data(_) => "Data",
        Msg::Eof => "Eof",
        Msg::Ok => "Ok",
        Msg::Error(_) => "Error",
        Msg::FileInfo { .. } => "FileInfo",
        Msg::Entries(_) => "Entries",
        Msg::Connect { .. } => "Connect",
        Msg::Listen { .. } => "Listen",
        Msg::Listening { .. } => "Listening",
        Msg::Accepted { .. } => "Accepted",
        Msg::Accept { .. } => "Accept",
        Msg::ExportUpper { .. } => "ExportUpper",
        Msg::SetClock { .. } => "SetClock",
    }
}
