//! `ha.mode = "ecmp"` in the ECMP testbed ([`halo_testkit::ecmp`]): three
//! balancer hosts each running halo-lb with `packaging/examples/lb-ecmp.toml`
//! (only the VIP address changed) and BIRD 2 with
//! `packaging/bird/bird-halo-lb.conf`, a router running BIRD 2 with
//! `packaging/bird/bird-router.conf` and a multipath route over them,
//! three Consul servers and an agent on every host, backends registered in
//! Consul, and clients behind the router.
//!
//! What the network sees is read from the router's own routing table
//! (`ip route`, polled every 2 ms) and from the clients' connections;
//! what each instance did, from its `/status` (`ecmp.changes`, on its own
//! clock, which the hosts share). Figures are printed as `FIGURE` lines.
//!
//! The router is Linux with BIRD 2: hash-threshold multipath (RFC 2992),
//! no resilient next-hop groups. A next hop leaving or joining moves some
//! flows of the other balancers too; halo-lb terminates TCP, so a moved
//! connection is reset by the balancer it lands on. The tests measure those
//! resets and bound them; they do not pretend they are zero.
//!
//! Needs `HALO_NETNS_TESTS=1`, root and BIRD 2 (installed by
//! `scripts/bird.sh` as root when missing).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use halo_testkit::ecmp::{Backends, Fabric};
use halo_testkit::eventually;
use halo_testkit::netns::HostProcess;
use serde_json::Value;

/// Generous deadline for conditions to become true (BGP sessions take a
/// few seconds to establish).
const WAIT: Duration = Duration::from_secs(60);
const VIP_PORT: u16 = 80;
/// The example's UDP VIP (DNS's port).
const UDP_VIP_PORT: u16 = 53;
const BACKEND_PORT: u16 = 8080;
const UDP_BACKEND_PORT: u16 = 8053;
/// halo-lb's admin API, on loopback as the example has it.
const ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9901);
/// The address the shipped example announces, which the tests replace.
const EXAMPLE_VIP: &str = "198.19.0.200";

fn unix_us(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_micros()).unwrap()
}

/// The testbed with halo-lb on its balancers.
struct Bed {
    fabric: Fabric,
    _backends: Backends,
    lbs: Mutex<BTreeMap<usize, HostProcess>>,
    balancers: usize,
}

impl Bed {
    /// The testbed with `balancers` balancer hosts and `backends` backends
    /// (registered as service `web` with their hosts' agents, passing);
    /// no halo-lb yet.
    async fn start(balancers: usize, backends: usize) -> Bed {
        let fabric = Fabric::start(balancers, backends).await;
        let whoamis = fabric.start_backends(BACKEND_PORT, UDP_BACKEND_PORT).await;
        Bed {
            fabric,
            _backends: whoamis,
            lbs: Mutex::default(),
            balancers,
        }
    }

    fn vip(&self) -> SocketAddr {
        SocketAddr::from((self.fabric.vip(), VIP_PORT))
    }

    fn lb_ip(&self, i: usize) -> Ipv4Addr {
        self.fabric.dc().lb(i).ip()
    }

    /// The shipped example with only the VIP address changed.
    fn config(&self) -> String {
        let example = std::fs::read_to_string(halo_testkit::workspace_root().join("packaging/examples/lb-ecmp.toml"))
            .expect("read packaging/examples/lb-ecmp.toml");
        assert!(example.contains(EXAMPLE_VIP), "the example announces {EXAMPLE_VIP}");
        example.replace(EXAMPLE_VIP, &self.fabric.vip().to_string())
    }

    /// Starts halo-lb on `lb<i>`.
    fn start_lb(&self, i: usize) {
        let dc = self.fabric.dc();
        let path = dc.log_dir().join(format!("lb{i}.toml"));
        std::fs::write(&path, self.config()).unwrap();
        let mut cmd = dc.lb(i).command(env!("CARGO_BIN_EXE_halo-lb"));
        cmd.arg("--config").arg(&path).env("NO_COLOR", "1");
        let process = dc.spawn(&format!("lb{i}"), cmd, "halo-lb");
        self.lbs.lock().unwrap().insert(i, process);
    }

    fn lb_log(&self, i: usize) -> String {
        self.lbs
            .lock()
            .unwrap()
            .get(&i)
            .map(|p| p.log_tail(4000))
            .unwrap_or_default()
    }

    /// `lb<i>`'s `/status`.
    async fn status(&self, i: usize) -> Option<Value> {
        let host = self.fabric.dc().lb(i);
        let stream = host.connect(ADMIN).await.ok()?;
        let (code, body) = halo_testkit::http::request_over(stream, ADMIN, "GET", "/status").await?;
        (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    /// Waits until the router's paths for the VIP are exactly `lbs`, and
    /// each of them announces with every backend in its table (so that
    /// every instance's Maglev table is the same).
    async fn wait_serving(&self, lbs: &[usize], backends: usize) {
        for &i in lbs {
            eventually(WAIT, &format!("lb{i} announcing with {backends} backends"), || async {
                let status = self.status(i).await?;
                let announcing = status["ecmp"]["state"] == "announcing";
                let vips = status["vips"].as_array()?;
                let full = vips
                    .iter()
                    .all(|v| v["backends"].as_array().is_some_and(|b| b.len() == backends));
                (announcing && full).then_some(())
            })
            .await;
        }
        let want: Vec<Ipv4Addr> = lbs.iter().map(|&i| self.lb_ip(i)).collect();
        let took = self.fabric.wait_paths(self.fabric.vip(), &want, WAIT).await;
        assert!(
            took.is_some(),
            "the router's paths for the VIP are {:?}, not {want:?}\nrouter BIRD:\n{}",
            self.fabric.paths(self.fabric.vip()),
            self.fabric.birdc("router", &["show", "protocols"])
        );
    }

    /// Which balancer host an address is.
    fn lb_of(&self, ip: IpAddr) -> Option<usize> {
        (1..=self.balancers).find(|&i| IpAddr::V4(self.lb_ip(i)) == ip)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 1..=self.balancers {
                eprintln!("halo-lb on lb{i} (log tail):\n{}", self.lb_log(i));
            }
            eprintln!(
                "router BIRD:\n{}",
                self.fabric.birdc("router", &["show", "protocols", "all"])
            );
            eprintln!("router route: {:?}", self.fabric.paths(self.fabric.vip()));
        }
    }
}

/// What the backend said first: its name and the balancer the connection
/// came through.
#[derive(Debug, Clone)]
struct Hello {
    backend: String,
    balancer: IpAddr,
}

/// A connection to `target` from `source` (any port), with the backend's
/// hello read.
fn open(target: SocketAddr, source: Ipv4Addr, timeout: Duration) -> std::io::Result<(std::net::TcpStream, Hello)> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&target.into(), timeout)?;
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 128 {
        match stream.read(&mut byte)? {
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    let text = String::from_utf8_lossy(&line).into_owned();
    let (backend, balancer) = text
        .split_once(' ')
        .ok_or_else(|| std::io::Error::other(format!("bad hello {text:?}")))?;
    let balancer = balancer
        .parse()
        .map_err(|_| std::io::Error::other(format!("bad hello {text:?}")))?;
    Ok((
        stream,
        Hello {
            backend: backend.to_owned(),
            balancer,
        },
    ))
}

/// Runs `f` on a thread inside `netns`.
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

async fn join<T: Send + 'static>(handle: std::thread::JoinHandle<T>) -> T {
    tokio::task::spawn_blocking(move || handle.join().expect("a client thread panicked"))
        .await
        .unwrap()
}

/// One new connection: when, and whether it got its hello.
#[derive(Debug, Clone, Copy)]
struct Probe {
    at: Instant,
    ended: Instant,
    ok: bool,
}

/// Threads in the outside host opening a new connection each every few
/// milliseconds (from the client addresses in turn), until stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Probe>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(bed: &Bed, sources: &[Ipv4Addr], threads: usize) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let target = bed.vip();
        let threads = (0..threads)
            .map(|n| {
                let (stop, log, sources) = (Arc::clone(&stop), Arc::clone(&log), sources.to_vec());
                in_netns(bed.fabric.outside().netns(), move || {
                    let mut k = n;
                    while !stop.load(Ordering::Relaxed) {
                        let at = Instant::now();
                        // Long enough for one retransmitted SYN (1 s): a
                        // client whose first SYN was lost still connects.
                        let ok = open(target, sources[k % sources.len()], Duration::from_secs(3)).is_ok();
                        log.lock().unwrap().push(Probe {
                            at,
                            ended: Instant::now(),
                            ok,
                        });
                        k += threads;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Prober { stop, log, threads }
    }

    fn successes_since(&self, since: Instant) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.ok && p.at >= since)
            .count()
    }

    async fn stop(self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            join(thread).await;
        }
        let mut log = self.log.lock().unwrap().clone();
        log.sort_by_key(|p| p.at);
        log
    }
}

/// One long-lived connection's fate.
#[derive(Debug, Clone)]
struct Held {
    hello: Hello,
    /// When a ping first failed, and how.
    failed: Option<(Instant, String)>,
}

/// Long-lived connections from the outside host, each pinged (a line
/// echoed) in turn, about every 50 ms, until stopped; closed cleanly at the
/// end.
struct Holder {
    stop: Arc<AtomicBool>,
    /// Rounds of pings completed.
    rounds: Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<Vec<Held>>,
}

impl Holder {
    /// Opens `count` connections (panics if one cannot be opened: the
    /// cluster must be serving) and starts pinging.
    async fn start(bed: &Bed, sources: &[Ipv4Addr], count: usize) -> Holder {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (target, sources, flag, done) = (bed.vip(), sources.to_vec(), Arc::clone(&stop), Arc::clone(&rounds));
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let thread = in_netns(bed.fabric.outside().netns(), move || {
            let mut conns: Vec<(std::net::TcpStream, Held)> = (0..count)
                .map(|n| {
                    let (stream, hello) = open(target, sources[n % sources.len()], Duration::from_secs(2))
                        .expect("open a held connection");
                    (stream, Held { hello, failed: None })
                })
                .collect();
            let _ready = ready_tx.send(());
            let mut buf = [0u8; 5];
            while !flag.load(Ordering::Relaxed) {
                for (stream, held) in conns.iter_mut().filter(|(_, h)| h.failed.is_none()) {
                    let result = stream.write_all(b"ping\n").and_then(|()| stream.read_exact(&mut buf));
                    let result = result.and_then(|()| {
                        if &buf == b"ping\n" {
                            Ok(())
                        } else {
                            Err(std::io::Error::other("garbled echo"))
                        }
                    });
                    if let Err(e) = result {
                        held.failed = Some((Instant::now(), e.kind().to_string()));
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
            conns.into_iter().map(|(_, held)| held).collect()
        });
        ready.await.expect("the held connections opened");
        Holder { stop, rounds, thread }
    }

    /// Waits until every live connection was pinged `more` more times.
    async fn pinged(&self, more: usize) {
        let target = self.rounds.load(Ordering::Relaxed) + more;
        eventually(WAIT, "the held connections pinged", || async {
            (self.rounds.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await;
    }

    async fn stop(self) -> Vec<Held> {
        self.stop.store(true, Ordering::Relaxed);
        join(self.thread).await
    }
}

/// UDP flows from the outside host: one socket per flow (its own client
/// port), each sending to the UDP VIP and reading which backend, through
/// which balancer, answered.
struct Flows {
    sockets: Vec<std::net::UdpSocket>,
}

impl Flows {
    async fn open(bed: &Bed, sources: &[Ipv4Addr], count: usize) -> Flows {
        let (target, sources) = (SocketAddr::from((bed.fabric.vip(), UDP_VIP_PORT)), sources.to_vec());
        let sockets = bed
            .fabric
            .outside()
            .within(move || {
                (0..count)
                    .map(|n| {
                        let socket = std::net::UdpSocket::bind((sources[n % sources.len()], 0))?;
                        socket.connect(target)?;
                        socket.set_read_timeout(Some(Duration::from_millis(300)))?;
                        Ok(socket)
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .expect("open the UDP flows");
        Flows { sockets }
    }

    /// Each flow's answer (a few tries each: a datagram may be lost while
    /// the routers change), or `None`.
    async fn ask(&self) -> Vec<Option<Hello>> {
        let sockets: Vec<std::net::UdpSocket> = self.sockets.iter().map(|s| s.try_clone().unwrap()).collect();
        tokio::task::spawn_blocking(move || {
            sockets
                .iter()
                .map(|socket| {
                    let mut buf = [0u8; 256];
                    (0..5).find_map(|_| {
                        socket.send(b"who?").ok()?;
                        let n = socket.recv(&mut buf).ok()?;
                        let text = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
                        let (backend, balancer) = text.split_once(' ')?;
                        Some(Hello {
                            backend: backend.to_owned(),
                            balancer: balancer.parse().ok()?,
                        })
                    })
                })
                .collect()
        })
        .await
        .unwrap()
    }
}

/// Held connections through balancer `lb` (or through any other), and how
/// many of those failed.
fn held_counts(bed: &Bed, held: &[Held], through: impl Fn(usize) -> bool) -> (usize, usize) {
    let mine: Vec<&Held> = held
        .iter()
        .filter(|h| bed.lb_of(h.hello.balancer).is_some_and(&through))
        .collect();
    (mine.len(), mine.iter().filter(|h| h.failed.is_some()).count())
}

/// What new connections saw after an event at `from`: the longest a
/// connection started at or after the event waited for its hello (or its
/// failure), among those that failed or took over 100 ms (a SYN lost to a
/// dead balancer waits for its retransmission); zero if none.
/// Connections already under way at the event are the dead balancer's own
/// (see [`in_flight_failures`]).
fn gap_after(probes: &[Probe], from: Instant) -> Duration {
    probes
        .iter()
        .filter(|p| p.at >= from)
        .filter(|p| !p.ok || p.ended.duration_since(p.at) > Duration::from_millis(100))
        .map(|p| p.ended.duration_since(p.at))
        .max()
        .unwrap_or_default()
}

/// New connections under way at `at` that failed.
fn in_flight_failures(probes: &[Probe], at: Instant) -> usize {
    probes.iter().filter(|p| p.at < at && p.ended >= at && !p.ok).count()
}

/// 10,000 connections from 20 client addresses spread over three
/// balancers within ±20 % of a third each, and a client address reaches
/// one backend whichever balancer the router picks (Maglev on the client
/// address, the same table everywhere). Before that, a third balancer
/// joining two: what it does to their connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecmp_spreads_connections_over_every_balancer() {
    if !halo_testkit::netns::required("ecmp::ecmp_spreads_connections_over_every_balancer") {
        return;
    }
    let bed = Bed::start(3, 3).await;
    let sources = bed.fabric.client_ips(20);
    bed.start_lb(1);
    bed.start_lb(2);
    bed.wait_serving(&[1, 2], 3).await;

    // A balancer added: the router's hash-threshold split moves a share of
    // the existing flows to it, and those connections are reset there.
    let holder = Holder::start(&bed, &sources, 120).await;
    bed.start_lb(3);
    bed.wait_serving(&[1, 2, 3], 3).await;
    holder.pinged(2).await;
    let held = holder.stop().await;
    let (count, reset) = held_counts(&bed, &held, |_| true);
    println!(
        "FIGURE ecmp balancer added (2 -> 3, hash-threshold router): {reset} of {count} existing connections reset ({:.0} %)",
        100.0 * reset as f64 / count as f64
    );
    // Hash-threshold moves a third to a half of the flows (by where the
    // new next hop sorts); all would mean no hashing by flow at all.
    assert!(
        reset * 4 <= count * 3,
        "a third balancer joining moved more than three quarters of the flows: {reset} of {count}"
    );

    // The spread.
    const CONNECTIONS: usize = 10_000;
    let target = bed.vip();
    let began = Instant::now();
    let hellos = join(in_netns(bed.fabric.outside().netns(), move || {
        (0..CONNECTIONS)
            .map(|n| {
                let source = sources[n % sources.len()];
                let (_, hello) = open(target, source, Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("connection {n} from {source}: {e}"));
                (source, hello)
            })
            .collect::<Vec<_>>()
    }))
    .await;
    let took = began.elapsed();
    let mut per_lb: BTreeMap<usize, usize> = BTreeMap::new();
    let mut per_client: BTreeMap<Ipv4Addr, (BTreeSet<String>, BTreeSet<usize>)> = BTreeMap::new();
    for (source, hello) in &hellos {
        let lb = bed
            .lb_of(hello.balancer)
            .unwrap_or_else(|| panic!("a connection came from {}, no balancer", hello.balancer));
        *per_lb.entry(lb).or_default() += 1;
        let entry = per_client.entry(*source).or_default();
        entry.0.insert(hello.backend.clone());
        entry.1.insert(lb);
    }
    let third = CONNECTIONS as f64 / 3.0;
    for i in 1..=3 {
        let share = per_lb.get(&i).copied().unwrap_or_default();
        println!(
            "FIGURE ecmp spread: lb{i} {share} of {CONNECTIONS} ({:+.1} % from a third)",
            100.0 * (share as f64 - third) / third
        );
        assert!(
            (share as f64 - third).abs() <= 0.2 * third,
            "lb{i} took {share} of {CONNECTIONS}, more than 20 % off a third: {per_lb:?}"
        );
    }
    println!(
        "FIGURE ecmp spread: {CONNECTIONS} connections in {:.1} s",
        took.as_secs_f64()
    );
    for (client, (backends, lbs)) in &per_client {
        assert_eq!(
            backends.len(),
            1,
            "client {client} reached backends {backends:?} through balancers {lbs:?}: Maglev must pick one"
        );
        assert!(
            lbs.len() > 1,
            "client {client}'s connections all took one balancer: no L4 hashing"
        );
    }
}

/// kill -9 of one balancer's halo-lb: the kernel deletes its announce
/// interface, BIRD withdraws, the router drops the path; then a balancer
/// host's cable pulled: BFD. New connections of the dead one's clients fail
/// only until then; the others' connections are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecmp_a_killed_balancer_is_withdrawn_at_once() {
    if !halo_testkit::netns::required("ecmp::ecmp_a_killed_balancer_is_withdrawn_at_once") {
        return;
    }
    let bed = Bed::start(3, 3).await;
    let sources = bed.fabric.client_ips(20);
    for i in 1..=3 {
        bed.start_lb(i);
    }
    bed.wait_serving(&[1, 2, 3], 3).await;
    let vip = bed.fabric.vip();

    // kill -9 of lb1, the first next hop: with hash-threshold the worst
    // place for the others' flows.
    let flows = Flows::open(&bed, &sources, 60).await;
    let before = flows.ask().await;
    assert!(
        before.iter().all(Option::is_some),
        "every UDP flow answered: {before:?}"
    );
    let holder = Holder::start(&bed, &sources, 90).await;
    let prober = Prober::start(&bed, &sources, 4);
    let warm = Instant::now();
    eventually(WAIT, "new connections through the VIP", || async {
        (prober.successes_since(warm) >= 50).then_some(())
    })
    .await;
    // The event is over once kill() returns: the process is dead and
    // reaped, its announce interface gone. New connections are those
    // started after that.
    bed.lbs.lock().unwrap().get_mut(&1).unwrap().kill();
    let killed_at = Instant::now();
    let withdrawn = bed
        .fabric
        .wait_paths(vip, &[bed.lb_ip(2), bed.lb_ip(3)], Duration::from_secs(10))
        .await
        .expect("the killed balancer's path withdrawn");
    let after = Instant::now();
    eventually(WAIT, "new connections after the kill", || async {
        (prober.successes_since(after) >= 100).then_some(())
    })
    .await;
    holder.pinged(2).await;
    let probes = prober.stop().await;
    let held = holder.stop().await;
    let gap = gap_after(&probes, killed_at);
    let failed = probes.iter().filter(|p| !p.ok && p.at >= killed_at).count();
    let (others, others_reset) = held_counts(&bed, &held, |lb| lb != 1);
    let (own, own_reset) = held_counts(&bed, &held, |lb| lb == 1);
    println!(
        "FIGURE ecmp kill -9: path withdrawn from the router in {} ms; new connections waited up to {} ms ({failed} failed); \
         its own {own} connections: {own_reset} broken; the others' {others}: {others_reset} reset ({:.0} %, hash-threshold)",
        withdrawn.as_millis(),
        gap.as_millis(),
        100.0 * others_reset as f64 / others.max(1) as f64
    );
    assert!(withdrawn < Duration::from_secs(1), "withdrawn after {withdrawn:?}");
    assert!(gap < Duration::from_secs(2), "new connections waited {gap:?}");
    assert!(
        probes
            .iter()
            .filter(|p| p.at >= killed_at + withdrawn + Duration::from_millis(200))
            .all(|p| p.ok),
        "a new connection failed after the path was withdrawn"
    );
    assert!(
        others_reset * 2 <= others,
        "more than half the surviving balancers' connections reset: {others_reset} of {others}"
    );
    // UDP flows the router moved (those of lb1 and some of the others')
    // reach another balancer, which picks the same backend (Maglev on the
    // client address and port, the same table everywhere).
    let after_kill = flows.ask().await;
    let mut moved = 0;
    for (n, (was, now)) in before.iter().zip(&after_kill).enumerate() {
        let (was, now) = (
            was.as_ref().unwrap(),
            now.as_ref()
                .unwrap_or_else(|| panic!("UDP flow {n} got no answer after the kill")),
        );
        assert_eq!(
            was.backend, now.backend,
            "UDP flow {n} moved from {} to {} and changed backend",
            was.balancer, now.balancer
        );
        if was.balancer != now.balancer {
            moved += 1;
        }
    }
    let on_lb1 = before
        .iter()
        .flatten()
        .filter(|h| bed.lb_of(h.balancer) == Some(1))
        .count();
    println!("FIGURE ecmp kill -9: {moved} of {} UDP flows moved to another balancer ({on_lb1} were on lb1), every one kept its backend", before.len());
    assert!(
        moved >= on_lb1 && on_lb1 > 0,
        "lb1's {on_lb1} UDP flows must have moved; {moved} did"
    );

    // lb2's cable pulled (its port on the bridge down; its processes run
    // on, as on a host that died without a word): BFD.
    bed.start_lb(1);
    bed.wait_serving(&[1, 2, 3], 3).await;
    let prober = Prober::start(&bed, &sources, 4);
    let warm = Instant::now();
    eventually(WAIT, "new connections through the VIP", || async {
        (prober.successes_since(warm) >= 50).then_some(())
    })
    .await;
    // As above: the cable is out once unplug() returns; a connection whose
    // handshake got through just before is one of lb2's own.
    bed.fabric.dc().unplug("lb2");
    let off_at = Instant::now();
    let withdrawn = bed
        .fabric
        .wait_paths(vip, &[bed.lb_ip(1), bed.lb_ip(3)], Duration::from_secs(10))
        .await
        .expect("the unplugged balancer's path withdrawn");
    let after = Instant::now();
    eventually(WAIT, "new connections after the cable pull", || async {
        (prober.successes_since(after) >= 100).then_some(())
    })
    .await;
    let probes = prober.stop().await;
    let gap = gap_after(&probes, off_at);
    println!(
        "FIGURE ecmp cable pulled (host gone silent): path withdrawn from the router in {} ms (BFD 3 x 100 ms); \
         new connections waited up to {} ms (a SYN sent before the withdrawal is lost and retransmitted after 1 s); \
         {} connections under way to it broke",
        withdrawn.as_millis(),
        gap.as_millis(),
        in_flight_failures(&probes, off_at)
    );
    assert!(withdrawn < Duration::from_secs(1), "withdrawn after {withdrawn:?}");
    assert!(gap < Duration::from_millis(2500), "new connections waited {gap:?}");
}

/// SIGTERM: the instance says `draining`, waits for its peers to set up
/// the handoff, withdraws, and only after the router dropped its path
/// (seen in the router's table while its listener still listens) closes
/// its listeners; no new connection fails, and its own connections, whose
/// packets the router now sends to the others, finish through the handoff
/// with no reset. Then a balancer cut off from the Consul servers withdraws
/// within its lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecmp_a_drained_balancer_withdraws_before_its_listeners_close() {
    if !halo_testkit::netns::required("ecmp::ecmp_a_drained_balancer_withdraws_before_its_listeners_close") {
        return;
    }
    let bed = Bed::start(3, 3).await;
    let sources = bed.fabric.client_ips(20);
    for i in 1..=3 {
        bed.start_lb(i);
    }
    bed.wait_serving(&[1, 2, 3], 3).await;
    let vip = bed.fabric.vip();
    eventually(WAIT, "lb1 seeing three members announcing", || async {
        let status = bed.status(1).await?;
        let members = status["ecmp"]["members"].as_array()?;
        (members.len() == 3 && members.iter().all(|m| m["state"] == "announcing")).then_some(())
    })
    .await;

    let holder = Holder::start(&bed, &sources, 90).await;
    let prober = Prober::start(&bed, &sources, 4);
    let warm = Instant::now();
    eventually(WAIT, "new connections through the VIP", || async {
        (prober.successes_since(warm) >= 50).then_some(())
    })
    .await;
    let term_at = Instant::now();
    bed.lbs
        .lock()
        .unwrap()
        .get_mut(&1)
        .unwrap()
        .signal(nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let withdrawn = bed
        .fabric
        .wait_paths(vip, &[bed.lb_ip(2), bed.lb_ip(3)], Duration::from_secs(10))
        .await
        .expect("the drained balancer's path withdrawn");
    let gone_us = unix_us(SystemTime::now());
    let still_listening = bed.fabric.listening("lb1", bed.vip());
    // Its own account: withdrawn, then the listeners closed.
    let status = eventually(WAIT, "lb1 recording its listeners closed", || async {
        let status = bed.status(1).await?;
        let changes = status["ecmp"]["changes"].as_array()?;
        changes
            .iter()
            .any(|c| c["reason"] == "listeners_closed")
            .then_some(status)
    })
    .await;
    let changes = status["ecmp"]["changes"].as_array().unwrap();
    let at = |reason: &str| {
        changes
            .iter()
            .find(|c| c["reason"] == reason)
            .and_then(|c| c["at_unix_us"].as_u64())
            .unwrap_or_else(|| panic!("no {reason} change: {changes:?}"))
    };
    let (drain_us, closed_us) = (at("drain"), at("listeners_closed"));
    let seen = eventually(WAIT, "lb2 seeing lb1 draining and the peers handing over", || async {
        let status = bed.status(2).await?;
        let members = status["ecmp"]["members"].as_array()?.clone();
        let drained = members.iter().find(|m| m["state"] == "draining")?["instance"].clone();
        members
            .iter()
            .filter(|m| m["state"] == "announcing")
            .all(|m| m["handoff"] == drained)
            .then_some(members)
    })
    .await;
    let after = Instant::now();
    eventually(WAIT, "new connections after the drain", || async {
        (prober.successes_since(after) >= 100).then_some(())
    })
    .await;
    holder.pinged(2).await;
    let probes = prober.stop().await;
    // Closing them lets lb1's drain end: their FINs reach it through the
    // handoff too.
    let held = holder.stop().await;
    let failed = probes.iter().filter(|p| !p.ok && p.at >= term_at).count();
    let (own, own_reset) = held_counts(&bed, &held, |lb| lb == 1);
    let (others, others_reset) = held_counts(&bed, &held, |lb| lb != 1);
    let exited = eventually(WAIT, "lb1 to finish draining and exit", || async {
        let mut lbs = bed.lbs.lock().unwrap();
        let process = lbs.get_mut(&1).unwrap();
        (!process.is_running()).then(|| term_at.elapsed())
    })
    .await;
    println!(
        "FIGURE ecmp SIGTERM: path withdrawn from the router {} ms after the signal (after the peers set up the handoff), \
         listeners closed {} ms after the withdrawal; {failed} new connections failed; its own {own} connections: {own_reset} reset; \
         the others' {others}: {others_reset} reset; exited {} ms after the signal, once its connections were closed",
        withdrawn.as_millis(),
        closed_us.saturating_sub(gone_us) / 1000,
        exited.as_millis()
    );
    assert!(own > 0, "no held connection went through lb1");
    assert_eq!(own_reset, 0, "connections of the drained balancer were reset: {held:?}");
    let drained = seen
        .iter()
        .find(|m| m["state"] == "draining")
        .and_then(|m| m["instance"].as_str())
        .unwrap()
        .to_owned();
    assert!(
        seen.iter()
            .filter(|m| m["state"] == "announcing")
            .all(|m| m["handoff"].as_str() == Some(drained.as_str())),
        "every announcing peer hands over to the draining lb1: {seen:?}"
    );
    // lb1 is the router's first next hop: hash-threshold moves a sixth of
    // all flows from lb2 to lb3, whose owner nobody knows (resilient
    // hashing moves none).
    assert!(
        others_reset * 2 <= others,
        "more than half the other balancers' connections reset: {others_reset} of {others}"
    );
    assert!(
        still_listening,
        "lb1's listener was closed before the router dropped its path"
    );
    assert!(
        drain_us < gone_us && gone_us < closed_us,
        "withdraw {drain_us} < route gone {gone_us} < listeners closed {closed_us}"
    );
    // Only a handshake under way at the instant of the withdrawal can fail
    // (one per prober thread at most): hash-threshold may move it from lb2
    // to lb3 between its SYN and its ACK.
    assert!(failed <= 4, "{failed} new connections failed during the drain");
    println!("FIGURE ecmp SIGTERM: lb2's view of the members during the drain: {seen:?}");

    // Cut off from the Consul servers: lb3 withdraws within its lease
    // (announce_lease, 3 s, plus one read interval).
    bed.fabric.dc().cut_from_servers("lb3");
    let withdrawn = bed
        .fabric
        .wait_paths(vip, &[bed.lb_ip(2)], Duration::from_secs(10))
        .await
        .expect("the cut-off balancer's path withdrawn");
    println!(
        "FIGURE ecmp cut off from Consul: path withdrawn {} ms after the cut (announce_lease 3 s)",
        withdrawn.as_millis()
    );
    assert!(
        withdrawn <= Duration::from_millis(3000 + 600 + 500),
        "withdrawn {withdrawn:?} after the cut"
    );
    bed.fabric.dc().heal_all();
    bed.wait_serving(&[2, 3], 3).await;
}
