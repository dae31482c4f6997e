//! UDP transports: one reader actor per socket, and a [`TransportHandle`] through which
//! sessions write to the socket themselves.
//!
//! The reader reads whole batches (recvmmsg, and UDP GRO where the kernel coalesces) and
//! hands them to whoever routes them ([`Deliver`]); it reports what the socket says
//! about the path (ICMP unreachable, recovery) as [`Signal`]s and never decides policy.
//! Writes take no actor hop: a session seals a batch and sends it on the shared
//! non-blocking socket in as few system calls as the kernel allows (UDP GSO: one call
//! for a run of equal-sized datagrams; sendmsg per datagram otherwise). A send never
//! waits: a full socket buffer drops the datagram, as a congested link would, and
//! counts it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use bytes::BytesMut;
use jvpn_core::ids::Protocol;
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use crate::read_slot::ReadSlot;
use crate::runtime::{ActorKind, Close, Crash};
use crate::telemetry::{self, Direction, TrafficMeter};

/// Datagram slots one read asks the kernel for (recvmmsg); with GRO each slot may hold
/// many datagrams of one sender.
pub const READ_SLOTS: usize = 32;

/// Size of one read slot: the largest datagram, or a GRO run of datagrams.
pub const SLOT_BYTES: usize = 65_535;

/// The socket buffer sizes asked for (SO_RCVBUF / SO_SNDBUF, forced past the sysctl
/// maximum when the process may): the 208 KiB default overflows under a TCP flow through
/// the tunnel, and every overflow is a loss the tunnelled TCP must recover from.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// The most bytes one GSO send carries (the kernel's limit for one UDP payload).
const MAX_GSO_BYTES: usize = 65_000;

/// A transport as a session sees it: its protocol, where it is bound, the core (arbiter
/// index) that reads it, and what to write to: a UDP socket shared by every peer, or
/// one connection (QUIC or TCP, [`crate::conn`]) to one peer.
#[derive(Clone)]
pub struct TransportHandle {
    protocol: Protocol,
    local: SocketAddr,
    core: usize,
    sender: Writer,
}

#[derive(Clone)]
enum Writer {
    Udp(Arc<UdpSender>),
    Conn(Arc<crate::conn::ConnSender>),
}

impl std::fmt::Debug for TransportHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.protocol.as_str(), self.local)
    }
}

impl TransportHandle {
    /// Whether `other` writes to the same socket or connection (a handle and its clones).
    pub fn same(&self, other: &TransportHandle) -> bool {
        match (&self.sender, &other.sender) {
            (Writer::Udp(a), Writer::Udp(b)) => Arc::ptr_eq(a, b),
            (Writer::Conn(a), Writer::Conn(b)) => Arc::ptr_eq(a, b),
            _ => false,
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

    /// The index of the arbiter that reads it (sessions are pinned to it).
    pub fn core(&self) -> usize {
        self.core
    }

    /// A handle writing to one connection.
    pub(crate) fn connection(
        protocol: Protocol,
        local: SocketAddr,
        sender: Arc<crate::conn::ConnSender>,
    ) -> Self {
        TransportHandle {
            protocol,
            local,
            core: 0,
            sender: Writer::Conn(sender),
        }
    }

    /// Points the transport at a new gateway address (its name resolved anew): a UDP
    /// socket is connected there, a connection is made there from its next attempt on
    /// (the current one, if any, is dropped).
    pub fn retarget(&self, to: SocketAddr) -> io::Result<()> {
        match &self.sender {
            Writer::Udp(udp) => {
                use std::os::fd::AsFd;
                crate::sys::disconnect(udp.socket.as_fd())?;
                udp.socket.connect(to)
            }
            Writer::Conn(conn) => {
                conn.retarget(to);
                Ok(())
            }
        }
    }

    /// The largest tunnel packet one datagram of this transport carries now, where the
    /// transport knows a limit of its own: a QUIC connection's datagram room (which
    /// follows the path's MTU as QUIC measures it) less a session packet's header and
    /// tag. `None` for UDP (the kernel refuses what its path MTU does not take) and TCP
    /// (a frame carries any packet).
    pub fn packet_room(&self) -> Option<usize> {
        match &self.sender {
            Writer::Udp(_) => None,
            Writer::Conn(conn) => conn
                .datagram_room()
                .map(|room| room.saturating_sub(jvpn_core::wire::OVERHEAD)),
        }
    }

    /// The largest tunnel packet the kernel lets a datagram to `to` on this UDP transport
    /// carry: its path MTU to `to` (the outgoing link's MTU, or less where an ICMP "too
    /// big" taught it the path's) less the IP and UDP headers and a session packet's
    /// header and tag. A client's socket is connected and is asked itself; a gateway's
    /// is shared by every peer, so a socket of the same family and local address,
    /// connected to `to` and never sent on, is asked instead. `None` for a connection
    /// transport (see [`TransportHandle::packet_room`]) or when the kernel cannot say.
    pub fn path_room(&self, to: SocketAddr) -> Option<usize> {
        use std::os::fd::AsFd;
        let Writer::Udp(udp) = &self.sender else {
            return None;
        };
        let to = SocketAddr::new(to.ip().to_canonical(), to.port());
        let mtu = match crate::sys::path_mtu(udp.socket.as_fd(), self.local.is_ipv6()) {
            Ok(mtu) => mtu,
            Err(_) => {
                let local = self.local.ip().to_canonical();
                let from = if local.is_ipv4() == to.is_ipv4() && !local.is_unspecified() {
                    local
                } else if to.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                };
                let probe = std::net::UdpSocket::bind(SocketAddr::new(from, 0)).ok()?;
                probe.connect(to).ok()?;
                crate::sys::path_mtu(probe.as_fd(), to.is_ipv6()).ok()?
            }
        };
        let headers = if to.is_ipv4() { 20 + 8 } else { 40 + 8 };
        Some(mtu.saturating_sub(headers + jvpn_core::wire::OVERHEAD))
    }

    /// Sends one datagram to `to` (a connection has one peer: `to` is its address).
    pub fn send(&self, to: SocketAddr, datagram: &[u8]) -> Sent {
        match &self.sender {
            Writer::Udp(udp) => udp.send(to, datagram, datagram.len()),
            Writer::Conn(conn) => conn.send(datagram),
        }
    }

    /// Sends the datagrams of `batch` to `to`, each run of equal-sized datagrams (the
    /// last of a run may be shorter) in one call where the kernel has UDP GSO. Returns
    /// the outcome of the last call that changed the path's state, if any did.
    pub fn send_batch(&self, to: SocketAddr, batch: &Batch) -> Sent {
        let udp = match &self.sender {
            Writer::Udp(udp) => udp,
            Writer::Conn(conn) => {
                let mut outcome = Sent::Ok;
                for (&at, &len) in batch.offsets.iter().zip(&batch.lens) {
                    outcome = outcome.then(conn.send(&batch.bytes[at..at + len]));
                }
                return outcome;
            }
        };
        let mut outcome = Sent::Ok;
        let gso = udp.state.max_gso_segments().max(1);
        let mut start = 0;
        while start < batch.lens.len() {
            let stride = batch.lens[start];
            // A GSO send is one UDP payload of at most 64 KiB.
            let max = gso.min(MAX_GSO_BYTES / stride.max(1)).max(1);
            let mut end = start + 1;
            while end < batch.lens.len() && end - start < max && batch.lens[end - 1] == stride {
                if batch.lens[end] > stride {
                    break;
                }
                end += 1;
            }
            let from = batch.offsets[start];
            let to_byte = batch.offsets[end - 1] + batch.lens[end - 1];
            outcome = outcome.then(udp.send(to, &batch.bytes[from..to_byte], stride));
            start = end;
        }
        outcome
    }
}

/// What a send did to the path, as far as the caller needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Sent (or dropped for a full buffer, counted), and nothing changed.
    Ok,
    /// The first failure after a working path (no route, interface down, refused by a
    /// firewall): a path signal for the session.
    Failed(io::ErrorKind),
    /// The first success after failures.
    Recovered,
    /// Refused as larger than the path takes, by the kernel (EMSGSIZE: a tunnel MTU set
    /// above the path's MTU less the headers; [`TransportHandle::path_room`] says what
    /// fits) or by QUIC (its room shrank; [`TransportHandle::packet_room`]): dropped,
    /// counted (`send_too_big`), and the path not blamed.
    TooBig,
}

impl Sent {
    /// The outcome of this send followed by `next`, as the caller needs it: the later
    /// path signal, else whether one was too big. A batch that carries both a path
    /// signal and a refusal reports the signal: its refused packets go unanswered, and
    /// the next refusal teaches the room.
    fn then(self, next: Sent) -> Sent {
        match (self, next) {
            (_, Sent::Failed(_) | Sent::Recovered) => next,
            (Sent::Failed(_) | Sent::Recovered, _) => self,
            (Sent::TooBig, _) | (_, Sent::TooBig) => Sent::TooBig,
            (Sent::Ok, Sent::Ok) => Sent::Ok,
        }
    }
}

/// Sealed datagrams to send together: contiguous bytes and each datagram's extent.
/// Reused across messages ([`Batch::with_scratch`]), so the hot path allocates nothing
/// once warm.
#[derive(Debug, Default)]
pub struct Batch {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    lens: Vec<usize>,
}

impl Batch {
    /// Runs `f` with this thread's batch, emptied first. One batch per thread (arbiter)
    /// rather than one per session, so that an idle session holds no batch memory; a
    /// nested use (none is made) gets a fresh batch rather than a conflict.
    pub fn with_scratch<R>(f: impl FnOnce(&mut Batch) -> R) -> R {
        thread_local! {
            static SCRATCH: RefCell<Batch> = RefCell::new(Batch::default());
        }
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut batch) => {
                batch.clear();
                f(&mut batch)
            }
            Err(_) => f(&mut Batch::default()),
        })
    }

    /// Appends the datagram `seal` writes at the end of the buffer it is given; nothing
    /// is kept if it fails or writes nothing.
    pub fn append<T, E>(
        &mut self,
        seal: impl FnOnce(&mut Vec<u8>) -> Result<T, E>,
    ) -> Result<T, E> {
        let start = self.bytes.len();
        let sealed = seal(&mut self.bytes);
        if sealed.is_ok() && self.bytes.len() > start {
            self.offsets.push(start);
            self.lens.push(self.bytes.len() - start);
        } else {
            self.bytes.truncate(start);
        }
        sealed
    }

    /// The bytes of all its datagrams.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// How many datagrams it holds.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Empties it, keeping its memory.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.offsets.clear();
        self.lens.clear();
    }
}

/// The writing half of a socket, shared by every session that answers on it.
struct UdpSender {
    socket: std::net::UdpSocket,
    state: UdpSocketState,
    /// Whether the last send or read found the path broken: a change is a signal.
    failing: AtomicBool,
    meter: TrafficMeter,
}

impl UdpSender {
    fn send(&self, to: SocketAddr, contents: &[u8], segment: usize) -> Sent {
        let transmit = quinn_udp::Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: (contents.len() > segment).then_some(segment),
            src_ip: None,
        };
        let count = contents.len().div_ceil(segment.max(1));
        match self
            .state
            .try_send(UdpSockRef::from(&self.socket), &transmit)
        {
            Ok(()) => {
                self.meter.record(count, contents.len());
                if self.failing.swap(false, Ordering::Relaxed) {
                    return Sent::Recovered;
                }
                Sent::Ok
            }
            // The socket's buffer is full: drop, as a congested link would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                telemetry::dropped_n("send_busy", count);
                Sent::Ok
            }
            // Larger than the path takes (the tunnel's MTU is set above the path's): the
            // datagram is dropped, and the path is not to blame.
            Err(e) if e.raw_os_error() == Some(nix::libc::EMSGSIZE) => {
                telemetry::dropped_n("send_too_big", count);
                Sent::TooBig
            }
            // The kernel refused segmentation offload (quinn-udp turned GSO off for
            // this socket): send the segments one by one.
            Err(_) if transmit.segment_size.is_some() && self.state.max_gso_segments() == 1 => {
                contents.chunks(segment).fold(Sent::Ok, |outcome, one| {
                    outcome.then(self.send(to, one, one.len()))
                })
            }
            Err(e) => {
                telemetry::dropped_n("send_failed", count);
                if self.failing.swap(true, Ordering::Relaxed) {
                    return Sent::Ok;
                }
                Sent::Failed(e.kind())
            }
        }
    }
}

/// What a transport learned about its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A send failed (no route, interface down, refused by a firewall rule).
    SendFailed(io::ErrorKind),
    /// The peer's host or port is unreachable (ICMP, reported by a connected socket).
    Unreachable,
    /// The path works again after a failure.
    Recovered,
    /// A connection transport (QUIC, TCP) has a connection up, first or again: the path
    /// works, and a client still without a session can send its handshake there.
    Connected,
}

impl Sent {
    /// The path signal this outcome carries, if any.
    pub fn signal(self) -> Option<Signal> {
        match self {
            Sent::Ok | Sent::TooBig => None,
            Sent::Failed(kind) => Some(Signal::SendFailed(kind)),
            Sent::Recovered => Some(Signal::Recovered),
        }
    }
}

/// One datagram read: its sender and its bytes (mutable: sessions open it in place).
///
/// The bytes may be part of a read slot that is read into again once every datagram
/// of it has been dropped, without being zeroed (`read_slot`): a holder may write its
/// datagram and shorten it, and must never write uninitialized bytes into the room
/// behind it (`BytesMut::spare_capacity_mut`).
pub type Incoming = (SocketAddr, BytesMut);

/// Where a transport hands what it reads. Implementations route and never block.
pub trait Deliver: Send + Sync + 'static {
    /// Datagrams read in one wakeup, in arrival order, with their senders.
    fn datagrams(&self, via: &TransportHandle, batch: Vec<Incoming>);
    /// A change in what the socket says about the path.
    fn signal(&self, via: &TransportHandle, signal: Signal);
}

/// A bound (and, on a client, connected) UDP socket made ready for a transport:
/// non-blocking, buffers sized, GSO/GRO probed. Preparing is the fallible part, done
/// before any actor starts.
pub struct PreparedUdp {
    socket: std::net::UdpSocket,
    handle: TransportHandle,
    udp: Arc<UdpSender>,
}

impl PreparedUdp {
    /// Prepares `socket`, to be read on arbiter `core`.
    pub fn new(socket: std::net::UdpSocket, core: usize) -> io::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        size_buffers(&socket);
        let local = socket.local_addr()?;
        let sender = Arc::new(UdpSender {
            socket: socket.try_clone()?,
            state,
            failing: AtomicBool::new(false),
            meter: TrafficMeter::new(Direction::Tx, Protocol::Udp),
        });
        Ok(PreparedUdp {
            socket,
            handle: TransportHandle {
                protocol: Protocol::Udp,
                local,
                core,
                sender: Writer::Udp(Arc::clone(&sender)),
            },
            udp: sender,
        })
    }

    /// The handle sessions write through.
    pub fn handle(&self) -> TransportHandle {
        self.handle.clone()
    }

    /// Starts the reader on the current arbiter (supervised: restarted on the same
    /// socket if it stops), handing what it reads to `deliver`. Must run inside the
    /// runtime.
    pub fn start(self, deliver: Arc<dyn Deliver>) -> Addr<UdpTransport> {
        let transport = self.into_transport(deliver);
        actix::Supervisor::start(move |_| transport)
    }

    /// Like [`PreparedUdp::start`], on `arbiter`: the socket joins that arbiter's
    /// reactor when the actor starts there.
    pub fn start_in(
        self,
        arbiter: &ArbiterHandle,
        deliver: Arc<dyn Deliver>,
    ) -> Addr<UdpTransport> {
        let transport = self.into_transport(deliver);
        actix::Supervisor::start_in_arbiter(arbiter, move |_| transport)
    }

    fn into_transport(self, deliver: Arc<dyn Deliver>) -> UdpTransport {
        UdpTransport {
            unregistered: Some(self.socket),
            socket: None,
            handle: self.handle,
            udp: self.udp,
            deliver,
            received: TrafficMeter::new(Direction::Rx, Protocol::Udp),
            reading: None,
            closed: false,
        }
    }
}

/// Binds `count` UDP sockets to `addr` with SO_REUSEPORT (at least one; all to the port
/// the first got, if `addr` asks for any port): the kernel spreads the senders over them
/// by their address, so that one reader per core shares the work.
pub fn bind_shared(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    let mut sockets = Vec::with_capacity(count.max(1));
    let mut at = addr;
    for _ in 0..count.max(1) {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(at),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.set_reuse_port(true)?;
        socket.bind(&at.into())?;
        let socket = std::net::UdpSocket::from(socket);
        at = socket.local_addr()?;
        sockets.push(socket);
    }
    Ok(sockets)
}

/// Asks for [`SOCKET_BUFFER`] each way, forcing past the system maximum where the
/// process has CAP_NET_ADMIN, else as much as the maximum allows. Best effort: a smaller
/// buffer still works, only with more loss under load.
fn size_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let s = socket2::SockRef::from(socket);
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    }
}

/// The reader of one UDP socket.
pub struct UdpTransport {
    /// The socket until the actor first starts: it joins the reactor of the arbiter the
    /// actor runs on.
    unregistered: Option<std::net::UdpSocket>,
    socket: Option<Arc<UdpSocket>>,
    handle: TransportHandle,
    udp: Arc<UdpSender>,
    deliver: Arc<dyn Deliver>,
    /// What it reads, counted per batch.
    received: TrafficMeter,
    reading: Option<SpawnHandle>,
    closed: bool,
}

/// What one wakeup read: datagrams, and the error that ended the batch, if any.
struct Read {
    batch: Vec<Incoming>,
    error: Option<io::Error>,
}

/// The reader's buffers: [`READ_SLOTS`] slots of [`SLOT_BYTES`] the kernel writes
/// into, the spent slots waiting to be reused, and the buffer small runs are copied to
/// ([`Arena`]).
///
/// A run of [`TAKEN_RUN_BYTES`] or more (a GRO run under a flow) is handed on where
/// the kernel wrote it ([`ReadSlot::take`]): its slot goes with its datagrams, and a
/// spent slot whose datagrams have all been dropped takes its place, else a new one
/// (see [`ReadBuffers::take`]; with none free and no more to be made, it is copied). A
/// smaller run is copied into the arena, so that a lone datagram never holds a whole
/// slot.
struct ReadBuffers {
    slots: Vec<ReadSlot>,
    meta: Vec<RecvMeta>,
    /// Slots whose runs were handed on, oldest first, at most [`SPARE_SLOTS`].
    spent: VecDeque<ReadSlot>,
    arena: Arena,
}

/// The smallest run handed on in its slot rather than copied (16 KiB, a quarter of a
/// slot): a datagram kept (in a mailbox) holds at most four times its run's bytes.
const TAKEN_RUN_BYTES: usize = 16 << 10;

/// Spent slots kept for reuse (made as load needs them, at most 4 MiB). A slot is
/// reused once the session has handled its datagrams; under load the reader's stream
/// runs up to 16 reads, each of several runs, before the session's turn: with four TCP
/// streams through one session, 16 or 32 spent slots were all held at times (the
/// reader copied or made and zeroed slots, 2-4 % of its samples), 64 were not
/// (bench/results/read-slots-2026-12-08.txt). While this many are spent and all held,
/// large runs are copied like small ones.
const SPARE_SLOTS: usize = 64;

impl ReadBuffers {
    fn new() -> Self {
        ReadBuffers {
            slots: (0..READ_SLOTS).map(|_| ReadSlot::new()).collect(),
            meta: vec![RecvMeta::default(); READ_SLOTS],
            spent: VecDeque::with_capacity(SPARE_SLOTS),
            arena: Arena::new(),
        }
    }

    /// How many runs can be handed on in their slots now: the spent slots whose
    /// datagrams are all gone (made whole here), and those that may still be made.
    fn free_slots(&mut self) -> usize {
        let renewed = self
            .spent
            .iter_mut()
            .map(ReadSlot::renew)
            .filter(|&r| r)
            .count();
        renewed + SPARE_SLOTS.saturating_sub(self.spent.len())
    }

    /// Hands on slot `i`'s first `len` bytes where they were written, and puts a whole
    /// slot in its place: a spent one whose datagrams are all gone, else a new one while
    /// fewer than [`SPARE_SLOTS`] are spent. With that many spent and every one still
    /// held (the session behind the reader), `None`: the run is copied instead, which
    /// costs less than making and zeroing a slot.
    fn take(&mut self, i: usize, len: usize) -> Option<BytesMut> {
        let fresh = match self.spent.iter_mut().position(ReadSlot::renew) {
            Some(at) => self.spent.remove(at)?,
            None if self.spent.len() < SPARE_SLOTS => ReadSlot::new(),
            None => return None,
        };
        let mut slot = std::mem::replace(&mut self.slots[i], fresh);
        let run = slot.take(len);
        self.spent.push_back(slot);
        Some(run)
    }
}

/// The datagrams of small runs are copied into one buffer and handed on as views of
/// it, reused whole once every view of it has been dropped, instead of one allocation
/// per datagram: under a TCP flow through the tunnel the allocator's share of the
/// receiving side's CPU samples went from 7 % to 2 %
/// (bench/results/read-arena-2026-12-07.txt; large runs have since been handed on in
/// their slots, [`ReadBuffers`]).
struct Arena {
    buffer: BytesMut,
}

/// What an [`Arena`] holds at least: some hundred full-size datagrams, small enough to
/// stay in the cache between reads. A datagram kept long (in a full mailbox) keeps the
/// buffer it is part of, and the arena takes a new one; what waits longer than a
/// mailbox turn (a handshake in the handshake queue, a datagram waiting for a cluster
/// handover) is copied out first.
const ARENA_BYTES: usize = 256 << 10;

impl Arena {
    fn new() -> Self {
        Arena {
            buffer: BytesMut::with_capacity(ARENA_BYTES),
        }
    }

    /// Makes room for `bytes`: the room left, or the same buffer again if nothing else
    /// holds a part of it and it is large enough, else a new one (of `bytes` if that is
    /// more than [`ARENA_BYTES`]: the arena grows to the most one read copies, at most
    /// [`READ_SLOTS`] × [`SLOT_BYTES`]).
    fn make_room(&mut self, bytes: usize) {
        if self.buffer.capacity() - self.buffer.len() < bytes && !self.buffer.try_reclaim(bytes) {
            self.buffer = BytesMut::with_capacity(bytes.max(ARENA_BYTES));
        }
    }

    /// Copies `run` (the datagrams of one sender the kernel coalesced, each `stride`
    /// bytes, the last one shorter; one datagram without GRO) in and hands on each
    /// datagram as a view of its own.
    fn split_run(
        &mut self,
        from: SocketAddr,
        run: &[u8],
        stride: usize,
        batch: &mut Vec<Incoming>,
    ) {
        self.make_room(run.len());
        self.buffer.extend_from_slice(run);
        split_datagrams(from, self.buffer.split(), stride, batch);
    }
}

/// Hands on each datagram of `run` (each `stride` bytes, the last one shorter) as a
/// view of its own.
fn split_datagrams(from: SocketAddr, mut run: BytesMut, stride: usize, batch: &mut Vec<Incoming>) {
    let stride = stride.max(1);
    while run.len() > stride {
        batch.push((from, run.split_to(stride)));
    }
    if !run.is_empty() {
        batch.push((from, run));
    }
}

/// Waits until the socket is readable, then reads what is there (one recvmmsg): each
/// large run handed on in its slot while whole slots can take their places, every
/// other run copied into the [`Arena`] ([`ReadBuffers`]).
///
/// It wakes for datagrams and for errors: an ICMP error on a connected socket (port or
/// host unreachable) makes it erroneous, not readable, and is read at once.
///
/// The socket stays registered for writability too, though no send waits for room: the
/// readiness a send brings back keeps the loop turning under load. Without it (tried, with
/// a reader that also stopped asking after a short read) one TCP stream through the
/// tunnel averaged a fifth less in interleaved runs on a 2-core machine (within that
/// machine's wide run-to-run spread: a suggestion, not a proof), its threads sleeping
/// and being woken more often (spec/runtime.md, Wakeups).
async fn read_batch(socket: &UdpSocket, sender: &UdpSender, bufs: &mut ReadBuffers) -> Read {
    let read = socket
        .async_io(Interest::READABLE | Interest::ERROR, || {
            let mut slices: Vec<IoSliceMut<'_>> = bufs
                .slots
                .iter_mut()
                .map(|s| IoSliceMut::new(s.room()))
                .collect();
            sender
                .state
                .recv(UdpSockRef::from(socket), &mut slices, &mut bufs.meta)
        })
        .await;
    let n = match read {
        Ok(n) => n,
        Err(error) => {
            return Read {
                batch: Vec::new(),
                error: Some(error),
            }
        }
    };
    let n = n.min(READ_SLOTS);
    let mut batch = Vec::with_capacity(n);
    // Which runs stay in their slots: the large ones, as far as whole slots can take
    // their places; the rest are copied, into one arena sized for them all. A read of
    // small runs only (a ping) leaves the spent slots untouched.
    let large = |m: &RecvMeta| m.len >= TAKEN_RUN_BYTES;
    let mut free = if bufs.meta.iter().take(n).any(large) {
        bufs.free_slots()
    } else {
        0
    };
    let mut taken = [false; READ_SLOTS];
    let mut copied = 0;
    for (i, meta) in bufs.meta.iter().take(n).enumerate() {
        let len = meta.len.min(SLOT_BYTES);
        if large(meta) && free > 0 {
            free -= 1;
            taken[i] = true;
        } else {
            copied += len;
        }
    }
    bufs.arena.make_room(copied);
    for (i, &take) in taken.iter().enumerate().take(n) {
        let RecvMeta {
            addr, len, stride, ..
        } = bufs.meta[i];
        let len = len.min(SLOT_BYTES);
        match take.then(|| bufs.take(i, len)).flatten() {
            Some(run) => split_datagrams(addr, run, stride, &mut batch),
            None => {
                let run = &bufs.slots[i].room()[..len];
                bufs.arena.split_run(addr, run, stride, &mut batch);
            }
        }
    }
    Read { batch, error: None }
}

impl Actor for UdpTransport {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.closed {
            return;
        }
        if let Some(std) = self.unregistered.take() {
            match UdpSocket::from_std(std) {
                Ok(s) => self.socket = Some(Arc::new(s)),
                Err(_) => telemetry::dropped("transport_unregistered"),
            }
        }
        // Without a reactor registration nothing can be read; sends still work.
        let Some(socket) = self.socket.clone() else {
            self.closed = true;
            return;
        };
        let sender = Arc::clone(&self.udp);
        let reads = futures_util::stream::unfold(
            (socket, sender, ReadBuffers::new()),
            |(socket, sender, mut bufs)| async move {
                let read = read_batch(&socket, &sender, &mut bufs).await;
                Some((read, (socket, sender, bufs)))
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
    fn handle(&mut self, read: Read, _ctx: &mut Context<Self>) {
        if self.closed {
            return;
        }
        let sender = &self.udp;
        if !read.batch.is_empty() {
            if sender.failing.swap(false, Ordering::Relaxed) {
                self.deliver.signal(&self.handle, Signal::Recovered);
            }
            let bytes = read.batch.iter().map(|(_, d)| d.len()).sum();
            self.received.record(read.batch.len(), bytes);
            self.deliver.datagrams(&self.handle, read.batch);
        }
        if let Some(e) = read.error {
            // A connected socket reports an earlier ICMP port/host unreachable as a
            // receive error; anything else is transient on UDP and only counted.
            match e.kind() {
                io::ErrorKind::ConnectionRefused | io::ErrorKind::HostUnreachable => {
                    // Once per change of state: repeated ICMP errors add no messages.
                    if !sender.failing.swap(true, Ordering::Relaxed) {
                        self.deliver.signal(&self.handle, Signal::Unreachable);
                    }
                }
                _ => telemetry::dropped("receive_error"),
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {
        // The read stream never ends by itself.
    }
}

impl Handler<Close> for UdpTransport {
    type Result = ();

    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        // It stops reading and ends once the last holder of its address lets go (a
        // supervised actor that merely stopped would be restarted).
        self.closed = true;
        if let Some(reading) = self.reading.take() {
            ctx.cancel_future(reading);
        }
        self.socket = None;
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
        fn datagrams(&self, _: &TransportHandle, _: Vec<Incoming>) {}
        fn signal(&self, _: &TransportHandle, _: Signal) {}
    }

    /// Counts the datagrams it is handed, and passes the signals on.
    struct Collect(
        tokio::sync::mpsc::UnboundedSender<usize>,
        Option<tokio::sync::mpsc::UnboundedSender<Signal>>,
    );

    impl Deliver for Collect {
        fn datagrams(&self, _: &TransportHandle, batch: Vec<Incoming>) {
            let _ = self.0.send(batch.len());
        }
        fn signal(&self, _: &TransportHandle, signal: Signal) {
            if let Some(signals) = &self.1 {
                let _ = signals.send(signal);
            }
        }
    }

    #[test]
    fn a_coalesced_run_is_handed_on_as_its_datagrams_each_writable_alone() {
        let from: SocketAddr = "10.0.0.1:5".parse().unwrap_or_else(|_| unreachable!());
        let run: Vec<u8> = (0..250u8).collect();
        let mut arena = Arena::new();
        for (stride, want) in [
            (100, vec![100, 100, 50]),
            (250, vec![250]),
            (50, vec![50; 5]),
            (400, vec![250]),
        ] {
            let mut batch = Vec::new();
            arena.split_run(from, &run, stride, &mut batch);
            let lens: Vec<usize> = batch.iter().map(|(_, d)| d.len()).collect();
            assert_eq!(lens, want, "stride {stride}");
            // Each datagram is its own bytes of the run, and writing one (opening in
            // place) leaves the others as they were.
            batch[0].1.fill(0xff);
            let mut at = batch[0].1.len();
            for (addr, d) in &batch[1..] {
                assert_eq!(*addr, from);
                assert_eq!(&d[..], &run[at..at + d.len()]);
                at += d.len();
            }
        }
        let mut batch = Vec::new();
        arena.split_run(from, &[], 100, &mut batch);
        assert!(batch.is_empty());
    }

    #[test]
    fn the_arena_is_reused_once_its_datagrams_are_dropped_and_never_overwrites_a_kept_one() {
        let from: SocketAddr = "10.0.0.1:5".parse().unwrap_or_else(|_| unreachable!());
        let mut arena = Arena::new();
        let start = arena.buffer.as_ptr();
        let fill = |arena: &mut Arena, byte: u8| {
            let mut batch = Vec::new();
            arena.make_room(ARENA_BYTES);
            arena.split_run(from, &vec![byte; ARENA_BYTES], 1_000, &mut batch);
            batch
        };
        // A read that fills the arena, handled and dropped: the next read reuses it.
        drop(fill(&mut arena, 1));
        let second = fill(&mut arena, 2);
        assert_eq!(second[0].1.as_ptr(), start, "the same buffer again");
        // One datagram of it kept (say, in a mailbox): the next read takes a new buffer
        // and the kept datagram keeps its bytes.
        let kept = second.into_iter().next().map(|(_, d)| d);
        let third = fill(&mut arena, 3);
        assert_ne!(third[0].1.as_ptr(), start);
        assert!(kept.is_some_and(|d| d.iter().all(|&b| b == 2)));
        assert!(third.iter().all(|(_, d)| d.iter().all(|&b| b == 3)));
    }

    /// A handle is the same as its clones and no other, even one on the same address.
    #[test]
    fn a_handle_is_the_same_as_its_clones_only() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        let other = socket.try_clone().expect("clone of the socket");
        let handle = PreparedUdp::new(socket, 0).expect("prepared").handle();
        let another = PreparedUdp::new(other, 0).expect("prepared").handle();
        assert!(handle.same(&handle.clone()));
        assert_eq!(handle.local(), another.local());
        assert!(!handle.same(&another));
    }

    /// A large run goes on in its slot; the slot is used again once its datagrams are
    /// dropped, never while one lives; with the spent slots all held, a run is left in
    /// its slot to be copied, and no slot is made.
    #[test]
    fn a_large_run_is_handed_on_in_its_slot_which_is_reused_only_once_its_datagrams_are_gone() {
        let mut bufs = ReadBuffers::new();
        let len = TAKEN_RUN_BYTES;
        let read = |bufs: &mut ReadBuffers, byte: u8| -> Option<BytesMut> {
            let room = bufs.slots[0].room();
            room[..len].fill(byte);
            let at = room.as_ptr();
            let run = bufs.take(0, len)?;
            assert_eq!(run.as_ptr(), at, "handed on where it was written");
            assert!(run.iter().all(|&b| b == byte));
            Some(run)
        };
        let first = read(&mut bufs, 1).expect("a slot");
        let first_at = first.as_ptr();
        assert_eq!(
            bufs.slots[0].room().len(),
            SLOT_BYTES,
            "a whole slot in its place"
        );
        drop(first);
        // The next large run takes the slot put in its place, and the first one, its
        // datagrams gone, is put back in its memory: the run after is read into it.
        let second = read(&mut bufs, 2).expect("a slot");
        assert_ne!(second.as_ptr(), first_at);
        let third = read(&mut bufs, 4).expect("a slot");
        assert_eq!(third.as_ptr(), first_at);
        drop(third);
        // Runs kept (in mailboxes): each read takes another slot, none written while a
        // datagram of it lives, until SPARE_SLOTS are spent (the second run's among
        // them); then the run stays in its slot, to be copied.
        let mut kept = Vec::new();
        while let Some(run) = read(&mut bufs, 10 + kept.len() as u8) {
            kept.push(run);
            assert!(kept.len() < SPARE_SLOTS, "spent slots beyond the bound");
        }
        assert_eq!(kept.len(), SPARE_SLOTS - 1);
        assert_eq!(bufs.spent.len(), SPARE_SLOTS);
        assert_eq!(bufs.free_slots(), 0, "a read copies its large runs now");
        let left = bufs.slots[0].room();
        assert_eq!(left.len(), SLOT_BYTES, "the slot stays whole in its place");
        assert!(left[..len].iter().all(|&b| b == 10 + kept.len() as u8));
        assert!(second.iter().all(|&b| b == 2));
        for (i, run) in kept.iter().enumerate() {
            assert!(run.iter().all(|&b| b == 10 + i as u8), "run {i}");
        }
        // Once they are let go, the spent slots are read into again, as they were left
        // (a new slot would be zeroed): after the slot in place, every read finds one.
        drop(kept);
        drop(second);
        assert_eq!(bufs.free_slots(), SPARE_SLOTS);
        assert!(read(&mut bufs, 3).is_some());
        for _ in 1..SPARE_SLOTS {
            assert_ne!(bufs.slots[0].room()[0], 0, "a spent slot, not a new one");
            assert!(read(&mut bufs, 3).is_some());
        }
        assert_eq!(bufs.spent.len(), SPARE_SLOTS);
    }

    /// Hands on the datagrams themselves.
    struct Keep(tokio::sync::mpsc::UnboundedSender<Vec<BytesMut>>);

    impl Deliver for Keep {
        fn datagrams(&self, _: &TransportHandle, batch: Vec<Incoming>) {
            let _ = self.0.send(batch.into_iter().map(|(_, d)| d).collect());
        }
        fn signal(&self, _: &TransportHandle, _: Signal) {}
    }

    /// Batches sent in one go, each a GSO run the receiving socket takes as one GRO run
    /// on this loopback, arrive as the datagrams they hold, and the datagrams of earlier
    /// reads, still held, keep their bytes while later reads come in. Half the rounds
    /// are held to the end: the last of them find every spent slot held and are copied
    /// (ReadBuffers::take), the others stay in their slots. Where the kernel has no UDP
    /// GSO or GRO neither happens, and the test says so and stops.
    #[actix_rt::test]
    async fn datagrams_of_large_runs_keep_their_bytes_while_later_reads_come_in() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        let to = socket.local_addr().expect("addr");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _reader = PreparedUdp::new(socket, 0)
            .expect("prepared")
            .start(Arc::new(Keep(tx)));
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer");
        let offload = UdpSocketState::new(UdpSockRef::from(&peer)).expect("state");
        if offload.max_gso_segments() < 40 || offload.gro_segments() < 40 {
            eprintln!("skipped: this kernel offers no UDP GSO or GRO of 40 segments");
            return;
        }
        let sender = PreparedUdp::new(peer, 0).expect("prepared").handle();
        let datagram = |round: usize, i: usize| -> Vec<u8> {
            (0..1_200).map(|k| (round * 31 + i * 7 + k) as u8).collect()
        };
        let mut held: Vec<(usize, Vec<BytesMut>)> = Vec::new();
        for round in 0..2 * SPARE_SLOTS {
            let mut batch = Batch::default();
            for i in 0..40 {
                let appended: Result<(), ()> = batch.append(|out| {
                    out.extend_from_slice(&datagram(round, i));
                    Ok(())
                });
                assert!(appended.is_ok());
            }
            assert_eq!(sender.send_batch(to, &batch), Sent::Ok);
            // One read of one run: 48 000 bytes.
            let got = match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(d)) => d,
                _ => panic!("round {round}: no datagrams"),
            };
            assert_eq!(got.len(), 40, "round {round}: one read of the whole run");
            // Every second round is let go at once, the others held to the end.
            if round % 2 == 0 {
                held.push((round, got));
            } else {
                for (i, d) in got.iter().enumerate() {
                    assert_eq!(&d[..], &datagram(round, i)[..], "round {round}, {i}");
                }
            }
        }
        for (round, got) in &held {
            for (i, d) in got.iter().enumerate() {
                assert_eq!(&d[..], &datagram(*round, i)[..], "held round {round}, {i}");
            }
        }
    }

    /// An ICMP port unreachable makes a connected socket erroneous, not readable: the
    /// reader wakes for it all the same and reports the path unreachable, with nothing
    /// more sent or received.
    #[actix_rt::test]
    async fn an_unreachable_port_is_reported_without_waiting_for_more_traffic() {
        let closed = {
            let gone = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
            gone.local_addr().expect("addr")
        };
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        socket.connect(closed).expect("connect");
        let (tx, _datagrams) = tokio::sync::mpsc::unbounded_channel();
        let (signals_tx, mut signals) = tokio::sync::mpsc::unbounded_channel();
        let prepared = PreparedUdp::new(socket, 0).expect("prepared");
        let handle = prepared.handle();
        let _reader = prepared.start(Arc::new(Collect(tx, Some(signals_tx))));
        // Let the reader start and wait on its socket before the error comes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(handle.send(closed, b"anyone?"), Sent::Ok);
        let signal = tokio::time::timeout(Duration::from_secs(2), signals.recv()).await;
        assert_eq!(signal, Ok(Some(Signal::Unreachable)));
    }

    /// Datagrams counted until `want` or two quiet seconds.
    async fn take(rx: &mut tokio::sync::mpsc::UnboundedReceiver<usize>, want: usize) -> usize {
        let mut got = 0;
        while got < want {
            match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(n)) => got += n,
                _ => break,
            }
        }
        got
    }

    /// A datagram larger than the path takes is refused as too big, not as a failing
    /// path (the next send is plain `Ok`, not `Recovered`); what the path takes is asked
    /// of the kernel, of the socket itself when it is connected (a client's) and of a
    /// probe connected to the peer when it is not (a gateway's), with the same answer:
    /// the loopback's MTU (at most 65 535, the largest IPv4 datagram) less the IPv4 and
    /// UDP headers and a session packet's 36 bytes.
    #[test]
    fn a_datagram_too_large_is_refused_as_too_big_and_the_kernel_says_what_fits() {
        let lo = std::fs::read_to_string("/sys/class/net/lo/mtu").expect("loopback MTU");
        let lo = lo.trim().parse::<usize>().expect("a number").min(65_535);
        for connected in [false, true] {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
            let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer");
            let to = peer.local_addr().expect("addr");
            if connected {
                socket.connect(to).expect("connect");
            }
            let handle = PreparedUdp::new(socket, 0).expect("prepared").handle();
            assert_eq!(
                handle.path_room(to),
                Some(lo - 28 - 36),
                "connected {connected}"
            );
            // Larger than any IPv4 datagram, and than the loopback's MTU.
            let huge = vec![0u8; lo.max(65_508)];
            assert_eq!(
                handle.send(to, &huge),
                Sent::TooBig,
                "connected {connected}"
            );
            assert_eq!(
                handle.send(to, &[1; 100]),
                Sent::Ok,
                "connected {connected}"
            );
            assert_eq!(handle.packet_room(), None, "UDP names no room of its own");
        }
    }

    /// A datagram sent after the reader drained its socket arrives, each time; a burst
    /// larger than one read (queued before the reader runs: nothing here yields while
    /// sending) arrives whole, over several reads.
    #[actix_rt::test]
    async fn every_datagram_arrives_alone_after_a_drained_read_or_in_a_burst() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        let to = socket.local_addr().expect("addr");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _reader = PreparedUdp::new(socket, 0)
            .expect("prepared")
            .start(Arc::new(Collect(tx, None)));
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("peer");
        for round in 0..5u8 {
            peer.send_to(&[round; 100], to).expect("send");
            assert_eq!(take(&mut rx, 1).await, 1, "round {round}");
        }
        let burst = 3 * READ_SLOTS + 5;
        for i in 0..burst {
            peer.send_to(&[i as u8; 100], to).expect("send");
        }
        assert_eq!(take(&mut rx, burst).await, burst);
    }

    /// A session sends a whole batch in one go: full-sized datagrams and a shorter last
    /// one, then one longer again (which must start a new GSO run). Every datagram
    /// arrives whole and in order.
    #[actix_rt::test]
    async fn a_batch_of_mixed_sizes_arrives_as_the_datagrams_it_holds() {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("socket");
        let local = socket.local_addr().expect("addr");
        let peer = UdpSocket::bind("127.0.0.1:0").await.expect("peer");
        let to = peer.local_addr().expect("addr");
        let prepared = PreparedUdp::new(socket, 0).expect("prepared");
        let handle = prepared.handle();
        let _reader = prepared.start(Arc::new(Nowhere));
        let sizes: Vec<usize> = (0..70).map(|i| if i == 40 { 100 } else { 1_200 }).collect();
        let mut batch = Batch::default();
        for (i, n) in sizes.iter().enumerate() {
            let datagram = vec![i as u8; *n];
            let appended: Result<(), ()> = batch.append(|out| {
                out.extend_from_slice(&datagram);
                Ok(())
            });
            assert!(appended.is_ok());
        }
        assert_eq!(handle.send_batch(to, &batch), Sent::Ok);
        let mut buf = [0u8; 2_000];
        for (i, n) in sizes.iter().enumerate() {
            let (len, from) =
                tokio::time::timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
                    .await
                    .expect("datagram in time")
                    .expect("datagram");
            assert_eq!(
                (len, from, buf[0], buf[len - 1]),
                (*n, local, i as u8, i as u8)
            );
        }
    }
}
