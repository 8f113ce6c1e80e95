//! A small Ethernet network in network namespaces, made and removed by the
//! test that uses it.
//!
//! [`Topology::start`] creates five namespaces: one holding a bridge `br0`,
//! and four hosts, `client`, `lb1`, `lb2` and `backend`, each with an `eth0`
//! joined to the bridge by a veth pair, an address in 198.18.x.0/24
//! (198.18.0.0/15 is reserved for network benchmarks: RFC 2544) and one in
//! 2001:2::/64 (2001:2::/48 is IPv6's benchmarking range: RFC 5180), with
//! the same last number. Nothing routes out of the namespaces, and the host's own interfaces
//! are never touched: links are created directly inside the namespaces.
//! Dropping the topology, also while a test panics, kills every process left
//! in its namespaces and deletes them, which deletes their links.
//!
//! These tests need root (CAP_SYS_ADMIN for namespaces, CAP_NET_ADMIN for
//! links) and iproute2. Each starts with [`required`]: with
//! `HALO_NETNS_TESTS=1` (CI sets it) the test must run and fails if it
//! cannot; otherwise it says loudly that it was skipped and returns.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

/// The prefix length of the topology's IPv6 subnet, 2001:2::/64.
pub const PREFIX_LEN_V6: u8 = 64;

/// 2001:2::`last`: a host's IPv6 address (the same in every topology; the
/// namespaces keep them apart).
pub fn addr_v6(last: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, u16::from(last))
}

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

pub(crate) fn ip() -> &'static PathBuf {
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

/// Runs `cmd` with `input` on its stdin, panicking with its stderr if it
/// fails.
fn run_with_input(cmd: &mut Command, input: &str) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin is piped");
    if let Err(e) = stdin.write_all(input.as_bytes()) {
        panic!("cannot write to {cmd:?}: {e}");
    }
    drop(stdin);
    let Output { status, stderr, .. } = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("cannot wait for {cmd:?}: {e}"));
    if !status.success() {
        panic!(
            "{cmd:?} failed ({status}): {}\ninput:\n{input}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
}

/// nftables' `nft`, for [`Topology::cut`]; panics naming the package if
/// it is missing.
fn nft() -> &'static PathBuf {
    static NFT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    NFT.get_or_init(|| {
        ["nft", "/usr/sbin/nft", "/sbin/nft"]
            .into_iter()
            .map(PathBuf::from)
            .find(|nft| {
                Command::new(nft)
                    .arg("--version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .ok_or_else(|| "nftables' `nft` is not installed (apt-get install nftables)".to_owned())
    })
    .as_ref()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The flags of one `ip -o link show` line: `<BROADCAST,UP,…>`.
fn link_flags(line: &str) -> Vec<String> {
    line.split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

/// The MAC of [`INTERFACE`] in `netns`, as `ip` prints it.
fn link_mac(netns: &str) -> String {
    let link = ip_run(["-n", netns, "-o", "link", "show", "dev", INTERFACE]);
    let mut words = link.split_whitespace();
    words
        .find(|w| *w == "link/ether")
        .and_then(|_| words.next())
        .unwrap_or_else(|| panic!("no MAC in `ip link show` of {netns}: {link}"))
        .to_owned()
}

/// A pid as nix wants it.
pub(crate) fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pids fit in i32"))
}

/// The last `max` bytes of the file at `path`, lossy UTF-8; empty if it
/// cannot be read.
pub(crate) fn tail(path: &std::path::Path, max: u64) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if f.seek(SeekFrom::Start(len.saturating_sub(max))).is_ok() {
            if let Err(e) = f.take(max).read_to_end(&mut buf) {
                return format!("(cannot read {}: {e})", path.display());
            }
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// SIGKILLs every process in `host`'s namespace: the testkit's own (by the
/// pids it keeps, which are not reaped before their guards drop) and any
/// other `ip netns pids` lists.
fn kill_all_in(host: &Host) {
    let spawned = host.spawned.lock().map(|p| p.clone()).unwrap_or_default();
    let listed = ip_run(["netns", "pids", &host.netns]);
    let listed = listed.split_whitespace().filter_map(|p| p.parse::<u32>().ok());
    for pid in spawned.into_iter().chain(listed) {
        if let Err(e) = kill(pid_of(pid), Signal::SIGKILL) {
            if e != nix::errno::Errno::ESRCH {
                panic!("cannot kill {pid} in {}: {e}", host.netns);
            }
        }
    }
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
    name: String,
    netns: String,
    ip: Ipv4Addr,
    ip6: Ipv6Addr,
    mac: String,
    /// Pids of the processes started with [`Host::spawn`], which the
    /// topology kills on drop: `ip netns pids` misses one that has not yet
    /// entered the namespace.
    spawned: Arc<Mutex<Vec<u32>>>,
}

impl Host {
    /// `client`, `lb1`, `lb2` or `backend` in a [`Topology::start`]; see
    /// [`crate::dc`] for a datacenter's names. Also the name of its port on
    /// the bridge.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name, for `ip netns exec` and `ip -n`.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its address on [`INTERFACE`].
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its IPv6 address on [`INTERFACE`] (2001:2::x, x as in [`Host::ip`]).
    pub fn ip6(&self) -> Ipv6Addr {
        self.ip6
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
    pub fn spawn(&self, cmd: Command) -> HostProcess {
        self.spawn_inner(cmd, None)
    }

    /// [`Host::spawn`] with the process's stdout and stderr appended to
    /// `log` (created if missing), which [`HostProcess::log_tail`] reads.
    pub fn spawn_logged(&self, mut cmd: Command, log: &std::path::Path) -> HostProcess {
        let file = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open log file {}: {e}", log.display()));
        let stderr = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone log file handle {}: {e}", log.display()));
        cmd.stdin(Stdio::null()).stdout(file).stderr(stderr);
        self.spawn_inner(cmd, Some(log.to_path_buf()))
    }

    fn spawn_inner(&self, mut cmd: Command, log: Option<PathBuf>) -> HostProcess {
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
        HostProcess {
            host: self.name.clone(),
            child,
            log,
            spawned: Arc::clone(&self.spawned),
        }
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

    /// The MAC this host's neighbour table has for `ip` (IPv4 or IPv6) on
    /// [`INTERFACE`], in any state with an address (REACHABLE, STALE, DELAY,
    /// …).
    pub fn neighbour(&self, ip: impl Into<IpAddr>) -> Option<String> {
        let ip: IpAddr = ip.into();
        let out = ip_run(["-n", &self.netns, "neigh", "show", &ip.to_string(), "dev", INTERFACE]);
        let mut words = out.split_whitespace();
        words.find(|w| *w == "lladdr")?;
        words.next().map(str::to_owned)
    }

    /// The global IPv6 addresses on [`INTERFACE`], without prefix lengths.
    pub fn addresses_v6(&self) -> Vec<Ipv6Addr> {
        let out = ip_run([
            "-n",
            &self.netns,
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            INTERFACE,
            "scope",
            "global",
        ]);
        out.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet6")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect()
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
    host: String,
    child: Child,
    /// Where its output goes, if started with [`Host::spawn_logged`].
    log: Option<PathBuf>,
    /// Its host's list of unreaped pids, which it leaves once reaped so
    /// that the topology never signals a reused pid.
    spawned: Arc<Mutex<Vec<u32>>>,
}

impl HostProcess {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child, for its stdin and stdout pipes and its exit status.
    /// Reaping it here (`wait`) rather than through this guard leaves its
    /// pid on the topology's kill list until the guard drops.
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether it has been reaped; takes its pid off the host's kill list
    /// if so.
    fn reaped(&mut self) -> bool {
        let done = matches!(self.child.try_wait(), Ok(Some(_)));
        if done {
            let pid = self.child.id();
            self.spawned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .retain(|p| *p != pid);
        }
        done
    }

    /// The name of the host it runs in.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Its log file, if started with [`Host::spawn_logged`].
    pub fn log_path(&self) -> Option<&std::path::Path> {
        self.log.as_deref()
    }

    /// The last `max` bytes of its log file (lossy UTF-8); empty without
    /// one.
    pub fn log_tail(&self, max: u64) -> String {
        self.log.as_deref().map(|p| tail(p, max)).unwrap_or_default()
    }

    /// Whether it has not exited yet (reaping it if it has).
    pub fn is_running(&mut self) -> bool {
        !self.reaped()
    }

    /// Sends `signal` to it; an error if it has exited and been reaped
    /// (the pid is still ours until then, so it cannot hit another process).
    pub fn signal(&mut self, signal: Signal) -> nix::Result<()> {
        if self.reaped() {
            return Err(nix::errno::Errno::ESRCH);
        }
        kill(pid_of(self.child.id()), signal)
    }

    /// Freezes it with SIGSTOP, as a stalled VM or a debugger would: its
    /// sockets stay open and the kernel still completes TCP handshakes on
    /// its listeners, but nothing is read or answered. Panics if it has
    /// exited.
    pub fn pause(&mut self) {
        if let Err(e) = self.signal(Signal::SIGSTOP) {
            panic!("cannot SIGSTOP {} in {}: {e}", self.child.id(), self.host);
        }
    }

    /// Thaws it with SIGCONT after [`HostProcess::pause`]. Panics if it has
    /// exited.
    pub fn resume(&mut self) {
        if let Err(e) = self.signal(Signal::SIGCONT) {
            panic!("cannot SIGCONT {} in {}: {e}", self.child.id(), self.host);
        }
    }

    /// SIGKILLs and reaps it, as a crash would. Idempotent.
    pub fn kill(&mut self) {
        if self.reaped() {
            return;
        }
        if let Err(e) = self.child.kill() {
            eprintln!("testkit: kill {} in {}: {e}", self.child.id(), self.host);
        }
        if let Err(e) = self.child.wait() {
            eprintln!("testkit: reap {} in {}: {e}", self.child.id(), self.host);
        }
        self.reaped();
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Hosts on one bridge, each in its own namespace; deleted with everything
/// in it on drop. [`Topology::start`] makes the client, two balancers and a
/// backend; [`crate::dc::Datacenter`] builds a larger one with the same
/// machinery.
///
/// # Network faults
/// Each is usable mid-test and undone by its counterpart:
/// - [`Topology::unplug`] / [`Topology::plug`]: the host's cable, i.e. its
///   port on the bridge, goes down / up. The host keeps its processes and
///   its own `eth0` state (an unplugged machine does not know why the
///   carrier went away).
/// - [`Topology::cut`] / [`Topology::heal`]: drop every frame between two
///   hosts, both ways, while both still reach everybody else. Done with an
///   nftables `bridge` table in the bridge's namespace matching the two
///   bridge ports, so it covers every address either host owns (a floating
///   VIP too) and ARP, and neither host's own netfilter state is touched;
///   senders see silent loss, as on a broken path. Needs `nft` (Debian
///   package `nftables`).
/// - [`Topology::cut_udp`] / [`Topology::heal_udp`]: the same, for UDP
///   datagrams to one port only (e.g. a failure detector's probes), in the
///   same table; everything else between the two still passes.
/// - [`Topology::power_off`] / [`Topology::power_on`]: SIGKILL everything in
///   the host and take its `eth0` down; on power-on, `eth0` comes back up
///   with only the host's own address (a reboot forgets added ones, such
///   as a VIP).
#[derive(Debug)]
pub struct Topology {
    /// `halo-<pid>-<n>-`.
    prefix: String,
    /// x in 198.18.x.0/24.
    subnet: u8,
    /// The namespace holding `br0` and the hosts' bridge-side veth ends.
    bridge: String,
    /// Every namespace created so far, bridge first, for the cleanup.
    namespaces: Vec<String>,
    hosts: Vec<Host>,
    /// What [`Topology::cut`] and [`Topology::cut_udp`] drop now.
    cuts: Mutex<Cuts>,
}

/// The frames the cut table drops.
#[derive(Debug, Default)]
struct Cuts {
    /// Pairs of host names cut apart, each sorted.
    pairs: BTreeSet<(String, String)>,
    /// Pairs (sorted) between which UDP to the port is dropped.
    udp: BTreeSet<(String, String, u16)>,
}

/// The hosts and the last octet of their addresses.
const HOSTS: [(&str, u8); 4] = [("client", 10), ("lb1", 11), ("lb2", 12), ("backend", 20)];

/// The nftables table [`Topology::cut`] keeps in the bridge's namespace.
const CUT_TABLE: &str = "halo_cuts";

impl Topology {
    /// Creates the namespaces, the bridge and the links, and brings them up.
    /// Panics if any step fails, after removing what it had made. Call
    /// [`required`] first.
    pub fn start() -> Topology {
        Topology::with_hosts(&HOSTS.map(|(name, last)| (name.to_owned(), last)))
    }

    /// A topology of the given hosts (name, last octet of its address).
    /// Names are at most 15 bytes (they name the bridge ports).
    pub(crate) fn with_hosts(hosts: &[(String, u8)]) -> Topology {
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
        let prefix = format!("{PREFIX}{pid}-{n}-");
        let mut topology = Topology {
            bridge: format!("{prefix}br"),
            prefix,
            subnet,
            namespaces: Vec::new(),
            hosts: Vec::new(),
            cuts: Mutex::default(),
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
        for (name, last) in hosts {
            assert!(
                name.len() <= 15,
                "host name {name} is longer than an interface name may be"
            );
            let netns = topology.add_namespace(name);
            // Created directly in their namespaces: no name ever appears in
            // the host's own namespace, where it could clash.
            ip_run([
                "link", "add", INTERFACE, "netns", &netns, "type", "veth", "peer", "name", name, "netns", &bridge,
            ]);
            ip_run(["-n", &bridge, "link", "set", name, "master", "br0", "up"]);
            let ip = topology.addr(*last);
            ip_run([
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip}/{PREFIX_LEN}"),
                "dev",
                INTERFACE,
            ]);
            // No duplicate address detection: nothing else has it, and the
            // address is usable at once.
            let ip6 = addr_v6(*last);
            ip_run([
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip6}/{PREFIX_LEN_V6}"),
                "dev",
                INTERFACE,
                "nodad",
            ]);
            ip_run(["-n", &netns, "link", "set", INTERFACE, "up"]);
            let mac = link_mac(&netns);
            topology.hosts.push(Host {
                name: name.clone(),
                netns,
                ip,
                ip6,
                mac,
                spawned: Arc::default(),
            });
        }
        topology
    }

    /// Adds host `name` behind host `router` on a link of their own: the
    /// router's `eth1` is 198.19.x.1/25, the new host's `eth0` 198.19.x.10/25
    /// with its default route via the router (x as in [`Topology::addr`]);
    /// IPv6 2001:2:0:1::1 and ::10, /64. The router forwards (IPv4 and
    /// IPv6). [`Topology::outside_addr`] gives more addresses of that
    /// link. The host is not on the bridge: the bridge faults do not apply
    /// to it.
    pub(crate) fn add_outside(&mut self, name: &str, router: &str) {
        let router_ns = self.host(router).netns.clone();
        let netns = self.add_namespace(name);
        ip_run([
            "link", "add", INTERFACE, "netns", &netns, "type", "veth", "peer", "name", "eth1", "netns", &router_ns,
        ]);
        let (router_ip, ip) = (self.outside_addr(1), self.outside_addr(10));
        ip_run([
            "-n",
            &router_ns,
            "addr",
            "add",
            &format!("{router_ip}/25"),
            "dev",
            "eth1",
        ]);
        ip_run([
            "-n",
            &router_ns,
            "addr",
            "add",
            "2001:2:0:1::1/64",
            "dev",
            "eth1",
            "nodad",
        ]);
        ip_run(["-n", &router_ns, "link", "set", "eth1", "up"]);
        ip_run(["-n", &netns, "addr", "add", &format!("{ip}/25"), "dev", INTERFACE]);
        ip_run([
            "-n",
            &netns,
            "addr",
            "add",
            "2001:2:0:1::10/64",
            "dev",
            INTERFACE,
            "nodad",
        ]);
        ip_run(["-n", &netns, "link", "set", INTERFACE, "up"]);
        ip_run(["-n", &netns, "route", "add", "default", "via", &router_ip.to_string()]);
        let mac = link_mac(&netns);
        let host = Host {
            name: name.to_owned(),
            netns,
            ip,
            ip6: "2001:2:0:1::10".parse().expect("an IPv6 address"),
            mac,
            spawned: Arc::default(),
        };
        let router = self.host(router);
        router.sysctl("net.ipv4.ip_forward", "1");
        router.sysctl("net.ipv6.conf.all.forwarding", "1");
        self.hosts.push(host);
    }

    /// 198.19.x.`last`: an address on the link [`Topology::add_outside`]
    /// makes (.1 – .127: the link; .128 – .255 are free for VIPs, routed).
    pub fn outside_addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.subnet, last)
    }

    fn add_namespace(&mut self, name: &str) -> String {
        let netns = format!("{}{name}", self.prefix);
        ip_run(["netns", "add", &netns]);
        self.namespaces.push(netns.clone());
        ip_run(["-n", &netns, "link", "set", "lo", "up"]);
        netns
    }

    /// Every host, in the order they were made.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// The namespace holding the bridge `br0`, whose ports are named after
    /// the hosts.
    pub fn bridge_netns(&self) -> &str {
        &self.bridge
    }

    /// Pulls `host`'s cable: its port on the bridge goes down, so nothing
    /// reaches it or leaves it; its processes run on. Undo with
    /// [`Topology::plug`].
    pub fn unplug(&self, host: &str) {
        let port = &self.host(host).name;
        ip_run(["-n", &self.bridge, "link", "set", port, "down"]);
    }

    /// Plugs `host`'s cable back in after [`Topology::unplug`].
    pub fn plug(&self, host: &str) {
        let port = &self.host(host).name;
        ip_run(["-n", &self.bridge, "link", "set", port, "up"]);
    }

    /// Whether `host`'s port on the bridge is up (`ip link`'s `UP` flag).
    pub fn is_plugged(&self, host: &str) -> bool {
        let port = &self.host(host).name;
        let out = ip_run(["-n", &self.bridge, "-o", "link", "show", "dev", port]);
        link_flags(&out).iter().any(|f| f == "UP")
    }

    /// Cuts `a` and `b` apart: every frame between the two is dropped, both
    /// ways, while each still reaches every other host. Idempotent. Undo
    /// with [`Topology::heal`] or [`Topology::heal_all`]. Panics if `nft`
    /// is missing or refuses the rules.
    pub fn cut(&self, a: &str, b: &str) {
        let pair = self.pair(a, b);
        let mut cuts = self.cuts.lock().unwrap_or_else(PoisonError::into_inner);
        cuts.pairs.insert(pair);
        self.apply_cuts(&cuts);
    }

    /// Lets `a` and `b` talk again after [`Topology::cut`]. Idempotent.
    pub fn heal(&self, a: &str, b: &str) {
        let pair = self.pair(a, b);
        let mut cuts = self.cuts.lock().unwrap_or_else(PoisonError::into_inner);
        cuts.pairs.remove(&pair);
        self.apply_cuts(&cuts);
    }

    /// Drops every UDP datagram to `port` between `a` and `b`, both ways
    /// (the rest of their traffic passes), silently, as a filter on the
    /// path would. Idempotent. Undo with [`Topology::heal_udp`] or
    /// [`Topology::heal_all`]. Panics if `nft` is missing or refuses it.
    pub fn cut_udp(&self, a: &str, b: &str, port: u16) {
        let (a, b) = self.pair(a, b);
        let mut cuts = self.cuts.lock().unwrap_or_else(PoisonError::into_inner);
        cuts.udp.insert((a, b, port));
        self.apply_cuts(&cuts);
    }

    /// Lets UDP to `port` pass between `a` and `b` again after
    /// [`Topology::cut_udp`]. Idempotent.
    pub fn heal_udp(&self, a: &str, b: &str, port: u16) {
        let (a, b) = self.pair(a, b);
        let mut cuts = self.cuts.lock().unwrap_or_else(PoisonError::into_inner);
        cuts.udp.remove(&(a, b, port));
        self.apply_cuts(&cuts);
    }

    /// Heals every cut, [`Topology::cut_udp`]'s too.
    pub fn heal_all(&self) {
        let mut cuts = self.cuts.lock().unwrap_or_else(PoisonError::into_inner);
        cuts.pairs.clear();
        cuts.udp.clear();
        self.apply_cuts(&cuts);
    }

    /// The pairs cut apart now, each as (smaller name, larger name).
    pub fn cuts(&self) -> Vec<(String, String)> {
        let cuts = self.cuts.lock().unwrap_or_else(PoisonError::into_inner);
        cuts.pairs.iter().cloned().collect()
    }

    /// The UDP cuts now: (smaller name, larger name, port).
    pub fn udp_cuts(&self) -> Vec<(String, String, u16)> {
        let cuts = self.cuts.lock().unwrap_or_else(PoisonError::into_inner);
        cuts.udp.iter().cloned().collect()
    }

    fn pair(&self, a: &str, b: &str) -> (String, String) {
        assert_ne!(a, b, "a host cannot be cut from itself");
        let (a, b) = (self.host(a).name.clone(), self.host(b).name.clone());
        if a < b {
            (a, b)
        } else {
            (b, a)
        }
    }

    /// Replaces the cut table with one dropping what `cuts` says,
    /// atomically (one `nft -f` transaction).
    fn apply_cuts(&self, cuts: &Cuts) {
        // `add` then `delete` makes the delete succeed whether or not the
        // table existed; the whole file is one transaction.
        let mut script = format!("add table bridge {CUT_TABLE}\ndelete table bridge {CUT_TABLE}\n");
        if !cuts.pairs.is_empty() || !cuts.udp.is_empty() {
            script.push_str(&format!(
                "table bridge {CUT_TABLE} {{\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n"
            ));
            for (a, b) in &cuts.pairs {
                script.push_str(&format!("    iifname \"{a}\" oifname \"{b}\" drop\n"));
                script.push_str(&format!("    iifname \"{b}\" oifname \"{a}\" drop\n"));
            }
            for (a, b, port) in &cuts.udp {
                script.push_str(&format!("    iifname \"{a}\" oifname \"{b}\" udp dport {port} drop\n"));
                script.push_str(&format!("    iifname \"{b}\" oifname \"{a}\" udp dport {port} drop\n"));
            }
            script.push_str("  }\n}\n");
        }
        let mut cmd = Command::new(ip());
        cmd.args(["netns", "exec", &self.bridge]).arg(nft()).args(["-f", "-"]);
        run_with_input(&mut cmd, &script);
    }

    /// Powers `host` off: SIGKILLs every process in its namespace (also
    /// those not started by the testkit) and takes its `eth0` down. The
    /// processes' guards stay valid and see them dead. Undo with
    /// [`Topology::power_on`].
    pub fn power_off(&self, host: &str) {
        let host = self.host(host);
        kill_all_in(host);
        ip_run(["-n", &host.netns, "link", "set", INTERFACE, "down"]);
    }

    /// Powers `host` back on after [`Topology::power_off`]: `eth0` up with
    /// only the host's own address, as after a reboot. Starts nothing.
    pub fn power_on(&self, host: &str) {
        let host = self.host(host);
        let out = ip_run(["-n", &host.netns, "-4", "-o", "addr", "show", "dev", INTERFACE]);
        let own = format!("{}/{PREFIX_LEN}", host.ip);
        for line in out.lines() {
            let mut words = line.split_whitespace();
            let Some(cidr) = words.find(|w| *w == "inet").and_then(|_| words.next()) else {
                continue;
            };
            if cidr != own {
                ip_run(["-n", &host.netns, "addr", "del", cidr, "dev", INTERFACE]);
            }
        }
        let own6 = format!("{}/{PREFIX_LEN_V6}", host.ip6);
        let out = ip_run([
            "-n",
            &host.netns,
            "-6",
            "-o",
            "addr",
            "show",
            "dev",
            INTERFACE,
            "scope",
            "global",
        ]);
        for line in out.lines() {
            let mut words = line.split_whitespace();
            let Some(cidr) = words.find(|w| *w == "inet6").and_then(|_| words.next()) else {
                continue;
            };
            if cidr != own6 {
                ip_run(["-n", &host.netns, "addr", "del", cidr, "dev", INTERFACE]);
            }
        }
        ip_run(["-n", &host.netns, "link", "set", INTERFACE, "up"]);
    }

    /// Whether `host`'s `eth0` is administratively up (it is not while
    /// powered off).
    pub fn is_powered(&self, host: &str) -> bool {
        let host = self.host(host);
        let out = ip_run(["-n", &host.netns, "-o", "link", "show", "dev", INTERFACE]);
        link_flags(&out).iter().any(|f| f == "UP")
    }

    /// 198.18.x.`last`, on this topology's subnet.
    pub fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, last)
    }

    /// 198.18.x.100: the address tests float between the balancers.
    pub fn vip(&self) -> Ipv4Addr {
        self.addr(100)
    }

    /// 2001:2::100: the IPv6 address tests float between the balancers.
    pub fn vip6(&self) -> Ipv6Addr {
        addr_v6(100)
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
            // A guard takes its pid off this list when it reaps it, so
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
            assert_eq!(host.addresses_v6(), vec![host.ip6()], "{}", host.name());
            assert_eq!(host.ip6().segments()[7], u16::from(host.ip().octets()[3]));
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
            name: "client".to_owned(),
            netns: "halo-0-0-client".to_owned(),
            ip: Ipv4Addr::new(198, 18, 0, 10),
            ip6: addr_v6(10),
            mac: "02:00:00:00:00:0a".to_owned(),
            spawned: Arc::default(),
        };
        host.spawn(Command::new("true"));
    }
}
