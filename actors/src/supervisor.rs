//! The gateway node's supervisor, its session registry and its routers.
//!
//! [`NodeSupervisor`] answers handshakes (the core [`Responder`]), starts each new
//! session's actor on one of the per-core arbiters, and is told whenever a session actor
//! stops: a terminated session's registry entries, tunnel address and client slot are
//! released (its keys went with the actor); a session whose actor stopped unexpectedly is
//! restarted with its state on a fresh actor, up to [`MAX_SESSION_RESTARTS`] times, and
//! then ended explicitly (`runtime_failure`). Nothing is left half-bound: the table
//! record is written by the session itself, through compare-and-swap, before any of this.
//!
//! [`Registry`] maps session ids and tunnel addresses to session actors, so the
//! transport and TUN routers ([`GatewayRouter`]) find a packet's session in O(1).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use jvpn_core::fsm::TerminationCause;
use jvpn_core::gateway::{
    destination_address, Drop as CoreDrop, EndedSessions, Endpoint, GatewaySession, Responder,
};
use jvpn_core::ids::SessionId;
use jvpn_core::wire::{self, encode_session_unknown, Datagram};

use crate::runtime::{offer, ActorKind, Handling, Reporter};
use crate::session::{
    FromTunnel, GetStatus, Inbound, SessionActor, SessionEnv, SessionStatus, SessionStopped,
    Terminate,
};
use crate::telemetry;
use crate::transport::{Deliver, Signal, TransportHandle};
use crate::tun::{TunRoute, TunWrite};

/// How often one session may be restarted after its actor stopped unexpectedly.
pub const MAX_SESSION_RESTARTS: u32 = 3;

/// The node's sizing.
#[derive(Debug, Clone, Copy)]
pub struct NodeLimits {
    /// Mailbox capacity of each session actor.
    pub session_mailbox: usize,
    /// Mailbox capacity of the supervisor (handshakes wait there).
    pub supervisor_mailbox: usize,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            session_mailbox: 256,
            supervisor_mailbox: 64,
        }
    }
}

/// Session id → actor and tunnel address → actor, plus the ended sessions.
#[derive(Default)]
pub struct Registry {
    sessions: RwLock<HashMap<SessionId, Addr<SessionActor>>>,
    tunnels: RwLock<HashMap<IpAddr, (SessionId, Addr<SessionActor>)>>,
    ended: Mutex<EndedSessions>,
}

impl Registry {
    /// The actor of session `id`.
    pub fn session(&self, id: SessionId) -> Option<Addr<SessionActor>> {
        self.sessions.read().ok()?.get(&id).cloned()
    }

    /// The actor of the session owning tunnel address `addr`.
    pub fn by_tunnel(&self, addr: IpAddr) -> Option<Addr<SessionActor>> {
        self.tunnels.read().ok()?.get(&addr).map(|(_, a)| a.clone())
    }

    /// Offers `msg` to session `id`'s actor through the registry's own address (actix
    /// bounds a mailbox per sender: a fresh clone per message would bypass the bound).
    /// `None`: no such session.
    pub fn offer_session<M>(&self, id: SessionId, msg: M) -> Option<bool>
    where
        SessionActor: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let map = self.sessions.read().ok()?;
        map.get(&id).map(|a| offer(a, ActorKind::Session, msg))
    }

    /// Like [`Registry::offer_session`], to the session owning tunnel address `addr`.
    pub fn offer_tunnel<M>(&self, addr: IpAddr, msg: M) -> Option<bool>
    where
        SessionActor: Handler<M>,
        M: Message + Send + 'static,
        M::Result: Send,
    {
        let map = self.tunnels.read().ok()?;
        map.get(&addr)
            .map(|(_, a)| offer(a, ActorKind::Session, msg))
    }

    /// Every registered session.
    pub fn sessions(&self) -> Vec<(SessionId, Addr<SessionActor>)> {
        self.sessions
            .read()
            .map(|m| m.iter().map(|(id, a)| (*id, a.clone())).collect())
            .unwrap_or_default()
    }

    /// How many sessions are registered.
    pub fn len(&self) -> usize {
        self.sessions.read().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers session `id`'s actor as the owner of `tunnel`. A new session takes the
    /// address (from the session it replaces); a restarted one only if no other session
    /// holds it, so it never takes the address from a newer session.
    fn insert(&self, id: SessionId, tunnel: IpAddr, addr: Addr<SessionActor>, restarted: bool) {
        if let Ok(mut m) = self.sessions.write() {
            m.insert(id, addr.clone());
        }
        if let Ok(mut m) = self.tunnels.write() {
            let held_by_other = m.get(&tunnel).is_some_and(|(owner, _)| *owner != id);
            if !(restarted && held_by_other) {
                m.insert(tunnel, (id, addr));
            }
        }
    }

    fn remove(&self, id: SessionId, tunnel: IpAddr, cause: Option<TerminationCause>) {
        if let Ok(mut m) = self.sessions.write() {
            m.remove(&id);
        }
        if let Ok(mut m) = self.tunnels.write() {
            // A newer session of the same client may own the address already.
            if m.get(&tunnel).is_some_and(|(owner, _)| *owner == id) {
                m.remove(&tunnel);
            }
        }
        if let Ok(mut e) = self.ended.lock() {
            e.remember(id, cause);
        }
    }
}

/// A handshake initiation for the supervisor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Handshake {
    /// The transport it came on.
    pub via: TransportHandle,
    /// Its sender.
    pub from: SocketAddr,
    /// The datagram.
    pub datagram: Bytes,
}

/// Ends a session on an operator's command (operator_terminated, the client told).
/// Returns whether a live session was found.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct TerminateSession(pub SessionId);

/// Stops the node's sessions: every live session ends explicitly (operator_terminated,
/// its client told), none is restarted, and no handshake is answered any more. Returns
/// how many sessions were told to end; each is released as its actor stops.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct StopSessions;

/// Stops the supervisor itself (the last step of a node's stop, after its sessions
/// ended).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct StopSupervisor;

impl Handler<StopSupervisor> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, _: StopSupervisor, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Lists live sessions.
#[derive(Debug, Message)]
#[rtype(result = "Vec<SessionStatus>")]
pub struct ListSessions;

/// The node supervisor.
pub struct NodeSupervisor {
    responder: Responder,
    registry: Arc<Registry>,
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: usize,
    limits: NodeLimits,
    reporter: Reporter,
    tun: Recipient<TunWrite>,
    env: Option<Arc<SessionEnv>>,
    /// Sessions told to end, with why: if the actor stops before it handled the command
    /// (a crash with the command still queued), the session is ended with this cause
    /// instead of restarted. At most one entry per registered session.
    ending: HashMap<SessionId, TerminationCause>,
    /// Set by [`StopSessions`].
    stopping: bool,
}

impl NodeSupervisor {
    /// A supervisor answering handshakes with `responder`, starting sessions on
    /// `arbiters` in turn (the current one if empty).
    pub fn new(
        responder: Responder,
        registry: Arc<Registry>,
        arbiters: Vec<ArbiterHandle>,
        limits: NodeLimits,
        reporter: Reporter,
        tun: Recipient<TunWrite>,
    ) -> Self {
        NodeSupervisor {
            responder,
            registry,
            arbiters,
            next_arbiter: 0,
            limits,
            reporter,
            tun,
            env: None,
            ending: HashMap::new(),
            stopping: false,
        }
    }

    fn start_session(
        &mut self,
        session: Box<GatewaySession>,
        paths: VecDeque<(Endpoint, TransportHandle)>,
        restarts: u32,
    ) {
        let Some(env) = self.env.clone() else {
            return;
        };
        let id = session.id();
        let tunnel = session.tunnel().addr;
        let capacity = self.limits.session_mailbox;
        let make = move |ctx: &mut Context<SessionActor>| {
            ctx.set_mailbox_capacity(capacity);
            SessionActor::new(session, env, paths, restarts)
        };
        let addr = if self.arbiters.is_empty() {
            SessionActor::create(make)
        } else {
            let arbiter = &self.arbiters[self.next_arbiter % self.arbiters.len()];
            self.next_arbiter = self.next_arbiter.wrapping_add(1);
            SessionActor::start_in_arbiter(arbiter, make)
        };
        self.registry.insert(id, tunnel, addr, restarts > 0);
    }
}

impl Actor for NodeSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.limits.supervisor_mailbox);
        self.env = Some(Arc::new(SessionEnv {
            store: Arc::clone(self.responder.store()),
            keypair: self.responder.keypair().clone(),
            reporter: self.reporter.clone(),
            tun: self.tun.clone(),
            supervisor: ctx.address().recipient(),
        }));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Let go of the TUN actor and of our own address (held by the sessions' shared
        // environment), so that the actors closed by the node's stop can end.
        self.env = None;
    }
}

impl Handler<Handshake> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Handshake, _ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Supervisor);
        if self.stopping {
            telemetry::dropped("node_stopping");
            return;
        }
        let Ok(Datagram::HandshakeInit {
            sender_index,
            noise,
        }) = wire::parse(&msg.datagram)
        else {
            telemetry::dropped("malformed");
            return;
        };
        let from = Endpoint {
            protocol: msg.via.protocol(),
            addr: msg.from,
        };
        match self
            .responder
            .accept(from, sender_index, noise, Instant::now())
        {
            Ok((accepted, reply)) => {
                telemetry::handshake(None);
                msg.via.send(msg.from, Bytes::copy_from_slice(reply));
                // One session per client: the new one replaces the old explicitly.
                if let Some(old) = accepted.replaces {
                    self.end_session(old, TerminationCause::Peer);
                }
                let mut paths = VecDeque::new();
                paths.push_back((from, msg.via));
                self.start_session(Box::new(accepted.session), paths, 0);
            }
            Err(reason) => {
                telemetry::handshake(Some(reason.as_str()));
                telemetry::dropped(CoreDrop::Handshake(reason).as_str());
            }
        }
    }
}

impl Handler<SessionStopped> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: SessionStopped, _ctx: &mut Context<Self>) {
        let told = self.ending.remove(&msg.id);
        let Some(session) = msg.unfinished else {
            self.release(msg.id, &msg.client, msg.tunnel, msg.ended_by);
            return;
        };
        // The actor stopped unexpectedly. It is restarted unless the session was being
        // ended, the node is stopping, a newer handshake of its client replaced it, or
        // it has used up its restarts: then it is ended explicitly, here.
        let replaced = self.responder.current_session(&msg.client) != Some(msg.id);
        let cause = told
            .or(self.stopping.then_some(TerminationCause::Operator))
            .or(replaced.then_some(TerminationCause::Peer))
            .or((msg.restarts >= MAX_SESSION_RESTARTS).then_some(TerminationCause::RuntimeFailure));
        match cause {
            None => {
                telemetry::restarted(ActorKind::Session);
                self.start_session(session, msg.paths, msg.restarts + 1);
            }
            Some(cause) => {
                let ended_by = self.end_here(session, cause, &msg.paths);
                self.release(msg.id, &msg.client, msg.tunnel, ended_by);
            }
        }
    }
}

impl NodeSupervisor {
    /// Tells session `id` to end with `cause`, remembering the cause in case its actor
    /// stops before handling the command.
    fn end_session(&mut self, id: SessionId, cause: TerminationCause) {
        if self.registry.session(id).is_none() {
            return;
        }
        self.ending.insert(id, cause);
        // Unbounded on purpose: a lifecycle command must reach a busy session too (one
        // per session, and sessions are bounded by the table).
        if let Some(addr) = self.registry.session(id) {
            addr.do_send(Terminate(cause));
        }
    }

    /// Ends a session whose actor is gone, as its actor would have: the client told when
    /// an operator ended it, the events reported. Returns the cause recorded.
    fn end_here(
        &mut self,
        mut session: Box<GatewaySession>,
        cause: TerminationCause,
        paths: &VecDeque<(Endpoint, TransportHandle)>,
    ) -> Option<TerminationCause> {
        let now = Instant::now();
        if cause == TerminationCause::Operator {
            if let Some((to, bytes)) =
                session.seal_terminate(jvpn_core::reason::ReasonCode::OperatorTerminated, now)
            {
                if let Some((_, t)) = paths.iter().find(|(e, _)| *e == to) {
                    t.send(to.addr, Bytes::copy_from_slice(bytes));
                }
            }
        }
        session.terminate(self.responder.store().as_ref(), cause, now);
        let id = session.id();
        while let Some(event) = session.poll_event() {
            self.reporter.report(id, event);
        }
        session.ended_by()
        // The session's keys are zeroized as it drops here.
    }

    /// Releases everything an ended session held: registry entries, tunnel address,
    /// the client's slot, its table record (when this node owns it).
    fn release(
        &mut self,
        id: SessionId,
        client: &jvpn_core::crypto::PublicKey,
        tunnel: IpAddr,
        cause: Option<TerminationCause>,
    ) {
        self.registry.remove(id, tunnel, cause);
        self.responder.session_ended(client, id);
        let store = self.responder.store();
        if let Some(record) = store.get(id).filter(|r| &r.owner == self.reporter.node()) {
            let _ = store.remove(id, record.state_version);
        }
    }
}

impl Handler<StopSessions> for NodeSupervisor {
    type Result = usize;

    fn handle(&mut self, _: StopSessions, _ctx: &mut Context<Self>) -> usize {
        self.stopping = true;
        let sessions = self.registry.sessions();
        for (id, _) in &sessions {
            self.end_session(*id, TerminationCause::Operator);
        }
        sessions.len()
    }
}

impl Handler<TerminateSession> for NodeSupervisor {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, msg: TerminateSession, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(addr) = self.registry.session(msg.0) else {
            return Box::pin(async { false });
        };
        // Remembered first: if the actor stops before handling the command, the session
        // is ended with it when the supervisor hears of the stop.
        self.ending.insert(msg.0, TerminationCause::Operator);
        Box::pin(async move {
            // A closed mailbox means the actor stopped with the command unhandled; the
            // supervisor ends the session on hearing of it.
            addr.send(Terminate(TerminationCause::Operator))
                .await
                .unwrap_or(true)
        })
    }
}

impl Handler<ListSessions> for NodeSupervisor {
    type Result = ResponseFuture<Vec<SessionStatus>>;

    fn handle(&mut self, _: ListSessions, _ctx: &mut Context<Self>) -> Self::Result {
        let sessions = self.registry.sessions();
        Box::pin(async move {
            // Asked all at once: sessions answer on their own arbiters.
            let asked = sessions.into_iter().map(|(_, addr)| addr.send(GetStatus));
            let mut out: Vec<SessionStatus> = futures_util::future::join_all(asked)
                .await
                .into_iter()
                .filter_map(|r| r.ok().flatten())
                .collect();
            out.sort_by_key(|s| s.id.0);
            out
        })
    }
}

/// Routes what the gateway's transports and TUN device read: session packets to their
/// session by the header's id, handshakes to the supervisor, tunnel packets to the
/// session owning their destination.
pub struct GatewayRouter {
    registry: Arc<Registry>,
    supervisor: Addr<NodeSupervisor>,
    reporter: Reporter,
}

impl GatewayRouter {
    /// A router over `registry`, handing handshakes to `supervisor`.
    pub fn new(
        registry: Arc<Registry>,
        supervisor: Addr<NodeSupervisor>,
        reporter: Reporter,
    ) -> Self {
        GatewayRouter {
            registry,
            supervisor,
            reporter,
        }
    }

    /// A session packet whose session is not live: counted, a reattach for an ended
    /// session reported, and the sender told the session is unknown.
    fn unknown(&self, via: &TransportHandle, from: SocketAddr, header: &wire::SessionHeader) {
        let endpoint = Endpoint {
            protocol: via.protocol(),
            addr: from,
        };
        let judged = self
            .registry
            .ended
            .lock()
            .map(|mut e| e.judge(header, endpoint, Instant::now()));
        if let Ok((drop, event)) = judged {
            telemetry::dropped(drop.as_str());
            if let Some(event) = event {
                self.reporter.report(header.session_id, event);
            }
        }
        via.send(
            from,
            Bytes::copy_from_slice(&encode_session_unknown(header.session_id)),
        );
    }
}

/// Consecutive datagrams of one session, gathered into one mailbox message.
struct Run {
    id: SessionId,
    datagrams: Vec<(SocketAddr, Bytes)>,
}

fn flush(registry: &Registry, run: Option<Run>, via: &TransportHandle) {
    if let Some(run) = run {
        let inbound = Inbound {
            via: via.clone(),
            datagrams: run.datagrams,
        };
        if registry.offer_session(run.id, inbound) != Some(true) {
            telemetry::dropped("session_busy");
        }
    }
}

impl Deliver for GatewayRouter {
    fn datagrams(&self, via: &TransportHandle, batch: Vec<(SocketAddr, Bytes)>) {
        let mut run: Option<Run> = None;
        for (from, datagram) in batch {
            let session = match wire::parse(&datagram) {
                Ok(Datagram::Session { header, .. }) => Some(header),
                Ok(Datagram::HandshakeInit { .. }) => {
                    let handshake = Handshake {
                        via: via.clone(),
                        from,
                        datagram: datagram.clone(),
                    };
                    if !offer(&self.supervisor, ActorKind::Supervisor, handshake) {
                        telemetry::dropped("handshake_busy");
                    }
                    None
                }
                Ok(_) => {
                    telemetry::dropped(CoreDrop::Unexpected.as_str());
                    None
                }
                Err(_) => {
                    telemetry::dropped(CoreDrop::Malformed.as_str());
                    None
                }
            };
            let Some(header) = session else { continue };
            if let Some(r) = run.as_mut().filter(|r| r.id == header.session_id) {
                r.datagrams.push((from, datagram));
                continue;
            }
            flush(&self.registry, run.take(), via);
            if self.registry.session(header.session_id).is_some() {
                run = Some(Run {
                    id: header.session_id,
                    datagrams: vec![(from, datagram)],
                });
            } else {
                self.unknown(via, from, &header);
            }
        }
        flush(&self.registry, run, via);
    }

    fn signal(&self, _via: &TransportHandle, _signal: Signal) {
        // A gateway socket serves every client: a send error concerns one peer (the
        // transport counted it), whose session notices through its own heartbeat
        // timeout; the gateway never decides a client's path.
    }
}

impl GatewayRouter {
    fn to_session(&self, dst: IpAddr, packets: Vec<Bytes>) {
        match self.registry.offer_tunnel(dst, FromTunnel(packets)) {
            Some(true) => {}
            Some(false) => telemetry::dropped("session_busy"),
            None => telemetry::dropped(CoreDrop::NoRoute.as_str()),
        }
    }
}

impl TunRoute for GatewayRouter {
    fn packets(&self, batch: Vec<Bytes>) {
        let mut run: Option<(IpAddr, Vec<Bytes>)> = None;
        for packet in batch {
            let Some(dst) = destination_address(&packet) else {
                telemetry::dropped(CoreDrop::Malformed.as_str());
                continue;
            };
            if let Some(r) = run.as_mut().filter(|r| r.0 == dst) {
                r.1.push(packet);
                continue;
            }
            if let Some((to, packets)) = run.take() {
                self.to_session(to, packets);
            }
            run = Some((dst, vec![packet]));
        }
        if let Some((to, packets)) = run {
            self.to_session(to, packets);
        }
    }
}
