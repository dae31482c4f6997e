//! Where the AEAD key objects of the busiest session keys are kept between uses, per
//! thread.
//!
//! ring's AES-256-GCM key object holds the AES key schedule and the GHASH key's powers:
//! building one costs about as much as sealing a whole packet (measured in `cargo bench
//! --bench core`), and it is half a kilobyte. Kept in every session, it would grow each
//! idle session by a kilobyte (one key each way); built for every packet, it would cost
//! a third of the packet path's crypto. So the last few keys used on each thread are
//! kept here, in a fixed number of slots: a session's packets run on one thread, and
//! only sessions moving packets hold slots. A ChaCha20-Poly1305 key object is a copy of
//! the 32 key bytes, built per use.
//!
//! Keys are named by an id drawn once per key ([`KeyId::fresh`]), never by their bytes,
//! so a lookup compares no secret. A slot's key is used only for the id it was built
//! for; ids are never reused within the process. (Like every ring key object, a slot's
//! is not zeroized when replaced.)

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::{LessSafeKey, UnboundKey};

use crate::crypto::Cipher;

/// Slots per thread.
const SLOTS: usize = 16;

/// The name of one key (one direction of one epoch of one session).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyId(u64);

impl KeyId {
    /// A name no other key of this process has had.
    pub(crate) fn fresh() -> KeyId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        KeyId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

struct Slots {
    keys: Vec<(KeyId, LessSafeKey)>,
    /// The slot the next new key replaces, round robin.
    next: usize,
}

thread_local! {
    static SLOTS_HERE: RefCell<Slots> = const {
        RefCell::new(Slots {
            keys: Vec::new(),
            next: 0,
        })
    };
}

/// ring's key object for `bytes` under `cipher`.
pub(crate) fn build(cipher: Cipher, bytes: &[u8; 32]) -> LessSafeKey {
    match UnboundKey::new(cipher.algorithm(), bytes) {
        Ok(key) => LessSafeKey::new(key),
        // ring refuses only a key of the wrong length; the type says 32 bytes, which
        // both ciphers take.
        Err(_) => unreachable!("a 32-byte {cipher} key"),
    }
}

/// Runs `f` with the key object of key `id` (`bytes` under `cipher`): kept from an
/// earlier use on this thread for AES-256-GCM, built otherwise.
pub(crate) fn with_key<R>(
    (cipher, id, bytes): (Cipher, KeyId, &[u8; 32]),
    f: impl FnOnce(&LessSafeKey) -> R,
) -> R {
    if cipher == Cipher::ChaCha20Poly1305 {
        return f(&build(cipher, bytes));
    }
    SLOTS_HERE.with_borrow_mut(|slots| {
        if let Some((_, key)) = slots.keys.iter().find(|(k, _)| *k == id) {
            return f(key);
        }
        let key = build(cipher, bytes);
        let at = slots.next;
        slots.next = (at + 1) % SLOTS;
        match slots.keys.get_mut(at) {
            Some(slot) => *slot = (id, key),
            None => slots.keys.push((id, key)),
        }
        match slots.keys.get(at) {
            Some((_, key)) => f(key),
            None => unreachable!("slot {at} was just filled"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::aead::{Aad, Nonce};

    fn seal(cipher: Cipher, id: KeyId, bytes: &[u8; 32]) -> Vec<u8> {
        let mut data = b"packet".to_vec();
        with_key((cipher, id, bytes), |key| {
            key.seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                &mut data,
            )
        })
        .expect("seal");
        data
    }

    /// Each id gets its own key's object, also once more keys than slots have passed
    /// through the thread and the first ones were replaced.
    #[test]
    fn every_id_seals_with_its_own_key_through_replacements() {
        let keys: Vec<(KeyId, [u8; 32])> = (0..(2 * SLOTS as u8 + 3))
            .map(|i| (KeyId::fresh(), [i; 32]))
            .collect();
        for _ in 0..3 {
            for (id, bytes) in &keys {
                let direct = {
                    let mut data = b"packet".to_vec();
                    build(Cipher::Aes256Gcm, bytes)
                        .seal_in_place_append_tag(
                            Nonce::assume_unique_for_key([0; 12]),
                            Aad::empty(),
                            &mut data,
                        )
                        .expect("seal");
                    data
                };
                assert_eq!(seal(Cipher::Aes256Gcm, *id, bytes), direct);
            }
        }
        SLOTS_HERE.with_borrow(|s| assert_eq!(s.keys.len(), SLOTS, "bounded"));
        assert_ne!(KeyId::fresh(), KeyId::fresh());
    }
}
