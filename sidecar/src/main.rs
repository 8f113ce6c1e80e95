//! The `halo-sidecar` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Registers an app with the local Consul agent, probes it, and drains it on shutdown.
#[derive(Debug, Parser)]
#[command(name = "halo-sidecar", version, about)]
struct Cli {
    /// Config file (TOML). Every field can also be set with a HALO_* variable.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the configuration and exit.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match halo_sidecar::config::load(cli.config.as_deref(), std::env::vars()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("halo-sidecar: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Check) = cli.command {
        println!(
            "halo-sidecar: configuration is valid (service {}, {} check(s))",
            settings.service_id,
            settings.checks.len()
        );
        return ExitCode::SUCCESS;
    }
    let prometheus = halo_health::telemetry::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("halo-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(halo_sidecar::run(settings, prometheus)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halo-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}
