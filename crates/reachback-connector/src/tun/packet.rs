//! IP packets of the TUN device taken apart and made, without I/O: what a packet
//! read from the device is (a TCP segment or a UDP datagram between a server and a
//! virtual address, or something dropped and why), the TCP reset that refuses a
//! connect, and the UDP datagram that carries a reply back to a server.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr};

/// The hop limit of the packets made here (the kernel's default for TCP and UDP).
const HOP_LIMIT: u8 = 64;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

/// One TCP connection as the TUN device sees it: the server's address and port
/// (`source`) and the virtual address and port it connects to (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// The TCP header fields that decide what happens to a segment before the stack sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub key: FlowKey,
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    pub ack_number: u32,
    pub payload_len: usize,
}

impl Segment {
    /// A connection attempt: SYN alone (a SYN with ACK, RST or FIN is no new connection).
    pub fn is_connect(&self) -> bool {
        self.syn && !self.ack && !self.rst && !self.fin
    }
}

/// What a packet read from the device is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed<'a> {
    Tcp(Segment),
    Udp { source: SocketAddr, destination: SocketAddr, payload: &'a [u8] },
}

/// Why a packet was dropped before any flow saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// too short, inconsistent lengths, a bad header or transport checksum, a bad address
    Malformed,
    /// neither TCP nor UDP (ICMP, extension headers, …)
    Protocol,
    /// an IPv4 fragment (servers send whole segments: their path MTU is the device's or smaller)
    Fragment,
    /// addressed outside the virtual ranges
    OutsideRanges,
}

/// Takes a packet apart. TCP checksums are checked only for connection attempts
/// here (a SYN opens a flow over the tunnel, so a corrupt one must not); the stack
/// checks every other segment's. UDP checksums are always checked.
pub fn parse(packet: &[u8]) -> Result<Parsed<'_>, Dropped> {
    let Some(&first) = packet.first() else { return Err(Dropped::Malformed) };
    let (source, destination, protocol, payload) = match first >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).map_err(|_| Dropped::Malformed)?;
            if !ip.verify_checksum() {
                return Err(Dropped::Malformed);
            }
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Err(Dropped::Fragment);
            }
            (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()), ip.next_header(), ip.payload())
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).map_err(|_| Dropped::Malformed)?;
            (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()), ip.next_header(), ip.payload())
        }
        _ => return Err(Dropped::Malformed),
    };
    // the host's own multicast on the device (IPv6 router solicitations, MLD reports) is for no virtual address
    if !is_unicast(destination) {
        return Err(Dropped::OutsideRanges);
    }
    if !is_unicast(source) {
        return Err(Dropped::Malformed);
    }
    let (source_ip, destination_ip) = (IpAddress::from(source), IpAddress::from(destination));
    match protocol {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(payload).map_err(|_| Dropped::Malformed)?;
            let segment = Segment {
                key: FlowKey { source: SocketAddr::new(source, tcp.src_port()), destination: SocketAddr::new(destination, tcp.dst_port()) },
                syn: tcp.syn(),
                ack: tcp.ack(),
                rst: tcp.rst(),
                fin: tcp.fin(),
                seq: tcp.seq_number().0 as u32,
                ack_number: tcp.ack_number().0 as u32,
                payload_len: tcp.payload().len(),
            };
            if tcp.src_port() == 0 || tcp.dst_port() == 0 {
                return Err(Dropped::Malformed);
            }
            if segment.is_connect() && !tcp.verify_checksum(&source_ip, &destination_ip) {
                return Err(Dropped::Malformed);
            }
            Ok(Parsed::Tcp(segment))
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(payload).map_err(|_| Dropped::Malformed)?;
            // IPv6 has no "no checksum" (RFC 8200 8.1); smoltcp accepts 0 for both families
            let checksum_missing = udp.checksum() == 0 && source.is_ipv6();
            if checksum_missing || !udp.verify_checksum(&source_ip, &destination_ip) || udp.src_port() == 0 || udp.dst_port() == 0 {
                return Err(Dropped::Malformed);
            }
            Ok(Parsed::Udp {
                source: SocketAddr::new(source, udp.src_port()),
                destination: SocketAddr::new(destination, udp.dst_port()),
                payload: udp.payload(),
            })
        }
        _ => Err(Dropped::Protocol),
    }
}

fn is_unicast(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// The reset that answers `segment` as a host without that connection would
/// (RFC 9293 3.10.7.1): to a segment with ACK, `RST` with its acknowledgment
/// number as sequence number; otherwise (a SYN) `RST+ACK` acknowledging it, which
/// the server's connect reports as "connection refused". Appended to `out`;
/// nothing for a reset (a reset is never answered).
pub fn reset_reply(segment: &Segment, out: &mut Vec<u8>) {
    if segment.rst {
        return;
    }
    let (seq, ack) = if segment.ack {
        (segment.ack_number, None)
    } else {
        let length = segment.payload_len as u32 + u32::from(segment.syn) + u32::from(segment.fin);
        (0, Some(segment.seq.wrapping_add(length)))
    };
    let tcp = TcpRepr {
        src_port: segment.key.destination.port(),
        dst_port: segment.key.source.port(),
        control: TcpControl::Rst,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|ack| TcpSeqNumber(ack as i32)),
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let _ = emit(segment.key.destination.ip(), segment.key.source.ip(), IpProtocol::Tcp, TCP_HEADER, out, |buffer, source, destination| {
        let mut packet = TcpPacket::new_unchecked(buffer);
        tcp.emit(&mut packet, source, destination, &ChecksumCapabilities::default());
    });
}

/// Why a UDP reply could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// `from` and `to` are not of one family
    Families,
    /// the datagram would not fit in one IP packet of the device's MTU
    TooLarge,
}

/// The IPv4 or IPv6 packet that carries a UDP datagram from `from` (a virtual
/// address and port) to `to` (a server), checksums filled in; appended to `out`.
/// `mtu` is the largest packet allowed (the device's MTU).
pub fn udp_reply(from: SocketAddr, to: SocketAddr, payload: &[u8], mtu: usize, out: &mut Vec<u8>) -> Result<(), BuildError> {
    if from.is_ipv4() != to.is_ipv4() {
        return Err(BuildError::Families);
    }
    let header = if from.is_ipv4() { IPV4_HEADER } else { IPV6_HEADER };
    let length = UDP_HEADER + payload.len();
    if header + length > mtu || length > usize::from(u16::MAX) {
        return Err(BuildError::TooLarge);
    }
    let udp = UdpRepr { src_port: from.port(), dst_port: to.port() };
    let start = out.len();
    emit(from.ip(), to.ip(), IpProtocol::Udp, length, out, |buffer, source, destination| {
        let mut packet = UdpPacket::new_unchecked(buffer);
        udp.emit(&mut packet, source, destination, payload.len(), |space| space.copy_from_slice(payload), &ChecksumCapabilities::default());
    })?;
    if from.is_ipv4() {
        // a datagram larger than the way back may be fragmented by a router, as the server's own would be
        let mut packet = Ipv4Packet::new_unchecked(&mut out[start..]);
        packet.set_dont_frag(false);
        packet.fill_checksum();
    }
    Ok(())
}

/// Writes an IP header for `payload_len` bytes of `protocol` and lets `fill` write
/// the payload (with its checksum over the pseudo-header). The families were checked.
fn emit(
    source: IpAddr,
    destination: IpAddr,
    protocol: IpProtocol,
    payload_len: usize,
    out: &mut Vec<u8>,
    fill: impl FnOnce(&mut [u8], &IpAddress, &IpAddress),
) -> Result<(), BuildError> {
    let start = out.len();
    match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            out.resize(start + IPV4_HEADER + payload_len, 0);
            let repr = Ipv4Repr { src_addr: source, dst_addr: destination, next_header: protocol, payload_len, hop_limit: HOP_LIMIT };
            let mut packet = Ipv4Packet::new_unchecked(&mut out[start..]);
            repr.emit(&mut packet, &ChecksumCapabilities::default());
            fill(&mut out[start + IPV4_HEADER..], &IpAddress::Ipv4(source), &IpAddress::Ipv4(destination));
            Ok(())
        }
        (IpAddr::V6(source), IpAddr::V6(destination)) => {
            out.resize(start + IPV6_HEADER + payload_len, 0);
            let repr = Ipv6Repr { src_addr: source, dst_addr: destination, next_header: protocol, payload_len, hop_limit: HOP_LIMIT };
            let mut packet = Ipv6Packet::new_unchecked(&mut out[start..]);
            repr.emit(&mut packet);
            fill(&mut out[start + IPV6_HEADER..], &IpAddress::Ipv6(source), &IpAddress::Ipv6(destination));
            Ok(())
        }
        _ => Err(BuildError::Families),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A TCP segment from `source` to `destination` as a server's kernel would send it.
    pub(crate) fn tcp_packet(source: SocketAddr, destination: SocketAddr, control: TcpControl, seq: u32, ack: Option<u32>, payload: &[u8]) -> Vec<u8> {
        let tcp = TcpRepr {
            src_port: source.port(),
            dst_port: destination.port(),
            control,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|ack| TcpSeqNumber(ack as i32)),
            window_len: 64240,
            window_scale: (control == TcpControl::Syn).then_some(7),
            max_seg_size: (control == TcpControl::Syn).then_some(1460),
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload,
        };
        let mut out = Vec::new();
        emit(source.ip(), destination.ip(), IpProtocol::Tcp, tcp.buffer_len(), &mut out, |buffer, source, destination| {
            tcp.emit(&mut TcpPacket::new_unchecked(buffer), source, destination, &ChecksumCapabilities::default());
        })
        .expect("one family");
        out
    }

    pub(crate) fn server() -> SocketAddr {
        "10.77.1.1:40000".parse().expect("address")
    }

    pub(crate) fn laptop() -> SocketAddr {
        "100.64.0.1:8000".parse().expect("address")
    }

    fn segment(packet: &[u8]) -> Segment {
        match parse(packet) {
            Ok(Parsed::Tcp(segment)) => segment,
            other => panic!("not a TCP segment: {other:?}"),
        }
    }

    #[test]
    fn a_syn_alone_is_a_connect_and_nothing_else_is() {
        let syn = segment(&tcp_packet(server(), laptop(), TcpControl::Syn, 1000, None, &[]));
        assert!(syn.is_connect());
        assert_eq!(syn.key, FlowKey { source: server(), destination: laptop() });
        assert_eq!(syn.seq, 1000);
        let syn_ack = segment(&tcp_packet(server(), laptop(), TcpControl::Syn, 1000, Some(5), &[]));
        assert!(syn_ack.syn && syn_ack.ack && !syn_ack.is_connect(), "a SYN+ACK is no connect");
        for control in [TcpControl::None, TcpControl::Fin, TcpControl::Rst, TcpControl::Psh] {
            assert!(!segment(&tcp_packet(server(), laptop(), control, 1, Some(1), b"x")).is_connect(), "{control:?}");
        }
        let v6 = segment(&tcp_packet("[fd00::1]:5000".parse().expect("v6"), "[fd7a:115c:a1e0::1]:22".parse().expect("v6"), TcpControl::Syn, 7, None, &[]));
        assert!(v6.is_connect());
        assert_eq!(v6.key.destination.port(), 22);
    }

    #[test]
    fn corrupt_or_foreign_packets_are_dropped_with_a_reason() {
        let syn = tcp_packet(server(), laptop(), TcpControl::Syn, 1000, None, &[]);
        assert_eq!(parse(&[]), Err(Dropped::Malformed));
        assert_eq!(parse(&syn[..19]), Err(Dropped::Malformed), "a cut header");
        assert_eq!(parse(&syn[..30]), Err(Dropped::Malformed), "a cut segment");
        let mut bad_tcp_checksum = syn.clone();
        let last = bad_tcp_checksum.len() - 1;
        bad_tcp_checksum[last] ^= 0x40;
        assert_eq!(parse(&bad_tcp_checksum), Err(Dropped::Malformed), "a SYN whose checksum is wrong opens nothing");
        let mut bad_ip_checksum = syn.clone();
        bad_ip_checksum[8] ^= 1; // TTL, under the header checksum
        assert_eq!(parse(&bad_ip_checksum), Err(Dropped::Malformed));
        let mut version = syn.clone();
        version[0] = 0x55;
        assert_eq!(parse(&version), Err(Dropped::Malformed));
        let mut icmp = syn.clone();
        icmp[9] = 1;
        Ipv4Packet::new_unchecked(&mut icmp[..]).fill_checksum();
        assert_eq!(parse(&icmp), Err(Dropped::Protocol));
        let mut fragment = syn.clone();
        Ipv4Packet::new_unchecked(&mut fragment[..]).set_more_frags(true);
        Ipv4Packet::new_unchecked(&mut fragment[..]).fill_checksum();
        assert_eq!(parse(&fragment), Err(Dropped::Fragment));
        // every truncation and every one-byte corruption is dropped or parsed, never a panic
        for length in 0..syn.len() {
            let _ = parse(&syn[..length]);
        }
        for index in 0..syn.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut corrupt = syn.clone();
                corrupt[index] ^= flip;
                let _ = parse(&corrupt);
            }
        }
    }

    #[test]
    fn a_refused_syn_is_answered_with_rst_ack_that_acknowledges_it() {
        let syn = segment(&tcp_packet(server(), laptop(), TcpControl::Syn, 0xffff_fff0, None, &[]));
        let mut out = Vec::new();
        reset_reply(&syn, &mut out);
        let ip = Ipv4Packet::new_checked(&out[..]).expect("IPv4");
        assert!(ip.verify_checksum());
        assert_eq!((ip.src_addr(), ip.dst_addr()), ("100.64.0.1".parse().expect("v4"), "10.77.1.1".parse().expect("v4")));
        let tcp = TcpPacket::new_checked(ip.payload()).expect("TCP");
        assert!(tcp.verify_checksum(&IpAddress::from(laptop().ip()), &IpAddress::from(server().ip())));
        assert!(tcp.rst() && tcp.ack() && !tcp.syn());
        assert_eq!((tcp.src_port(), tcp.dst_port()), (8000, 40000));
        assert_eq!(tcp.seq_number().0, 0);
        assert_eq!(tcp.ack_number().0 as u32, 0xffff_fff1, "the SYN counts one, wrapping");
        // a stray segment with ACK gets a bare RST with its acknowledgment number as sequence
        let stray = segment(&tcp_packet(server(), laptop(), TcpControl::Psh, 50, Some(777), b"abc"));
        let mut out = Vec::new();
        reset_reply(&stray, &mut out);
        let tcp = TcpPacket::new_checked(Ipv4Packet::new_checked(&out[..]).expect("IPv4").payload()).expect("TCP");
        assert!(tcp.rst() && !tcp.ack());
        assert_eq!(tcp.seq_number().0, 777);
        // a reset is never answered
        let reset = segment(&tcp_packet(server(), laptop(), TcpControl::Rst, 50, None, &[]));
        let mut out = Vec::new();
        reset_reply(&reset, &mut out);
        assert!(out.is_empty());
        // IPv6
        let v6 = segment(&tcp_packet("[fd00::1]:5000".parse().expect("v6"), "[fd7a::1]:22".parse().expect("v6"), TcpControl::Syn, 9, None, &[]));
        let mut out = Vec::new();
        reset_reply(&v6, &mut out);
        let ip = Ipv6Packet::new_checked(&out[..]).expect("IPv6");
        let tcp = TcpPacket::new_checked(ip.payload()).expect("TCP");
        assert!(tcp.verify_checksum(&IpAddress::from(ip.src_addr()), &IpAddress::from(ip.dst_addr())));
        assert!(tcp.rst() && tcp.ack());
        assert_eq!(tcp.ack_number().0, 10);
    }

    #[test]
    fn udp_replies_carry_the_payload_with_correct_checksums_and_parse_back() {
        for (from, to) in [("100.64.0.1:53", "10.77.1.1:5353"), ("[fd7a:115c:a1e0::1]:53", "[fd00:77:1::1]:5353")] {
            let (from, to): (SocketAddr, SocketAddr) = (from.parse().expect("from"), to.parse().expect("to"));
            let mut out = vec![0xaa]; // appended after what is there
            udp_reply(from, to, b"an answer", 1500, &mut out).expect("built");
            let packet = &out[1..];
            // parsed as a server's datagram would be: addresses, ports, payload, and both checksums hold
            assert_eq!(parse(packet), Ok(Parsed::Udp { source: from, destination: to, payload: b"an answer" }));
            let header = if from.is_ipv4() { IPV4_HEADER } else { IPV6_HEADER };
            assert_eq!(packet.len(), header + UDP_HEADER + 9);
            let udp = UdpPacket::new_checked(&packet[header..]).expect("UDP");
            assert_ne!(udp.checksum(), 0, "the checksum is filled in");
            if from.is_ipv4() {
                assert!(!Ipv4Packet::new_checked(packet).expect("IPv4").dont_frag(), "UDP may be fragmented on the way");
            }
            let mut corrupt = packet.to_vec();
            let last = corrupt.len() - 1;
            corrupt[last] ^= 1;
            assert_eq!(parse(&corrupt), Err(Dropped::Malformed), "a payload that changed fails the checksum");
        }
        let mut out = Vec::new();
        let v4: SocketAddr = "100.64.0.1:53".parse().expect("v4");
        let v6: SocketAddr = "[fd00::1]:53".parse().expect("v6");
        assert_eq!(udp_reply(v4, v6, b"x", 1500, &mut out), Err(BuildError::Families));
        assert_eq!(udp_reply(v4, "10.0.0.1:1".parse().expect("v4"), &[0; 1473], 1500, &mut out), Err(BuildError::TooLarge));
        assert!(out.is_empty(), "nothing is written for a refused datagram");
        udp_reply(v4, "10.0.0.1:1".parse().expect("v4"), &[0; 1472], 1500, &mut out).expect("exactly the MTU");
        assert_eq!(out.len(), 1500);
    }
}
