//! Keeps the local Consul agent in step with the workload: registration,
//! check states (each flip pushed at once, plus heartbeats well inside the
//! TTL), and maintenance while draining.
//!
//! Consul being down never stops the sidecar: failed calls are retried with
//! capped exponential back-off ([`Backoff`]; the delay logged as `retry_in`
//! is the delay applied), and the state to push is always the latest. A
//! request Consul refuses outright (a 4xx other than 404 and 429, e.g. an ACL
//! denial) is logged with Consul's reason, counted in
//! `halo_sidecar_consul_refusals_total`, and retried only every
//! [`REFUSED_BACKOFF`]; `halo-sidecar check` catches what the config can
//! cause (metadata, weights, address) before that.
//!
//! Besides one TTL check per app check, the sidecar registers its own
//! liveness TTL check ([`LIVENESS_CHECK`]), the only one with
//! `DeregisterCriticalServiceAfter`.
//!
//! When the agent has forgotten us (a restart without a data dir answers 404,
//! or Consul 1.8's 500 "does not have associated TTL", on a check update; or
//! the periodic comparison finds the service gone), we register again.

use std::sync::Arc;
use std::time::Duration;

use halo_consul::{CheckRegistration, CheckStatus, Client, ServiceRegistration, Weights};
use halo_health::{CheckHandle, Status};
use http::StatusCode;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Settings, LIVENESS_CHECK};

/// First back-off after a failed Consul call.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest back-off between failed Consul calls.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Back-off after Consul refused a request outright (a 4xx other than 404
/// and 429: bad metadata, an ACL denial). Asking again soon would get the
/// same answer; someone has to change the config or the token first.
pub const REFUSED_BACKOFF: Duration = Duration::from_secs(60);
/// How often the sidecar compares its registration with the agent's.
const RECONCILE_EVERY: Duration = Duration::from_secs(5);
/// Most bytes of an error kept in logs and in [`SyncStatus`].
pub const ERROR_TEXT_MAX: usize = 300;

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

/// What the sync loop last did, published after every pass for the admin
/// API's `GET /status` (and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    /// The agent has our registration (as far as we know).
    pub registered: bool,
    /// Consul has the instance in maintenance (draining): out of `?passing`
    /// answers and DNS.
    pub maintenance: bool,
    /// Passes attempted since start (each a few Consul calls).
    pub attempts: u64,
    /// Failed passes in a row; 0 after a success.
    pub failures_in_a_row: u32,
    /// Times Consul refused a request outright (4xx other than 404/429).
    pub refusals: u64,
    /// The last failure, truncated to [`ERROR_TEXT_MAX`] bytes; `None` after
    /// a success.
    pub last_error: Option<String>,
    /// The back-off now applied before the next pass, in milliseconds;
    /// `None` when not backing off. Exactly the delay logged as `retry_in`.
    pub retry_in_ms: Option<u64>,
}

/// The retry schedule after failed passes. The delay it returns is both the
/// one logged and the one applied: the loop makes no Consul call before it
/// has passed, whatever else wakes it.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// A success: the next failure starts from [`BACKOFF_MIN`] again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// A failure; returns the delay before the next attempt: doubling from
    /// [`BACKOFF_MIN`] up to [`BACKOFF_MAX`], or [`REFUSED_BACKOFF`] after a
    /// refusal.
    pub fn failed(&mut self, refused: bool) -> Duration {
        self.failures = self.failures.saturating_add(1);
        if refused {
            return REFUSED_BACKOFF;
        }
        BACKOFF_MIN
            .saturating_mul(1 << (self.failures - 1).min(10))
            .min(BACKOFF_MAX)
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Consul's answer when it refused the request itself (a 4xx other than 404,
/// which means "forgotten, register again", and 429, "slow down"): the
/// status and the reason Consul gave.
pub fn refusal(e: &halo_consul::Error) -> Option<(StatusCode, &str)> {
    match e {
        halo_consul::Error::Status { status, message, .. }
            if status.is_client_error()
                && *status != StatusCode::NOT_FOUND
                && *status != StatusCode::TOO_MANY_REQUESTS =>
        {
            Some((*status, message.as_str()))
        }
        _ => None,
    }
}

/// At most `max` bytes of `s`, cut at a character boundary, marked when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..cut], s.len())
}

/// What is pushed for each Consul check.
struct Pushed {
    id: String,
    /// `None`: the sidecar's own liveness check.
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
/// `token_changed` is notified when SIGHUP brought a new ACL token: a pass
/// then runs at once, whatever the back-off.
/// Every Consul call is abandoned as soon as `stop` is cancelled, so the
/// caller's shutdown never waits on a hung agent here.
pub async fn run(
    client: Client,
    settings: Settings,
    checks: Vec<CheckHandle>,
    draining: watch::Receiver<bool>,
    stop: CancellationToken,
    status: watch::Sender<SyncStatus>,
    token_changed: Arc<Notify>,
) {
    let registered_gauge = metrics::gauge!("halo_sidecar_registered");
    let push_failures = metrics::counter!("halo_consul_push_failures_total");
    let refusals = metrics::counter!("halo_sidecar_consul_refusals_total");
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
                        if changed.is_err() || tx.send(i + 1).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    // The liveness check first, then one per app check (index i + 1).
    let mut pushed: Vec<Pushed> = std::iter::once(Pushed {
        id: check_id(&settings.service_id, LIVENESS_CHECK),
        handle: None,
        dirty: true,
    })
    .chain(checks.iter().map(|h| Pushed {
        id: check_id(&settings.service_id, h.name()),
        handle: Some(h.clone()),
        dirty: true,
    }))
    .collect();

    let mut draining = draining;
    let mut registered = false;
    let mut maintenance: Option<bool> = None;
    let mut backoff = Backoff::default();
    let mut retry_at: Option<Instant> = None;
    let mut heartbeat = tokio::time::interval(ttl / 3);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconcile = tokio::time::interval(RECONCILE_EVERY);
    reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        // While backing off, wake-ups (flips, heartbeats, drain) only mark
        // what to push; the pass waits for `retry_at`, the time logged.
        if retry_at.is_none_or(|at| Instant::now() >= at) {
            let want_maintenance = *draining.borrow();
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = step(&client, &settings, &mut pushed, &mut registered, &mut maintenance, want_maintenance) => r,
            };
            registered_gauge.set(if registered { 1.0 } else { 0.0 });
            let mut report = status.borrow().clone();
            report.attempts += 1;
            report.registered = registered;
            report.maintenance = registered && maintenance == Some(true);
            match result {
                Ok(()) => {
                    backoff.reset();
                    retry_at = None;
                    report.last_error = None;
                    report.retry_in_ms = None;
                }
                Err(e) => {
                    push_failures.increment(1);
                    let refused = refusal(&e);
                    let delay = backoff.failed(refused.is_some());
                    let text = truncate(&e.to_string(), ERROR_TEXT_MAX);
                    if let Some((code, reason)) = refused {
                        refusals.increment(1);
                        report.refusals += 1;
                        tracing::error!(
                            status = %code,
                            reason = %truncate(reason, ERROR_TEXT_MAX),
                            error = %text,
                            retry_in = ?delay,
                            "Consul refused the request; it will refuse it again until the config or the ACL token changes"
                        );
                    } else {
                        tracing::warn!(error = %text, retry_in = ?delay, "consul update failed; health endpoints keep serving");
                    }
                    retry_at = Some(Instant::now() + delay);
                    report.last_error = Some(text);
                    report.retry_in_ms = Some(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                }
            }
            report.failures_in_a_row = backoff.failures();
            status.send_replace(report);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            Some(i) = flips.recv() => {
                if let Some(p) = pushed.get_mut(i) { p.dirty = true; }
            }
            _ = heartbeat.tick() => pushed.iter_mut().for_each(|p| p.dirty = true),
            _ = reconcile.tick(), if registered && retry_at.is_none() => {
                let answer = tokio::select! {
                    () = stop.cancelled() => return,
                    a = client.agent_service(&settings.service_id) => a,
                };
                match answer {
                    Ok(None) => {
                        tracing::warn!(service = %settings.service_id, "the agent no longer knows this service; registering again");
                        registered = false;
                    }
                    Ok(Some(_)) => {}
                    Err(e) => tracing::debug!(error = %truncate(&e.to_string(), ERROR_TEXT_MAX), "reconcile: agent unreachable"),
                }
            }
            changed = draining.changed() => {
                if changed.is_err() { return; }
            }
            // A new ACL token (SIGHUP): what Consul refused may pass now, so
            // retry at once rather than after the refusal's back-off.
            () = token_changed.notified() => {
                retry_at = None;
                pushed.iter_mut().for_each(|p| p.dirty = true);
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

/// The service as registered: the liveness TTL check and one TTL check per
/// configured check.
fn registration(settings: &Settings, pushed: &[Pushed]) -> ServiceRegistration {
    let s = &settings.config.service;
    let checks = pushed
        .iter()
        .map(|p| {
            let (status, _) = p.current();
            let name = p.handle.as_ref().map_or(LIVENESS_CHECK, |h| h.name());
            CheckRegistration {
                notes: Some(format!("pushed by halo-sidecar every {:?}", s.check_ttl / 3)),
                // Only the sidecar's own liveness reaps the workload: an app
                // that fails its check stays registered, as critical, rather
                // than being removed and re-registered every ~90 s.
                deregister_critical_service_after: p.handle.is_none().then_some(s.deregister_critical_after),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_refusals_wait_long() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..8).map(|_| b.failed(false)).collect();
        let ms: Vec<u128> = delays.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.failed(true), REFUSED_BACKOFF);
        b.reset();
        assert_eq!(b.failed(false), BACKOFF_MIN);
        // No overflow however long Consul stays away.
        let mut b = Backoff { failures: u32::MAX - 1 };
        assert_eq!(b.failed(false), BACKOFF_MAX);
        assert_eq!(b.failed(false), BACKOFF_MAX);
    }

    #[test]
    fn refusals_are_4xx_other_than_404_and_429() {
        let status = |code: u16| halo_consul::Error::Status {
            method: http::Method::PUT,
            path: "agent/service/register".into(),
            status: StatusCode::from_u16(code).unwrap(),
            message: "Invalid Service Meta".into(),
        };
        assert_eq!(
            refusal(&status(400)),
            Some((StatusCode::BAD_REQUEST, "Invalid Service Meta"))
        );
        assert!(refusal(&status(403)).is_some());
        assert!(refusal(&status(404)).is_none());
        assert!(refusal(&status(429)).is_none());
        assert!(refusal(&status(500)).is_none());
        let timeout = halo_consul::Error::Timeout {
            address: "127.0.0.1:8500".into(),
            method: http::Method::PUT,
            path: "x".into(),
            after: Duration::from_secs(1),
        };
        assert!(refusal(&timeout).is_none());
    }

    #[test]
    fn truncation_is_bounded_and_keeps_characters_whole() {
        assert_eq!(truncate("short", 10), "short");
        let long = "é".repeat(1000);
        let t = truncate(&long, 301);
        assert!(t.len() < 301 + 40, "{}", t.len());
        assert!(
            t.starts_with(&"é".repeat(150)) && t.ends_with("(2000 bytes in all)"),
            "{t}"
        );
    }

    /// The delay logged as `retry_in` (published as `retry_in_ms`) is the
    /// delay applied: no pass starts before it has passed, although the
    /// heartbeat (every TTL/3 = 333 ms here) wakes the loop far more often.
    /// The old loop retried on every heartbeat once the back-off passed it.
    #[tokio::test(start_paused = true)]
    async fn the_backoff_logged_is_the_backoff_applied() {
        // A port nobody listens on: every pass fails at once.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let settings = crate::config::load_str(
            "test",
            Some(&format!(
                "[consul]\naddress = \"{addr}\"\n[service]\nname = \"web\"\nid = \"web-1\"\nport = 9\ncheck_ttl = \"1s\"\n"
            )),
            Vec::new(),
        )
        .unwrap();
        let client = Client::new(halo_consul::Config {
            address: Some(addr.to_string()),
            token: None,
            datacenter: None,
            timeout: Some(Duration::from_secs(2)),
            max_response_bytes: None,
            ..halo_consul::Config::default()
        })
        .unwrap();
        let (_draining_tx, draining) = watch::channel(false);
        let (status_tx, mut status) = watch::channel(SyncStatus::default());
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(
            client,
            settings,
            Vec::new(),
            draining,
            stop.clone(),
            status_tx,
            Arc::new(Notify::new()),
        ));

        let mut seen: Vec<(Instant, SyncStatus)> = Vec::new();
        while seen.len() < 9 {
            status.changed().await.unwrap();
            seen.push((Instant::now(), status.borrow_and_update().clone()));
        }
        stop.cancel();
        task.await.unwrap();

        for pair in seen.windows(2) {
            let ((t0, s0), (t1, s1)) = (&pair[0], &pair[1]);
            assert_eq!(s1.attempts, s0.attempts + 1, "{s0:?} -> {s1:?}");
            let logged = Duration::from_millis(s0.retry_in_ms.expect("backing off"));
            let gap = *t1 - *t0;
            // The next pass's own duration counts in the gap; it is a
            // refused connection, but allow a whole call deadline.
            assert!(
                gap >= logged && gap <= logged + Duration::from_secs(2),
                "after {s0:?}, the next pass came {gap:?} later, not {logged:?}"
            );
        }
        let last = &seen.last().unwrap().1;
        assert_eq!(last.retry_in_ms, Some(5000), "{last:?}");
        assert_eq!(last.failures_in_a_row, 9);
        assert!(!last.registered);
        assert!(
            last.last_error.as_deref().unwrap().contains("agent/service/register"),
            "{last:?}"
        );
    }
}
