//! The gateway's session actor: one per session, owning the core [`GatewaySession`].
//!
//! Its mailbox is the only way to the session's state: packets from transport readers,
//! packets from the TUN reader, its own deadline timer and operator commands all arrive
//! as messages (a batch per message) and are handled one at a time, so no mutation
//! needs a lock. The actor writes what a batch produces itself, with no further hop:
//! opened packets to the TUN device, sealed ones to the socket of the client's binding
//! as one batch. After each message it reports the session's events, re-arms its single
//! timer at the core's next deadline, and stops once the session has terminated; the
//! supervisor is told either way (see [`SessionStopped`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use jvpn_core::crypto::{plaintext, Keypair};
use jvpn_core::fsm::{State, TerminationCause};
use jvpn_core::gateway::{Endpoint, GatewaySession, Received};
use jvpn_core::ids::{SessionId, StateVersion};
use jvpn_core::reason::ReasonCode;
use jvpn_core::store::SessionStore;
use jvpn_core::wire::SessionHeader;

use crate::runtime::{
    ActorKind, Crash, DeadlineTimer, Handling, RecentTransitions, Reporter, TransitionNote,
};
use crate::supervisor::Registry;
use crate::telemetry;
use crate::too_big::TooBig;
use crate::transport::{Batch, Sent, TransportHandle};
use crate::tun::TunDevice;

/// The transports a session remembers having heard its client on (to answer on the
/// right socket). Bounded: the oldest is forgotten.
pub const PATHS_KEPT: usize = 8;

/// How long a session waits for a reservation it asked for before it asks again.
const RESERVE_AGAIN: std::time::Duration = std::time::Duration::from_secs(1);

/// What every session actor of a node shares.
pub struct SessionEnv {
    /// The session table.
    pub store: Arc<dyn SessionStore>,
    /// The gateway's static key pair (rekeys are answered with it).
    pub keypair: Keypair,
    /// Where events go.
    pub reporter: Reporter,
    /// The tunnel device, written by each session directly.
    pub device: Arc<dyn TunDevice>,
    /// The supervisor, told when a session actor stops.
    pub supervisor: Recipient<SessionStopped>,
    /// The node's router, told when a session's binding moves (packets from elsewhere
    /// are budgeted before they reach the session).
    pub registry: Arc<Registry>,
    /// The cluster, when the node is part of one: each session writes its record to
    /// the cluster's table behind its changes.
    pub cluster: Option<crate::cluster::ClusterLink>,
}

/// Stops forwarding the session without ending it (spec/cluster.md): another node
/// forwards it now (`to`), or this node was fenced. With `write`, its final record is
/// written with `to` as its owner. Reported as a `SessionMoved` event.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct LeaveNode {
    /// The node it goes to.
    pub to: Option<jvpn_core::ids::NodeId>,
    /// session_moved or node_fenced.
    pub reason: ReasonCode,
    /// Whether its final record is written here.
    pub write: bool,
}

/// Datagrams for this session, read in one wakeup of one transport.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Inbound {
    /// The transport they came on (answers go back on it).
    pub via: TransportHandle,
    /// The datagrams with their senders and their clear-text headers, parsed once by the
    /// router (each is opened in place).
    pub datagrams: Vec<(SocketAddr, SessionHeader, BytesMut)>,
}

/// IP packets from the TUN device for this session's client.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct FromTunnel(pub Vec<Bytes>);

/// Ends the session with `cause` (an operator's command, or its client replaced it with
/// a new handshake); the client is told when the cause is an operator's.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct Terminate(pub TerminationCause);

/// A snapshot of a session, for status views.
#[derive(Debug, Clone)]
pub struct SessionStatus {
    /// The session's id.
    pub id: SessionId,
    /// Its state.
    pub state: State,
    /// Mutations so far.
    pub state_version: u64,
    /// The client's tunnel addresses.
    pub tunnel: jvpn_core::wire::TunnelAddrs,
    /// Where the client is reached.
    pub binding: Option<Endpoint>,
    /// The cipher its packets are sealed with, agreed in its handshake.
    pub cipher: jvpn_core::crypto::Cipher,
    /// The latest state changes, oldest first.
    pub recent: Vec<TransitionNote>,
    /// Datagram bytes received for the session (authentic or not) and sent to its client,
    /// since its actor started.
    pub rx_bytes: u64,
    /// See `rx_bytes`.
    pub tx_bytes: u64,
}

/// Asks a session for its [`SessionStatus`].
#[derive(Debug, Message)]
#[rtype(result = "Option<SessionStatus>")]
pub struct GetStatus;

/// A session actor stopped. `unfinished` holds the session if it had not terminated
/// (the actor stopped unexpectedly): the supervisor restarts it or ends it explicitly.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionStopped {
    /// The session's id.
    pub id: SessionId,
    /// The actor that stopped (a report of an actor replaced since is ignored).
    pub addr: Addr<SessionActor>,
    /// The session, if it is still live.
    pub unfinished: Option<Box<GatewaySession>>,
    /// Restarts so far.
    pub restarts: u32,
    /// The client's key (whether a newer handshake of it replaced the session).
    pub client: jvpn_core::crypto::PublicKey,
    /// Why it ended, when it did.
    pub ended_by: Option<TerminationCause>,
    /// The paths it answered on (a restarted actor keeps them).
    pub paths: VecDeque<(Endpoint, TransportHandle)>,
}

/// One session.
pub struct SessionActor {
    id: SessionId,
    session: Option<Box<GatewaySession>>,
    env: Arc<SessionEnv>,
    paths: VecDeque<(Endpoint, TransportHandle)>,
    timer: DeadlineTimer,
    restarts: u32,
    client: jvpn_core::crypto::PublicKey,
    recent: RecentTransitions,
    rx_bytes: u64,
    tx_bytes: u64,
    /// The budget of ICMP answers to packets too large for the binding's path.
    too_big: TooBig,
    /// The version of the binding last published to the router.
    published_binding: StateVersion,
    /// What the record last sent to the cluster's table showed: state version, key
    /// epoch, binding version and reservation.
    synced: Option<(u64, u32, u64, u64)>,
    /// The reservation last asked for, and when (asked again while not granted).
    reserve_asked: Option<(u64, Instant)>,
}

impl SessionActor {
    /// An actor for `session`, whose client was heard on `paths` (most recent first;
    /// `restarts`: how often it was restarted before).
    pub fn new(
        session: Box<GatewaySession>,
        env: Arc<SessionEnv>,
        mut paths: VecDeque<(Endpoint, TransportHandle)>,
        restarts: u32,
    ) -> Self {
        paths.truncate(PATHS_KEPT);
        SessionActor {
            id: session.id(),
            client: session.client(),
            session: Some(session),
            env,
            paths,
            timer: DeadlineTimer::default(),
            restarts,
            recent: RecentTransitions::default(),
            rx_bytes: 0,
            tx_bytes: 0,
            too_big: TooBig::default(),
            published_binding: StateVersion(0),
            synced: None,
            reserve_asked: None,
        }
    }

    /// Writes the session's record to the cluster's table when what it shows changed
    /// (a transition, a rekey, a new binding) or the session's counters are running
    /// out of its reservation (it asks for the next block).
    fn sync(&mut self, ctx: &mut Context<Self>) {
        let (Some(link), Some(session)) = (self.env.cluster.as_ref(), self.session.as_ref()) else {
            return;
        };
        let limit = session.send_limit();
        let wanted = jvpn_core::cluster::reservation_wanted(session.next_send_counter(), limit);
        let shows = (
            session.version().0,
            session.key_epoch(),
            session.bound_at().0,
            limit,
        );
        let now = Instant::now();
        // A reservation not granted within a second (its write refused, or the answer
        // lost) is asked for again.
        let ask = wanted.filter(|&w| {
            self.reserve_asked
                .is_none_or(|(asked, at)| asked != w || now >= at + RESERVE_AGAIN)
        });
        if self.synced == Some(shows) && ask.is_none() {
            return;
        }
        let mut record = match session.export(self.env.reporter.clock(), &link.key) {
            Ok(record) => record,
            Err(e) => {
                eprintln!("jvpn gateway: cannot export session {}: {e}", self.id);
                return;
            }
        };
        self.synced = Some(shows);
        if let Some(until) = wanted {
            record.send_reserved_until = until;
            self.reserve_asked = Some((until, now));
        }
        // Unbounded on purpose: one record per change, and changes are bounded by the
        // policy (the cluster's actor keeps only the newest per session).
        link.node.do_send(crate::cluster::Sync {
            record,
            reserved: wanted.map(|_| (shows.1, ctx.address().recipient())),
        });
    }

    /// Remembers that the client was heard on `via` at `from`; the newest handle wins
    /// (a client's QUIC or TCP connection made again arrives from the same address on a
    /// new connection, and the old one is closed).
    fn heard_on(&mut self, from: Endpoint, via: &TransportHandle) {
        // Most packets come on the path heard last, with the same handle: nothing moves.
        if self
            .paths
            .front()
            .is_some_and(|(e, t)| *e == from && t.same(via))
        {
            return;
        }
        if let Some(i) = self.paths.iter().position(|(e, _)| *e == from) {
            self.paths.remove(i);
        } else if self.paths.len() >= PATHS_KEPT {
            self.paths.pop_back();
        }
        self.paths.push_front((from, via.clone()));
    }

    /// After every message: report events, stop if terminated, re-arm the timer.
    fn settle(&mut self, ctx: &mut Context<Self>) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        while let Some(event) = session.poll_event() {
            self.recent.note(self.env.reporter.clock(), &event);
            self.env.reporter.report(self.id, event);
        }
        if session.state() == State::Terminated {
            ctx.stop();
            return;
        }
        // The version under which the binding was accepted changes with the binding.
        let bound_at = session.bound_at();
        if bound_at != self.published_binding {
            self.published_binding = bound_at;
            self.env.registry.set_binding(self.id, session.binding());
        }
        let next = session.next_deadline();
        self.sync(ctx);
        self.timer.arm(ctx, next, |act, ctx| {
            act.timer.fired();
            if let Some(s) = act.session.as_mut() {
                s.handle_timeout(act.env.store.as_ref(), Instant::now());
            }
            act.settle(ctx);
        });
    }
}

/// The transport the client was heard on at `to`.
fn transport_for(
    paths: &VecDeque<(Endpoint, TransportHandle)>,
    to: Endpoint,
) -> Option<&TransportHandle> {
    paths.iter().find(|(e, _)| *e == to).map(|(_, t)| t)
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.settle(ctx);
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        let session = self.session.take();
        let ended_by = session.as_ref().and_then(|s| s.ended_by());
        let unfinished = session.filter(|s| s.state() != State::Terminated);
        // Unbounded on purpose: one message per session, and sessions are bounded.
        self.env.supervisor.do_send(SessionStopped {
            id: self.id,
            addr: ctx.address(),
            unfinished,
            restarts: self.restarts,
            client: self.client,
            ended_by,
            paths: std::mem::take(&mut self.paths),
        });
    }
}

impl Handler<Inbound> for SessionActor {
    type Result = ();

    fn handle(&mut self, mut msg: Inbound, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Session);
        let env = Arc::clone(&self.env);
        // Which datagrams opened into packets for the device: written together at the
        // end, so that a run of one flow's segments is one write.
        let mut opened = Vec::with_capacity(msg.datagrams.len());
        // One instant for the message: its datagrams came in one read.
        let now = Instant::now();
        for (i, (addr, header, datagram)) in msg.datagrams.iter_mut().enumerate() {
            let Some(session) = self.session.as_mut() else {
                break;
            };
            self.rx_bytes += datagram.len() as u64;
            let from = Endpoint {
                protocol: msg.via.protocol(),
                addr: *addr,
            };
            let received = session.handle_packet(
                env.store.as_ref(),
                &env.keypair,
                env.reporter.clock(),
                from,
                header,
                datagram,
                now,
            );
            match received {
                Received::Reply(bytes) => {
                    self.tx_bytes += bytes.len() as u64;
                    msg.via.send(*addr, bytes);
                }
                Received::ToTunnel(_) => opened.push(i),
                Received::Consumed => {}
                Received::Dropped(d) => {
                    telemetry::dropped(d.as_str());
                    continue;
                }
            }
            // Only an authentic packet teaches the actor a path to answer on.
            self.heard_on(from, &msg.via);
        }
        if !opened.is_empty() {
            let packets: Vec<&[u8]> = opened
                .iter()
                .map(|&i| plaintext(&msg.datagrams[i].2))
                .collect();
            env.device.write_batch(&packets);
        }
        self.settle(ctx);
    }
}

impl Handler<FromTunnel> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: FromTunnel, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Session);
        let now = Instant::now();
        let room = self.session.as_ref().and_then(|s| {
            let to = s.binding()?;
            let via = transport_for(&self.paths, to)?;
            self.too_big.room(via, to.addr, s.path_room(to), now)
        });
        Batch::with_scratch(|batch| {
            let mut to: Option<Endpoint> = None;
            for packet in &msg.0 {
                if let Some(room) = room.filter(|&room| packet.len() > room) {
                    let device = Some(self.env.device.as_ref());
                    self.too_big.drop_and_answer(device, packet, room, now);
                    continue;
                }
                let Some(session) = self.session.as_mut() else {
                    break;
                };
                let store = self.env.store.as_ref();
                // Every packet goes to the binding, which cannot move while this message
                // is handled (only an inbound packet moves it).
                match batch.append(|out| session.seal_data_append(store, packet, now, out)) {
                    Ok(endpoint) => to = Some(endpoint),
                    Err(d) => telemetry::dropped(d.as_str()),
                }
            }
            if let Some((to, via)) = self.send_batch(to, batch) {
                let packets = msg.0.iter().map(|p| &p[..]);
                let device = Some(self.env.device.as_ref());
                self.too_big
                    .refused(&via, to.addr, packets, room, device, now);
            }
        });
        self.settle(ctx);
    }
}

impl SessionActor {
    /// Sends `batch` to `to`, on the transport the client was heard on there; returns
    /// where it went if the kernel refused a datagram of it as too big.
    fn send_batch(
        &mut self,
        to: Option<Endpoint>,
        batch: &Batch,
    ) -> Option<(Endpoint, TransportHandle)> {
        if batch.is_empty() {
            return None;
        }
        match to.and_then(|to| transport_for(&self.paths, to).map(|t| (to, t))) {
            Some((to, t)) => {
                self.tx_bytes += batch.byte_len() as u64;
                let refused = t.send_batch(to.addr, batch) == Sent::TooBig;
                refused.then(|| (to, t.clone()))
            }
            None => {
                telemetry::dropped_n("no_transport", batch.len());
                None
            }
        }
    }
}

impl Handler<Terminate> for SessionActor {
    type Result = bool;

    fn handle(&mut self, msg: Terminate, ctx: &mut Context<Self>) -> bool {
        let Some(session) = self.session.as_mut() else {
            return false;
        };
        if session.state() == State::Terminated {
            return false;
        }
        let now = Instant::now();
        if msg.0 == TerminationCause::Operator {
            if let Some((to, bytes)) = session.seal_terminate(ReasonCode::OperatorTerminated, now) {
                if let Some(t) = transport_for(&self.paths, to) {
                    t.send(to.addr, bytes);
                }
            }
        }
        session.terminate(self.env.store.as_ref(), msg.0, now);
        self.settle(ctx);
        true
    }
}

impl Handler<GetStatus> for SessionActor {
    type Result = Option<SessionStatus>;

    fn handle(&mut self, _: GetStatus, _ctx: &mut Context<Self>) -> Option<SessionStatus> {
        let s = self.session.as_ref()?;
        Some(SessionStatus {
            id: s.id(),
            state: s.state(),
            state_version: s.version().0,
            tunnel: s.tunnel(),
            binding: s.binding(),
            cipher: s.cipher(),
            recent: self.recent.to_vec(),
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
        })
    }
}

impl Handler<crate::cluster::Reserved> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: crate::cluster::Reserved, ctx: &mut Context<Self>) {
        if let Some(session) = self.session.as_mut() {
            if session.key_epoch() == msg.epoch && msg.until > session.send_limit() {
                session.reserve_until(msg.until);
            }
        }
        self.settle(ctx);
    }
}

impl Handler<LeaveNode> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: LeaveNode, ctx: &mut Context<Self>) {
        let Some(session) = self.session.take() else {
            return;
        };
        let node = self.env.reporter.node().clone();
        if let Some(link) = self.env.cluster.as_ref().filter(|_| msg.write) {
            match (
                session.export(self.env.reporter.clock(), &link.key),
                msg.to.clone(),
            ) {
                // Asked for by `to`: the final record names it.
                (Ok(mut record), Some(to)) => {
                    record.owner = to;
                    record.handover_to = None;
                    link.node.do_send(crate::cluster::HandedOver(record));
                }
                // Handed off as the node stops: the final record, for whichever node
                // the client reaches once this one's lease is given up.
                (Ok(record), None) => link.node.do_send(crate::cluster::Sync {
                    record,
                    reserved: None,
                }),
                (Err(e), _) => eprintln!("jvpn gateway: cannot export session {}: {e}", self.id),
            }
        }
        if msg.reason != ReasonCode::NodeFenced {
            telemetry::cluster_move("out");
        }
        self.env.reporter.report(
            self.id,
            jvpn_core::event::SessionEvent {
                at: Instant::now(),
                body: jvpn_core::event::EventBody::SessionMoved {
                    from_node: node,
                    to_node: msg.to,
                    reason_code: msg.reason,
                },
            },
        );
        // The keys go with the session, here; the actor stops with nothing to end.
        drop(session);
        ctx.stop();
    }
}

impl Handler<Crash> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Crash, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
