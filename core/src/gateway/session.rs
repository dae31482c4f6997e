//! One session at the gateway: keys, state machine, binding, timers, and the reattach
//! checks in the contract's order. The receive path returns a [`Received`] saying
//! exactly what the caller must do with the packet; events and the session table are
//! updated as a side effect. A session is self-contained, so a runtime can drive each
//! one on its own (one actor per session) with nothing shared but the table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{source_address, Drop, Endpoint, Received};

/// When the session table refuses the write a timer asked for (its record gone, at
/// another version, or owned by another node), the session stays as it is and its
/// timers are looked at again this much later, not at once: the deadline that could not
/// be served is still due, and a driver must not spin on it. The lifetime and the
/// transport-lost TTL still end the session (at most this much late), whatever the table.
pub const TABLE_RETRY: Duration = Duration::from_millis(100);
use crate::cluster::{ClusterError, ClusterKey, ClusterRecord, SessionSecrets};
use crate::crypto::{
    plaintext, rekey_prologue, Channel, KeyEvent, KeyLimits, Keypair, OpenError, PublicKey,
    Response, SealError,
};
use crate::event::{EventBody, ReattachOutcome, SessionEvent, TransportRef, WallClock};
use crate::fsm::{FsmEvent, Instability, State, TerminationCause};
use crate::ids::{NodeId, SessionId, StateVersion, TransportId};
use crate::journal::Journal;
use crate::policy::Policy;
use crate::reason::ReasonCode;
use crate::replay::ReplayError;
use crate::select::SwitchLimiter;
use crate::store::{Binding, SessionRecord, SessionStore};
use crate::wire::{Control, PacketType, ReattachRequest, SessionHeader, TunnelAddrs};

/// One session at the gateway.
pub struct GatewaySession {
    id: SessionId,
    pub(super) client: PublicKey,
    pub(super) tunnel: TunnelAddrs,
    policy: Arc<Policy>,
    node: NodeId,
    channel: Channel,
    journal: Journal,
    created_at: Instant,
    last_heard: Instant,
    binding: Option<(Endpoint, TransportRef)>,
    bound_at: StateVersion,
    binding_heard: Instant,
    /// The largest datagram the client found its path to carry both ways, when smaller
    /// than what it sends (its size probes say, `core::pmtu`), with the address that
    /// path reaches it at.
    path_limit: Option<(Endpoint, u16)>,
    volatile_since: Option<Instant>,
    limiter: SwitchLimiter,
    /// A path waiting to answer a challenge: a reattach that passed every check, or the
    /// new address of a roaming client.
    pending_path: Option<PendingPath>,
    /// The counter of the rekey init that produced the pending next keys: an older init
    /// (held back and delivered late) must not replace them.
    last_rekey_init: Option<u64>,
    keys_expired_reported: bool,
    /// When the table last refused a timer's write (see [`TABLE_RETRY`]).
    write_refused_at: Option<Instant>,
    security_failures: u32,
    /// One budget per kind of security event, so that a flood of one kind cannot hide
    /// another: reattach denials, failed validations, replays.
    security_events: [RateWindow; 3],
    /// Why the session ended, once it has.
    ended_by: Option<TerminationCause>,
    pub(super) out: Vec<u8>,
}

/// A path that has been challenged, and why.
#[derive(Debug, Clone, Copy)]
struct PendingPath {
    endpoint: Endpoint,
    candidate: TransportRef,
    purpose: Purpose,
    token: u64,
    deadline: Instant,
}

/// Why a path is challenged.
#[derive(Debug, Clone, Copy)]
enum Purpose {
    /// A reattach request that passed every check.
    Reattach {
        cause: Instability,
        request_counter: u64,
    },
    /// The bound transport's packets now come from another address (a NAT rebinding):
    /// the binding follows once that address answers, as QUIC validates a migrated path.
    Roam { challenged_at: Instant },
}

/// Security events recorded per second, session and event type, at most: anyone who
/// knows a session id can make the gateway refuse packets for it, and must not flood the
/// event stream, push real state changes out of the journal, or hide one kind of event
/// behind another. Refusals past the limit are still counted
/// (in drops) but not each reported.
pub(super) const SECURITY_EVENTS_PER_SECOND: u32 = 10;

/// Counts events in one-second windows and refuses those past the limit.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RateWindow {
    start: Option<Instant>,
    count: u32,
    suppressed: u64,
}

impl RateWindow {
    pub(super) fn allow(&mut self, now: Instant) -> bool {
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
    /// A new session in BIRTH, bound to nothing yet; [`GatewaySession::attach`] binds
    /// its first transport.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: SessionId,
        client: PublicKey,
        tunnel: TunnelAddrs,
        policy: Arc<Policy>,
        node: NodeId,
        channel: Channel,
        now: Instant,
    ) -> Self {
        GatewaySession {
            id,
            client,
            tunnel,
            limiter: SwitchLimiter::new(&policy),
            policy,
            node,
            channel,
            journal: Journal::new(),
            created_at: now,
            last_heard: now,
            binding: None,
            bound_at: StateVersion(0),
            binding_heard: now,
            path_limit: None,
            volatile_since: None,
            pending_path: None,
            last_rekey_init: None,
            keys_expired_reported: false,
            write_refused_at: None,
            security_failures: 0,
            security_events: [RateWindow::default(); 3],
            ended_by: None,
            out: Vec::new(),
        }
    }

    /// Binds the handshake's transport: BIRTH → ATTACHED, written to the table.
    /// Returns whether it did (the table refused otherwise).
    pub(super) fn attach(
        &mut self,
        store: &dyn SessionStore,
        from: Endpoint,
        transport: TransportRef,
        now: Instant,
    ) -> bool {
        let attached = EventBody::TransportAttached {
            transport,
            reason_code: ReasonCode::AttachedToTransport,
        };
        self.commit(
            store,
            &[FsmEvent::AttachOk],
            &[attached],
            Some(Some((from, transport))),
            now,
        )
    }

    /// The session as the cluster's table holds it (spec/cluster.md): its current keys
    /// sealed under `key` with their reservation of counters (the first this node may
    /// not send with), their creation and the highest counter accepted under them; its
    /// times on the wall clock.
    pub fn export(
        &self,
        clock: &WallClock,
        key: &ClusterKey,
    ) -> Result<ClusterRecord, ClusterError> {
        let sealed = self.channel.secrets().seal(key, self.id)?;
        let p = &self.policy;
        Ok(ClusterRecord {
            session_id: self.id,
            owner: self.node.clone(),
            handover_to: None,
            client: self.client.to_string(),
            state: self.state().as_str().to_string(),
            state_version: self.version().0,
            bound_at: self.bound_at.0,
            binding: self
                .binding
                .map(|(e, _)| format!("{}://{}", e.protocol, e.addr)),
            sealed_keys: {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(sealed)
            },
            send_reserved_until: self.channel.send_limit(),
            keys_created_ms: clock.ts_ms(self.channel.keys_created()),
            recv_highest: self.channel.recv_highest(),
            created_ms: clock.ts_ms(self.created_at),
            lifetime_deadline_ms: clock.ts_ms(self.created_at + p.max_lifetime()),
            transport_lost_deadline_ms: clock.ts_ms(self.last_heard + p.transport_lost_ttl()),
        })
    }

    /// A session taken over from the node that owned it (spec/cluster.md), from its
    /// `record` and its opened `secrets`: it goes on at the record's state and version,
    /// bound to nothing on this node until the client's reattach moves it here. It
    /// sends from the record's reservation up to `send_limit` (this node's, won in the
    /// table), accepts only counters above both the previous owner's highest and
    /// `reattach_counter` less one, and keeps the record's deadlines and key age
    /// (times in the future are taken as now).
    #[allow(clippy::too_many_arguments)]
    pub fn adopt(
        record: &ClusterRecord,
        secrets: &SessionSecrets,
        (client, tunnel): (PublicKey, TunnelAddrs),
        policy: Arc<Policy>,
        node: NodeId,
        limits: KeyLimits,
        clock: &WallClock,
        (reattach_counter, send_limit): (u64, u64),
        now: Instant,
    ) -> Result<GatewaySession, ClusterError> {
        let state: State = record.state.parse().map_err(ClusterError::Malformed)?;
        if matches!(state, State::Birth | State::Terminated) {
            return Err(ClusterError::Refused(format!("the session is {state}")));
        }
        let from = record.send_reserved_until;
        if from >= send_limit {
            return Err(ClusterError::Refused(format!(
                "no counters reserved above {from}"
            )));
        }
        // The wall-clock times back onto this node's monotonic clock; what happened
        // (creation, the last time the client was heard, the keys' making) never later
        // than now.
        let wall_now = clock.ts_ms(now);
        let at = |ms: u64| {
            if ms >= wall_now {
                now.checked_add(Duration::from_millis(ms - wall_now))
            } else {
                now.checked_sub(Duration::from_millis(wall_now - ms))
            }
        };
        let past = |ms: u64| at(ms).unwrap_or(now).min(now);
        let created_at = at(record.lifetime_deadline_ms)
            .and_then(|deadline| deadline.checked_sub(policy.max_lifetime()))
            .unwrap_or_else(|| past(record.created_ms))
            .min(now);
        let last_heard = at(record.transport_lost_deadline_ms)
            .and_then(|deadline| deadline.checked_sub(policy.transport_lost_ttl()))
            .unwrap_or(created_at)
            .clamp(created_at, now);
        let floor = [record.recv_highest, reattach_counter.checked_sub(1)]
            .into_iter()
            .flatten()
            .max();
        let channel = Channel::adopt(
            record.session_id,
            secrets,
            limits,
            (from, send_limit),
            floor,
            past(record.keys_created_ms),
        );
        let mut session = GatewaySession::new(
            record.session_id,
            client,
            tunnel,
            policy,
            node,
            channel,
            now,
        );
        session.journal = Journal::resume(state, StateVersion(record.state_version));
        session.bound_at = StateVersion(record.bound_at);
        session.created_at = created_at;
        session.last_heard = last_heard;
        Ok(session)
    }

    /// Sets the first counter the current keys may not send with: the end of this
    /// node's reservation (spec/cluster.md).
    pub fn reserve_until(&mut self, limit: u64) {
        self.channel.set_send_limit(limit);
    }

    /// The counter of the next packet this session sends.
    pub fn next_send_counter(&self) -> u64 {
        self.channel.next_send_counter()
    }

    /// The first counter the current keys may not send with (u64::MAX: no limit).
    pub fn send_limit(&self) -> u64 {
        self.channel.send_limit()
    }

    /// The current keys' epoch.
    pub fn key_epoch(&self) -> u32 {
        self.channel.epoch()
    }

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

    /// The client's tunnel addresses.
    pub fn tunnel(&self) -> TunnelAddrs {
        self.tunnel
    }

    /// The cipher that seals the session's packets.
    pub fn cipher(&self) -> crate::crypto::Cipher {
        self.channel.cipher()
    }

    /// The client's static public key.
    pub fn client(&self) -> PublicKey {
        self.client
    }

    /// Why the session ended, once it has.
    pub fn ended_by(&self) -> Option<TerminationCause> {
        self.ended_by
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
        self.security_events.iter().map(|w| w.suppressed).sum()
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.journal.poll()
    }

    /// The largest tunnel packet the path to `to` carries, when the client found it
    /// narrower than what it sends (its size probes, `core::pmtu`); `None` names no
    /// limit.
    pub fn path_room(&self, to: Endpoint) -> Option<usize> {
        self.path_limit
            .filter(|&(at, _)| at == to)
            .map(|(_, size)| crate::wire::room_of(size))
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
        let d = more.into_iter().flatten().fold(d, Instant::min);
        Some(match self.write_refused_at {
            Some(at) => d.max(at + TABLE_RETRY),
            None => d,
        })
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
            // An unanswered roam is no reattach: it ends silently (anyone who relocates
            // a genuine packet causes one).
            if let Purpose::Reattach { .. } = pp.purpose {
                self.journal.record(
                    now,
                    EventBody::ReattachResult {
                        candidate_transport: pp.candidate,
                        result: ReattachOutcome::Denied,
                        reason_code: ReasonCode::RecoveryWindowExpired,
                    },
                );
            }
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
            } else {
                self.write_refused_at = Some(now);
            }
        } else if self.state() == State::Volatile
            && self
                .volatile_since
                .is_some_and(|t| now >= t + p.volatile_to_degraded())
            && !self.commit(store, &[FsmEvent::VolatilePersisted], &[], None, now)
        {
            self.write_refused_at = Some(now);
        }
    }

    /// Ends the session: state, event, table record. The caller removes it afterwards.
    ///
    /// A session that cannot record its end still ends: when the table refuses the write
    /// (the record is gone, at another version or owned by another node, so this node has
    /// lost its authority over it) the session terminates locally all the same, with the
    /// same event, and leaves the record to its owner. Ending is the safe direction:
    /// consistency over availability.
    pub fn terminate(&mut self, store: &dyn SessionStore, cause: TerminationCause, now: Instant) {
        if self.state() == State::Terminated {
            return;
        }
        let step = FsmEvent::Terminate(cause);
        if !self.commit(store, &[step], &[], Some(None), now) {
            if self.journal.apply(step, now).is_err() {
                return;
            }
            self.binding = None;
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

    /// Seals an IP packet from the tunnel device for the client into the session's
    /// buffer; returns where to send it and the sealed bytes.
    pub fn seal_data(
        &mut self,
        store: &dyn SessionStore,
        packet: &[u8],
        now: Instant,
    ) -> Result<(Endpoint, &[u8]), Drop> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let sealed = self.seal_data_append(store, packet, now, &mut out);
        self.out = out;
        sealed.map(|endpoint| (endpoint, self.out.as_slice()))
    }

    /// Seals an IP packet from the tunnel device for the client, appended to `out` (a
    /// batch to send at once); returns where to send it. Due timers fire first: a
    /// session past its lifetime sends nothing.
    pub fn seal_data_append(
        &mut self,
        store: &dyn SessionStore,
        packet: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<Endpoint, Drop> {
        self.handle_timeout(store, now);
        if self.state() == State::Terminated {
            return Err(Drop::SessionEnded);
        }
        let (endpoint, _) = self.binding.ok_or(Drop::UnboundTransport)?;
        self.channel
            .seal_append(&Control::Data(packet), now, out)
            .map_err(|e| match e {
                SealError::KeysExpired => Drop::KeysExpired,
                SealError::Unreserved => Drop::Unreserved,
            })?;
        Ok(endpoint)
    }

    /// Handles one session packet that arrived from `from`: `packet` is the whole
    /// datagram, opened in place (a tunnelled packet is handed back as a slice of it).
    /// Due timers fire first: a packet arriving after the transport-lost TTL does not
    /// revive the session.
    #[allow(clippy::too_many_arguments)]
    pub fn handle_packet<'a>(
        &'a mut self,
        store: &dyn SessionStore,
        local: &Keypair,
        clock: &WallClock,
        from: Endpoint,
        header: &SessionHeader,
        packet: &'a mut [u8],
        now: Instant,
    ) -> Received<'a> {
        let outcome = self.process_packet(store, local, clock, from, header, packet, now);
        self.received(outcome, packet)
    }

    /// What an outcome means for the caller, with the bytes it refers to: the session's
    /// sealed answer, or the plaintext opened in `packet`.
    pub(super) fn received<'a>(&'a self, outcome: Outcome, packet: &'a [u8]) -> Received<'a> {
        match outcome {
            Outcome::Reply => Received::Reply(&self.out),
            Outcome::Tunnel => Received::ToTunnel(plaintext(packet)),
            Outcome::Consumed => Received::Consumed,
            Outcome::Drop(d) => Received::Dropped(d),
        }
    }

    /// Handles one packet; a session whose security failures reach the policy's limit
    /// is terminated (security_failure) before this returns.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn process_packet(
        &mut self,
        store: &dyn SessionStore,
        local: &Keypair,
        clock: &WallClock,
        from: Endpoint,
        header: &SessionHeader,
        packet: &mut [u8],
        now: Instant,
    ) -> Outcome {
        let outcome = self.judge_packet(store, local, clock, from, header, packet, now);
        if self.security_failures >= self.policy.max_security_failures() {
            self.terminate(store, TerminationCause::SecurityFailure, now);
        }
        outcome
    }

    #[allow(clippy::too_many_arguments)]
    fn judge_packet(
        &mut self,
        store: &dyn SessionStore,
        local: &Keypair,
        clock: &WallClock,
        from: Endpoint,
        header: &SessionHeader,
        packet: &mut [u8],
        now: Instant,
    ) -> Outcome {
        if header.ptype == PacketType::ReattachRequest {
            // Judged before the timers end the session, so that a request arriving past
            // the lifetime or the TTL is refused for exactly that reason (checks 3, 4).
            let outcome = self.handle_reattach(clock, from, header, packet, now);
            self.handle_timeout(store, now);
            return outcome;
        }
        self.handle_timeout(store, now);
        if self.state() == State::Terminated {
            return Outcome::Drop(Drop::SessionEnded);
        }
        let opened = self.channel.open_in_place(header, packet, now);
        match opened {
            Ok(key_event) => {
                self.key_event(key_event, now);
                self.last_heard = now;
                match Control::decode(header.ptype, plaintext(packet)) {
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
        }
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
                    return self.roam_towards(from, now);
                }
                if !source_address(packet).is_some_and(|a| self.tunnel.contains(a)) {
                    return Outcome::Drop(Drop::SpoofedSource);
                }
                self.binding_heard = now;
                Outcome::Tunnel
            }
            Control::Heartbeat { seq } => {
                if !bound {
                    return self.roam_towards(from, now);
                }
                self.binding_heard = now;
                let ack = Control::HeartbeatAck {
                    seq,
                    binding_version: self.bound_at,
                };
                self.reply(&ack, now)
            }
            Control::Probe { seq } => self.reply(&Control::ProbeAck { seq }, now),
            Control::SizeProbe(probe) => {
                // The answer is padded as the probe was: it proves the size the other
                // way, and is never larger than what the client sent.
                // A limit below the smallest size searched is none a client finds.
                if bound {
                    self.path_limit =
                        (probe.limit >= crate::pmtu::BASE).then_some((from, probe.limit));
                }
                self.reply(&Control::SizeProbeAck(probe), now)
            }
            Control::PathResponse { token } => self.complete_path(store, from, token, now),
            Control::Terminate { reason } => {
                self.terminate(store, TerminationCause::announced(reason), now);
                Outcome::Consumed
            }
            Control::RekeyInit(noise) => self.handle_rekey(local, header, noise, now),
            Control::ReattachRequest(_)
            | Control::HeartbeatAck { .. }
            | Control::ProbeAck { .. }
            | Control::SizeProbeAck(_)
            | Control::StandbyProbeAck { .. }
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
        packet: &mut [u8],
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
        let opened = match early {
            None => self.channel.open_in_place(header, packet, now),
            Some(_) => Err(OpenError::Auth),
        };
        let decoded = match (&opened, Control::decode(header.ptype, plaintext(packet))) {
            (Ok(_), Ok(Control::ReattachRequest(r))) => Some(r),
            _ => None,
        };
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
            purpose: Purpose::Reattach {
                cause: instability_of(request.cause),
                request_counter: header.counter,
            },
            token,
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

    /// An authenticated data packet or heartbeat of the bound transport's kind from
    /// another address than the binding's: the client's NAT gave it a new mapping (or
    /// someone relocated one of its packets). The packet is not delivered, and the
    /// binding does not move: the new address is challenged, and the binding follows
    /// only when the answer comes back from it (see [`Self::complete_path`]). One
    /// challenge per heartbeat interval at most; an explicit reattach in flight wins.
    fn roam_towards(&mut self, from: Endpoint, now: Instant) -> Outcome {
        let Some((_, transport)) = self.binding else {
            return Outcome::Drop(Drop::UnboundTransport);
        };
        let settled = matches!(
            self.state(),
            State::Attached | State::Volatile | State::Degraded
        );
        let busy = self.pending_path.is_some_and(|pp| match pp.purpose {
            Purpose::Reattach { .. } => true,
            Purpose::Roam { challenged_at } => {
                now < challenged_at + self.policy.heartbeat_interval()
            }
        });
        if transport.protocol != from.protocol || !settled || busy {
            return Outcome::Drop(Drop::UnboundTransport);
        }
        let Ok(token) = getrandom::u64() else {
            return Outcome::Drop(Drop::UnboundTransport);
        };
        self.pending_path = Some(PendingPath {
            endpoint: from,
            candidate: transport,
            purpose: Purpose::Roam { challenged_at: now },
            token,
            deadline: now + self.policy.heartbeat_volatile(),
        });
        self.reply(&Control::PathChallenge { token }, now)
    }

    /// The client answered the path challenge from the challenged endpoint: move the
    /// binding (9: through the session table's compare-and-swap) and, for a reattach,
    /// acknowledge. A roam is recorded as a switch the gateway made (`explicit: false`)
    /// with the same transitions as a reattach after a dead transport: the binding's old
    /// address went silent for this session.
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
        let (cause, request_counter) = match pp.purpose {
            Purpose::Reattach {
                cause,
                request_counter,
            } => (cause, Some(request_counter)),
            Purpose::Roam { .. } => (Instability::TransportDead, None),
        };
        if self.limiter.check(now).is_err()
            || !matches!(
                self.state(),
                State::Attached | State::Volatile | State::Degraded
            )
        {
            return match request_counter {
                Some(counter) => {
                    self.deny_reattach(pp.candidate, ReasonCode::PolicyDenied, true, counter, now)
                }
                None => Outcome::Drop(Drop::UnboundTransport),
            };
        }
        let mut steps = Vec::with_capacity(3);
        if self.state() == State::Attached {
            steps.push(FsmEvent::InstabilityDetected(cause));
        }
        steps.push(FsmEvent::SwitchInitiated(cause.recovery()));
        steps.push(FsmEvent::ReattachValid);
        let previous = self.binding;
        let mut before = Vec::with_capacity(2);
        if request_counter.is_some() {
            before.push(EventBody::ReattachResult {
                candidate_transport: pp.candidate,
                result: ReattachOutcome::Success,
                reason_code: ReasonCode::ReattachSuccess,
            });
        }
        if previous.map(|(e, t)| (e, t.id)) != Some((from, pp.candidate.id)) {
            before.push(EventBody::TransportSwitch {
                previous_transport: previous.map(|(_, t)| t),
                new_transport: pp.candidate,
                candidate_count: 1,
                loss_ratio: 0.0,
                latency_estimate_ms: None,
                explicit: request_counter.is_some(),
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
            return match request_counter {
                Some(counter) => self.deny_reattach(
                    pp.candidate,
                    ReasonCode::StaleStateVersion,
                    true,
                    counter,
                    now,
                ),
                None => Outcome::Drop(Drop::UnboundTransport),
            };
        }
        self.limiter.record(now);
        self.volatile_since = None;
        match request_counter {
            Some(request_counter) => {
                let ack = Control::ReattachAck {
                    request_counter,
                    binding_version: self.bound_at,
                };
                self.reply(&ack, now)
            }
            // The client asked for nothing; its next heartbeat's answer carries the new
            // binding version.
            None => Outcome::Consumed,
        }
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
        let kind = match &body {
            EventBody::ReattachResult { .. } => 0,
            EventBody::SecurityValidationFailed { .. } => 1,
            _ => 2,
        };
        if self.security_events[kind].allow(now) {
            self.journal.record(now, body);
        }
    }

    /// Applies `steps` as one write: the new record (state, version, binding) is
    /// compare-and-swapped into the table at the version this session holds, and only if
    /// that succeeds are the transitions recorded, with `before` just before the last.
    /// `binding`: `None` keeps it, `Some(None)` clears it, `Some(Some(..))` replaces
    /// it. Returns whether
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
        self.write_refused_at = None;
        // The events that explain the last step come just before it (a reattach's result
        // and switch just before RECOVERING → ATTACHED, as the client records them).
        let last = steps.len().saturating_sub(1);
        for (i, step) in steps.iter().enumerate() {
            if i == last {
                for body in before {
                    self.journal.record(now, body.clone());
                }
            }
            let _ = self.journal.apply(*step, now);
        }
        self.binding = new_binding;
        self.bound_at = bound_at;
        true
    }

    /// The session's record for this node's own table, as it stands.
    pub(super) fn table_record(&self) -> SessionRecord {
        self.record(self.state(), self.version(), self.binding, self.bound_at)
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
            Err(SealError::KeysExpired) => Outcome::Drop(Drop::KeysExpired),
            Err(SealError::Unreserved) => Outcome::Drop(Drop::Unreserved),
        }
    }
}

/// What became of one packet; [`GatewaySession::received`] turns it into a [`Received`].
#[derive(Debug, Clone, Copy)]
pub(super) enum Outcome {
    Reply,
    Tunnel,
    Consumed,
    Drop(Drop),
}

pub(super) fn ms(d: Duration) -> u64 {
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
