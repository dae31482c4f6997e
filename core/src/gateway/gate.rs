//! The gate every handshake initiation passes before any Diffie-Hellman: mac1, then,
//! when the gateway is under load, a cookie proving the source address (mac2), then the
//! source's budget. See [`crate::mac`] for the MACs and spec/wire-format.md for the
//! bounds.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::crypto::PublicKey;
use crate::mac::{cookie_of, verify_cookie_mac, CookieKey, MacKey};
use crate::wire::{encode_cookie_reply, InitMacs, COOKIE_NONCE_LEN, COOKIE_REPLY_LEN};

use super::router::{HandshakeLimits, SourceBuckets};
use super::Drop;

/// How often the cookie secret changes; a cookie is good for two periods at most
/// (the current secret and the one before), as WireGuard's two minutes.
pub const COOKIE_ROTATION: Duration = Duration::from_secs(120);

/// How long the gate stays under load after the last backlog it was told of (as
/// WireGuard's one second): a flood that lets the queue drain now and then must not get
/// a Diffie-Hellman each time it does.
pub const UNDER_LOAD_FOR: Duration = Duration::from_secs(1);

/// What becomes of an initiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// On to the responder (the Diffie-Hellman).
    Admit,
    /// Answer with this cookie reply instead (under load, no valid mac2).
    Cookie([u8; COOKIE_REPLY_LEN]),
    /// Dropped, for this reason.
    Refuse(Drop),
}

/// The gate of one gateway node.
pub struct HandshakeGate {
    mac_key: MacKey,
    cookie_key: CookieKey,
    secret: [u8; 32],
    previous: Option<[u8; 32]>,
    rotated_at: Option<Instant>,
    /// Under load until then.
    under_load_until: Option<Instant>,
    /// Cookie reply nonces: a random prefix, drawn again whenever the counter wraps,
    /// and a counter — unique without a system call per reply (the key is the same
    /// across restarts, so a counter alone would repeat).
    nonce_prefix: Option<[u8; 8]>,
    nonce_counter: u32,
    /// Diffie-Hellmans per source (under load, proven sources only).
    handshakes: SourceBuckets,
    /// Cookie replies per source: each costs a hash, a seal and a send on the thread
    /// that reads the socket, and a flood of them would crowd out the sessions' packets.
    /// The table is large ([`COOKIE_BUCKETS`]) so that a flood from random spoofed
    /// sources leaves nearly every bucket — and so a real client's — with tokens.
    cookies: SourceBuckets,
}

/// Buckets of the cookie replies' budget: a flood must exceed a million spoofed packets
/// a second to empty them all (20 tokens a second each).
pub const COOKIE_BUCKETS: usize = 65_536;

impl std::fmt::Debug for HandshakeGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeGate").finish_non_exhaustive()
    }
}

impl HandshakeGate {
    /// The gate of the gateway whose static public key is `gateway`.
    pub fn new(gateway: &PublicKey) -> Self {
        HandshakeGate {
            mac_key: MacKey::for_gateway(gateway),
            cookie_key: CookieKey::for_gateway(gateway),
            secret: [0; 32],
            previous: None,
            rotated_at: None,
            under_load_until: None,
            nonce_prefix: None,
            nonce_counter: 0,
            handshakes: SourceBuckets::new((4, 8)),
            cookies: SourceBuckets::with_buckets((4, 8), COOKIE_BUCKETS),
        }
    }

    /// The key of the initiations' mac1.
    pub fn mac_key(&self) -> &MacKey {
        &self.mac_key
    }

    /// Judges an initiation from `from` whose sender index and MACs are given.
    /// `backlog`: the runtime's handshake work is backing up (its queue past a
    /// threshold); from then until [`UNDER_LOAD_FOR`] after the last backlog, only
    /// proven source addresses get a Diffie-Hellman.
    pub fn judge(
        &mut self,
        from: SocketAddr,
        sender_index: u32,
        macs: &InitMacs<'_>,
        backlog: bool,
        now: Instant,
    ) -> Verdict {
        if !self.mac_key.verify(macs.mac1_covered, macs.mac1) {
            return Verdict::Refuse(Drop::HandshakeMac);
        }
        if backlog {
            self.under_load_until = Some(now + UNDER_LOAD_FOR);
        }
        let under_load = self.under_load_until.is_some_and(|until| now < until);
        let (per_second, burst) = (HandshakeLimits::PER_SECOND, HandshakeLimits::BURST);
        if under_load && !self.proven(from, macs, now) {
            // No secret yet (the OS's random source failed): no cookie can be trusted.
            if self.rotated_at.is_none() || !self.cookies.take(from.ip(), now, per_second, burst) {
                return Verdict::Refuse(Drop::HandshakeRate);
            }
            let Some(nonce) = self.next_nonce() else {
                return Verdict::Refuse(Drop::HandshakeRate);
            };
            let cookie = cookie_of(&self.secret, from);
            let sealed = self.cookie_key.seal(&cookie, macs.mac1, nonce);
            return Verdict::Cookie(encode_cookie_reply(sender_index, nonce, &sealed));
        }
        if !self.handshakes.take(from.ip(), now, per_second, burst) {
            return Verdict::Refuse(Drop::HandshakeRate);
        }
        Verdict::Admit
    }

    /// The next cookie reply nonce; `None` without the OS's random source.
    fn next_nonce(&mut self) -> Option<[u8; COOKIE_NONCE_LEN]> {
        if self.nonce_prefix.is_none() || self.nonce_counter == u32::MAX {
            let mut prefix = [0u8; 8];
            getrandom::fill(&mut prefix).ok()?;
            self.nonce_prefix = Some(prefix);
            self.nonce_counter = 0;
        }
        let prefix = self.nonce_prefix?;
        self.nonce_counter += 1;
        let mut nonce = [0u8; COOKIE_NONCE_LEN];
        nonce[..8].copy_from_slice(&prefix);
        nonce[8..].copy_from_slice(&self.nonce_counter.to_be_bytes());
        Some(nonce)
    }

    /// Whether the initiation's mac2 is keyed by a cookie of the current or the previous
    /// secret for `from`.
    fn proven(&mut self, from: SocketAddr, macs: &InitMacs<'_>, now: Instant) -> bool {
        self.rotate(now);
        let current = std::iter::once(&self.secret);
        current
            .chain(self.previous.as_ref())
            .any(|secret| verify_cookie_mac(&cookie_of(secret, from), macs.mac2_covered, macs.mac2))
    }

    /// A new secret every [`COOKIE_ROTATION`] (the first one on first use). Without the
    /// OS's random source the old secret stays: cookies then live longer, nothing breaks.
    fn rotate(&mut self, now: Instant) {
        let due = self
            .rotated_at
            .is_none_or(|at| now.saturating_duration_since(at) >= COOKIE_ROTATION);
        if !due {
            return;
        }
        let mut fresh = [0u8; 32];
        if getrandom::fill(&mut fresh).is_ok() {
            // The old secret stays good for one more period only if it was in use up to
            // now (the gate rotates only when under load, so it may be much older).
            let recent = self
                .rotated_at
                .is_some_and(|at| now.saturating_duration_since(at) < 2 * COOKIE_ROTATION);
            self.previous = recent.then_some(self.secret);
            self.secret = fresh;
            self.rotated_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mac::Cookie;
    use crate::wire::{encode_initiation, parse, Datagram, NOISE_INIT_LEN};

    fn initiation(gw: &PublicKey, index: u32, cookie: Option<&Cookie>) -> Vec<u8> {
        let mut out = Vec::new();
        encode_initiation(
            index,
            &[7; NOISE_INIT_LEN],
            &MacKey::for_gateway(gw),
            cookie,
            &mut out,
        );
        out
    }

    fn judge(
        gate: &mut HandshakeGate,
        from: SocketAddr,
        bytes: &[u8],
        load: bool,
        now: Instant,
    ) -> Verdict {
        let Ok(Datagram::HandshakeInit {
            sender_index, macs, ..
        }) = parse(bytes)
        else {
            panic!("not an initiation");
        };
        gate.judge(from, sender_index, &macs, load, now)
    }

    /// Without load every right initiation passes; under load only one carrying the
    /// cookie its source got, which another source cannot use, and which outlives one
    /// rotation but not two.
    #[test]
    fn under_load_only_a_source_with_its_cookie_gets_a_diffie_hellman() {
        let gw = PublicKey([5; 32]);
        let mut gate = HandshakeGate::new(&gw);
        let t0 = Instant::now();
        let here: SocketAddr = "10.1.1.2:4000".parse().expect("addr");
        let there: SocketAddr = "10.1.1.3:4000".parse().expect("addr");
        let plain = initiation(&gw, 1, None);
        assert_eq!(judge(&mut gate, here, &plain, false, t0), Verdict::Admit);
        let Verdict::Cookie(reply) = judge(&mut gate, here, &plain, true, t0) else {
            panic!("no cookie under load");
        };
        assert!(
            reply.len() < plain.len(),
            "a cookie reply amplifies nothing"
        );
        let Ok(Datagram::CookieReply {
            receiver_index,
            nonce,
            sealed,
        }) = parse(&reply)
        else {
            panic!("not a cookie reply");
        };
        assert_eq!(receiver_index, 1);
        let Ok(Datagram::HandshakeInit { macs, .. }) = parse(&plain) else {
            panic!("not an initiation");
        };
        let cookie = CookieKey::for_gateway(&gw)
            .open(sealed, macs.mac1, nonce)
            .expect("the initiator opens it");
        let proven = initiation(&gw, 2, Some(&cookie));
        assert_eq!(judge(&mut gate, here, &proven, true, t0), Verdict::Admit);
        assert!(
            matches!(
                judge(&mut gate, there, &proven, true, t0),
                Verdict::Cookie(_)
            ),
            "another source"
        );
        let later = t0 + COOKIE_ROTATION;
        assert_eq!(
            judge(&mut gate, here, &proven, true, later),
            Verdict::Admit,
            "one rotation"
        );
        let much_later = later + COOKIE_ROTATION;
        assert!(
            matches!(
                judge(&mut gate, here, &proven, true, much_later),
                Verdict::Cookie(_)
            ),
            "two rotations"
        );
        let mut wrong = initiation(&PublicKey([6; 32]), 3, None);
        assert_eq!(
            judge(&mut gate, here, &wrong, true, t0),
            Verdict::Refuse(Drop::HandshakeMac)
        );
        wrong = plain.clone();
        wrong[20] ^= 1;
        assert_eq!(
            judge(&mut gate, here, &wrong, false, t0),
            Verdict::Refuse(Drop::HandshakeMac)
        );
    }

    /// Load lingers: for a second after the last backlog, initiations without a cookie
    /// still get one; then the gate admits them again.
    #[test]
    fn under_load_lasts_a_second_past_the_last_backlog() {
        let gw = PublicKey([5; 32]);
        let mut gate = HandshakeGate::new(&gw);
        let t0 = Instant::now();
        let here: SocketAddr = "10.1.1.2:4000".parse().expect("addr");
        let plain = initiation(&gw, 1, None);
        assert!(matches!(
            judge(&mut gate, here, &plain, true, t0),
            Verdict::Cookie(_)
        ));
        let soon = t0 + UNDER_LOAD_FOR - Duration::from_millis(1);
        assert!(matches!(
            judge(&mut gate, here, &plain, false, soon),
            Verdict::Cookie(_)
        ));
        let after = t0 + UNDER_LOAD_FOR;
        assert_eq!(judge(&mut gate, here, &plain, false, after), Verdict::Admit);
    }

    /// Cookie replies to one address are bounded like handshakes: a flood with its
    /// address gets the burst, then the rate; other addresses are not held back.
    #[test]
    fn cookie_replies_to_one_source_are_bounded() {
        let gw = PublicKey([5; 32]);
        let mut gate = HandshakeGate::new(&gw);
        let t0 = Instant::now();
        let victim: SocketAddr = "10.9.9.9:53".parse().expect("addr");
        let plain = initiation(&gw, 1, None);
        let cookie = |gate: &mut HandshakeGate, from, now| {
            matches!(judge(gate, from, &plain, true, now), Verdict::Cookie(_))
        };
        let replies = (0..1_000u64)
            .filter(|i| cookie(&mut gate, victim, t0 + Duration::from_micros(*i * 100)))
            .count() as u32;
        let most = HandshakeLimits::BURST + HandshakeLimits::PER_SECOND / 10 + 1;
        assert!(
            (HandshakeLimits::BURST..=most).contains(&replies),
            "{replies} cookie replies in 100 ms"
        );
        let other: SocketAddr = "10.9.9.10:53".parse().expect("addr");
        assert!(cookie(&mut gate, other, t0 + Duration::from_millis(100)));
    }
}
