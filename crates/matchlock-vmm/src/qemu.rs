//! The QEMU `microvm` command line for one sandbox.
//!
//! Hardening: `-nodefaults -no-user-config` (no implicit devices or config files), QEMU's own seccomp
//! sandbox (`-sandbox on` denying obsolete syscalls, privilege changes, spawning and resource
//! control), no network backend unless asked, no monitor, and only Unix sockets inside the sandbox's
//! 0700 directory. The caller arranges for QEMU to die with its supervisor (`PR_SET_PDEATHSIG`).

use crate::accel::Accel;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

/// A block device given to the guest.
#[derive(Debug, Clone)]
pub struct Disk {
    /// Raw image file on the host.
    pub path: PathBuf,
    /// Virtio serial the guest finds it by (`/sys/block/vd*/serial`), at most 20 bytes.
    pub serial: String,
    /// Attach read-only.
    pub read_only: bool,
}

/// Everything needed to start one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The guest kernel (ELF vmlinux, booted via PVH).
    pub kernel: PathBuf,
    /// The initramfs holding the agent.
    pub initramfs: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mb: u64,
    /// Block devices, in order.
    pub disks: Vec<Disk>,
    /// Unix socket QEMU connects to for the agent channel (the supervisor listens there).
    pub agent_socket: PathBuf,
    /// Vhost-user virtio-fs devices (the supervisor serves all workspace mounts through one).
    /// Any of them puts guest RAM in a shared memfd, which vhost-user needs.
    pub fs_devices: Vec<FsDevice>,
    /// Unix socket QEMU connects its serial console to (the supervisor copies it into the log).
    pub console_socket: PathBuf,
    /// Extra kernel command line words.
    pub extra_cmdline: Vec<String>,
    /// The guest NIC, when the sandbox has a network.
    pub net: Option<NetDev>,
    /// Unix socket QEMU connects its machine protocol monitor to (QMP), for snapshots; `None`
    /// leaves QEMU without a monitor.
    pub qmp_socket: Option<PathBuf>,
    /// Start from a snapshot instead of booting the kernel: QEMU waits, paused, for
    /// [`crate::snapshot::restore`] to set the stream's capabilities and start it
    /// (`-incoming defer`).
    pub incoming: bool,
    /// Guest RAM in a file rather than anonymous memory (ignored when `fs_devices` puts it in a
    /// memfd): how a template's memory is shared by the sandboxes started from it.
    pub ram_file: Option<RamFile>,
}

/// Guest RAM mapped from a file.
///
/// Migration streams leave out RAM that is shared with a file (`x-ignore-shared`, on for every
/// save and restore, [`crate::snapshot`]): a template's guest writes its memory through to its file and saves only its device
/// state; a sandbox started from it maps the same file privately, so the pages it only reads
/// stay the host's page cache, one copy for every sandbox of that template, and what it writes
/// becomes its own (copy on write). The file never changes after the template is made.
#[derive(Debug, Clone)]
pub struct RamFile {
    /// The file, `memory_mb` MiB long.
    pub path: PathBuf,
    /// `true`: the guest writes into the file (the template's own guest); `false`: its writes
    /// are private to it (a sandbox started from the template).
    pub shared: bool,
}

/// A virtio-fs device whose requests go to a vhost-user backend on a Unix socket.
#[derive(Debug, Clone)]
pub struct FsDevice {
    /// The socket QEMU connects to (the backend listens there before QEMU starts).
    pub socket: PathBuf,
    /// The tag the guest mounts it by (`mount -t virtiofs TAG DIR`), at most 36 bytes.
    pub tag: String,
    /// Descriptors per virtqueue; the guest's largest request is about this many pages.
    pub queue_size: u16,
}

/// A virtio-net NIC whose frames go to a Unix socket (`-netdev stream`, QEMU >= 7.2), where the
/// supervisor's userspace stack listens. There is no host-side interface at all.
#[derive(Debug, Clone)]
pub struct NetDev {
    /// The socket QEMU connects to.
    pub socket: PathBuf,
    /// The guest NIC's MAC address.
    pub mac: [u8; 6],
}

/// Kernel command line used for every boot. `reboot=t` + QEMU's `-no-reboot` make a guest reboot
/// end QEMU (there is no ACPI to power off); `panic=-1` does the same on a kernel panic.
pub const BASE_CMDLINE: &str = "console=ttyS0 quiet reboot=t panic=-1 8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// Finds QEMU: `MATCHLOCK_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn locate_qemu() -> Result<PathBuf, crate::VmmError> {
    if let Some(q) = std::env::var_os("MATCHLOCK_QEMU").filter(|q| !q.is_empty()) {
        let q = PathBuf::from(q);
        return if q.is_file() {
            Ok(q)
        } else {
            Err(crate::VmmError::QemuMissing(q.display().to_string()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    for dir in std::env::split_paths(&path) {
        let c = dir.join("qemu-system-x86_64");
        if c.is_file() {
            return Ok(c);
        }
    }
    Err(crate::VmmError::QemuMissing("PATH".into()))
}

/// Makes the command's process get SIGKILL when the thread that spawns it dies, and close every
/// inherited descriptor above stderr, so nothing the caller holds (a ready pipe, an SDK's pipes)
/// leaks into QEMU. The caller must spawn from a thread that lives as long as QEMU should.
pub fn die_with_parent(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        c.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then we were re-parented.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            // CLOSE_RANGE_CLOEXEC rather than closing: std's own exec-error pipe must survive until exec.
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

/// The machine part of every QEMU command line (the sandbox's and the accelerator probe's):
/// machine type, accelerator, size, hardening, kernel, initramfs and kernel command line.
pub fn machine_command(
    qemu: &std::path::Path,
    accel: Accel,
    vcpus: u32,
    memory_mb: u64,
    kernel: &std::path::Path,
    initramfs: &std::path::Path,
    extra_cmdline: &[String],
) -> Command {
    let mut c = Command::new(qemu);
    c.args([
        "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off,auto-kernel-cmdline=on",
    ]);
    match accel {
        Accel::Kvm => c.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"]),
        // Without ERMS/FSRM the guest's kernel and libc copy memory with `rep movsq` or vector
        // loops instead of `rep movsb`, which TCG emulates one byte per step: every copy in the
        // guest (page cache, pipes, virtio buffers) gets 1.3-2x faster (docs/benchmarks.md).
        Accel::Tcg => c.args(["-accel", "tcg", "-cpu", "max,-erms,-fsrm"]),
    };
    c.arg("-m").arg(format!("{memory_mb}M"));
    c.arg("-smp").arg(vcpus.max(1).to_string());
    c.args([
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        // Modern (virtio 1.0) devices rather than microvm's legacy default: vhost-user devices
        // require them, and one device model for every sandbox keeps the guest's drivers on
        // one path.
        "-global",
        "virtio-mmio.force-legacy=false",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    c.arg("-kernel").arg(kernel);
    c.arg("-initrd").arg(initramfs);
    let mut cmdline = BASE_CMDLINE.to_string();
    for w in extra_cmdline {
        cmdline.push(' ');
        cmdline.push_str(w);
    }
    c.arg("-append").arg(cmdline);
    c
}

impl VmSpec {
    /// The QEMU command (not yet spawned).
    pub fn command(&self) -> Command {
        let mut c = machine_command(
            &self.qemu,
            self.accel,
            self.vcpus,
            self.memory_mb,
            &self.kernel,
            &self.initramfs,
            &self.extra_cmdline,
        );
        let mut console = OsString::from("socket,id=console,path=");
        console.push(escape_commas(&self.console_socket.to_string_lossy()));
        c.arg("-chardev").arg(console);
        c.args(["-serial", "chardev:console"]);
        for (i, d) in self.disks.iter().enumerate() {
            let mut drive =
                OsString::from(format!("id=d{i},format=raw,if=none,cache=unsafe,file="));
            // QEMU option values escape ',' by doubling it.
            drive.push(escape_commas(&d.path.to_string_lossy()));
            if d.read_only {
                drive.push(",readonly=on");
            }
            c.arg("-drive").arg(drive);
            c.arg("-device")
                .arg(format!("virtio-blk-device,drive=d{i},serial={}", d.serial));
        }
        // Entropy: without it the guest's getrandom() blocks until the pool is seeded, which under
        // TCG can take minutes (the agent's multiplexer needs random numbers at start).
        c.args([
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-device",
            "virtio-rng-device,rng=rng0",
        ]);
        c.args(["-device", "virtio-serial-device"]);
        let mut chardev = OsString::from("socket,id=agent,path=");
        chardev.push(escape_commas(&self.agent_socket.to_string_lossy()));
        c.arg("-chardev").arg(chardev);
        c.args([
            "-device",
            &format!("virtserialport,chardev=agent,name={}", PORT_NAME),
        ]);
        // Guest RAM is always the backend `ram`: a migration stream names RAM by its backend, so
        // a state saved from one kind of backend loads into another (a sandbox started from a
        // template's file is paused and resumed into anonymous memory).
        if !self.fs_devices.is_empty() {
            // The backend reads and writes request buffers in guest RAM directly: RAM must be a
            // file it can map.
            c.args(["-object"]).arg(format!(
                "memory-backend-memfd,id=ram,size={}M,share=on",
                self.memory_mb
            ));
        } else if let Some(f) = &self.ram_file {
            // (Nothing here may ever discard guest RAM, as a balloon or free page reporting
            // would: QEMU 7.2 punches a hole in a file-backed RAM's file to discard a page,
            // whether the mapping is shared or not, and the file is the template.)
            let mut obj = OsString::from(format!(
                "memory-backend-file,id=ram,size={}M,share={},mem-path=",
                self.memory_mb,
                if f.shared { "on" } else { "off" }
            ));
            obj.push(escape_commas(&f.path.to_string_lossy()));
            c.arg("-object").arg(obj);
        } else {
            c.args(["-object"]).arg(format!(
                "memory-backend-ram,id=ram,size={}M",
                self.memory_mb
            ));
        }
        c.args(["-machine", "memory-backend=ram"]);
        for (i, fs) in self.fs_devices.iter().enumerate() {
            let mut chardev = OsString::from(format!("socket,id=fs{i},path="));
            chardev.push(escape_commas(&fs.socket.to_string_lossy()));
            c.arg("-chardev").arg(chardev);
            c.arg("-device").arg(format!(
                "vhost-user-fs-device,chardev=fs{i},tag={},queue-size={}",
                escape_commas(&fs.tag),
                fs.queue_size
            ));
        }
        if let Some(net) = &self.net {
            let mut netdev = OsString::from("stream,id=net0,server=off,addr.type=unix,addr.path=");
            netdev.push(escape_commas(&net.socket.to_string_lossy()));
            c.arg("-netdev").arg(netdev);
            let m = net.mac;
            c.args([
                "-device",
                &format!(
                    "virtio-net-device,netdev=net0,mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ),
            ]);
        }
        if let Some(qmp) = &self.qmp_socket {
            let mut chardev = OsString::from("socket,id=qmp,path=");
            chardev.push(escape_commas(&qmp.to_string_lossy()));
            c.arg("-chardev").arg(chardev);
            c.args(["-mon", "chardev=qmp,mode=control"]);
        }
        if self.incoming {
            c.args(["-incoming", "defer"]);
        }
        c
    }
}

/// Name of the agent's virtio-serial port; must match `matchlock_proto::PORT_NAME`.
pub const PORT_NAME: &str = "matchlock.agent";

fn escape_commas(s: &str) -> String {
    s.replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-vCPU, 256 MiB VM with no devices beyond the agent's channel and the console.
    fn plain() -> VmSpec {
        VmSpec {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/init.cpio".into(),
            accel: Accel::Tcg,
            vcpus: 1,
            memory_mb: 256,
            disks: Vec::new(),
            agent_socket: "/s/agent.sock".into(),
            fs_devices: Vec::new(),
            console_socket: "/s/console.sock".into(),
            extra_cmdline: Vec::new(),
            net: None,
            qmp_socket: None,
            incoming: false,
            ram_file: None,
        }
    }

    #[test]
    fn command_line_is_hardened_and_escapes_paths() {
        let spec = VmSpec {
            vcpus: 2,
            memory_mb: 512,
            disks: vec![Disk {
                path: "/a,b/root.ext4".into(),
                serial: "ml-root".into(),
                read_only: true,
            }],
            fs_devices: vec![FsDevice {
                socket: "/s/fs,0.sock".into(),
                tag: "ml0".into(),
                queue_size: 1024,
            }],
            extra_cmdline: vec!["x=1".into()],
            qmp_socket: Some("/s/qmp.sock".into()),
            incoming: true,
            ..plain()
        };
        let c = spec.command();
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        for want in [
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-sandbox",
            "file=/a,,b/root.ext4,readonly=on",
            "serial=ml-root",
            "name=matchlock.agent",
            "socket,id=fs0,path=/s/fs,,0.sock",
            "vhost-user-fs-device,chardev=fs0,tag=ml0,queue-size=1024",
            "memory-backend-memfd,id=ram,size=512M,share=on",
            "memory-backend=ram",
            "virtio-mmio.force-legacy=false",
            "x=1",
            "-smp 2",
            "-m 512M",
            "socket,id=qmp,path=/s/qmp.sock -mon chardev=qmp,mode=control",
            "-incoming defer",
        ] {
            assert!(joined.contains(want), "missing {want} in {joined}");
        }
        assert!(!joined.contains("-netdev"));
    }

    #[test]
    fn guest_ram_is_always_the_backend_ram_and_a_template_file_when_given() {
        let mut spec = plain();
        let joined = |spec: &VmSpec| {
            spec.command()
                .get_args()
                .map(|a| a.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let plain = joined(&spec);
        assert!(
            plain.contains("memory-backend-ram,id=ram,size=256M"),
            "{plain}"
        );
        assert!(plain.contains("-machine memory-backend=ram"), "{plain}");
        spec.ram_file = Some(RamFile {
            path: "/t/a,b/ram".into(),
            shared: false,
        });
        let clone = joined(&spec);
        assert!(
            clone.contains("memory-backend-file,id=ram,size=256M,share=off,mem-path=/t/a,,b/ram"),
            "{clone}"
        );
        assert!(!clone.contains("memory-backend-ram"), "{clone}");
        spec.ram_file.as_mut().unwrap().shared = true;
        assert!(joined(&spec).contains("share=on,mem-path="));
    }
}
