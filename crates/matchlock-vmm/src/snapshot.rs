//! Saving a VM's memory and device state to a file and starting a fresh QEMU from it, with QEMU's
//! own migration stream.
//!
//! QEMU runs with `-sandbox on,spawn=deny`, so it cannot pipe the stream through a compressor
//! itself (`exec:` migration): it migrates to a Unix socket the caller listens on (save), or
//! listens on one (`-incoming defer`, then `migrate-incoming unix:PATH`: restore), and this
//! module moves the bytes between that socket and a zstd file. A template's save and restore set
//! `x-ignore-shared` (QEMU 7.2 takes it only over QMP), so its RAM, shared with a file, is left to
//! the file ([`crate::qemu::RamFile`]); both ends of one stream must agree on it, since it changes
//! the stream's layout. A pause never sets it: its stream must hold all of the guest's RAM,
//! whatever the RAM is backed by. The file's sha256 is checked while it streams, and the restored
//! VM is only resumed (`cont`) when it matched: a corrupt snapshot never runs.

use crate::qmp::{accept_within, Qmp};
use sha2::Digest;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a save or a restore may take, end to end. Idle guests save in well under a second;
/// the bound only catches a wedged QEMU.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// What a save wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Bytes of QEMU's migration stream.
    pub stream_bytes: u64,
    /// Bytes of the compressed file.
    pub file_bytes: u64,
    /// Hex sha256 of the file.
    pub sha256: String,
}

/// Stops the VM and saves its state to `out` (zstd, mode 0600), through a socket at `sock`,
/// leaving out RAM shared with a file when `ignore_shared`. The VM stays stopped. `out` appears
/// whole or not at all.
pub fn save(qmp: &mut Qmp, sock: &Path, out: &Path, ignore_shared: bool) -> Result<Saved, String> {
    let started = Instant::now();
    set_ignore_shared(qmp, ignore_shared)?;
    qmp.execute("stop", None)?;
    let _ = std::fs::remove_file(sock);
    let listener = UnixListener::bind(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    let tmp = out.with_extension("partial");
    let result = (|| {
        qmp.execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("unix:{}", sock.display()) })),
        )?;
        let mut conn = accept_within(&listener, TIMEOUT)
            .map_err(|e| format!("QEMU did not start the migration: {e}"))?;
        conn.set_read_timeout(Some(TIMEOUT))
            .map_err(|e| e.to_string())?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        let hashing = HashWriter {
            inner: file,
            hash: sha2::Sha256::new(),
            bytes: 0,
        };
        let mut enc = zstd::Encoder::new(hashing, 1).map_err(|e| e.to_string())?;
        let stream_bytes = std::io::copy(&mut conn, &mut enc)
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        let hashing = enc
            .finish()
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        hashing
            .inner
            .sync_all()
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        // The stream ending is not enough: QEMU says whether what it sent was all of it.
        loop {
            let (status, error) = qmp.migration()?;
            match status.as_str() {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(format!(
                        "QEMU's migration {status}: {}",
                        error.unwrap_or_default()
                    ))
                }
                _ if started.elapsed() > TIMEOUT => {
                    return Err(format!("the save did not finish within {TIMEOUT:?}"))
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        std::fs::rename(&tmp, out).map_err(|e| format!("{}: {e}", out.display()))?;
        Ok(Saved {
            stream_bytes,
            file_bytes: hashing.bytes,
            sha256: hex::encode(hashing.hash.finalize()),
        })
    })();
    drop(listener);
    let _ = std::fs::remove_file(sock);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Feeds `state` (written by [`save`] with the same `ignore_shared`, expected to hash to
/// `sha256`) to a QEMU started with `-incoming defer`, through a socket at `sock`, and resumes
/// the VM once it has loaded and the file proved intact. On any error the VM has not run a
/// single instruction of the snapshot: the caller kills it.
pub fn restore(
    qmp: &mut Qmp,
    sock: &Path,
    state: &Path,
    sha256: &str,
    ignore_shared: bool,
) -> Result<(), String> {
    let started = Instant::now();
    let file = std::fs::File::open(state).map_err(|e| format!("{}: {e}", state.display()))?;
    set_ignore_shared(qmp, ignore_shared)?;
    let _ = std::fs::remove_file(sock);
    qmp.execute(
        "migrate-incoming",
        Some(serde_json::json!({ "uri": format!("unix:{}", sock.display()) })),
    )?;
    let mut conn = loop {
        match UnixStream::connect(sock) {
            Ok(c) => break c,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => return Err(format!("QEMU is not waiting for the snapshot: {e}")),
        }
    };
    conn.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut hashing = HashReader {
        inner: std::io::BufReader::with_capacity(1 << 20, file),
        hash: sha2::Sha256::new(),
    };
    let copied =
        zstd::Decoder::new(&mut hashing).and_then(|mut dec| std::io::copy(&mut dec, &mut conn));
    // Whatever the decoder stopped at, the hash covers the whole file.
    let _ = std::io::copy(&mut hashing, &mut std::io::sink());
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let intact = hex::encode(hashing.hash.finalize()) == sha256;
    // A damaged file is named as such, whatever QEMU or the decoder made of it first.
    if !intact {
        return Err(format!(
            "the snapshot {} is corrupt (its checksum does not match)",
            state.display()
        ));
    }
    if let Err(e) = copied {
        return Err(format!(
            "QEMU did not take the snapshot {}: {e}",
            state.display()
        ));
    }
    loop {
        let status = qmp.status()?;
        match status.as_str() {
            "inmigrate" if started.elapsed() < TIMEOUT => {
                std::thread::sleep(Duration::from_millis(2))
            }
            "paused" | "postmigrate" | "prelaunch" => break,
            "running" => return Ok(()),
            other => {
                let (_, error) = qmp.migration().unwrap_or_default();
                return Err(format!(
                    "QEMU did not load the snapshot ({other}{})",
                    error.map(|e| format!(": {e}")).unwrap_or_default()
                ));
            }
        }
    }
    let (status, error) = qmp.migration()?;
    if status != "completed" {
        return Err(format!(
            "QEMU did not load the snapshot ({status}{})",
            error.map(|e| format!(": {e}")).unwrap_or_default()
        ));
    }
    qmp.execute("cont", None)?;
    Ok(())
}

/// Whether RAM shared with a file is left out of the stream (see the module's doc).
fn set_ignore_shared(qmp: &mut Qmp, on: bool) -> Result<(), String> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": on }]
        })),
    )
    .map(|_| ())
}

struct HashWriter<W> {
    inner: W,
    hash: sha2::Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

struct HashReader<R> {
    inner: R,
    hash: sha2::Sha256,
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}
