//! Prometheus metrics, through the `metrics` facade.
//!
//! Names follow Prometheus practice: prefix `jvpn_`, base units (`_seconds`, `_bytes`),
//! counters end in `_total`, and no label ever carries a session id or an address (their
//! cardinality is unbounded). Labels take values from closed sets: states, reason codes,
//! protocols, drop reasons. Recording a metric never blocks: the facade's recorder only
//! updates atomics, and the exporter renders on scrape.

use crate::runtime::ActorKind;
use std::net::SocketAddr;
use std::time::Duration;

use jvpn_core::event::{EventBody, ReattachOutcome};
use jvpn_core::fsm::State;
use jvpn_core::ids::Protocol;
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};
use thiserror::Error;

/// Buckets of the reattach latency histogram, in seconds: a jump is expected in tens of
/// milliseconds on a good path and must be seen up to the recovery window.
pub const REATTACH_LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets of actor message handling time, in seconds.
pub const HANDLING_TIME_BUCKETS: &[f64] = &[
    0.000_001, 0.000_005, 0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05,
];

/// Why the exporter could not start.
#[derive(Debug, Error)]
pub enum TelemetryError {
    /// The exporter could not be built or installed (address in use, recorder set).
    #[error("cannot start the metrics exporter on {listen}: {source}")]
    Install {
        /// The configured listen address.
        listen: SocketAddr,
        /// What went wrong.
        source: BuildError,
    },
}

/// The exporter's configuration: explicit histogram buckets (without them the exporter
/// renders summaries, which cannot be aggregated across nodes).
pub fn builder() -> PrometheusBuilder {
    let with_buckets = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("jvpn_reattach_latency_seconds".into()),
            REATTACH_LATENCY_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("jvpn_actor_message_seconds".into()),
                HANDLING_TIME_BUCKETS,
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("jvpn_store_request_seconds".into()),
                STORE_LATENCY_BUCKETS,
            )
        });
    match with_buckets {
        Ok(b) => b,
        // Only an empty bucket list is refused, and both lists above are constants that
        // the unit tests render.
        Err(_) => unreachable!("constant bucket lists are non-empty"),
    }
}

/// Serves `/metrics` on `listen` (a background thread of the exporter's own) and
/// installs the recorder for the whole process.
pub fn install(listen: SocketAddr) -> Result<(), TelemetryError> {
    builder()
        .with_http_listener(listen)
        .install()
        .map_err(|source| TelemetryError::Install { listen, source })?;
    describe();
    Ok(())
}

/// Help texts, shown on the metrics page.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("jvpn_sessions", "Live sessions by state.");
    describe_counter!(
        "jvpn_state_transitions_total",
        "Session state transitions by from, to and reason."
    );
    describe_counter!(
        "jvpn_transport_switches_total",
        "Bindings moved from one transport to another."
    );
    describe_counter!(
        "jvpn_switch_denials_total",
        "Switches wanted but not started, by reason."
    );
    describe_counter!(
        "jvpn_reattach_results_total",
        "Reattach outcomes by result and reason."
    );
    describe_histogram!(
        "jvpn_reattach_latency_seconds",
        Unit::Seconds,
        "From reattach request to its answer."
    );
    describe_counter!(
        "jvpn_sessions_terminated_total",
        "Session terminations by reason."
    );
    describe_counter!(
        "jvpn_security_events_total",
        "Replays and failed validations, by kind and reason."
    );
    describe_counter!(
        "jvpn_key_events_total",
        "Key rotations, expiries and refused rekeys."
    );
    describe_counter!("jvpn_handshakes_total", "Handshakes by result and reason.");
    describe_counter!(
        "jvpn_packets_total",
        "Packets by direction and transport protocol."
    );
    describe_counter!(
        "jvpn_bytes_total",
        Unit::Bytes,
        "Bytes by direction and transport protocol."
    );
    describe_counter!("jvpn_packets_dropped_total", "Dropped packets by reason.");
    describe_counter!(
        "jvpn_icmp_too_big_total",
        "Tunnel packets too large for their path, by what became of the ICMP answer to their sender."
    );
    describe_counter!(
        "jvpn_events_dropped_total",
        "Events dropped because the event queue was full."
    );
    describe_counter!(
        "jvpn_event_write_failures_total",
        "Events the event sink failed to write."
    );
    describe_gauge!(
        "jvpn_actor_mailbox_depth",
        "Messages waiting in actor mailboxes, by actor kind."
    );
    describe_counter!(
        "jvpn_actor_mailbox_refused_total",
        "Messages refused by a bounded mailbox (full, or the actor gone), by actor kind."
    );
    describe_histogram!(
        "jvpn_actor_message_seconds",
        Unit::Seconds,
        "Time to handle one message, by actor kind."
    );
    describe_counter!(
        "jvpn_actor_restarts_total",
        "Actors restarted after stopping unexpectedly, by actor kind."
    );
    describe_histogram!(
        "jvpn_store_request_seconds",
        Unit::Seconds,
        "Time of one request to the cluster's session store (etcd), by operation."
    );
    describe_counter!(
        "jvpn_store_errors_total",
        "Failed requests to the cluster's session store, by operation and kind."
    );
    describe_gauge!(
        "jvpn_cluster_fenced",
        "1 while this node holds no live lease in the cluster's store (it forwards no session), else 0."
    );
    describe_counter!(
        "jvpn_cluster_moves_total",
        "Sessions that moved between nodes, by direction (in: taken here, out: left here)."
    );
}

/// Buckets of the store's request time: 100 µs to 5 s.
const STORE_LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// One request to the cluster's store took `took`; `error` names its failure kind.
pub fn store_request(op: &'static str, took: Duration, error: Option<&'static str>) {
    metrics::histogram!("jvpn_store_request_seconds", "op" => op).record(took.as_secs_f64());
    if let Some(kind) = error {
        metrics::counter!("jvpn_store_errors_total", "op" => op, "kind" => kind).increment(1);
    }
}

/// Whether this node is fenced.
pub fn cluster_fenced(fenced: bool) {
    metrics::gauge!("jvpn_cluster_fenced").set(if fenced { 1.0 } else { 0.0 });
}

/// A session moved here (`in`) or away (`out`).
pub fn cluster_move(direction: &'static str) {
    metrics::counter!("jvpn_cluster_moves_total", "direction" => direction).increment(1);
}

/// A message entered a mailbox of an actor of `kind`.
pub fn enqueued(kind: ActorKind) {
    metrics::gauge!("jvpn_actor_mailbox_depth", "actor" => kind.as_str()).increment(1.0);
}

/// A mailbox of an actor of `kind` refused a message (`why`: full, closed).
pub fn refused(kind: ActorKind, why: &'static str) {
    metrics::counter!("jvpn_actor_mailbox_refused_total", "actor" => kind.as_str(), "why" => why)
        .increment(1);
}

/// An actor of `kind` handled a message that came through a counted mailbox.
pub fn handled(kind: ActorKind, took: Duration) {
    metrics::gauge!("jvpn_actor_mailbox_depth", "actor" => kind.as_str()).decrement(1.0);
    metrics::histogram!("jvpn_actor_message_seconds", "actor" => kind.as_str())
        .record(took.as_secs_f64());
}

/// An actor of `kind` was restarted.
pub fn restarted(kind: ActorKind) {
    metrics::counter!("jvpn_actor_restarts_total", "actor" => kind.as_str()).increment(1);
}

/// Updates the metrics an event concerns. Call once per event, for events of sessions
/// this node owns.
pub fn observe(event: &EventBody) {
    match event {
        EventBody::SessionStateChange {
            previous_state,
            new_state,
            reason_code,
            ..
        } => {
            metrics::counter!(
                "jvpn_state_transitions_total",
                "from" => previous_state.as_str(),
                "to" => new_state.as_str(),
                "reason" => reason_code.as_str(),
            )
            .increment(1);
            // BIRTH is not counted as a live state (a session is only reported once
            // attached), and TERMINATED is not a live state at all.
            if *previous_state != State::Birth {
                metrics::gauge!("jvpn_sessions", "state" => previous_state.as_str()).decrement(1.0);
            }
            if *new_state != State::Terminated {
                metrics::gauge!("jvpn_sessions", "state" => new_state.as_str()).increment(1.0);
            }
        }
        EventBody::TransportSwitch { .. } => {
            metrics::counter!("jvpn_transport_switches_total").increment(1);
        }
        EventBody::TransportSwitchDenied { reason_code, .. } => {
            metrics::counter!("jvpn_switch_denials_total", "reason" => reason_code.as_str())
                .increment(1);
        }
        EventBody::ReattachResult {
            result,
            reason_code,
            ..
        } => {
            let result = match result {
                ReattachOutcome::Success => "success",
                ReattachOutcome::Denied => "denied",
            };
            metrics::counter!(
                "jvpn_reattach_results_total",
                "result" => result,
                "reason" => reason_code.as_str(),
            )
            .increment(1);
        }
        EventBody::SessionTerminated { reason_code, .. } => {
            metrics::counter!("jvpn_sessions_terminated_total", "reason" => reason_code.as_str())
                .increment(1);
        }
        EventBody::SecurityReplayDetected { reason_code, .. } => {
            metrics::counter!("jvpn_security_events_total", "kind" => "replay", "reason" => reason_code.as_str())
                .increment(1);
        }
        EventBody::SecurityValidationFailed { reason_code, .. } => {
            metrics::counter!("jvpn_security_events_total", "kind" => "validation", "reason" => reason_code.as_str())
                .increment(1);
        }
        EventBody::KeyRotated { .. } => {
            metrics::counter!("jvpn_key_events_total", "kind" => "rotated").increment(1);
        }
        EventBody::KeyExpired { .. } => {
            metrics::counter!("jvpn_key_events_total", "kind" => "expired").increment(1);
        }
        EventBody::RekeyDenied { .. } => {
            metrics::counter!("jvpn_key_events_total", "kind" => "rekey_denied").increment(1);
        }
        EventBody::TransitionRejected { .. }
        | EventBody::TransportAttached { .. }
        | EventBody::ReattachAttempt { .. }
        | EventBody::PolicyApplied { .. }
        // Counted by the cluster's actor, which knows which way the session moved.
        | EventBody::SessionMoved { .. } => {}
    }
}

/// The time from a reattach request to its answer.
pub fn reattach_latency(elapsed: Duration) {
    metrics::histogram!("jvpn_reattach_latency_seconds").record(elapsed.as_secs_f64());
}

/// A handshake that completed (`reason` None) or was refused with `reason`.
pub fn handshake(reason: Option<&'static str>) {
    match reason {
        None => metrics::counter!("jvpn_handshakes_total", "result" => "ok", "reason" => "")
            .increment(1),
        Some(r) => metrics::counter!("jvpn_handshakes_total", "result" => "failed", "reason" => r)
            .increment(1),
    }
}

/// Which way a packet went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Received from the network.
    Rx,
    /// Sent to the network.
    Tx,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Rx => "rx",
            Direction::Tx => "tx",
        }
    }
}

/// The packet and byte counters of one direction and protocol, looked up once (a
/// transport's sends count through it without a registry lookup per send).
pub struct TrafficMeter {
    packets: metrics::Counter,
    bytes: metrics::Counter,
}

impl TrafficMeter {
    /// The counters of `direction` and `protocol`, from the recorder installed now.
    pub fn new(direction: Direction, protocol: Protocol) -> Self {
        let (d, p) = (direction.as_str(), protocol.as_str());
        TrafficMeter {
            packets: metrics::counter!("jvpn_packets_total", "direction" => d, "protocol" => p),
            bytes: metrics::counter!("jvpn_bytes_total", "direction" => d, "protocol" => p),
        }
    }

    /// Counts `count` packets of `bytes` bytes in all.
    pub fn record(&self, count: usize, bytes: usize) {
        self.packets.increment(count as u64);
        self.bytes.increment(bytes as u64);
    }
}

/// A dropped packet, by its reason's stable label.
pub fn dropped(reason: &'static str) {
    dropped_n(reason, 1);
}

/// A tunnel packet too large for its path was dropped; `outcome` says what became of
/// the ICMP answer to its sender (sent, over_budget, not_written, or why it has none).
pub fn icmp_too_big(outcome: &'static str) {
    metrics::counter!("jvpn_icmp_too_big_total", "outcome" => outcome).increment(1);
}

/// `count` dropped packets, by their reason's stable label.
pub fn dropped_n(reason: &'static str, count: usize) {
    metrics::counter!("jvpn_packets_dropped_total", "reason" => reason).increment(count as u64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use jvpn_core::event::TransportRef;
    use jvpn_core::ids::{StateVersion, TransportId};
    use jvpn_core::reason::ReasonCode;

    fn change(from: State, to: State, reason: ReasonCode) -> EventBody {
        EventBody::SessionStateChange {
            previous_state: from,
            new_state: to,
            reason_code: reason,
            state_version: StateVersion(1),
        }
    }

    fn render(f: impl FnOnce()) -> String {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, f);
        handle.render()
    }

    #[test]
    fn a_jump_shows_in_transitions_sessions_by_state_and_switches() {
        let text = render(|| {
            for e in [
                change(
                    State::Birth,
                    State::Attached,
                    ReasonCode::AttachedToTransport,
                ),
                change(State::Attached, State::Volatile, ReasonCode::TransportDead),
                change(
                    State::Volatile,
                    State::Recovering,
                    ReasonCode::DeadTransportRecovery,
                ),
                EventBody::TransportSwitch {
                    previous_transport: None,
                    new_transport: TransportRef {
                        id: TransportId(2),
                        protocol: Protocol::Udp,
                    },
                    candidate_count: 2,
                    loss_ratio: 0.0,
                    latency_estimate_ms: None,
                    explicit: true,
                },
                change(
                    State::Recovering,
                    State::Attached,
                    ReasonCode::ReattachSuccess,
                ),
            ] {
                observe(&e);
            }
            reattach_latency(Duration::from_millis(30));
        });
        assert!(text.contains(
            r#"jvpn_state_transitions_total{from="ATTACHED",to="VOLATILE",reason="transport_dead"} 1"#
        ), "{text}");
        assert!(
            text.contains(r#"jvpn_sessions{state="ATTACHED"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"jvpn_sessions{state="VOLATILE"} 0"#),
            "{text}"
        );
        assert!(text.contains("jvpn_transport_switches_total 1"), "{text}");
        // A histogram with the explicit buckets, not a summary.
        assert!(
            text.contains("# TYPE jvpn_reattach_latency_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains(r#"jvpn_reattach_latency_seconds_bucket{le="0.05"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"jvpn_reattach_latency_seconds_bucket{le="0.025"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn a_termination_leaves_no_live_session_and_counts_its_reason() {
        let text = render(|| {
            observe(&change(
                State::Birth,
                State::Attached,
                ReasonCode::AttachedToTransport,
            ));
            observe(&change(
                State::Attached,
                State::Terminated,
                ReasonCode::OperatorTerminated,
            ));
            observe(&EventBody::SessionTerminated {
                reason_code: ReasonCode::OperatorTerminated,
                session_age_ms: 5,
                transportless_age_ms: 0,
            });
        });
        assert!(
            text.contains(r#"jvpn_sessions{state="ATTACHED"} 0"#),
            "{text}"
        );
        assert!(!text.contains(r#"state="TERMINATED""#), "{text}");
        assert!(
            text.contains(r#"jvpn_sessions_terminated_total{reason="operator_terminated"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn traffic_and_drops_are_counted_by_closed_label_sets() {
        let text = render(|| {
            TrafficMeter::new(Direction::Tx, Protocol::Udp).record(1, 1_436);
            TrafficMeter::new(Direction::Tx, Protocol::Udp).record(1, 100);
            TrafficMeter::new(Direction::Rx, Protocol::Tcp).record(1, 64);
            dropped("replay");
            handshake(Some("unauthorized_client"));
        });
        assert!(
            text.contains(r#"jvpn_packets_total{direction="tx",protocol="udp"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"jvpn_bytes_total{direction="tx",protocol="udp"} 1536"#),
            "{text}"
        );
        assert!(
            text.contains(r#"jvpn_bytes_total{direction="rx",protocol="tcp"} 64"#),
            "{text}"
        );
        assert!(
            text.contains(r#"jvpn_packets_dropped_total{reason="replay"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"jvpn_handshakes_total{result="failed",reason="unauthorized_client"} 1"#
            ),
            "{text}"
        );
    }
}
