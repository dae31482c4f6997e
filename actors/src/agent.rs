//! The client agent: the client's session (the core [`Client`]) in one actor, with one
//! transport actor per configured candidate.
//!
//! The core decides everything — heartbeats on the active transport, slower probes on
//! the standby candidates, the jump (VOLATILE → RECOVERING → reattach on the best
//! candidate → ATTACHED) within policy; the agent carries datagrams, path signals,
//! tunnel packets and its one deadline timer to it, and publishes what it is doing on a
//! [`watch`] channel ([`AgentStatus`]).
//!
//! The readers (one per candidate socket) run on the agent's own arbiter: a hop to
//! another thread would add a wakeup to every packet's latency and, measured, bought no
//! throughput. The agent reads the TUN device itself, a stream of its own context: a
//! packet leaving through the tunnel takes no mailbox hop, and the device is read only
//! as fast as the agent seals (what it cannot take waits in the kernel's queue). The
//! agent writes itself, with no further hop: sealed batches to the active candidate's
//! socket, opened packets to the device.

use std::net::SocketAddr;
use std::sync::Arc;

use jvpn_core::policy::Policy;
use std::time::Instant;

use actix::prelude::*;
use jvpn_core::client::{Client, ClientReceived};
use jvpn_core::crypto::plaintext;
use jvpn_core::event::{EventBody, SessionEvent};
use jvpn_core::fsm::State;
use jvpn_core::ids::{SessionId, TransportId};
use jvpn_core::reason::ReasonCode;
use jvpn_core::wire::TunnelAddrs;
use tokio::sync::watch;

use crate::conn::{ConnCandidate, ConnTransport};
use crate::runtime::{
    offer, ActorKind, Close, Crash, DeadlineTimer, Handling, RecentTransitions, Reporter,
    TransitionNote,
};
use crate::telemetry;
use crate::too_big::TooBig;
use crate::transport::{
    Batch, Deliver, Incoming, PreparedUdp, Sent, Signal, TransportHandle, UdpTransport,
};
use crate::tun::{self, TunDevice, TunRead};

/// What the agent does when its session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSessionEnd {
    /// Stop: the session's end is final (the caller reports it and exits).
    Stop,
    /// Start a new session with a new handshake (a new session id, reported in events).
    Reconnect,
}

/// What the agent is doing, published after every message that changes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// The session's state (BIRTH while handshaking).
    pub state: State,
    /// The current session, once established.
    pub session_id: Option<SessionId>,
    /// Its tunnel addresses.
    pub tunnel: Option<TunnelAddrs>,
    /// The cipher sealing its packets.
    pub cipher: Option<jvpn_core::crypto::Cipher>,
    /// The transport in use.
    pub active: Option<TransportId>,
    /// The largest tunnel packet the active transport's path carries, when its size
    /// probes found it narrower than the tunnel makes (`jvpn_core::pmtu`).
    pub path_room: Option<usize>,
    /// Sessions established so far (a reconnect makes it 2, ...).
    pub sessions: u32,
    /// Why the last session ended, if one did.
    pub last_end: Option<ReasonCode>,
    /// How long the last reattach took (entering RECOVERING to ATTACHED again).
    pub last_reattach: Option<std::time::Duration>,
    /// Whether the agent has stopped.
    pub stopped: bool,
}

/// Datagrams from one candidate transport.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct AgentInbound {
    via: TransportId,
    datagrams: Vec<Incoming>,
}

/// A path signal from one candidate transport.
#[derive(Debug, Message)]
#[rtype(result = "()")]
struct AgentSignal {
    via: TransportId,
    signal: Signal,
}

/// Ends the session on the user's command (operator_terminated, the gateway told) and
/// stops the agent.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Ends the session named on the user's command (operator_terminated, the gateway told);
/// the agent then does what its [`OnSessionEnd`] says, as for any other end. Returns
/// whether that session was the live one.
#[derive(Debug, Message)]
#[rtype(result = "bool")]
pub struct EndSession(pub SessionId);

/// Gives the agent its tunnel device (the client creates it once the gateway has
/// assigned the tunnel address): tunnel packets flow from then on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct UseDevice(pub Arc<dyn TunDevice>);

/// Asks the agent for a full view of what it is doing ([`AgentView`]).
#[derive(Debug, Message)]
#[rtype(result = "AgentView")]
pub struct Describe;

/// One candidate transport, as status views show it.
#[derive(Debug, Clone)]
pub struct CandidateView {
    /// Its id.
    pub id: TransportId,
    /// The gateway address it reaches.
    pub gateway: SocketAddr,
    /// Whether the session is bound to it.
    pub active: bool,
    /// Its health as the core measures it (`None` before the session exists).
    pub health: Option<jvpn_core::health::HealthSnapshot>,
    /// The largest tunnel packet its path carries, when its size probes found it
    /// narrower than the tunnel makes (standby paths are searched too).
    pub path_room: Option<usize>,
}

/// Everything `jvpn status` shows of a client.
#[derive(Debug, Clone)]
pub struct AgentView {
    /// The published status.
    pub status: AgentStatus,
    /// The session's state version.
    pub state_version: u64,
    /// The candidates, in configuration order.
    pub candidates: Vec<CandidateView>,
    /// The latest state changes, oldest first.
    pub recent: Vec<TransitionNote>,
    /// Datagram bytes received and sent on all candidates.
    pub rx_bytes: u64,
    /// See `rx_bytes`.
    pub tx_bytes: u64,
}

/// A candidate transport: its id in the client's numbering, its socket (connected to
/// the gateway address it reaches) and that address.
pub struct Candidate {
    /// The id (as in the client configuration's transport list).
    pub id: TransportId,
    /// How it reaches the gateway.
    pub path: CandidatePath,
    /// The gateway address this candidate reaches.
    pub gateway: SocketAddr,
    /// The name `gateway` was resolved from, and the port, if it was given as one: it is
    /// resolved again when every candidate of that name has failed.
    pub name: Option<(String, u16)>,
}

/// How often a name is resolved again, at most.
pub const RESOLVE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// A gateway name and the candidates that reach it.
struct Named {
    host: String,
    port: u16,
    transports: Vec<TransportId>,
    last: Option<Instant>,
    in_flight: bool,
}

/// A name resolved (off the agent's thread).
#[derive(Message)]
#[rtype(result = "()")]
struct Resolved {
    host: String,
    port: u16,
    addrs: Vec<SocketAddr>,
}

/// How a candidate reaches the gateway.
pub enum CandidatePath {
    /// A UDP socket connected to the gateway.
    Udp(std::net::UdpSocket),
    /// A QUIC or TCP+TLS connection, kept established ([`ConnTransport`]).
    Conn(ConnCandidate),
}

/// A candidate's transport actor.
#[derive(Clone)]
pub enum TransportActor {
    /// A UDP socket's reader.
    Udp(Addr<UdpTransport>),
    /// A connection's keeper.
    Conn(Addr<ConnTransport>),
}

impl TransportActor {
    /// Asks it to stop: it sends what it holds and ends.
    pub fn close(&self) {
        match self {
            TransportActor::Udp(a) => a.do_send(Close),
            TransportActor::Conn(a) => a.do_send(Close),
        }
    }

    /// Makes it fail, as a bug would (fault injection).
    pub fn crash(&self) {
        match self {
            TransportActor::Udp(a) => a.do_send(Crash),
            TransportActor::Conn(a) => a.do_send(Crash),
        }
    }

    /// Whether it still runs, without keeping it alive: `alive()` of the result.
    pub fn downgrade(&self) -> impl Fn() -> bool {
        let weak = match self {
            TransportActor::Udp(a) => (Some(a.downgrade()), None),
            TransportActor::Conn(a) => (None, Some(a.downgrade())),
        };
        move || match &weak {
            (Some(w), _) => w.upgrade().is_some(),
            (_, Some(w)) => w.upgrade().is_some(),
            _ => false,
        }
    }
}

/// The client agent.
pub struct ClientAgent {
    client: Client,
    on_end: OnSessionEnd,
    transports: Vec<(TransportId, SocketAddr, TransportActor, TransportHandle)>,
    device: Option<Arc<dyn TunDevice>>,
    /// The reading of `device` (a stream of this actor's context).
    tun_reading: Option<SpawnHandle>,
    /// Path signals from the agent's own sends, applied after the message that made them.
    signals: Vec<(TransportId, Signal)>,
    reporter: Reporter,
    status: watch::Sender<AgentStatus>,
    timer: DeadlineTimer,
    /// Index (into `transports`) of the candidate the next handshake goes out on.
    next_connect: usize,
    /// The gateway names among the candidates.
    names: Vec<Named>,
    reported_session: Option<SessionId>,
    sessions: u32,
    last_end: Option<ReasonCode>,
    stopping: bool,
    recovering_since: Option<Instant>,
    last_reattach: Option<std::time::Duration>,
    recent: RecentTransitions,
    rx_bytes: u64,
    tx_bytes: u64,
    /// The budget of ICMP answers to packets too large for the active path.
    too_big: TooBig,
}

struct ToAgent {
    agent: Addr<ClientAgent>,
    id: TransportId,
}

impl Deliver for ToAgent {
    fn datagrams(&self, _via: &TransportHandle, datagrams: Vec<Incoming>) {
        let msg = AgentInbound {
            via: self.id,
            datagrams,
        };
        if !offer(&self.agent, ActorKind::Session, msg) {
            telemetry::dropped("session_busy");
        }
    }

    fn signal(&self, _via: &TransportHandle, signal: Signal) {
        // Signals are rare and must not be lost to a full mailbox.
        self.agent.do_send(AgentSignal {
            via: self.id,
            signal,
        });
    }
}

/// What the agent was started with.
pub struct AgentHandles {
    /// The agent.
    pub agent: Addr<ClientAgent>,
    /// Its status, checked after every message; receivers are woken when it changes.
    pub status: watch::Receiver<AgentStatus>,
    /// The candidate transports' actors, by id (for fault injection and shutdown).
    pub transports: Vec<(TransportId, TransportActor)>,
}

impl ClientAgent {
    /// Starts the agent, its transports (one supervised reader per candidate) and, given
    /// a device, its reading of it. Must run inside an actix system. Refuses more candidates
    /// than the policy's `transport.max_candidate_count`, and none at all.
    pub fn start(
        client: Client,
        candidates: Vec<Candidate>,
        device: Option<Arc<dyn TunDevice>>,
        reporter: Reporter,
        on_end: OnSessionEnd,
        mailbox: usize,
    ) -> std::io::Result<AgentHandles> {
        let allowed = client.policy().max_candidate_count();
        if candidates.is_empty() || candidates.len() > allowed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} candidate transports configured; transport.max_candidate_count allows 1 to {allowed}",
                    candidates.len()
                ),
            ));
        }
        let (status_tx, status) = watch::channel(AgentStatus {
            state: State::Birth,
            session_id: None,
            tunnel: None,
            cipher: None,
            active: None,
            path_room: None,
            sessions: 0,
            last_end: None,
            last_reattach: None,
            stopped: false,
        });
        // The agent's address exists before the agent runs, so every fallible step (each
        // socket's preparation) is done before any actor starts: a failure leaves nothing
        // running.
        let mut ctx = Context::<ClientAgent>::new();
        ctx.set_mailbox_capacity(mailbox);
        let me = ctx.address();
        enum Prepared {
            Udp(PreparedUdp),
            Conn(ConnTransport),
        }
        let mut prepared = Vec::with_capacity(candidates.len());
        let mut names: Vec<Named> = Vec::new();
        for Candidate {
            id,
            path,
            gateway,
            name,
        } in candidates
        {
            if let Some((host, port)) = name {
                match names.iter_mut().find(|n| n.host == host && n.port == port) {
                    Some(n) => n.transports.push(id),
                    None => names.push(Named {
                        host,
                        port,
                        transports: vec![id],
                        last: None,
                        in_flight: false,
                    }),
                }
            }
            let deliver: Arc<dyn Deliver> = Arc::new(ToAgent {
                agent: me.clone(),
                id,
            });
            let ready = match path {
                CandidatePath::Udp(socket) => Prepared::Udp(PreparedUdp::new(socket, 0)?),
                CandidatePath::Conn(c) => Prepared::Conn(
                    ConnTransport::new(c, Arc::clone(&deliver))
                        .map_err(|e| std::io::Error::other(e.to_string()))?,
                ),
            };
            prepared.push((id, gateway, ready, deliver));
        }
        let mut transports = Vec::with_capacity(prepared.len());
        let mut actors = Vec::with_capacity(prepared.len());
        for (id, gateway, ready, deliver) in prepared {
            let (actor, handle) = match ready {
                Prepared::Udp(t) => {
                    let handle = t.handle();
                    (TransportActor::Udp(t.start(deliver)), handle)
                }
                Prepared::Conn(t) => {
                    let handle = t.handle();
                    (TransportActor::Conn(t.start()), handle)
                }
            };
            actors.push((id, actor.clone()));
            transports.push((id, gateway, actor, handle));
        }
        let agent = ctx.run(ClientAgent {
            client,
            on_end,
            transports,
            device,
            tun_reading: None,
            signals: Vec::new(),
            reporter,
            status: status_tx,
            timer: DeadlineTimer::default(),
            next_connect: 0,
            names,
            reported_session: None,
            sessions: 0,
            last_end: None,
            stopping: false,
            recovering_since: None,
            last_reattach: None,
            recent: RecentTransitions::default(),
            rx_bytes: 0,
            tx_bytes: 0,
            too_big: TooBig::default(),
        });
        Ok(AgentHandles {
            agent,
            status,
            transports: actors,
        })
    }

    fn transport(
        &self,
        id: TransportId,
    ) -> Option<&(TransportId, SocketAddr, TransportActor, TransportHandle)> {
        self.transports.iter().find(|t| t.0 == id)
    }

    fn send(&mut self, via: TransportId, bytes: &[u8]) {
        let sent = match self.transport(via) {
            Some((_, gateway, _, handle)) => handle.send(*gateway, bytes),
            None => {
                telemetry::dropped("no_transport");
                return;
            }
        };
        self.tx_bytes += bytes.len() as u64;
        self.sent(via, sent);
    }

    /// Sends `batch` on `via`; returns how it went.
    fn send_batch(&mut self, via: TransportId, batch: &Batch) -> Sent {
        let sent = match self.transport(via) {
            Some((_, gateway, _, handle)) => handle.send_batch(*gateway, batch),
            None => {
                telemetry::dropped_n("no_transport", batch.len());
                return Sent::Ok;
            }
        };
        self.tx_bytes += batch.byte_len() as u64;
        self.sent(via, sent);
        sent
    }

    /// Keeps the path signal a send carried, for after the message being handled.
    fn sent(&mut self, via: TransportId, sent: Sent) {
        if let Some(signal) = sent.signal() {
            self.signals.push((via, signal));
        }
    }

    /// Sends a handshake on the next candidate in turn.
    fn connect(&mut self, now: Instant) {
        self.connect_on(None, now);
    }

    /// Sends a handshake on `on`, or on the next candidate in turn.
    fn connect_on(&mut self, on: Option<TransportId>, now: Instant) {
        if self.transports.is_empty() {
            return;
        }
        // After a cookie, the transport it came on (the cookie proves its address only);
        // else the candidates in turn.
        let via = match on.or(self.client.retry_via()) {
            Some(via) => via,
            None => {
                let via = self.transports[self.next_connect % self.transports.len()].0;
                self.next_connect = self.next_connect.wrapping_add(1);
                via
            }
        };
        let sent = self
            .client
            .connect(via, now)
            .map(|t| (t.via, t.bytes.to_vec()));
        match sent {
            Ok((via, bytes)) => self.send(via, &bytes),
            Err(_) => telemetry::dropped("handshake_not_built"),
        }
    }

    /// Reads `device` from now on (its only queue), instead of the device read before.
    fn read_device(&mut self, device: Arc<dyn TunDevice>, ctx: &mut Context<Self>) {
        if let Some(old) = self.tun_reading.take() {
            ctx.cancel_future(old);
        }
        self.tun_reading = Some(ctx.add_stream(tun::reads(device, 0)));
    }

    fn report(&self, session: SessionId, event: SessionEvent) {
        self.reporter.report(session, event);
    }

    fn status(&self) -> AgentStatus {
        let active = self.client.active_transport();
        AgentStatus {
            state: self.client.state(),
            session_id: self.client.session_id(),
            tunnel: self.client.tunnel(),
            cipher: self.client.cipher(),
            active,
            path_room: active.and_then(|id| self.client.path_room(id)),
            sessions: self.sessions,
            last_end: self.last_end,
            last_reattach: self.last_reattach,
            stopped: self.stopping,
        }
    }

    /// Reattach latency: from entering RECOVERING to leaving it attached.
    fn time_recovery(&mut self, event: &SessionEvent) {
        if let EventBody::SessionStateChange {
            previous_state,
            new_state,
            ..
        } = &event.body
        {
            match (previous_state, new_state) {
                (_, State::Recovering) => self.recovering_since = Some(event.at),
                (State::Recovering, State::Attached) => {
                    if let Some(since) = self.recovering_since.take() {
                        let took = event.at.saturating_duration_since(since);
                        telemetry::reattach_latency(took);
                        self.last_reattach = Some(took);
                    }
                }
                (State::Recovering, _) => self.recovering_since = None,
                _ => {}
            }
        }
    }

    /// Resolves again, off this thread, each gateway name whose every candidate has
    /// failed (dead, or silent past the heartbeat limit; before the first session: a
    /// handshake gone unanswered), at most every [`RESOLVE_EVERY`].
    fn reresolve(&mut self, ctx: &mut Context<Self>, now: Instant) {
        if self.names.is_empty() {
            return;
        }
        let silent = self.client.policy().heartbeat_volatile();
        let health = self
            .client
            .control()
            .map(|c| c.transports(now))
            .unwrap_or_default();
        let waiting = self.client.session_id().is_none() && self.client.handshake_timed_out(now);
        for named in &mut self.names {
            let failed = |id: &TransportId| {
                health
                    .iter()
                    .find(|(t, _)| t.id == *id)
                    .is_some_and(|(_, h)| h.dead || h.heartbeat_age > silent)
            };
            let all_failed = if health.is_empty() {
                waiting
            } else {
                named.transports.iter().all(failed)
            };
            let due = named
                .last
                .is_none_or(|at| now.saturating_duration_since(at) >= RESOLVE_EVERY);
            if !all_failed || !due || named.in_flight {
                continue;
            }
            named.last = Some(now);
            named.in_flight = true;
            let (host, port, me) = (named.host.clone(), named.port, ctx.address());
            // getaddrinfo blocks: a thread of its own, bounded by the one in flight per
            // name.
            let spawned = std::thread::Builder::new()
                .name("jvpn-resolve".into())
                .spawn(move || {
                    use std::net::ToSocketAddrs;
                    let addrs = (host.as_str(), port)
                        .to_socket_addrs()
                        .map(Iterator::collect)
                        .unwrap_or_default();
                    me.do_send(Resolved { host, port, addrs });
                });
            if spawned.is_err() {
                named.in_flight = false;
            }
        }
    }

    /// After every message: send what the core wants sent, report events, handle the
    /// session's end, publish the status, re-arm the timer.
    fn settle(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        self.reresolve(ctx, now);
        if self.client.handshake_timed_out(now) && !self.stopping {
            self.connect(now);
        }
        while let Some(t) = self.client.poll_transmit(now) {
            let (via, bytes) = (t.via, t.bytes.to_vec());
            self.send(via, &bytes);
        }
        if let Some(id) = self.client.session_id() {
            if self.reported_session != Some(id) {
                self.reported_session = Some(id);
                self.sessions += 1;
            }
        }
        let session = self.reported_session.unwrap_or(SessionId(0));
        while let Some(event) = self.client.poll_event() {
            self.time_recovery(&event);
            self.recent.note(self.reporter.clock(), &event);
            self.report(session, event);
        }
        if let Some(reason) = self.client.ended() {
            self.last_end = Some(reason);
            if self.on_end == OnSessionEnd::Reconnect && !self.stopping {
                self.connect(now);
            } else {
                self.stopping = true;
            }
        }
        // Receivers are woken only by a change: a packet that changes nothing costs no
        // wakeup of the task watching the status.
        let status = self.status();
        self.status.send_if_modified(|published| {
            let changed = *published != status;
            if changed {
                *published = status;
            }
            changed
        });
        if self.stopping {
            ctx.stop();
            return;
        }
        for (via, signal) in std::mem::take(&mut self.signals) {
            // Handled next, like a signal a reader reports.
            ctx.notify(AgentSignal { via, signal });
        }
        let next = self.client.next_deadline();
        self.timer.arm(ctx, next, |act, ctx| {
            act.timer.fired();
            act.client.handle_timeout(Instant::now());
            act.settle(ctx);
        });
    }
}

impl Actor for ClientAgent {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(device) = self.device.clone() {
            self.read_device(device, ctx);
        }
        self.connect(Instant::now());
        self.settle(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.status.send_modify(|s| s.stopped = true);
        // The device goes when its last holders do: this write handle, here, and the
        // reading, when this actor's context is dropped, just after.
        self.device = None;
        // Close the transports: they stop reading and end once their last address (held
        // here and by the caller's handles) is gone. Unbounded sends on purpose: one
        // lifecycle message per actor, and their number is bounded.
        for (_, _, actor, _) in self.transports.drain(..) {
            actor.close();
        }
    }
}

impl Handler<AgentInbound> for ClientAgent {
    type Result = ();

    fn handle(&mut self, mut msg: AgentInbound, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Session);
        let now = Instant::now();
        // Which datagrams opened into packets for the device: written together at the
        // end, so that a run of one flow's segments is one write.
        let mut opened = Vec::with_capacity(msg.datagrams.len());
        for (i, (_, datagram)) in msg.datagrams.iter_mut().enumerate() {
            self.rx_bytes += datagram.len() as u64;
            match self.client.handle_datagram_in_place(msg.via, datagram, now) {
                ClientReceived::ToTunnel(_) => opened.push(i),
                ClientReceived::Consumed => {}
                // Unauthenticated: anyone could send it, so it ends nothing by itself.
                // A gateway that really lost the session stops answering, and the
                // session ends at its transport-lost TTL, explicitly.
                ClientReceived::SessionUnknown => telemetry::dropped("session_unknown"),
                ClientReceived::Dropped(_) => telemetry::dropped("client_drop"),
            }
        }
        if !opened.is_empty() {
            match &self.device {
                Some(device) => {
                    let packets: Vec<&[u8]> = opened
                        .iter()
                        .map(|&i| plaintext(&msg.datagrams[i].1))
                        .collect();
                    device.write_batch(&packets);
                }
                None => telemetry::dropped_n("no_device", opened.len()),
            }
        }
        self.settle(ctx);
    }
}

impl Handler<AgentSignal> for ClientAgent {
    type Result = ();

    fn handle(&mut self, msg: AgentSignal, ctx: &mut Context<Self>) {
        let up = matches!(msg.signal, Signal::Recovered | Signal::Connected);
        let now = Instant::now();
        self.client.transport_status(msg.via, up, now);
        // A connection came up while the client's handshake waits on it: that handshake
        // went nowhere (there was no connection yet); send it again now rather than at
        // the retry. A handshake pending on another transport is left alone.
        if msg.signal == Signal::Connected
            && self.client.handshake_via() == Some(msg.via)
            && !self.stopping
        {
            self.connect_on(Some(msg.via), now);
        }
        self.settle(ctx);
    }
}

impl StreamHandler<TunRead> for ClientAgent {
    /// Packets the device read, leaving through the tunnel: sealed into one batch and sent
    /// on the active transport.
    fn handle(&mut self, read: TunRead, ctx: &mut Context<Self>) {
        let Some(packets) = read.packets() else {
            return;
        };
        let now = Instant::now();
        let room = self.client.active_transport().and_then(|id| {
            let (_, gateway, _, handle) = self.transport(id)?;
            let probed = self.client.path_room(id);
            self.too_big.room(handle, *gateway, probed, now)
        });
        Batch::with_scratch(|batch| {
            // Every packet goes to the active transport, which cannot change while this
            // read is handled.
            let mut via = None;
            for packet in &packets {
                if let Some(room) = room.filter(|&room| packet.len() > room) {
                    let device = self.device.as_deref();
                    self.too_big.drop_and_answer(device, packet, room, now);
                    continue;
                }
                match batch.append(|out| self.client.seal_data_append(packet, now, out)) {
                    Ok(v) => via = Some(v),
                    Err(_) => telemetry::dropped("no_session"),
                }
            }
            if let Some(via) = via {
                let refused = self.send_batch(via, batch) == Sent::TooBig;
                let path = refused
                    .then(|| self.transport(via).map(|(_, g, _, h)| (*g, h.clone())))
                    .flatten();
                if let Some((gateway, handle)) = path {
                    let device = self.device.as_deref();
                    let packets = packets.iter().map(|p| &p[..]);
                    self.too_big
                        .refused(&handle, gateway, packets, room, device, now);
                }
            }
        });
        self.settle(ctx);
    }

    /// The device is gone (closed by its owner): the agent goes on (a new device may come
    /// with [`UseDevice`]) instead of stopping, as a finished stream would have it.
    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl Handler<Resolved> for ClientAgent {
    type Result = ();

    /// Each candidate of the name moves to its new address (the first of its family),
    /// and is reported up, so that the core may reattach there.
    fn handle(&mut self, msg: Resolved, ctx: &mut Context<Self>) {
        let Some(named) = self
            .names
            .iter_mut()
            .find(|n| n.host == msg.host && n.port == msg.port)
        else {
            return;
        };
        named.in_flight = false;
        let ids = named.transports.clone();
        let now = Instant::now();
        for (id, gateway, _, handle) in &mut self.transports {
            if !ids.contains(id) {
                continue;
            }
            let Some(new) = msg
                .addrs
                .iter()
                .find(|a| a.is_ipv4() == gateway.is_ipv4())
                .copied()
            else {
                continue;
            };
            if new == *gateway {
                continue;
            }
            // A socket that cannot be pointed there keeps its address (and stays failed).
            if handle.retarget(new).is_ok() {
                *gateway = new;
                self.client.transport_status(*id, true, now);
            }
        }
        self.settle(ctx);
    }
}

impl Handler<Shutdown> for ClientAgent {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        self.stopping = true;
        self.end_session(ctx);
    }
}

/// Put a reloaded policy in force, for the live session too (see
/// `Client::apply_policy`); the answer says why not when it does not fit.
#[derive(Message)]
#[rtype(result = "Result<bool, String>")]
pub struct ApplyPolicy(pub Arc<Policy>);

impl Handler<ApplyPolicy> for ClientAgent {
    /// Whether a live session took it.
    type Result = Result<bool, String>;

    fn handle(&mut self, msg: ApplyPolicy, ctx: &mut Context<Self>) -> Self::Result {
        let version = msg.0.version().to_string();
        let live = self
            .client
            .apply_policy(msg.0, Instant::now())
            .map_err(|e| e.to_string())?;
        self.reporter.set_policy_version(version);
        self.settle(ctx);
        Ok(live)
    }
}

impl Handler<EndSession> for ClientAgent {
    type Result = bool;

    fn handle(&mut self, msg: EndSession, ctx: &mut Context<Self>) -> bool {
        if self.client.session_id() != Some(msg.0) || self.client.ended().is_some() {
            return false;
        }
        self.end_session(ctx);
        true
    }
}

impl ClientAgent {
    /// Ends the session on the user's command (operator_terminated), telling the gateway;
    /// what follows is [`ClientAgent::settle`]'s: stop, or reconnect as configured.
    fn end_session(&mut self, ctx: &mut Context<Self>) {
        let notice = self
            .client
            .terminate(Instant::now())
            .map(|t| (t.via, t.bytes.to_vec()));
        if let Some((via, bytes)) = notice {
            self.send(via, &bytes);
        }
        self.settle(ctx);
    }
}

impl Handler<UseDevice> for ClientAgent {
    type Result = ();

    fn handle(&mut self, msg: UseDevice, ctx: &mut Context<Self>) {
        self.read_device(Arc::clone(&msg.0), ctx);
        self.device = Some(msg.0);
    }
}

impl Handler<Describe> for ClientAgent {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _: Describe, _ctx: &mut Context<Self>) -> MessageResult<Describe> {
        let now = Instant::now();
        let control = self.client.control();
        let health = control.map(|c| c.transports(now)).unwrap_or_default();
        let active = control.and_then(|c| c.active()).map(|t| t.id);
        let candidates = self
            .transports
            .iter()
            .map(|(id, gateway, _, _)| CandidateView {
                id: *id,
                gateway: *gateway,
                active: active == Some(*id),
                health: health.iter().find(|(t, _)| t.id == *id).map(|(_, h)| *h),
                path_room: self.client.path_room(*id),
            })
            .collect();
        MessageResult(AgentView {
            status: self.status(),
            state_version: control.map(|c| c.version().0).unwrap_or(0),
            candidates,
            recent: self.recent.to_vec(),
            rx_bytes: self.rx_bytes,
            tx_bytes: self.tx_bytes,
        })
    }
}

impl Handler<Crash> for ClientAgent {
    type Result = ();

    fn handle(&mut self, _: Crash, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
