//! The ECMP testbed: a production-shaped datacenter ([`crate::dc`]) with a
//! router in front of its balancers, running the routing daemon halo-lb's
//! `ha.mode = "ecmp"` is shipped with (BIRD 2, `packaging/bird/`).
//!
//! | host | runs |
//! |---|---|
//! | `server1`..`server3`, `lb1`..`lbN`, `backend1`..`backendM` | as in [`crate::dc`] (raft_multiplier 1) |
//! | `lb1`..`lbN` | also BIRD 2 with `packaging/bird/bird-halo-lb.conf`: eBGP (and BFD) to the router, exporting the `halo-vips` interface; `net.ipv4.tcp_tw_reuse = 1` |
//! | `router` (.254) | BIRD 2 with `packaging/bird/bird-router.conf`: a dynamic eBGP neighbour range over the balancers, routes merged into one multipath route; the kernel hashes on L4 (`fib_multipath_hash_policy = 1`) |
//! | `outside` (198.19.x.10/25, behind the router) | the clients; [`Fabric::client_ips`] are its addresses |
//!
//! The two BIRD files run with only their `define` lines changed
//! ([`with_defines`]). VIPs come from 198.19.x.128/25 ([`Fabric::vip`]),
//! which only BGP routes. The balancers reach the outside through the
//! router (their return path for clients); backends are on the bridge with
//! the balancers.
//!
//! Linux's multipath routes select next hops by hash-threshold (RFC 2992),
//! and BIRD 2 installs plain multipath routes (it has no resilient
//! next-hop groups): a next hop joining or leaving moves some flows of the
//! others too. The tests measure it.
//!
//! [`Whoami`] is a backend that names itself and the balancer a connection
//! came through, then echoes; [`UdpWhoami`] answers each datagram the same
//! way.
//!
//! Needs root, `HALO_NETNS_TESTS=1`, and BIRD 2 (`scripts/bird.sh`
//! installs Debian's `bird2` as root when missing).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::dc::{Datacenter, DcSpec, OUTSIDE, ROUTER};
use crate::netns::{Host, HostProcess};
use crate::workspace_root;

/// BIRD 2's daemon and client, provisioned once per test process by
/// `scripts/bird.sh`.
pub fn bird_binaries() -> (PathBuf, PathBuf) {
    static BINS: OnceLock<Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    BINS.get_or_init(|| {
        let script = workspace_root().join("scripts/bird.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let find = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(PathBuf::from)
                .ok_or_else(|| format!("bird.sh printed no {name}"))
        };
        Ok((find("bird")?, find("birdc")?))
    })
    .clone()
    .unwrap_or_else(|e| panic!("no BIRD 2 for the ECMP testbed: {e}"))
}

/// `text` with each `define NAME = …;` line of `values` set to the value
/// given (the comment after it kept). Panics if a name has no define line:
/// the shipped file changed under the test.
pub fn with_defines(text: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut found = vec![false; values.len()];
    for line in text.lines() {
        let mut replaced = None;
        for (n, (name, value)) in values.iter().enumerate() {
            let Some(rest) = line.strip_prefix("define ") else {
                continue;
            };
            let Some(after) = rest.strip_prefix(name) else { continue };
            if !after.starts_with([' ', '=']) {
                continue;
            }
            found[n] = true;
            let comment = line.find('#').map(|at| &line[at..]).unwrap_or("");
            replaced = Some(format!("define {name} = {value}; {comment}"));
        }
        out.push_str(replaced.as_deref().unwrap_or(line));
        out.push('\n');
    }
    for (n, (name, _)) in values.iter().enumerate() {
        assert!(found[n], "no `define {name}` line in the BIRD config");
    }
    out
}

/// The datacenter, the router and the BIRD daemons.
#[derive(Debug)]
pub struct Fabric {
    birds: Mutex<BTreeMap<String, HostProcess>>,
    dc: Datacenter,
}

impl Fabric {
    /// Starts the datacenter with `balancers` balancer hosts and `backends`
    /// backend hosts, the router's BIRD and every balancer's BIRD. halo-lb
    /// is the test's to start.
    pub async fn start(balancers: usize, backends: usize) -> Fabric {
        bird_binaries();
        let dc = Datacenter::start(DcSpec {
            balancers,
            backends,
            raft_multiplier: Some(1),
            router: true,
            ..DcSpec::default()
        })
        .await;
        let fabric = Fabric {
            birds: Mutex::default(),
            dc,
        };
        let router = fabric.router();
        // L4 hashing: one client address's connections spread too.
        router.sysctl("net.ipv4.fib_multipath_hash_policy", "1");
        for i in 1..=balancers {
            // A proxy that closes its backend connections first keeps them
            // in TIME_WAIT for 60 s; at thousands of new connections a
            // second, connect(2) then spends its time searching the port
            // range. Operators of any L4 proxy set this (docs/ecmp.md, set-up).
            fabric.dc.lb(i).sysctl("net.ipv4.tcp_tw_reuse", "1");
            // Clients are behind the router.
            fabric.dc.lb(i).run(
                "ip",
                [
                    "route",
                    "add",
                    &format!("{}/25", fabric.dc.net().outside_addr(0)),
                    "via",
                    &router.ip().to_string(),
                ],
            );
        }
        fabric.start_bird(ROUTER);
        for i in 1..=balancers {
            fabric.start_bird(&format!("lb{i}"));
        }
        fabric
    }

    /// The datacenter.
    pub fn dc(&self) -> &Datacenter {
        &self.dc
    }

    /// The router host.
    pub fn router(&self) -> &Host {
        self.dc.host(ROUTER)
    }

    /// The clients' host, behind the router.
    pub fn outside(&self) -> &Host {
        self.dc.host(OUTSIDE)
    }

    /// The VIP: 198.19.x.200, routed only by BGP.
    pub fn vip(&self) -> Ipv4Addr {
        self.dc.net().outside_addr(200)
    }

    /// The prefix every VIP is in, as BIRD writes a prefix set.
    fn vip_set(&self) -> String {
        format!("[ {}/25+ ]", self.dc.net().outside_addr(128))
    }

    /// `count` client addresses on the outside host (.10 and up), adding
    /// the ones it lacks.
    pub fn client_ips(&self, count: u8) -> Vec<Ipv4Addr> {
        let outside = self.outside();
        let have = outside.addresses();
        (0..count)
            .map(|n| {
                let ip = self.dc.net().outside_addr(10 + n);
                if !have.contains(&ip) {
                    outside.run("ip", ["addr", "add", &format!("{ip}/25"), "dev", "eth0"]);
                }
                ip
            })
            .collect()
    }

    /// The shipped BIRD config for `host` (the router's, or a
    /// balancer's), with only its defines set for this testbed.
    pub fn bird_config(&self, host: &str) -> String {
        let router_ip = self.router().ip();
        if host == ROUTER {
            let text = std::fs::read_to_string(workspace_root().join("packaging/bird/bird-router.conf"))
                .expect("read packaging/bird/bird-router.conf");
            with_defines(
                &text,
                &[
                    ("BALANCERS", format!("{}/24", self.dc.net().addr(0))),
                    ("VIPS", self.vip_set()),
                ],
            )
        } else {
            let text = std::fs::read_to_string(workspace_root().join("packaging/bird/bird-halo-lb.conf"))
                .expect("read packaging/bird/bird-halo-lb.conf");
            with_defines(&text, &[("ROUTER_IP", router_ip.to_string()), ("VIPS", self.vip_set())])
        }
    }

    /// Starts (or restarts) BIRD on `host` with [`Fabric::bird_config`].
    pub fn start_bird(&self, host: &str) {
        let (bird, _) = bird_binaries();
        let dir = self.dc.log_dir();
        let config = dir.join(format!("{host}-bird.conf"));
        std::fs::write(&config, self.bird_config(host)).expect("write a BIRD config");
        let mut cmd = self.dc.host(host).command(bird);
        cmd.arg("-f")
            .arg("-c")
            .arg(&config)
            .arg("-s")
            .arg(dir.join(format!("{host}-bird.ctl")))
            .arg("-P")
            .arg(dir.join(format!("{host}-bird.pid")));
        let process = self.dc.spawn(host, cmd, "bird");
        self.birds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(host.to_owned(), process);
    }

    /// Starts a [`Whoami`] (TCP, `tcp_port`) and a [`UdpWhoami`]
    /// (`udp_port`) on each backend host (`backend<i>`, its address) and
    /// registers them with the host's own agent as services `web` and
    /// `dns`, each with a TCP check of the TCP one every second (Consul 1.8
    /// has no UDP check); returns once Consul lists them all passing.
    pub async fn start_backends(&self, tcp_port: u16, udp_port: u16) -> Backends {
        let dc = &self.dc;
        let count = dc.spec().backends;
        let mut backends = Backends::default();
        for i in 1..=count {
            let host = dc.backend(i);
            let name = format!("backend{i}");
            backends
                .tcp
                .push(Whoami::start(host, SocketAddr::from((host.ip(), tcp_port)), &name));
            backends
                .udp
                .push(UdpWhoami::start(host, SocketAddr::from((host.ip(), udp_port)), &name));
            for (service, port) in [("web", tcp_port), ("dns", udp_port)] {
                let registration = format!(
                    r#"{{"ID": "{service}-{name}", "Name": "{service}", "Address": "{ip}", "Port": {port},
                        "Check": {{"TCP": "{ip}:{tcp_port}", "Interval": "1s", "Timeout": "1s"}}}}"#,
                    ip = host.ip()
                );
                let answer = dc
                    .consul(&name, "PUT", "/v1/agent/service/register", &registration)
                    .await;
                assert_eq!(answer.map(|(code, _)| code), Some(200), "register {service} on {name}");
            }
        }
        for service in ["web", "dns"] {
            crate::eventually(Duration::from_secs(60), "every backend passing in Consul", || async {
                let body = dc
                    .get("server1", &format!("/v1/health/service/{service}?passing"))
                    .await?;
                let list: serde_json::Value = serde_json::from_str(&body).ok()?;
                (list.as_array()?.len() == count).then_some(())
            })
            .await;
        }
        backends
    }

    /// `birdc show protocols all` etc. on `host`, for diagnostics.
    pub fn birdc(&self, host: &str, args: &[&str]) -> String {
        let (_, birdc) = bird_binaries();
        let socket = self.dc.log_dir().join(format!("{host}-bird.ctl"));
        let out = Command::new(birdc)
            .arg("-s")
            .arg(socket)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(birdc: {e})"));
        out
    }

    /// The router's next hops for `vip` now (empty: no route).
    pub fn paths(&self, vip: Ipv4Addr) -> Vec<Ipv4Addr> {
        paths_in(self.router().netns(), vip)
    }

    /// Polls (every 5 ms, off the async threads) until the router's next
    /// hops for `vip` are exactly `want` (sorted), up to `timeout`; how long
    /// that took, or `None`. One `ip route` takes a few milliseconds here,
    /// so the figure is good to about 10 ms.
    pub async fn wait_paths(&self, vip: Ipv4Addr, want: &[Ipv4Addr], timeout: Duration) -> Option<Duration> {
        let mut want = want.to_vec();
        want.sort_unstable();
        let began = Instant::now();
        let router = self.router().netns().to_owned();
        tokio::task::spawn_blocking(move || {
            while began.elapsed() < timeout {
                if paths_in(&router, vip) == want {
                    return Some(began.elapsed());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        })
        .await
        .expect("the route poller panicked")
    }

    /// Whether `host` has a TCP socket listening on `addr`.
    pub fn listening(&self, host: &str, addr: SocketAddr) -> bool {
        let out = self.dc.host(host).run("ss", ["-Hltn", "src", &addr.to_string()]);
        !out.trim().is_empty()
    }
}

/// The backends [`Fabric::start_backends`] runs; they stop when dropped.
#[derive(Debug, Default)]
pub struct Backends {
    /// Service `web`.
    pub tcp: Vec<Whoami>,
    /// Service `dns`.
    pub udp: Vec<UdpWhoami>,
}

/// A UDP backend that answers every datagram with `<name> <peer ip>\n`
/// (the peer being the balancer the flow came through). Runs on a thread
/// inside its host's namespace; stops when dropped.
#[derive(Debug)]
pub struct UdpWhoami {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpWhoami {
    /// Listens on `addr` in `host`.
    pub fn start(host: &Host, addr: SocketAddr, name: &str) -> UdpWhoami {
        let stop = Arc::new(AtomicBool::new(false));
        let (path, name, flag) = (
            format!("/var/run/netns/{}", host.netns()),
            name.to_owned(),
            Arc::clone(&stop),
        );
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
            let socket = std::net::UdpSocket::bind(addr).expect("bind the UDP whoami backend");
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("a read timeout");
            ready_tx.send(()).expect("the starter waits");
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let reply = format!("{name} {}\n", peer.ip());
                    if socket.send_to(reply.as_bytes(), peer).is_err() {
                        // A full queue: the client's retry will do.
                    }
                }
            }
        });
        ready.recv().expect("the UDP whoami backend started");
        UdpWhoami {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpWhoami {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("testkit: the UDP whoami backend's thread panicked");
            }
        }
    }
}

/// The next hops of the route to `vip`/32 in namespace `netns`, sorted.
fn paths_in(netns: &str, vip: Ipv4Addr) -> Vec<Ipv4Addr> {
    let out = Command::new(crate::netns::ip())
        .args(["-n", netns, "-4", "route", "show", &format!("{vip}/32")])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let mut hops = Vec::new();
    let mut words = out.split_whitespace();
    while let Some(word) = words.next() {
        if word == "via" {
            if let Some(hop) = words.next().and_then(|w| w.parse().ok()) {
                hops.push(hop);
            }
        }
    }
    hops.sort_unstable();
    hops
}

/// A backend that writes `<name> <peer ip>\n` on every connection (the
/// peer being the balancer the connection came through), then echoes
/// everything until EOF. Runs on a thread inside its host's namespace;
/// stops when dropped.
#[derive(Debug)]
pub struct Whoami {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Whoami {
    /// Listens on `addr` in `host`.
    pub fn start(host: &Host, addr: SocketAddr, name: &str) -> Whoami {
        let stop = Arc::new(AtomicBool::new(false));
        let (path, name, flag) = (
            format!("/var/run/netns/{}", host.netns()),
            name.to_owned(),
            Arc::clone(&stop),
        );
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("enter the namespace");
            let listener = std::net::TcpListener::bind(addr).expect("bind the whoami backend");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("the starter waits");
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        let name = name.clone();
                        let flag = Arc::clone(&flag);
                        std::thread::spawn(move || echo(stream, peer.ip(), &name, &flag));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready.recv().expect("the whoami backend started");
        Whoami {
            stop,
            addr,
            thread: Some(thread),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn echo(mut stream: std::net::TcpStream, peer: IpAddr, name: &str, stop: &AtomicBool) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(Duration::from_millis(200))).is_err()
        || stream.write_all(format!("{name} {peer}\n").as_bytes()).is_err()
    {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Whoami {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                eprintln!("testkit: the whoami backend's thread panicked");
            }
        }
    }
}
