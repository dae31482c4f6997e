//! Assembling a gateway node: the supervisor, the per-core arbiters its sessions run on,
//! one supervised transport reader per listen socket (spread over those arbiters), and
//! the TUN reader.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use jvpn_core::gateway::{GatewayConfig, HandshakeGate, Responder};
use jvpn_core::store::SessionStore;

use crate::cluster::{ClusterLink, ClusterNode, ClusterSettings, Depart, GiveUpLease, InFlight};
use crate::conn::{ConnListen, ConnListeners};
use crate::runtime::{Close, Reporter};
use crate::supervisor::{
    Announce, GatewayRouter, HandOffSessions, HandingOff, JoinCluster, NodeLimits, NodeSupervisor,
    Registry, StopSessions, StopSupervisor,
};
use crate::tls::TlsIdentity;
use crate::transport::{Deliver, PreparedUdp, UdpTransport};
use crate::tun::{TunActor, TunDevice, TunRoute};

/// What a gateway node is made of.
pub struct GatewayNodeConfig {
    /// Keys, node id, policy, authorized clients.
    pub gateway: GatewayConfig,
    /// The session table.
    pub store: Arc<dyn SessionStore>,
    /// Bound UDP sockets to listen on. Socket `i` is read on session arbiter `i` modulo
    /// their number, and the sessions whose handshake it reads run there too: bind one
    /// socket per arbiter to each address ([`crate::transport::bind_shared`], with
    /// SO_REUSEPORT) to spread the clients over the cores.
    pub listen: Vec<std::net::UdpSocket>,
    /// QUIC and TCP listen addresses, served with this TLS identity (none: UDP only).
    pub connections: Option<(Vec<ConnListen>, TlsIdentity)>,
    /// The tunnel device.
    pub device: Arc<dyn TunDevice>,
    /// Where events go.
    pub reporter: Reporter,
    /// Mailbox sizes.
    pub limits: NodeLimits,
    /// Arbiters (threads) for session actors; 0 runs them on the supervisor's own
    /// (which answers handshakes on a thread of its own in any case).
    pub arbiters: usize,
    /// The cluster the node is part of (none: a lone node, its table in memory).
    pub cluster: Option<ClusterSettings>,
    /// Announces the tunnel addresses of its sessions on the inside network.
    pub announcer: Option<Arc<dyn Announce>>,
}

/// A running gateway node.
pub struct GatewayNode {
    /// The supervisor (handshakes, session lifecycle, operator commands).
    pub supervisor: Addr<NodeSupervisor>,
    /// Session id / tunnel address → session actor.
    pub registry: Arc<Registry>,
    /// The transport actors, with their local addresses.
    pub transports: Vec<(SocketAddr, Addr<UdpTransport>)>,
    /// The TUN readers, one per device queue.
    pub tun: Vec<Addr<TunActor>>,
    /// The QUIC and TCP listeners, with every connection they accepted.
    pub connections: Option<ConnListeners>,
    /// The cluster, when the node is part of one.
    pub cluster: Option<ClusterLink>,
    arbiters: Vec<Arbiter>,
    handshakes: Arbiter,
    cluster_arbiter: Option<Arbiter>,
}

impl GatewayNode {
    /// Starts the node. Must run inside an actix system. Every fallible step (each
    /// socket's preparation) comes before any actor starts: a failure leaves nothing
    /// running.
    pub fn start(config: GatewayNodeConfig) -> std::io::Result<GatewayNode> {
        let registry = Arc::new(Registry::default());
        let cores = config.arbiters.max(1);
        let mut prepared = Vec::with_capacity(config.listen.len());
        for (i, socket) in config.listen.into_iter().enumerate() {
            let local = socket.local_addr()?;
            prepared.push((local, PreparedUdp::new(socket, i % cores)?));
        }
        let gate = HandshakeGate::new(&config.gateway.keypair.public());
        let load_threshold = config.limits.handshake_load_threshold;
        let arbiters: Vec<Arbiter> = (0..config.arbiters).map(|_| Arbiter::new()).collect();
        // Handshakes (their Diffie-Hellman) on a thread of their own, off the threads
        // that carry sessions' packets: a flood of them cannot starve forwarding.
        let handshakes = Arbiter::new();
        let device = config.device;
        let node_id = config.gateway.node_id.clone();
        let supervisor = {
            let responder = Responder::new(config.gateway, config.store);
            let registry = Arc::clone(&registry);
            let handles = arbiters.iter().map(Arbiter::handle).collect();
            let (limits, reporter, device) =
                (config.limits, config.reporter.clone(), Arc::clone(&device));
            let announcer = config.announcer.clone();
            NodeSupervisor::start_in_arbiter(&handshakes.handle(), move |_| {
                NodeSupervisor::new(responder, registry, handles, limits, reporter, device)
                    .with_announcer(announcer)
            })
        };
        // The cluster's actor on a thread of its own: the store's client and its
        // requests never share a thread with packets or handshakes.
        let (cluster, cluster_arbiter) = match config.cluster {
            Some(settings) => {
                let arbiter = Arbiter::new();
                let me = node_id;
                let view = Arc::new(std::sync::RwLock::new(
                    jvpn_core::cluster::ClusterView::new(me.clone(), settings.view_capacity),
                ));
                let key = Arc::clone(&settings.key);
                let node = {
                    let (view, supervisor, reporter) = (
                        Arc::clone(&view),
                        supervisor.clone(),
                        config.reporter.clone(),
                    );
                    ClusterNode::start_in_arbiter(&arbiter.handle(), move |_| {
                        ClusterNode::new(me, settings, view, supervisor, reporter)
                    })
                };
                let link = ClusterLink { node, key, view };
                // Before any handshake: the supervisor's first message.
                supervisor.do_send(JoinCluster(link.clone()));
                (Some(link), Some(arbiter))
            }
            None => (None, None),
        };
        let router = Arc::new(
            GatewayRouter::new(
                Arc::clone(&registry),
                supervisor.clone(),
                config.reporter,
                gate,
                load_threshold,
            )
            .with_cluster(cluster.clone()),
        );
        let transports = prepared
            .into_iter()
            .map(|(local, t)| {
                let deliver: Arc<dyn Deliver> = router.clone();
                let reader = match arbiters.get(t.handle().core()) {
                    Some(arbiter) => t.start_in(&arbiter.handle(), deliver),
                    None => t.start(deliver),
                };
                (local, reader)
            })
            .collect();
        let connections = match &config.connections {
            Some((listen, identity)) if !listen.is_empty() => {
                let deliver: Arc<dyn Deliver> = router.clone();
                Some(
                    ConnListeners::start(listen, identity, deliver, config.limits.max_connections)
                        .map_err(|e| std::io::Error::other(e.to_string()))?,
                )
            }
            _ => None,
        };
        // One reader per device queue, queue `i` on session arbiter `i`: a session's
        // replies come back on the queue its thread writes to (see `KernelTun`).
        let route: Arc<dyn TunRoute> = router;
        let tun = (0..device.queues())
            .map(|queue| {
                let reader = TunActor::for_queue(Arc::clone(&device), queue, Arc::clone(&route));
                match arbiters.get(queue) {
                    Some(arbiter) => reader.start_supervised_in(&arbiter.handle()),
                    None => reader.start_supervised(),
                }
            })
            .collect();
        Ok(GatewayNode {
            supervisor,
            registry,
            transports,
            tun,
            connections,
            cluster,
            arbiters,
            handshakes,
            cluster_arbiter,
        })
    }

    /// Stops the node: every session ends explicitly (operator_terminated, its client
    /// told, its record released) — or, on a cluster node, is handed off to the other
    /// nodes (its final record written, the node's lease given up) — waiting at most
    /// `grace` for their actors; then the transports and the TUN stop reading and the
    /// session arbiters stop. Returns how many sessions were still registered when the
    /// grace ran out (0 on a clean stop).
    pub async fn stop(self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        let left = match &self.cluster {
            None => {
                let _ = self.supervisor.send(StopSessions).await;
                while !self.registry.is_empty() && Instant::now() < deadline {
                    actix_rt::time::sleep(Duration::from_millis(10)).await;
                }
                self.registry.len()
            }
            // A cluster node hands its sessions off instead: each writes its final
            // record and stops; once they are written, the node gives its lease up and
            // the other nodes take them at their clients' next reattach.
            Some(link) => {
                let _ = self.supervisor.send(HandOffSessions).await;
                let _ = link.node.send(Depart).await;
                while Instant::now() < deadline {
                    match self.supervisor.send(HandingOff).await {
                        Ok(n) if n > 0 => actix_rt::time::sleep(Duration::from_millis(10)).await,
                        _ => break,
                    }
                }
                while Instant::now() < deadline {
                    match link.node.send(InFlight).await {
                        Ok(n) if n > 0 => actix_rt::time::sleep(Duration::from_millis(10)).await,
                        _ => break,
                    }
                }
                let _ = link.node.send(GiveUpLease).await;
                self.registry.len()
            }
        };
        // Unbounded sends on purpose: one lifecycle message per actor.
        for (_, transport) in &self.transports {
            transport.do_send(Close);
        }
        if let Some(c) = &self.connections {
            c.stop();
        }
        for reader in &self.tun {
            reader.do_send(Close);
        }
        self.supervisor.do_send(StopSupervisor);
        for a in self.arbiters {
            a.stop();
        }
        self.handshakes.stop();
        if let Some(a) = self.cluster_arbiter {
            a.stop();
        }
        left
    }
}
