//! ChaCha20-Poly1305 and BLAKE2s for the Noise handshakes, plugged into `snow` through
//! its resolver (see `x25519::resolver`) in place of its defaults, because they cost a
//! gateway handshake more than they need to (measured with
//! `cargo bench --bench core -- handshake`):
//!
//! - ChaCha20-Poly1305 from ring, whose assembly the data plane already uses. snow's
//!   default (RustCrypto's, with AVX2 backends built for long messages) spent a twentieth
//!   of a handshake on its three short messages (the client's encrypted static key, the
//!   two payloads). The construction is the one Noise specifies for ChaChaPoly: a 96-bit
//!   nonce of 32 zero bits and the 64-bit counter, little-endian.
//! - BLAKE2s from `blake2s_simd`, which compresses with SSE4.1/AVX2 where the processor
//!   has them; a handshake hashes some eighty blocks (every HKDF is three HMACs of four
//!   blocks each), a tenth of its time with snow's portable default.

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};
use snow::types::{Cipher, Hash};

/// Noise's BLAKE2s hash.
pub(crate) struct Blake2s {
    state: blake2s_simd::State,
}

impl Default for Blake2s {
    fn default() -> Self {
        Blake2s {
            state: blake2s_simd::State::new(),
        }
    }
}

impl Hash for Blake2s {
    fn name(&self) -> &'static str {
        "BLAKE2s"
    }

    fn block_len(&self) -> usize {
        blake2s_simd::BLOCKBYTES
    }

    fn hash_len(&self) -> usize {
        blake2s_simd::OUTBYTES
    }

    fn reset(&mut self) {
        self.state = blake2s_simd::State::new();
    }

    fn input(&mut self, data: &[u8]) {
        self.state.update(data);
    }

    /// Writes the digest into the start of `out` (snow gives room for its largest hash);
    /// the state starts over, as snow's own does.
    fn result(&mut self, out: &mut [u8]) {
        let digest = self.state.finalize();
        let n = out.len().min(blake2s_simd::OUTBYTES);
        out[..n].copy_from_slice(&digest.as_bytes()[..n]);
        self.reset();
    }
}

/// Tag length of ChaCha20-Poly1305.
const TAG_LEN: usize = 16;

/// One handshake cipher state's key.
#[derive(Default)]
pub(crate) struct ChaChaPoly {
    /// `None` until a key is set (snow sets one before its first use).
    key: Option<LessSafeKey>,
}

/// Noise's ChaChaPoly nonce for `counter`.
fn nonce(counter: u64) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

impl Cipher for ChaChaPoly {
    fn name(&self) -> &'static str {
        "ChaChaPoly"
    }

    fn set(&mut self, key: &[u8; 32]) {
        // ring refuses only a key of the wrong length, which a [u8; 32] cannot be.
        self.key = UnboundKey::new(&CHACHA20_POLY1305, key)
            .ok()
            .map(LessSafeKey::new);
    }

    /// The trait has no way to fail. Without a key, or without room for the ciphertext
    /// and tag in `out` (the handshake's buffers are sized for every message, see
    /// `crypto`; snow checks the room for some tokens only), 0 is returned and `out` is
    /// left as it was: a message the peer cannot open, never a panic.
    fn encrypt(&self, counter: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
        let len = plaintext.len();
        let (Some(key), Some(out)) = (self.key.as_ref(), out.get_mut(..len + TAG_LEN)) else {
            return 0;
        };
        let (body, tag_out) = out.split_at_mut(len);
        body.copy_from_slice(plaintext);
        match key.seal_in_place_separate_tag(nonce(counter), Aad::from(authtext), body) {
            Ok(tag) => {
                tag_out.copy_from_slice(tag.as_ref());
                len + TAG_LEN
            }
            // Only for an input past ring's limit (256 GiB): no plaintext is left behind.
            Err(_) => {
                body.fill(0);
                0
            }
        }
    }

    fn decrypt(
        &self,
        counter: u64,
        authtext: &[u8],
        ciphertext: &[u8],
        out: &mut [u8],
    ) -> Result<usize, snow::Error> {
        let key = self.key.as_ref().ok_or(snow::Error::Decrypt)?;
        let len = ciphertext
            .len()
            .checked_sub(TAG_LEN)
            .ok_or(snow::Error::Decrypt)?;
        let (body, tag) = ciphertext.split_at(len);
        let tag = Tag::try_from(tag).map_err(|_| snow::Error::Decrypt)?;
        // snow gives room for the plaintext only: the tag is passed apart.
        let out = out.get_mut(..len).ok_or(snow::Error::Decrypt)?;
        out.copy_from_slice(body);
        key.open_in_place_separate_tag(nonce(counter), Aad::from(authtext), tag, out, 0..)
            .map_err(|_| snow::Error::Decrypt)?;
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snow::params::{CipherChoice, HashChoice};
    use snow::resolvers::{CryptoResolver, DefaultResolver};

    fn snows() -> Box<dyn Cipher> {
        DefaultResolver
            .resolve_cipher(&CipherChoice::ChaChaPoly)
            .expect("snow's ChaChaPoly")
    }

    /// Ours seals byte for byte as snow's default does, for the counters and lengths a
    /// handshake uses and beyond (so each opens what the other seals), and opens it.
    #[test]
    fn ring_seals_as_snows_default_and_opens_what_it_seals() {
        let key = [7u8; 32];
        let (mut ours, mut theirs) = (ChaChaPoly::default(), snows());
        ours.set(&key);
        theirs.set(&key);
        for (counter, len) in [(0u64, 0usize), (1, 32), (2, 48), (u64::MAX - 1, 1500)] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let aad = [counter as u8; 32];
            let mut a = vec![0u8; len + TAG_LEN];
            let mut b = vec![0u8; len + TAG_LEN];
            assert_eq!(ours.encrypt(counter, &aad, &plain, &mut a), len + TAG_LEN);
            assert_eq!(theirs.encrypt(counter, &aad, &plain, &mut b), len + TAG_LEN);
            assert_eq!(a, b, "counter {counter}, {len} bytes");
            // snow gives room for the plaintext alone.
            let mut opened = vec![0u8; len];
            assert_eq!(ours.decrypt(counter, &aad, &b, &mut opened), Ok(len));
            assert_eq!(opened, plain);
        }
    }

    /// Digests, HMACs and HKDFs equal snow's default BLAKE2s for inputs around the
    /// block boundary, also when one state is used again (snow reuses it throughout a
    /// handshake).
    #[test]
    fn blake2s_equals_snows_default() {
        let mut theirs = DefaultResolver
            .resolve_hash(&HashChoice::Blake2s)
            .expect("snow's BLAKE2s");
        let mut ours = Blake2s::default();
        assert_eq!((ours.block_len(), ours.hash_len()), (64, 32));
        for len in [0usize, 1, 32, 63, 64, 65, 128, 129, 1000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
            ours.input(&data[..len / 2]);
            ours.input(&data[len / 2..]);
            ours.result(&mut a);
            theirs.reset();
            theirs.input(&data);
            theirs.result(&mut b);
            assert_eq!(a, b, "digest of {len} bytes");
            ours.hmac(&[len as u8; 32], &data, &mut a);
            theirs.hmac(&[len as u8; 32], &data, &mut b);
            assert_eq!(a, b, "hmac of {len} bytes");
            let mut ka = [[0u8; 64]; 3];
            let mut kb = [[0u8; 64]; 3];
            let [a1, a2, a3] = &mut ka;
            ours.hkdf(&a[..32], &data, 3, a1, a2, a3);
            let [b1, b2, b3] = &mut kb;
            theirs.hkdf(&b[..32], &data, 3, b1, b2, b3);
            assert_eq!(ka, kb, "hkdf of {len} bytes");
        }
    }

    #[test]
    fn a_wrong_tag_counter_or_aad_a_short_input_or_no_key_is_refused() {
        let mut c = ChaChaPoly::default();
        let mut out = [0u8; 64];
        assert_eq!(c.encrypt(0, &[], &[1, 2, 3], &mut out), 0, "no key");
        assert!(c.decrypt(0, &[], &[0; 19], &mut out).is_err(), "no key");
        c.set(&[9u8; 32]);
        let n = c.encrypt(5, b"ad", b"hello", &mut out);
        let sealed = out[..n].to_vec();
        let mut opened = [0u8; 64];
        assert_eq!(c.decrypt(5, b"ad", &sealed, &mut opened), Ok(5));
        assert!(
            c.decrypt(6, b"ad", &sealed, &mut opened).is_err(),
            "counter"
        );
        assert!(c.decrypt(5, b"AD", &sealed, &mut opened).is_err(), "aad");
        let mut flipped = sealed.clone();
        flipped[n - 1] ^= 1;
        assert!(c.decrypt(5, b"ad", &flipped, &mut opened).is_err(), "tag");
        assert!(
            c.decrypt(5, b"ad", &sealed[..15], &mut opened).is_err(),
            "short"
        );
        assert!(
            c.decrypt(5, b"ad", &sealed, &mut opened[..4]).is_err(),
            "no room"
        );
        assert_eq!(
            c.decrypt(5, b"ad", &sealed, &mut opened[..5]),
            Ok(5),
            "room enough"
        );
        assert_eq!(c.encrypt(0, &[], b"hello", &mut out[..20]), 0, "no room");
    }
}
