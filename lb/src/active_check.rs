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
//! - the backend source decides what is in the table (with Consul, only
//!   instances whose Consul checks pass);
//! - an operator's disable keeps a backend listed but never picked (a table
//!   input, shown as `disabled`);
//! - a failing active check and a passive ejection both make a listed
//!   backend unavailable; picks skip it unless nothing else is left (panic
//!   mode), and zone-aware routing counts it as unhealthy.
//!
//! Checks start *up* (see [`crate::config::ActiveCheckConfig`]); each has
//! halo-health's metrics under `check="<vip>/<ip:port>"`
//! (`halo_check_up`, `halo_check_flips_total`,
//! `halo_probe_duration_seconds`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use halo_health::probe::parse_status_range;
use halo_health::{CheckConfig, CheckState, HttpProbe, Probe, Prober, Status};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backend::BackendState;
use crate::config::{ActiveCheckConfig, ActiveCheckType};
use crate::table::{Table, Vip};

/// A validated `[vip.check]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// TCP connect or HTTP GET.
    pub kind: ActiveCheckType,
    /// HTTP: the path requested.
    pub path: String,
    /// HTTP: the statuses that pass.
    pub expect_status: RangeInclusive<u16>,
    /// The port checked; `None`: the backend's own.
    pub port: Option<u16>,
    /// Time between checks.
    pub interval: Duration,
    /// Deadline of one check.
    pub timeout: Duration,
    /// Passes in a row to come back.
    pub rise: u32,
    /// Failures in a row to go out.
    pub fall: u32,
}

impl CheckSpec {
    /// Validates `c`, pushing each problem (named under `at`) to `problems`.
    pub fn from_config(c: &ActiveCheckConfig, at: &str, problems: &mut Vec<String>) -> Option<CheckSpec> {
        let before = problems.len();
        halo_health::checker::validate_timing(at, c.interval, c.timeout, c.rise, c.fall, problems);
        if c.port == Some(0) {
            problems.push(format!("{at}.port: 0 is not a port"));
        }
        if c.kind == ActiveCheckType::Tcp {
            for (field, set) in [("path", c.path.is_some()), ("expect_status", c.expect_status.is_some())] {
                if set {
                    problems.push(format!("{at}.{field}: only meaningful with type = \"http\""));
                }
            }
        }
        let path = c.path.clone().unwrap_or_else(|| "/".to_owned());
        if !path.starts_with('/') || format!("http://127.0.0.1:1{path}").parse::<http::Uri>().is_err() {
            problems.push(format!(
                "{at}.path: {path:?} must be an absolute path like \"/healthz\""
            ));
        }
        let expect = c.expect_status.as_deref().unwrap_or("200-399");
        let expect_status = parse_status_range(expect);
        if expect_status.is_none() {
            problems.push(format!(
                "{at}.expect_status: {expect:?} is not a status or range like \"200-399\""
            ));
        }
        (problems.len() == before).then(|| CheckSpec {
            kind: c.kind,
            path,
            expect_status: expect_status.expect("checked above"),
            port: c.port,
            interval: c.interval,
            timeout: c.timeout,
            rise: c.rise,
            fall: c.fall,
        })
    }

    /// The probe of backend `addr`.
    pub fn probe(&self, addr: SocketAddr) -> Probe {
        let target = SocketAddr::new(addr.ip(), self.port.unwrap_or(addr.port()));
        match self.kind {
            ActiveCheckType::Tcp => Probe::Tcp(target),
            ActiveCheckType::Http => Probe::Http(HttpProbe {
                url: format!("http://{target}{}", self.path)
                    .parse()
                    .expect("the path was validated with an address"),
                method: http::Method::GET,
                headers: Vec::new(),
                expect_status: self.expect_status.clone(),
                expect_body: None,
            }),
        }
    }

    /// The halo-health checker settings for backend `addr` of VIP `vip`.
    pub fn check_config(&self, vip: &str, addr: SocketAddr) -> CheckConfig {
        CheckConfig {
            name: format!("{vip}/{addr}"),
            probe: self.probe(addr),
            interval: self.interval,
            timeout: self.timeout,
            // Spread the checks of many backends, as the sidecar does.
            jitter: self.interval / 10,
            rise: self.rise,
            fall: self.fall,
            starts_up: true,
        }
    }
}

/// One backend's active check, for `/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActiveCheckStatus {
    /// `passing`, `warning` or `critical` (critical: not picked).
    pub status: Status,
    /// What the most recent check saw.
    pub output: String,
    /// Unix seconds of the last flip (or of the start).
    pub since: u64,
    /// Checks run so far.
    pub probes: u64,
}

/// The active check of a backend, if one runs.
pub fn status(state: &BackendState) -> Option<ActiveCheckStatus> {
    state.check().map(|handle| {
        let s = handle.state();
        ActiveCheckStatus {
            status: s.status,
            output: s.output,
            since: s
                .since
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            probes: s.probes,
        }
    })
}

/// The active checks of one VIP: a task that follows the VIP's tables and
/// keeps one checker per backend. Dropping it stops every checker.
#[derive(Debug)]
pub struct ActiveChecks {
    stop: CancellationToken,
}

impl ActiveChecks {
    /// Starts following `vip` on the current runtime. A VIP without
    /// `[vip.check]` costs one idle task, which starts checkers when a reload
    /// adds the section.
    pub fn spawn(vip: Arc<Vip>) -> ActiveChecks {
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
        let handle = halo_health::spawn(spec.check_config(vip.name(), addr), prober.clone(), stop.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> ActiveCheckConfig {
        toml::from_str(text).unwrap()
    }

    fn problems(text: &str) -> Vec<String> {
        let mut problems = Vec::new();
        assert!(CheckSpec::from_config(&config(text), "vip[0].check", &mut problems).is_none());
        problems
    }

    #[test]
    fn defaults_and_probes() {
        let mut p = Vec::new();
        let spec = CheckSpec::from_config(&config("type = \"http\"\npath = \"/healthz\""), "c", &mut p).unwrap();
        assert_eq!(spec.expect_status, 200..=399);
        assert_eq!((spec.rise, spec.fall), (2, 3));
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let Probe::Http(http) = spec.probe(addr) else {
            panic!("an HTTP probe")
        };
        assert_eq!(http.url.to_string(), "http://127.0.0.1:8080/healthz");
        let c = spec.check_config("web", addr);
        assert_eq!(c.name, "web/127.0.0.1:8080");
        assert!(c.starts_up, "a backend its source vouches for starts up");

        let spec = CheckSpec::from_config(&config("type = \"tcp\"\nport = 9000"), "c", &mut p).unwrap();
        assert!(matches!(spec.probe(addr), Probe::Tcp(a) if a == "127.0.0.1:9000".parse().unwrap()));
        let v6: SocketAddr = "[::1]:80".parse().unwrap();
        let spec = CheckSpec::from_config(&config("type = \"http\""), "c", &mut p).unwrap();
        let Probe::Http(http) = spec.probe(v6) else {
            panic!("an HTTP probe")
        };
        assert_eq!(http.url.to_string(), "http://[::1]:80/");
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn every_bad_field_is_named() {
        let p = problems(
            "type = \"tcp\"\ninterval = \"0s\"\nrise = 0\nfall = 0\nport = 0\npath = \"/x\"\nexpect_status = \"200\"",
        );
        for needle in [
            "vip[0].check.interval",
            "vip[0].check.rise",
            "vip[0].check.fall",
            "vip[0].check.port",
            "vip[0].check.path: only meaningful",
            "vip[0].check.expect_status: only meaningful",
        ] {
            assert!(p.iter().any(|x| x.starts_with(needle)), "missing {needle}: {p:?}");
        }
        let p = problems("type = \"http\"\npath = \"healthz\"\nexpect_status = \"fine\"");
        assert!(p.iter().any(|x| x.starts_with("vip[0].check.path")), "{p:?}");
        assert!(p.iter().any(|x| x.starts_with("vip[0].check.expect_status")), "{p:?}");
    }
}
