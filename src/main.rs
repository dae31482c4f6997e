//! `jvpn`: the Jumping VPN command line.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use jvpn::admin::{self, Request};
use jvpn::{config, policy_file, simulate, views};
use jvpn_core::crypto::Keypair;
use jvpn_core::ids::NodeId;
use jvpn_core::policy::Policy;
use zeroize::Zeroizing;

/// Jumping VPN: a session that outlives its network path.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one session of the real protocol core over a simulated network on a virtual
    /// clock, through a scripted outage; print its events as JSON lines (stdout) and
    /// its state changes (stderr). Sends nothing on any network.
    Simulate {
        /// The outage to simulate.
        #[arg(long, value_enum, default_value = "jump")]
        scenario: simulate::Scenario,
        /// A policy file (TOML, see config/policy.toml); the starter defaults if absent.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Virtual seconds to simulate at most (1 to 86400).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
        seconds: u64,
        /// The node id written into every event.
        #[arg(long, default_value = "simulator")]
        node_id: String,
    },
    /// Print a new private key (base64), like `wg genkey`. Keep it secret.
    Keygen,
    /// Read a private key on standard input and print its public key, like `wg pubkey`.
    Pubkey,
    /// Print the gateway's QUIC/TCP certificate pin (a client's `gateway_tls_pin`),
    /// from its configuration's private key.
    TlsPin {
        /// The gateway's configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a policy file and print the effective policy, or every problem in it.
    CheckPolicy {
        /// The policy file (TOML).
        file: PathBuf,
    },
    /// Run a gateway: listen on the configured UDP addresses, create the TUN device,
    /// authorize clients by key, serve the admin socket; until Ctrl-C / SIGTERM, which
    /// end every session explicitly (operator_terminated).
    Gateway {
        /// The configuration file (TOML; see config/gateway.toml).
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a client: connect through the candidate paths, create the TUN device with
    /// the address the gateway assigns, install the routes; until Ctrl-C / SIGTERM (or
    /// the session's end, when `on_session_end = "exit"`). Undoes every change on exit.
    /// SIGHUP reloads the file: a new policy version takes effect on the live session.
    Client {
        /// The configuration file (TOML; see config/client.toml).
        #[arg(long)]
        config: PathBuf,
        /// Give up (exit non-zero) without a session after this many seconds.
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
        connect_timeout: u64,
    },
    /// Show a running gateway's sessions or a running client's session, like `wg show`.
    Status {
        /// The admin socket (default: the gateway's, else the client's).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the JSON answer instead.
        #[arg(long)]
        json: bool,
    },
    /// List a running gateway's sessions, one per line: id, state, version, tunnel
    /// addresses, transport, owner node.
    Sessions {
        /// The admin socket.
        #[arg(long, default_value = "/run/jvpn/gateway.sock")]
        socket: PathBuf,
    },
    /// End a live session on a running gateway (operator_terminated; the client is told).
    Terminate {
        /// The session id (16 hex digits, as `jvpn sessions` prints).
        session_id: String,
        /// The admin socket.
        #[arg(long, default_value = "/run/jvpn/gateway.sock")]
        socket: PathBuf,
    },
    /// As root: build two network namespaces joined by two paths (and a server behind
    /// the gateway), run a gateway and a client over real TUN devices, ping through the
    /// tunnel, cut the active path, show the jump (events and ping gap), clean up.
    Demo {
        /// The policy the session runs under.
        #[arg(long, value_enum, default_value = "default")]
        policy: jvpn::demo::DemoPolicy,
        /// How path A is cut.
        #[arg(long, value_enum, default_value = "route")]
        cut: jvpn::demo::DemoCut,
        /// Repeat this many times and print the median ping gap (1 to 20).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        runs: u32,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("jvpn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn ask(socket: &Path, request: &Request) -> Result<serde_json::Value> {
    Ok(admin::ask_blocking(socket, request)?)
}

fn default_socket() -> PathBuf {
    let gateway = PathBuf::from("/run/jvpn/gateway.sock");
    let client = PathBuf::from("/run/jvpn/client.sock");
    if !gateway.exists() && client.exists() {
        client
    } else {
        gateway
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Gateway { config } => {
            let setup = config::load_gateway(&config, None)?;
            jvpn::gateway::run(setup)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Client {
            config,
            connect_timeout,
        } => {
            let setup = config::load_client(&config, None)?;
            jvpn::client::run(setup, config, Duration::from_secs(connect_timeout))
        }
        Command::Status { socket, json } => {
            let answer = ask(&socket.unwrap_or_else(default_socket), &Request::Status)?;
            if json {
                println!("{answer}");
            } else {
                print!("{}", views::render(&answer));
            }
            Ok(ok_of(&answer))
        }
        Command::Sessions { socket } => {
            let answer = ask(&socket, &Request::Status)?;
            match answer["sessions"].as_array() {
                Some(sessions) => {
                    for s in sessions {
                        println!(
                            "{} {} {} {} {} {}",
                            s["session_id"].as_str().unwrap_or("-"),
                            s["state"].as_str().unwrap_or("-"),
                            s["state_version"],
                            views::text(&s["tunnel_addresses"]),
                            views::text(&s["active_transport"]),
                            s["owner"].as_str().unwrap_or("-"),
                        );
                    }
                }
                None => print!("{}", views::render(&answer)),
            }
            Ok(ok_of(&answer))
        }
        Command::Terminate { session_id, socket } => {
            let answer = ask(&socket, &Request::Terminate { session_id })?;
            match answer["ok"].as_bool() {
                Some(true) => {
                    println!("terminated {}", answer["session_id"].as_str().unwrap_or(""))
                }
                _ => eprintln!("jvpn: {}", answer["error"].as_str().unwrap_or("refused")),
            }
            Ok(ok_of(&answer))
        }
        Command::Demo { policy, cut, runs } => {
            jvpn::demo::run(policy, cut, runs)?;
            Ok(ExitCode::SUCCESS)
        }
        command => run_offline(command).map(|()| ExitCode::SUCCESS),
    }
}

fn ok_of(answer: &serde_json::Value) -> ExitCode {
    if answer["ok"] == true {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The commands that need no network.
fn run_offline(command: Command) -> Result<()> {
    match command {
        Command::Simulate {
            scenario,
            policy,
            seconds,
            node_id,
        } => {
            let policy = match policy {
                Some(path) => policy_file::load(&path)?,
                None => Policy::default(),
            };
            let stdout = std::io::stdout();
            let end = simulate::run(
                policy,
                scenario,
                Duration::from_secs(seconds),
                &NodeId(node_id),
                &mut stdout.lock(),
            )?;
            eprintln!("final state: {end}");
            Ok(())
        }
        Command::Keygen => {
            let key = Keypair::generate().context("cannot generate a key")?;
            println!("{}", key.private_base64().as_str());
            Ok(())
        }
        Command::Pubkey => {
            let mut text = Zeroizing::new(String::new());
            std::io::stdin()
                .take(1024)
                .read_to_string(&mut text)
                .context("cannot read a private key on standard input")?;
            let key = Keypair::from_base64(&text).context(
                "standard input is not a private key (44 characters of base64, as `jvpn keygen` prints)",
            )?;
            println!("{}", key.public());
            Ok(())
        }
        Command::TlsPin { config } => {
            let setup = config::load_gateway(&config, None)?;
            let identity = jvpn_actors::tls::TlsIdentity::for_gateway(&setup.keypair)?;
            println!("{}", identity.pin());
            Ok(())
        }
        Command::CheckPolicy { file } => {
            let policy = policy_file::load(&file)?;
            println!("{}: valid\n{policy:#?}", file.display());
            Ok(())
        }
        other => anyhow::bail!("{other:?} is not an offline command"),
    }
}
