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
//! for; ids are never reused within the process. The least recently used slot makes
//! room for a new key, and a key's slot on the thread that drops it is emptied then
//! ([`forget`]): keys that are gone do not stay here on a quiet thread. (A slot on
//! another thread stays until it is reused; and like every ring key object, a slot's
//! is not zeroized.)

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use ring::aead::LessSafeKey;

use crate::crypto::{aead_key, Cipher};

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
    /// Each key with when it was last used (this thread's count of uses).
    keys: Vec<(KeyId, LessSafeKey, u64)>,
    uses: u64,
}

thread_local! {
    static SLOTS_HERE: RefCell<Slots> = const {
        RefCell::new(Slots {
            keys: Vec::new(),
            uses: 0,
        })
    };
}

/// Runs `f` with the key object of key `id` (`bytes` under `cipher`): kept from an
/// earlier use on this thread for AES-256-GCM, built otherwise.
pub(crate) fn with_key<R>(
    (cipher, id, bytes): (Cipher, KeyId, &[u8; 32]),
    f: impl FnOnce(&LessSafeKey) -> R,
) -> R {
    if cipher == Cipher::ChaCha20Poly1305 {
        return f(&aead_key(cipher, bytes));
    }
    SLOTS_HERE.with_borrow_mut(|slots| {
        slots.uses += 1;
        let now = slots.uses;
        let at = match slots.keys.iter().position(|(k, _, _)| *k == id) {
            Some(at) => at,
            None => {
                let key = aead_key(cipher, bytes);
                if slots.keys.len() < SLOTS {
                    slots.keys.push((id, key, now));
                    slots.keys.len() - 1
                } else {
                    let oldest = (0..slots.keys.len())
                        .min_by_key(|&i| slots.keys.get(i).map_or(0, |s| s.2))
                        .unwrap_or(0);
                    if let Some(slot) = slots.keys.get_mut(oldest) {
                        *slot = (id, key, now);
                    }
                    oldest
                }
            }
        };
        match slots.keys.get_mut(at) {
            Some((_, key, used)) => {
                *used = now;
                f(key)
            }
            None => unreachable!("slot {at} holds the key"),
        }
    })
}

/// Empties the slot of key `id` on this thread, if it has one (the key is being
/// dropped). Does nothing while the thread is exiting.
pub(crate) fn forget(id: KeyId) {
    let _ = SLOTS_HERE.try_with(|slots| {
        if let Ok(mut slots) = slots.try_borrow_mut() {
            slots.keys.retain(|(k, _, _)| *k != id);
        }
    });
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
                    aead_key(Cipher::Aes256Gcm, bytes)
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
        let (last, bytes) = keys[keys.len() - 1];
        assert!(SLOTS_HERE.with_borrow(|s| s.keys.iter().any(|k| k.0 == last)));
        forget(last);
        assert!(!SLOTS_HERE.with_borrow(|s| s.keys.iter().any(|k| k.0 == last)));
        // Used again, it is built again, the same.
        assert_eq!(
            seal(Cipher::Aes256Gcm, last, &bytes),
            seal(Cipher::Aes256Gcm, last, &bytes)
        );
    }

    /// The busiest keys keep their slots while more keys than slots pass through.
    #[test]
    fn a_key_in_use_keeps_its_slot_and_the_least_recent_makes_room() {
        let busy = KeyId::fresh();
        for i in 0..(3 * SLOTS as u8) {
            let _ = seal(Cipher::Aes256Gcm, busy, &[200; 32]);
            let _ = seal(Cipher::Aes256Gcm, KeyId::fresh(), &[i; 32]);
        }
        assert!(SLOTS_HERE.with_borrow(|s| s.keys.iter().any(|k| k.0 == busy)));
    }
}
