//! The data plane's threads: one single-threaded tokio runtime per core.
//!
//! Each worker accepts on its own registration of every VIP's listening
//! socket and serves the connections it accepts to the end on its own
//! thread, so a connection's reads and writes never hop between threads
//! (no cross-thread wake-ups on the per-byte path, no work stealing). The
//! control plane (admin API, signals, reloads, discovery) runs on the main
//! runtime.

use std::sync::Arc;

use tokio::runtime::Handle;

/// Handles on the worker runtimes; cloning shares them.
#[derive(Debug, Clone)]
pub(crate) struct Workers {
    handles: Arc<Vec<Handle>>,
}

impl Workers {
    /// Starts `n` worker threads (at least one), each running a
    /// single-threaded runtime until the process exits.
    pub(crate) fn start(n: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::new();
        for i in 0..n.max(1) {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("halo-worker-{i}"))
                .spawn(move || {
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
            let handle = rx
                .recv()
                .map_err(|_| std::io::Error::other(format!("worker {i} failed to start its runtime")))?;
            handles.push(handle);
        }
        Ok(Workers {
            handles: Arc::new(handles),
        })
    }

    /// The worker runtimes.
    pub(crate) fn handles(&self) -> &[Handle] {
        &self.handles
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

/// The default worker count: one per available core.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}
