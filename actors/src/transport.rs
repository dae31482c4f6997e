//! Transport actors: one per socket or connection. They move datagrams between the wire
//! and whoever routes them ([`Deliver`]), and report what the socket tells them about the
//! path (send errors, ICMP unreachable) as [`Signal`]s. They never decide policy.
//!
//! A session sees a transport only as a [`TransportHandle`] (its protocol and a mailbox
//! taking [`Transmit`]), so QUIC or TCP transports fit in beside UDP by handling the same
//! message; nothing in a session actor names a socket type.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use jvpn_core::ids::Protocol;
use tokio::net::UdpSocket;

use crate::runtime::{offer_to, ActorKind, Close, Crash, Handling};
use crate::telemetry::{self, Direction};

/// The most datagrams one wakeup reads before handing them on: one mailbox message
/// carries them all, and the bound keeps one busy socket from starving the others.
pub const READ_BATCH: usize = 64;

/// Mailbox capacity of a transport actor: a gateway socket carries every session's
/// bursts (each up to a read batch of sealed packets), so it holds many batches.
pub const TRANSPORT_MAILBOX: usize = 16 * READ_BATCH;

/// The largest datagram read (anything longer is truncated by the kernel and then
/// refused as malformed).
pub const MAX_DATAGRAM: usize = 65_535;

/// A datagram for a transport to send.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Transmit {
    /// The peer (ignored by a connected transport, which has exactly one).
    pub to: SocketAddr,
    /// The datagram.
    pub bytes: Bytes,
}

/// A transport as a session sees it.
#[derive(Clone)]
pub struct TransportHandle {
    protocol: Protocol,
    local: SocketAddr,
    tx: Recipient<Transmit>,
}

impl std::fmt::Debug for TransportHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.protocol.as_str(), self.local)
    }
}

impl TransportHandle {
    /// A handle on a transport actor of `protocol`, bound at `local`.
    pub fn new(protocol: Protocol, local: SocketAddr, tx: Recipient<Transmit>) -> Self {
        TransportHandle {
            protocol,
            local,
            tx,
        }
    }

    /// The transport's protocol.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The local address it is bound to.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// Hands `bytes` to the transport for `to` without waiting; returns whether its
    /// mailbox took them (a refusal is counted, as a mailbox refusal and as a dropped
    /// packet, `transport_busy`).
    pub fn send(&self, to: SocketAddr, bytes: Bytes) -> bool {
        let taken = offer_to(&self.tx, ActorKind::Transport, Transmit { to, bytes });
        if !taken {
            telemetry::dropped("transport_busy");
        }
        taken
    }
}

/// What a transport learned about its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A send failed (no route, interface down, refused by a firewall rule).
    SendFailed(io::ErrorKind),
    /// The peer's host or port is unreachable (ICMP, reported by a connected socket).
    Unreachable,
    /// Sending works again after a failure.
    Recovered,
}

/// Where a transport hands what it reads. Implementations route and never block.
pub trait Deliver: Send + Sync + 'static {
    /// Datagrams read in one wakeup, in arrival order, with their senders.
    fn datagrams(&self, via: &TransportHandle, batch: Vec<(SocketAddr, Bytes)>);
    /// A change in what the socket says about the path.
    fn signal(&self, via: &TransportHandle, signal: Signal);
}

/// One UDP socket. On the gateway it is bound to a listen address and talks to every
/// client; on a client it is connected to one gateway address (one candidate), so that
/// ICMP errors for that path reach it.
pub struct UdpTransport {
    /// Reads, through the runtime's reactor.
    socket: Arc<UdpSocket>,
    /// Writes: the same socket, written directly. A send on a non-blocking UDP socket
    /// completes or fails at once, so it needs no readiness tracking (which, before the
    /// reactor first reports the socket writable, would refuse it).
    sender: std::net::UdpSocket,
    connected: bool,
    handle: Option<TransportHandle>,
    deliver: Arc<dyn Deliver>,
    failing: bool,
    reading: Option<SpawnHandle>,
    closed: bool,
}

impl UdpTransport {
    /// A transport over `socket` (already bound, and connected when `connected`),
    /// handing what it reads to `deliver`. Must be called inside the runtime.
    pub fn new(
        socket: std::net::UdpSocket,
        connected: bool,
        deliver: Arc<dyn Deliver>,
    ) -> io::Result<Self> {
        socket.set_nonblocking(true)?;
        let sender = socket.try_clone()?;
        Ok(UdpTransport {
            socket: Arc::new(UdpSocket::from_std(socket)?),
            sender,
            connected,
            handle: None,
            deliver,
            failing: false,
            reading: None,
            closed: false,
        })
    }

    /// Starts the actor, supervised (restarted on the same socket if it stops), with a
    /// mailbox of [`TRANSPORT_MAILBOX`] from its first message on.
    pub fn start_supervised(self) -> Addr<Self> {
        actix::Supervisor::start(move |ctx: &mut Context<Self>| {
            ctx.set_mailbox_capacity(TRANSPORT_MAILBOX);
            self
        })
    }

    fn handle(&mut self, ctx: &mut Context<Self>) -> TransportHandle {
        self.handle
            .get_or_insert_with(|| {
                let local = self
                    .socket
                    .local_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                TransportHandle::new(Protocol::Udp, local, ctx.address().recipient())
            })
            .clone()
    }

    fn report(&mut self, signal: Signal, ctx: &mut Context<Self>) {
        if self.closed {
            return;
        }
        let handle = self.handle(ctx);
        self.deliver.signal(&handle, signal);
    }
}

/// What one wakeup read: datagrams, and the error that ended the batch, if any.
struct Read {
    batch: Vec<(SocketAddr, Bytes)>,
    error: Option<io::Error>,
}

async fn read_batch(socket: &UdpSocket, buf: &mut [u8]) -> Read {
    let mut batch = Vec::new();
    let mut error = None;
    match socket.recv_from(buf).await {
        Ok((n, from)) => batch.push((from, Bytes::copy_from_slice(&buf[..n]))),
        Err(e) => error = Some(e),
    }
    while error.is_none() && batch.len() < READ_BATCH {
        match socket.try_recv_from(buf) {
            Ok((n, from)) => batch.push((from, Bytes::copy_from_slice(&buf[..n]))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => error = Some(e),
        }
    }
    Read { batch, error }
}

impl Actor for UdpTransport {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.closed {
            return;
        }
        self.handle(ctx);
        let socket = Arc::clone(&self.socket);
        let reads = futures_util::stream::unfold(
            (socket, vec![0u8; MAX_DATAGRAM]),
            |(socket, mut buf)| async move {
                let read = read_batch(&socket, &mut buf).await;
                Some((read, (socket, buf)))
            },
        );
        self.reading = Some(ctx.add_stream(reads));
    }
}

impl Supervised for UdpTransport {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        telemetry::restarted(ActorKind::Transport);
    }
}

impl StreamHandler<Read> for UdpTransport {
    fn handle(&mut self, read: Read, ctx: &mut Context<Self>) {
        let handle = self.handle(ctx);
        if !read.batch.is_empty() {
            if std::mem::take(&mut self.failing) {
                self.deliver.signal(&handle, Signal::Recovered);
            }
            for (_, bytes) in &read.batch {
                telemetry::packet(Direction::Rx, Protocol::Udp, bytes.len());
            }
            self.deliver.datagrams(&handle, read.batch);
        }
        if let Some(e) = read.error {
            // A connected socket reports an earlier ICMP port/host unreachable as a
            // receive error; anything else is transient on UDP and only counted.
            match e.kind() {
                io::ErrorKind::ConnectionRefused | io::ErrorKind::HostUnreachable => {
                    // Once per change of state: repeated ICMP errors add no messages.
                    if !self.failing {
                        self.failing = true;
                        self.deliver.signal(&handle, Signal::Unreachable);
                    }
                }
                _ => telemetry::dropped("receive_error"),
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        // The read stream never ends by itself; nothing to do if it did (the actor
        // stays up for sends).
    }
}

impl Handler<Close> for UdpTransport {
    type Result = ();

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        self.closed = true;
        if let Some(reading) = self.reading.take() {
            ctx.cancel_future(reading);
        }
        // Its own handle held its address: without it the actor ends with its last user.
        self.handle = None;
    }
}

impl Handler<Transmit> for UdpTransport {
    type Result = ();

    fn handle(&mut self, msg: Transmit, ctx: &mut Context<Self>) {
        let _measure = Handling::start(ActorKind::Transport);
        let sent = if self.connected {
            self.sender.send(&msg.bytes)
        } else {
            self.sender.send_to(&msg.bytes, msg.to)
        };
        match sent {
            Ok(_) => {
                telemetry::packet(Direction::Tx, Protocol::Udp, msg.bytes.len());
                if std::mem::take(&mut self.failing) {
                    self.report(Signal::Recovered, ctx);
                }
            }
            // The socket's buffer is full: drop, as a congested link would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => telemetry::dropped("send_busy"),
            Err(e) => {
                telemetry::dropped("send_failed");
                if !self.failing {
                    self.failing = true;
                    self.report(Signal::SendFailed(e.kind()), ctx);
                }
            }
        }
    }
}

impl Handler<Crash> for UdpTransport {
    type Result = ();

    fn handle(&mut self, _: Crash, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    struct Nowhere;

    impl Deliver for Nowhere {
        fn datagrams(&self, _: &TransportHandle, _: Vec<(SocketAddr, Bytes)>) {}
        fn signal(&self, _: &TransportHandle, _: Signal) {}
    }

    /// A session hands a transport up to a read batch of packets in one go: the mailbox
    /// takes them all, and all of them are sent.
    #[actix_rt::test]
    async fn a_transport_takes_a_whole_read_batch_at_once() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        let local = socket.local_addr().expect("addr");
        let peer = UdpSocket::bind("127.0.0.1:0").await.expect("peer");
        let to = peer.local_addr().expect("addr");
        let transport = UdpTransport::new(socket, false, Arc::new(Nowhere))
            .expect("transport")
            .start_supervised();
        let handle = TransportHandle::new(Protocol::Udp, local, transport.recipient());
        let taken = (0..READ_BATCH)
            .filter(|i| handle.send(to, Bytes::from(vec![*i as u8; 32])))
            .count();
        assert_eq!(taken, READ_BATCH);
        let mut buf = [0u8; 64];
        for i in 0..READ_BATCH {
            let (n, from) = tokio::time::timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
                .await
                .expect("datagram in time")
                .expect("datagram");
            assert_eq!((n, from, buf[0]), (32, local, i as u8));
        }
    }
}
