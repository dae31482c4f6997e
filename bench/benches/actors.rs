//! The actor runtime's data path: one session, a gateway node and a client agent in one
//! process over loopback UDP, TUN devices replaced by channels. Each measured batch sends
//! 64 packets of 1 400 bytes into the client's TUN and waits until all 64 came out of
//! the gateway's TUN (client → gateway), or the other way round: every hop of the real
//! runtime (the agent reading its TUN, or the gateway's TUN actor; the session actor,
//! transport actor, socket, router) is in it, on the machine's cores.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use jvpn_actors::agent::{Candidate, CandidatePath, ClientAgent, OnSessionEnd};
use jvpn_actors::node::{GatewayNode, GatewayNodeConfig};
use jvpn_actors::runtime::Reporter;
use jvpn_actors::supervisor::NodeLimits;
use jvpn_actors::tun::{channel_device, ChannelPeer};
use jvpn_core::client::{Client, ClientConfig};
use jvpn_core::crypto::Keypair;
use jvpn_core::event::TransportRef;
use jvpn_core::fsm::State;
use jvpn_core::gateway::{AuthorizedClient, GatewayConfig};
use jvpn_core::ids::{NodeId, Protocol, TransportId};
use jvpn_core::policy::Policy;
use jvpn_core::store::MemoryStore;
use jvpn_core::wire::{TunnelAddr, TunnelAddrs};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const BEHIND: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const BATCH: usize = 64;
const SIZE: usize = 1_400;

fn packet(src: Ipv4Addr, dst: Ipv4Addr) -> Bytes {
    let mut p = vec![0u8; SIZE];
    p[0] = 0x45;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    Bytes::from(p)
}

struct Pair {
    _gw: GatewayNode,
    gw_tun: ChannelPeer,
    client_tun: ChannelPeer,
}

async fn pair() -> Pair {
    let policy = Arc::new(Policy::default());
    let gw_key = Keypair::generate().expect("keys");
    let client_key = Keypair::generate().expect("keys");
    let listen = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
    let gw_addr: SocketAddr = listen.local_addr().expect("addr");
    let (gw_device, gw_tun) = channel_device(1_024, 1_500);
    let reporter = |node: &str| {
        Reporter::new(
            jvpn_bench::wall_clock(),
            NodeId(node.into()),
            "1.0".into(),
            None,
        )
    };
    let gw = GatewayNode::start(GatewayNodeConfig {
        gateway: GatewayConfig {
            ciphers: jvpn_core::crypto::CipherSet::this_machine(),
            keypair: gw_key.clone(),
            node_id: NodeId("bench-gw".into()),
            policy: Arc::clone(&policy),
            clients: vec![AuthorizedClient {
                public: client_key.public(),
                tunnel: TunnelAddrs::single(TunnelAddr {
                    addr: IpAddr::V4(CLIENT),
                    prefix: 24,
                })
                .expect("one IPv4 address"),
            }],
        },
        store: Arc::new(MemoryStore::new(16, 3)),
        listen: vec![listen],
        connections: None,
        device: Arc::new(gw_device),
        reporter: reporter("bench-gw"),
        limits: NodeLimits::default(),
        arbiters: 1,
        cluster: None,
        announcer: None,
    })
    .expect("node");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
    socket.connect(gw_addr).expect("connect");
    let (client_device, client_tun) = channel_device(1_024, 1_500);
    let client = Client::new(
        ClientConfig {
            ciphers: jvpn_core::crypto::CipherSet::this_machine(),
            keypair: client_key,
            gateway: gw_key.public(),
            policy: Arc::clone(&policy),
            transports: vec![TransportRef {
                id: TransportId(1),
                protocol: Protocol::Udp,
            }],
        },
        jvpn_bench::wall_clock(),
    );
    let agent = ClientAgent::start(
        client,
        vec![Candidate {
            id: TransportId(1),
            path: CandidatePath::Udp(socket),
            name: None,
            gateway: gw_addr,
        }],
        Some(Arc::new(client_device)),
        reporter("bench-client"),
        OnSessionEnd::Stop,
        1_024,
    )
    .expect("agent");
    let mut status = agent.status;
    let attached = tokio::time::timeout(Duration::from_secs(5), async {
        while status.borrow_and_update().state != State::Attached {
            if status.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(attached.is_ok(), "no session");
    Pair {
        _gw: gw,
        gw_tun,
        client_tun,
    }
}

/// Sends `BATCH` packets in at `from` and waits for all of them at `to`.
async fn batch(from: &ChannelPeer, to: &mut ChannelPeer, p: &Bytes) -> usize {
    for _ in 0..BATCH {
        if from.to_device.send(p.clone()).await.is_err() {
            return 0;
        }
    }
    let mut got = 0;
    while got < BATCH {
        match tokio::time::timeout(Duration::from_millis(500), to.from_device.recv()).await {
            Ok(Some(_)) => got += 1,
            _ => break,
        }
    }
    got
}

fn tunnel(c: &mut Criterion) {
    let system = actix::System::new();
    let mut net = system.block_on(pair());
    let up = packet(CLIENT, BEHIND);
    let down = packet(BEHIND, CLIENT);
    let mut group = c.benchmark_group("actor runtime, 1 session over loopback UDP");
    group.throughput(Throughput::Bytes((BATCH * SIZE) as u64));
    group.sample_size(20);
    group.bench_function("64 x 1400 B client -> gateway", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let mut lost = 0;
            for _ in 0..iters {
                lost += BATCH - system.block_on(batch(&net.client_tun, &mut net.gw_tun, &up));
            }
            assert_eq!(lost, 0, "packets lost in the runtime");
            start.elapsed()
        })
    });
    group.bench_function("64 x 1400 B gateway -> client", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let mut lost = 0;
            for _ in 0..iters {
                lost += BATCH - system.block_on(batch(&net.gw_tun, &mut net.client_tun, &down));
            }
            assert_eq!(lost, 0, "packets lost in the runtime");
            start.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, tunnel);
criterion_main!(benches);
