//! A small Ethernet network in network namespaces, made and removed by the
//! test that uses it.
//!
//! [`Topology::start`] creates five namespaces: one holding a bridge `br0`,
//! and four hosts, `client`, `lb1`, `lb2` and `backend`, each with an `eth0`
//! joined to the bridge by a veth pair and an address in
//! 198.18.x.0/24 (198.18.0.0/15 is reserved for network benchmarks: RFC
//! 2544). Nothing routes out of the namespaces, and the host's own interfaces
//! are never touched: links are created directly inside the namespaces.
//! Dropping the topology, also while a test panics, kills every process left
//! in its namespaces and deletes them, which deletes their links.
//!
//! These tests need root (CAP_SYS_ADMIN for namespaces, CAP_NET_ADMIN for
//! links) and iproute2. Each starts with [`required`]: with
//! `HALO_NETNS_TESTS=1` (CI sets it) the test must run and fails if it
//! cannot; otherwise it says loudly that it was skipped and returns.

use std::ffi::OsStr;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The variable that turns netns tests on: `HALO_NETNS_TESTS=1`.
pub const ENV: &str = "HALO_NETNS_TESTS";

/// The prefix of every namespace a test creates: `halo-<pid>-<n>-<host>`.
const PREFIX: &str = "halo-";

/// The interface every host has, joined to the bridge.
pub const INTERFACE: &str = "eth0";

/// The prefix length of the topology's subnet.
pub const PREFIX_LEN: u8 = 24;

/// Decides whether a netns test runs. With `HALO_NETNS_TESTS=1` it must:
/// this returns true, or panics naming what is missing (root, `ip`).
/// Otherwise it prints `SKIPPED: netns test <test> needs HALO_NETNS_TESTS=1
/// and root` to stderr, past the test harness's capture, and returns false:
///
/// ```no_run
/// if !halo_testkit::netns::required("floating::vip_moves") {
///     return;
/// }
/// ```
pub fn required(test: &str) -> bool {
    match std::env::var(ENV).as_deref() {
        Ok("1") => {
            if let Err(why) = preflight() {
                panic!("{ENV}=1, but netns test {test} cannot run: {why}");
            }
            true
        }
        _ => {
            // Straight to the stderr handle: the harness captures `eprintln!`
            // of passing tests, and a silent skip looks like a pass.
            let line = format!("SKIPPED: netns test {test} needs {ENV}=1 and root\n");
            if let Err(e) = std::io::stderr().write_all(line.as_bytes()) {
                // Nowhere left to say it; the test still must not run.
                drop(e);
            }
            false
        }
    }
}

/// Root's capabilities and iproute2, or why not.
fn preflight() -> Result<(), String> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status =
        std::fs::read_to_string("/proc/self/status").map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or("no CapEff line in /proc/self/status")?;
    for (bit, name) in [(CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (CAP_NET_ADMIN, "CAP_NET_ADMIN")] {
        if effective & (1 << bit) == 0 {
            return Err(format!(
                "not running as root ({name} is missing); run the tests as root"
            ));
        }
    }
    ip_binary().map(drop)
}

/// iproute2's `ip`: on PATH, or in the sbin directories a non-login PATH
/// may lack.
fn ip_binary() -> Result<&'static PathBuf, String> {
    static IP: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    IP.get_or_init(|| {
        let candidates = [
            PathBuf::from("ip"),
            "/usr/sbin/ip".into(),
            "/sbin/ip".into(),
            "/usr/bin/ip".into(),
        ];
        candidates
            .into_iter()
            .find(|ip| {
                Command::new(ip)
                    .arg("-V")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .ok_or_else(|| "iproute2's `ip` is not installed (apt-get install iproute2)".to_owned())
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn ip() -> &'static PathBuf {
    ip_binary().unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `cmd`, panicking with its stderr if it fails; returns its stdout.
fn run(cmd: &mut Command) -> String {
    let Output { status, stdout, stderr } = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !status.success() {
        panic!("{cmd:?} failed ({status}): {}", String::from_utf8_lossy(&stderr).trim());
    }
    String::from_utf8_lossy(&stdout).into_owned()
}

/// `ip <args>`, panicking on failure.
fn ip_run<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run(Command::new(ip()).args(args))
}

/// One host of a [`Topology`]: a namespace with `lo` and `eth0` up.
#[derive(Debug)]
pub struct Host {
    name: &'static str,
    netns: String,
    ip: Ipv4Addr,
    mac: String,
    /// Pids of the processes started with [`Host::spawn`], which the
    /// topology kills on drop: `ip netns pids` misses one that has not yet
    /// entered the namespace.
    spawned: Arc<Mutex<Vec<u32>>>,
}

impl Host {
    /// `client`, `lb1`, `lb2` or `backend`.
    pub fn name(&self) -> &str {
        self.name
    }

    /// The namespace's name, for `ip netns exec` and `ip -n`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its address on [`INTERFACE`].
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The MAC of its [`INTERFACE`], as `ip` prints it (`aa:bb:…`).
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// `ip netns exec <netns> <program>`: add arguments and run it, or hand
    /// it to [`Host::spawn`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(ip());
        cmd.args(["netns", "exec", &self.netns]).arg(program);
        cmd
    }

    /// Runs `program args…` in the namespace and returns its stdout; panics
    /// with its stderr if it fails.
    pub fn run<I, S>(&self, program: &str, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run(self.command(program).args(args))
    }

    /// Starts a long-running process made by [`Host::command`]. It is killed
    /// when the returned guard drops, when the test's thread dies
    /// (`PR_SET_PDEATHSIG`), or at the latest with the topology.
    pub fn spawn(&self, mut cmd: Command) -> HostProcess {
        let args: Vec<&OsStr> = cmd.get_args().take(3).collect();
        assert!(
            args == [OsStr::new("netns"), OsStr::new("exec"), OsStr::new(&self.netns)],
            "Host::spawn takes a command from Host::command, so that it runs in {}",
            self.netns
        );
        crate::process::kill_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?} in {}: {e}", self.netns));
        self.spawned.lock().expect("spawned pids poisoned").push(child.id());
        HostProcess { host: self.name, child }
    }

    /// Runs `f` on a thread that has entered this host's network namespace.
    /// Sockets made there stay in the namespace and may be used from any
    /// thread afterwards, which is how a test talks to a host directly.
    pub fn within<T, F>(&self, f: F) -> std::io::Result<T>
    where
        F: FnOnce() -> std::io::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.netns);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path)?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            f()
        })
        .join()
        .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
    }

    /// A TCP connection from this host to `addr`, as a tokio stream.
    pub async fn connect(&self, addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let stream = self.within(move || {
            let stream = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
            stream.set_nonblocking(true)?;
            Ok(stream)
        })?;
        tokio::net::TcpStream::from_std(stream)
    }

    /// Sets a sysctl of this namespace (`key` as in `sysctl`, with dots).
    /// Writes `/proc/sys` directly: procps' `sysctl` is not always installed.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run("sh", ["-c", "echo \"$1\" > \"$2\"", "sh", value, &path]);
    }

    /// The MAC this host's neighbour table has for `ip` on [`INTERFACE`], in
    /// any state with an address (REACHABLE, STALE, DELAY, …).
    pub fn neighbour(&self, ip: Ipv4Addr) -> Option<String> {
        let out = ip_run(["-n", &self.netns, "neigh", "show", &ip.to_string(), "dev", INTERFACE]);
        let mut words = out.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_owned)
    }

    /// The IPv4 addresses on [`INTERFACE`], without prefix lengths.
    pub fn addresses(&self) -> Vec<Ipv4Addr> {
        let out = ip_run(["-n", &self.netns, "-4", "-o", "addr", "show", "dev", INTERFACE]);
        out.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect()
    }
}

/// A process started in a host's namespace; SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct HostProcess {
    host: &'static str,
    child: Child,
}

impl HostProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child, for its stdin and stdout pipes and its exit status.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// SIGKILLs and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        if let Err(e) = self.child.kill() {
            eprintln!("testkit: kill {} in {}: {e}", self.child.id(), self.host);
        }
        if let Err(e) = self.child.wait() {
            eprintln!("testkit: reap {} in {}: {e}", self.child.id(), self.host);
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The client, two balancers and a backend on one bridge, each in its own
/// namespace; deleted with everything in it on drop.
#[derive(Debug)]
pub struct Topology {
    /// `halo-<pid>-<n>-`.
    prefix: String,
    /// x in 198.18.x.0/24.
    subnet: u8,
    /// Every namespace created so far, bridge first, for the cleanup.
    namespaces: Vec<String>,
    hosts: Vec<Host>,
}

/// The hosts and the last octet of their addresses.
const HOSTS: [(&str, u8); 4] = [("client", 10), ("lb1", 11), ("lb2", 12), ("backend", 20)];

impl Topology {
    /// Creates the namespaces, the bridge and the links, and brings them up.
    /// Panics if any step fails, after removing what it had made. Call
    /// [`required`] first.
    pub fn start() -> Topology {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        static SWEEP: OnceLock<()> = OnceLock::new();
        // One topology at a time per test process: the first `ip netns add`
        // on a machine sets up /run/netns's mount, and two at once can race.
        static CREATING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = CREATING.lock().unwrap_or_else(PoisonError::into_inner);
        SWEEP.get_or_init(sweep_stale);

        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // The namespaces keep topologies apart; a subnet per topology only
        // makes addresses in logs and captures tell tests apart.
        let subnet = u8::try_from((pid.wrapping_mul(31).wrapping_add(n)) % 256).expect("below 256");
        let mut topology = Topology {
            prefix: format!("{PREFIX}{pid}-{n}-"),
            subnet,
            namespaces: Vec::new(),
            hosts: Vec::new(),
        };
        // From here on, a panic drops `topology`, which removes what exists.
        let bridge = topology.add_namespace("br");
        ip_run([
            "-n",
            &bridge,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "forward_delay",
            "0",
        ]);
        ip_run(["-n", &bridge, "link", "set", "br0", "up"]);
        for (name, last) in HOSTS {
            let netns = topology.add_namespace(name);
            // Created directly in their namespaces: no name ever appears in
            // the host's own namespace, where it could clash.
            ip_run([
                "link", "add", INTERFACE, "netns", &netns, "type", "veth", "peer", "name", name, "netns", &bridge,
            ]);
            ip_run(["-n", &bridge, "link", "set", name, "master", "br0", "up"]);
            let ip = topology.addr(last);
            ip_run([
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip}/{PREFIX_LEN}"),
                "dev",
                INTERFACE,
            ]);
            ip_run(["-n", &netns, "link", "set", INTERFACE, "up"]);
            let link = ip_run(["-n", &netns, "-o", "link", "show", "dev", INTERFACE]);
            let mut words = link.split_whitespace();
            let mac = words
                .find(|w| *w == "link/ether")
                .and_then(|_| words.next())
                .unwrap_or_else(|| panic!("no MAC in `ip link show` of {netns}: {link}"))
                .to_owned();
            topology.hosts.push(Host {
                name,
                netns,
                ip,
                mac,
                spawned: Arc::default(),
            });
        }
        topology
    }

    fn add_namespace(&mut self, name: &str) -> String {
        let netns = format!("{}{name}", self.prefix);
        ip_run(["netns", "add", &netns]);
        self.namespaces.push(netns.clone());
        ip_run(["-n", &netns, "link", "set", "lo", "up"]);
        netns
    }

    /// 198.18.x.`last`, on this topology's subnet.
    pub fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, last)
    }

    /// 198.18.x.100: the address tests float between the balancers.
    pub fn vip(&self) -> Ipv4Addr {
        self.addr(100)
    }

    /// A host by name; panics on an unknown one.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name} in the topology"))
    }

    /// The client, 198.18.x.10.
    pub fn client(&self) -> &Host {
        self.host("client")
    }

    /// The first balancer, 198.18.x.11.
    pub fn lb1(&self) -> &Host {
        self.host("lb1")
    }

    /// The second balancer, 198.18.x.12.
    pub fn lb2(&self) -> &Host {
        self.host("lb2")
    }

    /// The backend, 198.18.x.20.
    pub fn backend(&self) -> &Host {
        self.host("backend")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Not reaped until their HostProcess guard waits for them, so
            // these pids cannot have been reused.
            for pid in host.spawned.lock().map(|p| p.clone()).unwrap_or_default() {
                if let Err(e) = kill(Pid::from_raw(pid as i32), Signal::SIGKILL) {
                    if e != nix::errno::Errno::ESRCH {
                        eprintln!("testkit: kill {pid} in {}: {e}", host.netns);
                    }
                }
            }
        }
        for netns in self.namespaces.iter().rev() {
            remove_namespace(netns);
        }
    }
}

/// Kills every process in `netns` (a namespace lives on while one remains),
/// then deletes it, which deletes its links. Reports failures without
/// panicking: this runs in `Drop`, maybe during a panic.
fn remove_namespace(netns: &str) {
    let Ok(ip) = ip_binary() else { return };
    match Command::new(ip).args(["netns", "pids", netns]).output() {
        Ok(out) => {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                // Only processes inside our own namespace are listed.
                if let Ok(pid) = pid.parse::<i32>() {
                    if let Err(e) = kill(Pid::from_raw(pid), Signal::SIGKILL) {
                        eprintln!("testkit: kill {pid} in {netns}: {e}");
                    }
                }
            }
        }
        Err(e) => eprintln!("testkit: ip netns pids {netns}: {e}"),
    }
    match Command::new(ip).args(["netns", "delete", netns]).output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "testkit: ip netns delete {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("testkit: ip netns delete {netns}: {e}"),
    }
}

/// Deletes namespaces left by test processes that were killed before their
/// guards ran (`halo-<pid>-…` whose pid is gone). Once per test process.
fn sweep_stale() {
    let Ok(ip) = ip_binary() else { return };
    let Ok(out) = Command::new(ip).args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "halo-123-0-lb1" or "halo-123-0-lb1 (id: 4)"
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()) else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if !PathBuf::from(format!("/proc/{pid}")).exists() {
            eprintln!("testkit: removing namespace {name}, left by test process {pid}");
            remove_namespace(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces() -> String {
        ip_run(["netns", "list"])
    }

    #[test]
    fn topology_joins_four_hosts_and_removes_everything_on_drop() {
        if !required("netns::tests::topology_joins_four_hosts_and_removes_everything_on_drop") {
            return;
        }
        let topology = Topology::start();
        let prefix = topology.prefix.clone();
        assert_eq!(
            namespaces().matches(prefix.as_str()).count(),
            5,
            "a bridge and four hosts"
        );
        let hosts = [topology.client(), topology.lb1(), topology.lb2(), topology.backend()];
        for host in hosts {
            assert_eq!(host.addresses(), vec![host.ip()], "{}", host.name());
            assert!(topology.vip().octets()[..3] == host.ip().octets()[..3]);
            assert_eq!(host.ip().octets()[..2], [198, 18]);
        }
        let mut macs: Vec<&str> = hosts.iter().map(|h| h.mac()).collect();
        macs.sort_unstable();
        macs.dedup();
        assert_eq!(macs.len(), 4, "distinct MACs: {macs:?}");

        // A process in a namespace keeps it alive: the topology kills it.
        let mut cmd = topology.backend().command("sleep");
        cmd.arg("600");
        let mut sleeper = topology.backend().spawn(cmd);
        drop(topology);
        let status = sleeper.child().wait().unwrap();
        assert!(!status.success(), "killed with its topology: {status}");
        assert!(!namespaces().contains(prefix.as_str()), "{}", namespaces());
    }

    /// Needs no root: the check comes before anything is started.
    #[test]
    #[should_panic(expected = "Host::spawn takes a command from Host::command")]
    fn spawn_refuses_a_command_outside_the_namespace() {
        let host = Host {
            name: "client",
            netns: "halo-0-0-client".to_owned(),
            ip: Ipv4Addr::new(198, 18, 0, 10),
            mac: "02:00:00:00:00:0a".to_owned(),
            spawned: Arc::default(),
        };
        host.spawn(Command::new("true"));
    }
}
