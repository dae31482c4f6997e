//! The gateway's side of the protocol, sans-IO.
//!
//! [`Gateway`] accepts handshakes from authorized clients, routes every datagram to its
//! session by the header's session id, and routes every packet read from the tunnel
//! device to the session owning its destination address. Each [`GatewaySession`] holds
//! one session's keys, state machine, binding and timers, and validates reattach
//! requests in the contract's order. The receive path returns a [`Received`] saying
//! exactly what the caller must do with the packet; events and the session table are
//! updated as a side effect.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::crypto::{
    rekey_prologue, Channel, KeyEvent, KeyLimits, Keypair, OpenError, PublicKey, Response,
    HANDSHAKE_PROLOGUE,
};
use crate::event::{EventBody, ReattachOutcome, SessionEvent, TransportRef, WallClock};
use crate::fsm::{FsmEvent, Instability, State, TerminationCause};
use crate::ids::{NodeId, Protocol, SessionId, StateVersion, TransportId};
use crate::journal::Journal;
use crate::policy::Policy;
use crate::reason::ReasonCode;
use crate::replay::ReplayError;
use crate::select::SwitchLimiter;
use crate::store::{Binding, SessionRecord, SessionStore};
use crate::wire::{
    self, encode_handshake, encode_session_unknown, Control, Datagram, InitPayload, PacketType,
    ReattachRequest, RespPayload, SessionHeader, Timestamp, TunnelAddr,
};

/// Where a datagram came from, or goes to: one transport as the gateway sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The transport kind it arrived on.
    pub protocol: Protocol,
    /// The peer's address on it.
    pub addr: SocketAddr,
}

/// A client the gateway accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthorizedClient {
    /// Its static public key.
    pub public: PublicKey,
    /// The tunnel address it is given.
    pub tunnel: TunnelAddr,
}

/// Why a packet was dropped; every drop is counted by its reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Drop {
    /// Not a valid packet.
    Malformed,
    /// A handshake that failed (with the reason code of its event).
    Handshake(ReasonCode),
    /// No session with that id.
    UnknownSession,
    /// Did not authenticate under the session's keys.
    Unauthenticated,
    /// An authentic packet seen before.
    Replay,
    /// A data or heartbeat packet on a transport that is not the session's binding.
    UnboundTransport,
    /// A tunnelled packet whose source is not the session's tunnel address.
    SpoofedSource,
    /// A packet from the tunnel device for an address no session owns.
    NoRoute,
    /// The session's keys are expired.
    KeysExpired,
    /// A packet type that makes no sense at the gateway (e.g. an ack).
    Unexpected,
    /// A path response from another endpoint than the one challenged.
    PathMismatch,
    /// The session ended (its timers fired as the packet arrived, or it ended just
    /// before).
    SessionEnded,
}

impl Drop {
    /// The stable label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Drop::Malformed => "malformed",
            Drop::Handshake(_) => "handshake",
            Drop::UnknownSession => "unknown_session",
            Drop::Unauthenticated => "unauthenticated",
            Drop::Replay => "replay",
            Drop::UnboundTransport => "unbound_transport",
            Drop::SpoofedSource => "spoofed_source",
            Drop::NoRoute => "no_route",
            Drop::KeysExpired => "keys_expired",
            Drop::Unexpected => "unexpected",
            Drop::PathMismatch => "path_mismatch",
            Drop::SessionEnded => "session_ended",
        }
    }
}

/// What the caller must do with a received datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Received<'o> {
    /// Send these bytes back to the endpoint the datagram came from.
    Reply(&'o [u8]),
    /// Write this IP packet to the tunnel device.
    ToTunnel(&'o [u8]),
    /// Nothing to send; the packet was consumed.
    Consumed,
    /// The packet was dropped (and counted).
    Dropped(Drop),
}

/// The gateway's configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The gateway's static key pair (clients pin its public half).
    pub keypair: Keypair,
    /// This node's id, in events and session records.
    pub node_id: NodeId,
    /// The policy every session runs under.
    pub policy: Arc<Policy>,
    /// The clients allowed to connect.
    pub clients: Vec<AuthorizedClient>,
}

/// One session at the gateway.
pub struct GatewaySession {
    id: SessionId,
    client: PublicKey,
    tunnel: TunnelAddr,
    policy: Arc<Policy>,
    node: NodeId,
    channel: Channel,
    journal: Journal,
    created_at: Instant,
    last_heard: Instant,
    binding: Option<(Endpoint, TransportRef)>,
    bound_at: StateVersion,
    binding_heard: Instant,
    volatile_since: Option<Instant>,
    limiter: SwitchLimiter,
    /// A reattach that passed every check, waiting for its path to answer a challenge.
    pending_path: Option<PendingPath>,
    /// The counter of the rekey init that produced the pending next keys: an older init
    /// (held back and delivered late) must not replace them.
    last_rekey_init: Option<u64>,
    keys_expired_reported: bool,
    security_failures: u32,
    security_events: RateWindow,
    /// Why the session ended, once it has.
    ended_by: Option<TerminationCause>,
    out: Vec<u8>,
    plain: Vec<u8>,
}

/// A validated reattach whose new path has been challenged.
#[derive(Debug, Clone, Copy)]
struct PendingPath {
    endpoint: Endpoint,
    candidate: TransportRef,
    cause: Instability,
    token: u64,
    request_counter: u64,
    deadline: Instant,
}

/// Security events recorded per second and session, at most: anyone who knows a session
/// id can make the gateway refuse packets for it, and must not flood the event stream or
/// push real state changes out of the journal. Refusals past the limit are still counted
/// (in drops) but not each reported.
const SECURITY_EVENTS_PER_SECOND: u32 = 10;

#[derive(Debug, Clone, Copy, Default)]
struct RateWindow {
    start: Option<Instant>,
    count: u32,
    suppressed: u64,
}

impl RateWindow {
    fn allow(&mut self, now: Instant) -> bool {
        if self
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= Duration::from_secs(1))
        {
            self.start = Some(now);
            self.count = 0;
        }
        if self.count >= SECURITY_EVENTS_PER_SECOND {
            self.suppressed += 1;
            return false;
        }
        self.count += 1;
        true
    }
}

impl std::fmt::Debug for GatewaySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySession")
            .field("id", &self.id)
            .field("state", &self.journal.state())
            .field("version", &self.journal.version())
            .field("binding", &self.binding)
            .finish()
    }
}

impl GatewaySession {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.journal.state()
    }

    /// Mutations so far.
    pub fn version(&self) -> StateVersion {
        self.journal.version()
    }

    /// The client's tunnel address.
    pub fn tunnel(&self) -> TunnelAddr {
        self.tunnel
    }

    /// The active binding: where the client is reached.
    pub fn binding(&self) -> Option<Endpoint> {
        self.binding.map(|(e, _)| e)
    }

    /// The version under which the active binding was accepted.
    pub fn bound_at(&self) -> StateVersion {
        self.bound_at
    }

    /// Security events not reported because of the per-session rate limit.
    pub fn security_events_suppressed(&self) -> u64 {
        self.security_events.suppressed
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.journal.poll()
    }

    /// The earliest instant at which [`GatewaySession::handle_timeout`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.state() == State::Terminated {
            return None;
        }
        let p = &self.policy;
        let mut d =
            (self.created_at + p.max_lifetime()).min(self.last_heard + p.transport_lost_ttl());
        match self.state() {
            State::Attached => d = d.min(self.binding_heard + p.heartbeat_volatile()),
            State::Volatile => {
                if let Some(since) = self.volatile_since {
                    d = d.min(since + p.volatile_to_degraded());
                }
            }
            _ => {}
        }
        let more = [
            self.channel.overlap_deadline(),
            self.pending_path.map(|pp| pp.deadline),
            (!self.keys_expired_reported).then(|| self.channel.reject_deadline()),
        ];
        more.into_iter().flatten().fold(d, Instant::min).into()
    }

    /// Fires every timer due at `now`: lifetime, transport-lost TTL, the heartbeat on
    /// the binding, volatility persisting, a path challenge unanswered, key expiry.
    pub fn handle_timeout(&mut self, store: &dyn SessionStore, now: Instant) {
        if self.state() == State::Terminated {
            return;
        }
        if let Some(epoch) = self.channel.drop_expired(now) {
            self.journal
                .record(now, EventBody::KeyExpired { key_epoch: epoch });
        }
        if !self.keys_expired_reported && self.channel.expired(now) {
            self.keys_expired_reported = true;
            self.journal.record(
                now,
                EventBody::KeyExpired {
                    key_epoch: self.channel.epoch(),
                },
            );
        }
        if let Some(pp) = self.pending_path.filter(|pp| now >= pp.deadline) {
            self.pending_path = None;
            self.journal.record(
                now,
                EventBody::ReattachResult {
                    candidate_transport: pp.candidate,
                    result: ReattachOutcome::Denied,
                    reason_code: ReasonCode::RecoveryWindowExpired,
                },
            );
        }
        let p = Arc::clone(&self.policy);
        if now >= self.created_at + p.max_lifetime() {
            self.terminate(store, TerminationCause::LifetimeExceeded, now);
        } else if now >= self.last_heard + p.transport_lost_ttl() {
            self.terminate(store, TerminationCause::TransportTtlExceeded, now);
        } else if self.state() == State::Attached
            && now >= self.binding_heard + p.heartbeat_volatile()
        {
            let cause = FsmEvent::InstabilityDetected(Instability::HeartbeatTimeout);
            if self.commit(store, &[cause], &[], None, now) {
                self.volatile_since = Some(now);
            }
        } else if self.state() == State::Volatile
            && self
                .volatile_since
                .is_some_and(|t| now >= t + p.volatile_to_degraded())
        {
            self.commit(store, &[FsmEvent::VolatilePersisted], &[], None, now);
        }
    }

    /// Ends the session: state, event, table record. The caller removes it afterwards.
    pub fn terminate(&mut self, store: &dyn SessionStore, cause: TerminationCause, now: Instant) {
        if !self.commit(store, &[FsmEvent::Terminate(cause)], &[], Some(None), now) {
            return;
        }
        self.pending_path = None;
        self.ended_by = Some(cause);
        self.journal.record(
            now,
            EventBody::SessionTerminated {
                reason_code: cause.reason(),
                session_age_ms: ms(now.saturating_duration_since(self.created_at)),
                transportless_age_ms: ms(now.saturating_duration_since(self.last_heard)),
            },
        );
    }

    /// Seals a Terminate for the client (sent before an operator termination), into the
    /// session's buffer; returns where to send it.
    pub fn seal_terminate(
        &mut self,
        reason: ReasonCode,
        now: Instant,
    ) -> Option<(Endpoint, &[u8])> {
        let (endpoint, _) = self.binding?;
        self.channel
            .seal(&Control::Terminate { reason }, now, &mut self.out)
            .ok()?;
        Some((endpoint, &self.out))
    }

    /// Seals an IP packet from the tunnel device for the client; returns where to send.
    /// Due timers fire first: a session past its lifetime sends nothing.
    pub fn seal_data(
        &mut self,
        store: &dyn SessionStore,
        packet: &[u8],
        now: Instant,
    ) -> Result<(Endpoint, &[u8]), Drop> {
        self.handle_timeout(store, now);
        if self.state() == State::Terminated {
            return Err(Drop::SessionEnded);
        }
        let (endpoint, _) = self.binding.ok_or(Drop::UnboundTransport)?;
        self.channel
            .seal(&Control::Data(packet), now, &mut self.out)
            .map_err(|_| Drop::KeysExpired)?;
        Ok((endpoint, &self.out))
    }

    /// Handles one session packet that arrived from `from`. Due timers fire first: a
    /// packet arriving after the transport-lost TTL does not revive the session.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_packet(
        &mut self,
        store: &dyn SessionStore,
        local: &Keypair,
        clock: &WallClock,
        from: Endpoint,
        header: &SessionHeader,
        aad: &[u8; wire::HEADER_LEN],
        sealed: &[u8],
        now: Instant,
    ) -> Received<'_> {
        let outcome = self.process_packet(store, local, clock, from, header, aad, sealed, now);
        self.received(outcome)
    }

    /// What an outcome means for the caller, with the bytes it refers to.
    fn received(&self, outcome: Outcome) -> Received<'_> {
        match outcome {
            Outcome::Reply => Received::Reply(&self.out),
            Outcome::Tunnel => Received::ToTunnel(&self.plain),
            Outcome::Consumed => Received::Consumed,
            Outcome::Drop(d) => Received::Dropped(d),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn process_packet(
        &mut self,
        store: &dyn SessionStore,
        local: &Keypair,
        clock: &WallClock,
        from: Endpoint,
        header: &SessionHeader,
        aad: &[u8; wire::HEADER_LEN],
        sealed: &[u8],
        now: Instant,
    ) -> Outcome {
        if header.ptype == PacketType::ReattachRequest {
            // Judged before the timers end the session, so that a request arriving past
            // the lifetime or the TTL is refused for exactly that reason (checks 3, 4).
            let outcome = self.handle_reattach(clock, from, header, aad, sealed, now);
            self.handle_timeout(store, now);
            return outcome;
        }
        self.handle_timeout(store, now);
        if self.state() == State::Terminated {
            return Outcome::Drop(Drop::SessionEnded);
        }
        let mut plain = std::mem::take(&mut self.plain);
        let opened = self.channel.open(header, aad, sealed, now, &mut plain);
        let result = match opened {
            Ok(key_event) => {
                self.key_event(key_event, now);
                self.last_heard = now;
                match Control::decode(header.ptype, &plain) {
                    Ok(control) => self.handle_control(store, local, from, header, control, now),
                    Err(_) => self.misbehaving_client(ReasonCode::InvalidTransition, now),
                }
            }
            Err(OpenError::Replay(
                ReplayError::Duplicate(counter) | ReplayError::TooOld(counter),
            )) => {
                self.security_event(
                    now,
                    EventBody::SecurityReplayDetected {
                        reason_code: ReasonCode::ReplayDetected,
                        counter,
                    },
                );
                Outcome::Drop(Drop::Replay)
            }
            Err(_) => Outcome::Drop(Drop::Unauthenticated),
        };
        self.plain = plain;
        result
    }

    fn key_event(&mut self, event: KeyEvent, now: Instant) {
        if let KeyEvent::Rotated(r) = event {
            if let Some(epoch) = r.displaced {
                self.journal
                    .record(now, EventBody::KeyExpired { key_epoch: epoch });
            }
            self.keys_expired_reported = false;
            self.last_rekey_init = None;
            self.journal
                .record(now, EventBody::KeyRotated { key_epoch: r.epoch });
        }
    }

    fn handle_control(
        &mut self,
        store: &dyn SessionStore,
        local: &Keypair,
        from: Endpoint,
        header: &SessionHeader,
        control: Control<'_>,
        now: Instant,
    ) -> Outcome {
        let bound = self.binding.is_some_and(|(e, _)| e == from);
        match control {
            Control::Data(packet) => {
                if !bound {
                    return Outcome::Drop(Drop::UnboundTransport);
                }
                if source_address(packet) != Some(self.tunnel.addr) {
                    return Outcome::Drop(Drop::SpoofedSource);
                }
                self.binding_heard = now;
                Outcome::Tunnel
            }
            Control::Heartbeat { seq } => {
                if !bound {
                    return Outcome::Drop(Drop::UnboundTransport);
                }
                self.binding_heard = now;
                let ack = Control::HeartbeatAck {
                    seq,
                    binding_version: self.bound_at,
                };
                self.reply(&ack, now)
            }
            Control::Probe { seq } => self.reply(&Control::ProbeAck { seq }, now),
            Control::PathResponse { token } => self.complete_path(store, from, token, now),
            Control::Terminate { .. } => {
                self.terminate(store, TerminationCause::Peer, now);
                Outcome::Consumed
            }
            Control::RekeyInit(noise) => self.handle_rekey(local, header, noise, now),
            Control::ReattachRequest(_)
            | Control::HeartbeatAck { .. }
            | Control::ProbeAck { .. }
            | Control::ReattachAck { .. }
            | Control::ReattachDeny { .. }
            | Control::RekeyResp(_)
            | Control::PathChallenge { .. } => Outcome::Drop(Drop::Unexpected),
        }
    }

    fn handle_rekey(
        &mut self,
        local: &Keypair,
        header: &SessionHeader,
        noise: &[u8],
        now: Instant,
    ) -> Outcome {
        let refused = |this: &mut Self, reason| {
            this.journal.record(
                now,
                EventBody::RekeyDenied {
                    reason_code: reason,
                },
            );
            Outcome::Drop(Drop::Handshake(reason))
        };
        // Only an init sealed under the current keys, and newer than the one that made
        // the pending next keys: an old init held back and delivered late would
        // otherwise replace keys the client already uses.
        let current = header.key_epoch == self.channel.epoch() as u8;
        if !current || self.last_rekey_init.is_some_and(|c| header.counter <= c) {
            return refused(self, ReasonCode::ReplayDetected);
        }
        let prologue = rekey_prologue(self.id);
        let response = match Response::read(local, &prologue, noise) {
            Ok(r) if r.client() == self.client => r,
            Ok(_) => return refused(self, ReasonCode::UnauthorizedClient),
            Err(_) => return refused(self, ReasonCode::BadProof),
        };
        let Ok((msg2, keys)) = response.finish(&[]) else {
            return refused(self, ReasonCode::BadProof);
        };
        // The answer goes out under the current keys; the new ones become current with
        // the client's first packet under them.
        let outcome = self.reply(&Control::RekeyResp(&msg2), now);
        self.channel.install_next(keys, now);
        self.last_rekey_init = Some(header.counter);
        outcome
    }

    /// The reattach checks, in the contract's order. A request that passes them all does
    /// not move the binding yet: the new path is challenged first (path validation), so
    /// that a genuine request relocated by an attacker cannot redirect the session.
    fn handle_reattach(
        &mut self,
        clock: &WallClock,
        from: Endpoint,
        header: &SessionHeader,
        aad: &[u8; wire::HEADER_LEN],
        sealed: &[u8],
        now: Instant,
    ) -> Outcome {
        // 2–4: on the session's own state, before any cryptography.
        let p = Arc::clone(&self.policy);
        let early = if !matches!(
            self.state(),
            State::Attached | State::Volatile | State::Degraded
        ) {
            Some(ReasonCode::InvalidStateForReattach)
        } else if now >= self.created_at + p.max_lifetime() {
            Some(ReasonCode::SessionExpired)
        } else if now >= self.last_heard + p.transport_lost_ttl() {
            Some(ReasonCode::TransportTtlExceeded)
        } else {
            None
        };
        // 5: proof of possession: the AEAD under the session keys; 6a: a new counter.
        let mut plain = std::mem::take(&mut self.plain);
        let opened = match early {
            None => self.channel.open(header, aad, sealed, now, &mut plain),
            Some(_) => Err(OpenError::Auth),
        };
        let decoded = match (&opened, Control::decode(header.ptype, &plain)) {
            (Ok(_), Ok(Control::ReattachRequest(r))) => Some(r),
            _ => None,
        };
        self.plain = plain;
        if let Ok(key_event) = opened {
            self.key_event(key_event, now);
        }
        let unknown = TransportRef {
            id: TransportId(0),
            protocol: from.protocol,
        };
        let request = match (early, &opened, decoded) {
            (Some(reason), _, _) => {
                return self.deny_reattach(unknown, reason, false, header.counter, now)
            }
            (None, Err(OpenError::Replay(_)), _) => {
                return self.deny_reattach(
                    unknown,
                    ReasonCode::ReplayDetected,
                    false,
                    header.counter,
                    now,
                )
            }
            (None, Err(_), _) => {
                return self.deny_reattach(
                    unknown,
                    ReasonCode::BadProof,
                    false,
                    header.counter,
                    now,
                )
            }
            (None, Ok(_), Some(r)) => r,
            (None, Ok(_), _) => {
                return self.misbehaving_client(ReasonCode::InvalidTransportCandidate, now)
            }
        };
        self.last_heard = now;
        let candidate = TransportRef {
            id: request.transport_id,
            protocol: request.protocol,
        };
        if let Err(reason) = self.validate(&request, from, clock, now) {
            return self.deny_reattach(candidate, reason, true, header.counter, now);
        }
        let Ok(token) = getrandom::u64() else {
            return self.deny_reattach(
                candidate,
                ReasonCode::AtomicityFailed,
                true,
                header.counter,
                now,
            );
        };
        self.pending_path = Some(PendingPath {
            endpoint: from,
            candidate,
            cause: instability_of(request.cause),
            token,
            request_counter: header.counter,
            deadline: now + p.recovery_window(),
        });
        self.journal.record(
            now,
            EventBody::ReattachAttempt {
                candidate_transport: candidate,
                recovery_deadline_ms: ms(p.recovery_window()),
            },
        );
        self.reply(&Control::PathChallenge { token }, now)
    }

    /// Checks 6b (timestamp), 7 (policy), 8 (candidate) and the version half of 9.
    fn validate(
        &self,
        r: &ReattachRequest,
        from: Endpoint,
        clock: &WallClock,
        now: Instant,
    ) -> Result<(), ReasonCode> {
        let wall = clock.ts_ms(now);
        if wall.abs_diff(r.timestamp_ms) > ms(self.policy.reattach_proof_max_age()) {
            return Err(ReasonCode::StaleRequest);
        }
        if !self.policy.allows(from.protocol) || self.limiter.check(now).is_err() {
            return Err(ReasonCode::PolicyDenied);
        }
        if r.protocol != from.protocol
            || from.addr.ip().is_unspecified()
            || from.addr.port() == 0
            || !is_volatility_cause(r.cause)
        {
            return Err(ReasonCode::InvalidTransportCandidate);
        }
        if r.expected_version != self.bound_at {
            return Err(ReasonCode::StaleStateVersion);
        }
        Ok(())
    }

    /// The client answered the path challenge from the challenged endpoint: move the
    /// binding (9: through the session table's compare-and-swap) and acknowledge.
    fn complete_path(
        &mut self,
        store: &dyn SessionStore,
        from: Endpoint,
        token: u64,
        now: Instant,
    ) -> Outcome {
        let Some(pp) = self.pending_path.filter(|pp| pp.token == token) else {
            return Outcome::Drop(Drop::Unexpected);
        };
        if pp.endpoint != from {
            return Outcome::Drop(Drop::PathMismatch);
        }
        self.pending_path = None;
        if self.limiter.check(now).is_err()
            || !matches!(
                self.state(),
                State::Attached | State::Volatile | State::Degraded
            )
        {
            return self.deny_reattach(
                pp.candidate,
                ReasonCode::PolicyDenied,
                true,
                pp.request_counter,
                now,
            );
        }
        let mut steps = Vec::with_capacity(3);
        if self.state() == State::Attached {
            steps.push(FsmEvent::InstabilityDetected(pp.cause));
        }
        steps.push(FsmEvent::SwitchInitiated(pp.cause.recovery()));
        steps.push(FsmEvent::ReattachValid);
        let previous = self.binding;
        let mut before = vec![EventBody::ReattachResult {
            candidate_transport: pp.candidate,
            result: ReattachOutcome::Success,
            reason_code: ReasonCode::ReattachSuccess,
        }];
        if previous.map(|(e, t)| (e, t.id)) != Some((from, pp.candidate.id)) {
            before.push(EventBody::TransportSwitch {
                previous_transport: previous.map(|(_, t)| t),
                new_transport: pp.candidate,
                candidate_count: 1,
                loss_ratio: 0.0,
                latency_estimate_ms: None,
                explicit: true,
            });
        }
        self.last_heard = now;
        self.binding_heard = now;
        if !self.commit(
            store,
            &steps,
            &before,
            Some(Some((from, pp.candidate))),
            now,
        ) {
            return self.deny_reattach(
                pp.candidate,
                ReasonCode::StaleStateVersion,
                true,
                pp.request_counter,
                now,
            );
        }
        self.limiter.record(now);
        self.volatile_since = None;
        let ack = Control::ReattachAck {
            request_counter: pp.request_counter,
            binding_version: self.bound_at,
        };
        self.reply(&ack, now)
    }

    fn deny_reattach(
        &mut self,
        candidate: TransportRef,
        reason: ReasonCode,
        authentic: bool,
        counter: u64,
        now: Instant,
    ) -> Outcome {
        self.security_event(
            now,
            EventBody::ReattachResult {
                candidate_transport: candidate,
                result: ReattachOutcome::Denied,
                reason_code: reason,
            },
        );
        match reason {
            ReasonCode::BadProof => self.security_event(
                now,
                EventBody::SecurityValidationFailed {
                    reason_code: reason,
                    failure_count: self.security_failures,
                },
            ),
            ReasonCode::ReplayDetected => self.security_event(
                now,
                EventBody::SecurityReplayDetected {
                    reason_code: reason,
                    counter,
                },
            ),
            _ => {}
        }
        // Only an authentic request gets an answer: a forged one learns nothing, and
        // cannot make the gateway send to an address of its choosing.
        if !authentic {
            return Outcome::Drop(match reason {
                ReasonCode::ReplayDetected => Drop::Replay,
                ReasonCode::InvalidStateForReattach
                | ReasonCode::SessionExpired
                | ReasonCode::TransportTtlExceeded => Drop::SessionEnded,
                _ => Drop::Unauthenticated,
            });
        }
        let deny = Control::ReattachDeny {
            request_counter: counter,
            reason,
            binding_version: self.bound_at,
        };
        self.reply(&deny, now)
    }

    /// An authentic packet whose content its sender chose wrongly (a plaintext that does
    /// not decode for its type): only the holder of the session keys can send it, so it
    /// counts towards security_failure. Path properties (timestamp, protocol, address)
    /// never count: an attacker can relocate or delay a genuine packet.
    fn misbehaving_client(&mut self, reason: ReasonCode, now: Instant) -> Outcome {
        self.security_failures = self.security_failures.saturating_add(1);
        let failure_count = self.security_failures;
        self.journal.record(
            now,
            EventBody::SecurityValidationFailed {
                reason_code: reason,
                failure_count,
            },
        );
        Outcome::Drop(Drop::Malformed)
    }

    fn security_event(&mut self, now: Instant, body: EventBody) {
        if self.security_events.allow(now) {
            self.journal.record(now, body);
        }
    }

    /// Whether security failures reached the policy's limit (the caller terminates).
    pub fn too_many_security_failures(&self) -> bool {
        self.security_failures >= self.policy.max_security_failures()
    }

    /// Applies `steps` as one write: the new record (state, version, binding) is
    /// compare-and-swapped into the table at the version this session holds, and only if
    /// that succeeds are `before` and then the transitions recorded. `binding`: `None`
    /// keeps it, `Some(None)` clears it, `Some(Some(..))` replaces it. Returns whether
    /// it did; if any step is undefined, nothing is written and the first undefined step
    /// is reported as rejected.
    fn commit(
        &mut self,
        store: &dyn SessionStore,
        steps: &[FsmEvent],
        before: &[EventBody],
        binding: Option<Option<(Endpoint, TransportRef)>>,
        now: Instant,
    ) -> bool {
        let mut state = self.state();
        for step in steps {
            match crate::fsm::transition(state, step) {
                Some(next) => state = next,
                None => {
                    self.journal.reject(*step, now);
                    return false;
                }
            }
        }
        let expected = self.version();
        let version = StateVersion(expected.0.saturating_add(steps.len() as u64));
        let new_binding = binding.unwrap_or(self.binding);
        let bound_at = match binding {
            Some(Some(_)) => version,
            _ => self.bound_at,
        };
        let record = self.record(state, version, new_binding, bound_at);
        if store
            .compare_and_swap(&self.node, expected, record)
            .is_err()
        {
            return false;
        }
        for body in before {
            self.journal.record(now, body.clone());
        }
        for step in steps {
            let _ = self.journal.apply(*step, now);
        }
        self.binding = new_binding;
        self.bound_at = bound_at;
        true
    }

    fn record(
        &self,
        state: State,
        version: StateVersion,
        binding: Option<(Endpoint, TransportRef)>,
        bound_at: StateVersion,
    ) -> SessionRecord {
        let p = &self.policy;
        SessionRecord {
            session_id: self.id,
            state,
            state_version: version,
            owner: self.node.clone(),
            active_binding: binding.map(|(endpoint, transport)| Binding {
                transport,
                remote: Some(endpoint.addr),
                bound_at,
                node: self.node.clone(),
            }),
            candidates: Vec::new(),
            lifetime_deadline: self.created_at + p.max_lifetime(),
            transport_lost_deadline: self.last_heard + p.transport_lost_ttl(),
            recovery_deadline: self.pending_path.map(|pp| pp.deadline),
        }
    }

    fn reply(&mut self, control: &Control<'_>, now: Instant) -> Outcome {
        match self.channel.seal(control, now, &mut self.out) {
            Ok(_) => Outcome::Reply,
            Err(_) => Outcome::Drop(Drop::KeysExpired),
        }
    }
}

enum Outcome {
    Reply,
    Tunnel,
    Consumed,
    Drop(Drop),
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn is_volatility_cause(reason: ReasonCode) -> bool {
    matches!(
        reason,
        ReasonCode::LossThresholdExceeded
            | ReasonCode::ConsecutiveDropExceeded
            | ReasonCode::HeartbeatTimeout
            | ReasonCode::TransportDead
            | ReasonCode::LatencyThresholdExceeded
            | ReasonCode::PolicyForcedRecovery
    )
}

fn instability_of(reason: ReasonCode) -> Instability {
    match reason {
        ReasonCode::LossThresholdExceeded => Instability::LossThreshold,
        ReasonCode::ConsecutiveDropExceeded => Instability::ConsecutiveDrops,
        ReasonCode::LatencyThresholdExceeded => Instability::LatencyThreshold,
        ReasonCode::TransportDead => Instability::TransportDead,
        _ => Instability::HeartbeatTimeout,
    }
}

/// The source address of an IPv4 or IPv6 packet.
pub fn source_address(packet: &[u8]) -> Option<IpAddr> {
    ip_address(packet, 12, 8)
}

/// The destination address of an IPv4 or IPv6 packet.
pub fn destination_address(packet: &[u8]) -> Option<IpAddr> {
    ip_address(packet, 16, 24)
}

/// The address at `v4_offset` of an IPv4 header or `v6_offset` of an IPv6 header.
fn ip_address(packet: &[u8], v4_offset: usize, v6_offset: usize) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(v4_offset..v4_offset + 4)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 => {
            let b: [u8; 16] = packet.get(v6_offset..v6_offset + 16)?.try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

/// Events of removed sessions kept until drained; past it they are counted, not kept.
const GATEWAY_EVENTS_KEPT: usize = 4_096;

/// How many ended session ids the gateway remembers.
const ENDED_SESSIONS_KEPT: usize = 1_024;

struct ClientEntry {
    tunnel: TunnelAddr,
    last_timestamp: Option<Timestamp>,
    session: Option<SessionId>,
}

/// The gateway: handshakes, routing, and every session of this node.
pub struct Gateway {
    keypair: Keypair,
    node: NodeId,
    policy: Arc<Policy>,
    limits: KeyLimits,
    clock: WallClock,
    store: Arc<dyn SessionStore>,
    clients: HashMap<PublicKey, ClientEntry>,
    sessions: HashMap<SessionId, GatewaySession>,
    by_tunnel: HashMap<IpAddr, SessionId>,
    drops: HashMap<Drop, u64>,
    /// Events of sessions already removed (at most GATEWAY_EVENTS_KEPT until drained).
    events: Vec<(SessionId, SessionEvent)>,
    events_overflowed: u64,
    /// Denials of reattaches for ended sessions: anyone can provoke them, so they are
    /// reported at most SECURITY_EVENTS_PER_SECOND per second, gateway-wide.
    ended_denials: RateWindow,
    /// Recently ended sessions (bounded), so that a late reattach for one is denied
    /// as invalid_state_for_reattach rather than taken for an unknown session.
    ended: VecDeque<(SessionId, ReasonCode)>,
    out: Vec<u8>,
}

impl Gateway {
    /// A gateway with `config`, writing session records to `store`, and reading wall
    /// time (for freshness checks and event stamps) through `clock`.
    pub fn new(config: GatewayConfig, store: Arc<dyn SessionStore>, clock: WallClock) -> Self {
        let clients = config
            .clients
            .iter()
            .map(|c| {
                (
                    c.public,
                    ClientEntry {
                        tunnel: c.tunnel,
                        last_timestamp: None,
                        session: None,
                    },
                )
            })
            .collect();
        Gateway {
            limits: KeyLimits::from_policy(&config.policy),
            keypair: config.keypair,
            node: config.node_id,
            policy: config.policy,
            clock,
            store,
            clients,
            sessions: HashMap::new(),
            by_tunnel: HashMap::new(),
            drops: HashMap::new(),
            events: Vec::new(),
            events_overflowed: 0,
            ended_denials: RateWindow::default(),
            ended: VecDeque::with_capacity(ENDED_SESSIONS_KEPT),
            out: Vec::new(),
        }
    }

    /// The gateway's public key.
    pub fn public_key(&self) -> PublicKey {
        self.keypair.public()
    }

    /// A session, if it exists.
    pub fn session(&self, id: SessionId) -> Option<&GatewaySession> {
        self.sessions.get(&id)
    }

    /// Every live session's id.
    pub fn session_ids(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }

    /// Drops counted so far, by reason.
    pub fn drops(&self) -> &HashMap<Drop, u64> {
        &self.drops
    }

    /// Handles one datagram from `from`.
    pub fn handle_datagram(
        &mut self,
        from: Endpoint,
        datagram: &[u8],
        now: Instant,
    ) -> Received<'_> {
        let parsed = match wire::parse(datagram) {
            Ok(p) => p,
            Err(_) => return self.dropped(Drop::Malformed),
        };
        match parsed {
            Datagram::HandshakeInit {
                sender_index,
                noise,
            } => match self.accept_handshake(from, sender_index, noise, now) {
                Ok(()) => Received::Reply(&self.out),
                Err(reason) => self.dropped(Drop::Handshake(reason)),
            },
            Datagram::Session {
                header,
                aad,
                sealed,
            } => {
                let Some(session) = self.sessions.get_mut(&header.session_id) else {
                    let ended = self
                        .ended
                        .iter()
                        .find(|(id, _)| *id == header.session_id)
                        .map(|(_, reason)| *reason);
                    if let (PacketType::ReattachRequest, Some(reason)) = (header.ptype, ended) {
                        if self.ended_denials.allow(now) {
                            let denied = EventBody::ReattachResult {
                                candidate_transport: TransportRef {
                                    id: TransportId(0),
                                    protocol: from.protocol,
                                },
                                result: ReattachOutcome::Denied,
                                reason_code: reason,
                            };
                            self.push_event(
                                header.session_id,
                                SessionEvent {
                                    at: now,
                                    body: denied,
                                },
                            );
                        }
                        *self.drops.entry(Drop::SessionEnded).or_default() += 1;
                        self.out.clear();
                        self.out
                            .extend_from_slice(&encode_session_unknown(header.session_id));
                        return Received::Reply(&self.out);
                    }
                    *self.drops.entry(Drop::UnknownSession).or_default() += 1;
                    self.out.clear();
                    self.out
                        .extend_from_slice(&encode_session_unknown(header.session_id));
                    return Received::Reply(&self.out);
                };
                let id = header.session_id;
                let outcome = session.process_packet(
                    self.store.as_ref(),
                    &self.keypair,
                    &self.clock,
                    from,
                    &header,
                    aad,
                    sealed,
                    now,
                );
                if let Outcome::Drop(d) = outcome {
                    *self.drops.entry(d).or_default() += 1;
                }
                // The packet may have ended the session; its last bytes (a sealed
                // answer) then come from the removed session.
                match self.after_session_input(id, now) {
                    None => match self.sessions.get(&id) {
                        Some(session) => session.received(outcome),
                        None => Received::Consumed,
                    },
                    Some(ended) => {
                        self.out.clear();
                        match outcome {
                            Outcome::Reply => self.out.extend_from_slice(&ended.out),
                            Outcome::Tunnel => self.out.extend_from_slice(&ended.plain),
                            Outcome::Consumed | Outcome::Drop(_) => {}
                        }
                        match outcome {
                            Outcome::Reply => Received::Reply(&self.out),
                            Outcome::Tunnel => Received::ToTunnel(&self.out),
                            Outcome::Consumed => Received::Consumed,
                            Outcome::Drop(d) => Received::Dropped(d),
                        }
                    }
                }
            }
            Datagram::HandshakeResp { .. } | Datagram::SessionUnknown { .. } => {
                self.dropped(Drop::Unexpected)
            }
        }
    }

    /// Seals an IP packet read from the tunnel device for the session owning its
    /// destination; returns where to send the result.
    pub fn handle_tunnel_packet(
        &mut self,
        packet: &[u8],
        now: Instant,
    ) -> Result<(Endpoint, &[u8]), Drop> {
        let Some(id) = destination_address(packet)
            .and_then(|dst| self.by_tunnel.get(&dst))
            .copied()
        else {
            *self.drops.entry(Drop::NoRoute).or_default() += 1;
            return Err(Drop::NoRoute);
        };
        let sealed = match self.sessions.get_mut(&id) {
            Some(session) => session
                .seal_data(self.store.as_ref(), packet, now)
                .map(|(e, _)| e),
            None => Err(Drop::NoRoute),
        };
        match sealed {
            Ok(endpoint) => match self.sessions.get(&id) {
                Some(session) => Ok((endpoint, &session.out)),
                None => Err(Drop::NoRoute),
            },
            Err(d) => {
                *self.drops.entry(d).or_default() += 1;
                self.after_session_input(id, now);
                Err(d)
            }
        }
    }

    /// Ends a session on an operator's command: the client is told (the returned
    /// datagram), the session terminates with operator_terminated and is removed.
    pub fn terminate(&mut self, id: SessionId, now: Instant) -> Option<(Endpoint, Vec<u8>)> {
        let session = self.sessions.get_mut(&id)?;
        let notice = session
            .seal_terminate(ReasonCode::OperatorTerminated, now)
            .map(|(e, b)| (e, b.to_vec()));
        session.terminate(self.store.as_ref(), TerminationCause::Operator, now);
        self.after_session_input(id, now);
        notice
    }

    /// Fires every session's due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.next_deadline().is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.handle_timeout(self.store.as_ref(), now);
            }
            self.after_session_input(id, now);
        }
    }

    /// The earliest deadline of any session.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.sessions
            .values()
            .filter_map(GatewaySession::next_deadline)
            .min()
    }

    /// Every event since the last drain, with its session, oldest first per session.
    pub fn drain_events(&mut self) -> Vec<(SessionId, SessionEvent)> {
        let mut all = std::mem::take(&mut self.events);
        for (id, s) in &mut self.sessions {
            while let Some(e) = s.poll_event() {
                all.push((*id, e));
            }
        }
        all
    }

    /// The gateway's clock.
    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    /// Events of removed sessions not kept because nobody drained them.
    pub fn events_overflowed(&self) -> u64 {
        self.events_overflowed
    }

    fn push_event(&mut self, id: SessionId, event: SessionEvent) {
        if self.events.len() >= GATEWAY_EVENTS_KEPT {
            self.events_overflowed += 1;
            return;
        }
        self.events.push((id, event));
    }

    fn dropped(&mut self, d: Drop) -> Received<'_> {
        *self.drops.entry(d).or_default() += 1;
        Received::Dropped(d)
    }

    /// After any input to a session: terminate it on too many security failures, and
    /// remove it (keeping its events) once it has terminated; returns it if removed.
    fn after_session_input(&mut self, id: SessionId, now: Instant) -> Option<GatewaySession> {
        let session = self.sessions.get_mut(&id)?;
        if session.too_many_security_failures() {
            session.terminate(self.store.as_ref(), TerminationCause::SecurityFailure, now);
        }
        if session.state() != State::Terminated {
            return None;
        }
        let mut session = self.sessions.remove(&id)?;
        if self.ended.len() >= ENDED_SESSIONS_KEPT {
            self.ended.pop_front();
        }
        // A reattach arriving later is refused for the reason the session ended.
        let reason = match session.ended_by {
            Some(TerminationCause::LifetimeExceeded) => ReasonCode::SessionExpired,
            Some(TerminationCause::TransportTtlExceeded) => ReasonCode::TransportTtlExceeded,
            _ => ReasonCode::InvalidStateForReattach,
        };
        self.ended.push_back((id, reason));
        while let Some(e) = session.poll_event() {
            self.push_event(id, e);
        }
        self.by_tunnel.remove(&session.tunnel.addr);
        if let Some(c) = self.clients.get_mut(&session.client) {
            if c.session == Some(id) {
                c.session = None;
            }
        }
        let _ = self.store.remove(id, session.version());
        Some(session)
    }

    fn accept_handshake(
        &mut self,
        from: Endpoint,
        sender_index: u32,
        noise: &[u8],
        now: Instant,
    ) -> Result<(), ReasonCode> {
        let response = Response::read(&self.keypair, HANDSHAKE_PROLOGUE, noise)
            .map_err(|_| ReasonCode::BadProof)?;
        let client = response.client();
        let payload = InitPayload::decode(response.payload()).map_err(|_| ReasonCode::BadProof)?;
        let entry = self
            .clients
            .get(&client)
            .ok_or(ReasonCode::UnauthorizedClient)?;
        if entry.last_timestamp.is_some_and(|t| payload.timestamp <= t) {
            return Err(ReasonCode::ReplayDetected);
        }
        if !self.policy.allows(payload.protocol) || payload.protocol != from.protocol {
            return Err(ReasonCode::PolicyDenied);
        }
        let tunnel = entry.tunnel;
        let previous = entry.session;
        let session_id = fresh_session_id(&self.sessions).ok_or(ReasonCode::AtomicityFailed)?;
        let resp = RespPayload {
            session_id,
            // The version AttachOk produces: the first binding's.
            binding_version: StateVersion(1),
            tunnel,
        };
        // Everything that can fail on this handshake's own account comes first, so that
        // a refused handshake leaves the previous session and the table untouched.
        let (msg2, keys) = response
            .finish(&resp.encode())
            .map_err(|_| ReasonCode::BadProof)?;

        let p = &self.policy;
        let record = SessionRecord {
            session_id,
            state: State::Birth,
            state_version: StateVersion(0),
            owner: self.node.clone(),
            active_binding: None,
            candidates: Vec::new(),
            lifetime_deadline: now + p.max_lifetime(),
            transport_lost_deadline: now + p.transport_lost_ttl(),
            recovery_deadline: None,
        };
        self.store.create(record).map_err(|e| match e {
            crate::store::StoreError::Full { .. } => ReasonCode::CapacityExceeded,
            _ => ReasonCode::AtomicityFailed,
        })?;
        // One session per client: a new handshake replaces the old session explicitly,
        // once the new session's record exists (a full or refusing table leaves the old
        // session untouched).
        if let Some(old) = previous {
            if let Some(s) = self.sessions.get_mut(&old) {
                s.terminate(self.store.as_ref(), TerminationCause::Peer, now);
            }
            self.after_session_input(old, now);
        }
        let transport = TransportRef {
            id: payload.transport_id,
            protocol: payload.protocol,
        };
        let mut session = GatewaySession {
            id: session_id,
            client,
            tunnel,
            policy: Arc::clone(&self.policy),
            node: self.node.clone(),
            channel: Channel::new(session_id, keys, self.limits, now),
            journal: Journal::new(),
            created_at: now,
            last_heard: now,
            binding: None,
            bound_at: StateVersion(0),
            binding_heard: now,
            volatile_since: None,
            limiter: SwitchLimiter::new(&self.policy),
            pending_path: None,
            last_rekey_init: None,
            keys_expired_reported: false,
            security_failures: 0,
            security_events: RateWindow::default(),
            ended_by: None,
            out: Vec::new(),
            plain: Vec::new(),
        };
        let attached = EventBody::TransportAttached {
            transport,
            reason_code: ReasonCode::AttachedToTransport,
        };
        if !session.commit(
            self.store.as_ref(),
            &[FsmEvent::AttachOk],
            &[attached],
            Some(Some((from, transport))),
            now,
        ) {
            let _ = self.store.remove(session_id, StateVersion(0));
            return Err(ReasonCode::AtomicityFailed);
        }
        if let Some(entry) = self.clients.get_mut(&client) {
            entry.last_timestamp = Some(payload.timestamp);
            entry.session = Some(session_id);
        }
        self.by_tunnel.insert(tunnel.addr, session_id);
        self.sessions.insert(session_id, session);
        encode_handshake(
            PacketType::HandshakeResp,
            sender_index,
            &msg2,
            &mut self.out,
        );
        Ok(())
    }
}

/// A random session id not in use (and never 0). Gives up after a few tries rather than
/// loop: with 64 random bits, a second collision means the random source is broken.
fn fresh_session_id(existing: &HashMap<SessionId, GatewaySession>) -> Option<SessionId> {
    for _ in 0..4 {
        let id = SessionId(getrandom::u64().ok()?);
        if id.0 != 0 && !existing.contains_key(&id) {
            return Some(id);
        }
    }
    None
}
