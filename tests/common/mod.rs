//! Shared helpers for the end-to-end tests: they drive the real `matchlock` binary, which boots real
//! VMs (TCG on machines without a usable KVM).
//!
//! Each test binary gets its own `MATCHLOCK_HOME` (sandbox state) and imports the busybox test images
//! once into the normal image cache under test-only tags. The guest kernel and agent must have been
//! built first (`scripts/test` does it).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Plain busybox image (Cmd ["sh"]).
pub const BUSYBOX: &str = "mltest/busybox:1";
/// Busybox image with ENTRYPOINT ["/bin/echo","entry:"], CMD ["default-cmd"], USER app,
/// WORKDIR /home/app.
pub const ENTRY: &str = "mltest/entry:1";

/// Busybox plus the host's python3 and its standard library (`scripts/make-python-image`).
pub const PYTHON: &str = "mltest/python:1";

/// Imports the python test image once per test binary and returns its name.
pub fn python_image() -> &'static str {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| build_and_import("make-python-image", &[], PYTHON));
    PYTHON
}

/// Builds a test image with `scripts/<script> TAR args...` and imports it as `tag`.
fn build_and_import(script: &str, args: &[&str], tag: &str) {
    let work = tempfile::tempdir().expect("temp dir");
    let tar = work.path().join("image.tar");
    let st = Command::new(repo_root().join("scripts").join(script))
        .arg(&tar)
        .args(args)
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
    assert!(st.success(), "scripts/{script} failed");
    // The image store is shared by every test binary (not under MATCHLOCK_HOME).
    let out = Command::new(bin())
        .args(["image", "import", tag])
        .stdin(std::fs::File::open(&tar).unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "image import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Env {
    home: tempfile::TempDir,
}

static ENV: OnceLock<Env> = OnceLock::new();

/// At the test binary's exit: stops every sandbox it left running (a failed test never reaches
/// its `kill`) and removes its home, templates and all. A static is never dropped, so without
/// this every run left its home behind in /tmp.
extern "C" fn clean_up_home() {
    let Some(e) = ENV.get() else {
        return;
    };
    let home = e.home.path();
    if let Ok(vms) = std::fs::read_dir(home.join("vms")) {
        for vm in vms.flatten() {
            let _ = Command::new(bin())
                .arg("kill")
                .arg(vm.file_name())
                .env("MATCHLOCK_HOME", home)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
    let _ = std::fs::remove_dir_all(home);
}

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let home = tempfile::Builder::new()
            .prefix("mlt")
            .tempdir_in("/tmp")
            .expect("temp dir");
        // SAFETY: registers a function that takes no arguments and does not unwind.
        unsafe { libc::atexit(clean_up_home) };
        for (tag, extra) in [(BUSYBOX, &[][..]), (ENTRY, &["--with-entrypoint"][..])] {
            build_and_import("make-busybox-image", extra, tag);
        }
        Env { home }
    })
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The matchlock binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_matchlock")
}

/// The per-test-binary state directory.
pub fn home() -> &'static Path {
    env().home.path()
}

/// A `matchlock` command with the test state directory.
pub fn ml(args: &[&str]) -> Command {
    let e = env();
    let mut c = Command::new(bin());
    c.args(args)
        .env("MATCHLOCK_HOME", e.home.path())
        .stdin(Stdio::null());
    c
}

/// Runs `matchlock args...` and returns its output.
pub fn run(args: &[&str]) -> Output {
    ml(args).output().expect("spawn matchlock")
}

/// Runs with bytes on stdin.
pub fn run_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = ml(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn matchlock");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// Stdout as a string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Stderr as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "matchlock failed ({:?})\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// A sandbox kept running for several checks; killed and removed on drop.
pub struct Sandbox {
    /// Its id.
    pub id: String,
}

impl Sandbox {
    /// Starts `run -d` with extra flags and `command` as the detached process.
    pub fn detached(flags: &[&str], command: &[&str]) -> Sandbox {
        Self::detached_from(BUSYBOX, flags, command)
    }

    /// Like [`Sandbox::detached`], from `image`.
    pub fn detached_from(image: &str, flags: &[&str], command: &[&str]) -> Sandbox {
        let mut args = vec!["run", "-d", "--image", image];
        args.extend_from_slice(flags);
        args.push("--");
        args.extend_from_slice(command);
        let id = ok(run(&args)).trim().to_string();
        assert!(id.starts_with("vm-"), "unexpected id {id:?}");
        Sandbox { id }
    }

    /// `matchlock exec <id> <args...>`.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut a = vec!["exec", self.id.as_str()];
        a.extend_from_slice(args);
        run(&a)
    }

    /// Status column of `matchlock list` for this sandbox.
    pub fn status(&self) -> String {
        status_of(&self.id)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = run(&["kill", &self.id]);
        let _ = run(&["rm", &self.id]);
    }
}

/// Status column of `matchlock list` for `id` ("" if absent).
pub fn status_of(id: &str) -> String {
    let out = stdout(&run(&["list"]));
    out.lines()
        .find(|l| l.starts_with(id))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("")
        .to_string()
}

/// Polls `f` until it is true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}

/// Pids of QEMU processes whose command line mentions `needle`.
pub fn qemu_pids(needle: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for ent in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = ent.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(ent.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(needle) {
            pids.push(pid);
        }
    }
    pids
}

/// The first line a pipe gives.
pub fn first_line(pipe: impl std::io::Read) -> String {
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(pipe), &mut line).unwrap();
    line
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `data`, half-closes, and returns everything the peer sent back until it closed.
pub fn round_trip(port: u16, data: &[u8]) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    s.write_all(data).ok()?;
    s.shutdown(std::net::Shutdown::Write).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    Some(out)
}

/// A plain HTTP/1.1 server on 127.0.0.1, a thread per connection: each request's head (request
/// line and headers) goes to `answer`, whose return (a whole response) is written back. Its port.
pub fn http_server(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let answer = std::sync::Arc::new(answer);
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let answer = answer.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match std::io::Read::read(&mut c, &mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let _ = std::io::Write::write_all(&mut c, answer(&head).as_bytes());
            });
        }
    });
    port
}

/// The path of a request head's request line.
pub fn request_path(head: &str) -> &str {
    head.split_whitespace().nth(1).unwrap_or("/")
}

/// A `200 OK` response carrying `body`.
pub fn http_ok(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The sandbox id in a `run --rm=false` stderr's "Sandbox ID is running" line.
pub fn running_id(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("Sandbox ")
                .and_then(|r| r.strip_suffix(" is running"))
        })
        .unwrap_or_else(|| panic!("no 'Sandbox ID is running' line: {stderr}"))
        .to_string()
}

/// A directory's files (one level), named with their contents, sorted: to see that nothing in
/// it changed.
pub fn dir_snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let data = std::fs::read(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), data)
        })
        .collect();
    v.sort();
    v
}
