//! Read slots whose large runs are handed on where the kernel wrote them.
//!
//! A UDP reader hands the kernel [`SLOT_BYTES`] per slot (a whole GRO run fits in
//! one). Copying a run of tens of kilobytes out of its slot, so that the slot can be
//! read into again, was the receiving side's largest cost after the cipher and the
//! kernel's own copies under a TCP flow through the tunnel (5 to 7 % of its CPU samples).
//! A [`ReadSlot`] instead gives a run away as the datagrams' own buffer ([`take`]), and
//! is made whole again for the kernel once every datagram of it has been dropped
//! ([`renew`]), without being written: neither copied nor zeroed again.
//!
//! The safe API of `BytesMut` cannot give that back: once a buffer's bytes are handed
//! on and dropped, it offers the room only as uninitialized spare capacity, while a
//! receive takes an initialized `&mut [u8]`. [`renew`] therefore restores the length
//! with one `unsafe` call, sound because of how a slot is made and used (see there).
//!
//! [`take`]: ReadSlot::take
//! [`renew`]: ReadSlot::renew
#![allow(unsafe_code)]

use bytes::BytesMut;

use crate::transport::SLOT_BYTES;

/// One slot: [`SLOT_BYTES`] the kernel writes into, all of them initialized.
pub(crate) struct ReadSlot {
    buf: BytesMut,
    /// Where the slot's allocation starts (an address, only compared): the only place
    /// `renew` makes it whole from.
    start: usize,
}

impl ReadSlot {
    /// A slot of [`SLOT_BYTES`] zeroed bytes.
    pub(crate) fn new() -> ReadSlot {
        let buf = BytesMut::zeroed(SLOT_BYTES);
        let start = buf.as_ptr() as usize;
        ReadSlot { buf, start }
    }

    /// The bytes for the kernel to write into: the whole slot, unless a run was taken
    /// from it and it has not been renewed since.
    pub(crate) fn room(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Hands on the first `len` bytes (what a receive wrote) as a buffer of their own;
    /// the slot is spent until [`ReadSlot::renew`] makes it whole again.
    pub(crate) fn take(&mut self, len: usize) -> BytesMut {
        self.buf.split_to(len.min(self.buf.len()))
    }

    /// Makes a spent slot whole again, if nothing else holds a part of it any more;
    /// `false` (and the slot left spent) while a buffer taken from it lives.
    pub(crate) fn renew(&mut self) -> bool {
        if self.buf.len() == SLOT_BYTES {
            return true;
        }
        self.buf.clear();
        // `try_reclaim` never allocates: once the buffer is the allocation's only
        // holder it moves back to the allocation's start with its whole capacity.
        if !self.buf.try_reclaim(SLOT_BYTES)
            || self.buf.as_ptr() as usize != self.start
            || self.buf.capacity() < SLOT_BYTES
        {
            return false;
        }
        // SAFETY: the buffer is the allocation `new` made with `BytesMut::zeroed` (it
        // is only ever split, cleared and reclaimed, none of which moves it to another
        // allocation, and it starts at that allocation's start again), so its first
        // SLOT_BYTES bytes were initialized then. Bytes written since are initialized
        // too: the kernel's receives, and sessions opening datagrams in place. A holder
        // of a datagram could, in safe code, write uninitialized bytes into the spare
        // capacity behind it (`BytesMut::spare_capacity_mut`); nothing in this program
        // does, and the datagram type says so ([`crate::transport::Incoming`]). The
        // capacity covers the bytes (checked).
        unsafe { self.buf.set_len(SLOT_BYTES) };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_renewed_in_place_once_what_was_taken_from_it_is_dropped() {
        let mut slot = ReadSlot::new();
        let start = slot.room().as_ptr();
        assert_eq!(slot.room().len(), SLOT_BYTES);
        slot.room()[..3].copy_from_slice(b"abc");
        let taken = slot.take(3);
        assert_eq!(&taken[..], b"abc");
        assert_eq!(taken.as_ptr(), start, "handed on where it was written");
        // Spent while the taken buffer lives: its bytes are never offered again.
        assert!(!slot.renew());
        assert!(!slot.renew());
        assert!(slot.room().len() < SLOT_BYTES);
        drop(taken);
        assert!(slot.renew());
        assert_eq!(slot.room().len(), SLOT_BYTES);
        assert_eq!(
            slot.room().as_ptr(),
            start,
            "the same memory, not a new one"
        );
        // What the kernel wrote last is still there: nothing was zeroed or copied.
        assert_eq!(&slot.room()[..3], b"abc");
    }

    #[test]
    fn a_whole_slot_taken_and_a_slot_never_taken_from_renew_too() {
        let mut slot = ReadSlot::new();
        assert!(slot.renew(), "never taken from");
        let all = slot.take(SLOT_BYTES + 10);
        assert_eq!(all.len(), SLOT_BYTES);
        assert!(!slot.renew());
        drop(all);
        assert!(slot.renew());
        assert_eq!(slot.room().len(), SLOT_BYTES);
    }
}
