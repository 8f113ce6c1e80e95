//! Consul discovery: the passing instances of a service become a VIP's
//! backends.
//!
//! One task per VIP long-polls `/v1/health/service/<service>?passing`
//! through [`halo_consul::Watch`] (index rules, rate limit, back-off). An
//! answer becomes a backend list (address, port, weight by check state, the
//! `zone` from the service meta); the VIP's builder swaps a new table only
//! when that list differs from the current one, so an index that moves for
//! unrelated reasons changes nothing.
//!
//! Fail static: when Consul cannot be reached or has no leader, the last good
//! table keeps serving; `/status` and `halo_discovery_up` say the view is
//! stale. An error never empties a table. (A successful answer with no
//! passing instance does: that is Consul saying every backend is down.)

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use halo_consul::{CheckStatus, Client, HealthQuery, ServiceEntry, Watch};
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::table::Vip;

/// Default longest wait of one blocking query.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// What a VIP's discovery is watching.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Consul service name.
    pub service: String,
    /// Only instances with this tag.
    pub tag: Option<String>,
}

/// The state of one VIP's discovery, for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiscoveryStatus {
    /// Always `"consul"` (DNS discovery reports `"dns"`).
    pub source: &'static str,
    /// The service watched.
    pub service: String,
    /// The tag filter, if any.
    pub tag: Option<String>,
    /// Whether the last query succeeded (false: serving the last good table).
    pub up: bool,
    /// The last error, while `up` is false.
    pub last_error: Option<String>,
    /// Consul index of the last good answer.
    pub index: u64,
    /// Passing instances in the last good answer.
    pub instances: usize,
    /// Instances skipped because their address is not an IP.
    pub skipped: usize,
    /// Unix seconds of the last change of `up`.
    pub since: u64,
    /// Unix seconds of the last good answer; `None` before the first.
    pub last_update: Option<u64>,
}

/// A running discovery task.
#[derive(Debug)]
pub struct Discovery {
    /// What it watches.
    pub target: Target,
    status: Arc<Mutex<DiscoveryStatus>>,
    stop: CancellationToken,
}

impl Discovery {
    /// Starts watching `target` for `vip` on the current runtime.
    pub fn spawn(client: Client, vip: Arc<Vip>, target: Target, wait: Duration) -> Discovery {
        let status = Arc::new(Mutex::new(DiscoveryStatus {
            source: "consul",
            service: target.service.clone(),
            tag: target.tag.clone(),
            up: false,
            last_error: Some("no answer from Consul yet".into()),
            index: 0,
            instances: 0,
            skipped: 0,
            since: unix_now(),
            last_update: None,
        }));
        let stop = CancellationToken::new();
        tokio::spawn(run(
            client,
            vip,
            target.clone(),
            wait,
            Arc::clone(&status),
            stop.clone(),
        ));
        Discovery { target, status, stop }
    }

    /// A snapshot of the discovery state.
    pub fn status(&self) -> DiscoveryStatus {
        self.status.lock().expect("discovery status poisoned").clone()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Wall-clock seconds since the Unix epoch, for discovery status.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn run(
    client: Client,
    vip: Arc<Vip>,
    target: Target,
    wait: Duration,
    status: Arc<Mutex<DiscoveryStatus>>,
    stop: CancellationToken,
) {
    let labels = [("vip", vip.name().to_owned()), ("source", "consul".to_owned())];
    let up_gauge = metrics::gauge!("halo_discovery_up", &labels);
    let errors = metrics::counter!("halo_discovery_errors_total", &labels);
    let updates = metrics::counter!("halo_discovery_updates_total", &labels);
    up_gauge.set(0.0);
    let mut watch = Watch::new(wait);
    let mut last: Option<Vec<Backend>> = None;
    let query = HealthQuery {
        passing: true,
        tag: target.tag.as_deref(),
        filter: None,
    };
    loop {
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            answer = watch.next(|o| client.health_service(&target.service, query, o)) => answer,
        };
        match answer {
            Ok(answer) => {
                let (backends, skipped) = backends_of(&answer.value);
                {
                    let mut s = status.lock().expect("discovery status poisoned");
                    if !s.up {
                        tracing::info!(vip = vip.name(), service = %target.service, "consul discovery is up");
                        s.since = unix_now();
                    }
                    s.up = true;
                    s.last_error = None;
                    s.index = answer.meta.index;
                    s.instances = backends.len();
                    s.skipped = skipped;
                    s.last_update = Some(unix_now());
                }
                up_gauge.set(1.0);
                if last.as_ref() != Some(&backends) {
                    if backends.is_empty() {
                        tracing::warn!(vip = vip.name(), service = %target.service, "consul reports no passing instance");
                    }
                    if vip.set_backends(backends.clone()) {
                        updates.increment(1);
                    }
                    last = Some(backends);
                }
            }
            Err(e) => {
                errors.increment(1);
                up_gauge.set(0.0);
                let mut s = status.lock().expect("discovery status poisoned");
                if s.up {
                    tracing::warn!(vip = vip.name(), service = %target.service, error = %e, "consul unreachable; serving the last good table");
                    s.since = unix_now();
                }
                s.up = false;
                s.last_error = Some(e.to_string());
            }
        }
    }
}

/// The backends an answer describes, sorted, and how many instances were
/// skipped (an address that is not an IP: this path does not resolve names).
pub fn backends_of(entries: &[ServiceEntry]) -> (Vec<Backend>, usize) {
    let mut skipped = 0;
    let mut backends: Vec<Backend> = entries
        .iter()
        .filter_map(|e| {
            let Ok(ip) = e.address().parse::<IpAddr>() else {
                skipped += 1;
                tracing::warn!(instance = %e.service.id, address = e.address(), "instance address is not an IP; skipped");
                return None;
            };
            let weights = e.service.weights;
            let weight = match e.aggregate_status() {
                CheckStatus::Warning => weights.warning,
                _ => weights.passing,
            };
            Some(Backend {
                addr: SocketAddr::new(ip, e.service.port),
                weight: weight.clamp(1, 1000),
                zone: e.service.meta.get("zone").cloned(),
            })
        })
        .collect();
    backends.sort();
    backends.dedup_by(|a, b| a.addr == b.addr);
    (backends, skipped)
}
