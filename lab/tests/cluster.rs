//! The gateway cluster's session table against a real etcd (Debian `etcd-server`),
//! started by the test in a namespace of its own lab and stopped with it.
//!
//! Needs root (see lab/tests/e2e.rs for how a missing prerequisite is handled).

use std::sync::Mutex;
use std::time::Duration;

use jvpn::netlab::wait_until;
use jvpn_cluster::{Change, EtcdOptions, EtcdTable, TableError};
use jvpn_core::cluster::{ClusterRecord, COUNTER_BLOCK};
use jvpn_core::ids::{NodeId, SessionId};
use jvpn_lab::{lab_or_skip, run_in_ns, start_etcd};
use serde_json::Value;

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
        keys_created_ms: 1,
        recv_highest: None,
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
        // Watched from the revision an (empty) listing was read at: nothing after it
        // is missed, however soon it comes.
        let (listed, at, unreadable) = table.list().await.expect("list");
        assert_eq!(unreadable, 0);
        assert!(listed.is_empty());
        let (tx, mut changes) = tokio::sync::mpsc::channel(16);
        let watcher = table.clone();
        tokio::spawn(async move { watcher.watch(at, tx).await });

        let first = table.create(&record(7, "gw-a")).await.expect("create");
        assert!(matches!(
            table.create(&record(7, "gw-b")).await,
            Err(TableError::Conflict { current: Some(c) }) if c.value.owner == NodeId("gw-a".into())
        ));
        // Revision 0 names no record: refused, never an unconditional write.
        assert!(matches!(
            table.swap(0, &record(7, "gw-x")).await,
            Err(TableError::Conflict { .. })
        ));
        assert!(matches!(
            table.remove(SessionId(7), 0, None).await,
            Err(TableError::Conflict { .. })
        ));
        let second = table.swap(first, &record(7, "gw-b")).await.expect("swap");
        assert!(second > first);
        assert!(matches!(
            table.remove(SessionId(7), first, None).await,
            Err(TableError::Conflict { .. })
        ));
        table
            .remove(SessionId(7), second, None)
            .await
            .expect("remove");
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
                Change::Unreadable(_, why) => format!("unreadable {why}"),
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
        assert!(
            table
                .keep_alive(lease, Duration::from_secs(2))
                .await
                .expect("keep alive")
                > 0
        );
        // A takeover from a live owner, or an orphan's end, is refused in the same
        // transaction, whatever the taker believes.
        let a = NodeId("gw-a".into());
        let owned = table.create(&record(8, "gw-a")).await.expect("create");
        assert!(matches!(
            table.swap_from_gone(owned, &record(8, "gw-b"), &a).await,
            Err(TableError::Conflict { .. })
        ));
        assert!(matches!(
            table.remove(SessionId(8), owned, Some(&a)).await,
            Err(TableError::Conflict { .. })
        ));
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
        let taken = table
            .swap_from_gone(owned, &record(8, "gw-b"), &a)
            .await
            .expect("taken from a dead owner");
        table
            .remove(SessionId(8), taken, Some(&NodeId("gw-b".into())))
            .await
            .expect("gw-b never had a lease");
    })
    .expect("the checks");
}

/// The inside network on the host `ns`: `bridge`, with the host's address
/// ([`INSIDE_HOST`]/24) and an on-link route to the tunnel network (10.77.0.0/24), as a
/// host behind a cluster needs and nothing more.
fn inside_bridge(ns: &str, bridge: &str) {
    use jvpn::netlab::addr;
    use jvpn::netlink::{self, Route, RouteVia, MAIN_TABLE};
    let b = bridge.to_string();
    jvpn::netlab::in_ns(ns, move |h| async move {
        h.link()
            .add(rtnetlink::LinkBridge::new(&b).up().build())
            .execute()
            .await
            .map_err(netlink::kernel(format!("link add {b} type bridge")))?;
        netlink::add_address(&h, &b, addr(INSIDE_HOST), 24).await?;
        let route = Route {
            dst: addr("10.77.0.0"),
            prefix: 24,
            via: RouteVia::Device(b.clone()),
            table: MAIN_TABLE,
        };
        netlink::add_route(&h, &route).await
    })
    .expect("the inside bridge");
}

/// Makes `port` a port of `bridge`, both in namespace `ns`.
fn enslave(ns: &str, bridge: &str, port: &str) {
    use jvpn::netlink;
    let (b, p) = (bridge.to_string(), port.to_string());
    jvpn::netlab::in_ns(ns, move |h| async move {
        let br = netlink::link_index(&h, &b, "bridge").await?;
        let port = netlink::link_index(&h, &p, "port").await?;
        h.link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(port)
                    .controller(br)
                    .build(),
            )
            .execute()
            .await
            .map_err(netlink::kernel(format!("link set {p} master {b}")))
    })
    .expect("enslave");
}

/// The MAC address of `dev` in `ns`.
fn mac_of(ns: &str, dev: &str) -> String {
    let dev = dev.to_string();
    let mac = jvpn::netlab::in_ns(ns, move |h| async move {
        jvpn::netlink::link_mac(&h, &dev).await
    })
    .expect("mac");
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Where the inside host's neighbour table sends `ip` (its lladdr), if anywhere.
fn host_sends_to(lab: &jvpn::netlab::Lab, host: &str, ip: &str) -> Option<String> {
    use jvpn_lab::LabTools;
    let out = lab.exec_ok(host, &["ip", "neigh", "show", ip]).ok()?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_string)
}

/// A tunnel address follows the node that owns its session on the network behind the
/// cluster, as VRRP's address does: the owner answers ARP for it (a proxy entry), and a
/// node that takes it over announces it with a gratuitous ARP, which moves an inside
/// host's existing neighbour entry to the new node at once; the previous owner stops
/// answering.
#[test]
fn a_tunnel_address_is_answered_by_its_owner_and_follows_a_takeover() {
    use jvpn::netlab::{addr, in_ns};
    use jvpn::netlink::{self, Route, RouteVia, MAIN_TABLE};
    use jvpn_lab::LabTools;
    use std::net::Ipv4Addr;

    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab_or_skip("c3") else {
        return;
    };
    let (host, n1, n2) = (lab.ns("h"), lab.ns("n1"), lab.ns("n2"));
    for ns in [&host, &n1, &n2] {
        lab.add_namespace(ns).expect("namespace");
    }
    let bridge = format!("{host}br");
    inside_bridge(&host, &bridge);
    for (i, node) in [&n1, &n2].into_iter().enumerate() {
        let (inside, port) = (format!("{node}e"), format!("{host}{}", i + 1));
        let own = addr(&format!("10.210.0.{}", i + 1));
        lab.add_link((node, &inside, &[(own, 24)]), (&host, &port, &[]))
            .expect("link");
        enslave(&host, &bridge, &port);
        lab.exec_ok(node, &["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1"])
            .expect("forwarding");
        // Each node routes the tunnel network into a device of its own (its TUN in a
        // gateway; loopback here), which proxy ARP requires.
        in_ns(node, move |h| async move {
            let route = Route {
                dst: addr("10.77.0.0"),
                prefix: 24,
                via: RouteVia::Device("lo".into()),
                table: MAIN_TABLE,
            };
            netlink::add_route(&h, &route).await
        })
        .expect("the tunnel network's route");
    }
    let tunnel = Ipv4Addr::new(10, 77, 0, 2);
    let (mac1, mac2) = (
        mac_of(&n1, &format!("{n1}e")),
        mac_of(&n2, &format!("{n2}e")),
    );

    // Node 1 owns the session: the host resolves the address to node 1.
    let dev1 = format!("{n1}e");
    run_in_ns(&n1, move || async move {
        jvpn::announce::announce(&dev1, tunnel).await
    })
    .expect("thread")
    .expect("announce on node 1");
    let _ = lab.exec(&host, &["ping", "-c", "1", "-W", "1", "10.77.0.2"]);
    assert_eq!(host_sends_to(&lab, &host, "10.77.0.2"), Some(mac1.clone()));

    // Node 2 takes it over (past the neighbour entry's 1 s lock time): node 1 withdraws,
    // node 2 announces, and the host's entry moves without asking again.
    std::thread::sleep(Duration::from_millis(1_200));
    let dev1 = format!("{n1}e");
    run_in_ns(&n1, move || async move {
        jvpn::announce::withdraw(&dev1, tunnel).await
    })
    .expect("thread")
    .expect("withdraw on node 1");
    let dev2 = format!("{n2}e");
    run_in_ns(&n2, move || async move {
        jvpn::announce::announce(&dev2, tunnel).await
    })
    .expect("thread")
    .expect("announce on node 2");
    let moved = jvpn::netlab::wait_until(Duration::from_secs(1), || {
        host_sends_to(&lab, &host, "10.77.0.2").as_deref() == Some(mac2.as_str())
    });
    assert!(
        moved,
        "the host still sends to {:?}",
        host_sends_to(&lab, &host, "10.77.0.2")
    );
    // Node 1 no longer answers: with node 2 gone too, the address stops resolving.
    let dev2 = format!("{n2}e");
    run_in_ns(&n2, move || async move {
        jvpn::announce::withdraw(&dev2, tunnel).await
    })
    .expect("thread")
    .expect("withdraw on node 2");
    let b = bridge.clone();
    in_ns(&host, move |h| async move {
        let index = netlink::link_index(&h, &b, "bridge").await?;
        let mut flush = h.neighbours().add(index, addr("10.77.0.2"));
        let message = flush.message_mut().clone();
        h.neighbours()
            .del(message)
            .execute()
            .await
            .map_err(netlink::kernel("neigh del"))
    })
    .expect("forget the entry");
    let _ = lab.exec(&host, &["ping", "-c", "1", "-W", "1", "10.77.0.2"]);
    assert_eq!(host_sends_to(&lab, &host, "10.77.0.2"), None);
    assert_eq!(mac1.len(), 17);
}

/// The policy the cluster scenarios run under (client and nodes): fast heartbeats and
/// probes, so that a move takes a second or two; a recovery window that outlasts a
/// dead node's lease.
const CLUSTER_POLICY: &str = "[policy.volatility]\nheartbeat_interval_ms = 100\nheartbeat_volatile_ms = 600\nprobe_interval_ms = 200\nloss_window_ms = 1000\nvolatile_to_degraded_ms = 2000\n[policy.switching]\nswitch_cooldown_ms = 1000\nrecovery_window_ms = 15000\n[policy.session]\ntransport_lost_ttl_ms = 20000\n";

/// The inside host's address on the bridge: etcd and the server listen there.
const INSIDE_HOST: &str = "10.210.0.10";

/// A gateway cluster in namespaces: nodes `n1`…`nN`, each linked to the client
/// (10.220.i.0/24, the client's candidates in node order) and to a bridge on the inside
/// host `h` (10.210.0.0/24), where etcd and the server run; the inside host reaches
/// the tunnel network on-link (10.77.0.0/24 dev bridge), through whichever node answers
/// ARP for a tunnel address.
struct Cluster {
    lab: jvpn::netlab::Lab,
    nodes: usize,
    /// `[cluster]` lease and fencing, ms.
    lease: (u64, u64),
    /// Policy lines of the nodes and the client.
    policy: String,
}

impl Cluster {
    fn new(tag: &str, nodes: usize, lease: (u64, u64), policy: &str) -> Option<Cluster> {
        use jvpn::netlab::addr;
        let mut lab = lab_or_skip(tag)?;
        let (host, c) = (lab.ns("h"), lab.ns("c"));
        lab.add_namespace(&host).expect("namespace");
        let bridge = format!("{host}br");
        inside_bridge(&host, &bridge);
        let mut candidates = Vec::new();
        for i in 1..=nodes {
            let n = lab.ns(&format!("n{i}"));
            lab.add_namespace(&n).expect("namespace");
            lab.add_link(
                (
                    &c,
                    &format!("{c}{i}"),
                    &[(addr(&format!("10.220.{i}.2")), 24)],
                ),
                (
                    &n,
                    &format!("{n}c"),
                    &[(addr(&format!("10.220.{i}.1")), 24)],
                ),
            )
            .expect("client link");
            let port = format!("{host}{i}");
            lab.add_link(
                (
                    &n,
                    &format!("{n}e"),
                    &[(addr(&format!("10.210.0.{i}")), 24)],
                ),
                (&host, &port, &[]),
            )
            .expect("inside link");
            enslave(&host, &bridge, &port);
            candidates.push(format!("10.220.{i}.1:{}", jvpn::netlab::PORT));
        }
        start_etcd(&mut lab, "etcd", &host, INSIDE_HOST).expect("etcd");
        let key = jvpn_core::crypto::Keypair::generate().expect("key");
        lab.write("cluster.key", key.private_base64().as_str())
            .expect("cluster key");
        lab.client_candidates = candidates;
        lab.client_routes = "networks = [\"10.210.0.0/24\"]\n".into();
        Some(Cluster {
            lab,
            nodes,
            lease,
            policy: policy.to_string(),
        })
    }

    /// A cluster with every node up and the client attached to node 1; the session id.
    fn started(
        tag: &str,
        nodes: usize,
        lease: (u64, u64),
        policy: &str,
    ) -> Option<(Cluster, String)> {
        let mut k = Cluster::new(tag, nodes, lease, policy)?;
        k.start_nodes();
        let id = k.start_client();
        assert_eq!(k.holders(&id), [1], "{}", k.diagnostics());
        Some((k, id))
    }

    fn node_name(i: usize) -> String {
        format!("n{i}")
    }

    /// Starts node `i` and waits until it serves and has joined the cluster.
    fn start_node(&mut self, i: usize) {
        let name = Cluster::node_name(i);
        let ns = self.lab.ns(&name);
        let dir = self.lab.dir().display().to_string();
        let text = format!(
            "node_id = \"{name}\"\nprivate_key = \"{key}\"\nlisten = [\"10.220.{i}.1:{port}\"]\n\
             [tunnel]\nname = \"{tun}\"\naddress = \"10.77.0.1/24\"\n\
             [forwarding]\nenable = true\n\
             [admin]\nsocket = \"{dir}/{name}.sock\"\n\
             [metrics]\nlisten = \"127.0.0.1:9477\"\n\
             [events]\noutput = \"{dir}/{name}-events.jsonl\"\n\
             [cluster]\nstore = \"etcd\"\nendpoints = [\"http://{INSIDE_HOST}:2379\"]\nprefix = \"/jvpn-lab\"\n\
             key_file = \"{dir}/cluster.key\"\nannounce_interface = \"{ns}e\"\n\
             lease_ttl_ms = {ttl}\nfence_after_ms = {fence}\n\
             [[clients]]\nname = \"lab-client\"\npublic_key = \"{client}\"\ntunnel_address = \"10.77.0.2\"\n\
             {policy}\n",
            key = self.lab.gateway_key.private_base64().as_str(),
            port = jvpn::netlab::PORT,
            tun = self.lab.tun_name(),
            client = self.lab.client_key.public(),
            ttl = self.lease.0,
            fence = self.lease.1,
            policy = self.policy,
        );
        let config = self
            .lab
            .write(&format!("{name}.toml"), &text)
            .expect("config")
            .display()
            .to_string();
        self.lab
            .spawn_jvpn(&name, &ns, &["gateway", "--config", &config])
            .expect("node");
        let joined = wait_until(Duration::from_secs(15), || {
            self.lab.status(&name).is_some() && self.lab.output_of(&name).1.contains("joined")
        });
        assert!(joined, "{name} did not join\n{}", self.diagnostics());
    }

    fn start_nodes(&mut self) {
        for i in 1..=self.nodes {
            self.start_node(i);
        }
    }

    /// Starts the client; its session id once attached.
    fn start_client(&mut self) -> String {
        let policy = self.policy.clone();
        match self.lab.start_client("exit", &policy) {
            Ok(id) => id,
            Err(e) => panic!("{e:#}\n{}", self.diagnostics()),
        }
    }

    /// The sessions node `i` lists (none if it does not answer).
    fn sessions_of(&self, i: usize) -> Vec<Value> {
        self.lab
            .status(&Cluster::node_name(i))
            .and_then(|s| s["sessions"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The nodes that list session `id`.
    fn holders(&self, id: &str) -> Vec<usize> {
        (1..=self.nodes)
            .filter(|&i| {
                self.sessions_of(i)
                    .iter()
                    .any(|s| s["session_id"] == id && s["owner"] == Cluster::node_name(i))
            })
            .collect()
    }

    /// Drops the VPN's packets between the client and node `i`, both ways, at the
    /// node: the client hears silence on that path.
    fn cut(&self, i: usize) {
        let ns = self.lab.ns(&Cluster::node_name(i));
        let script = format!(
            "table inet jvcut {{\n chain in {{ type filter hook input priority -10; iifname \"{ns}c\" udp dport {p} drop\n }}\n chain out {{ type filter hook output priority -10; oifname \"{ns}c\" udp sport {p} drop\n }}\n}}\n",
            p = jvpn::netlab::PORT
        );
        self.nft(&ns, &script);
    }

    fn heal(&self, i: usize) {
        use jvpn_lab::LabTools;
        let ns = self.lab.ns(&Cluster::node_name(i));
        let _ = self
            .lab
            .exec(&ns, &["nft", "delete", "table", "inet", "jvcut"]);
    }

    fn nft(&self, ns: &str, script: &str) {
        use jvpn_lab::LabTools;
        let file = self.lab.write("rules.nft", script).expect("rules");
        self.lab
            .exec_ok(ns, &["nft", "-f", &file.display().to_string()])
            .expect("nft");
    }

    fn events(&self, name: &str) -> Vec<Value> {
        self.lab.events(name)
    }

    /// The `SessionMoved` events of `name` for session `id`: (from, to, reason).
    fn moves(&self, name: &str, id: &str) -> Vec<(String, String, String)> {
        self.events(name)
            .iter()
            .filter(|e| e["event_type"] == "SessionMoved" && e["session_id"] == id)
            .map(|e| {
                (
                    e["from_node"].as_str().unwrap_or("").to_string(),
                    e["to_node"].as_str().unwrap_or("-").to_string(),
                    e["reason_code"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.nodes {
            let name = Cluster::node_name(i);
            out += &format!("{name} stderr:\n{}\n", self.lab.output_of(&name).1);
        }
        out += &format!("client stderr:\n{}\n", self.lab.output_of("client").1);
        out += &format!("etcd stderr:\n{}\n", self.lab.output_of("etcd").1);
        out
    }
}

/// Pings the server from the client every 50 ms, `count` times, as process "ping".
fn start_ping(lab: &mut jvpn::netlab::Lab, count: u32) {
    let c = lab.ns("c");
    let count = count.to_string();
    lab.spawn(
        "ping",
        &c,
        &[
            "ping",
            "-n",
            "-i",
            "0.05",
            "-c",
            &count,
            "-W",
            "1",
            INSIDE_HOST,
        ],
    )
    .expect("ping");
}

/// The longest gap in the ping's replies.
fn ping_gap(lab: &mut jvpn::netlab::Lab, count: u32) -> jvpn::netlab::PingGap {
    assert!(
        lab.wait("ping", Duration::from_secs(60)).is_some(),
        "ping did not end"
    );
    let (out, _) = lab.output_of("ping");
    jvpn::netlab::ping_gap(&out, count, Duration::from_millis(50))
}

/// The client's path to the node that owns its session is cut, three times over: each
/// time the session moves to another node with its id and tunnel address, both nodes
/// report the move, only the new owner lists it, and a checked TCP transfer to the
/// server on the inside network, started before the first move, completes after the
/// last.
#[test]
fn a_session_moves_to_another_node_when_the_path_to_its_node_is_cut() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((mut k, id)) = Cluster::started("k1", 3, (3_000, 2_000), CLUSTER_POLICY) else {
        return;
    };
    let tunnel = k.lab.status("client").expect("status")["tunnel_addresses"].clone();
    let listen = format!("{INSIDE_HOST}:5201");
    jvpn_lab::start_transfer_between(&mut k.lab, "", ("c", "h"), &listen, 6_000_000, Some(12_000));
    let mut owner = 1;
    let mut gaps = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(1_500));
        start_ping(&mut k.lab, 120);
        std::thread::sleep(Duration::from_millis(1_000));
        k.cut(owner);
        let mut moved_to = None;
        let moved = wait_until(Duration::from_secs(15), || {
            let h = k.holders(&id);
            moved_to = h.first().copied().filter(|&n| n != owner && h.len() == 1);
            moved_to.is_some()
        });
        assert!(
            moved,
            "the session did not move from n{owner}\n{}",
            k.diagnostics()
        );
        let to = moved_to.expect("moved");
        let gap = ping_gap(&mut k.lab, 120);
        eprintln!(
            "CLUSTER move n{owner} -> n{to} (path cut): ping gap {} ms ({} of {} answered)",
            gap.longest_gap.as_millis(),
            gap.received,
            gap.sent
        );
        gaps.push(gap.longest_gap);
        // The client's own measure of the reattach (request to ack), etcd included.
        let (_, client_err) = k.lab.output_of("client");
        if let Some(line) = client_err.lines().rfind(|l| l.contains(" moved from ")) {
            eprintln!("CLUSTER {line}");
        }
        let from = Cluster::node_name(owner);
        let to_name = Cluster::node_name(to);
        let expected = (from.clone(), to_name.clone(), "session_moved".to_string());
        assert!(
            k.moves(&from, &id).contains(&expected),
            "{from} did not report the move: {:?}",
            k.moves(&from, &id)
        );
        assert!(
            k.moves(&to_name, &id).contains(&expected),
            "{to_name} did not report the move: {:?}",
            k.moves(&to_name, &id)
        );
        let client = k.lab.status("client").expect("status");
        assert_eq!(client["session_id"], id.as_str(), "the same session");
        assert_eq!(
            client["tunnel_addresses"], tunnel,
            "the same tunnel address"
        );
        k.heal(owner);
        owner = to;
    }
    jvpn_lab::await_transfer(&mut k.lab, "", 6_000_000);
    let ended = k
        .events("client")
        .iter()
        .filter(|e| e["event_type"] == "SessionTerminated")
        .count();
    assert_eq!(ended, 0, "the session never ended");
    gaps.sort();
    eprintln!(
        "CLUSTER path-cut moves: ping gaps {:?} ms, median {} ms",
        gaps.iter().map(|g| g.as_millis()).collect::<Vec<_>>(),
        gaps[gaps.len() / 2].as_millis()
    );
}

impl Cluster {
    /// With JV_DEBUG set: every process's error output and every event so far.
    fn debug_dump(&self) {
        if std::env::var("JV_DEBUG").is_err() {
            return;
        }
        eprintln!("{}", self.diagnostics());
        for name in
            std::iter::once("client".to_string()).chain((1..=self.nodes).map(Cluster::node_name))
        {
            for e in self.events(&name) {
                eprintln!("{name}: {e}");
            }
        }
        eprintln!("ping:\n{}", self.lab.output_of("ping").0);
    }

    /// Node `i`'s metrics page.
    fn metrics(&self, i: usize) -> String {
        use jvpn_lab::LabTools;
        let ns = self.lab.ns(&Cluster::node_name(i));
        let tool = jvpn_lab::lab_bin().display().to_string();
        self.lab
            .exec_ok(&ns, &[&tool, "fetch", "--addr", "127.0.0.1:9477"])
            .unwrap_or_default()
    }

    /// Waits until exactly one node, not `not`, lists session `id`; that node.
    fn moved_from(&self, id: &str, not: usize, limit: Duration) -> Option<usize> {
        let mut to = None;
        wait_until(limit, || {
            let h = self.holders(id);
            to = h.first().copied().filter(|&n| n != not && h.len() == 1);
            to.is_some()
        });
        to
    }

    /// The `SessionTerminated` events of session `id` reported by node `i`: reasons.
    fn terminations(&self, i: usize, id: &str) -> Vec<String> {
        self.events(&Cluster::node_name(i))
            .iter()
            .filter(|e| e["event_type"] == "SessionTerminated" && e["session_id"] == id)
            .map(|e| e["reason_code"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

/// The node that owns the session is killed (SIGKILL: no goodbye, its lease left to
/// expire): the session moves to another node within the lease's TTL and the policy's
/// recovery window, with its id; the killed node, started again, takes nothing back.
#[test]
fn a_killed_owners_session_moves_within_its_lease_and_the_restarted_node_takes_nothing_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lease = (3_000, 2_000);
    let Some((mut k, id)) = Cluster::started("k2", 3, lease, CLUSTER_POLICY) else {
        return;
    };
    start_ping(&mut k.lab, 200);
    std::thread::sleep(Duration::from_millis(1_000));
    let killed = std::time::Instant::now();
    k.lab.kill("n1");
    // The lease's TTL plus the policy's recovery window (15 s) bound the move.
    let to = k.moved_from(&id, 1, Duration::from_millis(lease.0 + 15_000));
    let took = killed.elapsed();
    let Some(to) = to else {
        panic!("the session did not move\n{}", k.diagnostics());
    };
    let gap = ping_gap(&mut k.lab, 200);
    k.debug_dump();
    eprintln!(
        "CLUSTER owner killed: n{to} serves the session after {} ms; ping gap {} ms ({} of {} answered)",
        took.as_millis(),
        gap.longest_gap.as_millis(),
        gap.received,
        gap.sent
    );
    let to_name = Cluster::node_name(to);
    assert!(
        k.moves(&to_name, &id)
            .contains(&("n1".into(), to_name.clone(), "session_moved".into())),
        "{:?}",
        k.moves(&to_name, &id)
    );
    let client = k.lab.status("client").expect("status");
    assert_eq!(client["session_id"], id.as_str());
    // Started again, the node rejoins and takes nothing back by itself.
    k.start_node(1);
    std::thread::sleep(Duration::from_millis(3_000));
    assert!(k.sessions_of(1).is_empty(), "{:?}", k.sessions_of(1));
    assert_eq!(k.holders(&id), [to]);
    let client = k.lab.status("client").expect("status");
    assert_eq!(client["session_id"], id.as_str());
    assert_eq!(client["state"], "ATTACHED");
}

/// The owner loses etcd but not its client: it fences itself (stops forwarding every
/// session, without ending them) before its lease runs out, the session moves, and at
/// no instant do two nodes forward its packets: counters of the client's packets
/// forwarded onto the inside network, read every 50 ms on both nodes, never grow on
/// both at once. Given etcd again, the node rejoins and takes nothing back.
#[test]
fn an_owner_cut_off_from_etcd_fences_itself_and_no_two_nodes_forward_at_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lease = (3_000, 2_000);
    let Some((mut k, id)) = Cluster::started("k3", 2, lease, CLUSTER_POLICY) else {
        return;
    };
    let tun = k.lab.tun_name();
    for i in 1..=2 {
        let ns = k.lab.ns(&Cluster::node_name(i));
        k.nft(
            &ns,
            &format!("table inet jvcount {{\n counter fromclient {{ }}\n chain passing {{ type filter hook forward priority 0; iifname \"{tun}\" ip saddr 10.77.0.2 counter name \"fromclient\"\n }}\n}}\n"),
        );
    }
    let count = |k: &Cluster, i: usize| -> u64 {
        use jvpn_lab::LabTools;
        let ns = k.lab.ns(&Cluster::node_name(i));
        let out = k
            .lab
            .exec_ok(
                &ns,
                &["nft", "list", "counter", "inet", "jvcount", "fromclient"],
            )
            .unwrap_or_default();
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    start_ping(&mut k.lab, 300);
    std::thread::sleep(Duration::from_millis(1_000));
    let n1 = k.lab.ns("n1");
    k.nft(
        &n1,
        &format!("table inet jvetcd {{\n chain out {{ type filter hook output priority -10; ip daddr {INSIDE_HOST} tcp dport 2379 drop\n }}\n chain in {{ type filter hook input priority -10; ip saddr {INSIDE_HOST} tcp sport 2379 drop\n }}\n}}\n"),
    );
    let cut = std::time::Instant::now();
    let mut samples = Vec::new();
    let mut moved_at = None;
    while cut.elapsed() < Duration::from_secs(20) {
        samples.push((cut.elapsed(), count(&k, 1), count(&k, 2)));
        if moved_at.is_none() && k.holders(&id) == [2] {
            moved_at = Some(cut.elapsed());
        }
        if moved_at.is_some_and(|t| cut.elapsed() > t + Duration::from_secs(2)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(moved_at) = moved_at else {
        panic!("the session did not move\n{}", k.diagnostics());
    };
    let first2 = samples
        .iter()
        .position(|s| s.2 > samples[0].2)
        .expect("node 2 forwarded the session's packets");
    assert!(
        samples[first2..].iter().all(|s| s.1 == samples[first2].1),
        "node 1 forwarded after node 2 began: {samples:?}"
    );
    let last1_grew = samples
        .windows(2)
        .rev()
        .find(|w| w[1].1 > w[0].1)
        .map(|w| w[1].0)
        .unwrap_or_default();
    eprintln!(
        "CLUSTER fencing: node 1 last forwarded by {} ms after losing etcd, node 2 first by {} ms; moved by {} ms",
        last1_grew.as_millis(),
        samples[first2].0.as_millis(),
        moved_at.as_millis()
    );
    assert!(
        last1_grew < samples[first2].0,
        "the forwarding overlapped: {samples:?}"
    );
    let (_, err) = k.lab.output_of("n1");
    assert!(err.contains("fenced"), "{err}");
    assert!(
        k.moves("n1", &id)
            .contains(&("n1".into(), "-".into(), "node_fenced".into())),
        "{:?}",
        k.moves("n1", &id)
    );
    assert!(k.terminations(1, &id).is_empty() && k.terminations(2, &id).is_empty());
    let _ = ping_gap(&mut k.lab, 300);
    // etcd back: node 1 joins again with a new lease and takes nothing back.
    {
        use jvpn_lab::LabTools;
        k.lab
            .exec_ok(&n1, &["nft", "delete", "table", "inet", "jvetcd"])
            .expect("heal");
    }
    let rejoined = wait_until(Duration::from_secs(15), || {
        k.lab.output_of("n1").1.matches("joined").count() >= 2
    });
    assert!(rejoined, "{}", k.diagnostics());
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(k.holders(&id), [2]);
    assert_eq!(
        k.lab.status("client").expect("status")["session_id"],
        id.as_str()
    );
}

/// The policy of the orphan scenario: a transport-lost TTL of 6 s.
const ORPHAN_POLICY: &str = "[policy.volatility]\nheartbeat_interval_ms = 100\nheartbeat_volatile_ms = 600\nprobe_interval_ms = 200\nloss_window_ms = 1000\nvolatile_to_degraded_ms = 2000\n[policy.switching]\nswitch_cooldown_ms = 1000\nrecovery_window_ms = 5000\n[policy.session]\ntransport_lost_ttl_ms = 6000\n";

/// The owner node and the client both die: a surviving node ends the orphaned session
/// by its transport-lost TTL (counted from when the owner was found gone), exactly once
/// across the survivors, with the reason code; its record is gone, and its tunnel
/// address serves the client's next session.
#[test]
fn an_orphaned_session_ends_by_its_ttl_exactly_once_and_its_address_serves_a_new_session() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((mut k, id)) = Cluster::started("k4", 3, (3_000, 2_000), ORPHAN_POLICY) else {
        return;
    };
    k.lab.kill("client");
    k.lab.kill("n1");
    let killed = std::time::Instant::now();
    let ended = wait_until(Duration::from_secs(30), || {
        !k.terminations(2, &id).is_empty() || !k.terminations(3, &id).is_empty()
    });
    let took = killed.elapsed();
    assert!(ended, "nobody ended the orphan\n{}", k.diagnostics());
    // Both survivors had the chance: the second finds the record gone.
    std::thread::sleep(Duration::from_millis(2_000));
    let mut reasons = k.terminations(2, &id);
    reasons.extend(k.terminations(3, &id));
    assert_eq!(reasons, ["transport_ttl_exceeded"], "exactly once");
    eprintln!(
        "CLUSTER orphan ended {} ms after its owner and client died (transport-lost TTL 6 s, lease 3 s)",
        took.as_millis()
    );
    assert!(took >= Duration::from_secs(5), "ended before its TTL");
    let host = k.lab.ns("h");
    let orphan = id.clone();
    let gone = run_in_ns(&host, move || async move {
        let table = EtcdTable::connect(&EtcdOptions {
            prefix: "/jvpn-lab".into(),
            ..options(&format!("http://{INSIDE_HOST}:2379"))
        })
        .await
        .expect("connect");
        let id: SessionId = orphan.parse().expect("id");
        table.get(id).await.expect("get").is_none()
    })
    .expect("the check");
    assert!(gone, "the orphan's record is still in the table");
    // The address serves a new session of the client, on the restarted node.
    k.start_node(1);
    let new = k.start_client();
    assert_ne!(new, id);
    use jvpn_lab::LabTools;
    let c = k.lab.ns("c");
    k.lab
        .exec_ok(
            &c,
            &["ping", "-c", "3", "-i", "0.2", "-W", "2", INSIDE_HOST],
        )
        .expect("the new session carries traffic");
}

/// etcd is restarted under traffic: the established session keeps flowing (nothing of
/// the store is on the packet path); a handshake while etcd is down is refused with
/// `store_unavailable`, and the client's retries succeed once etcd is back.
#[test]
fn sessions_flow_while_etcd_restarts_and_handshakes_recover_after_it() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((mut k, id)) = Cluster::started("k5", 2, (6_000, 4_000), CLUSTER_POLICY) else {
        return;
    };
    start_ping(&mut k.lab, 160);
    std::thread::sleep(Duration::from_millis(1_000));
    let host = k.lab.ns("h");
    k.lab.stop("etcd", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    start_etcd(&mut k.lab, "etcd", &host, INSIDE_HOST).expect("etcd again");
    let gap = ping_gap(&mut k.lab, 160);
    k.debug_dump();
    eprintln!(
        "CLUSTER etcd restarted under traffic: ping gap {} ms ({} of {} answered)",
        gap.longest_gap.as_millis(),
        gap.received,
        gap.sent
    );
    assert!(gap.received + 2 >= gap.sent, "{gap:?}");
    assert_eq!(k.holders(&id), [1]);
    assert_eq!(
        k.lab.status("client").expect("status")["session_id"],
        id.as_str()
    );

    // A new handshake while etcd is down waits for it.
    k.lab.stop("etcd", Duration::from_secs(5));
    k.lab.kill("client");
    let key = k.lab.gateway_key.public().to_string();
    let policy = k.policy.clone();
    let config = k
        .lab
        .client_config("exit", &key, &policy)
        .expect("config")
        .display()
        .to_string();
    let c = k.lab.ns("c");
    k.lab
        .spawn_jvpn(
            "client",
            &c,
            &["client", "--config", &config, "--connect-timeout", "30"],
        )
        .expect("client");
    let refused = wait_until(Duration::from_secs(10), || {
        k.metrics(1)
            .lines()
            .any(|l| l.starts_with("jvpn_handshakes_total") && l.contains("store_unavailable"))
    });
    assert!(
        refused,
        "no handshake refused for store_unavailable\n{}",
        k.metrics(1)
    );
    assert!(k
        .lab
        .status("client")
        .is_none_or(|s| s["state"] != "ATTACHED"));
    start_etcd(&mut k.lab, "etcd", &host, INSIDE_HOST).expect("etcd again");
    let attached = wait_until(Duration::from_secs(20), || {
        k.lab
            .status("client")
            .is_some_and(|s| s["state"] == "ATTACHED" && s["session_id"] != id.as_str())
    });
    assert!(attached, "the client did not attach\n{}", k.diagnostics());
    let metrics = k.metrics(1);
    for op in ["create", "swap", "keep_alive"] {
        let value = |series: &str| -> f64 {
            metrics
                .lines()
                .find(|l| l.starts_with(series) && l.contains(&format!("op=\"{op}\"")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        let (sum, count) = (
            value("jvpn_store_request_seconds_sum"),
            value("jvpn_store_request_seconds_count"),
        );
        if count > 0.0 {
            eprintln!(
                "CLUSTER etcd {op}: {count} requests, mean {:.2} ms (node 1)",
                sum / count * 1e3
            );
        }
    }
}

/// A node stopped gracefully (SIGTERM, as a rolling upgrade does) hands its sessions
/// off instead of ending them: each writes its final record, the node gives its lease
/// up and exits 0, and another node takes the session at the client's next reattach,
/// with its id, and no termination anywhere.
#[test]
fn a_node_stopped_gracefully_hands_its_sessions_to_the_others() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some((mut k, id)) = Cluster::started("k6", 3, (3_000, 2_000), CLUSTER_POLICY) else {
        return;
    };
    start_ping(&mut k.lab, 120);
    std::thread::sleep(Duration::from_millis(1_000));
    let stopped = std::time::Instant::now();
    assert_eq!(
        k.lab.stop("n1", Duration::from_secs(10)),
        Some(0),
        "{}",
        k.diagnostics()
    );
    let to = k.moved_from(&id, 1, Duration::from_secs(10));
    let took = stopped.elapsed();
    let Some(to) = to else {
        panic!("the session did not move\n{}", k.diagnostics());
    };
    let gap = ping_gap(&mut k.lab, 120);
    eprintln!(
        "CLUSTER node stopped gracefully: n{to} serves the session after {} ms; ping gap {} ms ({} of {} answered)",
        took.as_millis(),
        gap.longest_gap.as_millis(),
        gap.received,
        gap.sent
    );
    let (_, err) = k.lab.output_of("n1");
    assert!(
        err.contains("handing every session off") && err.contains("left the cluster"),
        "{err}"
    );
    assert!(
        k.moves("n1", &id)
            .contains(&("n1".into(), "-".into(), "session_moved".into())),
        "{:?}",
        k.moves("n1", &id)
    );
    let to_name = Cluster::node_name(to);
    assert!(k.moves(&to_name, &id).contains(&(
        "n1".into(),
        to_name.clone(),
        "session_moved".into()
    )));
    for i in 1..=3 {
        assert!(k.terminations(i, &id).is_empty(), "n{i} ended it");
    }
    let client = k.lab.status("client").expect("status");
    assert_eq!(client["session_id"], id.as_str());
    assert_eq!(client["state"], "ATTACHED");
    assert!(gap.received + 40 >= gap.sent, "{gap:?}");
}
