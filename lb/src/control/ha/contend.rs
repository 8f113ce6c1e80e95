//! The standby's side of the election: contending for the lock key under
//! one session.
//!
//! While the key is free (and our check passes), [`contend`] acquires it
//! and returns only once a consistent read sent after the acquire confirms
//! that our session holds it ([`super::lease::confirm`]); that read starts
//! the lease the first term serves under. While another instance holds the
//! key, it probes the holder through the failure detector
//! ([`super::probing`]) and, on the detector's evidence, forces a takeover:
//! it destroys the holder's session, which frees the key only after the
//! lock delay. Now and then it also looks for an older live instance with
//! our `ha.id` ([`super::registration::older_twin`]), and leaves the
//! election if there is one.
//!
//! Why neither a promotion nor a false alarm of the detector can make two
//! actives ("Promotion", "Failure detection") is argued in [the module
//! docs](super).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use halo_consul::{Client, Consistency, Error as ConsulError, QueryOptions};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::detector::Evidence;
use super::key::KeyState;
use super::lease::confirm;
use super::probing::{after_force, force_takeover, Watching};
use super::registration::older_twin;
use super::{Leadership, CONSUL_RETRY, TWIN_RECHECK};

/// How often a standby retries an acquire refused while the key is free (a
/// lock delay is running).
const ACQUIRE_RETRY: Duration = Duration::from_millis(10);
/// How long a standby leaves a peer alone whose probe address led back to
/// itself (a misconfigured `probe_listen`).
const SELF_ANSWERED_RETRY: Duration = Duration::from_secs(60);

/// How contending ended.
pub(super) enum Contend {
    /// We hold the key: its epoch, and the lease the confirming read earned.
    Acquired {
        epoch: u64,
        lease_until: Instant,
    },
    SessionLost,
    /// An older live instance uses our id: leave the election.
    Twin,
    Stopped,
}

/// The standby: waits for the key to be free and acquires it; meanwhile
/// probes the holder and takes the lock from it when it is gone.
pub(super) async fn contend(
    leadership: &Arc<Leadership>,
    client: &Client,
    session: &str,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    check: &mut watch::Receiver<Option<Instant>>,
    stop: &CancellationToken,
) -> Contend {
    let settings = &leadership.settings;
    let lock_key = settings.lock_key();
    let mut twin_check = tokio::time::interval(TWIN_RECHECK);
    twin_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    twin_check.reset();
    let mut watching: Option<Watching> = None;
    // After a damped verdict: no new watch until the window ends.
    let mut damped_until: Option<Instant> = None;
    // The holder session a second "suspended" verdict (soon after) forces
    // out, and since when.
    let mut armed: Option<(String, Instant)> = None;
    // A session we destroyed: the key watch shows it a moment longer; do not
    // probe (and "force") it again.
    let mut forced: Option<String> = None;
    loop {
        let seen = key.borrow_and_update().clone();
        // Unknown until the watch answers once; absent or without a session
        // means free.
        let free = match &seen {
            None => false,
            Some(None) => true,
            Some(Some(k)) => k.session.is_none() || k.session.as_deref() == Some(session),
        };
        let check_passing = check.borrow_and_update().is_some_and(|until| until > Instant::now());
        let mut retry_after = None;
        if free && check_passing {
            let sent = Instant::now();
            match client.kv_acquire(&lock_key, leadership.value(), session).await {
                Ok(true) => match confirm(client, &lock_key, session).await {
                    // The confirming read was sent after `sent`: the lease
                    // counts from then, conservatively.
                    Ok(Some(epoch)) => {
                        return Contend::Acquired {
                            epoch,
                            lease_until: sent + settings.lease,
                        }
                    }
                    Ok(None) => retry_after = Some(ACQUIRE_RETRY),
                    Err(e) => {
                        tracing::warn!(error = %e, "acquired the lock but cannot confirm it; retrying");
                        retry_after = Some(CONSUL_RETRY);
                    }
                },
                // Free but refused: a lock delay is running (or someone
                // else won). Retry soon; the delay is short.
                Ok(false) => retry_after = Some(ACQUIRE_RETRY),
                Err(ConsulError::InvalidSession { .. }) => {
                    tracing::warn!(session, "session no longer valid; creating a new one");
                    return Contend::SessionLost;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "acquire failed; retrying");
                    leadership.set_consul_error(Some(e.to_string()));
                    retry_after = Some(CONSUL_RETRY);
                }
            }
        }
        // Probe whoever else holds the key.
        let holder = match &seen {
            Some(Some(k)) => k
                .session
                .as_ref()
                .filter(|s| s.as_str() != session)
                .and_then(|s| Some((s.clone(), k.holder.clone()?))),
            _ => None,
        };
        let wanted = holder
            .filter(|(_, h)| h.instance != leadership.instance)
            .and_then(|(s, h)| Some((s, h.probe.as_deref()?.parse::<SocketAddr>().ok()?, h)));
        // A holder whose probe address cannot be reached from here is left
        // to Consul's detection.
        let unwatchable = wanted
            .as_ref()
            .and_then(|(_, probe, h)| leadership.unwatchable(h, *probe));
        let reported = leadership.state().detector.unwatchable.clone();
        if unwatchable != reported {
            if let Some(why) = &unwatchable {
                tracing::error!(why = %why, "cannot probe the active; relying on Consul's detection");
            }
            leadership.state().detector.unwatchable.clone_from(&unwatchable);
        }
        let wanted = wanted
            .filter(|_| unwatchable.is_none())
            .map(|(s, probe, h)| (s, probe, h.instance));
        let now = Instant::now();
        match (&wanted, &watching) {
            (Some((s, _, _)), Some(w)) if *s == w.session => {}
            (Some((s, _, _)), None) if forced.as_deref() == Some(s.as_str()) => {}
            (Some((s, peer, instance)), _) if damped_until.is_none_or(|u| now >= u) => {
                damped_until = None;
                if armed.as_ref().is_some_and(|(a, _)| a != s) {
                    armed = None;
                }
                leadership.state().detector.peer = Some(peer.to_string());
                watching = Some(Watching::start(leadership, s.clone(), *peer, instance.clone()));
            }
            (None, Some(_)) => {
                watching = None;
                leadership.state().detector.peer = None;
            }
            _ => {}
        }
        let retry = async {
            match retry_after {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let verdict = async {
            match watching.as_mut() {
                Some(w) => (&mut w.task.0).await,
                None => std::future::pending().await,
            }
        };
        let undamp = async {
            match damped_until {
                Some(u) => tokio::time::sleep_until(u).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return Contend::Stopped,
            changed = key.changed() => if changed.is_err() { return Contend::Stopped },
            changed = check.changed() => if changed.is_err() { return Contend::Stopped },
            () = retry => {}
            () = undamp => {}
            verdict = verdict => {
                let target = watching.take().map(|w| w.session);
                match verdict {
                    Ok(Ok(evidence @ Evidence::SelfAnswered)) => {
                        // A misconfiguration, not a failure: never force on
                        // it; say so, and look again in a while.
                        tracing::error!(%evidence, "cannot probe the active; relying on Consul's detection");
                        damped_until = Some(Instant::now() + SELF_ANSWERED_RETRY);
                    }
                    Ok(Ok(evidence @ Evidence::NotServing(_))) => {
                        // The active is alive but cannot confirm its lease.
                        // If we cannot reach the servers either, Consul
                        // itself is out (an election): the active resumes on
                        // its own when it is back, and forcing would only
                        // race it. So force only on a second such verdict
                        // with a read the servers answered us in between.
                        if let Some(target) = target {
                            let fresh = settings.probe_interval * (settings.probe_misses * 2) + settings.lease;
                            if armed.as_ref().is_some_and(|(s, at)| *s == target && at.elapsed() <= fresh) {
                                armed = None;
                                damped_until = after_force(
                                    force_takeover(leadership, client, &target, &evidence).await,
                                    &target,
                                    &mut forced,
                                );
                            } else {
                                let reachable = tokio::time::timeout(
                                    settings.lease,
                                    client.kv_get(&lock_key, QueryOptions::with_consistency(Consistency::Consistent)),
                                )
                                .await
                                .is_ok_and(|r| r.is_ok());
                                if reachable {
                                    tracing::info!(%evidence, "the servers answer us; forcing a takeover if the active stays suspended");
                                    armed = Some((target, Instant::now()));
                                }
                            }
                        }
                    }
                    Ok(Ok(evidence)) => {
                        if let Some(target) = target {
                            damped_until = after_force(
                                force_takeover(leadership, client, &target, &evidence).await,
                                &target,
                                &mut forced,
                            );
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "cannot probe the active; relying on Consul's detection");
                        damped_until = Some(Instant::now() + TWIN_RECHECK);
                    }
                    Err(e) if e.is_cancelled() => {}
                    Err(e) => tracing::error!(error = %e, "the probe task failed"),
                }
            }
            _ = twin_check.tick() => match older_twin(leadership, client).await {
                Ok(Some(twin)) => {
                    tracing::error!(id = %settings.id, twin = %twin, "an older live instance uses our ha.id; leaving the election");
                    return Contend::Twin;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "cannot look for instances sharing our id"),
            },
        }
    }
}
