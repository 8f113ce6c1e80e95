//! Control: the running set of VIPs and what steers it. Runs on the main
//! runtime's thread (reloads, `/status`, discovery's table rebuilds), except
//! the election, which has the `halo-ha` thread and a runtime of its own so
//! that nothing else can delay its lease.
//!
//! - [`server`]: the VIPs, their tables, sources and listeners; serving or
//!   not; reload; drain.
//! - [`status`]: the typed `/status` document.
//! - [`series`]: the per-backend and fault-domain series of `/metrics`,
//!   rendered from the live tables.
//! - [`admin`]: the admin HTTP API.
//! - [`ha`]: the active/standby election, its server-confirmed lease,
//!   step-down, and the standby's failure detector.
//! - [`floating`]: the floating VIP address (netlink, gratuitous ARP).
//! - [`instance`]: the `halo-lb` service instance and TTL check either mode
//!   registers with its agent, and the heartbeat.
//! - [`ecmp`]: `ha.mode = "ecmp"`: every instance serves, and announces the
//!   VIP addresses (through a routing daemon) while it can.
//!
//! [`run`] wires them together with the data plane's workers and the
//! signals.

pub(crate) mod admin;
pub(crate) mod ecmp;
pub(crate) mod floating;
pub(crate) mod ha;
pub(crate) mod instance;
pub(crate) mod series;
pub(crate) mod server;
pub mod status;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::dataplane::workers::{self, Workers};
use crate::settings::{self, Config, Validated};

use self::ecmp::Membership;
use self::ha::Leadership;
use self::server::Server;

/// Runs the balancer until SIGTERM or SIGINT, then drains. SIGHUP reloads
/// `config_path`; a bad file is logged and the running config kept.
pub async fn run(config_path: PathBuf, config: Validated, prometheus: Option<PrometheusHandle>) -> anyhow::Result<()> {
    let mut sighup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;

    let count = config.workers.unwrap_or_else(workers::default_count);
    if count > workers::default_count() {
        tracing::warn!(
            workers = count,
            cores = workers::default_count(),
            "more data-plane workers than cores"
        );
    }
    warn_about_operation(&config);
    let workers = Workers::start(count, config.data_plane).context("cannot start the worker threads")?;
    let ecmp_mode = config.ha.as_ref().is_some_and(|ha| ha.ecmp.is_some());
    let leadership = config
        .ha
        .clone()
        .filter(|_| !ecmp_mode)
        .map(|settings| Leadership::new(settings, config.admin));
    let membership = config
        .ha
        .clone()
        .filter(|_| ecmp_mode)
        .map(|settings| Membership::new(settings, config.admin));
    // The announce interface too: a missing capability, or the name taken,
    // is a start-up error.
    let announcer = match &membership {
        Some(m) => Some(ecmp::Announcer::open(m.interface())?),
        None => None,
    };
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
    // A lone balancer, or one of an ECMP cluster, serves from the start; one
    // of a pair only once elected.
    let server = Server::new(&config, prometheus.clone(), workers, leadership.is_none());
    let admin_listener = tokio::net::TcpListener::bind(config.admin)
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", config.admin))?;
    // At start the token file is read here, before anything serves; on
    // reload, on the reload's own thread.
    let consul_token = config.consul_token().context("consul")?;
    server
        .apply(&config, consul_token)
        .context("cannot start the configured vips")?;
    let stop_admin = CancellationToken::new();
    let auth = Arc::new(halo_health::auth::AdminAuth::new(config.admin_token.clone()));
    tokio::spawn(admin::serve(
        admin_listener,
        Arc::clone(&server),
        leadership.clone(),
        membership.clone(),
        Arc::clone(&auth),
        stop_admin.clone(),
    ));
    let stop_ha = CancellationToken::new();
    let exit_ecmp = CancellationToken::new();
    let mut ecmp_withdrawn = None;
    // The election times the active's lease: it gets a thread and runtime
    // of its own, shared with nothing that could delay it (table rebuilds,
    // /status rendering and discovery run on this one).
    let election = match &leadership {
        Some(leadership) => {
            // The token cell is the server's: a SIGHUP's new token reaches
            // the election's own client on its own thread.
            let client = config.consul.client_sharing(server.consul_token()).context("consul")?;
            // A probe address the config fixes is bound now, so that a taken
            // one fails the start; one derived from the agent's address is
            // chosen and bound by the election once the agent answers.
            let probe = match leadership.settings().probe {
                settings::ProbeListen::Configured(at) | settings::ProbeListen::Admin(at) => Some(
                    std::net::UdpSocket::bind(at)
                        .and_then(|s| s.set_nonblocking(true).map(|()| s))
                        .with_context(|| format!("cannot listen for probes on {at} (UDP)"))?,
                ),
                settings::ProbeListen::AgentAddress { .. } => None,
            };
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
        None => match (&membership, announcer) {
            (Some(membership), Some(announcer)) => {
                let client = config.consul.client_sharing(server.consul_token()).context("consul")?;
                let (withdrawn_tx, withdrawn) = tokio::sync::oneshot::channel::<()>();
                ecmp_withdrawn = Some(withdrawn);
                let shutdown = ecmp::Shutdown {
                    stop: stop_ha.clone(),
                    withdrawn: withdrawn_tx,
                    exit: exit_ecmp.clone(),
                };
                let (membership, server) = (Arc::clone(membership), Arc::clone(&server));
                let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
                // Its own thread for the same reason as the election's: the
                // announcing lease is timed there.
                std::thread::Builder::new()
                    .name("halo-ecmp".into())
                    .spawn(move || {
                        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::error!(error = %e, "cannot build the membership's runtime");
                                return;
                            }
                        };
                        runtime.block_on(ecmp::run(membership, client, server, announcer, shutdown));
                        if done_tx.send(()).is_err() {
                            tracing::debug!("nobody waits for the membership any more");
                        }
                    })
                    .context("cannot start the membership thread")?;
                Some(done)
            }
            _ => None,
        },
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
    tracing::info!(
        admin = %config.admin,
        admin_writes = if config.admin_token.is_some() { "bearer token" } else { "loopback only" },
        vips = config.vips.len(),
        "halo-lb started"
    );
    tokio::spawn(tell_service_manager_when_ready(leadership.clone()));
    halo_health::service::spawn_watchdog();

    let mut election = election;
    let election_died = loop {
        let ended = async {
            match election.as_mut() {
                Some(done) => done.await.is_err(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // A reload waits on file reads (off this thread, with a
            // deadline); SIGTERM and SIGINT still end the process meanwhile.
            _ = sighup.recv() => tokio::select! {
                () = reload(&server, &auth, &config_path) => {}
                _ = sigterm.recv() => break false,
                _ = sigint.recv() => break false,
            },
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
        crate::dataplane::lease::revoke();
        server.stop_serving();
        tracing::error!("the election thread died; serving stopped, exiting");
        return Err(anyhow::anyhow!("the election thread died unexpectedly"));
    }
    tracing::info!("shutdown requested");
    halo_health::service::stopping("handing over and draining");
    if let (Some(withdrawn), Some(membership)) = (ecmp_withdrawn, &membership) {
        // Withdraw, let the routers stop sending, close the listeners; then
        // drain while the member key says `draining`; then leave.
        stop_ha.cancel();
        // The draining write (300 ms at most), the peers' handoff (3 s at
        // most), withdraw_wait, and room for the netlink and nft calls.
        let bound = membership.withdraw_wait() + ecmp::HANDOFF_WAIT + Duration::from_secs(5);
        match tokio::time::timeout(bound, withdrawn).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("the membership thread ended without withdrawing"),
            Err(_) => tracing::warn!("the withdrawal did not finish in time; draining anyway"),
        }
        let left = server.drain().await;
        exit_ecmp.cancel();
        if let Some(done) = election {
            if tokio::time::timeout(Duration::from_secs(2), done).await.is_err() {
                tracing::warn!("the membership did not leave Consul in 2s; its session ends with its check");
            }
        }
        stop_admin.cancel();
        if left > 0 {
            tracing::warn!(left, "exiting with connections still open");
        }
        return Ok(());
    }
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

/// What `halo-lb check` says about the pair's probe address: which address
/// this instance would advertise to its peers, and why. Asks the local
/// Consul agent when the address comes from it (two seconds at most);
/// `None` without `[ha]`.
pub async fn describe_probe_address(config: &Validated) -> Option<String> {
    let ha = config.ha.as_ref().filter(|ha| ha.ecmp.is_none())?;
    let agent = match ha.probe {
        settings::ProbeListen::AgentAddress { .. } => {
            let asked = match config.consul.client() {
                Ok(client) => tokio::time::timeout(Duration::from_secs(2), client.agent_self())
                    .await
                    .unwrap_or_else(|_| {
                        Err(halo_consul::Error::Config(
                            "the local Consul agent did not answer within 2s".to_owned(),
                        ))
                    }),
                Err(e) => Err(e),
            };
            match asked {
                Err(e) if e.is_unavailable() || matches!(e, halo_consul::Error::Config(_)) => {
                    return Some(format!(
                        "probe address: {}; the agent cannot be asked now ({e}), so it is chosen at start",
                        ha.probe
                    ))
                }
                other => other,
            }
        }
        // Not consulted for these.
        _ => Err(halo_consul::Error::Config(String::new())),
    };
    let chosen = ha::advertise::choose(ha.probe, &agent);
    Some(format!(
        "probe address: {} (UDP, and TCP to corroborate refusals): {}",
        chosen.addr, chosen.why
    ))
}

/// Tells systemd (`Type=notify`) that the balancer is ready: at once for a
/// lone balancer, whose listeners and admin API are up by now; for one of a
/// pair, once the election has placed it (active or standby), so that
/// `systemctl start` returns with the instance in the pair. Until then the
/// status line says what it waits for.
async fn tell_service_manager_when_ready(leadership: Option<Arc<Leadership>>) {
    let Some(leadership) = leadership else {
        halo_health::service::ready("serving");
        return;
    };
    halo_health::service::notify_or_log("STATUS=joining the election (waiting for Consul)");
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tick.tick().await;
        let role = leadership.role();
        if role != ha::Role::Starting {
            halo_health::service::ready(&format!("in the pair as {}", role.as_str()));
            return;
        }
    }
}

/// Start-up (and reload) warnings about settings that are valid but risky
/// on this machine.
fn warn_about_operation(config: &Validated) {
    if !config.admin.ip().is_loopback() {
        if config.admin_token.is_some() {
            tracing::warn!(
                admin = %config.admin,
                "admin.listen is not a loopback address: anyone who reaches it can read /status and /metrics; writes need the admin token"
            );
        } else {
            tracing::warn!(
                admin = %config.admin,
                "admin.listen is not a loopback address: anyone who reaches it can read /status and /metrics; with no admin.token_file, writes (disable/enable) are accepted only from loopback peers"
            );
        }
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
        let per = if v.settings.copy == settings::CopyMode::Splice {
            4
        } else {
            2
        };
        sum.saturating_add((v.settings.max_connections as u64).saturating_mul(per))
    });
    (need > soft).then_some((need, soft))
}

/// A process runs with one `ha.id` for its whole life. Unset in the file,
/// the id is derived from the host name, which may change while the
/// process runs (a DHCP lease, a container renamed); a reload must not read
/// that as an `[ha]` change, so the running id is kept.
fn keep_running_id(config: &mut Validated, running: Option<&settings::HaSettings>) {
    if let (Some(new), Some(running)) = (config.ha.as_mut(), running) {
        if new.id_is_default && running.id_is_default {
            new.id.clone_from(&running.id);
        }
    }
}

/// The settings a reload may not change while the election runs, named as
/// in the file: `[ha]` (the election's identity, timings and addresses) and,
/// for an instance of a pair, the `[consul]` fields other than the token
/// (the election's own client was made from them at start; applying them to
/// discovery alone would leave the election on the old agent). A new token
/// is fine: every client shares one token cell.
fn reload_blockers(
    running_ha: Option<&settings::HaSettings>,
    running_consul: Option<&settings::ConsulSettings>,
    new: &Validated,
) -> Vec<&'static str> {
    let mut changed = Vec::new();
    match (running_ha, new.ha.as_ref()) {
        (None, None) => {}
        (None, Some(_)) => changed.push("[ha] (added)"),
        (Some(_), None) => changed.push("[ha] (removed)"),
        (Some(a), Some(b)) => {
            let fields: [(&'static str, bool); 8] = [
                ("ha.cluster", a.cluster != b.cluster),
                ("ha.id", a.id != b.id),
                ("ha.check_ttl", a.check_ttl != b.check_ttl),
                ("ha.lock_delay", a.lock_delay != b.lock_delay),
                ("ha.probe_listen", a.probe != b.probe),
                ("ha.probe_interval", a.probe_interval != b.probe_interval),
                ("ha.probe_misses", a.probe_misses != b.probe_misses),
                ("ha.vip_address/vip_interface", a.floating != b.floating),
            ];
            changed.extend(fields.iter().filter(|(_, differs)| *differs).map(|(name, _)| *name));
        }
    }
    if let (Some(_), Some(a)) = (running_ha, running_consul) {
        let b = &new.consul;
        let fields: [(&'static str, bool); 3] = [
            ("consul.address", a.address != b.address),
            ("consul TLS settings", a.tls != b.tls),
            ("consul.wait", a.wait != b.wait),
        ];
        changed.extend(fields.iter().filter(|(_, differs)| *differs).map(|(name, _)| *name));
    }
    changed
}

/// How long a reload may spend reading files (the config, token files, CA
/// files) before it is given up, the running config kept.
const RELOAD_DEADLINE: Duration = Duration::from_secs(10);

async fn reload(server: &Server, auth: &halo_health::auth::AdminAuth, path: &std::path::Path) {
    tracing::info!(path = %path.display(), "SIGHUP: reloading");
    // Every file read (the config, the admin and Consul token files, CA
    // files) happens on a thread of its own with a deadline: none on this
    // one, which serves the admin API and drives discovery.
    let owned = path.to_owned();
    let read = halo_health::service::off_thread("halo-reload", RELOAD_DEADLINE, move || {
        let config = Config::load(&owned).map_err(|e| e.to_string())?;
        let token = config.consul_token().map_err(|e| format!("consul: {e}"))?;
        Ok::<_, String>((config, token))
    });
    let loaded = match read.await {
        Ok(loaded) => loaded,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "reload: reading the files failed; the running config stays in force");
            return;
        }
    };
    let loaded = loaded.map(|(mut config, token)| {
        keep_running_id(&mut config, server.ha_settings().as_ref());
        (config, token)
    });
    match loaded {
        Ok((config, _))
            if !reload_blockers(
                server.ha_settings().as_ref(),
                server.consul_settings().as_ref(),
                &config,
            )
            .is_empty() =>
        {
            let fields = reload_blockers(
                server.ha_settings().as_ref(),
                server.consul_settings().as_ref(),
                &config,
            );
            tracing::error!(
                fields = %fields.join(", "),
                "reload rejected: {} changed, which the election uses and cannot change under it; restart to apply. The running config stays in force",
                fields.join(", ")
            )
        }
        Ok((config, token)) => match server.apply(&config, token) {
            Ok(()) => {
                // The token (re-read with the file) is part of the config
                // that succeeded; a token file that fails to read rejects
                // the whole reload above and keeps the running one.
                if auth.set(config.admin_token.clone()) {
                    tracing::info!(token = config.admin_token.is_some(), "admin token changed");
                }
                warn_about_operation(&config);
                tracing::info!(vips = config.vips.len(), "reload applied");
            }
            Err(e) => tracing::error!(error = %e, "reload failed; the running config stays in force"),
        },
        Err(e) => tracing::error!(error = %e, "reload rejected; the running config stays in force"),
    }
}
