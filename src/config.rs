//! The gateway's and the client's configuration files (TOML, examples with every key in
//! config/), with `JVPN_` environment overrides, checked into what the commands run.
//!
//! Every error names the file, the key and what is allowed; nothing starts on a bad file.
//! Environment overrides: `JVPN_<KEY>` for a top-level key and `JVPN_<SECTION>__<KEY>`
//! inside a section, e.g. `JVPN_TUNNEL__MTU=1300` or
//! `JVPN_POLICY__VOLATILITY__HEARTBEAT_INTERVAL_MS=100`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use jvpn_actors::tls::TlsPin;
use jvpn_core::crypto::{Keypair, PublicKey};
use jvpn_core::gateway::AuthorizedClient;
use jvpn_core::ids::Protocol;
use jvpn_core::policy::{Policy, PolicyConfig};
use jvpn_core::wire::{TunnelAddr, TunnelAddrs};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read or parsed, or a value has the wrong type.
    #[error("{file}: {problem}")]
    Read {
        /// The file.
        file: PathBuf,
        /// What the parser said (it names the key). Not the error's source: it is said
        /// once, here.
        problem: config::ConfigError,
    },
    /// An environment override is not a value its key takes (the file alone is fine).
    #[error("the environment overrides {names}: {problem} (variables JVPN_<KEY> and JVPN_<SECTION>__<KEY> override the file's keys)")]
    Environment {
        /// The overriding variables in use.
        names: String,
        /// What the parser said (it names the key).
        problem: config::ConfigError,
    },
    /// A value is of the right type but not allowed.
    #[error("{file}: `{key}`: {problem}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// The key, dotted.
        key: String,
        /// What is wrong and what is allowed.
        problem: String,
    },
}

fn invalid(file: &Path, key: &str, problem: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        file: file.to_path_buf(),
        key: key.to_string(),
        problem: problem.to_string(),
    }
}

/// Where events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventsOut {
    /// JSON lines on standard output.
    Stdout,
    /// JSON lines appended to a file.
    File(PathBuf),
}

/// A value written as one string or a list of them (`"a"` or `["a", "b"]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMore {
    /// One.
    One(String),
    /// A list.
    More(Vec<String>),
}

impl OneOrMore {
    fn items(&self) -> &[String] {
        match self {
            OneOrMore::One(one) => std::slice::from_ref(one),
            OneOrMore::More(more) => more,
        }
    }
}

/// The TUN device section, shared by both files.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSection {
    /// Interface name, 1 to 15 characters.
    pub name: String,
    /// Gateway only: its own tunnel address with prefix, e.g. "10.77.0.1/24", or one
    /// of each family, e.g. ["10.77.0.1/24", "fd77::1/64"].
    pub address: Option<OneOrMore>,
    /// The MTU, 576 to 65535.
    pub mtu: u16,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct AdminSection {
    socket: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct EventsSection {
    output: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ForwardingSection {
    enable: bool,
    masquerade_out: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    store: String,
    endpoints: Vec<String>,
    prefix: String,
    key_file: PathBuf,
    announce_interface: String,
    lease_ttl_ms: u64,
    fence_after_ms: u64,
    request_timeout_ms: u64,
    tls_ca_file: PathBuf,
    tls_cert_file: PathBuf,
    tls_key_file: PathBuf,
    user: String,
    password_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    name: String,
    public_key: String,
    tunnel_address: OneOrMore,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct GatewayFile {
    node_id: String,
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    listen: Vec<String>,
    session_capacity: usize,
    tunnel: TunnelSection,
    forwarding: ForwardingSection,
    admin: AdminSection,
    metrics: MetricsSection,
    events: EventsSection,
    cluster: ClusterSection,
    #[serde(default)]
    clients: Vec<ClientEntry>,
    policy: PolicyConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CandidateEntry {
    endpoint: String,
    bind: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RoutesSection {
    networks: Vec<String>,
    full_tunnel: bool,
    fwmark: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    private_key: Option<String>,
    private_key_file: Option<PathBuf>,
    gateway_public_key: String,
    gateway_tls_pin: Option<String>,
    on_session_end: String,
    #[serde(default)]
    candidates: Vec<CandidateEntry>,
    tunnel: TunnelSection,
    routes: RoutesSection,
    admin: AdminSection,
    metrics: MetricsSection,
    events: EventsSection,
    policy: PolicyConfig,
}

/// What `jvpn gateway` runs.
pub struct GatewaySetup {
    /// This node's id, in every event.
    pub node_id: String,
    /// The static key pair.
    pub keypair: Keypair,
    /// Listen addresses, each with its transport kind.
    pub listen: Vec<(Protocol, SocketAddr)>,
    /// Most sessions at once.
    pub session_capacity: usize,
    /// The TUN device.
    pub tunnel: TunnelSetup,
    /// Turn on IPv4 forwarding while running.
    pub forward: bool,
    /// Masquerade tunnel traffic leaving through this interface.
    pub masquerade_out: Option<String>,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Where /metrics is served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Where events go.
    pub events: EventsOut,
    /// Who may connect, with their tunnel addresses.
    pub clients: Vec<(String, AuthorizedClient)>,
    /// The policy.
    pub policy: Policy,
    /// The cluster this node is part of (none: a lone node, `store = "memory"`).
    pub cluster: Option<ClusterSetup>,
}

/// A node's part in a gateway cluster (`[cluster]`, `store = "etcd"`).
pub struct ClusterSetup {
    /// How to reach etcd.
    pub store: jvpn_cluster::EtcdOptions,
    /// The key session keys are sealed under in the table.
    pub key: std::sync::Arc<jvpn_core::cluster::ClusterKey>,
    /// The inside interface the node answers ARP on for its sessions' tunnel addresses.
    pub announce_interface: Option<String>,
    /// The node's lease in etcd.
    pub lease_ttl: std::time::Duration,
    /// No renewal for this long: the node fences itself.
    pub fence_after: std::time::Duration,
}

/// A TUN device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSetup {
    /// Interface name.
    pub name: String,
    /// Its addresses with their prefixes (the client's come from the gateway).
    pub address: Option<TunnelAddrs>,
    /// MTU.
    pub mtu: u16,
}

/// What the client does when its session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnEnd {
    /// Exit (non-zero), reporting the reason.
    Exit,
    /// Start a new session (a new handshake, a new session id).
    Reconnect,
}

/// One candidate path to the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateSetup {
    /// The transport kind.
    pub protocol: Protocol,
    /// The host name and port it was given as, if a name (resolved again when every
    /// candidate of that name has failed).
    pub name: Option<(String, u16)>,
    /// The gateway's address on this path.
    pub endpoint: SocketAddr,
    /// The local address to send from (a path is chosen by it), if set.
    pub bind: Option<SocketAddr>,
}

/// What `jvpn client` runs.
pub struct ClientSetup {
    /// The static key pair.
    pub keypair: Keypair,
    /// The gateway's pinned public key.
    pub gateway: PublicKey,
    /// The gateway's TLS certificate pin (QUIC and TCP candidates), as `jvpn tls-pin`
    /// prints it.
    pub gateway_tls_pin: Option<TlsPin>,
    /// On session end.
    pub on_end: OnEnd,
    /// The candidate paths, in preference order.
    pub candidates: Vec<CandidateSetup>,
    /// The TUN device (its address is assigned by the gateway).
    pub tunnel: TunnelSetup,
    /// Networks routed into the tunnel.
    pub networks: Vec<(IpAddr, u8)>,
    /// Route everything into the tunnel (the transports' own packets excepted).
    pub full_tunnel: bool,
    /// The firewall mark on the transports' packets (full tunnel).
    pub fwmark: u32,
    /// The admin socket.
    pub admin_socket: PathBuf,
    /// Where /metrics is served, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Where events go.
    pub events: EventsOut,
    /// The policy.
    pub policy: Policy,
}

/// Defaults for every key that has one; the file and the environment override them.
fn defaults(
    builder: config::ConfigBuilder<config::builder::DefaultState>,
    pairs: &[(&str, config::Value)],
) -> Result<config::ConfigBuilder<config::builder::DefaultState>, config::ConfigError> {
    let mut b = builder.add_source(PolicyDefaults::source()?);
    for (key, value) in pairs {
        b = b.set_default(*key, value.clone())?;
    }
    Ok(b)
}

/// The starter policy under the `policy` key: what a gateway or client file's
/// `[policy]` fills in (also for `jvpn check-policy` on such a file).
#[derive(Serialize)]
pub(crate) struct PolicyDefaults {
    policy: PolicyConfig,
}

impl PolicyDefaults {
    /// The starter policy as a configuration source.
    pub(crate) fn source() -> Result<config::Config, config::ConfigError> {
        config::Config::try_from(&PolicyDefaults {
            policy: PolicyConfig::starter(),
        })
    }
}

/// Whether the variable `name` overrides one of `keys` (the file's top-level keys):
/// `JVPN_<KEY>` or `JVPN_<KEY>__<SUBKEY>…`. Any other name that happens to start with
/// `JVPN_` (a script's `JVPN_BIN`, say) is not the program's and is left alone.
fn overrides(name: &str, keys: &[&str]) -> bool {
    name.strip_prefix("JVPN_")
        .and_then(|rest| rest.split("__").next())
        .is_some_and(|first| keys.contains(&first.to_ascii_lowercase().as_str()))
}

fn read<T: serde::de::DeserializeOwned>(
    file: &Path,
    pairs: &[(&str, config::Value)],
    lists: &[&str],
    keys: &[&str],
    env: Option<HashMap<String, String>>,
) -> Result<T, ConfigError> {
    // (`vars_os`: a variable that is not UTF-8 is not one of ours, and must not panic.)
    let process = || {
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    };
    let vars: HashMap<String, String> = env
        .unwrap_or_else(process)
        .into_iter()
        .filter(|(name, _)| overrides(name, keys))
        .collect();
    let build = |vars: HashMap<String, String>| -> Result<T, config::ConfigError> {
        let mut environment = config::Environment::with_prefix("JVPN")
            .prefix_separator("_")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(vars));
        for key in lists {
            environment = environment.with_list_parse_key(key);
        }
        defaults(config::Config::builder(), pairs)?
            .add_source(config::File::from(file).format(config::FileFormat::Toml))
            .add_source(environment)
            .build()
            .and_then(|c| c.try_deserialize())
    };
    let with_env = match build(vars.clone()) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    let from_file = |problem| ConfigError::Read {
        file: file.to_path_buf(),
        problem,
    };
    if vars.is_empty() {
        return Err(from_file(with_env));
    }
    // Blame the environment only if the file alone is fine.
    match build(HashMap::new()) {
        Err(problem) => Err(from_file(problem)),
        Ok(_) => {
            let mut names: Vec<&str> = vars.keys().map(String::as_str).collect();
            names.sort_unstable();
            Err(ConfigError::Environment {
                names: names.join(", "),
                problem: with_env,
            })
        }
    }
}

/// The top-level keys of a gateway file (what `JVPN_` variables may override).
const GATEWAY_KEYS: &[&str] = &[
    "node_id",
    "private_key",
    "private_key_file",
    "listen",
    "session_capacity",
    "tunnel",
    "forwarding",
    "admin",
    "metrics",
    "events",
    "cluster",
    "clients",
    "policy",
];

/// The top-level keys of a client file (what `JVPN_` variables may override).
const CLIENT_KEYS: &[&str] = &[
    "private_key",
    "private_key_file",
    "gateway_public_key",
    "gateway_tls_pin",
    "on_session_end",
    "candidates",
    "tunnel",
    "routes",
    "admin",
    "metrics",
    "events",
    "policy",
];

fn common_defaults(admin: &str) -> Vec<(&'static str, config::Value)> {
    vec![
        ("tunnel.mtu", 1380.into()),
        ("admin.socket", admin.into()),
        ("metrics.listen", "".into()),
        ("events.output", "stdout".into()),
    ]
}

/// Loads the gateway configuration at `file`; `env` replaces the process environment
/// for overrides when given (tests).
pub fn load_gateway(
    file: &Path,
    env: Option<HashMap<String, String>>,
) -> Result<GatewaySetup, ConfigError> {
    let mut pairs = common_defaults("/run/jvpn/gateway.sock");
    pairs.extend([
        ("session_capacity", 1024.into()),
        ("forwarding.enable", false.into()),
        ("forwarding.masquerade_out", "".into()),
        ("cluster.store", "memory".into()),
        ("cluster.endpoints", Vec::<String>::new().into()),
        ("cluster.prefix", "/jvpn".into()),
        ("cluster.key_file", "".into()),
        ("cluster.announce_interface", "".into()),
        ("cluster.lease_ttl_ms", 6000.into()),
        ("cluster.fence_after_ms", 4000.into()),
        ("cluster.request_timeout_ms", 2000.into()),
        ("cluster.tls_ca_file", "".into()),
        ("cluster.tls_cert_file", "".into()),
        ("cluster.tls_key_file", "".into()),
        ("cluster.user", "".into()),
        ("cluster.password_file", "".into()),
    ]);
    let raw: GatewayFile = read(
        file,
        &pairs,
        &["listen", "tunnel.address", "cluster.endpoints"],
        GATEWAY_KEYS,
        env,
    )?;
    let bad = |key: &str, problem: String| invalid(file, key, problem);
    if raw.node_id.is_empty() || raw.node_id.len() > 64 {
        return Err(bad("node_id", "must be 1 to 64 characters".into()));
    }
    let keypair = private_key(file, raw.private_key, raw.private_key_file)?;
    if raw.listen.is_empty() || raw.listen.len() > 16 {
        return Err(bad(
            "listen",
            format!(
                "{} addresses given; 1 to 16 allowed (\"IP:PORT\")",
                raw.listen.len()
            ),
        ));
    }
    let policy = policy(file, raw.policy)?;
    let mut listen = Vec::new();
    for (i, a) in raw.listen.iter().enumerate() {
        let key = format!("listen[{i}]");
        let (protocol, addr) = transport_address(a).map_err(|p| bad(&key, p))?;
        if !policy.allows(protocol) {
            return Err(bad(
                &key,
                format!("{protocol} is not in the policy's transport.allowed_protocols"),
            ));
        }
        if listen.contains(&(protocol, addr)) {
            return Err(bad(&key, format!("{protocol}://{addr} is listed twice")));
        }
        listen.push((protocol, addr));
    }
    if !(1..=1_000_000).contains(&raw.session_capacity) {
        return Err(bad(
            "session_capacity",
            format!("{} is outside 1 to 1000000", raw.session_capacity),
        ));
    }
    let tunnel = tunnel(file, &raw.tunnel, true)?;
    let Some(networks) = tunnel.address else {
        return Err(bad("tunnel.address", "required on a gateway".into()));
    };
    for net in networks.iter() {
        let most = if net.addr.is_ipv4() { 30 } else { 126 };
        if net.prefix == 0 || net.prefix > most {
            return Err(bad(
                "tunnel.address",
                format!("{net}: the tunnel network needs room for clients (/1 to /30 for IPv4, /1 to /126 for IPv6)"),
            ));
        }
    }
    let masquerade_out = non_empty(raw.forwarding.masquerade_out);
    if let Some(out) = masquerade_out.as_deref().filter(|o| !interface_name(o)) {
        return Err(bad(
            "forwarding.masquerade_out",
            format!("{out:?}: an interface name, {INTERFACE_NAME}; or \"\" for none"),
        ));
    }
    if raw.clients.len() > raw.session_capacity {
        return Err(bad(
            "clients",
            format!(
                "{} clients exceed session_capacity {}",
                raw.clients.len(),
                raw.session_capacity
            ),
        ));
    }
    let mut clients = Vec::new();
    let mut keys = HashSet::new();
    let mut taken: HashSet<IpAddr> = networks.iter().map(|n| n.addr).collect();
    for (i, c) in raw.clients.iter().enumerate() {
        let key = |k: &str| format!("clients[{i}].{k}");
        let public: PublicKey = c.public_key.trim().parse().map_err(|_| {
            bad(
                &key("public_key"),
                "not a public key (44 characters of base64, as `jvpn pubkey` prints)".into(),
            )
        })?;
        if !keys.insert(public) {
            return Err(bad(&key("public_key"), "listed for two clients".into()));
        }
        let mut addrs = Vec::new();
        for text in c.tunnel_address.items() {
            let addr: IpAddr = text.parse().map_err(|_| {
                bad(
                    &key("tunnel_address"),
                    format!("{text:?} is not an IP address"),
                )
            })?;
            let Some(net) = networks.of_family(addr) else {
                return Err(bad(
                    &key("tunnel_address"),
                    format!("{addr}: the gateway's tunnel.address has no network of this family ({networks})"),
                ));
            };
            if !same_network(addr, net.addr, net.prefix) {
                return Err(bad(
                    &key("tunnel_address"),
                    format!("{addr} is outside the gateway's tunnel network {net}"),
                ));
            }
            if !taken.insert(addr) {
                return Err(bad(
                    &key("tunnel_address"),
                    format!("{addr} is already taken"),
                ));
            }
            addrs.push(TunnelAddr {
                addr,
                prefix: net.prefix,
            });
        }
        let tunnel =
            TunnelAddrs::new(addrs).map_err(|e| bad(&key("tunnel_address"), e.to_string()))?;
        clients.push((c.name.clone(), AuthorizedClient { public, tunnel }));
    }
    Ok(GatewaySetup {
        node_id: raw.node_id,
        keypair,
        listen,
        session_capacity: raw.session_capacity,
        tunnel,
        forward: raw.forwarding.enable,
        masquerade_out,
        admin_socket: raw.admin.socket,
        metrics: metrics(file, &raw.metrics.listen)?,
        events: events(&raw.events.output),
        clients,
        policy,
        cluster: cluster(file, raw.cluster)?,
    })
}

/// `path` relative to the configuration file's directory; none when empty.
fn beside(file: &Path, path: PathBuf) -> Option<PathBuf> {
    if path.as_os_str().is_empty() {
        return None;
    }
    Some(if path.is_relative() {
        file.parent().unwrap_or(Path::new(".")).join(path)
    } else {
        path
    })
}

/// The most a certificate or password file of `[cluster]` is read.
const CLUSTER_FILE_MAX: u64 = 64 * 1024;

fn read_small(file: &Path, key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    use std::io::Read;
    let shown = path.display();
    let opened = std::fs::File::open(path)
        .map_err(|e| invalid(file, key, format!("cannot read {shown}: {e}")))?;
    let mut bytes = Vec::new();
    opened
        .take(CLUSTER_FILE_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(file, key, format!("cannot read {shown}: {e}")))?;
    if bytes.len() as u64 > CLUSTER_FILE_MAX {
        return Err(invalid(
            file,
            key,
            format!("{shown} is longer than {CLUSTER_FILE_MAX} bytes"),
        ));
    }
    Ok(bytes)
}

/// The `[cluster]` section, checked.
fn cluster(file: &Path, raw: ClusterSection) -> Result<Option<ClusterSetup>, ConfigError> {
    let bad = |key: &str, problem: String| invalid(file, &format!("cluster.{key}"), problem);
    match raw.store.as_str() {
        "memory" => return Ok(None),
        "etcd" => {}
        other => {
            return Err(bad(
                "store",
                format!("{other:?}: \"memory\" (one node) or \"etcd\" (a cluster)"),
            ))
        }
    }
    if raw.endpoints.is_empty() || raw.endpoints.len() > 16 {
        return Err(bad(
            "endpoints",
            format!(
                "{} given; 1 to 16 etcd client URLs (\"http://10.0.9.1:2379\") with store = \"etcd\"",
                raw.endpoints.len()
            ),
        ));
    }
    let mut tls_needed = false;
    for (i, e) in raw.endpoints.iter().enumerate() {
        let rest = match (e.strip_prefix("http://"), e.strip_prefix("https://")) {
            (Some(rest), _) => rest,
            (None, Some(rest)) => {
                tls_needed = true;
                rest
            }
            _ => {
                return Err(bad(
                    &format!("endpoints[{i}]"),
                    format!("{e:?}: an etcd client URL, http://HOST:PORT or https://HOST:PORT"),
                ))
            }
        };
        if host_name(rest).is_none() && rest.parse::<SocketAddr>().is_err() {
            return Err(bad(
                &format!("endpoints[{i}]"),
                format!("{e:?}: HOST:PORT after the scheme"),
            ));
        }
    }
    let prefix = raw.prefix.trim_end_matches('/');
    if !raw.prefix.starts_with('/')
        || prefix.is_empty()
        || raw.prefix.len() > 128
        || raw
            .prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad(
            "prefix",
            format!("{:?}: a key prefix such as \"/jvpn\" (starts with /, 2 to 128 characters, no spaces)", raw.prefix),
        ));
    }
    let Some(key_path) = beside(file, raw.key_file) else {
        return Err(bad(
            "key_file",
            "required with store = \"etcd\": a file holding the cluster key (32 bytes of base64, as `jvpn keygen` prints), the same on every node".into(),
        ));
    };
    let key_text = read_key_file(&key_path).map_err(|why| bad("key_file", why))?;
    let key = jvpn_core::cluster::ClusterKey::from_base64(&key_text)
        .map_err(|e| bad("key_file", format!("{}: {e}", key_path.display())))?;
    let announce_interface = non_empty(raw.announce_interface);
    if let Some(dev) = announce_interface.as_deref().filter(|d| !interface_name(d)) {
        return Err(bad(
            "announce_interface",
            format!("{dev:?}: an interface name, {INTERFACE_NAME}; or \"\" for none"),
        ));
    }
    if !raw.lease_ttl_ms.is_multiple_of(1000) || !(3_000..=300_000).contains(&raw.lease_ttl_ms) {
        return Err(bad(
            "lease_ttl_ms",
            format!(
                "{}: whole seconds (etcd's leases), 3000 to 300000",
                raw.lease_ttl_ms
            ),
        ));
    }
    let lease_ttl = std::time::Duration::from_millis(raw.lease_ttl_ms);
    let fence_after = std::time::Duration::from_millis(raw.fence_after_ms);
    jvpn_core::cluster::LeaseHold::new(lease_ttl, fence_after, std::time::Instant::now())
        .map_err(|why| bad("fence_after_ms", why))?;
    if !(100..=30_000).contains(&raw.request_timeout_ms) {
        return Err(bad(
            "request_timeout_ms",
            format!("{}: 100 to 30000", raw.request_timeout_ms),
        ));
    }
    let tls_ca = beside(file, raw.tls_ca_file)
        .map(|p| read_small(file, "cluster.tls_ca_file", &p))
        .transpose()?;
    if tls_needed && tls_ca.is_none() {
        return Err(bad(
            "tls_ca_file",
            "required with https:// endpoints: the CA certificate (PEM) that signs etcd's".into(),
        ));
    }
    let tls_identity = match (beside(file, raw.tls_cert_file), beside(file, raw.tls_key_file)) {
        (None, None) => None,
        (Some(cert), Some(key)) => Some((
            read_small(file, "cluster.tls_cert_file", &cert)?,
            read_small(file, "cluster.tls_key_file", &key)?,
        )),
        _ => {
            return Err(bad(
                "tls_cert_file",
                "give both `tls_cert_file` and `tls_key_file` (a client certificate and its key), or neither".into(),
            ))
        }
    };
    let user = match (non_empty(raw.user), beside(file, raw.password_file)) {
        (None, None) => None,
        (Some(user), Some(path)) => {
            let password = read_small(file, "cluster.password_file", &path)?;
            let password = String::from_utf8(password)
                .map_err(|_| bad("password_file", "not UTF-8 text".into()))?;
            Some((user, password.trim_end_matches(['\r', '\n']).to_string()))
        }
        _ => {
            return Err(bad(
                "user",
                "give both `user` and `password_file` (etcd's authentication), or neither".into(),
            ))
        }
    };
    Ok(Some(ClusterSetup {
        store: jvpn_cluster::EtcdOptions {
            endpoints: raw.endpoints,
            prefix: prefix.to_string(),
            user,
            tls_ca,
            tls_identity,
            timeout: std::time::Duration::from_millis(raw.request_timeout_ms),
        },
        key: std::sync::Arc::new(key),
        announce_interface,
        lease_ttl,
        fence_after,
    }))
}

/// The host name and port of a transport address written with a name (not an IP).
fn host_name(text: &str) -> Option<(String, u16)> {
    let rest = text.split_once("://").map_or(text, |(_, r)| r);
    if rest.parse::<SocketAddr>().is_ok() {
        return None;
    }
    let (host, port) = rest.rsplit_once(':')?;
    Some((host.to_string(), port.parse().ok()?))
}

/// Parses a transport address: `udp://HOST:PORT`, `quic://HOST:PORT`,
/// `tcp://HOST:PORT`, or a bare `HOST:PORT` (UDP). A HOST that is a name is resolved
/// now (its first address).
pub fn transport_address(text: &str) -> Result<(Protocol, SocketAddr), String> {
    use std::net::ToSocketAddrs;
    let (protocol, rest) = match text.split_once("://") {
        None => (Protocol::Udp, text),
        Some(("udp", rest)) => (Protocol::Udp, rest),
        Some(("quic", rest)) => (Protocol::Quic, rest),
        Some(("tcp", rest)) => (Protocol::Tcp, rest),
        Some((other, _)) => {
            return Err(format!(
                "{other:?}: the transports are udp://, quic:// and tcp:// (a bare HOST:PORT is UDP)"
            ))
        }
    };
    if let Ok(addr) = rest.parse::<SocketAddr>() {
        return Ok((protocol, addr));
    }
    let problem = || {
        format!("{text:?} is not an address (\"[udp|quic|tcp]://HOST:PORT\", e.g. \"quic://198.51.100.1:443\")")
    };
    let (host, port) = rest.rsplit_once(':').ok_or_else(problem)?;
    let port: u16 = port.parse().map_err(|_| problem())?;
    if host.is_empty() {
        return Err(problem());
    }
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("{host:?} cannot be resolved: {e}"))?
        .next()
        .ok_or_else(|| format!("{host:?} has no address"))?;
    Ok((protocol, addr))
}

/// Loads the client configuration at `file` (see [`load_gateway`]).
pub fn load_client(
    file: &Path,
    env: Option<HashMap<String, String>>,
) -> Result<ClientSetup, ConfigError> {
    let mut pairs = common_defaults("/run/jvpn/client.sock");
    pairs.extend([
        ("on_session_end", "exit".into()),
        ("tunnel.name", "jv1".into()),
        ("routes.networks", config::Value::from(Vec::<String>::new())),
        ("routes.full_tunnel", false.into()),
        ("routes.fwmark", 51820.into()),
    ]);
    let raw: ClientFile = read(file, &pairs, &["routes.networks"], CLIENT_KEYS, env)?;
    let bad = |key: &str, problem: String| invalid(file, key, problem);
    let keypair = private_key(file, raw.private_key, raw.private_key_file)?;
    let gateway: PublicKey = raw.gateway_public_key.trim().parse().map_err(|_| {
        bad(
            "gateway_public_key",
            "not a public key (44 characters of base64, as `jvpn pubkey` prints)".into(),
        )
    })?;
    let on_end = match raw.on_session_end.as_str() {
        "exit" => OnEnd::Exit,
        "reconnect" => OnEnd::Reconnect,
        other => {
            return Err(bad(
                "on_session_end",
                format!("{other:?}: allowed are \"exit\" and \"reconnect\""),
            ))
        }
    };
    let policy = policy(file, raw.policy)?;
    let most = policy.max_candidate_count();
    if raw.candidates.is_empty() || raw.candidates.len() > most {
        return Err(bad(
            "candidates",
            format!(
                "{} given; 1 to {most} allowed (policy transport.max_candidate_count)",
                raw.candidates.len()
            ),
        ));
    }
    let mut candidates = Vec::new();
    for (i, c) in raw.candidates.iter().enumerate() {
        let key = format!("candidates[{i}].endpoint");
        let (protocol, endpoint) = transport_address(&c.endpoint).map_err(|p| bad(&key, p))?;
        if !policy.allows(protocol) {
            return Err(bad(
                &key,
                format!("{protocol} is not in the policy's transport.allowed_protocols"),
            ));
        }
        let bind = match &c.bind {
            None => None,
            Some(b) => Some(b.parse::<SocketAddr>().map_err(|_| {
                bad(
                    &format!("candidates[{i}].bind"),
                    format!("{b:?} is not an address (\"IP:PORT\", port 0 for any)"),
                )
            })?),
        };
        let candidate = CandidateSetup {
            protocol,
            name: host_name(&c.endpoint),
            endpoint,
            bind,
        };
        if candidates.contains(&candidate) {
            return Err(bad(
                &format!("candidates[{i}]"),
                "the same path is listed twice".into(),
            ));
        }
        candidates.push(candidate);
    }
    let tunnel = tunnel(file, &raw.tunnel, false)?;
    let mut networks = Vec::new();
    for (i, n) in raw.routes.networks.iter().enumerate() {
        networks.push(prefix(n).map_err(|p| bad(&format!("routes.networks[{i}]"), p))?);
    }
    // The mark doubles as the routing table number: not 0, nor the kernel's own
    // tables (253 default, 254 main, 255 local).
    if matches!(raw.routes.fwmark, 0 | 253..=255) {
        return Err(bad(
            "routes.fwmark",
            format!(
                "{} is reserved (0, and the kernel's tables 253 to 255); 51820 is usual",
                raw.routes.fwmark
            ),
        ));
    }
    let gateway_tls_pin = match raw.gateway_tls_pin.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(pin) => Some(
            pin.parse::<TlsPin>()
                .map_err(|e| bad("gateway_tls_pin", e.to_string()))?,
        ),
    };
    if gateway_tls_pin.is_none() {
        if let Some(i) = candidates.iter().position(|c| c.protocol != Protocol::Udp) {
            return Err(bad(
                &format!("candidates[{i}].endpoint"),
                "a QUIC or TCP candidate needs gateway_tls_pin (the gateway prints it at start; `jvpn tls-pin --config gateway.toml` too)".into(),
            ));
        }
    }
    Ok(ClientSetup {
        keypair,
        gateway,
        gateway_tls_pin,
        on_end,
        candidates,
        tunnel,
        networks,
        full_tunnel: raw.routes.full_tunnel,
        fwmark: raw.routes.fwmark,
        admin_socket: raw.admin.socket,
        metrics: metrics(file, &raw.metrics.listen)?,
        events: events(&raw.events.output),
        policy,
    })
}

fn private_key(
    file: &Path,
    inline: Option<String>,
    path: Option<PathBuf>,
) -> Result<Keypair, ConfigError> {
    // An empty value (e.g. an environment override clearing the file's key) is absent.
    let inline = inline.filter(|k| !k.is_empty());
    let path = path.filter(|p| !p.as_os_str().is_empty());
    let text = match (inline, path) {
        (Some(k), None) => Zeroizing::new(k),
        (None, Some(p)) => {
            let p = if p.is_relative() {
                file.parent().unwrap_or(Path::new(".")).join(p)
            } else {
                p
            };
            read_key_file(&p).map_err(|why| invalid(file, "private_key_file", why))?
        }
        _ => {
            return Err(invalid(
                file,
                "private_key",
                "give exactly one of `private_key` and `private_key_file`",
            ))
        }
    };
    Keypair::from_base64(text.trim()).map_err(|_| {
        invalid(
            file,
            "private_key",
            "not a private key (44 characters of base64, as `jvpn keygen` prints)",
        )
    })
}

/// The most a key file is read: a key is 44 characters; comments and line ends are
/// allowed, a file of any size is not (`/dev/zero` would be read forever).
pub const KEY_FILE_MAX: u64 = 1_024;

/// Reads a key file, at most [`KEY_FILE_MAX`] bytes; a longer one is refused.
fn read_key_file(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::io::Read;
    let shown = path.display();
    let opened = std::fs::File::open(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    let mut text = Zeroizing::new(String::new());
    opened
        .take(KEY_FILE_MAX + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {shown}: {e}"))?;
    if text.len() as u64 > KEY_FILE_MAX {
        return Err(format!(
            "{shown} is longer than {KEY_FILE_MAX} bytes: not a key file (a key is 44 characters of base64, as `jvpn keygen` prints)"
        ));
    }
    Ok(text)
}

/// Whether `name` is an interface name the kernel takes.
fn interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

const INTERFACE_NAME: &str = "1 to 15 characters of letters, digits, '-', '_', '.'";

fn tunnel(file: &Path, t: &TunnelSection, gateway: bool) -> Result<TunnelSetup, ConfigError> {
    if !interface_name(&t.name) {
        return Err(invalid(
            file,
            "tunnel.name",
            format!("{:?}: {INTERFACE_NAME}", t.name),
        ));
    }
    if t.mtu < 576 {
        return Err(invalid(
            file,
            "tunnel.mtu",
            format!("{} is below 576", t.mtu),
        ));
    }
    let address = match (&t.address, gateway) {
        (Some(a), true) => {
            let mut addrs = Vec::new();
            for text in a.items() {
                let (addr, prefix) =
                    prefix(text).map_err(|p| invalid(file, "tunnel.address", p))?;
                addrs.push(TunnelAddr { addr, prefix });
            }
            let addrs = TunnelAddrs::new(addrs)
                .map_err(|e| invalid(file, "tunnel.address", e.to_string()))?;
            if addrs.v6().is_some() && t.mtu < IPV6_MIN_MTU {
                return Err(invalid(
                    file,
                    "tunnel.mtu",
                    format!("{} is below {IPV6_MIN_MTU}, the least IPv6 allows (the tunnel has an IPv6 address)", t.mtu),
                ));
            }
            Some(addrs)
        }
        (None, _) => None,
        (Some(_), false) => {
            return Err(invalid(
                file,
                "tunnel.address",
                "not set on a client: the gateway assigns it",
            ))
        }
    };
    Ok(TunnelSetup {
        name: t.name.clone(),
        address,
        mtu: t.mtu,
    })
}

/// The least MTU of a link that carries IPv6 (RFC 8200).
pub const IPV6_MIN_MTU: u16 = 1280;

/// Parses "ADDR/PREFIX".
fn prefix(text: &str) -> Result<(IpAddr, u8), String> {
    let problem = || format!("{text:?} is not an address with a prefix, e.g. \"10.77.0.1/24\"");
    let (addr, len) = text.split_once('/').ok_or_else(problem)?;
    let addr: IpAddr = addr.parse().map_err(|_| problem())?;
    let len: u8 = len.parse().map_err(|_| problem())?;
    let most = if addr.is_ipv4() { 32 } else { 128 };
    if len > most {
        return Err(format!("prefix /{len} is longer than {most}"));
    }
    Ok((addr, len))
}

/// Whether `a` is in `net`/`prefix`.
pub fn same_network(a: IpAddr, net: IpAddr, prefix: u8) -> bool {
    a.is_ipv4() == net.is_ipv4()
        && crate::netconf::network_of(a, prefix) == crate::netconf::network_of(net, prefix)
}

fn metrics(file: &Path, listen: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if listen.is_empty() {
        return Ok(None);
    }
    listen.parse().map(Some).map_err(|_| {
        invalid(
            file,
            "metrics.listen",
            format!("{listen:?} is not an address (\"IP:PORT\", or \"\" for none)"),
        )
    })
}

fn events(output: &str) -> EventsOut {
    match output {
        "stdout" | "" | "-" => EventsOut::Stdout,
        path => EventsOut::File(PathBuf::from(path)),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

fn policy(file: &Path, raw: PolicyConfig) -> Result<Policy, ConfigError> {
    raw.validate().map_err(|e| invalid(file, "policy", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    fn key() -> String {
        Keypair::generate()
            .expect("key")
            .private_base64()
            .as_str()
            .to_string()
    }

    fn public() -> String {
        Keypair::generate().expect("key").public().to_string()
    }

    fn gateway_text(extra: &str) -> String {
        format!(
            "node_id = \"gw\"\nprivate_key = \"{}\"\nlisten = [\"127.0.0.1:51820\"]\n\
             [tunnel]\nname = \"jv0\"\naddress = \"10.77.0.1/24\"\n{extra}\n\
             [[clients]]\nname = \"a\"\npublic_key = \"{}\"\ntunnel_address = \"10.77.0.2\"\n",
            key(),
            public()
        )
    }

    fn no_env() -> Option<HashMap<String, String>> {
        Some(HashMap::new())
    }

    /// `/dev/zero` as a key file: refused with what is wrong, not read forever.
    #[test]
    fn a_key_file_of_unbounded_size_is_refused_not_read_forever() {
        let text: Vec<String> = gateway_text("")
            .lines()
            .map(|l| match l.starts_with("private_key") {
                true => "private_key_file = \"/dev/zero\"".to_string(),
                false => l.to_string(),
            })
            .collect();
        let f = file(&text.join("\n"));
        let Err(err) = load_gateway(f.path(), no_env()) else {
            panic!("a /dev/zero key file was taken");
        };
        let message = format!("{err:#}");
        assert!(message.contains("private_key_file"), "{message}");
        assert!(message.contains("longer than 1024 bytes"), "{message}");
    }

    /// A script's `JVPN_BIN` is not the program's; a bad override is blamed on the
    /// variable, not on the file, and the error says it once.
    #[test]
    fn unrelated_variables_are_ignored_and_a_bad_override_names_the_variable() {
        let f = file(&gateway_text(""));
        let env = Some(HashMap::from([(
            "JVPN_BIN".to_string(),
            "/usr/bin/jvpn".to_string(),
        )]));
        assert!(load_gateway(f.path(), env).is_ok());
        let env = Some(HashMap::from([(
            "JVPN_TUNNEL__MTU".to_string(),
            "huge".to_string(),
        )]));
        let Err(err) = load_gateway(f.path(), env) else {
            panic!("a bad override was taken");
        };
        let message = format!("{:#}", anyhow::Error::new(err));
        assert!(message.contains("JVPN_TUNNEL__MTU"), "{message}");
        assert!(message.contains("mtu"), "{message}");
        assert_eq!(message.matches("huge").count(), 1, "said once: {message}");
    }

    #[test]
    fn the_example_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let env = Some(HashMap::from([
            ("JVPN_PRIVATE_KEY".to_string(), key()),
            ("JVPN_PRIVATE_KEY_FILE".to_string(), String::new()),
        ]));
        let gw = load_gateway(&dir.join("gateway.toml"), env.clone());
        assert!(gw.is_ok(), "{:?}", gw.err());
        let client = load_client(&dir.join("client.toml"), env);
        assert!(client.is_ok(), "{:?}", client.err());
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out_and_the_environment_overrides() {
        let f = file(&gateway_text(""));
        let env = Some(HashMap::from([
            ("JVPN_TUNNEL__MTU".to_string(), "1300".to_string()),
            (
                "JVPN_POLICY__VOLATILITY__HEARTBEAT_INTERVAL_MS".to_string(),
                "100".to_string(),
            ),
        ]));
        let gw = load_gateway(f.path(), env).expect("loads");
        assert_eq!(gw.tunnel.mtu, 1300);
        assert_eq!(
            gw.policy.heartbeat_interval(),
            std::time::Duration::from_millis(100)
        );
        assert_eq!(gw.admin_socket, PathBuf::from("/run/jvpn/gateway.sock"));
        assert_eq!(gw.clients.len(), 1);
        assert_eq!(gw.events, EventsOut::Stdout);
    }

    fn error_of(text: &str) -> String {
        let f = file(text);
        match load_gateway(f.path(), no_env()) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with(&f.path().display().to_string()),
                    "the error does not name the file: {msg}"
                );
                msg
            }
        }
    }

    #[test]
    fn a_cluster_node_loads_and_every_mistake_in_its_section_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let key_file = dir.path().join("cluster.key");
        std::fs::write(&key_file, key()).expect("key");
        // The section with `line` in place of the default line of its key.
        let cluster = |line: &str| {
            let key = line.split(' ').next().unwrap_or_default();
            let mut lines = vec![
                "store = \"etcd\"".to_string(),
                "endpoints = [\"http://10.0.9.1:2379\"]".to_string(),
                format!("key_file = \"{}\"", key_file.display()),
            ];
            lines.retain(|l| key.is_empty() || !l.starts_with(&format!("{key} ")));
            lines.push(line.to_string());
            format!("\n[cluster]\n{}\n", lines.join("\n"))
        };
        let setup =
            load_gateway(file(&gateway_text(&cluster(""))).path(), no_env()).expect("valid");
        let c = setup.cluster.expect("a cluster");
        assert_eq!(c.store.endpoints, ["http://10.0.9.1:2379"]);
        assert_eq!(c.store.prefix, "/jvpn");
        assert_eq!(
            (c.lease_ttl.as_millis(), c.fence_after.as_millis()),
            (6000, 4000)
        );
        assert!(load_gateway(file(&gateway_text("")).path(), no_env())
            .expect("valid")
            .cluster
            .is_none());
        let cases = [
            ("store = \"redis\"", "cluster.store"),
            ("endpoints = []", "cluster.endpoints"),
            ("endpoints = [\"10.0.9.1:2379\"]", "cluster.endpoints[0]"),
            (
                "endpoints = [\"https://10.0.9.1:2379\"]",
                "cluster.tls_ca_file",
            ),
            ("prefix = \"jvpn\"", "cluster.prefix"),
            ("lease_ttl_ms = 2500", "cluster.lease_ttl_ms"),
            ("fence_after_ms = 5500", "cluster.fence_after_ms"),
            ("request_timeout_ms = 0", "cluster.request_timeout_ms"),
            (
                "announce_interface = \"a name far too long\"",
                "cluster.announce_interface",
            ),
            ("tls_cert_file = \"node.pem\"", "cluster.tls_cert_file"),
            ("user = \"jvpn\"", "cluster.user"),
        ];
        for (line, key) in cases {
            let msg = error_of(&gateway_text(&cluster(line)));
            assert!(msg.contains(key), "{key}: {msg}");
        }
        let msg = error_of(&gateway_text(
            &cluster("").replace(&key_file.display().to_string(), "/nonexistent/cluster.key"),
        ));
        assert!(msg.contains("cluster.key_file"), "{msg}");
        std::fs::write(&key_file, "not a key").expect("key");
        let msg = error_of(&gateway_text(&cluster("")));
        assert!(
            msg.contains("cluster.key_file") && msg.contains("32 bytes"),
            "{msg}"
        );
    }

    #[test]
    fn every_bad_value_is_named_with_its_key() {
        let cases = [
            ("\n[metrics]\nlisten = \"nowhere\"", "metrics.listen"),
            ("\n[policy.volatility]\nheartbeat_interval_ms = 1", "policy"),
            (
                "\n[policy.volatility]\nheartbeat_interval_ms = \"x\"",
                "heartbeat_interval_ms",
            ),
            ("\nsurprise = 1", "surprise"),
        ];
        for (extra, key) in cases {
            // Keys after a table header belong to it: put them at the end.
            let text = format!("{}{extra}\n", gateway_text(""));
            let msg = error_of(&text);
            assert!(msg.contains(key), "{key}: {msg}");
        }
        let msg = error_of(&gateway_text("").replace("10.77.0.2", "10.78.0.2"));
        assert!(msg.contains("clients[0].tunnel_address"), "{msg}");
        let msg = error_of(&gateway_text("").replace("127.0.0.1:51820", "localhost"));
        assert!(msg.contains("listen[0]"), "{msg}");
        let msg = error_of(&gateway_text("").replace("jv0", "a-name-far-too-long"));
        assert!(msg.contains("tunnel.name"), "{msg}");
        let msg = error_of(&gateway_text("").replace("10.77.0.1/24", "10.77.0.1/0"));
        assert!(msg.contains("tunnel.address"), "{msg}");
        let msg = error_of(&gateway_text(
            "\n[forwarding]\nmasquerade_out = \"eth0\\\"; drop\"",
        ));
        assert!(msg.contains("forwarding.masquerade_out"), "{msg}");
    }

    /// Transport addresses of every kind parse; a bad one, a kind the policy does not
    /// allow, and a connection candidate without a certificate pin are refused, named.
    #[test]
    fn transport_addresses_of_every_kind_and_their_mistakes() {
        let v4 = |p: &str| format!("{p}://192.0.2.1:443");
        assert_eq!(
            transport_address("192.0.2.1:51820"),
            Ok((Protocol::Udp, "192.0.2.1:51820".parse().expect("addr")))
        );
        for (text, protocol) in [
            (v4("udp"), Protocol::Udp),
            (v4("quic"), Protocol::Quic),
            (v4("tcp"), Protocol::Tcp),
        ] {
            assert_eq!(
                transport_address(&text).map(|t| t.0),
                Ok(protocol),
                "{text}"
            );
        }
        assert_eq!(
            transport_address("tcp://[fd01::1]:443").map(|t| t.1),
            Ok("[fd01::1]:443".parse().expect("addr"))
        );
        assert_eq!(
            transport_address("localhost:9").map(|t| t.1.port()),
            Ok(9),
            "a name"
        );
        for bad in [
            "http://192.0.2.1:80",
            "quic://192.0.2.1",
            "tcp://:443",
            "quic://x:port",
        ] {
            assert!(transport_address(bad).is_err(), "{bad}");
        }
        let only_udp = "\n[policy.transport]\nallowed_protocols = [\"udp\"]\n";
        let text = gateway_text("").replace("\"127.0.0.1:51820\"", "\"quic://127.0.0.1:443\"");
        let msg = error_of(&format!("{text}{only_udp}"));
        assert!(
            msg.contains("listen[0]") && msg.contains("allowed_protocols"),
            "{msg}"
        );
        let client = format!(
            "private_key = \"{}\"\ngateway_public_key = \"{}\"\n[[candidates]]\nendpoint = \"tcp://192.0.2.1:443\"\n",
            key(),
            public()
        );
        let f = file(&client);
        let e = load_client(f.path(), no_env()).err().expect("refused");
        assert!(e.to_string().contains("gateway_tls_pin"), "{e}");
        let f = file(&client.replace(
            "[[candidates]]",
            "gateway_tls_pin = \"sha256:nope\"\n[[candidates]]",
        ));
        let e = load_client(f.path(), no_env()).err().expect("refused");
        assert!(e.to_string().contains("gateway_tls_pin"), "{e}");
    }

    /// One address of each family on both sides; each dual-stack mistake is refused
    /// with its key and what is allowed.
    #[test]
    fn a_dual_stack_tunnel_loads_and_its_mistakes_are_named() {
        let dual = gateway_text("")
            .replace("\"10.77.0.1/24\"", "[\"10.77.0.1/24\", \"fd77::1/64\"]")
            .replace("\"10.77.0.2\"", "[\"10.77.0.2\", \"fd77::2\"]");
        let f = file(&dual);
        let gw = load_gateway(f.path(), no_env()).expect("loads");
        let net = gw.tunnel.address.expect("addresses");
        assert_eq!(net.to_string(), "10.77.0.1/24 fd77::1/64");
        assert_eq!(
            gw.clients[0].1.tunnel.to_string(),
            "10.77.0.2/24 fd77::2/64"
        );
        // The same from the environment, as a comma-separated list.
        let f = file(&gateway_text("").replace("\"10.77.0.2\"", "[\"10.77.0.2\", \"fd77::2\"]"));
        let env = Some(HashMap::from([(
            "JVPN_TUNNEL__ADDRESS".to_string(),
            "10.77.0.1/24,fd77::1/64".to_string(),
        )]));
        let gw = load_gateway(f.path(), env).expect("loads");
        assert_eq!(
            gw.tunnel.address.map(|a| a.to_string()).as_deref(),
            Some("10.77.0.1/24 fd77::1/64")
        );
        let cases = [
            (
                dual.replace("\"fd77::2\"", "\"fd78::2\""),
                "clients[0].tunnel_address",
                "outside the gateway's tunnel network fd77::1/64",
            ),
            (
                gateway_text("").replace("\"10.77.0.2\"", "[\"10.77.0.2\", \"fd77::2\"]"),
                "clients[0].tunnel_address",
                "no network of this family",
            ),
            (
                dual.replace("\"fd77::1/64\"", "\"10.78.0.1/24\""),
                "tunnel.address",
                "two IPv4 addresses",
            ),
            (
                dual.replace("\"fd77::2\"", "\"10.77.0.3\""),
                "clients[0].tunnel_address",
                "two IPv4 addresses",
            ),
            (
                dual.replace("\"fd77::2\"", "\"fd77::1\""),
                "clients[0].tunnel_address",
                "fd77::1 is already taken",
            ),
            (
                dual.replace("fd77::1/64", "fd77::1/127"),
                "tunnel.address",
                "/1 to /126 for IPv6",
            ),
            (
                dual.replace("[tunnel]\n", "[tunnel]\nmtu = 1200\n"),
                "tunnel.mtu",
                "below 1280",
            ),
            (
                dual.replace("[\"10.77.0.2\", \"fd77::2\"]", "[]"),
                "clients[0].tunnel_address",
                "no address given",
            ),
        ];
        for (text, key, problem) in cases {
            let msg = error_of(&text);
            assert!(
                msg.contains(key) && msg.contains(problem),
                "{key}, {problem}: {msg}"
            );
        }
    }

    #[test]
    fn a_client_needs_candidates_and_a_valid_gateway_key() {
        let base = format!(
            "private_key = \"{}\"\ngateway_public_key = \"{}\"\n",
            key(),
            public()
        );
        let f = file(&base);
        let e = load_client(f.path(), no_env()).err().expect("refused");
        assert!(e.to_string().contains("candidates"), "{e}");
        let f = file(&format!(
            "{}\n[[candidates]]\nendpoint = \"10.1.0.1:51820\"\n",
            base.replace("gateway_public_key = \"", "gateway_public_key = \"x")
        ));
        let e = load_client(f.path(), no_env()).err().expect("refused");
        assert!(e.to_string().contains("gateway_public_key"), "{e}");
        let f = file(&format!(
            "{base}\n[[candidates]]\nendpoint = \"10.1.0.1:51820\"\n[routes]\nnetworks = [\"10.99.0.0/24\"]\n"
        ));
        let c = load_client(f.path(), no_env()).expect("loads");
        assert_eq!(c.networks, vec![(IpAddr::from([10, 99, 0, 0]), 24)]);
        let env = Some(HashMap::from([(
            "JVPN_ROUTES__FWMARK".to_string(),
            "254".to_string(),
        )]));
        let e = load_client(f.path(), env).err().expect("refused");
        assert!(e.to_string().contains("routes.fwmark"), "{e}");
        assert_eq!(c.on_end, OnEnd::Exit);
    }
}
