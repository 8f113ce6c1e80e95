//! Local resource pressure: the process itself ran out of something (file
//! descriptors, kernel socket buffers or memory, ephemeral ports), as opposed
//! to a backend refusing or timing out.
//!
//! Such an error says nothing about the backend the connection was meant
//! for, so it never counts against one (no connect failure, no ejection, no
//! `tried`). Instead the process is *under pressure* for a short while:
//!
//! - every accept loop stops accepting (new clients wait in the kernel's
//!   backlog, as at the connection limit) until a proxied connection ends and
//!   frees its descriptors, or [`PAUSE`] has passed, whichever comes first;
//! - a client already accepted when its backend socket could not be made
//!   waits for the same relief and tries again, for at most [`CLIENT_WAIT`],
//!   and is closed only after that;
//! - the errors are counted (`halo_local_resource_errors_total{op,errno}`)
//!   and logged at most once a second, with the number suppressed.
//!
//! The state is process-wide on purpose: descriptors are a per-process
//! budget, so one VIP running out means every VIP has.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// How long accept loops pause after a local resource error when no
/// connection ends meanwhile.
pub(crate) const PAUSE: Duration = Duration::from_millis(250);

/// How long an accepted client waits for local resources to come back
/// before it is closed.
pub(crate) const CLIENT_WAIT: Duration = Duration::from_secs(30);

/// Whether `e` is the process's own resource running out rather than
/// anything the peer did: EMFILE and ENFILE (descriptors), ENOBUFS and ENOMEM
/// (kernel memory), EADDRNOTAVAIL (no ephemeral port left).
pub(crate) fn is_local(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Where a local error happened, for logs and the metric's `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Accepting a client connection.
    Accept,
    /// Making or connecting the backend socket.
    Connect,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Accept => "accept",
            Op::Connect => "connect",
        }
    }
}

struct Pressure {
    /// Milliseconds since [`EPOCH`] until which the process is under
    /// pressure; 0 (or the past): not.
    until_ms: AtomicU64,
    relieved: Notify,
    log: RateLimit,
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

static STATE: LazyLock<Pressure> = LazyLock::new(|| Pressure {
    until_ms: AtomicU64::new(0),
    relieved: Notify::new(),
    log: RateLimit::new(Duration::from_secs(1)),
});

fn now_ms() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Records a local resource error: counts it, logs it (rate-limited) and
/// puts the process under pressure for [`PAUSE`].
pub(crate) fn report(op: Op, vip: &str, e: &io::Error) {
    let errno = errno_name(e);
    metrics::counter!("halo_local_resource_errors_total", "op" => op.as_str(), "errno" => errno).increment(1);
    STATE
        .until_ms
        .fetch_max(now_ms() + PAUSE.as_millis() as u64, Ordering::AcqRel);
    if let Some(suppressed) = STATE.log.allow() {
        tracing::warn!(
            vip,
            op = op.as_str(),
            error = %e,
            suppressed,
            "out of local resources ({errno}); accepting paused, no backend blamed"
        );
    }
}

/// Whether the process is under pressure now.
pub(crate) fn under_pressure() -> bool {
    STATE.until_ms.load(Ordering::Acquire) > now_ms()
}

/// A connection ended and freed its descriptors: lifts the pressure and
/// wakes whoever waits for it. Cheap when there is no pressure.
pub(crate) fn relieve() {
    if STATE.until_ms.load(Ordering::Acquire) != 0 && STATE.until_ms.swap(0, Ordering::AcqRel) != 0 {
        STATE.relieved.notify_waiters();
    }
}

/// Waits while the process is under pressure: until [`relieve`] or until
/// the pause runs out.
pub(crate) async fn wait_clear() {
    loop {
        let notified = STATE.relieved.notified();
        let until = STATE.until_ms.load(Ordering::Acquire);
        let now = now_ms();
        if until <= now {
            return;
        }
        tokio::select! {
            () = notified => return,
            () = tokio::time::sleep(Duration::from_millis(until - now)) => {}
        }
    }
}

/// Waits for relief (a connection ending) or the pause to pass, at most
/// until `deadline`. Returns false if the deadline came first.
pub(crate) async fn wait_relief(deadline: tokio::time::Instant) -> bool {
    tokio::select! {
        () = wait_clear() => true,
        () = tokio::time::sleep_until(deadline) => false,
    }
}

fn errno_name(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENFILE) => "ENFILE",
        Some(libc::ENOBUFS) => "ENOBUFS",
        Some(libc::ENOMEM) => "ENOMEM",
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL",
        _ => "other",
    }
}

/// Lets one event through per interval and counts the ones held back.
#[derive(Debug)]
pub(crate) struct RateLimit {
    interval_ms: u64,
    /// [`now_ms`] of the last event let through, plus one (0: never).
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// One event per `interval`.
    pub(crate) fn new(interval: Duration) -> RateLimit {
        RateLimit {
            interval_ms: interval.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(number held back since the last one)` if this event may be
    /// logged, else `None` (and it is counted as held back).
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = now_ms() + 1;
        let last = self.last_ms.load(Ordering::Acquire);
        if (last == 0 || now >= last + self.interval_ms)
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        self.suppressed.fetch_add(1, Ordering::AcqRel);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_errors_are_the_process_own() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(is_local(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::ECONNRESET,
        ] {
            assert!(!is_local(&io::Error::from_raw_os_error(errno)), "{errno}");
        }
        assert!(!is_local(&io::Error::new(io::ErrorKind::TimedOut, "connect timed out")));
    }

    #[test]
    fn rate_limit_lets_one_through_per_interval_and_counts_the_rest() {
        let limit = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.allow(), Some(0));
        for _ in 0..46 {
            assert_eq!(limit.allow(), None);
        }
        assert_eq!(limit.suppressed.load(Ordering::Relaxed), 46);
        let every = RateLimit::new(Duration::ZERO);
        assert_eq!(every.allow(), Some(0));
        assert_eq!(every.allow(), Some(0));
    }

    #[tokio::test]
    async fn pressure_pauses_until_relieved() {
        report(Op::Connect, "t", &io::Error::from_raw_os_error(libc::EMFILE));
        assert!(under_pressure());
        let waiter = tokio::spawn(wait_clear());
        tokio::task::yield_now().await;
        relieve();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("relief wakes the waiter")
            .unwrap();
        assert!(!under_pressure());
    }
}
