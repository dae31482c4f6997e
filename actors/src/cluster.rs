//! A gateway node's part in a cluster (spec/cluster.md): the actor that holds the node's
//! lease in the shared session table (etcd), keeps the node's copy of the table
//! ([`ClusterView`], fed by a watch), writes the records of the sessions the node owns
//! (created before the handshake is answered, then after every change, behind the
//! session), answers probes of other nodes' sessions as a standby, asks for and claims
//! sessions whose clients reattach here, hands sessions over when another node asks,
//! fences the node when its lease cannot be renewed, and ends orphaned sessions by their
//! TTL once their owner is gone.
//!
//! Nothing here is on the packet path of a session the node forwards: the store is
//! asked only on handshakes, state changes, moves and timers, never per packet.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::BytesMut;
use jvpn_cluster::{Change, EtcdOptions, EtcdTable, TableError};
use jvpn_core::cluster::{
    orphan_end, standby_probe_ack, ClusterKey, ClusterRecord, ClusterView, LeaseHold, Notice,
    SessionSecrets, Unknown, COUNTER_BLOCK,
};
use jvpn_core::event::{EventBody, SessionEvent};
use jvpn_core::fsm::State;
use jvpn_core::ids::{NodeId, SessionId, StateVersion};
use jvpn_core::reason::ReasonCode;
use jvpn_core::wire::SessionHeader;

use crate::runtime::{ActorKind, Handling, Reporter};
use crate::supervisor::NodeSupervisor;
use crate::telemetry;
use crate::transport::TransportHandle;

/// How a node takes part in a cluster.
#[derive(Clone)]
pub struct ClusterSettings {
    /// How to reach the table.
    pub store: EtcdOptions,
    /// The key session keys are sealed under in the table.
    pub key: Arc<ClusterKey>,
    /// The node's lease in the table.
    pub lease_ttl: Duration,
    /// No renewal for this long: the node fences itself (shorter than the TTL by at
    /// least [`jvpn_core::cluster::FENCE_MARGIN`]).
    pub fence_after: Duration,
    /// The policy's transport-lost TTL (orphaned sessions end by it).
    pub transport_lost_ttl: Duration,
    /// Records the node's copy of the table holds at most.
    pub view_capacity: usize,
}

/// What the rest of the node needs of the cluster: the actor, its key, and the copy of
/// the table the packet readers consult for sessions the node does not have.
#[derive(Clone)]
pub struct ClusterLink {
    /// The actor.
    pub node: Addr<ClusterNode>,
    /// The cluster key.
    pub key: Arc<ClusterKey>,
    /// The node's copy of the table (written only by the actor).
    pub view: Arc<RwLock<ClusterView>>,
}

impl ClusterLink {
    /// What to do with a packet of a session the node does not have.
    pub fn unknown(&self, header: &SessionHeader) -> Unknown {
        self.view
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .unknown(header.session_id, header.ptype)
    }
}

/// How often the actor looks at its lease, the live nodes, pending writes and orphans.
const TICK: Duration = Duration::from_millis(250);
/// How often the live nodes are listed.
const LIVE_EVERY: Duration = Duration::from_secs(1);
/// How long a reattach waits here for its session's owner to hand it over.
const HANDOVER_WAIT: Duration = Duration::from_secs(3);
/// Reattaches waiting for a handover, at most.
const PENDING_MAX: usize = 1_024;
/// Standby answers per session and second, at most.
const STANDBY_PER_SECOND: u32 = 20;
/// Sessions whose standby answers are counted at once, at most (then the count resets).
const STANDBY_TRACKED: usize = 4_096;

/// A session's record is to be created (a new handshake): answered once it is in the
/// table, or with why not (`store_unavailable`: no lease or no store; the handshake is
/// not answered and the client tries again).
#[derive(Message)]
#[rtype(result = "Result<(), ReasonCode>")]
pub struct Create(pub ClusterRecord);

/// A session the node owns changed: its record is written behind it (the newest wins;
/// one write per session at a time). When `reserved` is given, the record asks for
/// more counters, and the session is told once the table holds them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sync {
    /// The record as the session exported it.
    pub record: ClusterRecord,
    /// Told the new reservation once written, for the keys of this epoch.
    pub reserved: Option<ReservedTo>,
}

/// Who is told of a reservation, for the keys of which epoch.
pub type ReservedTo = (u32, Recipient<Reserved>);

/// The table holds this reservation for the session's keys of `epoch`: it may send
/// below `until`.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Reserved {
    /// The key epoch.
    pub epoch: u32,
    /// The first counter it may not send with.
    pub until: u64,
}

/// A session of this node ended here: its record goes.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Released(pub SessionId);

/// A session this node forwarded stopped here for another node: its final record
/// (owner: the node it goes to) is written.
#[derive(Message)]
#[rtype(result = "()")]
pub struct HandedOver(pub ClusterRecord);

/// A packet of a session this node does not have, which its copy of the table says is
/// another node's (or was this node's before it restarted or was fenced).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unclaimed {
    /// What the copy of the table said.
    pub decision: Unknown,
    /// The transport it came on.
    pub via: TransportHandle,
    /// Its sender.
    pub from: SocketAddr,
    /// Its clear-text header.
    pub header: SessionHeader,
    /// The datagram.
    pub datagram: BytesMut,
}

/// The supervisor is asked to take a session over: its client's reattach request came
/// here, and the owner is gone or handed it over. The supervisor checks the request,
/// claims the record ([`Claim`]) and starts the session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct TakeOver {
    /// The node that forwarded the session before (the record's owner when the client's
    /// request came: a node that hands a session over writes this one as the owner).
    pub previous: NodeId,
    /// The record as it is in the table.
    pub record: ClusterRecord,
    /// Its revision (the claim's swap compares it).
    pub revision: i64,
    /// The client's reattach request.
    pub datagram: BytesMut,
    /// The transport it came on.
    pub via: TransportHandle,
    /// Its sender.
    pub from: SocketAddr,
}

/// Makes this node the owner of a session, with a reservation of counters of its own
/// above the previous owner's: one swap from `revision`. Whether it won.
#[derive(Message)]
#[rtype(result = "Result<(), ReasonCode>")]
pub struct Claim {
    /// The record as read.
    pub record: ClusterRecord,
    /// Its revision.
    pub revision: i64,
}

impl Claim {
    /// The record this node writes: it the owner, no handover asked, its reservation
    /// the block above the previous owner's.
    pub fn claimed(&self, me: &NodeId) -> ClusterRecord {
        let mut claimed = self.record.clone();
        claimed.owner = me.clone();
        claimed.handover_to = None;
        claimed.send_reserved_until = self
            .record
            .send_reserved_until
            .saturating_add(COUNTER_BLOCK);
        claimed
    }
}

/// The supervisor is told to stop forwarding a session without ending it: another node
/// asked for it (`to`), took it, or this node was fenced (`to` none, `reason`
/// node_fenced). With `to`, the session's final record is written with it as owner.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Leave {
    /// The session.
    pub id: SessionId,
    /// The node it goes to; none when it is not this node's to give.
    pub to: Option<NodeId>,
    /// session_moved or node_fenced.
    pub reason: ReasonCode,
    /// Whether its final record is written (asked for by `to`).
    pub write: bool,
}

/// How many of the node's writes to the table are under way (a stopping node waits for
/// its sessions' removals).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct InFlight;

/// Every session the node forwards stops (the node is fenced).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct LeaveAll;

/// A change the watch reported (or its end).
#[derive(Message)]
#[rtype(result = "()")]
struct Watched(Result<Change, TableError>, u64);

/// A session this node owns, as the table has it.
struct Owned {
    /// The revision of the record as this node last wrote or saw it.
    revision: i64,
    /// A write is under way.
    writing: bool,
    /// The next record to write, with whom to tell of its reservation.
    next: Option<(ClusterRecord, Option<ReservedTo>)>,
}

/// A reattach waiting for its session's owner to hand the session over.
struct Pending {
    previous: NodeId,
    datagram: BytesMut,
    via: TransportHandle,
    from: SocketAddr,
    until: Instant,
}

/// The node's part in the cluster.
pub struct ClusterNode {
    me: NodeId,
    settings: ClusterSettings,
    view: Arc<RwLock<ClusterView>>,
    supervisor: Addr<NodeSupervisor>,
    reporter: Reporter,
    table: Option<EtcdTable>,
    /// The lease and its hold, while the node has one that lives.
    lease: Option<(i64, LeaseHold)>,
    /// A request for the lease (connect, register, renew) is under way.
    leasing: bool,
    owned: HashMap<SessionId, Owned>,
    pending: HashMap<SessionId, Pending>,
    standby: HashMap<SessionId, (Instant, u32)>,
    /// When each node was found gone (wall-clock ms): orphans' TTL counts from it.
    gone_since: HashMap<NodeId, u64>,
    /// Orphans being ended (one removal each at a time).
    ending: std::collections::HashSet<SessionId>,
    started_ms: u64,
    last_live: Option<Instant>,
    /// The current watch; reports of an older one are ignored.
    watch: u64,
    watching: bool,
    /// Removals of released sessions' records under way.
    removing: usize,
}

impl ClusterNode {
    /// The actor of node `me`, telling `supervisor` what it must do; its copy of the
    /// table is `view`.
    pub fn new(
        me: NodeId,
        settings: ClusterSettings,
        view: Arc<RwLock<ClusterView>>,
        supervisor: Addr<NodeSupervisor>,
        reporter: Reporter,
    ) -> Self {
        let started_ms = reporter.clock().ts_ms(Instant::now());
        ClusterNode {
            me,
            settings,
            view,
            supervisor,
            reporter,
            table: None,
            lease: None,
            leasing: false,
            owned: HashMap::new(),
            pending: HashMap::new(),
            standby: HashMap::new(),
            gone_since: HashMap::new(),
            ending: Default::default(),
            started_ms,
            last_live: None,
            watch: 0,
            watching: false,
            removing: 0,
        }
    }

    fn view(&self) -> std::sync::RwLockWriteGuard<'_, ClusterView> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.reporter.clock().ts_ms(Instant::now())
    }

    fn report(&self, id: SessionId, body: EventBody) {
        self.reporter.report(
            id,
            SessionEvent {
                at: Instant::now(),
                body,
            },
        );
    }

    /// Every timer's work: the lease (renew, fence, join again), the live nodes, the
    /// watch, writes that failed, reattaches that waited too long, orphans.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        if let Some((_, hold)) = self.lease.as_mut() {
            if hold.fenced(now) {
                self.fence(ctx, "no renewal of its lease within the fencing delay");
                return;
            }
        }
        if !self.leasing {
            match (&self.table, &self.lease) {
                (None, _) => self.connect(ctx),
                (Some(_), None) => self.join(ctx),
                (Some(_), Some((_, hold))) if now >= hold.next_renewal() => self.renew(ctx),
                _ => {}
            }
        }
        if self.lease.is_none() {
            return;
        }
        if self.last_live.is_none_or(|t| now >= t + LIVE_EVERY) {
            self.last_live = Some(now);
            self.list_live(ctx);
        }
        if !self.watching {
            self.relist(ctx);
        }
        let waiting: Vec<SessionId> = self
            .owned
            .iter()
            .filter(|(_, o)| !o.writing && o.next.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.write_next(ctx, id);
        }
        self.pending.retain(|_, p| p.until > now);
        self.end_orphans(ctx);
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        self.leasing = true;
        let options = self.settings.store.clone();
        let started = Instant::now();
        ctx.spawn(
            async move { EtcdTable::connect(&options).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    act.leasing = false;
                    telemetry::store_request("connect", started.elapsed(), error_kind(&result));
                    match result {
                        Ok(table) => act.table = Some(table),
                        Err(e) => eprintln!("jvpn cluster {}: {e}", act.me),
                    }
                }),
        );
    }

    /// Registers the node under a new lease: from then on it may own sessions.
    fn join(&mut self, ctx: &mut Context<Self>) {
        let Some(table) = self.table.clone() else {
            return;
        };
        self.leasing = true;
        let (me, ttl) = (self.me.clone(), self.settings.lease_ttl);
        let started = Instant::now();
        ctx.spawn(
            async move { table.register(&me, ttl).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.leasing = false;
                    telemetry::store_request("register", started.elapsed(), error_kind(&result));
                    let lease = match result {
                        Ok(lease) => lease,
                        Err(e) => {
                            eprintln!("jvpn cluster {}: cannot register: {e}", act.me);
                            return;
                        }
                    };
                    match LeaseHold::new(act.settings.lease_ttl, act.settings.fence_after, started)
                    {
                        Ok(hold) => {
                            act.lease = Some((lease, hold));
                            telemetry::cluster_fenced(false);
                            eprintln!("jvpn cluster {}: joined (lease {lease:x})", act.me);
                            act.watching = false;
                            act.tick(ctx);
                        }
                        Err(e) => eprintln!("jvpn cluster {}: {e}", act.me),
                    }
                }),
        );
    }

    fn renew(&mut self, ctx: &mut Context<Self>) {
        let (Some(table), Some((lease, hold))) = (self.table.clone(), self.lease.as_ref()) else {
            return;
        };
        let lease = *lease;
        // Each try may take until the fencing deadline, no longer.
        let limit = hold
            .fence_deadline()
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100));
        self.leasing = true;
        let sent = Instant::now();
        ctx.spawn(
            async move { table.keep_alive(lease, limit).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    act.leasing = false;
                    telemetry::store_request("keep_alive", sent.elapsed(), error_kind(&result));
                    match result {
                        Ok(left) if left > 0 => {
                            if let Some((_, hold)) = act.lease.as_mut().filter(|(l, _)| *l == lease)
                            {
                                hold.renewed(sent);
                            }
                        }
                        Ok(_) => act.fence(ctx, "its lease expired"),
                        Err(e) => eprintln!("jvpn cluster {}: lease renewal failed: {e}", act.me),
                    }
                }),
        );
    }

    /// The node can no longer prove it owns anything: it stops forwarding every session
    /// (without ending them) and joins again with a new lease when it can.
    fn fence(&mut self, _ctx: &mut Context<Self>, why: &str) {
        if self.lease.take().is_none() {
            return;
        }
        eprintln!(
            "jvpn cluster {}: fenced ({why}): no session is forwarded here until the node joins again",
            self.me
        );
        telemetry::cluster_fenced(true);
        self.owned.clear();
        self.pending.clear();
        self.watching = false;
        self.watch += 1;
        // Unbounded on purpose: one lifecycle message.
        self.supervisor.do_send(LeaveAll);
    }

    fn list_live(&mut self, ctx: &mut Context<Self>) {
        let Some(table) = self.table.clone() else {
            return;
        };
        let started = Instant::now();
        ctx.spawn(
            async move { table.live_nodes().await }
                .into_actor(self)
                .map(move |result, act, _| {
                    telemetry::store_request("live_nodes", started.elapsed(), error_kind(&result));
                    let Ok(live) = result else { return };
                    let now_ms = act.now_ms();
                    let view = Arc::clone(&act.view);
                    let mut view = view.write().unwrap_or_else(|e| e.into_inner());
                    // Nodes that owned something and are gone now: since when.
                    let owners: Vec<NodeId> =
                        view.records().map(|(r, _)| r.owner.clone()).collect();
                    for owner in owners {
                        if !live.contains(&owner) {
                            act.gone_since.entry(owner).or_insert(now_ms);
                        }
                    }
                    act.gone_since.retain(|n, _| !live.contains(n));
                    view.set_live(live);
                    // Reattaches waiting for an owner that is gone now: taken over at
                    // once, not at the client's next try.
                    let orphaned: Vec<(ClusterRecord, i64)> = act
                        .pending
                        .keys()
                        .filter_map(|id| view.get(*id))
                        .filter(|(r, _)| r.owner != act.me && !view.is_live(&r.owner))
                        .cloned()
                        .collect();
                    drop(view);
                    for (record, revision) in orphaned {
                        if let Some(p) = act.pending.remove(&record.session_id) {
                            act.supervisor.do_send(TakeOver {
                                previous: p.previous,
                                record,
                                revision,
                                datagram: p.datagram,
                                via: p.via,
                                from: p.from,
                            });
                        }
                    }
                }),
        );
    }

    /// Lists the table into the copy and watches it from the listing's revision.
    fn relist(&mut self, ctx: &mut Context<Self>) {
        let Some(table) = self.table.clone() else {
            return;
        };
        self.watching = true;
        self.watch += 1;
        let generation = self.watch;
        let started = Instant::now();
        let me = ctx.address();
        ctx.spawn(
            async move { table.list().await.map(|l| (l, table)) }
                .into_actor(self)
                .map(move |result, act, _| {
                    telemetry::store_request("list", started.elapsed(), error_kind(&result));
                    if generation != act.watch {
                        return;
                    }
                    let ((records, revision), table) = match result {
                        Ok(listed) => listed,
                        Err(e) => {
                            eprintln!("jvpn cluster {}: cannot list the table: {e}", act.me);
                            act.watching = false;
                            return;
                        }
                    };
                    act.view()
                        .reset(records.into_iter().map(|v| (v.value, v.revision)).collect());
                    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
                    actix::spawn(async move {
                        let ended = table.watch(revision, tx.clone()).await;
                        if let Err(e) = ended {
                            let _ = tx.send(Err(e)).await;
                        }
                    });
                    actix::spawn(async move {
                        while let Some(change) = rx.recv().await {
                            if me.send(Watched(change, generation)).await.is_err() {
                                break;
                            }
                        }
                    });
                }),
        );
    }

    /// What a change of the table means here.
    fn watched(&mut self, ctx: &mut Context<Self>, change: Change) {
        let notice = match change {
            Change::Put(v) => {
                let (record, revision) = (v.value, v.revision);
                let id = record.session_id;
                if let Some(o) = self.owned.get_mut(&id) {
                    o.revision = o.revision.max(revision);
                }
                let mine_now = record.owner == self.me && record.handover_to.is_none();
                let notice = self.view().put(record.clone(), revision);
                // A handover this node asked for: the record is its now; claim it
                // with the waiting reattach.
                if mine_now && !self.owned.contains_key(&id) {
                    if let Some(p) = self.pending.remove(&id) {
                        self.supervisor.do_send(TakeOver {
                            previous: p.previous,
                            record,
                            revision,
                            datagram: p.datagram,
                            via: p.via,
                            from: p.from,
                        });
                    }
                }
                notice
            }
            Change::Deleted(id) => {
                let revision = self.view().get(id).map_or(0, |(_, r)| *r + 1);
                self.view().remove(id, revision)
            }
        };
        match notice {
            Some(Notice::HandoverAsked { session, to }) => {
                if self.owned.contains_key(&session) {
                    self.supervisor.do_send(Leave {
                        id: session,
                        to: Some(to),
                        reason: ReasonCode::SessionMoved,
                        write: true,
                    });
                } else {
                    // Not forwarded here (this node was fenced or restarted): the record
                    // is given as it is.
                    let record = self.view().get(session).map(|(r, _)| r.clone());
                    if let Some(mut record) = record {
                        record.owner = to;
                        record.handover_to = None;
                        self.give(ctx, record);
                    }
                }
            }
            Some(Notice::Lost(id)) if self.owned.remove(&id).is_some() => {
                let to = self.view().get(id).map(|(r, _)| r.owner.clone());
                self.supervisor.do_send(Leave {
                    id,
                    to,
                    reason: ReasonCode::SessionMoved,
                    write: false,
                });
            }
            Some(Notice::Lost(_)) | None => {}
        }
    }

    /// Writes a session's record with another node as its owner (a handover), from the
    /// revision the copy of the table has.
    fn give(&mut self, ctx: &mut Context<Self>, record: ClusterRecord) {
        let Some(table) = self.table.clone() else {
            return;
        };
        let id = record.session_id;
        let Some(revision) = self.view().get(id).map(|(_, r)| *r) else {
            return;
        };
        self.owned.remove(&id);
        let started = Instant::now();
        ctx.spawn(
            async move { table.swap(revision, &record).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    telemetry::store_request("swap", started.elapsed(), error_kind(&result));
                    if let Err(e) = result {
                        eprintln!("jvpn cluster {}: handing {id} over failed: {e}", act.me);
                    }
                }),
        );
    }

    /// Writes the newest record of an owned session, if one waits and none is under way.
    fn write_next(&mut self, ctx: &mut Context<Self>, id: SessionId) {
        let Some(table) = self.table.clone() else {
            return;
        };
        if self.lease.is_none() {
            return;
        }
        let Some(owned) = self.owned.get_mut(&id).filter(|o| !o.writing) else {
            return;
        };
        let Some((record, reserved)) = owned.next.take() else {
            return;
        };
        owned.writing = true;
        let revision = owned.revision;
        let started = Instant::now();
        ctx.spawn(
            async move {
                let result = table.swap(revision, &record).await;
                (result, record)
            }
            .into_actor(self)
            .map(move |(result, record), act, ctx| {
                telemetry::store_request("swap", started.elapsed(), error_kind(&result));
                let Some(owned) = act.owned.get_mut(&id) else {
                    return;
                };
                owned.writing = false;
                match result {
                    Ok(new) => {
                        owned.revision = owned.revision.max(new);
                        if let Some((epoch, to)) = reserved {
                            let _ = to.try_send(Reserved {
                                epoch,
                                until: record.send_reserved_until,
                            });
                        }
                        act.write_next(ctx, id);
                    }
                    // Another node wrote it: the watch says what (a handover asked, or
                    // the session taken); nothing more is written from here.
                    Err(TableError::Conflict { .. }) => owned.next = None,
                    // Tried again on a later tick (the newest record by then).
                    Err(_) => {
                        if owned.next.is_none() {
                            owned.next = Some((record, reserved));
                        }
                    }
                }
            }),
        );
    }

    /// Ends the sessions whose owner is gone and whose TTL ran out, each with one
    /// conditional removal: of all surviving nodes exactly one ends it, and reports it.
    fn end_orphans(&mut self, ctx: &mut Context<Self>) {
        let Some(table) = self.table.clone() else {
            return;
        };
        let now_ms = self.now_ms();
        let ttl = u64::try_from(self.settings.transport_lost_ttl.as_millis()).unwrap_or(u64::MAX);
        let due: Vec<(ClusterRecord, i64, jvpn_core::fsm::TerminationCause)> = {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            view.records()
                .filter(|(r, _)| !self.ending.contains(&r.session_id))
                .filter(|(r, _)| {
                    if r.owner == self.me {
                        !self.owned.contains_key(&r.session_id)
                    } else {
                        !view.is_live(&r.owner)
                    }
                })
                .filter_map(|(r, rev)| {
                    let gone = self
                        .gone_since
                        .get(&r.owner)
                        .copied()
                        .unwrap_or(self.started_ms);
                    orphan_end(r, now_ms, gone, ttl).map(|c| (r.clone(), *rev, c))
                })
                .take(64)
                .collect()
        };
        for (record, revision, cause) in due {
            let id = record.session_id;
            self.ending.insert(id);
            let table = table.clone();
            let started = Instant::now();
            ctx.spawn(
                async move { table.remove(id, revision).await }
                    .into_actor(self)
                    .map(move |result, act, _| {
                        telemetry::store_request("remove", started.elapsed(), error_kind(&result));
                        act.ending.remove(&id);
                        if result.is_err() {
                            return;
                        }
                        act.report_orphan_end(&record, cause, now_ms);
                    }),
            );
        }
    }

    fn report_orphan_end(
        &self,
        record: &ClusterRecord,
        cause: jvpn_core::fsm::TerminationCause,
        now_ms: u64,
    ) {
        let id = record.session_id;
        let previous: State = record.state.parse().unwrap_or(State::Attached);
        let reason = cause.reason();
        self.report(
            id,
            EventBody::SessionStateChange {
                previous_state: previous,
                new_state: State::Terminated,
                reason_code: reason,
                state_version: StateVersion(record.state_version.saturating_add(1)),
            },
        );
        let heard_ms = record.transport_lost_deadline_ms.saturating_sub(
            u64::try_from(self.settings.transport_lost_ttl.as_millis()).unwrap_or(0),
        );
        self.report(
            id,
            EventBody::SessionTerminated {
                reason_code: reason,
                session_age_ms: now_ms.saturating_sub(record.created_ms),
                transportless_age_ms: now_ms.saturating_sub(heard_ms),
            },
        );
        eprintln!(
            "jvpn cluster {}: ended orphaned session {id} of {} ({reason})",
            self.me, record.owner
        );
    }

    /// A probe of another node's session: answered with the record's keys, within the
    /// session's budget of standby answers.
    fn standby(&mut self, record: &ClusterRecord, msg: &mut Unclaimed) {
        let now = Instant::now();
        if self.standby.len() >= STANDBY_TRACKED {
            self.standby.clear();
        }
        let budget = self.standby.entry(record.session_id).or_insert((now, 0));
        if now.duration_since(budget.0) >= Duration::from_secs(1) {
            *budget = (now, 0);
        }
        if budget.1 >= STANDBY_PER_SECOND {
            telemetry::dropped("standby_rate_limited");
            return;
        }
        budget.1 += 1;
        let Some(secrets) = open_secrets(&self.settings.key, record) else {
            telemetry::dropped("standby_keys_refused");
            return;
        };
        let mut out = Vec::new();
        match standby_probe_ack(&secrets, &msg.header, &mut msg.datagram, &mut out) {
            Some(()) => {
                msg.via.send(msg.from, &out);
            }
            None => telemetry::dropped("standby_not_a_probe"),
        }
    }

    /// A reattach of a session whose owner lives: the owner is asked to hand it over
    /// (one swap setting `handover_to`), and the reattach waits here for it.
    fn ask_owner(
        &mut self,
        ctx: &mut Context<Self>,
        record: ClusterRecord,
        revision: i64,
        msg: Unclaimed,
    ) {
        let id = record.session_id;
        let asked = record.handover_to.as_ref() == Some(&self.me);
        if self.pending.len() >= PENDING_MAX && !self.pending.contains_key(&id) {
            telemetry::dropped("handover_pending_full");
            return;
        }
        // Only a request of the session's client asks: nothing is written for junk.
        if jvpn_core::gateway::open_takeover_request(&record, &self.settings.key, &msg.datagram)
            .is_err()
        {
            telemetry::dropped("takeover_refused");
            return;
        }
        let first = self
            .pending
            .insert(
                id,
                Pending {
                    previous: record.owner.clone(),
                    datagram: msg.datagram,
                    via: msg.via,
                    from: msg.from,
                    until: Instant::now() + HANDOVER_WAIT,
                },
            )
            .is_none();
        if asked || !first {
            return;
        }
        let Some(table) = self.table.clone() else {
            return;
        };
        let mut asking = record;
        asking.handover_to = Some(self.me.clone());
        let started = Instant::now();
        ctx.spawn(
            async move { table.swap(revision, &asking).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    telemetry::store_request("swap", started.elapsed(), error_kind(&result));
                    if let Err(e) = result {
                        // Someone else wrote first; the client's next reattach tries again.
                        act.pending.remove(&id);
                        telemetry::dropped(match e {
                            TableError::Conflict { .. } => ReasonCode::OwnershipConflict.as_str(),
                            _ => ReasonCode::StoreUnavailable.as_str(),
                        });
                    }
                }),
        );
    }
}

/// The kind of a store request's failure, as a metric label.
fn error_kind<T>(result: &Result<T, TableError>) -> Option<&'static str> {
    match result {
        Ok(_) => None,
        Err(TableError::Unavailable(_)) => Some("unavailable"),
        Err(TableError::Conflict { .. }) => Some("conflict"),
        Err(TableError::Malformed(_)) => Some("malformed"),
    }
}

/// A record's keys, opened under the cluster key.
fn open_secrets(key: &ClusterKey, record: &ClusterRecord) -> Option<SessionSecrets> {
    use base64::Engine;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(&record.sealed_keys)
        .ok()?;
    SessionSecrets::open(key, record.session_id, &sealed).ok()
}

impl Actor for ClusterNode {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1_024);
        telemetry::cluster_fenced(true);
        self.tick(ctx);
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }
}

impl Handler<Create> for ClusterNode {
    type Result = ResponseActFuture<Self, Result<(), ReasonCode>>;

    fn handle(&mut self, msg: Create, _ctx: &mut Context<Self>) -> Self::Result {
        let _measure = Handling::start(ActorKind::Cluster);
        let table = match (&self.table, &self.lease) {
            (Some(table), Some(_)) => table.clone(),
            _ => return Box::pin(actix::fut::ready(Err(ReasonCode::StoreUnavailable))),
        };
        let id = msg.0.session_id;
        let started = Instant::now();
        Box::pin(
            async move { table.create(&msg.0).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    telemetry::store_request("create", started.elapsed(), error_kind(&result));
                    match result {
                        Ok(revision) => {
                            act.owned.insert(
                                id,
                                Owned {
                                    revision,
                                    writing: false,
                                    next: None,
                                },
                            );
                            Ok(())
                        }
                        Err(TableError::Conflict { .. }) => Err(ReasonCode::AtomicityFailed),
                        Err(_) => Err(ReasonCode::StoreUnavailable),
                    }
                }),
        )
    }
}

impl Handler<Sync> for ClusterNode {
    type Result = ();

    fn handle(&mut self, msg: Sync, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Cluster);
        let id = msg.record.session_id;
        let Some(owned) = self.owned.get_mut(&id) else {
            return;
        };
        owned.next = Some((msg.record, msg.reserved));
        self.write_next(ctx, id);
    }
}

impl Handler<Released> for ClusterNode {
    type Result = ();

    fn handle(&mut self, msg: Released, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Cluster);
        let (Some(owned), Some(table)) = (self.owned.remove(&msg.0), self.table.clone()) else {
            return;
        };
        let (id, revision) = (msg.0, owned.revision);
        let started = Instant::now();
        self.removing += 1;
        ctx.spawn(
            async move { table.remove(id, revision).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    act.removing -= 1;
                    telemetry::store_request("remove", started.elapsed(), error_kind(&result));
                    if let Err(TableError::Unavailable(e)) = result {
                        // Left for the survivors' TTL enforcement to end.
                        eprintln!("jvpn cluster {}: cannot remove {id}: {e}", act.me);
                    }
                }),
        );
    }
}

impl Handler<InFlight> for ClusterNode {
    type Result = usize;

    fn handle(&mut self, _: InFlight, _ctx: &mut Context<Self>) -> usize {
        self.removing + self.owned.values().filter(|o| o.writing).count()
    }
}

impl Handler<HandedOver> for ClusterNode {
    type Result = ();

    fn handle(&mut self, msg: HandedOver, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Cluster);
        self.give(ctx, msg.0);
    }
}

impl Handler<Unclaimed> for ClusterNode {
    type Result = ();

    fn handle(&mut self, mut msg: Unclaimed, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Cluster);
        if self.lease.is_none() {
            telemetry::dropped(ReasonCode::StoreUnavailable.as_str());
            return;
        }
        match std::mem::replace(&mut msg.decision, Unknown::Ignore) {
            Unknown::Standby(record) => self.standby(&record, &mut msg),
            Unknown::AskOwner(record, revision) => self.ask_owner(ctx, *record, revision, msg),
            Unknown::TakeOver(record, revision) => self.supervisor.do_send(TakeOver {
                previous: record.owner.clone(),
                record: *record,
                revision,
                datagram: msg.datagram,
                via: msg.via,
                from: msg.from,
            }),
            Unknown::NotInTable | Unknown::Ignore => telemetry::dropped("cluster_elsewhere"),
        }
    }
}

impl Handler<Claim> for ClusterNode {
    type Result = ResponseActFuture<Self, Result<(), ReasonCode>>;

    fn handle(&mut self, msg: Claim, _ctx: &mut Context<Self>) -> Self::Result {
        let _measure = Handling::start(ActorKind::Cluster);
        let table = match (&self.table, &self.lease) {
            (Some(table), Some(_)) => table.clone(),
            _ => return Box::pin(actix::fut::ready(Err(ReasonCode::StoreUnavailable))),
        };
        let claimed = msg.claimed(&self.me);
        let id = claimed.session_id;
        let revision = msg.revision;
        let started = Instant::now();
        Box::pin(
            async move { table.swap(revision, &claimed).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    telemetry::store_request("swap", started.elapsed(), error_kind(&result));
                    act.pending.remove(&id);
                    match result {
                        Ok(revision) => {
                            act.owned.insert(
                                id,
                                Owned {
                                    revision,
                                    writing: false,
                                    next: None,
                                },
                            );
                            telemetry::cluster_move("in");
                            Ok(())
                        }
                        Err(TableError::Conflict { .. }) => Err(ReasonCode::OwnershipConflict),
                        Err(_) => Err(ReasonCode::StoreUnavailable),
                    }
                }),
        )
    }
}

impl Handler<Watched> for ClusterNode {
    type Result = ();

    fn handle(&mut self, msg: Watched, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Cluster);
        if msg.1 != self.watch {
            return;
        }
        match msg.0 {
            Ok(change) => self.watched(ctx, change),
            Err(e) => {
                eprintln!(
                    "jvpn cluster {}: the watch ended ({e}): listing again",
                    self.me
                );
                self.watching = false;
            }
        }
    }
}
