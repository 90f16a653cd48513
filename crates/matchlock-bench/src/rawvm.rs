//! A VM booted directly (QEMU + the agent protocol, no supervisor), for baselines matchlock itself
//! never uses: QEMU's slirp networking, virtio-9p sharing.

use anyhow::{bail, Context, Result};
use matchlock_proto::mux::{Mux, Role};
use matchlock_proto::{read_msg, write_msg, ExecRequest, GuestNet, Msg, Setup, HELLO};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// A running VM; killed on drop.
pub struct RawVm {
    child: Child,
    rt: tokio::runtime::Runtime,
    mux: Mux,
    _dir: tempfile::TempDir,
}

impl Drop for RawVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RawVm {
    /// Boots `rootfs` with `extra` QEMU arguments and an optional `eth0` setup.
    pub fn boot(rootfs: &Path, extra: &[String], net: Option<GuestNet>) -> Result<RawVm> {
        let dir = tempfile::Builder::new().prefix("mlbv").tempdir_in("/tmp")?;
        let upper = dir.path().join("upper.ext4");
        std::fs::File::create(&upper)?.set_len(1 << 30)?;
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&upper)
            .status()?;
        if !st.success() {
            bail!("mkfs.ext4 failed");
        }
        let qemu = matchlock_vmm::qemu::locate_qemu()?;
        let kernel = matchlock_vmm::kernel::locate()?;
        let initramfs = matchlock_vmm::initramfs::cached(&matchlock_vmm::agent::locate()?)?;
        let accel = matchlock_vmm::accel::choose(&qemu, &kernel, &initramfs)?.accel;
        let agent_sock = dir.path().join("agent.sock");
        let console_sock = dir.path().join("console.sock");
        let agent_l = std::os::unix::net::UnixListener::bind(&agent_sock)?;
        let console_l = std::os::unix::net::UnixListener::bind(&console_sock)?;
        let spec = matchlock_vmm::qemu::VmSpec {
            qemu,
            kernel,
            initramfs,
            accel,
            vcpus: 1,
            memory_mb: 512,
            disks: vec![
                matchlock_vmm::qemu::Disk {
                    path: rootfs.to_path_buf(),
                    serial: "ml-root".into(),
                    read_only: true,
                },
                matchlock_vmm::qemu::Disk {
                    path: upper,
                    serial: "ml-upper".into(),
                    read_only: false,
                },
            ],
            agent_socket: agent_sock,
            fs_devices: Vec::new(),
            console_socket: console_sock,
            extra_cmdline: Vec::new(),
            net: None,
            qmp_socket: None,
            incoming: false,
            ram_file: None,
        };
        let mut cmd = spec.command();
        cmd.args(extra);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().context("starting QEMU")?;
        std::thread::spawn(move || {
            if let Ok((mut c, _)) = console_l.accept() {
                let mut buf = [0u8; 4096];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        let rt = tokio::runtime::Runtime::new()?;
        let mux = rt.block_on(async {
            agent_l.set_nonblocking(true)?;
            let l = tokio::net::UnixListener::from_std(agent_l)?;
            let (mut conn, _) = tokio::time::timeout(Duration::from_secs(90), l.accept()).await??;
            let mut hello = [0u8; 8];
            conn.read_exact(&mut hello).await?;
            if &hello != HELLO {
                bail!("unexpected agent hello");
            }
            let (mux, _inbound, _driver) = Mux::start(conn, Role::Client);
            let mut s = mux.open().await?;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            let setup = Setup {
                hostname: "raw".into(),
                root_serial: "ml-root".into(),
                upper_serial: Some("ml-upper".into()),
                time_unix_ms: now_ms,
                net,
                ..Default::default()
            };
            write_msg(&mut s, &Msg::Setup(setup)).await?;
            match read_msg(&mut s).await? {
                Some(Msg::Ok) => Ok(mux),
                other => bail!("guest setup failed: {other:?}"),
            }
        });
        let mux = match mux {
            Ok(m) => m,
            Err(e) => {
                let mut child = child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(RawVm {
            child,
            rt,
            mux,
            _dir: dir,
        })
    }

    /// Runs `argv` (as root, all capabilities when `privileged`) and returns its output; fails on a
    /// non-zero exit.
    pub fn exec(&self, argv: Vec<String>, privileged: bool) -> Result<String> {
        self.rt.block_on(async {
            let mut s = self.mux.open().await?;
            let req = ExecRequest {
                argv,
                env: vec![("PATH".into(), matchlock_image::DEFAULT_PATH.into())],
                cwd: Some("/".into()),
                privileged,
                ..Default::default()
            };
            write_msg(&mut s, &Msg::Exec(req)).await?;
            let mut out = Vec::new();
            loop {
                match read_msg(&mut s).await? {
                    Some(Msg::Stdout(d)) | Some(Msg::Stderr(d)) => out.extend_from_slice(&d),
                    Some(Msg::Exited(st)) if st.code == 0 => break,
                    Some(Msg::Exited(st)) => bail!(
                        "guest command exited {}: {}",
                        st.code,
                        String::from_utf8_lossy(&out)
                    ),
                    Some(_) => {}
                    None => bail!("agent closed the stream"),
                }
            }
            Ok(String::from_utf8_lossy(&out).into_owned())
        })
    }
}
