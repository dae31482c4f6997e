//! The TUN device actor: reads IP packets from the device and hands them to a router
//! ([`TunRoute`]). Writes take no actor hop: a session writes the packets it opened to
//! the shared device itself ([`write_all`]; a write never waits).
//!
//! The device is a trait ([`TunDevice`]) so that actor tests run with a channel-backed
//! device ([`channel_device`]) and the binary with a real kernel TUN ([`KernelTun`]).

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{mpsc, Mutex};

use crate::runtime::{ActorKind, Close};
use crate::telemetry;

/// The most packets one wakeup reads before handing them on.
pub const READ_BATCH: usize = 64;

/// A packet device: the kernel's TUN or a stand-in.
pub trait TunDevice: Send + Sync + 'static {
    /// Waits for the next packet and copies it into `buf`; returns its length.
    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'a>>;
    /// Writes one packet without waiting (a full device queue is an error, counted by
    /// the caller as a drop).
    fn write(&self, packet: &[u8]) -> io::Result<()>;
    /// The largest packet the device carries.
    fn mtu(&self) -> usize;
}

/// Where the TUN actor hands the packets it reads.
pub trait TunRoute: Send + Sync + 'static {
    /// Packets read in one wakeup, in order.
    fn packets(&self, batch: Vec<Bytes>);
}

/// Writes `packets` to `device`, counting each one the device refused (a full queue
/// drops, as a congested link would).
pub fn write_all<'p>(device: &dyn TunDevice, packets: impl IntoIterator<Item = &'p [u8]>) {
    for packet in packets {
        if device.write(packet).is_err() {
            telemetry::dropped("tun_write_failed");
        }
    }
}

/// The TUN actor.
pub struct TunActor {
    device: Arc<dyn TunDevice>,
    route: Arc<dyn TunRoute>,
    reading: Option<SpawnHandle>,
    closed: bool,
}

impl TunActor {
    /// An actor over `device`, handing what it reads to `route`.
    pub fn new(device: Arc<dyn TunDevice>, route: Arc<dyn TunRoute>) -> Self {
        TunActor {
            device,
            route,
            reading: None,
            closed: false,
        }
    }

    /// Starts the actor, supervised (restarted on the same device if it stops).
    pub fn start_supervised(self) -> Addr<Self> {
        actix::Supervisor::start(move |_| self)
    }

    /// Like [`TunActor::start_supervised`], on `arbiter`.
    pub fn start_in(self, arbiter: &ArbiterHandle) -> Addr<Self> {
        actix::Supervisor::start_in_arbiter(arbiter, move |_| self)
    }
}

/// What one wakeup read.
struct Read(io::Result<Vec<Bytes>>);

async fn read_batch(device: &dyn TunDevice, buf: &mut [u8]) -> Read {
    let first = match device.recv(buf).await {
        Ok(n) => Bytes::copy_from_slice(&buf[..n]),
        Err(e) => return Read(Err(e)),
    };
    let mut batch = vec![first];
    // More packets already waiting join the batch; the first that is not ready ends it.
    while batch.len() < READ_BATCH {
        match device.recv(buf).now_or_never() {
            Some(Ok(n)) => batch.push(Bytes::copy_from_slice(&buf[..n])),
            Some(Err(_)) | None => break,
        }
    }
    Read(Ok(batch))
}

impl Actor for TunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.closed {
            return;
        }
        let device = Arc::clone(&self.device);
        let buf = vec![0u8; self.device.mtu().max(1_500) + 64];
        // The stream ends after the device reports end-of-file, so a closed device is
        // not read again (the actor stays up; restarting it would spin on the EOF).
        let reads = futures_util::stream::unfold(Some((device, buf)), |state| async move {
            let (device, mut buf) = state?;
            let read = read_batch(device.as_ref(), &mut buf).await;
            let eof = matches!(&read.0, Err(e) if e.kind() == io::ErrorKind::UnexpectedEof);
            Some((read, (!eof).then_some((device, buf))))
        });
        self.reading = Some(ctx.add_stream(reads));
    }
}

impl Supervised for TunActor {
    fn restarting(&mut self, _ctx: &mut Context<Self>) {
        telemetry::restarted(ActorKind::Tun);
    }
}

impl StreamHandler<Read> for TunActor {
    fn handle(&mut self, read: Read, _ctx: &mut Context<Self>) {
        match read.0 {
            Ok(batch) => self.route.packets(batch),
            // The device is gone (closed by its owner): nothing more will come.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(_) => telemetry::dropped("tun_read_error"),
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
    fn recv<'a>(
        &'a self,
        buf: &'a mut [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'a>> {
        Box::pin(async move {
            let packet = self
                .inbound
                .lock()
                .await
                .recv()
                .await
                .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
            let n = packet.len().min(buf.len());
            buf[..n].copy_from_slice(&packet[..n]);
            Ok(n)
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

/// The kernel's TUN device (Linux), created and addressed by this process.
pub struct KernelTun {
    device: tun::AsyncDevice,
    mtu: usize,
}

/// How to create a kernel TUN device.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// The interface name (e.g. `jv0`).
    pub name: String,
    /// The local tunnel address.
    pub address: IpAddr,
    /// Its prefix length.
    pub prefix: u8,
    /// The MTU.
    pub mtu: u16,
}

impl KernelTun {
    /// Creates, addresses and brings up the device. Needs CAP_NET_ADMIN.
    pub fn create(config: &TunConfig) -> Result<KernelTun, tun::Error> {
        let mut c = tun::Configuration::default();
        c.tun_name(&config.name)
            .address(config.address)
            .netmask(prefix_mask(config.address, config.prefix))
            .mtu(config.mtu)
            .up();
        let device = tun::create_as_async(&c)?;
        Ok(KernelTun {
            device,
            mtu: usize::from(config.mtu),
        })
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
        buf: &'a mut [u8],
    ) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'a>> {
        Box::pin(self.device.recv(buf))
    }

    fn write(&self, packet: &[u8]) -> io::Result<()> {
        // The device's descriptor is non-blocking: a full queue fails at once.
        (*self.device).send(packet).map(|_| ())
    }

    fn mtu(&self) -> usize {
        self.mtu
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
