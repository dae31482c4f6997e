//! The TUN device's reading: [`reads`], the stream of one queue's reads, and the
//! gateway's reader actor ([`TunActor`]), which hands what a queue reads to a router
//! ([`TunRoute`]) that spreads it over the sessions. The client has one session: its agent
//! reads the device itself. Writes take no actor hop: a session writes the packets it
//! opened to the shared device itself ([`TunDevice::write_batch`]; a write never waits).
//!
//! The device is a trait ([`TunDevice`]) so that actor tests run with a channel-backed
//! device ([`channel_device`]) and the binary with a real kernel TUN ([`KernelTun`]).

use std::cell::RefCell;
use std::future::Future;
use std::io::Read as _;
use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};

use std::pin::Pin;
use std::sync::Arc;
use tun::AbstractDevice;

use actix::prelude::*;
use bytes::Bytes;
use futures_util::{FutureExt, Stream};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, Mutex};

use jvpn_core::offload::{
    coalesce, segments, VnetHeader, MAX_COALESCED, VNET_HDR_DATA_VALID, VNET_HDR_LEN,
};
use jvpn_core::wire::{TunnelAddr, TunnelAddrs};

use crate::runtime::{ActorKind, Close};
use crate::sys::{self, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN};
use crate::telemetry;

/// The most queues the kernel gives one TUN device (MAX_TAP_QUEUES).
pub const MAX_QUEUES: usize = 256;

/// The most packets one wakeup reads before handing them on.
pub const READ_BATCH: usize = 64;

/// A packet device: the kernel's TUN or a stand-in.
pub trait TunDevice: Send + Sync + 'static {
    /// Waits for the next read of queue `queue` (below [`TunDevice::queues`]) and
    /// appends the packets it held to `out`: one packet, or the segments of a
    /// super-packet the device handed over whole. `space` is the reader's reused buffer
    /// space.
    fn recv<'a>(
        &'a self,
        queue: usize,
        space: &'a mut ReadSpace,
        out: &'a mut Vec<Bytes>,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;
    /// Writes one packet without waiting (a full device queue is an error, counted by
    /// the caller as a drop).
    fn write(&self, packet: &[u8]) -> io::Result<()>;
    /// Writes `packets` in order, as few writes as the device allows (the kernel's TUN
    /// takes a run of one TCP flow's segments as one); counts each refused write.
    fn write_batch(&self, packets: &[&[u8]]) {
        write_all(self, packets.iter().copied());
    }
    /// The largest packet the device carries.
    fn mtu(&self) -> usize;
    /// How many queues the device has, each read by a reader of its own.
    fn queues(&self) -> usize {
        1
    }
}

/// Where the TUN actor hands the packets it reads.
pub trait TunRoute: Send + Sync + 'static {
    /// Packets read in one wakeup, in order.
    fn packets(&self, batch: Vec<Bytes>);
}

/// Writes `packets` to `device`, counting each one the device refused (a full queue
/// drops, as a congested link would).
fn write_all<'p, D: TunDevice + ?Sized>(device: &D, packets: impl IntoIterator<Item = &'p [u8]>) {
    for packet in packets {
        if device.write(packet).is_err() {
            telemetry::dropped("tun_write_failed");
        }
    }
}

/// The TUN actor.
pub struct TunActor {
    device: Arc<dyn TunDevice>,
    /// The device queue this actor reads.
    queue: usize,
    route: Arc<dyn TunRoute>,
    reading: Option<SpawnHandle>,
    closed: bool,
}

impl TunActor {
    /// An actor reading queue `queue` of `device`. Start it on the thread whose
    /// sessions should write to that queue: they write to the queue read on their own
    /// thread.
    pub fn for_queue(device: Arc<dyn TunDevice>, queue: usize, route: Arc<dyn TunRoute>) -> Self {
        TunActor {
            device,
            queue,
            route,
            reading: None,
            closed: false,
        }
    }

    /// Starts the actor on the current thread, supervised (restarted on the same device
    /// if it stops).
    pub fn start_supervised(self) -> Addr<Self> {
        actix::Supervisor::start(move |_| self)
    }

    /// Starts the actor on `arbiter`, supervised.
    pub fn start_supervised_in(self, arbiter: &ArbiterHandle) -> Addr<Self> {
        actix::Supervisor::start_in_arbiter(arbiter, move |_| self)
    }
}

/// A reader's buffers, reused for every read: what the device reads into, and room to
/// build segments in.
#[derive(Debug, Default)]
pub struct ReadSpace {
    /// The read buffer (a device sizes it as it needs).
    pub buf: Vec<u8>,
    /// Scratch room.
    pub scratch: Vec<u8>,
}

/// What one wakeup of a queue's reader read.
pub struct TunRead(io::Result<Vec<Bytes>>);

impl TunRead {
    /// The packets read, in order; `None` when the read failed (counted here, as
    /// `tun_read_error`) or the device is gone (closed by its owner: nothing more comes).
    pub fn packets(self) -> Option<Vec<Bytes>> {
        match self.0 {
            Ok(batch) => Some(batch),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => None,
            Err(_) => {
                telemetry::dropped("tun_read_error");
                None
            }
        }
    }
}

/// How long a reader waits after a failed read before the next: an error that does not
/// go away is counted ten times a second, not spun on.
const READ_ERROR_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

async fn read_batch(device: &dyn TunDevice, queue: usize, space: &mut ReadSpace) -> TunRead {
    let mut batch = Vec::new();
    if let Err(e) = device.recv(queue, space, &mut batch).await {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            tokio::time::sleep(READ_ERROR_PAUSE).await;
        }
        return TunRead(Err(e));
    }
    // More packets already waiting join the batch; the first that is not ready ends it.
    while batch.len() < READ_BATCH {
        match device.recv(queue, space, &mut batch).now_or_never() {
            Some(Ok(())) => {}
            Some(Err(_)) | None => break,
        }
    }
    TunRead(Ok(batch))
}

/// The reads of queue `queue` of `device`, one item per wakeup. The stream ends after
/// the device reports end-of-file, so a closed device is not read again (a reader
/// restarted on it would spin on the end-of-file).
pub fn reads(device: Arc<dyn TunDevice>, queue: usize) -> impl Stream<Item = TunRead> + 'static {
    futures_util::stream::unfold(
        Some((device, ReadSpace::default())),
        move |state| async move {
            let (device, mut space) = state?;
            let read = read_batch(device.as_ref(), queue, &mut space).await;
            let eof = matches!(&read.0, Err(e) if e.kind() == io::ErrorKind::UnexpectedEof);
            Some((read, (!eof).then_some((device, space))))
        },
    )
}

impl Actor for TunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.closed {
            return;
        }
        // Sessions on this thread write to the queue read here.
        READ_QUEUE.set(self.queue);
        // After the device's end the actor stays up, reading nothing.
        self.reading = Some(ctx.add_stream(reads(Arc::clone(&self.device), self.queue)));
    }
}

impl Supervised for TunActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        telemetry::restarted(ActorKind::Tun);
    }
}

impl StreamHandler<TunRead> for TunActor {
    fn handle(&mut self, read: TunRead, _ctx: &mut Context<Self>) {
        if let Some(batch) = read.packets() {
            self.route.packets(batch);
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

impl Handler<Close> for TunActor {
    type Result = ();

    /// Stops reading; the device closes when the last holder of the actor's address
    /// lets go and the actor (and with it the device) is dropped.
    fn handle(&mut self, _: Close, ctx: &mut Context<Self>) {
        self.closed = true;
        if let Some(reading) = self.reading.take() {
            ctx.cancel_future(reading);
        }
    }
}

impl Handler<crate::runtime::Crash> for TunActor {
    type Result = ();

    fn handle(&mut self, _: crate::runtime::Crash, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// A stand-in device backed by channels: what the test pushes into `to_device` is read
/// as if the kernel had routed it into the tunnel; what the node writes comes out of
/// `from_device`.
pub struct ChannelDevice {
    inbound: Mutex<mpsc::Receiver<Bytes>>,
    outbound: mpsc::Sender<Bytes>,
    mtu: usize,
}

/// The test's side of a [`ChannelDevice`].
pub struct ChannelPeer {
    /// Packets to read from the device.
    pub to_device: mpsc::Sender<Bytes>,
    /// Packets the node wrote to the device.
    pub from_device: mpsc::Receiver<Bytes>,
}

/// A channel-backed device holding at most `capacity` packets each way.
pub fn channel_device(capacity: usize, mtu: usize) -> (ChannelDevice, ChannelPeer) {
    let (to_device, inbound) = mpsc::channel(capacity);
    let (outbound, from_device) = mpsc::channel(capacity);
    (
        ChannelDevice {
            inbound: Mutex::new(inbound),
            outbound,
            mtu,
        },
        ChannelPeer {
            to_device,
            from_device,
        },
    )
}

impl TunDevice for ChannelDevice {
    /// A channel device has one queue: `queue` is not looked at.
    fn recv<'a>(
        &'a self,
        _queue: usize,
        _space: &'a mut ReadSpace,
        out: &'a mut Vec<Bytes>,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let packet = self
                .inbound
                .lock()
                .await
                .recv()
                .await
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            out.push(packet);
            Ok(())
        })
    }

    fn write(&self, packet: &[u8]) -> io::Result<()> {
        self.outbound
            .try_send(Bytes::copy_from_slice(packet))
            .map_err(|_| io::Error::from(io::ErrorKind::WouldBlock))
    }

    fn mtu(&self) -> usize {
        self.mtu
    }
}

/// The kernel's TUN device (Linux), created and addressed by this process, with the
/// virtio-net header on every packet and TCP segmentation offload: the kernel hands the
/// reader whole TCP super-packets (up to 64 KiB), split into segments here
/// ([`jvpn_core::offload`]), so one read replaces dozens.
///
/// The device may have several queues (IFF_MULTI_QUEUE), one per thread that carries
/// sessions: queue `i` is read by the reader on thread `i`, and a session writes its
/// packets to the queue read on its own thread ([`READ_QUEUE`]). The kernel remembers
/// which queue a flow's packets were last written on and queues the flow's packets in
/// the other direction there (its flow table, by a symmetric hash of the addresses and
/// ports), so a reply comes back to the thread of the session that forwarded the
/// request: no wakeup of another thread on a round trip.
///
/// Each queue is registered for reading with the event loop of the thread that reads it,
/// at its first read: registered with another thread's, every packet would wake that
/// thread first, which would then wake the reader.
pub struct KernelTun {
    queues: Vec<Queue>,
    mtu: usize,
    offloads: bool,
}

/// One queue of the device: its descriptor (non-blocking) and, once read, its
/// registration with the reading thread's event loop.
struct Queue {
    file: Arc<std::fs::File>,
    reader: std::sync::OnceLock<AsyncFd<Arc<std::fs::File>>>,
}

thread_local! {
    /// The queue of the kernel device read on this thread (0 where none is): what a
    /// session on this thread writes to.
    static READ_QUEUE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The largest read: a 64 KiB super-packet and its virtio-net header.
const OFFLOAD_READ: usize = 65_535 + VNET_HDR_LEN;

/// Why a kernel TUN device could not be made: each step names what was refused. (The
/// kernel's error is part of the message, not a separate source, so that it is said
/// once.)
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The device itself could not be created.
    #[error("cannot create the TUN device {name} (root or CAP_NET_ADMIN and /dev/net/tun are needed): {cause}")]
    Create {
        /// The interface name asked for.
        name: String,
        /// What the kernel said.
        cause: tun::Error,
    },
    /// A tunnel address (or its prefix) was refused.
    #[error(
        "the TUN device {name} was created, but the address {address} was refused: {cause}{hint}"
    )]
    Address {
        /// The interface name.
        name: String,
        /// The address and its prefix.
        address: TunnelAddr,
        /// What the kernel said.
        cause: io::Error,
        /// Why, when the host is the reason (see [`ipv6_hint`]); read while the device
        /// still exists.
        hint: String,
    },
    /// The MTU was refused.
    #[error("the TUN device {name} was created, but the MTU {mtu} was refused: {cause}")]
    Mtu {
        /// The interface name.
        name: String,
        /// The MTU.
        mtu: u16,
        /// What the kernel said.
        cause: tun::Error,
    },
    /// The device could not be brought up.
    #[error("the TUN device {name} was created, but could not be brought up: {cause}")]
    Up {
        /// The interface name.
        name: String,
        /// What the kernel said.
        cause: tun::Error,
    },
}

/// What to add to a refused IPv6 address when the host is the reason: IPv6 turned off
/// on the device (or everywhere), or absent from the kernel.
fn ipv6_hint(name: &str, address: &TunnelAddr) -> String {
    if address.addr.is_ipv4() {
        return String::new();
    }
    let setting = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    match std::fs::read_to_string(&setting) {
        Ok(v) if v.trim() == "1" => format!(
            " (IPv6 is disabled on this host: {setting} is 1; see net.ipv6.conf.all.disable_ipv6 and net.ipv6.conf.default.disable_ipv6)"
        ),
        Ok(_) => String::new(),
        Err(_) if !std::path::Path::new("/proc/sys/net/ipv6").exists() => {
            " (this kernel has no IPv6)".into()
        }
        Err(_) => String::new(),
    }
}

/// How to create a kernel TUN device.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// The interface name (e.g. `jv0`).
    pub name: String,
    /// The local tunnel addresses: IPv4, IPv6 or both.
    pub addresses: TunnelAddrs,
    /// The MTU (at least 1 280 when the tunnel has an IPv6 address: the kernel turns
    /// IPv6 off on a smaller link).
    pub mtu: u16,
    /// How many queues the device has (at least 1; the gateway opens one per thread
    /// that carries sessions).
    pub queues: usize,
}

impl KernelTun {
    /// Creates, addresses and brings up the device, with its offloads. Needs
    /// CAP_NET_ADMIN. A kernel that refuses the offloads still gives a working device
    /// (packets then come one by one, with the same header before each). Each step that
    /// can be refused is its own error, naming the setting refused.
    pub fn create(config: &TunConfig) -> Result<KernelTun, TunError> {
        let name = config.name.clone();
        let count = config.queues.max(1);
        let created = |cause| TunError::Create {
            name: name.clone(),
            cause,
        };
        let mut queues = Vec::with_capacity(count);
        for i in 0..count {
            let fd =
                sys::open_tun_queue(&name, count > 1, i == 0).map_err(|e| created(e.into()))?;
            queues.push(Queue {
                file: Arc::new(std::fs::File::from(fd)),
                reader: std::sync::OnceLock::new(),
            });
        }
        // The device is configured by its name, through the `tun` crate's requests
        // (which borrow the first queue's descriptor and leave it open).
        let mut c = tun::Configuration::default();
        c.tun_name(&name)
            .raw_fd(queues.first().map_or(-1, |q| q.file.as_raw_fd()))
            .close_fd_on_drop(false);
        let mut device = tun::create(&c).map_err(created)?;
        // Without an IPv6 address the device carries no IPv6 at all (set before it is
        // up): the kernel's own (router solicitations, MLD) would only be dropped by the
        // peer as spoofed.
        if config.addresses.v6().is_none() {
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        }
        let refused = |address, cause| TunError::Address {
            name: name.clone(),
            address,
            cause,
            hint: ipv6_hint(&name, &address),
        };
        if let Some(v4) = config.addresses.v4() {
            device
                .set_address(v4.addr)
                .and_then(|()| device.set_netmask(prefix_mask(v4.addr, v4.prefix)))
                .map_err(|e| refused(v4, e.into()))?;
        }
        device.set_mtu(config.mtu).map_err(|cause| TunError::Mtu {
            name: name.clone(),
            mtu: config.mtu,
            cause,
        })?;
        device.enabled(true).map_err(|cause| TunError::Up {
            name: name.clone(),
            cause,
        })?;
        // IPv6 once the device is up (with its final MTU): the kernel keeps the address
        // and adds the prefix route, with no duplicate address detection on a TUN.
        if let Some(
            v6 @ TunnelAddr {
                addr: IpAddr::V6(addr),
                prefix,
            },
        ) = config.addresses.v6()
        {
            sys::add_ipv6_address(&name, addr, prefix).map_err(|e| refused(v6, e))?;
        }
        let flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        let offloads = sys::set_offload(device.as_raw_fd(), flags).is_ok();
        Ok(KernelTun {
            queues,
            mtu: usize::from(config.mtu),
            offloads,
        })
    }

    /// The queue this thread writes to: the one read here, else the first.
    fn write_queue(&self) -> RawFd {
        let i = READ_QUEUE.get();
        self.queues
            .get(i)
            .or(self.queues.first())
            .map_or(-1, |q| q.file.as_raw_fd())
    }

    /// Whether the kernel took the segmentation offload.
    pub fn offloads(&self) -> bool {
        self.offloads
    }
}

fn prefix_mask(address: IpAddr, prefix: u8) -> IpAddr {
    match address {
        IpAddr::V4(_) => {
            let bits = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::from(bits.to_be_bytes())
        }
        IpAddr::V6(_) => {
            let bits = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::from(bits.to_be_bytes())
        }
    }
}

impl TunDevice for KernelTun {
    fn recv<'a>(
        &'a self,
        queue: usize,
        space: &'a mut ReadSpace,
        out: &'a mut Vec<Bytes>,
    ) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
        Box::pin(async move {
            let q = self
                .queues
                .get(queue)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no such TUN queue"))?;
            // Registered by its first read, on the reading thread.
            let reader = match q.reader.get() {
                Some(r) => r,
                None => {
                    let r = sys::register_reader(Arc::clone(&q.file))?;
                    q.reader.get_or_init(|| r)
                }
            };
            space.buf.resize(OFFLOAD_READ, 0);
            let n = loop {
                let mut ready = reader.readable().await?;
                match ready.try_io(|file| file.get_ref().as_ref().read(&mut space.buf)) {
                    Ok(read) => break read?,
                    Err(_would_block) => continue,
                }
            };
            let read = space.buf.get(..n).unwrap_or_default();
            let split = VnetHeader::split(read).and_then(|(h, p)| {
                segments(&h, p, &mut space.scratch, |s| {
                    out.push(Bytes::copy_from_slice(s))
                })
            });
            if split.is_err() {
                telemetry::dropped("tun_offload_malformed");
            }
            Ok(())
        })
    }

    fn write(&self, packet: &[u8]) -> io::Result<()> {
        // The device's descriptor is non-blocking: a full queue fails at once.
        let parts = [IoSlice::new(&VNET_HDR_DATA_VALID), IoSlice::new(packet)];
        sys::write_gathered(self.write_queue(), &parts).map(|_| ())
    }

    fn write_batch(&self, packets: &[&[u8]]) {
        thread_local! {
            /// Where a run's headers are rebuilt: one per thread that writes (the
            /// arbiters).
            static HEAD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        let fd = self.write_queue();
        HEAD.with_borrow_mut(|head| {
            coalesce(packets, head, |parts| {
                let mut slices = [IoSlice::new(&[]); MAX_COALESCED + 1];
                for (slice, part) in slices.iter_mut().zip(parts) {
                    *slice = IoSlice::new(part);
                }
                // At most MAX_COALESCED + 1 parts (`coalesce`).
                let written = slices
                    .get(..parts.len())
                    .is_some_and(|gathered| sys::write_gathered(fd, gathered).is_ok());
                if !written {
                    telemetry::dropped("tun_write_failed");
                }
            });
        });
    }

    fn mtu(&self) -> usize {
        self.mtu
    }

    fn queues(&self) -> usize {
        self.queues.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_masks() {
        let v4 = IpAddr::from([10, 0, 0, 1]);
        assert_eq!(prefix_mask(v4, 24), IpAddr::from([255, 255, 255, 0]));
        assert_eq!(prefix_mask(v4, 32), IpAddr::from([255, 255, 255, 255]));
        assert_eq!(prefix_mask(v4, 0), IpAddr::from([0, 0, 0, 0]));
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(
            prefix_mask(v6, 64),
            "ffff:ffff:ffff:ffff::".parse::<IpAddr>().unwrap()
        );
    }
}
