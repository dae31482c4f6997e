//! Property tests: random network scripts under random policies, on a virtual clock,
//! with every invariant of the contract checked after every step.

use std::time::{Duration, Instant};

use jvpn_core::control::SecurityIncident;
use jvpn_core::event::{EventBody, ReattachOutcome};
use jvpn_core::fsm::{transition, State, TerminationCause};
use jvpn_core::ids::TransportId;
use jvpn_core::policy::{Policy, PolicyConfig};
use jvpn_core::reason::ReasonCode;
use jvpn_core::select::SWITCH_RATE_WINDOW;
use jvpn_core::sim::{ms, Answer, Loss, Sim};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Advance(u64),
    SetLoss(u32, Loss),
    Kill(u32),
    Revive(u32),
    PeerAnswers(Answer),
    LossReport(u32, u32, u32),
    Security,
    OperatorTerminate,
}

fn op() -> impl Strategy<Value = Op> {
    let path = 1u32..=3;
    let loss = prop_oneof![
        Just(Loss::None),
        Just(Loss::All),
        Just(Loss::EveryOther),
        (1u8..90).prop_map(Loss::Percent),
    ];
    let answer = prop_oneof![
        4 => Just(Answer::Accept),
        1 => Just(Answer::Deny(ReasonCode::StaleStateVersion)),
        1 => Just(Answer::Deny(ReasonCode::PolicyDenied)),
        1 => Just(Answer::Silent),
    ];
    prop_oneof![
        40 => (1u64..4_000).prop_map(Op::Advance),
        16 => (path.clone(), loss).prop_map(|(p, l)| Op::SetLoss(p, l)),
        8 => path.clone().prop_map(Op::Kill),
        8 => path.clone().prop_map(Op::Revive),
        8 => answer.prop_map(Op::PeerAnswers),
        8 => (path, 0u32..50, 0u32..50).prop_map(|(p, d, x)| Op::LossReport(p, d, x)),
        4 => Just(Op::Security),
        1 => Just(Op::OperatorTerminate),
    ]
}

fn policy() -> impl Strategy<Value = Policy> {
    (
        (20_000u64..120_000, 3_000u64..20_000),
        (0u32..5, 0u64..3_000),
        (500u64..6_000, 500u64..5_000),
        prop::sample::select(vec![(100u64, 400u64), (500, 2_000)]),
    )
        .prop_map(
            |((life, ttl), (switches, cooldown), (recovery, v2d), (hb, hbv))| {
                let mut c = PolicyConfig::starter();
                c.session.max_lifetime_ms = Some(life);
                c.session.transport_lost_ttl_ms = Some(ttl);
                c.switching.max_switches_per_min = Some(switches);
                c.switching.switch_cooldown_ms = Some(cooldown);
                c.switching.recovery_window_ms = Some(recovery);
                c.volatility.volatile_to_degraded_ms = Some(v2d);
                c.volatility.heartbeat_interval_ms = Some(hb);
                c.volatility.heartbeat_volatile_ms = Some(hbv);
                c.validate().expect("generated policy is valid")
            },
        )
}

fn apply(sim: &mut Sim, op: &Op) {
    let now = sim.now;
    match *op {
        Op::Advance(d) => sim.run_for(ms(d)),
        Op::SetLoss(p, loss) => sim.set_loss(p, loss),
        Op::Kill(p) => sim.kill(p),
        Op::Revive(p) => sim.revive(p),
        Op::PeerAnswers(a) => sim.answer = a,
        Op::LossReport(p, d, x) => {
            let _ = sim.ctl.loss_report(TransportId(p), d, x, now);
        }
        Op::Security => sim
            .ctl
            .security_incident(SecurityIncident::Replay { counter: 7 }, now),
        Op::OperatorTerminate => {
            let _ = sim.ctl.terminate(TerminationCause::Operator, now);
        }
    }
    sim.drain();
}

/// Whether the table maps `from`, by the event that carries `reason`, to `to`.
fn defined(from: State, to: State, reason: ReasonCode) -> bool {
    use jvpn_core::fsm::{
        FsmEvent as E, Instability as I, RecoveryFailure as F, SwitchCause as S,
        TerminationCause as T,
    };
    use ReasonCode as R;
    let event = match reason {
        R::AttachedToTransport => E::AttachOk,
        R::LossThresholdExceeded => E::InstabilityDetected(I::LossThreshold),
        R::ConsecutiveDropExceeded => E::InstabilityDetected(I::ConsecutiveDrops),
        R::HeartbeatTimeout => E::InstabilityDetected(I::HeartbeatTimeout),
        R::TransportDead => E::InstabilityDetected(I::TransportDead),
        R::LatencyThresholdExceeded => E::InstabilityDetected(I::LatencyThreshold),
        R::LossRecovery => E::SwitchInitiated(S::Loss),
        R::DeadTransportRecovery => E::SwitchInitiated(S::DeadTransport),
        R::PolicyForcedRecovery => E::SwitchInitiated(S::PolicyForced),
        R::VolatilePersisted => E::VolatilePersisted,
        R::SwitchRateLimited => E::SwitchRateLimited,
        R::ReattachSuccess => E::ReattachValid,
        R::ReattachValidationFailed => E::ReattachFailed(F::ValidationFailed),
        R::NoCandidateTransports => E::ReattachFailed(F::NoCandidate),
        R::PolicyDenied => E::ReattachFailed(F::PolicyDenied),
        R::RecoveryWindowExpired => E::ReattachFailed(F::WindowExpired),
        R::SessionLifetimeExceeded => E::Terminate(T::LifetimeExceeded),
        R::TransportTtlExceeded => E::Terminate(T::TransportTtlExceeded),
        R::SecurityFailure => E::Terminate(T::SecurityFailure),
        R::OperatorTerminated => E::Terminate(T::Operator),
        R::PeerTerminated => E::Terminate(T::Peer),
        _ => return false,
    };
    event.reason() == reason && transition(from, &event) == Some(to)
}

/// Every invariant of the contract, checked over the whole event history so far.
fn check(sim: &Sim, p: &Policy) -> Result<(), TestCaseError> {
    let mut state = State::Birth;
    let mut version = 0u64;
    let mut last_at = sim.t0;
    let mut switch_starts: Vec<Instant> = Vec::new();
    let mut recovering_since: Option<Instant> = None;
    let mut successes = 0usize;
    let mut returns_to_attached = 0usize;
    let mut terminated_by: Option<(Instant, ReasonCode)> = None;

    for e in &sim.events {
        prop_assert!(e.at >= last_at, "events out of time order");
        last_at = e.at;
        match e.body {
            EventBody::SessionStateChange {
                previous_state,
                new_state,
                reason_code,
                state_version,
            } => {
                prop_assert!(terminated_by.is_none(), "a transition after TERMINATED");
                prop_assert_eq!(previous_state, state, "transition chain broken");
                version += 1;
                prop_assert_eq!(state_version.0, version, "version not +1 per mutation");
                prop_assert!(
                    !(previous_state == State::Volatile && new_state == State::Attached),
                    "VOLATILE went straight to ATTACHED"
                );
                prop_assert!(
                    defined(previous_state, new_state, reason_code),
                    "{} -> {} ({}) is not in the transition table",
                    previous_state,
                    new_state,
                    reason_code
                );
                if let Some(since) = recovering_since.take() {
                    prop_assert!(
                        e.at <= since + p.recovery_window(),
                        "RECOVERING outlived its window"
                    );
                }
                match new_state {
                    State::Recovering => {
                        switch_starts.push(e.at);
                        recovering_since = Some(e.at);
                    }
                    State::Attached if previous_state == State::Recovering => {
                        returns_to_attached += 1
                    }
                    State::Terminated => terminated_by = Some((e.at, reason_code)),
                    _ => {}
                }
                state = new_state;
            }
            EventBody::ReattachResult {
                result: ReattachOutcome::Success,
                ..
            } => successes += 1,
            _ => {}
        }
    }

    prop_assert_eq!(sim.ctl.state(), state);
    prop_assert_eq!(sim.ctl.version().0, version, "a mutation without its event");
    prop_assert_eq!(successes, returns_to_attached);

    // Binding: ATTACHED ⇒ exactly one; BIRTH and TERMINATED ⇒ none (an Option holds at
    // most one by construction).
    match state {
        State::Attached => prop_assert!(sim.ctl.active().is_some(), "ATTACHED without binding"),
        State::Birth | State::Terminated => prop_assert!(sim.ctl.active().is_none()),
        _ => {}
    }

    // Switch budget: cooldown between starts, at most max per sliding 60 s.
    for (i, t) in switch_starts.iter().enumerate() {
        if i > 0 {
            prop_assert!(
                *t - switch_starts[i - 1] >= p.switch_cooldown(),
                "cooldown broken"
            );
        }
        let in_window = switch_starts[..=i]
            .iter()
            .filter(|s| *t - **s < SWITCH_RATE_WINDOW)
            .count();
        prop_assert!(
            in_window <= p.max_switches_per_min() as usize,
            "switch budget broken"
        );
    }

    // RECOVERING never outlives its window, even while still in it.
    if let Some(since) = recovering_since {
        prop_assert!(
            sim.now <= since + p.recovery_window(),
            "RECOVERING past its deadline"
        );
    }

    // Lifetime and transport-lost TTL: terminate exactly on time, with the right reason.
    let lifetime_end = sim.t0 + p.max_lifetime();
    let ttl_end = sim.last_heard + p.transport_lost_ttl();
    match terminated_by {
        None => {
            prop_assert!(sim.now < lifetime_end, "alive past its lifetime");
            prop_assert!(sim.now < ttl_end, "alive past the transport-lost TTL");
        }
        Some((at, ReasonCode::SessionLifetimeExceeded)) => prop_assert_eq!(at, lifetime_end),
        Some((at, ReasonCode::TransportTtlExceeded)) => {
            prop_assert_eq!(at, ttl_end);
            prop_assert!(at < lifetime_end);
        }
        Some((at, reason)) => {
            prop_assert!(
                matches!(
                    reason,
                    ReasonCode::SecurityFailure | ReasonCode::OperatorTerminated
                ),
                "unexpected termination reason {}",
                reason
            );
            prop_assert!(at < lifetime_end && at < ttl_end);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_invariant_holds_on_random_scripts(p in policy(), ops in prop::collection::vec(op(), 1..80)) {
        let mut sim = Sim::udp(p.clone(), &[1, 2, 3]).expect("sim");
        check(&sim, &p)?;
        for op in &ops {
            apply(&mut sim, op);
            check(&sim, &p)?;
        }
        // Let every timer run out: the session must end by its lifetime at the latest.
        sim.run_for(p.max_lifetime() + Duration::from_secs(1));
        check(&sim, &p)?;
        prop_assert_eq!(sim.ctl.state(), State::Terminated);
        prop_assert_eq!(sim.ctl.next_deadline(), None);
    }

    /// Between inputs nothing is ever overdue: firing the timers again at the same
    /// instant does nothing, and the next deadline is later than now (a driver that
    /// sleeps until it neither misses work nor spins).
    #[test]
    fn no_work_is_ever_left_overdue(p in policy(), ops in prop::collection::vec(op(), 1..40)) {
        let mut sim = Sim::udp(p, &[1, 2, 3]).expect("sim");
        for op in &ops {
            apply(&mut sim, op);
            let mut probe = sim.ctl.clone();
            probe.handle_timeout(sim.now);
            let overdue = probe.poll_event();
            prop_assert!(overdue.is_none(), "work was overdue at {:?}: {:?}", sim.now - sim.t0, overdue);
            prop_assert_eq!(probe.version(), sim.ctl.version());
            if let Some(d) = sim.ctl.next_deadline() {
                prop_assert!(d > sim.now);
            }
        }
    }
}
