//! The VM: QEMU's command line from the sandbox's configuration, its sockets, its writable disk,
//! and the QEMU child itself, which is killed when [`Vm`] is dropped before it exited (so every
//! failed start, wherever it fails, leaves no QEMU behind).

use crate::config::SandboxConfig;
use crate::store::Store;
use crate::SandboxError;
use matchlock_proto::mux::Mux;
use matchlock_proto::{read_msg, write_msg, Msg};
use matchlock_vmm::qmp::Qmp;
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
    /// How it started, for `state.json`: `template`, or `cold` and why.
    pub start: String,
    /// The template it was restored from (the guest agent said its hello to the template's
    /// builder and is waiting for the host's session); `None` when it booted.
    pub template: Option<std::path::PathBuf>,
    /// QEMU's monitor, for pause (see [`PendingQmp`]).
    pub qmp: PendingQmp,
}

/// QEMU's monitor, connected or still connecting. A cold boot's QEMU sends its greeting only
/// once its devices are up, and its virtio-fs device waits for the workspace server, which
/// starts after [`spawn`] returns: waiting for the greeting there stalled every start with a
/// workspace mount for the whole 30 s of the handshake's limit.
pub enum PendingQmp {
    /// Already connected (a template restore), or not at all.
    Ready(Option<Qmp>),
    /// Being accepted and greeted on a thread of its own.
    Connecting(std::thread::JoinHandle<Option<Qmp>>),
}

impl PendingQmp {
    /// The monitor, once connected; `None` if QEMU did not connect it (the log says why).
    pub fn wait(self) -> Option<Qmp> {
        match self {
            PendingQmp::Ready(q) => q,
            PendingQmp::Connecting(t) => t.join().ok().flatten(),
        }
    }
}

/// What every VM of a sandbox is made from, resolved once: QEMU, kernel, initramfs, accelerator.
pub struct Base {
    /// The QEMU binary.
    pub qemu: std::path::PathBuf,
    /// The guest kernel.
    pub kernel: std::path::PathBuf,
    /// The initramfs holding the agent.
    pub initramfs: std::path::PathBuf,
    /// The accelerator and why.
    pub accel: matchlock_vmm::accel::Choice,
    /// Kernel command line words the accelerator needs (the TCG guest's clock).
    pub cmdline: Vec<String>,
}

impl Base {
    /// Finds QEMU, the kernel and the agent and picks the accelerator.
    pub fn resolve(config: &SandboxConfig) -> Result<Base, SandboxError> {
        let qemu = matchlock_vmm::qemu::locate_qemu()?;
        let kernel = match &config.kernel {
            Some(k) => k.clone(),
            None => matchlock_vmm::kernel::locate()?,
        };
        let agent = matchlock_vmm::agent::locate()?;
        let initramfs = matchlock_vmm::initramfs::cached(&agent)?;
        let accel = matchlock_vmm::accel::choose(&qemu, &kernel, &initramfs)?;
        let cmdline = match accel.accel {
            matchlock_vmm::accel::Accel::Tcg if matchlock_vmm::tsc::wanted() => {
                matchlock_vmm::tsc::tcg_clock_args()
            }
            matchlock_vmm::accel::Accel::Tcg => Vec::new(),
            matchlock_vmm::accel::Accel::Kvm => Vec::new(),
        };
        Ok(Base {
            qemu,
            kernel,
            initramfs,
            accel,
            cmdline,
        })
    }

    /// The VM of `config` with its sockets and upper disk in `dir` (no workspace device: the
    /// caller adds it).
    pub fn spec(&self, config: &SandboxConfig, dir: &Path) -> matchlock_vmm::qemu::VmSpec {
        let mut disks = vec![
            matchlock_vmm::qemu::Disk {
                path: config.rootfs.clone(),
                serial: ROOT_SERIAL.into(),
                read_only: true,
            },
            matchlock_vmm::qemu::Disk {
                path: dir.join("upper.ext4"),
                serial: UPPER_SERIAL.into(),
                read_only: false,
            },
        ];
        for (i, d) in config.disks.iter().enumerate() {
            disks.push(matchlock_vmm::qemu::Disk {
                path: d.host_path.clone(),
                serial: disk_serial(i),
                read_only: d.read_only,
            });
        }
        matchlock_vmm::qemu::VmSpec {
            qemu: self.qemu.clone(),
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            accel: self.accel.accel,
            vcpus: config.vcpus(),
            memory_mb: config.memory_mb,
            disks,
            agent_socket: dir.join("agent.sock"),
            fs_devices: Vec::new(),
            console_socket: dir.join("console.sock"),
            extra_cmdline: self.cmdline.clone(),
            net: config
                .network
                .as_ref()
                .map(|_| matchlock_vmm::qemu::NetDev {
                    socket: dir.join("net.sock"),
                    mac: matchlock_net::setup::GUEST_MAC,
                }),
            qmp_socket: None,
            incoming: false,
            ram_file: None,
        }
    }
}

/// Prepares the sandbox's disk and sockets and starts QEMU: restored from the template of its
/// image and shape when it can be (prepared first when there is none yet), booted cold
/// otherwise. Runs on the main thread because `PR_SET_PDEATHSIG` fires when the *thread* that
/// forked QEMU exits, and the main thread lives as long as the supervisor.
pub fn spawn(store: &Store, config: &SandboxConfig) -> Result<Spawned, SandboxError> {
    let dir = store.dir(&config.id);
    let base = Base::resolve(config)?;
    tracing::info!(accel = %base.accel.accel, reason = %base.accel.reason, "accelerator chosen");
    if !config.rootfs.is_file() {
        return Err(SandboxError::Start(format!(
            "image root filesystem {} is missing; re-import the image {}",
            config.rootfs.display(),
            config.image
        )));
    }
    for d in &config.disks {
        if !d.host_path.is_file() {
            return Err(SandboxError::Start(format!(
                "disk {} for {} is missing",
                d.host_path.display(),
                d.guest_path
            )));
        }
    }
    let made = std::time::Instant::now();
    make_upper(&dir.join("upper.ext4"), config.disk_size_mb)?;
    tracing::debug!(ms = made.elapsed().as_millis() as u64, "upper disk made");
    check_socket_path(&dir.join("control.sock"))?;
    let _ = std::fs::remove_file(dir.join("control.sock"));

    let cold_because = match super::template::unsuitable(&base, config) {
        Some(why) => why,
        None => match super::template::prepare(store, &base, config) {
            Ok(template) => match restore(&dir, &base, config, &template) {
                Ok(spawned) => return Ok(spawned),
                Err(e) => {
                    // Nothing of the snapshot ran (the VM resumes only once it loaded whole):
                    // the template goes, the next start prepares a new one.
                    tracing::warn!("starting from the template failed, booting cold: {e}");
                    template.discard();
                    format!("the template failed: {e}")
                }
            },
            Err(e) => {
                tracing::info!("no template: {e}");
                e
            }
        },
    };
    let (listeners, fs_devices) = listeners(&dir, config)?;
    let qmp_sock = dir.join("qmp.sock");
    let qmp_l = listen(&qmp_sock)?;
    let mut spec = base.spec(config, &dir);
    spec.fs_devices = fs_devices;
    spec.qmp_socket = Some(qmp_sock.clone());
    let vm = start_qemu(&spec, &dir.join("logs").join("qemu.log"))?;
    let exited = vm.exited.clone();
    let qmp = std::thread::Builder::new()
        .name("qmp-accept".into())
        .spawn(move || {
            let qmp = accept_qmp(&qmp_l, &exited);
            let _ = std::fs::remove_file(&qmp_sock);
            qmp
        })
        .map_err(|e| SandboxError::Start(format!("starting a thread: {e}")))?;
    Ok(Spawned {
        vm,
        listeners,
        accel: base.accel,
        start: format!("cold ({cold_because})"),
        template: None,
        qmp: PendingQmp::Connecting(qmp),
    })
}

/// QEMU's monitor connection, unless QEMU exits or does not connect it within 30 s (then the
/// sandbox runs without pause, and says why in the log).
fn accept_qmp(listener: &UnixListener, exited: &AtomicBool) -> Option<Qmp> {
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < until && !exited.load(Ordering::SeqCst) {
        match matchlock_vmm::qmp::accept_within(listener, Duration::from_millis(100)) {
            Ok(s) => {
                return Qmp::handshake(s, Duration::from_secs(30))
                    .inspect_err(|e| tracing::warn!("QEMU's monitor: {e}; pause is unavailable"))
                    .ok()
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(e) => {
                tracing::warn!("QEMU's monitor: {e}; pause is unavailable");
                return None;
            }
        }
    }
    None
}

/// The file a paused sandbox's memory and device state is in.
pub fn paused_state(dir: &Path) -> std::path::PathBuf {
    dir.join("paused.zst")
}

/// Saves the stopped guest to [`paused_state`] and ends QEMU. On error the guest is stopped but
/// QEMU still runs; the caller resumes it (`cont`) or gives up on it.
pub fn pause(qmp: &mut Qmp, dir: &Path) -> Result<matchlock_vmm::snapshot::Saved, String> {
    // All of the guest's RAM, whatever backs it: the resumed guest needs no template.
    let saved =
        matchlock_vmm::snapshot::save(qmp, &dir.join("pause.sock"), &paused_state(dir), false)?;
    let _ = qmp.execute("quit", None);
    Ok(saved)
}

/// Starts a new QEMU for `config` from [`paused_state`] (hashing to `sha256`) and resumes the
/// guest. Its agent, console and NIC connect to the listeners the supervisor kept. On error QEMU
/// is gone and the state file is untouched.
pub fn resume(dir: &Path, config: &SandboxConfig, sha256: &str) -> Result<(Vm, Qmp), String> {
    let base = Base::resolve(config).map_err(|e| e.to_string())?;
    // The state holds all of guest RAM (a template's file is private to the sandbox once it
    // runs, so a pause saves it whole): the resumed guest needs no template.
    start_from(dir, &base, config, None, &paused_state(dir), sha256)
}

/// Starts QEMU for `config` in `dir` with `-incoming`, streams `state` (hashing to `sha256`)
/// into it and resumes the guest once all of it loaded. On error QEMU is gone and nothing of
/// the state ran; the error carries QEMU's first complaint.
fn start_from(
    dir: &Path,
    base: &Base,
    config: &SandboxConfig,
    ram_file: Option<matchlock_vmm::qemu::RamFile>,
    state: &Path,
    sha256: &str,
) -> Result<(Vm, Qmp), String> {
    let qmp_sock = dir.join("qmp.sock");
    let qmp_l = listen(&qmp_sock).map_err(|e| e.to_string())?;
    let mut spec = base.spec(config, dir);
    // A template's RAM file is what its stream left out.
    let ignore_shared = ram_file.is_some();
    spec.ram_file = ram_file;
    spec.qmp_socket = Some(qmp_sock.clone());
    spec.incoming = true;
    let vm = start_qemu(&spec, &dir.join("logs").join("qemu.log")).map_err(|e| e.to_string())?;
    let restored = Qmp::accept(&qmp_l, Duration::from_secs(30)).and_then(|mut qmp| {
        matchlock_vmm::snapshot::restore(
            &mut qmp,
            &dir.join("incoming.sock"),
            state,
            sha256,
            ignore_shared,
        )
        .map(|()| qmp)
    });
    let _ = std::fs::remove_file(dir.join("incoming.sock"));
    let _ = std::fs::remove_file(&qmp_sock);
    match restored {
        Ok(qmp) => Ok((vm, qmp)),
        Err(e) => {
            vm.kill();
            let qlog =
                std::fs::read_to_string(dir.join("logs").join("qemu.log")).unwrap_or_default();
            Err(match qlog.lines().find(|l| !l.trim().is_empty()) {
                Some(first) => format!("{e} (QEMU: {first})"),
                None => e,
            })
        }
    }
}

/// Starts QEMU from `template` and resumes the guest once the snapshot has loaded. On error QEMU
/// is gone and nothing of the snapshot ran.
fn restore(
    dir: &Path,
    base: &Base,
    config: &SandboxConfig,
    template: &super::template::Template,
) -> Result<Spawned, String> {
    let started = std::time::Instant::now();
    let (listeners, _) = listeners(dir, config).map_err(|e| e.to_string())?;
    let (vm, qmp) = start_from(
        dir,
        base,
        config,
        template
            .ram_path()
            .map(|path| matchlock_vmm::qemu::RamFile {
                path,
                shared: false,
            }),
        &template.state_path(),
        &template.meta.sha256,
    )?;
    Ok(Spawned {
        vm,
        listeners,
        accel: base.accel.clone(),
        start: "template".into(),
        template: Some(template.dir().to_path_buf()),
        qmp: PendingQmp::Ready(Some(qmp)),
    })
    .inspect(|_| {
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            template = %template.meta.key,
            "restored from the template"
        )
    })
}

/// The sockets QEMU will connect to, and the workspace device when the sandbox has mounts.
fn listeners(
    dir: &Path,
    config: &SandboxConfig,
) -> Result<(Listeners, Vec<matchlock_vmm::qemu::FsDevice>), SandboxError> {
    let agent = listen(&dir.join("agent.sock"))?;
    let console = listen(&dir.join("console.sock"))?;
    let net = match &config.network {
        Some(_) => Some(listen(&dir.join("net.sock"))?),
        None => None,
    };
    // Workspace mounts share one virtio-fs device.
    let mut fs_devices = Vec::new();
    let mut vfs = None;
    if !config.vfs.is_empty() {
        let sock = dir.join("vfs.sock");
        let l = listen(&sock)?;
        // The vhost-user backend accepts with a blocking call on a thread of its own.
        l.set_nonblocking(false)
            .map_err(SandboxError::io("socket setup"))?;
        vfs = Some(l);
        fs_devices.push(matchlock_vmm::qemu::FsDevice {
            socket: sock,
            tag: matchlock_proto::vfs::TAG.into(),
            queue_size: matchlock_vfs::virtiofs::QUEUE_SIZE as u16,
        });
    }
    Ok((
        Listeners {
            agent,
            console,
            net,
            vfs,
        },
        fs_devices,
    ))
}

/// Starts QEMU with its output in `log`; it dies with this thread.
pub(super) fn start_qemu(
    spec: &matchlock_vmm::qemu::VmSpec,
    log: &Path,
) -> Result<Vm, SandboxError> {
    let qemu_log = std::fs::File::create(log)
        .map_err(SandboxError::io(format!("creating {}", log.display())))?;
    let qemu_log2 = qemu_log
        .try_clone()
        .map_err(SandboxError::io(format!("creating {}", log.display())))?;
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
    Ok(Vm { pid, exited, exit })
}

/// Binds a fresh listening socket at `p` (replacing a stale one), non-blocking for tokio.
pub(super) fn listen(p: &Path) -> Result<UnixListener, SandboxError> {
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
pub(super) fn make_upper(path: &Path, size_mb: u64) -> Result<(), SandboxError> {
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
