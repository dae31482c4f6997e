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

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use jvpn_core::fsm::TerminationCause;
use jvpn_core::gateway::{
    Drop as CoreDrop, Endpoint, GatewaySession, HandshakeGate, Registration, Responder, Router,
    Unknown, Verdict,
};
use jvpn_core::ids::SessionId;
use jvpn_core::reason::ReasonCode;
use jvpn_core::wire::{self, Datagram};

use crate::cluster::{Claim, ClusterLink, Create, Disown, LeaveAll, Released, TakeOver, Unclaimed};
use crate::runtime::{offer, ActorKind, Handling, Reporter};
use crate::session::{
    FromTunnel, GetStatus, Inbound, LeaveNode, SessionActor, SessionEnv, SessionStatus,
    SessionStopped, Terminate,
};
use crate::telemetry;
use crate::transport::{Deliver, Incoming, Signal, TransportHandle};
use crate::tun::{TunDevice, TunRoute};

/// How often one session may be restarted after its actor stopped unexpectedly.
pub const MAX_SESSION_RESTARTS: u32 = 3;

/// The node's sizing.
#[derive(Debug, Clone, Copy)]
pub struct NodeLimits {
    /// Mailbox capacity of each session actor.
    pub session_mailbox: usize,
    /// Mailbox capacity of the supervisor (handshakes wait there).
    pub supervisor_mailbox: usize,
    /// Handshakes waiting for the supervisor from which the node is *under load*: past
    /// it, only initiations with a valid cookie get a Diffie-Hellman, the others a
    /// cookie reply ([`HandshakeGate`]).
    pub handshake_load_threshold: usize,
    /// QUIC and TCP connections open at once, at most.
    pub max_connections: usize,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            session_mailbox: 256,
            supervisor_mailbox: 64,
            handshake_load_threshold: 8,
            max_connections: 4_096,
        }
    }
}

/// The node's router (core [`Router`]: session id → actor, tunnel address → actor, the
/// ended sessions), shared by the supervisor, which registers and releases sessions,
/// and the packet readers, which route by it.
#[derive(Default)]
pub struct Registry {
    router: RwLock<Router<Addr<SessionActor>>>,
}

impl Registry {
    /// Reads the router (a poisoned lock is still read: its maps stay consistent, as
    /// every writer only inserts or removes whole entries).
    pub fn read(&self) -> RwLockReadGuard<'_, Router<Addr<SessionActor>>> {
        self.router.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Router<Addr<SessionActor>>> {
        self.router.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The actor of session `id`.
    pub fn session(&self, id: SessionId) -> Option<Addr<SessionActor>> {
        self.read().get(id).cloned()
    }

    /// The actor of the session owning tunnel address `addr`.
    pub fn by_tunnel(&self, addr: IpAddr) -> Option<Addr<SessionActor>> {
        self.read().by_tunnel(addr).map(|(_, a)| a.clone())
    }

    /// Every registered session.
    pub fn sessions(&self) -> Vec<(SessionId, Addr<SessionActor>)> {
        self.read().iter().map(|(id, a)| (id, a.clone())).collect()
    }

    /// How many sessions are registered.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Publishes session `id`'s binding (see [`Router::set_binding`]).
    pub fn set_binding(&self, id: SessionId, binding: Option<Endpoint>) {
        self.write().set_binding(id, binding);
    }

    /// Judges a packet of a session that is not live (see [`Router::unknown`]).
    pub fn unknown(&self, header: &wire::SessionHeader, from: Endpoint, now: Instant) -> Unknown {
        self.write().unknown(header, from, now)
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
    /// Counts it as waiting until it is handled or dropped.
    pub waiting: Waiting,
}

/// One handshake waiting for the supervisor: counted from when it is queued until it is
/// dropped (handled, or refused by a full queue), so the count is the queue's depth.
#[derive(Debug)]
pub struct Waiting(Arc<AtomicUsize>);

impl Waiting {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Waiting(Arc::clone(count))
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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

/// Stops a cluster node's sessions without ending them: each writes its final record
/// and stops, for the other nodes to take at their clients' next reattach; no handshake
/// is answered any more. Returns how many sessions were handed off.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct HandOffSessions;

/// How many sessions handed off have not stopped yet.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct HandingOff;

impl Handler<HandingOff> for NodeSupervisor {
    type Result = usize;

    fn handle(&mut self, _: HandingOff, _ctx: &mut Context<Self>) -> usize {
        self.handing_off.len()
    }
}

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

/// Makes the node part of a cluster: its sessions' records go to the cluster's table.
/// Sent once, before any handshake.
#[derive(Message)]
#[rtype(result = "()")]
pub struct JoinCluster(pub ClusterLink);

/// Answers ARP for the tunnel addresses of the sessions a cluster node forwards on its
/// inside network (spec/cluster.md), so that the hosts there reach each client through
/// whichever node owns its session. Never blocks the caller.
pub trait Announce: Send + Sync {
    /// The node forwards the session of these addresses from now on.
    fn announce(&self, tunnel: jvpn_core::wire::TunnelAddrs);
    /// It does not any more.
    fn withdraw(&self, tunnel: jvpn_core::wire::TunnelAddrs);
}

/// The node supervisor.
pub struct NodeSupervisor {
    responder: Responder,
    registry: Arc<Registry>,
    arbiters: Vec<ArbiterHandle>,
    limits: NodeLimits,
    reporter: Reporter,
    device: Arc<dyn TunDevice>,
    env: Option<Arc<SessionEnv>>,
    /// Sessions told to end, with why: if the actor stops before it handled the command
    /// (a crash with the command still queued), the session is ended with this cause
    /// instead of restarted. At most one entry per registered session.
    ending: HashMap<SessionId, TerminationCause>,
    /// Set by [`StopSessions`].
    stopping: bool,
    /// The cluster, when the node is part of one.
    cluster: Option<ClusterLink>,
    /// Announces the tunnel addresses of the sessions the node forwards.
    announcer: Option<Arc<dyn Announce>>,
    /// Times the node was fenced: a session whose record was written before a fence
    /// is not started after it.
    fences: u64,
    /// Sessions whose record is being created or claimed, not started yet; and those of
    /// them told to leave meanwhile (not started then).
    starting: HashSet<SessionId>,
    cancelled: HashSet<SessionId>,
    /// Sessions handed off as the node stops whose actor has not stopped yet (it sends
    /// the final record first).
    handing_off: HashSet<SessionId>,
}

impl NodeSupervisor {
    /// A supervisor answering handshakes with `responder`, starting each session on the
    /// arbiter of `arbiters` that reads the transport its handshake came on (the current
    /// one if empty); its sessions write to `device`.
    pub fn new(
        responder: Responder,
        registry: Arc<Registry>,
        arbiters: Vec<ArbiterHandle>,
        limits: NodeLimits,
        reporter: Reporter,
        device: Arc<dyn TunDevice>,
    ) -> Self {
        NodeSupervisor {
            responder,
            registry,
            arbiters,
            limits,
            reporter,
            device,
            env: None,
            ending: HashMap::new(),
            stopping: false,
            cluster: None,
            announcer: None,
            fences: 0,
            starting: HashSet::new(),
            cancelled: HashSet::new(),
            handing_off: HashSet::new(),
        }
    }

    /// Whether a session whose record write began when the node had been fenced
    /// `fences` times may start now (no fence since, not told to leave meanwhile).
    fn may_start(&mut self, id: SessionId, fences: u64) -> bool {
        self.starting.remove(&id);
        let cancelled = self.cancelled.remove(&id);
        !cancelled && fences == self.fences
    }

    /// Announces its sessions' tunnel addresses with `announcer`.
    pub fn with_announcer(mut self, announcer: Option<Arc<dyn Announce>>) -> Self {
        self.announcer = announcer;
        self
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
        let tunnel = session.tunnel();
        let client = session.client();
        let binding = session.binding();
        let capacity = self.limits.session_mailbox;
        // Pinned to the core that reads the client's path: its packets cross no thread.
        let core = paths.front().map_or(0, |(_, t)| t.core());
        let make = move |ctx: &mut Context<SessionActor>| {
            ctx.set_mailbox_capacity(capacity);
            SessionActor::new(session, env, paths, restarts)
        };
        let addr = match self.arbiters.get(core).or(self.arbiters.first()) {
            Some(arbiter) => SessionActor::start_in_arbiter(arbiter, make),
            None => SessionActor::create(make),
        };
        let how = if restarts > 0 {
            Registration::Restarted
        } else {
            Registration::New
        };
        let mut router = self.registry.write();
        router.register(id, tunnel, client, addr, how);
        router.set_binding(id, binding);
        if restarts == 0 {
            if let Some(a) = &self.announcer {
                a.announce(tunnel);
            }
        }
    }
}

impl NodeSupervisor {
    /// What every session actor of the node shares.
    fn session_env(&self, ctx: &Context<Self>) -> SessionEnv {
        SessionEnv {
            store: Arc::clone(self.responder.store()),
            keypair: self.responder.keypair().clone(),
            reporter: self.reporter.clone(),
            device: Arc::clone(&self.device),
            supervisor: ctx.address().recipient(),
            registry: Arc::clone(&self.registry),
            cluster: self.cluster.clone(),
        }
    }
}

impl Actor for NodeSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.limits.supervisor_mailbox);
        self.env = Some(Arc::new(self.session_env(ctx)));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        // Let go of the TUN device and of our own address (held by the sessions' shared
        // environment), so that the actors closed by the node's stop can end and the
        // device with them.
        self.env = None;
    }
}

impl Handler<Handshake> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: Handshake, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Supervisor);
        if self.stopping {
            telemetry::dropped("node_stopping");
            return;
        }
        let Ok(Datagram::HandshakeInit {
            sender_index,
            noise,
            macs,
        }) = wire::parse(&msg.datagram)
        else {
            telemetry::dropped("malformed");
            return;
        };
        let from = Endpoint {
            protocol: msg.via.protocol(),
            addr: msg.from,
        };
        match self.responder.accept(
            from,
            sender_index,
            noise,
            (macs.mac1_covered, macs.mac1),
            Instant::now(),
        ) {
            Ok((accepted, reply)) => {
                let reply = reply.to_vec();
                // One session per client: the new one replaces the old explicitly.
                if let Some(old) = accepted.replaces {
                    self.end_session(old, TerminationCause::Peer);
                }
                let mut session = Box::new(accepted.session);
                let mut paths = VecDeque::new();
                paths.push_back((from, msg.via.clone()));
                let Some(link) = self.cluster.clone() else {
                    telemetry::handshake(None);
                    self.start_session(session, paths, 0);
                    // Answered once the session is routed: the client's first packets,
                    // sent the moment it has the answer, find their session (the readers
                    // run on other threads than this one).
                    msg.via.send(msg.from, &reply);
                    return;
                };
                // In a cluster, the session's record is in the table before the client
                // hears of it; its counters are reserved a block at a time.
                session.reserve_until(jvpn_core::cluster::COUNTER_BLOCK);
                let record = match session.export(self.reporter.clock(), &link.key) {
                    Ok(record) => record,
                    Err(e) => {
                        self.responder.abandon(&session.client(), session.id());
                        eprintln!("jvpn gateway: cannot export a new session: {e}");
                        telemetry::handshake(Some(ReasonCode::AtomicityFailed.as_str()));
                        return;
                    }
                };
                let via = msg.via.clone();
                let to = msg.from;
                let fences = self.fences;
                self.starting.insert(session.id());
                ctx.spawn(link.node.send(Create(record)).into_actor(self).map(
                    move |created, act, _| {
                        let (id, client) = (session.id(), session.client());
                        let may_start = act.may_start(id, fences);
                        let refused = match created {
                            Ok(Ok(())) if act.stopping => {
                                link.node.do_send(Released(id));
                                Some(ReasonCode::OperatorTerminated)
                            }
                            // Fenced, or told to leave, while its record was written.
                            Ok(Ok(())) if !may_start => {
                                link.node.do_send(Released(id));
                                Some(ReasonCode::StoreUnavailable)
                            }
                            Ok(Ok(())) if act.responder.current_session(&client) == Some(id) => {
                                None
                            }
                            // A newer handshake of the client came while this one's
                            // record was written: it is not started.
                            Ok(Ok(())) => {
                                link.node.do_send(Released(id));
                                Some(ReasonCode::AtomicityFailed)
                            }
                            Ok(Err(reason)) => Some(reason),
                            Err(_) => Some(ReasonCode::StoreUnavailable),
                        };
                        if let Some(reason) = refused {
                            act.responder.abandon(&client, id);
                            telemetry::handshake(Some(reason.as_str()));
                            telemetry::dropped(CoreDrop::Handshake(reason).as_str());
                            return;
                        }
                        telemetry::handshake(None);
                        act.start_session(session, paths, 0);
                        via.send(to, &reply);
                    },
                ));
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
        self.handing_off.remove(&msg.id);
        // An actor that left the session to another node, reporting after the session
        // came back here under a new actor: nothing of the new one is touched.
        if self
            .registry
            .session(msg.id)
            .is_some_and(|current| current != msg.addr)
        {
            return;
        }
        let told = self.ending.remove(&msg.id);
        let Some(session) = msg.unfinished else {
            self.release(msg.id, msg.ended_by);
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
                self.release(msg.id, ended_by);
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
                    t.send(to.addr, bytes);
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

    /// Releases everything an ended session held (see [`Responder::release`]).
    fn release(&mut self, id: SessionId, cause: Option<TerminationCause>) {
        let route = self
            .responder
            .release(&mut self.registry.write(), id, cause);
        if let Some(route) = route {
            if let Some(link) = &self.cluster {
                link.node.do_send(Released(id));
            }
            if let Some(a) = &self.announcer {
                a.withdraw(route.tunnel);
            }
        }
    }

    /// Stops forwarding session `id` without ending it (another node forwards it, or
    /// this node was fenced): its routes go at once, so no packet reaches it any more,
    /// and its actor writes its final record when asked and stops.
    fn leave(&mut self, msg: crate::cluster::Leave) {
        let route = self.responder.hand_over(&mut self.registry.write(), msg.id);
        let Some(route) = route else {
            // Not started yet: it is not started at all.
            if self.starting.contains(&msg.id) {
                self.cancelled.insert(msg.id);
            }
            return;
        };
        if let Some(a) = &self.announcer {
            a.withdraw(route.tunnel);
        }
        // Unbounded on purpose: one lifecycle message per session.
        route.handle.do_send(LeaveNode {
            to: msg.to,
            reason: msg.reason,
            write: msg.write,
        });
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

impl Handler<HandOffSessions> for NodeSupervisor {
    type Result = usize;

    fn handle(&mut self, _: HandOffSessions, _ctx: &mut Context<Self>) -> usize {
        self.stopping = true;
        let sessions = self.registry.sessions();
        for (id, _) in &sessions {
            self.handing_off.insert(*id);
            self.leave(crate::cluster::Leave {
                id: *id,
                to: None,
                reason: ReasonCode::SessionMoved,
                write: true,
            });
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

impl Handler<JoinCluster> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: JoinCluster, ctx: &mut Context<Self>) {
        self.cluster = Some(msg.0);
        // The sessions' shared environment, made again with the cluster in it (this is
        // the supervisor's first message: no session holds the old one).
        self.env = Some(Arc::new(self.session_env(ctx)));
    }
}

impl Handler<crate::cluster::Leave> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, msg: crate::cluster::Leave, _ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Supervisor);
        self.leave(msg);
    }
}

impl Handler<LeaveAll> for NodeSupervisor {
    type Result = ();

    fn handle(&mut self, _: LeaveAll, _ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Supervisor);
        self.fences += 1;
        for (id, _) in self.registry.sessions() {
            self.leave(crate::cluster::Leave {
                id,
                to: None,
                reason: ReasonCode::NodeFenced,
                write: false,
            });
        }
    }
}

impl Handler<TakeOver> for NodeSupervisor {
    type Result = ();

    /// A client's reattach for a session another node owned: checked (its request is
    /// fresh, opens under the record's keys and was not accepted before; the client may
    /// have its session here), claimed in the table, then started here from the record
    /// and handed the request, whose answer moves the client's binding here.
    fn handle(&mut self, msg: TakeOver, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Supervisor);
        let Some(link) = self.cluster.clone() else {
            return;
        };
        if self.stopping {
            telemetry::dropped("node_stopping");
            return;
        }
        let id = msg.record.session_id;
        // A claim of it is under way already: that one settles it.
        if self.starting.contains(&id) {
            return;
        }
        let registry = Arc::clone(&self.registry);
        let freshness = (
            self.reporter.clock().ts_ms(Instant::now()),
            self.responder.policy().reattach_proof_max_age(),
        );
        let checked = jvpn_core::gateway::open_takeover_request(
            &msg.record,
            &link.key,
            &msg.datagram,
            freshness,
        )
        .and_then(|opened| {
            if registry.session(id).is_some() {
                return Err(jvpn_core::cluster::ClusterError::Refused(
                    "it is here already".into(),
                ));
            }
            self.responder
                .may_adopt(&opened.1, |s| registry.session(s).is_some())?;
            Ok(opened)
        });
        let opened = match checked {
            Ok(opened) => opened,
            Err(e) => {
                telemetry::dropped("takeover_refused");
                eprintln!("jvpn gateway: session {id} not taken over: {e}");
                return;
            }
        };
        let claim = Claim {
            record: msg.record.clone(),
            revision: msg.revision,
        };
        let fences = self.fences;
        self.starting.insert(id);
        ctx.spawn(
            link.node
                .send(claim)
                .into_actor(self)
                .map(move |claimed, act, _| {
                    let may_start = act.may_start(id, fences);
                    match claimed {
                        Ok(Ok(())) if may_start => act.start_claimed(&link, msg, opened),
                        // Fenced, or asked for by another node, while it was claimed: its
                        // record is no longer written from here.
                        Ok(Ok(())) => {
                            link.node.do_send(Disown(id));
                            telemetry::dropped(ReasonCode::StoreUnavailable.as_str());
                        }
                        Ok(Err(reason)) => telemetry::dropped(reason.as_str()),
                        Err(_) => telemetry::dropped(ReasonCode::StoreUnavailable.as_str()),
                    }
                }),
        );
    }
}

impl NodeSupervisor {
    /// Starts a session this node claimed in the cluster's table: built from its
    /// record, above the previous owner's reservation, announced, reported as moved
    /// here, and handed the client's request.
    fn start_claimed(
        &mut self,
        link: &ClusterLink,
        msg: TakeOver,
        (header, client, secrets): (
            wire::SessionHeader,
            jvpn_core::crypto::PublicKey,
            jvpn_core::cluster::SessionSecrets,
        ),
    ) {
        let id = msg.record.session_id;
        if self.stopping {
            link.node.do_send(Disown(id));
            return telemetry::dropped("node_stopping");
        }
        let now = Instant::now();
        let clock = *self.reporter.clock();
        let record = &msg.record;
        let send_limit = record
            .send_reserved_until
            .saturating_add(jvpn_core::cluster::COUNTER_BLOCK);
        let registry = Arc::clone(&self.registry);
        let built = self.responder.adopt(
            |s| registry.session(s).is_some(),
            record,
            (client, &secrets),
            (header.counter, send_limit),
            &clock,
            now,
        );
        let session = match built {
            Ok(session) => session,
            Err(e) => {
                // Claimed but not startable here (the client got a session here
                // meanwhile): its record is no longer written from here, and it ends
                // by its TTL unless its client takes it elsewhere.
                eprintln!("jvpn gateway: session {id} claimed but not started: {e}");
                link.node.do_send(Disown(id));
                return telemetry::dropped("takeover_refused");
            }
        };
        let endpoint = Endpoint {
            protocol: msg.via.protocol(),
            addr: msg.from,
        };
        let mut paths = VecDeque::new();
        paths.push_back((endpoint, msg.via.clone()));
        self.start_session(Box::new(session), paths, 0);
        self.reporter.report(
            id,
            jvpn_core::event::SessionEvent {
                at: now,
                body: jvpn_core::event::EventBody::SessionMoved {
                    from_node: msg.previous,
                    to_node: Some(self.reporter.node().clone()),
                    reason_code: ReasonCode::SessionMoved,
                },
            },
        );
        // The request that brought it here: judged by the session as any reattach.
        let inbound = Inbound {
            via: msg.via,
            datagrams: vec![(msg.from, header, msg.datagram)],
        };
        if !self
            .registry
            .session(id)
            .is_some_and(|a| offer(&a, ActorKind::Session, inbound))
        {
            telemetry::dropped("session_busy");
        }
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
/// session owning their destination. Each datagram is parsed once, here; the session
/// opens it in place.
pub struct GatewayRouter {
    registry: Arc<Registry>,
    supervisor: Addr<NodeSupervisor>,
    reporter: Reporter,
    /// The gate of initiations (mac1, cookies under load, per-source budgets): one that
    /// fails it never reaches the supervisor's queue, let alone a Diffie-Hellman.
    gate: Mutex<HandshakeGate>,
    /// The gate's mac1 key, checked before its lock is taken: junk costs no contention.
    mac_key: jvpn_core::mac::MacKey,
    /// Handshakes waiting for the supervisor.
    waiting: Arc<AtomicUsize>,
    /// From how many waiting the node is under load.
    load_threshold: usize,
    /// The cluster, when the node is part of one: packets of sessions other nodes own
    /// go to it.
    cluster: Option<ClusterLink>,
}

impl GatewayRouter {
    /// A router over `registry`, handing handshakes that pass `gate` to `supervisor`;
    /// under load from `load_threshold` handshakes waiting.
    pub fn new(
        registry: Arc<Registry>,
        supervisor: Addr<NodeSupervisor>,
        reporter: Reporter,
        gate: HandshakeGate,
        load_threshold: usize,
    ) -> Self {
        GatewayRouter {
            registry,
            supervisor,
            reporter,
            mac_key: gate.mac_key().clone(),
            gate: Mutex::new(gate),
            waiting: Arc::new(AtomicUsize::new(0)),
            load_threshold,
            cluster: None,
        }
    }

    /// Hands packets of sessions other nodes own to the cluster's actor.
    pub fn with_cluster(mut self, cluster: Option<ClusterLink>) -> Self {
        self.cluster = cluster;
        self
    }

    /// A session packet whose session is not live: counted, a reattach for an ended
    /// session reported, and the sender told the session is unknown (within the hints'
    /// rate limits; a hint held back is counted as `hint_suppressed`).
    fn unknown(
        &self,
        via: &TransportHandle,
        from: SocketAddr,
        header: &wire::SessionHeader,
        datagram: BytesMut,
    ) {
        if let Some(link) = &self.cluster {
            match link.unknown(header) {
                jvpn_core::cluster::Unknown::NotInTable => {}
                jvpn_core::cluster::Unknown::Ignore => {
                    return telemetry::dropped("cluster_elsewhere");
                }
                decision => {
                    let unclaimed = Unclaimed {
                        decision,
                        via: via.clone(),
                        from,
                        header: *header,
                        // Copied out of the reader's memory (a 64 KiB slot or the arena,
                        // transport.rs): it may wait seconds for a handover, and would
                        // keep that memory whole.
                        datagram: BytesMut::from(&datagram[..]),
                    };
                    if !offer(&link.node, ActorKind::Cluster, unclaimed) {
                        telemetry::dropped("cluster_busy");
                    }
                    return;
                }
            }
        }
        let endpoint = Endpoint {
            protocol: via.protocol(),
            addr: from,
        };
        let unknown = self.registry.unknown(header, endpoint, Instant::now());
        telemetry::dropped(unknown.drop.as_str());
        if let Some(event) = unknown.event {
            self.reporter.report(header.session_id, event);
        }
        match unknown.reply {
            Some(reply) => {
                via.send(from, &reply);
            }
            None => telemetry::dropped("hint_suppressed"),
        }
    }
}

impl GatewayRouter {
    /// Initiations: judged by the gate (one lock per batch), those admitted go to the
    /// supervisor's bounded queue (`handshake_busy` when it is full); under load, those
    /// without a valid cookie are answered with a cookie reply instead.
    fn handshakes(&self, via: &TransportHandle, initiations: Vec<(SocketAddr, BytesMut)>) {
        let now = Instant::now();
        let backlog = self.waiting.load(Ordering::Relaxed) >= self.load_threshold;
        let mut admitted = Vec::new();
        {
            let mut gate = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            for (from, datagram) in initiations {
                let Ok(Datagram::HandshakeInit {
                    sender_index, macs, ..
                }) = wire::parse(&datagram)
                else {
                    continue;
                };
                match gate.judge(from, sender_index, &macs, backlog, now) {
                    Verdict::Admit => admitted.push((from, datagram)),
                    Verdict::Cookie(reply) => {
                        telemetry::dropped(CoreDrop::HandshakeCookie.as_str());
                        via.send(from, &reply);
                    }
                    Verdict::Refuse(d) => telemetry::dropped(d.as_str()),
                }
            }
        }
        for (from, datagram) in admitted {
            let handshake = Handshake {
                via: via.clone(),
                from,
                // Copied out of the reader's memory (a 64 KiB slot or the arena,
                // transport.rs), which a datagram waiting in the handshake queue would
                // otherwise keep whole.
                datagram: Bytes::copy_from_slice(&datagram),
                waiting: Waiting::new(&self.waiting),
            };
            if !offer(&self.supervisor, ActorKind::Supervisor, handshake) {
                telemetry::dropped("handshake_busy");
            }
        }
    }
}

/// A session datagram on its way to its session.
type Routed = (SessionId, (SocketAddr, wire::SessionHeader, BytesMut));

/// Offers `items` to their sessions, each run of consecutive datagrams of one session
/// as one message, through the router's own addresses (actix bounds a mailbox per
/// sender, so a fresh clone per message would bypass the bound).
fn offer_runs(router: &Router<Addr<SessionActor>>, via: &TransportHandle, items: Vec<Routed>) {
    let flush = |run: Option<(SessionId, Vec<_>)>| {
        let Some((id, datagrams)) = run else { return };
        let inbound = Inbound {
            via: via.clone(),
            datagrams,
        };
        let taken = router
            .get(id)
            .is_some_and(|a| offer(a, ActorKind::Session, inbound));
        if !taken {
            telemetry::dropped("session_busy");
        }
    };
    let mut run: Option<(SessionId, Vec<_>)> = None;
    for (id, datagram) in items {
        match run.as_mut().filter(|r| r.0 == id) {
            Some(r) => r.1.push(datagram),
            None => {
                flush(run.take());
                run = Some((id, vec![datagram]));
            }
        }
    }
    flush(run);
}

impl Deliver for GatewayRouter {
    fn datagrams(&self, via: &TransportHandle, batch: Vec<Incoming>) {
        let mut unknown = Vec::new();
        let mut handshakes = Vec::new();
        let mut bound = Vec::with_capacity(batch.len());
        let mut elsewhere = Vec::new();
        {
            let router = self.registry.read();
            for (from, datagram) in batch {
                let header = match wire::parse(&datagram) {
                    Ok(Datagram::Session { header, .. }) => header,
                    Ok(Datagram::HandshakeInit { macs, .. }) => {
                        if self.mac_key.verify(macs.mac1_covered, macs.mac1) {
                            handshakes.push((from, datagram));
                        } else {
                            telemetry::dropped(CoreDrop::HandshakeMac.as_str());
                        }
                        continue;
                    }
                    Ok(_) => {
                        telemetry::dropped(CoreDrop::Unexpected.as_str());
                        continue;
                    }
                    Err(_) => {
                        telemetry::dropped(CoreDrop::Malformed.as_str());
                        continue;
                    }
                };
                let id = header.session_id;
                let endpoint = Endpoint {
                    protocol: via.protocol(),
                    addr: from,
                };
                match router.from_binding(id, endpoint) {
                    None => unknown.push((from, header, datagram)),
                    Some(true) => bound.push((id, (from, header, datagram))),
                    Some(false) => elsewhere.push((id, (from, header, datagram))),
                }
            }
            offer_runs(&router, via, bound);
        }
        if !elsewhere.is_empty() {
            // Packets from other endpoints than their session's binding pass within the
            // session's budget for them, judged under the write lock once per batch.
            let mut router = self.registry.write();
            let now = Instant::now();
            elsewhere.retain(|(id, _)| {
                let admitted = router.admit_off_binding(*id, now);
                if !admitted {
                    telemetry::dropped(CoreDrop::OffBindingFlood.as_str());
                }
                admitted
            });
            offer_runs(&router, via, elsewhere);
        }
        if !handshakes.is_empty() {
            self.handshakes(via, handshakes);
        }
        for (from, header, datagram) in unknown {
            self.unknown(via, from, &header, datagram);
        }
    }

    fn signal(&self, _via: &TransportHandle, _signal: Signal) {
        // A gateway socket serves every client: a send error concerns one peer (the
        // transport counted it), whose session notices through its own heartbeat
        // timeout; the gateway never decides a client's path.
    }
}

impl TunRoute for GatewayRouter {
    fn packets(&self, batch: Vec<Bytes>) {
        let router = self.registry.read();
        let flush = |run: Option<(SessionId, Vec<Bytes>)>| {
            let Some((id, packets)) = run else { return };
            let taken = router
                .get(id)
                .is_some_and(|a| offer(a, ActorKind::Session, FromTunnel(packets)));
            if !taken {
                telemetry::dropped("session_busy");
            }
        };
        let mut run: Option<(SessionId, Vec<Bytes>)> = None;
        for packet in batch {
            let id = match router.route_tunnel_packet(&packet) {
                Ok((id, _)) => id,
                Err(d) => {
                    telemetry::dropped(d.as_str());
                    continue;
                }
            };
            if let Some(r) = run.as_mut().filter(|r| r.0 == id) {
                r.1.push(packet);
                continue;
            }
            flush(run.take());
            run = Some((id, vec![packet]));
        }
        flush(run);
    }
}
