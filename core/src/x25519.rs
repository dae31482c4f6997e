//! X25519 for the Noise handshakes, from aws-lc-rs, plugged into `snow` through its
//! resolver: the variable-base scalar multiplication is hand-written assembly there
//! (s2n-bignum) and measured 2.5 times as fast as the portable field arithmetic of
//! snow's default (curve25519-dalek) on this project's machines. A gateway handshake is
//! four Diffie-Hellman operations and one key generation (three and one once the client's
//! static-static secret is kept, below), so this sets the handshake rate. The resolver
//! also takes the handshake's ChaCha20-Poly1305 (ring) and BLAKE2s (blake2s_simd) from
//! `noise_suite`; only the random numbers stay snow's.
//!
//! Two results are the same in every handshake of a static key, so they are kept
//! ([`LocalStatic`]) instead of computed again: the key's public half and aws-lc's form
//! of the key (snow sets the private key on every handshake, and aws-lc derives the
//! public half whenever it takes a private key in: a fixed-base multiplication, a tenth
//! of a gateway handshake), and the static-static secret (Noise IK's `ss`) with each
//! peer the key knows in advance (the gateway's authorized clients, the client's
//! gateway), computed at the peer's first handshake — as WireGuard precomputes it per
//! peer.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use aws_lc_rs::agreement::{agree, PrivateKey, UnparsedPublicKey, X25519};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::Zeroizing;

use crate::noise_suite::{Blake2s, ChaChaPoly};

/// The resolver a handshake of `local` is built with: this module's X25519 (knowing what
/// `local` keeps), [`ChaChaPoly`] and [`Blake2s`], snow's default for the rest (the
/// random numbers).
pub fn resolver(local: &Arc<LocalStatic>) -> Box<dyn CryptoResolver + Send> {
    Box::new(FallbackResolver::new(
        Box::new(Primitives {
            local: Arc::clone(local),
        }),
        Box::new(DefaultResolver),
    ))
}

/// A static private key with what its handshakes reuse: its public half, and its
/// static-static secrets with the peers it knows (each computed at the peer's first
/// handshake; a peer it does not know costs the Diffie-Hellman each time and is not
/// remembered, so the table never grows beyond the peers it was made with).
pub struct LocalStatic {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
    /// aws-lc's form of the private key, made once; `None` if aws-lc refused it (it
    /// refuses only a wrong length), and then every exchange with it fails.
    key: Option<PrivateKey>,
    shared: HashMap<[u8; 32], OnceLock<Zeroizing<[u8; 32]>>>,
}

impl LocalStatic {
    /// `private`'s public half and slots for the secrets with `peers`.
    pub fn new(private: &[u8; 32], peers: impl IntoIterator<Item = [u8; 32]>) -> LocalStatic {
        let mut dh = Dh25519::default();
        dh.set(private);
        LocalStatic {
            private: Zeroizing::new(*private),
            public: dh.public,
            key: dh.key,
            shared: peers.into_iter().map(|p| (p, OnceLock::new())).collect(),
        }
    }

    /// The public half.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// The private half.
    pub(crate) fn private(&self) -> &[u8; 32] {
        &self.private
    }

    /// Whether `private` is this key (compared in constant time).
    fn is(&self, private: &[u8]) -> bool {
        aws_lc_rs::constant_time::verify_slices_are_equal(private, self.private.as_ref()).is_ok()
    }
}

/// Resolves X25519, ChaCha20-Poly1305 and BLAKE2s.
struct Primitives {
    local: Arc<LocalStatic>,
}

impl CryptoResolver for Primitives {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        None
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        matches!(choice, DHChoice::Curve25519).then(|| {
            Box::new(Dh25519 {
                known: Some(Arc::clone(&self.local)),
                ..Dh25519::default()
            }) as Box<dyn Dh>
        })
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        matches!(choice, HashChoice::Blake2s).then(|| Box::new(Blake2s::default()) as Box<dyn Hash>)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        matches!(choice, CipherChoice::ChaChaPoly)
            .then(|| Box::new(ChaChaPoly::default()) as Box<dyn Cipher>)
    }
}

/// One X25519 key pair.
#[derive(Default)]
struct Dh25519 {
    private: Zeroizing<[u8; 32]>,
    public: [u8; 32],
    /// aws-lc's form of the private key. `None` before a key is set, and when the key
    /// is the known one (exchanges then use `known`'s form); `None` also if aws-lc
    /// refused it (it refuses only a wrong length), and then every exchange fails.
    key: Option<PrivateKey>,
    /// The static key whose results are kept, as the resolver was given it.
    known: Option<Arc<LocalStatic>>,
    /// Whether this pair's key is that one (set with it, not generated).
    is_known: bool,
}

impl Dh for Dh25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        self.key = None;
        self.public = [0; 32];
        self.is_known = false;
        let Ok(bytes) = <[u8; 32]>::try_from(privkey) else {
            return;
        };
        *self.private = bytes;
        if let Some(known) = self.known.as_ref().filter(|k| k.is(privkey)) {
            self.public = known.public;
            self.is_known = true;
            return;
        }
        let Ok(key) = PrivateKey::from_private_key(&X25519, privkey) else {
            return;
        };
        if let Ok(public) = key.compute_public_key() {
            if let Ok(public) = <[u8; 32]>::try_from(public.as_ref()) {
                self.public = public;
                self.key = Some(key);
            }
        }
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rng.try_fill_bytes(bytes.as_mut())?;
        // A fresh ephemeral key: nothing of it is kept.
        self.known = None;
        self.set(bytes.as_ref());
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        self.private.as_ref()
    }

    /// Fails for a peer key of small order (an all-zero shared secret), which the Noise
    /// specification allows an implementation to refuse: such a handshake is refused.
    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let known = self.known.as_ref().filter(|_| self.is_known);
        let key = match known {
            Some(known) => known.key.as_ref(),
            None => self.key.as_ref(),
        }
        .ok_or(snow::Error::Dh)?;
        let out = out.get_mut(..32).ok_or(snow::Error::Dh)?;
        // snow passes its whole key buffer (sized for its largest curve): the key is the
        // first 32 bytes.
        let pubkey = pubkey.get(..32).ok_or(snow::Error::Dh)?;
        let slot = known.and_then(|k| k.shared.get(pubkey));
        if let Some(kept) = slot.and_then(OnceLock::get) {
            out.copy_from_slice(kept.as_ref());
            return Ok(());
        }
        agree(
            key,
            UnparsedPublicKey::new(&X25519, pubkey),
            snow::Error::Dh,
            |shared| {
                out.copy_from_slice(shared);
                Ok(())
            },
        )?;
        if let Some(slot) = slot {
            let mut kept = Zeroizing::new([0u8; 32]);
            kept.copy_from_slice(out);
            // Another thread may have filled it meanwhile, with the same value.
            let _ = slot.set(kept);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The public key of an X25519 private key (clamped as X25519 does).
    fn public_key(private: &[u8; 32]) -> [u8; 32] {
        let mut dh = Dh25519::default();
        dh.set(private);
        dh.public
    }

    /// RFC 7748, section 6.1: Alice's and Bob's keys and their shared secret.
    #[test]
    fn the_rfc_7748_vectors_hold() {
        let hex = |s: &str| -> [u8; 32] {
            let v: Vec<u8> = (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
                .collect();
            v.try_into().expect("32 bytes")
        };
        let alice = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let bob = hex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
        let alice_pub = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        let bob_pub = hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let shared = hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
        assert_eq!(public_key(&alice), alice_pub);
        assert_eq!(public_key(&bob), bob_pub);
        let mut a = Dh25519::default();
        a.set(&alice);
        let mut out = [0u8; 32];
        a.dh(&bob_pub, &mut out).expect("dh");
        assert_eq!(out, shared);
    }

    /// A kept static-static secret is the Diffie-Hellman's result; a known key's public
    /// half is its own; a generated (ephemeral) key never answers from the table, not
    /// even for a peer the static key knows.
    #[test]
    fn kept_results_equal_computed_ones_and_only_the_known_key_uses_them() {
        let gateway = [3u8; 32];
        let client = [5u8; 32];
        let client_pub = public_key(&client);
        let local = Arc::new(LocalStatic::new(&gateway, [client_pub]));
        assert_eq!(local.public(), public_key(&gateway));
        let mut plain = Dh25519::default();
        plain.set(&gateway);
        let mut expected = [0u8; 32];
        plain.dh(&client_pub, &mut expected).expect("dh");
        for _ in 0..2 {
            let mut dh = Dh25519 {
                known: Some(Arc::clone(&local)),
                ..Dh25519::default()
            };
            dh.set(&gateway);
            assert_eq!(dh.public, local.public());
            // The known key is not taken in again (aws-lc would derive its public half).
            assert!(dh.is_known && dh.key.is_none());
            let mut out = [0u8; 32];
            dh.dh(&client_pub, &mut out).expect("dh");
            assert_eq!(out, expected);
            // A peer it does not know (an ephemeral key): computed with the kept key.
            let stranger = public_key(&[11u8; 32]);
            let (mut computed, mut plain_out) = ([0u8; 32], [0u8; 32]);
            dh.dh(&stranger, &mut computed).expect("dh");
            plain.dh(&stranger, &mut plain_out).expect("dh");
            assert_eq!(computed, plain_out);
        }
        assert!(local
            .shared
            .get(&client_pub)
            .and_then(OnceLock::get)
            .is_some());
        // Another private key given the same table: computed, not taken from it.
        let mut other = Dh25519 {
            known: Some(Arc::clone(&local)),
            ..Dh25519::default()
        };
        other.set(&[9u8; 32]);
        assert_eq!(other.public, public_key(&[9u8; 32]));
        let mut out = [0u8; 32];
        other.dh(&client_pub, &mut out).expect("dh");
        assert_ne!(out, expected);
        let mut ephemeral = Dh25519 {
            known: Some(Arc::clone(&local)),
            ..Dh25519::default()
        };
        let mut rng = DefaultResolver.resolve_rng().expect("rng");
        ephemeral.generate(rng.as_mut()).expect("generate");
        assert!(!ephemeral.is_known && ephemeral.known.is_none());
    }

    #[test]
    fn a_small_order_peer_key_or_a_missing_key_fails_instead_of_a_zero_secret() {
        let mut a = Dh25519::default();
        let mut out = [0u8; 32];
        assert!(a.dh(&[9; 32], &mut out).is_err(), "no key set");
        a.set(&[7; 32]);
        assert!(a.dh(&[0; 32], &mut out).is_err(), "the identity point");
        a.set(&[7; 31]);
        assert!(
            a.dh(&[9; 32], &mut out).is_err(),
            "a key of the wrong length"
        );
    }
}
