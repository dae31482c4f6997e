//! A network lab in network namespaces, for `jvpn demo` and the end-to-end tests: a
//! client namespace and a gateway namespace joined by two veth paths (A and B), and a
//! server namespace behind the gateway — the network the VPN gives access to.
//!
//! ```text
//!   client ns                 gateway ns                  server ns
//!   ┌──────────┐  path A  ┌──────────────┐           ┌──────────────┐
//!   │ 10.201.1.2├─────────┤10.201.1.1    │           │              │
//!   │ 10.201.2.2├─────────┤10.201.2.1    ├───────────┤ 10.202.0.2   │
//!   │ jv1 (TUN) │  path B │ jv0 10.77.0.1│10.202.0.1 │              │
//!   └──────────┘          └──────────────┘           └──────────────┘
//! ```
//!
//! Every name starts with `jv` and every address is in 10.0.0.0/8, inside namespaces the
//! lab creates; dropping the lab stops its processes and deletes its namespaces (and
//! with them every interface, route and firewall rule in them).

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use jvpn_core::crypto::Keypair;

use crate::netconf;

/// The gateway's addresses on the two paths.
pub const GATEWAY_A: &str = "10.201.1.1";
/// See [`GATEWAY_A`].
pub const GATEWAY_B: &str = "10.201.2.1";
/// The client's addresses on the two paths.
pub const CLIENT_A: &str = "10.201.1.2";
/// See [`CLIENT_A`].
pub const CLIENT_B: &str = "10.201.2.2";
/// The server behind the gateway.
pub const SERVER: &str = "10.202.0.2";
/// The gateway's address towards the server.
pub const GATEWAY_INSIDE: &str = "10.202.0.1";
/// The gateway's tunnel address and the tunnel network.
pub const GATEWAY_TUNNEL: &str = "10.77.0.1";
/// The client's tunnel address.
pub const CLIENT_TUNNEL: &str = "10.77.0.2";
/// The gateway's address towards the attacker's network (10.203.0.0/16, see
/// [`Lab::add_attacker`]).
pub const GATEWAY_X: &str = "10.203.0.1";
/// A bystander's address on the attacker's network, which the attacker writes as the
/// source of its packets (spoofing), so that the replies go to the bystander.
pub const BYSTANDER: &str = "10.203.0.3";
/// The first of the attacker's own source addresses.
pub const ATTACKER_FIRST: &str = "10.203.1.0";

/// The IPv6 addresses of the same ends (every link is dual stack), in the order
/// client A, gateway A, client B, gateway B, gateway inside, server.
const IPV6_LINKS: [&str; 6] = [
    "fd01:1::2",
    "fd01:1::1",
    "fd01:2::2",
    "fd01:2::1",
    "fd02::1",
    "fd02::2",
];
/// The gateway's IPv6 address on path A (the client's IPv6 default route, in the leak
/// tests).
pub const GATEWAY_A6: &str = "fd01:1::1";
/// The server's IPv6 address.
pub const SERVER6: &str = "fd02::2";
/// The gateway's IPv6 tunnel address (when the lab's tunnel has IPv6) and network.
pub const GATEWAY_TUNNEL6: &str = "fd77::1";
/// The client's IPv6 tunnel address (when the lab's tunnel has IPv6).
pub const CLIENT_TUNNEL6: &str = "fd77::2";
/// The UDP port the gateway listens on, on both paths.
pub const PORT: u16 = 51820;

/// One of the two paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path2 {
    /// 10.201.1.0/24.
    A,
    /// 10.201.2.0/24.
    B,
}

impl Path2 {
    fn letter(self) -> &'static str {
        match self {
            Path2::A => "a",
            Path2::B => "b",
        }
    }

    /// The gateway's address on this path.
    pub fn gateway(self) -> &'static str {
        match self {
            Path2::A => GATEWAY_A,
            Path2::B => GATEWAY_B,
        }
    }
}

/// Whether this process can build a lab: root, /dev/net/tun, iproute2. `Err` says why
/// not.
pub fn check_prerequisites() -> Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("?");
    if uid != "0" {
        bail!("network namespaces and TUN devices need root (effective uid is {uid})");
    }
    if !Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun is missing (load the tun module, or give the container the device)");
    }
    netconf::run(&["ip", "-V"]).context("iproute2 (`ip`) is needed")?;
    Ok(())
}

/// A running lab.
pub struct Lab {
    tag: String,
    dir: PathBuf,
    jvpn: PathBuf,
    namespaces: Vec<String>,
    processes: Vec<(String, Child)>,
    /// The gateway's key pair.
    pub gateway_key: Keypair,
    /// The client's key pair.
    pub client_key: Keypair,
    /// The `[routes]` keys of the client's configuration.
    pub client_routes: String,
    /// The `[forwarding]` keys of the gateway's configuration.
    pub gateway_forwarding: String,
    /// The gateway's listen addresses (default: UDP on both paths).
    pub gateway_listen: Vec<String>,
    /// The client's candidate endpoints, in order (default: UDP on path A, then B).
    pub client_candidates: Vec<String>,
    /// Where the client serves its metrics ("" for nowhere, the default).
    pub client_metrics: String,
    /// Which families the tunnel carries: (IPv4, IPv6); (true, false) unless a test
    /// changes it before starting the gateway.
    pub tunnel_families: (bool, bool),
}

/// A TOML list of strings.
fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where `ip netns exec` takes a namespace's own /etc files from.
fn netns_etc(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

fn lab_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("jvlab-{tag}"))
}

fn ip(args: &[&str]) -> Result<()> {
    let mut argv = vec!["ip"];
    argv.extend_from_slice(args);
    Ok(netconf::run(&argv)?)
}

impl Lab {
    /// Builds the namespaces, links and addresses. `tag` (1 to 6 letters or digits)
    /// makes the names unique; `jvpn` is the binary to run in them.
    pub fn new(tag: &str, jvpn: &Path) -> Result<Lab> {
        check_prerequisites()?;
        if tag.is_empty() || tag.len() > 6 || !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
            bail!("lab tag {tag:?}: 1 to 6 letters or digits");
        }
        let dir = lab_dir(tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // It holds private keys.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let mut lab = Lab {
            tag: tag.to_string(),
            dir,
            jvpn: jvpn.to_path_buf(),
            namespaces: Vec::new(),
            processes: Vec::new(),
            gateway_key: Keypair::generate()?,
            client_key: Keypair::generate()?,
            client_routes: "networks = [\"10.202.0.0/24\"]\n".into(),
            gateway_forwarding: "enable = true\n".into(),
            gateway_listen: vec![format!("{GATEWAY_A}:{PORT}"), format!("{GATEWAY_B}:{PORT}")],
            client_candidates: vec![format!("{GATEWAY_A}:{PORT}"), format!("{GATEWAY_B}:{PORT}")],
            client_metrics: String::new(),
            tunnel_families: (true, false),
        };
        lab.build()?;
        Ok(lab)
    }

    /// The namespace of `role` ("c" client, "g" gateway, "s" server).
    pub fn ns(&self, role: &str) -> String {
        format!("jv{}{role}", self.tag)
    }

    /// The lab's scratch directory (configs, event files, admin sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client-side interface of `path`.
    pub fn client_link(&self, path: Path2) -> String {
        format!("jv{}c{}", self.tag, path.letter())
    }

    fn build(&mut self) -> Result<()> {
        for role in ["c", "g", "s"] {
            let ns = self.ns(role);
            let _ = ip(&["netns", "del", &ns]);
            ip(&["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        let (c, g, s) = (self.ns("c"), self.ns("g"), self.ns("s"));
        let links = [
            (
                &c,
                format!("jv{}ca", self.tag),
                CLIENT_A,
                &g,
                format!("jv{}ga", self.tag),
                GATEWAY_A,
            ),
            (
                &c,
                format!("jv{}cb", self.tag),
                CLIENT_B,
                &g,
                format!("jv{}gb", self.tag),
                GATEWAY_B,
            ),
            (
                &g,
                format!("jv{}gs", self.tag),
                GATEWAY_INSIDE,
                &s,
                format!("jv{}sg", self.tag),
                SERVER,
            ),
        ];
        for (i, (ns1, if1, a1, ns2, if2, a2)) in links.iter().enumerate() {
            ip(&[
                "link", "add", if1, "netns", ns1, "type", "veth", "peer", "name", if2, "netns", ns2,
            ])?;
            ip(&["-n", ns1, "addr", "add", &format!("{a1}/24"), "dev", if1])?;
            ip(&["-n", ns2, "addr", "add", &format!("{a2}/24"), "dev", if2])?;
            // `nodad`: usable at once, not after a second of duplicate detection.
            for (ns, dev, a6) in [
                (ns1, if1, IPV6_LINKS[2 * i]),
                (ns2, if2, IPV6_LINKS[2 * i + 1]),
            ] {
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{a6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ])?;
            }
            ip(&["-n", ns1, "link", "set", if1, "up"])?;
            ip(&["-n", ns2, "link", "set", if2, "up"])?;
        }
        // The server answers the tunnel network through the gateway (no masquerade).
        ip(&[
            "-n",
            &s,
            "route",
            "add",
            "10.77.0.0/24",
            "via",
            GATEWAY_INSIDE,
        ])?;
        ip(&["-n", &s, "route", "add", "fd77::/64", "via", IPV6_LINKS[4]])?;
        Ok(())
    }

    /// Adds an attacker: namespace "x", linked to the gateway on 10.203.0.0/16, owning
    /// `sources` consecutive addresses from [`ATTACKER_FIRST`] and the bystander's
    /// address [`BYSTANDER`] (replies to that address are what a spoofed bystander would
    /// receive). The gateway reaches it directly; the attacker reaches the gateway's
    /// path addresses through it.
    pub fn add_attacker(&mut self, sources: u32) -> Result<()> {
        if sources == 0 || sources > 1_024 {
            bail!("attacker sources: 1 to 1024");
        }
        let (x, g) = (self.ns("x"), self.ns("g"));
        let _ = ip(&["netns", "del", &x]);
        ip(&["netns", "add", &x])?;
        self.namespaces.push(x.clone());
        ip(&["-n", &x, "link", "set", "lo", "up"])?;
        let (gx, xg) = (format!("jv{}gx", self.tag), format!("jv{}xg", self.tag));
        ip(&[
            "link", "add", &gx, "netns", &g, "type", "veth", "peer", "name", &xg, "netns", &x,
        ])?;
        ip(&[
            "-n",
            &g,
            "addr",
            "add",
            &format!("{GATEWAY_X}/16"),
            "dev",
            &gx,
        ])?;
        let mut batch = format!("addr add {BYSTANDER}/16 dev {xg}\n");
        let first: std::net::Ipv4Addr = ATTACKER_FIRST.parse()?;
        for i in 0..sources {
            let a = std::net::Ipv4Addr::from(u32::from(first) + i);
            batch.push_str(&format!("addr add {a}/16 dev {xg}\n"));
        }
        let file = self.write("attacker.batch", &batch)?.display().to_string();
        ip(&["-n", &x, "-batch", &file])?;
        ip(&["-n", &g, "link", "set", &gx, "up"])?;
        ip(&["-n", &x, "link", "set", &xg, "up"])?;
        ip(&["-n", &x, "route", "add", "10.201.0.0/16", "via", GATEWAY_X])?;
        Ok(())
    }

    /// Runs `argv` in namespace `ns` and waits for it.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {argv:?} in {ns}"))
    }

    /// Runs `argv` in `ns`; fails with its error output unless it succeeds.
    pub fn exec_ok(&self, ns: &str, argv: &[&str]) -> Result<String> {
        let out = self.exec(ns, argv)?;
        if !out.status.success() {
            bail!(
                "{argv:?} in {ns} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `argv` in `ns` in the background, its output into `<name>.out` and
    /// `<name>.err` in the lab directory. Stopped when the lab is dropped, if not before.
    pub fn spawn(&mut self, name: &str, ns: &str, argv: &[&str]) -> Result<()> {
        let out = File::create(self.dir.join(format!("{name}.out")))?;
        let err = File::create(self.dir.join(format!("{name}.err")))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start {argv:?} in {ns}"))?;
        self.processes.push((name.to_string(), child));
        Ok(())
    }

    /// Starts a `jvpn` subcommand in `ns` (see [`Lab::spawn`]).
    pub fn spawn_jvpn(&mut self, name: &str, ns: &str, args: &[&str]) -> Result<()> {
        let bin = self.jvpn.display().to_string();
        let mut argv = vec![bin.as_str()];
        argv.extend_from_slice(args);
        self.spawn(name, ns, &argv)
    }

    /// What a spawned process wrote to standard output and error so far.
    pub fn output_of(&self, name: &str) -> (String, String) {
        let read = |ext: &str| {
            std::fs::read_to_string(self.dir.join(format!("{name}.{ext}"))).unwrap_or_default()
        };
        (read("out"), read("err"))
    }

    /// Sends SIGTERM to process `name` and waits up to `limit` for it to exit; returns
    /// its exit code (`None`: killed after the limit, or unknown).
    pub fn stop(&mut self, name: &str, limit: Duration) -> Option<i32> {
        let i = self.processes.iter().position(|(n, _)| n == name)?;
        let (_, mut child) = self.processes.remove(i);
        terminate(&mut child, limit)
    }

    /// Whether process `name` was started and has not been waited for.
    pub fn is_running(&self, name: &str) -> bool {
        self.processes.iter().any(|(n, _)| n == name)
    }

    /// Gives the namespace of `role` its own /etc/hosts (what `ip netns exec` mounts
    /// over /etc/hosts for the programs it starts there); rewritten in place, so a
    /// running program sees the change at its next lookup. Removed with the lab.
    pub fn set_hosts(&self, role: &str, text: &str) -> Result<()> {
        let dir = netns_etc(&self.ns(role));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1 localhost\n{text}"))
            .with_context(|| format!("cannot write {}", hosts.display()))
    }

    /// The process id of `name`, if it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// Freezes process `name` (SIGSTOP) or lets it go on (SIGCONT): a peer that stops
    /// reading.
    pub fn freeze(&self, name: &str, frozen: bool) -> Result<()> {
        let pid = self
            .pid(name)
            .with_context(|| format!("no process {name}"))?;
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }

    /// The resident memory of process `name`, bytes.
    pub fn rss(&self, name: &str) -> Option<u64> {
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

    /// Kills process `name` at once (SIGKILL): a crash, nothing cleaned up by it.
    pub fn kill(&mut self, name: &str) {
        if let Some(i) = self.processes.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.processes.remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `limit` for process `name` to exit by itself; its exit code.
    pub fn wait(&mut self, name: &str, limit: Duration) -> Option<i32> {
        let i = self.processes.iter().position(|(n, _)| n == name)?;
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.processes[i].1.try_wait() {
                self.processes.remove(i);
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes a file into the lab directory; returns its path.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Drops the VPN's packets on `path` at the gateway (both directions), as a
    /// middlebox would: the sockets see nothing, only silence.
    pub fn cut(&self, path: Path2) -> Result<()> {
        let g = self.ns("g");
        let table = format!("jvcut{}", path.letter());
        let script = format!(
            "table inet {table} {{\n chain in {{ type filter hook input priority -10; udp dport {PORT} ip daddr {gw} drop\n }}\n chain out {{ type filter hook output priority -10; udp sport {PORT} ip saddr {gw} drop\n }}\n}}\n",
            gw = path.gateway()
        );
        self.nft(&g, &script)
    }

    /// Drops `percent`% of the VPN's packets arriving at the gateway on `path`, at random.
    pub fn lossy(&self, path: Path2, percent: u8) -> Result<()> {
        let g = self.ns("g");
        let table = format!("jvloss{}", path.letter());
        let script = format!(
            "table inet {table} {{\n chain in {{ type filter hook input priority -10; udp dport {PORT} ip daddr {gw} numgen random mod 100 < {percent} drop\n }}\n}}\n",
            gw = path.gateway()
        );
        self.nft(&g, &script)
    }

    /// Removes the rules of [`Lab::cut`] and [`Lab::lossy`] on `path`.
    pub fn heal(&self, path: Path2) -> Result<()> {
        let g = self.ns("g");
        for table in [
            format!("jvcut{}", path.letter()),
            format!("jvloss{}", path.letter()),
        ] {
            let _ = self.exec(&g, &["nft", "delete", "table", "inet", &table]);
        }
        Ok(())
    }

    fn nft(&self, ns: &str, script: &str) -> Result<()> {
        let file = self.write("rules.nft", script)?;
        let file = file.display().to_string();
        self.exec_ok(ns, &["nft", "-f", &file]).map(|_| ())
    }

    /// A NAT in front of the client on `path` gives its VPN datagrams a new mapping, as a
    /// home router's NAT does when it reboots or its table expires: their source becomes
    /// `to` (`ADDR` or `ADDR:PORT`; the address is added to the client's link if it is
    /// not its own), and the old mapping is forgotten (`conntrack -D`), so the very next
    /// datagram leaves with the new one. The client's sockets notice nothing.
    pub fn rebind(&self, path: Path2, to: &str) -> Result<()> {
        let c = self.ns("c");
        let dev = self.client_link(path);
        let addr = to.split(':').next().unwrap_or(to);
        let own = match path {
            Path2::A => CLIENT_A,
            Path2::B => CLIENT_B,
        };
        if addr != own {
            let _ = ip(&["-n", &c, "addr", "add", &format!("{addr}/24"), "dev", &dev]);
        }
        let table = format!("jvnat{}", path.letter());
        let script = format!(
            "table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n chain post {{ type nat hook postrouting priority srcnat; oifname \"{dev}\" udp dport {PORT} snat to {to}\n }}\n}}\n"
        );
        self.nft(&c, &script)?;
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

    /// Sets the client's link on `path` down or up.
    pub fn link(&self, path: Path2, up: bool) -> Result<()> {
        let c = self.ns("c");
        let dev = self.client_link(path);
        ip(&[
            "-n",
            &c,
            "link",
            "set",
            &dev,
            if up { "up" } else { "down" },
        ])?;
        if up {
            // Its address and connected route come back with the link.
            let _ = ip(&[
                "-n",
                &c,
                "addr",
                "replace",
                &format!(
                    "{}/24",
                    match path {
                        Path2::A => CLIENT_A,
                        Path2::B => CLIENT_B,
                    }
                ),
                "dev",
                &dev,
            ]);
        }
        Ok(())
    }

    /// Writes the gateway's configuration (policy overrides as TOML lines of the
    /// `[policy...]` tables, appended at the end) and returns its path.
    pub fn gateway_config(&self, policy: &str) -> Result<PathBuf> {
        let text = format!(
            "node_id = \"gw-{tag}\"\nprivate_key = \"{key}\"\nlisten = [{listen}]\n\
             [tunnel]\nname = \"jv{tag}t\"\naddress = {gateway_tunnel}\n\
             [forwarding]\n{forwarding}\
             [admin]\nsocket = \"{dir}/gw.sock\"\n\
             [metrics]\nlisten = \"127.0.0.1:9477\"\n\
             [events]\noutput = \"{dir}/gw-events.jsonl\"\n\
             [[clients]]\nname = \"lab-client\"\npublic_key = \"{client}\"\ntunnel_address = {client_tunnel}\n\
             {policy}\n",
            tag = self.tag,
            key = self.gateway_key.private_base64().as_str(),
            listen = quoted(&self.gateway_listen),
            dir = self.dir.display(),
            client = self.client_key.public(),
            forwarding = self.gateway_forwarding,
            gateway_tunnel = self.tunnel_list(&format!("{GATEWAY_TUNNEL}/24"), &format!("{GATEWAY_TUNNEL6}/64")),
            client_tunnel = self.tunnel_list(CLIENT_TUNNEL, CLIENT_TUNNEL6),
        );
        self.write("gateway.toml", &text)
    }

    /// Drops every packet to or from the gateway's `protocol` ("udp" or "tcp") `port`,
    /// both ways, at the gateway, as a network that blocks it would.
    pub fn block(&self, protocol: &str, port: u16) -> Result<()> {
        let g = self.ns("g");
        let script = format!(
            "table inet jvblock{protocol}{port} {{\n chain in {{ type filter hook input priority -10; {protocol} dport {port} drop\n }}\n chain out {{ type filter hook output priority -10; {protocol} sport {port} drop\n }}\n}}\n"
        );
        self.nft(&g, &script)
    }

    /// Removes the rules of [`Lab::block`].
    pub fn unblock(&self, protocol: &str, port: u16) -> Result<()> {
        let g = self.ns("g");
        self.exec_ok(
            &g,
            &[
                "nft",
                "delete",
                "table",
                "inet",
                &format!("jvblock{protocol}{port}"),
            ],
        )
        .map(|_| ())
    }

    /// A TOML list of the tunnel's addresses of the families the lab's tunnel carries.
    fn tunnel_list(&self, v4: &str, v6: &str) -> String {
        let (has4, has6) = self.tunnel_families;
        let items: Vec<String> = [(has4, v4), (has6, v6)]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, a)| format!("\"{a}\""))
            .collect();
        format!("[{}]", items.join(", "))
    }

    /// Writes the client's configuration (`on_end`: "exit" or "reconnect"; policy as for
    /// the gateway) and returns its path.
    pub fn client_config(&self, on_end: &str, gateway_key: &str, policy: &str) -> Result<PathBuf> {
        let text = format!(
            "private_key = \"{key}\"\ngateway_public_key = \"{gateway_key}\"\ngateway_tls_pin = \"{pin}\"\non_session_end = \"{on_end}\"\n\
             {candidates}\
             [tunnel]\nname = \"jv{tag}t\"\n\
             [routes]\n{routes}\
             [admin]\nsocket = \"{dir}/client.sock\"\n\
             [metrics]\nlisten = \"{metrics}\"\n\
             [events]\noutput = \"{dir}/client-events.jsonl\"\n\
             {policy}\n",
            tag = self.tag,
            key = self.client_key.private_base64().as_str(),
            pin = jvpn_actors::tls::TlsIdentity::for_gateway(&self.gateway_key)?.pin(),
            candidates = self
                .client_candidates
                .iter()
                .map(|c| format!("[[candidates]]\nendpoint = \"{c}\"\n"))
                .collect::<String>(),
            dir = self.dir.display(),
            routes = self.client_routes,
            metrics = self.client_metrics,
        );
        self.write("client.toml", &text)
    }

    /// The JSON event lines a process wrote to `<name>-events.jsonl` so far.
    pub fn events(&self, name: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join(format!("{name}-events.jsonl")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The status answer of "gw" or "client", if it answers.
    pub fn status(&self, who: &str) -> Option<serde_json::Value> {
        crate::admin::ask_blocking(&self.socket(who), &crate::admin::Request::Status).ok()
    }

    /// Whether the client's session is attached on candidate `transport` (1: path A,
    /// 2: path B).
    pub fn attached_on(&self, transport: u32) -> bool {
        self.status("client")
            .is_some_and(|s| s["active_transport"] == transport && s["state"] == "ATTACHED")
    }

    /// The TUN interface name both sides use (each in its own namespace).
    pub fn tun_name(&self) -> String {
        format!("jv{}t", self.tag)
    }

    /// Whether interface `dev` exists in namespace `ns`.
    pub fn link_exists(&self, ns: &str, dev: &str) -> bool {
        self.exec(ns, &["ip", "link", "show", dev])
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// The last lines of the gateway's and the client's error output, for failures.
    pub fn diagnostics(&self) -> String {
        let (_, gw) = self.output_of("gateway");
        let (_, cl) = self.output_of("client");
        format!("gateway stderr:\n{gw}\nclient stderr:\n{cl}")
    }

    /// Starts the gateway (policy overrides as in [`Lab::gateway_config`]) and waits
    /// until its admin socket answers.
    pub fn start_gateway(&mut self, policy: &str) -> Result<()> {
        let config = self.gateway_config(policy)?.display().to_string();
        let g = self.ns("g");
        self.spawn_jvpn("gateway", &g, &["gateway", "--config", &config])?;
        if !wait_until(Duration::from_secs(10), || self.status("gw").is_some()) {
            bail!("the gateway did not come up\n{}", self.diagnostics());
        }
        Ok(())
    }

    /// Starts the client (see [`Lab::client_config`]) and waits until its session is
    /// attached and its TUN is up; returns the session id.
    pub fn start_client(&mut self, on_end: &str, policy: &str) -> Result<String> {
        let key = self.gateway_key.public().to_string();
        let config = self
            .client_config(on_end, &key, policy)?
            .display()
            .to_string();
        let c = self.ns("c");
        self.spawn_jvpn(
            "client",
            &c,
            &["client", "--config", &config, "--connect-timeout", "10"],
        )?;
        let mut id = None;
        let dev = self.tun_name();
        let attached = wait_until(Duration::from_secs(10), || {
            let Some(s) = self.status("client") else {
                return false;
            };
            id = s["session_id"].as_str().map(str::to_string);
            s["state"] == "ATTACHED" && self.link_exists(&c, &dev)
        });
        match (attached, id) {
            (true, Some(id)) => Ok(id),
            _ => bail!("the client did not attach\n{}", self.diagnostics()),
        }
    }

    /// The admin socket of "gw" or "client".
    pub fn socket(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sock"))
    }

    /// Stops every process and deletes the namespaces and the directory.
    pub fn teardown(&mut self) {
        for (_, mut child) in self.processes.drain(..) {
            terminate(&mut child, Duration::from_secs(3));
        }
        for ns in self.namespaces.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
            let _ = std::fs::remove_dir_all(netns_etc(&ns));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// Processes still running with this lab's directory on their command line (none
    /// after teardown).
    pub fn leftover_processes(tag: &str) -> Vec<u32> {
        let marker = format!("jvlab-{tag}/");
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&marker))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Namespaces of this lab that still exist (none after teardown).
    pub fn leftovers(tag: &str) -> Vec<String> {
        let out = Command::new("ip").args(["netns", "list"]).output();
        let ours: Vec<String> = ["c", "g", "s", "x"]
            .iter()
            .map(|r| format!("jv{tag}{r}"))
            .collect();
        out.map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .filter(|n| ours.iter().any(|o| o == n))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
    }

    /// Removes whatever a lab `tag` left (processes, namespaces, directory), for a
    /// process interrupted before it could drop its lab.
    pub fn purge(tag: &str) {
        for pid in Lab::leftover_processes(tag) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        for ns in Lab::leftovers(tag) {
            let _ = ip(&["netns", "del", &ns]);
        }
        for role in ["c", "g", "s", "x"] {
            let _ = std::fs::remove_dir_all(netns_etc(&format!("jv{tag}{role}")));
        }
        let _ = std::fs::remove_dir_all(lab_dir(tag));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// SIGTERM, then SIGKILL after `limit`; the exit code if it exited by itself.
fn terminate(child: &mut Child, limit: Duration) -> Option<i32> {
    // `ip netns exec` execs the program: the child's pid is the program's.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Polls `cond` every 50 ms for at most `limit`; whether it held.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// (previous_state, new_state, reason_code) of the state changes among `events`.
pub fn transitions(events: &[serde_json::Value]) -> Vec<(String, String, String)> {
    events
        .iter()
        .filter(|e| e["event_type"] == "SessionStateChange")
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or("").to_string();
            (
                field("previous_state"),
                field("new_state"),
                field("reason_code"),
            )
        })
        .collect()
}

/// What a ping run saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PingGap {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// The longest run of lost replies, as time (missing × interval + interval).
    pub longest_gap: Duration,
    /// The replies' mean round-trip time, milliseconds (0 without replies).
    pub rtt_avg_ms: f64,
    /// Their 99th-percentile round-trip time, milliseconds.
    pub rtt_p99_ms: f64,
}

/// Reads `ping -n` output (interval `interval`): which sequence numbers came back, and the
/// longest gap between two that did.
pub fn ping_gap(output: &str, sent: u32, interval: Duration) -> PingGap {
    let mut seqs: Vec<u32> = output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let mut longest = 0u32;
    let mut previous = 0u32;
    for s in &seqs {
        longest = longest.max(s.saturating_sub(previous + 1));
        previous = *s;
    }
    longest = longest.max(sent.saturating_sub(previous));
    let mut rtts: Vec<f64> = output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("time="))
                .and_then(|t| t.parse().ok())
        })
        .collect();
    rtts.sort_by(f64::total_cmp);
    let rtt_avg_ms = if rtts.is_empty() {
        0.0
    } else {
        rtts.iter().sum::<f64>() / rtts.len() as f64
    };
    let rtt_p99_ms = rtts
        .get((rtts.len() * 99 / 100).min(rtts.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    PingGap {
        sent,
        received: seqs.len() as u32,
        longest_gap: interval * (longest + 1),
        rtt_avg_ms,
        rtt_p99_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ping_gap_is_the_longest_run_of_missing_replies() {
        let out = "PING 10.202.0.2 56(84) bytes of data.\n\
            64 bytes from 10.202.0.2: icmp_seq=1 ttl=63 time=0.2 ms\n\
            64 bytes from 10.202.0.2: icmp_seq=2 ttl=63 time=0.2 ms\n\
            64 bytes from 10.202.0.2: icmp_seq=7 ttl=63 time=0.2 ms\n\
            64 bytes from 10.202.0.2: icmp_seq=8 ttl=63 time=0.2 ms\n";
        let gap = ping_gap(out, 8, Duration::from_millis(50));
        assert_eq!(gap.received, 4);
        // 3..=6 missing: four intervals lost, five between the replies around them.
        assert_eq!(gap.longest_gap, Duration::from_millis(250));
    }
}
