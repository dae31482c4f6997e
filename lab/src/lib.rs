//! Dev-only: what the end-to-end tests and the benchmarks add to the demo's network lab
//! (`jvpn::netlab`): firewall cuts and loss (nftables), a NAT that rebinds
//! (nftables + conntrack), blocked ports, an attacker namespace, programs run to
//! completion in a namespace (iproute2's `ip netns exec`), and the tools of the
//! `jvpn-lab` binary ([`tools`]). None of it is in the product binary.

pub mod tools;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use jvpn::netlab::{
    addr, in_ns, netns_etc, signal, Lab, Path2, ATTACKER_FIRST, BYSTANDER, CLIENT_A, CLIENT_B,
    GATEWAY_X, PORT,
};
use jvpn::netlink::{self, Route, RouteVia, MAIN_TABLE};
use nix::sys::signal::Signal;

/// The `jvpn-lab` binary next to the test or benchmark that runs (built with it).
pub fn lab_bin() -> PathBuf {
    sibling_bin("jvpn-lab")
}

/// The `jvpn` binary of the same build (`cargo test` builds it with the workspace).
pub fn jvpn_bin() -> PathBuf {
    sibling_bin("jvpn")
}

/// `target/<profile>/<name>`, from the running test executable in
/// `target/<profile>/deps/`.
fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The test lab's additions to [`Lab`].
pub trait LabTools {
    /// Runs `argv` in namespace `ns` and waits for it.
    fn exec(&self, ns: &str, argv: &[&str]) -> Result<Output>;
    /// Runs `argv` in `ns`; fails with its error output unless it succeeds.
    fn exec_ok(&self, ns: &str, argv: &[&str]) -> Result<String>;
    /// Adds an attacker: namespace "x", linked to the gateway on 10.203.0.0/16, owning
    /// `sources` consecutive addresses from [`ATTACKER_FIRST`] and the bystander's
    /// address [`BYSTANDER`] (replies to that address are what a spoofed bystander
    /// would receive). The gateway reaches it directly; the attacker reaches the
    /// gateway's path addresses through it.
    fn add_attacker(&mut self, sources: u32) -> Result<()>;
    /// Gives the namespace of `role` its own /etc/hosts (what `ip netns exec` mounts
    /// over /etc/hosts for the programs it starts there; programs are started that way
    /// from now on); rewritten in place, so a running program sees the change at its
    /// next lookup. Removed with the lab.
    fn set_hosts(&mut self, role: &str, text: &str) -> Result<()>;
    /// Freezes process `name` (SIGSTOP) or lets it go on (SIGCONT): a peer that stops
    /// reading.
    fn freeze(&self, name: &str, frozen: bool) -> Result<()>;
    /// The resident memory of process `name`, bytes.
    fn rss(&self, name: &str) -> Option<u64>;
    /// Drops the VPN's packets on `path` at the gateway (both directions), as a
    /// middlebox would: the sockets see nothing, only silence.
    fn cut(&self, path: Path2) -> Result<()>;
    /// Drops `percent`% of the VPN's UDP datagrams (to the gateway's UDP `port`: the UDP
    /// transport's, or QUIC's) arriving at the gateway on `path`, at random.
    fn lossy(&self, path: Path2, port: u16, percent: u8) -> Result<()>;
    /// As [`LabTools::lossy`], but only datagrams whose IP packet is longer than
    /// [`LARGE_PACKET`] bytes: what a congested link's byte-limited queue does to a bulk
    /// transfer, and what an MTU black hole looks like to QUIC.
    fn lossy_large(&self, path: Path2, port: u16, percent: u8) -> Result<()>;
    /// Removes the rules of [`LabTools::cut`], [`LabTools::lossy`] and
    /// [`LabTools::lossy_large`] on `path`.
    fn heal(&self, path: Path2) -> Result<()>;
    /// A NAT in front of the client on `path` gives its VPN datagrams a new mapping, as
    /// a home router's NAT does when it reboots or its table expires: their source
    /// becomes `to` (`ADDR` or `ADDR:PORT`; the address is added to the client's link if
    /// it is not its own), and the old mapping is forgotten (`conntrack -D`), so the
    /// very next datagram leaves with the new one. The client's sockets notice nothing.
    fn rebind(&self, path: Path2, to: &str) -> Result<()>;
    /// Drops every packet to or from the gateway's `protocol` ("udp" or "tcp") `port`,
    /// both ways, at the gateway, as a network that blocks it would.
    fn block(&self, protocol: &str, port: u16) -> Result<()>;
    /// Removes the rules of [`LabTools::block`].
    fn unblock(&self, protocol: &str, port: u16) -> Result<()>;
    /// A hop narrower than the links of `path`, beyond them: every VPN datagram (UDP,
    /// the gateway's `port`, over IPv4 or IPv6) whose IP packet is longer than `bytes`
    /// is dropped, both ways, and no ICMP tells either end, as a router that filters ICMP would (a path
    /// MTU black hole). Rules at the input of the client's and the gateway's namespaces:
    /// neither kernel learns anything when it sends. The links then cut the senders'
    /// UDP GSO batches into datagrams before they cross (as a router forwarding them
    /// would), so that the rules see each datagram, not a batch.
    fn narrow_beyond(&self, path: Path2, port: u16, bytes: u16) -> Result<()>;
}

/// The IP packet length above which [`LabTools::lossy_large`] drops.
pub const LARGE_PACKET: u16 = 1_300;

/// Drops `percent`% of the UDP datagrams to the gateway's `port` on `path` that match
/// the nftables expression `matching` (all of them if empty), at random.
fn drop_at_random(lab: &Lab, path: Path2, port: u16, percent: u8, matching: &str) -> Result<()> {
    let table = format!("jvloss{}", path.letter());
    let script = format!(
        "table inet {table} {{\n chain in {{ type filter hook input priority -10; udp dport {port} ip daddr {gw} {matching} numgen random mod 100 < {percent} drop\n }}\n}}\n",
        gw = path.gateway()
    );
    nft(lab, &lab.ns("g"), &script)
}

fn nft(lab: &Lab, ns: &str, script: &str) -> Result<()> {
    let file = lab.write("rules.nft", script)?;
    let file = file.display().to_string();
    lab.exec_ok(ns, &["nft", "-f", &file]).map(|_| ())
}

impl LabTools for Lab {
    fn exec(&self, ns: &str, argv: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {argv:?} in {ns}"))
    }

    fn exec_ok(&self, ns: &str, argv: &[&str]) -> Result<String> {
        let out = self.exec(ns, argv)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {ns} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn add_attacker(&mut self, sources: u32) -> Result<()> {
        if sources == 0 || sources > 1_024 {
            bail!("attacker sources: 1 to 1024");
        }
        let (x, g) = (self.ns("x"), self.ns("g"));
        self.add_namespace(&x)?;
        let (gx, xg) = (format!("{g}x"), format!("{x}g"));
        let first = u32::from(ATTACKER_FIRST.parse::<Ipv4Addr>()?);
        let mut own = vec![(addr(BYSTANDER), 16)];
        own.extend((0..sources).map(|i| (IpAddr::from(Ipv4Addr::from(first + i)), 16)));
        self.add_link((&g, &gx, &[(addr(GATEWAY_X), 16)]), (&x, &xg, &own))?;
        in_ns(&x, |h| async move {
            let route = Route {
                dst: addr("10.201.0.0"),
                prefix: 16,
                via: RouteVia::Gateway(addr(GATEWAY_X)),
                table: MAIN_TABLE,
            };
            netlink::add_route(&h, &route).await
        })
    }

    fn set_hosts(&mut self, role: &str, text: &str) -> Result<()> {
        let dir = netns_etc(&self.ns(role));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{text}"))
            .with_context(|| format!("cannot write {}", hosts.display()))?;
        self.launcher = vec!["ip".into(), "netns".into(), "exec".into()];
        Ok(())
    }

    fn freeze(&self, name: &str, frozen: bool) -> Result<()> {
        let pid = self
            .pid(name)
            .with_context(|| format!("no process {name}"))?;
        signal(
            pid,
            if frozen {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            },
        );
        Ok(())
    }

    fn rss(&self, name: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid(name)?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    fn cut(&self, path: Path2) -> Result<()> {
        let table = format!("jvcut{}", path.letter());
        let script = format!(
            "table inet {table} {{\n chain in {{ type filter hook input priority -10; udp dport {PORT} ip daddr {gw} drop\n }}\n chain out {{ type filter hook output priority -10; udp sport {PORT} ip saddr {gw} drop\n }}\n}}\n",
            gw = path.gateway()
        );
        nft(self, &self.ns("g"), &script)
    }

    fn lossy(&self, path: Path2, port: u16, percent: u8) -> Result<()> {
        drop_at_random(self, path, port, percent, "")
    }

    fn lossy_large(&self, path: Path2, port: u16, percent: u8) -> Result<()> {
        drop_at_random(
            self,
            path,
            port,
            percent,
            &format!("meta length > {LARGE_PACKET}"),
        )
    }

    fn heal(&self, path: Path2) -> Result<()> {
        let g = self.ns("g");
        for table in [
            format!("jvcut{}", path.letter()),
            format!("jvloss{}", path.letter()),
        ] {
            let _ = self.exec(&g, &["nft", "delete", "table", "inet", &table]);
        }
        Ok(())
    }

    fn rebind(&self, path: Path2, to: &str) -> Result<()> {
        let c = self.ns("c");
        let dev = self.client_link(path);
        let address = to.split(':').next().unwrap_or(to);
        let own = match path {
            Path2::A => CLIENT_A,
            Path2::B => CLIENT_B,
        };
        if address != own {
            let a: IpAddr = address
                .parse()
                .with_context(|| format!("rebind to {to:?}: not ADDR or ADDR:PORT"))?;
            let dev = dev.clone();
            in_ns(&c, move |h| async move {
                match netlink::add_address(&h, &dev, a, 24).await {
                    Err(e) if !e.is_exists() => Err(e),
                    _ => Ok(()),
                }
            })?;
        }
        let table = format!("jvnat{}", path.letter());
        let script = format!(
            "table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n chain post {{ type nat hook postrouting priority srcnat; oifname \"{dev}\" udp dport {PORT} snat to {to}\n }}\n}}\n"
        );
        nft(self, &c, &script)?;
        // A datagram from the gateway arriving between the flush and the client's next
        // one would make a new entry in the other direction, which the NAT rule does not
        // touch: flush until the entry shows the new mapping (bounded).
        let shows = match to.split_once(':') {
            Some((_, port)) => format!("dport={port}"),
            None => format!("dst={to}"),
        };
        let port = PORT.to_string();
        for _ in 0..20 {
            // conntrack exits 1 when nothing matched: nothing to forget.
            let _ = self.exec(&c, &["conntrack", "-D", "-p", "udp", "--dport", &port]);
            std::thread::sleep(Duration::from_millis(150));
            let listed = self.exec(&c, &["conntrack", "-L", "-p", "udp", "--dport", &port])?;
            if String::from_utf8_lossy(&listed.stdout).contains(&shows) {
                return Ok(());
            }
        }
        bail!("the NAT's new mapping ({to}) did not take")
    }

    fn block(&self, protocol: &str, port: u16) -> Result<()> {
        let script = format!(
            "table inet jvblock{protocol}{port} {{\n chain in {{ type filter hook input priority -10; {protocol} dport {port} drop\n }}\n chain out {{ type filter hook output priority -10; {protocol} sport {port} drop\n }}\n}}\n"
        );
        nft(self, &self.ns("g"), &script)
    }

    fn narrow_beyond(&self, path: Path2, port: u16, bytes: u16) -> Result<()> {
        let table = format!("jvnarrow{}", path.letter());
        for (role, link, matching) in [
            ("g", self.gateway_link(path), format!("udp dport {port}")),
            ("c", self.client_link(path), format!("udp sport {port}")),
        ] {
            let ns = self.ns(role);
            self.exec_ok(
                &ns,
                &["ip", "link", "set", "dev", &link, "gso_max_segs", "1"],
            )?;
            // By the path's interface: either family of outer addresses.
            let script = format!(
                "table inet {table} {{\n chain in {{ type filter hook input priority -10; iifname \"{link}\" {matching} meta length > {bytes} drop\n }}\n}}\n"
            );
            nft(self, &ns, &script)?;
        }
        Ok(())
    }

    fn unblock(&self, protocol: &str, port: u16) -> Result<()> {
        let table = format!("jvblock{protocol}{port}");
        self.exec_ok(&self.ns("g"), &["nft", "delete", "table", "inet", &table])
            .map(|_| ())
    }
}

/// A lab, or `None` (with the reason printed) when this machine cannot build one and
/// CI is not set. Under CI=true it panics instead: the tests must run there.
pub fn lab_or_skip(tag: &str) -> Option<Lab> {
    if let Err(e) = jvpn::netlab::check_prerequisites() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true: the end-to-end tests must run, but cannot: {e:#}");
        }
        eprintln!("skipping the end-to-end test: {e:#}");
        return None;
    }
    let bin = jvpn_bin();
    assert!(
        bin.exists(),
        "{} is missing: build the workspace (cargo test builds it)",
        bin.display()
    );
    Some(Lab::new(tag, &bin).expect("the lab"))
}

/// Runs `work` to completion on a runtime of its own, on a thread inside the network
/// namespace `ns`: every socket it opens is in that namespace.
pub fn run_in_ns<T, F, Fut>(ns: &str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let ns = ns.to_string();
    std::thread::spawn(move || -> Result<T> {
        netlink::enter_netns(&ns)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(runtime.block_on(work()))
    })
    .join()
    .unwrap_or_else(|_| {
        Err(anyhow::anyhow!(
            "the thread in {} panicked",
            "the namespace"
        ))
    })
}

/// Starts etcd (Debian `etcd-server`) as process `name` in the namespace `ns`, serving
/// clients on `ip:2379`, its data in the lab directory; waits until it answers. Returns
/// its client URL. Stopped and removed with the lab.
pub fn start_etcd(lab: &mut Lab, name: &str, ns: &str, ip: &str) -> Result<String> {
    let data = lab.dir().join(format!("{name}.data"));
    let client = format!("http://{ip}:2379");
    let peer = format!("http://{ip}:2380");
    let data = data.display().to_string();
    lab.spawn(
        name,
        ns,
        &[
            "etcd",
            "--name",
            name,
            "--data-dir",
            &data,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("{name}={peer}"),
            "--log-level",
            "warn",
        ],
    )
    .context("cannot start etcd (Debian etcd-server)")?;
    let addr: std::net::SocketAddr = format!("{ip}:2379").parse()?;
    let ready = run_in_ns(ns, move || async move {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    })?;
    if !ready {
        bail!("etcd did not come up: {:?}", lab.output_of(name));
    }
    Ok(client)
}

/// Starts a checked TCP transfer in the background from namespace role `from` to a
/// receiver in role `to` listening on `listen`; its processes are `{name}source` and
/// `{name}sink` (see [`await_transfer`]).
pub fn start_transfer_between(
    lab: &mut Lab,
    name: &str,
    (from, to): (&str, &str),
    listen: &str,
    bytes: u64,
    pace_ms: Option<u64>,
) {
    let b = bytes.to_string();
    let tool = lab_bin().display().to_string();
    let (to, from) = (lab.ns(to), lab.ns(from));
    let sink = [
        &tool,
        "tcp-sink",
        "--listen",
        listen,
        "--bytes",
        &b,
        "--timeout",
        "60",
    ];
    lab.spawn(&format!("{name}sink"), &to, &sink).expect("sink");
    std::thread::sleep(Duration::from_millis(200));
    let pace = pace_ms.map(|p| p.to_string());
    let mut source = vec![
        &tool,
        "tcp-source",
        "--to",
        listen,
        "--bytes",
        &b,
        "--timeout",
        "60",
    ];
    if let Some(p) = &pace {
        source.extend(["--pace-ms", p]);
    }
    lab.spawn(&format!("{name}source"), &from, &source)
        .expect("source");
}

/// Waits for the transfer `name` of `bytes` (see [`start_transfer_between`]): both ends
/// exit 0 (the receiver checked every byte) and the receiver counted them all; returns
/// its Mbit/s.
pub fn await_transfer(lab: &mut Lab, name: &str, bytes: u64) -> f64 {
    for end in ["source", "sink"] {
        let process = format!("{name}{end}");
        assert_eq!(
            lab.wait(&process, Duration::from_secs(60)),
            Some(0),
            "{process} failed: {:?}\n{}",
            lab.output_of(&process),
            lab.diagnostics()
        );
    }
    let (report, _) = lab.output_of(&format!("{name}sink"));
    let v: serde_json::Value = serde_json::from_str(report.trim()).expect("sink report");
    assert_eq!(v["bytes"].as_u64(), Some(bytes), "{report}");
    v["mbit_per_s"].as_f64().unwrap_or(0.0)
}
