//! The floating address under halo-lb's election, in network namespaces
//! (`halo_testkit::netns`): who may remove it (`release-vip`), an address
//! removed from under the active, two clusters configured with one
//! address, and an IPv6 floating address. Consul is a dev agent on the
//! backend host, whose HTTP API doubles as the backend. Needs root and
//! `HALO_NETNS_TESTS=1`.

use std::net::{IpAddr, SocketAddr};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halo_testkit::eventually;
use halo_testkit::netns::{Host, Topology, INTERFACE};

use crate::ha::{host_role, host_status, role, through_vip, HostLb};
use crate::support::DEADLINE;

/// The VIP's port.
const PORT: u16 = 8080;

/// A topology with Consul (dev agent) running on its backend host.
struct Net {
    topology: Topology,
    consul_http: SocketAddr,
    _consul: halo_testkit::netns::HostProcess,
    _consul_dir: tempfile::TempDir,
}

impl Net {
    async fn start() -> Net {
        let topology = Topology::start();
        let backend = topology.backend();
        let consul_http = SocketAddr::from((backend.ip(), 8500));
        let consul_dir = tempfile::tempdir().unwrap();
        let mut consul = backend.command(halo_testkit::consul_binary());
        consul
            .args(["agent", "-dev", "-node=backend", "-http-port=8500", "-dns-port=8600"])
            .arg(format!("-bind={}", backend.ip()))
            .arg(format!("-client={}", backend.ip()))
            .arg("-hcl=disable_update_check = true")
            .stdout(std::fs::File::create(consul_dir.path().join("consul.log")).unwrap())
            .stderr(std::process::Stdio::null());
        let consul = backend.spawn(consul);
        eventually(DEADLINE, "Consul on the backend host to have a leader", || async {
            let stream = backend.connect(consul_http).await.ok()?;
            let (code, body) =
                halo_testkit::http::request_over(stream, consul_http, "GET", "/v1/status/leader").await?;
            (code == 200 && body.contains(':')).then_some(())
        })
        .await;
        Net {
            topology,
            consul_http,
            _consul: consul,
            _consul_dir: consul_dir,
        }
    }

    /// The config of an instance on `host` in `cluster`, floating `vip`
    /// (`/prefix`), its admin API on the host's address at `admin_port`.
    fn config(&self, host: &Host, cluster: &str, vip: IpAddr, prefix: u8, admin_port: u16) -> String {
        let listen = SocketAddr::new(vip, PORT);
        format!(
            "[admin]\nlisten = \"{}:{admin_port}\"\n[consul]\naddress = \"http://{}\"\n[ha]\ncluster = \"{cluster}\"\nid = \"{}\"\n\
             vip_address = \"{vip}/{prefix}\"\nvip_interface = \"{INTERFACE}\"\n[[vip]]\nname = \"web\"\nlisten = \"{listen}\"\nbackends = [\"{}\"]\n",
            host.ip(),
            self.consul_http,
            host.name(),
            self.consul_http
        )
    }

    /// halo-lb on `host` in `cluster` with the IPv4 VIP, admin port 9901.
    fn start_lb(&self, host: &Host, cluster: &str) -> HostLb {
        let vip = IpAddr::V4(self.topology.vip());
        HostLb::start(host, &self.config(host, cluster, vip, 24, 9901), admin(host))
    }
}

fn admin(host: &Host) -> SocketAddr {
    SocketAddr::from((host.ip(), 9901))
}

/// `halo-lb --config <config> release-vip` run in `host`.
fn release_vip(host: &Host, config: &std::path::Path) -> Output {
    host.command(env!("CARGO_BIN_EXE_halo-lb"))
        .arg("--config")
        .arg(config)
        .arg("release-vip")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// A GET of `path` from an instance's admin API, from inside its host.
async fn host_get(host: &Host, admin: SocketAddr, path: &str) -> Option<String> {
    let stream = host.connect(admin).await.ok()?;
    let (code, body) = halo_testkit::http::request_over(stream, admin, "GET", path).await?;
    (code == 200).then_some(body)
}

/// The value of an unlabelled metric in a `/metrics` text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

/// Whether `host` has `vip` on its interface (either family).
fn holds(host: &Host, vip: IpAddr) -> bool {
    let out = host.run("ip", ["-o", "addr", "show", "dev", INTERFACE]);
    out.split_whitespace()
        .filter_map(|w| w.split('/').next()?.parse::<IpAddr>().ok())
        .any(|a| a == vip)
}

/// Which of `hosts` hold `vip`, sampled every 20 ms by a thread.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Vec<String>)>>,
}

impl Sampler {
    fn start(hosts: &[&Host], vip: IpAddr) -> Sampler {
        let hosts: Vec<(String, String)> = hosts
            .iter()
            .map(|h| (h.name().to_owned(), h.netns().to_owned()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let at = Instant::now();
                let holders = hosts
                    .iter()
                    .filter(|(_, netns)| {
                        let out = std::process::Command::new("ip")
                            .args(["-n", netns, "-o", "addr", "show", "dev", INTERFACE])
                            .output()
                            .expect("run ip addr show");
                        String::from_utf8_lossy(&out.stdout)
                            .split_whitespace()
                            .filter_map(|w| w.split('/').next()?.parse::<IpAddr>().ok())
                            .any(|a| a == vip)
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                samples.push((at, holders));
                std::thread::sleep(Duration::from_millis(20).saturating_sub(at.elapsed()));
            }
            samples
        });
        Sampler { stop, thread }
    }

    fn stop(self) -> Vec<(Instant, Vec<String>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// `halo-lb release-vip` run on the active's host with a config that is not
/// the active's own (the standby's, or its own with another admin port)
/// must refuse: a live halo-lb here manages the address. (It used to take
/// the failed bind of the config's admin address, EADDRNOTAVAIL or success,
/// for "halo-lb is not running", and removed a live active's address.)
/// Once the active is killed, the same command removes its leftover.
#[tokio::test]
async fn release_vip_refuses_while_a_live_halo_lb_here_manages_the_address() {
    if !halo_testkit::netns::required("floating_ha::release_vip_refuses_while_a_live_halo_lb_here_manages_the_address")
    {
        return;
    }
    let net = Net::start().await;
    let (lb1, lb2) = (net.topology.lb1(), net.topology.lb2());
    let vip = IpAddr::V4(net.topology.vip());
    let mut one = net.start_lb(lb1, "float");
    host_role(lb1, &one, "active").await;
    let two = net.start_lb(lb2, "float");
    host_role(lb2, &two, "standby").await;
    assert!(holds(lb1, vip), "the active holds the address");

    let dir = tempfile::tempdir().unwrap();
    let other_port = dir.path().join("other-port.toml");
    std::fs::write(&other_port, net.config(lb1, "float", vip, 24, 9911)).unwrap();
    for (what, config) in [
        (
            "the standby's config (its admin address is not on this host)",
            &two.config,
        ),
        ("the active's config with another admin port", &other_port),
    ] {
        let out = release_vip(lb1, config);
        assert!(
            !out.status.success(),
            "release-vip with {what} must refuse: {}",
            text(&out)
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("in use"),
            "{what}: {}",
            text(&out)
        );
        assert!(
            holds(lb1, vip),
            "release-vip with {what} removed a live active's address"
        );
    }
    let s = host_status(lb1, one.admin).await.unwrap();
    assert_eq!(role(&s), "active", "{}", s["ha"]);

    // Dead, its address is a leftover: any config naming the address may
    // remove it (the kernel freed what the live process held).
    one.process.kill();
    let out = release_vip(lb1, &two.config);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("removed"),
        "{}",
        text(&out)
    );
    assert!(!holds(lb1, vip), "the leftover is gone");
    host_role(lb2, &two, "active").await;
}

/// The active's floating address removed from under it (a stray
/// `release-vip`, `ip addr del`, a network manager): the active notices
/// (rtnetlink RTM_DELADDR), adds it back, announces it, and counts it in
/// `halo_ha_vip_restored_total`; the client is served again. (It used to
/// stay `active`, renewing its lease, unreachable, for ever.)
#[tokio::test]
async fn an_active_restores_its_floating_address_removed_from_under_it() {
    if !halo_testkit::netns::required("floating_ha::an_active_restores_its_floating_address_removed_from_under_it") {
        return;
    }
    let net = Net::start().await;
    let (client, lb1) = (net.topology.client(), net.topology.lb1());
    let vip = IpAddr::V4(net.topology.vip());
    let one = net.start_lb(lb1, "float");
    host_role(lb1, &one, "active").await;
    eventually(DEADLINE, "the client to be served through the VIP", || async {
        through_vip(client, SocketAddr::new(vip, PORT)).await.then_some(())
    })
    .await;
    assert!(holds(lb1, vip));

    let removed = Instant::now();
    lb1.run("ip", ["addr", "del", &format!("{vip}/24"), "dev", INTERFACE]);
    eventually(Duration::from_secs(5), "the active to add its address back", || async {
        holds(lb1, vip).then_some(())
    })
    .await;
    let back = removed.elapsed();
    eventually(DEADLINE, "the client to be served through the VIP again", || async {
        through_vip(client, SocketAddr::new(vip, PORT)).await.then_some(())
    })
    .await;
    let metrics = host_get(lb1, one.admin, "/metrics").await.unwrap();
    assert_eq!(
        metric(&metrics, "halo_ha_vip_restored_total"),
        Some(1.0),
        "counted once:\n{}",
        one.log()
    );
    let s = host_status(lb1, one.admin).await.unwrap();
    assert_eq!(role(&s), "active", "{}", s["ha"]);
    eprintln!("FIGURE floating address removed from under the active: back after {back:?}");
}

/// Two clusters whose `[ha]` names one floating address (a typo in
/// `cluster`): each holds its own lock, so both would serve; their ARP
/// conflict check must make exactly one of them give the address up.
/// Started together; within a bounded time at most one host holds the
/// address, it stays the same one, and exactly one instance says `active`;
/// the other says why it serves nothing (`vip_conflict.yielded`). When the
/// keeper stops, the other takes the address over.
#[tokio::test]
async fn two_clusters_with_one_floating_address_never_both_serve() {
    if !halo_testkit::netns::required("floating_ha::two_clusters_with_one_floating_address_never_both_serve") {
        return;
    }
    let net = Net::start().await;
    let (client, lb1, lb2) = (net.topology.client(), net.topology.lb1(), net.topology.lb2());
    let vip = IpAddr::V4(net.topology.vip());
    let started = Instant::now();
    let sampler = Sampler::start(&[lb1, lb2], vip);
    let a = net.start_lb(lb1, "float");
    let b = net.start_lb(lb2, "flaot");
    let settle = Duration::from_secs(10);
    // Settled: one holder, one active, the other yielded.
    let (keeper, other) = eventually(
        settle + Duration::from_secs(5),
        "one cluster to keep the address",
        || async {
            let sa = host_status(lb1, a.admin).await?;
            let sb = host_status(lb2, b.admin).await?;
            let yielded = |s: &serde_json::Value| s["ha"]["vip_conflict"]["yielded"] == true;
            match (role(&sa), role(&sb), holds(lb1, vip), holds(lb2, vip)) {
                ("active", r, true, false) if r != "active" && yielded(&sb) => Some((1, sb)),
                (r, "active", false, true) if r != "active" && yielded(&sa) => Some((2, sa)),
                _ => None,
            }
        },
    )
    .await;
    let settled = started.elapsed();
    let (keeper_host, keeper_lb, other_host, other_lb) = if keeper == 1 {
        (lb1, &a, lb2, &b)
    } else {
        (lb2, &b, lb1, &a)
    };
    assert_eq!(
        other["ha"]["vip_conflict"]["yielded"], true,
        "the other says why it does not serve: {}",
        other["ha"]
    );
    // Stable: for 5 s, the same single holder and active, and the client
    // is served.
    let stable_from = Instant::now();
    while stable_from.elapsed() < Duration::from_secs(5) {
        let sk = host_status(keeper_host, keeper_lb.admin).await.unwrap();
        let so = host_status(other_host, other_lb.admin).await.unwrap();
        assert_eq!(role(&sk), "active", "{}", sk["ha"]);
        assert_ne!(role(&so), "active", "{}", so["ha"]);
        assert!(
            through_vip(client, SocketAddr::new(vip, PORT)).await,
            "the keeper serves"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let samples = sampler.stop();
    let two_holders: Vec<Duration> = samples
        .iter()
        .filter(|(_, h)| h.len() > 1)
        .map(|(at, _)| *at - started)
        .collect();
    let after_settling: Vec<&(Instant, Vec<String>)> =
        samples.iter().filter(|(at, _)| *at >= started + settled).collect();
    assert!(
        after_settling
            .iter()
            .all(|(_, h)| h.len() == 1 && h[0] == keeper_host.name()),
        "the holder changed or doubled after settling ({settled:?}): {:?}",
        after_settling
            .iter()
            .map(|(at, h)| (*at - started, h))
            .collect::<Vec<_>>()
    );
    assert!(settled <= settle, "settled after {settled:?}");
    eprintln!(
        "FIGURE two clusters, one floating address: settled after {settled:?} with {} keeping it; \
         {} of {} samples before that had two holders",
        keeper_host.name(),
        two_holders.len(),
        samples.len()
    );

    // The keeper stops (SIGTERM: it removes the address): the other takes
    // the address over.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(keeper_lb.process.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopped = Instant::now();
    host_role(other_host, other_lb, "active").await;
    eventually(DEADLINE, "the other to hold the address", || async {
        holds(other_host, vip).then_some(())
    })
    .await;
    eventually(DEADLINE, "the client to be served through the other", || async {
        through_vip(client, SocketAddr::new(vip, PORT)).await.then_some(())
    })
    .await;
    eprintln!(
        "FIGURE two clusters: {} took the address over {:?} after the keeper stopped",
        other_host.name(),
        stopped.elapsed()
    );
}

/// An IPv6 floating address (`2001:2::100/64`) between a pair: kill -9 of
/// the active, `release-vip` run after it as systemd's `ExecStopPost=`
/// would, the standby claims the address and its unsolicited neighbour
/// advertisement repoints the client, which reconnects; no two hosts hold
/// the address at any sample. Then the other way round without
/// `release-vip`: the dead active's leftover still answers the new
/// active's DAD probe, which does not hold it back (only a live claimer
/// announces), and is reported in `vip_conflict`.
#[tokio::test]
async fn an_ipv6_floating_address_follows_the_active_on_kill_9() {
    if !halo_testkit::netns::required("floating_ha::an_ipv6_floating_address_follows_the_active_on_kill_9") {
        return;
    }
    let net = Net::start().await;
    let (client, lb1, lb2) = (net.topology.client(), net.topology.lb1(), net.topology.lb2());
    let vip = IpAddr::V6(net.topology.vip6());
    let target = SocketAddr::new(vip, PORT);
    let start = |host: &Host| HostLb::start(host, &net.config(host, "float6", vip, 64, 9901), admin(host));
    let mut one = start(lb1);
    host_role(lb1, &one, "active").await;
    let two = start(lb2);
    host_role(lb2, &two, "standby").await;
    assert!(holds(lb1, vip), "the active holds the address:\n{}", one.log());
    assert!(!holds(lb2, vip), "the standby does not");
    eventually(DEADLINE, "the client to be served through lb1", || async {
        through_vip(client, target).await.then_some(())
    })
    .await;
    assert_eq!(client.neighbour(vip).as_deref(), Some(lb1.mac()));

    let sampler = Sampler::start(&[lb1, lb2], vip);
    let killed = Instant::now();
    one.process.kill();
    let out = release_vip(lb1, &one.config);
    assert!(out.status.success(), "{}", text(&out));
    host_role(lb2, &two, "active").await;
    assert!(holds(lb2, vip), "{}", two.log());
    eventually(DEADLINE, "the client's neighbour entry to move to lb2", || async {
        (client.neighbour(vip).as_deref() == Some(lb2.mac())).then_some(())
    })
    .await;
    eventually(DEADLINE, "the client to be served through lb2", || async {
        through_vip(client, target).await.then_some(())
    })
    .await;
    let served = killed.elapsed();
    let samples = sampler.stop();
    let doubled: Vec<Duration> = samples
        .iter()
        .filter(|(_, h)| h.len() > 1)
        .map(|(at, _)| *at - killed)
        .collect();
    assert!(doubled.is_empty(), "two holders at {doubled:?} after the kill");
    eprintln!(
        "FIGURE IPv6 floating address, kill -9 + release-vip: served through lb2 {served:?} after the kill; {} samples, none with two holders",
        samples.len()
    );

    // Back the other way, the dead active's address left in place.
    let one = start(lb1);
    host_role(lb1, &one, "standby").await;
    let mut two = two;
    two.process.kill();
    host_role(lb1, &one, "active").await;
    assert!(
        holds(lb1, vip),
        "claimed despite the leftover answering:\n{}",
        one.log()
    );
    assert!(holds(lb2, vip), "the leftover");
    let conflict = eventually(DEADLINE, "lb1 to report the leftover", || async {
        let s = host_status(lb1, one.admin).await?;
        s["ha"]["vip_conflict"]["macs"].as_array().cloned().map(|m| (m, s))
    })
    .await;
    assert_eq!(conflict.0, vec![serde_json::json!(lb2.mac())], "{}", one.log());
    assert_eq!(conflict.1["ha"]["vip_conflict"]["yielded"], false);
    assert_eq!(conflict.1["ha"]["vip_conflict"]["live"], serde_json::json!([]));
    eventually(DEADLINE, "the client's neighbour entry to move back to lb1", || async {
        (client.neighbour(vip).as_deref() == Some(lb1.mac())).then_some(())
    })
    .await;
    eventually(DEADLINE, "the client to be served through lb1", || async {
        through_vip(client, target).await.then_some(())
    })
    .await;
    // Still active a while later: the leftover never makes it give way.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = host_status(lb1, one.admin).await.unwrap();
    assert_eq!(role(&s), "active", "{}", s["ha"]);
}
