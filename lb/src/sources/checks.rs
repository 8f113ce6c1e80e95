//! Active health checks from the balancer: one halo-health checker per
//! backend in the VIP's current table, started and stopped as the table
//! changes.
//!
//! The probing, the interval with jitter and the rise/fall hysteresis are
//! halo-health's ([`halo_health::checker`]); this module only decides which
//! backends are checked and carries each flip into the backend's live state
//! ([`BackendState::set_check_failing`]), an atomic flag every pick reads.
//! A flip therefore never rebuilds the table. How the states combine:
//!
//! - the backend source decides what is in the table (with Consul, the
//!   instances none of whose Consul checks is critical);
//! - an operator's disable keeps a backend listed but never picked (a table
//!   input, shown as `disabled`);
//! - a failing active check and a passive ejection both make a listed
//!   backend unavailable; picks skip it unless nothing else is left (panic
//!   mode), and zone-aware routing counts it as unhealthy.
//!
//! Checks start *up* (see [`crate::settings::ActiveCheckConfig`]). They
//! record no halo-health metrics of their own (a series per backend would
//! outlive the backend); `/metrics` renders `halo_backend_check_up` and
//! `halo_backend_check_flips_total` from the live tables instead.

use crate::settings::CheckSpec;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use halo_health::{CheckState, Prober, Status};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::balance::backend::BackendState;
use crate::balance::table::{Table, Vip};

/// The active checks of one VIP: a task that follows the VIP's tables and
/// keeps one checker per backend. Dropping it stops every checker.
#[derive(Debug)]
pub(crate) struct ActiveChecks {
    stop: CancellationToken,
}

impl ActiveChecks {
    /// Starts following `vip` on the current runtime. A VIP without
    /// `[vip.check]` costs one idle task, which starts checkers when a reload
    /// adds the section.
    pub(crate) fn spawn(vip: Arc<Vip>) -> ActiveChecks {
        let stop = CancellationToken::new();
        tokio::spawn(supervise(vip, stop.clone()));
        ActiveChecks { stop }
    }
}

impl Drop for ActiveChecks {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One running checker.
#[derive(Debug)]
struct Checker {
    /// The live state it reports into: a backend that leaves and comes back
    /// gets a new state, and so a new checker.
    state: Arc<BackendState>,
    spec: CheckSpec,
    stop: CancellationToken,
}

impl Checker {
    fn stop(&self) {
        self.stop.cancel();
        self.state.set_check(None);
    }
}

async fn supervise(vip: Arc<Vip>, stop: CancellationToken) {
    let mut tables = vip.subscribe();
    let prober = Prober::default();
    let mut running: HashMap<SocketAddr, Checker> = HashMap::new();
    loop {
        // Mark the version seen before loading the table, so a swap in
        // between wakes the next wait rather than being missed.
        tables.borrow_and_update();
        sync(&vip, &vip.table(), &mut running, &prober);
        tokio::select! {
            () = stop.cancelled() => break,
            changed = tables.changed() => if changed.is_err() { break },
        }
    }
    for checker in running.values() {
        checker.stop();
    }
}

/// Makes the running checkers match `table`: one per entry (disabled ones
/// too, so an operator sees their check before enabling them) when the
/// table's settings ask for checks, none otherwise.
fn sync(vip: &Vip, table: &Table, running: &mut HashMap<SocketAddr, Checker>, prober: &Prober) {
    let spec = table.settings.check.as_ref();
    let wanted: HashMap<SocketAddr, &Arc<BackendState>> = match spec {
        Some(_) => table.entries.iter().map(|e| (e.backend.addr, &e.state)).collect(),
        None => HashMap::new(),
    };
    running.retain(|addr, checker| {
        let keep = spec == Some(&checker.spec) && wanted.get(addr).is_some_and(|s| Arc::ptr_eq(s, &checker.state));
        if !keep {
            checker.stop();
        }
        keep
    });
    let Some(spec) = spec else { return };
    let mut started = 0;
    for (addr, state) in wanted {
        if running.contains_key(&addr) {
            continue;
        }
        let stop = CancellationToken::new();
        let handle = halo_health::spawn_unrecorded(spec.check_config(vip.name(), addr), prober.clone(), stop.clone());
        tokio::spawn(follow(Arc::clone(state), handle.subscribe(), stop.clone()));
        state.set_check(Some(handle));
        running.insert(
            addr,
            Checker {
                state: Arc::clone(state),
                spec: spec.clone(),
                stop,
            },
        );
        started += 1;
    }
    if started > 0 {
        tracing::info!(
            vip = vip.name(),
            started,
            checked = running.len(),
            "active checks started"
        );
    }
}

/// Carries a checker's flips into the backend's live state until stopped.
async fn follow(state: Arc<BackendState>, mut flips: watch::Receiver<CheckState>, stop: CancellationToken) {
    loop {
        tokio::select! {
            // Biased: once stopped, never write a verdict over the cleared
            // state (a restarted checker may already own it).
            biased;
            () = stop.cancelled() => return,
            changed = flips.changed() => if changed.is_err() { return },
        }
        let failing = flips.borrow_and_update().status == Status::Critical;
        if !stop.is_cancelled() {
            state.set_check_failing(failing);
        }
    }
}
