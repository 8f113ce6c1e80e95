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
//! stale. An error never empties a table, and neither does an answer that
//! is not a list (`null`, garbage: halo-consul refuses those). A successful
//! empty answer empties it (Consul saying every backend is down) unless ACLs
//! may be hiding the instances: Consul 1.8 answers `200 []` to a token
//! without `service:read` and `node:read`, exactly like "no instance". So
//! at start the task asks who its token is (`/v1/acl/token/self`, logged),
//! and an empty answer while ACLs are on (or their state is unknown) keeps
//! the last table, with `/status` saying why.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use halo_consul::{CheckStatus, Client, HealthQuery, QueryMeta, ServiceEntry, TokenStatus, Watch};
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
    /// The last answer was empty while ACLs may be filtering it: the table
    /// before it keeps serving.
    pub acl_filter_suspected: bool,
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
            acl_filter_suspected: false,
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
    let mut token = token_status(&client, vip.name()).await;
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
            Ok(answer) if answer.value.is_empty() && may_be_acl_filter(&answer.meta, &token) => {
                // Ask again: the token may have changed, or ACLs been turned
                // off, since the last look.
                token = token_status(&client, vip.name()).await;
                if !may_be_acl_filter(&answer.meta, &token) {
                    watch_empty(&vip, &target, &status, &mut last, &updates, answer.meta.index);
                    up_gauge.set(1.0);
                    continue;
                }
                errors.increment(1);
                up_gauge.set(0.0);
                let token = token.as_ref().map_or_else(|| "unknown".to_owned(), ToString::to_string);
                let why = format!(
                    "Consul listed no instance of {:?}; with ACLs on (token: {token}) that is also what a token without service:read and node:read sees, so the last table keeps serving",
                    target.service
                );
                let mut s = status.lock().expect("discovery status poisoned");
                if s.up || s.last_error.as_deref() != Some(why.as_str()) {
                    tracing::warn!(vip = vip.name(), service = %target.service, "{why}");
                    s.since = unix_now();
                }
                s.up = false;
                s.acl_filter_suspected = true;
                s.last_error = Some(why);
            }
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
                    s.acl_filter_suspected = false;
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

/// Who the client's token is, logged; `None` if Consul could not say.
async fn token_status(client: &Client, vip: &str) -> Option<TokenStatus> {
    match client.acl_token_self().await {
        Ok(status @ TokenStatus::NotFound { .. }) => {
            tracing::error!(vip, token = %status, "Consul does not know our token: every read is filtered as for an anonymous client");
            Some(status)
        }
        Ok(status) => {
            tracing::debug!(vip, token = %status, "consul token");
            Some(status)
        }
        Err(e) => {
            tracing::debug!(vip, error = %e, "cannot ask Consul about our token");
            None
        }
    }
}

/// Whether an empty answer may be ACL filtering rather than no instance:
/// Consul said it filtered, or ACLs are on (or we could not learn whether).
fn may_be_acl_filter(meta: &QueryMeta, token: &Option<TokenStatus>) -> bool {
    meta.results_filtered_by_acls || token.as_ref().is_none_or(TokenStatus::acls_enabled)
}

/// Applies an empty answer with ACLs known to be off: every backend is down.
fn watch_empty(
    vip: &Vip,
    target: &Target,
    status: &Mutex<DiscoveryStatus>,
    last: &mut Option<Vec<Backend>>,
    updates: &metrics::Counter,
    index: u64,
) {
    {
        let mut s = status.lock().expect("discovery status poisoned");
        if !s.up {
            s.since = unix_now();
        }
        s.up = true;
        s.last_error = None;
        s.acl_filter_suspected = false;
        s.index = index;
        s.instances = 0;
        s.skipped = 0;
        s.last_update = Some(unix_now());
    }
    if last.as_ref().is_none_or(|l| !l.is_empty()) {
        tracing::warn!(vip = vip.name(), service = %target.service, "consul reports no passing instance");
        if vip.set_backends(Vec::new()) {
            updates.increment(1);
        }
        *last = Some(Vec::new());
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
