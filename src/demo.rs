//! `jvpn demo`: the whole idea in one command. As root, it builds the network lab (two
//! paths between a client and a gateway namespace, a server behind the gateway), runs a
//! real gateway and client over real TUN devices, pings the server through the tunnel,
//! cuts the active path, and shows the jump: the session's events and the ping gap.
//! Everything it made is removed at the end, also when a step fails.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::netlab::{self, Lab, Path2, SERVER};

/// The policy the demo's session runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DemoPolicy {
    /// The starter policy of config/policy.toml (heartbeat every 500 ms).
    Default,
    /// Heartbeats every 100 ms, volatile after 400 ms.
    Fast,
}

impl DemoPolicy {
    fn overrides(self) -> &'static str {
        match self {
            DemoPolicy::Default => "",
            DemoPolicy::Fast => {
                "[policy.volatility]\nheartbeat_interval_ms = 100\nheartbeat_volatile_ms = 400\nprobe_interval_ms = 200\nloss_window_ms = 1000\n"
            }
        }
    }
}

/// How the active path is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DemoCut {
    /// nftables drops the VPN's packets on path A: silence.
    Firewall,
    /// The client's link on path A goes down.
    Link,
}

/// Ping interval and count: 20 pings a second for 12 s.
const PING_INTERVAL: Duration = Duration::from_millis(50);
const PINGS: u32 = 240;

/// Runs the demo `runs` times; prints each run and the median ping gap.
pub fn run(policy: DemoPolicy, cut: DemoCut, runs: u32) -> Result<()> {
    netlab::check_prerequisites().context("the demo builds network namespaces")?;
    let jvpn: PathBuf = std::env::current_exe().context("cannot find the jvpn binary")?;
    let runs = runs.clamp(1, 20);
    let tags: Vec<String> = (1..=runs).map(|r| format!("dm{r}")).collect();
    clean_up_on_signal(tags.clone())?;
    let mut gaps = Vec::new();
    for (run, tag) in (1..=runs).zip(&tags) {
        println!("== run {run} of {runs}: policy {policy:?}, cut {cut:?}");
        let mut lab = Lab::new(tag, &jvpn)?;
        gaps.push(one(&mut lab, policy, cut)?);
    }
    gaps.sort_unstable();
    let Some(median) = gaps.get(gaps.len() / 2).copied() else {
        bail!("no run finished");
    };
    println!(
        "\nping gap over {runs} run(s): median {} ms (all: {:?} ms)",
        median.as_millis(),
        gaps.iter().map(Duration::as_millis).collect::<Vec<_>>()
    );
    Ok(())
}

/// Ctrl-C or SIGTERM in the middle of a run: remove what the labs made, then exit.
fn clean_up_on_signal(tags: Vec<String>) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the signal watcher")?;
    let mut stop = runtime.block_on(async { crate::service::StopSignal::install() })?;
    std::thread::spawn(move || {
        let name = runtime.block_on(stop.wait());
        eprintln!("jvpn demo: {name}: cleaning up");
        for tag in &tags {
            Lab::purge(tag);
        }
        std::process::exit(130);
    });
    Ok(())
}

fn one(lab: &mut Lab, policy: DemoPolicy, cut: DemoCut) -> Result<Duration> {
    println!(
        "lab: namespaces {c} (client), {g} (gateway), {s} (server {SERVER}); paths A {a} and B {b}",
        c = lab.ns("c"),
        g = lab.ns("g"),
        s = lab.ns("s"),
        a = Path2::A.gateway(),
        b = Path2::B.gateway(),
    );
    lab.start_gateway(policy.overrides())?;
    let id = lab.start_client("exit", policy.overrides())?;
    println!("session {id} attached on path A; pinging {SERVER} through the tunnel");
    let c = lab.ns("c");
    let interval = format!("{:.2}", PING_INTERVAL.as_secs_f64());
    lab.spawn(
        "ping",
        &c,
        &[
            "ping",
            "-n",
            "-i",
            &interval,
            "-c",
            &PINGS.to_string(),
            "-W",
            "1",
            SERVER,
        ],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    match cut {
        DemoCut::Firewall => lab.cut(Path2::A)?,
        DemoCut::Link => lab.link(Path2::A, false)?,
    }
    println!("path A cut ({cut:?})");
    let jumped = netlab::wait_until(Duration::from_secs(10), || lab.attached_on(2));
    if !jumped {
        bail!("the session did not jump to path B\n{}", lab.diagnostics());
    }
    if lab.wait("ping", Duration::from_secs(30)).is_none() {
        bail!("ping did not finish");
    }
    let (out, _) = lab.output_of("ping");
    let gap = netlab::ping_gap(&out, PINGS, PING_INTERVAL);
    println!("the client's events:");
    for e in lab.events("client") {
        match e["event_type"].as_str() {
            Some("SessionStateChange") => println!(
                "  {} {} -> {} ({}), version {}",
                e["ts_ms"],
                e["previous_state"].as_str().unwrap_or(""),
                e["new_state"].as_str().unwrap_or(""),
                e["reason_code"].as_str().unwrap_or(""),
                e["state_version"]
            ),
            Some("TransportSwitch") => println!(
                "  {} TransportSwitch {} -> {}",
                e["ts_ms"], e["previous_transport"], e["new_transport"]
            ),
            _ => {}
        }
    }
    let status = lab.status("client").unwrap_or_default();
    println!(
        "session {} still {} on path B (same id: {}); ping: {} of {} replies, longest gap {} ms",
        status["session_id"].as_str().unwrap_or("?"),
        status["state"].as_str().unwrap_or("?"),
        status["session_id"].as_str() == Some(id.as_str()),
        gap.received,
        gap.sent,
        gap.longest_gap.as_millis()
    );
    if status["session_id"].as_str() != Some(id.as_str()) {
        bail!("the session id changed");
    }
    lab.stop("client", Duration::from_secs(5));
    lab.stop("gateway", Duration::from_secs(5));
    lab.teardown();
    println!("cleaned up: processes stopped, namespaces deleted");
    Ok(gap.longest_gap)
}
