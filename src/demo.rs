//! `jvpn demo`: the whole idea in one command. As root, it builds the network lab (two
//! paths between a client and a gateway namespace, a server behind the gateway), runs a
//! real gateway and client over real TUN devices, probes the server through the tunnel,
//! cuts the active path, and shows the jump: the session's events and the probes' gap.
//! Everything it made is removed at the end, also when a step fails. It needs nothing
//! but this binary, root and /dev/net/tun: the lab is made over netlink, the probes are
//! its own UDP echoes, and the cut is a route.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;

use crate::netlab::{self, Lab, Path2, PingGap, SERVER};
use crate::netlink;

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
    /// A blackhole route at the gateway throws away its answers on path A: the client
    /// hears silence, which its heartbeats notice.
    Route,
    /// The client's link on path A goes down.
    Link,
}

/// Probe interval and count: 20 probes a second for 12 s.
const PROBE_INTERVAL: Duration = Duration::from_millis(50);
const PROBES: u32 = 240;
/// The server's UDP echo port.
const ECHO_PORT: u16 = 7;

/// Runs the demo `runs` times; prints each run and the median probe gap.
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
        "\nprobe gap over {runs} run(s): median {} ms (all: {:?} ms)",
        median.as_millis(),
        gaps.iter().map(Duration::as_millis).collect::<Vec<_>>()
    );
    Ok(())
}

/// A UDP echo server in a namespace, until dropped.
struct Echo {
    stop: Arc<AtomicBool>,
}

impl Echo {
    fn start(ns: &str, listen: SocketAddr) -> Result<Echo> {
        let socket = bound_in(ns, listen)?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Ok(Echo { stop })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A UDP socket bound to `addr` in the namespace `ns` (a socket stays in the namespace
/// it was made in).
fn bound_in(ns: &str, addr: SocketAddr) -> Result<UdpSocket> {
    netlink::in_netns_thread(ns, || UdpSocket::bind(addr))
        .with_context(|| format!("cannot bind {addr} in {ns}"))
}

/// Sends `count` numbered UDP probes to the echo server `to` from the namespace `ns`,
/// one every `interval`, and counts the answers (for a second after the last probe).
fn probe(
    ns: &str,
    to: SocketAddr,
    count: u32,
    interval: Duration,
) -> Result<std::thread::JoinHandle<Result<PingGap>>> {
    let socket = bound_in(ns, SocketAddr::from(([0, 0, 0, 0], 0)))?;
    Ok(std::thread::spawn(move || {
        let start = Instant::now();
        let (mut seqs, mut rtts) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 64];
        for seq in 1..=count + 20 {
            let due = start + interval * seq;
            if seq <= count {
                let mut probe = [0u8; 20];
                probe[..4].copy_from_slice(&seq.to_be_bytes());
                let sent_at = start.elapsed().as_nanos() as u64;
                probe[4..12].copy_from_slice(&sent_at.to_be_bytes());
                // A send refused while the path is cut is a lost probe.
                let _ = socket.send_to(&probe, to);
            }
            while let Some(left) = due.checked_duration_since(Instant::now()) {
                socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
                let Ok((n, _)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if n >= 12 {
                    let [s0, s1, s2, s3, t @ ..] = buf;
                    let sent = u64::from_be_bytes(t[..8].try_into().unwrap_or_default());
                    let now = start.elapsed().as_nanos() as u64;
                    seqs.push(u32::from_be_bytes([s0, s1, s2, s3]));
                    rtts.push(now.saturating_sub(sent) as f64 / 1e6);
                }
            }
        }
        Ok(netlab::gap_of(seqs, rtts, count, interval))
    }))
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
    println!("session {id} attached on path A; probing {SERVER} through the tunnel (UDP echo, 20 a second)");
    let echo = Echo::start(&lab.ns("s"), SocketAddr::from(([0, 0, 0, 0], ECHO_PORT)))?;
    let server = SocketAddr::new(netlab::addr(SERVER), ECHO_PORT);
    let probes = probe(&lab.ns("c"), server, PROBES, PROBE_INTERVAL)?;
    std::thread::sleep(Duration::from_secs(2));
    match cut {
        DemoCut::Route => lab.blackhole(Path2::A)?,
        DemoCut::Link => lab.link(Path2::A, false)?,
    }
    println!("path A cut ({cut:?})");
    let jumped = netlab::wait_until(Duration::from_secs(10), || lab.attached_on(2));
    if !jumped {
        bail!("the session did not jump to path B\n{}", lab.diagnostics());
    }
    let gap = probes
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the prober failed")))?;
    drop(echo);
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
        "session {} still {} on path B (same id: {}); probes: {} of {} answered, longest gap {} ms",
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
