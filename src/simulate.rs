//! `jvpn simulate`: runs one session of the real core over a simulated network on a
//! virtual clock, through a scripted outage, and prints the event stream. An operator
//! can see what a policy does before deploying it; nothing is sent on any network.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::ValueEnum;
use jvpn_core::event::{EventBody, EventRecord, WallClock};
use jvpn_core::fsm::State;
use jvpn_core::ids::NodeId;
use jvpn_core::policy::Policy;
use jvpn_core::sim::{Loss, Sim, SESSION};

/// A scripted outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Two paths; at 10 s the active one goes down.
    Jump,
    /// Two paths; at 10 s the active one starts losing 40 % of its packets.
    Loss,
    /// Two paths; every 3 s the active one goes down and the other comes back.
    Flap,
    /// Two paths; at 10 s both go down and stay down.
    Blackout,
}

/// Runs `scenario` under `policy` for at most `duration`, writing one JSON event per
/// line to `out`; returns the final state.
pub fn run(
    policy: Policy,
    scenario: Scenario,
    duration: Duration,
    node: &NodeId,
    out: &mut dyn Write,
) -> Result<State> {
    let policy_version = policy.version().to_owned();
    let mut sim =
        Sim::udp(policy, &[1, 2]).context("the policy refuses the simulated UDP paths")?;
    let unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let clock = WallClock::new(sim.t0, unix_ms);

    let step = Duration::from_millis(100);
    let mut printed = 0;
    let mut at = Duration::ZERO;
    while at < duration && sim.ctl.state() != State::Terminated {
        script(&mut sim, scenario, at);
        at += step;
        sim.run_until(sim.t0 + at);
        for event in &sim.events[printed..] {
            let offset = event.at.duration_since(sim.t0);
            let record = EventRecord::new(
                &clock,
                SESSION,
                node.clone(),
                policy_version.clone(),
                event.clone(),
            );
            writeln!(out, "{}", record.to_json_line()).context("writing events")?;
            if let EventBody::SessionStateChange {
                previous_state,
                new_state,
                reason_code,
                ..
            } = event.body
            {
                eprintln!(
                    "{:>9.3}s  {previous_state} -> {new_state} ({reason_code})",
                    offset.as_secs_f64()
                );
            }
        }
        printed = sim.events.len();
    }
    Ok(sim.ctl.state())
}

/// The outage script: what happens to the paths at virtual time `at`.
fn script(sim: &mut Sim, scenario: Scenario, at: Duration) {
    let ms = at.as_millis();
    match scenario {
        Scenario::Jump if ms == 10_000 => active_goes_down(sim),
        Scenario::Loss if ms == 10_000 => {
            if let Some(active) = sim.ctl.active() {
                sim.set_loss(active.id.0, Loss::Percent(40));
            }
        }
        Scenario::Flap if ms >= 10_000 && ms % 3_000 == 1_000 => {
            if let Some(active) = sim.ctl.active() {
                sim.revive(3 - active.id.0);
                sim.kill(active.id.0);
            }
        }
        Scenario::Blackout if ms == 10_000 => {
            sim.kill(1);
            sim.kill(2);
        }
        _ => {}
    }
}

fn active_goes_down(sim: &mut Sim) {
    if let Some(active) = sim.ctl.active() {
        sim.kill(active.id.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(out: &[u8]) -> Vec<serde_json::Value> {
        std::str::from_utf8(out)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect()
    }

    #[test]
    fn the_jump_scenario_prints_a_switch_and_ends_attached() {
        let mut out = Vec::new();
        let node = NodeId("sim".into());
        let end = run(
            Policy::default(),
            Scenario::Jump,
            Duration::from_secs(30),
            &node,
            &mut out,
        )
        .expect("run");
        assert_eq!(end, State::Attached);
        let events = events(&out);
        let types: Vec<&str> = events
            .iter()
            .filter_map(|e| e["event_type"].as_str())
            .collect();
        assert_eq!(
            types.iter().filter(|t| **t == "TransportSwitch").count(),
            1,
            "{types:?}"
        );
        assert!(events.iter().all(|e| e["session_id"] == SESSION.to_string()
            && e["node_id"] == "sim"
            && e["policy_version"] == "1.0"));
    }

    #[test]
    fn the_blackout_scenario_ends_at_the_transport_ttl() {
        let mut out = Vec::new();
        let node = NodeId("sim".into());
        let end = run(
            Policy::default(),
            Scenario::Blackout,
            Duration::from_secs(120),
            &node,
            &mut out,
        )
        .expect("run");
        assert_eq!(end, State::Terminated);
        let events = events(&out);
        let last = events.last().expect("events");
        assert_eq!(last["event_type"], "SessionTerminated");
        assert_eq!(last["reason_code"], "transport_ttl_exceeded");
    }
}
