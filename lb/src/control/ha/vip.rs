//! The floating address under the election: who else has it, and when an
//! active gives way. See "The floating address" in the [module
//! docs](super).
//!
//! An active hears three things about its address ([`Heard`]): probes (a
//! host about to claim it), answers (a host that has it: a live holder or
//! a dead one's leftover) and announcements (a live claimer). [`Conflict`]
//! keeps them in rounds of one probe ([`super::CONFLICT_CHECK`]) and
//! decides, with the same rule on both sides, which of two live claimers
//! keeps the address. [`wait_until_free`] is what a new lock holder does
//! before its term: it probes, and does not claim while a live claimer
//! announces the address. [`claim`] and [`release_address`] add and remove
//! the address off the election's thread (netlink and packet sockets
//! block).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::key::KeyState;
use super::lease::lapsed;
use super::{Leadership, Role, StepDown, CONFLICT_CHECK};
use crate::control::floating::{self, FloatingIp, Heard, Listener, Outcome, Probed, Removals};
use crate::control::instance::AbortOnDrop;
use crate::control::status::VipConflict;

/// How long a probe before a claim listens: a kernel that has the address
/// answers within a millisecond on a LAN, a live halo-lb holding it
/// announces within a few (it defends on hearing the probe). This is what
/// the probe adds to a promotion with a floating address, so it is short:
/// a defence that comes later than this is not lost, it only leaves the
/// two claimers to the tie-break of [`Conflict`] a round or two later.
pub(super) const PROBE_WAIT: Duration = Duration::from_millis(25);

/// An active defends its address (announces it) on hearing another host
/// probe for it, at most this often.
pub(super) const DEFEND_EVERY: Duration = Duration::from_millis(100);

/// Rounds in a row in which a host must announce the address before it
/// counts as a live claimer for the tie-break: one gratuitous ARP (a
/// kernel with `arp_notify` set announces once when its link comes up) is
/// no claim; a live halo-lb in conflict announces every round.
pub(super) const LIVE_ROUNDS: u32 = 2;

/// `aa:bb:cc:dd:ee:ff`.
pub(super) fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// What an active heard about its address, in rounds of one probe.
#[derive(Debug)]
pub(super) struct Conflict {
    ours: [u8; 6],
    /// This round: hosts that have the address; those that announced it.
    answering: Vec<[u8; 6]>,
    announcing: Vec<[u8; 6]>,
    /// Hosts that announced it in each of the last rounds, and in how many
    /// in a row.
    live: Vec<([u8; 6], u32)>,
    defended: Option<Instant>,
}

/// The end of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Round {
    /// Hosts that have the address (answered or announced).
    pub others: Vec<[u8; 6]>,
    /// Of those, live claimers: they announced it [`LIVE_ROUNDS`] rounds in
    /// a row.
    pub live: Vec<[u8; 6]>,
    /// The live claimer this instance gives way to: the lowest MAC keeps
    /// the address, so the one with a MAC below ours, if any.
    pub yield_to: Option<[u8; 6]>,
}

impl Conflict {
    pub(super) fn new(ours: [u8; 6]) -> Conflict {
        Conflict {
            ours,
            answering: Vec::new(),
            announcing: Vec::new(),
            live: Vec::new(),
            defended: None,
        }
    }

    /// Takes in one thing heard; true if the address should be defended
    /// (announced) now.
    pub(super) fn heard(&mut self, heard: Heard, now: Instant) -> bool {
        match heard {
            Heard::Probe => {
                let due = self.defended.is_none_or(|at| now.duration_since(at) >= DEFEND_EVERY);
                if due {
                    self.defended = Some(now);
                }
                due
            }
            Heard::Answer(mac) => {
                push_new(&mut self.answering, mac);
                false
            }
            Heard::Announce(mac) => {
                push_new(&mut self.answering, mac);
                push_new(&mut self.announcing, mac);
                false
            }
        }
    }

    /// Ends a round (call before sending the next probe).
    pub(super) fn round(&mut self) -> Round {
        let others = std::mem::take(&mut self.answering);
        let announcing = std::mem::take(&mut self.announcing);
        self.live = announcing
            .iter()
            .map(|mac| {
                let before = self.live.iter().find(|(m, _)| m == mac).map_or(0, |(_, n)| *n);
                (*mac, before.saturating_add(1))
            })
            .collect();
        let live: Vec<[u8; 6]> = self
            .live
            .iter()
            .filter(|(_, n)| *n >= LIVE_ROUNDS)
            .map(|(mac, _)| *mac)
            .collect();
        let yield_to = live.iter().copied().filter(|mac| *mac < self.ours).min();
        Round { others, live, yield_to }
    }
}

fn push_new(list: &mut Vec<[u8; 6]>, mac: [u8; 6]) {
    if !list.contains(&mac) {
        list.push(mac);
    }
}

/// Records who else has the address in `/status` and the gauges; returns
/// whether that changed. Nobody, and not yielded: clears it.
pub(super) fn record(leadership: &Leadership, others: &[[u8; 6]], live: &[[u8; 6]], yielded: bool) -> bool {
    metrics::gauge!("halo_ha_vip_yielded").set(if yielded { 1.0 } else { 0.0 });
    let mut state = leadership.state();
    if others.is_empty() && !yielded {
        metrics::gauge!("halo_ha_vip_conflict").set(0.0);
        return state.vip_conflict.take().is_some();
    }
    metrics::gauge!("halo_ha_vip_conflict").set(1.0);
    let macs: Vec<String> = others.iter().map(mac_string).collect();
    let live: Vec<String> = live.iter().map(mac_string).collect();
    let unchanged = state
        .vip_conflict
        .as_ref()
        .is_some_and(|c| c.macs == macs && c.live == live && c.yielded == yielded);
    if unchanged {
        return false;
    }
    let since = match &state.vip_conflict {
        Some(c) if c.macs == macs => c.since.clone(),
        _ => halo_health::server::rfc3339(SystemTime::now()),
    };
    state.vip_conflict = Some(VipConflict {
        macs,
        since,
        live,
        yielded,
    });
    true
}

/// A socket for what other hosts say about the address, non-blocking;
/// `None` if it cannot be opened (logged): the active then serves without
/// that safety net, as before it existed. Blocks for a while (binding a
/// packet socket waits for an RCU grace period): call it off the
/// election's thread.
pub(super) fn listener(floating: &FloatingIp) -> Option<Listener> {
    match floating.listen() {
        Ok(Some(l)) => match l.set_nonblocking() {
            Ok(()) => Some(l),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for other holders of the floating address");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for other holders of the floating address");
            None
        }
    }
}

/// [`listener`]'s socket, registered with the runtime.
pub(super) fn watch(listener: Listener) -> Option<AsyncFd<Listener>> {
    register(listener)
        .inspect_err(|e| tracing::error!(error = %e, "cannot listen for other holders of the floating address"))
        .ok()
}

/// The kernel's notifications of the address's removal, registered with
/// the runtime; `None` if they cannot be had (logged).
pub(super) fn removals(floating: &FloatingIp) -> Option<AsyncFd<Removals>> {
    match floating.watch_removals().map(register) {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot watch the floating address for removals");
            None
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot watch the floating address for removals");
            None
        }
    }
}

/// Registers a [`Listener`] or [`Removals`] with the runtime.
#[allow(unsafe_code)]
fn register<T: std::os::fd::AsRawFd>(socket: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: called with a `Listener` or a `Removals` only, each of which
    // owns its socket for its whole life and returns that socket's
    // descriptor from every `as_raw_fd`: the descriptor stays open and the
    // same while the `AsyncFd` (which owns the value) lives.
    Ok(unsafe { AsyncFd::register(socket) }?)
}

/// A new lock holder's wait before its term, with a floating address:
/// probes for the address, and returns once no live claimer announces it
/// (a leftover that only answers does not hold us back: its host is dead or
/// stopped, and the announcement after the claim repoints the neighbours).
/// While one does, this instance serves nothing, says `standby` with
/// `vip_conflict.yielded`, keeps its lock and lease, and probes again every
/// [`CONFLICT_CHECK`]. Returns the step-down reason if the lease, the lock
/// or the process ends first. A probe that cannot be made claims regardless
/// (as before probes existed).
pub(super) async fn wait_until_free(
    leadership: &Leadership,
    floating: &Arc<FloatingIp>,
    lease: &mut watch::Receiver<Instant>,
    lost: &mut oneshot::Receiver<()>,
    key: &mut watch::Receiver<Option<Option<KeyState>>>,
    session: &str,
    stop: &CancellationToken,
) -> Result<(), StepDown> {
    let mut tick = tokio::time::interval(CONFLICT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut probing: Option<AbortOnDrop<Result<Probed, floating::Error>>> = None;
    let mut yielded = false;
    loop {
        let deadline = *lease.borrow_and_update();
        tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => {
                if *lease.borrow() <= Instant::now() {
                    return Err(lapsed(lost));
                }
            }
            () = stop.cancelled() => return Err(StepDown::Shutdown),
            changed = lease.changed() => {
                if changed.is_err() {
                    return Err(lapsed(lost));
                }
                leadership.set_lease(Some(*lease.borrow()));
            }
            _ = &mut *lost => return Err(StepDown::LockLost),
            changed = key.changed() => {
                let ours = key
                    .borrow_and_update()
                    .as_ref()
                    .is_some_and(|k| k.as_ref().is_some_and(|k| k.session.as_deref() == Some(session)));
                if changed.is_err() || !ours {
                    return Err(StepDown::LockLost);
                }
            }
            _ = tick.tick(), if probing.is_none() => {
                let f = Arc::clone(floating);
                probing = Some(AbortOnDrop(tokio::task::spawn_blocking(move || f.probe(PROBE_WAIT))));
            }
            done = async { (&mut probing.as_mut().expect("guarded").0).await }, if probing.is_some() => {
                probing = None;
                match done {
                    Ok(Ok(heard)) if heard.announcing.is_empty() => {
                        if yielded {
                            tracing::warn!(address = %floating.address(), "no other host announces the floating address any more: claiming it");
                        }
                        // The term's own rounds record any leftover.
                        record(leadership, &[], &[], false);
                        return Ok(());
                    }
                    Ok(Ok(heard)) => {
                        if !yielded {
                            let live: Vec<String> = heard.announcing.iter().map(mac_string).collect();
                            tracing::error!(
                                address = %floating.address(),
                                live = ?live,
                                "another live host announces the floating address: not claiming it, and serving nothing, until it is gone \
                                 (two clusters configured with one vip_address?)"
                            );
                            leadership.set_role(Role::Standby);
                        }
                        yielded = true;
                        record(leadership, &heard.answering, &heard.announcing, true);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "cannot probe for other holders of the floating address; claiming it regardless");
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the probe task failed; claiming the floating address regardless");
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Adds the floating address and announces it, off this thread (netlink and
/// packet sockets block); logged, not fatal: the active retries.
pub(super) async fn claim(floating: &Arc<FloatingIp>) -> bool {
    let f = Arc::clone(floating);
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || f.claim()).await {
        Ok(Ok(_)) => {
            tracing::info!(address = %floating.address(), interface = floating.interface(), took = ?started.elapsed(), "floating address claimed and announced");
            true
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot claim the floating address; retrying");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "the claim task failed; retrying");
            false
        }
    }
}

/// Removes the floating address, off this thread.
pub(super) async fn release_address(floating: &Arc<FloatingIp>) -> Result<Outcome, crate::control::floating::Error> {
    let f = Arc::clone(floating);
    match tokio::task::spawn_blocking(move || f.release()).await {
        Ok(result) => result,
        Err(e) => Err(crate::control::floating::Error::Task(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: [u8; 6] = [2, 0, 0, 0, 0, 0x20];
    const LOWER: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
    const HIGHER: [u8; 6] = [2, 0, 0, 0, 0, 0x30];

    fn rounds(conflict: &mut Conflict, heard: &[Heard], n: usize) -> Round {
        let now = Instant::now();
        let mut last = None;
        for _ in 0..n {
            for h in heard {
                conflict.heard(*h, now);
            }
            last = Some(conflict.round());
        }
        last.expect("at least one round")
    }

    #[test]
    fn a_leftover_that_only_answers_never_makes_an_active_give_way() {
        let mut c = Conflict::new(OURS);
        let r = rounds(&mut c, &[Heard::Answer(LOWER)], 10);
        assert_eq!(r.others, vec![LOWER]);
        assert!(r.live.is_empty());
        assert_eq!(r.yield_to, None);
    }

    #[test]
    fn of_two_live_claimers_exactly_one_gives_way_after_two_rounds() {
        // Each side hears the other announce every round.
        let mut ours = Conflict::new(OURS);
        let mut theirs = Conflict::new(LOWER);
        let first = (ours.round(), theirs.round());
        assert_eq!((first.0.yield_to, first.1.yield_to), (None, None));
        ours.heard(Heard::Announce(LOWER), Instant::now());
        theirs.heard(Heard::Announce(OURS), Instant::now());
        let one = (ours.round(), theirs.round());
        assert_eq!(
            (one.0.yield_to, one.1.yield_to),
            (None, None),
            "one announcement is no claim yet"
        );
        ours.heard(Heard::Announce(LOWER), Instant::now());
        theirs.heard(Heard::Announce(OURS), Instant::now());
        let two = (ours.round(), theirs.round());
        assert_eq!(two.0.yield_to, Some(LOWER), "the higher MAC gives way");
        assert_eq!(two.1.yield_to, None, "the lower MAC keeps the address");
        assert_eq!(two.1.live, vec![OURS]);
    }

    #[test]
    fn announcements_must_come_in_consecutive_rounds() {
        let mut c = Conflict::new(OURS);
        for _ in 0..5 {
            c.heard(Heard::Announce(LOWER), Instant::now());
            assert_eq!(c.round().yield_to, None);
            // A quiet round in between starts the count over.
            assert_eq!(c.round().others, Vec::<[u8; 6]>::new());
        }
        let r = rounds(&mut c, &[Heard::Announce(HIGHER)], 3);
        assert_eq!(r.live, vec![HIGHER]);
        assert_eq!(r.yield_to, None, "a higher MAC gives way to us, not we to it");
    }

    #[test]
    fn probes_are_defended_at_most_every_defend_interval() {
        let mut c = Conflict::new(OURS);
        let t = Instant::now();
        assert!(c.heard(Heard::Probe, t));
        assert!(!c.heard(Heard::Probe, t + DEFEND_EVERY / 2));
        assert!(c.heard(Heard::Probe, t + DEFEND_EVERY));
        assert!(!c.heard(Heard::Answer(LOWER), t + DEFEND_EVERY * 3));
        assert_eq!(mac_string(&LOWER), "02:00:00:00:00:10");
    }
}
