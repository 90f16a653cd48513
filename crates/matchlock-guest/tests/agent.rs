//! Drives the agent in `--listen-unix` test mode: exec and file requests over the real protocol,
//! on the development host, without a VM. `MATCHLOCK_GUEST_BIN` points the suite at another build
//! of the agent (the static release binary) instead of the debug one.

use matchlock_proto::mux::{Mux, Role, Stream};
use matchlock_proto::{
    read_msg, write_msg, DirEntry, ExecRequest, ExitStatus, Msg, Setup, WinSize, WriteFile, CHUNK,
    HELLO,
};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Upper bound for any single wait in these tests, so a bug fails instead of hanging.
const WAIT: Duration = Duration::from_secs(10);

struct Agent {
    child: Child,
    mux: Mux,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    // MATCHLOCK_GUEST_BIN runs the suite against another build, e.g. the static release binary.
    let bin = std::env::var_os("MATCHLOCK_GUEST_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_matchlock-guest").into());
    let child = Command::new(bin)
        .arg("--listen-unix")
        .arg(&sock)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let mut conn = loop {
        match UnixStream::connect(&sock).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("agent did not listen: {e}"),
        }
    };
    let mut hello = [0u8; 8];
    conn.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, HELLO);
    let (mux, _inbound, _driver) = Mux::start(conn, Role::Client);
    Agent {
        child,
        mux,
        _dir: dir,
    }
}

async fn recv(s: &mut Stream) -> Option<Msg> {
    tokio::time::timeout(WAIT, read_msg(s))
        .await
        .expect("timed out waiting for a message")
        .expect("bad frame")
}

async fn request(agent: &Agent, msg: Msg) -> Stream {
    let mut s = agent.mux.open().await.unwrap();
    write_msg(&mut s, &msg).await.unwrap();
    s
}

#[derive(Debug, Default)]
struct Outcome {
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    errors: Vec<String>,
    exit: Option<ExitStatus>,
}

impl Outcome {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    fn code(&self) -> i32 {
        self.exit.expect("no Exited").code
    }
}

/// Reads an exec stream to its end.
async fn collect(s: &mut Stream) -> Outcome {
    let mut o = Outcome::default();
    while let Some(m) = recv(s).await {
        match m {
            Msg::Started { pid } => o.pid = Some(pid),
            Msg::Stdout(d) => o.stdout.extend(d),
            Msg::Stderr(d) => o.stderr.extend(d),
            Msg::Error(e) => o.errors.push(e),
            Msg::Exited(st) => {
                o.exit = Some(st);
                // Exited is the last message: the stream must end right after it.
                assert_eq!(recv(s).await, None);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    o
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn cmd(a: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv(a),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..Default::default()
    }
}

async fn run(agent: &Agent, req: ExecRequest) -> Outcome {
    let mut s = request(agent, Msg::Exec(req)).await;
    collect(&mut s).await
}

/// Reads until the accumulated stdout contains `needle`; returns it.
async fn read_until(s: &mut Stream, needle: &str) -> String {
    let mut acc = Vec::new();
    loop {
        match recv(s).await {
            Some(Msg::Started { .. }) => {}
            Some(Msg::Stdout(d)) => {
                acc.extend(d);
                if String::from_utf8_lossy(&acc).contains(needle) {
                    return String::from_utf8_lossy(&acc).into_owned();
                }
            }
            other => panic!(
                "waiting for {needle:?}, got {other:?} after {:?}",
                String::from_utf8_lossy(&acc)
            ),
        }
    }
}

/// Whether `pid` is gone or a zombie (killed, waiting for someone to reap it).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
    }
}

async fn wait_dead(pid: u32) {
    let deadline = Instant::now() + WAIT;
    while !dead(pid) {
        assert!(Instant::now() < deadline, "process {pid} still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn stdout_stderr_and_exit_code() {
    let agent = start().await;
    let o = run(&agent, cmd(&["sh", "-c", "echo out; echo err >&2; exit 3"])).await;
    assert_eq!(o.out(), "out\n");
    assert_eq!(o.err(), "err\n");
    assert_eq!(
        o.exit,
        Some(ExitStatus {
            code: 3,
            signal: None
        })
    );
    assert!(o.pid.is_some());
    assert!(o.errors.is_empty());

    let o = run(&agent, cmd(&["true"])).await;
    assert_eq!(o.code(), 0);
}

#[tokio::test]
async fn large_output_is_chunked_and_complete() {
    let agent = start().await;
    let mut s = request(
        &agent,
        Msg::Exec(cmd(&["head", "-c", "1000000", "/dev/zero"])),
    )
    .await;
    let mut total = 0;
    loop {
        match recv(&mut s).await {
            Some(Msg::Stdout(d)) => {
                assert!(d.len() <= CHUNK);
                total += d.len();
            }
            Some(Msg::Exited(st)) => {
                assert_eq!(st.code, 0);
                break;
            }
            Some(Msg::Started { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(total, 1_000_000);
}

#[tokio::test]
async fn killed_by_signal_is_128_plus_n() {
    let agent = start().await;
    let o = run(&agent, cmd(&["sh", "-c", "kill -9 $$"])).await;
    assert_eq!(
        o.exit,
        Some(ExitStatus {
            code: 137,
            signal: Some(9)
        })
    );
}

#[tokio::test]
async fn stdin_pipe_and_eof() {
    let agent = start().await;
    let mut req = cmd(&["cat"]);
    req.stdin = true;
    let mut s = request(&agent, Msg::Exec(req)).await;
    write_msg(&mut s, &Msg::Stdin(b"hello ".to_vec()))
        .await
        .unwrap();
    write_msg(&mut s, &Msg::Stdin(vec![0, 1, 255]))
        .await
        .unwrap();
    write_msg(&mut s, &Msg::StdinEof).await.unwrap();
    let o = collect(&mut s).await;
    assert_eq!(o.stdout, b"hello \x00\x01\xff");
    assert_eq!(o.code(), 0);
}

#[tokio::test]
async fn stdin_is_dev_null_without_stdin() {
    let agent = start().await;
    let o = run(&agent, cmd(&["cat"])).await;
    assert_eq!(o.stdout, b"");
    assert_eq!(o.code(), 0);
}

#[tokio::test]
async fn env_is_exact_and_cwd_is_used() {
    let agent = start().await;
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().canonicalize().unwrap();
    let req = ExecRequest {
        argv: argv(&["env"]),
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("FOO".into(), "bar baz".into()),
        ],
        cwd: Some(cwd.to_str().unwrap().into()),
        ..Default::default()
    };
    let o = run(&agent, req).await;
    let mut lines: Vec<&str> = o
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    lines.sort();
    // HOME comes from /etc/passwd (root) because the request has none; nothing else leaks in.
    assert_eq!(lines, ["FOO=bar baz", "HOME=/root", "PATH=/usr/bin:/bin"]);

    let mut req = cmd(&["pwd"]);
    req.cwd = Some(cwd.to_str().unwrap().into());
    let o = run(&agent, req).await;
    assert_eq!(o.out().trim_end(), cwd.to_str().unwrap());

    let mut req = cmd(&["sh", "-c", "echo $HOME"]);
    req.env.push(("HOME".into(), "/custom".into()));
    assert_eq!(run(&agent, req).await.out(), "/custom\n");
}

#[tokio::test]
async fn argv_is_not_shell_interpreted() {
    let agent = start().await;
    let o = run(&agent, cmd(&["printf", "%s|", "a b", "$HOME", "*", "`id`"])).await;
    assert_eq!(o.out(), "a b|$HOME|*|`id`|");
}

#[tokio::test]
async fn path_comes_from_request_env() {
    let agent = start().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("my-tool");
    std::fs::write(&script, "#!/bin/sh\necho tool ran\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut req = cmd(&["my-tool"]);
    req.env = vec![(
        "PATH".into(),
        format!("/nonexistent:{}:/usr/bin:/bin", dir.path().display()),
    )];
    let o = run(&agent, req).await;
    assert_eq!(o.out(), "tool ran\n");
    assert_eq!(o.code(), 0);
}

#[tokio::test]
async fn start_failures_are_error_then_exited() {
    let agent = start().await;
    let o = run(&agent, cmd(&["definitely-not-a-command"])).await;
    assert_eq!(
        o.errors,
        ["exec: \"definitely-not-a-command\": executable file not found in $PATH"]
    );
    assert_eq!(
        o.exit,
        Some(ExitStatus {
            code: 127,
            signal: None
        })
    );
    assert_eq!(o.pid, None);

    let o = run(&agent, cmd(&["/no/such/binary"])).await;
    assert_eq!(o.code(), 127);
    assert!(o.errors[0].contains("/no/such/binary"), "{:?}", o.errors);

    // Exists but is not executable.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.txt");
    std::fs::write(&file, "x").unwrap();
    let o = run(&agent, cmd(&[file.to_str().unwrap()])).await;
    assert_eq!(o.code(), 126);
    assert!(o.errors[0].contains("ermission denied"), "{:?}", o.errors);

    let mut req = cmd(&["true"]);
    req.cwd = Some("/no/such/dir".into());
    let o = run(&agent, req).await;
    assert_eq!(o.code(), 126);
    assert!(
        o.errors[0].starts_with("working directory /no/such/dir"),
        "{:?}",
        o.errors
    );

    let mut req = cmd(&["true"]);
    req.user = Some("nosuchuser".into());
    let o = run(&agent, req).await;
    assert_eq!(o.errors, ["unknown user nosuchuser (not in /etc/passwd)"]);
    assert_eq!(o.code(), 126);

    let o = run(&agent, cmd(&[])).await;
    assert_eq!(o.code(), 126);
}

#[tokio::test]
async fn user_switch() {
    let agent = start().await;
    if !nix_is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut req = cmd(&["id"]);
    req.user = Some("65534:65534".into());
    let o = run(&agent, req).await;
    assert_eq!(
        o.out(),
        "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup)\n"
            .replace("(nogroup)", &group_suffix(65534))
    );
    assert_eq!(o.code(), 0);
}

fn nix_is_root() -> bool {
    // SAFETY: plain syscall.
    unsafe { libc::geteuid() == 0 }
}

/// `(name)` of a gid as `id` prints it, from the host's /etc/group.
fn group_suffix(gid: u32) -> String {
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    groups
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == gid.to_string()).then(|| format!("({})", f[0]))
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn unprivileged_exec_is_confined() {
    let agent = start().await;
    let o = run(
        &agent,
        cmd(&[
            "sh",
            "-c",
            "grep -E '^(CapBnd|NoNewPrivs|Seccomp):' /proc/self/status",
        ]),
    )
    .await;
    let out = o.out();
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    if nix_is_root() {
        // Docker's default set without CAP_SYS_CHROOT.
        assert!(out.contains("CapBnd:\t00000000a80025fb"), "{out}");
    }
    // A denied syscall fails with EPERM instead of working.
    let o = run(&agent, cmd(&["unshare", "-U", "true"])).await;
    assert_ne!(o.code(), 0, "unshare succeeded: {}", o.err());

    let mut req = cmd(&[
        "sh",
        "-c",
        "grep -E '^(NoNewPrivs|Seccomp):' /proc/self/status",
    ]);
    req.privileged = true;
    let out = run(&agent, req).await.out();
    assert!(out.contains("NoNewPrivs:\t0"), "{out}");
    assert!(out.contains("Seccomp:\t0"), "{out}");
}

#[tokio::test]
async fn terminate_kills_the_process_group() {
    let agent = start().await;
    let mut s = request(
        &agent,
        Msg::Exec(cmd(&["sh", "-c", "sleep 100 & echo $!; sleep 100"])),
    )
    .await;
    let out = read_until(&mut s, "\n").await;
    let bg: u32 = out.trim().parse().unwrap();
    let t0 = Instant::now();
    write_msg(&mut s, &Msg::Terminate { grace_ms: 5000 })
        .await
        .unwrap();
    let o = collect(&mut s).await;
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "SIGTERM did not end it"
    );
    assert_eq!(
        o.exit,
        Some(ExitStatus {
            code: 143,
            signal: Some(15)
        })
    );
    wait_dead(bg).await;
}

#[tokio::test]
async fn terminate_escalates_to_sigkill_after_grace() {
    let agent = start().await;
    let script = "trap '' TERM; echo ready; while :; do sleep 0.05; done";
    let mut s = request(&agent, Msg::Exec(cmd(&["sh", "-c", script]))).await;
    read_until(&mut s, "ready").await;
    let t0 = Instant::now();
    write_msg(&mut s, &Msg::Terminate { grace_ms: 300 })
        .await
        .unwrap();
    let o = collect(&mut s).await;
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        o.exit,
        Some(ExitStatus {
            code: 137,
            signal: Some(9)
        })
    );
}

#[tokio::test]
async fn signal_goes_to_the_group() {
    let agent = start().await;
    // The child must really be `sleep` before the signal: a shell that forked but has not
    // exec'd yet still runs the trap handler and would swallow it (dash loses a signal that
    // way in about one run in six). sh itself only traps TERM, so the child can die of it only
    // if the signal reached the whole group, not just sh.
    let script = "trap 'echo trapped' TERM; sleep 100 & p=$!; \
                  until [ \"$(cat /proc/$p/comm)\" = sleep ]; do :; done; \
                  echo go; wait $p; echo \"child:$?\"";
    let mut s = request(&agent, Msg::Exec(cmd(&["sh", "-c", script]))).await;
    read_until(&mut s, "go").await;
    write_msg(&mut s, &Msg::Signal(libc::SIGTERM))
        .await
        .unwrap();
    let o = collect(&mut s).await;
    assert!(o.out().contains("trapped"), "{}", o.out());
    assert!(o.out().contains("child:143"), "{}", o.out());
    assert_eq!(o.code(), 0);
}

#[tokio::test]
async fn signal_kills_with_128_plus_n() {
    let agent = start().await;
    // `exec` leaves no forked-but-not-exec'd window for the signal to fall into.
    let mut s = request(
        &agent,
        Msg::Exec(cmd(&["sh", "-c", "echo go; exec sleep 100"])),
    )
    .await;
    read_until(&mut s, "go").await;
    write_msg(&mut s, &Msg::Signal(libc::SIGINT)).await.unwrap();
    let o = collect(&mut s).await;
    assert_eq!(o.code(), 130);
}

#[tokio::test]
async fn closing_the_stream_kills_the_process() {
    let agent = start().await;
    let mut s = request(&agent, Msg::Exec(cmd(&["sleep", "100"]))).await;
    let pid = match recv(&mut s).await {
        Some(Msg::Started { pid }) => pid,
        other => panic!("{other:?}"),
    };
    assert!(!dead(pid));
    s.shutdown().await.unwrap();
    drop(s);
    wait_dead(pid).await;
}

#[tokio::test]
async fn background_child_holding_pipes_does_not_hang_exit() {
    let agent = start().await;
    let t0 = Instant::now();
    let o = run(&agent, cmd(&["sh", "-c", "sleep 3 & echo done"])).await;
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(o.out(), "done\n");
    assert_eq!(o.code(), 0);
}

/// Output written before the exit reaches the host in full even when the host stops reading for
/// a while: it is drained without a time limit (only a background child's later output has one).
#[tokio::test]
async fn output_written_before_exit_survives_a_slow_reader() {
    const LEN: usize = 1_500_000;
    let agent = start().await;
    // The process enlarges its stdout pipe to 1 MiB, writes everything and exits at once: what
    // the relay (the stream's window, the agent's queue) cannot take yet stays in the pipe, and
    // the host reads nothing for a second after that exit. The whole pipe must still arrive.
    let script = format!(
        "import fcntl, sys; fcntl.fcntl(1, 1031, 1 << 20); sys.stdout.buffer.write(b'x' * {LEN})"
    );
    let req = cmd(&["python3", "-c", &script]);
    let mut s = request(&agent, Msg::Exec(req)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut o = Outcome::default();
    while let Some(m) = recv(&mut s).await {
        match m {
            Msg::Started { .. } => {}
            Msg::Stdout(d) => o.stdout.extend(d),
            Msg::Exited(st) => {
                o.exit = Some(st);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(o.code(), 0);
    assert_eq!(o.stdout.len(), LEN);
}

/// A background child that keeps writing after the exit holds the exec open for a bounded time.
#[tokio::test]
async fn a_background_writer_does_not_hold_the_exec_forever() {
    let agent = start().await;
    let t0 = Instant::now();
    // `yes` never lets the pipe run dry; it ends by itself after 8 s, well after the exec must.
    let script = "timeout 8 yes tick & echo done";
    let o = run(&agent, cmd(&["sh", "-c", script])).await;
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "took {:?}",
        t0.elapsed()
    );
    assert!(o.out().lines().any(|l| l == "done"), "no done");
    assert_eq!(o.code(), 0);
}

fn tty_req(a: &[&str]) -> ExecRequest {
    let mut req = cmd(a);
    req.tty = Some(WinSize { rows: 24, cols: 80 });
    req.env.push(("TERM".into(), "xterm".into()));
    req
}

#[tokio::test]
async fn tty_exec_with_resize() {
    let agent = start().await;
    let mut s = request(
        &agent,
        Msg::Exec(tty_req(&[
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo isatty; stty size; read x; stty size",
        ])),
    )
    .await;
    read_until(&mut s, "24 80").await;
    write_msg(
        &mut s,
        &Msg::Resize(WinSize {
            rows: 50,
            cols: 132,
        }),
    )
    .await
    .unwrap();
    write_msg(&mut s, &Msg::Stdin(b"\n".to_vec()))
        .await
        .unwrap();
    let o = collect(&mut s).await;
    assert!(o.out().contains("50 132"), "{:?}", o.out());
    assert_eq!(o.code(), 0);
    assert!(o.stderr.is_empty());
}

#[tokio::test]
async fn tty_stdin_eof_sends_veof() {
    let agent = start().await;
    let mut s = request(&agent, Msg::Exec(tty_req(&["cat"]))).await;
    write_msg(&mut s, &Msg::Stdin(b"hi\n".to_vec()))
        .await
        .unwrap();
    write_msg(&mut s, &Msg::StdinEof).await.unwrap();
    let o = collect(&mut s).await;
    assert_eq!(o.code(), 0);
    // Echoed by the terminal, then written back by cat.
    assert!(o.out().matches("hi").count() >= 2, "{:?}", o.out());
}

#[tokio::test]
async fn tty_signal_and_stderr_merge() {
    let agent = start().await;
    let o = run(&agent, tty_req(&["sh", "-c", "echo to-stderr >&2"])).await;
    assert!(o.out().contains("to-stderr"));
    assert!(o.stderr.is_empty());

    let mut s = request(
        &agent,
        Msg::Exec(tty_req(&["sh", "-c", "echo go; sleep 100"])),
    )
    .await;
    read_until(&mut s, "go").await;
    write_msg(&mut s, &Msg::Signal(9)).await.unwrap();
    assert_eq!(collect(&mut s).await.code(), 137);
}

async fn write_file(agent: &Agent, path: &str, mode: u32, content: &[u8]) -> Msg {
    let mut s = request(
        agent,
        Msg::WriteFile(WriteFile {
            path: path.into(),
            mode,
            uid: None,
            gid: None,
        }),
    )
    .await;
    for chunk in content.chunks(CHUNK) {
        write_msg(&mut s, &Msg::Data(chunk.to_vec())).await.unwrap();
    }
    write_msg(&mut s, &Msg::Eof).await.unwrap();
    recv(&mut s).await.unwrap()
}

/// Returns `Ok((mode, content))` or the Error text.
async fn read_file(agent: &Agent, path: &str) -> Result<(u32, Vec<u8>), String> {
    let mut s = request(agent, Msg::ReadFile { path: path.into() }).await;
    let (size, mode) = match recv(&mut s).await {
        Some(Msg::FileInfo { size, mode }) => (size, mode),
        Some(Msg::Error(e)) => return Err(e),
        other => panic!("{other:?}"),
    };
    let mut content = Vec::new();
    loop {
        match recv(&mut s).await {
            Some(Msg::Data(d)) => {
                assert!(d.len() <= CHUNK);
                content.extend(d);
            }
            Some(Msg::Eof) => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(size, content.len() as u64);
    Ok((mode, content))
}

async fn list(agent: &Agent, path: &str) -> Result<Vec<DirEntry>, String> {
    let mut s = request(agent, Msg::ListFiles { path: path.into() }).await;
    match recv(&mut s).await {
        Some(Msg::Entries(e)) => Ok(e),
        Some(Msg::Error(e)) => Err(e),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn files_roundtrip_binary() {
    let agent = start().await;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap().to_string();
    let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let path = format!("{base}/new/sub/data.bin");
    assert_eq!(write_file(&agent, &path, 0o640, &content).await, Msg::Ok);
    let (mode, got) = read_file(&agent, &path).await.unwrap();
    assert_eq!(got, content);
    assert_eq!(mode & 0o7777, 0o640);
    assert_eq!(mode & libc::S_IFMT, libc::S_IFREG);

    // Replacing is atomic and leaves no temporary files behind.
    assert_eq!(write_file(&agent, &path, 0o755, b"").await, Msg::Ok);
    let (mode, got) = read_file(&agent, &path).await.unwrap();
    assert!(got.is_empty());
    assert_eq!(mode & 0o7777, 0o755);

    std::fs::write(format!("{base}/new/b.txt"), "bb").unwrap();
    let entries = list(&agent, &format!("{base}/new")).await.unwrap();
    let names: Vec<_> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.is_dir))
        .collect();
    assert_eq!(names, [("b.txt", false), ("sub", true)]);
    assert_eq!(entries[0].size, 2);
    let entries = list(&agent, &format!("{base}/new/sub")).await.unwrap();
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0].name, "data.bin");
}

#[tokio::test]
async fn file_errors() {
    let agent = start().await;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap().to_string();
    let e = read_file(&agent, &format!("{base}/missing"))
        .await
        .unwrap_err();
    assert!(e.contains("missing") && e.contains("No such file"), "{e}");
    let e = read_file(&agent, &base).await.unwrap_err();
    assert!(e.contains("is a directory"), "{e}");
    let e = read_file(&agent, "relative/path").await.unwrap_err();
    assert!(e.contains("must be absolute"), "{e}");
    let e = list(&agent, "relative").await.unwrap_err();
    assert!(e.contains("must be absolute"), "{e}");
    let e = list(&agent, &format!("{base}/missing")).await.unwrap_err();
    assert!(e.contains("No such file"), "{e}");
    match write_file(&agent, "relative.txt", 0o644, b"x").await {
        Msg::Error(e) => assert!(e.contains("must be absolute"), "{e}"),
        other => panic!("{other:?}"),
    }
    // A path under a regular file cannot be created.
    std::fs::write(format!("{base}/file"), "x").unwrap();
    match write_file(&agent, &format!("{base}/file/below"), 0o644, b"x").await {
        Msg::Error(_) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn bad_requests_get_an_error_and_do_not_hurt_the_session() {
    let agent = start().await;
    // Not a request.
    let mut s = request(&agent, Msg::Stdin(b"x".to_vec())).await;
    assert!(matches!(recv(&mut s).await, Some(Msg::Error(_))));
    assert_eq!(recv(&mut s).await, None);
    // Garbage bytes.
    let mut s = agent.mux.open().await.unwrap();
    s.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await.unwrap();
    s.flush().await.unwrap();
    match recv(&mut s).await {
        Some(Msg::Error(e)) => assert!(e.starts_with("bad request"), "{e}"),
        other => panic!("{other:?}"),
    }
    // The session still works.
    assert_eq!(run(&agent, cmd(&["true"])).await.code(), 0);
}

#[tokio::test]
async fn setup_once_then_shutdown_exits() {
    let mut agent = start().await;
    let mut s = request(&agent, Msg::Setup(Setup::default())).await;
    assert_eq!(recv(&mut s).await, Some(Msg::Ok));
    let mut s = request(&agent, Msg::Setup(Setup::default())).await;
    assert!(matches!(recv(&mut s).await, Some(Msg::Error(_))));

    let mut s = request(&agent, Msg::Shutdown { grace_ms: 100 }).await;
    assert_eq!(recv(&mut s).await, Some(Msg::Ok));
    drop(s);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            assert!(status.success());
            break;
        }
        assert!(Instant::now() < deadline, "agent did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn many_concurrent_execs() {
    let agent = start().await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut s = request(&agent, Msg::Exec(cmd(&["sh", "-c", &format!("echo {i}")]))).await;
        tasks.push(tokio::spawn(async move { (i, collect(&mut s).await) }));
    }
    for t in tasks {
        let (i, o) = t.await.unwrap();
        assert_eq!(o.out(), format!("{i}\n"));
        assert_eq!(o.code(), 0);
    }
}

#[tokio::test]
async fn listen_announces_connections_the_host_takes_and_closing_stops_it() {
    let agent = start().await;
    let mut listen = request(&agent, Msg::Listen { port: 0 }).await;
    let port = match recv(&mut listen).await {
        Some(Msg::Listening { port }) => port,
        other => panic!("expected Listening, got {other:?}"),
    };
    assert_ne!(port, 0);
    let mut peer = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let id = match recv(&mut listen).await {
        Some(Msg::Accepted { id }) => id,
        other => panic!("expected Accepted, got {other:?}"),
    };
    // Taken once: a second Accept of the same id is an error, as is an unknown one.
    let mut taken = request(&agent, Msg::Accept { id }).await;
    assert_eq!(recv(&mut taken).await, Some(Msg::Ok));
    for bad in [id, id + 1000] {
        let mut again = request(&agent, Msg::Accept { id: bad }).await;
        assert!(matches!(recv(&mut again).await, Some(Msg::Error(_))));
    }
    peer.write_all(b"to host").await.unwrap();
    assert_eq!(recv(&mut taken).await, Some(Msg::Data(b"to host".to_vec())));
    write_msg(&mut taken, &Msg::Data(b"to guest".to_vec()))
        .await
        .unwrap();
    let mut buf = [0u8; 8];
    tokio::time::timeout(WAIT, peer.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"to guest");
    // The port is taken while listening; closing the stream frees it.
    let mut twice = request(&agent, Msg::Listen { port }).await;
    assert!(matches!(recv(&mut twice).await, Some(Msg::Error(_))));
    drop(listen);
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "still listening on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn sftp_server_mode_serves_the_protocol_on_stdio() {
    // SSH_FXP_INIT version 3; the reply is SSH_FXP_VERSION (2) with 3 and the extensions.
    let bin = std::env::var_os("MATCHLOCK_GUEST_BIN")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_matchlock-guest").into());
    let out = Command::new(bin)
        .arg("--sftp-server")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3])?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    assert_eq!(&out.stdout[4..9], &[2, 0, 0, 0, 3], "{:?}", out.stdout);
    let text = String::from_utf8_lossy(&out.stdout);
    for ext in [
        "posix-rename@openssh.com",
        "limits@openssh.com",
        "expand-path@openssh.com",
    ] {
        assert!(text.contains(ext), "{text:?}");
    }
}
