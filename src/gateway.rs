//! `jvpn gateway`: the gateway node over a kernel TUN device and UDP sockets, with its
//! admin socket, metrics and events, until Ctrl-C / SIGTERM.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use jvpn_actors::cluster::ClusterSettings;
use jvpn_actors::conn::{self, ConnListen};
use jvpn_actors::node::{GatewayNode, GatewayNodeConfig};
use jvpn_actors::runtime::Reporter;
use jvpn_actors::supervisor::{ListSessions, NodeLimits, TerminateSession};
use jvpn_actors::tls::TlsIdentity;
use jvpn_actors::transport;
use jvpn_actors::tun::{KernelTun, TunConfig};
use jvpn_core::gateway::GatewayConfig;
use jvpn_core::ids::NodeId;
use jvpn_core::ids::Protocol;
use jvpn_core::store::MemoryStore;

use crate::admin::{self, Answer, Request};
use crate::config::GatewaySetup;
use crate::netconf::Changes;
use crate::service;
use crate::views;

/// How long stopping waits for sessions to end and be released.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Runs the gateway until a stop signal.
pub fn run(setup: GatewaySetup) -> Result<()> {
    service::run_system(serve(setup))
}

async fn serve(setup: GatewaySetup) -> Result<()> {
    let mut signal = service::StopSignal::install()?;
    service::metrics(setup.metrics)?;
    let sink = service::event_sink(&setup.events)?;
    // One socket per core on each address (SO_REUSEPORT): the kernel spreads the
    // clients over them, and each client's session runs on the core that reads it.
    // One session thread per core, each with its socket and its queue of the TUN device
    // (of which the kernel gives at most 256).
    let cores = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jvpn_actors::tun::MAX_QUEUES);
    let mut listen = Vec::new();
    let mut connections = Vec::new();
    for &(protocol, addr) in &setup.listen {
        if protocol == Protocol::Quic {
            if let Some(warning) = conn::quic_mtu_warning(addr, setup.tunnel.mtu) {
                eprintln!("jvpn gateway: {warning}");
            }
        }
        match protocol {
            Protocol::Udp => {
                listen.extend(transport::bind_shared(addr, cores).with_context(|| {
                    format!("cannot listen on udp://{addr} (config key `listen`)")
                })?)
            }
            Protocol::Quic | Protocol::Tcp => connections.push(ConnListen {
                protocol,
                addr,
                packet_max: usize::from(setup.tunnel.mtu) + jvpn_core::wire::OVERHEAD,
            }),
        }
    }
    let tls = if connections.is_empty() {
        None
    } else {
        let identity = TlsIdentity::for_gateway(&setup.keypair)?;
        eprintln!(
            "jvpn gateway: QUIC and TCP certificate pin {} (the clients' gateway_tls_pin)",
            identity.pin()
        );
        Some((connections, identity))
    };
    let Some(addresses) = setup.tunnel.address else {
        anyhow::bail!("the gateway's tunnel address is missing (config key `tunnel.address`)");
    };
    let device = KernelTun::create(&TunConfig {
        name: setup.tunnel.name.clone(),
        addresses,
        mtu: setup.tunnel.mtu,
        queues: cores,
    })?;
    if !device.offloads() {
        eprintln!(
            "jvpn gateway: the kernel refused TUN segmentation offload on {}: packets are read one by one",
            setup.tunnel.name
        );
    }
    let mut changes = Changes::default();
    for net in addresses.iter() {
        if setup.forward {
            let path = if net.addr.is_ipv4() {
                "/proc/sys/net/ipv4/ip_forward"
            } else {
                "/proc/sys/net/ipv6/conf/all/forwarding"
            };
            changes.sysctl(path, "1")?;
        }
        if let Some(out) = &setup.masquerade_out {
            changes.masquerade(net.addr, net.prefix, out)?;
        }
    }
    if let Some(dev) = setup
        .cluster
        .as_ref()
        .and_then(|c| c.announce_interface.as_ref())
    {
        // Proxy ARP answers without the kernel's default delay (0.8 s), as VRRP's
        // address is answered: a host's first packet to a client is not held up.
        changes.sysctl(&format!("/proc/sys/net/ipv4/neigh/{dev}/proxy_delay"), "0")?;
    }
    let node_id = NodeId(setup.node_id.clone());
    let transport_lost_ttl = setup.policy.transport_lost_ttl();
    let reattach_max_age = setup.policy.reattach_proof_max_age();
    let (cluster, announcer) = match setup.cluster {
        Some(c) => {
            let announcer: Option<Arc<dyn jvpn_actors::supervisor::Announce>> =
                match c.announce_interface {
                    Some(dev) => Some(Arc::new(
                        crate::announce::NeighbourAnnouncer::start(dev)
                            .context("cannot start the announcer thread")?,
                    )),
                    None => None,
                };
            eprintln!(
                "jvpn gateway: cluster on etcd {} (prefix {}), lease {:?}, fenced after {:?} without a renewal",
                c.store.endpoints.join(","),
                c.store.prefix,
                c.lease_ttl,
                c.fence_after
            );
            let settings = ClusterSettings {
                store: c.store,
                key: c.key,
                lease_ttl: c.lease_ttl,
                fence_after: c.fence_after,
                transport_lost_ttl,
                reattach_max_age,
                view_capacity: setup
                    .session_capacity
                    .saturating_mul(8)
                    .clamp(1_024, 1_000_000),
            };
            (Some(settings), announcer)
        }
        None => (None, None),
    };
    let policy = Arc::new(setup.policy);
    let public = setup.keypair.public();
    let store = Arc::new(MemoryStore::new(
        setup.session_capacity,
        policy.max_candidate_count(),
    ));
    let reporter = Reporter::new(
        service::wall_clock(),
        node_id.clone(),
        policy.version().to_string(),
        sink.sender(),
    );
    let node = GatewayNode::start(GatewayNodeConfig {
        gateway: GatewayConfig {
            ciphers: jvpn_core::crypto::CipherSet::this_machine(),
            keypair: setup.keypair,
            node_id,
            policy: Arc::clone(&policy),
            clients: setup.clients.into_iter().map(|(_, c)| c).collect(),
        },
        store,
        listen,
        connections: tls,
        device: Arc::new(device),
        reporter,
        limits: NodeLimits::default(),
        arbiters: cores,
        cluster,
        announcer,
    })
    .context("cannot start the gateway node")?;
    let supervisor = node.supervisor.clone();
    let node_name = setup.node_id.clone();
    let answer: Answer = Rc::new(move |request| {
        let supervisor = supervisor.clone();
        let node_name = node_name.clone();
        Box::pin(async move {
            match request {
                Request::Status => match supervisor.send(ListSessions).await {
                    Ok(sessions) => views::gateway(&node_name, &sessions),
                    Err(e) => admin::error_reply(format!("the node does not answer: {e}")),
                },
                Request::Terminate { session_id } => {
                    admin::terminate_answer(&session_id, "node", |id| {
                        supervisor.send(TerminateSession(id))
                    })
                    .await
                }
            }
        })
    });
    let admin_socket = admin::serve(&setup.admin_socket, answer).await?;
    eprintln!(
        "jvpn gateway {}: public key {public}, listening on {}, tunnel {} {addresses}, admin {}",
        setup.node_id,
        setup
            .listen
            .iter()
            .map(|(p, a)| format!("{p}://{a}"))
            .collect::<Vec<_>>()
            .join(" "),
        setup.tunnel.name,
        setup.admin_socket.display(),
    );
    service::notify("READY=1");
    let signal = signal.wait().await;
    service::notify("STOPPING=1");
    if node.cluster.is_some() {
        eprintln!("jvpn gateway: {signal}: handing every session off to the other nodes");
    } else {
        eprintln!("jvpn gateway: {signal}: ending every session (operator_terminated)");
    }
    let left = node.stop(STOP_GRACE).await;
    if left > 0 {
        eprintln!("jvpn gateway: {left} session(s) were not released within {STOP_GRACE:?}");
    }
    drop(admin_socket);
    changes.undo_all();
    service::close_events(sink, "gateway");
    Ok(())
}
