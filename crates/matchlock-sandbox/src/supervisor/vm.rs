//! The VM: QEMU's command line from the sandbox's configuration, its sockets, its writable disk,
//! and the QEMU child itself, which is killed when [`Vm`] is dropped before it exited (so every
//! failed start, wherever it fails, leaves no QEMU behind).

use crate::config::SandboxConfig;
use crate::store::Store;
use crate::SandboxError;
use matchlock_proto::mux::Mux;
use matchlock_proto::{read_msg, write_msg, Msg};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// Disk serials the guest finds its disks by.
pub const ROOT_SERIAL: &str = "ml-root";
/// The writable upper disk's serial.
pub const UPPER_SERIAL: &str = "ml-upper";

/// Virtio serial of the `i`-th extra disk.
pub fn disk_serial(i: usize) -> String {
    format!("ml-disk{i}")
}

/// The sockets QEMU connects to; the supervisor listens on them before QEMU starts, so QEMU
/// never has to retry.
pub struct Listeners {
    /// The guest agent's virtio-serial port.
    pub agent: UnixListener,
    /// The serial console.
    pub console: UnixListener,
    /// The NIC's frames, when the sandbox has a network.
    pub net: Option<UnixListener>,
    /// The workspace's virtio-fs device, when it has mounts.
    pub vfs: Option<UnixListener>,
}

/// A running QEMU.
pub struct Vm {
    pid: u32,
    exited: Arc<AtomicBool>,
    /// Resolves with QEMU's exit status.
    pub exit: oneshot::Receiver<String>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Vm {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Kills QEMU unless it already exited.
    pub fn kill(&self) {
        if !self.exited.load(Ordering::SeqCst) {
            // SAFETY: plain kill(2); the pid is still our unreaped child, so it cannot be reused.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
    }

    /// Asks the guest to stop its processes and power off; kills QEMU if it does not within
    /// the grace period plus a margin.
    pub async fn shutdown(&mut self, mux: &Mux, grace_ms: u64) {
        let ask = async {
            let mut s = mux.open().await.ok()?;
            write_msg(&mut s, &Msg::Shutdown { grace_ms }).await.ok()?;
            read_msg(&mut s).await.ok()
        };
        let margin = Duration::from_millis(grace_ms) + Duration::from_secs(5);
        let _ = tokio::time::timeout(margin, ask).await;
        if tokio::time::timeout(Duration::from_secs(5), &mut self.exit)
            .await
            .is_err()
        {
            self.kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.exit).await;
        }
    }
}

/// What [`spawn`] learnt: the accelerator and why.
pub struct Spawned {
    /// QEMU.
    pub vm: Vm,
    /// Its sockets.
    pub listeners: Listeners,
    /// The accelerator it runs on.
    pub accel: matchlock_vmm::accel::Choice,
}

/// Prepares the sandbox's disk and sockets and starts QEMU. Runs on the main thread because
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked QEMU exits, and the main thread lives
/// as long as the supervisor.
pub fn spawn(store: &Store, config: &SandboxConfig) -> Result<Spawned, SandboxError> {
    let dir = store.dir(&config.id);
    let qemu_bin = matchlock_vmm::qemu::locate_qemu()?;
    let kernel = match &config.kernel {
        Some(k) => k.clone(),
        None => matchlock_vmm::kernel::locate()?,
    };
    let agent = matchlock_vmm::agent::locate()?;
    let initramfs = matchlock_vmm::initramfs::cached(&agent)?;
    let accel = matchlock_vmm::accel::choose(&qemu_bin, &kernel, &initramfs)?;
    tracing::info!(accel = %accel.accel, reason = %accel.reason, "accelerator chosen");
    if !config.rootfs.is_file() {
        return Err(SandboxError::Start(format!(
            "image root filesystem {} is missing; re-import the image {}",
            config.rootfs.display(),
            config.image
        )));
    }
    let upper = dir.join("upper.ext4");
    make_upper(&upper, config.disk_size_mb)?;

    let agent_sock = dir.join("agent.sock");
    let console_sock = dir.join("console.sock");
    check_socket_path(&dir.join("control.sock"))?;
    let _ = std::fs::remove_file(dir.join("control.sock"));
    let agent_l = listen(&agent_sock)?;
    let console_l = listen(&console_sock)?;
    let net_sock = dir.join("net.sock");
    let net_l = match &config.network {
        Some(_) => Some(listen(&net_sock)?),
        None => None,
    };
    // Workspace mounts share one virtio-fs device.
    let mut fs_devices = Vec::new();
    let mut vfs_l = None;
    if !config.vfs.is_empty() {
        let sock = dir.join("vfs.sock");
        let l = listen(&sock)?;
        // The vhost-user backend accepts with a blocking call on a thread of its own.
        l.set_nonblocking(false)
            .map_err(SandboxError::io("socket setup"))?;
        vfs_l = Some(l);
        fs_devices.push(matchlock_vmm::qemu::FsDevice {
            socket: sock,
            tag: matchlock_proto::vfs::TAG.into(),
            queue_size: matchlock_vfs::virtiofs::QUEUE_SIZE as u16,
        });
    }

    let mut disks = vec![
        matchlock_vmm::qemu::Disk {
            path: config.rootfs.clone(),
            serial: ROOT_SERIAL.into(),
            read_only: true,
        },
        matchlock_vmm::qemu::Disk {
            path: upper,
            serial: UPPER_SERIAL.into(),
            read_only: false,
        },
    ];
    for (i, d) in config.disks.iter().enumerate() {
        if !d.host_path.is_file() {
            return Err(SandboxError::Start(format!(
                "disk {} for {} is missing",
                d.host_path.display(),
                d.guest_path
            )));
        }
        disks.push(matchlock_vmm::qemu::Disk {
            path: d.host_path.clone(),
            serial: disk_serial(i),
            read_only: d.read_only,
        });
    }
    let spec = matchlock_vmm::qemu::VmSpec {
        qemu: qemu_bin,
        kernel,
        initramfs,
        accel: accel.accel,
        vcpus: config.vcpus(),
        memory_mb: config.memory_mb,
        disks,
        agent_socket: agent_sock,
        fs_devices,
        console_socket: console_sock,
        extra_cmdline: Vec::new(),
        net: net_l.as_ref().map(|_| matchlock_vmm::qemu::NetDev {
            socket: net_sock.clone(),
            mac: matchlock_net::setup::GUEST_MAC,
        }),
    };
    let qemu_log = std::fs::File::create(dir.join("logs").join("qemu.log"))
        .map_err(SandboxError::io("creating logs/qemu.log"))?;
    let qemu_log2 = qemu_log
        .try_clone()
        .map_err(SandboxError::io("creating logs/qemu.log"))?;
    let mut cmd = spec.command();
    cmd.stdin(Stdio::null()).stdout(qemu_log).stderr(qemu_log2);
    matchlock_vmm::qemu::die_with_parent(&mut cmd);
    let mut child = cmd.spawn().map_err(SandboxError::io(format!(
        "starting {}",
        spec.qemu.display()
    )))?;
    let pid = child.id();
    let exited = Arc::new(AtomicBool::new(false));
    let (exit_tx, exit) = oneshot::channel();
    let flag = exited.clone();
    std::thread::spawn(move || {
        let status = child.wait();
        flag.store(true, Ordering::SeqCst);
        let _ = exit_tx.send(match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        });
    });
    Ok(Spawned {
        vm: Vm { pid, exited, exit },
        listeners: Listeners {
            agent: agent_l,
            console: console_l,
            net: net_l,
            vfs: vfs_l,
        },
        accel,
    })
}

/// Binds a fresh listening socket at `p` (replacing a stale one), non-blocking for tokio.
fn listen(p: &Path) -> Result<UnixListener, SandboxError> {
    check_socket_path(p)?;
    let _ = std::fs::remove_file(p);
    let l = UnixListener::bind(p).map_err(SandboxError::io(format!("binding {}", p.display())))?;
    l.set_nonblocking(true)
        .map_err(SandboxError::io("socket setup"))?;
    Ok(l)
}

fn check_socket_path(p: &Path) -> Result<(), SandboxError> {
    // sun_path holds 108 bytes including the terminating NUL.
    if p.as_os_str().len() > 107 {
        return Err(SandboxError::Start(format!(
            "socket path {} is too long for a Unix socket; set MATCHLOCK_HOME to a shorter directory",
            p.display()
        )));
    }
    Ok(())
}

/// Creates the sparse, empty ext4 upper disk.
fn make_upper(path: &Path, size_mb: u64) -> Result<(), SandboxError> {
    let f = std::fs::File::create(path)
        .map_err(SandboxError::io(format!("creating {}", path.display())))?;
    f.set_len(size_mb * 1024 * 1024).map_err(|e| {
        SandboxError::Start(format!(
            "cannot create a {size_mb} MiB upper disk at {}: {e}",
            path.display()
        ))
    })?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=1,nodiscard",
            "-L",
            "matchlock-upper",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            SandboxError::Start(format!("cannot run mkfs.ext4 ({e}); install e2fsprogs"))
        })?;
    if !out.status.success() {
        return Err(SandboxError::Start(format!(
            "mkfs.ext4 failed on the upper disk: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}
