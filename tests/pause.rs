//! `matchlock pause` and `resume` through the real binary: the guest's processes, files, clock
//! and open exec streams survive; QEMU is gone while paused, its state file is private and goes
//! with the resume or the sandbox; what cannot be paused says why and runs on.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

fn detached(args: &[&str]) -> String {
    let mut all = vec!["run", "-d", "--image", BUSYBOX];
    all.extend_from_slice(args);
    ok(run(&all)).trim().lines().last().unwrap().to_string()
}

fn sh(id: &str, cmd: &str) -> String {
    ok(run(&["exec", id, "--", "sh", "-c", cmd]))
}

fn state(id: &str) -> serde_json::Value {
    let s = std::fs::read(home().join("vms").join(id).join("state.json")).unwrap();
    serde_json::from_slice(&s).unwrap()
}

#[test]
fn a_paused_sandbox_keeps_its_processes_and_gives_back_its_memory() {
    let id = detached(&[
        "--",
        "sh",
        "-c",
        "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.1; done",
    ]);
    // The loop may not have written its first number yet when the exec comes: `run -d` returns
    // as soon as the guest runs its command, not after the command's first step.
    assert!(wait_until(Duration::from_secs(30), || sh(
        &id,
        "cat /tmp/n 2>/dev/null; true"
    )
    .trim()
    .parse::<u64>()
    .is_ok_and(|n| n > 2)));
    sh(&id, "echo kept > /root/f");
    let qemu = qemu_pids(&id);
    assert_eq!(qemu.len(), 1);

    let out = ok(run(&["pause", &id]));
    assert!(out.contains("Paused"), "{out}");
    assert_eq!(status_of(&id), "paused");
    assert!(state(&id)["qemu_pid"].is_null());
    assert!(
        wait_until(Duration::from_secs(10), || qemu_pids(&id).is_empty()),
        "QEMU still runs while paused"
    );
    let file = home().join("vms").join(&id).join("paused.zst");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before: u64 = {
        // Nothing runs while paused: the guest cannot be asked, and says how to go on.
        let o = run(&["exec", &id, "--", "cat", "/tmp/n"]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains(&format!("matchlock resume {id}")),
            "{}",
            stderr(&o)
        );
        let again = run(&["pause", &id]);
        assert!(
            stderr(&again).contains("already paused"),
            "{}",
            stderr(&again)
        );
        std::thread::sleep(Duration::from_secs(2));
        ok(run(&["resume", &id]));
        sh(&id, "cat /tmp/n").trim().parse().unwrap()
    };
    assert_eq!(status_of(&id), "running");
    assert!(!file.exists(), "the state file outlived the resume");
    // The same loop counts on, from where it was, and the files are there.
    assert!(wait_until(Duration::from_secs(10), || sh(
        &id,
        "cat /tmp/n"
    )
    .trim()
    .parse::<u64>()
    .is_ok_and(|n| n > before)));
    assert_eq!(sh(&id, "cat /root/f"), "kept\n");
    // The clock caught up with the pause.
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let guest: i64 = sh(&id, "date +%s").trim().parse().unwrap();
    assert!((guest - host).abs() <= 5, "guest {guest}, host {host}");

    // Paused again, then stopped: the state file goes with it.
    ok(run(&["pause", &id]));
    ok(run(&["kill", &id]));
    assert!(!file.exists());
    assert!(qemu_pids(&id).is_empty());
}

#[test]
fn an_open_exec_carries_on_across_a_pause() {
    let id = detached(&["--", "sleep", "1000"]);
    let mut child = ml(&[
        "exec",
        "-i",
        &id,
        "--",
        "sh",
        "-c",
        "echo ready; read x; echo got $x",
    ])
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "ready\n");
    ok(run(&["pause", &id]));
    ok(run(&["resume", &id]));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    drop(stdin);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "got hello\n");
    assert!(child.wait().unwrap().success());
    ok(run(&["kill", &id]));
}

#[test]
fn a_sandbox_with_workspace_mounts_is_not_paused_and_runs_on() {
    let ws = tempfile::tempdir().unwrap();
    let vol = format!("{}:/workspace", ws.path().display());
    let id = detached(&["-v", &vol, "--", "sleep", "1000"]);
    let o = run(&["pause", &id]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("workspace mounts cannot be paused"),
        "{}",
        stderr(&o)
    );
    assert_eq!(status_of(&id), "running");
    assert_eq!(sh(&id, "echo still here"), "still here\n");
    ok(run(&["kill", &id]));
}

#[test]
fn a_damaged_state_file_is_refused_and_the_sandbox_stays_paused() {
    let id = detached(&["--", "sleep", "1000"]);
    ok(run(&["pause", &id]));
    let file = home().join("vms").join(&id).join("paused.zst");
    let mut bytes = std::fs::read(&file).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let o = run(&["resume", &id]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("corrupt"), "{}", stderr(&o));
    assert_eq!(status_of(&id), "paused");
    assert!(
        qemu_pids(&id).is_empty(),
        "the QEMU that refused the file still runs"
    );
    // Truncated is no better.
    std::fs::write(&file, &bytes[..mid]).unwrap();
    assert!(!run(&["resume", &id]).status.success());
    assert_eq!(status_of(&id), "paused");
    ok(run(&["kill", &id]));
    assert!(!file.exists());
}

#[test]
fn qemu_killed_during_the_save_leaves_no_half_written_file() {
    // Enough guest memory in use that the save takes a while.
    let id = detached(&["--memory", "768", "--", "sleep", "1000"]);
    sh(&id, "head -c 300000000 /dev/urandom > /dev/shm/fill");
    let dir = home().join("vms").join(&id);
    let pause = ml(&["pause", &id]).stderr(Stdio::piped()).spawn().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || dir
            .join("paused.partial")
            .exists()),
        "the save never started"
    );
    for pid in qemu_pids(&id) {
        // SAFETY: plain kill(2) of the sandbox's QEMU.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let out = pause.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pausing failed"));
    assert!(!dir.join("paused.partial").exists());
    assert!(!dir.join("paused.zst").exists());
    // Its VM is gone, so the sandbox is too.
    assert!(wait_until(Duration::from_secs(30), || status_of(&id) == "stopped"));
}

#[test]
fn qemu_killed_during_the_resume_leaves_it_paused_to_try_again() {
    let id = detached(&["--memory", "768", "--", "sleep", "1000"]);
    sh(
        &id,
        "head -c 300000000 /dev/urandom > /dev/shm/fill; echo kept > /root/f",
    );
    ok(run(&["pause", &id]));
    let resume = ml(&["resume", &id]).stderr(Stdio::piped()).spawn().unwrap();
    // The restore streams 300 MB into the new QEMU: it is killed midway.
    assert!(
        wait_until(Duration::from_secs(30), || !qemu_pids(&id).is_empty()),
        "no QEMU started for the resume"
    );
    std::thread::sleep(Duration::from_millis(300));
    for pid in qemu_pids(&id) {
        // SAFETY: plain kill(2) of the sandbox's QEMU.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let out = resume.wait_with_output().unwrap();
    assert!(!out.status.success(), "the resume survived its QEMU");
    assert!(String::from_utf8_lossy(&out.stderr).contains("stays paused"));
    assert_eq!(status_of(&id), "paused");
    assert!(home().join("vms").join(&id).join("paused.zst").exists());
    // The file was not harmed: the next resume brings everything back.
    ok(run(&["resume", &id]));
    assert_eq!(
        sh(&id, "cat /root/f; wc -c < /dev/shm/fill"),
        "kept\n300000000\n"
    );
    ok(run(&["kill", &id]));
}

/// A save that meets a full disk leaves nothing behind, and the sandbox runs on.
#[test]
fn a_full_disk_during_the_save_leaves_the_sandbox_running() {
    // Its own sandbox directory on a small tmpfs (root, as the other system tests).
    let mnt = tempfile::tempdir().unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let small = |args: &[&str]| ml(args).env("MATCHLOCK_HOME", mnt.path()).output().unwrap();
    let out = small(&[
        "run",
        "-d",
        "--image",
        BUSYBOX,
        "--disk-size",
        "32",
        "--",
        "sleep",
        "1000",
    ]);
    let id = ok(out).trim().lines().last().unwrap().to_string();
    // Fill what is left but a little.
    let filler = mnt.path().join("filler");
    let _ = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 100000000 /dev/zero > {}",
            filler.display()
        ))
        .status();
    let dir = mnt.path().join("vms").join(&id);
    let o = small(&["pause", &id]);
    assert!(!o.status.success(), "paused onto a full disk");
    assert!(stderr(&o).contains("pausing failed"), "{}", stderr(&o));
    assert!(!dir.join("paused.partial").exists());
    assert!(!dir.join("paused.zst").exists());
    let o = small(&["exec", &id, "--", "echo", "still here"]);
    assert_eq!(ok(o), "still here\n");
    // With room again, it pauses.
    std::fs::remove_file(&filler).unwrap();
    ok(small(&["pause", &id]));
    ok(small(&["resume", &id]));
    ok(small(&["kill", &id]));
}

#[test]
fn an_idle_sandbox_pauses_itself_and_the_next_request_wakes_it() {
    let id = detached(&["--idle-pause", "2s", "--", "sleep", "1000"]);
    // An open exec is not idle, however quiet.
    let mut cat = ml(&["exec", "-i", &id, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(status_of(&id), "running");
    drop(cat.stdin.take());
    assert!(cat.wait().unwrap().success());
    assert!(
        wait_until(Duration::from_secs(30), || status_of(&id) == "paused"),
        "never paused"
    );
    assert_eq!(state(&id)["paused"]["idle"], true);
    assert!(qemu_pids(&id).is_empty());
    // The next request resumes it and is served.
    assert_eq!(sh(&id, "echo awake"), "awake\n");
    assert_eq!(status_of(&id), "running");
    ok(run(&["kill", &id]));

    // What cannot be paused cannot ask for it.
    let ws = tempfile::tempdir().unwrap();
    let vol = format!("{}:/workspace", ws.path().display());
    let o = run(&[
        "run",
        "-d",
        "--image",
        BUSYBOX,
        "--idle-pause",
        "1m",
        "-v",
        &vol,
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--idle-pause cannot be used with workspace mounts"));
    let o = run(&["run", "-d", "--image", BUSYBOX, "--idle-pause", "10ms"]);
    assert!(stderr(&o).contains("too short"), "{}", stderr(&o));
}

/// Many pauses in a row, and the guest's network works after them (its NIC's link takes each
/// new QEMU even when nothing was sent to the guest meanwhile).
#[test]
fn the_network_works_after_many_pauses() {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 64];
            if let Ok(n) = conn.read(&mut buf) {
                let _ = conn.write_all(&buf[..n]);
            }
        }
    });
    let id = detached(&[
        "--add-host",
        "up:127.0.0.1",
        "--allow-private-host",
        "127.0.0.1",
        "--",
        "sleep",
        "1000",
    ]);
    let echo = format!("echo ping | nc -w 5 up {port}");
    assert_eq!(sh(&id, &echo), "ping\n");
    for _ in 0..6 {
        ok(run(&["pause", &id]));
        ok(run(&["resume", &id]));
    }
    assert_eq!(sh(&id, &echo), "ping\n");
    ok(run(&["kill", &id]));
}
