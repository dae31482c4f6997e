//! What every actor shares: how events are reported, and how messages cross a mailbox
//! with a bound (refusals counted, depth and handling time measured).

use std::time::{Duration, Instant};

use actix::dev::ToEnvelope;
use actix::prelude::*;
use std::collections::VecDeque;

use jvpn_core::event::{EventBody, EventRecord, SessionEvent, WallClock};
use jvpn_core::fsm::State;
use jvpn_core::ids::{NodeId, SessionId};
use jvpn_core::reason::ReasonCode;

use crate::events::EventSender;
use crate::telemetry;

/// The kinds of actor, as metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActorKind {
    /// One session (gateway) or the client agent's session.
    Session,
    /// A transport (socket or connection).
    Transport,
    /// The TUN device.
    Tun,
    /// The node supervisor.
    Supervisor,
    /// The node's part in a gateway cluster.
    Cluster,
}

impl ActorKind {
    /// The stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            ActorKind::Session => "session",
            ActorKind::Transport => "transport",
            ActorKind::Tun => "tun",
            ActorKind::Supervisor => "supervisor",
            ActorKind::Cluster => "cluster",
        }
    }
}

/// Stops an actor as a failure would: fault injection for tests and chaos drills. What
/// happens next is the supervision under test (a transport is restarted on the same
/// socket; a session is restarted with its state, or ended explicitly).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Crash;

/// Closes an actor that reads from a device or socket: it stops reading and drops its
/// own handle, so it ends once the last holder of its address lets go (a supervised
/// actor that merely stopped would be restarted while anyone still holds its address).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Close;

/// Where a node's events go: each one becomes a JSON line with the node's id and policy
/// version, and updates the metrics it concerns. Cheap to clone; never blocks.
#[derive(Debug, Clone)]
pub struct Reporter {
    clock: WallClock,
    node: NodeId,
    policy_version: String,
    sink: Option<EventSender>,
}

impl Reporter {
    /// A reporter stamping events with `clock`, `node` and `policy_version`; `sink`
    /// `None` reports to metrics only.
    pub fn new(
        clock: WallClock,
        node: NodeId,
        policy_version: String,
        sink: Option<EventSender>,
    ) -> Self {
        Reporter {
            clock,
            node,
            policy_version,
            sink,
        }
    }

    /// The wall clock events are stamped with.
    pub fn clock(&self) -> &WallClock {
        &self.clock
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Stamps later events with `version` (a reloaded policy took effect).
    pub fn set_policy_version(&mut self, version: String) {
        self.policy_version = version;
    }

    /// Reports one event of `session`.
    pub fn report(&self, session: SessionId, event: SessionEvent) {
        telemetry::observe(&event.body);
        if let Some(sink) = &self.sink {
            sink.emit(EventRecord::new(
                &self.clock,
                session,
                self.node.clone(),
                self.policy_version.clone(),
                event,
            ));
        }
    }
}

/// One state change, as status views show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransitionNote {
    /// When (Unix milliseconds, from the node's wall clock).
    pub ts_ms: u64,
    /// The state left.
    pub from: State,
    /// The state entered.
    pub to: State,
    /// Why.
    pub reason: ReasonCode,
}

/// The last [`RECENT_TRANSITIONS`] state changes of a session, for status views.
#[derive(Debug, Clone, Default)]
pub struct RecentTransitions(VecDeque<TransitionNote>);

/// How many state changes a status view keeps per session.
pub const RECENT_TRANSITIONS: usize = 8;

impl RecentTransitions {
    /// Notes `event` if it is a state change.
    pub fn note(&mut self, clock: &WallClock, event: &SessionEvent) {
        if let EventBody::SessionStateChange {
            previous_state,
            new_state,
            reason_code,
            ..
        } = &event.body
        {
            if self.0.len() == RECENT_TRANSITIONS {
                self.0.pop_front();
            }
            self.0.push_back(TransitionNote {
                ts_ms: clock.ts_ms(event.at),
                from: *previous_state,
                to: *new_state,
                reason: *reason_code,
            });
        }
    }

    /// Oldest first.
    pub fn to_vec(&self) -> Vec<TransitionNote> {
        self.0.iter().copied().collect()
    }
}

/// Offers `msg` to a bounded mailbox without waiting: returns whether it was taken. A
/// refusal (full, or the actor gone) is counted by the receiver's kind; an accepted
/// message raises the receiver's mailbox-depth gauge until [`Handling`] lowers it.
pub fn offer<A, M>(to: &Addr<A>, kind: ActorKind, msg: M) -> bool
where
    A: Handler<M>,
    A::Context: ToEnvelope<A, M>,
    M: Message + Send + 'static,
    M::Result: Send,
{
    counted(to.try_send(msg), kind)
}

/// Like [`offer`], through a [`Recipient`].
pub fn offer_to<M>(to: &Recipient<M>, kind: ActorKind, msg: M) -> bool
where
    M: Message + Send + 'static,
    M::Result: Send,
{
    counted(to.try_send(msg), kind)
}

fn counted<M>(sent: Result<(), SendError<M>>, kind: ActorKind) -> bool {
    match sent {
        Ok(()) => {
            telemetry::enqueued(kind);
            true
        }
        Err(SendError::Full(_)) => {
            telemetry::refused(kind, "full");
            false
        }
        Err(SendError::Closed(_)) => {
            telemetry::refused(kind, "closed");
            false
        }
    }
}

/// An actor's one deadline timer, on the monotonic clock.
///
/// Re-arming it for an instant no earlier than the one it is armed for keeps the running
/// timer: it fires early, its owner re-evaluates (acting only on what is due then), and
/// the firing arms it for the later instant. A deadline that moves later with every
/// packet (the heartbeat timeout, counted from when the peer was last heard) then costs
/// one firing per deadline instead of a cancelled and a new timer per packet. An earlier
/// instant, or none, replaces it.
#[derive(Debug, Default)]
pub struct DeadlineTimer {
    armed: Option<(Instant, SpawnHandle)>,
    /// The instant the timer last fired for.
    fired_for: Option<Instant>,
}

/// When a firing made no progress (the deadline it served is still due, e.g. because the
/// session table refused the write the timer asked for), the next try waits this long
/// instead of spinning.
pub const NO_PROGRESS_RETRY: Duration = Duration::from_millis(100);

impl DeadlineTimer {
    /// Arms the timer for `at` (disarms it for `None`); when it fires, `fire` runs on the
    /// actor, which must call [`DeadlineTimer::fired`] first. A deadline no later than the
    /// one that just fired is retried [`NO_PROGRESS_RETRY`] after now, not at once.
    pub fn arm<A>(
        &mut self,
        ctx: &mut Context<A>,
        at: Option<Instant>,
        fire: fn(&mut A, &mut Context<A>),
    ) where
        A: Actor<Context = Context<A>>,
    {
        let at = match (at, self.fired_for.take()) {
            (Some(at), Some(last)) if at <= last => Some(Instant::now() + NO_PROGRESS_RETRY),
            (at, _) => at,
        };
        if let Some((armed_at, handle)) = self.armed.take() {
            if at.is_some_and(|at| armed_at <= at) {
                self.armed = Some((armed_at, handle));
                return;
            }
            ctx.cancel_future(handle);
        }
        if let Some(at) = at {
            let wait = at.saturating_duration_since(Instant::now());
            let handle = ctx.run_later(wait, fire);
            self.armed = Some((at, handle));
        }
    }

    /// The timer has fired: nothing is armed any more.
    pub fn fired(&mut self) {
        self.fired_for = self.armed.take().map(|(at, _)| at);
    }
}

/// Measures the handling of one message that came through [`offer`]: on drop, lowers
/// the mailbox-depth gauge and records the handling time, by actor kind.
pub struct Handling {
    kind: ActorKind,
    started: Instant,
}

impl Handling {
    /// Starts measuring a message of an actor of `kind`.
    pub fn start(kind: ActorKind) -> Self {
        Handling {
            kind,
            started: Instant::now(),
        }
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        telemetry::handled(self.kind, self.started.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Parked;

    impl Actor for Parked {
        type Context = Context<Self>;
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Ping;

    impl Handler<Ping> for Parked {
        type Result = ();
        fn handle(&mut self, _: Ping, _: &mut Context<Self>) {
            let _measure = Handling::start(ActorKind::Session);
        }
    }

    /// Not offered, not measured: only waits for the mailbox ahead of it to drain.
    #[derive(Message)]
    #[rtype(result = "()")]
    struct Flush;

    impl Handler<Flush> for Parked {
        type Result = ();
        fn handle(&mut self, _: Flush, _: &mut Context<Self>) {}
    }

    /// An actor whose deadline never moves: the core made no progress on it.
    struct Stuck {
        timer: DeadlineTimer,
        due: Instant,
        fired: u32,
    }

    impl Actor for Stuck {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Context<Self>) {
            self.arm(ctx);
        }
    }

    impl Stuck {
        fn arm(&mut self, ctx: &mut Context<Self>) {
            self.timer.arm(ctx, Some(self.due), |act, ctx| {
                act.timer.fired();
                act.fired += 1;
                act.arm(ctx);
            });
        }
    }

    #[derive(Message)]
    #[rtype(result = "u32")]
    struct Fired;

    impl Handler<Fired> for Stuck {
        type Result = u32;
        fn handle(&mut self, _: Fired, _: &mut Context<Self>) -> u32 {
            self.fired
        }
    }

    /// Arms its timer for the instants it is given, in order, and records what the
    /// timer is armed for after each.
    struct Rearmed {
        timer: DeadlineTimer,
        asks: Vec<Option<Instant>>,
        armed: Vec<Option<Instant>>,
    }

    impl Actor for Rearmed {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Context<Self>) {
            for at in std::mem::take(&mut self.asks) {
                self.timer.arm(ctx, at, |act, _| act.timer.fired());
                self.armed.push(self.timer.armed.as_ref().map(|(t, _)| *t));
            }
        }
    }

    #[derive(Message)]
    #[rtype(result = "Vec<Option<Instant>>")]
    struct Armed;

    impl Handler<Armed> for Rearmed {
        type Result = MessageResult<Armed>;
        fn handle(&mut self, _: Armed, _: &mut Context<Self>) -> Self::Result {
            MessageResult(self.armed.clone())
        }
    }

    #[test]
    fn a_later_deadline_keeps_the_armed_timer_and_an_earlier_one_replaces_it() {
        let base = Instant::now() + Duration::from_secs(60);
        let at = |s: u64| Some(base + Duration::from_secs(s));
        let armed = actix::System::new().block_on(async move {
            let addr = Rearmed {
                timer: DeadlineTimer::default(),
                asks: vec![at(10), at(20), at(10), at(5), at(30), None, at(40)],
                armed: Vec::new(),
            }
            .start();
            addr.send(Armed).await.unwrap_or_default()
        });
        assert_eq!(
            armed,
            vec![at(10), at(10), at(10), at(5), at(5), None, at(40)]
        );
    }

    #[test]
    fn a_timer_that_makes_no_progress_is_retried_not_spun() {
        let fired = actix::System::new().block_on(async {
            let addr = Stuck {
                timer: DeadlineTimer::default(),
                due: Instant::now(),
                fired: 0,
            }
            .start();
            actix_rt::time::sleep(Duration::from_millis(350)).await;
            addr.send(Fired).await.unwrap_or(0)
        });
        // Once at once, then every NO_PROGRESS_RETRY: about 4 in 350 ms. A spinning
        // timer fires thousands of times.
        assert!((2..=6).contains(&fired), "fired {fired} times");
    }

    #[test]
    fn a_full_mailbox_refuses_and_counts_and_the_gauge_follows_handling() {
        let recorder = crate::telemetry::builder().build_recorder();
        let handle = recorder.handle();
        let (accepted, text_before) = metrics::with_local_recorder(&recorder, || {
            actix::System::new().block_on(async {
                let addr = Parked::create(|ctx| {
                    ctx.set_mailbox_capacity(4);
                    Parked
                });
                // Nothing runs the actor until this task yields: the mailbox fills.
                let accepted = (0..20)
                    .filter(|_| offer(&addr, ActorKind::Session, Ping))
                    .count();
                let before = handle.render();
                // Let the actor drain its mailbox.
                let _ = addr.send(Flush).await;
                (accepted, before)
            })
        });
        assert!((4..20).contains(&accepted), "accepted {accepted}");
        let refused = 20 - accepted;
        assert!(text_before.contains(&format!(
            "jvpn_actor_mailbox_refused_total{{actor=\"session\",why=\"full\"}} {refused}"
        )));
        assert!(text_before.contains(&format!(
            "jvpn_actor_mailbox_depth{{actor=\"session\"}} {accepted}"
        )));
        // Every accepted message handled: the depth is back to 0.
        let after = handle.render();
        assert!(
            after.contains("jvpn_actor_mailbox_depth{actor=\"session\"} 0"),
            "{after}"
        );
        assert!(after.contains(&format!(
            "jvpn_actor_message_seconds_count{{actor=\"session\"}} {accepted}"
        )));
    }
}
