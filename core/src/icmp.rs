//! ICMP "too big" answers for tunnel packets the session's path cannot carry, sans-IO.
//!
//! A QUIC path carries one session packet per datagram, and its datagrams are smaller
//! than a UDP path's: with a tunnel MTU above what the path takes (1 402 over IPv4, 1 382
//! over IPv6 on a 1 500-byte link), a full-size packet cannot leave. Dropping it
//! silently stalls every TCP connection through the tunnel, whose segments are all full
//! size. So the tunnel does what a router on the path would: it answers the sender with
//! ICMP "fragmentation needed" (IPv4, RFC 792 / RFC 1191) or ICMPv6 "packet too big"
//! (RFC 4443, RFC 8201) naming the size the path carries, written into the TUN device;
//! the sender's stack lowers its path MTU to the destination and sends again, smaller.
//!
//! The answer appears to come from the packet's destination: the tunnel has no address
//! of its own on every path, and the sending host takes an ICMP error from any source
//! that quotes one of its connections. A source behind the TUN also passes the kernel's
//! reverse-path check, where the host's own address (the gateway's tunnel address, when
//! the gateway is the sender) would be dropped as a martian.
//!
//! Some packets get no answer, as RFC 1812 (section 4.3.2.7) and RFC 4443 (section 2.4)
//! say: ICMP errors (never an error about an error), IPv4 fragments other than the
//! first, packets from an address that names no single host (unspecified, loopback,
//! multicast, broadcast, IPv4's reserved 240/4), and anything that is not a well-formed
//! IP packet. Packets to a multicast address get none either, although RFC 4443 asks
//! for a "packet too big" there: the answer's source would be that group, which no
//! packet may carry. An IPv4 packet without "don't fragment" may be fragmented on its
//! way, which the tunnel does not do: it gets no answer, and is dropped. Nor does an IPv6
//! packet when the room is below IPv6's minimum MTU (1 280): RFC 8201 has the sender keep
//! sending 1 280-byte packets whatever the answer says, so it would change nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::offload::{internet_checksum, internet_checksum_of};

/// An IPv4 ICMP error is at most this long, the quoted packet included (RFC 1812).
const IPV4_ERROR_MAX: usize = 576;
/// An ICMPv6 error is at most this long, the quoted packet included: IPv6's minimum MTU
/// (RFC 4443).
const IPV6_ERROR_MAX: usize = 1_280;
/// TTL / hop limit of an answer.
const HOP_LIMIT: u8 = 64;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
/// ICMP type "destination unreachable", code "fragmentation needed and DF set".
const ICMP_UNREACHABLE: u8 = 3;
const ICMP_FRAGMENTATION_NEEDED: u8 = 4;
/// ICMPv6 type "packet too big".
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
/// IPv4 flags: don't fragment; the fragment offset's bits.
const IPV4_DONT_FRAGMENT: u16 = 0x4000;
const IPV4_OFFSET: u16 = 0x1fff;

/// Why a packet too big for the path gets no ICMP answer (it is dropped all the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum NoAnswer {
    /// Not an IPv4 or IPv6 packet whose lengths agree with its header.
    #[error("not a well-formed IP packet")]
    Malformed,
    /// An IPv4 packet without "don't fragment": routers may fragment it, which the
    /// tunnel does not do, and the sender expects no answer.
    #[error("IPv4 packet without don't-fragment")]
    MayFragment,
    /// An IPv4 fragment other than the first.
    #[error("IPv4 fragment other than the first")]
    LaterFragment,
    /// An ICMP or ICMPv6 error message.
    #[error("an ICMP error")]
    IcmpError,
    /// From or to an address that names no single host (see the module's doc).
    #[error("source or destination not unicast")]
    NotUnicast,
    /// An IPv6 packet, and a room below IPv6's minimum MTU (1 280): the sender would not
    /// go below 1 280 (RFC 8201), so an answer changes nothing.
    #[error("room below IPv6's minimum MTU")]
    BelowIpv6Minimum,
}

impl NoAnswer {
    /// A stable label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NoAnswer::Malformed => "malformed",
            NoAnswer::MayFragment => "may_fragment",
            NoAnswer::LaterFragment => "later_fragment",
            NoAnswer::IcmpError => "icmp_error",
            NoAnswer::NotUnicast => "not_unicast",
            NoAnswer::BelowIpv6Minimum => "below_ipv6_minimum",
        }
    }
}

/// Writes into `out` (emptied first) the ICMP answer to `packet`, which is larger than
/// the `mtu` bytes the path carries: an IPv4 "fragmentation needed" or an ICMPv6 "packet
/// too big" naming `mtu`, from the packet's destination to its source, quoting as much of
/// the packet as the answer's limit allows (576 bytes in all for IPv4, 1 280 for IPv6).
/// Whether the packet is in fact larger than `mtu` is the caller's to know.
pub fn too_big(packet: &[u8], mtu: u16, out: &mut Vec<u8>) -> Result<(), NoAnswer> {
    out.clear();
    match answerable(packet, mtu)? {
        Invoking::V4 {
            source,
            destination,
        } => build_v4(packet, source, destination, mtu, out),
        Invoking::V6 {
            source,
            destination,
        } => build_v6(packet, source, destination, mtu, out),
    }
    Ok(())
}

/// The addresses of a packet that gets an answer (see [`answerable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invoking {
    /// An IPv4 packet's source and destination.
    V4 {
        /// Its source.
        source: Ipv4Addr,
        /// Its destination.
        destination: Ipv4Addr,
    },
    /// An IPv6 packet's source and destination.
    V6 {
        /// Its source.
        source: Ipv6Addr,
        /// Its destination.
        destination: Ipv6Addr,
    },
}

/// Whether [`too_big`] answers `packet` for a room of `mtu` bytes, and if so the
/// addresses it answers between; checks only, builds nothing (a caller on a budget
/// checks before it spends).
pub fn answerable(packet: &[u8], mtu: u16) -> Result<Invoking, NoAnswer> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => answerable_v4(packet),
        Some(6) => answerable_v6(packet, mtu),
        _ => Err(NoAnswer::Malformed),
    }
}

fn answerable_v4(packet: &[u8]) -> Result<Invoking, NoAnswer> {
    let header_len = usize::from(packet[0] & 0x0f) * 4;
    let total = packet
        .get(2..4)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    if header_len < 20 || packet.len() < header_len || total != Some(packet.len()) {
        return Err(NoAnswer::Malformed);
    }
    let source = Ipv4Addr::from(octets::<4>(&packet[12..16]));
    let destination = Ipv4Addr::from(octets::<4>(&packet[16..20]));
    let fragment = u16::from_be_bytes([packet[6], packet[7]]);
    if fragment & IPV4_OFFSET != 0 {
        return Err(NoAnswer::LaterFragment);
    }
    if packet[9] == PROTO_ICMP {
        let kind = *packet.get(header_len).ok_or(NoAnswer::Malformed)?;
        if is_icmpv4_error(kind) {
            return Err(NoAnswer::IcmpError);
        }
    }
    if !unicast(IpAddr::V4(source)) || !unicast(IpAddr::V4(destination)) {
        return Err(NoAnswer::NotUnicast);
    }
    if fragment & IPV4_DONT_FRAGMENT == 0 {
        return Err(NoAnswer::MayFragment);
    }
    Ok(Invoking::V4 {
        source,
        destination,
    })
}

fn build_v4(packet: &[u8], source: Ipv4Addr, destination: Ipv4Addr, mtu: u16, out: &mut Vec<u8>) {
    let quote = &packet[..packet.len().min(IPV4_ERROR_MAX - 28)];
    let total = 28 + quote.len();
    out.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0, 0, HOP_LIMIT, PROTO_ICMP, 0, 0]);
    // Fits: at most 576.
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out.extend_from_slice(&destination.octets());
    out.extend_from_slice(&source.octets());
    let header_sum = internet_checksum(&out[..20]);
    out[10..12].copy_from_slice(&header_sum.to_be_bytes());
    out.extend_from_slice(&[ICMP_UNREACHABLE, ICMP_FRAGMENTATION_NEEDED, 0, 0, 0, 0]);
    out.extend_from_slice(&mtu.to_be_bytes());
    out.extend_from_slice(quote);
    let icmp_sum = internet_checksum(&out[20..]);
    out[22..24].copy_from_slice(&icmp_sum.to_be_bytes());
}

fn answerable_v6(packet: &[u8], mtu: u16) -> Result<Invoking, NoAnswer> {
    let payload = packet
        .get(4..6)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])));
    if packet.len() < 40 || payload.map(|p| p + 40) != Some(packet.len()) {
        return Err(NoAnswer::Malformed);
    }
    // Only an ICMPv6 message right after the fixed header is recognised as an error; one
    // behind extension headers is answered (RFC 4443 makes no such exception; an error
    // is at most 1 280 bytes, so only a room below that meets one).
    if packet[6] == PROTO_ICMPV6 {
        let kind = *packet.get(40).ok_or(NoAnswer::Malformed)?;
        if kind < 128 {
            return Err(NoAnswer::IcmpError);
        }
    }
    let source = Ipv6Addr::from(octets::<16>(&packet[8..24]));
    let destination = Ipv6Addr::from(octets::<16>(&packet[24..40]));
    if !unicast(IpAddr::V6(source)) || !unicast(IpAddr::V6(destination)) {
        return Err(NoAnswer::NotUnicast);
    }
    if usize::from(mtu) < IPV6_ERROR_MAX {
        return Err(NoAnswer::BelowIpv6Minimum);
    }
    Ok(Invoking::V6 {
        source,
        destination,
    })
}

fn build_v6(packet: &[u8], source: Ipv6Addr, destination: Ipv6Addr, mtu: u16, out: &mut Vec<u8>) {
    let quote = &packet[..packet.len().min(IPV6_ERROR_MAX - 48)];
    let length = (8 + quote.len()) as u16;
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&[PROTO_ICMPV6, HOP_LIMIT]);
    out.extend_from_slice(&destination.octets());
    out.extend_from_slice(&source.octets());
    out.extend_from_slice(&[ICMPV6_PACKET_TOO_BIG, 0, 0, 0]);
    out.extend_from_slice(&u32::from(mtu).to_be_bytes());
    out.extend_from_slice(quote);
    // The pseudo-header: both addresses, the message's length, its next header.
    let upper_length = u32::from(length).to_be_bytes();
    let sum = internet_checksum_of(&[
        &out[8..40],
        &upper_length,
        &[0, 0, 0, PROTO_ICMPV6],
        &out[40..],
    ]);
    out[42..44].copy_from_slice(&sum.to_be_bytes());
}

/// ICMP types that report an error about another packet (RFC 1812 section 4.3.2.7: none
/// of these is answered with an error).
fn is_icmpv4_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

/// Whether `addr` names one host elsewhere: not unspecified, loopback, multicast, the
/// broadcast address or IPv4's reserved 240/4 (RFC 1812 section 4.3.2.7).
fn unicast(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => {
            !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.octets()[0] >= 240)
        }
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_loopback() || a.is_multicast()),
    }
}

/// The `N` bytes of `bytes`, which the caller has checked holds exactly that many.
fn octets<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(bytes);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// An IPv4 TCP packet of `len` bytes from 10.0.0.2 to 10.9.0.1, flags as given.
    fn v4(len: usize, fragment: u16, protocol: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[6..8].copy_from_slice(&fragment.to_be_bytes());
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&[10, 0, 0, 2]);
        p[16..20].copy_from_slice(&[10, 9, 0, 1]);
        for (i, b) in p[20..].iter_mut().enumerate() {
            *b = i as u8;
        }
        p
    }

    /// An IPv6 packet of `len` bytes from fd00::2 to fd09::1, next header as given.
    fn v6(len: usize, next: u8, first: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        p[6] = next;
        p[7] = 64;
        p[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        p[24..40].copy_from_slice(&"fd09::1".parse::<Ipv6Addr>().unwrap().octets());
        p[40] = first;
        p
    }

    #[test]
    fn an_ipv4_packet_with_dont_fragment_gets_fragmentation_needed_with_the_mtu() {
        let packet = v4(1_420, IPV4_DONT_FRAGMENT, 6);
        let mut out = Vec::new();
        too_big(&packet, 1_402, &mut out).expect("answered");
        assert_eq!(out.len(), 576, "as much of the packet as 576 bytes hold");
        assert_eq!(u16::from_be_bytes([out[2], out[3]]), 576);
        assert_eq!(out[9], PROTO_ICMP);
        assert_eq!(
            &out[12..16],
            &[10, 9, 0, 1],
            "from the packet's destination"
        );
        assert_eq!(&out[16..20], &[10, 0, 0, 2], "to its source");
        assert_eq!(internet_checksum(&out[..20]), 0, "header checksum");
        assert_eq!((out[20], out[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([out[26], out[27]]), 1_402);
        assert_eq!(internet_checksum(&out[20..]), 0, "ICMP checksum");
        assert_eq!(&out[28..], &packet[..548], "the quote");
    }

    #[test]
    fn a_short_ipv4_packet_is_quoted_whole() {
        let packet = v4(100, IPV4_DONT_FRAGMENT, 17);
        let mut out = Vec::new();
        too_big(&packet, 68, &mut out).expect("answered");
        assert_eq!(out.len(), 128);
        assert_eq!(&out[28..], &packet[..]);
        assert_eq!(internet_checksum(&out[20..]), 0);
    }

    #[test]
    fn an_ipv6_packet_gets_packet_too_big_with_the_mtu() {
        let packet = v6(1_420, 6, 0);
        let mut out = vec![1, 2, 3];
        too_big(&packet, 1_382, &mut out).expect("answered");
        assert_eq!(
            out.len(),
            1_280,
            "as much of the packet as 1 280 bytes hold"
        );
        assert_eq!(usize::from(u16::from_be_bytes([out[4], out[5]])), 1_240);
        assert_eq!((out[6], out[7]), (PROTO_ICMPV6, HOP_LIMIT));
        assert_eq!(
            &out[8..24],
            &packet[24..40],
            "from the packet's destination"
        );
        assert_eq!(&out[24..40], &packet[8..24], "to its source");
        assert_eq!((out[40], out[41]), (2, 0));
        assert_eq!(
            u32::from_be_bytes([out[44], out[45], out[46], out[47]]),
            1_382
        );
        assert_eq!(&out[48..], &packet[..1_232], "the quote");
        let length = 1_240u32.to_be_bytes();
        let check =
            internet_checksum_of(&[&out[8..40], &length, &[0, 0, 0, PROTO_ICMPV6], &out[40..]]);
        assert_eq!(check, 0, "ICMPv6 checksum over the pseudo-header");
    }

    #[test]
    fn errors_later_fragments_and_fragmentable_packets_get_no_answer() {
        let mut out = Vec::new();
        let cases = [
            (v4(1_420, 0, 6), NoAnswer::MayFragment),
            (
                v4(1_420, IPV4_DONT_FRAGMENT | 185, 6),
                NoAnswer::LaterFragment,
            ),
            (
                {
                    let mut p = v4(1_420, IPV4_DONT_FRAGMENT, PROTO_ICMP);
                    p[20] = 3;
                    p
                },
                NoAnswer::IcmpError,
            ),
            (v6(1_420, PROTO_ICMPV6, 1), NoAnswer::IcmpError),
            (
                {
                    let mut p = v4(1_420, IPV4_DONT_FRAGMENT, 17);
                    p[16..20].copy_from_slice(&[224, 0, 0, 1]);
                    p
                },
                NoAnswer::NotUnicast,
            ),
            (
                {
                    let mut p = v6(1_420, 17, 0);
                    p[8..24].copy_from_slice(&[0; 16]);
                    p
                },
                NoAnswer::NotUnicast,
            ),
        ];
        for (packet, why) in cases {
            assert_eq!(too_big(&packet, 1_400, &mut out), Err(why));
            assert!(out.is_empty());
        }
        // A loopback source; an IPv6 room below 1 280.
        let mut looped = v4(1_420, IPV4_DONT_FRAGMENT, 6);
        looped[12..16].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(too_big(&looped, 1_400, &mut out), Err(NoAnswer::NotUnicast));
        assert_eq!(
            too_big(&v6(1_420, 6, 0), 1_279, &mut out),
            Err(NoAnswer::BelowIpv6Minimum)
        );
        assert_eq!(too_big(&v6(1_420, 6, 0), 1_280, &mut out), Ok(()));
        // Echo requests are not errors: they are answered.
        let mut ping = v4(1_420, IPV4_DONT_FRAGMENT, PROTO_ICMP);
        ping[20] = 8;
        assert_eq!(too_big(&ping, 1_400, &mut out), Ok(()));
        assert_eq!(
            too_big(&v6(1_420, PROTO_ICMPV6, 128), 1_400, &mut out),
            Ok(())
        );
    }

    #[test]
    fn packets_whose_lengths_disagree_get_no_answer() {
        let mut out = Vec::new();
        let mut long = v4(1_420, IPV4_DONT_FRAGMENT, 6);
        long.push(0);
        let mut options = v4(1_420, IPV4_DONT_FRAGMENT, 6);
        options[0] = 0x44;
        for packet in [
            &long[..],
            &options[..],
            &v4(1_420, IPV4_DONT_FRAGMENT, 6)[..19],
            &v6(1_420, 6, 0)[..1_419],
            &[0x50; 60][..],
            &[][..],
        ] {
            assert_eq!(too_big(packet, 1_400, &mut out), Err(NoAnswer::Malformed));
        }
    }

    proptest! {
        /// Whatever arrives, no panic; an answer is always a well-formed ICMP error no
        /// longer than its family allows.
        #[test]
        fn any_bytes_get_a_well_formed_answer_or_none(
            bytes in proptest::collection::vec(any::<u8>(), 0..1_600),
            version in prop_oneof![Just(0x45u8), Just(0x60u8), any::<u8>()],
            mtu in any::<u16>(),
        ) {
            let mut packet = bytes;
            if let Some(first) = packet.first_mut() {
                *first = version;
            }
            // Make the length field agree, and an IPv4 packet a first fragment with DF,
            // often enough to reach the builders.
            let len = packet.len();
            if len >= 40 && version == 0x60 {
                packet[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
            } else if len >= 20 && version == 0x45 {
                packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                packet[6..8].copy_from_slice(&IPV4_DONT_FRAGMENT.to_be_bytes());
            }
            let mut out = Vec::new();
            let answered = too_big(&packet, mtu, &mut out);
            prop_assert_eq!(answered.is_ok(), answerable(&packet, mtu).is_ok());
            if answered.is_ok() {
                match out[0] >> 4 {
                    4 => {
                        prop_assert!(out.len() <= IPV4_ERROR_MAX);
                        prop_assert_eq!(internet_checksum(&out[..20]), 0);
                        prop_assert_eq!(internet_checksum(&out[20..]), 0);
                    }
                    6 => {
                        prop_assert!(out.len() <= IPV6_ERROR_MAX);
                        let length = u16::from_be_bytes([out[4], out[5]]);
                        prop_assert_eq!(usize::from(length) + 40, out.len());
                        let upper = u32::from(length).to_be_bytes();
                        let pseudo = [0, 0, 0, PROTO_ICMPV6];
                        let sum = internet_checksum_of(&[&out[8..40], &upper, &pseudo, &out[40..]]);
                        prop_assert_eq!(sum, 0);
                    }
                    other => prop_assert!(false, "answer of version {}", other),
                }
            }
        }
    }
}
