//! A session's state machine together with the record of what happened to it: the one
//! place where a state change and its event are produced together, so that no mutation
//! goes unreported and no report is made without its mutation. Used by the client's
//! control plane and by the gateway's sessions alike.

use std::collections::VecDeque;
use std::time::Instant;

use crate::event::{EventBody, SessionEvent};
use crate::fsm::{FsmEvent, InvalidTransition, State, StateMachine, Transition};
use crate::ids::StateVersion;
use crate::reason::ReasonCode;

/// Events kept between two drains. The driver drains after every input, so this is only
/// reached by a driver that stopped draining; past it, events are counted, not stored.
const EVENT_QUEUE_LIMIT: usize = 256;

/// A state machine and its bounded, ordered event queue.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    fsm: StateMachine,
    events: VecDeque<SessionEvent>,
    overflowed: u64,
}

impl Journal {
    /// A session in BIRTH with no events.
    pub fn new() -> Self {
        Self::default()
    }

    /// A session taken over from another node, at the state and version of its record,
    /// with no events.
    pub fn resume(state: State, version: StateVersion) -> Self {
        Journal {
            fsm: StateMachine::resume(state, version),
            ..Journal::default()
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.fsm.state()
    }

    /// Mutations so far.
    pub fn version(&self) -> StateVersion {
        self.fsm.version()
    }

    /// Applies `event`: a success is recorded as one SessionStateChange, a refusal as
    /// one TransitionRejected (and changes nothing).
    pub fn apply(
        &mut self,
        event: FsmEvent,
        now: Instant,
    ) -> Result<Transition, InvalidTransition> {
        match self.fsm.apply(event) {
            Ok(t) => {
                self.record(
                    now,
                    EventBody::SessionStateChange {
                        previous_state: t.from,
                        new_state: t.to,
                        reason_code: t.reason,
                        state_version: t.version,
                    },
                );
                Ok(t)
            }
            Err(e) => {
                self.record(
                    now,
                    EventBody::TransitionRejected {
                        state: e.state,
                        event: e.event.name(),
                        reason_code: ReasonCode::InvalidTransition,
                        state_version: self.fsm.version(),
                    },
                );
                Err(e)
            }
        }
    }

    /// Reports `event` as refused in the current state without trying it: for a caller
    /// that found, before mutating anything, that a sequence of events cannot apply.
    pub fn reject(&mut self, event: FsmEvent, now: Instant) {
        self.record(
            now,
            EventBody::TransitionRejected {
                state: self.fsm.state(),
                event: event.name(),
                reason_code: ReasonCode::InvalidTransition,
                state_version: self.fsm.version(),
            },
        );
    }

    /// Records an event that is not a state change.
    pub fn record(&mut self, at: Instant, body: EventBody) {
        if self.events.len() >= EVENT_QUEUE_LIMIT {
            self.overflowed += 1;
            return;
        }
        self.events.push_back(SessionEvent { at, body });
    }

    /// The oldest undrained event.
    pub fn poll(&mut self) -> Option<SessionEvent> {
        let event = self.events.pop_front();
        if self.events.is_empty() && self.events.capacity() > 0 {
            // Drained: let the buffer go. Events come in rare bursts (state changes, not
            // packets), and an idle session should hold no memory for them.
            self.events = VecDeque::new();
        }
        event
    }

    /// Events discarded because nobody drained the queue.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventBody;

    #[test]
    fn an_undrained_journal_keeps_its_bound_and_counts_the_rest() {
        let mut j = Journal::new();
        let now = Instant::now();
        for epoch in 0..300 {
            j.record(now, EventBody::KeyRotated { key_epoch: epoch });
        }
        let kept = std::iter::from_fn(|| j.poll()).count();
        assert_eq!(
            (kept, j.overflowed()),
            (EVENT_QUEUE_LIMIT, 300 - EVENT_QUEUE_LIMIT as u64)
        );
        // Oldest first: what was kept is the beginning of the stream.
        j.record(now, EventBody::KeyRotated { key_epoch: 7 });
        assert_eq!(
            j.poll().map(|e| e.body),
            Some(EventBody::KeyRotated { key_epoch: 7 })
        );
    }
}
