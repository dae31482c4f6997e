//! The cluster actor itself: its state, its lease (renewals and fencing), the live
//! nodes, and its copy of the table (listing, watch, reconciling after a lost watch).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock, RwLockWriteGuard};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::BytesMut;
use jvpn_cluster::{Change, EtcdTable, TableError};
use jvpn_core::cluster::{ClusterRecord, ClusterView, LeaseHold, Notice};
use jvpn_core::event::{EventBody, SessionEvent};
use jvpn_core::ids::{NodeId, SessionId};
use jvpn_core::reason::ReasonCode;

use super::{ClusterSettings, InFlight, Leave, LeaveAll, ReservedTo, TakeOver, LIVE_EVERY, TICK};
use crate::runtime::{ActorKind, Handling, Reporter};
use crate::supervisor::NodeSupervisor;
use crate::telemetry;
use crate::transport::TransportHandle;

/// A change the watch reported (or its end), from watch number `.1`.
#[derive(Message)]
#[rtype(result = "()")]
struct Watched(Result<Change, TableError>, u64);

/// A session this node owns, as the table has it.
pub(super) struct Owned {
    /// The revision of the record as this node last wrote or saw it.
    pub(super) revision: i64,
    /// A write is under way.
    pub(super) writing: bool,
    /// The next record to write, with whom to tell of its reservation.
    pub(super) next: Option<(ClusterRecord, Option<ReservedTo>)>,
    /// Another node asked for it (since when, who): nothing more is written from here
    /// but the final record.
    pub(super) leaving: Option<(Instant, NodeId)>,
    /// The session ended here while a write was under way: its record is removed once
    /// that write is answered.
    pub(super) released: bool,
}

impl Owned {
    pub(super) fn at(revision: i64) -> Owned {
        Owned {
            revision,
            writing: false,
            next: None,
            leaving: None,
            released: false,
        }
    }
}

/// A reattach waiting for its session's owner to hand the session over.
pub(super) struct Pending {
    pub(super) previous: NodeId,
    pub(super) datagram: BytesMut,
    pub(super) via: TransportHandle,
    pub(super) from: SocketAddr,
    pub(super) until: Instant,
    /// When this node last asked the owner.
    pub(super) asked_at: Instant,
}

/// The node's part in the cluster.
pub struct ClusterNode {
    pub(super) me: NodeId,
    pub(super) settings: ClusterSettings,
    pub(super) view: Arc<RwLock<ClusterView>>,
    pub(super) supervisor: Addr<NodeSupervisor>,
    pub(super) reporter: Reporter,
    pub(super) table: Option<EtcdTable>,
    /// The lease and its hold, while the node has one that lives.
    pub(super) lease: Option<(i64, LeaseHold)>,
    /// The node is stopping: it joins nothing, takes nothing, creates nothing.
    pub(super) departing: bool,
    /// A request for the lease (connect, register, renew) is under way.
    leasing: bool,
    pub(super) owned: HashMap<SessionId, Owned>,
    /// Sessions whose claim is under way (their notices wait for its answer).
    pub(super) claiming: HashSet<SessionId>,
    pub(super) pending: HashMap<SessionId, Pending>,
    pub(super) standby: HashMap<SessionId, (Instant, u32)>,
    /// When each node was found gone (wall-clock ms): orphans' TTL counts from it.
    pub(super) gone_since: HashMap<NodeId, u64>,
    /// Orphans being ended (one removal each at a time).
    pub(super) ending: HashSet<SessionId>,
    /// When this node started, or was last fenced (wall-clock ms): the records it left
    /// behind count their TTL from then.
    pub(super) own_gone_ms: u64,
    /// Records naming this node that it does not forward, since when they did
    /// (wall-clock ms): their TTL counts from then at the earliest. Bounded by the view.
    pub(super) unforwarded_since: HashMap<SessionId, u64>,
    /// When the live nodes were last listed.
    pub(super) live_at: Option<Instant>,
    last_live: Option<Instant>,
    /// The current watch; reports of an older one are ignored.
    watch: u64,
    watching: bool,
    /// The current watch's tasks (stopped when it is replaced).
    watch_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Sessions whose record this node is removing (released here) or giving to another
    /// node: none of them is claimed meanwhile (a retry of the write must never land on
    /// a claim of this node's own).
    pub(super) removing: HashSet<SessionId>,
    pub(super) giving: HashSet<SessionId>,
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
        let own_gone_ms = reporter.clock().ts_ms(Instant::now());
        ClusterNode {
            me,
            settings,
            view,
            supervisor,
            reporter,
            table: None,
            lease: None,
            departing: false,
            leasing: false,
            owned: HashMap::new(),
            claiming: HashSet::new(),
            pending: HashMap::new(),
            standby: HashMap::new(),
            gone_since: HashMap::new(),
            ending: HashSet::new(),
            own_gone_ms,
            unforwarded_since: HashMap::new(),
            live_at: None,
            last_live: None,
            watch: 0,
            watching: false,
            watch_tasks: Vec::new(),
            removing: HashSet::new(),
            giving: HashSet::new(),
        }
    }

    pub(super) fn view(&self) -> RwLockWriteGuard<'_, ClusterView> {
        self.view.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.reporter.clock().ts_ms(Instant::now())
    }

    pub(super) fn report(&self, id: SessionId, body: EventBody) {
        self.reporter.report(
            id,
            SessionEvent {
                at: Instant::now(),
                body,
            },
        );
    }

    /// The table and the lease under which this node may create or claim a session:
    /// none without a lease, or once the node is stopping.
    pub(super) fn owning(&self) -> Option<(EtcdTable, i64)> {
        let table = self.table.clone().filter(|_| !self.departing)?;
        Some((table, self.lease_id()?))
    }

    /// The lease this node holds now, if any.
    pub(super) fn lease_id(&self) -> Option<i64> {
        self.lease.as_ref().map(|(id, _)| *id)
    }

    /// Every timer's work: the lease (renew, fence, join again), the live nodes, the
    /// watch, writes that failed, handovers that did not come, orphans.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        if let Some((_, hold)) = self.lease.as_mut() {
            if hold.fenced(now) {
                self.fence("no renewal of its lease within the fencing delay");
                return;
            }
        }
        if self.departing {
            // Only the lease (until it is given up) and the last writes go on.
            if !self.leasing
                && self
                    .lease
                    .as_ref()
                    .is_some_and(|(_, h)| now >= h.next_renewal())
            {
                self.renew(ctx);
            }
            self.retry_writes(ctx, now);
            return;
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
        self.retry_writes(ctx, now);
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
        // Each try is bounded by one renewal interval (and the fencing deadline): one
        // stuck on a dead connection must not use up the whole delay.
        let limit = hold
            .fence_deadline()
            .saturating_duration_since(Instant::now())
            .min(self.settings.lease_ttl / 6)
            .max(Duration::from_millis(100));
        self.leasing = true;
        let sent = Instant::now();
        ctx.spawn(
            async move { table.keep_alive(lease, limit).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    act.leasing = false;
                    telemetry::store_request("keep_alive", sent.elapsed(), error_kind(&result));
                    match result {
                        Ok(left) if left > 0 => {
                            if let Some((_, hold)) = act.lease.as_mut().filter(|(l, _)| *l == lease)
                            {
                                hold.renewed(sent);
                            }
                        }
                        Ok(_) if act.lease_id() == Some(lease) => act.fence("its lease expired"),
                        Ok(_) => {}
                        Err(e) => eprintln!("jvpn cluster {}: lease renewal failed: {e}", act.me),
                    }
                }),
        );
    }

    /// The node can no longer prove it owns anything: it stops forwarding every session
    /// (without ending them) and joins again with a new lease when it can.
    pub(super) fn fence(&mut self, why: &str) {
        if self.lease.take().is_none() {
            return;
        }
        eprintln!(
            "jvpn cluster {}: fenced ({why}): no session is forwarded here until the node joins again",
            self.me
        );
        telemetry::cluster_fenced(true);
        self.own_gone_ms = self.now_ms();
        self.owned.clear();
        self.pending.clear();
        self.stop_watch();
        // Unbounded on purpose: one lifecycle message.
        self.supervisor.do_send(LeaveAll);
    }

    fn stop_watch(&mut self) {
        self.watching = false;
        self.watch += 1;
        for task in self.watch_tasks.drain(..) {
            task.abort();
        }
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
                    act.live_at = Some(started);
                    act.live(live);
                }),
        );
    }

    /// The live nodes were listed: owners found gone are remembered from now, and
    /// reattaches waiting for one of them are claimed at once.
    fn live(&mut self, live: Vec<NodeId>) {
        let now_ms = self.now_ms();
        let view = Arc::clone(&self.view);
        let mut view = view.write().unwrap_or_else(|e| e.into_inner());
        for (r, _) in view.records() {
            if !live.contains(&r.owner) {
                self.gone_since.entry(r.owner.clone()).or_insert(now_ms);
            }
        }
        // Only owners of records in the view, and not live: nodes that left for good
        // are forgotten with their last record.
        let owners: HashSet<NodeId> = view.records().map(|(r, _)| r.owner.clone()).collect();
        self.gone_since
            .retain(|n, _| !live.contains(n) && owners.contains(n));
        view.set_live(live);
        self.unforwarded_since
            .retain(|id, _| view.get(*id).is_some());
        let orphaned: Vec<(ClusterRecord, i64)> = self
            .pending
            .keys()
            .filter_map(|id| view.get(*id))
            .filter(|(r, _)| r.owner != self.me && !view.is_live(&r.owner))
            .cloned()
            .collect();
        drop(view);
        for (record, revision) in orphaned {
            self.take_pending(record, revision);
        }
    }

    /// The reattach waiting here for the session of `record` (at `revision`) takes it
    /// over now: its owner handed it over, or is gone.
    fn take_pending(&mut self, record: ClusterRecord, revision: i64) {
        if let Some(p) = self.pending.remove(&record.session_id) {
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

    /// Lists the table into the copy and watches it from the listing's revision.
    fn relist(&mut self, ctx: &mut Context<Self>) {
        let Some(table) = self.table.clone() else {
            return;
        };
        self.stop_watch();
        self.watching = true;
        let generation = self.watch;
        let started = Instant::now();
        let me = ctx.address();
        ctx.spawn(
            async move { table.list().await.map(|l| (l, table)) }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    telemetry::store_request("list", started.elapsed(), error_kind(&result));
                    if generation != act.watch {
                        return;
                    }
                    let ((records, revision, unreadable), table) = match result {
                        Ok(listed) => listed,
                        Err(e) => {
                            eprintln!("jvpn cluster {}: cannot list the table: {e}", act.me);
                            act.watching = false;
                            return;
                        }
                    };
                    if unreadable > 0 {
                        telemetry::dropped_n("store_record_unreadable", unreadable);
                    }
                    act.view()
                        .reset(records.into_iter().map(|v| (v.value, v.revision)).collect());
                    act.reconcile(ctx, revision);
                    let (tx, mut rx) = tokio::sync::mpsc::channel(256);
                    act.watch_tasks.push(actix::spawn(async move {
                        let ended = table.watch(revision, tx.clone()).await;
                        if let Err(e) = ended {
                            let _ = tx.send(Err(e)).await;
                        }
                    }));
                    act.watch_tasks.push(actix::spawn(async move {
                        while let Some(change) = rx.recv().await {
                            if me.send(Watched(change, generation)).await.is_err() {
                                break;
                            }
                        }
                    }));
                }),
        );
    }

    /// After a listing (read at `listed`) replaced the copy (a watch was lost, and with
    /// it the changes between): what the listing says of the sessions this node owns,
    /// and of records asked of it, is acted on as the lost notices would have been — but
    /// a session this node wrote after the listing was read is not judged by it.
    fn reconcile(&mut self, ctx: &mut Context<Self>, listed: i64) {
        let mut notices = Vec::new();
        {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            for (id, owned) in self.owned.iter_mut() {
                match view.get(*id) {
                    Some((r, rev)) if r.owner == self.me => {
                        owned.revision = owned.revision.max(*rev);
                        if let Some(to) = r.handover_to.clone().filter(|to| *to != self.me) {
                            notices.push(Notice::HandoverAsked { session: *id, to });
                        }
                    }
                    _ if self.claiming.contains(id) || owned.revision > listed => {}
                    _ => notices.push(Notice::Lost(*id)),
                }
            }
            for (r, _) in view.records() {
                let asked = r.handover_to.clone().filter(|to| *to != self.me);
                if let Some(to) =
                    asked.filter(|_| r.owner == self.me && !self.owned.contains_key(&r.session_id))
                {
                    notices.push(Notice::HandoverAsked {
                        session: r.session_id,
                        to,
                    });
                }
            }
        }
        for notice in notices {
            self.notice(ctx, notice);
        }
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
                if record.owner == self.me && !self.owned.contains_key(&id) {
                    let now_ms = self.now_ms();
                    self.unforwarded_since.entry(id).or_insert(now_ms);
                } else {
                    self.unforwarded_since.remove(&id);
                }
                let notice = self.view().put(record.clone(), revision);
                // A handover this node asked for: the record is its now; claim it with
                // the waiting reattach.
                if mine_now && !self.owned.contains_key(&id) && !self.claiming.contains(&id) {
                    self.take_pending(record, revision);
                }
                notice
            }
            Change::Deleted(id) => {
                self.unforwarded_since.remove(&id);
                let revision = self.view().get(id).map_or(0, |(_, r)| *r + 1);
                self.view().remove(id, revision)
            }
            Change::Unreadable(id, why) => {
                eprintln!(
                    "jvpn cluster {}: an unreadable record skipped: {why}",
                    self.me
                );
                telemetry::dropped("store_record_unreadable");
                // What the view had of it is no longer true; a session this node
                // forwards goes on (its writes refused from now on).
                if let Some(id) = id {
                    let revision = self.view().get(id).map_or(0, |(_, r)| *r + 1);
                    let _ = self.view().remove(id, revision);
                }
                None
            }
        };
        if let Some(notice) = notice {
            self.notice(ctx, notice);
        }
    }

    /// Acts on what a change means for a session of this node.
    fn notice(&mut self, ctx: &mut Context<Self>, notice: Notice) {
        match notice {
            // A claim under way settles these when it is answered.
            Notice::HandoverAsked { session, .. } | Notice::Lost(session)
                if self.claiming.contains(&session) => {}
            Notice::HandoverAsked { session, to } => match self.owned.get_mut(&session) {
                Some(owned) => {
                    if owned.leaving.is_none() {
                        owned.leaving = Some((Instant::now(), to.clone()));
                        owned.next = None;
                        self.supervisor.do_send(Leave {
                            id: session,
                            to: Some(to),
                            reason: ReasonCode::SessionMoved,
                            write: true,
                        });
                    }
                }
                // Not forwarded here (this node was fenced or restarted): the record is
                // given as it is.
                None => self.give_as_is(ctx, session, to),
            },
            Notice::Lost(id) => {
                if self.owned.remove(&id).is_some() {
                    let to = self.view().get(id).map(|(r, _)| r.owner.clone());
                    self.supervisor.do_send(Leave {
                        id,
                        to,
                        reason: ReasonCode::SessionMoved,
                        write: false,
                    });
                }
            }
        }
    }
}

/// The kind of a store request's failure, as a metric label.
pub(super) fn error_kind<T>(result: &Result<T, TableError>) -> Option<&'static str> {
    match result {
        Ok(_) => None,
        Err(TableError::Unavailable(_)) => Some("unavailable"),
        Err(TableError::Conflict { .. }) => Some("conflict"),
        Err(TableError::Malformed(_)) => Some("malformed"),
    }
}

impl Actor for ClusterNode {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1_024);
        telemetry::cluster_fenced(true);
        self.tick(ctx);
        ctx.run_interval(TICK, |act, ctx| act.tick(ctx));
    }

    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.stop_watch();
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
                self.stop_watch();
            }
        }
    }
}

impl Handler<super::Depart> for ClusterNode {
    type Result = ();

    fn handle(&mut self, _: super::Depart, _ctx: &mut Context<Self>) {
        self.departing = true;
        self.pending.clear();
    }
}

impl Handler<super::GiveUpLease> for ClusterNode {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: super::GiveUpLease, _ctx: &mut Context<Self>) -> Self::Result {
        let (Some(table), Some((lease, _))) = (self.table.clone(), self.lease.take()) else {
            return Box::pin(actix::fut::ready(()));
        };
        let started = Instant::now();
        Box::pin(
            async move { table.revoke(lease).await }
                .into_actor(self)
                .map(move |result, act, _| {
                    telemetry::store_request("revoke", started.elapsed(), error_kind(&result));
                    match result {
                        Ok(()) => eprintln!("jvpn cluster {}: left the cluster", act.me),
                        // Its lease then runs out by itself.
                        Err(e) => {
                            eprintln!("jvpn cluster {}: cannot give the lease up: {e}", act.me)
                        }
                    }
                }),
        )
    }
}

impl Handler<InFlight> for ClusterNode {
    type Result = usize;

    fn handle(&mut self, _: InFlight, _ctx: &mut Context<Self>) -> usize {
        self.removing.len()
            + self.giving.len()
            + self
                .owned
                .values()
                .filter(|o| o.writing || o.next.is_some())
                .count()
    }
}
