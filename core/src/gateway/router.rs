//! The gateway's one router: session id → session, tunnel address → session, the
//! rules for registering and releasing a session, and the answer to a packet of a
//! session that is not live.
//!
//! It is generic over what a route leads to (`H`): the composite [`super::Gateway`]
//! keeps each [`super::GatewaySession`] in it directly; the actor runtime keeps the
//! session's actor address and shares one router between its packet readers. Either
//! way the rules below are the only ones: what the deterministic tests and the fuzzer
//! drive is what ships.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use crate::bucket::TokenBucket;
use crate::crypto::PublicKey;
use crate::event::SessionEvent;
use crate::fsm::TerminationCause;
use crate::ids::SessionId;
use crate::wire::{encode_session_unknown, SessionHeader, TunnelAddrs, SESSION_UNKNOWN_LEN};

use super::{destination_address, Drop, EndedSessions, Endpoint};

/// How a session comes to be registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    /// Created by a handshake: it takes its tunnel address, also from a session of the
    /// same client that it replaces.
    New,
    /// Restarted after its actor stopped unexpectedly: it takes its tunnel address back
    /// only if no other session holds it, so that it never takes the address from a
    /// newer session of its client.
    Restarted,
}

/// One live session's route.
#[derive(Debug)]
pub struct Route<H> {
    /// What the route leads to.
    pub handle: H,
    /// The session's tunnel addresses.
    pub tunnel: TunnelAddrs,
    /// The session's client.
    pub client: PublicKey,
    /// Where the session is bound, as its driver last published it.
    binding: Option<Endpoint>,
    /// The budget of packets for the session from anywhere else.
    off_binding: TokenBucket,
}

/// The budget of packets for a session that come from another endpoint than its
/// binding, before they reach the session. Its client sends such packets only to probe
/// standby paths, to reattach and to answer a path challenge (a few per second); anyone
/// who has seen the session's id can send them by the million. Past the budget they are
/// dropped unread (`off_binding_flood`), so that a flood cannot crowd the session's own
/// traffic out of its mailbox; packets from the binding are never held back.
pub struct OffBindingLimits;

impl OffBindingLimits {
    /// Packets per second from other endpoints, per session...
    pub const PER_SECOND: u32 = 100;
    /// ... with this burst.
    pub const BURST: u32 = 200;
}

/// The answer to a session packet whose session is not live.
#[derive(Debug)]
pub struct Unknown {
    /// Why the packet is dropped.
    pub drop: Drop,
    /// A denial to report, when the packet is a reattach for a session that ended here
    /// (rate limited).
    pub event: Option<SessionEvent>,
    /// The clear-text hint to send back to the sender, unless the hints' rate limits
    /// hold it back ([`HintLimits`]).
    pub reply: Option<[u8; SESSION_UNKNOWN_LEN]>,
}

/// The bounds on session-unknown hints, so that the gateway cannot be used to reflect
/// traffic at an address an attacker writes as the source of its packets. A hint (12
/// bytes) answers only a session packet (at least 36), so it is never larger than what
/// triggered it; and hints are rate limited per source prefix and node-wide.
pub struct HintLimits;

impl HintLimits {
    /// Hints per second to one source prefix (an IPv4 /24, an IPv6 /48)...
    pub const PER_PREFIX_PER_SECOND: u32 = 2;
    /// ... with this burst.
    pub const PER_PREFIX_BURST: u32 = 4;
    /// Hints per second from the whole node...
    pub const PER_SECOND: u32 = 200;
    /// ... with this burst.
    pub const BURST: u32 = 200;
    /// Prefix buckets kept (a fixed table: prefixes that share a bucket share its
    /// budget, which only makes the bound stricter).
    pub const PREFIX_BUCKETS: usize = 1_024;
}

/// Token buckets per source prefix, in a fixed table (prefixes that share a bucket share
/// its budget, which only makes a bound stricter): bounded memory whatever the sources.
#[derive(Debug)]
pub(super) struct SourceBuckets {
    buckets: Box<[TokenBucket]>,
    /// Bytes of an IPv4 and of an IPv6 address that make the prefix.
    prefix: (usize, usize),
    /// A random key of the bucket hash, so that nobody can pick addresses that share a
    /// known client's bucket.
    seed: u32,
}

impl SourceBuckets {
    pub(super) fn new(prefix: (usize, usize)) -> Self {
        Self::with_buckets(prefix, HintLimits::PREFIX_BUCKETS)
    }

    /// A table of `count` buckets (at least one).
    pub(super) fn with_buckets(prefix: (usize, usize), count: usize) -> Self {
        SourceBuckets {
            buckets: vec![TokenBucket::default(); count.max(1)].into_boxed_slice(),
            prefix,
            seed: getrandom::u32().unwrap_or(0),
        }
    }

    pub(super) fn take(
        &mut self,
        source: IpAddr,
        now: Instant,
        per_second: u32,
        burst: u32,
    ) -> bool {
        let i = self.bucket(source);
        self.buckets[i].take(now, per_second, burst)
    }

    /// The bucket of `source`'s prefix (FNV-1a over the family and the prefix bytes).
    fn bucket(&self, source: IpAddr) -> usize {
        let (family, octets, len) = match source {
            IpAddr::V4(a) => (4u8, a.to_ipv6_mapped().octets(), self.prefix.0),
            IpAddr::V6(a) => (6u8, a.octets(), self.prefix.1),
        };
        let prefix = match family {
            4 => &octets[12..12 + len.min(4)],
            _ => &octets[..len.min(16)],
        };
        let mut hash: u32 = 0x811c_9dc5 ^ self.seed;
        for b in std::iter::once(&family).chain(prefix) {
            hash = (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
        hash as usize % self.buckets.len()
    }
}

/// The hints' budgets: one node-wide, one per source prefix (IPv4 /24, IPv6 /48).
#[derive(Debug)]
struct HintBudget {
    node: TokenBucket,
    prefixes: SourceBuckets,
}

impl Default for HintBudget {
    fn default() -> Self {
        HintBudget {
            node: TokenBucket::default(),
            prefixes: SourceBuckets::new((3, 6)),
        }
    }
}

impl HintBudget {
    fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        let prefix_ok = self.prefixes.take(
            source,
            now,
            HintLimits::PER_PREFIX_PER_SECOND,
            HintLimits::PER_PREFIX_BURST,
        );
        prefix_ok
            && self
                .node
                .take(now, HintLimits::PER_SECOND, HintLimits::BURST)
    }
}

/// The budget of handshake initiations per source address (IPv4 /32, IPv6 /64), taken
/// before any Diffie-Hellman: a client sends one every 5 s while it connects.
pub struct HandshakeLimits;

impl HandshakeLimits {
    /// Initiations per second from one source address...
    pub const PER_SECOND: u32 = 20;
    /// ... with this burst.
    pub const BURST: u32 = 20;
}

/// The routing tables of one gateway node.
#[derive(Debug)]
pub struct Router<H> {
    sessions: HashMap<SessionId, Route<H>>,
    by_tunnel: HashMap<IpAddr, SessionId>,
    ended: EndedSessions,
    hints: HintBudget,
}

impl<H> Default for Router<H> {
    fn default() -> Self {
        Router {
            sessions: HashMap::new(),
            by_tunnel: HashMap::new(),
            ended: EndedSessions::default(),
            hints: HintBudget::default(),
        }
    }
}

impl<H> Router<H> {
    /// Registers session `id` (see [`Registration`] for who gets each tunnel address).
    pub fn register(
        &mut self,
        id: SessionId,
        tunnel: TunnelAddrs,
        client: PublicKey,
        handle: H,
        how: Registration,
    ) {
        for a in tunnel.iter() {
            let held_by_other = self
                .by_tunnel
                .get(&a.addr)
                .is_some_and(|owner| *owner != id);
            if how == Registration::New || !held_by_other {
                self.by_tunnel.insert(a.addr, id);
            }
        }
        self.sessions.insert(
            id,
            Route {
                handle,
                tunnel,
                client,
                binding: None,
                off_binding: TokenBucket::default(),
            },
        );
    }

    /// Removes session `id`'s route, remembering why it ended (so that a late reattach
    /// is refused for that reason); each of its tunnel addresses is freed unless a newer
    /// session of the same client holds it already. Returns the route.
    pub fn unregister(
        &mut self,
        id: SessionId,
        cause: Option<TerminationCause>,
    ) -> Option<Route<H>> {
        let route = self.sessions.remove(&id)?;
        for a in route.tunnel.iter() {
            if self.by_tunnel.get(&a.addr) == Some(&id) {
                self.by_tunnel.remove(&a.addr);
            }
        }
        self.ended.remember(id, cause);
        Some(route)
    }

    /// Removes session `id`, which goes on at another node (spec/cluster.md): unlike
    /// [`Router::unregister`], nothing of it is remembered, so that its packets are not
    /// answered as those of an ended session.
    pub fn forget(&mut self, id: SessionId) -> Option<Route<H>> {
        let route = self.sessions.remove(&id)?;
        for a in route.tunnel.iter() {
            if self.by_tunnel.get(&a.addr) == Some(&id) {
                self.by_tunnel.remove(&a.addr);
            }
        }
        Some(route)
    }

    /// The route of session `id`.
    pub fn get(&self, id: SessionId) -> Option<&H> {
        self.sessions.get(&id).map(|r| &r.handle)
    }

    /// The route of session `id`, to drive it.
    pub fn get_mut(&mut self, id: SessionId) -> Option<&mut H> {
        self.sessions.get_mut(&id).map(|r| &mut r.handle)
    }

    /// Whether session `id` is live.
    pub fn contains(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// Publishes session `id`'s binding (its driver calls this whenever it changed).
    pub fn set_binding(&mut self, id: SessionId, binding: Option<Endpoint>) {
        if let Some(route) = self.sessions.get_mut(&id) {
            route.binding = binding;
        }
    }

    /// Whether a packet for session `id` from `from` comes from its published binding;
    /// `None` if the session is not live (one lookup, for the packet path).
    pub fn from_binding(&self, id: SessionId, from: Endpoint) -> Option<bool> {
        self.sessions.get(&id).map(|r| r.binding == Some(from))
    }

    /// Whether a packet for session `id` from another endpoint than its binding may go
    /// on to the session, within [`OffBindingLimits`].
    pub fn admit_off_binding(&mut self, id: SessionId, now: Instant) -> bool {
        self.sessions.get_mut(&id).is_some_and(|r| {
            r.off_binding
                .take(now, OffBindingLimits::PER_SECOND, OffBindingLimits::BURST)
        })
    }

    /// The session owning tunnel address `addr`.
    pub fn by_tunnel(&self, addr: IpAddr) -> Option<(SessionId, &H)> {
        let id = *self.by_tunnel.get(&addr)?;
        self.sessions.get(&id).map(|r| (id, &r.handle))
    }

    /// The session an IP packet read from the tunnel device goes to: the owner of its
    /// destination address.
    pub fn route_tunnel_packet(&self, packet: &[u8]) -> Result<(SessionId, &H), Drop> {
        let dst = destination_address(packet).ok_or(Drop::Malformed)?;
        self.by_tunnel(dst).ok_or(Drop::NoRoute)
    }

    /// Every live session's id and route.
    pub fn iter(&self) -> impl Iterator<Item = (SessionId, &H)> {
        self.sessions.iter().map(|(id, r)| (*id, &r.handle))
    }

    /// Every live session's id and route, to drive them.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (SessionId, &mut H)> {
        self.sessions.iter_mut().map(|(id, r)| (*id, &mut r.handle))
    }

    /// Every live session's id.
    pub fn ids(&self) -> Vec<SessionId> {
        self.sessions.keys().copied().collect()
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Judges a session packet whose session is not live: it is dropped (counted by the
    /// caller), a reattach for a session that ended here is reported as denied for the
    /// reason it ended, and the sender is told the session is unknown, within the
    /// hints' rate limits ([`HintLimits`]).
    pub fn unknown(&mut self, header: &SessionHeader, from: Endpoint, now: Instant) -> Unknown {
        let (drop, event) = self.ended.judge(header, from, now);
        let reply = self
            .hints
            .allow(from.addr.ip(), now)
            .then(|| encode_session_unknown(header.session_id));
        Unknown { drop, event, reply }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Protocol;
    use crate::wire::PacketType;
    use std::net::SocketAddr;
    use std::time::Duration;

    fn header() -> SessionHeader {
        SessionHeader {
            ptype: PacketType::Data,
            key_epoch: 0,
            session_id: SessionId(0xdead),
            counter: 1,
        }
    }

    fn from(ip: [u8; 4]) -> Endpoint {
        Endpoint {
            protocol: Protocol::Udp,
            addr: SocketAddr::from((ip, 4000)),
        }
    }

    /// A flood of unknown-session packets written with a bystander's address as their
    /// source: the bystander gets the burst, then the per-prefix rate, whatever the
    /// flood's size; after a quiet second it gets hints again.
    #[test]
    fn hints_to_one_spoofed_source_stay_within_the_prefix_bound() {
        let mut router: Router<()> = Router::default();
        let t0 = Instant::now();
        let mut replies = 0;
        for i in 0..100_000u32 {
            // 100 000 packets over one second, all "from" the same /24.
            let now = t0 + Duration::from_micros(u64::from(i) * 10);
            let victim = from([10, 9, 8, (i % 200) as u8]);
            replies += u32::from(router.unknown(&header(), victim, now).reply.is_some());
        }
        let bound = HintLimits::PER_PREFIX_BURST + HintLimits::PER_PREFIX_PER_SECOND;
        assert!(
            replies <= bound,
            "{replies} hints in one second, bound {bound}"
        );
        assert!(
            replies >= HintLimits::PER_PREFIX_BURST,
            "the burst is answered"
        );
        let later = t0 + Duration::from_secs(3);
        assert!(router
            .unknown(&header(), from([10, 9, 8, 1]), later)
            .reply
            .is_some());
    }

    /// Spread over many prefixes, the hints stay within the node-wide bound.
    #[test]
    fn hints_from_the_whole_node_stay_within_the_node_bound() {
        let mut router: Router<()> = Router::default();
        let t0 = Instant::now();
        let mut replies = 0;
        for i in 0..100_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 10);
            let source = from([10, (i >> 8) as u8, i as u8, 1]);
            replies += u32::from(router.unknown(&header(), source, now).reply.is_some());
        }
        let bound = HintLimits::BURST + HintLimits::PER_SECOND;
        assert!(
            replies <= bound,
            "{replies} hints in one second, bound {bound}"
        );
        assert!(
            replies >= HintLimits::BURST / 2,
            "most of the burst is answered"
        );
    }

    /// Packets from the binding always pass; from anywhere else, the burst and then the
    /// rate; a new binding is published and then passes.
    #[test]
    fn off_binding_packets_have_a_budget_and_the_binding_none() {
        let mut router: Router<()> = Router::default();
        let id = SessionId(7);
        let key = crate::crypto::PublicKey([1; 32]);
        router.register(id, tunnel(&["10.77.0.2"]), key, (), Registration::New);
        let bound = from([10, 201, 1, 2]);
        router.set_binding(id, Some(bound));
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| router.from_binding(id, bound) == Some(true)));
        let admitted = (0..10_000u32)
            .filter(|i| router.admit_off_binding(id, t0 + Duration::from_micros(u64::from(*i))))
            .count() as u32;
        assert_eq!(
            admitted,
            OffBindingLimits::BURST,
            "the burst, then nothing within 10 ms"
        );
        let later = t0 + Duration::from_secs(1);
        assert!(router.admit_off_binding(id, later), "the rate refills");
        let attacker = from([10, 201, 2, 99]);
        assert_eq!(router.from_binding(id, attacker), Some(false));
        router.set_binding(id, Some(attacker));
        assert_eq!(router.from_binding(id, attacker), Some(true));
        assert!(
            !router.admit_off_binding(SessionId(8), later),
            "no such session"
        );
    }

    fn tunnel(addrs: &[&str]) -> TunnelAddrs {
        TunnelAddrs::new(addrs.iter().map(|a| {
            let addr: IpAddr = a.parse().expect("address");
            crate::wire::TunnelAddr {
                addr,
                prefix: if addr.is_ipv4() { 24 } else { 64 },
            }
        }))
        .expect("tunnel addresses")
    }

    /// A minimal IP header (of `dst`'s family) whose destination is `dst`.
    fn packet_to(dst: &str) -> Vec<u8> {
        match dst.parse::<IpAddr>().expect("address") {
            IpAddr::V4(a) => {
                let mut p = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1];
                p.extend(a.octets());
                p
            }
            IpAddr::V6(a) => {
                let mut p = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
                p.extend([0; 16]);
                p.extend(a.octets());
                p
            }
        }
    }

    /// A dual-stack session is routed by either address; the session that replaces it
    /// takes both; the old one's release frees neither, and a restarted old session
    /// takes neither back.
    #[test]
    fn a_dual_stack_session_owns_both_addresses_and_hands_both_over() {
        let mut router: Router<&str> = Router::default();
        let key = crate::crypto::PublicKey([1; 32]);
        let both = tunnel(&["10.77.0.2", "fd77::2"]);
        let (old, new) = (SessionId(1), SessionId(2));
        router.register(old, both, key, "old", Registration::New);
        for dst in ["10.77.0.2", "fd77::2"] {
            assert_eq!(
                router.route_tunnel_packet(&packet_to(dst)),
                Ok((old, &"old"))
            );
        }
        assert_eq!(
            router.route_tunnel_packet(&packet_to("fd77::3")),
            Err(Drop::NoRoute)
        );
        router.register(new, both, key, "new", Registration::New);
        router.unregister(old, None);
        router.register(old, both, key, "old", Registration::Restarted);
        for dst in ["10.77.0.2", "fd77::2"] {
            assert_eq!(
                router.route_tunnel_packet(&packet_to(dst)),
                Ok((new, &"new"))
            );
        }
        router.unregister(new, None);
        router.unregister(old, None);
        assert_eq!(
            router.route_tunnel_packet(&packet_to("fd77::2")),
            Err(Drop::NoRoute)
        );
    }
}
