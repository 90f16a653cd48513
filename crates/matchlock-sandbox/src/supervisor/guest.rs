//! Talking to the guest agent at boot: its hello, the `Setup` that mounts its disks and
//! workspace and configures its network, and the sandbox CA in its trust store.

use crate::config::SandboxConfig;
use matchlock_net::setup::{GATEWAY_IP, GUEST_IP, NET_PREFIX};
use matchlock_proto::mux::{Mux, Role};
use matchlock_proto::{read_msg, write_msg, Msg, Setup};
use tokio::io::AsyncReadExt;
use tokio::net::UnixListener;

use super::link::AgentLink;
use super::vm::{disk_serial, ROOT_SERIAL, UPPER_SERIAL};

/// What the guest is told to set up: hostname and `/etc/hosts`, disks, clock, CPU quota,
/// confinement, network, workspace mounts.
pub fn setup(config: &SandboxConfig, vfs: Vec<matchlock_proto::GuestVfsMount>) -> Setup {
    Setup {
        hostname: config.hostname.clone(),
        hosts: matchlock_net::setup::guest_hosts(&config.add_hosts, config.network.is_some()),
        root_serial: ROOT_SERIAL.into(),
        upper_serial: Some(UPPER_SERIAL.into()),
        time_unix_ms: now_unix_ms(),
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
        vfs,
        entropy: {
            let mut seed = vec![0u8; 64];
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
            seed
        },
    }
}

/// The host's wall clock in milliseconds since the epoch, for the guest (which has no RTC).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Waits for the agent's hello on its port (a guest restored from a template said it to the
/// template's builder), starts the channel and has the guest set up. The channel runs through an
/// [`AgentLink`], so that it outlives this QEMU (pause and resume).
pub async fn boot(
    listener: &UnixListener,
    setup: Setup,
    restored: bool,
) -> Result<(Mux, AgentLink), String> {
    let (mut conn, _) = listener
        .accept()
        .await
        .map_err(|e| format!("QEMU did not connect the agent channel: {e}"))?;
    let mut hello = *matchlock_proto::HELLO;
    if !restored {
        conn.read_exact(&mut hello)
            .await
            .map_err(|e| format!("guest agent did not say hello: {e}"))?;
    }
    if &hello != matchlock_proto::HELLO {
        return Err(format!(
            "guest agent speaks another protocol version ({:?}); rebuild the guest agent",
            String::from_utf8_lossy(&hello)
        ));
    }
    let (link, conn) =
        AgentLink::start(conn).map_err(|e| format!("agent channel setup failed: {e}"))?;
    // The guest opens no streams of its own (its filesystem requests have their own port).
    let (mux, _inbound, _driver) = Mux::start(conn, Role::Client);
    let mut s = mux.open().await.map_err(|e| e.to_string())?;
    write_msg(&mut s, &Msg::Setup(setup))
        .await
        .map_err(|e| e.to_string())?;
    match read_msg(&mut s).await {
        Ok(Some(Msg::Ok)) => Ok((mux, link)),
        Ok(Some(Msg::Error(e))) => Err(format!("guest setup failed: {e}")),
        Ok(other) => Err(format!("guest setup: unexpected reply {other:?}")),
        Err(e) => Err(format!("guest setup: {e}")),
    }
}

/// What a failed boot most likely means, when the user brought the kernel.
pub fn kernel_hint(config: &SandboxConfig) -> String {
    match &config.kernel {
        Some(k) => format!(
            "\n  the guest kernel {} (--kernel) is the likely cause: it must be an x86-64 \
             vmlinux with PVH, virtio-mmio command-line devices and the virtio console, \
             serial, block, net and fs drivers built in (not modules); run without \
             --kernel to use matchlock's own",
            k.display()
        ),
        None => String::new(),
    }
}

/// The system-wide `known_hosts` of OpenSSH in the guest.
pub const GUEST_SSH_KNOWN_HOSTS: &str = "/etc/ssh/ssh_known_hosts";

/// A guest file's content (at most 16 MiB); empty when it is missing or unreadable.
async fn read_guest_file(mux: &Mux, path: &str) -> Result<Vec<u8>, String> {
    let mut s = mux.open().await.map_err(|e| e.to_string())?;
    write_msg(&mut s, &Msg::ReadFile { path: path.into() })
        .await
        .map_err(|e| e.to_string())?;
    let mut content = Vec::new();
    loop {
        match read_msg(&mut s).await {
            Ok(Some(Msg::Data(d))) if content.len() < (16 << 20) => content.extend_from_slice(&d),
            Ok(Some(Msg::FileInfo { .. })) => {}
            Ok(Some(Msg::Eof)) => return Ok(content),
            // Missing or unreadable: start anew.
            _ => return Ok(Vec::new()),
        }
    }
}

/// Writes a whole guest file as root.
async fn write_guest_file(mux: &Mux, path: &str, data: &[u8]) -> Result<(), String> {
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
        .map_err(|e| format!("{path}: {e}"))
}

/// Appends `text` to a guest file (created when the image has none), on a line of its own.
pub async fn append_file(mux: &Mux, path: &str, text: &str) -> Result<(), String> {
    let mut content = read_guest_file(mux, path).await?;
    if !content.is_empty() && !content.ends_with(b"\n") {
        content.push(b'\n');
    }
    content.extend_from_slice(text.as_bytes());
    write_guest_file(mux, path, &content).await
}

/// Writes the sandbox CA into the guest: its own file, and appended to the CA bundle (created when
/// the image has none).
pub async fn install_ca(mux: &Mux, pem: &str) -> Result<(), String> {
    use crate::config::{GUEST_CA_BUNDLE, GUEST_CA_FILE};
    write_guest_file(mux, GUEST_CA_FILE, pem.as_bytes()).await?;
    append_file(mux, GUEST_CA_BUNDLE, pem).await
}
