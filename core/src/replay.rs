//! Sliding-window anti-replay (RFC 6479): a ring of 64-bit blocks, O(1) per counter,
//! memory fixed at construction (window / 64 + 1 words).
//!
//! [`ReplayWindow::check`] does not change the window, so a receiver can check a counter
//! cheaply before authenticating a packet and [`ReplayWindow::commit`] it only after the
//! AEAD verified — an attacker's forged packet then cannot advance the window.

use thiserror::Error;

const BLOCK_BITS: u64 = 64;

/// Why a counter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ReplayError {
    /// This counter was accepted before.
    #[error("counter {0} was already received")]
    Duplicate(u64),
    /// This counter is older than the window reaches.
    #[error("counter {0} is older than the replay window")]
    TooOld(u64),
}

/// The window of recently accepted counters.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    blocks: Box<[u64]>,
    /// The highest counter accepted so far.
    highest: Option<u64>,
    window: u64,
}

impl ReplayWindow {
    /// A window that accepts counters up to `window_bits - 1` behind the highest one
    /// seen. `window_bits` is rounded up to a multiple of 64 and to at least 64.
    pub fn new(window_bits: u32) -> Self {
        let window = u64::from(window_bits).div_ceil(BLOCK_BITS).max(1) * BLOCK_BITS;
        let blocks = (window / BLOCK_BITS + 1) as usize;
        ReplayWindow {
            blocks: vec![0; blocks].into_boxed_slice(),
            highest: None,
            window,
        }
    }

    /// A window that has seen every counter up to and including `floor` (and no later
    /// one): what a node taking a session over starts from, so that no packet the client
    /// sent before its reattach can be replayed to it.
    pub fn seen_through(window_bits: u32, floor: u64) -> Self {
        let mut w = ReplayWindow::new(window_bits);
        w.highest = Some(floor);
        w.blocks.fill(u64::MAX);
        let (block, _) = w.position(floor);
        let bit = floor % BLOCK_BITS;
        w.blocks[block] = if bit == BLOCK_BITS - 1 {
            u64::MAX
        } else {
            (1u64 << (bit + 1)) - 1
        };
        w
    }

    /// The highest counter accepted so far.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// The number of counters the window spans.
    pub fn width(&self) -> u64 {
        self.window
    }

    /// Whether `counter` would be accepted now; changes nothing.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if counter > highest {
            return Ok(());
        }
        if highest - counter >= self.window {
            return Err(ReplayError::TooOld(counter));
        }
        let (block, bit) = self.position(counter);
        if self.blocks[block] & bit != 0 {
            return Err(ReplayError::Duplicate(counter));
        }
        Ok(())
    }

    /// Checks `counter` and, if it is acceptable, records it.
    pub fn commit(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        match self.highest {
            Some(highest) if counter <= highest => {}
            _ => self.advance_to(counter),
        }
        let (block, bit) = self.position(counter);
        self.blocks[block] |= bit;
        Ok(())
    }

    /// Makes `counter` the highest, clearing the blocks it moves past.
    fn advance_to(&mut self, counter: u64) {
        let n = self.blocks.len() as u64;
        let new_block = counter / BLOCK_BITS;
        match self.highest {
            None => self.blocks.fill(0),
            Some(highest) => {
                let old_block = highest / BLOCK_BITS;
                let to_clear = (new_block - old_block).min(n);
                for i in 1..=to_clear {
                    self.blocks[((old_block + i) % n) as usize] = 0;
                }
            }
        }
        self.highest = Some(counter);
    }

    fn position(&self, counter: u64) -> (usize, u64) {
        let block = (counter / BLOCK_BITS) % self.blocks.len() as u64;
        (block as usize, 1u64 << (counter % BLOCK_BITS))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// The obvious, unbounded implementation the window must agree with.
    struct Model {
        seen: HashSet<u64>,
        highest: Option<u64>,
        window: u64,
    }

    impl Model {
        fn check(&self, c: u64) -> Result<(), ReplayError> {
            match self.highest {
                Some(h) if c <= h && h - c >= self.window => Err(ReplayError::TooOld(c)),
                _ if self.seen.contains(&c) => Err(ReplayError::Duplicate(c)),
                _ => Ok(()),
            }
        }

        fn commit(&mut self, c: u64) -> Result<(), ReplayError> {
            self.check(c)?;
            self.seen.insert(c);
            self.highest = Some(self.highest.map_or(c, |h| h.max(c)));
            Ok(())
        }
    }

    #[test]
    fn a_window_seen_through_a_floor_refuses_it_and_everything_before_and_takes_what_follows() {
        for floor in [0u64, 5, 63, 64, 1_000, 1 << 24] {
            let mut w = ReplayWindow::seen_through(2048, floor);
            for old in [floor, floor.saturating_sub(1), floor.saturating_sub(100), 0] {
                assert!(w.check(old).is_err(), "floor {floor}: {old} accepted");
            }
            // Later counters, out of order, each once.
            assert_eq!(w.commit(floor + 3), Ok(()));
            assert_eq!(w.commit(floor + 1), Ok(()), "floor {floor}");
            assert_eq!(w.commit(floor + 2), Ok(()));
            assert!(w.commit(floor + 1).is_err());
            assert!(w.check(floor).is_err());
        }
    }

    #[test]
    fn accepts_in_order_rejects_duplicates_and_old() {
        let mut w = ReplayWindow::new(2048);
        for c in 0..5000 {
            assert_eq!(w.commit(c), Ok(()));
        }
        assert_eq!(w.commit(4999), Err(ReplayError::Duplicate(4999)));
        assert_eq!(
            w.commit(4999 - 2047),
            Err(ReplayError::Duplicate(4999 - 2047))
        );
        assert_eq!(w.commit(4999 - 2048), Err(ReplayError::TooOld(4999 - 2048)));
        assert_eq!(w.commit(u64::MAX), Ok(()));
        assert_eq!(w.commit(0), Err(ReplayError::TooOld(0)));
    }

    #[test]
    fn out_of_order_inside_the_window_is_accepted_once() {
        let mut w = ReplayWindow::new(128);
        assert_eq!(w.commit(1_000), Ok(()));
        assert_eq!(w.commit(900), Ok(()));
        assert_eq!(w.check(900), Err(ReplayError::Duplicate(900)));
        assert_eq!(w.commit(873), Ok(()));
        assert_eq!(w.commit(872), Err(ReplayError::TooOld(872)));
    }

    #[test]
    fn check_does_not_mutate() {
        let mut w = ReplayWindow::new(128);
        assert_eq!(w.check(7), Ok(()));
        assert_eq!(w.check(7), Ok(()));
        assert_eq!(w.commit(7), Ok(()));
        assert_eq!(w.check(7), Err(ReplayError::Duplicate(7)));
    }

    fn counter_stream() -> impl Strategy<Value = Vec<u64>> {
        // Mostly small forward steps and repeats, with backward jumps across the window
        // edge and rare large leaps, from a random start.
        let step = prop_oneof![
            6 => 0i64..4,
            3 => -300i64..0,
            1 => 100i64..5_000,
        ];
        (0u64..1 << 40, prop::collection::vec(step, 1..600)).prop_map(|(start, steps)| {
            let mut c = start;
            steps
                .into_iter()
                .map(|s| {
                    c = c.saturating_add_signed(s);
                    c
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn agrees_with_the_brute_force_model(
            stream in counter_stream(),
            bits in prop::sample::select(vec![128u32, 256, 2048]),
        ) {
            let mut w = ReplayWindow::new(bits);
            let mut m = Model { seen: HashSet::new(), highest: None, window: u64::from(bits) };
            for c in stream {
                prop_assert_eq!(w.check(c), m.check(c));
                prop_assert_eq!(w.commit(c), m.commit(c), "counter {}", c);
            }
        }
    }
}
