//! Backend tables: one immutable snapshot per VIP, published through a single
//! `ArcSwap`, and the builder that makes new ones off the data path.
//!
//! A [`Table`] holds everything a connection needs to pick a backend: the
//! backends, their shared live state, the selector's precomputed state and
//! the VIP's settings. Readers load it with one atomic operation and can
//! never see half an update. Writers (config reload, discovery, the admin
//! API) go through [`Vip`]'s builder lock, rebuild, and swap only when the
//! result differs from what is published.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant as StdInstant;

use arc_swap::ArcSwap;
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::balance::backend::{Backend, BackendState, Entry};
use crate::balance::selection::{self, PickContext, Selector, SelectorError};
use crate::balance::zone::{ZoneRouting, ZoneStatus};
use crate::settings::VipSettings;

/// An immutable backend table.
#[derive(Debug)]
pub struct Table {
    /// Rises by one with every published table of this VIP.
    pub(crate) version: u64,
    /// Settings in force for connections picked from this table.
    pub(crate) settings: Arc<VipSettings>,
    /// Every backend, sorted by address, disabled ones included.
    pub(crate) entries: Vec<Entry>,
    /// Indices of entries that may be picked.
    selectable: Vec<u32>,
    selector: Selector,
    /// The local-zone subset, when the VIP routes zone-aware.
    zone: Option<ZoneRouting>,
    /// Whether most backends are IPv4 (true for an empty table).
    mostly_v4: bool,
}

impl Table {
    /// Builds a table (version 0; the publisher numbers it). `previous` is
    /// the published table, which selectors may update from instead of
    /// building afresh (Maglev does).
    pub(crate) fn build(
        settings: Arc<VipSettings>,
        entries: Vec<Entry>,
        previous: Option<&Table>,
    ) -> Result<Table, SelectorError> {
        let selectable: Vec<u32> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.disabled)
            .map(|(i, _)| u32::try_from(i).expect("fewer than 2^32 backends"))
            .collect();
        let selector = Selector::build(settings.algorithm, &entries, &selectable, previous.map(|p| &p.selector))?;
        let zone = settings
            .zone
            .as_ref()
            .map(|policy| {
                let previous = previous.and_then(|p| p.zone.as_ref().map(ZoneRouting::selector));
                ZoneRouting::build(policy, settings.algorithm, &entries, previous)
            })
            .transpose()?;
        let v4 = entries.iter().filter(|e| e.backend.addr.is_ipv4()).count();
        Ok(Table {
            version: 0,
            mostly_v4: v4 * 2 >= entries.len(),
            settings,
            entries,
            selectable,
            selector,
            zone,
        })
    }

    /// Picks a backend for a connection; `None` when every selectable
    /// backend is in `ctx.tried` (or there are none). Zone-aware VIPs pick
    /// among available local backends while enough are healthy, and fall
    /// back to every zone (panic mode included) when none of those is left
    /// untried.
    pub(crate) fn pick(&self, ctx: &PickContext<'_>) -> Option<usize> {
        if let Some(zone) = &self.zone {
            if zone.routes_locally(&self.entries, ctx.now) {
                let local = selection::pick_available(zone.selector(), &self.entries, zone.selectable(), ctx);
                if local.is_some() {
                    return local;
                }
            }
        }
        selection::pick(&self.selector, &self.entries, &self.selectable, ctx)
    }

    /// Where picks go at `now`; `None` unless the VIP routes zone-aware.
    pub(crate) fn zone_status(&self, now: Instant) -> Option<ZoneStatus> {
        self.zone.as_ref().map(|z| z.status(&self.entries, now))
    }

    /// Whether most backends are IPv4: the family of the backend socket an
    /// accept loop makes before it accepts.
    pub(crate) fn mostly_v4(&self) -> bool {
        self.mostly_v4
    }

    /// The Maglev lookup table's size, and how many of its slots each
    /// selectable backend owns (its share of clients), in entry order;
    /// `None` unless the VIP uses Maglev.
    pub fn maglev_slots(&self) -> Option<(usize, Vec<(SocketAddr, usize)>)> {
        let Selector::Maglev(table) = &self.selector else {
            return None;
        };
        let slots = table.slots_by_entry(self.entries.len());
        let owned = self
            .selectable
            .iter()
            .map(|&i| (self.entries[i as usize].backend.addr, slots[i as usize]))
            .collect();
        Some((table.len(), owned))
    }

    /// The backend a new connection from `client` would be sent to now (no
    /// backend tried yet), as the accept path picks it; round robin starts
    /// from a fresh position, so this is meant for the deterministic
    /// algorithms (Maglev) and for benchmarks.
    pub fn route(&self, client: SocketAddr) -> Option<SocketAddr> {
        let cursor = AtomicUsize::new(0);
        let ctx = PickContext {
            client,
            cursor: &cursor,
            now: Instant::now(),
            tried: &[],
            by_port: false,
        };
        self.pick(&ctx).map(|i| self.entries[i].backend.addr)
    }

    /// Number of backends that may be picked.
    pub(crate) fn selectable_len(&self) -> usize {
        self.selectable.len()
    }

    /// The inputs this table was built from, to tell whether a rebuild would
    /// change anything.
    fn inputs(&self) -> (Vec<(Backend, bool)>, &VipSettings) {
        (
            self.entries.iter().map(|e| (e.backend.clone(), e.disabled)).collect(),
            &self.settings,
        )
    }
}

/// What the builder keeps between rebuilds.
#[derive(Debug)]
struct BuilderState {
    settings: Arc<VipSettings>,
    /// The current backend set, from config or discovery.
    backends: Vec<Backend>,
    /// Addresses an operator disabled; kept across reloads and discovery.
    disabled: BTreeSet<SocketAddr>,
    /// Live state by address, reused by every table that lists the address.
    states: HashMap<SocketAddr, Arc<BackendState>>,
}

/// A VIP at run time: its published table and everything that outlives one.
#[derive(Debug)]
pub struct Vip {
    name: String,
    table: ArcSwap<Table>,
    builder: Mutex<BuilderState>,
    /// Round-robin position; survives swaps.
    cursor: AtomicUsize,
    /// Connection slots taken: live connections plus at most one
    /// reservation per accepting worker. The limit is enforced on this.
    slots: AtomicUsize,
    /// Live (accepted) client connections.
    active: AtomicUsize,
    /// Wakes accept loops waiting at the limit when a slot frees.
    slot_freed: Notify,
    next_version: AtomicU64,
    metrics: VipMetrics,
    /// Why the last rebuild failed, while the table before it keeps serving;
    /// `None` once a rebuild succeeds.
    build_error: Mutex<Option<String>>,
    /// The version of every published table, for tasks that follow the
    /// table (active checks).
    published: watch::Sender<u64>,
}

/// Per-VIP metric handles, registered once.
#[derive(Debug)]
pub(crate) struct VipMetrics {
    /// Accepted client connections.
    pub(crate) connections: Counter,
    /// Live client connections.
    pub(crate) active: Gauge,
    /// Bytes from clients to backends.
    pub(crate) bytes_in: Counter,
    /// Bytes from backends to clients.
    pub(crate) bytes_out: Counter,
    /// Failed backend connects.
    pub(crate) connect_failures: Counter,
    /// Connects retried on another backend.
    pub(crate) retries: Counter,
    /// Client connections closed because no backend could be reached.
    pub(crate) no_backend: Counter,
    /// Client connections closed because the process stayed out of local
    /// resources (descriptors, ports) for too long.
    pub(crate) local_resource_closes: Counter,
    /// Client connections accepted past the HA lease and closed unserved.
    pub(crate) lease_refusals: Counter,
    /// Connections closed by the idle timeout.
    pub(crate) idle_timeouts: Counter,
    /// Times accepting paused at the connection limit.
    pub(crate) limit_reached: Counter,
    /// Published table version.
    pub(crate) table_version: Gauge,
    /// Tables swapped in.
    pub(crate) swaps: Counter,
    /// Time to build a table.
    pub(crate) build_seconds: Histogram,
    /// Backends that may be picked.
    pub(crate) selectable: Gauge,
    /// Rebuilds that failed (the previous table kept serving).
    pub(crate) build_errors: Counter,
}

impl VipMetrics {
    fn new(vip: &str) -> Self {
        let l = [("vip", vip.to_owned())];
        VipMetrics {
            connections: metrics::counter!("halo_vip_connections_total", &l),
            active: metrics::gauge!("halo_vip_active_connections", &l),
            bytes_in: metrics::counter!(
                "halo_vip_bytes_total",
                &[("vip", vip.to_owned()), ("direction", "in".to_owned())]
            ),
            bytes_out: metrics::counter!(
                "halo_vip_bytes_total",
                &[("vip", vip.to_owned()), ("direction", "out".to_owned())]
            ),
            connect_failures: metrics::counter!("halo_vip_connect_failures_total", &l),
            retries: metrics::counter!("halo_vip_retries_total", &l),
            no_backend: metrics::counter!("halo_vip_no_backend_total", &l),
            local_resource_closes: metrics::counter!("halo_vip_local_resource_closes_total", &l),
            lease_refusals: metrics::counter!("halo_vip_lease_refusals_total", &l),
            idle_timeouts: metrics::counter!("halo_vip_idle_timeouts_total", &l),
            limit_reached: metrics::counter!("halo_vip_connection_limit_reached_total", &l),
            table_version: metrics::gauge!("halo_table_version", &l),
            swaps: metrics::counter!("halo_table_swaps_total", &l),
            build_seconds: metrics::histogram!("halo_table_build_seconds", &l),
            selectable: metrics::gauge!("halo_table_selectable_backends", &l),
            build_errors: metrics::counter!("halo_table_build_errors_total", &l),
        }
    }
}

/// Why an admin change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AdminError {
    /// The address is not a backend of this VIP.
    #[error("{0} is not a backend of this vip")]
    UnknownBackend(SocketAddr),
}

impl Vip {
    /// A VIP with its first table.
    pub fn new(name: &str, settings: VipSettings, backends: Vec<Backend>) -> Arc<Vip> {
        let builder = BuilderState {
            settings: Arc::new(settings),
            backends: Vec::new(),
            disabled: BTreeSet::new(),
            states: HashMap::new(),
        };
        let metrics = VipMetrics::new(name);
        let empty =
            Table::build(Arc::clone(&builder.settings), Vec::new(), None).expect("an empty table always builds");
        let vip = Arc::new(Vip {
            name: name.to_owned(),
            table: ArcSwap::from_pointee(empty),
            builder: Mutex::new(builder),
            cursor: AtomicUsize::new(0),
            slots: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            slot_freed: Notify::new(),
            next_version: AtomicU64::new(1),
            metrics,
            build_error: Mutex::new(None),
            published: watch::Sender::new(0),
        });
        vip.set_backends(backends);
        vip
    }

    /// The VIP's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The published table. Hold it for a whole connection set-up; it stays
    /// valid (and unchanged) however many swaps happen meanwhile.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Why the last rebuild failed, if it did (the table before it serves).
    pub(crate) fn build_error(&self) -> Option<String> {
        self.build_error.lock().expect("build_error lock poisoned").clone()
    }

    /// Whether most backends of the published table are IPv4, without
    /// taking a reference on the table (the accept loop asks per accept).
    pub(crate) fn mostly_v4(&self) -> bool {
        self.table.load().mostly_v4()
    }

    /// The round-robin cursor.
    pub(crate) fn cursor(&self) -> &AtomicUsize {
        &self.cursor
    }

    /// Metric handles.
    pub(crate) fn metrics(&self) -> &VipMetrics {
        &self.metrics
    }

    /// Wakes on every published table (its version); read the table itself
    /// with [`Vip::table`].
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Replaces the backend set; rebuilds and swaps only if it changed.
    /// Returns whether a new table was published.
    pub fn set_backends(&self, mut backends: Vec<Backend>) -> bool {
        backends.sort();
        backends.dedup_by(|a, b| a.addr == b.addr);
        let mut b = self.builder.lock().expect("builder lock poisoned");
        b.backends = backends;
        self.rebuild(&mut b)
    }

    /// Runs `rebuild` (one of the rebuilding setters) where it belongs.
    ///
    /// A long rebuild (a millisecond or more: Maglev's lookup table, or
    /// more than a thousand backends before or after) runs on a blocking
    /// thread, never on the caller's runtime, which also times health
    /// checks and answers the admin API. A short one (microseconds) runs
    /// inline: a hand-off to another thread and back would cost more.
    /// `Err` only if the rebuild panicked; the published table then keeps
    /// serving.
    pub(crate) async fn rebuild_off_timing_threads<R: Send + 'static>(
        self: &Arc<Self>,
        backends_after: usize,
        rebuild: impl FnOnce(&Vip) -> R + Send + 'static,
    ) -> Result<R, tokio::task::JoinError> {
        let heavy = {
            let table = self.table.load();
            table.settings.algorithm == crate::settings::Algorithm::Maglev
                || table.entries.len().max(backends_after) > 1_000
        };
        if !heavy {
            return Ok(rebuild(self));
        }
        let vip = Arc::clone(self);
        tokio::task::spawn_blocking(move || rebuild(&vip)).await
    }

    /// Replaces the settings (a reload); rebuilds if they changed.
    pub(crate) fn set_settings(&self, settings: VipSettings) -> bool {
        let mut b = self.builder.lock().expect("builder lock poisoned");
        if *b.settings == settings {
            return false;
        }
        b.settings = Arc::new(settings);
        let swapped = self.rebuild(&mut b);
        // A raised max_connections must wake accept loops paused at the old one.
        self.slot_freed.notify_waiters();
        swapped
    }

    /// Disables (or re-enables) a backend by hand. The choice survives
    /// reloads and discovery updates until undone.
    pub(crate) fn set_disabled(&self, addr: SocketAddr, disabled: bool) -> Result<bool, AdminError> {
        let mut b = self.builder.lock().expect("builder lock poisoned");
        if !b.backends.iter().any(|x| x.addr == addr) {
            return Err(AdminError::UnknownBackend(addr));
        }
        if disabled {
            b.disabled.insert(addr);
        } else {
            b.disabled.remove(&addr);
        }
        Ok(self.rebuild(&mut b))
    }

    fn rebuild(&self, b: &mut BuilderState) -> bool {
        let started = StdInstant::now();
        let current = self.table.load();
        let unchanged = {
            let (entries, settings) = current.inputs();
            *settings == *b.settings
                && entries.len() == b.backends.len()
                && entries
                    .iter()
                    .zip(&b.backends)
                    .all(|((e, dis), n)| e == n && *dis == b.disabled.contains(&n.addr))
        };
        if unchanged && current.version != 0 {
            return false;
        }
        // Keep live state for addresses that stay; forget the rest (tables
        // and connections still holding them keep them alive).
        let keep: BTreeSet<SocketAddr> = b.backends.iter().map(|x| x.addr).collect();
        b.states.retain(|addr, _| keep.contains(addr));
        let entries: Vec<Entry> = b
            .backends
            .iter()
            .map(|backend| Entry {
                state: Arc::clone(
                    b.states
                        .entry(backend.addr)
                        .or_insert_with(|| Arc::new(BackendState::new(backend.addr))),
                ),
                disabled: b.disabled.contains(&backend.addr),
                backend: backend.clone(),
            })
            .collect();
        let mut table = match Table::build(Arc::clone(&b.settings), entries, Some(&current)) {
            Ok(table) => table,
            Err(e) => {
                // Fail static: the published table keeps serving.
                self.metrics.build_errors.increment(1);
                tracing::error!(vip = %self.name, backends = b.backends.len(), error = %e, "cannot build a backend table; the previous one keeps serving");
                *self.build_error.lock().expect("build_error lock poisoned") = Some(e.to_string());
                return false;
            }
        };
        *self.build_error.lock().expect("build_error lock poisoned") = None;
        table.version = self.next_version.fetch_add(1, Ordering::Relaxed);
        let version = table.version;
        let selectable = table.selectable_len();
        self.table.store(Arc::new(table));
        self.published.send_replace(version);
        let took = started.elapsed();
        self.metrics.swaps.increment(1);
        self.metrics.table_version.set(version as f64);
        self.metrics.build_seconds.record(took.as_secs_f64());
        self.metrics.selectable.set(selectable as f64);
        tracing::info!(vip = %self.name, version, backends = b.backends.len(), selectable, ?took, "backend table swapped");
        true
    }

    /// Live client connections.
    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Takes a connection slot, waiting while the VIP is at its limit. Each
    /// worker reserves a slot before it accepts, so several workers can never
    /// together accept past the limit.
    pub(crate) async fn reserve_slot(self: &Arc<Self>) -> ClientSlot {
        let mut counted = false;
        loop {
            let notified = self.slot_freed.notified();
            if let Some(slot) = self.try_reserve_slot() {
                return slot;
            }
            if !counted {
                counted = true;
                self.limit_reached();
            }
            notified.await;
        }
    }

    /// Takes a connection slot if the VIP is below its limit.
    pub(crate) fn try_reserve_slot(self: &Arc<Self>) -> Option<ClientSlot> {
        let limit = self.table.load().settings.max_connections;
        let mut taken = self.slots.load(Ordering::Acquire);
        while taken < limit {
            match self
                .slots
                .compare_exchange_weak(taken, taken + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(ClientSlot {
                        vip: Arc::clone(self),
                        accepted: false,
                    })
                }
                Err(now) => taken = now,
            }
        }
        None
    }

    /// Counts and logs an accept loop pausing at the connection limit (once
    /// per pause).
    pub(crate) fn limit_reached(&self) {
        let limit = self.table.load().settings.max_connections;
        self.metrics.limit_reached.increment(1);
        tracing::warn!(vip = %self.name, limit, "connection limit reached; accepting paused");
    }

    /// Now, for ejection decisions.
    pub(crate) fn now() -> Instant {
        Instant::now()
    }
}

/// A connection slot of a VIP: reserved before accepting, then held by the
/// accepted connection until it ends.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    vip: Arc<Vip>,
    accepted: bool,
}

impl ClientSlot {
    /// The reservation now belongs to an accepted connection.
    pub(crate) fn accepted(&mut self) {
        if !self.accepted {
            self.accepted = true;
            self.vip.active.fetch_add(1, Ordering::Relaxed);
            self.vip.metrics.connections.increment(1);
            self.vip.metrics.active.increment(1.0);
        }
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if self.accepted {
            self.vip.active.fetch_sub(1, Ordering::Relaxed);
            self.vip.metrics.active.decrement(1.0);
        }
        self.vip.slots.fetch_sub(1, Ordering::AcqRel);
        self.vip.slot_freed.notify_waiters();
    }
}
