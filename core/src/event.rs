//! Events: one typed record per thing that happened, serialized as one JSON line.
//!
//! The core stamps events with the monotonic [`Instant`] it was given; the driver wraps
//! them in an [`EventRecord`] with wall-clock milliseconds (through a [`WallClock`]
//! anchor), the node id and the policy version. Field names and the `event_type` strings
//! are the contract in spec/events.md.

use std::time::Instant;

use serde::Serialize;

use crate::fsm::State;
use crate::ids::{NodeId, Protocol, SessionId, StateVersion, TransportId};
use crate::reason::ReasonCode;

/// A transport as named in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TransportRef {
    /// Its id within the session.
    pub id: TransportId,
    /// Its kind.
    pub protocol: Protocol,
}

/// The outcome of a reattach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReattachOutcome {
    /// Accepted: the candidate is now the active transport.
    Success,
    /// Refused: no binding changed.
    Denied,
}

/// What happened. The variant name is the JSON `event_type`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event_type")]
pub enum EventBody {
    /// A state transition (exactly one per state_version increment).
    SessionStateChange {
        /// State before.
        previous_state: State,
        /// State after.
        new_state: State,
        /// Why.
        reason_code: ReasonCode,
        /// Version after the change.
        state_version: StateVersion,
    },
    /// An event the transition table does not define for the state; nothing changed.
    TransitionRejected {
        /// The state the session stayed in.
        state: State,
        /// The refused event's name.
        event: &'static str,
        /// Always invalid_transition.
        reason_code: ReasonCode,
        /// The unchanged version.
        state_version: StateVersion,
    },
    /// The first transport was bound.
    TransportAttached {
        /// The bound transport.
        transport: TransportRef,
        /// attached_to_transport.
        reason_code: ReasonCode,
    },
    /// The active binding moved from one transport to another, in one step.
    TransportSwitch {
        /// The retired transport, if there was one.
        previous_transport: Option<TransportRef>,
        /// The newly active transport.
        new_transport: TransportRef,
        /// Candidates known when the switch was made.
        candidate_count: usize,
        /// The new transport's loss ratio when chosen.
        loss_ratio: f64,
        /// Its smoothed RTT when chosen, if measured.
        latency_estimate_ms: Option<f64>,
        /// True when the client asked (a reattach); false when the gateway followed a
        /// roaming client's new address after validating it.
        explicit: bool,
    },
    /// A switch was wanted but not started.
    TransportSwitchDenied {
        /// switch_rate_limited, cooldown_active, no_valid_candidate or policy_denied.
        reason_code: ReasonCode,
        /// Candidates known when it was denied.
        candidate_count: usize,
    },
    /// A reattach was sent on a candidate transport.
    ReattachAttempt {
        /// The candidate.
        candidate_transport: TransportRef,
        /// Milliseconds from this event to the end of the recovery window.
        recovery_deadline_ms: u64,
    },
    /// A reattach ended.
    ReattachResult {
        /// The candidate.
        candidate_transport: TransportRef,
        /// SUCCESS or DENIED.
        result: ReattachOutcome,
        /// reattach_success, or why it was denied.
        reason_code: ReasonCode,
    },
    /// The session ended.
    SessionTerminated {
        /// Why.
        reason_code: ReasonCode,
        /// Age of the session.
        session_age_ms: u64,
        /// How long nothing had been heard from the peer.
        transportless_age_ms: u64,
    },
    /// A packet or request carried a counter that was already used or too old.
    SecurityReplayDetected {
        /// replay_detected.
        reason_code: ReasonCode,
        /// The replayed counter.
        counter: u64,
    },
    /// A packet or request failed authentication or validation.
    SecurityValidationFailed {
        /// Why (bad_proof, stale_request, …).
        reason_code: ReasonCode,
        /// Security failures counted for this session so far.
        failure_count: u32,
    },
    /// New session keys took effect; the session id is unchanged.
    KeyRotated {
        /// The epoch of the new keys (the first keys are epoch 0).
        key_epoch: u32,
    },
    /// Keys of an epoch were discarded.
    KeyExpired {
        /// The discarded epoch.
        key_epoch: u32,
    },
    /// A rekey was refused.
    RekeyDenied {
        /// Why.
        reason_code: ReasonCode,
    },
    /// A reloaded policy took effect on the live session (the event's envelope carries
    /// the new version already).
    PolicyApplied {
        /// The version in force before.
        previous_version: String,
        /// The version in force from now on.
        new_version: String,
    },
    /// The session moved between nodes of a gateway cluster (spec/cluster.md), with no
    /// transition: the node it left reports it as it stops forwarding the session, the
    /// node that took it as it starts.
    SessionMoved {
        /// The node that forwarded it.
        from_node: NodeId,
        /// The node that forwards it now; none when the node it left was fenced.
        to_node: Option<NodeId>,
        /// session_moved or node_fenced.
        reason_code: ReasonCode,
    },
}

impl EventBody {
    /// The JSON `event_type` string.
    pub fn event_type(&self) -> &'static str {
        match self {
            EventBody::SessionStateChange { .. } => "SessionStateChange",
            EventBody::TransitionRejected { .. } => "TransitionRejected",
            EventBody::TransportAttached { .. } => "TransportAttached",
            EventBody::TransportSwitch { .. } => "TransportSwitch",
            EventBody::TransportSwitchDenied { .. } => "TransportSwitchDenied",
            EventBody::ReattachAttempt { .. } => "ReattachAttempt",
            EventBody::ReattachResult { .. } => "ReattachResult",
            EventBody::SessionTerminated { .. } => "SessionTerminated",
            EventBody::SecurityReplayDetected { .. } => "SecurityReplayDetected",
            EventBody::SecurityValidationFailed { .. } => "SecurityValidationFailed",
            EventBody::KeyRotated { .. } => "KeyRotated",
            EventBody::KeyExpired { .. } => "KeyExpired",
            EventBody::RekeyDenied { .. } => "RekeyDenied",
            EventBody::PolicyApplied { .. } => "PolicyApplied",
            EventBody::SessionMoved { .. } => "SessionMoved",
        }
    }
}

/// An event as the core emits it: when (monotonic) and what.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionEvent {
    /// The instant the core was given when it happened.
    pub at: Instant,
    /// What happened.
    pub body: EventBody,
}

/// Maps monotonic instants to wall-clock milliseconds for event timestamps: read once
/// by the driver, so that ordering in the stream follows the monotonic clock even if
/// the wall clock jumps.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    anchor: Instant,
    anchor_unix_ms: u64,
}

impl WallClock {
    /// `anchor` and `anchor_unix_ms` name the same moment.
    pub fn new(anchor: Instant, anchor_unix_ms: u64) -> Self {
        WallClock {
            anchor,
            anchor_unix_ms,
        }
    }

    /// Milliseconds since the Unix epoch at `at`.
    pub fn ts_ms(&self, at: Instant) -> u64 {
        let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        match at.checked_duration_since(self.anchor) {
            Some(after) => self.anchor_unix_ms.saturating_add(ms(after)),
            None => self
                .anchor_unix_ms
                .saturating_sub(ms(self.anchor.saturating_duration_since(at))),
        }
    }
}

/// One line of the event stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    /// Wall-clock milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The session concerned.
    pub session_id: SessionId,
    /// The node that emitted the event.
    pub node_id: NodeId,
    /// The policy version in force.
    pub policy_version: String,
    /// What happened, flattened into the same JSON object (with `event_type`).
    #[serde(flatten)]
    pub body: EventBody,
}

impl EventRecord {
    /// Wraps a core event with the driver's context.
    pub fn new(
        clock: &WallClock,
        session_id: SessionId,
        node_id: NodeId,
        policy_version: String,
        event: SessionEvent,
    ) -> Self {
        EventRecord {
            ts_ms: clock.ts_ms(event.at),
            session_id,
            node_id,
            policy_version,
            body: event.body,
        }
    }

    /// The record as one JSON line (no trailing newline).
    pub fn to_json_line(&self) -> String {
        match serde_json::to_string(self) {
            Ok(line) => line,
            // Every field is a plain string, number or enum: serialization cannot fail.
            // Should it ever, the event is still reported rather than lost.
            Err(e) => format!(
                r#"{{"ts_ms":{},"event_type":"{}","session_id":"{}","serialization_error":"{}"}}"#,
                self.ts_ms,
                self.body.event_type(),
                self.session_id,
                e.to_string().replace('"', "'")
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn state_change_serializes_to_the_contract_shape() {
        let t0 = Instant::now();
        let clock = WallClock::new(t0, 1_700_000_000_000);
        let rec = EventRecord::new(
            &clock,
            SessionId(0xabc),
            NodeId("gw-1".into()),
            "1.0".into(),
            SessionEvent {
                at: t0 + Duration::from_millis(1_500),
                body: EventBody::SessionStateChange {
                    previous_state: State::Attached,
                    new_state: State::Volatile,
                    reason_code: ReasonCode::HeartbeatTimeout,
                    state_version: StateVersion(2),
                },
            },
        );
        let v: serde_json::Value = serde_json::from_str(&rec.to_json_line()).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "ts_ms": 1_700_000_001_500u64,
                "event_type": "SessionStateChange",
                "session_id": "0000000000000abc",
                "node_id": "gw-1",
                "policy_version": "1.0",
                "previous_state": "ATTACHED",
                "new_state": "VOLATILE",
                "reason_code": "heartbeat_timeout",
                "state_version": 2
            })
        );
    }

    #[test]
    fn event_type_matches_the_serialized_tag() {
        let r = TransportRef {
            id: TransportId(1),
            protocol: Protocol::Udp,
        };
        let bodies = [
            EventBody::TransportSwitch {
                previous_transport: Some(r),
                new_transport: r,
                candidate_count: 2,
                loss_ratio: 0.0,
                latency_estimate_ms: Some(1.5),
                explicit: true,
            },
            EventBody::ReattachResult {
                candidate_transport: r,
                result: ReattachOutcome::Denied,
                reason_code: ReasonCode::BadProof,
            },
            EventBody::KeyRotated { key_epoch: 1 },
        ];
        for body in bodies {
            let v = serde_json::to_value(&body).expect("json");
            assert_eq!(v["event_type"], body.event_type());
        }
    }

    #[test]
    fn wall_clock_maps_instants_before_and_after_the_anchor() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let clock = WallClock::new(t0, 10_000);
        assert_eq!(clock.ts_ms(t0 + Duration::from_millis(5)), 10_005);
        assert_eq!(clock.ts_ms(t0 - Duration::from_millis(5)), 9_995);
    }
}
