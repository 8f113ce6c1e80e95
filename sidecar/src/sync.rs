//! Keeps the local Consul agent in step with the workload: registration,
//! check states (each flip pushed at once, plus heartbeats well inside the
//! TTL), and maintenance while draining.
//!
//! Consul being down never stops the sidecar: failed calls are retried with
//! capped exponential back-off, and the state to push is always the latest.
//! When the agent has forgotten us (a restart without a data dir answers 404,
//! or Consul 1.8's 500 "does not have associated TTL", on a check update; or
//! the periodic comparison finds the service gone), we register again.

use std::time::Duration;

use halo_consul::{CheckRegistration, CheckStatus, Client, ServiceRegistration, Weights};
use halo_health::{CheckHandle, Status};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// First back-off after a failed Consul call.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest back-off between failed Consul calls.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the sidecar compares its registration with the agent's.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Name of the liveness check registered when no app check is configured,
/// so a dead sidecar's workload still leaves the catalog.
pub const LIVENESS_CHECK: &str = "sidecar";

/// The Consul check ID of check `name` of instance `service_id`.
pub fn check_id(service_id: &str, name: &str) -> String {
    format!("{service_id}:{name}")
}

fn consul_status(s: Status) -> CheckStatus {
    match s {
        Status::Passing => CheckStatus::Passing,
        Status::Warning => CheckStatus::Warning,
        Status::Critical => CheckStatus::Critical,
    }
}

/// What is pushed for each Consul check.
struct Pushed {
    id: String,
    handle: Option<CheckHandle>,
    dirty: bool,
}

impl Pushed {
    fn current(&self) -> (CheckStatus, String) {
        match &self.handle {
            Some(h) => {
                let s = h.state();
                (consul_status(s.status), s.output)
            }
            None => (CheckStatus::Passing, "halo-sidecar is running".into()),
        }
    }
}

/// Runs until `stop` is cancelled. `draining` true means "in maintenance".
pub async fn run(
    client: Client,
    settings: Settings,
    checks: Vec<CheckHandle>,
    draining: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let registered_gauge = metrics::gauge!("halo_sidecar_registered");
    let push_failures = metrics::counter!("halo_consul_push_failures_total");
    let ttl = settings.config.service.check_ttl;

    // Forward every flip of every check into one channel.
    let (flip_tx, mut flips) = mpsc::unbounded_channel::<usize>();
    for (i, handle) in checks.iter().enumerate() {
        let mut rx = handle.subscribe();
        let tx = flip_tx.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = rx.changed() => {
                        if changed.is_err() || tx.send(i).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    let mut pushed: Vec<Pushed> = if checks.is_empty() {
        vec![Pushed {
            id: check_id(&settings.service_id, LIVENESS_CHECK),
            handle: None,
            dirty: true,
        }]
    } else {
        checks
            .iter()
            .map(|h| Pushed {
                id: check_id(&settings.service_id, h.name()),
                handle: Some(h.clone()),
                dirty: true,
            })
            .collect()
    };

    let mut draining = draining;
    let mut registered = false;
    let mut maintenance: Option<bool> = None;
    let mut failures: u32 = 0;
    let mut heartbeat = tokio::time::interval(ttl / 3);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        let want_maintenance = *draining.borrow();
        let result = step(
            &client,
            &settings,
            &mut pushed,
            &mut registered,
            &mut maintenance,
            want_maintenance,
        )
        .await;
        registered_gauge.set(if registered { 1.0 } else { 0.0 });
        let retry_at = match result {
            Ok(()) => {
                failures = 0;
                None
            }
            Err(e) => {
                failures += 1;
                push_failures.increment(1);
                let delay = BACKOFF_MIN.saturating_mul(1 << failures.min(10)).min(BACKOFF_MAX);
                tracing::warn!(error = %e, retry_in = ?delay, "consul update failed; health endpoints keep serving");
                Some(Instant::now() + delay)
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            Some(i) = flips.recv() => {
                if let Some(p) = pushed.get_mut(i) { p.dirty = true; }
            }
            _ = heartbeat.tick() => pushed.iter_mut().for_each(|p| p.dirty = true),
            _ = reconcile.tick(), if registered => {
                match client.agent_service(&settings.service_id).await {
                    Ok(None) => {
                        tracing::warn!(service = %settings.service_id, "the agent no longer knows this service; registering again");
                        registered = false;
                    }
                    Ok(Some(_)) => {}
                    Err(e) => tracing::debug!(error = %e, "reconcile: agent unreachable"),
                }
            }
            changed = draining.changed() => {
                if changed.is_err() { return; }
            }
            () = sleep_until_opt(retry_at) => {}
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One reconciliation pass: register if needed, set maintenance, push dirty
/// checks. Stops at the first failure (the caller backs off).
async fn step(
    client: &Client,
    settings: &Settings,
    pushed: &mut [Pushed],
    registered: &mut bool,
    maintenance: &mut Option<bool>,
    draining: bool,
) -> Result<(), halo_consul::Error> {
    if !*registered {
        client.register_service(&registration(settings, pushed)).await?;
        tracing::info!(service = %settings.service_id, "registered with the local Consul agent");
        *registered = true;
        *maintenance = None;
        pushed.iter_mut().for_each(|p| p.dirty = true);
    }
    if *maintenance != Some(draining) {
        let reason = draining.then_some("halo-sidecar is draining");
        match client
            .set_service_maintenance(&settings.service_id, draining, reason)
            .await
        {
            Ok(()) => {
                tracing::info!(maintenance = draining, "service maintenance set");
                *maintenance = Some(draining);
            }
            Err(e) => return Err(forget_if_not_found(e, registered)),
        }
    }
    for p in pushed.iter_mut().filter(|p| p.dirty) {
        let (status, output) = p.current();
        match client.update_check(&p.id, status, &output).await {
            Ok(()) => p.dirty = false,
            Err(e) => return Err(forget_if_not_found(e, registered)),
        }
    }
    Ok(())
}

fn forget_if_not_found(e: halo_consul::Error, registered: &mut bool) -> halo_consul::Error {
    if e.is_not_found() {
        tracing::warn!(error = %e, "the agent forgot our registration; registering again");
        *registered = false;
    }
    e
}

/// The service as registered: one TTL check per configured check.
fn registration(settings: &Settings, pushed: &[Pushed]) -> ServiceRegistration {
    let s = &settings.config.service;
    let checks = pushed
        .iter()
        .map(|p| {
            let (status, _) = p.current();
            let name = p.handle.as_ref().map_or(LIVENESS_CHECK, |h| h.name());
            CheckRegistration {
                notes: Some(format!("pushed by halo-sidecar every {:?}", s.check_ttl / 3)),
                deregister_critical_service_after: Some(s.deregister_critical_after),
                ..CheckRegistration::ttl(&p.id, format!("halo: {name}"), s.check_ttl, status)
            }
        })
        .collect();
    ServiceRegistration {
        id: settings.service_id.clone(),
        name: s.name.clone(),
        tags: s.tags.clone(),
        address: s.address.clone(),
        port: Some(s.port),
        meta: s.meta.clone(),
        weights: s.weights.map(|w| Weights {
            passing: w.passing,
            warning: w.warning,
        }),
        checks,
    }
}
