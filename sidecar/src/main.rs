//! The `halo-sidecar` binary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
    /// GET /health/ready (or /health/live with --live) on the admin API of
    /// the sidecar running with this config; exit 0 if it answers 2xx
    /// within --timeout, 1 otherwise: a container's health check in an
    /// image without curl.
    Healthcheck {
        /// Ask /health/live (the process answers) instead of /health/ready.
        #[arg(long)]
        live: bool,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Drain the instance through the admin API of the sidecar running with
    /// this config (POST /drain): it goes into maintenance in Consul, and
    /// the sidecar deregisters it and exits after drain.grace. For a
    /// preStop hook or a script that must stop traffic before the app.
    Drain {
        /// Return only once Consul has the instance in maintenance (out of
        /// every healthy view: `?passing`, DNS, halo-lb), or the sidecar has
        /// already deregistered it and exited. Exit 1 if that takes longer
        /// than --timeout.
        #[arg(long)]
        wait: bool,
        /// The longest wait with --wait.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    halo_consul::duration::parse(text).map_err(|e| e.to_string())
}

/// Deadline of one admin API request made by a subcommand.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// `halo-sidecar drain [--wait]`: with the custom header every write
/// needs, and the bearer token when `admin.token_file` is configured.
fn drain(
    admin: std::net::SocketAddr,
    token: Option<&halo_health::auth::Token>,
    wait: bool,
    timeout: Duration,
) -> ExitCode {
    let addr = halo_health::service::local_address(admin);
    let bearer = token.map(|t| format!("Bearer {}", t.expose()));
    let mut headers = vec![(halo_health::auth::REQUEST_HEADER, "1")];
    if let Some(bearer) = &bearer {
        headers.push(("Authorization", bearer));
    }
    match halo_health::service::http_with(addr, "POST", "/drain", &headers, ADMIN_TIMEOUT) {
        Ok((200, _)) => {}
        Ok((code, body)) => {
            eprintln!(
                "halo-sidecar: POST http://{addr}/drain answered {code}: {}",
                body.trim()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("halo-sidecar: POST http://{addr}/drain: {e}");
            return ExitCode::FAILURE;
        }
    }
    if !wait {
        println!("halo-sidecar: draining");
        return ExitCode::SUCCESS;
    }
    let deadline = Instant::now() + timeout;
    loop {
        match halo_health::service::http(addr, "GET", "/status", ADMIN_TIMEOUT) {
            Ok((200, body)) => {
                let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if status["consul"]["maintenance"] == true {
                    println!("halo-sidecar: drained: Consul has the instance in maintenance");
                    return ExitCode::SUCCESS;
                }
            }
            // The sidecar finished the drain (deregistered) and exited.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                println!("halo-sidecar: drained: the sidecar deregistered the instance and exited");
                return ExitCode::SUCCESS;
            }
            Ok(_) | Err(_) => {}
        }
        if Instant::now() >= deadline {
            eprintln!("halo-sidecar: the instance is not in maintenance in Consul after {timeout:?} (see the sidecar's /status)");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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
    match cli.command {
        Some(Command::Healthcheck { live, timeout }) => {
            let path = if live { "/health/live" } else { "/health/ready" };
            return halo_health::service::healthcheck("halo-sidecar", settings.admin, path, timeout);
        }
        Some(Command::Drain { wait, timeout }) => {
            return drain(settings.admin, settings.admin_token.as_ref(), wait, timeout)
        }
        Some(Command::Check) | None => {}
    }
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
