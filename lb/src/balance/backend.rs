//! Backends: identity, and the live state the data plane keeps about each one
//! (connection count, passive ejection).
//!
//! A backend's state outlives table swaps: the table builder hands the same
//! [`BackendState`] to every table that contains the same address, so live
//! connection counts and ejections carry over, and connections that are
//! already running keep their backend whatever the current table says.
//!
//! Two things take a backend out of selection without a table rebuild:
//! passive ejection (failed connects) and a failing active check (see
//! [`crate::sources::checks`]). Both live here as atomics, and every change of
//! either bumps the process-wide [`health_epoch`], so derived decisions (the
//! zone-aware routing in [`crate::balance::zone`]) can be cached until health moves.
//! An operator's disable is different: it is an input of the table.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use halo_health::CheckHandle;

use tokio::time::Instant;

pub(crate) use crate::settings::Backend;
use crate::settings::PassiveConfig;

/// What the data plane currently thinks of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Health {
    /// Takes new connections.
    Healthy,
    /// Refused connections recently; skipped until its ejection runs out.
    Ejected,
}

/// Live, shared state of one backend of one VIP.
#[derive(Debug)]
pub(crate) struct BackendState {
    addr: SocketAddr,
    active: AtomicUsize,
    consecutive_failures: AtomicU32,
    /// Consecutive ejections without a successful connect in between; the
    /// exponent of the back-off.
    ejections_in_a_row: AtomicU32,
    /// Ejected until this many nanoseconds after [`epoch`]; 0 = not ejected.
    ejected_until: AtomicU64,
    metrics: BackendMetrics,
    /// The active check says this backend is down (read on every pick).
    check_failing: AtomicBool,
    /// The running active check, for `/status`; `None` without one.
    check: Mutex<Option<CheckHandle>>,
}

/// Bumped whenever any backend's health changes (ejected, re-admitted, an
/// active check flips). Ejections that run out by time do not bump it:
/// whoever caches a decision also keeps the earliest ejection end.
static HEALTH_EPOCH: AtomicU64 = AtomicU64::new(1);

/// The current health epoch: if it is unchanged, no backend was ejected,
/// re-admitted, or flipped by its active check since it was read.
pub(crate) fn health_epoch() -> u64 {
    HEALTH_EPOCH.load(Ordering::Acquire)
}

fn health_changed() {
    HEALTH_EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// A backend's counters. They live here, not in the metrics registry: the
/// per-backend series are rendered from the published tables at scrape time
/// (`control::series`), so a backend that leaves the table leaves
/// `/metrics` with it (the registry can never forget a series).
#[derive(Debug, Default)]
struct BackendMetrics {
    connections: AtomicU64,
    connect_failures: AtomicU64,
    ejections: AtomicU64,
    check_flips: AtomicU64,
    /// UDP: datagrams and bytes from clients to this backend.
    datagrams_in: AtomicU64,
    bytes_in: AtomicU64,
    /// UDP: datagrams and bytes from this backend to clients.
    datagrams_out: AtomicU64,
    bytes_out: AtomicU64,
}

/// A backend's counters, read for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackendCounters {
    /// Proxied connections started.
    pub(crate) connections: u64,
    /// Failed connects.
    pub(crate) connect_failures: u64,
    /// Passive ejections.
    pub(crate) ejections: u64,
    /// Flips of its active check.
    pub(crate) check_flips: u64,
    /// UDP datagrams from clients to it.
    pub(crate) datagrams_in: u64,
    /// UDP bytes from clients to it.
    pub(crate) bytes_in: u64,
    /// UDP datagrams from it to clients.
    pub(crate) datagrams_out: u64,
    /// UDP bytes from it to clients.
    pub(crate) bytes_out: u64,
}

/// Process-wide origin of the nanosecond timestamps kept in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    // Saturating: 0 means "not ejected", so never store a real 0.
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

impl BackendState {
    /// Fresh state for `addr`.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        epoch();
        BackendState {
            addr,
            active: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections_in_a_row: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            metrics: BackendMetrics::default(),
            check_failing: AtomicBool::new(false),
            check: Mutex::new(None),
        }
    }

    /// Its counters so far.
    pub(crate) fn counters(&self) -> BackendCounters {
        BackendCounters {
            connections: self.metrics.connections.load(Ordering::Relaxed),
            connect_failures: self.metrics.connect_failures.load(Ordering::Relaxed),
            ejections: self.metrics.ejections.load(Ordering::Relaxed),
            check_flips: self.metrics.check_flips.load(Ordering::Relaxed),
            datagrams_in: self.metrics.datagrams_in.load(Ordering::Relaxed),
            bytes_in: self.metrics.bytes_in.load(Ordering::Relaxed),
            datagrams_out: self.metrics.datagrams_out.load(Ordering::Relaxed),
            bytes_out: self.metrics.bytes_out.load(Ordering::Relaxed),
        }
    }

    /// The backend's address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Counts one UDP datagram of `bytes` sent to this backend.
    pub(crate) fn udp_in(&self, bytes: u64) {
        self.metrics.datagrams_in.fetch_add(1, Ordering::Relaxed);
        self.metrics.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts `n` UDP datagrams (`bytes` in all) received from this backend.
    pub(crate) fn udp_out(&self, n: u64, bytes: u64) {
        self.metrics.datagrams_out.fetch_add(n, Ordering::Relaxed);
        self.metrics.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Live proxied connections to this backend.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether the backend is ejected at `now`.
    pub(crate) fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && nanos_since_epoch(now) < until
    }

    /// Whether a pick may choose this backend at `now`: neither ejected nor
    /// failing its active check.
    pub(crate) fn available(&self, now: Instant) -> bool {
        !self.check_failing() && !self.is_ejected(now)
    }

    /// When the current ejection ends, if the backend is ejected at `now`.
    pub(crate) fn ejected_until(&self, now: Instant) -> Option<Instant> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until != 0 && nanos_since_epoch(now) < until).then(|| epoch() + Duration::from_nanos(until))
    }

    /// Whether the active check currently says the backend is down.
    pub(crate) fn check_failing(&self) -> bool {
        self.check_failing.load(Ordering::Relaxed)
    }

    /// Records the active check's verdict; returns whether it changed.
    pub(crate) fn set_check_failing(&self, failing: bool) -> bool {
        let changed = self.check_failing.swap(failing, Ordering::Relaxed) != failing;
        if changed {
            self.metrics.check_flips.fetch_add(1, Ordering::Relaxed);
            health_changed();
        }
        changed
    }

    /// Attaches (or, with `None`, detaches) the active check whose state
    /// `/status` shows. Detaching also clears a failing verdict: with no
    /// check, nothing says the backend is down.
    pub(crate) fn set_check(&self, check: Option<CheckHandle>) {
        let detached = check.is_none();
        *self.check.lock().expect("check handle poisoned") = check;
        if detached {
            self.set_check_failing(false);
        }
    }

    /// The active check, if one runs for this backend.
    pub(crate) fn check(&self) -> Option<CheckHandle> {
        self.check.lock().expect("check handle poisoned").clone()
    }

    /// Health at `now`, and for how much longer an ejection lasts.
    pub(crate) fn health(&self, now: Instant) -> (Health, Duration) {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now = nanos_since_epoch(now);
        if until != 0 && now < until {
            (Health::Ejected, Duration::from_nanos(until - now))
        } else {
            (Health::Healthy, Duration::ZERO)
        }
    }

    /// A connect succeeded: the backend is healthy and its back-off resets.
    pub(crate) fn connect_succeeded(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if self.ejections_in_a_row.swap(0, Ordering::Relaxed) > 0 {
            tracing::info!(backend = %self.addr, "backend re-admitted after a successful connect");
        }
        // Load first: the common case (never ejected) then writes nothing,
        // and only a real re-admission moves the health epoch.
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
            health_changed();
        }
    }

    /// A connect failed at `now`. Ejects the backend after
    /// `policy.eject_after` failures in a row, or at once if it was ejected
    /// before and has not connected since (then for twice as long as last
    /// time, up to `policy.max_ejection`). Returns the ejection time if it
    /// ejected.
    pub(crate) fn connect_failed(&self, now: Instant, policy: &PassiveConfig) -> Option<Duration> {
        self.metrics.connect_failures.fetch_add(1, Ordering::Relaxed);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if policy.eject_after == 0 || self.is_ejected(now) {
            return None;
        }
        let previous = self.ejections_in_a_row.load(Ordering::Relaxed);
        if failures < policy.eject_after && previous == 0 {
            return None;
        }
        let exponent = previous.min(16);
        let ejection = policy
            .base_ejection
            .saturating_mul(1u32 << exponent)
            .min(policy.max_ejection);
        self.ejections_in_a_row.store(previous + 1, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejected_until
            .store(nanos_since_epoch(now + ejection), Ordering::Relaxed);
        health_changed();
        self.metrics.ejections.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(backend = %self.addr, ?ejection, failures, "backend ejected after failed connects");
        Some(ejection)
    }

    /// Counts a proxied connection until the guard drops.
    pub(crate) fn start_connection(self: &Arc<Self>) -> ActiveConnection {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.connections.fetch_add(1, Ordering::Relaxed);
        ActiveConnection {
            state: Arc::clone(self),
        }
    }
}

/// One live connection to a backend; dropping it ends the count.
#[derive(Debug)]
pub(crate) struct ActiveConnection {
    state: Arc<BackendState>,
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.state.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One backend in a table.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Identity and metadata.
    pub backend: Backend,
    /// Live state shared with every other table holding this address.
    pub state: Arc<BackendState>,
    /// Disabled by an operator: listed, never picked.
    pub disabled: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PassiveConfig {
        PassiveConfig {
            eject_after: 2,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_backs_off_exponentially_and_a_success_resets_it() {
        let s = BackendState::new("127.0.0.1:1".parse().unwrap());
        let p = policy();
        let now = Instant::now();
        assert_eq!(s.connect_failed(now, &p), None, "one failure is not enough");
        assert_eq!(s.connect_failed(now, &p), Some(Duration::from_secs(1)));
        assert!(s.is_ejected(now));
        assert!(!s.is_ejected(now + Duration::from_secs(1)));

        // Re-admitted on probation: one more failure ejects for twice as long.
        let later = now + Duration::from_secs(1);
        assert_eq!(s.connect_failed(later, &p), Some(Duration::from_secs(2)));
        let later = later + Duration::from_secs(2);
        assert_eq!(s.connect_failed(later, &p), Some(Duration::from_secs(4)));
        let later = later + Duration::from_secs(4);
        assert_eq!(s.connect_failed(later, &p), Some(Duration::from_secs(5)), "capped");

        s.connect_succeeded();
        assert!(!s.is_ejected(later));
        assert_eq!(s.connect_failed(later, &p), None, "back to needing two failures");
        assert_eq!(s.connect_failed(later, &p), Some(Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_can_be_disabled() {
        let s = BackendState::new("127.0.0.1:1".parse().unwrap());
        let p = PassiveConfig {
            eject_after: 0,
            ..policy()
        };
        for _ in 0..10 {
            assert_eq!(s.connect_failed(Instant::now(), &p), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn health_changes_move_the_epoch_and_a_failing_check_makes_a_backend_unavailable() {
        let s = BackendState::new("127.0.0.1:1".parse().unwrap());
        let now = Instant::now();
        assert!(s.available(now));
        let e0 = health_epoch();
        assert!(s.set_check_failing(true));
        assert!(!s.available(now), "failing its check takes it out");
        assert!(!s.is_ejected(now), "but it is not ejected: the two stay apart");
        let e1 = health_epoch();
        assert!(e1 > e0);
        assert!(!s.set_check_failing(true), "no change, no flip");
        s.set_check(None);
        assert!(s.available(now), "detaching the check clears its verdict");

        let p = policy();
        s.connect_failed(now, &p);
        let before = health_epoch();
        s.connect_failed(now, &p);
        assert!(health_epoch() > before, "an ejection moves the epoch");
        let until = s.ejected_until(now).expect("ejected");
        assert!(until > now && until <= now + Duration::from_secs(1), "{until:?}");
        assert_eq!(s.ejected_until(now + Duration::from_secs(1)), None);
        let before = health_epoch();
        s.connect_succeeded();
        assert!(health_epoch() > before, "a re-admission moves the epoch");
    }

    #[test]
    fn active_connections_are_counted_by_guards() {
        let s = std::sync::Arc::new(BackendState::new("127.0.0.1:1".parse().unwrap()));
        let a = s.start_connection();
        let b = s.start_connection();
        assert_eq!(s.active(), 2);
        drop(a);
        assert_eq!(s.active(), 1);
        drop(b);
        assert_eq!(s.active(), 0);
    }
}
