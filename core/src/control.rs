//! One session's control plane, sans-IO: state machine, transport health, candidate
//! selection, the switch budget and every timer, composed.
//!
//! Shaped like quinn-proto's `Connection`: the driver feeds inputs, each stamped with the
//! monotonic `now` it read (`add_transport`, `probe_acked`, `transport_dead`,
//! `reattach_accepted`, `handle_timeout`, …), then drains what the session decided with
//! [`SessionControl::poll_event`] and [`SessionControl::poll_action`], and sleeps until
//! [`SessionControl::next_deadline`]. Nothing here reads a clock, sleeps or does I/O, so a
//! test drives whole scenarios on a virtual clock.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::event::{EventBody, ReattachOutcome, SessionEvent, TransportRef};
use crate::fsm::{
    FsmEvent, Instability, InvalidTransition, RecoveryFailure, State, SwitchCause, TerminationCause,
};
use crate::health::{HealthSnapshot, TransportHealth};
use crate::ids::{SessionId, StateVersion, TransportId};
use crate::journal::Journal;
use crate::policy::Policy;
use crate::reason::ReasonCode;
use crate::select::{select, Candidate, SwitchDenial, SwitchLimiter};

/// Actions kept for the driver between two drains (one reattach is ever pending).
const ACTION_QUEUE_LIMIT: usize = 8;
/// Transitions one evaluation may make at one instant. The table has no cycle without a
/// reattach answer or a timer in it, so real chains are at most three long
/// (ATTACHED → VOLATILE → RECOVERING, or RECOVERING → DEGRADED → RECOVERING).
const MAX_STEPS_PER_EVALUATION: usize = 4;

/// Something the driver must do on the session's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send an authenticated reattach request on `candidate`; report the answer, with
    /// `attempt`, to
    /// [`SessionControl::reattach_accepted`] or [`SessionControl::reattach_denied`].
    Reattach {
        /// The transport to bind.
        candidate: TransportId,
        /// The recovery deadline; no answer by then counts as failed.
        deadline: Instant,
        /// Names this attempt in the answer.
        attempt: StateVersion,
    },
}

/// A security incident observed on this session's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecurityIncident {
    /// A counter that was already used or is older than the replay window.
    Replay {
        /// The offending counter.
        counter: u64,
    },
    /// Any other failed validation, with its reason code.
    Invalid(ReasonCode),
}

/// Why an input was refused. A refused input changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ControlError {
    /// The candidate list already holds transport.max_candidate_count transports.
    #[error("candidate list is full ({limit} transports)")]
    CandidateListFull {
        /// The policy's bound.
        limit: usize,
    },
    /// A transport with this id is already known.
    #[error("transport {0} is already a candidate")]
    DuplicateTransport(TransportId),
    /// The policy does not allow this protocol.
    #[error("protocol {0} is not in transport.allowed_protocols")]
    ProtocolNotAllowed(crate::ids::Protocol),
    /// No transport with this id is known.
    #[error("transport {0} is not a candidate of this session")]
    UnknownTransport(TransportId),
    /// A reattach answer for an attempt that is not the one in flight.
    #[error("reattach attempt {0} is not in flight")]
    NoReattachInFlight(StateVersion),
    /// The session has ended; it takes no more input.
    #[error("the session has terminated")]
    Terminated,
    /// The event is not defined in the current state (also reported as an event).
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
}

#[derive(Debug, Clone)]
struct TransportSlot {
    transport: TransportRef,
    health: TransportHealth,
    /// Not chosen for a recovery before this instant (its last reattach failed).
    excluded_until: Option<Instant>,
    /// Removed by the driver while it was the active binding: kept until the binding
    /// moves, then dropped.
    closed: bool,
}

#[derive(Debug, Clone, Copy)]
struct Recovery {
    candidate: TransportId,
    deadline: Instant,
    /// The version at which RECOVERING was entered: names this attempt uniquely.
    attempt: StateVersion,
}

/// One session's control plane.
#[derive(Debug, Clone)]
pub struct SessionControl {
    session_id: SessionId,
    policy: Arc<Policy>,
    fsm: Journal,
    created_at: Instant,
    /// The latest instant seen: inputs stamped earlier are treated as happening now, so
    /// that time never runs backwards inside the session.
    now: Instant,
    transports: Vec<TransportSlot>,
    active: Option<TransportId>,
    recovery: Option<Recovery>,
    limiter: SwitchLimiter,
    /// What made the session leave ATTACHED; set while VOLATILE, DEGRADED or RECOVERING.
    instability: Option<Instability>,
    volatile_deadline: Option<Instant>,
    /// Last time anything authenticated was heard from the peer, on any transport.
    last_heard: Instant,
    /// The last switch denial reported, so that a condition lasting many evaluations is
    /// reported once, not once per timer tick.
    last_denial: Option<ReasonCode>,
    security_failures: u32,
    actions: VecDeque<Action>,
    terminated_by: Option<ReasonCode>,
}

impl SessionControl {
    /// A new session in BIRTH, created at `now`.
    pub fn new(session_id: SessionId, policy: Arc<Policy>, now: Instant) -> Self {
        let limiter = SwitchLimiter::new(&policy);
        SessionControl {
            session_id,
            fsm: Journal::new(),
            created_at: now,
            now,
            transports: Vec::with_capacity(policy.max_candidate_count()),
            active: None,
            recovery: None,
            limiter,
            instability: None,
            volatile_deadline: None,
            last_heard: now,
            last_denial: None,
            security_failures: 0,
            terminated_by: None,
            actions: VecDeque::new(),
            policy,
        }
    }

    // ---- inputs -------------------------------------------------------------------

    /// Adds a candidate transport (bounded by transport.max_candidate_count).
    pub fn add_transport(
        &mut self,
        transport: TransportRef,
        now: Instant,
    ) -> Result<(), ControlError> {
        let now = self.begin(now);
        self.live()?;
        if !self.policy.allows(transport.protocol) {
            return Err(ControlError::ProtocolNotAllowed(transport.protocol));
        }
        if self.slot(transport.id).is_some() {
            return Err(ControlError::DuplicateTransport(transport.id));
        }
        if self.transports.len() >= self.policy.max_candidate_count() {
            return Err(ControlError::CandidateListFull {
                limit: self.policy.max_candidate_count(),
            });
        }
        self.transports.push(TransportSlot {
            transport,
            health: TransportHealth::new(&self.policy, now),
            excluded_until: None,
            closed: false,
        });
        self.evaluate(now);
        Ok(())
    }

    /// Removes a candidate. The active transport is marked dead instead and dropped when
    /// the binding moves; a reattach in flight on the removed one fails.
    pub fn remove_transport(&mut self, id: TransportId, now: Instant) -> Result<(), ControlError> {
        let now = self.begin(now);
        self.live()?;
        let index = self.index(id).ok_or(ControlError::UnknownTransport(id))?;
        if self.active == Some(id) {
            let slot = &mut self.transports[index];
            slot.closed = true;
            slot.health.mark_dead();
        } else {
            if self.reattach_in_flight_on(id) {
                self.fail_recovery(
                    RecoveryFailure::NoCandidate,
                    ReasonCode::NoCandidateTransports,
                    now,
                );
            }
            self.transports.retain(|s| s.transport.id != id);
        }
        self.evaluate(now);
        Ok(())
    }

    /// The handshake finished over `id`: bind it (BIRTH → ATTACHED).
    pub fn attach(&mut self, id: TransportId, now: Instant) -> Result<(), ControlError> {
        let now = self.begin(now);
        let transport = self
            .slot(id)
            .ok_or(ControlError::UnknownTransport(id))?
            .transport;
        if self.fsm.state() != State::Birth {
            self.apply(FsmEvent::AttachOk, now)?;
        }
        self.push_event(
            now,
            EventBody::TransportAttached {
                transport,
                reason_code: ReasonCode::AttachedToTransport,
            },
        );
        self.apply(FsmEvent::AttachOk, now)?;
        self.active = Some(id);
        self.mark_heard(id, now);
        self.evaluate(now);
        Ok(())
    }

    /// A heartbeat or probe numbered `seq` was sent on `id`.
    pub fn probe_sent(
        &mut self,
        id: TransportId,
        seq: u64,
        now: Instant,
    ) -> Result<(), ControlError> {
        let now = self.begin(now);
        self.live()?;
        self.slot_mut(id)?.health.probe_sent(seq, now);
        self.evaluate(now);
        Ok(())
    }

    /// The answer to probe `seq` arrived on `id`; returns its RTT if it was in flight.
    pub fn probe_acked(
        &mut self,
        id: TransportId,
        seq: u64,
        now: Instant,
    ) -> Result<Option<Duration>, ControlError> {
        let now = self.begin(now);
        self.live()?;
        let rtt = self.slot_mut(id)?.health.probe_acked(seq, now);
        if rtt.is_some() {
            self.last_heard = self.last_heard.max(now);
        }
        self.evaluate(now);
        Ok(rtt)
    }

    /// The peer reported how many of the packets sent on `id` since its last report it
    /// received (`delivered`) and missed (`dropped`).
    pub fn loss_report(
        &mut self,
        id: TransportId,
        delivered: u32,
        dropped: u32,
        now: Instant,
    ) -> Result<(), ControlError> {
        let now = self.begin(now);
        self.live()?;
        self.slot_mut(id)?
            .health
            .record_loss_report(delivered, dropped, now);
        self.evaluate(now);
        Ok(())
    }

    /// An authenticated packet arrived on `id`. Cheap, for the data path: a full
    /// evaluation runs only when a timer is due, and hearing the peer can only make
    /// things better, so nothing else needs re-evaluating.
    pub fn heard(&mut self, id: TransportId, now: Instant) -> Result<(), ControlError> {
        self.now = self.now.max(now);
        let now = self.now;
        if self.timers_due(now) {
            self.evaluate(now);
        }
        self.live()?;
        self.slot_mut(id)?;
        self.mark_heard(id, now);
        Ok(())
    }

    /// `id` reported itself dead (send error, link down, connection closed).
    pub fn transport_dead(&mut self, id: TransportId, now: Instant) -> Result<(), ControlError> {
        let now = self.begin(now);
        self.live()?;
        self.slot_mut(id)?.health.mark_dead();
        self.evaluate(now);
        Ok(())
    }

    /// `id` reported itself usable again (link up, socket reopened). A closed transport
    /// stays closed.
    pub fn transport_up(&mut self, id: TransportId, now: Instant) -> Result<(), ControlError> {
        let now = self.begin(now);
        self.live()?;
        let slot = self.slot_mut(id)?;
        if !slot.closed {
            slot.health.mark_up();
        }
        self.evaluate(now);
        Ok(())
    }

    /// The peer accepted reattach `attempt` (from [`Action::Reattach`]): its candidate
    /// becomes the one active binding, the old one retired in the same step
    /// (RECOVERING → ATTACHED). An answer to any other attempt changes nothing.
    ///
    /// Timers due by `now` fire first: an answer arriving after the recovery window is
    /// refused like any answer outside RECOVERING.
    pub fn reattach_accepted(
        &mut self,
        attempt: StateVersion,
        now: Instant,
    ) -> Result<(), ControlError> {
        let now = self.begin(now);
        if self.fsm.state() != State::Recovering {
            self.apply(FsmEvent::ReattachValid, now)?;
        }
        let Some(id) = self.attempt_in_flight(attempt) else {
            return Err(ControlError::NoReattachInFlight(attempt));
        };
        let new_transport = self
            .slot(id)
            .ok_or(ControlError::UnknownTransport(id))?
            .transport;
        let health = self.snapshot(id, now);
        self.push_event(
            now,
            EventBody::ReattachResult {
                candidate_transport: new_transport,
                result: ReattachOutcome::Success,
                reason_code: ReasonCode::ReattachSuccess,
            },
        );
        let previous = self.active.replace(id);
        if previous != Some(id) {
            let previous_transport = previous.and_then(|p| self.slot(p)).map(|s| s.transport);
            self.push_event(
                now,
                EventBody::TransportSwitch {
                    previous_transport,
                    new_transport,
                    candidate_count: self.transports.len(),
                    loss_ratio: health.map_or(0.0, |h| h.loss_ratio),
                    latency_estimate_ms: health
                        .and_then(|h| h.srtt)
                        .map(|d| d.as_secs_f64() * 1_000.0),
                    explicit: true,
                },
            );
        }
        self.apply(FsmEvent::ReattachValid, now)?;
        self.recovery = None;
        self.instability = None;
        self.volatile_deadline = None;
        self.last_denial = None;
        self.transports
            .retain(|s| !s.closed || Some(s.transport.id) == self.active);
        self.mark_heard(id, now);
        self.evaluate(now);
        Ok(())
    }

    /// The peer refused reattach `attempt` with `reason` (RECOVERING → DEGRADED); the
    /// binding is unchanged and the candidate is not chosen again for recovery_window_ms.
    pub fn reattach_denied(
        &mut self,
        attempt: StateVersion,
        reason: ReasonCode,
        now: Instant,
    ) -> Result<(), ControlError> {
        let now = self.begin(now);
        if self.fsm.state() != State::Recovering {
            self.apply(
                FsmEvent::ReattachFailed(RecoveryFailure::ValidationFailed),
                now,
            )?;
        }
        if self.attempt_in_flight(attempt).is_none() {
            return Err(ControlError::NoReattachInFlight(attempt));
        }
        let failure = if reason == ReasonCode::PolicyDenied {
            RecoveryFailure::PolicyDenied
        } else {
            RecoveryFailure::ValidationFailed
        };
        self.fail_recovery(failure, reason, now);
        self.evaluate(now);
        Ok(())
    }

    /// Reports a security incident; the session terminates with security_failure once
    /// security.max_security_failures are counted. The caller reports only incidents on
    /// traffic authenticated with this session's keys: unauthenticated garbage would let
    /// anyone who knows a session id end it.
    pub fn security_incident(&mut self, incident: SecurityIncident, now: Instant) {
        let now = self.begin(now);
        if self.fsm.state() == State::Terminated {
            return;
        }
        self.security_failures = self.security_failures.saturating_add(1);
        let body = match incident {
            SecurityIncident::Replay { counter } => EventBody::SecurityReplayDetected {
                reason_code: ReasonCode::ReplayDetected,
                counter,
            },
            SecurityIncident::Invalid(reason_code) => EventBody::SecurityValidationFailed {
                reason_code,
                failure_count: self.security_failures,
            },
        };
        self.push_event(now, body);
        if self.security_failures >= self.policy.max_security_failures() {
            self.terminate_with(TerminationCause::SecurityFailure, now);
        }
    }

    /// Ends the session on an explicit command (operator or peer).
    pub fn terminate(&mut self, cause: TerminationCause, now: Instant) -> Result<(), ControlError> {
        let now = self.begin(now);
        if self.fsm.state() == State::Terminated {
            self.apply(FsmEvent::Terminate(cause), now)?;
        }
        self.terminate_with(cause, now);
        Ok(())
    }

    /// Records an event that concerns the session but not its state machine (key
    /// rotation, a refused rekey), in order with the others.
    pub fn record_event(&mut self, body: EventBody, now: Instant) {
        let now = self.now.max(now);
        self.push_event(now, body);
    }

    /// Why the session ended, once it has.
    pub fn terminated_by(&self) -> Option<ReasonCode> {
        self.terminated_by
    }

    /// What made the session leave ATTACHED, while it is VOLATILE, DEGRADED or
    /// RECOVERING.
    pub fn instability(&self) -> Option<Instability> {
        self.instability
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.begin(now);
        self.evaluate(now);
    }

    /// Puts `policy` in force for this session from `now` on (a reloaded
    /// configuration): every later timer, budget and decision uses it, and what already
    /// happened stands (switches already made count against the new budget). Recorded
    /// as a `PolicyApplied` event; the state and its version do not change.
    pub fn apply_policy(&mut self, policy: Arc<Policy>, now: Instant) {
        let now = self.begin(now);
        let previous_version = self.policy.version().to_string();
        self.policy = policy;
        let new_version = self.policy.version().to_string();
        self.push_event(
            now,
            EventBody::PolicyApplied {
                previous_version,
                new_version,
            },
        );
        self.evaluate(now);
    }

    // ---- outputs ------------------------------------------------------------------

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.fsm.poll()
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The earliest instant at which [`SessionControl::handle_timeout`] has work to do,
    /// always later than the latest `now` seen; `None` once terminated.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.fsm.state() == State::Terminated {
            return None;
        }
        // Asked after every packet: the earliest future instant, without allocating.
        let mut earliest: Option<Instant> = None;
        let mut consider = |deadlines: &mut dyn Iterator<Item = Instant>| {
            for d in deadlines.filter(|d| *d > self.now) {
                earliest = Some(earliest.map_or(d, |e| e.min(d)));
            }
        };
        consider(
            &mut [
                self.created_at + self.policy.max_lifetime(),
                self.last_heard + self.policy.transport_lost_ttl(),
            ]
            .into_iter(),
        );
        consider(
            &mut self
                .transports
                .iter()
                .filter_map(|s| s.health.next_probe_expiry()),
        );
        match self.fsm.state() {
            State::Attached => {
                if let Some(slot) = self.active.and_then(|id| self.slot(id)) {
                    consider(&mut std::iter::once(
                        slot.health.heartbeat_deadline(&self.policy),
                    ));
                    consider(&mut slot.health.next_change(&self.policy, self.now).into_iter());
                }
            }
            State::Volatile | State::Degraded => {
                consider(
                    &mut self
                        .transports
                        .iter()
                        .filter_map(|s| s.health.next_change(&self.policy, self.now)),
                );
                if self.fsm.state() == State::Volatile {
                    consider(&mut self.volatile_deadline.into_iter());
                }
                consider(&mut self.limiter.next_allowed(self.now).into_iter());
                consider(&mut self.transports.iter().filter_map(|s| s.excluded_until));
            }
            State::Recovering => consider(&mut self.recovery.map(|r| r.deadline).into_iter()),
            State::Birth | State::Terminated => {}
        }
        earliest
    }

    // ---- accessors ----------------------------------------------------------------

    /// The latest instant the session was given.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The session's id.
    pub fn session_id(&self) -> SessionId {
        self.session_id
    }

    /// The policy the session runs under.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.fsm.state()
    }

    /// Mutations so far.
    pub fn version(&self) -> StateVersion {
        self.fsm.version()
    }

    /// The active transport binding, if any.
    pub fn active(&self) -> Option<TransportRef> {
        self.active
            .and_then(|id| self.slot(id))
            .map(|s| s.transport)
    }

    /// The reattach in flight: its candidate and attempt.
    pub fn reattach_attempt(&self) -> Option<(TransportId, StateVersion)> {
        self.recovery.map(|r| (r.candidate, r.attempt))
    }

    /// The candidate being reattached to, while RECOVERING.
    pub fn reattach_in_flight(&self) -> Option<TransportId> {
        self.recovery.map(|r| r.candidate)
    }

    /// Every known transport with its health at `now`.
    pub fn transports(&self, now: Instant) -> Vec<(TransportRef, HealthSnapshot)> {
        self.transports
            .iter()
            .map(|s| (s.transport, s.health.snapshot(now)))
            .collect()
    }

    /// How long the session has existed.
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.created_at)
    }

    /// How long nothing authenticated has been heard from the peer.
    pub fn transportless_age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }

    /// Switches started in the 60 s before `now`.
    pub fn switches_in_window(&self, now: Instant) -> usize {
        self.limiter.switches_in_window(now)
    }

    /// Events discarded because the driver did not drain the queue.
    pub fn events_overflowed(&self) -> u64 {
        self.fsm.overflowed()
    }

    // ---- the decision procedure ---------------------------------------------------

    /// Applies every rule due at `now`, in a fixed order: lifetime, transport-lost TTL,
    /// probe expiry, then the current state's own rules, repeated while they make
    /// progress (bounded).
    fn evaluate(&mut self, now: Instant) {
        for _ in 0..MAX_STEPS_PER_EVALUATION {
            if self.fsm.state() == State::Terminated {
                return;
            }
            if now >= self.created_at + self.policy.max_lifetime() {
                self.terminate_with(TerminationCause::LifetimeExceeded, now);
                return;
            }
            if now >= self.last_heard + self.policy.transport_lost_ttl() {
                self.terminate_with(TerminationCause::TransportTtlExceeded, now);
                return;
            }
            for slot in &mut self.transports {
                slot.health.expire_probes(now);
            }
            let before = self.fsm.version();
            self.step(now);
            if self.fsm.version() == before {
                return;
            }
        }
    }

    /// The current state's rules; makes at most one transition.
    fn step(&mut self, now: Instant) {
        match self.fsm.state() {
            State::Birth | State::Terminated => {}
            State::Attached => {
                let cause = self
                    .active
                    .and_then(|id| self.snapshot(id, now))
                    .map_or(Some(Instability::TransportDead), |h| {
                        h.instability(&self.policy)
                    });
                if let Some(cause) = cause {
                    if self
                        .apply(FsmEvent::InstabilityDetected(cause), now)
                        .is_ok()
                    {
                        self.instability = Some(cause);
                        self.volatile_deadline = Some(now + self.policy.volatile_to_degraded());
                        self.last_denial = None;
                    }
                }
            }
            State::Volatile => {
                if self.volatile_deadline.is_some_and(|d| now >= d) {
                    let _ = self.apply(FsmEvent::VolatilePersisted, now);
                } else {
                    self.try_switch(now);
                }
            }
            State::Degraded => self.try_switch(now),
            State::Recovering => {
                if self.recovery.is_some_and(|r| now >= r.deadline) {
                    self.fail_recovery(
                        RecoveryFailure::WindowExpired,
                        ReasonCode::RecoveryWindowExpired,
                        now,
                    );
                }
            }
        }
    }

    /// Starts a reattach on the best candidate if selection and the switch budget allow;
    /// otherwise reports why not (once per lasting condition).
    fn try_switch(&mut self, now: Instant) {
        let candidates: Vec<Candidate> = self
            .transports
            .iter()
            .filter(|s| !s.closed)
            .map(|s| Candidate {
                id: s.transport.id,
                protocol: s.transport.protocol,
                health: s.health.snapshot(now),
                excluded_until: s.excluded_until,
                active: Some(s.transport.id) == self.active,
            })
            .collect();
        let Some(choice) = select(&candidates, &self.policy, now) else {
            self.deny_switch(ReasonCode::NoValidCandidate, now);
            return;
        };
        if let Err(denial) = self.limiter.check(now) {
            self.deny_switch(denial.reason(), now);
            if denial == SwitchDenial::RateLimited && self.fsm.state() == State::Volatile {
                let _ = self.apply(FsmEvent::SwitchRateLimited, now);
            }
            return;
        }
        let cause = self
            .instability
            .map_or(SwitchCause::PolicyForced, Instability::recovery);
        if self.apply(FsmEvent::SwitchInitiated(cause), now).is_err() {
            return;
        }
        self.limiter.record(now);
        self.last_denial = None;
        let deadline = now + self.policy.recovery_window();
        self.recovery = Some(Recovery {
            candidate: choice,
            deadline,
            attempt: self.fsm.version(),
        });
        if let Some(slot) = self.slot(choice) {
            let candidate_transport = slot.transport;
            self.push_event(
                now,
                EventBody::ReattachAttempt {
                    candidate_transport,
                    recovery_deadline_ms: duration_ms(self.policy.recovery_window()),
                },
            );
        }
        if self.actions.len() < ACTION_QUEUE_LIMIT {
            self.actions.push_back(Action::Reattach {
                candidate: choice,
                deadline,
                attempt: self.fsm.version(),
            });
        }
    }

    fn deny_switch(&mut self, reason: ReasonCode, now: Instant) {
        if self.last_denial == Some(reason) {
            return;
        }
        self.last_denial = Some(reason);
        let candidate_count = self.transports.len();
        self.push_event(
            now,
            EventBody::TransportSwitchDenied {
                reason_code: reason,
                candidate_count,
            },
        );
    }

    /// Ends the reattach in flight without a new binding (RECOVERING → DEGRADED).
    fn fail_recovery(&mut self, failure: RecoveryFailure, reason: ReasonCode, now: Instant) {
        let Some(recovery) = self.recovery.take() else {
            return;
        };
        if let Some(index) = self.index(recovery.candidate) {
            let slot = &mut self.transports[index];
            slot.excluded_until = Some(now + self.policy.recovery_window());
            let candidate_transport = slot.transport;
            self.push_event(
                now,
                EventBody::ReattachResult {
                    candidate_transport,
                    result: ReattachOutcome::Denied,
                    reason_code: reason,
                },
            );
        }
        self.last_denial = None;
        let _ = self.apply(FsmEvent::ReattachFailed(failure), now);
    }

    fn terminate_with(&mut self, cause: TerminationCause, now: Instant) {
        if self.apply(FsmEvent::Terminate(cause), now).is_err() {
            return;
        }
        self.active = None;
        self.recovery = None;
        self.actions.clear();
        self.terminated_by = Some(cause.reason());
        self.push_event(
            now,
            EventBody::SessionTerminated {
                reason_code: cause.reason(),
                session_age_ms: duration_ms(self.age(now)),
                transportless_age_ms: duration_ms(self.transportless_age(now)),
            },
        );
    }

    fn apply(&mut self, event: FsmEvent, now: Instant) -> Result<(), InvalidTransition> {
        self.fsm.apply(event, now).map(|_| ())
    }

    fn push_event(&mut self, at: Instant, body: EventBody) {
        self.fsm.record(at, body);
    }

    /// Brings the session up to `now` before an input: time never runs backwards inside
    /// the session, and every timer due by `now` fires first, so that an input is never
    /// applied to a session that should already have moved on (a packet arriving after
    /// the transport-lost TTL does not revive the session).
    fn begin(&mut self, now: Instant) -> Instant {
        self.now = self.now.max(now);
        self.evaluate(self.now);
        self.now
    }

    /// Refuses inputs to an ended session.
    fn live(&self) -> Result<(), ControlError> {
        if self.fsm.state() == State::Terminated {
            return Err(ControlError::Terminated);
        }
        Ok(())
    }

    /// Whether a timer that changes state is due at `now` (probe expiry aside): the cheap
    /// check that lets the data path skip a full evaluation.
    fn timers_due(&self, now: Instant) -> bool {
        let p = &self.policy;
        let state_deadline = match self.fsm.state() {
            State::Attached => self
                .active
                .and_then(|id| self.slot(id))
                .map(|s| s.health.heartbeat_deadline(p)),
            State::Volatile => self.volatile_deadline,
            State::Recovering => self.recovery.map(|r| r.deadline),
            _ => None,
        };
        now >= self.created_at + p.max_lifetime()
            || now >= self.last_heard + p.transport_lost_ttl()
            || state_deadline.is_some_and(|d| now >= d)
    }

    fn mark_heard(&mut self, id: TransportId, now: Instant) {
        if let Some(index) = self.index(id) {
            self.transports[index].health.record_heard(now);
            self.last_heard = self.last_heard.max(now);
        }
    }

    /// The candidate of reattach `attempt`, if that attempt is the one in flight.
    fn attempt_in_flight(&self, attempt: StateVersion) -> Option<TransportId> {
        self.recovery
            .filter(|r| r.attempt == attempt)
            .map(|r| r.candidate)
    }

    fn reattach_in_flight_on(&self, id: TransportId) -> bool {
        self.recovery.is_some_and(|r| r.candidate == id)
    }

    fn index(&self, id: TransportId) -> Option<usize> {
        self.transports.iter().position(|s| s.transport.id == id)
    }

    fn slot(&self, id: TransportId) -> Option<&TransportSlot> {
        self.transports.iter().find(|s| s.transport.id == id)
    }

    fn slot_mut(&mut self, id: TransportId) -> Result<&mut TransportSlot, ControlError> {
        self.transports
            .iter_mut()
            .find(|s| s.transport.id == id)
            .ok_or(ControlError::UnknownTransport(id))
    }

    fn snapshot(&self, id: TransportId, now: Instant) -> Option<HealthSnapshot> {
        self.slot(id).map(|s| s.health.snapshot(now))
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
