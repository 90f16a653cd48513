//! Templates (DESIGN D14): a snapshot of a guest booted up to its agent's hello, one per
//! (image, kernel, agent, QEMU, accelerator, VM shape), from which sandboxes start instead of
//! booting.
//!
//! At that point nothing of any sandbox is in the guest: its hostname, clock, disks, network,
//! CA, environment and entropy all arrive afterwards, in `Setup` and the execs, exactly as after
//! a cold boot. So a restored guest differs from a booted one only in what the kernel did during
//! boot: its random state (reseeded from the host by `Setup`) and what it cached of its disks
//! (dropped by the agent before it mounts them).
//!
//! A template lives in `$MATCHLOCK_HOME/templates/<key>/`, mode 0700/0600: `ram`, the guest's
//! memory (its guest ran with RAM shared with that file), `state.zst`, QEMU's migration stream
//! of everything else (devices, CPU; compressed), and `meta.json`. Sandboxes started from it map
//! `ram` privately ([`matchlock_vmm::qemu::RamFile`]): the pages a sandbox only reads are one
//! copy in the host's page cache for all of them, and it never writes to the file. (QEMU runs as
//! root and can open the file for writing, as it could every other file of the store; the file
//! is checked for its size, not hashed, since hashing it would cost what starting from it saves.)
//! Where the store is on tmpfs or ramfs there is no `ram`: `state.zst` holds the memory too and
//! each sandbox gets its own copy ([`shares_ram`] says why). The key hashes QEMU's whole command line (with
//! the sandbox's own paths left out) and the identity of every file the guest was made from, so
//! a change to any input makes a new template. It is prepared on first use, under a lock
//! (a second start meanwhile boots cold rather than wait), and replaced when it fails to restore.

use super::vm::{self, Base};
use crate::config::SandboxConfig;
use crate::store::Store;
use matchlock_vmm::qmp::{accept_within, Qmp};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bumped when what a template holds changes meaning (2: RAM in its own file).
const FORMAT: u32 = 2;

/// How long the template's guest may take to say hello (as a cold boot).
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// What `meta.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT`] when it was made.
    pub format: u32,
    /// Its key (the directory's name).
    pub key: String,
    /// The image it was made from.
    pub image: String,
    /// The image's root filesystem: once it is gone (`image rm`, `image gc`), so is the template.
    #[serde(default)]
    pub rootfs: PathBuf,
    /// QEMU, kernel and initramfs as they were when it was made ([`identity`]): once one of them
    /// changes (an upgrade, a rebuilt agent), no sandbox can use the template again, so it goes.
    #[serde(default)]
    pub inputs: Vec<(PathBuf, String)>,
    /// Its VM shape: guest memory (MiB), vCPUs, upper disk (MiB), whether it has a NIC.
    pub memory_mb: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Upper disk size in MiB.
    pub disk_size_mb: u64,
    /// Whether the guest has a NIC.
    pub network: bool,
    /// Hex sha256 of `state.zst`, checked as it streams into QEMU.
    pub sha256: String,
    /// Bytes of QEMU's migration stream.
    pub stream_bytes: u64,
    /// Bytes on disk.
    pub file_bytes: u64,
    /// Whether guest memory is in `ram` (`memory_mb` MiB long) rather than in `state.zst`.
    #[serde(default)]
    pub ram_file: bool,
    /// Bytes of `ram` the guest touched (allocated on disk).
    #[serde(default)]
    pub ram_bytes: u64,
    /// `ram` as it was made ([`identity`] plus its change time): a file changed in place since
    /// (anything that wrote to it or punched a hole) is no template any more.
    #[serde(default)]
    pub ram_identity: String,
    /// Milliseconds from QEMU's start to the guest's hello, when it was made.
    pub boot_ms: u64,
    /// Milliseconds the save took.
    pub save_ms: u64,
    /// Seconds since the epoch.
    pub created_at: u64,
}

/// A template on disk.
pub struct Template {
    dir: PathBuf,
    /// What it holds.
    pub meta: Meta,
}

impl Template {
    /// The snapshot file.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.zst")
    }

    /// The guest memory file, when its memory is not in the state file.
    pub fn ram_path(&self) -> Option<PathBuf> {
        self.meta.ram_file.then(|| self.dir.join("ram"))
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes it (it failed to restore); the next start prepares a new one.
    pub fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Why `config` on `base` cannot start from a template, or `None` when it can.
pub fn unsuitable(base: &Base, config: &SandboxConfig) -> Option<String> {
    if config.no_snapshot {
        return Some("--no-snapshot".into());
    }
    if !enabled() {
        return Some("templates are off (MATCHLOCK_TEMPLATES=0)".into());
    }
    // A TCG guest without a real clocksource (the host TSC's rate unknown) runs on jiffies, and
    // restored such guests were seen to stall an exec's data flow: only guests with a real clock
    // (kvm-clock, or the TSC under TCG) start from templates.
    if base.accel.accel == matchlock_vmm::accel::Accel::Tcg && base.cmdline.is_empty() {
        return Some("this host's TSC gives a TCG guest no stable clock".into());
    }
    unsuitable_config(config)
}

/// Whether templates are on: unless `MATCHLOCK_TEMPLATES=0`.
pub fn enabled() -> bool {
    std::env::var_os("MATCHLOCK_TEMPLATES").is_none_or(|v| v != "0")
}

/// The sandbox's own reasons not to start from a template.
fn unsuitable_config(config: &SandboxConfig) -> Option<String> {
    if std::env::var_os("MATCHLOCK_NO_SNAPSHOT").is_some_and(|v| !v.is_empty() && v != "0") {
        return Some("MATCHLOCK_NO_SNAPSHOT is set".into());
    }
    // QEMU (7.2) refuses to migrate a VM with a vhost-user-fs device, and microvm cannot add one
    // after a restore.
    if !config.vfs.is_empty() {
        return Some("workspace mounts need a booted VM".into());
    }
    // Extra disks differ per sandbox in number and size, which the guest learnt at boot.
    if !config.disks.is_empty() {
        return Some("extra disks need a booted VM".into());
    }
    None
}

/// Where templates live.
pub fn root(store: &Store) -> PathBuf {
    store.home().join("templates")
}

/// The template key of `config` on `base`: a hash of QEMU's command line for it (minus the
/// sandbox's own paths) and of the identity of every file that shapes the guest.
pub fn key(base: &Base, config: &SandboxConfig) -> String {
    let spec = base.spec(config, Path::new("/SANDBOX"));
    // The upper disk's size is not on the command line (its file is), but the guest read it at
    // boot: a clone's fresh upper disk must have the same.
    let mut h = format!("format {FORMAT}\nupper {} MiB\n", config.disk_size_mb);
    for arg in spec.command().get_args() {
        h.push_str(&arg.to_string_lossy());
        h.push('\n');
    }
    for f in [&base.qemu, &base.kernel, &base.initramfs, &config.rootfs] {
        h.push_str(&identity(f));
        h.push('\n');
    }
    // (The template's meta.json keeps the first three as `inputs`, for `prune`.)
    if base.accel.accel == matchlock_vmm::accel::Accel::Kvm {
        // `-cpu host`: a KVM snapshot holds this CPU's features.
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        for l in cpuinfo.lines().take_while(|l| !l.trim().is_empty()) {
            if l.starts_with("model name") || l.starts_with("flags") {
                h.push_str(l);
                h.push('\n');
            }
        }
    }
    matchlock_vmm::sha256_hex(h.as_bytes())[..32].to_string()
}

/// A template memory file's size, inode, modification and change times (not its path, which
/// changes when the template moves into place).
fn ram_identity(p: &Path) -> String {
    match std::fs::metadata(p) {
        Ok(m) => format!(
            "{} {} {}.{} {}.{}",
            m.len(),
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec()
        ),
        Err(_) => "missing".into(),
    }
}

/// A file's path, size, modification time and inode: a rebuilt kernel or a re-imported image
/// makes another key.
fn identity(p: &Path) -> String {
    match std::fs::metadata(p) {
        Ok(m) => format!(
            "{} {} {} {} {}",
            p.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec(),
            m.ino()
        ),
        Err(_) => format!("{} missing", p.display()),
    }
}

/// The template for `config`, prepared now when there is none. An error says why the sandbox
/// boots cold instead.
pub fn prepare(store: &Store, base: &Base, config: &SandboxConfig) -> Result<Template, String> {
    let key = key(base, config);
    let root = root(store);
    if let Some(t) = lookup(&root, &key) {
        return Ok(t);
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&root)
        .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let lock = try_lock(&root, &key)
        .map_err(|e| format!("cannot lock the template: {e}"))?
        .ok_or("another sandbox is preparing the template")?;
    if let Some(t) = lookup(&root, &key) {
        return Ok(t);
    }
    let started = Instant::now();
    let built = build(&root, &key, base, config);
    // The lock file stays: removing it would let a start that opened it just before lock the
    // removed file while another locks a new one, and both build at once. `prune` removes it
    // with its template.
    drop(lock);
    let t = built.map_err(|e| format!("preparing the template failed: {e}"))?;
    prune(&root);
    tracing::info!(
        key,
        ms = started.elapsed().as_millis() as u64,
        bytes = t.meta.file_bytes,
        ram_bytes = t.meta.ram_bytes,
        "template prepared"
    );
    Ok(t)
}

/// The template `key`'s lock, taken without waiting: `None` while another start holds it.
fn try_lock(root: &Path, key: &str) -> std::io::Result<Option<std::fs::File>> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(root.join(format!("{key}.lock")))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(None);
    }
    Ok(Some(lock))
}

/// Removes the templates no sandbox can start from any more (their image is no longer stored;
/// QEMU, the kernel or the agent changed since; another version of matchlock made them) with
/// their lock files, and the build directories of starts that died while building (their lock
/// is free).
fn prune(root: &Path) {
    let Ok(dir) = std::fs::read_dir(root) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(key) = name.strip_prefix(".build-") {
            if let Ok(Some(_free)) = try_lock(root, key) {
                tracing::info!(key, "removing the build of a start that died");
                let _ = std::fs::remove_dir_all(e.path());
            }
            continue;
        }
        let Ok(meta) = std::fs::read(e.path().join("meta.json")) else {
            continue;
        };
        let Ok(meta) = serde_json::from_slice::<Meta>(&meta) else {
            continue;
        };
        let why = if meta.format != FORMAT {
            "made by another version of matchlock".to_string()
        } else if !meta.rootfs.as_os_str().is_empty() && !meta.rootfs.exists() {
            format!("its image {} was removed", meta.image)
        } else if let Some((changed, _)) = meta.inputs.iter().find(|(p, id)| identity(p) != *id) {
            format!("made with another build of {}", changed.display())
        } else {
            continue;
        };
        tracing::info!(key = %meta.key, "removing a template: {why}");
        let _ = std::fs::remove_dir_all(e.path());
        // No start asks for this key again (it hashes what changed), so its lock can go.
        let _ = std::fs::remove_file(root.join(format!("{name}.lock")));
    }
}

/// The template `key`, when it is there whole.
fn lookup(root: &Path, key: &str) -> Option<Template> {
    let dir = root.join(key);
    let meta: Meta = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).ok()?).ok()?;
    let state = std::fs::metadata(dir.join("state.zst")).ok()?;
    let ram = std::fs::metadata(dir.join("ram")).map(|m| m.len()).ok();
    if meta.format != FORMAT
        || meta.key != key
        || state.len() != meta.file_bytes
        || (meta.ram_file
            && (ram != Some(meta.memory_mb << 20)
                || ram_identity(&dir.join("ram")) != meta.ram_identity))
    {
        let _ = std::fs::remove_dir_all(&dir);
        return None;
    }
    Some(Template { dir, meta })
}

/// Boots the template's guest in a directory of its own, waits for its hello, saves it, and
/// moves the result into place. Nothing is left behind on error.
fn build(root: &Path, key: &str, base: &Base, config: &SandboxConfig) -> Result<Template, String> {
    let work = root.join(format!(".build-{key}"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .map_err(|e| format!("{}: {e}", work.display()))?;
    let result = build_in(&work, key, base, config);
    match result {
        Ok(meta) => {
            let _ = std::fs::remove_file(work.join("upper.ext4"));
            let dir = root.join(key);
            let _ = std::fs::remove_dir_all(&dir);
            if let Err(e) = std::fs::rename(&work, &dir) {
                let _ = std::fs::remove_dir_all(&work);
                return Err(format!("{}: {e}", dir.display()));
            }
            Ok(Template { dir, meta })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            Err(e)
        }
    }
}

fn build_in(work: &Path, key: &str, base: &Base, config: &SandboxConfig) -> Result<Meta, String> {
    let started = Instant::now();
    vm::make_upper(&work.join("upper.ext4"), config.disk_size_mb).map_err(|e| e.to_string())?;
    let agent_l = vm::listen(&work.join("agent.sock")).map_err(|e| e.to_string())?;
    let console_l = vm::listen(&work.join("console.sock")).map_err(|e| e.to_string())?;
    let net_l = match &config.network {
        Some(_) => Some(vm::listen(&work.join("net.sock")).map_err(|e| e.to_string())?),
        None => None,
    };
    let qmp_l = vm::listen(&work.join("qmp.sock")).map_err(|e| e.to_string())?;
    let ram = work.join("ram");
    let ram_file = match shares_ram(work) {
        true => Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&ram)
                .and_then(|f| f.set_len(config.memory_mb << 20).map(|()| f))
                .map_err(|e| format!("{}: {e}", ram.display()))?,
        ),
        false => None,
    };
    let mut spec = base.spec(config, work);
    spec.qmp_socket = Some(work.join("qmp.sock"));
    spec.ram_file = ram_file.as_ref().map(|_| matchlock_vmm::qemu::RamFile {
        path: ram.clone(),
        shared: true,
    });
    let qemu = vm::start_qemu(&spec, &work.join("qemu.log")).map_err(|e| e.to_string())?;
    // The console is read (and kept, bounded) so QEMU never blocks on it and a failure can show it.
    let console = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    {
        let console = console.clone();
        let l = console_l.try_clone().map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            if let Ok(mut c) = accept_within(&l, BOOT_TIMEOUT) {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut out = console.lock().unwrap_or_else(|p| p.into_inner());
                    if out.len() < 64 << 10 {
                        out.extend_from_slice(&buf[..n]);
                    }
                }
            }
        });
    }
    let tail = || {
        let c = console.lock().unwrap_or_else(|p| p.into_inner());
        let text = String::from_utf8_lossy(&c);
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    };
    let mut qmp = Qmp::accept(&qmp_l, Duration::from_secs(30))?;
    // The NIC's backend is connected and held; nothing is configured on it yet.
    let _net = match &net_l {
        Some(l) => Some(
            accept_within(l, Duration::from_secs(30))
                .map_err(|e| format!("QEMU did not connect the NIC: {e}"))?,
        ),
        None => None,
    };
    let mut agent = accept_within(&agent_l, Duration::from_secs(30))
        .map_err(|e| format!("QEMU did not connect the agent channel: {e}"))?;
    agent
        .set_read_timeout(Some(BOOT_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut hello = [0u8; 8];
    agent.read_exact(&mut hello).map_err(|e| {
        format!(
            "the guest agent did not say hello: {e}; console: {}",
            tail()
        )
    })?;
    if &hello != matchlock_proto::HELLO {
        return Err(format!(
            "the guest agent speaks another protocol version ({:?})",
            String::from_utf8_lossy(&hello)
        ));
    }
    let boot_ms = started.elapsed().as_millis() as u64;
    let saving = Instant::now();
    // (Nothing may be sent to the guest from here on: a device writing into stopped guest RAM
    // would put in `ram` what the saved device state does not know of.)
    let saved = matchlock_vmm::snapshot::save(
        &mut qmp,
        &work.join("migrate.sock"),
        &work.join("state.zst"),
        ram_file.is_some(),
    )?;
    let save_ms = saving.elapsed().as_millis() as u64;
    let _ = qmp.execute("quit", None);
    qemu.kill();
    drop(agent);
    // The guest's writes to its RAM are in the page cache, where the sandboxes will map them
    // from; on disk before the template counts as made.
    let mut ram_bytes = 0;
    if let Some(f) = &ram_file {
        f.sync_all()
            .map_err(|e| format!("writing {}: {e}", ram.display()))?;
        ram_bytes = f.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
    }
    // After the rename into place the path differs, so the identity is taken without it.
    let ram_identity = ram_file
        .as_ref()
        .map(|_| ram_identity(&ram))
        .unwrap_or_default();
    let meta = Meta {
        format: FORMAT,
        key: key.to_string(),
        image: config.image.clone(),
        rootfs: config.rootfs.clone(),
        inputs: [&base.qemu, &base.kernel, &base.initramfs]
            .into_iter()
            .map(|p| (p.clone(), identity(p)))
            .collect(),
        memory_mb: config.memory_mb,
        vcpus: config.vcpus(),
        disk_size_mb: config.disk_size_mb,
        network: config.network.is_some(),
        sha256: saved.sha256,
        stream_bytes: saved.stream_bytes,
        file_bytes: saved.file_bytes,
        ram_file: ram_file.is_some(),
        ram_bytes,
        ram_identity,
        boot_ms,
        save_ms,
        created_at: crate::config::now_secs(),
    };
    let json = serde_json::to_vec_pretty(&meta).map_err(|e| e.to_string())?;
    matchlock_vmm::write_atomic(&work.join("meta.json"), &json)
        .map_err(|e| format!("writing the template's meta.json: {e}"))?;
    for sock in ["agent.sock", "console.sock", "net.sock", "qmp.sock"] {
        let _ = std::fs::remove_file(work.join(sock));
    }
    Ok(meta)
}

/// Whether a template's guest memory can be a file in `dir`, shared by its sandboxes. Not on
/// tmpfs or ramfs: there a sandbox that touches a page the template never did allocates that
/// page in the file itself (the whole guest size over time, in memory), and on a full tmpfs the
/// allocation fails and QEMU dies of SIGBUS. Not on FUSE either, which may not map files shared.
/// (An overlayfs whose upper layer is tmpfs is not told apart; such a store should set
/// `MATCHLOCK_HOME` to a disk.)
pub fn shares_ram(dir: &Path) -> bool {
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    const FUSE_MAGIC: libc::c_long = 0x6573_5546;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a plain C struct, for which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes only into `st`; the path is a valid C string.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let kind = st.f_type as libc::c_long;
    ![TMPFS_MAGIC, RAMFS_MAGIC, FUSE_MAGIC].contains(&kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(dir: &Path) -> Base {
        for f in ["qemu", "vmlinux", "initramfs.cpio", "rootfs.ext4"] {
            std::fs::write(dir.join(f), f).unwrap();
        }
        Base {
            qemu: dir.join("qemu"),
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
            accel: matchlock_vmm::accel::Choice {
                accel: matchlock_vmm::accel::Accel::Tcg,
                reason: "test".into(),
            },
            cmdline: Vec::new(),
        }
    }

    fn config(dir: &Path) -> SandboxConfig {
        SandboxConfig {
            id: "vm-00000001".into(),
            image: "busybox".into(),
            rootfs: dir.join("rootfs.ext4"),
            hostname: "a".into(),
            cpus: 1.0,
            memory_mb: 512,
            disk_size_mb: 1024,
            network: Some(crate::config::NetworkConfig {
                mtu: 1500,
                dns_servers: Vec::new(),
                dns_mode: Default::default(),
                allow_private_hosts: Vec::new(),
                allow_private_ranges: false,
                intercept: None,
            }),
            ..Default::default()
        }
    }

    /// A template directory as `build` leaves it, made from `base`'s files as they are now.
    fn fake_template(root: &Path, key: &str, base: &Base, rootfs: &Path) {
        let dir = root.join(key);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state.zst"), "x").unwrap();
        std::fs::File::create(dir.join("ram"))
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        let meta = Meta {
            format: FORMAT,
            key: key.into(),
            image: "busybox".into(),
            rootfs: rootfs.into(),
            inputs: [&base.qemu, &base.kernel, &base.initramfs]
                .into_iter()
                .map(|p| (p.clone(), identity(p)))
                .collect(),
            memory_mb: 512,
            vcpus: 1,
            disk_size_mb: 1024,
            network: true,
            sha256: String::new(),
            stream_bytes: 1,
            file_bytes: 1,
            ram_file: true,
            ram_bytes: 0,
            ram_identity: ram_identity(&dir.join("ram")),
            boot_ms: 0,
            save_ms: 0,
            created_at: 0,
        };
        std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
    }

    #[test]
    fn templates_nothing_can_use_any_more_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path());
        let root = dir.path().join("templates");
        let other_rootfs = dir.path().join("other.ext4");
        std::fs::write(&other_rootfs, "other").unwrap();
        fake_template(&root, "current", &b, &dir.path().join("rootfs.ext4"));
        fake_template(&root, "image-removed", &b, &other_rootfs);
        std::fs::remove_file(&other_rootfs).unwrap();
        prune(&root);
        assert!(root.join("current").is_dir());
        assert!(!root.join("image-removed").exists());
        // A rebuilt agent (the initramfs another file) retires the template made with the old one.
        std::fs::remove_file(&b.initramfs).unwrap();
        std::fs::write(&b.initramfs, "another agent").unwrap();
        prune(&root);
        assert!(!root.join("current").exists());
    }

    #[test]
    fn other_versions_templates_and_dead_builds_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path());
        let root = dir.path().join("templates");
        let rootfs = dir.path().join("rootfs.ext4");
        fake_template(&root, "current", &b, &rootfs);
        fake_template(&root, "older", &b, &rootfs);
        let meta = root.join("older/meta.json");
        let mut m: Meta = serde_json::from_slice(&std::fs::read(&meta).unwrap()).unwrap();
        m.format = FORMAT - 1;
        std::fs::write(&meta, serde_json::to_vec(&m).unwrap()).unwrap();
        std::fs::write(root.join("older.lock"), "").unwrap();
        // A build whose start died (its lock free), and one in progress (its lock held).
        std::fs::create_dir_all(root.join(".build-dead")).unwrap();
        std::fs::create_dir_all(root.join(".build-busy")).unwrap();
        let _held = try_lock(&root, "busy").unwrap().unwrap();
        prune(&root);
        assert!(root.join("current").is_dir());
        assert!(!root.join("older").exists());
        assert!(!root.join("older.lock").exists());
        assert!(!root.join(".build-dead").exists());
        assert!(root.join(".build-busy").is_dir());
    }

    #[test]
    fn a_memory_file_changed_in_place_is_no_template() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path());
        let root = dir.path().join("templates");
        fake_template(&root, "k", &b, &dir.path().join("rootfs.ext4"));
        assert!(lookup(&root, "k").is_some());
        // Same length, one page written: the sandboxes would map another guest's memory.
        std::thread::sleep(std::time::Duration::from_millis(10));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(root.join("k/ram"))
            .unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"changed", 4096).unwrap();
        drop(f);
        assert!(lookup(&root, "k").is_none());
        assert!(!root.join("k").exists(), "the changed template is removed");
    }

    #[test]
    fn the_key_follows_the_vm_and_its_files_not_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path());
        let c = config(dir.path());
        let k = key(&b, &c);
        // What only Setup and the execs carry shares the template.
        let mut same = c.clone();
        same.id = "vm-00000002".into();
        same.hostname = "b".into();
        same.env = vec![("A".into(), "1".into())];
        same.privileged = true;
        same.add_hosts = vec![("10.0.0.1".into(), "x".into())];
        assert_eq!(key(&b, &same), k);
        // What the VM is made of does not.
        let mut other = c.clone();
        other.memory_mb = 1024;
        assert_ne!(key(&b, &other), k);
        let mut other = c.clone();
        other.cpus = 2.0;
        assert_ne!(key(&b, &other), k);
        let mut other = c.clone();
        other.disk_size_mb = 2048;
        assert_ne!(
            key(&b, &other),
            k,
            "the guest learnt its upper disk's size at boot"
        );
        let mut other = c.clone();
        other.network = None;
        assert_ne!(key(&b, &other), k);
        // A rebuilt kernel or a re-imported image is another template.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(dir.path().join("vmlinux"), "rebuilt kernel").unwrap();
        assert_ne!(key(&b, &c), k);
        let k2 = key(&b, &c);
        std::fs::remove_file(dir.path().join("rootfs.ext4")).unwrap();
        std::fs::write(dir.path().join("rootfs.ext4"), "rootfs.ext4").unwrap();
        assert_ne!(key(&b, &c), k2);
    }

    #[test]
    fn guest_memory_is_not_shared_from_tmpfs() {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        if mounts.lines().any(|l| l.starts_with("tmpfs /dev/shm ")) {
            assert!(!shares_ram(Path::new("/dev/shm")));
        }
        assert!(!shares_ram(Path::new("/nonexistent/dir")));
        let disk = mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/") && !l.starts_with("tmpfs "));
        if disk {
            assert!(shares_ram(Path::new("/")));
        }
    }

    #[test]
    fn only_plain_sandboxes_start_from_a_template() {
        std::env::set_var("MATCHLOCK_TEMPLATES", "1");
        let dir = tempfile::tempdir().unwrap();
        let c = config(dir.path());
        let mut b = base(dir.path());
        b.cmdline = vec!["tsc=reliable".into()];
        assert_eq!(unsuitable(&b, &c), None);
        let mut no = c.clone();
        no.no_snapshot = true;
        assert_eq!(unsuitable(&b, &no).as_deref(), Some("--no-snapshot"));
        b.cmdline.clear();
        assert!(unsuitable(&b, &c).unwrap().contains("clock"));
        b.cmdline = vec!["tsc=reliable".into()];
        let unsuitable = |c: &SandboxConfig| unsuitable(&b, c);
        let mut mounts = c.clone();
        mounts.vfs = vec![crate::config::VfsMount {
            host_path: "/tmp".into(),
            guest_path: "/workspace".into(),
            mode: crate::config::VfsMode::Overlay,
            owner_uid: None,
            owner_gid: None,
        }];
        assert!(unsuitable(&mounts).unwrap().contains("workspace"));
        let mut disks = c;
        disks.disks = vec![crate::config::DiskMount {
            host_path: "/tmp/d.ext4".into(),
            guest_path: "/data".into(),
            read_only: false,
            uid: None,
            gid: None,
        }];
        assert!(unsuitable(&disks).unwrap().contains("disks"));
    }
}
