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
        /// Return only once Consul confirms the instance is out of every
        /// healthy view (`?passing`, DNS, halo-lb): in maintenance (as the
        /// sidecar's /status reports once the agent accepted it) or, once
        /// the sidecar has exited, deregistered or in maintenance as the
        /// agent itself answers. Exit 1, with Consul's reason, if Consul
        /// refused or cannot be asked, or after --timeout.
        #[arg(long)]
        wait: bool,
        /// The longest wait with --wait.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Write the man pages into DIR (for the packages) and exit.
    #[command(hide = true)]
    GenerateMan {
        /// Where the pages go.
        dir: PathBuf,
    },
}

/// What the main man page says beyond `--help`.
const MAN: halo_health::man::Sections<'static> = halo_health::man::Sections {
    exit_status: &[
        (
            "0",
            "Drained and deregistered after SIGTERM, SIGINT or POST /drain, or the subcommand succeeded.",
        ),
        (
            "1",
            "The configuration is invalid (every problem is printed, each naming its field or HALO_ variable), the sidecar failed, or the subcommand failed.",
        ),
    ],
    environment: &[
        (
            "HALO_<SECTION>_<KEY>",
            "Any config key: HALO_SERVICE_PORT=9001 is [service] port = 9001, HALO_SERVICE_META_ZONE=zone-a is [service.meta] zone, HALO_CHECK_0_URL is the first [[check]]'s url. A variable wins over the file; an unknown one in a sidecar section is an error.",
        ),
        (
            "CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE",
            "The Consul agent and ACL token, for every [consul] key left unset, as Consul's own CLI reads them.",
        ),
        (
            "CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME, CONSUL_HTTP_SSL_VERIFY",
            "TLS to the agent, for every [consul] key left unset.",
        ),
        ("RUST_LOG", "Log filter (default info), e.g. halo_sidecar=debug."),
        (
            "NOTIFY_SOCKET, WATCHDOG_USEC",
            "Set by systemd: the sidecar reports READY=1 once registered, STATUS=draining when the drain starts, STOPPING=1 when it deregisters, and pings the watchdog.",
        ),
    ],
    files: &[
        ("/etc/halo/sidecar-NAME.toml", "The config of halo-sidecar@NAME.service (--config)."),
        (
            "/usr/share/doc/halo-sidecar/docs/",
            "The operator's book: tutorial, configuration reference, runbooks.",
        ),
        (
            "/etc/default/halo-sidecar",
            "Environment of the packaged units (mode 600: it may hold CONSUL_HTTP_TOKEN).",
        ),
    ],
    signals: &[
        (
            "SIGTERM, SIGINT",
            "Drain: the instance goes into maintenance in Consul, the sidecar waits drain.grace, deregisters it and exits.",
        ),
        (
            "SIGHUP",
            "Read the Consul token file again (the only thing reloaded); a bad file keeps the old token, logged.",
        ),
    ],
    see_also: &["halo-lb(1)", "consul(1)"],
};

fn parse_duration(text: &str) -> Result<Duration, String> {
    halo_consul::duration::parse(text).map_err(|e| e.to_string())
}

/// Deadline of one admin API request made by a subcommand.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

/// `halo-sidecar drain [--wait]`: with the custom header every write
/// needs, and the bearer token when `admin.token_file` is configured.
///
/// `--wait` succeeds only on evidence from Consul: the sidecar's `/status`
/// saying `consul.maintenance` (set only once the agent answered 200 to the
/// maintenance call), or, once the sidecar is gone, the agent itself (asked
/// with the sidecar's own Consul settings) no longer having the instance or
/// having it in maintenance. The sidecar's admin API going away is not
/// evidence: a sidecar whose deregistration Consul refused exits too.
fn drain(settings: &halo_sidecar::config::Settings, wait: bool, timeout: Duration) -> ExitCode {
    let addr = halo_health::service::local_address(settings.admin);
    let bearer = settings.admin_token.as_ref().map(|t| format!("Bearer {}", t.expose()));
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
    // The last Consul failure the sidecar reported, to say why if no
    // evidence comes.
    let mut last_error: Option<String> = None;
    loop {
        match halo_health::service::http(addr, "GET", "/status", ADMIN_TIMEOUT) {
            Ok((200, body)) => {
                let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if status["consul"]["maintenance"] == true {
                    println!("halo-sidecar: drained: Consul has the instance in maintenance");
                    return ExitCode::SUCCESS;
                }
                if let Some(e) = status["consul"]["last_error"].as_str() {
                    if last_error.as_deref() != Some(e) {
                        eprintln!("halo-sidecar: the sidecar reports a Consul failure: {e}");
                        last_error = Some(e.to_owned());
                    }
                }
            }
            // The sidecar is gone (its drain ended, or it died): ask Consul.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                return match ask_consul(settings) {
                    Ok(evidence) => {
                        println!("halo-sidecar: drained: {evidence}");
                        ExitCode::SUCCESS
                    }
                    Err(why) => {
                        eprintln!(
                            "halo-sidecar: drain failed: the sidecar exited, and {why}{}",
                            sidecar_said(&last_error)
                        );
                        ExitCode::FAILURE
                    }
                };
            }
            Ok(_) | Err(_) => {}
        }
        if Instant::now() >= deadline {
            eprintln!(
                "halo-sidecar: drain failed: the instance is not in maintenance in Consul after {timeout:?}{} (see the sidecar's /status and log)",
                sidecar_said(&last_error)
            );
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `"; the sidecar's last Consul error: …"`, if it reported one.
fn sidecar_said(last_error: &Option<String>) -> String {
    last_error
        .as_ref()
        .map(|e| format!("; the sidecar's last Consul error: {e}"))
        .unwrap_or_default()
}

/// Asks the local Consul agent, with the sidecar's own Consul settings,
/// whether the instance is out of every healthy view: deregistered, or in
/// maintenance. `Ok` with the evidence, or `Err` saying why not (Consul's
/// answer included).
fn ask_consul(settings: &halo_sidecar::config::Settings) -> Result<String, String> {
    let id = &settings.service_id;
    let client = halo_consul::Client::new(settings.config.consul.client_config(Some(ADMIN_TIMEOUT)))
        .map_err(|e| format!("Consul cannot be asked: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("Consul cannot be asked (no runtime: {e})"))?;
    runtime.block_on(async {
        let unconfirmed =
            |e: halo_consul::Error| format!("Consul did not confirm the instance {id} is out of service: {e}");
        if client.agent_service(id).await.map_err(unconfirmed)?.is_none() {
            return Ok(format!("Consul no longer has the instance {id} (deregistered)"));
        }
        let maintenance = format!("_service_maintenance:{id}");
        if client
            .agent_checks()
            .await
            .map_err(unconfirmed)?
            .contains_key(&maintenance)
        {
            return Ok(format!("Consul has the instance {id} in maintenance"));
        }
        Err(format!(
            "Consul still has the instance {id} registered and not in maintenance (it may still receive traffic)"
        ))
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::GenerateMan { dir }) = &cli.command {
        use clap::CommandFactory;
        return match halo_health::man::write_pages(Cli::command(), &MAN, dir) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("halo-sidecar: cannot write the man pages into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
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
        Some(Command::Drain { wait, timeout }) => return drain(&settings, wait, timeout),
        // `generate-man` returned before the configuration was loaded.
        Some(Command::Check | Command::GenerateMan { .. }) | None => {}
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
