//! A deterministic simulated network for driving a [`SessionControl`] on a virtual
//! clock: paths with scripted loss and RTT, heartbeats on the active path and probes on
//! the standbys (as the client agent sends them), and a peer that answers reattaches as
//! told. The loop is the real driver's in miniature: wake at the earliest of the
//! session's deadline and the network's own events, feed inputs, drain outputs.
//!
//! Used by the property and scenario tests, and by `jvpn simulate` to dry-run a policy
//! against scripted outages.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::{Action, ControlError, SessionControl};
use crate::event::{EventBody, SessionEvent, TransportRef};
use crate::fsm::State;
use crate::ids::{Protocol, SessionId, StateVersion, TransportId};
use crate::policy::Policy;
use crate::reason::ReasonCode;

/// How a path treats packets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// Everything arrives.
    None,
    /// Nothing arrives.
    All,
    /// Every other heartbeat is lost (50 %, never two in a row).
    EveryOther,
    /// Each packet is lost with this probability (percent), from a seeded generator.
    Percent(u8),
}

/// How the peer answers a reattach request that reaches it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answer {
    /// Accept it.
    Accept,
    /// Refuse it with this reason.
    Deny(ReasonCode),
    /// Never answer.
    Silent,
}

/// One simulated path, carrying one transport.
pub struct Path {
    /// The transport it carries.
    pub id: TransportId,
    /// How it loses packets.
    pub loss: Loss,
    /// Its round-trip time.
    pub rtt: Duration,
    next_probe: Instant,
    seq: u64,
}

enum Pending {
    Ack {
        at: Instant,
        id: TransportId,
        seq: u64,
    },
    Answer {
        at: Instant,
        attempt: StateVersion,
        answer: Answer,
    },
}

impl Pending {
    fn at(&self) -> Instant {
        match self {
            Pending::Ack { at, .. } | Pending::Answer { at, .. } => *at,
        }
    }
}

/// A session and its simulated network.
pub struct Sim {
    /// The session under test.
    pub ctl: SessionControl,
    /// When the simulation began.
    pub t0: Instant,
    /// The virtual now.
    pub now: Instant,
    /// The paths, one per transport.
    pub paths: Vec<Path>,
    /// How the peer answers reattach requests from now on.
    pub answer: Answer,
    /// Every event, in order.
    pub events: Vec<SessionEvent>,
    /// Every reattach the session asked for: when, on which transport, which attempt.
    pub reattaches: Vec<(Instant, TransportId, StateVersion)>,
    /// The last instant the peer was really heard (an ack or answer that the session
    /// accepted): the reference for the transport-lost TTL.
    pub last_heard: Instant,
    pending: Vec<Pending>,
    rng: u64,
}

/// The simulated session's id.
pub const SESSION: SessionId = SessionId(0x5e55_1015_cafe_f00d);

/// `n` milliseconds.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

impl Sim {
    /// A session with one path per transport in `paths` (10 ms RTT, no loss), attached
    /// on the first; refused as the session would refuse the transports.
    pub fn new(policy: Policy, paths: &[TransportRef]) -> Result<Sim, ControlError> {
        let t0 = Instant::now();
        let mut ctl = SessionControl::new(SESSION, Arc::new(policy), t0);
        let mut sim_paths = Vec::new();
        for &transport in paths {
            ctl.add_transport(transport, t0)?;
            sim_paths.push(Path {
                id: transport.id,
                loss: Loss::None,
                rtt: ms(10),
                next_probe: t0,
                seq: 0,
            });
        }
        let first = paths.first().map_or(TransportId(0), |t| t.id);
        ctl.attach(first, t0)?;
        let mut sim = Sim {
            ctl,
            t0,
            now: t0,
            paths: sim_paths,
            answer: Answer::Accept,
            events: Vec::new(),
            reattaches: Vec::new(),
            last_heard: t0,
            pending: Vec::new(),
            rng: 0x9e37_79b9_7f4a_7c15,
        };
        sim.drain();
        Ok(sim)
    }

    /// A session over `ids.len()` UDP paths numbered as given.
    pub fn udp(policy: Policy, ids: &[u32]) -> Result<Sim, ControlError> {
        let paths: Vec<TransportRef> = ids
            .iter()
            .map(|&id| TransportRef {
                id: TransportId(id),
                protocol: Protocol::Udp,
            })
            .collect();
        Sim::new(policy, &paths)
    }

    /// Sets a path's loss (unknown paths are ignored).
    pub fn set_loss(&mut self, id: u32, loss: Loss) {
        if let Some(path) = self.paths.iter_mut().find(|p| p.id == TransportId(id)) {
            path.loss = loss;
        }
    }

    /// The path goes down and the transport says so.
    pub fn kill(&mut self, id: u32) {
        self.set_loss(id, Loss::All);
        let now = self.now;
        let _ = self.ctl.transport_dead(TransportId(id), now);
        self.drain();
    }

    /// The path comes back and the transport says so.
    pub fn revive(&mut self, id: u32) {
        self.set_loss(id, Loss::None);
        let now = self.now;
        let _ = self.ctl.transport_up(TransportId(id), now);
        self.drain();
    }

    /// Runs the world until `self.t0 + at`.
    pub fn run_until_ms(&mut self, at: u64) {
        self.run_until(self.t0 + ms(at));
    }

    /// Runs the world for `d` more.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    /// Runs the world until `end`, waking at every due instant. Each wake consumes a
    /// scheduled item or a deadline, all of which lie in the future, so the loop ends; the
    /// bound on wakes is a second guard.
    pub fn run_until(&mut self, end: Instant) {
        for _ in 0..10_000_000 {
            let Some(next) = self.next_wake().filter(|t| *t <= end) else {
                break;
            };
            self.now = next;
            self.wake();
        }
        self.now = self.now.max(end);
    }

    fn next_wake(&self) -> Option<Instant> {
        if self.ctl.state() == State::Terminated {
            return None;
        }
        let probes = self.paths.iter().map(|p| p.next_probe);
        let pending = self.pending.iter().map(Pending::at);
        probes.chain(pending).chain(self.ctl.next_deadline()).min()
    }

    fn wake(&mut self) {
        let now = self.now;
        // Deliveries first, in schedule order.
        let mut due: Vec<Pending> = Vec::new();
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].at() <= now {
                due.push(self.pending.remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(Pending::at);
        for item in due {
            match item {
                Pending::Ack { id, seq, .. } => {
                    if let Ok(Some(_)) = self.ctl.probe_acked(id, seq, now) {
                        self.last_heard = now;
                    }
                }
                Pending::Answer {
                    attempt, answer, ..
                } => match answer {
                    Answer::Accept => {
                        if self.ctl.reattach_accepted(attempt, now).is_ok() {
                            self.last_heard = now;
                        }
                    }
                    Answer::Deny(reason) => {
                        let _ = self.ctl.reattach_denied(attempt, reason, now);
                    }
                    Answer::Silent => {}
                },
            }
            self.drain();
        }
        // Then heartbeats (active) and probes (standby) that are due. A transport that
        // just became active is heartbeated within one interval, not on its old, slower
        // standby schedule.
        let active = self.ctl.active().map(|t| t.id);
        let policy = Arc::clone(self.ctl.policy());
        for path in &mut self.paths {
            if Some(path.id) == active {
                path.next_probe = path.next_probe.min(now + policy.heartbeat_interval());
            }
        }
        for index in 0..self.paths.len() {
            if self.paths[index].next_probe > now {
                continue;
            }
            let delivered = self.delivered(index);
            let path = &mut self.paths[index];
            path.seq += 1;
            let (id, seq, rtt) = (path.id, path.seq, path.rtt);
            path.next_probe = now
                + if Some(id) == active {
                    policy.heartbeat_interval()
                } else {
                    policy.probe_interval()
                };
            let _ = self.ctl.probe_sent(id, seq, now);
            if delivered {
                self.pending.push(Pending::Ack {
                    at: now + rtt,
                    id,
                    seq,
                });
            }
            self.drain();
        }
        self.ctl.handle_timeout(now);
        self.drain();
    }

    fn delivered(&mut self, index: usize) -> bool {
        match self.paths[index].loss {
            Loss::None => true,
            Loss::All => false,
            Loss::EveryOther => self.paths[index].seq % 2 == 1,
            Loss::Percent(p) => {
                // xorshift64*: deterministic per simulation.
                self.rng ^= self.rng >> 12;
                self.rng ^= self.rng << 25;
                self.rng ^= self.rng >> 27;
                let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % 100;
                r >= u64::from(p)
            }
        }
    }

    /// Moves events into `self.events` and answers reattach actions.
    pub fn drain(&mut self) {
        while let Some(e) = self.ctl.poll_event() {
            self.events.push(e);
        }
        while let Some(Action::Reattach {
            candidate, attempt, ..
        }) = self.ctl.poll_action()
        {
            self.reattaches.push((self.now, candidate, attempt));
            let Some(index) = self.paths.iter().position(|p| p.id == candidate) else {
                continue;
            };
            // The request and the answer each cross the candidate path.
            if !(self.delivered(index) && self.delivered(index)) {
                continue;
            }
            let at = self.now + self.paths[index].rtt;
            self.pending.push(Pending::Answer {
                at,
                attempt,
                answer: self.answer,
            });
        }
    }

    /// The state changes seen so far, as (from, to, reason).
    pub fn transitions(&self) -> Vec<(State, State, ReasonCode)> {
        self.events
            .iter()
            .filter_map(|e| match e.body {
                EventBody::SessionStateChange {
                    previous_state,
                    new_state,
                    reason_code,
                    ..
                } => Some((previous_state, new_state, reason_code)),
                _ => None,
            })
            .collect()
    }

    /// The event types seen so far, in order.
    pub fn event_types(&self) -> Vec<&'static str> {
        self.events.iter().map(|e| e.body.event_type()).collect()
    }

    /// Milliseconds from t0 of the first event matching `pred`.
    pub fn first_ms(&self, pred: impl Fn(&EventBody) -> bool) -> Option<u64> {
        self.events
            .iter()
            .find(|e| pred(&e.body))
            .map(|e| e.at.duration_since(self.t0).as_millis() as u64)
    }
}
