//! Small helpers: hashing streams, decompression sniffing, atomic writes, locking, tool lookup.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::ImageError;

/// A reader that hashes everything read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Read the rest of the stream (so the digest covers all of it) and return `sha256:<hex>`.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Wrap `reader` in the right decompressor, sniffing gzip / zstd magic bytes; anything else is
/// passed through (an uncompressed tar). Media types are not trusted because `docker save` and
/// some registries label layers inconsistently.
pub(crate) fn decompress<'a, R: Read + 'a>(reader: R) -> io::Result<Box<dyn Read + 'a>> {
    let mut buf = BufReader::with_capacity(256 * 1024, reader);
    let head = buf.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(buf)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(buf)?))
    } else {
        Ok(Box::new(buf))
    }
}

/// `sha256:<hex>` => `<hex>`, validating the form so it is safe to use as a file name.
pub(crate) fn digest_hex(digest: &str) -> Result<&str, ImageError> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| {
        ImageError::archive(format!(
            "unsupported digest \"{digest}\" (only sha256 is supported)"
        ))
    })?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(ImageError::archive(format!(
            "malformed digest \"{digest}\""
        )));
    }
    Ok(hex)
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique across processes and threads: `<prefix>-<pid>-<nanos>-<n>`. The pid lets a
/// later import recognise (and sweep) directories of processes that died.
pub(crate) fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{nanos}-{n}", std::process::id())
}

/// Whether a process with this pid exists (EPERM still means it exists).
pub(crate) fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Write `data` to `dest` atomically: temp file in `tmp_dir` (same file system), fsync, rename.
pub(crate) fn atomic_write(tmp_dir: &Path, dest: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = tmp_dir.join(unique_name("write"));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dest)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(ImageError::io(format!("writing {}", dest.display()), e));
    }
    Ok(())
}

/// An exclusive flock on a file, released on drop. Serialises tag/rootfs/blob updates between
/// processes sharing one store.
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    pub(crate) fn exclusive(path: &Path) -> Result<FileLock, ImageError> {
        // Without LOCK_NB flock blocks instead of failing with EWOULDBLOCK, so this is Some.
        Self::take(path, libc::LOCK_EX)?.ok_or_else(|| {
            ImageError::io(
                format!("locking {}", path.display()),
                io::ErrorKind::WouldBlock.into(),
            )
        })
    }

    /// A shared lock (blocking): many holders at once, none while someone holds it exclusively.
    pub(crate) fn shared(path: &Path) -> Result<FileLock, ImageError> {
        // Without LOCK_NB flock blocks instead of failing with EWOULDBLOCK, so this is Some.
        Self::take(path, libc::LOCK_SH)?.ok_or_else(|| {
            ImageError::io(
                format!("locking {}", path.display()),
                io::ErrorKind::WouldBlock.into(),
            )
        })
    }

    /// An exclusive lock if nobody holds the file locked now, else `None`.
    pub(crate) fn try_exclusive(path: &Path) -> Result<Option<FileLock>, ImageError> {
        Self::take(path, libc::LOCK_EX | libc::LOCK_NB)
    }

    fn take(path: &Path, op: libc::c_int) -> Result<Option<FileLock>, ImageError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ImageError::io(format!("opening lock file {}", path.display()), e))?;
        loop {
            // SAFETY: flock on a valid, owned descriptor.
            let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
            if rc == 0 {
                return Ok(Some(FileLock { _file: file }));
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(ImageError::io(format!("locking {}", path.display()), err));
            }
        }
    }
}

/// Find `tool` in `PATH` (plus the sbin directories, where e2fsprogs lives but which ordinary
/// users often lack in their `PATH`).
pub(crate) fn find_tool(tool: &str, package: &str) -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from);
    for dir in std::env::split_paths(&path).chain(extra) {
        let candidate = dir.join(tool);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            use std::os::unix::fs::PermissionsExt;
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(ImageError::MissingTool {
        tool: tool.to_string(),
        package: package.to_string(),
    })
}

/// Fold a tool's stderr into one bounded line for an error message.
pub(crate) fn one_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.len() > 600 {
        let mut cut = 600;
        while !line.is_char_boundary(cut) {
            cut -= 1;
        }
        line.truncate(cut);
        line.push_str("...");
    }
    if line.is_empty() {
        line.push_str("(no output)");
    }
    line
}

/// The effective uid of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no failure modes.
    unsafe { libc::geteuid() }
}

/// Read a small file (JSON documents) with a size cap, so a hostile archive cannot make us
/// allocate unbounded memory.
pub(crate) fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    let f = File::open(path).map_err(|e| ImageError::io(format!("reading {what}"), e))?;
    let mut out = Vec::new();
    f.take(cap + 1)
        .read_to_end(&mut out)
        .map_err(|e| ImageError::io(format!("reading {what}"), e))?;
    if out.len() as u64 > cap {
        return Err(ImageError::archive(format!(
            "{what} is larger than {cap} bytes"
        )));
    }
    Ok(out)
}

/// `sha256:<hex>` and length of a file's contents.
pub(crate) fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let file = File::open(path)?;
    HashingReader::new(BufReader::with_capacity(1 << 20, file)).finish()
}

/// Size of the chunks handed from the decompressing thread to the consumer.
const PIPE_CHUNK: usize = 256 * 1024;
/// Chunks in flight: 2 MiB of slack lets both threads run without waiting on each other.
const PIPE_DEPTH: usize = 8;

/// Feeds the decompressed (gzip/zstd/plain, sniffed) contents of `input` to `consume`, while
/// another thread does the decompression and the sha256 of the decompressed stream: untarring
/// and decompressing then use two cores, like `tar -xz` with its gzip child. Returns what
/// `consume` returned and `(sha256:<hex>, length)` of the whole decompressed stream (read to the
/// end even when `consume` stops early, so the digest always covers everything).
pub(crate) fn with_decompressed<T>(
    input: impl Read + Send,
    consume: impl FnOnce(&mut dyn Read) -> T,
) -> (T, io::Result<(String, u64)>) {
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(PIPE_DEPTH);
        let producer = scope.spawn(move || -> io::Result<(String, u64)> {
            let mut hashing = HashingReader::new(decompress(input)?);
            let mut listening = true;
            loop {
                let mut buf = vec![0u8; PIPE_CHUNK];
                let n = match hashing.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let copy = io::Error::new(e.kind(), e.to_string());
                        if listening {
                            let _ = tx.send(Err(copy));
                        }
                        return Err(e);
                    }
                };
                buf.truncate(n);
                // The consumer may stop before the end (tar's end marker, or an error); keep
                // hashing the rest anyway.
                listening = listening && tx.send(Ok(buf)).is_ok();
            }
            hashing.finish()
        });
        let mut reader = ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        let out = consume(&mut reader);
        drop(reader);
        let digest = producer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the decompressing thread panicked")));
        (out, digest)
    })
}

/// The receiving end of [`with_decompressed`]'s pipe.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.buf = chunk?;
                    self.pos = 0;
                }
                // The producer hung up: end of stream (its error, if any, was sent first).
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
