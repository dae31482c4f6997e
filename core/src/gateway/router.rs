//! The gateway's one router: session id → session, tunnel address → session, the
//! rules for registering and releasing a session, and the answer to a packet of a
//! session that is not live.
//!
//! It is generic over what a route leads to (`H`): the composite [`super::Gateway`]
//! keeps each [`super::GatewaySession`] in it directly; the actor runtime keeps the
//! session's actor address and shares one router between its packet readers. Either
//! way the rules below are the only ones: what the deterministic tests and the fuzzer
//! drive is what ships.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::crypto::PublicKey;
use crate::event::SessionEvent;
use crate::fsm::TerminationCause;
use crate::ids::SessionId;
use crate::wire::{encode_session_unknown, SessionHeader, SESSION_UNKNOWN_LEN};

use super::{destination_address, Drop, EndedSessions, Endpoint};

/// How a session comes to be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Created by a handshake: it takes its tunnel address, also from a session of the
    /// same client that it replaces.
    New,
    /// Restarted after its actor stopped unexpectedly: it takes its tunnel address back
    /// only if no other session holds it, so that it never takes the address from a
    /// newer session of its client.
    Restarted,
}

/// One live session's route.
#[derive(Debug)]
pub struct Route<H> {
    /// What the route leads to.
    pub handle: H,
    /// The session's tunnel address.
    pub tunnel: IpAddr,
    /// The session's client.
    pub client: PublicKey,
}

/// The answer to a session packet whose session is not live.
#[derive(Debug)]
pub struct Unknown {
    /// Why the packet is dropped.
    pub drop: Drop,
    /// A denial to report, when the packet is a reattach for a session that ended here
    /// (rate limited).
    pub event: Option<SessionEvent>,
    /// The clear-text hint to send back to the sender.
    pub reply: [u8; SESSION_UNKNOWN_LEN],
}

/// The routing tables of one gateway node.
#[derive(Debug)]
pub struct Router<H> {
    sessions: HashMap<SessionId, Route<H>>,
    by_tunnel: HashMap<IpAddr, SessionId>,
    ended: EndedSessions,
}

impl<H> Default for Router<H> {
    fn default() -> Self {
        Router {
            sessions: HashMap::new(),
            by_tunnel: HashMap::new(),
            ended: EndedSessions::default(),
        }
    }
}

impl<H> Router<H> {
    /// Registers session `id` (see [`Registration`] for who gets the tunnel address).
    pub fn register(
        &mut self,
        id: SessionId,
        tunnel: IpAddr,
        client: PublicKey,
        handle: H,
        how: Registration,
    ) {
        let held_by_other = self
            .by_tunnel
            .get(&tunnel)
            .is_some_and(|owner| *owner != id);
        if how == Registration::New || !held_by_other {
            self.by_tunnel.insert(tunnel, id);
        }
        self.sessions.insert(
            id,
            Route {
                handle,
                tunnel,
                client,
            },
        );
    }

    /// Removes session `id`'s route, remembering why it ended (so that a late reattach
    /// is refused for that reason); its tunnel address is freed unless a newer session
    /// of the same client holds it already. Returns the route.
    pub fn unregister(
        &mut self,
        id: SessionId,
        cause: Option<TerminationCause>,
    ) -> Option<Route<H>> {
        let route = self.sessions.remove(&id)?;
        if self.by_tunnel.get(&route.tunnel) == Some(&id) {
            self.by_tunnel.remove(&route.tunnel);
        }
        self.ended.remember(id, cause);
        Some(route)
    }

    /// The route of session `id`.
    pub fn get(&self, id: SessionId) -> Option<&H> {
        self.sessions.get(&id).map(|r| &r.handle)
    }

    /// The route of session `id`, to drive it.
    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut H> {
        self.sessions.get_mut(&id).map(|r| &mut r.handle)
    }

    /// Whether session `id` is live.
    pub fn contains(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// The session owning tunnel address `addr`.
    pub fn by_tunnel(&self, addr: IpAddr) -> Option<(SessionId, &H)> {
        let id = *self.by_tunnel.get(&addr)?;
        self.sessions.get(&id).map(|r| (id, &r.handle))
    }

    /// The session an IP packet read from the tunnel device goes to: the owner of its
    /// destination address.
    pub fn route_tunnel_packet(&self, packet: &[u8]) -> Result<(SessionId, &H), Drop> {
        let dst = destination_address(packet).ok_or(Drop::Malformed)?;
        self.by_tunnel(dst).ok_or(Drop::NoRoute)
    }

    /// Every live session's id and route.
    pub fn iter(&self) -> impl Iterator<Item = (SessionId, &H)> {
        self.sessions.iter().map(|(id, r)| (*id, &r.handle))
    }

    /// Every live session's id and route, to drive them.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (SessionId, &mut H)> {
        self.sessions.iter_mut().map(|(id, r)| (*id, &mut r.handle))
    }

    /// Every live session's id.
    pub fn ids(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Judges a session packet whose session is not live: it is dropped (counted by the
    /// caller), a reattach for a session that ended here is reported as denied for the
    /// reason it ended, and the sender is told the session is unknown.
    pub fn unknown(&mut self, header: &SessionHeader, from: Endpoint, now: Instant) -> Unknown {
        let (drop, event) = self.ended.judge(header, from, now);
        Unknown {
            drop,
            event,
            reply: encode_session_unknown(header.session_id),
        }
    }
}
