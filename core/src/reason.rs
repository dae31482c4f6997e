//! Reason codes: why a transition, a denial or a termination happened.
//!
//! One enum for every code in the contract so that events, metrics labels and the spec
//! share one vocabulary. The snake_case string of each variant is stable: dashboards and
//! audits depend on it.

use std::fmt;

use serde::Serialize;

macro_rules! reason_codes {
    ($($(#[$doc:meta])* $variant:ident = $id:literal => $text:literal,)+) => {
        /// Why something happened; see spec/state-machine.md for where each code is used.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ReasonCode {
            $($(#[$doc])* $variant,)+
        }

        impl ReasonCode {
            /// Every reason code, in declaration order.
            pub const ALL: &'static [ReasonCode] = &[$(ReasonCode::$variant,)+];

            /// The stable snake_case form.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ReasonCode::$variant => $text,)+
                }
            }

            /// The stable one-byte form used on the wire (spec/wire-format.md).
            pub fn wire_id(self) -> u8 {
                match self {
                    $(ReasonCode::$variant => $id,)+
                }
            }

            /// The code with this wire id, if any.
            pub fn from_wire_id(id: u8) -> Option<ReasonCode> {
                match id {
                    $($id => Some(ReasonCode::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

reason_codes! {
    /// BIRTH → ATTACHED: the handshake finished and the first transport is bound.
    AttachedToTransport = 1 => "attached_to_transport",
    /// ATTACHED → VOLATILE: loss over the loss window passed the threshold.
    LossThresholdExceeded = 2 => "loss_threshold_exceeded",
    /// ATTACHED → VOLATILE: too many losses in a row.
    ConsecutiveDropExceeded = 3 => "consecutive_drop_exceeded",
    /// ATTACHED → VOLATILE: no heartbeat answer for longer than allowed.
    HeartbeatTimeout = 4 => "heartbeat_timeout",
    /// ATTACHED → VOLATILE: the transport reported itself dead (send error, link down).
    TransportDead = 5 => "transport_dead",
    /// ATTACHED → VOLATILE: round-trip p95 passed the configured latency threshold.
    LatencyThresholdExceeded = 6 => "latency_threshold_exceeded",
    /// VOLATILE/DEGRADED → RECOVERING: switching away from a lossy or slow transport.
    LossRecovery = 7 => "loss_recovery",
    /// VOLATILE/DEGRADED → RECOVERING: switching away from a dead transport.
    DeadTransportRecovery = 8 => "dead_transport_recovery",
    /// VOLATILE/DEGRADED → RECOVERING: an operator or policy forced the switch.
    PolicyForcedRecovery = 9 => "policy_forced_recovery",
    /// VOLATILE → DEGRADED: volatility lasted longer than volatile_to_degraded_ms.
    VolatilePersisted = 10 => "volatile_persisted",
    /// VOLATILE → DEGRADED, and switch denials: the per-minute switch budget is spent.
    SwitchRateLimited = 11 => "switch_rate_limited",
    /// RECOVERING → ATTACHED: the peer accepted the reattach.
    ReattachSuccess = 12 => "reattach_success",
    /// RECOVERING → DEGRADED: the peer refused the reattach.
    ReattachValidationFailed = 13 => "reattach_validation_failed",
    /// RECOVERING → DEGRADED: the chosen candidate vanished before the reattach completed.
    NoCandidateTransports = 14 => "no_candidate_transports",
    /// RECOVERING → DEGRADED, reattach and switch denials: policy forbids it.
    PolicyDenied = 15 => "policy_denied",
    /// RECOVERING → DEGRADED: no answer within recovery_window_ms (an addition to the
    /// digest, which left this case without its own code).
    RecoveryWindowExpired = 16 => "recovery_window_expired",
    /// → TERMINATED: the session outlived session.max_lifetime_ms.
    SessionLifetimeExceeded = 17 => "session_lifetime_exceeded",
    /// → TERMINATED, reattach denial: nothing heard for session.transport_lost_ttl_ms.
    TransportTtlExceeded = 18 => "transport_ttl_exceeded",
    /// → TERMINATED: too many security failures on this session.
    SecurityFailure = 19 => "security_failure",
    /// → TERMINATED: an operator ended the session.
    OperatorTerminated = 20 => "operator_terminated",
    /// → TERMINATED: the peer announced that it ended the session.
    PeerTerminated = 21 => "peer_terminated",
    /// Switch denial: the last switch was less than switch_cooldown_ms ago.
    CooldownActive = 22 => "cooldown_active",
    /// Switch denial: no candidate passed the filter.
    NoValidCandidate = 23 => "no_valid_candidate",
    /// Reattach denial: no such session.
    UnknownSession = 24 => "unknown_session",
    /// Reattach denial: the session's state does not allow a reattach.
    InvalidStateForReattach = 25 => "invalid_state_for_reattach",
    /// Reattach denial: the session outlived its lifetime.
    SessionExpired = 26 => "session_expired",
    /// Reattach denial: the proof of possession of the session keys did not verify.
    BadProof = 27 => "bad_proof",
    /// Reattach denial: the request's timestamp is outside the freshness window.
    StaleRequest = 28 => "stale_request",
    /// Reattach denial, data drop: this counter was seen before.
    ReplayDetected = 29 => "replay_detected",
    /// Reattach denial: the candidate transport's metadata is not usable.
    InvalidTransportCandidate = 30 => "invalid_transport_candidate",
    /// Reattach denial, store refusal: the record moved on since the caller read it.
    StaleStateVersion = 31 => "stale_state_version",
    /// Store refusal: the swap could not be applied atomically (wrong owner, record gone).
    AtomicityFailed = 32 => "atomicity_failed",
    /// An event that the transition table does not define for the current state.
    InvalidTransition = 33 => "invalid_transition",
    /// Handshake refusal: the client's static key is not in the gateway's authorized list.
    UnauthorizedClient = 34 => "unauthorized_client",
    /// Handshake refusal: the gateway holds its maximum number of sessions.
    CapacityExceeded = 35 => "capacity_exceeded",
    /// RekeyDenied: the peer did not answer a rekey in time; it will be retried.
    RekeyTimeout = 36 => "rekey_timeout",
    /// Termination: the runtime driving the session failed (its actor stopped
    /// unexpectedly more often than it may be restarted), so the session is ended
    /// explicitly rather than left half-bound.
    RuntimeFailure = 37 => "runtime_failure",
    /// Handshake refused, or a takeover not made: the cluster's session store (etcd)
    /// cannot be reached, or this node has no live lease in it (spec/cluster.md).
    StoreUnavailable = 38 => "store_unavailable",
    /// A takeover lost: another node wrote the session's record first (its swap found
    /// the record changed), so this node does not take the session.
    OwnershipConflict = 39 => "ownership_conflict",
    /// SessionMoved: the session moved to another node of the cluster (reported by the
    /// node it left and by the node that took it), without ending.
    SessionMoved = 40 => "session_moved",
    /// SessionMoved: this node could not renew its lease in time and stopped forwarding
    /// the session (fenced), without ending it; another node may take it.
    NodeFenced = 41 => "node_fenced",
}

impl fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ReasonCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn wire_ids_are_unique_and_round_trip() {
        let mut seen = HashSet::new();
        for code in ReasonCode::ALL {
            assert!(seen.insert(code.wire_id()), "duplicate wire id for {code}");
            assert_eq!(ReasonCode::from_wire_id(code.wire_id()), Some(*code));
        }
        assert_eq!(ReasonCode::from_wire_id(0), None);
    }

    #[test]
    fn every_code_has_a_unique_snake_case_form() {
        let mut seen = HashSet::new();
        for code in ReasonCode::ALL {
            let s = code.as_str();
            assert!(seen.insert(s), "duplicate reason string {s}");
            assert!(
                s.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{s} is not snake_case"
            );
        }
    }
}
