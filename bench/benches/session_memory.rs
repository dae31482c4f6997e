//! Memory per idle gateway session in the actor runtime, at 1 000, 10 000 and 100 000
//! real sessions: a gateway node answers handshakes from that many clients (a load tool:
//! core clients driven directly over one loopback UDP socket), and the process's
//! resident memory is read before and after, with the time it took to establish them.
//! Each session holds its actor (context, bounded mailbox), the core session (keys,
//! replay windows, event journal), its routes and its table record.
//!
//! Prints figures; asserts nothing about them (they belong in notes, not in tests).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jvpn_actors::node::{GatewayNode, GatewayNodeConfig};
use jvpn_actors::runtime::Reporter;
use jvpn_actors::supervisor::NodeLimits;
use jvpn_actors::tun::channel_device;
use jvpn_core::client::{Client, ClientConfig};
use jvpn_core::crypto::Keypair;
use jvpn_core::event::TransportRef;
use jvpn_core::gateway::{AuthorizedClient, GatewayConfig};
use jvpn_core::ids::{NodeId, Protocol, TransportId};
use jvpn_core::store::MemoryStore;
use jvpn_core::wire::{TunnelAddr, TunnelAddrs};

const STEPS: [usize; 3] = [1_000, 10_000, 100_000];

/// Loopback addresses the load tool sends from.
const SOURCES: usize = 250;

/// Resident set size, bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Client `i`'s tunnel address, in 10.64.0.0/10.
fn tunnel_addr(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 64, 0, 2)) + i as u32,
    ))
}

fn main() {
    let most = STEPS[STEPS.len() - 1];
    // Idle sessions stay: no client heartbeats, so the transport-lost TTL (15 s by
    // default) would end the first ones before the last are made.
    let mut config = jvpn_core::policy::PolicyConfig::starter();
    config.session.transport_lost_ttl_ms = Some(3_600_000);
    let policy = Arc::new(config.validate().expect("policy"));
    let gw_key = Keypair::generate().expect("keys");
    let keys: Vec<Keypair> = (0..most)
        .map(|_| Keypair::generate().expect("keys"))
        .collect();
    let system = actix::System::new();
    system.block_on(async move {
        let listen = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        let gw_addr = listen.local_addr().expect("addr");
        let (device, _peer) = channel_device(16, 1_500);
        let node = GatewayNode::start(GatewayNodeConfig {
            gateway: GatewayConfig {
                ciphers: jvpn_core::crypto::CipherSet::this_machine(),
                keypair: gw_key.clone(),
                node_id: NodeId("bench-gw".into()),
                policy: Arc::clone(&policy),
                clients: keys
                    .iter()
                    .enumerate()
                    .map(|(i, k)| AuthorizedClient {
                        public: k.public(),
                        tunnel: TunnelAddrs::single(TunnelAddr {
                            addr: tunnel_addr(i),
                            prefix: 10,
                        })
                        .expect("one IPv4 address"),
                    })
                    .collect(),
            },
            store: Arc::new(MemoryStore::new(most, 3)),
            listen: vec![listen],
            connections: None,
            device: Arc::new(device),
            reporter: Reporter::new(
                jvpn_bench::wall_clock(),
                NodeId("bench-gw".into()),
                "1.0".into(),
                None,
            ),
            limits: NodeLimits::default(),
            arbiters: 1,
            cluster: None,
            announcer: None,
        })
        .expect("node");
        // Clients come from many addresses, as real ones do (the gateway takes at most 20
        // initiations a second from one): 250 loopback addresses, in turn.
        let mut senders = Vec::with_capacity(SOURCES);
        for i in 0..SOURCES {
            let bind = std::net::SocketAddr::from(([127, 0, 1, i as u8 + 1], 0));
            senders.push(tokio::net::UdpSocket::bind(bind).await.expect("socket"));
        }
        let mut next = 0;
        let base = rss();
        println!(
            "sessions  rss_mib  bytes_per_session (from 0 sessions, {} MiB)  established_in  per_second",
            base >> 20
        );
        let started = Instant::now();
        for step in STEPS {
            while next < step {
                // In chunks, each answered before the next, small enough that the gateway
                // is never under load (8 initiations waiting): this tool does not read
                // the cookie replies a gateway under load answers with.
                let chunk_end = (next + 6).min(step);
                for (i, key) in keys.iter().enumerate().take(chunk_end).skip(next) {
                    let mut client = Client::new(
                        ClientConfig {
                            ciphers: jvpn_core::crypto::CipherSet::this_machine(),
                            keypair: key.clone(),
                            gateway: gw_key.public(),
                            policy: Arc::clone(&policy),
                            transports: vec![TransportRef {
                                id: TransportId(1),
                                protocol: Protocol::Udp,
                            }],
                        },
                        jvpn_bench::wall_clock(),
                    );
                    let init = client
                        .connect(TransportId(1), Instant::now())
                        .expect("init")
                        .bytes
                        .to_vec();
                    senders[i % SOURCES]
                        .send_to(&init, gw_addr)
                        .await
                        .expect("send");
                }
                // The answers are not read: a full receive buffer drops them, harmlessly.
                let deadline = Instant::now() + Duration::from_secs(10);
                while node.registry.len() < chunk_end && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                next = chunk_end;
            }
            let now = rss();
            let took = started.elapsed();
            println!(
                "{:8}  {:7.1}  {:17}  {:12.1?}  {:10.0}",
                node.registry.len(),
                now as f64 / (1 << 20) as f64,
                (now.saturating_sub(base)) / node.registry.len().max(1) as u64,
                took,
                node.registry.len() as f64 / took.as_secs_f64()
            );
        }
        node.stop(Duration::from_secs(5)).await;
    });
}
