//! The gateway's side of the protocol, sans-IO.
//!
//! Three parts a runtime can drive separately: the [`Responder`] answers handshakes,
//! creates sessions and releases ended ones; each [`GatewaySession`] holds one session
//! (keys, state machine, binding, timers, reattach checks); the [`Router`] routes a
//! datagram to its session by the header's session id and a packet from the tunnel
//! device to the session owning its destination address, and answers packets of
//! sessions that are not live. [`Gateway`] composes them in one value for
//! single-threaded drivers, tests, benchmarks and fuzzing; the actor runtime drives the
//! same three with one actor per session.

mod ended;
mod gate;
mod responder;
mod router;
mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::cluster::{ClusterError, ClusterKey, ClusterRecord, SessionSecrets};
use crate::crypto::PublicKey;
use crate::crypto::{CipherSet, Keypair};
use crate::event::{SessionEvent, WallClock};
use crate::fsm::{State, TerminationCause};
use crate::ids::{NodeId, Protocol, SessionId};
use crate::policy::Policy;
use crate::reason::ReasonCode;
use crate::store::SessionStore;
use crate::wire::{self, Datagram, TunnelAddrs};

pub use ended::{EndedSessions, ENDED_SESSIONS_KEPT};
pub use gate::{HandshakeGate, Verdict, COOKIE_ROTATION, UNDER_LOAD_FOR};
pub use responder::{Accepted, Responder};
pub use router::{
    HandshakeLimits, HintLimits, OffBindingLimits, Registration, Route, Router, Unknown,
};
pub use session::GatewaySession;
use session::Outcome;

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
    /// The tunnel addresses it is given (one of each family at most).
    pub tunnel: TunnelAddrs,
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
    /// A tunnelled packet whose source is none of the session's tunnel addresses.
    SpoofedSource,
    /// A packet from the tunnel device for an address no session owns.
    NoRoute,
    /// The session's keys are expired.
    KeysExpired,
    /// The counters this node reserved for the session are used up (spec/cluster.md).
    Unreserved,
    /// A packet type that makes no sense at the gateway (e.g. an ack).
    Unexpected,
    /// A path response from another endpoint than the one challenged.
    PathMismatch,
    /// The session ended (its timers fired as the packet arrived, or it ended just
    /// before).
    SessionEnded,
    /// From another endpoint than the session's binding, past the session's budget for
    /// those ([`OffBindingLimits`]): dropped unread.
    OffBindingFlood,
    /// A handshake initiation whose MAC is wrong ([`crate::mac`]): refused before any
    /// Diffie-Hellman.
    HandshakeMac,
    /// A handshake initiation past its source's budget ([`HandshakeLimits`]): refused
    /// before any Diffie-Hellman.
    HandshakeRate,
    /// A handshake initiation without a valid cookie while the gateway is under load:
    /// answered with a cookie reply instead of a Diffie-Hellman ([`HandshakeGate`]).
    HandshakeCookie,
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
            Drop::Unreserved => "counters_unreserved",
            Drop::Unexpected => "unexpected",
            Drop::PathMismatch => "path_mismatch",
            Drop::SessionEnded => "session_ended",
            Drop::OffBindingFlood => "off_binding_flood",
            Drop::HandshakeMac => "handshake_mac",
            Drop::HandshakeRate => "handshake_rate",
            Drop::HandshakeCookie => "handshake_cookie",
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
    /// The ciphers this gateway runs fast ([`CipherSet::this_machine`] in the binary):
    /// each session gets the fastest of them that its client offers.
    pub ciphers: CipherSet,
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

/// Opens a client's reattach request `datagram` for the session of `record`, a session
/// another node owned (spec/cluster.md "Taking a session over"): its keys must open
/// under the cluster `key` and the request under them, and the request must be fresh
/// (its timestamp within `max_age` of `now_ms`, wall clock), name the record's binding
/// version, and carry a counter above every one the owner accepted — so that nothing is
/// built, asked or written for a captured, replayed, forged or misdirected one. Returns
/// its header, the client's key and the session's keys.
pub fn open_takeover_request(
    record: &ClusterRecord,
    key: &ClusterKey,
    datagram: &[u8],
    (now_ms, max_age): (u64, std::time::Duration),
) -> Result<(wire::SessionHeader, PublicKey, SessionSecrets), ClusterError> {
    let id = record.session_id;
    let header = match wire::parse(datagram) {
        Ok(Datagram::Session { header, .. })
            if header.session_id == id && header.ptype == wire::PacketType::ReattachRequest =>
        {
            header
        }
        _ => return Err(ClusterError::Refused("not a reattach request of it".into())),
    };
    let client: PublicKey = record
        .client
        .parse()
        .map_err(|_| ClusterError::Malformed("its client key".into()))?;
    let sealed = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&record.sealed_keys)
            .map_err(|_| ClusterError::Unsealing)?
    };
    let secrets = SessionSecrets::open(key, id, &sealed)?;
    let mut opened = datagram.to_vec();
    if header.key_epoch != secrets.epoch as u8
        || !crate::crypto::opens((secrets.cipher, &secrets.recv), &header, &mut opened)
    {
        return Err(ClusterError::Refused(
            "the request does not open under its keys".into(),
        ));
    }
    // Already accepted by the owner before it last wrote the record: a replay.
    if record.recv_highest.is_some_and(|h| header.counter <= h) {
        return Err(ClusterError::Refused(format!(
            "the request's counter {} was accepted before (a replay)",
            header.counter
        )));
    }
    let Ok(wire::Control::ReattachRequest(request)) =
        wire::Control::decode(header.ptype, crate::crypto::plaintext(&opened))
    else {
        return Err(ClusterError::Refused("not a reattach request".into()));
    };
    let max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    if now_ms.abs_diff(request.timestamp_ms) > max_age_ms {
        return Err(ClusterError::Refused(
            "the request is not fresh (a replay or a wrong clock)".into(),
        ));
    }
    if request.expected_version.0 != record.bound_at {
        return Err(ClusterError::Refused(format!(
            "the request names binding version {}, the record {}",
            request.expected_version.0, record.bound_at
        )));
    }
    Ok((header, client, secrets))
}

/// Events of removed sessions kept until drained; past it they are counted, not kept.
const GATEWAY_EVENTS_KEPT: usize = 4_096;

/// The gateway: handshakes, routing, and every session of this node.
pub struct Gateway {
    responder: Responder,
    gate: HandshakeGate,
    backlog: bool,
    clock: WallClock,
    router: Router<GatewaySession>,
    drops: HashMap<Drop, u64>,
    /// Events of sessions already removed (at most GATEWAY_EVENTS_KEPT until drained).
    events: Vec<(SessionId, SessionEvent)>,
    events_overflowed: u64,
    inbuf: Vec<u8>,
    out: Vec<u8>,
}

impl Gateway {
    /// A gateway with `config`, writing session records to `store`, and reading wall
    /// time (for freshness checks and event stamps) through `clock`.
    pub fn new(config: GatewayConfig, store: Arc<dyn SessionStore>, clock: WallClock) -> Self {
        Gateway {
            gate: HandshakeGate::new(&config.keypair.public()),
            backlog: false,
            responder: Responder::new(config, store),
            clock,
            router: Router::default(),
            drops: HashMap::new(),
            events: Vec::new(),
            events_overflowed: 0,
            inbuf: Vec::new(),
            out: Vec::new(),
        }
    }

    /// Says whether handshake work is backing up: while it is, and for
    /// [`UNDER_LOAD_FOR`] after, only initiations with a valid cookie get a
    /// Diffie-Hellman ([`HandshakeGate`]). The single-threaded driver decides by its own
    /// measure; the actor runtime by its handshake queue.
    pub fn set_backlog(&mut self, backlog: bool) {
        self.backlog = backlog;
    }

    /// The gateway's public key.
    pub fn public_key(&self) -> PublicKey {
        self.responder.public_key()
    }

    /// A session, if it exists.
    pub fn session(&self, id: SessionId) -> Option<&GatewaySession> {
        self.router.get(id)
    }

    /// Every live session's id.
    pub fn session_ids(&self) -> Vec<SessionId> {
        self.router.ids()
    }

    /// Drops counted so far, by reason.
    pub fn drops(&self) -> &HashMap<Drop, u64> {
        &self.drops
    }

    /// Takes over the session of `record` from the node that owned it
    /// (spec/cluster.md), on its client's reattach request `datagram` from `from`: the
    /// request must open under the record's keys (sealed under `key`) and pass every
    /// check of a reattach (spec/wire-format.md); the session then goes on here from the
    /// record's state and version, sending above the previous owner's reservation up
    /// to `send_limit` — this node's reservation, which the driver won in the cluster's
    /// table before calling this — and the answer to send back (the path challenge) is
    /// returned. Refused, changing nothing, when the session is here already or is
    /// ended, its client is not authorized here or has another live session here, the
    /// request does not open or is refused.
    pub fn adopt(
        &mut self,
        record: &ClusterRecord,
        key: &ClusterKey,
        from: Endpoint,
        datagram: &[u8],
        send_limit: u64,
        now: Instant,
    ) -> Result<&[u8], ClusterError> {
        let id = record.session_id;
        let freshness = (
            self.clock.ts_ms(now),
            self.responder.policy().reattach_proof_max_age(),
        );
        let (header, client, secrets) = open_takeover_request(record, key, datagram, freshness)?;
        if self.router.get(id).is_some() {
            return Err(ClusterError::Refused("it is here already".into()));
        }
        let router = &self.router;
        let session = self.responder.adopt(
            |s| router.get(s).is_some(),
            record,
            (client, &secrets),
            (header.counter, send_limit),
            &self.clock,
            now,
        )?;
        let tunnel = session.tunnel();
        self.router
            .register(id, tunnel, client, session, Registration::New);
        let (refused, answer) = match self.handle_datagram(from, datagram, now) {
            Received::Reply(b) => (None, b.to_vec()),
            Received::Dropped(d) => (Some(d.as_str()), Vec::new()),
            Received::ToTunnel(_) | Received::Consumed => (Some("not answered"), Vec::new()),
        };
        if let Some(why) = refused {
            // Judged and refused (its events say why): as if it had never come here.
            self.responder.hand_over(&mut self.router, id);
            return Err(ClusterError::Refused(format!(
                "the reattach was refused ({why})"
            )));
        }
        self.out = answer;
        Ok(&self.out)
    }

    /// Session `id` as the cluster's table holds it.
    pub fn export(
        &self,
        id: SessionId,
        key: &ClusterKey,
    ) -> Option<Result<ClusterRecord, ClusterError>> {
        Some(self.router.get(id)?.export(&self.clock, key))
    }

    /// Session `id` may send only with counters below `limit` (this node's reservation).
    pub fn reserve_until(&mut self, id: SessionId, limit: u64) {
        if let Some(session) = self.router.get_mut(id) {
            session.reserve_until(limit);
        }
    }

    /// Lets go of session `id`, which another node took over: it is forgotten here
    /// without an end (spec/cluster.md). Whether it was here.
    pub fn hand_over(&mut self, id: SessionId) -> bool {
        self.responder.hand_over(&mut self.router, id).is_some()
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
                macs,
            } => {
                // The cheap checks first: no Diffie-Hellman for an initiation not made
                // for this gateway, from an unproven source under load, nor past its
                // source's budget.
                match self
                    .gate
                    .judge(from.addr, sender_index, &macs, self.backlog, now)
                {
                    Verdict::Admit => self.accept(
                        from,
                        sender_index,
                        noise,
                        (macs.mac1_covered, macs.mac1),
                        now,
                    ),
                    Verdict::Cookie(reply) => {
                        *self.drops.entry(Drop::HandshakeCookie).or_default() += 1;
                        self.out.clear();
                        self.out.extend_from_slice(&reply);
                        Received::Reply(&self.out)
                    }
                    Verdict::Refuse(d) => self.dropped(d),
                }
            }
            Datagram::Session { header, .. } => {
                let id = header.session_id;
                if self.router.from_binding(id, from) == Some(false)
                    && !self.router.admit_off_binding(id, now)
                {
                    return self.dropped(Drop::OffBindingFlood);
                }
                let Some(session) = self.router.get_mut(id) else {
                    let unknown = self.router.unknown(&header, from, now);
                    if let Some(event) = unknown.event {
                        self.push_event(header.session_id, event);
                    }
                    *self.drops.entry(unknown.drop).or_default() += 1;
                    let Some(reply) = unknown.reply else {
                        return Received::Dropped(unknown.drop);
                    };
                    self.out.clear();
                    self.out.extend_from_slice(&reply);
                    return Received::Reply(&self.out);
                };
                // Opened in place, in the gateway's own copy of the datagram.
                self.inbuf.clear();
                self.inbuf.extend_from_slice(datagram);
                let outcome = session.process_packet(
                    self.responder.store().as_ref(),
                    self.responder.keypair(),
                    &self.clock,
                    from,
                    &header,
                    &mut self.inbuf,
                    now,
                );
                if let Outcome::Drop(d) = outcome {
                    *self.drops.entry(d).or_default() += 1;
                }
                let binding = session.binding();
                self.router.set_binding(id, binding);
                // The packet may have ended the session; its last bytes (a sealed
                // answer) then come from the removed session.
                match self.after_session_input(id) {
                    None => match self.router.get(id) {
                        Some(session) => session.received(outcome, &self.inbuf),
                        None => Received::Consumed,
                    },
                    Some(ended) => {
                        self.out.clear();
                        match ended.received(outcome, &self.inbuf) {
                            Received::Reply(b) => {
                                self.out.extend_from_slice(b);
                                Received::Reply(&self.out)
                            }
                            Received::ToTunnel(b) => {
                                self.out.extend_from_slice(b);
                                Received::ToTunnel(&self.out)
                            }
                            Received::Consumed => Received::Consumed,
                            Received::Dropped(d) => Received::Dropped(d),
                        }
                    }
                }
            }
            Datagram::HandshakeResp { .. }
            | Datagram::SessionUnknown { .. }
            | Datagram::CookieReply { .. } => self.dropped(Drop::Unexpected),
        }
    }

    /// Answers an initiation that passed the cheap checks.
    fn accept(
        &mut self,
        from: Endpoint,
        sender_index: u32,
        noise: &[u8],
        mac: (&[u8], &[u8; wire::MAC_LEN]),
        now: Instant,
    ) -> Received<'_> {
        match self.responder.accept(from, sender_index, noise, mac, now) {
            Ok((accepted, reply)) => {
                self.out.clear();
                self.out.extend_from_slice(reply);
                let session = accepted.session;
                // One session per client: the new one replaces the old explicitly.
                if let Some(old) = accepted.replaces {
                    if let Some(s) = self.router.get_mut(old) {
                        s.terminate(self.responder.store().as_ref(), TerminationCause::Peer, now);
                    }
                    self.after_session_input(old);
                }
                let (id, tunnel, client) = (session.id(), session.tunnel(), session.client());
                let binding = session.binding();
                self.router
                    .register(id, tunnel, client, session, Registration::New);
                self.router.set_binding(id, binding);
                Received::Reply(&self.out)
            }
            Err(reason) => self.dropped(Drop::Handshake(reason)),
        }
    }

    /// Seals an IP packet read from the tunnel device for the session owning its
    /// destination; returns where to send the result.
    pub fn handle_tunnel_packet(
        &mut self,
        packet: &[u8],
        now: Instant,
    ) -> Result<(Endpoint, &[u8]), Drop> {
        let id = match self.router.route_tunnel_packet(packet) {
            Ok((id, _)) => id,
            Err(d) => {
                *self.drops.entry(d).or_default() += 1;
                return Err(d);
            }
        };
        let sealed = match self.router.get_mut(id) {
            Some(session) => session
                .seal_data(self.responder.store().as_ref(), packet, now)
                .map(|(e, _)| e),
            None => Err(Drop::NoRoute),
        };
        match sealed {
            Ok(endpoint) => match self.router.get(id) {
                Some(session) => Ok((endpoint, &session.out)),
                None => Err(Drop::NoRoute),
            },
            Err(d) => {
                *self.drops.entry(d).or_default() += 1;
                self.after_session_input(id);
                Err(d)
            }
        }
    }

    /// Ends a session on an operator's command: the client is told (the returned
    /// datagram), the session terminates with operator_terminated and is removed.
    pub fn terminate(&mut self, id: SessionId, now: Instant) -> Option<(Endpoint, Vec<u8>)> {
        let session = self.router.get_mut(id)?;
        let notice = session
            .seal_terminate(ReasonCode::OperatorTerminated, now)
            .map(|(e, b)| (e, b.to_vec()));
        session.terminate(
            self.responder.store().as_ref(),
            TerminationCause::Operator,
            now,
        );
        self.after_session_input(id);
        notice
    }

    /// Fires every session's due timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<SessionId> = self
            .router
            .iter()
            .filter(|(_, s)| s.next_deadline().is_some_and(|d| d <= now))
            .map(|(id, _)| id)
            .collect();
        for id in due {
            if let Some(s) = self.router.get_mut(id) {
                s.handle_timeout(self.responder.store().as_ref(), now);
            }
            self.after_session_input(id);
        }
    }

    /// The earliest deadline of any session.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.router
            .iter()
            .filter_map(|(_, s)| s.next_deadline())
            .min()
    }

    /// Every event since the last drain, with its session, oldest first per session.
    pub fn drain_events(&mut self) -> Vec<(SessionId, SessionEvent)> {
        let mut all = std::mem::take(&mut self.events);
        for (id, s) in self.router.iter_mut() {
            while let Some(e) = s.poll_event() {
                all.push((id, e));
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

    /// After any input to a session: release it (keeping its events) once it has
    /// terminated; returns it if released.
    fn after_session_input(&mut self, id: SessionId) -> Option<GatewaySession> {
        let session = self.router.get(id)?;
        if session.state() != State::Terminated {
            return None;
        }
        let cause = session.ended_by();
        let mut session = self.responder.release(&mut self.router, id, cause)?.handle;
        while let Some(e) = session.poll_event() {
            self.push_event(id, e);
        }
        Some(session)
    }
}
