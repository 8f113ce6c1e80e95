//! A small datacenter in network namespaces, shaped like production: three
//! Consul servers, a Consul client agent on every other host, balancers,
//! backends and a client, with faults a test can inject mid-run.
//!
//! # Topology
//! [`Datacenter::start`] builds, on one bridge (see [`crate::netns`]), in
//! 198.18.x.0/24 (inside 198.18.0.0/15, RFC 2544's benchmark range; x is
//! chosen per datacenter), one namespace per host:
//!
//! | host | address | runs |
//! |---|---|---|
//! | `server1`..`server3` | .1 – .3 | `consul agent -server -bootstrap-expect=3` |
//! | `client` | .10 | a client agent; the test's load generator goes here |
//! | `lb1`..`lbN` | .11 – .(10+N), N ≤ 9 | a client agent; halo-lb goes here |
//! | `backend1`..`backendM` | .21 – .(20+M), M ≤ 50 | a client agent; backends and halo-sidecar go here |
//! | `router` (with [`DcSpec::router`]) | .254 | no agent; forwards between the bridge and `outside` |
//! | `outside` (with [`DcSpec::router`]) | 198.19.x.10/25, behind `router` | no agent; clients that reach VIPs through the router go here |
//!
//! Each host also has 2001:2::N/64 with the same last number N (see
//! [`crate::netns`]); 2001:2::100 is free for an IPv6 floating VIP.
//! .100 ([`Datacenter::vip`]) is free for a floating VIP. Every agent is a
//! real, non-dev agent with its own data dir (a temp dir removed at the
//! end), node name = host name, `-bind` = the host's address, HTTP/DNS on
//! the host's address *and* 127.0.0.1 (so a process in the host reaches its
//! own agent at [`AGENT_HTTP`], 127.0.0.1:8500, as in production), default
//! ports, `disable_update_check`, `-disable-host-node-id` (the hosts share
//! one kernel), and `-retry-join` of the three servers every 500 ms (a
//! testkit choice so a client started before the servers listen joins at
//! once; Consul's default retry interval is 30 s). Nothing routes out of
//! the namespaces.
//!
//! # Timing: Consul's defaults unless the spec says otherwise
//! [`DcSpec::raft_multiplier`] unset leaves Consul's default (5: leader
//! heartbeat/election timeouts of 5 s, so the first election and a
//! re-election after the leader dies take several seconds).
//! [`DcSpec::gossip_lan`] unset leaves Consul's LAN gossip defaults
//! ([`GossipLan::CONSUL_DEFAULT`]: probe every 1 s, probe timeout 500 ms,
//! suspicion multiplier 4). **Every figure measured in a datacenter must
//! say which raft multiplier and gossip settings it used**; a test that
//! tunes them says so in its spec, and [`DcSpec::describe`] prints them.
//!
//! # Readiness
//! `start` returns once every server reports the same leader and every
//! client agent knows that leader and sees its own node in the catalog with
//! `serfHealth` passing, and every agent sees every other one alive in
//! gossip. [`Datacenter::startup`] tells how long it took.
//!
//! # Fault primitives
//! Each can be used mid-test, and the reversible ones undone:
//! - **Kill a process**: [`HostProcess::kill`] (SIGKILL, reaped), or
//!   [`Datacenter::kill_agent`] for a host's Consul agent.
//! - **Pause / resume a process**: [`HostProcess::pause`] /
//!   [`HostProcess::resume`] (SIGSTOP / SIGCONT): the kernel still
//!   completes TCP handshakes on its listeners, nothing answers.
//!   [`Datacenter::pause_agent`] / [`Datacenter::resume_agent`] for agents.
//! - **Power off / on a host**: [`Datacenter::power_off`] SIGKILLs every
//!   process in it (its agent too) and takes its `eth0` down;
//!   [`Datacenter::power_on`] brings `eth0` up with only the host's own
//!   address (a VIP it held is gone, as after a reboot) and restarts its
//!   agent with the same data dir and node name. Processes the test
//!   started there stay dead; start them again.
//! - **Pull / re-plug a cable**: [`Datacenter::unplug`] /
//!   [`Datacenter::plug`] take the host's port on the bridge down / up;
//!   its processes keep running and keep their addresses.
//! - **Cut hosts apart / heal**: [`Datacenter::cut`] drops every frame
//!   between two hosts both ways (both still reach everybody else);
//!   [`Datacenter::cut_from_servers`] cuts one host from the three servers
//!   only; [`Datacenter::cut_udp`] drops only UDP to one port between
//!   two hosts (a failure detector's probes, say);
//!   [`Datacenter::heal`], [`Datacenter::heal_udp`],
//!   [`Datacenter::heal_all`] undo. An
//!   nftables bridge table in the bridge's namespace (see
//!   [`Topology`]); needs `nft` (Debian package
//!   `nftables`).
//! - **Kill the Consul leader**: [`Datacenter::kill_leader`] finds it with
//!   `/v1/status/leader` and SIGKILLs that server's agent;
//!   [`Datacenter::start_agent`] starts it again with its data dir.
//!
//! # Sharing the machine
//! A datacenter runs five or more Consul agents on a CI machine with two
//! cores, so only one exists at a time per test process: `start` waits for
//! a process-wide lock that the datacenter holds until it drops. A test
//! must therefore never hold two at once (it would wait for ever).
//!
//! # Clean-up
//! Dropping the datacenter, also while a test panics, kills every agent
//! and every process started in a host (by pid), deletes the namespaces
//! (and so every link and nftables rule) and removes the temp dir with the
//! data dirs and logs. While panicking it first prints the tail of each
//! agent's log. Namespaces left by a test process that was SIGKILLed are
//! swept by the next one.
//!
//! ```no_run
//! # async fn example() {
//! use halo_testkit::dc::{Datacenter, DcSpec};
//! if !halo_testkit::netns::required("my_test") {
//!     return;
//! }
//! let dc = Datacenter::start(DcSpec::default()).await;
//! let lb1 = dc.host("lb1");
//! let mut cmd = lb1.command("/path/to/halo-lb");
//! cmd.args(["--config", "/tmp/lb.toml"]); // consul address: dc.agent_url()
//! let mut lb = dc.spawn("lb1", cmd, "halo-lb");
//! dc.cut_from_servers("lb1");
//! // … observe from dc.client() …
//! dc.heal_all();
//! lb.pause();
//! lb.resume();
//! dc.power_off("lb1");
//! dc.power_on("lb1").await;
//! let old = dc.kill_leader().await;
//! dc.wait_for_leader().await;
//! dc.start_agent(&old).await;
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::netns::{Host, HostProcess, Topology};
use crate::{consul_binary, eventually, http, START_TIMEOUT};

/// The server hosts, always three.
pub const SERVERS: [&str; 3] = ["server1", "server2", "server3"];

/// Where a process inside a host reaches its own host's agent.
pub const AGENT_HTTP: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8500));

/// The router host of a [`DcSpec::router`] datacenter, and the host behind
/// it.
pub const ROUTER: &str = "router";
/// The host behind [`ROUTER`].
pub const OUTSIDE: &str = "outside";

/// The servers' RPC port (Consul's default), as `/v1/status/leader` names it.
const SERVER_RPC_PORT: u16 = 8300;

/// The most balancer hosts a datacenter has (.11 – .19).
pub const MAX_BALANCERS: usize = 9;

/// The most backend hosts a datacenter has (.21 – .70).
pub const MAX_BACKENDS: usize = 50;

/// Consul's LAN gossip (memberlist) settings, `gossip_lan { … }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GossipLan {
    /// Nodes each gossip round sends to.
    pub gossip_nodes: u32,
    /// Time between gossip rounds.
    pub gossip_interval: Duration,
    /// Time between failure probes of a random node.
    pub probe_interval: Duration,
    /// How long a direct probe waits for an ack before asking others.
    pub probe_timeout: Duration,
    /// Retransmissions of a gossip message: `retransmit_mult * log(N+1)`.
    pub retransmit_mult: u32,
    /// Suspicion timeout multiplier: a suspect is declared dead after
    /// `suspicion_mult * log(N+1) * probe_interval` (shortened by
    /// independent confirmations).
    pub suspicion_mult: u32,
}

impl GossipLan {
    /// Consul's defaults for the LAN pool (memberlist's LAN config).
    pub const CONSUL_DEFAULT: GossipLan = GossipLan {
        gossip_nodes: 3,
        gossip_interval: Duration::from_millis(200),
        probe_interval: Duration::from_secs(1),
        probe_timeout: Duration::from_millis(500),
        retransmit_mult: 4,
        suspicion_mult: 4,
    };

    /// The `gossip_lan { … }` HCL block.
    pub fn hcl(&self) -> String {
        format!(
            "gossip_lan {{ gossip_nodes = {} gossip_interval = \"{}ms\" probe_interval = \"{}ms\" \
             probe_timeout = \"{}ms\" retransmit_mult = {} suspicion_mult = {} }}",
            self.gossip_nodes,
            self.gossip_interval.as_millis(),
            self.probe_interval.as_millis(),
            self.probe_timeout.as_millis(),
            self.retransmit_mult,
            self.suspicion_mult
        )
    }
}

impl Default for GossipLan {
    fn default() -> GossipLan {
        GossipLan::CONSUL_DEFAULT
    }
}

/// What [`Datacenter::start`] builds.
#[derive(Debug, Clone)]
pub struct DcSpec {
    /// Balancer hosts `lb1`..`lbN`, 1 ≤ N ≤ [`MAX_BALANCERS`]. Default 2.
    pub balancers: usize,
    /// Backend hosts `backend1`..`backendM`, M ≤ [`MAX_BACKENDS`]. Default 1.
    pub backends: usize,
    /// `performance { raft_multiplier = … }` on every agent. Unset:
    /// Consul's default, 5.
    pub raft_multiplier: Option<u8>,
    /// `gossip_lan { … }` on every agent. Unset: Consul's defaults
    /// ([`GossipLan::CONSUL_DEFAULT`]).
    pub gossip_lan: Option<GossipLan>,
    /// More configuration for every agent, each one `-hcl=` argument.
    /// Default none.
    pub extra_hcl: Vec<String>,
    /// A `router` host (.254, no Consul agent) on the bridge, and an
    /// `outside` host behind it on a link of its own (see
    /// `Topology::add_outside`): for tests where clients reach the VIPs
    /// through a router. Default off.
    pub router: bool,
}

impl Default for DcSpec {
    fn default() -> DcSpec {
        DcSpec {
            balancers: 2,
            backends: 1,
            raft_multiplier: None,
            gossip_lan: None,
            extra_hcl: Vec::new(),
            router: false,
        }
    }
}

impl DcSpec {
    /// The timing settings in force, for figures: e.g. `raft_multiplier 5
    /// (Consul default), gossip_lan Consul default (probe_interval 1000ms,
    /// probe_timeout 500ms, suspicion_mult 4)`.
    pub fn describe(&self) -> String {
        let mut out = match self.raft_multiplier {
            None => "raft_multiplier 5 (Consul default)".to_owned(),
            Some(m) => format!("raft_multiplier {m}"),
        };
        let (g, whose) = match self.gossip_lan {
            None => (GossipLan::CONSUL_DEFAULT, "Consul default"),
            Some(g) if g == GossipLan::CONSUL_DEFAULT => (g, "Consul default"),
            Some(g) => (g, "tuned"),
        };
        // Writing to a String cannot fail.
        let _infallible = write!(
            out,
            ", gossip_lan {whose} (gossip_interval {}ms, probe_interval {}ms, probe_timeout {}ms, \
             suspicion_mult {}, retransmit_mult {})",
            g.gossip_interval.as_millis(),
            g.probe_interval.as_millis(),
            g.probe_timeout.as_millis(),
            g.suspicion_mult,
            g.retransmit_mult
        );
        out
    }
}

/// How long [`Datacenter::start`] took, from its call.
#[derive(Debug, Clone, Copy)]
pub struct Startup {
    /// Namespaces, bridge and links made.
    pub network: Duration,
    /// Every server agrees on a leader.
    pub leader: Duration,
    /// Every client agent is ready: the whole datacenter is up.
    pub ready: Duration,
}

/// One host's Consul agent.
#[derive(Debug)]
struct Agent {
    server: bool,
    /// Its data dir and log, kept across restarts.
    dir: PathBuf,
    /// Unset before the first start; a dead process after a kill.
    process: Option<HostProcess>,
}

/// The running datacenter; see the [module docs](self). Every method
/// takes `&self`, so a test may share it (e.g. in an `Arc`) between tasks.
#[derive(Debug)]
pub struct Datacenter {
    // Fields drop in this order: agents, then the network (which kills
    // whatever else runs in it and deletes the namespaces), then the temp
    // dir, and only then is the next datacenter allowed to start.
    agents: Mutex<BTreeMap<String, Agent>>,
    net: Topology,
    dir: TempDir,
    spec: DcSpec,
    startup: Startup,
    _one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
}

impl Datacenter {
    /// Builds the datacenter and waits until it is ready (see the module
    /// docs); panics, after removing what it made, if a step fails or it is
    /// not ready within [`START_TIMEOUT`]. Waits first for any other
    /// datacenter of this process to drop. Call
    /// [`crate::netns::required`] first.
    pub async fn start(spec: DcSpec) -> Datacenter {
        assert!(
            (1..=MAX_BALANCERS).contains(&spec.balancers),
            "balancers must be 1..={MAX_BALANCERS}, not {}",
            spec.balancers
        );
        assert!(
            spec.backends <= MAX_BACKENDS,
            "backends must be at most {MAX_BACKENDS}, not {}",
            spec.backends
        );
        static ONE: OnceLock<Arc<tokio::sync::Mutex<()>>> = OnceLock::new();
        let guard = Arc::clone(ONE.get_or_init(Arc::default)).lock_owned().await;
        let began = Instant::now();

        let mut hosts: Vec<(String, u8)> = Vec::new();
        for (i, name) in SERVERS.iter().enumerate() {
            hosts.push(((*name).to_owned(), 1 + i as u8));
        }
        hosts.push(("client".to_owned(), 10));
        for i in 1..=spec.balancers {
            hosts.push((format!("lb{i}"), 10 + i as u8));
        }
        for i in 1..=spec.backends {
            hosts.push((format!("backend{i}"), 20 + i as u8));
        }
        // Hosts without an agent, on the bridge.
        let mut plain: Vec<(String, u8)> = Vec::new();
        if spec.router {
            plain.push((ROUTER.to_owned(), 254));
        }
        let dir = tempfile::Builder::new()
            .prefix("halo-dc-")
            .tempdir()
            .expect("create a temp dir for the datacenter");
        std::fs::create_dir(dir.path().join("logs")).expect("create the datacenter's log dir");
        // Resolved before anything starts, so a missing binary fails fast.
        consul_binary();
        let mut net = Topology::with_hosts(&[hosts.as_slice(), plain.as_slice()].concat());
        if spec.router {
            net.add_outside(OUTSIDE, ROUTER);
        }
        let network = began.elapsed();
        let agents = hosts
            .iter()
            .map(|(name, _)| {
                let agent_dir = dir.path().join(name);
                std::fs::create_dir(&agent_dir).expect("create an agent's dir");
                let agent = Agent {
                    server: SERVERS.contains(&name.as_str()),
                    dir: agent_dir,
                    process: None,
                };
                (name.clone(), agent)
            })
            .collect();
        let mut dc = Datacenter {
            agents: Mutex::new(agents),
            net,
            dir,
            spec,
            startup: Startup {
                network,
                leader: Duration::ZERO,
                ready: Duration::ZERO,
            },
            _one_at_a_time: guard,
        };
        let names: Vec<String> = hosts.into_iter().map(|(name, _)| name).collect();
        for name in &names {
            dc.spawn_agent(name);
        }
        dc.wait_for_leader().await;
        dc.startup.leader = began.elapsed();
        for name in names.iter().filter(|n| !SERVERS.contains(&n.as_str())) {
            dc.wait_agent_ready(name).await;
        }
        // Gossip has converged: every agent sees every other one alive (a
        // client agent can be ready, with the leader known, before the
        // others have heard of it).
        for name in &names {
            dc.wait_sees_all(name, names.len()).await;
        }
        dc.startup.ready = began.elapsed();
        dc
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &DcSpec {
        &self.spec
    }

    /// How long it took to come up.
    pub fn startup(&self) -> Startup {
        self.startup
    }

    /// The network: hosts, bridge, and the raw network faults.
    pub fn net(&self) -> &Topology {
        &self.net
    }

    /// A host by name (`server1`, `client`, `lb1`, `backend1`, …); panics
    /// on an unknown one.
    pub fn host(&self, name: &str) -> &Host {
        self.net.host(name)
    }

    /// The client host, .10.
    pub fn client(&self) -> &Host {
        self.host("client")
    }

    /// Balancer `i`, 1-based: `lb1` is .11.
    pub fn lb(&self, i: usize) -> &Host {
        self.host(&format!("lb{i}"))
    }

    /// Backend `i`, 1-based: `backend1` is .21.
    pub fn backend(&self, i: usize) -> &Host {
        self.host(&format!("backend{i}"))
    }

    /// The three server hosts.
    pub fn servers(&self) -> [&Host; 3] {
        SERVERS.map(|name| self.host(name))
    }

    /// 198.18.x.100: free for a floating VIP.
    pub fn vip(&self) -> Ipv4Addr {
        self.net.addr(100)
    }

    /// The address a process inside any host uses for its own agent:
    /// [`AGENT_HTTP`].
    pub fn agent_addr(&self) -> SocketAddr {
        AGENT_HTTP
    }

    /// `http://127.0.0.1:8500`, for a halo config inside a host.
    pub fn agent_url(&self) -> String {
        format!("http://{AGENT_HTTP}")
    }

    /// A host's agent as other hosts reach it: its address, port 8500.
    pub fn agent_addr_of(&self, host: &str) -> SocketAddr {
        SocketAddr::from((self.host(host).ip(), AGENT_HTTP.port()))
    }

    /// The directory for logs of processes started with
    /// [`Datacenter::spawn`] (removed with the datacenter).
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// The log file of `host`'s agent.
    pub fn agent_log(&self, host: &str) -> PathBuf {
        self.with_agent(host, |a| a.dir.join("consul.log"))
    }

    /// Starts `cmd` (made with `dc.host(host).command(…)`) in `host`, its
    /// stdout and stderr appended to `<log_dir>/<host>-<name>.log`. SIGKILLed
    /// when the guard drops, when the host is powered off, or with the
    /// datacenter.
    pub fn spawn(&self, host: &str, cmd: Command, name: &str) -> HostProcess {
        let log = self.log_dir().join(format!("{host}-{name}.log"));
        self.host(host).spawn_logged(cmd, &log)
    }

    /// Sends `method path` with `body` to `host`'s agent from inside `host`
    /// (at 127.0.0.1:8500, as a process there would); the status and body,
    /// or `None` if it cannot connect or has no answer within 2 s.
    pub async fn consul(&self, host: &str, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let stream = self.host(host).connect(AGENT_HTTP).await.ok()?;
        http::request_body_over(stream, AGENT_HTTP, method, path, body).await
    }

    /// A GET of `path` from `host`'s agent; the body of a 200 answer.
    pub async fn get(&self, host: &str, path: &str) -> Option<String> {
        match self.consul(host, "GET", path, "").await? {
            (200, body) => Some(body),
            _ => None,
        }
    }

    /// A GET of `path` from `host`'s agent, parsed as JSON.
    pub async fn get_json(&self, host: &str, path: &str) -> Option<Value> {
        serde_json::from_str(&self.get(host, path).await?).ok()
    }

    /// The leader as `host`'s agent reports it (`/v1/status/leader`): the
    /// name of a server host, or `None` if it has none or cannot answer.
    pub async fn leader_seen_by(&self, host: &str) -> Option<String> {
        let body = self.get(host, "/v1/status/leader").await?;
        let addr: SocketAddr = body.trim().trim_matches('"').parse().ok()?;
        SERVERS
            .iter()
            .find(|s| SocketAddr::from((self.host(s).ip(), SERVER_RPC_PORT)) == addr)
            .map(|s| (*s).to_owned())
    }

    /// The leader, asked of the running servers: `Some` if they all agree.
    pub async fn leader(&self) -> Option<String> {
        let mut seen: Option<String> = None;
        for server in SERVERS.iter().filter(|s| self.agent_running(s)) {
            let leader = self.leader_seen_by(server).await?;
            if seen.get_or_insert_with(|| leader.clone()) != &leader {
                return None;
            }
        }
        seen
    }

    /// Waits until every running server reports the same leader.
    pub async fn wait_for_leader(&self) -> String {
        eventually(START_TIMEOUT, "the Consul servers to agree on a leader", || {
            self.leader()
        })
        .await
    }

    /// The status of `node`'s `serfHealth` check (`passing`, `critical`)
    /// in the catalog, as `from`'s agent answers.
    pub async fn serf_health(&self, from: &str, node: &str) -> Option<String> {
        let checks = self.get_json(from, &format!("/v1/health/node/{node}")).await?;
        checks
            .as_array()?
            .iter()
            .find(|c| c["CheckID"] == "serfHealth")?
            .get("Status")?
            .as_str()
            .map(str::to_owned)
    }

    /// The LAN members `from`'s agent knows: name and serf status (1
    /// alive, 2 leaving, 3 left, 4 failed), servers' `role` tag `consul`.
    pub async fn members(&self, from: &str) -> Option<Vec<Member>> {
        let members = self.get_json(from, "/v1/agent/members").await?;
        members
            .as_array()?
            .iter()
            .map(|m| {
                Some(Member {
                    name: m["Name"].as_str()?.to_owned(),
                    status: m["Status"].as_i64()?,
                    server: m["Tags"]["role"] == "consul",
                })
            })
            .collect()
    }

    /// SIGKILLs `host`'s agent, as a crash would. Idempotent.
    pub fn kill_agent(&self, host: &str) {
        self.with_agent(host, |a| {
            if let Some(p) = a.process.as_mut() {
                p.kill();
            }
        });
    }

    /// Freezes `host`'s agent (SIGSTOP).
    pub fn pause_agent(&self, host: &str) {
        self.with_agent(host, |a| a.process.as_mut().expect("agent started").pause());
    }

    /// Thaws `host`'s agent (SIGCONT).
    pub fn resume_agent(&self, host: &str) {
        self.with_agent(host, |a| a.process.as_mut().expect("agent started").resume());
    }

    /// The pid of `host`'s agent while it runs.
    pub fn agent_pid(&self, host: &str) -> Option<u32> {
        self.with_agent(host, |a| {
            let p = a.process.as_mut()?;
            p.is_running().then(|| p.pid())
        })
    }

    fn agent_running(&self, host: &str) -> bool {
        self.agent_pid(host).is_some()
    }

    /// Starts `host`'s agent again after a kill or power-off, with the same
    /// data dir and node name, and waits until it is ready: a server until
    /// it reports the leader the others agree on, a client agent as at
    /// start-up. Panics if it is still running.
    pub async fn start_agent(&self, host: &str) {
        assert!(!self.agent_running(host), "the agent of {host} is running");
        self.spawn_agent(host);
        if SERVERS.contains(&host) {
            self.wait_for_leader().await;
            eventually(START_TIMEOUT, &format!("{host}'s agent to know the leader"), || {
                self.leader_seen_by(host)
            })
            .await;
        } else {
            self.wait_agent_ready(host).await;
        }
    }

    /// Finds the leader with `/v1/status/leader`, SIGKILLs its agent, and
    /// returns its host's name. Start it again with
    /// [`Datacenter::start_agent`].
    pub async fn kill_leader(&self) -> String {
        let leader = self.wait_for_leader().await;
        self.kill_agent(&leader);
        leader
    }

    /// Powers `host` off: every process in it is SIGKILLed (its agent too)
    /// and its `eth0` goes down. Undo with [`Datacenter::power_on`].
    pub fn power_off(&self, host: &str) {
        self.net.power_off(host);
        // Reap the agent now: it is dead.
        self.kill_agent(host);
    }

    /// Powers `host` back on: `eth0` up with only its own address, and its
    /// agent restarted (same data dir and node name) and ready. Other
    /// processes are not restarted.
    pub async fn power_on(&self, host: &str) {
        self.net.power_on(host);
        self.start_agent(host).await;
    }

    /// Pulls `host`'s cable (its bridge port down); processes keep running.
    pub fn unplug(&self, host: &str) {
        self.net.unplug(host);
    }

    /// Plugs `host`'s cable back in.
    pub fn plug(&self, host: &str) {
        self.net.plug(host);
    }

    /// Cuts `a` and `b` apart, both ways; each still reaches the others.
    pub fn cut(&self, a: &str, b: &str) {
        self.net.cut(a, b);
    }

    /// Cuts `host` from the three servers only (it still reaches every
    /// other host and their agents).
    pub fn cut_from_servers(&self, host: &str) {
        for server in SERVERS {
            self.net.cut(host, server);
        }
    }

    /// Undoes [`Datacenter::cut`] of `a` and `b`.
    pub fn heal(&self, a: &str, b: &str) {
        self.net.heal(a, b);
    }

    /// Drops UDP datagrams to `port` between `a` and `b`, both ways; the
    /// rest of their traffic passes.
    pub fn cut_udp(&self, a: &str, b: &str, port: u16) {
        self.net.cut_udp(a, b, port);
    }

    /// Undoes [`Datacenter::cut_udp`].
    pub fn heal_udp(&self, a: &str, b: &str, port: u16) {
        self.net.heal_udp(a, b, port);
    }

    /// Undoes every cut, UDP ones too.
    pub fn heal_all(&self) {
        self.net.heal_all();
    }

    fn with_agent<T>(&self, host: &str, f: impl FnOnce(&mut Agent) -> T) -> T {
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        let agent = agents
            .get_mut(host)
            .unwrap_or_else(|| panic!("no host {host} in the datacenter"));
        f(agent)
    }

    fn spawn_agent(&self, name: &str) {
        let host = self.host(name);
        let mut args: Vec<String> = vec!["agent".into()];
        let (server, dir) = self.with_agent(name, |a| (a.server, a.dir.clone()));
        if server {
            args.extend(["-server".into(), "-bootstrap-expect=3".into()]);
        }
        args.extend([
            format!("-data-dir={}", dir.join("data").display()),
            format!("-node={name}"),
            format!("-bind={}", host.ip()),
            format!("-client={} 127.0.0.1", host.ip()),
            // The hosts share one kernel: host-derived node IDs would collide.
            "-disable-host-node-id".into(),
            "-retry-interval=500ms".into(),
            // Never phone home.
            "-hcl=disable_update_check = true".into(),
            "-log-level=info".into(),
        ]);
        for server in SERVERS.iter().filter(|s| **s != name) {
            args.push(format!("-retry-join={}", self.host(server).ip()));
        }
        if let Some(m) = self.spec.raft_multiplier {
            args.push(format!("-hcl=performance {{ raft_multiplier = {m} }}"));
        }
        if let Some(g) = self.spec.gossip_lan {
            args.push(format!("-hcl={}", g.hcl()));
        }
        args.extend(self.spec.extra_hcl.iter().map(|hcl| format!("-hcl={hcl}")));
        let mut cmd = host.command(consul_binary());
        cmd.args(args);
        let process = host.spawn_logged(cmd, &dir.join("consul.log"));
        self.with_agent(name, |a| a.process = Some(process));
    }

    /// Waits until a client agent knows the leader and sees its own node in
    /// the catalog with `serfHealth` passing; panics with its log tail if
    /// it exits or takes longer than [`START_TIMEOUT`].
    async fn wait_agent_ready(&self, name: &str) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if !self.agent_running(name) {
                panic!(
                    "the Consul agent of {name} exited; log tail:\n{}",
                    crate::netns::tail(&self.agent_log(name), 4096)
                );
            }
            if self.leader_seen_by(name).await.is_some()
                && self.serf_health(name, name).await.as_deref() == Some("passing")
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the Consul agent of {name} not ready after {START_TIMEOUT:?}; log tail:\n{}",
                    crate::netns::tail(&self.agent_log(name), 4096)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the agent of `name` sees `count` members, all alive;
    /// panics with its member list after [`START_TIMEOUT`].
    async fn wait_sees_all(&self, name: &str, count: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let members = self.members(name).await;
            if members
                .as_ref()
                .is_some_and(|m| m.len() == count && m.iter().all(|m| m.status == 1))
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!("the Consul agent of {name} sees {members:?} after {START_TIMEOUT:?}, not {count} live members");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Tears it down now (what drop does), returning how long it took.
    pub fn stop(self) -> Duration {
        let began = Instant::now();
        drop(self);
        began.elapsed()
    }
}

/// A LAN member as an agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its node name (= host name).
    pub name: String,
    /// Serf status: 1 alive, 2 leaving, 3 left, 4 failed.
    pub status: i64,
    /// Whether it is a server.
    pub server: bool,
}

impl Drop for Datacenter {
    fn drop(&mut self) {
        let agents = self.agents.get_mut().unwrap_or_else(PoisonError::into_inner);
        if std::thread::panicking() {
            for (name, agent) in agents.iter() {
                eprintln!(
                    "testkit: Consul agent of {name}, log tail (test failed):\n{}",
                    crate::netns::tail(&agent.dir.join("consul.log"), 1536)
                );
            }
        }
        for agent in agents.values_mut() {
            if let Some(p) = agent.process.as_mut() {
                p.kill();
            }
        }
    }
}
