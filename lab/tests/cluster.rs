//! The gateway cluster's session table against a real etcd (Debian `etcd-server`),
//! started by the test in a namespace of its own lab and stopped with it.
//!
//! Needs root (see lab/tests/e2e.rs for how a missing prerequisite is handled).

use std::sync::Mutex;
use std::time::Duration;

use jvpn_cluster::{Change, EtcdOptions, EtcdTable, TableError};
use jvpn_core::cluster::{ClusterRecord, COUNTER_BLOCK};
use jvpn_core::ids::{NodeId, SessionId};
use jvpn_lab::{lab_or_skip, run_in_ns, start_etcd};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn record(id: u64, owner: &str) -> ClusterRecord {
    ClusterRecord {
        session_id: SessionId(id),
        owner: NodeId(owner.into()),
        handover_to: None,
        client: "fTvmLaY9K6CrY+3BrRi2XB7IEhGZvsDSh3pIyDsV0WY=".into(),
        state: "ATTACHED".into(),
        state_version: 1,
        bound_at: 1,
        binding: Some("udp://10.201.1.2:40000".into()),
        sealed_keys: String::new(),
        send_reserved_until: COUNTER_BLOCK,
        created_ms: 1,
        lifetime_deadline_ms: 2,
        transport_lost_deadline_ms: 3,
    }
}

fn options(endpoint: &str) -> EtcdOptions {
    EtcdOptions {
        endpoints: vec![endpoint.to_string()],
        prefix: "/jvpn-test".into(),
        timeout: Duration::from_secs(5),
        ..EtcdOptions::default()
    }
}

/// Rounds of 1,000 concurrent takeovers of one record (over 10 connections), each
/// conditioned on the revision all of them read: exactly one wins each round, every
/// loser is told the winner's record, and the table holds the winner's.
#[test]
fn a_thousand_concurrent_takeovers_of_one_record_have_exactly_one_winner_each_round() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab_or_skip("c1") else {
        return;
    };
    let ns = lab.ns("g");
    let endpoint = start_etcd(&mut lab, "etcd", &ns, "127.0.0.1").expect("etcd");
    let rounds = run_in_ns(&ns, move || async move {
        let mut tables = Vec::new();
        for _ in 0..10 {
            tables.push(
                EtcdTable::connect(&options(&endpoint))
                    .await
                    .expect("connect"),
            );
        }
        let mut winners = Vec::new();
        for round in 0..5u64 {
            let id = 0x1000 + round;
            let revision = tables[0]
                .create(&record(id, "gw-owner"))
                .await
                .expect("create");
            let mut attempts = tokio::task::JoinSet::new();
            for i in 0..1000usize {
                let table = tables[i % tables.len()].clone();
                attempts.spawn(async move {
                    let mut taken = record(id, &format!("gw-{i}"));
                    taken.state_version = 2;
                    (i, table.swap(revision, &taken).await)
                });
            }
            let (mut won, mut lost) = (Vec::new(), Vec::new());
            while let Some(done) = attempts.join_next().await {
                let (i, result) = done.expect("task");
                match result {
                    Ok(new_revision) => won.push((i, new_revision)),
                    Err(TableError::Conflict { current }) => lost.push(current),
                    Err(e) => panic!("attempt {i}: {e}"),
                }
            }
            assert_eq!(won.len(), 1, "round {round}: {} winners", won.len());
            let (winner, new_revision) = won[0];
            let owner = NodeId(format!("gw-{winner}"));
            assert_eq!(lost.len(), 999);
            for current in &lost {
                let current = current.as_ref().expect("the loser is told the record");
                assert_eq!(current.value.owner, owner);
                assert_eq!(current.revision, new_revision);
            }
            let stored = tables[0]
                .get(SessionId(id))
                .await
                .expect("get")
                .expect("record");
            assert_eq!(stored.value.owner, owner);
            assert_eq!(stored.revision, new_revision);
            winners.push(owner);
        }
        winners
    })
    .expect("the rounds");
    assert_eq!(rounds.len(), 5);
    println!("CLUSTER takeover rounds: winners {rounds:?}");
}

/// The rest of the table's contract: a create never overwrites, a stale remove is
/// refused, a node is listed while its lease lives and not after, and a watch reports
/// every write and removal in order.
#[test]
fn the_table_refuses_stale_writes_and_reports_leases_and_changes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab_or_skip("c2") else {
        return;
    };
    let ns = lab.ns("g");
    let endpoint = start_etcd(&mut lab, "etcd", &ns, "127.0.0.1").expect("etcd");
    run_in_ns(&ns, move || async move {
        let table = EtcdTable::connect(&options(&endpoint))
            .await
            .expect("connect");
        let (tx, mut changes) = tokio::sync::mpsc::channel(16);
        let watcher = table.clone();
        tokio::spawn(async move { watcher.watch(0, tx).await });
        tokio::time::sleep(Duration::from_millis(200)).await;

        let first = table.create(&record(7, "gw-a")).await.expect("create");
        assert!(matches!(
            table.create(&record(7, "gw-b")).await,
            Err(TableError::Conflict { current: Some(c) }) if c.value.owner == NodeId("gw-a".into())
        ));
        let second = table.swap(first, &record(7, "gw-b")).await.expect("swap");
        assert!(second > first);
        assert!(matches!(
            table.remove(SessionId(7), first).await,
            Err(TableError::Conflict { .. })
        ));
        table.remove(SessionId(7), second).await.expect("remove");
        assert_eq!(table.get(SessionId(7)).await.expect("get"), None);
        let mut seen = Vec::new();
        for _ in 0..3 {
            let change = tokio::time::timeout(Duration::from_secs(5), changes.recv())
                .await
                .expect("a change in time")
                .expect("watching")
                .expect("a change");
            seen.push(match change {
                Change::Put(r) => format!("put {} {}", r.value.owner, r.revision),
                Change::Deleted(id) => format!("deleted {id}"),
            });
        }
        assert_eq!(
            seen,
            [
                format!("put gw-a {first}"),
                format!("put gw-b {second}"),
                format!("deleted {}", SessionId(7)),
            ]
        );

        let lease = table
            .register(&NodeId("gw-a".into()), Duration::from_secs(2))
            .await
            .expect("register");
        assert_eq!(
            table.live_nodes().await.expect("nodes"),
            [NodeId("gw-a".into())]
        );
        assert!(table.keep_alive(lease).await.expect("keep alive") > 0);
        // No more renewals: the node drops out once the lease runs out.
        let mut listed = true;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            listed = !table.live_nodes().await.expect("nodes").is_empty();
            if !listed {
                break;
            }
        }
        assert!(!listed, "a node without renewals is still listed");
    })
    .expect("the checks");
}
