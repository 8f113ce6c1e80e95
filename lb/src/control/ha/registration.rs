//! What Consul knows of this instance: its registration and TTL check, the
//! session bound to them, and which of two live instances with one `ha.id`
//! takes part in the election.
//!
//! Every process registers a service instance and check of its own
//! (`halo-lb-<cluster>-<id>-<instance>`; the mechanics, shared with the
//! ECMP mode, are in [`crate::control::instance`]) and heartbeats the check
//! ([`heartbeat`]). Once the check passes, [`open_session`] creates a
//! session bound to it and to the node's `serfHealth`, with the lock delay:
//! Consul invalidates the session, and with it our hold on the lock, when
//! either fails. [`retire_session`] destroys a session this instance
//! stepped down from. Of two live processes with one `ha.id`, the younger
//! stays out of the election ([`older_twin`]).
//!
//! Heartbeats keep the check passing and prove nothing about what the
//! servers decided, so they never extend an active's lease: the safety
//! argument is in [the module docs](super).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use halo_consul::{
    Client, Error as ConsulError, HealthQuery, QueryOptions, ServiceRegistration, SessionBehavior, SessionChecks,
    SessionRequest,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::detector::{self, Evidence, PeerWatch};
use super::{Leadership, Role, CONSUL_RETRY, TWIN_RECHECK};
use crate::control::instance;

/// Registers the instance and heartbeats its check ([`instance::heartbeat`]),
/// reporting Consul errors into `/status`. (This keeps the session valid;
/// it does not extend the active's lease: only the servers can.)
pub(super) async fn heartbeat(
    leadership: Arc<Leadership>,
    client: Client,
    check: watch::Sender<Option<Instant>>,
    stop: CancellationToken,
) {
    let (settings, ids) = (leadership.settings.clone(), leadership.ids());
    instance::heartbeat(
        client,
        settings,
        ids,
        || registration(&leadership),
        |error| leadership.set_consul_error(error),
        check,
        stop,
    )
    .await;
}

/// This instance's registration; its probe address is known only once the
/// election has chosen it, so it is made anew for every registration.
fn registration(leadership: &Leadership) -> ServiceRegistration {
    let settings = &leadership.settings;
    let meta = [
        ("cluster".to_owned(), settings.cluster.clone()),
        ("id".to_owned(), settings.id.clone()),
        ("instance".to_owned(), leadership.instance.clone()),
        ("start_us".to_owned(), leadership.started_us.to_string()),
        (
            "probe".to_owned(),
            leadership.probe.get().map(|p| p.addr.to_string()).unwrap_or_default(),
        ),
    ]
    .into_iter()
    .collect();
    instance::registration(settings, &leadership.ids(), leadership.admin, &[], meta)
}

/// Creates a session bound to our check and the node's `serfHealth`, once
/// the check passes. Retries until it succeeds or `stop`.
pub(super) async fn open_session(
    leadership: &Leadership,
    client: &Client,
    check: &mut watch::Receiver<Option<Instant>>,
    stop: &CancellationToken,
) -> Option<String> {
    let settings = &leadership.settings;
    // While Consul refuses (its servers out of reach, our node failed in
    // gossip), retry with a growing pause and log the first refusal only.
    let mut retry = CONSUL_RETRY;
    let mut failing = false;
    loop {
        // A session can only be bound to a passing check.
        while check.borrow_and_update().is_none_or(|until| until <= Instant::now()) {
            tokio::select! {
                () = stop.cancelled() => return None,
                changed = check.changed() => if changed.is_err() { return None },
            }
        }
        if !wait_out_twin(leadership, client, stop).await {
            return None;
        }
        let request = SessionRequest {
            name: Some(format!("halo-lb {}/{}", settings.cluster, settings.id)),
            node: None,
            lock_delay: Some(settings.lock_delay),
            behavior: Some(SessionBehavior::Release),
            ttl: None,
            checks: SessionChecks::Bound {
                node_checks: vec!["serfHealth".to_owned()],
                service_checks: vec![leadership.check_id()],
            },
        };
        match client.session_create(&request).await {
            Ok(id) => {
                tracing::info!(session = %id, "session created");
                leadership.state().session = Some(id.clone());
                // The key view may be as old as the outage that ended our
                // last session: have it read afresh now, so a holder that
                // dies in the next instant is already being probed.
                leadership.key_refresh.notify_one();
                return Some(id);
            }
            Err(e) => {
                if failing {
                    tracing::debug!(error = %e, "still cannot create a session");
                } else {
                    tracing::warn!(error = %e, "cannot create a session; retrying");
                }
                failing = true;
                leadership.set_consul_error(Some(e.to_string()));
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(Duration::from_secs(2));
    }
}

/// Destroys a session we stepped down from, retrying until Consul confirms
/// (or says it is gone already) or the process stops.
pub(super) async fn retire_session(client: Client, session: String, stop: CancellationToken) {
    loop {
        match client.session_destroy(&session).await {
            Ok(()) | Err(ConsulError::NotFound { .. }) => return,
            Err(e) => tracing::debug!(session, error = %e, "cannot destroy the old session yet"),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(CONSUL_RETRY) => {}
        }
    }
}

/// Another live (passing) instance registered with our cluster and id that
/// started before us (ties broken by instance), described for logs.
///
/// Two live processes with one id would otherwise both believe the key's
/// holder is "us". Before instance IDs, a restarted process destroyed any
/// session holding the lock under its id, taking it for a dead
/// predecessor's; two live twins then destroyed each other's sessions in a
/// loop. Now every process registers its own check, a dead predecessor's
/// check simply expires (its session and lock go with it), and of two live
/// twins the younger stays out of the election, loudly.
pub(super) async fn older_twin(leadership: &Leadership, client: &Client) -> Result<Option<String>, ConsulError> {
    let settings = &leadership.settings;
    // cluster and id are validated names: letters, digits, '-', '_', '.'.
    let filter = format!(
        "Service.Meta.cluster == \"{}\" and Service.Meta.id == \"{}\"",
        settings.cluster, settings.id
    );
    let query = HealthQuery {
        passing: true,
        tag: None,
        filter: Some(&filter),
    };
    let answer = client.health_service("halo-lb", query, QueryOptions::default()).await?;
    let me = (leadership.started_us, leadership.instance.as_str());
    let own = leadership.service_id();
    for e in answer.value.iter().filter(|e| e.service.id != own) {
        let Some(start) = e.service.meta.get("start_us").and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let Some(instance) = e.service.meta.get("instance") else {
            continue;
        };
        if (start, instance.as_str()) >= me {
            continue;
        }
        // Its check may still pass for up to a TTL after it died (a restart
        // right after kill -9): ask the process itself, when it says where.
        if let Some(probe) = e.service.meta.get("probe").and_then(|p| p.parse::<SocketAddr>().ok()) {
            // We hold that very address (bound without SO_REUSEPORT): the
            // process that advertised it is gone.
            if leadership.probe.get().is_some_and(|p| p.addr == probe) {
                tracing::info!(instance = %instance, "an older instance with our id is registered, but we hold its probe address: it is gone");
                continue;
            }
            let settings = &leadership.settings;
            let silence = settings.probe_interval * (settings.probe_misses + 1);
            if let Some(keys) = leadership.keys.get() {
                let watch = PeerWatch {
                    instance,
                    me: &leadership.instance,
                    interval: settings.probe_interval,
                    misses: settings.probe_misses,
                    keys,
                };
                let verdict = tokio::time::timeout(silence, detector::watch_peer(probe, watch, || {})).await;
                // Anything but its own live answers: refused, silent, or
                // another process (perhaps this one) answering there.
                if matches!(
                    verdict,
                    Ok(Ok(Evidence::Refused
                        | Evidence::Silent(_)
                        | Evidence::Replaced(_)
                        | Evidence::SelfAnswered))
                ) {
                    tracing::info!(instance = %instance, "an older instance with our id is registered but gone");
                    continue;
                }
            }
        }
        return Ok(Some(format!(
            "service {} on node {} (admin {}:{})",
            e.service.id, e.node.node, e.service.address, e.service.port
        )));
    }
    Ok(None)
}

/// Waits while an older live instance uses our id, saying so in the log and
/// `/status`. Returns false if `stop` came first.
async fn wait_out_twin(leadership: &Leadership, client: &Client, stop: &CancellationToken) -> bool {
    let mut reported = false;
    loop {
        match older_twin(leadership, client).await {
            Ok(None) => {
                if reported {
                    tracing::info!("no other live instance uses our ha.id any more; joining the election");
                }
                leadership.state().id_conflict = None;
                return true;
            }
            Ok(Some(twin)) => {
                if !reported {
                    tracing::error!(
                        id = %leadership.settings.id,
                        twin = %twin,
                        "ha.id is taken by an older live instance; staying out of the election until it is gone (give each instance its own ha.id)"
                    );
                    metrics::counter!("halo_ha_id_conflicts_total").increment(1);
                }
                reported = true;
                leadership.set_role(Role::Starting);
                leadership.state().id_conflict = Some(format!("ha.id {:?} is taken by {twin}", leadership.settings.id));
            }
            // Not knowing is no reason to stay out: the lock still decides
            // who serves, and a twin cannot destroy our session any more.
            Err(e) => {
                tracing::debug!(error = %e, "cannot look for instances sharing our id; joining the election");
                return true;
            }
        }
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(TWIN_RECHECK) => {}
        }
    }
}
