//! A gateway node's part in a cluster (spec/cluster.md "The runtime"): the actor that
//! holds the node's lease in the shared session table (etcd), keeps the node's copy of
//! the table ([`ClusterView`], fed by a watch), writes the records of the sessions the
//! node owns (created before the handshake is answered, then after every change, behind
//! the session), answers probes of other nodes' sessions as a standby, asks for and
//! claims sessions whose clients reattach here, hands sessions over when another node
//! asks, fences the node when its lease cannot be renewed, and ends orphaned sessions by
//! their TTL once their owner is gone.
//!
//! Nothing here is on the packet path of a session the node forwards: the store is
//! asked only on handshakes, state changes, moves and timers, never per packet.
//!
//! - `node`: the actor, its lease and fencing, its copy of the table and the watch;
//! - `records`: the records of the sessions this node owns, and orphans;
//! - `moves`: standby answers, handovers and claims.

mod moves;
mod node;
mod records;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use bytes::BytesMut;
use jvpn_cluster::EtcdOptions;
use jvpn_core::cluster::{ClusterKey, ClusterRecord, ClusterView, Unknown, COUNTER_BLOCK};
use jvpn_core::ids::{NodeId, SessionId};
use jvpn_core::reason::ReasonCode;
use jvpn_core::wire::SessionHeader;

use crate::transport::TransportHandle;

pub use node::ClusterNode;

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
    /// The policy's reattach freshness bound (a request older than it asks nothing).
    pub reattach_max_age: Duration,
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
/// How long the owner's session has to write its final record once asked to hand it
/// over, before the record is handed over as the table has it.
const LEAVE_WAIT: Duration = Duration::from_secs(2);
/// A node asks an owner again, for a reattach still waiting, at most this often.
const REASK_EVERY: Duration = Duration::from_secs(1);
/// Orphans are ended only while the live nodes were listed this recently.
const LIVE_FRESH: Duration = Duration::from_secs(3);

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
/// above the previous owner's: one swap from `revision` — on the further condition,
/// when the record names another node, that that node's lease is gone (checked in the
/// same transaction). Whether it won, and this node still holds the lease it asked
/// under.
#[derive(Message)]
#[rtype(result = "Result<(), ReasonCode>")]
pub struct Claim {
    /// The record as read.
    pub record: ClusterRecord,
    /// Its revision.
    pub revision: i64,
}

/// A session this node claimed could not be started here after all: its record is no
/// longer written from here (it ends by its TTL unless its client takes it elsewhere).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Disown(pub SessionId);

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

/// The node stops gracefully: it takes, creates and asks for nothing from now on; the
/// final records of the sessions it handed off are still written.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Depart;

/// The node gives its lease up (its key goes with it): the other nodes may take its
/// sessions at once, at their clients' next reattach.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct GiveUpLease;

/// Every session the node forwards stops (the node is fenced).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct LeaveAll;
