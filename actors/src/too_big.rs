//! The runtime's half of ICMP "too big" (`jvpn_core::icmp`): a tunnel packet larger than
//! its session's path carries now is dropped, and its sender is told the size that
//! fits, in a packet written into the TUN device. What the path carries is a QUIC
//! connection's datagram room, or over UDP the smaller of what the kernel said of the
//! path the last time it refused a datagram as too big (kept for [`LEARNED_FOR`]) and
//! what the session's size probes found (`jvpn_core::pmtu`: a narrower hop beyond the
//! first link, which the kernel does not tell); TCP carries any packet. Answers are
//! budgeted per session: a sender that ignores them costs a few a second, not one per
//! packet.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use jvpn_core::bucket::TokenBucket;
use jvpn_core::icmp;
use jvpn_core::ids::Protocol;

use crate::telemetry;
use crate::transport::TransportHandle;
use crate::tun::TunDevice;

/// Answers a second per session, and at once: enough for each TCP connection of a
/// session to learn the path's size within a second, few enough that a flood of large
/// packets (each read of a super-packet yields forty-odd too-big segments) costs little.
const ANSWERS_PER_SECOND: u32 = 20;
const ANSWER_BURST: u32 = 10;
/// How long a UDP path's room, learned from the kernel when it refused a datagram, is
/// kept: the senders told keep their smaller size for about as long (the kernel's own
/// path MTU memory is 10 minutes), and a path that grew is found again a minute later at
/// most (the next refusal teaches the room anew).
pub const LEARNED_FOR: Duration = Duration::from_secs(60);

/// One session's answers: its budget, and what it learned of its UDP path.
#[derive(Debug, Default)]
pub struct TooBig {
    budget: TokenBucket,
    /// The room of the UDP path from that local address to that peer, learned then.
    learned: Option<(SocketAddr, SocketAddr, usize, Instant)>,
}

impl TooBig {
    /// The largest tunnel packet `via` carries to `to` now, if it names a limit: a QUIC
    /// connection's room; over UDP the smaller of what the kernel said of this path in
    /// the last [`LEARNED_FOR`] and `probed`, the room the session's size probes found.
    /// TCP names none.
    pub fn room(
        &self,
        via: &TransportHandle,
        to: SocketAddr,
        probed: Option<usize>,
        now: Instant,
    ) -> Option<usize> {
        if via.protocol() != Protocol::Udp {
            return via.packet_room();
        }
        let learned = self
            .learned
            .filter(|&(local, peer, _, when)| {
                local == via.local()
                    && peer == to
                    && now.saturating_duration_since(when) < LEARNED_FOR
            })
            .map(|(_, _, room, _)| room);
        learned.into_iter().chain(probed).min()
    }

    /// After a send to `to` on `via` of which a datagram was refused as too big
    /// ([`crate::transport::Sent::TooBig`]: by the kernel over UDP, by QUIC for a room
    /// that shrank within the batch): learns the path's room, and answers each of
    /// `packets` (the send's tunnel packets; the refused ones are counted as dropped
    /// already) that does not fit it and was not answered before it was sealed, against
    /// the room `checked` then.
    pub fn refused<'p>(
        &mut self,
        via: &TransportHandle,
        to: SocketAddr,
        packets: impl IntoIterator<Item = &'p [u8]>,
        checked: Option<usize>,
        device: Option<&dyn TunDevice>,
        now: Instant,
    ) {
        let room = if via.protocol() == Protocol::Udp {
            let room = via.path_room(to);
            if let Some(room) = room {
                self.learned = Some((via.local(), to, room, now));
            }
            room
        } else {
            via.packet_room()
        };
        let Some(room) = room else {
            return;
        };
        let answered_before = |len: usize| checked.is_some_and(|checked| len > checked);
        for packet in packets
            .into_iter()
            .filter(|p| p.len() > room && !answered_before(p.len()))
        {
            self.answer(device, packet, room, now);
        }
    }

    /// `packet`, bound for the path, is larger than the `room` bytes the path carries:
    /// drops it (`send_too_big`) and, budget allowing, answers its sender.
    pub fn drop_and_answer(
        &mut self,
        device: Option<&dyn TunDevice>,
        packet: &[u8],
        room: usize,
        now: Instant,
    ) {
        telemetry::dropped("send_too_big");
        self.answer(device, packet, room, now);
    }

    /// Answers the sender of `packet` through `device`, budget allowing
    /// (`jvpn_icmp_too_big_total` counts each outcome); the answer is built only once
    /// the packet has earned one and the budget has paid for it.
    fn answer(&mut self, device: Option<&dyn TunDevice>, packet: &[u8], room: usize, now: Instant) {
        let mtu = u16::try_from(room).unwrap_or(u16::MAX);
        let outcome = match icmp::answerable(packet, mtu) {
            Err(why) => why.as_str(),
            Ok(_) if !self.budget.take(now, ANSWERS_PER_SECOND, ANSWER_BURST) => "over_budget",
            Ok(_) => {
                let mut answer = Vec::new();
                match (icmp::too_big(packet, mtu, &mut answer), device) {
                    (Ok(()), Some(device)) if device.write(&answer).is_ok() => "sent",
                    (Err(why), _) => why.as_str(),
                    _ => "not_written",
                }
            }
        };
        telemetry::icmp_too_big(outcome);
    }
}
