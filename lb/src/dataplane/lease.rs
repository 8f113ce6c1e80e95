//! The active's lease as the data plane sees it: one process-wide atomic
//! deadline, checked for every accepted connection.
//!
//! The election ([`crate::control::ha`]) sets it to the end of its server-confirmed
//! lease and zeroes it before anything else when it steps down. The accept
//! loops refuse (close at once) every connection accepted at or past the
//! deadline, whatever order the control plane's tasks run in: a process
//! that was frozen (SIGSTOP, a paused VM) and wakes past its lease serves
//! nothing, even before its election task has run, and the clients the
//! kernel queued for it meanwhile are closed instead of served.
//!
//! A balancer without `[ha]` never sets it: its lease is unlimited.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Instant;

/// Milliseconds since [`EPOCH`] until which this process may serve;
/// `u64::MAX`: unlimited (no `[ha]`); 0: not at all.
static DEADLINE_MS: AtomicU64 = AtomicU64::new(u64::MAX);

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn millis(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*EPOCH).as_millis()).unwrap_or(u64::MAX - 1)
}

/// Serves until `deadline` (rounded down to the millisecond: never later
/// than the election's own deadline).
pub(crate) fn serve_until(deadline: Instant) {
    // Force the epoch first, so `deadline` is never before it.
    LazyLock::force(&EPOCH);
    DEADLINE_MS.store(millis(deadline), Ordering::Release);
}

/// Serves nothing from now on, until [`serve_until`] again.
pub(crate) fn revoke() {
    DEADLINE_MS.store(0, Ordering::Release);
}

/// Whether a connection accepted now may be served.
pub(crate) fn valid() -> bool {
    let deadline = DEADLINE_MS.load(Ordering::Acquire);
    deadline == u64::MAX || millis(Instant::now()) < deadline
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_deadline_is_enforced_and_revocable() {
        // One test for the process-wide state, so nothing races it.
        assert!(valid(), "unlimited until an election sets it");
        serve_until(Instant::now() + Duration::from_secs(60));
        assert!(valid());
        serve_until(Instant::now());
        assert!(!valid(), "the deadline itself is past");
        serve_until(Instant::now() + Duration::from_secs(60));
        revoke();
        assert!(!valid());
    }
}
