//! The runtime's half of ICMP "too big" (`jvpn_core::icmp`): a tunnel packet larger than
//! its session's path carries now is dropped, and its sender is told the size that
//! fits, in a packet written into the TUN device. What the path carries is a QUIC
//! connection's datagram room, or over UDP what the kernel said of the path the last
//! time it refused a datagram as too big (kept for [`LEARNED_FOR`]). Answers are
//! budgeted per session: a sender that ignores them costs a few a second, not one per
//! packet.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use jvpn_core::bucket::TokenBucket;
use jvpn_core::icmp;

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
    /// The room of the UDP path to that address, learned then.
    learned: Option<(SocketAddr, usize, Instant)>,
}

impl TooBig {
    /// The largest tunnel packet `via` carries to `to` now, if it names a limit: a QUIC
    /// connection's room, or what the kernel said of a UDP path to `to` in the last
    /// [`LEARNED_FOR`].
    pub fn room(&self, via: &TransportHandle, to: SocketAddr, now: Instant) -> Option<usize> {
        via.packet_room().or_else(|| {
            self.learned
                .filter(|&(at, _, when)| {
                    at == to && now.saturating_duration_since(when) < LEARNED_FOR
                })
                .map(|(_, room, _)| room)
        })
    }

    /// After a send to `to` on `via` of which the kernel refused a datagram as too big
    /// ([`crate::transport::Sent::TooBig`]): learns the path's room and answers each of
    /// `packets` (the send's tunnel packets; the refused ones are counted as dropped
    /// already) that does not fit it.
    pub fn refused<'p>(
        &mut self,
        via: &TransportHandle,
        to: SocketAddr,
        packets: impl IntoIterator<Item = &'p [u8]>,
        device: Option<&dyn TunDevice>,
        now: Instant,
    ) {
        let Some(room) = via.path_room(to) else {
            return;
        };
        self.learned = Some((to, room, now));
        for packet in packets.into_iter().filter(|p| p.len() > room) {
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
    /// (`jvpn_icmp_too_big_total` counts each outcome).
    fn answer(&mut self, device: Option<&dyn TunDevice>, packet: &[u8], room: usize, now: Instant) {
        let mut answer = Vec::new();
        let mtu = u16::try_from(room).unwrap_or(u16::MAX);
        let outcome = match icmp::too_big(packet, mtu, &mut answer) {
            Err(why) => why.as_str(),
            Ok(()) if !self.budget.take(now, ANSWERS_PER_SECOND, ANSWER_BURST) => "over_budget",
            Ok(()) => match device.map(|d| d.write(&answer)) {
                Some(Ok(())) => "sent",
                Some(Err(_)) | None => "not_written",
            },
        };
        telemetry::icmp_too_big(outcome);
    }
}
