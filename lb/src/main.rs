//! The `halo-lb` binary: argument parsing, logging, metrics, and the runtime.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use halo_lb::Config;

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
    /// Remove the floating address (`[ha] vip_address`) from its interface if
    /// it is there, and exit 0 (also when there was nothing to remove). For
    /// a service manager to run after halo-lb exited (systemd's
    /// `ExecStopPost=`): a process killed with -9 cannot remove it itself.
    /// Refuses (exit 1) while any live halo-lb in this network namespace
    /// manages that address (whatever its config): it belongs to a live
    /// active then, or to a standby that may claim it any moment.
    ReleaseVip,
    /// GET /health on the admin API of the halo-lb running with this config
    /// and exit 0 if it answers 2xx within --timeout, 1 otherwise: a
    /// container's health check in an image without curl.
    Healthcheck {
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: std::time::Duration,
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
        ("0", "Stopped on SIGTERM or SIGINT after draining, or the subcommand succeeded."),
        (
            "1",
            "The config is invalid (every problem is printed, each naming its field), the balancer could not start or failed, or the subcommand failed.",
        ),
    ],
    environment: &[
        (
            "CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE",
            "The Consul agent and ACL token, for every [consul] key left unset, as Consul's own CLI reads them.",
        ),
        (
            "CONSUL_CACERT, CONSUL_CAPATH, CONSUL_CLIENT_CERT, CONSUL_CLIENT_KEY, CONSUL_TLS_SERVER_NAME, CONSUL_HTTP_SSL_VERIFY",
            "TLS to the agent, for every [consul] key left unset.",
        ),
        ("HALO_DATA_PLANE", "auto, io_uring or epoll: overrides data_plane in the config file."),
        (
            "HALO_ADMIN_TOKEN_FILE",
            "File holding the bearer token the admin API's write endpoints require.",
        ),
        ("RUST_LOG", "Log filter (default info), e.g. halo_lb=debug."),
        (
            "NOTIFY_SOCKET, WATCHDOG_USEC",
            "Set by systemd: halo-lb reports READY=1 once it serves or has its place in the pair, STOPPING=1 on SIGTERM, and pings the watchdog.",
        ),
    ],
    files: &[
        ("/etc/halo/halo-lb.toml", "The config file (--config)."),
        ("/etc/default/halo-lb", "Environment of the packaged unit (mode 600: it may hold CONSUL_HTTP_TOKEN)."),
        ("/usr/share/doc/halo-lb/docs/", "The operator's book: tutorial, configuration reference, runbooks."),
    ],
    signals: &[
        (
            "SIGHUP",
            "Reload: read the config file and token files again and swap the tables; a bad file keeps the running config and is logged.",
        ),
        (
            "SIGTERM, SIGINT",
            "Drain: an active stops serving and hands the lock over (in ECMP mode the instance first withdraws its routes), the listeners close, and live connections get drain_timeout to finish.",
        ),
    ],
    see_also: &["halo-sidecar(1)", "consul(1)"],
};

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    halo_consul::duration::parse(text).map_err(|e| e.to_string())
}

/// `halo-lb release-vip`: idempotent removal of a leftover floating address.
fn release_vip(config: &halo_lb::Validated) -> ExitCode {
    let Some(f) = config.ha.as_ref().and_then(|ha| ha.floating.as_ref()) else {
        println!("halo-lb: no [ha] vip_address in the config: nothing to release");
        return ExitCode::SUCCESS;
    };
    // Opening takes the address's owner socket, which every live halo-lb
    // managing the address in this network namespace holds (see
    // `lb/src/control/floating.rs`): held, the address is not ours to take.
    // Unlike the admin address, this does not depend on the config given.
    let released = halo_lb::FloatingIp::open(f.address, f.prefix, &f.interface).and_then(|ip| ip.release());
    if let Err(e @ halo_lb::FloatingError::InUse { .. }) = &released {
        eprintln!(
            "halo-lb: {e}; not removing {}/{} from {} (stop that halo-lb first)",
            f.address, f.prefix, f.interface
        );
        return ExitCode::FAILURE;
    }
    match released {
        Ok(halo_lb::FloatingOutcome::Changed) => {
            println!("halo-lb: removed {}/{} from {}", f.address, f.prefix, f.interface);
            ExitCode::SUCCESS
        }
        Ok(halo_lb::FloatingOutcome::Unchanged) => {
            println!("halo-lb: {} is not on {}: nothing to release", f.address, f.interface);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "halo-lb: cannot release {}/{} from {}: {e}",
                f.address, f.prefix, f.interface
            );
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::GenerateMan { dir }) = &cli.command {
        use clap::CommandFactory;
        return match halo_health::man::write_pages(Cli::command(), &MAN, dir) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("halo-lb: cannot write the man pages into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("halo-lb: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::ReleaseVip) = cli.command {
        return release_vip(&config);
    }
    if let Some(Command::Healthcheck { timeout }) = cli.command {
        return halo_health::service::healthcheck("halo-lb", config.admin, "/health", timeout);
    }
    if let Some(Command::Check) = cli.command {
        println!(
            "halo-lb: {} is valid ({} vip{})",
            cli.config.display(),
            config.vips.len(),
            if config.vips.len() == 1 { "" } else { "s" }
        );
        // Informational: what the pair's peers will be told (never fails
        // the check; the agent may not be up yet under ExecStartPre).
        let described = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|runtime| runtime.block_on(halo_lb::describe_probe_address(&config)));
        match described {
            Ok(Some(line)) => println!("halo-lb: {line}"),
            Ok(None) => {}
            Err(e) => println!("halo-lb: cannot tell the probe address: {e}"),
        }
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
