//! Packets copied out of a reader's reused buffers into shared chunks, not one
//! allocation each.
//!
//! A read brings many packets at once: a UDP read with GRO up to 64 KiB of datagrams in
//! one slot, a TUN read a 64 KiB TCP super-packet cut into some forty segments. Each
//! packet leaves the reader as a buffer of its own (it travels to a session in a
//! message and is opened or sealed in place there), and a fresh allocation for each was
//! a twentieth of a daemon's CPU under bulk TCP (malloc and free in perf profiles). Here
//! packets are appended to one chunk and split off it: a view of the chunk each, freed
//! with the last view, so a read of forty packets costs one allocation at most.

use bytes::BytesMut;

/// Room taken at a time: two reads' worth of packets.
const CHUNK: usize = 128 * 1024;

/// Where a reader copies its packets to.
#[derive(Debug, Default)]
pub struct PacketArena {
    /// The rest of the current chunk: empty, with the capacity not yet handed out.
    rest: BytesMut,
}

impl PacketArena {
    /// A buffer of its own holding `packet`, taken from the current chunk (a new chunk
    /// if the rest is too small: the old one is freed once its packets are).
    ///
    /// A chunk stays allocated while any packet cut from it lives, so a packet kept for
    /// long would keep up to one chunk alive; packets live only until their session has
    /// handled them, and every queue they wait in is bounded.
    pub fn copy(&mut self, packet: &[u8]) -> BytesMut {
        if self.rest.capacity() < packet.len() {
            self.rest = BytesMut::with_capacity(CHUNK.max(packet.len()));
        }
        self.rest.extend_from_slice(packet);
        self.rest.split()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each copy holds its packet alone, can grow or be changed without touching the
    /// others, and the copies of one read share a chunk until it is used up.
    #[test]
    fn copies_are_separate_buffers_cut_from_shared_chunks() {
        let mut arena = PacketArena::default();
        let packets: Vec<Vec<u8>> = (0..200u8).map(|i| vec![i; 1_400]).collect();
        let mut copies: Vec<BytesMut> = packets.iter().map(|p| arena.copy(p)).collect();
        for (copy, packet) in copies.iter().zip(&packets) {
            assert_eq!(&copy[..], &packet[..]);
        }
        // In place, as a session opens a datagram: the neighbours are untouched.
        copies[1].fill(0xee);
        copies[1].truncate(10);
        copies[1].extend_from_slice(&[1, 2, 3]);
        assert_eq!(&copies[0][..], &packets[0][..]);
        assert_eq!(&copies[2][..], &packets[2][..]);
        assert_eq!(copies[1].len(), 13);
        // 93 packets of 1 400 bytes fit in a 128 KiB chunk: the first 93 are consecutive
        // in memory, the 94th starts a new chunk.
        let start = |b: &BytesMut| b.as_ptr() as usize;
        for pair in copies[2..93].windows(2) {
            assert_eq!(start(&pair[1]), start(&pair[0]) + 1_400);
        }
        assert_ne!(start(&copies[93]), start(&copies[92]) + 1_400);
        // A packet larger than a chunk gets one of its own size.
        let big = vec![7u8; CHUNK + 1];
        assert_eq!(&arena.copy(&big)[..], &big[..]);
        assert_eq!(&arena.copy(&[]), &b""[..]);
    }
}
