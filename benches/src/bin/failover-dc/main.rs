//! The failover benchmark in the production-shaped datacenter
//! (`halo_testkit::dc`): three Consul servers, a client agent on every
//! other host, two balancer hosts, a backend host and a client host, in
//! network namespaces on 198.18.0.0/15.
//!
//! For each system (the halo-lb pair with its default `[ha]` settings,
//! keepalived VRRP with `advert_int 1`, `consul lock` with its defaults) and
//! each event (kill -9 of the active process, power-off of the active host,
//! cable pull of the active host) it measures, over rounds, the longest gap
//! between two answers that a client on the client host sees
//! (`failover.py probe`: a TCP connection to the VIP every 5 ms), and
//! counts samples (every [`SAMPLE_EVERY`]) in which both balancer hosts
//! held the VIP on an interface that is powered. Run through
//! `benches/failover.sh`, which builds halo-lb, installs keepalived and
//! passes everything in the environment (see [`Settings::from_env`]); see
//! benches/README.md ("Failover").
//!
//! Every process it starts runs in a host of the datacenter and is killed
//! by pid when its guard drops; the datacenter removes the namespaces and
//! everything left in them on drop, also when this binary is interrupted
//! (SIGINT, SIGTERM) or a step fails.
//!
//! # Layout
//! - `main.rs`: the constants and helpers every part uses, and `main`: the
//!   datacenter, each system in turn, the table and the raw rounds.
//! - [`settings`]: the systems and events, and what `benches/failover.sh`
//!   passes in the environment.
//! - [`probe`]: the client's log of attempts, read as it grows: gaps,
//!   failures, who answers.
//! - [`sampler`]: which balancer hosts hold the VIP, sampled.
//! - [`pair`]: one system's pair on the two balancer hosts: configuring,
//!   starting, killing it, and asking who is active.
//! - [`rounds`]: the rounds of each event against one system, each from a
//!   settled pair, and what each measured.
//! - [`report`]: the Markdown table of the results.

mod pair;
mod probe;
mod report;
mod rounds;
mod sampler;
mod settings;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use halo_testkit::dc::{Datacenter, DcSpec};
use nix::time::{clock_gettime, ClockId};

use crate::report::render;
use crate::rounds::{bench_system, over_budget, Row};
use crate::sampler::Sampler;
use crate::settings::{Event, Settings, System};

/// How often the VIP holders are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// The port every system serves on the VIP.
const VIP_PORT: u16 = 7000;
/// halo-lb's admin address inside each balancer host.
const ADMIN: &str = "127.0.0.1:9901";
/// The greeting backends of the halo pair, on the backend host: lb1's, lb2's.
const BACKEND_PORTS: [u16; 2] = [7001, 7002];
/// A client attempt's deadline (failover.py's PROBE_DEADLINE).
const PROBE_DEADLINE: Duration = Duration::from_secs(1);
/// Longest wait for a role, a restart, a re-join.
const READY: Duration = Duration::from_secs(90);
/// How long one balancer must have answered alone before a round starts.
const SETTLED: Duration = Duration::from_secs(2);
const BALANCERS: [&str; 2] = ["lb1", "lb2"];

type Res<T> = Result<T, String>;

/// CLOCK_MONOTONIC in ns: the clock the probe's log uses.
fn mono_ns() -> i64 {
    let t = clock_gettime(ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always readable");
    t.tv_sec() * 1_000_000_000 + t.tv_nsec()
}

fn log(msg: &str) {
    eprintln!("[failover-dc {:>7.1}s] {msg}", started().elapsed().as_secs_f64());
}

fn started() -> Instant {
    static T: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T.get_or_init(Instant::now)
}

fn other(host: &str) -> &'static str {
    if host == "lb1" {
        "lb2"
    } else {
        "lb1"
    }
}

fn ip_path() -> PathBuf {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("ip"))
}

async fn bench(
    dc: &Datacenter,
    s: &Settings,
    results: &mut BTreeMap<(System, Event), Vec<Row>>,
    notes: &mut Vec<String>,
) {
    let sampler = Sampler::start(dc, ip_path());
    for &system in &s.systems {
        if system == System::Keepalived && s.keepalived.is_none() {
            continue;
        }
        if over_budget(s) {
            notes.push(format!("time budget used up before {}", system.key()));
            continue;
        }
        log(system.key());
        if let Err(e) = bench_system(dc, s, system, &sampler, results, notes).await {
            log(&format!("failed: {e}"));
            notes.push(format!("{} did not finish: {e}", system.key()));
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    started();
    let s = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("failover-dc: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if !halo_testkit::netns::required("failover-dc") {
        eprintln!("failover-dc: set HALO_NETNS_TESTS=1 and run as root");
        return std::process::ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::create_dir_all(&s.out) {
        eprintln!("failover-dc: create {}: {e}", s.out.display());
        return std::process::ExitCode::FAILURE;
    }
    let spec = DcSpec::default();
    let desc = spec.describe();
    log(&format!("starting the datacenter ({desc})"));
    let dc = Datacenter::start(spec).await;
    log(&format!("datacenter ready after {:?}", dc.startup().ready));
    let mut results = BTreeMap::new();
    let mut notes = Vec::new();
    let mut interrupted = None;
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("failover-dc: cannot handle SIGTERM: {e}");
                return std::process::ExitCode::FAILURE;
            }
        };
        tokio::select! {
            () = bench(&dc, &s, &mut results, &mut notes) => {}
            _ = tokio::signal::ctrl_c() => interrupted = Some("SIGINT"),
            _ = term.recv() => interrupted = Some("SIGTERM"),
        }
    }
    if let Some(sig) = interrupted {
        notes.push(format!("interrupted by {sig}"));
    }
    // The agents' logs die with the datacenter's temp dir: keep them.
    for host in ["server1", "server2", "server3", "client", "lb1", "lb2", "backend1"] {
        if let Err(e) = std::fs::copy(dc.agent_log(host), s.out.join(format!("consul-{host}.log"))) {
            log(&format!("cannot keep the agent log of {host}: {e}"));
        }
    }
    let table = render(&s, &desc, &results, &notes);
    print!("{table}");
    if let Some(path) = &s.table {
        if let Err(e) = std::fs::write(path, &table) {
            eprintln!("failover-dc: write {}: {e}", path.display());
        }
    }
    let mut raw = String::new();
    for ((system, event), rows) in &results {
        for (i, r) in rows.iter().enumerate() {
            let _infallible = writeln!(
                raw,
                "{} {} round {}: from {} gap_ms {:.1} failed {} samples {} two_holders {} new_claimed_ms {:?} old_dropped_ms {:?} {}",
                system.key(),
                event.key(),
                i + 1,
                r.from,
                r.gap_ms,
                r.failed,
                r.samples,
                r.two_holders,
                r.new_claimed_ms,
                r.old_dropped_ms,
                r.note
            );
        }
    }
    if let Err(e) = std::fs::write(s.out.join("rounds.txt"), raw) {
        eprintln!("failover-dc: write rounds.txt: {e}");
    }
    drop(dc);
    if interrupted.is_some() || notes.iter().any(|n| n.contains("did not finish")) {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
