//! The cryptographic session: Noise IK handshakes (through `snow`) and the keys that
//! seal and open session packets.
//!
//! The handshake is Noise `IK` with X25519, ChaCha20-Poly1305 and BLAKE2s: the client
//! knows (pins) the gateway's static key, the gateway learns and authorizes the client's.
//! The split of the handshake gives one key per direction. Session packets are then
//! sealed with an AEAD directly, so that the clear-text header can be the associated
//! data: the counter is the nonce, and the session id and packet type are authenticated
//! with every payload. The AEAD is agreed in the handshake ([`Cipher`]): AES-256-GCM
//! where both sides have AES and carry-less multiplication in hardware, else
//! ChaCha20-Poly1305 — both ring's (SIMD code chosen at run time). Measured side by side
//! in `cargo bench --bench core` (with RustCrypto's and aws-lc's), AES-256-GCM seals and
//! opens a 1,400-byte packet in less than half the time of ring's ChaCha20-Poly1305 on
//! machines with those instructions, and ring's ChaCha20-Poly1305 three times as fast
//! as RustCrypto's. A rekey is a fresh IK
//! handshake carried inside the session (fresh ephemeral keys: forward secrecy), whose
//! prologue names the session, so its keys are bound to it.
//!
//! Sans-IO like the rest of the core: time comes in as `now`. Only `snow`'s ephemeral
//! keys and [`Keypair::generate`] draw from the OS's random source.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::ids::SessionId;
use crate::keycache::{self, KeyId};
use crate::replay::{ReplayError, ReplayWindow};
use crate::wire::{self, Control, SessionHeader, HEADER_LEN, TAG_LEN};
use crate::x25519::LocalStatic;

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";
/// Prologue of the handshake that creates a session: names the protocol and version.
pub const HANDSHAKE_PROLOGUE: &[u8] = b"jumping-vpn/1 handshake";
/// Prologue of a rekey, followed by the 8 bytes of the session id.
pub const REKEY_PROLOGUE: &[u8] = b"jumping-vpn/1 rekey";
/// A ChaCha20-Poly1305 key that sealed this many packets is never used again (as
/// WireGuard's REJECT_AFTER_MESSAGES): far below the 2^64 nonces of the cipher.
pub const REJECT_AFTER_PACKETS: u64 = u64::MAX - (1 << 13);
/// An AES-256-GCM key never seals, nor opens, more than this many 16-byte blocks (each
/// packet counted as its body's blocks and one more): RFC 8446 (5.5) keeps AES-GCM's
/// confidentiality and integrity margins at 2^-57 with at most 2^24.5 records of 2^14
/// bytes, 2^34.5 blocks. Counted in blocks, not packets, the margin holds whatever the
/// tunnel's MTU, and whatever counters a cluster's moves skip. A rekey is due at half.
pub const AES_GCM_BLOCK_LIMIT: u64 = 1 << 34;

/// The AEAD that seals a session's packets, agreed in its handshake: the client offers
/// the ciphers it runs fast ([`CipherSet`]), the gateway picks. Both use a 96-bit nonce of
/// 32 zero bits and the packet's 64-bit counter, and a 32-byte key per direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// ChaCha20-Poly1305 (RFC 8439): fast everywhere, and what every side offers.
    ChaCha20Poly1305,
    /// AES-256-GCM: faster where AES and carry-less multiplication are instructions.
    Aes256Gcm,
}

impl Cipher {
    /// Its number on the wire (a bit of an offer, the byte of a choice).
    pub const fn id(self) -> u8 {
        match self {
            Cipher::ChaCha20Poly1305 => 0,
            Cipher::Aes256Gcm => 1,
        }
    }

    /// The cipher numbered `id`, if it is one.
    pub const fn from_id(id: u8) -> Option<Cipher> {
        match id {
            0 => Some(Cipher::ChaCha20Poly1305),
            1 => Some(Cipher::Aes256Gcm),
            _ => None,
        }
    }

    /// Its name where people read it: the client's line when its session attaches, and
    /// the `cipher` of the admin status (spec/admin.md).
    pub const fn name(self) -> &'static str {
        match self {
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
            Cipher::Aes256Gcm => "aes-256-gcm",
        }
    }

    /// The most 16-byte blocks one key of this cipher seals (or opens): past it, the key
    /// is expired. ChaCha20-Poly1305's keys are limited by their packet count alone
    /// ([`REJECT_AFTER_PACKETS`]).
    pub const fn block_limit(self) -> u64 {
        match self {
            Cipher::ChaCha20Poly1305 => u64::MAX,
            Cipher::Aes256Gcm => AES_GCM_BLOCK_LIMIT,
        }
    }

    pub(crate) fn algorithm(self) -> &'static ring::aead::Algorithm {
        match self {
            Cipher::ChaCha20Poly1305 => &CHACHA20_POLY1305,
            Cipher::Aes256Gcm => &AES_256_GCM,
        }
    }
}

impl fmt::Display for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The ciphers one side can use: ChaCha20-Poly1305 always, AES-256-GCM where offered.
/// On the wire, one byte with bit [`Cipher::id`] set for each; bits of ciphers this
/// version does not know are ignored (a later version may offer more).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CipherSet {
    aes: bool,
}

impl CipherSet {
    /// ChaCha20-Poly1305 only.
    pub const CHACHA20_POLY1305: CipherSet = CipherSet { aes: false };
    /// Both ciphers.
    pub const ALL: CipherSet = CipherSet { aes: true };

    /// What this machine runs fast: AES-256-GCM too where AES and carry-less
    /// multiplication are instructions (x86-64: AES-NI and PCLMULQDQ; AArch64: AES and
    /// PMULL). Software AES is slower than ChaCha20-Poly1305, so it is not offered.
    pub fn this_machine() -> CipherSet {
        CipherSet {
            aes: hardware_aes(),
        }
    }

    /// Whether `cipher` is in the set.
    pub fn contains(self, cipher: Cipher) -> bool {
        match cipher {
            Cipher::ChaCha20Poly1305 => true,
            Cipher::Aes256Gcm => self.aes,
        }
    }

    /// The offer's byte.
    pub fn bits(self) -> u8 {
        let mut bits = 1 << Cipher::ChaCha20Poly1305.id();
        if self.aes {
            bits |= 1 << Cipher::Aes256Gcm.id();
        }
        bits
    }

    /// The set an offer's byte names; `None` if it lacks ChaCha20-Poly1305, which every
    /// side must offer.
    pub fn from_bits(bits: u8) -> Option<CipherSet> {
        (bits & (1 << Cipher::ChaCha20Poly1305.id()) != 0).then_some(CipherSet {
            aes: bits & (1 << Cipher::Aes256Gcm.id()) != 0,
        })
    }

    /// The gateway's choice for a client that offered `offered`: the fastest cipher
    /// both sets hold.
    pub fn choose(self, offered: CipherSet) -> Cipher {
        if self.aes && offered.aes {
            Cipher::Aes256Gcm
        } else {
            Cipher::ChaCha20Poly1305
        }
    }
}

fn hardware_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Why a cryptographic operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CryptoError {
    /// A key string is not 32 bytes of standard base64.
    #[error("not a key: expected 44 characters of base64 encoding 32 bytes")]
    BadKeyEncoding,
    /// The random source failed.
    #[error("the system random source failed: {0}")]
    Random(String),
    /// The Noise message did not decrypt or authenticate (wrong key, tampering, or not
    /// a handshake for us).
    #[error("handshake message did not authenticate")]
    HandshakeAuth,
    /// A handshake message of the wrong shape.
    #[error("malformed handshake: {0}")]
    Malformed(#[from] wire::WireError),
    /// Noise reported a state problem (a bug, reported rather than panicking).
    #[error("noise state error: {0}")]
    Noise(String),
}

fn noise_err(e: snow::Error) -> CryptoError {
    match e {
        snow::Error::Decrypt => CryptoError::HandshakeAuth,
        other => CryptoError::Noise(other.to_string()),
    }
}

/// An X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl FromStr for PublicKey {
    type Err = CryptoError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        decode_key(s).map(|k| PublicKey(*k))
    }
}

fn decode_key(s: &str) -> Result<Zeroizing<[u8; 32]>, CryptoError> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(s.trim())
            .map_err(|_| CryptoError::BadKeyEncoding)?,
    );
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| CryptoError::BadKeyEncoding)?;
    Ok(Zeroizing::new(key))
}

/// An X25519 static key pair. The private half is zeroized when dropped and never
/// printed. Clones share what the key's handshakes keep (see [`Keypair::with_peers`]).
#[derive(Clone)]
pub struct Keypair {
    /// The key (its private half, zeroized on drop, and its public half) and what its
    /// handshakes keep.
    local: Arc<LocalStatic>,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Keypair {{ public: {}, private: <hidden> }}",
            self.public()
        )
    }
}

impl Keypair {
    /// A new random key pair.
    pub fn generate() -> Result<Keypair, CryptoError> {
        let mut private = Zeroizing::new([0u8; 32]);
        getrandom::fill(private.as_mut()).map_err(|e| CryptoError::Random(e.to_string()))?;
        Ok(Keypair::from_private(private))
    }

    /// The key pair of a private key (clamped by X25519 as usual).
    pub fn from_private(private: Zeroizing<[u8; 32]>) -> Keypair {
        Keypair {
            local: Arc::new(LocalStatic::new(&private, [])),
        }
    }

    /// This key pair, keeping the static-static secret with each of `peers` (the
    /// gateway's authorized clients; the client's gateway) from the peer's first
    /// handshake on: Noise IK's `ss` is the same in every handshake between two static
    /// keys, and each one kept saves a Diffie-Hellman per handshake and rekey. At most
    /// one secret per peer; other peers' handshakes are computed in full.
    pub fn with_peers(self, peers: impl IntoIterator<Item = PublicKey>) -> Keypair {
        Keypair {
            local: Arc::new(LocalStatic::new(
                self.local.private(),
                peers.into_iter().map(|p| p.0),
            )),
        }
    }

    /// Parses a base64 private key, as `jvpn keygen` writes it.
    pub fn from_base64(s: &str) -> Result<Keypair, CryptoError> {
        decode_key(s).map(Keypair::from_private)
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.local.public())
    }

    /// The private half in base64, for writing a key file.
    pub fn private_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.local.private()))
    }

    /// A secret derived from the private key for another use, separated by `label`
    /// (BLAKE2s-256 keyed by the private key over the label): whoever holds the key,
    /// and only they, derive the same secret — every node of a cluster, which shares
    /// the gateway's key, gets the same TLS identity from it, and no second key file is
    /// needed.
    pub fn derive(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        use blake2::digest::{KeyInit, Mac};
        let mut mac = <blake2::Blake2sMac256 as KeyInit>::new_from_slice(self.local.private())
            .unwrap_or_else(|_| unreachable!("BLAKE2s takes a 32-byte key"));
        Mac::update(&mut mac, label);
        Zeroizing::new(mac.finalize().into_bytes().into())
    }
}

fn builder<'a>(prologue: &'a [u8], local: &Keypair) -> snow::Builder<'a> {
    // The parameter string is a constant that snow's own tests cover; parsing it cannot
    // fail, and if a future snow refused it every handshake would fail loudly.
    let params = NOISE_PARAMS
        .parse()
        .unwrap_or_else(|_| unreachable!("{NOISE_PARAMS} is a valid Noise protocol name"));
    snow::Builder::with_resolver(params, crate::x25519::resolver(&local.local))
        .prologue(prologue)
        .unwrap_or_else(|_| unreachable!())
}

/// The two directional keys a finished handshake yields (zeroized on drop).
pub struct DirectionalKeys {
    send: Zeroizing<[u8; 32]>,
    recv: Zeroizing<[u8; 32]>,
}

fn split(hs: &mut snow::HandshakeState, initiator: bool) -> DirectionalKeys {
    let (a, b) = hs.dangerously_get_raw_split();
    let (a, b) = (Zeroizing::new(a), Zeroizing::new(b));
    if initiator {
        DirectionalKeys { send: a, recv: b }
    } else {
        DirectionalKeys { send: b, recv: a }
    }
}

/// The client's side of a handshake in flight.
pub struct Initiation {
    state: snow::HandshakeState,
}

impl Initiation {
    /// Starts a handshake with the gateway whose static key is `gateway`; returns the
    /// state and the Noise message carrying `payload`.
    pub fn start(
        local: &Keypair,
        gateway: &PublicKey,
        prologue: &[u8],
        payload: &[u8],
    ) -> Result<(Initiation, Vec<u8>), CryptoError> {
        let mut state = builder(prologue, local)
            .local_private_key(local.local.private())
            .and_then(|b| b.remote_public_key(&gateway.0))
            .and_then(|b| b.build_initiator())
            .map_err(noise_err)?;
        let mut msg = vec![0u8; 32 + 48 + payload.len() + TAG_LEN];
        let n = state.write_message(payload, &mut msg).map_err(noise_err)?;
        msg.truncate(n);
        Ok((Initiation { state }, msg))
    }

    /// Reads the gateway's answer; returns its payload and the session keys.
    pub fn finish(mut self, noise: &[u8]) -> Result<(Vec<u8>, DirectionalKeys), CryptoError> {
        let mut payload = vec![0u8; noise.len()];
        let n = self
            .state
            .read_message(noise, &mut payload)
            .map_err(noise_err)?;
        payload.truncate(n);
        Ok((payload, split(&mut self.state, true)))
    }
}

/// The gateway's side of a handshake: the first message read, the answer not yet sent.
pub struct Response {
    state: snow::HandshakeState,
    client: PublicKey,
    payload: Vec<u8>,
}

impl Response {
    /// Reads a client's first message.
    pub fn read(local: &Keypair, prologue: &[u8], noise: &[u8]) -> Result<Response, CryptoError> {
        let mut state = builder(prologue, local)
            .local_private_key(local.local.private())
            .and_then(|b| b.build_responder())
            .map_err(noise_err)?;
        let mut payload = vec![0u8; noise.len()];
        let n = state.read_message(noise, &mut payload).map_err(noise_err)?;
        payload.truncate(n);
        let client = state
            .get_remote_static()
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .map(PublicKey)
            .ok_or(CryptoError::HandshakeAuth)?;
        Ok(Response {
            state,
            client,
            payload,
        })
    }

    /// The client's authenticated static key.
    pub fn client(&self) -> PublicKey {
        self.client
    }

    /// The client's authenticated payload.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// Writes the answer carrying `payload`; returns it and the session keys.
    pub fn finish(mut self, payload: &[u8]) -> Result<(Vec<u8>, DirectionalKeys), CryptoError> {
        let mut msg = vec![0u8; 32 + payload.len() + TAG_LEN];
        let n = self
            .state
            .write_message(payload, &mut msg)
            .map_err(noise_err)?;
        msg.truncate(n);
        Ok((msg, split(&mut self.state, false)))
    }
}

/// The prologue of a rekey of `session`.
pub fn rekey_prologue(session: SessionId) -> [u8; REKEY_PROLOGUE.len() + 8] {
    let mut p = [0u8; REKEY_PROLOGUE.len() + 8];
    p[..REKEY_PROLOGUE.len()].copy_from_slice(REKEY_PROLOGUE);
    p[REKEY_PROLOGUE.len()..].copy_from_slice(&session.0.to_be_bytes());
    p
}

/// Key lifetimes, from the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    /// Start a rekey after this long.
    pub rekey_after: Duration,
    /// Never use keys older than this.
    pub reject_after: Duration,
    /// Start a rekey after this many packets in either direction.
    pub rekey_after_packets: u64,
    /// Keep the previous keys for opening this long after a rotation.
    pub overlap: Duration,
    /// Width of each epoch's replay window.
    pub replay_window: u32,
}

impl KeyLimits {
    /// The limits a policy sets.
    pub fn from_policy(p: &crate::policy::Policy) -> Self {
        KeyLimits {
            rekey_after: p.rekey_after(),
            reject_after: p.reject_after(),
            rekey_after_packets: p.rekey_after_packets(),
            overlap: p.key_overlap(),
            replay_window: p.replay_window_size(),
        }
    }
}

/// The keys of one epoch.
struct EpochKeys {
    epoch: u32,
    /// The raw keys, zeroized on drop, and their names for the key objects kept for
    /// busy keys ([`keycache`]): kept here, ring's key object would add half a
    /// kilobyte per AES-256-GCM key to every idle session, and ring does not zeroize it.
    send: Zeroizing<[u8; 32]>,
    recv: Zeroizing<[u8; 32]>,
    send_id: KeyId,
    recv_id: KeyId,
    next_counter: u64,
    /// The first counter these keys may not send with: the end of this node's
    /// reservation in a cluster (spec/cluster.md), else never reached.
    send_limit: u64,
    received: u64,
    /// 16-byte blocks sealed and opened under these keys (see [`AES_GCM_BLOCK_LIMIT`]).
    sealed_blocks: u64,
    opened_blocks: u64,
    replay: ReplayWindow,
    created: Instant,
}

impl Drop for EpochKeys {
    /// The key objects kept for these keys on this thread go with them.
    fn drop(&mut self) {
        keycache::forget(self.send_id);
        keycache::forget(self.recv_id);
    }
}

impl EpochKeys {
    fn new(epoch: u32, keys: DirectionalKeys, limits: &KeyLimits, now: Instant) -> Self {
        EpochKeys {
            epoch,
            send: keys.send,
            recv: keys.recv,
            send_id: KeyId::fresh(),
            recv_id: KeyId::fresh(),
            next_counter: 0,
            send_limit: u64::MAX,
            received: 0,
            sealed_blocks: 0,
            opened_blocks: 0,
            replay: ReplayWindow::new(limits.replay_window),
            created: now,
        }
    }

    fn expired(&self, limits: &KeyLimits, cipher: Cipher, now: Instant) -> bool {
        now.saturating_duration_since(self.created) >= limits.reject_after
            || self.next_counter >= REJECT_AFTER_PACKETS
            || self.received >= REJECT_AFTER_PACKETS
            || self.sealed_blocks >= cipher.block_limit()
            || self.opened_blocks >= cipher.block_limit()
    }
}

/// The 16-byte blocks an AEAD operation on a body of `len` bytes counts for (the body's,
/// and one for the tag's counter block).
fn aead_blocks(len: usize) -> u64 {
    (len as u64).div_ceil(16) + 1
}

/// ring's key object for `bytes` under `cipher`.
pub(crate) fn aead_key(cipher: Cipher, bytes: &[u8; 32]) -> LessSafeKey {
    match UnboundKey::new(cipher.algorithm(), bytes) {
        Ok(key) => LessSafeKey::new(key),
        // ring refuses only a key of the wrong length; the type says 32 bytes, which
        // both ciphers take.
        Err(_) => unreachable!("a 32-byte {cipher} key"),
    }
}

pub(crate) fn nonce(counter: u64) -> Nonce {
    // Noise's ChaChaPoly nonce, for both ciphers: 32 zero bits, then the 64-bit counter,
    // little-endian.
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// The nonce of a standby node's probe answer (spec/cluster.md): four 0xFF bytes, then
/// the random number its header's counter field carries. A session packet's nonce
/// starts with four zero bytes, so the two never meet under one key.
pub(crate) fn standby_nonce(random: u64) -> Nonce {
    let mut n = [0xFFu8; 12];
    n[4..].copy_from_slice(&random.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Opens `sealed` (after a `header` of `HEADER_LEN` bytes in `aad`) with `key`.
pub(crate) fn open_with(
    (cipher, key): (Cipher, &[u8; 32]),
    nonce: Nonce,
    aad: &[u8],
    sealed: &mut [u8],
) -> Result<(), OpenError> {
    aead_key(cipher, key)
        .open_in_place(nonce, Aad::from(aad), sealed)
        .map(drop)
        .map_err(|_| OpenError::Auth)
}

/// Whether the session packet `packet` (its `header` parsed) opens under `key` at its
/// own counter; `packet` is opened in place when it does.
pub(crate) fn opens(key: (Cipher, &[u8; 32]), header: &SessionHeader, packet: &mut [u8]) -> bool {
    if packet.len() < wire::OVERHEAD {
        return false;
    }
    let (aad, sealed) = packet.split_at_mut(HEADER_LEN);
    open_with(key, nonce(header.counter), aad, sealed).is_ok()
}

/// Seals `body` (already after `header` in `out`) with `key`, appending the tag.
pub(crate) fn seal_with(
    (cipher, key): (Cipher, &[u8; 32]),
    nonce: Nonce,
    out: &mut Vec<u8>,
) -> Result<(), OpenError> {
    let (aad, body) = out.split_at_mut(HEADER_LEN);
    let tag = aead_key(cipher, key)
        .seal_in_place_separate_tag(nonce, Aad::from(&*aad), body)
        .map_err(|_| OpenError::Auth)?;
    out.extend_from_slice(tag.as_ref());
    Ok(())
}

/// Why a session packet could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SealError {
    /// The current keys are past their time or packet limit; a rekey must finish first.
    #[error("the session keys have expired")]
    KeysExpired,
    /// This node's reservation of counters is used up (a cluster node that has not
    /// renewed it, or no longer owns the session).
    #[error("the counters reserved for this node are used up")]
    Unreserved,
}

/// Why a session packet was not opened. Every case changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum OpenError {
    /// The header names another session than these keys belong to.
    #[error("packet of session {0} offered to another session's keys")]
    WrongSession(SessionId),
    /// No live keys of the header's epoch.
    #[error("no keys for epoch {0}")]
    UnknownEpoch(u8),
    /// The AEAD did not verify: wrong keys, wrong session, or tampering.
    #[error("packet did not authenticate")]
    Auth,
    /// The counter was seen before or is older than the window.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

/// What opening a packet did to the keys, for the caller to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEvent {
    /// Nothing changed.
    None,
    /// The packet was the first under keys installed by [`Channel::install_next`]: they
    /// became current (the peer has them), the old ones moved to the overlap.
    Rotated(Rotation),
}

/// A change of current keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The new current epoch.
    pub epoch: u32,
    /// An epoch whose overlap was cut short because a newer rotation displaced it.
    pub displaced: Option<u32>,
}

/// A session's keys: the current epoch, the previous one (opening only, for the overlap
/// after a rotation), and, on the responder of a rekey, the next one (opening only,
/// until the first packet under it confirms that the initiator has it).
pub struct Channel {
    session_id: SessionId,
    /// The AEAD of every epoch (a rekey changes the keys, not the cipher).
    cipher: Cipher,
    limits: KeyLimits,
    /// The send limit new epochs' keys start with: unlimited for a lone node; one block
    /// of counters in a cluster, until the node reserves more (spec/cluster.md).
    new_epoch_limit: u64,
    current: EpochKeys,
    /// Boxed: most of a session's life they are absent, and an idle session then
    /// carries two pointers instead of two sets of keys (measured per idle session in
    /// `--bench session_memory`).
    previous: Option<(Box<EpochKeys>, Instant)>,
    next: Option<Box<EpochKeys>>,
}

impl Channel {
    /// Puts new limits in force (a reloaded policy): the age and count limits apply to
    /// the keys in use from now on; a replay window's size applies from the next epoch.
    pub fn set_limits(&mut self, limits: KeyLimits) {
        self.limits = limits;
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Channel {{ session: {}, epoch: {}, keys: <hidden> }}",
            self.session_id, self.current.epoch
        )
    }
}

impl Channel {
    /// The channel of a new session, epoch 0, sealing with `cipher`.
    pub fn new(
        session_id: SessionId,
        (cipher, keys): (Cipher, DirectionalKeys),
        limits: KeyLimits,
        now: Instant,
    ) -> Self {
        Channel {
            session_id,
            cipher,
            current: EpochKeys::new(0, keys, &limits, now),
            limits,
            new_epoch_limit: u64::MAX,
            previous: None,
            next: None,
        }
    }

    /// The channel of a session taken over from another node (spec/cluster.md): its
    /// current keys from `secrets`, sending from counter `send_from` (above every
    /// counter another node reserved) up to `send_limit`, and accepting only counters
    /// above `recv_after` (the client's reattach request is the first it opens).
    pub fn adopt(
        session_id: SessionId,
        secrets: &crate::cluster::SessionSecrets,
        limits: KeyLimits,
        (send_from, send_limit): (u64, u64),
        recv_after: Option<u64>,
        created: Instant,
    ) -> Self {
        let keys = DirectionalKeys {
            send: secrets.send.clone(),
            recv: secrets.recv.clone(),
        };
        let mut current = EpochKeys::new(secrets.epoch, keys, &limits, created);
        current.next_counter = send_from;
        current.send_limit = send_limit;
        if let Some(floor) = recv_after {
            current.replay = ReplayWindow::seen_through(limits.replay_window, floor);
        }
        Channel {
            session_id,
            cipher: secrets.cipher,
            current,
            limits,
            new_epoch_limit: crate::cluster::COUNTER_BLOCK,
            previous: None,
            next: None,
        }
    }

    /// When the current keys were made.
    pub fn keys_created(&self) -> Instant {
        self.current.created
    }

    /// The highest counter accepted under the current keys.
    pub fn recv_highest(&self) -> Option<u64> {
        self.current.replay.highest()
    }

    /// The first counter the current keys may not send with.
    pub fn send_limit(&self) -> u64 {
        self.current.send_limit
    }

    /// The current keys, for sealing into the cluster's record of the session.
    pub fn secrets(&self) -> crate::cluster::SessionSecrets {
        crate::cluster::SessionSecrets {
            cipher: self.cipher,
            epoch: self.current.epoch,
            send: self.current.send.clone(),
            recv: self.current.recv.clone(),
        }
    }

    /// The counter the next packet under the current keys is sent with.
    pub fn next_send_counter(&self) -> u64 {
        self.current.next_counter
    }

    /// Sets the first counter the current keys may not send with (a cluster node's
    /// reservation). From then on the keys of every new epoch start limited to one
    /// block of counters, until the node reserves more for them.
    pub fn set_send_limit(&mut self, limit: u64) {
        self.current.send_limit = limit;
        self.new_epoch_limit = crate::cluster::COUNTER_BLOCK;
        if let Some(next) = self.next.as_mut() {
            next.send_limit = next.send_limit.min(crate::cluster::COUNTER_BLOCK);
        }
    }

    /// The session these keys belong to.
    pub fn session_id(&self) -> SessionId {
        self.session_id
    }

    /// The AEAD that seals the session's packets.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// The current epoch.
    pub fn epoch(&self) -> u32 {
        self.current.epoch
    }

    /// Whether the current keys are due for replacement (time or packets).
    pub fn needs_rekey(&self, now: Instant) -> bool {
        let k = &self.current;
        let rekey_after = self.limits.rekey_after_packets;
        let blocks_due = self.cipher.block_limit() / 2;
        now.saturating_duration_since(k.created) >= self.limits.rekey_after
            || k.next_counter >= rekey_after
            || k.received >= rekey_after
            || k.sealed_blocks >= blocks_due
            || k.opened_blocks >= blocks_due
    }

    /// Whether the current keys may no longer be used at all.
    pub fn expired(&self, now: Instant) -> bool {
        self.current.expired(&self.limits, self.cipher, now)
    }

    /// When the current keys are due for a rekey by time.
    pub fn rekey_deadline(&self) -> Instant {
        self.current.created + self.limits.rekey_after
    }

    /// When the current keys may no longer be used, by time.
    pub fn reject_deadline(&self) -> Instant {
        self.current.created + self.limits.reject_after
    }

    /// When the previous keys stop opening packets, if they still do.
    pub fn overlap_deadline(&self) -> Option<Instant> {
        self.previous.as_ref().map(|(_, until)| *until)
    }

    /// Seals `control` into `out` (cleared first) as one session packet under the
    /// current keys; returns its counter.
    pub fn seal(
        &mut self,
        control: &Control<'_>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<u64, SealError> {
        out.clear();
        self.seal_append(control, now, out)
    }

    /// Seals `control` as one session packet under the current keys, appended to `out`
    /// (so that a batch of packets is sealed into one buffer, in place); returns its
    /// counter. Nothing is appended if the keys are expired.
    pub fn seal_append(
        &mut self,
        control: &Control<'_>,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Result<u64, SealError> {
        if self.current.expired(&self.limits, self.cipher, now) {
            return Err(SealError::KeysExpired);
        }
        if self.current.next_counter >= self.current.send_limit {
            return Err(SealError::Unreserved);
        }
        let counter = self.current.next_counter;
        self.current.next_counter += 1;
        let header = SessionHeader {
            ptype: control.ptype(),
            key_epoch: self.current.epoch as u8,
            session_id: self.session_id,
            counter,
        }
        .encode();
        let start = out.len();
        out.extend_from_slice(&header);
        control.encode(out);
        let body = &mut out[start + HEADER_LEN..];
        let key = (self.cipher, self.current.send_id, &*self.current.send);
        let blocks = aead_blocks(body.len());
        match keycache::with_key(key, |k| {
            k.seal_in_place_separate_tag(nonce(counter), Aad::from(&header), body)
        }) {
            Ok(tag) => {
                self.current.sealed_blocks = self.current.sealed_blocks.saturating_add(blocks);
                out.extend_from_slice(tag.as_ref());
                Ok(counter)
            }
            // ring refuses only a payload too long for one nonce (256 GiB).
            Err(_) => {
                out.truncate(start);
                Err(SealError::KeysExpired)
            }
        }
    }

    /// Opens a session packet in place: `packet` is the whole datagram (header, sealed
    /// body, tag); on success its body holds the plaintext, `packet[HEADER_LEN..len -
    /// TAG_LEN]` (see [`plaintext`]). Picks the keys of the header's epoch, authenticates
    /// and decrypts, then checks and records the counter in the replay window.
    /// Authenticating first makes a [`OpenError::Replay`] mean "an authentic packet seen
    /// before", and a forged one is always [`OpenError::Auth`]; the keys and window
    /// change only if the packet authenticates and is new (the packet's bytes are
    /// unspecified after a failure).
    pub fn open_in_place(
        &mut self,
        header: &SessionHeader,
        packet: &mut [u8],
        now: Instant,
    ) -> Result<KeyEvent, OpenError> {
        if header.session_id != self.session_id {
            return Err(OpenError::WrongSession(header.session_id));
        }
        let (limits, cipher) = (self.limits, self.cipher);
        let epoch = header.key_epoch;
        let (keys, which) = if self.current.epoch as u8 == epoch {
            (&mut self.current, Which::Current)
        } else if let Some(next) = self.next.as_deref_mut().filter(|k| k.epoch as u8 == epoch) {
            (next, Which::Next)
        } else if let Some((prev, _)) = self
            .previous
            .as_mut()
            .filter(|(k, until)| k.epoch as u8 == epoch && now < *until)
        {
            (&mut **prev, Which::Previous)
        } else {
            return Err(OpenError::UnknownEpoch(epoch));
        };
        if keys.expired(&limits, cipher, now) {
            return Err(OpenError::UnknownEpoch(epoch));
        }
        if packet.len() < wire::OVERHEAD {
            return Err(OpenError::Auth);
        }
        let (aad, sealed) = packet.split_at_mut(HEADER_LEN);
        keycache::with_key((self.cipher, keys.recv_id, &keys.recv), |k| {
            k.open_in_place(nonce(header.counter), Aad::from(&*aad), sealed)
                .map(drop)
        })
        .map_err(|_| OpenError::Auth)?;
        keys.replay.commit(header.counter)?;
        keys.received += 1;
        keys.opened_blocks = keys
            .opened_blocks
            .saturating_add(aead_blocks(sealed.len().saturating_sub(TAG_LEN)));
        if which == Which::Next {
            return Ok(self.promote_next(now));
        }
        Ok(KeyEvent::None)
    }

    /// Opens a standby node's probe answer (see [`standby_nonce`]): under the keys of its
    /// epoch, outside the replay window (the answer names the probe it answers, which
    /// the caller matches to one outstanding).
    pub fn open_standby_in_place(
        &self,
        header: &SessionHeader,
        packet: &mut [u8],
        now: Instant,
    ) -> Result<(), OpenError> {
        if header.session_id != self.session_id {
            return Err(OpenError::WrongSession(header.session_id));
        }
        let epoch = header.key_epoch;
        let keys = [
            Some(&self.current),
            self.next.as_deref(),
            self.previous
                .as_ref()
                .filter(|(_, until)| now < *until)
                .map(|(k, _)| &**k),
        ]
        .into_iter()
        .flatten()
        .find(|k| k.epoch as u8 == epoch)
        .ok_or(OpenError::UnknownEpoch(epoch))?;
        if packet.len() < wire::OVERHEAD {
            return Err(OpenError::Auth);
        }
        let (aad, sealed) = packet.split_at_mut(HEADER_LEN);
        open_with(
            (self.cipher, &keys.recv),
            standby_nonce(header.counter),
            aad,
            sealed,
        )
    }

    /// Initiator of a rekey: the new keys become current at once (the responder already
    /// has them); the old ones open late packets for the overlap.
    pub fn rotate(&mut self, keys: DirectionalKeys, now: Instant) -> Rotation {
        let epoch = self.current.epoch.wrapping_add(1);
        let mut new = EpochKeys::new(epoch, keys, &self.limits, now);
        new.send_limit = self.new_epoch_limit;
        self.next = None;
        self.make_current(new, now)
    }

    fn make_current(&mut self, new: EpochKeys, now: Instant) -> Rotation {
        let epoch = new.epoch;
        let old = std::mem::replace(&mut self.current, new);
        let displaced = self
            .previous
            .replace((Box::new(old), now + self.limits.overlap))
            .map(|(k, _)| k.epoch);
        Rotation { epoch, displaced }
    }

    /// Responder of a rekey: the new keys open packets now and become current with the
    /// first packet the initiator seals under them.
    pub fn install_next(&mut self, keys: DirectionalKeys, now: Instant) -> u32 {
        let epoch = self.current.epoch.wrapping_add(1);
        let mut next = EpochKeys::new(epoch, keys, &self.limits, now);
        next.send_limit = self.new_epoch_limit;
        self.next = Some(Box::new(next));
        epoch
    }

    /// Drops the previous keys once their overlap has passed; returns their epoch.
    pub fn drop_expired(&mut self, now: Instant) -> Option<u32> {
        match &self.previous {
            Some((old, until)) if now >= *until => {
                let epoch = old.epoch;
                self.previous = None;
                Some(epoch)
            }
            _ => None,
        }
    }

    fn promote_next(&mut self, now: Instant) -> KeyEvent {
        match self.next.take() {
            Some(next) => KeyEvent::Rotated(self.make_current(*next, now)),
            None => KeyEvent::None,
        }
    }
}

/// The plaintext of a packet opened by [`Channel::open_in_place`].
pub fn plaintext(packet: &[u8]) -> &[u8] {
    packet
        .get(HEADER_LEN..packet.len().saturating_sub(TAG_LEN))
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Current,
    Next,
    Previous,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::wire::{parse, Datagram};

    fn limits() -> KeyLimits {
        KeyLimits::from_policy(&Policy::default())
    }

    fn handshake() -> (Keypair, Keypair, DirectionalKeys, DirectionalKeys) {
        let client = Keypair::generate().expect("keys");
        let gateway = Keypair::generate().expect("keys");
        let (init, msg1) =
            Initiation::start(&client, &gateway.public(), HANDSHAKE_PROLOGUE, b"hello")
                .expect("start");
        let resp = Response::read(&gateway, HANDSHAKE_PROLOGUE, &msg1).expect("read");
        assert_eq!(resp.client(), client.public());
        assert_eq!(resp.payload(), b"hello");
        let (msg2, gw_keys) = resp.finish(b"welcome").expect("finish");
        let (payload, cl_keys) = init.finish(&msg2).expect("finish");
        assert_eq!(payload, b"welcome");
        (client, gateway, cl_keys, gw_keys)
    }

    #[test]
    fn a_clustered_channel_limits_every_new_epoch_to_one_block_until_reserved() {
        let (_, gw) = pair();
        let mut gw = gw;
        let now = Instant::now();
        assert_eq!(gw.send_limit(), u64::MAX, "a lone node is unlimited");
        gw.set_send_limit(10);
        assert_eq!(gw.send_limit(), 10);
        let (_, _, _, keys) = handshake();
        gw.install_next(keys, now);
        let (_, _, _, keys) = handshake();
        gw.rotate(keys, now);
        assert_eq!(
            gw.send_limit(),
            crate::cluster::COUNTER_BLOCK,
            "a new epoch starts within one block"
        );
        assert_eq!(gw.next_send_counter(), 0);
    }

    fn pair() -> (Channel, Channel) {
        pair_with(Cipher::ChaCha20Poly1305)
    }

    fn pair_with(cipher: Cipher) -> (Channel, Channel) {
        let (_, _, c, g) = handshake();
        let now = Instant::now();
        (
            Channel::new(SessionId(7), (cipher, c), limits(), now),
            Channel::new(SessionId(7), (cipher, g), limits(), now),
        )
    }

    #[test]
    fn each_cipher_seals_and_opens_and_opens_nothing_sealed_by_the_other() {
        for cipher in [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm] {
            let (mut c, mut g) = pair_with(cipher);
            assert_eq!(c.cipher(), cipher);
            let packet = [0x45u8; 1_400];
            let opened = deliver(&mut c, &mut g, &Control::Data(&packet)).expect("opens");
            assert_eq!(opened, packet);
            // The same keys under the other cipher: the packet does not authenticate.
            let other = match cipher {
                Cipher::ChaCha20Poly1305 => Cipher::Aes256Gcm,
                Cipher::Aes256Gcm => Cipher::ChaCha20Poly1305,
            };
            let mut bytes = sealed(&mut c, &Control::Data(b"x"), Instant::now());
            let Ok(wire::Datagram::Session { header, .. }) = wire::parse(&bytes) else {
                panic!("parse");
            };
            let secrets = g.secrets();
            assert!(!opens((other, &secrets.recv), &header, &mut bytes.clone()));
            assert!(opens((cipher, &secrets.recv), &header, &mut bytes));
        }
    }

    /// An AES-256-GCM key is due for a rekey at half its block limit and seals nothing
    /// once it is reached, counted both ways; a ChaCha20-Poly1305 key with the same
    /// blocks behind it goes on. The blocks are counted from what was sealed and opened.
    #[test]
    fn an_aes_key_expires_at_its_block_limit() {
        let now = Instant::now();
        for (cipher, expires) in [(Cipher::Aes256Gcm, true), (Cipher::ChaCha20Poly1305, false)] {
            let (mut c, mut g) = pair_with(cipher);
            deliver(&mut c, &mut g, &Control::Data(&[0; 100])).expect("opens");
            // 100 bytes: 7 blocks, and the tag's.
            assert_eq!(c.current.sealed_blocks, g.current.opened_blocks);
            assert!(c.current.sealed_blocks >= 8);
            assert!(!c.needs_rekey(now) && !g.needs_rekey(now));
            c.current.sealed_blocks = AES_GCM_BLOCK_LIMIT / 2;
            g.current.opened_blocks = AES_GCM_BLOCK_LIMIT / 2;
            assert_eq!(c.needs_rekey(now), expires, "{cipher} sealing");
            assert_eq!(g.needs_rekey(now), expires, "{cipher} opening");
            assert!(deliver(&mut c, &mut g, &Control::Data(b"x")).is_ok());
            c.current.sealed_blocks = AES_GCM_BLOCK_LIMIT;
            let mut out = Vec::new();
            assert_eq!(
                c.seal(&Control::Data(b"y"), now, &mut out).is_err(),
                expires,
                "{cipher}"
            );
            assert_eq!(c.expired(now), expires, "{cipher}");
        }
    }

    #[test]
    fn the_gateway_picks_aes_only_when_both_sides_offer_it_and_offers_round_trip() {
        use CipherSet as S;
        assert_eq!(S::ALL.choose(S::ALL), Cipher::Aes256Gcm);
        assert_eq!(
            S::ALL.choose(S::CHACHA20_POLY1305),
            Cipher::ChaCha20Poly1305
        );
        assert_eq!(
            S::CHACHA20_POLY1305.choose(S::ALL),
            Cipher::ChaCha20Poly1305
        );
        for set in [S::ALL, S::CHACHA20_POLY1305] {
            assert_eq!(S::from_bits(set.bits()), Some(set));
            assert!(set.contains(Cipher::ChaCha20Poly1305));
        }
        assert!(!S::CHACHA20_POLY1305.contains(Cipher::Aes256Gcm));
        assert_eq!(S::from_bits(0b10), None, "ChaCha20-Poly1305 is mandatory");
        for cipher in [Cipher::ChaCha20Poly1305, Cipher::Aes256Gcm] {
            assert_eq!(Cipher::from_id(cipher.id()), Some(cipher));
        }
        assert_eq!(Cipher::from_id(2), None);
    }

    fn deliver(
        from: &mut Channel,
        to: &mut Channel,
        c: &Control<'_>,
    ) -> Result<Vec<u8>, OpenError> {
        let now = Instant::now();
        let bytes = sealed(from, c, now);
        open_bytes(to, &bytes, now).map(|(_, plain)| plain)
    }

    /// Seals `control` under `from`'s current keys.
    fn sealed(from: &mut Channel, control: &Control<'_>, now: Instant) -> Vec<u8> {
        let mut bytes = Vec::new();
        from.seal(control, now, &mut bytes).expect("seal");
        bytes
    }

    /// Parses and opens `bytes` with `to`; returns the plaintext.
    fn open_bytes(
        to: &mut Channel,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(KeyEvent, Vec<u8>), OpenError> {
        let Ok(Datagram::Session { header, .. }) = parse(bytes) else {
            panic!("not a session packet");
        };
        let mut packet = bytes.to_vec();
        let event = to.open_in_place(&header, &mut packet, now)?;
        Ok((event, plaintext(&packet).to_vec()))
    }

    #[test]
    fn keys_round_trip_through_base64() {
        let k = Keypair::generate().expect("keys");
        let again = Keypair::from_base64(&k.private_base64()).expect("parse");
        assert_eq!(again.public(), k.public());
        assert_eq!(k.public().to_string().parse::<PublicKey>(), Ok(k.public()));
        assert_eq!(
            "not a key".parse::<PublicKey>(),
            Err(CryptoError::BadKeyEncoding)
        );
        assert!(!format!("{k:?}").contains(k.private_base64().as_str()));
    }

    #[test]
    fn a_wrong_pinned_gateway_key_fails_the_handshake() {
        let client = Keypair::generate().expect("keys");
        let gateway = Keypair::generate().expect("keys");
        let impostor = Keypair::generate().expect("keys");
        let (_, msg1) =
            Initiation::start(&client, &gateway.public(), HANDSHAKE_PROLOGUE, b"").expect("start");
        assert_eq!(
            Response::read(&impostor, HANDSHAKE_PROLOGUE, &msg1).err(),
            Some(CryptoError::HandshakeAuth)
        );
        assert_eq!(
            Response::read(&gateway, b"other prologue", &msg1).err(),
            Some(CryptoError::HandshakeAuth)
        );
    }

    #[test]
    fn data_flows_both_ways_and_replays_are_refused() {
        let (mut c, mut g) = pair();
        let data = Control::Data(b"ip packet");
        assert_eq!(deliver(&mut c, &mut g, &data).expect("open"), b"ip packet");
        assert_eq!(deliver(&mut g, &mut c, &data).expect("open"), b"ip packet");

        let now = Instant::now();
        let bytes = sealed(&mut c, &Control::Heartbeat { seq: 1 }, now);
        open_bytes(&mut g, &bytes, now).expect("first");
        let counter = u64::from_be_bytes(bytes[12..20].try_into().expect("8 bytes"));
        assert_eq!(
            open_bytes(&mut g, &bytes, now),
            Err(OpenError::Replay(ReplayError::Duplicate(counter)))
        );
    }

    /// One packet of every session type, with plausible contents.
    fn every_session_control() -> Vec<Control<'static>> {
        use crate::ids::{Protocol, StateVersion, TransportId};
        use crate::reason::ReasonCode;
        use crate::wire::{ReattachRequest, NOISE_REKEY_INIT_LEN, NOISE_REKEY_RESP_LEN};
        static INIT: [u8; NOISE_REKEY_INIT_LEN] = [3; NOISE_REKEY_INIT_LEN];
        static RESP: [u8; NOISE_REKEY_RESP_LEN] = [4; NOISE_REKEY_RESP_LEN];
        vec![
            Control::Data(b"an ip packet"),
            Control::Heartbeat { seq: 1 },
            Control::HeartbeatAck {
                seq: 1,
                binding_version: StateVersion(1),
            },
            Control::Probe { seq: 2 },
            Control::ProbeAck { seq: 2 },
            Control::ReattachRequest(ReattachRequest {
                timestamp_ms: 1,
                expected_version: StateVersion(1),
                transport_id: TransportId(2),
                protocol: Protocol::Udp,
                cause: ReasonCode::TransportDead,
            }),
            Control::ReattachAck {
                request_counter: 5,
                binding_version: StateVersion(4),
            },
            Control::ReattachDeny {
                request_counter: 5,
                reason: ReasonCode::PolicyDenied,
                binding_version: StateVersion(1),
            },
            Control::Terminate {
                reason: ReasonCode::OperatorTerminated,
            },
            Control::RekeyInit(&INIT),
            Control::RekeyResp(&RESP),
            Control::PathChallenge { token: 0x1234 },
            Control::PathResponse { token: 0x1234 },
        ]
    }

    #[test]
    fn every_tampered_byte_of_every_session_packet_is_refused_and_changes_nothing() {
        let (mut c, mut g) = pair();
        let now = Instant::now();
        for control in every_session_control() {
            let mut bytes = Vec::new();
            c.seal(&control, now, &mut bytes).expect("seal");
            for i in 0..bytes.len() {
                for bit in [0x01, 0x80] {
                    let mut bad = bytes.clone();
                    bad[i] ^= bit;
                    let result = match parse(&bad) {
                        Ok(Datagram::Session { header, .. }) => {
                            g.open_in_place(&header, &mut bad.clone(), now).map(|_| ())
                        }
                        _ => continue, // refused by the clear-text checks already
                    };
                    assert!(result.is_err(), "{control:?}: byte {i} ^ {bit:#x} accepted");
                }
            }
            // The untouched packet still opens: no refusal advanced the replay window.
            let (_, plain) = open_bytes(&mut g, &bytes, now).expect("original opens");
            assert_eq!(Control::decode(control.ptype(), &plain), Ok(control));
        }
    }

    #[test]
    fn every_tampered_byte_of_a_handshake_is_refused() {
        let client = Keypair::generate().expect("keys");
        let gateway = Keypair::generate().expect("keys");
        let (_, msg1) = Initiation::start(&client, &gateway.public(), HANDSHAKE_PROLOGUE, b"ts")
            .expect("start");
        for i in 0..msg1.len() {
            let mut bad = msg1.clone();
            bad[i] ^= 0x01;
            assert!(
                Response::read(&gateway, HANDSHAKE_PROLOGUE, &bad).is_err(),
                "msg1 byte {i}"
            );
        }
        for i in 0..(32 + 7 + TAG_LEN) {
            let (init, msg1) =
                Initiation::start(&client, &gateway.public(), HANDSHAKE_PROLOGUE, b"ts")
                    .expect("start");
            let resp = Response::read(&gateway, HANDSHAKE_PROLOGUE, &msg1).expect("read");
            let (mut msg2, _) = resp.finish(b"welcome").expect("finish");
            msg2[i] ^= 0x01;
            assert!(init.finish(&msg2).is_err(), "msg2 byte {i}");
        }
    }

    #[test]
    fn a_packet_of_another_session_does_not_open() {
        let (_, _, c, g) = handshake();
        let now = Instant::now();
        let mut c = Channel::new(SessionId(1), (Cipher::ChaCha20Poly1305, c), limits(), now);
        let mut g = Channel::new(SessionId(2), (Cipher::ChaCha20Poly1305, g), limits(), now);
        assert_eq!(
            deliver(&mut c, &mut g, &Control::Data(b"x")),
            Err(OpenError::WrongSession(SessionId(1)))
        );
    }

    #[test]
    fn rekey_rotates_keys_without_losing_packets_in_flight() {
        let (client, gateway, c, g) = handshake();
        let now = Instant::now();
        let mut c = Channel::new(SessionId(9), (Cipher::Aes256Gcm, c), limits(), now);
        let mut g = Channel::new(SessionId(9), (Cipher::Aes256Gcm, g), limits(), now);
        // A packet sealed under epoch 0 and delivered late, after the rotation.
        let late = sealed(&mut c, &Control::Data(b"late"), now);

        let prologue = rekey_prologue(SessionId(9));
        let (init, msg1) =
            Initiation::start(&client, &gateway.public(), &prologue, b"").expect("start");
        let resp = Response::read(&gateway, &prologue, &msg1).expect("read");
        let (msg2, g_next) = resp.finish(b"").expect("finish");
        assert_eq!(g.install_next(g_next, now), 1);
        let (_, c_next) = init.finish(&msg2).expect("finish");
        assert_eq!(c.rotate(c_next, now).epoch, 1);

        // The gateway still seals under epoch 0 until the client's first epoch-1 packet.
        assert_eq!(
            deliver(&mut g, &mut c, &Control::Data(b"old")).expect("open"),
            b"old"
        );
        let bytes = sealed(&mut c, &Control::Data(b"new"), now);
        assert_eq!(bytes[1], 1, "sealed under epoch 1");
        let rotated = Rotation {
            epoch: 1,
            displaced: None,
        };
        assert_eq!(
            open_bytes(&mut g, &bytes, now),
            Ok((KeyEvent::Rotated(rotated), b"new".to_vec()))
        );
        assert_eq!(g.epoch(), 1);
        assert_eq!(
            open_bytes(&mut g, &late, now),
            Ok((KeyEvent::None, b"late".to_vec()))
        );
        // After the overlap the old epoch is gone.
        let after = now + limits().overlap;
        assert_eq!(g.drop_expired(after), Some(0));
        assert_eq!(
            deliver(&mut g, &mut c, &Control::Data(b"e1")).expect("open"),
            b"e1"
        );
    }

    #[test]
    fn keys_past_their_limits_seal_nothing() {
        let (mut c, _) = pair();
        let later = Instant::now() + limits().reject_after;
        let mut out = Vec::new();
        assert_eq!(
            c.seal(&Control::Data(b"x"), later, &mut out),
            Err(SealError::KeysExpired)
        );
        assert!(c.needs_rekey(later));
    }
}
