//! Fixtures shared by the benchmarks: a gateway with one session, established by a real
//! handshake, and a client-side channel that can seal any packet for it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use jvpn_core::crypto::{Channel, Initiation, KeyLimits, Keypair, HANDSHAKE_PROLOGUE};
use jvpn_core::event::WallClock;
use jvpn_core::gateway::{AuthorizedClient, Endpoint, Gateway, GatewayConfig, Received};
use jvpn_core::ids::{NodeId, Protocol, SessionId, StateVersion, TransportId};
use jvpn_core::mac::MacKey;
use jvpn_core::policy::Policy;
use jvpn_core::store::MemoryStore;
use jvpn_core::wire::{
    encode_initiation, parse, Datagram, InitPayload, RespPayload, Timestamp, TunnelAddr,
    TunnelAddrs,
};

/// Wall-clock milliseconds the fixtures' clocks start at.
pub const UNIX_T0: u64 = 1_800_000_000_000;

/// The real wall clock, anchored now (for the runtime benchmarks, which run on real time).
pub fn wall_clock() -> jvpn_core::event::WallClock {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    jvpn_core::event::WallClock::new(Instant::now(), ms)
}

/// The client's endpoint on path `n`.
pub fn endpoint(n: u8) -> Endpoint {
    Endpoint {
        protocol: Protocol::Udp,
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)), 40_000),
    }
}

/// A gateway authorizing `clients` (each given 10.77.x.y).
pub fn gateway(policy: Policy, gw_key: &Keypair, clients: &[Keypair], t0: Instant) -> Gateway {
    let clients = clients
        .iter()
        .enumerate()
        .map(|(i, k)| AuthorizedClient {
            public: k.public(),
            tunnel: TunnelAddrs::single(TunnelAddr {
                addr: IpAddr::V4(Ipv4Addr::new(10, 77, (i / 250) as u8, (i % 250) as u8 + 2)),
                prefix: 16,
            })
            .expect("one IPv4 address"),
        })
        .collect();
    Gateway::new(
        GatewayConfig {
            ciphers: jvpn_core::crypto::CipherSet::this_machine(),
            keypair: gw_key.clone(),
            node_id: NodeId("bench".into()),
            policy: Arc::new(policy),
            clients,
        },
        Arc::new(MemoryStore::new(1 << 20, 3)),
        WallClock::new(t0, UNIX_T0),
    )
}

/// A handshake initiation from `client` with timestamp `secs`.
pub fn initiation(client: &Keypair, gateway: &Keypair, secs: u64) -> (Initiation, Vec<u8>) {
    let payload = InitPayload {
        timestamp: Timestamp { secs, nanos: 0 },
        transport_id: TransportId(1),
        protocol: Protocol::Udp,
        ciphers: jvpn_core::crypto::CipherSet::this_machine(),
    };
    let (init, msg1) = Initiation::start(
        client,
        &gateway.public(),
        HANDSHAKE_PROLOGUE,
        &payload.encode(),
    )
    .expect("initiation");
    let mut packet = Vec::new();
    encode_initiation(
        1,
        &msg1,
        &MacKey::for_gateway(&gateway.public()),
        None,
        &mut packet,
    );
    (init, packet)
}

/// Completes a handshake with `gw`; returns the client's channel, the session id and the
/// binding version.
pub fn connect(
    gw: &mut Gateway,
    client: &Keypair,
    gw_key: &Keypair,
    secs: u64,
    now: Instant,
) -> (Channel, SessionId, StateVersion) {
    let (init, packet) = initiation(client, gw_key, secs);
    let Received::Reply(reply) = gw.handle_datagram(endpoint(1), &packet, now) else {
        panic!("handshake refused");
    };
    let Ok(Datagram::HandshakeResp { noise, .. }) = parse(reply) else {
        panic!("not a handshake response");
    };
    let (payload, keys) = init.finish(noise).expect("finish");
    let resp = RespPayload::decode(&payload).expect("payload");
    let limits = KeyLimits::from_policy(&Policy::default());
    (
        Channel::new(resp.session_id, (resp.cipher, keys), limits, now),
        resp.session_id,
        resp.binding_version,
    )
}
