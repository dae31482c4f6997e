//! Candidate selection and the switch budget.
//!
//! [`select`] is filter → rank → deterministic tie-break → hysteresis; never random.
//! [`SwitchLimiter`] enforces the cooldown between switches and the number of switches
//! in any sliding 60 s, with memory bounded by the policy's per-minute maximum.

use std::cmp::Ordering;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::health::HealthSnapshot;
use crate::ids::{Protocol, TransportId};
use crate::policy::Policy;
use crate::reason::ReasonCode;

/// The span of the switch-rate window.
pub const SWITCH_RATE_WINDOW: Duration = Duration::from_secs(60);

/// A transport that selection may choose.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    /// Its id (lowest wins a tie).
    pub id: TransportId,
    /// Its kind, checked against the allowed protocols.
    pub protocol: Protocol,
    /// Its health now.
    pub health: HealthSnapshot,
    /// Excluded until this instant (a recent failed reattach on it).
    pub excluded_until: Option<Instant>,
    /// Whether it is the active transport (heartbeated) rather than a probed standby.
    pub active: bool,
}

impl Candidate {
    /// Whether the filter lets this candidate through at `now`.
    pub fn usable(&self, policy: &Policy, now: Instant) -> bool {
        policy.allows(self.protocol)
            && self.excluded_until.is_none_or(|t| now >= t)
            && self.health.fit_for_selection(policy, self.active)
    }

    /// Ranking order: lowest loss, then lowest latency (unmeasured last), then longest
    /// stability, then lowest id.
    fn rank(&self, other: &Candidate) -> Ordering {
        let latency = |c: &Candidate| c.health.srtt.unwrap_or(Duration::MAX);
        self.health
            .loss_ratio
            .total_cmp(&other.health.loss_ratio)
            .then_with(|| latency(self).cmp(&latency(other)))
            .then_with(|| self.health.stable_since.cmp(&other.health.stable_since))
            .then_with(|| self.id.cmp(&other.id))
    }

    /// Hysteresis: whether this candidate beats `current` by the improvement factor, on
    /// loss first, and on latency where their losses are within the factor of each other.
    fn beats(&self, current: &Candidate, factor: f64) -> bool {
        let (mine, theirs) = (self.health.loss_ratio, current.health.loss_ratio);
        if theirs > mine * factor && theirs > 0.0 {
            return true;
        }
        if mine > theirs * factor && mine > 0.0 {
            return false;
        }
        match (self.health.srtt, current.health.srtt) {
            (Some(a), Some(b)) => b.as_secs_f64() > a.as_secs_f64() * factor,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// Chooses the transport to (re)attach to among `candidates`, which may include the
/// active one. A usable active transport is kept unless another candidate beats it by
/// `switch_improvement_factor`.
pub fn select(candidates: &[Candidate], policy: &Policy, now: Instant) -> Option<TransportId> {
    let best = candidates
        .iter()
        .filter(|c| c.usable(policy, now))
        .min_by(|a, b| a.rank(b))?;
    let usable_current = candidates
        .iter()
        .find(|c| c.active && c.usable(policy, now));
    match usable_current {
        Some(cur) if cur.id != best.id && !best.beats(cur, policy.switch_improvement_factor()) => {
            Some(cur.id)
        }
        _ => Some(best.id),
    }
}

/// Why the limiter refused a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchDenial {
    /// The policy forbids switching altogether (max_switches_per_min = 0).
    Forbidden,
    /// max_switches_per_min switches already happened in the last 60 s.
    RateLimited,
    /// The previous switch was less than switch_cooldown_ms ago.
    Cooldown,
}

impl SwitchDenial {
    /// The reason code of the denial.
    pub fn reason(self) -> ReasonCode {
        match self {
            SwitchDenial::Forbidden => ReasonCode::PolicyDenied,
            SwitchDenial::RateLimited => ReasonCode::SwitchRateLimited,
            SwitchDenial::Cooldown => ReasonCode::CooldownActive,
        }
    }
}

/// The switch budget: cooldown plus a sliding 60 s count.
#[derive(Debug, Clone)]
pub struct SwitchLimiter {
    recent: VecDeque<Instant>,
    max_per_window: usize,
    cooldown: Duration,
}

impl SwitchLimiter {
    /// A limiter for `policy`; it never holds more than max_switches_per_min instants.
    pub fn new(policy: &Policy) -> Self {
        let max = policy.max_switches_per_min() as usize;
        SwitchLimiter {
            recent: VecDeque::with_capacity(max),
            max_per_window: max,
            cooldown: policy.switch_cooldown(),
        }
    }

    /// Whether a switch may start at `now`. The rate limit is checked first: it is the
    /// lasting condition, the cooldown the passing one.
    pub fn check(&self, now: Instant) -> Result<(), SwitchDenial> {
        if self.max_per_window == 0 {
            return Err(SwitchDenial::Forbidden);
        }
        let in_window = self
            .recent
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < SWITCH_RATE_WINDOW)
            .count();
        if in_window >= self.max_per_window {
            return Err(SwitchDenial::RateLimited);
        }
        match self.recent.back() {
            Some(last) if now.saturating_duration_since(*last) < self.cooldown => {
                Err(SwitchDenial::Cooldown)
            }
            _ => Ok(()),
        }
    }

    /// Records a switch at `now`; call only after [`SwitchLimiter::check`] allowed it.
    pub fn record(&mut self, now: Instant) {
        if self.max_per_window == 0 {
            return;
        }
        while self.recent.len() >= self.max_per_window {
            self.recent.pop_front();
        }
        self.recent.push_back(now);
    }

    /// The earliest instant at which [`SwitchLimiter::check`] may allow a switch again,
    /// or `None` if never (a budget of zero).
    pub fn next_allowed(&self, now: Instant) -> Option<Instant> {
        if self.max_per_window == 0 {
            return None;
        }
        let after_cooldown = self.recent.back().map_or(now, |t| *t + self.cooldown);
        let after_window = if self.recent.len() >= self.max_per_window {
            self.recent.front().map_or(now, |t| *t + SWITCH_RATE_WINDOW)
        } else {
            now
        };
        Some(after_cooldown.max(after_window).max(now))
    }

    /// Switch instants within the 60 s before `now` (for tests and status).
    pub fn switches_in_window(&self, now: Instant) -> usize {
        self.recent
            .iter()
            .filter(|t| now.saturating_duration_since(**t) < SWITCH_RATE_WINDOW)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::TransportHealth;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn candidate(id: u32, loss: f64, srtt_ms: Option<u64>, now: Instant) -> Candidate {
        let p = Policy::default();
        let mut health = TransportHealth::new(&p, now).snapshot(now);
        health.loss_ratio = loss;
        health.samples = 10;
        health.srtt = srtt_ms.map(ms);
        Candidate {
            id: TransportId(id),
            protocol: Protocol::Udp,
            health,
            excluded_until: None,
            active: false,
        }
    }

    #[test]
    fn ranks_by_loss_then_latency_then_id() {
        let p = Policy::default();
        let now = Instant::now();
        let cs = [
            candidate(3, 0.10, Some(5), now),
            candidate(2, 0.05, Some(50), now),
            candidate(1, 0.05, Some(50), now),
            candidate(4, 0.05, Some(60), now),
        ];
        assert_eq!(select(&cs, &p, now), Some(TransportId(1)));
    }

    #[test]
    fn filters_lossy_disallowed_and_excluded_candidates() {
        let mut cfg = crate::policy::PolicyConfig::starter();
        cfg.transport.allowed_protocols = Some(vec![Protocol::Udp]);
        let p = cfg.validate().expect("valid");
        let now = Instant::now();
        let lossy = candidate(1, 0.5, Some(1), now);
        let mut tcp = candidate(2, 0.0, Some(1), now);
        tcp.protocol = Protocol::Tcp;
        let mut excluded = candidate(3, 0.0, Some(1), now);
        excluded.excluded_until = Some(now + ms(10));
        let cs = [lossy, tcp, excluded];
        assert_eq!(select(&cs, &p, now), None);
        assert_eq!(select(&cs, &p, now + ms(10)), Some(TransportId(3)));
    }

    #[test]
    fn hysteresis_keeps_a_usable_current_transport() {
        let p = Policy::default(); // factor 1.10
        let now = Instant::now();
        let mut current = candidate(1, 0.0, Some(100), now);
        current.active = true;
        let slightly_better = candidate(2, 0.0, Some(95), now);
        let much_better = candidate(3, 0.0, Some(50), now);
        assert_eq!(
            select(&[current, slightly_better], &p, now),
            Some(TransportId(1))
        );
        assert_eq!(
            select(&[current, slightly_better, much_better], &p, now),
            Some(TransportId(3))
        );
        let mut dead_current = current;
        dead_current.health.dead = true;
        assert_eq!(
            select(&[dead_current, slightly_better], &p, now),
            Some(TransportId(2))
        );
    }

    #[test]
    fn limiter_enforces_cooldown_and_sliding_window() {
        let mut cfg = crate::policy::PolicyConfig::starter();
        cfg.switching.max_switches_per_min = Some(2);
        cfg.switching.switch_cooldown_ms = Some(1_000);
        let p = cfg.validate().expect("valid");
        let mut lim = SwitchLimiter::new(&p);
        let t0 = Instant::now();
        assert_eq!(lim.check(t0), Ok(()));
        lim.record(t0);
        assert_eq!(lim.check(t0 + ms(999)), Err(SwitchDenial::Cooldown));
        assert_eq!(lim.next_allowed(t0 + ms(10)), Some(t0 + ms(1_000)));
        lim.record(t0 + ms(1_000));
        assert_eq!(lim.check(t0 + ms(5_000)), Err(SwitchDenial::RateLimited));
        assert_eq!(lim.next_allowed(t0 + ms(5_000)), Some(t0 + ms(60_000)));
        assert_eq!(lim.check(t0 + ms(59_999)), Err(SwitchDenial::RateLimited));
        assert_eq!(lim.check(t0 + ms(60_000)), Ok(()));
    }

    #[test]
    fn a_zero_budget_never_allows_a_switch() {
        let mut cfg = crate::policy::PolicyConfig::starter();
        cfg.switching.max_switches_per_min = Some(0);
        let p = cfg.validate().expect("valid");
        let lim = SwitchLimiter::new(&p);
        assert_eq!(lim.check(Instant::now()), Err(SwitchDenial::Forbidden));
        assert_eq!(SwitchDenial::Forbidden.reason(), ReasonCode::PolicyDenied);
        assert_eq!(lim.next_allowed(Instant::now()), None);
    }
}
