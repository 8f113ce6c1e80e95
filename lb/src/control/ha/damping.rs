//! Damping of forced takeovers, so that two balancers cut apart from each
//! other (both still reaching Consul) hand the lock over once, not back and
//! forth for as long as the cut lasts.
//!
//! An *incident* is this instance losing the lock while it served under a
//! valid lease: a takeover it did not deserve, as far as it can tell (the
//! link between the balancers broke, not the active). After one, the
//! instance forces no takeover until **both**:
//!
//! - a window has passed: [`DAMP_BASE`] after the first incident, doubling
//!   with every further one up to [`DAMP_MAX`], back to the base after
//!   [`DAMP_RESET`] without an incident; and
//! - it has *heard* the current active since the incident: an
//!   authenticated answer to one of its probes, which proves the link
//!   between the two works again, so that silence or a refusal after it
//!   says something about the active rather than about the link.
//!
//! The second condition is what a time window alone lacks: with the link
//! cut for many minutes, each side's window would end while the cut still
//! silences the other, and the lock would change hands every window. Here
//! the damped side stays damped for the whole cut; Consul's own detection
//! (the active's check TTL, its node's `serfHealth`) still works meanwhile,
//! so an active that really dies during the cut is still replaced, only not
//! by the shortcut.
//!
//! An instance that lost the lock after its lease had run out (cut off
//! from Consul, frozen, its cable pulled) deserved the takeover and is not
//! damped: the next real failure of the other side is handled as fast as
//! the first.
//!
//! The election tells [`Damping`] of an incident through
//! [`Leadership::lost_lock`] and [`Leadership::observe_holder`]: a loss
//! while serving counts only once the next holder's value says that it
//! forced our session out. A session Consul ended (our node failed in
//! gossip, our check went critical) is no incident.
//!
//! Damping only ever holds a forced takeover back, so it cannot make two
//! actives; the safety argument is in [the module docs](super).

use std::time::Duration;

use tokio::time::Instant;

use super::key::KeyState;
use super::Leadership;

/// The first damping window after an incident.
pub(super) const DAMP_BASE: Duration = Duration::from_secs(30);
/// The longest damping window.
pub(super) const DAMP_MAX: Duration = Duration::from_secs(600);
/// Without incident for this long after a window ends, the next window
/// starts at [`DAMP_BASE`] again.
pub(super) const DAMP_RESET: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Damping {
    /// When the current (or last) window ends.
    until: Option<Instant>,
    /// Its length.
    window: Duration,
    /// No answer from the active heard since the last incident.
    unheard: bool,
    /// A held-back takeover was logged since the last incident.
    reported: bool,
}

impl Default for Damping {
    fn default() -> Self {
        Damping {
            until: None,
            window: DAMP_BASE,
            unheard: false,
            reported: false,
        }
    }
}

impl Damping {
    /// Records an incident at `now`. The window doubles unless the last one
    /// ended [`DAMP_RESET`] or more ago.
    pub(super) fn incident(&mut self, now: Instant) {
        if let Some(until) = self.until {
            self.window = if now >= until + DAMP_RESET {
                DAMP_BASE
            } else {
                (self.window * 2).min(DAMP_MAX)
            };
        }
        self.until = Some(now + self.window);
        self.unheard = true;
        self.reported = false;
    }

    /// True the first time it is asked after an incident: a held-back
    /// takeover is worth a warning once, not every second of a long cut.
    pub(super) fn first_report(&mut self) -> bool {
        !std::mem::replace(&mut self.reported, true)
    }

    /// The active answered one of our probes: the link between us works.
    pub(super) fn heard(&mut self) {
        self.unheard = false;
    }

    /// Whether a forced takeover is allowed at `now`.
    pub(super) fn allows(&self, now: Instant) -> bool {
        !self.unheard && self.until.is_none_or(|until| now >= until)
    }

    /// When the current window ends, if one runs at `now`.
    pub(super) fn until(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|&u| u > now)
    }

    /// Whether forced takeovers wait to hear the active first.
    pub(super) fn waits_to_hear(&self) -> bool {
        self.unheard
    }
}

impl Leadership {
    /// This instance lost `session`'s lock while serving under a valid
    /// lease. Whether that was a peer's forced takeover (an incident for
    /// damping: the link between us may be what broke) or Consul
    /// invalidating the session (our node failed in gossip, our check went
    /// critical: nothing to damp) is known once the next holder's value is
    /// seen.
    pub(super) fn lost_lock(&self, session: &str) {
        self.state().lost_while_serving = Some((session.to_owned(), Instant::now()));
    }

    /// A holder of the lock as the key watch sees it: if it forced out the
    /// session we lost while serving, that loss was an incident.
    pub(super) fn observe_holder(&self, key: Option<&KeyState>) {
        let mut state = self.state();
        let Some((lost, at)) = state.lost_while_serving.clone() else {
            return;
        };
        let Some(key) = key.filter(|k| k.session.is_some()) else {
            // Free: nobody has acquired yet.
            return;
        };
        if key.session.as_deref() == Some(lost.as_str()) {
            // A view from before the loss: undecided yet.
            return;
        }
        let Some(holder) = key.holder.as_ref() else {
            return;
        };
        if holder.instance == self.instance {
            // We took it again ourselves: nobody forced us out.
            state.lost_while_serving = None;
        } else if holder.forced.as_deref() == Some(lost.as_str()) {
            state.lost_while_serving = None;
            state.damping.incident(at);
            tracing::warn!(holder = %holder.id, "we were forced out by a peer while serving: damping our own forced takeovers until we hear the active again");
        } else {
            state.lost_while_serving = None;
            tracing::info!(holder = %holder.id, "the lock went to a peer that did not force us out (Consul ended our session): not damped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_double_with_incidents_and_reset_after_a_quiet_spell() {
        let t0 = Instant::now();
        let mut d = Damping::default();
        assert!(d.allows(t0));
        d.incident(t0);
        d.heard();
        assert!(!d.allows(t0 + DAMP_BASE - Duration::from_millis(1)));
        assert!(d.allows(t0 + DAMP_BASE));
        // The next incident just after the window ended (the case that
        // never doubled before): twice the window.
        let t1 = t0 + DAMP_BASE + Duration::from_secs(1);
        d.incident(t1);
        d.heard();
        assert!(!d.allows(t1 + DAMP_BASE));
        assert!(d.allows(t1 + DAMP_BASE * 2));
        // Long after that window, but within DAMP_RESET of its end: still
        // doubles.
        let t2 = t1 + DAMP_BASE * 2 + DAMP_RESET - Duration::from_secs(1);
        d.incident(t2);
        d.heard();
        assert_eq!(d.until(t2), Some(t2 + DAMP_BASE * 4));
        // Capped.
        let mut t = t2;
        for _ in 0..10 {
            t += Duration::from_secs(1);
            d.incident(t);
        }
        assert_eq!(d.until(t), Some(t + DAMP_MAX));
        // Quiet for DAMP_RESET past the window: back to the base.
        let later = t + DAMP_MAX + DAMP_RESET;
        d.incident(later);
        assert_eq!(d.until(later), Some(later + DAMP_BASE));
    }

    #[test]
    fn a_damped_instance_waits_to_hear_the_active_however_long_the_window_was() {
        let t0 = Instant::now();
        let mut d = Damping::default();
        d.incident(t0);
        assert!(d.waits_to_hear());
        assert!(!d.allows(t0 + DAMP_MAX * 10), "unheard: never, by time alone");
        d.heard();
        assert!(d.allows(t0 + DAMP_BASE));
    }

    /// The defect: with UDP between the balancers dropped for a long time
    /// (both still reaching Consul) the lock changed hands every ~30 s. A
    /// model of the pair on a paused clock: whoever is standby forces a
    /// takeover as soon as its damping allows it (it hears nothing through
    /// the cut); the active it forces out records an incident. Over an hour
    /// of cut, the lock changes hands once; once the link heals, each side
    /// hears the other, and a real failure afterwards is handled at once.
    #[tokio::test(start_paused = true)]
    async fn a_cut_of_an_hour_changes_hands_once() {
        let mut damping = [Damping::default(), Damping::default()];
        let mut active = 0usize;
        let mut handovers = Vec::new();
        let start = Instant::now();
        let step = Duration::from_millis(300);
        while start.elapsed() < Duration::from_secs(3600) {
            tokio::time::sleep(step).await;
            let standby = 1 - active;
            let now = Instant::now();
            if damping[standby].allows(now) {
                damping[active].incident(now);
                active = standby;
                handovers.push(now - start);
            }
        }
        assert_eq!(handovers.len(), 1, "the lock changed hands at {handovers:?}");
        // The link heals: each hears the other's answers.
        for d in &mut damping {
            d.heard();
        }
        tokio::time::sleep(DAMP_MAX).await;
        let standby = 1 - active;
        assert!(damping[standby].allows(Instant::now()), "the standby is not damped");
        assert!(
            damping[active].allows(Instant::now()),
            "past its window and heard: the old active may force too"
        );
    }
}
