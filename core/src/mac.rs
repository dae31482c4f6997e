//! The cheap gates in front of every handshake, as WireGuard's mac1 and mac2.
//!
//! - **mac1**: a MAC over the initiation, keyed by the gateway's public key. Anyone who
//!   knows that key can compute it, so it is no authentication; what it buys is that a
//!   packet shaped like an initiation but not made for this gateway — a flood of random
//!   bytes, a replay aimed at another gateway — is refused with one keyed BLAKE2s,
//!   before the Diffie-Hellman operations a handshake costs (three, and a key generation,
//!   for an authorized client after its first).
//! - **mac2**: under load, the gateway does a Diffie-Hellman only for an initiation
//!   whose mac2 is keyed by a *cookie* it gave that source address (a MAC of the address
//!   under a secret it rotates): proof that the sender receives at the address it
//!   claims. A sender without one gets the cookie in a *cookie reply* instead of a
//!   handshake, encrypted under a key derived from the gateway's public key and bound
//!   to the initiation's mac1 (associated data), so that only the initiator that sent
//!   that initiation can use it.

use blake2::digest::consts::U16;
use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};

use ring::aead::{Aad, LessSafeKey, Nonce};

use crate::crypto::PublicKey;
use crate::wire::{COOKIE_NONCE_LEN, MAC_LEN, TAG_LEN};

/// The label the MAC key is derived with.
const LABEL: &[u8] = b"jumping-vpn/1 mac1";
/// The label the cookie reply key is derived with.
const COOKIE_LABEL: &[u8] = b"jumping-vpn/1 cookie";

/// A cookie: for a while, proof that its holder receives at one source address.
pub type Cookie = [u8; MAC_LEN];

/// A cookie sealed in a cookie reply: ciphertext and tag.
pub type SealedCookie = [u8; MAC_LEN + TAG_LEN];

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
        keyed(&self.0, message)
    }
}

/// BLAKE2s-128 of `message` keyed by `key` (1 to 32 bytes: every caller's key is 16
/// or 32).
fn keyed(key: &[u8], message: &[u8]) -> Blake2sMac<U16> {
    let mut m = <Blake2sMac<U16> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("BLAKE2s takes a 16- or 32-byte key"));
    Mac::update(&mut m, message);
    m
}

/// The mac2 of `message` under `cookie`.
pub fn cookie_mac(cookie: &Cookie, message: &[u8]) -> [u8; MAC_LEN] {
    keyed(cookie, message).finalize().into_bytes().into()
}

/// Whether `mac` is the mac2 of `message` under `cookie` (constant time).
pub fn verify_cookie_mac(cookie: &Cookie, message: &[u8], mac: &[u8; MAC_LEN]) -> bool {
    keyed(cookie, message).verify_slice(mac).is_ok()
}

/// The cookie of `source` (its address bytes and port) under `secret`.
pub fn cookie_of(secret: &[u8; 32], source: std::net::SocketAddr) -> Cookie {
    let mut m = match source.ip() {
        std::net::IpAddr::V4(a) => keyed(secret, &a.octets()),
        std::net::IpAddr::V6(a) => keyed(secret, &a.octets()),
    };
    Mac::update(&mut m, &source.port().to_be_bytes());
    m.finalize().into_bytes().into()
}

/// The key cookie replies of one gateway are sealed under: BLAKE2s-256(label ||
/// gateway public key), so that the initiator, who knows that key, can open them.
#[derive(Clone)]
pub struct CookieKey([u8; 32]);

impl std::fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieKey(..)")
    }
}

impl CookieKey {
    /// The key for the gateway whose static public key is `gateway`.
    pub fn for_gateway(gateway: &PublicKey) -> Self {
        let mut h = Blake2s256::new();
        h.update(COOKIE_LABEL);
        h.update(gateway.0);
        CookieKey(h.finalize().into())
    }

    fn aead(&self) -> LessSafeKey {
        crate::crypto::aead_key(crate::crypto::Cipher::ChaCha20Poly1305, &self.0)
    }

    /// Seals `cookie` for the initiation whose mac1 is `mac1`, under `nonce` (random:
    /// the key is fixed per gateway, and 96 random bits make a repeat negligible for
    /// the replies one gateway sends in its life).
    pub fn seal(
        &self,
        cookie: &Cookie,
        mac1: &[u8; MAC_LEN],
        nonce: [u8; COOKIE_NONCE_LEN],
    ) -> SealedCookie {
        let mut out = [0u8; MAC_LEN + TAG_LEN];
        let (body, tag_out) = out.split_at_mut(MAC_LEN);
        body.copy_from_slice(cookie);
        match self.aead().seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(mac1),
            body,
        ) {
            Ok(tag) => tag_out.copy_from_slice(tag.as_ref()),
            Err(_) => unreachable!("ring seals any input shorter than 256 GiB"),
        }
        out
    }

    /// Opens a cookie reply's `sealed` cookie, bound to the initiation whose mac1 is
    /// `mac1`; `None` if it is not one.
    pub fn open(
        &self,
        sealed: &SealedCookie,
        mac1: &[u8; MAC_LEN],
        nonce: [u8; COOKIE_NONCE_LEN],
    ) -> Option<Cookie> {
        let mut buf = *sealed;
        let plain = self
            .aead()
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(mac1),
                &mut buf,
            )
            .ok()?;
        plain.try_into().ok()
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

    #[test]
    fn a_cookie_opens_only_for_its_initiation_and_keys_only_its_source() {
        let gw = PublicKey([7; 32]);
        let key = CookieKey::for_gateway(&gw);
        let secret = [9u8; 32];
        let here: std::net::SocketAddr = "10.0.0.1:4000".parse().expect("addr");
        let cookie = cookie_of(&secret, here);
        assert_ne!(
            cookie,
            cookie_of(&secret, "10.0.0.1:4001".parse().expect("addr"))
        );
        assert_ne!(cookie, cookie_of(&[8; 32], here), "another secret");
        let mac1 = [3u8; MAC_LEN];
        let sealed = key.seal(&cookie, &mac1, [1; COOKIE_NONCE_LEN]);
        assert_eq!(
            key.open(&sealed, &mac1, [1; COOKIE_NONCE_LEN]),
            Some(cookie)
        );
        assert_eq!(
            key.open(&sealed, &[4; MAC_LEN], [1; COOKIE_NONCE_LEN]),
            None,
            "another initiation"
        );
        assert_eq!(
            key.open(&sealed, &mac1, [2; COOKIE_NONCE_LEN]),
            None,
            "another nonce"
        );
        let other = CookieKey::for_gateway(&PublicKey([6; 32]));
        assert_eq!(
            other.open(&sealed, &mac1, [1; COOKIE_NONCE_LEN]),
            None,
            "another gateway"
        );
        let mac2 = cookie_mac(&cookie, b"initiation");
        assert!(verify_cookie_mac(&cookie, b"initiation", &mac2));
        assert!(!verify_cookie_mac(&[0; MAC_LEN], b"initiation", &mac2));
    }
}
