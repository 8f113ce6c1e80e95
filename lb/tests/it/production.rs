//! The pair in the production-shaped datacenter ([`halo_testkit::dc`]):
//! three Consul servers, a client agent on every host, halo-lb on `lb1`..
//! with a floating VIP, backends on their own hosts registered by
//! halo-sidecar through their host's agent, and a client host that probes
//! the VIP every few milliseconds.
//!
//! Every scenario checks, from every instance's own `/status` `ha.terms`
//! and from samples (every 20 ms) of which balancer hosts hold the VIP
//! address, that no two active intervals overlap and that two hosts never
//! hold the VIP at once (a killed, powered-off or frozen process's leftover
//! address aside: its host is known and excused, until it is restarted,
//! powered on, or has removed the address after waking). It prints the
//! client's gap (`FIGURE` lines): the longest time between two successful
//! requests through the VIP, started from the client host, around the
//! event.
//!
//! halo-lb runs with its `[ha]` defaults (check_ttl 1 s, lock_delay 300
//! ms, probe_interval 100 ms, probe_misses 3). The Consul agents run with
//! `raft_multiplier = 1` (elections in about a second instead of several)
//! and Consul's default LAN gossip: none of these scenarios is about raft
//! timing; the failover benchmark measures Consul's defaults.
//!
//! Repeated rounds in one datacenter restart the instance that lost the
//! lock before the next round: an instance that lost the lock while alive,
//! or forced a takeover, is damped (no forced takeover for 30 s), so a
//! second round against the same pair of processes would measure the
//! damping, not the failover.
//!
//! Needs `HALO_NETNS_TESTS=1` and root; datacenters run one at a time.
//!
//! # Layout
//! - `production.rs`: the bounds and settings every scenario shares, and
//!   [`finish_rounds`], the end of a test of rounds.
//! - [`rig`]: one test's datacenter, backends (with their sidecars) and
//!   balancers, and what is asked of them.
//! - [`observe`]: what the scenarios watch and check: the client's probes
//!   through the VIP and its gap, which hosts hold the VIP, and the terms.
//! - The scenarios, by what fails: [`active`] (the active's process or host:
//!   kill -9, power-off, SIGSTOP; three instances), [`network`] (a cable
//!   pull, cuts, a forged ICMP refusal), [`consul_leader`] (the Consul
//!   leader killed), [`backend`] (a backend host powered off under load).

mod active;
mod backend;
mod consul_leader;
mod network;
mod observe;
mod rig;

use std::time::{Duration, Instant, SystemTime};

use halo_testkit::dc::DcSpec;
use serde_json::Value;

use observe::{gap, Excuse, Prober, VipSampler};
use rig::Rig;

/// Generous deadline for conditions to become true.
const WAIT: Duration = Duration::from_secs(30);
/// The VIP's port, and the backends' (python's http.server).
const VIP_PORT: u16 = 8080;
const BACKEND_PORT: u16 = 8080;
/// halo-lb's admin API, on loopback as the shipped configs have it; the
/// probe responder is on the same port (UDP) at the host's address, as the
/// host's agent advertises it.
const ADMIN_PORT: u16 = 9901;
/// halo-sidecar's admin API on a backend host.
const SIDECAR_PORT: u16 = 9903;
/// How often the sampler looks at the balancer hosts' addresses.
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// Bounds: several times the goals (kill -9 ≤ 0.5 s, power-off
/// ≤ 1 s, cable pull: the standby serves ≤ 1 s).
const KILL_BOUND: Duration = Duration::from_secs(2);
const POWER_OFF_BOUND: Duration = Duration::from_secs(4);
const CABLE_BOUND: Duration = Duration::from_secs(4);
/// For the scenarios without a goal of their own (a cut from the servers,
/// a frozen active, the two balancers cut apart, a third instance).
const FAILOVER_BOUND: Duration = Duration::from_secs(5);

fn spec(balancers: usize, backends: usize) -> DcSpec {
    DcSpec {
        balancers,
        backends,
        raft_multiplier: Some(1),
        ..DcSpec::default()
    }
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_micros() as u64
}

fn role(status: &Value) -> &str {
    status["ha"]["role"].as_str().unwrap_or("?")
}

fn other(i: usize) -> usize {
    3 - i
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Ends a test of rounds: stops the prober and the VIP sampler, prints each
/// round's client gap (from its event to the next round's), checks that no
/// two instances served and no two hosts held the VIP (but for `excuses`),
/// and asserts every gap within `bound`.
async fn finish_rounds(
    rig: &Rig,
    prober: Prober,
    sampler: VipSampler,
    events: &[(usize, Instant)],
    excuses: &[Excuse],
    what: &str,
    bound: Duration,
) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probes = prober.stop();
    let samples = sampler.stop();
    let mut gaps = Vec::new();
    for (n, (round, at)) in events.iter().enumerate() {
        let until = events.get(n + 1).map_or(Instant::now(), |e| e.1);
        let g = gap(&probes, *at, until).unwrap_or_else(|| panic!("{what} round {round}: never served again"));
        eprintln!("FIGURE {what} round {round}: client gap {}", ms(g));
        gaps.push(g);
    }
    rig.check(what, &samples, excuses).await;
    assert!(
        gaps.iter().all(|g| *g <= bound),
        "{what}: gaps {gaps:?} within {bound:?}"
    );
}
