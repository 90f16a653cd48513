//! Building the few frames the stack writes itself (UDP replies, ICMP, TCP resets), with smoltcp's
//! wire types; TCP data goes through smoltcp's sockets instead.

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4DstUnreachable,
    Icmpv4Packet, Icmpv4Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket,
    TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};
use std::net::{Ipv4Addr, SocketAddrV4};

/// The two MACs of the link: ours (the gateway) and the guest's.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// The stack's MAC.
    pub gateway: EthernetAddress,
    /// The guest NIC's MAC.
    pub guest: EthernetAddress,
}

fn ipv4_frame(
    link: Link,
    ip: Ipv4Repr,
    emit: impl FnOnce(&mut [u8], &ChecksumCapabilities),
) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: link.gateway,
        dst_addr: link.guest,
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + ip.payload_len];
    let caps = ChecksumCapabilities::default();
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth.emit(&mut frame);
    let mut pkt = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut pkt, &caps);
    emit(pkt.payload_mut(), &caps);
    buf
}

/// A UDP datagram from `src` to the guest's `dst`.
pub fn udp(link: Link, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: src.port(),
        dst_port: dst.port(),
    };
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp.header_len() + payload.len(),
        hop_limit: 64,
    };
    ipv4_frame(link, ip, |buf, caps| {
        let mut p = UdpPacket::new_unchecked(buf);
        udp.emit(
            &mut p,
            &IpAddress::Ipv4(*src.ip()),
            &IpAddress::Ipv4(*dst.ip()),
            payload.len(),
            |b| b.copy_from_slice(payload),
            caps,
        );
    })
}

/// A reset answering the guest's SYN from `guest` to `remote` (connection refused).
pub fn tcp_rst_for_syn(
    link: Link,
    guest: SocketAddrV4,
    remote: SocketAddrV4,
    syn_seq: u32,
    syn_len: usize,
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: remote.port(),
        dst_port: guest.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(0),
        ack_number: Some(TcpSeqNumber(
            syn_seq.wrapping_add(1).wrapping_add(syn_len as u32) as i32,
        )),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None, None, None],
        timestamp: None,
        payload: &[],
    };
    let ip = Ipv4Repr {
        src_addr: *remote.ip(),
        dst_addr: *guest.ip(),
        next_header: IpProtocol::Tcp,
        payload_len: tcp.header_len(),
        hop_limit: 64,
    };
    ipv4_frame(link, ip, |buf, caps| {
        let mut p = TcpPacket::new_unchecked(buf);
        tcp.emit(
            &mut p,
            &IpAddress::Ipv4(*remote.ip()),
            &IpAddress::Ipv4(*guest.ip()),
            caps,
        );
    })
}

/// An ICMP echo reply from `from` to the guest.
pub fn icmp_echo_reply(
    link: Link,
    from: Ipv4Addr,
    guest: Ipv4Addr,
    ident: u16,
    seq_no: u16,
    data: &[u8],
) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoReply {
        ident,
        seq_no,
        data,
    };
    let ip = Ipv4Repr {
        src_addr: from,
        dst_addr: guest,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    ipv4_frame(link, ip, |buf, caps| {
        icmp.emit(&mut Icmpv4Packet::new_unchecked(buf), caps)
    })
}

/// "Communication administratively prohibited" about the guest's packet `original` (its IPv4
/// header and the first 8 bytes of its payload are quoted, as RFC 792 asks).
pub fn icmp_prohibited(
    link: Link,
    from: Ipv4Addr,
    original: &Ipv4Repr,
    original_payload: &[u8],
) -> Vec<u8> {
    let data = &original_payload[..original_payload.len().min(8)];
    let icmp = Icmpv4Repr::DstUnreachable {
        reason: Icmpv4DstUnreachable::CommProhibited,
        header: *original,
        data,
    };
    let ip = Ipv4Repr {
        src_addr: from,
        dst_addr: original.src_addr,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    ipv4_frame(link, ip, |buf, caps| {
        icmp.emit(&mut Icmpv4Packet::new_unchecked(buf), caps)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINK: Link = Link {
        gateway: EthernetAddress([2, 0, 0, 0, 0, 1]),
        guest: EthernetAddress([2, 0, 0, 0, 0, 2]),
    };

    #[test]
    fn udp_frames_parse_back_with_valid_checksums() {
        let src = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 1), 53);
        let dst = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 2), 40000);
        let f = udp(LINK, src, dst, b"answer");
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        assert_eq!(eth.dst_addr(), LINK.guest);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let u = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(u.verify_checksum(&IpAddress::Ipv4(*src.ip()), &IpAddress::Ipv4(*dst.ip())));
        assert_eq!(u.payload(), b"answer");
    }

    #[test]
    fn resets_acknowledge_the_syn() {
        let guest = SocketAddrV4::new(Ipv4Addr::new(192, 168, 127, 2), 40000);
        let remote = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 80);
        let f = tcp_rst_for_syn(LINK, guest, remote, 1000, 0);
        let eth = EthernetFrame::new_checked(&f[..]).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        assert!(t.rst() && t.ack());
        assert_eq!(t.ack_number(), TcpSeqNumber(1001));
        assert!(t.verify_checksum(
            &IpAddress::Ipv4(*remote.ip()),
            &IpAddress::Ipv4(*guest.ip())
        ));
    }
}
