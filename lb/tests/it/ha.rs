//! The active/standby pair against real Consul: election, failover on
//! kill -9, handover on SIGTERM, a cut-off active, Consul leader loss, and
//! write forwarding from the standby.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use halo_testkit::fault::FaultProxy;
use halo_testkit::{eventually, ConsulAgent};
use serde_json::Value;

use crate::support::*;

/// The defaults the bounds are stated for.
const CHECK_TTL: Duration = Duration::from_secs(1);
const LOCK_DELAY: Duration = Duration::from_millis(200);

/// A config for one instance of the pair `cluster`, serving `vip` from
/// static `backends`, talking to Consul at `consul_url`.
fn ha_config(
    id: &str,
    cluster: &str,
    consul_url: &str,
    admin: SocketAddr,
    vip: SocketAddr,
    backends: &[SocketAddr],
) -> String {
    let mut config = one_vip(admin, vip, backends, "");
    config.push_str(&format!(
        "\n[consul]\naddress = \"{consul_url}\"\n\n[ha]\ncluster = \"{cluster}\"\nid = \"{id}\"\n"
    ));
    config
}

/// Starts an instance and waits until its admin API answers (it serves
/// nothing until elected).
async fn start(config: &str, admin: SocketAddr) -> Lb {
    Lb::start(config, admin, &[]).await
}

pub(crate) fn role(status: &Value) -> &str {
    status["ha"]["role"].as_str().unwrap_or("?")
}

async fn wait_role(lb: &Lb, want: &str) -> Value {
    eventually(DEADLINE, &format!("{} to be {want}", lb.admin), || async {
        let status = halo_testkit::http::get(lb.admin, "/status").await?;
        let status: Value = serde_json::from_str(&status.1).ok()?;
        (role(&status) == want).then_some(status)
    })
    .await
}

/// A pair on one host: the first instance elected before the second starts.
struct Pair {
    a: Lb,
    b: Lb,
    vip: SocketAddr,
    _backends: Vec<TestBackend>,
}

async fn pair(cluster: &str, url_a: &str, url_b: &str) -> Pair {
    let backends = vec![
        TestBackend::start("one", Behavior::GreetEcho).await,
        TestBackend::start("two", Behavior::GreetEcho).await,
    ];
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let (admin_a, vip) = addrs();
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let a = start(&ha_config("a", cluster, url_a, admin_a, vip, &backend_addrs), admin_a).await;
    wait_role(&a, "active").await;
    let b = start(&ha_config("b", cluster, url_b, admin_b, vip, &backend_addrs), admin_b).await;
    wait_role(&b, "standby").await;
    Pair {
        a,
        b,
        vip,
        _backends: backends,
    }
}

/// One of an instance's terms as active: `[from, to)` in its own wall-clock
/// microseconds; a running term ends "now".
fn terms(status: &Value) -> Vec<(u64, u64, u64)> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    status["ha"]["terms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["epoch"].as_u64().unwrap(),
                t["from_unix_us"].as_u64().unwrap(),
                t["to_unix_us"].as_u64().unwrap_or(now),
            )
        })
        .collect()
}

/// Panics if any term of `a` overlaps any term of `b`.
fn assert_never_both_active(a: &Value, b: &Value) {
    for (ea, fa, ta) in terms(a) {
        for (eb, fb, tb) in terms(b) {
            assert!(
                ta <= fb || tb <= fa,
                "two actives at once: a's epoch {ea} [{fa}, {ta}) overlaps b's epoch {eb} [{fb}, {tb})"
            );
            assert_ne!(ea, eb, "two terms with the same epoch");
        }
    }
}

#[tokio::test]
async fn one_instance_is_elected_and_the_standby_forwards_writes() {
    let consul = ConsulAgent::start().await;
    let p = pair("elect", &consul.http_url(), &consul.http_url()).await;

    let sa = p.a.status().await;
    let sb = p.b.status().await;
    assert_eq!(sa["serving"], true);
    assert_eq!(sb["serving"], false, "the standby binds nothing");
    let epoch = sa["ha"]["epoch"].as_u64().unwrap();
    assert!(epoch >= 1);
    // Both name the same leader and epoch; the standby keeps warm tables.
    for s in [&sa, &sb] {
        assert_eq!(s["ha"]["leader"]["id"], "a", "{s}");
        assert_eq!(s["ha"]["leader"]["epoch"].as_u64(), Some(epoch));
    }
    assert_eq!(sb["vips"][0]["backends"].as_array().unwrap().len(), 2);
    assert!(greeting(p.vip).await.is_ok(), "the active serves");

    // A write sent to the standby lands on the active.
    let backend = sa["vips"][0]["backends"][0]["address"].as_str().unwrap().to_owned();
    let (code, body) = halo_testkit::http::admin_post(p.b.admin, &format!("/vips/web/backends/{backend}/disable"))
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let sa = p.a.status().await;
    let disabled: Vec<&Value> = sa["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "disabled")
        .collect();
    assert_eq!(disabled.len(), 1, "the active's table has the backend disabled: {sa}");
    assert_eq!(disabled[0]["address"], backend);
    // The standby's own table is untouched: it only forwarded.
    let sb = p.b.status().await;
    assert!(sb["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .all(|b| b["state"] != "disabled"));

    // The role, leader and epoch are in the metrics too.
    let (_, metrics) = halo_testkit::http::get(p.a.admin, "/metrics").await.unwrap();
    assert!(metrics.contains("halo_ha_active 1"), "{metrics}");
    assert!(metrics.contains("halo_ha_info{cluster=\""), "{metrics}");
    assert!(metrics.contains(&format!("halo_ha_epoch {epoch}")), "{metrics}");
}

#[tokio::test]
async fn kill_9_of_the_active_fails_over_within_ttl_plus_lock_delay() {
    let consul = ConsulAgent::start().await;
    let p = pair("kill", &consul.http_url(), &consul.http_url()).await;
    let epoch = p.a.status().await["ha"]["epoch"].as_u64().unwrap();
    let prober = Prober::start(p.vip);
    served_after(&prober.log, Instant::now()).await;

    let killed = Instant::now();
    p.a.signal(nix::sys::signal::Signal::SIGKILL);
    let status = wait_role(&p.b, "active").await;
    served_after(&prober.log, killed).await;
    let log = prober.stop().await;

    assert!(status["ha"]["epoch"].as_u64().unwrap() > epoch, "a new epoch");
    let first_ok = log
        .iter()
        .find(|(at, ok)| *at > killed && *ok)
        .map(|(at, _)| *at)
        .unwrap();
    let gap = first_ok - killed;
    eprintln!("kill -9 failover: served again {gap:?} after the kill");
    assert!(
        gap <= CHECK_TTL + LOCK_DELAY + Duration::from_millis(500),
        "failover took {gap:?}"
    );
    // Failures only inside the window, none once the standby serves.
    let late: Vec<_> = log.iter().filter(|(at, ok)| *at >= first_ok && !ok).collect();
    assert!(
        late.is_empty(),
        "{} failures after the standby took over; b's terms: {}",
        late.len(),
        p.b.status().await["ha"]["terms"]
    );
    // Before the kill every attempt succeeded, but for the one in flight
    // when it happened (the prober makes one attempt at a time).
    let before: Vec<bool> = log.iter().filter(|(at, _)| *at < killed).map(|(_, ok)| *ok).collect();
    let settled = &before[..before.len().saturating_sub(1)];
    assert!(settled.iter().all(|ok| *ok), "failures before the kill");
}

#[tokio::test]
async fn a_frozen_active_serves_nothing_when_it_wakes_and_the_standby_never_claims_an_unbound_vip() {
    // SIGSTOP of the active for 3 s on one host: the standby's probes go
    // unanswered, it takes the lock, but cannot bind the port the frozen
    // process still holds, so it must not call itself active (it releases
    // and retries). The frozen one wakes past its lease: it serves nothing
    // (the data plane checks the lease per connection) and steps down.
    let consul = ConsulAgent::start().await;
    let p = pair("frozen", &consul.http_url(), &consul.http_url()).await;
    let prober = Prober::start(p.vip);
    served_after(&prober.log, Instant::now()).await;

    // Watch b's claims: whenever it says active, its listener must be bound.
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let monitor = {
        let (admin, watching) = (p.b.admin, std::sync::Arc::clone(&watching));
        tokio::spawn(async move {
            let mut lies = Vec::new();
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some((200, body)) = halo_testkit::http::get(admin, "/status").await {
                    let s: Value = serde_json::from_str(&body).unwrap();
                    if role(&s) == "active" && s["vips"][0]["listening"] != true {
                        lies.push(s);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lies
        })
    };
    let frozen = Instant::now();
    p.a.signal(nix::sys::signal::Signal::SIGSTOP);
    // The standby takes the lock (forced takeover) while a is frozen.
    eventually(DEADLINE, "the standby to force the takeover", || async {
        let s = p.b.status().await;
        (s["ha"]["detector"]["forced_takeovers"].as_u64() >= Some(1)).then_some(())
    })
    .await;
    tokio::time::sleep_until((frozen + Duration::from_secs(3)).into()).await;
    p.a.signal(nix::sys::signal::Signal::SIGCONT);
    let thawed = Instant::now();
    // Either may serve next: b when its back-off ends, or a, which finds the
    // lock free once it has stepped down (b released it on failing to bind).
    served_after(&prober.log, thawed).await;
    let (sa, _) = eventually(DEADLINE, "one instance to serve", || async {
        let (sa, sb) = (p.a.status().await, p.b.status().await);
        (role(&sa) == "active" || role(&sb) == "active").then_some((sa, sb))
    })
    .await;
    // The thawed a did not serve on past its lease: its frozen term ended
    // on the lease (or a loss it learned of), not by a handover.
    let first = sa["ha"]["terms"].as_array().unwrap()[0].clone();
    assert!(
        first["ended_by"] == "lease_expired" || first["ended_by"] == "lock_lost",
        "{first}"
    );
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let lies = monitor.await.unwrap();
    let log = prober.stop().await;
    assert!(
        lies.is_empty(),
        "b claimed to be active without its listener: {}",
        lies[0]
    );
    let (sa, sb) = (p.a.status().await, p.b.status().await);
    assert_never_both_active(&sa, &sb);
    let gap = log
        .iter()
        .find(|(at, ok)| *at > thawed && *ok)
        .map(|(at, _)| at.duration_since(frozen))
        .unwrap();
    eprintln!("frozen active: served again {gap:?} after the SIGSTOP (frozen for 3 s)");
}

#[tokio::test]
async fn sigterm_on_the_active_hands_over_within_100ms() {
    let consul = ConsulAgent::start().await;
    let mut p = pair("term", &consul.http_url(), &consul.http_url()).await;
    let prober = Prober::start(p.vip);
    served_after(&prober.log, Instant::now()).await;

    let sent = Instant::now();
    p.a.signal(nix::sys::signal::Signal::SIGTERM);
    let sb = wait_role(&p.b, "active").await;
    served_after(&prober.log, sent).await;
    assert!(p.a.wait_exit().await.success(), "{}", p.a.log());
    let log = prober.stop().await;

    // The handover from both sides' own clocks: a stopped serving, then b
    // started, within 100 ms.
    let a_stopped =
        p.a.log()
            .lines()
            .find(|l| l.contains("stepped down for shutdown"))
            .map(str::to_owned);
    assert!(a_stopped.is_some(), "a logged its step-down:\n{}", p.a.log());
    let b_terms = terms(&sb);
    let (_, b_from, _) = *b_terms.last().unwrap();
    let a_to = a_term_end(&p.a);
    assert!(a_to <= b_from, "b started at {b_from} before a stopped at {a_to}");
    let handover = Duration::from_micros(b_from - a_to);
    // What a client saw: the longest run of attempts without a greeting.
    let mut worst = Duration::ZERO;
    let mut last_ok: Option<Instant> = None;
    for (at, ok) in &log {
        if *ok {
            if let Some(prev) = last_ok {
                worst = worst.max(*at - prev);
            }
            last_ok = Some(*at);
        }
    }
    eprintln!("SIGTERM handover: {handover:?} between the instances' own timestamps, client gap {worst:?}");
    assert!(handover <= Duration::from_millis(100), "handover took {handover:?}");
    assert!(sent.elapsed() < DEADLINE);
}

/// The end of a's last term, from the `term ended` line it logs with its own
/// wall clock.
fn a_term_end(lb: &Lb) -> u64 {
    let log = lb.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("term ended"))
        .unwrap_or_else(|| panic!("no 'term ended' line:\n{log}"));
    line.split("to_unix_us=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no to_unix_us in {line:?}"))
}

#[tokio::test]
async fn an_active_cut_off_from_consul_stops_before_the_standby_starts_20_times() {
    let consul = ConsulAgent::start().await;
    let to_a = FaultProxy::start(consul.http_addr()).await;
    let to_b = FaultProxy::start(consul.http_addr()).await;
    let p = pair("cut", &to_a.http_url(), &to_b.http_url()).await;
    let mut epochs = Vec::new();
    for round in 0..20 {
        let (active, standby, cut) = if round % 2 == 0 {
            (&p.a, &p.b, &to_a)
        } else {
            (&p.b, &p.a, &to_b)
        };
        cut.cut();
        let promoted = wait_role(standby, "active").await;
        epochs.push(promoted["ha"]["epoch"].as_u64().unwrap());
        // The cut-off instance stopped by itself, on its lease: it cannot
        // confirm the lock, so it is suspended (it still answers its
        // peer's probes, saying so, which lets the peer take over at once).
        let demoted = eventually(DEADLINE, "the cut-off instance to stop serving", || async {
            let s: Value = serde_json::from_str(&halo_testkit::http::get(active.admin, "/status").await?.1).ok()?;
            (role(&s) == "suspended" || role(&s) == "standby").then_some(s)
        })
        .await;
        let ended = demoted["ha"]["terms"].as_array().unwrap().last().unwrap()["ended_by"].clone();
        assert!(
            ended == "lease_expired" || ended == "lock_lost" || ended == "session_lost",
            "round {round}: ended by {ended}"
        );
        cut.restore();
        // Back as a standby with a fresh session before the next round.
        eventually(DEADLINE, "the cut-off instance to contend again", || async {
            let s = halo_testkit::http::get(active.admin, "/status").await?;
            let s: Value = serde_json::from_str(&s.1).ok()?;
            (role(&s) == "standby" && s["ha"]["session"].is_string() && s["ha"]["consul_error"].is_null()).then_some(())
        })
        .await;
    }
    let (sa, sb) = (p.a.status().await, p.b.status().await);
    assert_never_both_active(&sa, &sb);
    // How far apart the instances' own timestamps kept each handover.
    let mut all: Vec<(u64, u64)> = terms(&sa).iter().chain(terms(&sb).iter()).map(|t| (t.1, t.2)).collect();
    all.sort_unstable();
    let gaps: Vec<u64> = all.windows(2).map(|w| w[1].0 - w[0].1).collect();
    eprintln!(
        "cut-off handovers: smallest gap {} ms, largest {} ms",
        gaps.iter().min().unwrap() / 1000,
        gaps.iter().max().unwrap() / 1000
    );
    assert!(epochs.windows(2).all(|w| w[0] < w[1]), "epochs rise: {epochs:?}");
    // One term per round plus the first; more only if an active suspended
    // and resumed on a slow answer, which is allowed (same epoch).
    assert!(
        terms(&sa).len() + terms(&sb).len() >= 21,
        "one term per round plus the first"
    );
}

#[tokio::test]
async fn losing_the_consul_leader_never_makes_two_actives_nor_empties_a_table() {
    let mut cluster = halo_testkit::ConsulCluster::start(3).await;
    let agent = cluster.add_client().await;
    let client = halo_consul::Client::from_address(agent.http_url()).unwrap();
    let backends = [
        TestBackend::start("one", Behavior::GreetEcho).await,
        TestBackend::start("two", Behavior::GreetEcho).await,
    ];
    for (i, b) in backends.iter().enumerate() {
        client
            .register_service(&halo_consul::ServiceRegistration {
                id: format!("web-{i}"),
                name: "web".into(),
                address: Some("127.0.0.1".into()),
                port: Some(b.addr.port()),
                checks: vec![halo_consul::CheckRegistration::ttl(
                    format!("web-{i}:ttl"),
                    "ttl",
                    Duration::from_secs(600),
                    halo_consul::CheckStatus::Passing,
                )],
                ..halo_consul::ServiceRegistration::default()
            })
            .await
            .unwrap();
    }
    let config = |id: &str, admin: SocketAddr, vip: SocketAddr| {
        format!(
            "[admin]\nlisten = \"{admin}\"\n[consul]\naddress = \"{}\"\nwait = \"5s\"\n[ha]\ncluster = \"quorum\"\nid = \"{id}\"\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nservice = \"web\"\n",
            agent.http_url()
        )
    };
    let (admin_a, vip) = addrs();
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let a = start(&config("a", admin_a, vip), admin_a).await;
    wait_role(&a, "active").await;
    let b = start(&config("b", admin_b, vip), admin_b).await;
    wait_role(&b, "standby").await;
    for lb in [&a, &b] {
        eventually(DEADLINE, "both backends in the table", || async {
            (lb.status().await["vips"][0]["backends"].as_array()?.len() == 2).then_some(())
        })
        .await;
    }
    let epoch = a.status().await["ha"]["epoch"].as_u64().unwrap();

    // Watch both instances and the VIP through the whole outage.
    let prober = Prober::start(vip);
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let monitor = {
        let (admins, watching) = ([a.admin, b.admin], std::sync::Arc::clone(&watching));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                for admin in admins {
                    if let Some((200, body)) = halo_testkit::http::get(admin, "/status").await {
                        let s: Value = serde_json::from_str(&body).unwrap();
                        let tables = s["vips"][0]["backends"].as_array().map_or(0, Vec::len);
                        seen.push((admin, role(&s).to_owned(), s["ha"]["epoch"].as_u64(), tables));
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };

    let old = cluster.leader().await.expect("a leader");
    let stopped = std::time::Instant::now();
    cluster.stop(old);
    eventually(DEADLINE, "a new Consul leader", || async {
        cluster.leader().await.filter(|l| *l != old)
    })
    .await;
    let elected = std::time::Instant::now();
    // Past the election: both instances reach Consul through it again.
    for lb in [&a, &b] {
        eventually(DEADLINE, "the instance to reach Consul again", || async {
            let s = lb.status().await;
            (s["ha"]["consul_error"].is_null() && s["vips"][0]["discovery"]["up"] == true).then_some(())
        })
        .await;
    }
    served_after(&prober.log, elected).await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    let seen = monitor.await.unwrap();
    let log = prober.stop().await;

    // Without a leader no read of the lock can be confirmed: the active
    // suspends (serving nothing) rather than risk two actives, and serves
    // again once a confirming read succeeds; a standby may instead take
    // over, but never while the other serves.
    assert!(seen.len() > 10, "the monitor saw the outage");
    for (admin, _, _, tables) in &seen {
        assert_eq!(*tables, 2, "{admin}'s table lost backends");
    }
    let (sa, sb) = eventually(DEADLINE, "one instance to serve again", || async {
        let (sa, sb) = (a.status().await, b.status().await);
        (role(&sa) == "active" || role(&sb) == "active").then_some((sa, sb))
    })
    .await;
    assert_never_both_active(&sa, &sb);
    // a resumed (same epoch), or one of them won the lock anew after a
    // forced takeover (a later epoch): never an older one.
    let active = if role(&sa) == "active" { &sa } else { &sb };
    assert!(active["ha"]["epoch"].as_u64() >= Some(epoch), "{}", active["ha"]);
    // Served again soon after Consul had a leader (the goal is 1 s; the
    // bound is generous).
    let back = log
        .iter()
        .find(|(at, ok)| *ok && *at > elected)
        .map(|(at, _)| at.duration_since(elected))
        .expect("served after the election");
    let outage = log
        .iter()
        .filter(|(at, ok)| !ok && *at > stopped)
        .map(|(at, _)| *at)
        .max()
        .map(|last| last.duration_since(stopped));
    eprintln!(
        "consul leader loss: new leader {:?} after the stop; vip served {back:?} after that; failures until {outage:?} after the stop",
        elected.duration_since(stopped)
    );
    assert!(
        back < Duration::from_secs(5),
        "served again {back:?} after the new leader"
    );
}

/// A halo-lb in a namespace host, with its log in a temp dir.
pub(crate) struct HostLb {
    pub(crate) process: halo_testkit::netns::HostProcess,
    pub(crate) admin: SocketAddr,
    log: std::path::PathBuf,
    pub(crate) config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl HostLb {
    pub(crate) fn start(host: &halo_testkit::netns::Host, config: &str, admin: SocketAddr) -> HostLb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lb.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("lb.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = host.command(env!("CARGO_BIN_EXE_halo-lb"));
        cmd.arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info,halo_lb=debug")
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        HostLb {
            process: host.spawn(cmd),
            admin,
            log,
            config: path,
            _dir: dir,
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `/status` of an instance on `host`, asked from inside its namespace.
pub(crate) async fn host_status(host: &halo_testkit::netns::Host, admin: SocketAddr) -> Option<Value> {
    let stream = host.connect(admin).await.ok()?;
    let (code, body) = halo_testkit::http::request_over(stream, admin, "GET", "/status").await?;
    (code == 200).then(|| serde_json::from_str(&body).ok())?
}

pub(crate) async fn host_role(host: &halo_testkit::netns::Host, lb: &HostLb, want: &str) -> Value {
    eventually(DEADLINE, &format!("{} to be {want}", host.name()), || async {
        let s = host_status(host, lb.admin).await?;
        (role(&s) == want).then_some(s)
    })
    .await
}

/// One request through the VIP from the client host: the backend (Consul's
/// HTTP API on the backend host) answers 200.
pub(crate) async fn through_vip(client: &halo_testkit::netns::Host, vip: SocketAddr) -> bool {
    let Ok(stream) = client.connect(vip).await else {
        return false;
    };
    matches!(
        halo_testkit::http::request_over(stream, vip, "GET", "/v1/status/leader").await,
        Some((200, _))
    )
}

/// A UDP echo server (argv: address, port), for the netns hosts.
const UDP_ECHO: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind((sys.argv[1],int(sys.argv[2])))\nwhile True:\n d,a=s.recvfrom(2048)\n s.sendto(d,a)\n";

/// Sends one datagram to argv's address and port; prints "ok" if it comes
/// back within 300 ms from that address.
const UDP_ASK: &str = "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(0.3)\nt=(sys.argv[1],int(sys.argv[2]))\ns.sendto(b'halo',t)\ntry:\n d,a=s.recvfrom(64)\n print('ok' if d==b'halo' and a==t else 'wrong')\nexcept OSError:\n print('none')\n";

#[tokio::test]
async fn a_floating_vip_follows_the_active_between_hosts() {
    use halo_testkit::netns::{self, Topology, INTERFACE};
    if !netns::required("ha::a_floating_vip_follows_the_active_between_hosts") {
        return;
    }
    let topology = Topology::start();
    let (client, lb1, lb2, backend) = (topology.client(), topology.lb1(), topology.lb2(), topology.backend());
    // Consul runs on the backend host; its HTTP API doubles as the backend.
    let consul_http = SocketAddr::from((backend.ip(), 8500));
    let mut consul = backend.command(halo_testkit::consul_binary());
    let consul_dir = tempfile::tempdir().unwrap();
    consul
        .args(["agent", "-dev", "-node=backend", "-http-port=8500", "-dns-port=8600"])
        .arg(format!("-bind={}", backend.ip()))
        .arg(format!("-client={}", backend.ip()))
        .arg("-hcl=disable_update_check = true")
        .stdout(std::fs::File::create(consul_dir.path().join("consul.log")).unwrap())
        .stderr(std::process::Stdio::null());
    let _consul = backend.spawn(consul);
    eventually(DEADLINE, "Consul on the backend host to have a leader", || async {
        let stream = backend.connect(consul_http).await.ok()?;
        let (code, body) = halo_testkit::http::request_over(stream, consul_http, "GET", "/v1/status/leader").await?;
        (code == 200 && body.contains(':')).then_some(())
    })
    .await;

    let vip = SocketAddr::from((topology.vip(), 8080));
    // A UDP VIP on the same floating address: an echo on the backend host.
    let udp_vip = SocketAddr::from((topology.vip(), 5353));
    let udp_backend = SocketAddr::from((backend.ip(), 7053));
    let _echo = backend.spawn({
        let mut echo = backend.command("python3");
        echo.args([
            "-c",
            UDP_ECHO,
            &udp_backend.ip().to_string(),
            &udp_backend.port().to_string(),
        ]);
        echo
    });
    let config = |host: &halo_testkit::netns::Host, id: &str| {
        format!(
            "[admin]\nlisten = \"{}:9901\"\n[consul]\naddress = \"http://{consul_http}\"\n[ha]\ncluster = \"float\"\nid = \"{id}\"\nvip_address = \"{}/24\"\nvip_interface = \"{INTERFACE}\"\n[[vip]]\nname = \"web\"\nlisten = \"{vip}\"\nbackends = [\"{consul_http}\"]\n[[vip]]\nname = \"dns\"\nlisten = \"{udp_vip}\"\nprotocol = \"udp\"\nbackends = [\"{udp_backend}\"]\n",
            host.ip(),
            topology.vip()
        )
    };
    // One datagram from the client host through the UDP VIP, echoed.
    let udp_through = || {
        client
            .run(
                "python3",
                ["-c", UDP_ASK, &udp_vip.ip().to_string(), &udp_vip.port().to_string()],
            )
            .trim()
            == "ok"
    };
    let admin1 = SocketAddr::from((lb1.ip(), 9901));
    let admin2 = SocketAddr::from((lb2.ip(), 9901));
    let mut one = HostLb::start(lb1, &config(lb1, "lb1"), admin1);
    host_role(lb1, &one, "active").await;
    let two = HostLb::start(lb2, &config(lb2, "lb2"), admin2);
    host_role(lb2, &two, "standby").await;

    assert!(
        lb1.addresses().contains(&topology.vip()),
        "the active holds the address"
    );
    assert!(!lb2.addresses().contains(&topology.vip()), "the standby does not");
    eventually(DEADLINE, "the client to be served through lb1", || async {
        through_vip(client, vip).await.then_some(())
    })
    .await;
    assert_eq!(client.neighbour(topology.vip()).as_deref(), Some(lb1.mac()));
    eventually(DEADLINE, "a datagram echoed through the UDP VIP on lb1", || async {
        udp_through().then_some(())
    })
    .await;

    // kill -9 of the active host's balancer: lb2 claims the address and its
    // gratuitous ARP repoints the client.
    let killed = Instant::now();
    one.process.kill();
    host_role(lb2, &two, "active").await;
    assert!(lb2.addresses().contains(&topology.vip()), "{}", two.log());
    eventually(DEADLINE, "the client's neighbour entry to move to lb2", || async {
        (client.neighbour(topology.vip()).as_deref() == Some(lb2.mac())).then_some(())
    })
    .await;
    eventually(DEADLINE, "the client to be served through lb2", || async {
        through_vip(client, vip).await.then_some(())
    })
    .await;
    eprintln!(
        "floating failover: served through lb2 {:?} after kill -9 of lb1",
        killed.elapsed()
    );
    eventually(DEADLINE, "a datagram echoed through the UDP VIP on lb2", || async {
        udp_through().then_some(())
    })
    .await;
    let udp_out = |s: &serde_json::Value| {
        s["vips"]
            .as_array()
            .and_then(|v| v.iter().find(|v| v["name"] == "dns"))
            .map(|v| v["udp"]["datagrams_out"].as_u64().unwrap_or(0))
    };
    assert!(
        udp_out(&host_status(lb2, two.admin).await.unwrap()).unwrap_or(0) >= 1,
        "lb2 forwarded it"
    );

    // lb1 died holding the address, and its kernel still answers ARP for
    // it: the new active's ARP probe sees that and says so.
    assert!(lb1.addresses().contains(&topology.vip()), "the leftover address");
    let conflict = eventually(DEADLINE, "lb2 to report the other holder", || async {
        let s = host_status(lb2, two.admin).await?;
        s["ha"]["vip_conflict"]["macs"].as_array().cloned()
    })
    .await;
    assert_eq!(conflict, vec![serde_json::json!(lb1.mac())], "{}", two.log());

    // Restarted, lb1 removes it and stands by; the conflict clears.
    let one_again = HostLb::start(lb1, &config(lb1, "lb1"), admin1);
    host_role(lb1, &one_again, "standby").await;
    assert!(
        !lb1.addresses().contains(&topology.vip()),
        "a restarted standby removes the address it died with:\n{}",
        one_again.log()
    );
    eventually(DEADLINE, "lb2's conflict to clear", || async {
        let s = host_status(lb2, two.admin).await?;
        s["ha"]["vip_conflict"].is_null().then_some(())
    })
    .await;

    // SIGTERM on lb2: the address moves back with the lock.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(two.process.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    host_role(lb1, &one_again, "active").await;
    eventually(DEADLINE, "the address to move back to lb1", || async {
        (lb1.addresses().contains(&topology.vip()) && !lb2.addresses().contains(&topology.vip())).then_some(())
    })
    .await;
    eventually(DEADLINE, "the client to be served through lb1 again", || async {
        through_vip(client, vip).await.then_some(())
    })
    .await;
    eventually(
        DEADLINE,
        "a datagram echoed through the UDP VIP on lb1 again",
        || async { udp_through().then_some(()) },
    )
    .await;
    assert_eq!(client.neighbour(topology.vip()).as_deref(), Some(lb1.mac()));
    drop(one);

    // `halo-lb release-vip` (a unit's ExecStopPost=): refused while halo-lb
    // runs with that config, then removes the address a kill -9 left.
    let release = |lb: &HostLb| {
        lb1.command(env!("CARGO_BIN_EXE_halo-lb"))
            .arg("--config")
            .arg(&lb.config)
            .arg("release-vip")
            .output()
            .unwrap()
    };
    let refused = release(&one_again);
    assert!(!refused.status.success(), "refused while halo-lb runs");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is in use"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        lb1.addresses().contains(&topology.vip()),
        "the live active keeps its address"
    );
    let mut one_again = one_again;
    one_again.process.kill();
    let removed = eventually(DEADLINE, "the killed process's admin port to be free", || async {
        let out = release(&one_again);
        out.status.success().then_some(out)
    })
    .await;
    assert!(
        String::from_utf8_lossy(&removed.stdout).contains("removed"),
        "{}",
        String::from_utf8_lossy(&removed.stdout)
    );
    assert!(
        !lb1.addresses().contains(&topology.vip()),
        "the leftover address is gone"
    );
    let again = release(&one_again);
    assert!(again.status.success(), "idempotent");
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("nothing to release"),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}

#[tokio::test]
async fn an_active_restarted_at_once_frees_the_lock_its_predecessor_held() {
    let consul = ConsulAgent::start().await;
    let mut p = pair("restart", &consul.http_url(), &consul.http_url()).await;
    let config = std::fs::read_to_string(&p.a.config_path).unwrap();
    // Killed and restarted within the check TTL: the re-registered check
    // never goes critical, so Consul alone would keep the dead process's
    // session, and its lock, for ever.
    p.a.signal(nix::sys::signal::Signal::SIGKILL);
    p.a.wait_exit().await;
    let restarted = start(&config, p.a.admin).await;
    eventually(DEADLINE, "one instance to be active again", || async {
        let (ra, rb) = (restarted.status().await, p.b.status().await);
        (role(&ra) == "active" || role(&rb) == "active").then_some(())
    })
    .await;
    assert!(greeting(p.vip).await.is_ok(), "the vip is served");
    assert_never_both_active(&restarted.status().await, &p.b.status().await);
    // The dead predecessor's registration still passed when the new process
    // looked for an older twin with its id; it holds the predecessor's probe
    // address itself, so it knew that one was gone: no false conflict, no
    // 2 s spent out of the election (a defect of the earlier detector).
    let log = restarted.log();
    assert!(!log.contains("taken by an older live instance"), "{log}");
    assert!(restarted.status().await["ha"]["id_conflict"].is_null());
}

#[tokio::test]
async fn two_live_instances_with_one_id_do_not_livelock() {
    // Two processes given the same ha.id (two containers with one
    // hostname, a copied config). They once destroyed each other's
    // sessions in a loop: 44 promotions in 12 s, the VIP answering 1 probe
    // in 239.
    let consul = ConsulAgent::start().await;
    let backend = TestBackend::start("one", Behavior::GreetEcho).await;
    let (admin_old, vip) = addrs();
    let admin_young = SocketAddr::from(([127, 0, 0, 1], port()));
    let url = consul.http_url();
    let mut old = start(
        &ha_config("twin", "twins", &url, admin_old, vip, &[backend.addr]),
        admin_old,
    )
    .await;
    wait_role(&old, "active").await;
    let young = start(
        &ha_config("twin", "twins", &url, admin_young, vip, &[backend.addr]),
        admin_young,
    )
    .await;

    // The younger one sees the older, stays out of the election and says so.
    let status = eventually(DEADLINE, "the younger twin to report the conflict", || async {
        let s = young.status().await;
        s["ha"]["id_conflict"].is_string().then_some(s)
    })
    .await;
    assert_ne!(role(&status), "active");
    assert!(
        young.log().contains("taken by an older live instance"),
        "{}",
        young.log()
    );
    // Over some twenty probes the active never changes and the VIP answers.
    for _ in 0..20 {
        assert!(greeting(vip).await.is_ok(), "the vip answers every probe");
        let (so, sy) = (old.status().await, young.status().await);
        assert_eq!(role(&so), "active");
        assert_eq!(so["ha"]["terms"].as_array().unwrap().len(), 1, "one term, no flapping");
        assert_eq!(sy["ha"]["terms"].as_array().unwrap().len(), 0, "the twin never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The older one dies: its check expires and the younger one takes over.
    old.signal(nix::sys::signal::Signal::SIGKILL);
    old.wait_exit().await;
    let status = wait_role(&young, "active").await;
    assert!(status["ha"]["id_conflict"].is_null(), "{status}");
    assert!(greeting(vip).await.is_ok());
}

#[tokio::test]
async fn sigterm_on_the_standby_leaves_the_active_serving() {
    let consul = ConsulAgent::start().await;
    let mut p = pair("standby-term", &consul.http_url(), &consul.http_url()).await;
    let epoch = p.a.status().await["ha"]["epoch"].as_u64().unwrap();
    // Each process registers as halo-lb-<cluster>-<id>-<instance prefix>.
    let service_id = |status: Value, id: &str| {
        format!(
            "halo-lb-standby-term-{id}-{}",
            &status["ha"]["instance"].as_str().unwrap()[..8]
        )
    };
    let (service_a, service_b) = (service_id(p.a.status().await, "a"), service_id(p.b.status().await, "b"));
    p.b.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(p.b.wait_exit().await.success(), "{}", p.b.log());
    let sa = p.a.status().await;
    assert_eq!(role(&sa), "active");
    assert_eq!(sa["ha"]["epoch"].as_u64(), Some(epoch), "no new election");
    assert!(greeting(p.vip).await.is_ok());
    // The standby took its registration with it.
    let client = halo_consul::Client::from_address(consul.http_url()).unwrap();
    assert!(client.agent_service(&service_b).await.unwrap().is_none());
    assert!(client.agent_service(&service_a).await.unwrap().is_some());
}

#[tokio::test]
async fn without_consul_an_instance_never_serves_and_says_why() {
    // Nothing listens there: no heartbeat, no session, no lock.
    let nowhere = format!("http://127.0.0.1:{}", port());
    let backend = TestBackend::start("one", Behavior::GreetEcho).await;
    let (admin, vip) = addrs();
    let lb = start(&ha_config("a", "down", &nowhere, admin, vip, &[backend.addr]), admin).await;
    let status = eventually(DEADLINE, "the Consul error to show", || async {
        let s = lb.status().await;
        s["ha"]["consul_error"].is_string().then_some(s)
    })
    .await;
    assert_eq!(role(&status), "starting");
    assert_eq!(status["serving"], false);
    assert!(
        greeting(vip).await.is_err(),
        "an instance that cannot know it leads does not serve"
    );
}

/// A pair sharing `admin.token_file`: the standby checks a write itself,
/// then forwards it to the active with the token, which the active checks
/// again.
#[tokio::test]
async fn the_standby_forwards_writes_with_the_pairs_token() {
    use crate::admin_auth::{token_file, with_token_file};

    let consul = ConsulAgent::start().await;
    let backends = [
        TestBackend::start("one", Behavior::GreetEcho).await,
        TestBackend::start("two", Behavior::GreetEcho).await,
    ];
    let backend_addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let token = token_file(dir.path(), "token", "shared-pair-token", 0o600);
    let (admin_a, vip) = addrs();
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let config = |id: &str, admin| {
        with_token_file(
            &ha_config(id, "tokened", &consul.http_url(), admin, vip, &backend_addrs),
            admin,
            &token,
        )
    };
    let a = start(&config("a", admin_a), admin_a).await;
    wait_role(&a, "active").await;
    let b = start(&config("b", admin_b), admin_b).await;
    wait_role(&b, "standby").await;

    let path = format!("/vips/web/backends/{}/disable", backends[0].addr);
    // Refused by the standby itself, without reaching the active.
    let (code, body) = halo_testkit::http::admin_post(b.admin, &path).await.unwrap();
    assert_eq!(code, 401, "{body}");
    assert!(!b.log().contains("write forwarded to the active"), "{}", b.log());
    let (code, body) = halo_testkit::http::request_with_headers(
        b.admin,
        "POST",
        &path,
        &[("Authorization", "Bearer shared-pair-token")],
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let sa = a.status().await;
    let disabled = sa["vips"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["state"] == "disabled")
        .count();
    assert_eq!(disabled, 1, "the active applied the forwarded write: {sa}");
    let log = a.log();
    let line = log
        .lines()
        .find(|l| l.contains("backend state set by operator"))
        .unwrap();
    assert!(
        line.contains("auth=\"token\"") && line.contains("forwarded_by=\"b\""),
        "{line}"
    );
    assert!(!a.log().contains("shared-pair-token") && !b.log().contains("shared-pair-token"));
}

/// A UDP VIP fails over with the pair: served by the active only (the
/// standby never binds it: the port is exclusive), by the new active after
/// a kill -9, and handed over on SIGTERM, with no overlap of terms.
#[tokio::test]
async fn a_udp_vip_fails_over_with_the_pair() {
    use std::net::{Ipv4Addr, UdpSocket};

    let consul = ConsulAgent::start().await;
    // A UDP echo backend.
    let backend = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let backend_addr = backend.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = backend.recv_from(&mut buf) {
            let _ = backend.send_to(&buf[..n], from);
        }
    });
    let vip = SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        halo_testkit::dnsd::free_udp_port(Ipv4Addr::LOCALHOST),
    ));
    let config = |id: &str, admin: SocketAddr| {
        format!(
            "[admin]\nlisten = \"{admin}\"\n[[vip]]\nname = \"dns\"\nlisten = \"{vip}\"\nprotocol = \"udp\"\nalgorithm = \"maglev\"\nbackends = [\"{backend_addr}\"]\n[consul]\naddress = \"{}\"\n[ha]\ncluster = \"udp\"\nid = \"{id}\"\n",
            consul.http_url()
        )
    };
    let admin_a = SocketAddr::from(([127, 0, 0, 1], port()));
    let admin_b = SocketAddr::from(([127, 0, 0, 1], port()));
    let a = start(&config("a", admin_a), admin_a).await;
    wait_role(&a, "active").await;
    let b = start(&config("b", admin_b), admin_b).await;
    wait_role(&b, "standby").await;

    // Who answers: the instance whose datagram counter moves.
    let ask = || async move {
        tokio::task::spawn_blocking(move || {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            let mut buf = [0u8; 16];
            s.send_to(b"hello", vip).is_ok() && s.recv_from(&mut buf).is_ok_and(|(n, _)| &buf[..n] == b"hello")
        })
        .await
        .unwrap()
    };
    let served = |lb: &Lb| {
        let admin = lb.admin;
        async move {
            let (_, body) = halo_testkit::http::get(admin, "/status").await?;
            let status: Value = serde_json::from_str(&body).ok()?;
            status["vips"][0]["udp"]["datagrams_out"].as_u64()
        }
    };
    eventually(DEADLINE, "the active to answer on the UDP VIP", || async {
        ask().await.then_some(())
    })
    .await;
    assert!(served(&a).await.unwrap_or(0) >= 1, "a answered");
    assert_eq!(served(&b).await.unwrap_or(0), 0, "the standby forwards nothing");
    assert!(UdpSocket::bind(vip).is_err(), "the active holds the port");

    // kill -9 of the active: b takes the UDP VIP.
    a.signal(nix::sys::signal::Signal::SIGKILL);
    let killed = Instant::now();
    wait_role(&b, "active").await;
    eventually(DEADLINE, "the new active to answer on the UDP VIP", || async {
        ask().await.then_some(())
    })
    .await;
    eprintln!("UDP VIP answered again {:?} after kill -9", killed.elapsed());
    assert!(served(&b).await.unwrap_or(0) >= 1, "b answers now");

    // A third instance joins as standby; SIGTERM on b hands over to it.
    let admin_c = SocketAddr::from(([127, 0, 0, 1], port()));
    let mut c = start(&config("c", admin_c), admin_c).await;
    wait_role(&c, "standby").await;
    let mut b = b;
    b.signal(nix::sys::signal::Signal::SIGTERM);
    let sc = wait_role(&c, "active").await;
    assert!(b.wait_exit().await.success(), "{}", b.log());
    eventually(DEADLINE, "the third instance to answer on the UDP VIP", || async {
        ask().await.then_some(())
    })
    .await;
    assert!(served(&c).await.unwrap_or(0) >= 1, "c answers now");
    let b_to = a_term_end(&b);
    let (_, c_from, _) = *terms(&sc).last().unwrap();
    assert!(b_to <= c_from, "c started at {c_from} before b stopped at {b_to}");
    c.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(c.wait_exit().await.success());
}
