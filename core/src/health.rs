//! Per-transport health: loss over a sliding window, consecutive drops, heartbeat age,
//! and round-trip estimates — in fixed-size structures, so memory per transport is a
//! constant whatever the traffic.
//!
//! Loss is measured with heartbeats and probes: each one sent is registered with
//! [`TransportHealth::probe_sent`]; an answer ([`TransportHealth::probe_acked`]) counts
//! as delivered and gives an RTT sample; one unanswered within the probe timeout counts
//! as dropped.

use std::time::{Duration, Instant};

use crate::fsm::Instability;
use crate::policy::Policy;

/// Number of time buckets the loss window is divided into.
const LOSS_BUCKETS: usize = 16;
/// RTT samples kept for the p95 estimate.
const RTT_SAMPLES: usize = 32;
/// Probes that may be awaiting an answer at once; an older one still unanswered when
/// its slot is reused counts as dropped.
const PROBES_IN_FLIGHT: usize = 32;

#[derive(Debug, Clone, Copy, Default)]
struct LossBucket {
    epoch: u64,
    delivered: u32,
    dropped: u32,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    seq: u64,
    sent_at: Instant,
}

/// What is known of one transport's health at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthSnapshot {
    /// dropped / (delivered + dropped) over the loss window; 0 without samples.
    pub loss_ratio: f64,
    /// delivered + dropped over the loss window.
    pub samples: u32,
    /// Losses since the last delivery.
    pub consecutive_drops: u32,
    /// Time since anything authenticated was last heard on this transport.
    pub heartbeat_age: Duration,
    /// Smoothed RTT (RFC 6298 style), if any sample exists.
    pub srtt: Option<Duration>,
    /// 95th percentile of the recent RTT samples, if any.
    pub rtt_p95: Option<Duration>,
    /// When the current run without drops began (the last drop, or creation).
    pub stable_since: Instant,
    /// The transport reported itself dead and has not reported itself up since.
    pub dead: bool,
}

/// One transport's health record.
#[derive(Debug, Clone)]
pub struct TransportHealth {
    origin: Instant,
    bucket_width: Duration,
    buckets: [LossBucket; LOSS_BUCKETS],
    consecutive_drops: u32,
    last_heard: Instant,
    stable_since: Instant,
    dead: bool,
    srtt: Option<Duration>,
    rtt_samples: [Duration; RTT_SAMPLES],
    rtt_count: usize,
    probes: [Option<Probe>; PROBES_IN_FLIGHT],
    heartbeat_interval: Duration,
}

impl TransportHealth {
    /// A fresh record: counts as heard at `now`, with no samples.
    pub fn new(policy: &Policy, now: Instant) -> Self {
        let width = policy.loss_window() / LOSS_BUCKETS as u32;
        TransportHealth {
            origin: now,
            bucket_width: width.max(Duration::from_millis(1)),
            buckets: [LossBucket::default(); LOSS_BUCKETS],
            consecutive_drops: 0,
            last_heard: now,
            stable_since: now,
            dead: false,
            srtt: None,
            rtt_samples: [Duration::ZERO; RTT_SAMPLES],
            rtt_count: 0,
            probes: [None; PROBES_IN_FLIGHT],
            heartbeat_interval: policy.heartbeat_interval(),
        }
    }

    /// Something authenticated arrived on this transport.
    pub fn record_heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// The transport reported itself dead (send error, link down, connection closed).
    /// Sticky: a packet that was already in flight and arrives afterwards does not undo
    /// it; only [`TransportHealth::mark_up`] does.
    pub fn mark_dead(&mut self) {
        self.dead = true;
    }

    /// The transport reported itself usable again (link up, socket reopened).
    pub fn mark_up(&mut self) {
        self.dead = false;
    }

    /// A heartbeat or probe with sequence number `seq` was sent.
    pub fn probe_sent(&mut self, seq: u64, now: Instant) {
        let slot = (seq % PROBES_IN_FLIGHT as u64) as usize;
        if self.probes[slot].is_some() {
            self.record_dropped(now);
        }
        self.probes[slot] = Some(Probe { seq, sent_at: now });
    }

    /// The answer to probe `seq` arrived; returns its RTT, or `None` for an unknown or
    /// already expired probe (which changes nothing).
    pub fn probe_acked(&mut self, seq: u64, now: Instant) -> Option<Duration> {
        let slot = (seq % PROBES_IN_FLIGHT as u64) as usize;
        let probe = self.probes[slot].filter(|p| p.seq == seq)?;
        self.probes[slot] = None;
        let rtt = now.saturating_duration_since(probe.sent_at);
        self.record_delivered(now);
        self.record_rtt(rtt);
        self.record_heard(now);
        Some(rtt)
    }

    /// Counts every probe unanswered for longer than the probe timeout as dropped.
    pub fn expire_probes(&mut self, now: Instant) {
        let timeout = self.probe_timeout();
        for slot in 0..PROBES_IN_FLIGHT {
            if let Some(p) = self.probes[slot] {
                if now.saturating_duration_since(p.sent_at) >= timeout {
                    self.probes[slot] = None;
                    self.record_dropped(now);
                }
            }
        }
    }

    /// How long a probe may stay unanswered: the heartbeat interval, or three smoothed
    /// RTTs on a path slower than that.
    pub fn probe_timeout(&self) -> Duration {
        let by_rtt = self.srtt.map_or(Duration::ZERO, |s| s.saturating_mul(3));
        self.heartbeat_interval.max(by_rtt)
    }

    /// When the oldest probe in flight will expire, if any is in flight.
    pub fn next_probe_expiry(&self) -> Option<Instant> {
        let timeout = self.probe_timeout();
        self.probes
            .iter()
            .flatten()
            .map(|p| p.sent_at + timeout)
            .min()
    }

    /// A receive report from the peer: of the packets sent since its last report,
    /// `delivered` arrived and `dropped` did not. Data traffic gives far more loss samples
    /// than heartbeats alone (four per default loss window).
    pub fn record_loss_report(&mut self, delivered: u32, dropped: u32, now: Instant) {
        if dropped == 0 && delivered > 0 {
            self.consecutive_drops = 0;
        } else if dropped > 0 && delivered == 0 {
            self.consecutive_drops = self.consecutive_drops.saturating_add(dropped);
        }
        if dropped > 0 {
            self.stable_since = now;
        }
        let b = self.bucket(now);
        b.delivered = b.delivered.saturating_add(delivered);
        b.dropped = b.dropped.saturating_add(dropped);
    }

    /// A delivery observed by other means than a probe.
    pub fn record_delivered(&mut self, now: Instant) {
        self.consecutive_drops = 0;
        let b = self.bucket(now);
        b.delivered = b.delivered.saturating_add(1);
    }

    /// A loss observed by other means than a probe.
    pub fn record_dropped(&mut self, now: Instant) {
        self.stable_since = now;
        self.consecutive_drops = self.consecutive_drops.saturating_add(1);
        let b = self.bucket(now);
        b.dropped = b.dropped.saturating_add(1);
    }

    /// Adds one RTT sample.
    pub fn record_rtt(&mut self, rtt: Duration) {
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(s) => s.saturating_mul(7).saturating_add(rtt) / 8,
        });
        self.rtt_samples[self.rtt_count % RTT_SAMPLES] = rtt;
        self.rtt_count = self.rtt_count.wrapping_add(1);
    }

    /// The health as of `now`.
    pub fn snapshot(&self, now: Instant) -> HealthSnapshot {
        let (delivered, dropped) = self.window_counts(now);
        let samples = delivered.saturating_add(dropped);
        let loss_ratio = if samples == 0 {
            0.0
        } else {
            f64::from(dropped) / f64::from(samples)
        };
        HealthSnapshot {
            loss_ratio,
            samples,
            consecutive_drops: self.consecutive_drops,
            heartbeat_age: now.saturating_duration_since(self.last_heard),
            srtt: self.srtt,
            rtt_p95: self.rtt_p95(),
            stable_since: self.stable_since,
            dead: self.dead,
        }
    }

    /// The next instant at which the passage of time alone can change this transport's
    /// judgement (its loss window drops a bucket holding a loss, or its heard-age reaches
    /// the active or the standby limit), so a driver wakes for it instead of waiting for
    /// the next packet. `None` if nothing can change without new input.
    pub fn next_change(&self, policy: &Policy, now: Instant) -> Option<Instant> {
        let epoch = self.epoch(now);
        let oldest = epoch.saturating_sub(LOSS_BUCKETS as u64 - 1);
        let losses_in_window = self
            .buckets
            .iter()
            .any(|b| b.dropped > 0 && (oldest..=epoch).contains(&b.epoch));
        let slide = losses_in_window.then(|| {
            let next_epoch = u32::try_from(epoch + 1).unwrap_or(u32::MAX);
            self.origin + self.bucket_width.saturating_mul(next_epoch)
        });
        let active_limit = self.last_heard + policy.heartbeat_volatile();
        let standby_limit = active_limit + policy.probe_interval();
        [slide, Some(active_limit), Some(standby_limit)]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min()
    }

    /// When the heartbeat-age trigger will fire if nothing is heard before.
    pub fn heartbeat_deadline(&self, policy: &Policy) -> Instant {
        self.last_heard + policy.heartbeat_volatile()
    }

    fn epoch(&self, now: Instant) -> u64 {
        let since = now.saturating_duration_since(self.origin);
        (since.as_nanos() / self.bucket_width.as_nanos().max(1)) as u64
    }

    fn bucket(&mut self, now: Instant) -> &mut LossBucket {
        let epoch = self.epoch(now);
        let b = &mut self.buckets[(epoch % LOSS_BUCKETS as u64) as usize];
        if b.epoch != epoch {
            *b = LossBucket {
                epoch,
                delivered: 0,
                dropped: 0,
            };
        }
        b
    }

    fn window_counts(&self, now: Instant) -> (u32, u32) {
        let epoch = self.epoch(now);
        let oldest = epoch.saturating_sub(LOSS_BUCKETS as u64 - 1);
        self.buckets
            .iter()
            .filter(|b| (oldest..=epoch).contains(&b.epoch))
            .fold((0u32, 0u32), |(d, x), b| {
                (d.saturating_add(b.delivered), x.saturating_add(b.dropped))
            })
    }

    fn rtt_p95(&self) -> Option<Duration> {
        let n = self.rtt_count.min(RTT_SAMPLES);
        if n == 0 {
            return None;
        }
        let mut sorted = self.rtt_samples;
        let samples = &mut sorted[..n];
        samples.sort_unstable();
        // Nearest-rank percentile: the smallest sample with at least 95% at or below it.
        let rank = (n * 95).div_ceil(100).max(1);
        Some(samples[rank - 1])
    }
}

impl HealthSnapshot {
    /// The first volatility trigger this health meets, in a fixed priority order (dead,
    /// heartbeat, consecutive drops, loss, latency) so that the reported reason is
    /// deterministic.
    pub fn instability(&self, policy: &Policy) -> Option<Instability> {
        self.judge(
            policy,
            policy.heartbeat_volatile(),
            policy.loss_min_samples(),
        )
    }

    /// Whether the transport may be chosen to (re)attach to. Stricter than the triggers:
    /// loss above the threshold disqualifies however few samples back it, so a path that
    /// just came out of an outage is chosen again only once its loss window is clean. A
    /// standby is only probed every probe_interval_ms, so it may be silent that much
    /// longer than the active transport.
    pub fn fit_for_selection(&self, policy: &Policy, active: bool) -> bool {
        let heartbeat_limit = if active {
            policy.heartbeat_volatile()
        } else {
            policy.heartbeat_volatile() + policy.probe_interval()
        };
        self.judge(policy, heartbeat_limit, 1).is_none()
    }

    /// A heartbeat age that reaches `heartbeat_limit` counts as a timeout (reaches, not
    /// exceeds: a driver woken exactly at the deadline must see it fire).
    fn judge(
        &self,
        policy: &Policy,
        heartbeat_limit: Duration,
        min_loss_samples: u32,
    ) -> Option<Instability> {
        if self.dead {
            return Some(Instability::TransportDead);
        }
        if self.heartbeat_age >= heartbeat_limit {
            return Some(Instability::HeartbeatTimeout);
        }
        if self.consecutive_drops >= policy.max_consecutive_drops() {
            return Some(Instability::ConsecutiveDrops);
        }
        if self.samples >= min_loss_samples && self.loss_ratio > policy.loss_volatile_threshold() {
            return Some(Instability::LossThreshold);
        }
        match (policy.latency_volatile(), self.rtt_p95) {
            (Some(limit), Some(p95)) if p95 > limit => Some(Instability::LatencyThreshold),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyConfig;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn loss_ratio_counts_only_the_window() {
        let p = Policy::default(); // 2 s window
        let t0 = Instant::now();
        let mut h = TransportHealth::new(&p, t0);
        for i in 0..10 {
            h.record_dropped(t0 + ms(i * 10));
        }
        let s = h.snapshot(t0 + ms(100));
        assert_eq!((s.samples, s.loss_ratio), (10, 1.0));
        for i in 0..10 {
            h.record_delivered(t0 + ms(2_500 + i * 10));
        }
        let s = h.snapshot(t0 + ms(2_600));
        assert_eq!(s.samples, 10, "drops older than the window still counted");
        assert_eq!(s.loss_ratio, 0.0);
        assert_eq!(s.consecutive_drops, 0);
    }

    #[test]
    fn unanswered_probes_become_drops_and_answers_give_rtt() {
        let p = Policy::default();
        let t0 = Instant::now();
        let mut h = TransportHealth::new(&p, t0);
        h.probe_sent(1, t0);
        h.probe_sent(2, t0 + ms(10));
        assert_eq!(h.probe_acked(1, t0 + ms(30)), Some(ms(30)));
        assert_eq!(
            h.probe_acked(1, t0 + ms(31)),
            None,
            "second ack of one probe"
        );
        assert_eq!(
            h.next_probe_expiry(),
            Some(t0 + ms(10) + p.heartbeat_interval())
        );
        h.expire_probes(t0 + ms(600));
        let s = h.snapshot(t0 + ms(600));
        assert_eq!((s.samples, s.consecutive_drops), (2, 1));
        assert_eq!(
            h.probe_acked(2, t0 + ms(700)),
            None,
            "ack after expiry counted"
        );
        assert_eq!(s.srtt, Some(ms(30)));
    }

    #[test]
    fn a_reused_probe_slot_counts_the_old_probe_as_lost() {
        let p = Policy::default();
        let t0 = Instant::now();
        let mut h = TransportHealth::new(&p, t0);
        for seq in 0..(PROBES_IN_FLIGHT as u64 + 5) {
            h.probe_sent(seq, t0);
        }
        assert_eq!(h.snapshot(t0).consecutive_drops, 5);
    }

    #[test]
    fn p95_is_the_nearest_rank() {
        let p = Policy::default();
        let mut h = TransportHealth::new(&p, Instant::now());
        for i in 1..=20u64 {
            h.record_rtt(ms(i));
        }
        assert_eq!(h.snapshot(Instant::now()).rtt_p95, Some(ms(19)));
    }

    #[test]
    fn triggers_fire_in_priority_order() {
        let mut cfg = PolicyConfig::starter();
        cfg.volatility.latency_volatile_ms = Some(100);
        let p = cfg.validate().expect("valid");
        let t0 = Instant::now();
        let mut s = TransportHealth::new(&p, t0).snapshot(t0);
        assert_eq!(s.instability(&p), None);
        s.rtt_p95 = Some(ms(150));
        assert_eq!(s.instability(&p), Some(Instability::LatencyThreshold));
        s.samples = 10;
        s.loss_ratio = 0.3;
        assert_eq!(s.instability(&p), Some(Instability::LossThreshold));
        s.samples = 4; // below loss_min_samples: loss is not judged yet
        assert_eq!(s.instability(&p), Some(Instability::LatencyThreshold));
        s.consecutive_drops = 3;
        assert_eq!(s.instability(&p), Some(Instability::ConsecutiveDrops));
        s.heartbeat_age = ms(2_000);
        assert_eq!(s.instability(&p), Some(Instability::HeartbeatTimeout));
        s.dead = true;
        assert_eq!(s.instability(&p), Some(Instability::TransportDead));
    }
}
