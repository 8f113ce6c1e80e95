//! An active's term: from a confirmed lock to the step-down.
//!
//! [`lead`] promotes: with a floating address, only once no other live
//! host claims it ([`super::vip::wait_until_free`]); it binds every VIP and
//! serves through [`serve`] until a reason to step down, then stops
//! serving before it returns. [`serve`] follows the lease, which
//! [`confirm_lease`] keeps beside it, watches the key for evidence of loss,
//! and holds the floating address: it claims the address, announces it
//! again, puts it back when something removes it, and gives way to another
//! live claimer (the rules are in "The floating address", in the module
//! docs).
//!
//! What this code relies on and keeps (the lease checked once more right
//! before binding; serving stopped, data plane first, before any call that
//! could let another instance in) is argued in [the module docs](super).

use std::sync::Arc;
use std::time::SystemTime;

use halo_consul::Client;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::key::KeyState;
use super::lease::{confirm_lease, lapsed};
use super::vip::{self, claim, release_address};
use super::{Leadership, Role, StepDown, Term, CONFLICT_CHECK};
use crate::control::floating::FloatingIp;
use crate::control::instance::{unix_us, AbortOnDrop};
use crate::control::server::Server;

/// Terms kept for `/status`.
const HISTORY: usize = 64;

/// What an active serves with, for one term.
pub(super) struct Serving<'a> {
    pub(super) server: &'a Server,
    pub(super) floating: Option<&'a Arc<FloatingIp>>,
    pub(super) session: &'a str,
    pub(super) epoch: u64,
    pub(super) lease_until: Instant,
}

/// The active: serves until a reason to step down, then stops serving
/// before returning.
pub(super) async fn lead(
    leadership: &Leadership,
    client: &Client,
    term: Serving<'_>,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    stop: &CancellationToken,
) -> StepDown {
    let Serving {
        server,
        floating,
        session,
        epoch,
        lease_until,
    } = term;
    let settings = &leadership.settings;
    // Invariant: we hold the lock, confirmed by a consistent read sent
    // before `lease_until - lease`; checked once more right before binding.
    if lease_until <= Instant::now() {
        tracing::warn!("the lease ran out while acquiring; not promoting");
        return StepDown::LeaseExpired;
    }
    let (lease_tx, mut lease) = watch::channel(lease_until);
    let (lost_tx, mut lost) = oneshot::channel();
    let _confirming = AbortOnDrop(tokio::spawn(confirm_lease(
        client.clone(),
        settings.lock_key(),
        session.to_owned(),
        settings.clone(),
        lease_tx,
        lost_tx,
    )));
    leadership.set_lease(Some(lease_until));
    metrics::counter!("halo_ha_vip_restored_total").increment(0);
    // With a floating address: not while another live host claims it (see
    // "The floating address" in the module docs of `ha`). This only delays
    // serving; it serves nothing.
    if let Some(f) = floating {
        if let Err(reason) = vip::wait_until_free(leadership, f, &mut lease, &mut lost, key, session, stop).await {
            vip::record(leadership, &[], &[], false);
            leadership.set_lease(None);
            tracing::info!(
                reason = reason.as_str(),
                "the term ended before it began: the floating address was never claimed"
            );
            return reason;
        }
    }
    // Invariant, again after any wait: the lease the latest confirming
    // read earned has not run out.
    let lease_until = *lease.borrow_and_update();
    if lease_until <= Instant::now() {
        tracing::warn!("the lease ran out while probing for the floating address; not promoting");
        leadership.set_lease(None);
        return StepDown::LeaseExpired;
    }
    crate::dataplane::lease::serve_until(lease_until.into_std());
    leadership.set_lease(Some(lease_until));
    let from = SystemTime::now();
    let failed = server.start_serving();
    // A term is recorded if anything was bound, however briefly: a
    // promotion that bound nothing served nothing.
    let bound_any = server.listening_count() > 0;
    if bound_any {
        let mut state = leadership.state();
        state.epoch = Some(epoch);
        state.terms.push_back(Term {
            epoch,
            from_unix_us: unix_us(from),
            to_unix_us: None,
            ended_by: None,
        });
        while state.terms.len() > HISTORY {
            state.terms.pop_front();
        }
    }
    let reason = if failed.is_empty() {
        leadership.set_role(Role::Active);
        metrics::gauge!("halo_ha_epoch").set(epoch as f64);
        metrics::counter!("halo_ha_promotions_total").increment(1);
        tracing::info!(epoch, id = %settings.id, "promoted: active, serving the vips");
        serve(leadership, floating, epoch, &mut lease, &mut lost, key, session, stop).await
    } else {
        for e in &failed {
            tracing::error!(error = %e, "cannot serve a vip: undoing the promotion");
        }
        StepDown::BindFailed
    };
    // Stop before anyone else can start: the data plane first (one atomic
    // store), then the listeners (synchronous), before any call that could
    // let another instance in (release, destroy).
    crate::dataplane::lease::revoke();
    server.stop_serving();
    let stopped = SystemTime::now();
    {
        let mut state = leadership.state();
        // Serving ended when the listeners shut, or when the lease ran out
        // if that was earlier: past it the data plane accepted nothing (a
        // process frozen past its lease stops here only when it wakes).
        let now = Instant::now();
        let to = match state.lease_until {
            Some(end) if end < now => stopped - (now - end),
            _ => stopped,
        };
        if bound_any {
            if let Some(term) = state.terms.back_mut() {
                term.to_unix_us = Some(unix_us(to));
                term.ended_by = Some(reason);
            }
        }
        state.lease_until = None;
    }
    // A holder that gave the address way keeps saying so while it backs
    // off and contends again; any other end clears it.
    if leadership.state().vip_conflict.as_ref().is_none_or(|c| !c.yielded) {
        vip::record(leadership, &[], &[], false);
    }
    if let Some(f) = floating {
        // After the listeners: the address going is not what stops us
        // serving, and the new active's announcement wins either way.
        if let Err(e) = release_address(f).await {
            tracing::error!(error = %e, "cannot remove the floating address");
        }
    }
    tracing::info!(
        epoch,
        from_unix_us = unix_us(from),
        to_unix_us = unix_us(stopped),
        reason = reason.as_str(),
        "term ended"
    );
    leadership.set_role(if reason == StepDown::LeaseExpired {
        Role::Suspended
    } else {
        Role::Standby
    });
    metrics::counter!("halo_ha_step_downs_total", "reason" => reason.as_str()).increment(1);
    if reason == StepDown::Shutdown {
        tracing::info!(epoch, "stepped down for shutdown: vips no longer served");
    } else {
        tracing::warn!(epoch, reason = reason.as_str(), "stepped down: vips no longer served");
    }
    reason
}

/// The active's loop, once every VIP is bound: follows the lease and
/// watches for evidence of loss. Nothing here waits on Consul (confirming
/// runs beside it), so the deadline fires on time.
#[allow(clippy::too_many_arguments)]
async fn serve(
    leadership: &Leadership,
    floating: Option<&Arc<FloatingIp>>,
    epoch: u64,
    lease: &mut watch::Receiver<Instant>,
    lost: &mut oneshot::Receiver<()>,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    session: &str,
    stop: &CancellationToken,
) -> StepDown {
    let settings = &leadership.settings;
    // Removals are watched from before the claim (which can only run once
    // this loop waits), so none after it is missed. The neighbour listener
    // takes milliseconds to open: off this thread, beside the claim.
    let mut removals = floating.and_then(|f| vip::removals(f));
    let mut listener: Option<tokio::io::unix::AsyncFd<crate::control::floating::Listener>> = None;
    let mut opening = floating.map(|f| {
        let f = Arc::clone(f);
        AbortOnDrop(tokio::task::spawn_blocking(move || vip::listener(&f)))
    });
    let mut conflict = vip::Conflict::new(floating.and_then(|f| f.mac()).unwrap_or_default());
    // The address last: listeners are ready before any packet for it can
    // arrive. Claimed off this thread; retried every heartbeat until done.
    let mut claiming = floating.map(|f| {
        let f = Arc::clone(f);
        AbortOnDrop(tokio::spawn(async move { claim(&f).await }))
    });
    let mut claim_retry = tokio::time::interval(settings.heartbeat);
    claim_retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut claimed = floating.is_none();
    // The address was removed while a claim was under way: that claim's
    // success does not mean the address is there.
    let mut stale_claim = false;
    // Announce once more a little later, as keepalived does, for neighbours
    // that missed the first burst.
    let reannounce = tokio::time::sleep(crate::control::floating::REANNOUNCE_AFTER);
    tokio::pin!(reannounce);
    let mut reannounced = floating.is_none();
    // Once claimed, probe every second for other hosts that have the
    // address (one killed with -9 keeps it; another cluster's active may
    // claim it), and announce again while one does.
    let mut conflict_check = tokio::time::interval(CONFLICT_CHECK);
    conflict_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let announce = |why: &'static str| {
        if let Some(f) = floating {
            let f = Arc::clone(f);
            tokio::task::spawn_blocking(move || {
                if let Err(e) = f.announce() {
                    tracing::warn!(error = %e, why, "cannot announce the floating address");
                }
            });
        }
    };
    loop {
        let deadline = *lease.borrow_and_update();
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => {
                // The lease may have moved just now: look again before acting.
                if *lease.borrow() <= Instant::now() {
                    tracing::warn!(epoch, "no read of the lock confirmed in time: the lease ran out");
                    return lapsed(lost);
                }
            }
            () = stop.cancelled() => return StepDown::Shutdown,
            changed = lease.changed() => {
                if changed.is_err() {
                    // The confirming task ended (it says why on `lost`).
                    return lapsed(lost);
                }
                let until = *lease.borrow();
                crate::dataplane::lease::serve_until(until.into_std());
                leadership.set_lease(Some(until));
            }
            _ = &mut *lost => return StepDown::LockLost,
            changed = key.changed() => {
                let ours = key
                    .borrow_and_update()
                    .as_ref()
                    .is_some_and(|k| k.as_ref().is_some_and(|k| k.session.as_deref() == Some(session)));
                if changed.is_err() || !ours {
                    return StepDown::LockLost;
                }
            }
            done = async { (&mut claiming.as_mut().expect("guarded").0).await }, if claiming.is_some() => {
                claiming = None;
                claimed = matches!(done, Ok(true)) && !stale_claim;
                stale_claim = false;
            }
            _ = claim_retry.tick(), if !claimed && claiming.is_none() => {
                let f = Arc::clone(floating.expect("unclaimed implies a floating address"));
                claiming = Some(AbortOnDrop(tokio::spawn(async move { claim(&f).await })));
            }
            opened = async { (&mut opening.as_mut().expect("guarded").0).await }, if opening.is_some() => {
                opening = None;
                match opened {
                    Ok(l) => listener = l.and_then(vip::watch),
                    Err(e) => tracing::error!(error = %e, "the task opening the neighbour listener failed"),
                }
            }
            ready = async { removals.as_mut().expect("guarded").readable_mut().await }, if removals.is_some() => {
                let removed = match ready {
                    Ok(mut guard) => match guard.try_io(|r| r.get_mut().removed()) {
                        Ok(result) => result,
                        Err(_would_block) => Ok(false),
                    },
                    Err(e) => Err(e),
                };
                match removed {
                    Ok(false) => {}
                    Ok(true) => {
                        // Under a valid lease (checked first, above): the
                        // address is ours to hold. Something on this host
                        // removed it (a stray `ip addr del`, a network
                        // manager); without it nobody is served.
                        metrics::counter!("halo_ha_vip_restored_total").increment(1);
                        let f = floating.expect("removals imply a floating address");
                        tracing::error!(
                            address = %f.address(),
                            interface = f.interface(),
                            "the floating address was removed from under the active: adding it back and announcing it \
                             (to take it away, stop this instance instead)"
                        );
                        claimed = false;
                        if claiming.is_some() {
                            stale_claim = true;
                        } else {
                            let f = Arc::clone(f);
                            claiming = Some(AbortOnDrop(tokio::spawn(async move { claim(&f).await })));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read address notifications; no longer watching the floating address for removals");
                        removals = None;
                    }
                }
            }
            ready = async { listener.as_ref().expect("guarded").readable().await }, if listener.is_some() => {
                match ready {
                    Ok(mut guard) => {
                        let mut defend = false;
                        for _ in 0..crate::control::floating::READ_BURST {
                            match guard.try_io(|l| l.get_ref().recv()) {
                                Ok(Ok(Some(heard))) => defend |= conflict.heard(heard, Instant::now()),
                                Ok(Ok(None)) => {}
                                Ok(Err(e)) => {
                                    tracing::debug!(error = %e, "cannot read neighbour frames");
                                    break;
                                }
                                Err(_would_block) => break,
                            }
                        }
                        // Another host probes for our address, about to
                        // claim it: tell it (and everyone) it is taken.
                        if defend && claimed {
                            announce("defending the address against a probe");
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for other holders of the floating address any more");
                        listener = None;
                    }
                }
            }
            _ = conflict_check.tick(), if claimed && listener.is_some() => {
                let round = conflict.round();
                if let Some(keeper) = round.yield_to {
                    // Two live claimers (two clusters configured with one
                    // address: each holds its own lock). Both apply this
                    // rule and the lowest MAC keeps the address; a leftover
                    // never announces, so a failover never gets here.
                    tracing::error!(
                        epoch,
                        keeper = %vip::mac_string(&keeper),
                        "another live host claims the floating address and wins the tie-break (lower MAC): \
                         giving it up and serving nothing (two clusters configured with one vip_address?)"
                    );
                    vip::record(leadership, &round.others, &round.live, true);
                    return StepDown::VipYielded;
                }
                let had = leadership.state().vip_conflict.is_some();
                if vip::record(leadership, &round.others, &round.live, false) {
                    if round.others.is_empty() {
                        tracing::info!("no other host answers for the floating address any more");
                    } else {
                        let macs: Vec<String> = round.others.iter().map(vip::mac_string).collect();
                        let live: Vec<String> = round.live.iter().map(vip::mac_string).collect();
                        tracing::warn!(macs = ?macs, live = ?live, new = !had, "another host has the floating address; announcing again while it does");
                    }
                }
                let f = Arc::clone(floating.expect("claimed implies a floating address"));
                let others = !round.others.is_empty();
                tokio::task::spawn_blocking(move || {
                    if others {
                        if let Err(e) = f.announce() {
                            tracing::warn!(error = %e, "cannot announce the floating address");
                        }
                    }
                    if let Err(e) = f.send_probe() {
                        tracing::debug!(error = %e, "cannot probe for other holders of the floating address");
                    }
                });
            }
            () = &mut reannounce, if !reannounced => {
                reannounced = true;
                announce("re-announcing after the claim");
            }
        }
    }
}
