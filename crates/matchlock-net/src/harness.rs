//! An in-memory guest for the network stack. A second smoltcp interface, with the guest's
//! address, MAC and default route, plays the VM's kernel on the far end of [`serve`]'s socket, so
//! tests and fuzz targets drive guest ↔ stack ↔ policy ↔ proxy ↔ upstream with no VM: the guest
//! opens TCP connections, sends UDP, asks the sandbox's DNS, or injects raw frames; upstreams are
//! ordinary sockets on loopback. Nothing in it is a stand-in for the product: the stack, the
//! policy and the proxy are the ones a sandbox runs, built by [`crate::setup::build`].

use crate::setup::{GATEWAY_IP, GUEST_IP, GUEST_MAC, NET_PREFIX};
use crate::stack::{serve, NetConfig, Queues};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, Icmpv4Message, Icmpv4Packet,
    IpAddress, IpCidr, IpEndpoint, IpProtocol, Ipv4Packet,
};
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

/// Per-connection buffer of the guest's TCP sockets, each direction.
const TCP_BUFFER: usize = 256 * 1024;

/// What came back for a UDP datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum UdpOutcome {
    /// A datagram from the destination.
    Reply(Vec<u8>),
    /// The stack answered that the destination is prohibited (ICMP destination unreachable).
    Refused,
    /// Nothing within the wait.
    Silence,
}

enum Cmd {
    Connect(SocketAddrV4, oneshot::Sender<io::Result<DuplexStream>>),
    Udp(SocketAddrV4, Vec<u8>, Duration, oneshot::Sender<UdpOutcome>),
    Frame(Vec<u8>),
}

/// A guest attached to a running network stack. Dropping it stops both.
pub struct Guest {
    cmds: mpsc::Sender<Cmd>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the test guest stopped")
}

impl Guest {
    /// Starts the stack for `cfg` (as a sandbox's supervisor does) and attaches a guest to it.
    pub fn start(cfg: NetConfig) -> Guest {
        let mtu = cfg.mtu as usize;
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let stack = tokio::spawn(async move {
            let _ = serve(theirs, cfg).await;
        });
        let (cmds, rx) = mpsc::channel(64);
        let guest = tokio::spawn(run(ours, mtu, rx));
        Guest {
            cmds,
            tasks: vec![stack, guest],
        }
    }

    /// Opens a TCP connection from the guest: the stream once the handshake completed, or
    /// `ConnectionRefused` when the stack reset it.
    pub async fn connect(&self, dst: SocketAddrV4) -> io::Result<DuplexStream> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Connect(dst, tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Sends one UDP datagram from the guest and waits up to `wait` for what comes back.
    pub async fn udp(&self, dst: SocketAddrV4, data: &[u8], wait: Duration) -> UdpOutcome {
        let (tx, rx) = oneshot::channel();
        if self
            .cmds
            .send(Cmd::Udp(dst, data.to_vec(), wait, tx))
            .await
            .is_err()
        {
            return UdpOutcome::Silence;
        }
        rx.await.unwrap_or(UdpOutcome::Silence)
    }

    /// Asks the sandbox's DNS (the gateway) for `name`'s A records.
    pub async fn resolve(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
        let bad = |e: String| io::Error::new(io::ErrorKind::InvalidData, e);
        let mut q = Message::new();
        q.set_id(0x4d4c).set_recursion_desired(true);
        let name = Name::from_ascii(name).map_err(|e| bad(e.to_string()))?;
        q.add_query(Query::query(name, RecordType::A));
        let packet = q.to_vec().map_err(|e| bad(e.to_string()))?;
        let dns = SocketAddrV4::new(GATEWAY_IP.into(), 53);
        match self.udp(dns, &packet, Duration::from_secs(5)).await {
            UdpOutcome::Reply(r) => {
                let m = Message::from_vec(&r).map_err(|e| bad(e.to_string()))?;
                Ok(m.answers()
                    .iter()
                    .filter_map(|r| match r.data() {
                        Some(RData::A(a)) => Some(a.0),
                        _ => None,
                    })
                    .collect())
            }
            other => Err(bad(format!("no DNS answer: {other:?}"))),
        }
    }

    /// Sends a raw Ethernet frame to the stack as if the guest's kernel had.
    pub async fn send_frame(&self, frame: Vec<u8>) {
        let _ = self.cmds.send(Cmd::Frame(frame)).await;
    }
}

/// One TCP connection of the guest.
struct Conn {
    handle: SocketHandle,
    /// The caller's end, until the handshake completes.
    user: Option<DuplexStream>,
    pending: Option<oneshot::Sender<io::Result<DuplexStream>>>,
    /// What the caller wrote; closed when the caller shut its side down.
    to_net: mpsc::Receiver<Vec<u8>>,
    unsent: Vec<u8>,
    closing: bool,
    /// What the network sent, for the caller; dropped at end of stream.
    from_net: Option<mpsc::Sender<Vec<u8>>>,
    tasks: [JoinHandle<()>; 2],
}

/// A UDP datagram waiting for its answer.
struct UdpWait {
    handle: SocketHandle,
    port: u16,
    deadline: Instant,
    refused: bool,
    reply: oneshot::Sender<UdpOutcome>,
}

/// The guest: its interface, its sockets, and the frames to and from the stack.
struct GuestStack {
    iface: Interface,
    dev: Queues,
    sockets: SocketSet<'static>,
    conns: Vec<Conn>,
    udps: Vec<UdpWait>,
    /// Raw frames to pass to the stack as they are.
    raw: Vec<Vec<u8>>,
    next_port: u16,
    epoch: Instant,
    wake: Arc<Notify>,
}

async fn run(link: DuplexStream, mtu: usize, mut cmds: mpsc::Receiver<Cmd>) {
    let (mut rd, mut wr) = tokio::io::split(link);
    let (frames_tx, mut frames) = mpsc::channel::<Vec<u8>>(1024);
    let reader = tokio::spawn(async move {
        loop {
            let mut len = [0u8; 4];
            if rd.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
            if rd.read_exact(&mut f).await.is_err() || frames_tx.send(f).await.is_err() {
                return;
            }
        }
    });
    let mut g = GuestStack::new(mtu);
    loop {
        let delay = g
            .iface
            .poll_delay(g.now(), &g.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_millis(20))
            .min(Duration::from_millis(20));
        let wake = g.wake.clone();
        tokio::select! {
            f = frames.recv() => match f {
                Some(f) => g.ingress(f),
                None => break,
            },
            c = cmds.recv() => match c {
                Some(c) => g.command(c),
                None => break,
            },
            _ = wake.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        while let Ok(f) = frames.try_recv() {
            g.ingress(f);
        }
        g.turn();
        let out: Vec<Vec<u8>> = g.raw.drain(..).chain(g.dev.tx.drain(..)).collect();
        for f in out {
            let mut buf = (f.len() as u32).to_be_bytes().to_vec();
            buf.extend_from_slice(&f);
            if wr.write_all(&buf).await.is_err() {
                reader.abort();
                return;
            }
        }
    }
    reader.abort();
}

impl GuestStack {
    fn new(mtu: usize) -> GuestStack {
        let mut dev = Queues::new(mtu);
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut dev, SmolInstant::from_millis(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(GUEST_IP.into()), NET_PREFIX));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY_IP.into());
        GuestStack {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
            conns: Vec::new(),
            udps: Vec::new(),
            raw: Vec::new(),
            next_port: 40_000,
            epoch: Instant::now(),
            wake: Arc::new(Notify::new()),
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    fn port(&mut self) -> u16 {
        self.next_port = if self.next_port >= 60_000 {
            40_000
        } else {
            self.next_port + 1
        };
        self.next_port
    }

    /// A frame from the stack. ICMP "prohibited" answers to our UDP are noted first (smoltcp
    /// does not surface them to UDP sockets).
    fn ingress(&mut self, frame: Vec<u8>) {
        if let Some(port) = refused_udp_port(&frame) {
            for u in self.udps.iter_mut().filter(|u| u.port == port) {
                u.refused = true;
            }
        }
        self.dev.rx.push_back(frame);
    }

    fn command(&mut self, c: Cmd) {
        match c {
            Cmd::Frame(f) => self.raw.push(f),
            Cmd::Connect(dst, reply) => {
                let mut sock = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
                    tcp::SocketBuffer::new(vec![0u8; TCP_BUFFER]),
                );
                sock.set_nagle_enabled(false);
                let port = self.port();
                let remote = IpEndpoint::new(IpAddress::Ipv4(*dst.ip()), dst.port());
                if let Err(e) = sock.connect(self.iface.context(), remote, port) {
                    let _ = reply.send(Err(io::Error::other(e.to_string())));
                    return;
                }
                let handle = self.sockets.add(sock);
                let (user, ours) = tokio::io::duplex(TCP_BUFFER);
                let (mut ord, mut owr) = tokio::io::split(ours);
                let (to_net_tx, to_net) = mpsc::channel::<Vec<u8>>(8);
                let (from_net, mut from_net_rx) = mpsc::channel::<Vec<u8>>(8);
                let wake = self.wake.clone();
                let reader = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = ord.read(&mut buf).await {
                        if n == 0 || to_net_tx.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                        wake.notify_one();
                    }
                    drop(to_net_tx);
                    wake.notify_one();
                });
                let wake = self.wake.clone();
                let writer = tokio::spawn(async move {
                    while let Some(chunk) = from_net_rx.recv().await {
                        if owr.write_all(&chunk).await.is_err() {
                            return;
                        }
                        wake.notify_one();
                    }
                    let _ = owr.shutdown().await;
                });
                self.conns.push(Conn {
                    handle,
                    user: Some(user),
                    pending: Some(reply),
                    to_net,
                    unsent: Vec::new(),
                    closing: false,
                    from_net: Some(from_net),
                    tasks: [reader, writer],
                });
            }
            Cmd::Udp(dst, data, wait, reply) => {
                let mut sock = udp::Socket::new(
                    udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 65_536]),
                    udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 8], vec![0; 65_536]),
                );
                let port = self.port();
                let remote = IpEndpoint::new(IpAddress::Ipv4(*dst.ip()), dst.port());
                if sock.bind(port).is_err() || sock.send_slice(&data, remote).is_err() {
                    let _ = reply.send(UdpOutcome::Silence);
                    return;
                }
                let handle = self.sockets.add(sock);
                self.udps.push(UdpWait {
                    handle,
                    port,
                    deadline: Instant::now() + wait,
                    refused: false,
                    reply,
                });
            }
        }
    }

    /// Polls the interface and moves data between the sockets and their callers.
    fn turn(&mut self) {
        for _ in 0..64 {
            let now = self.now();
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            let before = self.dev.tx.len();
            self.pump();
            let now = self.now();
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            if self.dev.tx.len() == before {
                break;
            }
        }
    }

    fn pump(&mut self) {
        let sockets = &mut self.sockets;
        self.conns.retain_mut(|c| {
            let sock = sockets.get_mut::<tcp::Socket>(c.handle);
            if c.pending.is_some() {
                match sock.state() {
                    tcp::State::SynSent | tcp::State::SynReceived => return true,
                    tcp::State::Established | tcp::State::CloseWait => {
                        if let (Some(p), Some(u)) = (c.pending.take(), c.user.take()) {
                            let _ = p.send(Ok(u));
                        }
                    }
                    _ => {
                        if let Some(p) = c.pending.take() {
                            let refused = io::Error::new(
                                io::ErrorKind::ConnectionRefused,
                                "the sandbox reset the connection",
                            );
                            let _ = p.send(Err(refused));
                        }
                        sockets.remove(c.handle);
                        c.tasks.iter().for_each(JoinHandle::abort);
                        return false;
                    }
                }
            }
            // Caller → network.
            loop {
                if c.unsent.is_empty() {
                    match c.to_net.try_recv() {
                        Ok(v) => c.unsent = v,
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            if !c.closing {
                                sock.close();
                                c.closing = true;
                            }
                            break;
                        }
                    }
                }
                if !sock.can_send() {
                    break;
                }
                let n = sock.send_slice(&c.unsent).unwrap_or(0);
                c.unsent.drain(..n);
                if n == 0 {
                    break;
                }
            }
            // Network → caller, as far as the caller keeps up.
            while sock.can_recv() {
                let Some(tx) = &c.from_net else { break };
                let Ok(permit) = tx.try_reserve() else { break };
                let mut buf = vec![0u8; 64 * 1024];
                let n = sock.recv_slice(&mut buf).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                permit.send(buf);
            }
            if !sock.may_recv() && !sock.can_recv() {
                c.from_net = None;
            }
            if sock.state() == tcp::State::Closed {
                sockets.remove(c.handle);
                return false;
            }
            true
        });
        let now = Instant::now();
        let mut i = 0;
        while i < self.udps.len() {
            let sock = self.sockets.get_mut::<udp::Socket>(self.udps[i].handle);
            let outcome = if let Ok((data, _)) = sock.recv() {
                Some(UdpOutcome::Reply(data.to_vec()))
            } else if self.udps[i].refused {
                Some(UdpOutcome::Refused)
            } else if now >= self.udps[i].deadline {
                Some(UdpOutcome::Silence)
            } else {
                None
            };
            match outcome {
                Some(o) => {
                    let u = self.udps.swap_remove(i);
                    self.sockets.remove(u.handle);
                    let _ = u.reply.send(o);
                }
                None => i += 1,
            }
        }
    }
}

/// The guest UDP port an ICMP "destination unreachable" frame answers, if it is one.
fn refused_udp_port(frame: &[u8]) -> Option<u16> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    if ip.next_header() != IpProtocol::Icmp {
        return None;
    }
    let icmp = Icmpv4Packet::new_checked(ip.payload()).ok()?;
    if icmp.msg_type() != Icmpv4Message::DstUnreachable {
        return None;
    }
    // The payload quotes the offending datagram: its IP header and the first bytes of its UDP
    // (truncated, so the quoted header's total length cannot be checked against it).
    let data = icmp.data();
    if data.len() < 20 {
        return None;
    }
    let inner = Ipv4Packet::new_unchecked(data);
    let header = inner.header_len() as usize;
    if inner.next_header() != IpProtocol::Udp || data.len() < header + 2 {
        return None;
    }
    Some(u16::from_be_bytes([data[header], data[header + 1]]))
}
