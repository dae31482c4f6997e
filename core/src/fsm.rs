//! The session state machine: six states, the transition table, and `state_version`.
//!
//! This module is the only place that decides whether a state change is allowed. Every
//! input is an [`FsmEvent`] whose payload says *why* (and so carries its reason code);
//! [`transition`] is the table as one pure function, and [`StateMachine::apply`] is the
//! only mutation, bumping the version by exactly one. An event the table does not define
//! is an error value and changes nothing.

use std::fmt;

use serde::Serialize;
use thiserror::Error;

use crate::ids::StateVersion;
use crate::reason::ReasonCode;

/// A session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// Created; no handshake finished yet and no transport bound.
    Birth,
    /// Exactly one healthy transport bound.
    Attached,
    /// The bound transport shows instability; a switch is being considered.
    Volatile,
    /// Volatility persisted or recovery failed; the session waits for a usable candidate.
    Degraded,
    /// A reattach on a candidate transport is in flight.
    Recovering,
    /// Ended. Absorbing: no event leaves it.
    Terminated,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 6] = [
        State::Birth,
        State::Attached,
        State::Volatile,
        State::Degraded,
        State::Recovering,
        State::Terminated,
    ];

    /// The stable upper-case name used in events and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Birth => "BIRTH",
            State::Attached => "ATTACHED",
            State::Volatile => "VOLATILE",
            State::Degraded => "DEGRADED",
            State::Recovering => "RECOVERING",
            State::Terminated => "TERMINATED",
        }
    }
}

impl std::str::FromStr for State {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        State::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| format!("no state named {s:?}"))
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What made the bound transport unstable (ATTACHED → VOLATILE).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Instability {
    /// Loss ratio over the loss window above the threshold.
    LossThreshold,
    /// Consecutive losses reached the limit.
    ConsecutiveDrops,
    /// No heartbeat answer within heartbeat_volatile_ms.
    HeartbeatTimeout,
    /// The transport reported itself dead.
    TransportDead,
    /// Round-trip p95 above the configured latency threshold.
    LatencyThreshold,
}

impl Instability {
    /// The reason code this cause is reported with.
    pub fn reason(self) -> ReasonCode {
        match self {
            Instability::LossThreshold => ReasonCode::LossThresholdExceeded,
            Instability::ConsecutiveDrops => ReasonCode::ConsecutiveDropExceeded,
            Instability::HeartbeatTimeout => ReasonCode::HeartbeatTimeout,
            Instability::TransportDead => ReasonCode::TransportDead,
            Instability::LatencyThreshold => ReasonCode::LatencyThresholdExceeded,
        }
    }

    /// The recovery a switch away from this cause is reported as.
    pub fn recovery(self) -> SwitchCause {
        match self {
            Instability::TransportDead | Instability::HeartbeatTimeout => {
                SwitchCause::DeadTransport
            }
            Instability::LossThreshold
            | Instability::ConsecutiveDrops
            | Instability::LatencyThreshold => SwitchCause::Loss,
        }
    }
}

/// Why a switch was initiated (VOLATILE/DEGRADED → RECOVERING).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SwitchCause {
    /// Away from a lossy or slow transport.
    Loss,
    /// Away from a dead transport.
    DeadTransport,
    /// Forced by an operator or by policy.
    PolicyForced,
}

impl SwitchCause {
    /// The reason code this cause is reported with.
    pub fn reason(self) -> ReasonCode {
        match self {
            SwitchCause::Loss => ReasonCode::LossRecovery,
            SwitchCause::DeadTransport => ReasonCode::DeadTransportRecovery,
            SwitchCause::PolicyForced => ReasonCode::PolicyForcedRecovery,
        }
    }
}

/// Why a recovery ended without a new binding (RECOVERING → DEGRADED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecoveryFailure {
    /// The peer refused the reattach.
    ValidationFailed,
    /// The candidate disappeared before the reattach completed.
    NoCandidate,
    /// Policy forbids the reattach.
    PolicyDenied,
    /// No answer within the recovery window.
    WindowExpired,
}

impl RecoveryFailure {
    /// The reason code this failure is reported with.
    pub fn reason(self) -> ReasonCode {
        match self {
            RecoveryFailure::ValidationFailed => ReasonCode::ReattachValidationFailed,
            RecoveryFailure::NoCandidate => ReasonCode::NoCandidateTransports,
            RecoveryFailure::PolicyDenied => ReasonCode::PolicyDenied,
            RecoveryFailure::WindowExpired => ReasonCode::RecoveryWindowExpired,
        }
    }
}

/// Why a session ended (any state except TERMINATED → TERMINATED).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TerminationCause {
    /// session.max_lifetime_ms passed.
    LifetimeExceeded,
    /// Nothing heard from the peer for session.transport_lost_ttl_ms.
    TransportTtlExceeded,
    /// Too many security failures.
    SecurityFailure,
    /// An operator command.
    Operator,
    /// The peer announced the end of the session.
    Peer,
    /// The runtime driving the session failed and could not be restarted.
    RuntimeFailure,
}

impl TerminationCause {
    /// The cause of an end the peer announced with `reason` in an authenticated
    /// Terminate: an operator's command at the other end (`operator_terminated`) is
    /// reported as such on both sides; any other announced end is `peer_terminated`.
    pub fn announced(reason: ReasonCode) -> Self {
        match reason {
            ReasonCode::OperatorTerminated => TerminationCause::Operator,
            _ => TerminationCause::Peer,
        }
    }

    /// The reason code this cause is reported with.
    pub fn reason(self) -> ReasonCode {
        match self {
            TerminationCause::LifetimeExceeded => ReasonCode::SessionLifetimeExceeded,
            TerminationCause::TransportTtlExceeded => ReasonCode::TransportTtlExceeded,
            TerminationCause::SecurityFailure => ReasonCode::SecurityFailure,
            TerminationCause::Operator => ReasonCode::OperatorTerminated,
            TerminationCause::Peer => ReasonCode::PeerTerminated,
            TerminationCause::RuntimeFailure => ReasonCode::RuntimeFailure,
        }
    }
}

/// An input to the state machine. The payload is the cause, so the reason code of the
/// resulting transition is never chosen separately from the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FsmEvent {
    /// Handshake done and first transport bound.
    AttachOk,
    /// The bound transport became unstable.
    InstabilityDetected(Instability),
    /// A switch to a candidate transport begins.
    SwitchInitiated(SwitchCause),
    /// Volatility lasted longer than volatile_to_degraded_ms.
    VolatilePersisted,
    /// The switch budget is spent while volatile.
    SwitchRateLimited,
    /// The reattach was accepted.
    ReattachValid,
    /// The reattach failed.
    ReattachFailed(RecoveryFailure),
    /// The session must end.
    Terminate(TerminationCause),
}

impl FsmEvent {
    /// The event's stable name, used when an undefined event is reported.
    pub fn name(&self) -> &'static str {
        match self {
            FsmEvent::AttachOk => "attach_ok",
            FsmEvent::InstabilityDetected(_) => "instability_detected",
            FsmEvent::SwitchInitiated(_) => "switch_initiated",
            FsmEvent::VolatilePersisted => "volatile_persisted",
            FsmEvent::SwitchRateLimited => "switch_rate_limited",
            FsmEvent::ReattachValid => "reattach_valid",
            FsmEvent::ReattachFailed(_) => "reattach_failed",
            FsmEvent::Terminate(_) => "terminate",
        }
    }

    /// The reason code a transition caused by this event carries.
    pub fn reason(&self) -> ReasonCode {
        match self {
            FsmEvent::AttachOk => ReasonCode::AttachedToTransport,
            FsmEvent::InstabilityDetected(cause) => cause.reason(),
            FsmEvent::SwitchInitiated(cause) => cause.reason(),
            FsmEvent::VolatilePersisted => ReasonCode::VolatilePersisted,
            FsmEvent::SwitchRateLimited => ReasonCode::SwitchRateLimited,
            FsmEvent::ReattachValid => ReasonCode::ReattachSuccess,
            FsmEvent::ReattachFailed(failure) => failure.reason(),
            FsmEvent::Terminate(cause) => cause.reason(),
        }
    }
}

/// The transition table: the state `event` leads to from `from`, or `None` where the
/// table does not define the pair.
pub fn transition(from: State, event: &FsmEvent) -> Option<State> {
    use FsmEvent as E;
    use State as S;
    match (from, event) {
        (S::Terminated, _) => None,
        (_, E::Terminate(_)) => Some(S::Terminated),
        (S::Birth, E::AttachOk) => Some(S::Attached),
        (S::Attached, E::InstabilityDetected(_)) => Some(S::Volatile),
        (S::Volatile | S::Degraded, E::SwitchInitiated(_)) => Some(S::Recovering),
        (S::Volatile, E::VolatilePersisted | E::SwitchRateLimited) => Some(S::Degraded),
        (S::Recovering, E::ReattachValid) => Some(S::Attached),
        (S::Recovering, E::ReattachFailed(_)) => Some(S::Degraded),
        _ => None,
    }
}

/// One applied state change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
    /// Why.
    pub reason: ReasonCode,
    /// The version after this mutation.
    pub version: StateVersion,
}

/// An event the transition table does not define for the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("event {} is not defined in state {state}", event.name())]
pub struct InvalidTransition {
    /// The state the session was (and still is) in.
    pub state: State,
    /// The refused event.
    pub event: FsmEvent,
}

/// A session's state and version; [`StateMachine::apply`] is the only way to change them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateMachine {
    state: State,
    version: StateVersion,
}

impl Default for StateMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl StateMachine {
    /// A new session in BIRTH at version 0.
    pub fn new() -> Self {
        StateMachine {
            state: State::Birth,
            version: StateVersion(0),
        }
    }

    /// A session taken over from another node (spec/cluster.md): it goes on from the
    /// state and version its record holds, not from BIRTH.
    pub fn resume(state: State, version: StateVersion) -> Self {
        StateMachine { state, version }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The number of mutations so far.
    pub fn version(&self) -> StateVersion {
        self.version
    }

    /// Applies `event`: on success the state changes and the version grows by one; on
    /// error nothing changes.
    pub fn apply(&mut self, event: FsmEvent) -> Result<Transition, InvalidTransition> {
        let Some(to) = transition(self.state, &event) else {
            return Err(InvalidTransition {
                state: self.state,
                event,
            });
        };
        let from = self.state;
        self.state = to;
        self.version = self.version.next();
        Ok(Transition {
            from,
            to,
            reason: event.reason(),
            version: self.version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One event of every kind and every cause, so the table test covers all pairs.
    fn all_events() -> Vec<FsmEvent> {
        use FsmEvent as E;
        let mut events = vec![
            E::AttachOk,
            E::VolatilePersisted,
            E::SwitchRateLimited,
            E::ReattachValid,
        ];
        for c in [
            Instability::LossThreshold,
            Instability::ConsecutiveDrops,
            Instability::HeartbeatTimeout,
            Instability::TransportDead,
            Instability::LatencyThreshold,
        ] {
            events.push(E::InstabilityDetected(c));
        }
        for c in [
            SwitchCause::Loss,
            SwitchCause::DeadTransport,
            SwitchCause::PolicyForced,
        ] {
            events.push(E::SwitchInitiated(c));
        }
        for c in [
            RecoveryFailure::ValidationFailed,
            RecoveryFailure::NoCandidate,
            RecoveryFailure::PolicyDenied,
            RecoveryFailure::WindowExpired,
        ] {
            events.push(E::ReattachFailed(c));
        }
        for c in [
            TerminationCause::LifetimeExceeded,
            TerminationCause::TransportTtlExceeded,
            TerminationCause::SecurityFailure,
            TerminationCause::Operator,
            TerminationCause::Peer,
            TerminationCause::RuntimeFailure,
        ] {
            events.push(E::Terminate(c));
        }
        events
    }

    /// The contract's table written out independently of `transition`, as
    /// (from, event name, to) rows; termination rows are added for every live state.
    fn expected(from: State, event: &FsmEvent) -> Option<(State, ReasonCode)> {
        use State as S;
        let rows: &[(State, &str, State)] = &[
            (S::Birth, "attach_ok", S::Attached),
            (S::Attached, "instability_detected", S::Volatile),
            (S::Volatile, "switch_initiated", S::Recovering),
            (S::Volatile, "volatile_persisted", S::Degraded),
            (S::Volatile, "switch_rate_limited", S::Degraded),
            (S::Degraded, "switch_initiated", S::Recovering),
            (S::Recovering, "reattach_valid", S::Attached),
            (S::Recovering, "reattach_failed", S::Degraded),
        ];
        if from != S::Terminated && event.name() == "terminate" {
            return Some((S::Terminated, event.reason()));
        }
        rows.iter()
            .find(|(f, name, _)| *f == from && *name == event.name())
            .map(|(_, _, to)| (*to, event.reason()))
    }

    #[test]
    fn every_state_event_pair_matches_the_contract_table() {
        let mut defined = 0;
        for from in State::ALL {
            for event in all_events() {
                let mut fsm = StateMachine {
                    state: from,
                    version: StateVersion(41),
                };
                let result = fsm.apply(event);
                match expected(from, &event) {
                    Some((to, reason)) => {
                        defined += 1;
                        let t = result.unwrap_or_else(|e| panic!("{from} + {event:?}: {e}"));
                        assert_eq!((t.from, t.to, t.reason), (from, to, reason));
                        assert_eq!(t.version, StateVersion(42));
                        assert_eq!(fsm.state(), to);
                    }
                    None => {
                        let err = result.expect_err("undefined pair must be refused");
                        assert_eq!(err.state, from);
                        assert_eq!(fsm.state(), from, "refused event changed the state");
                        assert_eq!(fsm.version(), StateVersion(41), "refused event bumped");
                    }
                }
            }
        }
        // 1 attach + 5 instability + 3 + 2 + 3 + 1 + 4 rows, + 6 causes × 5 live states.
        assert_eq!(defined, 1 + 5 + 3 + 2 + 3 + 1 + 4 + 30);
    }

    /// Each cause's reason code, written out from the contract rather than derived from
    /// the code under test.
    #[test]
    fn every_event_carries_the_contract_reason_code() {
        use FsmEvent as E;
        let expected: &[(FsmEvent, &str)] = &[
            (E::AttachOk, "attached_to_transport"),
            (
                E::InstabilityDetected(Instability::LossThreshold),
                "loss_threshold_exceeded",
            ),
            (
                E::InstabilityDetected(Instability::ConsecutiveDrops),
                "consecutive_drop_exceeded",
            ),
            (
                E::InstabilityDetected(Instability::HeartbeatTimeout),
                "heartbeat_timeout",
            ),
            (
                E::InstabilityDetected(Instability::TransportDead),
                "transport_dead",
            ),
            (
                E::InstabilityDetected(Instability::LatencyThreshold),
                "latency_threshold_exceeded",
            ),
            (E::SwitchInitiated(SwitchCause::Loss), "loss_recovery"),
            (
                E::SwitchInitiated(SwitchCause::DeadTransport),
                "dead_transport_recovery",
            ),
            (
                E::SwitchInitiated(SwitchCause::PolicyForced),
                "policy_forced_recovery",
            ),
            (E::VolatilePersisted, "volatile_persisted"),
            (E::SwitchRateLimited, "switch_rate_limited"),
            (E::ReattachValid, "reattach_success"),
            (
                E::ReattachFailed(RecoveryFailure::ValidationFailed),
                "reattach_validation_failed",
            ),
            (
                E::ReattachFailed(RecoveryFailure::NoCandidate),
                "no_candidate_transports",
            ),
            (
                E::ReattachFailed(RecoveryFailure::PolicyDenied),
                "policy_denied",
            ),
            (
                E::ReattachFailed(RecoveryFailure::WindowExpired),
                "recovery_window_expired",
            ),
            (
                E::Terminate(TerminationCause::LifetimeExceeded),
                "session_lifetime_exceeded",
            ),
            (
                E::Terminate(TerminationCause::TransportTtlExceeded),
                "transport_ttl_exceeded",
            ),
            (
                E::Terminate(TerminationCause::SecurityFailure),
                "security_failure",
            ),
            (
                E::Terminate(TerminationCause::Operator),
                "operator_terminated",
            ),
            (E::Terminate(TerminationCause::Peer), "peer_terminated"),
            (
                E::Terminate(TerminationCause::RuntimeFailure),
                "runtime_failure",
            ),
        ];
        assert_eq!(
            expected.len(),
            all_events().len(),
            "an event is missing here"
        );
        for (event, reason) in expected {
            assert_eq!(event.reason().as_str(), *reason, "{event:?}");
        }
    }

    #[test]
    fn volatile_never_goes_straight_to_attached() {
        for event in all_events() {
            assert_ne!(transition(State::Volatile, &event), Some(State::Attached));
        }
    }

    #[test]
    fn terminated_is_absorbing() {
        for event in all_events() {
            assert_eq!(transition(State::Terminated, &event), None);
        }
    }
}
