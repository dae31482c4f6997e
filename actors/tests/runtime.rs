//! The actor runtime end to end in one process: a gateway node and a client agent over
//! loopback UDP (each path through a relay the test can cut), with channel-backed TUN
//! devices, real timers and the real event sink. Time is real here, so every wait is a
//! bounded poll for a condition, never a fixed sleep standing in for one.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use jvpn_actors::agent::{
    AgentHandles, Candidate, CandidatePath, ClientAgent, Describe, EndSession, OnSessionEnd,
    Shutdown, UseDevice,
};
use jvpn_actors::events::EventSink;
use jvpn_actors::node::{GatewayNode, GatewayNodeConfig};
use jvpn_actors::runtime::{Crash, Reporter};
use jvpn_actors::supervisor::{ListSessions, NodeLimits, TerminateSession, MAX_SESSION_RESTARTS};
use jvpn_actors::tun::{channel_device, ChannelPeer};
use jvpn_core::client::{Client, ClientConfig};
use jvpn_core::crypto::Keypair;
use jvpn_core::event::{TransportRef, WallClock};
use jvpn_core::fsm::State;
use jvpn_core::gateway::{AuthorizedClient, GatewayConfig};
use jvpn_core::ids::{NodeId, Protocol, SessionId, TransportId};
use jvpn_core::policy::{Policy, PolicyConfig};
use jvpn_core::store::{MemoryStore, SessionStore};
use jvpn_core::wire::{TunnelAddr, TunnelAddrs};
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio::sync::watch;

const CLIENT_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const BEHIND_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

/// A writer whose lines the test reads back.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lines").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn events(&self) -> Vec<Value> {
        let mut bytes = self.0.lock().expect("lines").clone();
        // Only whole lines: the sink's thread may be in the middle of writing one.
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(complete);
        String::from_utf8_lossy(&bytes)
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is JSON"))
            .collect()
    }

    /// (previous_state, new_state, reason_code) of every state change.
    fn transitions(&self) -> Vec<(String, String, String)> {
        self.events()
            .iter()
            .filter(|e| e["event_type"] == "SessionStateChange")
            .map(|e| {
                (
                    e["previous_state"].as_str().unwrap_or("").to_string(),
                    e["new_state"].as_str().unwrap_or("").to_string(),
                    e["reason_code"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    /// Waits (bounded) until the last state change written is `expected`: the sink
    /// writes on its own thread, so the lines may trail the state.
    async fn ends_with(&self, expected: (String, String, String)) -> bool {
        wait_for(Duration::from_secs(2), || {
            self.transitions().last() == Some(&expected)
        })
        .await
    }

    fn count(&self, event_type: &str) -> usize {
        self.events()
            .iter()
            .filter(|e| e["event_type"] == event_type)
            .count()
    }
}

/// A writer that always fails: a dead event sink.
struct DeadWriter;

impl Write for DeadWriter {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::Error::other("disk gone"))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Err(std::io::Error::other("disk gone"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelayMode {
    Forward,
    /// Reads and discards: a black hole.
    Drop,
}

/// A loopback UDP forwarder standing for one network path between the client and one
/// gateway socket. Bounded: it stops by itself after a minute or a million datagrams.
struct Relay {
    addr: SocketAddr,
    mode: watch::Sender<RelayMode>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(gateway: SocketAddr) -> Relay {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("relay socket");
        let addr = socket.local_addr().expect("relay addr");
        let (mode, watch_mode) = watch::channel(RelayMode::Forward);
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65_535];
            for _ in 0..1_000_000 {
                let left = Duration::from_secs(60).saturating_sub(started.elapsed());
                let Ok(Ok((n, from))) =
                    tokio::time::timeout(left, socket.recv_from(&mut buf)).await
                else {
                    return;
                };
                if *watch_mode.borrow() == RelayMode::Drop {
                    continue;
                }
                let to = if from == gateway {
                    match client {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    gateway
                };
                let _ = socket.send_to(&buf[..n], to).await;
            }
        });
        Relay { addr, mode, task }
    }

    fn black_hole(&self) {
        let _ = self.mode.send(RelayMode::Drop);
    }

    /// Closes the relay's socket: the client's datagrams now meet ICMP port unreachable.
    async fn close(&mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

fn fast_policy(edit: impl FnOnce(&mut PolicyConfig)) -> Policy {
    let mut c = PolicyConfig::starter();
    c.volatility.heartbeat_interval_ms = Some(50);
    // Wide enough that a loaded 2-core CI machine does not see heartbeat timeouts where
    // a test expects a transport_dead signal first.
    c.volatility.heartbeat_volatile_ms = Some(800);
    c.volatility.probe_interval_ms = Some(100);
    c.volatility.loss_window_ms = Some(1_000);
    c.switching.switch_cooldown_ms = Some(200);
    c.session.transport_lost_ttl_ms = Some(2_000);
    edit(&mut c);
    c.validate().expect("test policy")
}

fn wall_clock() -> WallClock {
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    WallClock::new(Instant::now(), unix_ms)
}

fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, n: u32) -> Bytes {
    let mut p = vec![0u8; 24];
    p[0] = 0x45;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..24].copy_from_slice(&n.to_be_bytes());
    Bytes::from(p)
}

/// Polls `cond` every 10 ms for at most `limit`; returns whether it held.
async fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Like [`wait_for`], for a condition that must be awaited.
async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond().await
}

/// The process's metrics, rendered as Prometheus text (installed once per test binary).
fn metrics_text() -> String {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = jvpn_actors::telemetry::builder().build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .render()
}

/// The value of one counter or gauge line (labels given exactly as rendered), 0 if absent.
fn metric(name_and_labels: &str) -> f64 {
    metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

struct Net {
    gw: GatewayNode,
    gw_tun: ChannelPeer,
    client: AgentHandles,
    client_tun: ChannelPeer,
    relays: Vec<Relay>,
    store: Arc<MemoryStore>,
    gw_events: Lines,
    client_events: Lines,
    /// What a second agent of the same client needs.
    client_key: Keypair,
    gw_public: jvpn_core::crypto::PublicKey,
    policy: Arc<Policy>,
    gw_addrs: Vec<SocketAddr>,
    _sinks: Vec<EventSink>,
}

struct Options {
    policy: Policy,
    gw_sink: Option<Box<dyn Write + Send>>,
    on_end: OnSessionEnd,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            policy: fast_policy(|_| {}),
            gw_sink: None,
            on_end: OnSessionEnd::Stop,
        }
    }
}

async fn start(options: Options) -> Net {
    metrics_text();
    let policy = Arc::new(options.policy);
    let gw_key = Keypair::generate().expect("keys");
    let client_key = Keypair::generate().expect("keys");
    let store = Arc::new(MemoryStore::new(16, 3));
    let gw_events = Lines::default();
    let client_events = Lines::default();
    let gw_writer: Box<dyn Write + Send> = options
        .gw_sink
        .unwrap_or_else(|| Box::new(gw_events.clone()));
    let gw_sink = EventSink::start(gw_writer, 1_024).expect("sink");
    let client_sink = EventSink::start(Box::new(client_events.clone()), 1_024).expect("sink");

    let listen: Vec<std::net::UdpSocket> = (0..2)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("gateway socket"))
        .collect();
    let gw_addrs: Vec<SocketAddr> = listen
        .iter()
        .map(|s| s.local_addr().expect("addr"))
        .collect();
    let (gw_device, gw_tun) = channel_device(256, 1_400);
    let gw = GatewayNode::start(GatewayNodeConfig {
        gateway: GatewayConfig {
            ciphers: jvpn_core::crypto::CipherSet::ALL,
            keypair: gw_key.clone(),
            node_id: NodeId("gw-test".into()),
            policy: Arc::clone(&policy),
            clients: vec![AuthorizedClient {
                public: client_key.public(),
                tunnel: TunnelAddrs::single(TunnelAddr {
                    addr: IpAddr::V4(CLIENT_TUNNEL),
                    prefix: 24,
                })
                .expect("one address"),
            }],
        },
        store: store.clone(),
        listen,
        connections: None,
        device: Arc::new(gw_device),
        reporter: Reporter::new(
            wall_clock(),
            NodeId("gw-test".into()),
            policy.version().to_string(),
            gw_sink.sender(),
        ),
        limits: NodeLimits::default(),
        arbiters: 2,
        cluster: None,
        announcer: None,
    })
    .expect("gateway node");

    let mut relays = Vec::new();
    let mut candidates = Vec::new();
    for (i, gw_addr) in gw_addrs.iter().enumerate() {
        let relay = Relay::start(*gw_addr).await;
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
        socket.connect(relay.addr).expect("connect");
        candidates.push(Candidate {
            id: TransportId(i as u32 + 1),
            path: CandidatePath::Udp(socket),
            name: None,
            gateway: relay.addr,
        });
        relays.push(relay);
    }
    let (client_device, client_tun) = channel_device(256, 1_400);
    let client = Client::new(
        ClientConfig {
            ciphers: jvpn_core::crypto::CipherSet::ALL,
            keypair: client_key.clone(),
            gateway: gw_key.public(),
            policy: Arc::clone(&policy),
            transports: (1..=2)
                .map(|i| TransportRef {
                    id: TransportId(i),
                    protocol: Protocol::Udp,
                })
                .collect(),
        },
        wall_clock(),
    );
    let client = ClientAgent::start(
        client,
        candidates,
        Some(Arc::new(client_device)),
        Reporter::new(
            wall_clock(),
            NodeId("client-test".into()),
            policy.version().to_string(),
            client_sink.sender(),
        ),
        options.on_end,
        256,
    )
    .expect("client agent");
    Net {
        gw,
        gw_tun,
        client,
        client_tun,
        relays,
        store,
        gw_events,
        client_events,
        client_key,
        gw_public: gw_key.public(),
        policy,
        gw_addrs,
        _sinks: vec![gw_sink, client_sink],
    }
}

impl Net {
    fn status(&self) -> jvpn_actors::agent::AgentStatus {
        self.client.status.borrow().clone()
    }

    async fn attached(&self) -> SessionId {
        let ok = wait_for(Duration::from_secs(5), || {
            self.status().state == State::Attached
        })
        .await;
        assert!(ok, "no session: {:?}\n{}", self.status(), metrics_text());
        self.status().session_id.expect("session id")
    }

    /// Sends `n` packets each way through the tunnel and checks every one arrives,
    /// in order, unchanged.
    async fn traffic_both_ways(&mut self, n: u32, base: u32) {
        for i in 0..n {
            let up = ip_packet(CLIENT_TUNNEL, BEHIND_GATEWAY, base + i);
            self.client_tun
                .to_device
                .send(up.clone())
                .await
                .expect("client tun");
            let got = tokio::time::timeout(Duration::from_secs(2), self.gw_tun.from_device.recv())
                .await
                .expect("packet reached the gateway's tunnel")
                .expect("gateway tun open");
            assert_eq!(got, up, "client → gateway packet {i}");
            let down = ip_packet(BEHIND_GATEWAY, CLIENT_TUNNEL, base + i);
            self.gw_tun
                .to_device
                .send(down.clone())
                .await
                .expect("gw tun");
            let got =
                tokio::time::timeout(Duration::from_secs(2), self.client_tun.from_device.recv())
                    .await
                    .expect("packet reached the client's tunnel")
                    .expect("client tun open");
            assert_eq!(got, down, "gateway → client packet {i}");
        }
    }

    /// A second agent with the same client key, straight to the gateway's first socket
    /// (no relay), with its own TUN and no event sink.
    fn same_client_again(&self) -> (AgentHandles, ChannelPeer) {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("client socket");
        socket.connect(self.gw_addrs[0]).expect("connect");
        let client = Client::new(
            ClientConfig {
                ciphers: jvpn_core::crypto::CipherSet::ALL,
                keypair: self.client_key.clone(),
                gateway: self.gw_public,
                policy: Arc::clone(&self.policy),
                transports: vec![TransportRef {
                    id: TransportId(1),
                    protocol: Protocol::Udp,
                }],
            },
            wall_clock(),
        );
        let (device, peer) = channel_device(256, 1_400);
        let agent = ClientAgent::start(
            client,
            vec![Candidate {
                id: TransportId(1),
                path: CandidatePath::Udp(socket),
                name: None,
                gateway: self.gw_addrs[0],
            }],
            Some(Arc::new(device)),
            Reporter::new(
                wall_clock(),
                NodeId("client-again".into()),
                self.policy.version().to_string(),
                None,
            ),
            OnSessionEnd::Stop,
            256,
        )
        .expect("second agent");
        (agent, peer)
    }

    async fn gateway_binding_port(&self) -> Option<u16> {
        let sessions = self.gw.supervisor.send(ListSessions).await.expect("list");
        sessions
            .first()
            .and_then(|s| s.binding)
            .map(|b| b.addr.port())
    }
}

fn t(from: &str, to: &str, reason: &str) -> (String, String, String) {
    (from.into(), to.into(), reason.into())
}

#[actix_rt::test]
async fn handshake_and_data_both_ways() {
    let mut net = start(Options::default()).await;
    let id = net.attached().await;
    net.traffic_both_ways(200, 0).await;
    let record = net.store.get(id).expect("the session's record");
    assert_eq!(record.state, State::Attached);
    assert_eq!(net.gw.registry.len(), 1);
    // A packet for an address no session owns goes nowhere.
    net.gw_tun
        .to_device
        .send(ip_packet(BEHIND_GATEWAY, Ipv4Addr::new(10, 77, 0, 9), 1))
        .await
        .expect("gw tun");
    net.traffic_both_ways(1, 1_000).await;
    // Both event streams carry node id and policy version on every line.
    for e in net.gw_events.events() {
        assert_eq!(e["node_id"], "gw-test");
        assert_eq!(e["policy_version"], "1.0");
        assert_eq!(e["session_id"], id.to_string());
    }
    assert_eq!(
        net.client_events.transitions(),
        [t("BIRTH", "ATTACHED", "attached_to_transport")]
    );
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn a_dead_path_makes_the_session_jump_with_its_id_and_events_as_specified() {
    let mut net = start(Options::default()).await;
    let id = net.attached().await;
    net.traffic_both_ways(20, 0).await;
    assert_eq!(net.status().active, Some(TransportId(1)));
    let path2_port = net.relays[1].addr.port();

    // Path 1's far end disappears: the client's socket gets ICMP port unreachable.
    net.relays[0].close().await;
    let jumped = wait_for(Duration::from_secs(5), || {
        let s = net.status();
        s.active == Some(TransportId(2)) && s.state == State::Attached
    })
    .await;
    assert!(jumped, "no jump: {:?}", net.status());
    assert_eq!(net.status().session_id, Some(id), "the session id changed");
    let n = &net;
    let bound = eventually(Duration::from_secs(2), || async move {
        n.gateway_binding_port().await == Some(path2_port)
    })
    .await;
    assert!(bound, "the gateway's binding did not move to path 2");
    net.traffic_both_ways(20, 100).await;

    let expected = [
        t("BIRTH", "ATTACHED", "attached_to_transport"),
        t("ATTACHED", "VOLATILE", "transport_dead"),
        t("VOLATILE", "RECOVERING", "dead_transport_recovery"),
        t("RECOVERING", "ATTACHED", "reattach_success"),
    ];
    let client_ok = wait_for(Duration::from_secs(2), || {
        net.client_events.transitions() == expected
    })
    .await;
    assert!(
        client_ok,
        "client transitions: {:?}",
        net.client_events.transitions()
    );
    // The gateway learns the cause from the authenticated request: same transitions.
    let gw_ok = wait_for(Duration::from_secs(2), || {
        net.gw_events.transitions() == expected
    })
    .await;
    assert!(
        gw_ok,
        "gateway transitions: {:?}",
        net.gw_events.transitions()
    );
    assert_eq!(net.client_events.count("TransportSwitch"), 1);
    assert!(net.status().last_reattach.is_some(), "no reattach timed");
    // Reported, not asserted (timing belongs in benchmarks): from the path's death being
    // noticed to the session attached on path 2, by the client's event stamps.
    let stamps: Vec<u64> = net
        .client_events
        .events()
        .iter()
        .filter(|e| e["event_type"] == "SessionStateChange")
        .filter_map(|e| e["ts_ms"].as_u64())
        .collect();
    if let [.., volatile, _, attached] = stamps[..] {
        eprintln!(
            "jump on loopback: {} ms from VOLATILE to ATTACHED",
            attached - volatile
        );
    }
    assert_eq!(net.gw_events.count("TransportSwitch"), 1);
    let record = net.store.get(id).expect("record");
    assert_eq!(record.state, State::Attached);
    assert_eq!(
        record
            .active_binding
            .and_then(|b| b.remote)
            .map(|a| a.port()),
        Some(path2_port)
    );
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn a_dead_event_sink_blocks_no_transition() {
    let options = Options {
        gw_sink: Some(Box::new(DeadWriter)),
        ..Options::default()
    };
    let mut net = start(options).await;
    let failures_before = metric("jvpn_event_write_failures_total");
    let id = net.attached().await;
    net.relays[0].close().await;
    let jumped = wait_for(Duration::from_secs(5), || {
        net.status().active == Some(TransportId(2)) && net.status().state == State::Attached
    })
    .await;
    assert!(jumped, "no jump: {:?}", net.status());
    // The gateway's session went through the jump with every event write failing.
    net.traffic_both_ways(20, 0).await;
    let record = net.store.get(id).expect("record");
    assert_eq!(record.state, State::Attached);
    assert!(record.state_version.0 >= 4, "the gateway recorded the jump");
    let counted = wait_for(Duration::from_secs(2), || {
        metric("jvpn_event_write_failures_total") >= failures_before + 4.0
    })
    .await;
    assert!(counted, "write failures not counted");
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn a_killed_transport_actor_is_restarted_and_traffic_goes_on() {
    let mut net = start(Options::default()).await;
    let id = net.attached().await;
    let restarts = metric("jvpn_actor_restarts_total{actor=\"transport\"}");
    for (_, transport) in &net.gw.transports {
        transport.do_send(Crash);
    }
    for (_, transport) in &net.client.transports {
        transport.crash();
    }
    let restarted = wait_for(Duration::from_secs(2), || {
        metric("jvpn_actor_restarts_total{actor=\"transport\"}") >= restarts + 4.0
    })
    .await;
    assert!(restarted, "{}", metrics_text());
    net.traffic_both_ways(50, 0).await;
    assert_eq!(net.status().session_id, Some(id));
    assert_eq!(net.status().state, State::Attached);
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn a_killed_session_actor_is_restarted_with_its_state_then_ended_explicitly() {
    let mut net = start(Options::default()).await;
    let id = net.attached().await;
    net.traffic_both_ways(10, 0).await;
    let version = net.store.get(id).expect("record").state_version;

    // Each crash loses only the actor: the session, its keys and binding live on in a
    // new actor, and traffic flows again.
    for round in 1..=MAX_SESSION_RESTARTS {
        let actor = net.gw.registry.session(id).expect("registered");
        actor.do_send(Crash);
        let replaced = wait_for(Duration::from_secs(2), || {
            net.gw.registry.session(id).is_some_and(|a| a != actor)
        })
        .await;
        assert!(replaced, "round {round}: not restarted");
        net.traffic_both_ways(10, round * 100).await;
        assert_eq!(net.store.get(id).expect("record").state_version, version);
    }

    // Past the limit, the session is ended explicitly, and everything it held released.
    let actor = net.gw.registry.session(id).expect("registered");
    actor.do_send(Crash);
    let released = wait_for(Duration::from_secs(2), || {
        net.gw.registry.is_empty() && net.store.get(id).is_none()
    })
    .await;
    assert!(released, "session not released");
    assert!(net
        .gw
        .registry
        .by_tunnel(IpAddr::V4(CLIENT_TUNNEL))
        .is_none());
    assert!(
        net.gw_events
            .ends_with(t("ATTACHED", "TERMINATED", "runtime_failure"))
            .await,
        "{:?}",
        net.gw_events.transitions()
    );
    let ended = net
        .gw_events
        .events()
        .into_iter()
        .filter(|e| e["event_type"] == "SessionTerminated")
        .map(|e| e["reason_code"].clone())
        .collect::<Vec<_>>();
    assert_eq!(ended, ["runtime_failure"]);
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn all_paths_lost_end_the_session_at_its_ttl_on_both_sides() {
    let mut net = start(Options::default()).await;
    let id = net.attached().await;
    let cut = Instant::now();
    for relay in &net.relays {
        relay.black_hole();
    }
    let ended = wait_for(Duration::from_secs(6), || net.status().stopped).await;
    assert!(ended, "client did not end: {:?}", net.status());
    let waited = cut.elapsed();
    assert_eq!(
        net.status().last_end.map(|r| r.as_str()),
        Some("transport_ttl_exceeded")
    );
    // The policy's TTL is 2 s from the last packet heard, which came before the cut.
    assert!(
        waited >= Duration::from_millis(1_700),
        "ended early: {waited:?}"
    );
    let gw_ended = wait_for(Duration::from_secs(2), || {
        net.gw.registry.is_empty() && net.store.get(id).is_none()
    })
    .await;
    assert!(gw_ended, "gateway session not ended");
    // The event sinks write on their own threads: the lines may trail the state.
    for lines in [&net.gw_events, &net.client_events] {
        let written = wait_for(Duration::from_secs(2), || {
            lines
                .transitions()
                .last()
                .is_some_and(|last| last.1 == "TERMINATED" && last.2 == "transport_ttl_exceeded")
        })
        .await;
        assert!(written, "{:?}", lines.transitions());
    }
    let _ = net.relays.pop();
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn an_operator_terminates_a_session_on_both_sides() {
    let net = start(Options::default()).await;
    let id = net.attached().await;
    let found = net
        .gw
        .supervisor
        .send(TerminateSession(id))
        .await
        .expect("supervisor");
    assert!(found);
    let ended = wait_for(Duration::from_secs(2), || net.status().stopped).await;
    assert!(ended, "client did not end: {:?}", net.status());
    assert_eq!(
        net.status().last_end.map(|r| r.as_str()),
        Some("operator_terminated")
    );
    assert!(
        net.gw_events
            .ends_with(t("ATTACHED", "TERMINATED", "operator_terminated"))
            .await,
        "{:?}",
        net.gw_events.transitions()
    );
    let gone = wait_for(Duration::from_secs(2), || net.gw.registry.is_empty()).await;
    assert!(gone);
    assert!(!net
        .gw
        .supervisor
        .send(TerminateSession(id))
        .await
        .expect("supervisor"));
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn a_client_shutdown_tells_the_gateway_and_a_reconnecting_client_starts_a_new_session() {
    let options = Options {
        on_end: OnSessionEnd::Reconnect,
        ..Options::default()
    };
    let net = start(options).await;
    let first = net.attached().await;
    // The gateway ends the session; the client, set to reconnect, starts a new one
    // explicitly: a new handshake, a new session id, reported in events.
    net.gw
        .supervisor
        .send(TerminateSession(first))
        .await
        .expect("supervisor");
    let again = wait_for(Duration::from_secs(5), || {
        let s = net.status();
        s.sessions == 2 && s.state == State::Attached
    })
    .await;
    assert!(again, "no new session: {:?}", net.status());
    let second = net.status().session_id.expect("id");
    assert_ne!(second, first);
    assert_eq!(
        net.status().last_end.map(|r| r.as_str()),
        Some("operator_terminated")
    );
    // Shutdown ends it for good, telling the gateway (an operator's end at either side
    // is reported as operator_terminated on both).
    net.client.agent.do_send(Shutdown);
    let gone = wait_for(Duration::from_secs(2), || {
        net.status().stopped && net.gw.registry.is_empty()
    })
    .await;
    assert!(gone, "{:?}", net.status());
    let client_ends: Vec<_> = net
        .client_events
        .events()
        .into_iter()
        .filter(|e| e["event_type"] == "SessionTerminated")
        .map(|e| (e["session_id"].clone(), e["reason_code"].clone()))
        .collect();
    assert_eq!(
        client_ends,
        [
            (
                Value::from(first.to_string()),
                Value::from("operator_terminated")
            ),
            (
                Value::from(second.to_string()),
                Value::from("operator_terminated")
            ),
        ]
    );
    net.gw.stop(Duration::from_secs(2)).await;
}

/// The user ends the session at the client: a wrong id ends nothing; the right one ends
/// it (the gateway told) and a client set to reconnect starts a new session instead of
/// exiting.
#[actix_rt::test]
async fn a_client_side_end_checks_the_id_and_follows_on_session_end() {
    let options = Options {
        on_end: OnSessionEnd::Reconnect,
        ..Options::default()
    };
    let net = start(options).await;
    let first = net.attached().await;
    let wrong = jvpn_core::ids::SessionId(first.0 ^ 1);
    let ended = net
        .client
        .agent
        .send(EndSession(wrong))
        .await
        .expect("agent");
    assert!(!ended, "a wrong id ends nothing");
    assert_eq!(net.status().session_id, Some(first));
    let ended = net
        .client
        .agent
        .send(EndSession(first))
        .await
        .expect("agent");
    assert!(ended);
    let again = wait_for(Duration::from_secs(5), || {
        let s = net.status();
        s.sessions == 2 && s.state == State::Attached && !s.stopped
    })
    .await;
    assert!(again, "no new session: {:?}", net.status());
    assert_ne!(net.status().session_id, Some(first));
    let gateway_gone = wait_for(Duration::from_secs(2), || {
        net.gw.registry.session(first).is_none()
    })
    .await;
    assert!(gateway_gone, "the gateway was told");
    net.client.agent.do_send(Shutdown);
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn a_new_handshake_of_the_same_client_replaces_its_session_explicitly() {
    let net = start(Options::default()).await;
    let old = net.attached().await;
    let (again, mut again_tun) = net.same_client_again();
    let attached = wait_for(Duration::from_secs(5), || {
        again.status.borrow().state == State::Attached
    })
    .await;
    assert!(attached, "second agent: {:?}", again.status.borrow());
    let new = again.status.borrow().session_id.expect("new session");
    assert_ne!(new, old);
    // The old session ends with peer_terminated and everything it held is released.
    let replaced = wait_for(Duration::from_secs(2), || {
        net.gw.registry.session(old).is_none() && net.store.get(old).is_none()
    })
    .await;
    assert!(replaced, "the old session is still registered");
    assert!(net.gw_events.events().iter().any(|e| {
        e["session_id"] == old.to_string()
            && e["event_type"] == "SessionTerminated"
            && e["reason_code"] == "peer_terminated"
    }));
    assert_eq!(net.gw.registry.len(), 1);
    assert!(net.store.get(new).is_some());
    // The client's tunnel address now leads to the new session's agent.
    let down = ip_packet(BEHIND_GATEWAY, CLIENT_TUNNEL, 7);
    net.gw_tun
        .to_device
        .send(down.clone())
        .await
        .expect("gw tun");
    let got = tokio::time::timeout(Duration::from_secs(2), again_tun.from_device.recv())
        .await
        .expect("packet reached the new agent")
        .expect("tun open");
    assert_eq!(got, down);
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn stopping_the_node_ends_every_session_explicitly_and_releases_it() {
    let net = start(Options::default()).await;
    let id = net.attached().await;
    let left = net.gw.stop(Duration::from_secs(2)).await;
    assert_eq!(left, 0, "sessions outlived the node's stop");
    assert!(net.store.get(id).is_none(), "the table kept the session");
    assert!(
        net.gw_events
            .ends_with(t("ATTACHED", "TERMINATED", "operator_terminated"))
            .await,
        "{:?}",
        net.gw_events.transitions()
    );
    // The client was told: its session ends at once, not at its TTL.
    let ended = wait_for(Duration::from_secs(1), || {
        net.client.status.borrow().clone().stopped
    })
    .await;
    assert!(
        ended,
        "client not told: {:?}",
        net.client.status.borrow().clone()
    );
    assert_eq!(
        net.client
            .status
            .borrow()
            .clone()
            .last_end
            .map(|r| r.as_str()),
        Some("operator_terminated")
    );
    // The node let go of its TUN actor: the device is dropped (its channel closes).
    let mut gw_tun = net.gw_tun;
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        while gw_tun.from_device.recv().await.is_some() {}
    })
    .await;
    assert!(closed.is_ok(), "the gateway's TUN device outlived the node");
}

/// The client agent reads its device itself: the device's end ends the reading, not the
/// agent, and a device given later is read and written from then on.
#[actix_rt::test]
async fn a_closed_device_leaves_the_agent_up_and_a_new_one_carries_the_traffic() {
    let mut net = start(Options::default()).await;
    let id = net.attached().await;
    net.traffic_both_ways(5, 0).await;
    // Closing the test's sending side is the device's end of file for its reader.
    let (closed, _) = tokio::sync::mpsc::channel(1);
    drop(std::mem::replace(&mut net.client_tun.to_device, closed));
    // Two round trips through the agent's mailbox: the agent's context, woken by the end
    // of file, has polled its reading by the second answer.
    for _ in 0..2 {
        net.client
            .agent
            .send(Describe)
            .await
            .expect("the agent is up after its device ended");
    }
    assert!(!net.status().stopped);
    let (device, peer) = channel_device(256, 1_400);
    net.client.agent.do_send(UseDevice(Arc::new(device)));
    net.client_tun = peer;
    net.traffic_both_ways(5, 100).await;
    assert_eq!(net.status().session_id, Some(id));
    net.gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn a_stopped_agent_closes_its_sockets() {
    let net = start(Options::default()).await;
    net.attached().await;
    net.client.agent.do_send(Shutdown);
    let stopped = wait_for(Duration::from_secs(2), || net.status().stopped).await;
    assert!(stopped);
    let Net {
        client, gw, relays, ..
    } = net;
    let transports: Vec<_> = client
        .transports
        .iter()
        .map(|(_, a)| a.downgrade())
        .collect();
    assert_eq!(transports.len(), 2);
    drop(client);
    // Once nobody holds them, the closed transports end (their sockets with them).
    let gone = wait_for(Duration::from_secs(2), || {
        transports.iter().all(|alive| !alive())
    })
    .await;
    drop(relays);
    assert!(gone, "a transport actor outlived its agent");
    gw.stop(Duration::from_secs(2)).await;
}

#[actix_rt::test]
async fn a_crash_with_a_terminate_queued_still_ends_the_session_as_commanded() {
    let net = start(Options::default()).await;
    let id = net.attached().await;
    let actor = net.gw.registry.session(id).expect("session actor");
    // The crash is queued first; the operator's command lands behind it (or, if the
    // restart wins the race, reaches the restarted actor): either way the session ends
    // with operator_terminated, explicitly, and is not left running.
    actor.do_send(Crash);
    let found = net
        .gw
        .supervisor
        .send(TerminateSession(id))
        .await
        .expect("supervisor");
    assert!(found);
    let gone = wait_for(Duration::from_secs(3), || {
        net.gw.registry.is_empty() && net.store.get(id).is_none()
    })
    .await;
    assert!(gone, "the session outlived the command");
    assert!(
        net.gw_events
            .ends_with(t("ATTACHED", "TERMINATED", "operator_terminated"))
            .await,
        "{:?}",
        net.gw_events.transitions()
    );
    let told = wait_for(Duration::from_secs(2), || net.status().stopped).await;
    assert!(told, "client not told: {:?}", net.status());
    assert_eq!(
        net.status().last_end.map(|r| r.as_str()),
        Some("operator_terminated")
    );
    net.gw.stop(Duration::from_secs(2)).await;
}
