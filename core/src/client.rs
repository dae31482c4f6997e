//! The client's side of the protocol, sans-IO.
//!
//! A [`Client`] performs the handshake over one of its transports, then runs the
//! session: it seals outgoing IP packets on the active transport, heartbeats the active
//! transport and probes the standbys (feeding their health to [`SessionControl`]), sends
//! the reattach requests the control plane decides on, and rekeys on the policy's limits.
//! The driver feeds datagrams and timeouts in and sends what
//! [`Client::poll_transmit`] hands out.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::control::{Action, SessionControl};
use crate::crypto::{
    plaintext, rekey_prologue, Channel, Cipher, CipherSet, CryptoError, Initiation, KeyEvent,
    KeyLimits, Keypair, OpenError, PublicKey, Rotation, HANDSHAKE_PROLOGUE,
};
use crate::event::{EventBody, SessionEvent, TransportRef, WallClock};
use crate::fsm::{State, TerminationCause};
use crate::gateway::COOKIE_ROTATION;
use crate::ids::{Protocol, SessionId, StateVersion, TransportId};
use crate::mac::{Cookie, CookieKey, MacKey, SealedCookie};
use crate::pmtu::{self, PathSearch};
use crate::policy::Policy;
use crate::reason::ReasonCode;
use crate::wire::{
    self, encode_initiation, room_of, Control, Datagram, InitPayload, PacketType, ReattachRequest,
    RespPayload, SizeProbe, Timestamp, TunnelAddrs, COOKIE_NONCE_LEN, MAC_LEN,
};

/// How long a handshake or rekey waits for its answer before it may be retried.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The client's configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The client's static key pair.
    pub keypair: Keypair,
    /// The gateway's static public key, pinned.
    pub gateway: PublicKey,
    /// The policy the session runs under.
    pub policy: Arc<Policy>,
    /// The candidate transports, in the client's numbering (at most
    /// transport.max_candidate_count).
    pub transports: Vec<TransportRef>,
    /// The ciphers the client offers ([`CipherSet::this_machine`] in the binary).
    pub ciphers: CipherSet,
}

/// Why the client refused to do something.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    /// No session is established (yet, or any more).
    #[error("no session is established")]
    NotEstablished,
    /// The transport is not one of the configured candidates.
    #[error("transport {0} is not configured")]
    UnknownTransport(TransportId),
    /// The session has no active transport to send on.
    #[error("no active transport")]
    NoActiveTransport,
    /// The keys are expired and no rekey has finished.
    #[error("the session keys have expired")]
    KeysExpired,
    /// A session is established: end it first ([`Client::terminate`]), so that a new
    /// session is never started silently.
    #[error("a session is established; terminate it before connecting again")]
    AlreadyEstablished,
    /// The handshake could not be built.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A reloaded policy does not fit the configured transports; nothing changed.
    #[error("the new policy {0}: that needs a new configuration of the candidates and a restart")]
    PolicyDoesNotFit(String),
}

/// A datagram to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit<'a> {
    /// The transport to send it on.
    pub via: TransportId,
    /// The datagram.
    pub bytes: &'a [u8],
}

/// Why a received datagram was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientDrop {
    /// Not a valid packet.
    Malformed,
    /// Not for this client's session or handshake.
    NotOurs,
    /// Did not authenticate.
    Unauthenticated,
    /// An authentic packet seen before.
    Replay,
    /// An answer that matches nothing in flight.
    Unexpected,
}

/// What the driver must do with a received datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientReceived<'a> {
    /// Write this IP packet to the tunnel device.
    ToTunnel(&'a [u8]),
    /// Consumed; nothing to write.
    Consumed,
    /// The gateway said, in clear text, that it does not know this session (e.g. it
    /// restarted). Unauthenticated: the driver decides whether to start a new session.
    SessionUnknown,
    /// Dropped.
    Dropped(ClientDrop),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Probe(TransportId),
    Reattach {
        candidate: TransportId,
        attempt: StateVersion,
    },
    PathResponse {
        via: TransportId,
        token: u64,
    },
    RekeyInit,
    SizeProbe {
        via: TransportId,
        probe: pmtu::SizeProbe,
    },
}

struct Probing {
    transport: TransportRef,
    next_at: Instant,
    seq: u64,
    /// The last probe sent (its seq and packet counter) until a standby node answers
    /// it: such an answer fits this one probe only, once.
    standby_fits: Option<(u64, u64)>,
    /// The search of this transport's path for the largest datagram it carries, when it
    /// is UDP and a search was asked for ([`Client::search_path_mtu`]). A standby's
    /// search sends at most one size probe with each of its standby probes, so that a
    /// jump finds the size already known; the active transport's runs on its own
    /// schedule.
    search: Option<PathSearch>,
}

struct Established {
    session_id: SessionId,
    tunnel: TunnelAddrs,
    channel: Channel,
    control: SessionControl,
    binding_version: StateVersion,
    probing: Vec<Probing>,
    pending: VecDeque<Pending>,
    /// The reattach in flight.
    reattach: Option<Reattaching>,
    rekey: Option<(Initiation, Instant)>,
    keys_expired_reported: bool,
    /// The transport whose path search last ran as the active one's: another active
    /// transport is a jump, which tells the new path's search ([`PathSearch::activated`]).
    searched_active: Option<TransportId>,
}

impl Established {
    /// The path search of transport `id`, if it has one.
    fn search(&self, id: TransportId) -> Option<&PathSearch> {
        let probing = self.probing.iter().find(|p| p.transport.id == id)?;
        probing.search.as_ref()
    }

    fn search_mut(&mut self, id: TransportId) -> Option<&mut PathSearch> {
        let probing = self.probing.iter_mut().find(|p| p.transport.id == id)?;
        probing.search.as_mut()
    }
}

/// A reattach in flight: the counters of the requests sent for it (an answer to any of
/// them settles it: a datagram may be lost, so the request is sent again every
/// [`REATTACH_RESEND`] until the gateway answers or challenges the path, or the
/// attempt ends), its attempt, and when it was last sent.
struct Reattaching {
    counters: Vec<u64>,
    attempt: StateVersion,
    sent_at: Instant,
    /// The gateway challenged the path: the request arrived.
    challenged: bool,
}

/// How long a reattach request waits for its answer before it is sent again (fresh:
/// its timestamp and counter are new), within the recovery window. A lost request, or
/// one a gateway cluster's node holds while the session's previous owner is waited out,
/// then costs a second, not the whole window.
pub const REATTACH_RESEND: Duration = Duration::from_secs(1);

/// Requests of one reattach whose answers are recognized, at most (the oldest are
/// forgotten).
const REATTACH_COPIES: usize = 16;

enum Phase {
    /// No session and no handshake in flight; a handshake may be (re)started at
    /// `retry_at` (at once if `None`).
    Idle {
        retry_at: Option<Instant>,
    },
    Handshaking {
        initiation: Box<Initiation>,
        sender_index: u32,
        /// The initiation's mac1: a cookie reply to it is sealed with it as associated
        /// data.
        mac1: [u8; MAC_LEN],
        via: TransportRef,
        started: Instant,
    },
    Established(Box<Established>),
    Ended(ReasonCode),
}

/// The client.
pub struct Client {
    config: ClientConfig,
    /// The key of the initiations' MAC, from the pinned gateway key.
    mac_key: MacKey,
    /// The key the gateway's cookie replies are sealed under.
    cookie_key: CookieKey,
    /// Cookies the gateway gave, per transport (a cookie proves one source address),
    /// with when each came; one per configured transport at most.
    cookies: Vec<(TransportId, Cookie, Instant)>,
    /// The transport whose cookie just came: the next initiation goes there.
    retry_via: Option<TransportId>,
    limits: KeyLimits,
    clock: WallClock,
    phase: Phase,
    last_timestamp: Timestamp,
    /// Events of a session that has ended, until drained.
    ended_events: VecDeque<SessionEvent>,
    /// The largest datagram the tunnel makes, when the UDP path is to be searched for
    /// the size it carries ([`Client::search_path_mtu`]).
    search_largest: Option<u16>,
    out: Vec<u8>,
    inbuf: Vec<u8>,
}

impl Client {
    /// A client that has not connected yet. `clock` supplies wall time for handshake
    /// timestamps and reattach freshness.
    pub fn new(mut config: ClientConfig, clock: WallClock) -> Self {
        config.keypair = config.keypair.with_peers([config.gateway]);
        Client {
            mac_key: MacKey::for_gateway(&config.gateway),
            cookie_key: CookieKey::for_gateway(&config.gateway),
            cookies: Vec::new(),
            retry_via: None,
            limits: KeyLimits::from_policy(&config.policy),
            config,
            clock,
            phase: Phase::Idle { retry_at: None },
            last_timestamp: Timestamp::default(),
            ended_events: VecDeque::new(),
            search_largest: None,
            out: Vec::new(),
            inbuf: Vec::new(),
        }
    }

    /// Searches the path of each UDP transport, the standbys too, for the largest
    /// datagram it carries both ways, up to `largest_datagram` (the tunnel MTU and
    /// [`crate::wire::OVERHEAD`]), with size probes (`core::pmtu`); what is found is
    /// [`Client::path_room`], and the active path's is told to the gateway. Without it
    /// no path is searched. Takes effect from the next session.
    pub fn search_path_mtu(&mut self, largest_datagram: u16) {
        self.search_largest = Some(largest_datagram);
    }

    /// The largest tunnel packet the path of `via` carries, when its search found it
    /// narrower than the largest the tunnel makes; `None` names no limit.
    pub fn path_room(&self, via: TransportId) -> Option<usize> {
        self.established()?.search(via)?.limit().map(room_of)
    }

    /// Starts (or retries) the handshake over `via`; returns the initiation to send.
    /// Refused while a session is established.
    pub fn connect(&mut self, via: TransportId, now: Instant) -> Result<Transmit<'_>, ClientError> {
        if matches!(self.phase, Phase::Established(_)) {
            return Err(ClientError::AlreadyEstablished);
        }
        let transport = self.transport(via)?;
        let timestamp = self.next_timestamp(now);
        let payload = InitPayload {
            timestamp,
            transport_id: via,
            protocol: transport.protocol,
            ciphers: self.config.ciphers,
        };
        let (initiation, msg1) = Initiation::start(
            &self.config.keypair,
            &self.config.gateway,
            HANDSHAKE_PROLOGUE,
            &payload.encode(),
        )?;
        let sender_index = getrandom::u32().map_err(|e| CryptoError::Random(e.to_string()))?;
        self.cookies
            .retain(|(_, _, at)| now.saturating_duration_since(*at) < COOKIE_ROTATION);
        let cookie = self
            .cookies
            .iter()
            .find(|(t, _, _)| *t == via)
            .map(|(_, c, _)| c);
        encode_initiation(sender_index, &msg1, &self.mac_key, cookie, &mut self.out);
        let mut mac1 = [0u8; MAC_LEN];
        if let Some(m) = self
            .out
            .len()
            .checked_sub(2 * MAC_LEN)
            .and_then(|at| self.out.get(at..at + MAC_LEN))
        {
            mac1.copy_from_slice(m);
        }
        self.retry_via = None;
        self.phase = Phase::Handshaking {
            initiation: Box::new(initiation),
            sender_index,
            mac1,
            via: transport,
            started: now,
        };
        Ok(Transmit {
            via,
            bytes: &self.out,
        })
    }

    /// Ends the session on the user's command (operator_terminated); returns the notice
    /// to send to the gateway, if one could be sealed.
    pub fn terminate(&mut self, now: Instant) -> Option<Transmit<'_>> {
        let Phase::Established(e) = &mut self.phase else {
            return None;
        };
        let via = e.control.active().map(|t| t.id);
        let sealed = e
            .channel
            .seal(
                &Control::Terminate {
                    reason: ReasonCode::OperatorTerminated,
                },
                now,
                &mut self.out,
            )
            .is_ok();
        let _ = e.control.terminate(TerminationCause::Operator, now);
        self.settle();
        match (via, sealed) {
            (Some(via), true) => Some(Transmit {
                via,
                bytes: &self.out,
            }),
            _ => None,
        }
    }

    /// The policy the client runs under.
    pub fn policy(&self) -> &Policy {
        &self.config.policy
    }

    /// The session's id, once established.
    pub fn session_id(&self) -> Option<SessionId> {
        self.established().map(|e| e.session_id)
    }

    /// The tunnel addresses the gateway gave, once established.
    pub fn tunnel(&self) -> Option<TunnelAddrs> {
        self.established().map(|e| e.tunnel)
    }

    /// The transport data packets leave on now, once established (if any is active).
    pub fn active_transport(&self) -> Option<TransportId> {
        self.established()
            .and_then(|e| e.control.active())
            .map(|t| t.id)
    }

    /// The cipher the gateway chose for the session, once established.
    pub fn cipher(&self) -> Option<Cipher> {
        self.established().map(|e| e.channel.cipher())
    }

    /// The session's state (BIRTH before the handshake finishes).
    pub fn state(&self) -> State {
        match &self.phase {
            Phase::Established(e) => e.control.state(),
            Phase::Ended(_) => State::Terminated,
            _ => State::Birth,
        }
    }

    /// Why the session ended, once it has.
    pub fn ended(&self) -> Option<ReasonCode> {
        match &self.phase {
            Phase::Ended(r) => Some(*r),
            _ => None,
        }
    }

    /// The session's control plane, once established (for status and tests).
    pub fn control(&self) -> Option<&SessionControl> {
        self.established().map(|e| &e.control)
    }

    /// Whether a handshake started at `started` has waited long enough to be retried.
    pub fn handshake_timed_out(&self, now: Instant) -> bool {
        match &self.phase {
            Phase::Handshaking { started, .. } => now >= *started + HANDSHAKE_TIMEOUT,
            Phase::Idle { retry_at } => retry_at.is_some_and(|t| now >= t),
            Phase::Established(_) | Phase::Ended(_) => false,
        }
    }

    /// Seals an IP packet from the tunnel device on the active transport.
    pub fn send_data(&mut self, packet: &[u8], now: Instant) -> Result<Transmit<'_>, ClientError> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let sealed = self.seal_data_append(packet, now, &mut out);
        self.out = out;
        Ok(Transmit {
            via: sealed?,
            bytes: &self.out,
        })
    }

    /// A transport reported itself dead or back up.
    pub fn transport_status(&mut self, id: TransportId, up: bool, now: Instant) {
        if let Phase::Established(e) = &mut self.phase {
            let _ = if up {
                e.control.transport_up(id, now)
            } else {
                e.control.transport_dead(id, now)
            };
            collect_actions(e);
        }
        self.settle();
    }

    /// Handles one datagram that arrived on `via` (opened in the client's own copy).
    pub fn handle_datagram(
        &mut self,
        via: TransportId,
        datagram: &[u8],
        now: Instant,
    ) -> ClientReceived<'_> {
        let mut packet = std::mem::take(&mut self.inbuf);
        packet.clear();
        packet.extend_from_slice(datagram);
        let handled = self.receive(via, &mut packet, now);
        self.inbuf = packet;
        received(handled, &self.inbuf)
    }

    /// Handles one datagram that arrived on `via`, opening it in place: a tunnelled
    /// packet is handed back as a slice of `datagram`.
    pub fn handle_datagram_in_place<'a>(
        &mut self,
        via: TransportId,
        datagram: &'a mut [u8],
        now: Instant,
    ) -> ClientReceived<'a> {
        let handled = self.receive(via, datagram, now);
        received(handled, datagram)
    }

    fn receive(&mut self, via: TransportId, datagram: &mut [u8], now: Instant) -> Handled {
        let header = match wire::parse(datagram) {
            Err(_) => return Handled::Drop(ClientDrop::Malformed),
            Ok(Datagram::Session { header, .. }) => header,
            Ok(Datagram::HandshakeResp {
                receiver_index,
                noise,
            }) => {
                let handled = self.finish_handshake(receiver_index, noise, now);
                self.settle();
                return handled;
            }
            Ok(Datagram::SessionUnknown { session_id }) => {
                return if self.session_id() == Some(session_id) {
                    Handled::SessionUnknown
                } else {
                    Handled::Drop(ClientDrop::NotOurs)
                };
            }
            Ok(Datagram::CookieReply {
                receiver_index,
                nonce,
                sealed,
            }) => return self.take_cookie(via, receiver_index, nonce, sealed, now),
            Ok(Datagram::HandshakeInit { .. }) => return Handled::Drop(ClientDrop::Unexpected),
        };
        let Phase::Established(e) = &mut self.phase else {
            return Handled::Drop(ClientDrop::NotOurs);
        };
        if header.session_id != e.session_id {
            return Handled::Drop(ClientDrop::NotOurs);
        }
        if header.ptype == PacketType::StandbyProbeAck {
            let handled = match e.channel.open_standby_in_place(&header, datagram, now) {
                Ok(()) => match Control::decode(header.ptype, plaintext(datagram)) {
                    Ok(Control::StandbyProbeAck { seq, probe_counter }) => {
                        let probing = e.probing.iter_mut().find(|p| p.transport.id == via);
                        match probing {
                            Some(p) if p.standby_fits == Some((seq, probe_counter)) => {
                                p.standby_fits = None;
                                if let Some(search) = p.search.as_mut() {
                                    search.heard();
                                }
                                let _ = e.control.probe_acked(via, seq, now);
                                Handled::Consumed
                            }
                            _ => Handled::Drop(ClientDrop::Unexpected),
                        }
                    }
                    _ => Handled::Drop(ClientDrop::Malformed),
                },
                Err(_) => Handled::Drop(ClientDrop::Unauthenticated),
            };
            self.settle();
            return handled;
        }
        let handled = match e.channel.open_in_place(&header, datagram, now) {
            Ok(key_event) => {
                if let KeyEvent::Rotated(r) = key_event {
                    record_rotation(e, r, now);
                }
                let _ = e.control.heard(via, now);
                match Control::decode(header.ptype, plaintext(datagram)) {
                    Ok(control) => handle_control(e, via, control, now),
                    Err(_) => Handled::Drop(ClientDrop::Malformed),
                }
            }
            Err(OpenError::Replay(_)) => Handled::Drop(ClientDrop::Replay),
            Err(_) => Handled::Drop(ClientDrop::Unauthenticated),
        };
        self.settle();
        handled
    }

    /// Seals an IP packet from the tunnel device for the active transport, appended to
    /// `out` (a batch to send at once); returns the transport to send it on.
    pub fn seal_data_append(
        &mut self,
        packet: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<TransportId, ClientError> {
        let Phase::Established(e) = &mut self.phase else {
            return Err(ClientError::NotEstablished);
        };
        let via = e.control.active().ok_or(ClientError::NoActiveTransport)?.id;
        e.channel
            .seal_append(&Control::Data(packet), now, out)
            .map_err(|_| ClientError::KeysExpired)?;
        Ok(via)
    }

    /// Fires due timers: the control plane's, the probe schedule, the rekey limits.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Phase::Established(e) = &mut self.phase {
            e.control.handle_timeout(now);
            collect_actions(e);
            // An unanswered reattach is sent again while its attempt lasts.
            if let Some(r) = e.reattach.as_mut() {
                match e.control.reattach_attempt() {
                    Some((candidate, attempt)) if attempt == r.attempt => {
                        if !r.challenged && now >= r.sent_at + REATTACH_RESEND {
                            r.sent_at = now;
                            push_pending(&mut e.pending, Pending::Reattach { candidate, attempt });
                        }
                    }
                    _ => e.reattach = None,
                }
            }
            follow_active_path(e, now);
            let active = e.control.active().map(|t| t.id);
            let policy = &self.config.policy;
            for p in &mut e.probing {
                let id = p.transport.id;
                let is_active = Some(id) == active;
                let due = p.next_at <= now;
                if due {
                    let interval = if is_active {
                        policy.heartbeat_interval()
                    } else {
                        policy.probe_interval()
                    };
                    p.next_at = now + interval;
                    push_pending(&mut e.pending, Pending::Probe(id));
                }
                // The active path's search on its own schedule; a standby's with its
                // standby probe, after it (whose answer shows the path alive).
                if is_active || due {
                    if let Some(probe) = p.search.as_mut().and_then(|s| s.poll(now)) {
                        queue_size_probe(&mut e.pending, id, probe);
                    }
                }
            }
            let rekey_stale = e
                .rekey
                .as_ref()
                .is_some_and(|(_, t)| now >= *t + HANDSHAKE_TIMEOUT);
            if rekey_stale {
                e.rekey = None;
                e.control.record_event(
                    EventBody::RekeyDenied {
                        reason_code: ReasonCode::RekeyTimeout,
                    },
                    now,
                );
            }
            if e.rekey.is_none() && e.channel.needs_rekey(now) {
                push_pending(&mut e.pending, Pending::RekeyInit);
            }
            if let Some(epoch) = e.channel.drop_expired(now) {
                e.control
                    .record_event(EventBody::KeyExpired { key_epoch: epoch }, now);
            }
            if e.channel.expired(now) && !e.keys_expired_reported {
                e.keys_expired_reported = true;
                e.control.record_event(
                    EventBody::KeyExpired {
                        key_epoch: e.channel.epoch(),
                    },
                    now,
                );
            }
        }
        self.settle();
    }

    /// The next datagram to send (heartbeats, probes, reattach requests, rekeys), one at
    /// a time until `None`.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit<'_>> {
        let Phase::Established(e) = &mut self.phase else {
            return None;
        };
        while let Some(next) = e.pending.pop_front() {
            let sent = match next {
                Pending::Probe(id) => send_probe(e, id, now, &mut self.out),
                Pending::Reattach { candidate, attempt } => {
                    send_reattach(e, &self.clock, candidate, attempt, now, &mut self.out)
                }
                Pending::PathResponse { via, token } => e
                    .channel
                    .seal(&Control::PathResponse { token }, now, &mut self.out)
                    .ok()
                    .map(|_| via),
                Pending::SizeProbe { via, probe } => {
                    let limit = e.search(via).and_then(PathSearch::limit).unwrap_or(0);
                    let probe = SizeProbe::of_size(probe.seq, limit, probe.size);
                    e.channel
                        .seal(&Control::SizeProbe(probe), now, &mut self.out)
                        .ok()
                        .map(|_| via)
                }
                Pending::RekeyInit => send_rekey(
                    e,
                    &self.config.keypair,
                    &self.config.gateway,
                    now,
                    &mut self.out,
                ),
            };
            if let Some(via) = sent {
                return Some(Transmit {
                    via,
                    bytes: &self.out,
                });
            }
        }
        None
    }

    /// The next instant at which [`Client::handle_timeout`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Established(e) => {
                let probes = e.probing.iter().map(|p| p.next_at);
                // Only the active path's search keeps a timer of its own; the standbys'
                // run with their probes.
                let active = e.control.active().map(|t| t.id);
                let search = active
                    .and_then(|id| e.search(id))
                    .map(PathSearch::next_deadline);
                let rekey = e
                    .rekey
                    .as_ref()
                    .map_or(e.channel.rekey_deadline(), |(_, t)| *t + HANDSHAKE_TIMEOUT);
                let resend = e
                    .reattach
                    .as_ref()
                    .filter(|r| !r.challenged)
                    .map(|r| r.sent_at + REATTACH_RESEND);
                probes
                    .chain(search)
                    .chain(resend)
                    .chain(e.control.next_deadline())
                    .chain(std::iter::once(rekey))
                    .chain(e.channel.overlap_deadline())
                    .min()
            }
            Phase::Handshaking { started, .. } => Some(*started + HANDSHAKE_TIMEOUT),
            Phase::Idle { retry_at } => *retry_at,
            Phase::Ended(_) => None,
        }
    }

    /// Puts a reloaded `policy` in force, for the live session too (without dropping
    /// it: see [`SessionControl::apply_policy`]) and for every later one; whether a live
    /// session took it. Refused, changing nothing, when a configured transport would
    /// break it (a protocol it no longer allows, more candidates than it allows), or
    /// when its `reject_after` is shorter than the age of the keys in use (they would
    /// expire at once, and traffic stop until a rekey).
    pub fn apply_policy(&mut self, policy: Arc<Policy>, now: Instant) -> Result<bool, ClientError> {
        if let Some(t) = self
            .config
            .transports
            .iter()
            .find(|t| !policy.allows(t.protocol))
        {
            return Err(ClientError::PolicyDoesNotFit(format!(
                "does not allow {}, the protocol of candidate {}",
                t.protocol, t.id.0
            )));
        }
        if self.config.transports.len() > policy.max_candidate_count() {
            return Err(ClientError::PolicyDoesNotFit(format!(
                "allows {} candidates, and {} are configured",
                policy.max_candidate_count(),
                self.config.transports.len()
            )));
        }
        if let Phase::Established(e) = &self.phase {
            let age = now.saturating_duration_since(e.channel.keys_created());
            if policy.reject_after() <= age {
                return Err(ClientError::PolicyDoesNotFit(format!(
                    "rejects keys after {:?}, and the keys in use are {age:?} old",
                    policy.reject_after()
                )));
            }
        }
        self.limits = KeyLimits::from_policy(&policy);
        self.config.policy = Arc::clone(&policy);
        if let Phase::Established(e) = &mut self.phase {
            e.channel.set_limits(self.limits);
            e.control.apply_policy(policy, now);
            return Ok(true);
        }
        Ok(false)
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        match &mut self.phase {
            Phase::Established(e) => e.control.poll_event(),
            _ => self.ended_events.pop_front(),
        }
    }

    /// The gateway is under load and answered the initiation with a cookie: kept for the
    /// transport it came on, and the initiation is sent again at once, with the cookie
    /// (on that transport: the cookie proves its source address only).
    fn take_cookie(
        &mut self,
        via: TransportId,
        receiver_index: u32,
        nonce: [u8; COOKIE_NONCE_LEN],
        sealed: &SealedCookie,
        now: Instant,
    ) -> Handled {
        let Phase::Handshaking {
            sender_index, mac1, ..
        } = &self.phase
        else {
            return Handled::Drop(ClientDrop::Unexpected);
        };
        if receiver_index != *sender_index {
            return Handled::Drop(ClientDrop::NotOurs);
        }
        let Some(cookie) = self.cookie_key.open(sealed, mac1, nonce) else {
            return Handled::Drop(ClientDrop::Unauthenticated);
        };
        self.cookies.retain(|(t, _, _)| *t != via);
        self.cookies.push((via, cookie, now));
        self.retry_via = Some(via);
        self.phase = Phase::Idle {
            retry_at: Some(now),
        };
        Handled::Consumed
    }

    /// The transport the pending handshake went out on, while one is pending.
    pub fn handshake_via(&self) -> Option<TransportId> {
        match &self.phase {
            Phase::Handshaking { via, .. } => Some(via.id),
            _ => None,
        }
    }

    /// The transport the next initiation should go on, when the client knows better
    /// than taking the candidates in turn (a cookie just came on it).
    pub fn retry_via(&self) -> Option<TransportId> {
        self.retry_via
    }

    fn finish_handshake(&mut self, receiver_index: u32, noise: &[u8], now: Instant) -> Handled {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle { retry_at: None });
        let Phase::Handshaking {
            initiation,
            sender_index,
            mac1,
            via,
            started,
        } = phase
        else {
            self.phase = phase;
            return Handled::Drop(ClientDrop::Unexpected);
        };
        if receiver_index != sender_index {
            // Not the answer to ours: ignored, and the retry stays where it was.
            self.phase = Phase::Handshaking {
                initiation,
                sender_index,
                mac1,
                via,
                started,
            };
            return Handled::Drop(ClientDrop::NotOurs);
        }
        // The initiation is spent whatever the answer; a forged one leaves a retry due
        // when the genuine one would have been given up.
        let retry = Phase::Idle {
            retry_at: Some(started + HANDSHAKE_TIMEOUT),
        };
        let Ok((payload, keys)) = initiation.finish(noise) else {
            self.phase = retry;
            return Handled::Drop(ClientDrop::Unauthenticated);
        };
        // A cipher the client did not offer is a gateway that does not speak this
        // protocol: refused like any malformed answer.
        let Some(resp) = RespPayload::decode(&payload)
            .ok()
            .filter(|r| self.config.ciphers.contains(r.cipher))
        else {
            self.phase = retry;
            return Handled::Drop(ClientDrop::Malformed);
        };
        let policy = Arc::clone(&self.config.policy);
        let mut control = SessionControl::new(resp.session_id, Arc::clone(&policy), now);
        let mut probing = Vec::new();
        for t in &self.config.transports {
            if control.add_transport(*t, now).is_ok() {
                let searched = self.search_largest.filter(|_| t.protocol == Protocol::Udp);
                probing.push(Probing {
                    transport: *t,
                    next_at: now + policy.heartbeat_interval(),
                    seq: 0,
                    standby_fits: None,
                    search: searched.map(|largest| PathSearch::new(largest, now)),
                });
            }
        }
        let _ = control.attach(via.id, now);
        self.phase = Phase::Established(Box::new(Established {
            session_id: resp.session_id,
            tunnel: resp.tunnel,
            channel: Channel::new(resp.session_id, (resp.cipher, keys), self.limits, now),
            control,
            binding_version: resp.binding_version,
            probing,
            pending: VecDeque::new(),
            reattach: None,
            rekey: None,
            keys_expired_reported: false,
            searched_active: None,
        }));
        if let Phase::Established(e) = &mut self.phase {
            follow_active_path(e, now);
        }
        Handled::Consumed
    }

    /// Moves a terminated session to `Ended`, keeping its undrained events.
    fn settle(&mut self) {
        let Phase::Established(e) = &mut self.phase else {
            return;
        };
        if e.control.state() != State::Terminated {
            return;
        }
        let reason = e
            .control
            .terminated_by()
            .unwrap_or(ReasonCode::PeerTerminated);
        if let Phase::Established(mut e) = std::mem::replace(&mut self.phase, Phase::Ended(reason))
        {
            self.pending_events_from(&mut e);
        }
    }

    fn pending_events_from(&mut self, e: &mut Established) {
        while let Some(ev) = e.control.poll_event() {
            if self.ended_events.len() < 256 {
                self.ended_events.push_back(ev);
            }
        }
    }

    fn established(&self) -> Option<&Established> {
        match &self.phase {
            Phase::Established(e) => Some(e),
            _ => None,
        }
    }

    fn transport(&self, id: TransportId) -> Result<TransportRef, ClientError> {
        self.config
            .transports
            .iter()
            .find(|t| t.id == id)
            .copied()
            .ok_or(ClientError::UnknownTransport(id))
    }

    /// A handshake timestamp later than any sent before, from the wall clock.
    fn next_timestamp(&mut self, now: Instant) -> Timestamp {
        let ms = self.clock.ts_ms(now);
        let mut t = Timestamp {
            secs: ms / 1_000,
            nanos: u32::try_from((ms % 1_000) * 1_000_000).unwrap_or(0),
        };
        if t <= self.last_timestamp {
            t = Timestamp {
                secs: self.last_timestamp.secs,
                nanos: self.last_timestamp.nanos.saturating_add(1),
            };
        }
        self.last_timestamp = t;
        t
    }
}

enum Handled {
    Tunnel,
    Consumed,
    SessionUnknown,
    Drop(ClientDrop),
}

/// What the driver must do, with the plaintext opened in `packet`.
fn received(handled: Handled, packet: &[u8]) -> ClientReceived<'_> {
    match handled {
        Handled::Tunnel => ClientReceived::ToTunnel(plaintext(packet)),
        Handled::Consumed => ClientReceived::Consumed,
        Handled::SessionUnknown => ClientReceived::SessionUnknown,
        Handled::Drop(d) => ClientReceived::Dropped(d),
    }
}

fn handle_control(
    e: &mut Established,
    via: TransportId,
    control: Control<'_>,
    now: Instant,
) -> Handled {
    // An authenticated packet on a path searched: its probes are lost on a live path.
    if let Some(search) = e.search_mut(via) {
        search.heard();
    }
    let handled = match control {
        Control::Data(_) => Handled::Tunnel,
        Control::HeartbeatAck {
            seq,
            binding_version,
        } => {
            let _ = e.control.probe_acked(via, seq, now);
            e.binding_version = e.binding_version.max(binding_version);
            Handled::Consumed
        }
        Control::ProbeAck { seq } => {
            let _ = e.control.probe_acked(via, seq, now);
            Handled::Consumed
        }
        Control::ReattachAck {
            request_counter,
            binding_version,
        } => match e.reattach.take() {
            Some(r) if r.counters.contains(&request_counter) => {
                e.binding_version = binding_version;
                let _ = e.control.reattach_accepted(r.attempt, now);
                Handled::Consumed
            }
            other => {
                e.reattach = other;
                Handled::Drop(ClientDrop::Unexpected)
            }
        },
        Control::ReattachDeny {
            request_counter,
            reason,
            binding_version,
        } => match e.reattach.take() {
            Some(r) if r.counters.contains(&request_counter) => {
                e.binding_version = binding_version;
                let _ = e.control.reattach_denied(r.attempt, reason, now);
                Handled::Consumed
            }
            other => {
                e.reattach = other;
                Handled::Drop(ClientDrop::Unexpected)
            }
        },
        Control::Terminate { reason } => {
            let _ = e
                .control
                .terminate(TerminationCause::announced(reason), now);
            Handled::Consumed
        }
        Control::RekeyResp(noise) => match e.rekey.take() {
            Some((initiation, _)) => match initiation.finish(noise) {
                Ok((_, keys)) => {
                    let rotation = e.channel.rotate(keys, now);
                    record_rotation(e, rotation, now);
                    Handled::Consumed
                }
                Err(_) => {
                    e.control.record_event(
                        EventBody::RekeyDenied {
                            reason_code: ReasonCode::BadProof,
                        },
                        now,
                    );
                    Handled::Drop(ClientDrop::Unauthenticated)
                }
            },
            None => Handled::Drop(ClientDrop::Unexpected),
        },
        Control::PathChallenge { token } => {
            // While a reattach is in flight, the gateway challenges the path the request
            // arrived on; otherwise it challenges the active transport's new address
            // after a NAT rebinding (the client sees no change: the mapping is the
            // NAT's). Either way the answer leaves on the transport the challenge came
            // on, and only there can it come from the challenged address.
            let on_active = e.control.active().is_some_and(|t| t.id == via);
            if e.reattach.is_none() && !on_active {
                return Handled::Drop(ClientDrop::Unexpected);
            }
            e.pending
                .retain(|p| !matches!(p, Pending::PathResponse { .. }));
            e.pending.push_back(Pending::PathResponse { via, token });
            // On the reattach's own transport, the request arrived: it is not sent again
            // (a new one would replace the gateway's challenge, and a slow path could
            // never answer in time).
            let candidate = e.control.reattach_attempt().map(|(c, _)| c);
            if let Some(r) = e.reattach.as_mut().filter(|_| candidate == Some(via)) {
                r.challenged = true;
            }
            Handled::Consumed
        }
        Control::SizeProbeAck(ack) => {
            if let Some(search) = e.search_mut(via) {
                search.answered(ack.seq, ack.datagram_len(), now);
            }
            Handled::Consumed
        }
        Control::Heartbeat { .. }
        | Control::Probe { .. }
        | Control::SizeProbe(_)
        | Control::StandbyProbeAck { .. }
        | Control::ReattachRequest(_)
        | Control::PathResponse { .. }
        | Control::RekeyInit(_) => Handled::Drop(ClientDrop::Unexpected),
    };
    collect_actions(e);
    // Only control packets move the active transport; data, the bulk of the packets,
    // never does.
    if !matches!(handled, Handled::Tunnel) {
        follow_active_path(e, now);
    }
    handled
}

fn record_rotation(e: &mut Established, r: Rotation, now: Instant) {
    if let Some(epoch) = r.displaced {
        e.control
            .record_event(EventBody::KeyExpired { key_epoch: epoch }, now);
    }
    e.keys_expired_reported = false;
    e.control
        .record_event(EventBody::KeyRotated { key_epoch: r.epoch }, now);
}

/// Moves the control plane's actions into the send queue, and keeps the heartbeat
/// schedule right: a transport that just became active (a jump) is heartbeated within
/// one heartbeat interval, not on its old, slower standby schedule — which could leave
/// it silent long enough to time out.
fn collect_actions(e: &mut Established) {
    let now = e.control.now();
    if let Some(active) = e.control.active() {
        let interval = e.control.policy().heartbeat_interval();
        for p in &mut e.probing {
            if p.transport.id == active.id {
                p.next_at = p.next_at.min(now + interval);
            }
        }
    }
    while let Some(Action::Reattach {
        candidate, attempt, ..
    }) = e.control.poll_action()
    {
        // Only the newest attempt is ever worth sending.
        e.pending.retain(|p| !matches!(p, Pending::Reattach { .. }));
        e.pending
            .push_back(Pending::Reattach { candidate, attempt });
    }
}

/// Tells the search of a transport that became the active one (at the session's start,
/// or a jump) that it is: its limit is told to the gateway at once, or it searches
/// again ([`PathSearch::activated`]). QUIC (it searches its own path) and TCP (a stream
/// carries any packet) have no search.
fn follow_active_path(e: &mut Established, now: Instant) {
    let active = e.control.active().map(|t| t.id);
    if active == e.searched_active {
        return;
    }
    e.searched_active = active;
    if let Some(search) = active.and_then(|id| e.search_mut(id)) {
        search.activated(now);
    }
}

/// Queues a size probe of `via`'s search, replacing one queued for it: only the newest
/// is worth sending.
fn queue_size_probe(queue: &mut VecDeque<Pending>, via: TransportId, probe: pmtu::SizeProbe) {
    queue.retain(|p| !matches!(p, Pending::SizeProbe { via: v, .. } if *v == via));
    queue.push_back(Pending::SizeProbe { via, probe });
}

/// Queues `p` unless an equal item is queued already. With one probe and one size probe
/// per transport (newer size probes replace older), one reattach (likewise), one path
/// response (likewise) and one rekey, the queue never holds more than twice the number
/// of transports plus three.
fn push_pending(queue: &mut VecDeque<Pending>, p: Pending) {
    if !queue.contains(&p) {
        queue.push_back(p);
    }
}

fn send_probe(
    e: &mut Established,
    id: TransportId,
    now: Instant,
    out: &mut Vec<u8>,
) -> Option<TransportId> {
    let active = e.control.active().map(|t| t.id);
    let probing = e.probing.iter_mut().find(|p| p.transport.id == id)?;
    probing.seq += 1;
    let seq = probing.seq;
    let control = if Some(id) == active {
        Control::Heartbeat { seq }
    } else {
        Control::Probe { seq }
    };
    let counter = e.channel.seal(&control, now, out).ok()?;
    probing.standby_fits = (Some(id) != active).then_some((seq, counter));
    let _ = e.control.probe_sent(id, seq, now);
    collect_actions(e);
    Some(id)
}

fn send_reattach(
    e: &mut Established,
    clock: &WallClock,
    candidate: TransportId,
    attempt: StateVersion,
    now: Instant,
    out: &mut Vec<u8>,
) -> Option<TransportId> {
    // An attempt that is no longer the one in flight (it failed or was replaced while
    // queued) is not sent: its answer could not be applied.
    if e.control.reattach_attempt() != Some((candidate, attempt)) {
        return None;
    }
    let transport = e
        .probing
        .iter()
        .find(|p| p.transport.id == candidate)?
        .transport;
    let cause = e
        .control
        .instability()
        .map_or(ReasonCode::PolicyForcedRecovery, |i| i.reason());
    let request = ReattachRequest {
        timestamp_ms: clock.ts_ms(now),
        expected_version: e.binding_version,
        transport_id: candidate,
        protocol: transport.protocol,
        cause,
    };
    let counter = e
        .channel
        .seal(&Control::ReattachRequest(request), now, out)
        .ok()?;
    match e.reattach.as_mut().filter(|r| r.attempt == attempt) {
        Some(r) => {
            if r.counters.len() >= REATTACH_COPIES {
                r.counters.remove(0);
            }
            r.counters.push(counter);
            r.sent_at = now;
        }
        None => {
            e.reattach = Some(Reattaching {
                counters: vec![counter],
                attempt,
                sent_at: now,
                challenged: false,
            })
        }
    }
    Some(candidate)
}

fn send_rekey(
    e: &mut Established,
    keypair: &Keypair,
    gateway: &PublicKey,
    now: Instant,
    out: &mut Vec<u8>,
) -> Option<TransportId> {
    let via = e.control.active()?.id;
    let prologue = rekey_prologue(e.session_id);
    let (initiation, msg1) = Initiation::start(keypair, gateway, &prologue, &[]).ok()?;
    e.channel.seal(&Control::RekeyInit(&msg1), now, out).ok()?;
    e.rekey = Some((initiation, now));
    Some(via)
}
