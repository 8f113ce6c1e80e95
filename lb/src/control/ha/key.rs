//! The lock key, `halo/<cluster>/leader`: what its value says about the
//! holder ([`LeaderValue`]), and the watch that follows it.
//!
//! Every instance watches the key with consistent blocking reads
//! ([`watch_key`]) and publishes the latest view as a [`KeyState`]: a
//! standby learns from it when the key is free and whom to probe; an active
//! takes a view that shows another session, or none, as evidence of loss
//! and stops at once. The view can only make an active stop sooner: whether
//! it may serve is decided by its own confirming reads and lease
//! ([`super::lease`]), never by this watch. The safety argument is in [the
//! module docs](super).

use std::sync::Arc;
use std::time::Duration;

use halo_consul::{Client, Consistency, Watch};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{detector, Leadership};

/// How long the key watch blocks per call.
const KEY_WAIT: Duration = Duration::from_secs(10);

/// The lock key's value: who holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LeaderValue {
    /// The holder's `ha.id`.
    pub id: String,
    /// The holder's admin address, where a standby forwards writes.
    pub admin: String,
    /// When the holder's process started (RFC 3339).
    pub start: String,
    /// The holder's process: random, new with every start. Empty in values
    /// written by older versions.
    #[serde(default)]
    pub instance: String,
    /// Where the holder answers probes (UDP). `None` in values written by
    /// older versions: no detector then.
    #[serde(default)]
    pub probe: Option<String>,
    /// The holder's Consul node. A standby on another node never probes a
    /// loopback probe address (it would reach its own host).
    #[serde(default)]
    pub node: Option<String>,
    /// The probe protocol the holder answers: [`detector::PROTOCOL`].
    /// Absent in values written by versions before authenticated probes,
    /// whose holders a standby does not probe (see [`Leadership::unwatchable`]).
    #[serde(default)]
    pub probe_protocol: Option<u32>,
    /// The session this holder destroyed in its last forced takeover. The
    /// instance that held that session learns from it that it was forced
    /// out by a peer (and damps, see [`damping`](super::damping)), rather
    /// than losing its session to Consul (its own node failing in gossip,
    /// its check).
    #[serde(default)]
    pub forced: Option<String>,
}

/// The lock key as last seen by the consistent watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct KeyState {
    pub(super) session: Option<String>,
    pub(super) lock_index: u64,
    pub(super) holder: Option<LeaderValue>,
}

impl Leadership {
    /// This instance's value for the lock key, written with every acquire
    /// and release.
    pub(super) fn value(&self) -> String {
        serde_json::to_string(&LeaderValue {
            id: self.settings.id.clone(),
            admin: self.admin.to_string(),
            start: self.started.clone(),
            instance: self.instance.clone(),
            probe: self.probe.get().map(|p| p.addr.to_string()),
            node: self.node.get().cloned(),
            probe_protocol: Some(detector::PROTOCOL),
            forced: self.state().forced.clone(),
        })
        .expect("a struct of strings serialises")
    }
}

/// Watches the lock key with consistent blocking reads, publishing what it
/// holds whenever that changes (`Some(None)`: the key does not exist).
///
/// When a session is created ([`Leadership::key_refresh`]) the request in
/// flight and any back-off are abandoned for an immediate read. Only the
/// standby's view gets fresher by it: whether the active may serve is
/// decided by its own confirming reads and lease, never by this watch.
pub(super) async fn watch_key(
    leadership: Arc<Leadership>,
    client: Client,
    tx: watch::Sender<Option<Option<KeyState>>>,
    stop: CancellationToken,
) {
    let key = leadership.settings.lock_key();
    let mut w = Watch::new(KEY_WAIT)
        .consistency(Consistency::Consistent)
        // Handovers move the key a few times in a burst; never delay those.
        .rate_limit(50, 50.0)
        .backoff(Duration::from_millis(50), Duration::from_secs(1));
    let mut failing = false;
    loop {
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            () = leadership.key_refresh.notified() => {
                w.retry_now();
                continue;
            }
            answer = w.next(|options| client.kv_get(&key, options)) => answer,
        };
        match answer {
            Ok(answer) => {
                failing = false;
                let state = answer.value.map(|pair| KeyState {
                    holder: pair
                        .value
                        .as_deref()
                        .and_then(|v| serde_json::from_slice::<LeaderValue>(v).ok()),
                    session: pair.session,
                    lock_index: pair.lock_index,
                });
                leadership.state().key.clone_from(&state);
                leadership.observe_holder(state.as_ref());
                tx.send_if_modified(|current| {
                    let changed = current.as_ref() != Some(&state);
                    if changed {
                        *current = Some(state);
                    }
                    changed
                });
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "cannot watch the lock key; retrying");
                }
                failing = true;
            }
        }
    }
}
