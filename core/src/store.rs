//! The session table contract: read, create, compare-and-swap on `state_version`,
//! remove, list — and an in-memory implementation that is the embedded default.
//!
//! The compare-and-swap is what keeps a session from ever being bound twice: a binding
//! change is only ever written as a whole new record conditioned on the version the
//! writer read, and a record holds at most one active binding by construction. A
//! distributed backend implements the same trait with the same guarantees.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use thiserror::Error;

use crate::event::TransportRef;
use crate::fsm::State;
use crate::ids::{NodeId, SessionId, StateVersion};
use crate::reason::ReasonCode;

/// The single active transport binding of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The bound transport.
    pub transport: TransportRef,
    /// The peer's address on it, as the binding node sees it.
    pub remote: Option<std::net::SocketAddr>,
    /// The record version under which the binding was accepted.
    pub bound_at: StateVersion,
    /// The node that accepted it.
    pub node: NodeId,
}

/// One session as the table knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    /// Identity; never changes.
    pub session_id: SessionId,
    /// Current state.
    pub state: State,
    /// Mutations so far.
    pub state_version: StateVersion,
    /// The node allowed to write this record.
    pub owner: NodeId,
    /// At most one active binding: an `Option`, so two can never coexist.
    pub active_binding: Option<Binding>,
    /// Known candidate transports (bounded by the store's candidate limit).
    pub candidates: Vec<TransportRef>,
    /// When the session must end by lifetime.
    pub lifetime_deadline: Instant,
    /// When the session ends unless its peer is heard before.
    pub transport_lost_deadline: Instant,
    /// When the reattach in flight must have completed, while RECOVERING.
    pub recovery_deadline: Option<Instant>,
}

/// Why the store refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StoreError {
    /// No record with that id.
    #[error("session {0} is not in the table")]
    NotFound(SessionId),
    /// A record with that id exists already.
    #[error("session {0} already exists")]
    AlreadyExists(SessionId),
    /// The table holds its maximum number of sessions.
    #[error("session table is full ({capacity} sessions)")]
    Full {
        /// The configured maximum.
        capacity: usize,
    },
    /// The record changed since the caller read it.
    #[error("stale state_version: expected {expected}, record is at {actual}")]
    StaleVersion {
        /// What the caller read.
        expected: StateVersion,
        /// What the record holds.
        actual: StateVersion,
    },
    /// The new record does not advance the version.
    #[error("new state_version {new} does not advance {expected}")]
    VersionNotAdvanced {
        /// What the caller read.
        expected: StateVersion,
        /// What the caller tried to write.
        new: StateVersion,
    },
    /// The writer is not the record's owner.
    #[error("node {writer} is not the owner ({owner}) of the session")]
    NotOwner {
        /// Who tried.
        writer: NodeId,
        /// Who owns it.
        owner: NodeId,
    },
    /// More candidates than the store's limit.
    #[error("{count} candidates exceed the limit of {limit}")]
    TooManyCandidates {
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },
}

impl StoreError {
    /// The reason code a refusal is reported with.
    pub fn reason(&self) -> ReasonCode {
        match self {
            StoreError::NotFound(_) => ReasonCode::UnknownSession,
            StoreError::StaleVersion { .. } => ReasonCode::StaleStateVersion,
            StoreError::TooManyCandidates { .. } => ReasonCode::InvalidTransportCandidate,
            StoreError::AlreadyExists(_)
            | StoreError::Full { .. }
            | StoreError::VersionNotAdvanced { .. }
            | StoreError::NotOwner { .. } => ReasonCode::AtomicityFailed,
        }
    }
}

/// The session table. Every method is atomic with respect to every other.
pub trait SessionStore: Send + Sync {
    /// The record of `id`, if any.
    fn get(&self, id: SessionId) -> Option<SessionRecord>;

    /// Inserts a new record; refused if the id exists or the table is full.
    fn create(&self, record: SessionRecord) -> Result<(), StoreError>;

    /// Replaces the record of `new.session_id` with `new` if, and only if, the stored
    /// version is `expected`, `new` advances it, and `writer` owns the record. Exactly
    /// one of any number of concurrent swaps from the same version succeeds.
    fn compare_and_swap(
        &self,
        writer: &NodeId,
        expected: StateVersion,
        new: SessionRecord,
    ) -> Result<(), StoreError>;

    /// Removes the record if it is still at `expected`; returns it.
    fn remove(&self, id: SessionId, expected: StateVersion) -> Result<SessionRecord, StoreError>;

    /// Every record (at most the table's capacity).
    fn list(&self) -> Vec<SessionRecord>;

    /// Number of records.
    fn len(&self) -> usize;

    /// Whether the table is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const SHARDS: usize = 16;

/// The in-memory table: sharded by session id so that sessions on different shards never
/// contend, bounded by a capacity.
#[derive(Debug)]
pub struct MemoryStore {
    shards: [Mutex<HashMap<SessionId, SessionRecord>>; SHARDS],
    len: AtomicUsize,
    capacity: usize,
    max_candidates: usize,
}

impl MemoryStore {
    /// An empty table for at most `capacity` sessions with at most `max_candidates`
    /// candidates each.
    pub fn new(capacity: usize, max_candidates: usize) -> Self {
        MemoryStore {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            len: AtomicUsize::new(0),
            capacity,
            max_candidates,
        }
    }

    fn shard(&self, id: SessionId) -> MutexGuard<'_, HashMap<SessionId, SessionRecord>> {
        // Session ids are random, so their low bits spread evenly. A poisoned shard only
        // means a panic elsewhere while holding it; records are replaced whole, so the
        // map is still consistent and stays usable.
        self.shards[(id.0 % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn check_candidates(&self, record: &SessionRecord) -> Result<(), StoreError> {
        if record.candidates.len() > self.max_candidates {
            return Err(StoreError::TooManyCandidates {
                count: record.candidates.len(),
                limit: self.max_candidates,
            });
        }
        Ok(())
    }
}

impl SessionStore for MemoryStore {
    fn get(&self, id: SessionId) -> Option<SessionRecord> {
        self.shard(id).get(&id).cloned()
    }

    fn create(&self, record: SessionRecord) -> Result<(), StoreError> {
        self.check_candidates(&record)?;
        let id = record.session_id;
        let mut shard = self.shard(id);
        if shard.contains_key(&id) {
            return Err(StoreError::AlreadyExists(id));
        }
        let reserved = self
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            });
        if reserved.is_err() {
            return Err(StoreError::Full {
                capacity: self.capacity,
            });
        }
        shard.insert(id, record);
        Ok(())
    }

    fn compare_and_swap(
        &self,
        writer: &NodeId,
        expected: StateVersion,
        new: SessionRecord,
    ) -> Result<(), StoreError> {
        self.check_candidates(&new)?;
        let id = new.session_id;
        let mut shard = self.shard(id);
        let current = shard.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        if current.state_version != expected {
            return Err(StoreError::StaleVersion {
                expected,
                actual: current.state_version,
            });
        }
        if &current.owner != writer {
            return Err(StoreError::NotOwner {
                writer: writer.clone(),
                owner: current.owner.clone(),
            });
        }
        if new.state_version <= expected {
            return Err(StoreError::VersionNotAdvanced {
                expected,
                new: new.state_version,
            });
        }
        *current = new;
        Ok(())
    }

    fn remove(&self, id: SessionId, expected: StateVersion) -> Result<SessionRecord, StoreError> {
        let mut shard = self.shard(id);
        let current = shard.get(&id).ok_or(StoreError::NotFound(id))?;
        if current.state_version != expected {
            return Err(StoreError::StaleVersion {
                expected,
                actual: current.state_version,
            });
        }
        let removed = shard.remove(&id).ok_or(StoreError::NotFound(id))?;
        self.len.fetch_sub(1, Ordering::AcqRel);
        Ok(removed)
    }

    fn list(&self) -> Vec<SessionRecord> {
        let mut all = Vec::with_capacity(self.len());
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            all.extend(shard.values().cloned());
        }
        all
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{Protocol, TransportId};
    use std::sync::Arc;
    use std::time::Duration;

    fn node(name: &str) -> NodeId {
        NodeId(name.into())
    }

    fn record(id: u64) -> SessionRecord {
        let now = Instant::now();
        SessionRecord {
            session_id: SessionId(id),
            state: State::Birth,
            state_version: StateVersion(0),
            owner: node("gw-1"),
            active_binding: None,
            candidates: Vec::new(),
            lifetime_deadline: now + Duration::from_secs(60),
            transport_lost_deadline: now + Duration::from_secs(15),
            recovery_deadline: None,
        }
    }

    fn bound_to(mut r: SessionRecord, transport: u32) -> SessionRecord {
        r.state_version = r.state_version.next();
        r.active_binding = Some(Binding {
            transport: TransportRef {
                id: TransportId(transport),
                protocol: Protocol::Udp,
            },
            remote: None,
            bound_at: r.state_version,
            node: r.owner.clone(),
        });
        r
    }

    #[test]
    fn stale_versions_wrong_owners_and_non_advancing_writes_are_refused() {
        let store = MemoryStore::new(10, 3);
        store.create(record(1)).expect("create");
        let gw = node("gw-1");
        let first = bound_to(record(1), 1);
        store
            .compare_and_swap(&gw, StateVersion(0), first.clone())
            .expect("cas");
        let err = store
            .compare_and_swap(&gw, StateVersion(0), bound_to(record(1), 2))
            .expect_err("stale cas accepted");
        assert_eq!(err.reason(), ReasonCode::StaleStateVersion);
        let err = store
            .compare_and_swap(&node("gw-2"), StateVersion(1), bound_to(first.clone(), 2))
            .expect_err("foreign writer accepted");
        assert!(matches!(err, StoreError::NotOwner { .. }));
        let err = store
            .compare_and_swap(&gw, StateVersion(1), first.clone())
            .expect_err("non-advancing write accepted");
        assert!(matches!(err, StoreError::VersionNotAdvanced { .. }));
        assert_eq!(
            store.get(SessionId(1)),
            Some(first),
            "a refused write changed the record"
        );
    }

    #[test]
    fn capacity_and_candidate_bounds_are_enforced() {
        let store = MemoryStore::new(2, 1);
        store.create(record(1)).expect("create");
        assert_eq!(
            store.create(record(1)),
            Err(StoreError::AlreadyExists(SessionId(1)))
        );
        store.create(record(2)).expect("create");
        assert_eq!(
            store.create(record(3)),
            Err(StoreError::Full { capacity: 2 })
        );
        let r = store.remove(SessionId(2), StateVersion(0)).expect("remove");
        assert_eq!(r.session_id, SessionId(2));
        let mut many = record(3);
        let t = TransportRef {
            id: TransportId(1),
            protocol: Protocol::Udp,
        };
        many.candidates = vec![t, t];
        assert!(matches!(
            store.create(many),
            Err(StoreError::TooManyCandidates { .. })
        ));
        store.create(record(3)).expect("room again after remove");
        assert_eq!(store.len(), 2);
        assert_eq!(store.list().len(), 2);
    }

    #[test]
    fn concurrent_swaps_have_exactly_one_winner_per_version_and_lose_no_update() {
        const THREADS: u32 = 8;
        const ATTEMPTS: u32 = 2_000;
        let store = Arc::new(MemoryStore::new(4, 3));
        store.create(record(7)).expect("create");
        let gw = node("gw-1");
        let winners: Vec<Vec<(u64, u32)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|t| {
                    let store = Arc::clone(&store);
                    let gw = gw.clone();
                    s.spawn(move || {
                        let mut won = Vec::new();
                        for _ in 0..ATTEMPTS {
                            let Some(read) = store.get(SessionId(7)) else {
                                continue;
                            };
                            let expected = read.state_version;
                            // Each writer binds its own transport: a lost update would
                            // show as a version whose binding is not its winner's.
                            let new = bound_to(read, t);
                            if store.compare_and_swap(&gw, expected, new).is_ok() {
                                won.push((expected.0 + 1, t));
                            }
                        }
                        won
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let mut all: Vec<(u64, u32)> = winners.into_iter().flatten().collect();
        all.sort_unstable();
        let versions: Vec<u64> = all.iter().map(|(v, _)| *v).collect();
        let expected: Vec<u64> = (1..=all.len() as u64).collect();
        assert_eq!(versions, expected, "a version had zero or several winners");
        let final_record = store.get(SessionId(7)).expect("record");
        assert_eq!(final_record.state_version.0, all.len() as u64);
        let (_, last_winner) = all[all.len() - 1];
        let binding = final_record.active_binding.expect("bound");
        assert_eq!(binding.transport.id, TransportId(last_winner));
        assert_eq!(binding.bound_at, final_record.state_version);
    }
}
