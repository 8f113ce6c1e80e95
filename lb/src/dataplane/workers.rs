//! The data plane's threads: one per core, each an epoll (tokio) runtime
//! or an io_uring completion loop ([`uring`]).
//!
//! Each worker accepts on its own registration of every VIP's listening
//! socket and serves the connections it accepts to the end on its own
//! thread, so a connection's reads and writes never hop between threads
//! (no cross-thread wake-ups on the per-byte path, no work stealing). The
//! control plane (admin API, signals, reloads, discovery) runs on the main
//! runtime.
//!
//! # Balance between workers
//! Every worker is woken by a new connection on a shared listener, and the
//! first to run takes it. A burst of connects (a client pool opening 50 at
//! once) could all land on one worker, which then carries every connection
//! on one core while the other idles: measured, 50 of 50 keep-alive
//! connections on one worker in one run of four. So each worker counts its
//! live connections ([`Load`]), and one that carries clearly more than the
//! least loaded other worker waits [`ACCEPT_DEFER`] before accepting, which
//! lets the other (woken by the same connection) take it; after the wait
//! it accepts whatever the balance, so a busy or stuck worker delays a
//! connection by at most that long. HAProxy balances the same way, handing
//! each accepted connection to the less loaded of its threads.
//!
//! At most one worker waits at a time ([`Yield`]): while one leaves new
//! connections to the others, the others take them whatever their own
//! load. The turn is one for the whole process, so with several VIPs only
//! one listener waits at a time; the rest accept as if balanced, which
//! costs at most some imbalance, never a connection. Without that rule, under churn the roles flipped within the
//! wait (the waiting worker's connections ended, the other's piled up, and
//! it began to wait too), so for up to [`ACCEPT_DEFER`] nobody accepted:
//! measured, a fifth of the two cores idle under a closed-loop load of new
//! connections, 0.7× the connections per second and 1.2× the CPU per
//! connection of accepting without any deferral.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balance::table::Vip;
use crate::dataplane::{proxy, uring};
use crate::settings::DataPlane;

/// One worker thread, as the control plane reaches it.
#[derive(Debug)]
enum Worker {
    /// A single-threaded tokio runtime (epoll).
    Epoll(Handle),
    /// An io_uring completion loop (see [`uring`]).
    IoUring(uring::Handle),
}

/// The data-plane worker threads; cloning shares them.
#[derive(Debug, Clone)]
pub(crate) struct Workers {
    workers: Arc<Vec<Worker>>,
    plane: &'static str,
}

impl Workers {
    /// Starts `n` worker threads (at least one) on the data plane `plane`
    /// asks for, each serving until the process exits. `auto` takes
    /// io_uring if [`uring::probe`] passes, else epoll (and logs why).
    pub(crate) fn start(n: usize, plane: DataPlane) -> std::io::Result<Workers> {
        let n = n.max(1);
        // One counter per worker, each on its own cache line; the first
        // start fixes the count (a process starts its workers once).
        LOADS.get_or_init(|| (0..n).map(|_| Padded::default()).collect());
        let io_uring = match plane {
            DataPlane::Epoll => false,
            DataPlane::IoUring => {
                uring::probe().map_err(|e| std::io::Error::new(e.kind(), format!("data_plane = \"io_uring\": {e}")))?;
                true
            }
            DataPlane::Auto => match uring::probe() {
                Ok(()) => true,
                Err(e) => {
                    tracing::info!(error = %e, "io_uring unavailable here; the data plane uses epoll");
                    false
                }
            },
        };
        let mut workers = Vec::new();
        for i in 0..n {
            let name = format!("halo-worker-{i}");
            let worker = if io_uring {
                match uring::start(name.clone(), i) {
                    Ok(handle) => Worker::IoUring(handle),
                    // The probe passed, yet this worker's ring could not be
                    // made (locked memory, say): under `auto` it runs epoll;
                    // workers are independent, so a mix serves alike.
                    Err(e) if plane == DataPlane::Auto => {
                        tracing::warn!(worker = i, error = %e, "cannot start an io_uring worker; this one uses epoll");
                        Worker::Epoll(start_epoll(name, i)?)
                    }
                    Err(e) => return Err(e),
                }
            } else {
                Worker::Epoll(start_epoll(name, i)?)
            };
            workers.push(worker);
        }
        let rings = workers.iter().filter(|w| matches!(w, Worker::IoUring(_))).count();
        let plane = match rings {
            0 => "epoll",
            r if r == n => "io_uring",
            _ => "io_uring+epoll",
        };
        tracing::info!(workers = n, data_plane = plane, "data-plane workers started");
        Ok(Workers {
            workers: Arc::new(workers),
            plane,
        })
    }

    /// How many worker threads there are.
    pub(crate) fn len(&self) -> usize {
        self.workers.len()
    }

    /// The data plane in use: `io_uring`, `epoll`, or `io_uring+epoll` when
    /// some io_uring workers could not start under `auto`.
    pub(crate) fn plane(&self) -> &'static str {
        self.plane
    }

    /// Accepts on `listener` on every worker: each takes its own clone of
    /// the socket, and whichever accepts a connection serves it to the end
    /// on its thread. Connections are counted on `tracker`; the accept
    /// loops end when `stop` is cancelled.
    pub(crate) fn spawn_accept(
        &self,
        vip: &Arc<Vip>,
        listener: &std::net::TcpListener,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        for worker in self.workers.iter() {
            let listener = match listener.try_clone() {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(vip = vip.name(), error = %e, "cannot share the listener with a worker");
                    continue;
                }
            };
            let (vip, stop, tracker) = (Arc::clone(vip), stop.clone(), tracker.clone());
            match worker {
                Worker::Epoll(handle) => {
                    handle.spawn(async move {
                        match tokio::net::TcpListener::from_std(listener) {
                            Ok(listener) => proxy::accept_loop(vip, listener, stop, tracker).await,
                            Err(e) => tracing::error!(vip = vip.name(), error = %e, "cannot register the listener"),
                        }
                    });
                }
                Worker::IoUring(handle) => handle.send(uring::Command::Listen {
                    vip,
                    listener,
                    stop,
                    tracker,
                }),
            }
        }
    }
}

/// Starts one epoll worker: a thread running a single-threaded runtime.
fn start_epoll(name: String, index: usize) -> std::io::Result<Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name(name).spawn(move || {
        set_worker(index);
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                // The receiver learns of the failure from the closed channel.
                tracing::error!(error = %e, "cannot build a worker runtime");
                return;
            }
        };
        if tx.send(runtime.handle().clone()).is_err() {
            return;
        }
        runtime.block_on(keep_timer_armed());
    })?;
    rx.recv()
        .map_err(|_| std::io::Error::other(format!("worker {index} failed to start its runtime")))
}

/// Marks the calling thread as worker `index`, for [`Load`].
pub(crate) fn set_worker(index: usize) {
    if LOADS.get().is_some_and(|l| index < l.len()) {
        WORKER.set(Some(index));
    }
}

/// How often a worker's timer fires with nothing to do; see
/// [`keep_timer_armed`].
const TIMER_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Keeps a timer at most [`TIMER_TICK`] away on this worker for ever.
///
/// tokio wakes its reactor through an `eventfd` write whenever a new timer
/// is due sooner than the one the reactor last went to sleep for. Every
/// backend connect arms a timeout (`connect_timeout`, 1 s by default),
/// and with only idle timeouts (minutes) pending, each one was the soonest:
/// one `write(2)` and one extra reactor turn per connection (0.5 per
/// connection measured under load). With this tick the reactor never
/// sleeps past 250 ms, so connect timeouts of 250 ms or more arm silently;
/// idle, a worker wakes 4 times a second.
async fn keep_timer_armed() {
    let mut tick = tokio::time::interval(TIMER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

/// How long an over-loaded worker leaves a new connection to the others
/// before taking it itself: long enough for the other worker, woken by
/// the same connection, to run (tens of microseconds), short enough that a
/// worker waiting is not a worker missing. Under a closed-loop load of new
/// connections, 1 ms cost 4 % more CPU per connection than 200 or 50 µs,
/// which measured the same as no deferral at all. The epoll data plane's
/// timer has a 1 ms resolution, so it waits 1 ms.
pub(crate) const ACCEPT_DEFER: Duration = Duration::from_micros(200);

/// A worker's live connections, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicUsize);

/// Live connections per worker.
static LOADS: OnceLock<Box<[Padded]>> = OnceLock::new();

thread_local! {
    /// This thread's worker index; `None` off the workers.
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// One live connection on this worker; counted until dropped. A no-op off
/// the workers (tests that run the data plane on their own runtime).
#[derive(Debug)]
pub(crate) struct Load(Option<usize>);

impl Load {
    /// Counts a connection on the calling worker.
    pub(crate) fn start() -> Load {
        let worker = WORKER.get();
        if let (Some(i), Some(loads)) = (worker, LOADS.get()) {
            loads[i].0.fetch_add(1, Ordering::Relaxed);
        }
        Load(worker)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        if let (Some(i), Some(loads)) = (self.0, LOADS.get()) {
            loads[i].0.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The worker waiting for the others to take new connections, plus one;
/// 0 for none (see the module docs: at most one waits at a time).
static YIELDING: AtomicUsize = AtomicUsize::new(0);

/// The calling worker's turn at leaving new connections to the others;
/// ends when dropped.
#[derive(Debug)]
pub(crate) struct Yield(usize);

impl Drop for Yield {
    fn drop(&mut self) {
        let _ = YIELDING.compare_exchange(self.0 + 1, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Whether the calling worker should leave the next connection to the
/// others for [`ACCEPT_DEFER`]: it carries clearly more connections than
/// the least loaded other worker (more than twice its load plus 8), and no
/// other worker is already waiting. The turn lasts as long as the returned
/// [`Yield`]: hold it for the wait, drop it when accepting again.
///
/// Only a lopsided split qualifies: each deferral costs a timer and a
/// pause, and with a tighter rule the workers of a busy, churning VIP
/// took turns pausing (half the new connections per second, measured).
pub(crate) fn should_defer_accept() -> Option<Yield> {
    let (Some(me), Some(loads)) = (WORKER.get(), LOADS.get()) else {
        return None;
    };
    let mine = loads[me].0.load(Ordering::Relaxed);
    let least = loads
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != me)
        .map(|(_, l)| l.0.load(Ordering::Relaxed))
        .min()?;
    if !over_loaded(mine, least) {
        return None;
    }
    take_turn(me)
}

/// Worker `me`'s turn at waiting, unless another worker has it.
fn take_turn(me: usize) -> Option<Yield> {
    YIELDING
        .compare_exchange(0, me + 1, Ordering::AcqRel, Ordering::Relaxed)
        .ok()
        .map(|_| Yield(me))
}

fn over_loaded(mine: usize, least_other: usize) -> bool {
    mine > 2 * least_other + 8
}

/// Live connections per worker, for metrics and tests.
pub(crate) fn loads() -> Vec<usize> {
    LOADS
        .get()
        .map(|l| l.iter().map(|p| p.0.load(Ordering::Relaxed)).collect())
        .unwrap_or_default()
}

/// The default worker count: one per available core.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_defers_only_when_clearly_more_loaded() {
        assert!(!over_loaded(0, 0));
        assert!(!over_loaded(8, 0), "a few connections decide nothing");
        assert!(over_loaded(9, 0));
        assert!(!over_loaded(48, 20), "an uneven split is left alone");
        assert!(over_loaded(49, 20));
        assert!(!over_loaded(20, 49), "the less loaded worker never defers");
    }

    #[test]
    fn one_worker_waits_at_a_time() {
        let first = take_turn(0).expect("nobody waits yet");
        assert!(take_turn(1).is_none(), "a second worker never waits with the first");
        assert!(take_turn(0).is_none());
        drop(first);
        let second = take_turn(1).expect("the turn is free again");
        drop(second);
        assert!(take_turn(0).is_some());
    }
}
