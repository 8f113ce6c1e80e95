//! The `halo-sidecar` binary.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// How long the runtime's leftover tasks get once the sidecar is done.
const RUNTIME_SHUTDOWN: std::time::Duration = std::time::Duration::from_millis(500);

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
        for warning in &settings.warnings {
            eprintln!("halo-sidecar: warning: {warning}");
        }
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
    let result = runtime.block_on(halo_sidecar::run(settings, prometheus));
    // Dropping the runtime would wait for every blocking task (a DNS lookup
    // of a hung resolver, say); the drain's bound must not depend on them.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halo-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}
