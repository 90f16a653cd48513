//! The per-sandbox supervisor: a detached process (`matchlock __supervise <id>`) that owns one VM.
//!
//! It holds the sandbox's lock for its whole life (so a dead supervisor is visible as `crashed`),
//! starts QEMU with `PR_SET_PDEATHSIG` (so QEMU never outlives it), speaks the guest protocol over the
//! agent channel, copies the serial console into `logs/vm.log`, serves the control socket, enforces
//! the lifetime timeout, and on stop shuts the guest down, removes the upper disk and sockets, and
//! (with `--rm`) the whole sandbox directory.
//!
//! It tells the process that spawned it how the boot went through an inherited pipe (fd 3): one line,
//! `ok` or the error.

use crate::config::{now_secs, SandboxConfig, State, Status, VfsMode};
use crate::control::{self, ExecSpec, Reply, Request};
use crate::store::Store;
use crate::SandboxError;
use matchlock_proto::mux::{Mux, Role};
use matchlock_proto::{read_msg, write_msg, ExecRequest, Msg, Setup};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Mutex};

/// The fd on which the supervisor reports boot success or failure to its parent.
pub const READY_FD: i32 = 3;
/// Where the supervisor reads the secret values (JSON `[[name, value], ...]`, then EOF).
pub const SECRETS_FD: i32 = 4;

/// Secret values for interception, read once from [`SECRETS_FD`]; only ever in memory.
static SECRET_VALUES: std::sync::OnceLock<Vec<(String, String)>> = std::sync::OnceLock::new();

/// Reads the secrets pipe to its end (bounded), leaving nothing open.
fn read_secrets() -> Vec<(String, String)> {
    use std::io::Read;
    // SAFETY: fd 4 was set up by `crate::client::start_with_secrets`; if it is not open, the read
    // fails and there are no secrets.
    let f = unsafe {
        libc::fcntl(SECRETS_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        std::fs::File::from_raw_fd(SECRETS_FD)
    };
    let mut body = Vec::new();
    let _ = f.take(1 << 20).read_to_end(&mut body);
    serde_json::from_slice(&body).unwrap_or_default()
}

/// How long the guest may take from QEMU start to the agent's hello. Generous because TCG on a
/// loaded 2-core machine can be slow; KVM boots in well under a second.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// Disk serials the guest finds its disks by.
const ROOT_SERIAL: &str = "ml-root";
const UPPER_SERIAL: &str = "ml-upper";

/// The sandbox link: the guest, and matchlock's stack as its gateway and DNS server.
const GUEST_IP: [u8; 4] = [192, 168, 127, 2];
const GATEWAY_IP: [u8; 4] = [192, 168, 127, 1];
const NET_PREFIX: u8 = 24;
/// Locally administered MACs ("ML" in the second and third bytes).
const GUEST_MAC: [u8; 6] = [0x02, 0x4d, 0x4c, 0x00, 0x00, 0x02];
const GATEWAY_MAC: [u8; 6] = [0x02, 0x4d, 0x4c, 0x00, 0x00, 0x01];

/// Virtio serial of the `i`-th extra disk.
fn disk_serial(i: usize) -> String {
    format!("ml-disk{i}")
}

struct Ctx {
    config: SandboxConfig,
    mux: Mux,
    stop_tx: mpsc::Sender<StopRequest>,
    log: Arc<Mutex<CappedLog>>,
    /// The interception proxy, when the sandbox intercepts.
    proxy: Option<Arc<matchlock_intercept::proxy::Proxy>>,
    /// The workspace filesystem server (for event subscriptions).
    vfs: Arc<matchlock_vfs::VfsServer>,
}

/// Largest `logs/vm.log`: everything in it comes from the guest, which must not be able to fill
/// the host's disk.
const LOG_LIMIT: u64 = 64 * 1024 * 1024;

/// `logs/vm.log`, cut off at [`LOG_LIMIT`] with one marker line.
struct CappedLog {
    file: std::fs::File,
    written: u64,
}

impl CappedLog {
    fn append(&mut self, data: &[u8]) {
        if self.written >= LOG_LIMIT {
            return;
        }
        let room = (LOG_LIMIT - self.written) as usize;
        let part = &data[..data.len().min(room)];
        let _ = self.file.write_all(part);
        self.written += part.len() as u64;
        if self.written >= LOG_LIMIT {
            let _ = self.file.write_all(
                b"\n[matchlock] log limit of 64 MiB reached; further output is dropped\n",
            );
        }
    }
}

struct StopRequest {
    reason: String,
    grace_ms: Option<u64>,
    done: Option<oneshot::Sender<()>>,
}

/// Runs the supervisor for sandbox `id` in this process. Returns the process exit code.
pub fn run(store: Store, id: &str) -> i32 {
    // SAFETY: fd 3 was set up by our parent (see `crate::client::start`); if it is not open, the
    // writes below fail harmlessly. Mark it close-on-exec so QEMU does not inherit it and keep the
    // parent waiting for an end of file.
    let ready = unsafe {
        libc::fcntl(READY_FD, libc::F_SETFD, libc::FD_CLOEXEC);
        std::fs::File::from_raw_fd(READY_FD)
    };
    let mut ready = Some(ready);
    let _ = SECRET_VALUES.set(read_secrets());
    let config = match store.config(id) {
        Ok(c) => c,
        Err(e) => {
            report(&mut ready, &format!("error: {e}"));
            return 1;
        }
    };
    let dir = store.dir(id);
    let lock = match take_lock(&dir) {
        Ok(l) => l,
        Err(e) => {
            report(&mut ready, &format!("error: {e}"));
            return 1;
        }
    };
    let mut state = State {
        status: Status::Starting,
        pid: std::process::id(),
        qemu_pid: None,
        accel: None,
        boot_ms: None,
        reason: None,
        forwards: Vec::new(),
        updated_at: now_secs(),
    };
    let _ = store.write_state(id, &state);
    let started = Instant::now();
    // Until tokio's handlers take over after boot, remember SIGTERM/SIGINT instead of dying
    // without cleanup; the sandbox is stopped as soon as it is up.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, early_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, early_stop as *const () as libc::sighandler_t);
    }
    // Resolve the owner now, while our parent (the `run` that spawned us) is certainly still the
    // process it claims to be; later its pid could be recycled.
    let owner = open_owner(config.owner_pid);

    tracing::info!(
        id,
        image = %config.image,
        vcpus = config.vcpus(),
        memory_mb = config.memory_mb,
        "starting the sandbox"
    );
    let booted = prepare_and_spawn(&store, &config, &mut state);
    let (qemu, listeners) = match booted {
        Ok(x) => x,
        Err(e) => {
            fail(&store, &config, &mut state, &e.to_string());
            report(&mut ready, &format!("error: {e}"));
            drop(lock);
            return 1;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = kill_qemu(&qemu);
            fail(&store, &config, &mut state, &e.to_string());
            report(
                &mut ready,
                &format!("error: cannot start the async runtime: {e}"),
            );
            return 1;
        }
    };
    let launched = Launched {
        qemu,
        listeners,
        started,
        owner,
    };
    let code = rt.block_on(supervise(store, config, state, launched, ready));
    drop(lock);
    code
}

/// Tells the parent how the boot went (one line on the ready pipe), at most once.
fn report(ready: &mut Option<std::fs::File>, line: &str) {
    if let Some(mut f) = ready.take() {
        let _ = writeln!(f, "{line}");
    }
}

fn take_lock(dir: &Path) -> Result<std::fs::File, SandboxError> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(SandboxError::io("opening the sandbox lock"))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(SandboxError::Start(
            "another supervisor already owns this sandbox".into(),
        ));
    }
    Ok(f)
}

struct Qemu {
    pid: u32,
    exited: Arc<AtomicBool>,
    exit_rx: oneshot::Receiver<String>,
}

/// What the synchronous part of the boot hands to the async part.
struct Launched {
    qemu: Qemu,
    listeners: Listeners,
    started: Instant,
    owner: Owner,
}

struct Listeners {
    agent: std::os::unix::net::UnixListener,
    console: std::os::unix::net::UnixListener,
    net: Option<std::os::unix::net::UnixListener>,
    /// The workspace's virtio-fs device (`vfs.sock`), when a mount is served from the host.
    vfs: Option<std::os::unix::net::UnixListener>,
}

fn kill_qemu(q: &Qemu) -> std::io::Result<()> {
    if !q.exited.load(Ordering::SeqCst) {
        // SAFETY: plain kill(2); the pid is still our unreaped child, so it cannot be reused.
        unsafe { libc::kill(q.pid as i32, libc::SIGKILL) };
    }
    Ok(())
}

/// Synchronous part of the boot: runs on the main thread because `PR_SET_PDEATHSIG` fires when the
/// *thread* that forked QEMU exits, and the main thread lives as long as the supervisor.
fn prepare_and_spawn(
    store: &Store,
    config: &SandboxConfig,
    state: &mut State,
) -> Result<(Qemu, Listeners), SandboxError> {
    let dir = store.dir(&config.id);
    let qemu_bin = matchlock_vmm::qemu::locate_qemu()?;
    let kernel = match &config.kernel {
        Some(k) => k.clone(),
        None => matchlock_vmm::kernel::locate()?,
    };
    let agent = matchlock_vmm::agent::locate()?;
    let initramfs = matchlock_vmm::initramfs::cached(&agent)?;
    let accel = matchlock_vmm::accel::choose(&qemu_bin, &kernel, &initramfs)?;
    state.accel = Some(accel.accel.to_string());
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
            mac: GUEST_MAC,
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
    state.qemu_pid = Some(pid);
    let exited = Arc::new(AtomicBool::new(false));
    let (exit_tx, exit_rx) = oneshot::channel();
    let flag = exited.clone();
    std::thread::spawn(move || {
        let status = child.wait();
        flag.store(true, Ordering::SeqCst);
        let _ = exit_tx.send(match status {
            Ok(s) => s.to_string(),
            Err(e) => e.to_string(),
        });
    });
    Ok((
        Qemu {
            pid,
            exited,
            exit_rx,
        },
        Listeners {
            agent: agent_l,
            console: console_l,
            net: net_l,
            vfs: vfs_l,
        },
    ))
}

/// Binds a fresh listening socket at `p` (replacing a stale one), non-blocking for tokio.
fn listen(p: &Path) -> Result<std::os::unix::net::UnixListener, SandboxError> {
    check_socket_path(p)?;
    let _ = std::fs::remove_file(p);
    let l = std::os::unix::net::UnixListener::bind(p)
        .map_err(SandboxError::io(format!("binding {}", p.display())))?;
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

/// The stack's configuration from the sandbox's: policy, resolver, link.
fn network_stack(
    config: &SandboxConfig,
    net: &crate::config::NetworkConfig,
) -> Result<matchlock_net::NetConfig, String> {
    let mut allow = Vec::new();
    for a in &net.allow_private_hosts {
        allow.push(
            a.parse()
                .map_err(|_| format!("--allow-private-host '{a}' is not an IP address"))?,
        );
    }
    let policy = std::sync::Arc::new(matchlock_net::Policy {
        allow,
        allow_private_ranges: net.allow_private_ranges,
        host_addrs: matchlock_net::policy::host_addresses(),
    });
    let mut upstreams = Vec::new();
    for d in &net.dns_servers {
        upstreams.push(crate::validate::dns_server(d).map_err(|e| format!("--dns-servers: {e}"))?);
    }
    if upstreams.is_empty() {
        upstreams = matchlock_net::dns::host_resolvers();
    }
    let aliases = loopback_aliases(config);
    let hosts: Vec<(String, std::net::IpAddr)> = guest_hosts(config)
        .into_iter()
        .filter_map(|(ip, name)| Some((name.to_ascii_lowercase(), ip.parse().ok()?)))
        .collect();
    let intercept = match &net.intercept {
        None => None,
        Some(ic) => {
            let mut allow = matchlock_intercept::hosts::AllowList::new(&ic.allowed_hosts)
                .map_err(|e| format!("--allow-host: {e}"))?;
            // A list that names hosts also opens each secret's hosts; an empty list already
            // allows every host, and adding them would close it to all others.
            let add_secret_hosts = !ic.allowed_hosts.is_empty() || ic.deny_by_default;
            if ic.deny_by_default {
                allow = allow.deny_by_default();
            }
            let values = SECRET_VALUES.get().cloned().unwrap_or_default();
            let mut secrets = Vec::new();
            for spec in &ic.secrets {
                let Some((_, value)) = values.iter().find(|(n, _)| *n == spec.name) else {
                    return Err(format!("no value was passed for secret {}", spec.name));
                };
                let hosts = matchlock_intercept::hosts::AllowList::new(&spec.hosts)
                    .map_err(|e| format!("--secret {}: {e}", spec.name))?;
                if add_secret_hosts {
                    allow
                        .add(&spec.hosts)
                        .map_err(|e| format!("--secret {}: {e}", spec.name))?;
                }
                secrets.push(matchlock_intercept::secrets::Secret::new(
                    &spec.name,
                    value,
                    hosts,
                    Some(&spec.placeholder),
                ));
            }
            let ca =
                matchlock_intercept::ca::MitmCa::generate(&config.id).map_err(|e| e.to_string())?;
            let extra = match std::env::var_os("MATCHLOCK_UPSTREAM_CA").filter(|p| !p.is_empty()) {
                Some(p) => Some(std::fs::read(&p).map_err(|e| {
                    format!(
                        "MATCHLOCK_UPSTREAM_CA {}: {e}",
                        std::path::Path::new(&p).display()
                    )
                })?),
                None => None,
            };
            let tls = matchlock_intercept::proxy::upstream_tls(extra.as_deref())?;
            let names = std::sync::Arc::new(matchlock_intercept::hosts::NameTable::default());
            for (name, ip) in &hosts {
                names.record(name, &[*ip]);
            }
            let events = match &ic.event_log {
                Some(path) => {
                    let run_id = if ic.run_id.is_empty() {
                        config.id.as_str()
                    } else {
                        ic.run_id.as_str()
                    };
                    Some(std::sync::Arc::new(
                        matchlock_intercept::events::EventLog::open(path, run_id, &ic.agent_system)
                            .map_err(|e| format!("--event-log {}: {e}", path.display()))?,
                    ))
                }
                None => None,
            };
            let egress_policy = policy.clone();
            let egress: matchlock_intercept::proxy::Egress =
                std::sync::Arc::new(move |ip| egress_policy.check(ip));
            Some(std::sync::Arc::new(
                matchlock_intercept::proxy::Proxy::new(
                    allow,
                    matchlock_intercept::secrets::Secrets::new(secrets),
                    ca,
                    names,
                    egress,
                    tls,
                    events,
                    matchlock_intercept::rules::Rules::new(
                        ic.rules.clone(),
                        ic.callback_socket.clone(),
                    )?,
                )
                .with_websockets(!ic.disable_websockets),
            ))
        }
    };
    Ok(matchlock_net::NetConfig {
        guest_ip: GUEST_IP.into(),
        gateway_ip: GATEWAY_IP.into(),
        prefix: NET_PREFIX,
        gateway_mac: GATEWAY_MAC,
        mtu: net.mtu,
        dns: std::sync::Arc::new(matchlock_net::dns::Dns {
            upstreams,
            hosts,
            policy: policy.clone(),
            intercept: intercept.clone(),
        }),
        policy,
        limits: matchlock_net::Limits::default(),
        aliases,
        intercept,
    })
}

/// Writes the sandbox CA into the guest: its own file, and appended to the CA bundle (created when
/// the image has none).
async fn install_ca(mux: &Mux, pem: &str) -> Result<(), String> {
    use crate::config::{GUEST_CA_BUNDLE, GUEST_CA_FILE};
    let mut bundle = Vec::new();
    {
        let mut s = mux.open().await.map_err(|e| e.to_string())?;
        write_msg(
            &mut s,
            &Msg::ReadFile {
                path: GUEST_CA_BUNDLE.into(),
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        loop {
            match read_msg(&mut s).await {
                Ok(Some(Msg::Data(d))) if bundle.len() < (16 << 20) => bundle.extend_from_slice(&d),
                Ok(Some(Msg::FileInfo { .. })) => {}
                // Missing or unreadable: start a bundle of our own.
                Ok(Some(Msg::Eof)) => break,
                _ => {
                    bundle.clear();
                    break;
                }
            }
        }
    }
    if !bundle.is_empty() && !bundle.ends_with(b"\n") {
        bundle.push(b'\n');
    }
    bundle.extend_from_slice(pem.as_bytes());
    for (path, data) in [
        (GUEST_CA_FILE, pem.as_bytes()),
        (GUEST_CA_BUNDLE, &bundle[..]),
    ] {
        let mut s = mux.open().await.map_err(|e| e.to_string())?;
        let req = matchlock_proto::WriteFile {
            path: path.into(),
            mode: 0o644,
            uid: Some(0),
            gid: Some(0),
        };
        write_msg(&mut s, &Msg::WriteFile(req))
            .await
            .map_err(|e| e.to_string())?;
        matchlock_proto::transfer::send_file_body(&mut s, data)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

/// `--add-host` entries pointing at host loopback, each with its guest-visible alias (the guest's
/// own loopback would shadow them). Only with a network: without one there is nothing to reach.
fn loopback_aliases(config: &SandboxConfig) -> Vec<(std::net::Ipv4Addr, std::net::IpAddr)> {
    if config.network.is_none() {
        return Vec::new();
    }
    let mut out: Vec<(std::net::Ipv4Addr, std::net::IpAddr)> = Vec::new();
    for (ip, _) in &config.add_hosts {
        let Ok(real) = ip.parse::<std::net::IpAddr>() else {
            continue;
        };
        if !real.is_loopback() || out.iter().any(|(_, r)| *r == real) {
            continue;
        }
        let n = u32::from(matchlock_net::ALIAS_BASE) + out.len() as u32;
        out.push((n.into(), real));
    }
    out
}

/// The `/etc/hosts` entries the guest gets: loopback targets replaced by their aliases.
fn guest_hosts(config: &SandboxConfig) -> Vec<(String, String)> {
    let aliases = loopback_aliases(config);
    config
        .add_hosts
        .iter()
        .map(|(ip, name)| {
            let shown = ip
                .parse::<std::net::IpAddr>()
                .ok()
                .and_then(|real| aliases.iter().find(|(_, r)| *r == real))
                .map(|(alias, _)| alias.to_string())
                .unwrap_or_else(|| ip.clone());
            (shown, name.clone())
        })
        .collect()
}

/// Records a failed start and removes what the start created.
fn fail(store: &Store, config: &SandboxConfig, state: &mut State, reason: &str) {
    state.status = Status::Failed;
    state.reason = Some(reason.to_string());
    state.updated_at = now_secs();
    let _ = store.write_state(&config.id, state);
    // A sandbox that never ran holds nothing worth keeping; the error went to the caller.
    // MATCHLOCK_KEEP_FAILED=1 keeps its directory (logs, disks) for debugging.
    if std::env::var_os("MATCHLOCK_KEEP_FAILED").is_none() {
        let _ = std::fs::remove_dir_all(store.dir(&config.id));
    }
}

fn console_tail(dir: &Path) -> String {
    let data = std::fs::read(dir.join("logs").join("vm.log")).unwrap_or_default();
    let text = String::from_utf8_lossy(&data);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(8)..].join("\n  ");
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n  guest console:\n  {tail}")
    }
}

/// Opens the workspace mounts' host roots and describes them for the guest. Every mount is
/// served by the host, so rules and events apply to every kind: `memory` mounts from an empty
/// private directory in the sandbox's state directory, `overlay` mounts that rules or events
/// watch from a private copy (unwatched ones are overlayfs in the guest, which copies nothing).
/// Private directories are capped at the sandbox's memory size (plus the copy).
fn vfs_server(
    config: &SandboxConfig,
    dir: &Path,
) -> Result<
    (
        Arc<matchlock_vfs::VfsServer>,
        Vec<matchlock_proto::GuestVfsMount>,
    ),
    String,
> {
    let rules: Vec<_> = config
        .vfs_block_rules
        .iter()
        .map(|r| matchlock_vfs::rules::BlockRule {
            ops: r.ops.clone(),
            path: r.path.clone(),
        })
        .collect();
    let watched = !rules.is_empty() || config.vfs_emit_events;
    let budget = config.memory_mb.saturating_mul(1 << 20);
    let mut specs = Vec::new();
    let mut guest = Vec::new();
    for (i, m) in config.vfs.iter().enumerate() {
        let scratch = dir.join("scratch").join(i.to_string());
        let (host_path, read_only, private) = match m.mode {
            VfsMode::Memory => {
                matchlock_vfs::scratch::create(&scratch)
                    .map_err(|e| format!("workspace mount {}: {e}", m.guest_path))?;
                (scratch, false, Some((budget, 0)))
            }
            VfsMode::Overlay if watched => {
                let used =
                    matchlock_vfs::scratch::copy_tree(&m.host_path, &scratch, budget.max(1 << 30))
                        .map_err(|e| format!("workspace mount {}: {e}", m.guest_path))?;
                (scratch, false, Some((used.saturating_add(budget), used)))
            }
            VfsMode::HostFs => (m.host_path.clone(), false, None),
            VfsMode::ReadOnly | VfsMode::Overlay => (m.host_path.clone(), true, None),
        };
        guest.push(matchlock_proto::GuestVfsMount {
            id: specs.len() as u32,
            path: m.guest_path.clone(),
            file: host_path.is_file(),
            read_only: m.mode == VfsMode::ReadOnly,
            // A private copy takes the guest's writes itself.
            overlay: m.mode == VfsMode::Overlay && private.is_none(),
        });
        specs.push(matchlock_vfs::MountSpec {
            host_path,
            read_only,
            guest_path: m.guest_path.clone(),
            rules: rules.clone(),
            owner: matchlock_vfs::Owner {
                uid: m.owner_uid,
                gid: m.owner_gid,
            },
            emit_events: config.vfs_emit_events,
            private,
        });
    }
    let server =
        matchlock_vfs::VfsServer::new(&specs).map_err(|e| format!("workspace mount {e}"))?;
    Ok((Arc::new(server), guest))
}

async fn supervise(
    store: Store,
    config: SandboxConfig,
    mut state: State,
    launched: Launched,
    mut ready: Option<std::fs::File>,
) -> i32 {
    let Launched {
        mut qemu,
        listeners,
        started,
        owner,
    } = launched;
    let dir = store.dir(&config.id);
    let (vfs, guest_vfs) = match vfs_server(&config, &dir) {
        Ok(v) => v,
        Err(e) => {
            let _ = kill_qemu(&qemu);
            fail(&store, &config, &mut state, &e);
            report(&mut ready, &format!("error: {e}"));
            return 1;
        }
    };
    let log = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join("vm.log"))
    {
        Ok(f) => Arc::new(Mutex::new(CappedLog {
            file: f,
            written: 0,
        })),
        Err(e) => {
            let _ = kill_qemu(&qemu);
            fail(&store, &config, &mut state, &e.to_string());
            report(&mut ready, &format!("error: cannot open logs/vm.log: {e}"));
            return 1;
        }
    };
    // Workspace: QEMU's virtio-fs device connects to vfs.sock (QEMU waits for the handshake).
    if let Some(l) = listeners.vfs {
        if let Err(e) = vfs.serve_virtiofs(l) {
            let _ = kill_qemu(&qemu);
            let e = format!("starting the workspace device: {e}");
            fail(&store, &config, &mut state, &e);
            report(&mut ready, &format!("error: {e}"));
            return 1;
        }
    }
    let (agent_l, console_l) = match (
        UnixListener::from_std(listeners.agent),
        UnixListener::from_std(listeners.console),
    ) {
        (Ok(a), Ok(c)) => (a, c),
        _ => {
            let _ = kill_qemu(&qemu);
            fail(&store, &config, &mut state, "socket setup failed");
            report(&mut ready, "error: socket setup failed");
            return 1;
        }
    };
    // Console: copy everything QEMU's serial port prints into vm.log.
    let console_log = log.clone();
    tokio::spawn(async move {
        if let Ok((mut s, _)) = console_l.accept().await {
            let mut buf = vec![0u8; 8192];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                console_log.lock().await.append(&buf[..n]);
            }
        }
    });

    // Network: QEMU connects its NIC to net.sock; the stack serves it for the VM's lifetime.
    let mut ca_pem: Option<String> = None;
    let mut proxy_handle = None;
    if let (Some(l), Some(netcfg)) = (listeners.net, config.network.clone()) {
        match (UnixListener::from_std(l), network_stack(&config, &netcfg)) {
            (Ok(l), Ok(stack)) => {
                ca_pem = stack.intercept.as_ref().map(|p| p.ca_pem().to_string());
                proxy_handle = stack.intercept.clone();
                tokio::spawn(async move {
                    if let Ok((conn, _)) = l.accept().await {
                        if let Err(e) = matchlock_net::serve(conn, stack).await {
                            tracing::warn!("network stack stopped: {e}");
                        }
                    }
                });
            }
            (_, Err(e)) => {
                let _ = kill_qemu(&qemu);
                fail(&store, &config, &mut state, &e);
                report(&mut ready, &format!("error: {e}"));
                return 1;
            }
            (Err(e), _) => {
                let _ = kill_qemu(&qemu);
                fail(&store, &config, &mut state, &e.to_string());
                report(&mut ready, "error: network socket setup failed");
                return 1;
            }
        }
    }

    let boot = async {
        let (mut conn, _) = agent_l
            .accept()
            .await
            .map_err(|e| format!("QEMU did not connect the agent channel: {e}"))?;
        let mut hello = [0u8; 8];
        conn.read_exact(&mut hello)
            .await
            .map_err(|e| format!("guest agent did not say hello: {e}"))?;
        if &hello != matchlock_proto::HELLO {
            return Err(format!(
                "guest agent speaks another protocol version ({:?}); rebuild the guest agent",
                String::from_utf8_lossy(&hello)
            ));
        }
        // The guest opens no streams of its own (its filesystem requests have their own port).
        let (mux, _inbound, _driver) = Mux::start(conn, Role::Client);
        let mut s = mux.open().await.map_err(|e| e.to_string())?;
        let setup = Setup {
            hostname: config.hostname.clone(),
            hosts: guest_hosts(&config),
            root_serial: ROOT_SERIAL.into(),
            upper_serial: Some(UPPER_SERIAL.into()),
            time_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            cpu_max: config.cpu_max(),
            confined: !config.privileged,
            net: config.network.as_ref().map(|n| matchlock_proto::GuestNet {
                address: GUEST_IP,
                prefix: NET_PREFIX,
                gateway: GATEWAY_IP,
                mtu: n.mtu,
            }),
            disks: config
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| matchlock_proto::GuestDisk {
                    serial: disk_serial(i),
                    path: d.guest_path.clone(),
                    read_only: d.read_only,
                    uid: d.uid,
                    gid: d.gid,
                })
                .collect(),
            vfs: guest_vfs.clone(),
        };
        write_msg(&mut s, &Msg::Setup(setup))
            .await
            .map_err(|e| e.to_string())?;
        match read_msg(&mut s).await {
            Ok(Some(Msg::Ok)) => Ok(mux),
            Ok(Some(Msg::Error(e))) => Err(format!("guest setup failed: {e}")),
            Ok(other) => Err(format!("guest setup: unexpected reply {other:?}")),
            Err(e) => Err(format!("guest setup: {e}")),
        }
    };
    let booted = tokio::select! {
        r = tokio::time::timeout(BOOT_TIMEOUT, boot) => match r {
            Ok(r) => r,
            Err(_) => Err(format!("the guest did not come up within {} s", BOOT_TIMEOUT.as_secs())),
        },
        status = &mut qemu.exit_rx => {
            let qlog = std::fs::read_to_string(dir.join("logs").join("qemu.log")).unwrap_or_default();
            let first = qlog.lines().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
            Err(format!("QEMU exited during boot ({}) {first}", status.unwrap_or_default()))
        }
    };
    // The sandbox CA goes into the guest's trust store before anything runs.
    let booted = match (booted, &ca_pem) {
        (Ok(mux), Some(pem)) => match install_ca(&mux, pem).await {
            Ok(()) => Ok(mux),
            Err(e) => Err(format!("installing the sandbox CA: {e}")),
        },
        (other, _) => other,
    };
    let mux = match booted {
        Ok(m) => m,
        Err(e) => {
            let _ = kill_qemu(&qemu);
            // Give the console copier a moment to flush what the guest printed before dying.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let hint = match &config.kernel {
                // The likeliest cause when the user brought the kernel.
                Some(k) => format!(
                    "\n  the guest kernel {} (--kernel) is the likely cause: it must be an x86-64 \
                     vmlinux with PVH, virtio-mmio command-line devices and the virtio console, \
                     serial, block, net and fs drivers built in (not modules); run without \
                     --kernel to use matchlock's own",
                    k.display()
                ),
                None => String::new(),
            };
            let msg = format!("sandbox failed to boot: {e}{hint}{}", console_tail(&dir));
            tracing::error!("{msg}");
            fail(&store, &config, &mut state, &msg);
            report(&mut ready, &format!("error: {}", msg.replace('\n', "\\n")));
            return 1;
        }
    };

    let control_path = dir.join("control.sock");
    let control = match UnixListener::bind(&control_path) {
        Ok(l) => l,
        Err(e) => {
            let _ = kill_qemu(&qemu);
            fail(&store, &config, &mut state, &e.to_string());
            report(
                &mut ready,
                &format!("error: cannot bind the control socket: {e}"),
            );
            return 1;
        }
    };
    let _ = std::fs::set_permissions(&control_path, std::fs::Permissions::from_mode(0o600));
    // Published ports live as long as the sandbox, whoever started it; a port that cannot be
    // bound fails the start.
    let forwards = match start_forwards(&config, &control_path).await {
        Ok(f) => f,
        Err(e) => {
            let _ = kill_qemu(&qemu);
            fail(&store, &config, &mut state, &e);
            report(&mut ready, &format!("error: {e}"));
            return 1;
        }
    };
    state.forwards = forwards
        .as_ref()
        .map(|f| {
            f.bindings()
                .iter()
                .map(|b| crate::config::PublishedPort {
                    address: b.address,
                    local_port: b.local_port,
                    remote_port: b.remote_port,
                })
                .collect()
        })
        .unwrap_or_default();
    state.status = Status::Running;
    state.boot_ms = Some(started.elapsed().as_millis() as u64);
    tracing::info!(
        boot_ms = state.boot_ms.unwrap_or(0),
        forwards = state.forwards.len(),
        "guest ready"
    );
    state.updated_at = now_secs();
    let _ = store.write_state(&config.id, &state);
    report(&mut ready, "ok");

    let (stop_tx, mut stop_rx) = mpsc::channel::<StopRequest>(16);
    let ctx = Arc::new(Ctx {
        config: config.clone(),
        mux: mux.clone(),
        stop_tx: stop_tx.clone(),
        log,
        proxy: proxy_handle,
        vfs: vfs.clone(),
    });
    let mut sigterm =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    let deadline = config
        .timeout_secs
        .map(|t| tokio::time::Instant::from_std(started + Duration::from_secs(t)));
    let owner_gone = owner_exit(owner);
    tokio::pin!(owner_gone);
    let mut waiters: Vec<oneshot::Sender<()>> = Vec::new();
    let (reason, grace, qemu_gone) = loop {
        tokio::select! {
            conn = control.accept() => {
                if let Ok((conn, _)) = conn {
                    let ctx = ctx.clone();
                    tokio::spawn(async move { handle(ctx, conn).await });
                }
            }
            req = stop_rx.recv() => {
                if let Some(mut req) = req {
                    if let Some(done) = req.done.take() { waiters.push(done); }
                    break (req.reason, req.grace_ms.unwrap_or(config.graceful_shutdown_ms), false);
                }
            }
            status = &mut qemu.exit_rx => {
                break (format!("the VM exited ({})", status.unwrap_or_default()), 0, true);
            }
            _ = async { match sigterm.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
                break ("stopped by SIGTERM".to_string(), config.graceful_shutdown_ms, false);
            }
            _ = async { match sigint.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {
                break ("stopped by SIGINT".to_string(), config.graceful_shutdown_ms, false);
            }
            _ = async { if EARLY_STOP.load(Ordering::SeqCst) == 0 { std::future::pending::<()>().await } } => {
                break ("stopped by a signal during boot".to_string(), config.graceful_shutdown_ms, false);
            }
            _ = &mut owner_gone => {
                break ("its owner process exited".to_string(), config.graceful_shutdown_ms, false);
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                break (format!("timeout after {}s", config.timeout_secs.unwrap_or(0)), 0, false);
            }
        }
    };
    tracing::info!(%reason, "stopping");
    state.status = Status::Stopping;
    state.updated_at = now_secs();
    let _ = store.write_state(&config.id, &state);
    drop(forwards);
    drop(control);
    let _ = std::fs::remove_file(&control_path);
    if !qemu_gone {
        shutdown_guest(&mux, grace, &mut qemu).await;
    }
    // Late stop requests still deserve an answer.
    while let Ok(mut req) = stop_rx.try_recv() {
        if let Some(done) = req.done.take() {
            waiters.push(done);
        }
    }
    state.status = Status::Stopped;
    state.reason = Some(reason);
    state.updated_at = now_secs();
    let _ = store.write_state(&config.id, &state);
    store.reclaim(&config.id);
    tracing::info!("stopped");
    if config.remove_on_stop {
        let _ = std::fs::remove_dir_all(&dir);
    }
    for w in waiters {
        let _ = w.send(());
    }
    // Let the stop replies reach their clients before the runtime goes away.
    tokio::time::sleep(Duration::from_millis(20)).await;
    0
}

/// Binds the sandbox's published ports ([`SandboxConfig::publish`]); `None` when it has none.
async fn start_forwards(
    config: &SandboxConfig,
    control: &Path,
) -> Result<Option<crate::forward::Forwarder>, String> {
    if config.publish.is_empty() {
        return Ok(None);
    }
    let client = crate::client::Client::at(&config.id, control.to_path_buf());
    let mut forwarders = Vec::new();
    for p in &config.publish {
        forwarders.push((
            crate::forward::PortMap {
                local_port: p.local_port,
                remote_port: p.remote_port,
            },
            p.address,
        ));
    }
    crate::forward::Forwarder::start_pairs(client, &forwarders)
        .await
        .map(Some)
        .map_err(|e| format!("port forward: {e}"))
}

/// A SIGTERM or SIGINT that arrived before the async runtime's handlers were installed.
static EARLY_STOP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn early_stop(sig: libc::c_int) {
    EARLY_STOP.store(sig, Ordering::SeqCst);
}

/// The process whose exit stops the sandbox.
enum Owner {
    /// Not tied to any process.
    None,
    /// The owner was already gone when we looked.
    Gone,
    /// A pidfd of the owner.
    Pid(std::os::fd::OwnedFd),
}

/// Opens a pidfd of the owner, which must be our parent: `run` spawns the supervisor itself.
fn open_owner(pid: Option<u32>) -> Owner {
    let Some(pid) = pid else { return Owner::None };
    // SAFETY: getppid and pidfd_open have no memory-safety preconditions.
    if unsafe { libc::getppid() } as u32 != pid {
        return Owner::Gone;
    }
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) } as i32;
    if fd < 0 {
        // ESRCH: already gone. Other errors (a kernel without pidfds): do not tie the lifetime.
        return if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
            Owner::Gone
        } else {
            Owner::None
        };
    }
    // SAFETY: fd is a fresh pidfd we own.
    Owner::Pid(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Resolves when the owner exits (never without one). A pidfd cannot be fooled by pid reuse.
async fn owner_exit(owner: Owner) {
    let fd = match owner {
        Owner::None => return std::future::pending().await,
        Owner::Gone => return,
        Owner::Pid(fd) => fd,
    };
    // SAFETY: the OwnedFd is a valid descriptor, closed only when the AsyncFd drops.
    match unsafe { tokio::io::unix::AsyncFd::register(fd) } {
        // A pidfd becomes readable when the process exits.
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// Asks the guest to stop its processes and power off; kills QEMU if it does not within the grace
/// period plus a margin.
async fn shutdown_guest(mux: &Mux, grace_ms: u64, qemu: &mut Qemu) {
    let ask = async {
        let mut s = mux.open().await.ok()?;
        write_msg(&mut s, &Msg::Shutdown { grace_ms }).await.ok()?;
        read_msg(&mut s).await.ok()
    };
    let margin = Duration::from_millis(grace_ms) + Duration::from_secs(5);
    let _ = tokio::time::timeout(margin, ask).await;
    if tokio::time::timeout(Duration::from_secs(5), &mut qemu.exit_rx)
        .await
        .is_err()
    {
        let _ = kill_qemu(qemu);
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut qemu.exit_rx).await;
    }
}

/// Serves one control connection.
async fn handle(ctx: Arc<Ctx>, mut conn: UnixStream) {
    let req: Request = match control::read_json(&mut conn).await {
        Ok(r) => r,
        Err(e) => {
            let _ = control::write_json(
                &mut conn,
                &Reply::Error(format!("bad control request: {e}")),
            )
            .await;
            return;
        }
    };
    tracing::debug!(request = req.name(), "control request");
    match req {
        Request::Exec(spec) => {
            let log = spec.log;
            let req = compose_exec(&ctx.config, spec);
            if log {
                splice_logged(&ctx, conn, Msg::Exec(req)).await;
            } else {
                splice(&ctx, conn, Msg::Exec(req)).await;
            }
        }
        Request::File(msg) => {
            if matches!(
                msg,
                Msg::WriteFile(_) | Msg::ReadFile { .. } | Msg::ListFiles { .. }
            ) {
                splice(&ctx, conn, msg).await;
            } else {
                let _ = write_msg(&mut conn, &Msg::Error("not a file operation".into())).await;
            }
        }
        Request::Stop { grace_ms } => {
            let (tx, rx) = oneshot::channel();
            let sent = ctx
                .stop_tx
                .send(StopRequest {
                    reason: "stopped by request".into(),
                    grace_ms,
                    done: Some(tx),
                })
                .await;
            if sent.is_ok() {
                let _ = rx.await;
            }
            let _ = control::write_json(&mut conn, &Reply::Ok).await;
        }
        Request::Connect { port } => splice(&ctx, conn, Msg::Connect { port }).await,
        Request::Launch { spec, settle_ms } => {
            let reply = match launch(ctx.clone(), spec, settle_ms).await {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e),
            };
            let _ = control::write_json(&mut conn, &reply).await;
        }
        Request::Ping => {
            let _ = control::write_json(&mut conn, &Reply::Ok).await;
        }
        Request::Events => {
            if !ctx.config.vfs_emit_events {
                let e = "this sandbox was created without workspace events (emit_events)";
                let _ = control::write_json(&mut conn, &Reply::Error(e.into())).await;
                return;
            }
            // Subscribed before the Ok, so the client misses nothing after it.
            let mut events = ctx.vfs.subscribe();
            if control::write_json(&mut conn, &Reply::Ok).await.is_err() {
                return;
            }
            loop {
                match events.recv().await {
                    Ok(e) => {
                        if control::write_json(&mut conn, &e).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!("event subscriber fell behind; {n} events dropped");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
        Request::AllowList { add, remove } => {
            let reply = match &ctx.proxy {
                None => Reply::Error(
                    "allow-list updates unavailable: sandbox was started without network interception"
                        .into(),
                ),
                Some(p) => match p.allow_add(&add) {
                    Ok(added) => {
                        let removed = p.allow_remove(&remove);
                        Reply::AllowList {
                            added,
                            removed,
                            allowed_hosts: p.allowed(),
                            deny_by_default: p.denies_when_empty(),
                        }
                    }
                    Err(e) => Reply::Error(e),
                },
            };
            let _ = control::write_json(&mut conn, &reply).await;
        }
    }
}

/// Runs a detached command (`run -d`): its output and exit code go to `logs/vm.log`.
async fn launch(ctx: Arc<Ctx>, spec: ExecSpec, settle_ms: u64) -> Result<(), String> {
    let mut s = ctx.mux.open().await.map_err(|e| e.to_string())?;
    write_msg(&mut s, &Msg::Exec(compose_exec(&ctx.config, spec)))
        .await
        .map_err(|e| e.to_string())?;
    // A guest that never answers must not hang `run -d`.
    let first = tokio::time::timeout(Duration::from_secs(30), read_msg(&mut s))
        .await
        .map_err(|_| "the guest did not start the command within 30 s".to_string())?;
    match first {
        Ok(Some(Msg::Started { .. })) => {}
        Ok(Some(Msg::Error(e))) => return Err(e),
        other => return Err(format!("unexpected reply {other:?}")),
    }
    let (exit_tx, exit_rx) = oneshot::channel::<i32>();
    let id = ctx.config.id.clone();
    tokio::spawn(async move {
        let mut exit_tx = Some(exit_tx);
        loop {
            match read_msg(&mut s).await {
                Ok(Some(Msg::Stdout(d))) | Ok(Some(Msg::Stderr(d))) => {
                    ctx.log.lock().await.append(&d);
                }
                Ok(Some(Msg::Exited(st))) => {
                    let line = format!("[matchlock] command exited with code {}\n", st.code);
                    ctx.log.lock().await.append(line.as_bytes());
                    if let Some(tx) = exit_tx.take() {
                        let _ = tx.send(st.code);
                    }
                    break;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    });
    if settle_ms > 0 {
        if let Ok(Ok(code)) = tokio::time::timeout(Duration::from_millis(settle_ms), exit_rx).await
        {
            if code != 0 {
                return Err(format!(
                    "the command exited with code {code} right after starting; see 'matchlock log {id}'"
                ));
            }
        }
    }
    Ok(())
}

/// Opens a guest stream, sends `first`, then copies bytes both ways until either side is done.
async fn splice(ctx: &Ctx, mut conn: UnixStream, first: Msg) {
    let mut stream = match ctx.mux.open().await {
        Ok(s) => s,
        Err(e) => {
            let _ = write_msg(
                &mut conn,
                &Msg::Error(format!("sandbox is shutting down: {e}")),
            )
            .await;
            return;
        }
    };
    if let Err(e) = write_msg(&mut stream, &first).await {
        let _ = write_msg(&mut conn, &Msg::Error(format!("guest channel: {e}"))).await;
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut stream).await;
}

/// Like [`splice`] for an exec whose output also goes to `logs/vm.log` (`run`'s command): the
/// guest's messages are read one by one, their output appended to the log, and passed on.
async fn splice_logged(ctx: &Ctx, conn: UnixStream, first: Msg) {
    let mut stream = match ctx.mux.open().await {
        Ok(s) => s,
        Err(e) => {
            let mut conn = conn;
            let _ = write_msg(
                &mut conn,
                &Msg::Error(format!("sandbox is shutting down: {e}")),
            )
            .await;
            return;
        }
    };
    if write_msg(&mut stream, &first).await.is_err() {
        return;
    }
    let (mut guest_rd, mut guest_wr) = tokio::io::split(stream);
    let (mut client_rd, mut client_wr) = conn.into_split();
    let to_guest = async {
        let _ = tokio::io::copy(&mut client_rd, &mut guest_wr).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut guest_wr).await;
    };
    let to_client = async {
        while let Ok(Some(m)) = read_msg(&mut guest_rd).await {
            match &m {
                Msg::Stdout(d) | Msg::Stderr(d) => ctx.log.lock().await.append(d),
                Msg::Exited(st) => {
                    let line = format!("[matchlock] command exited with code {}\n", st.code);
                    ctx.log.lock().await.append(line.as_bytes());
                }
                _ => {}
            }
            if write_msg(&mut client_wr, &m).await.is_err() {
                break;
            }
        }
    };
    // Either side ending ends the exec (the guest kills a process whose stream closes).
    tokio::select! {
        _ = to_guest => {}
        _ = to_client => {}
    }
}

/// Fills an exec with the sandbox's defaults: base env (overridden by the request's), working
/// directory, user and privilege.
pub fn compose_exec(config: &SandboxConfig, spec: ExecSpec) -> ExecRequest {
    let mut env = config.env.clone();
    for (k, v) in spec.env {
        match env.iter_mut().find(|(ek, _)| *ek == k) {
            Some(slot) => slot.1 = v,
            None => env.push((k, v)),
        }
    }
    ExecRequest {
        argv: spec.argv,
        env,
        cwd: spec
            .cwd
            .or_else(|| config.workdir.clone())
            .or_else(|| Some("/".into())),
        user: spec.user.or_else(|| config.user.clone()),
        tty: spec.tty,
        stdin: spec.stdin,
        privileged: config.privileged,
    }
}

/// Where the supervisor binary is: this executable.
pub fn supervisor_exe() -> Result<PathBuf, SandboxError> {
    std::env::current_exe().map_err(SandboxError::io("finding the matchlock executable"))
}
