//! What a gateway cluster shares about a session, sans-IO: the record each session has in
//! the cluster's table, and its keys sealed under the cluster key, so that a node that
//! never saw the session's handshake can take it over (spec/cluster.md).
//!
//! The keys never reach the table in clear: they are sealed with ChaCha20-Poly1305 under
//! the cluster key (32 bytes every node has from its configuration), a random nonce per
//! seal, and the session id as associated data, so that a sealed blob moved to another
//! record does not open.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::ids::{NodeId, SessionId};
use crate::wire::{Control, PacketType, SessionHeader};

/// The largest record the table accepts, bytes (a record is a few hundred).
pub const MAX_RECORD_LEN: usize = 4096;

/// Counters an owner reserves at a time for what it sends (see [`ClusterRecord`]).
pub const COUNTER_BLOCK: u64 = 1 << 24;

/// Why cluster data was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClusterError {
    /// The cluster key is not 32 bytes of base64.
    #[error("the cluster key is not 32 bytes of standard base64 (44 characters, as `jvpn keygen` prints)")]
    BadKey,
    /// Sealed keys did not open: another cluster key, another session, or tampering.
    #[error("the session's sealed keys do not open under this cluster key")]
    Unsealing,
    /// A record could not be read.
    #[error("malformed session record: {0}")]
    Malformed(String),
    /// The record is well formed but cannot be taken over here (why).
    #[error("the session cannot be taken over here: {0}")]
    Refused(String),
    /// No random source.
    #[error("no random source: {0}")]
    Random(String),
}

/// The key every node of a cluster seals session keys with.
pub struct ClusterKey(LessSafeKey);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(<hidden>)")
    }
}

impl ClusterKey {
    /// The key from its base64 text (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<ClusterKey, ClusterError> {
        use base64::Engine;
        let bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| ClusterError::BadKey)?,
        );
        if bytes.len() != 32 {
            return Err(ClusterError::BadKey);
        }
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| ClusterError::BadKey)?;
        Ok(ClusterKey(LessSafeKey::new(key)))
    }
}

/// A session's current keys, as a node that takes the session over needs them.
pub struct SessionSecrets {
    /// The AEAD the keys are for.
    pub cipher: crate::crypto::Cipher,
    /// The key epoch they belong to.
    pub epoch: u32,
    /// The gateway's sending key.
    pub send: Zeroizing<[u8; 32]>,
    /// The gateway's receiving key.
    pub recv: Zeroizing<[u8; 32]>,
}

const NONCE_LEN: usize = 12;
const SECRETS_LEN: usize = 1 + 4 + 32 + 32;
const TAG_LEN: usize = 16;
/// The length of sealed secrets: nonce, sealed cipher id, epoch and keys, tag.
pub const SEALED_LEN: usize = NONCE_LEN + SECRETS_LEN + TAG_LEN;
/// The length of secrets sealed by a node of the version before ciphers were agreed
/// (no cipher id: ChaCha20-Poly1305), still opened so that a cluster can be upgraded
/// one node at a time.
pub const SEALED_LEN_BEFORE_CIPHERS: usize = SEALED_LEN - 1;

impl SessionSecrets {
    /// Seals these secrets of `session` under `key`.
    pub fn seal(&self, key: &ClusterKey, session: SessionId) -> Result<Vec<u8>, ClusterError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| ClusterError::Random(e.to_string()))?;
        let mut out = Vec::with_capacity(SEALED_LEN);
        out.extend_from_slice(&nonce);
        out.push(self.cipher.id());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.send[..]);
        out.extend_from_slice(&self.recv[..]);
        let mut body = Zeroizing::new(out.split_off(NONCE_LEN));
        key.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(session.0.to_be_bytes()),
                &mut *body,
            )
            .map_err(|_| ClusterError::Unsealing)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens secrets of `session` sealed by [`SessionSecrets::seal`].
    pub fn open(
        key: &ClusterKey,
        session: SessionId,
        sealed: &[u8],
    ) -> Result<SessionSecrets, ClusterError> {
        if sealed.len() != SEALED_LEN && sealed.len() != SEALED_LEN_BEFORE_CIPHERS {
            return Err(ClusterError::Unsealing);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| ClusterError::Unsealing)?;
        let mut body = Zeroizing::new(body.to_vec());
        let plain = key
            .0
            .open_in_place(nonce, Aad::from(session.0.to_be_bytes()), &mut body)
            .map_err(|_| ClusterError::Unsealing)?;
        let (cipher, plain) = if plain.len() == SECRETS_LEN {
            let id = plain.first().copied().unwrap_or(u8::MAX);
            let cipher = crate::crypto::Cipher::from_id(id).ok_or(ClusterError::Unsealing)?;
            (cipher, plain.get(1..).unwrap_or_default())
        } else {
            (crate::crypto::Cipher::ChaCha20Poly1305, &*plain)
        };
        let mut epoch = [0u8; 4];
        let mut send = Zeroizing::new([0u8; 32]);
        let mut recv = Zeroizing::new([0u8; 32]);
        epoch.copy_from_slice(&plain[..4]);
        send.copy_from_slice(&plain[4..36]);
        recv.copy_from_slice(&plain[36..68]);
        Ok(SessionSecrets {
            cipher,
            epoch: u32::from_be_bytes(epoch),
            send,
            recv,
        })
    }
}

/// A standby node's answer to a client's probe of a session another node owns
/// (spec/cluster.md): `packet` is the probe (opened in place with `secrets`, the
/// session's keys from its record); the answer, a `StandbyProbeAck` sealed under the
/// session's sending key with a random nonce of its own and naming the probe by its
/// seq and counter, is written to `out`. The session's counters are not touched: the
/// owner remains their one user. `None` when the packet is not a probe of this session
/// under these keys; `packet` is left opened in place when it was one. The driver
/// bounds how often it answers a session (each answer costs an AEAD and uses a random
/// nonce).
pub fn standby_probe_ack(
    secrets: &SessionSecrets,
    header: &SessionHeader,
    packet: &mut [u8],
    out: &mut Vec<u8>,
) -> Option<()> {
    if header.ptype != PacketType::Probe || header.key_epoch != secrets.epoch as u8 {
        return None;
    }
    if !crate::crypto::opens((secrets.cipher, &secrets.recv), header, packet) {
        return None;
    }
    let Ok(Control::Probe { seq }) =
        Control::decode(header.ptype, crate::crypto::plaintext(packet))
    else {
        return None;
    };
    let random = getrandom::u64().ok()?;
    out.clear();
    out.extend_from_slice(
        &SessionHeader {
            ptype: PacketType::StandbyProbeAck,
            key_epoch: header.key_epoch,
            session_id: header.session_id,
            counter: random,
        }
        .encode(),
    );
    Control::StandbyProbeAck {
        seq,
        probe_counter: header.counter,
    }
    .encode(out);
    crate::crypto::seal_with(
        (secrets.cipher, &secrets.send),
        crate::crypto::standby_nonce(random),
        out,
    )
    .ok()
}

/// A session as the cluster's table holds it: one record per session, written only by
/// its owner (or by a node taking it over, conditioned on the record's revision).
///
/// Times are wall-clock milliseconds (the nodes' monotonic clocks do not compare).
/// `send_reserved_until` is the first counter the owner may not send with: an owner
/// reserves [`COUNTER_BLOCK`] counters at a time by writing the record, and a node that
/// takes the session over starts sending above every reservation, so no counter is ever
/// used twice under one key across nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Identity; never changes.
    pub session_id: SessionId,
    /// The node that forwards the session's packets.
    pub owner: NodeId,
    /// A node that asked the owner to hand the session over, if any.
    pub handover_to: Option<NodeId>,
    /// The client's static key (base64).
    pub client: String,
    /// State name (spec/state-machine.md) and version, as last written by the owner.
    pub state: String,
    /// Mutations so far.
    pub state_version: u64,
    /// The version under which the binding was accepted (what the client's reattach
    /// names).
    pub bound_at: u64,
    /// The bound transport (`udp://ADDR`, …) as last written by the owner.
    pub binding: Option<String>,
    /// The session's keys, sealed under the cluster key (base64).
    pub sealed_keys: String,
    /// The first counter the owner may not send with (under the current keys).
    pub send_reserved_until: u64,
    /// When the current keys were made (wall clock, ms): their age limits carry over.
    pub keys_created_ms: u64,
    /// The highest counter the owner accepted from the client under the current keys:
    /// nothing at or below it is accepted by a node that takes the session over.
    pub recv_highest: Option<u64>,
    /// When the session began (wall clock, ms).
    pub created_ms: u64,
    /// When the session ends by lifetime (wall clock, ms).
    pub lifetime_deadline_ms: u64,
    /// When the session ends unless its client is heard before (wall clock, ms).
    pub transport_lost_deadline_ms: u64,
}

impl ClusterRecord {
    /// The record as the table stores it (JSON).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A record read from the table, bounded and checked.
    pub fn decode(bytes: &[u8]) -> Result<ClusterRecord, ClusterError> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(ClusterError::Malformed(format!(
                "{} bytes, more than {MAX_RECORD_LEN}",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes).map_err(|e| ClusterError::Malformed(e.to_string()))
    }
}

/// Why a session whose owner is gone ends, at wall-clock `now_ms`, if it does
/// (spec/cluster.md "Orphaned sessions"): its lifetime ran out, or its client was not
/// heard for the transport-lost TTL. The record's own transport deadline is the one its
/// owner last wrote, which may be older than when the client was last heard; but no
/// node heard the client since the owner was found gone (`owner_gone_ms`), or the
/// session would have moved there. So it ends at the later of the two.
pub fn orphan_end(
    record: &ClusterRecord,
    now_ms: u64,
    owner_gone_ms: u64,
    transport_lost_ttl_ms: u64,
) -> Option<crate::fsm::TerminationCause> {
    use crate::fsm::TerminationCause;
    if matches!(record.state.as_str(), "TERMINATED" | "BIRTH") {
        return None;
    }
    if now_ms >= record.lifetime_deadline_ms {
        return Some(TerminationCause::LifetimeExceeded);
    }
    let lost = record
        .transport_lost_deadline_ms
        .max(owner_gone_ms.saturating_add(transport_lost_ttl_ms));
    (now_ms >= lost).then_some(TerminationCause::TransportTtlExceeded)
}

/// The reservation an owner asks for when its next counter `next` comes within half a
/// block of its reservation's end `limit` (spec/cluster.md): the block after it.
/// `None` while it is far enough, or for a lone node's unlimited keys.
pub fn reservation_wanted(next: u64, limit: u64) -> Option<u64> {
    if limit == u64::MAX || next.saturating_add(COUNTER_BLOCK / 2) < limit {
        return None;
    }
    Some(limit.saturating_add(COUNTER_BLOCK))
}

/// A node's hold on its lease in the cluster's table, and when it must fence itself
/// (spec/cluster.md "Leases and fencing"). The node renews every sixth of the lease's
/// TTL, so that an outage of the store shorter than the fencing delay less one renewal
/// interval (etcd restarting) fences nothing; when no renewal has succeeded for
/// `fence_after`, it stops forwarding every session (it can no longer prove it owns
/// them) — and since `fence_after` is shorter
/// than the TTL by at least [`FENCE_MARGIN`], it has stopped before the lease expires
/// and any other node may take its sessions. Once fenced it stays fenced: its sessions
/// may be another node's by now, so it starts again with a new lease.
#[derive(Debug, Clone)]
pub struct LeaseHold {
    ttl: std::time::Duration,
    fence_after: std::time::Duration,
    last_renewed: std::time::Instant,
    fenced: bool,
}

/// How much earlier than the lease's expiry a node fences itself, at least: room for
/// the clocks of etcd and the node to disagree and for the fencing to take effect.
pub const FENCE_MARGIN: std::time::Duration = std::time::Duration::from_secs(1);

impl LeaseHold {
    /// A lease of `ttl` granted at `now`, fenced after `fence_after` without a renewal.
    /// Refused unless `fence_after` + [`FENCE_MARGIN`] ≤ `ttl` and `fence_after` is at
    /// least two thirds of the TTL (room for several renewals, one every sixth).
    pub fn new(
        ttl: std::time::Duration,
        fence_after: std::time::Duration,
        now: std::time::Instant,
    ) -> Result<LeaseHold, String> {
        if fence_after + FENCE_MARGIN > ttl {
            return Err(format!(
                "the fencing delay ({fence_after:?}) must be at least {FENCE_MARGIN:?} shorter than the lease TTL ({ttl:?})"
            ));
        }
        if fence_after < ttl / 3 * 2 {
            return Err(format!(
                "the fencing delay ({fence_after:?}) must be at least two thirds of the lease TTL ({:?})",
                ttl / 3 * 2
            ));
        }
        Ok(LeaseHold {
            ttl,
            fence_after,
            last_renewed: now,
            fenced: false,
        })
    }

    /// A renewal succeeded at `now`. A fenced node stays fenced.
    pub fn renewed(&mut self, now: std::time::Instant) {
        if !self.fenced {
            self.last_renewed = self.last_renewed.max(now);
        }
    }

    /// When to renew next.
    pub fn next_renewal(&self) -> std::time::Instant {
        self.last_renewed + self.ttl / 6
    }

    /// When the node fences itself unless a renewal succeeds before.
    pub fn fence_deadline(&self) -> std::time::Instant {
        self.last_renewed + self.fence_after
    }

    /// Whether the node must not forward any session at `now` (and from then on).
    pub fn fenced(&mut self, now: std::time::Instant) -> bool {
        if now >= self.fence_deadline() {
            self.fenced = true;
        }
        self.fenced
    }
}

/// This node's copy of the cluster's table, as its watch reports it (spec/cluster.md
/// "A node's view of the table"): the newest revision of each record wins, a late or
/// repeated report changes nothing, and it holds at most `capacity` records. From it a
/// node decides what to do with a packet of a session it does not have, and learns
/// when a session it forwards was asked of it or taken from it.
#[derive(Debug)]
pub struct ClusterView {
    me: NodeId,
    capacity: usize,
    records: std::collections::HashMap<SessionId, (ClusterRecord, i64)>,
    live: std::collections::HashSet<NodeId>,
    /// Records not kept because the view was full.
    pub overflowed: u64,
}

/// What a change of the table means for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Another node asks for a session this node forwards: hand it over.
    HandoverAsked {
        /// The session.
        session: SessionId,
        /// Who asks.
        to: NodeId,
    },
    /// A session this node forwarded is another node's now (or gone): stop forwarding
    /// it, without ending it.
    Lost(SessionId),
}

/// What to do with a packet of a session this node does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unknown {
    /// Nothing in the table: answer as for any unknown session.
    NotInTable,
    /// A probe of another node's session: answer it as a standby.
    Standby(Box<ClusterRecord>),
    /// A reattach whose owner is gone (no live lease): take the session over with a
    /// swap from this revision.
    TakeOver(Box<ClusterRecord>, i64),
    /// A reattach whose owner lives: ask it to hand the session over (a swap of
    /// `handover_to` from this revision), and wait for it.
    AskOwner(Box<ClusterRecord>, i64),
    /// Anything else (data, heartbeats of a session being moved): drop it.
    Ignore,
}

impl ClusterView {
    /// An empty view for node `me`.
    pub fn new(me: NodeId, capacity: usize) -> Self {
        ClusterView {
            me,
            capacity,
            records: std::collections::HashMap::new(),
            live: std::collections::HashSet::new(),
            overflowed: 0,
        }
    }

    /// Replaces everything with a listing (after a watch was lost).
    pub fn reset(&mut self, records: Vec<(ClusterRecord, i64)>) {
        self.records.clear();
        for (record, revision) in records {
            let _ = self.put(record, revision);
        }
    }

    /// The nodes whose lease lives.
    pub fn set_live(&mut self, nodes: impl IntoIterator<Item = NodeId>) {
        self.live = nodes.into_iter().collect();
    }

    /// A record written at `revision`; what it means for this node. Older than what
    /// the view has: ignored.
    pub fn put(&mut self, record: ClusterRecord, revision: i64) -> Option<Notice> {
        let id = record.session_id;
        let previous = match self.records.get(&id) {
            Some((_, known)) if *known >= revision => return None,
            Some((old, _)) => Some(old.owner.clone()),
            // Records of this node's sessions, or asked of it, are always kept: their
            // notices must not be lost to a full view.
            None if self.records.len() >= self.capacity
                && record.owner != self.me
                && record.handover_to.as_ref() != Some(&self.me) =>
            {
                self.overflowed += 1;
                return None;
            }
            None => None,
        };
        let notice = if record.owner == self.me {
            record
                .handover_to
                .as_ref()
                .filter(|to| **to != self.me)
                .map(|to| Notice::HandoverAsked {
                    session: id,
                    to: to.clone(),
                })
        } else if previous.as_ref() == Some(&self.me) {
            Some(Notice::Lost(id))
        } else {
            None
        };
        let concerns_me = record.owner == self.me || record.handover_to.as_ref() == Some(&self.me);
        self.records.insert(id, (record, revision));
        // Kept past the capacity only while it concerned this node: once it moved on to
        // other nodes, it makes room again.
        if self.records.len() > self.capacity && !concerns_me {
            self.records.remove(&id);
            self.overflowed += 1;
        }
        notice
    }

    /// A record removed at `revision`.
    pub fn remove(&mut self, id: SessionId, revision: i64) -> Option<Notice> {
        match self.records.get(&id) {
            Some((_, known)) if *known >= revision => None,
            Some(_) => {
                let (record, _) = self.records.remove(&id)?;
                (record.owner == self.me).then_some(Notice::Lost(id))
            }
            None => None,
        }
    }

    /// The record of `id` and its revision, if the view has it.
    pub fn get(&self, id: SessionId) -> Option<&(ClusterRecord, i64)> {
        self.records.get(&id)
    }

    /// What to do with a packet of type `ptype` of session `id`, which this node does
    /// not have. A record naming this node is one a previous run of it left: a reattach
    /// takes it over like any other, from the table.
    pub fn unknown(&self, id: SessionId, ptype: PacketType) -> Unknown {
        let Some((record, revision)) = self.records.get(&id) else {
            return Unknown::NotInTable;
        };
        let owner_lives = record.owner != self.me && self.live.contains(&record.owner);
        match ptype {
            PacketType::Probe if record.owner != self.me => {
                Unknown::Standby(Box::new(record.clone()))
            }
            PacketType::ReattachRequest if owner_lives => {
                Unknown::AskOwner(Box::new(record.clone()), *revision)
            }
            PacketType::ReattachRequest => Unknown::TakeOver(Box::new(record.clone()), *revision),
            _ => Unknown::Ignore,
        }
    }

    /// Every record with its revision.
    pub fn records(&self) -> impl Iterator<Item = &(ClusterRecord, i64)> {
        self.records.values()
    }

    /// Whether `node`'s lease lives, as last listed.
    pub fn is_live(&self, node: &NodeId) -> bool {
        self.live.contains(node)
    }

    /// How many records the view holds.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the view holds no record.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::PublicKey;

    fn key(byte: u8) -> ClusterKey {
        use base64::Engine;
        ClusterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32]))
            .expect("key")
    }

    fn secrets() -> SessionSecrets {
        SessionSecrets {
            cipher: crate::crypto::Cipher::Aes256Gcm,
            epoch: 3,
            send: Zeroizing::new([7; 32]),
            recv: Zeroizing::new([9; 32]),
        }
    }

    #[test]
    fn sealed_keys_open_only_under_their_key_and_for_their_session() {
        let sealed = secrets().seal(&key(1), SessionId(42)).expect("seal");
        assert_eq!(sealed.len(), SEALED_LEN);
        let opened = SessionSecrets::open(&key(1), SessionId(42), &sealed).expect("open");
        assert_eq!(opened.cipher, crate::crypto::Cipher::Aes256Gcm);
        assert_eq!(opened.epoch, 3);
        assert_eq!(*opened.send, [7; 32]);
        assert_eq!(*opened.recv, [9; 32]);
        assert!(!sealed.windows(32).any(|w| w == [7; 32]), "a key in clear");
        assert!(SessionSecrets::open(&key(2), SessionId(42), &sealed).is_err());
        assert!(SessionSecrets::open(&key(1), SessionId(43), &sealed).is_err());
        let mut flipped = sealed.clone();
        flipped[20] ^= 1;
        assert!(SessionSecrets::open(&key(1), SessionId(42), &flipped).is_err());
        assert!(SessionSecrets::open(&key(1), SessionId(42), &sealed[..50]).is_err());
        // What a node of the version before ciphers sealed (no cipher id): its keys,
        // for ChaCha20-Poly1305.
        let mut before = Vec::new();
        before.extend_from_slice(&3u32.to_be_bytes());
        before.extend_from_slice(&[7; 32]);
        before.extend_from_slice(&[9; 32]);
        let nonce = [5u8; NONCE_LEN];
        key(1)
            .0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(42u64.to_be_bytes()),
                &mut before,
            )
            .expect("seal");
        let sealed_before = [&nonce[..], &before].concat();
        assert_eq!(sealed_before.len(), SEALED_LEN_BEFORE_CIPHERS);
        let opened = SessionSecrets::open(&key(1), SessionId(42), &sealed_before).expect("open");
        assert_eq!(opened.cipher, crate::crypto::Cipher::ChaCha20Poly1305);
        assert_eq!(
            (opened.epoch, *opened.send, *opened.recv),
            (3, [7; 32], [9; 32])
        );
        // Two seals of the same keys differ (a fresh nonce each).
        assert_ne!(
            sealed,
            secrets().seal(&key(1), SessionId(42)).expect("seal")
        );
    }

    #[test]
    fn a_node_fences_itself_before_its_lease_can_expire_and_stays_fenced() {
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert!(LeaseHold::new(s(6), s(6), t0).is_err(), "no margin");
        assert!(LeaseHold::new(s(6), s(2), t0).is_err(), "no room to renew");
        let mut hold = LeaseHold::new(s(6), s(4), t0).expect("valid");
        assert_eq!(hold.next_renewal(), t0 + s(1));
        // Renewals keep it going.
        hold.renewed(t0 + s(2));
        assert!(!hold.fenced(t0 + s(5)));
        assert_eq!(hold.fence_deadline(), t0 + s(6));
        // Then etcd stops answering: fenced 4 s after the last renewal, 2 s before the
        // lease (granted or last renewed at t0 + 2 s, 6 s TTL) expires.
        assert!(!hold.fenced(t0 + s(6) - Duration::from_millis(1)));
        assert!(hold.fenced(t0 + s(6)));
        assert!(hold.fence_deadline() + FENCE_MARGIN <= t0 + s(2) + s(6));
        // A late renewal does not undo it.
        hold.renewed(t0 + s(7));
        assert!(hold.fenced(t0 + s(7)));
    }

    fn owned_by(id: u64, owner: &str) -> ClusterRecord {
        ClusterRecord {
            session_id: SessionId(id),
            owner: NodeId(owner.into()),
            handover_to: None,
            client: String::new(),
            state: "ATTACHED".into(),
            state_version: 1,
            bound_at: 1,
            binding: None,
            sealed_keys: String::new(),
            send_reserved_until: COUNTER_BLOCK,
            keys_created_ms: 0,
            recv_highest: None,
            created_ms: 0,
            lifetime_deadline_ms: 0,
            transport_lost_deadline_ms: 0,
        }
    }

    #[test]
    fn a_view_keeps_the_newest_revision_and_tells_a_node_what_it_lost_or_is_asked() {
        let me = NodeId("gw-1".into());
        let mut view = ClusterView::new(me.clone(), 2);
        assert_eq!(view.put(owned_by(1, "gw-1"), 10), None);
        // A late report of an older revision changes nothing.
        assert_eq!(view.put(owned_by(1, "gw-2"), 9), None);
        assert_eq!(
            view.get(SessionId(1)).map(|(r, _)| r.owner.clone()),
            Some(me.clone())
        );
        // Asked for it.
        let mut asked = owned_by(1, "gw-1");
        asked.handover_to = Some(NodeId("gw-2".into()));
        assert_eq!(
            view.put(asked, 11),
            Some(Notice::HandoverAsked {
                session: SessionId(1),
                to: NodeId("gw-2".into())
            })
        );
        // Taken.
        assert_eq!(
            view.put(owned_by(1, "gw-2"), 12),
            Some(Notice::Lost(SessionId(1)))
        );
        // Another node's session moving between others: nothing for this node.
        assert_eq!(view.put(owned_by(2, "gw-3"), 13), None);
        assert_eq!(view.put(owned_by(2, "gw-2"), 14), None);
        // Full: a third record is counted, not kept.
        assert_eq!(view.put(owned_by(3, "gw-3"), 15), None);
        assert_eq!((view.len(), view.overflowed), (2, 1));
        // Full, but a record of this node's own is kept; once it moves on to another
        // node, it makes room again.
        assert_eq!(view.put(owned_by(4, "gw-1"), 16), None);
        assert_eq!(view.len(), 3);
        assert_eq!(
            view.put(owned_by(4, "gw-3"), 17),
            Some(Notice::Lost(SessionId(4)))
        );
        assert_eq!((view.len(), view.overflowed), (2, 2));
        // A removal of an own session is a loss; an older removal is ignored.
        view.reset(vec![(owned_by(5, "gw-1"), 20)]);
        assert_eq!(view.remove(SessionId(5), 19), None);
        assert_eq!(
            view.remove(SessionId(5), 21),
            Some(Notice::Lost(SessionId(5)))
        );
        assert!(view.is_empty());
    }

    #[test]
    fn an_unknown_session_is_answered_as_a_standby_taken_over_or_asked_for() {
        let me = NodeId("gw-1".into());
        let mut view = ClusterView::new(me, 8);
        view.put(owned_by(1, "gw-2"), 10);
        view.put(owned_by(2, "gw-1"), 11);
        view.set_live([NodeId("gw-1".into()), NodeId("gw-2".into())]);
        assert_eq!(
            view.unknown(SessionId(9), PacketType::Probe),
            Unknown::NotInTable
        );
        assert!(matches!(
            view.unknown(SessionId(1), PacketType::Probe),
            Unknown::Standby(_)
        ));
        assert!(matches!(
            view.unknown(SessionId(1), PacketType::ReattachRequest),
            Unknown::AskOwner(_, 10)
        ));
        assert_eq!(
            view.unknown(SessionId(1), PacketType::Data),
            Unknown::Ignore
        );
        // Its owner's lease is gone: taken over directly.
        view.set_live([NodeId("gw-1".into())]);
        assert!(matches!(
            view.unknown(SessionId(1), PacketType::ReattachRequest),
            Unknown::TakeOver(_, 10)
        ));
        // A record a previous run of this node left: a reattach takes it back from the
        // table; a probe of it is not answered as a standby.
        assert!(matches!(
            view.unknown(SessionId(2), PacketType::ReattachRequest),
            Unknown::TakeOver(_, 11)
        ));
        assert_eq!(
            view.unknown(SessionId(2), PacketType::Probe),
            Unknown::Ignore
        );
    }

    #[test]
    fn an_orphan_ends_by_its_lifetime_or_its_transport_ttl_counted_from_the_owners_loss() {
        use crate::fsm::TerminationCause;
        let mut r = owned_by(1, "gw-2");
        r.lifetime_deadline_ms = 100_000;
        r.transport_lost_deadline_ms = 20_000;
        // The owner was found gone at 30 s: the client could have been heard until
        // then, so the TTL (15 s) counts from there, not from the stale record.
        assert_eq!(orphan_end(&r, 40_000, 30_000, 15_000), None);
        assert_eq!(
            orphan_end(&r, 45_000, 30_000, 15_000),
            Some(TerminationCause::TransportTtlExceeded)
        );
        // A record written later than the loss keeps its own deadline.
        r.transport_lost_deadline_ms = 50_000;
        assert_eq!(orphan_end(&r, 45_000, 30_000, 15_000), None);
        assert_eq!(
            orphan_end(&r, 100_000, 30_000, 15_000),
            Some(TerminationCause::LifetimeExceeded)
        );
        r.state = "TERMINATED".into();
        assert_eq!(orphan_end(&r, 200_000, 30_000, 15_000), None);
    }

    #[test]
    fn a_reservation_is_renewed_half_a_block_before_it_runs_out() {
        assert_eq!(reservation_wanted(0, u64::MAX), None);
        assert_eq!(reservation_wanted(0, COUNTER_BLOCK), None);
        assert_eq!(
            reservation_wanted(COUNTER_BLOCK / 2, COUNTER_BLOCK),
            Some(2 * COUNTER_BLOCK)
        );
        assert_eq!(
            reservation_wanted(COUNTER_BLOCK, COUNTER_BLOCK),
            Some(2 * COUNTER_BLOCK)
        );
    }

    #[test]
    fn bad_cluster_keys_are_refused() {
        assert_eq!(
            ClusterKey::from_base64("short").err(),
            Some(ClusterError::BadKey)
        );
        assert_eq!(
            ClusterKey::from_base64("AAAA").err(),
            Some(ClusterError::BadKey)
        );
    }

    #[test]
    fn records_round_trip_and_oversized_or_malformed_ones_are_refused() {
        let record = ClusterRecord {
            session_id: SessionId(0x5e55),
            owner: NodeId("gw-1".into()),
            handover_to: None,
            client: PublicKey([1; 32]).to_string(),
            state: "ATTACHED".into(),
            state_version: 4,
            bound_at: 4,
            binding: Some("udp://10.201.1.2:40000".into()),
            sealed_keys: "x".into(),
            send_reserved_until: COUNTER_BLOCK,
            keys_created_ms: 1,
            recv_highest: Some(9),
            created_ms: 1,
            lifetime_deadline_ms: 2,
            transport_lost_deadline_ms: 3,
        };
        let bytes = record.encode();
        assert_eq!(ClusterRecord::decode(&bytes), Ok(record));
        assert!(ClusterRecord::decode(b"{\"session_id\":1}").is_err());
        assert!(ClusterRecord::decode(&vec![b' '; MAX_RECORD_LEN + 1]).is_err());
    }
}
