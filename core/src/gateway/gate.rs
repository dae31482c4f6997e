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
    /// Diffie-Hellmans per source (proven sources only, under load).
    handshakes: SourceBuckets,
    /// Cookie replies per source: a flood with spoofed sources makes the gateway send
    /// at most this much to any one address, each reply smaller than what caused it.
    cookies: SourceBuckets,
}

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
            handshakes: SourceBuckets::new((4, 8)),
            cookies: SourceBuckets::new((4, 8)),
        }
    }

    /// The key of the initiations' mac1.
    pub fn mac_key(&self) -> &MacKey {
        &self.mac_key
    }

    /// Judges an initiation from `from` whose sender index and MACs are given.
    /// `under_load`: the runtime's handshake work is backing up (its queue past a
    /// threshold), so that only proven source addresses get a Diffie-Hellman.
    pub fn judge(
        &mut self,
        from: SocketAddr,
        sender_index: u32,
        macs: &InitMacs<'_>,
        under_load: bool,
        now: Instant,
    ) -> Verdict {
        if !self.mac_key.verify(macs.mac1_covered, macs.mac1) {
            return Verdict::Refuse(Drop::HandshakeMac);
        }
        let (per_second, burst) = (HandshakeLimits::PER_SECOND, HandshakeLimits::BURST);
        if under_load && !self.proven(from, macs, now) {
            if !self.cookies.take(from.ip(), now, per_second, burst) {
                return Verdict::Refuse(Drop::HandshakeRate);
            }
            let mut nonce = [0u8; COOKIE_NONCE_LEN];
            if getrandom::fill(&mut nonce).is_err() {
                return Verdict::Refuse(Drop::HandshakeRate);
            }
            let cookie = cookie_of(&self.secret, from);
            let sealed = self.cookie_key.seal(&cookie, macs.mac1, nonce);
            return Verdict::Cookie(encode_cookie_reply(sender_index, nonce, &sealed));
        }
        if !self.handshakes.take(from.ip(), now, per_second, burst) {
            return Verdict::Refuse(Drop::HandshakeRate);
        }
        Verdict::Admit
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
            self.previous = self.rotated_at.map(|_| self.secret);
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

    /// Cookie replies to one address are bounded like handshakes: a spoofed flood gets
    /// the burst, then the rate.
    #[test]
    fn cookie_replies_to_one_source_are_bounded() {
        let gw = PublicKey([5; 32]);
        let mut gate = HandshakeGate::new(&gw);
        let t0 = Instant::now();
        let victim: SocketAddr = "10.9.9.9:53".parse().expect("addr");
        let plain = initiation(&gw, 1, None);
        let replies = (0..1_000u64)
            .filter(|i| {
                let now = t0 + Duration::from_micros(*i * 100);
                matches!(
                    judge(&mut gate, victim, &plain, true, now),
                    Verdict::Cookie(_)
                )
            })
            .count() as u32;
        assert!(
            (HandshakeLimits::BURST
                ..=HandshakeLimits::BURST + HandshakeLimits::PER_SECOND / 10 + 1)
                .contains(&replies),
            "{replies} cookie replies in 100 ms"
        );
    }
}
