//! `eth0`: the static IPv4 configuration of the sandbox network (address, MTU, default route via
//! matchlock's stack), set with the classic interface ioctls so the agent needs no netlink code.

use matchlock_proto::GuestNet;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const IFACE: &[u8] = b"eth0";

fn ifreq() -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (i, b) in IFACE.iter().enumerate() {
        req.ifr_name[i] = *b as libc::c_char;
    }
    req
}

fn sockaddr_in(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(fd: i32, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: every request used here takes a pointer to the struct passed.
    if unsafe { libc::ioctl(fd, req as _, arg as *mut T) } < 0 {
        return Err(format!("{what}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// Configures `eth0` and the default route, and points `/etc/resolv.conf` at the gateway.
pub fn configure(net: &GuestNet) -> Result<(), String> {
    // The NIC is probed during boot; give a slow (TCG) boot a moment before giving up.
    let start = Instant::now();
    while !std::path::Path::new("/sys/class/net/eth0").exists() {
        if start.elapsed() > Duration::from_secs(5) {
            return Err("no eth0: the network device did not appear".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if net.prefix > 32 {
        return Err(format!("bad prefix /{}", net.prefix));
    }
    // SAFETY: a plain socket for the ioctls, owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: raw is a fresh descriptor.
    let _fd = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut req = ifreq();
    req.ifr_ifru.ifru_addr = sockaddr_in(net.address);
    ioctl(raw, libc::SIOCSIFADDR, &mut req, "setting the eth0 address")?;
    let mask = if net.prefix == 0 {
        0
    } else {
        u32::MAX << (32 - net.prefix as u32)
    };
    let mut req = ifreq();
    req.ifr_ifru.ifru_netmask = sockaddr_in(mask.to_be_bytes());
    ioctl(
        raw,
        libc::SIOCSIFNETMASK,
        &mut req,
        "setting the eth0 netmask",
    )?;
    let mut req = ifreq();
    req.ifr_ifru.ifru_mtu = i32::from(net.mtu);
    ioctl(raw, libc::SIOCSIFMTU, &mut req, "setting the eth0 MTU")?;
    let mut req = ifreq();
    ioctl(raw, libc::SIOCGIFFLAGS, &mut req, "reading eth0 flags")?;
    // SAFETY: reading and writing the flags member of the union SIOCGIFFLAGS filled.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(raw, libc::SIOCSIFFLAGS, &mut req, "bringing eth0 up")?;

    // SAFETY: rtentry is plain old data; all-zero is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in([0; 4]);
    rt.rt_genmask = sockaddr_in([0; 4]);
    rt.rt_gateway = sockaddr_in(net.gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    ioctl(raw, libc::SIOCADDRT, &mut rt, "adding the default route")?;

    let g = net.gateway;
    let resolv = format!("nameserver {}.{}.{}.{}\n", g[0], g[1], g[2], g[3]);
    // The image may ship resolv.conf as a symlink (e.g. into /run); replace it, do not follow it.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::write("/etc/resolv.conf", resolv).map_err(|e| format!("writing /etc/resolv.conf: {e}"))
}
