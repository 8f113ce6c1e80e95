//! `halo-testkit`: real Consul agents for halo's tests (dev-only).
//!
//! Every test that needs Consul starts its own: [`ConsulAgent::start`] runs
//! `consul agent -dev` on free loopback ports ([`ConsulAgent::start_with`]
//! adds configuration, [`ConsulAgent::start_with_acl`] turns on ACLs with a
//! known master token), [`ConsulCluster::start`] runs
//! three (or N) servers on their own 127.0.0.x addresses, and
//! [`ConsulCluster::add_client`] a client agent joined to them. Processes are
//! killed when their handle drops, even when the test panics. No fixed ports
//! and no shared state, so tests run in parallel.
//!
//! The Consul binary comes from `scripts/consul.sh`, which provisions Debian
//! bullseye's `consul` 1.8.7 on first use; a plain `cargo test` on a fresh
//! machine therefore needs nothing installed by hand.
//!
//! # Layout
//! - `process`: one Consul process: ports, arguments, log file, kill on drop.
//! - `ports`: free-port allocation on a loopback address.
//! - [`http`]: a tiny HTTP/1.0 client for readiness polling and admin APIs,
//!   independent of the code under test.
//! - [`eventually`]: poll a condition until a generous deadline;
//!   [`output_within`]: run a command that must end promptly.
//! - [`tls`]: a CA and certificates made by `consul tls`, and the agent
//!   settings for HTTPS ([`ConsulAgent::start_with_tls`]).
//! - [`fault`]: a TCP proxy that can cut the path to an agent like a
//!   partition.
//! - [`dnsd`]: dnsmasq backends, dig and dnsperf clients for the UDP
//!   tests (Debian's packages, installed as root when missing).
//! - [`forge`]: packets an attacker on the network would forge (an ICMP
//!   port-unreachable quoting a victim's UDP socket).
//! - [`netns`]: hosts in network namespaces on one bridge (a client, two
//!   balancers and a backend by default), network faults between them,
//!   removed on drop; [`netns::required`] gates such tests.
//! - [`dc`]: a production-shaped datacenter on that machinery: three Consul
//!   servers, a client agent on every other host (balancers, backends, a
//!   client), and fault primitives (power off, cable pull, partitions,
//!   pause, leader kill).
//! - [`reference`](mod@reference): the configuration reference in `docs/reference/` held
//!   against the schema serde really reads.

pub mod dc;
pub mod dnsd;
pub mod ecmp;
pub mod fault;
pub mod forge;
pub mod http;
pub mod netns;
pub mod notify;
mod ports;
mod process;
pub mod reference;
pub mod tls;

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use ports::free_port;
use process::{Member, MemberSpec, Role};

/// How long an agent may take to start and elect a leader before the test
/// fails. Generous: CI machines have two cores and tests run in parallel.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The Consul binary, provisioned once per test process by
/// `scripts/consul.sh` (which serialises concurrent provisioning itself).
pub fn consul_binary() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = workspace_root().join("scripts/consul.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed: {}",
                script.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Ok(PathBuf::from(path))
    })
    .clone()
    .unwrap_or_else(|e| panic!("no Consul binary for tests: {e}"))
}

/// The workspace root (where `scripts/` lives).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives one level below the workspace root")
        .to_path_buf()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics naming `what`
/// after `timeout`. Tests wait for conditions with this, never with bare
/// sleeps.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `cmd` to completion with its stdout and stderr captured, polling
/// every 20 ms; if it has not exited after `limit`, kills it and panics with
/// what it wrote so far. For commands that must end promptly (a bad config
/// refused at start) and used to hang instead: the test fails rather than
/// hangs.
pub fn output_within(mut cmd: Command, limit: Duration) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() >= deadline {
            let _already_gone = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} still running after {limit:?}; killed. stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A single `consul agent -dev` (server and client in one, in memory) on free
/// loopback ports. Killed on drop.
#[derive(Debug)]
pub struct ConsulAgent {
    member: Member,
}

/// Extra settings for a dev agent started with [`ConsulAgent::start_with`].
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Configuration fragments in HCL, each passed as one `-hcl=` argument,
    /// e.g. `acl { enabled = true }`.
    pub extra_hcl: Vec<String>,
    /// The token the testkit's own readiness polls send. Needed when the
    /// extra configuration turns on ACLs with `default_policy = "deny"`, or
    /// the agent's node would never look ready. Unset: none.
    pub token: Option<String>,
}

impl ConsulAgent {
    /// Starts a dev agent on 127.0.0.1 and waits until it has elected itself
    /// leader and registered its node, so sessions can be created at once.
    pub async fn start() -> ConsulAgent {
        ConsulAgent::start_with(AgentOptions::default()).await
    }

    /// [`ConsulAgent::start`] with extra configuration.
    pub async fn start_with(options: AgentOptions) -> ConsulAgent {
        let mut spec = MemberSpec::new(Role::Dev, Ipv4Addr::LOCALHOST);
        spec.extra_hcl = options.extra_hcl;
        spec.token = options.token;
        let mut member = Member::new(spec);
        member.start().await;
        ConsulAgent { member }
    }

    /// A dev agent with ACLs enabled, `default_policy = "deny"`, and
    /// `master_token` as both the master (management) token and the agent's
    /// own token, so the node still registers itself. `master_token` must be
    /// a UUID, as Consul requires of secrets it did not generate.
    pub async fn start_with_acl(master_token: &str) -> ConsulAgent {
        ConsulAgent::start_with(AgentOptions {
            extra_hcl: vec![format!(
                "acl {{ enabled = true, default_policy = \"deny\", \
                 tokens {{ master = \"{master_token}\", agent = \"{master_token}\" }} }}"
            )],
            token: Some(master_token.to_owned()),
        })
        .await
    }

    /// A dev agent that also serves its API over HTTPS, with `certs` and,
    /// when `require_client_cert`, `verify_incoming_https`. The plain HTTP
    /// port stays open (the testkit's readiness polls use it). Returns the
    /// agent and its HTTPS address.
    pub async fn start_with_tls(
        certs: &tls::Certs,
        require_client_cert: bool,
        mut options: AgentOptions,
    ) -> (ConsulAgent, SocketAddr) {
        let port = free_port(Ipv4Addr::LOCALHOST);
        options.extra_hcl.extend(certs.agent_hcl(port, require_client_cert));
        let agent = ConsulAgent::start_with(options).await;
        (agent, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
    }

    /// On an agent started with [`ConsulAgent::start_with_acl`]: creates
    /// policy `name` with `rules` (HCL, e.g. a file of `packaging/consul/`)
    /// and a token linked to it alone, through `master_token`; returns the
    /// token's SecretID.
    pub async fn create_token(&self, master_token: &str, name: &str, rules: &str) -> String {
        let policy = serde_json::json!({ "Name": name, "Rules": rules }).to_string();
        let (status, body) = http::request_with_token(self.http_addr(), "PUT", "/v1/acl/policy", master_token, &policy)
            .await
            .expect("the agent answers PUT /v1/acl/policy");
        assert_eq!(status, 200, "create policy {name}: {body}");
        let token = serde_json::json!({
            "Description": format!("{name} (test)"),
            "Policies": [{ "Name": name }],
        })
        .to_string();
        let (status, body) = http::request_with_token(self.http_addr(), "PUT", "/v1/acl/token", master_token, &token)
            .await
            .expect("the agent answers PUT /v1/acl/token");
        assert_eq!(status, 200, "create token for {name}: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("token JSON");
        answer["SecretID"].as_str().expect("SecretID").to_owned()
    }

    /// On an agent started with [`ConsulAgent::start_with_acl`]: deletes
    /// the token whose SecretID is `secret` (as [`ConsulAgent::create_token`]
    /// returned it), through `master_token`. Calls with it are refused from
    /// then on ("ACL not found").
    pub async fn revoke_token(&self, master_token: &str, secret: &str) {
        let (status, body) = http::get_with_token(self.http_addr(), "/v1/acl/token/self", secret)
            .await
            .expect("the agent answers GET /v1/acl/token/self");
        assert_eq!(status, 200, "read the token to revoke: {body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("token JSON");
        let accessor = answer["AccessorID"].as_str().expect("AccessorID");
        let (status, body) = http::request_with_token(
            self.http_addr(),
            "DELETE",
            &format!("/v1/acl/token/{accessor}"),
            master_token,
            "",
        )
        .await
        .expect("the agent answers DELETE /v1/acl/token");
        assert_eq!(status, 200, "delete token {accessor}: {body}");
    }

    /// `127.0.0.1:<port>` of the HTTP API.
    pub fn http_addr(&self) -> SocketAddr {
        self.member.http_addr()
    }

    /// `http://127.0.0.1:<port>`, ready for a client config.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr())
    }

    /// The DNS interface (UDP and TCP on the same port).
    pub fn dns_addr(&self) -> SocketAddr {
        self.member.dns_addr()
    }

    /// The agent's node name.
    pub fn node_name(&self) -> &str {
        self.member.node_name()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.member.pid()
    }

    /// Kills the agent (SIGKILL), as a crash would.
    pub fn stop(&mut self) {
        self.member.kill();
    }

    /// Starts the agent again on the same ports. A dev agent keeps no state:
    /// registrations, sessions and KV are gone.
    pub async fn restart(&mut self) {
        self.member.kill();
        self.member.start().await;
    }

    /// The path of the agent's log file, for debugging a failed test.
    pub fn log_path(&self) -> PathBuf {
        self.member.log_path()
    }
}

/// N Consul servers, each on its own 127.0.0.x address, joined into one
/// datacenter with a persistent data dir so a member can be stopped and
/// restarted. Killed on drop.
#[derive(Debug)]
pub struct ConsulCluster {
    servers: Vec<Member>,
}

impl ConsulCluster {
    /// Starts `n` servers (`n` ≥ 1; use 3 or 5) and waits until they have
    /// elected a leader that every server knows.
    pub async fn start(n: usize) -> ConsulCluster {
        assert!(n >= 1, "a cluster needs at least one server");
        let base = ports::random_loopback_block(n + 8);
        let mut specs: Vec<MemberSpec> = (0..n)
            .map(|i| MemberSpec::new(Role::Server { expect: n }, base.nth(i)))
            .collect();
        let joins: Vec<SocketAddr> = specs.iter().map(|s| s.serf_lan_addr()).collect();
        for spec in &mut specs {
            spec.retry_join = joins.clone();
        }
        let mut servers: Vec<Member> = specs.into_iter().map(Member::new).collect();
        for server in &mut servers {
            server.spawn();
        }
        for server in &mut servers {
            server.wait_ready().await;
        }
        let cluster = ConsulCluster { servers };
        cluster.wait_for_leader().await;
        cluster
    }

    /// The number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Always false: a cluster has at least one server.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// HTTP address of server `i`.
    pub fn http_addr(&self, i: usize) -> SocketAddr {
        self.servers[i].http_addr()
    }

    /// `http://…` of server `i`.
    pub fn http_url(&self, i: usize) -> String {
        format!("http://{}", self.http_addr(i))
    }

    /// DNS address of server `i`.
    pub fn dns_addr(&self, i: usize) -> SocketAddr {
        self.servers[i].dns_addr()
    }

    /// Node name of server `i`.
    pub fn node_name(&self, i: usize) -> &str {
        self.servers[i].node_name()
    }

    /// Whether server `i` is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.servers[i].pid().is_some()
    }

    /// Index of the current leader, asked of the first running server.
    pub async fn leader(&self) -> Option<usize> {
        for server in self.servers.iter().filter(|s| s.pid().is_some()) {
            if let Some(leader) = server.leader().await {
                return self.servers.iter().position(|s| s.server_rpc_addr() == leader);
            }
        }
        None
    }

    /// Kills server `i` (SIGKILL), as a crash would.
    pub fn stop(&mut self, i: usize) {
        self.servers[i].kill();
    }

    /// Starts server `i` again with its data dir; it rejoins the cluster.
    pub async fn restart(&mut self, i: usize) {
        self.servers[i].kill();
        self.servers[i].spawn();
        self.servers[i].wait_ready().await;
        self.wait_for_leader().await;
    }

    /// Waits until every running server reports the same leader.
    pub async fn wait_for_leader(&self) {
        eventually(START_TIMEOUT, "the Consul cluster to agree on a leader", || async {
            let mut seen = None;
            for server in self.servers.iter().filter(|s| s.pid().is_some()) {
                let leader = server.leader().await?;
                if seen.get_or_insert(leader) != &leader {
                    return None;
                }
            }
            seen
        })
        .await;
    }

    /// Starts a client agent on a new 127.0.0.x address, joined to the
    /// servers, and waits until it is a catalog node. Halo instances talk to
    /// a local client agent, as in production; stopping that agent cuts an
    /// instance off from Consul without touching the servers.
    pub async fn add_client(&self) -> ConsulAgent {
        let ip = ports::random_loopback_block(1).nth(0);
        let mut spec = MemberSpec::new(Role::Client, ip);
        spec.retry_join = self.servers.iter().map(|s| s.serf_lan_addr()).collect();
        let mut member = Member::new(spec);
        member.start().await;
        ConsulAgent { member }
    }
}
