//! The two system calls on a TUN descriptor that no safe wrapper offers: turning on the
//! device's segmentation offload (TUNSETOFFLOAD) and a gathered write (the virtio-net
//! header and the packet in one writev, without copying the packet). The only unsafe
//! code of the crate; each block states why it is sound.

use std::io::{self, IoSlice};
use std::os::fd::{BorrowedFd, RawFd};

/// The kernel may hand the reader packets whose checksum is partial.
pub const TUN_F_CSUM: u32 = 0x01;
/// ... TCP over IPv4 super-packets.
pub const TUN_F_TSO4: u32 = 0x02;
/// ... TCP over IPv6 super-packets.
pub const TUN_F_TSO6: u32 = 0x04;
/// ... super-packets carrying ECN.
pub const TUN_F_TSO_ECN: u32 = 0x08;

nix::ioctl_write_int!(tun_set_offload, b'T', 208);

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
