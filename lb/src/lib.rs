//! `halo-lb`: halo's layer-4 (TCP) load balancer for virtual IPs.
//!
//! Each VIP has an accept loop and one immutable backend table published
//! through an `ArcSwap`. A connection loads the current table once, picks a
//! backend with the VIP's algorithm (round robin, least connections, power of
//! two choices, or Maglev), retries other backends if the connect fails, and
//! copies bytes both ways with half-close and an idle timeout. Tables are
//! rebuilt off the data path (config reload, admin API, Consul discovery)
//! and swapped only when their inputs changed.
//!
//! With `[ha]`, two instances form an active/standby pair: both run
//! discovery and keep warm tables, and only the holder of a Consul lock
//! binds the listeners ([`ha`]).
//!
//! Data flows one way: backend source → table builder ([`table::Vip`]) →
//! published snapshot ([`table::Table`]) → accept loop ([`proxy`]).
//!
//! # Layout
//! - [`config`]: the TOML file, defaults, validation naming every bad field.
//! - [`discovery`]: Consul's health view as a VIP's backends, fail static.
//! - [`dns`]: DNS SRV records (Consul's DNS interface) as a VIP's backends.
//! - [`backend`]: backend identity and live state (connection counts,
//!   passive ejection with exponential back-off).
//! - [`active_check`]: the balancer's own health checks, one per backend.
//! - [`selection`]: the algorithms' precomputed state and the pick.
//! - [`zone`]: zone-aware routing, local backends first while enough are
//!   healthy.
//! - [`table`]: immutable tables, the per-VIP publisher and its metrics.
//! - [`proxy`]: listeners, the accept loop, connect-with-retry.
//! - [`pressure`]: the process's own resources running out (descriptors,
//!   ports): pause accepting, never blame a backend.
//! - [`floating`]: the floating VIP address: netlink add/remove, gratuitous ARP.
//! - [`copy`]: buffered and splice(2) copying, half-close, idle timeout.
//! - [`proxy_protocol`]: PROXY v1/v2 headers.
//! - [`server`]: the running set of VIPs, serving or not, reload, status,
//!   drain.
//! - [`ha`]: the active/standby election, its server-confirmed lease,
//!   step-down, and the standby's failure detector; on a thread of its own.
//! - [`lease`]: the lease as the data plane checks it, per connection.
//! - [`admin`]: `/health`, `/status`, `/metrics`, backend enable/disable.
//! - [`workers`]: one single-threaded runtime per core for the data plane.

pub mod active_check;
pub mod admin;
pub mod backend;
pub mod config;
pub mod copy;
pub mod discovery;
pub mod dns;
pub mod floating;
pub mod ha;
pub mod lease;
pub mod pressure;
pub mod proxy;
pub mod proxy_protocol;
pub mod selection;
pub mod server;
pub mod table;
pub mod workers;
pub mod zone;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Validated};
use crate::ha::Leadership;
use crate::server::Server;
use crate::workers::Workers;

/// Runs the balancer until SIGTERM or SIGINT, then drains. SIGHUP reloads
/// `config_path`; a bad file is logged and the running config kept.
pub async fn run(config_path: PathBuf, config: Validated, prometheus: Option<PrometheusHandle>) -> anyhow::Result<()> {
    let mut sighup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;

    let count = config.config.workers.unwrap_or_else(workers::default_count);
    if count > workers::default_count() {
        tracing::warn!(
            workers = count,
            cores = workers::default_count(),
            "more data-plane workers than cores"
        );
    }
    warn_about_operation(&config);
    let workers = Workers::start(count).context("cannot start the worker threads")?;
    let leadership = config
        .ha
        .clone()
        .map(|settings| Leadership::new(settings, config.admin));
    // The floating address is checked before anything starts: a missing
    // interface or capability is a start-up error, not a failed promotion.
    let floating = match config.ha.as_ref().and_then(|ha| ha.floating.as_ref()) {
        Some(f) => Some(
            floating::FloatingIp::open(f.address, f.prefix, &f.interface)
                .map(Arc::new)
                .with_context(|| format!("ha.vip_address {}/{} on {}", f.address, f.prefix, f.interface))?,
        ),
        None => None,
    };
    // A lone balancer serves from the start; one of a pair only once elected.
    let server = Server::new(&config, prometheus.clone(), workers, leadership.is_none());
    let admin_listener = tokio::net::TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", config.admin))?;
    server.apply(&config).context("cannot start the configured vips")?;
    let stop_admin = CancellationToken::new();
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&server),
        leadership.clone(),
        stop_admin.clone(),
    ));
    let stop_ha = CancellationToken::new();
    // The election times the active's lease: it gets a thread and runtime
    // of its own, shared with nothing that could delay it (table rebuilds,
    // /status rendering and discovery run on this one).
    let election = match &leadership {
        Some(leadership) => {
            let client = server::consul_client(&config.config.consul).context("consul")?;
            let probe_at = leadership.settings().probe;
            let probe = std::net::UdpSocket::bind(probe_at)
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .with_context(|| format!("cannot listen for probes on ha.probe_listen {probe_at} (UDP)"))?;
            let (leadership, server, stop) = (Arc::clone(leadership), Arc::clone(&server), stop_ha.clone());
            let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name("halo-ha".into())
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(r) => r,
                        Err(e) => {
                            // The receiver learns of it from the dropped sender.
                            tracing::error!(error = %e, "cannot build the election's runtime");
                            return;
                        }
                    };
                    runtime.block_on(ha::run(leadership, client, server, floating, probe, stop));
                    if done_tx.send(()).is_err() {
                        tracing::debug!("nobody waits for the election any more");
                    }
                })
                .context("cannot start the election thread")?;
            Some(done)
        }
        None => None,
    };
    if let Some(handle) = prometheus {
        // Histograms need periodic upkeep to drain their buckets.
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }
    tracing::info!(admin = %config.admin, vips = config.vips.len(), "halo-lb started");

    let mut election = election;
    let election_died = loop {
        let ended = async {
            match election.as_mut() {
                Some(done) => done.await.is_err(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sighup.recv() => reload(&server, &config_path).await,
            _ = sigterm.recv() => break false,
            _ = sigint.recv() => break false,
            // The election thread only ends on shutdown; ending now means it
            // panicked. Fail fast: stop serving and exit non-zero, for the
            // service manager to restart a whole process.
            died = ended => {
                if died {
                    break true;
                }
                election = None;
            }
        }
    };
    if election_died {
        crate::lease::revoke();
        server.stop_serving();
        tracing::error!("the election thread died; serving stopped, exiting");
        return Err(anyhow::anyhow!("the election thread died unexpectedly"));
    }
    tracing::info!("shutdown requested");
    if let Some(election) = election {
        // Stop serving, then hand the lock over, before the drain.
        stop_ha.cancel();
        match tokio::time::timeout(Duration::from_secs(5), election).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("the election thread ended without finishing"),
            Err(_) => tracing::warn!("the election did not finish its handover in 5s; draining anyway"),
        }
    }
    let left = server.drain().await;
    stop_admin.cancel();
    if left > 0 {
        tracing::warn!(left, "exiting with connections still open");
    }
    Ok(())
}

/// Start-up (and reload) warnings about settings that are valid but risky
/// on this machine.
fn warn_about_operation(config: &Validated) {
    if !config.admin.ip().is_loopback() {
        tracing::warn!(
            admin = %config.admin,
            "admin.listen is not a loopback address: anyone who reaches it can read /status and disable backends"
        );
    }
    if let Some((need, limit)) = fd_shortfall(config) {
        tracing::warn!(
            need,
            limit,
            "the vips' max_connections need more file descriptors than RLIMIT_NOFILE allows; past it clients wait in the backlog (raise LimitNOFILE or lower max_connections)"
        );
    }
}

/// `(descriptors the connection limits could need, the soft limit)` when the
/// first exceeds the second: two per connection (client and backend), two
/// more for a splice pipe, and 64 for everything else.
fn fd_shortfall(config: &Validated) -> Option<(u64, u64)> {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    let need = config.vips.iter().fold(64u64, |sum, v| {
        let per = if v.config.copy == config::CopyMode::Splice {
            4
        } else {
            2
        };
        sum.saturating_add((v.config.max_connections as u64).saturating_mul(per))
    });
    (need > soft).then_some((need, soft))
}

async fn reload(server: &Server, path: &std::path::Path) {
    tracing::info!(path = %path.display(), "SIGHUP: reloading");
    // File I/O off the control runtime's thread.
    let owned = path.to_owned();
    let loaded = match tokio::task::spawn_blocking(move || Config::load(&owned)).await {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!(error = %e, "reload task failed; the running config stays in force");
            return;
        }
    };
    match loaded {
        Ok(config) if config.ha != server.ha_settings() => {
            tracing::error!("reload rejected: [ha] changes need a restart; the running config stays in force")
        }
        Ok(config) => match server.apply(&config) {
            Ok(()) => {
                warn_about_operation(&config);
                tracing::info!(vips = config.vips.len(), "reload applied");
            }
            Err(e) => tracing::error!(error = %e, "reload failed; the running config stays in force"),
        },
        Err(e) => tracing::error!(error = %e, "reload rejected; the running config stays in force"),
    }
}
