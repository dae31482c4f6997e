//! `jvpn-lab`: the tools the end-to-end tests and the benchmarks run inside the lab's
//! network namespaces (checked TCP transfers, captures, floods, a leak watcher, an HTTP
//! fetch). Dev-only: none of it is in the product binary.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use jvpn_lab::tools;

/// Tools for the network lab of the end-to-end tests.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Receive and check a TCP byte stream.
    TcpSink {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
    },
    /// Send a TCP byte stream.
    TcpSource {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
        /// Spread the transfer over this many milliseconds.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
        pace_ms: Option<u64>,
    },
    /// Print (hex) the first UDP datagram to a port whose payload starts with a byte.
    Capture {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        first_byte: u8,
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
        timeout: u64,
    },
    /// Flood a gateway as an attacker would (bounded in time and count); print a JSON
    /// count of what was sent and what came back.
    Flood {
        #[arg(long, value_enum)]
        kind: tools::FloodKind,
        #[arg(long)]
        to: SocketAddr,
        /// The first source address (port 0 for any).
        #[arg(long)]
        from: SocketAddr,
        /// Consecutive source addresses to use in turn (the sender's own).
        #[arg(long, default_value_t = 1)]
        sources: u32,
        #[arg(long)]
        gateway_key: Option<String>,
        /// The live session's id (16 hex digits).
        #[arg(long)]
        session_id: Option<String>,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=120))]
        seconds: u64,
        #[arg(long, default_value_t = 50_000_000)]
        max_packets: u64,
        /// Packets per second at most (0: as fast as one thread can).
        #[arg(long, default_value_t = 0)]
        pps: u64,
    },
    /// Watch interfaces for packets that went around the tunnel; print a JSON count.
    WatchLeaks {
        /// The interfaces to watch (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        links: Vec<String>,
        /// The transport's UDP port (its packets are not leaks).
        #[arg(long, default_value_t = 51820)]
        port: u16,
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=600))]
        seconds: u64,
    },
    /// Print the body of an HTTP GET (e.g. the metrics page).
    Fetch {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/metrics")]
        path: String,
    },
    /// Send one UDP datagram (hex) from an address.
    UdpSend {
        #[arg(long)]
        bind: SocketAddr,
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        hex: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::TcpSink {
            listen,
            bytes,
            timeout,
        } => {
            tools::tcp_sink(listen, bytes, Duration::from_secs(timeout))?;
            Ok(())
        }
        Command::TcpSource {
            to,
            bytes,
            timeout,
            pace_ms,
        } => {
            tools::tcp_source(
                to,
                bytes,
                Duration::from_secs(timeout),
                pace_ms.map(Duration::from_millis),
            )?;
            Ok(())
        }
        Command::Capture {
            port,
            first_byte,
            timeout,
        } => {
            tools::capture(port, first_byte, Duration::from_secs(timeout))?;
            Ok(())
        }
        Command::Flood {
            kind,
            to,
            from,
            sources,
            gateway_key,
            session_id,
            seconds,
            max_packets,
            pps,
        } => {
            let gateway = match gateway_key {
                Some(k) => Some(
                    k.trim()
                        .parse()
                        .map_err(|_| anyhow::anyhow!("--gateway-key: not a public key"))?,
                ),
                None => None,
            };
            let session = match session_id {
                Some(id) => Some(
                    u64::from_str_radix(&id, 16)
                        .map_err(|_| anyhow::anyhow!("--session-id: 16 hex digits"))?,
                ),
                None => None,
            };
            tools::flood(&tools::Flood {
                kind,
                to,
                from,
                sources,
                gateway,
                session,
                duration: Duration::from_secs(seconds),
                max_packets,
                pps,
            })?;
            Ok(())
        }
        Command::WatchLeaks {
            links,
            port,
            seconds,
        } => {
            tools::watch_leaks(&links, port, Duration::from_secs(seconds))?;
            Ok(())
        }
        Command::Fetch { addr, path } => {
            tools::fetch(addr, &path, Duration::from_secs(5))?;
            Ok(())
        }
        Command::UdpSend { bind, to, hex } => {
            tools::udp_send(bind, to, &hex)?;
            Ok(())
        }
    }
}
