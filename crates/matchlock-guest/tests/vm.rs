//! Boots the static agent as PID 1 in a QEMU microvm and drives it over the real virtio-serial
//! channel: Setup (disks by serial, overlay, switch root, hostname, clock, cgroup), execs, files,
//! orphan reaping, Shutdown; and the accelerator probe boot.
//!
//! Ignored by default because it needs a VM toolchain: `qemu-system-x86_64`, `mkfs.ext4`, a static
//! `busybox`, a Matchlock kernel and the static agent. Run with
//! `MATCHLOCK_TEST_KERNEL=/path/vmlinux MATCHLOCK_GUEST_STATIC=target/x86_64-unknown-linux-gnu/release/matchlock-guest
//!  cargo test -p matchlock-guest --test vm -- --ignored --test-threads 1`.

use matchlock_proto::mux::{Mux, Role, Stream};
use matchlock_proto::{read_msg, write_msg, ExecRequest, Msg, Setup, WinSize, WriteFile, HELLO};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

/// TCG boots are slow; everything gets this long.
const WAIT: Duration = Duration::from_secs(60);

fn env_path(name: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(name).unwrap_or_else(|| panic!("set {name}")))
}

fn initramfs(dir: &Path) -> PathBuf {
    let agent = std::fs::read(env_path("MATCHLOCK_GUEST_STATIC")).unwrap();
    // The same initramfs the host writes for real sandboxes.
    let cpio = matchlock_vmm::initramfs::build(&agent);
    let path = dir.join("initramfs.cpio");
    std::fs::write(&path, cpio).unwrap();
    path
}

fn mkfs(image: &Path, root: Option<&Path>) {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F"]);
    if let Some(root) = root {
        cmd.arg("-d").arg(root);
    }
    let ok = cmd.arg(image).arg("64M").status().unwrap().success();
    assert!(ok, "mkfs.ext4 failed");
}

fn images(dir: &Path) -> (PathBuf, PathBuf) {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "home/user", "opt/old"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("etc/motd"), "lower\n").unwrap();
    std::fs::write(root.join("opt/old/a"), "a\n").unwrap();
    let busybox = std::env::var_os("MATCHLOCK_TEST_BUSYBOX").unwrap_or("/usr/bin/busybox".into());
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "cat", "echo", "id", "stty", "sleep", "ls", "hostname", "date", "grep", "mount",
        "true", "tty", "rm", "mkdir", "ln", "mkfifo", "chmod", "chown",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:User:/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\ntty:x:5:\nuser:x:1000:\nextra:x:2000:user\n",
    )
    .unwrap();
    let image = dir.join("image.ext4");
    let upper = dir.join("upper.ext4");
    mkfs(&image, Some(&root));
    mkfs(&upper, None);
    (image, upper)
}

struct Vm {
    qemu: Child,
    console: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
    }
}

impl Vm {
    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Waits for QEMU to end (the guest rebooted under -no-reboot).
    async fn wait_exit(&mut self) {
        let deadline = Instant::now() + WAIT;
        while self.qemu.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "QEMU still running; console:\n{}",
                self.console()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn boot(dir: &Path, extra_cmdline: &str, disks: Option<(&Path, &Path)>) -> (Vm, PathBuf) {
    let sock = dir.join("agent.sock");
    let console = dir.join("console.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off,auto-kernel-cmdline=on",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "256",
        "-smp",
        "1",
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ])
    .arg("-serial")
    .arg(format!("file:{}", console.display()))
    .arg("-kernel")
    .arg(env_path("MATCHLOCK_TEST_KERNEL"))
    .arg("-initrd")
    .arg(initramfs(dir))
    .arg("-append")
    .arg(format!(
        "console=ttyS0 quiet reboot=t panic=-1 {extra_cmdline}"
    ));
    if let Some((image, upper)) = disks {
        cmd.arg("-device")
            .arg("virtio-blk-device,drive=d0,serial=mlroot")
            .arg("-drive")
            .arg(format!(
                "id=d0,file={},format=raw,if=none,readonly=on",
                image.display()
            ))
            .arg("-device")
            .arg("virtio-blk-device,drive=d1,serial=mlupper")
            .arg("-drive")
            .arg(format!("id=d1,file={},format=raw,if=none", upper.display()));
    }
    // Without an entropy source the guest's CRNG can take minutes to initialise under TCG, and
    // the agent's multiplexer (yamux ids) blocks in getrandom until it has.
    cmd.args(["-device", "virtio-rng-device"]);
    cmd.args(["-device", "virtio-serial-device", "-device"])
        .arg(format!(
            "virtserialport,chardev=c0,name={}",
            matchlock_proto::PORT_NAME
        ))
        .arg("-chardev")
        .arg(format!(
            "socket,id=c0,path={},server=on,wait=off",
            sock.display()
        ))
        .stdin(Stdio::null());
    (
        Vm {
            qemu: cmd.spawn().expect("qemu-system-x86_64"),
            console,
        },
        sock,
    )
}

async fn connect(vm: &Vm, sock: &Path) -> Mux {
    let deadline = Instant::now() + WAIT;
    let mut conn = loop {
        match UnixStream::connect(sock).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("no QEMU socket: {e}"),
        }
    };
    let mut hello = [0u8; 8];
    tokio::time::timeout(WAIT, conn.read_exact(&mut hello))
        .await
        .unwrap_or_else(|_| panic!("no HELLO; console:\n{}", vm.console()))
        .unwrap();
    assert_eq!(&hello, HELLO);
    Mux::start(conn, Role::Client).0
}

async fn recv(s: &mut Stream) -> Option<Msg> {
    tokio::time::timeout(WAIT, read_msg(s))
        .await
        .expect("timed out")
        .expect("bad frame")
}

async fn request(mux: &Mux, m: Msg) -> Stream {
    let mut s = mux.open().await.unwrap();
    write_msg(&mut s, &m).await.unwrap();
    s
}

/// Runs a command; returns (stdout, exit code).
async fn sh(mux: &Mux, req: ExecRequest) -> (String, i32) {
    let mut s = request(mux, Msg::Exec(req)).await;
    let mut out = Vec::new();
    loop {
        match recv(&mut s).await {
            Some(Msg::Started { .. }) => {}
            Some(Msg::Stdout(d)) | Some(Msg::Stderr(d)) => out.extend(d),
            Some(Msg::Exited(st)) => return (String::from_utf8_lossy(&out).into(), st.code),
            other => panic!("{other:?} after {:?}", String::from_utf8_lossy(&out)),
        }
    }
}

fn script(s: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), s.into()],
        env: vec![("PATH".into(), "/bin".into())],
        ..Default::default()
    }
}

#[tokio::test]
#[ignore = "needs QEMU, a kernel and the static agent (see the module docs)"]
async fn pid1_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (image, upper) = images(dir.path());
    let (mut vm, sock) = boot(dir.path(), "", Some((&image, &upper)));
    let mux = connect(&vm, &sock).await;

    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let setup = Setup {
        hostname: "mlvm".into(),
        hosts: vec![("10.0.0.1".into(), "gateway".into())],
        root_serial: "mlroot".into(),
        upper_serial: Some("mlupper".into()),
        time_unix_ms: now_ms,
        cpu_max: Some((50_000, 100_000)),
        confined: true,
        disks: Vec::new(),
        net: None,
        vfs: Vec::new(),
        entropy: vec![7; 64],
    };
    let mut s = request(&mux, Msg::Setup(setup)).await;
    let reply = recv(&mut s).await;
    assert_eq!(reply, Some(Msg::Ok), "console:\n{}", vm.console());

    let (out, code) = sh(
        &mux,
        script("hostname; cat /etc/hosts; date +%Y; cat /proc/self/cgroup; cat /sys/fs/cgroup/sandbox/cpu.max; grep -c . /etc/passwd; echo written > /root-note; cat /root-note"),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("mlvm\n"), "{out}");
    assert!(
        out.contains("127.0.0.1 localhost localhost.localdomain mlvm\n10.0.0.1 gateway\n"),
        "{out}"
    );
    let year = 1970 + now_ms / 1000 / 31_556_952;
    assert!(out.contains(&year.to_string()), "clock not set: {out}");
    assert!(out.contains("0::/sandbox"), "{out}");
    assert!(out.contains("50000 100000"), "{out}");
    assert!(out.contains("written"), "{out}");

    let mut req = script("id; echo $HOME");
    req.user = Some("user".into());
    let (out, _) = sh(&mux, req).await;
    assert!(
        out.contains("uid=1000(user) gid=1000(user) groups=1000(user),2000(extra)"),
        "{out}"
    );
    assert!(out.contains("/home/user"), "{out}");

    let mut req = script("tty; stty size");
    req.tty = Some(WinSize { rows: 33, cols: 99 });
    let (out, code) = sh(&mux, req).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("/dev/pts/0") && out.contains("33 99"), "{out}");

    // Unprivileged: mount is refused by seccomp; privileged it reaches the kernel.
    let (out, code) = sh(&mux, script("mount -t tmpfs none /mnt")).await;
    assert_ne!(code, 0, "{out}");
    let mut req = script("mkdir -p /mnt && mount -t tmpfs none /mnt && echo mounted");
    req.privileged = true;
    assert!(sh(&mux, req).await.0.contains("mounted"));

    // Orphans are reaped by PID 1.
    let (_, code) = sh(&mux, script("sleep 0.2 & exit 0")).await;
    assert_eq!(code, 0);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (out, _) = sh(
        &mux,
        script("cat /proc/[0-9]*/stat | grep -c ') Z ' || true"),
    )
    .await;
    assert_eq!(out.trim(), "0", "zombies left");

    // Files, through the overlay.
    let mut s = request(
        &mux,
        Msg::WriteFile(WriteFile {
            path: "/data/blob".into(),
            mode: 0o600,
            uid: Some(1000),
            gid: Some(1000),
        }),
    )
    .await;
    write_msg(&mut s, &Msg::Data(vec![0, 1, 2, 255]))
        .await
        .unwrap();
    write_msg(&mut s, &Msg::Eof).await.unwrap();
    assert_eq!(recv(&mut s).await, Some(Msg::Ok));
    let (out, _) = sh(&mux, script("ls -ln /data/blob")).await;
    assert!(out.contains("-rw-------") && out.contains("1000"), "{out}");

    let t0 = Instant::now();
    let mut s = request(&mux, Msg::Shutdown { grace_ms: 1000 }).await;
    assert_eq!(recv(&mut s).await, Some(Msg::Ok));
    drop(s);
    vm.wait_exit().await;
    let mut log = std::io::stderr();
    let _ = writeln!(
        log,
        "shutdown took {:?}; console:\n{}",
        t0.elapsed(),
        vm.console()
    );
    assert!(!vm.console().contains("Kernel panic"), "{}", vm.console());
    // The upper disk kept the write.
    let out = Command::new("debugfs")
        .arg("-R")
        .arg("cat /upper/root-note")
        .arg(&upper)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "written\n");
}

#[tokio::test]
#[ignore = "needs QEMU, a kernel and the static agent (see the module docs)"]
async fn probe_boot_prints_and_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let (mut vm, _sock) = boot(dir.path(), "matchlock.probe=1", None);
    vm.wait_exit().await;
    let console = vm.console();
    assert!(console.contains("MATCHLOCK-PROBE-OK"), "{console}");
    assert!(!console.contains("Kernel panic"), "{console}");
}

#[tokio::test]
#[ignore = "needs QEMU, a kernel and the static agent (see the module docs)"]
async fn setup_with_missing_disk_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, sock) = boot(dir.path(), "", None);
    let mux = connect(&vm, &sock).await;
    let setup = Setup {
        root_serial: "nope".into(),
        ..Default::default()
    };
    let mut s = request(&mux, Msg::Setup(setup)).await;
    let reply = tokio::time::timeout(WAIT, read_msg(&mut s))
        .await
        .unwrap_or_else(|_| panic!("no reply; console:\n{}", vm.console()))
        .unwrap();
    assert_eq!(
        reply,
        Some(Msg::Error(
            "no disk with serial nope; is the image disk attached?".into()
        ))
    );
}

#[tokio::test]
#[ignore = "needs QEMU, a kernel and the static agent (see the module docs)"]
async fn export_upper_is_an_oci_layer_of_the_changes() {
    let dir = tempfile::tempdir().unwrap();
    let (image, upper) = images(dir.path());
    let (_vm, sock) = boot(dir.path(), "", Some((&image, &upper)));
    let mux = connect(&_vm, &sock).await;
    let setup = Setup {
        hostname: "layer".into(),
        root_serial: "mlroot".into(),
        upper_serial: Some("mlupper".into()),
        confined: true,
        entropy: vec![7; 64],
        ..Setup::default()
    };
    let mut s = request(&mux, Msg::Setup(setup)).await;
    assert_eq!(recv(&mut s).await, Some(Msg::Ok));
    let (out, code) = sh(
        &mux,
        script(
            "echo new > /new.txt && chmod 640 /new.txt && chown 1000:2000 /new.txt && \
             rm /etc/motd && rm -rf /opt/old && mkdir /opt/old && echo c > /opt/old/c && \
             ln /new.txt /hard.txt && ln -s /new.txt /sym && mkfifo /fifo && \
             echo x >> /etc/group && (sleep 1000 &) && echo done",
        ),
    )
    .await;
    assert_eq!((out.as_str(), code), ("done\n", 0));

    let exclude = ["etc/hosts", "etc/hostname", "etc/resolv.conf"].map(String::from);
    let mut s = request(
        &mux,
        Msg::ExportUpper {
            exclude: exclude.to_vec(),
            stop_processes: true,
        },
    )
    .await;
    let mut layer = Vec::new();
    loop {
        match recv(&mut s).await {
            Some(Msg::Data(d)) => layer.extend(d),
            Some(Msg::Eof) => break,
            other => panic!("{other:?}"),
        }
    }
    let mut entries = std::collections::BTreeMap::new();
    let mut archive = tar::Archive::new(&layer[..]);
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let h = e.header().clone();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        let pax: Vec<String> = match e.pax_extensions().unwrap() {
            Some(exts) => exts
                .map(|p| p.unwrap().key().unwrap_or("").to_string())
                .collect(),
            None => Vec::new(),
        };
        let mut body = String::new();
        std::io::Read::read_to_string(&mut e, &mut body).unwrap_or_default();
        entries.insert(path, (h, link, body, pax));
    }
    let names: Vec<&String> = entries.keys().collect();
    let get = |p: &str| {
        entries
            .get(p)
            .unwrap_or_else(|| panic!("{p} not in the layer: {names:?}"))
    };
    let (h, _, body, _) = get("new.txt");
    let (h2, link2, _, _) = get("hard.txt");
    // The first of two hard links carries the data, the second points at it.
    assert_eq!(h2.entry_type(), tar::EntryType::Regular);
    assert_eq!(h.entry_type(), tar::EntryType::Link);
    let _ = (body, link2);
    assert_eq!(entries["new.txt"].1.as_deref(), Some("hard.txt"));
    assert_eq!(entries["hard.txt"].2, "new\n");
    assert_eq!(h2.mode().unwrap(), 0o640);
    assert_eq!((h2.uid().unwrap(), h2.gid().unwrap()), (1000, 2000));
    let (h, link, _, _) = get("sym");
    assert_eq!(h.entry_type(), tar::EntryType::Symlink);
    assert_eq!(link.as_deref(), Some("/new.txt"));
    assert_eq!(get("fifo").0.entry_type(), tar::EntryType::Fifo);
    assert_eq!(get("etc/.wh.motd").0.size().unwrap(), 0);
    assert!(get("etc/group").2.ends_with("extra:x:2000:user\nx\n"));
    assert_eq!(get("etc").0.entry_type(), tar::EntryType::Directory);
    get("opt/old/.wh..wh..opq");
    assert_eq!(get("opt/old/c").2, "c\n");
    for gone in ["etc/hosts", "etc/hostname", "opt/old/a", "etc/motd"] {
        assert!(!entries.contains_key(gone), "{gone} in {names:?}");
    }
    for (p, (_, _, _, pax)) in &entries {
        assert!(!pax.iter().any(|k| k.contains("trusted.")), "{p}: {pax:?}");
    }
    // Stopping the processes left none running.
    let (out, _) = sh(
        &mux,
        script("cat /proc/[0-9]*/comm | grep -c '^sleep$'; true"),
    )
    .await;
    assert_eq!(out, "0\n");
    // Twice: the same changes give the same bytes.
    let mut s = request(
        &mux,
        Msg::ExportUpper {
            exclude: exclude.to_vec(),
            stop_processes: false,
        },
    )
    .await;
    let mut again = Vec::new();
    loop {
        match recv(&mut s).await {
            Some(Msg::Data(d)) => again.extend(d),
            Some(Msg::Eof) => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(again == layer, "the export is not deterministic");
}
