//! Connection transports: QUIC (the session's packets as QUIC datagrams, RFC 9221) and
//! TCP wrapped in TLS 1.3 (each packet a frame: a 2-byte length, then the packet), for
//! networks that block UDP or let only HTTPS through. The session's packets travel
//! unchanged; what keeps the session is still its own reattach, never the connection
//! (QUIC's own migration included).
//!
//! A connection has one peer, so a [`TransportHandle`] of a connection writes to that
//! peer whatever address it is given. Writes never wait: a QUIC datagram that does not
//! fit the connection's buffer is dropped by QUIC, a TCP frame that does not fit the
//! connection's bounded queue is dropped and counted (`send_busy`), so that a peer that
//! stops reading cannot grow memory.
//!
//! The client keeps one connection per candidate established, reconnecting with a
//! bounded backoff ([`ConnTransport`]); the gateway accepts connections on its QUIC and
//! TCP listen addresses ([`ConnListeners`]) up to a bound, and closes one nothing came on
//! for [`IDLE_CLOSE`].

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use jvpn_core::ids::Protocol;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch};

use crate::runtime::{ActorKind, Close};
use crate::telemetry::{self, Direction, TrafficMeter};
use crate::tls::{self, TlsIdentity, TlsPin};
use crate::transport::{Deliver, Incoming, Sent, Signal, TransportHandle};

/// TCP frames waiting for a connection's writer, at most (about 360 KiB of full-size
/// packets).
pub const FRAME_QUEUE: usize = 256;
/// The read and write buffers of a TCP connection (a TLS record is at most 16 KiB).
const STREAM_BUFFER: usize = 32 << 10;
/// Datagrams (QUIC) or frames (TCP) handed on per wakeup, at most.
const READ_BATCH: usize = 64;
/// The gateway closes a connection nothing came on for this long (a client's standby
/// connections carry its probes, so only abandoned ones go quiet).
pub const IDLE_CLOSE: Duration = Duration::from_secs(60);
/// QUIC's own idle timeout; the client keeps its connections alive well within it.
const QUIC_IDLE: Duration = Duration::from_secs(30);
const QUIC_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// The length of the connection ids a QUIC endpoint here gives out (each end's are in
/// the short header of every packet sent to it): 4 random bytes instead of quinn's 8
/// (a hashed id). Over IPv6 a 1 500-byte link leaves 1 452 bytes of UDP payload, and
/// with 8-byte ids a full-size session packet of the default tunnel MTU (1 416 bytes)
/// needed 1 454: every one was dropped (`send_too_big`). 4 bytes give over four billion
/// ids; quinn draws again when one is taken.
const QUIC_CID_LEN: usize = 4;
/// QUIC's overhead on one session packet, as quinn counts it to size a datagram: its
/// short header (1 byte of flags, the peer's connection id, a packet number of up to 4
/// bytes), its 16-byte tag, and the DATAGRAM frame's type and length (9 bytes at most).
const QUIC_DATAGRAM_OVERHEAD: usize = 1 + QUIC_CID_LEN + 4 + 16 + 9;

/// A QUIC endpoint's configuration: quinn's, with [`QUIC_CID_LEN`]-byte connection ids.
fn quic_endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config.cid_generator(|| {
        Box::new(quinn_proto::RandomConnectionIdGenerator::new(QUIC_CID_LEN))
            as Box<dyn quinn::ConnectionIdGenerator>
    });
    config
}

/// Whether the path to `peer` is IPv4: an IPv4 peer of a socket bound to [::] shows as
/// an IPv4-mapped IPv6 address, and its path is IPv4 all the same.
fn over_ipv4(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_ipv4()
}

/// QUIC's packet sizes (UDP payload) on a path like `peer`'s for session packets of up
/// to `packet_max` bytes: the least it may fall to, and where it starts (and what path
/// MTU discovery may climb back to).
///
/// It starts at [`quic_start`]. Its least is what one full-size session packet needs in one datagram frame
/// (1 450 at the default tunnel MTU of 1 380), never below QUIC's 1 200 nor above the
/// start: quinn's black-hole detection, which runs whether discovery does or not, reads
/// a few bursts of lost full-size packets (ordinary congestion loss in a bulk transfer)
/// as a smaller path and falls back to that least for a minute (quinn-rs/quinn#1540).
/// At QUIC's default least (1 200) no full-size session packet fits a datagram any more,
/// and a session's TCP stalled for that minute. The least is also what quinn pads a
/// connection's first packets to, so a path that carries it can connect (a PPPoE link
/// of 1 492 bytes can, at the default tunnel MTU); a tunnel MTU too large for the link
/// leaves full-size packets dropped over QUIC (`send_too_big`), each answered with ICMP
/// "too big" (`crate::too_big`).
fn quic_sizes(peer: SocketAddr, packet_max: usize) -> (u16, u16) {
    let link = quic_start(peer);
    let needed = packet_max.saturating_add(QUIC_DATAGRAM_OVERHEAD);
    let least = u16::try_from(needed).unwrap_or(u16::MAX).clamp(1_200, link);
    (least, link)
}

/// Where QUIC's packet size (UDP payload) starts on a path to `peer`: what a 1 500-byte
/// link carries less the IPv4 or IPv6 and UDP headers.
fn quic_start(peer: SocketAddr) -> u16 {
    if over_ipv4(peer) {
        1_472
    } else {
        1_452
    }
}

/// What to tell the operator when a tunnel MTU of `mtu` is too large for a full-size
/// packet to fit one QUIC datagram on a path to `peer` of a 1 500-byte link (above 1 402
/// over IPv4, 1 382 over IPv6): such packets are dropped over QUIC and answered with
/// ICMP "too big" (`crate::too_big`), so senders that take the answer send smaller
/// packets at the cost of a round trip, and others (IPv4 without don't-fragment) lose
/// them.
pub fn quic_mtu_warning(peer: SocketAddr, mtu: u16) -> Option<String> {
    let max = usize::from(quic_start(peer))
        .saturating_sub(QUIC_DATAGRAM_OVERHEAD + jvpn_core::wire::OVERHEAD);
    let family = if over_ipv4(peer) { "IPv4" } else { "IPv6" };
    (usize::from(mtu) > max).then(|| {
        format!(
            "tunnel.mtu {mtu} is above {max}, the largest whose full-size packets fit a QUIC \
             datagram over {family} on a 1500-byte link: over quic://{peer} they are \
             dropped and their senders told the size that fits (ICMP too big); set \
             tunnel.mtu to {max} or less to carry them"
        )
    })
}

/// Buffers of QUIC datagrams, each way.
const QUIC_DATAGRAM_BUFFER: usize = 1 << 20;
/// How long a client's closing QUIC connection lingers, so that what it was just given
/// (the session's terminate) leaves before the close.
const QUIC_CLOSE_LINGER: Duration = Duration::from_millis(100);
/// A client's reconnection backoff, doubling from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// The TLS handshake of an accepted TCP connection must finish within this.
const TLS_ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections one source address may hold open at the gateway (a client uses one per
/// candidate; a few clients may share an address behind a NAT).
pub const CONNECTIONS_PER_SOURCE: usize = 16;
/// A TCP write that makes no progress for this long ends the connection (a peer that
/// keeps its window shut).
const WRITE_STALL: Duration = Duration::from_secs(10);
/// TCP keepalive (idle, interval, probes) and user timeout: a silently dead peer is
/// noticed in about 11 s, not after the kernel's 15 minutes of retransmissions.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(5), Duration::from_secs(2), 3);
const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Keepalive and user timeout on a TCP socket (best effort: a kernel that refuses them
/// leaves the defaults).
fn tcp_liveness(socket: socket2::SockRef<'_>) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE.0)
        .with_interval(KEEPALIVE.1)
        .with_retries(KEEPALIVE.2);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// Why a connection transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// TLS.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// QUIC refused the TLS configuration.
    #[error("QUIC refused the TLS configuration: {0}")]
    Quic(String),
    /// A socket.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The writing half of one connection; on a client, replaced at each reconnection.
pub struct ConnSender {
    link: Mutex<Option<Link>>,
    /// Where a client connects (its candidate's address, or the address its name
    /// resolved to last); unused on the gateway.
    target: Mutex<Option<SocketAddr>>,
    /// Whether the last send found no connection: a change is a signal.
    failing: AtomicBool,
    meter: TrafficMeter,
}

#[derive(Clone)]
enum Link {
    Quic(quinn::Connection),
    Tcp(mpsc::Sender<Bytes>),
}

impl ConnSender {
    fn new(protocol: Protocol) -> Arc<Self> {
        Arc::new(ConnSender {
            link: Mutex::new(None),
            target: Mutex::new(None),
            failing: AtomicBool::new(false),
            meter: TrafficMeter::new(Direction::Tx, protocol),
        })
    }

    fn set(&self, link: Option<Link>) {
        if let Some(Link::Quic(conn)) = self.replace(link) {
            conn.close(0u32.into(), b"closed");
        }
    }

    fn replace(&self, link: Option<Link>) -> Option<Link> {
        std::mem::replace(
            &mut *self.link.lock().unwrap_or_else(|e| e.into_inner()),
            link,
        )
    }

    /// Connects to `to` from now on, dropping the current connection.
    pub(crate) fn retarget(&self, to: SocketAddr) {
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = Some(to);
        self.set(None);
    }

    fn target(&self) -> Option<SocketAddr> {
        *self.target.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self) -> Option<Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The largest datagram the current connection takes now, if it is a QUIC one.
    pub(crate) fn datagram_room(&self) -> Option<usize> {
        match self.current() {
            Some(Link::Quic(conn)) => conn.max_datagram_size(),
            _ => None,
        }
    }

    /// Sends one datagram on the connection, never waiting.
    pub(crate) fn send(&self, datagram: &[u8]) -> Sent {
        let sent = match self.current() {
            None => Err(io::ErrorKind::NotConnected),
            Some(Link::Quic(conn)) => match conn.send_datagram(Bytes::copy_from_slice(datagram)) {
                Ok(()) => Ok(()),
                // The room shrank since the session checked it (QUIC measured a smaller
                // path): the session answers it (`crate::too_big`).
                Err(quinn::SendDatagramError::TooLarge) => {
                    telemetry::dropped("send_too_big");
                    return Sent::TooBig;
                }
                Err(_) => Err(io::ErrorKind::ConnectionReset),
            },
            Some(Link::Tcp(frames)) => match frames.try_send(Bytes::copy_from_slice(datagram)) {
                Ok(()) => Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    telemetry::dropped("send_busy");
                    return Sent::Ok;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => Err(io::ErrorKind::ConnectionReset),
            },
        };
        match sent {
            Ok(()) => {
                self.meter.record(1, datagram.len());
                if self.failing.swap(false, Ordering::Relaxed) {
                    return Sent::Recovered;
                }
                Sent::Ok
            }
            Err(kind) => {
                telemetry::dropped("send_failed");
                if self.failing.swap(true, Ordering::Relaxed) {
                    return Sent::Ok;
                }
                Sent::Failed(kind)
            }
        }
    }
}

/// QUIC's transport parameters for the session's datagrams (no streams) of up to
/// `packet_max` bytes, on a path like `peer`'s.
fn quic_transport(
    keep_alive: bool,
    peer: SocketAddr,
    packet_max: usize,
) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let (least, start) = quic_sizes(peer, packet_max);
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(start);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(QUIC_IDLE).ok())
        .keep_alive_interval(keep_alive.then_some(QUIC_KEEP_ALIVE))
        .initial_mtu(start)
        .min_mtu(least)
        .mtu_discovery_config(Some(discovery))
        .datagram_receive_buffer_size(Some(QUIC_DATAGRAM_BUFFER))
        .datagram_send_buffer_size(QUIC_DATAGRAM_BUFFER)
        .max_concurrent_bidi_streams(0u32.into())
        .max_concurrent_uni_streams(0u32.into());
    Arc::new(t)
}

/// Reads QUIC datagrams until the connection ends or (`idle`) stays silent that long,
/// handing them on in batches.
async fn read_quic(
    conn: quinn::Connection,
    handle: &TransportHandle,
    deliver: &Arc<dyn Deliver>,
    received: &TrafficMeter,
    idle: Option<Duration>,
) {
    loop {
        let read = match idle {
            Some(idle) => match tokio::time::timeout(idle, conn.read_datagram()).await {
                Ok(r) => r,
                Err(_) => return,
            },
            None => conn.read_datagram().await,
        };
        let Ok(first) = read else { return };
        let peer = conn.remote_address();
        let mut batch: Vec<Incoming> = vec![(peer, BytesMut::from(&first[..]))];
        while batch.len() < READ_BATCH {
            match conn.read_datagram().now_or_never() {
                Some(Ok(d)) => batch.push((peer, BytesMut::from(&d[..]))),
                _ => break,
            }
        }
        let bytes = batch.iter().map(|(_, d)| d.len()).sum();
        received.record(batch.len(), bytes);
        deliver.datagrams(handle, batch);
    }
}

/// Reads length-prefixed frames until the stream ends, fails, or (`idle`) stays silent
/// that long; hands them on in batches of those already buffered.
async fn read_frames<R: AsyncRead + Unpin>(
    reader: R,
    peer: SocketAddr,
    handle: &TransportHandle,
    deliver: &Arc<dyn Deliver>,
    received: &TrafficMeter,
    idle: Option<Duration>,
) {
    let mut reader = BufReader::with_capacity(STREAM_BUFFER, reader);
    loop {
        let first = match idle {
            Some(idle) => match tokio::time::timeout(idle, read_frame(&mut reader)).await {
                Ok(r) => r,
                Err(_) => return,
            },
            None => read_frame(&mut reader).await,
        };
        let Ok(first) = first else { return };
        let mut batch: Vec<Incoming> = vec![(peer, first)];
        // Frames already in the buffer join the batch without waiting.
        while batch.len() < READ_BATCH && frame_buffered(reader.buffer()) {
            match read_frame(&mut reader).now_or_never() {
                Some(Ok(frame)) => batch.push((peer, frame)),
                // A bad frame ends the connection, as it does first in a batch.
                Some(Err(_)) => return,
                None => break,
            }
        }
        let bytes = batch.iter().map(|(_, d)| d.len()).sum();
        received.record(batch.len(), bytes);
        deliver.datagrams(handle, batch);
    }
}

/// Whether `buffered` holds a whole frame.
fn frame_buffered(buffered: &[u8]) -> bool {
    match buffered {
        [a, b, rest @ ..] => rest.len() >= usize::from(u16::from_be_bytes([*a, *b])),
        _ => false,
    }
}

async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R) -> io::Result<BytesMut> {
    let len = usize::from(reader.read_u16().await?);
    if len == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "empty frame"));
    }
    let mut frame = BytesMut::zeroed(len);
    reader.read_exact(&mut frame).await?;
    Ok(frame)
}

/// Writes the frames queued for a connection until the queue closes or a write fails;
/// flushes whenever the queue runs empty.
async fn write_frames<W: AsyncWrite + Unpin>(writer: W, mut frames: mpsc::Receiver<Bytes>) {
    let mut writer = BufWriter::with_capacity(STREAM_BUFFER, writer);
    while let Some(frame) = frames.recv().await {
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            let Ok(len) = u16::try_from(frame.len()) else {
                telemetry::dropped("send_too_big");
                next = frames.try_recv().ok();
                continue;
            };
            let wrote = tokio::time::timeout(WRITE_STALL, async {
                writer.write_all(&len.to_be_bytes()).await?;
                writer.write_all(&frame).await
            })
            .await;
            if !matches!(wrote, Ok(Ok(()))) {
                return;
            }
            next = frames.try_recv().ok();
        }
        if !matches!(
            tokio::time::timeout(WRITE_STALL, writer.flush()).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
    let _ = writer.shutdown().await;
}

/// Starts the writer of a TLS stream and returns its link and reading half.
fn split_tcp<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
) -> (Link, tokio::io::ReadHalf<S>) {
    let (read, write) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel(FRAME_QUEUE);
    actix_rt::spawn(write_frames(write, rx));
    (Link::Tcp(tx), read)
}

/// How a client reaches a candidate over a connection.
#[derive(Debug, Clone)]
pub struct ConnCandidate {
    /// QUIC or TCP.
    pub protocol: Protocol,
    /// The gateway's address.
    pub gateway: SocketAddr,
    /// The local address to bind, if any.
    pub bind: Option<SocketAddr>,
    /// A firewall mark on the connection's packets (full tunnel).
    pub fwmark: Option<u32>,
    /// The gateway's certificate pin.
    pub pin: TlsPin,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// The largest session packet the connection must carry whole (the tunnel MTU and
    /// the session's overhead): what QUIC's packet size never falls below.
    pub packet_max: usize,
}

/// A client's connection to one candidate, kept established: connect, read until it
/// ends, report it, reconnect after a bounded backoff. Reports [`Signal::Connected`]
/// each time a connection is up and [`Signal::SendFailed`] each time one is lost or
/// cannot be made (once per change).
pub struct ConnTransport {
    candidate: ConnCandidate,
    tls: Arc<rustls::ClientConfig>,
    sender: Arc<ConnSender>,
    handle: TransportHandle,
    deliver: Arc<dyn Deliver>,
    running: Option<SpawnHandle>,
}

impl ConnTransport {
    /// A transport for `candidate`, handing what it reads to `deliver` (start it with
    /// [`ConnTransport::start`]).
    pub fn new(candidate: ConnCandidate, deliver: Arc<dyn Deliver>) -> Result<Self, ConnError> {
        let tls = Arc::new(tls::client_config(candidate.pin)?);
        let sender = ConnSender::new(candidate.protocol);
        sender.retarget(candidate.gateway);
        let local = candidate
            .bind
            .unwrap_or_else(|| unspecified(candidate.gateway));
        let handle = TransportHandle::connection(candidate.protocol, local, Arc::clone(&sender));
        Ok(ConnTransport {
            candidate,
            tls,
            sender,
            handle,
            deliver,
            running: None,
        })
    }

    /// The handle the client writes through.
    pub fn handle(&self) -> TransportHandle {
        self.handle.clone()
    }
}

fn unspecified(like: SocketAddr) -> SocketAddr {
    match like {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

impl Actor for ConnTransport {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let run = keep_connected(
            self.candidate.clone(),
            Arc::clone(&self.tls),
            Arc::clone(&self.sender),
            self.handle.clone(),
            Arc::clone(&self.deliver),
        );
        self.running = Some(ctx.spawn(actix::fut::wrap_future(run)));
    }

    /// However it stopped (closed, crashed, or nobody holds it), its connection goes
    /// with it: nobody would read it any more.
    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.sender.set(None);
    }
}

impl Handler<Close> for ConnTransport {
    type Result = ();

    /// Closes the connection once what it was given has left (a QUIC close after a
    /// short linger, or the TCP writer's shutdown once what it holds is written) and
    /// stops.
    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        if let Some(running) = self.running.take() {
            ctx.cancel_future(running);
        }
        if let Some(Link::Quic(conn)) = self.sender.replace(None) {
            actix_rt::spawn(async move {
                tokio::time::sleep(QUIC_CLOSE_LINGER).await;
                conn.close(0u32.into(), b"closed");
            });
        }
        ctx.stop();
    }
}

impl Handler<crate::runtime::Crash> for ConnTransport {
    type Result = ();

    fn handle(&mut self, _: crate::runtime::Crash, ctx: &mut Context<Self>) {
        telemetry::restarted(ActorKind::Transport);
        ctx.stop();
    }
}

async fn keep_connected(
    candidate: ConnCandidate,
    tls: Arc<rustls::ClientConfig>,
    sender: Arc<ConnSender>,
    handle: TransportHandle,
    deliver: Arc<dyn Deliver>,
) {
    let received = TrafficMeter::new(Direction::Rx, candidate.protocol);
    let mut backoff = BACKOFF.0;
    // The QUIC endpoint lives as long as the transport: one socket, many connections.
    let mut endpoint: Option<quinn::Endpoint> = None;
    let mut candidate = candidate;
    loop {
        candidate.gateway = sender.target().unwrap_or(candidate.gateway);
        let attempt = tokio::time::timeout(
            candidate.connect_timeout,
            connect(&candidate, &tls, &mut endpoint),
        )
        .await;
        match attempt {
            Ok(Ok(Connected::Quic(conn))) => {
                sender.set(Some(Link::Quic(conn.clone())));
                sender.failing.store(false, Ordering::Relaxed);
                deliver.signal(&handle, Signal::Connected);
                backoff = BACKOFF.0;
                read_quic(conn, &handle, &deliver, &received, None).await;
            }
            Ok(Ok(Connected::Tcp(link, reader))) => {
                sender.set(Some(link));
                sender.failing.store(false, Ordering::Relaxed);
                deliver.signal(&handle, Signal::Connected);
                backoff = BACKOFF.0;
                read_frames(
                    reader,
                    candidate.gateway,
                    &handle,
                    &deliver,
                    &received,
                    None,
                )
                .await;
            }
            Ok(Err(_)) | Err(_) => telemetry::dropped("connect_failed"),
        }
        sender.set(None);
        if !sender.failing.swap(true, Ordering::Relaxed) {
            deliver.signal(&handle, Signal::SendFailed(io::ErrorKind::ConnectionReset));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

enum Connected {
    Quic(quinn::Connection),
    Tcp(
        Link,
        tokio::io::ReadHalf<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    ),
}

async fn connect(
    c: &ConnCandidate,
    tls: &Arc<rustls::ClientConfig>,
    endpoint: &mut Option<quinn::Endpoint>,
) -> Result<Connected, ConnError> {
    let bind = c.bind.unwrap_or_else(|| unspecified(c.gateway));
    match c.protocol {
        Protocol::Quic => {
            let ep = match endpoint {
                Some(ep) => ep.clone(),
                None => {
                    let socket = std::net::UdpSocket::bind(bind)?;
                    if let Some(mark) = c.fwmark {
                        socket2::SockRef::from(&socket).set_mark(mark)?;
                    }
                    let ep = quinn::Endpoint::new(
                        quic_endpoint_config(),
                        None,
                        socket,
                        Arc::new(quinn::TokioRuntime),
                    )?;
                    *endpoint = Some(ep.clone());
                    ep
                }
            };
            let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::clone(tls))
                .map_err(|e| ConnError::Quic(e.to_string()))?;
            let mut config = quinn::ClientConfig::new(Arc::new(crypto));
            config.transport_config(quic_transport(true, c.gateway, c.packet_max));
            let conn = ep
                .connect_with(config, c.gateway, tls::SERVER_NAME)
                .map_err(|e| ConnError::Quic(e.to_string()))?
                .await
                .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e))?;
            Ok(Connected::Quic(conn))
        }
        Protocol::Tcp | Protocol::Udp => {
            let socket = match c.gateway {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            if let Some(mark) = c.fwmark {
                socket2::SockRef::from(&socket).set_mark(mark)?;
            }
            if c.bind.is_some() {
                socket.bind(bind)?;
            }
            let stream = socket.connect(c.gateway).await?;
            stream.set_nodelay(true)?;
            tcp_liveness(socket2::SockRef::from(&stream));
            let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
                .connect(tls::server_name(), stream)
                .await?;
            let (link, reader) = split_tcp(stream);
            Ok(Connected::Tcp(link, reader))
        }
    }
}

/// A gateway's QUIC or TCP listen address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnListen {
    /// QUIC or TCP.
    pub protocol: Protocol,
    /// Where.
    pub addr: SocketAddr,
    /// The largest session packet a connection must carry whole (the tunnel MTU and
    /// the session's overhead): what QUIC's packet size never falls below.
    pub packet_max: usize,
}

/// The gateway's connection listeners and every connection they accepted; all of them
/// end when this is dropped or [`ConnListeners::stop`]ped.
pub struct ConnListeners {
    stop: watch::Sender<bool>,
    /// The bound addresses, in the order given.
    pub local: Vec<(Protocol, SocketAddr)>,
}

impl ConnListeners {
    /// Binds every listen address (all or none: an address that cannot be bound is an
    /// error naming it) and serves them, handing what connections carry to `deliver`.
    /// At most `max_connections` are open at once; more are refused. Must run inside
    /// the actix system.
    pub fn start(
        listen: &[ConnListen],
        identity: &TlsIdentity,
        deliver: Arc<dyn Deliver>,
        max_connections: usize,
    ) -> Result<ConnListeners, ConnError> {
        let (stop, stopped) = watch::channel(false);
        let open = Arc::new(AtomicUsize::new(0));
        let by_source = Arc::new(Mutex::new(std::collections::HashMap::new()));
        let server = Arc::new(identity.server_config()?);
        let mut bound = Vec::new();
        let mut local = Vec::new();
        for l in listen {
            match l.protocol {
                Protocol::Quic => {
                    let crypto = Arc::new(
                        quinn::crypto::rustls::QuicServerConfig::try_from(Arc::clone(&server))
                            .map_err(|e| ConnError::Quic(e.to_string()))?,
                    );
                    // Sized by each client's family, not the listen address's: a
                    // listener on [::] serves IPv4 clients too ([`QuicServer::accept`]).
                    let for_family = |peer: IpAddr| {
                        let mut config = quinn::ServerConfig::with_crypto(crypto.clone());
                        let peer = SocketAddr::new(peer, 0);
                        config.transport_config(quic_transport(false, peer, l.packet_max));
                        config
                    };
                    let configs = QuicServer {
                        v4: Arc::new(for_family(Ipv4Addr::UNSPECIFIED.into())),
                        v6: Arc::new(for_family(Ipv6Addr::UNSPECIFIED.into())),
                    };
                    let config = for_family(l.addr.ip());
                    let socket = std::net::UdpSocket::bind(l.addr).map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot listen on quic://{}: {e}", l.addr))
                    })?;
                    let endpoint = quinn::Endpoint::new(
                        quic_endpoint_config(),
                        Some(config),
                        socket,
                        Arc::new(quinn::TokioRuntime),
                    )?;
                    local.push((Protocol::Quic, endpoint.local_addr()?));
                    bound.push(Bound::Quic(endpoint, configs));
                }
                Protocol::Tcp | Protocol::Udp => {
                    let listener = std::net::TcpListener::bind(l.addr).map_err(|e| {
                        io::Error::new(e.kind(), format!("cannot listen on tcp://{}: {e}", l.addr))
                    })?;
                    listener.set_nonblocking(true)?;
                    local.push((Protocol::Tcp, listener.local_addr()?));
                    bound.push(Bound::Tcp(listener));
                }
            }
        }
        for b in bound {
            let serve = Serve {
                deliver: Arc::clone(&deliver),
                open: Arc::clone(&open),
                by_source: Arc::clone(&by_source),
                max: max_connections,
                stopped: stopped.clone(),
            };
            match b {
                Bound::Quic(endpoint, configs) => {
                    actix_rt::spawn(serve.quic(endpoint, configs));
                }
                Bound::Tcp(listener) => {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&server));
                    actix_rt::spawn(serve.tcp(listener, acceptor));
                }
            }
        }
        Ok(ConnListeners { stop, local })
    }

    /// Stops the listeners and closes every connection.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for ConnListeners {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Bound {
    Quic(quinn::Endpoint, QuicServer),
    Tcp(std::net::TcpListener),
}

/// A QUIC listener's server settings, one per client family: a client's packets are
/// sized by its own path (`quic_sizes`).
struct QuicServer {
    v4: Arc<quinn::ServerConfig>,
    v6: Arc<quinn::ServerConfig>,
}

impl QuicServer {
    /// The settings for a client at `peer`.
    fn accept(&self, peer: SocketAddr) -> Arc<quinn::ServerConfig> {
        Arc::clone(if over_ipv4(peer) { &self.v4 } else { &self.v6 })
    }
}

/// What every accepted connection shares.
#[derive(Clone)]
struct Serve {
    deliver: Arc<dyn Deliver>,
    open: Arc<AtomicUsize>,
    /// Open connections by source address (only addresses that have some).
    by_source: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    max: usize,
    stopped: watch::Receiver<bool>,
}

/// One open connection, counted (in all and for its source) until dropped.
struct Open {
    open: Arc<AtomicUsize>,
    by_source: Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    source: std::net::IpAddr,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        let mut by_source = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

impl Serve {
    /// Counts a new connection from `source` in, if there is room in all and for it.
    fn admit(&self, source: std::net::IpAddr) -> Option<Open> {
        let mut by_source = self.by_source.lock().unwrap_or_else(|e| e.into_inner());
        let mine = by_source.get(&source).copied().unwrap_or(0);
        if mine >= CONNECTIONS_PER_SOURCE {
            telemetry::dropped("connection_refused_source");
            return None;
        }
        if self.open.load(Ordering::Relaxed) >= self.max {
            telemetry::dropped("connection_refused_full");
            return None;
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        by_source.insert(source, mine + 1);
        Some(Open {
            open: Arc::clone(&self.open),
            by_source: Arc::clone(&self.by_source),
            source,
        })
    }

    async fn until_stopped(mut stopped: watch::Receiver<bool>) {
        while !*stopped.borrow() {
            if stopped.changed().await.is_err() {
                return;
            }
        }
    }

    async fn quic(self, endpoint: quinn::Endpoint, configs: QuicServer) {
        let local = endpoint
            .local_addr()
            .unwrap_or_else(|_| unspecified(SocketAddr::from(([0, 0, 0, 0], 0))));
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = Self::until_stopped(self.stopped.clone()) => None,
            };
            let Some(incoming) = incoming else { break };
            let Some(slot) = self.admit(incoming.remote_address().ip()) else {
                incoming.refuse();
                continue;
            };
            let config = configs.accept(incoming.remote_address());
            let serve = self.clone();
            actix_rt::spawn(async move {
                let _slot = slot;
                let Ok(Ok(conn)) = tokio::time::timeout(TLS_ACCEPT_TIMEOUT, async {
                    incoming.accept_with(config)?.await
                })
                .await
                else {
                    telemetry::dropped("connection_handshake_failed");
                    return;
                };
                let sender = ConnSender::new(Protocol::Quic);
                sender.set(Some(Link::Quic(conn.clone())));
                let handle =
                    TransportHandle::connection(Protocol::Quic, local, Arc::clone(&sender));
                let received = TrafficMeter::new(Direction::Rx, Protocol::Quic);
                tokio::select! {
                    _ = read_quic(conn, &handle, &serve.deliver, &received, Some(IDLE_CLOSE)) => {}
                    _ = Self::until_stopped(serve.stopped.clone()) => {}
                }
                sender.set(None);
            });
        }
        endpoint.close(0u32.into(), b"stopping");
    }

    async fn tcp(self, listener: tokio::net::TcpListener, acceptor: tokio_rustls::TlsAcceptor) {
        let local = listener
            .local_addr()
            .unwrap_or_else(|_| unspecified(SocketAddr::from(([0, 0, 0, 0], 0))));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => Some(a),
                _ = Self::until_stopped(self.stopped.clone()) => None,
            };
            let Some(accepted) = accepted else { break };
            let Ok((stream, peer)) = accepted else {
                // Out of descriptors, most likely: wait rather than spin.
                telemetry::dropped("accept_failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Some(slot) = self.admit(peer.ip()) else {
                continue;
            };
            let serve = self.clone();
            let acceptor = acceptor.clone();
            actix_rt::spawn(async move {
                let _slot = slot;
                let _ = stream.set_nodelay(true);
                tcp_liveness(socket2::SockRef::from(&stream));
                let Ok(Ok(stream)) =
                    tokio::time::timeout(TLS_ACCEPT_TIMEOUT, acceptor.accept(stream)).await
                else {
                    telemetry::dropped("connection_handshake_failed");
                    return;
                };
                let sender = ConnSender::new(Protocol::Tcp);
                let (link, reader) = split_tcp(stream);
                sender.set(Some(link));
                let handle = TransportHandle::connection(Protocol::Tcp, local, Arc::clone(&sender));
                let received = TrafficMeter::new(Direction::Rx, Protocol::Tcp);
                tokio::select! {
                    _ = read_frames(reader, peer, &handle, &serve.deliver, &received, Some(IDLE_CLOSE)) => {}
                    _ = Self::until_stopped(serve.stopped.clone()) => {}
                }
                // Dropping the link ends the writer, which shuts the stream down.
                sender.set(None);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QUIC never falls below what a full-size session packet needs (so congestion loss
    /// taken for a black hole cannot leave it unable to carry one), starts at what a
    /// 1 500-byte link carries, and stays within QUIC's 1 200 and that start.
    #[test]
    fn quic_falls_no_lower_than_a_full_size_session_packet_needs() {
        let v4: SocketAddr = "10.0.0.1:1".parse().unwrap_or_else(|_| unreachable!());
        let v6: SocketAddr = "[fd00::1]:1".parse().unwrap_or_else(|_| unreachable!());
        let packet = |mtu: usize| mtu + jvpn_core::wire::OVERHEAD;
        // The default tunnel MTU: 1 380 + 36 + 34 = 1 450, which a PPPoE link carries,
        // and which fits an IPv6 path of a 1 500-byte link.
        assert_eq!(quic_sizes(v4, packet(1_380)), (1_450, 1_472));
        assert_eq!(quic_sizes(v6, packet(1_380)), (1_450, 1_452));
        assert_eq!(quic_sizes(v6, packet(1_382)), (1_452, 1_452));
        // Too large for the link: the start, and full-size packets are dropped.
        assert_eq!(quic_sizes(v6, packet(1_383)), (1_452, 1_452));
        assert_eq!(quic_sizes(v4, packet(9_000)), (1_472, 1_472));
        // An IPv4 client of a listener on [::] has an IPv4 path.
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(quic_sizes(mapped, packet(1_380)), (1_450, 1_472));
        // A small tunnel MTU: QUIC's own least.
        assert_eq!(quic_sizes(v4, packet(576)), (1_200, 1_472));
        assert_eq!(quic_sizes(v4, usize::MAX), (1_472, 1_472));
    }

    #[test]
    fn the_operator_is_told_when_full_size_packets_cannot_fit_quic() {
        let v4: SocketAddr = "10.0.0.1:443".parse().unwrap_or_else(|_| unreachable!());
        let v6: SocketAddr = "[::]:443".parse().unwrap_or_else(|_| unreachable!());
        for (peer, max) in [(v4, 1_402u16), (v6, 1_382)] {
            assert_eq!(quic_mtu_warning(peer, 1_380), None);
            assert_eq!(quic_mtu_warning(peer, max), None);
            // The largest MTU that passes needs exactly the start: one more does not fit.
            let packet = usize::from(max) + jvpn_core::wire::OVERHEAD;
            assert_eq!(
                quic_sizes(peer, packet),
                (quic_start(peer), quic_start(peer))
            );
            let warning = quic_mtu_warning(peer, max + 1).unwrap_or_default();
            assert!(warning.contains(&format!("above {max}")), "{warning}");
            assert!(warning.contains(&peer.to_string()), "{warning}");
        }
    }

    #[test]
    fn a_frame_is_buffered_only_when_whole() {
        assert!(!frame_buffered(&[]));
        assert!(!frame_buffered(&[0]));
        assert!(!frame_buffered(&[0, 3, 1, 2]));
        assert!(frame_buffered(&[0, 3, 1, 2, 3]));
        assert!(frame_buffered(&[0, 1, 9, 0, 5]));
    }
}
