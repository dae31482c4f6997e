//! The policy: every bound on adaptation (timers, thresholds, switch budget).
//!
//! [`PolicyConfig`] is the schema as it appears in a config file (each section a table,
//! every key optional at the serde level so that a missing required key gets our own
//! error rather than serde's). [`PolicyConfig::validate`] turns it into a [`Policy`],
//! once; a `Policy` cannot be built any other way, so holding one proves it is valid.
//! Every problem is reported with the dotted key, the value and what is allowed.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::Protocol;

/// The policy as written in a config file; see spec/policy.md for every key.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// policy_version, carried by every event.
    pub version: Option<String>,
    /// Session lifetime limits.
    #[serde(default)]
    pub session: SessionSection,
    /// When a transport counts as unstable.
    #[serde(default)]
    pub volatility: VolatilitySection,
    /// How often and how fast a session may switch.
    #[serde(default)]
    pub switching: SwitchingSection,
    /// Which transports a session may use.
    #[serde(default)]
    pub transport: TransportSection,
    /// Freshness and replay bounds.
    #[serde(default)]
    pub security: SecuritySection,
}

/// `[session]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct SessionSection {
    pub max_lifetime_ms: Option<u64>,
    pub transport_lost_ttl_ms: Option<u64>,
}

/// `[volatility]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct VolatilitySection {
    pub heartbeat_interval_ms: Option<u64>,
    pub heartbeat_volatile_ms: Option<u64>,
    pub probe_interval_ms: Option<u64>,
    pub loss_window_ms: Option<u64>,
    pub loss_volatile_threshold: Option<f64>,
    pub loss_min_samples: Option<u32>,
    pub max_consecutive_drops: Option<u32>,
    pub latency_volatile_ms: Option<u64>,
    pub volatile_to_degraded_ms: Option<u64>,
}

/// `[switching]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct SwitchingSection {
    pub max_switches_per_min: Option<u32>,
    pub switch_cooldown_ms: Option<u64>,
    pub recovery_window_ms: Option<u64>,
    pub switch_improvement_factor: Option<f64>,
}

/// `[transport]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct TransportSection {
    pub allowed_protocols: Option<Vec<Protocol>>,
    pub max_candidate_count: Option<u32>,
}

/// `[security]`
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct SecuritySection {
    pub reattach_proof_max_age_ms: Option<u64>,
    pub replay_window_size: Option<u32>,
    pub max_security_failures: Option<u32>,
    pub rekey_after_ms: Option<u64>,
    pub reject_after_ms: Option<u64>,
    pub rekey_after_packets: Option<u64>,
    pub key_overlap_ms: Option<u64>,
}

/// A validated policy. Only [`PolicyConfig::validate`] and [`Policy::default`] make one,
/// and its fields are private, so holding one proves every value is in range.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Carried as policy_version by every event.
    version: String,
    /// A session older than this is terminated (session_lifetime_exceeded).
    max_lifetime: Duration,
    /// A session that heard nothing from its peer for this long is terminated.
    transport_lost_ttl: Duration,
    /// Heartbeats on the active transport are sent this often.
    heartbeat_interval: Duration,
    /// No heartbeat answer for this long makes the transport volatile.
    heartbeat_volatile: Duration,
    /// Standby candidates are probed this often.
    probe_interval: Duration,
    /// Loss ratio is measured over this sliding window.
    loss_window: Duration,
    /// Loss ratio above this makes the transport volatile; in (0, 1].
    loss_volatile_threshold: f64,
    /// The loss ratio is only judged over at least this many samples.
    loss_min_samples: u32,
    /// This many losses in a row make the transport volatile.
    max_consecutive_drops: u32,
    /// Round-trip p95 above this makes the transport volatile; `None` disables it.
    latency_volatile: Option<Duration>,
    /// Volatility lasting this long degrades the session.
    volatile_to_degraded: Duration,
    /// At most this many switches in any 60 s.
    max_switches_per_min: u32,
    /// A switch less than this after the previous one is denied.
    switch_cooldown: Duration,
    /// A reattach must complete within this window.
    recovery_window: Duration,
    /// A candidate must beat a live active transport by this factor.
    switch_improvement_factor: f64,
    /// Transports a session may use.
    allowed_protocols: Vec<Protocol>,
    /// Bound on the candidate list.
    max_candidate_count: usize,
    /// A reattach proof older (or newer) than this is stale.
    reattach_proof_max_age: Duration,
    /// Width of the anti-replay window, in counters.
    replay_window_size: u32,
    /// This many security failures terminate the session (security_failure).
    max_security_failures: u32,
    /// Keys older than this are replaced (the client starts a rekey).
    rekey_after: Duration,
    /// Keys older than this are never used again, rekeyed or not.
    reject_after: Duration,
    /// Keys that sealed or opened this many packets are replaced.
    rekey_after_packets: u64,
    /// After a rekey, the previous keys still open packets this long (reordering).
    key_overlap: Duration,
}

impl Default for Policy {
    /// The contract's starter defaults.
    fn default() -> Self {
        match PolicyConfig::starter().validate() {
            Ok(policy) => policy,
            // The starter set is a constant checked by a unit test; reaching this is a
            // bug in this file, not an input error.
            Err(e) => unreachable!("starter policy is invalid: {e}"),
        }
    }
}

impl Policy {
    /// Carried as policy_version by every event.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// A session older than this is terminated (session_lifetime_exceeded).
    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    /// A session that heard nothing from its peer for this long is terminated.
    pub fn transport_lost_ttl(&self) -> Duration {
        self.transport_lost_ttl
    }

    /// Heartbeats on the active transport are sent this often.
    pub fn heartbeat_interval(&self) -> Duration {
        self.heartbeat_interval
    }

    /// No heartbeat answer for this long makes the transport volatile.
    pub fn heartbeat_volatile(&self) -> Duration {
        self.heartbeat_volatile
    }

    /// Standby candidates are probed this often.
    pub fn probe_interval(&self) -> Duration {
        self.probe_interval
    }

    /// Loss ratio is measured over this sliding window.
    pub fn loss_window(&self) -> Duration {
        self.loss_window
    }

    /// Loss ratio above this makes the transport volatile; in (0, 1].
    pub fn loss_volatile_threshold(&self) -> f64 {
        self.loss_volatile_threshold
    }

    /// The loss ratio is only judged over at least this many samples.
    pub fn loss_min_samples(&self) -> u32 {
        self.loss_min_samples
    }

    /// This many losses in a row make the transport volatile.
    pub fn max_consecutive_drops(&self) -> u32 {
        self.max_consecutive_drops
    }

    /// Round-trip p95 above this makes the transport volatile; `None` disables it.
    pub fn latency_volatile(&self) -> Option<Duration> {
        self.latency_volatile
    }

    /// Volatility lasting this long degrades the session.
    pub fn volatile_to_degraded(&self) -> Duration {
        self.volatile_to_degraded
    }

    /// At most this many switches in any 60 s.
    pub fn max_switches_per_min(&self) -> u32 {
        self.max_switches_per_min
    }

    /// A switch less than this after the previous one is denied.
    pub fn switch_cooldown(&self) -> Duration {
        self.switch_cooldown
    }

    /// A reattach must complete within this window.
    pub fn recovery_window(&self) -> Duration {
        self.recovery_window
    }

    /// A candidate must beat a live active transport by this factor.
    pub fn switch_improvement_factor(&self) -> f64 {
        self.switch_improvement_factor
    }

    /// Transports a session may use.
    pub fn allowed_protocols(&self) -> &[Protocol] {
        &self.allowed_protocols
    }

    /// Bound on the candidate list.
    pub fn max_candidate_count(&self) -> usize {
        self.max_candidate_count
    }

    /// A reattach proof older (or newer) than this is stale.
    pub fn reattach_proof_max_age(&self) -> Duration {
        self.reattach_proof_max_age
    }

    /// Width of the anti-replay window, in counters.
    pub fn replay_window_size(&self) -> u32 {
        self.replay_window_size
    }

    /// This many security failures terminate the session (security_failure).
    pub fn max_security_failures(&self) -> u32 {
        self.max_security_failures
    }

    /// Keys older than this are replaced (the client starts a rekey).
    pub fn rekey_after(&self) -> Duration {
        self.rekey_after
    }

    /// Keys older than this are never used again, rekeyed or not.
    pub fn reject_after(&self) -> Duration {
        self.reject_after
    }

    /// Keys that sealed or opened this many packets are replaced.
    pub fn rekey_after_packets(&self) -> u64 {
        self.rekey_after_packets
    }

    /// After a rekey, the previous keys still open packets this long (reordering).
    pub fn key_overlap(&self) -> Duration {
        self.key_overlap
    }

    /// Whether `protocol` may be used.
    pub fn allows(&self, protocol: Protocol) -> bool {
        self.allowed_protocols.contains(&protocol)
    }
}

/// One thing wrong with a policy.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PolicyProblem {
    /// A required key is absent.
    #[error("{key}: required key is missing ({allowed})")]
    Missing {
        /// Dotted key, e.g. `session.max_lifetime_ms`.
        key: &'static str,
        /// What a valid value looks like.
        allowed: String,
    },
    /// A value is outside what is allowed.
    #[error("{key} = {value}: out of range; allowed: {allowed}")]
    OutOfRange {
        /// Dotted key.
        key: &'static str,
        /// The offending value, as written.
        value: String,
        /// What is allowed.
        allowed: String,
    },
}

/// A policy that failed validation: every problem found, in schema order.
#[derive(Debug, Clone, PartialEq, Error)]
pub struct PolicyError {
    /// The problems, at least one.
    pub problems: Vec<PolicyProblem>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid policy ({} problem(s))", self.problems.len())?;
        for p in &self.problems {
            write!(f, "\n  - {p}")?;
        }
        Ok(())
    }
}

/// Collects problems while reading keys, so that one validation reports all of them.
struct Checker {
    problems: Vec<PolicyProblem>,
}

impl Checker {
    /// A required integer key in `[lo, hi]`; returns a placeholder when invalid so that
    /// validation can go on and report the next problem too.
    fn required(&mut self, key: &'static str, v: Option<u64>, lo: u64, hi: u64) -> u64 {
        let allowed = format!("an integer in [{lo}, {hi}]");
        match v {
            None => {
                self.problems.push(PolicyProblem::Missing { key, allowed });
                lo
            }
            Some(v) => self.range(key, v, lo, hi),
        }
    }

    fn optional(
        &mut self,
        key: &'static str,
        v: Option<u64>,
        default: u64,
        lo: u64,
        hi: u64,
    ) -> u64 {
        self.range(key, v.unwrap_or(default), lo, hi)
    }

    fn range(&mut self, key: &'static str, v: u64, lo: u64, hi: u64) -> u64 {
        if (lo..=hi).contains(&v) {
            return v;
        }
        self.out_of_range(key, v, format!("an integer in [{lo}, {hi}]"));
        lo
    }

    fn out_of_range(&mut self, key: &'static str, value: impl fmt::Display, allowed: String) {
        self.problems.push(PolicyProblem::OutOfRange {
            key,
            value: value.to_string(),
            allowed,
        });
    }

    fn ms(
        &mut self,
        key: &'static str,
        v: Option<u64>,
        default: Option<u64>,
        lo: u64,
        hi: u64,
    ) -> Duration {
        let ms = match default {
            Some(d) => self.optional(key, v, d, lo, hi),
            None => self.required(key, v, lo, hi),
        };
        Duration::from_millis(ms)
    }

    fn count(&mut self, key: &'static str, v: Option<u32>, default: u32, lo: u32, hi: u32) -> u32 {
        let v = self.optional(
            key,
            v.map(u64::from),
            u64::from(default),
            u64::from(lo),
            u64::from(hi),
        );
        u32::try_from(v).unwrap_or(lo)
    }
}

const HOUR_MS: u64 = 3_600_000;
const WEEK_MS: u64 = 7 * 24 * HOUR_MS;

impl PolicyConfig {
    /// The contract's starter set, with every key present.
    pub fn starter() -> Self {
        PolicyConfig {
            version: Some("1.0".into()),
            session: SessionSection {
                max_lifetime_ms: Some(8 * HOUR_MS),
                transport_lost_ttl_ms: Some(15_000),
            },
            volatility: VolatilitySection {
                heartbeat_interval_ms: Some(500),
                heartbeat_volatile_ms: Some(2_000),
                probe_interval_ms: Some(2_000),
                loss_window_ms: Some(2_000),
                loss_volatile_threshold: Some(0.20),
                loss_min_samples: Some(5),
                max_consecutive_drops: Some(3),
                latency_volatile_ms: None,
                volatile_to_degraded_ms: Some(4_000),
            },
            switching: SwitchingSection {
                max_switches_per_min: Some(8),
                switch_cooldown_ms: Some(1_500),
                recovery_window_ms: Some(8_000),
                switch_improvement_factor: Some(1.10),
            },
            transport: TransportSection {
                allowed_protocols: Some(vec![Protocol::Udp, Protocol::Quic, Protocol::Tcp]),
                max_candidate_count: Some(3),
            },
            security: SecuritySection {
                reattach_proof_max_age_ms: Some(5_000),
                replay_window_size: Some(2_048),
                max_security_failures: Some(5),
                rekey_after_ms: Some(120_000),
                reject_after_ms: Some(180_000),
                rekey_after_packets: Some(1 << 60),
                key_overlap_ms: Some(10_000),
            },
        }
    }

    /// Checks every key and cross-key rule; returns the typed policy or every problem.
    pub fn validate(&self) -> Result<Policy, PolicyError> {
        let mut c = Checker {
            problems: Vec::new(),
        };
        let (s, v, w, t, sec) = (
            &self.session,
            &self.volatility,
            &self.switching,
            &self.transport,
            &self.security,
        );

        let version = match &self.version {
            Some(ver) if (1..=32).contains(&ver.chars().count()) => ver.clone(),
            Some(ver) => {
                c.out_of_range(
                    "version",
                    format!("{ver:?}"),
                    "a string of 1 to 32 characters".into(),
                );
                String::new()
            }
            None => "1.0".into(),
        };

        let max_lifetime = c.ms(
            "session.max_lifetime_ms",
            s.max_lifetime_ms,
            None,
            1_000,
            WEEK_MS,
        );
        let transport_lost_ttl = c.ms(
            "session.transport_lost_ttl_ms",
            s.transport_lost_ttl_ms,
            None,
            100,
            HOUR_MS,
        );
        let heartbeat_interval = c.ms(
            "volatility.heartbeat_interval_ms",
            v.heartbeat_interval_ms,
            Some(500),
            10,
            60_000,
        );
        let heartbeat_volatile = c.ms(
            "volatility.heartbeat_volatile_ms",
            v.heartbeat_volatile_ms,
            Some(2_000),
            20,
            600_000,
        );
        let probe_interval = c.ms(
            "volatility.probe_interval_ms",
            v.probe_interval_ms,
            Some(2_000),
            10,
            600_000,
        );
        let loss_window = c.ms(
            "volatility.loss_window_ms",
            v.loss_window_ms,
            Some(2_000),
            100,
            600_000,
        );
        let loss_volatile_threshold = match v.loss_volatile_threshold {
            None => {
                c.problems.push(PolicyProblem::Missing {
                    key: "volatility.loss_volatile_threshold",
                    allowed: "a number in (0, 1]".into(),
                });
                1.0
            }
            Some(x) if x.is_finite() && x > 0.0 && x <= 1.0 => x,
            Some(x) => {
                c.out_of_range(
                    "volatility.loss_volatile_threshold",
                    x,
                    "a number in (0, 1]".into(),
                );
                1.0
            }
        };
        let loss_min_samples = c.count(
            "volatility.loss_min_samples",
            v.loss_min_samples,
            5,
            1,
            10_000,
        );
        let max_consecutive_drops = c.count(
            "volatility.max_consecutive_drops",
            v.max_consecutive_drops,
            3,
            1,
            1_000,
        );
        let latency_volatile = v.latency_volatile_ms.map(|ms| {
            Duration::from_millis(c.range("volatility.latency_volatile_ms", ms, 1, 60_000))
        });
        let volatile_to_degraded = c.ms(
            "volatility.volatile_to_degraded_ms",
            v.volatile_to_degraded_ms,
            Some(4_000),
            1,
            HOUR_MS,
        );

        let max_switches_per_min = match w.max_switches_per_min {
            None => {
                c.problems.push(PolicyProblem::Missing {
                    key: "switching.max_switches_per_min",
                    allowed: "an integer in [0, 600]".into(),
                });
                0
            }
            Some(n) => c.count("switching.max_switches_per_min", Some(n), 0, 0, 600),
        };
        let switch_cooldown = c.ms(
            "switching.switch_cooldown_ms",
            w.switch_cooldown_ms,
            Some(1_500),
            0,
            600_000,
        );
        let recovery_window = c.ms(
            "switching.recovery_window_ms",
            w.recovery_window_ms,
            None,
            1,
            600_000,
        );
        let switch_improvement_factor = match w.switch_improvement_factor.unwrap_or(1.10) {
            x if x.is_finite() && (1.0..=10.0).contains(&x) => x,
            x => {
                c.out_of_range(
                    "switching.switch_improvement_factor",
                    x,
                    "a number in [1, 10]".into(),
                );
                1.0
            }
        };

        let allowed_protocols = t
            .allowed_protocols
            .clone()
            .unwrap_or_else(|| vec![Protocol::Udp, Protocol::Quic, Protocol::Tcp]);
        let duplicated = (1..allowed_protocols.len())
            .any(|i| allowed_protocols[..i].contains(&allowed_protocols[i]));
        if allowed_protocols.is_empty() || duplicated {
            c.out_of_range(
                "transport.allowed_protocols",
                format!("{allowed_protocols:?}"),
                "a non-empty list of distinct \"udp\", \"quic\", \"tcp\"".into(),
            );
        }
        let max_candidate_count = c.count(
            "transport.max_candidate_count",
            t.max_candidate_count,
            3,
            1,
            16,
        ) as usize;

        let reattach_proof_max_age = c.ms(
            "security.reattach_proof_max_age_ms",
            sec.reattach_proof_max_age_ms,
            None,
            1,
            600_000,
        );
        let replay_window_size = c.count(
            "security.replay_window_size",
            sec.replay_window_size,
            2_048,
            2_048,
            65_536,
        );
        if !replay_window_size.is_power_of_two() {
            c.out_of_range(
                "security.replay_window_size",
                replay_window_size,
                "a power of two in [2048, 65536]".into(),
            );
        }
        let max_security_failures = c.count(
            "security.max_security_failures",
            sec.max_security_failures,
            5,
            1,
            1_000,
        );

        let rekey_after = c.ms(
            "security.rekey_after_ms",
            sec.rekey_after_ms,
            Some(120_000),
            1_000,
            HOUR_MS,
        );
        let reject_after = c.ms(
            "security.reject_after_ms",
            sec.reject_after_ms,
            Some(180_000),
            1_000,
            2 * HOUR_MS,
        );
        let rekey_after_packets = c.optional(
            "security.rekey_after_packets",
            sec.rekey_after_packets,
            1 << 60,
            16,
            1 << 60,
        );
        let key_overlap = c.ms(
            "security.key_overlap_ms",
            sec.key_overlap_ms,
            Some(10_000),
            100,
            600_000,
        );

        // Cross-key rules: each names the key whose value breaks it.
        if reject_after <= rekey_after {
            c.out_of_range(
                "security.reject_after_ms",
                reject_after.as_millis(),
                format!(
                    "more than security.rekey_after_ms ({} ms), so that a rekey can finish \
                     before the keys are refused",
                    rekey_after.as_millis()
                ),
            );
        }
        if heartbeat_volatile <= heartbeat_interval {
            c.out_of_range(
                "volatility.heartbeat_volatile_ms",
                heartbeat_volatile.as_millis(),
                format!(
                    "more than volatility.heartbeat_interval_ms ({} ms)",
                    heartbeat_interval.as_millis()
                ),
            );
        }
        if loss_window < heartbeat_interval {
            c.out_of_range(
                "volatility.loss_window_ms",
                loss_window.as_millis(),
                format!(
                    "at least volatility.heartbeat_interval_ms ({} ms)",
                    heartbeat_interval.as_millis()
                ),
            );
        }
        if transport_lost_ttl <= heartbeat_volatile {
            c.out_of_range(
                "session.transport_lost_ttl_ms",
                transport_lost_ttl.as_millis(),
                format!(
                    "more than volatility.heartbeat_volatile_ms ({} ms), so that a dead path is \
                     noticed before the session is given up",
                    heartbeat_volatile.as_millis()
                ),
            );
        }
        if transport_lost_ttl > max_lifetime {
            c.out_of_range(
                "session.transport_lost_ttl_ms",
                transport_lost_ttl.as_millis(),
                format!(
                    "at most session.max_lifetime_ms ({} ms)",
                    max_lifetime.as_millis()
                ),
            );
        }

        if !c.problems.is_empty() {
            return Err(PolicyError {
                problems: c.problems,
            });
        }
        Ok(Policy {
            version,
            max_lifetime,
            transport_lost_ttl,
            heartbeat_interval,
            heartbeat_volatile,
            probe_interval,
            loss_window,
            loss_volatile_threshold,
            loss_min_samples,
            max_consecutive_drops,
            latency_volatile,
            volatile_to_degraded,
            max_switches_per_min,
            switch_cooldown,
            recovery_window,
            switch_improvement_factor,
            allowed_protocols,
            max_candidate_count,
            reattach_proof_max_age,
            replay_window_size,
            max_security_failures,
            rekey_after,
            reject_after,
            rekey_after_packets,
            key_overlap,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(err: &PolicyError) -> Vec<&'static str> {
        err.problems
            .iter()
            .map(|p| match p {
                PolicyProblem::Missing { key, .. } | PolicyProblem::OutOfRange { key, .. } => *key,
            })
            .collect()
    }

    #[test]
    fn starter_set_is_valid_and_matches_the_contract() {
        let p = Policy::default();
        assert_eq!(p.max_lifetime(), Duration::from_secs(8 * 3600));
        assert_eq!(p.transport_lost_ttl(), Duration::from_secs(15));
        assert_eq!(p.heartbeat_interval(), Duration::from_millis(500));
        assert_eq!(p.heartbeat_volatile(), Duration::from_millis(2_000));
        assert_eq!(p.loss_volatile_threshold(), 0.20);
        assert_eq!(p.max_switches_per_min(), 8);
        assert_eq!(p.switch_cooldown(), Duration::from_millis(1_500));
        assert_eq!(p.recovery_window(), Duration::from_millis(8_000));
        assert_eq!(p.max_candidate_count(), 3);
        assert_eq!(p.replay_window_size(), 2_048);
        assert_eq!(p.version(), "1.0");
    }

    #[test]
    fn an_empty_config_names_every_required_key() {
        let err = PolicyConfig::default()
            .validate()
            .expect_err("empty policy accepted");
        assert_eq!(
            keys(&err)[..6],
            [
                "session.max_lifetime_ms",
                "session.transport_lost_ttl_ms",
                "volatility.loss_volatile_threshold",
                "switching.max_switches_per_min",
                "switching.recovery_window_ms",
                "security.reattach_proof_max_age_ms",
            ]
        );
        assert!(err.problems[..6]
            .iter()
            .all(|p| matches!(p, PolicyProblem::Missing { .. })));
    }

    #[test]
    fn out_of_range_values_name_key_value_and_allowed_range() {
        let mut cfg = PolicyConfig::starter();
        cfg.volatility.loss_volatile_threshold = Some(0.0);
        cfg.switching.switch_improvement_factor = Some(f64::NAN);
        cfg.security.replay_window_size = Some(3000);
        cfg.transport.max_candidate_count = Some(0);
        let err = cfg.validate().expect_err("bad policy accepted");
        assert_eq!(
            keys(&err),
            [
                "volatility.loss_volatile_threshold",
                "switching.switch_improvement_factor",
                "transport.max_candidate_count",
                "security.replay_window_size",
            ]
        );
        let text = err.to_string();
        assert!(
            text.contains(
                "volatility.loss_volatile_threshold = 0: out of range; allowed: a number in (0, 1]"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "security.replay_window_size = 3000: out of range; \
                 allowed: a power of two in [2048, 65536]"
            ),
            "{text}"
        );
    }

    #[test]
    fn heartbeat_volatile_must_exceed_the_interval() {
        let mut cfg = PolicyConfig::starter();
        cfg.volatility.heartbeat_volatile_ms = Some(500);
        let err = cfg.validate().expect_err("accepted");
        assert_eq!(keys(&err), ["volatility.heartbeat_volatile_ms"]);
    }

    #[test]
    fn ttl_must_exceed_heartbeat_timeout_and_not_exceed_lifetime() {
        let mut cfg = PolicyConfig::starter();
        cfg.session.transport_lost_ttl_ms = Some(2_000);
        assert_eq!(
            keys(&cfg.validate().expect_err("accepted")),
            ["session.transport_lost_ttl_ms"]
        );
        cfg.session.transport_lost_ttl_ms = Some(60_000);
        cfg.session.max_lifetime_ms = Some(30_000);
        assert_eq!(
            keys(&cfg.validate().expect_err("accepted")),
            ["session.transport_lost_ttl_ms"]
        );
    }

    #[test]
    fn protocols_must_be_distinct_and_non_empty() {
        let mut cfg = PolicyConfig::starter();
        cfg.transport.allowed_protocols = Some(vec![]);
        assert_eq!(
            keys(&cfg.validate().expect_err("accepted")),
            ["transport.allowed_protocols"]
        );
        cfg.transport.allowed_protocols = Some(vec![Protocol::Udp, Protocol::Udp]);
        assert_eq!(
            keys(&cfg.validate().expect_err("accepted")),
            ["transport.allowed_protocols"]
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_the_schema() {
        let typo = r#"{"session": {"max_lifetime": 5}}"#;
        let err = serde_json::from_str::<PolicyConfig>(typo).expect_err("typo accepted");
        assert!(
            err.to_string().contains("unknown field `max_lifetime`"),
            "{err}"
        );
        let negative = r#"{"session": {"max_lifetime_ms": -5}}"#;
        assert!(serde_json::from_str::<PolicyConfig>(negative).is_err());
        let proto = r#"{"transport": {"allowed_protocols": ["udp", "sctp"]}}"#;
        assert!(serde_json::from_str::<PolicyConfig>(proto).is_err());
    }

    #[test]
    fn optional_keys_fall_back_to_the_starter_defaults() {
        let only_required = r#"{
            "session": {"max_lifetime_ms": 60000, "transport_lost_ttl_ms": 5000},
            "volatility": {"loss_volatile_threshold": 0.5},
            "switching": {"max_switches_per_min": 2, "recovery_window_ms": 1000},
            "security": {"reattach_proof_max_age_ms": 1000}
        }"#;
        let cfg: PolicyConfig = serde_json::from_str(only_required).expect("parse");
        let p = cfg.validate().expect("valid");
        assert_eq!(p.heartbeat_interval(), Duration::from_millis(500));
        assert_eq!(p.switch_cooldown(), Duration::from_millis(1_500));
        assert_eq!(p.max_switches_per_min(), 2);
        assert_eq!(p.loss_volatile_threshold(), 0.5);
    }
}
