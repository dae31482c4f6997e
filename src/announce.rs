//! Making a tunnel address reachable on the network behind a gateway node, as VRRP does
//! for its virtual address (spec/cluster.md): the node that owns a session answers ARP
//! for the session's IPv4 tunnel address on the inside interface (a proxy entry), and
//! when it takes the address over from another node it says so at once with a
//! gratuitous ARP, so that the hosts there send to it from the next packet on instead of
//! after their neighbour entry goes stale. The node that lets the session go withdraws
//! its proxy entry.

use std::net::{IpAddr, Ipv4Addr};

use jvpn_core::wire::TunnelAddrs;

use crate::netlink::{self, NetlinkError};

/// EtherType of ARP.
const ETH_P_ARP: u16 = 0x0806;
/// The Ethernet broadcast address.
const BROADCAST: [u8; 6] = [0xff; 6];

/// A gratuitous ARP request for `ip` from `mac`: an Ethernet broadcast whose sender and
/// target are both `ip` (RFC 5227 "ARP announcement"), 42 bytes.
pub fn arp_announcement(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 42] {
    let mut frame = [0u8; 42];
    frame[..6].copy_from_slice(&BROADCAST);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet, IPv4, 6- and 4-byte addresses, a request.
    frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&mac);
    frame[28..32].copy_from_slice(&ip.octets());
    // Target hardware address: zero; target protocol address: `ip` again.
    frame[38..42].copy_from_slice(&ip.octets());
    frame
}

/// Answers ARP for `ip` on `dev` from now on and announces it there at once.
pub async fn announce(dev: &str, ip: Ipv4Addr) -> Result<(), NetlinkError> {
    let (d, addr) = (dev.to_string(), ip.into());
    let (index, mac) = netlink::call(move |h| async move {
        netlink::add_proxy_neighbour(&h, &d, addr).await?;
        let index = netlink::link_index(&h, &d, "link show").await?;
        Ok((index, netlink::link_mac(&h, &d).await?))
    })
    .await?;
    jvpn_actors::send_frame(index, ETH_P_ARP, BROADCAST, &arp_announcement(mac, ip)).map_err(
        |source| NetlinkError::Kernel {
            op: format!("gratuitous ARP for {ip} on {dev}"),
            source,
        },
    )
}

/// Stops answering ARP for `ip` on `dev`. An entry already gone is no error.
pub async fn withdraw(dev: &str, ip: Ipv4Addr) -> Result<(), NetlinkError> {
    let d = dev.to_string();
    match netlink::call(
        move |h| async move { netlink::del_proxy_neighbour(&h, &d, ip.into()).await },
    )
    .await
    {
        Err(e) if e.is_gone() => Ok(()),
        other => other,
    }
}

/// Announces and withdraws tunnel addresses on one interface for the gateway's
/// sessions, in the order asked, on a thread of its own: the supervisor that asks never
/// waits for the kernel. At most [`ANNOUNCEMENTS_QUEUED`] wait; past that a request is
/// counted (`announce_queue_full`) and dropped. IPv4 only: IPv6 tunnel addresses would
/// need proxy NDP, which is not built.
pub struct NeighbourAnnouncer {
    queue: std::sync::mpsc::SyncSender<(bool, Ipv4Addr)>,
}

/// Requests waiting for the announcer's thread, at most.
pub const ANNOUNCEMENTS_QUEUED: usize = 4_096;

impl NeighbourAnnouncer {
    /// An announcer on `dev`.
    pub fn start(dev: String) -> std::io::Result<NeighbourAnnouncer> {
        let (queue, requests) = std::sync::mpsc::sync_channel(ANNOUNCEMENTS_QUEUED);
        std::thread::Builder::new()
            .name("jvpn-announce".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    eprintln!("jvpn gateway: the announcer has no runtime: addresses are not announced on {dev}");
                    return;
                };
                for (up, ip) in requests {
                    let done = if up {
                        runtime.block_on(announce(&dev, ip))
                    } else {
                        runtime.block_on(withdraw(&dev, ip))
                    };
                    if let Err(e) = done {
                        eprintln!("jvpn gateway: {e}");
                    }
                }
            })?;
        Ok(NeighbourAnnouncer { queue })
    }

    fn ask(&self, up: bool, tunnel: TunnelAddrs) {
        for net in tunnel.iter() {
            if let IpAddr::V4(ip) = net.addr {
                if self.queue.try_send((up, ip)).is_err() {
                    jvpn_actors::telemetry::dropped("announce_queue_full");
                }
            }
        }
    }
}

impl jvpn_actors::supervisor::Announce for NeighbourAnnouncer {
    fn announce(&self, tunnel: TunnelAddrs) {
        self.ask(true, tunnel);
    }

    fn withdraw(&self, tunnel: TunnelAddrs) {
        self.ask(false, tunnel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_is_a_broadcast_request_for_the_address_itself() {
        let mac = [2, 0, 0, 0, 0, 7];
        let f = arp_announcement(mac, Ipv4Addr::new(10, 77, 0, 2));
        assert_eq!(&f[..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[20..22], &[0, 1], "a request");
        assert_eq!(&f[22..28], &mac, "sender hardware address");
        assert_eq!(&f[28..32], &[10, 77, 0, 2], "sender protocol address");
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 77, 0, 2], "target: the same address");
    }
}
