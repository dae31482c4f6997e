//! `jvpn`: the Jumping VPN command line.

mod policy_file;
mod simulate;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use jvpn_core::ids::NodeId;
use jvpn_core::policy::Policy;

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
        Command::CheckPolicy { file } => {
            let policy = policy_file::load(&file)?;
            println!("{}: valid\n{policy:#?}", file.display());
            Ok(())
        }
    }
}
