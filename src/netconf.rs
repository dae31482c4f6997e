//! Changes to the host's network configuration (routes, policy rules, forwarding,
//! masquerade), each recorded with its undo and undone in reverse order on exit, so the
//! process leaves the host as it found it. Routes and rules go through netlink
//! ([`crate::netlink`], off the caller's thread); masquerade, the one thing netlink
//! does not do, through nftables, only when it is asked for.

use std::net::IpAddr;
use std::process::Command;

use jvpn_core::wire::TunnelAddrs;

use thiserror::Error;

use crate::netlink::{self, NetlinkError, Route, RouteVia, Rule, MAIN_TABLE};

/// The network address of `addr/prefix` (host bits cleared).
pub fn network_of(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::from((u32::from(a) & mask).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::from((u128::from(a) & mask).to_be_bytes())
        }
    }
}

/// A change that could not be made.
#[derive(Debug, Error)]
pub enum NetconfError {
    /// The tool could not be run.
    #[error("cannot run `{command}`: {source} (the Debian package {package} adds it)")]
    Spawn {
        /// The command line.
        command: String,
        /// The package that has the program.
        package: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    /// The tool refused.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it said.
        stderr: String,
    },
    /// A kernel setting could not be written.
    #[error("cannot set {path}: {source}")]
    Sysctl {
        /// The /proc path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

enum Undo {
    Command(Vec<String>),
    Route(Route),
    Rule(Rule),
    Sysctl { path: String, value: String },
}

/// The changes made so far; undone when dropped.
#[derive(Default)]
pub struct Changes {
    undo: Vec<Undo>,
}

/// Runs `argv` (a program of the Debian package `package`), returning its error output
/// on failure.
fn run(argv: &[&str], input: Option<&str>, package: &'static str) -> Result<(), NetconfError> {
    use std::io::Write;
    let command = argv.join(" ");
    let spawn_err = |source| NetconfError::Spawn {
        command: command.clone(),
        package,
        source,
    };
    let (program, args) = argv.split_first().ok_or_else(|| NetconfError::Failed {
        command: String::new(),
        stderr: "empty command".into(),
    })?;
    pass_net_admin_to_children();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetconfError::Failed {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// A process that is not root but holds CAP_NET_ADMIN (the container image gives the
/// binary that capability and no other, to an unprivileged user) would not pass it on to
/// `nft`, which has no capabilities of its own: raise it into this thread's ambient set,
/// which a child started from this thread keeps.
fn pass_net_admin_to_children() {
    use caps::{CapSet, Capability};
    if nix::unistd::geteuid().is_root() {
        return;
    }
    if caps::has_cap(None, CapSet::Permitted, Capability::CAP_NET_ADMIN).unwrap_or(false) {
        let _ = caps::raise(None, CapSet::Inheritable, Capability::CAP_NET_ADMIN);
        let _ = caps::raise(None, CapSet::Ambient, Capability::CAP_NET_ADMIN);
    }
}

impl Changes {
    /// Loads an nftables script; on success remembers `undo`.
    fn apply_nft(&mut self, script: &str, undo: &[&str]) -> Result<(), NetconfError> {
        run(&["nft", "-f", "-"], Some(script), "nftables")?;
        self.undo
            .push(Undo::Command(undo.iter().map(|s| s.to_string()).collect()));
        Ok(())
    }

    /// Adds `route`; on success remembers its removal.
    async fn add_route(&mut self, route: Route) -> Result<(), NetconfError> {
        let added = route.clone();
        netlink::call(move |h| async move { netlink::add_route(&h, &added).await }).await?;
        self.undo.push(Undo::Route(route));
        Ok(())
    }

    /// Adds `rule`; on success remembers its removal.
    async fn add_rule(&mut self, rule: Rule) -> Result<(), NetconfError> {
        netlink::call(move |h| async move { netlink::add_rule(&h, rule).await }).await?;
        self.undo.push(Undo::Rule(rule));
        Ok(())
    }

    /// Writes `value` to the kernel setting at `path`, restoring the old value on exit.
    pub fn sysctl(&mut self, path: &str, value: &str) -> Result<(), NetconfError> {
        let err = |source| NetconfError::Sysctl {
            path: path.to_string(),
            source,
        };
        let old = std::fs::read_to_string(path).map_err(err)?;
        if old.trim() == value {
            return Ok(());
        }
        std::fs::write(path, value).map_err(err)?;
        self.undo.push(Undo::Sysctl {
            path: path.to_string(),
            value: old.trim().to_string(),
        });
        Ok(())
    }

    /// Routes `net/prefix` into the device `dev`. An existing route is left alone (and
    /// the error says so), never overwritten and then deleted by the undo.
    pub async fn route(&mut self, net: IpAddr, prefix: u8, dev: &str) -> Result<(), NetconfError> {
        self.add_route(Route {
            dst: net,
            prefix,
            via: RouteVia::Device(dev.to_string()),
            table: MAIN_TABLE,
        })
        .await
    }

    /// Sends everything into `dev` except the packets marked `fwmark` (the transports'
    /// own), as wg-quick does: a default route in table `fwmark`, used by every unmarked
    /// packet, while the main table keeps serving its more specific routes (the local
    /// networks). Both families: a family the tunnel has no address of gets an
    /// `unreachable` default in that table instead, so that its traffic fails at once
    /// rather than leave outside the tunnel (a leak the user would not see).
    pub async fn full_tunnel(
        &mut self,
        dev: &str,
        fwmark: u32,
        tunnel: TunnelAddrs,
    ) -> Result<(), NetconfError> {
        // A kernel without IPv6 has nothing of it to leak (and no IPv6 table to fill).
        let has_v6 = std::path::Path::new("/proc/sys/net/ipv6").exists();
        for (v6, default, carried) in [
            (false, IpAddr::from([0u8; 4]), tunnel.v4().is_some()),
            (true, IpAddr::from([0u8; 16]), tunnel.v6().is_some()),
        ] {
            if v6 && !has_v6 {
                continue;
            }
            self.add_route(Route {
                dst: default,
                prefix: 0,
                via: if carried {
                    RouteVia::Device(dev.to_string())
                } else {
                    RouteVia::Unreachable
                },
                table: fwmark,
            })
            .await?;
            self.add_rule(Rule::UnmarkedTo {
                v6,
                mark: fwmark,
                table: fwmark,
            })
            .await?;
            self.add_rule(Rule::MainWithoutDefault { v6 }).await?;
        }
        Ok(())
    }

    /// Masquerades packets from the network `addr/prefix` leaving through `out` (an
    /// interface name the configuration checked).
    pub fn masquerade(&mut self, addr: IpAddr, prefix: u8, out: &str) -> Result<(), NetconfError> {
        let family = if addr.is_ipv4() { "ip" } else { "ip6" };
        let net = network_of(addr, prefix);
        let table = format!("jvpn_nat_{}", out.replace(['-', '.'], "_"));
        let script = format!(
            "table {family} {table} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{out}\" {family} saddr {net}/{prefix} masquerade\n  }}\n}}\n"
        );
        self.apply_nft(&script, &["nft", "delete", "table", family, &table])
    }

    /// Undoes every change, newest first. Failures are reported on standard error (the
    /// process is exiting; there is nobody else to tell). Blocks until done.
    pub fn undo_all(&mut self) {
        while let Some(undo) = self.undo.pop() {
            let result =
                match undo {
                    Undo::Command(argv) => {
                        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                        run(&argv, None, "nftables")
                    }
                    Undo::Route(route) => netlink::blocking(None, move |h| async move {
                        netlink::del_route(&h, &route).await
                    })
                    .map_err(NetconfError::from),
                    Undo::Rule(rule) => netlink::blocking(None, move |h| async move {
                        netlink::del_rule(&h, rule).await
                    })
                    .map_err(NetconfError::from),
                    Undo::Sysctl { path, value } => {
                        std::fs::write(&path, value).map_err(|source| NetconfError::Sysctl {
                            path: path.clone(),
                            source,
                        })
                    }
                };
            match result {
                // Gone with its device already (a route on the removed TUN).
                Err(NetconfError::Netlink(e)) if e.is_gone() => {}
                Err(e) => eprintln!("jvpn: cleanup: {e}"),
                Ok(()) => {}
            }
        }
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.undo_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_program_is_named_with_the_package_that_adds_it() {
        let e = run(&["jvpn-no-such-program", "-f", "-"], Some(""), "nftables")
            .expect_err("no such program");
        let text = e.to_string();
        assert!(
            text.starts_with("cannot run `jvpn-no-such-program -f -`: No such file or directory")
                && text.ends_with("(the Debian package nftables adds it)"),
            "{text}"
        );
    }

    #[test]
    fn the_network_of_an_address_clears_its_host_bits() {
        let a: IpAddr = "10.77.0.1".parse().expect("v4");
        assert_eq!(
            network_of(a, 24),
            "10.77.0.0".parse::<IpAddr>().expect("v4")
        );
        assert_eq!(network_of(a, 32), a);
        assert_eq!(network_of(a, 0), "0.0.0.0".parse::<IpAddr>().expect("v4"));
        let b: IpAddr = "fd00::1:2".parse().expect("v6");
        assert_eq!(
            network_of(b, 112),
            "fd00::1:0".parse::<IpAddr>().expect("v6")
        );
    }
}
