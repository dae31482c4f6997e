//! `jvpn client`: the client agent over one UDP socket per candidate path, its kernel
//! TUN device (created once the gateway has assigned the tunnel address), routes, the
//! admin socket, metrics and events; everything it changed is undone on exit.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use jvpn_actors::agent::{
    AgentStatus, ApplyPolicy, Candidate, CandidatePath, ClientAgent, Describe, EndSession,
    OnSessionEnd, Shutdown, UseDevice,
};
use jvpn_actors::conn::{self, ConnCandidate};
use jvpn_actors::runtime::Reporter;
use jvpn_actors::tun::{KernelTun, TunConfig};
use jvpn_core::client::{Client, ClientConfig};
use jvpn_core::event::TransportRef;
use jvpn_core::ids::{NodeId, Protocol, TransportId};
use jvpn_core::wire::TunnelAddrs;

use crate::admin::{self, Answer, Request};
use crate::config::{CandidateSetup, ClientSetup, OnEnd, IPV6_MIN_MTU};
use crate::netconf::Changes;
use crate::reload::{self, Reload};
use crate::service;
use crate::views;

/// How long one QUIC or TCP connection attempt may take: the policy's
/// `heartbeat_volatile_ms` (a path that answers nothing for that long counts as
/// failing anyway), and at least a second for the TLS handshake's round trips.
fn connect_attempt(policy: &jvpn_core::policy::Policy) -> Duration {
    policy.heartbeat_volatile().max(Duration::from_secs(1))
}

/// The agent's mailbox capacity.
const AGENT_MAILBOX: usize = 1024;
/// How long stopping waits for the gateway to be told.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs the client until a stop signal or, when so configured, its session's end.
/// SIGHUP reloads `config` (see [`crate::reload`]).
pub fn run(setup: ClientSetup, config: PathBuf, connect_timeout: Duration) -> Result<ExitCode> {
    service::run_system(serve(setup, config, connect_timeout))
}

fn socket_for(c: &CandidateSetup, fwmark: Option<u32>) -> Result<UdpSocket> {
    let bind = c.bind.unwrap_or(match c.endpoint {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    });
    let socket = UdpSocket::bind(bind)
        .with_context(|| format!("cannot bind {bind} for the candidate {}", c.endpoint))?;
    if let Some(mark) = fwmark {
        socket2::SockRef::from(&socket)
            .set_mark(mark)
            .with_context(|| format!("cannot mark the socket for {} (fwmark)", c.endpoint))?;
    }
    socket
        .connect(c.endpoint)
        .with_context(|| format!("cannot reach the candidate {} (no route?)", c.endpoint))?;
    Ok(socket)
}

async fn serve(
    mut setup: ClientSetup,
    config: PathBuf,
    connect_timeout: Duration,
) -> Result<ExitCode> {
    let mut stop = service::StopSignal::install()?;
    let mut hangup = service::ReloadSignal::install()?;
    service::metrics(setup.metrics)?;
    let sink = service::event_sink(&setup.events)?;
    let fwmark = setup.full_tunnel.then_some(setup.fwmark);
    // The largest datagram a tunnel packet makes.
    let largest = usize::from(setup.tunnel.mtu) + jvpn_core::wire::OVERHEAD;
    let mut candidates = Vec::new();
    for (i, c) in setup.candidates.iter().enumerate() {
        if c.protocol == Protocol::Quic {
            if let Some(warning) = conn::quic_mtu_warning(c.endpoint, setup.tunnel.mtu) {
                eprintln!("jvpn client: {warning}");
            }
        }
        let path = match (c.protocol, setup.gateway_tls_pin) {
            (Protocol::Udp, _) => CandidatePath::Udp(socket_for(c, fwmark)?),
            (protocol, Some(pin)) => CandidatePath::Conn(ConnCandidate {
                protocol,
                gateway: c.endpoint,
                bind: c.bind,
                fwmark,
                pin,
                connect_timeout: connect_attempt(&setup.policy),
                packet_max: largest,
            }),
            (_, None) => anyhow::bail!("candidate {}: gateway_tls_pin is missing", i + 1),
        };
        candidates.push(Candidate {
            id: TransportId(i as u32 + 1),
            path,
            gateway: c.endpoint,
            name: c.name.clone(),
        });
    }
    let policy = Arc::new(setup.policy.clone());
    let transports = candidates
        .iter()
        .zip(&setup.candidates)
        .map(|(c, setup)| TransportRef {
            id: c.id,
            protocol: setup.protocol,
        })
        .collect();
    let mut client = Client::new(
        ClientConfig {
            ciphers: jvpn_core::crypto::CipherSet::this_machine(),
            keypair: setup.keypair.clone(),
            gateway: setup.gateway,
            policy: Arc::clone(&policy),
            transports,
        },
        service::wall_clock(),
    );
    // The UDP paths are searched for the size they carry (a hop narrower than the first
    // link drops full-size datagrams silently otherwise): spec/runtime.md.
    client.search_path_mtu(u16::try_from(largest).unwrap_or(u16::MAX));
    let reporter = Reporter::new(
        service::wall_clock(),
        NodeId("client".into()),
        policy.version().to_string(),
        sink.sender(),
    );
    let on_end = match setup.on_end {
        OnEnd::Exit => OnSessionEnd::Stop,
        OnEnd::Reconnect => OnSessionEnd::Reconnect,
    };
    let handles = ClientAgent::start(client, candidates, None, reporter, on_end, AGENT_MAILBOX)
        .context("cannot start the client")?;
    let agent = handles.agent.clone();
    let answer: Answer = Rc::new(move |request| {
        let agent = agent.clone();
        Box::pin(async move {
            match request {
                Request::Status => match agent.send(Describe).await {
                    Ok(view) => views::client(&view),
                    Err(e) => admin::error_reply(format!("the client does not answer: {e}")),
                },
                // The session ends as the configuration says: the client reconnects as a
                // new session or exits.
                Request::Terminate { session_id } => {
                    admin::terminate_answer(&session_id, "client", |id| agent.send(EndSession(id)))
                        .await
                }
            }
        })
    });
    let admin_socket = admin::serve(&setup.admin_socket, answer).await?;

    let mut status = handles.status;
    let mut changes = Changes::default();
    let mut tunnel: Option<TunnelAddrs> = None;
    let mut told: Option<AgentStatus> = None;
    let started = Instant::now();
    let outcome: Result<ExitCode> = loop {
        let now: AgentStatus = status.borrow_and_update().clone();
        tell_changes(told.as_ref(), &now, &setup);
        told = Some(now.clone());
        if let Some(assigned) = now.tunnel {
            if tunnel.is_some_and(|t| t != assigned) {
                break Err(anyhow::anyhow!(
                    "the gateway assigned new tunnel addresses {assigned} to the new session (were {}): restart the client",
                    tunnel.map(|t| t.to_string()).unwrap_or_default()
                ));
            }
            if tunnel.is_none() {
                if let Err(e) = bring_up(
                    &setup.tunnel,
                    assigned,
                    &setup,
                    &mut changes,
                    &handles.agent,
                )
                .await
                {
                    break Err(e);
                }
                tunnel = Some(assigned);
                eprintln!(
                    "jvpn client: session {} attached, tunnel {} {assigned}, cipher {}",
                    now.session_id.map(|s| s.to_string()).unwrap_or_default(),
                    setup.tunnel.name,
                    now.cipher.map_or("none", |c| c.name()),
                );
                service::notify(&format!(
                    "READY=1\nSTATUS=session {} attached, tunnel {assigned}",
                    now.session_id.map(|s| s.to_string()).unwrap_or_default()
                ));
            }
        }
        if now.stopped {
            let reason = now.last_end.map(|r| r.as_str()).unwrap_or("stopped");
            eprintln!("jvpn client: session ended: {reason}");
            break Ok(ExitCode::FAILURE);
        }
        let waiting =
            (now.sessions == 0).then(|| connect_timeout.saturating_sub(started.elapsed()));
        if waiting == Some(Duration::ZERO) {
            break Err(anyhow::anyhow!(
                "no session with the gateway at {} within {:?}: check that the gateway runs and is reachable, and that gateway_public_key is its key (a wrong key gets no answer)",
                setup
                    .candidates
                    .iter()
                    .map(|c| c.endpoint.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                connect_timeout
            ));
        }
        let tick = waiting.unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            changed = status.changed() => {
                if changed.is_err() {
                    break Ok(ExitCode::FAILURE);
                }
            }
            _ = tokio::time::sleep(tick) => {}
            name = stop.wait() => {
                eprintln!("jvpn client: {name}: ending the session (the gateway is told)");
                break Ok(ExitCode::SUCCESS);
            }
            () = hangup.wait() => reload(&config, &mut setup, &handles.agent, tunnel.is_some()).await,
        }
    };
    service::notify("STOPPING=1");
    // However the loop ended, the session ends explicitly and the gateway is told before
    // the runtime goes: the agent sends its Terminate, then closes its transports, which
    // send what they hold before they end.
    if !status.borrow().stopped {
        handles.agent.do_send(Shutdown);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while !status.borrow().stopped && Instant::now() < deadline {
        let _ = tokio::time::timeout(Duration::from_millis(100), status.changed()).await;
    }
    let transports: Vec<_> = handles
        .transports
        .iter()
        .map(|(_, a)| a.downgrade())
        .collect();
    drop(handles.transports);
    while transports.iter().any(|alive| alive()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(admin_socket);
    changes.undo_all();
    service::close_events(sink, "client");
    outcome
}

/// SIGHUP: reads `config` again and puts a new policy in force on the live session, or
/// says why nothing changed (one line on standard error either way).
/// `ready`: the first session is up (the service manager was told READY once already).
async fn reload(
    config: &Path,
    setup: &mut ClientSetup,
    agent: &actix::Addr<ClientAgent>,
    ready: bool,
) {
    service::notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        service::monotonic_usec()
    ));
    let told = match crate::config::load_client(config, None) {
        Err(e) => format!("{e}; nothing changed"),
        Ok(new) => match reload::plan(setup, &new) {
            Reload::Nothing => "nothing changed".into(),
            Reload::NeedsRestart(keys) => format!(
                "{} changed, which needs a new session: restart the client to use it; nothing changed",
                keys.join(", ")
            ),
            Reload::SameVersion(version) => format!(
                "the policy changed but its version is still {version:?}, so the events could not tell the two apart: raise policy.version; nothing changed"
            ),
            Reload::Apply(policy) => {
                let (old, version) = (setup.policy.version().to_string(), policy.version().to_string());
                match agent.send(ApplyPolicy(Arc::new((*policy).clone()))).await {
                    Ok(Ok(live)) => {
                        setup.policy = *policy;
                        let which = if live {
                            "the live session runs under it"
                        } else {
                            "for the next session (none is live)"
                        };
                        format!("policy {old} -> {version} in force, {which}")
                    }
                    Ok(Err(why)) => format!("{why}; nothing changed"),
                    Err(e) => format!("the client does not answer ({e}); nothing changed"),
                }
            }
        },
    };
    eprintln!("jvpn client: reload of {}: {told}", config.display());
    if ready {
        service::notify("READY=1");
    }
}

/// One human line on standard error for each thing a person wants to know of (the JSON
/// events say everything, for machines): the session moved to another path, a new
/// session started, the session ended. The first attach is told where the TUN device
/// is brought up.
fn tell_changes(before: Option<&AgentStatus>, now: &AgentStatus, setup: &ClientSetup) {
    let Some(before) = before else { return };
    let id = |s: &AgentStatus| s.session_id.map(|i| i.to_string()).unwrap_or_default();
    let endpoint = |t: Option<TransportId>| {
        t.and_then(|t| setup.candidates.get((t.0 as usize).checked_sub(1)?))
            .map(|c| c.endpoint.to_string())
            .unwrap_or_else(|| "?".into())
    };
    if now.sessions > before.sessions && now.sessions > 1 {
        eprintln!(
            "jvpn client: new session {} via {}",
            id(now),
            endpoint(now.active)
        );
    } else if before.active.is_some() && now.active.is_some() && now.active != before.active {
        let took = now
            .last_reattach
            .map(|d| format!(" in {} ms", d.as_millis()))
            .unwrap_or_default();
        eprintln!(
            "jvpn client: session {} moved from {} to {}{took}",
            id(now),
            endpoint(before.active),
            endpoint(now.active)
        );
    }
    if now.last_end != before.last_end && !now.stopped {
        if let Some(reason) = now.last_end {
            eprintln!(
                "jvpn client: session {} ended: {}",
                id(before),
                reason.as_str()
            );
        }
    }
}

/// Creates the TUN device with the assigned addresses, hands it to the agent and
/// installs the routes. A route of a family the tunnel has no address of is refused
/// (its packets would be dropped by the gateway as spoofed): so would the client's
/// traffic silently leave outside the tunnel.
async fn bring_up(
    tunnel: &crate::config::TunnelSetup,
    assigned: TunnelAddrs,
    setup: &ClientSetup,
    changes: &mut Changes,
    agent: &actix::Addr<ClientAgent>,
) -> Result<()> {
    if assigned.v6().is_some() && tunnel.mtu < IPV6_MIN_MTU {
        anyhow::bail!(
            "the gateway assigned an IPv6 tunnel address ({assigned}), but tunnel.mtu {} is below {IPV6_MIN_MTU}, the least IPv6 allows: raise tunnel.mtu",
            tunnel.mtu
        );
    }
    for (i, (net, prefix)) in setup.networks.iter().enumerate() {
        if assigned.of_family(*net).is_none() {
            anyhow::bail!(
                "routes.networks[{i}] {net}/{prefix}: the gateway assigned this client no tunnel address of that family ({assigned}); its traffic cannot go through the tunnel",
            );
        }
    }
    let device = KernelTun::create(&TunConfig {
        name: tunnel.name.clone(),
        addresses: assigned,
        mtu: tunnel.mtu,
        queues: 1,
    })?;
    if !device.offloads() {
        eprintln!(
            "jvpn client: the kernel refused TUN segmentation offload on {}: packets are read one by one",
            tunnel.name
        );
    }
    agent.do_send(UseDevice(Arc::new(device)));
    for (net, prefix) in &setup.networks {
        changes.route(*net, *prefix, &tunnel.name).await?;
    }
    if setup.full_tunnel {
        changes
            .full_tunnel(&tunnel.name, setup.fwmark, assigned)
            .await?;
    }
    Ok(())
}
