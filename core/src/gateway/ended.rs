//! Recently ended sessions, so that a late reattach for one is refused for the reason
//! the session ended rather than taken for an unknown session.

use std::collections::VecDeque;
use std::time::Instant;

use crate::event::{EventBody, ReattachOutcome, SessionEvent, TransportRef};
use crate::fsm::TerminationCause;
use crate::ids::{SessionId, TransportId};
use crate::reason::ReasonCode;
use crate::wire::{PacketType, SessionHeader};

use super::session::RateWindow;
use super::{Drop, Endpoint};

/// How many ended session ids are remembered.
pub const ENDED_SESSIONS_KEPT: usize = 1_024;

/// A bounded memory of ended sessions and why they ended.
#[derive(Debug, Default)]
pub struct EndedSessions {
    ended: VecDeque<(SessionId, ReasonCode)>,
    /// Denials of reattaches for ended sessions: anyone can provoke them, so they are
    /// reported at most ten per second, node-wide.
    denials: RateWindow,
}

impl EndedSessions {
    /// Remembers that `id` ended because of `cause` (forgetting the oldest past
    /// [`ENDED_SESSIONS_KEPT`]).
    pub fn remember(&mut self, id: SessionId, cause: Option<TerminationCause>) {
        if self.ended.len() >= ENDED_SESSIONS_KEPT {
            self.ended.pop_front();
        }
        let reason = match cause {
            Some(TerminationCause::LifetimeExceeded) => ReasonCode::SessionExpired,
            Some(TerminationCause::TransportTtlExceeded) => ReasonCode::TransportTtlExceeded,
            _ => ReasonCode::InvalidStateForReattach,
        };
        self.ended.push_back((id, reason));
    }

    /// Judges a session packet for which no live session exists: why it is dropped, and
    /// the denial event to report when it is a reattach for an ended session (rate
    /// limited). The sender is answered with a session-unknown notice either way.
    pub fn judge(
        &mut self,
        header: &SessionHeader,
        from: Endpoint,
        now: Instant,
    ) -> (Drop, Option<SessionEvent>) {
        let reason = self
            .ended
            .iter()
            .find(|(id, _)| *id == header.session_id)
            .map(|(_, reason)| *reason);
        match (header.ptype, reason) {
            (PacketType::ReattachRequest, Some(reason)) => {
                let event = self.denials.allow(now).then_some(SessionEvent {
                    at: now,
                    body: EventBody::ReattachResult {
                        candidate_transport: TransportRef {
                            id: TransportId(0),
                            protocol: from.protocol,
                        },
                        result: ReattachOutcome::Denied,
                        reason_code: reason,
                    },
                });
                (Drop::SessionEnded, event)
            }
            _ => (Drop::UnknownSession, None),
        }
    }
}
