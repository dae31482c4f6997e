//! `jvpn`: the Jumping VPN command line.

mod policy_file;
mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::io::Read;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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
    /// Validate a policy file and print the effective policy, or every problem in it.
    CheckPolicy {
        /// The policy file (TOML).
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jvpn: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
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
        Command::CheckPolicy { file } => {
            let policy = policy_file::load(&file)?;
            println!("{}: valid\n{policy:#?}", file.display());
            Ok(())
        }
    }
}
