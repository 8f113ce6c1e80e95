//! One Consul process: its ports, arguments, log file, and lifetime.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{consul_binary, http, ports, START_TIMEOUT};

/// What kind of agent a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `-dev`: a one-node server in memory.
    Dev,
    /// A server of a cluster of `expect`, with a data dir.
    Server { expect: usize },
    /// A client agent joined to servers, with a data dir.
    Client,
}

/// The ports one agent listens on, all free on its address when chosen.
#[derive(Debug, Clone, Copy)]
struct Ports {
    http: u16,
    dns: u16,
    serf_lan: u16,
    serf_wan: u16,
    server: u16,
    grpc: u16,
}

impl Ports {
    fn pick(ip: Ipv4Addr) -> Ports {
        Ports {
            http: ports::free_port(ip),
            dns: ports::free_port(ip),
            serf_lan: ports::free_port(ip),
            serf_wan: ports::free_port(ip),
            server: ports::free_port(ip),
            grpc: ports::free_port(ip),
        }
    }
}

/// Everything needed to (re)start one agent.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    role: Role,
    ip: Ipv4Addr,
    node: String,
    ports: Ports,
    /// Serf LAN addresses to join (servers and clients).
    pub retry_join: Vec<SocketAddr>,
    /// Extra configuration, each passed as one `-hcl=` argument.
    pub extra_hcl: Vec<String>,
    /// Token the testkit's own readiness polls send (needed once ACLs
    /// default to deny).
    pub token: Option<String>,
}

impl MemberSpec {
    pub fn new(role: Role, ip: Ipv4Addr) -> MemberSpec {
        let ports = Ports::pick(ip);
        let kind = match role {
            Role::Dev => "dev",
            Role::Server { .. } => "server",
            Role::Client => "client",
        };
        MemberSpec {
            role,
            ip,
            // Unique across parallel tests, which may share a loopback address.
            node: format!("halo-{kind}-{ip}-{}", ports.http),
            ports,
            retry_join: Vec::new(),
            extra_hcl: Vec::new(),
            token: None,
        }
    }

    pub fn serf_lan_addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.ports.serf_lan))
    }

    fn args(&self, data_dir: &std::path::Path) -> Vec<String> {
        let p = &self.ports;
        let mut args: Vec<String> = vec!["agent".into()];
        match self.role {
            Role::Dev => args.push("-dev".into()),
            Role::Server { expect } => {
                args.extend(["-server".into(), format!("-bootstrap-expect={expect}")]);
            }
            Role::Client => {}
        }
        if self.role != Role::Dev {
            args.push(format!("-data-dir={}", data_dir.display()));
            // Servers share this host: a host-derived node ID would collide.
            args.push("-disable-host-node-id".into());
            args.push("-retry-interval=200ms".into());
            for join in &self.retry_join {
                if *join != self.serf_lan_addr() {
                    args.push(format!("-retry-join={join}"));
                }
            }
            // Dev mode's fast timings, so elections and failure detection
            // take about a second instead of tens.
            args.push("-hcl=performance { raft_multiplier = 1 }".into());
            args.push(
                "-hcl=gossip_lan { gossip_interval = \"100ms\" probe_interval = \"200ms\" probe_timeout = \"100ms\" suspicion_mult = 3 }"
                    .into(),
            );
        }
        args.extend([
            format!("-node={}", self.node),
            format!("-bind={}", self.ip),
            format!("-client={}", self.ip),
            format!("-http-port={}", p.http),
            format!("-dns-port={}", p.dns),
            format!("-serf-lan-port={}", p.serf_lan),
            format!("-serf-wan-port={}", p.serf_wan),
            format!("-server-port={}", p.server),
            format!("-grpc-port={}", p.grpc),
            // Never phone home: tests send traffic to loopback only.
            "-hcl=disable_update_check = true".into(),
            "-log-level=debug".into(),
        ]);
        args.extend(self.extra_hcl.iter().map(|hcl| format!("-hcl={hcl}")));
        args
    }
}

/// A Consul process that is killed when dropped.
#[derive(Debug)]
pub struct Member {
    spec: MemberSpec,
    dir: TempDir,
    child: Option<Child>,
}

impl Member {
    pub fn new(spec: MemberSpec) -> Member {
        let dir = tempfile::Builder::new()
            .prefix("halo-consul-")
            .tempdir()
            .expect("create a temp dir for a Consul agent");
        Member { spec, dir, child: None }
    }

    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::from((self.spec.ip, self.spec.ports.http))
    }

    pub fn dns_addr(&self) -> SocketAddr {
        SocketAddr::from((self.spec.ip, self.spec.ports.dns))
    }

    pub fn serf_lan_addr(&self) -> SocketAddr {
        self.spec.serf_lan_addr()
    }

    pub fn server_rpc_addr(&self) -> SocketAddr {
        SocketAddr::from((self.spec.ip, self.spec.ports.server))
    }

    pub fn node_name(&self) -> &str {
        &self.spec.node
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("consul.log")
    }

    /// Starts the process and waits until it is ready for its role. A single
    /// agent (dev or client) whose port was taken between choosing and
    /// binding is retried on fresh ports.
    pub async fn start(&mut self) {
        for attempt in 1..=3 {
            self.spawn();
            match self.wait_ready_or_exit().await {
                Ok(()) => return,
                Err(log) if attempt < 3 && log.contains("address already in use") => {
                    self.kill();
                    self.spec.ports = Ports::pick(self.spec.ip);
                }
                Err(log) => panic!(
                    "Consul agent {} exited during start-up; log tail:\n{log}",
                    self.spec.node
                ),
            }
        }
    }

    /// Starts the process without waiting.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent {} is already running", self.spec.node);
        let data_dir = self.dir.path().join("data");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the agent's log file");
        let mut cmd = Command::new(consul_binary());
        cmd.args(self.spec.args(&data_dir))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file handle"))
            .stderr(log);
        kill_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", consul_binary().display()));
        self.child = Some(child);
    }

    /// Waits until the member answers as its role requires; panics with the
    /// log tail if it exits or does not get there in time.
    pub async fn wait_ready(&mut self) {
        if let Err(log) = self.wait_ready_or_exit().await {
            panic!(
                "Consul agent {} exited during start-up; log tail:\n{log}",
                self.spec.node
            );
        }
    }

    async fn wait_ready_or_exit(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("({status})\n{}", self.log_tail()));
                }
            }
            if self.is_ready().await {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "Consul agent {} not ready after {START_TIMEOUT:?}; log tail:\n{}",
                    self.spec.node,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn is_ready(&self) -> bool {
        match self.spec.role {
            // Servers only need to answer; the cluster waits for a leader.
            Role::Server { .. } => self.get("/v1/status/leader").await.is_some(),
            // Single agents must have a leader and their node in the catalog
            // with a passing serfHealth, or session creation fails.
            Role::Dev | Role::Client => {
                let path = format!("/v1/health/node/{}", self.spec.node);
                matches!(
                    self.get(&path).await,
                    Some((200, body)) if body.contains("serfHealth") && body.contains("passing")
                )
            }
        }
    }

    /// The leader's server RPC address as this member sees it.
    pub async fn leader(&self) -> Option<SocketAddr> {
        let (status, body) = self.get("/v1/status/leader").await?;
        if status != 200 {
            return None;
        }
        body.trim().trim_matches('"').parse().ok()
    }

    /// A GET of the testkit's own, with the spec's token if it has one.
    async fn get(&self, path: &str) -> Option<(u16, String)> {
        match &self.spec.token {
            None => http::get(self.http_addr(), path).await,
            Some(token) => http::get_with_token(self.http_addr(), path, token).await,
        }
    }

    /// SIGKILLs the process and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Already exited is fine; any other failure leaves nothing to do.
            if let Err(e) = child.kill() {
                eprintln!("testkit: kill consul {}: {e}", child.id());
            }
            if let Err(e) = child.wait() {
                eprintln!("testkit: reap consul {}: {e}", child.id());
            }
        }
    }

    /// The last 4 KiB of the log.
    fn log_tail(&self) -> String {
        let mut buf = Vec::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if f.seek(SeekFrom::Start(len.saturating_sub(4096))).is_ok() {
                let _ignored_partial_read = f.read_to_end(&mut buf);
            }
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "testkit: Consul agent {} log tail (test failed):\n{}",
                self.spec.node,
                self.log_tail()
            );
        }
        self.kill();
    }
}

/// Makes the kernel SIGKILL the child when the thread that spawned it dies,
/// so agents never outlive a test process killed before its destructors ran
/// (a test-runner timeout, a SIGKILL). Test threads and tokio workers live
/// at least as long as the agents they start.
#[allow(unsafe_code)]
pub(crate) fn kill_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only calls
    // prctl(2), which is async-signal-safe; it touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
