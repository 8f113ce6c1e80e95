//! `halo-sidecar`: runs beside an app, registers it with the local Consul
//! agent (name, address, port, tags, fault domain), probes it, pushes its
//! health to Consul, serves health endpoints, and drains it on shutdown.
//!
//! # Layout
//! - [`config`]: the TOML file with `HALO_*` environment overrides.
//! - [`sync`]: registration, check pushes, heartbeats, maintenance, and
//!   re-registration after the agent forgets us.
//! - this file: the admin API and the drain sequence.
//!
//! Drain (SIGTERM, SIGINT or `POST /drain`): the service goes into Consul
//! maintenance, so balancers stop sending new connections; after
//! `drain.grace` it is deregistered and the process exits 0. `POST /undrain`
//! during the grace period takes it out of maintenance and cancels the exit.
//! Both writes pass [`halo_health::auth::authorize`]: the bearer token of
//! `admin.token_file` (read once at start), or without one a loopback peer
//! sending `X-Halo-Request`; `Host` and `Origin` are checked against
//! browsers.
//! Shutdown is bounded: after the grace, deregistration gets at most
//! [`SHUTDOWN_MARGIN`] (each call a deadline within it), then the sidecar
//! logs what it gave up on and exits; Consul reaps the workload once the
//! liveness check has been critical for `deregister_critical_after`.

pub mod config;
pub mod sync;

#[cfg(test)]
mod reference;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use halo_consul::Client;
use halo_health::server::{health_endpoints, json_response, metrics_response, text_response, HttpResponse};
use halo_health::{CheckHandle, Prober};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// Deadline of each Consul call; pushes must not wait long on a hung agent.
pub const CONSUL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the final deregistration may take after the drain grace, all
/// retries and call deadlines included, before the sidecar exits anyway (the
/// liveness check's TTL and `deregister_critical_after` clean up after it
/// then). A drain therefore ends within `drain.grace` plus this.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(3);
/// Pause between deregistration attempts.
const DEREGISTER_RETRY: Duration = Duration::from_millis(250);

/// Shared with the admin API.
struct Admin {
    checks: Vec<CheckHandle>,
    draining: watch::Sender<bool>,
    /// The write token (fixed for the process's life: no reload).
    token: Option<halo_health::auth::Token>,
    prometheus: Option<PrometheusHandle>,
    sync: watch::Receiver<sync::SyncStatus>,
}

/// Runs the sidecar until a drain completes.
pub async fn run(settings: Settings, prometheus: Option<PrometheusHandle>) -> anyhow::Result<()> {
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let client = Client::new(settings.config.consul.client_config(Some(CONSUL_TIMEOUT))).context("consul")?;

    let stop = CancellationToken::new();
    let prober = Prober::default();
    let checks: Vec<CheckHandle> = settings
        .checks
        .iter()
        .map(|c| halo_health::spawn(c.clone(), prober.clone(), stop.clone()))
        .collect();
    let (draining_tx, mut draining) = watch::channel(false);
    let (sync_status, sync_rx) = watch::channel(sync::SyncStatus::default());
    let sync_rx_for_notify = sync_rx.clone();
    let draining_gauge = metrics::gauge!("halo_sidecar_draining");

    let listener = tokio::net::TcpListener::bind(settings.admin)
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", settings.admin))?;
    if !settings.admin.ip().is_loopback() {
        if settings.admin_token.is_some() {
            tracing::warn!(
                admin = %settings.admin,
                "admin.listen is not a loopback address: anyone who reaches it can read /status and /metrics; POST /drain and /undrain need the admin token"
            );
        } else {
            tracing::warn!(
                admin = %settings.admin,
                "admin.listen is not a loopback address: anyone who reaches it can read /status and /metrics; with no admin.token_file, POST /drain and /undrain are accepted only from loopback peers"
            );
        }
    }
    let admin = Arc::new(Admin {
        checks: checks.clone(),
        draining: draining_tx.clone(),
        token: settings.admin_token.clone(),
        prometheus,
        sync: sync_rx,
    });
    tokio::spawn(halo_health::server::serve(listener, stop.clone(), move |req| {
        let response = route(&admin, req);
        async move { response }
    }));
    let token_changed = Arc::new(tokio::sync::Notify::new());
    let sync = tokio::spawn(sync::run(
        client.clone(),
        settings.clone(),
        checks,
        draining.clone(),
        stop.clone(),
        sync_status,
        Arc::clone(&token_changed),
    ));
    tracing::info!(
        service = %settings.service_id,
        admin = %settings.admin,
        admin_writes = if settings.admin_token.is_some() { "bearer token" } else { "loopback only" },
        consul = client.address(),
        "halo-sidecar started"
    );
    tokio::spawn(tell_service_manager_when_registered(sync_rx_for_notify));
    halo_health::service::spawn_watchdog();

    let grace = settings.config.drain.grace;
    loop {
        // Serving: wait for a drain request.
        tokio::select! {
            _ = sigterm.recv() => { draining_tx.send_replace(true); }
            _ = sigint.recv() => { draining_tx.send_replace(true); }
            _ = sighup.recv() => {
                // The file is read on a thread of its own with a deadline;
                // SIGTERM and SIGINT still start the drain meanwhile.
                tokio::select! {
                    changed = reload_token(&client) => if changed {
                        token_changed.notify_one();
                    },
                    _ = sigterm.recv() => { draining_tx.send_replace(true); }
                    _ = sigint.recv() => { draining_tx.send_replace(true); }
                }
                continue;
            }
            changed = draining.wait_for(|d| *d) => { changed.context("drain channel closed")?; }
        }
        draining.mark_unchanged();
        draining_gauge.set(1.0);
        halo_health::service::notify_or_log("STATUS=draining: in maintenance in Consul until the grace ends");
        tracing::info!(?grace, "draining: in maintenance, deregistering after the grace period");
        let undrained = tokio::select! {
            () = tokio::time::sleep(grace) => false,
            changed = draining.wait_for(|d| !*d) => { changed.context("drain channel closed")?; true }
        };
        if !undrained {
            break;
        }
        draining_gauge.set(0.0);
        tracing::info!("drain cancelled by /undrain; serving again");
    }

    halo_health::service::stopping("deregistering");
    // Stop pushing (a late heartbeat could re-register), then deregister.
    // The sync task abandons any call in flight on `stop`.
    stop.cancel();
    if let Err(e) = sync.await {
        tracing::warn!(error = %e, "sync task ended abnormally");
    }
    deregister(&client, &settings, SHUTDOWN_MARGIN).await;
    Ok(())
}

/// How long a SIGHUP's token file read may take before it is given up and
/// the token in use kept.
const RELOAD_DEADLINE: Duration = Duration::from_secs(5);

/// SIGHUP: reads the Consul token file again (the only thing reloaded; the
/// rest of the config needs a restart), on a thread of its own with
/// [`RELOAD_DEADLINE`]. A bad file keeps the old token in use, logged; the
/// token itself is never logged. Answers whether the token changed.
async fn reload_token(client: &Client) -> bool {
    let reloading = client.clone();
    let read = halo_health::service::off_thread("halo-token-reload", RELOAD_DEADLINE, move || reloading.reload_token());
    match read.await {
        Ok(Ok(true)) => {
            tracing::info!(token_file = ?client.token_file(), "SIGHUP: Consul ACL token changed; used from the next call");
            return true;
        }
        Ok(Ok(false)) => match client.token_file() {
            Some(file) => tracing::info!(token_file = %file.display(), "SIGHUP: Consul ACL token file unchanged"),
            None => tracing::info!("SIGHUP: no Consul token file configured; nothing to reload"),
        },
        Ok(Err(e)) => {
            tracing::error!(error = %e, "SIGHUP: cannot read the Consul token file; keeping the token in use")
        }
        Err(e) => tracing::error!(
            token_file = ?client.token_file(),
            error = %e,
            "SIGHUP: cannot read the Consul token file; keeping the token in use"
        ),
    }
    false
}

/// Tells systemd (`Type=notify`) the sidecar is ready once the admin API
/// listens (it does by now) and the agent has the registration, so that
/// `systemctl start` returns with the instance in Consul. Until then the
/// status line says what it waits for.
async fn tell_service_manager_when_registered(mut sync: watch::Receiver<sync::SyncStatus>) {
    halo_health::service::notify_or_log("STATUS=registering with the Consul agent");
    if sync.wait_for(|s| s.registered).await.is_ok() {
        halo_health::service::ready("registered");
    }
}

/// Deregisters the instance, retrying until `budget` is spent; every call's
/// deadline fits in what is left of it.
async fn deregister(client: &Client, settings: &Settings, budget: Duration) {
    let service_id = &settings.service_id;
    let deadline = tokio::time::Instant::now() + budget;
    let mut attempts = 0u32;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let error = if left.is_zero() {
            None
        } else {
            attempts += 1;
            match client
                .with_timeout(left.min(CONSUL_TIMEOUT))
                .deregister_service(service_id)
                .await
            {
                Ok(()) => {
                    tracing::info!(service = %service_id, "deregistered; exiting");
                    return;
                }
                Err(e) => Some(sync::truncate(&e.to_string(), sync::ERROR_TEXT_MAX)),
            }
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            tracing::error!(
                service = %service_id,
                attempts,
                budget = ?budget,
                last_error = error.as_deref().unwrap_or("none"),
                reaped_after = ?settings.config.service.deregister_critical_after,
                "gave up deregistering after the shutdown margin; exiting anyway. \
                 Consul removes the instance once its liveness check has been critical for reaped_after"
            );
            return;
        }
        if let Some(e) = error {
            tracing::warn!(error = %e, "deregistration failed; retrying");
        }
        tokio::time::sleep(DEREGISTER_RETRY.min(left)).await;
    }
}

/// Who sent an admin request, for the log of every write.
fn client(req: &Request<Incoming>) -> String {
    halo_health::server::peer(req).map_or_else(|| "unknown".to_owned(), |p| p.to_string())
}

fn route(admin: &Admin, req: Request<Incoming>) -> HttpResponse {
    let draining = *admin.draining.borrow();
    let path = req.uri().path();
    if let Some(r) = health_endpoints(req.method(), path, &admin.checks, draining) {
        return r;
    }
    match (req.method(), path.trim_end_matches('/')) {
        (&Method::GET, "/metrics") => match &admin.prometheus {
            Some(p) => metrics_response(p.render()),
            None => text_response(StatusCode::NOT_FOUND, "metrics are not enabled in this process\n"),
        },
        (&Method::GET, "/status") => {
            let sync = admin.sync.borrow().clone();
            json_response(StatusCode::OK, &json!({"draining": draining, "consul": sync}))
        }
        (&Method::POST, write @ ("/drain" | "/undrain")) => {
            let grant = match halo_health::auth::authorize(&req, admin.token.as_ref()) {
                Ok(grant) => grant,
                Err(denied) => {
                    tracing::warn!(path = write, client = %client(&req), status = %denied.status, reason = denied.reason, "admin write refused");
                    return denied.response();
                }
            };
            let drain = write == "/drain";
            let changed = admin.draining.send_replace(drain) != drain;
            tracing::info!(client = %client(&req), auth = grant.as_str(), changed, "{} requested through the admin API", &write[1..]);
            json_response(StatusCode::OK, &json!({"draining": drain, "changed": changed}))
        }
        (_, "/metrics" | "/status") => text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        (_, "/drain" | "/undrain") => text_response(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}
