//! Sessions moving between nodes: standby answers to probes of other nodes' sessions, a
//! reattach asking a live owner to hand its session over, and claims.

use std::time::{Duration, Instant};

use actix::prelude::*;
use jvpn_cluster::TableError;
use jvpn_core::cluster::{standby_probe_ack, ClusterKey, ClusterRecord, SessionSecrets, Unknown};
use jvpn_core::reason::ReasonCode;

use super::node::{error_kind, ClusterNode, Owned, Pending};
use super::{
    Claim, Disown, TakeOver, Unclaimed, HANDOVER_WAIT, PENDING_MAX, REASK_EVERY,
    STANDBY_PER_SECOND, STANDBY_TRACKED,
};
use crate::runtime::{ActorKind, Handling};
use crate::telemetry;

impl ClusterNode {
    /// A probe of another node's session: answered with the record's keys, within the
    /// session's budget of standby answers (spent only on authentic probes).
    fn standby(&mut self, record: &ClusterRecord, msg: &mut Unclaimed) {
        let Some(secrets) = open_secrets(&self.settings.key, record) else {
            telemetry::dropped("standby_keys_refused");
            return;
        };
        let mut out = Vec::new();
        if standby_probe_ack(&secrets, &msg.header, &mut msg.datagram, &mut out).is_none() {
            telemetry::dropped("standby_not_a_probe");
            return;
        }
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
        msg.via.send(msg.from, &out);
    }

    /// A reattach of a session whose owner lives: the owner is asked to hand it over
    /// (one swap setting `handover_to`), and the reattach waits here for it. A request
    /// still waiting asks again, at most every [`REASK_EVERY`] — also when the record
    /// names this node as asking already: the new revision is a new notice to the owner,
    /// whose earlier answer may have been lost.
    fn ask_owner(
        &mut self,
        ctx: &mut Context<Self>,
        record: ClusterRecord,
        revision: i64,
        msg: Unclaimed,
    ) {
        let id = record.session_id;
        if self.pending.len() >= PENDING_MAX && !self.pending.contains_key(&id) {
            telemetry::dropped("handover_pending_full");
            return;
        }
        // Only a fresh request of the session's client asks: nothing is written for
        // junk or a replay.
        let freshness = (self.now_ms(), self.settings.reattach_max_age);
        if jvpn_core::gateway::open_takeover_request(
            &record,
            &self.settings.key,
            &msg.datagram,
            freshness,
        )
        .is_err()
        {
            telemetry::dropped("takeover_refused");
            return;
        }
        let now = Instant::now();
        let ask = self
            .pending
            .get(&id)
            .is_none_or(|p| now >= p.asked_at + REASK_EVERY);
        let asked_at = match self.pending.get(&id) {
            Some(p) if !ask => p.asked_at,
            _ => now,
        };
        self.pending.insert(
            id,
            Pending {
                previous: record.owner.clone(),
                datagram: msg.datagram,
                via: msg.via,
                from: msg.from,
                until: now + HANDOVER_WAIT,
                asked_at,
            },
        );
        if !ask {
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
                .map(move |result, _, _| {
                    telemetry::store_request("swap", started.elapsed(), error_kind(&result));
                    // Refused: someone else wrote first; the request waits on, and the
                    // client's next one asks again.
                    if let Err(e) = result {
                        telemetry::dropped(match e {
                            TableError::Conflict { .. } => ReasonCode::OwnershipConflict.as_str(),
                            _ => ReasonCode::StoreUnavailable.as_str(),
                        });
                    }
                }),
        );
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

impl Handler<Unclaimed> for ClusterNode {
    type Result = ();

    fn handle(&mut self, mut msg: Unclaimed, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Cluster);
        if self.lease.is_none() || self.departing {
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
        let Some((table, lease)) = self.owning() else {
            return Box::pin(actix::fut::ready(Err(ReasonCode::StoreUnavailable)));
        };
        let claimed = msg.claimed(&self.me);
        let id = claimed.session_id;
        let busy = self.owned.contains_key(&id)
            || self.giving.contains(&id)
            || self.removing.contains(&id)
            || self.ending.contains(&id);
        if busy || !self.claiming.insert(id) {
            return Box::pin(actix::fut::ready(Err(ReasonCode::OwnershipConflict)));
        }
        // From another node: only if its lease is gone (a handover names this node).
        let previous = (msg.record.owner != self.me).then(|| msg.record.owner.clone());
        let revision = msg.revision;
        let started = Instant::now();
        Box::pin(
            async move {
                match &previous {
                    Some(owner) => table.swap_from_gone(revision, &claimed, owner).await,
                    None => table.swap(revision, &claimed).await,
                }
            }
            .into_actor(self)
            .map(move |result, act, ctx| {
                telemetry::store_request("swap", started.elapsed(), error_kind(&result));
                act.claiming.remove(&id);
                act.pending.remove(&id);
                let won = match result {
                    Ok(won) => won,
                    Err(TableError::Conflict { .. }) => {
                        // Notices skipped during the claim are acted on now.
                        act.settle_unowned(ctx, id);
                        return Err(ReasonCode::OwnershipConflict);
                    }
                    Err(_) => return Err(ReasonCode::StoreUnavailable),
                };
                act.owned.insert(id, Owned::at(won));
                // Fenced meanwhile: nothing starts; the record is this node's and
                // ends by its TTL unless the client takes it elsewhere.
                if act.lease_id() != Some(lease) {
                    act.owned.remove(&id);
                    return Err(ReasonCode::StoreUnavailable);
                }
                // The watch may have reported newer writes while the claim was under
                // way: another node asking for it already, or taking it.
                let newer = act
                    .view()
                    .get(id)
                    .filter(|(_, rev)| *rev > won)
                    .map(|(r, _)| r.clone());
                if let Some(record) = newer {
                    let asked = record.handover_to.clone().filter(|to| *to != act.me);
                    if record.owner != act.me {
                        act.owned.remove(&id);
                        return Err(ReasonCode::OwnershipConflict);
                    }
                    if let Some(to) = asked {
                        // Not started here: handed on to the node asking.
                        act.give_as_is(ctx, id, to);
                        return Err(ReasonCode::OwnershipConflict);
                    }
                }
                telemetry::cluster_move("in");
                Ok(())
            }),
        )
    }
}

impl Handler<Disown> for ClusterNode {
    type Result = ();

    fn handle(&mut self, msg: Disown, ctx: &mut Context<Self>) {
        // Asked for meanwhile: handed over as it is, not left waiting.
        let asked = self
            .owned
            .remove(&msg.0)
            .and_then(|o| o.leaving)
            .map(|(_, to)| to);
        if let Some(to) = asked {
            self.give_as_is(ctx, msg.0, to);
        }
    }
}
