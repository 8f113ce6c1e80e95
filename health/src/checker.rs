//! A checker runs one probe on an interval and turns its results into a
//! state with hysteresis: the state flips only after `rise` good results or
//! `fall` failures in a row. Callers watch flips, not probes.

use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::probe::{Outcome, Probe, Prober};

/// A check's state as callers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Up, last result passed.
    Passing,
    /// Up, last result warned.
    Warning,
    /// Down (or not yet up).
    Critical,
}

/// The published state of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckState {
    /// Current status.
    pub status: Status,
    /// Output of the most recent probe.
    pub output: String,
    /// When `status` last changed (wall clock, for humans and JSON).
    pub since: SystemTime,
    /// Probes run so far.
    pub probes: u64,
}

/// How a check runs.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Name, unique per process; used in metrics and endpoints.
    pub name: String,
    /// What to probe.
    pub probe: Probe,
    /// Time between probe starts.
    pub interval: Duration,
    /// Deadline of one probe.
    pub timeout: Duration,
    /// Each wait is `interval` plus or minus up to this, so many checkers
    /// don't probe in lockstep.
    pub jitter: Duration,
    /// Good results in a row that bring a down check up.
    pub rise: u32,
    /// Failures in a row that bring an up check down.
    pub fall: u32,
    /// Whether the check starts up (passing until `fall` failures in a row)
    /// rather than down (critical until `rise` passes). The sidecar starts
    /// down: an app is not ready until it has proved it. The balancer starts
    /// up: Consul or the operator already vouches for a new backend, and
    /// starting down would take capacity away for `rise` intervals on every
    /// table change.
    pub starts_up: bool,
}

/// Rise/fall hysteresis over probe outcomes, without any clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    up: bool,
    good_run: u32,
    bad_run: u32,
}

impl Hysteresis {
    /// Starts down: a new check must earn `rise` good results first.
    pub fn new(rise: u32, fall: u32) -> Self {
        Hysteresis {
            rise: rise.max(1),
            fall: fall.max(1),
            up: false,
            good_run: 0,
            bad_run: 0,
        }
    }

    /// Starts up: an up check must see `fall` failures in a row to go down.
    pub fn new_up(rise: u32, fall: u32) -> Self {
        Hysteresis {
            up: true,
            ..Hysteresis::new(rise, fall)
        }
    }

    /// Whether the check is up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Feeds one outcome (warn counts as good); returns the status after it.
    pub fn observe(&mut self, outcome: Outcome) -> Status {
        match outcome {
            Outcome::Pass | Outcome::Warn => {
                self.bad_run = 0;
                self.good_run = self.good_run.saturating_add(1);
                if !self.up && self.good_run >= self.rise {
                    self.up = true;
                }
            }
            Outcome::Fail => {
                self.good_run = 0;
                self.bad_run = self.bad_run.saturating_add(1);
                if self.up && self.bad_run >= self.fall {
                    self.up = false;
                }
            }
        }
        match (self.up, outcome) {
            (false, _) => Status::Critical,
            (true, Outcome::Warn) => Status::Warning,
            // Up but this probe failed (fewer than `fall` in a row): the last
            // good status stands; callers see Passing.
            (true, _) => Status::Passing,
        }
    }
}

/// A running check: read its state, or wait for flips.
#[derive(Debug, Clone)]
pub struct CheckHandle {
    name: String,
    state: watch::Receiver<CheckState>,
}

impl CheckHandle {
    /// The check's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current state.
    pub fn state(&self) -> CheckState {
        self.state.borrow().clone()
    }

    /// A receiver that wakes on every status flip.
    pub fn subscribe(&self) -> watch::Receiver<CheckState> {
        self.state.clone()
    }
}

/// Shortest check interval a config may ask for. A health check is not a
/// load test: with no floor, `interval = "1ns"` ran 920 probes a second
/// against the app.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// Shortest probe timeout a config may ask for; below it even a loopback
/// connect or a fork and exec fails now and then, and the check flaps.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(10);

/// Checks a check's timing and thresholds, pushing each problem, named
/// under `at` (`check[0]`, `vip[1].check`), to `problems`. Shared by every
/// config that declares checks, so they say the same thing. The interval
/// must be at least [`MIN_INTERVAL`], the timeout at least [`MIN_TIMEOUT`].
pub fn validate_timing(
    at: &str,
    interval: Duration,
    timeout: Duration,
    rise: u32,
    fall: u32,
    problems: &mut Vec<String>,
) {
    if interval < MIN_INTERVAL {
        problems.push(format!(
            "{at}.interval: {interval:?} is below the floor of {MIN_INTERVAL:?} (a health check, not a load test)"
        ));
    }
    if timeout < MIN_TIMEOUT {
        problems.push(format!(
            "{at}.timeout: {timeout:?} is below the floor of {MIN_TIMEOUT:?} (too short for a probe to finish reliably)"
        ));
    }
    if rise == 0 {
        problems.push(format!("{at}.rise: must be at least 1"));
    }
    if fall == 0 {
        problems.push(format!("{at}.fall: must be at least 1"));
    }
}

/// Starts a checker task that runs until `stop` is cancelled. It records
/// `halo_check_up`, `halo_check_flips_total` and
/// `halo_probe_duration_seconds` under `check="<name>"`.
pub fn spawn(config: CheckConfig, prober: Prober, stop: CancellationToken) -> CheckHandle {
    start(config, prober, stop, true)
}

/// Like [`spawn`], but records no metrics of its own: for callers whose
/// checks come and go with their targets (halo-lb checks every backend of a
/// table), which export the state from the [`CheckHandle`] themselves, so
/// that no series outlives its target.
pub fn spawn_unrecorded(config: CheckConfig, prober: Prober, stop: CancellationToken) -> CheckHandle {
    start(config, prober, stop, false)
}

fn start(config: CheckConfig, prober: Prober, stop: CancellationToken, record: bool) -> CheckHandle {
    let (tx, rx) = watch::channel(CheckState {
        status: if config.starts_up {
            Status::Passing
        } else {
            Status::Critical
        },
        output: "not checked yet".into(),
        since: SystemTime::now(),
        probes: 0,
    });
    let name = config.name.clone();
    tokio::spawn(run(config, prober, tx, stop, record));
    CheckHandle { name, state: rx }
}

async fn run(
    config: CheckConfig,
    prober: Prober,
    tx: watch::Sender<CheckState>,
    stop: CancellationToken,
    record: bool,
) {
    let (latency, flips, up) = if record {
        let labels = [("check", config.name.clone())];
        (
            metrics::histogram!("halo_probe_duration_seconds", &labels),
            metrics::counter!("halo_check_flips_total", &labels),
            metrics::gauge!("halo_check_up", &labels),
        )
    } else {
        (
            metrics::Histogram::noop(),
            metrics::Counter::noop(),
            metrics::Gauge::noop(),
        )
    };
    let mut hysteresis = if config.starts_up {
        up.set(1.0);
        Hysteresis::new_up(config.rise, config.fall)
    } else {
        up.set(0.0);
        Hysteresis::new(config.rise, config.fall)
    };
    // First probe soon, spread by jitter.
    let mut next = Instant::now() + jittered(Duration::ZERO, config.jitter);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next) => {}
        }
        let started = Instant::now();
        let result = prober.run(&config.probe, config.timeout).await;
        latency.record(result.latency.as_secs_f64());
        let status = hysteresis.observe(result.outcome);
        tx.send_if_modified(|state| {
            state.probes += 1;
            state.output = result.output.clone();
            if state.status == status {
                return false;
            }
            tracing::info!(check = %config.name, from = ?state.status, to = ?status, output = %result.output, "check flipped");
            state.status = status;
            state.since = SystemTime::now();
            flips.increment(1);
            up.set(if status == Status::Critical { 0.0 } else { 1.0 });
            true
        });
        next = started + jittered(config.interval, config.jitter);
    }
}

fn jittered(base: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return base;
    }
    let offset = jitter.mul_f64(fastrand::f64());
    if fastrand::bool() {
        base.saturating_add(offset)
    } else {
        base.saturating_sub(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    #[test]
    fn a_new_check_rises_only_after_rise_good_results() {
        let mut h = Hysteresis::new(2, 3);
        assert_eq!(h.observe(Pass), Status::Critical);
        assert_eq!(h.observe(Pass), Status::Passing);
        assert!(h.is_up());
    }

    #[test]
    fn an_up_check_falls_only_after_fall_failures_in_a_row() {
        let mut h = Hysteresis::new(1, 3);
        h.observe(Pass);
        assert_eq!(h.observe(Fail), Status::Passing);
        assert_eq!(h.observe(Fail), Status::Passing);
        assert_eq!(h.observe(Pass), Status::Passing, "a good result resets the run");
        assert_eq!(h.observe(Fail), Status::Passing);
        assert_eq!(h.observe(Fail), Status::Passing);
        assert_eq!(h.observe(Fail), Status::Critical);
        assert_eq!(h.observe(Pass), Status::Passing, "rise = 1");
    }

    #[test]
    fn a_check_that_starts_up_falls_only_after_fall_failures() {
        let mut h = Hysteresis::new_up(2, 2);
        assert!(h.is_up());
        assert_eq!(h.observe(Fail), Status::Passing);
        assert_eq!(h.observe(Fail), Status::Critical);
        assert_eq!(h.observe(Pass), Status::Critical, "back up only after rise passes");
        assert_eq!(h.observe(Pass), Status::Passing);
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let base = Duration::from_millis(1000);
        let jitter = Duration::from_millis(100);
        for _ in 0..10_000 {
            let d = jittered(base, jitter);
            assert!(d >= base - jitter && d <= base + jitter, "{d:?}");
        }
        assert!(jittered(Duration::ZERO, jitter) <= jitter);
    }

    #[test]
    fn warnings_keep_a_check_up_and_show_as_warning() {
        let mut h = Hysteresis::new(1, 1);
        assert_eq!(h.observe(Warn), Status::Warning);
        assert_eq!(h.observe(Pass), Status::Passing);
        assert_eq!(h.observe(Warn), Status::Warning);
        assert_eq!(h.observe(Fail), Status::Critical);
    }

    #[test]
    fn timing_below_the_floors_is_refused_with_the_reason() {
        let mut p = Vec::new();
        validate_timing(
            "check[0]",
            Duration::from_nanos(1),
            Duration::from_millis(9),
            1,
            1,
            &mut p,
        );
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("check[0].interval: 1ns is below the floor of 100ms"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("check[0].timeout: 9ms is below the floor of 10ms"),
            "{p:?}"
        );
        let mut p = Vec::new();
        validate_timing("check[0]", Duration::ZERO, Duration::ZERO, 0, 0, &mut p);
        assert_eq!(p.len(), 4, "{p:?}");
        let mut p = Vec::new();
        validate_timing("check[0]", MIN_INTERVAL, MIN_TIMEOUT, 1, 1, &mut p);
        assert!(p.is_empty(), "the floors themselves are allowed: {p:?}");
    }

    #[tokio::test]
    async fn the_checker_publishes_flips_on_its_interval() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let handle = spawn(
            CheckConfig {
                name: "tcp".into(),
                probe: Probe::Tcp(addr),
                interval: Duration::from_millis(50),
                timeout: Duration::from_secs(2),
                jitter: Duration::ZERO,
                rise: 2,
                fall: 2,
                starts_up: false,
            },
            Prober::default(),
            stop.clone(),
        );
        let mut rx = handle.subscribe();
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().status, Status::Passing);
        assert!(rx.borrow().probes >= 2, "rise took two probes");
        drop(listener);
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().status, Status::Critical);
        assert!(rx.borrow().output.contains("refused"), "{}", rx.borrow().output);
        stop.cancel();
    }
}
