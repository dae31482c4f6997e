//! The runtime's half of ICMP "too big" (`jvpn_core::icmp`): a tunnel packet larger than
//! its session's path carries now (a QUIC path, whose datagrams are smaller than a UDP
//! path's) is dropped, and its sender is told the size that fits, in a packet written
//! into the TUN device. Answers are budgeted per session: a sender that ignores them
//! costs a few a second, not one per packet.

use std::time::Instant;

use jvpn_core::bucket::TokenBucket;
use jvpn_core::icmp;

use crate::telemetry;
use crate::tun::TunDevice;

/// Answers a second per session, and at once: enough for each TCP connection of a
/// session to learn the path's size within a second, few enough that a flood of large
/// packets (each read of a super-packet yields forty-odd too-big segments) costs little.
const ANSWERS_PER_SECOND: u32 = 20;
const ANSWER_BURST: u32 = 10;

/// One session's answers: its budget.
#[derive(Debug, Default)]
pub struct TooBig {
    budget: TokenBucket,
}

impl TooBig {
    /// `packet`, bound for the path, is larger than the `room` bytes the path carries:
    /// drops it (`send_too_big`) and, budget allowing, answers its sender through
    /// `device` (`jvpn_icmp_too_big_total` counts each outcome).
    pub fn drop_and_answer(
        &mut self,
        device: Option<&dyn TunDevice>,
        packet: &[u8],
        room: usize,
        now: Instant,
    ) {
        telemetry::dropped("send_too_big");
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
