//! TUN segmentation offload, sans-IO: the virtio-net header a TUN device opened with
//! `IFF_VNET_HDR` puts before every packet, and the split of a TCP super-packet (up to
//! 64 KiB, as the kernel's TCP stack hands it to a device that takes TSO) into the
//! MSS-sized segments that travel through the tunnel.
//!
//! The other way, [`coalesce`] joins consecutive segments of one TCP flow into one
//! super-packet written to the device at once, which the kernel's TCP stack then takes
//! as one (as its own GRO would have made it).
//!
//! Reading one super-packet instead of forty-odd packets, and writing one, is what makes
//! a userspace tunnel fast (Tailscale's change to wireguard-go): the kernel's TCP stacks
//! on both ends handle one packet where they handled forty, and the tunnel makes one
//! system call where it made forty. Segmenting and joining cost a header copy and a
//! checksum per segment. Every input is checked: a header that does not describe its
//! packet is refused, never trusted, and a packet that does not fit a run is written on
//! its own (the code must not panic on anything).

use thiserror::Error;

/// Length of the virtio-net header (`struct virtio_net_hdr`, without the buffer count).
pub const VNET_HDR_LEN: usize = 10;

/// `flags`: the checksum at `csum_start + csum_offset` is to be completed.
const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksums are known good (set on packets written to the device).
const F_DATA_VALID: u8 = 2;
/// `gso_type`: a plain packet.
const GSO_NONE: u8 = 0;
/// `gso_type`: a TCP over IPv4 super-packet.
const GSO_TCPV4: u8 = 1;
/// `gso_type`: a TCP over IPv6 super-packet.
const GSO_TCPV6: u8 = 4;
/// `gso_type` bit: the segments carry ECN (CWR is set on the first only).
const GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
const PROTO_TCP: u8 = 6;

/// The header written before every packet given to the device: a plain packet whose
/// checksums are known good (it was authenticated by the tunnel's AEAD, sealed by a
/// stack that computed them), as kernel WireGuard marks its decrypted packets.
pub const VNET_HDR_DATA_VALID: [u8; VNET_HDR_LEN] =
    [F_DATA_VALID, GSO_NONE, 0, 0, 0, 0, 0, 0, 0, 0];

/// The most segments joined into one write (as the kernel's GRO).
pub const MAX_COALESCED: usize = 64;

/// The fields of a TCP packet that decide whether it joins a run.
#[derive(Debug, Clone, Copy)]
struct TcpSegment<'p> {
    /// IP and TCP headers.
    headers: &'p [u8],
    ip_len: usize,
    payload: &'p [u8],
    seq: u32,
    flags: u8,
}

impl<'p> TcpSegment<'p> {
    /// The packet as a segment that may join a run: IPv4 without options or IPv6 without
    /// extension headers, TCP carrying data with only ACK (and PSH) set, lengths that
    /// agree with the IP header.
    fn parse(packet: &'p [u8]) -> Option<Self> {
        let version = packet.first()? >> 4;
        let ip_len = match version {
            4 => {
                let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
                let fragment = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x3fff;
                (packet[0] == 0x45
                    && packet.get(9) == Some(&PROTO_TCP)
                    && total == packet.len()
                    && fragment == 0)
                    .then_some(20)?
            }
            6 => {
                let payload = usize::from(u16::from_be_bytes([*packet.get(4)?, *packet.get(5)?]));
                (packet.get(6) == Some(&PROTO_TCP) && payload + 40 == packet.len()).then_some(40)?
            }
            _ => return None,
        };
        let tcp_len = usize::from(packet.get(ip_len + 12)? >> 4) * 4;
        let flags = *packet.get(ip_len + 13)?;
        if tcp_len < 20
            || packet.len() <= ip_len + tcp_len
            || flags & !(TCP_PSH | 0x10) != 0
            || flags & 0x10 == 0
        {
            return None;
        }
        let (headers, payload) = packet.split_at(ip_len + tcp_len);
        let seq = u32::from_be_bytes([
            headers[ip_len + 4],
            headers[ip_len + 5],
            headers[ip_len + 6],
            headers[ip_len + 7],
        ]);
        Some(TcpSegment {
            headers,
            ip_len,
            payload,
            seq,
            flags,
        })
    }

    /// Whether `next` continues this run: the same flow, addresses, ack, window,
    /// options and IP fields; the next sequence number; no more than `mss` of data.
    fn continued_by(&self, next: &TcpSegment<'_>, next_seq: u32, mss: usize) -> bool {
        let (a, b) = (self.headers, next.headers);
        let same_ip = if self.ip_len == 20 {
            // version/IHL, TOS; flags and TTL, protocol; addresses (not length, id, sum).
            a.len() == b.len() && a[..2] == b[..2] && a[6..10] == b[6..10] && a[12..20] == b[12..20]
        } else {
            a.len() == b.len() && a[..4] == b[..4] && a[6..40] == b[6..40]
        };
        let t = self.ip_len;
        // ports; ack, data offset, window, urgent pointer and options: everything but
        // seq, flags and checksum.
        let same_tcp = a[t..t + 4] == b[t..t + 4]
            && a[t + 8..t + 13] == b[t + 8..t + 13]
            && a[t + 14..t + 16] == b[t + 14..t + 16]
            && a[t + 18..] == b[t + 18..];
        same_ip && same_tcp && next.seq == next_seq && next.payload.len() <= mss
    }
}

/// Writes `packets` (in order) through `write`, each run of consecutive segments of one
/// TCP flow joined into one super-packet behind a virtio-net header that asks the kernel
/// to take it as a GSO packet (its TCP checksum left partial, for the kernel to complete
/// per segment); every other packet is written alone behind [`VNET_HDR_DATA_VALID`].
///
/// Each write is handed over in parts, to be written gathered (one `writev`): the
/// virtio-net header and the first segment's headers, rebuilt in `head` (reused between
/// calls), then the segments' payloads as they are in `packets`. The data is not copied
/// on its way to the device: a run of 45 segments is 46 parts, and a copy of the 64 KiB
/// was a tenth of a receiving gateway's time under one TCP stream.
pub fn coalesce(packets: &[&[u8]], head: &mut Vec<u8>, mut write: impl FnMut(&[&[u8]])) {
    let mut i = 0;
    while i < packets.len() {
        let Some(first) = TcpSegment::parse(packets[i]) else {
            write(&[&VNET_HDR_DATA_VALID, packets[i]]);
            i += 1;
            continue;
        };
        let mss = first.payload.len();
        let mut next_seq = first.seq.wrapping_add(mss as u32);
        let mut total = first.headers.len() + mss;
        let mut flags = first.flags;
        let mut end = i + 1;
        // A PSH ends a run, as does a shorter segment.
        while end < packets.len() && end - i < MAX_COALESCED && flags & TCP_PSH == 0 {
            let Some(next) = TcpSegment::parse(packets[end]) else {
                break;
            };
            if !first.continued_by(&next, next_seq, mss) || total + next.payload.len() > 65_535 {
                break;
            }
            next_seq = next_seq.wrapping_add(next.payload.len() as u32);
            total += next.payload.len();
            flags |= next.flags;
            end += 1;
            if next.payload.len() < mss {
                break;
            }
        }
        if end == i + 1 {
            write(&[&VNET_HDR_DATA_VALID, packets[i]]);
        } else {
            join_head(&first, total, flags, head);
            let mut parts: [&[u8]; MAX_COALESCED + 1] = [&[]; MAX_COALESCED + 1];
            parts[0] = head;
            parts[1] = first.payload;
            let hdr_len = first.headers.len();
            for (part, p) in parts[2..].iter_mut().zip(&packets[i + 1..end]) {
                *part = p.get(hdr_len..).unwrap_or_default();
            }
            write(&parts[..end - i + 1]);
        }
        i = end;
    }
}

/// Builds, in `head`, the virtio-net header and the IP and TCP headers of the
/// super-packet that `first` begins: `total` bytes long, with `flags` (the run's,
/// together).
fn join_head(first: &TcpSegment<'_>, total: usize, flags: u8, head: &mut Vec<u8>) {
    let ip_len = first.ip_len;
    let hdr_len = first.headers.len();
    let v4 = ip_len == 20;
    let mut vnet = [0u8; VNET_HDR_LEN];
    vnet[0] = F_NEEDS_CSUM;
    vnet[1] = if v4 { GSO_TCPV4 } else { GSO_TCPV6 };
    vnet[2..4].copy_from_slice(&(hdr_len as u16).to_le_bytes());
    vnet[4..6].copy_from_slice(&(first.payload.len() as u16).to_le_bytes());
    vnet[6..8].copy_from_slice(&(ip_len as u16).to_le_bytes());
    vnet[8..10].copy_from_slice(&16u16.to_le_bytes());
    head.clear();
    head.extend_from_slice(&vnet);
    head.extend_from_slice(first.headers);
    let headers = &mut head[VNET_HDR_LEN..];
    if v4 {
        headers[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        headers[10..12].fill(0);
        let ip_sum = !fold(sum_bytes(0, &headers[..20]));
        headers[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    } else {
        headers[4..6].copy_from_slice(&((total - 40) as u16).to_be_bytes());
    }
    headers[ip_len + 13] = flags;
    // Partial: the pseudo-header's sum only, as the kernel expects with NEEDS_CSUM.
    let partial = fold(pseudo_header_sum(headers, ip_len, total - ip_len));
    headers[ip_len + 16..ip_len + 18].copy_from_slice(&partial.to_be_bytes());
}

/// Why a packet read from the device was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OffloadError {
    /// Shorter than the headers it announces.
    #[error("packet too short for its headers")]
    Truncated,
    /// A segmentation type this code does not ask the kernel for.
    #[error("unsupported segmentation type {0}")]
    UnsupportedGso(u8),
    /// The IP version or the transport protocol does not match the segmentation type.
    #[error("headers do not match the segmentation type")]
    Mismatch,
    /// A segment size of zero, or a checksum position outside the packet.
    #[error("header fields out of range")]
    OutOfRange,
}

/// The virtio-net header of one packet read from the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetHeader {
    flags: u8,
    gso_type: u8,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

impl VnetHeader {
    /// Splits a read into its header and packet. The fields are in the machine's byte
    /// order (a TUN device's default; every platform this runs on is little-endian).
    pub fn split(read: &[u8]) -> Result<(VnetHeader, &[u8]), OffloadError> {
        let (h, packet) = read
            .split_first_chunk::<VNET_HDR_LEN>()
            .ok_or(OffloadError::Truncated)?;
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        Ok((
            VnetHeader {
                flags: h[0],
                gso_type: h[1],
                gso_size: u16_at(4),
                csum_start: u16_at(6),
                csum_offset: u16_at(8),
            },
            packet,
        ))
    }
}

/// Turns one read (its virtio-net header already split off) into the packets it holds,
/// each handed to `emit` in order: the packet itself, its checksum completed if the
/// kernel left it partial, or the segments of a TCP super-packet, each with correct IP
/// and TCP headers and checksums. `scratch` is reused between calls.
pub fn segments(
    header: &VnetHeader,
    packet: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    match header.gso_type & !GSO_ECN {
        GSO_NONE => {
            if header.flags & F_NEEDS_CSUM == 0 {
                emit(packet);
                return Ok(());
            }
            scratch.clear();
            scratch.extend_from_slice(packet);
            complete_checksum(scratch, header)?;
            emit(scratch);
            Ok(())
        }
        GSO_TCPV4 | GSO_TCPV6 => split_tcp(header, packet, scratch, emit),
        other => Err(OffloadError::UnsupportedGso(other)),
    }
}

/// Completes a partial checksum: the field holds the pseudo-header's sum, the rest of
/// the transport data is summed from `csum_start`.
fn complete_checksum(packet: &mut [u8], header: &VnetHeader) -> Result<(), OffloadError> {
    let start = usize::from(header.csum_start);
    let field = start + usize::from(header.csum_offset);
    if field + 2 > packet.len() {
        return Err(OffloadError::OutOfRange);
    }
    let sum = fold(sum_bytes(0, &packet[start..]));
    packet[field..field + 2].copy_from_slice(&(!sum).to_be_bytes());
    Ok(())
}

/// The IP header's length and the TCP header's offset and length of a TCP packet of the
/// version the segmentation type names.
fn tcp_layout(gso_type: u8, packet: &[u8]) -> Result<(usize, usize), OffloadError> {
    let version = packet.first().ok_or(OffloadError::Truncated)? >> 4;
    let ip_len = match (gso_type, version) {
        (GSO_TCPV4, 4) => {
            if packet.get(9) != Some(&PROTO_TCP) {
                return Err(OffloadError::Mismatch);
            }
            usize::from(packet[0] & 0x0f) * 4
        }
        // Extension headers are not taken: the next header must be TCP.
        (GSO_TCPV6, 6) => {
            if packet.get(6) != Some(&PROTO_TCP) {
                return Err(OffloadError::Mismatch);
            }
            40
        }
        _ => return Err(OffloadError::Mismatch),
    };
    let offset_byte = *packet.get(ip_len + 12).ok_or(OffloadError::Truncated)?;
    let tcp_len = usize::from(offset_byte >> 4) * 4;
    if ip_len < 20 || tcp_len < 20 || packet.len() < ip_len + tcp_len {
        return Err(OffloadError::Truncated);
    }
    Ok((ip_len, tcp_len))
}

fn split_tcp(
    header: &VnetHeader,
    packet: &[u8],
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<(), OffloadError> {
    let gso_type = header.gso_type & !GSO_ECN;
    let (ip_len, tcp_len) = tcp_layout(gso_type, packet)?;
    let mss = usize::from(header.gso_size);
    if mss == 0 {
        return Err(OffloadError::OutOfRange);
    }
    let headers = &packet[..ip_len + tcp_len];
    let payload = &packet[ip_len + tcp_len..];
    let seq = u32::from_be_bytes([
        headers[ip_len + 4],
        headers[ip_len + 5],
        headers[ip_len + 6],
        headers[ip_len + 7],
    ]);
    let count = payload.len().div_ceil(mss).max(1);
    for (i, chunk) in payload
        .chunks(mss)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        scratch.clear();
        scratch.extend_from_slice(headers);
        scratch.extend_from_slice(chunk);
        let total = scratch.len();
        if gso_type == GSO_TCPV4 {
            let total16 = u16::try_from(total).map_err(|_| OffloadError::OutOfRange)?;
            scratch[2..4].copy_from_slice(&total16.to_be_bytes());
            let id = u16::from_be_bytes([scratch[4], scratch[5]]).wrapping_add(i as u16);
            scratch[4..6].copy_from_slice(&id.to_be_bytes());
            scratch[10..12].fill(0);
            let ip_sum = !fold(sum_bytes(0, &scratch[..ip_len]));
            scratch[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        } else {
            let payload16 = u16::try_from(total - 40).map_err(|_| OffloadError::OutOfRange)?;
            scratch[4..6].copy_from_slice(&payload16.to_be_bytes());
        }
        let tcp = ip_len;
        let seg_seq = seq.wrapping_add((i * mss) as u32);
        scratch[tcp + 4..tcp + 8].copy_from_slice(&seg_seq.to_be_bytes());
        let mut flags = scratch[tcp + 13];
        if i + 1 < count {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i > 0 {
            flags &= !TCP_CWR;
        }
        scratch[tcp + 13] = flags;
        scratch[tcp + 16..tcp + 18].fill(0);
        let tcp_sum = !fold(sum_bytes(
            pseudo_header_sum(scratch, ip_len, total - ip_len),
            &scratch[tcp..],
        ));
        scratch[tcp + 16..tcp + 18].copy_from_slice(&tcp_sum.to_be_bytes());
        emit(scratch);
    }
    Ok(())
}

/// The sum of the TCP pseudo-header of a packet whose IP header is `ip_len` long and
/// whose TCP segment (header and payload) is `tcp_total` long.
fn pseudo_header_sum(packet: &[u8], ip_len: usize, tcp_total: usize) -> u32 {
    let addresses = if ip_len == 40 && packet[0] >> 4 == 6 {
        &packet[8..40]
    } else {
        &packet[12..20]
    };
    sum_bytes(0, addresses) + u32::from(PROTO_TCP) + tcp_total as u32
}

/// The one's-complement sum of `bytes` as big-endian 16-bit words, added to `sum`; the
/// result is folded to 16 bits.
///
/// Every segment cut from a TUN super-packet gets its TCP checksum here, so under bulk
/// TCP it runs over every byte the client sends: it sums native-endian 32-bit words into
/// a 64-bit accumulator, which the compiler turns into SIMD additions, and swaps the
/// bytes of the folded result once (the one's-complement sum of byte-swapped words is
/// the byte-swapped sum, RFC 1071 section 2). A big-endian word-at-a-time loop took a
/// third of the client's CPU time under one TCP stream; this one takes a twentieth.
fn sum_bytes(sum: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(4);
    // Words below 2^32 each: no overflow below 2^32 of them (16 GiB; a packet is at most
    // 64 KiB).
    let mut acc: u64 = words
        .by_ref()
        .map(|w| u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
        .sum();
    let tail = words.remainder();
    if let [a, b, ..] = tail {
        acc += u64::from(u16::from_ne_bytes([*a, *b]));
    }
    if let [last] | [_, _, last] = tail {
        // A lone last byte is the high byte of its big-endian word, zero-padded.
        acc += u64::from(u16::from_ne_bytes([*last, 0]));
    }
    let big_endian = u16::from_be(fold(acc));
    u32::from(fold(u64::from(sum) + u64::from(big_endian)))
}

/// The Internet checksum (RFC 1071) of `bytes`: what goes in a header's checksum field
/// (computed with that field zero).
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    !fold(sum_bytes(0, bytes))
}

/// The Internet checksum of `parts` taken as one run of bytes; every part but the last
/// must have an even length (a pseudo-header's fields do).
pub(crate) fn internet_checksum_of(parts: &[&[u8]]) -> u16 {
    !fold(parts.iter().fold(0, |sum, part| sum_bytes(sum, part)))
}

/// `sum` folded into 16 bits, carries added back (one's-complement addition).
fn fold(sum: impl Into<u64>) -> u16 {
    let mut sum = sum.into();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Whether the IP header checksum (IPv4) and the TCP checksum of `packet` are right: what
/// a receiving stack checks (tests use it on what [`segments`] makes).
pub fn checksums_valid(packet: &[u8]) -> bool {
    let Ok((ip_len, _)) = tcp_layout(
        if packet.first().map(|b| b >> 4) == Some(6) {
            GSO_TCPV6
        } else {
            GSO_TCPV4
        },
        packet,
    ) else {
        return false;
    };
    let ip_ok = ip_len == 40 || fold(sum_bytes(0, &packet[..ip_len])) == 0xffff;
    let tcp_total = packet.len() - ip_len;
    let tcp_ok = fold(sum_bytes(
        pseudo_header_sum(packet, ip_len, tcp_total),
        &packet[ip_len..],
    )) == 0xffff;
    ip_ok && tcp_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A TCP super-packet of `payload` over IPv4 or IPv6, with FIN|PSH|CWR set, and its
    /// virtio-net header (`mss`).
    fn super_packet(v6: bool, payload: &[u8], mss: u16) -> (VnetHeader, Vec<u8>) {
        let mut p = Vec::new();
        if v6 {
            p.extend_from_slice(&[0x60, 0, 0, 0, 0, 0, PROTO_TCP, 64]);
            p.extend_from_slice(&[0xfd; 16]);
            p.extend_from_slice(&[0xfe; 16]);
        } else {
            p.extend_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, PROTO_TCP, 0, 0]);
            p.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        }
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&5201u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&0xffff_ff00u32.to_be_bytes()); // wraps within the packet
        tcp[12] = 5 << 4;
        tcp[13] = TCP_FIN | TCP_PSH | TCP_CWR | 0x10;
        p.extend_from_slice(&tcp);
        p.extend_from_slice(payload);
        let header = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 } | GSO_ECN,
            gso_size: mss,
            csum_start: if v6 { 40 } else { 20 },
            csum_offset: 16,
        };
        (header, p)
    }

    fn split_all(header: &VnetHeader, packet: &[u8]) -> Result<Vec<Vec<u8>>, OffloadError> {
        let mut out = Vec::new();
        segments(header, packet, &mut Vec::new(), |s| out.push(s.to_vec()))?;
        Ok(out)
    }

    #[test]
    fn a_super_packet_becomes_segments_a_receiver_accepts() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
            let (header, packet) = super_packet(v6, &payload, 1_380);
            let segs = split_all(&header, &packet).expect("segments");
            assert_eq!(segs.len(), 8, "10 000 bytes in 1 380-byte segments");
            let ip_len = if v6 { 40 } else { 20 };
            let mut rejoined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert!(checksums_valid(s), "v6={v6} segment {i} checksums");
                let seq = u32::from_be_bytes([
                    s[ip_len + 4],
                    s[ip_len + 5],
                    s[ip_len + 6],
                    s[ip_len + 7],
                ]);
                assert_eq!(seq, 0xffff_ff00u32.wrapping_add(i as u32 * 1_380));
                let flags = s[ip_len + 13];
                let last = i == segs.len() - 1;
                assert_eq!(
                    flags & (TCP_FIN | TCP_PSH) != 0,
                    last,
                    "FIN/PSH on the last only"
                );
                assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR on the first only");
                if v6 {
                    assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
                } else {
                    assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), 0x1234 + i as u16);
                }
                rejoined.extend_from_slice(&s[ip_len + 20..]);
            }
            assert_eq!(rejoined, payload);
        }
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let (_, mut packet) = super_packet(false, b"hello, tunnel", 1_380);
        let total = packet.len() as u16;
        packet[2..4].copy_from_slice(&total.to_be_bytes());
        let ip_sum = !fold(sum_bytes(0, &packet[..20]));
        packet[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        // As the kernel leaves it: the pseudo-header's sum in the TCP checksum field.
        let partial = fold(pseudo_header_sum(&packet, 20, packet.len() - 20));
        packet[36..38].copy_from_slice(&partial.to_be_bytes());
        let header = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_NONE,
            gso_size: 0,
            csum_start: 20,
            csum_offset: 16,
        };
        let out = split_all(&header, &packet).expect("packet");
        assert_eq!(out.len(), 1);
        assert!(checksums_valid(&out[0]));
    }

    #[test]
    fn headers_that_do_not_describe_their_packet_are_refused() {
        let (mut header, packet) = super_packet(false, &[1; 3_000], 1_380);
        header.gso_size = 0;
        assert_eq!(split_all(&header, &packet), Err(OffloadError::OutOfRange));
        let (mut header, packet) = super_packet(false, &[1; 3_000], 1_380);
        header.gso_type = GSO_TCPV6;
        assert_eq!(split_all(&header, &packet), Err(OffloadError::Mismatch));
        let (header, packet) = super_packet(true, &[1; 3_000], 1_380);
        assert_eq!(
            split_all(&header, &packet[..50]),
            Err(OffloadError::Truncated)
        );
        let udp = VnetHeader {
            gso_type: 5,
            ..header
        };
        assert_eq!(
            split_all(&udp, &packet),
            Err(OffloadError::UnsupportedGso(5))
        );
        let far = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_NONE,
            csum_start: 60_000,
            ..header
        };
        assert_eq!(split_all(&far, &packet), Err(OffloadError::OutOfRange));
    }

    /// Writes of `coalesce`, split again as the kernel would: (segments per write).
    fn coalesced(packets: &[Vec<u8>]) -> Vec<Vec<Vec<u8>>> {
        let slices: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let mut writes = Vec::new();
        coalesce(&slices, &mut Vec::new(), |parts| {
            writes.push(parts.concat())
        });
        writes
            .iter()
            .map(|w| {
                let (h, p) = VnetHeader::split(w).expect("header");
                split_all(&h, p).expect("a write the kernel takes")
            })
            .collect()
    }

    #[test]
    fn consecutive_segments_of_a_flow_are_written_as_one_super_packet() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
            let (header, packet) = super_packet(v6, &payload, 1_380);
            let mut segs = split_all(&header, &packet).expect("segments");
            // Only ACK (and PSH on the last): FIN and CWR end or prevent a run.
            let ip_len = if v6 { 40 } else { 20 };
            for s in &mut segs {
                s[ip_len + 13] &= !(TCP_FIN | TCP_CWR);
            }
            let writes = coalesced(&segs);
            assert_eq!(writes.len(), 1, "v6={v6}: one write");
            assert_eq!(writes[0].len(), segs.len());
            for (again, original) in writes[0].iter().zip(&segs) {
                assert!(checksums_valid(again));
                // The same TCP header (but its checksum, which the test's flag edit
                // left stale in the original) and the same data.
                let (t, o) = (&again[ip_len..], &original[ip_len..]);
                assert!(
                    t[..16] == o[..16] && t[18..] == o[18..],
                    "v6={v6}: TCP header and data"
                );
            }
        }
    }

    #[test]
    fn a_gap_another_flow_or_another_protocol_ends_a_run() {
        let (header, packet) = super_packet(false, &[7; 13_800], 1_380);
        let mut segs = split_all(&header, &packet).expect("segments");
        for s in &mut segs {
            s[33] &= !(TCP_FIN | TCP_CWR | TCP_PSH);
        }
        let (a, b) = (segs[..5].to_vec(), segs[6..].to_vec()); // segment 5 lost
        let mut other_flow = segs[6].clone();
        other_flow[20] ^= 1; // another source port
        let mut udp = vec![
            0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        udp.extend_from_slice(&[0; 8]);
        let mut packets = a;
        packets.push(udp.clone());
        packets.extend(b);
        packets.push(other_flow);
        let writes = coalesced(&packets);
        let sizes: Vec<usize> = writes.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![5, 1, 4, 1]);
        assert_eq!(writes[1][0], udp, "written as it came");
    }

    /// A run stops at MAX_COALESCED segments (the parts of a write are bounded by it)
    /// even when 64 KiB would take more.
    #[test]
    fn a_run_is_cut_after_max_coalesced_segments() {
        let (header, packet) = super_packet(false, &[9; 100 * 150], 100);
        let mut segs = split_all(&header, &packet).expect("segments");
        for s in &mut segs {
            s[33] &= !(TCP_FIN | TCP_CWR | TCP_PSH);
        }
        let writes = coalesced(&segs);
        let sizes: Vec<usize> = writes.iter().map(Vec::len).collect();
        assert_eq!(
            sizes,
            vec![MAX_COALESCED, MAX_COALESCED, 150 - 2 * MAX_COALESCED]
        );
    }

    /// Found by the property below: an IPv4 first byte on a packet too short for an IPv4
    /// header must not be read past its end.
    #[test]
    fn a_truncated_ipv4_packet_is_written_alone_not_read_past_its_end() {
        let short: &[u8] = &[0x45, 0, 0, 9, 0, 0, 0, 0, 0];
        let mut writes = 0;
        coalesce(&[short, short], &mut Vec::new(), |_| writes += 1);
        assert_eq!(writes, 2);
    }

    /// RFC 1071's worked example (section 3): the sum of 00 01 f2 03 f4 f5 f6 f7 is
    /// ddf2, so the checksum is 220d; an odd length pads the last byte with zero.
    #[test]
    fn the_internet_checksum_of_rfc_1071s_example() {
        let bytes = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(sum_bytes(0, &bytes), 0xddf2);
        assert_eq!(internet_checksum(&bytes), 0x220d);
        assert_eq!(sum_bytes(0, &bytes[..7]), 0xddf2 - 0xf7);
        assert_eq!(sum_bytes(0, &[0xab]), 0xab00);
        assert_eq!(sum_bytes(0, &[]), 0);
        assert_eq!(sum_bytes(0, &[0xff; 4096]), 0xffff);
    }

    proptest! {
        /// What a receiver checks: the data with its checksum appended sums to ffff
        /// (for an odd length the checksum goes after the zero pad).
        #[test]
        fn data_with_its_checksum_sums_to_all_ones(
            data in prop::collection::vec(any::<u8>(), 0..3000),
        ) {
            let mut with = data.clone();
            if with.len() % 2 == 1 {
                with.push(0);
            }
            with.extend_from_slice(&internet_checksum(&data).to_be_bytes());
            prop_assert_eq!(fold(sum_bytes(0, &with)), 0xffff);
        }

        /// Summing in two parts cut at any even offset (as the pseudo-header and the
        /// segment are) is summing at once; a start sum carries over.
        #[test]
        fn a_sum_continues_across_parts_cut_at_even_offsets(
            data in prop::collection::vec(any::<u8>(), 0..3000),
            cut in any::<prop::sample::Index>(),
            start in any::<u32>(),
        ) {
            let cut = cut.index(data.len() / 2 + 1) * 2;
            let (a, b) = data.split_at(cut);
            prop_assert_eq!(
                fold(sum_bytes(sum_bytes(start, a), b)),
                fold(sum_bytes(start, &data))
            );
            // Each 16-bit word counted once, big-endian: swapping two words' places
            // changes nothing, and adding a word's value is summing it.
            if data.len() >= 4 && data.len() % 2 == 0 {
                let mut swapped = data.clone();
                swapped.swap(0, 2);
                swapped.swap(1, 3);
                prop_assert_eq!(sum_bytes(0, &swapped), sum_bytes(0, &data));
                let word = u16::from_be_bytes([data[0], data[1]]);
                prop_assert_eq!(
                    fold(sum_bytes(0, &data[2..]) + u32::from(word)),
                    fold(sum_bytes(0, &data))
                );
            }
        }

        #[test]
        fn any_packets_are_written_whole_and_in_order(
            packets in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..120), 0..8),
        ) {
            let slices: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
            let mut bytes = 0;
            coalesce(&slices, &mut Vec::new(), |parts| {
                bytes += parts.iter().map(|p| p.len()).sum::<usize>() - VNET_HDR_LEN
            });
            prop_assert!(bytes <= packets.iter().map(Vec::len).sum::<usize>());
        }

        #[test]
        fn any_read_is_split_or_refused_without_panicking(
            read in prop::collection::vec(any::<u8>(), 0..400),
        ) {
            if let Ok((header, packet)) = VnetHeader::split(&read) {
                let _ = split_all(&header, packet);
            }
        }
    }
}
