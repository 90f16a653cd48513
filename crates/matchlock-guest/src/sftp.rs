//! `matchlock-guest --sftp-server`: an SFTP (version 3) server on stdin/stdout, so `sftp` and
//! `scp` through `matchlock ssh` work in any image, with or without OpenSSH's `sftp-server`.
//!
//! The host's SSH server starts it like any exec (argv [`matchlock_proto::SFTP_SERVER_ARGV`]): as
//! the SSH user, with that user's seccomp filter, capabilities and cgroup, so every file access
//! is checked by the guest kernel exactly as the user's own programs are. Serving SFTP on the
//! host over the agent's root file requests would have bypassed the guest's permissions.
//!
//! `russh-sftp` decodes and encodes the protocol; this module maps each request onto the file
//! system. OpenSSH's extensions that its clients use are served: `posix-rename`, `hardlink`,
//! `fsync`, `statvfs`, `limits` and `expand-path` (scp's `~` paths).

use russh_sftp::extensions::{self as ext, LimitsExtension, Statvfs};
use russh_sftp::protocol::{
    Attrs, Data, ExtendedReply, File, FileAttributes, Handle, Name, OpenFlags, Packet, Status,
    StatusCode, Version,
};
use russh_sftp::server::StatusReply;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read or write served, advertised through `limits@openssh.com` (OpenSSH's own value).
const MAX_IO: u32 = 256 * 1024;
/// Largest request packet accepted: a write of [`MAX_IO`] plus its header.
const MAX_PACKET: u32 = MAX_IO + 1024;
/// Open handles per session: a client cannot exhaust the guest's file descriptors.
const MAX_HANDLES: usize = 256;
/// Directory entries per `READDIR` reply.
const READDIR_BATCH: usize = 128;

/// Runs the server until the client closes stdin; the process exit code.
pub fn main() -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::log(format_args!("sftp-server: {e}"));
            return 1;
        }
    };
    // Relative paths are relative to the home directory, as with OpenSSH's sftp-server.
    let home = std::env::var("HOME").unwrap_or_else(|_| "/".into());
    if std::env::set_current_dir(&home).is_err() {
        let _ = std::env::set_current_dir("/");
    }
    rt.block_on(async {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let stdio = Stdio {
            io: tokio::io::join(tokio::io::stdin(), tokio::io::stdout()),
            _done: done_tx,
        };
        let cfg = russh_sftp::server::Config {
            max_client_packet_len: MAX_PACKET,
        };
        russh_sftp::server::run_with_config(stdio, Server::new(), cfg).await;
        // The server task drops its stream when the client has gone.
        let _ = done_rx.await;
    });
    0
}

/// stdin and stdout as one stream. Every I/O error reads as end of file: the library's loop
/// stops only on EOF, and a broken stdout must end the server, not spin it.
struct Stdio {
    io: tokio::io::Join<tokio::io::Stdin, tokio::io::Stdout>,
    _done: tokio::sync::oneshot::Sender<()>,
}

fn as_eof<T>(r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
    r.map_err(|e| io::Error::new(io::ErrorKind::UnexpectedEof, e))
}

impl AsyncRead for Stdio {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        as_eof(Pin::new(&mut self.io).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stdio {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        as_eof(Pin::new(&mut self.io).poll_write(cx, buf))
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        as_eof(Pin::new(&mut self.io).poll_flush(cx))
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        as_eof(Pin::new(&mut self.io).poll_shutdown(cx))
    }
}

enum Open {
    File(fs::File),
    /// A directory being listed: the entries still to send.
    Dir(PathBuf, Option<fs::ReadDir>),
}

/// One client's state: its open handles, and the guest's user and group names for `ls -l`.
struct Server {
    handles: HashMap<String, Open>,
    next: u64,
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

/// An error as the client sees it: the status code, and the path in the message.
fn fail(path: &Path, e: io::Error) -> StatusReply {
    let code = match e.kind() {
        io::ErrorKind::NotFound => StatusCode::NoSuchFile,
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        io::ErrorKind::Unsupported => StatusCode::OpUnsupported,
        _ => StatusCode::Failure,
    };
    code.with_message(format!("{}: {e}", path.display()))
}

fn ok(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Ok".into(),
        language_tag: "en-US".into(),
    }
}

fn bad_handle() -> StatusReply {
    StatusCode::Failure.with_message("no such handle")
}

/// The attributes of `meta`, in SFTP's version 3 form.
fn attrs(meta: &fs::Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(meta.size()),
        uid: Some(meta.uid()),
        user: None,
        gid: Some(meta.gid()),
        group: None,
        permissions: Some(meta.mode()),
        // Version 3 carries 32-bit times.
        atime: Some(meta.atime().clamp(0, u32::MAX as i64) as u32),
        mtime: Some(meta.mtime().clamp(0, u32::MAX as i64) as u32),
    }
}

/// `path` made absolute against the working directory and with `.` and `..` resolved by name:
/// what `REALPATH` answers for a path that does not exist (yet), as scp asks for its target.
fn normalize(path: &Path) -> PathBuf {
    let base = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let mut out = PathBuf::from("/");
    for c in base.join(path).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// `chmod`, `chown`, truncate and times from `a`, in the order OpenSSH's server applies them.
fn apply(path: &Path, file: Option<&fs::File>, a: &FileAttributes) -> io::Result<()> {
    if let Some(size) = a.size {
        match file {
            Some(f) => f.set_len(size)?,
            None => fs::OpenOptions::new()
                .write(true)
                .open(path)?
                .set_len(size)?,
        }
    }
    if let Some(mode) = a.permissions {
        let perms = fs::Permissions::from_mode(mode & 0o7777);
        match file {
            Some(f) => f.set_permissions(perms)?,
            None => fs::set_permissions(path, perms)?,
        }
    }
    if let (Some(atime), Some(mtime)) = (a.atime, a.mtime) {
        let at = nix::sys::time::TimeSpec::new(atime.into(), 0);
        let mt = nix::sys::time::TimeSpec::new(mtime.into(), 0);
        match file {
            Some(f) => nix::sys::stat::futimens(std::os::fd::AsRawFd::as_raw_fd(f), &at, &mt)?,
            None => nix::sys::stat::utimensat(
                None,
                path,
                &at,
                &mt,
                nix::sys::stat::UtimensatFlags::FollowSymlink,
            )?,
        }
    }
    if a.uid.is_some() || a.gid.is_some() {
        match file {
            Some(f) => std::os::unix::fs::fchown(f, a.uid, a.gid)?,
            None => std::os::unix::fs::chown(path, a.uid, a.gid)?,
        }
    }
    Ok(())
}

/// A string field of an extension request (SSH wire format: length, then bytes).
fn ext_strings<const N: usize>(data: Vec<u8>) -> Result<[String; N], StatusReply> {
    let mut rest = &data[..];
    let mut out: [String; N] = std::array::from_fn(|_| String::new());
    for slot in &mut out {
        let malformed = || StatusCode::BadMessage.with_message("malformed extension request");
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(malformed)?;
        let len = u32::from_be_bytes(*len) as usize;
        let s = tail.get(..len).ok_or_else(malformed)?;
        *slot = String::from_utf8(s.to_vec()).map_err(|_| malformed())?;
        rest = &tail[len..];
    }
    Ok(out)
}

fn reply<T: serde::Serialize>(id: u32, value: &T) -> Result<Packet, StatusReply> {
    let data = russh_sftp::ser::to_bytes(value)
        .map_err(|e| StatusCode::Failure.with_message(e.to_string()))?;
    Ok(Packet::ExtendedReply(ExtendedReply {
        id,
        data: data.to_vec(),
    }))
}

impl Server {
    fn new() -> Server {
        let names = |path: &str, parse: fn(&str) -> Vec<(u32, String)>| {
            crate::users::read_db(path)
                .map(|t| parse(&t).into_iter().collect())
                .unwrap_or_default()
        };
        Server {
            handles: HashMap::new(),
            next: 0,
            users: names(crate::users::PASSWD, |t| {
                crate::users::parse_passwd(t)
                    .into_iter()
                    .map(|e| (e.uid, e.name))
                    .collect()
            }),
            groups: names(crate::users::GROUP, |t| {
                crate::users::parse_group(t)
                    .into_iter()
                    .map(|e| (e.gid, e.name))
                    .collect()
            }),
        }
    }

    fn insert(&mut self, open: Open) -> Result<String, StatusReply> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(StatusCode::Failure.with_message("too many open handles"));
        }
        self.next += 1;
        let h = self.next.to_string();
        self.handles.insert(h.clone(), open);
        Ok(h)
    }

    fn file(&self, handle: &str) -> Result<&fs::File, StatusReply> {
        match self.handles.get(handle) {
            Some(Open::File(f)) => Ok(f),
            _ => Err(bad_handle()),
        }
    }

    /// `ls -l`'s line for an entry, which `sftp`'s `ls -l` prints as is.
    fn longname(&self, name: &str, meta: &fs::Metadata) -> String {
        let mode = meta.mode();
        let kind = match mode & libc::S_IFMT {
            libc::S_IFDIR => 'd',
            libc::S_IFLNK => 'l',
            libc::S_IFCHR => 'c',
            libc::S_IFBLK => 'b',
            libc::S_IFIFO => 'p',
            libc::S_IFSOCK => 's',
            _ => '-',
        };
        let mut perms = String::with_capacity(9);
        for (shift, special, set_char) in [(6, 0o4000, 's'), (3, 0o2000, 's'), (0, 0o1000, 't')] {
            let bits = (mode >> shift) & 7;
            perms.push(if bits & 4 != 0 { 'r' } else { '-' });
            perms.push(if bits & 2 != 0 { 'w' } else { '-' });
            perms.push(match (bits & 1 != 0, mode & special != 0) {
                (true, true) => set_char,
                (false, true) => set_char.to_ascii_uppercase(),
                (true, false) => 'x',
                (false, false) => '-',
            });
        }
        let user = self
            .users
            .get(&meta.uid())
            .cloned()
            .unwrap_or_else(|| meta.uid().to_string());
        let group = self
            .groups
            .get(&meta.gid())
            .cloned()
            .unwrap_or_else(|| meta.gid().to_string());
        format!(
            "{kind}{perms} {:>4} {user:<8} {group:<8} {:>8} {} {name}",
            meta.nlink(),
            meta.size(),
            mtime_text(meta.mtime())
        )
    }
}

/// `Mon DD HH:MM` (UTC), the shape `ls -l` gives a recent file.
fn mtime_text(secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    format!(
        "{} {day:>2} {:02}:{:02}",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60
    )
}

impl russh_sftp::server::Handler for Server {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.into()
    }

    async fn init(
        &mut self,
        _version: u32,
        _extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        let mut v = Version::new();
        // The versions OpenSSH's clients check for (statvfs is at its version 2).
        for (name, version) in [
            ("posix-rename@openssh.com", "1"),
            (ext::HARDLINK, "1"),
            (ext::FSYNC, "1"),
            (ext::STATVFS, "2"),
            (ext::LIMITS, "1"),
            (ext::EXPAND_PATH, "1"),
        ] {
            v.extensions.insert(name.into(), version.into());
        }
        Ok(v)
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        let path = Path::new(&filename);
        let mut o = fs::OpenOptions::new();
        o.read(pflags.contains(OpenFlags::READ))
            .write(pflags.contains(OpenFlags::WRITE))
            .append(pflags.contains(OpenFlags::APPEND))
            .truncate(pflags.contains(OpenFlags::TRUNCATE))
            .mode(attrs.permissions.map_or(0o666, |m| m & 0o7777))
            // A FIFO must not hang the server.
            .custom_flags(libc::O_NONBLOCK);
        if pflags.contains(OpenFlags::EXCLUDE) {
            o.create_new(true);
        } else {
            o.create(pflags.contains(OpenFlags::CREATE));
        }
        let file = o.open(path).map_err(|e| fail(path, e))?;
        let handle = self.insert(Open::File(file))?;
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        self.handles.remove(&handle).ok_or_else(bad_handle)?;
        Ok(ok(id))
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let file = self.file(&handle)?;
        let mut buf = vec![0; len.min(MAX_IO) as usize];
        let n = loop {
            match file.read_at(&mut buf, offset) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| fail(Path::new("read"), e))?,
            }
        };
        if n == 0 && !buf.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        buf.truncate(n);
        Ok(Data { id, data: buf })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        file.write_all_at(&data, offset)
            .map_err(|e| fail(Path::new("write"), e))?;
        Ok(ok(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let p = Path::new(&path);
        let meta = fs::symlink_metadata(p).map_err(|e| fail(p, e))?;
        Ok(Attrs {
            id,
            attrs: attrs(&meta),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let meta = match self.handles.get(&handle) {
            Some(Open::File(f)) => f.metadata(),
            Some(Open::Dir(p, _)) => fs::metadata(p),
            None => return Err(bad_handle()),
        };
        let meta = meta.map_err(|e| fail(Path::new("fstat"), e))?;
        Ok(Attrs {
            id,
            attrs: attrs(&meta),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let p = Path::new(&path);
        apply(p, None, &attrs).map_err(|e| fail(p, e))?;
        Ok(ok(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        apply(Path::new("fsetstat"), Some(file), &attrs)
            .map_err(|e| fail(Path::new("fsetstat"), e))?;
        Ok(ok(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        let p = PathBuf::from(&path);
        let entries = fs::read_dir(&p).map_err(|e| fail(&p, e))?;
        let handle = self.insert(Open::Dir(p, Some(entries)))?;
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(Open::Dir(_, entries)) = self.handles.get_mut(&handle) else {
            return Err(bad_handle());
        };
        let mut batch = Vec::new();
        if let Some(iter) = entries {
            for entry in iter.by_ref().take(READDIR_BATCH) {
                let Ok(entry) = entry else { continue };
                // An entry removed since the listing began is skipped, as `ls` would.
                let Ok(meta) = fs::symlink_metadata(entry.path()) else {
                    continue;
                };
                batch.push((entry.file_name().to_string_lossy().into_owned(), meta));
            }
            if batch.is_empty() {
                *entries = None;
            }
        }
        if batch.is_empty() {
            return Err(StatusCode::Eof.into());
        }
        let files = batch
            .iter()
            .map(|(name, meta)| File {
                filename: name.clone(),
                longname: self.longname(name, meta),
                attrs: attrs(meta),
            })
            .collect();
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        let p = Path::new(&filename);
        fs::remove_file(p).map_err(|e| fail(p, e))?;
        Ok(ok(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let p = Path::new(&path);
        std::os::unix::fs::DirBuilderExt::mode(
            &mut fs::DirBuilder::new(),
            attrs.permissions.map_or(0o777, |m| m & 0o7777),
        )
        .create(p)
        .map_err(|e| fail(p, e))?;
        Ok(ok(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        let p = Path::new(&path);
        fs::remove_dir(p).map_err(|e| fail(p, e))?;
        Ok(ok(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = Path::new(if path.is_empty() { "." } else { &path });
        let real = fs::canonicalize(p).unwrap_or_else(|_| normalize(p));
        Ok(Name {
            id,
            files: vec![File::dummy(real.to_string_lossy())],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        let p = Path::new(&path);
        let meta = fs::metadata(p).map_err(|e| fail(p, e))?;
        Ok(Attrs {
            id,
            attrs: attrs(&meta),
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        // Version 3's rename must not replace an existing target (posix-rename does).
        let new = Path::new(&newpath);
        if fs::symlink_metadata(new).is_ok() {
            return Err(fail(new, io::Error::from(io::ErrorKind::AlreadyExists)));
        }
        fs::rename(&oldpath, new).map_err(|e| fail(Path::new(&oldpath), e))?;
        Ok(ok(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let p = Path::new(&path);
        let target = fs::read_link(p).map_err(|e| fail(p, e))?;
        Ok(Name {
            id,
            files: vec![File::dummy(target.to_string_lossy())],
        })
    }

    async fn symlink(
        &mut self,
        id: u32,
        linkpath: String,
        targetpath: String,
    ) -> Result<Status, Self::Error> {
        // OpenSSH sends the link's target first and the link's own path second (the reverse of
        // the draft's names, which russh-sftp uses); its clients and servers agree on that order.
        let (target, link) = (linkpath, targetpath);
        std::os::unix::fs::symlink(&target, &link).map_err(|e| fail(Path::new(&link), e))?;
        Ok(ok(id))
    }

    async fn extended(
        &mut self,
        id: u32,
        request: String,
        data: Vec<u8>,
    ) -> Result<Packet, Self::Error> {
        match request.as_str() {
            "posix-rename@openssh.com" => {
                let [old, new] = ext_strings::<2>(data)?;
                fs::rename(&old, &new).map_err(|e| fail(Path::new(&old), e))?;
                Ok(ok(id).into())
            }
            ext::HARDLINK => {
                let [old, new] = ext_strings::<2>(data)?;
                fs::hard_link(&old, &new).map_err(|e| fail(Path::new(&new), e))?;
                Ok(ok(id).into())
            }
            ext::FSYNC => {
                let [handle] = ext_strings::<1>(data)?;
                self.file(&handle)?
                    .sync_all()
                    .map_err(|e| fail(Path::new("fsync"), e))?;
                Ok(ok(id).into())
            }
            ext::STATVFS => {
                let [path] = ext_strings::<1>(data)?;
                let p = Path::new(&path);
                let s = nix::sys::statvfs::statvfs(p).map_err(|e| fail(p, e.into()))?;
                reply(
                    id,
                    &Statvfs {
                        block_size: s.block_size(),
                        fragment_size: s.fragment_size(),
                        blocks: s.blocks(),
                        blocks_free: s.blocks_free(),
                        blocks_avail: s.blocks_available(),
                        inodes: s.files(),
                        inodes_free: s.files_free(),
                        inodes_avail: s.files_available(),
                        fs_id: s.filesystem_id(),
                        flags: s.flags().bits(),
                        name_max: s.name_max(),
                    },
                )
            }
            ext::LIMITS => reply(
                id,
                &LimitsExtension {
                    max_packet_len: MAX_PACKET.into(),
                    max_read_len: MAX_IO.into(),
                    max_write_len: MAX_IO.into(),
                    max_open_handles: MAX_HANDLES as u64,
                },
            ),
            ext::EXPAND_PATH => {
                let [path] = ext_strings::<1>(data)?;
                let expanded = expand_tilde(&path)?;
                let p = Path::new(&expanded);
                let real = fs::canonicalize(p).unwrap_or_else(|_| normalize(p));
                Ok(Name {
                    id,
                    files: vec![File::dummy(real.to_string_lossy())],
                }
                .into())
            }
            _ => Err(StatusCode::OpUnsupported.with_message(format!("{request}: not supported"))),
        }
    }
}

/// `~` and `~/x` are the user's home, `~name/x` that user's, as a shell (and sftp-server) says.
fn expand_tilde(path: &str) -> Result<String, StatusReply> {
    let Some(rest) = path.strip_prefix('~') else {
        return Ok(path.to_string());
    };
    let (user, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let home = if user.is_empty() {
        std::env::var("HOME").unwrap_or_else(|_| "/".into())
    } else {
        crate::users::lookup(Some(user))
            .map_err(|e| StatusCode::NoSuchFile.with_message(e.to_string()))?
            .home
    };
    Ok(if tail.is_empty() {
        home
    } else {
        format!("{}/{tail}", home.trim_end_matches('/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtime_text_is_a_civil_date() {
        assert_eq!(mtime_text(0), "Jan  1 00:00");
        // 2026-12-07 18:15:25 UTC
        assert_eq!(mtime_text(1_796_667_325), "Dec  7 18:15");
    }

    #[test]
    fn normalize_resolves_dots_by_name() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("/../..")), PathBuf::from("/"));
    }

    #[test]
    fn extension_strings_are_bounded() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"abc");
        assert_eq!(ext_strings::<1>(d.clone()).unwrap(), ["abc".to_string()]);
        assert!(ext_strings::<2>(d).is_err());
        assert!(ext_strings::<1>(vec![0, 0, 0, 9, b'x']).is_err());
        assert!(ext_strings::<1>(vec![0, 0]).is_err());
    }

    #[test]
    fn tilde_expands_only_at_the_start() {
        std::env::set_var("HOME", "/home/u");
        assert_eq!(expand_tilde("~").unwrap(), "/home/u");
        assert_eq!(expand_tilde("~/x/y").unwrap(), "/home/u/x/y");
        assert_eq!(expand_tilde("/a/~").unwrap(), "/a/~");
    }
}
