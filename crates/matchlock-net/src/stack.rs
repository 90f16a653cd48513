//! The stack proper: one task owns the smoltcp interface and every flow of the sandbox.
//!
//! Frames from the guest are classified before smoltcp sees them. TCP SYNs to a new destination
//! are held while matchlock connects to the real destination from the host ("connect first", as
//! slirp does): the guest sees either a normal handshake or a reset, never a connection that
//! succeeds and then dies. Once the host connection is up, a smoltcp socket listening on exactly
//! that destination is created and the held SYN is replayed into it. UDP and ICMP are answered
//! directly from the frames (smoltcp's any-IP mode would otherwise answer pings for every address
//! on the internet). IPv6 and other protocols are dropped.

use crate::dns::Dns;
use crate::frames::{self, Link};
use matchlock_api::config::DnsMode;
use matchlock_policy::{Allowed, Denial, Policy, Target};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, HardwareAddress, Icmpv4Packet, Icmpv4Repr,
    IpAddress, IpCidr, IpListenEndpoint, IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, UdpPacket,
};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;

/// Caps that keep one guest from exhausting the host.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Concurrent TCP connections; further SYNs are reset.
    pub max_tcp: usize,
    /// Concurrent UDP flows; further datagrams are dropped.
    pub max_udp: usize,
    /// Receive and send buffer of each TCP connection, in bytes (each direction).
    pub tcp_buffer: usize,
    /// A TCP connection without traffic for this long is reset.
    pub tcp_idle: Duration,
    /// A UDP flow without traffic for this long is forgotten.
    pub udp_idle: Duration,
    /// How long the host gets to connect to a destination.
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tcp: 512,
            max_udp: 256,
            tcp_buffer: 128 * 1024,
            tcp_idle: Duration::from_secs(3600),
            udp_idle: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(20),
        }
    }
}

/// The network of one sandbox.
pub struct NetConfig {
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// The gateway (this stack) address; also the guest's DNS server.
    pub gateway_ip: Ipv4Addr,
    /// Prefix length of the link.
    pub prefix: u8,
    /// The stack's MAC.
    pub gateway_mac: [u8; 6],
    /// The link MTU (IP bytes per frame).
    pub mtu: u16,
    /// The network policy: every host connection the stack opens carries its decision.
    pub policy: Arc<Policy>,
    /// The guest's resolver.
    pub dns: Arc<Dns>,
    /// Resource caps.
    pub limits: Limits,
    /// Guest-visible stand-ins for host-loopback destinations (`--add-host name:127.0.0.1`): the
    /// guest's own loopback shadows 127.0.0.0/8, so it is given an alias address, which the stack
    /// translates back when it connects. The policy applies to the real address.
    pub aliases: Vec<(Ipv4Addr, IpAddr)>,
    /// Interception mode: every TCP flow goes to this proxy (which asks the policy per request),
    /// and UDP other than DNS is refused.
    pub intercept: Option<Arc<crate::proxy::Proxy>>,
}

/// A direct TCP flow's policy decision: made at the SYN, or, for an address synthetic DNS made
/// up, once the host has looked up the name it stands for.
enum TcpDecision {
    Made(Allowed),
    AfterLookup(Arc<Dns>),
}

/// First alias address: the benchmarking range 198.18.0.0/15, never routed on the internet.
pub const ALIAS_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Frame queues between a socket and smoltcp (the stack's, and the test guest's in `harness`).
pub(crate) struct Queues {
    /// Frames for smoltcp to receive.
    pub(crate) rx: VecDeque<Vec<u8>>,
    /// Frames smoltcp sent.
    pub(crate) tx: VecDeque<Vec<u8>>,
    /// The link MTU (IP bytes per frame).
    pub(crate) mtu: usize,
}

impl Queues {
    pub(crate) fn new(mtu: usize) -> Queues {
        Queues {
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            mtu,
        }
    }
}

pub(crate) struct Rx(Vec<u8>);
pub(crate) struct Tx<'a>(&'a mut VecDeque<Vec<u8>>);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0u8; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _t: SmolInstant) -> Option<(Rx, Tx<'_>)> {
        let f = self.rx.pop_front()?;
        Some((Rx(f), Tx(&mut self.tx)))
    }

    fn transmit(&mut self, _t: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut c = DeviceCapabilities::default();
        c.medium = Medium::Ethernet;
        c.max_transmission_unit = self.mtu + 14;
        c
    }
}

/// (guest endpoint, destination endpoint).
type Key = (SocketAddrV4, SocketAddrV4);

enum Event {
    Connected(Key, TcpStream),
    ConnectFailed(Key, String),
    HostWriteFailed(Key),
    /// A datagram for the guest: (from, to, payload).
    Udp(SocketAddrV4, SocketAddrV4, Vec<u8>),
}

struct TcpFlow {
    handle: Option<SocketHandle>,
    /// The guest's SYN, held until the host connection is up.
    syn: Option<(Vec<u8>, u32)>,
    to_host: Option<mpsc::Sender<Vec<u8>>>,
    from_host: Option<mpsc::Receiver<Vec<u8>>>,
    pending: Vec<u8>,
    pending_off: usize,
    host_eof: bool,
    close_sent: bool,
    /// When the host side stopped taking the guest's data (it hung up while the guest was still
    /// sending): from then on the guest's bytes are dropped, as a server's lingering close does,
    /// so what the host wrote before it hung up (a 403, a 429) reaches the guest whole instead
    /// of being lost to a reset. Bounded by [`LINGER`].
    lingering: Option<Instant>,
    last_active: Instant,
    tasks: Vec<JoinHandle<()>>,
}

/// How long a flow whose host side hung up keeps taking (and dropping) the guest's data before
/// it is reset.
const LINGER: Duration = Duration::from_secs(10);

impl TcpFlow {
    /// A flow whose guest SYN is held until its far end is ready.
    fn connecting(syn: Vec<u8>, seq: u32, tasks: Vec<JoinHandle<()>>) -> TcpFlow {
        TcpFlow {
            handle: None,
            syn: Some((syn, seq)),
            to_host: None,
            from_host: None,
            pending: Vec::new(),
            pending_off: 0,
            host_eof: false,
            close_sent: false,
            lingering: None,
            last_active: Instant::now(),
            tasks,
        }
    }
}

impl TcpFlow {
    /// The host side takes no more of the guest's data: drop it from now on (see `lingering`).
    fn linger(&mut self) {
        self.to_host = None;
        self.lingering.get_or_insert_with(Instant::now);
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct UdpFlow {
    /// A plain non-blocking handle for sending: tokio's `try_send` reports "would block" until the
    /// reactor has seen the socket once, which would drop a flow's first datagram.
    sock: std::net::UdpSocket,
    last_active: Instant,
    task: JoinHandle<()>,
}

impl Drop for UdpFlow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Stack {
    cfg: NetConfig,
    iface: Interface,
    sockets: SocketSet<'static>,
    dev: Queues,
    link: Link,
    guest_mac: Option<EthernetAddress>,
    tcp: HashMap<Key, TcpFlow>,
    udp: HashMap<Key, UdpFlow>,
    events: mpsc::Sender<Event>,
    wake: Arc<Notify>,
    epoch: Instant,
    /// Refusals logged so far (the log is capped so a scanning guest cannot flood it).
    refusals_logged: u32,
    /// DNS queries being answered at once.
    dns_slots: Arc<tokio::sync::Semaphore>,
}

/// DNS queries in flight per sandbox.
const MAX_DNS_IN_FLIGHT: usize = 64;

/// Refusals written to the supervisor log before it goes quiet.
const MAX_REFUSAL_LOGS: u32 = 200;

/// Largest frame accepted from QEMU (its length prefix is checked against this).
const MAX_FRAME: usize = 65_536;

/// Serves the guest NIC on `conn` (QEMU's `-netdev stream` socket: frames prefixed by their
/// 4-byte big-endian length) until QEMU closes it.
pub async fn serve<S>(conn: S, cfg: NetConfig) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(conn);
    let (frames_tx, mut frames_rx) = mpsc::channel::<Vec<u8>>(1024);
    let reader = tokio::spawn(async move {
        loop {
            let mut len = [0u8; 4];
            if rd.read_exact(&mut len).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_FRAME {
                return;
            }
            let mut f = vec![0u8; len];
            if rd.read_exact(&mut f).await.is_err() || frames_tx.send(f).await.is_err() {
                return;
            }
        }
    });
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(4096);
    let writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            let mut buf = Vec::with_capacity(f.len() + 4);
            buf.extend_from_slice(&(f.len() as u32).to_be_bytes());
            buf.extend_from_slice(&f);
            if wr.write_all(&buf).await.is_err() {
                return;
            }
        }
    });
    let (events_tx, mut events_rx) = mpsc::channel::<Event>(1024);
    let mut stack = Stack::new(cfg, events_tx);
    let wake = stack.wake.clone();
    let mut closed = false;
    while !closed {
        let delay = stack
            .iface
            .poll_delay(stack.now(), &stack.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::select! {
            f = frames_rx.recv() => match f {
                Some(f) => stack.ingress(f),
                None => closed = true,
            },
            e = events_rx.recv() => {
                if let Some(e) = e { stack.event(e); }
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep(delay) => {}
        }
        // Take everything that is ready in one turn, so a burst costs one poll.
        while let Ok(f) = frames_rx.try_recv() {
            stack.ingress(f);
        }
        while let Ok(e) = events_rx.try_recv() {
            stack.event(e);
        }
        stack.turn();
        while let Some(f) = stack.dev.tx.pop_front() {
            if out_tx.send(f).await.is_err() {
                closed = true;
                break;
            }
        }
    }
    reader.abort();
    drop(out_tx);
    let _ = writer.await;
    Ok(())
}

impl Stack {
    fn new(cfg: NetConfig, events: mpsc::Sender<Event>) -> Stack {
        let mut dev = Queues::new(cfg.mtu as usize);
        let gw_mac = EthernetAddress(cfg.gateway_mac);
        let mut config = Config::new(HardwareAddress::Ethernet(gw_mac));
        config.random_seed = rand::random();
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut dev, SmolInstant::from_millis(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(cfg.gateway_ip), cfg.prefix));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(cfg.gateway_ip);
        iface.set_any_ip(true);
        Stack {
            link: Link {
                gateway: gw_mac,
                guest: EthernetAddress([0xff; 6]),
            },
            cfg,
            iface,
            sockets: SocketSet::new(Vec::new()),
            dev,
            guest_mac: None,
            tcp: HashMap::new(),
            udp: HashMap::new(),
            events,
            wake: Arc::new(Notify::new()),
            epoch,
            refusals_logged: 0,
            dns_slots: Arc::new(tokio::sync::Semaphore::new(MAX_DNS_IN_FLIGHT)),
        }
    }

    fn now(&self) -> SmolInstant {
        SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Says on the supervisor's stderr (its log) why a flow was refused, up to a cap.
    fn log_refusal(&mut self, what: std::fmt::Arguments<'_>) {
        if self.refusals_logged < MAX_REFUSAL_LOGS {
            tracing::warn!(target: "matchlock::network", "{what}");
        } else if self.refusals_logged == MAX_REFUSAL_LOGS {
            tracing::warn!(target: "matchlock::network", "further refusals are not logged");
        }
        self.refusals_logged = self.refusals_logged.saturating_add(1);
    }

    /// Where a guest-visible destination really goes.
    fn real(&self, dst: Ipv4Addr) -> IpAddr {
        self.cfg
            .aliases
            .iter()
            .find(|(alias, _)| *alias == dst)
            .map(|(_, real)| *real)
            .unwrap_or(IpAddr::V4(dst))
    }

    fn send_frame(&mut self, f: Vec<u8>) {
        self.dev.tx.push_back(f);
    }

    /// Classifies one frame from the guest.
    fn ingress(&mut self, frame: Vec<u8>) {
        if frame.len() > self.cfg.mtu as usize + 14 {
            return;
        }
        let Ok(eth) = EthernetFrame::new_checked(&frame[..]) else {
            return;
        };
        if self.guest_mac.is_none() && eth.src_addr().is_unicast() {
            self.guest_mac = Some(eth.src_addr());
            self.link.guest = eth.src_addr();
        }
        match eth.ethertype() {
            EthernetProtocol::Arp => self.dev.rx.push_back(frame),
            EthernetProtocol::Ipv4 => self.ingress_ipv4(frame),
            // IPv6 and everything else: the guest has no route for them anyway.
            _ => {}
        }
    }

    fn ingress_ipv4(&mut self, frame: Vec<u8>) {
        let eth = EthernetFrame::new_unchecked(&frame[..]);
        let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
            return;
        };
        let Ok(repr) = Ipv4Repr::parse(&ip, &Default::default()) else {
            return;
        };
        if repr.src_addr != self.cfg.guest_ip {
            // Spoofed source: nothing may leave in another address's name.
            return;
        }
        let payload = ip.payload();
        match repr.next_header {
            IpProtocol::Tcp => {
                let Ok(tcp) = TcpPacket::new_checked(payload) else {
                    return;
                };
                let key = (
                    SocketAddrV4::new(repr.src_addr, tcp.src_port()),
                    SocketAddrV4::new(repr.dst_addr, tcp.dst_port()),
                );
                if tcp.syn() && !tcp.ack() && repr.dst_addr != self.cfg.gateway_ip {
                    let seq = tcp.seq_number().0 as u32;
                    self.tcp_syn(key, frame, seq);
                } else {
                    if let Some(flow) = self.tcp.get_mut(&key) {
                        if flow.syn.is_some() {
                            return; // still connecting: the guest will retransmit
                        }
                        flow.last_active = Instant::now();
                    }
                    self.dev.rx.push_back(frame);
                }
            }
            IpProtocol::Udp => {
                let Ok(udp) = UdpPacket::new_checked(payload) else {
                    return;
                };
                let src = SocketAddrV4::new(repr.src_addr, udp.src_port());
                let dst = SocketAddrV4::new(repr.dst_addr, udp.dst_port());
                let data = udp.payload().to_vec();
                self.udp_out(src, dst, data, &repr, payload.to_vec());
            }
            IpProtocol::Icmp => {
                let Ok(pkt) = Icmpv4Packet::new_checked(payload) else {
                    return;
                };
                let Ok(icmp) = Icmpv4Repr::parse(&pkt, &Default::default()) else {
                    return;
                };
                if let Icmpv4Repr::EchoRequest {
                    ident,
                    seq_no,
                    data,
                } = icmp
                {
                    let f = if repr.dst_addr == self.cfg.gateway_ip {
                        frames::icmp_echo_reply(
                            self.link,
                            repr.dst_addr,
                            repr.src_addr,
                            ident,
                            seq_no,
                            data,
                        )
                    } else {
                        // No ICMP leaves the sandbox; say so instead of letting pings hang.
                        frames::icmp_prohibited(self.link, self.cfg.gateway_ip, &repr, payload)
                    };
                    self.send_frame(f);
                }
            }
            _ => {}
        }
    }

    fn tcp_syn(&mut self, key: Key, frame: Vec<u8>, seq: u32) {
        if let Some(flow) = self.tcp.get(&key) {
            if flow.syn.is_none() {
                self.dev.rx.push_back(frame); // a retransmitted SYN for a socket in SynReceived
            }
            return;
        }
        let (guest, dst) = key;
        let refuse = |s: &mut Stack, why: &Denial| {
            s.log_refusal(format_args!("tcp {guest} -> {dst} refused: {why}"));
            let f = frames::tcp_rst_for_syn(s.link, guest, dst, seq, 0);
            s.send_frame(f);
        };
        let target = Target {
            visible: dst,
            real: SocketAddr::new(self.real(*dst.ip()), dst.port()),
        };
        if self.tcp.len() >= self.cfg.limits.max_tcp {
            return refuse(self, &Denial::TooManyConnections);
        }
        // An address synthetic DNS made up: the host resolves the name it stands for and the
        // flow goes there (the policy judges the real address, as for any other flow).
        let synthetic = self
            .cfg
            .dns
            .is_synthetic(*dst.ip())
            .then(|| self.cfg.dns.clone());
        if let Some(proxy) = self.cfg.intercept.clone() {
            // The proxy decides per request (and answers refusals in HTTP), so the handshake is
            // completed locally; the flow's far end is the proxy.
            let (ours, theirs) = tokio::io::duplex(256 * 1024);
            tokio::spawn(async move {
                let target = match synthetic {
                    // A failed resolution leaves the made-up address, which the policy blocks:
                    // the guest gets the proxy's refusal.
                    Some(dns) => dns
                        .real_target(target)
                        .await
                        .inspect_err(|e| tracing::info!("tcp -> {}: {e}", target.visible))
                        .unwrap_or(target),
                    None => target,
                };
                proxy.serve(theirs, target).await
            });
            self.tcp
                .insert(key, TcpFlow::connecting(frame, seq, Vec::new()));
            self.tcp_connected(key, ours);
            return;
        }
        let decision = match synthetic {
            Some(dns) => TcpDecision::AfterLookup(dns),
            None => match self.cfg.policy.tcp(target) {
                Ok(a) => TcpDecision::Made(a),
                Err(denial) => return refuse(self, &denial),
            },
        };
        let events = self.events.clone();
        let timeout = self.cfg.limits.connect_timeout;
        let policy = self.cfg.policy.clone();
        let task = tokio::spawn(async move {
            let allowed = match decision {
                TcpDecision::Made(a) => Ok(a),
                TcpDecision::AfterLookup(dns) => dns
                    .real_target(target)
                    .await
                    .and_then(|t| policy.tcp(t).map_err(|d| d.to_string())),
            };
            let e = match allowed {
                Ok(allowed) => match crate::connect::tcp(&allowed, timeout).await {
                    Ok(s) => Event::Connected(key, s),
                    Err(e) => Event::ConnectFailed(key, e.to_string()),
                },
                Err(why) => Event::ConnectFailed(key, why),
            };
            let _ = events.send(e).await;
        });
        self.tcp
            .insert(key, TcpFlow::connecting(frame, seq, vec![task]));
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Connected(key, stream) => self.tcp_connected(key, stream),
            Event::ConnectFailed(key, why) => {
                if let Some(flow) = self.tcp.remove(&key) {
                    if let Some((_, seq)) = flow.syn {
                        self.log_refusal(format_args!("tcp {} -> {} failed: {why}", key.0, key.1));
                        let f = frames::tcp_rst_for_syn(self.link, key.0, key.1, seq, 0);
                        self.send_frame(f);
                    }
                }
            }
            Event::HostWriteFailed(key) => {
                if let Some(flow) = self.tcp.get_mut(&key) {
                    flow.linger();
                }
            }
            Event::Udp(from, to, data) => {
                // Replies keep a flow alive too (a download over UDP sends little upstream).
                if let Some(flow) = self.udp.get_mut(&(to, from)) {
                    flow.last_active = Instant::now();
                }
                if data.len() + 28 <= self.cfg.mtu as usize {
                    let f = frames::udp(self.link, from, to, &data);
                    self.send_frame(f);
                }
            }
        }
    }

    /// The flow's far end (a host connection, or the interception proxy) is ready: create the
    /// guest-side socket and relay between the two.
    fn tcp_connected<S>(&mut self, key: Key, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let Some(flow) = self.tcp.get_mut(&key) else {
            return;
        };
        let Some((syn, _)) = flow.syn.take() else {
            return;
        };
        let size = self.cfg.limits.tcp_buffer;
        let mut sock = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; size]),
            tcp::SocketBuffer::new(vec![0u8; size]),
        );
        sock.set_nagle_enabled(false);
        let (_, dst) = key;
        if sock
            .listen(IpListenEndpoint {
                addr: Some(IpAddress::Ipv4(*dst.ip())),
                port: dst.port(),
            })
            .is_err()
        {
            self.tcp.remove(&key);
            return;
        }
        let handle = self.sockets.add(sock);
        let (mut hrd, mut hwr) = tokio::io::split(stream);
        let (to_host_tx, mut to_host_rx) = mpsc::channel::<Vec<u8>>(4);
        let (from_host_tx, from_host_rx) = mpsc::channel::<Vec<u8>>(4);
        let wake = self.wake.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match hrd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if from_host_tx.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                        wake.notify_one();
                    }
                }
            }
            drop(from_host_tx);
            wake.notify_one();
        });
        let wake = self.wake.clone();
        let events = self.events.clone();
        let writer = tokio::spawn(async move {
            while let Some(chunk) = to_host_rx.recv().await {
                if hwr.write_all(&chunk).await.is_err() {
                    let _ = events.send(Event::HostWriteFailed(key)).await;
                    return;
                }
                wake.notify_one();
            }
            // The guest half-closed: pass the FIN on.
            let _ = hwr.shutdown().await;
        });
        flow.handle = Some(handle);
        flow.to_host = Some(to_host_tx);
        flow.from_host = Some(from_host_rx);
        flow.tasks.push(reader);
        flow.tasks.push(writer);
        flow.last_active = Instant::now();
        // Replay the SYN now, while this is the only socket listening on the destination, so the
        // handshake lands in this flow's socket and no other.
        self.dev.rx.push_back(syn);
        let now = self.now();
        self.iface.poll(now, &mut self.dev, &mut self.sockets);
    }

    fn udp_out(
        &mut self,
        src: SocketAddrV4,
        dst: SocketAddrV4,
        data: Vec<u8>,
        repr: &Ipv4Repr,
        ip_payload: Vec<u8>,
    ) {
        // A query to another server than the gateway: answered here too, unless the DNS mode
        // relays it (the reply comes from the address the guest asked).
        let ours = *dst.ip() == self.cfg.gateway_ip;
        let answer_here = dst.port() == 53 && (ours || self.cfg.dns.mode != DnsMode::Open);
        if ours || answer_here {
            if answer_here {
                // Bounded: a guest flooding queries gets drops, not thousands of host sockets.
                let Ok(permit) = self.dns_slots.clone().try_acquire_owned() else {
                    return;
                };
                let dns = self.cfg.dns.clone();
                let events = self.events.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(answer) = dns.answer(&data).await {
                        let _ = events.send(Event::Udp(dst, src, answer)).await;
                    }
                });
            }
            return;
        }
        let target = Target {
            visible: dst,
            real: SocketAddr::new(self.real(*dst.ip()), dst.port()),
        };
        let decision = if self.cfg.dns.is_synthetic(*dst.ip()) {
            // Only TCP is mapped back to a name.
            Err("UDP to a synthetic DNS address is not relayed".to_string())
        } else if dst.port() == 53 && self.cfg.dns.mode == DnsMode::Open {
            // The mode opens port 53 to resolvers, not to any protocol.
            match crate::dns::is_query(&data) {
                true => self.cfg.policy.dns_query(target).map_err(|d| d.to_string()),
                false => Err("not a DNS query (open DNS mode relays only those)".to_string()),
            }
        } else {
            self.cfg.policy.udp(target).map_err(|d| d.to_string())
        };
        let allowed = match decision {
            Ok(a) => a,
            Err(why) => {
                self.log_refusal(format_args!("udp {src} -> {dst} refused: {why}"));
                let f = frames::icmp_prohibited(self.link, self.cfg.gateway_ip, repr, &ip_payload);
                self.send_frame(f);
                return;
            }
        };
        let key = (src, dst);
        if let Some(flow) = self.udp.get_mut(&key) {
            flow.last_active = Instant::now();
            let _ = flow.sock.send(&data);
            return;
        }
        if self.udp.len() >= self.cfg.limits.max_udp {
            return;
        }
        let Ok((sock, rsock)) = crate::connect::udp(&allowed) else {
            return;
        };
        let _ = sock.send(&data);
        let events = self.events.clone();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok(n) = rsock.recv(&mut buf).await {
                if events
                    .send(Event::Udp(dst, src, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        self.udp.insert(
            key,
            UdpFlow {
                sock,
                last_active: Instant::now(),
                task,
            },
        );
    }

    /// Moves data between the sockets and the host connections, polls smoltcp, and retires
    /// finished or idle flows.
    fn turn(&mut self) {
        self.pump();
        // smoltcp emits at most one segment per socket per poll: keep polling (and refilling the
        // sockets) while that produces frames, up to a bound so other work is not starved.
        for _ in 0..1024 {
            let before = self.dev.tx.len();
            let now = self.now();
            self.iface.poll(now, &mut self.dev, &mut self.sockets);
            self.pump();
            if self.dev.tx.len() == before && self.dev.rx.is_empty() {
                break;
            }
        }
        self.retire();
    }

    fn pump(&mut self) {
        for (_, flow) in self.tcp.iter_mut() {
            let Some(h) = flow.handle else { continue };
            let sock = self.sockets.get_mut::<tcp::Socket>(h);
            let mut active = false;
            // Host -> guest.
            loop {
                if flow.pending_off < flow.pending.len() {
                    if !sock.can_send() {
                        break;
                    }
                    match sock.send_slice(&flow.pending[flow.pending_off..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            flow.pending_off += n;
                            active = true;
                        }
                    }
                    continue;
                }
                let Some(rx) = flow.from_host.as_mut() else {
                    break;
                };
                match rx.try_recv() {
                    Ok(chunk) => {
                        flow.pending = chunk;
                        flow.pending_off = 0;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        flow.from_host = None;
                        flow.host_eof = true;
                        break;
                    }
                }
            }
            if flow.host_eof && flow.pending_off >= flow.pending.len() && !flow.close_sent {
                sock.close();
                flow.close_sent = true;
            }
            // Guest -> host.
            let mut host_gone = false;
            if let Some(tx) = flow.to_host.as_ref() {
                while sock.can_recv() {
                    match tx.try_reserve() {
                        Ok(permit) => {
                            let data = sock.recv(|b| (b.len(), b.to_vec())).unwrap_or_default();
                            active = true;
                            permit.send(data);
                        }
                        Err(mpsc::error::TrySendError::Full(())) => break,
                        Err(mpsc::error::TrySendError::Closed(())) => {
                            host_gone = true;
                            break;
                        }
                    }
                }
                if !sock.may_recv() && !sock.can_recv() && sock.state() != tcp::State::SynReceived {
                    flow.to_host = None;
                }
            }
            if host_gone {
                flow.linger();
            }
            if flow.lingering.is_some() {
                while sock.can_recv() {
                    if sock.recv(|b| (b.len(), ())).is_err() {
                        break;
                    }
                }
            }
            if active {
                flow.last_active = Instant::now();
            }
        }
    }

    fn retire(&mut self) {
        let idle = self.cfg.limits.tcp_idle;
        let mut done = Vec::new();
        for (key, flow) in self.tcp.iter_mut() {
            let Some(h) = flow.handle else {
                continue;
            };
            let sock = self.sockets.get_mut::<tcp::Socket>(h);
            let lingered = flow.lingering.is_some_and(|t| t.elapsed() > LINGER);
            if flow.last_active.elapsed() > idle || lingered {
                sock.abort();
            }
            let state = sock.state();
            let finished = matches!(state, tcp::State::Closed | tcp::State::TimeWait)
                || (state == tcp::State::Listen
                    && flow.last_active.elapsed() > Duration::from_secs(5));
            if finished {
                done.push(*key);
            }
        }
        for key in done {
            if let Some(flow) = self.tcp.remove(&key) {
                if let Some(h) = flow.handle {
                    self.sockets.remove(h);
                }
            }
        }
        let udp_idle = self.cfg.limits.udp_idle;
        self.udp.retain(|_, f| f.last_active.elapsed() < udp_idle);
    }
}
