//! Every packet on the wire: layout, encoding and decoding (spec/wire-format.md).
//!
//! Decoding borrows from the datagram and never allocates in proportion to anything an
//! attacker controls; any byte string decodes to a value or a [`WireError`], never a
//! panic (fuzzed in fuzz/). Integers are big-endian.
//!
//! Two layers: [`parse`] classifies a datagram by its clear-text header (handshake
//! messages, session packets, the unknown-session hint); the plaintext of an
//! authenticated session packet is then decoded with [`Control::decode`] by its type.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

use crate::crypto::{Cipher, CipherSet};
use crate::ids::{Protocol, SessionId, StateVersion, TransportId};
use crate::reason::ReasonCode;

/// Length of the clear-text header of a session packet (the AEAD's associated data).
pub const HEADER_LEN: usize = 20;
/// Length of the AEAD tag.
pub const TAG_LEN: usize = 16;
/// Bytes a session packet adds to its payload: header + tag.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Length of the clear-text prefix of a handshake message.
pub const HANDSHAKE_PREFIX_LEN: usize = 8;
/// Length of the handshake initiation's plaintext payload.
pub const INIT_PAYLOAD_LEN: usize = 18;
/// Length of the handshake response's plaintext payload.
pub const RESP_PAYLOAD_LEN: usize = 40;
/// Noise IK first message: e, s (+tag), payload (+tag).
pub const NOISE_INIT_LEN: usize = 32 + 48 + INIT_PAYLOAD_LEN + TAG_LEN;
/// Noise IK second message: e, payload (+tag).
pub const NOISE_RESP_LEN: usize = 32 + RESP_PAYLOAD_LEN + TAG_LEN;
/// Noise IK first message of a rekey (payload: none).
pub const NOISE_REKEY_INIT_LEN: usize = 32 + 48 + TAG_LEN;
/// Noise IK second message of a rekey (payload: none).
pub const NOISE_REKEY_RESP_LEN: usize = 32 + TAG_LEN;
/// Length of each of the two MACs that close a handshake initiation ([`crate::mac`]).
pub const MAC_LEN: usize = 16;
/// Length of a handshake initiation: prefix, Noise message, mac1, mac2.
pub const INITIATION_LEN: usize = HANDSHAKE_PREFIX_LEN + NOISE_INIT_LEN + 2 * MAC_LEN;
/// Length of a cookie reply's nonce.
pub const COOKIE_NONCE_LEN: usize = 12;
/// Length of a cookie reply: prefix, nonce, sealed cookie (smaller than the initiation
/// it answers, so that it amplifies nothing).
pub const COOKIE_REPLY_LEN: usize = HANDSHAKE_PREFIX_LEN + COOKIE_NONCE_LEN + MAC_LEN + TAG_LEN;
/// Length of a SessionUnknown hint.
pub const SESSION_UNKNOWN_LEN: usize = 12;
/// The largest datagram any transport carries (and so the largest this code decodes).
pub const MAX_DATAGRAM: usize = 65_535;

/// The largest tunnel packet a datagram of `datagram` bytes carries: less the session
/// packet's header and tag.
pub fn room_of(datagram: u16) -> usize {
    usize::from(datagram).saturating_sub(OVERHEAD)
}

/// The first byte of every packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PacketType {
    /// Noise IK message 1 (client → gateway).
    HandshakeInit = 1,
    /// Noise IK message 2 (gateway → client).
    HandshakeResp = 2,
    /// A tunnelled IP packet.
    Data = 3,
    /// Liveness on the active transport.
    Heartbeat = 4,
    /// Answer to a heartbeat.
    HeartbeatAck = 5,
    /// Liveness on a standby candidate.
    Probe = 6,
    /// Answer to a probe.
    ProbeAck = 7,
    /// Bind the transport this arrives on.
    ReattachRequest = 8,
    /// The reattach was accepted.
    ReattachAck = 9,
    /// The reattach was refused.
    ReattachDeny = 10,
    /// The sender ended the session.
    Terminate = 11,
    /// Noise IK message 1 for new session keys.
    RekeyInit = 12,
    /// Noise IK message 2 for new session keys.
    RekeyResp = 13,
    /// Clear-text hint: the gateway has no such session.
    SessionUnknown = 14,
    /// The gateway asks the client to prove it is reached on this transport.
    PathChallenge = 15,
    /// The client's answer, sent back on the same transport.
    PathResponse = 16,
    /// The gateway, under load, answers an initiation with a cookie instead of a
    /// handshake.
    CookieReply = 17,
    /// Answer to a probe from a node of the gateway's cluster that does not own the
    /// session (spec/cluster.md): sealed under the session's keys with a nonce of its
    /// own (the counter field carries a random number), outside the replay window.
    StandbyProbeAck = 18,
    /// The client asks whether its path carries datagrams of this one's size
    /// (`core::pmtu`): padded to the size tried.
    SizeProbe = 19,
    /// The answer to a size probe, padded to the size of the probe received.
    SizeProbeAck = 20,
}

impl PacketType {
    /// The type with this first byte.
    pub fn from_byte(b: u8) -> Result<PacketType, WireError> {
        use PacketType as P;
        Ok(match b {
            1 => P::HandshakeInit,
            2 => P::HandshakeResp,
            3 => P::Data,
            4 => P::Heartbeat,
            5 => P::HeartbeatAck,
            6 => P::Probe,
            7 => P::ProbeAck,
            8 => P::ReattachRequest,
            9 => P::ReattachAck,
            10 => P::ReattachDeny,
            11 => P::Terminate,
            12 => P::RekeyInit,
            13 => P::RekeyResp,
            14 => P::SessionUnknown,
            15 => P::PathChallenge,
            16 => P::PathResponse,
            17 => P::CookieReply,
            18 => P::StandbyProbeAck,
            19 => P::SizeProbe,
            20 => P::SizeProbeAck,
            other => return Err(WireError::UnknownType(other)),
        })
    }

    /// The stable lowercase name, for metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        use PacketType as P;
        match self {
            P::HandshakeInit => "handshake_init",
            P::HandshakeResp => "handshake_resp",
            P::Data => "data",
            P::Heartbeat => "heartbeat",
            P::HeartbeatAck => "heartbeat_ack",
            P::Probe => "probe",
            P::ProbeAck => "probe_ack",
            P::ReattachRequest => "reattach_request",
            P::ReattachAck => "reattach_ack",
            P::ReattachDeny => "reattach_deny",
            P::Terminate => "terminate",
            P::RekeyInit => "rekey_init",
            P::RekeyResp => "rekey_resp",
            P::SessionUnknown => "session_unknown",
            P::PathChallenge => "path_challenge",
            P::PathResponse => "path_response",
            P::CookieReply => "cookie_reply",
            P::StandbyProbeAck => "standby_probe_ack",
            P::SizeProbe => "size_probe",
            P::SizeProbeAck => "size_probe_ack",
        }
    }
}

/// Why a byte string is not a valid packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// Shorter than its type requires.
    #[error("{what}: {got} bytes, at least {need} required")]
    TooShort {
        /// What was being decoded.
        what: &'static str,
        /// Bytes required.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// A fixed-size packet or payload of the wrong length.
    #[error("{what}: {got} bytes, exactly {expected} required")]
    BadLength {
        /// What was being decoded.
        what: &'static str,
        /// Bytes required.
        expected: usize,
        /// Bytes present.
        got: usize,
    },
    /// Larger than any transport carries.
    #[error("datagram of {0} bytes exceeds the maximum of 65535")]
    TooLong(usize),
    /// The first byte names no packet type.
    #[error("unknown packet type {0}")]
    UnknownType(u8),
    /// A packet type that cannot appear where it did (e.g. a handshake type as a session
    /// packet's plaintext).
    #[error("packet type {0:?} is not valid here")]
    UnexpectedType(PacketType),
    /// Reserved bytes must be zero.
    #[error("reserved bytes are not zero")]
    NonZeroReserved,
    /// A reason byte that names no reason code.
    #[error("unknown reason code id {0}")]
    UnknownReason(u8),
    /// A protocol byte that names no protocol.
    #[error("unknown protocol id {0}")]
    UnknownProtocol(u8),
    /// An address family byte other than 4 or 6.
    #[error("unknown address family {0}")]
    UnknownFamily(u8),
    /// A prefix length longer than the address.
    #[error("prefix length {0} is too long for the address")]
    BadPrefix(u8),
    /// A cipher offer without ChaCha20-Poly1305, which every side must offer.
    #[error("cipher offer {0:#04x} lacks ChaCha20-Poly1305 (bit 0), which is mandatory")]
    NoMandatoryCipher(u8),
    /// A cipher byte that names no cipher.
    #[error("unknown cipher id {0}")]
    UnknownCipher(u8),
}

/// Reads fixed-size big-endian fields from a slice, failing instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn exact(bytes: &'a [u8], expected: usize, what: &'static str) -> Result<Self, WireError> {
        if bytes.len() != expected {
            return Err(WireError::BadLength {
                what,
                expected,
                got: bytes.len(),
            });
        }
        Ok(Reader { bytes, what })
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let Some((head, rest)) = self.bytes.split_first_chunk::<N>() else {
            return Err(WireError::TooShort {
                what: self.what,
                need: N,
                got: self.bytes.len(),
            });
        };
        self.bytes = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.take()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.take()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.take()?))
    }

    fn reason(&mut self) -> Result<ReasonCode, WireError> {
        let id = self.u8()?;
        ReasonCode::from_wire_id(id).ok_or(WireError::UnknownReason(id))
    }

    fn protocol(&mut self) -> Result<Protocol, WireError> {
        match self.u8()? {
            1 => Ok(Protocol::Udp),
            2 => Ok(Protocol::Quic),
            3 => Ok(Protocol::Tcp),
            other => Err(WireError::UnknownProtocol(other)),
        }
    }
}

fn protocol_id(p: Protocol) -> u8 {
    match p {
        Protocol::Udp => 1,
        Protocol::Quic => 2,
        Protocol::Tcp => 3,
    }
}

/// The clear-text header of every session packet; authenticated as associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionHeader {
    /// What the plaintext is.
    pub ptype: PacketType,
    /// The low byte of the key epoch that sealed it.
    pub key_epoch: u8,
    /// The session.
    pub session_id: SessionId,
    /// The sender's counter for this epoch: the AEAD nonce and the replay-window index.
    pub counter: u64,
}

impl SessionHeader {
    /// The 20 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0] = self.ptype as u8;
        out[1] = self.key_epoch;
        out[4..12].copy_from_slice(&self.session_id.0.to_be_bytes());
        out[12..20].copy_from_slice(&self.counter.to_be_bytes());
        out
    }
}

/// A datagram classified by its clear-text part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// A handshake initiation.
    HandshakeInit {
        /// Chosen by the client, echoed in the response.
        sender_index: u32,
        /// The Noise message.
        noise: &'a [u8],
        /// Its two MACs, checked before anything else.
        macs: InitMacs<'a>,
    },
    /// A cookie for the initiation whose sender index this is.
    CookieReply {
        /// The initiation's sender index.
        receiver_index: u32,
        /// The nonce the cookie is sealed under.
        nonce: [u8; COOKIE_NONCE_LEN],
        /// The sealed cookie.
        sealed: &'a crate::mac::SealedCookie,
    },
    /// A handshake response.
    HandshakeResp {
        /// The initiation's sender_index.
        receiver_index: u32,
        /// The Noise message.
        noise: &'a [u8],
    },
    /// An authenticated session packet, still sealed.
    Session {
        /// The header (authenticated with the body).
        header: SessionHeader,
        /// The header bytes as received: the associated data.
        aad: &'a [u8; HEADER_LEN],
        /// Ciphertext and tag.
        sealed: &'a [u8],
    },
    /// The gateway's clear-text hint that it has no such session.
    SessionUnknown {
        /// The session it does not know.
        session_id: SessionId,
    },
}

/// The MACs closing an initiation, with what each covers ([`crate::mac`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitMacs<'a> {
    /// The initiation up to mac1.
    pub mac1_covered: &'a [u8],
    /// Keyed by the gateway's public key.
    pub mac1: &'a [u8; MAC_LEN],
    /// The initiation up to mac2 (mac1 included).
    pub mac2_covered: &'a [u8],
    /// Keyed by a cookie of the gateway's, or zero.
    pub mac2: &'a [u8; MAC_LEN],
}

/// Classifies a datagram by its clear-text part; the body of a session packet is not
/// authenticated yet.
pub fn parse(datagram: &[u8]) -> Result<Datagram<'_>, WireError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(WireError::TooLong(datagram.len()));
    }
    let Some(&first) = datagram.first() else {
        return Err(WireError::TooShort {
            what: "packet",
            need: 1,
            got: 0,
        });
    };
    let ptype = PacketType::from_byte(first)?;
    match ptype {
        PacketType::HandshakeInit | PacketType::HandshakeResp => {
            let (expected, what) = if ptype == PacketType::HandshakeInit {
                (INITIATION_LEN, "handshake initiation")
            } else {
                (HANDSHAKE_PREFIX_LEN + NOISE_RESP_LEN, "handshake response")
            };
            let mut r = Reader::exact(datagram, expected, what)?;
            let _type = r.u8()?;
            if r.take::<3>()? != [0; 3] {
                return Err(WireError::NonZeroReserved);
            }
            let index = r.u32()?;
            let noise = r.bytes;
            Ok(if ptype == PacketType::HandshakeInit {
                let short = || WireError::TooShort {
                    what,
                    need: INITIATION_LEN,
                    got: datagram.len(),
                };
                let (mac2_covered, mac2) =
                    datagram.split_last_chunk::<MAC_LEN>().ok_or_else(short)?;
                let (mac1_covered, mac1) = mac2_covered
                    .split_last_chunk::<MAC_LEN>()
                    .ok_or_else(short)?;
                Datagram::HandshakeInit {
                    sender_index: index,
                    noise: noise.get(..NOISE_INIT_LEN).ok_or_else(short)?,
                    macs: InitMacs {
                        mac1_covered,
                        mac1,
                        mac2_covered,
                        mac2,
                    },
                }
            } else {
                Datagram::HandshakeResp {
                    receiver_index: index,
                    noise,
                }
            })
        }
        PacketType::CookieReply => {
            let mut r = Reader::exact(datagram, COOKIE_REPLY_LEN, "cookie reply")?;
            let _type = r.u8()?;
            if r.take::<3>()? != [0; 3] {
                return Err(WireError::NonZeroReserved);
            }
            let receiver_index = r.u32()?;
            let nonce = r.take()?;
            let sealed = datagram
                .get(HANDSHAKE_PREFIX_LEN + COOKIE_NONCE_LEN..)
                .and_then(|b| b.try_into().ok())
                .ok_or(WireError::TooShort {
                    what: "cookie reply",
                    need: COOKIE_REPLY_LEN,
                    got: datagram.len(),
                })?;
            Ok(Datagram::CookieReply {
                receiver_index,
                nonce,
                sealed,
            })
        }
        PacketType::SessionUnknown => {
            let mut r = Reader::exact(datagram, SESSION_UNKNOWN_LEN, "session-unknown hint")?;
            let _type = r.u8()?;
            if r.take::<3>()? != [0; 3] {
                return Err(WireError::NonZeroReserved);
            }
            Ok(Datagram::SessionUnknown {
                session_id: SessionId(r.u64()?),
            })
        }
        _ => {
            let Some((aad, sealed)) = datagram.split_first_chunk::<HEADER_LEN>() else {
                return Err(WireError::TooShort {
                    what: "session packet",
                    need: OVERHEAD,
                    got: datagram.len(),
                });
            };
            if sealed.len() < TAG_LEN {
                return Err(WireError::TooShort {
                    what: "session packet",
                    need: OVERHEAD,
                    got: datagram.len(),
                });
            }
            if aad[2..4] != [0, 0] {
                return Err(WireError::NonZeroReserved);
            }
            let mut r = Reader {
                bytes: &aad[4..],
                what: "session header",
            };
            let header = SessionHeader {
                ptype,
                key_epoch: aad[1],
                session_id: SessionId(r.u64()?),
                counter: r.u64()?,
            };
            Ok(Datagram::Session {
                header,
                aad,
                sealed,
            })
        }
    }
}

/// Encodes a handshake response: type, reserved, index, Noise message.
pub fn encode_handshake(ptype: PacketType, index: u32, noise: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.push(ptype as u8);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(noise);
}

/// Encodes a handshake initiation: type, reserved, index, Noise message, mac1 over all
/// of it under the gateway's `mac_key`, and mac2 over all that under `cookie` (zero
/// without one).
pub fn encode_initiation(
    index: u32,
    noise: &[u8],
    mac_key: &crate::mac::MacKey,
    cookie: Option<&crate::mac::Cookie>,
    out: &mut Vec<u8>,
) {
    encode_handshake(PacketType::HandshakeInit, index, noise, out);
    let mac1 = mac_key.mac(out);
    out.extend_from_slice(&mac1);
    let mac2 = cookie.map_or([0; MAC_LEN], |c| crate::mac::cookie_mac(c, out));
    out.extend_from_slice(&mac2);
}

/// Encodes a cookie reply to the initiation whose sender index is `receiver_index`.
pub fn encode_cookie_reply(
    receiver_index: u32,
    nonce: [u8; COOKIE_NONCE_LEN],
    sealed: &crate::mac::SealedCookie,
) -> [u8; COOKIE_REPLY_LEN] {
    let mut out = [0u8; COOKIE_REPLY_LEN];
    out[0] = PacketType::CookieReply as u8;
    out[4..8].copy_from_slice(&receiver_index.to_be_bytes());
    out[8..8 + COOKIE_NONCE_LEN].copy_from_slice(&nonce);
    out[8 + COOKIE_NONCE_LEN..].copy_from_slice(sealed);
    out
}

/// Encodes the unknown-session hint.
pub fn encode_session_unknown(session_id: SessionId) -> [u8; SESSION_UNKNOWN_LEN] {
    let mut out = [0u8; SESSION_UNKNOWN_LEN];
    out[0] = PacketType::SessionUnknown as u8;
    out[4..12].copy_from_slice(&session_id.0.to_be_bytes());
    out
}

/// A wall-clock timestamp (TAI64N-like: seconds and nanoseconds since the Unix epoch),
/// carried by handshake initiations so that a replayed one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp {
    /// Whole seconds.
    pub secs: u64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

/// The encrypted payload of a handshake initiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPayload {
    /// Must be later than any accepted before from the same client.
    pub timestamp: Timestamp,
    /// The client's id for the transport the handshake travels on.
    pub transport_id: TransportId,
    /// That transport's protocol.
    pub protocol: Protocol,
    /// The ciphers the client offers for the session's packets.
    pub ciphers: CipherSet,
}

impl InitPayload {
    /// The payload bytes.
    pub fn encode(&self) -> [u8; INIT_PAYLOAD_LEN] {
        let mut out = [0u8; INIT_PAYLOAD_LEN];
        out[0..8].copy_from_slice(&self.timestamp.secs.to_be_bytes());
        out[8..12].copy_from_slice(&self.timestamp.nanos.to_be_bytes());
        out[12..16].copy_from_slice(&self.transport_id.0.to_be_bytes());
        out[16] = protocol_id(self.protocol);
        out[17] = self.ciphers.bits();
        out
    }

    /// Decodes the payload bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::exact(bytes, INIT_PAYLOAD_LEN, "initiation payload")?;
        Ok(InitPayload {
            timestamp: Timestamp {
                secs: r.u64()?,
                nanos: r.u32()?,
            },
            transport_id: TransportId(r.u32()?),
            protocol: r.protocol()?,
            ciphers: {
                let bits = r.u8()?;
                CipherSet::from_bits(bits).ok_or(WireError::NoMandatoryCipher(bits))?
            },
        })
    }
}

/// A tunnel address with its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunnelAddr {
    /// The address assigned to the client.
    pub addr: IpAddr,
    /// The prefix length of the tunnel network.
    pub prefix: u8,
}

impl std::fmt::Display for TunnelAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a set of tunnel addresses was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TunnelAddrsError {
    /// No address at all.
    #[error("no address given; one IPv4 address, one IPv6 address, or one of each")]
    Empty,
    /// Two addresses of one family.
    #[error("two IPv{0} addresses given; at most one of each family")]
    TwoOfFamily(u8),
    /// A prefix longer than its address.
    #[error("prefix length {0} is too long for the address")]
    BadPrefix(u8),
}

/// A side's tunnel addresses: an IPv4 one, an IPv6 one, or one of each (dual stack).
/// Never empty; never two of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TunnelAddrs {
    v4: Option<TunnelAddr>,
    v6: Option<TunnelAddr>,
}

impl TunnelAddrs {
    /// The set of `addrs`, checked: at least one, at most one per family, prefixes that
    /// fit their address.
    pub fn new(addrs: impl IntoIterator<Item = TunnelAddr>) -> Result<Self, TunnelAddrsError> {
        let (mut v4, mut v6) = (None, None);
        for a in addrs {
            let (slot, family, max) = match a.addr {
                IpAddr::V4(_) => (&mut v4, 4, 32),
                IpAddr::V6(_) => (&mut v6, 6, 128),
            };
            if a.prefix > max {
                return Err(TunnelAddrsError::BadPrefix(a.prefix));
            }
            if slot.replace(a).is_some() {
                return Err(TunnelAddrsError::TwoOfFamily(family));
            }
        }
        if v4.is_none() && v6.is_none() {
            return Err(TunnelAddrsError::Empty);
        }
        Ok(TunnelAddrs { v4, v6 })
    }

    /// One address.
    pub fn single(addr: TunnelAddr) -> Result<Self, TunnelAddrsError> {
        Self::new([addr])
    }

    /// The IPv4 address, if the tunnel has one.
    pub fn v4(&self) -> Option<TunnelAddr> {
        self.v4
    }

    /// The IPv6 address, if the tunnel has one.
    pub fn v6(&self) -> Option<TunnelAddr> {
        self.v6
    }

    /// The address of `addr`'s family, if the tunnel has one.
    pub fn of_family(&self, addr: IpAddr) -> Option<TunnelAddr> {
        match addr {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(_) => self.v6,
        }
    }

    /// Every address, IPv4 first.
    pub fn iter(&self) -> impl Iterator<Item = TunnelAddr> {
        self.v4.into_iter().chain(self.v6)
    }

    /// Whether `addr` is one of the tunnel's addresses.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.of_family(addr).is_some_and(|a| a.addr == addr)
    }
}

impl std::fmt::Display for TunnelAddrs {
    /// The addresses with their prefixes, space-separated, IPv4 first.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut sep = "";
        for a in self.iter() {
            write!(f, "{sep}{a}")?;
            sep = " ";
        }
        Ok(())
    }
}

/// Families present in a response's tunnel field.
const FAMILY_V4: u8 = 1;
const FAMILY_V6: u8 = 2;

/// The encrypted payload of a handshake response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RespPayload {
    /// The new session's id.
    pub session_id: SessionId,
    /// The version under which the first binding was accepted.
    pub binding_version: StateVersion,
    /// The client's tunnel addresses.
    pub tunnel: TunnelAddrs,
    /// The cipher the gateway chose among the client's offer.
    pub cipher: Cipher,
}

impl RespPayload {
    /// The payload bytes: id, version, then a families byte (bit 0 IPv4, bit 1 IPv6)
    /// and both address slots (IPv4 address and prefix, IPv6 address and prefix), an
    /// absent family's slot zero; last, the cipher's id.
    pub fn encode(&self) -> [u8; RESP_PAYLOAD_LEN] {
        let mut out = [0u8; RESP_PAYLOAD_LEN];
        out[0..8].copy_from_slice(&self.session_id.0.to_be_bytes());
        out[8..16].copy_from_slice(&self.binding_version.0.to_be_bytes());
        let mut families = 0;
        if let Some(TunnelAddr {
            addr: IpAddr::V4(a),
            prefix,
        }) = self.tunnel.v4
        {
            families |= FAMILY_V4;
            out[17..21].copy_from_slice(&a.octets());
            out[21] = prefix;
        }
        if let Some(TunnelAddr {
            addr: IpAddr::V6(a),
            prefix,
        }) = self.tunnel.v6
        {
            families |= FAMILY_V6;
            out[22..38].copy_from_slice(&a.octets());
            out[38] = prefix;
        }
        out[16] = families;
        out[39] = self.cipher.id();
        out
    }

    /// Decodes the payload bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::exact(bytes, RESP_PAYLOAD_LEN, "response payload")?;
        let session_id = SessionId(r.u64()?);
        let binding_version = StateVersion(r.u64()?);
        let families = r.u8()?;
        let v4: [u8; 4] = r.take()?;
        let v4_prefix = r.u8()?;
        let v6: [u8; 16] = r.take()?;
        let v6_prefix = r.u8()?;
        let cipher_id = r.u8()?;
        let cipher = Cipher::from_id(cipher_id).ok_or(WireError::UnknownCipher(cipher_id))?;
        if families & !(FAMILY_V4 | FAMILY_V6) != 0 {
            return Err(WireError::UnknownFamily(families));
        }
        let slot = |present: bool, addr: IpAddr, prefix: u8, zero: bool| {
            if present {
                Ok(Some(TunnelAddr { addr, prefix }))
            } else if zero && prefix == 0 {
                Ok(None)
            } else {
                Err(WireError::NonZeroReserved)
            }
        };
        let v4 = slot(
            families & FAMILY_V4 != 0,
            IpAddr::V4(Ipv4Addr::from(v4)),
            v4_prefix,
            v4 == [0; 4],
        )?;
        let v6 = slot(
            families & FAMILY_V6 != 0,
            IpAddr::V6(Ipv6Addr::from(v6)),
            v6_prefix,
            v6 == [0; 16],
        )?;
        let tunnel = TunnelAddrs::new(v4.into_iter().chain(v6)).map_err(|e| match e {
            TunnelAddrsError::BadPrefix(p) => WireError::BadPrefix(p),
            TunnelAddrsError::Empty | TunnelAddrsError::TwoOfFamily(_) => {
                WireError::UnknownFamily(families)
            }
        })?;
        Ok(RespPayload {
            session_id,
            binding_version,
            tunnel,
            cipher,
        })
    }
}

/// The authenticated contents of a reattach request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReattachRequest {
    /// The client's wall clock, Unix milliseconds: freshness.
    pub timestamp_ms: u64,
    /// The version under which the binding the client knows was accepted; the gateway
    /// refuses the request if its binding moved since (stale_state_version).
    pub expected_version: StateVersion,
    /// The client's id for the candidate transport.
    pub transport_id: TransportId,
    /// The candidate's protocol; must match the transport the request arrived on.
    pub protocol: Protocol,
    /// What made the client leave its current transport (a volatility reason code).
    pub cause: ReasonCode,
}

/// The plaintext of an authenticated session packet, by type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control<'a> {
    /// A tunnelled IP packet.
    Data(&'a [u8]),
    /// Liveness on the active transport.
    Heartbeat {
        /// Echoed by the answer.
        seq: u64,
    },
    /// Answer to a heartbeat.
    HeartbeatAck {
        /// The heartbeat's seq.
        seq: u64,
        /// The version under which the gateway's current binding was accepted.
        binding_version: StateVersion,
    },
    /// Liveness on a standby candidate.
    Probe {
        /// Echoed by the answer.
        seq: u64,
    },
    /// Answer to a probe.
    ProbeAck {
        /// The probe's seq.
        seq: u64,
    },
    /// A standby node's answer to a probe (spec/cluster.md): it names the probe by its
    /// seq and by the counter it was sealed with, which no other probe under the
    /// session's keys had, so the answer fits that one probe on that one transport.
    StandbyProbeAck {
        /// The probe's seq.
        seq: u64,
        /// The probe's packet counter.
        probe_counter: u64,
    },
    /// Bind the transport this arrives on.
    ReattachRequest(ReattachRequest),
    /// The reattach was accepted.
    ReattachAck {
        /// The request's counter.
        request_counter: u64,
        /// The version under which the new binding was accepted.
        binding_version: StateVersion,
    },
    /// The reattach was refused; no binding changed.
    ReattachDeny {
        /// The request's counter.
        request_counter: u64,
        /// Why.
        reason: ReasonCode,
        /// The version of the binding the gateway holds.
        binding_version: StateVersion,
    },
    /// The sender ended the session.
    Terminate {
        /// Why.
        reason: ReasonCode,
    },
    /// Noise IK message 1 for the next key epoch.
    RekeyInit(&'a [u8]),
    /// Noise IK message 2 for the next key epoch.
    RekeyResp(&'a [u8]),
    /// Prove that this transport reaches you: echo the token on it.
    PathChallenge {
        /// Random, unpredictable.
        token: u64,
    },
    /// The echo of a path challenge, on the transport it came from.
    PathResponse {
        /// The challenge's token.
        token: u64,
    },
    /// Does the path carry datagrams of this one's size, both ways? (`core::pmtu`)
    SizeProbe(SizeProbe),
    /// The answer to a size probe, padded as the probe was.
    SizeProbeAck(SizeProbe),
}

/// The contents of a size probe and of its answer (the answer echoes the probe's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeProbe {
    /// Echoed by the answer.
    pub seq: u64,
    /// The largest datagram the client found its path to carry both ways, bytes, when
    /// smaller than the largest it sends; 0 when it knows no such limit. The gateway
    /// keeps it as the limit of its sends to the client at the address it came from.
    pub limit: u16,
    /// Zero bytes that follow, making the datagram the size probed.
    pub padding: u16,
}

impl SizeProbe {
    /// The bytes of a size probe's plaintext before its padding.
    pub const FIELDS_LEN: usize = 10;

    /// The size of the datagram this probe travels in (saturating at 65 535).
    pub fn datagram_len(&self) -> u16 {
        let len = usize::from(self.padding) + OVERHEAD + Self::FIELDS_LEN;
        u16::try_from(len).unwrap_or(u16::MAX)
    }

    /// The probe of seq `seq` whose datagram is `size` bytes (or the smallest a probe
    /// can be, if `size` is smaller).
    pub fn of_size(seq: u64, limit: u16, size: u16) -> SizeProbe {
        let padding = usize::from(size).saturating_sub(OVERHEAD + Self::FIELDS_LEN);
        SizeProbe {
            seq,
            limit,
            padding: u16::try_from(padding).unwrap_or(u16::MAX),
        }
    }
}

impl<'a> Control<'a> {
    /// The packet type this plaintext travels as.
    pub fn ptype(&self) -> PacketType {
        match self {
            Control::Data(_) => PacketType::Data,
            Control::Heartbeat { .. } => PacketType::Heartbeat,
            Control::HeartbeatAck { .. } => PacketType::HeartbeatAck,
            Control::Probe { .. } => PacketType::Probe,
            Control::ProbeAck { .. } => PacketType::ProbeAck,
            Control::StandbyProbeAck { .. } => PacketType::StandbyProbeAck,
            Control::ReattachRequest(_) => PacketType::ReattachRequest,
            Control::ReattachAck { .. } => PacketType::ReattachAck,
            Control::ReattachDeny { .. } => PacketType::ReattachDeny,
            Control::Terminate { .. } => PacketType::Terminate,
            Control::RekeyInit(_) => PacketType::RekeyInit,
            Control::RekeyResp(_) => PacketType::RekeyResp,
            Control::PathChallenge { .. } => PacketType::PathChallenge,
            Control::PathResponse { .. } => PacketType::PathResponse,
            Control::SizeProbe(_) => PacketType::SizeProbe,
            Control::SizeProbeAck(_) => PacketType::SizeProbeAck,
        }
    }

    /// Appends the plaintext bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Control::Data(bytes) | Control::RekeyInit(bytes) | Control::RekeyResp(bytes) => {
                out.extend_from_slice(bytes)
            }
            Control::Heartbeat { seq }
            | Control::Probe { seq }
            | Control::ProbeAck { seq }
            | Control::PathChallenge { token: seq }
            | Control::PathResponse { token: seq } => out.extend_from_slice(&seq.to_be_bytes()),
            Control::HeartbeatAck {
                seq,
                binding_version,
            } => {
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&binding_version.0.to_be_bytes());
            }
            Control::StandbyProbeAck { seq, probe_counter } => {
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&probe_counter.to_be_bytes());
            }
            Control::ReattachRequest(r) => {
                out.extend_from_slice(&r.timestamp_ms.to_be_bytes());
                out.extend_from_slice(&r.expected_version.0.to_be_bytes());
                out.extend_from_slice(&r.transport_id.0.to_be_bytes());
                out.push(protocol_id(r.protocol));
                out.push(r.cause.wire_id());
            }
            Control::ReattachAck {
                request_counter,
                binding_version,
            } => {
                out.extend_from_slice(&request_counter.to_be_bytes());
                out.extend_from_slice(&binding_version.0.to_be_bytes());
            }
            Control::ReattachDeny {
                request_counter,
                reason,
                binding_version,
            } => {
                out.extend_from_slice(&request_counter.to_be_bytes());
                out.push(reason.wire_id());
                out.extend_from_slice(&binding_version.0.to_be_bytes());
            }
            Control::Terminate { reason } => out.push(reason.wire_id()),
            Control::SizeProbe(p) | Control::SizeProbeAck(p) => {
                out.extend_from_slice(&p.seq.to_be_bytes());
                out.extend_from_slice(&p.limit.to_be_bytes());
                out.resize(out.len() + usize::from(p.padding), 0);
            }
        }
    }

    /// Decodes the plaintext of a packet of type `ptype`.
    pub fn decode(ptype: PacketType, bytes: &'a [u8]) -> Result<Self, WireError> {
        use PacketType as P;
        Ok(match ptype {
            P::Data => Control::Data(bytes),
            P::Heartbeat => Control::Heartbeat {
                seq: Reader::exact(bytes, 8, "heartbeat")?.u64()?,
            },
            P::Probe => Control::Probe {
                seq: Reader::exact(bytes, 8, "probe")?.u64()?,
            },
            P::ProbeAck => Control::ProbeAck {
                seq: Reader::exact(bytes, 8, "probe ack")?.u64()?,
            },
            P::StandbyProbeAck => {
                let mut r = Reader::exact(bytes, 16, "standby probe ack")?;
                Control::StandbyProbeAck {
                    seq: r.u64()?,
                    probe_counter: r.u64()?,
                }
            }
            P::PathChallenge => Control::PathChallenge {
                token: Reader::exact(bytes, 8, "path challenge")?.u64()?,
            },
            P::PathResponse => Control::PathResponse {
                token: Reader::exact(bytes, 8, "path response")?.u64()?,
            },
            P::HeartbeatAck => {
                let mut r = Reader::exact(bytes, 16, "heartbeat ack")?;
                Control::HeartbeatAck {
                    seq: r.u64()?,
                    binding_version: StateVersion(r.u64()?),
                }
            }
            P::ReattachRequest => {
                let mut r = Reader::exact(bytes, 22, "reattach request")?;
                Control::ReattachRequest(ReattachRequest {
                    timestamp_ms: r.u64()?,
                    expected_version: StateVersion(r.u64()?),
                    transport_id: TransportId(r.u32()?),
                    protocol: r.protocol()?,
                    cause: r.reason()?,
                })
            }
            P::ReattachAck => {
                let mut r = Reader::exact(bytes, 16, "reattach ack")?;
                Control::ReattachAck {
                    request_counter: r.u64()?,
                    binding_version: StateVersion(r.u64()?),
                }
            }
            P::ReattachDeny => {
                let mut r = Reader::exact(bytes, 17, "reattach deny")?;
                Control::ReattachDeny {
                    request_counter: r.u64()?,
                    reason: r.reason()?,
                    binding_version: StateVersion(r.u64()?),
                }
            }
            P::Terminate => Control::Terminate {
                reason: Reader::exact(bytes, 1, "terminate")?.reason()?,
            },
            P::RekeyInit => {
                Reader::exact(bytes, NOISE_REKEY_INIT_LEN, "rekey init")?;
                Control::RekeyInit(bytes)
            }
            P::RekeyResp => {
                Reader::exact(bytes, NOISE_REKEY_RESP_LEN, "rekey response")?;
                Control::RekeyResp(bytes)
            }
            P::SizeProbe | P::SizeProbeAck => {
                let what = if ptype == P::SizeProbe {
                    "size probe"
                } else {
                    "size probe ack"
                };
                // The fields, then any number of padding bytes: what is left.
                let mut r = Reader { bytes, what };
                let (seq, limit) = (r.u64()?, r.u16()?);
                // Zero, as for reserved bytes: what decodes encodes back the same.
                if r.bytes.iter().any(|&b| b != 0) {
                    return Err(WireError::NonZeroReserved);
                }
                let padding =
                    u16::try_from(r.bytes.len()).map_err(|_| WireError::TooLong(bytes.len()))?;
                let probe = SizeProbe {
                    seq,
                    limit,
                    padding,
                };
                if ptype == P::SizeProbe {
                    Control::SizeProbe(probe)
                } else {
                    Control::SizeProbeAck(probe)
                }
            }
            P::HandshakeInit | P::HandshakeResp | P::SessionUnknown | P::CookieReply => {
                return Err(WireError::UnexpectedType(ptype))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn controls() -> Vec<Control<'static>> {
        static REKEY_INIT: [u8; NOISE_REKEY_INIT_LEN] = [7; NOISE_REKEY_INIT_LEN];
        static REKEY_RESP: [u8; NOISE_REKEY_RESP_LEN] = [9; NOISE_REKEY_RESP_LEN];
        vec![
            Control::Data(b"\x45\x00 an ip packet"),
            Control::Data(b""),
            Control::Heartbeat { seq: 1 },
            Control::HeartbeatAck {
                seq: u64::MAX,
                binding_version: StateVersion(3),
            },
            Control::Probe { seq: 5 },
            Control::ProbeAck { seq: 6 },
            Control::ReattachRequest(ReattachRequest {
                timestamp_ms: 1_700_000_000_000,
                expected_version: StateVersion(4),
                transport_id: TransportId(2),
                protocol: Protocol::Tcp,
                cause: ReasonCode::HeartbeatTimeout,
            }),
            Control::ReattachAck {
                request_counter: 77,
                binding_version: StateVersion(9),
            },
            Control::ReattachDeny {
                request_counter: 78,
                reason: ReasonCode::ReplayDetected,
                binding_version: StateVersion(9),
            },
            Control::Terminate {
                reason: ReasonCode::OperatorTerminated,
            },
            Control::RekeyInit(&REKEY_INIT),
            Control::RekeyResp(&REKEY_RESP),
            Control::PathChallenge { token: 0xfeed },
            Control::PathResponse { token: 0xfeed },
            Control::SizeProbe(SizeProbe {
                seq: 3,
                limit: 0,
                padding: 0,
            }),
            Control::SizeProbeAck(SizeProbe {
                seq: 4,
                limit: 1_416,
                padding: 1_390,
            }),
        ]
    }

    #[test]
    fn every_control_round_trips() {
        for c in controls() {
            let mut bytes = Vec::new();
            c.encode(&mut bytes);
            assert_eq!(Control::decode(c.ptype(), &bytes), Ok(c));
        }
    }

    #[test]
    fn fixed_size_controls_refuse_a_byte_more_or_less() {
        for c in controls() {
            if matches!(
                c,
                Control::Data(_) | Control::SizeProbe(_) | Control::SizeProbeAck(_)
            ) {
                continue;
            }
            let mut bytes = Vec::new();
            c.encode(&mut bytes);
            bytes.push(0);
            assert!(
                Control::decode(c.ptype(), &bytes).is_err(),
                "{c:?} + 1 byte"
            );
            bytes.truncate(bytes.len() - 2);
            assert!(
                Control::decode(c.ptype(), &bytes).is_err(),
                "{c:?} - 1 byte"
            );
        }
    }

    #[test]
    fn a_size_probe_is_padded_to_the_size_probed_and_needs_its_fields() {
        let probe = SizeProbe::of_size(9, 1_400, 1_444);
        let mut bytes = Vec::new();
        Control::SizeProbe(probe).encode(&mut bytes);
        assert_eq!(bytes.len() + OVERHEAD, 1_444);
        assert_eq!(probe.datagram_len(), 1_444);
        assert!(bytes[SizeProbe::FIELDS_LEN..].iter().all(|&b| b == 0));
        // Any padding decodes, as its length.
        bytes.push(0);
        assert_eq!(
            Control::decode(PacketType::SizeProbeAck, &bytes),
            Ok(Control::SizeProbeAck(SizeProbe {
                padding: probe.padding + 1,
                ..probe
            }))
        );
        // Fewer bytes than the fields, or padding that is not zero: refused.
        assert!(Control::decode(PacketType::SizeProbe, &bytes[..9]).is_err());
        bytes.push(1);
        assert_eq!(
            Control::decode(PacketType::SizeProbe, &bytes),
            Err(WireError::NonZeroReserved)
        );
        // A size below a probe's smallest makes the smallest.
        assert_eq!(SizeProbe::of_size(1, 0, 10).padding, 0);
    }

    #[test]
    fn session_header_round_trips_through_parse() {
        let header = SessionHeader {
            ptype: PacketType::Heartbeat,
            key_epoch: 3,
            session_id: SessionId(0x0102_0304_0506_0708),
            counter: 42,
        };
        let mut packet = header.encode().to_vec();
        packet.extend_from_slice(&[0xAA; 24]);
        let Ok(Datagram::Session {
            header: h,
            aad,
            sealed,
        }) = parse(&packet)
        else {
            panic!("not a session packet");
        };
        assert_eq!(h, header);
        assert_eq!(aad, &header.encode());
        assert_eq!(sealed.len(), 24);
    }

    #[test]
    fn handshake_payloads_round_trip() {
        let init = InitPayload {
            timestamp: Timestamp {
                secs: 1_700_000_000,
                nanos: 999_999_999,
            },
            transport_id: TransportId(1),
            protocol: Protocol::Udp,
            ciphers: CipherSet::ALL,
        };
        assert_eq!(InitPayload::decode(&init.encode()), Ok(init));
        let chacha = InitPayload {
            ciphers: CipherSet::CHACHA20_POLY1305,
            ..init
        };
        assert_eq!(InitPayload::decode(&chacha.encode()), Ok(chacha));
        let mut bytes = init.encode();
        bytes[17] = 0b1000_0011;
        assert_eq!(
            InitPayload::decode(&bytes),
            Ok(init),
            "an unknown cipher's bit is ignored"
        );
        bytes[17] = 0b10;
        assert_eq!(
            InitPayload::decode(&bytes),
            Err(WireError::NoMandatoryCipher(2)),
            "ChaCha20-Poly1305 is always offered"
        );
        let v4 = TunnelAddr {
            addr: IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)),
            prefix: 24,
        };
        let v6 = TunnelAddr {
            addr: IpAddr::V6("fd00::2".parse().expect("v6")),
            prefix: 64,
        };
        for (tunnel, cipher) in [
            (vec![v4], Cipher::ChaCha20Poly1305),
            (vec![v6], Cipher::Aes256Gcm),
            (vec![v4, v6], Cipher::ChaCha20Poly1305),
        ] {
            let resp = RespPayload {
                session_id: SessionId(99),
                binding_version: StateVersion(1),
                tunnel: TunnelAddrs::new(tunnel).expect("valid"),
                cipher,
            };
            assert_eq!(RespPayload::decode(&resp.encode()), Ok(resp));
        }
        let good = RespPayload {
            session_id: SessionId(1),
            binding_version: StateVersion(1),
            tunnel: TunnelAddrs::single(v4).expect("valid"),
            cipher: Cipher::Aes256Gcm,
        }
        .encode();
        let mut bad = good;
        bad[21] = 33;
        assert_eq!(RespPayload::decode(&bad), Err(WireError::BadPrefix(33)));
        // The IPv4 address left without its family bit, an unknown family bit, bytes in
        // an absent family's slot.
        for (at, value, error) in [
            (16, 0, WireError::NonZeroReserved),
            (16, 5, WireError::UnknownFamily(5)),
            (30, 1, WireError::NonZeroReserved),
            (38, 64, WireError::NonZeroReserved),
            (39, 2, WireError::UnknownCipher(2)),
        ] {
            let mut bad = good;
            bad[at] = value;
            assert_eq!(RespPayload::decode(&bad), Err(error), "byte {at} = {value}");
        }
        let mut empty = [0u8; RESP_PAYLOAD_LEN];
        empty[..16].copy_from_slice(&good[..16]);
        assert_eq!(
            RespPayload::decode(&empty),
            Err(WireError::UnknownFamily(0)),
            "no address at all"
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        assert!(matches!(parse(&[]), Err(WireError::TooShort { .. })));
        assert_eq!(parse(&[0xFF; 40]), Err(WireError::UnknownType(0xFF)));
        let mut packet = SessionHeader {
            ptype: PacketType::Data,
            key_epoch: 0,
            session_id: SessionId(1),
            counter: 1,
        }
        .encode()
        .to_vec();
        packet.extend_from_slice(&[0; 15]);
        assert!(
            matches!(parse(&packet), Err(WireError::TooShort { .. })),
            "tag cut short"
        );
        packet.push(0);
        packet[2] = 1;
        assert_eq!(parse(&packet), Err(WireError::NonZeroReserved));
        assert_eq!(
            parse(&vec![3; MAX_DATAGRAM + 1]),
            Err(WireError::TooLong(MAX_DATAGRAM + 1))
        );
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Datagram::Session { header, sealed, .. }) = parse(&bytes) {
                let _ = Control::decode(header.ptype, sealed);
            }
            for t in 1..=16u8 {
                if let Ok(ptype) = PacketType::from_byte(t) {
                    let _ = Control::decode(ptype, &bytes);
                }
            }
            let _ = InitPayload::decode(&bytes);
            let _ = RespPayload::decode(&bytes);
        }
    }
}
