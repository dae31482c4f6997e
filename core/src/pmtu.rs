//! Path MTU search by authenticated probes (packetization-layer PMTU discovery, in the
//! manner of RFC 8899), for the client's UDP path: which datagram size the path carries
//! both ways, found without trusting ICMP.
//!
//! Why: the UDP sockets send with DF set and ignore the path MTU the kernel learns from
//! ICMP (quinn-udp's IP_PMTUDISC_PROBE), so a hop narrower than the first link, beyond
//! it, drops full-size datagrams silently, and so does a path that filters ICMP. Heart
//! beats are small and still pass: without a search the session looks healthy while
//! every full-size tunnel packet vanishes and TCP inside stalls. With the size found,
//! tunnel packets too large for it are answered with ICMP "too big" into the tunnel
//! (`core::icmp`), and the senders inside shrink their packets.
//!
//! A probe is a size probe padded to the size tried, and the gateway pads its answer to
//! the size of the probe it received: an answer proves the size both ways. The search
//! tries the largest datagram the tunnel makes first (on most paths it fits, and the
//! search ends at once), then [`BASE`], then halves the interval between the largest
//! size answered and the smallest size lost until it is at most [`STEP`] bytes wide. A
//! size is lost after [`TRIES`] probes of it went unanswered for [`PROBE_TIMEOUT`] each
//! while the path delivered something else (RFC 8899's black-hole rule: a probe lost
//! while nothing comes back at all is an outage, not a narrower path, and is sent again
//! without counting). Once found, the size is probed again at once when it is a limit
//! (each probe carries the limit, and so tells it to the gateway), then every
//! [`CONFIRM_EVERY`]: a confirmation lost [`TRIES`] times starts a new search below it,
//! the old limit kept until that search ends; a size below the largest is searched
//! upwards again after [`RAISE_AFTER`]. A path that does not carry even [`BASE`] (or a
//! gateway that predates size probes, which drops them) is left without a size, and
//! searched again after [`RAISE_AFTER`].
//!
//! Pure and deterministic: time is passed in.

use std::time::{Duration, Instant};

/// The smallest size searched (RFC 8899's BASE_PLPMTU for UDP; QUIC's minimum): paths
/// narrower than this are not worth a size.
pub const BASE: u16 = 1_200;
/// The search stops when the largest size answered and the smallest lost are this close.
pub const STEP: u16 = 8;
/// How long a probe is waited for.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Unanswered probes of one size, each while the path delivered something else, before
/// the size counts as lost (RFC 8899's MAX_PROBES): random loss rarely shrinks the path.
pub const TRIES: u8 = 3;
/// How often a found size is probed again (black-hole detection: one datagram of the
/// size found each way per half minute).
pub const CONFIRM_EVERY: Duration = Duration::from_secs(30);
/// How long a size below the largest (or no size) is kept before searching upwards
/// again (RFC 8899's PMTU_RAISE_TIMER).
pub const RAISE_AFTER: Duration = Duration::from_secs(600);

/// A probe to send: its sequence number and the datagram size it is padded to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeProbe {
    /// Echoed by the answer.
    pub seq: u64,
    /// The size of the whole datagram, bytes.
    pub size: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Searching between the largest size answered (`lo`, 0 if none) and the smallest
    /// size lost (`hi`, above the largest if none).
    Searching { lo: u16, hi: u16 },
    /// Found `confirmed` (or nothing); probed again at `next_at`, searched upwards again
    /// at `raise_at`.
    Found { raise_at: Instant },
}

/// The probe in flight: its size, the seq of its first try (an answer to any try of the
/// size counts), the tries that counted as lost, and whether the path delivered anything
/// since the latest try was sent.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    size: u16,
    first_seq: u64,
    lost: u8,
    heard: bool,
}

/// The search on one path.
#[derive(Debug, Clone)]
pub struct PathSearch {
    largest: u16,
    phase: Phase,
    confirmed: Option<u16>,
    in_flight: Option<InFlight>,
    seq: u64,
    next_at: Instant,
}

impl PathSearch {
    /// A search for a path whose largest datagram is `largest` bytes (the tunnel MTU and
    /// the session's overhead; at most 65 534), whose first probe is due at `now`.
    pub fn new(largest: u16, now: Instant) -> PathSearch {
        let largest = largest.min(u16::MAX - 1);
        PathSearch {
            largest,
            phase: Phase::Searching {
                lo: 0,
                hi: largest.saturating_add(1),
            },
            confirmed: None,
            in_flight: None,
            seq: 0,
            next_at: now,
        }
    }

    /// The largest datagram the path was found to carry both ways, if any.
    pub fn confirmed(&self) -> Option<u16> {
        self.confirmed
    }

    /// The size found, when it is smaller than the largest datagram: the path's limit.
    pub fn limit(&self) -> Option<u16> {
        self.confirmed.filter(|&c| c < self.largest)
    }

    #[cfg(test)]
    fn raise_at(&self) -> Instant {
        match self.phase {
            Phase::Found { raise_at } => raise_at,
            Phase::Searching { .. } => self.next_at,
        }
    }

    /// When [`PathSearch::poll`] has work next.
    pub fn next_deadline(&self) -> Instant {
        self.next_at
    }

    /// The path delivered an authenticated packet (any, on the transport searched): a
    /// probe unanswered since then was lost on a path that works.
    pub fn heard(&mut self) {
        if let Some(probe) = self.in_flight.as_mut() {
            probe.heard = true;
        }
    }

    /// The path became the session's active path (a jump to it; until then it was a
    /// standby, searched at the standby probes' pace). What its search learnt while
    /// nothing on it answered a size probe may be wrong: a standby node of a gateway
    /// cluster answers the standby probes (the path counts as alive) but not size
    /// probes, so sizes counted lost there were never asked of the session's owner, to
    /// which the path now leads. So:
    /// - a size found is probed again at once: a limit is so told to the gateway, which
    ///   keeps the limit of the path it sends on only, and any size is confirmed on the
    ///   path as it is now (a confirmation in flight is sent again, its try not counted);
    /// - a search that ended without a size, or one under way that no answer has
    ///   reached yet, starts again at once, from the largest;
    /// - a search under way that has had answers goes on (they came from the node
    ///   that answers size probes).
    pub fn activated(&mut self, now: Instant) {
        let answered =
            self.confirmed.is_some() || matches!(self.phase, Phase::Searching { lo, .. } if lo > 0);
        if !answered {
            // The seq goes on: a late answer to an old probe matches no new one.
            *self = PathSearch {
                seq: self.seq,
                ..PathSearch::new(self.largest, now)
            };
            return;
        }
        if let Phase::Found { .. } = self.phase {
            if let Some(probe) = self.in_flight.as_mut() {
                probe.heard = false;
            }
            self.next_at = now;
        }
    }

    /// The probe to send now, if one is due: after a probe that went unanswered, the
    /// next try of its size or, once it counts as lost, of the next size.
    pub fn poll(&mut self, now: Instant) -> Option<SizeProbe> {
        if now < self.next_at {
            return None;
        }
        if let Some(mut probe) = self.in_flight {
            probe.lost += u8::from(probe.heard);
            if probe.lost < TRIES {
                return Some(self.send(
                    InFlight {
                        heard: false,
                        ..probe
                    },
                    now,
                ));
            }
            self.in_flight = None;
            self.lost(probe.size, now);
        }
        match self.phase {
            Phase::Searching { lo, hi } => match self.next_size(lo, hi) {
                Some(size) => Some(self.send_first(size, now)),
                None => {
                    self.found((lo > 0).then_some(lo), now);
                    None
                }
            },
            Phase::Found { raise_at } => {
                if now >= raise_at && self.confirmed.is_none_or(|c| c < self.largest) {
                    // Search upwards from what is known to pass.
                    self.phase = Phase::Searching {
                        lo: self.confirmed.unwrap_or(0),
                        hi: self.largest.saturating_add(1),
                    };
                    return self.poll(now);
                }
                match self.confirmed {
                    Some(size) => Some(self.send_first(size, now)),
                    None => {
                        self.next_at = raise_at;
                        None
                    }
                }
            }
        }
    }

    /// The answer to probe `seq` came, a datagram of `size` bytes; whether it answered
    /// the probe in flight (an answer smaller than the probe proves nothing).
    pub fn answered(&mut self, seq: u64, size: u16, now: Instant) -> bool {
        let Some(probe) = self.in_flight else {
            return false;
        };
        if seq < probe.first_seq || seq > self.seq || size < probe.size {
            return false;
        }
        self.in_flight = None;
        match self.phase {
            Phase::Searching { lo, hi } => {
                let lo = lo.max(probe.size);
                self.phase = Phase::Searching { lo, hi };
                if self.next_size(lo, hi).is_none() {
                    self.found(Some(lo), now);
                } else {
                    self.next_at = now;
                }
            }
            Phase::Found { .. } => self.next_at = now + CONFIRM_EVERY,
        }
        true
    }

    /// The size to try between `lo` answered and `hi` lost, or `None` when the search
    /// is over.
    fn next_size(&self, lo: u16, hi: u16) -> Option<u16> {
        if hi > self.largest {
            // Nothing lost yet: the largest first.
            return (lo < self.largest).then_some(self.largest);
        }
        if lo == 0 {
            // The largest was lost: does the path carry the base at all?
            return (hi > BASE).then_some(BASE);
        }
        (hi - lo > STEP).then(|| lo + (hi - lo) / 2)
    }

    /// `size` counts as lost.
    fn lost(&mut self, size: u16, now: Instant) {
        match self.phase {
            Phase::Searching { lo, hi } => {
                self.phase = Phase::Searching {
                    lo,
                    hi: hi.min(size),
                }
            }
            Phase::Found { .. } => {
                // The path narrowed: search below the size lost, keeping the old limit
                // (the best known) until the search ends.
                self.phase = Phase::Searching { lo: 0, hi: size };
            }
        }
        self.next_at = now;
    }

    fn found(&mut self, size: Option<u16>, now: Instant) {
        self.confirmed = size;
        self.phase = Phase::Found {
            raise_at: now + RAISE_AFTER,
        };
        self.next_at = match size {
            // A limit is confirmed at once: the probe tells it to the gateway.
            Some(size) if size < self.largest => now,
            Some(_) => now + CONFIRM_EVERY,
            None => now + RAISE_AFTER,
        };
    }

    /// The first try of `size`.
    fn send_first(&mut self, size: u16, now: Instant) -> SizeProbe {
        let probe = InFlight {
            size,
            first_seq: self.seq + 1,
            lost: 0,
            heard: false,
        };
        self.send(probe, now)
    }

    /// Sends a try of `probe` (its next seq) and waits [`PROBE_TIMEOUT`] for it.
    fn send(&mut self, probe: InFlight, now: Instant) -> SizeProbe {
        self.seq += 1;
        self.in_flight = Some(probe);
        self.next_at = now + PROBE_TIMEOUT;
        SizeProbe {
            seq: self.seq,
            size: probe.size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs a search against a live path (something else is heard between probes) that
    /// carries datagrams up to `carries` bytes: every larger probe is lost, and a probe
    /// that fits is lost when `loses` says so (its argument counts the probes sent).
    /// Returns what it found, the virtual time it took and the probes it sent.
    fn search_with(
        largest: u16,
        carries: u16,
        mut loses: impl FnMut(usize) -> bool,
    ) -> (Option<u16>, Duration, usize) {
        let start = Instant::now();
        let mut now = start;
        let mut s = PathSearch::new(largest, now);
        let mut probes = 0;
        let found = |s: &PathSearch| matches!(s.phase, Phase::Found { .. });
        while !found(&s) {
            assert!(probes < 200, "the search does not end");
            if let Some(p) = s.poll(now) {
                probes += 1;
                if p.size <= carries && !loses(probes) {
                    assert!(s.answered(p.seq, p.size, now));
                }
            }
            s.heard();
            if !found(&s) {
                now = s.next_deadline().max(now);
            }
        }
        (s.confirmed(), now - start, probes)
    }

    fn search(largest: u16, carries: u16) -> (Option<u16>, Duration, usize) {
        search_with(largest, carries, |_| false)
    }

    #[test]
    fn a_path_that_carries_the_largest_datagram_is_found_with_one_probe() {
        assert_eq!(search(1416, 1500), (Some(1416), Duration::ZERO, 1));
    }

    #[test]
    fn a_narrower_path_is_found_within_a_step_below_what_it_carries() {
        let (found, took, probes) = search(1444, 1420);
        let found = found.expect("a size");
        assert!(found <= 1420 && found + STEP > 1420, "found {found}");
        // The largest is lost three times (3 s), then a handful of halvings.
        assert!(probes <= 3 + 1 + 3 * 6, "{probes} probes");
        assert!(took <= Duration::from_secs(15), "took {took:?}");
    }

    #[test]
    fn a_path_that_answers_nothing_has_no_size_and_is_searched_again_later() {
        let start = Instant::now();
        let (found, took, probes) = search(1444, 0);
        assert_eq!(found, None);
        assert_eq!(probes, 2 * TRIES as usize);
        assert_eq!(took, PROBE_TIMEOUT * 2 * TRIES as u32);
        let mut s = PathSearch::new(1444, start);
        for _ in 0..2 * TRIES {
            s.poll(s.next_deadline());
            s.heard();
        }
        assert_eq!(s.poll(s.next_deadline()), None);
        assert_eq!(s.next_deadline(), start + took + RAISE_AFTER);
        assert_eq!(s.poll(s.next_deadline()).map(|p| p.size), Some(1444));
    }

    #[test]
    fn a_lost_probe_does_not_shrink_the_path_and_only_a_full_answer_counts() {
        let now = Instant::now();
        let mut s = PathSearch::new(1444, now);
        let first = s.poll(now).expect("a probe");
        assert_eq!(first.size, 1444);
        s.heard();
        // Lost; the second try of the same size is answered.
        let later = now + PROBE_TIMEOUT;
        let second = s.poll(later).expect("a second try");
        assert_eq!(second.size, 1444);
        assert!(
            !s.answered(second.seq, 1_443, later),
            "an answer smaller than the probe"
        );
        assert!(s.answered(second.seq, 1_444, later));
        assert_eq!(s.confirmed(), Some(1444));
        assert_eq!(s.limit(), None);
        // A late answer to the first try changes nothing.
        assert!(!s.answered(first.seq, 1_444, later));
    }

    /// Finds a limit of 1 300 on a path carrying 1 300 of 1 444, then returns the search
    /// and the instant its first confirmation is due.
    fn limited() -> (PathSearch, Instant) {
        let mut now = Instant::now();
        let mut s = PathSearch::new(1444, now);
        for _ in 0..100 {
            if let Some(p) = s.poll(now) {
                if p.size <= 1_300 {
                    s.answered(p.seq, p.size, now);
                }
            }
            s.heard();
            if s.confirmed().is_some() {
                break;
            }
            now = s.next_deadline();
        }
        let limit = s.limit().expect("a limit");
        assert!(limit <= 1_300 && limit + STEP > 1_300, "{limit}");
        // Confirmed at once (the probe tells the gateway), then every half minute.
        let p = s.poll(now).expect("a confirmation at once");
        assert_eq!(p.size, limit);
        assert!(s.answered(p.seq, p.size, now));
        assert_eq!(s.next_deadline(), now + CONFIRM_EVERY);
        (s, now + CONFIRM_EVERY)
    }

    #[test]
    fn an_activated_path_confirms_its_size_at_once_and_searches_again_if_nothing_answered() {
        // A limit: the confirmation is due at once, also with one in flight (sent again,
        // its try not counted).
        let (mut s, due) = limited();
        let limit = s.limit();
        let mut now = due + Duration::from_secs(3);
        let p = s.poll(due).expect("a confirmation");
        s.heard();
        s.activated(now);
        assert_eq!(s.next_deadline(), now);
        let again = s.poll(now).expect("sent again at once");
        assert_eq!((again.size, s.limit()), (p.size, limit));
        for _ in 0..TRIES - 1 {
            s.heard();
            now = s.next_deadline();
            let next = s.poll(now).expect("a try");
            // Only the tries after the activation's count: the size is not lost yet.
            assert_eq!(next.size, p.size);
        }
        assert!(s.answered(again.seq + 2, p.size, now));
        assert_eq!(s.limit(), limit);
        // No size (nothing answered the standby): a new search at once, from the top.
        let (found, took, _) = search(1444, 0);
        assert_eq!(found, None);
        let start = Instant::now();
        let mut s = PathSearch::new(1444, start);
        while s.poll(s.next_deadline()).is_some() {
            s.heard();
        }
        assert_eq!(s.confirmed(), None);
        let now = start + took + Duration::from_secs(5);
        assert!(s.next_deadline() > now + Duration::from_secs(500));
        s.activated(now);
        assert_eq!(s.poll(now).map(|p| p.size), Some(1444));
        // A search under way that nothing answered yet (its losses counted while only a
        // standby node answered): it starts again, its seq going on.
        let mut s = PathSearch::new(1444, start);
        let mut now = start;
        let mut last = 0;
        for _ in 0..TRIES {
            last = s.poll(now).expect("a try of the largest").seq;
            s.heard();
            now = s.next_deadline();
        }
        let base = s.poll(now).expect("the base after the largest was lost");
        assert_eq!(base.size, BASE);
        s.heard();
        s.activated(now);
        let first = s.poll(now).expect("at once");
        assert_eq!(first.size, 1444, "from the largest again");
        assert!(first.seq > base.seq && base.seq > last);
        assert!(
            !s.answered(base.seq, BASE, now),
            "an old answer matches nothing"
        );
        // Losses count from the activation on: the largest is tried TRIES times again.
        for _ in 1..TRIES {
            s.heard();
            now = s.next_deadline();
            assert_eq!(s.poll(now).map(|p| p.size), Some(1444));
        }
        // A search under way that has had an answer goes on.
        let mut s = PathSearch::new(1444, start);
        let mut now = start;
        for _ in 0..TRIES {
            s.poll(now).expect("a try of the largest");
            s.heard();
            now = s.next_deadline();
        }
        let base = s.poll(now).expect("the base");
        assert!(s.answered(base.seq, BASE, now));
        let next = s.poll(now).expect("the next size");
        let before = s.next_deadline();
        s.activated(now);
        assert_eq!(s.next_deadline(), before);
        assert!(
            s.answered(next.seq, next.size, now),
            "the same probe in flight"
        );
        // The largest found: confirmed at once on the path as it is now.
        let mut s = PathSearch::new(1444, start);
        let p = s.poll(start).expect("a probe");
        assert!(s.answered(p.seq, p.size, start));
        let now = start + Duration::from_secs(7);
        assert_eq!(s.next_deadline(), start + CONFIRM_EVERY);
        s.activated(now);
        assert_eq!(s.poll(now).map(|p| p.size), Some(1444));
    }

    #[test]
    fn an_outage_keeps_the_limit_and_counts_no_probe_as_lost() {
        let (mut s, mut now) = limited();
        let limit = s.limit();
        // Nothing comes back for a minute: the confirmation is sent again and again,
        // never counted as lost.
        for _ in 0..60 {
            let p = s.poll(now).expect("a try");
            assert_eq!(Some(p.size), limit);
            now = s.next_deadline();
        }
        assert_eq!(s.limit(), limit);
        // The path is back: the next try is answered.
        let p = s.poll(now).expect("a try");
        assert!(s.answered(p.seq, p.size, now));
        assert_eq!(s.limit(), limit);
    }

    #[test]
    fn a_path_that_narrowed_is_searched_below_the_old_limit_which_stays_meanwhile() {
        let (mut s, mut now) = limited();
        let old = s.limit();
        // The path now carries 1 250: the confirmation is lost while heartbeats pass.
        let mut sizes = Vec::new();
        for _ in 0..100 {
            if let Some(p) = s.poll(now) {
                sizes.push(p.size);
                if p.size <= 1_250 {
                    s.answered(p.seq, p.size, now);
                }
            }
            s.heard();
            let searching = matches!(s.phase, Phase::Searching { .. });
            if !searching && sizes.len() > TRIES as usize {
                break;
            }
            assert_eq!(s.limit(), old, "the old limit stays during the search");
            now = s.next_deadline();
        }
        let limit = s.limit().expect("a new limit");
        assert!(limit <= 1_250 && limit + STEP > 1_250, "{limit}");
        assert!(sizes
            .iter()
            .skip(TRIES as usize)
            .all(|&size| Some(size) < old));
    }

    #[test]
    fn a_limit_is_searched_upwards_again_after_the_raise_timer() {
        let (mut s, mut now) = limited();
        // Confirmed every half minute until the raise timer.
        while now < s.raise_at() {
            let p = s.poll(now).expect("a confirmation");
            assert!(s.answered(p.seq, p.size, now));
            now = s.next_deadline();
        }
        // Then the largest is tried again; the path now carries it.
        let p = s.poll(now).expect("a probe");
        assert_eq!(p.size, 1444);
        assert!(s.answered(p.seq, p.size, now));
        assert_eq!(s.confirmed(), Some(1444));
        assert_eq!(s.limit(), None);
    }

    #[test]
    fn the_largest_is_tried_first_even_at_the_top_of_the_range() {
        assert_eq!(search(u16::MAX, u16::MAX).0, Some(u16::MAX - 1));
    }

    proptest! {
        /// Against any path, with any largest size and random loss of the probes that
        /// fit, the search ends and never claims more than the path carries; without
        /// loss it finds what the path carries within a step when that is the base or more.
        #[test]
        fn the_search_ends_and_never_overstates(
            largest in 0u16..=9_000,
            carries in 0u16..=9_000,
            lossy in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let mut x = seed | 1;
            let loses = |_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                lossy && x % 4 == 0
            };
            let (found, took, _) = search_with(largest, carries, loses);
            prop_assert!(took <= Duration::from_secs(120));
            if let Some(f) = found {
                prop_assert!(f <= carries && f <= largest);
            }
            if !lossy {
                match found {
                    Some(f) => prop_assert!(f + STEP >= carries.min(largest)),
                    None => prop_assert!(carries < BASE.min(largest) || largest == 0),
                }
            }
        }
    }
}
