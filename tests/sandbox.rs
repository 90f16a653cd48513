//! End-to-end tests of sandboxes: each boots real VMs through the `matchlock` binary.

#[path = "common/mod.rs"]
mod common;

use common::*;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// One long-lived sandbox serves every check that only needs `exec`.
#[test]
fn exec_behaviours_in_one_sandbox() {
    let sb = Sandbox::detached(&[], &["sh", "-c", "echo detached-ok; exec sleep 100000"]);
    let id = sb.id.clone();
    assert_eq!(sb.status(), "running");

    // Plain output and exit codes, including death by signal (128 + n).
    assert_eq!(ok(sb.exec(&["echo", "hello"])), "hello\n");
    assert_eq!(sb.exec(&["sh", "-c", "exit 7"]).status.code(), Some(7));
    assert_eq!(
        sb.exec(&["sh", "-c", "kill -9 $$"]).status.code(),
        Some(137)
    );
    let o = sb.exec(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
    assert_eq!(
        (stdout(&o).as_str(), stderr(&o).as_str(), o.status.code()),
        ("out\n", "err\n", Some(3))
    );

    // argv runs without a shell: no word splitting or expansion.
    assert_eq!(ok(sb.exec(&["/bin/echo", "a  b", "$HOME"])), "a  b $HOME\n");
    let o = sb.exec(&["no-such-command"]);
    assert_eq!(o.status.code(), Some(127), "stderr: {}", stderr(&o));
    assert!(stderr(&o).contains("no-such-command"), "{}", stderr(&o));

    // Stdin: binary data round-trips through cat; EOF ends the process.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let o = run_stdin(&["exec", "-i", &id, "--", "cat"], &data);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout.len(), data.len());
    assert!(o.stdout == data, "stdin bytes were altered");
    // Without -i the process gets /dev/null.
    assert_eq!(ok(sb.exec(&["wc", "-c"])).trim(), "0");

    // TTY: a real terminal with the default size when ours is not one.
    let out = ok(sb.exec(&["-t", "--", "sh", "-c", "tty; stty size"]));
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("24 80"), "{out}");
    let o = run_stdin(
        &["exec", "-it", &id, "--", "sh"],
        b"echo hi-from-$((40+2))\nexit 3\n",
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(stdout(&o).contains("hi-from-42"), "{}", stdout(&o));

    // Environment, user, workdir.
    assert_eq!(
        ok(sb.exec(&["-e", "FOO=bar baz", "--", "sh", "-c", "echo $FOO"])),
        "bar baz\n"
    );
    std::env::set_var("ML_TEST_COPIED", "copied");
    assert_eq!(
        ok(sb.exec(&[
            "-e",
            "ML_TEST_COPIED",
            "--",
            "sh",
            "-c",
            "echo $ML_TEST_COPIED"
        ])),
        "copied\n"
    );
    assert_eq!(ok(sb.exec(&["id", "-u"])).trim(), "0");
    let o = ok(sb.exec(&["-u", "app", "--", "id"]));
    assert!(
        o.contains("uid=1000(app)") && o.contains("gid=1000(app)") && o.contains("50(staff)"),
        "{o}"
    );
    assert_eq!(
        ok(sb.exec(&["-u", "app", "--", "sh", "-c", "echo $HOME"])),
        "/home/app\n"
    );
    assert!(ok(sb.exec(&["-u", "1000:50", "--", "id"])).contains("uid=1000(app) gid=50(staff)"));
    assert!(ok(sb.exec(&["-u", "nobody", "--", "id", "-u"])).contains("65534"));
    let o = sb.exec(&["-u", "ghost", "--", "id"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("ghost"), "{}", stderr(&o));
    assert_eq!(ok(sb.exec(&["pwd"])), "/\n");
    assert_eq!(ok(sb.exec(&["-w", "/tmp", "--", "pwd"])), "/tmp\n");

    // Identity of the sandbox.
    assert_eq!(ok(sb.exec(&["hostname"])).trim(), id);
    assert!(ok(sb.exec(&["cat", "/etc/hosts"])).contains(&id));

    // Not privileged: no mounting, even as root; the root filesystem is an overlay.
    let o = sb.exec(&["mount", "-t", "tmpfs", "x", "/tmp"]);
    assert_ne!(o.status.code(), Some(0), "mount should be refused");
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));
    assert!(ok(sb.exec(&["cat", "/proc/mounts"])).contains("overlay / overlay"));

    // Confined view of the kernel: no disks or console in /dev, read-only /sys and /proc/sys,
    // but the ordinary devices work for every user.
    assert_eq!(sb.exec(&["test", "-e", "/dev/vda"]).status.code(), Some(1));
    assert_eq!(
        sb.exec(&["test", "-e", "/dev/ttyS0"]).status.code(),
        Some(1)
    );
    for target in [
        "/sys/bus/virtio/drivers/virtio_blk/unbind",
        "/proc/sys/kernel/hostname",
    ] {
        let o = sb.exec(&["sh", "-c", &format!("echo x > {target}")]);
        assert_ne!(o.status.code(), Some(0), "wrote {target}");
        assert!(stderr(&o).contains("Read-only"), "{target}: {}", stderr(&o));
    }
    let o = ok(sb.exec(&[
        "-u",
        "app",
        "--",
        "sh",
        "-c",
        "echo x > /dev/null && head -c 4 /dev/urandom | wc -c",
    ]));
    assert_eq!(o.trim(), "4");

    // Writes land in the sandbox's own upper layer.
    ok(sb.exec(&["sh", "-c", "echo persisted > /root/f"]));
    assert_eq!(ok(sb.exec(&["cat", "/root/f"])), "persisted\n");

    // Concurrent execs are independent.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let id = id.clone();
            std::thread::spawn(move || {
                let n = i.to_string();
                ok(run(&[
                    "exec",
                    &id,
                    "--",
                    "sh",
                    "-c",
                    &format!("sleep 1; echo {n}"),
                ]))
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), format!("{i}\n"));
    }

    // The detached command ran and its output is in the log; get/inspect describe the sandbox.
    assert!(wait_until(Duration::from_secs(10), || stdout(&run(&[
        "log", &id
    ]))
    .contains("detached-ok")));
    let get: serde_json::Value = serde_json::from_str(&ok(run(&["get", &id]))).unwrap();
    assert_eq!(get["state"]["status"], "running");
    assert_eq!(get["config"]["image"], "docker.io/mltest/busybox:1");
    let inspect: serde_json::Value = serde_json::from_str(&ok(run(&["inspect", &id]))).unwrap();
    assert_eq!(inspect["resources"]["vcpus"], 1);

    // kill stops it; the upper disk is reclaimed; rm removes it.
    ok(run(&["kill", &id]));
    assert_eq!(sb.status(), "stopped");
    assert!(!home().join("vms").join(&id).join("upper.ext4").exists());
    let o = sb.exec(&["true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("stopped"), "{}", stderr(&o));
    ok(run(&["rm", &id]));
    assert_eq!(status_of(&id), "");
}

#[test]
fn run_flags_env_user_workdir_resources() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("env");
    std::fs::write(&env_file, "# comment\nB=from-file\n\nC=c=d\n").unwrap();
    let out = ok(run(&[
        "run", "--image", BUSYBOX, "-e", "A=1", "--env-file", env_file.to_str().unwrap(), "-w", "/tmp",
        "-u", "app", "--hostname", "myhost", "--cpus", "0.5", "--memory", "256", "--add-host",
        "db.internal:10.1.2.3", "--",
        "sh", "-c",
        "echo $A $B $C; pwd; id -u; hostname; cat /sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)/cpu.max; \
         awk '/MemTotal/ {print ($2 < 262144)}' /proc/meminfo; grep db.internal /etc/hosts",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1 from-file c=d");
    assert_eq!(lines[1], "/tmp");
    assert_eq!(lines[2], "1000");
    assert_eq!(lines[3], "myhost");
    assert_eq!(lines[4], "50000 100000");
    assert_eq!(lines[5], "1");
    assert!(
        lines[6].starts_with("10.1.2.3") && lines[6].contains("db.internal"),
        "{out}"
    );
}

#[test]
fn privileged_can_mount() {
    let out = ok(run(&[
        "run",
        "--privileged",
        "--image",
        BUSYBOX,
        "--",
        "sh",
        "-c",
        "mount -t tmpfs x /tmp && test -b /dev/vda && echo mounted",
    ]));
    assert_eq!(out, "mounted\n");
}

#[test]
fn image_entrypoint_cmd_user_workdir_follow_docker() {
    assert_eq!(ok(run(&["run", "--image", ENTRY])), "entry: default-cmd\n");
    assert_eq!(
        ok(run(&["run", "--image", ENTRY, "--", "a", "b"])),
        "entry: a b\n"
    );
    assert_eq!(
        ok(run(&[
            "run",
            "--image",
            ENTRY,
            "--entrypoint",
            "",
            "--",
            "echo",
            "cleared"
        ])),
        "cleared\n"
    );
    // An entrypoint override drops the image CMD; USER and WORKDIR come from the image.
    let out = ok(run(&[
        "run",
        "--image",
        ENTRY,
        "--entrypoint",
        "/bin/sh",
        "--",
        "-c",
        "pwd; id -un",
    ]));
    assert_eq!(out, "/home/app\napp\n");
}

#[test]
fn rm_default_removes_and_stdin_pipes_at_run() {
    let o = run_stdin(
        &[
            "run",
            "-i",
            "--image",
            BUSYBOX,
            "--",
            "sh",
            "-c",
            "cat; exit 4",
        ],
        b"piped-input\n",
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    assert_eq!(stdout(&o), "piped-input\n");
    // Nothing of it is left: a --rm sandbox deletes its directory. Other tests run in parallel in
    // the same home, so look for a sandbox running this exact command.
    let leftovers = std::fs::read_dir(home().join("vms"))
        .unwrap()
        .flatten()
        .any(|e| {
            std::fs::read_to_string(e.path().join("config.json"))
                .map(|c| c.contains("cat; exit 4"))
                .unwrap_or(false)
        });
    assert!(!leftovers, "a --rm sandbox left its directory behind");
}

#[test]
fn rm_false_keeps_sandbox_for_exec_then_kill_and_rm() {
    let o = run(&[
        "run",
        "--rm=false",
        "--image",
        BUSYBOX,
        "--",
        "sh",
        "-c",
        "echo first > /root/keep; echo first",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "first\n");
    let err = stderr(&o);
    let id = err
        .split_whitespace()
        .find(|w| w.starts_with("vm-"))
        .unwrap_or_else(|| panic!("no id in {err}"))
        .to_string();
    let sb = Sandbox { id: id.clone() };
    assert_eq!(sb.status(), "running");
    assert_eq!(ok(sb.exec(&["cat", "/root/keep"])), "first\n");
    let o = run(&["rm", &id]);
    assert!(
        !o.status.success(),
        "rm of a running sandbox must be refused"
    );
    assert!(stderr(&o).contains("kill"), "{}", stderr(&o));
    ok(run(&["kill", &id]));
    assert_eq!(sb.status(), "stopped");
    ok(run(&["rm", &id]));
    assert!(!home().join("vms").join(&id).exists());
}

#[test]
fn timeout_stops_the_sandbox() {
    let start = Instant::now();
    let o = run(&[
        "run",
        "--timeout",
        "3",
        "--image",
        BUSYBOX,
        "--",
        "sleep",
        "600",
    ]);
    assert_eq!(o.status.code(), Some(124), "{}", stderr(&o));
    assert!(stderr(&o).contains("timed out"), "{}", stderr(&o));
    assert!(start.elapsed() < Duration::from_secs(120));
}

#[test]
fn supervisor_crash_leaves_no_qemu_and_shows_crashed_until_prune() {
    let sb = Sandbox::detached(&[], &["sleep", "100000"]);
    let get: serde_json::Value = serde_json::from_str(&ok(run(&["get", &sb.id]))).unwrap();
    let pid = get["state"]["pid"].as_i64().unwrap() as i32;
    assert!(
        !qemu_pids(&sb.id).is_empty(),
        "no QEMU process found for {}",
        sb.id
    );
    // SAFETY: kill(2) of the supervisor we just started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        wait_until(Duration::from_secs(10), || qemu_pids(&sb.id).is_empty()),
        "QEMU outlived its supervisor"
    );
    // The kernel releases the supervisor's lock when the last of its threads has closed its
    // files, which can come a moment after QEMU got its parent-death signal.
    assert!(
        wait_until(Duration::from_secs(10), || sb.status() == "crashed"),
        "status stayed {:?} after the supervisor was killed",
        sb.status()
    );
    let o = sb.exec(&["true"]);
    assert!(stderr(&o).contains("crashed"), "{}", stderr(&o));
    let pruned = ok(run(&["prune"]));
    assert!(pruned.contains(&sb.id), "{pruned}");
    assert_eq!(status_of(&sb.id), "");
}

#[test]
fn two_sandboxes_at_once_are_isolated() {
    let a = Sandbox::detached(&[], &["sleep", "100000"]);
    let b = Sandbox::detached(&[], &["sleep", "100000"]);
    assert_ne!(a.id, b.id);
    ok(a.exec(&["sh", "-c", "echo only-a > /tmp/mark"]));
    assert_eq!(ok(a.exec(&["hostname"])).trim(), a.id);
    assert_eq!(ok(b.exec(&["hostname"])).trim(), b.id);
    assert_ne!(b.exec(&["cat", "/tmp/mark"]).status.code(), Some(0));
    let listed = ok(run(&["list", "--running"]));
    assert!(listed.contains(&a.id) && listed.contains(&b.id), "{listed}");
    ok(run(&["kill", &a.id, &b.id]));
}

#[test]
fn bad_input_fails_cleanly_and_leaves_nothing() {
    // A home of its own, so "nothing left behind" can be checked exactly.
    let own_home = tempfile::Builder::new()
        .prefix("mlb")
        .tempdir_in("/tmp")
        .unwrap();
    // (arguments, extra environment, what the one-line error must mention)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            // --pull=never: an absent image must not send this test to Docker Hub.
            vec![
                "run",
                "--pull=never",
                "--image",
                "mltest/absent:9",
                "--",
                "true",
            ],
            vec![],
            "image import",
        ),
        (
            vec!["run", "--image", BUSYBOX, "--cpus", "0", "--", "true"],
            vec![],
            "--cpus",
        ),
        (
            vec!["run", "--image", BUSYBOX, "--memory", "1", "--", "true"],
            vec![],
            "--memory",
        ),
        (
            vec!["run", "--image", BUSYBOX, "-w", "rel", "--", "true"],
            vec![],
            "absolute",
        ),
        (
            vec![
                "run",
                "--image",
                BUSYBOX,
                "--timeout",
                "9300000000000000000",
                "--",
                "true",
            ],
            vec![],
            "--timeout",
        ),
        (
            vec![
                "run",
                "--image",
                BUSYBOX,
                "--graceful-shutdown",
                "soon",
                "--",
                "true",
            ],
            vec![],
            "duration",
        ),
        (
            vec!["run", "--image", BUSYBOX, "--", "true"],
            vec![("MATCHLOCK_KERNEL", "/nonexistent/vmlinux")],
            "MATCHLOCK_KERNEL",
        ),
        (
            vec!["run", "--image", BUSYBOX, "--", "true"],
            vec![("MATCHLOCK_QEMU", "/nonexistent/qemu")],
            "qemu",
        ),
        (
            vec!["exec", "vm-deadbeef", "--", "true"],
            vec![],
            "VM vm-deadbeef not found",
        ),
        (
            vec!["run", "--image", BUSYBOX, "-d", "-t", "--", "sh"],
            vec![],
            "--detach cannot be combined with -t/--tty or -i/--interactive",
        ),
        (
            vec![
                "run",
                "--image",
                BUSYBOX,
                "--kernel",
                "/etc/hostname",
                "--",
                "true",
            ],
            vec![],
            "not an ELF vmlinux",
        ),
        (
            vec![
                "run",
                "--image",
                BUSYBOX,
                "--kernel",
                "ghcr.io/jingkaihe/matchlock/kernel:6.1.137",
                "--",
                "true",
            ],
            vec![],
            "OCI kernel references are not supported",
        ),
    ];
    for (args, env, want) in cases {
        let mut c = ml(&args);
        c.env("MATCHLOCK_HOME", own_home.path());
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} succeeded");
        // run and exec: 125 for every failure of matchlock itself (Docker's convention).
        assert_eq!(o.status.code(), Some(125), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: error should be one line: {err}"
        );
    }
    // A misspelt flag before the command is an error that names it and the closest flag, and
    // nothing boots: it used to become the command.
    let started = std::time::Instant::now();
    let o = ml(&[
        "run",
        "--image",
        BUSYBOX,
        "--alow-host",
        "a.test",
        "--",
        "echo",
        "booted",
    ])
    .env("MATCHLOCK_HOME", own_home.path())
    .output()
    .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("'--alow-host'") && err.contains("'--allow-host'"),
        "{err}"
    );
    assert!(!stdout(&o).contains("booted"));
    assert!(started.elapsed() < Duration::from_secs(2), "a VM booted");
    // Other commands exit 1 on errors, parse errors included.
    let o = ml(&["list", "--bogus"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = ml(&["kill"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("VM ID required"), "{}", stderr(&o));
    let left = std::fs::read_dir(own_home.path().join("vms"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "failed runs left sandbox directories");
}

#[test]
fn graceful_shutdown_lets_processes_handle_sigterm() {
    let sb = Sandbox::detached(
        &["--graceful-shutdown", "5s"],
        &[
            "sh",
            "-c",
            "trap 'echo graceful-term; exit 0' TERM; echo trap-set; while :; do sleep 1; done",
        ],
    );
    assert!(wait_until(Duration::from_secs(20), || stdout(&run(&[
        "log", &sb.id
    ]))
    .contains("trap-set")));
    ok(run(&["kill", &sb.id]));
    let log = stdout(&run(&["log", &sb.id]));
    assert!(
        log.contains("graceful-term"),
        "the process never saw SIGTERM: {log}"
    );
}

#[test]
fn killing_the_cli_stops_its_rm_sandbox() {
    let marker = "owner-test-marker-5150";
    let mut child = ml(&[
        "run",
        "--image",
        BUSYBOX,
        "--",
        "sh",
        "-c",
        &format!("echo {marker}; sleep 1000"),
    ])
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut out, &mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains(marker));
    let find = || {
        std::fs::read_dir(home().join("vms"))
            .unwrap()
            .flatten()
            .find(|e| {
                std::fs::read_to_string(e.path().join("config.json"))
                    .map(|c| c.contains(marker))
                    .unwrap_or(false)
            })
    };
    let id = find()
        .expect("sandbox directory")
        .file_name()
        .to_string_lossy()
        .into_owned();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || find().is_none()),
        "sandbox outlived its CLI"
    );
    assert!(qemu_pids(&id).is_empty());
}

#[test]
fn diagnose_version_gc_and_log_follow() {
    let o = run(&["diagnose"]);
    let d = stdout(&o);
    assert!(
        d.contains("accelerator") && d.contains("guest kernel"),
        "{d}"
    );
    assert!(
        o.status.success(),
        "diagnose found a problem on the test machine: {d}"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(run(&["diagnose", "--json"]))).unwrap();
    assert_eq!(json["ok"], true, "{json}");
    let checks = json["checks"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["status"] != "fail"), "{json}");
    // Software emulation is a warning that says why, never a silent fallback.
    let accel = checks.iter().find(|c| c["name"] == "accelerator").unwrap();
    if accel["message"].as_str().unwrap().starts_with("tcg") {
        assert_eq!(accel["status"], "warn", "{accel}");
        assert!(accel["message"].as_str().unwrap().contains(':'), "{accel}");
    }
    // Matchlock's version line (scripts look for "commit:").
    let v = ok(run(&["version"]));
    assert!(v.starts_with("matchlock ") && v.contains("commit:"), "{v}");
    // log -f follows a sandbox until it stops.
    let sb = Sandbox::detached(
        &[],
        &[
            "sh",
            "-c",
            "echo line-one; sleep 2; echo line-two; sleep 1000",
        ],
    );
    let follower = ml(&["log", "-f", &sb.id])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(30), || stdout(&run(&[
        "log", &sb.id
    ]))
    .contains("line-two")));
    ok(run(&["kill", &sb.id]));
    let out = follower.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("line-one") && text.contains("line-two"),
        "{text}"
    );
    let gc = ok(run(&["gc"]));
    assert!(gc.contains("Reconciled"), "{gc}");
}

#[test]
fn extra_disks_persist_mount_read_only_and_refuse_sharing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("data.ext4");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let st = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .status()
        .unwrap();
    assert!(st.success());
    let rw = format!("{}:/mnt/data", img.display());
    let ro = format!("{rw}:ro");
    // uid=/gid= give the disk's root to the workload's user (a database's data directory).
    ok(run(&[
        "run",
        "--image",
        BUSYBOX,
        "--disk",
        &format!("{rw}:uid=70,gid=71"),
        "--",
        "sh",
        "-c",
        "echo kept > /mnt/data/f",
    ]));
    assert_eq!(
        ok(run(&[
            "run",
            "--image",
            BUSYBOX,
            "--disk",
            &ro,
            "--",
            "sh",
            "-c",
            "cat /mnt/data/f; stat -c %u:%g /mnt/data"
        ])),
        "kept\n70:71\n"
    );
    let o = run(&[
        "run",
        "--image",
        BUSYBOX,
        "--disk",
        &ro,
        "--",
        "sh",
        "-c",
        "echo x > /mnt/data/g",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Read-only"), "{}", stderr(&o));
    // Bad specs fail before anything boots.
    let o = run(&[
        "run",
        "--image",
        BUSYBOX,
        "--disk",
        "/no/such.ext4:/x",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains("/no/such.ext4"), "{}", stderr(&o));
    let o = run(&[
        "run",
        "--image",
        BUSYBOX,
        "--disk",
        &format!("{}:rel", img.display()),
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125));
    // Two VMs writing one ext4 would corrupt it.
    let sb = Sandbox::detached(&["--disk", &rw], &["sleep", "300"]);
    let o = run(&["run", "--image", BUSYBOX, "--disk", &ro, "--", "true"]);
    assert_eq!(o.status.code(), Some(125));
    assert!(stderr(&o).contains(&sb.id), "{}", stderr(&o));
}

/// The first line a child wrote on `pipe` (with its newline).
#[test]
fn port_forwarding_with_half_close_under_concurrency() {
    // Each connection gets `cat`: it echoes until our half-close, then closes its side.
    let sb = Sandbox::detached(&[], &["nc", "-ll", "-p", "9000", "-e", "cat"]);
    let mut child = ml(&["port-forward", &sb.id, "0:9000"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = first_line(child.stderr.take().unwrap());
    // Matchlock's "Forwarding 127.0.0.1:PORT -> sandbox:9000", on stderr.
    assert!(line.ends_with(" -> sandbox:9000\n"), "{line:?}");
    let port: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected port-forward output {line:?}"));
    assert!(wait_until(Duration::from_secs(30), || round_trip(
        port, b"ping"
    )
    .as_deref()
        == Some(b"ping")));
    let big: Vec<u8> = (0..(4 << 20)).map(|i| (i % 251) as u8).collect();
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let big = big.clone();
            std::thread::spawn(move || {
                let data = if i == 0 {
                    big
                } else {
                    format!("conn {i}").into_bytes()
                };
                (round_trip(port, &data), data)
            })
        })
        .collect();
    for h in handles {
        let (got, want) = h.join().unwrap();
        assert_eq!(got.as_deref(), Some(&want[..]));
    }
    let _ = child.kill();
    let _ = child.wait();

    // `run -p` forwards for as long as the run is attached.
    let port = free_port();
    let publish = format!("{port}:9001");
    let mut child = ml(&[
        "run", "--image", BUSYBOX, "-p", &publish, "--", "nc", "-l", "-p", "9001", "-e", "cat",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    assert!(wait_until(Duration::from_secs(60), || round_trip(
        port, b"once"
    )
    .as_deref()
        == Some(b"once")));
    // nc exits after its one connection, ending the run and its forwards.
    let st = child.wait().unwrap();
    assert!(st.success());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn volume_cli_contracts() {
    let o = ok(run(&[
        "volume", "create", "e2evol", "--size", "32", "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(o.trim()).unwrap();
    assert_eq!(v["name"], "e2evol");
    assert_eq!(v["size"], "32.0 MB");
    let path = v["path"].as_str().unwrap().to_string();
    assert!(std::path::Path::new(&path).is_file());
    let list: serde_json::Value =
        serde_json::from_str(ok(run(&["volume", "ls", "--json"])).trim()).unwrap();
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["name"] == "e2evol" && x["path"] == path.as_str()));
    let o = run(&["volume", "create", "e2evol", "--json"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already exists"));
    assert!(!run(&["volume", "create", "../evil"]).status.success());
    ok(run(&[
        "run",
        "--image",
        BUSYBOX,
        "--disk",
        "@e2evol:/v",
        "--",
        "sh",
        "-c",
        "echo copied > /v/f",
    ]));
    ok(run(&["volume", "cp", "e2evol", "e2evol2"]));
    assert_eq!(
        ok(run(&[
            "run",
            "--image",
            BUSYBOX,
            "--disk",
            "@e2evol2:/v:ro",
            "--",
            "cat",
            "/v/f"
        ])),
        "copied\n"
    );
    ok(run(&["volume", "rm", "e2evol"]));
    ok(run(&["volume", "rm", "e2evol2"]));
    assert!(!run(&["volume", "rm", "e2evol"]).status.success());
    assert!(!std::path::Path::new(&path).exists());
}

/// Runs `matchlock args` with a new pseudo-terminal as its controlling terminal and standard
/// streams, and never types a key. Returns its exit code and output, or `None` if it was still
/// running after `limit` (then it is killed).
fn on_pty(args: &[&str], limit: Duration) -> Option<(i32, String)> {
    use std::os::unix::process::CommandExt;
    let pty = nix::pty::openpty(None, None).expect("openpty");
    let slave = std::fs::File::from(pty.slave);
    let mut cmd = ml(args);
    cmd.stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn matchlock");
    drop(cmd);
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the child and its terminal are gone.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    });
    let status = wait_limited(&mut child, limit);
    let out = reader.join().unwrap_or_default();
    status.map(|st| (st.code().unwrap_or(-1), out))
}

/// Waits for `child` at most `limit`; kills it and returns `None` after that.
fn wait_limited(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `matchlock args` with a FIFO as standard input whose write end this test keeps open
/// (a stdin that never ends). Returns its exit code, or `None` if it outlived `limit`.
fn with_open_stdin(args: &[&str], limit: Duration) -> Option<i32> {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("in");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Read-write, so opening does not wait for a reader and a writer stays for the whole run.
    let hold = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let input = std::fs::File::open(&fifo).unwrap();
    let mut child = ml(args)
        .stdin(input)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let code = wait_limited(&mut child, limit).and_then(|st| st.code());
    drop(hold);
    code
}

/// `-it` and `-i` sessions end with their command, whatever the caller's terminal or stdin does
/// (Docker's behaviour): they used to print the output and then wait for a keypress, or for an
/// end of input that never came.
#[test]
fn terminal_and_stdin_sessions_end_with_the_command() {
    let limit = Duration::from_secs(90);
    let (code, out) = on_pty(
        &[
            "run",
            "-it",
            "--image",
            BUSYBOX,
            "--",
            "sh",
            "-c",
            "echo from-tty; exit 3",
        ],
        limit,
    )
    .expect("run -it still waiting after its command ended");
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("from-tty"), "{out}");
    assert_eq!(
        with_open_stdin(
            &[
                "run",
                "-i",
                "--image",
                BUSYBOX,
                "--",
                "sh",
                "-c",
                "echo y; exit 4"
            ],
            limit
        ),
        Some(4),
        "run -i with an open stdin did not end with its command"
    );
    let sb = Sandbox::detached(&[], &["sleep", "600"]);
    let (code, out) = on_pty(&["exec", "-it", &sb.id, "sh", "-c", "tty; exit 5"], limit)
        .expect("exec -it still waiting after its command ended");
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert_eq!(
        with_open_stdin(&["exec", "-i", &sb.id, "sh", "-c", "exit 6"], limit),
        Some(6)
    );
    // A reader that goes away (`| head -1`) ends the command with SIGPIPE instead of leaving it
    // writing into the void forever.
    let mut child = ml(&["exec", &sb.id, "yes"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(first_line(child.stdout.take().unwrap()), "y\n");
    assert!(
        wait_until(Duration::from_secs(30), || child
            .try_wait()
            .unwrap()
            .is_some()),
        "exec kept running after its reader went away"
    );
    assert_eq!(child.wait().unwrap().code(), Some(141));
}

/// `-p` forwards of a detached or `--rm=false` run belong to the supervisor: they work after
/// `run` has returned. An attached run's output also reaches `matchlock log`, the supervisor
/// logs at the level asked for, and `rm --stopped` cleans up.
#[test]
fn supervisor_owns_forwards_run_output_reaches_log_and_logging_works() {
    let o = run(&[
        "--log-level",
        "debug",
        "run",
        "-d",
        "-p",
        "0:9101",
        "--image",
        BUSYBOX,
        "--",
        "nc",
        "-ll",
        "-p",
        "9101",
        "-e",
        "cat",
    ]);
    let id = ok(o.clone()).trim().to_string();
    let sb = Sandbox { id: id.clone() };
    let err = stderr(&o);
    assert!(
        err.contains("DEBUG") && err.contains("image resolved"),
        "{err}"
    );
    let line = err
        .lines()
        .find(|l| l.starts_with("Forwarding 127.0.0.1:") && l.ends_with(" -> sandbox:9101"))
        .unwrap_or_else(|| panic!("no Forwarding line: {err}"));
    let port: u16 = line["Forwarding 127.0.0.1:".len()..]
        .split(' ')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap();
    // `run` has returned; the supervisor serves the port.
    assert!(wait_until(Duration::from_secs(30), || round_trip(
        port,
        b"still here"
    )
    .as_deref()
        == Some(b"still here")));
    let state: serde_json::Value = serde_json::from_str(&ok(run(&["inspect", &id]))).unwrap();
    assert_eq!(state["vm"]["state"]["forwards"][0]["local_port"], port);
    let log =
        std::fs::read_to_string(home().join("vms").join(&id).join("logs/supervisor.log")).unwrap();
    assert!(
        log.contains("guest ready") && log.contains("DEBUG"),
        "{log}"
    );
    drop(sb);

    let o = run(&[
        "run",
        "--rm=false",
        "--image",
        BUSYBOX,
        "--",
        "echo",
        "attached-output",
    ]);
    assert_eq!(stdout(&o), "attached-output\n");
    let err = stderr(&o);
    let id = running_id(&err);
    assert!(
        err.contains(&format!("  Stop:    matchlock kill {id}")),
        "{err}"
    );
    assert!(ok(run(&["log", &id])).contains("attached-output"));
    assert_eq!(ok(run(&["kill", &id])), format!("Killed {id}\n"));
    let removed = ok(run(&["rm", "--stopped"]));
    assert!(removed.contains(&format!("Removed {id}")), "{removed}");
    assert_eq!(status_of(&id), "");
}

/// Commands that need no VM: completion scripts, help with examples, JSON listings.
#[test]
fn completion_help_and_json_listings() {
    let bash = ok(run(&["completion", "bash"]));
    assert!(
        bash.contains("_matchlock") && bash.contains("allow-list"),
        "{}",
        &bash[..200]
    );
    for shell in ["zsh", "fish"] {
        assert!(ok(run(&["completion", shell])).contains("matchlock"));
    }
    // A reader that goes away early (`| head -1`) ends the command quietly.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' completion bash | head -c 1 >/dev/null",
            bin()
        ))
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for cmd in ["run", "exec", "pull", "volume"] {
        let help = ok(run(&[cmd, "--help"]));
        assert!(help.contains("Examples:"), "{cmd}: {help}");
    }
    let list: serde_json::Value = serde_json::from_str(&ok(run(&["list", "--json"]))).unwrap();
    assert!(list.is_array());
    let images: serde_json::Value =
        serde_json::from_str(&ok(run(&["image", "ls", "--json"]))).unwrap();
    assert!(
        images.as_array().unwrap().iter().any(|i| i["tag"]
            .as_str()
            .is_some_and(|t| t.contains("mltest/busybox"))),
        "{images}"
    );
    let table = ok(run(&["image", "ls"]));
    assert!(
        table.starts_with("TAG") && table.lines().next().unwrap().contains("SOURCE"),
        "{table}"
    );
    let vols = ok(run(&["volume", "ls"]));
    assert!(vols.starts_with("NAME") && !vols.contains("PATH"), "{vols}");
}
