//! What Consul knows of an ECMP instance: its registration and TTL check
//! ([`heartbeat`]; the mechanics, shared with the pair's election, are in
//! [`crate::control::instance`]) and the session bound to that check and
//! to the node's `serfHealth` ([`open_session`]), which holds the member
//! key. Heartbeats keep the check passing; only the servers' confirmation
//! extends the lease (see [the module docs](super)).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use halo_consul::{Client, SessionBehavior, SessionChecks, SessionRequest};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Membership, CONSUL_RETRY, CONSUL_RETRY_MAX};
use crate::control::instance;

/// Creates a session bound to our check and the node's `serfHealth`, once
/// the check passes; its keys are deleted when it ends. Retries until it
/// succeeds or `stop`.
pub(super) async fn open_session(
    membership: &Membership,
    client: &Client,
    check: &mut watch::Receiver<Option<Instant>>,
    stop: &CancellationToken,
) -> Option<String> {
    let mut retry = CONSUL_RETRY;
    let mut failing = false;
    loop {
        while check.borrow_and_update().is_none_or(|until| until <= Instant::now()) {
            tokio::select! {
                () = stop.cancelled() => return None,
                changed = check.changed() => if changed.is_err() { return None },
            }
        }
        let request = SessionRequest {
            name: Some(format!(
                "halo-lb {}/{} (ecmp)",
                membership.settings.cluster, membership.settings.id
            )),
            node: None,
            // A member key is nobody else's to take: no lock delay, so a
            // restarted instance joins at once.
            lock_delay: Some(Duration::ZERO),
            behavior: Some(SessionBehavior::Delete),
            ttl: None,
            checks: SessionChecks::Bound {
                node_checks: vec!["serfHealth".to_owned()],
                service_checks: vec![membership.ids().check],
            },
        };
        match client.session_create(&request).await {
            Ok(id) => {
                tracing::info!(session = %id, "session created");
                return Some(id);
            }
            Err(e) => {
                if failing {
                    tracing::debug!(error = %e, "still cannot create a session");
                } else {
                    tracing::warn!(error = %e, "cannot create a session; retrying");
                }
                failing = true;
                membership.set_consul_error(Some(e.to_string()));
            }
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(CONSUL_RETRY_MAX);
    }
}

/// Registers the instance and heartbeats its check
/// ([`instance::heartbeat`]). (This keeps the session valid; only the
/// servers' confirmation extends the lease.)
pub(super) async fn heartbeat(
    membership: Arc<Membership>,
    client: Client,
    check: watch::Sender<Option<Instant>>,
    stop: CancellationToken,
) {
    let (settings, ids) = (membership.settings.clone(), membership.ids());
    let meta = BTreeMap::from([
        ("cluster".to_owned(), settings.cluster.clone()),
        ("id".to_owned(), settings.id.clone()),
        ("instance".to_owned(), membership.instance.clone()),
        ("mode".to_owned(), "ecmp".to_owned()),
    ]);
    let registration = instance::registration(&settings, &ids, membership.admin, &["ecmp"], meta);
    instance::heartbeat(
        client,
        settings,
        ids,
        || registration.clone(),
        |error| membership.set_consul_error(error),
        check,
        stop,
    )
    .await;
}
