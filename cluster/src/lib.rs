//! The gateway cluster's session table on etcd (spec/cluster.md): one key per session
//! holding its [`ClusterRecord`], one key per live node bound to the node's lease, and
//! every write a transaction that compares the revision the writer read, so that of any
//! number of concurrent writers from one revision exactly one wins.
//!
//! Asynchronous and never on the packet path: the runtime calls it from an actor of its
//! own, and the core only ever sees what it returned.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, TlsOptions, Txn,
    TxnOp, WatchOptions,
};
use jvpn_core::cluster::{ClusterError, ClusterRecord};
use jvpn_core::ids::{NodeId, SessionId};
use thiserror::Error;

/// A value with the revision it was last written at (etcd's `mod_revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    /// The value.
    pub value: T,
    /// Its revision: what a conditional write compares.
    pub revision: i64,
}

/// Why the table refused or failed.
#[derive(Debug, Error)]
pub enum TableError {
    /// etcd could not be reached or answered with an error.
    #[error("the session store (etcd) is unavailable: {0}")]
    Unavailable(String),
    /// The record changed since the writer read it (or exists, for a create): nothing
    /// was written. `current` is the record as it is now, if there is one.
    #[error("the session record changed since it was read (ownership conflict)")]
    Conflict {
        /// The record now.
        current: Option<Box<Versioned<ClusterRecord>>>,
    },
    /// A stored record could not be read.
    #[error(transparent)]
    Malformed(#[from] ClusterError),
}

impl From<etcd_client::Error> for TableError {
    fn from(e: etcd_client::Error) -> Self {
        TableError::Unavailable(e.to_string())
    }
}

/// How to reach etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    /// Client URLs (`http://10.0.9.1:2379`, or `https://…` with `tls_ca`).
    pub endpoints: Vec<String>,
    /// The key prefix all of this cluster's keys live under (e.g. `/jvpn`).
    pub prefix: String,
    /// User name and password, when etcd has authentication on.
    pub user: Option<(String, String)>,
    /// The CA certificate (PEM) that signs etcd's server certificate.
    pub tls_ca: Option<Vec<u8>>,
    /// A client certificate and key (PEM), when etcd asks for one.
    pub tls_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// How long one request may take.
    pub timeout: Duration,
}

/// A change to a session's record, as a watch reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Written (created or replaced).
    Put(Box<Versioned<ClusterRecord>>),
    /// Removed.
    Deleted(SessionId),
    /// A record was written that this node cannot read (skipped; the watch goes on):
    /// the session it is of, if its key names one, and why.
    Unreadable(Option<SessionId>, String),
}

/// The table.
#[derive(Clone)]
pub struct EtcdTable {
    client: Client,
    prefix: String,
}

impl EtcdTable {
    /// Connects to etcd.
    pub async fn connect(options: &EtcdOptions) -> Result<EtcdTable, TableError> {
        let mut connect = ConnectOptions::new()
            .with_timeout(options.timeout)
            .with_connect_timeout(options.timeout)
            .with_keep_alive(Duration::from_secs(5), options.timeout);
        if let Some((user, password)) = &options.user {
            connect = connect.with_user(user.clone(), password.clone());
        }
        if options.tls_ca.is_some() || options.tls_identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &options.tls_ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &options.tls_identity {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            connect = connect.with_tls(tls);
        }
        let client = Client::connect(&options.endpoints, Some(connect)).await?;
        Ok(EtcdTable {
            client,
            prefix: options.prefix.trim_end_matches('/').to_string(),
        })
    }

    fn session_key(&self, id: SessionId) -> String {
        format!("{}/sessions/{id}", self.prefix)
    }

    fn sessions_prefix(&self) -> String {
        format!("{}/sessions/", self.prefix)
    }

    fn node_key(&self, node: &NodeId) -> String {
        format!("{}/nodes/{node}", self.prefix)
    }

    /// The condition that `node` holds no live lease (its key is gone).
    fn node_gone(&self, node: &NodeId) -> Compare {
        Compare::create_revision(self.node_key(node), CompareOp::Equal, 0)
    }

    fn nodes_prefix(&self) -> String {
        format!("{}/nodes/", self.prefix)
    }

    /// Announces `node` as live under a new lease of `ttl`; returns the lease. The node
    /// stays listed while [`EtcdTable::keep_alive`] renews the lease within `ttl`.
    pub async fn register(&self, node: &NodeId, ttl: Duration) -> Result<i64, TableError> {
        let mut client = self.client.clone();
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = client.lease_grant(seconds, None).await?.id();
        client
            .put(
                self.node_key(node),
                node.0.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(lease)
    }

    /// Renews `lease` once, within `limit`; the seconds it has left (0: it expired, the
    /// node is no longer listed). A renewal that takes longer is `Unavailable`: the
    /// caller's fencing delay counts from the last one that succeeded.
    pub async fn keep_alive(&self, lease: i64, limit: Duration) -> Result<i64, TableError> {
        let renew = async {
            let (mut keeper, mut stream) = self.client.clone().lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            match stream.message().await? {
                Some(answer) => Ok(answer.ttl()),
                None => Err(TableError::Unavailable("the lease stream closed".into())),
            }
        };
        tokio::time::timeout(limit, renew)
            .await
            .unwrap_or_else(|_| {
                Err(TableError::Unavailable(format!(
                    "no renewal within {limit:?}"
                )))
            })
    }

    /// Gives the lease up at once: the node's key goes with it, and every other node
    /// may take its sessions from now on (a node that stops gracefully).
    pub async fn revoke(&self, lease: i64) -> Result<(), TableError> {
        self.client.clone().lease_revoke(lease).await?;
        Ok(())
    }

    /// The nodes whose lease is alive.
    pub async fn live_nodes(&self) -> Result<Vec<NodeId>, TableError> {
        let answer = self
            .client
            .clone()
            .get(self.nodes_prefix(), Some(GetOptions::new().with_prefix()))
            .await?;
        Ok(answer
            .kvs()
            .iter()
            .filter_map(|kv| kv.value_str().ok().map(|v| NodeId(v.to_string())))
            .collect())
    }

    /// The record of `id`, if any.
    pub async fn get(&self, id: SessionId) -> Result<Option<Versioned<ClusterRecord>>, TableError> {
        let answer = self.client.clone().get(self.session_key(id), None).await?;
        match answer.kvs().first() {
            Some(kv) => Ok(Some(Versioned {
                value: ClusterRecord::decode(kv.value())?,
                revision: kv.mod_revision(),
            })),
            None => Ok(None),
        }
    }

    /// Every record, the table's revision they were read at (a watch from it misses
    /// nothing), and how many records could not be read (skipped).
    pub async fn list(&self) -> Result<(Vec<Versioned<ClusterRecord>>, i64, usize), TableError> {
        let answer = self
            .client
            .clone()
            .get(
                self.sessions_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
        let mut unreadable = 0;
        let records = answer
            .kvs()
            .iter()
            .filter_map(|kv| match ClusterRecord::decode(kv.value()) {
                Ok(value) => Some(Versioned {
                    value,
                    revision: kv.mod_revision(),
                }),
                // One bad record must not blind the node to all the others.
                Err(_) => {
                    unreadable += 1;
                    None
                }
            })
            .collect();
        Ok((records, revision, unreadable))
    }

    /// Writes `record` if the session's key is at `expected` (`None`: absent); returns
    /// the new revision, or the record as it is now.
    async fn write_if(
        &self,
        expected: Option<i64>,
        record: &ClusterRecord,
        gone: Option<&NodeId>,
    ) -> Result<i64, TableError> {
        if expected.is_some_and(|r| r <= 0) {
            return Err(TableError::Conflict { current: None });
        }
        let key = self.session_key(record.session_id);
        let mut compare = vec![match expected {
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Some(revision) => Compare::mod_revision(key.clone(), CompareOp::Equal, revision),
        }];
        compare.extend(gone.map(|node| self.node_gone(node)));
        let txn = Txn::new()
            .when(compare)
            .and_then([TxnOp::put(key.clone(), record.encode(), None)])
            .or_else([TxnOp::get(key, None)]);
        let answer = self.client.clone().txn(txn).await?;
        let revision = answer.header().map(|h| h.revision()).unwrap_or(0);
        if answer.succeeded() {
            return Ok(revision);
        }
        Err(TableError::Conflict {
            current: current_of(&answer),
        })
    }

    /// Creates the record of a new session; refused if one exists.
    pub async fn create(&self, record: &ClusterRecord) -> Result<i64, TableError> {
        self.write_if(None, record, None).await
    }

    /// Replaces the record if it is still at `expected` (its owner's update, or a
    /// takeover); of any number of concurrent swaps from one revision exactly one wins.
    pub async fn swap(&self, expected: i64, record: &ClusterRecord) -> Result<i64, TableError> {
        self.write_if(Some(expected), record, None).await
    }

    /// [`EtcdTable::swap`], on the further condition that node `owner` holds no live
    /// lease: a takeover from a dead owner is decided in the same transaction that makes
    /// it, not on a listing of the live nodes that may be old.
    pub async fn swap_from_gone(
        &self,
        expected: i64,
        record: &ClusterRecord,
        owner: &NodeId,
    ) -> Result<i64, TableError> {
        self.write_if(Some(expected), record, Some(owner)).await
    }

    /// Removes the record if it is still at `expected` (and, with `gone`, if that node
    /// holds no live lease: an orphan's end).
    pub async fn remove(
        &self,
        id: SessionId,
        expected: i64,
        gone: Option<&NodeId>,
    ) -> Result<(), TableError> {
        if expected <= 0 {
            return Err(TableError::Conflict { current: None });
        }
        let key = self.session_key(id);
        let mut compare = vec![Compare::mod_revision(
            key.clone(),
            CompareOp::Equal,
            expected,
        )];
        compare.extend(gone.map(|node| self.node_gone(node)));
        let txn = Txn::new()
            .when(compare)
            .and_then([TxnOp::delete(key.clone(), None)])
            .or_else([TxnOp::get(key, None)]);
        let answer = self.client.clone().txn(txn).await?;
        if answer.succeeded() {
            return Ok(());
        }
        Err(TableError::Conflict {
            current: current_of(&answer),
        })
    }

    /// Watches every session record from `after` on (a revision returned by a read or
    /// write; 0: from now); `changes` gets each change, in order, until it is dropped
    /// or the watch fails.
    pub async fn watch(
        &self,
        after: i64,
        changes: tokio::sync::mpsc::Sender<Result<Change, TableError>>,
    ) -> Result<(), TableError> {
        let mut options = WatchOptions::new().with_prefix();
        if after > 0 {
            options = options.with_start_revision(after + 1);
        }
        let mut stream = self
            .client
            .clone()
            .watch(self.sessions_prefix(), Some(options))
            .await?;
        let prefix = self.sessions_prefix();
        let id_of = |kv: &etcd_client::KeyValue| -> Option<SessionId> {
            kv.key_str()
                .ok()
                .and_then(|k| k.strip_prefix(&prefix))
                .and_then(|id| id.parse().ok())
        };
        while let Some(answer) = stream.message().await? {
            if answer.canceled() {
                // Compacted past `after`, or cancelled by etcd: the caller lists again.
                return Err(TableError::Unavailable(format!(
                    "the watch was cancelled ({}; compacted to {})",
                    answer.cancel_reason(),
                    answer.compact_revision()
                )));
            }
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                let change = match event.event_type() {
                    EventType::Put => Ok(match ClusterRecord::decode(kv.value()) {
                        Ok(value) => Change::Put(Box::new(Versioned {
                            value,
                            revision: kv.mod_revision(),
                        })),
                        Err(e) => Change::Unreadable(id_of(kv), e.to_string()),
                    }),
                    EventType::Delete => match id_of(kv) {
                        Some(id) => Ok(Change::Deleted(id)),
                        None => continue,
                    },
                };
                if changes.send(change).await.is_err() {
                    return Ok(());
                }
            }
        }
        Err(TableError::Unavailable("the watch ended".into()))
    }
}

/// The record a failed transaction read in its `or_else` branch (none if absent or
/// unreadable: the conflict stands, only its content is unknown).
fn current_of(answer: &etcd_client::TxnResponse) -> Option<Box<Versioned<ClusterRecord>>> {
    answer.op_responses().into_iter().find_map(|op| match op {
        etcd_client::TxnOpResponse::Get(get) => get.kvs().first().and_then(|kv| {
            let value = ClusterRecord::decode(kv.value()).ok()?;
            Some(Box::new(Versioned {
                value,
                revision: kv.mod_revision(),
            }))
        }),
        _ => None,
    })
}
