//! A bounded soak with chaos in the production-shaped datacenter
//! (`halo_testkit::dc`): three Consul servers (`raft_multiplier = 1`,
//! Consul's default gossip), a client agent on every other host, halo-lb on
//! `lb1` and `lb2` as a pair with a floating VIP, two backend hosts each
//! running an echo server registered by halo-sidecar, and a client host.
//!
//! For `SOAK_SECONDS` it injects faults one at a time, in seeded random
//! order (every kind once per cycle, cycles shuffled), with recovery
//! between (the pair whole again, the standby undamped, the client served
//! steadily), while steady clients on the client host run throughout:
//! new connections to the VIP at a steady rate, each checked for the echo
//! of what it sent, and a few long-lived streams whose bytes are checked end
//! to end. At the end a checker works out, from every instance's own
//! `/status` `ha.terms` and from samples of which balancer hosts hold the
//! VIP, that no two active terms overlapped and that two hosts never held
//! the VIP at once (a killed, frozen or powered-off host's leftover address
//! excused); that every client gap stayed within its fault's bound; that no
//! byte came back corrupted; and that every halo-lb process's descriptors
//! and RSS stayed flat over its life. It prints a table and exits non-zero
//! on any violation.
//!
//! Run through `benches/soak.sh` (see benches/README.md, "Soak"), which
//! builds the binaries and passes them in the environment
//! ([`Settings::from_env`]). `soak echo <addr>` is the backends' echo
//! server (this binary, started in a backend host).
//!
//! Every process it starts runs in a host of the datacenter and is killed
//! by pid when its guard drops; the datacenter removes the namespaces and
//! everything left in them on drop, also on SIGINT or SIGTERM.
//!
//! # Layout
//! - `main.rs`: the constants and helpers every part uses, `main` (and
//!   `soak echo`), the run from start to summary, and the fault loop.
//! - [`settings`]: what `benches/soak.sh` passes in the environment.
//! - [`echo`]: the backends' echo server.
//! - [`clients`]: the client host's new connections and long-lived streams,
//!   and what they saw.
//! - [`sampler`]: which balancer hosts hold the VIP, sampled.
//! - [`pair`]: the halo-lb pair under test, driven and recorded (processes,
//!   their terms and figures).
//! - [`fault`]: the kinds of fault and their bounds.
//! - [`inject`]: injecting a fault against the active, then making the pair
//!   whole.
//! - [`check`]: the checks over the record and the summary table.

mod check;
mod clients;
mod echo;
mod fault;
mod inject;
mod pair;
mod sampler;
mod settings;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use halo_testkit::dc::{Datacenter, DcSpec};
use halo_testkit::netns::HostProcess;
use nix::sys::signal::Signal;

use crate::check::check_and_render;
use crate::clients::Clients;
use crate::echo::echo_main;
use crate::fault::Fault;
use crate::pair::{proc_stat, Soak};
use crate::sampler::Sampler;
use crate::settings::Settings;

/// The VIP's port; the echo servers' port on the backend hosts.
const VIP_PORT: u16 = 7000;
const ECHO_PORT: u16 = 7100;
/// halo-lb's admin API on loopback, as a user configures it; its probe
/// responder listens on the same port (UDP) at the host's address.
const ADMIN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9901));
const PROBE_PORT: u16 = 9901;
/// halo-sidecar's admin API on a backend host.
const SIDECAR_PORT: u16 = 9903;
const BACKENDS: usize = 2;
/// Longest wait for a role, a restart, a re-join.
const READY: Duration = Duration::from_secs(120);
/// No new fault starts this close to the end.
const TAIL: Duration = Duration::from_secs(15);

type Res<T> = Result<T, String>;

fn log(msg: &str) {
    eprintln!("[soak {:>7.1}s] {msg}", started().elapsed().as_secs_f64());
}

fn started() -> Instant {
    static T: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *T.get_or_init(Instant::now)
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn other(i: usize) -> usize {
    3 - i
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

async fn soak(
    dc: &Datacenter,
    s: &Settings,
    soak: &mut Soak<'_>,
    sampler_out: &mut Option<Sampler>,
    backends: &mut Vec<HostProcess>,
) -> Res<()> {
    soak.write_configs()?;
    *backends = soak.start_backends()?;
    soak.wait("every backend passing in the catalog", READY, || async {
        let passing = dc.get_json("client", "/v1/health/service/echo?passing").await?;
        (passing.as_array()?.len() == BACKENDS).then_some(())
    })
    .await?;
    soak.launch(1);
    soak.wait_role(1, "active").await?;
    soak.launch(2);
    soak.wait_role(2, "standby").await?;
    *sampler_out = Some(Sampler::start(dc));
    soak.make_whole().await?;
    log(&format!(
        "pair ready; soaking for {} s, seed {} (SOAK_SEED={} reproduces the faults' order and hold times)",
        s.seconds, s.seed, s.seed
    ));
    let mut rng = fastrand::Rng::with_seed(s.seed);
    let end = started() + Duration::from_secs(s.seconds);
    let mut cycle: Vec<Fault> = Vec::new();
    while Instant::now() + TAIL < end {
        if cycle.is_empty() {
            cycle = s.faults.clone();
            rng.shuffle(&mut cycle);
            cycle.reverse();
        }
        let kind = cycle.pop().ok_or("no faults enabled")?;
        soak.fault(kind, &mut rng).await?;
    }
    tokio::time::sleep(end.saturating_duration_since(Instant::now())).await;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("echo") {
        return match args.get(2) {
            Some(addr) => echo_main(addr),
            None => {
                eprintln!("usage: soak echo <ip:port>");
                ExitCode::FAILURE
            }
        };
    }
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(run()),
        Err(e) => {
            eprintln!("soak: tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    started();
    let s = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !halo_testkit::netns::required("soak") {
        eprintln!("soak: set HALO_NETNS_TESTS=1 and run as root");
        return ExitCode::FAILURE;
    }
    if let Err(e) = std::fs::create_dir_all(&s.out) {
        eprintln!("soak: create {}: {e}", s.out.display());
        return ExitCode::FAILURE;
    }
    let spec = DcSpec {
        balancers: 2,
        backends: BACKENDS,
        raft_multiplier: Some(1),
        ..DcSpec::default()
    };
    let desc = spec.describe();
    log(&format!(
        "seed {} (SOAK_SEED); {} s; faults {}; starting the datacenter ({desc})",
        s.seed,
        s.seconds,
        s.faults.iter().map(|f| f.key()).collect::<Vec<_>>().join(",")
    ));
    let dc = Datacenter::start(spec).await;
    log(&format!("datacenter ready after {:?}", dc.startup().ready));
    let vip = SocketAddr::from((dc.vip(), VIP_PORT));
    let clients = Clients::start(dc.client().netns(), vip, &s);
    let mut st = Soak {
        dc: &dc,
        s: &s,
        seen: Arc::clone(&clients.seen),
        lbs: [None, None],
        generation: [0, 0],
        terms: Mutex::default(),
        lives: Vec::new(),
        excuses: Vec::new(),
        faults: Vec::new(),
        violations: Vec::new(),
        notes: Vec::new(),
        restarts_damped: 0,
    };
    let mut sampler = None;
    // Kept until the clients have stopped, so no stream breaks at the end.
    let mut backends = Vec::new();
    let mut interrupted = None;
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("soak: cannot handle SIGTERM: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::select! {
            r = soak(&dc, &s, &mut st, &mut sampler, &mut backends) => if let Err(e) = r {
                log(&format!("stopped: {e}"));
                st.violations.push(format!("the run stopped: {e}"));
            },
            _ = tokio::signal::ctrl_c() => interrupted = Some("SIGINT"),
            _ = term.recv() => interrupted = Some("SIGTERM"),
        }
    }
    if let Some(sig) = interrupted {
        st.violations.push(format!("interrupted by {sig}"));
    }
    // Whatever is still frozen would not answer: thaw it.
    for lb in st.lbs.iter_mut().flatten() {
        if let Err(e) = lb.process.signal(Signal::SIGCONT) {
            log(&format!("SIGCONT {}: {e}", lb.who));
        }
    }
    // The final terms and figures of the live processes.
    for i in 1..=2 {
        st.status(i).await;
        if let Some(lb) = &st.lbs[i - 1] {
            let stat = proc_stat(lb.process.pid());
            st.lives[lb.life].end = stat;
            st.lives[lb.life].saw(stat);
        }
    }
    let end_wall = unix_us();
    let ended = Instant::now();
    let samples = sampler.map(Sampler::stop).unwrap_or_default();
    let seen = clients.stop();
    drop(backends);
    let table = check_and_render(&st, &seen, &samples, ended, end_wall, &desc);
    print!("{table}");
    if let Err(e) = std::fs::write(s.out.join("summary.md"), &table) {
        eprintln!("soak: write summary.md: {e}");
    }
    for host in [
        "server1", "server2", "server3", "client", "lb1", "lb2", "backend1", "backend2",
    ] {
        if let Err(e) = std::fs::copy(dc.agent_log(host), s.out.join(format!("consul-{host}.log"))) {
            log(&format!("cannot keep the agent log of {host}: {e}"));
        }
    }
    let failed = table.contains("\n**FAILED**");
    drop(st);
    drop(dc);
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
