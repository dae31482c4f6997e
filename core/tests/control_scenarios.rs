//! Whole-session scenarios on a virtual clock: jumps, denials, budgets, timers.

use jvpn_core::control::{ControlError, SecurityIncident};
use jvpn_core::event::{EventBody, ReattachOutcome, TransportRef};
use jvpn_core::fsm::{State, TerminationCause};
use jvpn_core::ids::{Protocol, StateVersion, TransportId};
use jvpn_core::policy::{Policy, PolicyConfig};
use jvpn_core::reason::ReasonCode;
use jvpn_core::sim::{ms, Answer, Loss, Sim, SESSION};
use State::*;

fn policy(edit: impl FnOnce(&mut PolicyConfig)) -> Policy {
    let mut cfg = PolicyConfig::starter();
    edit(&mut cfg);
    cfg.validate().expect("test policy is valid")
}

#[test]
fn dead_active_path_jumps_to_the_standby_with_the_session_id_unchanged() {
    let mut sim = Sim::udp(Policy::default(), &[1, 2]).expect("sim");
    sim.run_until_ms(10_000);
    assert_eq!(sim.ctl.state(), Attached);
    sim.kill(1);
    sim.run_for(ms(100));

    assert_eq!(
        sim.transitions(),
        [
            (Birth, Attached, ReasonCode::AttachedToTransport),
            (Attached, Volatile, ReasonCode::TransportDead),
            (Volatile, Recovering, ReasonCode::DeadTransportRecovery),
            (Recovering, Attached, ReasonCode::ReattachSuccess),
        ]
    );
    assert_eq!(
        sim.event_types(),
        [
            "TransportAttached",
            "SessionStateChange",
            "SessionStateChange",
            "SessionStateChange",
            "ReattachAttempt",
            "ReattachResult",
            "TransportSwitch",
            "SessionStateChange",
        ]
    );
    let switch = sim
        .events
        .iter()
        .find_map(|e| match &e.body {
            EventBody::TransportSwitch {
                previous_transport,
                new_transport,
                explicit,
                ..
            } => Some((*previous_transport, *new_transport, *explicit)),
            _ => None,
        })
        .expect("switch event");
    let t = |id| TransportRef {
        id: TransportId(id),
        protocol: Protocol::Udp,
    };
    assert_eq!(switch, (Some(t(1)), t(2), true));
    assert_eq!(sim.ctl.session_id(), SESSION);
    assert_eq!(sim.ctl.active(), Some(t(2)));
    assert_eq!(sim.ctl.version(), StateVersion(4));
    // The jump took one round trip on the standby.
    assert_eq!(
        sim.first_ms(|b| matches!(b, EventBody::TransportSwitch { .. })),
        Some(10_010)
    );
    // And the new path stays attached: it is heartbeated at once, not left silent on
    // its standby schedule until it times out.
    sim.run_until_ms(60_000);
    assert_eq!(sim.transitions().len(), 4, "{:?}", sim.transitions());
    assert_eq!(sim.ctl.state(), Attached);
}

#[test]
fn sustained_heartbeat_loss_triggers_loss_threshold_and_a_loss_recovery() {
    // Heartbeats every 100 ms: 20 samples per loss window, enough to judge a ratio.
    let p = policy(|c| {
        c.volatility.heartbeat_interval_ms = Some(100);
        c.volatility.heartbeat_volatile_ms = Some(400);
    });
    let mut sim = Sim::udp(p, &[1, 2]).expect("sim");
    sim.run_until_ms(5_000);
    sim.set_loss(1, Loss::EveryOther);
    sim.run_until_ms(10_000);
    let t = sim.transitions();
    assert_eq!(
        t[1],
        (Attached, Volatile, ReasonCode::LossThresholdExceeded)
    );
    assert_eq!(t[2], (Volatile, Recovering, ReasonCode::LossRecovery));
    assert_eq!(t[3], (Recovering, Attached, ReasonCode::ReattachSuccess));
    assert_eq!(sim.ctl.active().map(|t| t.id), Some(TransportId(2)));
}

#[test]
fn a_receive_report_over_the_threshold_makes_the_path_volatile() {
    let mut sim = Sim::udp(Policy::default(), &[1, 2]).expect("sim");
    sim.run_until_ms(1_000);
    let now = sim.now;
    sim.ctl
        .loss_report(TransportId(1), 80, 20, now)
        .expect("report");
    assert_eq!(
        sim.ctl.state(),
        Attached,
        "20 % is not above the 0.20 threshold"
    );
    sim.ctl
        .loss_report(TransportId(1), 10, 10, now)
        .expect("report");
    sim.drain();
    assert_eq!(
        sim.transitions()[1],
        (Attached, Volatile, ReasonCode::LossThresholdExceeded)
    );
}

#[test]
fn without_a_candidate_the_session_degrades_then_ends_at_the_transport_ttl() {
    let mut sim = Sim::udp(Policy::default(), &[1]).expect("sim");
    sim.run_until_ms(3_000);
    sim.set_loss(1, Loss::All);
    sim.run_until_ms(60_000);
    assert_eq!(
        sim.transitions(),
        [
            (Birth, Attached, ReasonCode::AttachedToTransport),
            (Attached, Volatile, ReasonCode::ConsecutiveDropExceeded),
            (Volatile, Degraded, ReasonCode::VolatilePersisted),
            (Degraded, Terminated, ReasonCode::TransportTtlExceeded),
        ]
    );
    let denial = sim.events.iter().filter(|e| {
        matches!(
            e.body,
            EventBody::TransportSwitchDenied {
                reason_code: ReasonCode::NoValidCandidate,
                ..
            }
        )
    });
    assert_eq!(denial.count(), 1, "a lasting denial is reported once");
    let terminated_at = sim
        .first_ms(|b| matches!(b, EventBody::SessionTerminated { .. }))
        .expect("terminated");
    let last_heard = sim.last_heard.duration_since(sim.t0).as_millis() as u64;
    assert_eq!(terminated_at, last_heard + 15_000);
    let Some(EventBody::SessionTerminated {
        transportless_age_ms,
        ..
    }) = sim.events.last().map(|e| &e.body)
    else {
        panic!("last event is not SessionTerminated");
    };
    assert_eq!(*transportless_age_ms, 15_000);
    assert_eq!(sim.ctl.active(), None);
    assert_eq!(sim.ctl.next_deadline(), None);
}

#[test]
fn an_unanswered_reattach_fails_at_the_recovery_deadline_and_a_late_ack_is_refused() {
    let mut sim = Sim::udp(Policy::default(), &[1, 2]).expect("sim");
    sim.answer = Answer::Silent;
    sim.run_until_ms(1_000);
    sim.kill(1);
    sim.run_until_ms(1_000 + 8_000);
    let t = sim.transitions();
    assert_eq!(
        t.last(),
        Some(&(Recovering, Degraded, ReasonCode::RecoveryWindowExpired))
    );
    assert_eq!(
        sim.first_ms(|b| matches!(b, EventBody::ReattachResult { .. })),
        Some(9_000)
    );
    let version = sim.ctl.version();
    let now = sim.now;
    let (_, _, attempt) = sim.reattaches[0];
    let late = sim.ctl.reattach_accepted(attempt, now);
    assert!(
        matches!(late, Err(ControlError::InvalidTransition(_))),
        "{late:?}"
    );
    assert_eq!(sim.ctl.version(), version);
    assert_eq!(
        sim.ctl.active().map(|t| t.id),
        Some(TransportId(1)),
        "binding moved"
    );
    sim.drain();
    assert_eq!(sim.event_types().last(), Some(&"TransitionRejected"));
}

#[test]
fn a_denied_reattach_changes_no_binding_and_the_candidate_is_retried_later() {
    let mut sim = Sim::udp(Policy::default(), &[1, 2]).expect("sim");
    sim.answer = Answer::Deny(ReasonCode::StaleStateVersion);
    sim.run_until_ms(1_000);
    sim.kill(1);
    sim.run_for(ms(50));
    assert_eq!(sim.ctl.state(), Degraded);
    assert_eq!(sim.ctl.active().map(|t| t.id), Some(TransportId(1)));
    let denied = sim.events.iter().find_map(|e| match e.body {
        EventBody::ReattachResult {
            result: ReattachOutcome::Denied,
            reason_code,
            ..
        } => Some(reason_code),
        _ => None,
    });
    assert_eq!(denied, Some(ReasonCode::StaleStateVersion));
    assert_eq!(
        sim.transitions().last(),
        Some(&(Recovering, Degraded, ReasonCode::ReattachValidationFailed))
    );
    // The failed candidate is excluded for recovery_window_ms (8 s), then tried again.
    sim.answer = Answer::Accept;
    sim.run_until_ms(1_000 + 7_900);
    assert_eq!(sim.reattaches.len(), 1);
    sim.run_until_ms(1_000 + 8_100);
    assert_eq!(sim.reattaches.len(), 2);
    assert_eq!(sim.reattaches[1].0, sim.t0 + ms(1_000 + 10 + 8_000));
    // An answer to the first, refused attempt cannot complete the second.
    let (_, _, first_attempt) = sim.reattaches[0];
    assert!(sim.ctl.reattach_accepted(first_attempt, sim.now).is_err());
    assert_eq!(sim.ctl.state(), Attached);
    assert_eq!(sim.ctl.active().map(|t| t.id), Some(TransportId(2)));
}

#[test]
fn flapping_paths_are_bounded_by_the_switch_budget() {
    let p = policy(|c| {
        c.switching.max_switches_per_min = Some(2);
        c.switching.switch_cooldown_ms = Some(0);
    });
    let mut sim = Sim::udp(p, &[1, 2]).expect("sim");
    // Three times: bring the standby back, let its loss window clean, kill the active.
    for round in 0..3u64 {
        let start = 1_000 + round * 5_000;
        sim.run_until_ms(start);
        let active = sim.ctl.active().expect("bound").id.0;
        sim.revive(3 - active);
        sim.run_until_ms(start + 3_000);
        sim.kill(active);
    }
    sim.run_until_ms(20_000);
    let t = sim.transitions();
    let switches = t.iter().filter(|(_, to, _)| *to == Recovering).count();
    assert_eq!(switches, 2, "{t:?}");
    assert!(
        t.contains(&(Volatile, Degraded, ReasonCode::SwitchRateLimited)),
        "{t:?}"
    );
    assert!(sim.events.iter().any(|e| matches!(
        e.body,
        EventBody::TransportSwitchDenied {
            reason_code: ReasonCode::SwitchRateLimited,
            ..
        }
    )));
}

#[test]
fn a_switch_inside_the_cooldown_waits_for_its_end() {
    let p = policy(|c| c.switching.switch_cooldown_ms = Some(5_000));
    let mut sim = Sim::udp(p, &[1, 2]).expect("sim");
    sim.run_until_ms(1_000);
    sim.kill(1);
    sim.run_until_ms(2_000);
    assert_eq!(sim.ctl.active().map(|t| t.id), Some(TransportId(2)));
    sim.revive(1);
    sim.run_until_ms(4_500); // path 1's loss window is clean again
    sim.kill(2);
    sim.run_until_ms(5_900);
    assert!(sim.events.iter().any(|e| matches!(
        e.body,
        EventBody::TransportSwitchDenied {
            reason_code: ReasonCode::CooldownActive,
            ..
        }
    )));
    assert_eq!(sim.reattaches.len(), 1);
    sim.run_until_ms(6_100);
    assert_eq!(sim.reattaches.len(), 2);
    assert_eq!(
        (sim.reattaches[1].0, sim.reattaches[1].1),
        (sim.t0 + ms(6_000), TransportId(1))
    );
}

#[test]
fn a_recovered_path_is_reattached_in_place_without_a_switch() {
    let mut sim = Sim::udp(Policy::default(), &[1]).expect("sim");
    sim.run_until_ms(1_000);
    sim.set_loss(1, Loss::All);
    sim.run_until_ms(7_000); // VOLATILE, then DEGRADED
    assert_eq!(sim.ctl.state(), Degraded);
    sim.set_loss(1, Loss::None);
    // Chosen again only once a whole loss window (2 s) is clean, and then it stays.
    sim.run_until_ms(8_900);
    assert_eq!(sim.ctl.state(), Degraded);
    sim.run_until_ms(30_000);
    assert_eq!(sim.ctl.state(), Attached);
    assert_eq!(
        sim.transitions()[3..],
        [
            (Degraded, Recovering, ReasonCode::LossRecovery),
            (Recovering, Attached, ReasonCode::ReattachSuccess),
        ]
    );
    assert!(!sim.event_types().contains(&"TransportSwitch"));
}

#[test]
fn the_session_ends_exactly_at_its_lifetime() {
    let p = policy(|c| c.session.max_lifetime_ms = Some(30_000));
    let mut sim = Sim::udp(p, &[1, 2]).expect("sim");
    sim.run_until_ms(29_999);
    assert_eq!(sim.ctl.state(), Attached);
    sim.run_until_ms(40_000);
    assert_eq!(
        sim.transitions().last(),
        Some(&(Attached, Terminated, ReasonCode::SessionLifetimeExceeded))
    );
    assert_eq!(
        sim.first_ms(|b| matches!(b, EventBody::SessionTerminated { .. })),
        Some(30_000)
    );
}

#[test]
fn repeated_security_failures_terminate_and_termination_is_absorbing() {
    let mut sim = Sim::udp(Policy::default(), &[1]).expect("sim");
    let now = sim.now;
    for counter in 0..4 {
        sim.ctl
            .security_incident(SecurityIncident::Replay { counter }, now);
    }
    assert_eq!(sim.ctl.state(), Attached);
    sim.ctl
        .security_incident(SecurityIncident::Invalid(ReasonCode::BadProof), now);
    sim.drain();
    assert_eq!(
        sim.transitions().last(),
        Some(&(Attached, Terminated, ReasonCode::SecurityFailure))
    );
    let version = sim.ctl.version();
    let again = sim.ctl.terminate(TerminationCause::Operator, now);
    assert!(matches!(again, Err(ControlError::InvalidTransition(_))));
    assert_eq!(sim.ctl.version(), version);
    sim.drain();
    assert_eq!(sim.event_types().last(), Some(&"TransitionRejected"));
}

#[test]
fn a_packet_arriving_after_the_ttl_does_not_revive_the_session() {
    let mut sim = Sim::udp(Policy::default(), &[1]).expect("sim");
    let late = sim.t0 + ms(20_000);
    assert_eq!(
        sim.ctl.heard(TransportId(1), late),
        Err(ControlError::Terminated)
    );
    sim.drain();
    assert_eq!(
        sim.transitions().last(),
        Some(&(Attached, Terminated, ReasonCode::TransportTtlExceeded))
    );
    assert_eq!(
        sim.first_ms(|b| matches!(b, EventBody::SessionTerminated { .. })),
        Some(20_000),
        "reported when the driver first looked, with the true transportless age"
    );
}

#[test]
fn a_handshake_finishing_after_the_ttl_cannot_attach() {
    let t0 = std::time::Instant::now();
    let mut ctl = jvpn_core::control::SessionControl::new(
        SESSION,
        std::sync::Arc::new(Policy::default()),
        t0,
    );
    let t = TransportRef {
        id: TransportId(1),
        protocol: Protocol::Udp,
    };
    ctl.add_transport(t, t0).expect("add");
    let attached = ctl.attach(TransportId(1), t0 + ms(60_000));
    assert!(matches!(attached, Err(ControlError::InvalidTransition(_))));
    assert_eq!(ctl.state(), Terminated);
    assert_eq!(ctl.active(), None);
}

#[test]
fn a_late_input_fires_the_overdue_timers_first() {
    let mut sim = Sim::udp(Policy::default(), &[1]).expect("sim");
    sim.ctl.security_incident(
        SecurityIncident::Invalid(ReasonCode::BadProof),
        sim.t0 + ms(20_000),
    );
    sim.drain();
    assert_eq!(sim.ctl.state(), Terminated);
    assert_eq!(
        sim.transitions().last(),
        Some(&(Attached, Terminated, ReasonCode::TransportTtlExceeded))
    );
    assert_eq!(sim.ctl.next_deadline(), None);
}

#[test]
fn operator_termination_is_reason_coded() {
    let mut sim = Sim::udp(Policy::default(), &[1]).expect("sim");
    sim.run_until_ms(500);
    let now = sim.now;
    sim.ctl
        .terminate(TerminationCause::Operator, now)
        .expect("terminate");
    sim.drain();
    assert_eq!(
        sim.transitions().last(),
        Some(&(Attached, Terminated, ReasonCode::OperatorTerminated))
    );
}

#[test]
fn the_candidate_list_is_bounded_and_checked_against_policy() {
    let p = policy(|c| c.transport.allowed_protocols = Some(vec![Protocol::Udp, Protocol::Quic]));
    let mut sim = Sim::udp(p, &[1, 2, 3]).expect("sim");
    let now = sim.now;
    let tcp = TransportRef {
        id: TransportId(9),
        protocol: Protocol::Tcp,
    };
    assert_eq!(
        sim.ctl.add_transport(tcp, now),
        Err(ControlError::ProtocolNotAllowed(Protocol::Tcp))
    );
    let quic = TransportRef {
        id: TransportId(9),
        protocol: Protocol::Quic,
    };
    assert_eq!(
        sim.ctl.add_transport(quic, now),
        Err(ControlError::CandidateListFull { limit: 3 })
    );
    let dup = TransportRef {
        id: TransportId(2),
        protocol: Protocol::Udp,
    };
    sim.ctl
        .remove_transport(TransportId(3), now)
        .expect("remove");
    assert_eq!(
        sim.ctl.add_transport(dup, now),
        Err(ControlError::DuplicateTransport(TransportId(2)))
    );
    sim.ctl
        .add_transport(quic, now)
        .expect("room after removal");
}

#[test]
fn removing_the_candidate_in_flight_fails_the_recovery() {
    let mut sim = Sim::udp(Policy::default(), &[1, 2]).expect("sim");
    sim.answer = Answer::Silent;
    sim.run_until_ms(1_000);
    sim.kill(1);
    assert_eq!(sim.ctl.state(), Recovering);
    let now = sim.now;
    sim.ctl
        .remove_transport(TransportId(2), now)
        .expect("remove");
    sim.drain();
    assert_eq!(
        sim.transitions().last(),
        Some(&(Recovering, Degraded, ReasonCode::NoCandidateTransports))
    );
}

#[test]
fn a_reloaded_policy_takes_effect_on_the_live_session_without_a_transition() {
    let mut sim = Sim::udp(Policy::default(), &[1, 2]).expect("sim");
    sim.run_until_ms(10_000);
    assert_eq!(sim.ctl.state(), Attached);
    let version = sim.ctl.version();
    let shorter = policy(|p| {
        p.version = Some("2.0".into());
        p.session.transport_lost_ttl_ms = Some(5_000);
    });
    let now = sim.now;
    sim.ctl.apply_policy(std::sync::Arc::new(shorter), now);
    assert_eq!(
        sim.ctl.version(),
        version,
        "a policy change is no transition"
    );
    assert_eq!(sim.ctl.policy().version(), "2.0");
    // Both paths go silent: the new TTL (5 s), not the old one (15 s), ends it.
    sim.set_loss(1, Loss::All);
    sim.set_loss(2, Loss::All);
    sim.run_until_ms(40_000);
    let applied = sim.events.iter().find_map(|e| match &e.body {
        EventBody::PolicyApplied {
            previous_version,
            new_version,
        } => Some((previous_version.clone(), new_version.clone())),
        _ => None,
    });
    assert_eq!(applied, Some(("1.0".to_string(), "2.0".to_string())));
    let ended = sim
        .first_ms(|b| matches!(b, EventBody::SessionTerminated { .. }))
        .expect("terminated");
    assert!((15_000..=16_000).contains(&ended), "ended at {ended} ms");
    assert!(sim
        .transitions()
        .iter()
        .any(|(_, to, r)| *to == Terminated && *r == ReasonCode::TransportTtlExceeded));
}
