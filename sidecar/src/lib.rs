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

pub mod config;
pub mod sync;

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
const CONSUL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the final deregistration is retried before exiting anyway (the
/// checks' TTL and `deregister_critical_after` clean up after us then).
const DEREGISTER_DEADLINE: Duration = Duration::from_secs(5);

/// Shared with the admin API.
struct Admin {
    checks: Vec<CheckHandle>,
    draining: watch::Sender<bool>,
    prometheus: Option<PrometheusHandle>,
}

/// Runs the sidecar until a drain completes.
pub async fn run(settings: Settings, prometheus: Option<PrometheusHandle>) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let client = Client::new(halo_consul::Config {
        address: settings.config.consul.address.clone(),
        token: settings.config.consul.token.clone(),
        datacenter: None,
        timeout: Some(CONSUL_TIMEOUT),
        max_response_bytes: None,
    })
    .context("consul")?;

    let stop = CancellationToken::new();
    let prober = Prober::default();
    let checks: Vec<CheckHandle> = settings
        .checks
        .iter()
        .map(|c| halo_health::spawn(c.clone(), prober.clone(), stop.clone()))
        .collect();
    let (draining_tx, mut draining) = watch::channel(false);
    let draining_gauge = metrics::gauge!("halo_sidecar_draining");

    let listener = tokio::net::TcpListener::bind(settings.admin)
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", settings.admin))?;
    let admin = Arc::new(Admin {
        checks: checks.clone(),
        draining: draining_tx.clone(),
        prometheus,
    });
    tokio::spawn(halo_health::server::serve(listener, stop.clone(), move |req| {
        let response = route(&admin, req);
        async move { response }
    }));
    let sync = tokio::spawn(sync::run(
        client.clone(),
        settings.clone(),
        checks,
        draining.clone(),
        stop.clone(),
    ));
    tracing::info!(service = %settings.service_id, admin = %settings.admin, consul = client.address(), "halo-sidecar started");

    let grace = settings.config.drain.grace;
    loop {
        // Serving: wait for a drain request.
        tokio::select! {
            _ = sigterm.recv() => { draining_tx.send_replace(true); }
            _ = sigint.recv() => { draining_tx.send_replace(true); }
            changed = draining.wait_for(|d| *d) => { changed.context("drain channel closed")?; }
        }
        draining.mark_unchanged();
        draining_gauge.set(1.0);
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

    // Stop pushing (a late heartbeat could re-register), then deregister.
    stop.cancel();
    if let Err(e) = sync.await {
        tracing::warn!(error = %e, "sync task ended abnormally");
    }
    deregister(&client, &settings.service_id).await;
    Ok(())
}

async fn deregister(client: &Client, service_id: &str) {
    let deadline = tokio::time::Instant::now() + DEREGISTER_DEADLINE;
    loop {
        match client.deregister_service(service_id).await {
            Ok(()) => {
                tracing::info!(service = %service_id, "deregistered; exiting");
                return;
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "deregistration failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not deregister; Consul will drop the service once its checks expire");
                return;
            }
        }
    }
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
        (&Method::POST, "/drain") => {
            let changed = !admin.draining.send_replace(true);
            json_response(StatusCode::OK, &json!({"draining": true, "changed": changed}))
        }
        (&Method::POST, "/undrain") => {
            let changed = admin.draining.send_replace(false);
            json_response(StatusCode::OK, &json!({"draining": false, "changed": changed}))
        }
        (_, "/metrics") => text_response(StatusCode::METHOD_NOT_ALLOWED, "use GET\n"),
        (_, "/drain" | "/undrain") => text_response(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}
