//! The cheap gate in front of every handshake: a MAC over the initiation, keyed by the
//! gateway's public key (as WireGuard's mac1). Anyone who knows that key can compute it,
//! so it is no authentication; what it buys is that a packet shaped like an initiation
//! but not made for this gateway — a flood of random bytes, a replay aimed at another
//! gateway — is refused with one keyed BLAKE2s over 121 bytes, before the four
//! Diffie-Hellman operations a handshake costs.

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};

use crate::crypto::PublicKey;
use crate::wire::MAC_LEN;

/// The label the MAC key is derived with.
const LABEL: &[u8] = b"jumping-vpn/1 mac1";

/// The key of the initiation MAC for one gateway: BLAKE2s-256(label || gateway public
/// key).
#[derive(Clone)]
pub struct MacKey([u8; 32]);

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKey(..)")
    }
}

impl MacKey {
    /// The key for the gateway whose static public key is `gateway`.
    pub fn for_gateway(gateway: &PublicKey) -> Self {
        let mut h = Blake2s256::new();
        h.update(LABEL);
        h.update(gateway.0);
        MacKey(h.finalize().into())
    }

    /// The MAC of `message` (BLAKE2s keyed, 16 bytes).
    pub fn mac(&self, message: &[u8]) -> [u8; MAC_LEN] {
        self.keyed(message).finalize().into_bytes().into()
    }

    /// Whether `mac` is the MAC of `message` (compared in constant time).
    pub fn verify(&self, message: &[u8], mac: &[u8; MAC_LEN]) -> bool {
        self.keyed(message).verify_slice(mac).is_ok()
    }

    fn keyed(&self, message: &[u8]) -> Blake2sMac<U16> {
        let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("BLAKE2s takes a 32-byte key"));
        Mac::update(&mut m, message);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mac_verifies_only_with_its_gateway_and_message() {
        let a = MacKey::for_gateway(&PublicKey([1; 32]));
        let b = MacKey::for_gateway(&PublicKey([2; 32]));
        let mac = a.mac(b"initiation");
        assert!(a.verify(b"initiation", &mac));
        assert!(!b.verify(b"initiation", &mac), "another gateway's key");
        assert!(!a.verify(b"initiatioN", &mac), "another message");
        let mut flipped = mac;
        flipped[15] ^= 1;
        assert!(!a.verify(b"initiation", &flipped));
    }
}
