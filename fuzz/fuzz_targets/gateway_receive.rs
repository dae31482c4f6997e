//! The gateway's whole receive path: a gateway with one live session (set up by a real
//! handshake) receives a sequence of arbitrary datagrams from arbitrary endpoints, then
//! tunnel packets and timers. Any panic is a bug; after every input the session table
//! and the gateway must still agree.
//!
//! Input layout: repeated [selector u8][length u8][bytes…]. The selector's top two bits
//! choose how the bytes become a datagram — as they are; with the live session's id
//! written into the header (so they reach the session's own checks); as a mask XORed
//! onto a genuine packet sealed by the real client (data, heartbeat, reattach request,
//! terminate); or that genuine packet unmasked, delivered twice (the replay path). Its
//! low bits choose the endpoint.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jvpn_core::client::{Client, ClientConfig, ClientReceived};
use jvpn_core::crypto::Keypair;
use jvpn_core::event::{TransportRef, WallClock};
use jvpn_core::gateway::{AuthorizedClient, Endpoint, Gateway, GatewayConfig, Received};
use jvpn_core::ids::{NodeId, Protocol, TransportId};
use jvpn_core::policy::Policy;
use jvpn_core::store::{MemoryStore, SessionStore};
use jvpn_core::wire::{TunnelAddr, TunnelAddrs};
use libfuzzer_sys::fuzz_target;

fn endpoint(selector: u8) -> Endpoint {
    let protocol = match selector % 3 {
        0 => Protocol::Udp,
        1 => Protocol::Quic,
        _ => Protocol::Tcp,
    };
    Endpoint {
        protocol,
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, selector / 3)), 4000),
    }
}

/// A packet the real client seals now: `kind` picks data, a heartbeat or probe, a
/// reattach request (after reporting its active transport dead), or a terminate.
fn genuine(client: &mut Client, kind: u8, now: Instant) -> Vec<u8> {
    match kind % 4 {
        0 => {
            let mut ip = vec![0u8; 28];
            ip[0] = 0x45;
            ip[12..16].copy_from_slice(&[10, 77, 0, 2]);
            ip[16..20].copy_from_slice(&[10, 99, 0, 1]);
            client.send_data(&ip, now).map(|t| t.bytes.to_vec()).unwrap_or_default()
        }
        1 => {
            client.handle_timeout(now + Duration::from_secs(1));
            client.poll_transmit(now).map(|t| t.bytes.to_vec()).unwrap_or_default()
        }
        2 => {
            client.transport_status(TransportId(1), false, now);
            client.poll_transmit(now).map(|t| t.bytes.to_vec()).unwrap_or_default()
        }
        _ => client.terminate(now).map(|t| t.bytes.to_vec()).unwrap_or_default(),
    }
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let policy = Arc::new(Policy::default());
    let gw_key = Keypair::from_private([7u8; 32].into());
    let client_key = Keypair::from_private([9u8; 32].into());
    let store = Arc::new(MemoryStore::new(8, 3));
    let mut gw = Gateway::new(
        GatewayConfig {
            ciphers: jvpn_core::crypto::CipherSet::ALL,
            keypair: gw_key.clone(),
            node_id: NodeId("fuzz".into()),
            policy: Arc::clone(&policy),
            clients: vec![AuthorizedClient {
                public: client_key.public(),
                tunnel: TunnelAddrs::new([
                    TunnelAddr { addr: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)), prefix: 24 },
                    TunnelAddr { addr: IpAddr::V6(std::net::Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2)), prefix: 64 },
                ])
                .expect("one address of each family"),
            }],
        },
        store.clone(),
        WallClock::new(t0, 1_800_000_000_000),
    );
    let mut client = Client::new(
        ClientConfig {
            ciphers: jvpn_core::crypto::CipherSet::ALL,
            keypair: client_key,
            gateway: gw_key.public(),
            policy,
            transports: vec![
                TransportRef { id: TransportId(1), protocol: Protocol::Udp },
                TransportRef { id: TransportId(2), protocol: Protocol::Udp },
            ],
        },
        WallClock::new(t0, 1_800_000_000_000),
    );
    let init = client.connect(TransportId(1), t0).expect("connect").bytes.to_vec();
    let Received::Reply(resp) = gw.handle_datagram(endpoint(0), &init, t0) else {
        panic!("the real handshake was refused");
    };
    let resp = resp.to_vec();
    assert_eq!(client.handle_datagram(TransportId(1), &resp, t0), ClientReceived::Consumed);

    let mut rest = data;
    let mut now = t0;
    while let Some((&selector, tail)) = rest.split_first() {
        let (len, tail) = match tail.split_first() {
            Some((&len, tail)) => (usize::from(len).min(tail.len()), tail),
            None => (0, tail),
        };
        let (bytes, tail) = tail.split_at(len);
        rest = tail;
        now += Duration::from_millis(u64::from(selector & 0x0F) * 37);
        let from = endpoint(selector & 0x3F);
        let session = client.session_id();
        let datagram: Vec<u8> = match selector >> 6 {
            0 => bytes.to_vec(),
            1 => {
                let mut d = bytes.to_vec();
                if let (Some(id), true) = (session, d.len() >= 12) {
                    d[4..12].copy_from_slice(&id.0.to_be_bytes());
                }
                d
            }
            mode => {
                let mut d = genuine(&mut client, bytes.first().copied().unwrap_or(0), now);
                if mode == 2 {
                    for (b, m) in d.iter_mut().zip(bytes) {
                        *b ^= m;
                    }
                } else {
                    let _ = gw.handle_datagram(from, &d, now);
                }
                d
            }
        };
        if let Received::Reply(reply) = gw.handle_datagram(from, &datagram, now) {
            let reply = reply.to_vec();
            let _ = client.handle_datagram(TransportId(1), &reply, now);
        }
        let _ = gw.handle_tunnel_packet(bytes, now);
        gw.handle_timeout(now);
        let _ = gw.drain_events();
        for id in gw.session_ids() {
            let record = store.get(id).expect("a live session has its record");
            let session = gw.session(id).expect("session");
            assert_eq!(record.state_version, session.version());
            assert_eq!(record.active_binding.is_some(), session.binding().is_some());
        }
        assert_eq!(store.len(), gw.session_ids().len());
    }
});
