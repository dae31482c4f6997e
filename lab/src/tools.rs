//! The lab tools (`jvpn-lab ...`) the end-to-end tests and the benchmarks run
//! tests inside network namespaces: a TCP transfer of a deterministic byte stream whose
//! every byte the receiver checks, reporting the throughput.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Byte `i` of the stream: a cheap pseudo-random sequence, so that a lost, duplicated or
/// reordered segment changes what the receiver sees at that offset.
fn pattern(i: u64) -> u8 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    (x >> 32) as u8
}

/// Accepts one connection on `listen`, reads exactly `bytes` bytes and checks each;
/// prints one JSON line with the result. Gives up after `timeout`.
pub fn tcp_sink(listen: SocketAddr, bytes: u64, timeout: Duration) -> Result<()> {
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    bail!("no connection within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.set_nonblocking(false)?;
    let started = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen: u64 = 0;
    while seen < bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("only {seen} of {bytes} bytes within {timeout:?}");
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf).context("read")?;
        if n == 0 {
            bail!("the sender closed after {seen} of {bytes} bytes");
        }
        for (k, b) in buf[..n].iter().enumerate() {
            let at = seen + k as u64;
            if *b != pattern(at) {
                bail!("byte {at} is wrong: the stream is corrupt");
            }
        }
        seen += n as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "ok": true,
            "bytes": seen,
            "seconds": secs,
            "mbit_per_s": (seen as f64 * 8.0 / 1e6) / secs.max(1e-9),
        })
    );
    Ok(())
}

/// Connects to `to` (retrying until `timeout`) and sends `bytes` bytes of the stream.
/// `pace`, if set, spreads the transfer over that long (for transfers across a jump).
pub fn tcp_source(
    to: SocketAddr,
    bytes: u64,
    timeout: Duration,
    pace: Option<Duration>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot connect to {to}")),
        }
    };
    stream.set_write_timeout(Some(timeout))?;
    let started = Instant::now();
    let chunk = 16 * 1024u64;
    let mut buf = vec![0u8; chunk as usize];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.min(bytes - sent);
        for (k, b) in buf[..n as usize].iter_mut().enumerate() {
            *b = pattern(sent + k as u64);
        }
        stream.write_all(&buf[..n as usize]).context("write")?;
        sent += n;
        if let Some(pace) = pace {
            let due = started + pace.mul_f64(sent as f64 / bytes as f64);
            let wait = due.saturating_duration_since(Instant::now());
            if Instant::now() + wait > deadline {
                bail!("the transfer would outlast {timeout:?}");
            }
            std::thread::sleep(wait);
        }
    }
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)?;
    // Wait for the receiver to close: everything was delivered.
    let _ = stream.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ));
    let _ = stream.read(&mut [0u8; 1]);
    Ok(())
}

/// Waits up to `timeout` for a UDP datagram to `port` whose first payload byte is
/// `first_byte`, seen on any interface of this network namespace (a packet socket: the
/// datagram still reaches its socket); prints its payload as hex.
pub fn capture(port: u16, first_byte: u8, timeout: Duration) -> Result<()> {
    use socket2::{Domain, Protocol, Socket, Type};
    const ETH_P_IP: u16 = 0x0800;
    let socket = Socket::new(
        Domain::PACKET,
        Type::DGRAM,
        Some(Protocol::from(i32::from(ETH_P_IP.to_be()))),
    )
    .context("cannot open a packet socket (root is needed)")?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no such datagram within {timeout:?}");
        }
        socket.set_read_timeout(Some(left))?;
        let n = match (&socket).read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(payload) = udp_payload(&buf[..n], port) {
            if payload.first() == Some(&first_byte) {
                println!("{}", hex(payload));
                return Ok(());
            }
        }
    }
}

/// The payload of an IPv4 UDP packet to `port`.
fn udp_payload(packet: &[u8], port: u16) -> Option<&[u8]> {
    let version_ihl = *packet.first()?;
    if version_ihl >> 4 != 4 || *packet.get(9)? != 17 {
        return None;
    }
    let ihl = usize::from(version_ihl & 0x0f) * 4;
    let udp = packet.get(ihl..)?;
    let dst = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let len = usize::from(u16::from_be_bytes([*udp.get(4)?, *udp.get(5)?]));
    (dst == port).then_some(())?;
    udp.get(8..len.max(8))
}

/// What one packet seen on an outside interface is, for the leak watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A UDP datagram to or from the transport port: the VPN's own.
    Transport,
    /// The link's own control traffic: IPv6 link-local or multicast, IPv4 multicast
    /// or broadcast (neighbour discovery, MLD), not anyone's payload.
    Link,
    /// Anything else: traffic that went around the tunnel ("proto src -> dst").
    Leak(String),
    /// Not an IP packet (ARP) or too short to read.
    NotIp,
}

/// Classifies an IP packet (no link-layer header).
pub fn classify(packet: &[u8], transport_port: u16) -> Seen {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let (src, dst, proto, l4): (IpAddr, IpAddr, u8, usize) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let a = |at: usize| {
                Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3])
            };
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            (a(12).into(), a(16).into(), packet[9], ihl)
        }
        Some(6) if packet.len() >= 40 => {
            let a = |at: usize| {
                let b: [u8; 16] = packet[at..at + 16].try_into().unwrap_or([0; 16]);
                Ipv6Addr::from(b)
            };
            (a(8).into(), a(24).into(), packet[6], 40)
        }
        _ => return Seen::NotIp,
    };
    let link_only = |a: IpAddr| match a {
        IpAddr::V4(a) => a.is_multicast() || a.is_broadcast(),
        IpAddr::V6(a) => a.is_multicast() || a.is_unicast_link_local() || a.is_unspecified(),
    };
    if link_only(src) || link_only(dst) {
        return Seen::Link;
    }
    let ports = packet.get(l4..l4 + 4).map(|p| {
        (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        )
    });
    if proto == 17 && ports.is_some_and(|(s, d)| s == transport_port || d == transport_port) {
        return Seen::Transport;
    }
    Seen::Leak(format!("proto {proto} {src} -> {dst}"))
}

/// Watches the interfaces `links` of this network namespace for `duration` (a packet
/// socket sees both directions) and prints one JSON line: how many of the packets that
/// crossed them were the transport's own, how many leaked around the tunnel, and up to
/// 8 examples of the leaks.
pub fn watch_leaks(links: &[String], transport_port: u16, duration: Duration) -> Result<()> {
    use nix::sys::socket::{
        recvfrom, setsockopt, socket, sockopt, AddressFamily, LinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    use std::os::fd::AsRawFd;
    let mut indexes = Vec::new();
    for link in links {
        let index = nix::net::if_::if_nametoindex(link.as_str())
            .with_context(|| format!("no interface {link:?} here"))?;
        indexes.push(index as usize);
    }
    let socket = socket(
        AddressFamily::Packet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .context("cannot open a packet socket (root is needed)")?;
    let deadline = Instant::now() + duration;
    let mut buf = vec![0u8; 65_536];
    let (mut transport, mut leaks, mut examples) = (0u64, 0u64, Vec::new());
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let timeout = nix::sys::time::TimeVal::new(
            left.as_secs() as i64,
            left.subsec_micros().max(1) as nix::libc::suseconds_t,
        );
        setsockopt(&socket, sockopt::ReceiveTimeout, &timeout)?;
        let (n, from) = match recvfrom::<LinkAddr>(socket.as_raw_fd(), &mut buf) {
            Ok(got) => got,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        if !from.is_some_and(|f| indexes.contains(&f.ifindex())) {
            continue;
        }
        match classify(&buf[..n], transport_port) {
            Seen::Transport => transport += 1,
            Seen::Leak(what) => {
                leaks += 1;
                if examples.len() < 8 {
                    examples.push(what);
                }
            }
            Seen::Link | Seen::NotIp => {}
        }
    }
    println!(
        "{}",
        serde_json::json!({"transport": transport, "leaks": leaks, "examples": examples})
    );
    Ok(())
}

/// What an attacker floods a gateway with ([`flood`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FloodKind {
    /// Initiation-shaped packets whose mac1 is wrong (random bytes).
    JunkInit,
    /// Initiations with a right mac1 (the gateway's public key is public) but Noise
    /// messages that never complete: each would cost a Diffie-Hellman.
    Init,
    /// Session packets of sessions that do not exist (each asks for a hint).
    UnknownSession,
    /// Session packets carrying a live session's id (read off the wire) and garbage.
    SessionGarbage,
}

/// What a flood needs to know.
#[derive(Debug, Clone)]
pub struct Flood {
    /// What to send.
    pub kind: FloodKind,
    /// The gateway.
    pub to: SocketAddr,
    /// The first source address; `sources` consecutive IPv4 addresses from it are used
    /// in turn (they must be the sender's own).
    pub from: SocketAddr,
    /// How many source addresses.
    pub sources: u32,
    /// The gateway's public key (for [`FloodKind::Init`]).
    pub gateway: Option<jvpn_core::crypto::PublicKey>,
    /// The live session's id (for [`FloodKind::SessionGarbage`]).
    pub session: Option<u64>,
    /// How long.
    pub duration: Duration,
    /// At most this many packets.
    pub max_packets: u64,
    /// At most this many packets per second (0: as fast as one thread can).
    pub pps: u64,
}

/// Sends `flood` as fast as one thread can, for its duration or packet count, whichever
/// ends first; counts the answers that come back to the sources. Prints one JSON line:
/// packets sent, seconds, packets per second, replies and their bytes.
pub fn flood(flood: &Flood) -> Result<()> {
    use jvpn_core::wire::{self, PacketType, SessionHeader, HEADER_LEN, NOISE_INIT_LEN};
    if flood.sources == 0 || flood.sources > 1_024 {
        bail!("--sources {}: 1 to 1024", flood.sources);
    }
    let std::net::IpAddr::V4(first) = flood.from.ip() else {
        bail!("--from must be an IPv4 address");
    };
    let mut sockets = Vec::new();
    for i in 0..flood.sources {
        let ip = std::net::Ipv4Addr::from(u32::from(first).wrapping_add(i));
        let addr = SocketAddr::from((ip, flood.from.port()));
        let socket =
            std::net::UdpSocket::bind(addr).with_context(|| format!("cannot bind {addr}"))?;
        socket.set_nonblocking(true)?;
        sockets.push(socket);
    }
    let mut random = vec![0u8; 64 * 1024];
    getrandom::fill(&mut random).map_err(|e| anyhow::anyhow!("no random source: {e}"))?;
    let templates: Vec<Vec<u8>> = (0..64)
        .map(|i| {
            let noise = &random[i * 256..i * 256 + NOISE_INIT_LEN];
            match flood.kind {
                FloodKind::JunkInit => {
                    // The type and reserved bytes, then random bytes to an initiation's
                    // length: well formed, with a wrong mac1.
                    let mut p = vec![PacketType::HandshakeInit as u8, 0, 0, 0];
                    let rest = wire::INITIATION_LEN - p.len();
                    p.extend_from_slice(&random[i * 256 + 100..i * 256 + 100 + rest]);
                    Ok(p)
                }
                FloodKind::Init => {
                    let gateway = flood.gateway.context("--gateway-key is needed")?;
                    let mut p = Vec::new();
                    let mac_key = jvpn_core::mac::MacKey::for_gateway(&gateway);
                    wire::encode_initiation(i as u32, noise, &mac_key, None, &mut p);
                    Ok(p)
                }
                FloodKind::UnknownSession | FloodKind::SessionGarbage => {
                    let session_id = match flood.kind {
                        FloodKind::SessionGarbage => {
                            flood.session.context("--session-id is needed")?
                        }
                        _ => {
                            u64::from_be_bytes(
                                random[i * 256..i * 256 + 8].try_into().unwrap_or([1; 8]),
                            ) | 1
                        }
                    };
                    let header = SessionHeader {
                        ptype: PacketType::Data,
                        key_epoch: 0,
                        session_id: jvpn_core::ids::SessionId(session_id),
                        counter: i as u64,
                    };
                    let mut p = header.encode().to_vec();
                    p.extend_from_slice(&random[i * 256 + HEADER_LEN..i * 256 + 200]);
                    Ok(p)
                }
            }
        })
        .collect::<Result<_>>()?;
    let started = Instant::now();
    let (mut sent, mut replies, mut reply_bytes) = (0u64, 0u64, 0u64);
    let mut buf = [0u8; 2048];
    let mut drain = |sockets: &[std::net::UdpSocket], replies: &mut u64, bytes: &mut u64| {
        for s in sockets {
            while let Ok(n) = s.recv(&mut buf) {
                *replies += 1;
                *bytes += n as u64;
            }
        }
    };
    while sent < flood.max_packets && started.elapsed() < flood.duration {
        let socket = &sockets[(sent % sockets.len() as u64) as usize];
        let packet = &templates[(sent % templates.len() as u64) as usize];
        match socket.send_to(packet, flood.to) {
            Ok(_) => sent += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).context("send"),
        }
        if sent % 256 == 0 {
            drain(&sockets, &mut replies, &mut reply_bytes);
        }
        if flood.pps > 0 && sent % 64 == 0 {
            let due = Duration::from_secs_f64(sent as f64 / flood.pps as f64);
            if let Some(ahead) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(ahead.min(Duration::from_millis(5)));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(300));
    drain(&sockets, &mut replies, &mut reply_bytes);
    println!(
        "{}",
        serde_json::json!({
            "sent": sent,
            "seconds": seconds,
            "pps": sent as f64 / seconds.max(1e-9),
            "replies": replies,
            "reply_bytes": reply_bytes,
        })
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sends the datagram given as `hex` from `bind` to `to`.
pub fn udp_send(bind: SocketAddr, to: SocketAddr, hex_text: &str) -> Result<()> {
    let text = hex_text.trim();
    if !text.is_ascii() || !text.len().is_multiple_of(2) {
        bail!("not an even number of hex digits");
    }
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
        .collect::<Result<Vec<u8>, _>>()
        .context("not hex")?;
    let socket = std::net::UdpSocket::bind(bind).with_context(|| format!("cannot bind {bind}"))?;
    socket
        .send_to(&bytes, to)
        .with_context(|| format!("cannot send to {to}"))?;
    Ok(())
}

/// GETs `path` from the HTTP server at `addr` and prints the response body (the
/// metrics page, in the tests). Bounded by `timeout` and 16 MiB.
pub fn fetch(addr: SocketAddr, path: &str, timeout: Duration) -> Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(16 << 20).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("not an HTTP response");
    };
    let status = head.split_whitespace().nth(1);
    if !head.starts_with("HTTP/1.") || status != Some("200") {
        bail!("{}", head.lines().next().unwrap_or("no status line"));
    }
    print!("{body}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_on_loopback_is_checked_byte_by_byte() {
        let probe = TcpListener::bind("127.0.0.1:0").expect("port");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let sink = std::thread::spawn(move || tcp_sink(addr, 1_000_000, Duration::from_secs(10)));
        tcp_source(addr, 1_000_000, Duration::from_secs(10), None).expect("source");
        sink.join().expect("sink thread").expect("sink");
    }

    #[test]
    fn a_udp_payload_is_found_by_port() {
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        p.extend_from_slice(&[0x12, 0x34, 0xca, 0x6c, 0, 11, 0, 0, 8, 1, 2]);
        assert_eq!(udp_payload(&p, 51820), Some(&[8u8, 1, 2][..]));
        assert_eq!(udp_payload(&p, 51821), None);
        assert_eq!(udp_payload(&p[..22], 51820), None);
        assert_eq!(hex(&[0, 0xab]), "00ab");
    }

    #[test]
    fn the_leak_watch_tells_transport_link_control_and_leaks_apart() {
        let v4 = |src: [u8; 4], dst: [u8; 4], proto: u8, ports: [u16; 2]| {
            let mut p = vec![0x45, 0, 0, 28, 0, 0, 0, 0, 64, proto, 0, 0];
            p.extend(src);
            p.extend(dst);
            p.extend(ports[0].to_be_bytes());
            p.extend(ports[1].to_be_bytes());
            p.extend([0, 8, 0, 0]);
            p
        };
        let v6 = |src: &str, dst: &str, proto: u8| {
            let mut p = vec![0x60, 0, 0, 0, 0, 8, proto, 64];
            p.extend(src.parse::<std::net::Ipv6Addr>().expect("v6").octets());
            p.extend(dst.parse::<std::net::Ipv6Addr>().expect("v6").octets());
            p.extend([0x30, 0x39, 0x30, 0x39, 0, 8, 0, 0]);
            p
        };
        let port = 51820;
        assert_eq!(
            classify(&v4([10, 1, 1, 2], [10, 1, 1, 1], 17, [40000, port]), port),
            Seen::Transport
        );
        assert_eq!(
            classify(&v4([10, 1, 1, 1], [10, 1, 1, 2], 17, [port, 40000]), port),
            Seen::Transport
        );
        assert_eq!(
            classify(&v4([10, 1, 1, 2], [10, 2, 0, 2], 1, [0, 0]), port),
            Seen::Leak("proto 1 10.1.1.2 -> 10.2.0.2".into())
        );
        assert!(matches!(
            classify(&v4([10, 1, 1, 2], [10, 2, 0, 2], 6, [40000, port]), port),
            Seen::Leak(_)
        ));
        assert_eq!(
            classify(&v6("fe80::1", "ff02::1:ff00:1", 58), port),
            Seen::Link
        );
        assert_eq!(classify(&v6("fd01::2", "ff02::16", 0), port), Seen::Link);
        assert_eq!(
            classify(&v6("fd01::2", "fd02::2", 58), port),
            Seen::Leak("proto 58 fd01::2 -> fd02::2".into())
        );
        assert_eq!(classify(&[0x45, 0, 0], port), Seen::NotIp);
        assert_eq!(classify(&[0x00; 40], port), Seen::NotIp);
    }

    #[test]
    fn the_pattern_is_not_constant() {
        let distinct: std::collections::HashSet<u8> = (0..4096).map(pattern).collect();
        assert!(distinct.len() > 200);
    }
}
