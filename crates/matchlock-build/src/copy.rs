//! `COPY` and `ADD` from the build context, made on the host: the matched files become one
//! layer tar, with no sandbox to start. The rules are Docker's: sources are relative to the
//! context and cannot leave it; wildcards match per path segment; a directory source copies
//! its contents; several sources need a destination ending in `/`; files are owned by root
//! unless `--chown`; `--chmod` sets every mode; `.dockerignore` leaves paths out; `ADD`
//! unpacks local tar archives (plain, gzip, bzip2, xz or zstd), as Docker does.
//!
//! The cache key is the layer's content without modification times, so a fresh checkout of
//! the same files hits the cache while the layer still carries the times.

use crate::stage::{CopySource, CopyStep};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// A layer holding only the directory `dir` (absolute), root's, mode 0755: what `WORKDIR` adds
/// when the image lacks it (missing parents come with it, as the unpacker makes them).
pub fn dir_layer(dir: &str, out: impl io::Write) -> Result<(), String> {
    let mut b = tar::Builder::new(out);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(0);
    let path = format!("{}/", dir.trim_matches('/'));
    b.append_data(&mut h, &path, io::empty())
        .map_err(|e| format!("writing {dir}: {e}"))?;
    b.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| format!("writing {dir}: {e}"))
}

/// `.dockerignore`'s patterns, in order; `!` marks an exception.
#[derive(Debug, Clone, Default)]
pub struct Ignore {
    rules: Vec<(bool, Vec<String>)>,
}

impl Ignore {
    /// Parses `.dockerignore` text.
    pub fn parse(text: &str) -> Ignore {
        let mut rules = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, pat) = match line.strip_prefix('!') {
                Some(p) => (true, p.trim()),
                None => (false, line),
            };
            let segs: Vec<String> = pat
                .split('/')
                .filter(|s| !s.is_empty() && *s != ".")
                .map(str::to_string)
                .collect();
            if !segs.is_empty() {
                rules.push((exception, segs));
            }
        }
        Ignore { rules }
    }

    /// Whether the context path `rel` (relative, `/`-separated) is left out: the last rule that
    /// matches it or one of its parents decides.
    pub fn ignored(&self, rel: &str) -> bool {
        let segs: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
        let mut out = false;
        for (exception, pat) in &self.rules {
            let hit = (1..=segs.len()).any(|n| match_path(pat, &segs[..n]));
            if hit {
                out = !exception;
            }
        }
        out
    }
}

/// `pat` (segments, `**` for any number) against `path` (segments).
fn match_path(pat: &[String], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| match_path(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((p, prest)) => glob(first, p) && match_path(rest, prest),
            None => false,
        },
    }
}

/// Go's `filepath.Match` for one segment: `*`, `?`, `[...]` (with `^`/`!` and ranges), `\`.
pub fn glob(pat: &str, name: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    glob_at(&p, &n)
}

fn glob_at(p: &[char], n: &[char]) -> bool {
    match p.first() {
        None => n.is_empty(),
        Some('*') => (0..=n.len()).any(|i| glob_at(&p[1..], &n[i..])),
        Some('?') => !n.is_empty() && glob_at(&p[1..], &n[1..]),
        Some('[') => {
            let Some(c) = n.first() else { return false };
            let mut i = 1;
            let negate = matches!(p.get(1), Some('^') | Some('!'));
            if negate {
                i += 1;
            }
            let mut matched = false;
            let mut first = true;
            while let Some(&pc) = p.get(i) {
                if pc == ']' && !first {
                    break;
                }
                first = false;
                let lo = if pc == '\\' {
                    i += 1;
                    p.get(i).copied().unwrap_or('\\')
                } else {
                    pc
                };
                if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|c| *c != ']') {
                    let hi = p[i + 2];
                    matched |= lo <= *c && *c <= hi;
                    i += 3;
                } else {
                    matched |= lo == *c;
                    i += 1;
                }
            }
            if p.get(i) != Some(&']') {
                return false; // malformed class: no match, as Go reports
            }
            matched != negate && glob_at(&p[i + 1..], &n[1..])
        }
        Some('\\') if p.len() > 1 => n.first() == Some(&p[1]) && glob_at(&p[2..], &n[1..]),
        Some(c) => n.first() == Some(c) && glob_at(&p[1..], &n[1..]),
    }
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// A source path made relative to the context, `..` resolved without leaving it.
fn clean(src: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for c in Path::new(src).components() {
        match c {
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::ParentDir => {
                out.pop()
                    .ok_or_else(|| format!("{src}: outside the build context"))?;
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The owner of copied files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// User id.
    pub uid: u64,
    /// Group id.
    pub gid: u64,
}

/// The layer a copy makes, and its cache key.
#[derive(Debug)]
pub struct CopyLayer {
    /// Entries written.
    pub entries: usize,
    /// Digest of the content without times (for the cache).
    pub key: String,
}

/// Where an entry for a path lands in the image: `(path, is_dir)` to the path with the
/// image's links among its directories followed (and the path itself, for a directory), as a
/// copy into the mounted image would follow them. Relative paths, `/`-separated.
pub type Place<'a> = &'a mut dyn FnMut(&str, bool) -> Result<String, String>;

struct Writer<'a, W: io::Write> {
    b: tar::Builder<W>,
    place: Place<'a>,
    key: Sha256,
    entries: usize,
    owner: Option<Owner>,
    chmod: Option<u32>,
}

impl<W: io::Write> Writer<'_, W> {
    fn header(
        &mut self,
        kind: tar::EntryType,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        let mode = self.chmod.unwrap_or(mode & 0o7777);
        h.set_mode(mode);
        let (uid, gid) = self.owner.map_or((uid, gid), |o| (o.uid, o.gid));
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(mtime);
        h
    }

    fn note(&mut self, path: &str, h: &tar::Header, content: &[u8], link: &str) {
        self.entries += 1;
        for part in [
            path.as_bytes(),
            &[h.entry_type().as_byte()],
            &h.mode().unwrap_or(0).to_be_bytes(),
            &h.uid().unwrap_or(0).to_be_bytes(),
            &h.gid().unwrap_or(0).to_be_bytes(),
            link.as_bytes(),
            content,
        ] {
            self.key.update((part.len() as u64).to_be_bytes());
            self.key.update(part);
        }
    }

    /// A regular file of `size` bytes read from `content` as it is written (a big file, or an
    /// archive that unpacks to one, is never held in memory); content that ends early or
    /// fails is an error, never a short entry.
    #[allow(clippy::too_many_arguments)]
    fn file(
        &mut self,
        path: &str,
        content: &mut dyn Read,
        size: u64,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> Result<(), String> {
        let path = &(self.place)(path, false)?;
        let mut h = self.header(tar::EntryType::Regular, mode, uid, gid, mtime);
        h.set_size(size);
        let mut r = Exact {
            inner: content.take(size),
            sha: Sha256::new(),
            left: size,
        };
        self.b
            .append_data(&mut h, path, &mut r)
            .map_err(|e| format!("writing {path}: {e}"))?;
        let digest = r.sha.finalize();
        self.note(path, &h, &digest, "");
        Ok(())
    }

    fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64, mtime: u64) -> Result<(), String> {
        let path = &(self.place)(path, true)?;
        let mut h = self.header(tar::EntryType::Directory, mode, uid, gid, mtime);
        h.set_size(0);
        self.note(path, &h, b"", "");
        self.b
            .append_data(&mut h, format!("{path}/"), io::empty())
            .map_err(|e| format!("writing {path}: {e}"))
    }

    fn symlink(
        &mut self,
        path: &str,
        target: &Path,
        uid: u64,
        gid: u64,
        mtime: u64,
    ) -> Result<(), String> {
        let path = &(self.place)(path, false)?;
        let mut h = self.header(tar::EntryType::Symlink, 0o777, uid, gid, mtime);
        h.set_mode(0o777);
        h.set_size(0);
        self.note(path, &h, b"", &target.to_string_lossy());
        self.b
            .append_link(&mut h, path, target)
            .map_err(|e| format!("writing {path}: {e}"))
    }
}

/// A file's content read exactly `left` more bytes, hashed on the way: ending early is an
/// error (the tar writer would otherwise pad a short entry without a word).
struct Exact<R> {
    inner: R,
    sha: Sha256,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes short (did it change during the build?)",
                    self.left
                ),
            ));
        }
        self.sha.update(&buf[..n]);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes `step`'s layer (sources from `context`, left out by `ignore`) to `out`, each entry
/// where `place` puts it.
pub fn copy_layer(
    step: &CopyStep,
    context: &Path,
    ignore: &Ignore,
    owner: Option<Owner>,
    place: Place<'_>,
    out: impl io::Write,
) -> Result<CopyLayer, String> {
    let mut w = Writer {
        b: tar::Builder::new(out),
        place,
        key: Sha256::new(),
        entries: 0,
        owner,
        chmod: step.chmod,
    };
    // What each source names: (context-relative path, its file name).
    let mut matches: Vec<(PathBuf, String)> = Vec::new();
    let mut inline = Vec::new();
    let mut fetched = Vec::new();
    for s in &step.sources {
        match s {
            CopySource::Inline { name, content } => inline.push((name.clone(), content.clone())),
            CopySource::Fetched { file, name, mtime } => fetched.push((file, name, *mtime)),
            CopySource::Url(u) => {
                return Err(format!(
                    "{u}: not fetched (the builder fetches URL sources first)"
                ))
            }
            CopySource::Path(src) => {
                let segs = clean(src)?;
                let found = if segs.iter().any(|s| has_glob(s)) {
                    expand(context, &segs, ignore)?
                } else {
                    let rel = segs.join("/");
                    let exists =
                        fs::symlink_metadata(host(context, Path::new(&rel), true)?).is_ok();
                    let link = !exists
                        && fs::symlink_metadata(host(context, Path::new(&rel), false)?)
                            .is_ok_and(|m| m.file_type().is_symlink());
                    if !exists || (!rel.is_empty() && ignore.ignored(&rel)) {
                        return Err(format!(
                            "{src}: not found in the build context{}",
                            if exists {
                                " (.dockerignore leaves it out)"
                            } else if link {
                                " (it is a link, followed inside the context only)"
                            } else {
                                ""
                            }
                        ));
                    }
                    vec![PathBuf::from(rel)]
                };
                if found.is_empty() {
                    return Err(format!("{src}: no file in the build context matches"));
                }
                for f in found {
                    let name = f
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    matches.push((f, name));
                }
            }
        }
    }
    let many = matches.len() + inline.len() + fetched.len() > 1;
    let dest_dir = step.dest.ends_with('/');
    if many && !dest_dir {
        return Err(format!(
            "with more than one source the destination must be a directory ending in / ({} is not)",
            step.dest
        ));
    }
    let dest = step
        .dest
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_string();
    let at = |name: &str| -> String {
        if dest_dir || dest.is_empty() {
            if dest.is_empty() {
                name.to_string()
            } else {
                format!("{dest}/{name}")
            }
        } else {
            dest.clone()
        }
    };
    for (name, content) in inline {
        w.file(
            &at(&name),
            &mut content.as_bytes(),
            content.len() as u64,
            0o644,
            0,
            0,
            0,
        )?;
    }
    // A source that is a link is followed (inside the context), as BuildKit does; the copy
    // keeps the source's name. Links inside a copied directory stay links.
    for (file, name, mtime) in fetched {
        let mut f = fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let len = f
            .metadata()
            .map_err(|e| format!("{}: {e}", file.display()))?
            .len();
        // Docker gives a downloaded file mode 0600, and never unpacks it.
        w.file(&at(name), &mut f, len, 0o600, 0, 0, mtime)?;
    }
    // `--parents`: each source keeps its path from the context's root under the destination.
    let under = |rel: &Path| -> String {
        let rel = rel.to_string_lossy();
        match (dest.is_empty(), rel.is_empty()) {
            (_, true) => dest.clone(),
            (true, false) => rel.into_owned(),
            (false, false) => format!("{dest}/{rel}"),
        }
    };
    for (rel, name) in matches {
        let full = host(context, &rel, true)?;
        let meta = fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", rel.display()))?;
        let target_dir = if step.parents {
            under(&rel)
        } else {
            dest.clone()
        };
        if meta.is_dir() {
            // A directory's contents go to the destination itself.
            walk(&mut w, &full, &rel, &target_dir, ignore)?;
        } else {
            let kind = (step.add && meta.is_file())
                .then(|| archive_kind(&full))
                .flatten();
            let at_file = if step.parents { under(&rel) } else { at(&name) };
            match kind {
                Some(kind) => unpack(&mut w, &full, kind, &dest)?,
                None => entry(&mut w, &full, &meta, &at_file)?,
            }
        }
    }
    let entries = w.entries;
    let key = hex::encode(w.key.clone().finalize());
    w.b.into_inner()
        .map_err(|e| format!("writing the layer: {e}"))?
        .flush()
        .map_err(|e| format!("writing the layer: {e}"))?;
    Ok(CopyLayer { entries, key })
}

/// The context paths `segs` (some with wildcards) match, sorted.
fn expand(context: &Path, segs: &[String], ignore: &Ignore) -> Result<Vec<PathBuf>, String> {
    let mut found = vec![PathBuf::new()];
    for seg in segs {
        let mut next = Vec::new();
        for base in &found {
            if !has_glob(seg) {
                let p = base.join(seg);
                if fs::symlink_metadata(host(context, &p, false)?).is_ok() {
                    next.push(p);
                }
                continue;
            }
            let Ok(list) = fs::read_dir(host(context, base, true)?) else {
                continue;
            };
            let mut names: Vec<String> = list
                .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .filter(|n| glob(seg, n))
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| base.join(n)));
        }
        found = next;
    }
    found.retain(|p| !ignore.ignored(&p.to_string_lossy()));
    Ok(found)
}

/// Adds everything below the directory `dir` (the context's `rel`) at `dest`, in name order.
/// Links inside are copied as links, never followed.
fn walk<W: io::Write>(
    w: &mut Writer<'_, W>,
    dir: &Path,
    rel: &Path,
    dest: &str,
    ignore: &Ignore,
) -> Result<(), String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", rel.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    for name in names {
        let child = rel.join(&name);
        if ignore.ignored(&child.to_string_lossy()) {
            continue;
        }
        let full = dir.join(&name);
        let name = name.to_string_lossy();
        let at = if dest.is_empty() {
            name.to_string()
        } else {
            format!("{dest}/{name}")
        };
        let meta = fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", child.display()))?;
        if meta.is_dir() {
            w.dir(&at, meta.mode(), 0, 0, mtime(&meta))?;
            walk(w, &full, &child, &at, ignore)?;
        } else {
            entry(w, &full, &meta, &at)?;
        }
    }
    Ok(())
}

/// The context's file `rel` (`Dockerfile`, `.dockerignore`) with every link on the way, its
/// own included, resolved inside the context: a cloned repository's `Dockerfile` linking to a
/// host file must not be read (its text would be quoted in the parse error).
pub fn context_file(context: &Path, rel: &str) -> Result<PathBuf, String> {
    host(context, Path::new(rel), true)
}

/// The host path of the context path `rel`. Links among its directories (and, with
/// `follow_last`, the last component) are followed inside the context and never out of it: a
/// link to `/etc` in a cloned repository means the context's `etc`, as Docker's scoped
/// resolution has it, so a Dockerfile cannot copy the host's files into an image.
fn host(context: &Path, rel: &Path, follow_last: bool) -> Result<PathBuf, String> {
    let mut todo: Vec<std::ffi::OsString> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(s) => todo.push(s.to_os_string()),
            Component::ParentDir => todo.push("..".into()),
            _ => {}
        }
    }
    let last = if follow_last { None } else { todo.pop() };
    todo.reverse();
    let mut done: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    let at =
        |done: &[std::ffi::OsString]| done.iter().fold(context.to_path_buf(), |p, s| p.join(s));
    while let Some(seg) = todo.pop() {
        if seg == ".." {
            done.pop();
            continue;
        }
        let here = at(&done).join(&seg);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(format!("{}: too many symbolic links", rel.display()));
                }
                let target = fs::read_link(&here).map_err(|e| format!("{}: {e}", rel.display()))?;
                if target.is_absolute() {
                    done.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => todo.push(s.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => done.push(seg),
        }
    }
    let mut out = at(&done);
    if let Some(l) = last {
        out.push(l);
    }
    Ok(out)
}

fn mtime(meta: &fs::Metadata) -> u64 {
    meta.mtime().max(0) as u64
}

/// One file or symlink of the context at `at`. Owner root unless `--chown` (the context's
/// owners mean nothing in the image).
fn entry<W: io::Write>(
    w: &mut Writer<'_, W>,
    full: &Path,
    meta: &fs::Metadata,
    at: &str,
) -> Result<(), String> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(full).map_err(|e| format!("{at}: {e}"))?;
        return w.symlink(at, &target, 0, 0, mtime(meta));
    }
    if ft.is_fifo() || ft.is_socket() || ft.is_char_device() || ft.is_block_device() {
        return Err(format!(
            "{}: a special file cannot be copied",
            full.display()
        ));
    }
    // Not through a link put in its place since it was looked at.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(full)
        .map_err(|e| format!("{}: {e}", full.display()))?;
    w.file(at, &mut f, meta.len(), meta.mode(), 0, 0, mtime(meta))
}

/// How an `ADD` source is compressed, when it is an archive `ADD` unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Archive {
    Tar,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

/// Sniffs `path` as Docker does: the compression by its magic bytes (gzip, bzip2, xz, zstd),
/// then whether what it holds starts with a valid tar header. `None` for anything else (a
/// gzipped text file too), which `ADD` copies as it is.
fn archive_kind(path: &Path) -> Option<Archive> {
    let mut magic = [0u8; 6];
    let n = read_full(&mut fs::File::open(path).ok()?, &mut magic);
    let magic = &magic[..n];
    let kind = if magic.starts_with(&[0x1f, 0x8b]) {
        Archive::Gzip
    } else if magic.starts_with(b"BZh") {
        Archive::Bzip2
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Archive::Xz
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Archive::Zstd
    } else {
        Archive::Tar
    };
    let mut header = [0u8; 512];
    let n = read_full(&mut decoder(path, kind).ok()?, &mut header);
    if n < header.len() {
        return None;
    }
    // A tar header is one whose checksum adds up (old v7 headers have no `ustar` magic).
    let mut h = tar::Header::new_old();
    h.as_mut_bytes().copy_from_slice(&header);
    let stored = h.cksum().ok()?;
    h.set_cksum();
    (h.cksum().ok()? == stored).then_some(kind)
}

/// Reads until `buf` is full or the stream ends (or fails); how many bytes it got.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    n
}

/// The archive at `path`, decompressed.
fn decoder(path: &Path, kind: Archive) -> io::Result<Box<dyn Read>> {
    let file = io::BufReader::new(fs::File::open(path)?);
    Ok(match kind {
        Archive::Tar => Box::new(file),
        Archive::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(file)),
        Archive::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(file)),
        Archive::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(file)),
        Archive::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(file)?),
    })
}

/// `ADD` of a local archive: its entries under `dest` with their own owners and modes.
fn unpack<W: io::Write>(
    w: &mut Writer<'_, W>,
    archive: &Path,
    kind: Archive,
    dest: &str,
) -> Result<(), String> {
    let bad = |e: io::Error| format!("{}: {e}", archive.display());
    let reader = decoder(archive, kind).map_err(bad)?;
    let mut a = tar::Archive::new(reader);
    for e in a.entries().map_err(bad)? {
        let mut e = e.map_err(bad)?;
        let raw = e.path().map_err(bad)?.to_string_lossy().into_owned();
        let segs = clean(&raw)
            .map_err(|_| format!("{}: entry {raw} leaves the archive", archive.display()))?;
        if segs.is_empty() {
            continue;
        }
        let at = if dest.is_empty() {
            segs.join("/")
        } else {
            format!("{dest}/{}", segs.join("/"))
        };
        let h = e.header().clone();
        let (mode, uid, gid, mt) = (
            h.mode().unwrap_or(0o644),
            h.uid().unwrap_or(0),
            h.gid().unwrap_or(0),
            h.mtime().unwrap_or(0),
        );
        match h.entry_type() {
            tar::EntryType::Directory => w.dir(&at, mode, uid, gid, mt)?,
            tar::EntryType::Symlink => {
                let target = e.link_name().map_err(bad)?.unwrap_or_default().into_owned();
                w.symlink(&at, &target, uid, gid, mt)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = h.size().map_err(bad)?;
                w.file(&at, &mut e, size, mode, uid, gid, mt)?;
            }
            // Hard links, devices and the rest: not what a build context's archive carries.
            other => {
                return Err(format!(
                    "{}: entry {raw} is a {other:?}; ADD unpacks files, directories and symlinks",
                    archive.display()
                ))
            }
        }
    }
    // Read to the end, so that a corrupt tail (the gzip or xz checksum) is an error too.
    io::copy(&mut a.into_inner(), &mut io::sink()).map_err(bad)?;
    Ok(())
}

#[cfg(test)]
mod tests;
