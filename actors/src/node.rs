//! Assembling a gateway node: the supervisor, the per-core arbiters its sessions run on,
//! one supervised transport actor per listen socket, and the TUN actor.

use std::net::SocketAddr;
use std::sync::Arc;

use actix::prelude::*;
use jvpn_core::gateway::{GatewayConfig, Responder};
use jvpn_core::store::SessionStore;

use crate::runtime::Reporter;
use crate::supervisor::{GatewayRouter, NodeLimits, NodeSupervisor, Registry};
use crate::transport::{Deliver, UdpTransport};
use crate::tun::{TunActor, TunDevice, TunRoute};

/// What a gateway node is made of.
pub struct GatewayNodeConfig {
    /// Keys, node id, policy, authorized clients.
    pub gateway: GatewayConfig,
    /// The session table.
    pub store: Arc<dyn SessionStore>,
    /// Bound UDP sockets to listen on.
    pub listen: Vec<std::net::UdpSocket>,
    /// The tunnel device.
    pub device: Arc<dyn TunDevice>,
    /// Where events go.
    pub reporter: Reporter,
    /// Mailbox sizes.
    pub limits: NodeLimits,
    /// Arbiters (threads) for session actors; 0 runs them on the calling arbiter.
    pub arbiters: usize,
}

/// A running gateway node.
pub struct GatewayNode {
    /// The supervisor (handshakes, session lifecycle, operator commands).
    pub supervisor: Addr<NodeSupervisor>,
    /// Session id / tunnel address → session actor.
    pub registry: Arc<Registry>,
    /// The transport actors, with their local addresses.
    pub transports: Vec<(SocketAddr, Addr<UdpTransport>)>,
    /// The TUN actor.
    pub tun: Addr<TunActor>,
    arbiters: Vec<Arbiter>,
}

impl GatewayNode {
    /// Starts the node. Must run inside an actix system.
    pub fn start(config: GatewayNodeConfig) -> std::io::Result<GatewayNode> {
        let arbiters: Vec<Arbiter> = (0..config.arbiters).map(|_| Arbiter::new()).collect();
        let handles = arbiters.iter().map(Arbiter::handle).collect();
        let registry = Arc::new(Registry::default());
        let sockets = config.listen;
        let responder = Responder::new(config.gateway, config.store);
        let mut transports = Vec::new();
        let mut tun = None;
        let reporter = config.reporter;
        let device = config.device;
        let limits = config.limits;
        let reg = Arc::clone(&registry);
        let mut failed = None;
        let supervisor = NodeSupervisor::create(|ctx| {
            let router = Arc::new(GatewayRouter::new(
                Arc::clone(&reg),
                ctx.address(),
                reporter.clone(),
            ));
            for socket in sockets {
                let deliver: Arc<dyn Deliver> = router.clone();
                let made = socket
                    .local_addr()
                    .and_then(|local| Ok((local, UdpTransport::new(socket, false, deliver)?)));
                match made {
                    Ok((local, transport)) => {
                        transports.push((local, actix::Supervisor::start(move |_| transport)));
                    }
                    Err(e) => failed = Some(e),
                }
            }
            let route: Arc<dyn TunRoute> = router;
            let tun_addr = actix::Supervisor::start(move |_| TunActor::new(device, route));
            let tun_recipient = tun_addr.clone().recipient();
            tun = Some(tun_addr);
            NodeSupervisor::new(responder, reg, handles, limits, reporter, tun_recipient)
        });
        if let Some(e) = failed {
            return Err(e);
        }
        let tun = tun.ok_or_else(|| std::io::Error::other("the TUN actor did not start"))?;
        Ok(GatewayNode {
            supervisor,
            registry,
            transports,
            tun,
            arbiters,
        })
    }

    /// Stops the session arbiters (their sessions end with them).
    pub fn stop(self) {
        for a in self.arbiters {
            a.stop();
        }
    }
}
