//! The system calls no safe wrapper offers: opening a queue of a multi-queue TUN device
//! (TUNSETIFF), turning on a TUN device's segmentation offload (TUNSETOFFLOAD), a gathered write (the virtio-net header and the packet in
//! one writev, without copying the packet), giving the device an IPv6 address (the
//! `tun` crate addresses it through an IPv4 socket only), disconnecting a UDP socket, and
//! sending a raw Ethernet frame (a gratuitous ARP), reading a socket's path MTU. The only unsafe code of the crate;
//! each block states why it is sound.

use std::io::{self, IoSlice};
use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::libc;
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

/// The kernel may hand the reader packets whose checksum is partial.
pub const TUN_F_CSUM: u32 = 0x01;
/// ... TCP over IPv4 super-packets.
pub const TUN_F_TSO4: u32 = 0x02;
/// ... TCP over IPv6 super-packets.
pub const TUN_F_TSO6: u32 = 0x04;
/// ... super-packets carrying ECN.
pub const TUN_F_TSO_ECN: u32 = 0x08;

nix::ioctl_write_int!(tun_set_offload, b'T', 208);
nix::ioctl_readwrite_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    libc::ifreq
);

/// IFF_TUN_EXCL (linux/if_tun.h; not in libc): creating the device fails (EBUSY) if one
/// of that name exists.
const IFF_TUN_EXCL: libc::c_int = 0x8000;

/// `IFF_TUN | IFF_NO_PI | IFF_VNET_HDR`: a layer-3 device, no packet-information prefix,
/// a virtio-net header before every packet.
const TUN_FLAGS: libc::c_int = libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Opens one queue of the TUN device `name`, with a virtio-net header on every packet.
/// The `first` creates the device and fails if one of that name exists (so a second
/// process cannot join a running one's device and take part of its traffic); the others
/// attach to it. With `multi_queue` every queue of the device must be opened so
/// (IFF_MULTI_QUEUE), and the kernel spreads the packets it sends over them by flow (see
/// [`crate::tun::KernelTun`]). The descriptor is non-blocking.
#[allow(unsafe_code)]
pub fn open_tun_queue(name: &str, multi_queue: bool, first: bool) -> io::Result<OwnedFd> {
    let bytes = name.as_bytes();
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of integers and
    // arrays) for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= request.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the interface name {name:?} must be 1 to {} bytes, without NUL",
                request.ifr_name.len() - 1
            ),
        ));
    }
    for (dst, src) in request.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let flags = TUN_FLAGS
        | if multi_queue {
            libc::IFF_MULTI_QUEUE
        } else {
            0
        }
        | if first { IFF_TUN_EXCL } else { 0 };
    request.ifr_ifru.ifru_flags = flags as libc::c_short;
    let fd = OwnedFd::from(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")?,
    );
    // SAFETY: TUNSETIFF reads and writes back one `struct ifreq`, which `request` is,
    // alive, initialized and borrowed mutably for the call; `fd` is the descriptor opened
    // above, owned here (a failed call leaves it to be closed by its drop).
    unsafe { tun_set_iff(fd.as_raw_fd(), &mut request) }.map_err(|e| {
        if e == nix::errno::Errno::EBUSY && first {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("a device named {name} exists already (another jvpn running?)"),
            )
        } else {
            io::Error::from(e)
        }
    })?;
    Ok(fd)
}
nix::ioctl_write_ptr_bad!(set_ipv6_address, libc::SIOCSIFADDR, libc::in6_ifreq);

/// Registers `file` for reading with the event loop of the calling thread (a tokio
/// runtime must be current).
#[allow(unsafe_code)]
pub fn register_reader(
    file: std::sync::Arc<std::fs::File>,
) -> io::Result<tokio::io::unix::AsyncFd<std::sync::Arc<std::fs::File>>> {
    // SAFETY: the registration holds a reference to the open file, so its descriptor
    // stays open and names the same file for the registration's whole life; a `File`'s
    // descriptor never changes.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(file, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// Asks the device open at `fd` for the offloads in `flags`.
#[allow(unsafe_code)]
pub fn set_offload(fd: RawFd, flags: u32) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int of flags); the
    // kernel reads nothing through it, and a descriptor that is not a TUN device fails
    // the call with an error, which is returned.
    unsafe { tun_set_offload(fd, nix::libc::c_ulong::from(flags)) }
        .map(|_| ())
        .map_err(io::Error::from)
}

/// Writes `parts` to `fd` as one packet (one writev).
#[allow(unsafe_code)]
pub fn write_gathered(fd: RawFd, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    // SAFETY: `fd` is the descriptor of a device the caller owns and keeps open for the
    // duration of the call (it is borrowed from the device object the caller holds).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    nix::sys::uio::writev(fd, parts).map_err(io::Error::from)
}

/// Adds `addr/prefix` to the interface `name` (SIOCSIFADDR on an IPv6 socket, as
/// `ip -6 addr add` does through its older path); the kernel adds the prefix route.
#[allow(unsafe_code)]
pub fn add_ipv6_address(name: &str, addr: Ipv6Addr, prefix: u8) -> io::Result<()> {
    let index = nix::net::if_::if_nametoindex(name)?;
    let request = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        ifr6_prefixlen: u32::from(prefix),
        ifr6_ifindex: libc::c_int::try_from(index)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
    };
    let control = socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one `struct in6_ifreq`, which
    // `request` is (libc's definition of it), alive and initialized for the call; the
    // kernel writes nothing back through the pointer.
    unsafe { set_ipv6_address(control.as_raw_fd(), &request) }
        .map(|_| ())
        .map_err(io::Error::from)
}

/// Sends one Ethernet frame of EtherType `ethertype` to `dst` (a MAC address) out of
/// the link `ifindex`, as is (a packet socket: the frame carries its own Ethernet
/// header). Needs CAP_NET_RAW, or CAP_NET_ADMIN in a namespace the process created.
#[allow(unsafe_code)]
pub fn send_frame(ifindex: u32, ethertype: u16, dst: [u8; 6], frame: &[u8]) -> io::Result<()> {
    let socket = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as libc::c_ushort,
        sll_protocol: ethertype.to_be(),
        sll_ifindex: libc::c_int::try_from(ifindex)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    addr.sll_addr[..6].copy_from_slice(&dst);
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: sendto reads `frame.len()` bytes at `frame`'s pointer and `len` bytes of a
    // `struct sockaddr_ll` at `addr`, both alive and initialized for the call; the
    // descriptor is the packet socket opened above and owned until this returns.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            len,
        )
    };
    if sent < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Disconnects the UDP socket `fd` (connect to AF_UNSPEC): it forgets its peer and,
/// unless bound to them explicitly, its source address and port, so that connecting it
/// elsewhere picks the source the new route gives (a connected socket keeps the first
/// one it got).
#[allow(unsafe_code)]
pub fn disconnect(fd: BorrowedFd<'_>) -> io::Result<()> {
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: connect reads `len` bytes of a `struct sockaddr` at the pointer, which is
    // `unspec`, alive and initialized for the call; `fd` is a descriptor the caller
    // borrows from a socket it keeps open.
    let r = unsafe { libc::connect(fd.as_raw_fd(), &unspec, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The path MTU the kernel knows for the peer of the connected socket `fd` (IP_MTU, or
/// IPV6_MTU for an IPv6 socket): the outgoing link's MTU, or less where an ICMP "too
/// big" taught it the path's. An unconnected socket fails (ENOTCONN).
#[allow(unsafe_code)]
pub fn path_mtu(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<usize> {
    let (level, name) = if ipv6 {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    } else {
        (libc::IPPROTO_IP, libc::IP_MTU)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: getsockopt writes at most `len` bytes (the size of a c_int) at the pointer,
    // which is `mtu`, alive and writable for the call, and the length back into `len`;
    // `fd` is a descriptor the caller borrows from a socket it keeps open.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}
