//! DNS discovery: the SRV records of a name become a VIP's backends.
//!
//! One task per VIP asks the configured server (normally a Consul agent's
//! DNS interface) for the SRV records of the name on an interval. Each
//! record gives a port, a weight and a target; the target's addresses come
//! from the answer's additional section (where Consul puts them) or, for
//! targets it lacks, from A then AAAA lookups. Only the records of the
//! lowest SRV priority are used, as RFC 2782 asks (Consul gives all the
//! same priority). The VIP's builder swaps a new table only when the
//! resulting backend list changed.
//!
//! Transport: always TCP, on a fresh connection per refresh. Consul cuts
//! large UDP answers to a few records without setting the TC bit, so over
//! UDP a cut answer looks complete and the table would churn between random
//! subsets; and servers close idle TCP connections (Consul after a few
//! seconds), so a kept connection would fail the first query after each
//! close. One connect per interval costs nothing.
//!
//! Fail static, as Consul discovery ([`crate::discovery`]): a timeout, a
//! refused connection or a server failure (SERVFAIL, REFUSED, …) keeps the
//! last good table and shows in `/status` and `halo_discovery_up`. An
//! answer that the name has no records (NXDOMAIN, or NOERROR with no SRV
//! record) is a real answer and empties the table: it is how Consul's DNS
//! says that no instance passes, just as an empty `?passing` list is.
//! Consul's DNS leaves out critical instances but, unlike `?passing`, keeps
//! those in warning (its `only_passing` setting changes that). DNS answers
//! carry no zone, so these backends never count as local to the
//! balancer's zone.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverOpts};
use hickory_resolver::name_server::{NameServerPool, TokioConnectionProvider};
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::proto::xfer::{DnsHandle, DnsRequestOptions, DnsResponse, FirstAnswer, Protocol};
use hickory_resolver::proto::{ProtoError, ProtoErrorKind};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::DnsConfig;
use crate::table::Vip;

/// A validated `dns = { ... }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    /// The name looked up, fully qualified (with the final dot).
    pub name: String,
    /// The DNS server.
    pub server: SocketAddr,
    /// Time between lookups.
    pub interval: Duration,
    /// Deadline of one refresh.
    pub timeout: Duration,
}

impl DnsTarget {
    /// Validates `c`, pushing each problem (named under `at`) to `problems`.
    pub fn from_config(c: &DnsConfig, at: &str, problems: &mut Vec<String>) -> Option<DnsTarget> {
        let before = problems.len();
        let name = if c.name.ends_with('.') {
            c.name.clone()
        } else {
            format!("{}.", c.name)
        };
        let labels_ok = name.len() <= 254
            && name.trim_end_matches('.').split('.').all(|l| {
                (1..=63).contains(&l.len()) && l.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
            });
        if !labels_ok || Name::from_ascii(&name).is_err() {
            problems.push(format!(
                "{at}.name: {:?} is not a DNS name like \"web.service.consul\"",
                c.name
            ));
        }
        let server = c.server.parse::<SocketAddr>();
        if server.is_err() {
            problems.push(format!("{at}.server: {:?} is not an ip:port address", c.server));
        }
        if c.interval.is_zero() {
            problems.push(format!("{at}.interval: must be above zero"));
        }
        if c.timeout.is_zero() {
            problems.push(format!("{at}.timeout: must be above zero"));
        }
        (problems.len() == before).then(|| DnsTarget {
            name,
            server: server.expect("checked above"),
            interval: c.interval,
            timeout: c.timeout,
        })
    }
}

/// The state of one VIP's DNS discovery, for `/status`: the fields of
/// Consul discovery's status where they mean the same.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DnsStatus {
    /// Always `"dns"`.
    pub source: &'static str,
    /// The name looked up.
    pub name: String,
    /// The server asked.
    pub server: String,
    /// Whether the last refresh succeeded (false: serving the last good
    /// table).
    pub up: bool,
    /// The last error, while `up` is false.
    pub last_error: Option<String>,
    /// Backends in the last good answer.
    pub instances: usize,
    /// SRV records skipped because their target has no address.
    pub skipped: usize,
    /// Unix seconds of the last change of `up`.
    pub since: u64,
    /// Unix seconds of the last good answer; `None` before the first.
    pub last_update: Option<u64>,
}

/// Why a refresh failed.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The server could not be reached or answered with a failure.
    #[error("DNS server {server}: {source}")]
    Lookup {
        /// The server asked.
        server: SocketAddr,
        /// What went wrong.
        source: ProtoError,
    },
    /// The refresh took longer than its deadline.
    #[error("DNS server {server}: no answer within {timeout:?}")]
    Timeout {
        /// The server asked.
        server: SocketAddr,
        /// The deadline.
        timeout: Duration,
    },
}

/// A running DNS discovery task.
#[derive(Debug)]
pub struct DnsDiscovery {
    /// What it looks up.
    pub target: DnsTarget,
    status: Arc<Mutex<DnsStatus>>,
    stop: CancellationToken,
}

impl DnsDiscovery {
    /// Starts refreshing `vip` from `target` on the current runtime.
    pub fn spawn(vip: Arc<Vip>, target: DnsTarget) -> DnsDiscovery {
        let status = Arc::new(Mutex::new(DnsStatus {
            source: "dns",
            name: target.name.clone(),
            server: target.server.to_string(),
            up: false,
            last_error: Some("no answer from the DNS server yet".into()),
            instances: 0,
            skipped: 0,
            since: crate::discovery::unix_now(),
            last_update: None,
        }));
        let stop = CancellationToken::new();
        tokio::spawn(run(vip, target.clone(), Arc::clone(&status), stop.clone()));
        DnsDiscovery { target, status, stop }
    }

    /// A snapshot of the discovery state.
    pub fn status(&self) -> DnsStatus {
        self.status.lock().expect("dns status poisoned").clone()
    }
}

impl Drop for DnsDiscovery {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run(vip: Arc<Vip>, target: DnsTarget, status: Arc<Mutex<DnsStatus>>, stop: CancellationToken) {
    let labels = [("vip", vip.name().to_owned()), ("source", "dns".to_owned())];
    let up_gauge = metrics::gauge!("halo_discovery_up", &labels);
    let errors = metrics::counter!("halo_discovery_errors_total", &labels);
    let updates = metrics::counter!("halo_discovery_updates_total", &labels);
    up_gauge.set(0.0);
    let name = Name::from_ascii(&target.name).expect("validated");
    let mut last: Option<Vec<Backend>> = None;
    let mut next = Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        next = Instant::now() + target.interval;
        let refreshed = tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(target.timeout, resolve(target.server, &name, target.timeout)) => r,
        };
        let answer = refreshed.unwrap_or(Err(DnsError::Timeout {
            server: target.server,
            timeout: target.timeout,
        }));
        match answer {
            Ok(answer) => {
                {
                    let mut s = status.lock().expect("dns status poisoned");
                    if !s.up {
                        tracing::info!(vip = vip.name(), name = %target.name, "dns discovery is up");
                        s.since = crate::discovery::unix_now();
                    }
                    s.up = true;
                    s.last_error = None;
                    s.instances = answer.backends.len();
                    s.skipped = answer.skipped;
                    s.last_update = Some(crate::discovery::unix_now());
                }
                up_gauge.set(1.0);
                if last.as_ref() != Some(&answer.backends) {
                    if answer.backends.is_empty() {
                        tracing::warn!(vip = vip.name(), name = %target.name, "dns reports no instance");
                    }
                    if vip.set_backends(answer.backends.clone()) {
                        updates.increment(1);
                    }
                    last = Some(answer.backends);
                }
            }
            Err(e) => {
                errors.increment(1);
                up_gauge.set(0.0);
                let mut s = status.lock().expect("dns status poisoned");
                if s.up {
                    tracing::warn!(vip = vip.name(), name = %target.name, error = %e, "dns lookup failed; serving the last good table");
                    s.since = crate::discovery::unix_now();
                }
                s.up = false;
                s.last_error = Some(e.to_string());
            }
        }
    }
}

/// What one refresh found.
#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    /// The backends, sorted.
    pub backends: Vec<Backend>,
    /// SRV records whose target had no address.
    pub skipped: usize,
}

type Pool = NameServerPool<TokioConnectionProvider>;

/// Looks up `name`'s SRV records on `server` over TCP and resolves their
/// targets.
pub async fn resolve(server: SocketAddr, name: &Name, timeout: Duration) -> Result<Answer, DnsError> {
    let mut opts = ResolverOpts::default();
    opts.timeout = timeout;
    opts.cache_size = 0;
    let pool: Pool = NameServerPool::from_config(
        vec![NameServerConfig::new(server, Protocol::Tcp)].into(),
        opts,
        TokioConnectionProvider::default(),
    );
    let lookup_error = |source| DnsError::Lookup { server, source };
    let Some(response) = query(&pool, name.clone(), RecordType::SRV)
        .await
        .map_err(lookup_error)?
    else {
        return Ok(Answer::default());
    };
    let mut records: Vec<(u16, u16, u16, Name)> = response
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::SRV(srv) => Some((srv.priority(), srv.weight(), srv.port(), srv.target().clone())),
            _ => None,
        })
        .collect();
    if let Some(lowest) = records.iter().map(|r| r.0).min() {
        records.retain(|r| r.0 == lowest);
    }
    let mut addresses = addresses_in(&response);
    for (_, _, _, target) in &records {
        let key = key(target);
        if addresses.contains_key(&key) {
            continue;
        }
        let mut found = Vec::new();
        for rtype in [RecordType::A, RecordType::AAAA] {
            if let Some(r) = query(&pool, target.clone(), rtype).await.map_err(lookup_error)? {
                found.extend(addresses_in(&r).remove(&key).unwrap_or_default());
            }
            if !found.is_empty() {
                break;
            }
        }
        addresses.insert(key, found);
    }
    let mut skipped = 0;
    let mut backends = Vec::new();
    for (_, weight, port, target) in &records {
        let ips = addresses.get(&key(target)).map(Vec::as_slice).unwrap_or_default();
        if ips.is_empty() {
            skipped += 1;
            tracing::warn!(target = %target, "SRV target has no address; skipped");
        }
        for &ip in ips {
            backends.push(Backend {
                addr: SocketAddr::new(ip, *port),
                // Weight 0 means "rarely" in RFC 2782; here the least share.
                weight: u32::from(*weight).clamp(1, 1000),
                zone: None,
            });
        }
    }
    backends.sort();
    backends.dedup_by(|a, b| a.addr == b.addr);
    Ok(Answer { backends, skipped })
}

/// One query; `None` when the server says the name has no such records.
async fn query(pool: &Pool, name: Name, rtype: RecordType) -> Result<Option<DnsResponse>, ProtoError> {
    let mut options = DnsRequestOptions::default();
    // Consul answers for its own domain; nothing to recurse into.
    options.recursion_desired = false;
    match pool.lookup(Query::query(name, rtype), options).first_answer().await {
        Ok(response) => Ok(Some(response)),
        Err(e) if is_negative(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// NXDOMAIN, or NOERROR without the records asked for: a real "none".
/// Every other failure code (SERVFAIL, REFUSED, …) says nothing about the
/// name and is an error.
fn is_negative(e: &ProtoError) -> bool {
    matches!(
        e.kind(),
        ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            ..
        }
    )
}

/// Names compare without case.
fn key(name: &Name) -> String {
    name.to_lowercase().to_ascii()
}

/// The A and AAAA records of a response (answers and additionals), by name.
fn addresses_in(response: &DnsResponse) -> HashMap<String, Vec<IpAddr>> {
    let mut by_name: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for r in response.answers().iter().chain(response.additionals()) {
        let ip = match r.data() {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        let ips = by_name.entry(key(r.name())).or_default();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    by_name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Option<DnsTarget>, Vec<String>) {
        let c: DnsConfig = toml::from_str(text).unwrap();
        let mut problems = Vec::new();
        (DnsTarget::from_config(&c, "vip[0].dns", &mut problems), problems)
    }

    #[test]
    fn a_good_target_is_fully_qualified_with_defaults() {
        let (t, p) = parse("name = \"web.service.consul\"");
        assert!(p.is_empty(), "{p:?}");
        let t = t.unwrap();
        assert_eq!(t.name, "web.service.consul.");
        assert_eq!(t.server, "127.0.0.1:8600".parse().unwrap());
        assert_eq!(t.interval, Duration::from_secs(5));
        let (t, _) = parse("name = \"_web._tcp.service.consul.\"\nserver = \"10.0.0.1:53\"\ninterval = \"1s\"");
        assert_eq!(t.unwrap().name, "_web._tcp.service.consul.");
    }

    #[test]
    fn every_bad_field_is_named() {
        let (t, p) = parse("name = \"web service\"\nserver = \"localhost\"\ninterval = \"0s\"\ntimeout = \"0s\"");
        assert!(t.is_none());
        for needle in [
            "vip[0].dns.name",
            "vip[0].dns.server",
            "vip[0].dns.interval",
            "vip[0].dns.timeout",
        ] {
            assert!(p.iter().any(|x| x.starts_with(needle)), "missing {needle}: {p:?}");
        }
        assert!(!parse("name = \"a..b\"").1.is_empty());
        assert!(!parse("name = \"\"").1.is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_server_is_an_error_not_an_empty_answer() {
        // A port nobody listens on: the TCP connect is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let name = Name::from_ascii("web.service.consul.").unwrap();
        let e = resolve(addr, &name, Duration::from_secs(2)).await.unwrap_err();
        assert!(matches!(e, DnsError::Lookup { .. }), "{e}");
    }
}
