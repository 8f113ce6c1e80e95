//! The lease an active serves under, and how a term under it ends.
//!
//! A consistent read of the lock key ([`confirm`]) sent at `t` that shows
//! our session earns a lease until `t + lease`. While an instance serves,
//! [`confirm_lease`] sends such reads every `confirm_every` (several in
//! flight when answers are slow) and publishes each later deadline; the
//! serving loop ([`super::term`]) stops when the deadline passes, or at
//! once when a read shows the lock gone. A lease that runs out without
//! evidence of loss suspends the active ([`suspend`]): it keeps its session
//! and reads on until the servers confirm the lock again, or show it lost.
//! [`release_lock`] hands the lock over on purpose.
//!
//! Why the lease ends before anyone else can acquire ("Server-confirmed
//! lease", "Suspended", "Handover") is argued in [the module docs](super).

use halo_consul::{Client, Consistency, Error as ConsulError, QueryOptions};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::key::KeyState;
use super::{Leadership, Role, StepDown};
use crate::settings::HaSettings;

/// Confirming reads of the lock in flight at once, at most.
const CONFIRMS_IN_FLIGHT: usize = 4;

/// A consistent read of the key: the epoch if `session` holds it.
pub(super) async fn confirm(client: &Client, key: &str, session: &str) -> Result<Option<u64>, ConsulError> {
    let answer = client
        .kv_get(key, QueryOptions::with_consistency(Consistency::Consistent))
        .await?;
    Ok(answer
        .value
        .filter(|pair| pair.session.as_deref() == Some(session))
        .map(|pair| pair.lock_index))
}

/// Reads the key with `?consistent` every `confirm_every` (several in
/// flight when answers are slow) and publishes the lease each confirming
/// answer earns: its send time plus the lease length. Says `lost` when an
/// answer shows the key is not ours.
pub(super) async fn confirm_lease(
    client: Client,
    key: String,
    session: String,
    settings: HaSettings,
    lease: watch::Sender<Instant>,
    lost: oneshot::Sender<()>,
) {
    let mut tick = tokio::time::interval(settings.confirm_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut inflight = JoinSet::new();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if inflight.len() < CONFIRMS_IN_FLIGHT {
                    let (c, k, s) = (client.clone(), key.clone(), session.clone());
                    let limit = settings.lease;
                    inflight.spawn(async move {
                        let sent = Instant::now();
                        (sent, tokio::time::timeout(limit, confirm(&c, &k, &s)).await)
                    });
                }
            }
            Some(done) = inflight.join_next() => match done {
                Ok((sent, Ok(Ok(Some(_))))) => {
                    if failing {
                        tracing::info!("lock confirmations succeed again");
                        failing = false;
                    }
                    let until = sent + settings.lease;
                    lease.send_if_modified(|current| {
                        let later = until > *current;
                        if later {
                            *current = until;
                        }
                        later
                    });
                }
                Ok((_, Ok(Ok(None)))) => {
                    tracing::warn!("a confirming read shows the lock is no longer ours");
                    if lost.send(()).is_err() {
                        tracing::debug!("the term already ended");
                    }
                    return;
                }
                Ok((_, Ok(Err(e)))) => {
                    metrics::counter!("halo_ha_confirm_failures_total").increment(1);
                    if !failing {
                        tracing::warn!(error = %e, "cannot confirm the lock with the servers; the lease runs out unless a read succeeds");
                        failing = true;
                    }
                }
                Ok((_, Err(_elapsed))) => {
                    metrics::counter!("halo_ha_confirm_failures_total").increment(1);
                    if !failing {
                        tracing::warn!(after = ?settings.lease, "a confirming read got no answer in time");
                        failing = true;
                    }
                }
                Err(e) => tracing::error!(error = %e, "a confirming read failed to run"),
            },
        }
    }
}

/// Why a term ends whose lease lapsed, or whose confirming task ended:
/// a lost lock if that task saw the lock taken, else an expired lease.
///
/// The two arrive in the same instant when a confirming read shows the lock
/// gone (the task reports it on `lost`, ends, and the lease stops moving),
/// and the serving loop's biased `select!` may see either first. Read as an
/// expired lease, a forced-out instance was never damped and forced
/// straight back (the soak's dropped probes found it). Both stop serving at
/// once; only the damping afterwards differs.
pub(super) fn lapsed(lost: &mut oneshot::Receiver<()>) -> StepDown {
    if lost.try_recv().is_ok() {
        StepDown::LockLost
    } else {
        StepDown::LeaseExpired
    }
}

/// How a suspension ended.
pub(super) enum Resume {
    /// The servers confirm the lock is still ours.
    Confirmed {
        epoch: u64,
        lease_until: Instant,
    },
    /// It is not.
    Lost,
    Stopped,
}

/// The suspended active: serves nothing, keeps its session, and reads the
/// key until the servers confirm it is still ours (resume) or show it is
/// not (lost).
pub(super) async fn suspend(
    leadership: &Leadership,
    client: &Client,
    session: &str,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    stop: &CancellationToken,
) -> Resume {
    let settings = &leadership.settings;
    let lock_key = settings.lock_key();
    leadership.set_role(Role::Suspended);
    let mut tick = tokio::time::interval(settings.confirm_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Resume::Stopped,
            changed = key.changed() => {
                let theirs = key.borrow_and_update().as_ref().is_some_and(|k| {
                    k.as_ref().is_none_or(|k| k.session.as_deref() != Some(session))
                });
                if changed.is_err() || theirs {
                    return Resume::Lost;
                }
            }
            _ = tick.tick() => {
                let sent = Instant::now();
                match tokio::time::timeout(settings.lease, confirm(client, &lock_key, session)).await {
                    Ok(Ok(Some(epoch))) => {
                        return Resume::Confirmed { epoch, lease_until: sent + settings.lease };
                    }
                    Ok(Ok(None)) => return Resume::Lost,
                    Ok(Err(e)) => tracing::debug!(error = %e, "still cannot confirm the lock"),
                    Err(_) => tracing::debug!("a confirming read got no answer in time"),
                }
            }
        }
    }
}

/// Releases the lock key, which starts no lock delay: the standby can
/// acquire at once. Called only once this instance serves nothing (see
/// "Handover" in the [module docs](super)).
pub(super) async fn release_lock(leadership: &Leadership, client: &Client, session: &str) {
    match client
        .kv_release(&leadership.settings.lock_key(), leadership.value(), session)
        .await
    {
        Ok(released) => tracing::info!(released, "lock released for the standby"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot release the lock; the standby waits for the session to end")
        }
    }
}
