//! A token bucket on the monotonic clock: the budgets of handshakes and cookie replies
//! per source, of packets from off a session's binding, and of ICMP answers.

use std::time::{Duration, Instant};

/// A token bucket on the monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct TokenBucket {
    tokens: u32,
    refilled: Option<Instant>,
}

impl TokenBucket {
    /// Takes a token if there is one, refilling `per_second` tokens a second up to
    /// `burst` first.
    pub fn take(&mut self, now: Instant, per_second: u32, burst: u32) -> bool {
        match self.refilled {
            None => {
                self.tokens = burst;
                self.refilled = Some(now);
            }
            Some(at) => {
                let elapsed = now.saturating_duration_since(at).as_millis();
                let new = elapsed.saturating_mul(u128::from(per_second)) / 1_000;
                if self
                    .tokens
                    .saturating_add(u32::try_from(new).unwrap_or(u32::MAX))
                    >= burst
                {
                    self.tokens = burst;
                    self.refilled = Some(now);
                } else if new > 0 {
                    self.tokens += new as u32;
                    // Advance by the whole tokens added only, keeping the fraction.
                    let used_ms = new * 1_000 / u128::from(per_second.max(1));
                    self.refilled = Some(at + Duration::from_millis(used_ms as u64));
                }
            }
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}
