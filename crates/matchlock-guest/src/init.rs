//! Everything only PID 1 does: the early mounts, the host-driven Setup (image disks, overlay, switch
//! root, clock, hostname, cgroup), stopping every process, and powering off.

use crate::log;
use matchlock_proto::Setup;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::fs;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the image's read-only ext4 is mounted (inside the initramfs).
const LOWER: &str = "/run/ml/lower";
/// Where the writable disk (or tmpfs) holding `upper/` and `work/` is mounted.
const UPPERFS: &str = "/run/ml/upperfs";
/// Where the overlay is assembled before it becomes `/`.
const NEWROOT: &str = "/newroot";
/// The workload's cgroup (with `cpu_max`).
const SANDBOX_CGROUP: &str = "/sys/fs/cgroup/sandbox";
/// Disks appear during boot; give a late one this long.
const DISK_WAIT: Duration = Duration::from_secs(5);

fn mkdir_p(path: impl AsRef<Path>) -> Result<(), String> {
    let path = path.as_ref();
    fs::create_dir_all(path).map_err(|e| format!("mkdir {}: {e}", path.display()))
}

fn do_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| format!("mount {fstype} {source} on {target}: {e}"))
}

/// Early boot, before the runtime starts: `/dev`, console stdio, `/proc`, `/sys`. Handles the
/// accelerator probe (`matchlock.probe=1`), which never returns.
pub fn early() -> Result<(), String> {
    mkdir_p("/dev")?;
    match mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ) {
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => return Err(format!("mount devtmpfs on /dev: {e}")),
    }
    console_stdio();
    mkdir_p("/proc")?;
    do_mount("proc", "/proc", "proc", MsFlags::empty(), None)?;
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if cmdline.split_whitespace().any(|w| w == "matchlock.probe=1") {
        if let Ok(mut console) = fs::OpenOptions::new().write(true).open("/dev/console") {
            let _ = console.write_all(b"MATCHLOCK-PROBE-OK\n");
        }
        reboot_now();
    }
    mkdir_p("/sys")?;
    do_mount("sysfs", "/sys", "sysfs", MsFlags::empty(), None)?;
    // Port forwards connect to 127.0.0.1 and workloads expect a working localhost.
    if let Err(e) = loopback_up() {
        log(format_args!("cannot bring up lo: {e}"));
    }
    Ok(())
}

/// Sets `IFF_UP` on `lo`, which the kernel creates down.
fn loopback_up() -> io::Result<()> {
    // SAFETY: a plain socket used only for the interface ioctls below, closed on every path.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    let _fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in b"lo".iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The kernel gives init the console as stdio only if the initramfs has `/dev/console`. Without it,
/// fds 0-2 are closed and the next files opened would silently become stdio, so fill the gaps.
fn console_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        // SAFETY: opening a constant path; dup2 onto a free slot, then closing the original.
        unsafe {
            let c = libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
            if c < 0 {
                return;
            }
            if c != fd {
                libc::dup2(c, fd);
                libc::close(c);
            }
        }
    }
}

/// Blocks until the kernel's random number generator is initialised, saying so on the console.
///
/// The multiplexer draws random ids (getrandom) when it starts, which blocks until the CRNG is
/// seeded. Without an entropy source (virtio-rng) that can take minutes under TCG and would look
/// like a hung agent, so the wait is announced. Crediting made-up entropy instead would make the
/// workload's keys predictable.
pub fn wait_for_entropy() {
    let mut byte = 0u8;
    // SAFETY: getrandom writes at most one byte into `byte`.
    let ready =
        unsafe { libc::getrandom((&mut byte as *mut u8).cast(), 1, libc::GRND_NONBLOCK) == 1 };
    if ready {
        return;
    }
    log(format_args!(
        "waiting for the kernel's random number generator (attach a virtio-rng device)"
    ));
    let start = Instant::now();
    // SAFETY: as above; blocking until the CRNG is ready.
    while unsafe { libc::getrandom((&mut byte as *mut u8).cast(), 1, 0) } != 1 {}
    log(format_args!(
        "random number generator ready after {:?}",
        start.elapsed()
    ));
}

/// Finds `/dev/vdX` whose virtio serial is `serial`, waiting up to [`DISK_WAIT`].
fn find_disk(serial: &str, what: &str) -> Result<PathBuf, String> {
    if serial.is_empty() {
        return Err(format!("no serial given for the {what} disk"));
    }
    let start = Instant::now();
    loop {
        if let Ok(dir) = fs::read_dir("/sys/block") {
            for entry in dir.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if !name.starts_with("vd") {
                    continue;
                }
                let found = fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
                if found.trim_end_matches(['\n', '\0', ' ']) == serial {
                    let dev = PathBuf::from("/dev").join(name);
                    forget_cached_blocks(&dev)?;
                    return Ok(dev);
                }
            }
        }
        if start.elapsed() > DISK_WAIT {
            return Err(format!(
                "no disk with serial {serial}; is the {what} disk attached?"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Drops whatever the kernel cached of a disk before it is mounted. A guest restored from a
/// snapshot read its disks' first blocks (the partition scan) when the template booted; the
/// sandbox's own disk at that slot (a fresh upper disk, another volume) differs, and a mount
/// through the stale cache would read the template's superblock.
fn forget_cached_blocks(dev: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    /// `BLKFLSBUF` from `<linux/fs.h>`: `_IO(0x12, 97)`.
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    let f = fs::File::open(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    // SAFETY: an ioctl without an argument on a descriptor we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF as _, 0) } != 0 {
        return Err(format!(
            "flushing {}: {}",
            dev.display(),
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Mixes the host's random bytes into the kernel's input pool (credited: they come from the
/// host's own CSPRNG) and reseeds the CRNG from it, so each sandbox's random numbers are its own
/// even when many were restored from one snapshot.
fn reseed(entropy: &[u8]) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    /// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`; its argument is `struct rand_pool_info`.
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    /// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    if entropy.is_empty() {
        return Ok(());
    }
    let len = entropy.len().min(4096);
    // rand_pool_info: entropy_count (bits), buf_size (bytes), then the bytes as u32 words.
    let mut info = vec![0u32; 2 + len.div_ceil(4)];
    info[0] = (len * 8) as u32;
    info[1] = len as u32;
    for (i, chunk) in entropy[..len].chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(w);
    }
    let f = fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    // SAFETY: `info` is a valid rand_pool_info of `len` bytes, alive across the call.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, info.as_ptr()) } != 0 {
        return Err(format!(
            "adding the host's entropy: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: an ioctl without an argument on a descriptor we own.
    if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _, 0) } != 0 {
        return Err(format!(
            "reseeding the kernel's RNG: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("non-UTF-8 device path {}", p.display()))
}

/// Checks a name that goes into `/etc/hosts`: no whitespace, comment or control characters that
/// would change the file's structure.
fn check_hosts_word(word: &str, what: &str) -> Result<(), String> {
    if word.is_empty()
        || word.len() > 253
        || word
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '#')
    {
        return Err(format!("invalid {what} {word:?}"));
    }
    Ok(())
}

/// Serves `Setup`: image and upper disks, overlay, switch root, clock, hostname, hosts and the
/// workload cgroup. Returns the workload cgroup's `cgroup.procs` when `cpu_max` asked for one.
pub fn setup(s: &Setup) -> Result<Option<OwnedFd>, String> {
    if !s.hostname.is_empty() {
        check_hosts_word(&s.hostname, "hostname")?;
        if s.hostname.len() > 64 {
            return Err(format!("hostname {:?} is longer than 64 bytes", s.hostname));
        }
    }
    for (addr, name) in &s.hosts {
        check_hosts_word(addr, "hosts address")?;
        check_hosts_word(name, "hosts name")?;
    }
    // Fresh randomness before anything else draws on it.
    reseed(&s.entropy)?;
    // The clock next: files the Setup creates get sensible times.
    set_clock(s.time_unix_ms)?;
    mount_root(s)?;
    mount_disks(s)?;
    switch_root()?;

    if !s.hostname.is_empty() {
        nix::unistd::sethostname(&s.hostname).map_err(|e| format!("sethostname: {e}"))?;
    }
    write_etc(s)?;
    if let Some(net) = &s.net {
        crate::net::configure(net)?;
    }
    match s.cpu_max {
        Some((quota, period)) => cgroup(quota, period).map(Some),
        None => Ok(None),
    }
}

pub(crate) fn set_clock(ms: u64) -> Result<(), String> {
    use nix::sys::time::TimeSpec;
    if ms == 0 {
        // "Unknown": the kernel refuses times before boot anyway.
        return Ok(());
    }
    use nix::time::{clock_settime, ClockId};
    let secs = i64::try_from(ms / 1000).map_err(|_| format!("bad time {ms}"))?;
    let nanos = ((ms % 1000) * 1_000_000) as i64;
    clock_settime(ClockId::CLOCK_REALTIME, TimeSpec::new(secs, nanos))
        .map_err(|e| format!("setting the clock: {e}"))
}

/// Mounts the image (read-only), the upper layer and the overlay at [`NEWROOT`], then the API
/// filesystems inside it.
fn mount_root(s: &Setup) -> Result<(), String> {
    let root_dev = find_disk(&s.root_serial, "image")?;
    mkdir_p(LOWER)?;
    mkdir_p(UPPERFS)?;
    mkdir_p(NEWROOT)?;
    let ro = MsFlags::MS_RDONLY;
    if do_mount(path_str(&root_dev)?, LOWER, "ext4", ro, None).is_err() {
        // A journal needing replay cannot be replayed on a read-only disk; skip it.
        do_mount(path_str(&root_dev)?, LOWER, "ext4", ro, Some("noload"))
            .map_err(|e| format!("{e} (image disk)"))?;
    }
    match &s.upper_serial {
        Some(serial) => {
            let dev = find_disk(serial, "upper")?;
            do_mount(path_str(&dev)?, UPPERFS, "ext4", MsFlags::MS_NOATIME, None)
                .map_err(|e| format!("{e} (upper disk)"))?;
        }
        None => do_mount(
            "tmpfs",
            UPPERFS,
            "tmpfs",
            MsFlags::empty(),
            Some("mode=0755"),
        )?,
    }
    let upper = format!("{UPPERFS}/upper");
    let work = format!("{UPPERFS}/work");
    mkdir_p(&upper)?;
    mkdir_p(&work)?;
    // Held for `ExportUpper`: after the switch to the new root no path reaches it.
    let fd = nix::fcntl::open(
        upper.as_str(),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("opening {upper}: {e}"))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let _ =
        crate::layer::UPPER.set(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
    do_mount(
        "overlay",
        NEWROOT,
        "overlay",
        MsFlags::empty(),
        Some(&format!("lowerdir={LOWER},upperdir={upper},workdir={work}")),
    )?;

    let nr = |p: &str| format!("{NEWROOT}{p}");
    let nosuid_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    let nosuid_nodev_noexec = nosuid_nodev | MsFlags::MS_NOEXEC;
    for dir in ["/proc", "/sys", "/dev", "/run", "/tmp"] {
        mkdir_p(nr(dir))?;
    }
    do_mount("proc", &nr("/proc"), "proc", nosuid_nodev_noexec, None)?;
    do_mount("sysfs", &nr("/sys"), "sysfs", nosuid_nodev_noexec, None)?;
    if s.confined {
        // Only the harmless devices, as container runtimes give: the workload never sees the
        // disks (writing the mounted upper disk under ext4 corrupts the guest kernel), the
        // serial console, or the virtio ports.
        do_mount(
            "tmpfs",
            &nr("/dev"),
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("mode=0755"),
        )?;
        for (name, minor_major) in [
            ("null", (1, 3)),
            ("zero", (1, 5)),
            ("full", (1, 7)),
            ("random", (1, 8)),
            ("urandom", (1, 9)),
            ("tty", (5, 0)),
        ] {
            let path = nr(&format!("/dev/{name}"));
            nix::sys::stat::mknod(
                path.as_str(),
                nix::sys::stat::SFlag::S_IFCHR,
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::makedev(minor_major.0, minor_major.1),
            )
            .map_err(|e| format!("creating /dev/{name}: {e}"))?;
            // mknod applies the umask; the devices must be usable by every user.
            nix::sys::stat::fchmodat(
                None,
                path.as_str(),
                nix::sys::stat::Mode::from_bits_truncate(0o666),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )
            .map_err(|e| format!("chmod /dev/{name}: {e}"))?;
        }
    } else {
        do_mount(
            "devtmpfs",
            &nr("/dev"),
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        )?;
    }
    mkdir_p(nr("/dev/pts"))?;
    mkdir_p(nr("/dev/shm"))?;
    do_mount(
        "devpts",
        &nr("/dev/pts"),
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    // /dev/ptmx must allocate from this devpts instance, whatever devtmpfs put there.
    let ptmx = nr("/dev/ptmx");
    if !Path::new(&ptmx).exists() {
        let _ = fs::File::create(&ptmx);
    }
    if mount(
        Some(nr("/dev/pts/ptmx").as_str()),
        ptmx.as_str(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .is_err()
    {
        let _ = fs::remove_file(&ptmx);
        std::os::unix::fs::symlink("pts/ptmx", &ptmx)
            .map_err(|e| format!("linking /dev/ptmx: {e}"))?;
    }
    do_mount(
        "shm",
        &nr("/dev/shm"),
        "tmpfs",
        nosuid_nodev,
        Some("mode=1777"),
    )?;
    // devtmpfs has no /dev/fd and friends; shells need them (process substitution, `cat /dev/stdin`).
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, nr(link));
    }
    do_mount(
        "tmpfs",
        &nr("/run"),
        "tmpfs",
        nosuid_nodev,
        Some("mode=0755"),
    )?;
    do_mount(
        "tmpfs",
        &nr("/tmp"),
        "tmpfs",
        nosuid_nodev,
        Some("mode=1777"),
    )?;
    let cgroup_dir = nr("/sys/fs/cgroup");
    if let Err(e) = do_mount("cgroup2", &cgroup_dir, "cgroup2", nosuid_nodev_noexec, None) {
        if s.cpu_max.is_some() {
            return Err(format!("{e} (needed for the CPU limit)"));
        }
        log(format_args!("{e}; continuing without cgroups"));
    }
    if s.confined {
        // Kernel knobs stay out of reach: no driver unbinding, sysctls or sysrq. The cgroup
        // mount under /sys is separate and stays writable for the agent.
        for path in ["/sys", "/proc/sys", "/proc/sysrq-trigger"] {
            let p = nr(path);
            // sysrq-trigger exists only in kernels built with MAGIC_SYSRQ (ours is not).
            if !Path::new(&p).exists() {
                continue;
            }
            if path != "/sys" {
                mount(
                    Some(p.as_str()),
                    p.as_str(),
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| format!("binding {path}: {e}"))?;
            }
            mount(
                None::<&str>,
                p.as_str(),
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | nosuid_nodev_noexec,
                None::<&str>,
            )
            .map_err(|e| format!("making {path} read-only: {e}"))?;
        }
    }
    Ok(())
}

/// Mounts the extra disks inside [`NEWROOT`]. Runs before the switch, while the disks are still
/// visible in the initramfs's `/dev` and before any workload runs, so the image's own symlinks are
/// the only thing to guard against: a mount point whose path crosses a symlink is refused rather
/// than resolved against the initramfs root.
fn mount_disks(s: &Setup) -> Result<(), String> {
    for d in &s.disks {
        let rel = d
            .path
            .strip_prefix('/')
            .filter(|r| !r.is_empty())
            .ok_or_else(|| format!("disk mount point {:?} must be absolute", d.path))?;
        let mut at = PathBuf::from(NEWROOT);
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            if part == "." || part == ".." {
                return Err(format!("disk mount point {:?} contains {part}", d.path));
            }
            at.push(part);
            match fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "disk mount point {}: {} is a symlink in the image",
                        d.path,
                        at.strip_prefix(NEWROOT).unwrap_or(&at).display()
                    ))
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(format!(
                        "disk mount point {}: {} is not a directory in the image",
                        d.path,
                        at.strip_prefix(NEWROOT).unwrap_or(&at).display()
                    ))
                }
                Err(_) => fs::create_dir(&at)
                    .map_err(|e| format!("creating mount point {}: {e}", d.path))?,
            }
        }
        let dev = find_disk(&d.serial, &format!("{} disk", d.path))?;
        let mut flags = MsFlags::MS_NOATIME | MsFlags::MS_NODEV;
        if d.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        do_mount(path_str(&dev)?, path_str(&at)?, "ext4", flags, None)
            .map_err(|e| format!("{e} (disk for {})", d.path))?;
        // `uid=`/`gid=`: the disk's root belongs to the workload's user (a database's data
        // directory); the change is kept on the disk.
        if d.uid.is_some() || d.gid.is_some() {
            std::os::unix::fs::chown(&at, d.uid, d.gid)
                .map_err(|e| format!("giving the disk for {} to its owner: {e}", d.path))?;
        }
    }
    Ok(())
}

/// Makes [`NEWROOT`] the root, the way `switch_root` does: `pivot_root` refuses to move an
/// initramfs, so the new root is moved over `/` and entered with `chroot`.
fn switch_root() -> Result<(), String> {
    // The old root is unreachable afterwards; free the agent binary's copy in it.
    let _ = fs::remove_file("/init");
    nix::unistd::chdir(NEWROOT).map_err(|e| format!("chdir {NEWROOT}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("moving {NEWROOT} to /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("chroot: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

fn write_etc(s: &Setup) -> Result<(), String> {
    mkdir_p("/etc")?;
    if !s.hostname.is_empty() {
        fs::write("/etc/hostname", format!("{}\n", s.hostname))
            .map_err(|e| format!("writing /etc/hostname: {e}"))?;
    }
    // An image may ship /etc/hosts as a symlink (e.g. to /run); replace it rather than follow it.
    let _ = fs::remove_file("/etc/hosts");
    fs::write("/etc/hosts", etc_hosts(&s.hostname, &s.hosts))
        .map_err(|e| format!("writing /etc/hosts: {e}"))
}

/// `/etc/hosts` exactly as Matchlock writes it (scripts grep it): the hostname on the loopback
/// line, then the extra entries in order, then the IPv6 names.
fn etc_hosts(hostname: &str, extra: &[(String, String)]) -> String {
    let mut hosts = String::from("127.0.0.1 localhost localhost.localdomain");
    if !hostname.is_empty() {
        hosts.push(' ');
        hosts.push_str(hostname);
    }
    hosts.push('\n');
    for (addr, name) in extra {
        hosts.push_str(&format!("{addr} {name}\n"));
    }
    hosts.push_str(
        "::1 localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n",
    );
    hosts
}

/// Creates the workload cgroup with `cpu.max` and returns its `cgroup.procs`, opened now so every
/// exec'd child can join it with one `write` between fork and exec.
fn cgroup(quota: u64, period: u64) -> Result<OwnedFd, String> {
    let controllers = fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").map_err(|e| {
        format!("reading /sys/fs/cgroup/cgroup.controllers: {e} (is cgroup2 available?)")
    })?;
    let available: Vec<&str> = controllers.split_whitespace().collect();
    if !available.contains(&"cpu") {
        return Err("a CPU limit was requested but the kernel has no cpu cgroup controller".into());
    }
    let enable: Vec<String> = ["cpu", "pids", "memory"]
        .iter()
        .filter(|c| available.contains(c))
        .map(|c| format!("+{c}"))
        .collect();
    fs::write("/sys/fs/cgroup/cgroup.subtree_control", enable.join(" "))
        .map_err(|e| format!("enabling cgroup controllers: {e}"))?;
    match fs::create_dir(SANDBOX_CGROUP) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {SANDBOX_CGROUP}: {e}")),
    }
    fs::write(
        format!("{SANDBOX_CGROUP}/cpu.max"),
        format!("{quota} {period}"),
    )
    .map_err(|e| format!("setting cpu.max to \"{quota} {period}\": {e}"))?;
    let procs = fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("{SANDBOX_CGROUP}/cgroup.procs"))
        .map_err(|e| format!("opening {SANDBOX_CGROUP}/cgroup.procs: {e}"))?;
    Ok(procs.into())
}

/// Whether any process other than the agent and kernel threads is alive (zombies are about to be
/// reaped and do not count).
fn other_processes_alive() -> bool {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return false;
    };
    dir.flatten().any(|entry| {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            return false;
        };
        if pid == me || pid == 2 {
            return false;
        }
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // "pid (comm) state ppid ...": comm may contain anything, so parse after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().unwrap_or("");
        // Kernel threads are children of kthreadd (pid 2).
        state != "Z" && state != "X" && ppid != "2"
    })
}

/// SIGTERM to every process, SIGKILL to what is left after `grace`. Blocking.
pub fn stop_all_processes(grace: Duration) {
    // SAFETY: plain syscalls; kill(-1) spares PID 1 (the agent) itself.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && other_processes_alive() {
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline && other_processes_alive() {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Syncs, unmounts what can be unmounted, and powers off (the VM runs with `-no-reboot`, so a
/// reboot ends QEMU).
pub fn power_off() -> ! {
    nix::unistd::sync();
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    // Deepest (latest) mounts first; escaped paths (spaces) are skipped, this is best-effort.
    for target in mounts
        .lines()
        .rev()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|t| *t != "/" && !t.contains('\\'))
    {
        let _ = umount2(target, MntFlags::empty());
    }
    let _ = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    );
    reboot_now()
}

/// Syncs and reboots; never returns (PID 1 must not exit: the kernel would panic).
pub fn reboot_now() -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    log(format_args!("reboot failed: {e}"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Reports a fatal error on the console and powers off.
pub fn fatal(msg: &str) -> ! {
    log(format_args!("fatal: {msg}"));
    reboot_now()
}

#[cfg(test)]
mod tests {
    #[test]
    fn etc_hosts_matches_matchlock() {
        let extra = vec![
            ("10.0.0.10".to_string(), "api.internal".to_string()),
            ("2001:db8::10".to_string(), "db.internal".to_string()),
        ];
        assert_eq!(
            super::etc_hosts("vm-1a2b3c4d", &extra),
            "127.0.0.1 localhost localhost.localdomain vm-1a2b3c4d\n\
             10.0.0.10 api.internal\n\
             2001:db8::10 db.internal\n\
             ::1 localhost ip6-localhost ip6-loopback\n\
             ff02::1 ip6-allnodes\n\
             ff02::2 ip6-allrouters\n"
        );
    }
}
