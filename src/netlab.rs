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
//!
//! It needs nothing but root and the kernel: namespaces, links, addresses and routes
//! are made over netlink ([`crate::netlink`]), and a program is started in a namespace
//! from a thread that entered it. The end-to-end tests extend it with their tools
//! (firewall cuts, NAT, floods, leak watching) in the dev-only crate `jvpn-lab`.

use std::fs::File;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use jvpn_core::crypto::Keypair;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netlink::{self, Route, RouteVia, MAIN_TABLE};

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
    /// "a" or "b", as in the names of the path's links.
    pub fn letter(self) -> &'static str {
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

/// Whether this process can build a lab: root and /dev/net/tun. `Err` says why not.
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
    /// Both ends' tunnel MTU; `None`, the default: the configuration's default (1 380).
    pub tunnel_mtu: Option<u16>,
    /// A program that starts others in a namespace, given the namespace's name and the
    /// command (e.g. `ip netns exec`, which also gives them the namespace's own /etc
    /// files); empty, the default: the lab enters the namespace itself.
    pub launcher: Vec<String>,
}

/// A TOML list of strings.
fn quoted(items: &[String]) -> String {
    items
        .iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where `ip netns exec` takes a namespace's own /etc files from (the tests' lab gives
/// a namespace its own /etc/hosts there).
pub fn netns_etc(ns: &str) -> PathBuf {
    PathBuf::from("/etc/netns").join(ns)
}

fn lab_dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("jvlab-{tag}"))
}

/// Runs netlink requests `work` in the namespace `ns`.
pub fn in_ns<T, F, Fut>(ns: &str, work: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, netlink::NetlinkError>>,
{
    Ok(netlink::blocking(Some(ns), work)?)
}

/// Parses one of the lab's address constants.
pub fn addr(text: &str) -> IpAddr {
    text.parse().unwrap_or(IpAddr::from([0u8; 4]))
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
            tunnel_mtu: None,
            launcher: Vec::new(),
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

    /// The gateway-side interface of `path`.
    pub fn gateway_link(&self, path: Path2) -> String {
        format!("jv{}g{}", self.tag, path.letter())
    }

    /// Creates the namespace `ns` (replacing a stale one of that name) with its
    /// loopback up; it is deleted with the lab.
    pub fn add_namespace(&mut self, ns: &str) -> Result<()> {
        if Path::new(rtnetlink::NETNS_PATH).join(ns).exists() {
            let _ = netlink::del_netns(ns);
        }
        netlink::add_netns(ns)?;
        self.namespaces.push(ns.to_string());
        in_ns(
            ns,
            |h| async move { netlink::set_link(&h, "lo", true).await },
        )
    }

    /// Joins `ns1` and `ns2` by a veth pair `if1`–`if2` with the addresses `a1` and
    /// `a2` (address and prefix length, any number of each), both ends up.
    pub fn add_link(
        &mut self,
        (ns1, if1, a1): (&str, &str, &[(IpAddr, u8)]),
        (ns2, if2, a2): (&str, &str, &[(IpAddr, u8)]),
    ) -> Result<()> {
        let (i1, i2, n2) = (if1.to_string(), if2.to_string(), ns2.to_string());
        in_ns(ns1, move |h| async move {
            netlink::add_veth(&h, &i1, &i2, &n2).await
        })?;
        for (ns, dev, addrs) in [(ns1, if1, a1), (ns2, if2, a2)] {
            let (dev, addrs) = (dev.to_string(), addrs.to_vec());
            in_ns(ns, move |h| async move {
                for (a, prefix) in addrs {
                    netlink::add_address(&h, &dev, a, prefix).await?;
                }
                netlink::set_link(&h, &dev, true).await
            })?;
        }
        Ok(())
    }

    fn build(&mut self) -> Result<()> {
        for role in ["c", "g", "s"] {
            self.add_namespace(&self.ns(role))?;
        }
        let (c, g, s) = (self.ns("c"), self.ns("g"), self.ns("s"));
        let tag = self.tag.clone();
        let links = [
            (&c, "ca", CLIENT_A, &g, "ga", GATEWAY_A),
            (&c, "cb", CLIENT_B, &g, "gb", GATEWAY_B),
            (&g, "gs", GATEWAY_INSIDE, &s, "sg", SERVER),
        ];
        for (i, (ns1, if1, a1, ns2, if2, a2)) in links.into_iter().enumerate() {
            self.add_link(
                (
                    ns1,
                    &format!("jv{tag}{if1}"),
                    &[(addr(a1), 24), (addr(IPV6_LINKS[2 * i]), 64)],
                ),
                (
                    ns2,
                    &format!("jv{tag}{if2}"),
                    &[(addr(a2), 24), (addr(IPV6_LINKS[2 * i + 1]), 64)],
                ),
            )?;
        }
        // The server answers the tunnel network through the gateway (no masquerade).
        in_ns(&s, |h| async move {
            for (dst, prefix, gw) in [
                ("10.77.0.0", 24, GATEWAY_INSIDE),
                ("fd77::", 64, IPV6_LINKS[4]),
            ] {
                let route = Route {
                    dst: addr(dst),
                    prefix,
                    via: RouteVia::Gateway(addr(gw)),
                    table: MAIN_TABLE,
                };
                netlink::add_route(&h, &route).await?;
            }
            Ok(())
        })
    }

    /// Starts `argv` in `ns` in the background, its output into `<name>.out` and
    /// `<name>.err` in the lab directory. Stopped when the lab is dropped, if not before.
    pub fn spawn(&mut self, name: &str, ns: &str, argv: &[&str]) -> Result<()> {
        let out = File::create(self.dir.join(format!("{name}.out")))?;
        let err = File::create(self.dir.join(format!("{name}.err")))?;
        let mut full: Vec<&str> = self.launcher.iter().map(String::as_str).collect();
        if !full.is_empty() {
            full.push(ns);
        }
        full.extend_from_slice(argv);
        let (program, args) = full.split_first().context("an empty command")?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // A child starts in the network namespace of the thread that forks it.
        let child = netlink::in_netns_thread(ns, || command.spawn())
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

    /// The process id of `name`, if it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.processes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
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

    /// Sets the client's link on `path` down or up.
    pub fn link(&self, path: Path2, up: bool) -> Result<()> {
        let dev = self.client_link(path);
        let (own, own6) = match path {
            Path2::A => (addr(CLIENT_A), addr(IPV6_LINKS[0])),
            Path2::B => (addr(CLIENT_B), addr(IPV6_LINKS[2])),
        };
        in_ns(&self.ns("c"), move |h| async move {
            netlink::set_link(&h, &dev, up).await?;
            if up {
                // Its addresses and connected routes come back with the link, unless
                // the kernel kept them (it keeps IPv4 addresses, not IPv6 ones).
                for (a, prefix) in [(own, 24), (own6, 64)] {
                    match netlink::add_address(&h, &dev, a, prefix).await {
                        Err(e) if !e.is_exists() => return Err(e),
                        _ => {}
                    }
                }
            }
            Ok(())
        })
    }

    /// Cuts path A or B the way a network that dies somewhere in the middle does, with
    /// nothing but a route: the gateway's packets to the client's address on that path
    /// are thrown away (a `blackhole` route in the gateway's namespace). The client's
    /// own sends still succeed; nothing comes back: silence, which only the session's
    /// heartbeats notice.
    pub fn blackhole(&self, path: Path2) -> Result<()> {
        let client = match path {
            Path2::A => CLIENT_A,
            Path2::B => CLIENT_B,
        };
        let route = Route {
            dst: addr(client),
            prefix: 32,
            via: RouteVia::Blackhole,
            table: MAIN_TABLE,
        };
        in_ns(&self.ns("g"), move |h| async move {
            netlink::add_route(&h, &route).await
        })
    }

    /// Writes the gateway's configuration (policy overrides as TOML lines of the
    /// `[policy...]` tables, appended at the end) and returns its path.
    pub fn gateway_config(&self, policy: &str) -> Result<PathBuf> {
        let text = format!(
            "node_id = \"gw-{tag}\"\nprivate_key = \"{key}\"\nlisten = [{listen}]\n\
             [tunnel]\nname = \"jv{tag}t\"\naddress = {gateway_tunnel}\n{mtu}\
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
            mtu = self.tunnel_mtu_line(),
            gateway_tunnel = self.tunnel_list(&format!("{GATEWAY_TUNNEL}/24"), &format!("{GATEWAY_TUNNEL6}/64")),
            client_tunnel = self.tunnel_list(CLIENT_TUNNEL, CLIENT_TUNNEL6),
        );
        self.write("gateway.toml", &text)
    }

    /// The `[tunnel]` line of the lab's tunnel MTU, if it sets one.
    fn tunnel_mtu_line(&self) -> String {
        self.tunnel_mtu
            .map(|mtu| format!("mtu = {mtu}\n"))
            .unwrap_or_default()
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
             [tunnel]\nname = \"jv{tag}t\"\n{mtu}\
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
            mtu = self.tunnel_mtu_line(),
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
        let dev = dev.to_string();
        in_ns(ns, move |h| async move {
            netlink::link_index(&h, &dev, "link show").await
        })
        .is_ok()
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
            let _ = netlink::del_netns(&ns);
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
        ["c", "g", "s", "x"]
            .iter()
            .map(|r| format!("jv{tag}{r}"))
            .filter(|ns| Path::new(rtnetlink::NETNS_PATH).join(ns).exists())
            .collect()
    }

    /// Removes whatever a lab `tag` left (processes, namespaces, directory), for a
    /// process interrupted before it could drop its lab.
    pub fn purge(tag: &str) {
        for pid in Lab::leftover_processes(tag) {
            signal(pid, Signal::SIGKILL);
        }
        for ns in Lab::leftovers(tag) {
            let _ = netlink::del_netns(&ns);
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
    signal(child.id(), Signal::SIGTERM);
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

/// Sends `sig` to the process `pid`, if it is still there.
pub fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
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
    let replies = output.lines().filter(|l| l.contains("bytes from"));
    let field = |l: &str, key: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix(key).map(str::to_string))
    };
    let seqs = replies
        .clone()
        .filter_map(|l| field(l, "icmp_seq=")?.parse().ok())
        .collect();
    let rtts = replies
        .filter_map(|l| field(l, "time=")?.parse().ok())
        .collect();
    gap_of(seqs, rtts, sent, interval)
}

/// The gap and round-trip times of a probe run: `seqs` the sequence numbers (from 1)
/// that came back, `rtts_ms` their round-trip times, `sent` probes every `interval`.
pub fn gap_of(mut seqs: Vec<u32>, mut rtts_ms: Vec<f64>, sent: u32, interval: Duration) -> PingGap {
    seqs.sort_unstable();
    seqs.dedup();
    let mut longest = 0u32;
    let mut previous = 0u32;
    for s in &seqs {
        longest = longest.max(s.saturating_sub(previous + 1));
        previous = *s;
    }
    longest = longest.max(sent.saturating_sub(previous));
    rtts_ms.sort_by(f64::total_cmp);
    let rtt_avg_ms = if rtts_ms.is_empty() {
        0.0
    } else {
        rtts_ms.iter().sum::<f64>() / rtts_ms.len() as f64
    };
    let rtt_p99_ms = rtts_ms
        .get((rtts_ms.len() * 99 / 100).min(rtts_ms.len().saturating_sub(1)))
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
