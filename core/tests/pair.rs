//! Client and gateway together over an in-memory network with two paths, on a virtual
//! clock: handshake, data both ways, jumps, denials, replays, rekey under traffic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jvpn_core::client::{Client, ClientConfig, ClientReceived};
use jvpn_core::cluster::{
    standby_probe_ack, ClusterKey, ClusterRecord, SessionSecrets, COUNTER_BLOCK,
};
use jvpn_core::crypto::{
    plaintext, Channel, Cipher, CipherSet, Initiation, KeyLimits, Keypair, Response,
    HANDSHAKE_PROLOGUE,
};
use jvpn_core::event::{EventBody, SessionEvent, TransportRef, WallClock};
use jvpn_core::fsm::State;
use jvpn_core::gateway::{AuthorizedClient, Drop, Endpoint, Gateway, GatewayConfig, Received};
use jvpn_core::ids::{NodeId, Protocol, SessionId, StateVersion, TransportId};
use jvpn_core::mac::MacKey;
use jvpn_core::policy::{Policy, PolicyConfig};
use jvpn_core::reason::ReasonCode;
use jvpn_core::store::{MemoryStore, SessionStore};
use jvpn_core::wire::{
    encode_handshake, encode_initiation, parse, Control, Datagram, InitPayload, PacketType,
    ReattachRequest, RespPayload, Timestamp, TunnelAddr, TunnelAddrs, OVERHEAD,
};

const UNIX_T0: u64 = 1_800_000_000_000;
const TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const TUNNEL6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 2);
const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn udp(id: u32) -> TransportRef {
    TransportRef {
        id: TransportId(id),
        protocol: Protocol::Udp,
    }
}

/// The client's address on path `id` (1 or 2), as the gateway sees it.
fn path_addr(id: u32) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, id as u8)),
        40_000 + id as u16,
    )
}

fn endpoint(id: u32) -> Endpoint {
    Endpoint {
        protocol: Protocol::Udp,
        addr: path_addr(id),
    }
}

/// A minimal IPv4 packet from `src` to `dst` carrying `n` as its payload.
fn ip_packet(src: Ipv4Addr, dst: Ipv4Addr, n: u32) -> Vec<u8> {
    let mut p = vec![0u8; 24];
    p[0] = 0x45;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p[20..24].copy_from_slice(&n.to_be_bytes());
    p
}

/// A minimal IPv6 packet from `src` to `dst` carrying `n` as its payload.
fn ip6_packet(src: Ipv6Addr, dst: Ipv6Addr, n: u32) -> Vec<u8> {
    let mut p = vec![0u8; 44];
    p[0] = 0x60;
    p[5] = 4;
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    p[40..44].copy_from_slice(&n.to_be_bytes());
    p
}

/// The number an [`ip_packet`] or [`ip6_packet`] carries.
fn payload_of(packet: &[u8]) -> u32 {
    let at = if packet[0] >> 4 == 6 { 40 } else { 20 };
    u32::from_be_bytes(packet[at..at + 4].try_into().expect("4 bytes"))
}

struct World {
    t0: Instant,
    now: Instant,
    gw: Gateway,
    store: Arc<MemoryStore>,
    client: Client,
    up: [bool; 2],
    /// The address a NAT on each path now gives the client's datagrams (`None`: its
    /// own); the gateway's answers to any other address are lost.
    nat: [Option<SocketAddr>; 2],
    /// Every datagram the client sent, with its path, for replay tests.
    sent: Vec<(u32, Vec<u8>)>,
    to_gw_tunnel: Vec<Vec<u8>>,
    to_client_tunnel: Vec<Vec<u8>>,
    gw_events: Vec<(SessionId, SessionEvent)>,
    client_events: Vec<SessionEvent>,
    client_key: Keypair,
    /// The first gateway's configuration.
    config: GatewayConfig,
    /// Standby probe answers the client accepted.
    standby_accepted: u32,
    /// Until when the client's reattach requests are lost on the way.
    lose_reattach_until: Option<Instant>,
    /// The largest datagram each path carries (`None`: any); larger ones are lost, both
    /// ways, with no word to either end.
    narrow: [Option<usize>; 2],
    /// The gateway predates size probes: it drops them as of an unknown type.
    drops_size_probes: bool,
    /// A second node of the first one's cluster, reached on path 2 when present (see
    /// [`World::two_nodes`]).
    second: Option<SecondNode>,
}

/// A second node of the cluster and what a cluster driver would give it: the cluster
/// key.
struct SecondNode {
    gw: Gateway,
    key: ClusterKey,
    events: Vec<(SessionId, SessionEvent)>,
    standby_acks: u32,
}

/// Whether the client accepted `datagram` on `via` (consumed it, as an answer it
/// waited for, rather than dropping it).
fn client_accepts(w: &mut World, via: u32, datagram: &[u8]) -> bool {
    let now = w.now;
    matches!(
        w.client.handle_datagram(TransportId(via), datagram, now),
        ClientReceived::Consumed
    )
}

impl World {
    fn new(policy: Policy) -> World {
        World::with_ciphers(policy, (CipherSet::ALL, CipherSet::ALL))
    }

    /// A world whose gateway and client run (offer) these ciphers.
    fn with_ciphers(policy: Policy, (at_gateway, at_client): (CipherSet, CipherSet)) -> World {
        let t0 = Instant::now();
        let policy = Arc::new(policy);
        let gw_key = Keypair::generate().expect("keys");
        let client_key = Keypair::generate().expect("keys");
        let store = Arc::new(MemoryStore::new(16, 3));
        let config = GatewayConfig {
            ciphers: at_gateway,
            keypair: gw_key.clone(),
            node_id: NodeId("gw-1".into()),
            policy: Arc::clone(&policy),
            clients: vec![AuthorizedClient {
                public: client_key.public(),
                tunnel: TunnelAddrs::new([
                    TunnelAddr {
                        addr: IpAddr::V4(TUNNEL),
                        prefix: 24,
                    },
                    TunnelAddr {
                        addr: IpAddr::V6(TUNNEL6),
                        prefix: 64,
                    },
                ])
                .expect("one address of each family"),
            }],
        };
        let gw = Gateway::new(config.clone(), store.clone(), WallClock::new(t0, UNIX_T0));
        let client = Client::new(
            ClientConfig {
                keypair: client_key.clone(),
                gateway: gw_key.public(),
                policy,
                transports: vec![udp(1), udp(2)],
                ciphers: at_client,
            },
            WallClock::new(t0, UNIX_T0),
        );
        World {
            t0,
            now: t0,
            gw,
            store,
            client,
            up: [true, true],
            nat: [None, None],
            sent: Vec::new(),
            to_gw_tunnel: Vec::new(),
            to_client_tunnel: Vec::new(),
            gw_events: Vec::new(),
            client_events: Vec::new(),
            client_key,
            config,
            standby_accepted: 0,
            lose_reattach_until: None,
            narrow: [None, None],
            drops_size_probes: false,
            second: None,
        }
    }

    /// A world whose path 2 leads to a second node of the first one's cluster (same
    /// static key and clients, a table of its own), driven as a cluster driver would
    /// drive it from the shared table (spec/cluster.md): it answers probes of sessions
    /// the first node owns as a standby, and takes a session over on its client's
    /// reattach, the first node letting go.
    fn two_nodes(policy: Policy) -> World {
        let mut w = World::new(policy);
        let gw = Gateway::new(
            w.gw_config(NodeId("gw-2".into())),
            Arc::new(MemoryStore::new(16, 3)),
            WallClock::new(w.t0, UNIX_T0),
        );
        w.second = Some(SecondNode {
            gw,
            key: cluster_key(5),
            events: Vec::new(),
            standby_acks: 0,
        });
        w
    }

    /// Two nodes, the client's session on the first (its counters reserved below
    /// 1 000, as a cluster node's are).
    fn two_nodes_connected() -> (World, SessionId) {
        let mut w = World::two_nodes(Policy::default()).attached();
        let id = w.session();
        w.gw.reserve_until(id, 1_000);
        (w, id)
    }

    /// The second node gets a datagram on path 2.
    fn second_node_receives(&mut self, bytes: &[u8]) {
        let now = self.now;
        let from = self.seen_from(2);
        let Some(node) = self.second.as_mut() else {
            return;
        };
        let mut reply = None;
        if let Ok(Datagram::Session { header, .. }) = parse(bytes) {
            let id = header.session_id;
            // The record the first node keeps in the shared table.
            let record = (node.gw.session(id).is_none())
                .then(|| self.gw.export(id, &node.key))
                .flatten()
                .and_then(Result::ok);
            match (record, header.ptype) {
                (Some(record), PacketType::Probe) => {
                    let secrets = open_secrets(&record, &node.key);
                    let mut probe = bytes.to_vec();
                    let mut out = Vec::new();
                    if standby_probe_ack(&secrets, &header, &mut probe, &mut out).is_some() {
                        node.standby_acks += 1;
                        reply = Some(out);
                    }
                }
                (Some(record), PacketType::ReattachRequest) => {
                    // The driver won the table's swap that reserves the next block.
                    let limit = record.send_reserved_until + COUNTER_BLOCK;
                    let challenge = node
                        .gw
                        .adopt(&record, &node.key, from, bytes, limit, now)
                        .expect("takeover")
                        .to_vec();
                    assert!(self.gw.hand_over(id), "the first node lets go");
                    reply = Some(challenge);
                }
                _ => {}
            }
        }
        if reply.is_none() {
            reply = match node.gw.handle_datagram(from, bytes, now) {
                Received::Reply(b) => Some(b.to_vec()),
                Received::ToTunnel(p) => {
                    self.to_gw_tunnel.push(p.to_vec());
                    None
                }
                Received::Consumed | Received::Dropped(_) => None,
            };
        }
        node.events.extend(node.gw.drain_events());
        if let Some(reply) = reply {
            self.gateway_send(2, &reply);
        }
        self.drain();
    }

    /// The first gateway's configuration under another node id.
    fn gw_config(&self, node: NodeId) -> GatewayConfig {
        GatewayConfig {
            node_id: node,
            ..self.config.clone()
        }
    }

    fn connected(policy: Policy) -> World {
        World::new(policy).attached()
    }

    /// This world once the client's handshake on path 1 attached it.
    fn attached(mut self) -> World {
        let init = self
            .client
            .connect(TransportId(1), self.now)
            .expect("connect")
            .bytes
            .to_vec();
        self.client_send(1, &init);
        assert_eq!(self.client.state(), State::Attached);
        self
    }

    /// Delivers a client datagram on path `via` to the gateway, and any reply back.
    fn client_send(&mut self, via: u32, bytes: &[u8]) {
        self.sent.push((via, bytes.to_vec()));
        if !self.up[via as usize - 1] {
            return;
        }
        if self.lose_reattach_until.is_some_and(|t| self.now < t) && is_reattach(bytes) {
            return;
        }
        if self.narrow[via as usize - 1].is_some_and(|n| bytes.len() > n) {
            return;
        }
        if self.drops_size_probes && bytes.first() == Some(&(PacketType::SizeProbe as u8)) {
            return;
        }
        if via == 2 && self.second.is_some() {
            return self.second_node_receives(bytes);
        }
        let now = self.now;
        let from = self.seen_from(via);
        let reply = match self.gw.handle_datagram(from, bytes, now) {
            Received::Reply(b) => Some(b.to_vec()),
            Received::ToTunnel(p) => {
                self.to_gw_tunnel.push(p.to_vec());
                None
            }
            Received::Consumed | Received::Dropped(_) => None,
        };
        if let Some(reply) = reply {
            self.gateway_send(via, &reply);
        }
        self.drain();
    }

    /// Where the gateway sees the client's datagrams on path `via` come from.
    fn seen_from(&self, via: u32) -> Endpoint {
        Endpoint {
            protocol: Protocol::Udp,
            addr: self.nat[via as usize - 1].unwrap_or_else(|| path_addr(via)),
        }
    }

    fn gateway_send(&mut self, via: u32, bytes: &[u8]) {
        if !self.up[via as usize - 1]
            || self.narrow[via as usize - 1].is_some_and(|n| bytes.len() > n)
        {
            return;
        }
        let now = self.now;
        let standby = matches!(parse(bytes), Ok(Datagram::Session { header, .. }) if header.ptype == PacketType::StandbyProbeAck);
        match self.client.handle_datagram(TransportId(via), bytes, now) {
            ClientReceived::ToTunnel(p) => self.to_client_tunnel.push(p.to_vec()),
            ClientReceived::Consumed if standby => self.standby_accepted += 1,
            _ => {}
        }
        self.pump();
    }

    /// Sends everything the client has queued.
    fn pump(&mut self) {
        for _ in 0..64 {
            let now = self.now;
            let Some(t) = self.client.poll_transmit(now) else {
                break;
            };
            let (via, bytes) = (t.via.0, t.bytes.to_vec());
            self.client_send(via, &bytes);
        }
        self.drain();
    }

    fn drain(&mut self) {
        self.gw_events.extend(self.gw.drain_events());
        while let Some(e) = self.client.poll_event() {
            self.client_events.push(e);
        }
    }

    fn run_until_ms(&mut self, at: u64) {
        let end = self.t0 + ms(at);
        for _ in 0..1_000_000 {
            let second = self.second.as_ref().and_then(|n| n.gw.next_deadline());
            let next = [self.client.next_deadline(), self.gw.next_deadline(), second]
                .into_iter()
                .flatten()
                .filter(|t| *t <= end)
                .min();
            let Some(next) = next else { break };
            self.now = self.now.max(next);
            let now = self.now;
            self.gw.handle_timeout(now);
            if let Some(node) = self.second.as_mut() {
                node.gw.handle_timeout(now);
                node.events.extend(node.gw.drain_events());
            }
            self.client.handle_timeout(now);
            self.pump();
        }
        self.now = self.now.max(end);
    }

    fn session(&self) -> SessionId {
        self.client.session_id().expect("established")
    }

    fn gw_binding(&self) -> Option<Endpoint> {
        self.gw.session(self.session()).and_then(|s| s.binding())
    }

    fn gw_transitions(&self) -> Vec<(State, State, ReasonCode)> {
        transitions(self.gw_events.iter().map(|(_, e)| e))
    }

    fn client_transitions(&self) -> Vec<(State, State, ReasonCode)> {
        transitions(self.client_events.iter())
    }
}

fn transitions<'a>(
    events: impl Iterator<Item = &'a SessionEvent>,
) -> Vec<(State, State, ReasonCode)> {
    events
        .filter_map(|e| match e.body {
            EventBody::SessionStateChange {
                previous_state,
                new_state,
                reason_code,
                ..
            } => Some((previous_state, new_state, reason_code)),
            _ => None,
        })
        .collect()
}

fn is_reattach(bytes: &[u8]) -> bool {
    matches!(parse(bytes), Ok(Datagram::Session { header, .. }) if header.ptype == PacketType::ReattachRequest)
}

fn reattach_results(events: &[(SessionId, SessionEvent)]) -> Vec<ReasonCode> {
    events
        .iter()
        .filter_map(|(_, e)| match e.body {
            EventBody::ReattachResult { reason_code, .. } => Some(reason_code),
            _ => None,
        })
        .collect()
}

/// Whatever each side runs, the session seals with the fastest cipher both offer, and
/// data flows both ways under it.
#[test]
fn handshake_then_data_flows_both_ways_under_the_agreed_cipher() {
    for (sides, agreed) in [
        ((CipherSet::ALL, CipherSet::ALL), Cipher::Aes256Gcm),
        (
            (CipherSet::ALL, CipherSet::CHACHA20_POLY1305),
            Cipher::ChaCha20Poly1305,
        ),
        (
            (CipherSet::CHACHA20_POLY1305, CipherSet::ALL),
            Cipher::ChaCha20Poly1305,
        ),
    ] {
        let mut w = World::with_ciphers(Policy::default(), sides).attached();
        let id = w.client.session_id().expect("established");
        assert_eq!(w.client.cipher(), Some(agreed), "{sides:?}");
        assert_eq!(w.gw.session(id).map(|s| s.cipher()), Some(agreed));
        data_flows_both_ways(&mut w);
    }
}

/// A gateway's answer naming a cipher the client did not offer is no answer: the
/// client is not established and keeps waiting, as for any response that does not
/// decode, and the same answer with the offered cipher establishes it.
#[test]
fn a_response_with_a_cipher_the_client_did_not_offer_is_refused() {
    let mut w = World::with_ciphers(
        Policy::default(),
        (CipherSet::ALL, CipherSet::CHACHA20_POLY1305),
    );
    for (cipher, accepted) in [(Cipher::Aes256Gcm, false), (Cipher::ChaCha20Poly1305, true)] {
        let now = w.now;
        let init = w
            .client
            .connect(TransportId(1), now)
            .expect("connect")
            .bytes
            .to_vec();
        let Ok(Datagram::HandshakeInit {
            sender_index,
            noise,
            ..
        }) = parse(&init)
        else {
            panic!("not an initiation");
        };
        // The gateway's answer, made by hand with the gateway's key and this cipher.
        let response = Response::read(&w.config.keypair, HANDSHAKE_PROLOGUE, noise).expect("read");
        let payload = RespPayload {
            session_id: SessionId(77),
            binding_version: StateVersion(1),
            tunnel: w.config.clients[0].tunnel,
            cipher,
        };
        let (msg2, _) = response.finish(&payload.encode()).expect("finish");
        let mut answer = Vec::new();
        encode_handshake(PacketType::HandshakeResp, sender_index, &msg2, &mut answer);
        assert_eq!(client_accepts(&mut w, 1, &answer), accepted, "{cipher}");
        assert_eq!(w.client.cipher(), accepted.then_some(cipher), "{cipher}");
    }
}

fn data_flows_both_ways(w: &mut World) {
    let tunnel = w.client.tunnel().expect("established");
    assert_eq!(tunnel.v4().map(|t| t.addr), Some(IpAddr::V4(TUNNEL)));
    assert_eq!(
        tunnel.v6().map(|t| (t.addr, t.prefix)),
        Some((IpAddr::V6(TUNNEL6), 64))
    );
    assert_eq!(w.gw_binding(), Some(endpoint(1)));
    for n in 0..100 {
        let now = w.now;
        let t = w
            .client
            .send_data(&ip_packet(TUNNEL, REMOTE, n), now)
            .expect("send");
        let (via, bytes) = (t.via.0, t.bytes.to_vec());
        w.client_send(via, &bytes);
        let (to, bytes) =
            w.gw.handle_tunnel_packet(&ip_packet(REMOTE, TUNNEL, n), now)
                .expect("route");
        assert_eq!(to, endpoint(1));
        let bytes = bytes.to_vec();
        w.gateway_send(1, &bytes);
    }
    let got: Vec<u32> = w.to_gw_tunnel.iter().map(|p| payload_of(p)).collect();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    let got: Vec<u32> = w.to_client_tunnel.iter().map(|p| payload_of(p)).collect();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    // Per-packet overhead on the wire: header + tag.
    let now = w.now;
    let t = w.client.send_data(&[0x45; 1400], now).expect("send");
    assert_eq!(t.bytes.len() - 1400, 36);
}

/// Both families through one dual-stack session, interleaved, each routed back by
/// its own tunnel address.
#[test]
fn ipv4_and_ipv6_share_one_session_both_ways() {
    let mut w = World::connected(Policy::default());
    for n in 0..100 {
        let now = w.now;
        let (up, down) = if n % 2 == 0 {
            (
                ip6_packet(TUNNEL6, REMOTE6, n),
                ip6_packet(REMOTE6, TUNNEL6, n),
            )
        } else {
            (ip_packet(TUNNEL, REMOTE, n), ip_packet(REMOTE, TUNNEL, n))
        };
        let t = w.client.send_data(&up, now).expect("send");
        let (via, bytes) = (t.via.0, t.bytes.to_vec());
        w.client_send(via, &bytes);
        let (to, bytes) = w.gw.handle_tunnel_packet(&down, now).expect("route");
        assert_eq!(to, endpoint(1));
        let bytes = bytes.to_vec();
        w.gateway_send(1, &bytes);
    }
    for got in [&w.to_gw_tunnel, &w.to_client_tunnel] {
        let numbers: Vec<u32> = got.iter().map(|p| payload_of(p)).collect();
        assert_eq!(numbers, (0..100).collect::<Vec<_>>());
        assert!(got.iter().step_by(2).all(|p| p[0] >> 4 == 6));
    }
    let now = w.now;
    let stranger = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3);
    assert!(w
        .gw
        .handle_tunnel_packet(&ip6_packet(REMOTE6, stranger, 1), now)
        .is_err());
    let t = w
        .client
        .send_data(&ip6_packet(stranger, REMOTE6, 1), now)
        .expect("send");
    let bytes = t.bytes.to_vec();
    assert_eq!(
        w.gw.handle_datagram(endpoint(1), &bytes, now),
        Received::Dropped(Drop::SpoofedSource)
    );
}

/// A NAT gives the client a new mapping: the first authenticated packets from it get a
/// challenge, the client (which noticed nothing) answers on its transport, and the
/// binding follows, with no reattach and the same session. A genuine packet relocated
/// by an attacker gets a challenge too, but the binding never moves to the attacker,
/// also when the attacker relays the challenge to the client.
#[test]
fn a_nat_rebinding_moves_the_binding_in_one_round_trip_and_a_relocated_packet_never_does() {
    let mut w = World::connected(Policy::default());
    let id = w.session();
    let attacker = Endpoint {
        protocol: Protocol::Udp,
        addr: "203.0.113.66:4444".parse().expect("addr"),
    };
    let now = w.now;
    let t = w
        .client
        .send_data(&ip_packet(TUNNEL, REMOTE, 1), now)
        .expect("send");
    let genuine = t.bytes.to_vec();
    let challenge = match w.gw.handle_datagram(attacker, &genuine, now) {
        Received::Reply(b) => b.to_vec(),
        other => panic!("no challenge to the new address: {other:?}"),
    };
    assert!(
        w.to_gw_tunnel.is_empty(),
        "nothing delivered from an unvalidated address"
    );
    // The attacker relays the challenge to the client, which answers on its transport:
    // from its own address, not the attacker's.
    w.gateway_send(1, &challenge);
    assert_eq!(w.gw.drops().get(&Drop::PathMismatch), Some(&1));
    assert_eq!(w.gw_binding(), Some(endpoint(1)));
    // The original, arriving after its relocated copy, is a replay.
    w.client_send(1, &genuine);
    assert_eq!(w.gw.drops().get(&Drop::Replay), Some(&1));
    w.run_until_ms(3_000);
    assert_eq!(w.gw_binding(), Some(endpoint(1)));
    assert!(
        reattach_results(&w.gw_events).is_empty(),
        "no event for an unanswered roam"
    );

    // The NAT's new mapping on path 1.
    let mapped: SocketAddr = "198.51.100.9:61000".parse().expect("addr");
    w.nat[0] = Some(mapped);
    let before = w.gw.session(id).expect("session").bound_at();
    let now = w.now;
    let t = w
        .client
        .send_data(&ip_packet(TUNNEL, REMOTE, 2), now)
        .expect("send");
    let (via, bytes) = (t.via.0, t.bytes.to_vec());
    w.client_send(via, &bytes);
    let moved = Endpoint {
        protocol: Protocol::Udp,
        addr: mapped,
    };
    assert_eq!(w.gw_binding(), Some(moved), "one round trip, no reattach");
    assert_eq!(w.session(), id);
    assert_eq!(w.client.state(), State::Attached);
    assert!(w
        .client_events
        .iter()
        .all(|e| !matches!(e.body, EventBody::ReattachAttempt { .. })));
    let seen = transitions(w.gw_events.iter().map(|(_, e)| e));
    assert_eq!(
        &seen[seen.len() - 3..],
        [
            (State::Attached, State::Volatile, ReasonCode::TransportDead),
            (
                State::Volatile,
                State::Recovering,
                ReasonCode::DeadTransportRecovery
            ),
            (
                State::Recovering,
                State::Attached,
                ReasonCode::ReattachSuccess
            ),
        ]
    );
    assert!(w.gw_events.iter().any(|(_, e)| matches!(
        e.body,
        EventBody::TransportSwitch {
            explicit: false,
            ..
        }
    )));
    let after = w.gw.session(id).expect("session").bound_at();
    assert!(after > before, "the binding's version moved with it");
    // The gateway now answers the new mapping, and the client learns the new version
    // from its next heartbeat's answer: an explicit jump later is not stale.
    let now = w.now;
    let (to, _) =
        w.gw.handle_tunnel_packet(&ip_packet(REMOTE, TUNNEL, 3), now)
            .expect("route");
    assert_eq!(to, moved);
    w.run_until_ms(w.now.duration_since(w.t0).as_millis() as u64 + 3_000);
    w.up[0] = false;
    w.run_until_ms(w.now.duration_since(w.t0).as_millis() as u64 + 6_000);
    assert_eq!(
        w.gw_binding(),
        Some(endpoint(2)),
        "{:?}",
        reattach_results(&w.gw_events)
    );
    assert_eq!(w.session(), id);
}

#[test]
fn a_spoofed_inner_source_is_dropped() {
    let mut w = World::connected(Policy::default());
    let now = w.now;
    let t = w
        .client
        .send_data(&ip_packet(Ipv4Addr::new(10, 77, 0, 9), REMOTE, 1), now)
        .expect("send");
    let bytes = t.bytes.to_vec();
    assert_eq!(
        w.gw.handle_datagram(endpoint(1), &bytes, now),
        Received::Dropped(Drop::SpoofedSource)
    );
}

#[test]
fn a_cut_path_makes_the_session_jump_with_its_identity_intact() {
    let mut w = World::connected(Policy::default());
    let id = w.session();
    w.run_until_ms(5_000);
    w.up[0] = false;
    w.run_until_ms(10_000);

    // With no delay on the paths, the third lost heartbeat and the 2 s heartbeat age
    // fall on the same instant; the fixed trigger order reports the heartbeat timeout.
    assert_eq!(w.session(), id, "session id changed");
    assert_eq!(w.client.state(), State::Attached);
    assert_eq!(w.gw_binding(), Some(endpoint(2)));
    assert_eq!(
        w.client_transitions(),
        [
            (
                State::Birth,
                State::Attached,
                ReasonCode::AttachedToTransport
            ),
            (
                State::Attached,
                State::Volatile,
                ReasonCode::HeartbeatTimeout
            ),
            (
                State::Volatile,
                State::Recovering,
                ReasonCode::DeadTransportRecovery
            ),
            (
                State::Recovering,
                State::Attached,
                ReasonCode::ReattachSuccess
            ),
        ]
    );
    // The gateway had not noticed: it learns the cause from the authenticated request
    // and goes through the same transitions, for the same reasons.
    assert_eq!(w.gw_transitions(), w.client_transitions());
    let switches = w
        .gw_events
        .iter()
        .filter(|(_, e)| matches!(e.body, EventBody::TransportSwitch { .. }))
        .count();
    assert_eq!(switches, 1);
    // On both sides the result and the switch come just before RECOVERING → ATTACHED
    // (spec/events.md).
    let around_the_switch = |events: Vec<&EventBody>| -> Vec<String> {
        let at = events
            .iter()
            .position(|e| matches!(e, EventBody::TransportSwitch { .. }))
            .expect("a switch");
        events[at - 1..=at + 1]
            .iter()
            .map(|e| match e {
                EventBody::SessionStateChange { new_state, .. } => format!("-> {new_state:?}"),
                other => other.event_type().to_string(),
            })
            .collect()
    };
    let expected = ["ReattachResult", "TransportSwitch", "-> Attached"];
    assert_eq!(
        around_the_switch(w.gw_events.iter().map(|(_, e)| &e.body).collect()),
        expected
    );
    assert_eq!(
        around_the_switch(w.client_events.iter().map(|e| &e.body).collect()),
        expected
    );
    // The table agrees: one binding, on path 2, at the version the session holds.
    let record = w.store.get(id).expect("record");
    let binding = record.active_binding.expect("bound");
    assert_eq!(binding.transport.id, TransportId(2));
    assert_eq!(
        record.state_version,
        w.gw.session(id).expect("session").version()
    );
    // It stays there: the new path is heartbeated at once, so no second jump follows.
    w.run_until_ms(40_000);
    assert_eq!(
        w.client_transitions().len(),
        4,
        "{:?}",
        w.client_transitions()
    );
    assert_eq!(w.gw_binding(), Some(endpoint(2)));
    // Data now flows on path 2 both ways.
    let now = w.now;
    let (to, bytes) =
        w.gw.handle_tunnel_packet(&ip_packet(REMOTE, TUNNEL, 7), now)
            .expect("route");
    assert_eq!(to, endpoint(2));
    let bytes = bytes.to_vec();
    w.gateway_send(2, &bytes);
    assert_eq!(w.to_client_tunnel.last().map(|p| payload_of(p)), Some(7));
}

/// The first reattach requests on the new path are lost: the client sends the request
/// again every second (fresh), so the session is reattached as soon as the path lets
/// one through, within the first attempt's recovery window, not after it.
#[test]
fn a_lost_reattach_request_is_sent_again_within_the_recovery_window() {
    let mut w = World::connected(Policy::default());
    let id = w.session();
    w.run_until_ms(5_000);
    w.up[0] = false;
    w.lose_reattach_until = Some(w.t0 + ms(9_500));
    w.run_until_ms(20_000);
    assert_eq!(w.session(), id);
    assert_eq!(w.client.state(), State::Attached);
    assert_eq!(w.gw_binding(), Some(endpoint(2)));
    let at = |to: State, reason: ReasonCode| {
        w.client_events
            .iter()
            .find(|e| {
                matches!(e.body, EventBody::SessionStateChange { new_state, reason_code, .. }
                    if new_state == to && reason_code == reason)
            })
            .map(|e| e.at)
            .expect("the transition")
    };
    let recovering = at(State::Recovering, ReasonCode::DeadTransportRecovery);
    let attached = at(State::Attached, ReasonCode::ReattachSuccess);
    let window = Policy::default().recovery_window();
    assert!(
        attached < recovering + window,
        "reattached {:?} after recovering began (window {window:?})",
        attached - recovering
    );
    assert!(attached <= w.t0 + ms(9_500) + jvpn_core::client::REATTACH_RESEND);
    let requests: Vec<Vec<u8>> = w
        .sent
        .iter()
        .filter(|(via, b)| *via == 2 && is_reattach(b))
        .map(|(_, b)| b.clone())
        .collect();
    assert!(requests.len() >= 3, "{} requests", requests.len());
    // Each is fresh: no two alike.
    for (i, a) in requests.iter().enumerate() {
        assert!(requests[i + 1..].iter().all(|b| b != a));
    }
    // One attempt: no second ReattachAttempt event, no denial.
    assert_eq!(
        w.client_events
            .iter()
            .filter(|e| matches!(e.body, EventBody::ReattachAttempt { .. }))
            .count(),
        1
    );
}

#[test]
fn a_new_path_is_heartbeated_at_once_after_a_jump() {
    // Standbys are probed only every 5 s, longer than the 2 s heartbeat timeout: a path
    // that became active and stayed on its standby schedule would time out at once.
    let policy = {
        let mut c = PolicyConfig::starter();
        c.volatility.probe_interval_ms = Some(5_000);
        c.validate().expect("policy")
    };
    let mut w = World::connected(policy);
    w.run_until_ms(6_000);
    w.up[0] = false;
    w.run_until_ms(40_000);
    assert_eq!(w.gw_binding(), Some(endpoint(2)));
    assert_eq!(
        w.client_transitions().len(),
        4,
        "a second jump followed: {:?}",
        w.client_transitions()
    );
}

#[test]
fn a_replayed_reattach_from_another_address_never_moves_the_binding() {
    let mut w = World::connected(Policy::default());
    w.run_until_ms(3_000);
    w.up[0] = false;
    w.run_until_ms(8_000);
    assert_eq!(w.gw_binding(), Some(endpoint(2)));
    let (_, request) = w
        .sent
        .iter()
        .find(|(_, b)| b.first() == Some(&(PacketType::ReattachRequest as u8)))
        .cloned()
        .expect("a reattach request was sent");
    let version = w.gw.session(w.session()).expect("session").version();
    let attacker = Endpoint {
        protocol: Protocol::Udp,
        addr: "203.0.113.66:5555".parse().expect("addr"),
    };
    let now = w.now;
    assert_eq!(
        w.gw.handle_datagram(attacker, &request, now),
        Received::Dropped(Drop::Replay)
    );
    w.drain();
    assert_eq!(w.gw_binding(), Some(endpoint(2)));
    assert_eq!(
        w.gw.session(w.session()).expect("session").version(),
        version
    );
    assert_eq!(
        reattach_results(&w.gw_events).last(),
        Some(&ReasonCode::ReplayDetected)
    );
    assert!(w
        .gw_events
        .iter()
        .any(|(_, e)| matches!(e.body, EventBody::SecurityReplayDetected { .. })));
}

#[test]
fn replayed_data_and_heartbeats_are_dropped_and_move_nothing() {
    let mut w = World::connected(Policy::default());
    let now = w.now;
    let data = w
        .client
        .send_data(&ip_packet(TUNNEL, REMOTE, 1), now)
        .expect("send")
        .bytes
        .to_vec();
    assert!(matches!(
        w.gw.handle_datagram(endpoint(1), &data, now),
        Received::ToTunnel(_)
    ));
    assert_eq!(
        w.gw.handle_datagram(endpoint(1), &data, now),
        Received::Dropped(Drop::Replay)
    );
    // Replayed from another address: still a replay, and the binding stays.
    assert_eq!(
        w.gw.handle_datagram(endpoint(2), &data, now),
        Received::Dropped(Drop::Replay)
    );
    w.run_until_ms(600); // a heartbeat goes out and is answered
    let heartbeat = w
        .sent
        .iter()
        .rev()
        .find(|(_, b)| b.first() == Some(&(PacketType::Heartbeat as u8)))
        .map(|(_, b)| b.clone())
        .expect("a heartbeat was sent");
    let now = w.now;
    assert_eq!(
        w.gw.handle_datagram(endpoint(1), &heartbeat, now),
        Received::Dropped(Drop::Replay)
    );
    assert_eq!(w.gw_binding(), Some(endpoint(1)));
    assert_eq!(w.gw.drops().get(&Drop::Replay), Some(&3));
}

/// A client driven by hand: handshake, then any packet sealed with its session keys.
struct RawClient {
    channel: Channel,
    session: SessionId,
    binding_version: StateVersion,
}

impl RawClient {
    fn connect(w: &mut World, key: &Keypair, via: u32) -> RawClient {
        let payload = InitPayload {
            timestamp: Timestamp {
                secs: UNIX_T0 / 1000 + 1_000 + u64::from(via),
                nanos: 0,
            },
            transport_id: TransportId(via),
            protocol: Protocol::Udp,
            ciphers: CipherSet::ALL,
        };
        let (init, msg1) = Initiation::start(
            key,
            &w.gw.public_key(),
            HANDSHAKE_PROLOGUE,
            &payload.encode(),
        )
        .expect("start");
        let mut packet = Vec::new();
        encode_initiation(
            7,
            &msg1,
            &MacKey::for_gateway(&w.gw.public_key()),
            None,
            &mut packet,
        );
        let now = w.now;
        let Received::Reply(reply) = w.gw.handle_datagram(endpoint(via), &packet, now) else {
            panic!("handshake refused");
        };
        let Ok(Datagram::HandshakeResp { noise, .. }) = parse(reply) else {
            panic!("not a response");
        };
        let (resp, keys) = init.finish(noise).expect("finish");
        let resp = RespPayload::decode(&resp).expect("payload");
        RawClient {
            channel: Channel::new(
                resp.session_id,
                (resp.cipher, keys),
                KeyLimits::from_policy(&Policy::default()),
                now,
            ),
            session: resp.session_id,
            binding_version: resp.binding_version,
        }
    }

    /// Opens a gateway's path challenge and seals the answer to it.
    fn answer_challenge(&mut self, challenge: &[u8], now: Instant) -> Vec<u8> {
        let header = header_of(challenge);
        let mut opened = challenge.to_vec();
        self.channel
            .open_in_place(&header, &mut opened, now)
            .expect("open challenge");
        let Ok(Control::PathChallenge { token }) =
            Control::decode(header.ptype, plaintext(&opened))
        else {
            panic!("not a path challenge");
        };
        let mut response = Vec::new();
        self.channel
            .seal(&Control::PathResponse { token }, now, &mut response)
            .expect("seal");
        response
    }

    fn reattach(
        &mut self,
        now: Instant,
        timestamp_ms: u64,
        expected: StateVersion,
        via: u32,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let request = ReattachRequest {
            timestamp_ms,
            expected_version: expected,
            transport_id: TransportId(via),
            protocol: Protocol::Udp,
            cause: ReasonCode::HeartbeatTimeout,
        };
        self.channel
            .seal(&Control::ReattachRequest(request), now, &mut out)
            .expect("seal");
        out
    }
}

/// Delivers a reattach request on `via` and, if the gateway challenges the path,
/// answers the challenge from `answer_from`; returns the last reattach result and the
/// binding afterwards.
fn reattach_with_challenge(
    w: &mut World,
    raw: &mut RawClient,
    request: &[u8],
    via: u32,
    answer_from: u32,
) -> (Option<ReasonCode>, Option<Endpoint>) {
    let now = w.now;
    let challenge = match w.gw.handle_datagram(endpoint(via), request, now) {
        Received::Reply(b) => b.to_vec(),
        other => panic!("no challenge: {other:?}"),
    };
    let response = raw.answer_challenge(&challenge, now);
    let _ = w.gw.handle_datagram(endpoint(answer_from), &response, now);
    w.drain();
    let binding = w.gw.session(raw.session).and_then(|s| s.binding());
    let last = reattach_results(&w.gw_events)
        .last()
        .copied()
        .filter(|r| *r != ReasonCode::RecoveryWindowExpired);
    (last, binding)
}

fn denial_of(
    w: &mut World,
    raw: &RawClient,
    datagram: &[u8],
    via: u32,
) -> (Option<ReasonCode>, Option<Endpoint>) {
    let now = w.now;
    let _ = w.gw.handle_datagram(endpoint(via), datagram, now);
    w.drain();
    let binding = w.gw.session(raw.session).and_then(|s| s.binding());
    (reattach_results(&w.gw_events).last().copied(), binding)
}

#[test]
fn reattach_denials_carry_the_contract_reason_and_change_no_binding() {
    let mut w = World::new(Policy::default());
    let key = w.client_key.clone();
    let mut raw = RawClient::connect(&mut w, &key, 1);
    let wall = UNIX_T0;

    // Wrong keys: another client's channel, forged for this session id.
    let mut other = World::new(Policy::default());
    let other_key = other.client_key.clone();
    let mut forger = RawClient::connect(&mut other, &other_key, 1);
    forger.session = raw.session;
    let mut forged = forger.reattach(w.now, wall, raw.binding_version, 2);
    forged[4..12].copy_from_slice(&raw.session.0.to_be_bytes());
    assert_eq!(
        denial_of(&mut w, &raw, &forged, 2),
        (Some(ReasonCode::BadProof), Some(endpoint(1)))
    );

    // A timestamp older than reattach_proof_max_age (5 s).
    let stale = raw.reattach(w.now, wall - 6_000, raw.binding_version, 2);
    assert_eq!(
        denial_of(&mut w, &raw, &stale, 2),
        (Some(ReasonCode::StaleRequest), Some(endpoint(1)))
    );

    // An expected version that is not the binding's.
    let wrong_version = raw.reattach(w.now, wall, StateVersion(99), 2);
    assert_eq!(
        denial_of(&mut w, &raw, &wrong_version, 2),
        (Some(ReasonCode::StaleStateVersion), Some(endpoint(1)))
    );

    // A valid one moves the binding; the same expected version again is stale.
    let valid = raw.reattach(w.now, wall, raw.binding_version, 2);
    assert_eq!(
        reattach_with_challenge(&mut w, &mut raw, &valid, 2, 2),
        (Some(ReasonCode::ReattachSuccess), Some(endpoint(2)))
    );
    w.now += ms(2_000); // past the cooldown
    let again = raw.reattach(w.now, wall + 2_000, raw.binding_version, 1);
    assert_eq!(
        denial_of(&mut w, &raw, &again, 1),
        (Some(ReasonCode::StaleStateVersion), Some(endpoint(2)))
    );

    // A terminated session: invalid_state_for_reattach, and (its keys being gone) the
    // answer is the clear-text hint.
    let now = w.now;
    w.gw.terminate(raw.session, now).expect("terminate");
    let late = raw.reattach(now, wall + 2_000, raw.binding_version, 1);
    let reply = w.gw.handle_datagram(endpoint(1), &late, now);
    assert!(
        matches!(reply, Received::Reply(b) if matches!(parse(b), Ok(Datagram::SessionUnknown { .. })))
    );
    w.drain();
    assert_eq!(
        reattach_results(&w.gw_events).last(),
        Some(&ReasonCode::InvalidStateForReattach)
    );
    assert_eq!(w.gw.drops().get(&Drop::SessionEnded), Some(&1));
    // A session the gateway never had: unknown_session.
    let mut forged = late.clone();
    forged[4..12].copy_from_slice(&0x0bad_u64.to_be_bytes());
    let _ = w.gw.handle_datagram(endpoint(1), &forged, now);
    assert_eq!(w.gw.drops().get(&Drop::UnknownSession), Some(&1));
}

#[test]
fn a_genuine_request_relocated_by_an_attacker_does_not_move_the_binding() {
    let mut w = World::new(Policy::default());
    let key = w.client_key.clone();
    let mut raw = RawClient::connect(&mut w, &key, 1);
    let request = raw.reattach(w.now, UNIX_T0, raw.binding_version, 2);
    // The attacker delivers the captured request from its own address (path 2 here
    // stands for it) and relays the challenge to the client, which answers from where
    // it really is (path 1): the response comes from another endpoint than challenged.
    assert_eq!(
        reattach_with_challenge(&mut w, &mut raw, &request, 2, 1),
        (None, Some(endpoint(1)))
    );
    assert_eq!(w.gw.drops().get(&Drop::PathMismatch), Some(&1));
    let attempts = w
        .gw_events
        .iter()
        .filter(|(_, e)| matches!(e.body, EventBody::ReattachAttempt { .. }))
        .count();
    assert_eq!(attempts, 1, "the challenge is reported as an attempt");
    // The genuine copy, arriving later from the real address, is a replay: refused.
    let now = w.now;
    assert_eq!(
        w.gw.handle_datagram(endpoint(1), &request, now),
        Received::Dropped(Drop::Replay)
    );
    assert_eq!(
        w.gw.session(raw.session).and_then(|s| s.binding()),
        Some(endpoint(1))
    );
}

#[test]
fn an_authentic_request_with_a_stale_timestamp_does_not_count_against_the_session() {
    let mut w = World::new(Policy::default());
    let key = w.client_key.clone();
    let mut raw = RawClient::connect(&mut w, &key, 1);
    // An attacker holding genuine requests back past their freshness window, many times:
    // each is refused, none ends the session.
    for i in 0..10u64 {
        let stale = raw.reattach(w.now, UNIX_T0 - 60_000 - i, raw.binding_version, 2);
        assert_eq!(
            denial_of(&mut w, &raw, &stale, 2).0,
            Some(ReasonCode::StaleRequest)
        );
    }
    assert_eq!(
        w.gw.session(raw.session).map(|s| s.state()),
        Some(State::Attached)
    );
}

fn policy_with(edit: impl FnOnce(&mut PolicyConfig)) -> Policy {
    let mut c = PolicyConfig::starter();
    edit(&mut c);
    c.validate().expect("policy")
}

/// A reattach after the session's lifetime (or transport-lost TTL) is refused for that
/// reason, whether the gateway's timers already ended the session or not.
fn late_reattach_reason(
    policy: Policy,
    after: Duration,
    timers_first: bool,
) -> (Option<ReasonCode>, Received<'static>) {
    let mut w = World::new(policy);
    let key = w.client_key.clone();
    let mut raw = RawClient::connect(&mut w, &key, 1);
    w.now += after;
    if timers_first {
        let now = w.now;
        w.gw.handle_timeout(now);
        assert!(
            w.gw.session_ids().is_empty(),
            "the timers ended the session"
        );
    }
    let request = raw.reattach(
        w.now,
        UNIX_T0 + after.as_millis() as u64,
        raw.binding_version,
        2,
    );
    let now = w.now;
    let received = match w.gw.handle_datagram(endpoint(2), &request, now) {
        Received::Dropped(d) => Received::Dropped(d),
        Received::Reply(_) => Received::Reply(&[]),
        Received::ToTunnel(_) => Received::ToTunnel(&[]),
        Received::Consumed => Received::Consumed,
    };
    w.drain();
    (reattach_results(&w.gw_events).last().copied(), received)
}

#[test]
fn a_reattach_past_the_lifetime_or_the_ttl_is_refused_for_that_reason() {
    let short_life = policy_with(|c| {
        c.session.max_lifetime_ms = Some(10_000);
        c.session.transport_lost_ttl_ms = Some(10_000);
    });
    let short_ttl = policy_with(|c| c.session.transport_lost_ttl_ms = Some(5_000));
    for timers_first in [false, true] {
        let (reason, received) = late_reattach_reason(short_life.clone(), ms(10_000), timers_first);
        assert_eq!(
            reason,
            Some(ReasonCode::SessionExpired),
            "timers first: {timers_first}"
        );
        if !timers_first {
            assert_eq!(received, Received::Dropped(Drop::SessionEnded));
        }
        let (reason, _) = late_reattach_reason(short_ttl.clone(), ms(6_000), timers_first);
        assert_eq!(
            reason,
            Some(ReasonCode::TransportTtlExceeded),
            "timers first: {timers_first}"
        );
    }
}

#[test]
fn refusals_anyone_can_provoke_are_reported_at_a_bounded_rate() {
    let mut w = World::new(Policy::default());
    let key = w.client_key.clone();
    let mut raw = RawClient::connect(&mut w, &key, 1);
    let mut other = World::new(Policy::default());
    let other_key = other.client_key.clone();
    let mut forger = RawClient::connect(&mut other, &other_key, 1);
    let mut forged = forger.reattach(w.now, UNIX_T0, raw.binding_version, 2);
    forged[4..12].copy_from_slice(&raw.session.0.to_be_bytes());
    let now = w.now;
    let _ = w.gw.drain_events(); // the handshake's own events
                                 // A live session: 1 000 forged requests in one instant.
    for _ in 0..1_000 {
        let _ = w.gw.handle_datagram(endpoint(2), &forged, now);
    }
    // Each forgery is a denied reattach and a failed validation: 10 of each at most.
    let events = w.gw.drain_events();
    let of = |kind: &str| {
        events
            .iter()
            .filter(|(_, e)| e.body.event_type() == kind)
            .count()
    };
    assert!(
        of("ReattachResult") <= 10 && of("SecurityValidationFailed") <= 10,
        "{} events for one second of forgeries",
        events.len()
    );
    // From another endpoint than the binding, only the session's budget for such
    // packets reaches it; the rest are dropped unread.
    let burst = u64::from(jvpn_core::gateway::OffBindingLimits::BURST);
    assert_eq!(w.gw.drops().get(&Drop::Unauthenticated), Some(&burst));
    assert_eq!(
        w.gw.drops().get(&Drop::OffBindingFlood),
        Some(&(1_000 - burst))
    );
    // The flood of one kind hides no other: a replay in the same instant is reported.
    let genuine = raw.reattach(now, UNIX_T0, raw.binding_version, 1);
    let _ = w.gw.handle_datagram(endpoint(1), &genuine, now);
    let _ = w.gw.drain_events();
    let _ = w.gw.handle_datagram(endpoint(1), &genuine, now);
    let replays = w.gw.drain_events();
    assert!(
        replays
            .iter()
            .any(|(_, e)| e.body.event_type() == "SecurityReplayDetected"),
        "{replays:?}"
    );
    // One second later the budget is there again.
    let later = now + ms(1_000);
    let _ = w.gw.handle_datagram(endpoint(2), &forged, later);
    assert!(!w.gw.drain_events().is_empty());
    // An ended session: its id is still known, and 100 000 requests do not grow memory.
    w.gw.terminate(raw.session, later).expect("terminate");
    let _ = w.gw.drain_events();
    for _ in 0..100_000 {
        let _ = w.gw.handle_datagram(endpoint(2), &forged, later);
    }
    assert!(w.gw.drain_events().len() <= 10);
    assert_eq!(w.gw.drops().get(&Drop::SessionEnded), Some(&100_000));
}

#[test]
fn a_forged_handshake_answer_leaves_a_retry_due_and_junk_does_not_postpone_it() {
    use jvpn_core::client::HANDSHAKE_TIMEOUT;
    let mut w = World::new(Policy::default());
    let t0 = w.now;
    let init = w
        .client
        .connect(TransportId(1), t0)
        .expect("connect")
        .bytes
        .to_vec();
    let index: [u8; 4] = init[4..8].try_into().expect("index");
    // Junk with another index, at t0 + 1 s: ignored, the retry stays where it was.
    let mut junk = vec![PacketType::HandshakeResp as u8, 0, 0, 0, 9, 9, 9, 9];
    junk.resize(90, 0x55);
    let later = t0 + ms(1_000);
    assert!(matches!(
        w.client.handle_datagram(TransportId(1), &junk, later),
        ClientReceived::Dropped(_)
    ));
    assert_eq!(w.client.next_deadline(), Some(t0 + HANDSHAKE_TIMEOUT));
    // A forged answer with the right (clear-text) index: refused, and a retry is due
    // when the genuine answer would have been given up — not never.
    junk[4..8].copy_from_slice(&index);
    assert!(matches!(
        w.client.handle_datagram(TransportId(1), &junk, later),
        ClientReceived::Dropped(_)
    ));
    assert_eq!(w.client.state(), State::Birth);
    assert_eq!(w.client.next_deadline(), Some(t0 + HANDSHAKE_TIMEOUT));
    assert!(!w.client.handshake_timed_out(t0 + HANDSHAKE_TIMEOUT - ms(1)));
    assert!(w.client.handshake_timed_out(t0 + HANDSHAKE_TIMEOUT));
    // The retry then succeeds.
    w.now = t0 + HANDSHAKE_TIMEOUT;
    let now = w.now;
    let retry = w
        .client
        .connect(TransportId(1), now)
        .expect("connect")
        .bytes
        .to_vec();
    w.client_send(1, &retry);
    assert_eq!(w.client.state(), State::Attached);
}

#[test]
fn a_tampered_clear_prefix_of_an_initiation_never_yields_a_session() {
    for byte in 0..8 {
        let mut w = World::new(Policy::default());
        let now = w.now;
        let mut init = w
            .client
            .connect(TransportId(1), now)
            .expect("connect")
            .bytes
            .to_vec();
        init[byte] ^= 0x01;
        // Type and reserved bytes: refused by the parser; the index: by the MAC, before
        // any Diffie-Hellman.
        match w.gw.handle_datagram(endpoint(1), &init, now) {
            Received::Dropped(Drop::HandshakeMac) => assert!(byte >= 4, "byte {byte}"),
            Received::Dropped(Drop::Malformed) => assert!(byte < 4, "byte {byte}"),
            other => panic!("byte {byte}: {other:?}"),
        }
        // The MAC is no authentication (anyone who knows the gateway's key computes it):
        // an index changed and the MAC made anew gets an answer, but to an index the
        // client never sent, and the client ignores it.
        if byte >= 4 {
            let mac_len = jvpn_core::wire::MAC_LEN;
            let covered = init.len() - 2 * mac_len;
            let mac = MacKey::for_gateway(&w.gw.public_key()).mac(&init[..covered]);
            init[covered..covered + mac_len].copy_from_slice(&mac);
            let Received::Reply(resp) = w.gw.handle_datagram(endpoint(1), &init, now) else {
                panic!("byte {byte}: a right MAC is answered");
            };
            let resp = resp.to_vec();
            assert!(matches!(
                w.client.handle_datagram(TransportId(1), &resp, now),
                ClientReceived::Dropped(_)
            ));
            assert_eq!(w.client.state(), State::Birth);
        }
    }
}

/// A flood of initiations: those not made for this gateway (a wrong MAC) and those past
/// their source's budget are refused before any Diffie-Hellman; the budget of another
/// source is untouched, so a real client still gets its session.
#[test]
fn initiations_failing_the_cheap_checks_never_reach_a_diffie_hellman() {
    let mut w = World::new(Policy::default());
    let now = w.now;
    let init = w
        .client
        .connect(TransportId(1), now)
        .expect("connect")
        .bytes
        .to_vec();
    let mut forged = init.clone();
    forged[20] ^= 0xff; // inside the Noise message: the MAC no longer matches
    for _ in 0..10_000 {
        let _ = w.gw.handle_datagram(endpoint(4), &forged, now);
    }
    assert_eq!(w.gw.drops().get(&Drop::HandshakeMac), Some(&10_000));
    // Right MACs from one source (a replayed genuine initiation): its budget, then
    // refused before the responder, whose own refusal (replay) is reached only within it.
    for _ in 0..1_000 {
        let _ = w.gw.handle_datagram(endpoint(5), &init, now);
    }
    let budget = u64::from(jvpn_core::gateway::HandshakeLimits::BURST);
    assert_eq!(
        w.gw.drops().get(&Drop::HandshakeRate),
        Some(&(1_000 - budget))
    );
    // The real client, from its own address, is answered.
    let fresh = w
        .client
        .connect(TransportId(1), now)
        .expect("connect")
        .bytes
        .to_vec();
    w.client_send(1, &fresh);
    assert_eq!(w.client.state(), State::Attached);
}

/// Under load, an initiation without a cookie gets a cookie reply, not a
/// Diffie-Hellman: a flood from many (spoofed) sources costs no handshake, while the
/// real client takes its cookie, sends again at once on the same path, and attaches.
#[test]
fn under_load_the_gateway_answers_cookies_and_a_real_client_still_attaches() {
    let mut w = World::new(Policy::default());
    w.gw.set_backlog(true);
    let now = w.now;
    let init = w
        .client
        .connect(TransportId(1), now)
        .expect("connect")
        .bytes
        .to_vec();
    let mut cookie_replies = 0;
    for i in 0..2_000u32 {
        let spoofed = Endpoint {
            protocol: Protocol::Udp,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + i)), 5000),
        };
        if let Received::Reply(b) = w.gw.handle_datagram(spoofed, &init, now) {
            assert!(matches!(parse(b), Ok(Datagram::CookieReply { .. })));
            assert!(b.len() < init.len(), "no amplification");
            cookie_replies += 1;
        }
    }
    assert_eq!(cookie_replies, 2_000);
    assert_eq!(w.gw.drops().get(&Drop::HandshakeCookie), Some(&2_000));
    assert!(
        !w.gw.drops().keys().any(|d| matches!(d, Drop::Handshake(_))),
        "no initiation reached the responder: {:?}",
        w.gw.drops()
    );
    // The real client: a cookie, then at once a second initiation carrying it.
    w.client_send(1, &init);
    assert_eq!(w.client.state(), State::Birth);
    assert_eq!(w.client.retry_via(), Some(TransportId(1)));
    assert!(
        w.client.handshake_timed_out(w.now),
        "the retry is due at once"
    );
    let retry = w
        .client
        .connect(TransportId(1), now)
        .expect("connect")
        .bytes
        .to_vec();
    w.client_send(1, &retry);
    assert_eq!(w.client.state(), State::Attached);
    // A cookie reply not for our initiation, or forged, is ignored.
    let mut w2 = World::new(Policy::default());
    w2.gw.set_backlog(true);
    let now = w2.now;
    let first = w2
        .client
        .connect(TransportId(1), now)
        .expect("connect")
        .bytes
        .to_vec();
    let Received::Reply(reply) = w2.gw.handle_datagram(endpoint(1), &first, now) else {
        panic!("no cookie reply");
    };
    let mut forged = reply.to_vec();
    forged[30] ^= 1;
    assert_eq!(
        w2.client.handle_datagram(TransportId(1), &forged, now),
        ClientReceived::Dropped(jvpn_core::client::ClientDrop::Unauthenticated)
    );
    let mut other = reply.to_vec();
    other[4] ^= 1;
    assert_eq!(
        w2.client.handle_datagram(TransportId(1), &other, now),
        ClientReceived::Dropped(jvpn_core::client::ClientDrop::NotOurs)
    );
    assert_eq!(w2.client.retry_via(), None);
}

#[test]
fn a_reattach_inside_the_cooldown_is_policy_denied() {
    let mut w = World::new(Policy::default());
    let key = w.client_key.clone();
    let mut raw = RawClient::connect(&mut w, &key, 1);
    let first = raw.reattach(w.now, UNIX_T0, raw.binding_version, 2);
    assert_eq!(
        reattach_with_challenge(&mut w, &mut raw, &first, 2, 2).0,
        Some(ReasonCode::ReattachSuccess)
    );
    let bound = w.gw.session(raw.session).expect("session").bound_at();
    w.now += ms(500);
    let second = raw.reattach(w.now, UNIX_T0 + 500, bound, 1);
    assert_eq!(
        denial_of(&mut w, &raw, &second, 1),
        (Some(ReasonCode::PolicyDenied), Some(endpoint(2)))
    );
}

#[test]
fn unauthorized_clients_and_replayed_initiations_are_refused() {
    let mut w = World::new(Policy::default());
    let stranger = Keypair::generate().expect("keys");
    let payload = InitPayload {
        timestamp: Timestamp { secs: 1, nanos: 0 },
        transport_id: TransportId(1),
        protocol: Protocol::Udp,
        ciphers: CipherSet::ALL,
    };
    let (_, msg1) = Initiation::start(
        &stranger,
        &w.gw.public_key(),
        HANDSHAKE_PROLOGUE,
        &payload.encode(),
    )
    .expect("start");
    let mut packet = Vec::new();
    encode_initiation(
        1,
        &msg1,
        &MacKey::for_gateway(&w.gw.public_key()),
        None,
        &mut packet,
    );
    let now = w.now;
    assert_eq!(
        w.gw.handle_datagram(endpoint(1), &packet, now),
        Received::Dropped(Drop::Handshake(ReasonCode::UnauthorizedClient))
    );
    // A captured initiation from the real client, replayed: its timestamp is not newer.
    let init = w
        .client
        .connect(TransportId(1), now)
        .expect("connect")
        .bytes
        .to_vec();
    w.client_send(1, &init);
    let id = w.session();
    assert_eq!(
        w.gw.handle_datagram(endpoint(2), &init, now),
        Received::Dropped(Drop::Handshake(ReasonCode::ReplayDetected))
    );
    assert_eq!(
        w.gw.session_ids(),
        [id],
        "a refused handshake changed the sessions"
    );
}

#[test]
fn rekey_under_reordered_traffic_loses_and_duplicates_nothing() {
    let policy = policy_with(|c| c.security.rekey_after_packets = Some(64));
    let mut w = World::connected(policy);
    // Data in both directions is delivered in blocks of four, each block reversed, so
    // packets sealed under old keys keep arriving after the new keys took over.
    let mut to_gw: Vec<Vec<u8>> = Vec::new();
    let mut to_client: Vec<Vec<u8>> = Vec::new();
    for n in 0..2_000u32 {
        let now = w.now;
        let t = w
            .client
            .send_data(&ip_packet(TUNNEL, REMOTE, n), now)
            .expect("send");
        to_gw.push(t.bytes.to_vec());
        let (_, bytes) =
            w.gw.handle_tunnel_packet(&ip_packet(REMOTE, TUNNEL, n), now)
                .expect("route");
        to_client.push(bytes.to_vec());
        if to_gw.len() == 4 {
            for b in to_gw.drain(..).rev() {
                if let Received::ToTunnel(p) = w.gw.handle_datagram(endpoint(1), &b, now) {
                    w.to_gw_tunnel.push(p.to_vec());
                }
            }
            for b in to_client.drain(..).rev() {
                if let ClientReceived::ToTunnel(p) =
                    w.client.handle_datagram(TransportId(1), &b, now)
                {
                    w.to_client_tunnel.push(p.to_vec());
                }
            }
        }
        if n % 10 == 0 {
            w.now += ms(1);
            let now = w.now;
            w.client.handle_timeout(now);
            w.gw.handle_timeout(now);
            w.pump();
        }
    }
    w.drain();
    let mut to_gw: Vec<u32> = w.to_gw_tunnel.iter().map(|p| payload_of(p)).collect();
    let mut to_client: Vec<u32> = w.to_client_tunnel.iter().map(|p| payload_of(p)).collect();
    to_gw.sort_unstable();
    to_client.sort_unstable();
    assert_eq!(
        to_gw,
        (0..2_000).collect::<Vec<_>>(),
        "lost or duplicated towards the gateway"
    );
    assert_eq!(
        to_client,
        (0..2_000).collect::<Vec<_>>(),
        "lost or duplicated towards the client"
    );
    let rotations = w
        .gw_events
        .iter()
        .filter(|(_, e)| matches!(e.body, EventBody::KeyRotated { .. }))
        .count();
    assert!(
        rotations >= 10,
        "only {rotations} rotations for 4000 packets at 64 per key"
    );
    assert_eq!(
        w.client.session_id(),
        w.gw.session_ids().first().copied(),
        "identity changed"
    );
}

#[test]
fn all_paths_cut_ends_the_session_at_the_ttl_on_both_sides() {
    let mut w = World::connected(Policy::default());
    w.run_until_ms(2_000);
    w.up = [false, false];
    w.run_until_ms(30_000);
    assert_eq!(w.client.state(), State::Terminated);
    assert_eq!(w.client.ended(), Some(ReasonCode::TransportTtlExceeded));
    assert!(w.gw.session_ids().is_empty());
    assert!(w.store.is_empty(), "the table kept a terminated session");
    assert_eq!(
        w.gw_transitions().last(),
        Some(&(
            State::Degraded,
            State::Terminated,
            ReasonCode::TransportTtlExceeded
        ))
    );
}

#[test]
fn a_session_whose_table_record_is_gone_still_ends_at_its_ttl() {
    let mut w = World::connected(Policy::default());
    w.run_until_ms(2_000);
    let id = w.session();
    let record = w.store.get(id).expect("record");
    // Another party removed the record: every write of this session is refused now.
    w.store.remove(id, record.state_version).expect("removed");
    w.up = [false, false];
    w.run_until_ms(30_000);
    assert!(
        w.gw.session_ids().is_empty(),
        "a session that cannot write its end lived on"
    );
    assert_eq!(
        w.gw_transitions().last().map(|t| (t.1, t.2)),
        Some((State::Terminated, ReasonCode::TransportTtlExceeded))
    );
    assert!(w.store.is_empty());
}

/// A session moves to another node of the cluster: the second node takes it over
/// from the record the first one exported (its keys sealed under the cluster key) on
/// the client's reattach, with no new handshake: same session id and tunnel addresses,
/// the state machine going on from the record's version, the path validated as for any
/// reattach. It sends above the first node's reservation (no counter is used twice
/// under one key), refuses the client's packets from before the move (no replay), and
/// the first node lets go without ending the session.
#[test]
fn a_session_moves_to_another_node_with_its_keys_and_without_a_handshake() {
    const RESERVED: u64 = 1_000;
    let mut w = World::new(Policy::default());
    let key = {
        use base64::Engine;
        ClusterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([5u8; 32]))
            .expect("cluster key")
    };
    let client_key = w.client_key.clone();
    let mut raw = RawClient::connect(&mut w, &client_key, 1);
    let id = raw.session;
    w.gw.reserve_until(id, RESERVED);
    let mut before = Vec::new();
    for n in 0..3 {
        let mut out = Vec::new();
        raw.channel
            .seal(
                &Control::Data(&ip_packet(TUNNEL, REMOTE, n)),
                w.now,
                &mut out,
            )
            .expect("seal");
        let now = w.now;
        assert!(matches!(
            w.gw.handle_datagram(endpoint(1), &out, now),
            Received::ToTunnel(_)
        ));
        before.push(out);
    }
    let record =
        w.gw.export(id, &key)
            .expect("the session is here")
            .expect("exported");
    assert_eq!(record.send_reserved_until, RESERVED);
    let mut second = Gateway::new(
        w.gw_config(NodeId("gw-2".into())),
        Arc::new(MemoryStore::new(16, 3)),
        WallClock::new(w.t0, UNIX_T0),
    );

    // The client reattaches on path 2, which leads to the second node.
    w.now += ms(500);
    let now = w.now;
    let request = raw.reattach(now, UNIX_T0 + 500, raw.binding_version, 2);
    // Not before the request is the client's: a forged one changes nothing.
    let mut forged = request.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let limit = RESERVED + COUNTER_BLOCK;
    assert!(second
        .adopt(&record, &key, endpoint(2), &forged, limit, now)
        .is_err());
    assert!(second.session(id).is_none());
    let challenge = second
        .adopt(&record, &key, endpoint(2), &request, limit, now)
        .expect("takeover")
        .to_vec();
    assert!(w.gw.hand_over(id), "the first node lets go");
    let counter = header_of(&challenge).counter;
    assert!(counter >= RESERVED, "counter {counter}");
    let response = raw.answer_challenge(&challenge, now);
    let _ = second.handle_datagram(endpoint(2), &response, now);
    let events = second.drain_events();
    let moved = second.session(id).expect("the second node has it");
    assert_eq!(moved.binding(), Some(endpoint(2)));
    assert_eq!(moved.state(), State::Attached);
    assert_eq!(moved.tunnel(), w.config.clients[0].tunnel);
    assert!(
        moved.version().0 > record.state_version,
        "the state machine went on"
    );
    let moves = transitions(events.iter().map(|(_, e)| e));
    assert_eq!(
        moves.last(),
        Some(&(
            State::Recovering,
            State::Attached,
            ReasonCode::ReattachSuccess
        )),
        "{moves:?}"
    );
    assert!(events
        .iter()
        .any(|(_, e)| matches!(e.body, EventBody::TransportSwitch { explicit: true, .. })));
    w.drain();
    let ended = |events: &[(SessionId, SessionEvent)]| {
        events
            .iter()
            .any(|(_, e)| matches!(e.body, EventBody::SessionTerminated { .. }))
    };
    assert!(!ended(&w.gw_events) && !ended(&events), "nobody ended it");

    // Traffic both ways through the second node; the first routes nothing of it.
    let mut out = Vec::new();
    raw.channel
        .seal(
            &Control::Data(&ip_packet(TUNNEL, REMOTE, 77)),
            now,
            &mut out,
        )
        .expect("seal");
    let Received::ToTunnel(p) = second.handle_datagram(endpoint(2), &out, now) else {
        panic!("not delivered");
    };
    assert_eq!(payload_of(p), 77);
    let (to, bytes) = second
        .handle_tunnel_packet(&ip_packet(REMOTE, TUNNEL, 78), now)
        .expect("routed by the second node");
    assert_eq!(to, endpoint(2));
    let mut bytes = bytes.to_vec();
    let Ok(Datagram::Session { header, .. }) = parse(&bytes) else {
        panic!("a session packet");
    };
    assert!(header.counter > RESERVED, "counter {}", header.counter);
    raw.channel
        .open_in_place(&header, &mut bytes, now)
        .expect("the client opens it");
    assert_eq!(payload_of(plaintext(&bytes)), 78);
    assert_eq!(
        w.gw.handle_tunnel_packet(&ip_packet(REMOTE, TUNNEL, 79), now)
            .map(|(e, _)| e),
        Err(Drop::NoRoute)
    );

    // Packets the client sent before the move, replayed to the second node: refused.
    for old in &before {
        assert!(matches!(
            second.handle_datagram(endpoint(2), old, now),
            Received::Dropped(Drop::Replay)
        ));
    }
    // A record opened under another cluster key, or taken over twice: refused.
    let other = {
        use base64::Engine;
        ClusterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([6u8; 32]))
            .expect("cluster key")
    };
    let mut third = Gateway::new(
        w.gw_config(NodeId("gw-3".into())),
        Arc::new(MemoryStore::new(16, 3)),
        WallClock::new(w.t0, UNIX_T0),
    );
    assert!(third
        .adopt(&record, &other, endpoint(2), &request, limit, now)
        .is_err());
    assert!(third.session(id).is_none());
    assert!(second
        .adopt(&record, &key, endpoint(2), &request, limit, now)
        .is_err());
    // The same request replayed to a third node: refused (its counter is at or below
    // what the record says the owner accepted, once the owner wrote it), and no
    // session is left behind there.
    let after = second.export(id, &key).expect("here").expect("record");
    assert!(third
        .adopt(
            &after,
            &key,
            endpoint(2),
            &request,
            after.send_reserved_until + COUNTER_BLOCK,
            now
        )
        .is_err());
    assert!(third.session(id).is_none());
}

fn cluster_key(byte: u8) -> ClusterKey {
    use base64::Engine;
    ClusterKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32]))
        .expect("cluster key")
}

fn open_secrets(record: &ClusterRecord, key: &ClusterKey) -> SessionSecrets {
    use base64::Engine;
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(&record.sealed_keys)
        .expect("base64");
    SessionSecrets::open(key, record.session_id, &sealed).expect("open")
}

/// The whole move, driven by the client: its probes of path 2 are answered by the
/// second node as a standby (without the session's counters), so when path 1 dies it
/// jumps there; the second node takes the session over on the reattach, the first lets
/// go, and traffic goes on — same session, no handshake, nothing ended.
#[test]
fn a_client_moves_its_session_to_another_node_when_its_path_dies() {
    let (mut w, id) = World::two_nodes_connected();
    let tunnel = w.client.tunnel();
    w.run_until_ms(5_000);
    let sent = w.second.as_ref().map_or(0, |n| n.standby_acks);
    assert!(sent > 0, "the standby answered no probe");
    assert!(
        w.standby_accepted > 0,
        "the client accepted no standby answer"
    );
    assert_eq!(w.client.state(), State::Attached);

    w.up[0] = false;
    w.run_until_ms(20_000);
    assert_eq!(w.session(), id, "same session");
    assert_eq!(w.client.tunnel(), tunnel);
    assert_eq!(
        w.client.state(),
        State::Attached,
        "{:?}",
        w.client_transitions()
    );
    assert!(w.gw.session(id).is_none(), "the first node let go");
    let node = w.second.as_ref().expect("second node");
    let moved = node.gw.session(id).expect("the second node has it");
    assert_eq!(moved.binding(), Some(endpoint(2)));
    assert!(moved.next_send_counter() > 1_000);
    let ended = |events: &[(SessionId, SessionEvent)]| {
        events
            .iter()
            .any(|(_, e)| matches!(e.body, EventBody::SessionTerminated { .. }))
    };
    assert!(!ended(&w.gw_events) && !ended(&node.events));
    let now = w.now;
    let t = w
        .client
        .send_data(&ip_packet(TUNNEL, REMOTE, 99), now)
        .expect("send");
    assert_eq!(t.via, TransportId(2));
    let bytes = t.bytes.to_vec();
    let delivered = w.to_gw_tunnel.len();
    w.client_send(2, &bytes);
    assert_eq!(w.to_gw_tunnel.len(), delivered + 1);
    assert_eq!(payload_of(w.to_gw_tunnel.last().expect("packet")), 99);
}

/// A standby's probe answer proves the path it answers on, once, and nothing more: a
/// genuine one is accepted once; altered, replayed, sent on another transport, or
/// sealed under other keys, it is refused.
#[test]
fn a_standby_answer_is_authenticated_and_fits_one_probe() {
    let (mut w, id) = World::two_nodes_connected();
    // Capture the standby's answers instead of delivering them.
    w.up[1] = false;
    let key = cluster_key(5);
    let record = w.gw.export(id, &key).expect("here").expect("record");
    let secrets = open_secrets(&record, &key);
    // What the standby would answer to each probe the client sends on path 2.
    w.sent.clear();
    w.run_until_ms(3_000);
    let answers: Vec<Vec<u8>> = std::mem::take(&mut w.sent)
        .into_iter()
        .filter(|(via, _)| *via == 2)
        .filter_map(|(_, bytes)| {
            let header = header_of(&bytes);
            let (mut probe, mut out) = (bytes, Vec::new());
            standby_probe_ack(&secrets, &header, &mut probe, &mut out).map(|()| out)
        })
        .collect();
    let latest = answers.last().expect("a probe on path 2").clone();
    // Altered: refused.
    let mut altered = latest.clone();
    let at = altered.len() - 3;
    altered[at] ^= 1;
    assert!(!client_accepts(&mut w, 2, &altered));
    // On another transport: refused.
    assert!(!client_accepts(&mut w, 1, &latest));
    // Genuine, on its transport: accepted once; replayed: refused.
    assert!(client_accepts(&mut w, 2, &latest));
    assert!(!client_accepts(&mut w, 2, &latest));
    // An older answer (for an earlier probe): refused.
    if answers.len() > 1 {
        assert!(!client_accepts(&mut w, 2, &answers[0]));
    }
    // Under other keys: refused.
    let mut other = World::connected(Policy::default());
    other.gw.reserve_until(other.session(), 1_000);
    let foreign = other
        .gw
        .export(other.session(), &key)
        .expect("here")
        .expect("record");
    let foreign_secrets = open_secrets(&foreign, &key);
    assert!(foreign_secrets.send[..] != secrets.send[..]);
    let header = header_of(&latest);
    let mut forged = Vec::new();
    let mut probe_like = latest.clone();
    assert!(standby_probe_ack(&foreign_secrets, &header, &mut probe_like, &mut forged).is_none());
}

fn header_of(datagram: &[u8]) -> jvpn_core::wire::SessionHeader {
    match parse(datagram) {
        Ok(Datagram::Session { header, .. }) => header,
        _ => panic!("a session packet"),
    }
}

/// A node never sends beyond its reservation of counters: once it is used up, the
/// session's packets are not sealed (and a node that took the session over starts
/// above it).
#[test]
fn a_node_does_not_send_beyond_its_reservation() {
    let mut w = World::connected(Policy::default());
    let id = w.session();
    let next = w.gw.session(id).expect("session").next_send_counter();
    w.gw.reserve_until(id, next + 2);
    let now = w.now;
    for n in 0..2 {
        assert!(w
            .gw
            .handle_tunnel_packet(&ip_packet(REMOTE, TUNNEL, n), now)
            .is_ok());
    }
    assert_eq!(
        w.gw.handle_tunnel_packet(&ip_packet(REMOTE, TUNNEL, 2), now)
            .map(|(e, _)| e),
        Err(Drop::Unreserved),
        "sealed beyond the reservation"
    );
}

/// A reattach request captured on the way takes the session to no other node: replayed
/// later it is stale, and against the record as it is after the move its counter was
/// accepted and its binding version is old. Nothing is built where it is replayed.
#[test]
fn a_captured_reattach_request_takes_no_session_to_another_node() {
    let (mut w, id) = World::two_nodes_connected();
    w.run_until_ms(5_000);
    let key = cluster_key(5);
    let before = w.gw.export(id, &key).expect("here").expect("record");
    w.up[0] = false;
    w.run_until_ms(20_000);
    assert!(w.gw.session(id).is_none(), "moved to the second node");
    let request = w
        .sent
        .iter()
        .find(|(via, b)| *via == 2 && is_reattach(b))
        .map(|(_, b)| b.clone())
        .expect("the client's request");
    let after = w
        .second
        .as_ref()
        .and_then(|n| n.gw.export(id, &key))
        .expect("there")
        .expect("record");
    let now = w.now;
    let why = |w: &mut World, record: &ClusterRecord| -> String {
        let limit = record.send_reserved_until + COUNTER_BLOCK;
        match w.gw.adopt(record, &key, endpoint(2), &request, limit, now) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a replayed request took the session"),
        }
    };
    // Against the record it was made for, 15 s later: stale.
    assert!(why(&mut w, &before).contains("not fresh"));
    // Against the record after the move: already accepted there.
    assert!(why(&mut w, &after).contains("accepted before"));
    assert!(w.gw.session(id).is_none(), "nothing built by a replay");
}

/// The largest datagram the tunnel makes in these tests (a tunnel MTU of 1 380).
const LARGEST: u16 = 1_416;

#[test]
fn size_probes_find_a_narrow_path_both_ends_keep_it_and_a_path_that_narrows_is_found_again() {
    let mut w = World::new(Policy::default());
    w.client.search_path_mtu(LARGEST);
    // Path 1 carries datagrams of up to 1 300 bytes; path 2 any.
    w.narrow = [Some(1_300), None];
    let mut w = w.attached();
    w.run_until_ms(20_000);
    let room = w.client.path_room(TransportId(1)).expect("a limit found");
    let most = 1_300 - OVERHEAD;
    assert!(room <= most && room + 8 > most, "room {room}");
    let id = w.session();
    let at_gateway = w.gw.session(id).and_then(|s| s.path_room(endpoint(1)));
    assert_eq!(
        at_gateway,
        Some(room),
        "the gateway keeps what the client found"
    );
    // Path 2, found to carry the largest while a standby, narrows to 1 350, and path 1
    // dies: the session jumps to path 2, whose size is confirmed at once, lost, and
    // searched below, and the gateway's limit follows what the client says of path 2
    // (the old path's limit goes with the binding).
    w.narrow[1] = Some(1_350);
    w.up[0] = false;
    w.run_until_ms(60_000);
    assert_eq!(w.gw_binding(), Some(endpoint(2)));
    let room2 = w.client.path_room(TransportId(2)).expect("path 2's limit");
    let most = 1_350 - OVERHEAD;
    assert!(room2 <= most && room2 + 8 > most, "room {room2}");
    let session = w.gw.session(id).expect("session");
    assert_eq!(session.path_room(endpoint(2)), Some(room2));
    assert_eq!(session.path_room(endpoint(1)), None);
}

#[test]
fn a_gateway_that_drops_size_probes_leaves_the_path_without_a_limit_and_is_rarely_asked() {
    let mut w = World::new(Policy::default());
    w.client.search_path_mtu(LARGEST);
    w.drops_size_probes = true;
    let mut w = w.attached();
    w.run_until_ms(120_000);
    assert_eq!(w.client.path_room(TransportId(1)), None);
    assert_eq!(w.client.path_room(TransportId(2)), None);
    assert_eq!(w.client.state(), State::Attached);
    // On each path, the active one and the standby: the largest and the base three times
    // each, then nothing until the raise timer.
    for path in [1, 2] {
        assert_eq!(
            size_probes_sent(&w, path),
            2 * usize::from(jvpn_core::pmtu::TRIES),
            "path {path}"
        );
    }
}

fn size_probes_sent(w: &World, path: u32) -> usize {
    let probe = |b: &[u8]| b.first() == Some(&(PacketType::SizeProbe as u8));
    w.sent
        .iter()
        .filter(|(via, b)| *via == path && probe(b))
        .count()
}

/// Runs `w` in steps of 100 ms until the gateway session `id` is bound to path 2 (at
/// most `limit_ms` of virtual time); the instant it was, in ms since the start.
fn run_until_bound_to_path_2(w: &mut World, from_ms: u64, limit_ms: u64) -> u64 {
    let bound = |w: &World| w.gw_binding() == Some(endpoint(2));
    let mut at = from_ms;
    while !bound(w) {
        assert!(at < limit_ms, "no jump to path 2 by {limit_ms} ms");
        at += 100;
        w.run_until_ms(at);
    }
    at
}

/// A standby path is searched too, at its probes' pace: when the session jumps to it,
/// its size is known, so both ends keep to it from the jump on, instead of losing
/// full-size packets for the ten seconds of a new search.
#[test]
fn a_standby_path_is_searched_before_the_jump_so_both_ends_keep_to_it_at_once() {
    let mut w = World::new(Policy::default());
    w.client.search_path_mtu(LARGEST);
    // Path 1 carries any datagram; path 2, the standby, up to 1 300 bytes.
    w.narrow = [None, Some(1_300)];
    let mut w = w.attached();
    w.run_until_ms(60_000);
    assert_eq!(w.client.path_room(TransportId(1)), None);
    let room = w
        .client
        .path_room(TransportId(2))
        .expect("the standby's limit");
    let most = 1_300 - OVERHEAD;
    assert!(room <= most && room + 8 > most, "room {room}");
    let id = w.session();
    let session = w.gw.session(id).expect("session");
    assert_eq!(session.path_room(endpoint(1)), None);
    assert_eq!(
        session.path_room(endpoint(2)),
        None,
        "the gateway keeps no limit of a path it does not send on"
    );
    // Each of the standby's size probes goes right after one of its standby probes: at
    // most one per standby probe interval.
    let on_2 = |k: usize, t: PacketType| {
        w.sent
            .get(k)
            .is_some_and(|(via, b)| *via == 2 && b.first() == Some(&(t as u8)))
    };
    let paced = (0..w.sent.len())
        .filter(|&k| on_2(k, PacketType::SizeProbe))
        .all(|k| k > 0 && on_2(k - 1, PacketType::Probe));
    assert!(paced, "a standby size probe not paced by a standby probe");
    assert!(size_probes_sent(&w, 2) >= 6, "the standby was searched");

    w.up[0] = false;
    run_until_bound_to_path_2(&mut w, 60_000, 75_000);
    assert_eq!(w.client.path_room(TransportId(2)), Some(room));
    let session = w.gw.session(id).expect("session");
    assert_eq!(
        session.path_room(endpoint(2)),
        Some(room),
        "told to the gateway within 100 ms of the jump"
    );
}

/// A standby node of a cluster answers only standby probes: the size probes of the path
/// that leads to it find nothing, and count as lost there. When the session jumps there,
/// the node owns it, and the path is searched again at once, from the largest: whenever
/// path 1 dies, while that search is under way (with the largest or the base counted
/// lost there: path 1 dying at 9 s failed with the search simply going on) or after it
/// ended without a size.
#[test]
fn a_standby_path_that_answered_no_size_probe_is_searched_again_after_the_jump() {
    for jump_at in (1_000..30_000).step_by(1_000).chain([60_000]) {
        standby_node_searched_again_after_a_jump_at(jump_at);
    }
}

fn standby_node_searched_again_after_a_jump_at(jump_at: u64) {
    let mut w = World::two_nodes(Policy::default());
    w.client.search_path_mtu(LARGEST);
    w.narrow = [None, Some(1_300)];
    let mut w = w.attached();
    let id = w.session();
    w.gw.reserve_until(id, 1_000);
    w.run_until_ms(jump_at);
    assert_eq!(w.client.path_room(TransportId(2)), None, "nothing answered");
    w.up[0] = false;
    w.run_until_ms(jump_at + 30_000);
    let jumped = format!("path 1 died at {jump_at} ms");
    let node = w.second.as_ref().expect("second node");
    let moved = node.gw.session(id).expect("the second node has it");
    assert_eq!(moved.binding(), Some(endpoint(2)), "{jumped}");
    let room = w.client.path_room(TransportId(2));
    let most = 1_300 - OVERHEAD;
    assert!(
        room.is_some_and(|room| room <= most && room + 8 > most),
        "{jumped}: room {room:?}"
    );
    assert_eq!(moved.path_room(endpoint(2)), room, "{jumped}");
}
