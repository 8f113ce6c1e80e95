//! The network faults a [`Topology`] injects mid-test and undoes (see its
//! docs, "Network faults"): a host's cable, cuts between two hosts (all
//! their frames, or UDP to one port) in an nftables `bridge` table in the
//! bridge's namespace, and a host's power.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::PoisonError;

use nix::sys::signal::{kill, Signal};

use super::host::{pid_of, Host};
use super::tools::{ip, ip_run, link_flags, nft, run_with_input};
use super::{Topology, INTERFACE, PREFIX_LEN, PREFIX_LEN_V6};

/// The frames the cut table drops.
#[derive(Debug, Default)]
pub(super) struct Cuts {
    /// Pairs of host names cut apart, each sorted.
    pairs: BTreeSet<(String, String)>,
    /// Pairs (sorted) between which UDP to the port is dropped.
    udp: BTreeSet<(String, String, u16)>,
}

/// The nftables table [`Topology::cut`] keeps in the bridge's namespace.
const CUT_TABLE: &str = "halo_cuts";

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

impl Topology {
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
}
