//! What every halo-lb with `[ha]` does with its local Consul agent,
//! whether it is one of a pair ([`crate::control::ha`]) or of an ECMP
//! cluster ([`crate::control::ecmp`]): registers its own process as an
//! instance of service `halo-lb` with a TTL check, and heartbeats that
//! check. Each process registers its own instance and check (a random
//! instance ID, new with every start), so a dead predecessor's check
//! simply expires and takes its session with it.
//!
//! The heartbeat keeps the session bound to the check valid; it proves
//! nothing about what the Consul servers decided, so neither mode ever
//! extends a lease with it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use halo_consul::{CheckRegistration, CheckStatus, Client, Error as ConsulError, ServiceRegistration};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::settings::HaSettings;

/// Deregister the `halo-lb` instance of a process that died without
/// cleaning up (Consul's minimum).
const DEREGISTER_AFTER: Duration = Duration::from_secs(60);

/// A new process's instance ID: random, 16 hex digits.
pub(crate) fn new_instance() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Microseconds since the Unix epoch.
pub(crate) fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Aborts a task when dropped.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Destroys a session (one already gone is fine); a failure is logged, and
/// the session then ends with the check it is bound to.
pub(crate) async fn close_session(client: &Client, session: &str) {
    match client.session_destroy(session).await {
        Ok(()) | Err(ConsulError::NotFound { .. }) => {}
        Err(e) => tracing::warn!(session, error = %e, "cannot destroy the session; it ends with its check"),
    }
}

/// This process at the agent: `halo-lb-<cluster>-<id>-<instance[..8]>`,
/// and its TTL check.
#[derive(Debug, Clone)]
pub(crate) struct Ids {
    pub(crate) service: String,
    pub(crate) check: String,
}

impl Ids {
    pub(crate) fn new(settings: &HaSettings, instance: &str) -> Ids {
        let service = format!("halo-lb-{}-{}-{}", settings.cluster, settings.id, &instance[..8]);
        Ids {
            check: format!("{service}:ttl"),
            service,
        }
    }
}

/// The registration of this process: service `halo-lb` at the admin
/// address, tagged `cluster-<cluster>` (and `extra_tags`), with `meta` and
/// a TTL check of `ha.check_ttl` that starts passing.
pub(crate) fn registration(
    settings: &HaSettings,
    ids: &Ids,
    admin: std::net::SocketAddr,
    extra_tags: &[&str],
    meta: BTreeMap<String, String>,
) -> ServiceRegistration {
    let mut check = CheckRegistration::ttl(
        ids.check.clone(),
        "halo-lb heartbeat",
        settings.check_ttl,
        CheckStatus::Passing,
    );
    check.deregister_critical_service_after = Some(DEREGISTER_AFTER);
    let mut tags = vec![format!("cluster-{}", settings.cluster)];
    tags.extend(extra_tags.iter().map(|t| (*t).to_owned()));
    ServiceRegistration {
        id: ids.service.clone(),
        name: "halo-lb".to_owned(),
        tags,
        address: Some(admin.ip().to_string()),
        port: Some(admin.port()),
        meta: meta.into_iter().collect(),
        weights: None,
        checks: vec![check],
    }
}

/// Registers the instance (with what `registration` makes, asked again on
/// every registration: some of its meta may be learnt later), then passes
/// its check every `ha.heartbeat`, publishing until when the check is known
/// to pass. Re-registers when the agent no longer knows the check.
/// `report` hears the error of every failed heartbeat, and `None` once one
/// succeeds after failures.
pub(crate) async fn heartbeat(
    client: Client,
    settings: HaSettings,
    ids: Ids,
    registration: impl Fn() -> ServiceRegistration,
    report: impl Fn(Option<String>),
    check: watch::Sender<Option<Instant>>,
    stop: CancellationToken,
) {
    let mut registered = false;
    let mut failing = false;
    let mut tick = tokio::time::interval(settings.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let register = || async { client.register_service(&registration()).await };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sent = Instant::now();
        let result: Result<(), ConsulError> = if registered {
            match client.check_pass(&ids.check, "").await {
                Err(e) if e.is_not_found() => {
                    tracing::warn!("the agent lost our check; registering again");
                    registered = false;
                    register().await
                }
                other => other,
            }
        } else {
            register().await
        };
        match result {
            Ok(()) => {
                registered = true;
                check.send_replace(Some(sent + settings.check_ttl));
                if failing {
                    tracing::info!("heartbeats reach the agent again");
                    report(None);
                }
                failing = false;
            }
            Err(e) => {
                metrics::counter!("halo_ha_heartbeat_failures_total").increment(1);
                if !failing {
                    tracing::warn!(error = %e, "heartbeat failed; the check goes critical unless one succeeds");
                }
                report(Some(e.to_string()));
                failing = true;
            }
        }
    }
}
