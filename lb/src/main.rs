//! The `halo-lb` binary: argument parsing, logging, metrics, and the runtime.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use halo_lb::config::Config;

/// Default config file location.
const DEFAULT_CONFIG: &str = "/etc/halo/halo-lb.toml";

/// halo's layer-4 load balancer.
#[derive(Debug, Parser)]
#[command(name = "halo-lb", version, about)]
struct Cli {
    /// Config file (TOML).
    #[arg(long, short, global = true, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate the config file and exit: 0 if good, 1 with every problem if not.
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("halo-lb: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::Check) = cli.command {
        println!(
            "halo-lb: {} is valid ({} vip{})",
            cli.config.display(),
            config.vips.len(),
            if config.vips.len() == 1 { "" } else { "s" }
        );
        return ExitCode::SUCCESS;
    }

    let prometheus = halo_health::telemetry::init();
    // The control plane runs here; the data plane on its own worker threads.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("halo-lb: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(halo_lb::run(cli.config, config, prometheus)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("halo-lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
