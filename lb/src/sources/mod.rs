//! Sources: where a VIP's backends come from, and the balancer's own view
//! of their health.
//!
//! A VIP has exactly one [`BackendSource`]. A static list is applied once;
//! Consul ([`consul`]) and DNS ([`dns`]) are [`Source`]s, each driven by the
//! same loop ([`Discovery`]) with the same status ([`SourceStatus`]) and
//! metrics. A `Source` only says what it sees now; the loop owns the
//! rules every source shares:
//!
//! - **Fail static.** A failed answer ([`Answer::Failed`]) never touches the
//!   table: the last good one keeps serving, `/status` says why and
//!   `halo_discovery_up` drops to 0. A source that cannot tell "no
//!   instance" from "not allowed to see them" (Consul with ACLs) reports
//!   such an empty answer as failed, not as empty.
//! - **Swap on change only.** A good answer ([`Answer::Backends`]) reaches
//!   the VIP's builder only when the list differs from the last one, and the
//!   builder swaps only when the table would differ.
//! - **An empty good answer empties the table**: the source says every
//!   backend is down, and serving from a list it withdrew helps nobody.
//!
//! [`checks`] is the other kind of source: not of backends but of their
//! health, the balancer's own active checks, which flip a backend's live
//! state without a table rebuild.
//!
//! Everything here runs as tasks on the control runtime (the main thread).
//! Imports: `settings`, `balance`.

pub(crate) mod checks;
pub(crate) mod consul;
pub(crate) mod dns;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::balance::table::Vip;
use crate::settings::{Backend, BackendSource, ConsulSettings};

/// A discovery source: something that can be asked, again and again, which
/// backends a VIP has now.
pub(crate) trait Source: Send + 'static {
    /// Waits for the next answer (a blocking query returning, a refresh
    /// interval passing) and returns it. Cancel-safe: the loop drops the
    /// future when the VIP's discovery stops.
    fn next(&mut self) -> impl Future<Output = Answer> + Send;
}

/// One answer of a [`Source`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Answer {
    /// The backends the source lists now; empty means it says none is up.
    Backends {
        /// The backends, in any order.
        backends: Vec<Backend>,
        /// Entries left out because they cannot be used (an address that is
        /// not an IP, an SRV target without an address).
        skipped: usize,
        /// The source's own version of the answer (Consul's index).
        index: Option<u64>,
    },
    /// No answer that can be trusted: keep serving the last good table.
    Failed {
        /// Why, for `/status` and the log.
        error: String,
        /// The answer was an empty list that ACLs may have filtered.
        acl_filter_suspected: bool,
    },
}

/// What a VIP's discovery watches, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Watched {
    /// Consul's health view of a service.
    Consul {
        /// The service.
        service: String,
        /// The tag filter, if any.
        tag: Option<String>,
    },
    /// The SRV records of a name.
    Dns {
        /// The name looked up, fully qualified.
        name: String,
        /// The server asked, `ip:port`.
        server: String,
    },
}

/// The state of one VIP's discovery, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// What is watched; `source` is `"consul"` or `"dns"`.
    #[serde(flatten)]
    pub watched: Watched,
    /// Whether the last answer was good (false: serving the last good
    /// table).
    pub up: bool,
    /// The last error, while `up` is false.
    pub last_error: Option<String>,
    /// The last answer was empty while ACLs may be filtering it: the table
    /// before it keeps serving.
    pub acl_filter_suspected: bool,
    /// The source's version of the last good answer (Consul's index);
    /// `None` for DNS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// Backends in the last good answer.
    pub instances: usize,
    /// Entries of the last good answer that could not be used.
    pub skipped: usize,
    /// Unix seconds of the last change of `up`.
    pub since: u64,
    /// Unix seconds of the last good answer; `None` before the first.
    pub last_update: Option<u64>,
}

impl SourceStatus {
    /// `"consul"` or `"dns"`, for metrics and logs.
    fn kind(&self) -> &'static str {
        match self.watched {
            Watched::Consul { .. } => "consul",
            Watched::Dns { .. } => "dns",
        }
    }
}

/// A running discovery: a [`Source`] feeding one VIP. Dropping it stops it.
#[derive(Debug)]
pub(crate) struct Discovery {
    /// The source it was started for, to tell whether a reload changes it.
    source: BackendSource,
    status: Arc<Mutex<SourceStatus>>,
    stop: CancellationToken,
}

impl Discovery {
    /// Starts feeding `vip` from `source` on the current runtime. A static
    /// list is applied at once and needs no task (`None`); Consul uses
    /// `consul` (a client is made from it for this discovery alone, reading
    /// its ACL token from `token`, the process's shared cell).
    pub(crate) fn start(
        vip: &Arc<Vip>,
        source: &BackendSource,
        consul: &ConsulSettings,
        token: &halo_consul::Token,
    ) -> Result<Option<Discovery>, halo_consul::Error> {
        let started_for = source.clone();
        Ok(Some(match source {
            BackendSource::Static(backends) => {
                vip.set_backends(backends.clone());
                return Ok(None);
            }
            BackendSource::Consul(target) => {
                let source =
                    consul::ConsulSource::new(consul.client_sharing(token)?, target.clone(), consul.wait, vip.name());
                let watched = Watched::Consul {
                    service: target.service.clone(),
                    tag: target.tag.clone(),
                };
                Discovery::spawn(vip, source, started_for, watched, "no answer from Consul yet")
            }
            BackendSource::Dns(target) => {
                let source = dns::DnsSource::new(target.clone());
                let watched = Watched::Dns {
                    name: target.name.clone(),
                    server: target.server.to_string(),
                };
                Discovery::spawn(vip, source, started_for, watched, "no answer from the DNS server yet")
            }
        }))
    }

    fn spawn(
        vip: &Arc<Vip>,
        source: impl Source,
        started_for: BackendSource,
        watched: Watched,
        first: &str,
    ) -> Discovery {
        let status = Arc::new(Mutex::new(SourceStatus {
            watched,
            up: false,
            last_error: Some(first.to_owned()),
            acl_filter_suspected: false,
            index: None,
            instances: 0,
            skipped: 0,
            since: unix_now(),
            last_update: None,
        }));
        let stop = CancellationToken::new();
        tokio::spawn(run(Arc::clone(vip), source, Arc::clone(&status), stop.clone()));
        Discovery {
            source: started_for,
            status,
            stop,
        }
    }

    /// The source this discovery was started for.
    pub(crate) fn source(&self) -> &BackendSource {
        &self.source
    }

    /// A snapshot of the discovery state.
    pub(crate) fn status(&self) -> SourceStatus {
        self.status.lock().expect("discovery status poisoned").clone()
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Wall-clock seconds since the Unix epoch, for `/status`.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The one fail-static loop: asks `source` until `stop`, applies good
/// answers that changed something, keeps the last table on failures.
async fn run(vip: Arc<Vip>, mut source: impl Source, status: Arc<Mutex<SourceStatus>>, stop: CancellationToken) {
    let kind = status.lock().expect("discovery status poisoned").kind();
    let labels = [("vip", vip.name().to_owned()), ("source", kind.to_owned())];
    let up_gauge = metrics::gauge!("halo_discovery_up", &labels);
    let errors = metrics::counter!("halo_discovery_errors_total", &labels);
    let updates = metrics::counter!("halo_discovery_updates_total", &labels);
    up_gauge.set(0.0);
    let mut last: Option<Vec<Backend>> = None;
    loop {
        let answer = tokio::select! {
            () = stop.cancelled() => return,
            answer = source.next() => answer,
        };
        match answer {
            Answer::Backends {
                mut backends,
                skipped,
                index,
            } => {
                backends.sort();
                backends.dedup_by(|a, b| a.addr == b.addr);
                {
                    let mut s = status.lock().expect("discovery status poisoned");
                    if !s.up {
                        tracing::info!(vip = vip.name(), source = kind, "discovery is up");
                        s.since = unix_now();
                    }
                    // Once per change, not per answer.
                    if skipped != s.skipped && skipped > 0 {
                        tracing::warn!(
                            vip = vip.name(),
                            source = kind,
                            skipped,
                            "entries without a usable address; skipped"
                        );
                    }
                    s.up = true;
                    s.last_error = None;
                    s.acl_filter_suspected = false;
                    s.index = index;
                    s.instances = backends.len();
                    s.skipped = skipped;
                    s.last_update = Some(unix_now());
                }
                up_gauge.set(1.0);
                if last.as_ref() != Some(&backends) {
                    if backends.is_empty() {
                        tracing::warn!(
                            vip = vip.name(),
                            source = kind,
                            "the source lists no backend: the table is empty"
                        );
                    }
                    let set = backends.clone();
                    let swapped = vip
                        .rebuild_off_timing_threads(set.len(), move |vip| vip.set_backends(set))
                        .await;
                    match swapped {
                        Ok(true) => updates.increment(1),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(vip = vip.name(), error = %e, "the table rebuild failed; the previous table keeps serving")
                        }
                    }
                    last = Some(backends);
                }
            }
            Answer::Failed {
                error,
                acl_filter_suspected,
            } => {
                errors.increment(1);
                up_gauge.set(0.0);
                let mut s = status.lock().expect("discovery status poisoned");
                // Once per outage (and once more if its kind changes), not
                // per failed answer.
                if s.up || s.acl_filter_suspected != acl_filter_suspected {
                    tracing::warn!(vip = vip.name(), source = kind, %error, "discovery failed; serving the last good table");
                }
                if s.up {
                    s.since = unix_now();
                }
                s.up = false;
                s.acl_filter_suspected = acl_filter_suspected;
                s.last_error = Some(error);
            }
        }
    }
}
