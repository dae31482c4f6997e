//! The handshake responder: authorizes clients by static key and creates sessions.
//!
//! It owns the client table (who may connect, with which tunnel address, the newest
//! handshake timestamp seen from each, and each client's live session), and nothing of
//! any session once created: a created [`GatewaySession`] is handed to the caller, who
//! drives it on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::crypto::{
    Channel, CipherSet, KeyLimits, Keypair, PublicKey, Response, HANDSHAKE_PROLOGUE,
};
use crate::event::TransportRef;
use crate::fsm::State;
use crate::ids::{NodeId, SessionId, StateVersion};
use crate::mac::MacKey;
use crate::policy::Policy;
use crate::reason::ReasonCode;
use crate::store::{SessionRecord, SessionStore, StoreError};
use crate::wire::{
    encode_handshake, InitPayload, PacketType, RespPayload, Timestamp, TunnelAddrs, MAC_LEN,
};

use super::router::{Route, Router};
use super::session::GatewaySession;
use super::{Endpoint, GatewayConfig};
use crate::cluster::{ClusterError, ClusterRecord, SessionSecrets};
use crate::event::WallClock;
use crate::fsm::TerminationCause;

struct ClientEntry {
    tunnel: TunnelAddrs,
    last_timestamp: Option<Timestamp>,
    session: Option<SessionId>,
}

/// A session created by a handshake.
#[derive(Debug)]
pub struct Accepted {
    /// The new session, ATTACHED to the transport the handshake came on, its record in
    /// the table.
    pub session: GatewaySession,
    /// The client's previous session, which the caller must end (peer_terminated): one
    /// session per client.
    pub replaces: Option<SessionId>,
}

/// Answers handshakes.
pub struct Responder {
    keypair: Keypair,
    node: NodeId,
    policy: Arc<Policy>,
    limits: KeyLimits,
    store: Arc<dyn SessionStore>,
    clients: HashMap<PublicKey, ClientEntry>,
    mac_key: MacKey,
    ciphers: CipherSet,
    out: Vec<u8>,
}

impl Responder {
    /// A responder for `config`'s clients, creating session records in `store`.
    pub fn new(config: GatewayConfig, store: Arc<dyn SessionStore>) -> Self {
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
        Responder {
            mac_key: MacKey::for_gateway(&config.keypair.public()),
            limits: KeyLimits::from_policy(&config.policy),
            keypair: config
                .keypair
                .with_peers(config.clients.iter().map(|c| c.public)),
            node: config.node_id,
            policy: config.policy,
            ciphers: config.ciphers,
            store,
            clients,
            out: Vec::new(),
        }
    }

    /// The gateway's public key.
    pub fn public_key(&self) -> PublicKey {
        self.keypair.public()
    }

    /// The policy sessions run under.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The gateway's key pair (sessions answer rekeys with it).
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    /// The key of the initiations' MAC (the gate before any Diffie-Hellman).
    pub fn mac_key(&self) -> &MacKey {
        &self.mac_key
    }

    /// The table sessions are written to.
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// Answers a handshake initiation from `from` (`covered` and `mac`: its MAC and what
    /// it covers, checked first, before any Diffie-Hellman): on success, the new session
    /// and the handshake response to send back. A refused handshake changes nothing (no
    /// record, no session, the client's previous session untouched) and says why.
    pub fn accept(
        &mut self,
        from: Endpoint,
        sender_index: u32,
        noise: &[u8],
        (covered, mac): (&[u8], &[u8; MAC_LEN]),
        now: Instant,
    ) -> Result<(Accepted, &[u8]), ReasonCode> {
        if !self.mac_key.verify(covered, mac) {
            return Err(ReasonCode::BadProof);
        }
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
        let session_id = self.fresh_session_id().ok_or(ReasonCode::AtomicityFailed)?;
        let resp = RespPayload {
            session_id,
            // The version AttachOk produces: the first binding's.
            binding_version: StateVersion(1),
            tunnel,
            cipher: self.ciphers.choose(payload.ciphers),
        };
        // Everything that can fail on this handshake's own account comes first, so that
        // a refused handshake leaves the table untouched.
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
            StoreError::Full { .. } => ReasonCode::CapacityExceeded,
            _ => ReasonCode::AtomicityFailed,
        })?;
        let transport = TransportRef {
            id: payload.transport_id,
            protocol: payload.protocol,
        };
        let mut session = GatewaySession::new(
            session_id,
            client,
            tunnel,
            Arc::clone(&self.policy),
            self.node.clone(),
            Channel::new(session_id, (resp.cipher, keys), self.limits, now),
            now,
        );
        if !session.attach(self.store.as_ref(), from, transport, now) {
            let _ = self.store.remove(session_id, StateVersion(0));
            return Err(ReasonCode::AtomicityFailed);
        }
        if let Some(entry) = self.clients.get_mut(&client) {
            entry.last_timestamp = Some(payload.timestamp);
            entry.session = Some(session_id);
        }
        encode_handshake(
            PacketType::HandshakeResp,
            sender_index,
            &msg2,
            &mut self.out,
        );
        let accepted = Accepted {
            session,
            replaces: previous,
        };
        Ok((accepted, &self.out))
    }

    /// Whether a session of `client` may be taken over here: it is authorized, and has
    /// no session that is `live` here.
    pub fn may_adopt(
        &self,
        client: &PublicKey,
        live: impl Fn(SessionId) -> bool,
    ) -> Result<(), ClusterError> {
        let entry = self.clients.get(client).ok_or_else(|| {
            ClusterError::Refused("its client is not authorized on this node".into())
        })?;
        if entry.session.is_some_and(live) {
            return Err(ClusterError::Refused(
                "its client has another live session on this node".into(),
            ));
        }
        Ok(())
    }

    /// The session of `record`, which another node owned, taken over by this one
    /// (spec/cluster.md): built from the record and its opened `secrets`
    /// ([`GatewaySession::adopt`]: sending from the record's reservation up to
    /// `send_limit`, accepting only counters above the reattach's less one), written to
    /// this node's table and made its client's live session, then handed back for the
    /// driver to route. Refused, changing nothing, when the client is not authorized
    /// here or has a session that is `live` here, or the table refuses the record.
    pub fn adopt(
        &mut self,
        live: impl Fn(SessionId) -> bool,
        record: &ClusterRecord,
        (client, secrets): (PublicKey, &SessionSecrets),
        (reattach_counter, send_limit): (u64, u64),
        clock: &WallClock,
        now: Instant,
    ) -> Result<GatewaySession, ClusterError> {
        self.may_adopt(&client, live)?;
        let Some(entry) = self.clients.get(&client) else {
            return Err(ClusterError::Refused(
                "its client is not authorized on this node".into(),
            ));
        };
        let session = GatewaySession::adopt(
            record,
            secrets,
            (client, entry.tunnel),
            Arc::clone(&self.policy),
            self.node.clone(),
            self.limits,
            clock,
            (reattach_counter, send_limit),
            now,
        )?;
        self.store
            .create(session.table_record())
            .map_err(|e| ClusterError::Refused(format!("this node's table refused it: {e}")))?;
        if let Some(entry) = self.clients.get_mut(&client) {
            entry.session = Some(session.id());
        }
        Ok(session)
    }

    /// A handshake's session that was never started (the cluster's table refused its
    /// record): its client's slot is freed and its local record removed.
    pub fn abandon(&mut self, client: &PublicKey, id: SessionId) {
        if let Some(c) = self.clients.get_mut(client) {
            if c.session == Some(id) {
                c.session = None;
            }
        }
        if let Some(record) = self.store.get(id) {
            let _ = self.store.remove(id, record.state_version);
        }
    }

    /// Lets go of session `id`, which another node took over: its route and this node's
    /// record go, with no end (no TERMINATED, no event; it lives on at the new owner).
    pub fn hand_over<H>(&mut self, router: &mut Router<H>, id: SessionId) -> Option<Route<H>> {
        let route = router.forget(id)?;
        if let Some(c) = self.clients.get_mut(&route.client) {
            if c.session == Some(id) {
                c.session = None;
            }
        }
        if let Some(record) = self.store.get(id) {
            let _ = self.store.remove(id, record.state_version);
        }
        Some(route)
    }

    /// The client's live session, as far as handshakes go (the newest it established).
    pub fn current_session(&self, client: &PublicKey) -> Option<SessionId> {
        self.clients.get(client).and_then(|c| c.session)
    }

    /// Releases everything an ended session held outside its own state: its route and
    /// tunnel address in `router`, its client's slot (unless a newer handshake already
    /// replaced it), and its table record when this node still owns it (a record another
    /// node took over is that node's). Returns the route, if the session was routed.
    pub fn release<H>(
        &mut self,
        router: &mut Router<H>,
        id: SessionId,
        cause: Option<TerminationCause>,
    ) -> Option<Route<H>> {
        let route = router.unregister(id, cause)?;
        if let Some(c) = self.clients.get_mut(&route.client) {
            if c.session == Some(id) {
                c.session = None;
            }
        }
        if let Some(record) = self.store.get(id).filter(|r| r.owner == self.node) {
            let _ = self.store.remove(id, record.state_version);
        }
        Some(route)
    }

    /// A random session id not in the table (and never 0). Gives up after a few tries
    /// rather than loop: with 64 random bits, a second collision means the random source
    /// is broken.
    fn fresh_session_id(&self) -> Option<SessionId> {
        for _ in 0..4 {
            let id = SessionId(getrandom::u64().ok()?);
            if id.0 != 0 && self.store.get(id).is_none() {
                return Some(id);
            }
        }
        None
    }
}
