//! The kernel's network configuration over netlink (rtnetlink): links, addresses,
//! routes, policy rules and network namespaces, without iproute2.
//!
//! Every request runs on a thread of its own, with its own netlink socket and a small
//! runtime, so that a slow or stuck kernel answer never holds the thread that carries
//! packets; that thread can also enter another network namespace (the demo's lab)
//! without moving the rest of the process. Async callers await the answer, the
//! command-line tools block on it.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use futures_util::StreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::NeighbourFlags;
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};
use thiserror::Error;

/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

/// A netlink request that failed.
#[derive(Debug, Error)]
pub enum NetlinkError {
    /// The kernel refused the request.
    #[error("{op}: {source}")]
    Kernel {
        /// What was asked, in iproute2's words (e.g. `route add 10.0.0.0/24 dev jvpn0`).
        op: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// No link of that name exists.
    #[error("{op}: no network interface named {name:?}")]
    NoLink {
        /// What was asked.
        op: String,
        /// The missing interface.
        name: String,
    },
    /// The request could not be made at all.
    #[error("{op}: {detail}")]
    Failed {
        /// What was asked.
        op: String,
        /// Why.
        detail: String,
    },
}

impl NetlinkError {
    /// Whether the thing to remove was already gone (its device removed, or never
    /// there): an undo that finds nothing to undo.
    pub fn is_gone(&self) -> bool {
        match self {
            NetlinkError::NoLink { .. } => true,
            NetlinkError::Kernel { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc_errno::ENOENT | libc_errno::ESRCH | libc_errno::ENODEV)
            ),
            NetlinkError::Failed { .. } => false,
        }
    }

    /// Whether the kernel said the thing already exists.
    pub fn is_exists(&self) -> bool {
        matches!(self, NetlinkError::Kernel { source, .. }
            if source.raw_os_error() == Some(libc_errno::EEXIST))
    }
}

/// The error numbers this module tells apart (Linux's values).
mod libc_errno {
    pub const ENOENT: i32 = 2;
    pub const ESRCH: i32 = 3;
    pub const EEXIST: i32 = 17;
    pub const ENODEV: i32 = 19;
}

/// Maps an rtnetlink error of the request `op` (in iproute2's words) to a typed one:
/// the kernel's answer as an OS error when it gave one.
pub fn kernel(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |e| match e {
        rtnetlink::Error::NetlinkError(m) => NetlinkError::Kernel {
            op: op.into(),
            source: m.to_io(),
        },
        other => NetlinkError::Failed {
            op: op.into(),
            detail: other.to_string(),
        },
    }
}

/// Where a route sends its packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteVia {
    /// Into a device.
    Device(String),
    /// Through a next hop.
    Gateway(IpAddr),
    /// Nowhere: senders get "network unreachable" at once.
    Unreachable,
    /// Nowhere, silently: the packets are thrown away.
    Blackhole,
}

/// A route, as `ip route` would show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The destination network.
    pub dst: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// Where it goes.
    pub via: RouteVia,
    /// The routing table.
    pub table: u32,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.via {
            RouteVia::Unreachable => write!(f, "unreachable {}/{}", self.dst, self.prefix)?,
            RouteVia::Blackhole => write!(f, "blackhole {}/{}", self.dst, self.prefix)?,
            RouteVia::Device(dev) => write!(f, "{}/{} dev {dev}", self.dst, self.prefix)?,
            RouteVia::Gateway(gw) => write!(f, "{}/{} via {gw}", self.dst, self.prefix)?,
        }
        if self.table != MAIN_TABLE {
            write!(f, " table {}", self.table)?;
        }
        Ok(())
    }
}

/// A policy routing rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Packets without the mark `mark` use table `table` (`ip rule add not fwmark M
    /// table T`).
    UnmarkedTo {
        /// IPv6 or IPv4.
        v6: bool,
        /// The mark that exempts a packet.
        mark: u32,
        /// The table the others use.
        table: u32,
    },
    /// The main table, ignoring its default routes (`ip rule add table main
    /// suppress_prefixlength 0`): local networks stay reachable in a full tunnel.
    MainWithoutDefault {
        /// IPv6 or IPv4.
        v6: bool,
    },
}

impl Rule {
    /// The request in iproute2's words, `verb` being "add" or "del".
    fn op(&self, verb: &str) -> String {
        let (v6, selector) = match self {
            Rule::UnmarkedTo { v6, mark, table } => {
                (*v6, format!("not fwmark {mark:#x} table {table}"))
            }
            Rule::MainWithoutDefault { v6 } => {
                (*v6, "table main suppress_prefixlength 0".to_string())
            }
        };
        format!("{}rule {verb} {selector}", if v6 { "-6 " } else { "" })
    }
}

/// Runs `work` with a netlink handle on a thread of its own, in the network namespace
/// `netns` (a name under /run/netns) or this process's, and blocks until it is done.
pub fn blocking<T, F, Fut>(netns: Option<&str>, work: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    on_worker(netns, work, move |r| {
        let _ = tx.send(r);
    })?;
    rx.recv().unwrap_or_else(|_| {
        Err(NetlinkError::Failed {
            op: "netlink".into(),
            detail: "the netlink worker ended without an answer".into(),
        })
    })
}

/// Runs `work` as [`blocking`] does, without blocking the caller's thread.
pub async fn call<T, F, Fut>(work: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    on_worker(None, work, move |r| {
        let _ = tx.send(r);
    })?;
    rx.await.unwrap_or_else(|_| {
        Err(NetlinkError::Failed {
            op: "netlink".into(),
            detail: "the netlink worker ended without an answer".into(),
        })
    })
}

fn on_worker<T, F, Fut>(
    netns: Option<&str>,
    work: F,
    deliver: impl FnOnce(Result<T, NetlinkError>) + Send + 'static,
) -> Result<(), NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let netns = netns.map(str::to_string);
    std::thread::Builder::new()
        .name("jvpn-netlink".into())
        .spawn(move || deliver(work_in(netns.as_deref(), work)))
        .map(drop)
        .map_err(|e| NetlinkError::Failed {
            op: "netlink".into(),
            detail: format!("cannot start the netlink thread: {e}"),
        })
}

fn work_in<T, F, Fut>(netns: Option<&str>, work: F) -> Result<T, NetlinkError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, NetlinkError>>,
{
    let failed = |op: &str, detail: String| NetlinkError::Failed {
        op: op.to_string(),
        detail,
    };
    if let Some(name) = netns {
        enter_netns(name)?;
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| failed("netlink", format!("cannot start its runtime: {e}")))?;
    runtime.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection()
            .map_err(|e| failed("netlink", format!("cannot open a netlink socket: {e}")))?;
        tokio::spawn(connection);
        work(handle).await
    })
}

/// Runs `work` on a thread of its own that entered the network namespace `name` first:
/// a socket it opens, or a process it starts, is in that namespace. The caller's thread
/// stays where it is.
pub fn in_netns_thread<T: Send>(
    name: &str,
    work: impl FnOnce() -> std::io::Result<T> + Send,
) -> Result<T, NetlinkError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(name)?;
                work().map_err(|source| NetlinkError::Kernel {
                    op: format!("in netns {name}"),
                    source,
                })
            })
            .join()
            .unwrap_or_else(|_| {
                Err(NetlinkError::Failed {
                    op: format!("in netns {name}"),
                    detail: "the thread failed".into(),
                })
            })
    })
}

/// Moves the calling thread into the network namespace `name` (under /run/netns, as
/// `ip netns` names them). Only this thread moves; the process stays where it is.
pub fn enter_netns(name: &str) -> Result<(), NetlinkError> {
    let path = std::path::Path::new(rtnetlink::NETNS_PATH).join(name);
    let op = format!("netns enter {name}");
    let file = std::fs::File::open(&path).map_err(|source| NetlinkError::Kernel {
        op: op.clone(),
        source,
    })?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
        NetlinkError::Kernel {
            op,
            source: e.into(),
        }
    })
}

/// Creates the named network namespace, as `ip netns add` does: a thread of its own
/// moves into a new namespace, which is then bind-mounted on /run/netns/NAME so that it
/// lives on without any process in it (no fork of this multi-threaded process).
pub fn add_netns(name: &str) -> Result<(), NetlinkError> {
    use nix::mount::{mount, MsFlags};
    let op = format!("netns add {name}");
    let err = |source: std::io::Error| NetlinkError::Kernel {
        op: op.clone(),
        source,
    };
    let dir = std::path::Path::new(rtnetlink::NETNS_PATH);
    std::fs::create_dir_all(dir).map_err(err)?;
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(err)?;
    let made = std::thread::scope(|scope| {
        scope
            .spawn(|| -> nix::Result<()> {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
            })
            .join()
            .unwrap_or(Err(nix::errno::Errno::EIO))
    });
    made.map_err(|e| {
        let _ = std::fs::remove_file(&path);
        err(e.into())
    })
}

/// Removes the named network namespace (as `ip netns del`); its links go with it once
/// no process is left in it. A namespace that is not there is `is_gone`.
pub fn del_netns(name: &str) -> Result<(), NetlinkError> {
    use nix::mount::{umount2, MntFlags};
    let op = format!("netns del {name}");
    let path = std::path::Path::new(rtnetlink::NETNS_PATH).join(name);
    let unmounted = umount2(&path, MntFlags::MNT_DETACH);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) => Err(NetlinkError::Kernel {
            op,
            source: match unmounted {
                Err(u) if e.kind() != std::io::ErrorKind::NotFound => u.into(),
                _ => e,
            },
        }),
    }
}

/// The index of the link `name`.
pub async fn link_index(h: &Handle, name: &str, op: &str) -> Result<u32, NetlinkError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.next().await {
        Some(Ok(link)) => Ok(link.header.index),
        Some(Err(rtnetlink::Error::NetlinkError(m)))
            if m.to_io().raw_os_error() == Some(libc_errno::ENODEV) =>
        {
            Err(NetlinkError::NoLink {
                op: op.to_string(),
                name: name.to_string(),
            })
        }
        Some(Err(e)) => Err(kernel(op)(e)),
        None => Err(NetlinkError::NoLink {
            op: op.to_string(),
            name: name.to_string(),
        }),
    }
}

/// The hardware (MAC) address of the link `name`.
pub async fn link_mac(h: &Handle, name: &str) -> Result<[u8; 6], NetlinkError> {
    let op = format!("link show {name}");
    let mut links = h.link().get().match_name(name.to_string()).execute();
    let link = match links.next().await {
        Some(Ok(link)) => link,
        Some(Err(e)) => return Err(kernel(op)(e)),
        None => {
            return Err(NetlinkError::NoLink {
                op,
                name: name.to_string(),
            })
        }
    };
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
            _ => None,
        })
        .ok_or(NetlinkError::Failed {
            op,
            detail: "the link has no Ethernet address".into(),
        })
}

/// Answers ARP for `addr` on the link `dev` as if it were this host's (a proxy entry,
/// as `ip neigh add proxy ADDR dev DEV`); the link must forward.
pub async fn add_proxy_neighbour(h: &Handle, dev: &str, addr: IpAddr) -> Result<(), NetlinkError> {
    let op = format!("neigh add proxy {addr} dev {dev}");
    let index = link_index(h, dev, &op).await?;
    h.neighbours()
        .add(index, addr)
        .flags(NeighbourFlags::Proxy)
        .replace()
        .execute()
        .await
        .map_err(kernel(op))
}

/// Removes the proxy entry of `addr` on `dev`.
pub async fn del_proxy_neighbour(h: &Handle, dev: &str, addr: IpAddr) -> Result<(), NetlinkError> {
    let op = format!("neigh del proxy {addr} dev {dev}");
    let index = link_index(h, dev, &op).await?;
    let mut request = h.neighbours().add(index, addr).flags(NeighbourFlags::Proxy);
    let message = request.message_mut().clone();
    h.neighbours()
        .del(message)
        .execute()
        .await
        .map_err(kernel(op))
}

/// Sets the link `name` up or down.
pub async fn set_link(h: &Handle, name: &str, up: bool) -> Result<(), NetlinkError> {
    let op = format!("link set {name} {}", if up { "up" } else { "down" });
    let index = link_index(h, name, &op).await?;
    let message = LinkUnspec::new_with_index(index);
    let message = if up { message.up() } else { message.down() };
    h.link()
        .set(message.build())
        .execute()
        .await
        .map_err(kernel(op))
}

/// Creates the veth pair `name`–`peer` here and moves `peer` into the namespace
/// `peer_netns`.
pub async fn add_veth(
    h: &Handle,
    name: &str,
    peer: &str,
    peer_netns: &str,
) -> Result<(), NetlinkError> {
    let op = format!("link add {name} type veth peer name {peer} netns {peer_netns}");
    h.link()
        .add(LinkVeth::new(name, peer).build())
        .execute()
        .await
        .map_err(kernel(op.clone()))?;
    let path = std::path::Path::new(rtnetlink::NETNS_PATH).join(peer_netns);
    let ns = std::fs::File::open(&path).map_err(|source| NetlinkError::Kernel {
        op: op.clone(),
        source,
    })?;
    let index = link_index(h, peer, &op).await?;
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(ns.as_raw_fd())
                .build(),
        )
        .execute()
        .await
        .map_err(kernel(op))
}

/// Adds `addr/prefix` to the link `dev`; an IPv6 address skips duplicate detection
/// (usable at once, as `nodad`).
pub async fn add_address(
    h: &Handle,
    dev: &str,
    addr: IpAddr,
    prefix: u8,
) -> Result<(), NetlinkError> {
    let op = format!("addr add {addr}/{prefix} dev {dev}");
    let index = link_index(h, dev, &op).await?;
    let mut request = h.address().add(index, addr, prefix);
    if addr.is_ipv6() {
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    request.execute().await.map_err(kernel(op))
}

async fn route_message(
    h: &Handle,
    route: &Route,
    op: &str,
) -> Result<rtnetlink::packet_route::route::RouteMessage, NetlinkError> {
    let builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.dst, route.prefix)
        .map_err(|e| NetlinkError::Failed {
            op: op.to_string(),
            detail: e.to_string(),
        })?
        .table_id(route.table);
    let builder = match &route.via {
        RouteVia::Device(dev) => builder
            .output_interface(link_index(h, dev, op).await?)
            .scope(RouteScope::Link),
        RouteVia::Gateway(gw) => builder.gateway(*gw).map_err(|e| NetlinkError::Failed {
            op: op.to_string(),
            detail: e.to_string(),
        })?,
        RouteVia::Unreachable => builder.kind(RouteType::Unreachable),
        RouteVia::Blackhole => builder.kind(RouteType::BlackHole),
    };
    Ok(builder.build())
}

/// Adds `route`; an existing route to the same destination is left alone and the error
/// says so (never replaced, and then removed by an undo).
pub async fn add_route(h: &Handle, route: &Route) -> Result<(), NetlinkError> {
    let op = format!("route add {route}");
    let message = route_message(h, route, &op).await?;
    h.route().add(message).execute().await.map_err(kernel(op))
}

/// Removes `route`.
pub async fn del_route(h: &Handle, route: &Route) -> Result<(), NetlinkError> {
    let op = format!("route del {route}");
    let message = route_message(h, route, &op).await?;
    h.route().del(message).execute().await.map_err(kernel(op))
}

fn rule_message(rule: Rule) -> RuleMessage {
    let v6 = match rule {
        Rule::UnmarkedTo { v6, .. } | Rule::MainWithoutDefault { v6 } => v6,
    };
    let mut message = RuleMessage::default();
    message.header.family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    message.header.action = RuleAction::ToTable;
    match rule {
        Rule::UnmarkedTo { mark, table, .. } => {
            message.header.flags |= RuleFlags::Invert;
            message.attributes.push(RuleAttribute::FwMark(mark));
            if let Ok(small) = u8::try_from(table) {
                message.header.table = small;
            }
            message.attributes.push(RuleAttribute::Table(table));
        }
        Rule::MainWithoutDefault { .. } => {
            message.attributes.push(RuleAttribute::Table(MAIN_TABLE));
            message.attributes.push(RuleAttribute::SuppressPrefixLen(0));
        }
    }
    message
}

/// Adds `rule`.
pub async fn add_rule(h: &Handle, rule: Rule) -> Result<(), NetlinkError> {
    let message = rule_message(rule);
    let mut request = h.rule().add();
    *request.message_mut() = message;
    request.execute().await.map_err(kernel(rule.op("add")))
}

/// Removes `rule`.
pub async fn del_rule(h: &Handle, rule: Rule) -> Result<(), NetlinkError> {
    h.rule()
        .del(rule_message(rule))
        .execute()
        .await
        .map_err(kernel(rule.op("del")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_rules_read_as_iproute2_would_print_them() {
        let r = Route {
            dst: "10.202.0.0".parse().expect("v4"),
            prefix: 24,
            via: RouteVia::Device("jvpn0".into()),
            table: MAIN_TABLE,
        };
        assert_eq!(r.to_string(), "10.202.0.0/24 dev jvpn0");
        let u = Route {
            dst: "::".parse().expect("v6"),
            prefix: 0,
            via: RouteVia::Unreachable,
            table: 51820,
        };
        assert_eq!(u.to_string(), "unreachable ::/0 table 51820");
        assert_eq!(
            Rule::UnmarkedTo {
                v6: true,
                mark: 51820,
                table: 51820
            }
            .op("add"),
            "-6 rule add not fwmark 0xca6c table 51820"
        );
    }
}
