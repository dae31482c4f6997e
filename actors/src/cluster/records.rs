//! The records of the sessions this node owns (created, written behind each change,
//! given to another node, removed at the end) and the orphans the node ends.

use std::time::Instant;

use actix::prelude::*;
use jvpn_cluster::TableError;
use jvpn_core::cluster::{orphan_end, ClusterRecord};
use jvpn_core::event::EventBody;
use jvpn_core::fsm::{State, TerminationCause};
use jvpn_core::ids::{NodeId, SessionId, StateVersion};
use jvpn_core::reason::ReasonCode;

use super::node::{error_kind, ClusterNode, Owned};
use super::{Create, HandedOver, Released, Reserved, Sync, LEAVE_WAIT, LIVE_FRESH};
use crate::runtime::{ActorKind, Handling};
use crate::telemetry;

impl ClusterNode {
    /// Writes what waits to be written: records whose write failed, and records of
    /// sessions asked for whose final record did not come in time (given as the table
    /// has them: their reservation holds, so the taker's counters are still its own).
    pub(super) fn retry_writes(&mut self, ctx: &mut Context<Self>, now: Instant) {
        let waiting: Vec<SessionId> = self
            .owned
            .iter()
            .filter(|(_, o)| !o.writing && o.next.is_some())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.write_next(ctx, id);
        }
        let overdue: Vec<(SessionId, NodeId)> = self
            .owned
            .iter()
            .filter_map(|(id, o)| {
                let (since, to) = o.leaving.as_ref()?;
                (now >= *since + LEAVE_WAIT && !o.writing).then(|| (*id, to.clone()))
            })
            .collect();
        for (id, to) in overdue {
            self.give_as_is(ctx, id, to);
        }
    }

    /// Writes the newest record of an owned session, if one waits and none is under way.
    pub(super) fn write_next(&mut self, ctx: &mut Context<Self>, id: SessionId) {
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
                let me = act.me.clone();
                let Some(owned) = act.owned.get_mut(&id) else {
                    return;
                };
                owned.writing = false;
                match result {
                    Ok(new) => {
                        owned.revision = owned.revision.max(new);
                        if let Some((epoch, to)) = reserved {
                            // Unbounded on purpose: without it the session stops
                            // sending at its limit (one per block of 2^24 packets).
                            to.do_send(Reserved {
                                epoch,
                                until: record.send_reserved_until,
                            });
                        }
                    }
                    // Another node wrote it: a handover asked (its notice settles it),
                    // or the session taken or ended (likewise). Only a record that
                    // still names this node, unasked, is written again from its
                    // revision.
                    Err(TableError::Conflict { current }) => match current {
                        Some(c)
                            if c.value.owner == me
                                && c.value.handover_to.is_none()
                                && owned.leaving.is_none() =>
                        {
                            owned.revision = owned.revision.max(c.revision);
                            if owned.next.is_none() {
                                owned.next = Some((record, reserved));
                            }
                        }
                        _ => owned.next = None,
                    },
                    // Tried again on a later tick (the newest record by then).
                    Err(_) => {
                        if owned.next.is_none() && owned.leaving.is_none() {
                            owned.next = Some((record, reserved));
                        }
                    }
                }
                if owned.released {
                    act.remove_owned(ctx, id);
                } else {
                    act.write_next(ctx, id);
                }
            }),
        );
    }

    /// Removes the record of a session that ended here, from the revision this node
    /// last wrote (once more from the table's, if it still names this node).
    pub(super) fn remove_owned(&mut self, ctx: &mut Context<Self>, id: SessionId) {
        let (Some(owned), Some(table)) = (self.owned.remove(&id), self.table.clone()) else {
            return;
        };
        let revision = owned.revision;
        let me = self.me.clone();
        let started = Instant::now();
        self.removing.insert(id);
        ctx.spawn(
            async move {
                let first = table.remove(id, revision, None).await;
                match first {
                    // Still this node's and unasked (no claim of it can have come in
                    // between: claims wait for the removal).
                    Err(TableError::Conflict {
                        current: Some(current),
                    }) if current.value.owner == me && current.value.handover_to.is_none() => {
                        table.remove(id, current.revision, None).await
                    }
                    other => other,
                }
            }
            .into_actor(self)
            .map(move |result, act, _| {
                act.removing.remove(&id);
                telemetry::store_request("remove", started.elapsed(), error_kind(&result));
                if let Err(TableError::Unavailable(e)) = result {
                    // Left for the survivors' TTL enforcement to end.
                    eprintln!("jvpn cluster {}: cannot remove {id}: {e}", act.me);
                }
            }),
        );
    }

    /// Writes a session's record with `record.owner` (another node) as its owner: the
    /// owner's final record at a handover. From the revision the copy of the table has
    /// (the one that asked), once more from the table's if a write of this node came in
    /// between.
    pub(super) fn give(&mut self, ctx: &mut Context<Self>, record: ClusterRecord) {
        let id = record.session_id;
        self.owned.remove(&id);
        let Some(table) = self.table.clone() else {
            return;
        };
        let Some(revision) = self.view().get(id).map(|(_, r)| *r) else {
            return;
        };
        let me = self.me.clone();
        let started = Instant::now();
        self.giving.insert(id);
        ctx.spawn(
            async move {
                match table.swap(revision, &record).await {
                    // A write of this node came in between: once more, only over a
                    // record that still names this node and still asks for the same
                    // taker (never over a claim of this node's own).
                    Err(TableError::Conflict {
                        current: Some(current),
                    }) if current.value.owner == me
                        && current.value.handover_to.as_ref() == Some(&record.owner) =>
                    {
                        table.swap(current.revision, &record).await
                    }
                    other => other,
                }
            }
            .into_actor(self)
            .map(move |result, act, _| {
                act.giving.remove(&id);
                telemetry::store_request("swap", started.elapsed(), error_kind(&result));
                if let Err(e) = result {
                    eprintln!("jvpn cluster {}: handing {id} over failed: {e}", act.me);
                }
            }),
        );
    }

    /// A session this node does not forward, as the copy of the table has it now: asked
    /// of this node by another, it is handed over as it is.
    pub(super) fn settle_unowned(&mut self, ctx: &mut Context<Self>, id: SessionId) {
        let asked = self
            .view()
            .get(id)
            .filter(|(r, _)| r.owner == self.me)
            .and_then(|(r, _)| r.handover_to.clone())
            .filter(|to| *to != self.me);
        if let Some(to) = asked.filter(|_| !self.owned.contains_key(&id)) {
            self.give_as_is(ctx, id, to);
        }
    }

    /// Hands session `id` to `to` as the copy of the table has its record (this node
    /// does not forward it, or its final record did not come).
    pub(super) fn give_as_is(&mut self, ctx: &mut Context<Self>, id: SessionId, to: NodeId) {
        let record = self.view().get(id).map(|(r, _)| r.clone());
        match record.filter(|r| r.owner == self.me) {
            Some(mut record) => {
                record.owner = to;
                record.handover_to = None;
                self.give(ctx, record);
            }
            None => {
                self.owned.remove(&id);
            }
        }
    }

    /// Ends the sessions whose owner is gone and whose TTL ran out, each with one
    /// conditional removal that also requires the owner's lease to be gone: of all
    /// surviving nodes exactly one ends it, and reports it.
    pub(super) fn end_orphans(&mut self, ctx: &mut Context<Self>) {
        let Some(table) = self.table.clone() else {
            return;
        };
        // Only on a recent listing of the live nodes (the removal checks the owner's
        // lease again in any case).
        if self.live_at.is_none_or(|t| t.elapsed() > LIVE_FRESH) {
            return;
        }
        let now_ms = self.now_ms();
        let ttl = u64::try_from(self.settings.transport_lost_ttl.as_millis()).unwrap_or(u64::MAX);
        let due: Vec<(ClusterRecord, i64, TerminationCause)> = {
            let view = self.view.read().unwrap_or_else(|e| e.into_inner());
            view.records()
                .filter(|(r, _)| {
                    let id = r.session_id;
                    !self.ending.contains(&id)
                        && !self.claiming.contains(&id)
                        && !self.giving.contains(&id)
                        && !self.removing.contains(&id)
                        && !self.pending.contains_key(&id)
                })
                .filter(|(r, _)| {
                    if r.owner == self.me {
                        !self.owned.contains_key(&r.session_id)
                    } else {
                        !view.is_live(&r.owner)
                    }
                })
                .filter_map(|(r, rev)| {
                    let gone = if r.owner == self.me {
                        // From when it came to name this node without this node
                        // forwarding it (a previous run, a fence, a handover to it).
                        let since = self.unforwarded_since.get(&r.session_id).copied();
                        self.own_gone_ms.max(since.unwrap_or(0))
                    } else {
                        self.gone_since
                            .get(&r.owner)
                            .copied()
                            .unwrap_or(self.own_gone_ms)
                    };
                    orphan_end(r, now_ms, gone, ttl).map(|c| (r.clone(), *rev, c))
                })
                .take(64)
                .collect()
        };
        for (record, revision, cause) in due {
            let id = record.session_id;
            self.ending.insert(id);
            let table = table.clone();
            let gone = (record.owner != self.me).then(|| record.owner.clone());
            let started = Instant::now();
            ctx.spawn(
                async move { table.remove(id, revision, gone.as_ref()).await }
                    .into_actor(self)
                    .map(move |result, act, _| {
                        telemetry::store_request("remove", started.elapsed(), error_kind(&result));
                        act.ending.remove(&id);
                        if result.is_ok() {
                            act.report_orphan_end(&record, cause, now_ms);
                        }
                    }),
            );
        }
    }

    fn report_orphan_end(&self, record: &ClusterRecord, cause: TerminationCause, now_ms: u64) {
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
        let ttl = u64::try_from(self.settings.transport_lost_ttl.as_millis()).unwrap_or(0);
        let heard_ms = record.transport_lost_deadline_ms.saturating_sub(ttl);
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
}

impl Handler<Create> for ClusterNode {
    type Result = ResponseActFuture<Self, Result<(), ReasonCode>>;

    fn handle(&mut self, msg: Create, _ctx: &mut Context<Self>) -> Self::Result {
        let _measure = Handling::start(ActorKind::Cluster);
        let Some((table, lease)) = self.owning() else {
            return Box::pin(actix::fut::ready(Err(ReasonCode::StoreUnavailable)));
        };
        let id = msg.0.session_id;
        let started = Instant::now();
        Box::pin(
            async move { table.create(&msg.0).await }
                .into_actor(self)
                .map(move |result, act, ctx| {
                    telemetry::store_request("create", started.elapsed(), error_kind(&result));
                    match result {
                        // Still under the lease it was asked under: else the node was
                        // fenced meanwhile and starts nothing.
                        Ok(revision) if act.lease_id() == Some(lease) => {
                            act.owned.insert(id, Owned::at(revision));
                            Ok(())
                        }
                        Ok(revision) => {
                            act.owned.insert(id, Owned::at(revision));
                            act.remove_owned(ctx, id);
                            Err(ReasonCode::StoreUnavailable)
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
        // Asked for by another node: only the final record is written from now on.
        if owned.leaving.is_some() || owned.released {
            return;
        }
        owned.next = Some((msg.record, msg.reserved));
        self.write_next(ctx, id);
    }
}

impl Handler<Released> for ClusterNode {
    type Result = ();

    fn handle(&mut self, msg: Released, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Cluster);
        match self.owned.get_mut(&msg.0) {
            // The write under way is answered first: its revision is the one to remove.
            Some(owned) if owned.writing => {
                owned.released = true;
                owned.next = None;
            }
            Some(_) => self.remove_owned(ctx, msg.0),
            None => {}
        }
    }
}

impl Handler<HandedOver> for ClusterNode {
    type Result = ();

    fn handle(&mut self, msg: HandedOver, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Cluster);
        // Only for a session still asked for here (not given as it was already).
        if self
            .owned
            .get(&msg.0.session_id)
            .is_some_and(|o| o.leaving.is_some())
        {
            self.give(ctx, msg.0);
        }
    }
}
