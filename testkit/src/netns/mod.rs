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
//!
//! # Layout
//! - `mod.rs`: the constants, [`required`], and [`Topology`]: making the
//!   namespaces, the bridge and the links, finding hosts, and removing it
//!   all on drop (and what killed test processes left behind).
//! - `host`: [`Host`], one namespace, and [`HostProcess`], a process started
//!   in it and killed with its guard.
//! - `faults`: the network faults a [`Topology`] injects and undoes (cable,
//!   cuts, UDP cuts, power).
//! - `tools`: iproute2's `ip` and nftables' `nft`, found once, and running
//!   them.

mod faults;
mod host;
mod tools;

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use faults::Cuts;
pub(crate) use host::tail;
pub use host::{Host, HostProcess};
pub(crate) use tools::ip;
use tools::{ip_binary, ip_run, link_mac};

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

/// The hosts and the last octet of their addresses.
const HOSTS: [(&str, u8); 4] = [("client", 10), ("lb1", 11), ("lb2", 12), ("backend", 20)];

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

    /// 198.19.x.`last`: an address on the link `Topology::add_outside`
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
