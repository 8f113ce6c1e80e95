//! The floating VIP between two balancer hosts, in network namespaces.
//!
//! Each balancer host runs a helper process (this test binary re-executed,
//! see [`helper_process`]) that binds a listener on VIP:port with
//! `lb::proxy::bind` (IP_FREEBIND) before the address exists, greets every
//! connection with its host's name, and claims or releases the VIP with
//! `halo_lb::FloatingIp` on command. The client connects through
//! its own helper process. Needs root: see `halo_testkit::netns::required`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use halo_lb::FloatingIp;
use halo_testkit::eventually;
use halo_testkit::netns::{self, Host, HostProcess, Topology, INTERFACE, PREFIX_LEN};

use crate::support::DEADLINE;

/// Where the helpers listen on the VIP. Fixed: each topology is a network
/// of its own, with nothing else on it.
const PORT: u16 = 8080;

/// Carries the helper's job into the re-executed test binary.
const HELPER_ENV: &str = "HALO_IT_FLOATING_HELPER";

/// Marks the helper's answers among the test harness's own lines.
const MARK: &str = "halo-helper:";

const HELPER_TEST: &str = "floating::helper_process";

#[tokio::test]
async fn vip_moves_between_balancers_and_gratuitous_arp_repoints_the_client() {
    if !netns::required("floating::vip_moves_between_balancers_and_gratuitous_arp_repoints_the_client") {
        return;
    }
    let topology = Topology::start();
    let (client, lb1, lb2) = (topology.client(), topology.lb1(), topology.lb2());
    let vip = topology.vip();
    // The client keeps a neighbour entry REACHABLE for ten minutes, so it
    // never re-resolves the VIP on its own during this test: once it has
    // lb1's MAC, only a gratuitous ARP can move the entry to lb2.
    client.sysctl(&format!("net.ipv4.neigh.{INTERFACE}.base_reachable_time_ms"), "600000");

    let mut on_lb1 = VipHelper::start(lb1, vip);
    let mut on_lb2 = VipHelper::start(lb2, vip);
    // Both listen on VIP:PORT already, though neither host has the address:
    // IP_FREEBIND.
    assert!(!lb1.addresses().contains(&vip) && !lb2.addresses().contains(&vip));

    assert_eq!(on_lb1.send("claim"), "claim Changed");
    assert!(lb1.addresses().contains(&vip), "lb1 holds the VIP after claiming");
    eventually(DEADLINE, "the client to reach lb1 through the VIP", || async {
        (greeting(client, vip).ok()? == "lb1").then_some(())
    })
    .await;
    assert_eq!(client.neighbour(vip).as_deref(), Some(lb1.mac()));

    // Step-down on lb1, promotion on lb2; the client's cache is left alone.
    assert_eq!(on_lb1.send("release"), "release Changed");
    assert!(!lb1.addresses().contains(&vip), "lb1 no longer holds the VIP");
    assert_eq!(on_lb2.send("claim"), "claim Changed");
    // What the leadership loop does REANNOUNCE_AFTER a promotion.
    assert_eq!(on_lb2.send("announce"), "announce sent");
    eventually(
        DEADLINE,
        "the client's neighbour entry for the VIP to show lb2's MAC",
        || async { (client.neighbour(vip).as_deref() == Some(lb2.mac())).then_some(()) },
    )
    .await;
    eventually(DEADLINE, "the client to reach lb2 through the VIP", || async {
        (greeting(client, vip).ok()? == "lb2").then_some(())
    })
    .await;

    // Both are idempotent: a leadership loop may repeat itself.
    assert_eq!(on_lb2.send("claim"), "claim Unchanged");
    assert_eq!(on_lb1.send("release"), "release Unchanged");
    assert_eq!(on_lb2.send("release"), "release Changed");
    assert_eq!(on_lb2.send("release"), "release Unchanged");
    assert!(!lb2.addresses().contains(&vip));
}

#[tokio::test]
async fn open_fails_clearly_without_capabilities_or_interface() {
    if !netns::required("floating::open_fails_clearly_without_capabilities_or_interface") {
        return;
    }
    let topology = Topology::start();
    let lb1 = topology.lb1();
    let vip = topology.vip();

    let fine = open_in(lb1, vip, INTERFACE, None);
    assert_eq!(fine, Ok("open".to_owned()), "root may open");

    let no_admin = open_in(lb1, vip, INTERFACE, Some("-net_admin"));
    assert_eq!(
        no_admin,
        Err("floating vip_address needs CAP_NET_ADMIN (run as root or grant the capability)".to_owned())
    );
    let no_raw = open_in(lb1, vip, INTERFACE, Some("-net_raw"));
    assert_eq!(
        no_raw,
        Err(
            "floating vip_address needs CAP_NET_RAW to send gratuitous ARP (run as root or grant the capability)"
                .to_owned()
        )
    );
    let missing = open_in(lb1, vip, "eth9", None);
    assert_eq!(missing, Err("vip_interface eth9: no such interface".to_owned()));
    assert!(!lb1.addresses().contains(&vip), "opening changes nothing");
}

/// Not a test: the body of the helper processes above, which run this
/// binary again with `HALO_IT_FLOATING_HELPER` set to their job. Ignored, so
/// a plain run skips it; returns at once without the variable.
#[test]
#[ignore = "helper process for the floating tests, started by them"]
fn helper_process() {
    let Ok(job) = std::env::var(HELPER_ENV) else {
        return;
    };
    let words: Vec<&str> = job.split_whitespace().collect();
    match words.as_slice() {
        ["vip", address, interface, name] => helper_vip(address.parse().unwrap(), interface, name),
        ["open", address, interface] => match open(address.parse().unwrap(), interface) {
            Ok(_) => answer("ok open"),
            Err(e) => answer(&format!("error {e}")),
        },
        ["connect", addr] => helper_connect(addr.parse().unwrap()),
        _ => panic!("unknown helper job {job:?}"),
    }
    // Done: skip the harness's summary, which would only add noise.
    std::process::exit(0);
}

/// Prints one answer for the test to find among the harness's lines.
fn answer(line: &str) {
    // On a line of its own: the harness may have left "test … " unfinished.
    println!("\n{MARK} {line}");
    std::io::stdout().flush().unwrap();
}

fn open(address: Ipv4Addr, interface: &str) -> Result<FloatingIp, halo_lb::FloatingError> {
    FloatingIp::open(IpAddr::V4(address), PREFIX_LEN, interface)
}

/// Listens on address:PORT, greets with `name`, and claims or releases the
/// address on the lines "claim", "announce" and "release" from stdin, each
/// answered with "ok <command> <outcome> <µs>" or "error <why>".
fn helper_vip(address: Ipv4Addr, interface: &str, name: &str) {
    // Before the address exists, as halo-lb binds its VIPs.
    let listener = halo_lb::bind(SocketAddr::from((address, PORT)), 128).unwrap();
    listener.set_nonblocking(false).unwrap();
    let greeting = format!("{name}\n");
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            if let Err(e) = stream.write_all(greeting.as_bytes()) {
                eprintln!("helper: greeting failed: {e}");
            }
        }
    });
    let vip = match open(address, interface) {
        Ok(vip) => vip,
        Err(e) => {
            answer(&format!("error {e}"));
            return;
        }
    };
    answer("ok ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let started = Instant::now();
        let result = match line.trim() {
            "claim" => vip.claim().map(|outcome| format!("{outcome:?}")),
            "release" => vip.release().map(|outcome| format!("{outcome:?}")),
            "announce" => vip.announce().map(|()| "sent".to_owned()),
            other => panic!("unknown command {other:?}"),
        };
        let took = started.elapsed().as_micros();
        match result {
            Ok(outcome) => answer(&format!("ok {} {outcome} {took}", line.trim())),
            Err(e) => answer(&format!("error {e}")),
        }
    }
}

/// Connects to `addr`, prints the greeting line.
fn helper_connect(addr: SocketAddr) {
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut line = String::new();
        stream.read_to_string(&mut line)?;
        Ok(line.trim().to_owned())
    };
    match attempt() {
        Ok(line) => answer(&format!("ok {line}")),
        Err(e) => answer(&format!("error {e}")),
    }
}

/// The helper command: this test binary, in `host`'s namespace, wrapped in
/// `setpriv` when `drop_cap` (e.g. "-net_admin") is given.
fn helper_command(host: &Host, job: &str, drop_cap: Option<&str>) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = match drop_cap {
        None => host.command(&exe),
        Some(cap) => {
            // util-linux's setpriv (essential on Debian). Root's permitted set
            // after exec is its bounding set, so this removes the capability.
            let mut cmd = host.command("setpriv");
            cmd.arg(format!("--bounding-set={cap}"))
                .arg("--inh-caps=-all")
                .arg("--")
                .arg(&exe);
            cmd
        }
    };
    cmd.args([HELPER_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, job)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

/// The helper's answer in `stdout`: `Ok(rest)` for "ok rest", `Err(why)`.
fn parse_answer(stdout: &str) -> Option<Result<String, String>> {
    let line = stdout.lines().find_map(|line| line.strip_prefix(MARK))?.trim();
    Some(match line.strip_prefix("ok ") {
        Some(rest) => Ok(rest.to_owned()),
        None => Err(line.strip_prefix("error ").unwrap_or(line).to_owned()),
    })
}

fn run_helper(mut cmd: Command) -> Result<String, String> {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_answer(&stdout).unwrap_or_else(|| panic!("no answer from the helper ({}):\n{stdout}", out.status))
}

fn open_in(host: &Host, vip: Ipv4Addr, interface: &str, drop_cap: Option<&str>) -> Result<String, String> {
    run_helper(helper_command(host, &format!("open {vip} {interface}"), drop_cap))
}

/// The greeting of whichever balancer answers on VIP:PORT, seen from `client`.
fn greeting(client: &Host, vip: Ipv4Addr) -> Result<String, String> {
    run_helper(helper_command(client, &format!("connect {vip}:{PORT}"), None))
}

/// A balancer host's helper: listening on the VIP, taking commands.
struct VipHelper {
    host: String,
    process: HostProcess,
    stdin: ChildStdin,
    answers: mpsc::Receiver<String>,
}

impl VipHelper {
    fn start(host: &Host, vip: Ipv4Addr) -> VipHelper {
        let mut cmd = helper_command(host, &format!("vip {vip} {INTERFACE} {}", host.name()), None);
        cmd.stdin(Stdio::piped());
        let mut process = host.spawn(cmd);
        let stdin = process.child().stdin.take().unwrap();
        let stdout = process.child().stdout.take().unwrap();
        // A thread reads, so a hung helper fails the test at the deadline
        // instead of blocking it forever.
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(answer) = line.strip_prefix(MARK) {
                    if tx.send(answer.trim().to_owned()).is_err() {
                        return;
                    }
                }
            }
        });
        let mut helper = VipHelper {
            host: host.name().to_owned(),
            process,
            stdin,
            answers,
        };
        assert_eq!(helper.next_answer(), "ok ready", "the helper on {} starts", helper.host);
        helper
    }

    fn next_answer(&mut self) -> String {
        match self.answers.recv_timeout(DEADLINE) {
            Ok(answer) => answer,
            Err(e) => {
                let status = self.process.child().try_wait();
                panic!(
                    "no answer from the helper on {} ({e}; exit status {status:?})",
                    self.host
                )
            }
        }
    }

    /// Sends a command; returns "<command> <outcome>" and prints the time
    /// it took, or panics with the helper's error.
    fn send(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").unwrap();
        let answer = self.next_answer();
        let Some(rest) = answer.strip_prefix("ok ") else {
            panic!("{command} on {} failed: {answer}", self.host);
        };
        let mut words: Vec<&str> = rest.split_whitespace().collect();
        let micros = words.pop().unwrap_or_default();
        eprintln!("{command} on {}: {micros} µs", self.host);
        words.join(" ")
    }
}
