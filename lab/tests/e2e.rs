//! End to end over the real kernel network stack: `jvpn gateway` and `jvpn client` in
//! network namespaces joined by two veth paths, real TUN devices on both sides, a server
//! behind the gateway, and real traffic (ping, and TCP transfers whose every byte is
//! checked). See src/netlab.rs for the topology and lab/src/lib.rs for the test tools.
//!
//! Needs root and /dev/net/tun. Under CI=true a missing prerequisite fails the run;
//! otherwise these tests are skipped with the reason printed. They run one at a time
//! (each owns the machine's timing while it runs).

use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use jvpn::netlab::{
    self, transitions, wait_until, Lab, Path2, CLIENT_TUNNEL, CLIENT_TUNNEL6, GATEWAY_A,
    GATEWAY_A6, GATEWAY_TUNNEL6, SERVER, SERVER6,
};
use jvpn_lab::{await_transfer, start_transfer_between, LabTools};
use serde_json::Value;

/// The `jvpn` binary under test (built by the same `cargo test`).
fn jvpn() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| jvpn_lab::jvpn_bin().display().to_string())
}

/// The lab's tools (`jvpn-lab`, dev-only).
fn tool() -> &'static str {
    env!("CARGO_BIN_EXE_jvpn-lab")
}

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The policy the scenarios run under: fast enough that a test takes seconds.
const FAST_POLICY: &str = "[policy.volatility]\nheartbeat_interval_ms = 100\nheartbeat_volatile_ms = 600\nprobe_interval_ms = 200\nloss_window_ms = 1000\nvolatile_to_degraded_ms = 2000\n[policy.switching]\nswitch_cooldown_ms = 1000\n[policy.session]\ntransport_lost_ttl_ms = 4000\n";

/// A lab, or `None` (see [`jvpn_lab::lab_or_skip`]).
fn lab(tag: &str) -> Option<Lab> {
    jvpn_lab::lab_or_skip(tag)
}

fn tag_of(lab: &Lab) -> String {
    lab.ns("").trim_start_matches("jv").to_string()
}

/// Starts the gateway and the client; returns the session id once attached.
fn connect(lab: &mut Lab, policy: &str, on_end: &str) -> String {
    lab.start_gateway(policy).expect("gateway");
    lab.start_client(on_end, policy).expect("client")
}

fn ping(lab: &Lab, from: &str, to: &str, count: u32) -> u32 {
    let out = lab
        .exec(
            &lab.ns(from),
            &[
                "ping",
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                "0.2",
                "-W",
                "2",
                to,
            ],
        )
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    netlab::ping_gap(&text, count, Duration::from_millis(200)).received
}

/// A checked TCP transfer from the client to the server; returns Mbit/s.
fn transfer(lab: &mut Lab, bytes: u64, pace_ms: Option<u64>) -> f64 {
    let listen = format!("{SERVER}:5201");
    start_transfer_between(lab, "", ("c", "s"), &listen, bytes, pace_ms);
    await_transfer(lab, "", bytes)
}

fn t(a: &str, b: &str, r: &str) -> (String, String, String) {
    (a.into(), b.into(), r.into())
}

/// Stops everything and checks that nothing is left: processes, TUN devices,
/// namespaces.
fn finish(mut lab: Lab) {
    let c = lab.ns("c");
    let dev = lab.tun_name();
    if lab.is_running("client") {
        // SIGTERM: the session ends explicitly and the client exits 0.
        let code = lab.stop("client", Duration::from_secs(5));
        assert_eq!(code, Some(0), "client exit\n{}", lab.diagnostics());
    }
    let gone = wait_until(Duration::from_secs(3), || !lab.link_exists(&c, &dev));
    assert!(gone, "the client's TUN outlived it");
    let gateway_code = lab.stop("gateway", Duration::from_secs(5));
    assert!(
        gateway_code.is_some(),
        "the gateway did not exit on SIGTERM"
    );
    let g = lab.ns("g");
    assert!(
        !lab.link_exists(&g, &lab.tun_name()),
        "the gateway's TUN outlived it"
    );
    // The client removed the rules it added, of both families (only the kernel's
    // remain: three for IPv4, two for IPv6).
    let rules = lab.exec_ok(&c, &["ip", "rule", "show"]).expect("ip rule");
    assert_eq!(rules.lines().count(), 3, "rules left behind:\n{rules}");
    let rules = lab
        .exec_ok(&c, &["ip", "-6", "rule", "show"])
        .expect("ip -6 rule");
    assert_eq!(rules.lines().count(), 2, "IPv6 rules left behind:\n{rules}");
    let tag = tag_of(&lab);
    drop(lab);
    assert_gone(&tag);
}

/// No namespace and no process of the lab `tag` is left.
fn assert_gone(tag: &str) {
    assert!(Lab::leftovers(tag).is_empty(), "namespaces left behind");
    assert!(
        Lab::leftover_processes(tag).is_empty(),
        "processes left behind"
    );
}

#[test]
fn traffic_flows_both_ways_and_reaches_the_network_behind_the_gateway() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e1") else { return };
    let id = connect(&mut lab, FAST_POLICY, "exit");
    assert_eq!(
        ping(&lab, "c", SERVER, 5),
        5,
        "client → server\n{}",
        lab.diagnostics()
    );
    assert_eq!(ping(&lab, "s", CLIENT_TUNNEL, 5), 5, "server → client");
    assert_eq!(
        ping(&lab, "c", netlab::GATEWAY_TUNNEL, 3),
        3,
        "client → gateway tunnel address"
    );
    let mbps = transfer(&mut lab, 10_000_000, None);
    eprintln!(
        "TCP through the tunnel (client → server, 10 MB, every byte checked): {mbps:.0} Mbit/s"
    );
    let gw = lab.status("gw").expect("gateway status");
    assert_eq!(gw["sessions"][0]["session_id"].as_str(), Some(id.as_str()));
    assert_eq!(
        gw["sessions"][0]["tunnel_addresses"],
        serde_json::json!([format!("{CLIENT_TUNNEL}/24")])
    );
    // Both ends run on this machine and offer what it has: the best cipher of it,
    // agreed, and shown by both.
    let here = jvpn_core::crypto::CipherSet::this_machine();
    let agreed = here.choose(here).name();
    assert_eq!(gw["sessions"][0]["cipher"].as_str(), Some(agreed));
    let client = lab.status("client").expect("client status");
    assert_eq!(client["cipher"].as_str(), Some(agreed));
    // The operator's view: the gateway's metrics page, from inside its namespace.
    let g = lab.ns("g");
    let page = lab
        .exec_ok(&g, &[tool(), "fetch", "--addr", "127.0.0.1:9477"])
        .expect("metrics page");
    // The value of the first series whose rendering starts with `series`.
    let value = |series: &str| {
        page.lines()
            .filter(|l| l.starts_with(series))
            .find_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(value("jvpn_sessions{state=\"ATTACHED\"}"), 1.0, "{page}");
    assert!(
        value("jvpn_handshakes_total{result=\"ok\"") >= 1.0,
        "{page}"
    );
    assert!(page.contains("jvpn_packets_total"), "{page}");
    // Nothing but the client's own traffic came through (an IPv4-only tunnel carries no
    // IPv6 chatter of the kernel's).
    assert_eq!(
        metric(
            &page,
            "jvpn_packets_dropped_total{reason=\"spoofed_source\"}"
        ),
        0.0,
        "{page}"
    );
    finish(lab);
}

#[derive(Debug, Clone, Copy)]
enum Cut {
    /// nftables drops the VPN's packets on path A at the gateway: silence.
    Firewall,
    /// The client's link on path A goes down: sends fail at once.
    LinkDown,
}

/// Starts a checked TCP transfer (client → server) in the background, spread over
/// `pace_ms`.
fn start_transfer(lab: &mut Lab, bytes: u64, pace_ms: u64) {
    let listen = format!("{SERVER}:5201");
    start_transfer_between(lab, "", ("c", "s"), &listen, bytes, Some(pace_ms));
}

/// Path A is cut under traffic; returns the ping gap.
fn jump(cut: Cut, tag: &str) -> Option<Duration> {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = lab(tag)?;
    let id = connect(&mut lab, FAST_POLICY, "exit");
    let before = lab.status("client").expect("status");
    assert_eq!(before["active_transport"], 1);
    let tunnel = before["tunnel_addresses"].clone();
    start_transfer(&mut lab, 4_000_000, 6_000);
    let c = lab.ns("c");
    lab.spawn(
        "ping",
        &c,
        &["ping", "-n", "-i", "0.05", "-c", "160", "-W", "1", SERVER],
    )
    .expect("ping");
    std::thread::sleep(Duration::from_millis(1_500));
    match cut {
        Cut::Firewall => lab.cut(Path2::A).expect("cut"),
        Cut::LinkDown => lab.link(Path2::A, false).expect("link down"),
    }
    let jumped = wait_until(Duration::from_secs(5), || lab.attached_on(2));
    assert!(jumped, "no jump to path B\n{}", lab.diagnostics());
    assert!(
        lab.wait("ping", Duration::from_secs(20)).is_some(),
        "ping did not end"
    );
    let (ping_out, _) = lab.output_of("ping");
    let gap = netlab::ping_gap(&ping_out, 160, Duration::from_millis(50));
    eprintln!(
        "{cut:?} cut of path A: ping gap {} ms ({} of {} replies)",
        gap.longest_gap.as_millis(),
        gap.received,
        gap.sent
    );
    // The TCP transfer spanning the jump completes with every byte right.
    assert_eq!(
        lab.wait("source", Duration::from_secs(30)),
        Some(0),
        "sender failed: {:?}",
        lab.output_of("source")
    );
    assert_eq!(
        lab.wait("sink", Duration::from_secs(30)),
        Some(0),
        "receiver failed: {:?}",
        lab.output_of("sink")
    );
    let after = lab.status("client").expect("status");
    assert_eq!(
        after["session_id"].as_str(),
        Some(id.as_str()),
        "the session id changed"
    );
    assert_eq!(
        after["tunnel_addresses"], tunnel,
        "the tunnel address changed"
    );
    let gw = lab.status("gw").expect("gateway status");
    assert_eq!(gw["sessions"][0]["session_id"].as_str(), Some(id.as_str()));
    assert!(
        gw["sessions"][0]["active_transport"]
            .as_str()
            .is_some_and(|t| t.contains(&format!("{}:", netlab::CLIENT_B))),
        "gateway binding: {}",
        gw["sessions"][0]["active_transport"]
    );
    // Silence is seen as loss or as a heartbeat timeout, whichever trigger holds first
    // (spec/state-machine.md); a link down is reported by the socket itself.
    let events = lab.events("client");
    let seen = transitions(&events);
    let volatile = seen.get(1).map(|t| t.2.clone()).unwrap_or_default();
    let recovery = match (cut, volatile.as_str()) {
        (Cut::Firewall, "heartbeat_timeout") => "dead_transport_recovery",
        (Cut::Firewall, "loss_threshold_exceeded" | "consecutive_drop_exceeded") => "loss_recovery",
        (Cut::LinkDown, "transport_dead") => "dead_transport_recovery",
        _ => panic!("{cut:?}: unexpected trigger {volatile:?} in {seen:?}"),
    };
    let expected = [
        t("BIRTH", "ATTACHED", "attached_to_transport"),
        t("ATTACHED", "VOLATILE", &volatile),
        t("VOLATILE", "RECOVERING", recovery),
        t("RECOVERING", "ATTACHED", "reattach_success"),
    ];
    assert_eq!(seen, expected, "client events");
    let switches = events
        .iter()
        .filter(|e| e["event_type"] == "TransportSwitch")
        .count();
    assert_eq!(switches, 1);
    let gw_events = lab.events("gw");
    assert_eq!(
        gw_events
            .iter()
            .filter(|e| e["event_type"] == "TransportSwitch")
            .count(),
        1
    );
    assert!(gw_events
        .iter()
        .all(|e| e["session_id"] == id.as_str() && e["node_id"] == format!("gw-{tag}")));
    // A person reading the client's standard error sees the jump in one line.
    let (_, stderr) = lab.output_of("client");
    let moved = format!(
        "session {id} moved from {}:{} to {}:{}",
        netlab::GATEWAY_A,
        netlab::PORT,
        netlab::GATEWAY_B,
        netlab::PORT
    );
    assert!(stderr.contains(&moved), "{stderr}");
    finish(lab);
    Some(gap.longest_gap)
}

#[test]
fn a_firewalled_path_makes_the_session_jump_with_its_identity() {
    jump(Cut::Firewall, "e2a");
}

#[test]
fn a_link_down_makes_the_session_jump_with_its_identity() {
    jump(Cut::LinkDown, "e2b");
}

fn count(events: &[Value], event_type: &str) -> usize {
    events
        .iter()
        .filter(|e| e["event_type"] == event_type)
        .count()
}

#[test]
fn a_loss_spike_moves_the_session_and_flapping_is_bounded_by_policy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e3") else { return };
    // Loss decides here: heartbeat timeouts and consecutive drops are set out of reach.
    let policy = "[policy.volatility]\nheartbeat_interval_ms = 100\nheartbeat_volatile_ms = 3000\n\
        probe_interval_ms = 200\nloss_window_ms = 1000\nloss_min_samples = 5\n\
        max_consecutive_drops = 1000\n\
        [policy.switching]\nmax_switches_per_min = 2\nswitch_cooldown_ms = 500\n\
        [policy.session]\ntransport_lost_ttl_ms = 20000\n";
    let id = connect(&mut lab, policy, "exit");
    lab.lossy(Path2::A, netlab::PORT, 40).expect("loss on A");
    let moved = wait_until(Duration::from_secs(10), || lab.attached_on(2));
    assert!(moved, "no move to path B\n{}", lab.diagnostics());
    let seen = transitions(&lab.events("client"));
    assert_eq!(
        seen.get(1..4),
        Some(
            &[
                t("ATTACHED", "VOLATILE", "loss_threshold_exceeded"),
                t("VOLATILE", "RECOVERING", "loss_recovery"),
                t("RECOVERING", "ATTACHED", "reattach_success"),
            ][..]
        ),
        "{seen:?}"
    );
    // Flapping: B fails, A is fine again (switch 2); then A fails again: a third switch
    // within the minute is over max_switches_per_min.
    lab.heal(Path2::A).expect("heal A");
    std::thread::sleep(Duration::from_millis(1_500));
    lab.lossy(Path2::B, netlab::PORT, 40).expect("loss on B");
    let back = wait_until(Duration::from_secs(10), || lab.attached_on(1));
    assert!(back, "no move back to path A\n{}", lab.diagnostics());
    lab.heal(Path2::B).expect("heal B");
    std::thread::sleep(Duration::from_millis(1_500));
    lab.lossy(Path2::A, netlab::PORT, 40)
        .expect("loss on A again");
    let denied = wait_until(Duration::from_secs(10), || {
        count(&lab.events("client"), "TransportSwitchDenied") > 0
    });
    assert!(
        denied,
        "no switch denied\n{:?}",
        transitions(&lab.events("client"))
    );
    let events = lab.events("client");
    assert_eq!(
        count(&events, "TransportSwitch"),
        2,
        "{:?}",
        transitions(&events)
    );
    let reasons: Vec<&str> = events
        .iter()
        .filter(|e| e["event_type"] == "TransportSwitchDenied")
        .filter_map(|e| e["reason_code"].as_str())
        .collect();
    assert!(
        reasons
            .iter()
            .all(|r| *r == "switch_rate_limited" || *r == "cooldown_active"),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"switch_rate_limited"), "{reasons:?}");
    assert!(transitions(&events).contains(&t("VOLATILE", "DEGRADED", "switch_rate_limited")));
    let now = lab.status("client").expect("status");
    assert_eq!(now["session_id"].as_str(), Some(id.as_str()));
    finish(lab);
}

#[test]
fn all_paths_cut_degrade_then_end_at_the_ttl_and_a_reconnecting_client_starts_a_new_session() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // First, a client set to exit.
    {
        let Some(mut lab) = lab("e4a") else { return };
        let id = connect(&mut lab, FAST_POLICY, "exit");
        let cut_at = Instant::now();
        lab.cut(Path2::A).expect("cut A");
        lab.cut(Path2::B).expect("cut B");
        let code = lab.wait("client", Duration::from_secs(10));
        let lived = cut_at.elapsed();
        assert_eq!(
            code,
            Some(1),
            "the client did not exit non-zero\n{}",
            lab.diagnostics()
        );
        assert!(
            lived >= Duration::from_millis(3_500),
            "ended after only {lived:?}"
        );
        let (_, err) = lab.output_of("client");
        assert!(
            err.contains("session ended: transport_ttl_exceeded"),
            "{err}"
        );
        let seen = transitions(&lab.events("client"));
        let last_two: Vec<_> = seen.iter().rev().take(2).rev().cloned().collect();
        assert_eq!(
            last_two,
            [
                t("VOLATILE", "DEGRADED", "volatile_persisted"),
                t("DEGRADED", "TERMINATED", "transport_ttl_exceeded")
            ],
            "{seen:?}"
        );
        let gw_ended = wait_until(Duration::from_secs(5), || {
            lab.status("gw")
                .is_some_and(|s| s["sessions"].as_array().is_some_and(|a| a.is_empty()))
        });
        assert!(gw_ended, "the gateway kept the session");
        assert!(lab
            .events("gw")
            .iter()
            .any(|e| e["event_type"] == "SessionTerminated"
                && e["reason_code"] == "transport_ttl_exceeded"
                && e["session_id"] == id.as_str()));
        let c = lab.ns("c");
        assert!(!lab.link_exists(&c, &lab.tun_name()), "TUN left behind");
        let g = lab.ns("g");
        lab.stop("gateway", Duration::from_secs(5));
        assert!(
            !lab.link_exists(&g, &lab.tun_name()),
            "gateway TUN left behind"
        );
        drop(lab);
        assert_gone("e4a");
    }
    // Then one set to reconnect: a NEW session, explicitly.
    let Some(mut lab) = lab("e4b") else { return };
    let first = connect(&mut lab, FAST_POLICY, "reconnect");
    lab.cut(Path2::A).expect("cut A");
    lab.cut(Path2::B).expect("cut B");
    let ended = wait_until(Duration::from_secs(10), || {
        lab.events("client")
            .iter()
            .any(|e| e["event_type"] == "SessionTerminated")
    });
    assert!(ended, "the session did not end\n{}", lab.diagnostics());
    lab.heal(Path2::A).expect("heal");
    lab.heal(Path2::B).expect("heal");
    let again = wait_until(Duration::from_secs(15), || {
        lab.status("client").is_some_and(|s| {
            s["state"] == "ATTACHED" && s["session_id"].as_str().is_some_and(|i| i != first)
        })
    });
    assert!(again, "no new session\n{}", lab.diagnostics());
    let s = lab.status("client").expect("status");
    assert_eq!(s["sessions_established"], 2);
    assert_eq!(s["last_end"], "transport_ttl_exceeded");
    let second = s["session_id"].as_str().expect("id").to_string();
    assert!(lab
        .events("client")
        .iter()
        .any(|e| e["session_id"] == second.as_str()
            && e["event_type"] == "SessionStateChange"
            && e["new_state"] == "ATTACHED"
            && e["reason_code"] == "attached_to_transport"));
    assert_eq!(ping(&lab, "c", SERVER, 3), 3, "traffic on the new session");
    // The end and the new session, each in one line on the client's standard error.
    let (_, stderr) = lab.output_of("client");
    assert!(
        stderr.contains(&format!("session {first} ended: transport_ttl_exceeded"))
            && stderr.contains(&format!("new session {second} via ")),
        "{stderr}"
    );
    finish(lab);
}

#[test]
fn an_operator_terminates_a_session_from_the_command_line() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e5") else { return };
    let id = connect(&mut lab, FAST_POLICY, "exit");
    let bin = jvpn();
    let sock = lab.socket("gw").display().to_string();
    let listed = std::process::Command::new(bin)
        .args(["sessions", "--socket", &sock])
        .output()
        .expect("jvpn sessions");
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    assert!(listed.starts_with(&format!("{id} ATTACHED")), "{listed}");
    // The owner is the node that answers: the lab's gateway.
    assert!(
        listed
            .trim_end()
            .ends_with(&format!(" gw-{}", tag_of(&lab))),
        "{listed}"
    );
    let shown = std::process::Command::new(bin)
        .args([
            "status",
            "--socket",
            &lab.socket("client").display().to_string(),
        ])
        .output()
        .expect("jvpn status");
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(
        shown.contains(&format!("session {id}")) && shown.contains("candidates:"),
        "{shown}"
    );
    let out = std::process::Command::new(bin)
        .args(["terminate", &id, "--socket", &sock])
        .output()
        .expect("jvpn terminate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.wait("client", Duration::from_secs(5)), Some(1));
    let (_, err) = lab.output_of("client");
    assert!(err.contains("session ended: operator_terminated"), "{err}");
    let ends = |who: &str| {
        lab.events(who)
            .iter()
            .filter(|e| e["event_type"] == "SessionTerminated")
            .map(|e| e["reason_code"].as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ends("client"), ["operator_terminated"]);
    assert!(wait_until(Duration::from_secs(2), || ends("gw")
        == ["operator_terminated"]));
    let again = std::process::Command::new(bin)
        .args(["terminate", &id, "--socket", &sock])
        .output()
        .expect("jvpn terminate");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("no live session"));
    finish(lab);
}

#[test]
fn a_replayed_reattach_request_from_another_address_is_refused() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e6") else { return };
    connect(&mut lab, FAST_POLICY, "exit");
    // Capture the reattach request the client sends on path B when path A dies.
    let g = lab.ns("g");
    let port = netlab::PORT.to_string();
    lab.spawn(
        "capture",
        &g,
        &[
            tool(),
            "capture",
            "--port",
            &port,
            "--first-byte",
            "8",
            "--timeout",
            "20",
        ],
    )
    .expect("capture");
    std::thread::sleep(Duration::from_millis(300));
    lab.link(Path2::A, false).expect("link down");
    let jumped = wait_until(Duration::from_secs(5), || lab.attached_on(2));
    assert!(jumped, "{}", lab.diagnostics());
    assert_eq!(
        lab.wait("capture", Duration::from_secs(5)),
        Some(0),
        "{:?}",
        lab.output_of("capture")
    );
    let (captured, _) = lab.output_of("capture");
    let binding = || {
        lab.status("gw")
            .map(|s| s["sessions"][0]["active_transport"].clone())
    };
    let before = binding();
    // The same bytes again, from another address (another port on the client's host).
    let c = lab.ns("c");
    let bind = format!("{}:40000", netlab::CLIENT_B);
    let to = format!("{}:{}", netlab::GATEWAY_B, netlab::PORT);
    lab.exec_ok(
        &c,
        &[
            tool(),
            "udp-send",
            "--bind",
            &bind,
            "--to",
            &to,
            "--hex",
            captured.trim(),
        ],
    )
    .expect("replay");
    let refused = wait_until(Duration::from_secs(3), || {
        lab.events("gw").iter().any(|e| {
            e["event_type"] == "SecurityReplayDetected" && e["reason_code"] == "replay_detected"
        })
    });
    assert!(refused, "no replay_detected at the gateway");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(binding(), before, "the binding moved");
    assert_eq!(count(&lab.events("gw"), "TransportSwitch"), 1);
    assert_eq!(
        ping(&lab, "c", SERVER, 3),
        3,
        "the session still carries traffic"
    );
    finish(lab);
}

#[test]
fn a_restarted_gateway_gets_a_new_session_explicitly() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e7") else { return };
    let first = connect(&mut lab, FAST_POLICY, "reconnect");
    let gw = lab
        .gateway_config(FAST_POLICY)
        .expect("config")
        .display()
        .to_string();
    let g = lab.ns("g");
    let new_session = |lab: &Lab, not: &str| {
        wait_until(Duration::from_secs(15), || {
            lab.status("client").is_some_and(|s| {
                s["state"] == "ATTACHED" && s["session_id"].as_str().is_some_and(|i| i != not)
            })
        })
    };
    // A clean restart: the gateway tells the client (operator_terminated) as it stops.
    assert!(lab.stop("gateway", Duration::from_secs(5)).is_some());
    lab.spawn_jvpn("gateway", &g, &["gateway", "--config", &gw])
        .expect("gateway again");
    assert!(
        new_session(&lab, &first),
        "no new session after a clean restart\n{}",
        lab.diagnostics()
    );
    let s = lab.status("client").expect("status");
    assert_eq!(s["last_end"], "operator_terminated");
    let second = s["session_id"].as_str().expect("id").to_string();
    // A crash: the table is gone and nobody says so; the session ends at its TTL.
    lab.kill("gateway");
    lab.spawn_jvpn("gateway", &g, &["gateway", "--config", &gw])
        .expect("gateway again");
    assert!(
        new_session(&lab, &second),
        "no new session after a crash\n{}",
        lab.diagnostics()
    );
    let s = lab.status("client").expect("status");
    assert_eq!(s["last_end"], "transport_ttl_exceeded");
    assert_eq!(s["sessions_established"], 3);
    assert_eq!(ping(&lab, "c", SERVER, 3), 3);
    finish(lab);
}

#[test]
fn a_wrong_gateway_key_and_a_bad_config_fail_fast_and_clearly() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bin = jvpn();
    // A bad file: refused before anything is created.
    let dir = std::env::temp_dir().join(format!("jvbad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("gateway.toml");
    std::fs::write(
        &bad,
        "node_id = \"gw\"\nprivate_key = \"x\"\nlisten = [\"127.0.0.1:1\"]\n[tunnel]\nname = \"jvbad0\"\naddress = \"10.77.0.1/24\"\nmtu = 10\n",
    )
    .expect("write");
    let started = Instant::now();
    let out = std::process::Command::new(bin)
        .args(["gateway", "--config", &bad.display().to_string()])
        .output()
        .expect("jvpn gateway");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("private_key"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    std::fs::write(
        &bad,
        std::fs::read_to_string(&bad).expect("read").replace(
            "\"x\"",
            &format!(
                "\"{}\"",
                jvpn_core::crypto::Keypair::generate()
                    .expect("key")
                    .private_base64()
                    .as_str()
            ),
        ),
    )
    .expect("write");
    let out = std::process::Command::new(bin)
        .args(["gateway", "--config", &bad.display().to_string()])
        .output()
        .expect("jvpn gateway");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tunnel.mtu"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);

    // A wrong gateway key: no answer ever comes; the client says so and exits.
    let Some(mut lab) = lab("e8") else { return };
    let gw = lab
        .gateway_config(FAST_POLICY)
        .expect("config")
        .display()
        .to_string();
    let g = lab.ns("g");
    // A tunnel address the device cannot take (IPv6 turned off for new devices in the
    // namespace): the error names the address and why, not a guess about permissions.
    let v6 = std::fs::read_to_string(&gw)
        .expect("config")
        .replace(&format!("{}/24", netlab::GATEWAY_TUNNEL), "fd77::1/64")
        .replace(CLIENT_TUNNEL, "fd77::2");
    let v6_path = format!("{gw}.v6.toml");
    std::fs::write(&v6_path, v6).expect("write");
    let no_v6 = "/proc/sys/net/ipv6/conf/default/disable_ipv6";
    lab.exec_ok(&g, &["sh", "-c", &format!("echo 1 > {no_v6}")])
        .expect("sysctl");
    let out = lab
        .exec(&g, &[bin, "gateway", "--config", &v6_path])
        .expect("jvpn gateway");
    lab.exec_ok(&g, &["sh", "-c", &format!("echo 0 > {no_v6}")])
        .expect("sysctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("fd77::1/64 was refused")
            && err.contains("IPv6 is disabled")
            && !err.contains("CAP_NET_ADMIN"),
        "{err}"
    );
    lab.spawn_jvpn("gateway", &g, &["gateway", "--config", &gw])
        .expect("gateway");
    assert!(wait_until(Duration::from_secs(10), || lab
        .status("gw")
        .is_some()));
    let wrong = jvpn_core::crypto::Keypair::generate()
        .expect("key")
        .public()
        .to_string();
    let cl = lab
        .client_config("exit", &wrong, FAST_POLICY)
        .expect("config")
        .display()
        .to_string();
    let c = lab.ns("c");
    let started = Instant::now();
    lab.spawn_jvpn(
        "client",
        &c,
        &["client", "--config", &cl, "--connect-timeout", "3"],
    )
    .expect("client");
    assert_eq!(lab.wait("client", Duration::from_secs(10)), Some(1));
    assert!(started.elapsed() < Duration::from_secs(8));
    let (_, err) = lab.output_of("client");
    assert!(err.contains("gateway_public_key"), "{err}");
    assert!(!lab.link_exists(&c, &lab.tun_name()));
    lab.stop("gateway", Duration::from_secs(5));
    drop(lab);
    assert_gone("e8");
}

#[test]
fn a_full_tunnel_carries_everything_but_its_own_transports_and_is_undone_on_exit() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e9") else { return };
    // No route to the server's network but the tunnel's default route (table 51820,
    // taken by every unmarked packet); the transports' packets carry the mark and stay
    // on the main table, as with wg-quick.
    lab.client_routes = "networks = []\nfull_tunnel = true\nfwmark = 51820\n".into();
    let id = connect(&mut lab, FAST_POLICY, "exit");
    let c = lab.ns("c");
    let rules = lab.exec_ok(&c, &["ip", "rule", "show"]).expect("ip rule");
    assert!(
        rules.contains("not from all fwmark 0xca6c lookup 51820"),
        "{rules}"
    );
    let table = lab
        .exec_ok(&c, &["ip", "route", "show", "table", "51820"])
        .expect("table");
    assert!(
        table.contains(&format!("default dev {}", lab.tun_name())),
        "{table}"
    );
    assert_eq!(
        ping(&lab, "c", SERVER, 3),
        3,
        "the server through the default route"
    );
    // The jump still works: the transports' own packets are marked out of the tunnel.
    lab.link(Path2::A, false).expect("link down");
    let jumped = wait_until(Duration::from_secs(5), || lab.attached_on(2));
    assert!(jumped, "{}", lab.diagnostics());
    assert_eq!(
        lab.status("client").expect("status")["session_id"].as_str(),
        Some(id.as_str())
    );
    assert_eq!(ping(&lab, "c", SERVER, 3), 3);
    finish(lab);
}

#[test]
fn a_masquerading_gateway_serves_a_network_with_no_route_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e10") else { return };
    let s = lab.ns("s");
    lab.exec_ok(&s, &["ip", "route", "del", "10.77.0.0/24"])
        .expect("route");
    let out = format!("jv{}gs", tag_of(&lab));
    lab.gateway_forwarding = format!("enable = true\nmasquerade_out = \"{out}\"\n");
    let g = lab.ns("g");
    let forwarding_before = lab
        .exec_ok(&g, &["cat", "/proc/sys/net/ipv4/ip_forward"])
        .expect("sysctl");
    connect(&mut lab, FAST_POLICY, "exit");
    assert_eq!(ping(&lab, "c", SERVER, 3), 3, "{}", lab.diagnostics());
    let tables = lab.exec_ok(&g, &["nft", "list", "tables"]).expect("nft");
    assert!(tables.contains("jvpn_nat_"), "{tables}");
    lab.stop("client", Duration::from_secs(5));
    lab.stop("gateway", Duration::from_secs(5));
    let tables = lab.exec_ok(&g, &["nft", "list", "tables"]).expect("nft");
    assert!(
        !tables.contains("jvpn_nat_"),
        "the masquerade outlived the gateway: {tables}"
    );
    let forwarding = lab
        .exec_ok(&g, &["cat", "/proc/sys/net/ipv4/ip_forward"])
        .expect("sysctl");
    assert_eq!(forwarding, forwarding_before, "forwarding not restored");
    drop(lab);
    assert_gone("e10");
}

/// A dual-stack tunnel: IPv6 and IPv4 through one session, both directions, to the
/// network behind the gateway and to the client's tunnel address, at once; then a path
/// cut under IPv6 traffic, survived by the same session.
#[test]
fn ipv6_and_ipv4_share_one_dual_stack_tunnel_through_a_jump() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e11") else { return };
    lab.tunnel_families = (true, true);
    lab.client_routes = "networks = [\"10.202.0.0/24\", \"fd02::/64\"]\n".into();
    let id = connect(&mut lab, FAST_POLICY, "exit");
    let both = serde_json::json!([
        format!("{CLIENT_TUNNEL}/24"),
        format!("{CLIENT_TUNNEL6}/64")
    ]);
    let client = lab.status("client").expect("status");
    assert_eq!(client["tunnel_addresses"], both);
    let gw = lab.status("gw").expect("gateway status");
    assert_eq!(gw["sessions"][0]["tunnel_addresses"], both);
    assert_eq!(ping(&lab, "c", SERVER6, 3), 3, "{}", lab.diagnostics());
    assert_eq!(ping(&lab, "c", GATEWAY_TUNNEL6, 3), 3);
    assert_eq!(ping(&lab, "s", CLIENT_TUNNEL6, 3), 3, "server → client");
    assert_eq!(ping(&lab, "c", SERVER, 3), 3);
    // Three checked transfers at once: IPv6 both ways and IPv4 up.
    let v6_up = format!("[{SERVER6}]:5202");
    let v6_down = format!("[{CLIENT_TUNNEL6}]:5203");
    let v4_up = format!("{SERVER}:5201");
    start_transfer_between(&mut lab, "v6up", ("c", "s"), &v6_up, 8_000_000, None);
    start_transfer_between(&mut lab, "v6down", ("s", "c"), &v6_down, 8_000_000, None);
    start_transfer_between(&mut lab, "v4up", ("c", "s"), &v4_up, 8_000_000, None);
    for name in ["v6up", "v6down", "v4up"] {
        let mbps = await_transfer(&mut lab, name, 8_000_000);
        eprintln!("{name}: 8 MB, every byte checked, {mbps:.0} Mbit/s (three at once)");
    }
    // A jump while IPv6 flows.
    start_transfer_between(&mut lab, "jump", ("c", "s"), &v6_up, 4_000_000, Some(6_000));
    let c = lab.ns("c");
    lab.spawn(
        "ping6",
        &c,
        &["ping", "-n", "-i", "0.05", "-c", "160", "-W", "1", SERVER6],
    )
    .expect("ping");
    std::thread::sleep(Duration::from_millis(1_500));
    lab.cut(Path2::A).expect("cut");
    let jumped = wait_until(Duration::from_secs(5), || lab.attached_on(2));
    assert!(jumped, "no jump to path B\n{}", lab.diagnostics());
    assert!(lab.wait("ping6", Duration::from_secs(20)).is_some());
    let (ping_out, _) = lab.output_of("ping6");
    let gap = netlab::ping_gap(&ping_out, 160, Duration::from_millis(50));
    eprintln!(
        "firewall cut of path A under IPv6 traffic: ping6 gap {} ms ({} of {} replies)",
        gap.longest_gap.as_millis(),
        gap.received,
        gap.sent
    );
    await_transfer(&mut lab, "jump", 4_000_000);
    let after = lab.status("client").expect("status");
    assert_eq!(after["session_id"].as_str(), Some(id.as_str()));
    assert_eq!(after["tunnel_addresses"], both);
    finish(lab);
}

/// With `full_tunnel`, a capture on the client's outside interfaces sees nothing but
/// the transport's own packets while IPv4 and IPv6 traffic goes to the server: through
/// the tunnel when it has the family, refused on the spot when it has not. The same
/// probes without the VPN are seen leaving in the clear (the capture works).
fn nothing_leaks_around_a_full_tunnel(tag: &str, tunnel_v6: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab(tag) else { return };
    let c = lab.ns("c");
    // The client's own default routes, out of path A, as on a real network.
    lab.exec_ok(&c, &["ip", "route", "add", "default", "via", GATEWAY_A])
        .expect("v4 default");
    lab.exec_ok(
        &c,
        &["ip", "-6", "route", "add", "default", "via", GATEWAY_A6],
    )
    .expect("v6 default");
    let links = format!(
        "{},{}",
        lab.client_link(Path2::A),
        lab.client_link(Path2::B)
    );
    let watch = |lab: &mut Lab, name: &str| {
        lab.spawn(
            name,
            &c,
            &[tool(), "watch-leaks", "--links", &links, "--seconds", "4"],
        )
        .expect("watch");
        std::thread::sleep(Duration::from_millis(300));
    };
    let watched = |lab: &mut Lab, name: &str| -> Value {
        assert_eq!(
            lab.wait(name, Duration::from_secs(10)),
            Some(0),
            "{:?}",
            lab.output_of(name)
        );
        serde_json::from_str(lab.output_of(name).0.trim()).expect("watch report")
    };
    watch(&mut lab, "control");
    ping(&lab, "c", SERVER, 2);
    ping(&lab, "c", SERVER6, 2);
    let control = watched(&mut lab, "control");
    let examples = control["examples"].to_string();
    assert!(
        examples.contains(SERVER) && examples.contains(SERVER6),
        "without the VPN the probes leave in the clear: {control}"
    );

    lab.tunnel_families = (true, tunnel_v6);
    lab.client_routes = "networks = []\nfull_tunnel = true\nfwmark = 51820\n".into();
    connect(&mut lab, FAST_POLICY, "exit");
    let table = lab
        .exec_ok(&c, &["ip", "-6", "route", "show", "table", "51820"])
        .expect("table");
    let v6_default = if tunnel_v6 {
        format!("default dev {}", lab.tun_name())
    } else {
        "unreachable default".to_string()
    };
    assert!(table.contains(&v6_default), "{table}");
    let rules = lab
        .exec_ok(&c, &["ip", "-6", "rule", "show"])
        .expect("rules");
    assert!(
        rules.contains("not from all fwmark 0xca6c lookup 51820"),
        "{rules}"
    );
    watch(&mut lab, "tunnelled");
    assert_eq!(ping(&lab, "c", SERVER, 3), 3, "IPv4 through the tunnel");
    let v6_replies = ping(&lab, "c", SERVER6, 3);
    assert_eq!(v6_replies, if tunnel_v6 { 3 } else { 0 }, "IPv6");
    let tunnelled = watched(&mut lab, "tunnelled");
    eprintln!("full tunnel, IPv6 tunnel address {tunnel_v6}: capture {tunnelled}");
    assert_eq!(tunnelled["leaks"], 0, "{tunnelled}");
    assert!(
        tunnelled["transport"].as_u64().unwrap_or(0) >= 6,
        "the capture saw the transport carry the probes: {tunnelled}"
    );
    finish(lab);
}

#[test]
fn a_full_tunnel_with_ipv6_leaks_nothing_of_either_family() {
    nothing_leaks_around_a_full_tunnel("e12", true);
}

#[test]
fn a_full_tunnel_without_ipv6_blocks_ipv6_instead_of_leaking_it() {
    nothing_leaks_around_a_full_tunnel("e13", false);
}

/// A tunnel with only IPv6: the client gets no IPv4 address, and IPv6 flows.
#[test]
fn an_ipv6_only_tunnel_carries_ipv6() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e14") else { return };
    lab.tunnel_families = (false, true);
    lab.client_routes = "networks = [\"fd02::/64\"]\n".into();
    connect(&mut lab, FAST_POLICY, "exit");
    let client = lab.status("client").expect("status");
    assert_eq!(
        client["tunnel_addresses"],
        serde_json::json!([format!("{CLIENT_TUNNEL6}/64")])
    );
    assert_eq!(ping(&lab, "c", SERVER6, 3), 3, "{}", lab.diagnostics());
    let listen = format!("[{SERVER6}]:5202");
    start_transfer_between(&mut lab, "", ("c", "s"), &listen, 4_000_000, None);
    await_transfer(&mut lab, "", 4_000_000);
    finish(lab);
}

/// A NAT in front of the client changes its mapping twice (a new port, then a new
/// address) while it pings: the gateway follows each new mapping through path
/// validation, with no reattach, the same session, and the client none the wiser.
#[test]
fn a_nat_rebinding_is_followed_without_a_reattach() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if which("conntrack").is_none() {
        let why = "conntrack (Debian package conntrack) is needed to make a NAT forget a mapping";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true: {why}");
        }
        eprintln!("skipping: {why}");
        return;
    }
    let Some(mut lab) = lab("e15") else { return };
    let id = connect(&mut lab, FAST_POLICY, "exit");
    let c = lab.ns("c");
    let binding = |lab: &Lab| {
        lab.status("gw").expect("gateway status")["sessions"][0]["active_transport"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let client_a = netlab::CLIENT_A;
    for (step, to, expect) in [
        (
            "new port",
            format!("{client_a}:40000"),
            format!("{client_a}:40000"),
        ),
        (
            "new address",
            "10.201.1.3".to_string(),
            "10.201.1.3:".to_string(),
        ),
    ] {
        lab.spawn(
            "ping",
            &c,
            &["ping", "-n", "-i", "0.05", "-c", "60", "-W", "1", SERVER],
        )
        .expect("ping");
        std::thread::sleep(Duration::from_millis(1_000));
        lab.rebind(Path2::A, &to).expect("rebind");
        let followed = wait_until(Duration::from_secs(5), || binding(&lab).contains(&expect));
        assert!(
            followed,
            "{step}: binding {}\n{}",
            binding(&lab),
            lab.diagnostics()
        );
        assert!(lab.wait("ping", Duration::from_secs(20)).is_some());
        let (out, _) = lab.output_of("ping");
        let gap = netlab::ping_gap(&out, 60, Duration::from_millis(50));
        eprintln!(
            "NAT rebinding ({step}): ping gap {} ms, {} of {} replies",
            gap.longest_gap.as_millis(),
            gap.received,
            gap.sent
        );
        assert!(lab.attached_on(1), "the client stayed on its transport");
    }
    let status = lab.status("client").expect("status");
    assert_eq!(status["session_id"].as_str(), Some(id.as_str()));
    let client_events = lab.events("client");
    assert_eq!(count(&client_events, "ReattachAttempt"), 0, "no reattach");
    assert_eq!(
        transitions(&client_events),
        [t("BIRTH", "ATTACHED", "attached_to_transport")],
        "the client noticed nothing"
    );
    let gw_events = lab.events("gw");
    let roams = gw_events
        .iter()
        .filter(|e| e["event_type"] == "TransportSwitch" && e["explicit"] == false)
        .count();
    assert_eq!(roams, 2, "one switch the gateway made per new mapping");
    assert_eq!(count(&gw_events, "ReattachResult"), 0);
    finish(lab);
}

/// The path of `tool` on PATH, if any.
fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(tool))
            .find(|p| p.is_file())
    })
}

/// How long each flood of [`floods_leave_the_live_session_and_new_clients_served`] lasts:
/// `JVPN_ATTACK_SECONDS` (bench/attack sets it for the figures), else 3.
fn attack_seconds() -> u64 {
    std::env::var("JVPN_ATTACK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|s| (1..=60).contains(s))
        .unwrap_or(3)
}

/// The floods' rate bound, packets per second: `JVPN_ATTACK_PPS` (0: as fast as one
/// thread sends; bench/attack), else 20 000, a rate an unoptimized test build of the
/// gateway absorbs (the behaviour is the same; the figures come from the release build).
fn attack_pps() -> String {
    std::env::var("JVPN_ATTACK_PPS")
        .ok()
        .filter(|s| s.parse::<u64>().is_ok())
        .unwrap_or_else(|| "20000".into())
}

/// The gateway's metrics page.
fn gateway_metrics(lab: &Lab) -> String {
    lab.exec_ok(&lab.ns("g"), &[tool(), "fetch", "--addr", "127.0.0.1:9477"])
        .expect("metrics page")
}

/// The sum of the series on `page` whose rendering starts with `series`.
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Starts a flood from the attacker's namespace (see `jvpn-lab flood`), bounded by
/// `seconds`; its report comes from [`flood_report`].
fn start_flood(lab: &mut Lab, kind: &str, from: &str, sources: u32, extra: &[&str], seconds: u64) {
    let x = lab.ns("x");
    let to = format!("{}:{}", netlab::GATEWAY_A, netlab::PORT);
    let from = format!("{from}:0");
    let (sources, seconds, pps) = (sources.to_string(), seconds.to_string(), attack_pps());
    let mut args = vec![
        tool(),
        "flood",
        "--pps",
        &pps,
        "--kind",
        kind,
        "--to",
        &to,
        "--from",
        &from,
        "--sources",
        &sources,
        "--seconds",
        &seconds,
    ];
    args.extend_from_slice(extra);
    lab.spawn("flood", &x, &args).expect("flood");
}

fn flood_report(lab: &mut Lab) -> Value {
    assert_eq!(
        lab.wait("flood", Duration::from_secs(120)),
        Some(0),
        "flood: {:?}",
        lab.output_of("flood")
    );
    serde_json::from_str(lab.output_of("flood").0.trim()).expect("flood report")
}

/// Pings the server through the tunnel every 20 ms for `seconds`; the gap and loss.
fn ping_through(lab: &mut Lab, seconds: u64) -> netlab::PingGap {
    let count = (seconds * 50).to_string();
    let out = lab
        .exec(
            &lab.ns("c"),
            &["ping", "-n", "-i", "0.02", "-c", &count, "-W", "1", SERVER],
        )
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    netlab::ping_gap(&text, (seconds * 50) as u32, Duration::from_millis(20))
}

/// An attacker next to the gateway floods it four ways, each for a few seconds, while
/// the live session pings through the tunnel: junk initiations (no Diffie-Hellman is
/// done for them), initiations with a right mac1 from 200 addresses (answered with
/// cookies under load, while a client restarting then still attaches), session packets
/// of unknown sessions with a bystander's address as source (the bystander gets no more
/// than the hints' bound), and garbage carrying the live session's id. The figures (loss,
/// RTT, attach time) come from bench/attack, which runs this with longer floods.
#[test]
fn floods_leave_the_live_session_and_new_clients_served() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e16") else { return };
    lab.add_attacker(200).expect("attacker");
    let seconds = attack_seconds();
    connect(&mut lab, FAST_POLICY, "exit");
    let gw_key = lab.gateway_key.public().to_string();
    let figure = |name: &str, report: &Value, ping: &netlab::PingGap| {
        eprintln!(
            "ATTACK {name}: flood {} packets at {:.0}/s, {} replies to the sources; session ping {}/{} replies, longest gap {} ms, rtt avg {:.2} ms p99 {:.2} ms",
            report["sent"], report["pps"].as_f64().unwrap_or(0.0), report["replies"],
            ping.received, ping.sent, ping.longest_gap.as_millis(), ping.rtt_avg_ms, ping.rtt_p99_ms
        );
    };

    // 1. Junk initiations: refused by mac1, no Diffie-Hellman.
    start_flood(
        &mut lab,
        "junk-init",
        netlab::ATTACKER_FIRST,
        200,
        &[],
        seconds,
    );
    let ping = ping_through(&mut lab, seconds);
    let report = flood_report(&mut lab);
    figure("junk initiations", &report, &ping);
    let page = gateway_metrics(&lab);
    assert!(
        metric(
            &page,
            "jvpn_packets_dropped_total{reason=\"handshake_mac\"}"
        ) > 0.0,
        "{page}"
    );
    assert_eq!(
        metric(&page, "jvpn_handshakes_total{result=\"failed\""),
        0.0,
        "no Diffie-Hellman for junk"
    );
    assert!(
        ping.received * 10 >= ping.sent * 9,
        "the session kept flowing"
    );

    // 2. Initiations with a right mac1 from 200 addresses; a client restarting meanwhile.
    start_flood(
        &mut lab,
        "init",
        netlab::ATTACKER_FIRST,
        200,
        &["--gateway-key", &gw_key],
        seconds + 4,
    );
    let ping = ping_through(&mut lab, seconds);
    lab.stop("client", Duration::from_secs(5));
    let started = std::time::Instant::now();
    let id = lab
        .start_client("exit", FAST_POLICY)
        .expect("a client attaches during the flood");
    let attach = started.elapsed();
    let report = flood_report(&mut lab);
    figure("initiations with a right mac1", &report, &ping);
    eprintln!(
        "ATTACK a client restarted during the initiation flood attached in {} ms",
        attach.as_millis()
    );
    let page = gateway_metrics(&lab);
    let cookies = metric(
        &page,
        "jvpn_packets_dropped_total{reason=\"handshake_cookie\"}",
    );
    let dh = metric(&page, "jvpn_handshakes_total");
    eprintln!("ATTACK under the initiation flood: {cookies} cookie replies, {dh} Diffie-Hellmans");
    assert!(
        cookies > 0.0,
        "under load the gateway answers with cookies: {page}"
    );
    assert!(
        ping.received * 10 >= ping.sent * 9,
        "the session kept flowing"
    );

    // 3. Unknown sessions, spoofed as the bystander: its replies stay within the bound.
    start_flood(
        &mut lab,
        "unknown-session",
        netlab::BYSTANDER,
        1,
        &[],
        seconds,
    );
    let ping = ping_through(&mut lab, seconds);
    let report = flood_report(&mut lab);
    figure("unknown sessions from a spoofed bystander", &report, &ping);
    let bound = u64::from(jvpn_core::gateway::HintLimits::PER_PREFIX_BURST)
        + u64::from(jvpn_core::gateway::HintLimits::PER_PREFIX_PER_SECOND)
            * (report["seconds"].as_f64().unwrap_or(0.0).ceil() as u64 + 1);
    assert!(
        report["replies"].as_u64().unwrap_or(u64::MAX) <= bound,
        "{report} > {bound}"
    );
    assert!(
        ping.received * 10 >= ping.sent * 9,
        "the session kept flowing"
    );

    // 4. Garbage with the live session's id.
    start_flood(
        &mut lab,
        "session-garbage",
        netlab::ATTACKER_FIRST,
        200,
        &["--session-id", &id],
        seconds,
    );
    let ping = ping_through(&mut lab, seconds);
    let report = flood_report(&mut lab);
    figure("garbage with the live session's id", &report, &ping);
    assert!(
        ping.received * 10 >= ping.sent * 9,
        "the session kept flowing"
    );
    assert_eq!(
        lab.status("client").expect("status")["session_id"].as_str(),
        Some(id.as_str())
    );
    finish(lab);
}

/// The lab's QUIC and TCP ports (UDP stays on netlab::PORT).
const QUIC_PORT: u16 = 51821;
const TCP_PORT: u16 = 51822;

/// Bytes of the checked transfers over each transport kind: `JVPN_TRANSFER_BYTES`
/// (bench/transports sets it for the figures), else 8 MB.
fn transfer_bytes() -> u64 {
    std::env::var("JVPN_TRANSFER_BYTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|b| (1_000..=10_000_000_000).contains(b))
        .unwrap_or(8_000_000)
}

/// A gateway and a client given only UDP, only QUIC, then only TCP, each work as a
/// plain VPN of that kind: bound there, ping and a checked transfer through the tunnel.
#[test]
fn each_transport_kind_alone_is_a_plain_vpn() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let bytes = transfer_bytes();
    for (tag, kind, port) in [
        ("e21", "udp", netlab::PORT),
        ("e17", "quic", QUIC_PORT),
        ("e18", "tcp", TCP_PORT),
    ] {
        let Some(mut lab) = lab(tag) else { return };
        serve_only(&mut lab, format!("{kind}://{}:{port}", netlab::GATEWAY_A));
        connect(&mut lab, FAST_POLICY, "exit");
        let gw = lab.status("gw").expect("gateway status");
        let bound = gw["sessions"][0]["active_transport"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(bound.starts_with(kind), "{kind}: bound on {bound}");
        assert_eq!(
            ping(&lab, "c", SERVER, 3),
            3,
            "{kind}: {}",
            lab.diagnostics()
        );
        let mbps = transfer(&mut lab, bytes, None);
        eprintln!(
            "TRANSPORT {kind} only: {bytes} B client → server, every byte checked, {mbps:.0} Mbit/s"
        );
        finish(lab);
    }
}

/// Congestion loss on a QUIC path must not shrink what the path carries. QUIC's
/// black-hole detection reads a few bursts of lost full-size packets as a smaller path
/// MTU and falls back to its minimum for a minute (quinn-rs/quinn#1540); at QUIC's
/// default minimum (1 200 bytes) no full-size session packet fits a datagram, and a TCP
/// transfer through the tunnel stalls for that minute. A QUIC-only session carries a
/// transfer through seconds of 25 % loss of the client's large datagrams; once the loss
/// ends, the transfer completes (every byte checked) and full-size pings go through.
#[test]
fn a_quic_session_keeps_carrying_full_size_packets_after_heavy_loss() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e24") else { return };
    serve_only(
        &mut lab,
        format!("quic://{}:{QUIC_PORT}", netlab::GATEWAY_A),
    );
    connect(&mut lab, FAST_POLICY, "exit");
    // Enough that the loss lasts its whole time (a few Mbit/s get through it).
    let bytes = 16_000_000;
    lab.lossy_large(Path2::A, QUIC_PORT, 25).expect("loss");
    start_transfer_between(
        &mut lab,
        "",
        ("c", "s"),
        &format!("{SERVER}:5201"),
        bytes,
        None,
    );
    std::thread::sleep(Duration::from_secs(5));
    lab.heal(Path2::A).expect("heal");
    let mbps = await_transfer(&mut lab, "", bytes);
    let full = full_size_pings(&lab);
    eprintln!(
        "TRANSPORT quic, 5 s of 25 % loss of large datagrams: {bytes} B at {mbps:.0} Mbit/s (every byte checked), then {full} of 5 full-size pings"
    );
    finish(lab);
}

/// Five pings of the tunnel's MTU (1 380 bytes: 1 352 of data, 8 of ICMP, 20 of IPv4)
/// from the client to the server; at least four must come back. Returns how many did.
fn full_size_pings(lab: &Lab) -> u32 {
    let out = lab
        .exec(
            &lab.ns("c"),
            &[
                "ping", "-n", "-c", "5", "-i", "0.2", "-W", "2", "-s", "1352", SERVER,
            ],
        )
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let full = netlab::ping_gap(&text, 5, Duration::from_millis(200)).received;
    assert!(
        full >= 4,
        "full-size pings: {full} of 5\n{text}\n{}",
        lab.diagnostics()
    );
    full
}

/// The gateway listens on `endpoint` alone, and the client has it as its only candidate.
fn serve_only(lab: &mut Lab, endpoint: String) {
    lab.gateway_listen = vec![endpoint.clone()];
    lab.client_candidates = vec![endpoint];
}

/// Sets the MTU of path A's link, both ends.
fn set_path_a_mtu(lab: &Lab, mtu: u16) {
    let mtu = mtu.to_string();
    for (role, dev) in [
        ("c", lab.client_link(Path2::A)),
        ("g", lab.gateway_link(Path2::A)),
    ] {
        lab.exec_ok(
            &lab.ns(role),
            &["ip", "link", "set", "dev", &dev, "mtu", &mtu],
        )
        .expect("link mtu");
    }
}

/// Connects `lab`'s client, then checks that full-size pings (at least 4 of 5) and a
/// checked TCP transfer pass through the tunnel, and ends the lab.
fn carries_full_size_packets(mut lab: Lab, what: &str) {
    connect(&mut lab, FAST_POLICY, "exit");
    let full = full_size_pings(&lab);
    let bytes = transfer_bytes();
    let mbps = transfer(&mut lab, bytes, None);
    eprintln!(
        "TRANSPORT {what}: {full} of 5 full-size pings, {bytes} B at {mbps:.0} Mbit/s (every byte checked)"
    );
    finish(lab);
}

/// A path narrower than a 1 500-byte link (a PPPoE link's 1 492 bytes) still carries a
/// QUIC-only session with full-size packets: QUIC's first packets are padded only to
/// what a full-size session packet needs (1 450 bytes of UDP payload at the default
/// tunnel MTU, 1 478 on the link), and where its packets of 1 472 bytes do not pass it
/// falls back to that size, never lower.
#[test]
fn a_quic_session_connects_and_carries_full_size_packets_on_a_pppoe_sized_path() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e25") else { return };
    serve_only(
        &mut lab,
        format!("quic://{}:{QUIC_PORT}", netlab::GATEWAY_A),
    );
    set_path_a_mtu(&lab, 1_492);
    carries_full_size_packets(lab, "quic over a 1 492-byte path");
}

/// A gateway whose QUIC listener is bound to [::] serves an IPv4 client with the sizes
/// of an IPv4 path: full-size packets reach the client (they would not fit a datagram
/// at the sizes of an IPv6 path).
#[test]
fn a_quic_listener_on_the_ipv6_wildcard_carries_full_size_packets_to_an_ipv4_client() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e26") else { return };
    lab.gateway_listen = vec![format!("quic://[::]:{QUIC_PORT}")];
    lab.client_candidates = vec![format!("quic://{}:{QUIC_PORT}", netlab::GATEWAY_A)];
    connect(&mut lab, FAST_POLICY, "exit");
    let full = full_size_pings(&lab);
    eprintln!("TRANSPORT quic from [::] to an IPv4 client: {full} of 5 full-size pings");
    finish(lab);
}

/// A tunnel MTU above what a QUIC path carries (1 420, where 1 402 fits a datagram over
/// IPv4 on a 1 500-byte link): a full-size packet cannot leave, and the tunnel answers
/// its sender with ICMP "fragmentation needed" naming 1 402, as a router on the path
/// would. The sender's stack lowers its path MTU, and TCP goes on with smaller segments,
/// both ways: the client answers its own host's packets, the gateway the server's. A
/// silent drop stalls both transfers until their timeout.
#[test]
fn packets_too_large_for_a_quic_path_are_answered_with_icmp_and_tcp_adapts() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e28") else { return };
    serve_only(
        &mut lab,
        format!("quic://{}:{QUIC_PORT}", netlab::GATEWAY_A),
    );
    lab.tunnel_mtu = Some(1_420);
    lab.tunnel_families = (true, true);
    lab.client_routes = "networks = [\"10.202.0.0/24\", \"fd02::/64\"]\n".into();
    lab.client_metrics = CLIENT_METRICS.into();
    connect(&mut lab, FAST_POLICY, "exit");
    // The server's transfers first, IPv4 then IPv6, each answered by the gateway: once
    // the client's host has learned the path's size to the server (below), it offers
    // the server a smaller segment size, and the gateway would have nothing to answer.
    let bytes = transfer_bytes();
    let mut down = Vec::new();
    let mut answered = 0.0;
    for (name, listen) in [
        ("down4", format!("{CLIENT_TUNNEL}:5202")),
        ("down6", format!("[{CLIENT_TUNNEL6}]:5203")),
    ] {
        start_transfer_between(&mut lab, name, ("s", "c"), &listen, bytes, None);
        down.push(await_transfer(&mut lab, name, bytes));
        let now = icmp_answers(&gateway_metrics(&lab));
        assert!(now > answered, "the gateway answered none for {name}");
        answered = now;
    }
    // The client's transfer, answered by the client; to the gateway's own address: the
    // server has learned the path's size to the client by now and would offer it
    // smaller segments.
    let to_gateway = format!("{}:5204", netlab::GATEWAY_TUNNEL);
    start_transfer_between(&mut lab, "up", ("c", "g"), &to_gateway, bytes, None);
    let up = await_transfer(&mut lab, "up", bytes);
    let client_answered = icmp_answers(&client_metrics(&lab));
    assert!(client_answered >= 1.0, "the client answered none");
    // Pings of the tunnel's full size that may not be fragmented: answered, not lost.
    let answers = [
        too_big_answer(&lab, SERVER, 1_392, 1_402),
        too_big_answer(&lab, SERVER6, 1_372, 1_402),
    ];
    eprintln!(
        "TRANSPORT quic with tunnel MTU 1 420: {bytes} B down (IPv4, IPv6) at {:.0} and {:.0} Mbit/s, then up at {up:.0} Mbit/s (every byte checked); answers sent: gateway {answered}, client {client_answered}; pings: {answers:?}",
        down[0], down[1]
    );
    finish(lab);
}

/// Where the client serves its metrics in the tests that read them.
const CLIENT_METRICS: &str = "127.0.0.1:9478";

/// The client's metrics page (served on [`CLIENT_METRICS`]).
fn client_metrics(lab: &Lab) -> String {
    lab.exec_ok(&lab.ns("c"), &[tool(), "fetch", "--addr", CLIENT_METRICS])
        .expect("client metrics page")
}

/// The ICMP "too big" answers a metrics page counts as sent.
fn icmp_answers(page: &str) -> f64 {
    metric(page, "jvpn_icmp_too_big_total{outcome=\"sent\"}")
}

/// A UDP path whose link narrows, under a transfer, below the tunnel's full-size
/// datagrams (to 1 420 bytes, where a full-size packet of the default tunnel MTU needs
/// 1 444): the kernel refuses them (a GSO batch of them as a whole), the session asks it
/// what the path takes (1 356 bytes of tunnel packet) and answers the senders with ICMP
/// "too big", as over QUIC; the path is not taken for a failing one. Without the answers
/// both transfers stalled to their timeout.
#[test]
fn packets_too_large_for_a_udp_path_are_answered_with_icmp_and_tcp_adapts() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e29") else { return };
    serve_only(
        &mut lab,
        format!("udp://{}:{}", netlab::GATEWAY_A, netlab::PORT),
    );
    lab.client_metrics = CLIENT_METRICS.into();
    connect(&mut lab, FAST_POLICY, "exit");
    // The server's transfer first: the link narrows under it, while the gateway sends
    // it to the client in batches of full-size datagrams.
    let bytes = transfer_bytes().max(32_000_000);
    let listen = format!("{CLIENT_TUNNEL}:5202");
    start_transfer_between(&mut lab, "down", ("s", "c"), &listen, bytes, None);
    std::thread::sleep(Duration::from_millis(500));
    set_path_a_mtu(&lab, 1_420);
    let down = await_transfer(&mut lab, "down", bytes);
    let page = gateway_metrics(&lab);
    let answered = icmp_answers(&page);
    assert!(answered >= 1.0, "the gateway answered none");
    // Refused as too big, never taken for a failing path.
    let failed = metric(&page, "jvpn_packets_dropped_total{reason=\"send_failed\"}");
    assert_eq!(failed, 0.0, "{page}");
    // The client's transfer, to the gateway's own address: the server has learned the
    // path's size to the client by now and would offer it smaller segments.
    let to_gateway = format!("{}:5203", netlab::GATEWAY_TUNNEL);
    start_transfer_between(&mut lab, "up", ("c", "g"), &to_gateway, bytes, None);
    let up = await_transfer(&mut lab, "up", bytes);
    let client_answered = icmp_answers(&client_metrics(&lab));
    assert!(client_answered >= 1.0, "the client answered none");
    let answer = too_big_answer(&lab, SERVER, 1_352, 1_356);
    eprintln!(
        "TRANSPORT udp, link narrowed to 1 420 bytes: {bytes} B down at {down:.0} Mbit/s, up at {up:.0} Mbit/s (every byte checked); answers sent: gateway {answered}, client {client_answered}; {answer:?}"
    );
    finish(lab);
}

/// A UDP path with a hop narrower than its links, beyond them, that drops larger
/// datagrams silently (no ICMP reaches either end: the kernels learn nothing, and small
/// heartbeats still pass): the client's size probes find what the path carries both
/// ways and tell the gateway; packets larger than that are answered with ICMP "too big"
/// at both ends, and TCP through the tunnel adapts. Without the probes every full-size
/// packet vanished and the first transfer stalled.
#[test]
fn a_udp_path_narrower_beyond_its_links_is_found_by_size_probes_and_tcp_adapts() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = lab("e33") else { return };
    // IP packets of up to 1 400 bytes pass: datagrams of up to 1 372 bytes of payload,
    // tunnel packets of up to 1 336 (the tunnel makes up to 1 380 + 36).
    let endpoint = format!("udp://{}:{}", netlab::GATEWAY_A, netlab::PORT);
    narrow_hop_is_found(lab, endpoint, 1_336, "IPv4");
}

/// The same over an IPv6 path: its headers take 20 bytes more of the 1 400.
#[test]
fn a_udp_path_over_ipv6_narrower_beyond_its_links_is_found_by_size_probes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = lab("e34") else { return };
    let endpoint = format!("udp://[{GATEWAY_A6}]:{}", netlab::PORT);
    narrow_hop_is_found(lab, endpoint, 1_316, "IPv6");
}

/// A standby path narrower beyond its links is searched before the session needs it:
/// path A is cut under a transfer, the session jumps to path B knowing its size, and
/// the client answers a full-size packet with that size from the jump on (before, the
/// search began at the jump, and full-size packets vanished for its ten seconds). The
/// transfer spanning the jump, and one after it, complete, every byte checked.
#[test]
fn a_jump_to_a_standby_path_narrower_beyond_its_links_keeps_to_its_size_at_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e35") else { return };
    lab.client_metrics = CLIENT_METRICS.into();
    lab.narrow_beyond(Path2::B, netlab::PORT, 1_400)
        .expect("narrow hop");
    let started = Instant::now();
    connect(&mut lab, FAST_POLICY, "exit");
    // Path B's search runs while it is a standby: its room shows in the status.
    let carried: u64 = 1_336;
    let expected = (carried - 8 + 1)..=carried;
    let mut status = serde_json::Value::Null;
    let found = wait_until(Duration::from_secs(60), || {
        status = lab.status("client").unwrap_or_default();
        status["candidates"][1]["path_room"].as_u64().is_some()
    });
    let room = status["candidates"][1]["path_room"].as_u64();
    assert!(
        found && room.is_some_and(|r| expected.contains(&r)),
        "no room within {expected:?} for the standby path B in 60 s: {status}\n{}",
        lab.diagnostics()
    );
    let searched = started.elapsed();
    assert_eq!(status["active_transport"], 1, "{status}");
    assert_eq!(
        status["candidates"][0]["path_room"],
        serde_json::Value::Null
    );

    // A transfer from the server, spread over 6 s, spans the cut of path A.
    let bytes = transfer_bytes().max(16_000_000);
    let listen = format!("{CLIENT_TUNNEL}:5202");
    start_transfer_between(&mut lab, "down", ("s", "c"), &listen, bytes, Some(6_000));
    std::thread::sleep(Duration::from_millis(1_500));
    lab.cut(Path2::A).expect("cut");
    let cut = Instant::now();
    let jumped = wait_until(Duration::from_secs(10), || lab.attached_on(2));
    assert!(jumped, "no jump to path B\n{}", lab.diagnostics());
    let jump = cut.elapsed();
    // At once, no retry: the client answers a full-size packet with path B's size.
    let nobody = "10.77.0.99";
    let mtu = room.map_or(0, |r| u32::try_from(r).unwrap_or(0));
    let line = too_big_answer(&lab, nobody, 1_352, mtu);
    let [down, up, gateway_answered, client_answered] = both_ends_answer(&mut lab, bytes);
    eprintln!(
        "STANDBY path B, a hop of 1 400 bytes beyond its links: its size found while a standby (tunnel packets up to {mtu}) {:.1} s after the start; path A cut, jump within {:.2} s, the size applied at once ({line:?}); {bytes} B down across the jump at {down:.0} Mbit/s, up after it at {up:.0} Mbit/s (every byte checked); answers sent: gateway {gateway_answered}, client {client_answered}",
        searched.as_secs_f64(),
        jump.as_secs_f64()
    );
    finish(lab);
}

/// Serves only `endpoint` (UDP) over path A, narrowed beyond its links to IP packets of
/// 1 400 bytes, where a tunnel packet of up to `carried` bytes fits; connects; checks
/// that the client finds the size within a step and that checked transfers both ways
/// pass, answered with ICMP at both ends.
fn narrow_hop_is_found(mut lab: Lab, endpoint: String, carried: u32, family: &str) {
    serve_only(&mut lab, endpoint);
    lab.client_metrics = CLIENT_METRICS.into();
    lab.narrow_beyond(Path2::A, netlab::PORT, 1_400)
        .expect("narrow hop");
    let started = Instant::now();
    connect(&mut lab, FAST_POLICY, "exit");
    // The search ends within a step (8 bytes) below what the path carries: the client
    // then answers a DF ping larger than that with the size found. The ping goes to an
    // address of the tunnel's network that no host has: the client answers it before
    // sealing, and its kernel learns the size for that address only (for the server's or
    // the gateway's address, it would offer the transfers below smaller segments).
    let nobody = "10.77.0.99";
    let expected = (carried - 8 + 1)..=carried;
    let mut answer = Err(String::new());
    let found = wait_until(Duration::from_secs(30), || {
        answer = too_big_answer_within(&lab, nobody, 1_352, expected.clone());
        answer.is_ok()
    });
    let (line, mtu) = match answer {
        Ok(found) => found,
        Err(said) => panic!(
            "the client found no size within {expected:?} in 30 s ({found}):\n{said}\n{}",
            lab.diagnostics()
        ),
    };
    let search = started.elapsed();
    // The client's status says so too.
    let status = lab.status("client").expect("status");
    assert_eq!(
        status["path_room"].as_u64(),
        Some(u64::from(mtu)),
        "{status}"
    );
    // The server's transfer: its full-size segments reach the gateway, which answers
    // with the size the client told it.
    let bytes = transfer_bytes().max(16_000_000);
    let listen = format!("{CLIENT_TUNNEL}:5202");
    start_transfer_between(&mut lab, "down", ("s", "c"), &listen, bytes, None);
    let [down, up, answered, client_answered] = both_ends_answer(&mut lab, bytes);
    eprintln!(
        "TRANSPORT udp over {family}, a hop of 1 400 bytes beyond the links: size found (tunnel packets up to {mtu}) {:.1} s after the start; {bytes} B down at {down:.0} Mbit/s, up at {up:.0} Mbit/s (every byte checked); answers sent: gateway {answered}, client {client_answered}; {line:?}",
        search.as_secs_f64()
    );
    finish(lab);
}

/// Awaits the checked transfer "down" of `bytes` (the server's, to the client, already
/// started), then makes one of the client's to the gateway ("up"); each end must have
/// answered a packet too large for the path with ICMP by the end of the transfer it
/// sends on. Returns the Mbit/s down and up and the answers of the gateway and client.
fn both_ends_answer(lab: &mut Lab, bytes: u64) -> [f64; 4] {
    let down = await_transfer(lab, "down", bytes);
    let gateway_answered = icmp_answers(&gateway_metrics(lab));
    assert!(gateway_answered >= 1.0, "the gateway answered none");
    let to_gateway = format!("{}:5203", netlab::GATEWAY_TUNNEL);
    start_transfer_between(lab, "up", ("c", "g"), &to_gateway, bytes, None);
    let up = await_transfer(lab, "up", bytes);
    let client_answered = icmp_answers(&client_metrics(lab));
    assert!(client_answered >= 1.0, "the client answered none");
    [down, up, gateway_answered, client_answered]
}

/// Sends two pings of `size` bytes of data that may not be fragmented from the client to
/// `to`, and returns the line that reports the tunnel's ICMP answer naming `mtu`.
fn too_big_answer(lab: &Lab, to: &str, size: u32, mtu: u32) -> String {
    match too_big_answer_within(lab, to, size, mtu..=mtu) {
        Ok((line, _)) => line,
        Err(said) => panic!(
            "no ICMP answer naming {mtu} to {to}:\n{said}\n{}",
            lab.diagnostics()
        ),
    }
}

/// As [`too_big_answer`], for an answer naming an MTU within `mtu`: the line and the MTU
/// it names, or what ping said.
fn too_big_answer_within(
    lab: &Lab,
    to: &str,
    size: u32,
    mtu: std::ops::RangeInclusive<u32>,
) -> Result<(String, u32), String> {
    let size = size.to_string();
    let out = lab
        .exec(
            &lab.ns("c"),
            &[
                "ping", "-n", "-M", "do", "-c", "2", "-i", "0.2", "-W", "2", "-s", &size, to,
            ],
        )
        .expect("ping");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "Frag needed and DF set (mtu = 1356)" (IPv4), "Packet too big: mtu=1402" (IPv6).
    let named = |line: &str| {
        let (_, rest) = line.split_once("mtu")?;
        let digits: String = rest
            .trim_start_matches([' ', '='])
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<u32>().ok().filter(|m| mtu.contains(m))
    };
    said.lines()
        .find_map(|l| Some((l.trim().to_string(), named(l)?)))
        .ok_or(said)
}

/// A QUIC-only session over an IPv6 path carries full-size packets: with quinn's 8-byte
/// connection ids a full-size session packet of the default tunnel MTU needed 1 454
/// bytes of UDP payload, 2 more than an IPv6 path of a 1 500-byte link carries, and
/// every full-size packet was dropped (`send_too_big`).
#[test]
fn a_quic_session_over_an_ipv6_path_carries_full_size_packets() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e27") else { return };
    serve_only(&mut lab, format!("quic://[{GATEWAY_A6}]:{QUIC_PORT}"));
    carries_full_size_packets(lab, "quic over IPv6");
}

/// One session across transport kinds: UDP blocked, it jumps to a connection transport
/// (QUIC or TCP, whichever ranks better); that one blocked too, to the other; a checked
/// TCP transfer spans both jumps; the session id and tunnel address never change. With
/// every kind unblocked again, switches stay within the cooldown.
#[test]
fn a_session_jumps_from_udp_to_quic_and_tcp_and_keeps_its_identity() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e19") else { return };
    let a = netlab::GATEWAY_A;
    let all = vec![
        format!("udp://{a}:{}", netlab::PORT),
        format!("quic://{a}:{QUIC_PORT}"),
        format!("tcp://{a}:{TCP_PORT}"),
    ];
    lab.gateway_listen = all.clone();
    lab.client_candidates = all;
    let id = connect(&mut lab, FAST_POLICY, "exit");
    assert!(lab.attached_on(1));
    let tunnel = lab.status("client").expect("status")["tunnel_addresses"].clone();
    // Paced so that it spans both jumps.
    start_transfer(&mut lab, 6_000_000, 14_000);
    let port_of = |transport: u64| match transport {
        2 => ("udp", QUIC_PORT),
        _ => ("tcp", TCP_PORT),
    };
    let mut blocked = vec![("udp", netlab::PORT)];
    let mut visited = vec![1u64];
    for step in 0..2 {
        let c = lab.ns("c");
        lab.spawn(
            "ping",
            &c,
            &["ping", "-n", "-i", "0.05", "-c", "100", "-W", "1", SERVER],
        )
        .expect("ping");
        std::thread::sleep(Duration::from_millis(1_000));
        let (proto, port) = *blocked.last().expect("a port to block");
        lab.block(proto, port).expect("block");
        let moved = wait_until(Duration::from_secs(8), || {
            lab.status("client").is_some_and(|s| {
                s["state"] == "ATTACHED"
                    && s["active_transport"]
                        .as_u64()
                        .is_some_and(|t| !visited.contains(&t))
            })
        });
        assert!(moved, "step {step}: no jump\n{}", lab.diagnostics());
        let now_on = lab.status("client").expect("status")["active_transport"]
            .as_u64()
            .unwrap_or(0);
        assert!(lab.wait("ping", Duration::from_secs(20)).is_some());
        let (out, _) = lab.output_of("ping");
        let gap = netlab::ping_gap(&out, 100, Duration::from_millis(50));
        let kind = if now_on == 2 { "QUIC" } else { "TCP" };
        let from = if step == 0 {
            "UDP"
        } else if kind == "QUIC" {
            "TCP"
        } else {
            "QUIC"
        };
        eprintln!(
            "TRANSPORT jump {from} → {kind}: ping gap {} ms ({} of {} replies)",
            gap.longest_gap.as_millis(),
            gap.received,
            gap.sent
        );
        visited.push(now_on);
        blocked.push(port_of(now_on));
    }
    assert_eq!(
        lab.wait("source", Duration::from_secs(40)),
        Some(0),
        "sender: {:?}",
        lab.output_of("source")
    );
    assert_eq!(
        lab.wait("sink", Duration::from_secs(40)),
        Some(0),
        "receiver: {:?}",
        lab.output_of("sink")
    );
    let status = lab.status("client").expect("status");
    assert_eq!(status["session_id"].as_str(), Some(id.as_str()));
    assert_eq!(status["tunnel_addresses"], tunnel);
    let events = lab.events("client");
    let kinds: Vec<String> = events
        .iter()
        .filter(|e| e["event_type"] == "TransportSwitch")
        .filter_map(|e| e["new_transport"]["protocol"].as_str().map(str::to_string))
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert!(
        kinds.contains(&"quic".to_string()) && kinds.contains(&"tcp".to_string()),
        "{kinds:?}"
    );
    // Everything unblocked: no flapping back and forth faster than the cooldown allows.
    for (proto, port) in blocked.iter().take(2) {
        lab.unblock(proto, *port).expect("unblock");
    }
    std::thread::sleep(Duration::from_secs(3));
    let switches: Vec<u64> = lab
        .events("client")
        .iter()
        .filter(|e| e["event_type"] == "TransportSwitch")
        .filter_map(|e| e["ts_ms"].as_u64())
        .collect();
    for pair in switches.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1_000,
            "switches closer than the cooldown: {switches:?}"
        );
    }
    finish(lab);
}

/// A client on TCP that stops reading (frozen) while the network behind the gateway
/// floods it: the gateway's queue for that connection stays bounded (drops counted as
/// `send_busy`), its memory does not grow with the flood, and the session goes on when
/// the client reads again.
#[test]
fn a_tcp_peer_that_stops_reading_does_not_grow_the_gateway() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e20") else { return };
    serve_only(&mut lab, format!("tcp://{}:{TCP_PORT}", netlab::GATEWAY_A));
    // A policy that tolerates the freeze (no heartbeat-driven end within it).
    let patient = "[policy.session]\ntransport_lost_ttl_ms = 60000\n";
    let id = connect(&mut lab, patient, "exit");
    let before = lab.rss("gateway").expect("gateway rss");
    lab.freeze("client", true).expect("freeze");
    let s = lab.ns("s");
    let to = format!("{CLIENT_TUNNEL}:9");
    let from = format!("{SERVER}:0");
    let seconds = attack_seconds().to_string();
    let out = lab
        .exec(
            &s,
            &[
                tool(),
                "flood",
                "--kind",
                "unknown-session",
                "--to",
                &to,
                "--from",
                &from,
                "--seconds",
                &seconds,
                "--pps",
                &attack_pps(),
            ],
        )
        .expect("flood");
    let report: Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("report");
    let during = lab.rss("gateway").expect("gateway rss");
    let page = gateway_metrics(&lab);
    let busy = metric(&page, "jvpn_packets_dropped_total{reason=\"send_busy\"}");
    eprintln!(
        "TRANSPORT frozen TCP peer: {} packets sent at it, gateway RSS {} → {} KiB, {busy} send_busy drops",
        report["sent"],
        before / 1024,
        during / 1024
    );
    assert!(
        busy > 0.0,
        "the connection's queue filled and dropped: {page}"
    );
    assert!(
        during < before + (64 << 20),
        "the gateway grew by {} KiB",
        (during - before) / 1024
    );
    lab.freeze("client", false).expect("thaw");
    assert_eq!(ping(&lab, "c", SERVER, 3), 3, "{}", lab.diagnostics());
    assert_eq!(
        lab.status("client").expect("status")["session_id"].as_str(),
        Some(id.as_str())
    );
    finish(lab);
}

/// A candidate given as a name: when every path to its address fails, the client
/// resolves the name again and reaches the gateway at its new address, in the same
/// session.
#[test]
fn a_gateway_name_is_resolved_again_when_its_address_stops_answering() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e22") else { return };
    let name = "gw.jvlab.test";
    lab.set_hosts("c", &format!("{} {name}\n", netlab::GATEWAY_A))
        .expect("hosts");
    lab.client_candidates = vec![format!("{name}:{}", netlab::PORT)];
    let id = connect(&mut lab, FAST_POLICY, "exit");
    // The name moves to path B's address, and path A goes silent.
    lab.set_hosts("c", &format!("{} {name}\n", netlab::GATEWAY_B))
        .expect("hosts");
    lab.cut(Path2::A).expect("cut");
    // The client's candidate points at the new address; the gateway sees the client
    // come from path B (the socket's source follows the new route).
    let new_gateway = format!("{}:{}", netlab::GATEWAY_B, netlab::PORT);
    let moved = wait_until(Duration::from_secs(15), || {
        let client_moved = lab
            .status("client")
            .is_some_and(|c| c["candidates"][0]["gateway"] == new_gateway.as_str());
        let gateway_sees_b = lab.status("gw").is_some_and(|gw| {
            gw["sessions"][0]["active_transport"]
                .as_str()
                .is_some_and(|t| t.contains(&format!("{}:", netlab::CLIENT_B)))
        });
        client_moved && gateway_sees_b && lab.attached_on(1)
    });
    assert!(
        moved,
        "the client did not find the new address\n{}\nclient: {:?}\ngateway: {}",
        lab.diagnostics(),
        transitions(&lab.events("client")),
        lab.status("gw").unwrap_or_default()
    );
    assert_eq!(
        lab.status("client").expect("status")["session_id"].as_str(),
        Some(id.as_str())
    );
    assert_eq!(ping(&lab, "c", SERVER, 3), 3);
    finish(lab);
}

/// Percent-encodes a query string value.
fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every PromQL expression operators are given: the dashboard's panels
/// (deploy/grafana/dashboards/jvpn.json, Grafana's `$__rate_interval` as 1m) and the
/// alert rules (deploy/prometheus/alerts.yml, each `EXPR > N` as `EXPR > bool N`, so that
/// a quiet system still gives a series).
fn operator_queries() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana/dashboards/jvpn.json")).expect("dashboard"),
    )
    .expect("the dashboard is JSON");
    let mut queries: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| {
            t["expr"]
                .as_str()
                .map(|e| e.replace("$__rate_interval", "1m"))
        })
        .collect();
    let rules = std::fs::read_to_string(root.join("prometheus/alerts.yml")).expect("rules");
    for line in rules.lines() {
        if let Some(expr) = line.trim().strip_prefix("expr: ") {
            let (left, right) = expr.rsplit_once(" > ").expect("alerts are EXPR > N");
            queries.push(format!("{left} > bool {right}"));
        }
    }
    queries
}

/// A real Prometheus scrapes a live gateway and client while traffic flows and a jump
/// happens: `promtool` accepts both metrics pages and the alert rules, and every
/// expression of the dashboard and of the rules is valid and returns a series.
#[test]
fn the_dashboard_and_the_alert_rules_work_on_a_real_prometheus() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if which("prometheus").is_none() || which("promtool").is_none() {
        let why = "prometheus and promtool (Debian package prometheus) are needed";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true: {why}");
        }
        eprintln!("skipping: {why}");
        return;
    }
    let Some(mut lab) = lab("e23") else { return };
    lab.client_metrics = "0.0.0.0:9478".into();
    connect(&mut lab, FAST_POLICY, "exit");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: [\"127.0.0.1:9477\"]\n  - job_name: client\n    static_configs:\n      - targets: [\"{client}:9478\"]\n",
        rules = root.join("alerts.yml").display(),
        client = netlab::CLIENT_A,
    );
    let config_path = lab.write("prometheus.yml", &config).expect("config");
    let data = lab.dir().join("prometheus-data");
    let g = lab.ns("g");
    lab.spawn(
        "prometheus",
        &g,
        &[
            "prometheus",
            &format!("--config.file={}", config_path.display()),
            &format!("--storage.tsdb.path={}", data.display()),
            "--web.listen-address=127.0.0.1:9090",
        ],
    )
    .expect("prometheus");
    // Traffic, and a jump (path A cut), while it scrapes.
    assert_eq!(ping(&lab, "c", SERVER, 5), 5);
    lab.cut(Path2::A).expect("cut");
    assert!(
        wait_until(Duration::from_secs(5), || lab.attached_on(2)),
        "{}",
        lab.diagnostics()
    );
    assert_eq!(ping(&lab, "c", SERVER, 5), 5);
    for (who, ns, addr) in [
        ("gateway", lab.ns("g"), "127.0.0.1:9477"),
        ("client", lab.ns("c"), "127.0.0.1:9478"),
    ] {
        let page = lab
            .exec_ok(&ns, &[tool(), "fetch", "--addr", addr])
            .expect("metrics");
        let file = lab.write(&format!("{who}.metrics"), &page).expect("write");
        let check = lab
            .exec(
                &ns,
                &[
                    "sh",
                    "-c",
                    &format!("promtool check metrics < {}", file.display()),
                ],
            )
            .expect("promtool");
        assert!(
            check.status.success(),
            "promtool check metrics ({who}): {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let rules = lab
        .exec(
            &g,
            &[
                "promtool",
                "check",
                "rules",
                &root.join("alerts.yml").display().to_string(),
            ],
        )
        .expect("promtool");
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
    // Evaluated once both targets have been scraped a few times.
    let query = |q: &str| -> Option<Value> {
        let path = format!("/api/v1/query?query={}", url_encode(q));
        let body = lab
            .exec_ok(
                &g,
                &[tool(), "fetch", "--addr", "127.0.0.1:9090", "--path", &path],
            )
            .ok()?;
        serde_json::from_str(&body).ok()
    };
    let ready = wait_until(Duration::from_secs(20), || {
        query("count(up == 1)").is_some_and(|v| v["data"]["result"][0]["value"][1] == "2")
            && query("jvpn_reattach_latency_seconds_count").is_some_and(|v| {
                v["data"]["result"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty())
            })
    });
    assert!(
        ready,
        "Prometheus did not scrape both: {:?}",
        lab.output_of("prometheus")
    );
    std::thread::sleep(Duration::from_secs(3));
    let queries = operator_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    for q in &queries {
        let answer = query(q).unwrap_or_else(|| panic!("no answer to {q}"));
        assert_eq!(answer["status"], "success", "{q}: {answer}");
        let series = answer["data"]["result"].as_array().map_or(0, Vec::len);
        assert!(series > 0, "{q} returns no series");
    }
    eprintln!(
        "PROMETHEUS {} expressions evaluated, each with a series",
        queries.len()
    );
    lab.stop("prometheus", Duration::from_secs(5));
    finish(lab);
}

/// `jvpn demo` needs nothing but the binary, root and /dev/net/tun: run with an empty
/// environment and no PATH at all (no `ip`, `nft` or `ping` to be found), it builds its
/// lab over netlink, probes through the tunnel with its own UDP echoes, cuts path A with
/// routes, shows the jump, and leaves nothing behind.
#[test]
fn the_demo_needs_nothing_but_the_binary() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // The prerequisites check (and its skip or CI failure) of every lab test.
    let Some(lab) = lab("e30") else { return };
    drop(lab);
    for cut in ["route", "link"] {
        let out = std::process::Command::new(jvpn())
            .args(["demo", "--policy", "fast", "--cut", cut])
            .env_clear()
            .env("PATH", "/nonexistent")
            .output()
            .expect("jvpn demo");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "demo --cut {cut}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("(same id: true)"), "{text}");
        assert!(
            text.contains("TransportSwitch {\"id\":1,\"protocol\":\"udp\"} -> {\"id\":2"),
            "{text}"
        );
        let answered = text
            .split("probes: ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0);
        assert!(
            answered >= 200,
            "only {answered} of 240 probes answered\n{text}"
        );
        println!(
            "DEMO cut {cut}: {}",
            text.lines()
                .rev()
                .find(|l| l.contains("probe gap"))
                .unwrap_or("")
        );
        assert_gone("dm1");
    }
}

/// The JSON list (exec form) of the Dockerfile's instruction `instruction`, after
/// `within` when given (HEALTHCHECK's `CMD`); continuation lines joined.
fn dockerfile_list(text: &str, instruction: &str, within: Option<&str>) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    let line = joined
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("the Dockerfile has no {instruction}"));
    let rest = match within {
        Some(word) => {
            &line[line
                .find(word)
                .unwrap_or_else(|| panic!("{instruction}: no {word}"))..]
        }
        None => line,
    };
    let list = &rest[rest
        .find('[')
        .unwrap_or_else(|| panic!("{instruction}: exec form"))..];
    serde_json::from_str(list).unwrap_or_else(|e| panic!("{instruction}: {e}"))
}

/// The image's entrypoint contract, without a docker engine: the gateway started as the
/// image starts it (its ENTRYPOINT and CMD, as the USER of the Dockerfile, with the file
/// capability the image gives the binary and a bounding set of NET_ADMIN alone, as
/// `--cap-drop ALL --cap-add NET_ADMIN` leaves it) creates its TUN device, sets
/// forwarding and masquerade, serves a client, answers the HEALTHCHECK command (run as
/// that user too), and on the STOPSIGNAL ends the session explicitly
/// (operator_terminated, the client is told) and exits 0, leaving nothing behind.
#[test]
fn the_container_entrypoint_runs_unprivileged_and_stops_cleanly() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e31") else { return };
    // The image's user opens /dev/net/tun as any user may where udev made the node (mode
    // 0666 on every distribution); a machine without udev may leave it to root alone.
    use std::os::unix::fs::PermissionsExt;
    let tun_mode = std::fs::metadata("/dev/net/tun")
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert!(
        tun_mode & 0o006 == 0o006,
        "/dev/net/tun is not open to every user (mode {tun_mode:o}), as udev makes it: the \
         image's unprivileged user cannot create its TUN device (`chmod 0666 /dev/net/tun`, \
         as .ci/run does)"
    );
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Dockerfile"))
            .expect("Dockerfile");
    let user = dockerfile
        .lines()
        .find_map(|l| l.trim().strip_prefix("USER "))
        .expect("the image names its user");
    let (uid, gid) = user.trim().split_once(':').expect("USER uid:gid");
    assert_ne!(uid, "0", "the image runs as root");
    assert!(dockerfile.contains("setcap cap_net_admin=ep /usr/local/bin/jvpn"));
    assert!(dockerfile.lines().any(|l| l.trim() == "STOPSIGNAL SIGTERM"));
    let entrypoint = dockerfile_list(&dockerfile, "ENTRYPOINT", None);
    let cmd = dockerfile_list(&dockerfile, "CMD", None);
    let health = dockerfile_list(&dockerfile, "HEALTHCHECK", Some(" CMD "));
    assert_eq!(entrypoint, ["jvpn"]);
    // The image's binary: a copy with the image's file capability.
    let dir = lab.dir().to_path_buf();
    let bin = dir.join("jvpn");
    std::fs::copy(jvpn(), &bin).expect("copy jvpn");
    let (uid_n, gid_n): (u32, u32) = (uid.parse().expect("uid"), gid.parse().expect("gid"));
    std::os::unix::fs::chown(&dir, Some(uid_n), Some(gid_n)).expect("chown");
    let setcap = std::process::Command::new("setcap")
        .args(["cap_net_admin=ep", &bin.display().to_string()])
        .status()
        .expect("setcap (Debian libcap2-bin)");
    assert!(setcap.success());
    let as_user = |argv: &[String]| -> Vec<String> {
        let mut full: Vec<String> = [
            "setpriv",
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all,+net_admin",
            "--",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        full.push(bin.display().to_string());
        full.extend(argv.iter().skip(1).cloned());
        full
    };
    let g = lab.ns("g");
    lab.gateway_forwarding = format!("enable = true\nmasquerade_out = \"{g}s\"\n");
    // The server has no route back to the tunnel network: only the masquerade brings
    // its answers back.
    lab.exec_ok(&lab.ns("s"), &["ip", "route", "del", "10.77.0.0/24"])
        .expect("route");
    let config = lab
        .gateway_config(FAST_POLICY)
        .expect("config")
        .display()
        .to_string();
    // CMD with the test's configuration in place of /etc/jvpn/gateway.toml.
    let mut argv: Vec<String> = entrypoint.clone();
    argv.extend(cmd.iter().map(|a| {
        if a == "/etc/jvpn/gateway.toml" {
            config.clone()
        } else {
            a.clone()
        }
    }));
    assert!(argv.contains(&config), "CMD names /etc/jvpn/gateway.toml");
    let argv = as_user(&argv);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.spawn("gateway", &g, &argv).expect("gateway");
    assert!(
        wait_until(Duration::from_secs(10), || lab.status("gw").is_some()),
        "the unprivileged gateway did not come up\n{}",
        lab.diagnostics()
    );
    // It runs as the image's user with NET_ADMIN (bit 12) as its only capability.
    let pid = lab.pid("gateway").expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), uid, "{status}");
    assert_eq!(field("CapEff:"), format!("{:016x}", 1u64 << 12), "{status}");
    assert_eq!(field("CapBnd:"), format!("{:016x}", 1u64 << 12), "{status}");
    let tables = lab.exec_ok(&g, &["nft", "list", "tables"]).expect("nft");
    assert!(tables.contains("jvpn_nat_"), "no masquerade: {tables}");
    // The health check, as the image runs it (as the same user).
    let socket = lab.socket("gw").display().to_string();
    let health: Vec<String> = health
        .iter()
        .map(|a| {
            if a == "/run/jvpn/gateway.sock" {
                socket.clone()
            } else {
                a.clone()
            }
        })
        .collect();
    assert!(
        health.contains(&socket),
        "HEALTHCHECK asks /run/jvpn/gateway.sock"
    );
    let check = lab
        .exec(
            &g,
            &as_user(&health)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .expect("health check");
    assert!(check.status.success(), "health check: {check:?}");
    // A client, through the tunnel, to the server behind the (masquerading) gateway.
    let key = lab.gateway_key.public().to_string();
    let client_config = lab
        .client_config("exit", &key, FAST_POLICY)
        .expect("client config")
        .display()
        .to_string();
    let c = lab.ns("c");
    lab.spawn(
        "client",
        &c,
        &[
            jvpn(),
            "client",
            "--config",
            &client_config,
            "--connect-timeout",
            "10",
        ],
    )
    .expect("client");
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .status("client")
            .is_some_and(|s| s["state"] == "ATTACHED")
            && lab.link_exists(&c, &lab.tun_name())),
        "{}",
        lab.diagnostics()
    );
    assert_eq!(ping(&lab, "c", SERVER, 3), 3);
    // docker stop.
    assert_eq!(
        lab.stop("gateway", Duration::from_secs(10)),
        Some(0),
        "{}",
        lab.diagnostics()
    );
    let ended = lab.events("gw").iter().any(|e| {
        e["event_type"] == "SessionStateChange"
            && e["new_state"] == "TERMINATED"
            && e["reason_code"] == "operator_terminated"
    });
    assert!(ended, "the gateway did not end the session explicitly");
    // The client was told (not left to find out by silence): it exits on the end.
    assert!(
        lab.wait("client", Duration::from_secs(5)).is_some(),
        "the client was not told\n{}",
        lab.diagnostics()
    );
    let client_ended = lab
        .events("client")
        .iter()
        .any(|e| e["new_state"] == "TERMINATED" && e["reason_code"] == "operator_terminated");
    assert!(client_ended, "{:?}", lab.events("client"));
    assert!(
        !lab.link_exists(&g, &lab.tun_name()),
        "the gateway's TUN outlived it"
    );
    let tables = lab.exec_ok(&g, &["nft", "list", "tables"]).expect("nft");
    assert!(
        !tables.contains("jvpn_nat_"),
        "masquerade left behind: {tables}"
    );
    let tag = tag_of(&lab);
    drop(lab);
    assert_gone(&tag);
}

/// The datagrams a service manager would receive on `socket` within `limit`, joined.
fn notifications(
    socket: &std::os::unix::net::UnixDatagram,
    limit: Duration,
    until: &str,
) -> String {
    let deadline = Instant::now() + limit;
    let mut all = String::new();
    let mut buf = [0u8; 512];
    while !all.contains(until) {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        socket.set_read_timeout(Some(left)).expect("timeout");
        match socket.recv(&mut buf) {
            Ok(n) => {
                all.push_str(&String::from_utf8_lossy(&buf[..n]));
                all.push('\n');
            }
            Err(_) => break,
        }
    }
    all
}

/// The workstation service: the client tells its service manager (systemd's notify
/// protocol) when it is ready, reloading and stopping; on SIGHUP it reads its file
/// again and puts a new policy version in force on the live session (same session, no
/// transition, a PolicyApplied event, later events carry the new version, and a jump
/// runs under it); a change that needs a new session is refused, saying so.
#[test]
fn the_client_service_reloads_its_policy_on_sighup_and_tells_its_manager() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut lab) = lab("e32") else { return };
    lab.start_gateway(FAST_POLICY).expect("gateway");
    let notify_path = lab.dir().join("notify.sock");
    let manager = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    let key = lab.gateway_key.public().to_string();
    let config = lab
        .client_config("exit", &key, FAST_POLICY)
        .expect("config")
        .display()
        .to_string();
    let c = lab.ns("c");
    let notify_env = format!("NOTIFY_SOCKET={}", notify_path.display());
    lab.spawn(
        "client",
        &c,
        &["env", &notify_env, jvpn(), "client", "--config", &config],
    )
    .expect("client");
    let ready = notifications(&manager, Duration::from_secs(10), "READY=1");
    assert!(ready.contains("READY=1"), "{ready}\n{}", lab.diagnostics());
    // Told at once, when it came: by then the tunnel is up.
    assert!(
        lab.link_exists(&c, &lab.tun_name()),
        "READY before the TUN device was up"
    );
    let status = lab.status("client").expect("status");
    assert_eq!(status["state"], "ATTACHED", "ready before attached");
    let version = status["state_version"].clone();
    let id = status["session_id"].as_str().expect("id").to_string();
    let pid = lab.pid("client").expect("pid");

    // A new policy version: in force at once, on the same session.
    lab.client_config(
        "exit",
        &key,
        &format!("[policy]\nversion = \"2.0\"\n{FAST_POLICY}"),
    )
    .expect("config 2.0");
    netlab::signal(pid, nix::sys::signal::Signal::SIGHUP);
    let reload = notifications(&manager, Duration::from_secs(5), "READY=1");
    assert!(reload.contains("RELOADING=1\nMONOTONIC_USEC="), "{reload}");
    assert!(reload.contains("READY=1"), "{reload}");
    assert!(
        wait_until(Duration::from_secs(3), || lab
            .output_of("client")
            .1
            .contains("policy 1.0 -> 2.0 in force")),
        "{}",
        lab.diagnostics()
    );
    let mut applied = None;
    wait_until(Duration::from_secs(3), || {
        applied = lab
            .events("client")
            .into_iter()
            .find(|e| e["event_type"] == "PolicyApplied");
        applied.is_some()
    });
    let applied = applied.expect("a PolicyApplied event");
    assert_eq!(applied["previous_version"], "1.0");
    assert_eq!(applied["new_version"], "2.0");
    assert_eq!(applied["policy_version"], "2.0");
    assert_eq!(applied["session_id"], id.as_str());
    // No transition: the state and its version are as before.
    let status = lab.status("client").expect("status");
    assert_eq!(status["state"], "ATTACHED");
    assert_eq!(status["state_version"], version);
    assert!(
        !lab.events("client")
            .iter()
            .any(|e| e["event_type"] == "SessionStateChange" && e["policy_version"] == "2.0"),
        "a transition came with the reload"
    );

    // A change that needs a new session: refused, and said.
    lab.client_candidates.reverse();
    lab.client_config(
        "exit",
        &key,
        &format!("[policy]\nversion = \"3.0\"\n{FAST_POLICY}"),
    )
    .expect("config with new candidates");
    netlab::signal(pid, nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_until(Duration::from_secs(3), || {
            lab.output_of("client").1.contains(
            "candidates changed, which needs a new session: restart the client to use it; nothing changed"
        )
        }),
        "{}",
        lab.diagnostics()
    );

    // The live session runs under 2.0: its jump is reported so.
    lab.cut(Path2::A).expect("cut");
    assert!(
        wait_until(Duration::from_secs(10), || lab.attached_on(2)),
        "{}",
        lab.diagnostics()
    );
    let mut events = Vec::new();
    wait_until(Duration::from_secs(3), || {
        events = lab.events("client");
        events.iter().any(|e| e["event_type"] == "TransportSwitch")
    });
    let switch = events
        .iter()
        .find(|e| e["event_type"] == "TransportSwitch")
        .expect("switch");
    assert_eq!(switch["policy_version"], "2.0");
    assert_eq!(switch["session_id"], id.as_str());
    assert!(
        !events.iter().any(|e| e["new_state"] == "TERMINATED"),
        "the reloads ended the session"
    );
    assert_eq!(
        lab.status("client").expect("status")["session_id"],
        id.as_str()
    );

    assert_eq!(lab.stop("client", Duration::from_secs(5)), Some(0));
    let stopping = notifications(&manager, Duration::from_secs(2), "STOPPING=1");
    assert!(stopping.contains("STOPPING=1"), "{stopping}");
    finish(lab);
}

/// What the TUN readers of [`an_echo_reply_is_read_on_the_tun_queue_its_request_was_written_from`]
/// read: each packet with the queue it was read from.
struct QueueRecorder {
    queue: usize,
    read: tokio::sync::mpsc::UnboundedSender<(usize, bytes::Bytes)>,
}

impl jvpn_actors::tun::TunRoute for QueueRecorder {
    fn packets(&self, batch: Vec<bytes::Bytes>) {
        for packet in batch {
            let _ = self.read.send((self.queue, packet));
        }
    }
}

/// An IPv4 ICMP echo request from `src` to `dst` with identifier `id` and sequence
/// `seq`, both checksums right.
fn echo_request(src: [u8; 4], dst: [u8; 4], id: u16, seq: u16) -> Vec<u8> {
    let checksum = |bytes: &[u8]| jvpn_core::offload::internet_checksum(bytes).to_be_bytes();
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(&[0x5a; 32]);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum);
    let total = u16::try_from(20 + icmp.len()).expect("small");
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum);
    ip.extend_from_slice(&icmp);
    ip
}

/// The gateway's TUN device has one queue per session thread, and a session writes to
/// the queue its own thread reads: the kernel queues a flow's packets back on the queue
/// the flow was last written on, so a reply reaches the thread of the session that
/// forwarded the request (spec/runtime.md, Cores). Here echo requests to the device's
/// own address are written from the thread reading queue 1, then from the one reading
/// queue 0, and so on: each reply must be read on the queue of the thread that wrote
/// its request. (Written always to one queue, half of them would come back on the
/// other.) The kernel records a flow's queue just after it has taken in the written
/// packet, and it answers an echo to its own address at once, before that: so each
/// writer first writes one request whose reply may still take the flow's previous
/// queue (as a session's flows, always written from one thread, never do), then the
/// one checked.
#[test]
fn an_echo_reply_is_read_on_the_tun_queue_its_request_was_written_from() {
    use std::sync::Arc;

    use actix::prelude::*;
    use jvpn_actors::tun::{KernelTun, TunActor, TunConfig, TunDevice};
    use jvpn_core::wire::{TunnelAddr, TunnelAddrs};

    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(lab) = lab("tq") else { return };
    let ns = lab.ns("g");
    let rounds: Vec<usize> = vec![1, 0, 1, 0, 0, 1];
    let writers = rounds.clone();
    let read_on = std::thread::spawn(move || -> anyhow::Result<Vec<Option<usize>>> {
        jvpn::netlink::enter_netns(&ns)?;
        actix_rt::System::new().block_on(async move {
            let device = Arc::new(KernelTun::create(&TunConfig {
                name: "jvtq0".into(),
                addresses: TunnelAddrs::single(TunnelAddr {
                    addr: std::net::IpAddr::from([10, 251, 0, 1]),
                    prefix: 24,
                })?,
                mtu: 1420,
                queues: 2,
            })?);
            anyhow::ensure!(
                device.queues() == 2,
                "the device has {} queues",
                device.queues()
            );
            let (read, mut reads) = tokio::sync::mpsc::unbounded_channel();
            let arbiters: Vec<Arbiter> = (0..2).map(|_| Arbiter::new()).collect();
            let readers: Vec<Addr<TunActor>> = arbiters
                .iter()
                .enumerate()
                .map(|(queue, arbiter)| {
                    let route = Arc::new(QueueRecorder {
                        queue,
                        read: read.clone(),
                    });
                    let device: Arc<dyn TunDevice> = device.clone();
                    TunActor::for_queue(device, queue, route).start_supervised_in(&arbiter.handle())
                })
                .collect();
            // The readers register their queues at their first read.
            actix_rt::time::sleep(Duration::from_millis(200)).await;
            let mut read_on = Vec::new();
            for (seq, &writer) in writers.iter().flat_map(|w| [w, w]).enumerate() {
                let seq = u16::try_from(seq)?;
                let request = echo_request([10, 251, 0, 2], [10, 251, 0, 1], 0x6a76, seq);
                let writes_to = device.clone();
                // Written by the writer's thread, as a session on it writes.
                arbiters[writer].spawn(async move { writes_to.write_batch(&[&request]) });
                let reply = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some((queue, p)) = reads.recv().await {
                        // An echo reply (type 0) to this request: id and seq.
                        let icmp = p.get(20..28).unwrap_or_default();
                        if icmp.first() == Some(&0)
                            && icmp.get(4..8)
                                == Some(&[0x6a, 0x76, (seq >> 8) as u8, seq as u8][..])
                        {
                            return Some(queue);
                        }
                    }
                    None
                })
                .await
                .ok()
                .flatten();
                if seq % 2 == 1 {
                    read_on.push(reply);
                }
            }
            for r in &readers {
                r.do_send(jvpn_actors::runtime::Close);
            }
            for a in arbiters {
                a.stop();
            }
            Ok(read_on)
        })
    })
    .join()
    .expect("the test's thread")
    .expect("the device and its readers");
    let wrote: Vec<Option<usize>> = rounds.into_iter().map(Some).collect();
    assert_eq!(
        read_on, wrote,
        "the queue each reply was read on, by request"
    );
    let tag = tag_of(&lab);
    drop(lab);
    assert_gone(&tag);
}
